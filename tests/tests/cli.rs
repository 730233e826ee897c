//! The `plugin-host` command line, end to end: output, and exit codes that differ by kind.
#![cfg(target_os = "linux")]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{artifacts, repo, wasm_dir};

/// Runs `plugin-host ARGS` from the repository root with a deadline, stdin empty.
fn cli(args: &[&str]) -> Output {
    run(plugin_host(args), None)
}

/// `plugin-host ARGS` from the repository root, RUST_LOG unset.
fn plugin_host(args: &[&str]) -> Command {
    let mut command = Command::new(artifacts().join("plugin-host"));
    command
        .args(args)
        .current_dir(repo())
        .env_remove("RUST_LOG");
    command
}

/// Runs `command` with a deadline, writing `stdin` to it (None: stdin is /dev/null) and
/// collecting its output as it comes.
fn run(mut command: Command, stdin: Option<Vec<u8>>) -> Output {
    use std::io::{Read, Write};
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let writer = child.stdin.take().map(|mut pipe| {
        let bytes = stdin.unwrap_or_default();
        // The command may fail before it reads: a broken pipe is its answer, not ours.
        std::thread::spawn(move || drop(pipe.write_all(&bytes)))
    });
    // Read in threads, so a full pipe never stalls the command; the results come back on
    // channels, so a process that inherited a pipe and outlives the command cannot make
    // the test wait past its deadline.
    let reader = |mut pipe: Box<dyn Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            let _ = tx.send(bytes);
        });
        rx
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish in time");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(writer);
    let collect = |rx: std::sync::mpsc::Receiver<Vec<u8>>| {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        rx.recv_timeout(left.max(Duration::from_secs(5)))
            .unwrap_or_else(|_| panic!("{command:?}: its output did not end in time"))
    };
    Output {
        status,
        stdout: collect(out),
        stderr: collect(err),
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
    let help = stdout(&cli(&["call", "--help"]));
    for flag in [
        "--raw",
        "--input <FILE>",
        "--output <FILE>",
        "--json <JSON>",
        "add_raw",
    ] {
        assert!(help.contains(flag), "{flag}: {help}");
    }
    let help = stdout(&cli(&["check", "--help"]));
    assert!(help.contains("in a worker process"), "{help}");
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
    // The plugin fetches the image through the app's host function, and an unknown id
    // fails with the app's own error.
    assert!(
        out.contains("[app] image.get(1) for thumbnail.thumbnail_by_id -> 640x480"),
        "{out}"
    );
    assert!(
        out.contains("thumbnail.thumbnail_by_id {id: 1} -> 128x96"),
        "{out}"
    );
    assert!(
        out.contains("thumbnail_by_id` failed: the app has no image with id 42"),
        "{out}"
    );
    assert!(
        out.contains("items 0, 1, 2, 3, 4 as they came, then the method's output: 5"),
        "{out}"
    );
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

    // The same plugin in the three backends (faulty.wasm is found beside the executable's
    // target directory: tests/build.rs builds it there).
    let row = |backend: &str, fault: &str| table_row(&out, backend, fault);
    let (got, next) = row("in-process", "panic");
    assert!(got.starts_with("Panicked \"boom\""), "{out}");
    assert!(
        next.contains("echo \"ok\"") && next.contains("same instance"),
        "{out}"
    );
    let (got, next) = row("isolated", "panic");
    assert!(got.starts_with("Panicked \"boom\""), "{out}");
    assert!(
        next.contains("echo \"ok\"") && next.contains("same worker"),
        "{out}"
    );
    let (got, next) = row("wasm", "panic");
    assert_eq!(got, "Crashed: trap (unreachable), panic \"boom\"", "{out}");
    assert!(
        next.contains("echo \"ok\"") && next.contains("instance replaced"),
        "{out}"
    );
    for fault in ["segfault", "abort", "stack_overflow"] {
        let (got, next) = row("in-process", fault);
        assert!(
            got.starts_with("not run: a crash in-process takes the host down"),
            "{out}"
        );
        assert_eq!(next, "-", "{out}");
        let (got, next) = row("isolated", fault);
        assert!(got.starts_with("Crashed: killed by SIG"), "{out}");
        assert!(
            next.contains("echo \"ok\"") && next.contains("worker restarted"),
            "{out}"
        );
    }
    assert_eq!(
        row("isolated", "segfault").0,
        "Crashed: killed by SIGSEGV",
        "{out}"
    );
    assert_eq!(
        row("isolated", "abort").0,
        "Crashed: killed by SIGABRT",
        "{out}"
    );
    // In wasm a null write is no fault; abort and unbounded recursion trap.
    let (got, next) = row("wasm", "segfault");
    assert_eq!(got, "Ok(null): no fault", "{out}");
    assert!(next.contains("same instance"), "{out}");
    assert_eq!(
        row("wasm", "abort").0,
        "Crashed: trap (unreachable)",
        "{out}"
    );
    let (got, next) = row("wasm", "stack_overflow");
    assert!(
        got == "Crashed: trap (stack overflow)"
            || got == "Crashed: trap (out of bounds memory access)",
        "{out}"
    );
    assert!(next.contains("instance replaced"), "{out}");
    assert!(!out.contains("faulty.wasm not found"), "{out}");
}

