//! The WebAssembly backend (`runtime = "wasm"`): the plugin is a `.wasm` module run in the
//! host process by the wasmi interpreter. The engine is the sandbox: the module reaches
//! nothing but its own memory and the host services it imports, its memory is capped
//! (`limits.memory`), and it runs on fuel, so a call that spins (computing, or calling host
//! services in a loop) is stopped after its deadline without killing anything.
//!
//! A wasm instance is single-threaded: calls run on a pool of instances (up to
//! `limits.concurrency` × `instances`), reused between calls. A call starts on the caller's
//! thread for a fraction of a millisecond of fuel (a small call finishes there, with no
//! thread hop); one that needs longer, or waits on the host (a host function, a stream
//! item), moves to a thread of the `blocking` pool and looks at its deadline between
//! slices of fuel. A trap ends that one instance: it is dropped, the caller gets a crash
//! report, and the restart policy counts it; other instances and plugins are untouched.

mod instance;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use self::instance::{CallContext, Code, Instance, Request, Running, Started, Step, Trap};
use crate::backend::{
    cancelled as cancelled_error, outcome, until_deadline, Backend, BackendStatus, BoxFuture,
    CallRequest, StreamSink,
};
use crate::cancel::CancelHandle;
use crate::crash::{CrashReport, ExitInfo, LimitExceeded};
use crate::error::{CallError, LoadError};
use crate::host_fn::{HostCallInfo, Imports};
use crate::loader::Descriptor;
use crate::manifest::{Manifest, RestartMode, RestartPolicy};
use crate::plugin::PluginInfo;
use crate::status::{EventHub, InstanceStatus, PluginEvent, PluginState};

/// The memory cap of an instance whose manifest sets no `limits.memory`.
pub(crate) const DEFAULT_MEMORY: u64 = 1 << 30;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The module in use. Instances remember theirs, so those of a module replaced by
/// `reload` are not reused.
struct Generation {
    code: Code,
}

/// Instances between calls, and the module new ones are made from (one lock: the only
/// one on a call's path).
struct Pool {
    idle: Vec<Instance>,
    current: Arc<Generation>,
}

struct State {
    stopped: bool,
    quarantined: Option<Arc<CrashReport>>,
    last_crash: Option<Arc<CrashReport>>,
    crash_times: VecDeque<Instant>,
    /// A crash left the pool one instance short: the next one made is a restart.
    replacing: bool,
    /// When the plugin was loaded, or last restarted after a crash.
    started: Instant,
}

struct Inner {
    name: Arc<str>,
    path: PathBuf,
    config: Vec<u8>,
    memory_limit: u64,
    max_frame: u64,
    grace: Duration,
    load_limit: Duration,
    restart: RestartPolicy,
    imports: Arc<Imports>,
    pool: Mutex<Pool>,
    /// Stopped or quarantined (the details are in `state`): checked before every call
    /// without taking a lock.
    closed: AtomicBool,
    /// Notified when a replacement instance after a crash is made (or failed), and at
    /// quarantine and shutdown: calls waiting for it look again.
    replaced: event_listener::Event,
    /// One permit per instance the pool may run at once.
    permits: Arc<smol::lock::Semaphore>,
    state: Mutex<State>,
    events: EventHub,
    crashes: AtomicU64,
    restarts: AtomicU64,
    in_flight: AtomicUsize,
    /// Set once a shutdown's grace is over: calls still running stop at their next step,
    /// and waits on the host (host functions, stream items) give up.
    halt: CancelHandle,
}

/// A plugin running as WebAssembly in this process.
pub(crate) struct Wasm {
    inner: Arc<Inner>,
}

