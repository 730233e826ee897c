//! Plugin manifests: the TOML file that says what a plugin is, where its library lives,
//! how much to trust it and which limits apply. `docs/manifest.md` is the reference for
//! every field.
//!
//! Parsing is strict: unknown keys are rejected by name (they are usually typos), and every
//! error names the file, the dotted field path and what was expected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{LoadError, ManifestError, ManifestErrorKind};
use crate::permissions::{Permissions, SandboxMode};

/// How far the host trusts a plugin, which picks where it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Runs inside the host process: fastest, but a crash takes the host down.
    Trusted,
    /// Runs in its own worker process (the default): a crash only ends the worker.
    Untrusted,
}

/// What kind of code a plugin's library is, which picks the engine that runs it
/// (`runtime` in the manifest).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Runtime {
    /// A native shared library (`"native"`, the default): loaded into the host or into a
    /// worker process, as [`Trust`] says.
    #[default]
    Native,
    /// A WebAssembly module (`"wasm"`), run inside the host by an interpreter: the engine,
    /// not a process, contains it, so [`Trust`] does not apply.
    Wasm,
}

impl Runtime {
    /// The file name a base library name stands for under this runtime: for
    /// [`Runtime::Native`], the platform's shared library name
    /// ([`Manifest::library_file_name`]: `libNAME.so`, `libNAME.dylib`, `NAME.dll`); for
    /// [`Runtime::Wasm`], `NAME.wasm` on every platform.
    pub fn library_file_name(self, base: &str) -> String {
        match self {
            Runtime::Native => Manifest::library_file_name(base),
            Runtime::Wasm => format!("{base}.wasm"),
        }
    }
}

/// What to do when a plugin's worker crashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartMode {
    /// Start a fresh worker on the next call, within the crash budget (the default).
    OnCrash,
    /// Never restart: the plugin stays down after its first crash.
    Never,
}

/// `[timeouts]`: deadlines the host enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Default deadline of a call (`call`, default 30 s); a call can override it.
    pub call: Duration,
    /// How long a worker has to start, connect and load the plugin (`connect`). `None`:
    /// `PLUGIN_HOST_WORKER_TIMEOUT` seconds if set, else 10 s (see [`Timeouts::connect_timeout`]).
    pub connect: Option<Duration>,
    /// Grace period for calls in flight on shutdown (`shutdown`, default 5 s).
    pub shutdown: Duration,
    /// How long a cancelled call may keep its worker busy before the worker is killed
    /// (`cancel_grace`, default 2 s).
    pub cancel_grace: Duration,
    /// Interval between liveness pings of a worker (`ping_interval`, default 10 s).
    pub ping_interval: Duration,
    /// How long a worker has to answer a ping before it is killed and restarted
    /// (`ping_timeout`, default 5 s).
    pub ping_timeout: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            call: Duration::from_secs(30),
            connect: None,
            shutdown: Duration::from_secs(5),
            cancel_grace: Duration::from_secs(2),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(5),
        }
    }
}

/// Environment variable that sets the default connect timeout, in whole seconds.
pub const WORKER_TIMEOUT_ENV: &str = "PLUGIN_HOST_WORKER_TIMEOUT";

impl Timeouts {
    /// The effective connect timeout: the manifest's `connect` if set, else
    /// `PLUGIN_HOST_WORKER_TIMEOUT` (whole seconds, at least 1; empty or 0 means the
    /// default; anything else logs a warning and uses the default), else 10 s.
    pub fn connect_timeout(&self) -> Duration {
        match self.connect {
            Some(d) => d,
            None => connect_timeout_from_env(std::env::var(WORKER_TIMEOUT_ENV).ok().as_deref()),
        }
    }
}

