//! Errors, one enum per boundary: reading a manifest ([`ManifestError`]), loading a plugin
//! ([`LoadError`]), calling it ([`CallError`]); [`Error`] is any of them. Every variant
//! names the plugin (or file) it concerns and says what to do next where there is
//! something to do.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::crash::{CrashReport, ExitInfo};

/// Any error the host returns.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A manifest could not be read or is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A call failed.
    #[error(transparent)]
    Call(#[from] CallError),
}

impl Error {
    /// The call error inside, if this is one.
    pub fn as_call(&self) -> Option<&CallError> {
        match self {
            Error::Call(e) => Some(e),
            _ => None,
        }
    }

    /// The load error inside, if this is one.
    pub fn as_load(&self) -> Option<&LoadError> {
        match self {
            Error::Load(e) => Some(e),
            _ => None,
        }
    }

    /// The manifest error inside, if this is one.
    pub fn as_manifest(&self) -> Option<&ManifestError> {
        match self {
            Error::Manifest(e) => Some(e),
            _ => None,
        }
    }
}

/// What kind of problem a [`ManifestError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManifestErrorKind {
    /// The file could not be read.
    Io,
    /// The file is not valid TOML.
    Syntax,
    /// A required field is absent.
    MissingField,
    /// A field the schema does not know (often a typo).
    UnknownField,
    /// A field has the wrong TOML type (for example a number where text is expected).
    WrongType,
    /// A field has the right type but a value outside what is allowed.
    InvalidValue,
}

/// A manifest problem: which file, which field, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// The manifest file (or a description such as `<inline>` for text not from a file).
    pub path: PathBuf,
    /// The dotted field path (`limits.memory`); empty for problems with the whole file.
    pub field: String,
    /// The kind of problem.
    pub kind: ManifestErrorKind,
    /// What was wrong and what was expected.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}: field `{}`: {}",
                self.path.display(),
                self.field,
                self.message
            )
        }
    }
}

impl std::error::Error for ManifestError {}

