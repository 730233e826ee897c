//! Host functions, end to end: a plugin (`plugins/callbacks`) calls functions the app
//! registered on the `HostBuilder`, over both backends (in-process and in a worker).
//!
//! Each test runs the same body over `Trust::Trusted` and `Trust::Untrusted`, except those
//! that crash the plugin on purpose (a crash in-process would take the test down), which
//! run untrusted only. Refusals are checked by their exact `HostCallErrorKind`, which the
//! plugin's `ask` method returns as data; after every failure the plugin must still serve
//! the next call.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[cfg(unix)]
use common::script;
use common::{manifest, run_with_limit, wait_until};
#[cfg(unix)]
use futures_lite::StreamExt;
use plugin_host::{
    CallError, CallOptions, Host, HostBuilder, HostCallContext, HostError, Plugin, Trust,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

const BOTH: [Trust; 2] = [Trust::Trusted, Trust::Untrusted];

/// A limit for a test body that should take well under a second.
const QUICK: Duration = Duration::from_secs(10);

/// A host that finds the example plugins and grants what they request; the test adds its
/// host functions.
fn builder() -> HostBuilder {
    common::builder()
}

async fn load(host: &Host, trust: Trust) -> Plugin {
    host.load_manifest(manifest("callbacks", trust))
        .await
        .unwrap_or_else(|e| panic!("{trust:?}: loading callbacks: {e}"))
}

/// `ask`'s input: one raw host call to `function` with `input`.
#[derive(Serialize)]
struct Ask<'a> {
    function: &'a str,
    #[serde(with = "serde_bytes")]
    input: &'a [u8],
}

/// `ask`'s output: the host call's bytes, or its error kind and message.
#[derive(Deserialize, Debug)]
struct Outcome {
    ok: Option<ByteBuf>,
    kind: Option<String>,
    message: Option<String>,
}

impl Outcome {
    fn ok(self, trust: Trust) -> Vec<u8> {
        match self.ok {
            Some(bytes) => bytes.into_vec(),
            None => panic!("{trust:?}: expected the host call to succeed, got {self:?}"),
        }
    }

    /// The refusal's kind and message.
    fn refused(self, trust: Trust) -> (String, String) {
        match (self.kind, self.message) {
            (Some(kind), Some(message)) if self.ok.is_none() => (kind, message),
            (kind, message) => panic!(
                "{trust:?}: expected the host call to fail, got ok={:?} kind={kind:?} message={message:?}",
                self.ok
            ),
        }
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct Add {
    a: i64,
    b: i64,
}

/// Has the plugin make one raw host call to `function`.
async fn ask(plugin: &Plugin, function: &str, input: &[u8]) -> Outcome {
    plugin
        .call("ask", &Ask { function, input })
        .await
        .unwrap_or_else(|e| panic!("{:?}: ask {function}: {e}", plugin.trust()))
}

/// The plugin still serves a plain call.
async fn assert_serves(plugin: &Plugin) {
    let doubled: u64 = plugin
        .call("double", &21u64)
        .await
        .unwrap_or_else(|e| panic!("{:?}: the next call failed: {e}", plugin.trust()));
    assert_eq!(doubled, 42, "{:?}", plugin.trust());
}

#[test]
fn a_typed_host_call_returns_the_functions_output() {
    for trust in BOTH {
        let host = builder()
            .function("math.add", |_: HostCallContext, add: Add| async move {
                Ok::<i64, HostError>(add.a + add.b)
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let sum: i64 = plugin.call("add", &Add { a: 40, b: 2 }).await.unwrap();
            assert_eq!(sum, 42, "{trust:?}");
            let sum: i64 = plugin.call("add", &Add { a: -7, b: 3 }).await.unwrap();
            assert_eq!(sum, -4, "{trust:?}");
            host.shutdown().await;
        });
    }
}

#[test]
fn a_raw_host_call_passes_bytes_unchanged_both_ways() {
    for trust in BOTH {
        let host = builder()
            .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                let mut out = b"echo:".to_vec();
                out.extend_from_slice(&input);
                Ok(out)
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let out = ask(&plugin, "echo", &[0, 1, 2, 0xff, 0]).await.ok(trust);
            assert_eq!(out, b"echo:\x00\x01\x02\xff\x00", "{trust:?}");
            let out = ask(&plugin, "echo", b"").await.ok(trust);
            assert_eq!(out, b"echo:", "{trust:?}");
            host.shutdown().await;
        });
    }
}

