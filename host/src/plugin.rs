//! The handle an application holds for a loaded plugin: calls (typed, raw, blocking),
//! per-call options (deadline, progress), introspection and shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{Backend, CallRequest, Consumed, ProgressFn, StreamSink, STREAM_WINDOW};
use crate::cancel::CancelHandle;
use crate::error::{CallError, Error};
use crate::loader::Descriptor;
use crate::manifest::{Manifest, Trust};
use crate::permissions::{Grant, PermissionRequest};
use crate::status::{EventReceiver, PluginState, Status};
use crate::stream::CallStream;

/// What a loaded plugin says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginInfo {
    /// The name from the manifest (the one used in logs and errors).
    pub name: String,
    /// The name the library itself declares.
    pub library_name: String,
    /// The version the library declares.
    pub version: String,
    /// The plugin ABI (major, minor) the library was built against.
    pub abi: (u16, u16),
    /// The methods it exposes, in declaration order.
    pub methods: Vec<String>,
    /// What its manifest asks for (trust, sandbox mode, permissions, and their digest).
    pub requested: Option<PermissionRequest>,
    /// What it got: the intersection of the request and the app's grant.
    pub granted: Grant,
}

impl PluginInfo {
    pub(crate) fn new(manifest_name: &str, desc: &Descriptor) -> PluginInfo {
        PluginInfo {
            name: manifest_name.to_string(),
            library_name: desc.name.clone(),
            version: desc.version.clone(),
            abi: desc.abi,
            methods: desc.methods.clone(),
            requested: None,
            granted: Grant::deny_all(),
        }
    }
}

/// A progress report from a running call.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Fraction done in `0.0..=1.0`, or `None` when the plugin does not know the total.
    pub fraction: Option<f64>,
    /// What the plugin is doing (may be empty).
    pub message: String,
}

impl Progress {
    pub(crate) fn new(fraction: f64, message: &str) -> Progress {
        let fraction = (fraction.is_finite() && fraction >= 0.0).then(|| fraction.min(1.0));
        Progress {
            fraction,
            message: crate::loader::escape_text(message),
        }
    }
}

/// Options for one call: a deadline other than the manifest's, a progress callback, a
/// cancellation handle.
#[derive(Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    progress: Option<ProgressFn>,
    cancel: Option<CancelHandle>,
}

impl CallOptions {
    /// Default options: the manifest's deadline, progress reports dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Overrides the manifest's `timeouts.call` for this call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Receives the plugin's progress reports for this call. Runs on whichever thread the
    /// report arrives on; keep it short.
    pub fn on_progress(mut self, f: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Lets `handle` cancel this call from another task or thread, without dropping the
    /// call's future: see [`CancelHandle`].
    pub fn cancel(mut self, handle: &CancelHandle) -> Self {
        self.cancel = Some(handle.clone());
        self
    }
}

impl std::fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallOptions")
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .field("cancel", &self.cancel)
            .finish()
    }
}

struct Inner {
    manifest: Manifest,
    name: String,
    /// The library file it runs (resolved, absolute when it could be).
    library: PathBuf,
    /// Replaced by a reload.
    info: RwLock<Arc<PluginInfo>>,
    /// The library file as it was when the running version was loaded (for the watcher).
    stamp: std::sync::Mutex<Option<crate::watch::Stamp>>,
    backend: Box<dyn Backend>,
    /// What the app's policy granted (fixed at load; a reload keeps it).
    grant: Grant,
    stopped: AtomicBool,
    next_id: AtomicU64,
    calls: AtomicU64,
    failures: AtomicU64,
}

/// A loaded plugin. Cheap to clone: clones share the same plugin instance (or worker), and
/// it stops when the last clone is dropped.
///
/// Futures returned by its methods work under any executor (smol, tokio, or
/// `futures_lite::future::block_on`); the `*_blocking` methods need none.
#[derive(Clone)]
pub struct Plugin {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.inner.name)
            .field("version", &self.info().version)
            .field("trust", &self.trust())
            .finish()
    }
}

