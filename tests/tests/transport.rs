//! The transport between the host and a worker: shared memory by default (Linux), the
//! socket on request or as the fallback, the same answers either way. (The rest of the
//! suite runs on whichever `PLUGIN_HOST_TRANSPORT` picks; CI runs the conformance tests
//! once per transport.)
#![cfg(target_os = "linux")]

mod common;

use std::time::Duration;

use common::{descendants, run_with_limit, script, worker_shim};
use plugin_host::{Host, Plugin, Transport, Trust};

const QUICK: Duration = Duration::from_secs(60);

fn host_with(transport: Option<Transport>) -> Host {
    let mut builder = common::builder();
    if let Some(t) = transport {
        builder = builder.transport(t);
    }
    builder.build().unwrap()
}

fn load(host: &Host, max_frame: u64) -> Plugin {
    let mut m = common::manifest("hello", Trust::Untrusted);
    m.limits.max_frame = max_frame;
    m.limits.concurrency = 4;
    run_with_limit(QUICK, host.load_manifest(m)).unwrap()
}

fn transport_of(plugin: &Plugin) -> Option<Transport> {
    plugin.status().instances[0].transport
}

/// Bytes that differ from call to call and position to position.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

#[test]
fn shared_memory_is_the_default_and_the_socket_can_be_chosen() {
    let default = load(&host_with(None), 1 << 20);
    let expected = Transport::from_env().unwrap_or(Transport::SharedMemory);
    assert_eq!(transport_of(&default), Some(expected));
    let shm = load(&host_with(Some(Transport::SharedMemory)), 1 << 20);
    let socket = load(&host_with(Some(Transport::Socket)), 1 << 20);
    assert_eq!(transport_of(&shm), Some(Transport::SharedMemory));
    assert_eq!(transport_of(&socket), Some(Transport::Socket));
    for plugin in [&shm, &socket] {
        let out = run_with_limit(QUICK, plugin.call_raw("echo", b"same".to_vec())).unwrap();
        assert_eq!(out, b"same");
    }
}

#[test]
fn a_worker_that_cannot_use_shared_memory_falls_back_to_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    // A worker that does not announce `shm` (as one built before it would).
    let shim = script(
        dir.path(),
        "no-shm-worker",
        &format!(
            "PLUGIN_HOST_TEST_PROTOCOL_FEATURES=cancel,progress,log,ping,host_call,stream exec {} \"$@\"",
            worker_shim().display()
        ),
    );
    let host = common::builder_with_shim(&shim)
        .transport(Transport::SharedMemory)
        .build()
        .unwrap();
    let plugin = load(&host, 1 << 20);
    assert_eq!(transport_of(&plugin), Some(Transport::Socket));
    let out = run_with_limit(QUICK, plugin.call_raw("echo", b"fallback".to_vec())).unwrap();
    assert_eq!(out, b"fallback");
}

#[test]
fn payloads_larger_than_a_ring_cross_whole_in_both_directions() {
    // Each ring holds 2 MiB: these frames go through in pieces, with the reader draining
    // as the writer fills.
    let plugin = load(&host_with(Some(Transport::SharedMemory)), 16 << 20);
    for (len, seed) in [
        (5 << 20, 1u8),
        (2 << 20, 2),
        ((2 << 20) + 17, 3),
        (1, 4),
        (0, 5),
    ] {
        let input = pattern(len, seed);
        let out = run_with_limit(QUICK, plugin.call_raw("echo", input.clone())).unwrap();
        assert!(out == input, "{len} bytes came back changed");
    }
    assert_eq!(plugin.status().crashes, 0);
}

#[test]
fn many_calls_in_flight_fill_the_rings_and_each_gets_its_own_answer() {
    let plugin = load(&host_with(Some(Transport::SharedMemory)), 4 << 20);
    run_with_limit(QUICK, async {
        // 64 calls of 300 KiB at once: 19 MiB through 2 MiB rings.
        let calls: Vec<_> = (0..64u8)
            .map(|i| {
                let plugin = plugin.clone();
                smol::spawn(async move {
                    let input = pattern(300 << 10, i);
                    let out = plugin.call_raw("echo", input.clone()).await.unwrap();
                    assert!(out == input, "call {i} got another call's bytes");
                })
            })
            .collect();
        for call in calls {
            call.await;
        }
    });
    assert_eq!(plugin.status().crashes, 0);
}

