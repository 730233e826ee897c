//! A plugin's pool of workers: routing calls, supervision, idle reclaim and reload.
//!
//! Each instance of the pool has a slot: `Ready(worker) -> (crash) -> Restarting ->
//! Ready ...`; `Ready -> (idle_timeout) -> Idle -> (a call) -> Waking -> Ready`; every slot
//! `Quarantined` once the plugin's crash budget (`restart.max_crashes` within
//! `restart.window`, counted over the whole pool) is spent or the policy is `never`. A
//! crash is noticed by whoever sees it first: a call whose connection closed, or the
//! waiter thread reaping the process. Restarts happen in the background after an
//! exponential backoff.
//!
//! Calls go to the least-loaded live worker, and a worker is given at most
//! `limits.concurrency + limits.queue` calls at once: the rest wait here, in the host, for
//! a free slot (within their own deadline). So a worker that dies takes down only the
//! calls it was running or had queued; a call that had not been written to it yet
//! (waiting for a slot or a restart, or whose frame could not be written) goes to another
//! worker or the replacement instead of failing.
//!
//! The host also kills workers: one still busy with a call `timeouts.cancel_grace` after
//! that call's deadline (or its cancellation), and one that does not answer a ping within
//! `timeouts.ping_timeout`. Calls that were on such a worker fail with
//! [`CallError::Killed`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use event_listener::Event;

#[cfg(target_os = "linux")]
use super::conn::Lone;
use super::conn::{CallGuard, CloseReason, Closed, StreamState};
use super::{start, Spec, Worker};
use crate::backend::{
    cancelled, join_all, outcome, timeout, Backend, BackendStatus, BoxFuture, CallRequest,
    STREAM_WINDOW, STREAM_WINDOW_BYTES,
};
use crate::crash::CrashReport;
use crate::error::{CallError, LoadError};
use crate::loader::Descriptor;
use crate::manifest::RestartMode;
use crate::plugin::PluginInfo;
use crate::protocol::Message;
use crate::status::{EventHub, InstanceStatus, PluginEvent, PluginState};

/// Where one instance of the pool is (see the module documentation).
enum Slot {
    Ready(Arc<Worker>),
    /// A fresh worker is being started after a crash (after a backoff).
    Restarting,
    /// Stopped after `idle_timeout` without a call.
    Idle,
    /// Being started again for a call, after being idle.
    Waking,
    Quarantined(Arc<CrashReport>),
    Stopped,
}

struct Inner {
    spec: Spec,
    /// Closed when the plugin is shut down or dropped.
    stopped: async_channel::Receiver<()>,
    stop: Mutex<Option<async_channel::Sender<()>>>,
    slots: Vec<Mutex<Slot>>,
    /// Notified when a slot changes or a call leaves a worker: callers waiting for a
    /// worker look again.
    changed: Event,
    crash_times: Mutex<VecDeque<Instant>>,
    last_crash: Mutex<Option<Arc<CrashReport>>>,
    crashes: AtomicU64,
    restarts: AtomicU64,
    events: EventHub,
    /// One reload at a time.
    reloading: smol::lock::Mutex<()>,
}

