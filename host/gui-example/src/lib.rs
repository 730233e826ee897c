//! `plugin-manager`: a desktop application (egui, through eframe) that embeds `plugin-host`
//! the way an application developer would, with the public API only. Copy from it.
//!
//! It loads every plugin in a directory through the host's registry, and each Rust example
//! plugin a second time as WebAssembly when its `.wasm` module is found; shows them in a
//! table (backend, state badge, counters, worker pid, last crash) kept up to date by the
//! plugins' events; calls methods with JSON input, with a progress bar and a Cancel
//! button; crashes the fault-injection plugin on request; re-enables a quarantined plugin;
//! reloads one; shows what each plugin asked for and was granted; and logs what happens.
//!
//! The window never waits for a plugin: every load, call and event subscription runs on a
//! background thread ([`backend`]), which the UI ([`app`], [`ui`]) talks to through
//! channels. `--scenario tour --screenshot PATH` runs a scripted tour ([`scenario`]) and
//! saves a screenshot ([`screenshot`]) of the result.
//!
//! Module by module: [`setup`] builds the host (policy, host functions) and loads the
//! plugins; [`backend`] is the background thread and its messages; [`model`] is what the
//! window shows; [`presets`] the example plugins' typical inputs and faults; [`json`]
//! converts JSON input and MessagePack output; [`style`] the badge colours; [`image`] the
//! app's generated test pictures.

pub mod app;
pub mod backend;
pub mod image;
pub mod json;
pub mod model;
pub mod presets;
pub mod scenario;
pub mod screenshot;
pub mod setup;
pub mod style;
pub mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

/// The window's inner size in points, as the app requests it. At a scale factor of 1 (what
/// `--screenshot` pins) a screenshot has exactly this many pixels.
pub const WINDOW_SIZE: [f32; 2] = [1000.0, 720.0];

/// What the command line asked for.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Directories of plugins (each searched for `plugin.toml` and `*.plugin.toml`, three
    /// levels deep). Empty: the repository's `plugins/`.
    pub plugin_dirs: Vec<PathBuf>,
    /// Directories in which plugin libraries and `.wasm` modules are looked up (`-L`).
    pub search_paths: Vec<PathBuf>,
    /// A scripted scenario to run once the plugins are loaded (`--scenario`).
    pub scenario: Option<String>,
    /// Where to save a screenshot when the scenario is over, then exit (`--screenshot`).
    pub screenshot: Option<PathBuf>,
}

impl Options {
    /// The plugin directories to load: those given, or the repository's `plugins/`.
    pub fn plugin_dirs(&self) -> Vec<PathBuf> {
        if !self.plugin_dirs.is_empty() {
            return self.plugin_dirs.clone();
        }
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../plugins");
        vec![repo.canonicalize().unwrap_or(repo)]
    }
}

/// Opens the window and runs until it is closed (or, with `--screenshot`, until the
/// screenshot is saved). Exit code 0, or 1 when the scenario or the screenshot failed, or
/// the window could not be opened.
pub fn run(options: Options) -> ExitCode {
    let outcome = screenshot::Outcome::default();
    let native = eframe::NativeOptions {
        viewport: eframe::egui::ViewportBuilder::default()
            .with_title("Plugin manager: plugin-host example")
            .with_inner_size(WINDOW_SIZE)
            .with_min_inner_size([640.0, 480.0]),
        renderer: eframe::Renderer::Glow,
        // Dithering adds noise to every pixel: without it a badge is painted in exactly its
        // colour (what the screenshot test looks for), and the PNG compresses better.
        dithering: false,
        ..Default::default()
    };
    let app_outcome = outcome.clone();
    let result = eframe::run_native(
        "plugin-manager",
        native,
        Box::new(move |cc| Ok(Box::new(app::App::new(cc, options, app_outcome)))),
    );
    if let Err(e) = result {
        eprintln!("plugin-manager: cannot open the window: {e}");
        return ExitCode::from(1);
    }
    outcome.exit_code()
}
