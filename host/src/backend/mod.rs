//! Where a plugin runs. Both backends implement [`Backend`]; the manifest's `trust` alone
//! picks one, and the public API ([`crate::Plugin`]) is the same for both.

pub(crate) mod in_process;
#[cfg(any(unix, windows))]
pub(crate) mod isolated;
#[cfg(feature = "wasm")]
pub(crate) mod wasm;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use plugin_api::abi::status;

use crate::cancel::CancelHandle;
use crate::crash::CrashReport;
use crate::error::{CallError, LoadError};
use crate::loader::Descriptor;
use crate::plugin::Progress;
use crate::status::{InstanceStatus, PluginEvent, PluginState};

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
    /// At this point the caller gets `Timeout` and the plugin is told to cancel.
    pub deadline: Duration,
    /// Cancels the call from elsewhere: the caller gets `Cancelled`, the plugin is told.
    pub cancel: Option<CancelHandle>,
    /// Where a streaming call's items go (`None`: not a stream).
    pub stream: Option<StreamSink>,
}

/// How many stream items the host buffers per streaming call before the plugin waits.
pub(crate) const STREAM_WINDOW: u32 = 256;
/// How many bytes of stream items the host buffers per streaming call before the plugin
/// waits (one larger item passes when no other is buffered).
pub(crate) const STREAM_WINDOW_BYTES: u64 = 1 << 20;

/// The receiving end of a streaming call, as a backend sees it.
pub(crate) struct StreamSink {
    /// Items for the consumer; bounded to [`STREAM_WINDOW`].
    pub items: async_channel::Sender<Vec<u8>>,
    /// What the consumer has taken (the isolated backend turns it into credit).
    pub consumed: Arc<Consumed>,
}

/// Items and bytes the consumer took since the backend last looked.
#[derive(Default)]
pub(crate) struct Consumed {
    /// Items and bytes taken since the last credit, and whether the buffer was drained.
    counts: std::sync::Mutex<(u32, u64, bool)>,
    event: event_listener::Event,
}

impl Consumed {
    /// The consumer took one item of `bytes` bytes. Returns whether credit is due (the
    /// call's future should be polled to send it).
    pub fn add(&self, bytes: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.0 = counts.0.saturating_add(1);
        counts.1 = counts.1.saturating_add(bytes as u64);
        let (items, bytes, _) = *counts;
        drop(counts);
        let due = items >= STREAM_WINDOW / 2 || bytes >= STREAM_WINDOW_BYTES / 2;
        if due {
            self.event.notify(1);
        }
        due
    }

    /// The consumer took everything buffered: credit whatever it took, even less than
    /// half a window (the plugin may be waiting to send an item larger than what is
    /// left of the window). Returns whether credit is due.
    pub fn drained(&self) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.0 == 0 || counts.2 {
            return false;
        }
        counts.2 = true;
        drop(counts);
        self.event.notify(1);
        true
    }

    /// Waits until the consumer took half a window (items or bytes) or drained the
    /// buffer, then returns the counts and resets them.
    pub async fn take(&self) -> (u32, u64) {
        loop {
            let listener = self.event.listen();
            {
                let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                let half = counts.0 >= STREAM_WINDOW / 2 || counts.1 >= STREAM_WINDOW_BYTES / 2;
                if half || (counts.2 && counts.0 > 0) {
                    let (items, bytes, _) = std::mem::take(&mut *counts);
                    return (items, bytes);
                }
            }
            listener.await;
        }
    }
}

/// What a backend reports for [`crate::Status`].
pub(crate) struct BackendStatus {
    pub state: PluginState,
    pub crashes: u64,
    pub restarts: u64,
    pub uptime: Option<Duration>,
    pub pid: Option<u32>,
    pub last_crash: Option<Arc<CrashReport>>,
    pub sandbox: Vec<String>,
    pub sandbox_missing: Vec<String>,
    pub instances: Vec<InstanceStatus>,
}

/// A running plugin.
pub(crate) trait Backend: Send + Sync {
    /// Runs one call; the future resolves with the plugin's output bytes, or `Timeout`
    /// at the deadline.
    fn call(&self, call: CallRequest) -> BoxFuture<Result<Vec<u8>, CallError>>;
    /// Lets calls in flight finish for up to `grace`, then stops the plugin.
    fn shutdown(&self, grace: Duration) -> BoxFuture<()>;
    /// State and counters.
    fn status(&self) -> BackendStatus;
    /// Lifecycle events from now on.
    fn subscribe(&self) -> async_channel::Receiver<PluginEvent>;
    /// Lifts a quarantine and starts fresh workers; `false` if it was not quarantined.
    fn enable(&self) -> BoxFuture<bool>;
    /// Switches to the library as it is on disk now, without losing a call; the new
    /// library's descriptor.
    fn reload(&self) -> BoxFuture<Result<Descriptor, LoadError>>;
}

