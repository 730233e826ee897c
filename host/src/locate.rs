//! Finding the executable that runs untrusted plugins (the worker).

use std::path::{Path, PathBuf};

use crate::error::LoadError;

/// Environment variable naming the `worker-shim` executable.
pub const WORKER_SHIM_ENV: &str = "PLUGIN_HOST_WORKER_SHIM";

/// Finds the worker-shim: the builder's setting, else `PLUGIN_HOST_WORKER_SHIM`, else
/// next to the current executable (or one directory up, for test binaries in
/// `target/*/deps`).
pub(crate) fn worker(configured: Option<&Path>, plugin: &str) -> Result<PathBuf, LoadError> {
    let file = format!("worker-shim{}", std::env::consts::EXE_SUFFIX);
    let missing = |shim: PathBuf, reason: String| LoadError::WorkerSpawn {
        plugin: plugin.to_string(),
        shim,
        reason,
    };
    // An explicit setting is authoritative: a wrong path is an error, not a fallback.
    if let Some(shim) = configured {
        return match shim.is_file() {
            true => Ok(shim.to_path_buf()),
            false => Err(missing(
                shim.to_path_buf(),
                "HostBuilder::worker_shim names no file".into(),
            )),
        };
    }
    if let Some(shim) = std::env::var_os(WORKER_SHIM_ENV).filter(|v| !v.is_empty()) {
        let shim = PathBuf::from(shim);
        return match shim.is_file() {
            true => Ok(shim),
            false => Err(missing(shim, format!("{WORKER_SHIM_ENV} names no file"))),
        };
    }
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let candidates: Vec<PathBuf> = [dir, dir.and_then(Path::parent)]
        .into_iter()
        .flatten()
        .map(|d| d.join(&file))
        .collect();
    if let Some(found) = candidates.iter().find(|c| c.is_file()) {
        return Ok(found.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(missing(
        PathBuf::from(&file),
        format!(
            "no worker-shim found (tried: {}); build it (cargo build -p plugin-host) and set \
             HostBuilder::worker_shim or {WORKER_SHIM_ENV}",
            tried.join(", ")
        ),
    ))
}