/// The backend handle.
pub(crate) struct Isolated {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts `count` workers for slots `first..first + count` at once; all or none.
async fn start_many(spec: &Spec, first: usize, count: usize) -> Result<Vec<Worker>, LoadError> {
    let starts: Vec<_> = (0..count).map(|_| start::start(spec)).collect();
    let mut workers = Vec::with_capacity(count);
    let mut failure = None;
    // Polled together: a pool of N costs about one cold start, not N.
    let results = join_all(starts).await;
    for (offset, result) in results.into_iter().enumerate() {
        match result {
            Ok(mut worker) => {
                worker.index = first + offset;
                workers.push(worker);
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    // On failure the started workers are dropped here, which kills them.
    match failure {
        Some(e) => Err(e),
        None => Ok(workers),
    }
}

impl Isolated {
    /// Starts the pool's workers; the first one's `Loaded` answer is the plugin's info.
    pub async fn load(spec: Spec) -> Result<(Isolated, PluginInfo), LoadError> {
        let count = spec.instances.max(1);
        let workers = start_many(&spec, 0, count).await?;
        let info = PluginInfo::new(&spec.plugin, &workers[0].desc);
        let (stop, stopped) = async_channel::bounded(1);
        let workers: Vec<Arc<Worker>> = workers.into_iter().map(Arc::new).collect();
        let inner = Arc::new(Inner {
            stopped,
            stop: Mutex::new(Some(stop)),
            slots: workers
                .iter()
                .map(|w| Mutex::new(Slot::Ready(w.clone())))
                .collect(),
            changed: Event::new(),
            crash_times: Mutex::new(VecDeque::new()),
            last_crash: Mutex::new(None),
            crashes: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            events: EventHub::default(),
            reloading: smol::lock::Mutex::new(()),
            spec,
        });
        for worker in &workers {
            worker.touch();
            inner.watch(worker);
        }
        if let Some(idle) = inner.spec.idle_timeout {
            smol::spawn(idle_loop(Arc::downgrade(&inner), idle)).detach();
        }
        Ok((Isolated { inner }, info))
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        // Stops pending restarts; dropping the workers kills them.
        for slot in &self.inner.slots {
            *lock(slot) = Slot::Stopped;
        }
        lock(&self.inner.stop).take();
        self.inner.changed.notify(usize::MAX);
    }
}

/// A call's claim on a worker: counts in the worker's `busy` until dropped.
struct Lease {
    inner: Arc<Inner>,
    worker: Arc<Worker>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.busy.fetch_sub(1, Ordering::AcqRel);
        self.worker.touch();
        // One slot freed: one waiting caller may take it.
        self.inner.changed.notify(1);
    }
}

/// What a look over the pool found for a call.
enum Pick {
    Leased(Lease),
    Failed(CallError),
    /// Nothing free now: wait for a change.
    Wait,
    /// The chosen worker changed under us: look again at once.
    Again,
}

impl Inner {
    fn plugin(&self) -> String {
        self.spec.plugin.to_string()
    }

    /// Calls one worker may hold: those it runs plus those queued in it.
    fn window(&self) -> usize {
        let limits = &self.spec.limits;
        limits.concurrency.max(1) as usize + limits.queue as usize
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
        // A call starting to wait on a host function frees room for another call.
        let inner = Arc::downgrade(self);
        worker.conn.on_waiting(Box::new(move || {
            if let Some(inner) = inner.upgrade() {
                inner.changed.notify(1);
            }
        }));
        let interval = self.spec.timeouts.ping_interval;
        let patience = self.spec.timeouts.ping_timeout;
        smol::spawn(ping_loop(Arc::downgrade(worker), interval, patience)).detach();
    }

    /// A worker for a call, waiting (within `deadline`) for a free slot, a restart or a
    /// wake-up.
    async fn acquire(
        self: &Arc<Self>,
        deadline: Instant,
        method: &str,
        after: Duration,
    ) -> Result<Lease, CallError> {
        loop {
            match self.pick() {
                Pick::Leased(lease) => return Ok(lease),
                Pick::Failed(e) => return Err(e),
                Pick::Again => continue,
                Pick::Wait => {}
            }
            // Listen before looking again, so a change between the look and the wait is
            // not missed.
            let listener = self.changed.listen();
            match self.pick() {
                Pick::Leased(lease) => return Ok(lease),
                Pick::Failed(e) => return Err(e),
                Pick::Again => continue,
                Pick::Wait => {}
            }
            if Instant::now() >= deadline {
                return Err(timeout(&self.spec.plugin, method, after));
            }
            futures_lite::future::or(listener, async {
                smol::Timer::at(deadline).await;
            })
            .await;
        }
    }

    /// One look over the pool: lease the least-loaded live worker with a free slot, or say
    /// why not. Starts handling dead workers it finds, and wakes an idle instance when
    /// every live worker is full.
    fn pick(self: &Arc<Self>) -> Pick {
        let limit = self.window();
        let mut best: Option<(usize, usize)> = None;
        let mut waiting = false;
        let mut idle = None;
        let mut quarantined = None;
        let mut stopped = 0;
        let mut dead = Vec::new();
        for (i, slot) in self.slots.iter().enumerate() {
            match &*lock(slot) {
                Slot::Ready(w) if w.is_alive() => {
                    // Calls waiting on a host function run no plugin code: a host
                    // function may call the plugin back without filling the window.
                    let busy = w
                        .busy
                        .load(Ordering::Acquire)
                        .saturating_sub(w.conn.waiting_on_host());
                    if busy < limit {
                        if best.is_none_or(|(_, b)| busy < b) {
                            best = Some((i, busy));
                        }
                    } else {
                        waiting = true;
                    }
                }
                Slot::Ready(w) => dead.push(w.clone()),
                Slot::Restarting | Slot::Waking => waiting = true,
                Slot::Idle => {
                    idle.get_or_insert(i);
                }
                Slot::Quarantined(report) => quarantined = Some(report.clone()),
                Slot::Stopped => stopped += 1,
            }
        }
        for worker in dead {
            // Dead but not yet handled. The handling must not depend on this caller's
            // future staying alive, so the slot turns `Restarting` here, synchronously,
            // and the rest runs in its own task.
            self.begin_crash(&worker);
            waiting = true;
        }
        if let Some((i, _)) = best {
            let slot = lock(&self.slots[i]);
            if let Slot::Ready(w) = &*slot {
                let waiting = w.conn.waiting_on_host();
                let leased = w
                    .busy
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                        (b.saturating_sub(waiting) < limit).then_some(b + 1)
                    });
                if leased == Ok(0) {
                    // A run of calls begins: its crash report starts its stderr here.
                    w.call_mark
                        .store(w.process.stderr_mark(), Ordering::Release);
                }
                let leased = leased.is_ok();
                if leased && w.is_alive() {
                    w.touch();
                    return Pick::Leased(Lease {
                        inner: self.clone(),
                        worker: w.clone(),
                    });
                }
                if leased {
                    w.busy.fetch_sub(1, Ordering::AcqRel);
                }
            }
            return Pick::Again;
        }
        if let Some(i) = idle {
            self.wake(i);
            return Pick::Wait;
        }
        if waiting {
            return Pick::Wait;
        }
        if stopped == self.slots.len() {
            return Pick::Failed(CallError::Stopped {
                plugin: self.plugin(),
            });
        }
        match quarantined {
            Some(report) => Pick::Failed(CallError::Quarantined {
                plugin: self.plugin(),
                report,
            }),
            // Partly stopped (a shutdown in progress): nothing will serve.
            None => Pick::Failed(CallError::Stopped {
                plugin: self.plugin(),
            }),
        }
    }

    /// Starts an idle instance again (once; callers wait for `changed`).
    fn wake(self: &Arc<Self>, index: usize) {
        {
            let mut slot = lock(&self.slots[index]);
            if !matches!(*slot, Slot::Idle) {
                return;
            }
            *slot = Slot::Waking;
        }
        let inner = self.clone();
        smol::spawn(async move {
            match inner.start_abandonable(index).await {
                None => {}
                Some(Ok(worker)) => {
                    let pid = worker.process.pid();
                    if inner.install(index, worker, |s| matches!(s, Slot::Waking)) {
                        tracing::debug!(plugin = %inner.spec.plugin, pid, instance = index, "woke from idle");
                        inner.events.emit(PluginEvent::Woke {
                            instance: index,
                            pid,
                        });
                        inner.changed.notify(usize::MAX);
                    }
                }
                Some(Err(error)) => inner.failed_start(index, error),
            }
        })
        .detach();
    }

    /// Starts a worker for slot `index`; `None` if the plugin was stopped meanwhile (the
    /// half-started worker is killed).
    async fn start_abandonable(&self, index: usize) -> Option<Result<Arc<Worker>, LoadError>> {
        let stopped = self.stopped.clone();
        futures_lite::future::or(
            async {
                Some(start::start(&self.spec).await.map(|mut w| {
                    w.index = index;
                    Arc::new(w)
                }))
            },
            async {
                let _ = stopped.recv().await;
                None
            },
        )
        .await
    }

    /// Puts a fresh worker in slot `index` if the slot is still in a state `expected`
    /// accepts; otherwise drops (kills) it. Watches it; the caller wakes waiting callers
    /// once its counters are up to date (a call served by the fresh worker must see them).
    fn install(
        self: &Arc<Self>,
        index: usize,
        worker: Arc<Worker>,
        expected: impl Fn(&Slot) -> bool,
    ) -> bool {
        {
            let mut slot = lock(&self.slots[index]);
            if !expected(&slot) {
                return false;
            }
            worker.touch();
            *slot = Slot::Ready(worker.clone());
        }
        self.watch(&worker);
        true
    }

    /// A start that failed counts as a crash of that instance.
    fn failed_start(self: &Arc<Self>, index: usize, error: LoadError) {
        let report = match error {
            LoadError::CreateCrashed { report, .. } => report,
            other => Arc::new(CrashReport::start_failure(
                &self.spec.plugin,
                &other,
                self.restarts.load(Ordering::Relaxed),
            )),
        };
        self.after_crash(index, report);
    }

    /// Starts handling a worker's death, once: its slot becomes `Restarting` at once, and
    /// the crash report is built (here in a detached task, or by a caller of the worker
    /// that asks first), which records the crash and applies the restart policy.
    fn begin_crash(self: &Arc<Self>, worker: &Arc<Worker>) {
        let index = worker.index;
        {
            // `handled` is taken under the slot's lock, so once any `begin_crash` call has
            // returned, whether the supervisor claimed this death (`claimed`) is settled.
            let mut slot = lock(&self.slots[index]);
            if worker.handled.swap(true, Ordering::AcqRel) {
                return;
            }
            match &*slot {
                Slot::Ready(current) if Arc::ptr_eq(current, worker) => {
                    *slot = Slot::Restarting;
                    worker.claimed.store(true, Ordering::Release);
                }
                // Shut down, or already replaced: nothing to supervise.
                _ => return,
            }
        }
        self.changed.notify(usize::MAX);
        // A no-op if a reader (or the exit hook's drain) already saw the end; otherwise it
        // records the calls that were in flight.
        worker.conn.close(CloseReason::Eof);
        let (inner, worker) = (self.clone(), worker.clone());
        smol::spawn(async move {
            inner.report(&worker).await;
        })
        .detach();
    }

    /// The report of `worker`'s death, shared by everyone who asks. Whoever builds it
    /// records the crash first if the supervisor claimed it (see `begin_crash`).
    async fn report(self: &Arc<Self>, worker: &Arc<Worker>) -> Arc<CrashReport> {
        let closed = worker.conn.closed().unwrap_or(Closed {
            reason: CloseReason::Eof,
            in_flight: Vec::new(),
        });
        let restarts = self.restarts.load(Ordering::Relaxed);
        let record = |report: &Arc<CrashReport>| {
            if worker.claimed.load(Ordering::Acquire) {
                self.after_crash(worker.index, report.clone());
            }
        };
        worker
            .shared_report(&self.spec, &closed, restarts, record)
            .await
    }

    /// Counts a crash of instance `index` and applies the restart policy.
    fn after_crash(self: &Arc<Self>, index: usize, report: Arc<CrashReport>) {
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
        if matches!(*lock(&self.slots[index]), Slot::Stopped) {
            return;
        }
        if policy.mode == RestartMode::Never || recent > policy.max_crashes {
            tracing::error!(plugin = %self.spec.plugin, "quarantined after {recent} crashes");
            // The whole plugin: its other workers finish the calls they hold, then end.
            for slot in &self.slots {
                let mut slot = lock(slot);
                if !matches!(*slot, Slot::Stopped) {
                    if let Slot::Ready(w) = &*slot {
                        w.handled.store(true, Ordering::Release);
                    }
                    *slot = Slot::Quarantined(report.clone());
                }
            }
            self.changed.notify(usize::MAX);
            self.events.emit(PluginEvent::Quarantined(report));
            return;
        }
        let factor = 1u32 << (recent.saturating_sub(1)).min(20);
        let backoff = policy
            .backoff
            .saturating_mul(factor)
            .min(policy.backoff_max);
        smol::spawn(self.clone().restart_after(index, backoff)).detach();
    }

    /// Starts a fresh worker for slot `index` after `backoff`; a failed start counts as a
    /// crash.
    async fn restart_after(self: Arc<Self>, index: usize, backoff: Duration) {
        smol::Timer::after(backoff).await;
        if !matches!(*lock(&self.slots[index]), Slot::Restarting) {
            return;
        }
        match self.start_abandonable(index).await {
            None => {}
            Some(Ok(worker)) => {
                let pid = worker.process.pid();
                if self.install(index, worker, |s| matches!(s, Slot::Restarting)) {
                    let restarts = self.restarts.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::info!(plugin = %self.spec.plugin, pid, instance = index, "restarted");
                    self.events.emit(PluginEvent::Restarted { pid, restarts });
                    self.changed.notify(usize::MAX);
                }
            }
            Some(Err(error)) => self.failed_start(index, error),
        }
    }

    /// Stops slot `index`'s worker if it had no call for `idle`.
    fn reclaim_if_idle(self: &Arc<Self>, index: usize, idle: Duration) {
        let worker = {
            let mut slot = lock(&self.slots[index]);
            let Slot::Ready(w) = &*slot else { return };
            // `busy` only grows under this lock (in `pick`), so no call can be leased to
            // it between this check and the slot turning `Idle`.
            if w.busy.load(Ordering::Acquire) != 0 || w.idle_for() < idle || !w.is_alive() {
                return;
            }
            let w = w.clone();
            w.handled.store(true, Ordering::Release);
            *slot = Slot::Idle;
            w
        };
        let pid = worker.process.pid();
        tracing::debug!(plugin = %self.spec.plugin, pid, instance = index, "stopped after {idle:?} idle");
        worker.conn.close(CloseReason::Host);
        self.events.emit(PluginEvent::Idle {
            instance: index,
            pid,
        });
        self.changed.notify(usize::MAX);
    }

    /// Lets a replaced worker finish the calls it holds (for up to `grace`), then ends it.
    fn retire(worker: Arc<Worker>, grace: Duration) {
        worker.handled.store(true, Ordering::Release);
        smol::spawn(async move {
            drain(&worker, Instant::now() + grace).await;
            worker.conn.close(CloseReason::Host);
            worker.process.wait_exit(Duration::from_secs(2)).await;
        })
        .detach();
    }

    /// Turns a closed connection into the caller's error. The worker's death is handled
    /// first (a no-op if it already is), so that the report this caller gets has been
    /// recorded in the status by the time it returns.
    async fn closed_error(
        self: &Arc<Self>,
        worker: &Arc<Worker>,
        closed: &Closed,
        method: &str,
    ) -> CallError {
        let plugin = self.plugin();
        if matches!(closed.reason, CloseReason::Host) {
            return CallError::Stopped { plugin };
        }
        self.begin_crash(worker);
        let report = self.report(worker).await;
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

/// Waits until `worker` holds no call (or died), or `deadline`.
async fn drain(worker: &Worker, deadline: Instant) {
    while (worker.busy.load(Ordering::Acquire) > 0 || worker.conn.in_flight() > 0)
        && worker.is_alive()
        && Instant::now() < deadline
    {
        smol::Timer::after(Duration::from_millis(5)).await;
    }
}

/// Reclaims idle workers, checking a few times per `idle` period.
async fn idle_loop(inner: Weak<Inner>, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        smol::Timer::after(tick).await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.stopped.is_closed() {
            return;
        }
        for index in 0..inner.slots.len() {
            inner.reclaim_if_idle(index, idle);
        }
    }
}

/// How the send or the wait of a call ended.
enum Race<T> {
    Done(T),
    Deadline,
    Cancelled,
}

/// Runs `work` until it finishes, the deadline timer fires or the call is cancelled.
async fn race<T>(
    work: impl std::future::Future<Output = T>,
    timer: &mut smol::Timer,
    cancel: Option<&crate::cancel::CancelHandle>,
) -> Race<T> {
    futures_lite::future::or(async { Race::Done(work.await) }, async {
        futures_lite::future::or(
            async {
                timer.await;
                Race::Deadline
            },
            async {
                crate::cancel::cancelled(cancel).await;
                Race::Cancelled
            },
        )
        .await
    })
    .await
}

impl Backend for Isolated {
    fn call(&self, mut call: CallRequest) -> BoxFuture<Result<Vec<u8>, CallError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let plugin = &*inner.spec.plugin;
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
            let cancel = call.cancel.as_ref();
            if cancel.is_some_and(crate::cancel::CancelHandle::is_cancelled) {
                return Err(cancelled(plugin, &call.method));
            }
            // One timer for every phase (each timer costs the reactor a syscall).
            let mut timer = smol::Timer::at(deadline);
            let (lease, mut guard) = loop {
                // A free worker at once (the usual case) needs no race with the timer.
                let acquired = match inner.pick() {
                    Pick::Leased(lease) => Race::Done(Ok(lease)),
                    _ => {
                        race(
                            inner.acquire(deadline, &call.method, call.deadline),
                            &mut timer,
                            cancel,
                        )
                        .await
                    }
                };
                let lease = match acquired {
                    Race::Done(lease) => lease?,
                    Race::Deadline => return Err(timeout(plugin, &call.method, call.deadline)),
                    Race::Cancelled => return Err(cancelled(plugin, &call.method)),
                };
                // The deadline covers sending too (a stalled worker may not drain its
                // socket). Abandoning a half-written frame is safe: the connection
                // finishes it, and dropping the unsent call's guard tells the worker to
                // cancel it.
                let conn = lease.worker.conn.clone();
                #[cfg(target_os = "linux")]
                if call.stream.is_none() {
                    let lone = conn.call_lone(
                        call.id,
                        &call.method,
                        &mut call.input,
                        call.progress.clone(),
                        deadline,
                        cancel,
                    );
                    match lone {
                        Lone::Done(Ok((status, bytes))) => {
                            let worker = lease.worker.clone();
                            drop(lease);
                            return outcome(
                                plugin,
                                &call.method,
                                &worker.desc.methods,
                                status,
                                bytes,
                            );
                        }
                        Lone::Done(Err(closed)) => {
                            let worker = lease.worker.clone();
                            drop(lease);
                            return Err(inner.closed_error(&worker, &closed, &call.method).await);
                        }
                        Lone::Waiting(guard) => break (lease, guard),
                        Lone::NotTaken => {}
                    }
                }
                let sent = race(
                    conn.call(
                        call.id,
                        &call.method,
                        &call.input,
                        call.progress.clone(),
                        call.stream.as_ref().map(|sink| {
                            StreamState::new(sink.items.clone(), STREAM_WINDOW, STREAM_WINDOW_BYTES)
                        }),
                    ),
                    &mut timer,
                    cancel,
                )
                .await;
                match sent {
                    Race::Done(Ok(guard)) => {
                        // Sent whole: the input's memory can take the reply.
                        guard.give_buffer(std::mem::take(&mut call.input));
                        break (lease, guard);
                    }
                    // Never reached that worker (it died or was retired before the frame
                    // went out): another worker, or its replacement, takes the call.
                    Race::Done(Err(_)) => continue,
                    Race::Deadline => return Err(timeout(plugin, &call.method, call.deadline)),
                    Race::Cancelled => return Err(cancelled(plugin, &call.method)),
                }
            };
            let worker = lease.worker.clone();
            // A streaming call grants the worker more items as the consumer takes them.
            let credit = async {
                match &call.stream {
                    Some(sink) => loop {
                        let (items, bytes) = sink.consumed.take().await;
                        worker.conn.credit(call.id, items, bytes).await;
                    },
                    None => std::future::pending().await,
                }
            };
            let reply = futures_lite::future::or(guard.reply(), credit);
            let ended = match race(reply, &mut timer, cancel).await {
                Race::Done(Ok((status, bytes))) => {
                    drop(lease);
                    return outcome(plugin, &call.method, &worker.desc.methods, status, bytes);
                }
                Race::Done(Err(closed)) => {
                    drop(lease);
                    return Err(inner.closed_error(&worker, &closed, &call.method).await);
                }
                Race::Deadline => {
                    let why = format!(
                        "was still running {:?} after its {:?} deadline",
                        inner.spec.timeouts.cancel_grace, call.deadline
                    );
                    (timeout(plugin, &call.method, call.deadline), why)
                }
                Race::Cancelled => {
                    let why = format!(
                        "was still running {:?} after it was cancelled",
                        inner.spec.timeouts.cancel_grace
                    );
                    (cancelled(plugin, &call.method), why)
                }
            };
            let (error, why) = ended;
            stop_abandoned_call(&inner, lease, guard, call.id, &call.method, why);
            Err(error)
        })
    }

    fn shutdown(&self, grace: Duration) -> BoxFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut workers = Vec::new();
            for slot in &inner.slots {
                if let Slot::Ready(w) = std::mem::replace(&mut *lock(slot), Slot::Stopped) {
                    workers.push(w);
                }
            }
            lock(&inner.stop).take();
            inner.changed.notify(usize::MAX);
            inner.events.emit(PluginEvent::Stopped);
            let deadline = Instant::now() + grace;
            for worker in &workers {
                drain(worker, deadline).await;
            }
            // Calls still running past the grace period fail with `Stopped`; closing the
            // connection also kills the worker (it would exit on EOF anyway).
            for worker in &workers {
                worker.conn.close(CloseReason::Host);
            }
            for worker in &workers {
                worker.process.wait_exit(Duration::from_secs(2)).await;
            }
        })
    }

    fn status(&self) -> BackendStatus {
        let mut instances = Vec::with_capacity(self.inner.slots.len());
        let mut first_live: Option<Arc<Worker>> = None;
        for (index, slot) in self.inner.slots.iter().enumerate() {
            let (state, live) = match &*lock(slot) {
                Slot::Ready(w) => (PluginState::Ready, Some(w.clone()).filter(|w| w.is_alive())),
                Slot::Restarting | Slot::Waking => (PluginState::Restarting, None),
                Slot::Idle => (PluginState::Idle, None),
                Slot::Quarantined(_) => (PluginState::Quarantined, None),
                Slot::Stopped => (PluginState::Stopped, None),
            };
            instances.push(InstanceStatus {
                index,
                state,
                pid: live.as_ref().map(|w| w.process.pid()),
                uptime: live.as_ref().map(|w| w.process.uptime()),
                in_flight: live.as_ref().map_or(0, |w| w.busy.load(Ordering::Acquire)),
                transport: live.as_ref().map(|w| {
                    if w.conn.uses_shm() {
                        crate::Transport::SharedMemory
                    } else {
                        crate::Transport::Socket
                    }
                }),
            });
            if first_live.is_none() {
                first_live = live;
            }
        }
        // The plugin is as well as its best instance.
        let state = [
            PluginState::Ready,
            PluginState::Restarting,
            PluginState::Idle,
            PluginState::Quarantined,
        ]
        .into_iter()
        .find(|s| instances.iter().any(|i| i.state == *s))
        .unwrap_or(PluginState::Stopped);
        let live = first_live;
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
            instances,
        }
    }

    fn subscribe(&self) -> async_channel::Receiver<PluginEvent> {
        self.inner.events.subscribe()
    }

    fn enable(&self) -> BoxFuture<bool> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut lifted = Vec::new();
            for (index, slot) in inner.slots.iter().enumerate() {
                let mut slot = lock(slot);
                if matches!(*slot, Slot::Quarantined(_)) {
                    *slot = Slot::Restarting;
                    lifted.push(index);
                }
            }
            if lifted.is_empty() {
                return false;
            }
            lock(&inner.crash_times).clear();
            inner.events.emit(PluginEvent::Enabled);
            for &index in &lifted {
                smol::spawn(inner.clone().restart_after(index, Duration::ZERO)).detach();
            }
            // Settled when no instance is still starting.
            loop {
                let listener = inner.changed.listen();
                let starting = inner
                    .slots
                    .iter()
                    .any(|s| matches!(*lock(s), Slot::Restarting));
                if !starting {
                    return true;
                }
                listener.await;
            }
        })
    }

    fn reload(&self) -> BoxFuture<Result<Descriptor, LoadError>> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let _one_at_a_time = inner.reloading.lock().await;
            // Replace the running workers; idle and restarting instances start from the
            // new library anyway. At least one new worker proves the library loads.
            let mut targets: Vec<usize> = (0..inner.slots.len())
                .filter(|&i| matches!(*lock(&inner.slots[i]), Slot::Ready(_)))
                .collect();
            if targets.is_empty() {
                targets.push(0);
            }
            let mut fresh = Vec::with_capacity(targets.len());
            for &index in &targets {
                match inner.start_abandonable(index).await {
                    Some(Ok(worker)) => fresh.push(worker),
                    Some(Err(error)) => {
                        tracing::warn!(plugin = %inner.spec.plugin, "reload failed; the running workers keep serving: {error}");
                        inner.events.emit(PluginEvent::ReloadFailed {
                            error: error.to_string(),
                        });
                        return Err(error);
                    }
                    None => {
                        return Err(LoadError::ReloadUnsupported {
                            plugin: inner.plugin(),
                            reason: "it was shut down during the reload".into(),
                        })
                    }
                }
            }
            let desc = fresh[0].desc.clone();
            let grace = inner.spec.timeouts.shutdown;
            let mut quarantine_lifted = false;
            for worker in fresh {
                let index = worker.index;
                let old = {
                    let mut slot = lock(&inner.slots[index]);
                    match &*slot {
                        Slot::Stopped => continue,
                        Slot::Quarantined(_) => quarantine_lifted = true,
                        _ => {}
                    }
                    worker.touch();
                    std::mem::replace(&mut *slot, Slot::Ready(worker.clone()))
                };
                inner.watch(&worker);
                if let Slot::Ready(old) = old {
                    Inner::retire(old, grace);
                }
            }
            if quarantine_lifted {
                // The new library gets a fresh crash budget; the other instances start
                // on demand.
                lock(&inner.crash_times).clear();
                for slot in &inner.slots {
                    let mut slot = lock(slot);
                    if matches!(*slot, Slot::Quarantined(_)) {
                        *slot = Slot::Idle;
                    }
                }
            }
            inner.changed.notify(usize::MAX);
            tracing::info!(plugin = %inner.spec.plugin, version = %desc.version, "reloaded");
            inner.events.emit(PluginEvent::Reloaded {
                version: desc.version.clone(),
            });
            Ok(desc)
        })
    }
}

/// A call whose caller stopped waiting (deadline or cancellation) while the plugin runs
/// it: tell the plugin, give it `cancel_grace` to stop, and past that end the worker.
/// All of it off the caller's path; the lease keeps the worker's slot counted until the
/// call is really over.
fn stop_abandoned_call(
    inner: &Arc<Inner>,
    lease: Lease,
    mut guard: CallGuard,
    id: u64,
    method: &str,
    why: String,
) {
    let grace = inner.spec.timeouts.cancel_grace;
    let method = method.to_string();
    guard.cancel_host_calls();
    smol::spawn(async move {
        let watched = lease.worker.clone();
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
            let why = format!("call `{method}` {why}");
            watched.conn.close(CloseReason::Killed(why));
        }
        drop(lease);
    })
    .detach();
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
