//! The background thread: it owns the [`Host`] and runs every load, call and event
//! subscription on an async executor, so that the window never waits for a plugin (one that
//! hangs or crashes included). The UI sends it [`Command`]s; it sends back [`Update`]s and
//! asks the window to repaint ([`Notifier`]).
//!
//! One thread, one `smol` executor: calls are tasks on it, as many at once as the user
//! starts; an untrusted plugin's call is socket I/O, a trusted one runs on the library's
//! thread pool, a WebAssembly one moves to a thread of its own when it runs long. The
//! thread is only ever parked waiting for something: no polling.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui;
use plugin_host::{
    CallError, CallOptions, CancelHandle, Error, Host, Plugin, PluginEvent, Progress, Runtime,
    Status, Trust,
};

use crate::model::{Facts, Level, LogLine, ScenarioState, Shown, Where};
use crate::Options;

/// A call's id, unique in the app.
pub type CallId = u64;

/// What the UI asks for.
#[derive(Clone, Debug)]
pub enum Command {
    /// Call a plugin's method.
    Call(CallRequest),
    /// Cancel the plugin's calls in flight.
    Cancel {
        /// The plugin.
        plugin: String,
    },
    /// Lift the plugin's quarantine.
    Enable(String),
    /// Reload the plugin's library from disk.
    Reload(String),
    /// Shut every plugin down and end the thread.
    Quit,
}

/// A call to make.
#[derive(Clone, Debug)]
pub struct CallRequest {
    /// The plugin's name.
    pub plugin: String,
    /// The method.
    pub method: String,
    /// The input, as JSON text (see [`crate::json`]).
    pub input: String,
    /// A deadline other than the manifest's.
    pub timeout: Option<Duration>,
}

/// What the background thread tells the UI.
#[derive(Clone, Debug)]
pub enum Update {
    /// A plugin is loaded (or was reloaded): what it is, and its status.
    Plugin {
        /// Its name.
        name: String,
        /// Its manifest.
        path: PathBuf,
        /// What it is.
        facts: Facts,
        /// Its status now.
        status: Status,
    },
    /// A manifest did not load.
    LoadFailed {
        /// The plugin's name (or the manifest's path).
        name: String,
        /// The manifest.
        path: PathBuf,
        /// Why.
        error: String,
    },
    /// The first load is over.
    Loaded,
    /// A plugin's status changed (an event, a call).
    Status {
        /// The plugin.
        plugin: String,
        /// Its status now.
        status: Status,
    },
    /// A line for the event log.
    Log(LogLine),
    /// A call started.
    CallStarted {
        /// The plugin.
        plugin: String,
        /// The call.
        id: CallId,
        /// Its method.
        method: String,
    },
    /// A call reported progress.
    Progress {
        /// The plugin.
        plugin: String,
        /// The call.
        id: CallId,
        /// Done, in `0..=1`, if the plugin knows.
        fraction: Option<f64>,
        /// What it is doing.
        message: String,
    },
    /// A call ended.
    CallFinished {
        /// The plugin.
        plugin: String,
        /// The call.
        id: CallId,
        /// Its output as JSON, or its error's kind and message.
        result: Shown,
        /// How long it took.
        took: Duration,
    },
    /// The scenario moved on.
    Scenario(ScenarioState),
}

/// Sends updates to the UI and wakes it up. Cheap to clone, usable from any thread (a
/// progress callback runs on whichever thread the report arrives on).
#[derive(Clone)]
pub struct Notifier {
    updates: mpsc::Sender<Update>,
    ctx: egui::Context,
    started: Instant,
}

impl Notifier {
    /// Sends `update` and asks for a repaint.
    pub fn send(&self, update: Update) {
        // The window is gone when this fails: nothing to tell.
        if self.updates.send(update).is_ok() {
            self.ctx.request_repaint();
        }
    }

    /// Sends a line for the event log.
    pub fn log(&self, plugin: &str, level: Level, text: impl Into<String>) {
        self.send(Update::Log(LogLine {
            at: self.started.elapsed(),
            plugin: plugin.to_string(),
            level,
            text: text.into(),
        }));
    }
}

/// The UI's end: commands go out through it.
pub struct BackendHandle {
    commands: async_channel::Sender<Command>,
    done: mpsc::Receiver<()>,
}

