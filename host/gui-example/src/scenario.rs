//! Scripted scenarios (`--scenario NAME`), run on the background thread through the same
//! calls the buttons make, while the window shows what happens. Each step checks what the
//! library answered (the exact error kind, the crash report, the events), and every wait
//! is bounded: a step that does not behave as expected ends the scenario with what went
//! wrong (the app then exits 1).
//!
//! `tour`: load everything; call each plugin's typical method once (host functions and
//! progress included); crash `faulty` in its worker (a segfault) and wait for its restart;
//! crash `faulty (wasm)` (a panic traps) and wait for its fresh instance; crash `faulty`
//! until its restart policy quarantines it, and check that a call is then refused at once.

use std::time::{Duration, Instant};

use plugin_host::{CallError, CrashReport, EventReceiver, PluginEvent, PluginState};

use crate::backend::{first_line, Backend, CallOutcome, CallRequest, Update};
use crate::model::{Level, ScenarioState};

/// The scenarios there are.
pub const NAMES: [&str; 1] = ["tour"];

/// The example plugins the tour needs (the C plugin is not among them: it is built by
/// `plugins/c-echo/build.sh`, and when it is not there it only shows as a load error).
pub const REQUIRED: [&str; 4] = ["callbacks", "faulty", "hello", "thumbnail"];

/// The whole scenario's bound.
const LIMIT: Duration = Duration::from_secs(60);

/// How a null-pointer write ends a worker, as its crash report names it.
#[cfg(not(windows))]
const SEGFAULT: &str = "SIGSEGV";
/// How a null-pointer write ends a worker, as its crash report names it.
#[cfg(windows)]
const SEGFAULT: &str = "STATUS_ACCESS_VIOLATION";
/// How `abort()` ends a worker, as its crash report names it.
#[cfg(not(windows))]
const ABORT: &str = "SIGABRT";
/// How `abort()` ends a worker, as its crash report names it.
#[cfg(windows)]
const ABORT: &str = "STATUS_STACK_BUFFER_OVERRUN";

/// How long a restart (or a quarantine) may take to be announced after a crash.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// Runs the scenario `name`; `Err` says which step did not behave and how.
pub async fn run(backend: &Backend, name: &str) -> Result<(), String> {
    let started = Instant::now();
    let result = match name {
        "tour" => bounded(LIMIT, tour(backend)).await,
        other => Err(format!("no scenario `{other}`")),
    };
    match &result {
        Ok(steps) => println!(
            "{name}: all {steps} steps passed in {:.1?}",
            started.elapsed()
        ),
        Err(what) => {
            println!("{name}: FAILED: {what}");
            backend
                .notifier()
                .log("", Level::Bad, format!("{name} failed: {what}"));
        }
    }
    result.map(|_| ())
}

/// Numbers, times, prints and logs the steps.
struct Steps<'a> {
    backend: &'a Backend,
    done: usize,
    step: String,
    since: Instant,
}

impl Steps<'_> {
    fn begin(&mut self, step: impl Into<String>) {
        self.step = step.into();
        self.since = Instant::now();
        self.backend
            .notifier()
            .send(Update::Scenario(ScenarioState::Running(self.step.clone())));
    }

    fn passed(&mut self, detail: impl AsRef<str>) {
        self.done += 1;
        let took = self.since.elapsed();
        println!(
            "tour: step {} {}: ok in {took:.0?}: {}",
            self.done,
            self.step,
            detail.as_ref()
        );
        self.backend.notifier().log(
            "",
            Level::Good,
            format!("tour: {} ok ({took:.0?})", self.step),
        );
    }

    /// The error for the current step.
    fn failed(&self, what: impl AsRef<str>) -> String {
        format!("step `{}`: {}", self.step, what.as_ref())
    }
}

