//! Untrusted plugins in worker processes: calls, crash containment, handshake checks and
//! lifecycle, through real processes.
//!
//! Linux and Windows (the isolated backend's platforms here). Tests built on Unix-only
//! tools (signals, `/proc`, shell scripts as stand-in workers, the Linux sandbox's
//! layers) are gated to Unix or Linux, each where it is.
#![cfg(any(target_os = "linux", windows))]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{host, manifest, run, worker_shim, Greet, Greeting};
#[cfg(unix)]
use common::{host_with_shim, script};
use plugin_host::{CallError, CallOptions, Error, ExitInfo, LoadError, Manifest, Plugin, Trust};
use serde_json::json;

fn faulty() -> Plugin {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.limits.concurrency = 16;
    run(host().load_manifest(m)).unwrap()
}

fn crash_of(err: &Error) -> &plugin_host::CrashReport {
    match err {
        Error::Call(CallError::Crashed { report, .. }) => report,
        other => panic!("expected Crashed, got {other}"),
    }
}

#[test]
fn typed_and_raw_calls_cross_the_process_boundary() {
    run(async {
        let plugin = host()
            .load_manifest(manifest("hello", Trust::Untrusted))
            .await
            .unwrap();
        let pid = plugin.worker_pid().expect("a worker runs");
        assert_ne!(pid, std::process::id());
        assert_eq!(plugin.methods(), ["greet", "echo"]);
        let out: Greeting = plugin
            .call("greet", &Greet { name: "Grace" })
            .await
            .unwrap();
        assert_eq!(out.message, "Hello, Grace!");
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(plugin.call_raw("echo", big.clone()).await.unwrap(), big);
        assert_eq!(
            plugin.call_raw("echo", Vec::new()).await.unwrap(),
            Vec::<u8>::new()
        );
        let err = plugin
            .call::<_, Greeting>("greet", &Greet { name: "" })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Call(CallError::Plugin { .. })),
            "{err}"
        );
    });
}

#[test]
fn a_thousand_calls_from_eight_tasks_are_all_answered_correctly() {
    let plugin = run(host().load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    let ex = smol::Executor::new();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let plugin = plugin.clone();
            ex.spawn(async move {
                for i in 0..125 {
                    let name = format!("t{t}-{i}");
                    let out: Greeting = plugin.call("greet", &Greet { name: &name }).await.unwrap();
                    assert_eq!(out.message, format!("Hello, {name}!"));
                }
            })
        })
        .collect();
    run(ex.run(async {
        for t in tasks {
            t.await;
        }
    }));
}

#[test]
fn a_panic_is_an_error_and_the_same_worker_keeps_serving() {
    let plugin = faulty();
    let pid = plugin.worker_pid();
    let err = run(plugin.call::<_, ()>("panic", &json!({"message": "oh no"}))).unwrap_err();
    assert!(
        matches!(&err, Error::Call(CallError::Panicked { message, .. }) if message == "oh no"),
        "{err}"
    );
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");
    assert_eq!(plugin.worker_pid(), pid, "no restart after a caught panic");
}

fn assert_crash_then_recovery(method: &str, input: serde_json::Value, check: impl Fn(&ExitInfo)) {
    let plugin = faulty();
    let first_pid = plugin.worker_pid().unwrap();
    let err = run(plugin.call::<_, ()>(method, &input)).unwrap_err();
    let report = crash_of(&err);
    let exit = report
        .exit
        .as_ref()
        .unwrap_or_else(|| panic!("no exit status in {report}"));
    check(exit);
    assert_eq!(report.in_flight, [method]);
    assert_eq!(report.plugin, "faulty");
    assert!(err.to_string().contains(method), "{err}");
    // The host is fine and the next call starts a fresh worker.
    assert_eq!(
        run(plugin.call_raw("echo", b"again".to_vec())).unwrap(),
        b"again"
    );
    let second_pid = plugin.worker_pid().unwrap();
    assert_ne!(first_pid, second_pid);
    assert!(
        common::wait_until(Duration::from_secs(5), || !common::process_exists(
            first_pid
        )),
        "old worker reaped"
    );
}

