//! The worker's sandbox on Linux: after the handshake and before the plugin's library is
//! opened, the worker puts the plugin in a box it cannot leave.
//!
//! Layers, in the order they are applied (each named in `Loaded.sandbox` when in force):
//!
//! | layer | what it stops |
//! |---|---|
//! | `environment` | the host's variables (the host passes only granted names) |
//! | `file descriptors` | every inherited descriptor but the connection and stderr is closed |
//! | `not dumpable` | same-user processes reading the worker's memory or copying its fds |
//! | `user namespace`, `pid namespace`, `ipc namespace` | the host and other processes are invisible; every process the plugin starts dies with it; System V IPC objects of the user's other processes are out of reach |
//! | `task limit` | fork bombs (`RLIMIT_NPROC` in the worker's own user namespace) |
//! | `capabilities` | the namespace's capabilities are dropped |
//! | `no_new_privs` | set-uid programs gaining privileges |
//! | `landlock filesystem` | files outside the plugin's directory, system libraries and grants |
//! | `landlock network` | TCP bind/connect (unless network is granted) |
//! | `landlock scopes` | signals to, and abstract sockets of, processes outside the sandbox |
//! | `seccomp` | ptrace, process_vm_*, pidfd_getfd, mount/bpf/kexec-class calls, io_uring, new namespaces, new sockets (only TCP/UDP/netlink, with the network grant), execve (unless exec) |
//!
//! The pid namespace needs a fork: the process the host spawned (the *relay*) unshares,
//! forks an *init* (pid 1 of the new namespace) which forks the *plugin process*. The relay
//! mirrors the plugin process's exit (code or signal) as its own, so the host's crash
//! reports read as before; when init exits, the kernel kills everything left in the
//! namespace, however it detached. Each link dies with its parent (`PR_SET_PDEATHSIG`).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::protocol::WireSandbox;

/// What was applied, and what could not be.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Layers in force.
    pub enforced: Vec<String>,
    /// Layers missing, each `layer: why` (only in best-effort mode; required fails).
    pub missing: Vec<String>,
}

impl Applied {
    /// Records a layer's outcome; in required mode a failure is the load's error.
    fn layer(
        &mut self,
        required: bool,
        name: &str,
        result: Result<(), String>,
    ) -> Result<(), String> {
        match result {
            Ok(()) => {
                self.enforced.push(name.to_string());
                Ok(())
            }
            Err(why) if required => Err(format!("{name}: {why}")),
            Err(why) => {
                self.missing.push(format!("{name}: {why}"));
                Ok(())
            }
        }
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Makes the process non-dumpable: same-user processes can then no longer ptrace it, read
/// `/proc/<pid>/mem` or `/proc/<pid>/fd`, or copy its descriptors with `pidfd_getfd`.
/// The first thing the worker does, before it holds anything worth stealing but the socket.
pub(crate) fn not_dumpable() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(format!("prctl(PR_SET_DUMPABLE): {}", errno()));
    }
    Ok(())
}

/// Moves the connection to fd 3 and the shared region (if any) to fd 4, points stdin at
/// /dev/null and closes every other descriptor above them. Returns the connection and the
/// region's descriptor.
///
/// The region stays open at a known number, as the connection does: its size is sealed,
/// so mapping it again gives a plugin nothing it does not have (the worker's mapping is in
/// its address space anyway), and fault-injection plugins find it there.
pub(crate) fn settle_fds(
    conn: RawFd,
    region: Option<OwnedFd>,
) -> Result<(OwnedFd, Option<OwnedFd>), String> {
    const CONN: RawFd = 3;
    const REGION: RawFd = 4;
    if conn != CONN {
        // SAFETY: dup2 on descriptors this process owns; fd 3 is replaced atomically (a
        // descriptor the host leaked there is closed, which is the point).
        if unsafe { libc::dup2(conn, CONN) } < 0 {
            return Err(format!("dup2 of the connection: {}", errno()));
        }
    }
    // SAFETY: after dup2 (or when it already was fd 3) this process owns fd 3, the
    // connection, and nothing else holds it as an OwnedFd.
    let owned = unsafe { OwnedFd::from_raw_fd(CONN) };
    set_cloexec(CONN)?;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| format!("cannot open /dev/null: {e}"))?;
    if conn != 0 {
        // The connection arrived elsewhere; fd 0 stays whatever the host gave.
    } else {
        // SAFETY: dup2 of a descriptor we own onto fd 0 (the connection's old number, now
        // duplicated at fd 3): a plugin reading stdin gets end-of-file, not protocol bytes.
        if unsafe { libc::dup2(null.as_raw_fd(), 0) } < 0 {
            return Err(format!("dup2 of /dev/null to stdin: {}", errno()));
        }
    }
    drop(null);
    let region = match region {
        Some(fd) => {
            // SAFETY: dup2 of a descriptor we own (numbered 10 or more, see
            // `worker::take_region_fd`) onto fd 4, replacing whatever the host leaked there.
            if unsafe { libc::dup2(fd.as_raw_fd(), REGION) } < 0 {
                return Err(format!("dup2 of the shared region: {}", errno()));
            }
            drop(fd);
            set_cloexec(REGION)?;
            // SAFETY: fd 4 was just made a copy of the region; nothing else owns it.
            Some(unsafe { OwnedFd::from_raw_fd(REGION) })
        }
        None => None,
    };
    close_from(if region.is_some() {
        REGION + 1
    } else {
        CONN + 1
    });
    Ok((owned, region))
}

