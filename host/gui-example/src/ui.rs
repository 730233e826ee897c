//! Drawing the window from the [`Model`]: the plugin table on top, the selected plugin's
//! details (call form, faults, enable, reload, permissions, last crash) and the event log
//! below. Drawing never touches a plugin: what the user asks for comes back as
//! [`Command`]s for the background thread.

use std::path::Path;

use eframe::egui::{self, Align2, Color32, FontId, RichText, Sense, Ui};
use plugin_host::PluginState;

use crate::backend::{CallRequest, Command};
use crate::model::{Facts, Level, Model, Row, ScenarioState, Where};
use crate::presets::FAULTS;
use crate::style;

/// The height of the bottom part (details and log), in points: the table is above it.
pub const DETAILS_HEIGHT: f32 = 400.0;

/// A badge's size, in points.
const BADGE_SIZE: [f32; 2] = [92.0, 18.0];

/// Draws the window; returns what the user asked for.
pub fn draw(ui: &mut Ui, model: &mut Model, selected: &mut Option<String>) -> Vec<Command> {
    let mut commands = Vec::new();
    egui::Panel::top("title").show(ui, |ui| title(ui, model));
    egui::Panel::bottom("details")
        .exact_size(DETAILS_HEIGHT)
        .show(ui, |ui| {
            ui.columns(2, |columns| {
                let [left, right] = columns else { return };
                // Columns are justified, which would stretch wrapped text: left-aligned.
                let layout = egui::Layout::top_down(egui::Align::Min);
                left.with_layout(layout, |ui| {
                    match selected.as_ref().and_then(|name| model.rows.get_mut(name)) {
                        Some(row) => details(ui, row, &mut commands),
                        None => {
                            ui.label("Select a plugin in the table to call it.");
                        }
                    }
                });
                right.with_layout(layout, |ui| log(ui, model));
            });
        });
    egui::CentralPanel::default().show(ui, |ui| table(ui, model, selected));
    commands
}

fn title(ui: &mut Ui, model: &Model) {
    ui.horizontal(|ui| {
        ui.heading("Plugin manager");
        let loaded = model.rows.values().filter(|r| r.facts.is_some()).count();
        let failed = model.rows.len() - loaded;
        let mut line = format!(
            "host pid {} · {loaded} plugins loaded, {failed} failed",
            std::process::id()
        );
        if !model.loaded {
            line = "loading plugins...".into();
        }
        match &model.scenario {
            ScenarioState::None => {}
            ScenarioState::Running(step) => line.push_str(&format!(" · tour: {step}")),
            ScenarioState::Passed => line.push_str(" · tour: every step passed"),
            ScenarioState::Failed(what) => line.push_str(&format!(" · tour FAILED: {what}")),
        }
        if model.backend_gone {
            line.push_str(" · the plugins' thread has ended");
        }
        ui.label(line);
    });
}

/// The table: one row a plugin (or a manifest that did not load).
fn table(ui: &mut Ui, model: &Model, selected: &mut Option<String>) {
    egui::ScrollArea::both().show(ui, |ui| {
        egui::Grid::new("plugins")
            .striped(true)
            .num_columns(10)
            .spacing([14.0, 6.0])
            .show(ui, |ui| {
                for head in [
                    "Plugin",
                    "Version",
                    "Backend",
                    "State",
                    "Calls",
                    "Failures",
                    "Crashes",
                    "Restarts",
                    "Worker pid",
                    "Last crash",
                ] {
                    ui.label(RichText::new(head).strong());
                }
                ui.end_row();
                for row in model.rows.values() {
                    let is_selected = selected.as_deref() == Some(row.name.as_str());
                    if ui.selectable_label(is_selected, &row.name).clicked() {
                        *selected = Some(row.name.clone());
                    }
                    match (&row.facts, &row.status) {
                        (Some(facts), Some(status)) => {
                            ui.label(&facts.version);
                            ui.label(facts.place.label());
                            let (text, colour) = style::badge(status.state);
                            badge(ui, text, colour);
                            for n in [
                                status.calls,
                                status.failures,
                                status.crashes,
                                status.restarts,
                            ] {
                                ui.label(n.to_string());
                            }
                            ui.label(status.pid.map_or("-".into(), |p| p.to_string()));
                            match &status.last_crash {
                                Some(report) => {
                                    ui.label(crash_summary(report))
                                        .on_hover_text(report.to_string());
                                }
                                None => {
                                    ui.label("-");
                                }
                            }
                        }
                        _ => {
                            ui.label("-");
                            ui.label("-");
                            badge(ui, "Load failed", style::LOAD_FAILED);
                            for _ in 0..5 {
                                ui.label("-");
                            }
                            let error = row.load_error.as_deref().unwrap_or("loading...");
                            ui.label(cut(first_line(error), 45)).on_hover_text(error);
                        }
                    }
                    ui.end_row();
                }
            });
    });
}