/// The connect timeout given the value of `PLUGIN_HOST_WORKER_TIMEOUT` (if set).
fn connect_timeout_from_env(value: Option<&str>) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(10);
    let Some(text) = value.map(str::trim) else {
        return DEFAULT;
    };
    match text.parse::<u64>() {
        _ if text.is_empty() => DEFAULT,
        Ok(0) => DEFAULT,
        Ok(n) => Duration::from_secs(n),
        Err(_) => {
            tracing::warn!(
                "{WORKER_TIMEOUT_ENV}={text:?} is not a whole number of seconds; using {DEFAULT:?}"
            );
            DEFAULT
        }
    }
}

/// `[limits]`: resources an untrusted plugin's worker may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Address-space limit in bytes (`memory`, e.g. `"512MiB"`); `None`: unlimited.
    pub memory: Option<u64>,
    /// CPU time limit (`cpu`, e.g. `"60s"`); `None`: unlimited.
    pub cpu: Option<Duration>,
    /// Maximum open file descriptors (`open_files`); `None`: inherited.
    pub open_files: Option<u64>,
    /// Whether a crashing worker may write a core file (`core_dumps`, default false).
    pub core_dumps: bool,
    /// Largest frame accepted on the wire in bytes (`max_frame`, default 64 MiB).
    pub max_frame: u64,
    /// How many calls a worker runs at once (`concurrency`, default 4).
    pub concurrency: u32,
    /// How many more calls a worker may hold queued, beyond those it runs (`queue`,
    /// default 12). Queued calls keep the worker busy without a round trip between calls
    /// (throughput); calls past `concurrency + queue` wait in the host, and those are the
    /// calls a crash of the worker cannot take down (they go to the replacement).
    pub queue: u32,
    /// How many lines of the worker's stderr to keep for crash reports
    /// (`stderr_lines`, default 50).
    pub stderr_lines: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: None,
            cpu: None,
            open_files: None,
            core_dumps: false,
            max_frame: 64 << 20,
            concurrency: 4,
            queue: 12,
            stderr_lines: 50,
        }
    }
}

/// `[restart]`: the crash budget and backoff.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// `policy`: `"on-crash"` (default) or `"never"`.
    pub mode: RestartMode,
    /// At most this many crashes within `window` before the plugin is quarantined
    /// (`max_crashes`, default 3).
    pub max_crashes: u32,
    /// The crash-counting window (`window`, default 5 min).
    pub window: Duration,
    /// First backoff before a restart (`backoff`, default 100 ms), doubled per crash.
    pub backoff: Duration,
    /// Backoff cap (`backoff_max`, default 10 s).
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnCrash,
            max_crashes: 3,
            window: Duration::from_secs(300),
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// A parsed, validated plugin manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// The file it was read from, if any; relative `library` paths resolve against its
    /// directory.
    pub path: Option<PathBuf>,
    /// The plugin's name (`name`): letters, digits, `-`, `_`, `.`; at most 64 bytes.
    pub name: String,
    /// The plugin's version (`version`, semver).
    pub version: semver::Version,
    /// A one-line description (`description`, optional).
    pub description: Option<String>,
    /// The library (`library`): a base name (`thumbnail` -> `libthumbnail.so`, or
    /// `thumbnail.wasm` for [`Runtime::Wasm`]) or a path.
    pub library: String,
    /// Which plugin ABI versions the plugin was built for (`api`, a semver requirement).
    pub api: semver::VersionReq,
    /// Where the plugin asks to run (`trust`, default untrusted). A request: the app's
    /// policy decides (see [`Grant`](crate::Grant)).
    pub trust: Trust,
    /// What the library is (`runtime`): `"native"` (default: a shared library, run
    /// in-process or in a worker per `trust`) or `"wasm"` (a WebAssembly module run in the
    /// host by an interpreter, contained by the engine rather than by a process; `trust`
    /// does not apply).
    pub runtime: Runtime,
    /// The sandbox mode it asks for (`sandbox`, default `"required"`). A request: the
    /// app's policy decides.
    pub sandbox: SandboxMode,
    /// `[permissions]`: what it asks to be allowed. A request: the app's policy decides.
    pub permissions: Permissions,
    /// The `[config]` table, handed to the plugin's `create`.
    pub config: toml::Table,
    /// `[timeouts]`.
    pub timeouts: Timeouts,
    /// `[limits]`.
    pub limits: Limits,
    /// `[restart]`.
    pub restart: RestartPolicy,
    /// How many worker processes serve this plugin (`instances`, 1 to 64; untrusted
    /// plugins only). `None`: the host's default ([`HostBuilder::instances`], else 1).
    ///
    /// [`HostBuilder::instances`]: crate::HostBuilder::instances
    pub instances: Option<u32>,
    /// Stop a worker that had no call for this long (`idle_timeout`, a duration; untrusted
    /// plugins only); the next call starts it again. `None`: the host's default
    /// ([`HostBuilder::idle_timeout`], else never).
    ///
    /// [`HostBuilder::idle_timeout`]: crate::HostBuilder::idle_timeout
    pub idle_timeout: Option<Duration>,
    /// The host functions the plugin calls (`imports`, e.g. `["doc.selection"]`). A
    /// plugin may call a host function only when it is listed here and the app registered
    /// it for this plugin ([`HostBuilder::function`]).
    ///
    /// [`HostBuilder::function`]: crate::HostBuilder::function
    pub imports: Vec<String>,
}

