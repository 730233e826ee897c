//! The isolated backend for untrusted plugins: each plugin runs in a `worker-shim`
//! process, reached over a local socket. A crash ends the worker, never the host.
//!
//! Supervision, per plugin: `Ready -> (crash) -> Restarting -> Ready ...`, or
//! `Quarantined` once the crash budget (`restart.max_crashes` within `restart.window`) is
//! spent or the policy is `never`. A crash is noticed by whoever sees it first: a call
//! whose connection closed, or the waiter thread reaping the process (an idle worker that
//! died). Restarts happen in the background after an exponential backoff; calls that
//! arrive meanwhile wait for the fresh worker within their own deadline.
//!
//! The host also kills workers: one still busy with a call `timeouts.cancel_grace` after
//! that call's deadline, and one that does not answer a ping within
//! `timeouts.ping_timeout` (pings every `timeouts.ping_interval`). Calls that were on such
//! a worker fail with [`CallError::Killed`].

pub(crate) mod conn;
pub(crate) mod process;
mod start;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use crate::backend::{outcome, timeout, Backend, BackendStatus, BoxFuture, CallRequest};
use crate::crash::{CrashReport, ExitInfo, LimitExceeded};
use crate::error::{CallError, LoadError};
use crate::loader::Descriptor;
use crate::manifest::{Limits, RestartMode, RestartPolicy, Timeouts};
use crate::plugin::PluginInfo;
use crate::protocol::{Message, WireSandbox};
use crate::status::{EventHub, PluginEvent, PluginState};
use conn::{CloseReason, Closed, Conn};
use process::WorkerProcess;

/// Everything needed to start (and restart) a plugin's worker.
pub(crate) struct Spec {
    pub plugin: Arc<str>,
    pub shim: PathBuf,
    pub library: PathBuf,
    pub config: Vec<u8>,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub restart: RestartPolicy,
    /// What the worker must enforce (`None`: the sandbox is off).
    pub sandbox: Option<WireSandbox>,
    /// The environment the worker gets (granted names only, unless the sandbox is off).
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// A private temporary directory (`$TMP`) to remove when the plugin is dropped.
    pub tmp_dir: Option<PathBuf>,
}

