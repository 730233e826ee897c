//! The eframe application: starts the background thread, applies its updates to the
//! [`Model`] each frame, draws ([`crate::ui`]) and hands the user's commands back; with
//! `--screenshot`, drives the screenshot.

use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

use eframe::egui;

use crate::backend::{BackendHandle, Update};
use crate::model::{Model, ScenarioState};
use crate::screenshot::{Outcome, Screenshot};
use crate::Options;

/// The application: what the window shows, and the channel ends to the background thread.
pub struct App {
    model: Model,
    updates: mpsc::Receiver<Update>,
    backend: BackendHandle,
    selected: Option<String>,
    screenshot: Option<Screenshot>,
}

impl App {
    /// Starts the background thread (it loads the plugins, and runs the scenario if one
    /// was asked for). `outcome` receives the end of a `--screenshot` run.
    pub fn new(cc: &eframe::CreationContext<'_>, options: Options, outcome: Outcome) -> App {
        cc.egui_ctx.set_theme(egui::Theme::Light);
        if options.screenshot.is_some() {
            // The pointer rests somewhere on the window (under Xvfb, in the middle of the
            // screen): no tooltip in the screenshot.
            cc.egui_ctx
                .all_styles_mut(|style| style.interaction.tooltip_delay = f32::INFINITY);
        }
        let screenshot = options
            .screenshot
            .clone()
            .map(|path| Screenshot::new(path, outcome));
        let (backend, updates) = BackendHandle::start(options, cc.egui_ctx.clone(), Instant::now());
        App {
            model: Model::default(),
            updates,
            backend,
            selected: None,
            screenshot,
        }
    }

    /// Applies every update waiting (they woke this frame up).
    fn drain(&mut self) {
        loop {
            match self.updates.try_recv() {
                Ok(update) => self.model.apply(update),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.model.backend_gone = true;
                    break;
                }
            }
        }
    }
}

impl eframe::App for App {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.drain();
        if self.selected.is_none() && self.model.scenario == ScenarioState::Passed {
            // The screenshot shows the plugin the tour quarantined.
            self.selected = Some(Screenshot::SELECT.to_string());
        }
        for command in crate::ui::draw(ui, &mut self.model, &mut self.selected) {
            self.backend.send(command);
        }
        if let Some(screenshot) = &mut self.screenshot {
            screenshot.frame(ui.ctx(), &self.model);
        }
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        // Shut the plugins down (their workers exit); a plugin that hangs does not keep
        // the window from closing for long.
        self.backend.quit(Duration::from_secs(4));
    }
}
