//! [`CallStream`]: the items a streaming call emits, as an async `Stream`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::Stream;
use serde::de::DeserializeOwned;

use crate::backend::{BoxFuture, Consumed};
use crate::error::{CallError, Error};

/// The items a streaming call emits ([`Plugin::call_stream`](crate::Plugin::call_stream)),
/// as an async [`Stream`] of `Result<T, Error>`.
///
/// - Items arrive in the order the plugin emitted them.
/// - Backpressure: the host buffers a bounded number of items (256, or 1 MiB, per call);
///   a consumer that does not poll stops the plugin at its next `emit`, and the host's
///   memory does not grow.
/// - The stream ends with the call: `None` after the last item when the method returned
///   (its output is then in [`output`](Self::output)), or one `Err` (the method's error,
///   its crash report, `Timeout`, ...) and then `None`.
/// - Dropping the stream cancels the call: the plugin's `emit` fails with `Closed`.
///
/// The call's deadline (`timeouts.call`, or [`CallOptions::timeout`](crate::CallOptions::timeout))
/// covers the whole stream, including time the consumer spends between items.
#[must_use = "a stream does nothing unless polled; dropping it cancels the call"]
pub struct CallStream<T> {
    items: Pin<Box<async_channel::Receiver<Vec<u8>>>>,
    consumed: Arc<Consumed>,
    call: Option<BoxFuture<Result<Vec<u8>, CallError>>>,
    /// The call's outcome, once in, while buffered items remain.
    ended: Option<Result<Vec<u8>, CallError>>,
    output: Option<Vec<u8>>,
    done: bool,
    decode: fn(&[u8]) -> Result<T, String>,
    plugin: String,
    method: String,
    /// Counts the call's failure once it ends.
    on_end: Option<Box<dyn FnOnce(bool) + Send>>,
}

impl<T> CallStream<T> {
    pub(crate) fn new(
        items: async_channel::Receiver<Vec<u8>>,
        consumed: Arc<Consumed>,
        call: BoxFuture<Result<Vec<u8>, CallError>>,
        decode: fn(&[u8]) -> Result<T, String>,
        (plugin, method): (String, String),
        on_end: Box<dyn FnOnce(bool) + Send>,
    ) -> Self {
        CallStream {
            items: Box::pin(items),
            consumed,
            call: Some(call),
            ended: None,
            output: None,
            done: false,
            decode,
            plugin,
            method,
            on_end: Some(on_end),
        }
    }

    /// The method's own output (MessagePack), once the stream ended without an error.
    pub fn output_raw(&self) -> Option<&[u8]> {
        self.output.as_deref()
    }

    /// The method's own output decoded as `O`, once the stream ended without an error.
    pub fn output<O: DeserializeOwned>(&self) -> Option<Result<O, Error>> {
        let bytes = self.output.as_deref()?;
        Some(rmp_serde::from_slice(bytes).map_err(|e| {
            CallError::Decode {
                plugin: self.plugin.clone(),
                method: self.method.clone(),
                message: e.to_string(),
            }
            .into()
        }))
    }

    fn finish(&mut self, failed: bool) {
        self.done = true;
        self.items.close();
        if let Some(on_end) = self.on_end.take() {
            on_end(failed);
        }
    }

    fn item(&mut self, bytes: Vec<u8>, cx: &mut Context<'_>) -> Poll<Option<Result<T, Error>>> {
        if self.consumed.add(bytes.len()) {
            // Half the window was taken: let the call's future send the credit now, so the
            // plugin keeps producing while the consumer works through the rest.
            if let Some(call) = self.call.as_mut() {
                if let Poll::Ready(result) = call.as_mut().poll(cx) {
                    self.call = None;
                    self.ended = Some(result);
                }
            }
        }
        match (self.decode)(&bytes) {
            Ok(item) => Poll::Ready(Some(Ok(item))),
            Err(message) => {
                // A stream item that does not decode ends the stream (and the call).
                self.call = None;
                self.finish(true);
                Poll::Ready(Some(Err(CallError::Decode {
                    plugin: self.plugin.clone(),
                    method: self.method.clone(),
                    message: format!("a stream item does not decode: {message}"),
                }
                .into())))
            }
        }
    }
}

impl<T> Stream for CallStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Ok(bytes) = this.items.try_recv() {
                return this.item(bytes, cx);
            }
            // Nothing buffered: credit what was taken, then poll the call (which sends it).
            this.consumed.drained();
            if let Some(call) = this.call.as_mut() {
                if let Poll::Ready(result) = call.as_mut().poll(cx) {
                    this.call = None;
                    this.ended = Some(result);
                    // Items sent before the reply are all buffered now: drain them first.
                    continue;
                }
            }
            if let Some(ended) = this.ended.take() {
                return match ended {
                    Ok(output) => {
                        this.output = Some(output);
                        this.finish(false);
                        Poll::Ready(None)
                    }
                    Err(error) => {
                        this.finish(true);
                        Poll::Ready(Some(Err(error.into())))
                    }
                };
            }
            match this.items.as_mut().poll_next(cx) {
                Poll::Ready(Some(bytes)) => return this.item(bytes, cx),
                // The call future owns the sender; it ends with the call, which is polled
                // above.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T> Drop for CallStream<T> {
    fn drop(&mut self) {
        // Dropping `call` abandons the call (the plugin is told to cancel); closing the
        // channel makes an in-process plugin's `emit` fail with `Closed`.
        self.items.close();
        if let Some(on_end) = self.on_end.take() {
            on_end(self.call.is_some());
        }
    }
}

impl<T> std::fmt::Debug for CallStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("plugin", &self.plugin)
            .field("method", &self.method)
            .field("buffered", &self.items.len())
            .field("done", &self.done)
            .finish()
    }
}
