//! `plugin-manager [-L DIR]... [--scenario NAME [--screenshot PATH]] [PLUGIN_DIR]...`: the
//! command line, then the window ([`plugin_manager::run`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// A plugin manager: the plugin-host library embedded in a desktop app.
#[derive(Parser, Debug)]
#[command(name = "plugin-manager", version)]
struct Args {
    /// Directories of plugins to load (default: the repository's `plugins/`).
    plugin_dirs: Vec<PathBuf>,
    /// Also look for plugin libraries and `.wasm` modules in DIR (repeatable).
    #[arg(short = 'L', long = "search-path", value_name = "DIR")]
    search_paths: Vec<PathBuf>,
    /// Run a scripted scenario once the plugins are loaded (`tour`).
    #[arg(long, value_name = "NAME")]
    scenario: Option<String>,
    /// Save a screenshot here once the scenario is over, then exit (0 if every step
    /// behaved as expected, 1 if not).
    #[arg(long, value_name = "PATH", requires = "scenario")]
    screenshot: Option<PathBuf>,
}

fn main() -> ExitCode {
    // First, before anything else (no thread, no argument parsing): when the host starts
    // this executable as a plugin's worker process, this runs the worker and exits. The app
    // is its own worker: nothing else to ship beside it.
    plugin_host::worker::run_if_worker();

    let args = Args::parse();
    if let Some(name) = &args.scenario {
        if !plugin_manager::scenario::NAMES.contains(&name.as_str()) {
            eprintln!(
                "plugin-manager: no scenario `{name}`; there is: {}",
                plugin_manager::scenario::NAMES.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    if args.screenshot.is_some() {
        // One pixel per point, whatever the display says, so that the screenshot has the
        // window's size (X11; set before the window, and any thread, exists).
        std::env::set_var("WINIT_X11_SCALE_FACTOR", "1");
    }
    // Plugin logs, worker stderr and the host's warnings (crashes, restarts) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    plugin_manager::run(plugin_manager::Options {
        plugin_dirs: args.plugin_dirs,
        search_paths: args.search_paths,
        scenario: args.scenario,
        screenshot: args.screenshot,
    })
}
