//! Shared helpers: where the built artifacts are, manifests for the example plugins, and a
//! runner that fails a test instead of letting it hang.
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plugin_host::{Host, Manifest, Trust};

/// Set by tests that re-run themselves as another user from a staged copy of the
/// artifacts (see `stage_for_other_users`): the directory holding `artifacts/`, `repo/` and
/// the attack library.
pub const STAGED_ENV: &str = "PLUGIN_HOST_TEST_STAGED";

fn staged() -> Option<PathBuf> {
    std::env::var_os(STAGED_ENV).map(PathBuf::from)
}

/// Directory with the example plugins and binaries built by `tests/build.rs`.
pub fn artifacts() -> PathBuf {
    match staged() {
        Some(dir) => dir.join("artifacts"),
        None => PathBuf::from(env!("PLUGIN_HOST_E2E_DIR")),
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    match staged() {
        Some(dir) => dir.join("repo"),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf(),
    }
}

/// Copies what a test re-run as another user needs (the test binary, the worker-shim,
/// the hello and attack plugins) into a fresh directory everyone may read, for when the
/// build lies somewhere other users cannot enter (a clone in a 0700 temp dir). Returns
/// the directory (set it as [`STAGED_ENV`]) and the staged test binary.
#[cfg(unix)]
pub fn stage_for_other_users() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("plugin-test-staged-")
        .tempdir()
        .unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("staging {}: {e}", from.display()));
    };
    let exe = std::env::current_exe().unwrap();
    let staged_exe = dir.path().join("test-binary");
    copy(&exe, &staged_exe);
    copy(
        &worker_shim(),
        &dir.path()
            .join("artifacts")
            .join(worker_shim().file_name().unwrap()),
    );
    let hello = Manifest::library_file_name("hello");
    copy(
        &artifacts().join(&hello),
        &dir.path().join("artifacts").join(&hello),
    );
    copy(
        &repo().join("plugins/hello/plugin.toml"),
        &dir.path().join("repo/plugins/hello/plugin.toml"),
    );
    copy(
        &attack_library(),
        &dir.path().join(Manifest::library_file_name("attack")),
    );
    // Everyone may enter and read (the files keep their modes: executables stay 0755).
    for entry in [
        dir.path().to_path_buf(),
        dir.path().join("artifacts"),
        dir.path().join("repo"),
        dir.path().join("repo/plugins"),
        dir.path().join("repo/plugins/hello"),
    ] {
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (dir, staged_exe)
}

/// A host that finds the example plugins and the worker-shim, and grants each plugin
/// what its manifest requests (trust included: tests pick the backend through
/// [`manifest`]'s trust override).
pub fn host() -> Host {
    builder().build().unwrap()
}

/// [`host`]'s builder, for a test that adds host functions or a transport.
pub fn builder() -> plugin_host::HostBuilder {
    builder_with_shim(&worker_shim())
}

/// [`builder`] with `shim` as the worker-shim.
pub fn builder_with_shim(shim: &Path) -> plugin_host::HostBuilder {
    Host::builder()
        .search_path(artifacts())
        .worker_shim(shim)
        .permissions(grant_requested)
}

/// What the tests' hosts grant: what each manifest requests, except that where there is
/// no sandbox (every platform but Linux) the sandbox is off, since the example manifests
/// require one.
pub fn grant_requested(request: &plugin_host::PermissionRequest) -> plugin_host::Grant {
    let grant = plugin_host::Grant::requested(request);
    match cfg!(target_os = "linux") {
        true => grant,
        false => plugin_host::Grant {
            sandbox: plugin_host::SandboxMode::Off,
            ..grant
        },
    }
}

/// The manifest of an example plugin, with the trust level overridden.
pub fn manifest(name: &str, trust: Trust) -> Manifest {
    let mut m = Manifest::from_file(repo().join("plugins").join(name).join("plugin.toml")).unwrap();
    m.trust = trust;
    m
}

/// The `hello` plugin's `greet` input.
#[derive(serde::Serialize)]
pub struct Greet<'a> {
    /// Who to greet.
    pub name: &'a str,
}

/// The `hello` plugin's `greet` output.
#[derive(serde::Deserialize, Debug, PartialEq)]
pub struct Greeting {
    /// The greeting.
    pub message: String,
}

/// Where `tests/build.rs` put the example plugins built as WebAssembly modules.
pub fn wasm_dir() -> PathBuf {
    PathBuf::from(env!("PLUGIN_HOST_WASM_DIR"))
}

/// The manifest of an example plugin as a WebAssembly plugin (`runtime = "wasm"`), its
/// module `NAME.wasm` taken from [`wasm_dir`]. Fails with how to build it when missing.
pub fn wasm_manifest(name: &str) -> Manifest {
    let mut m = Manifest::from_file(repo().join("plugins").join(name).join("plugin.toml")).unwrap();
    let module = wasm_dir().join(format!("{name}.wasm"));
    assert!(
        module.is_file(),
        "{} is missing: tests/build.rs builds it (it needs `rustup target add wasm32-unknown-unknown`)",
        module.display()
    );
    m.runtime = plugin_host::Runtime::Wasm;
    m.library = module.display().to_string();
    m
}