/// The side-by-side table's row for `backend` and `fault` in the demo's output: (what the
/// caller got, next call).
#[track_caller]
fn table_row(out: &str, backend: &str, fault: &str) -> (String, String) {
    let row = out
        .lines()
        .map(|l| l.split(" | ").map(str::trim).collect::<Vec<_>>())
        .find(|cells| cells.len() == 4 && cells[0] == backend && cells[1] == fault)
        .unwrap_or_else(|| panic!("no row for {backend} {fault} in\n{out}"));
    (row[2].to_string(), row[3].to_string())
}

#[test]
fn the_demo_without_faulty_wasm_says_how_to_build_it_and_shows_the_other_backends() {
    // plugin-host alone in a directory: no wasm32-unknown-unknown beside it, and the test
    // artifacts it is pointed at hold native libraries only.
    let dir = tempfile::tempdir().unwrap();
    let alone = dir.path().join("bin");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(artifacts().join("plugin-host"), alone.join("plugin-host")).unwrap();
    assert!(!artifacts().join("faulty.wasm").exists());
    let mut command = Command::new(alone.join("plugin-host"));
    command
        .args(["-L", artifacts().to_str().unwrap(), "demo"])
        .current_dir(repo())
        .env_remove("RUST_LOG")
        .env_remove("PLUGIN_HOST_WORKER_SHIM");
    let o = run(command, None);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains("faulty.wasm not found")
            && out.contains(
                "rustup target add wasm32-unknown-unknown && cargo build --release --target \
                 wasm32-unknown-unknown -p faulty -p hello"
            ),
        "{out}"
    );
    assert!(
        table_row(&out, "in-process", "panic")
            .0
            .starts_with("Panicked"),
        "{out}"
    );
    assert!(
        table_row(&out, "isolated", "segfault")
            .1
            .contains("worker restarted"),
        "{out}"
    );
    assert!(!out.lines().any(|l| l.starts_with("wasm ")), "{out}");
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
        "host call from isolated plugin",
        "host call from in-process plugin",
        "stream of 16 B items, isolated",
        "wasm call 16 B",
        "wasm call 4 KiB",
        "wasm call 1 MiB",
        "wasm 16 B vs Extism",
        "cold start, wasm (load + first call)",
    ] {
        assert!(out.contains(line), "missing {line:?} in\n{out}");
    }
    assert!(out.matches("ratio").count() >= 8, "{out}");
    // The WebAssembly lines: a mean beside the median, ratios to the raw socket and the
    // isolated call, and their targets.
    let wasm_16 = out
        .lines()
        .find(|l| l.starts_with("wasm call 16 B "))
        .unwrap_or_else(|| panic!("{out}"));
    for word in [
        "median",
        "mean",
        "x raw socket",
        "x isolated [shm]",
        "target <= 1.5 us median: ",
    ] {
        assert!(wasm_16.contains(word), "{word:?} not in {wasm_16}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("wasm call 1 MiB") && l.contains("target <= 0.3 ms median: ")),
        "{out}"
    );
    assert!(!out.contains("hello.wasm not found"), "{out}");
}

