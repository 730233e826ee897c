//! A plugin's life in an app: pools of workers, idle reclaim, hot reload and cancelling a
//! call. Each test asserts the exact error kinds and that the plugin still serves after.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{host, manifest, run, run_with_limit, wait_until};
use plugin_host::{
    CallError, CallOptions, CancelHandle, Error, LoadError, Manifest, Plugin, PluginEvent,
    PluginState, Trust,
};
use serde_json::json;

/// The faulty plugin in a pool of `instances` workers, each running up to 4 calls and
/// holding none queued (calls past 4 per worker wait in the host).
fn pool(instances: u32) -> Plugin {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.instances = Some(instances);
    m.limits.concurrency = 4;
    m.limits.queue = 0;
    m.restart.backoff = Duration::from_millis(10);
    run(host().load_manifest(m)).unwrap()
}

fn call_error(result: Result<Vec<u8>, Error>) -> CallError {
    match result {
        Err(Error::Call(e)) => e,
        other => panic!("expected a call error, got {other:?}"),
    }
}

/// Waits (bounded) for an event that `pick` accepts.
fn wait_event<T>(
    events: &plugin_host::EventReceiver,
    limit: Duration,
    pick: impl Fn(&PluginEvent) -> Option<T>,
) -> T {
    run_with_limit(limit, async {
        loop {
            let event = events.recv().await.expect("event stream open");
            if let Some(found) = pick(&event) {
                return found;
            }
        }
    })
}

#[test]
fn a_pool_runs_every_instance_and_spreads_calls_over_them() {
    let plugin = pool(3);
    let status = plugin.status();
    assert_eq!(status.instances.len(), 3);
    let pids: Vec<u32> = status.instances.iter().map(|i| i.pid.unwrap()).collect();
    let mut unique = pids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3, "three distinct workers: {pids:?}");
    assert!(status
        .instances
        .iter()
        .all(|i| i.state == PluginState::Ready));

    // Nine slow calls at once: three per worker, so all three are busy at the same time.
    run(async {
        let calls: Vec<_> = (0..9)
            .map(|_| {
                let p = plugin.clone();
                smol::spawn(async move { p.call::<_, u64>("sleep", &json!({"ms": 300})).await })
            })
            .collect();
        smol::Timer::after(Duration::from_millis(150)).await;
        let busy: Vec<usize> = plugin
            .status()
            .instances
            .iter()
            .map(|i| i.in_flight)
            .collect();
        assert_eq!(busy, [3, 3, 3], "least-loaded routing spreads the calls");
        for call in calls {
            assert_eq!(call.await.unwrap(), 300);
        }
    });
}

#[test]
fn a_crash_in_a_pool_fails_only_that_workers_calls_and_the_pool_keeps_serving() {
    let plugin = pool(4);
    let events = plugin.subscribe();
    let (ok, failed) = run_with_limit(Duration::from_secs(90), async {
        // 64 concurrent callers, each making calls in a loop; one call segfaults its
        // worker mid-run.
        let callers: Vec<_> = (0..64)
            .map(|n| {
                let p = plugin.clone();
                smol::spawn(async move {
                    let mut outcomes = Vec::new();
                    for round in 0..6 {
                        if n == 7 && round == 2 {
                            let crashed = p
                                .call_raw("segfault", rmp_serde::to_vec(&()).unwrap())
                                .await;
                            assert!(
                                matches!(crashed, Err(Error::Call(CallError::Crashed { .. }))),
                                "the crashing call itself: {crashed:?}"
                            );
                            continue;
                        }
                        let out = p.call::<_, u64>("sleep", &json!({"ms": 20})).await;
                        outcomes.push(out);
                    }
                    outcomes
                })
            })
            .collect();
        let mut ok = 0;
        let mut failed = Vec::new();
        for caller in callers {
            for outcome in caller.await {
                match outcome {
                    Ok(20) => ok += 1,
                    Ok(other) => panic!("wrong answer {other}"),
                    Err(e) => failed.push(e),
                }
            }
        }
        (ok, failed)
    });
    // Only the calls running on the crashed worker at that moment (at most its
    // concurrency minus the crashing call) may fail, and only as `Crashed`.
    assert!(
        failed.len() <= 3,
        "{} innocent calls failed: {failed:?}",
        failed.len()
    );
    for e in &failed {
        assert!(
            matches!(e, Error::Call(CallError::Crashed { .. })),
            "collateral fails as Crashed: {e}"
        );
    }
    assert_eq!(ok + failed.len(), 64 * 6 - 1);
    let report = wait_event(&events, Duration::from_secs(10), |e| match e {
        PluginEvent::Crashed(r) => Some(r.clone()),
        _ => None,
    });
    assert_eq!(
        report.exit.as_ref().and_then(common::fault_name),
        Some(common::SEGFAULT)
    );
    wait_event(&events, Duration::from_secs(10), |e| {
        matches!(e, PluginEvent::Restarted { .. }).then_some(())
    });
    let status = plugin.status();
    assert_eq!(status.crashes, 1);
    assert_eq!(status.state, PluginState::Ready);
    assert!(wait_until(Duration::from_secs(10), || plugin
        .status()
        .instances
        .iter()
        .all(|i| i.state == PluginState::Ready)));
    assert_eq!(
        run(plugin.call_raw("echo", b"next".to_vec())).unwrap(),
        b"next"
    );
}

