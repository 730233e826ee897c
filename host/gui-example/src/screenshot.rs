//! `--screenshot PATH`: once the scenario has passed and the window shows its end (the
//! table has `faulty` quarantined), the app takes a screenshot of itself, saves it as PNG
//! and closes; the exit code says whether everything went as expected ([`Outcome`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eframe::egui::{self, ColorImage, ViewportCommand};
use plugin_host::PluginState;

use crate::model::{Model, ScenarioState};

/// The whole run, scenario and screenshot, must end within this (the scenario itself is
/// bounded at 60 s; this catches a stuck window or thread).
const LIMIT: Duration = Duration::from_secs(90);

/// Frames painted with the final state before the screenshot: a grid sizes its columns
/// from the frame before, so the first frame with new contents may be laid out short.
const SETTLE_FRAMES: u32 = 3;

/// How the run ended: `None` while it runs (and when the window was closed by hand),
/// `Some(Err(what))` when something did not behave.
#[derive(Clone, Default)]
pub struct Outcome(Arc<Mutex<Option<Result<(), String>>>>);

impl Outcome {
    /// Records the end (the first one recorded wins).
    pub fn set(&self, result: Result<(), String>) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(result);
        }
    }

    /// Whether it has ended.
    fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// The process's exit code: 1 (and what went wrong, on stderr) if something failed.
    pub fn exit_code(&self) -> ExitCode {
        match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(Err(what)) => {
                eprintln!("plugin-manager: {what}");
                ExitCode::from(1)
            }
            _ => ExitCode::SUCCESS,
        }
    }
}

/// Where the screenshot is.
enum Phase {
    /// The scenario runs.
    Scenario,
    /// It passed; frames are painted with the final state.
    Settling(u32),
    /// Requested; the image is on its way to the callback.
    Requested,
    /// Saved, or failed: close the window.
    Closing,
}

/// Takes the screenshot when the time comes.
pub struct Screenshot {
    path: PathBuf,
    phase: Phase,
    started: Instant,
    outcome: Outcome,
}

impl Screenshot {
    /// A screenshot to save at `path`; the run's end goes to `outcome`.
    pub fn new(path: PathBuf, outcome: Outcome) -> Screenshot {
        Screenshot {
            path,
            phase: Phase::Scenario,
            started: Instant::now(),
            outcome,
        }
    }

    /// The plugin to select, so that the screenshot shows its details: the one the tour
    /// quarantines.
    pub const SELECT: &'static str = "faulty";

    /// Called once a frame, after the window is drawn.
    pub fn frame(&mut self, ctx: &egui::Context, model: &Model) {
        if self.outcome.is_set() {
            self.phase = Phase::Closing;
        } else if self.started.elapsed() > LIMIT {
            self.outcome.set(Err(format!(
                "the scenario and the screenshot did not finish within {LIMIT:?}"
            )));
            self.phase = Phase::Closing;
        } else if model.backend_gone {
            self.outcome
                .set(Err("the plugins' thread ended before the scenario".into()));
            self.phase = Phase::Closing;
        }
        match self.phase {
            Phase::Scenario => match &model.scenario {
                ScenarioState::Passed if shows_the_end(model) => {
                    self.phase = Phase::Settling(0);
                    ctx.request_repaint();
                }
                ScenarioState::Failed(what) => {
                    self.outcome
                        .set(Err(format!("the scenario failed: {what}")));
                    self.phase = Phase::Closing;
                    ctx.request_repaint();
                }
                // Wake up now and then to notice the time limit.
                _ => ctx.request_repaint_after(Duration::from_millis(500)),
            },
            Phase::Settling(n) if n < SETTLE_FRAMES => {
                self.phase = Phase::Settling(n + 1);
                ctx.request_repaint();
            }
            Phase::Settling(_) => {
                let path = self.path.clone();
                let outcome = self.outcome.clone();
                let waker = ctx.clone();
                // The image arrives after this frame is painted, on this thread.
                ctx.request_screenshot(move |image| {
                    outcome.set(save(&image, &path));
                    waker.request_repaint();
                });
                self.phase = Phase::Requested;
            }
            Phase::Requested => ctx.request_repaint_after(Duration::from_millis(500)),
            Phase::Closing => ctx.send_viewport_cmd(ViewportCommand::Close),
        }
    }
}

/// Whether the table shows the end of the tour: `faulty` quarantined, no call running.
fn shows_the_end(model: &Model) -> bool {
    let quarantined = model
        .rows
        .get(Screenshot::SELECT)
        .is_some_and(|row| row.state() == Some(PluginState::Quarantined));
    quarantined && !model.rows.values().any(|row| row.calling())
}

/// Saves `image` as an RGB PNG (the window is opaque: no alpha channel to store).
fn save(image: &ColorImage, path: &Path) -> Result<(), String> {
    let [width, height] = image.size;
    let mut rgb = Vec::with_capacity(width * height * 3);
    for pixel in &image.pixels {
        rgb.extend_from_slice(&pixel.to_array()[..3]);
    }
    let failed = |e: &dyn std::fmt::Display| format!("cannot save {}: {e}", path.display());
    let file = std::fs::File::create(path).map_err(|e| failed(&e))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::High);
    let mut writer = encoder.write_header().map_err(|e| failed(&e))?;
    writer.write_image_data(&rgb).map_err(|e| failed(&e))?;
    writer.finish().map_err(|e| failed(&e))?;
    println!("screenshot: {} ({width}x{height})", path.display());
    Ok(())
}
