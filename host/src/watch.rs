//! Reloading plugins whose library file changed ([`HostBuilder::watch`](crate::HostBuilder::watch)):
//! a thread polls the files' metadata; no platform file-notification API is needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use crate::host::Shared;
use crate::manifest::Trust;

/// What identifies a version of a file: replaced (renamed over) or rewritten, one of
/// these changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    #[cfg(unix)]
    inode: u64,
}

/// The file's stamp now (`None` if it cannot be read).
pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

/// Starts the watcher thread; it ends with the host.
pub(crate) fn start(host: Weak<Shared>, interval: Duration) {
    let spawned = std::thread::Builder::new()
        .name("plugin-host-watch".into())
        .spawn(move || run(host, interval));
    if let Err(e) = spawned {
        tracing::error!("cannot start the library watcher thread: {e}");
    }
}

fn run(host: Weak<Shared>, interval: Duration) {
    // Per plugin: a new version seen at the last poll, acted on once it stays the same
    // for a poll (so a file being written is not loaded half-way).
    let mut seen: HashMap<(String, PathBuf), Stamp> = HashMap::new();
    loop {
        std::thread::sleep(interval);
        let Some(shared) = host.upgrade() else { return };
        let plugins = shared.plugins();
        drop(shared);
        let mut live = Vec::with_capacity(plugins.len());
        for plugin in plugins {
            if plugin.trust() == Trust::Trusted || plugin.is_stopped() {
                continue;
            }
            let key = (
                plugin.name().to_string(),
                plugin.library_path().to_path_buf(),
            );
            live.push(key.clone());
            let Some(now) = stamp(&key.1) else { continue };
            if Some(&now) == plugin.loaded_stamp().as_ref() {
                seen.remove(&key);
                continue;
            }
            if seen.get(&key) != Some(&now) {
                // Changed since the last poll: wait until it settles.
                seen.insert(key, now);
                continue;
            }
            seen.remove(&key);
            tracing::info!(plugin = %plugin.name(), library = %plugin.library_path().display(), "library changed on disk; reloading");
            // A failure is logged and sent as an event by `reload` itself; the old
            // workers keep serving.
            let _ = futures_lite::future::block_on(plugin.reload());
        }
        seen.retain(|k, _| live.contains(k));
    }
}