impl BackendHandle {
    /// Starts the background thread: it builds the host, loads the plugins and serves
    /// commands. Returns the UI's end, and the updates it will send.
    pub fn start(
        options: Options,
        ctx: egui::Context,
        started: Instant,
    ) -> (BackendHandle, mpsc::Receiver<Update>) {
        let (commands, inbox) = async_channel::unbounded();
        let (updates, outbox) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        let notify = Notifier {
            updates,
            ctx,
            started,
        };
        let spawned = std::thread::Builder::new()
            .name("plugins".into())
            .spawn(move || {
                let executor = smol::LocalExecutor::new();
                smol::block_on(executor.run(serve(&executor, options, notify, inbox)));
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            eprintln!("plugin-manager: cannot start the plugins' thread: {e}");
        }
        (BackendHandle { commands, done }, outbox)
    }

    /// Sends a command; never blocks (the channel is unbounded).
    pub fn send(&self, command: Command) {
        let _ = self.commands.try_send(command);
    }

    /// Asks the thread to shut the plugins down and waits for it, at most `within`.
    pub fn quit(&self, within: Duration) {
        self.send(Command::Quit);
        let _ = self.done.recv_timeout(within);
    }
}

/// The thread's work: build the host, load, then serve commands until `Quit`.
async fn serve(
    executor: &smol::LocalExecutor<'_>,
    options: Options,
    notify: Notifier,
    inbox: async_channel::Receiver<Command>,
) {
    let dirs = options.plugin_dirs();
    let host = match crate::setup::host(&options.search_paths, &dirs) {
        Ok(host) => host,
        Err(e) => {
            notify.log("", Level::Bad, format!("cannot build the host: {e}"));
            return;
        }
    };
    let backend = Rc::new(Backend {
        host,
        notify: notify.clone(),
        plugins: RefCell::default(),
        calls: RefCell::default(),
        next_id: Cell::new(1),
        summary: RefCell::default(),
    });
    backend.load(executor, &dirs).await;
    if let Some(name) = options.scenario.clone() {
        let backend = backend.clone();
        executor
            .spawn(async move {
                let state = match crate::scenario::run(&backend, &name).await {
                    Ok(()) => ScenarioState::Passed,
                    Err(what) => ScenarioState::Failed(what),
                };
                backend.notify.send(Update::Scenario(state));
            })
            .detach();
    }
    while let Ok(command) = inbox.recv().await {
        match command {
            Command::Call(request) => {
                let backend = backend.clone();
                executor
                    .spawn(async move {
                        backend.call(&request).await;
                    })
                    .detach();
            }
            Command::Cancel { plugin } => backend.cancel(&plugin),
            Command::Enable(name) => {
                executor.spawn(backend.clone().enable(name)).detach();
            }
            Command::Reload(name) => {
                executor.spawn(backend.clone().reload(name)).detach();
            }
            Command::Quit => break,
        }
    }
    // Each plugin gets its manifest's `timeouts.shutdown` for calls in flight; the window
    // is closing, so not more than 3 s in all (workers still running then are killed when
    // their handles drop, or when this process exits).
    futures_lite::future::or(backend.host.shutdown(), async {
        smol::Timer::after(Duration::from_secs(3)).await;
    })
    .await;
}

/// What the first load found, for the scenario.
#[derive(Clone, Debug, Default)]
pub struct LoadSummary {
    /// Names loaded.
    pub loaded: Vec<String>,
    /// Names (or paths) that did not load, with why.
    pub failed: Vec<(String, String)>,
    /// Native plugins whose `.wasm` module was found (a copy `NAME (wasm)` was tried).
    pub wasm_tried: Vec<String>,
    /// How long loading took.
    pub took: Duration,
}

/// How a call ended, for the scenario.
pub struct CallOutcome {
    /// The output, or the error: the library's, or the input's (not JSON).
    pub result: Result<Vec<u8>, CallFailure>,
    /// Progress reports received.
    pub progress_reports: u32,
    /// How long it took.
    pub took: Duration,
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallFailure {
    /// The input was not valid (JSON, or an `$image` out of range); nothing was sent.
    Input(String),
    /// No plugin of that name is loaded.
    NotLoaded(String),
    /// The library's error: the call's (`Error::Call`) or, rarely, another.
    Host(Error),
}

impl CallFailure {
    /// The call error inside, if any.
    pub fn call_error(&self) -> Option<&CallError> {
        match self {
            CallFailure::Host(e) => e.as_call(),
            _ => None,
        }
    }