#[test]
fn a_large_reply_comes_back_in_its_calls_input_buffer_when_that_fits() {
    // The input's pages are mapped already; a fresh reply buffer would fault each one in
    // (that was most of a 1 MiB call's time). Both transports read replies the same way.
    for transport in [Transport::SharedMemory, Transport::Socket] {
        let plugin = load(&host_with(Some(transport)), 8 << 20);
        // (payload, spare capacity, whether the reply lands in the input's memory)
        for (len, capacity, reused) in [
            (1 << 20, 1 << 20, true),
            (1 << 20, 3 << 19, true),
            // Far too large: the caller would hold on to memory it did not ask for.
            (1 << 20, 3 << 20, false),
        ] {
            let mut input = Vec::with_capacity(capacity);
            input.extend_from_slice(&pattern(len, len as u8));
            let expected = input.clone();
            let address = input.as_ptr();
            let out = run_with_limit(QUICK, plugin.call_raw("echo", input)).unwrap();
            assert!(
                out == expected,
                "{transport:?}: {len} bytes came back changed"
            );
            let what = format!("{transport:?}: {len} bytes with a {capacity}-byte input buffer");
            match reused {
                true => assert!(
                    out.as_ptr() == address && out.capacity() == capacity,
                    "{what}"
                ),
                // A buffer of its own (the allocator may reuse the freed input's address,
                // so the capacity tells).
                false => assert_eq!(out.capacity(), len, "{what}"),
            }
        }
        assert_eq!(plugin.status().crashes, 0);
    }
}

/// CPU time (user + system, in clock ticks) of `pid` and its descendants.
fn cpu_ticks(pid: u32) -> u64 {
    std::iter::once(pid)
        .chain(descendants(pid))
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which may hold spaces): utime is the 14th
            // field of the line, stime the 15th.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
        })
        .sum()
}

#[test]
fn an_idle_shared_memory_worker_sleeps() {
    // Spinning is bounded: once calls stop, both sides sleep (the worker on its socket, its
    // standby threads on the region's futex). A busy loop would burn a whole CPU here.
    let plugin = load(&host_with(Some(Transport::SharedMemory)), 1 << 20);
    for _ in 0..200 {
        run_with_limit(QUICK, plugin.call_raw("echo", vec![7u8; 16])).unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = plugin.worker_pid().unwrap();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 2 s at 100 ticks per second is 200 ticks; an idle worker uses next to none.
    assert!(
        used <= 10,
        "the idle worker used {used} ticks of CPU in 2 s"
    );
    // And it still answers at once.
    let out = run_with_limit(QUICK, plugin.call_raw("echo", b"awake".to_vec())).unwrap();
    assert_eq!(out, b"awake");
}

#[test]
fn a_call_behind_a_long_call_runs_at_once_on_another_worker_thread() {
    // Over shared memory the worker's reader goes off to run a long call without handing
    // the reader role to another thread: a call written meanwhile, or written together
    // with the long one and read after it, must still be read by another worker thread
    // at once (woken through the region), never after the long call ends (nor at an idle
    // thread's own look, once a second). Each round leaves the reader running a new long
    // call; over the socket a thread takes over reading at once.
    const ROUNDS: u32 = 4;
    const LONG_MS: u64 = 2500;
    const AT_ONCE: Duration = Duration::from_millis(150);
    for transport in [Transport::SharedMemory, Transport::Socket] {
        let host = host_with(Some(transport));
        let mut m = common::manifest("faulty", Trust::Untrusted);
        m.limits.concurrency = ROUNDS + 1;
        let plugin = run_with_limit(QUICK, host.load_manifest(m)).unwrap();
        assert_eq!(transport_of(&plugin), Some(transport));
        let mut long = Vec::new();
        let mut took = Vec::new();
        for round in 0..ROUNDS {
            // Rest first: the worker's reader falls asleep, and wakes for the long call.
            std::thread::sleep(Duration::from_millis(200));
            let caller = plugin.clone();
            long.push(std::thread::spawn(move || {
                let input = serde_json::json!({ "ms": LONG_MS });
                run_with_limit(QUICK, caller.call::<_, u64>("sleep", &input))
            }));
            if round % 2 == 1 {
                // The long call is running (its worker thread asleep in the plugin).
                std::thread::sleep(Duration::from_millis(200));
            }
            // Else at once: often in the ring before the worker read the long call.
            let started = std::time::Instant::now();
            let out = run_with_limit(QUICK, plugin.call_raw("echo", vec![round as u8; 16]));
            took.push(started.elapsed());
            assert_eq!(out.unwrap(), vec![round as u8; 16], "{transport:?}");
        }
        assert!(
            took.iter().all(|t| *t < AT_ONCE),
            "{transport:?}: the calls behind a long one took {took:?}"
        );
        for call in long {
            assert_eq!(call.join().unwrap().unwrap(), LONG_MS, "{transport:?}");
        }
        assert_eq!(plugin.status().crashes, 0, "{transport:?}");
    }
}