/// Children of `parent` (Linux /proc).
fn children_of(parent: u32) -> Vec<u32> {
    common::all_processes()
        .into_iter()
        .filter(|&(_, ppid)| ppid == parent)
        .map(|(pid, _)| pid)
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
fn call_reads_input_from_a_file_or_stdin_and_writes_output_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(&input, r#"{"name": "file"}"#).unwrap();
    let greet = |name: &str| format!("{{\n  \"message\": \"Hello, {name}!\"\n}}\n");
    let hello = ["call", "plugins/hello/plugin.toml", "greet"];

    let o = cli(&[&hello[..], &["--input", input.to_str().unwrap()]].concat());
    assert_code(&o, 0);
    assert_eq!(stdout(&o), greet("file"));

    // No input argument and stdin is not a terminal: stdin is the input.
    let o = run(plugin_host(&hello), Some(br#"{"name": "pipe"}"#.to_vec()));
    assert_code(&o, 0);
    assert_eq!(stdout(&o), greet("pipe"));
    let o = run(
        plugin_host(&[&hello[..], &["--input", "-"]].concat()),
        Some(br#"{"name": "dash"}"#.to_vec()),
    );
    assert_code(&o, 0);
    assert_eq!(stdout(&o), greet("dash"));

    // --output: the JSON goes to the file, nothing to stdout.
    let output = dir.path().join("out.json");
    let o = cli(&[
        &hello[..],
        &[
            "--json",
            r#"{"name":"out"}"#,
            "--output",
            output.to_str().unwrap(),
        ],
    ]
    .concat());
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), greet("out"));

    // Empty stdin is no input (`null`): greet rejects it as input, exit 5.
    let o = run(plugin_host(&hello), Some(Vec::new()));
    assert_code(&o, 5);
    assert!(stderr(&o).contains("rejected its input"), "{}", stderr(&o));
}

#[test]
fn call_raw_passes_bytes_through_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    // Every byte value: not UTF-8, not MessagePack, NULs and newlines included.
    let bytes: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    std::fs::write(&input, &bytes).unwrap();
    let echo = ["call", "plugins/hello/plugin.toml", "echo", "--raw"];

    let o = cli(&[
        &echo[..],
        &[
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
    ]
    .concat());
    assert_code(&o, 0);
    assert!(o.stdout.is_empty(), "{}", stdout(&o));
    assert_eq!(std::fs::read(&output).unwrap(), bytes);

    // stdin to stdout, exactly (no newline added).
    let o = run(plugin_host(&echo), Some(bytes.clone()));
    assert_code(&o, 0);
    assert_eq!(o.stdout, bytes);

    // Nothing in, nothing out.
    let o = cli(&echo);
    assert_code(&o, 0);
    assert!(o.stdout.is_empty(), "{}", stdout(&o));

    // Without --raw the same bytes are not JSON: a usage error that points at --raw.
    let o = cli(&[
        "call",
        "plugins/hello/plugin.toml",
        "echo",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert_code(&o, 2);
    assert!(
        stderr(&o).contains(&format!(
            "input file `{}` is not valid JSON",
            input.display()
        )) && stderr(&o).contains("--raw"),
        "{}",
        stderr(&o)
    );

    // A typed method sent raw bytes that are not its MessagePack input: the call fails.
    let o = run(
        plugin_host(&["call", "plugins/hello/plugin.toml", "greet", "--raw"]),
        Some(b"not msgpack".to_vec()),
    );
    assert_code(&o, 5);
    assert!(stderr(&o).contains("rejected its input"), "{}", stderr(&o));
}

#[test]
fn call_io_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-input.json");
    let o = cli(&[
        "call",
        "plugins/hello/plugin.toml",
        "greet",
        "--input",
        missing.to_str().unwrap(),
    ]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains(&format!("cannot read input file `{}`", missing.display())),
        "{}",
        stderr(&o)
    );

    // The output cannot be written: the call ran, the error names the file.
    let output = dir.path().join("no-such-dir").join("out.json");
    let o = cli(&[
        "call",
        "plugins/hello/plugin.toml",
        "greet",
        "--json",
        r#"{"name":"x"}"#,
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_code(&o, 1);
    assert!(
        stderr(&o).contains(&format!("cannot write output file `{}`", output.display())),
        "{}",
        stderr(&o)
    );

    // A failed call writes no output file.
    let output = dir.path().join("out.json");
    let o = cli(&[
        "call",
        "plugins/hello/plugin.toml",
        "greet",
        "--json",
        r#"{"name":""}"#,
        "--output",
        output.to_str().unwrap(),
    ]);
    assert_code(&o, 5);
    assert!(!output.exists());

    // Bad or empty input files are usage errors naming the file.
    let bad = dir.path().join("bad.json");
    for (content, problem) in [("{bad", "is not valid JSON"), (" \n", "is empty")] {
        std::fs::write(&bad, content).unwrap();
        let o = cli(&[
            "call",
            "plugins/hello/plugin.toml",
            "greet",
            "--input",
            bad.to_str().unwrap(),
        ]);
        assert_code(&o, 2);
        assert!(
            stderr(&o).contains(&format!("input file `{}` {problem}", bad.display())),
            "{}",
            stderr(&o)
        );
    }

    // One input at a time.
    let o = cli(&[
        "call",
        "plugins/hello/plugin.toml",
        "greet",
        "--json",
        "null",
        "--input",
        bad.to_str().unwrap(),
    ]);
    assert_code(&o, 2);
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
}

#[test]
fn load_errors_give_command_line_hints_not_library_calls() {
    let library_words = ["HostBuilder", "cargo build -p plugin-host", "have the app"];
    let no_library_words = |o: &Output| {
        for word in library_words {
            assert!(!stderr(o).contains(word), "{word:?} in\n{}", stderr(o));
        }
    };

    // A library that is nowhere: -L.
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_manifest(&dir.path().join("x"), "x", "nothing_here", "");
    let o = cli(&["inspect", manifest.to_str().unwrap()]);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains("library `nothing_here` not found; looked in: ")
            && stderr(&o).contains("hint: if it is built elsewhere, pass its directory with -L DIR (--search-path DIR)"),
        "{}",
        stderr(&o)
    );
    no_library_words(&o);

    // A worker-shim that is not there: PLUGIN_HOST_WORKER_SHIM.
    let mut command = plugin_host(&["call", "plugins/hello/plugin.toml", "echo"]);
    command.env("PLUGIN_HOST_WORKER_SHIM", "/nonexistent/worker-shim");
    let o = run(command, None);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains(
            "cannot start the worker: PLUGIN_HOST_WORKER_SHIM=/nonexistent/worker-shim names no file"
        ),
        "{}",
        stderr(&o)
    );
    no_library_words(&o);

    // plugin-host without a worker-shim next to it (nor one directory up) is its own
    // worker; a PLUGIN_HOST_WORKER_SHIM naming no file is an error with a CLI hint.
    let alone = dir.path().join("bin");
    std::fs::create_dir_all(&alone).unwrap();
    std::fs::copy(artifacts().join("plugin-host"), alone.join("plugin-host")).unwrap();
    let lone = |shim: Option<&str>| {
        let mut command = Command::new(alone.join("plugin-host"));
        command
            .args([
                "-L",
                artifacts().to_str().unwrap(),
                "call",
                "plugins/hello/plugin.toml",
                "greet",
                "--json",
                r#"{"name": "lone"}"#,
            ])
            .current_dir(repo())
            .env_remove("RUST_LOG")
            .env_remove("PLUGIN_HOST_WORKER_SHIM");
        if let Some(shim) = shim {
            command.env("PLUGIN_HOST_WORKER_SHIM", shim);
        }
        run(command, None)
    };
    let o = lone(None);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("Hello, lone!"), "{}", stdout(&o));
    let o = lone(Some("/no/such/worker-shim"));
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains("PLUGIN_HOST_WORKER_SHIM=/no/such/worker-shim names no file"),
        "{}",
        stderr(&o)
    );
    no_library_words(&o);

    // A sandbox that cannot be set up (here: its data directory cannot be created).
    let manifest = write_manifest(
        &dir.path().join("data"),
        "data",
        &lib("hello"),
        "[permissions]\nwrite = [\"$DATA_DIR\"]\n",
    );
    let mut command = plugin_host(&["--grant", "inspect", manifest.to_str().unwrap()]);
    command.env("XDG_DATA_HOME", "/proc/no-such-dir");
    let o = run(command, None);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains("plugin `data`: cannot sandbox the worker: ")
            && stderr(&o).contains("hint: `plugin-host doctor`"),
        "{}",
        stderr(&o)
    );
    no_library_words(&o);
}