/// Where a plugin runs: the three backends behind one API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// In the host process, as a native library (trusted).
    InProcess,
    /// In a sandboxed worker process (untrusted).
    Isolated,
    /// In the host process, as a WebAssembly module.
    Wasm,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 3] = [Backend::InProcess, Backend::Isolated, Backend::Wasm];

    /// The example plugin `name`'s manifest for this backend.
    pub fn manifest(self, name: &str) -> Manifest {
        match self {
            Backend::InProcess => manifest(name, Trust::Trusted),
            Backend::Isolated => manifest(name, Trust::Untrusted),
            Backend::Wasm => wasm_manifest(name),
        }
    }
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
    builder_with_shim(shim).build().unwrap()
}

/// Whether process `pid` still exists (running or zombie).
#[cfg(target_os = "linux")]
pub fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` still runs (Windows: its exit code is still `STILL_ACTIVE`).
#[cfg(windows)]
pub fn process_exists(pid: u32) -> bool {
    use windows_sys::Win32::Foundation::{CloseHandle, STILL_ACTIVE};
    use windows_sys::Win32::System::Threading::{
        GetExitCodeProcess, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };
    // SAFETY: plain calls with a pid and an out pointer; the handle is closed below.
    unsafe {
        let handle = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        if handle.is_null() {
            return false;
        }
        let mut code = 0u32;
        let ok = GetExitCodeProcess(handle, &mut code);
        CloseHandle(handle);
        ok != 0 && code == STILL_ACTIVE as u32
    }
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

/// Running child processes of this process (Windows: a process snapshot; an exited
/// process is not in it).
#[cfg(windows)]
pub fn children() -> Vec<(u32, String)> {
    children_of(std::process::id())
}

/// Running child processes of `parent` (Windows), with their executable names.
#[cfg(windows)]
pub fn children_of(parent: u32) -> Vec<(u32, String)> {
    use windows_sys::Win32::Foundation::{CloseHandle, INVALID_HANDLE_VALUE};
    use windows_sys::Win32::System::Diagnostics::ToolHelp::{
        CreateToolhelp32Snapshot, Process32FirstW, Process32NextW, PROCESSENTRY32W,
        TH32CS_SNAPPROCESS,
    };
    let mut found = Vec::new();
    // SAFETY: a snapshot handle, walked with a correctly sized entry, then closed.
    unsafe {
        let snapshot = CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0);
        if snapshot == INVALID_HANDLE_VALUE {
            return found;
        }
        let mut entry: PROCESSENTRY32W = std::mem::zeroed();
        entry.dwSize = std::mem::size_of::<PROCESSENTRY32W>() as u32;
        let mut more = Process32FirstW(snapshot, &mut entry) != 0;
        while more {
            if entry.th32ParentProcessID == parent {
                let name = String::from_utf16_lossy(&entry.szExeFile);
                found.push((entry.th32ProcessID, name.trim_end_matches('\0').to_string()));
            }
            more = Process32NextW(snapshot, &mut entry) != 0;
        }
        CloseHandle(snapshot);
    }
    found
}

/// Open handles of this process (Windows): the counterpart of open descriptors.
#[cfg(windows)]
pub fn open_fds() -> usize {
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, GetProcessHandleCount};
    let mut count = 0u32;
    // SAFETY: the pseudo-handle of this process and a valid out pointer.
    unsafe { GetProcessHandleCount(GetCurrentProcess(), &mut count) };
    count as usize
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

/// The attack plugin (`plugins/attack/attack.c`) compiled by `tests/build.rs`.
#[cfg(unix)]
pub fn attack_library() -> PathBuf {
    match staged() {
        Some(dir) => dir.join(Manifest::library_file_name("attack")),
        None => PathBuf::from(env!("ATTACK_LIBRARY")),
    }
}

/// Installs the attack plugin in `dir` (a copy of its library and a `plugin.toml` that
/// requests nothing) and returns its manifest, whose `path` is `dir/plugin.toml`: the
/// plugin's `$PLUGIN_DIR` is `dir`.
#[cfg(unix)]
pub fn install_attack(dir: &Path) -> Manifest {
    let text = "# the sandbox tests' attack plugin\n\
                name = \"attack\"\nversion = \"1.0.0\"\nlibrary = \"attack\"\napi = \"^1\"\n";
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(
        attack_library(),
        dir.join(Manifest::library_file_name("attack")),
    )
    .unwrap();
    std::fs::write(dir.join("plugin.toml"), text).unwrap();
    let mut m = Manifest::parse(text, "attack.plugin.toml").unwrap();
    m.path = Some(dir.join("plugin.toml"));
    m
}

/// The parent of process `pid` (Linux).
#[cfg(target_os = "linux")]
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the parenthesised command: state, ppid, ...
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The command name (`/proc/PID/comm`) of process `pid` (Linux).
#[cfg(target_os = "linux")]
pub fn comm_of(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Every process, as (pid, parent pid) (Linux).
#[cfg(target_os = "linux")]
pub fn all_processes() -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some(ppid) = parent_of(pid) {
            found.push((pid, ppid));
        }
    }
    found
}

/// The descendants of process `pid` (children, grandchildren, ...), nearest first (Linux).
#[cfg(target_os = "linux")]
pub fn descendants(pid: u32) -> Vec<u32> {
    let all = all_processes();
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, ppid) in &all {
            if ppid == parent && child != parent && !found.contains(&child) {
                found.push(child);
                frontier.insert(0, child);
            }
        }
    }
    found
}

/// Processes whose command name (`comm`) is `name`, in any state (Linux).
#[cfg(target_os = "linux")]
pub fn processes_named(name: &str) -> Vec<u32> {
    all_processes()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|&pid| comm_of(pid).as_deref() == Some(name))
        .collect()
}

/// The process an untrusted plugin's code runs in, given the worker pid the host reports
/// (the relay): the relay's descendant whose parent is the sandbox's init process
/// (`plugin-init`), else its deepest descendant, else (no sandbox: the relay has no
/// children) the relay itself. Waits up to 5 s for the chain to appear.
#[cfg(target_os = "linux")]
pub fn plugin_process(relay: u32) -> u32 {
    let start = std::time::Instant::now();
    let mut found = None;
    wait_until(Duration::from_secs(5), || {
        let all = descendants(relay);
        found = all
            .iter()
            .copied()
            .find(|&p| {
                comm_of(p).as_deref() != Some("plugin-init")
                    && parent_of(p).and_then(comm_of).as_deref() == Some("plugin-init")
            })
            .or_else(|| all.last().copied().filter(|_| all.len() >= 2));
        if all.is_empty() && start.elapsed() > Duration::from_millis(500) {
            found = Some(relay);
        }
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no plugin process under relay {relay}: descendants {:?}",
            descendants(relay)
                .into_iter()
                .map(|p| (p, comm_of(p)))
                .collect::<Vec<_>>()
        )
    })
}

// Shared with the desktop app's test (not every test binary here uses it).
#[allow(unused_imports)]
pub use plugin_host_tests::output_with_limit;

/// A field of `/proc/self/status` in bytes (`VmRSS`, `VmHWM`, ...) (Linux).
#[cfg(target_os = "linux")]
pub fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets this process's peak resident set (`VmHWM`) to its current size and returns that
/// size in bytes (Linux; writes "5" to `/proc/self/clear_refs`).
#[cfg(target_os = "linux")]
pub fn reset_peak_memory() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM");
    proc_status_bytes("VmRSS")
}

/// This process's peak resident set since the last [`reset_peak_memory`], in bytes (Linux).
#[cfg(target_os = "linux")]
pub fn peak_memory() -> u64 {
    proc_status_bytes("VmHWM")
}

/// This process's log output, captured by one global `tracing` subscriber. Each write is
/// one formatted event; only those containing `only` (if given) are kept, so a test that
/// measures memory does not keep every line.
#[derive(Clone)]
pub struct Logs {
    kept: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    only: Option<&'static str>,
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let wanted = match self.only {
            Some(needle) => text.contains(needle),
            None => true,
        };
        if wanted {
            self.kept.lock().unwrap().push(text.into_owned());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// The events kept so far, one string each.
    pub fn lines(&self) -> Vec<String> {
        self.kept.lock().unwrap().clone()
    }

    /// Everything kept so far.
    pub fn text(&self) -> String {
        self.lines().concat()
    }
}

/// Installs the subscriber on first use (a process can have only one; the first call's
/// `level` and `only` hold for the whole test binary) and returns the capture.
pub fn capture_logs(level: tracing::Level, only: Option<&'static str>) -> Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs {
            kept: Default::default(),
            only,
        };
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        logs
    })
    .clone()
}

/// How a fault ends a worker on this platform, as `ExitInfo::signal_name` (Unix) or
/// `ExitInfo::exception_name` (Windows) names it.
pub fn fault_name(exit: &plugin_host::ExitInfo) -> Option<&str> {
    exit.signal_name().or(exit.exception_name())
}

/// A null-pointer write: SIGSEGV, or an access violation.
#[cfg(unix)]
pub const SEGFAULT: &str = "SIGSEGV";
/// A null-pointer write: SIGSEGV, or an access violation.
#[cfg(windows)]
pub const SEGFAULT: &str = "STATUS_ACCESS_VIOLATION";
/// `std::process::abort`: SIGABRT, or a fast fail.
#[cfg(unix)]
pub const ABORT: &str = "SIGABRT";
/// `std::process::abort`: SIGABRT, or a fast fail.
#[cfg(windows)]
pub const ABORT: &str = "STATUS_STACK_BUFFER_OVERRUN";
/// Unbounded recursion: Rust's guard-page handler turns it into an abort (without it,
/// SIGSEGV); on Windows a stack overflow status.
#[cfg(unix)]
pub const STACK_OVERFLOW: &[&str] = &["SIGABRT", "SIGSEGV"];
/// Unbounded recursion: Rust's guard-page handler turns it into an abort (without it,
/// SIGSEGV); on Windows a stack overflow status.
#[cfg(windows)]
pub const STACK_OVERFLOW: &[&str] = &["STATUS_STACK_OVERFLOW"];