/// A coloured badge with a label.
fn badge(ui: &mut Ui, text: &str, fill: Color32) {
    let (rect, _) = ui.allocate_exact_size(BADGE_SIZE.into(), Sense::hover());
    ui.painter().rect_filled(rect, 4.0, fill);
    ui.painter().text(
        rect.center(),
        Align2::CENTER_CENTER,
        text,
        FontId::proportional(12.0),
        style::BADGE_TEXT,
    );
}

/// The selected plugin: what it runs with, its call form, its faults, enable and reload,
/// its last crash.
fn details(ui: &mut Ui, row: &mut Row, commands: &mut Vec<Command>) {
    egui::ScrollArea::vertical()
        .id_salt("details")
        .auto_shrink([false, false])
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.heading(&row.name);
                if let Some(state) = row.state() {
                    let (text, colour) = style::badge(state);
                    badge(ui, text, colour);
                }
            });
            let Some(facts) = row.facts.clone() else {
                ui.label(format!("manifest: {}", row.path.display()));
                ui.label(RichText::new(row.load_error.as_deref().unwrap_or_default()).monospace());
                return;
            };
            // The buttons first, so that they stay where they are whatever the rest shows.
            actions(ui, row, &facts, commands);
            ui.separator();
            let status = row.status.clone();
            let runs = match (facts.place, status.as_ref().and_then(|s| s.pid)) {
                (Where::Worker, Some(pid)) => format!("a sandboxed worker process, pid {pid}"),
                (Where::Worker, None) => "a sandboxed worker process (none running)".into(),
                (Where::InProcess, _) => "this process, as a native library (trusted)".into(),
                (Where::Wasm, _) => "this process, as WebAssembly in the interpreter".into(),
            };
            // Relative to the working directory where it can be: shorter.
            let library = std::env::current_dir()
                .ok()
                .and_then(|dir| facts.library.strip_prefix(dir).ok().map(Path::to_path_buf))
                .unwrap_or_else(|| facts.library.clone());
            ui.label(format!("Runs in {runs}: {}", library.display()));
            if let Some(status) = status.as_ref().filter(|s| !s.sandbox.is_empty()) {
                ui.label(format!("Sandbox: {}", status.sandbox.join(", ")));
            }
            ui.label(format!("Requested: {}", facts.requested));
            ui.label(format!("Granted: {}", facts.granted));
            ui.separator();
            // A call: method, JSON input, Call and Cancel, progress, result.
            ui.horizontal(|ui| {
                let before = row.form.method.clone();
                egui::ComboBox::from_id_salt("method")
                    .selected_text(row.form.method.as_str())
                    .width(160.0)
                    .show_ui(ui, |ui| {
                        for method in &facts.methods {
                            ui.selectable_value(&mut row.form.method, method.clone(), method);
                        }
                    });
                if row.form.method != before {
                    row.form.input =
                        crate::presets::input(&facts.base, &row.form.method).to_string();
                }
                let calling = row.calling();
                if ui
                    .add_enabled(!calling, egui::Button::new("Call"))
                    .clicked()
                {
                    commands.push(Command::Call(CallRequest {
                        plugin: row.name.clone(),
                        method: row.form.method.clone(),
                        input: row.form.input.clone(),
                        timeout: None,
                    }));
                }
                if ui
                    .add_enabled(calling, egui::Button::new("Cancel"))
                    .clicked()
                {
                    commands.push(Command::Cancel {
                        plugin: row.name.clone(),
                    });
                }
            });
            ui.add(
                egui::TextEdit::multiline(&mut row.form.input)
                    .code_editor()
                    .desired_rows(2)
                    .desired_width(f32::INFINITY),
            );
            if let Some(call) = &row.call {
                match &call.finished {
                    None => {
                        let (fraction, message) = call.progress.clone().unwrap_or_default();
                        let (bar, done) = match fraction {
                            Some(f) => (
                                egui::ProgressBar::new(f as f32),
                                format!(" {:.0}%", f * 100.0),
                            ),
                            // No report yet, or the plugin does not know how far it is.
                            None => (egui::ProgressBar::new(0.0).animate(true), String::new()),
                        };
                        let text = match message.as_str() {
                            "" => format!("{}{done}: running", call.method),
                            message => format!("{}{done}: {message}", call.method),
                        };
                        ui.add(bar.text(text));
                    }
                    Some((Ok(output), took)) => {
                        ui.label(format!("{} -> ok in {took:.1?}", call.method));
                        ui.label(RichText::new(cut(output, 400)).monospace().size(11.0));
                    }
                    Some((Err((kind, message)), took)) => {
                        ui.label(
                            RichText::new(format!("{} -> {kind} after {took:.1?}", call.method))
                                .color(log_colour(Level::Bad)),
                        );
                        ui.label(RichText::new(cut(message, 240)).monospace().size(11.0));
                    }
                }
            }
            if let Some(report) = status.as_ref().and_then(|s| s.last_crash.as_ref()) {
                ui.label(RichText::new("Last crash").strong());
                ui.label(RichText::new(report.to_string()).monospace().size(11.0));
            }
        });
}