/// A manifest field reader that knows which file and section it is in.
struct Reader<'a> {
    path: &'a Path,
    section: &'a str,
}

impl Reader<'_> {
    fn field(&self, key: &str) -> String {
        if self.section.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.section)
        }
    }

    fn err(&self, key: &str, kind: ManifestErrorKind, message: impl Into<String>) -> ManifestError {
        ManifestError {
            path: self.path.to_path_buf(),
            field: self.field(key),
            kind,
            message: message.into(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, got: &toml::Value) -> ManifestError {
        self.err(
            key,
            ManifestErrorKind::WrongType,
            format!("expected {expected}, found {}", got.type_str()),
        )
    }

    fn reject_unknown(&self, table: &toml::Table, known: &[&str]) -> Result<(), ManifestError> {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                return Err(self.err(
                    key,
                    ManifestErrorKind::UnknownField,
                    format!("unknown field; expected one of: {}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// An array of non-empty strings; absent is empty.
    fn string_list(&self, table: &toml::Table, key: &str) -> Result<Vec<String>, ManifestError> {
        match table.get(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
                    toml::Value::String(_) => Err(self.err(
                        &format!("{key}[{i}]"),
                        ManifestErrorKind::InvalidValue,
                        "must not be empty",
                    )),
                    other => Err(self.wrong_type(&format!("{key}[{i}]"), "a string", other)),
                })
                .collect(),
            Some(other) => Err(self.wrong_type(key, "an array of strings", other)),
        }
    }

    fn string<'t>(
        &self,
        table: &'t toml::Table,
        key: &str,
    ) -> Result<Option<&'t str>, ManifestError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn required_string<'t>(
        &self,
        table: &'t toml::Table,
        key: &str,
    ) -> Result<&'t str, ManifestError> {
        self.string(table, key)?.ok_or_else(|| {
            self.err(
                key,
                ManifestErrorKind::MissingField,
                "required field is missing",
            )
        })
    }

    fn table<'t>(
        &self,
        table: &'t toml::Table,
        key: &str,
    ) -> Result<Option<&'t toml::Table>, ManifestError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::Table(t)) => Ok(Some(t)),
            Some(other) => Err(self.wrong_type(key, "a table", other)),
        }
    }

    fn duration(&self, table: &toml::Table, key: &str) -> Result<Option<Duration>, ManifestError> {
        let Some(text) =
            self.string_or_type(table, key, "a duration such as \"30s\" or \"250ms\"")?
        else {
            return Ok(None);
        };
        let duration = parse_duration(text).ok_or_else(|| {
            self.err(
                key,
                ManifestErrorKind::InvalidValue,
                format!("`{text}` is not a duration; expected a number with a unit: ms, s, m or h (\"30s\", \"250ms\")"),
            )
        })?;
        if duration.is_zero() {
            return Err(self.err(
                key,
                ManifestErrorKind::InvalidValue,
                "must be greater than zero",
            ));
        }
        Ok(Some(duration))
    }

    fn size(&self, table: &toml::Table, key: &str) -> Result<Option<u64>, ManifestError> {
        let value = match table.get(key) {
            None => return Ok(None),
            Some(toml::Value::Integer(n)) if *n > 0 => *n as u64,
            Some(toml::Value::Integer(_)) => {
                return Err(self.err(key, ManifestErrorKind::InvalidValue, "must be greater than zero"))
            }
            Some(toml::Value::String(text)) => parse_size(text).ok_or_else(|| {
                self.err(
                    key,
                    ManifestErrorKind::InvalidValue,
                    format!("`{text}` is not a size; expected bytes or a number with a unit: B, KiB, MiB, GiB (\"512MiB\")"),
                )
            })?,
            Some(other) => return Err(self.wrong_type(key, "a size such as \"512MiB\"", other)),
        };
        if value == 0 {
            return Err(self.err(
                key,
                ManifestErrorKind::InvalidValue,
                "must be greater than zero",
            ));
        }
        Ok(Some(value))
    }

    fn string_or_type<'t>(
        &self,
        table: &'t toml::Table,
        key: &str,
        expected: &str,
    ) -> Result<Option<&'t str>, ManifestError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(key, expected, other)),
        }
    }

    fn integer(
        &self,
        table: &toml::Table,
        key: &str,
        min: i64,
        max: i64,
    ) -> Result<Option<i64>, ManifestError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if (min..=max).contains(n) => Ok(Some(*n)),
            Some(toml::Value::Integer(n)) => Err(self.err(
                key,
                ManifestErrorKind::InvalidValue,
                format!("{n} is out of range; expected {min}..={max}"),
            )),
            Some(other) => Err(self.wrong_type(key, "an integer", other)),
        }
    }

    fn boolean(&self, table: &toml::Table, key: &str) -> Result<Option<bool>, ManifestError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
            Some(other) => Err(self.wrong_type(key, "true or false", other)),
        }
    }
}

