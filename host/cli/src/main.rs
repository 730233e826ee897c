//! `plugin-host`: list, inspect, check and call plugins from the command line, run the
//! demo, and report what sandbox this system can enforce (`doctor`). Errors go to stderr;
//! the exit code tells the kind of failure (see `--help`).
//!
//! Policy: like the library, deny-all by default. Every plugin runs untrusted, in a worker
//! with the sandbox required and no permissions, whatever its manifest says; `--grant`
//! grants what each manifest requests (trust, sandbox mode, permissions). `check` never
//! grants trust: it loads every native plugin in a worker, so no native plugin code runs in
//! its process.
//!
//! A WebAssembly plugin (`runtime = "wasm"` in its manifest) runs in this process, in the
//! wasmi interpreter, whatever the policy: the engine contains it (it reaches nothing but
//! its own memory and the host services it imports; its memory is capped and it runs on
//! fuel), and a trap ends that one instance, never the command. Trust, the sandbox mode
//! and permissions do not apply to it.

#[cfg(any(unix, windows))]
mod bench;
mod demo;
mod doctor;
mod json;
mod report;
#[cfg(target_os = "linux")]
mod soak;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use plugin_host::{
    manifest, CallError, CallOptions, Error, Grant, Host, Manifest, Plugin, Runtime, Trust,
};

const EXIT_CODES: &str = "Policy: deny-all by default: every plugin runs untrusted, in a \
sandboxed worker, with no permissions, whatever its manifest requests. --grant grants what \
each manifest requests (trust, sandbox mode, permissions); use it only for plugins you trust. \
`check` grants everything but trust: it loads every native plugin in a worker process. A \
WebAssembly plugin (runtime = \"wasm\") runs in this process, in the wasmi interpreter, which \
contains it: trust, sandbox and permissions do not apply to it.

Exit codes: 0 success, 1 I/O or other error, 2 usage, 3 invalid manifest, 4 plugin failed to \
load (a sandbox this system cannot enforce included: see `plugin-host doctor`), 5 the call \
failed (plugin error, bad input, unknown method), 6 the plugin crashed (a WebAssembly \
plugin: trapped), or was killed, or is quarantined, 7 the call timed out, 8 `check` found problems, 9 `soak` found a violation, \
10 `doctor`: this system cannot enforce the default sandbox (a layer is missing).";

#[derive(Parser)]
#[command(name = "plugin-host", version, about = "Load, inspect and call plugin-host plugins.", after_help = EXIT_CODES)]
struct Cli {
    /// Extra directory to look for plugin libraries and WebAssembly modules in (repeatable).
    /// The directory of this executable is always searched last, then
    /// `../wasm32-unknown-unknown/release` from it (where `cargo build --release --target
    /// wasm32-unknown-unknown` puts the modules of the workspace this executable was built
    /// in).
    #[arg(short = 'L', long = "search-path", global = true)]
    search_paths: Vec<PathBuf>,

