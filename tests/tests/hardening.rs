//! Hardening regressions (issue 8, defects 1 to 5): whatever a worker prints, logs or
//! returns, the host's memory stays bounded and the worker's other calls live on; every
//! failed call is counted; a process a plugin detaches still dies with its worker when the
//! sandbox is off.
//!
//! The tests here measure this process's peak memory (`VmHWM`), so they run one at a time
//! (see [`serial`]). In its own binary because it installs a global `tracing` subscriber.
#![cfg(target_os = "linux")]

mod common;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{
    artifacts, descendants, host, install_attack, manifest, peak_memory, processes_named,
    reset_peak_memory, run, wait_until, worker_shim,
};
use plugin_host::{
    CallError, CallOptions, CrashReport, Error, Grant, Host, Manifest, Plugin, PluginEvent,
    SandboxMode, Trust,
};
use serde_json::json;

const MIB: u64 = 1 << 20;
/// What the host keeps of one stderr line (documented in docs/security.md), plus the
/// marker's room.
const LINE_BOUND: usize = 4096 + 64;
/// What the host keeps of a worker's stderr in all.
const TAIL_BOUND: usize = 64 << 10;
/// What the worker sends of one log or progress message, plus the marker's room.
const MESSAGE_BOUND: usize = (16 << 10) + 64;

/// One test at a time: they measure the whole process's peak memory.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Log lines that mention a `huge-log:` message (others are formatted and dropped).
fn captured() -> common::Logs {
    common::capture_logs(tracing::Level::INFO, Some("huge-log:"))
}

fn faulty(edit: impl FnOnce(&mut Manifest)) -> Plugin {
    let _ = captured();
    let mut m = manifest("faulty", Trust::Untrusted);
    edit(&mut m);
    run(host().load_manifest(m)).unwrap()
}

fn crash_of(err: &Error) -> &CrashReport {
    match err {
        Error::Call(CallError::Crashed { report, .. }) => report,
        other => panic!("expected Crashed, got {other}"),
    }
}

