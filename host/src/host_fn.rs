//! Host functions: what the app exports to plugins, and the one door a sandboxed plugin
//! has to the app.
//!
//! The app registers functions on the [`HostBuilder`](crate::HostBuilder) (for every
//! plugin, or for one plugin by name); a plugin lists the ones it uses in its manifest's
//! `imports`. A plugin may call a function only when both say so. Each host call is tied
//! to the plugin call that made it: it sees that call's cancellation
//! ([`HostCallContext::cancelled`]), and a host function still running when the plugin
//! call ends (deadline, cancellation, crash) is cancelled too.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::FutureExt;
use plugin_api::abi::host_status;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cancel::CancelHandle;

/// What a host function knows about the call it serves.
#[derive(Clone)]
pub struct HostCallContext {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    host: std::sync::Weak<crate::host::Shared>,
    plugin: Arc<str>,
    call: HostCallInfo,
}

impl HostCallContext {
    /// The host the function was registered on (`None` once it is gone). Use it to call
    /// plugins from the host function, also the one calling it
    /// (`ctx.host()?.get(ctx.plugin())`): unlike a `Host` captured in the function, it
    /// does not keep the host alive.
    pub fn host(&self) -> Option<crate::Host> {
        self.inner.host.upgrade().map(crate::Host::from_shared)
    }

    /// The plugin that made the host call.
    pub fn plugin(&self) -> &str {
        &self.inner.plugin
    }

    /// The plugin method whose call made the host call.
    pub fn method(&self) -> &str {
        &self.inner.call.method
    }

    /// The host function's name.
    pub fn function(&self) -> &str {
        &self.inner.call.function
    }

    /// The plugin call's id (unique per plugin), to correlate logs.
    pub fn call_id(&self) -> u64 {
        self.inner.call.call_id
    }

    /// True once the plugin call this host call serves is over for its caller (deadline,
    /// cancellation, the worker crashed, the stream was dropped). The result will not be
    /// used: stop.
    pub fn is_cancelled(&self) -> bool {
        self.inner.call.cancel.is_cancelled()
    }

    /// Resolves when [`is_cancelled`](Self::is_cancelled) turns true. A host function
    /// that does not stop by itself is dropped shortly after (the plugin's
    /// `timeouts.cancel_grace`).
    pub async fn cancelled(&self) {
        self.inner.call.cancel.cancelled().await
    }
}

impl fmt::Debug for HostCallContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCallContext")
            .field("plugin", &self.inner.plugin)
            .field("method", &self.inner.call.method)
            .field("function", &self.inner.call.function)
            .field("call_id", &self.inner.call.call_id)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// The error a host function returns; the plugin receives its message (as
/// `HostCallErrorKind::Failed`). Any `std::error::Error` converts into it, so `?` works.
pub struct HostError {
    message: String,
}

impl HostError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        HostError {
            message: message.to_string(),
        }
    }

    /// The message the plugin will see.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error> From<E> for HostError {
    fn from(err: E) -> Self {
        HostError::new(err)
    }
}

impl fmt::Debug for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.message, f)
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A host function in wire form: bytes in, a status code and bytes out.
type RawFn = dyn Fn(HostCallContext, Vec<u8>) -> BoxFuture<(i32, Vec<u8>)> + Send + Sync;

