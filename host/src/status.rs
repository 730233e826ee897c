//! What an application can observe about a plugin: its state and counters
//! ([`Status`]), and a stream of lifecycle events ([`PluginEvent`]) to drive a badge or a
//! log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::crash::CrashReport;

/// Where a plugin is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginState {
    /// Its first worker is starting. Not observable through a `Plugin` today, since
    /// `Host::load` returns once the plugin is ready; kept for hosts that load lazily.
    Starting,
    /// It serves calls.
    Ready,
    /// Its worker died and a fresh one is being started (after a backoff).
    Restarting,
    /// Its workers were stopped after `idle_timeout` without a call; the next call starts
    /// one again (and pays the cold start).
    Idle,
    /// It crashed more often than its restart policy allows; calls fail at once with
    /// [`CallError::Quarantined`](crate::CallError::Quarantined) until
    /// [`Plugin::enable`](crate::Plugin::enable).
    Quarantined,
    /// It was shut down.
    Stopped,
}

/// A snapshot of a plugin's health.
#[derive(Clone, Debug)]
pub struct Status {
    /// Current state.
    pub state: PluginState,
    /// Calls made, including those refused before they reached the plugin (unknown
    /// method, plugin stopped, input that could not be encoded).
    pub calls: u64,
    /// Calls that returned an error of any kind.
    pub failures: u64,
    /// Worker crashes (including workers the host killed, and failed restarts).
    pub crashes: u64,
    /// Successful restarts.
    pub restarts: u64,
    /// How long the current worker (or the in-process instance) has been up.
    pub uptime: Option<Duration>,
    /// The current worker's process id, for untrusted plugins.
    pub pid: Option<u32>,
    /// The most recent crash.
    pub last_crash: Option<Arc<CrashReport>>,
    /// One entry per worker process of a pool (`instances`); a single entry for a plugin
    /// with one worker, and for an in-process plugin.
    pub instances: Vec<InstanceStatus>,
    /// The sandbox layers in force in the current worker (for example `landlock
    /// filesystem`, `seccomp`, `pid namespace`); empty for in-process plugins, a stopped
    /// worker, or the sandbox turned off.
    pub sandbox: Vec<String>,
    /// Layers the current worker runs without (best-effort mode only), each `layer: why`.
    pub sandbox_missing: Vec<String>,
}

/// One worker of a plugin's pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    /// Its index in the pool, from 0.
    pub index: usize,
    /// Its state: `Ready`, `Restarting` (also while it starts again after being idle),
    /// `Idle`, `Quarantined` or `Stopped`.
    pub state: PluginState,
    /// Its worker's process id, while one runs.
    pub pid: Option<u32>,
    /// How long its worker has been up.
    pub uptime: Option<Duration>,
    /// Calls it is running now.
    pub in_flight: usize,
    /// How its worker's frames travel, while one runs: shared memory, or the socket
    /// (where shared memory was not chosen, or the worker or the system could not use
    /// it). `None` for an in-process plugin.
    pub transport: Option<crate::Transport>,
}

/// What [`Plugin::subscribe`](crate::Plugin::subscribe) returns: a receiver of lifecycle
/// events (`recv().await`, `recv_blocking()`, `try_recv()`; it is also a `Stream`).
pub type EventReceiver = async_channel::Receiver<PluginEvent>;

/// A lifecycle event. New kinds may be added: match with a wildcard arm.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum PluginEvent {
    /// The worker crashed (or was killed by the host); the report says how.
    Crashed(Arc<CrashReport>),
    /// A fresh worker (for a WebAssembly plugin, a fresh instance) is serving after a crash.
    Restarted {
        /// The new worker's process id (a WebAssembly plugin's instances run in this
        /// process: its id).
        pid: u32,
        /// Restarts so far.
        restarts: u64,
    },
    /// The crash budget is spent: the plugin is quarantined.
    Quarantined(Arc<CrashReport>),
    /// The application re-enabled a quarantined plugin.
    Enabled,
    /// A worker had no call for `idle_timeout` and was stopped; the next call starts it
    /// again.
    Idle {
        /// Which instance of the pool.
        instance: usize,
        /// The process id it had.
        pid: u32,
    },
    /// An idle instance was started again for a call.
    Woke {
        /// Which instance of the pool.
        instance: usize,
        /// The new worker's process id.
        pid: u32,
    },
    /// [`Plugin::reload`](crate::Plugin::reload) switched the plugin to the library as it
    /// is on disk now.
    Reloaded {
        /// The version the new library declares.
        version: String,
    },
    /// A reload failed; the plugin keeps running the library it had.
    ReloadFailed {
        /// Why (the load error, as text).
        error: String,
    },
    /// The plugin was shut down.
    Stopped,
}

/// Fans events out to subscribers; a subscriber that is gone or too far behind is dropped.
#[derive(Default)]
pub(crate) struct EventHub {
    subscribers: Mutex<Vec<async_channel::Sender<PluginEvent>>>,
}

impl EventHub {
    pub fn subscribe(&self) -> async_channel::Receiver<PluginEvent> {
        let (tx, rx) = async_channel::bounded(256);
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    pub fn emit(&self, event: PluginEvent) {
        let mut subscribers = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subscribers.retain(|s| match s.try_send(event.clone()) {
            Ok(()) => true,
            Err(async_channel::TrySendError::Full(_)) => {
                tracing::warn!("dropping a plugin event subscriber that stopped reading");
                false
            }
            Err(async_channel::TrySendError::Closed(_)) => false,
        });
    }
}
