//! A shorter chaos soak in CI: `plugin-host soak` with random faults at about 2% checks
//! that every call is answered, no reply is misrouted (echo bytes and sleep values are
//! verified), restarts match crashes, no process or descriptor leaks, no setsid grandchild
//! survives (the attack plugin's `spawn_orphan_stderr`, then the worker killed), and the
//! host's peak memory stays within the soak's 20 MiB budget. The soak runs
//! in its own process, so its leak counts are exact; this test also checks that process
//! exits normally rather than by a signal.
#![cfg(target_os = "linux")]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn a_short_chaos_soak_passes() {
    let mut child = Command::new(common::artifacts().join("plugin-host"))
        .args(["soak", "--calls", "1500", "--seed", "42", "--attack"])
        .arg(env!("ATTACK_LIBRARY"))
        .current_dir(common::repo())
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    if !common::wait_until(Duration::from_secs(240), || {
        child.try_wait().unwrap().is_some()
    }) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the soak did not finish");
    }
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(
        out.contains("answered:          1500 of 1500 (each exactly once: true)"),
        "{out}"
    );
    assert!(out.contains("unexpected:        0"), "{out}");
    assert!(out.contains("soak passed"), "{out}");
    // The setsid grandchild fault ran (the attack plugin was given) and left nothing; the
    // host's peak memory growth is reported (and held under the default 20 MiB budget).
    assert!(out.contains("setsid grandchildren left: 0"), "{out}");
    assert!(out.contains("grandchildren spawned"), "{out}");
    assert!(out.contains("host memory:       peak RSS +"), "{out}");
    let faults: u32 = out
        .split(" faults injected")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap();
    assert!(
        faults > 10,
        "about 2% of 1500 calls inject a fault: {faults}"
    );
}