/// The stderr tail of a report: (total bytes, longest line).
fn tail_size(report: &CrashReport) -> (usize, usize) {
    let total = report.stderr_tail.iter().map(String::len).sum();
    let longest = report
        .stderr_tail
        .iter()
        .map(String::len)
        .max()
        .unwrap_or(0);
    (total, longest)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

// ---- defect 1: stderr ------------------------------------------------------------------

#[test]
fn a_stderr_flood_without_newlines_keeps_host_memory_flat() {
    let _serial = serial();
    let plugin = faulty(|_| {});
    let pid = plugin.worker_pid();
    // Warm up (threads, buffers), then measure 100 MiB written as one line.
    let _: usize = run(plugin.call("stderr_flood", &json!({"bytes": 1 << 20}))).unwrap();
    let before = reset_peak_memory();
    let written: usize = run(plugin.call("stderr_flood", &json!({"bytes": 100 << 20}))).unwrap();
    assert_eq!(written, 100 << 20);
    // The call returns once the pipe took the last write; let the reader finish.
    std::thread::sleep(Duration::from_millis(300));
    let growth = peak_memory().saturating_sub(before);
    eprintln!(
        "100 MiB on stderr without a newline: host peak grew by {:.1} MiB",
        mib(growth)
    );
    assert!(
        growth < 20 * MIB,
        "the host grew by {:.1} MiB for 100 MiB of stderr",
        mib(growth)
    );
    assert_eq!(plugin.worker_pid(), pid);

    // The worker then dies: the line is in its report, cut and marked.
    let err = run(plugin.call::<_, ()>("abort", &json!({}))).unwrap_err();
    let report = crash_of(&err);
    let (total, longest) = tail_size(report);
    eprintln!("report stderr tail: {total} bytes, longest line {longest} bytes");
    assert!(longest <= LINE_BOUND, "a line of {longest} bytes was kept");
    assert!(total <= TAIL_BOUND, "a tail of {total} bytes was kept");
    assert!(
        report
            .stderr_tail
            .iter()
            .any(|l| l.starts_with("xxxx") && l.ends_with("bytes cut]")),
        "the cut line is marked: {:?}",
        report
            .stderr_tail
            .iter()
            .map(|l| &l[l.len().saturating_sub(40)..])
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_crash_after_a_stderr_flood_with_eight_calls_in_flight_shares_one_bounded_report() {
    let _serial = serial();
    let plugin = faulty(|m| {
        m.limits.concurrency = 8;
        m.limits.stderr_lines = 10_000;
    });
    let _: usize = run(plugin.call("stderr_flood", &json!({"bytes": 1 << 20}))).unwrap();
    let before = reset_peak_memory();
    let errors: Vec<Error> = run(async {
        let mut calls = Vec::new();
        for _ in 0..7 {
            let p = plugin.clone();
            calls.push(smol::spawn(async move {
                p.call::<_, u64>("sleep", &json!({"ms": 8000}))
                    .await
                    .map(drop)
            }));
        }
        smol::Timer::after(Duration::from_millis(300)).await;
        // 4 MiB of short lines (more than 64 KiB in 10,000 lines), then 32 MiB on one
        // line, then abort.
        let lines = json!({"bytes": 4 << 20, "newline": true});
        let short = plugin.call::<_, usize>("stderr_flood", &lines);
        let mut results = vec![short.await.map(drop)];
        let one_line = json!({"bytes": 32 << 20, "abort": true});
        results.push(
            plugin
                .call::<_, usize>("stderr_flood", &one_line)
                .await
                .map(drop),
        );
        for call in calls {
            results.push(call.await);
        }
        results.into_iter().filter_map(Result::err).collect()
    });
    let growth = peak_memory().saturating_sub(before);
    eprintln!(
        "36 MiB on stderr then a crash with 8 calls in flight: host peak grew by {:.1} MiB",
        mib(growth)
    );
    assert_eq!(errors.len(), 8, "{errors:?}");
    let reports: Vec<&CrashReport> = errors.iter().map(crash_of).collect();
    let (total, longest) = tail_size(reports[0]);
    eprintln!("report stderr tail: {total} bytes, longest line {longest} bytes");
    for report in &reports {
        let (total, longest) = tail_size(report);
        assert!(longest <= LINE_BOUND, "a line of {longest} bytes was kept");
        assert!(total <= TAIL_BOUND, "a tail of {total} bytes was kept");
    }
    assert!(growth < 20 * MIB, "the host grew by {:.1} MiB", mib(growth));
    // One report, shared by every call that was on the worker.
    assert!(
        reports.iter().all(|r| std::ptr::eq(*r, reports[0])),
        "each call got its own copy of the report"
    );
    let last = plugin.status().last_crash.unwrap();
    assert!(std::ptr::eq(&*last, reports[0]), "the status has a copy");
}

// ---- defect 2: output lengths ----------------------------------------------------------

/// The attack plugin (C) with the default policy: untrusted, sandboxed.
fn attack(dir: &std::path::Path, trust: Trust) -> Plugin {
    let mut m = install_attack(dir);
    m.trust = trust;
    let host = match trust {
        Trust::Trusted => host(),
        Trust::Untrusted => Host::builder()
            .search_path(artifacts())
            .worker_shim(worker_shim())
            .build()
            .unwrap(),
    };
    run(host.load_manifest(m)).unwrap()
}

fn is_bad_output(result: &Result<Vec<u8>, Error>) -> bool {
    matches!(result, Err(Error::Call(CallError::BadOutput { .. })))
}

#[test]
fn an_output_length_near_usize_max_is_bad_output_and_the_worker_lives_on() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let plugin = attack(dir.path(), Trust::Untrusted);
    let pid = plugin.worker_pid();
    for len in [
        u64::MAX.to_string(),
        (1u64 << 63).to_string(),
        (u64::MAX - 1023).to_string(),
        (1u64 << 40).to_string(),
    ] {
        let result = run(plugin.call_raw("bogus_output", len.clone().into_bytes()));
        assert!(is_bad_output(&result), "len {len}: {result:?}");
        assert_eq!(plugin.worker_pid(), pid, "len {len}: the worker died");
        let pong = run(plugin.call_raw("ping", Vec::new())).unwrap();
        assert_eq!(pong, b"pong");
    }
    assert_eq!(plugin.status().crashes, 0);

    // The same from a Rust plugin, with another call in flight on the same worker.
    let plugin = faulty(|_| {});
    let pid = plugin.worker_pid();
    run(async {
        let p = plugin.clone();
        let sleeping =
            smol::spawn(async move { p.call::<_, u64>("sleep", &json!({"ms": 1500})).await });
        smol::Timer::after(Duration::from_millis(200)).await;
        for len in [u64::MAX, 1 << 63] {
            let result = plugin
                .call::<_, ()>("bogus_output", &json!({"len": len}))
                .await;
            assert!(
                matches!(result, Err(Error::Call(CallError::BadOutput { .. }))),
                "len {len}: {result:?}"
            );
        }
        assert_eq!(sleeping.await.unwrap(), 1500, "the call in flight finished");
    });
    assert_eq!(plugin.worker_pid(), pid);
    assert_eq!(plugin.status().crashes, 0);
}

#[test]
fn an_output_length_near_usize_max_is_bad_output_in_process() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let plugin = attack(dir.path(), Trust::Trusted);
    assert_eq!(plugin.worker_pid(), None, "runs in-process");
    for len in [u64::MAX, 1 << 63] {
        let result = run(plugin.call_raw("bogus_output", len.to_string().into_bytes()));
        assert!(is_bad_output(&result), "len {len}: {result:?}");
    }
    assert_eq!(
        run(plugin.call_raw("ping", Vec::new())).unwrap(),
        b"pong".to_vec()
    );
}

// ---- defect 3: huge log and progress messages -------------------------------------------

#[test]
fn a_huge_log_or_progress_message_is_truncated_not_fatal() {
    let _serial = serial();
    let captured = captured();
    let plugin = faulty(|_| {});
    let pid = plugin.worker_pid();
    let progress = Arc::new(Mutex::new(Vec::new()));
    let seen = progress.clone();
    let options = CallOptions::new().on_progress(move |p| seen.lock().unwrap().push(p.message));
    let bytes = 70_000_000usize;
    let input = json!({"bytes": bytes, "progress": true});
    let n: usize = run(plugin.call_with("huge_log", &input, options)).unwrap();
    assert_eq!(n, bytes);
    assert_eq!(plugin.worker_pid(), pid);
    assert_eq!(plugin.status().crashes, 0);
    let progress = progress.lock().unwrap().clone();
    assert_eq!(progress.len(), 1, "one progress report");
    let message = &progress[0];
    assert!(
        message.len() <= MESSAGE_BOUND && message.starts_with("huge-log:yyyy"),
        "progress message of {} bytes",
        message.len()
    );
    assert!(
        message.ends_with("bytes cut]"),
        "{}",
        &message[message.len() - 40..]
    );
    assert!(
        wait_until(Duration::from_secs(5), || !captured.lines().is_empty()),
        "the log line reached tracing"
    );
    let lines = captured.lines();
    let line = &lines[0];
    assert!(
        line.len() <= MESSAGE_BOUND + 200,
        "a log line of {} bytes",
        line.len()
    );
    assert!(
        line.contains("bytes cut]"),
        "{}",
        &line[line.len().saturating_sub(60)..]
    );
}

// ---- defect 4: status().failures ---------------------------------------------------------

/// An input that cannot be encoded.
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this input cannot be encoded"))
    }
}