    /// Grant what each manifest requests: trust, sandbox mode and permissions (`check`: all
    /// but trust). Only for plugins you trust. Without it every plugin runs untrusted,
    /// sandboxed, with no permissions (deny-all).
    #[arg(long, global = true)]
    grant: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the manifests found under DIR (plugin.toml, *.plugin.toml), valid or not. The
    /// trust column is what the manifest requests, not what it is granted.
    List {
        /// Directory to search (three levels deep).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Print what sandbox this system can enforce, and what an untrusted plugin gets here.
    Doctor {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Load a plugin and print its name, version, ABI, methods, runtime, what its manifest
    /// requests, what was granted, where it runs and what contains it (the sandbox layers
    /// in force; for a WebAssembly plugin, the engine's limits).
    Inspect {
        /// The plugin's manifest.
        manifest: PathBuf,
    },
    /// Call a method and print its output. Input and output are JSON, converted to and from
    /// MessagePack; with --raw they are bytes, passed through unchanged.
    ///
    /// The input is --json, else the contents of --input FILE, else stdin when stdin is not
    /// a terminal; with none of these it is `null` (with --raw: no bytes). Empty stdin also
    /// means `null`.
    Call {
        /// The plugin's manifest.
        manifest: PathBuf,
        /// The method to call.
        method: String,
        /// The input as JSON text (converted to MessagePack).
        #[arg(long, value_name = "JSON", conflicts_with_all = ["input", "raw"])]
        json: Option<String>,
        /// Read the input from FILE (`-`: stdin): JSON text, or with --raw any bytes.
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Write the output to FILE instead of stdout (`-`: stdout): pretty JSON, or with
        /// --raw the bytes as the plugin returned them. Written only if the call succeeds.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Bytes in, bytes out: no JSON or MessagePack conversion either way. For methods the
        /// plugin registered with `add_raw` (such as hello's and faulty's `echo`); a typed
        /// method given raw input must be sent MessagePack.
        #[arg(long)]
        raw: bool,
        /// Deadline for the call, e.g. "5s" (default: the manifest's timeouts.call).
        #[arg(long)]
        timeout: Option<String>,
    },
    /// Validate every manifest under DIR and load each plugin once: a native plugin in a
    /// worker process (check never runs native plugin code in its own process), a
    /// WebAssembly plugin in this process, in the wasmi interpreter, which contains it. So a
    /// plugin that crashes (or traps) on load is reported, not fatal. With --grant, trusted
    /// plugins get what they request except trust. A missing library is reported with the
    /// command that builds it, where the plugin's directory says how (build.sh, Makefile,
    /// Cargo.toml, one C file); a missing `.wasm` module with its `cargo build --target
    /// wasm32-unknown-unknown` command and where the module lands.
    Check {
        /// Directory to search (three levels deep).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Load the example plugins, call them, crash one and show the host recover; then the
    /// same faults in the three backends side by side (in-process, isolated worker,
    /// WebAssembly). The WebAssembly part needs `faulty.wasm` (looked for in the search
    /// paths); without it, the demo says how to build it and shows the other two.
    Demo {
        /// Directory holding the example plugins' manifests.
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
    },
    /// Measure call latency, throughput and cold start against raw baselines (a Unix
    /// socket echo, on Windows a named-pipe echo, and, on Linux, a shared-memory
    /// ping-pong), then an idle worker's CPU use and how fast a crash reaches the caller.
    /// The WebAssembly backend is measured in the same run (calls, cold start) when
    /// `hello.wasm` is found in the search paths.
    /// Sets its own policies (ignores --grant): isolated figures are for the default
    /// sandboxed worker; cold start is measured with the sandbox off and on. Where there is
    /// no sandbox (anywhere but Linux) every figure is with the sandbox off, and says so.
    Bench {
        /// Directory holding the example plugins' manifests (uses hello, callbacks and
        /// faulty; and hello.wasm, from the search paths).
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
        /// A short run (seconds) to check the command works; figures are noisy.
        #[arg(long)]
        quick: bool,
        /// Keep one CPU busy with a spinning thread while measuring, so idle-CPU wake-up
        /// latency (large on virtual machines) does not dominate small round trips.
        #[arg(long)]
        warm: bool,
        /// The transport of the isolated plugins measured: `shm` (the library's default),
        /// `socket`, or `both`, side by side in the same run with shm-vs-socket ratios.
        /// Shared memory is Linux-only: elsewhere the socket is measured, and the bench
        /// says so.
        #[arg(long, value_enum, default_value = "shm")]
        transport: BenchTransport,
    },
    /// Chaos soak: many concurrent calls over several plugins with random faults; checks
    /// every call is answered exactly once, restarts match crashes, nothing leaks.
    Soak {
        /// Directory holding the example plugins' manifests (uses faulty).
        #[arg(long, default_value = "plugins")]
        plugins: PathBuf,
        /// Number of calls.
        #[arg(long, default_value_t = 5000)]
        calls: u64,
        /// Number of plugin instances (each its own worker).
        #[arg(long, default_value_t = 3)]
        instances: u32,
        /// Fraction of calls that inject a fault.
        #[arg(long, default_value_t = 0.02)]
        fault_rate: f64,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 16)]
        concurrency: u32,
        /// Random seed (the run is reproducible in which faults it injects where).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The C attack plugin's library (plugins/attack/attack.c, built by the tests), for
        /// the setsid-grandchild fault; without it that fault is skipped.
        #[arg(long)]
        attack: Option<PathBuf>,
        /// Fail if the host's peak resident memory grows by this many MiB or more.
        #[arg(long, default_value_t = 20)]
        max_rss_growth: u64,
    },
    /// Internal: the raw echo peer the benchmark spawns as its baseline.
    #[command(hide = true)]
    BenchEchoServer {
        /// The local socket name to connect to.
        socket: String,
    },
    /// Internal: the shared-memory ping-pong peer the benchmark spawns as its baseline
    /// (the region on stdin, the doorbell socket on stdout).
    #[command(hide = true)]
    BenchShmEchoServer,
}

/// `bench --transport`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchTransport {
    /// The shared-memory rings.
    Shm,
    /// The socket.
    Socket,
    /// Both, side by side.
    Both,
}