/// Enable, Reload and, for the fault-injection plugin, its faults.
fn actions(ui: &mut Ui, row: &Row, facts: &Facts, commands: &mut Vec<Command>) {
    ui.horizontal(|ui| {
        let quarantined = row.state() == Some(PluginState::Quarantined);
        if ui
            .add_enabled(quarantined, egui::Button::new("Enable"))
            .on_hover_text("Lift the quarantine: forget the crashes, start afresh")
            .clicked()
        {
            commands.push(Command::Enable(row.name.clone()));
        }
        if ui
            .button("Reload")
            .on_hover_text("Switch to the library as it is on disk now")
            .clicked()
        {
            commands.push(Command::Reload(row.name.clone()));
        }
    });
    // The fault-injection plugin's faults.
    if FAULTS
        .iter()
        .all(|f| facts.methods.iter().any(|m| m == f.method))
    {
        ui.horizontal_wrapped(|ui| {
            ui.label("Crash it:");
            for fault in FAULTS {
                let allowed = !(fault.kills_the_process && facts.place == Where::InProcess);
                let button = ui
                    .add_enabled(allowed, egui::Button::new(fault.label))
                    .on_disabled_hover_text("in-process, this would take the app down");
                if button.clicked() {
                    commands.push(Command::Call(CallRequest {
                        plugin: row.name.clone(),
                        method: fault.method.into(),
                        input: fault.input.into(),
                        timeout: fault.timeout,
                    }));
                }
            }
        });
    }
}

/// The event log, newest at the bottom.
fn log(ui: &mut Ui, model: &Model) {
    ui.label(RichText::new("Event log").strong());
    egui::ScrollArea::vertical()
        .id_salt("log")
        .stick_to_bottom(true)
        .auto_shrink([false, false])
        .show(ui, |ui| {
            for line in &model.log {
                let who = match line.plugin.as_str() {
                    "" => String::new(),
                    plugin => format!("{plugin}: "),
                };
                let text = format!("{:>6.2}s {who}{}", line.at.as_secs_f64(), line.text);
                let label = RichText::new(&text)
                    .monospace()
                    .size(11.0)
                    .color(log_colour(line.level));
                // One line each; the whole of it on hover.
                ui.add(egui::Label::new(label).truncate())
                    .on_hover_text(text);
            }
        });
}

/// A log line's colour (none of them a badge's).
fn log_colour(level: Level) -> Color32 {
    match level {
        Level::Info => Color32::from_gray(60),
        Level::Good => Color32::from_rgb(20, 110, 45),
        Level::Warn => Color32::from_rgb(160, 95, 0),
        Level::Bad => Color32::from_rgb(175, 25, 25),
    }
}

/// A crash in a few words, for the table: how it ended, in which method.
fn crash_summary(report: &plugin_host::CrashReport) -> String {
    use plugin_host::{ExitInfo, LimitExceeded};
    let how = match (&report.limit, &report.killed_by_host, &report.exit) {
        (Some(LimitExceeded::Memory { bytes }), _, _) => {
            format!("memory limit ({} MiB)", bytes >> 20)
        }
        (Some(LimitExceeded::Cpu { limit }), _, _) => format!("CPU limit ({limit:?})"),
        (_, Some(_), _) => "killed by the host".to_string(),
        (_, _, Some(ExitInfo::Trap { kind, .. })) if report.panic.is_some() => {
            format!("panic, trap ({kind})")
        }
        (_, _, Some(ExitInfo::Trap { kind, .. })) => format!("trap ({kind})"),
        (_, _, Some(exit)) => match exit.signal_name().or(exit.exception_name()) {
            Some(name) => name.to_string(),
            None => exit.to_string(),
        },
        (_, _, None) if report.panic.is_some() => "panic".to_string(),
        (_, _, None) => "crashed".to_string(),
    };
    match report.in_flight.first() {
        Some(method) => format!("{how} in `{method}`"),
        None => how,
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// At most `max` characters of `text`.
fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}