#[test]
fn abort_is_reported_as_sigabrt() {
    assert_crash_then_recovery("abort", json!(null), |e| {
        assert_eq!(common::fault_name(e), Some(common::ABORT), "{e}")
    });
}

#[test]
fn segfault_is_reported_as_sigsegv() {
    assert_crash_then_recovery("segfault", json!(null), |e| {
        assert_eq!(common::fault_name(e), Some(common::SEGFAULT), "{e}")
    });
}

#[test]
fn stack_overflow_is_reported_with_its_signal() {
    assert_crash_then_recovery("stack_overflow", json!(null), |e| {
        assert!(
            common::fault_name(e).is_some_and(|n| common::STACK_OVERFLOW.contains(&n)),
            "{e}"
        )
    });
}

#[test]
fn exit_mid_call_is_reported_with_its_code() {
    assert_crash_then_recovery("exit", json!({"code": 42}), |e| {
        assert_eq!(e.code(), Some(42))
    });
}

#[test]
fn stack_overflow_report_carries_stderr() {
    let plugin = faulty();
    let err = run(plugin.call::<_, ()>("stack_overflow", &json!(null))).unwrap_err();
    let report = crash_of(&err);
    assert!(
        report
            .stderr_tail
            .iter()
            .any(|l| l.contains("overflowed its stack")),
        "{report}"
    );
}

#[test]
fn every_call_in_flight_gets_the_crash_and_other_plugins_are_untouched() {
    let plugin = faulty();
    let bystander = run(host().load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    run(async {
        let sleepers: Vec<_> = (0..8)
            .map(|_| {
                let p = plugin.clone();
                smol::spawn(async move { p.call::<_, u64>("sleep", &json!({"ms": 10_000})).await })
            })
            .collect();
        smol::Timer::after(Duration::from_millis(200)).await;
        let started = std::time::Instant::now();
        let err = plugin
            .call::<_, ()>("segfault", &json!(null))
            .await
            .unwrap_err();
        assert_eq!(
            crash_of(&err).exit.as_ref().and_then(common::fault_name),
            Some(common::SEGFAULT)
        );
        for s in sleepers {
            let err = s.await.unwrap_err();
            let report = crash_of(&err);
            assert!(
                report.in_flight.iter().filter(|m| *m == "sleep").count() == 8,
                "{report}"
            );
            assert!(report.in_flight.contains(&"segfault".to_string()));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "crash reported promptly"
        );
        let out: Greeting = bystander
            .call("greet", &Greet { name: "still here" })
            .await
            .unwrap();
        assert_eq!(out.message, "Hello, still here!");
        assert_eq!(plugin.call_raw("echo", b"x".to_vec()).await.unwrap(), b"x");
    });
}

#[test]
fn progress_events_reach_their_caller() {
    let plugin = faulty();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let options = CallOptions::new().on_progress(move |p| sink.lock().unwrap().push(p));
    let n: u32 = run(plugin.call_with("progress", &json!({"steps": 5}), options)).unwrap();
    assert_eq!(n, 5);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[4].fraction, Some(1.0));
    assert_eq!(seen[4].message, "step 5");
}

#[test]
fn a_timed_out_call_is_cancelled_in_the_worker() {
    let plugin = faulty();
    let options = CallOptions::new().timeout(Duration::from_millis(150));
    let err = run(plugin.call_with::<_, u64>(
        "sleep",
        &json!({"ms": 30_000, "cooperative": true}),
        options,
    ))
    .unwrap_err();
    assert!(
        matches!(&err, Error::Call(CallError::Timeout { .. })),
        "{err}"
    );
    // The cooperative sleep saw the cancellation, so the worker is free again quickly.
    let n: u64 = run(plugin.call("sleep", &json!({"ms": 1}))).unwrap();
    assert_eq!(n, 1);
}