impl Drop for Spec {
    fn drop(&mut self) {
        if let Some(dir) = self.tmp_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A running worker: its process and connection.
pub(crate) struct Worker {
    process: Arc<WorkerProcess>,
    conn: Arc<Conn>,
    desc: Descriptor,
    /// Set by whoever handles this worker's death first.
    handled: AtomicBool,
    /// Sandbox layers in force in the plugin's process.
    sandbox: Vec<String>,
    /// Layers missing (best-effort mode), `layer: why`.
    sandbox_missing: Vec<String>,
    /// The crash report, built once and shared by every call that was on this worker,
    /// the status and the events.
    crash: smol::lock::OnceCell<Arc<CrashReport>>,
}

impl Worker {
    fn new(process: Arc<WorkerProcess>, conn: Arc<Conn>, desc: Descriptor) -> Worker {
        Worker {
            process,
            conn,
            desc,
            handled: AtomicBool::new(false),
            sandbox: Vec::new(),
            sandbox_missing: Vec::new(),
            crash: smol::lock::OnceCell::new(),
        }
    }

    fn is_alive(&self) -> bool {
        self.conn.closed().is_none() && !self.process.has_exited()
    }

    /// This worker's crash report: built once (by whoever asks first) when the process has
    /// been reaped, then shared.
    async fn shared_report(&self, spec: &Spec, closed: &Closed, restarts: u64) -> Arc<CrashReport> {
        self.crash
            .get_or_init(|| async { Arc::new(self.report(spec, closed, restarts).await) })
            .await
            .clone()
    }

    /// Builds a crash report once the process has been reaped.
    async fn report(&self, spec: &Spec, closed: &Closed, restarts: u64) -> CrashReport {
        // SIGKILL if the host's kill reached it running, whatever it did once cut off.
        let exit = self.process.wait_exit_info(Duration::from_secs(2)).await;
        let stderr_tail = self.process.stderr_tail();
        let outside_signal = exit.as_ref().is_some_and(ExitInfo::is_outside_signal)
            && !self.process.killed_by_host();
        let (panic, panic_location) = CrashReport::find_panic(&self.process.panic_lines())
            .map_or((None, None), |(m, l)| (Some(m), l));
        CrashReport {
            plugin: spec.plugin.to_string(),
            limit: limit_hit(
                &spec.limits,
                exit.as_ref(),
                self.process.allocation_failed(),
            ),
            exit,
            in_flight: closed.in_flight.clone(),
            panic,
            panic_location,
            protocol_error: match &closed.reason {
                CloseReason::Protocol(m) => Some(m.clone()),
                CloseReason::Io(m) => Some(format!("i/o error on the worker connection: {m}")),
                _ => None,
            },
            killed_by_host: match &closed.reason {
                // Not when it had ended on its own before the kill: its own cause stands.
                CloseReason::Killed(why) if self.process.killed_by_host() => Some(why.clone()),
                _ => None,
            },
            outside_signal,
            start_error: None,
            stderr_tail,
            uptime: self.process.uptime(),
            restarts,
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The waiter thread reaps it.
        self.process.kill();
    }
}

/// Which resource limit, if any, explains how the worker ended.
fn limit_hit(
    limits: &Limits,
    exit: Option<&ExitInfo>,
    allocation_failed: bool,
) -> Option<LimitExceeded> {
    if exit.and_then(ExitInfo::signal_name) == Some("SIGXCPU") {
        return Some(LimitExceeded::Cpu {
            limit: limits.cpu.unwrap_or_default(),
        });
    }
    let bytes = limits.memory?;
    allocation_failed.then_some(LimitExceeded::Memory { bytes })
}

/// Where the plugin is in its life (see the module documentation).
enum Slot {
    Ready(Arc<Worker>),
    /// Closed when the restart attempt settles (ready, or quarantined).
    Restarting(async_channel::Receiver<()>),
    Quarantined(Arc<CrashReport>),
    Stopped,
}

struct Inner {
    spec: Spec,
    /// Closed when the plugin is shut down or dropped.
    stopped: async_channel::Receiver<()>,
    stop: Mutex<Option<async_channel::Sender<()>>>,
    slot: Mutex<Slot>,
    crash_times: Mutex<VecDeque<Instant>>,
    last_crash: Mutex<Option<Arc<CrashReport>>>,
    crashes: AtomicU64,
    restarts: AtomicU64,
    events: EventHub,
}

/// The backend handle.
pub(crate) struct Isolated {
    inner: Arc<Inner>,
}

impl Isolated {
    /// Starts the first worker; its `Loaded` answer is the plugin's info.
    pub async fn load(spec: Spec) -> Result<(Isolated, PluginInfo), LoadError> {
        let worker = Arc::new(start::start(&spec).await?);
        let info = PluginInfo::new(&spec.plugin, &worker.desc);
        let (stop, stopped) = async_channel::bounded(1);
        let inner = Arc::new(Inner {
            spec,
            stopped,
            stop: Mutex::new(Some(stop)),
            slot: Mutex::new(Slot::Ready(worker.clone())),
            crash_times: Mutex::new(VecDeque::new()),
            last_crash: Mutex::new(None),
            crashes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            events: EventHub::default(),
        });
        inner.watch(&worker);
        Ok((Isolated { inner }, info))
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        // Stops pending restarts; dropping the worker kills it.
        *self.inner.slot() = Slot::Stopped;
        lock(&self.inner.stop).take();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn slot(&self) -> MutexGuard<'_, Slot> {
        lock(&self.slot)
    }

    fn plugin(&self) -> String {
        self.spec.plugin.to_string()
    }

    /// Watches a fresh worker: its death is handled when the process is reaped, and it is
    /// pinged while it lives.
    fn watch(self: &Arc<Self>, worker: &Arc<Worker>) {
        let (inner, w) = (Arc::downgrade(self), Arc::downgrade(worker));
        worker.process.on_exit(move || {
            if let (Some(inner), Some(worker)) = (inner.upgrade(), w.upgrade()) {
                // On the waiter thread, where waiting briefly for a reader is harmless: read
                // what the worker wrote before dying, so replies that made it out arrive and
                // half a frame is reported as such.
                worker.conn.finish_after_exit();
                inner.begin_crash(&worker);
            }
        });
        let interval = self.spec.timeouts.ping_interval;
        let patience = self.spec.timeouts.ping_timeout;
        smol::spawn(ping_loop(Arc::downgrade(worker), interval, patience)).detach();
    }

    /// The live worker, waiting (within `deadline`) for a restart in progress.
    async fn worker(
        self: &Arc<Self>,
        deadline: Instant,
        method: &str,
        after: Duration,
    ) -> Result<Arc<Worker>, CallError> {
        loop {
            let wait = match &*self.slot() {
                Slot::Ready(w) if w.is_alive() => return Ok(w.clone()),
                Slot::Ready(w) => Err(w.clone()),
                Slot::Restarting(done) => Ok(done.clone()),
                Slot::Quarantined(report) => {
                    return Err(CallError::Quarantined {
                        plugin: self.plugin(),
                        report: report.clone(),
                    })
                }
                Slot::Stopped => {
                    return Err(CallError::Stopped {
                        plugin: self.plugin(),
                    })
                }
            };
            if Instant::now() >= deadline {
                return Err(timeout(&self.spec.plugin, method, after));
            }
            let done = match wait {
                // Dead but not yet handled. The handling must not depend on this caller's
                // future staying alive, so the slot turns `Restarting` here, synchronously,
                // and the rest runs in its own task.
                Err(dead) => match self.begin_crash(&dead) {
                    Some(done) => done,
                    None => {
                        // Someone else is handling it; let them move the slot on.
                        smol::future::yield_now().await;
                        continue;
                    }
                },
                Ok(done) => done,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            futures_lite::future::or(
                async {
                    let _ = done.recv().await;
                },
                async {
                    smol::Timer::after(left).await;
                },
            )
            .await;
        }
    }

    /// Starts handling a worker's death, once: the slot becomes `Restarting` at once, and
    /// a detached task builds the report and applies the restart policy. Returns the
    /// channel that closes when the plugin settles, or `None` if someone else handles it.
    fn begin_crash(self: &Arc<Self>, worker: &Arc<Worker>) -> Option<async_channel::Receiver<()>> {
        if worker.handled.swap(true, Ordering::AcqRel) {
            return None;
        }
        let (done_tx, done_rx) = async_channel::bounded(1);
        {
            let mut slot = self.slot();
            match &*slot {
                Slot::Ready(current) if Arc::ptr_eq(current, worker) => {
                    *slot = Slot::Restarting(done_rx.clone())
                }
                // Shut down, or already replaced: nothing to supervise.
                _ => return None,
            }
        }
        // A no-op if a reader (or the exit hook's drain) already saw the end; otherwise it
        // records the calls that were in flight.
        worker.conn.close(CloseReason::Eof);
        let closed = worker.conn.closed().unwrap_or(Closed {
            reason: CloseReason::Eof,
            in_flight: Vec::new(),
        });
        let (inner, worker) = (self.clone(), worker.clone());
        smol::spawn(async move {
            let restarts = inner.restarts.load(Ordering::Relaxed);
            let report = worker.shared_report(&inner.spec, &closed, restarts).await;
            inner.after_crash(report, done_tx);
        })
        .detach();
        Some(done_rx)
    }

    /// Counts a crash and applies the restart policy. `done` is closed when the plugin
    /// settles (ready again, or quarantined).
    fn after_crash(self: &Arc<Self>, report: Arc<CrashReport>, done: async_channel::Sender<()>) {
        tracing::warn!(plugin = %self.spec.plugin, "{}", report.headline());
        self.crashes.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_crash) = Some(report.clone());
        self.events.emit(PluginEvent::Crashed(report.clone()));
        let policy = &self.spec.restart;
        let recent = {
            let mut times = lock(&self.crash_times);
            let now = Instant::now();
            times.push_back(now);
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) > policy.window)
            {
                times.pop_front();
            }
            times.len() as u32
        };
        let mut slot = self.slot();
        if matches!(*slot, Slot::Stopped) {
            return;
        }
        if policy.mode == RestartMode::Never || recent > policy.max_crashes {
            tracing::error!(plugin = %self.spec.plugin, "quarantined after {recent} crashes");
            *slot = Slot::Quarantined(report.clone());
            drop(slot);
            self.events.emit(PluginEvent::Quarantined(report));
            return;
        }
        drop(slot);
        let factor = 1u32 << (recent.saturating_sub(1)).min(20);
        let backoff = policy
            .backoff
            .saturating_mul(factor)
            .min(policy.backoff_max);
        smol::spawn(self.clone().restart_after(backoff, done)).detach();
    }

    /// Starts a fresh worker after `backoff`; a failed start counts as a crash.
    async fn restart_after(self: Arc<Self>, backoff: Duration, done: async_channel::Sender<()>) {
        smol::Timer::after(backoff).await;
        if matches!(*self.slot(), Slot::Stopped) {
            return;
        }
        // Shutdown or drop abandons a start in progress (its half-started worker is killed).
        let stopped = self.stopped.clone();
        let started =
            futures_lite::future::or(async { Some(start::start(&self.spec).await) }, async {
                let _ = stopped.recv().await;
                None
            })
            .await;
        let Some(started) = started else { return };
        match started {
            Ok(worker) => {
                let worker = Arc::new(worker);
                {
                    let mut slot = self.slot();
                    if matches!(*slot, Slot::Stopped) {
                        return;
                    }
                    *slot = Slot::Ready(worker.clone());
                }
                let restarts = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
                self.watch(&worker);
                tracing::info!(plugin = %self.spec.plugin, pid = worker.process.pid(), "restarted");
                self.events.emit(PluginEvent::Restarted {
                    pid: worker.process.pid(),
                    restarts,
                });
                drop(done);
            }
            Err(error) => {
                let report = match error {
                    LoadError::CreateCrashed { report, .. } => report,
                    other => Arc::new(CrashReport::start_failure(
                        &self.spec.plugin,
                        &other,
                        self.restarts.load(Ordering::Relaxed),
                    )),
                };
                self.after_crash(report, done);
            }
        }
    }

    /// Turns a closed connection into the caller's error.
    async fn closed_error(&self, worker: &Worker, closed: &Closed, method: &str) -> CallError {
        let plugin = self.plugin();
        if matches!(closed.reason, CloseReason::Host) {
            return CallError::Stopped { plugin };
        }
        let report = worker
            .shared_report(&self.spec, closed, self.restarts.load(Ordering::Relaxed))
            .await;
        let method = method.to_string();
        match closed.reason {
            CloseReason::Killed(_) => CallError::Killed {
                plugin,
                method,
                report,
            },
            _ => CallError::Crashed {
                plugin,
                method,
                report,
            },
        }
    }
}

/// Pings a worker every `interval`; one that does not answer within `patience` is killed.
async fn ping_loop(worker: Weak<Worker>, interval: Duration, patience: Duration) {
    let mut seq = 0;
    loop {
        smol::Timer::after(interval).await;
        let Some(worker) = worker.upgrade() else {
            return;
        };
        if !worker.is_alive() {
            return;
        }
        seq += 1;
        let answered =
            futures_lite::future::or(async { Some(worker.conn.ping(seq).await) }, async {
                smol::Timer::after(patience).await;
                None
            })
            .await;
        match answered {
            Some(Ok(())) => {}
            Some(Err(_)) => return,
            None => {
                let why = format!("it did not answer a ping within {patience:?}");
                worker.conn.close(CloseReason::Killed(why));
                return;
            }
        }
    }
}

impl Backend for Isolated {
    fn call(&self, call: CallRequest) -> BoxFuture<Result<Vec<u8>, CallError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let started = Instant::now();
            let deadline = started + call.deadline;
            // Room for the frame header; the worker would refuse a larger frame and die.
            let limit = inner.spec.limits.max_frame;
            let size = u64::try_from(call.input.len()).unwrap_or(u64::MAX);
            if size.saturating_add(crate::protocol::FRAME_ROOM) > limit {
                return Err(CallError::InputTooLarge {
                    plugin: inner.plugin(),
                    method: call.method,
                    size: call.input.len(),
                    limit,
                });
            }
            let worker = inner.worker(deadline, &call.method, call.deadline).await?;
            let plugin = &inner.spec.plugin;
            // The deadline covers sending too (a stalled worker may not drain its socket).
            // Abandoning a half-written frame is safe: the connection finishes it. One
            // timer serves both phases (each timer costs the reactor a syscall).
            let mut timer = smol::Timer::at(deadline);
            let sent = futures_lite::future::or(
                async {
                    Some(
                        worker
                            .conn
                            .call(call.id, &call.method, &call.input, call.progress)
                            .await,
                    )
                },
                async {
                    (&mut timer).await;
                    None
                },
            )
            .await;
            let mut guard = match sent {
                Some(Ok(guard)) => guard,
                Some(Err(closed)) => {
                    return Err(inner.closed_error(&worker, &closed, &call.method).await)
                }
                // Dropping the unsent call's guard told the worker to cancel it.
                None => return Err(timeout(plugin, &call.method, call.deadline)),
            };
            let reply = futures_lite::future::or(async { Some(guard.reply().await) }, async {
                (&mut timer).await;
                None
            })
            .await;
            match reply {
                Some(Ok((status, bytes))) => {
                    outcome(plugin, &call.method, &worker.desc.methods, status, bytes)
                }
                Some(Err(closed)) => Err(inner.closed_error(&worker, &closed, &call.method).await),
                None => {
                    // Tell the plugin, give it `cancel_grace` to stop; past that, end the
                    // worker. All of it off the caller's path: the caller gets Timeout now.
                    let grace = inner.spec.timeouts.cancel_grace;
                    let (id, method, after) = (call.id, call.method.clone(), call.deadline);
                    let watched = worker.clone();
                    smol::spawn(async move {
                        let deadline = Instant::now() + grace;
                        let _ = futures_lite::future::or(
                            async { watched.conn.send(&Message::Cancel { id }, &[]).await.ok() },
                            async {
                                smol::Timer::at(deadline).await;
                                None
                            },
                        )
                        .await;
                        let finished = futures_lite::future::or(async { guard.reply().await.is_ok() }, async {
                            smol::Timer::at(deadline).await;
                            false
                        })
                        .await;
                        if !finished && watched.is_alive() {
                            let why = format!("call `{method}` was still running {grace:?} after its {after:?} deadline");
                            watched.conn.close(CloseReason::Killed(why));
                        }
                    })
                    .detach();
                    Err(timeout(plugin, &call.method, call.deadline))
                }
            }
        })
    }

    fn shutdown(&self, grace: Duration) -> BoxFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let previous = std::mem::replace(&mut *inner.slot(), Slot::Stopped);
            lock(&inner.stop).take();
            inner.events.emit(PluginEvent::Stopped);
            let Slot::Ready(worker) = previous else {
                return;
            };
            let deadline = Instant::now() + grace;
            while worker.conn.in_flight() > 0 && worker.is_alive() && Instant::now() < deadline {
                smol::Timer::after(Duration::from_millis(5)).await;
            }
            // Calls still running past the grace period fail with `Stopped`; closing the
            // connection also kills the worker (it would exit on EOF anyway).
            worker.conn.close(CloseReason::Host);
            worker.process.wait_exit(Duration::from_secs(2)).await;
        })
    }

    fn status(&self) -> BackendStatus {
        let (state, worker) = match &*self.inner.slot() {
            Slot::Ready(w) => (PluginState::Ready, Some(w.clone())),
            Slot::Restarting(_) => (PluginState::Restarting, None),
            Slot::Quarantined(_) => (PluginState::Quarantined, None),
            Slot::Stopped => (PluginState::Stopped, None),
        };
        let live = worker.filter(|w| w.is_alive());
        BackendStatus {
            state,
            crashes: self.inner.crashes.load(Ordering::Relaxed),
            restarts: self.inner.restarts.load(Ordering::Relaxed),
            uptime: live.as_ref().map(|w| w.process.uptime()),
            pid: live.as_ref().map(|w| w.process.pid()),
            sandbox: live.as_ref().map(|w| w.sandbox.clone()).unwrap_or_default(),
            sandbox_missing: live
                .as_ref()
                .map(|w| w.sandbox_missing.clone())
                .unwrap_or_default(),
            last_crash: lock(&self.inner.last_crash).clone(),
        }
    }

    fn subscribe(&self) -> async_channel::Receiver<PluginEvent> {
        self.inner.events.subscribe()
    }

    fn enable(&self) -> BoxFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let (done_tx, done_rx) = async_channel::bounded::<()>(1);
            {
                let mut slot = inner.slot();
                if !matches!(*slot, Slot::Quarantined(_)) {
                    return;
                }
                *slot = Slot::Restarting(done_rx.clone());
            }
            lock(&inner.crash_times).clear();
            inner.events.emit(PluginEvent::Enabled);
            smol::spawn(inner.clone().restart_after(Duration::ZERO, done_tx)).detach();
            let _ = done_rx.recv().await;
        })
    }
}