/// The error for a call whose deadline passed.
pub(crate) fn timeout(plugin: &str, method: &str, after: Duration) -> CallError {
    CallError::Timeout {
        plugin: plugin.to_string(),
        method: method.to_string(),
        after,
    }
}

/// Polls every future to completion, concurrently on this task.
pub(crate) async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *output = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

/// Cancels the call (its `is_cancelled` flag, its host calls, its stream) when the call's
/// future ends before the plugin returned (dropped, timed out or cancelled).
struct CancelOnDrop {
    flag: CancelHandle,
    /// Cleared once the plugin returned: nothing left to tell it.
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.flag.cancel();
        }
    }
}

/// Runs `work` (a call running in the host process) until it answers, its deadline passes
/// (`Timeout`) or `cancel` fires (`Cancelled`). However the returned future ends before
/// `work` answered (those two, or dropped), `flag` is cancelled, which the plugin sees
/// through `is_cancelled`.
pub(crate) async fn until_deadline(
    name: std::sync::Arc<str>,
    method: String,
    deadline: Duration,
    cancel: Option<CancelHandle>,
    flag: CancelHandle,
    work: impl Future<Output = Result<Vec<u8>, CallError>>,
) -> Result<Vec<u8>, CallError> {
    let mut guard = CancelOnDrop { flag, armed: true };
    let stop = async {
        futures_lite::future::or(
            async {
                smol::Timer::after(deadline).await;
                timeout(&name, &method, deadline)
            },
            async {
                crate::cancel::cancelled(cancel.as_ref()).await;
                cancelled(&name, &method)
            },
        )
        .await
    };
    let result =
        futures_lite::future::or(async { Ok(work.await) }, async { Err(stop.await) }).await;
    match result {
        Ok(result) => {
            guard.armed = false;
            result
        }
        Err(error) => Err(error),
    }
}

/// Hands a stream item to the consumer from a thread of the `blocking` pool (a plugin
/// running in the host process): an `emit_status`. Waits while the consumer is behind: the
/// channel holds at most [`STREAM_WINDOW`] items, and `outstanding` (the call's bytes the
/// consumer has not taken) at most [`STREAM_WINDOW_BYTES`] beyond one item. Gives up
/// (`CLOSED`) when `cancel`, or `halt` if any, is cancelled.
pub(crate) fn emit_blocking(
    stream: Option<&StreamSink>,
    item: Vec<u8>,
    outstanding: &std::sync::atomic::AtomicU64,
    cancel: &CancelHandle,
    halt: Option<&CancelHandle>,
) -> i32 {
    use plugin_api::abi::emit_status;
    use std::sync::atomic::Ordering;
    let Some(stream) = stream else {
        return emit_status::NOT_STREAM;
    };
    let size = item.len() as u64;
    let sent = futures_lite::future::block_on(futures_lite::future::or(
        async {
            loop {
                let buffered = outstanding.load(Ordering::Acquire);
                if buffered == 0 || buffered.saturating_add(size) <= STREAM_WINDOW_BYTES {
                    break;
                }
                let (_, taken) = stream.consumed.take().await;
                outstanding.fetch_sub(taken.min(buffered), Ordering::AcqRel);
            }
            let sent = stream.items.send(item).await.is_ok();
            if sent {
                outstanding.fetch_add(size, Ordering::AcqRel);
            }
            sent
        },
        async {
            crate::cancel::either(cancel, halt).await;
            false
        },
    ));
    match sent && !cancel.is_cancelled() {
        true => emit_status::OK,
        false => emit_status::CLOSED,
    }
}

/// The error for a call its caller cancelled.
pub(crate) fn cancelled(plugin: &str, method: &str) -> CallError {
    CallError::Cancelled {
        plugin: plugin.to_string(),
        method: method.to_string(),
    }
}

/// Turns an ABI status code and its bytes into the call's outcome.
pub(crate) fn outcome(
    plugin: &str,
    method: &str,
    methods: &[String],
    code: i32,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, CallError> {
    if code == status::OK {
        return Ok(bytes);
    }
    let text = || String::from_utf8_lossy(&bytes).into_owned();
    let (plugin, method) = (plugin.to_string(), method.to_string());
    match code {
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
