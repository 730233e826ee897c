//! Plugin logs and worker stderr reach the host's `tracing` output with the plugin's name,
//! and cannot pass for the host's own lines. In its own binary because it installs a
//! global subscriber (once, shared by the tests here).
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{artifacts, host, install_attack, manifest, run, wait_until, worker_shim};
use plugin_host::{Host, Trust};
use serde_json::json;

/// Everything logged in this process.
fn captured() -> common::Logs {
    common::capture_logs(tracing::Level::DEBUG, None)
}

#[test]
fn plugin_logs_and_worker_stderr_reach_tracing_with_the_plugin_name() {
    let captured = captured();

    // A log call from create(), in a worker process.
    let hello = run(host().load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    // A log call from a method.
    let faulty = run(host().load_manifest(manifest("faulty", Trust::Untrusted))).unwrap();
    let n: u32 = run(faulty.call("progress", &json!({"steps": 3}))).unwrap();
    assert_eq!(n, 3);
    // A panic's stderr output.
    let _ = run(faulty.call::<_, ()>("panic", &json!({"message": "to stderr"})));

    let logged = |needle: &str| {
        wait_until(Duration::from_secs(5), || {
            captured
                .text()
                .lines()
                .any(|l| l.contains(needle) && l.contains("plugin=") && l.contains(needle))
        })
    };
    assert!(
        logged("created with greeting \"Hello\""),
        "{}",
        captured.text()
    );
    assert!(logged("reported 3 steps"), "{}", captured.text());
    assert!(logged("to stderr"), "{}", captured.text());
    let text = captured.text();
    let line = text
        .lines()
        .find(|l| l.contains("reported 3 steps"))
        .unwrap();
    assert!(
        line.contains("plugin=faulty") && line.contains("INFO"),
        "{line}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("created with greeting"))
        .unwrap();
    assert!(line.contains("plugin=hello"), "{line}");
    drop(hello);
}

#[test]
fn plugin_log_lines_cannot_forge_host_lines() {
    let captured = captured();
    let dir = tempfile::tempdir().unwrap();
    let host = Host::builder()
        .search_path(artifacts())
        .worker_shim(worker_shim())
        .build()
        .unwrap();
    // The attack plugin logs "innocent line\nERROR forged host line\x1b[31m" (a newline
    // and an ANSI escape) and reports progress with the same tricks.
    let plugin = run(host.load_manifest(install_attack(dir.path()))).unwrap();
    let out = run(plugin.call_raw("log_forge", Vec::new())).unwrap();
    assert_eq!(out, b"ok: logged");

    assert!(
        wait_until(Duration::from_secs(5), || captured
            .text()
            .contains("innocent line")),
        "{}",
        captured.text()
    );
    let text = captured.text();
    let line = text.lines().find(|l| l.contains("innocent line")).unwrap();
    println!("the plugin's line: {line}");
    assert!(line.contains("plugin=attack"), "{line}");
    // The newline is shown escaped, on the plugin's own line...
    assert!(
        line.contains(r"innocent line\nERROR forged host line"),
        "the newline is not escaped: {line}"
    );
    // ... and so is the escape sequence.
    assert!(
        [r"\x1b[31m", r"\u{1b}[31m", r"\e[31m"]
            .iter()
            .any(|escaped| line.contains(escaped)),
        "the escape character is not escaped: {line}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.trim_start().starts_with("ERROR forged")),
        "a plugin forged a host line:\n{text}"
    );
    assert!(
        !text.contains('\x1b'),
        "a raw escape character reached the log:\n{text}"
    );
    drop(plugin);
}
