//! [`Host`] and [`HostBuilder`]: where plugins are looked for, and loading them.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::backend::in_process::InProcess;
use crate::error::{Error, LoadError, ManifestError, ManifestErrorKind};
use crate::host_fn::{HostCallContext, HostError, HostFunctions};
use crate::manifest::{Manifest, Trust};
use crate::permissions::{Grant, PermissionRequest, Policy};
use crate::plugin::Plugin;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Configures a [`Host`].
#[derive(Clone, Default)]
pub struct HostBuilder {
    search_paths: Vec<PathBuf>,
    worker_shim: Option<PathBuf>,
    policy: Option<Policy>,
    data_dir: Option<PathBuf>,
    instances: Option<u32>,
    idle_timeout: Option<Duration>,
    watch: Option<Duration>,
    functions: HostFunctions,
    transport: Option<crate::Transport>,
}

impl std::fmt::Debug for HostBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuilder")
            .field("search_paths", &self.search_paths)
            .field("worker_shim", &self.worker_shim)
            .field(
                "policy",
                &self.policy.as_ref().map_or("deny all", |_| "custom"),
            )
            .field("data_dir", &self.data_dir)
            .field("instances", &self.instances)
            .field("idle_timeout", &self.idle_timeout)
            .field("watch", &self.watch)
            .field("functions", &self.functions.names())
            .field("transport", &self.transport)
            .finish()
    }
}

impl HostBuilder {
    /// Adds a directory in which library base names are looked up (after the manifest's
    /// own directory). Directories are searched in the order they were added.
    pub fn search_path(mut self, dir: impl Into<PathBuf>) -> Self {
        self.search_paths.push(dir.into());
        self
    }

    /// Uses this `worker-shim` executable for untrusted plugins instead of looking for one.
    pub fn worker_shim(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_shim = Some(path.into());
        self
    }

    /// The app's permission policy: called once per load with what the plugin's manifest
    /// requests; the plugin gets what was both requested and granted
    /// ([`Grant::effective`]). Without a policy every plugin gets [`Grant::deny_all`]:
    /// untrusted, in the required sandbox, with no permissions, whatever its manifest says.
    ///
    /// ```
    /// use plugin_host::{Grant, Host, Trust};
    /// let host = Host::builder()
    ///     .permissions(|request| {
    ///         let mut grant = Grant::deny_all();
    ///         if request.plugin == "thumbnail" {
    ///             // Our own plugin: let it read its assets.
    ///             grant.permissions.read = request.permissions.read.clone();
    ///         }
    ///         grant
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = (host, Trust::Untrusted);
    /// ```
    pub fn permissions(
        mut self,
        policy: impl Fn(&PermissionRequest) -> Grant + Send + Sync + 'static,
    ) -> Self {
        self.policy = Some(std::sync::Arc::new(policy));
        self
    }

    /// Grants every plugin whatever its manifest requests, trust included. For plugins the
    /// app ships itself and for tests; never for plugins users download.
    pub fn grant_requested(self) -> Self {
        self.permissions(Grant::requested)
    }

    /// How frames travel between this host and its untrusted plugins' workers after the
    /// handshake (default: [`Transport::SharedMemory`](crate::Transport::SharedMemory),
    /// or what `PLUGIN_HOST_TRANSPORT` names). Shared memory falls back to the socket
    /// where the worker or the system cannot use it; `Plugin::status` says which one each
    /// worker uses.
    pub fn transport(mut self, transport: crate::Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    /// The transport this host's workers use: the one set with
    /// [`transport`](Self::transport), else the one `PLUGIN_HOST_TRANSPORT` names, else
    /// shared memory.
    pub(crate) fn chosen_transport(&self) -> crate::Transport {
        self.transport
            .or_else(crate::Transport::from_env)
            .unwrap_or(crate::Transport::SharedMemory)
    }

    /// Where plugins' private data directories (`$DATA_DIR`) are created: one
    /// subdirectory per plugin name. Default: `$XDG_DATA_HOME/plugin-host/data`, else
    /// `~/.local/share/plugin-host/data`.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// How many worker processes serve each untrusted plugin whose manifest does not set
    /// `instances` (default 1). Calls go to the least-loaded worker; a crash takes down
    /// only the calls that worker was running.
    pub fn instances(mut self, n: u32) -> Self {
        self.instances = Some(n.clamp(1, 64));
        self
    }

    /// Stops an untrusted plugin's worker after `timeout` without a call, for plugins whose
    /// manifest does not set `idle_timeout` (default: never). The next call starts it
    /// again, paying the cold start. Trusted plugins are never stopped for being idle.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = Some(timeout).filter(|t| !t.is_zero());
        self
    }

