//! The in-process backend for trusted plugins: the library is dlopened into the host and
//! calls run on the `blocking` thread pool, off the caller's executor. Fast, and a crash
//! here is a crash of the host: use it only for code you trust.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{
    cancelled as cancelled_error, outcome, until_deadline, Backend, BackendStatus, BoxFuture,
    CallRequest, ProgressFn, StreamSink,
};
use crate::cancel::CancelHandle;
use crate::error::{CallError, LoadError};
use crate::host_fn::{HostCallInfo, Imports};
use crate::loader::Descriptor;
use crate::status::InstanceStatus;

use crate::loader::{emit_log, HostServices, Instance, Library};
use crate::manifest::Manifest;
use crate::plugin::{PluginInfo, Progress};
use crate::status::{EventHub, PluginEvent, PluginState};

pub(crate) struct InProcess {
    name: Arc<str>,
    methods: Arc<[String]>,
    instance: Arc<Instance>,
    events: EventHub,
    loaded: Instant,
    imports: Arc<Imports>,
    /// How long a cancelled call's host functions may run on (`timeouts.cancel_grace`).
    grace: Duration,
}

/// Host services during `create`: logs only.
struct CreateServices<'a> {
    plugin: &'a str,
}

impl HostServices for CreateServices<'_> {
    fn log(&self, level: u32, message: &str) {
        emit_log(self.plugin, level, message);
    }
    fn progress(&self, _: f64, _: &str) {}
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// Host services during a call.
struct CallServices<'a> {
    plugin: &'a str,
    method: &'a str,
    id: u64,
    progress: Option<&'a ProgressFn>,
    cancelled: &'a CancelHandle,
    imports: &'a Imports,
    grace: Duration,
    stream: Option<&'a StreamSink>,
    /// Bytes of stream items the consumer has not taken yet.
    outstanding: std::sync::atomic::AtomicU64,
}

impl HostServices for CallServices<'_> {
    fn log(&self, level: u32, message: &str) {
        emit_log(self.plugin, level, message);
    }
    fn progress(&self, fraction: f64, message: &str) {
        if let Some(progress) = self.progress {
            progress(Progress::new(fraction, message));
        }
    }
    fn is_cancelled(&self) -> bool {
        self.cancelled.is_cancelled()
    }
    fn call_host(&self, name: &str, input: &[u8]) -> (i32, Vec<u8>) {
        let call = HostCallInfo {
            function: name.to_string(),
            method: self.method.to_string(),
            call_id: self.id,
            cancel: self.cancelled.clone(),
        };
        crate::host_fn::run_blocking(
            self.imports,
            call,
            input.to_vec(),
            self.grace,
            usize::MAX,
            None,
        )
    }
    fn emit(&self, item: &[u8]) -> i32 {
        crate::backend::emit_blocking(
            self.stream,
            item.to_vec(),
            &self.outstanding,
            self.cancelled,
            None,
        )
    }
}

impl InProcess {
    /// Loads the library and creates the instance (blocking; run it off the executor).
    pub fn load(
        manifest: &Manifest,
        library: &std::path::Path,
        imports: Arc<Imports>,
    ) -> Result<(InProcess, PluginInfo), LoadError> {
        let (lib, desc) = Library::open(library, &manifest.name)?;
        if desc.name != manifest.name {
            tracing::warn!(
                manifest = %manifest.name,
                library = %desc.name,
                "the library calls itself `{}` but its manifest says `{}`; using the manifest's name",
                desc.name,
                manifest.name
            );
        }
        let instance = lib.create(
            &manifest.name,
            &manifest.config_bytes(),
            &CreateServices {
                plugin: &manifest.name,
            },
        )?;
        let info = PluginInfo::new(&manifest.name, &desc);
        let backend = InProcess {
            name: manifest.name.as_str().into(),
            methods: desc.methods.into(),
            instance: Arc::new(instance),
            events: EventHub::default(),
            loaded: Instant::now(),
            imports,
            grace: manifest.timeouts.cancel_grace,
        };
        Ok((backend, info))
    }
}

impl InProcess {
    /// Calls running now: each holds a reference to the instance.
    fn in_flight(&self) -> usize {
        Arc::strong_count(&self.instance).saturating_sub(1)
    }
}

impl Backend for InProcess {
    fn call(&self, call: CallRequest) -> BoxFuture<Result<Vec<u8>, CallError>> {
        let (name, methods, instance, imports, grace) = (
            self.name.clone(),
            self.methods.clone(),
            self.instance.clone(),
            self.imports.clone(),
            self.grace,
        );
        let cancelled = CancelHandle::new();
        let flag = cancelled.clone();
        if call.cancel.as_ref().is_some_and(CancelHandle::is_cancelled) {
            let error = cancelled_error(&self.name, &call.method);
            return Box::pin(async move { Err(error) });
        }
        let (method, deadline, cancel) = (call.method.clone(), call.deadline, call.cancel.clone());
        let work = blocking::unblock(move || {
            let services = CallServices {
                plugin: &name,
                method: &call.method,
                id: call.id,
                progress: call.progress.as_ref(),
                cancelled: &flag,
                imports: &imports,
                grace,
                stream: call.stream.as_ref(),
                outstanding: Default::default(),
            };
            let (code, output) = instance.call(&call.method, &call.input, &services);
            outcome(
                &name,
                &call.method,
                &methods,
                code,
                output.as_slice().to_vec(),
            )
        });
        let name = self.name.clone();
        // Dropping the call's future (or cancelling it) tells the plugin: the thread
        // cannot be stopped, but `is_cancelled` turns true.
        Box::pin(until_deadline(
            name, method, deadline, cancel, cancelled, work,
        ))
    }

    fn shutdown(&self, _grace: Duration) -> BoxFuture<()> {
        // Calls in flight hold their own reference to the instance, so they finish; the
        // instance is destroyed when the last of them and this backend are gone.
        self.events.emit(PluginEvent::Stopped);
        Box::pin(async {})
    }

    fn status(&self) -> BackendStatus {
        BackendStatus {
            state: PluginState::Ready,
            crashes: 0,
            restarts: 0,
            instances: vec![InstanceStatus {
                index: 0,
                state: PluginState::Ready,
                pid: None,
                uptime: Some(self.loaded.elapsed()),
                in_flight: self.in_flight(),
                transport: None,
            }],
            uptime: Some(self.loaded.elapsed()),
            pid: None,
            last_crash: None,
            sandbox: Vec::new(),
            sandbox_missing: Vec::new(),
        }
    }

    fn subscribe(&self) -> async_channel::Receiver<PluginEvent> {
        self.events.subscribe()
    }

    fn enable(&self) -> BoxFuture<bool> {
        // An in-process plugin is never quarantined.
        Box::pin(async { false })
    }

    fn reload(&self) -> BoxFuture<Result<Descriptor, LoadError>> {
        let error = LoadError::ReloadUnsupported {
            plugin: self.name.to_string(),
            reason: "it runs in-process (trusted), and a loaded library cannot be unloaded \
                     safely (its threads and thread-local destructors may still run its code); \
                     restart the application, or load it untrusted to reload it in a worker"
                .into(),
        };
        Box::pin(async move { Err(error) })
    }
}