/// What a case does, a call that fails, and the kind of error it must fail with.
type Case<'a> = (
    &'static str,
    Box<dyn Fn() -> Result<(), Error> + 'a>,
    fn(&Error) -> bool,
);

#[test]
fn every_failed_call_is_counted_once_whatever_its_kind() {
    let _serial = serial();
    let plugin = faulty(|_| {});
    let counts = || {
        let s = plugin.status();
        (s.calls, s.failures)
    };
    let cases: Vec<Case<'_>> = vec![
        (
            "an output that does not decode into the type asked for",
            Box::new(|| run(plugin.call::<_, String>("sleep", &json!({"ms": 1}))).map(drop)),
            |e| matches!(e, Error::Call(CallError::Decode { .. })),
        ),
        (
            "an input that cannot be encoded",
            Box::new(|| run(plugin.call::<_, ()>("echo", &Unencodable))),
            |e| matches!(e, Error::Call(CallError::Encode { .. })),
        ),
        (
            "a timeout",
            Box::new(|| {
                let options = CallOptions::new().timeout(Duration::from_millis(100));
                let input = json!({"ms": 1000, "cooperative": true});
                run(plugin.call_with::<_, u64>("sleep", &input, options)).map(drop)
            }),
            |e| matches!(e, Error::Call(CallError::Timeout { .. })),
        ),
        (
            "a plugin error",
            Box::new(|| run(plugin.call::<_, ()>("fail", &json!({})))),
            |e| matches!(e, Error::Call(CallError::Plugin { .. })),
        ),
        (
            "an unknown method",
            Box::new(|| run(plugin.call::<_, ()>("no_such_method", &json!({})))),
            |e| matches!(e, Error::Call(CallError::UnknownMethod { .. })),
        ),
        (
            "a crash",
            Box::new(|| run(plugin.call::<_, ()>("abort", &json!({})))),
            |e| matches!(e, Error::Call(CallError::Crashed { .. })),
        ),
        (
            "a raw call's plugin error",
            Box::new(|| {
                let input = rmp_serde::to_vec_named(&json!({})).unwrap();
                run(plugin.call_raw("fail", input)).map(drop)
            }),
            |e| matches!(e, Error::Call(CallError::Plugin { .. })),
        ),
    ];
    for (what, call, kind) in &cases {
        let (calls, failures) = counts();
        let result = call();
        assert!(result.as_ref().is_err_and(kind), "{what}: {result:?}");
        let (calls_after, failures_after) = counts();
        assert_eq!(failures_after - failures, 1, "{what}: failures counted");
        assert_eq!(calls_after - calls, 1, "{what}: calls counted");
    }
    // A success counts a call and no failure.
    let (calls, failures) = counts();
    let _: u64 = run(plugin.call("sleep", &json!({"ms": 1}))).unwrap();
    assert_eq!(counts(), (calls + 1, failures));
}

