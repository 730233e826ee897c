//! Process set-up in the worker before the plugin is loaded: die with the host, keep
//! stdout out of the host's terminal, and apply the manifest's resource limits.

use crate::protocol::WireLimits;

/// Linux: ask for SIGKILL when the host thread that spawned us exits, then check that the
/// host had not already gone before we asked.
#[cfg(target_os = "linux")]
pub(super) fn die_with_parent() -> Result<(), String> {
    use rustix::process::{getppid, set_parent_process_death_signal, Signal};
    set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    if let Ok(expected) = std::env::var(super::PARENT_ENV) {
        let parent = getppid()
            .map(|p| p.as_raw_nonzero().get().to_string())
            .unwrap_or_default();
        if parent != expected {
            return Err(format!(
                "the host (pid {expected}) is gone; parent is now {parent:?}"
            ));
        }
    }
    Ok(())
}

/// Sends the plugin's stdout to stderr, which the host captures for crash reports.
pub(super) fn stdout_to_stderr() {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let _ = rustix::stdio::dup2_stdout(std::io::stderr().as_fd());
    }
}

/// Applies rlimits. A limit that cannot be set is an error: the manifest asked for it.
pub(super) fn apply(limits: &WireLimits) -> Result<(), String> {
    #[cfg(unix)]
    {
        use rustix::process::{setrlimit, Resource, Rlimit};
        let set = |resource: Resource, what: &str, value: u64| {
            setrlimit(
                resource,
                Rlimit {
                    current: Some(value),
                    maximum: Some(value),
                },
            )
            .map_err(|e| format!("cannot limit {what} to {value}: {e}"))
        };
        if let Some(bytes) = limits.memory {
            set(Resource::As, "address space", bytes)?;
        }
        if let Some(seconds) = limits.cpu_seconds {
            // Soft limit sends SIGXCPU, the hard limit one second later SIGKILL.
            setrlimit(
                Resource::Cpu,
                Rlimit {
                    current: Some(seconds),
                    maximum: Some(seconds + 1),
                },
            )
            .map_err(|e| format!("cannot limit CPU time to {seconds}s: {e}"))?;
        }
        if let Some(n) = limits.open_files {
            set(Resource::Nofile, "open files", n)?;
        }
        if !limits.core_dumps {
            set(Resource::Core, "core file size", 0)?;
        }
    }
    // Windows: the host's job object holds the memory and CPU-time limits (the worker
    // could lift limits of its own); the open-file limit has no counterpart.
    #[cfg(not(any(unix, windows)))]
    {
        if limits.memory.is_some() || limits.cpu_seconds.is_some() || limits.open_files.is_some() {
            return Err("resource limits are only enforced on Unix and Windows".into());
        }
    }
    #[cfg(windows)]
    let _ = limits;
    Ok(())
}
