//! The worker ships with the app: an application outside this repository, written the way
//! its README shows, loads the untrusted `hello` plugin with no `worker-shim` anywhere,
//! because `plugin_host::worker::run_if_worker()` makes it its own worker.
//!
//! The test writes a scratch crate into a temporary directory (its own `[workspace]`,
//! `plugin-host` as a path dependency, the workspace's `Cargo.lock` so the versions are
//! the ones already fetched and `--offline` works), whose `main` is the README's app
//! example verbatim, plus two variants of it: without the `run_if_worker()` line, and with
//! a thread started before it. It builds them with `cargo build --offline` into
//! `target/scratch-app` (incremental across runs), copies the binaries into a directory of
//! their own (nothing beside them, nothing one level up) and runs them, each within a time
//! limit, from the repository's root with `PLUGIN_LIBS` naming the directory
//! `tests/build.rs` built `libhello.so` into.
#![cfg(unix)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{artifacts, repo, worker_shim};
use plugin_host::WORKER_SHIM_ENV;

/// The line under test, as the README's example has it.
const RUN_IF_WORKER: &str = "plugin_host::worker::run_if_worker();";
/// A cold build takes under a minute on two busy cores; an incremental one a few seconds.
const BUILD_LIMIT: Duration = Duration::from_secs(600);
/// Each run of an app: one plugin loaded, two calls.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// What a process did: its exit status and its output.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `command` with its output in files, for at most `limit`; on timeout kills its
/// process group (it gets one of its own) and fails the test. The child is always reaped.
fn run_bounded(mut command: Command, limit: Duration, what: &str) -> Ran {
    use std::os::unix::process::CommandExt;
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            // SAFETY: kill takes integers only. The group is the child's own
            // (process_group(0)), and the child is not reaped yet, so its id is still ours.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "{what} did not finish within {limit:?}; its stderr:\n{}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ran {
        status,
        stdout: std::fs::read_to_string(&stdout).unwrap(),
        stderr: std::fs::read_to_string(&stderr).unwrap(),
    }
}

/// The README's example for app developers: the first Rust block after its heading.
fn readme_app() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = &readme[readme
        .find("## For app developers")
        .expect("README.md has a section for app developers")..];
    let start = section.find("```rust\n").expect("with a Rust example") + "```rust\n".len();
    let end = start + section[start..].find("```").unwrap();
    let code = section[start..end].to_string();
    assert_eq!(
        code.lines()
            .filter(|l| l.trim_start().starts_with(RUN_IF_WORKER))
            .count(),
        1,
        "the README's app example calls {RUN_IF_WORKER} once, first in main:\n{code}"
    );
    code
}

/// The README's app with the line calling `run_if_worker()` replaced by `with`.
fn variant(app: &str, with: &str) -> String {
    app.lines()
        .map(|l| match l.trim_start().starts_with(RUN_IF_WORKER) {
            true => with,
            false => l,
        })
        .fold(String::new(), |text, line| text + line + "\n")
}

/// Where the built apps are copied, and where they are built.
fn scratch_dir() -> PathBuf {
    repo().join("target").join("scratch-app")
}

/// Builds the scratch apps once per test process and returns the directory holding
/// `app`, `app-no-worker` and `app-thread-first`, and nothing else.
fn apps() -> &'static Path {
    static APPS: OnceLock<PathBuf> = OnceLock::new();
    APPS.get_or_init(build_apps)
}

