//! The state badges' colours. Each is used for its badge only, so a screenshot can be
//! checked by looking for them (`tests/screenshot.rs`).

use eframe::egui::Color32;
use plugin_host::PluginState;

/// `Ready`: the plugin serves calls.
pub const READY: Color32 = Color32::from_rgb(34, 153, 84);
/// `Restarting` (a crash, a fresh worker after the backoff) and `Starting`.
pub const RESTARTING: Color32 = Color32::from_rgb(230, 126, 34);
/// `Quarantined`: too many crashes; calls fail until the plugin is enabled.
pub const QUARANTINED: Color32 = Color32::from_rgb(203, 42, 42);
/// `Stopped` and `Idle`: no worker running.
pub const STOPPED: Color32 = Color32::from_rgb(127, 140, 141);
/// A manifest that did not load (no plugin, only its error).
pub const LOAD_FAILED: Color32 = Color32::from_rgb(125, 60, 152);

/// The text on the badges.
pub const BADGE_TEXT: Color32 = Color32::WHITE;

/// A state's badge: its label and colour.
pub fn badge(state: PluginState) -> (&'static str, Color32) {
    match state {
        PluginState::Ready => ("Ready", READY),
        PluginState::Starting => ("Starting", RESTARTING),
        PluginState::Restarting => ("Restarting", RESTARTING),
        PluginState::Quarantined => ("Quarantined", QUARANTINED),
        PluginState::Idle => ("Idle", STOPPED),
        PluginState::Stopped => ("Stopped", STOPPED),
    }
}
