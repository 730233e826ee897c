//! What the window shows, built from the background thread's [`Update`]s alone: one row a
//! plugin (or a manifest that did not load), the call each plugin ran last, the event log,
//! the scenario's progress. The UI thread owns it and never calls a plugin.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use plugin_host::{PluginState, Status};

use crate::backend::{CallId, Update};

/// Where a plugin runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Where {
    /// In the app's process, as a native library (granted trust).
    InProcess,
    /// In a sandboxed worker process.
    Worker,
    /// In the app's process, as a WebAssembly module in the interpreter.
    Wasm,
}

impl Where {
    /// The table's label.
    pub fn label(self) -> &'static str {
        match self {
            Where::InProcess => "in-process",
            Where::Worker => "worker",
            Where::Wasm => "wasm",
        }
    }
}

/// What does not change while a plugin is loaded (a reload sends them again).
#[derive(Clone, Debug)]
pub struct Facts {
    /// The example plugin it is a copy of (the manifest's own name).
    pub base: String,
    /// The version its library declares.
    pub version: String,
    /// Where it runs.
    pub place: Where,
    /// Its methods, in declaration order.
    pub methods: Vec<String>,
    /// What its manifest requests: trust, sandbox, permissions.
    pub requested: String,
    /// What the app's policy granted.
    pub granted: String,
    /// The library or module it runs.
    pub library: PathBuf,
}

/// How bad a log line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something happened.
    Info,
    /// Something recovered or succeeded.
    Good,
    /// An error a call returned, a reload that failed.
    Warn,
    /// A crash, a quarantine.
    Bad,
}

/// One line of the event log.
#[derive(Clone, Debug)]
pub struct LogLine {
    /// Since the app started.
    pub at: Duration,
    /// The plugin it is about (empty: the app).
    pub plugin: String,
    /// How bad.
    pub level: Level,
    /// What happened.
    pub text: String,
}

/// A finished call as shown: its output as JSON text, or its error's kind and message.
pub type Shown = Result<String, (String, String)>;

/// A call: running (with its progress) or finished (with its result).
#[derive(Clone, Debug)]
pub struct CallView {
    /// Its id (the Cancel button names it).
    pub id: CallId,
    /// The method.
    pub method: String,
    /// The last progress report: fraction (if known) and message.
    pub progress: Option<(Option<f64>, String)>,
    /// Once finished: the output as JSON, or the error's kind and message; and how long it
    /// took.
    pub finished: Option<(Shown, Duration)>,
}

/// The call form's contents for one plugin.
#[derive(Clone, Debug, Default)]
pub struct Form {
    /// The method picked.
    pub method: String,
    /// The JSON input typed.
    pub input: String,
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Row {
    /// The plugin's name (or the manifest's path, if it could not be read).
    pub name: String,
    /// The manifest file.
    pub path: PathBuf,
    /// Set once loaded.
    pub facts: Option<Facts>,
    /// The last status the background thread sent.
    pub status: Option<Status>,
    /// Why it did not load.
    pub load_error: Option<String>,
    /// Its last call.
    pub call: Option<CallView>,
    /// Its call form.
    pub form: Form,
}

impl Row {
    /// Its state (`None`: not loaded).
    pub fn state(&self) -> Option<PluginState> {
        self.status.as_ref().map(|s| s.state)
    }

    /// Whether a call of it is running.
    pub fn calling(&self) -> bool {
        self.call.as_ref().is_some_and(|c| c.finished.is_none())
    }
}

/// Where the scripted scenario is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ScenarioState {
    /// No scenario, or it has not started.
    #[default]
    None,
    /// Running; the step it is at.
    Running(String),
    /// Every step behaved as expected.
    Passed,
    /// A step did not: what.
    Failed(String),
}

/// Everything the window shows.
#[derive(Default)]
pub struct Model {
    /// The rows, by name.
    pub rows: BTreeMap<String, Row>,
    /// The event log, oldest first (at most [`Model::MAX_LOG`] lines).
    pub log: Vec<LogLine>,
    /// Whether the first load is over.
    pub loaded: bool,
    /// The scripted scenario.
    pub scenario: ScenarioState,
    /// The background thread is gone (it should not be, before the window closes).
    pub backend_gone: bool,
}

impl Model {
    /// The log keeps this many lines.
    pub const MAX_LOG: usize = 2000;

    /// Applies one update from the background thread.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Plugin {
                name,
                path,
                facts,
                status,
            } => {
                let row = self.row(&name, path);
                if row.form.method.is_empty() || !facts.methods.contains(&row.form.method) {
                    let method = crate::presets::typical(&facts.base)
                        .map(|t| t.method.to_string())
                        .or_else(|| facts.methods.first().cloned())
                        .unwrap_or_default();
                    row.form.input = crate::presets::input(&facts.base, &method).to_string();
                    row.form.method = method;
                }
                row.facts = Some(facts);
                row.status = Some(status);
                row.load_error = None;
            }
            Update::LoadFailed { name, path, error } => {
                self.row(&name, path).load_error = Some(error);
            }
            Update::Loaded => self.loaded = true,
            Update::Status { plugin, status } => {
                if let Some(row) = self.rows.get_mut(&plugin) {
                    row.status = Some(status);
                }
            }
            Update::Log(line) => {
                self.log.push(line);
                if self.log.len() > Self::MAX_LOG {
                    self.log.drain(..self.log.len() - Self::MAX_LOG);
                }
            }
            Update::CallStarted { plugin, id, method } => {
                if let Some(row) = self.rows.get_mut(&plugin) {
                    row.call = Some(CallView {
                        id,
                        method,
                        progress: None,
                        finished: None,
                    });
                }
            }
            Update::Progress {
                plugin,
                id,
                fraction,
                message,
            } => {
                if let Some(call) = self.call(&plugin, id) {
                    call.progress = Some((fraction, message));
                }
            }
            Update::CallFinished {
                plugin,
                id,
                result,
                took,
            } => {
                if let Some(call) = self.call(&plugin, id) {
                    call.finished = Some((result, took));
                }
            }
            Update::Scenario(state) => self.scenario = state,
        }
    }

    fn row(&mut self, name: &str, path: PathBuf) -> &mut Row {
        self.rows.entry(name.to_string()).or_insert_with(|| Row {
            name: name.to_string(),
            path,
            facts: None,
            status: None,
            load_error: None,
            call: None,
            form: Form::default(),
        })
    }

    fn call(&mut self, plugin: &str, id: CallId) -> Option<&mut CallView> {
        self.rows
            .get_mut(plugin)?
            .call
            .as_mut()
            .filter(|call| call.id == id)
    }
}