#[test]
fn check_loads_trusted_plugins_in_a_worker_and_survives_one_that_aborts() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(
        &dir.path().join("aborts"),
        "aborts",
        &lib("faulty"),
        "trust = \"trusted\"\n\n[config]\ncreate_abort = true\n",
    );
    write_manifest(
        &dir.path().join("fine"),
        "fine",
        &lib("hello"),
        "trust = \"trusted\"\n\n[config]\ngreeting = \"Hi\"\n",
    );
    let o = cli(&["--grant", "check", dir.path().to_str().unwrap()]);
    // 8, not a signal: the abort ended a worker, not check.
    assert_code(&o, 8);
    let out = stdout(&o);
    let line = |name: &str| {
        out.lines()
            .find(|l| l.contains(&format!("{name}/plugin.toml")))
            .unwrap_or_else(|| panic!("no line for {name} in\n{out}"))
            .to_string()
    };
    let aborts = line("aborts");
    assert!(
        aborts.starts_with("FAILED")
            && aborts.contains("the worker crashed while loading the plugin")
            && aborts.contains("SIGABRT"),
        "{out}"
    );
    let fine = line("fine");
    assert!(
        fine.starts_with("ok") && fine.contains("untrusted, worker process"),
        "{out}"
    );
    assert_eq!(
        out.matches("note: requests trust; checked in a worker process, not in-process")
            .count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("2 manifests, 1 with problems")
            && out.contains(
                "trusted plugins were checked in a worker process: check runs no plugin code in \
                 its own process (2 of these manifests request trust;"
            ),
        "{out}"
    );

    // The rest of --grant still applies: a sandbox the manifest relaxes stays relaxed.
    write_manifest(
        &dir.path().join("fine"),
        "fine",
        &lib("hello"),
        "trust = \"trusted\"\nsandbox = \"off\"\n",
    );
    std::fs::remove_dir_all(dir.path().join("aborts")).unwrap();
    let o = cli(&["--grant", "check", dir.path().to_str().unwrap()]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("(sandbox off)"), "{}", stdout(&o));
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