/// Reads `[permissions]`.
fn parse_permissions(path: &Path, t: &toml::Table) -> Result<Permissions, ManifestError> {
    let r = Reader {
        path,
        section: "permissions",
    };
    r.reject_unknown(
        t,
        &[
            "read",
            "write",
            "network",
            "env",
            "exec",
            "threads",
            "processes",
        ],
    )?;
    let strings = |key: &str| r.string_list(t, key);
    let read = strings("read")?;
    let write = strings("write")?;
    for (key, list) in [("read", &read), ("write", &write)] {
        for (i, item) in list.iter().enumerate() {
            let placeholder = ["$PLUGIN_DIR", "$DATA_DIR", "$TMP"].iter().any(|p| {
                item.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            });
            if !placeholder && !Path::new(item).is_absolute() {
                return Err(r.err(
                    &format!("{key}[{i}]"),
                    ManifestErrorKind::InvalidValue,
                    format!("`{item}` is not an absolute path; use an absolute path or start with $PLUGIN_DIR, $DATA_DIR or $TMP"),
                ));
            }
        }
    }
    let env = strings("env")?;
    for (i, name) in env.iter().enumerate() {
        if name.contains('=') || name.contains('\0') {
            return Err(r.err(
                &format!("env[{i}]"),
                ManifestErrorKind::InvalidValue,
                format!("`{name}` is not an environment variable name"),
            ));
        }
    }
    Ok(Permissions {
        read,
        write,
        network: r.boolean(t, "network")?.unwrap_or(false),
        env,
        exec: r.boolean(t, "exec")?.unwrap_or(false),
        threads: r.integer(t, "threads", 0, 100_000)?.map(|n| n as u32),
        processes: r.integer(t, "processes", 0, 100_000)?.map(|n| n as u32),
    })
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"` (also with fractions: `"1.5s"`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return None;
    }
    Some(Duration::from_secs_f64(seconds))
}

