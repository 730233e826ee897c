//! [`Host`] and [`HostBuilder`]: where plugins are looked for, and loading them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::in_process::InProcess;
use crate::error::{Error, LoadError};
use crate::manifest::{Manifest, Trust};
use crate::plugin::Plugin;

/// Configures a [`Host`].
#[derive(Clone, Debug, Default)]
pub struct HostBuilder {
    search_paths: Vec<PathBuf>,
    worker_shim: Option<PathBuf>,
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
        match manifest.trust {
            Trust::Trusted => {
                let (backend, info, manifest) = blocking::unblock(move || {
                    InProcess::load(&manifest, &library).map(|(b, i)| (b, i, manifest))
                })
                .await?;
                tracing::info!(plugin = %info.name, version = %info.version, "loaded in-process");
                Ok(Plugin::new(manifest, info, Box::new(backend)))
            }
            Trust::Untrusted => Err(LoadError::Unsupported {
                plugin: manifest.name.clone(),
                message: "untrusted plugins run in a worker process, which this build does not provide yet; set trust = \"trusted\" in the manifest only if you trust this code".into(),
            }
            .into()),
        }
    }

    /// [`load`](Self::load) for code without an async runtime: blocks this thread.
    pub fn load_blocking(&self, path: impl AsRef<Path>) -> Result<Plugin, Error> {
        futures_lite::future::block_on(self.load(path))
    }
}