/// Maps an error to the documented exit code.
fn exit_code(err: &Error) -> u8 {
    match err {
        Error::Manifest(_) => 3,
        Error::Load(_) => 4,
        Error::Call(CallError::Timeout { .. }) => 7,
        Error::Call(e) if is_crash(e) => 6,
        Error::Call(_) => 5,
    }
}

fn is_crash(err: &CallError) -> bool {
    matches!(
        err,
        CallError::Crashed { .. } | CallError::Killed { .. } | CallError::Quarantined { .. }
    )
}

/// What the command grants the plugins it loads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Nothing: the library's default.
    DenyAll,
    /// `--grant`: what each manifest requests.
    Requested,
    /// `check --grant`: what each manifest requests, except trust. `check` loads every
    /// plugin in a worker, so that no plugin code runs in its own process.
    RequestedUntrusted,
}

fn host(cli_paths: &[PathBuf], policy: Policy) -> Result<Host, Error> {
    let mut builder = Host::builder();
    match policy {
        Policy::DenyAll => {}
        Policy::Requested => builder = builder.grant_requested(),
        Policy::RequestedUntrusted => {
            builder = builder.permissions(|request| Grant {
                trust: Trust::Untrusted,
                ..Grant::requested(request)
            })
        }
    }
    for path in cli_paths {
        builder = builder.search_path(path);
    }
    for dir in default_search_paths() {
        builder = builder.search_path(dir);
    }
    builder.build()
}

/// The target triple WebAssembly plugins are built for.
pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The directories searched after `-L`'s: this executable's, then
/// `../wasm32-unknown-unknown/release` from it: in a Cargo target directory
/// (`target/release/plugin-host`), where `cargo build --release --target
/// wasm32-unknown-unknown` puts the workspace's WebAssembly modules.
fn default_search_paths() -> Vec<PathBuf> {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return Vec::new();
    };
    let wasm = dir
        .parent()
        .map(|target| target.join(WASM_TARGET).join("release"));
    std::iter::once(dir).chain(wasm).collect()
}

/// The WebAssembly module `NAME.wasm` of an example plugin, from the first of `search_paths`
/// that has it (the CLI's: `-L`, then [`default_search_paths`]).
pub fn find_wasm(search_paths: &[PathBuf], name: &str) -> Option<PathBuf> {
    let file = plugin_host::Runtime::Wasm.library_file_name(name);
    search_paths
        .iter()
        .map(|dir| dir.join(&file))
        .find(|p| p.is_file())
}

/// How to build the example plugins' WebAssembly modules, for the demo and the bench when
/// one is missing.
pub fn wasm_build_hint(packages: &[&str]) -> String {
    let packages: Vec<String> = packages.iter().map(|p| format!("-p {p}")).collect();
    format!(
        "rustup target add {WASM_TARGET} && cargo build --release --target {WASM_TARGET} {}",
        packages.join(" ")
    )
}

