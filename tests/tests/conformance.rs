//! The backend conformance suite: one list of behaviours, each run over every backend, so
//! a failure names the behaviour and the backend. `conformance!` turns each
//! `fn behaviour(backend: Backend)` into one `#[test]` per backend, in the modules
//! `in_process`, `isolated` and `wasm` (the same test names in each):
//!
//! ```text
//! cargo test -p plugin-host-tests --test conformance wasm::      # one backend
//! cargo test -p plugin-host-tests --test conformance deadline    # one behaviour, every backend
//! ```
//!
//! The backends differ where their documentation says they do. Each such difference is
//! an explicit per-backend expectation in the test that meets it; no test is skipped at
//! run time:
//!
//! | behaviour | in-process | isolated | wasm | how the tests treat it |
//! |---|---|---|---|---|
//! | a panic | `Panicked`; the instance serves on | `Panicked`; the same worker (pid) serves on | a trap: `Crashed` with `report.panic` and `panic_location`, trap kind `unreachable`; a fresh instance serves on | `a_panic_...` expects each |
//! | a crash: `abort`, stack overflow, `exit`, a memory bomb | takes the host process down | `Crashed` with the signal or status (`fault_name`) or the exit code, `report.limit` for the bomb; a new worker (new pid) | `Crashed` with trap kind `unreachable` (`abort`, `exit`, the bomb's failed allocation), `stack overflow` or `out of bounds memory access` (stack overflow), `report.limit` for the bomb; a new instance (`Restarted`) | the tests after `crashing:` get no `in_process::` test (they would kill the test binary) |
//! | a null write (`segfault`) | takes the host process down | `Crashed`, `SIGSEGV` (access violation) | no fault (address 0 is ordinary linear memory): `Ok(null)` | `a_null_write_...` (isolated, wasm) expects each |
//! | a crash with other calls in flight | takes the host process down | every call on that worker fails with the same `Crashed` report, which lists them | only the trapping instance is lost: the other calls get their answers | `a_crash_fails_the_calls_sharing_...` (isolated, wasm) expects each |
//! | the memory limit (`limits.memory`) | not used | an rlimit (Linux) or a job limit (Windows; Wine ignores it and `status().sandbox_missing` says so) | the instance's memory cap | the memory bomb runs where the limit is in force; under Wine the test checks the `sandbox_missing` report instead |
//! | `std::thread::sleep`, `Instant::now` | work | work | unavailable (wasm32-unknown-unknown): `faulty`'s `sleep` panics | the deadline and cancellation tests use `infinite_loop` on wasm |
//! | a call that ignores its deadline or a cancellation | cannot be stopped (its thread runs until the plugin returns) | `Timeout` / `Cancelled` at once; the worker is killed `cancel_grace` later (`Crashed` event with `killed_by_host`) | `Timeout` / `Cancelled` at once; the instance is stopped `cancel_grace` later (`Crashed` event with `killed_by_host`, trap kind `interrupted`) | in-process runs only the cooperative `sleep`; the deadline test spins isolated and wasm, the cancellation test wasm, and each waits for that event |
//! | the crash budget (`restart.max_crashes`) | never quarantined: `enable()` is `false` | quarantined past the budget until `enable()` | the same | `a_crash_past_the_budget_...` (isolated, wasm); `status_...` checks `enable()` is `false` when not quarantined, everywhere |
//! | `reload()` | refused: `ReloadUnsupported` (a library cannot be unloaded) | a fresh worker (new pid), `Reloaded` | a fresh module, `Reloaded` | `reload_...` expects each |
//! | `status().pid` | `None` | the worker's pid | `None` | `status_...` expects each |
//! | `status().sandbox` | empty | the layers in force (Linux) | three `webassembly: ...` lines | `status_...` expects in-process and wasm exactly, isolated non-empty on Linux |
//! | `runtime()` / `trust()` | `Native` / `Trusted` | `Native` / `Untrusted` | `Wasm` / the grant (the manifest asks untrusted), which does not pick the engine | `status_...` expects each |
//! | calls at once | the `blocking` thread pool | `limits.concurrency` per worker | a pool of up to `limits.concurrency` × `instances` instances; a call waiting on the host holds one | the 64-in-flight test sets `limits.concurrency = 64` everywhere |
//!
//! Every wait is bounded ([`common::run`], [`wait_for_event`]); every fault test asserts
//! the exact error kind and that the next call is served. The manifests of plugins a test
//! crashes get a short restart backoff ([`manifest`]).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{run, Backend, Greet, Greeting};
use futures_lite::StreamExt;
use plugin_host::{
    CallError, CallOptions, CancelHandle, CrashReport, Error, EventReceiver, Host, HostCallContext,
    HostError, Manifest, Plugin, PluginEvent, PluginState, Progress, Runtime, Trust,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::json;

/// Turns each `fn behaviour(backend: Backend) { ... }` into a `#[test]` per backend:
/// `in_process::behaviour`, `isolated::behaviour`, `wasm::behaviour`. The functions after
/// `crashing:` crash their plugin, so they get no `in_process::` test (a crash there is a
/// crash of the test binary; see the table above).
macro_rules! conformance {
    (
        $( $(#[$meta:meta])* fn $name:ident($backend:ident: Backend) $body:block )*
        crashing:
        $( $(#[$cmeta:meta])* fn $cname:ident($cbackend:ident: Backend) $cbody:block )*
    ) => {
        $( $(#[$meta])* fn $name($backend: Backend) $body )*
        $( $(#[$cmeta])* fn $cname($cbackend: Backend) $cbody )*
        conformance!(@tests in_process, InProcess, [$($name)*]);
        conformance!(@tests isolated, Isolated, [$($name)* $($cname)*]);
        conformance!(@tests wasm, Wasm, [$($name)* $($cname)*]);
    };
    (@tests $module:ident, $backend:ident, [$($name:ident)*]) => {
        mod $module {
            $(
                #[test]
                fn $name() {
                    super::$name(super::Backend::$backend)
                }
            )*
        }
    };
}

/// What "promptly" means for an answer the host gives on its own (a deadline, a
/// cancellation, a quarantine), with room for a loaded two-core machine.
const PROMPT: Duration = Duration::from_secs(2);

/// `backend`'s manifest of the example plugin `name`, with a short restart backoff (tests
/// that crash a plugin wait for its replacement) and a short `cancel_grace` (tests that
/// spin wait for the host to stop them).
fn manifest(backend: Backend, name: &str) -> Manifest {
    let mut m = backend.manifest(name);
    m.restart.backoff = Duration::from_millis(20);
    m.restart.backoff_max = Duration::from_millis(200);
    m.timeouts.cancel_grace = Duration::from_millis(300);
    m
}

async fn load(host: &Host, backend: Backend, m: Manifest) -> Plugin {
    let name = m.name.clone();
    host.load_manifest(m)
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: loading {name}: {e}"))
}

/// The call error of a call that had to fail.
fn call_error<T: std::fmt::Debug>(
    backend: Backend,
    what: &str,
    result: Result<T, Error>,
) -> CallError {
    match result {
        Ok(value) => panic!("{backend:?}: {what}: expected an error, got Ok({value:?})"),
        Err(Error::Call(error)) => error,
        Err(other) => panic!("{backend:?}: {what}: expected a call error, got {other}"),
    }
}

/// The report of a call that had to crash.
fn crash_report(backend: Backend, what: &str, error: CallError) -> Arc<CrashReport> {
    match error {
        CallError::Crashed { report, .. } => report,
        other => panic!("{backend:?}: {what}: expected Crashed, got {other:?}"),
    }
}

/// The plugin serves the next call: a raw `echo` (every example plugin here has one).
async fn assert_serves(backend: Backend, plugin: &Plugin, after: &str) {
    let payload = format!("served after {after}").into_bytes();
    let out = plugin
        .call_raw("echo", payload.clone())
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: the call after {after} failed: {e}"));
    assert_eq!(out, payload, "{backend:?}: the call after {after}");
}

/// Waits up to `limit` for an event `wanted` accepts; fails naming the events seen.
async fn wait_for_event(
    backend: Backend,
    events: &EventReceiver,
    limit: Duration,
    what: &str,
    wanted: impl Fn(&PluginEvent) -> bool,
) -> PluginEvent {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let next = futures_lite::future::or(async { events.recv().await.ok() }, async {
            smol::Timer::after(left).await;
            None
        })
        .await;
        match next {
            Some(event) if wanted(&event) => return event,
            Some(event) => seen.push(format!("{event:?}")),
            None => panic!("{backend:?}: no {what} within {limit:?}; events seen: {seen:?}"),
        }
    }
}

/// The crash report of a `Crashed` event.
fn crashed_event(event: &PluginEvent) -> Option<&Arc<CrashReport>> {
    match event {
        PluginEvent::Crashed(report) => Some(report),
        _ => None,
    }
}

/// `callbacks`' `ask` input: one raw host call.
#[derive(Serialize)]
struct Ask<'a> {
    function: &'a str,
    #[serde(with = "serde_bytes")]
    input: &'a [u8],
}

/// `callbacks`' `ask` output: the host call's bytes, or its error kind and message.
#[derive(Deserialize, Debug)]
struct Outcome {
    ok: Option<ByteBuf>,
    kind: Option<String>,
    message: Option<String>,
}

#[derive(Serialize, Deserialize, Debug)]
struct Add {
    a: i64,
    b: i64,
}

/// `callbacks`' `count` input.
#[derive(Serialize)]
struct Count {
    n: u64,
    size: usize,
    sizes: Vec<usize>,
}

/// Has `callbacks` make one raw host call to `function`.
async fn ask(backend: Backend, plugin: &Plugin, function: &str, input: &[u8]) -> Outcome {
    plugin
        .call("ask", &Ask { function, input })
        .await
        .unwrap_or_else(|e| panic!("{backend:?}: ask {function}: {e}"))
}

/// The error kind and message a host call failed with.
fn refused(backend: Backend, function: &str, outcome: Outcome) -> (String, String) {
    match (outcome.ok, outcome.kind, outcome.message) {
        (None, Some(kind), Some(message)) => (kind, message),
        other => {
            panic!("{backend:?}: expected the host call to `{function}` to fail, got {other:?}")
        }
    }
}

/// A host function `wait` for tests that hold calls in it: it counts the calls that
/// arrive, then answers its input once `release` is set (after 10 s at most, an error).
fn waiting_host(arrived: &Arc<AtomicUsize>, release: &Arc<AtomicBool>) -> plugin_host::HostBuilder {
    let (arrived, release) = (arrived.clone(), release.clone());
    common::builder().raw_function("wait", move |_: HostCallContext, input: Vec<u8>| {
        let (arrived, release) = (arrived.clone(), release.clone());
        async move {
            arrived.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !release.load(Ordering::SeqCst) {
                if Instant::now() >= deadline {
                    return Err(HostError::new("never released"));
                }
                smol::Timer::after(Duration::from_millis(5)).await;
            }
            Ok(input)
        }
    })
}

/// Starts a call of `callbacks`' `ask` to the host function `wait` with `input`.
fn ask_wait(plugin: &Plugin, input: u64) -> smol::Task<Result<Outcome, Error>> {
    let plugin = plugin.clone();
    smol::spawn(async move {
        let input = input.to_le_bytes();
        plugin
            .call(
                "ask",
                &Ask {
                    function: "wait",
                    input: &input,
                },
            )
            .await
    })
}

/// Checks a `wait` call's answer: its own input.
fn assert_waited(backend: Backend, input: u64, result: Result<Outcome, Error>) {
    let outcome = result.unwrap_or_else(|e| panic!("{backend:?}: waiting call {input}: {e}"));
    assert_eq!(
        outcome.ok.clone().map(ByteBuf::into_vec),
        Some(input.to_le_bytes().to_vec()),
        "{backend:?}: waiting call {input}: {outcome:?}"
    );
}

conformance! {
    /// A typed call (the manifest's config reaches `create`) and raw calls, including an
    /// empty input and a 1 MiB one, come back exact.
    fn typed_and_raw_calls_round_trip(backend: Backend) {
        let host = common::host();
        let mut m = manifest(backend, "hello");
        m.config.insert("greeting".into(), "Bonjour".into());
        run(async {
            let plugin = load(&host, backend, m).await;
            assert_eq!(plugin.methods(), ["greet", "echo"], "{backend:?}");
            let out: Greeting = plugin
                .call("greet", &Greet { name: "Ada" })
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: greet: {e}"));
            assert_eq!(out.message, "Bonjour, Ada!", "{backend:?}");
            let small = vec![0u8, 1, 2, 0xc1, 0xff];
            assert_eq!(
                plugin.call_raw("echo", small.clone()).await.unwrap(),
                small,
                "{backend:?}"
            );
            let empty = plugin
                .call_raw("echo", Vec::new())
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: empty echo: {e}"));
            assert!(empty.is_empty(), "{backend:?}: {} bytes back", empty.len());
            let big: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
            let back = plugin
                .call_raw("echo", big.clone())
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: 1 MiB echo: {e}"));
            assert!(
                back == big,
                "{backend:?}: 1 MiB echo came back different ({} bytes)",
                back.len()
            );
            let out: Greeting = plugin
                .call("greet", &Greet { name: "Grace" })
                .await
                .unwrap();
            assert_eq!(out.message, "Bonjour, Grace!", "{backend:?}");
            host.shutdown().await;
        });
    }

    /// An unknown method, input that does not decode and an error the plugin returns each
    /// have their own kind, and the plugin serves the next call after each.
    fn errors_have_their_kinds_and_the_next_call_is_served(backend: Backend) {
        let host = common::host();
        run(async {
            let hello = load(&host, backend, manifest(backend, "hello")).await;
            match call_error(
                backend,
                "unknown method",
                hello.call::<_, ()>("nope", &()).await,
            ) {
                CallError::UnknownMethod {
                    plugin,
                    method,
                    available,
                } => {
                    assert_eq!(
                        (plugin.as_str(), method.as_str()),
                        ("hello", "nope"),
                        "{backend:?}"
                    );
                    assert_eq!(available, ["greet", "echo"], "{backend:?}");
                }
                other => panic!("{backend:?}: expected UnknownMethod, got {other:?}"),
            }
            assert_serves(backend, &hello, "an unknown method").await;
            match call_error(
                backend,
                "bad input",
                hello.call::<_, Greeting>("greet", &42).await,
            ) {
                CallError::BadInput { plugin, method, .. } => {
                    assert_eq!(
                        (plugin.as_str(), method.as_str()),
                        ("hello", "greet"),
                        "{backend:?}"
                    );
                }
                other => panic!("{backend:?}: expected BadInput, got {other:?}"),
            }
            assert_serves(backend, &hello, "bad input").await;

            let faulty = load(&host, backend, manifest(backend, "faulty")).await;
            let failed = faulty
                .call::<_, ()>("fail", &json!({"message": "conformance says no"}))
                .await;
            match call_error(backend, "fail", failed) {
                CallError::Plugin {
                    plugin,
                    method,
                    message,
                } => {
                    assert_eq!(
                        (plugin.as_str(), method.as_str()),
                        ("faulty", "fail"),
                        "{backend:?}"
                    );
                    assert_eq!(message, "conformance says no", "{backend:?}");
                }
                other => panic!("{backend:?}: expected Plugin, got {other:?}"),
            }
            assert_serves(backend, &faulty, "a plugin error").await;
            assert_eq!(faulty.status().crashes, 0, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// A panic: in-process and isolated, `Panicked` and the same instance (worker) serves
    /// on; wasm, a trap: `Crashed` with the panic's message and location, and a fresh
    /// instance serves on.
    fn a_panic_fails_that_call_and_the_next_call_is_served(backend: Backend) {
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "faulty")).await;
            let pid = plugin.worker_pid();
            let result = plugin
                .call::<_, ()>("panic", &json!({"message": "conformance panic"}))
                .await;
            let error = call_error(backend, "panic", result);
            match backend {
                Backend::InProcess | Backend::Isolated => {
                    match error {
                        CallError::Panicked {
                            plugin: name,
                            method,
                            message,
                        } => {
                            assert_eq!(
                                (name.as_str(), method.as_str()),
                                ("faulty", "panic"),
                                "{backend:?}"
                            );
                            assert_eq!(message, "conformance panic", "{backend:?}");
                        }
                        other => panic!("{backend:?}: expected Panicked, got {other:?}"),
                    }
                    assert_serves(backend, &plugin, "a panic").await;
                    assert_eq!(
                        plugin.worker_pid(),
                        pid,
                        "{backend:?}: no restart after a caught panic"
                    );
                    let status = plugin.status();
                    assert_eq!((status.crashes, status.restarts), (0, 0), "{backend:?}");
                }
                Backend::Wasm => {
                    let report = crash_report(backend, "panic", error);
                    assert_eq!(
                        report.panic.as_deref(),
                        Some("conformance panic"),
                        "{report}"
                    );
                    assert!(
                        report
                            .panic_location
                            .as_deref()
                            .is_some_and(|l| l.contains("lib.rs:")),
                        "{backend:?}: panic location {:?}",
                        report.panic_location
                    );
                    let kind = report.exit.as_ref().and_then(|e| e.trap_kind());
                    assert_eq!(kind, Some("unreachable"), "{report}");
                    assert_eq!(report.in_flight, ["panic"], "{report}");
                    assert_serves(backend, &plugin, "a panic").await;
                    assert_eq!(plugin.status().crashes, 1, "{backend:?}");
                    assert_eq!(plugin.status().state, PluginState::Ready, "{backend:?}");
                }
            }
            host.shutdown().await;
        });
    }

    /// Progress reports reach the caller, all of them, in order, before the answer.
    fn progress_reports_reach_the_caller_in_order(backend: Backend) {
        const STEPS: u32 = 6;
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "faulty")).await;
            let seen = Arc::new(Mutex::new(Vec::new()));
            let sink = seen.clone();
            let options = CallOptions::new().on_progress(move |p| sink.lock().unwrap().push(p));
            let n: u32 = plugin
                .call_with("progress", &json!({"steps": STEPS}), options)
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: progress: {e}"));
            assert_eq!(n, STEPS, "{backend:?}");
            let expected: Vec<Progress> = (1..=STEPS)
                .map(|i| Progress {
                    fraction: Some(i as f64 / STEPS as f64),
                    message: format!("step {i}"),
                })
                .collect();
            assert_eq!(*seen.lock().unwrap(), expected, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// 1000 calls from 8 concurrent tasks, each with its own input: each gets its own
    /// answer.
    fn a_thousand_calls_from_eight_tasks_each_get_their_own_answer(backend: Backend) {
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "hello")).await;
            let tasks: Vec<_> = (0..8)
                .map(|t| {
                    let plugin = plugin.clone();
                    smol::spawn(async move {
                        for i in 0..125 {
                            let name = format!("task {t} call {i}");
                            let out: Greeting = plugin
                                .call("greet", &Greet { name: &name })
                                .await
                                .unwrap_or_else(|e| panic!("{backend:?}: {name}: {e}"));
                            assert_eq!(out.message, format!("Hello, {name}!"), "{backend:?}");
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await;
            }
            let status = plugin.status();
            assert_eq!((status.calls, status.failures), (1000, 0), "{backend:?}");
            host.shutdown().await;
        });
    }

    /// 64 calls in flight at once (each waits in a host function until all 64 are there),
    /// each gets its own answer. `limits.concurrency = 64`: a wasm call waiting on the host
    /// holds one of the pool's `concurrency` × `instances` instances.
    fn sixty_four_calls_in_flight_at_once_each_get_their_own_answer(backend: Backend) {
        const CALLS: usize = 64;
        let arrived = Arc::new(AtomicUsize::new(0));
        let counter = arrived.clone();
        let host = common::builder()
            // Answers its input, once all 64 calls are waiting in it together.
            .raw_function("wait", move |_: HostCallContext, input: Vec<u8>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while counter.load(Ordering::SeqCst) < CALLS {
                        if Instant::now() >= deadline {
                            let n = counter.load(Ordering::SeqCst);
                            return Err(HostError::new(format!(
                                "only {n} calls were in flight together"
                            )));
                        }
                        smol::Timer::after(Duration::from_millis(5)).await;
                    }
                    Ok(input)
                }
            })
            .build()
            .unwrap();
        let mut m = manifest(backend, "callbacks");
        m.limits.concurrency = CALLS as u32;
        run(async {
            let plugin = load(&host, backend, m).await;
            let calls: Vec<_> = (0..CALLS as u64)
                .map(|i| {
                    let plugin = plugin.clone();
                    smol::spawn(async move {
                        let input = i.to_le_bytes();
                        ask(backend, &plugin, "wait", &input).await
                    })
                })
                .collect();
            for (i, call) in calls.into_iter().enumerate() {
                let outcome = call.await;
                let answer = outcome.ok.clone().map(ByteBuf::into_vec);
                assert_eq!(
                    answer,
                    Some((i as u64).to_le_bytes().to_vec()),
                    "{backend:?}: call {i}: {outcome:?}"
                );
            }
            assert_eq!(arrived.load(Ordering::SeqCst), CALLS, "{backend:?}");
            assert_serves(backend, &plugin, "64 calls at once").await;
            assert_eq!(plugin.status().crashes, 0, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// A call past its deadline returns `Timeout` promptly and the plugin serves on.
    /// In-process, the call must stop on its own (a thread cannot be stopped): the
    /// cooperative `sleep`. Isolated and wasm, `infinite_loop`, which ignores the
    /// cancellation: the host stops it `cancel_grace` later (the worker killed, the wasm
    /// instance interrupted) and says so in a `Crashed` event.
    fn a_call_past_its_deadline_times_out_promptly_and_the_plugin_serves_on(backend: Backend) {
        const DEADLINE: Duration = Duration::from_millis(200);
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "faulty")).await;
            let events = plugin.subscribe();
            let (method, input) = match backend {
                Backend::InProcess => ("sleep", json!({"ms": 20_000, "cooperative": true})),
                Backend::Isolated | Backend::Wasm => ("infinite_loop", json!(null)),
            };
            let started = Instant::now();
            let result = plugin
                .call_with::<_, ()>(method, &input, CallOptions::new().timeout(DEADLINE))
                .await;
            let took = started.elapsed();
            match call_error(backend, method, result) {
                CallError::Timeout {
                    method: m, after, ..
                } => {
                    assert_eq!((m.as_str(), after), (method, DEADLINE), "{backend:?}");
                }
                other => panic!("{backend:?}: expected Timeout, got {other:?}"),
            }
            assert!(
                took < DEADLINE + PROMPT,
                "{backend:?}: Timeout after {took:?}"
            );
            assert_serves(backend, &plugin, "a timeout").await;
            match backend {
                Backend::InProcess => {}
                Backend::Isolated | Backend::Wasm => {
                    let event = wait_for_event(
                        backend,
                        &events,
                        Duration::from_secs(10),
                        "Crashed event",
                        |e| crashed_event(e).is_some(),
                    )
                    .await;
                    let report = crashed_event(&event).unwrap();
                    assert!(report.killed_by_host.is_some(), "{backend:?}: {report}");
                    assert!(report.in_flight.iter().any(|m| m == method), "{report}");
                    if backend == Backend::Wasm {
                        let kind = report.exit.as_ref().and_then(|e| e.trap_kind());
                        assert_eq!(kind, Some("interrupted"), "{report}");
                    }
                    assert_serves(backend, &plugin, "the host stopped the spinning call").await;
                }
            }
            assert_eq!(plugin.status().state, PluginState::Ready, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// A `CancelHandle` cancels a running call: `Cancelled` promptly, and the plugin serves
    /// on. In-process and isolated, the cooperative `sleep` sees the cancellation and
    /// returns; wasm has no `sleep`: `infinite_loop`, stopped `cancel_grace` later
    /// (`Crashed` event, trap kind `interrupted`).
    fn a_cancel_handle_cancels_a_running_call_and_the_next_call_is_served(backend: Backend) {
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "faulty")).await;
            let events = plugin.subscribe();
            let pid = plugin.worker_pid();
            let (method, input) = match backend {
                Backend::InProcess | Backend::Isolated => {
                    ("sleep", json!({"ms": 20_000, "cooperative": true}))
                }
                Backend::Wasm => ("infinite_loop", json!(null)),
            };
            let handle = CancelHandle::new();
            let canceller = handle.clone();
            let started = Instant::now();
            let cancel = smol::spawn(async move {
                smol::Timer::after(Duration::from_millis(150)).await;
                canceller.cancel();
                Instant::now()
            });
            let result = plugin
                .call_with::<_, ()>(method, &input, CallOptions::new().cancel(&handle))
                .await;
            let cancelled_at = cancel.await;
            match call_error(backend, method, result) {
                CallError::Cancelled { method: m, .. } => assert_eq!(m, method, "{backend:?}"),
                other => panic!("{backend:?}: expected Cancelled, got {other:?}"),
            }
            assert!(
                cancelled_at.elapsed() < PROMPT,
                "{backend:?}: Cancelled {:?} after the cancel ({:?} after the call)",
                cancelled_at.elapsed(),
                started.elapsed()
            );
            assert_serves(backend, &plugin, "a cancelled call").await;
            if backend == Backend::Wasm {
                let event = wait_for_event(
                    backend,
                    &events,
                    Duration::from_secs(10),
                    "Crashed event",
                    |e| crashed_event(e).is_some(),
                )
                .await;
                let report = crashed_event(&event).unwrap();
                assert!(report.killed_by_host.is_some(), "{report}");
                assert_eq!(
                    report.exit.as_ref().and_then(|e| e.trap_kind()),
                    Some("interrupted"),
                    "{report}"
                );
                assert_serves(backend, &plugin, "the host stopped the cancelled call").await;
            } else {
                // Past cancel_grace: had the call not returned, the host would have
                // stopped it (isolated: killed the worker).
                let grace = plugin.manifest().timeouts.cancel_grace;
                smol::Timer::after(grace + Duration::from_millis(300)).await;
                let status = plugin.status();
                assert_eq!(
                    (status.crashes, status.state),
                    (0, PluginState::Ready),
                    "{backend:?}: the cooperative call was stopped: {:?}",
                    status.last_crash
                );
                assert_eq!(
                    plugin.worker_pid(),
                    pid,
                    "{backend:?}: the worker was replaced"
                );
            }
            // A handle cancelled before the call: it fails at once, without reaching the plugin.
            let result = plugin
                .call_with::<_, ()>(method, &input, CallOptions::new().cancel(&handle))
                .await;
            assert!(
                matches!(
                    call_error(backend, "pre-cancelled", result),
                    CallError::Cancelled { .. }
                ),
                "{backend:?}"
            );
            assert_serves(backend, &plugin, "a pre-cancelled call").await;
            host.shutdown().await;
        });
    }

    /// A call waiting in a host function is cancelled: the caller gets `Cancelled`
    /// promptly, the host function sees the cancellation, the plugin's host call returns
    /// (so nothing is killed) and the plugin serves on.
    fn a_cancel_handle_cancels_a_call_waiting_on_the_host(backend: Backend) {
        let saw_cancel = Arc::new(AtomicBool::new(false));
        let flag = saw_cancel.clone();
        let host = common::builder()
            // Waits for its call's cancellation (10 s at most).
            .raw_function("wait", move |ctx: HostCallContext, _: Vec<u8>| {
                let flag = flag.clone();
                async move {
                    let cancelled = futures_lite::future::or(
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
                    flag.store(cancelled, Ordering::SeqCst);
                    Ok(b"waited".to_vec())
                }
            })
            .build()
            .unwrap();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "callbacks")).await;
            let handle = CancelHandle::new();
            let canceller = handle.clone();
            let cancel = smol::spawn(async move {
                smol::Timer::after(Duration::from_millis(150)).await;
                canceller.cancel();
                Instant::now()
            });
            let input = Ask {
                function: "wait",
                input: b"",
            };
            let result = plugin
                .call_with::<_, Outcome>("ask", &input, CallOptions::new().cancel(&handle))
                .await;
            let cancelled_at = cancel.await;
            match call_error(backend, "ask wait", result) {
                CallError::Cancelled { method, .. } => assert_eq!(method, "ask", "{backend:?}"),
                other => panic!("{backend:?}: expected Cancelled, got {other:?}"),
            }
            assert!(
                cancelled_at.elapsed() < PROMPT,
                "{backend:?}: {:?}",
                cancelled_at.elapsed()
            );
            assert!(
                common::wait_until(Duration::from_secs(5), || saw_cancel.load(Ordering::SeqCst)),
                "{backend:?}: the host function never saw the cancellation"
            );
            assert_serves(backend, &plugin, "a call cancelled in a host function").await;
            // Past cancel_grace: had the call not returned, the host would have stopped it.
            smol::Timer::after(plugin.manifest().timeouts.cancel_grace + Duration::from_millis(300))
                .await;
            let status = plugin.status();
            assert_eq!(
                (status.crashes, status.state),
                (0, PluginState::Ready),
                "{backend:?}: {:?}",
                status.last_crash
            );
            host.shutdown().await;
        });
    }

    /// Host functions the plugin imports and the app registered (`HostBuilder::function`)
    /// answer it, one may call the same plugin back, and their failures reach the plugin
    /// with their own kinds: an error (`Failed`), a panic (`Panicked`), one it does not
    /// import (`NotImported`), one granted to another plugin only (`NotGranted`), one
    /// nobody registered (`NotFound`). A refused function does not run, and the plugin
    /// serves on after each.
    fn host_functions_answer_and_their_failures_have_their_kinds(backend: Backend) {
        let ran = Arc::new(AtomicUsize::new(0));
        let (not_listed, secret) = (ran.clone(), ran.clone());
        let me: Arc<std::sync::OnceLock<Plugin>> = Arc::default();
        let slot = me.clone();
        let host = common::builder()
            .function("math.add", |_: HostCallContext, add: Add| async move {
                Ok::<i64, HostError>(add.a + add.b)
            })
            .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                let mut out = b"host:".to_vec();
                out.extend_from_slice(&input);
                Ok(out)
            })
            // Calls the plugin's `double` back.
            .function("reenter", move |_: HostCallContext, n: u64| {
                let plugin = slot.get().cloned();
                async move {
                    let plugin = plugin.ok_or_else(|| HostError::new("not loaded yet"))?;
                    let doubled: u64 = plugin.call("double", &n).await?;
                    Ok(doubled)
                }
            })
            .raw_function("fail", |_: HostCallContext, _: Vec<u8>| async {
                Err::<Vec<u8>, _>(HostError::new("disk full"))
            })
            .raw_function("panic", |_: HostCallContext, _: Vec<u8>| async {
                if true {
                    panic!("host function blew up");
                }
                Ok(Vec::new())
            })
            .raw_function("notlisted", move |_: HostCallContext, _: Vec<u8>| {
                not_listed.fetch_add(1, Ordering::SeqCst);
                async { Ok(b"should not run".to_vec()) }
            })
            .raw_function_for("other", "secret", move |_: HostCallContext, _: Vec<u8>| {
                secret.fetch_add(1, Ordering::SeqCst);
                async { Ok(b"the secret".to_vec()) }
            })
            .build()
            .unwrap();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "callbacks")).await;
            me.set(plugin.clone()).unwrap();
            let sum: i64 = plugin
                .call("add", &Add { a: 40, b: 2 })
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: add: {e}"));
            assert_eq!(sum, 42, "{backend:?}");
            let outcome = ask(backend, &plugin, "echo", &[0, 1, 0xff]).await;
            assert_eq!(
                outcome.ok.as_deref().map(Vec::as_slice),
                Some(&b"host:\x00\x01\xff"[..]),
                "{backend:?}: {outcome:?}"
            );
            let out: u64 = plugin
                .call("reenter", &20u64)
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: reenter: {e}"));
            assert_eq!(out, 41, "{backend:?}: 2n+1");
            for (function, kind, says) in [
                ("fail", "Failed", "disk full"),
                ("panic", "Panicked", "host function blew up"),
                ("notlisted", "NotImported", "notlisted"),
                ("secret", "NotGranted", "secret"),
                ("missing", "NotFound", "missing"),
            ] {
                let outcome = ask(backend, &plugin, function, b"x").await;
                let (got, message) = refused(backend, function, outcome);
                assert_eq!(got, kind, "{backend:?}: `{function}`: {message}");
                assert!(
                    message.contains(says),
                    "{backend:?}: `{function}`: {message}"
                );
                let doubled: u64 = plugin
                    .call("double", &21u64)
                    .await
                    .unwrap_or_else(|e| panic!("{backend:?}: the call after `{function}`: {e}"));
                assert_eq!(doubled, 42, "{backend:?}");
            }
            assert_eq!(
                ran.load(Ordering::SeqCst),
                0,
                "{backend:?}: a refused function ran"
            );
            assert_eq!(plugin.status().crashes, 0, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// A stream delivers every item in order, then the method's output; raw items keep
    /// their sizes and bytes.
    fn a_stream_delivers_every_item_in_order(backend: Backend) {
        const N: u64 = 10_000;
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "callbacks")).await;
            let count = Count {
                n: N,
                size: 0,
                sizes: Vec::new(),
            };
            let mut stream = plugin.call_stream::<_, u64>("count", &count);
            let mut expected = 0u64;
            while let Some(item) = stream.next().await {
                let item = item.unwrap_or_else(|e| panic!("{backend:?}: item {expected}: {e}"));
                assert_eq!(item, expected, "{backend:?}: out of order");
                expected += 1;
            }
            assert_eq!(expected, N, "{backend:?}: items received");
            let output: u64 = stream.output().expect("the stream ended").unwrap();
            assert_eq!(output, N, "{backend:?}");
            assert!(
                stream.next().await.is_none(),
                "{backend:?}: an item after the end"
            );

            let sizes = vec![0, 1, 70_000];
            let count = Count {
                n: 3,
                size: 1000,
                sizes: sizes.clone(),
            };
            let input = rmp_serde::to_vec_named(&count).unwrap();
            let mut stream = plugin.call_stream_raw("count", input, CallOptions::new());
            let mut items = Vec::new();
            while let Some(item) = stream.next().await {
                items.push(
                    item.unwrap_or_else(|e| panic!("{backend:?}: raw item {}: {e}", items.len())),
                );
            }
            let mut expected: Vec<Vec<u8>> = sizes.iter().map(|&s| vec![0x5a; s]).collect();
            expected.extend(std::iter::repeat_n(vec![0xa5; 1000], 3));
            assert!(
                items == expected,
                "{backend:?}: raw items of sizes {:?}",
                items.iter().map(Vec::len).collect::<Vec<_>>()
            );
            let output: u64 = stream.output().expect("the stream ended").unwrap();
            assert_eq!(output, 3, "{backend:?}");
            assert_serves(backend, &plugin, "two streams").await;
            let status = plugin.status();
            assert_eq!(
                (status.calls, status.failures),
                (3, 0),
                "{backend:?}: two streams and a call"
            );
            host.shutdown().await;
        });
    }

    /// Dropping a stream part-way stops the method (its next `emit` fails), nothing is
    /// killed, and the plugin serves on.
    fn dropping_a_stream_part_way_stops_the_method_and_the_plugin_serves_on(backend: Backend) {
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "callbacks")).await;
            let count = Count {
                n: 100_000_000,
                size: 0,
                sizes: Vec::new(),
            };
            let mut stream = plugin.call_stream::<_, u64>("count", &count);
            for expected in 0..10u64 {
                let item = stream.next().await.expect("an item");
                assert_eq!(
                    item.unwrap_or_else(|e| panic!("{backend:?}: {e}")),
                    expected,
                    "{backend:?}"
                );
            }
            drop(stream);
            assert_serves(backend, &plugin, "a dropped stream").await;
            assert!(
                common::wait_until(Duration::from_secs(5), || plugin
                    .status()
                    .instances
                    .iter()
                    .all(|i| i.in_flight == 0)),
                "{backend:?}: the dropped stream's method still runs: {:?}",
                plugin.status().instances
            );
            // Past cancel_grace: had the method not stopped, the host would have stopped it.
            smol::Timer::after(plugin.manifest().timeouts.cancel_grace + Duration::from_millis(300))
                .await;
            let status = plugin.status();
            assert_eq!(
                (status.crashes, status.state),
                (0, PluginState::Ready),
                "{backend:?}: {:?}",
                status.last_crash
            );
            assert_serves(backend, &plugin, "a dropped stream, later").await;
            host.shutdown().await;
        });
    }

    /// `shutdown()` lets a call in flight finish (here: one waiting in a host function),
    /// while new calls fail with `Stopped` at once.
    fn shutdown_lets_a_call_in_flight_finish_and_refuses_new_ones(backend: Backend) {
        let (arrived, release) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let host = waiting_host(&arrived, &release).build().unwrap();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "callbacks")).await;
            let call = ask_wait(&plugin, 7);
            assert!(
                common::wait_until(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
                    == 1),
                "{backend:?}: the call never reached the host function"
            );
            let stopping = plugin.clone();
            let shutdown = smol::spawn(async move { stopping.shutdown().await });
            assert!(
                common::wait_until(PROMPT, || plugin.is_stopped()),
                "{backend:?}: shutdown() did not begin"
            );
            match call_error(
                backend,
                "a call during shutdown",
                plugin.call_raw("echo", b"late".to_vec()).await,
            ) {
                CallError::Stopped { .. } => {}
                other => panic!("{backend:?}: expected Stopped, got {other:?}"),
            }
            release.store(true, Ordering::SeqCst);
            assert_waited(backend, 7, call.await);
            shutdown.await;
            assert_eq!(plugin.status().state, PluginState::Stopped, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// `reload()`: isolated and wasm switch to the library as it is on disk (a new worker,
    /// a new module) and serve on; in-process it is refused (`ReloadUnsupported`: a library
    /// cannot be unloaded) and the plugin serves on.
    fn reload_switches_to_the_library_on_disk_where_the_backend_can(backend: Backend) {
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "hello")).await;
            let events = plugin.subscribe();
            let pid = plugin.worker_pid();
            let result = plugin.reload().await;
            match backend {
                Backend::InProcess => match result {
                    Err(Error::Load(plugin_host::LoadError::ReloadUnsupported {
                        plugin: name,
                        ..
                    })) => {
                        assert_eq!(name, "hello", "{backend:?}");
                    }
                    other => panic!("{backend:?}: expected ReloadUnsupported, got {other:?}"),
                },
                Backend::Isolated | Backend::Wasm => {
                    result.unwrap_or_else(|e| panic!("{backend:?}: reload: {e}"));
                    let event = wait_for_event(backend, &events, PROMPT, "Reloaded event", |e| {
                        matches!(e, PluginEvent::Reloaded { .. })
                    })
                    .await;
                    assert!(
                        matches!(&event, PluginEvent::Reloaded { version } if version == "0.1.0"),
                        "{event:?}"
                    );
                    if backend == Backend::Isolated {
                        let (before, after) = (pid.expect("a worker ran"), plugin.worker_pid());
                        assert!(
                            after.is_some_and(|p| p != before),
                            "{backend:?}: worker {before} then {after:?}"
                        );
                    }
                }
            }
            assert_eq!(plugin.methods(), ["greet", "echo"], "{backend:?}");
            let out: Greeting = plugin
                .call("greet", &Greet { name: "again" })
                .await
                .unwrap_or_else(|e| panic!("{backend:?}: greet after reload: {e}"));
            assert_eq!(out.message, "Hello, again!", "{backend:?}");
            assert_eq!(plugin.status().state, PluginState::Ready, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// Status: the call and failure counters, the runtime and trust, the state `Ready`;
    /// `enable()` is `false` when not quarantined; after `shutdown()` calls fail with
    /// `Stopped` (and are counted) and the state is `Stopped`.
    fn status_counts_calls_and_shutdown_stops_the_plugin(backend: Backend) {
        let host = common::host();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "hello")).await;
            let _: Greeting = plugin.call("greet", &Greet { name: "a" }).await.unwrap();
            plugin.call_raw("echo", b"b".to_vec()).await.unwrap();
            call_error(
                backend,
                "unknown method",
                plugin.call::<_, ()>("nope", &()).await,
            );
            call_error(
                backend,
                "bad input",
                plugin.call::<_, Greeting>("greet", &7).await,
            );
            call_error(
                backend,
                "plugin error",
                plugin
                    .call::<_, Greeting>("greet", &Greet { name: "" })
                    .await,
            );
            let status = plugin.status();
            assert_eq!((status.calls, status.failures), (5, 3), "{backend:?}");
            assert_eq!(status.state, PluginState::Ready, "{backend:?}");
            assert_eq!((status.crashes, status.restarts), (0, 0), "{backend:?}");
            assert!(status.uptime.is_some(), "{backend:?}");
            let (runtime, trust) = match backend {
                Backend::InProcess => (Runtime::Native, Trust::Trusted),
                Backend::Isolated => (Runtime::Native, Trust::Untrusted),
                // The grant, as the manifest asked (hello: untrusted); it does not pick the engine.
                Backend::Wasm => (Runtime::Wasm, Trust::Untrusted),
            };
            assert_eq!(
                (plugin.runtime(), plugin.trust()),
                (runtime, trust),
                "{backend:?}"
            );
            match backend {
                Backend::InProcess => {
                    assert_eq!(status.pid, None, "{backend:?}");
                    assert!(
                        status.sandbox.is_empty(),
                        "{backend:?}: {:?}",
                        status.sandbox
                    );
                }
                Backend::Isolated => {
                    let pid = status.pid.expect("a worker runs");
                    assert_ne!(pid, std::process::id(), "{backend:?}");
                    assert_eq!(plugin.worker_pid(), Some(pid), "{backend:?}");
                    #[cfg(target_os = "linux")]
                    assert!(
                        !status.sandbox.is_empty(),
                        "{backend:?}: no sandbox layer in force"
                    );
                }
                Backend::Wasm => {
                    assert_eq!(status.pid, None, "{backend:?}");
                    assert_eq!(status.sandbox.len(), 3, "{backend:?}: {:?}", status.sandbox);
                    assert!(
                        status
                            .sandbox
                            .iter()
                            .all(|l| l.starts_with("webassembly: ")),
                        "{backend:?}: {:?}",
                        status.sandbox
                    );
                }
            }
            assert!(
                !plugin.enable().await,
                "{backend:?}: enable() of a plugin that is not quarantined"
            );
            let events = plugin.subscribe();

            plugin.shutdown().await;
            assert_eq!(plugin.status().state, PluginState::Stopped, "{backend:?}");
            assert!(plugin.is_stopped(), "{backend:?}");
            wait_for_event(backend, &events, PROMPT, "Stopped event", |e| {
                matches!(e, PluginEvent::Stopped)
            })
            .await;
            for result in [
                plugin.call_raw("echo", b"late".to_vec()).await.map(|_| ()),
                plugin
                    .call::<_, Greeting>("greet", &Greet { name: "late" })
                    .await
                    .map(|_| ()),
            ] {
                match call_error(backend, "a call after shutdown", result) {
                    CallError::Stopped { plugin } => assert_eq!(plugin, "hello", "{backend:?}"),
                    other => panic!("{backend:?}: expected Stopped, got {other:?}"),
                }
            }
            let status = plugin.status();
            assert_eq!((status.calls, status.failures), (7, 5), "{backend:?}");
            host.shutdown().await;
        });
    }

    crashing:

    /// `abort` crashes the plugin: `Crashed`, with the backend's exit kind (isolated: the
    /// abort signal or status; wasm: trap kind `unreachable`); a replacement serves the
    /// next call and the restart is counted.
    fn abort_is_a_crash_and_a_replacement_serves_the_next_call(backend: Backend) {
        assert_crash_then_replacement(backend, "abort", json!(null), |backend, report| {
            let exit = report
                .exit
                .as_ref()
                .unwrap_or_else(|| panic!("no exit in {report}"));
            match backend {
                Backend::Wasm => assert_eq!(exit.trap_kind(), Some("unreachable"), "{report}"),
                _ => assert_eq!(common::fault_name(exit), Some(common::ABORT), "{report}"),
            }
        });
    }

    /// Unbounded recursion crashes the plugin: isolated, one of the stack-overflow
    /// signals or statuses; wasm, trap kind `stack overflow`, or `out of bounds memory
    /// access` when the shadow stack overflows first.
    fn a_stack_overflow_is_a_crash_and_a_replacement_serves_the_next_call(backend: Backend) {
        assert_crash_then_replacement(backend, "stack_overflow", json!(null), |backend, report| {
            let exit = report
                .exit
                .as_ref()
                .unwrap_or_else(|| panic!("no exit in {report}"));
            match backend {
                Backend::Wasm => assert!(
                    matches!(
                        exit.trap_kind(),
                        Some("stack overflow" | "out of bounds memory access")
                    ),
                    "{report}"
                ),
                _ => assert!(
                    common::fault_name(exit).is_some_and(|n| common::STACK_OVERFLOW.contains(&n)),
                    "{report}"
                ),
            }
        });
    }

    /// `std::process::exit(42)` mid-call: isolated, the worker's exit code; wasm, trap
    /// kind `unreachable` (there is no process to exit).
    fn exit_mid_call_is_a_crash_and_a_replacement_serves_the_next_call(backend: Backend) {
        assert_crash_then_replacement(backend, "exit", json!({"code": 42}), |backend, report| {
            let exit = report
                .exit
                .as_ref()
                .unwrap_or_else(|| panic!("no exit in {report}"));
            match backend {
                Backend::Wasm => assert_eq!(exit.trap_kind(), Some("unreachable"), "{report}"),
                _ => assert_eq!(exit.code(), Some(42), "{report}"),
            }
        });
    }

    /// A write through a null pointer: isolated, `Crashed` with the segfault signal
    /// (access violation); wasm, no fault at all (address 0 is ordinary linear memory):
    /// the call returns.
    fn a_null_write_crashes_a_worker_but_not_a_wasm_instance(backend: Backend) {
        match backend {
            Backend::Wasm => {
                let host = common::host();
                run(async {
                    let plugin = load(&host, backend, manifest(backend, "faulty")).await;
                    plugin
                        .call::<_, ()>("segfault", &())
                        .await
                        .unwrap_or_else(|e| panic!("{backend:?}: a null write in wasm: {e}"));
                    assert_serves(backend, &plugin, "a null write").await;
                    assert_eq!(plugin.status().crashes, 0, "{backend:?}");
                    host.shutdown().await;
                });
            }
            _ => assert_crash_then_replacement(backend, "segfault", json!(null), |_, report| {
                let exit = report
                    .exit
                    .as_ref()
                    .unwrap_or_else(|| panic!("no exit in {report}"));
                assert_eq!(common::fault_name(exit), Some(common::SEGFAULT), "{report}");
            }),
        }
    }

    /// A crash while other calls are in flight: isolated, every call on that worker fails
    /// with the same `Crashed` report (it lists them all); wasm, only the trapping
    /// instance is lost, and the other calls, on other instances, get their answers.
    fn a_crash_fails_the_calls_sharing_its_worker_but_no_other_wasm_instance(backend: Backend) {
        const WAITING: u64 = 3;
        let (arrived, release) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let host = waiting_host(&arrived, &release)
            .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                Ok(input)
            })
            .build()
            .unwrap();
        run(async {
            let plugin = load(&host, backend, manifest(backend, "callbacks")).await;
            let waiting: Vec<_> = (0..WAITING).map(|i| ask_wait(&plugin, i)).collect();
            assert!(
                common::wait_until(Duration::from_secs(5), || arrived.load(Ordering::SeqCst)
                    == WAITING as usize),
                "{backend:?}: only {} calls reached the host function",
                arrived.load(Ordering::SeqCst)
            );
            let result = plugin
                .call::<_, ()>(
                    "ask_then_crash",
                    &Ask {
                        function: "echo",
                        input: b"x",
                    },
                )
                .await;
            let report = crash_report(
                backend,
                "ask_then_crash",
                call_error(backend, "ask_then_crash", result),
            );
            let exit = report
                .exit
                .as_ref()
                .unwrap_or_else(|| panic!("no exit in {report}"));
            match backend {
                Backend::Wasm => {
                    assert_eq!(exit.trap_kind(), Some("unreachable"), "{report}");
                    assert_eq!(report.in_flight, ["ask_then_crash"], "{report}");
                    release.store(true, Ordering::SeqCst);
                    for (i, call) in waiting.into_iter().enumerate() {
                        assert_waited(backend, i as u64, call.await);
                    }
                }
                _ => {
                    assert_eq!(common::fault_name(exit), Some(common::ABORT), "{report}");
                    let asks = report.in_flight.iter().filter(|m| *m == "ask").count();
                    assert_eq!(asks as u64, WAITING, "{report}");
                    for (i, call) in waiting.into_iter().enumerate() {
                        match call_error(backend, "a call on the crashed worker", call.await) {
                            CallError::Crashed { report: theirs, .. } => assert!(
                                Arc::ptr_eq(&theirs, &report),
                                "{backend:?}: call {i} got another report: {theirs}"
                            ),
                            other => panic!("{backend:?}: call {i}: expected Crashed, got {other:?}"),
                        }
                    }
                    release.store(true, Ordering::SeqCst);
                }
            }
            assert_serves(backend, &plugin, "a crash with calls in flight").await;
            assert_eq!(plugin.status().crashes, 1, "{backend:?}");
            host.shutdown().await;
        });
    }

    /// A memory bomb stops at `limits.memory`: `Crashed` with `report.limit` naming the
    /// limit (isolated: the worker's allocation failed under its limit; wasm: the
    /// instance's memory could not grow past it), and a replacement serves the next call.
    fn a_memory_bomb_is_stopped_at_the_memory_limit(backend: Backend) {
        const LIMIT: u64 = 256 << 20;
        let host = common::host();
        let mut m = manifest(backend, "faulty");
        m.limits.memory = Some(LIMIT);
        run(async {
            let plugin = load(&host, backend, m).await;
            let missing = plugin.status().sandbox_missing;
            if let Some(line) = missing.iter().find(|l| l.starts_with("memory limit")) {
                // Wine ignores a job's memory limit, and says so; without the limit the
                // bomb would take the machine's memory, so that report is what is checked.
                assert!(
                    cfg!(windows) && backend == Backend::Isolated && line.contains("Wine"),
                    "{backend:?}: the memory limit is not in force: {line}"
                );
                eprintln!("{backend:?}: not run: {line}");
                host.shutdown().await;
                return;
            }
            let started = Instant::now();
            let result = plugin
                .call::<_, ()>("alloc", &json!({"chunk": 16 << 20}))
                .await;
            let report = crash_report(backend, "alloc", call_error(backend, "alloc", result));
            eprintln!(
                "{backend:?}: the memory bomb took {:?}: {report}",
                started.elapsed()
            );
            assert_eq!(
                report.limit,
                Some(plugin_host::LimitExceeded::Memory { bytes: LIMIT }),
                "{report}"
            );
            assert_serves(backend, &plugin, "a memory bomb").await;
            host.shutdown().await;
        });
    }

    /// With `restart.max_crashes = 1`, the first crash is restarted and the second
    /// quarantines the plugin: the next call fails with `Quarantined` at once, and
    /// `enable()` brings it back.
    fn a_crash_past_the_budget_quarantines_until_enable(backend: Backend) {
        let host = common::host();
        let mut m = manifest(backend, "faulty");
        m.restart.max_crashes = 1;
        run(async {
            let plugin = load(&host, backend, m).await;
            let events = plugin.subscribe();
            let result = plugin.call::<_, ()>("abort", &()).await;
            crash_report(
                backend,
                "the first abort",
                call_error(backend, "the first abort", result),
            );
            assert_serves(backend, &plugin, "the first crash").await;
            assert_eq!(plugin.status().state, PluginState::Ready, "{backend:?}");

            let result = plugin.call::<_, ()>("abort", &()).await;
            let report = crash_report(
                backend,
                "the second abort",
                call_error(backend, "the second abort", result),
            );
            wait_for_event(backend, &events, PROMPT, "Quarantined event", |e| {
                matches!(e, PluginEvent::Quarantined(_))
            })
            .await;
            let started = Instant::now();
            let result = plugin.call_raw("echo", b"quarantined?".to_vec()).await;
            match call_error(backend, "a call while quarantined", result) {
                CallError::Quarantined {
                    plugin: name,
                    report: last,
                } => {
                    assert_eq!(name, "faulty", "{backend:?}");
                    assert!(
                        Arc::ptr_eq(&last, &report),
                        "{backend:?}: {last} is not the crash that spent the budget: {report}"
                    );
                }
                other => panic!("{backend:?}: expected Quarantined, got {other:?}"),
            }
            assert!(
                started.elapsed() < PROMPT,
                "{backend:?}: Quarantined after {:?}",
                started.elapsed()
            );
            let status = plugin.status();
            assert_eq!(
                (status.state, status.crashes),
                (PluginState::Quarantined, 2),
                "{backend:?}"
            );

            assert!(
                plugin.enable().await,
                "{backend:?}: enable() of a quarantined plugin"
            );
            wait_for_event(backend, &events, PROMPT, "Enabled event", |e| {
                matches!(e, PluginEvent::Enabled)
            })
            .await;
            assert_serves(backend, &plugin, "enable()").await;
            assert_eq!(plugin.status().state, PluginState::Ready, "{backend:?}");
            assert!(
                !plugin.enable().await,
                "{backend:?}: enable() once it serves again"
            );
            host.shutdown().await;
        });
    }
}