    /// A short name for its kind: `Crashed`, `Timeout`, `Quarantined`, ...
    pub fn kind(&self) -> &'static str {
        match self {
            CallFailure::Input(_) => "bad input",
            CallFailure::NotLoaded(_) => "not loaded",
            CallFailure::Host(Error::Manifest(_)) => "manifest",
            CallFailure::Host(Error::Load(_)) => "load",
            CallFailure::Host(Error::Call(e)) => match e {
                CallError::UnknownMethod { .. } => "UnknownMethod",
                CallError::Plugin { .. } => "Plugin error",
                CallError::Panicked { .. } => "Panicked",
                CallError::BadInput { .. } => "BadInput",
                CallError::BadOutput { .. } => "BadOutput",
                CallError::Encode { .. } => "Encode",
                CallError::Decode { .. } => "Decode",
                CallError::InputTooLarge { .. } => "InputTooLarge",
                CallError::Timeout { .. } => "Timeout",
                CallError::Crashed { .. } => "Crashed",
                CallError::Killed { .. } => "Killed",
                CallError::Quarantined { .. } => "Quarantined",
                CallError::Cancelled { .. } => "Cancelled",
                CallError::Stopped { .. } => "Stopped",
            },
        }
    }
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallFailure::Input(e) => write!(f, "{e}"),
            CallFailure::NotLoaded(name) => write!(f, "no plugin `{name}` is loaded"),
            CallFailure::Host(e) => write!(f, "{e}"),
        }
    }
}

/// The background thread's state. Lives on that thread only (`Rc`, `RefCell`).
pub struct Backend {
    host: Host,
    notify: Notifier,
    plugins: RefCell<BTreeMap<String, Plugin>>,
    /// Calls in flight: their plugin and cancel handle.
    calls: RefCell<HashMap<CallId, (String, CancelHandle)>>,
    next_id: Cell<CallId>,
    summary: RefCell<LoadSummary>,
}

impl Backend {
    /// The plugin loaded under `name`.
    pub fn plugin(&self, name: &str) -> Option<Plugin> {
        self.plugins.borrow().get(name).cloned()
    }

    /// What the first load found.
    pub fn load_summary(&self) -> LoadSummary {
        self.summary.borrow().clone()
    }

    /// Where the UI's updates go (the scenario logs its steps there).
    pub fn notifier(&self) -> &Notifier {
        &self.notify
    }

    /// Loads the plugins and subscribes to each one's events.
    async fn load(&self, executor: &smol::LocalExecutor<'_>, dirs: &[PathBuf]) {
        let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        self.notify.log(
            "",
            Level::Info,
            format!("loading plugins from {}", list.join(", ")),
        );
        let report = crate::setup::load_all(&self.host, dirs).await;
        let mut summary = LoadSummary {
            wasm_tried: report.wasm_tried.clone(),
            took: report.took,
            ..LoadSummary::default()
        };
        for (dir, error) in &report.unreadable {
            self.notify.log(
                "",
                Level::Bad,
                format!("cannot read {}: {error}", dir.display()),
            );
        }
        for load in report.loads {
            match load.result {
                Ok(plugin) => {
                    self.notify.send(Update::Plugin {
                        name: load.name.clone(),
                        path: load.path,
                        facts: facts(&plugin, &load.base),
                        status: plugin.status(),
                    });
                    self.notify.log(
                        &load.name,
                        Level::Good,
                        format!("loaded: {}", place(&plugin)),
                    );
                    self.subscribe(executor, &plugin);
                    summary.loaded.push(load.name.clone());
                    self.plugins.borrow_mut().insert(load.name, plugin);
                }
                Err(error) => {
                    let text = error.to_string();
                    self.notify.log(
                        &load.name,
                        Level::Bad,
                        format!("did not load: {}", first_line(&text)),
                    );
                    self.notify.send(Update::LoadFailed {
                        name: load.name.clone(),
                        path: load.path,
                        error: text.clone(),
                    });
                    summary.failed.push((load.name, text));
                }
            }
        }
        self.notify.log(
            "",
            Level::Info,
            format!(
                "{} plugins loaded, {} failed, in {:.0?}",
                summary.loaded.len(),
                summary.failed.len(),
                summary.took
            ),
        );
        *self.summary.borrow_mut() = summary;
        self.notify.send(Update::Loaded);
    }