fn build_apps() -> PathBuf {
    let app = readme_app();
    let source = tempfile::Builder::new()
        .prefix("plugin-host-scratch-app-")
        .tempdir()
        .unwrap();
    let src = source.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.rs"), &app).unwrap();
    std::fs::write(src.join("app-no-worker.rs"), variant(&app, "")).unwrap();
    std::fs::write(
        src.join("app-thread-first.rs"),
        variant(
            &app,
            &format!("    let _early = std::thread::spawn(std::thread::park); {RUN_IF_WORKER}"),
        ),
    )
    .unwrap();
    let host = repo().join("host");
    let host = host.to_str().expect("the repository's path is UTF-8");
    assert!(!host.contains('\''), "a path TOML can quote: {host}");
    std::fs::write(
        source.path().join("Cargo.toml"),
        format!(
            r#"[package]
name = "scratch-app"
version = "0.1.0"
edition = "2021"
publish = false

[[bin]]
name = "app"
path = "src/app.rs"

[[bin]]
name = "app-no-worker"
path = "src/app-no-worker.rs"

[[bin]]
name = "app-thread-first"
path = "src/app-thread-first.rs"

[dependencies]
plugin-host = {{ path = '{host}' }}
smol = "2"
serde = {{ version = "1", features = ["derive"] }}

# Not a member of any workspace around it.
[workspace]
"#
        ),
    )
    .unwrap();
    // The workspace's versions, already fetched: the build needs no network.
    std::fs::copy(repo().join("Cargo.lock"), source.path().join("Cargo.lock")).unwrap();

    let target = scratch_dir();
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo
        .current_dir(source.path())
        .args(["build", "--offline", "--bins", "--target-dir"])
        .arg(&target);
    // What cargo set for this test (its package, its binaries) is not the scratch app's,
    // and the app's binaries must land in <target>/debug; the user's own configuration
    // (registries, source replacement, offline, flags) applies as to any build.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
            .iter()
            .any(|prefix| key.starts_with(prefix))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "CARGO_TARGET_DIR",
                "CARGO_BUILD_TARGET",
                "CARGO_BUILD_TARGET_DIR",
            ]
            .contains(&key)
        {
            cargo.env_remove(key);
        }
    }
    let started = Instant::now();
    let built = run_bounded(cargo, BUILD_LIMIT, "cargo build of the scratch app");
    assert!(
        built.status.success(),
        "building the scratch app (offline, with the workspace's Cargo.lock) failed: {built}"
    );
    eprintln!("scratch app built in {:.1?}", started.elapsed());

    // Installed: only the apps, in a directory of their own.
    let installed = target.join("installed");
    let _ = std::fs::remove_dir_all(&installed);
    std::fs::create_dir_all(&installed).unwrap();
    for bin in ["app", "app-no-worker", "app-thread-first"] {
        let name = format!("{bin}{}", std::env::consts::EXE_SUFFIX);
        std::fs::copy(target.join("debug").join(&name), installed.join(&name)).unwrap();
    }
    installed
}

fn shim_name() -> String {
    format!("worker-shim{}", std::env::consts::EXE_SUFFIX)
}

/// Runs an installed app from the repository's root (the README's manifest path is
/// relative), with `PLUGIN_LIBS` naming the test build's libraries and
/// `PLUGIN_HOST_WORKER_SHIM` set to `shim`, or unset.
fn run_app(app: &Path, shim: Option<&Path>) -> Ran {
    let mut command = Command::new(app);
    command
        .current_dir(repo())
        .env("PLUGIN_LIBS", artifacts())
        .env_remove(WORKER_SHIM_ENV)
        .env_remove("RUST_LOG");
    if let Some(shim) = shim {
        command.env(WORKER_SHIM_ENV, shim);
    }
    run_bounded(command, RUN_LIMIT, &app.display().to_string())
}