#[test]
fn create_failures_have_distinct_kinds() {
    let load = |key: &str, value: plugin_host::toml::Value| {
        let mut m = manifest("faulty", Trust::Untrusted);
        m.config.insert(key.into(), value);
        run(host().load_manifest(m)).unwrap_err()
    };
    let err = load("create_fail", "no licence".into());
    assert!(
        matches!(&err, Error::Load(LoadError::CreateFailed { message, .. }) if message == "no licence"),
        "{err}"
    );
    let err = load("create_panic", "bad".into());
    assert!(
        matches!(&err, Error::Load(LoadError::CreatePanicked { message, .. }) if message == "bad"),
        "{err}"
    );
    let err = load("create_abort", true.into());
    match &err {
        Error::Load(LoadError::CreateCrashed { report, .. }) => {
            assert_eq!(
                report.exit.as_ref().and_then(common::fault_name),
                Some(common::ABORT)
            );
        }
        other => panic!("expected CreateCrashed, got {other}"),
    }
}

fn c_manifest(library: &str) -> Manifest {
    // Forward slashes: a Windows path's backslashes would be escapes in a TOML string.
    let library = library.replace('\\', "/");
    let text =
        format!("name = \"c-echo\"\nversion = \"1.0.0\"\nlibrary = \"{library}\"\napi = \"^1\"\n");
    Manifest::parse(&text, "<test>").unwrap()
}

#[test]
fn load_failures_in_the_worker_keep_their_kinds() {
    let err = run(host().load_manifest(c_manifest(env!("C_ECHO_ABI99_LIBRARY")))).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::Load(LoadError::AbiMismatch { found: (99, _), .. })
        ),
        "{err}"
    );
    let err = run(host().load_manifest(c_manifest(env!("C_ECHO_NO_ENTRY_LIBRARY")))).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::EntryMissing { .. })),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, b"not a library").unwrap();
    let err = run(host().load_manifest(c_manifest(fake.to_str().unwrap()))).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::NotALibrary { .. })),
        "{err}"
    );
    // And the C plugin itself works isolated.
    let plugin = run(host().load_manifest(c_manifest(env!("C_ECHO_LIBRARY")))).unwrap();
    assert_eq!(
        run(plugin.call::<_, String>("echo", "from C")).unwrap(),
        "from C"
    );
}

#[cfg(unix)]
fn quick_connect(name: &str) -> Manifest {
    let mut m = manifest(name, Trust::Untrusted);
    m.timeouts.connect = Some(Duration::from_secs(1));
    m
}

#[cfg(unix)]
#[test]
fn a_protocol_version_mismatch_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let shim = script(
        dir.path(),
        "shim",
        &format!(
            "PLUGIN_HOST_TEST_PROTOCOL_VERSION=9.0.0 exec {} \"$@\"",
            worker_shim().display()
        ),
    );
    let err = run(host_with_shim(&shim).load_manifest(quick_connect("hello"))).unwrap_err();
    match &err {
        Error::Load(LoadError::ProtocolMismatch {
            host,
            worker,
            message,
            ..
        }) => {
            assert_eq!(worker, "9.0.0");
            assert_eq!(host, plugin_host::protocol::VERSION);
            assert!(
                message.contains("9.0.0") && message.contains(host.as_str()),
                "{message}"
            );
        }
        other => panic!("expected ProtocolMismatch, got {other}"),
    }
}

#[cfg(unix)]
#[test]
fn a_worker_that_answers_garbage_instead_of_hello_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    // The worker's end of the socket pair is its standard input.
    let shim = script(
        dir.path(),
        "shim",
        "printf '\\020\\000\\000\\000\\004\\000\\000\\000garbagegarbage!!' >&0\nexec sleep 30",
    );
    let err = run(host_with_shim(&shim).load_manifest(quick_connect("hello"))).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::Handshake { .. })),
        "expected Handshake, got {err}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn there_is_no_socket_anyone_else_could_connect_to() {
    // The worker's connection is one end of a socket pair it inherits: no listening
    // socket, no name in the abstract namespace, no file.
    let plugin = run(host().load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    let out: Greeting = run(plugin.call("greet", &Greet { name: "pair" })).unwrap();
    assert_eq!(out.message, "Hello, pair!");
    let sockets = std::fs::read_to_string("/proc/net/unix").unwrap();
    let named: Vec<&str> = sockets
        .lines()
        .filter(|l| l.contains("plugin-host"))
        .collect();
    assert!(named.is_empty(), "named worker sockets: {named:?}");
    assert_eq!(common::socket_files(), 0);
}