impl Wasm {
    /// Loads the module and creates the first instance (blocking; run it off the
    /// executor).
    pub fn load(
        manifest: &Manifest,
        path: &Path,
        imports: Arc<Imports>,
    ) -> Result<(Wasm, PluginInfo), LoadError> {
        let memory_limit = manifest.limits.memory.unwrap_or(DEFAULT_MEMORY);
        let load_limit = manifest.timeouts.connect_timeout();
        let config = manifest.config_bytes();
        let (code, first) = create_first(
            &manifest.name,
            path,
            memory_limit,
            manifest.limits.max_frame,
            load_limit,
            &config,
        )?;
        if code.descriptor.name != manifest.name {
            tracing::warn!(
                manifest = %manifest.name,
                library = %code.descriptor.name,
                "the module calls itself `{}` but its manifest says `{}`; using the manifest's name",
                code.descriptor.name,
                manifest.name
            );
        }
        let info = PluginInfo::new(&manifest.name, &code.descriptor);
        let size = (manifest.limits.concurrency.max(1) as usize)
            .saturating_mul(manifest.instances.unwrap_or(1).max(1) as usize)
            .min(1024);
        let inner = Inner {
            name: manifest.name.as_str().into(),
            path: path.to_path_buf(),
            config,
            memory_limit,
            max_frame: manifest.limits.max_frame,
            grace: manifest.timeouts.cancel_grace,
            load_limit,
            restart: manifest.restart.clone(),
            imports,
            pool: Mutex::new(Pool {
                idle: vec![first],
                current: Arc::new(Generation { code }),
            }),
            closed: AtomicBool::new(false),
            replaced: event_listener::Event::new(),
            permits: Arc::new(smol::lock::Semaphore::new(size)),
            state: Mutex::new(State {
                stopped: false,
                quarantined: None,
                last_crash: None,
                crash_times: VecDeque::new(),
                replacing: false,
                started: Instant::now(),
            }),
            events: EventHub::default(),
            crashes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            halt: CancelHandle::new(),
        };
        Ok((
            Wasm {
                inner: Arc::new(inner),
            },
            info,
        ))
    }
}

/// Loads the module at `path` and creates its first plugin instance.
fn create_first(
    plugin: &str,
    path: &Path,
    memory_limit: u64,
    max_frame: u64,
    limit: Duration,
    config: &[u8],
) -> Result<(Code, Instance), LoadError> {
    let (code, mut first) = Code::load(plugin, path, memory_limit, max_frame, limit)?;
    create(plugin, &mut first, config, limit, memory_limit)?;
    Ok((code, first))
}

/// Runs the plugin's `create` in `instance`.
fn create(
    plugin: &str,
    instance: &mut Instance,
    config: &[u8],
    limit: Duration,
    memory_limit: u64,
) -> Result<(), LoadError> {
    match instance.create_plugin(config, limit) {
        Ok(Ok(())) => Ok(()),
        Ok(Err((code, message))) if code == plugin_api::abi::status::PANIC => {
            Err(LoadError::CreatePanicked {
                plugin: plugin.to_string(),
                message,
            })
        }
        Ok(Err((_, message))) => Err(LoadError::CreateFailed {
            plugin: plugin.to_string(),
            message,
        }),
        Err(trap) => {
            let report = report(
                plugin,
                "create",
                &trap,
                instance.born.elapsed(),
                0,
                memory_limit,
            );
            Err(LoadError::CreateCrashed {
                plugin: plugin.to_string(),
                report: Arc::new(report),
            })
        }
    }
}

/// The crash report for a trap.
fn report(
    plugin: &str,
    method: &str,
    trap: &Trap,
    uptime: Duration,
    restarts: u64,
    memory_limit: u64,
) -> CrashReport {
    let (panic, panic_location) = match trap.panic.as_deref() {
        Some((message, location)) => (Some(message.clone()), location.clone()),
        None => (None, None),
    };
    let limit = trap.memory_limit.map(|_| LimitExceeded::Memory {
        bytes: memory_limit,
    });
    CrashReport {
        plugin: plugin.to_string(),
        exit: Some(ExitInfo::Trap {
            kind: trap.kind.clone(),
            message: trap.message.clone(),
        }),
        in_flight: vec![method.to_string()],
        panic,
        panic_location,
        limit,
        killed_by_host: trap.stopped.clone(),
        outside_signal: false,
        start_error: None,
        restarts,
        protocol_error: None,
        stderr_tail: Vec::new(),
        uptime,
    }
}

/// How a call's run on the module ended.
enum End {
    Done(i32, Vec<u8>),
    Trapped(Trap),
}

impl Inner {
    /// Counts a trap of an instance running `method` and applies the restart policy;
    /// returns the report.
    fn crashed(self: &Arc<Self>, method: &str, trap: &Trap, uptime: Duration) -> Arc<CrashReport> {
        let restarts = self.restarts.load(Ordering::Relaxed);
        self.record(report(
            &self.name,
            method,
            trap,
            uptime,
            restarts,
            self.memory_limit,
        ))
    }