/// Parses `"4096"`, `"64KiB"`, `"512MiB"`, `"2GiB"` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// The extensions that make `library` a path to a native shared library.
const NATIVE_EXTENSIONS: [&str; 3] = [".so", ".dylib", ".dll"];

/// The extension that makes `library` a path to a WebAssembly module.
const WASM_EXTENSION: &str = ".wasm";

const TOP_LEVEL: &[&str] = &[
    "name",
    "version",
    "description",
    "library",
    "api",
    "trust",
    "runtime",
    "sandbox",
    "permissions",
    "config",
    "timeouts",
    "limits",
    "restart",
    "instances",
    "idle_timeout",
    "imports",
];

impl Manifest {
    /// Reads and validates a manifest file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Manifest, ManifestError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            path: path.to_path_buf(),
            field: String::new(),
            kind: ManifestErrorKind::Io,
            message: format!("cannot read manifest: {e}"),
        })?;
        let mut manifest = Manifest::parse(&text, path)?;
        manifest.path = Some(path.to_path_buf());
        Ok(manifest)
    }

    /// Parses manifest text; `origin` names it in errors (a path, or e.g. `<inline>`).
    /// The result has no `path`, so a relative `library` resolves against the host's
    /// search paths only.
    pub fn parse(text: &str, origin: impl AsRef<Path>) -> Result<Manifest, ManifestError> {
        let path = origin.as_ref();
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ManifestError {
            path: path.to_path_buf(),
            field: String::new(),
            kind: ManifestErrorKind::Syntax,
            message: format!("not valid TOML: {}", e.to_string().trim_end()),
        })?;
        let top = Reader { path, section: "" };
        top.reject_unknown(&table, TOP_LEVEL)?;

        let name = top.required_string(&table, "name")?;
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(top.err(
                "name",
                ManifestErrorKind::InvalidValue,
                format!(
                    "`{name}` is not a valid name; use 1 to 64 letters, digits, `-`, `_` or `.`"
                ),
            ));
        }
        let version_text = top.required_string(&table, "version")?;
        let version = semver::Version::parse(version_text).map_err(|e| {
            top.err(
                "version",
                ManifestErrorKind::InvalidValue,
                format!("`{version_text}` is not a semver version such as \"1.2.0\": {e}"),
            )
        })?;
        let description = top.string(&table, "description")?.map(str::to_string);
        let library = top.required_string(&table, "library")?;
        if library.trim().is_empty() {
            return Err(top.err(
                "library",
                ManifestErrorKind::InvalidValue,
                "must not be empty",
            ));
        }
        let api_text = top.required_string(&table, "api")?;
        let api = semver::VersionReq::parse(api_text).map_err(|e| {
            top.err(
                "api",
                ManifestErrorKind::InvalidValue,
                format!("`{api_text}` is not a semver requirement such as \"^1\": {e}"),
            )
        })?;
        let trust = match top.string(&table, "trust")? {
            None | Some("untrusted") => Trust::Untrusted,
            Some("trusted") => Trust::Trusted,
            Some(other) => {
                return Err(top.err(
                    "trust",
                    ManifestErrorKind::InvalidValue,
                    format!(
                        "`{other}` is not a trust level; expected \"trusted\" or \"untrusted\""
                    ),
                ))
            }
        };
        let runtime = match top.string(&table, "runtime")? {
            None | Some("native") => Runtime::Native,
            Some("wasm") => Runtime::Wasm,
            Some(other) => {
                return Err(top.err(
                    "runtime",
                    ManifestErrorKind::InvalidValue,
                    format!("`{other}` is not a runtime; expected \"native\" or \"wasm\""),
                ))
            }
        };
        match runtime {
            Runtime::Native if library.ends_with(WASM_EXTENSION) => {
                return Err(top.err(
                    "library",
                    ManifestErrorKind::InvalidValue,
                    format!(
                        "`{library}` is a WebAssembly module; add `runtime = \"wasm\"` to load \
                         it, or name a shared library"
                    ),
                ))
            }
            Runtime::Wasm if NATIVE_EXTENSIONS.iter().any(|e| library.ends_with(e)) => {
                return Err(top.err(
                    "library",
                    ManifestErrorKind::InvalidValue,
                    format!(
                        "`{library}` is a native shared library; a `runtime = \"wasm\"` plugin \
                         needs a `.wasm` module (a base name such as \"hello\" stands for \
                         `hello.wasm`)"
                    ),
                ))
            }
            _ => {}
        }
        let sandbox = match top.string(&table, "sandbox")? {
            None => SandboxMode::Required,
            Some(text) => SandboxMode::parse(text).ok_or_else(|| {
                top.err(
                    "sandbox",
                    ManifestErrorKind::InvalidValue,
                    format!("`{text}` is not a sandbox mode; expected \"required\", \"best-effort\" or \"off\""),
                )
            })?,
        };
        let permissions = match top.table(&table, "permissions")? {
            None => Permissions::default(),
            Some(t) => parse_permissions(path, t)?,
        };
        let config = top.table(&table, "config")?.cloned().unwrap_or_default();

        let mut timeouts = Timeouts::default();
        if let Some(t) = top.table(&table, "timeouts")? {
            let r = Reader {
                path,
                section: "timeouts",
            };
            r.reject_unknown(
                t,
                &[
                    "call",
                    "connect",
                    "shutdown",
                    "cancel_grace",
                    "ping_interval",
                    "ping_timeout",
                ],
            )?;
            timeouts.connect = r.duration(t, "connect")?;
            let slots: [(&str, &mut Duration); 5] = [
                ("call", &mut timeouts.call),
                ("shutdown", &mut timeouts.shutdown),
                ("cancel_grace", &mut timeouts.cancel_grace),
                ("ping_interval", &mut timeouts.ping_interval),
                ("ping_timeout", &mut timeouts.ping_timeout),
            ];
            for (key, slot) in slots {
                if let Some(d) = r.duration(t, key)? {
                    *slot = d;
                }
            }
        }

        let mut limits = Limits::default();
        if let Some(t) = top.table(&table, "limits")? {
            let r = Reader {
                path,
                section: "limits",
            };
            r.reject_unknown(
                t,
                &[
                    "memory",
                    "cpu",
                    "open_files",
                    "core_dumps",
                    "max_frame",
                    "concurrency",
                    "queue",
                    "stderr_lines",
                ],
            )?;
            limits.memory = r.size(t, "memory")?;
            if let Some(m) = limits.memory {
                if m < 16 << 20 {
                    return Err(r.err(
                        "memory",
                        ManifestErrorKind::InvalidValue,
                        "must be at least 16MiB: a worker cannot start with less",
                    ));
                }
            }
            limits.cpu = r.duration(t, "cpu")?;
            limits.open_files = r.integer(t, "open_files", 16, 1 << 20)?.map(|n| n as u64);
            limits.core_dumps = r.boolean(t, "core_dumps")?.unwrap_or(false);
            if let Some(f) = r.size(t, "max_frame")? {
                if !(4096..=(1u64 << 31)).contains(&f) {
                    return Err(r.err(
                        "max_frame",
                        ManifestErrorKind::InvalidValue,
                        "must be between 4KiB and 2GiB",
                    ));
                }
                limits.max_frame = f;
            }
            if let Some(q) = r.integer(t, "queue", 0, 4096)? {
                limits.queue = q as u32;
            }
            if let Some(c) = r.integer(t, "concurrency", 1, 1024)? {
                limits.concurrency = c as u32;
            }
            if let Some(n) = r.integer(t, "stderr_lines", 0, 10_000)? {
                limits.stderr_lines = n as u32;
            }
        }

        let mut restart = RestartPolicy::default();
        if let Some(t) = top.table(&table, "restart")? {
            let r = Reader {
                path,
                section: "restart",
            };
            r.reject_unknown(
                t,
                &["policy", "max_crashes", "window", "backoff", "backoff_max"],
            )?;
            restart.mode = match r.string(t, "policy")? {
                None | Some("on-crash") => RestartMode::OnCrash,
                Some("never") => RestartMode::Never,
                Some(other) => {
                    return Err(r.err(
                        "policy",
                        ManifestErrorKind::InvalidValue,
                        format!(
                            "`{other}` is not a restart policy; expected \"on-crash\" or \"never\""
                        ),
                    ))
                }
            };
            if let Some(n) = r.integer(t, "max_crashes", 1, 1_000_000)? {
                restart.max_crashes = n as u32;
            }
            if let Some(d) = r.duration(t, "window")? {
                restart.window = d;
            }
            if let Some(d) = r.duration(t, "backoff")? {
                restart.backoff = d;
            }
            if let Some(d) = r.duration(t, "backoff_max")? {
                restart.backoff_max = d;
            }
            if restart.backoff > restart.backoff_max {
                return Err(r.err(
                    "backoff",
                    ManifestErrorKind::InvalidValue,
                    format!(
                        "{:?} is larger than restart.backoff_max ({:?})",
                        restart.backoff, restart.backoff_max
                    ),
                ));
            }
        }

        let instances = top.integer(&table, "instances", 1, 64)?.map(|n| n as u32);
        let idle_timeout = top.duration(&table, "idle_timeout")?;
        if idle_timeout.is_some_and(|d| d.is_zero()) {
            return Err(top.err(
                "idle_timeout",
                ManifestErrorKind::InvalidValue,
                "must be longer than zero; leave it out to keep workers running",
            ));
        }

        let imports = top.string_list(&table, "imports")?;
        for (i, import) in imports.iter().enumerate() {
            let valid = import.len() <= 128
                && import
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-:/".contains(c));
            if !valid {
                return Err(top.err(
                    &format!("imports[{i}]"),
                    ManifestErrorKind::InvalidValue,
                    format!(
                        "`{}` is not a host function name: use at most 128 letters, digits, \
                         `.`, `_`, `-`, `:` or `/`",
                        import.escape_debug()
                    ),
                ));
            }
        }
        let mut imports = imports;
        imports.sort();
        imports.dedup();

        Ok(Manifest {
            path: None,
            name: name.to_string(),
            version,
            description,
            library: library.to_string(),
            api,
            trust,
            runtime,
            sandbox,
            permissions,
            config,
            timeouts,
            limits,
            restart,
            instances,
            idle_timeout,
            imports,
        })
    }

    /// The directory relative paths resolve against: the manifest's own directory.
    pub fn dir(&self) -> Option<&Path> {
        // `plugin.toml` has the parent "": that is the current directory.
        self.path.as_deref().and_then(Path::parent).map(|d| {
            if d.as_os_str().is_empty() {
                Path::new(".")
            } else {
                d
            }
        })
    }

    /// The platform file name for a base library name of a native plugin: `libNAME.so` on
    /// Linux, `libNAME.dylib` on macOS, `NAME.dll` on Windows. For either runtime, see
    /// [`Runtime::library_file_name`].
    pub fn library_file_name(base: &str) -> String {
        format!(
            "{}{base}{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        )
    }

    /// Whether `library` is a path (has a separator, or a library or module extension:
    /// `.so`, `.dylib`, `.dll`, `.wasm`) rather than a base name.
    fn library_is_path(&self) -> bool {
        let l = &self.library;
        l.contains('/')
            || l.contains('\\')
            || l.ends_with(WASM_EXTENSION)
            || NATIVE_EXTENSIONS.iter().any(|e| l.ends_with(e))
    }

    /// Finds the library file: a path is taken relative to the manifest's directory; a base
    /// name stands for the file [`Runtime::library_file_name`] gives for `runtime`
    /// (`libNAME.so` and the like for a native plugin, `NAME.wasm` for a WebAssembly one),
    /// looked up next to the manifest, then in each of `search_paths` in order.
    pub fn resolve_library(&self, search_paths: &[PathBuf]) -> Result<PathBuf, LoadError> {
        let mut searched = Vec::new();
        if self.library_is_path() {
            let path = Path::new(&self.library);
            let candidate = match self.dir() {
                Some(dir) if path.is_relative() => dir.join(path),
                _ => path.to_path_buf(),
            };
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(candidate);
        } else {
            let file = self.runtime.library_file_name(&self.library);
            let dirs = self
                .dir()
                .map(Path::to_path_buf)
                .into_iter()
                .chain(search_paths.iter().cloned());
            for dir in dirs {
                let candidate = dir.join(&file);
                if candidate.is_file() {
                    return Ok(candidate);
                }
                searched.push(candidate);
            }
        }
        Err(LoadError::LibraryNotFound {
            plugin: self.name.clone(),
            library: self.library.clone(),
            searched,
        })
    }

    /// The `[config]` table as MessagePack bytes, as the plugin's `create` receives it.
    pub fn config_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(&self.config).unwrap_or_default()
    }
}