    /// Watches the library files of the host's untrusted plugins and
    /// [reloads](crate::Plugin::reload) a plugin when its file changes (polling every
    /// 500 ms; a change is acted on once the file has stayed the same for one poll). A
    /// library that fails to load leaves the old one running and is reported (a warning
    /// in the log and [`PluginEvent::ReloadFailed`](crate::PluginEvent::ReloadFailed)).
    pub fn watch(mut self, on: bool) -> Self {
        self.watch = on.then_some(Duration::from_millis(500));
        self
    }

    /// [`watch`](Self::watch) with another polling interval.
    pub fn watch_every(mut self, interval: Duration) -> Self {
        self.watch = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// Exports a host function to every plugin that imports it (lists `name` in its
    /// manifest's `imports`). Input and output are serde types (MessagePack on the wire);
    /// the plugin calls it with `ctx.host_call::<I, O>(name, &input)`.
    ///
    /// The function runs in the host: it is polled first on the thread that received the
    /// host call (for a trusted plugin, the plugin's own thread), so one that answers at
    /// once costs no thread hop, and it finishes on the `smol` executor if it does not.
    /// It is tied to the plugin call that made it ([`HostCallContext`]): when that call
    /// ends (deadline, cancellation, crash),
    /// [`HostCallContext::cancelled`] fires, and a function still running after the
    /// plugin's `timeouts.cancel_grace` is dropped. An error it returns, or a panic, reaches
    /// the plugin as an error; the host goes on. It may call plugins itself (also the one
    /// calling it: [`HostCallContext::host`]). Do not block in it: use `blocking::unblock`
    /// for blocking work.
    ///
    /// A later function with the same name replaces an earlier one.
    ///
    /// ```
    /// use plugin_host::{Host, HostCallContext, HostError};
    /// #[derive(serde::Deserialize)]
    /// struct Query { id: u32 }
    /// let host = Host::builder()
    ///     .function("doc.title", |_ctx: HostCallContext, q: Query| async move {
    ///         match q.id {
    ///             7 => Ok("Annual report".to_string()),
    ///             other => Err(HostError::new(format!("no document {other}"))),
    ///         }
    ///     })
    ///     .build()
    ///     .unwrap();
    /// # let _ = host;
    /// ```
    pub fn function<I, O, F, Fut>(mut self, name: &str, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(HostCallContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HostError>> + Send + 'static,
    {
        let f = crate::host_fn::typed(name, f);
        self.functions.add(None, name, f);
        self
    }

    /// [`function`](Self::function) with raw bytes in and out (no encoding); the plugin
    /// calls it with `ctx.host_call_raw(name, &bytes)`.
    pub fn raw_function<F, Fut>(mut self, name: &str, f: F) -> Self
    where
        F: Fn(HostCallContext, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, HostError>> + Send + 'static,
    {
        self.functions.add(None, name, crate::host_fn::raw(f));
        self
    }

    /// [`function`](Self::function) granted to the plugin named `plugin` only; others
    /// that import it are refused (`NotGranted`). A function registered for one plugin
    /// takes precedence over one with the same name registered for all.
    pub fn function_for<I, O, F, Fut>(mut self, plugin: &str, name: &str, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(HostCallContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HostError>> + Send + 'static,
    {
        let f = crate::host_fn::typed(name, f);
        self.functions.add(Some(plugin), name, f);
        self
    }

    /// [`raw_function`](Self::raw_function) granted to the plugin named `plugin` only.
    pub fn raw_function_for<F, Fut>(mut self, plugin: &str, name: &str, f: F) -> Self
    where
        F: Fn(HostCallContext, Vec<u8>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<u8>, HostError>> + Send + 'static,
    {
        self.functions
            .add(Some(plugin), name, crate::host_fn::raw(f));
        self
    }

    /// Builds the host.
    pub fn build(self) -> Result<Host, Error> {
        let watch = self.watch;
        let shared = Arc::new(Shared {
            config: self,
            registry: Mutex::new(Registry::default()),
        });
        if let Some(interval) = watch {
            crate::watch::start(Arc::downgrade(&shared), interval);
        }
        Ok(Host { shared })
    }
}

/// What a host owns: its configuration and its plugins.
pub(crate) struct Shared {
    config: HostBuilder,
    registry: Mutex<Registry>,
}

impl Shared {
    /// The registry, without the plugins shut down since (a stopped plugin gives up its
    /// name).
    fn registry(&self) -> MutexGuard<'_, Registry> {
        let mut registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        registry.plugins.retain(|_, p| !p.is_stopped());
        registry
    }

    /// The plugins loaded now.
    pub(crate) fn plugins(&self) -> Vec<Plugin> {
        self.registry().plugins.values().cloned().collect()
    }
}

#[derive(Default)]
struct Registry {
    plugins: BTreeMap<String, Plugin>,
    /// Names being loaded now (reserved, so two loads of one name cannot both win).
    loading: BTreeSet<String>,
}

/// Frees a reserved name if its load does not finish.
struct Reservation<'a> {
    shared: &'a Shared,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.shared.registry().loading.remove(&self.name);
    }
}

/// What [`Host::load_dir`] loaded and what it could not.
#[derive(Debug, Default)]
pub struct DirLoad {
    /// The plugins loaded, in manifest path order.
    pub loaded: Vec<Plugin>,
    /// Each manifest that did not load: its path and why.
    pub failed: Vec<(PathBuf, Error)>,
}

/// Loads plugins and keeps them: a registry by name ([`get`](Self::get),
/// [`plugins`](Self::plugins), [`unload`](Self::unload), [`shutdown`](Self::shutdown)).
/// Cheap to clone: clones share the registry. A [`Plugin`] handle it returned stays usable
/// on its own; a plugin stops when it is unloaded (or shut down), or when the host and
/// every handle to it are gone.
#[derive(Clone)]
pub struct Host {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("config", &self.shared.config)
            .field("plugins", &self.names())
            .finish()
    }
}

impl Host {
    /// The handle for a host's shared state (host functions hold it weakly).
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Host {
        Host { shared }
    }

    /// Starts configuring a host.
    pub fn builder() -> HostBuilder {
        HostBuilder::default()
    }

    /// The directories library base names are looked up in.
    pub fn search_paths(&self) -> &[PathBuf] {
        &self.shared.config.search_paths
    }

    /// Reads the manifest at `path`, loads its plugin and keeps it under its name.
    pub async fn load(&self, path: impl AsRef<Path>) -> Result<Plugin, Error> {
        let path = path.as_ref().to_path_buf();
        let manifest = blocking::unblock(move || Manifest::from_file(path)).await?;
        self.load_manifest(manifest).await
    }

    /// Loads the plugin an already parsed manifest describes and keeps it under its name.
    /// A name already loaded (or being loaded) in this host is
    /// [`LoadError::NameTaken`].
    pub async fn load_manifest(&self, manifest: Manifest) -> Result<Plugin, Error> {
        let reservation = self.reserve(&manifest)?;
        let plugin = self.start(manifest).await?;
        let mut registry = self.shared.registry();
        registry
            .plugins
            .insert(reservation.name.clone(), plugin.clone());
        drop(registry);
        drop(reservation);
        Ok(plugin)
    }

    /// Loads every manifest under `dir` (as [`manifest::discover`](crate::manifest::discover)
    /// finds them: `plugin.toml` and `*.plugin.toml`, three levels deep), at the same time.
    /// One that fails is reported with its path; the others still load. Fails as a whole
    /// only when `dir` cannot be read.
    pub async fn load_dir(&self, dir: impl AsRef<Path>) -> Result<DirLoad, Error> {
        let dir = dir.as_ref().to_path_buf();
        let found = {
            let dir = dir.clone();
            blocking::unblock(move || crate::manifest::discover(dir)).await
        }
        .map_err(|e| ManifestError {
            path: dir.clone(),
            field: String::new(),
            kind: ManifestErrorKind::Io,
            message: format!("cannot read the plugin directory: {e}"),
        })?;
        let loads = found.into_iter().map(|(path, manifest)| async move {
            let result = match manifest {
                Ok(manifest) => self.load_manifest(manifest).await,
                Err(e) => Err(Error::from(e)),
            };
            (path, result)
        });
        let mut report = DirLoad::default();
        for (path, result) in crate::backend::join_all(loads.collect()).await {
            match result {
                Ok(plugin) => report.loaded.push(plugin),
                Err(error) => {
                    tracing::warn!(manifest = %path.display(), "{error}");
                    report.failed.push((path, error));
                }
            }
        }
        Ok(report)
    }

    /// The plugin loaded under `name`.
    pub fn get(&self, name: &str) -> Option<Plugin> {
        self.shared.registry().plugins.get(name).cloned()
    }

    /// Every plugin loaded, by name.
    pub fn plugins(&self) -> Vec<Plugin> {
        self.shared.plugins()
    }

    /// The names of the plugins loaded, sorted.
    pub fn names(&self) -> Vec<String> {
        self.shared.registry().plugins.keys().cloned().collect()
    }

    /// Removes the plugin `name` from the host and shuts it down (the same as
    /// [`Plugin::shutdown`], which also gives up the name) (calls in flight get its
    /// manifest's `timeouts.shutdown` to finish). Handles to it still held elsewhere then
    /// fail with [`CallError::Stopped`](crate::CallError::Stopped).
    pub async fn unload(&self, name: &str) -> Result<(), Error> {
        let plugin = {
            let mut registry = self.shared.registry();
            match registry.plugins.remove(name) {
                Some(p) => p,
                None => {
                    return Err(LoadError::NotLoaded {
                        plugin: name.to_string(),
                        loaded: registry.plugins.keys().cloned().collect(),
                    }
                    .into())
                }
            }
        };
        plugin.shutdown().await;
        Ok(())
    }

    /// Shuts every plugin down at once (each with its manifest's `timeouts.shutdown`
    /// grace for calls in flight) and empties the registry; returns when every worker
    /// has exited.
    pub async fn shutdown(&self) {
        let plugins: Vec<Plugin> = {
            let mut registry = self.shared.registry();
            std::mem::take(&mut registry.plugins)
                .into_values()
                .collect()
        };
        let stops: Vec<_> = plugins.iter().map(|p| p.shutdown()).collect();
        crate::backend::join_all(stops).await;
    }

    /// Reserves the manifest's name for a load in progress.
    fn reserve(&self, manifest: &Manifest) -> Result<Reservation<'_>, LoadError> {
        let mut registry = self.shared.registry();
        let name = manifest.name.clone();
        let existing = match registry.plugins.get(&name) {
            Some(p) => Some(
                p.manifest()
                    .path
                    .as_ref()
                    .map_or("an inline manifest".to_string(), |p| {
                        p.display().to_string()
                    }),
            ),
            None if registry.loading.contains(&name) => {
                Some("a load still in progress".to_string())
            }
            None => None,
        };
        if let Some(existing) = existing {
            return Err(LoadError::NameTaken {
                plugin: name,
                existing,
            });
        }
        registry.loading.insert(name.clone());
        Ok(Reservation {
            shared: &self.shared,
            name,
        })
    }

    /// Starts the plugin a manifest describes (no registry).
    async fn start(&self, manifest: Manifest) -> Result<Plugin, Error> {
        let host_abi = crate::abi_version();
        if !manifest.api.matches(&host_abi) {
            return Err(LoadError::ApiRequirement {
                plugin: manifest.name.clone(),
                required: manifest.api.clone(),
                host: host_abi,
            }
            .into());
        }
        let library = manifest.resolve_library(&self.shared.config.search_paths)?;
        // An absolute path, so the system loader never searches its own paths instead.
        let library = library.canonicalize().unwrap_or(library);
        let request = PermissionRequest::from_manifest(&manifest);
        let grant = match &self.shared.config.policy {
            Some(policy) => policy(&request),
            None => Grant::deny_all(),
        }
        .effective(&request);
        if request.trust == Trust::Trusted && grant.trust != Trust::Trusted {
            tracing::warn!(
                plugin = %manifest.name,
                "the manifest asks to run in-process (trusted); the app's policy did not grant it, so it runs in a sandboxed worker"
            );
        }
        let imports = Arc::new(self.shared.config.functions.imports_for(
            &manifest.name,
            &manifest.imports,
            Arc::downgrade(&self.shared),
        ));
        if manifest.runtime == crate::Runtime::Wasm {
            return self.load_wasm(manifest, library, grant, imports).await;
        }
        match grant.trust {
            Trust::Trusted => {
                if manifest.instances.is_some_and(|n| n > 1) || manifest.idle_timeout.is_some() {
                    tracing::warn!(
                        plugin = %manifest.name,
                        "`instances` and `idle_timeout` apply to untrusted plugins only; this one runs in-process, once"
                    );
                }
                load_in_host(
                    manifest,
                    library,
                    grant,
                    "loaded in-process",
                    move |m, path| InProcess::load(m, path, imports),
                )
                .await
            }
            Trust::Untrusted => {
                self.load_isolated(manifest, library, grant, imports.clone())
                    .await
            }
        }
    }

    /// Loads a WebAssembly module (`runtime = "wasm"`) into the interpreter.
    #[cfg(feature = "wasm")]
    async fn load_wasm(
        &self,
        manifest: Manifest,
        library: PathBuf,
        grant: Grant,
        imports: Arc<crate::host_fn::Imports>,
    ) -> Result<Plugin, Error> {
        load_in_host(
            manifest,
            library,
            grant,
            "loaded as WebAssembly",
            move |m, path| crate::backend::wasm::Wasm::load(m, path, imports),
        )
        .await
    }

    #[cfg(not(feature = "wasm"))]
    async fn load_wasm(
        &self,
        manifest: Manifest,
        _library: PathBuf,
        _grant: Grant,
        _imports: Arc<crate::host_fn::Imports>,
    ) -> Result<Plugin, Error> {
        Err(LoadError::Unsupported {
            plugin: manifest.name.clone(),
            message: "`runtime = \"wasm\"` needs plugin-host built with its `wasm` feature (on by default)".into(),
        }
        .into())
    }

    #[cfg(any(unix, windows))]
    async fn load_isolated(
        &self,
        manifest: Manifest,
        library: PathBuf,
        grant: Grant,
        imports: Arc<crate::host_fn::Imports>,
    ) -> Result<Plugin, Error> {
        use crate::backend::isolated::{Isolated, Spec};
        let config = &self.shared.config;
        let shim = crate::locate::worker(config.worker_shim.as_deref(), &manifest.name)?;
        let sandbox =
            crate::sandbox::plan(&manifest.name, &library, &grant, config.data_dir.as_deref())?;
        let spec = Spec {
            plugin: manifest.name.as_str().into(),
            shim,
            library: library.clone(),
            config: manifest.config_bytes(),
            limits: manifest.limits.clone(),
            timeouts: manifest.timeouts.clone(),
            restart: manifest.restart.clone(),
            sandbox: sandbox.wire,
            env: sandbox.env,
            tmp_dir: sandbox.tmp_dir,
            instances: manifest.instances.or(config.instances).unwrap_or(1) as usize,
            idle_timeout: manifest.idle_timeout.or(config.idle_timeout),
            imports,
            transport: config.chosen_transport(),
        };
        let instances = spec.instances;
        let (backend, info) = Isolated::load(spec).await?;
        tracing::info!(plugin = %info.name, version = %info.version, instances, "loaded in worker processes");
        Ok(Plugin::new(
            manifest,
            library,
            info,
            grant,
            Box::new(backend),
        ))
    }

    #[cfg(not(any(unix, windows)))]
    async fn load_isolated(
        &self,
        manifest: Manifest,
        _library: PathBuf,
        _grant: Grant,
        _imports: Arc<crate::host_fn::Imports>,
    ) -> Result<Plugin, Error> {
        Err(LoadError::Unsupported {
            plugin: manifest.name.clone(),
            message: "untrusted plugins need the worker process, which is only implemented on Unix and Windows".into(),
        }
        .into())
    }

    /// [`load`](Self::load) for code without an async runtime: blocks this thread.
    pub fn load_blocking(&self, path: impl AsRef<Path>) -> Result<Plugin, Error> {
        futures_lite::future::block_on(self.load(path))
    }
}

/// Loads a plugin that runs in the host process (in-process native, or WebAssembly):
/// `load` runs on the `blocking` pool (it reads files and runs the plugin's `create`).
async fn load_in_host<B: crate::backend::Backend + 'static>(
    manifest: Manifest,
    library: PathBuf,
    grant: Grant,
    loaded: &'static str,
    load: impl FnOnce(&Manifest, &Path) -> Result<(B, crate::plugin::PluginInfo), LoadError>
        + Send
        + 'static,
) -> Result<Plugin, Error> {
    let path = library.clone();
    let (backend, info, manifest) =
        blocking::unblock(move || load(&manifest, &path).map(|(b, i)| (b, i, manifest))).await?;
    tracing::info!(plugin = %info.name, version = %info.version, "{loaded}");
    Ok(Plugin::new(
        manifest,
        library,
        info,
        grant,
        Box::new(backend),
    ))
}