#[cfg(unix)]
#[test]
fn calls_waiting_for_a_slot_go_to_the_replacement_when_the_worker_dies() {
    // One worker running one call at a time: while it runs a call and is killed from
    // outside, three more calls wait in the host for its slot. They were never written to
    // the dying worker, so the replacement serves them.
    let mut m = manifest("faulty", Trust::Untrusted);
    m.limits.concurrency = 1;
    m.limits.queue = 0;
    m.restart.backoff = Duration::from_millis(10);
    let plugin = run(host().load_manifest(m)).unwrap();
    let pid = plugin.worker_pid().unwrap();
    let outcomes = run(async {
        let first = {
            let p = plugin.clone();
            smol::spawn(async move { p.call::<_, u64>("sleep", &json!({"ms": 2000})).await })
        };
        smol::Timer::after(Duration::from_millis(200)).await;
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let p = plugin.clone();
                smol::spawn(async move { p.call::<_, u64>("sleep", &json!({"ms": 10})).await })
            })
            .collect();
        smol::Timer::after(Duration::from_millis(100)).await;
        assert_eq!(
            plugin.status().instances[0].in_flight,
            1,
            "one call on the worker"
        );
        // SAFETY: sending a signal to our own child worker.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let first = first.await;
        let mut rest = Vec::new();
        for w in waiting {
            rest.push(w.await);
        }
        (first, rest)
    });
    assert!(
        matches!(outcomes.0, Err(Error::Call(CallError::Crashed { .. }))),
        "the call that was running fails: {:?}",
        outcomes.0
    );
    for r in outcomes.1 {
        assert_eq!(
            r.unwrap(),
            10,
            "a waiting call is served by the replacement"
        );
    }
    assert_ne!(plugin.worker_pid().unwrap(), pid);
}

#[test]
fn an_idle_worker_is_stopped_and_the_next_call_starts_it_again() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.idle_timeout = Some(Duration::from_millis(300));
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let pid = plugin.worker_pid().unwrap();
    assert_eq!(run(plugin.call_raw("echo", b"1".to_vec())).unwrap(), b"1");

    let (instance, idle_pid) = wait_event(&events, Duration::from_secs(10), |e| match e {
        PluginEvent::Idle { instance, pid } => Some((*instance, *pid)),
        _ => None,
    });
    assert_eq!((instance, idle_pid), (0, pid));
    #[cfg(target_os = "linux")]
    assert!(
        wait_until(Duration::from_secs(5), || !common::process_exists(pid)),
        "worker gone"
    );
    let status = plugin.status();
    assert_eq!(status.state, PluginState::Idle);
    assert_eq!(status.pid, None);
    assert_eq!(status.crashes, 0, "being idle is not a crash");

    assert_eq!(run(plugin.call_raw("echo", b"2".to_vec())).unwrap(), b"2");
    let woke = wait_event(&events, Duration::from_secs(5), |e| match e {
        PluginEvent::Woke { pid, .. } => Some(*pid),
        _ => None,
    });
    assert_eq!(plugin.worker_pid(), Some(woke));
    assert_ne!(woke, pid);
    assert_eq!(plugin.status().state, PluginState::Ready);
    assert_eq!(plugin.status().restarts, 0, "waking is not a restart");
}

#[test]
fn a_busy_worker_is_not_reclaimed_while_it_runs_a_call() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.idle_timeout = Some(Duration::from_millis(100));
    let plugin = run(host().load_manifest(m)).unwrap();
    let pid = plugin.worker_pid().unwrap();
    // One call far longer than the idle timeout.
    assert_eq!(
        run(plugin.call::<_, u64>("sleep", &json!({"ms": 600}))).unwrap(),
        600
    );
    assert_eq!(plugin.worker_pid(), Some(pid), "the same worker served it");
}

