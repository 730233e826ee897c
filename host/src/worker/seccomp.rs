//! The worker's seccomp filter: which system calls the plugin may not make.
//!
//! The filter is a balanced decision tree over the system call number, built here rather
//! than with a filter-generating crate because its shape is what a worker start pays for:
//! when a filter is installed the kernel runs it once for every system call number to
//! precompute which calls are always allowed, so the cost is (number of calls) x (path
//! length). A linear chain of ~60 comparisons cost about 200 us per worker start on the
//! reference machine; the tree's paths are about 8 instructions. A unit test runs the
//! program through a small BPF interpreter for every call number and compares each
//! outcome with the policy.

use crate::protocol::WireSandbox;

/// What the filter does with one system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Fails with EPERM.
    Deny,
    /// Fails with ENOSYS (for `clone3`, whose flags live in memory a filter cannot read:
    /// the C library then falls back on `clone`, whose flags the filter checks).
    Enosys,
    /// `clone`: denied when the flags ask for a new namespace.
    CloneFlags,
    /// `socket` with the network grant: only IPv4, IPv6 and netlink.
    InetSocket,
    /// `socketpair`: only Unix socket pairs.
    UnixPair,
}

/// System calls refused with EPERM whatever was granted.
fn always_denied() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_pidfd_open,
        libc::SYS_kcmp,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_acct,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_quotactl,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        libc::SYS_personality,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([libc::SYS_iopl, libc::SYS_ioperm, libc::SYS_uselib]);
    calls
}

/// The policy: an action per system call number (everything else is allowed).
fn policy(spec: &WireSandbox) -> Vec<(u32, Action)> {
    let mut rules: Vec<(i64, Action)> = always_denied()
        .into_iter()
        .map(|nr| (nr, Action::Deny))
        .collect();
    rules.push((libc::SYS_clone, Action::CloneFlags));
    rules.push((libc::SYS_clone3, Action::Enosys));
    // New sockets: none without the network grant, and never Unix ones (a named socket,
    // such as a D-Bus or X11 socket, would be a door out that no other layer closes:
    // Landlock does not cover connect() to a socket file). socketpair() reaches nobody.
    let socket = if spec.network {
        Action::InetSocket
    } else {
        Action::Deny
    };
    rules.push((libc::SYS_socket, socket));
    rules.push((libc::SYS_socketpair, Action::UnixPair));
    if !spec.exec {
        rules.push((libc::SYS_execve, Action::Deny));
        rules.push((libc::SYS_execveat, Action::Deny));
    }
    let mut rules: Vec<(u32, Action)> = rules
        .into_iter()
        .map(|(nr, action)| (nr as u32, action))
        .collect();
    rules.sort_by_key(|(nr, _)| *nr);
    rules.dedup_by_key(|(nr, _)| *nr);
    rules
}

/// Namespace flags `clone` may not ask for.
const NEW_NAMESPACES: u32 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u32
    | 0x80; // CLONE_NEWTIME

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 183 | 0x8000_0000 | 0x4000_0000;
#[cfg(target_arch = "riscv64")]
const AUDIT_ARCH: u32 = 243 | 0x8000_0000 | 0x4000_0000;

// Classic BPF opcodes (linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Offsets in `struct seccomp_data`: nr, arch, then the arguments (low word first on the
// little-endian targets this builds for).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

/// Where a jump goes.
#[derive(Clone, Copy, Debug)]
enum Target {
    Next,
    Label(Label),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    Node(usize),
    Clone,
    InetSocket,
    UnixPair,
    Allow,
    Deny,
    Enosys,
    Kill,
}

struct Insn {
    code: u16,
    k: u32,
    jt: Target,
    jf: Target,
}

fn to_label(action: Action) -> Label {
    match action {
        Action::Deny => Label::Deny,
        Action::Enosys => Label::Enosys,
        Action::CloneFlags => Label::Clone,
        Action::InetSocket => Label::InetSocket,
        Action::UnixPair => Label::UnixPair,
    }
}

