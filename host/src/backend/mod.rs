//! Where a plugin runs. Both backends implement [`Backend`]; the manifest's `trust` alone
//! picks one, and the public API ([`crate::Plugin`]) is the same for both.

pub(crate) mod in_process;
#[cfg(unix)]
pub(crate) mod isolated;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use plugin_api::abi::status;

use crate::error::CallError;
use crate::plugin::Progress;

/// A boxed `Send` future, as backends return them.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A progress callback.
pub(crate) type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// One call as a backend receives it.
pub(crate) struct CallRequest {
    /// Unique per plugin; the wire id for isolated plugins.
    pub id: u64,
    pub method: String,
    pub input: Vec<u8>,
    pub progress: Option<ProgressFn>,
    /// Set by the caller's side when it gives up on the call (deadline passed).
    pub cancelled: Arc<AtomicBool>,
}

/// A running plugin.
pub(crate) trait Backend: Send + Sync {
    /// Runs one call; the future resolves with the plugin's output bytes.
    fn call(&self, call: CallRequest) -> BoxFuture<Result<Vec<u8>, CallError>>;
    /// Tells the plugin that the caller gave up on call `id` (its deadline passed).
    fn cancel(&self, id: u64) -> BoxFuture<()>;
    /// The worker process id, for isolated plugins with a live worker.
    fn pid(&self) -> Option<u32> {
        None
    }
    /// Lets calls in flight finish for up to `grace`, then stops the plugin.
    fn shutdown(&self, grace: Duration) -> BoxFuture<()>;
}

/// Turns an ABI status code and its bytes into the call's outcome.
pub(crate) fn outcome(
    plugin: &str,
    method: &str,
    methods: &[String],
    code: i32,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, CallError> {
    let text = || String::from_utf8_lossy(&bytes).into_owned();
    let (plugin, method) = (plugin.to_string(), method.to_string());
    match code {
        status::OK => Ok(bytes),
        status::ERROR => Err(CallError::Plugin {
            plugin,
            method,
            message: text(),
        }),
        status::PANIC => Err(CallError::Panicked {
            plugin,
            method,
            message: text(),
        }),
        status::UNKNOWN_METHOD => Err(CallError::UnknownMethod {
            plugin,
            method,
            available: methods.to_vec(),
        }),
        status::BAD_INPUT => Err(CallError::BadInput {
            plugin,
            method,
            message: text(),
        }),
        status::BAD_OUTPUT => Err(CallError::BadOutput {
            plugin,
            method,
            message: text(),
        }),
        other => Err(CallError::BadOutput {
            plugin,
            method,
            message: format!("unknown status code {other}: {}", text()),
        }),
    }
}
