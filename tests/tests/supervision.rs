//! Supervision: the restart policy, quarantine and re-enabling, liveness pings, resource
//! limits, slow starts, status counters and events.
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{host, manifest, run, wait_until};
use plugin_host::manifest::RestartMode;
use plugin_host::{
    CallError, Error, LimitExceeded, LoadError, Manifest, PluginEvent, PluginState, Trust,
};
use serde_json::json;

fn faulty_manifest() -> Manifest {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.restart.backoff = Duration::from_millis(20);
    m.restart.backoff_max = Duration::from_millis(100);
    m
}

fn crash(plugin: &plugin_host::Plugin) -> Error {
    run(plugin.call::<_, ()>("abort", &json!(null))).unwrap_err()
}

#[test]
fn past_the_crash_budget_the_plugin_is_quarantined_until_enabled() {
    let mut m = faulty_manifest();
    m.restart.max_crashes = 2;
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    for _ in 0..2 {
        assert!(matches!(
            crash(&plugin),
            Error::Call(CallError::Crashed { .. })
        ));
        assert_eq!(
            run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(),
            b"ok",
            "restarted within budget"
        );
    }
    assert!(matches!(
        crash(&plugin),
        Error::Call(CallError::Crashed { .. })
    ));
    assert!(wait_until(Duration::from_secs(5), || plugin.status().state
        == PluginState::Quarantined));
    let started = std::time::Instant::now();
    match run(plugin.call_raw("echo", b"x".to_vec())) {
        Err(Error::Call(CallError::Quarantined { report, .. })) => {
            assert_eq!(
                report.exit.as_ref().and_then(|e| e.signal_name()),
                Some("SIGABRT")
            );
            assert!(report.to_string().contains("after 2 restarts"), "{report}");
        }
        other => panic!("expected Quarantined, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "quarantined calls fail fast"
    );
    let status = plugin.status();
    assert_eq!((status.crashes, status.restarts), (3, 2));
    assert!(status.pid.is_none());

    run(plugin.enable());
    assert_eq!(plugin.status().state, PluginState::Ready);
    assert_eq!(
        run(plugin.call_raw("echo", b"back".to_vec())).unwrap(),
        b"back"
    );

    let seen: Vec<PluginEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    let kinds: Vec<&str> = seen
        .iter()
        .map(|e| match e {
            PluginEvent::Crashed(_) => "crashed",
            PluginEvent::Restarted { .. } => "restarted",
            PluginEvent::Quarantined(_) => "quarantined",
            PluginEvent::Enabled => "enabled",
            PluginEvent::Stopped => "stopped",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "crashed",
            "restarted",
            "crashed",
            "restarted",
            "crashed",
            "quarantined",
            "enabled",
            "restarted"
        ]
    );
}

#[test]
fn policy_never_quarantines_at_the_first_crash() {
    let mut m = faulty_manifest();
    m.restart.mode = RestartMode::Never;
    let plugin = run(host().load_manifest(m)).unwrap();
    assert!(matches!(
        crash(&plugin),
        Error::Call(CallError::Crashed { .. })
    ));
    let err = run(plugin.call_raw("echo", vec![])).unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::Quarantined { .. })),
        "{err}"
    );
}

#[test]
fn a_crash_loop_in_create_spends_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let switch = dir.path().join("crash-in-create");
    let mut m = faulty_manifest();
    m.restart.max_crashes = 3;
    m.config.insert(
        "create_abort_if_exists".into(),
        switch.to_string_lossy().into_owned().into(),
    );
    let plugin = run(host().load_manifest(m)).unwrap();
    std::fs::write(&switch, b"on").unwrap();
    assert!(matches!(
        crash(&plugin),
        Error::Call(CallError::Crashed { .. })
    ));
    // Every restart now dies in create(): 1 crash + 3 failed restarts = quarantine.
    let err = run(plugin.call_raw("echo", vec![])).unwrap_err();
    match &err {
        Error::Call(CallError::Quarantined { report, .. }) => {
            assert_eq!(report.in_flight, ["create"]);
            assert_eq!(
                report.exit.as_ref().and_then(|e| e.signal_name()),
                Some("SIGABRT")
            );
        }
        other => panic!("expected Quarantined, got {other}"),
    }
    assert_eq!(plugin.status().crashes, 4);
    std::fs::remove_file(&switch).unwrap();
    run(plugin.enable());
    assert_eq!(
        run(plugin.call_raw("echo", b"fixed".to_vec())).unwrap(),
        b"fixed"
    );
}