async fn tour(backend: &Backend) -> Result<usize, String> {
    let mut steps = Steps {
        backend,
        done: 0,
        step: String::new(),
        since: Instant::now(),
    };

    // 1. Everything loaded: the Rust examples natively, and as WebAssembly where the
    // module was found.
    steps.begin("load");
    let summary = backend.load_summary();
    for name in REQUIRED {
        if !summary.loaded.iter().any(|n| n == name) {
            let why = summary
                .failed
                .iter()
                .find(|(n, _)| n == name)
                .map_or("its manifest was not found", |(_, e)| first_line(e));
            return Err(steps.failed(format!("`{name}` did not load: {why}")));
        }
    }
    for name in &summary.wasm_tried {
        let wasm = format!("{name} (wasm)");
        if let Some((_, e)) = summary.failed.iter().find(|(n, _)| *n == wasm) {
            return Err(steps.failed(format!("`{wasm}` did not load: {}", first_line(e))));
        }
    }
    steps.since = Instant::now()
        .checked_sub(summary.took)
        .unwrap_or(steps.since);
    steps.passed(format!(
        "{} plugins ({} as WebAssembly), {} did not load{}",
        summary.loaded.len(),
        summary.wasm_tried.len(),
        summary.failed.len(),
        match summary.failed.is_empty() {
            true => String::new(),
            false => format!(
                " ({})",
                summary
                    .failed
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    ));

    // 2. Each plugin's typical method, once.
    for name in &summary.loaded {
        let base = name.trim_end_matches(" (wasm)");
        let Some(typical) = crate::presets::typical(base) else {
            continue;
        };
        steps.begin(format!("call {name}.{}", typical.method));
        let outcome = call(backend, name, typical.method, typical.input, None).await;
        let output = match &outcome.result {
            Ok(bytes) => crate::json::output(bytes).map_err(|e| steps.failed(e))?,
            Err(e) => return Err(steps.failed(format!("{}: {e}", e.kind()))),
        };
        if !(typical.check)(&output) {
            return Err(steps.failed(format!("unexpected output {output}")));
        }
        if typical.progress && outcome.progress_reports == 0 {
            return Err(steps.failed("no progress report arrived"));
        }
        steps.passed(format!(
            "{}{}",
            short(&output.to_string()),
            match outcome.progress_reports {
                0 => String::new(),
                n => format!(", {n} progress reports"),
            }
        ));
    }

    // 3. `faulty` crashes in its worker: the call gets the crash report, a fresh worker
    // serves the next call.
    steps.begin("crash faulty (segfault), wait for its restart");
    let faulty = backend
        .plugin("faulty")
        .ok_or_else(|| steps.failed("`faulty` is not loaded"))?;
    let events = faulty.subscribe();
    let before = faulty.worker_pid();
    let outcome = call(backend, "faulty", "segfault", "null", None).await;
    let report = crashed(&outcome).map_err(|e| steps.failed(e))?;
    if fault_name(&report) != Some(SEGFAULT) {
        return Err(steps.failed(format!("expected {SEGFAULT}, the report says {report}")));
    }
    let crash_took = outcome.took;
    let restart = wait_for(&events, |e| matches!(e, PluginEvent::Restarted { .. }))
        .await
        .map_err(|e| steps.failed(e))?;
    let outcome = call(backend, "faulty", "echo", r#""still there?""#, None).await;
    if let Err(e) = &outcome.result {
        return Err(steps.failed(format!("the call after the restart failed: {e}")));
    }
    let pid = |pid: Option<u32>| pid.map_or("none".into(), |p| p.to_string());
    steps.passed(format!(
        "{} (the call returned in {crash_took:.0?}); worker pid {} -> {}, restarted in {restart:.0?}",
        report.headline(),
        pid(before),
        pid(faulty.worker_pid())
    ));

    // 4. The same plugin as WebAssembly: a panic traps and ends that instance.
    if let Some(wasm) = backend.plugin("faulty (wasm)") {
        steps.begin("crash faulty (wasm) (panic), wait for a fresh instance");
        let events = wasm.subscribe();
        let outcome = call(
            backend,
            "faulty (wasm)",
            "panic",
            r#"{"message": "the tour was here"}"#,
            None,
        )
        .await;
        let report = crashed(&outcome).map_err(|e| steps.failed(e))?;
        let trap = report.exit.as_ref().and_then(|e| e.trap_kind());
        if trap != Some("unreachable") || report.panic.as_deref() != Some("the tour was here") {
            return Err(steps.failed(format!(
                "expected a trap (unreachable) with the panic message, the report says {report}"
            )));
        }
        // The fresh instance is made after the restart backoff (`Restarted`); the next call
        // waits for it if it comes first.
        let next = call(backend, "faulty (wasm)", "echo", r#""still there?""#, None).await;
        if let Err(e) = &next.result {
            return Err(steps.failed(format!("the call after the trap failed: {e}")));
        }
        wait_for(&events, |e| matches!(e, PluginEvent::Restarted { .. }))
            .await
            .map_err(|e| steps.failed(e))?;
        steps.passed(format!(
            "{}; the next call got a fresh instance in {:.0?}",
            report.headline(),
            next.took
        ));
    }

    // 5. Crash `faulty` until its restart policy quarantines it.
    let max = faulty.manifest().restart.max_crashes;
    steps.begin(format!(
        "crash faulty (abort) until quarantined (max_crashes = {max})"
    ));
    let events = faulty.subscribe();
    let mut crashes = 0;
    loop {
        let outcome = call(backend, "faulty", "abort", "null", None).await;
        let report = crashed(&outcome).map_err(|e| steps.failed(e))?;
        if fault_name(&report) != Some(ABORT) {
            return Err(steps.failed(format!("expected {ABORT}, the report says {report}")));
        }
        crashes += 1;
        let mut quarantined = false;
        wait_for(&events, |e| match e {
            PluginEvent::Quarantined(_) => {
                quarantined = true;
                true
            }
            PluginEvent::Restarted { .. } => true,
            _ => false,
        })
        .await
        .map_err(|e| steps.failed(e))?;
        if quarantined {
            break;
        }
        if crashes > max {
            return Err(steps.failed(format!(
                "still not quarantined after {crashes} more crashes (max_crashes = {max})"
            )));
        }
    }
    if faulty.status().state != PluginState::Quarantined {
        return Err(steps.failed(format!(
            "the Quarantined event came, the state is {:?}",
            faulty.status().state
        )));
    }
    let outcome = call(backend, "faulty", "echo", r#""hello?""#, None).await;
    let refused = match &outcome.result {
        Err(e) => matches!(e.call_error(), Some(CallError::Quarantined { .. })),
        Ok(_) => false,
    };
    if !refused || outcome.took >= Duration::from_secs(1) {
        let got = match &outcome.result {
            Err(e) => format!("{}: {e}", e.kind()),
            Ok(_) => "an answer".to_string(),
        };
        return Err(steps.failed(format!(
            "a call to the quarantined plugin: expected Quarantined at once, got {got} after {:.0?}",
            outcome.took
        )));
    }
    let status = faulty.status();
    steps.passed(format!(
        "quarantined after {crashes} more crashes ({} in all, {} restarts); the next call was refused in {:.1?}",
        status.crashes, status.restarts, outcome.took
    ));
    Ok(steps.done)
}

/// One call through the backend (what a button does).
async fn call(
    backend: &Backend,
    plugin: &str,
    method: &str,
    input: &str,
    timeout: Option<Duration>,
) -> CallOutcome {
    backend
        .call(&CallRequest {
            plugin: plugin.to_string(),
            method: method.to_string(),
            input: input.to_string(),
            timeout,
        })
        .await
}

/// The signal (Unix) or exception status (Windows) that ended a worker.
fn fault_name(report: &CrashReport) -> Option<&str> {
    let exit = report.exit.as_ref()?;
    exit.signal_name().or(exit.exception_name())
}

/// The crash report of a call that must have crashed.
fn crashed(outcome: &CallOutcome) -> Result<std::sync::Arc<CrashReport>, String> {
    match &outcome.result {
        Err(e) => match e.call_error() {
            Some(CallError::Crashed { report, .. }) => Ok(report.clone()),
            _ => Err(format!("expected Crashed, got {}: {e}", e.kind())),
        },
        Ok(bytes) => Err(format!(
            "expected Crashed, the call returned {}",
            short(&crate::json::output_text(bytes))
        )),
    }
}

/// Waits (at most [`EVENT_WAIT`]) for an event `wanted` accepts; returns how long it took.
async fn wait_for(
    events: &EventReceiver,
    mut wanted: impl FnMut(&PluginEvent) -> bool,
) -> Result<Duration, String> {
    let started = Instant::now();
    let found = bounded(EVENT_WAIT, async {
        while let Ok(event) = events.recv().await {
            if wanted(&event) {
                return Ok(());
            }
        }
        Err("the plugin's events ended".to_string())
    })
    .await;
    found
        .map(|()| started.elapsed())
        .map_err(|e| format!("{e} (waiting for a restart or a quarantine)"))
}

/// `fut`, or an error once `limit` has passed.
async fn bounded<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, String>>,
) -> Result<T, String> {
    futures_lite::future::or(fut, async {
        smol::Timer::after(limit).await;
        Err(format!("nothing happened within {limit:?}"))
    })
    .await
}

/// At most 80 characters of `text`, on one line.
fn short(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(80) {
        Some((at, _)) => format!("{}...", &line[..at]),
        None => line,
    }
}