fn main() -> ExitCode {
    // The CLI is its own worker when no worker-shim is installed beside it.
    plugin_host::worker::run_if_worker();
    let cli = Cli::parse();
    // The bench starts workers with the sandbox off on purpose (to measure what the sandbox
    // costs) and says so once; the library's warning for each of them would drown the
    // figures. It also crashes `faulty` on purpose, many times (to time crash -> error):
    // likewise for the supervisor's warning about each crash. Everywhere else, and
    // whenever RUST_LOG is set, warnings are as they are.
    // `check` says itself, on stdout, that it runs trusted plugins in a worker; the
    // library's warning that a plugin asked for trust and did not get it would repeat that
    // on stderr for each of them.
    let default_filter = match cli.command {
        Command::Bench { .. } => {
            "warn,plugin_host::sandbox=error,plugin_host::backend::isolated::supervisor=error"
        }
        Command::Check { .. } => "warn,plugin_host::host=error",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let policy = match (&cli.command, cli.grant) {
        (_, false) => Policy::DenyAll,
        (Command::Check { .. }, true) => Policy::RequestedUntrusted,
        (_, true) => Policy::Requested,
    };
    let host = match host(&cli.search_paths, policy) {
        Ok(h) => h,
        Err(e) => return fail(&e, None),
    };
    match cli.command {
        Command::List { dir } => list(&dir),
        Command::Doctor { json } => doctor::run(json),
        Command::Inspect { manifest } => inspect(&host, &manifest, cli.grant),
        Command::Call {
            manifest,
            method,
            json,
            input,
            output,
            raw,
            timeout,
        } => call(
            &host,
            &manifest,
            &method,
            &CallIo {
                json,
                input,
                output,
                raw,
            },
            timeout,
        ),
        Command::Check { dir } => check(&host, &dir),
        Command::Demo { plugins } => demo::run(&host, &plugins),
        #[cfg(any(unix, windows))]
        Command::Bench {
            plugins,
            quick,
            warm,
            transport,
        } => bench::run(
            &bench::Settings {
                plugins,
                quick,
                warm,
                transports: match transport {
                    BenchTransport::Shm => vec![plugin_host::Transport::SharedMemory],
                    BenchTransport::Socket => vec![plugin_host::Transport::Socket],
                    BenchTransport::Both => vec![
                        plugin_host::Transport::SharedMemory,
                        plugin_host::Transport::Socket,
                    ],
                },
            },
            &host,
        ),
        #[cfg(target_os = "linux")]
        Command::Soak {
            plugins,
            calls,
            instances,
            fault_rate,
            concurrency,
            seed,
            attack,
            max_rss_growth,
        } => soak::run(
            &soak::Settings {
                plugins,
                calls,
                instances,
                fault_rate,
                concurrency,
                seed,
                attack,
                max_rss_growth_mib: max_rss_growth,
            },
            &host,
        ),
        #[cfg(not(target_os = "linux"))]
        Command::Soak { .. } => usage("soak runs on Linux only"),
        #[cfg(any(unix, windows))]
        Command::BenchEchoServer { socket } => bench::echo_server(&socket),
        #[cfg(not(any(unix, windows)))]
        Command::Bench { .. } | Command::BenchEchoServer { .. } => {
            usage("bench runs on Unix and Windows only")
        }
        #[cfg(target_os = "linux")]
        Command::BenchShmEchoServer => bench::shm_echo_server(),
        #[cfg(not(target_os = "linux"))]
        Command::BenchShmEchoServer => usage("the shared-memory baseline runs on Linux only"),
    }
}

/// Prints `err` in the command's words (see [`report`]) and returns its exit code.
/// `manifest` is the manifest the failing operation was about, if there is one.
fn fail(err: &Error, manifest: Option<&Path>) -> ExitCode {
    report::print(err, manifest);
    ExitCode::from(exit_code(err))
}

fn trust_name(trust: Trust) -> &'static str {
    match trust {
        Trust::Trusted => "trusted",
        Trust::Untrusted => "untrusted",
    }
}

