//! Host functions seen from the plugin: [`Context::host_call`] and its error.

use std::fmt;

use crate::abi::{host_status, Buffer};
use crate::Context;

/// Why a [`Context::host_call`] failed. Its message comes from the host and says what to
/// do next (for example "add it to the manifest's `imports`").
///
/// Converts into [`PluginError`](crate::PluginError), so `?` works in a method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCallError {
    kind: HostCallErrorKind,
    function: String,
    message: String,
}

/// What kind of failure a [`HostCallError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostCallErrorKind {
    /// The host function ran and returned an error.
    Failed,
    /// The host function panicked; the host caught it and goes on.
    Panicked,
    /// No host function has that name.
    NotFound,
    /// The plugin's manifest does not list the function in `imports`.
    NotImported,
    /// The function exists, but the app did not grant it to this plugin.
    NotGranted,
    /// The host function could not decode the input it was given.
    BadInput,
    /// The call that made the host call was cancelled (deadline, caller gone, host
    /// shutting down). Return from the method.
    Cancelled,
    /// Host functions are not available here: during `create`, or the host is too old.
    Unsupported,
    /// A limit was hit: input larger than a frame, or too many host calls at once.
    Limit,
    /// The input could not be encoded as MessagePack (typed calls only).
    Encode,
    /// The host function's output did not decode into the requested type (typed calls
    /// only).
    Decode,
}

impl HostCallError {
    pub(crate) fn new(kind: HostCallErrorKind, function: &str, message: impl fmt::Display) -> Self {
        HostCallError {
            kind,
            function: function.to_string(),
            message: message.to_string(),
        }
    }

    fn from_status(status: i32, function: &str, message: String) -> Self {
        use HostCallErrorKind as K;
        let kind = match status {
            host_status::ERROR => K::Failed,
            host_status::PANIC => K::Panicked,
            host_status::NOT_FOUND => K::NotFound,
            host_status::BAD_INPUT => K::BadInput,
            host_status::NOT_IMPORTED => K::NotImported,
            host_status::NOT_GRANTED => K::NotGranted,
            host_status::CANCELLED => K::Cancelled,
            host_status::UNSUPPORTED => K::Unsupported,
            host_status::LIMIT => K::Limit,
            _ => K::Failed,
        };
        let message = if message.is_empty() {
            format!("host function `{function}` failed with status {status}")
        } else {
            message
        };
        HostCallError::new(kind, function, message)
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> HostCallErrorKind {
        self.kind
    }

    /// The host function's name.
    pub fn function(&self) -> &str {
        &self.function
    }

    /// The message (from the host function's error, or the host's explanation).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HostCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HostCallError {}

/// A buffer the host wrote, given back through `free_host_buffer` on drop.
struct HostBuffer<'a> {
    context: &'a Context<'a>,
    buffer: Buffer,
}

impl HostBuffer<'_> {
    fn bytes(&self) -> &[u8] {
        if self.buffer.ptr.is_null() || self.buffer.len == 0 {
            return &[];
        }
        // SAFETY: a non-null buffer from the host holds `len` initialised bytes until it is
        // given back in `drop`.
        unsafe { std::slice::from_raw_parts(self.buffer.ptr, self.buffer.len) }
    }
}

impl Drop for HostBuffer<'_> {
    fn drop(&mut self) {
        if !self.buffer.ptr.is_null() {
            let buffer = std::mem::replace(&mut self.buffer, Buffer::EMPTY);
            // SAFETY: the buffer came from this host's `call_host` and is freed once.
            unsafe { (self.context.host.free_host_buffer)(buffer) }
        }
    }
}

impl<'a> Context<'a> {
    /// Calls the host function `name` with `input` encoded as MessagePack, blocks until
    /// it answers, and decodes its output as `O`.
    ///
    /// The function must be listed in the manifest's `imports` and granted by the app.
    /// It runs in the host, tied to this call: if this call is cancelled or its deadline
    /// passes, the host function is cancelled too and this returns
    /// [`HostCallErrorKind::Cancelled`].
    ///
    /// ```no_run
    /// # use plugin_api::{Context, PluginError};
    /// # fn method(ctx: &Context<'_>) -> Result<String, PluginError> {
    /// #[derive(serde::Serialize)]
    /// struct Query { id: u32 }
    /// let title: String = ctx.host_call("doc.title", &Query { id: 7 })?;
    /// # Ok(title) }
    /// ```
    pub fn host_call<I, O>(&self, name: &str, input: &I) -> Result<O, HostCallError>
    where
        I: serde::Serialize + ?Sized,
        O: serde::de::DeserializeOwned,
    {
        let input = rmp_serde::to_vec_named(input).map_err(|e| {
            HostCallError::new(
                HostCallErrorKind::Encode,
                name,
                format!("cannot encode the input for host function `{name}`: {e}"),
            )
        })?;
        let output = self.host_call_raw(name, &input)?;
        rmp_serde::from_slice(&output).map_err(|e| {
            HostCallError::new(
                HostCallErrorKind::Decode,
                name,
                format!("the output of host function `{name}` does not decode: {e}"),
            )
        })
    }

    /// [`host_call`](Self::host_call) with raw bytes on both sides (no encoding).
    pub fn host_call_raw(&self, name: &str, input: &[u8]) -> Result<Vec<u8>, HostCallError> {
        let mut output = HostBuffer {
            context: self,
            buffer: Buffer::EMPTY,
        };
        // SAFETY: the host guarantees the function pointer and its data are valid while
        // this context exists (ABI 1.1 hosts, the only ones that load this library); the
        // name and input describe live slices and `output` is writable.
        let status = unsafe {
            (self.host.call_host)(
                self.host.data,
                name.as_ptr(),
                name.len(),
                input.as_ptr(),
                input.len(),
                &mut output.buffer,
            )
        };
        let bytes = output.bytes();
        if status == host_status::OK {
            return Ok(bytes.to_vec());
        }
        let message = String::from_utf8_lossy(bytes).into_owned();
        Err(HostCallError::from_status(status, name, message))
    }
}