/// Finds manifests under `dir`: files named `plugin.toml` or ending in `.plugin.toml`,
/// searched up to three directory levels deep, in sorted order. Each comes back parsed, or
/// with the error that stopped it.
pub fn discover(
    dir: impl AsRef<Path>,
) -> std::io::Result<Vec<(PathBuf, Result<Manifest, ManifestError>)>> {
    fn walk(dir: &Path, depth: u32, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if depth < 3 && !name.starts_with('.') && name != "target" {
                    walk(&path, depth + 1, found)?;
                }
            } else if name == "plugin.toml" || name.ends_with(".plugin.toml") {
                found.push(path);
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(dir.as_ref(), 0, &mut found)?;
    Ok(found
        .into_iter()
        .map(|p| {
            let m = Manifest::from_file(&p);
            (p, m)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size("99999999999999GiB"), None);
    }

    #[test]
    fn worker_timeout_variable_rules() {
        let default = Duration::from_secs(10);
        assert_eq!(connect_timeout_from_env(None), default);
        assert_eq!(connect_timeout_from_env(Some("")), default);
        assert_eq!(connect_timeout_from_env(Some("0")), default);
        assert_eq!(connect_timeout_from_env(Some("3")), Duration::from_secs(3));
        assert_eq!(
            connect_timeout_from_env(Some(" 7 ")),
            Duration::from_secs(7)
        );
        assert_eq!(connect_timeout_from_env(Some("soon")), default);
        assert_eq!(connect_timeout_from_env(Some("-1")), default);
        let explicit = Timeouts {
            connect: Some(Duration::from_secs(2)),
            ..Timeouts::default()
        };
        assert_eq!(
            explicit.connect_timeout(),
            Duration::from_secs(2),
            "the manifest wins"
        );
    }

    #[test]
    fn library_file_names_follow_the_platform() {
        let name = Manifest::library_file_name("thumbnail");
        if cfg!(target_os = "linux") {
            assert_eq!(name, "libthumbnail.so");
        }
        assert!(name.contains("thumbnail"));
        assert_eq!(Runtime::Native.library_file_name("thumbnail"), name);
        assert_eq!(
            Runtime::Wasm.library_file_name("thumbnail"),
            "thumbnail.wasm"
        );
        assert_eq!(Runtime::default(), Runtime::Native);
    }
}