/// `trust T, sandbox M, permissions: P`.
fn describe(
    trust: Trust,
    sandbox: plugin_host::SandboxMode,
    permissions: &plugin_host::Permissions,
) -> String {
    format!(
        "trust {}, sandbox {}, permissions: {}",
        trust_name(trust),
        sandbox.as_str(),
        permissions.summary()
    )
}

/// Where a WebAssembly plugin runs and what contains it.
pub const WASM_PLACEMENT: &str = "webassembly, in this process (wasmi; contained by the \
engine: no imports beyond the host services, memory cap, fuel)";

/// Where a loaded plugin runs, in a few words.
fn placement(plugin: &Plugin) -> String {
    if plugin.runtime() == Runtime::Wasm {
        return WASM_PLACEMENT.into();
    }
    let status = plugin.status();
    match (plugin.trust(), status.pid) {
        (Trust::Trusted, _) => "in-process (trusted)".into(),
        (Trust::Untrusted, pid) => {
            let sandbox = match plugin.grant().sandbox {
                plugin_host::SandboxMode::Off => "sandbox off".to_string(),
                _ if status.sandbox_missing.is_empty() => {
                    format!("sandboxed, {} layers", status.sandbox.len())
                }
                _ => format!(
                    "sandboxed, {} layers, {} missing",
                    status.sandbox.len(),
                    status.sandbox_missing.len()
                ),
            };
            match pid {
                Some(pid) => format!("untrusted, worker process {pid} ({sandbox})"),
                None => format!("untrusted, worker process ({sandbox})"),
            }
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

fn list(dir: &Path) -> ExitCode {
    let found = match manifest::discover(dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    };
    if found.is_empty() {
        println!("no manifests under {}", dir.display());
    }
    for (path, result) in found {
        match result {
            Ok(m) => {
                let trust = match m.trust {
                    plugin_host::Trust::Trusted => "trusted",
                    plugin_host::Trust::Untrusted => "untrusted",
                };
                println!(
                    "{:<16} {:<10} {:<10} ok       {}",
                    m.name,
                    m.version,
                    trust,
                    path.display()
                );
            }
            Err(e) => println!("{:<16} {:<10} {:<10} invalid  {e}", "?", "?", "?"),
        }
    }
    ExitCode::SUCCESS
}

fn inspect(host: &Host, manifest: &Path, grant: bool) -> ExitCode {
    let path = manifest;
    let manifest = match Manifest::from_file(path) {
        Ok(m) => m,
        Err(e) => return fail(&e.into(), Some(path)),
    };
    let request = plugin_host::PermissionRequest::from_manifest(&manifest);
    match futures_lite::future::block_on(host.load_manifest(manifest)) {
        Ok(plugin) => {
            let info = plugin.info();
            println!("name:     {}", info.name);
            println!("version:  {}", info.version);
            println!(
                "library:  {} ({})",
                plugin.library_path().display(),
                info.library_name
            );
            println!("abi:      {}.{}", info.abi.0, info.abi.1);
            let wasm = plugin.runtime() == Runtime::Wasm;
            match wasm {
                true => {
                    println!("runtime:  wasm (a WebAssembly module, run by the wasmi interpreter)");
                    println!("trust:    does not apply (the engine contains the plugin)");
                }
                false => {
                    println!("runtime:  native (a shared library)");
                    println!("trust:    {:?}", plugin.trust());
                }
            }
            println!("methods:  {}", info.methods.join(", "));
            let granted = plugin.grant();
            println!(
                "requested: {}",
                describe(request.trust, request.sandbox, &request.permissions)
            );
            println!(
                "granted:   {}",
                describe(granted.trust, granted.sandbox, &granted.permissions)
            );
            if wasm {
                println!(
                    "           (none of it applies to a WebAssembly plugin: it runs in this \
                     process, reaches no file, network or process, only the host functions it \
                     imports: {})",
                    match plugin.manifest().imports.is_empty() {
                        true => "none".to_string(),
                        false => plugin.manifest().imports.join(", "),
                    }
                );
            }
            println!(
                "policy:    {}",
                if grant {
                    "--grant: what the manifest requests"
                } else {
                    "deny-all (the default; --grant grants what the manifest requests)"
                }
            );
            println!("runs:      {}", placement(&plugin));
            let status = plugin.status();
            if wasm || plugin.trust() == Trust::Untrusted {
                let none = |v: &[String]| match v.is_empty() {
                    true => "none".to_string(),
                    false => v.join(", "),
                };
                println!("sandbox:   {}", none(&status.sandbox));
                println!("missing:   {}", none(&status.sandbox_missing));
            } else {
                println!("sandbox:   none (in-process plugins run with the host's rights)");
            }
            futures_lite::future::block_on(plugin.shutdown());
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e, Some(path)),
    }
}

/// Where `call` takes its input from and puts its output, and in which form.
struct CallIo {
    /// `--json`: the input as JSON text.
    json: Option<String>,
    /// `--input`: a file to read the input from (`-`: stdin).
    input: Option<PathBuf>,
    /// `--output`: a file to write the output to (`-`: stdout).
    output: Option<PathBuf>,
    /// `--raw`: bytes in, bytes out.
    raw: bool,
}

fn call(
    host: &Host,
    manifest: &Path,
    method: &str,
    io: &CallIo,
    timeout: Option<String>,
) -> ExitCode {
    let mut options = CallOptions::new();
    if let Some(t) = timeout {
        match manifest::parse_duration(&t) {
            Some(d) if d > Duration::ZERO => options = options.timeout(d),
            _ => return usage(&format!("--timeout `{t}` is not a duration such as \"5s\"")),
        }
    }
    let input = match call_input(io) {
        Ok(bytes) => bytes,
        Err(code) => return code,
    };
    let plugin = match host.load_blocking(manifest) {
        Ok(p) => p,
        Err(e) => return fail(&e, Some(manifest)),
    };
    let result = futures_lite::future::block_on(plugin.call_raw_with(method, input, options));
    let code = match result {
        Ok(output) => write_output(&plugin, method, io, &output),
        Err(e) => fail(&e, Some(manifest)),
    };
    futures_lite::future::block_on(plugin.shutdown());
    code
}

/// The bytes to send: with `--raw` the input as it is, else its JSON as MessagePack.
fn call_input(io: &CallIo) -> Result<Vec<u8>, ExitCode> {
    use std::io::IsTerminal;
    let stdin = || -> Result<Vec<u8>, ExitCode> {
        let mut bytes = Vec::new();
        match std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes) {
            Ok(_) => Ok(bytes),
            Err(e) => {
                eprintln!("error: cannot read the input from stdin: {e}");
                Err(ExitCode::from(1))
            }
        }
    };
    let (bytes, source) = match (&io.json, &io.input) {
        (Some(json), _) => (json.clone().into_bytes(), "--json".to_string()),
        (None, Some(path)) if path.as_os_str() == "-" => (stdin()?, "stdin".to_string()),
        (None, Some(path)) => match std::fs::read(path) {
            Ok(bytes) => (bytes, format!("input file `{}`", path.display())),
            Err(e) => {
                eprintln!("error: cannot read input file `{}`: {e}", path.display());
                return Err(ExitCode::from(1));
            }
        },
        (None, None) if !std::io::stdin().is_terminal() => {
            let bytes = stdin()?;
            // Nothing on stdin (`< /dev/null`, a script's closed stdin) is no input.
            if !io.raw && bytes.iter().all(u8::is_ascii_whitespace) {
                (b"null".to_vec(), "stdin".to_string())
            } else {
                (bytes, "stdin".to_string())
            }
        }
        (None, None) if io.raw => (Vec::new(), String::new()),
        (None, None) => (b"null".to_vec(), String::new()),
    };
    if io.raw {
        return Ok(bytes);
    }
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text,
        Err(e) => {
            return Err(usage(&format!(
                "{source} is not valid JSON: it is not UTF-8 text ({e}); --raw sends bytes as \
                 they are"
            )))
        }
    };
    if text.trim().is_empty() {
        return Err(usage(&format!(
            "{source} is empty; expected JSON (`null` for no input)"
        )));
    }
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return Err(usage(&format!("{source} is not valid JSON: {e}"))),
    };
    json::to_msgpack(&value).map_err(|e| usage(&e))
}