/// Why a plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// No file for the manifest's `library` was found.
    #[error(
        "plugin `{plugin}`: library `{library}` not found; looked in: {}. Build the plugin, \
         or add its directory with HostBuilder::search_path",
        list_paths(searched)
    )]
    LibraryNotFound {
        /// The plugin's manifest name.
        plugin: String,
        /// The manifest's `library` value.
        library: String,
        /// Every path that was tried.
        searched: Vec<PathBuf>,
    },
    /// The file exists but the system loader refused it.
    #[error("plugin `{plugin}`: {} is not a loadable library: {reason}", path.display())]
    NotALibrary {
        /// The plugin's manifest name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// The library does not export the plugin entry symbol.
    #[error(
        "plugin `{plugin}`: {} does not export `{symbol}`; was it built with \
         plugin_api::export_plugin! (or against plugin_api.h)?",
        path.display()
    )]
    EntryMissing {
        /// The plugin's manifest name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// The symbol that was looked up.
        symbol: String,
    },
    /// The entry symbol returned no descriptor, or one that cannot be read.
    #[error("plugin `{plugin}`: {}: broken descriptor: {reason}", path.display())]
    BadDescriptor {
        /// The plugin's manifest name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The library was built against an ABI this host cannot use.
    #[error(
        "plugin `{plugin}`: {} was built against plugin ABI {}.{}, this host speaks {}.{}; \
         rebuild the plugin against a compatible plugin-api",
        path.display(), found.0, found.1, supported.0, supported.1
    )]
    AbiMismatch {
        /// The plugin's manifest name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// (major, minor) the library declares.
        found: (u16, u16),
        /// (major, minor) this host implements.
        supported: (u16, u16),
    },
    /// The manifest's `api` requirement excludes this host's ABI version.
    #[error(
        "plugin `{plugin}`: manifest requires plugin ABI `{required}` but this host speaks \
         {host}; use a host that matches or update the manifest"
    )]
    ApiRequirement {
        /// The plugin's manifest name.
        plugin: String,
        /// The manifest's `api` field.
        required: semver::VersionReq,
        /// This host's ABI version.
        host: semver::Version,
    },
    /// The plugin's `create` returned an error.
    #[error("plugin `{plugin}`: create failed: {message}")]
    CreateFailed {
        /// The plugin's manifest name.
        plugin: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin's `create` panicked.
    #[error("plugin `{plugin}`: create panicked: {message}")]
    CreatePanicked {
        /// The plugin's manifest name.
        plugin: String,
        /// The panic message.
        message: String,
    },
    /// This plugin's trust level needs a backend this platform does not provide.
    #[error("plugin `{plugin}`: {message}")]
    Unsupported {
        /// The plugin's manifest name.
        plugin: String,
        /// What is missing.
        message: String,
    },
    /// The `worker-shim` executable could not be found or started.
    #[error("plugin `{plugin}`: cannot start the worker ({}): {reason}", shim.display())]
    WorkerSpawn {
        /// The plugin's manifest name.
        plugin: String,
        /// The shim that was tried.
        shim: PathBuf,
        /// What went wrong and how to fix it.
        reason: String,
    },
    /// The worker did not connect and load the plugin within the connect timeout.
    #[error(
        "plugin `{plugin}`: the worker did not connect and load within {after:?} ({}){}; \
         raise timeouts.connect in the manifest or PLUGIN_HOST_WORKER_TIMEOUT",
        exit.as_ref().map_or("still running, killed".to_string(), |e| e.to_string()),
        stderr_suffix(stderr)
    )]
    WorkerTimeout {
        /// The plugin's manifest name.
        plugin: String,
        /// The timeout that passed.
        after: Duration,
        /// How the worker ended after it was killed.
        exit: Option<ExitInfo>,
        /// The last lines of its stderr.
        stderr: Vec<String>,
    },
    /// The worker exited before completing the handshake.
    #[error(
        "plugin `{plugin}`: the worker exited before completing the handshake ({}){}",
        exit.as_ref().map_or("exit status unknown".to_string(), |e| e.to_string()),
        stderr_suffix(stderr)
    )]
    WorkerExited {
        /// The plugin's manifest name.
        plugin: String,
        /// How it ended.
        exit: Option<ExitInfo>,
        /// The last lines of its stderr.
        stderr: Vec<String>,
    },
    /// The worker speaks an incompatible protocol version.
    #[error("plugin `{plugin}`: {message}; use the worker-shim built with this host")]
    ProtocolMismatch {
        /// The plugin's manifest name.
        plugin: String,
        /// The host's protocol version.
        host: String,
        /// The worker's protocol version.
        worker: String,
        /// Both versions, in words.
        message: String,
    },
    /// The worker broke the protocol during the handshake.
    #[error("plugin `{plugin}`: handshake with the worker failed: {message}")]
    Handshake {
        /// The plugin's manifest name.
        plugin: String,
        /// What went wrong.
        message: String,
    },
    /// The worker crashed (for a WebAssembly plugin: the instance trapped) while loading
    /// the plugin or running its `create`.
    #[error(
        "plugin `{plugin}`: {} while loading the plugin: {report}",
        what_crashed(report)
    )]
    CreateCrashed {
        /// The plugin's manifest name.
        plugin: String,
        /// The crash report.
        report: std::sync::Arc<CrashReport>,
    },
    /// The sandbox could not be put in force: a layer the mode requires is not available on
    /// this system, or a granted path is unusable.
    #[error(
        "plugin `{plugin}`: cannot sandbox the worker: {message}; run `plugin-host doctor` to see \
         what this system supports, or have the app grant sandbox = \"best-effort\""
    )]
    Sandbox {
        /// The plugin's manifest name.
        plugin: String,
        /// Which layer, and why.
        message: String,
    },
    /// A resource limit from the manifest could not be applied.
    #[error("plugin `{plugin}`: cannot apply resource limits: {message}")]
    Limits {
        /// The plugin's manifest name.
        plugin: String,
        /// What failed.
        message: String,
    },
    /// The host already has a plugin of this name: names identify plugins in a host.
    #[error(
        "plugin `{plugin}` is already loaded (from {existing}); a host's plugin names are unique: \
         unload it first (Host::unload), or rename one of the manifests"
    )]
    NameTaken {
        /// The name.
        plugin: String,
        /// Where the loaded one came from (its manifest, or `<inline manifest>`).
        existing: String,
    },
    /// No plugin of this name is loaded in the host.
    #[error("no plugin `{plugin}` is loaded in this host; loaded: {}", if loaded.is_empty() { "none".to_string() } else { loaded.join(", ") })]
    NotLoaded {
        /// The name asked for.
        plugin: String,
        /// The names that are loaded.
        loaded: Vec<String>,
    },
    /// The plugin cannot be reloaded.
    #[error("plugin `{plugin}` cannot be reloaded: {reason}")]
    ReloadUnsupported {
        /// The plugin's name.
        plugin: String,
        /// Why, and what to do instead.
        reason: String,
    },
}

fn stderr_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last stderr lines: {}", lines.join(" | "))
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    list.join(", ")
}