/// Builds the filter program for `spec`.
pub(crate) fn program(spec: &WireSandbox) -> Result<Vec<libc::sock_filter>, String> {
    let rules = policy(spec);
    let mut code: Vec<Insn> = Vec::new();
    let mut labels: Vec<(Label, usize)> = Vec::new();
    let op = |code: u16, k: u32, jt: Target, jf: Target| Insn { code, k, jt, jf };
    use Target::{Label as L, Next};

    // Another architecture's calls (the 32-bit ABI on x86-64) have other numbers: kill.
    code.push(op(LD_W_ABS, ARCH, Next, Next));
    code.push(op(JEQ_K, AUDIT_ARCH, Next, L(Label::Kill)));
    code.push(op(LD_W_ABS, NR, Next, Next));
    if cfg!(target_arch = "x86_64") {
        // The x32 ABI's numbers (bit 30 set) would slip past the comparisons below.
        code.push(op(JGE_K, 0x4000_0000, L(Label::Enosys), Next));
    }
    // The search tree over [lo, hi).
    let mut node = 0;
    let mut stack = vec![(0usize, rules.len(), None::<usize>)];
    while let Some((lo, hi, id)) = stack.pop() {
        if let Some(id) = id {
            labels.push((Label::Node(id), code.len()));
        }
        if hi - lo == 1 {
            let (nr, action) = rules[lo];
            code.push(op(JEQ_K, nr, L(to_label(action)), L(Label::Allow)));
            continue;
        }
        let mid = (lo + hi) / 2;
        node += 1;
        let right = node;
        code.push(op(JGE_K, rules[mid].0, L(Label::Node(right)), Next));
        // Left subtree right after; the right one after that.
        stack.push((mid, hi, Some(right)));
        stack.push((lo, mid, None));
    }
    // Argument checks.
    let used = |action: Action| rules.iter().any(|(_, a)| *a == action);
    if used(Action::CloneFlags) {
        labels.push((Label::Clone, code.len()));
        code.push(op(LD_W_ABS, ARG0_LOW, Next, Next));
        code.push(op(JSET_K, NEW_NAMESPACES, L(Label::Deny), L(Label::Allow)));
    }
    if used(Action::InetSocket) {
        labels.push((Label::InetSocket, code.len()));
        code.push(op(LD_W_ABS, ARG0_LOW, Next, Next));
        code.push(op(JEQ_K, libc::AF_INET as u32, L(Label::Allow), Next));
        code.push(op(JEQ_K, libc::AF_INET6 as u32, L(Label::Allow), Next));
        code.push(op(
            JEQ_K,
            libc::AF_NETLINK as u32,
            L(Label::Allow),
            L(Label::Deny),
        ));
    }
    if used(Action::UnixPair) {
        labels.push((Label::UnixPair, code.len()));
        code.push(op(LD_W_ABS, ARG0_LOW, Next, Next));
        code.push(op(
            JEQ_K,
            libc::AF_UNIX as u32,
            L(Label::Allow),
            L(Label::Deny),
        ));
    }
    for (label, value) in [
        (Label::Allow, libc::SECCOMP_RET_ALLOW),
        (Label::Deny, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        (Label::Enosys, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        (Label::Kill, libc::SECCOMP_RET_KILL_PROCESS),
    ] {
        labels.push((label, code.len()));
        code.push(op(RET_K, value, Next, Next));
    }
    // Resolve jumps: forward only, at most 255 instructions.
    let mut out = Vec::with_capacity(code.len());
    for (i, insn) in code.iter().enumerate() {
        let offset = |target: Target| -> Result<u8, String> {
            let to = match target {
                Target::Next => return Ok(0),
                Target::Label(label) => labels
                    .iter()
                    .find(|(l, _)| *l == label)
                    .map(|(_, at)| *at)
                    .ok_or_else(|| format!("seccomp filter: no label {label:?}"))?,
            };
            to.checked_sub(i + 1)
                .and_then(|d| u8::try_from(d).ok())
                .ok_or_else(|| format!("seccomp filter: jump from {i} to {to} out of range"))
        };
        out.push(libc::sock_filter {
            code: insn.code,
            jt: offset(insn.jt)?,
            jf: offset(insn.jf)?,
            k: insn.k,
        });
    }
    if out.len() > u16::MAX as usize {
        return Err("seccomp filter too long".into());
    }
    Ok(out)
}

/// Installs the filter on the calling thread (the worker is single-threaded here; threads
/// it starts later inherit it). `no_new_privs` must already be set.
pub(crate) fn install(spec: &WireSandbox) -> Result<(), String> {
    let filter = program(spec)?;
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog` and the `len` instructions it
    // points to, both alive for the duration of the call; the kernel copies them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(format!(
            "installing the filter: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over one `seccomp_data`, for the opcodes `program` emits.
    fn run(filter: &[libc::sock_filter], nr: u32, arch: u32, arg0: u64) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        data[16..24].copy_from_slice(&arg0.to_le_bytes());
        let mut a = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = &filter[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { insn.jt } else { insn.jf });
            match insn.code {
                LD_W_ABS => {
                    let at = insn.k as usize;
                    a = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
                }
                JEQ_K => pc += jump(a == insn.k),
                JGE_K => pc += jump(a >= insn.k),
                JSET_K => pc += jump(a & insn.k != 0),
                RET_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    fn spec(network: bool, exec: bool) -> WireSandbox {
        WireSandbox {
            mode: "required".into(),
            network,
            exec,
            ..WireSandbox::default()
        }
    }

    #[test]
    fn every_call_number_gets_exactly_the_policy() {
        for (network, exec) in [(false, false), (true, false), (false, true), (true, true)] {
            let spec = spec(network, exec);
            let filter = program(&spec).unwrap();
            let denied = always_denied();
            for nr in 0..1024u32 {
                let n = i64::from(nr);
                let got = run(&filter, nr, AUDIT_ARCH, 0);
                // socket and socketpair with argument 0 = 0 (AF_UNSPEC) are denied too.
                let expected = if denied.contains(&n)
                    || (!exec && (n == libc::SYS_execve || n == libc::SYS_execveat))
                    || n == libc::SYS_socket
                    || n == libc::SYS_socketpair
                {
                    EPERM
                } else if n == libc::SYS_clone3 {
                    ENOSYS
                } else {
                    ALLOW
                };
                assert_eq!(got, expected, "call {nr} (network {network}, exec {exec})");
            }
        }
    }

    #[test]
    fn arguments_are_checked_where_they_matter() {
        let denied = program(&spec(false, false)).unwrap();
        let granted = program(&spec(true, false)).unwrap();
        let sock = libc::SYS_socket as u32;
        let pair = libc::SYS_socketpair as u32;
        let clone = libc::SYS_clone as u32;
        let (inet, inet6, unix, netlink) = (
            libc::AF_INET as u64,
            libc::AF_INET6 as u64,
            libc::AF_UNIX as u64,
            libc::AF_NETLINK as u64,
        );
        for family in [inet, inet6, unix, netlink] {
            assert_eq!(run(&denied, sock, AUDIT_ARCH, family), EPERM);
        }
        assert_eq!(run(&granted, sock, AUDIT_ARCH, inet), ALLOW);
        assert_eq!(run(&granted, sock, AUDIT_ARCH, inet6), ALLOW);
        assert_eq!(run(&granted, sock, AUDIT_ARCH, netlink), ALLOW);
        assert_eq!(
            run(&granted, sock, AUDIT_ARCH, unix),
            EPERM,
            "no Unix sockets"
        );
        assert_eq!(run(&denied, pair, AUDIT_ARCH, unix), ALLOW);
        assert_eq!(run(&denied, pair, AUDIT_ARCH, inet), EPERM);
        // A thread (CLONE_VM | CLONE_THREAD | ...) and a fork are fine.
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD) as u64;
        assert_eq!(run(&denied, clone, AUDIT_ARCH, thread), ALLOW);
        assert_eq!(run(&denied, clone, AUDIT_ARCH, libc::SIGCHLD as u64), ALLOW);
        for flag in [
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
            libc::CLONE_NEWNS,
        ] {
            assert_eq!(
                run(
                    &denied,
                    clone,
                    AUDIT_ARCH,
                    flag as u64 | libc::SIGCHLD as u64
                ),
                EPERM
            );
        }
    }

    #[test]
    fn other_architectures_are_killed_and_x32_refused() {
        let filter = program(&spec(false, false)).unwrap();
        assert_eq!(
            run(&filter, 0, 0x4000_0003, 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        if cfg!(target_arch = "x86_64") {
            let x32_ptrace = 0x4000_0000 | libc::SYS_ptrace as u32;
            assert_eq!(run(&filter, x32_ptrace, AUDIT_ARCH, 0), ENOSYS);
        }
        // The tree keeps paths short: no call runs more than a handful of instructions.
        assert!(filter.len() < 255, "{} instructions", filter.len());
    }
}