#[test]
fn a_missing_library_comes_with_the_command_that_builds_it() {
    // A copy of the repository's layout: plugins/c-echo and plugin-api/include.
    let root = tempfile::tempdir().unwrap();
    let c_echo = root.path().join("plugins").join("c-echo");
    std::fs::create_dir_all(&c_echo).unwrap();
    for file in ["plugin.toml", "echo.c", "build.sh"] {
        std::fs::copy(repo().join("plugins/c-echo").join(file), c_echo.join(file)).unwrap();
    }
    let include = root.path().join("plugin-api").join("include");
    std::fs::create_dir_all(&include).unwrap();
    std::fs::copy(
        repo().join("plugin-api/include/plugin_api.h"),
        include.join("plugin_api.h"),
    )
    .unwrap();
    let plugins = root.path().join("plugins");
    let build = format!("sh {}", c_echo.join("build.sh").display());

    let o = cli(&["check", plugins.to_str().unwrap()]);
    assert_code(&o, 8);
    assert!(
        stdout(&o).contains("library `c_echo` not found")
            && stdout(&o).contains(&format!("hint: build it: {build}\n")),
        "{}",
        stdout(&o)
    );
    let manifest = c_echo.join("plugin.toml");
    let o = cli(&["call", manifest.to_str().unwrap(), "echo", "--raw"]);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains(&format!("hint: build it: {build}\n")),
        "{}",
        stderr(&o)
    );

    // The command works, and then so does the plugin.
    let o = run(
        {
            let mut c = Command::new("sh");
            c.arg(c_echo.join("build.sh"));
            c
        },
        None,
    );
    assert_code(&o, 0);
    let o = cli(&["check", plugins.to_str().unwrap()]);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("loads, 5 methods"), "{}", stdout(&o));
    let o = run(
        plugin_host(&["call", manifest.to_str().unwrap(), "echo", "--raw"]),
        Some(b"\x00raw\xff".to_vec()),
    );
    assert_code(&o, 0);
    assert_eq!(o.stdout, b"\x00raw\xff");

    // Other kinds of plugin directories: a Cargo package, a lone C file.
    let cargo = plugins.join("rusty");
    let manifest = write_manifest(&cargo, "rusty", "rusty", "");
    std::fs::write(cargo.join("Cargo.toml"), "[package]\nname = \"rusty\"\n").unwrap();
    let o = cli(&["inspect", manifest.to_str().unwrap()]);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains(&format!(
            "hint: build it: cargo build --manifest-path {}\n",
            cargo.join("Cargo.toml").display()
        )),
        "{}",
        stderr(&o)
    );
    let lone = plugins.join("lone");
    let manifest = write_manifest(&lone, "lone", "lone", "");
    std::fs::write(lone.join("lone.c"), "").unwrap();
    let o = cli(&["inspect", manifest.to_str().unwrap()]);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains(&format!(
            "hint: build it: cc -shared -fPIC -O2 -I {} -o {} {}\n",
            include.display(),
            lone.join("liblone.so").display(),
            lone.join("lone.c").display()
        )),
        "{}",
        stderr(&o)
    );
}