#[test]
fn a_function_the_manifest_does_not_import_is_refused_as_not_imported() {
    for trust in BOTH {
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        let host = builder()
            .raw_function("notlisted", move |_: HostCallContext, _: Vec<u8>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok(b"should not run".to_vec()) }
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let (kind, message) = ask(&plugin, "notlisted", b"x").await.refused(trust);
            assert_eq!(kind, "NotImported", "{trust:?}: {message}");
            assert!(message.contains("notlisted"), "{trust:?}: {message}");
            assert_eq!(ran.load(Ordering::SeqCst), 0, "{trust:?}: the function ran");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn a_function_registered_only_for_another_plugin_is_refused_as_not_granted() {
    for trust in BOTH {
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        let host = builder()
            .raw_function_for("other", "secret", move |_: HostCallContext, _: Vec<u8>| {
                counter.fetch_add(1, Ordering::SeqCst);
                async { Ok(b"the secret".to_vec()) }
            })
            .function_for(
                "other",
                "math.add",
                |_: HostCallContext, add: Add| async move { Ok::<i64, HostError>(add.a + add.b) },
            )
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let (kind, message) = ask(&plugin, "secret", b"x").await.refused(trust);
            assert_eq!(kind, "NotGranted", "{trust:?}: {message}");
            assert!(message.contains("secret"), "{trust:?}: {message}");
            assert_eq!(ran.load(Ordering::SeqCst), 0, "{trust:?}: the function ran");
            // Also through the typed path: `add` fails with the refusal as its error.
            let err = plugin
                .call::<_, i64>("add", &Add { a: 1, b: 2 })
                .await
                .unwrap_err();
            assert!(
                matches!(err.as_call(), Some(CallError::Plugin { .. })),
                "{trust:?}: {err}"
            );
            assert!(err.to_string().contains("math.add"), "{trust:?}: {err}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn an_imported_function_nobody_registered_is_refused_as_not_found() {
    for trust in BOTH {
        let host = builder()
            .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                Ok(input)
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let (kind, message) = ask(&plugin, "missing", b"x").await.refused(trust);
            assert_eq!(kind, "NotFound", "{trust:?}: {message}");
            assert!(message.contains("missing"), "{trust:?}: {message}");
            // The message names what the app does offer.
            assert!(message.contains("echo"), "{trust:?}: {message}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn a_typed_host_function_given_input_that_does_not_decode_is_refused_as_bad_input() {
    for trust in BOTH {
        let host = builder()
            .function("math.add", |_: HostCallContext, add: Add| async move {
                Ok::<i64, HostError>(add.a + add.b)
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            // 0xc1 is never valid MessagePack.
            let (kind, message) = ask(&plugin, "math.add", &[0xc1]).await.refused(trust);
            assert_eq!(kind, "BadInput", "{trust:?}: {message}");
            assert!(message.contains("math.add"), "{trust:?}: {message}");
            let sum: i64 = plugin.call("add", &Add { a: 1, b: 2 }).await.unwrap();
            assert_eq!(sum, 3, "{trust:?}");
            host.shutdown().await;
        });
    }
}

#[test]
fn a_host_function_error_reaches_the_plugin_as_failed_with_its_message() {
    for trust in BOTH {
        let host = builder()
            .raw_function("fail", |_: HostCallContext, _: Vec<u8>| async {
                Err::<Vec<u8>, _>(HostError::new("disk full"))
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let (kind, message) = ask(&plugin, "fail", b"x").await.refused(trust);
            assert_eq!(kind, "Failed", "{trust:?}: {message}");
            assert_eq!(message, "disk full", "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn a_panicking_host_function_is_reported_as_panicked_and_the_host_goes_on() {
    for trust in BOTH {
        let host = builder()
            .raw_function("panic", |_: HostCallContext, input: Vec<u8>| async move {
                if input == b"boom" {
                    panic!("host function blew up");
                }
                Ok(input)
            })
            .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                Ok(input)
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let (kind, message) = ask(&plugin, "panic", b"boom").await.refused(trust);
            assert_eq!(kind, "Panicked", "{trust:?}: {message}");
            assert!(
                message.contains("host function blew up"),
                "{trust:?}: {message}"
            );
            // The same function, and others, still work; so do plain calls.
            assert_eq!(ask(&plugin, "panic", b"calm").await.ok(trust), b"calm");
            assert_eq!(ask(&plugin, "echo", b"hi").await.ok(trust), b"hi");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

/// A host whose `reenter` function calls the plugin's `double` back (2n, so `reenter n`
/// returns 2n+1). Returns the slot to put the loaded plugin in.
fn reentrant_host() -> (Host, Arc<OnceLock<Plugin>>) {
    let me: Arc<OnceLock<Plugin>> = Arc::default();
    let plugin_slot = me.clone();
    let host = builder()
        .function("reenter", move |_: HostCallContext, n: u64| {
            let plugin = plugin_slot.get().cloned();
            async move {
                let plugin = plugin.ok_or_else(|| HostError::new("not loaded yet"))?;
                let doubled: u64 = plugin.call("double", &n).await?;
                Ok(doubled)
            }
        })
        .build()
        .unwrap();
    (host, me)
}

#[test]
fn a_host_function_may_call_the_same_plugin_back_without_deadlock() {
    for trust in BOTH {
        let (host, me) = reentrant_host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            me.set(plugin.clone()).unwrap();
            let out: u64 = plugin.call("reenter", &20u64).await.unwrap();
            assert_eq!(out, 41, "{trust:?}: 2n+1");
            let out: u64 = plugin.call("reenter", &0u64).await.unwrap();
            assert_eq!(out, 1, "{trust:?}: 2n+1");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

/// Set in a child process that runs one test (see [`in_child_process`]): its name.
const CHILD_ENV: &str = "PLUGIN_HOST_TEST_HOST_CALLS_CHILD";

/// Runs the test named `test` in a child process (this test binary, filtered to it) and
/// returns true, unless this is that child (then false: run the body). For tests that
/// saturate a worker's window: should the host spin or stall there, only the child is
/// affected (and killed after `limit`), not the other tests of this binary, which share
/// the executor host functions run on.
fn in_child_process(test: &str, limit: Duration) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test);
    let (status, output) = common::output_with_limit(&mut cmd, limit);
    assert!(
        status.is_some_and(|s| s.success()) && output.contains("1 passed"),
        "`{test}` in a child process: {}\n{output}",
        match status {
            Some(s) => format!("{s}"),
            None => format!("did not finish within {limit:?} (killed)"),
        }
    );
    true
}

#[test]
fn more_reentrant_calls_than_a_worker_holds_all_complete() {
    const TEST: &str = "more_reentrant_calls_than_a_worker_holds_all_complete";
    if in_child_process(TEST, Duration::from_secs(20)) {
        return;
    }
    // More re-entrant calls at once than the worker runs (concurrency 4) plus holds queued
    // (12): each waits on a host function whose callback needs a slot.
    const CALLS: u64 = 24;
    for trust in BOTH {
        let (host, me) = reentrant_host();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            me.set(plugin.clone()).unwrap();
            let calls: Vec<_> = (0..CALLS)
                .map(|n| {
                    let p = plugin.clone();
                    smol::spawn(async move { p.call::<_, u64>("reenter", &n).await })
                })
                .collect();
            for (n, call) in calls.into_iter().enumerate() {
                let out = call
                    .await
                    .unwrap_or_else(|e| panic!("{trust:?}: call {n}: {e}"));
                assert_eq!(out, 2 * n as u64 + 1, "{trust:?}");
            }
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

#[test]
fn sixty_four_calls_may_each_wait_on_a_host_call_at_the_same_time() {
    const TEST: &str = "sixty_four_calls_may_each_wait_on_a_host_call_at_the_same_time";
    if in_child_process(TEST, Duration::from_secs(20)) {
        return;
    }
    const CALLS: usize = 64;
    for trust in BOTH {
        let arrived = Arc::new(AtomicUsize::new(0));
        let counter = arrived.clone();
        let host = builder()
            // Returns only once all 64 host calls are outstanding together (or after 5 s).
            .raw_function("wait", move |_: HostCallContext, _: Vec<u8>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while counter.load(Ordering::SeqCst) < CALLS {
                        if Instant::now() >= deadline {
                            return Ok(b"gave up".to_vec());
                        }
                        smol::Timer::after(Duration::from_millis(5)).await;
                    }
                    Ok(b"all here".to_vec())
                }
            })
            .build()
            .unwrap();
        let started = Instant::now();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let calls: Vec<_> = (0..CALLS)
                .map(|_| {
                    let p = plugin.clone();
                    smol::spawn(async move { ask(&p, "wait", b"").await })
                })
                .collect();
            for (i, call) in calls.into_iter().enumerate() {
                let out = call.await.ok(trust);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    "all here",
                    "{trust:?}: call {i}: only {} host calls were outstanding together",
                    arrived.load(Ordering::SeqCst)
                );
            }
            assert_eq!(arrived.load(Ordering::SeqCst), CALLS, "{trust:?}");
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
        eprintln!(
            "{trust:?}: 64 outstanding host calls took {:?}",
            started.elapsed()
        );
    }
}

/// What a host function that waits for its call's cancellation saw.
#[derive(Default)]
struct Watch {
    started: AtomicBool,
    cancelled: AtomicBool,
    runs: AtomicUsize,
}

/// `wait`: waits (up to 10 s) for the plugin call to be cancelled, and records it.
fn waits_for_cancellation(builder: HostBuilder, watch: Arc<Watch>) -> HostBuilder {
    builder.raw_function("wait", move |ctx: HostCallContext, _: Vec<u8>| {
        let watch = watch.clone();
        async move {
            watch.runs.fetch_add(1, Ordering::SeqCst);
            watch.started.store(true, Ordering::SeqCst);
            let seen = futures_lite::future::or(
                async {
                    ctx.cancelled().await;
                    true
                },
                async {
                    smol::Timer::after(Duration::from_secs(10)).await;
                    false
                },
            )
            .await;
            watch
                .cancelled
                .store(seen && ctx.is_cancelled(), Ordering::SeqCst);
            Ok(b"late".to_vec())
        }
    })
}

#[test]
fn a_host_function_slower_than_the_deadline_times_the_call_out_and_sees_cancellation() {
    for trust in BOTH {
        let watch = Arc::new(Watch::default());
        let host = waits_for_cancellation(builder(), watch.clone())
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            let started = Instant::now();
            let err = plugin
                .call_with::<_, Outcome>(
                    "ask",
                    &Ask {
                        function: "wait",
                        input: b"",
                    },
                    CallOptions::new().timeout(Duration::from_millis(300)),
                )
                .await
                .unwrap_err();
            let took = started.elapsed();
            match err.as_call() {
                Some(CallError::Timeout { method, after, .. }) => {
                    assert_eq!(method, "ask", "{trust:?}");
                    assert_eq!(*after, Duration::from_millis(300), "{trust:?}");
                }
                _ => panic!("{trust:?}: expected Timeout, got {err}"),
            }
            assert!(
                took < Duration::from_secs(3),
                "{trust:?}: the timeout took {took:?}"
            );
            assert!(watch.started.load(Ordering::SeqCst), "{trust:?}");
            assert!(
                wait_until(Duration::from_secs(5), || watch
                    .cancelled
                    .load(Ordering::SeqCst)),
                "{trust:?}: the host function never saw its call's cancellation"
            );
            assert_serves(&plugin).await;
            host.shutdown().await;
        });
    }
}

/// The crash report's signal (Unix) or exception status (Windows), if it names one.
fn signal_of(report: &plugin_host::CrashReport) -> Option<&str> {
    report.exit.as_ref().and_then(common::fault_name)
}

#[cfg(unix)]
#[test]
fn a_worker_crash_during_a_host_call_fails_the_call_and_cancels_the_host_function() {
    let trust = Trust::Untrusted;
    let watch = Arc::new(Watch::default());
    let host = waits_for_cancellation(builder(), watch.clone())
        .build()
        .unwrap();
    run_with_limit(QUICK, async {
        let plugin = load(&host, trust).await;
        let pid = plugin
            .worker_pid()
            .expect("an untrusted plugin has a worker");
        let call = plugin.call::<_, Outcome>(
            "ask",
            &Ask {
                function: "wait",
                input: b"",
            },
        );
        let kill = async {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !watch.started.load(Ordering::SeqCst) {
                assert!(Instant::now() < deadline, "the host call never started");
                smol::Timer::after(Duration::from_millis(5)).await;
            }
            // SAFETY: kill takes no pointers; `pid` is our plugin's worker.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        };
        let (result, ()) = futures_lite::future::zip(call, kill).await;
        let err = result.unwrap_err();
        match err.as_call() {
            Some(CallError::Crashed { method, report, .. }) => {
                assert_eq!(method, "ask");
                assert_eq!(signal_of(report), Some("SIGKILL"), "{report}");
                assert!(report.in_flight.iter().any(|m| m == "ask"), "{report}");
            }
            _ => panic!("expected Crashed, got {err}"),
        }
        assert!(
            wait_until(Duration::from_secs(5), || watch
                .cancelled
                .load(Ordering::SeqCst)),
            "the host function never saw its call's cancellation"
        );
        assert_eq!(watch.runs.load(Ordering::SeqCst), 1);
        assert_serves(&plugin).await;
        assert_ne!(plugin.worker_pid(), Some(pid), "a fresh worker serves");
        host.shutdown().await;
    });
}

#[test]
fn the_context_names_the_plugin_the_method_and_the_function() {
    type Seen = Arc<Mutex<Vec<(String, String, String, u64, bool)>>>;
    fn record(seen: &Seen, ctx: &HostCallContext) {
        seen.lock().unwrap().push((
            ctx.plugin().to_string(),
            ctx.method().to_string(),
            ctx.function().to_string(),
            ctx.call_id(),
            ctx.is_cancelled(),
        ));
    }
    for trust in BOTH {
        let seen: Seen = Arc::default();
        let (s1, s2) = (seen.clone(), seen.clone());
        let host = builder()
            .raw_function("echo", move |ctx: HostCallContext, input: Vec<u8>| {
                record(&s1, &ctx);
                async move { Ok(input) }
            })
            .function("math.add", move |ctx: HostCallContext, add: Add| {
                record(&s2, &ctx);
                async move { Ok::<i64, HostError>(add.a + add.b) }
            })
            .build()
            .unwrap();
        run_with_limit(QUICK, async {
            let plugin = load(&host, trust).await;
            ask(&plugin, "echo", b"1").await.ok(trust);
            let _: i64 = plugin.call("add", &Add { a: 1, b: 1 }).await.unwrap();
            ask(&plugin, "echo", b"2").await.ok(trust);
            host.shutdown().await;
        });
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{trust:?}: {seen:?}");
        let names: Vec<_> = seen
            .iter()
            .map(|(p, m, f, _, cancelled)| (p.as_str(), m.as_str(), f.as_str(), *cancelled))
            .collect();
        assert_eq!(
            names,
            [
                ("callbacks", "ask", "echo", false),
                ("callbacks", "add", "math.add", false),
                ("callbacks", "ask", "echo", false),
            ],
            "{trust:?}"
        );
        let ids: Vec<u64> = seen.iter().map(|s| s.3).collect();
        assert!(
            ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
            "{trust:?}: each plugin call has its own id: {ids:?}"
        );
    }
}

#[test]
fn a_plugin_that_crashes_after_a_host_call_reports_the_crash_and_the_function_ran_once() {
    let trust = Trust::Untrusted;
    let runs = Arc::new(AtomicU64::new(0));
    let counter = runs.clone();
    let host = builder()
        .raw_function("echo", move |_: HostCallContext, input: Vec<u8>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(input) }
        })
        .build()
        .unwrap();
    run_with_limit(QUICK, async {
        let plugin = load(&host, trust).await;
        let err = plugin
            .call::<_, ()>(
                "ask_then_crash",
                &Ask {
                    function: "echo",
                    input: b"x",
                },
            )
            .await
            .unwrap_err();
        match err.as_call() {
            Some(CallError::Crashed { method, report, .. }) => {
                assert_eq!(method, "ask_then_crash");
                assert_eq!(signal_of(report), Some(common::ABORT), "{report}");
                assert!(
                    report
                        .stderr_tail
                        .iter()
                        .any(|l| l.contains("aborting after a host call")),
                    "{report}"
                );
                assert!(
                    report.in_flight.iter().any(|m| m == "ask_then_crash"),
                    "{report}"
                );
            }
            _ => panic!("expected Crashed, got {err}"),
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the host function ran once");
        assert_serves(&plugin).await;
        assert_eq!(ask(&plugin, "echo", b"again").await.ok(trust), b"again");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        host.shutdown().await;
    });
}

#[cfg(unix)]
#[test]
fn a_worker_that_predates_host_calls_and_streams_still_serves_plain_calls() {
    let trust = Trust::Untrusted;
    let dir = tempfile::tempdir().unwrap();
    // Announces protocol 0.2.0 and its features: no `host_call`, no `stream`.
    let shim = script(
        dir.path(),
        "old-worker",
        &format!(
            "PLUGIN_HOST_TEST_PROTOCOL_VERSION=0.2.0 \
             PLUGIN_HOST_TEST_PROTOCOL_FEATURES=cancel,progress,log,ping exec {} \"$@\"",
            common::worker_shim().display()
        ),
    );
    let runs = Arc::new(AtomicU64::new(0));
    let counter = runs.clone();
    let host = common::builder_with_shim(&shim)
        .raw_function("echo", move |_: HostCallContext, input: Vec<u8>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { Ok(input) }
        })
        .build()
        .unwrap();
    run_with_limit(QUICK, async {
        let plugin = load(&host, trust).await;
        // Plain calls work.
        assert_serves(&plugin).await;
        let raw = plugin.call_raw("echo", vec![1u8, 2, 3]).await.unwrap();
        assert_eq!(raw, [1, 2, 3]);
        // A host call is refused in the worker, without reaching the host.
        let (kind, message) = ask(&plugin, "echo", b"x").await.refused(trust);
        assert_eq!(kind, "Unsupported", "{message}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        // A stream call returns the method's result, with no items (its emit reports
        // `Unsupported`).
        let mut stream = plugin.call_stream::<_, u8>("emit_plain", &());
        let mut items = 0;
        while let Some(item) = stream.next().await {
            item.unwrap_or_else(|e| panic!("the stream failed: {e}"));
            items += 1;
        }
        assert_eq!(items, 0);
        let output: String = stream.output().expect("the stream ended").unwrap();
        assert_eq!(output, "Unsupported");
        assert_serves(&plugin).await;
        host.shutdown().await;
    });
}