/// Why a call failed. The plugin stays usable after every kind except where noted.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The plugin has no method of that name.
    #[error("plugin `{plugin}` has no method `{method}`; it has: {}", available.join(", "))]
    UnknownMethod {
        /// The plugin's name.
        plugin: String,
        /// The method that was asked for.
        method: String,
        /// The methods the plugin exposes.
        available: Vec<String>,
    },
    /// The plugin ran and returned an error.
    #[error("plugin `{plugin}` method `{method}` failed: {message}")]
    Plugin {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// The plugin's message.
        message: String,
    },
    /// The plugin panicked; the panic was caught and the plugin keeps serving.
    #[error("plugin `{plugin}` method `{method}` panicked: {message}")]
    Panicked {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// The panic message.
        message: String,
    },
    /// The plugin could not decode the input for this method (wrong shape or types).
    #[error("plugin `{plugin}` method `{method}` rejected its input: {message}")]
    BadInput {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// The plugin's decoder message.
        message: String,
    },
    /// The plugin could not encode its output, or sent a status this host does not know.
    #[error("plugin `{plugin}` method `{method}` produced a bad result: {message}")]
    BadOutput {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// What was wrong.
        message: String,
    },
    /// The host could not encode the caller's input as MessagePack.
    #[error("cannot encode the input for method `{method}`: {message}")]
    Encode {
        /// The method.
        method: String,
        /// The encoder's message.
        message: String,
    },
    /// The plugin's output does not decode into the type the caller asked for.
    #[error(
        "plugin `{plugin}` method `{method}`: output does not match the expected type: {message}"
    )]
    Decode {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// The decoder's message.
        message: String,
    },
    /// The input is larger than the plugin's frame limit (`limits.max_frame`); nothing was
    /// sent. Raise the limit in the manifest or send less.
    #[error(
        "input of {size} bytes for plugin `{plugin}` method `{method}` exceeds its frame limit \
         of {limit} bytes (limits.max_frame in the manifest)"
    )]
    InputTooLarge {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// The input's size in bytes.
        size: usize,
        /// The frame limit in bytes.
        limit: u64,
    },
    /// The call's deadline passed. The plugin was told to cancel it.
    #[error("plugin `{plugin}` method `{method}` timed out after {after:?}")]
    Timeout {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// The worker process died (or was cut off) while this call was in flight. The plugin
    /// restarts on the next call.
    #[error("plugin `{plugin}` crashed during `{method}`: {report}")]
    Crashed {
        /// The plugin's name.
        plugin: String,
        /// The method this call was running.
        method: String,
        /// What happened: one report per crash, shared by every call that was on the
        /// worker (and by [`Status::last_crash`](crate::Status::last_crash)).
        report: std::sync::Arc<CrashReport>,
    },
    /// The host killed the worker this call was running on, because another call
    /// ignored its deadline or the worker stopped answering pings. The plugin restarts.
    #[error("plugin `{plugin}` method `{method}` was cut short: {report}")]
    Killed {
        /// The plugin's name.
        plugin: String,
        /// The method this call was running.
        method: String,
        /// What happened (see `killed_by_host`); shared like `Crashed`'s.
        report: std::sync::Arc<CrashReport>,
    },
    /// The plugin crashed more often than its restart policy allows. Call
    /// `Plugin::enable` to try again.
    #[error("plugin `{plugin}` is quarantined after repeated crashes; call Plugin::enable to retry. Last crash: {report}")]
    Quarantined {
        /// The plugin's name.
        plugin: String,
        /// The crash that spent the budget.
        report: std::sync::Arc<CrashReport>,
    },
    /// The caller cancelled the call through its [`CancelHandle`](crate::CancelHandle).
    /// The plugin was told (`is_cancelled`) and given `timeouts.cancel_grace` to stop; an
    /// untrusted plugin's worker still busy after that is restarted.
    #[error("plugin `{plugin}` method `{method}`: cancelled by the caller")]
    Cancelled {
        /// The plugin's name.
        plugin: String,
        /// The method.
        method: String,
    },
    /// The plugin was shut down; load it again to call it.
    #[error("plugin `{plugin}` is stopped; load it again to call it")]
    Stopped {
        /// The plugin's name.
        plugin: String,
    },
}

/// Who crashed, as `CreateCrashed` says it.
fn what_crashed(report: &CrashReport) -> &'static str {
    match report.exit {
        Some(ExitInfo::Trap { .. }) => "its WebAssembly instance trapped",
        _ => "the worker crashed",
    }
}