impl Plugin {
    pub(crate) fn new(
        manifest: Manifest,
        library: PathBuf,
        mut info: PluginInfo,
        grant: Grant,
        backend: Box<dyn Backend>,
    ) -> Plugin {
        info.requested = Some(PermissionRequest::from_manifest(&manifest));
        info.granted = grant.clone();
        let stamp = crate::watch::stamp(&library);
        Plugin {
            inner: Arc::new(Inner {
                name: info.name.clone(),
                manifest,
                library,
                info: RwLock::new(Arc::new(info)),
                stamp: std::sync::Mutex::new(stamp),
                backend,
                grant,
                stopped: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                calls: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// The plugin's name (from its manifest).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The version the library declares (the new library's after a [`reload`](Self::reload)).
    pub fn version(&self) -> String {
        self.info().version.clone()
    }

    /// The methods the plugin exposes.
    pub fn methods(&self) -> Vec<String> {
        self.info().methods.clone()
    }

    /// Whether the plugin exposes `method`.
    pub fn has_method(&self, method: &str) -> bool {
        self.info().methods.iter().any(|m| m == method)
    }

    /// Everything the plugin said about itself when it loaded (or last reloaded).
    pub fn info(&self) -> Arc<PluginInfo> {
        self.inner
            .info
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The library file's stamp when the running version was loaded.
    pub(crate) fn loaded_stamp(&self) -> Option<crate::watch::Stamp> {
        self.inner
            .stamp
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The library file the plugin runs, as resolved from its manifest.
    pub fn library_path(&self) -> &Path {
        &self.inner.library
    }

    /// The manifest it was loaded from.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// Whether it runs in-process (trusted) or in a worker process (untrusted): what the
    /// app's policy granted, which may be less than the manifest requested.
    pub fn trust(&self) -> Trust {
        self.inner.grant.trust
    }

    /// What kind of code it is: a native library ([`Runtime::Native`](crate::Runtime::Native), run in-process or in a
    /// worker per [`trust`](Self::trust)) or a WebAssembly module ([`Runtime::Wasm`](crate::Runtime::Wasm), run
    /// in this process by an interpreter that contains it; `trust` does not apply).
    pub fn runtime(&self) -> crate::Runtime {
        self.inner.manifest.runtime
    }

    /// What the plugin got: the intersection of its manifest's request and the app's
    /// grant. Compare with [`manifest().permissions`](Manifest::permissions) for what it
    /// asked.
    pub fn grant(&self) -> &Grant {
        &self.inner.grant
    }

    /// Calls `method` with `input` encoded as MessagePack and decodes the output as `O`.
    pub async fn call<I, O>(&self, method: &str, input: &I) -> Result<O, Error>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        self.call_with(method, input, CallOptions::default()).await
    }

    /// [`call`](Self::call) with per-call options.
    pub async fn call_with<I, O>(
        &self,
        method: &str,
        input: &I,
        options: CallOptions,
    ) -> Result<O, Error>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        // Counted once here, whatever fails: encoding, the call, or decoding.
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let bytes = rmp_serde::to_vec_named(input).map_err(|e| CallError::Encode {
                method: method.to_string(),
                message: e.to_string(),
            })?;
            let output = self.call_uncounted(method, bytes, options, None).await?;
            rmp_serde::from_slice(&output).map_err(|e| CallError::Decode {
                plugin: self.name().to_string(),
                method: method.to_string(),
                message: e.to_string(),
            })
        }
        .await;
        self.count_failure(result.is_err());
        result.map_err(Error::from)
    }

    /// Calls `method` with raw bytes and returns the raw output, with no encoding on
    /// either side (the plugin's method decides what the bytes mean).
    pub async fn call_raw(
        &self,
        method: &str,
        input: impl Into<Vec<u8>>,
    ) -> Result<Vec<u8>, Error> {
        self.call_raw_with(method, input, CallOptions::default())
            .await
    }

    /// [`call_raw`](Self::call_raw) with per-call options.
    pub async fn call_raw_with(
        &self,
        method: &str,
        input: impl Into<Vec<u8>>,
        options: CallOptions,
    ) -> Result<Vec<u8>, Error> {
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let result = self
            .call_uncounted(method, input.into(), options, None)
            .await;
        self.count_failure(result.is_err());
        result.map_err(Error::from)
    }

    /// Calls `method` as a stream: the items it emits (`ctx.emit(&item)` in the plugin),
    /// decoded as `T`, as they come. See [`CallStream`] for backpressure, how it ends, and
    /// cancellation by dropping it.
    ///
    /// ```no_run
    /// # async fn demo(plugin: plugin_host::Plugin) -> Result<(), plugin_host::Error> {
    /// use futures_lite::StreamExt;
    /// #[derive(serde::Serialize)]
    /// struct Count { n: u64 }
    /// let mut frames = plugin.call_stream::<_, u64>("count", &Count { n: 1000 });
    /// while let Some(item) = frames.next().await {
    ///     let n = item?;
    ///     println!("{n}");
    /// }
    /// # Ok(()) }
    /// ```
    pub fn call_stream<I, T>(&self, method: &str, input: &I) -> CallStream<T>
    where
        I: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        self.call_stream_with(method, input, CallOptions::default())
    }

    /// [`call_stream`](Self::call_stream) with per-call options.
    pub fn call_stream_with<I, T>(
        &self,
        method: &str,
        input: &I,
        options: CallOptions,
    ) -> CallStream<T>
    where
        I: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let input = rmp_serde::to_vec_named(input).map_err(|e| CallError::Encode {
            method: method.to_string(),
            message: e.to_string(),
        });
        self.stream(method, input, options, |bytes| {
            rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
        })
    }

    /// [`call_stream_with`](Self::call_stream_with) with raw bytes: the input is sent as
    /// is and each item is the bytes the plugin emitted.
    pub fn call_stream_raw(
        &self,
        method: &str,
        input: impl Into<Vec<u8>>,
        options: CallOptions,
    ) -> CallStream<Vec<u8>> {
        self.stream(
            method,
            Ok(input.into()),
            options,
            |bytes| Ok(bytes.to_vec()),
        )
    }

    fn stream<T>(
        &self,
        method: &str,
        input: Result<Vec<u8>, CallError>,
        options: CallOptions,
        decode: fn(&[u8]) -> Result<T, String>,
    ) -> CallStream<T> {
        self.inner.calls.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = async_channel::bounded(STREAM_WINDOW as usize);
        let consumed = Arc::new(Consumed::default());
        let sink = StreamSink {
            items: tx,
            consumed: consumed.clone(),
        };
        let (plugin, name) = (self.clone(), method.to_string());
        let call = Box::pin(async move {
            plugin
                .call_uncounted(&name, input?, options, Some(sink))
                .await
        });
        let counter = self.clone();
        let on_end = Box::new(move |failed| counter.count_failure(failed));
        CallStream::new(
            rx,
            consumed,
            call,
            decode,
            (self.name().to_string(), method.to_string()),
            on_end,
        )
    }

    /// Counts a failed call in [`Status::failures`] (every failed call once, whatever
    /// the kind: refused before it started, failed in the plugin or its worker, or output
    /// that does not decode).
    fn count_failure(&self, failed: bool) {
        if failed {
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One call, with no counting (the public methods count).
    async fn call_uncounted(
        &self,
        method: &str,
        input: Vec<u8>,
        options: CallOptions,
        stream: Option<StreamSink>,
    ) -> Result<Vec<u8>, CallError> {
        let inner = &self.inner;
        if inner.stopped.load(Ordering::Acquire) {
            return Err(CallError::Stopped {
                plugin: self.name().to_string(),
            });
        }
        if !self.has_method(method) {
            return Err(CallError::UnknownMethod {
                plugin: self.name().to_string(),
                method: method.to_string(),
                available: self.methods(),
            });
        }
        let deadline = options.timeout.unwrap_or(inner.manifest.timeouts.call);
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        inner
            .backend
            .call(CallRequest {
                id,
                method: method.to_string(),
                input,
                progress: options.progress,
                deadline,
                cancel: options.cancel,
                stream,
            })
            .await
    }

    /// [`call`](Self::call) for code without an async runtime: blocks this thread.
    pub fn call_blocking<I, O>(&self, method: &str, input: &I) -> Result<O, Error>
    where
        I: Serialize + ?Sized,
        O: DeserializeOwned,
    {
        futures_lite::future::block_on(self.call(method, input))
    }

    /// [`call_raw`](Self::call_raw) for code without an async runtime: blocks this thread.
    pub fn call_raw_blocking(
        &self,
        method: &str,
        input: impl Into<Vec<u8>>,
    ) -> Result<Vec<u8>, Error> {
        futures_lite::future::block_on(self.call_raw(method, input))
    }

    /// Stops the plugin: new calls fail with [`CallError::Stopped`], calls in flight get up
    /// to the manifest's `timeouts.shutdown` to finish. The host that loaded it forgets
    /// it (its name is free to load again).
    pub async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::Release);
        self.inner
            .backend
            .shutdown(self.inner.manifest.timeouts.shutdown)
            .await;
    }

    /// The process id of the plugin's worker, for untrusted plugins whose worker is
    /// running (`None` for trusted plugins). Useful for monitoring and fault injection.
    pub fn worker_pid(&self) -> Option<u32> {
        self.inner.backend.status().pid
    }

    /// State and counters: calls, failures, crashes, restarts, uptime.
    pub fn status(&self) -> Status {
        let backend = self.inner.backend.status();
        let state = if self.is_stopped() {
            PluginState::Stopped
        } else {
            backend.state
        };
        Status {
            state,
            calls: self.inner.calls.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            crashes: backend.crashes,
            restarts: backend.restarts,
            uptime: backend.uptime,
            pid: backend.pid,
            last_crash: backend.last_crash,
            sandbox: backend.sandbox,
            sandbox_missing: backend.sandbox_missing,
            instances: backend.instances,
        }
    }

    /// Lifecycle events from now on (crashes, restarts, quarantine, idle, reload, stop).
    /// Each call returns a new receiver; drop it to unsubscribe. A receiver more than 256
    /// events behind is dropped.
    pub fn subscribe(&self) -> EventReceiver {
        self.inner.backend.subscribe()
    }

    /// Lifts a quarantine: forgets the crash history and starts fresh workers; returns
    /// once they are up (or failed again). Returns `false`, and does nothing, when the
    /// plugin was not quarantined.
    pub async fn enable(&self) -> bool {
        self.inner.backend.enable().await
    }

    /// Switches an untrusted plugin to its library as it is on disk now, without losing a
    /// call: fresh workers load the library and handshake first; only then do new calls
    /// go to them, while the old workers finish the calls they hold (for up to the
    /// manifest's `timeouts.shutdown`) and exit. If the new library fails to load, the
    /// old workers keep serving and the load error is returned (and sent as
    /// [`PluginEvent::ReloadFailed`](crate::PluginEvent::ReloadFailed)).
    ///
    /// Replace the library file atomically (write a new file, then rename it over the
    /// old one): overwriting it in place can crash the workers that have it mapped.
    ///
    /// A trusted plugin cannot be reloaded (a library loaded in-process cannot be
    /// unloaded safely): that is [`LoadError::ReloadUnsupported`](crate::LoadError::ReloadUnsupported).
    pub async fn reload(&self) -> Result<(), Error> {
        if self.is_stopped() {
            return Err(CallError::Stopped {
                plugin: self.name().to_string(),
            }
            .into());
        }
        let stamp = crate::watch::stamp(&self.inner.library);
        let result = self.inner.backend.reload().await;
        // A failed version is not retried by the watcher until the file changes again.
        *self.inner.stamp.lock().unwrap_or_else(|e| e.into_inner()) = stamp;
        let desc = result?;
        let mut info = self.inner.info.write().unwrap_or_else(|e| e.into_inner());
        let mut fresh = PluginInfo::new(&self.inner.name, &desc);
        fresh.requested = info.requested.clone();
        fresh.granted = info.granted.clone();
        *info = Arc::new(fresh);
        Ok(())
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }
}
