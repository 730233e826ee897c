//! Plugin logs and worker stderr reach the host's `tracing` output with the plugin's name.
//! Alone in its binary because it installs a global subscriber.
#![cfg(target_os = "linux")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{host, manifest, run, wait_until};
use plugin_host::Trust;
use serde_json::json;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[test]
fn plugin_logs_and_worker_stderr_reach_tracing_with_the_plugin_name() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

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