/// A private copy of the faulty library and a manifest pointing at it, so a test can
/// replace the file.
fn private_faulty(dir: &Path) -> (Manifest, PathBuf) {
    let file = Manifest::library_file_name("faulty");
    let library = dir.join(&file);
    std::fs::copy(common::artifacts().join(&file), &library).unwrap();
    let mut m = manifest("faulty", Trust::Untrusted);
    m.library = library.display().to_string();
    m.limits.concurrency = 8;
    (m, library)
}

/// Replaces `target` atomically with `source`'s bytes (a new file renamed over it).
fn replace_with(target: &Path, bytes: &[u8]) {
    let tmp = target.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, target).unwrap();
}

#[test]
fn a_reload_under_load_loses_no_call() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, library) = private_faulty(dir.path());
    m.instances = Some(2);
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let before: Vec<u32> = plugin
        .status()
        .instances
        .iter()
        .filter_map(|i| i.pid)
        .collect();
    let fresh = std::fs::read(&library).unwrap();

    let (ok, failed) = run_with_limit(Duration::from_secs(120), async {
        let callers: Vec<_> = (0..20)
            .map(|n| {
                let p = plugin.clone();
                smol::spawn(async move {
                    let mut results = Vec::new();
                    for i in 0..50 {
                        let input = format!("{n}-{i}").into_bytes();
                        let out = p.call_raw("echo", input.clone()).await;
                        results.push(out.map(|o| o == input));
                    }
                    results
                })
            })
            .collect();
        smol::Timer::after(Duration::from_millis(30)).await;
        replace_with(&library, &fresh);
        plugin.reload().await.expect("reload");
        let mut ok = 0;
        let mut failed = Vec::new();
        for c in callers {
            for r in c.await {
                match r {
                    Ok(true) => ok += 1,
                    Ok(false) => panic!("a wrong echo"),
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        (ok, failed)
    });
    assert!(
        failed.is_empty(),
        "calls failed across the reload: {failed:?}"
    );
    assert_eq!(ok, 1000);
    let version = wait_event(&events, Duration::from_secs(5), |e| match e {
        PluginEvent::Reloaded { version } => Some(version.clone()),
        _ => None,
    });
    assert_eq!(version, plugin.version());
    let after: Vec<u32> = plugin
        .status()
        .instances
        .iter()
        .filter_map(|i| i.pid)
        .collect();
    assert_eq!(after.len(), 2);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "new workers: {before:?} -> {after:?}"
    );
    #[cfg(target_os = "linux")]
    for old in before {
        assert!(
            wait_until(Duration::from_secs(10), || !common::process_exists(old)),
            "old worker {old} exits"
        );
    }
    assert_eq!(plugin.status().crashes, 0, "a reload is not a crash");
}

#[test]
fn a_reload_to_a_broken_library_keeps_the_old_one_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (m, library) = private_faulty(dir.path());
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let pid = plugin.worker_pid().unwrap();
    replace_with(&library, b"this is not a shared library");
    let err = run(plugin.reload()).unwrap_err();
    assert!(
        matches!(err, Error::Load(LoadError::NotALibrary { .. })),
        "the load error: {err}"
    );
    let reported = wait_event(&events, Duration::from_secs(5), |e| match e {
        PluginEvent::ReloadFailed { error } => Some(error.clone()),
        _ => None,
    });
    assert!(reported.contains("faulty"), "{reported}");
    assert_eq!(plugin.worker_pid(), Some(pid), "the old worker still runs");
    assert_eq!(
        run(plugin.call_raw("echo", b"still".to_vec())).unwrap(),
        b"still"
    );
    assert_eq!(plugin.status().crashes, 0);
}

#[test]
fn a_watched_library_is_reloaded_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (m, library) = private_faulty(dir.path());
    let watching = plugin_host::Host::builder()
        .worker_shim(common::worker_shim())
        .grant_requested()
        .watch_every(Duration::from_millis(50))
        .build()
        .unwrap();
    let plugin = run(watching.load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let pid = plugin.worker_pid().unwrap();
    let bytes = std::fs::read(&library).unwrap();
    replace_with(&library, &bytes);
    wait_event(&events, Duration::from_secs(10), |e| {
        matches!(e, PluginEvent::Reloaded { .. }).then_some(())
    });
    assert_ne!(plugin.worker_pid(), Some(pid));
    assert_eq!(run(plugin.call_raw("echo", b"w".to_vec())).unwrap(), b"w");

    // A broken replacement is reported and the running library keeps serving.
    let pid = plugin.worker_pid().unwrap();
    replace_with(&library, b"garbage");
    wait_event(&events, Duration::from_secs(10), |e| {
        matches!(e, PluginEvent::ReloadFailed { .. }).then_some(())
    });
    assert_eq!(plugin.worker_pid(), Some(pid));
    assert_eq!(run(plugin.call_raw("echo", b"x".to_vec())).unwrap(), b"x");
}

