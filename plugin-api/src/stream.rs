//! Output streams seen from the plugin: [`Context::emit`] and its error.

use std::fmt;

use crate::abi::emit_status;
use crate::Context;

/// Why [`Context::emit`] failed. Converts into [`PluginError`](crate::PluginError), so
/// `?` ends the method when the consumer is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmitError {
    kind: EmitErrorKind,
    message: String,
}

/// What kind of failure an [`EmitError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmitErrorKind {
    /// The consumer is gone: the stream was dropped or the call cancelled. Stop.
    Closed,
    /// The caller did not ask for a stream (it used `call`, not `call_stream`).
    NotStream,
    /// Streams are not available here: during `create`, or the host is too old.
    Unsupported,
    /// The item is larger than the host accepts in one frame.
    TooLarge,
    /// The item could not be encoded as MessagePack.
    Encode,
}

impl EmitError {
    /// What kind of failure this is.
    pub fn kind(&self) -> EmitErrorKind {
        self.kind
    }

    /// A message saying what happened.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for EmitError {}

impl<'a> Context<'a> {
    /// Sends one item of this call's output stream to the caller, encoded as MessagePack.
    ///
    /// Blocks while the consumer is behind: the host buffers a bounded number of items,
    /// so a slow consumer slows the plugin instead of growing memory. Returns
    /// [`EmitErrorKind::Closed`] once the consumer is gone; return from the method then.
    ///
    /// ```no_run
    /// # use plugin_api::{Context, PluginError};
    /// # fn method(ctx: &Context<'_>) -> Result<u64, PluginError> {
    /// for i in 0..1000u64 {
    ///     ctx.emit(&i)?;
    /// }
    /// Ok(1000)
    /// # }
    /// ```
    pub fn emit<T: serde::Serialize + ?Sized>(&self, item: &T) -> Result<(), EmitError> {
        let bytes = rmp_serde::to_vec_named(item).map_err(|e| EmitError {
            kind: EmitErrorKind::Encode,
            message: format!("cannot encode a stream item: {e}"),
        })?;
        self.emit_raw(&bytes)
    }

    /// [`emit`](Self::emit) with raw bytes (no encoding).
    pub fn emit_raw(&self, item: &[u8]) -> Result<(), EmitError> {
        // SAFETY: the host guarantees the function pointer and its data are valid while
        // this context exists; the item describes a live slice.
        let status = unsafe { (self.host.emit)(self.host.data, item.as_ptr(), item.len()) };
        let (kind, message) = match status {
            emit_status::OK => return Ok(()),
            emit_status::CLOSED => (
                EmitErrorKind::Closed,
                "the stream's consumer is gone (dropped or cancelled)".to_string(),
            ),
            emit_status::NOT_STREAM => (
                EmitErrorKind::NotStream,
                "this call is not a stream: the caller used `call`, not `call_stream`".to_string(),
            ),
            emit_status::LIMIT => (
                EmitErrorKind::TooLarge,
                format!(
                    "a stream item of {} bytes is larger than the host accepts",
                    item.len()
                ),
            ),
            emit_status::UNSUPPORTED => (
                EmitErrorKind::Unsupported,
                "streams are not available here (during create, or the host is too old)"
                    .to_string(),
            ),
            other => (
                EmitErrorKind::Closed,
                format!("the host refused the stream item (status {other})"),
            ),
        };
        Err(EmitError { kind, message })
    }
}
