//! The host's kill is what a killed worker's report says: a worker the host kills after a
//! missed deadline fails the calls in flight with `Killed`, and its report says SIGKILL,
//! killed by the host (with the reason), never the clean exit (code 0) its plugin process
//! reaches when it notices its connection was cut; and the plugin serves the next call.
//! With the sandbox on and off, over several rounds (`KILL_CAUSE_ROUNDS`, default 10),
//! since a wrong cause would come from a race (reported on a loaded machine).
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{host, manifest, run_with_limit};
use plugin_host::{CallError, CallOptions, Error, Plugin, SandboxMode, Trust};
use serde_json::json;

fn rounds() -> usize {
    std::env::var("KILL_CAUSE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

fn plugin(sandbox: SandboxMode) -> Plugin {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.sandbox = sandbox;
    m.limits.concurrency = 4;
    m.timeouts.cancel_grace = Duration::from_millis(100);
    m.restart.max_crashes = 10_000;
    m.restart.backoff = Duration::from_millis(10);
    m.restart.backoff_max = Duration::from_millis(10);
    let plugin = run_with_limit(Duration::from_secs(60), host().load_manifest(m)).unwrap();
    assert_eq!(plugin.grant().sandbox, sandbox);
    plugin
}

/// One round: an innocent call is in flight while another spins past its deadline; the
/// host kills the worker. Returns what was wrong, if anything.
fn round(plugin: &Plugin) -> Result<(), String> {
    let (spun, result) = run_with_limit(Duration::from_secs(60), async {
        let input = json!({"ms": 30_000});
        let mut innocent = Box::pin(plugin.call::<_, u64>("sleep", &input));
        // One poll registers (and sends) it on the live worker: it is in flight from now on,
        // whatever the order the worker reads the two calls in.
        if let Some(done) = futures_lite::future::poll_once(&mut innocent).await {
            return (None, done);
        }
        let options = CallOptions::new().timeout(Duration::from_millis(100));
        let spun = plugin
            .call_with::<_, ()>("infinite_loop", &json!(null), options)
            .await;
        (Some(spun), innocent.await)
    });
    match spun {
        Some(Err(Error::Call(CallError::Timeout { .. }))) => {}
        None => return Err(format!("the innocent call ended at once: {result:?}")),
        Some(other) => {
            return Err(format!(
                "the spinning call: expected Timeout, got {other:?}"
            ))
        }
    }
    let report = match &result {
        Err(Error::Call(CallError::Killed { report, .. })) => report.clone(),
        other => return Err(format!("the innocent call: expected Killed, got {other:?}")),
    };
    let mut wrong = Vec::new();
    let signal = report.exit.as_ref().and_then(|e| e.signal_name());
    if signal != Some("SIGKILL") {
        wrong.push(format!("exit {:?}", report.exit));
    }
    if !report
        .killed_by_host
        .as_deref()
        .is_some_and(|why| why.contains("infinite_loop") && why.contains("deadline"))
    {
        wrong.push(format!("killed_by_host {:?}", report.killed_by_host));
    }
    if !report.in_flight.iter().any(|m| m == "sleep") {
        wrong.push(format!("in flight {:?}", report.in_flight));
    }
    if report.outside_signal {
        wrong.push("blamed on an outside signal".into());
    }
    let served = run_with_limit(
        Duration::from_secs(60),
        plugin.call_raw("echo", b"next".to_vec()),
    );
    if served.as_deref().ok() != Some(&b"next"[..]) {
        wrong.push(format!("the next call: {served:?}"));
    }
    match wrong.is_empty() {
        true => Ok(()),
        false => Err(format!("{}\n  report: {report}", wrong.join("; "))),
    }
}

fn check(sandbox: SandboxMode) {
    let plugin = plugin(sandbox);
    let n = rounds();
    let failures: Vec<String> = (0..n)
        .filter_map(|i| round(&plugin).err().map(|e| format!("round {i}: {e}")))
        .collect();
    run_with_limit(Duration::from_secs(30), plugin.shutdown());
    assert!(
        failures.is_empty(),
        "{} of {n} rounds wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_worker_killed_past_its_deadline_is_reported_as_sigkill() {
    check(SandboxMode::Required);
}

#[test]
fn a_worker_killed_past_its_deadline_is_reported_as_sigkill_without_sandbox() {
    check(SandboxMode::Off);
}