#[cfg(unix)]
#[test]
fn a_worker_that_never_connects_times_out_with_its_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let shim = script(
        dir.path(),
        "shim",
        "echo 'starting up slowly' >&2\nexec sleep 30",
    );
    let err = run(host_with_shim(&shim).load_manifest(quick_connect("hello"))).unwrap_err();
    match &err {
        Error::Load(LoadError::WorkerTimeout {
            exit,
            stderr,
            after,
            ..
        }) => {
            assert_eq!(*after, Duration::from_secs(1));
            assert_eq!(exit.as_ref().and_then(|e| e.signal_name()), Some("SIGKILL"));
            assert_eq!(stderr, &["starting up slowly"]);
        }
        other => panic!("expected WorkerTimeout, got {other}"),
    }
}

#[cfg(unix)]
#[test]
fn a_worker_that_exits_before_connecting_reports_why() {
    let dir = tempfile::tempdir().unwrap();
    let shim = script(dir.path(), "shim", "echo 'missing libfoo' >&2\nexit 3");
    let err = run(host_with_shim(&shim).load_manifest(quick_connect("hello"))).unwrap_err();
    match &err {
        Error::Load(LoadError::WorkerExited { exit, stderr, .. }) => {
            assert_eq!(exit.as_ref().and_then(ExitInfo::code), Some(3));
            assert_eq!(stderr, &["missing libfoo"]);
        }
        other => panic!("expected WorkerExited, got {other}"),
    }
    let err = run(
        host_with_shim(std::path::Path::new("/nonexistent/worker-shim"))
            .load_manifest(quick_connect("hello")),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::WorkerSpawn { .. })),
        "{err}"
    );
}

#[test]
fn shutdown_lets_calls_finish_then_ends_the_worker() {
    let plugin = faulty();
    let pid = plugin.worker_pid().unwrap();
    run(async {
        let p = plugin.clone();
        let call = smol::spawn(async move { p.call::<_, u64>("sleep", &json!({"ms": 300})).await });
        // Shut down once the call is in the worker (a fixed pause was too short under Wine).
        let started = std::time::Instant::now();
        while plugin.status().instances[0].in_flight == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the call never started"
            );
            smol::Timer::after(Duration::from_millis(5)).await;
        }
        plugin.shutdown().await;
        assert_eq!(call.await.unwrap(), 300, "the call in flight finished");
    });
    assert!(matches!(
        run(plugin.call_raw("echo", vec![])),
        Err(Error::Call(CallError::Stopped { .. }))
    ));
    assert!(
        common::wait_until(Duration::from_secs(5), || !common::process_exists(pid)),
        "worker gone"
    );
}

#[test]
fn dropping_the_plugin_kills_and_reaps_its_worker() {
    let plugin = faulty();
    let pid = plugin.worker_pid().unwrap();
    let clone = plugin.clone();
    drop(plugin);
    assert!(
        common::process_exists(pid),
        "a clone still holds the plugin"
    );
    drop(clone);
    assert!(
        common::wait_until(Duration::from_secs(5), || !common::process_exists(pid)),
        "worker {pid} reaped"
    );
}

#[test]
fn an_input_over_the_frame_limit_is_refused_before_sending() {
    let mut m = manifest("hello", Trust::Untrusted);
    m.limits.max_frame = 64 * 1024;
    let plugin = run(host().load_manifest(m)).unwrap();
    let pid = plugin.worker_pid();
    let err = run(plugin.call_raw("echo", vec![0u8; 100 * 1024])).unwrap_err();
    match &err {
        Error::Call(CallError::InputTooLarge { size, limit, .. }) => {
            assert_eq!((*size, *limit), (100 * 1024, 64 * 1024))
        }
        other => panic!("expected InputTooLarge, got {other}"),
    }
    assert_eq!(
        run(plugin.call_raw("echo", vec![1u8; 1000])).unwrap(),
        vec![1u8; 1000]
    );
    assert_eq!(plugin.worker_pid(), pid, "the worker was never bothered");
}

