//! Output streams, end to end: a plugin (`plugins/callbacks`) emits items with `ctx.emit`
//! and the app reads them from `Plugin::call_stream`, over both backends.
//!
//! Each test runs the same body over `Trust::Trusted` and `Trust::Untrusted`, except the
//! one that crashes the plugin mid-stream (untrusted only). After every failure the plugin
//! must still serve the next call.

mod common;

use std::time::{Duration, Instant};

#[cfg(target_os = "linux")]
use common::proc_status_bytes;
use common::{manifest, run_with_limit, wait_until};
use futures_lite::StreamExt;
use plugin_host::{CallError, CallOptions, Host, Plugin, Trust};
use serde::Serialize;

const BOTH: [Trust; 2] = [Trust::Trusted, Trust::Untrusted];

/// A limit for a test body that should take a second or two.
const QUICK: Duration = Duration::from_secs(10);

fn host() -> Host {
    common::host()
}

async fn load(host: &Host, trust: Trust) -> Plugin {
    host.load_manifest(manifest("callbacks", trust))
        .await
        .unwrap_or_else(|e| panic!("{trust:?}: loading callbacks: {e}"))
}

/// `count`'s input: emit `n` items, each its index (`size` 0) or `size` bytes.
#[derive(Serialize)]
struct Count {
    n: u64,
    size: usize,
}

/// The plugin still serves a plain call, promptly.
async fn assert_serves(plugin: &Plugin) {
    let started = Instant::now();
    let doubled: u64 = plugin
        .call("double", &21u64)
        .await
        .unwrap_or_else(|e| panic!("{:?}: the next call failed: {e}", plugin.trust()));
    assert_eq!(doubled, 42, "{:?}", plugin.trust());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}: the next call took {:?}",
        plugin.trust(),
        started.elapsed()
    );
}