    /// Counts a crash (a trap, or a replacement instance that failed to start) and
    /// applies the restart policy; returns the report, shared.
    fn record(self: &Arc<Self>, report: CrashReport) -> Arc<CrashReport> {
        let report = Arc::new(report);
        tracing::warn!(plugin = %self.name, "{}", report.headline());
        self.crashes.fetch_add(1, Ordering::Relaxed);
        self.events.emit(PluginEvent::Crashed(report.clone()));
        let policy = &self.restart;
        let mut state = lock(&self.state);
        state.last_crash = Some(report.clone());
        let now = Instant::now();
        state.crash_times.push_back(now);
        while state
            .crash_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            state.crash_times.pop_front();
        }
        let recent = state.crash_times.len() as u32;
        if state.stopped || state.quarantined.is_some() {
            return report;
        }
        if policy.mode == RestartMode::Never || recent > policy.max_crashes {
            tracing::error!(plugin = %self.name, "quarantined after {recent} crashes");
            state.quarantined = Some(report.clone());
            self.closed.store(true, Ordering::Release);
            drop(state);
            lock(&self.pool).idle.clear();
            self.replaced.notify(usize::MAX);
            self.events.emit(PluginEvent::Quarantined(report.clone()));
            return report;
        }
        let factor = 1u32 << recent.saturating_sub(1).min(20);
        let backoff = policy
            .backoff
            .saturating_mul(factor)
            .min(policy.backoff_max);
        state.replacing = true;
        drop(state);
        // As a worker is restarted: the replacement is made after the backoff, not only
        // when the next call needs it.
        smol::spawn(self.clone().replace_after(now + backoff)).detach();
        report
    }

    /// Makes the instance a crash asked for, at `at`, and puts it in the pool.
    async fn replace_after(self: Arc<Self>, at: Instant) {
        smol::Timer::at(at).await;
        if self.refusal().is_some() || !lock(&self.state).replacing {
            return;
        }
        let generation = lock(&self.pool).current.clone();
        let inner = self.clone();
        let made = Detached::new(blocking::unblock(move || {
            inner.make(&generation).map(|i| (generation, i))
        }))
        .await;
        if let Ok((generation, instance)) = made {
            let mut pool = lock(&self.pool);
            if !self.closed.load(Ordering::Acquire) && Arc::ptr_eq(&pool.current, &generation) {
                pool.idle.push(instance);
            }
        }
        // Made, or failed (then another replacement is due, or the plugin is quarantined):
        // calls waiting for it look again.
        self.replaced.notify(usize::MAX);
    }

    /// Makes and creates an instance of `generation` (blocking); a failure counts as a crash
    /// (and applies the restart policy).
    fn make(self: &Arc<Self>, generation: &Generation) -> Result<Instance, Arc<CrashReport>> {
        let plugin = self.name.to_string();
        let made = match generation.code.instantiate(&plugin) {
            Ok(mut instance) => match instance.create_plugin(&self.config, self.load_limit) {
                Ok(Ok(())) => Ok(instance),
                Ok(Err((_, message))) => Err(Err(LoadError::CreateFailed { plugin, message })),
                Err(trap) => Err(Ok(trap)),
            },
            Err(Started::Load(e)) => Err(Err(e)),
            Err(Started::Trap(t)) => Err(Ok(t)),
        };
        match made {
            Ok(instance) => {
                self.made_after_crash();
                Ok(instance)
            }
            Err(Ok(trap)) => Err(self.crashed("create", &trap, Duration::ZERO)),
            Err(Err(error)) => {
                let restarts = self.restarts.load(Ordering::Relaxed);
                Err(self.record(CrashReport::start_failure(&self.name, &error, restarts)))
            }
        }
    }

    /// Why calls cannot run now, if they cannot.
    fn refusal(&self) -> Option<CallError> {
        if !self.closed.load(Ordering::Acquire) {
            return None;
        }
        let state = lock(&self.state);
        if state.stopped {
            return Some(CallError::Stopped {
                plugin: self.name.to_string(),
            });
        }
        state
            .quarantined
            .as_ref()
            .map(|report| CallError::Quarantined {
                plugin: self.name.to_string(),
                report: report.clone(),
            })
    }

    /// An idle instance of the current module, or a fresh one (after the backoff, if a
    /// crash asked for one).
    async fn instance(
        self: &Arc<Self>,
        method: &str,
    ) -> Result<(Arc<Generation>, Instance), CallError> {
        let generation = loop {
            let generation = {
                let mut pool = lock(&self.pool);
                if let Some(instance) = pool.idle.pop() {
                    return Ok((pool.current.clone(), instance));
                }
                pool.current.clone()
            };
            if let Some(refused) = self.refusal() {
                return Err(refused);
            }
            // A crash asked for a replacement (made after the backoff): wait for it, as
            // calls wait for a restarting worker, rather than make another.
            let replaced = self.replaced.listen();
            if !lock(&self.state).replacing {
                break generation;
            }
            if lock(&self.pool).idle.is_empty() && self.refusal().is_none() {
                replaced.await;
            }
        };
        let inner = self.clone();
        // The accounting happens on that thread too, so that a caller who gives up while the
        // instance is being made does not lose a crash or a restart.
        let method = method.to_string();
        Detached::new(blocking::unblock(move || match inner.make(&generation) {
            Ok(instance) => Ok((generation, instance)),
            Err(report) => Err(CallError::Crashed {
                plugin: inner.name.to_string(),
                method,
                report,
            }),
        }))
        .await
    }

    /// A new instance is ready: if a crash asked for it, that is a restart.
    fn made_after_crash(&self) {
        let mut state = lock(&self.state);
        let restarted = std::mem::take(&mut state.replacing);
        if restarted {
            state.started = Instant::now();
            drop(state);
            let restarts = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(plugin = %self.name, "instance replaced after a crash");
            self.events.emit(PluginEvent::Restarted {
                pid: std::process::id(),
                restarts,
            });
        }
    }

    /// Ends a call: the instance goes back to the pool, or (after a trap) is dropped and
    /// the crash counted.
    fn end(
        self: &Arc<Self>,
        method: &str,
        generation: Arc<Generation>,
        running: Running,
        end: End,
    ) -> Result<Vec<u8>, CallError> {
        match end {
            End::Done(code, bytes) => {
                if let Some(mut instance) = running.finish() {
                    instance.guest().call = None;
                    // Not after a shutdown or a quarantine, nor into a newer module's pool.
                    let mut pool = lock(&self.pool);
                    if !self.closed.load(Ordering::Acquire)
                        && Arc::ptr_eq(&pool.current, &generation)
                    {
                        pool.idle.push(instance);
                    }
                }
                let methods = &generation.code.descriptor.methods;
                outcome(&self.name, method, methods, code, bytes)
            }
            End::Trapped(trap) => {
                let uptime = running.instance.born.elapsed();
                drop(running);
                let report = self.crashed(method, &trap, uptime);
                Err(CallError::Crashed {
                    plugin: self.name.to_string(),
                    method: method.to_string(),
                    report,
                })
            }
        }
    }

    /// Runs one call to its end.
    async fn run(
        self: Arc<Self>,
        id: u64,
        method: String,
        input: Vec<u8>,
        progress: Option<crate::backend::ProgressFn>,
        stream: Option<StreamSink>,
        flag: CancelHandle,
    ) -> Result<Vec<u8>, CallError> {
        if let Some(refused) = self.refusal() {
            return Err(refused);
        }
        let permit = self.permits.acquire_arc().await;
        // It may have been shut down or quarantined while this call waited for its turn.
        if let Some(refused) = self.refusal() {
            return Err(refused);
        }
        let (generation, mut instance) = self.instance(&method).await?;
        let guest = instance.guest();
        guest.panic = None;
        guest.call = Some(CallContext {
            progress,
            cancel: flag.clone(),
            streaming: stream.is_some(),
        });
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        // Counted until the instance is back (or dropped), also past a caller that is gone.
        let count = InFlight(self.clone());
        let (running, step) = instance.start(&method, input, instance::INLINE_FUEL);
        match step {
            Step::Done(code, bytes) => {
                return self.end(&method, generation, running, End::Done(code, bytes))
            }
            Step::Trapped(trap) => {
                return self.end(&method, generation, running, End::Trapped(trap))
            }
            Step::Fuel | Step::Wait(_) => {}
        }
        // Longer than a slice, or waiting on the host: on with it on a thread of its own,
        // which also ends the call (and gives back the instance) if this future is gone.
        let inner = self.clone();
        Detached::new(blocking::unblock(move || {
            let _permit = permit;
            let _count = count;
            let (running, end) = inner.finish_blocking(id, &method, running, step, &flag, stream);
            inner.end(&method, generation, running, end)
        }))
        .await
    }

    /// Runs a call that left the caller's thread until it ends: answers what it asks of
    /// the host, and stops it `cancel_grace` after it was cancelled (its deadline passed,
    /// its caller gave up) if it has not returned by then.
    fn finish_blocking(
        &self,
        id: u64,
        method: &str,
        mut running: Running,
        mut step: Step,
        flag: &CancelHandle,
        stream: Option<StreamSink>,
    ) -> (Running, End) {
        let mut cancelled_at: Option<Instant> = None;
        // Bytes of stream items the consumer has not taken yet.
        let outstanding = std::sync::atomic::AtomicU64::new(0);
        loop {
            // Between any two steps (a slice of fuel, an answer from the host), so that a
            // module that keeps calling services is stopped as surely as one that computes.
            if !matches!(step, Step::Done(..) | Step::Trapped(_)) {
                if self.halt.is_cancelled() {
                    let trap = stopped(method, "the plugin was shut down");
                    return (running, End::Trapped(trap));
                }
                if flag.is_cancelled() {
                    let at = *cancelled_at.get_or_insert_with(Instant::now);
                    if at.elapsed() >= self.grace {
                        let why = format!(
                            "`{method}` was cancelled (deadline or caller) and did not return within cancel_grace ({:?})",
                            self.grace
                        );
                        return (running, End::Trapped(stopped(method, &why)));
                    }
                }
            }
            step = match step {
                Step::Done(code, bytes) => return (running, End::Done(code, bytes)),
                Step::Trapped(trap) => return (running, End::Trapped(trap)),
                Step::Fuel => running.resume(instance::SLICE_FUEL),
                Step::Wait(Request::HostCall {
                    name,
                    input,
                    output_len,
                }) => {
                    let (code, output) = self.host_call(id, method, &name, input, flag);
                    running.answer(code, output, Some(output_len), instance::SLICE_FUEL)
                }
                Step::Wait(Request::Emit(item)) => {
                    let code = crate::backend::emit_blocking(
                        stream.as_ref(),
                        item,
                        &outstanding,
                        flag,
                        Some(&self.halt),
                    );
                    running.answer(code, Vec::new(), None, instance::SLICE_FUEL)
                }
            };
        }
    }

    /// Runs host function `name` for call `id` (blocking this thread).
    fn host_call(
        &self,
        id: u64,
        method: &str,
        name: &str,
        input: Vec<u8>,
        flag: &CancelHandle,
    ) -> (i32, Vec<u8>) {
        let call = HostCallInfo {
            function: name.to_string(),
            method: method.to_string(),
            call_id: id,
            cancel: flag.clone(),
        };
        let max = usize::try_from(self.max_frame).unwrap_or(usize::MAX);
        crate::host_fn::run_blocking(
            &self.imports,
            call,
            input,
            self.grace,
            max,
            Some(&self.halt),
        )
    }
}

