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

/// macOS (no parent-death signal): a thread waits in kqueue for the host's exit
/// (`EVFILT_PROC`/`NOTE_EXIT` on its pid) and ends the worker then, whatever the plugin is
/// doing. Fails if the host is already gone.
#[cfg(target_os = "macos")]
pub(super) fn die_with_parent() -> Result<(), String> {
    // SAFETY: no arguments.
    let parent = unsafe { libc::getppid() };
    if let Ok(expected) = std::env::var(super::PARENT_ENV) {
        if parent.to_string() != expected {
            return Err(format!(
                "the host (pid {expected}) is gone; parent is now {parent}"
            ));
        }
    }
    // SAFETY: no arguments; returns a new descriptor or -1.
    let kq = unsafe { libc::kqueue() };
    if kq < 0 {
        return Err(format!(
            "cannot watch the host: kqueue: {}",
            std::io::Error::last_os_error()
        ));
    }
    let watch = libc::kevent {
        ident: parent as libc::uintptr_t,
        filter: libc::EVFILT_PROC,
        flags: libc::EV_ADD | libc::EV_ONESHOT,
        fflags: libc::NOTE_EXIT,
        data: 0,
        udata: std::ptr::null_mut(),
    };
    // SAFETY: `kq` is our kqueue; one valid change, no event list.
    let added = unsafe { libc::kevent(kq, &watch, 1, std::ptr::null_mut(), 0, std::ptr::null()) };
    if added < 0 {
        // ESRCH: the host exited before the watch was set.
        return Err(format!(
            "cannot watch the host (pid {parent}): {}",
            std::io::Error::last_os_error()
        ));
    }
    std::thread::Builder::new()
        .name("host-watch".into())
        .spawn(move || loop {
            // SAFETY: a zeroed kevent is a valid buffer for one event.
            let mut event: libc::kevent = unsafe { std::mem::zeroed() };
            // SAFETY: `kq` is our kqueue; no changes, room for one event, no timeout.
            let n =
                unsafe { libc::kevent(kq, std::ptr::null(), 0, &mut event, 1, std::ptr::null()) };
            if n > 0 {
                // SAFETY: ends this process at once; nothing to unwind for.
                unsafe { libc::_exit(i32::from(super::EXIT_NO_HOST)) };
            }
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        })
        .map(|_| ())
        .map_err(|e| format!("cannot start the thread watching the host: {e}"))
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
