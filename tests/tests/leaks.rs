//! 100 cycles of load / crash / restart / shutdown leave no zombie children, no extra open
//! file descriptors and no socket files. Alone in its binary so no other test's processes
//! or descriptors blur the counts.
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{host, manifest, run, wait_until};
use plugin_host::{CallError, Error, Trust};

/// Children of this process that are zombies.
fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 1 && fields[1] == me && fields[0] == "Z" {
            zombies.push(pid);
        }
    }
    zombies
}

/// Children of this process, in any state.
fn children() -> usize {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, r)| r.split_whitespace().nth(1) == Some(&me))
                })
                .unwrap_or(false)
        })
        .count()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn socket_files() -> usize {
    let tmp = std::env::temp_dir();
    std::fs::read_dir(tmp)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("plugin-host-"))
                .count()
        })
        .unwrap_or(0)
}

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
        wait_until(Duration::from_secs(5), || children() == 0),
        "warm-up workers reaped"
    );
    let fds_before = open_fds();
    let sockets_before = socket_files();
    for _ in 0..100 {
        cycle();
    }
    assert!(
        wait_until(Duration::from_secs(10), || children() == 0),
        "workers left behind: {} children, zombies {:?}",
        children(),
        zombie_children()
    );
    assert!(zombie_children().is_empty());
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