/// The "trap" of a call the host stopped.
fn stopped(method: &str, why: &str) -> Trap {
    Trap {
        kind: "interrupted".into(),
        message: format!("the host stopped `{method}` between two slices of fuel"),
        panic: None,
        memory_limit: None,
        stopped: Some(why.to_string()),
    }
}

/// A task on the `blocking` pool that runs to its end even when the future waiting for it
/// is dropped (a dropped `blocking::Task` would be cancelled if it had not started yet,
/// and what it was to clean up would be lost with it).
struct Detached<T>(Option<blocking::Task<T>>);

impl<T> Detached<T> {
    fn new(task: blocking::Task<T>) -> Self {
        Detached(Some(task))
    }
}

impl<T> std::future::Future for Detached<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        let task = self.0.as_mut().expect("polled after it finished");
        let done = std::pin::Pin::new(task).poll(cx);
        if done.is_ready() {
            self.0 = None;
        }
        done
    }
}

impl<T> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.detach();
        }
    }
}

/// Counts a call in flight while it lives.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend for Wasm {
    fn call(&self, call: CallRequest) -> BoxFuture<Result<Vec<u8>, CallError>> {
        if call.cancel.as_ref().is_some_and(CancelHandle::is_cancelled) {
            let error = cancelled_error(&self.inner.name, &call.method);
            return Box::pin(async move { Err(error) });
        }
        let size = u64::try_from(call.input.len()).unwrap_or(u64::MAX);
        if size > self.inner.max_frame {
            let error = CallError::InputTooLarge {
                plugin: self.inner.name.to_string(),
                method: call.method,
                size: call.input.len(),
                limit: self.inner.max_frame,
            };
            return Box::pin(async move { Err(error) });
        }
        let flag = CancelHandle::new();
        let work = self.inner.clone().run(
            call.id,
            call.method.clone(),
            call.input,
            call.progress,
            call.stream,
            flag.clone(),
        );
        Box::pin(until_deadline(
            self.inner.name.clone(),
            call.method,
            call.deadline,
            call.cancel,
            flag,
            work,
        ))
    }

    fn shutdown(&self, grace: Duration) -> BoxFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            lock(&inner.state).stopped = true;
            inner.closed.store(true, Ordering::Release);
            inner.replaced.notify(usize::MAX);
            let deadline = Instant::now() + grace;
            while inner.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
                smol::Timer::after(Duration::from_millis(2)).await;
            }
            inner.halt.cancel();
            lock(&inner.pool).idle.clear();
            inner.events.emit(PluginEvent::Stopped);
        })
    }

    fn status(&self) -> BackendStatus {
        let inner = &self.inner;
        let state = lock(&inner.state);
        let plugin_state = if state.stopped {
            PluginState::Stopped
        } else if state.quarantined.is_some() {
            PluginState::Quarantined
        } else if state.replacing && lock(&inner.pool).idle.is_empty() {
            // A crash asked for a replacement and no other instance is ready to serve.
            PluginState::Restarting
        } else {
            PluginState::Ready
        };
        let uptime = Some(state.started.elapsed());
        BackendStatus {
            state: plugin_state,
            crashes: inner.crashes.load(Ordering::Relaxed),
            restarts: inner.restarts.load(Ordering::Relaxed),
            uptime,
            pid: None,
            last_crash: state.last_crash.clone(),
            sandbox: vec![
                "webassembly: no imports beyond the host services (no WASI)".to_string(),
                format!(
                    "webassembly: memory capped at {} MiB per instance",
                    inner.memory_limit >> 20
                ),
                "webassembly: deadlines enforced by fuel".to_string(),
            ],
            sandbox_missing: Vec::new(),
            instances: vec![InstanceStatus {
                index: 0,
                state: plugin_state,
                pid: None,
                uptime,
                in_flight: inner.in_flight.load(Ordering::Relaxed),
                transport: None,
            }],
        }
    }

    fn subscribe(&self) -> async_channel::Receiver<PluginEvent> {
        self.inner.events.subscribe()
    }

    fn enable(&self) -> BoxFuture<bool> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut state = lock(&inner.state);
            if state.stopped || state.quarantined.take().is_none() {
                return false;
            }
            state.crash_times.clear();
            inner.closed.store(false, Ordering::Release);
            state.replacing = false;
            drop(state);
            tracing::info!(plugin = %inner.name, "re-enabled");
            inner.events.emit(PluginEvent::Enabled);
            true
        })
    }

    fn reload(&self) -> BoxFuture<Result<Descriptor, LoadError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            if lock(&inner.state).stopped {
                return Err(LoadError::ReloadUnsupported {
                    plugin: inner.name.to_string(),
                    reason: "it was shut down; load it again instead".into(),
                });
            }
            let loader = inner.clone();
            let loaded = blocking::unblock(move || {
                create_first(
                    &loader.name,
                    &loader.path,
                    loader.memory_limit,
                    loader.max_frame,
                    loader.load_limit,
                    &loader.config,
                )
            })
            .await;
            match loaded {
                Ok((code, first)) => {
                    let descriptor = code.descriptor.clone();
                    {
                        let mut pool = lock(&inner.pool);
                        pool.current = Arc::new(Generation { code });
                        pool.idle.clear();
                        pool.idle.push(first);
                    }
                    inner.events.emit(PluginEvent::Reloaded {
                        version: descriptor.version.clone(),
                    });
                    Ok(descriptor)
                }
                Err(error) => {
                    inner.events.emit(PluginEvent::ReloadFailed {
                        error: error.to_string(),
                    });
                    Err(error)
                }
            }
        })
    }
}