#[test]
fn a_worker_that_stops_answering_pings_is_replaced() {
    let mut m = faulty_manifest();
    m.timeouts.ping_interval = Duration::from_millis(100);
    m.timeouts.ping_timeout = Duration::from_millis(300);
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let pid = plugin.worker_pid().unwrap();
    // Freeze it: it can no longer answer.
    freeze(pid);
    let report = run(async {
        loop {
            if let PluginEvent::Crashed(report) = events.recv().await.unwrap() {
                return report;
            }
        }
    });
    assert!(
        report
            .killed_by_host
            .as_deref()
            .is_some_and(|r| r.contains("ping")),
        "{report}"
    );
    assert_eq!(
        report.exit.as_ref().and_then(|e| e.signal_name()),
        Some("SIGKILL")
    );
    assert_eq!(
        run(plugin.call_raw("echo", b"alive".to_vec())).unwrap(),
        b"alive"
    );
    assert_ne!(plugin.worker_pid(), Some(pid));
}

fn freeze(pid: u32) {
    let status = std::process::Command::new("kill")
        // The worker's process group: the sandbox's relay, init and the plugin's process.
        .args(["-STOP", "--", &format!("-{pid}")])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn the_cpu_limit_is_reported_as_such() {
    let mut m = faulty_manifest();
    m.limits.cpu = Some(Duration::from_secs(1));
    let plugin = run(host().load_manifest(m)).unwrap();
    let err = run(plugin.call::<_, ()>("infinite_loop", &json!(null))).unwrap_err();
    match &err {
        Error::Call(CallError::Crashed { report, .. }) => {
            assert_eq!(
                report.limit,
                Some(LimitExceeded::Cpu {
                    limit: Duration::from_secs(1)
                }),
                "{report}"
            );
            assert!(report.to_string().contains("CPU-time limit"), "{report}");
        }
        other => panic!("expected Crashed, got {other}"),
    }
}

#[test]
fn the_memory_limit_is_reported_as_out_of_memory() {
    let mut m = faulty_manifest();
    m.limits.memory = Some(256 << 20);
    let plugin = run(host().load_manifest(m)).unwrap();
    let err = run(plugin.call::<_, ()>("alloc", &json!({"chunk": 8 << 20}))).unwrap_err();
    match &err {
        Error::Call(CallError::Crashed { report, .. }) => {
            assert_eq!(
                report.limit,
                Some(LimitExceeded::Memory { bytes: 256 << 20 }),
                "{report}"
            );
            assert!(report.to_string().contains("out of memory"), "{report}");
        }
        other => panic!("expected Crashed, got {other}"),
    }
    assert_eq!(run(plugin.call_raw("echo", b"y".to_vec())).unwrap(), b"y");
}

#[test]
fn a_slow_start_past_the_connect_timeout_fails_the_load() {
    let mut m = faulty_manifest();
    m.timeouts.connect = Some(Duration::from_millis(500));
    m.config.insert("create_sleep_ms".into(), 5_000.into());
    let started = std::time::Instant::now();
    let err = run(host().load_manifest(m)).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::WorkerTimeout { .. })),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "gave up at the timeout"
    );
}

#[test]
fn status_counts_calls_failures_crashes_and_restarts() {
    let plugin = run(host().load_manifest(faulty_manifest())).unwrap();
    let s = plugin.status();
    assert_eq!(
        (s.state, s.calls, s.failures, s.crashes, s.restarts),
        (PluginState::Ready, 0, 0, 0, 0)
    );
    assert!(s.uptime.is_some() && s.pid.is_some());
    run(plugin.call_raw("echo", vec![])).unwrap();
    let _ = run(plugin.call::<_, ()>("fail", &json!({})));
    let _ = crash(&plugin);
    run(plugin.call_raw("echo", vec![])).unwrap();
    let s = plugin.status();
    assert_eq!((s.calls, s.failures, s.crashes, s.restarts), (4, 2, 1, 1));
    assert!(s.last_crash.is_some());
    run(plugin.shutdown());
    assert_eq!(plugin.status().state, PluginState::Stopped);
}