#[test]
fn a_dropped_call_is_cancelled_in_the_worker() {
    // One call at a time: an abandoned call that kept running would block the next one.
    let mut m = manifest("faulty", Trust::Untrusted);
    m.limits.concurrency = 1;
    let plugin = run(host().load_manifest(m)).unwrap();
    let input = json!({"ms": 30_000, "cooperative": true});
    run(async {
        // Give up on the call by dropping its future (not through its deadline).
        let call = plugin.call::<_, u64>("sleep", &input);
        let gave_up = futures_lite::future::or(async { call.await.ok() }, async {
            smol::Timer::after(Duration::from_millis(100)).await;
            None
        })
        .await;
        assert_eq!(gave_up, None);
    });
    let started = std::time::Instant::now();
    let n: u64 = run(plugin.call("sleep", &json!({"ms": 1}))).unwrap();
    assert_eq!(n, 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the abandoned call was cancelled"
    );
    assert_eq!(plugin.status().crashes, 0);
}

#[test]
fn a_manifest_given_as_a_bare_file_name_resolves_its_library() {
    let dir = tempfile::tempdir().unwrap();
    let lib = common::artifacts().join(Manifest::library_file_name("hello"));
    std::fs::copy(&lib, dir.path().join(Manifest::library_file_name("hello"))).unwrap();
    // Where there is no sandbox, the manifest asks to run without one and the CLI grants
    // that (--grant); on Linux the default policy runs it in a sandboxed worker.
    let (ask, grant) = match cfg!(target_os = "linux") {
        true => ("trust = \"trusted\"\n", None),
        false => ("sandbox = \"best-effort\"\n", Some("--grant")),
    };
    std::fs::write(
        dir.path().join("plugin.toml"),
        format!("name = \"hello\"\nversion = \"0.1.0\"\nlibrary = \"hello\"\napi = \"^1\"\n{ask}"),
    )
    .unwrap();
    // Run from the manifest's directory with a path that has no directory part.
    let cli = common::artifacts().join(format!("plugin-host{}", std::env::consts::EXE_SUFFIX));
    let mut cmd = std::process::Command::new(cli);
    cmd.args(grant)
        .args([
            "call",
            "plugin.toml",
            "greet",
            "--json",
            r#"{"name":"here"}"#,
        ])
        .current_dir(dir.path());
    let (status, out) = common::output_with_limit(&mut cmd, Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "{out}");
    assert!(out.contains("Hello, here!"), "{out}");
}

#[test]
fn calls_work_under_tokio_too() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let plugin = rt
        .block_on(host().load_manifest(manifest("hello", Trust::Untrusted)))
        .unwrap();
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let plugin = plugin.clone();
                tokio::spawn(async move {
                    let name = format!("tokio{i}");
                    let out: Greeting = plugin.call("greet", &Greet { name: &name }).await.unwrap();
                    out.message == format!("Hello, {name}!")
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.unwrap());
        }
        all
    });
    assert_eq!(results, vec![true; 16]);
    rt.block_on(plugin.shutdown());
}

#[test]
fn a_call_dropped_half_way_through_sending_leaves_the_stream_intact() {
    let plugin = run(host().load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    let big = vec![7u8; 32 << 20];
    run(async {
        // Poll the call just long enough to start writing 32 MiB, then drop it.
        let call = plugin.call_raw("echo", big);
        let dropped = futures_lite::future::or(async { call.await.ok() }, async {
            smol::Timer::after(Duration::from_millis(2)).await;
            None
        })
        .await;
        assert!(dropped.is_none());
    });
    let started = std::time::Instant::now();
    let out = run(plugin.call_raw("echo", b"after".to_vec())).unwrap();
    assert_eq!(out, b"after");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        plugin.status().crashes,
        0,
        "a healthy worker was not blamed"
    );
}

