//! The `plugin-host` command line, end to end: output, and exit codes that differ by kind.
#![cfg(target_os = "linux")]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{artifacts, repo};

/// Runs `plugin-host ARGS` from the repository root with a deadline.
fn cli(args: &[&str]) -> Output {
    let exe = artifacts().join("plugin-host");
    let mut child = Command::new(exe)
        .args(args)
        .current_dir(repo())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("plugin-host {args:?} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn assert_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

#[test]
fn call_prints_json_output() {
    let o = cli(&[
        "call",
        "plugins/hello/plugin.toml",
        "greet",
        "--json",
        r#"{"name":"CLI"}"#,
    ]);
    assert_code(&o, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, serde_json::json!({"message": "Hello, CLI!"}));
}

#[test]
fn a_crash_prints_the_report_and_exits_6() {
    let o = cli(&["call", "plugins/faulty/plugin.toml", "segfault"]);
    assert_code(&o, 6);
    assert!(stderr(&o).contains("SIGSEGV"), "{}", stderr(&o));
    let o = cli(&[
        "call",
        "plugins/faulty/plugin.toml",
        "exit",
        "--json",
        r#"{"code": 9}"#,
    ]);
    assert_code(&o, 6);
    assert!(stderr(&o).contains("exited with code 9"), "{}", stderr(&o));
}

#[test]
fn failures_have_distinct_exit_codes() {
    // 2: usage (bad JSON).
    assert_code(
        &cli(&[
            "call",
            "plugins/hello/plugin.toml",
            "greet",
            "--json",
            "{bad",
        ]),
        2,
    );
    // 3: invalid or missing manifest.
    let o = cli(&["inspect", "no/such/plugin.toml"]);
    assert_code(&o, 3);
    assert!(stderr(&o).contains("no/such/plugin.toml"));
    // 4: the plugin does not load.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("plugin.toml");
    std::fs::write(
        &manifest,
        "name = \"x\"\nversion = \"1.0.0\"\nlibrary = \"nothing_here\"\napi = \"^1\"\n",
    )
    .unwrap();
    let o = cli(&["inspect", manifest.to_str().unwrap()]);
    assert_code(&o, 4);
    assert!(stderr(&o).contains("libnothing_here.so"), "{}", stderr(&o));
    // 5: the call fails (unknown method, plugin error).
    let o = cli(&["call", "plugins/hello/plugin.toml", "nope"]);
    assert_code(&o, 5);
    assert!(stderr(&o).contains("greet, echo"), "{}", stderr(&o));
    assert_code(&cli(&["call", "plugins/faulty/plugin.toml", "fail"]), 5);
    // 7: timeout.
    let o = cli(&[
        "call",
        "plugins/faulty/plugin.toml",
        "sleep",
        "--json",
        r#"{"ms": 5000}"#,
        "--timeout",
        "100ms",
    ]);
    assert_code(&o, 7);
}

#[test]
fn inspect_and_list_describe_plugins() {
    let o = cli(&["inspect", "plugins/thumbnail/plugin.toml"]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("methods:  resize, thumbnail, grayscale, info"),
        "{}",
        stdout(&o)
    );
    let o = cli(&["list", "plugins"]);
    assert_code(&o, 0);
    for name in ["hello", "thumbnail", "faulty", "c-echo"] {
        assert!(stdout(&o).contains(name), "{}", stdout(&o));
    }
}

#[test]
fn check_reports_each_manifest_and_fails_on_problems() {
    let dir = tempfile::tempdir().unwrap();
    let lib = artifacts().join("libhello.so");
    let good = dir.path().join("good");
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(
        good.join("plugin.toml"),
        format!(
            "name = \"hello\"\nversion = \"0.1.0\"\nlibrary = \"{}\"\napi = \"^1\"\n",
            lib.display()
        ),
    )
    .unwrap();
    std::fs::write(
        bad.join("plugin.toml"),
        "name = \"bad\"\nversion = \"one\"\n",
    )
    .unwrap();
    let o = cli(&["check", dir.path().to_str().unwrap()]);
    assert_code(&o, 8);
    let out = stdout(&o);
    assert!(
        out.contains("ok") && out.contains("loads, 2 methods"),
        "{out}"
    );
    assert!(out.contains("FAILED") && out.contains("version"), "{out}");
    std::fs::remove_dir_all(&bad).unwrap();
    assert_code(&cli(&["check", dir.path().to_str().unwrap()]), 0);
}

#[test]
fn help_is_available_for_every_command() {
    for cmd in [
        "list", "inspect", "call", "check", "demo", "bench", "doctor",
    ] {
        let o = cli(&[cmd, "--help"]);
        assert_code(&o, 0);
        assert!(stdout(&o).contains("Usage"), "{cmd}: {}", stdout(&o));
    }
    let help = stdout(&cli(&["--help"]));
    assert!(help.contains("Exit codes"), "{help}");
    assert!(
        help.contains("--grant") && help.contains("10 `doctor`"),
        "{help}"
    );
}

#[test]
fn doctor_lists_the_sandbox_layers() {
    let o = cli(&["doctor"]);
    let code = o.status.code();
    assert!(
        code == Some(0) || code == Some(10),
        "doctor exited {code:?}\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    for word in [
        "kernel:",
        "landlock",
        "seccomp",
        "no_new_privs",
        "pid namespace",
    ] {
        assert!(out.contains(word), "missing {word:?} in\n{out}");
    }
    // Exit 10 exactly when a layer is missing.
    assert_eq!(code == Some(10), out.contains("MISSING"), "{out}");

    let o = cli(&["doctor", "--json"]);
    assert_eq!(o.status.code(), code, "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let enforced: Vec<&str> = v["layers"]["enforced"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    let missing: Vec<&str> = v["layers"]["missing"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["layer"].as_str())
        .collect();
    for layer in ["landlock filesystem", "seccomp"] {
        assert!(
            enforced.contains(&layer) || missing.contains(&layer),
            "{layer} not listed: {v}"
        );
    }
    assert_eq!(
        v["default_policy_enforceable"].as_bool(),
        Some(code == Some(0)),
        "{v}"
    );
}

/// A manifest for libhello that asks for trust, a weaker sandbox and permissions.
fn greedy_manifest(dir: &std::path::Path) -> std::path::PathBuf {
    let manifest = dir.join("plugin.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"greedy\"\nversion = \"0.1.0\"\nlibrary = \"{}\"\napi = \"^1\"\n\
             trust = \"trusted\"\nsandbox = \"best-effort\"\n\n[permissions]\n\
             read = [\"/usr\"]\nnetwork = true\n",
            artifacts().join("libhello.so").display()
        ),
    )
    .unwrap();
    manifest
}

#[test]
fn inspect_shows_requested_and_granted_and_the_layers_in_force() {
    let enforceable = cli(&["doctor"]).status.code() == Some(0);
    let dir = tempfile::tempdir().unwrap();
    let manifest = greedy_manifest(dir.path());
    let manifest = manifest.to_str().unwrap();

    // Deny-all (the default): the request is shown, none of it is granted.
    let o = cli(&["inspect", manifest]);
    if !enforceable {
        // The required sandbox cannot be put in force here: the load fails and says where
        // to look.
        assert_code(&o, 4);
        assert!(stderr(&o).contains("plugin-host doctor"), "{}", stderr(&o));
        return;
    }
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains(
            "requested: trust trusted, sandbox best-effort, permissions: read /usr; network"
        ),
        "{out}"
    );
    assert!(
        out.contains("granted:   trust untrusted, sandbox required, permissions: none"),
        "{out}"
    );
    assert!(out.contains("policy:    deny-all"), "{out}");
    let layers = out
        .lines()
        .find_map(|l| l.strip_prefix("sandbox:   "))
        .unwrap_or_else(|| panic!("no sandbox line in\n{out}"));
    for layer in ["landlock filesystem", "seccomp", "user namespace"] {
        assert!(layers.contains(layer), "{layer} not in force: {out}");
    }
    assert!(out.contains("missing:   "), "{out}");

    // --grant: everything requested, trust included, so it runs in-process.
    let o = cli(&["--grant", "inspect", manifest]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains(
            "granted:   trust trusted, sandbox best-effort, permissions: read /usr; network"
        ),
        "{out}"
    );
    assert!(out.contains("in-process (trusted)"), "{out}");

    // The example plugins request nothing: the same sandbox either way.
    let o = cli(&["inspect", "plugins/hello/plugin.toml"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("requested: trust untrusted, sandbox required, permissions: none"),
        "{out}"
    );
    assert!(out.contains("seccomp"), "{out}");
}

#[test]
fn the_demo_crashes_a_plugin_and_recovers() {
    let o = cli(&["demo"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(out.contains("killed by SIGSEGV"), "{out}");
    assert!(out.contains("restarted in a fresh worker"), "{out}");
    assert!(out.contains("timed out after 500ms"), "{out}");
    assert!(
        out.contains("killed by the host: call `infinite_loop` was still running"),
        "{out}"
    );
    assert!(out.contains("[event] quarantined"), "{out}");
    assert!(
        out.contains("after Plugin::enable: faulty.echo -> \"back\""),
        "{out}"
    );
    assert!(out.contains("never stopped"), "{out}");
}

#[test]
fn the_bench_command_runs_and_prints_ratios() {
    let o = cli(&["bench", "--quick"]);
    assert_code(&o, 0);
    let out = stdout(&o);
    for line in [
        "isolated call 16 B",
        "isolated call 1 MiB",
        "64 in flight",
        "cold start",
        "in-process call",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
    assert!(out.matches("ratio").count() >= 5, "{out}");
}

/// Children of `parent` (Linux /proc).
fn children_of(parent: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.split_whitespace().nth(1) == Some(&parent.to_string()))
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn workers_die_when_the_host_process_is_killed() {
    let mut host = Command::new(artifacts().join("plugin-host"))
        .args([
            "call",
            "plugins/faulty/plugin.toml",
            "sleep",
            "--json",
            r#"{"ms": 20000}"#,
        ])
        .current_dir(repo())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut worker = None;
    common::wait_until(Duration::from_secs(10), || {
        worker = children_of(host.id()).first().copied();
        worker.is_some()
    });
    let worker = worker.expect("the host started a worker");
    // Freeze the worker so it cannot notice the closed socket itself, then SIGKILL the
    // host, which gives it no chance to clean up. What ends the worker is the kernel: the
    // parent-death signal, and (for a stopped process) the SIGHUP sent to a process group
    // orphaned by its parent's death.
    assert!(Command::new("kill")
        .args(["-STOP", &worker.to_string()])
        .status()
        .unwrap()
        .success());
    let _ = host.kill();
    let _ = host.wait();
    let gone = common::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{worker}/stat"))
            .map(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(true)
    });
    if !gone {
        let _ = Command::new("kill")
            .args(["-9", &worker.to_string()])
            .status();
    }
    assert!(gone, "worker {worker} outlived its host");
}

/// A manifest named `plugin.toml` in `dir` (created), with `body` after the required fields.
fn write_manifest(
    dir: &std::path::Path,
    name: &str,
    library: &str,
    body: &str,
) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let manifest = dir.join("plugin.toml");
    std::fs::write(
        &manifest,
        format!(
            "name = \"{name}\"\nversion = \"0.1.0\"\nlibrary = \"{library}\"\napi = \"^1\"\n{body}"
        ),
    )
    .unwrap();
    manifest
}

/// The path of an example plugin's library among the test artifacts.
fn lib(name: &str) -> String {
    artifacts()
        .join(format!("lib{name}.so"))
        .display()
        .to_string()
}

#[test]
fn config_type_errors_name_the_field_and_the_expected_type() {
    let dir = tempfile::tempdir().unwrap();
    for trust in ["untrusted", "trusted"] {
        let manifest = write_manifest(
            &dir.path().join(trust),
            "faulty",
            &lib("faulty"),
            &format!("trust = \"{trust}\"\n\n[config]\ncreate_sleep_ms = \"big\"\n"),
        );
        let o = cli(&["--grant", "inspect", manifest.to_str().unwrap()]);
        assert_code(&o, 4);
        assert!(
            stderr(&o).contains(
                "plugin `faulty`: create failed: config field `create_sleep_ms`: expected u64, \
                 found string \"big\""
            ),
            "{trust}: {}",
            stderr(&o)
        );
    }
    let manifest = write_manifest(
        &dir.path().join("hello"),
        "hello",
        &lib("hello"),
        "[config]\ngreeting = 5\n",
    );
    let o = cli(&["inspect", manifest.to_str().unwrap()]);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains(
            "create failed: config field `greeting`: expected a string, found integer `5`"
        ),
        "{}",
        stderr(&o)
    );
}