// ---- defect 5: orphans with the sandbox off ----------------------------------------------

/// SIGKILLs, on drop, processes left behind under this name.
struct KillByName(String);

impl Drop for KillByName {
    fn drop(&mut self) {
        for pid in processes_named(&self.0) {
            // SAFETY: kill takes no pointers; the pid carries our test's unique tag.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

#[test]
fn with_the_sandbox_off_an_orphan_holding_stderr_dies_with_its_worker_and_delays_nothing() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let host = Host::builder()
        .search_path(artifacts())
        .worker_shim(worker_shim())
        .permissions(|_| Grant {
            sandbox: SandboxMode::Off,
            ..Grant::deny_all()
        })
        .build()
        .unwrap();
    let plugin = run(host.load_manifest(install_attack(dir.path()))).unwrap();
    assert_eq!(plugin.grant().sandbox, SandboxMode::Off);
    let relay = plugin.worker_pid().unwrap();
    let tag = format!("{:08x}", std::process::id() ^ 0x5a5a_0000);
    let name = format!("orph-{tag}");
    let _cleanup = KillByName(name.clone());
    let out = run(plugin.call_raw("spawn_orphan_stderr", tag.into_bytes())).unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.starts_with("ok:"), "{out}");
    assert!(
        wait_until(Duration::from_secs(5), || !processes_named(&name)
            .is_empty()),
        "no process named {name}"
    );
    let orphan = processes_named(&name)[0];
    let in_tree = descendants(relay).contains(&orphan);

    // The worker dies; the orphan (which holds the stderr pipe) must not delay the report.
    let events = plugin.subscribe();
    let killed = Instant::now();
    // SAFETY: kill takes no pointers; `relay` is our plugin's worker.
    unsafe { libc::kill(relay as libc::pid_t, libc::SIGKILL) };
    let report = run(async {
        loop {
            if let PluginEvent::Crashed(report) = events.recv().await.unwrap() {
                return report;
            }
        }
    });
    let detected = killed.elapsed();
    eprintln!("crash detected {detected:?} after the kill");
    assert!(report.exit.is_some(), "{report}");
    assert!(
        detected < Duration::from_millis(300),
        "the crash report took {detected:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || processes_named(&name).is_empty()),
        "{name} outlived its worker"
    );
    assert!(in_tree, "the orphan {orphan} left the worker's tree");
    drop(plugin);
}