#[cfg(unix)]
#[test]
fn the_deadline_covers_sending_to_a_stalled_worker() {
    let plugin = faulty();
    let pid = plugin.worker_pid().unwrap();
    // The whole worker: the process the host spawned leads a process group that holds the
    // sandbox's init and the plugin's process too.
    let stop = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, "--", &format!("-{pid}")])
            .status()
            .unwrap();
    };
    stop("-STOP");
    let started = std::time::Instant::now();
    let options = CallOptions::new().timeout(Duration::from_secs(1));
    let result = run(plugin.call_raw_with("echo", vec![1u8; 16 << 20], options));
    stop("-CONT");
    assert!(
        matches!(result, Err(Error::Call(CallError::Timeout { .. }))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[cfg(target_os = "linux")]
#[test]
fn abandoning_a_load_kills_the_worker_it_started() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.name = "abandoned-load-probe".into();
    m.config.insert("create_sleep_ms".into(), 30_000.into());
    let host = host();
    run(async {
        let load = host.load_manifest(m);
        let gave_up = futures_lite::future::or(async { load.await.ok() }, async {
            smol::Timer::after(Duration::from_millis(500)).await;
            None
        })
        .await;
        assert!(gave_up.is_none());
    });
    let probe_running = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains("abandoned-load-probe"))
                .unwrap_or(false)
        })
    };
    assert!(
        common::wait_until(Duration::from_secs(5), || !probe_running()),
        "the worker outlived its load"
    );
}

#[test]
fn a_call_future_left_unpolled_does_not_stall_other_calls() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.limits.concurrency = 4;
    m.timeouts.ping_interval = Duration::from_millis(200);
    m.timeouts.ping_timeout = Duration::from_secs(2);
    let plugin = run(host().load_manifest(m)).unwrap();
    // Call A is polled once (it takes the reader role), then kept without being polled.
    // It takes a while, so that one poll cannot finish it (shared memory answers a quick
    // call within its first poll).
    let input = json!({"ms": 300});
    let mut a = Box::pin(plugin.call::<_, u64>("sleep", &input));
    assert!(futures_lite::future::block_on(futures_lite::future::poll_once(&mut a)).is_none());
    // Call B, from another thread, must not wait on A.
    let other = plugin.clone();
    let b = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        (
            other.call_raw_blocking("echo", b"b".to_vec()),
            started.elapsed(),
        )
    });
    let (result, took) = b.join().unwrap();
    assert_eq!(result.unwrap(), b"b");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(
        plugin.status().crashes,
        0,
        "a healthy worker was not killed"
    );
    // A still gets its reply when it is polled again.
    assert_eq!(run(a).unwrap(), 300);
}

#[cfg(unix)]
#[test]
fn a_kill_from_outside_is_not_blamed_on_the_host() {
    let plugin = faulty();
    let pid = plugin.worker_pid().unwrap();
    // Someone else (here: this test, as another process of the same user would) kills the
    // worker's process group.
    assert!(std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status()
        .unwrap()
        .success());
    assert!(
        common::wait_until(Duration::from_secs(10), || plugin
            .status()
            .last_crash
            .is_some()),
        "the crash was noticed"
    );
    let report = plugin.status().last_crash.unwrap();
    assert_eq!(
        report.exit.as_ref().and_then(ExitInfo::signal_name),
        Some("SIGKILL")
    );
    assert!(report.outside_signal, "{report}");
    assert_eq!(report.killed_by_host, None);
    assert!(report.to_string().contains("did not send"), "{report}");

    // The host's own kill (a call that ignores its deadline) is reported as the host's.
    let options = CallOptions::new().timeout(Duration::from_millis(200));
    let err = run(plugin.call_with::<_, ()>("infinite_loop", &json!({}), options)).unwrap_err();
    assert!(
        matches!(&err, Error::Call(CallError::Timeout { .. })),
        "{err}"
    );
    assert!(
        common::wait_until(Duration::from_secs(10), || plugin.status().crashes == 2),
        "the stuck worker was killed"
    );
    let report = plugin.status().last_crash.unwrap();
    assert!(report.killed_by_host.is_some(), "{report}");
    assert!(!report.outside_signal, "{report}");
    // And the plugin still serves.
    let out: Vec<u8> = run(plugin.call_raw("echo", vec![7])).unwrap();
    assert_eq!(out, [7]);
}

