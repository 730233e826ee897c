//! The sandbox of untrusted plugins, attacked by a plugin that does what a malicious one
//! would (`plugins/attack/attack.c`): read secrets, write files, reach the network, kill,
//! trace or read other processes, run programs, steal file descriptors, leave orphans.
//!
//! Each attack method answers `ok: ...` when it worked and `denied: ERRNO (...)` when it did
//! not; the tests say which errnos count as "denied for the right reason" per attack.
//! Root bypasses file permissions and may trace anything, so the tests that would be
//! meaningless as root run themselves again as `nobody` (uid 65534) when they find
//! themselves root.
#![cfg(target_os = "linux")]

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, ErrorKind};
use std::net::{TcpListener, UdpSocket};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{
    artifacts, comm_of, descendants, install_attack, manifest, output_with_limit, parent_of,
    plugin_process, processes_named, run, run_with_limit, wait_until, worker_shim,
};
use plugin_host::{Grant, Host, HostBuilder, Manifest, Permissions, Plugin, Trust};
use serde_json::json;

/// A variable in the host's environment that no plugin was granted.
const SECRET_VAR: &str = "PLUGIN_HOST_TEST_SECRET";
const SECRET_VALUE: &str = "hunter2-do-not-leak";

/// Set when this binary runs again as a child (as nobody, or as a host to kill).
const AS_NOBODY_VAR: &str = "PLUGIN_HOST_TEST_AS_NOBODY";
const ROLE_VAR: &str = "PLUGIN_HOST_TEST_ROLE";
const ROLE_TAG_VAR: &str = "PLUGIN_HOST_TEST_ORPHAN_TAG";
const ROLE_DIR_VAR: &str = "PLUGIN_HOST_TEST_DIR";
const READY: &str = "ORPHAN-HOST-READY";

/// Errnos that mean "the file system said no" (Landlock: EACCES; a read-only or absent
/// mount: EROFS, ENOENT; seccomp: EPERM).
const FS: &[&str] = &["EACCES", "EPERM", "EROFS", "ENOENT"];
/// /proc of another process: refused, or not visible from the plugin's pid namespace.
const PROC: &[&str] = &["EACCES", "EPERM", "ENOENT", "ESRCH"];
/// Signals to a process outside the sandbox.
const KILL: &[&str] = &["EPERM", "ESRCH"];
/// Tracing, reading or stealing from another process.
const TRACE: &[&str] = &["EPERM", "ESRCH", "EACCES", "ENOSYS"];
/// TCP out: without the network grant the seccomp filter refuses socket() itself.
const TCP: &[&str] = &["EPERM"];
/// UDP out: the same.
const UDP: &[&str] = &["EPERM"];
/// An abstract unix socket of the host: socket(AF_UNIX) is refused (and Landlock's scoping
/// would refuse the connect).
const ABSTRACT: &[&str] = &["EPERM"];
/// Another process's System V shared memory: not visible from the plugin's IPC namespace.
const SYSV: &[&str] = &["ENOENT", "EINVAL", "EACCES", "EPERM"];
/// Running a program.
const EXEC: &[&str] = &["EACCES", "EPERM", "ENOENT", "ENOSYS", "EAGAIN", "SIGSYS"];

// ---- the scene of the attacks ----------------------------------------------------------

/// A System V shared memory segment of this process (mode 0600), removed on drop.
struct SysvSegment {
    key: i32,
    id: i32,
}

impl SysvSegment {
    fn new(content: &[u8]) -> SysvSegment {
        let key = 0x5e00_0000 | (std::process::id() as i32 & 0xffff);
        // SAFETY: shmget with integer arguments.
        let id = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o600) };
        assert!(id >= 0, "shmget: {}", std::io::Error::last_os_error());
        // SAFETY: attaching the segment just created; the kernel picks the address.
        let at = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        assert_ne!(
            at as isize,
            -1,
            "shmat: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: the segment is 4096 bytes long and `content` is shorter; detached after.
        unsafe {
            std::ptr::copy_nonoverlapping(content.as_ptr(), at as *mut u8, content.len());
            libc::shmdt(at);
        }
        SysvSegment { key, id }
    }
}