#[test]
fn a_stream_delivers_every_item_in_order_then_the_methods_output() {
    const N: u64 = 100_000;
    for trust in BOTH {
        let host = host();
        let started = Instant::now();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let mut stream = plugin.call_stream::<_, u64>("count", &Count { n: N, size: 0 });
            let mut expected = 0u64;
            while let Some(item) = stream.next().await {
                let item = item.unwrap_or_else(|e| panic!("{trust:?}: item {expected}: {e}"));
                assert_eq!(item, expected, "{trust:?}: out of order");
                expected += 1;
            }
            assert_eq!(expected, N, "{trust:?}: items received");
            let output: u64 = stream.output().expect("the stream ended").unwrap();
            assert_eq!(output, N, "{trust:?}");
            // Polling past the end keeps returning None.
            assert!(stream.next().await.is_none(), "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
        eprintln!("{trust:?}: {N} items in {:?}", started.elapsed());
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_slow_consumer_holds_the_plugin_back_and_host_memory_stays_flat() {
    const N: u64 = 100_000;
    const SIZE: usize = 1024;
    const MAX_GROWTH: u64 = 64 << 20;
    for trust in BOTH {
        let host = host();
        let started = Instant::now();
        run_with_limit(Duration::from_secs(30), async {
            let plugin = load(&host, trust).await;
            let input = rmp_serde::to_vec_named(&Count { n: N, size: SIZE }).unwrap();
            let before = proc_status_bytes("VmRSS");
            let mut peak = before;
            let mut stream = plugin.call_stream_raw("count", input, CallOptions::new());
            // A consumer that does not poll at first: an unbounded host would take the
            // whole ~100 MB stream now.
            smol::Timer::after(Duration::from_millis(300)).await;
            peak = peak.max(proc_status_bytes("VmRSS"));
            let (mut items, mut bytes) = (0u64, 0u64);
            while let Some(item) = stream.next().await {
                let item = item.unwrap_or_else(|e| panic!("{trust:?}: item {items}: {e}"));
                assert_eq!(item.len(), SIZE, "{trust:?}");
                assert!(item.iter().all(|&b| b == 0xa5), "{trust:?}");
                items += 1;
                bytes += item.len() as u64;
                if items % 1000 == 0 {
                    peak = peak.max(proc_status_bytes("VmRSS"));
                    smol::Timer::after(Duration::from_millis(1)).await;
                }
            }
            assert_eq!(items, N, "{trust:?}");
            assert_eq!(bytes, N * SIZE as u64, "{trust:?}");
            let output: u64 = stream.output().expect("the stream ended").unwrap();
            assert_eq!(output, N, "{trust:?}");
            let growth = peak.saturating_sub(before);
            eprintln!(
                "{trust:?}: {} MiB streamed, host RSS grew by {} KiB at most",
                bytes >> 20,
                growth >> 10
            );
            assert!(
                growth < MAX_GROWTH,
                "{trust:?}: host RSS grew by {} MiB while {} MiB streamed",
                growth >> 20,
                bytes >> 20
            );
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
        eprintln!("{trust:?}: slow consumer took {:?}", started.elapsed());
    }
}

#[test]
fn a_crash_mid_stream_ends_it_with_exactly_one_crashed_error() {
    let trust = Trust::Untrusted;
    let host = host();
    run_with_limit(QUICK, async {
        let plugin = load(&host, trust).await;
        let mut stream = plugin.call_stream::<_, u64>("count_then_crash", &500u64);
        let mut items = 0u64;
        let mut errors = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(i) => {
                    assert!(errors.is_empty(), "an item after the error: {i}");
                    assert_eq!(i, items, "out of order");
                    items += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        assert_eq!(items, 500, "every item emitted before the crash arrives");
        assert_eq!(errors.len(), 1, "{errors:?}");
        match errors[0].as_call() {
            Some(CallError::Crashed { method, report, .. }) => {
                assert_eq!(method, "count_then_crash");
                assert!(
                    report.exit.as_ref().and_then(common::fault_name) == Some(common::ABORT),
                    "{report}"
                );
                assert!(
                    report
                        .stderr_tail
                        .iter()
                        .any(|l| l.contains("aborting after 500 items")),
                    "{report}"
                );
            }
            _ => panic!("expected Crashed, got {}", errors[0]),
        }
        assert!(stream.next().await.is_none());
        assert!(
            stream.output_raw().is_none(),
            "a failed stream has no output"
        );
        assert_serves(&plugin).await;
        // Streams work on the fresh worker too.
        let mut again = plugin.call_stream::<_, u64>("count", &Count { n: 3, size: 0 });
        let mut got = Vec::new();
        while let Some(item) = again.next().await {
            got.push(item.unwrap());
        }
        assert_eq!(got, [0, 1, 2]);
        host.shutdown().await;
    });
}

#[test]
fn dropping_a_stream_cancels_the_call_and_the_plugin_serves_the_next_one() {
    for trust in BOTH {
        let host = host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let mut stream = plugin.call_stream::<_, u64>(
                "count",
                &Count {
                    n: 1_000_000,
                    size: 0,
                },
            );
            for expected in 0..10u64 {
                let item = stream.next().await.expect("an item").unwrap();
                assert_eq!(item, expected, "{trust:?}");
            }
            drop(stream);
            assert_serves(&plugin).await;
            // The abandoned call stops: nothing stays in flight (it would otherwise emit
            // for a long while, blocked on the window).
            let idle = wait_until(Duration::from_secs(3), || {
                plugin.status().instances.iter().all(|i| i.in_flight == 0)
            });
            assert!(
                idle,
                "{trust:?}: a call is still in flight: {:?}",
                plugin.status().instances
            );
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn emitting_outside_a_stream_call_fails_with_not_stream() {
    for trust in BOTH {
        let host = host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let kind: String = plugin.call("emit_plain", &()).await.unwrap();
            assert_eq!(kind, "NotStream", "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn a_stream_call_to_a_method_that_emits_nothing_yields_no_items_and_its_output() {
    for trust in BOTH {
        let host = host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            // A method that never emits.
            let mut stream = plugin.call_stream::<_, u64>("double", &21u64);
            assert!(stream.output_raw().is_none(), "{trust:?}: no output yet");
            assert!(stream.next().await.is_none(), "{trust:?}: an item");
            let output: u64 = stream.output().expect("the stream ended").unwrap();
            assert_eq!(output, 42, "{trust:?}");
            // A streaming method asked for zero items.
            let mut stream = plugin.call_stream::<_, u64>("count", &Count { n: 0, size: 0 });
            assert!(stream.next().await.is_none(), "{trust:?}: an item");
            let output: u64 = stream.output().expect("the stream ended").unwrap();
            assert_eq!(output, 0, "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn a_stream_whose_consumer_outlasts_the_deadline_ends_with_timeout() {
    for trust in BOTH {
        let host = host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let started = Instant::now();
            let mut stream = plugin.call_stream_with::<_, u64>(
                "count",
                &Count { n: 1000, size: 0 },
                CallOptions::new().timeout(Duration::from_millis(300)),
            );
            let mut items = 0u64;
            let mut errors = Vec::new();
            while let Some(item) = stream.next().await {
                match item {
                    Ok(i) => {
                        assert!(errors.is_empty(), "{trust:?}: an item after the error");
                        assert_eq!(i, items, "{trust:?}: out of order");
                        items += 1;
                        // After the first item the consumer stalls past the deadline;
                        // then it reads what was buffered.
                        if items == 1 {
                            smol::Timer::after(Duration::from_millis(600)).await;
                        }
                    }
                    Err(e) => errors.push(e),
                }
            }
            let took = started.elapsed();
            assert_eq!(errors.len(), 1, "{trust:?}: {errors:?}");
            match errors[0].as_call() {
                Some(CallError::Timeout { method, after, .. }) => {
                    assert_eq!(method, "count", "{trust:?}");
                    assert_eq!(*after, Duration::from_millis(300), "{trust:?}");
                }
                _ => panic!("{trust:?}: expected Timeout, got {}", errors[0]),
            }
            assert!(
                items > 0 && items < 1000,
                "{trust:?}: {items} items before the timeout"
            );
            assert!(
                took < Duration::from_secs(3),
                "{trust:?}: the stream ended after {took:?}"
            );
            assert!(stream.output_raw().is_none(), "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn a_large_item_after_small_ones_is_not_held_back_by_the_window() {
    // 100 KiB is buffered when the plugin emits 1000 KiB, which does not fit beside it in
    // the 1 MiB window: the consumer taking the small item must credit it, though it is
    // far less than half a window, or the large one waits for the deadline.
    #[derive(serde::Serialize)]
    struct Sizes {
        n: u64,
        sizes: Vec<usize>,
    }
    for trust in BOTH {
        let host = host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let sizes = vec![100 << 10, 1000 << 10, 10, 1000 << 10];
            let input = Sizes {
                n: 0,
                sizes: sizes.clone(),
            };
            let options = CallOptions::new().timeout(Duration::from_secs(5));
            let bytes = rmp_serde::to_vec_named(&input).unwrap();
            let mut stream = plugin.call_stream_raw("count", bytes, options);
            let mut got = Vec::new();
            while let Some(item) = stream.next().await {
                got.push(item.unwrap_or_else(|e| panic!("{trust:?}: {e}")).len());
            }
            assert_eq!(got, sizes, "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}
