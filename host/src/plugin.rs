//! The handle an application holds for a loaded plugin: calls (typed, raw, blocking),
//! per-call options (deadline, progress), introspection and shutdown.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{Backend, CallRequest, ProgressFn};
use crate::error::{CallError, Error};
use crate::loader::Descriptor;
use crate::manifest::{Manifest, Trust};
use crate::permissions::{Grant, PermissionRequest};
use crate::status::{PluginEvent, PluginState, Status};

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

/// Options for one call: a deadline other than the manifest's, and a progress callback.
#[derive(Clone, Default)]
pub struct CallOptions {
    timeout: Option<Duration>,
    progress: Option<ProgressFn>,
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
}

impl std::fmt::Debug for CallOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallOptions")
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

struct Inner {
    manifest: Manifest,
    info: PluginInfo,
    backend: Box<dyn Backend>,
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
            .field("name", &self.inner.info.name)
            .field("version", &self.inner.info.version)
            .field("trust", &self.inner.manifest.trust)
            .finish()
    }
}

impl Plugin {
    pub(crate) fn new(
        manifest: Manifest,
        mut info: PluginInfo,
        grant: Grant,
        backend: Box<dyn Backend>,
    ) -> Plugin {
        info.requested = Some(PermissionRequest::from_manifest(&manifest));
        info.granted = grant;
        Plugin {
            inner: Arc::new(Inner {
                manifest,
                info,
                backend,
                stopped: AtomicBool::new(false),
                next_id: AtomicU64::new(1),
                calls: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// The plugin's name (from its manifest).
    pub fn name(&self) -> &str {
        &self.inner.info.name
    }

    /// The version the library declares.
    pub fn version(&self) -> &str {
        &self.inner.info.version
    }

    /// The methods the plugin exposes.
    pub fn methods(&self) -> &[String] {
        &self.inner.info.methods
    }

    /// Whether the plugin exposes `method`.
    pub fn has_method(&self, method: &str) -> bool {
        self.inner.info.methods.iter().any(|m| m == method)
    }

    /// Everything the plugin said about itself when it loaded.
    pub fn info(&self) -> &PluginInfo {
        &self.inner.info
    }

    /// The manifest it was loaded from.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// Whether it runs in-process (trusted) or in a worker process (untrusted): what the
    /// app's policy granted, which may be less than the manifest requested.
    pub fn trust(&self) -> Trust {
        self.inner.info.granted.trust
    }

    /// What the plugin got: the intersection of its manifest's request and the app's
    /// grant. Compare with [`manifest().permissions`](Manifest::permissions) for what it
    /// asked.
    pub fn grant(&self) -> &Grant {
        &self.inner.info.granted
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
            let output = self.call_uncounted(method, bytes, options).await?;
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
        let result = self.call_uncounted(method, input.into(), options).await;
        self.count_failure(result.is_err());
        result.map_err(Error::from)
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
                available: inner.info.methods.clone(),
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
    /// to the manifest's `timeouts.shutdown` to finish.
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
        }
    }

    /// Lifecycle events from now on (crashes, restarts, quarantine, stop). Each call
    /// returns a new receiver; drop it to unsubscribe. A receiver more than 256 events
    /// behind is dropped.
    pub fn subscribe(&self) -> async_channel::Receiver<PluginEvent> {
        self.inner.backend.subscribe()
    }

    /// Lifts a quarantine: forgets the crash history and starts a fresh worker. Does
    /// nothing for a plugin that is not quarantined.
    pub async fn enable(&self) {
        self.inner.backend.enable().await
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }
}