    /// Follows the plugin's lifecycle events: each one refreshes its row and is logged.
    fn subscribe(&self, executor: &smol::LocalExecutor<'_>, plugin: &Plugin) {
        let events = plugin.subscribe();
        let plugin = plugin.clone();
        let notify = self.notify.clone();
        executor
            .spawn(async move {
                while let Ok(event) = events.recv().await {
                    notify.send(Update::Status {
                        plugin: plugin.name().to_string(),
                        status: plugin.status(),
                    });
                    let (level, text) = describe(&plugin, &event);
                    notify.log(plugin.name(), level, text);
                }
            })
            .detach();
    }

    /// Sends the plugin's status now.
    fn refresh(&self, plugin: &Plugin) {
        self.notify.send(Update::Status {
            plugin: plugin.name().to_string(),
            status: plugin.status(),
        });
    }

    /// Makes a call, telling the UI as it starts, progresses and ends; returns how it
    /// ended.
    pub async fn call(&self, request: &CallRequest) -> CallOutcome {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let started = Instant::now();
        let name = request.plugin.clone();
        self.notify.send(Update::CallStarted {
            plugin: name.clone(),
            id,
            method: request.method.clone(),
        });
        let reports = Arc::new(AtomicU32::new(0));
        // JSON to MessagePack (a generated picture may be tens of MiB) on a pool thread:
        // the executor keeps serving the other calls and the events meanwhile.
        let text = request.input.clone();
        let input = smol::unblock(move || crate::json::input(&text)).await;
        let result = match (self.plugin(&name), input) {
            (None, _) => Err(CallFailure::NotLoaded(name.clone())),
            (_, Err(e)) => Err(CallFailure::Input(e)),
            (Some(plugin), Ok(input)) => {
                let cancel = CancelHandle::new();
                self.calls
                    .borrow_mut()
                    .insert(id, (name.clone(), cancel.clone()));
                let mut options = CallOptions::new()
                    .cancel(&cancel)
                    .on_progress(progress_to_ui(&self.notify, &name, id, reports.clone()));
                if let Some(timeout) = request.timeout {
                    options = options.timeout(timeout);
                }
                let mut call =
                    std::pin::pin!(plugin.call_raw_with(&request.method, input, options));
                // Started (and counted) once polled: show it counted while it runs.
                let result = match futures_lite::future::poll_once(&mut call).await {
                    Some(done) => done,
                    None => {
                        self.refresh(&plugin);
                        call.await
                    }
                }
                .map_err(CallFailure::Host);
                self.calls.borrow_mut().remove(&id);
                self.refresh(&plugin);
                result
            }
        };
        let took = started.elapsed();
        let (result, shown) = match result {
            Ok(output) => {
                let (output, text) = smol::unblock(move || {
                    let text = crate::json::output_text(&output);
                    (output, text)
                })
                .await;
                (Ok(output), Ok(text))
            }
            Err(e) => {
                let shown = Err((e.kind().to_string(), e.to_string()));
                (Err(e), shown)
            }
        };
        let (level, text) = match &shown {
            Ok(_) => (
                Level::Info,
                format!("{} -> ok in {took:.1?}", request.method),
            ),
            // The crash itself is logged from the plugin's events.
            Err((kind, _)) if matches!(kind.as_str(), "Crashed" | "Killed" | "Quarantined") => {
                (Level::Bad, format!("{} -> {kind}", request.method))
            }
            Err((kind, message)) => (
                Level::Warn,
                format!("{} -> {kind}: {}", request.method, first_line(message)),
            ),
        };
        self.notify.log(&name, level, text);
        self.notify.send(Update::CallFinished {
            plugin: name,
            id,
            result: shown,
            took,
        });
        CallOutcome {
            result,
            progress_reports: reports.load(Ordering::Relaxed),
            took,
        }
    }

    /// Cancels the plugin's calls in flight (each returns `Cancelled` at once).
    fn cancel(&self, plugin: &str) {
        for (name, handle) in self.calls.borrow().values() {
            if name == plugin {
                handle.cancel();
            }
        }
    }

    /// Lifts a quarantine; the plugin's events and a status refresh show the result.
    async fn enable(self: Rc<Self>, name: String) {
        let Some(plugin) = self.plugin(&name) else {
            return;
        };
        if !plugin.enable().await {
            self.notify
                .log(&name, Level::Info, "enable: it was not quarantined");
        }
        self.refresh(&plugin);
    }