/// Builds the wire form of a typed function: decode the input (a failure is
/// `BAD_INPUT`), run, encode the output.
pub(crate) fn typed<I, O, F, Fut>(name: &str, f: F) -> Arc<RawFn>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(HostCallContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HostError>> + Send + 'static,
{
    let name = name.to_string();
    let f = Arc::new(f);
    Arc::new(move |ctx, input: Vec<u8>| {
        let (f, name) = (f.clone(), name.clone());
        Box::pin(async move {
            let input: I = match rmp_serde::from_slice(&input) {
                Ok(i) => i,
                Err(e) => {
                    let text = format!("host function `{name}`: the input does not decode: {e}");
                    return (host_status::BAD_INPUT, text.into_bytes());
                }
            };
            match f(ctx, input).await {
                Ok(output) => match rmp_serde::to_vec_named(&output) {
                    Ok(bytes) => (host_status::OK, bytes),
                    Err(e) => {
                        let text = format!("host function `{name}`: cannot encode its output: {e}");
                        (host_status::ERROR, text.into_bytes())
                    }
                },
                Err(e) => (host_status::ERROR, e.message.into_bytes()),
            }
        })
    })
}

/// Builds the wire form of a raw-bytes function.
pub(crate) fn raw<F, Fut>(f: F) -> Arc<RawFn>
where
    F: Fn(HostCallContext, Vec<u8>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<u8>, HostError>> + Send + 'static,
{
    let f = Arc::new(f);
    Arc::new(move |ctx, input| {
        let f = f.clone();
        Box::pin(async move {
            match f(ctx, input).await {
                Ok(bytes) => (host_status::OK, bytes),
                Err(e) => (host_status::ERROR, e.message.into_bytes()),
            }
        })
    })
}

/// Every function the app registered: for all plugins, or for one plugin.
#[derive(Clone, Default)]
pub(crate) struct HostFunctions {
    all: BTreeMap<String, Arc<RawFn>>,
    /// (plugin, function) -> function.
    scoped: BTreeMap<(String, String), Arc<RawFn>>,
}

impl HostFunctions {
    pub fn add(&mut self, plugin: Option<&str>, name: &str, f: Arc<RawFn>) {
        match plugin {
            None => {
                self.all.insert(name.to_string(), f);
            }
            Some(p) => {
                self.scoped.insert((p.to_string(), name.to_string()), f);
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: BTreeSet<&String> = self.all.keys().collect();
        names.extend(self.scoped.keys().map(|(_, n)| n));
        names.into_iter().cloned().collect()
    }

    /// What `plugin`, importing `imports`, may call, on the host `host`.
    pub fn imports_for(
        &self,
        plugin: &str,
        imports: &[String],
        host: std::sync::Weak<crate::host::Shared>,
    ) -> Imports {
        let mut granted = HashMap::new();
        for name in imports {
            let f = self
                .scoped
                .get(&(plugin.to_string(), name.clone()))
                .or_else(|| self.all.get(name));
            if let Some(f) = f {
                granted.insert(name.clone(), f.clone());
            }
        }
        let mut offered: Vec<String> = self.all.keys().cloned().collect();
        offered.extend(
            self.scoped
                .keys()
                .filter(|(p, _)| p == plugin)
                .map(|(_, n)| n.clone()),
        );
        offered.sort();
        offered.dedup();
        let missing: Vec<&String> = imports
            .iter()
            .filter(|n| !granted.contains_key(*n))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                plugin = %plugin,
                "the manifest imports host functions the app does not grant it: {}; calls to them will fail",
                missing.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            );
        }
        Imports {
            host,
            plugin: plugin.into(),
            imported: imports.iter().cloned().collect(),
            granted,
            registered: self.names().into_iter().collect(),
            offered,
        }
    }
}

/// The host functions one plugin may call, and why it may not call the others.
pub(crate) struct Imports {
    host: std::sync::Weak<crate::host::Shared>,
    plugin: Arc<str>,
    imported: BTreeSet<String>,
    granted: HashMap<String, Arc<RawFn>>,
    /// Every name the app registered, for any plugin.
    registered: BTreeSet<String>,
    /// The names the app offers this plugin (whether imported or not).
    offered: Vec<String>,
}

/// A host call refused before it ran, or the outcome of one that ran.
pub(crate) type HostOutcome = (i32, Vec<u8>);

impl Imports {
    /// The function, or the status and message that refuse the call.
    fn resolve(&self, name: &str) -> Result<Arc<RawFn>, HostOutcome> {
        let plugin = &self.plugin;
        let refuse = |status, text: String| Err((status, text.into_bytes()));
        if !self.imported.contains(name) {
            return refuse(
                host_status::NOT_IMPORTED,
                format!(
                    "host function `{name}` is not imported by plugin `{plugin}`: list it in \
                     `imports` in the plugin's manifest"
                ),
            );
        }
        if let Some(f) = self.granted.get(name) {
            return Ok(f.clone());
        }
        if self.registered.contains(name) {
            return refuse(
                host_status::NOT_GRANTED,
                format!(
                    "host function `{name}` is not granted to plugin `{plugin}`: the app \
                     registered it for other plugins only"
                ),
            );
        }
        let offered = match self.offered.is_empty() {
            true => "none".to_string(),
            false => self.offered.join(", "),
        };
        refuse(
            host_status::NOT_FOUND,
            format!(
                "no host function named `{name}`: the app does not provide it (it offers \
                 plugin `{plugin}`: {offered})"
            ),
        )
    }

    /// Runs one host call to the end: refuses it, or runs the function (a panic becomes
    /// `PANIC`), until it finishes or `grace` after `cancel` fires (`CANCELLED`). An
    /// output longer than `max_output` becomes `LIMIT`.
    pub fn run(
        &self,
        call: HostCallInfo,
        input: Vec<u8>,
        grace: Duration,
        max_output: usize,
    ) -> BoxFuture<HostOutcome> {
        let f = match self.resolve(&call.function) {
            Ok(f) => f,
            Err(refused) => return Box::pin(async move { refused }),
        };
        if call.cancel.is_cancelled() {
            let text = call.cancelled_text();
            return Box::pin(async move { (host_status::CANCELLED, text.into_bytes()) });
        }
        let ctx = HostCallContext {
            inner: Arc::new(ContextInner {
                host: self.host.clone(),
                plugin: self.plugin.clone(),
                call,
            }),
        };
        let ours = ctx.clone();
        Box::pin(async move {
            let (plugin, call) = (ours.plugin(), &ours.inner.call);
            let function = &call.function;
            let panicked = |payload: Box<dyn std::any::Any + Send>| {
                let message = panic_text(&*payload);
                tracing::warn!(plugin = %plugin, function = %function, "host function panicked: {message}");
                let text = format!("host function `{function}` panicked: {message}");
                (host_status::PANIC, text.into_bytes())
            };
            let work = match std::panic::catch_unwind(AssertUnwindSafe(|| f(ctx, input))) {
                Ok(work) => work,
                Err(payload) => return panicked(payload),
            };
            let ran = AssertUnwindSafe(work).catch_unwind().or(async {
                call.cancel.cancelled().await;
                smol::Timer::after(grace).await;
                Ok((host_status::CANCELLED, Vec::new()))
            });
            let (status, output) = match ran.await {
                Ok(outcome) => outcome,
                Err(payload) => return panicked(payload),
            };
            if status == host_status::CANCELLED || call.cancel.is_cancelled() {
                return (host_status::CANCELLED, call.cancelled_text().into_bytes());
            }
            if output.len() > max_output {
                let text = format!(
                    "host function `{function}` returned {} bytes, more than the {max_output} \
                     bytes a reply frame holds (limits.max_frame)",
                    output.len()
                );
                return (host_status::LIMIT, text.into_bytes());
            }
            (status, output)
        })
    }
}

/// Which call a host call belongs to.
pub(crate) struct HostCallInfo {
    pub function: String,
    pub method: String,
    pub call_id: u64,
    pub cancel: CancelHandle,
}

impl HostCallInfo {
    fn cancelled_text(&self) -> String {
        cancelled_text(&self.function, &self.method)
    }
}

/// What the plugin is told when the call that made a host call was cancelled.
pub(crate) fn cancelled_text(function: &str, method: &str) -> String {
    format!("host function `{function}`: the call `{method}` was cancelled")
}

/// The message of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Polls `work` once on this thread (a host function that answers at once costs no
/// thread hop); if it is not done, hands it to the executor to finish.
pub(crate) fn start<T: Send + 'static>(mut work: BoxFuture<T>) -> Result<T, smol::Task<T>> {
    match futures_lite::future::block_on(futures_lite::future::poll_once(&mut work)) {
        Some(done) => Ok(done),
        None => Err(smol::spawn(work)),
    }
}

/// Runs a host call to its end on this thread (a thread of the `blocking` pool, where a
/// plugin running in the host process waits): its outcome, or `CANCELLED` as soon as the
/// plugin call that made it is cancelled, or `halt` (the plugin's shutdown) is (the host
/// function then runs on, for the grace period, on the executor).
pub(crate) fn run_blocking(
    imports: &Imports,
    call: HostCallInfo,
    input: Vec<u8>,
    grace: Duration,
    max_output: usize,
    halt: Option<&CancelHandle>,
) -> HostOutcome {
    let (function, method, cancel) = (
        call.function.clone(),
        call.method.clone(),
        call.cancel.clone(),
    );
    let mut task = match start(imports.run(call, input, grace, max_output)) {
        Ok(done) => return done,
        Err(task) => task,
    };
    let outcome = futures_lite::future::block_on(futures_lite::future::or(
        async { Some((&mut task).await) },
        async {
            crate::cancel::either(&cancel, halt).await;
            None
        },
    ));
    match outcome {
        Some(done) => done,
        None => {
            task.detach();
            let text = cancelled_text(&function, &method);
            (host_status::CANCELLED, text.into_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions() -> HostFunctions {
        let mut fns = HostFunctions::default();
        let echo = raw(|_, input: Vec<u8>| async move { Ok(input) });
        fns.add(None, "echo", echo.clone());
        fns.add(Some("other"), "secret", echo);
        fns.add(
            None,
            "boom",
            raw(|_, _| async move {
                if true {
                    panic!("kaboom");
                }
                Ok(Vec::new())
            }),
        );
        fns
    }

    fn call(imports: &Imports, name: &str, cancel: &CancelHandle) -> HostOutcome {
        let info = HostCallInfo {
            function: name.into(),
            method: "m".into(),
            call_id: 1,
            cancel: cancel.clone(),
        };
        futures_lite::future::block_on(imports.run(info, b"hi".to_vec(), Duration::ZERO, 1024))
    }

    #[test]
    fn refusals_name_the_reason() {
        let names: Vec<String> = ["echo", "secret", "missing", "boom"]
            .map(String::from)
            .into();
        let imports = functions().imports_for("p", &names, std::sync::Weak::new());
        let live = CancelHandle::new();
        assert_eq!(
            call(&imports, "echo", &live),
            (host_status::OK, b"hi".to_vec())
        );
        let (status, text) = call(&imports, "notlisted", &live);
        assert_eq!(status, host_status::NOT_IMPORTED);
        assert!(String::from_utf8_lossy(&text).contains("imports"));
        assert_eq!(call(&imports, "secret", &live).0, host_status::NOT_GRANTED);
        let (status, text) = call(&imports, "missing", &live);
        assert_eq!(status, host_status::NOT_FOUND);
        assert!(
            String::from_utf8_lossy(&text).contains("echo"),
            "offers the others"
        );
        let (status, text) = call(&imports, "boom", &live);
        assert_eq!(status, host_status::PANIC);
        assert!(String::from_utf8_lossy(&text).contains("kaboom"));
        // Granted to `other` only, where it resolves.
        let other =
            functions().imports_for("other", &["secret".to_string()], std::sync::Weak::new());
        assert_eq!(call(&other, "secret", &live).0, host_status::OK);
    }

    #[test]
    fn cancelled_calls_and_large_outputs_are_refused() {
        let imports = functions().imports_for("p", &["echo".to_string()], std::sync::Weak::new());
        let cancelled = CancelHandle::new();
        cancelled.cancel();
        assert_eq!(call(&imports, "echo", &cancelled).0, host_status::CANCELLED);
        let info = HostCallInfo {
            function: "echo".into(),
            method: "m".into(),
            call_id: 1,
            cancel: CancelHandle::new(),
        };
        let run = imports.run(info, vec![0; 10], Duration::ZERO, 4);
        assert_eq!(futures_lite::future::block_on(run).0, host_status::LIMIT);
    }
}