impl Drop for SysvSegment {
    fn drop(&mut self) {
        // SAFETY: removes the segment this test created.
        unsafe { libc::shmctl(self.id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

/// A directory with what an attacker would go after, and the attack plugin installed.
struct Scene {
    _tmp: Option<tempfile::TempDir>,
    root: PathBuf,
    /// A user's home: holds `secret`.
    home: PathBuf,
    /// `home/secret.txt`, mode 0600.
    secret: PathBuf,
    /// The attack plugin's `$PLUGIN_DIR`: its library and its `plugin.toml`.
    plugin_dir: PathBuf,
    /// The attack plugin's manifest (requests nothing).
    manifest: Manifest,
    /// The base of `$DATA_DIR` (`HostBuilder::data_dir`).
    data: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let tmp = tempfile::Builder::new()
            .prefix("sandbox-test-")
            .tempdir()
            .unwrap();
        let mut scene = Scene::at(tmp.path());
        scene._tmp = Some(tmp);
        scene
    }

    /// A scene in `root` (which the caller removes).
    fn at(root: &Path) -> Scene {
        let home = root.join("home");
        std::fs::create_dir_all(&home).unwrap();
        let secret = home.join("secret.txt");
        std::fs::write(&secret, "top secret: the launch codes\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let plugin_dir = root.join("plugin");
        let manifest = install_attack(&plugin_dir);
        Scene {
            _tmp: None,
            root: root.to_path_buf(),
            home,
            secret,
            plugin_dir,
            manifest,
            data: root.join("data"),
        }
    }

    /// The attack plugin's manifest, requesting `permissions`.
    fn manifest(&self, permissions: Permissions) -> Manifest {
        let mut m = self.manifest.clone();
        m.permissions = permissions;
        m
    }

    /// A host builder for this scene, with the default policy (deny all).
    fn builder(&self) -> HostBuilder {
        Host::builder()
            .search_path(artifacts())
            .worker_shim(worker_shim())
            .data_dir(&self.data)
    }
}

/// Names in a directory.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn set_secret_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var(SECRET_VAR, SECRET_VALUE));
}

/// A process of ours that no plugin may kill (killed and reaped on drop).
struct Victim(Child);

impl Victim {
    fn spawn() -> Victim {
        Victim(Command::new("sleep").arg("120").spawn().unwrap())
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn alive(&mut self) -> bool {
        self.0.try_wait().unwrap().is_none()
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes a file on drop (one an attack may have created outside the scene).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// SIGKILLs, on drop, processes left behind under these names (so a failing test does not
/// leave its orphans running).
struct KillByName(Vec<String>);

impl Drop for KillByName {
    fn drop(&mut self) {
        for name in &self.0 {
            for pid in processes_named(name) {
                // SAFETY: kill takes no pointers; the pid was just read from /proc and
                // carries our test's unique tag.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// A short tag unique to this run, for process names (comm is at most 15 bytes).
fn unique_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:08x}", std::process::id().rotate_left(12) ^ nanos)
}

// ---- attacks and verdicts --------------------------------------------------------------

/// One attack (bounded: 40 s): the plugin's raw output, or the call's error.
fn attack(plugin: &Plugin, method: &str, arg: impl AsRef<OsStr>) -> Result<String, String> {
    let arg = arg.as_ref().to_str().expect("a UTF-8 argument").to_string();
    let call = plugin.call_raw(method, arg.into_bytes());
    match run_with_limit(Duration::from_secs(40), call) {
        Ok(out) => Ok(String::from_utf8_lossy(&out).into_owned()),
        Err(e) => Err(format!("the call failed: {e}")),
    }
}

/// The reason in `denied: REASON (...)`.
fn reason(out: &str) -> Option<&str> {
    out.strip_prefix("denied: ")?.split_whitespace().next()
}

/// Runs attacks with one plugin and collects their outcomes, so that one failure report
/// lists every attack and its output.
struct Verdicts<'a> {
    plugin: &'a Plugin,
    lines: Vec<String>,
    failed: usize,
}

impl<'a> Verdicts<'a> {
    fn new(plugin: &'a Plugin) -> Self {
        Verdicts {
            plugin,
            lines: Vec::new(),
            failed: 0,
        }
    }

    /// The attack must fail with one of `reasons` (errno names, or words such as `not`).
    fn denied(&mut self, method: &str, arg: impl AsRef<OsStr>, reasons: &[&str]) {
        let arg = arg.as_ref().to_string_lossy().into_owned();
        let out = attack(self.plugin, method, &arg);
        let pass = matches!(&out, Ok(o) if reason(o).is_some_and(|r| reasons.contains(&r)));
        let want = format!("denied: {}", reasons.join("|"));
        self.record(pass, method, &arg, &want, out);
    }

    /// The attack must work (it was granted).
    fn allowed(&mut self, method: &str, arg: impl AsRef<OsStr>) {
        let arg = arg.as_ref().to_string_lossy().into_owned();
        let out = attack(self.plugin, method, &arg);
        let pass = matches!(&out, Ok(o) if o.starts_with("ok:"));
        self.record(pass, method, &arg, "ok", out);
    }

    /// An attack that fails the test without being tried.
    fn fail(&mut self, method: &str, why: &str) {
        self.record(false, method, "", "not tried", Err(why.to_string()));
    }

    fn record(
        &mut self,
        pass: bool,
        method: &str,
        arg: &str,
        want: &str,
        out: Result<String, String>,
    ) {
        if !pass {
            self.failed += 1;
        }
        let got = out.unwrap_or_else(|e| e);
        let verdict = if pass { "pass" } else { "FAIL" };
        self.lines.push(format!(
            "  {verdict} {method}({arg}): want {want}; got {got}"
        ));
    }

    fn assert_all_passed(&self) {
        let report = self.lines.join("\n");
        println!("{report}");
        assert!(
            self.failed == 0,
            "{} of {} attacks did not end as expected:\n{report}",
            self.failed,
            self.lines.len()
        );
    }
}

// ---- a) everything denied by default ---------------------------------------------------

#[test]
fn default_permissions_deny_every_attack() {
    set_secret_env();
    let scene = Scene::new();
    let manifest_before = std::fs::read(scene.plugin_dir.join("plugin.toml")).unwrap();
    let home_before = entries(&scene.home);
    let plugin_dir_before = entries(&scene.plugin_dir);
    let tmp_target = std::env::temp_dir().join(format!("attack-pwned-{}", unique_tag()));
    let _remove = RemoveOnDrop(tmp_target.clone());

    // Things to reach: a TCP listener that never accepts, a UDP socket that never reads
    // (both checked below for what arrived), an abstract unix socket, a process of ours.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let abstract_name = format!("plugin-test-abstract-{}", unique_tag());
    let unix =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(&abstract_name).unwrap()).unwrap();
    unix.set_nonblocking(true).unwrap();
    let mut victim = Victim::spawn();

    let host = scene.builder().build().unwrap();
    let (plugin, sibling) = run(async {
        let plugin = host.load_manifest(scene.manifest(Permissions::default()));
        let sibling = host.load_manifest(manifest("hello", Trust::Untrusted));
        (plugin.await.unwrap(), sibling.await.unwrap())
    });
    assert_eq!(plugin.grant().permissions, Permissions::default());
    let relay = plugin.worker_pid().expect("a worker");
    let sibling_relay = sibling.worker_pid().expect("a worker");
    let sibling_plugin = plugin_process(sibling_relay);
    let me = std::process::id();
    let tcp_addr = tcp.local_addr().unwrap().to_string();
    let udp_addr = udp.local_addr().unwrap().to_string();
    let data_file = scene.data.join("attack").join("pwned");

    let mut v = Verdicts::new(&plugin);
    // Files.
    v.denied("read_file", &scene.secret, FS);
    v.denied("list_dir", &scene.home, FS);
    v.denied("create_file", scene.home.join("pwned"), FS);
    v.denied("create_file", scene.plugin_dir.join("pwned"), FS);
    v.denied("create_file", &tmp_target, FS);
    v.denied("create_file", &data_file, FS);
    v.denied("write_file", scene.plugin_dir.join("plugin.toml"), FS);
    // Network.
    v.denied("tcp_connect", &tcp_addr, TCP);
    v.denied("udp_send", &udp_addr, UDP);
    v.denied("dns_query", &udp_addr, UDP);
    v.denied("connect_abstract", &abstract_name, ABSTRACT);
    // System V shared memory of another process of the user, holding a secret.
    let shm = SysvSegment::new(b"sysv secret");
    v.denied("shm_read", shm.key.to_string(), SYSV);
    // Other processes: the host (kill(pid, 0) checks the same permission as SIGKILL
    // without killing the test if it were allowed), a process of ours, the sibling.
    v.denied("signal_pid", me.to_string(), KILL);
    v.denied("kill_pid", victim.pid().to_string(), KILL);
    v.denied("kill_pid", sibling_relay.to_string(), KILL);
    v.denied("kill_pid", sibling_plugin.to_string(), KILL);
    // Without a sandbox the plugin's parent would be the host: do not SIGKILL the test.
    if parent_of(plugin_process(relay)) == Some(me) {
        v.fail(
            "kill_parent",
            "the plugin's parent is the host itself; not killing it",
        );
    } else {
        v.denied("kill_parent", "", &["EPERM", "ESRCH", "survived"]);
    }
    v.denied("read_proc", format!("{me}/environ"), PROC);
    v.denied("read_proc", format!("{me}/cmdline"), PROC);
    v.denied("read_proc", format!("{me}/mem"), PROC);
    v.denied("read_proc", format!("{sibling_plugin}/mem"), PROC);
    v.denied("read_proc", format!("{sibling_plugin}/environ"), PROC);
    v.denied("vm_read", me.to_string(), TRACE);
    v.denied("vm_read", sibling_plugin.to_string(), TRACE);
    v.denied("ptrace_attach", me.to_string(), TRACE);
    v.denied("ptrace_attach", sibling_plugin.to_string(), TRACE);
    v.denied("ptrace_attach", sibling_relay.to_string(), TRACE);
    v.denied("pidfd_getfd", format!("{me} 0"), TRACE);
    v.denied("pidfd_getfd", format!("{sibling_plugin} 3"), TRACE);
    // Programs, namespaces, the environment.
    v.denied("exec_sh", "", EXEC);
    v.denied("unshare_user", "", &["EPERM", "ENOSYS", "EACCES", "SIGSYS"]);
    v.denied("getenv", SECRET_VAR, &["not"]);
    // (spawn_orphan is allowed by the default process budget: its containment is
    // an_orphan_dies_with_its_worker_and_with_the_host.)
    // A fork bomb stops at the task budget (the kernel does not count root's tasks, so
    // this is checked in the run as nobody).
    if !is_root() {
        v.denied("fork_many", "500", &["EAGAIN"]);
    }
    v.assert_all_passed();

    // Nothing it holds is a file, and it holds little.
    let fds = attack(&plugin, "open_fds", "").unwrap();
    let listed: Vec<&str> = fds.trim_start_matches("ok:").split_whitespace().collect();
    assert!(fds.starts_with("ok:") && !fds.contains(":reg"), "{fds}");
    assert!(
        listed.len() <= 5,
        "more than 5 fds open in the plugin: {fds}"
    );
    // Standard input (/dev/null), output and error (pipes), the connection (3) and, with the
    // shared-memory transport, its region (4: a sealed memfd, no file).
    assert!(
        listed
            .iter()
            .all(|e| !e.ends_with(":memfd") || *e == "4:memfd"),
        "{fds}"
    );

    // The plugin, its worker and the sibling are unharmed.
    assert_eq!(attack(&plugin, "ping", "").unwrap(), "pong");
    assert_eq!(plugin.worker_pid(), Some(relay), "the worker was replaced");
    let status = plugin.status();
    assert_eq!((status.crashes, status.restarts), (0, 0), "{status:?}");
    assert!(!status.sandbox.is_empty(), "no sandbox layers: {status:?}");
    println!("sandbox layers: {:?}", status.sandbox);
    let name = json!({"name": "still here"});
    let greeting: serde_json::Value = run(sibling.call("greet", &name)).unwrap();
    assert!(greeting.to_string().contains("still here"), "{greeting}");
    assert_eq!(sibling.worker_pid(), Some(sibling_relay));
    assert_eq!(sibling.status().crashes, 0);
    drop((plugin, sibling));

    assert!(
        victim.alive(),
        "a plugin killed a process of the host's user"
    );
    assert!(
        matches!(tcp.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a TCP connection reached the host's listener"
    );
    let mut buf = [0u8; 512];
    assert!(
        matches!(udp.recv_from(&mut buf), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a datagram reached the host's UDP socket"
    );
    assert!(
        matches!(unix.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "a connection reached the host's abstract unix socket"
    );
    assert_eq!(
        std::fs::read(scene.plugin_dir.join("plugin.toml")).unwrap(),
        manifest_before,
        "the plugin rewrote its manifest"
    );
    assert_eq!(entries(&scene.home), home_before, "a file appeared in home");
    assert_eq!(entries(&scene.plugin_dir), plugin_dir_before);
    assert!(
        !tmp_target.exists(),
        "the plugin created {}",
        tmp_target.display()
    );
}

// ---- b) grants -------------------------------------------------------------------------

#[test]
fn grants_allow_exactly_what_was_granted() {
    let scene = Scene::new();
    let granted = scene.root.join("granted");
    std::fs::create_dir_all(&granted).unwrap();
    std::fs::write(granted.join("readme.txt"), "granted content").unwrap();
    let granted_str = granted.to_str().unwrap().to_string();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp_addr = tcp.local_addr().unwrap().to_string();
    let udp_addr = udp.local_addr().unwrap().to_string();
    let mut victim = Victim::spawn();
    let me = std::process::id();

    // Reading one directory and the network, requested and granted.
    let read_and_network = Permissions {
        read: vec![granted_str.clone()],
        network: true,
        ..Permissions::default()
    };
    let policy_grant = read_and_network.clone();
    let host = scene
        .builder()
        .permissions(move |_| Grant {
            permissions: policy_grant.clone(),
            ..Grant::deny_all()
        })
        .build()
        .unwrap();
    let plugin = run(host.load_manifest(scene.manifest(read_and_network.clone()))).unwrap();
    assert_eq!(plugin.grant().permissions, read_and_network);
    let mut v = Verdicts::new(&plugin);
    v.allowed("read_file", granted.join("readme.txt"));
    v.allowed("list_dir", &granted);
    v.denied("read_file", &scene.secret, FS);
    v.denied("create_file", granted.join("new"), FS);
    v.denied("write_file", granted.join("readme.txt"), FS);
    v.allowed("tcp_connect", &tcp_addr);
    v.allowed("udp_send", &udp_addr);
    v.denied("kill_pid", victim.pid().to_string(), KILL);
    v.denied("ptrace_attach", me.to_string(), TRACE);
    v.denied("read_proc", format!("{me}/mem"), PROC);
    v.denied("exec_sh", "", EXEC);
    v.assert_all_passed();
    assert!(
        wait_until(Duration::from_secs(2), || tcp.accept().is_ok()),
        "the granted TCP connection did not arrive"
    );
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = udp.recv_from(&mut buf).expect("the granted datagram");
    assert_eq!(&buf[..n], b"attack");
    assert!(victim.alive());
    drop((plugin, host));

    // Writing its data directory and a private temporary one: granted as requested. The
    // plugin finds them in its environment.
    let host = scene.builder().grant_requested().build().unwrap();
    let write_data = Permissions {
        write: vec!["$DATA_DIR".into(), "$TMP".into()],
        ..Permissions::default()
    };
    let plugin = run(host.load_manifest(scene.manifest(write_data))).unwrap();
    let data_dir = scene.data.join("attack");
    let made = data_dir.join("made-by-plugin");
    let told = attack(&plugin, "getenv", "PLUGIN_DATA_DIR").unwrap();
    assert_eq!(told, format!("ok: {}", data_dir.display()));
    let tmp = attack(&plugin, "getenv", "TMPDIR").unwrap();
    let tmp = tmp.strip_prefix("ok: ").expect("TMPDIR is set").to_string();
    assert_eq!(
        attack(&plugin, "getenv", "PLUGIN_TMP_DIR").unwrap(),
        format!("ok: {tmp}")
    );
    let mut v = Verdicts::new(&plugin);
    v.allowed("create_file", &made);
    v.allowed("create_file", format!("{tmp}/scratch"));
    v.denied("create_file", scene.home.join("pwned"), FS);
    v.denied("create_file", scene.plugin_dir.join("pwned"), FS);
    v.denied("write_file", scene.plugin_dir.join("plugin.toml"), FS);
    v.assert_all_passed();
    assert_eq!(std::fs::read_to_string(&made).unwrap(), "pwned");
    assert!(!scene.home.join("pwned").exists());
    assert!(Path::new(&tmp).join("scratch").exists());
    drop((plugin, host));
    assert!(
        !Path::new(&tmp).exists(),
        "the private temporary directory outlived the plugin"
    );

    // Requested network and reading, granted only reading: no network.
    let granted_read = granted_str.clone();
    let host = scene
        .builder()
        .permissions(move |_| Grant {
            permissions: Permissions {
                read: vec![granted_read.clone()],
                ..Permissions::default()
            },
            ..Grant::deny_all()
        })
        .build()
        .unwrap();
    let plugin = run(host.load_manifest(scene.manifest(read_and_network))).unwrap();
    assert!(!plugin.grant().permissions.network, "{:?}", plugin.grant());
    assert_eq!(plugin.grant().permissions.read, [granted_str]);
    let mut v = Verdicts::new(&plugin);
    v.allowed("read_file", granted.join("readme.txt"));
    v.denied("tcp_connect", &tcp_addr, TCP);
    v.denied("udp_send", &udp_addr, UDP);
    v.assert_all_passed();
    assert!(
        matches!(tcp.accept(), Err(e) if e.kind() == ErrorKind::WouldBlock),
        "an ungranted TCP connection arrived"
    );
}

// ---- c) the same, as an unprivileged user ----------------------------------------------

#[test]
fn the_same_attacks_fail_as_nobody() {
    as_nobody(
        "default_permissions_deny_every_attack",
        default_permissions_deny_every_attack,
    );
}

/// Whether this process runs as root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `body` as a user with no privileges: directly when not root; as root, runs the
/// test `test` of this binary again as uid/gid 65534 (`setpriv`), in a temporary directory
/// that user may write, and asserts that it passed.
fn as_nobody(test: &str, body: fn()) {
    if !is_root() {
        return body();
    }
    let exe = std::env::current_exe().unwrap();
    let needed = [
        (exe.clone(), true),
        (worker_shim(), true),
        (common::attack_library(), false),
        (
            artifacts().join(Manifest::library_file_name("hello")),
            false,
        ),
        (common::repo().join("plugins/hello/plugin.toml"), false),
    ];
    let problems: Vec<String> = needed
        .iter()
        .filter_map(|(path, exec)| others_cannot_use(path, *exec))
        .collect();
    // Where the build is out of other users' reach, run from a copy they can read.
    let mut staged = None;
    let exe = if problems.is_empty() {
        exe
    } else {
        println!("staging a copy for nobody: {}", problems.join("; "));
        let (dir, staged_exe) = common::stage_for_other_users();
        staged = Some(dir);
        staged_exe
    };
    let tmp = tempfile::Builder::new()
        .prefix("sandbox-nobody-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let (status, output) = output_with_limit(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&exe)
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env("TMPDIR", tmp.path())
            .env("HOME", tmp.path())
            .env(AS_NOBODY_VAR, "1")
            .envs(staged.as_ref().map(|d| (common::STAGED_ENV, d.path()))),
        Duration::from_secs(120),
    );
    println!("--- {test} as nobody ---\n{output}\n--- end ---");
    let status = status.unwrap_or_else(|| panic!("{test} as nobody took over 120 s:\n{output}"));
    assert!(
        status.success() && output.contains("1 passed"),
        "{test} as nobody: {status}\n{output}"
    );
}

/// Why other users cannot read (and, with `exec`, run) `path`, if they cannot.
fn others_cannot_use(path: &Path, exec: bool) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("{}: {e}", path.display())),
    };
    let mode = meta.permissions().mode();
    let want = if exec { 0o005 } else { 0o004 };
    if mode & want != want {
        return Some(format!("{}: mode {:o}", path.display(), mode & 0o7777));
    }
    for dir in path.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir) {
            if m.permissions().mode() & 0o001 == 0 {
                return Some(format!(
                    "{}: directory mode {:o}",
                    dir.display(),
                    m.permissions().mode() & 0o7777
                ));
            }
        }
    }
    None
}

// ---- d) orphans ------------------------------------------------------------------------

#[test]
fn an_orphan_dies_with_its_worker_and_with_the_host() {
    // With the worker: the plugin double-forks a process into a new session, which the
    // shutdown of the plugin must still take down.
    let scene = Scene::new();
    let tag = unique_tag();
    let name = format!("orph-{tag}");
    let _cleanup = KillByName(vec![name.clone()]);
    let host = scene.builder().build().unwrap();
    let plugin = run(host.load_manifest(scene.manifest(Permissions::default()))).unwrap();
    let relay = plugin.worker_pid().unwrap();
    let out = attack(&plugin, "spawn_orphan", &tag).unwrap();
    assert!(out.starts_with("ok:"), "{out}");
    let exists = || !processes_named(&name).is_empty();
    assert!(
        wait_until(Duration::from_secs(5), exists),
        "no process named {name}"
    );
    let orphan = processes_named(&name)[0];
    assert!(
        descendants(relay).contains(&orphan),
        "the orphan {orphan} escaped the worker's tree (parent {:?} {:?})",
        parent_of(orphan),
        parent_of(orphan).and_then(comm_of)
    );
    run(plugin.shutdown());
    drop(plugin);
    assert!(
        wait_until(Duration::from_secs(5), || processes_named(&name).is_empty()),
        "{name} outlived its plugin's shutdown"
    );

    // With the host: a host process loads the plugin, which leaves an orphan; the host is
    // SIGKILLed; the orphan must die too.
    let tag = unique_tag();
    let name = format!("orph-{tag}");
    let _cleanup2 = KillByName(vec![name.clone()]);
    let dir = tempfile::Builder::new()
        .prefix("sandbox-orphan-host-")
        .tempdir()
        .unwrap();
    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "orphan_host_role",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_VAR, "orphan_host")
            .env(ROLE_TAG_VAR, &tag)
            .env(ROLE_DIR_VAR, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel();
    for pipe in [
        Box::new(child.0.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.0.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        // Detached: the pipes close when the host process and its workers are gone.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let mut output = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !output.iter().any(|l: &String| l.contains(READY)) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => output.push(line),
            Err(_) => panic!("the host process never got ready:\n{}", output.join("\n")),
        }
    }
    assert!(
        wait_until(Duration::from_secs(5), || !processes_named(&name)
            .is_empty()),
        "no process named {name}:\n{}",
        output.join("\n")
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let gone = wait_until(Duration::from_secs(5), || processes_named(&name).is_empty());
    let left: Vec<_> = processes_named(&name)
        .into_iter()
        .map(|p| (p, parent_of(p), parent_of(p).and_then(comm_of)))
        .collect();
    assert!(gone, "{name} outlived its SIGKILLed host: {left:?}");
}

/// Not a test on its own: the host process that `an_orphan_dies_with_its_worker_and_with_the_host`
/// runs (this binary again, with `PLUGIN_HOST_TEST_ROLE=orphan_host`) and kills. Does
/// nothing otherwise.
#[test]
fn orphan_host_role() {
    if std::env::var(ROLE_VAR).as_deref() != Ok("orphan_host") {
        return;
    }
    let tag = std::env::var(ROLE_TAG_VAR).unwrap();
    let scene = Scene::at(Path::new(&std::env::var(ROLE_DIR_VAR).unwrap()));
    let host = scene.builder().build().unwrap();
    let plugin = run(host.load_manifest(scene.manifest(Permissions::default()))).unwrap();
    let out = attack(&plugin, "spawn_orphan", &tag).unwrap();
    assert!(out.starts_with("ok:"), "{out}");
    println!("{READY}");
    std::thread::sleep(Duration::from_secs(60));
    panic!("the test should have killed this host process by now");
}

/// Kills and reaps a child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---- e) from outside -------------------------------------------------------------------

#[test]
fn an_outside_process_cannot_reach_a_worker() {
    as_nobody(
        "an_outside_process_cannot_reach_a_worker",
        an_outside_process_cannot_reach_a_worker_body,
    );
}

/// Another process of the same user (this test process: parenthood does not matter to
/// the checks made here) tries to reach into a worker: steal its fds, read its memory or
/// environment, list its fds, connect to a socket of the host.
fn an_outside_process_cannot_reach_a_worker_body() {
    let scene = Scene::new();
    let host = scene.builder().build().unwrap();
    run(async {
        let hello = host
            .load_manifest(manifest("hello", Trust::Untrusted))
            .await
            .unwrap();
        let relay = hello.worker_pid().unwrap();
        let plugin = plugin_process(relay);
        let mut targets = vec![("relay", relay), ("plugin process", plugin)];
        if let Some(init) = parent_of(plugin).filter(|&p| p != relay) {
            targets.push(("plugin-init", init));
        }
        let mut problems = Vec::new();
        for (what, pid) in targets {
            println!("probing {what} {pid} ({:?})", comm_of(pid));
            probe(what, pid, &mut problems);
        }
        // A control: the same probes get into an ordinary process of this user, so their
        // failing against the worker means something.
        let mut control = Victim::spawn();
        let mut found = Vec::new();
        probe("control", control.pid(), &mut found);
        assert!(control.alive());
        assert!(
            found.iter().any(|p| p.contains("stole")) && found.len() > 10,
            "the probes did not get into an ordinary process: {found:#?}"
        );
        let sockets = std::fs::read_to_string("/proc/net/unix").unwrap();
        for line in sockets.lines().filter(|l| l.contains("plugin-host")) {
            problems.push(format!("a unix socket others can connect to: {line}"));
        }
        let greeting: serde_json::Value = hello.call("greet", &json!({"name": "x"})).await.unwrap();
        assert!(greeting.to_string().contains('x'));
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    });
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn describe(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// Tries every way in to process `pid`; pushes what worked (or failed for the wrong
/// reason) onto `problems`.
fn probe(what: &str, pid: u32, problems: &mut Vec<String>) {
    let refused = |e: &std::io::Error| matches!(e.raw_os_error(), Some(libc::EACCES | libc::EPERM));

    // Steal its fds.
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd >= 0 {
        for fd in 0..8 {
            // SAFETY: pidfd_getfd takes two fds and flags, no pointers; pidfd is ours.
            let stolen = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0) };
            if stolen >= 0 {
                problems.push(format!("{what} {pid}: pidfd_getfd stole its fd {fd}"));
                // SAFETY: `stolen` is a new fd of ours, closed once.
                unsafe { libc::close(stolen as i32) };
            } else {
                let e = errno();
                if e != libc::EPERM {
                    problems.push(format!(
                        "{what} {pid}: pidfd_getfd of fd {fd}: want EPERM, got {}",
                        describe(e)
                    ));
                }
            }
        }
        // SAFETY: `pidfd` is our fd, closed once.
        unsafe { libc::close(pidfd as i32) };
    } else {
        let e = errno();
        println!("{what} {pid}: pidfd_open failed: {}", describe(e));
    }

    // Look at its fds, memory and environment through /proc.
    let proc = PathBuf::from(format!("/proc/{pid}"));
    match std::fs::read_dir(proc.join("fd")) {
        Err(e) if refused(&e) => {}
        other => problems.push(format!(
            "{what} {pid}: listing /proc/{pid}/fd: want EACCES or EPERM, got {:?}",
            other.map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
        )),
    }
    for fd in 0..3 {
        match std::fs::read_link(proc.join("fd").join(fd.to_string())) {
            Err(e) if refused(&e) => {}
            other => problems.push(format!(
                "{what} {pid}: readlink /proc/{pid}/fd/{fd}: want EACCES or EPERM, got {other:?}"
            )),
        }
    }
    for file in ["mem", "environ"] {
        match std::fs::File::open(proc.join(file)) {
            Err(e) if refused(&e) => {}
            other => problems.push(format!(
                "{what} {pid}: open /proc/{pid}/{file}: want EACCES or EPERM, got {other:?}"
            )),
        }
    }

    // Read its memory directly.
    let mut buf = [0u8; 8];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: 0x40_0000 as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which lives across the call; the remote address is
    // only read in the other process, by the kernel, if it allows it at all.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    let e = errno();
    if n >= 0 || e != libc::EPERM {
        problems.push(format!(
            "{what} {pid}: process_vm_readv: want EPERM, got {}",
            if n >= 0 {
                format!("{n} bytes")
            } else {
                describe(e)
            }
        ));
    }
}