#[test]
fn a_manifest_cannot_make_itself_trusted() {
    // hello's manifest asks for nothing; ask for trust as a plugin editing its own
    // manifest would. Without a grant from the app it still runs in a sandboxed worker.
    let mut m = manifest("hello", Trust::Trusted);
    m.permissions.network = true;
    m.sandbox = plugin_host::SandboxMode::Off;
    let deny_all = plugin_host::Host::builder()
        .search_path(common::artifacts())
        .worker_shim(worker_shim())
        .build()
        .unwrap();
    let loaded = run(deny_all.load_manifest(m.clone()));
    // Where there is no sandbox, the default policy (sandbox required) refuses it.
    #[cfg(not(target_os = "linux"))]
    assert!(
        matches!(loaded, Err(Error::Load(LoadError::Sandbox { .. }))),
        "{loaded:?}"
    );
    #[cfg(target_os = "linux")]
    {
        let plugin = loaded.unwrap();
        assert_eq!(plugin.trust(), Trust::Untrusted);
        assert!(plugin.worker_pid().is_some(), "runs in a worker");
        assert_eq!(plugin.grant().sandbox, plugin_host::SandboxMode::Required);
        assert!(!plugin.grant().permissions.network);
        let info = plugin.info();
        assert_eq!(
            info.requested.as_ref().map(|r| r.trust),
            Some(Trust::Trusted)
        );
        assert_eq!(info.granted.trust, Trust::Untrusted);
        let layers = plugin.status().sandbox;
        for layer in [
            "seccomp",
            "landlock filesystem",
            "pid namespace",
            "no_new_privs",
        ] {
            assert!(
                layers.iter().any(|l| l == layer),
                "{layer} missing from {layers:?}"
            );
        }
    }
    // The app's grant, not the manifest, is what raises trust.
    let trusting = host();
    let plugin = run(trusting.load_manifest(m)).unwrap();
    assert_eq!(plugin.trust(), Trust::Trusted);
    assert_eq!(plugin.worker_pid(), None);
}

#[test]
fn sixty_four_calls_in_flight_each_get_their_own_answer() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.limits.concurrency = 64;
    let plugin = run(host().load_manifest(m)).unwrap();
    let answers = run(async {
        let calls: Vec<_> = (0..64u64)
            .map(|i| {
                let p = plugin.clone();
                // Each sleeps a little, so all 64 are in the worker at once.
                smol::spawn(async move {
                    let slept: u64 = p.call("sleep", &json!({"ms": 200 + i})).await?;
                    let echo = p.call_raw("echo", i.to_le_bytes().to_vec()).await?;
                    Ok::<_, Error>((slept, echo))
                })
            })
            .collect();
        let mut answers = Vec::new();
        for call in calls {
            answers.push(call.await.unwrap());
        }
        answers
    });
    for (i, (slept, echo)) in answers.into_iter().enumerate() {
        assert_eq!(slept, 200 + i as u64);
        assert_eq!(echo, (i as u64).to_le_bytes());
    }
    assert_eq!(plugin.status().crashes, 0);
}

/// The host process is killed outright: its worker must not outlive it (Windows: the
/// worker's job is closed with the host's handles; Linux: the parent-death signal, in
/// cli.rs with a stopped worker).
#[cfg(windows)]
#[test]
fn workers_die_when_the_host_process_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("plugin.toml");
    // With its drive: the manifest is on another one (the temporary directory's).
    let library =
        std::path::absolute(common::artifacts().join(Manifest::library_file_name("faulty")))
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
    std::fs::write(
        &manifest,
        format!(
            "name = \"faulty\"\nversion = \"0.1.0\"\nlibrary = \"{library}\"\napi = \"^1\"\nsandbox = \"best-effort\"\n"
        ),
    )
    .unwrap();
    let cli = common::artifacts().join(format!("plugin-host{}", std::env::consts::EXE_SUFFIX));
    let mut host = std::process::Command::new(cli)
        .arg("--grant")
        .arg("call")
        .arg(&manifest)
        .args(["sleep", "--json", r#"{"ms": 20000}"#])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut worker = None;
    common::wait_until(Duration::from_secs(20), || {
        worker = common::children_of(host.id())
            .into_iter()
            .find(|(_, name)| name.starts_with("worker-shim"))
            .map(|(pid, _)| pid);
        worker.is_some()
    });
    let Some(worker) = worker else {
        let _ = host.kill();
        let out = host.wait_with_output().unwrap();
        panic!(
            "the host started no worker: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // TerminateProcess: the host gets no chance to clean up.
    host.kill().unwrap();
    host.wait().unwrap();
    assert!(
        common::wait_until(Duration::from_secs(10), || !common::process_exists(worker)),
        "worker {worker} outlived its host"
    );
}
