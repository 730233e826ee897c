//! The WebAssembly backend's containment: what a wasm plugin can do to the host, and what
//! the host does about it. Ordinary behaviours over every backend are in `conformance.rs`;
//! these are the wasm-specific ones:
//!
//! - every trap of the example `faulty` plugin ends one instance, with the exact report,
//!   and neither the next call nor another plugin in the same host notices;
//! - a call that spins is answered at its deadline and stopped `cancel_grace` later;
//! - the restart policy (backoff, quarantine, `enable`) and `reload` apply to instances;
//! - a pool of instances serves many callers, none lost;
//! - hand-written hostile modules (built from one valid template in WebAssembly text,
//!   [`Module`], breaking one thing at a time) are refused at load with the exact error,
//!   or crash only the call that met the lie.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{host, run, run_with_limit, wasm_dir, wasm_manifest, Greet, Greeting};
use plugin_host::{
    CallError, CallOptions, CrashReport, Error, EventReceiver, LimitExceeded, LoadError, Manifest,
    Plugin, PluginEvent, PluginState, Progress, Runtime,
};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// One test at a time among those that spin a CPU on purpose or measure the process's
/// memory or CPU: they would disturb each other's measurements.
fn alone() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The crash report of a call that crashed running `method` of plugin `plugin`.
fn crash_of(
    outcome: Result<impl std::fmt::Debug, Error>,
    plugin: &str,
    method: &str,
) -> Arc<CrashReport> {
    match outcome {
        Err(Error::Call(CallError::Crashed {
            plugin: p,
            method: m,
            report,
        })) => {
            assert_eq!((p.as_str(), m.as_str()), (plugin, method));
            assert_eq!(report.plugin, plugin);
            assert_eq!(report.in_flight, [method]);
            report
        }
        other => panic!("expected Crashed running `{method}`, got {other:?}"),
    }
}

/// The trap kind of a wasm crash report.
fn trap_kind(report: &CrashReport) -> &str {
    report
        .exit
        .as_ref()
        .and_then(|e| e.trap_kind())
        .unwrap_or_else(|| panic!("not a trap: {report}"))
}

/// The next event, failing the test if none comes within `within`.
async fn next_event(events: &EventReceiver, within: Duration) -> PluginEvent {
    futures_lite::future::or(
        async { events.recv().await.expect("the event channel closed") },
        async {
            smol::Timer::after(within).await;
            panic!("no plugin event within {within:?}")
        },
    )
    .await
}

/// The 1-based number of the line of `file` (from the repository root) containing `text`.
fn line_of(file: &str, text: &str) -> u32 {
    let source = std::fs::read_to_string(common::repo().join(file)).unwrap();
    let index = source
        .lines()
        .position(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no `{text}` in {file}"));
    index as u32 + 1
}

// ---- the example `faulty` plugin as WebAssembly -----------------------------------------

/// Runs `method` of wasm `faulty` (its manifest changed by `tweak`) while `hello`, loaded
/// as wasm in the same host, answers greetings; hands the outcome to `check`; then checks
/// that `faulty`'s next call is served and that `hello` saw nothing at all.
fn fault_then_recovery(
    method: &str,
    input: serde_json::Value,
    tweak: impl FnOnce(&mut Manifest),
    check: impl FnOnce(Result<(), Error>),
) {
    let host = host();
    let mut m = wasm_manifest("faulty");
    tweak(&mut m);
    let (faulty, hello) = run(async {
        let faulty = host.load_manifest(m).await.unwrap();
        let hello = host.load_manifest(wasm_manifest("hello")).await.unwrap();
        (faulty, hello)
    });
    assert_eq!(faulty.runtime(), Runtime::Wasm);
    assert_eq!(hello.runtime(), Runtime::Wasm);
    let hello_events = hello.subscribe();
    let greet = |i: usize| {
        let hello = hello.clone();
        async move {
            let name = format!("bystander {i}");
            let out: Greeting = hello.call("greet", &Greet { name: &name }).await.unwrap();
            assert_eq!(out.message, format!("Hello, {name}!"));
        }
    };
    // During: greetings interleave with the faulty call.
    let outcome = run(futures_lite::future::zip(
        faulty.call::<_, ()>(method, &input),
        async {
            for i in 0..20 {
                greet(i).await;
            }
        },
    ))
    .0;
    check(outcome);
    run(async {
        assert_eq!(
            faulty
                .call_raw("echo", b"next call".to_vec())
                .await
                .unwrap(),
            b"next call",
            "the same Plugin serves the next call"
        );
        // After: hello still answers and never noticed.
        greet(20).await;
    });
    let status = hello.status();
    assert_eq!(
        (
            status.state,
            status.crashes,
            status.restarts,
            status.failures
        ),
        (PluginState::Ready, 0, 0, 0)
    );
    assert!(
        hello_events.try_recv().is_err(),
        "hello got an event: {:?}",
        hello_events.try_recv()
    );
}

#[test]
fn a_panic_traps_with_its_message_and_location_in_the_report() {
    let line = line_of("plugins/faulty/src/lib.rs", "panic!(\"{}\", m.message)");
    fault_then_recovery(
        "panic",
        json!({"message": "kaboom in wasm"}),
        |_| {},
        |outcome| {
            let report = crash_of(outcome, "faulty", "panic");
            assert_eq!(trap_kind(&report), "unreachable");
            assert_eq!(report.panic.as_deref(), Some("kaboom in wasm"));
            let location = report.panic_location.as_deref().expect("a panic location");
            let mut parts = location.rsplitn(3, ':');
            let (column, at, file) = (parts.next(), parts.next(), parts.next());
            assert!(
                file.is_some_and(|f| f.ends_with("faulty/src/lib.rs")),
                "{location}"
            );
            assert_eq!(at.and_then(|l| l.parse().ok()), Some(line), "{location}");
            assert!(
                column.is_some_and(|c| c.parse::<u32>().is_ok()),
                "{location}"
            );
            assert_eq!(report.limit, None);
            assert_eq!(report.killed_by_host, None);
        },
    );
}

#[test]
fn abort_traps_as_unreachable_without_a_panic() {
    fault_then_recovery(
        "abort",
        json!(null),
        |_| {},
        |outcome| {
            let report = crash_of(outcome, "faulty", "abort");
            assert_eq!(trap_kind(&report), "unreachable");
            assert_eq!(
                (report.panic.as_deref(), report.limit.as_ref()),
                (None, None)
            );
        },
    );
}

#[test]
fn exit_traps_as_unreachable_without_a_panic() {
    fault_then_recovery(
        "exit",
        json!({"code": 3}),
        |_| {},
        |outcome| {
            let report = crash_of(outcome, "faulty", "exit");
            assert_eq!(trap_kind(&report), "unreachable");
            assert_eq!(
                (report.panic.as_deref(), report.limit.as_ref()),
                (None, None)
            );
        },
    );
}

#[test]
fn a_stack_overflow_traps_as_one() {
    fault_then_recovery(
        "stack_overflow",
        json!(null),
        |_| {},
        |outcome| {
            let report = crash_of(outcome, "faulty", "stack_overflow");
            // The engine's call stack, or the shadow stack in linear memory, whichever is
            // exhausted first.
            assert!(
                ["stack overflow", "out of bounds memory access"].contains(&trap_kind(&report)),
                "{report}"
            );
            assert_eq!(report.panic, None);
        },
    );
}

#[test]
fn a_memory_bomb_stops_at_limits_memory_and_the_host_does_not_grow_with_it() {
    let _alone = alone();
    let limit = 64 * MIB;
    #[cfg(target_os = "linux")]
    let before = common::reset_peak_memory();
    fault_then_recovery(
        "alloc",
        json!({"chunk": MIB}),
        |m| m.limits.memory = Some(limit),
        |outcome| {
            let report = crash_of(outcome, "faulty", "alloc");
            assert_eq!(report.limit, Some(LimitExceeded::Memory { bytes: limit }));
            // Rust aborts when an allocation fails.
            assert_eq!(trap_kind(&report), "unreachable", "{report}");
        },
    );
    #[cfg(target_os = "linux")]
    {
        let growth = common::peak_memory().saturating_sub(before);
        eprintln!(
            "memory bomb capped at 64 MiB: the host's peak grew by {} MiB",
            growth / MIB
        );
        assert!(
            growth < 2 * limit,
            "the host's peak grew by {} MiB for a 64 MiB cap",
            growth / MIB
        );
    }
}

#[test]
fn a_null_write_does_not_fault_in_wasm() {
    // Documented: address 0 is ordinary linear memory.
    fault_then_recovery(
        "segfault",
        json!(null),
        |_| {},
        |outcome| {
            outcome.unwrap();
        },
    );
}

// ---- deadlines ---------------------------------------------------------------------------

/// CPU time (user + system, in clock ticks) of each thread of this process.
#[cfg(target_os = "linux")]
fn thread_ticks() -> std::collections::HashMap<u32, u64> {
    let mut ticks = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the parenthesised name: state (field 3) ... utime (14), stime (15).
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        if fields.len() > 12 {
            ticks.insert(tid, fields[10] + fields[11]);
        }
    }
    ticks
}

