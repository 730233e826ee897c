//! [`Host`] and [`HostBuilder`]: where plugins are looked for, and loading them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::in_process::InProcess;
use crate::error::{Error, LoadError};
use crate::manifest::{Manifest, Trust};
use crate::permissions::{Grant, PermissionRequest, Policy};
use crate::plugin::Plugin;

/// Configures a [`Host`].
#[derive(Clone, Default)]
pub struct HostBuilder {
    search_paths: Vec<PathBuf>,
    worker_shim: Option<PathBuf>,
    policy: Option<Policy>,
    data_dir: Option<PathBuf>,
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

    /// Where plugins' private data directories (`$DATA_DIR`) are created: one
    /// subdirectory per plugin name. Default: `$XDG_DATA_HOME/plugin-host/data`, else
    /// `~/.local/share/plugin-host/data`.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Builds the host.
    pub fn build(self) -> Result<Host, Error> {
        Ok(Host {
            config: Arc::new(self),
        })
    }
}

/// Loads plugins. Cheap to clone; plugins it loaded live on independently of it.
#[derive(Clone, Debug)]
pub struct Host {
    config: Arc<HostBuilder>,
}

impl Host {
    /// Starts configuring a host.
    pub fn builder() -> HostBuilder {
        HostBuilder::default()
    }

    /// The directories library base names are looked up in.
    pub fn search_paths(&self) -> &[PathBuf] {
        &self.config.search_paths
    }

    /// Reads the manifest at `path` and loads its plugin.
    pub async fn load(&self, path: impl AsRef<Path>) -> Result<Plugin, Error> {
        let path = path.as_ref().to_path_buf();
        let manifest = blocking::unblock(move || Manifest::from_file(path)).await?;
        self.load_manifest(manifest).await
    }

    /// Loads the plugin an already parsed manifest describes.
    pub async fn load_manifest(&self, manifest: Manifest) -> Result<Plugin, Error> {
        let host_abi = crate::abi_version();
        if !manifest.api.matches(&host_abi) {
            return Err(LoadError::ApiRequirement {
                plugin: manifest.name.clone(),
                required: manifest.api.clone(),
                host: host_abi,
            }
            .into());
        }
        let library = manifest.resolve_library(&self.config.search_paths)?;
        // An absolute path, so the system loader never searches its own paths instead.
        let library = library.canonicalize().unwrap_or(library);
        let request = PermissionRequest::from_manifest(&manifest);
        let grant = match &self.config.policy {
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
        match grant.trust {
            Trust::Trusted => {
                let (backend, info, manifest) = blocking::unblock(move || {
                    InProcess::load(&manifest, &library).map(|(b, i)| (b, i, manifest))
                })
                .await?;
                tracing::info!(plugin = %info.name, version = %info.version, "loaded in-process");
                Ok(Plugin::new(manifest, info, grant, Box::new(backend)))
            }
            Trust::Untrusted => self.load_isolated(manifest, library, grant).await,
        }
    }

    #[cfg(unix)]
    async fn load_isolated(
        &self,
        manifest: Manifest,
        library: PathBuf,
        grant: Grant,
    ) -> Result<Plugin, Error> {
        use crate::backend::isolated::{Isolated, Spec};
        let shim = crate::locate::worker(self.config.worker_shim.as_deref(), &manifest.name)?;
        let sandbox = crate::sandbox::plan(
            &manifest.name,
            &library,
            &grant,
            self.config.data_dir.as_deref(),
        )?;
        let spec = Spec {
            plugin: manifest.name.as_str().into(),
            shim,
            library,
            config: manifest.config_bytes(),
            limits: manifest.limits.clone(),
            timeouts: manifest.timeouts.clone(),
            restart: manifest.restart.clone(),
            sandbox: sandbox.wire,
            env: sandbox.env,
            tmp_dir: sandbox.tmp_dir,
        };
        let (backend, info) = Isolated::load(spec).await?;
        tracing::info!(plugin = %info.name, version = %info.version, "loaded in a worker process");
        Ok(Plugin::new(manifest, info, grant, Box::new(backend)))
    }

    #[cfg(not(unix))]
    async fn load_isolated(
        &self,
        manifest: Manifest,
        _library: PathBuf,
        _grant: Grant,
    ) -> Result<Plugin, Error> {
        Err(LoadError::Unsupported {
            plugin: manifest.name.clone(),
            message: "untrusted plugins need the worker process, which is only implemented on Unix so far".into(),
        }
        .into())
    }

    /// [`load`](Self::load) for code without an async runtime: blocks this thread.
    pub fn load_blocking(&self, path: impl AsRef<Path>) -> Result<Plugin, Error> {
        futures_lite::future::block_on(self.load(path))
    }
}