#[test]
fn a_trusted_plugin_says_it_cannot_be_reloaded() {
    let plugin = run(host().load_manifest(manifest("faulty", Trust::Trusted))).unwrap();
    let err = run(plugin.reload()).unwrap_err();
    match err {
        Error::Load(LoadError::ReloadUnsupported {
            plugin: name,
            reason,
        }) => {
            assert_eq!(name, "faulty");
            assert!(reason.contains("in-process"), "{reason}");
        }
        other => panic!("expected ReloadUnsupported, got {other}"),
    }
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");
}

/// Cancelling from another thread, on both backends: the caller gets `Cancelled` at
/// once, the plugin sees `is_cancelled`, and the plugin serves the next call.
#[test]
fn a_cancel_handle_cancels_a_running_call_on_every_backend() {
    for trust in [Trust::Untrusted, Trust::Trusted] {
        let plugin = run(host().load_manifest(manifest("faulty", trust))).unwrap();
        let handle = CancelHandle::new();
        let canceller = handle.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            canceller.cancel();
        });
        let started = std::time::Instant::now();
        let result = run(plugin.call_with::<_, u64>(
            "sleep",
            &json!({"ms": 5000, "cooperative": true}),
            CallOptions::new().cancel(&handle),
        ));
        thread.join().unwrap();
        match result {
            Err(Error::Call(CallError::Cancelled {
                plugin: name,
                method,
            })) => {
                assert_eq!((name.as_str(), method.as_str()), ("faulty", "sleep"))
            }
            other => panic!("{trust:?}: expected Cancelled, got {other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{trust:?}: returned at cancel"
        );
        // The cooperative plugin stopped: the next call is served at once, by the same
        // worker (no kill was needed).
        let pid = plugin.worker_pid();
        assert_eq!(
            run(plugin.call_raw("echo", b"next".to_vec())).unwrap(),
            b"next"
        );
        assert_eq!(plugin.worker_pid(), pid, "{trust:?}");
        assert_eq!(plugin.status().crashes, 0);

        // A handle cancelled before the call: the call never runs.
        let err = call_error(run(plugin.call_raw_with(
            "echo",
            b"x".to_vec(),
            CallOptions::new().cancel(&handle),
        )));
        assert!(
            matches!(err, CallError::Cancelled { .. }),
            "{trust:?}: {err}"
        );
    }
}

#[test]
fn a_cancelled_call_the_plugin_ignores_ends_its_worker_after_the_grace() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.timeouts.cancel_grace = Duration::from_millis(200);
    m.restart.backoff = Duration::from_millis(10);
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let pid = plugin.worker_pid().unwrap();
    let handle = CancelHandle::new();
    let canceller = handle.clone();
    let err = run(async {
        let call = plugin.call_raw_with(
            "infinite_loop",
            rmp_serde::to_vec(&()).unwrap(),
            CallOptions::new().cancel(&handle),
        );
        futures_lite::future::or(call, async {
            smol::Timer::after(Duration::from_millis(100)).await;
            canceller.cancel();
            std::future::pending().await
        })
        .await
    });
    assert!(matches!(call_error(err), CallError::Cancelled { .. }));
    let report = wait_event(&events, Duration::from_secs(10), |e| match e {
        PluginEvent::Crashed(r) => Some(r.clone()),
        _ => None,
    });
    assert!(
        report
            .killed_by_host
            .as_deref()
            .is_some_and(|w| w.contains("cancelled")),
        "{report:?}"
    );
    assert!(wait_until(Duration::from_secs(10), || plugin
        .worker_pid()
        .is_some_and(|p| p != pid)));
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");
}

#[test]
fn dropping_a_call_tells_a_trusted_plugin_too() {
    // The in-process backend sets `is_cancelled` when the call's future is dropped, as the
    // isolated one does: a cooperative plugin stops early and the next call is served.
    let plugin = run(host().load_manifest(manifest("faulty", Trust::Trusted))).unwrap();
    run(async {
        let input = json!({"ms": 3000, "cooperative": true});
        let call = plugin.call::<_, u64>("sleep", &input);
        let _ = futures_lite::future::or(async { Some(call.await) }, async {
            smol::Timer::after(Duration::from_millis(50)).await;
            None
        })
        .await;
    });
    assert!(
        wait_until(Duration::from_secs(2), || plugin.status().instances[0]
            .in_flight
            == 0),
        "the plugin saw is_cancelled and returned well before its 3 s"
    );
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");
}
