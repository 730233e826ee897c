//! The isolated backend for untrusted plugins: each plugin runs in one or more worker
//! processes (a pool of `instances`), each reached over its own socket pair. A crash ends
//! a worker, never the host. This module holds what one worker is ([`Worker`]); the pool,
//! its supervision and the call path are in [`supervisor`].

pub(crate) mod conn;
#[cfg(windows)]
mod job;
mod link;
pub(crate) mod process;
mod start;
mod supervisor;

pub(crate) use supervisor::Isolated;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::crash::{CrashReport, ExitInfo, LimitExceeded};
use crate::loader::Descriptor;
use crate::manifest::{Limits, RestartPolicy, Timeouts};
use crate::protocol::WireSandbox;
use conn::{CloseReason, Closed, Conn};
use process::WorkerProcess;

/// Everything needed to start (and restart) a plugin's worker.
pub(crate) struct Spec {
    pub plugin: Arc<str>,
    pub shim: crate::locate::WorkerExe,
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
    /// How many workers serve the plugin (at least 1).
    pub instances: usize,
    /// Stop a worker after this long without a call (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// The host functions the plugin may call.
    pub imports: Arc<crate::host_fn::Imports>,
    /// Shared memory or the socket, after the handshake.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub transport: crate::Transport,
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
    /// Set (under its slot's lock) when its death is the supervisor's to record: it was
    /// the slot's current worker, not retired, reclaimed, quarantined or shut down.
    claimed: AtomicBool,
    /// Sandbox layers in force in the plugin's process.
    sandbox: Vec<String>,
    /// Layers missing (best-effort mode), `layer: why`.
    sandbox_missing: Vec<String>,
    /// The crash report, built once and shared by every call that was on this worker,
    /// the status and the events.
    crash: smol::lock::OnceCell<Arc<CrashReport>>,
    /// Its index in the pool.
    index: usize,
    /// Calls leased to it (sent, or about to be); at most `limits.concurrency`.
    busy: std::sync::atomic::AtomicUsize,
    /// When it last started or finished a call, in milliseconds since it started.
    last_used_ms: AtomicU64,
    /// Its stderr line count when its current run of calls began (it went from no call to
    /// one): crash reports show its stderr from there.
    call_mark: AtomicU64,
}

impl Worker {
    fn new(process: Arc<WorkerProcess>, conn: Arc<Conn>, desc: Descriptor) -> Worker {
        Worker {
            process,
            conn,
            desc,
            handled: AtomicBool::new(false),
            claimed: AtomicBool::new(false),
            sandbox: Vec::new(),
            sandbox_missing: Vec::new(),
            crash: smol::lock::OnceCell::new(),
            index: 0,
            busy: std::sync::atomic::AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            call_mark: AtomicU64::new(0),
        }
    }

    /// Records a call starting or finishing now (for idle reclaim).
    fn touch(&self) {
        let ms = u64::try_from(self.process.uptime().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since a call last started or finished on it.
    fn idle_for(&self) -> Duration {
        let since = Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        self.process.uptime().saturating_sub(since)
    }

    fn is_alive(&self) -> bool {
        self.conn.closed().is_none() && !self.process.has_exited()
    }

    /// This worker's crash report: built once (by whoever asks first) when the process has
    /// been reaped, then shared. `record` runs once, on the new report, before anyone
    /// gets it: whoever is handed the report finds the crash recorded.
    async fn shared_report(
        &self,
        spec: &Spec,
        closed: &Closed,
        restarts: u64,
        record: impl FnOnce(&Arc<CrashReport>),
    ) -> Arc<CrashReport> {
        self.crash
            .get_or_init(|| async {
                let report = Arc::new(self.report(spec, closed, restarts).await);
                record(&report);
                report
            })
            .await
            .clone()
    }

    /// Builds a crash report once the process has been reaped.
    async fn report(&self, spec: &Spec, closed: &Closed, restarts: u64) -> CrashReport {
        // SIGKILL if the host's kill reached it running, whatever it did once cut off.
        let exit = self.process.wait_exit_info(Duration::from_secs(2)).await;
        // What the worker wrote since the calls in flight began (a caught panic's report
        // from an earlier call is not this crash's context); everything kept when it died
        // idle.
        let since = match closed.in_flight.is_empty() {
            true => 0,
            false => self.call_mark.load(Ordering::Acquire),
        };
        let stderr_tail = self.process.stderr_tail_since(since);
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