/// Checks the app greeted twice through the plugin and returns the sandbox layers its
/// printed status lists.
fn greeted(ran: &Ran) -> Vec<String> {
    assert!(ran.status.success(), "the app failed: {ran}");
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(
        lines.get(..2),
        Some(&["Hello, world!", "Hello, again!"][..]),
        "{ran}"
    );
    let status = lines.get(2).copied().unwrap_or_default();
    assert!(
        status.starts_with("Status { state: Ready"),
        "the third line is the plugin's status: {ran}"
    );
    let layers = status
        .split_once("sandbox: [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map(|(list, _)| list)
        .unwrap_or_else(|| panic!("no sandbox layers in the status: {ran}"));
    layers
        .split(", ")
        .filter(|l| !l.is_empty())
        .map(|l| l.trim_matches('"').to_string())
        .collect()
}

/// The layers a sandboxed worker must have in force on Linux (`required` mode).
fn assert_sandboxed(layers: &[String], who: &str) {
    #[cfg(target_os = "linux")]
    for layer in [
        "landlock filesystem",
        "seccomp",
        "pid namespace",
        "no_new_privs",
    ] {
        assert!(
            layers.iter().any(|l| l == layer),
            "{who}: layer `{layer}` is not in force: {layers:?}"
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (layers, who);
}

#[test]
fn the_app_is_its_own_worker_with_no_worker_shim_anywhere() {
    let dir = apps();
    let app = dir.join("app");
    for nowhere in [
        dir.join(shim_name()),
        dir.parent().unwrap().join(shim_name()),
    ] {
        assert!(!nowhere.exists(), "{} must not exist", nowhere.display());
    }
    let layers = greeted(&run_app(&app, None));
    assert_sandboxed(&layers, "the app as its own worker");
}

#[test]
fn the_dedicated_worker_shim_runs_the_same_sandbox() {
    let dir = apps();
    let own = greeted(&run_app(&dir.join("app"), None));

    // PLUGIN_HOST_WORKER_SHIM comes before the app itself, whether or not it opted in.
    for app in ["app", "app-no-worker"] {
        let layers = greeted(&run_app(&dir.join(app), Some(&worker_shim())));
        assert_eq!(layers, own, "{app} with {WORKER_SHIM_ENV}");
    }

    // A worker-shim installed beside an app that does not call run_if_worker.
    let beside = scratch_dir().join("installed-with-shim");
    let _ = std::fs::remove_dir_all(&beside);
    std::fs::create_dir_all(&beside).unwrap();
    std::fs::copy(dir.join("app-no-worker"), beside.join("app-no-worker")).unwrap();
    std::fs::copy(worker_shim(), beside.join(shim_name())).unwrap();
    let layers = greeted(&run_app(&beside.join("app-no-worker"), None));
    assert_eq!(layers, own, "app-no-worker with a worker-shim beside it");
    assert_sandboxed(&own, "the app as its own worker");
}

#[test]
fn without_run_if_worker_or_a_shim_the_error_names_the_three_ways() {
    let dir = apps();
    let app = dir.join("app-no-worker");
    let ran = run_app(&app, None);
    assert!(!ran.status.success(), "the load should fail: {ran}");
    assert!(!ran.stdout.contains("Hello"), "{ran}");
    let app_itself = format!("{} itself", app.display());
    let beside = dir.join(shim_name()).display().to_string();
    let one_up = dir
        .parent()
        .unwrap()
        .join(shim_name())
        .display()
        .to_string();
    for needle in [
        "WorkerSpawn",
        "no worker executable found",
        // The paths tried.
        &beside,
        &one_up,
        &app_itself,
        // (a) the app as its own worker
        "call plugin_host::worker::run_if_worker() first in main",
        // (b) the dedicated worker-shim
        "cargo install --locked --path",
        "--bin worker-shim",
        WORKER_SHIM_ENV,
        // (c) the builder
        "HostBuilder::worker_shim(path)",
    ] {
        assert!(ran.stderr.contains(needle), "`{needle}` missing: {ran}");
    }
}

#[test]
fn a_worker_started_after_other_threads_refuses_and_says_why() {
    let ran = run_app(&apps().join("app-thread-first"), None);
    assert!(!ran.status.success(), "the load should fail: {ran}");
    for needle in [
        "WorkerExited",
        "Code(72)",
        "single-threaded",
        "call run_if_worker() first in main",
    ] {
        assert!(ran.stderr.contains(needle), "`{needle}` missing: {ran}");
    }
}