fn set_cloexec(fd: RawFd) -> Result<(), String> {
    // SAFETY: fcntl on a descriptor this process owns, integer arguments only.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(format!("fcntl(FD_CLOEXEC): {}", errno()));
    }
    Ok(())
}

/// Closes every descriptor from `first` up.
fn close_from(first: RawFd) {
    // SAFETY: close_range takes integers; closing descriptors nobody in this process
    // holds as an owned handle (the worker is single-threaded here, and the only owned
    // descriptors are below `first`).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    if rc != 0 {
        // Kernels before 5.9: close them one by one.
        let max = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(1024)
            .min(65536) as RawFd;
        for fd in first..max {
            // SAFETY: as above; EBADF for descriptors that are not open is ignored.
            unsafe { libc::close(fd) };
        }
    }
}

/// Asks for SIGKILL when the parent (thread) exits.
fn die_with_parent() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if rc != 0 {
        return Err(format!("prctl(PR_SET_PDEATHSIG): {}", errno()));
    }
    Ok(())
}

fn set_name(name: &[u8]) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`,
    // which lives for the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Enters new user, pid and IPC namespaces and forks twice; returns only in the plugin process
/// (in the relay and init it never returns). `conn` is closed in relay and init so the
/// host sees end-of-file the moment the plugin process dies.
///
/// No network namespace: creating one costs about 0.4 ms per worker start (measured: 40%
/// of the whole sandbox's cost at cold start), and it would isolate nothing, since the
/// seccomp filter lets a plugin without the network grant create no socket at all and
/// Landlock refuses TCP; the only socket the plugin holds is its connection to the host.
pub(crate) fn enter_namespaces(
    spec: &WireSandbox,
    conn: RawFd,
    applied: &mut Applied,
) -> Result<(), String> {
    let required = spec.mode == "required";
    // SAFETY: unshare takes flags only. The process is single-threaded here (the worker
    // starts its threads after the plugin is loaded), as CLONE_NEWUSER requires.
    // A new IPC namespace too (cheap): System V shared memory, semaphores and message
    // queues of the user's other processes would otherwise be open to the plugin.
    let rc =
        unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWPID | libc::CLONE_NEWIPC) };
    if rc != 0 {
        let why = format!(
            "unshare: {} (unprivileged user namespaces disabled?)",
            errno()
        );
        applied.layer(required, "user namespace", Err(why.clone()))?;
        applied.layer(required, "pid namespace", Err(why.clone()))?;
        applied.layer(required, "ipc namespace", Err(why))?;
        return Ok(());
    }
    // Changing credentials may reset these; set them again.
    let _ = not_dumpable();
    let _ = die_with_parent();

    let (status_read, status_write) = pipe()?;
    // SAFETY: fork in a single-threaded process (see above): the child may run any code.
    let init = unsafe { libc::fork() };
    if init < 0 {
        let why = format!("fork: {}", errno());
        applied.layer(required, "pid namespace", Err(why))?;
        return Ok(());
    }
    if init > 0 {
        // The relay: hold nothing of the plugin's, wait, and end the way it ended.
        drop(status_write);
        // SAFETY: closing our copy of the connection; the stream that owns it in the caller
        // is never used again in this process, which exits from `relay` below.
        unsafe { libc::close(conn) };
        relay(init, status_read);
    }
    // Init (pid 1 of the new namespace).
    drop(status_read);
    let _ = die_with_parent();
    // SAFETY: fork in a single-threaded process.
    let plugin = unsafe { libc::fork() };
    if plugin < 0 {
        eprintln!(
            "worker-shim: cannot start the plugin's process: fork: {}",
            errno()
        );
        report_status(&status_write, 0, 70);
        // SAFETY: _exit ends the process without running destructors (none are needed).
        unsafe { libc::_exit(1) };
    }
    if plugin > 0 {
        set_name(b"plugin-init");
        // SAFETY: closing init's copy of the connection; init never touches it again.
        unsafe { libc::close(conn) };
        init_loop(plugin, &status_write);
    }
    // The plugin process.
    drop(status_write);
    let _ = die_with_parent();
    applied.enforced.push("user namespace".into());
    applied.enforced.push("pid namespace".into());
    applied.enforced.push("ipc namespace".into());
    Ok(())
}

fn pipe() -> Result<(std::fs::File, std::fs::File), String> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", errno()));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Status record from init to the relay: kind (0 exited, 1 signalled) and value.
fn report_status(mut pipe: &std::fs::File, kind: u32, value: i32) {
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&kind.to_le_bytes());
    record[4..].copy_from_slice(&value.to_le_bytes());
    let _ = pipe.write_all(&record);
}

/// Init: reaps every process in the namespace; when the plugin process ends, reports how
/// and exits, which makes the kernel kill whatever is left in the namespace.
fn init_loop(plugin: libc::pid_t, status: &std::fs::File) -> ! {
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes the status into `raw`.
        let pid = unsafe { libc::waitpid(-1, &mut raw, 0) };
        if pid == plugin {
            if libc::WIFSIGNALED(raw) {
                report_status(status, 1, libc::WTERMSIG(raw));
            } else {
                report_status(status, 0, libc::WEXITSTATUS(raw));
            }
            // SAFETY: ends init; the kernel then kills the rest of the namespace.
            unsafe { libc::_exit(0) };
        }
        if pid < 0 && errno().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: as above.
            unsafe { libc::_exit(1) };
        }
    }
}

/// The relay: waits for init, then exits the way the plugin process did.
fn relay(init: libc::pid_t, mut status: std::fs::File) -> ! {
    let mut record = [0u8; 8];
    let got = status.read_exact(&mut record).is_ok();
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes the status into `raw`.
        let pid = unsafe { libc::waitpid(init, &mut raw, 0) };
        if pid == init || errno().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    if !got {
        // Init died without a word: it was killed (by the host's group kill, or with us).
        mirror_signal(libc::SIGKILL);
    }
    let kind = u32::from_le_bytes(record[..4].try_into().unwrap_or_default());
    let value = i32::from_le_bytes(record[4..].try_into().unwrap_or_default());
    if kind == 1 {
        mirror_signal(value);
    }
    // SAFETY: _exit with the plugin process's exit code.
    unsafe { libc::_exit(value) }
}

/// Dies of `signal` (never a core file: the plugin process's, if any, was already written).
fn mirror_signal(signal: i32) -> ! {
    let _ = rustix::process::setrlimit(
        rustix::process::Resource::Core,
        rustix::process::Rlimit {
            current: Some(0),
            maximum: None,
        },
    );
    // SAFETY: resetting a signal to its default action, unblocking it and raising it; no
    // handler code runs.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(signal);
        // A signal whose default is not to terminate: say which one it was.
        libc::_exit(128 + signal)
    }
}

/// In the plugin process: the layers that restrict the process itself.
pub(crate) fn restrict(
    spec: &WireSandbox,
    concurrency: u32,
    host_is_root: bool,
    applied: &mut Applied,
) -> Result<(), String> {
    let required = spec.mode == "required";
    // The worker's own threads (`concurrency + 1`, and up to `HOST_WAIT_THREADS` more while
    // calls wait on host functions), init and the relay, plus the plugin's budget.
    let tasks =
        u64::from(spec.tasks) + u64::from(concurrency) + u64::from(super::HOST_WAIT_THREADS) + 8;
    let nproc = rustix::process::setrlimit(
        rustix::process::Resource::Nproc,
        rustix::process::Rlimit {
            current: Some(tasks),
            maximum: Some(tasks),
        },
    )
    .map_err(|e| format!("setrlimit(RLIMIT_NPROC): {e}"));
    let nproc = nproc.and_then(|()| match host_is_root {
        true => Err("the kernel does not count tasks of root (the host runs as root)".into()),
        false => Ok(()),
    });
    // Not required: it is a resource limit, not a boundary; reported either way.
    applied.layer(false, "task limit", nproc)?;
    applied.layer(required, "capabilities", drop_capabilities(spec.exec))?;
    // SAFETY: prctl with integer arguments only.
    let nnp = match unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(format!("prctl(PR_SET_NO_NEW_PRIVS): {}", errno())),
    };
    applied.layer(required, "no_new_privs", nnp)?;
    landlock(spec, required, applied)?;
    applied.layer(required, "seccomp", super::seccomp::install(spec))?;
    Ok(())
}

fn drop_capabilities(exec: bool) -> Result<(), String> {
    // With exec granted, the bounding set first, so that running a program (as the
    // namespace's root, say) gains nothing. Without exec it never matters: it only acts
    // at execve, which the seccomp filter refuses.
    if exec {
        for cap in 0..=63 {
            // SAFETY: prctl with integer arguments; EINVAL past the last capability is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads one header and two data records (version 3), all of which
    // live for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc != 0 {
        return Err(format!("capset: {}", errno()));
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// The Landlock ABI version the kernel offers (0: none).
pub(crate) fn landlock_abi() -> i32 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag
    // only returns the ABI version; nothing is read or written.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

/// Directories the dynamic loader reads shared libraries from.
const SYSTEM_LIBRARIES: &[&str] = &[
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/dev/urandom",
    "/dev/random",
    "/dev/zero",
];

/// What name resolution and TLS read, when network is granted.
const NETWORK_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl/certs",
    "/etc/ca-certificates",
    "/usr/share/ca-certificates",
];

/// Programs, when exec is granted.
const SYSTEM_PROGRAMS: &[&str] = &["/bin", "/usr/bin", "/usr/local/bin", "/sbin", "/usr/sbin"];

fn landlock(spec: &WireSandbox, required: bool, applied: &mut Applied) -> Result<(), String> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset,
        RulesetAttr, RulesetCreatedAttr, Scope, ABI,
    };
    let kernel = landlock_abi();
    let abi = ABI::V6;
    if kernel < 1 {
        let why = "the kernel offers no Landlock (needs Linux 5.13+ with Landlock enabled)";
        applied.layer(required, "landlock filesystem", Err(why.into()))?;
        if !spec.network {
            applied.layer(required, "landlock network", Err(why.into()))?;
        }
        applied.layer(required, "landlock scopes", Err(why.into()))?;
        return Ok(());
    }
    let read_access = AccessFs::from_read(abi);
    let mut write_access = AccessFs::from_all(abi);
    if !spec.exec {
        write_access &= !AccessFs::Execute;
    }
    let mut read: Vec<&str> = SYSTEM_LIBRARIES.to_vec();
    read.extend(spec.read.iter().map(String::as_str));
    if spec.exec {
        read.extend(SYSTEM_PROGRAMS);
    }
    if spec.network {
        read.extend(NETWORK_FILES);
    }
    let result = (|| -> Result<landlock::RestrictionStatus, landlock::RulesetError> {
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi))?;
        if !spec.network {
            ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
        }
        ruleset
            .scope(Scope::from_all(abi))?
            .create()?
            .add_rules(path_beneath_rules(&read, read_access))?
            .add_rules(path_beneath_rules(&spec.write, write_access))?
            .add_rules(path_beneath_rules(
                ["/dev/null"],
                AccessFs::ReadFile | AccessFs::WriteFile,
            ))?
            .restrict_self()
    })();
    match result {
        Err(e) => {
            let why = format!("{e}");
            applied.layer(required, "landlock filesystem", Err(why.clone()))?;
            if !spec.network {
                applied.layer(required, "landlock network", Err(why.clone()))?;
            }
            applied.layer(required, "landlock scopes", Err(why))?;
        }
        Ok(status) => {
            let enforced = !matches!(status.ruleset, landlock::RulesetStatus::NotEnforced);
            let fs = if enforced {
                Ok(())
            } else {
                Err("the kernel did not enforce the ruleset".to_string())
            };
            applied.layer(required, "landlock filesystem", fs)?;
            if !spec.network {
                let net = if enforced && kernel >= 4 {
                    Ok(())
                } else {
                    Err(format!("needs Landlock ABI 4, the kernel offers {kernel}"))
                };
                applied.layer(required, "landlock network", net)?;
            }
            let scopes = if enforced && kernel >= 6 {
                Ok(())
            } else {
                Err(format!("needs Landlock ABI 6, the kernel offers {kernel}"))
            };
            applied.layer(required, "landlock scopes", scopes)?;
        }
    }
    Ok(())
}
