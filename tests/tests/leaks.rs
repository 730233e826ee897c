//! 100 cycles of load / crash / restart / shutdown leave no zombie children, no extra open
//! file descriptors and no socket files. Alone in its binary so no other test's processes
//! or descriptors blur the counts.
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{children, host, manifest, open_fds, run, socket_files, wait_until};
use plugin_host::{CallError, Error, Trust};

fn cycle() {
    let mut m = manifest("faulty", Trust::Untrusted);
    m.restart.backoff = Duration::from_millis(5);
    m.restart.max_crashes = 1000;
    let plugin = run(host().load_manifest(m)).unwrap();
    let err = run(plugin.call::<_, ()>("abort", &())).unwrap_err();
    assert!(
        matches!(err, Error::Call(CallError::Crashed { .. })),
        "{err}"
    );
    assert_eq!(run(plugin.call_raw("echo", b"x".to_vec())).unwrap(), b"x");
    run(plugin.shutdown());
}

#[test]
fn a_hundred_load_crash_shutdown_cycles_leak_nothing() {
    // Warm up: the first cycle starts the async runtime's long-lived threads and fds.
    cycle();
    assert!(
        wait_until(Duration::from_secs(5), || children().is_empty()),
        "warm-up workers reaped"
    );
    let fds_before = open_fds();
    let sockets_before = socket_files();
    for _ in 0..100 {
        cycle();
    }
    assert!(
        wait_until(Duration::from_secs(10), || children().is_empty()),
        "workers left behind (pid, state): {:?}",
        children()
    );
    assert!(
        wait_until(Duration::from_secs(5), || open_fds() <= fds_before),
        "open fds: {} before, {} after",
        fds_before,
        open_fds()
    );
    assert_eq!(
        socket_files(),
        sockets_before,
        "socket files left in the temp dir"
    );
}