    /// Reloads a plugin from disk; on success its row gets the new version and methods.
    async fn reload(self: Rc<Self>, name: String) {
        let Some(plugin) = self.plugin(&name) else {
            return;
        };
        match plugin.reload().await {
            Ok(()) => {
                let base = name.trim_end_matches(" (wasm)").to_string();
                self.notify.send(Update::Plugin {
                    name: name.clone(),
                    path: plugin.manifest().path.clone().unwrap_or_default(),
                    facts: facts(&plugin, &base),
                    status: plugin.status(),
                });
            }
            Err(e) => self.notify.log(
                &name,
                Level::Warn,
                format!("reload failed: {}", first_line(&e.to_string())),
            ),
        }
    }
}

/// A progress callback that forwards reports to the UI: at most one every 30 ms (a plugin
/// may report far more often than a window can show), the last one (fraction 1) always.
fn progress_to_ui(
    notify: &Notifier,
    plugin: &str,
    id: CallId,
    reports: Arc<AtomicU32>,
) -> impl Fn(Progress) + Send + Sync + 'static {
    let notify = notify.clone();
    let plugin = plugin.to_string();
    let last: Mutex<Option<Instant>> = Mutex::new(None);
    move |progress: Progress| {
        reports.fetch_add(1, Ordering::Relaxed);
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_millis(30));
        if due || progress.fraction == Some(1.0) {
            *last = Some(Instant::now());
            notify.send(Update::Progress {
                plugin: plugin.clone(),
                id,
                fraction: progress.fraction,
                message: progress.message,
            });
        }
    }
}

/// What the table and the details panel show about a loaded plugin.
fn facts(plugin: &Plugin, base: &str) -> Facts {
    let info = plugin.info();
    let requested = match &info.requested {
        Some(r) => format!(
            "trust {:?}, sandbox {}, permissions: {}",
            r.trust,
            r.sandbox.as_str(),
            r.permissions.summary()
        ),
        None => "nothing".into(),
    };
    let grant = plugin.grant();
    Facts {
        base: base.to_string(),
        version: plugin.version(),
        place: match (plugin.runtime(), plugin.trust()) {
            (Runtime::Wasm, _) => Where::Wasm,
            (_, Trust::Trusted) => Where::InProcess,
            (_, Trust::Untrusted) => Where::Worker,
        },
        methods: plugin.methods(),
        requested,
        granted: format!(
            "trust {:?}, sandbox {}, permissions: {}",
            grant.trust,
            grant.sandbox.as_str(),
            grant.permissions.summary()
        ),
        library: plugin.library_path().to_path_buf(),
    }
}

/// Where a plugin runs, for the log.
fn place(plugin: &Plugin) -> String {
    match (plugin.runtime(), plugin.worker_pid()) {
        (Runtime::Wasm, _) => "WebAssembly, in this process (wasmi)".into(),
        (_, Some(pid)) => format!("worker process {pid}"),
        (_, None) => "in-process".into(),
    }
}

/// A lifecycle event, for the log.
fn describe(plugin: &Plugin, event: &PluginEvent) -> (Level, String) {
    match event {
        PluginEvent::Crashed(report) => {
            let mut text = format!("crashed: {}", report.headline());
            if let Some(why) = &report.killed_by_host {
                text.push_str(&format!(" (killed by the host: {why})"));
            }
            (Level::Bad, text)
        }
        PluginEvent::Restarted { pid, restarts } => {
            let fresh = match plugin.runtime() {
                Runtime::Wasm => "a fresh instance".to_string(),
                Runtime::Native => format!("worker pid {pid}"),
            };
            (
                Level::Good,
                format!("restarted: {fresh} (restart #{restarts})"),
            )
        }
        PluginEvent::Quarantined(_) => (
            Level::Bad,
            "quarantined: calls fail at once until it is enabled".into(),
        ),
        PluginEvent::Enabled => (Level::Good, "enabled: crash history forgotten".into()),
        PluginEvent::Idle { pid, .. } => (Level::Info, format!("idle: worker {pid} stopped")),
        PluginEvent::Woke { pid, .. } => (Level::Info, format!("woke: worker pid {pid}")),
        PluginEvent::Reloaded { version } => (Level::Good, format!("reloaded: version {version}")),
        PluginEvent::ReloadFailed { error } => {
            (Level::Warn, format!("reload failed: {}", first_line(error)))
        }
        PluginEvent::Stopped => (Level::Info, "stopped".into()),
        other => (Level::Info, format!("{other:?}")),
    }
}

/// The first line of a message.
pub fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}