/// Writes a successful call's output to `--output` or stdout: the bytes as they are with
/// `--raw`, else as pretty JSON.
fn write_output(plugin: &Plugin, method: &str, io: &CallIo, output: &[u8]) -> ExitCode {
    use std::io::Write;
    let bytes = if io.raw {
        output.to_vec()
    } else {
        match json::from_msgpack(output) {
            Ok(v) => {
                let mut text = serde_json::to_string_pretty(&v).unwrap_or_default();
                text.push('\n');
                text.into_bytes()
            }
            Err(e) => {
                eprintln!("error: plugin `{}` method `{method}`: {e}", plugin.name());
                eprintln!(
                    "hint: a method registered with `add_raw` returns bytes of its own; --raw \
                     passes them through unconverted"
                );
                return ExitCode::from(5);
            }
        }
    };
    let written = match &io.output {
        Some(path) if path.as_os_str() != "-" => std::fs::write(path, &bytes)
            .map_err(|e| format!("cannot write output file `{}`: {e}", path.display())),
        _ => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&bytes)
                .and_then(|()| stdout.flush())
                .map_err(|e| format!("cannot write the output to stdout: {e}"))
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// Validates and loads every manifest under `dir`. `host`'s policy never grants trust, so
/// every native plugin is loaded in a worker process: a plugin that crashes while it loads
/// takes its worker down, not `check`. A WebAssembly plugin is loaded in this process, in
/// the interpreter, which contains it: a trap while it loads ends its instance, not
/// `check`.
fn check(host: &Host, dir: &Path) -> ExitCode {
    let found = match manifest::discover(dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", dir.display());
            return ExitCode::from(1);
        }
    };
    let mut problems = 0;
    let mut trusted = 0;
    let mut wasm = 0;
    for (path, result) in &found {
        let mut hints = Vec::new();
        let mut asks_trust = false;
        let mut is_wasm = false;
        let outcome = match result {
            Err(e) => Err(e.to_string()),
            Ok(m) => {
                asks_trust = m.trust == Trust::Trusted;
                is_wasm = m.runtime == Runtime::Wasm;
                match futures_lite::future::block_on(host.load_manifest(m.clone())) {
                    Ok(plugin) => {
                        let methods = plugin.methods().len();
                        let place = placement(&plugin);
                        futures_lite::future::block_on(plugin.shutdown());
                        Ok(format!("loads, {methods} methods; {place}"))
                    }
                    Err(e) => {
                        let report = report::explain(&e, Some(path));
                        hints = report.hints;
                        Err(report.message)
                    }
                }
            }
        };
        match outcome {
            Ok(text) => println!("ok       {}: {text}", path.display()),
            Err(text) => {
                problems += 1;
                println!("FAILED   {}: {text}", path.display());
            }
        }
        for hint in hints {
            println!("         hint: {hint}");
        }
        if is_wasm {
            wasm += 1;
            if asks_trust {
                println!(
                    "         note: requests trust, which does not apply to a WebAssembly plugin"
                );
            }
        } else if asks_trust {
            trusted += 1;
            println!("         note: requests trust; checked in a worker process, not in-process");
        }
    }
    println!("{} manifests, {problems} with problems", found.len());
    if wasm > 0 {
        println!(
            "WebAssembly plugins were checked in this process, in the wasmi interpreter, which \
             contains them: a trap ends the instance, not check ({wasm} of these manifests are \
             runtime = \"wasm\")"
        );
    }
    if trusted > 0 {
        println!(
            "trusted plugins were checked in a worker process: check runs no plugin code in its \
             own process ({trusted} of these manifests request trust; `plugin-host --grant \
             inspect MANIFEST` loads such a plugin in-process)"
        );
    }
    if problems > 0 {
        ExitCode::from(8)
    } else {
        ExitCode::SUCCESS
    }
}