/// A manifest for the example plugin `name` as a WebAssembly plugin, in `dir/name`: its
/// module from [`wasm_dir`] (built by tests/build.rs), `body` after the required fields.
fn write_wasm_manifest(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    let module = wasm_dir().join(format!("{name}.wasm"));
    assert!(module.is_file(), "{} is missing", module.display());
    write_manifest(
        &dir.join(name),
        name,
        module.to_str().unwrap(),
        &format!("runtime = \"wasm\"\n{body}"),
    )
}

#[test]
fn inspect_and_call_a_wasm_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let hello = write_wasm_manifest(dir.path(), "hello", "\n[config]\ngreeting = \"Hi\"\n");
    let hello = hello.to_str().unwrap();

    let o = cli(&["inspect", hello]);
    assert_code(&o, 0);
    let out = stdout(&o);
    for line in [
        "name:     hello\n",
        "methods:  greet, echo\n",
        "runtime:  wasm (a WebAssembly module, run by the wasmi interpreter)\n",
        "trust:    does not apply (the engine contains the plugin)\n",
        "runs:      webassembly, in this process (wasmi; contained by the engine: no imports \
         beyond the host services, memory cap, fuel)\n",
        "sandbox:   webassembly: no imports beyond the host services (no WASI), webassembly: \
         memory capped at 1024 MiB per instance, webassembly: deadlines enforced by fuel\n",
        "missing:   none\n",
    ] {
        assert!(out.contains(line), "{line:?} not in\n{out}");
    }
    assert!(
        out.contains(&format!(
            "library:  {} (hello)",
            wasm_dir()
                .join("hello.wasm")
                .canonicalize()
                .unwrap()
                .display()
        )),
        "{out}"
    );
    assert!(!out.contains("worker"), "{out}");
    // Native plugins say what they are too.
    let o = cli(&["inspect", "plugins/hello/plugin.toml"]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains("runtime:  native (a shared library)"),
        "{}",
        stdout(&o)
    );

    // call: JSON in and out, raw bytes through unchanged.
    let o = cli(&["call", hello, "greet", "--json", r#"{"name":"wasm"}"#]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "{\n  \"message\": \"Hi, wasm!\"\n}\n");
    let bytes: Vec<u8> = (0..=255u8).collect();
    let o = run(
        plugin_host(&["call", hello, "echo", "--raw"]),
        Some(bytes.clone()),
    );
    assert_code(&o, 0);
    assert_eq!(o.stdout, bytes);
    // A plugin error is 5, as in the other backends.
    let o = cli(&["call", hello, "greet", "--json", r#"{"name":""}"#]);
    assert_code(&o, 5);

    // A base name (`library = "hello"`) is found where cargo puts the modules of the
    // workspace plugin-host was built in: ../wasm32-unknown-unknown/release from it.
    assert_eq!(
        wasm_dir(),
        artifacts()
            .parent()
            .unwrap()
            .join("wasm32-unknown-unknown")
            .join("release")
    );
    let by_name = write_manifest(
        &dir.path().join("by-name"),
        "hello",
        "hello",
        "runtime = \"wasm\"\n",
    );
    let o = cli(&["inspect", by_name.to_str().unwrap()]);
    assert_code(&o, 0);
    assert!(
        stdout(&o).contains(&format!(
            "library:  {} (hello)",
            wasm_dir()
                .join("hello.wasm")
                .canonicalize()
                .unwrap()
                .display()
        )),
        "{}",
        stdout(&o)
    );
}

#[test]
fn a_wasm_trap_exits_6_like_a_crash_and_a_spinning_call_7() {
    let dir = tempfile::tempdir().unwrap();
    let faulty = write_wasm_manifest(
        dir.path(),
        "faulty",
        "\n[limits]\nmemory = \"64MiB\"\n\n[timeouts]\ncancel_grace = \"100ms\"\n",
    );
    let faulty = faulty.to_str().unwrap();
    let call = |args: &[&str]| cli(&[&["call", faulty][..], args].concat());

    // A panic is a trap in wasm, with the panic's message in the report.
    let o = call(&["panic", "--json", r#"{"message": "wasm boom"}"#]);
    assert_code(&o, 6);
    let err = stderr(&o);
    assert!(
        err.contains("error: plugin `faulty` crashed during `panic`: wasm instance of plugin `faulty` trapped (unreachable")
            && err.contains("panic: wasm boom at "),
        "{err}"
    );
    let o = call(&["abort"]);
    assert_code(&o, 6);
    assert!(
        stderr(&o).contains("trapped (unreachable"),
        "{}",
        stderr(&o)
    );
    let o = call(&["stack_overflow"]);
    assert_code(&o, 6);
    assert!(
        stderr(&o).contains("trapped (stack overflow")
            || stderr(&o).contains("trapped (out of bounds memory access"),
        "{}",
        stderr(&o)
    );
    // The memory bomb hits limits.memory.
    let o = call(&["alloc", "--json", r#"{"chunk": 1048576}"#]);
    assert_code(&o, 6);
    assert!(
        stderr(&o).contains("cause: out of memory: hit its memory limit of 64 MiB"),
        "{}",
        stderr(&o)
    );
    // A null write is no fault in wasm.
    let o = call(&["segfault"]);
    assert_code(&o, 0);
    assert_eq!(stdout(&o), "null\n");
    // A plugin error is 5; a call spinning past its deadline is 7.
    assert_code(&call(&["fail"]), 5);
    let started = std::time::Instant::now();
    let o = call(&["infinite_loop", "--timeout", "200ms"]);
    assert_code(&o, 7);
    assert!(
        stderr(&o).contains("timed out after 200ms"),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn check_loads_wasm_plugins_in_the_interpreter_and_survives_one_that_traps() {
    let dir = tempfile::tempdir().unwrap();
    write_wasm_manifest(dir.path(), "hello", "trust = \"trusted\"\n");
    let o = cli(&["--grant", "check", dir.path().to_str().unwrap()]);
    assert_code(&o, 0);
    let out = stdout(&o);
    assert!(
        out.contains(
            "hello/plugin.toml: loads, 2 methods; webassembly, in this process (wasmi; contained \
             by the engine: no imports beyond the host services, memory cap, fuel)"
        ),
        "{out}"
    );
    assert!(
        out.contains("note: requests trust, which does not apply to a WebAssembly plugin")
            && !out.contains("checked in a worker process"),
        "{out}"
    );
    assert!(
        out.contains(
            "WebAssembly plugins were checked in this process, in the wasmi interpreter, which \
             contains them: a trap ends the instance, not check (1 of these manifests are \
             runtime = \"wasm\")"
        ),
        "{out}"
    );

    // A module that traps in its create: reported, and check goes on to the next.
    write_wasm_manifest(dir.path(), "faulty", "\n[config]\ncreate_abort = true\n");
    let o = cli(&["check", dir.path().to_str().unwrap()]);
    // 8, not a signal: the trap ended an instance, not check.
    assert_code(&o, 8);
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.contains("faulty/plugin.toml"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("FAILED")
            && line.contains(
                "plugin `faulty`: its WebAssembly instance trapped while loading the plugin: \
                 wasm instance of plugin `faulty` trapped (unreachable"
            ),
        "{out}"
    );
    assert!(out.contains("2 manifests, 1 with problems"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("ok") && l.contains("hello/plugin.toml")),
        "{out}"
    );
}

#[test]
fn a_missing_wasm_module_comes_with_the_cargo_command_that_builds_it() {
    // A Cargo workspace with one plugin package whose module is not built.
    let root = tempfile::tempdir().unwrap();
    let root = root.path().canonicalize().unwrap();
    std::fs::write(
        root.join("Cargo.toml"),
        "[workspace]\nmembers = [\"plugins/*\"]\n",
    )
    .unwrap();
    let package = root.join("plugins").join("wasmless");
    let manifest = write_manifest(&package, "wasmless", "wasmless", "runtime = \"wasm\"\n");
    std::fs::write(
        package.join("Cargo.toml"),
        "[package]\nname = \"wasm-less\"\nversion = \"0.1.0\"\n",
    )
    .unwrap();
    let out_dir = root.join("target/wasm32-unknown-unknown/release");
    let build = "cargo build --release --target wasm32-unknown-unknown -p wasm-less";

    let o = cli(&["check", root.join("plugins").to_str().unwrap()]);
    assert_code(&o, 8);
    let out = stdout(&o);
    for line in [
        "WebAssembly module `wasmless` not found; looked in: ".to_string(),
        format!("hint: build it: cd {} && {build}\n", root.display()),
        format!(
            "hint: it lands in {}; pass that directory with -L {}",
            out_dir.join("wasm_less.wasm").display(),
            out_dir.display()
        ),
        "hint: the target, once: rustup target add wasm32-unknown-unknown\n".to_string(),
    ] {
        assert!(out.contains(&line), "{line:?} not in\n{out}");
    }

    // From the workspace's root: no `cd`; `call` gives the same hints, and exits 4.
    let mut command = plugin_host(&["call", manifest.to_str().unwrap(), "echo", "--raw"]);
    command.current_dir(&root);
    let o = run(command, None);
    assert_code(&o, 4);
    assert!(
        stderr(&o).contains(&format!("hint: build it: {build}\n")),
        "{}",
        stderr(&o)
    );
}