#[cfg(target_os = "linux")]
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

/// The CPU time `tid` used between two [`thread_ticks`] snapshots.
#[cfg(target_os = "linux")]
fn cpu_between(
    before: &std::collections::HashMap<u32, u64>,
    after: &std::collections::HashMap<u32, u64>,
    tid: u32,
) -> Duration {
    let ticks = after.get(&tid).copied().unwrap_or(0) - before.get(&tid).copied().unwrap_or(0);
    Duration::from_millis(ticks * 1000 / ticks_per_second())
}

#[test]
fn a_spinning_call_times_out_at_its_deadline_and_its_instance_is_stopped_after_the_grace() {
    let _alone = alone();
    let deadline = Duration::from_millis(400);
    let grace = Duration::from_millis(600);
    let mut m = wasm_manifest("faulty");
    m.timeouts.cancel_grace = grace;
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    run_with_limit(Duration::from_secs(20), async {
        let started = Instant::now();
        let spinner = plugin.clone();
        let spin = smol::spawn(async move {
            let options = CallOptions::new().timeout(deadline);
            let outcome = spinner
                .call_with::<_, ()>("infinite_loop", &json!(null), options)
                .await;
            (outcome, Instant::now())
        });
        smol::Timer::after(Duration::from_millis(100)).await;
        #[cfg(target_os = "linux")]
        let (window, during) = (Instant::now(), thread_ticks());

        // The host serves other calls meanwhile, on another instance.
        let echo = plugin
            .call_raw("echo", b"meanwhile".to_vec())
            .await
            .unwrap();
        assert_eq!(echo, b"meanwhile");
        assert!(
            !spin.is_finished(),
            "the echo came back while the loop spins"
        );

        smol::Timer::after(Duration::from_millis(200)).await;
        #[cfg(target_os = "linux")]
        let spinner_thread = {
            let now = thread_ticks();
            let (&tid, _) = now
                .iter()
                .max_by_key(|(tid, t)| **t - during.get(tid).copied().unwrap_or(0))
                .unwrap();
            let used = cpu_between(&during, &now, tid);
            let span = window.elapsed();
            eprintln!("while it spins: its thread used {used:?} of CPU in {span:?}");
            assert!(used >= span / 10, "no thread spins: {used:?} in {span:?}");
            tid
        };

        // At the deadline: a timeout, at once (not when the instance is stopped).
        let (outcome, timed_out) = spin.await;
        match outcome {
            Err(Error::Call(CallError::Timeout { method, after, .. })) => {
                assert_eq!((method.as_str(), after), ("infinite_loop", deadline));
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        let answered = timed_out - started;
        assert!(
            answered >= deadline && answered < deadline + grace / 2,
            "the timeout came {answered:?} after the call started (deadline {deadline:?})"
        );

        // `cancel_grace` later the host stops the instance.
        let report = loop {
            match next_event(&events, grace + Duration::from_secs(5)).await {
                PluginEvent::Crashed(report) => break report,
                _ => continue,
            }
        };
        let stopped = timed_out.elapsed();
        assert!(
            stopped + Duration::from_millis(50) >= grace
                && stopped < grace + Duration::from_secs(3),
            "stopped {stopped:?} after the timeout; cancel_grace is {grace:?}"
        );
        assert_eq!(trap_kind(&report), "interrupted");
        assert_eq!(report.in_flight, ["infinite_loop"]);
        let why = report.killed_by_host.as_deref().expect("killed_by_host");
        assert!(why.contains("cancel_grace"), "{why}");

        // And the spinning has ended: that thread uses no more CPU.
        #[cfg(target_os = "linux")]
        {
            let (window, before) = (Instant::now(), thread_ticks());
            smol::Timer::after(Duration::from_millis(500)).await;
            let used = cpu_between(&before, &thread_ticks(), spinner_thread);
            let span = window.elapsed();
            eprintln!("after the stop: that thread used {used:?} of CPU in {span:?}");
            assert!(
                used <= span / 5,
                "still spinning: {used:?} of CPU in {span:?}"
            );
        }

        assert_eq!(
            plugin.call_raw("echo", b"after".to_vec()).await.unwrap(),
            b"after"
        );
    });
    assert_eq!(plugin.status().crashes, 1);
}

#[test]
fn shutdown_stops_a_call_that_spins() {
    let _alone = alone();
    let mut m = wasm_manifest("faulty");
    m.timeouts.shutdown = Duration::from_millis(200);
    let plugin = run(host().load_manifest(m)).unwrap();
    run_with_limit(Duration::from_secs(20), async {
        let spinner = plugin.clone();
        let spin = smol::spawn(async move {
            let options = CallOptions::new().timeout(Duration::from_secs(60));
            spinner
                .call_with::<_, ()>("infinite_loop", &json!(null), options)
                .await
        });
        smol::Timer::after(Duration::from_millis(100)).await;
        let started = Instant::now();
        plugin.shutdown().await;
        let outcome = futures_lite::future::or(async { Some(spin.await) }, async {
            smol::Timer::after(Duration::from_secs(5)).await;
            None
        })
        .await
        .expect("the spinning call still runs 5 s after shutdown");
        let report = crash_of(outcome, "faulty", "infinite_loop");
        assert_eq!(trap_kind(&report), "interrupted");
        assert!(
            report
                .killed_by_host
                .as_deref()
                .is_some_and(|w| w.contains("shut down")),
            "{report:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    });
    assert_eq!(plugin.status().state, PluginState::Stopped);
}

// ---- restart policy, quarantine, reload --------------------------------------------------

fn panic_call(plugin: &Plugin) -> Arc<CrashReport> {
    crash_of(
        run(plugin.call::<_, ()>("panic", &json!({"message": "again"}))),
        "faulty",
        "panic",
    )
}

/// How long the next call takes, and that it is answered.
fn timed_echo(plugin: &Plugin) -> Duration {
    let started = Instant::now();
    assert_eq!(run(plugin.call_raw("echo", b"x".to_vec())).unwrap(), b"x");
    started.elapsed()
}

#[test]
fn a_replacement_instance_comes_after_a_backoff_that_doubles_per_crash() {
    let backoff = Duration::from_millis(300);
    let mut m = wasm_manifest("faulty");
    m.restart.backoff = backoff;
    m.restart.max_crashes = 5;
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    for crash in 1..=2u32 {
        let report = panic_call(&plugin);
        assert_eq!(report.restarts, u64::from(crash) - 1);
        let waited = timed_echo(&plugin);
        let expected = backoff * (1 << (crash - 1));
        assert!(
            waited + Duration::from_millis(50) >= expected
                && waited < expected + Duration::from_secs(3),
            "crash {crash}: the next call waited {waited:?}, the backoff is {expected:?}"
        );
        run(async {
            match next_event(&events, Duration::from_secs(1)).await {
                PluginEvent::Crashed(r) => assert!(Arc::ptr_eq(&r, &report)),
                other => panic!("expected Crashed, got {other:?}"),
            }
            match next_event(&events, Duration::from_secs(1)).await {
                PluginEvent::Restarted { pid, restarts } => {
                    assert_eq!((pid, restarts), (std::process::id(), u64::from(crash)));
                }
                other => panic!("expected Restarted, got {other:?}"),
            }
        });
    }
    let status = plugin.status();
    assert_eq!((status.crashes, status.restarts, status.pid), (2, 2, None));
    // With no crash pending, calls do not wait.
    assert!(timed_echo(&plugin) < backoff);
}

/// As a crashed worker is restarted after its backoff, the instance a trap dropped is
/// replaced after the backoff without waiting for a call: `Restarting` meanwhile (no other
/// instance is ready), then a `Restarted` event and `Ready`.
#[test]
fn a_trapped_instance_is_replaced_after_the_backoff_without_a_call() {
    let backoff = Duration::from_millis(300);
    let mut m = wasm_manifest("faulty");
    m.restart.backoff = backoff;
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    panic_call(&plugin);
    assert_eq!(plugin.status().state, PluginState::Restarting);
    run(async {
        match next_event(&events, Duration::from_secs(1)).await {
            PluginEvent::Crashed(_) => {}
            other => panic!("expected Crashed, got {other:?}"),
        }
        let started = Instant::now();
        match next_event(&events, backoff + Duration::from_secs(3)).await {
            PluginEvent::Restarted { restarts, .. } => assert_eq!(restarts, 1),
            other => panic!("expected Restarted, got {other:?}"),
        }
        assert!(started.elapsed() + Duration::from_millis(50) >= backoff);
    });
    let status = plugin.status();
    assert_eq!((status.state, status.restarts), (PluginState::Ready, 1));
    assert!(status.uptime.unwrap() < backoff * 10, "{:?}", status.uptime);
    // The replacement is in the pool: the next call does not wait.
    assert!(timed_echo(&plugin) < backoff);
}

#[test]
fn quarantine_after_max_crashes_until_enable() {
    let mut m = wasm_manifest("faulty");
    m.restart.max_crashes = 2;
    m.restart.backoff = Duration::from_millis(10);
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    for _ in 0..2 {
        panic_call(&plugin);
        timed_echo(&plugin);
    }
    let third = panic_call(&plugin);
    match run(plugin.call_raw("echo", b"x".to_vec())) {
        Err(Error::Call(CallError::Quarantined {
            plugin: name,
            report,
        })) => {
            assert_eq!(name, "faulty");
            assert!(Arc::ptr_eq(&report, &third));
        }
        other => panic!("expected Quarantined, got {other:?}"),
    }
    assert_eq!(plugin.status().state, PluginState::Quarantined);
    let quarantined = std::iter::from_fn(|| events.try_recv().ok())
        .filter(|e| matches!(e, PluginEvent::Quarantined(_)))
        .count();
    assert_eq!(quarantined, 1);

    assert!(run(plugin.enable()));
    assert!(!run(plugin.enable()), "a second enable has nothing to lift");
    assert!(matches!(run(next_event_now(&events)), PluginEvent::Enabled));
    assert_eq!(
        run(plugin.call_raw("echo", b"back".to_vec())).unwrap(),
        b"back"
    );
    assert_eq!(plugin.status().state, PluginState::Ready);
    // The crash budget starts afresh.
    panic_call(&plugin);
    timed_echo(&plugin);
    assert_eq!(plugin.status().state, PluginState::Ready);
}

async fn next_event_now(events: &EventReceiver) -> PluginEvent {
    next_event(events, Duration::from_secs(1)).await
}

#[test]
fn restart_policy_never_quarantines_at_the_first_trap() {
    let mut m = wasm_manifest("faulty");
    m.restart.mode = plugin_host::manifest::RestartMode::Never;
    let plugin = run(host().load_manifest(m)).unwrap();
    panic_call(&plugin);
    assert!(matches!(
        run(plugin.call_raw("echo", b"x".to_vec())),
        Err(Error::Call(CallError::Quarantined { .. }))
    ));
}

/// Writes `bytes` to `path` as a new file renamed over the old one.
fn replace(path: &Path, bytes: &[u8]) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, bytes).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

#[test]
fn reload_switches_to_the_module_on_disk_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hello.wasm");
    std::fs::copy(wasm_dir().join("hello.wasm"), &path).unwrap();
    let mut m = wasm_manifest("hello");
    m.library = path.display().to_string();
    let plugin = run(host().load_manifest(m)).unwrap();
    let events = plugin.subscribe();
    let out: Greeting = run(plugin.call("greet", &Greet { name: "Ada" })).unwrap();
    assert_eq!(out.message, "Hello, Ada!");

    // A new version: the template module, calling itself hello 2.0.0.
    let v2 = Module {
        name: "hello".into(),
        version: "2.0.0".into(),
        ..Module::plugin()
    };
    replace(&path, &v2.bytes());
    run(plugin.reload()).unwrap();
    assert_eq!(plugin.version(), "2.0.0");
    assert_eq!(plugin.methods(), ["echo", "bad"]);
    assert_eq!(run(plugin.call_raw("echo", b"v2".to_vec())).unwrap(), b"v2");
    assert!(matches!(
        run(plugin.call::<_, Greeting>("greet", &Greet { name: "Ada" })),
        Err(Error::Call(CallError::UnknownMethod { .. }))
    ));
    match run(next_event_now(&events)) {
        PluginEvent::Reloaded { version } => assert_eq!(version, "2.0.0"),
        other => panic!("expected Reloaded, got {other:?}"),
    }

    // A corrupt file: the reload fails, clearly, and 2.0.0 keeps serving.
    replace(&path, b"\0asm\x01\0\0\0 this is no module");
    match run(plugin.reload()) {
        Err(Error::Load(LoadError::NotALibrary { reason, .. })) => {
            assert!(
                reason.contains("not a valid WebAssembly module"),
                "{reason}"
            );
        }
        other => panic!("expected NotALibrary, got {other:?}"),
    }
    match run(next_event_now(&events)) {
        PluginEvent::ReloadFailed { error } => {
            assert!(error.contains("not a valid WebAssembly module"), "{error}")
        }
        other => panic!("expected ReloadFailed, got {other:?}"),
    }
    assert_eq!(plugin.version(), "2.0.0");
    assert_eq!(
        run(plugin.call_raw("echo", b"still".to_vec())).unwrap(),
        b"still"
    );

    // A module the host refuses (it imports WASI) is refused at reload too.
    replace(&path, &wasi_module().bytes());
    assert!(matches!(
        run(plugin.reload()),
        Err(Error::Load(LoadError::Unsupported { .. }))
    ));
    assert_eq!(
        run(plugin.call_raw("echo", b"still".to_vec())).unwrap(),
        b"still"
    );
}

// ---- a pool of instances -----------------------------------------------------------------

/// Counts the calls running inside the plugin, from their progress reports: a call of
/// faulty's `progress` is inside from its first report (`step 1`) to its last.
#[derive(Default)]
struct Inside {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Inside {
    fn report(&self, progress: &Progress, steps: u32) {
        if progress.message == "step 1" {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.peak.fetch_max(now, Ordering::SeqCst);
        }
        if progress.message == format!("step {steps}") {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Calls faulty's `progress` with `steps` (long enough to leave the caller's thread):
/// checks that it answers `steps` and that its own caller got exactly its reports.
async fn progress_call(plugin: &Plugin, steps: u32, inside: Arc<Inside>) -> Result<(), String> {
    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let sink = seen.clone();
    let options = CallOptions::new().on_progress(move |p| {
        inside.report(&p, steps);
        sink.lock().unwrap().push(p);
    });
    let n: u32 = plugin
        .call_with("progress", &json!({"steps": steps}), options)
        .await
        .map_err(|e| format!("{steps} steps: {e}"))?;
    let seen = seen.lock().unwrap();
    let last = seen.last().map(|p| p.message.clone());
    match (n == steps, seen.len() == steps as usize, last) {
        (true, true, Some(last)) if last == format!("step {steps}") => Ok(()),
        other => Err(format!("{steps} steps: answered {n}, {other:?}")),
    }
}

#[test]
fn sixty_four_concurrent_calls_wait_for_a_pool_of_two_and_each_gets_its_own_answer() {
    let _alone = alone();
    let mut m = wasm_manifest("faulty");
    m.limits.concurrency = 2;
    let plugin = run(host().load_manifest(m)).unwrap();
    let inside = Arc::new(Inside::default());
    let outcomes = run_with_limit(Duration::from_secs(60), async {
        let calls: Vec<_> = (0..64u32)
            .map(|i| {
                let (plugin, inside) = (plugin.clone(), inside.clone());
                smol::spawn(async move {
                    if i % 2 == 0 {
                        progress_call(&plugin, 400 + i, inside).await
                    } else {
                        let input = format!("call {i}").into_bytes();
                        let out = plugin
                            .call_raw("echo", input.clone())
                            .await
                            .map_err(|e| format!("call {i}: {e}"))?;
                        (out == input)
                            .then_some(())
                            .ok_or_else(|| format!("call {i} got {out:?}"))
                    }
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await);
        }
        outcomes
    });
    let failed: Vec<_> = outcomes.into_iter().filter_map(Result::err).collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let peak = inside.peak.load(Ordering::SeqCst);
    eprintln!("at most {peak} calls ran inside the plugin at once");
    assert!(
        (1..=2).contains(&peak),
        "{peak} calls ran at once on a pool of 2"
    );
    let status = plugin.status();
    assert_eq!((status.calls, status.failures, status.crashes), (64, 0, 0));
}

#[test]
fn status_never_counts_more_calls_in_flight_than_the_pool_runs() {
    let _alone = alone();
    let mut m = wasm_manifest("faulty");
    m.limits.concurrency = 1;
    let plugin = run(host().load_manifest(m)).unwrap();
    let inside = Arc::new(Inside::default());
    let (seen, failed) = run_with_limit(Duration::from_secs(60), async {
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (plugin, done) = (plugin.clone(), done.clone());
            smol::spawn(async move {
                let mut seen = 0;
                while !done.load(Ordering::Relaxed) {
                    let running: usize =
                        plugin.status().instances.iter().map(|i| i.in_flight).sum();
                    seen = seen.max(running);
                    smol::Timer::after(Duration::from_micros(200)).await;
                }
                seen
            })
        };
        let calls: Vec<_> = (0..24u32)
            .map(|i| {
                let (plugin, inside) = (plugin.clone(), inside.clone());
                smol::spawn(async move { progress_call(&plugin, 200 + i, inside).await })
            })
            .collect();
        let mut failed = Vec::new();
        for call in calls {
            failed.extend(call.await.err());
        }
        done.store(true, Ordering::Relaxed);
        (watcher.await, failed)
    });
    assert!(failed.is_empty(), "{failed:#?}");
    assert_eq!(
        inside.peak.load(Ordering::SeqCst),
        1,
        "one call at a time ran"
    );
    assert!(
        seen <= 1,
        "status().instances counted {seen} calls in flight on a pool of one instance"
    );
}

// ---- hostile modules ---------------------------------------------------------------------

/// Linear memory of the template: 2 pages.
const MEMORY_END: u32 = 2 << 16;
const NAME_AT: u32 = 0x400;
const VERSION_AT: u32 = 0x800;
/// "echo" then "bad".
const METHOD_NAMES_AT: u32 = 0xC00;
/// The method table: {ptr, len} per method.
const METHODS_AT: u32 = 0xC10;
const DESCRIPTOR_AT: u32 = 0xD00;
/// Free for a hook's own use (a length the host writes, say).
const SPARE_AT: u32 = 0xE00;
/// Where the bump allocator starts.
const HEAP_AT: u32 = 0x4000;
/// Where a hook's data goes (past what the heap uses in these tests).
const DATA_AT: u32 = 0x8000;

/// `plugin_api_alloc`'s default body: a bump allocator.
const BUMP: &str = "(local.set $at (global.get $heap))
    (global.set $heap (i32.add (local.get $at)
        (i32.and (i32.add (local.get $len) (i32.const 7)) (i32.const -8))))
    (local.get $at)";

/// An endless loop.
const SPIN: &str = "(loop $spin (br $spin))";

/// A minimal valid plugin in WebAssembly text: `echo` returns its input, `bad` runs the
/// `bad` hook. Each field is one thing a hostile test can break.
#[derive(Clone)]
struct Module {
    name: String,
    version: String,
    abi: (u16, u16),
    /// The descriptor's fields as `plugin_api_entry` hands them over.
    name_ptr: u32,
    version_ptr: u32,
    methods_ptr: u32,
    method_count: u32,
    /// The method table ({ptr, len} per method).
    methods: Vec<(u32, u32)>,
    /// Extra imports.
    imports: String,
    /// Initial pages of linear memory.
    pages: u32,
    /// An export left out.
    without: Option<&'static str>,
    /// Function bodies (WebAssembly text, leaving the result on the stack).
    entry: String,
    /// `$len`, with a local `$at`.
    alloc: String,
    /// `$config`, `$config_len`, `$error` (the error buffer's slot).
    create: String,
    /// The `bad` method: `$in`, `$in_len`, `$out` (the output buffer's slot).
    bad: String,
    /// `plugin_api_free_buffer`: `$ptr`, `$len`, `$cap`.
    free: String,
    /// A start function's body.
    start: Option<String>,
    /// Extra data segments.
    data: Vec<(u32, Vec<u8>)>,
}

impl Module {
    /// The valid plugin.
    fn plugin() -> Module {
        Module {
            name: "hostile".into(),
            version: "1.0.0".into(),
            abi: (plugin_api::abi::ABI_MAJOR, plugin_api::abi::ABI_MINOR),
            name_ptr: NAME_AT,
            version_ptr: VERSION_AT,
            methods_ptr: METHODS_AT,
            method_count: 2,
            methods: vec![(METHOD_NAMES_AT, 4), (METHOD_NAMES_AT + 4, 3)],
            imports: String::new(),
            pages: MEMORY_END >> 16,
            without: None,
            entry: format!("(i32.const {DESCRIPTOR_AT})"),
            alloc: BUMP.into(),
            create: "(i32.const 0)".into(),
            bad: "(i32.const 0)".into(),
            free: String::new(),
            start: None,
            data: Vec::new(),
        }
    }

    /// The template with method `bad`'s body replaced.
    fn bad(body: &str) -> Module {
        Module {
            bad: body.into(),
            ..Module::plugin()
        }
    }

    /// The template whose `bad` hands back the output buffer {ptr, len, cap = len}.
    fn output(ptr: u32, len: u32) -> Module {
        Module::bad(&format!(
            "(call $buffer (local.get $out) (i32.const {ptr}) (i32.const {len}) (i32.const 0))"
        ))
    }

    /// The template whose allocator runs `instead` for blocks over 1 KiB (the input of a
    /// call with a larger input; `create`'s block is smaller).
    fn large_alloc(instead: &str) -> Module {
        Module {
            alloc: format!(
                "(if (i32.gt_u (local.get $len) (i32.const 1024)) (then {instead})) {BUMP}"
            ),
            ..Module::plugin()
        }
    }

    fn wat(&self) -> String {
        let export = |name: &str| match self.without == Some(name) {
            true => String::new(),
            false => format!("(export \"{name}\")"),
        };
        let mut descriptor = Vec::new();
        descriptor.extend(self.abi.0.to_le_bytes());
        descriptor.extend(self.abi.1.to_le_bytes());
        for field in [
            self.name_ptr,
            self.version_ptr,
            self.methods_ptr,
            self.method_count,
        ] {
            descriptor.extend(field.to_le_bytes());
        }
        let table: Vec<u8> = self
            .methods
            .iter()
            .flat_map(|(ptr, len)| [ptr.to_le_bytes(), len.to_le_bytes()].concat())
            .collect();
        let mut data = vec![
            (NAME_AT, [self.name.as_bytes(), b"\0"].concat()),
            (VERSION_AT, [self.version.as_bytes(), b"\0"].concat()),
            (METHOD_NAMES_AT, b"echobad".to_vec()),
            (METHODS_AT, table),
            (DESCRIPTOR_AT, descriptor),
        ];
        data.extend(self.data.iter().cloned());
        let data: String = data
            .iter()
            .map(|(at, bytes)| {
                let text: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
                format!("  (data (i32.const {at}) \"{text}\")\n")
            })
            .collect();
        let start = match &self.start {
            Some(body) => format!("(func $start {body})\n  (start $start)"),
            None => String::new(),
        };
        format!(
            r#"(module
  (import "plugin_host" "log" (func $log (param i32 i32 i32)))
  (import "plugin_host" "progress" (func $progress (param f64 i32 i32)))
  (import "plugin_host" "call_host" (func $call_host (param i32 i32 i32 i32 i32) (result i32)))
  (import "plugin_host" "take_output" (func $take_output (param i32)))
  (import "plugin_host" "panic" (func $panic (param i32 i32 i32 i32)))
  {imports}
  (memory {memory} {pages})
  (global $heap (mut i32) (i32.const {HEAP_AT}))
{data}
  (func {entry_export} (result i32)
    {entry})
  (func {alloc_export} (param $len i32) (result i32) (local $at i32)
    {alloc})
  (func {dealloc_export} (param i32 i32))
  (func {create_export} (param $config i32) (param $config_len i32) (param $error i32) (result i32)
    {create})
  (func {call_export} (param $method i32) (param $method_len i32) (param $in i32) (param $in_len i32) (param $out i32) (result i32)
    (if (i32.eq (local.get $method_len) (i32.const 4))
      (then (return (call $buffer (local.get $out) (local.get $in) (local.get $in_len) (i32.const 0)))))
    {bad})
  (func {free_export} (param $ptr i32) (param $len i32) (param $cap i32)
    {free})
  ;; Writes the buffer {{ptr, len, cap = len}} at `slot`; returns `status`.
  (func $buffer (param $slot i32) (param $ptr i32) (param $len i32) (param $status i32) (result i32)
    (i32.store (local.get $slot) (local.get $ptr))
    (i32.store offset=4 (local.get $slot) (local.get $len))
    (i32.store offset=8 (local.get $slot) (local.get $len))
    (local.get $status))
  {start}
)"#,
            imports = self.imports,
            memory = export("memory"),
            pages = self.pages,
            entry_export = export("plugin_api_entry"),
            entry = self.entry,
            alloc_export = export("plugin_api_alloc"),
            alloc = self.alloc,
            dealloc_export = export("plugin_api_dealloc"),
            create_export = export("plugin_api_create"),
            create = self.create,
            call_export = export("plugin_api_call"),
            bad = self.bad,
            free_export = export("plugin_api_free_buffer"),
            free = self.free,
        )
    }

    /// The module's binary.
    fn bytes(&self) -> Vec<u8> {
        let text = self.wat();
        wat::parse_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

/// The template plus an import of WASI's `fd_write`.
fn wasi_module() -> Module {
    Module {
        imports: r#"(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))"#.into(),
        ..Module::plugin()
    }
}

/// Installs `bytes` as `hostile.wasm` next to a `plugin.toml` that loads it
/// (`runtime = "wasm"`), and returns that manifest.
fn install(bytes: &[u8]) -> (tempfile::TempDir, Manifest) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hostile.wasm"), bytes).unwrap();
    let toml = "# a hand-written hostile module\n\
                name = \"hostile\"\nversion = \"1.0.0\"\nlibrary = \"hostile\"\n\
                runtime = \"wasm\"\napi = \"^1\"\n\n\
                [timeouts]\nconnect = \"2s\"\ncancel_grace = \"200ms\"\n\n\
                [restart]\nbackoff = \"10ms\"\n";
    let path: PathBuf = dir.path().join("plugin.toml");
    std::fs::write(&path, toml).unwrap();
    let manifest = Manifest::from_file(&path).unwrap();
    assert_eq!(manifest.runtime, Runtime::Wasm);
    (dir, manifest)
}

/// Loads `bytes` (the manifest changed by `tweak`) and expects a load error, within the
/// manifest's load timeout (plus slack); returns it and how long it took.
fn load_error_with(bytes: &[u8], tweak: impl FnOnce(&mut Manifest)) -> (LoadError, Duration) {
    let (_dir, mut manifest) = install(bytes);
    tweak(&mut manifest);
    let limit = manifest.timeouts.connect_timeout() + Duration::from_secs(3);
    let started = Instant::now();
    let outcome = run_with_limit(limit, host().load_manifest(manifest));
    let took = started.elapsed();
    match outcome {
        Err(Error::Load(e)) => (e, took),
        Err(other) => panic!("expected a load error, got {other}"),
        Ok(_) => panic!("the module loaded"),
    }
}

fn load_error(module: &Module) -> LoadError {
    load_error_with(&module.bytes(), |_| {}).0
}

/// The reason of a `BadDescriptor`.
fn bad_descriptor(error: LoadError) -> String {
    match error {
        LoadError::BadDescriptor { plugin, reason, .. } => {
            assert_eq!(plugin, "hostile");
            reason
        }
        other => panic!("expected BadDescriptor, got {other}"),
    }
}

/// Loads `module`.
fn load(module: &Module) -> (tempfile::TempDir, Plugin) {
    let (dir, manifest) = install(&module.bytes());
    let plugin = run(host().load_manifest(manifest)).unwrap();
    (dir, plugin)
}

/// Loads `module` and calls `bad` with `input`: the call crashes with trap `kind`; the
/// next call is answered by a fresh instance. Returns the report.
fn bad_call_crashes(module: &Module, input: &[u8], kind: &str) -> Arc<CrashReport> {
    let (_dir, plugin) = load(module);
    let events = plugin.subscribe();
    run(async {
        assert_eq!(
            plugin.call_raw("echo", b"before".to_vec()).await.unwrap(),
            b"before"
        );
        let report = crash_of(
            plugin.call_raw("bad", input.to_vec()).await,
            "hostile",
            "bad",
        );
        assert_eq!(trap_kind(&report), kind, "{report}");
        assert_eq!(
            plugin.call_raw("echo", b"after".to_vec()).await.unwrap(),
            b"after"
        );
        match next_event_now(&events).await {
            PluginEvent::Crashed(r) => assert!(Arc::ptr_eq(&r, &report)),
            other => panic!("expected Crashed, got {other:?}"),
        }
        assert!(matches!(
            next_event_now(&events).await,
            PluginEvent::Restarted { restarts: 1, .. }
        ));
        let status = plugin.status();
        assert_eq!(
            (status.state, status.crashes, status.restarts),
            (PluginState::Ready, 1, 1)
        );
        report
    })
}

#[test]
fn the_template_is_a_working_plugin() {
    let (_dir, plugin) = load(&Module::plugin());
    assert_eq!(plugin.runtime(), Runtime::Wasm);
    assert_eq!(
        (plugin.name(), plugin.version().as_str()),
        ("hostile", "1.0.0")
    );
    assert_eq!(plugin.methods(), ["echo", "bad"]);
    assert_eq!(
        run(plugin.call_raw("echo", vec![1, 2, 3])).unwrap(),
        [1, 2, 3]
    );
    assert_eq!(run(plugin.call_raw("bad", vec![])).unwrap(), b"");
}

// Refused at load.

#[test]
fn a_file_that_is_not_webassembly_is_not_a_library() {
    let native =
        std::fs::read(common::artifacts().join(Manifest::library_file_name("hello"))).unwrap();
    let cases: [(&str, &[u8]); 3] = [
        ("text", b"this is not a WebAssembly module"),
        ("empty", b""),
        ("a native library", &native),
    ];
    for (what, bytes) in cases {
        match load_error_with(bytes, |_| {}).0 {
            LoadError::NotALibrary { reason, .. } => {
                assert!(
                    reason.contains("not a valid WebAssembly module"),
                    "{what}: {reason}"
                );
            }
            other => panic!("{what}: expected NotALibrary, got {other}"),
        }
    }
}

#[test]
fn an_import_from_wasi_is_refused_by_name() {
    match load_error(&wasi_module()) {
        LoadError::Unsupported { message, .. } => {
            assert!(
                message.contains("`wasi_snapshot_preview1::fd_write`"),
                "{message}"
            );
        }
        other => panic!("expected Unsupported, got {other}"),
    }
}

#[test]
fn an_import_the_host_does_not_provide_is_refused_by_name() {
    let module = Module {
        imports: r#"(import "plugin_host" "spawn" (func (param i32)))"#.into(),
        ..Module::plugin()
    };
    match load_error(&module) {
        LoadError::Unsupported { message, .. } => {
            assert!(message.contains("`plugin_host::spawn`"), "{message}");
        }
        other => panic!("expected Unsupported, got {other}"),
    }
}

#[test]
fn a_host_service_imported_with_the_wrong_signature_is_refused() {
    let module = Module {
        imports: r#"(import "plugin_host" "is_cancelled" (func (param i64) (result i64)))"#.into(),
        ..Module::plugin()
    };
    match load_error(&module) {
        LoadError::NotALibrary { reason, .. } => {
            assert!(
                reason.contains("is_cancelled"),
                "names the import: {reason}"
            )
        }
        other => panic!("expected NotALibrary, got {other}"),
    }
}

#[test]
fn each_missing_export_is_named() {
    for export in [
        "memory",
        "plugin_api_entry",
        "plugin_api_alloc",
        "plugin_api_dealloc",
        "plugin_api_create",
        "plugin_api_call",
        "plugin_api_free_buffer",
    ] {
        let module = Module {
            without: Some(export),
            ..Module::plugin()
        };
        match load_error(&module) {
            LoadError::Unsupported { message, .. } => {
                assert!(message.contains(&format!("`{export}`")), "{message}");
            }
            other => panic!("without {export}: expected Unsupported, got {other}"),
        }
    }
}

#[test]
fn an_export_with_the_wrong_signature_is_named() {
    let module = Module {
        without: Some("plugin_api_call"),
        ..Module::plugin()
    };
    // The template without its `plugin_api_call`, plus one that takes nothing.
    let text = module.wat().replacen(
        "(global $heap",
        "(func (export \"plugin_api_call\") (result i32) (i32.const 0))\n  (global $heap",
        1,
    );
    let bytes = wat::parse_str(&text).unwrap();
    match load_error_with(&bytes, |_| {}).0 {
        LoadError::Unsupported { message, .. } => {
            assert!(message.contains("`plugin_api_call`"), "{message}");
        }
        other => panic!("expected Unsupported, got {other}"),
    }
}

#[test]
fn a_null_descriptor_is_refused() {
    let module = Module {
        entry: "(i32.const 0)".into(),
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("null descriptor"), "{reason}");
}

#[test]
fn a_descriptor_outside_memory_is_refused() {
    for at in [0xFFFF_FFF0, MEMORY_END, MEMORY_END - 2] {
        let module = Module {
            entry: format!("(i32.const {at})"),
            ..Module::plugin()
        };
        let reason = bad_descriptor(load_error(&module));
        assert!(
            reason.contains("outside"),
            "descriptor at {at:#x}: {reason}"
        );
    }
}

#[test]
fn a_descriptor_cut_by_the_end_of_memory_is_refused() {
    // A valid ABI header in the last 8 bytes: the pointers that follow are past the end.
    let at = MEMORY_END - 8;
    let mut header = Vec::new();
    header.extend(plugin_api::abi::ABI_MAJOR.to_le_bytes());
    header.extend(plugin_api::abi::ABI_MINOR.to_le_bytes());
    header.extend(NAME_AT.to_le_bytes());
    let module = Module {
        entry: format!("(i32.const {at})"),
        data: vec![(at, header)],
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("outside"), "{reason}");
}

#[test]
fn a_name_pointer_outside_memory_is_refused() {
    for ptr in [MEMORY_END + 1, 0x7FFF_0000, 0xFFFF_FFFF] {
        let module = Module {
            name_ptr: ptr,
            ..Module::plugin()
        };
        let reason = bad_descriptor(load_error(&module));
        assert!(reason.contains("outside"), "name at {ptr:#x}: {reason}");
    }
}

#[test]
fn a_null_name_is_refused() {
    let module = Module {
        name_ptr: 0,
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("name is null"), "{reason}");
}

#[test]
fn a_name_without_its_nul_is_refused() {
    // Running into the end of memory.
    let at = MEMORY_END - 5;
    let module = Module {
        name_ptr: at,
        data: vec![(at, b"abcde".to_vec())],
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("name is not NUL-terminated"), "{reason}");
    // Longer than a name may be.
    let module = Module {
        version_ptr: DATA_AT,
        data: vec![(DATA_AT, vec![b'v'; 10_000])],
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("version is not NUL-terminated"), "{reason}");
}

#[test]
fn a_name_that_is_not_utf8_is_refused() {
    let module = Module {
        version_ptr: DATA_AT,
        data: vec![(DATA_AT, vec![0xFF, 0xFE, 0])],
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("version is not UTF-8"), "{reason}");
}

#[test]
fn a_huge_method_count_is_refused() {
    for count in [0xFFFF_FFFF, 1 << 20] {
        let module = Module {
            method_count: count,
            ..Module::plugin()
        };
        let reason = bad_descriptor(load_error(&module));
        assert!(
            reason.contains(&format!("method_count {count}")),
            "{reason}"
        );
    }
}

#[test]
fn a_method_table_outside_memory_is_refused() {
    for (ptr, count) in [(MEMORY_END - 4, 1), (0xFFFF_FFFC, 2), (MEMORY_END - 8, 2)] {
        let module = Module {
            methods_ptr: ptr,
            method_count: count,
            ..Module::plugin()
        };
        let reason = bad_descriptor(load_error(&module));
        assert!(reason.contains("outside"), "table at {ptr:#x}: {reason}");
    }
}

#[test]
fn a_method_name_outside_memory_or_too_long_is_refused() {
    let module = Module {
        methods: vec![(METHOD_NAMES_AT, 4), (MEMORY_END - 2, 3)],
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(reason.contains("method #1 lies outside"), "{reason}");
    let module = Module {
        methods: vec![(METHOD_NAMES_AT, 0xFFFF_FFFF), (METHOD_NAMES_AT + 4, 3)],
        ..Module::plugin()
    };
    let reason = bad_descriptor(load_error(&module));
    assert!(
        reason.contains("method #0's name is 4294967295 bytes long"),
        "{reason}"
    );
}

#[test]
fn another_abi_is_an_abi_mismatch() {
    let supported = (plugin_api::abi::ABI_MAJOR, plugin_api::abi::ABI_MINOR);
    for found in [(2, 0), (0, 9), (supported.0, supported.1 + 1)] {
        let module = Module {
            abi: found,
            ..Module::plugin()
        };
        match load_error(&module) {
            LoadError::AbiMismatch {
                found: f,
                supported: s,
                ..
            } => assert_eq!((f, s), (found, supported)),
            other => panic!("ABI {found:?}: expected AbiMismatch, got {other}"),
        }
    }
}

#[test]
fn a_start_function_that_traps_or_loops_fails_the_load_promptly() {
    let _alone = alone();
    let calls_the_host = "(drop (call $call_host (i32.const 0) (i32.const 0) (i32.const 0) \
                          (i32.const 0) (i32.const 0)))";
    for (what, body) in [
        ("traps", "(unreachable)"),
        ("loops", SPIN),
        ("calls the host", calls_the_host),
    ] {
        let module = Module {
            start: Some(body.into()),
            ..Module::plugin()
        };
        let (error, took) = load_error_with(&module.bytes(), |m| {
            m.timeouts.connect = Some(Duration::from_millis(500))
        });
        match error {
            LoadError::NotALibrary { reason, .. } => {
                assert!(
                    reason.contains("starting the module trapped"),
                    "{what}: {reason}"
                )
            }
            other => panic!("a start function that {what}: expected NotALibrary, got {other}"),
        }
        assert!(took < Duration::from_secs(2), "{what}: {took:?}");
    }
}

#[test]
fn an_entry_that_loops_fails_the_load_at_the_load_timeout() {
    let _alone = alone();
    let limit = Duration::from_millis(500);
    let module = Module {
        entry: format!("{SPIN} (i32.const 0)"),
        ..Module::plugin()
    };
    let (error, took) = load_error_with(&module.bytes(), |m| m.timeouts.connect = Some(limit));
    let reason = bad_descriptor(error);
    assert!(reason.contains("`plugin_api_entry` trapped"), "{reason}");
    assert!(reason.contains("still running after"), "{reason}");
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "failed after {took:?}, the load timeout is {limit:?}"
    );
}

#[test]
fn a_create_that_loops_fails_the_load_at_the_load_timeout() {
    let _alone = alone();
    let limit = Duration::from_millis(500);
    let module = Module {
        create: format!("{SPIN} (i32.const 0)"),
        ..Module::plugin()
    };
    let (error, took) = load_error_with(&module.bytes(), |m| m.timeouts.connect = Some(limit));
    match error {
        LoadError::CreateCrashed { report, .. } => {
            assert_eq!(trap_kind(&report), "deadline", "{report}");
            assert_eq!(report.in_flight, ["create"]);
        }
        other => panic!("expected CreateCrashed, got {other}"),
    }
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "failed after {took:?}, the load timeout is {limit:?}"
    );
}

#[test]
fn a_create_error_buffer_outside_memory_crashes_the_load() {
    let module = Module {
        create:
            "(call $buffer (local.get $error) (i32.const 0xFFFFFF00) (i32.const 16) (i32.const 1))"
                .into(),
        ..Module::plugin()
    };
    match load_error(&module) {
        LoadError::CreateCrashed { report, .. } => assert_eq!(trap_kind(&report), "bad buffer"),
        other => panic!("expected CreateCrashed, got {other}"),
    }
}

#[test]
fn an_allocator_that_returns_nothing_fails_the_load() {
    for (what, returned) in [("null", 0), ("the end of memory", MEMORY_END - 16)] {
        let module = Module {
            alloc: format!("(i32.const {returned})"),
            ..Module::plugin()
        };
        match load_error(&module) {
            LoadError::CreateCrashed { report, .. } => {
                assert_eq!(trap_kind(&report), "bad buffer", "{what}: {report}");
            }
            other => panic!("alloc returning {what}: expected CreateCrashed, got {other}"),
        }
    }
}

#[test]
fn a_memory_larger_than_limits_memory_is_refused_without_the_host_paying_for_it() {
    let _alone = alone();
    // 1 GiB of initial memory, under a 64 MiB cap.
    let module = Module {
        pages: 1 << 14,
        ..Module::plugin()
    };
    #[cfg(target_os = "linux")]
    let before = common::reset_peak_memory();
    let (error, _) = load_error_with(&module.bytes(), |m| m.limits.memory = Some(64 * MIB));
    #[cfg(target_os = "linux")]
    {
        let growth = common::peak_memory().saturating_sub(before);
        eprintln!(
            "a 1 GiB module refused: the host's peak grew by {} MiB",
            growth / MIB
        );
        assert!(growth < 64 * MIB, "the host grew by {} MiB", growth / MIB);
    }
    match error {
        LoadError::NotALibrary { reason, .. } => {
            assert!(reason.contains("starting the module trapped"), "{reason}")
        }
        other => panic!("expected NotALibrary, got {other}"),
    }
}

// Crashing one call.

/// 4 KiB: more than the template's allocator hands out before its hooks apply.
fn large_input() -> Vec<u8> {
    vec![7; 4096]
}

#[test]
fn an_output_longer_than_any_frame_is_a_bad_buffer() {
    let report = bad_call_crashes(&Module::output(HEAP_AT, 0xFFFF_FFFF), b"", "bad buffer");
    let message = report.exit.as_ref().unwrap().to_string();
    assert!(message.contains("max_frame"), "{message}");
}

#[test]
fn an_output_past_the_end_of_memory_is_a_bad_buffer() {
    bad_call_crashes(&Module::output(MEMORY_END, 16), b"", "bad buffer");
    bad_call_crashes(&Module::output(0x7FFF_0000, 16), b"", "bad buffer");
}

#[test]
fn an_output_straddling_the_end_of_memory_is_a_bad_buffer() {
    bad_call_crashes(&Module::output(MEMORY_END - 8, 16), b"", "bad buffer");
}

#[test]
fn an_output_whose_end_overflows_32_bits_is_a_bad_buffer() {
    bad_call_crashes(&Module::output(0xFFFF_FFF0, 0x20), b"", "bad buffer");
}

#[test]
fn an_output_over_limits_max_frame_is_a_bad_buffer_even_inside_memory() {
    let (_dir, mut manifest) = install(&Module::output(HEAP_AT, 8192).bytes());
    manifest.limits.max_frame = 4096;
    let plugin = run(host().load_manifest(manifest)).unwrap();
    let report = crash_of(run(plugin.call_raw("bad", vec![])), "hostile", "bad");
    assert_eq!(trap_kind(&report), "bad buffer");
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");
}

#[test]
fn take_output_into_memory_the_module_does_not_have_crashes_the_call() {
    // Call a host function it may not (the refusal's message is the pending output), then
    // ask for that output 4 bytes before the end of memory.
    let module = Module::bad(&format!(
        "(drop (call $call_host (i32.const {METHOD_NAMES_AT}) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const {SPARE_AT})))
         (call $take_output (i32.const {}))
         (i32.const 0)",
        MEMORY_END - 4
    ));
    let report = bad_call_crashes(&module, b"", "bad buffer");
    let message = report.exit.as_ref().unwrap().to_string();
    assert!(message.contains("take_output"), "{message}");
}

#[test]
fn call_host_with_its_length_pointer_outside_memory_crashes_the_call() {
    let module = Module::bad(&format!(
        "(drop (call $call_host (i32.const {METHOD_NAMES_AT}) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const {})))
         (i32.const 0)",
        MEMORY_END - 2
    ));
    bad_call_crashes(&module, b"", "bad buffer");
}

#[test]
fn an_allocator_that_fails_at_call_time_crashes_that_call_only() {
    for (what, returned) in [("null", 0), ("the end of memory", MEMORY_END - 16)] {
        let module = Module::large_alloc(&format!("(return (i32.const {returned}))"));
        let report = bad_call_crashes(&module, &large_input(), "bad buffer");
        let message = report.exit.as_ref().unwrap().to_string();
        assert!(message.contains("plugin_api_alloc"), "{what}: {message}");
    }
}

#[test]
fn an_allocator_that_loops_at_call_time_is_stopped_at_the_deadline() {
    let _alone = alone();
    times_out_at_the_deadline(&Module::large_alloc(SPIN), "echo", large_input());
}

#[test]
fn a_free_buffer_that_loops_is_stopped_at_the_deadline() {
    let _alone = alone();
    let module = Module {
        // Only the output of `bad` (the buffers `echo` hands back are freed at once).
        free: format!("(if (i32.eq (local.get $ptr) (i32.const {DATA_AT})) (then {SPIN}))"),
        ..Module::output(DATA_AT, 4)
    };
    times_out_at_the_deadline(&module, "bad", vec![]);
}

/// Calls `method` on `module` with a 300 ms deadline: the caller gets `Timeout` within a
/// second of it, and the plugin then answers `echo`.
fn times_out_at_the_deadline(module: &Module, method: &str, input: Vec<u8>) {
    let (_dir, plugin) = load(module);
    let deadline = Duration::from_millis(300);
    run_with_limit(Duration::from_secs(20), async {
        let started = Instant::now();
        let options = CallOptions::new().timeout(deadline);
        let outcome = plugin.call_raw_with(method, input, options).await;
        let took = started.elapsed();
        assert!(
            matches!(outcome, Err(Error::Call(CallError::Timeout { .. }))),
            "expected Timeout, got {outcome:?}"
        );
        assert!(
            took < deadline + Duration::from_secs(1),
            "the caller waited {took:?} for a {deadline:?} deadline"
        );
        assert_eq!(
            plugin.call_raw("echo", b"ok".to_vec()).await.unwrap(),
            b"ok"
        );
    });
}

#[test]
fn an_unknown_status_code_is_bad_output_and_the_instance_keeps_serving() {
    let (_dir, plugin) = load(&Module::bad("(i32.const 77)"));
    let events = plugin.subscribe();
    match run(plugin.call_raw("bad", vec![])) {
        Err(Error::Call(CallError::BadOutput {
            method, message, ..
        })) => {
            assert_eq!(method, "bad");
            assert!(message.contains("unknown status code 77"), "{message}");
        }
        other => panic!("expected BadOutput, got {other:?}"),
    }
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");
    assert_eq!(plugin.status().crashes, 0);
    assert!(events.try_recv().is_err(), "{:?}", events.try_recv());
}

#[test]
fn a_huge_log_or_progress_message_is_cut_at_64_kib() {
    const MARKER: &str = "wasm-huge-log:";
    let logs = common::capture_logs(tracing::Level::INFO, Some(MARKER));
    let mut text = MARKER.as_bytes().to_vec();
    text.resize(70_000, b'L');
    // Lengths of 4 GiB - 1: at most 64 KiB is copied out.
    let module = Module {
        data: vec![(DATA_AT, text)],
        ..Module::bad(&format!(
            "(call $log (i32.const 3) (i32.const {DATA_AT}) (i32.const -1))
             (call $progress (f64.const nan) (i32.const {DATA_AT}) (i32.const -1))
             (call $log (i32.const 3) (i32.const {}) (i32.const -1))
             (i32.const 0)",
            MEMORY_END - 4
        ))
    };
    let (_dir, plugin) = load(&module);
    let seen = Arc::new(Mutex::new(Vec::<Progress>::new()));
    let sink = seen.clone();
    let options = CallOptions::new().on_progress(move |p| sink.lock().unwrap().push(p));
    assert_eq!(
        run(plugin.call_raw_with("bad", vec![], options)).unwrap(),
        b""
    );
    assert_eq!(plugin.status().crashes, 0);
    assert_eq!(run(plugin.call_raw("echo", b"ok".to_vec())).unwrap(), b"ok");

    let cap = 64 << 10;
    let lines = logs.lines();
    let line = lines
        .iter()
        .find(|l| l.contains(MARKER))
        .unwrap_or_else(|| panic!("no log line with the marker"));
    let kept = MARKER.len() + line[line.find(MARKER).unwrap()..].matches('L').count();
    assert_eq!(kept, cap, "the log message kept {kept} bytes");
    let progress = seen.lock().unwrap();
    assert_eq!(progress.len(), 1);
    assert_eq!(progress[0].fraction, None, "NaN is no fraction");
    assert_eq!(progress[0].message.len(), cap);
}

#[test]
fn a_huge_panic_message_is_cut_at_64_kib() {
    let mut text = b"wasm panic: ".to_vec();
    text.resize(70_000, b'P');
    let module = Module {
        data: vec![(DATA_AT, text)],
        ..Module::bad(&format!(
            "(call $panic (i32.const {DATA_AT}) (i32.const -1) (i32.const {DATA_AT}) (i32.const 5))
             (unreachable)"
        ))
    };
    let report = bad_call_crashes(&module, b"", "unreachable");
    let panic = report.panic.as_deref().expect("the panic message");
    assert!(panic.starts_with("wasm panic: PPP"), "{}", &panic[..40]);
    assert_eq!(panic.len(), 64 << 10);
    assert_eq!(report.panic_location.as_deref(), Some("wasm "));
}

#[test]
fn a_refused_memory_growth_the_module_survived_is_not_blamed_for_a_later_trap() {
    // `bad` with no input asks for ~2 GiB more (refused under the 1 GiB default: `memory.grow`
    // answers -1, and the module carries on); with input, it traps.
    let module = Module::bad(
        "(if (i32.eqz (local.get $in_len))
           (then (drop (memory.grow (i32.const 30000))) (return (i32.const 0))))
         (unreachable)",
    );
    let (_dir, plugin) = load(&module);
    assert_eq!(run(plugin.call_raw("bad", vec![])).unwrap(), b"");
    let report = crash_of(run(plugin.call_raw("bad", vec![1])), "hostile", "bad");
    assert_eq!(trap_kind(&report), "unreachable");
    assert_eq!(
        report.limit, None,
        "the trap is not the memory limit's: {report}"
    );
}

#[test]
fn an_input_over_limits_max_frame_is_refused_before_it_reaches_the_module() {
    let mut m = wasm_manifest("hello");
    m.limits.max_frame = 64 << 10;
    let plugin = run(host().load_manifest(m)).unwrap();
    match run(plugin.call_raw("echo", vec![0; 100 << 10])) {
        Err(Error::Call(CallError::InputTooLarge { size, limit, .. })) => {
            assert_eq!((size, limit), (100 << 10, 64 << 10))
        }
        other => panic!("expected InputTooLarge, got {other:?}"),
    }
    assert_eq!(
        plugin.status().crashes,
        0,
        "the caller's input is not the plugin's crash"
    );
    assert_eq!(
        run(plugin.call_raw("echo", vec![1; 1000])).unwrap(),
        vec![1; 1000]
    );
}
// ---- every step is bounded: services in a loop, big instructions, big functions ----------

/// Waits for the next `Crashed` event (other events skipped), or `None` after `within`.
async fn crash_within(events: &EventReceiver, within: Duration) -> Option<Arc<CrashReport>> {
    futures_lite::future::or(
        async {
            loop {
                if let PluginEvent::Crashed(r) = events.recv().await.expect("events closed") {
                    return Some(r);
                }
            }
        },
        async {
            smol::Timer::after(within).await;
            None
        },
    )
    .await
}

/// A module that calls a host service in a loop (each answered at once) is stopped
/// `cancel_grace` after its deadline, like one that computes: the host looks at the
/// deadline between any two steps, not only when a slice of fuel runs out.
#[test]
fn a_call_host_loop_is_stopped_after_the_grace() {
    let _alone = alone();
    let module = Module::bad(&format!(
        "(loop $again
           (drop (call $call_host (i32.const {METHOD_NAMES_AT}) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const {SPARE_AT})))
           (br $again))
         (i32.const 0)"
    ));
    let (_dir, plugin) = load(&module);
    let events = plugin.subscribe();
    run_with_limit(Duration::from_secs(30), async {
        let options = CallOptions::new().timeout(Duration::from_millis(300));
        let outcome = plugin.call_raw_with("bad", vec![], options).await;
        assert!(
            matches!(outcome, Err(Error::Call(CallError::Timeout { .. }))),
            "{outcome:?}"
        );
        // cancel_grace is 200 ms in `install`'s manifest.
        let report = crash_within(&events, Duration::from_secs(5)).await;
        let in_flight = plugin.status().instances[0].in_flight;
        assert!(
            report.is_some(),
            "no Crashed event 5 s after the deadline; in_flight = {in_flight}"
        );
        assert_eq!(trap_kind(&report.unwrap()), "interrupted");
    });
}

/// Same, seen from shutdown: the looping call is stopped once the shutdown's grace is over.
#[test]
fn shutdown_stops_a_call_host_loop() {
    let _alone = alone();
    let module = Module::bad(&format!(
        "(loop $again
           (drop (call $call_host (i32.const {METHOD_NAMES_AT}) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const {SPARE_AT})))
           (br $again))
         (i32.const 0)"
    ));
    let (_dir, plugin) = load(&module);
    run_with_limit(Duration::from_secs(30), async {
        let caller = plugin.clone();
        let call = smol::spawn(async move {
            let options = CallOptions::new().timeout(Duration::from_secs(3600));
            caller.call_raw_with("bad", vec![], options).await
        });
        smol::Timer::after(Duration::from_millis(100)).await;
        plugin.shutdown().await;
        let outcome = futures_lite::future::or(async { Some(call.await) }, async {
            smol::Timer::after(Duration::from_secs(5)).await;
            None
        })
        .await;
        assert!(outcome.is_some(), "the call still runs 5 s after shutdown");
    });
}

/// One `memory.grow` of 3000 pages (187.5 MiB, well under the 1 GiB default cap) costs
/// 3M fuel (64 bytes per fuel), more than a slice: the instruction gets the fuel it needs.
#[test]
fn a_single_large_memory_grow_completes() {
    let _alone = alone();
    for pages in [1000, 3000] {
        let module = Module::bad(&format!(
            "(if (i32.eq (memory.grow (i32.const {pages})) (i32.const -1)) (then (return (i32.const 1))))
             (i32.const 0)"
        ));
        let (_dir, plugin) = load(&module);
        let options = CallOptions::new().timeout(Duration::from_secs(5));
        let started = Instant::now();
        let outcome = run(plugin.call_raw_with("bad", vec![], options));
        eprintln!(
            "memory.grow({pages}) -> {outcome:?} in {:?}",
            started.elapsed()
        );
        assert_eq!(outcome.unwrap(), b"", "memory.grow({pages})");
    }
}

/// A host service that copies up to 64 KiB per call (log, progress, panic) is charged to
/// the module's fuel by the bytes: a slice stays about a millisecond even when it is all
/// service calls, so the caller's thread is not held past the deadline (the first slice
/// runs inline) and the call is stopped at the grace.
#[test]
fn a_log_flood_does_not_outlive_the_deadline() {
    let _alone = alone();
    let module = Module::bad(
        "(loop $again
           (call $panic (i32.const 0) (i32.const 65536) (i32.const 0) (i32.const 65536))
           (br $again))
         (i32.const 0)",
    );
    let (_dir, plugin) = load(&module);
    let events = plugin.subscribe();
    let deadline = Duration::from_millis(300);
    run_with_limit(Duration::from_secs(600), async {
        let started = Instant::now();
        let options = CallOptions::new().timeout(deadline);
        let outcome = plugin.call_raw_with("bad", vec![], options).await;
        let answered = started.elapsed();
        let report = crash_within(&events, Duration::from_secs(300)).await;
        let stopped = started.elapsed();
        eprintln!("answered after {answered:?} ({outcome:?}); stopped after {stopped:?}");
        assert!(report.is_some());
        assert!(
            answered < deadline + Duration::from_secs(1),
            "the caller got its answer {answered:?} after the call began (deadline {deadline:?})"
        );
        assert!(
            stopped < deadline + Duration::from_secs(2),
            "the call was stopped {stopped:?} after it began (deadline {deadline:?}, grace 200 ms)"
        );
    });
}