/// Crashes a fresh `faulty` with `method`: the call fails with `Crashed` (its report
/// checked by `check`, naming the method), the next call is served by a replacement
/// (isolated: a new worker pid; wasm: a `Restarted` event), and `status()` counts the crash
/// and the restart.
fn assert_crash_then_replacement(
    backend: Backend,
    method: &str,
    input: serde_json::Value,
    check: impl Fn(Backend, &CrashReport),
) {
    assert_ne!(
        backend,
        Backend::InProcess,
        "a crash in-process would take the test down"
    );
    let host = common::host();
    run(async {
        let plugin = load(&host, backend, manifest(backend, "faulty")).await;
        let events = plugin.subscribe();
        let first_pid = plugin.worker_pid();
        let result = plugin.call::<_, ()>(method, &input).await;
        let report = crash_report(backend, method, call_error(backend, method, result));
        check(backend, &report);
        assert_eq!(report.plugin, "faulty", "{report}");
        assert_eq!(report.in_flight, [method], "{report}");
        assert_eq!(report.killed_by_host, None, "{report}");
        assert_serves(backend, &plugin, method).await;
        match backend {
            Backend::Isolated => {
                let (first, second) = (first_pid.expect("a worker ran"), plugin.worker_pid());
                assert!(
                    second.is_some_and(|p| p != first),
                    "{backend:?}: worker {first} then {second:?}"
                );
            }
            _ => {
                let event = wait_for_event(backend, &events, PROMPT, "Restarted event", |e| {
                    matches!(e, PluginEvent::Restarted { .. })
                })
                .await;
                assert!(
                    matches!(event, PluginEvent::Restarted { restarts: 1, .. }),
                    "{backend:?}: {event:?}"
                );
            }
        }
        assert!(
            common::wait_until(PROMPT, || plugin.status().restarts == 1),
            "{backend:?}: restarts {}",
            plugin.status().restarts
        );
        let status = plugin.status();
        assert_eq!(
            (status.state, status.crashes),
            (PluginState::Ready, 1),
            "{backend:?}"
        );
        assert!(
            status
                .last_crash
                .is_some_and(|last| Arc::ptr_eq(&last, &report)),
            "{backend:?}"
        );
        host.shutdown().await;
    });
}
