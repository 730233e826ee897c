//! [`CancelHandle`]: cancel a call from another task or thread without dropping its future.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_listener::Event;

#[derive(Default)]
struct Shared {
    cancelled: AtomicBool,
    event: Event,
}

/// Cancels the calls it was given to ([`CallOptions::cancel`](crate::CallOptions::cancel))
/// from anywhere: another task, another thread, a UI button. Cheap to clone; clones
/// cancel the same calls.
///
/// A cancelled call returns [`CallError::Cancelled`](crate::CallError::Cancelled) at
/// once. The plugin sees `is_cancelled()` turn true and has `timeouts.cancel_grace` to
/// stop; an untrusted plugin's worker still running the call after that is killed and
/// restarted (the other calls on it fail as `Killed`), a trusted plugin's thread runs on
/// until the plugin returns (it cannot be stopped). A handle cancelled before the call
/// starts makes the call fail at once without reaching the plugin.
///
/// ```no_run
/// # async fn demo(plugin: plugin_host::Plugin) {
/// use plugin_host::{CallOptions, CancelHandle};
/// let handle = CancelHandle::new();
/// let canceller = handle.clone();
/// std::thread::spawn(move || {
///     std::thread::sleep(std::time::Duration::from_millis(100));
///     canceller.cancel();
/// });
/// let result = plugin
///     .call_raw_with("slow", b"".to_vec(), CallOptions::new().cancel(&handle))
///     .await;
/// assert!(matches!(
///     result.as_ref().map_err(|e| e.as_call()),
///     Err(Some(plugin_host::CallError::Cancelled { .. }))
/// ));
/// # }
/// ```
#[derive(Clone, Default)]
pub struct CancelHandle {
    shared: Arc<Shared>,
}

impl CancelHandle {
    /// A handle that has not been cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels every call made with this handle (running or future). Idempotent.
    pub fn cancel(&self) {
        self.shared.cancelled.store(true, Ordering::Release);
        self.shared.event.notify(usize::MAX);
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.shared.cancelled.load(Ordering::Acquire)
    }

    /// Resolves once the handle is cancelled.
    pub(crate) async fn cancelled(&self) {
        loop {
            if self.is_cancelled() {
                return;
            }
            let listener = self.shared.event.listen();
            if self.is_cancelled() {
                return;
            }
            listener.await;
        }
    }
}

impl std::fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CancelHandle")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// Resolves when `handle` (if any) is cancelled; never otherwise.
pub(crate) async fn cancelled(handle: Option<&CancelHandle>) {
    match handle {
        Some(h) => h.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Resolves when `a` is cancelled, or `b` (if any) is.
pub(crate) async fn either(a: &CancelHandle, b: Option<&CancelHandle>) {
    futures_lite::future::or(a.cancelled(), cancelled(b)).await
}