/// The bytes window (`STREAM_WINDOW_BYTES`, 1 MiB): a wasm plugin that emits 64 KiB items
/// to a consumer that does not read has at most about a window of them buffered in the
/// host, not the channel's 256 items (16 MiB; with 64 MiB items, 16 GiB).
#[test]
fn stream_items_buffered_in_the_host_are_bounded_in_bytes() {
    let module = Module {
        imports: r#"(import "plugin_host" "emit" (func $emit (param i32 i32) (result i32)))"#
            .into(),
        bad: "(block $done
                (loop $again
                  (br_if $done (i32.ne (call $emit (i32.const 0) (i32.const 65536)) (i32.const 0)))
                  (call $progress (f64.const 0.5) (i32.const 0) (i32.const 0))
                  (br $again)))
              (i32.const 0)"
            .into(),
        ..Module::plugin()
    };
    let (_dir, plugin) = load(&module);
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    let options = CallOptions::new()
        .timeout(Duration::from_secs(10))
        .on_progress(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
    run_with_limit(Duration::from_secs(30), async {
        use futures_lite::StreamExt;
        let mut stream = plugin.call_stream_raw("bad", vec![], options);
        let first = stream.next().await;
        assert!(matches!(first, Some(Ok(_))), "{first:?}");
        smol::Timer::after(Duration::from_secs(1)).await;
        let buffered = sent.load(Ordering::Relaxed);
        eprintln!("{buffered} items of 64 KiB handed to the host without a read");
        assert!(
            buffered <= 17,
            "{buffered} items of 64 KiB buffered in the host"
        );
    });
}

/// wasmi translates a function lazily on its first call, and running out of fuel there
/// would not be resumable: the translation is not charged, so a function of 30 KB (which
/// at wasmi's default 7 fuel per byte would cost more than the first slice) runs.
#[test]
fn a_large_function_can_be_called() {
    let _alone = alone();
    for nops in [20_000usize, 30_000] {
        let body = "nop ".repeat(nops);
        let module = Module {
            imports: String::new(),
            bad: "(call $large) (i32.const 0)".into(),
            ..Module::plugin()
        };
        let text = module.wat().replacen(
            "(global $heap",
            &format!("(func $large {body})\n  (global $heap"),
            1,
        );
        let bytes = wat::parse_str(&text).unwrap();
        let (_dir, manifest) = install(&bytes);
        let plugin = run(host().load_manifest(manifest)).unwrap();
        let options = CallOptions::new().timeout(Duration::from_secs(5));
        let started = Instant::now();
        let outcome = run(plugin.call_raw_with("bad", vec![], options));
        eprintln!("{nops} nops -> {outcome:?} in {:?}", started.elapsed());
        assert_eq!(outcome.unwrap(), b"", "{nops} nops");
    }
}
