//! Shared helpers: where the built artifacts are, manifests for the example plugins, and a
//! runner that fails a test instead of letting it hang.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plugin_host::{Host, Manifest, Trust};

/// Directory with the example plugins and binaries built by `tests/build.rs`.
pub fn artifacts() -> PathBuf {
    PathBuf::from(env!("PLUGIN_HOST_E2E_DIR"))
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A host that finds the example plugins and the worker-shim.
pub fn host() -> Host {
    Host::builder()
        .search_path(artifacts())
        .worker_shim(artifacts().join(format!("worker-shim{}", std::env::consts::EXE_SUFFIX)))
        .build()
        .unwrap()
}

/// The manifest of an example plugin, with the trust level overridden.
pub fn manifest(name: &str, trust: Trust) -> Manifest {
    let mut m = Manifest::from_file(repo().join("plugins").join(name).join("plugin.toml")).unwrap();
    m.trust = trust;
    m
}

/// Runs a future to completion on smol, failing the test if it takes longer than `limit`.
pub fn run_with_limit<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    smol::block_on(async {
        futures_lite::future::or(async { Some(fut.await) }, async {
            smol::Timer::after(limit).await;
            None
        })
        .await
        .unwrap_or_else(|| panic!("test did not finish within {limit:?}"))
    })
}

/// [`run_with_limit`] with a 60 s limit.
pub fn run<T>(fut: impl Future<Output = T>) -> T {
    run_with_limit(Duration::from_secs(60), fut)
}

/// The worker-shim built for the tests.
pub fn worker_shim() -> PathBuf {
    artifacts().join(format!("worker-shim{}", std::env::consts::EXE_SUFFIX))
}

/// Writes an executable shell script (a stand-in for the worker-shim) into `dir`.
#[cfg(unix)]
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A host whose worker-shim is `shim`.
pub fn host_with_shim(shim: &Path) -> Host {
    Host::builder()
        .search_path(artifacts())
        .worker_shim(shim)
        .build()
        .unwrap()
}

/// Whether process `pid` still exists (running or zombie).
#[cfg(target_os = "linux")]
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Polls `cond` every 10 ms for up to `limit`; returns whether it became true.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Child processes of this process, in any state (Linux).
#[cfg(target_os = "linux")]
pub fn children() -> Vec<(u32, String)> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the parenthesised command: state, ppid, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[1] == me {
            found.push((pid, fields[0].to_string()));
        }
    }
    found
}

/// Open file descriptors of this process (Linux).
#[cfg(target_os = "linux")]
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Files in the temp directory that look like our socket files.
pub fn socket_files() -> usize {
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("plugin-host-"))
                .count()
        })
        .unwrap_or(0)
}
