//! `plugin-host`: load third-party native plugins without trusting them.
//!
//! A plugin is a shared library built against the `plugin-api` crate (or its C header)
//! and described by a TOML [`Manifest`]. A [`Host`] loads it and hands back a [`Plugin`]
//! to call by method name, with serde types in and out:
//!
//! ```no_run
//! use plugin_host::Host;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize)]
//! struct Greet<'a> { name: &'a str }
//! #[derive(Deserialize)]
//! struct Greeting { message: String }
//!
//! fn main() -> Result<(), plugin_host::Error> {
//!     plugin_host::worker::run_if_worker(); // first: the app is also its plugins' worker
//!     let libs = std::env::var_os("PLUGIN_LIBS").unwrap_or_else(|| "target/release".into());
//!     smol::block_on(async {
//!         let host = Host::builder().search_path(libs).build()?;
//!         let plugin = host.load("plugins/hello/plugin.toml").await?;
//!         let out: Greeting = plugin.call("greet", &Greet { name: "world" }).await?;
//!         println!("{}", out.message);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! Untrusted plugins (the default) each run in a worker process. Call
//! [`worker::run_if_worker()`] as the first line of your `main` and your application is
//! its own worker; or ship the dedicated `worker-shim` executable beside it, or name one
//! with [`HostBuilder::worker_shim`] or [`WORKER_SHIM_ENV`] (`docs/guide.md`, "Shipping:
//! where the worker comes from").
//!
//! Errors say which plugin, which method and what to do next: see [`Error`].
//! `docs/guide.md` is the app developer's guide; `docs/manifest.md` the manifest reference.

mod cancel;
pub mod crash;
pub mod error;
pub mod manifest;
pub mod permissions;
pub mod sandbox;
pub mod worker;

mod backend;
mod host;
mod host_fn;
mod loader;
mod locate;
mod plugin;
mod status;
mod stream;
mod transport;
mod watch;
#[cfg(windows)]
mod winpipe;

/// The wire protocol between the host and its workers (the `plugin-host-protocol` crate).
pub use plugin_host_protocol as protocol;
/// Re-exported: manifests expose `semver` versions and requirements.
pub use semver;
/// Re-exported: a manifest's `[config]` is a `toml::Table`.
pub use toml;

/// Re-exported: [`Plugin::subscribe`] hands out an `async_channel::Receiver`.
pub use async_channel;
pub use cancel::CancelHandle;
pub use crash::{CrashReport, ExitInfo, LimitExceeded};
pub use error::{CallError, Error, LoadError, ManifestError, ManifestErrorKind};
pub use host::{DirLoad, Host, HostBuilder};
pub use host_fn::{HostCallContext, HostError};
pub use locate::WORKER_SHIM_ENV;
pub use manifest::{Manifest, Runtime, Trust};
pub use permissions::{Grant, GrantStore, PermissionRequest, Permissions, SandboxMode};
pub use plugin::{CallOptions, Plugin, PluginInfo, Progress};
pub use status::{EventReceiver, InstanceStatus, PluginEvent, PluginState, Status};
pub use stream::CallStream;
pub use transport::{Transport, TRANSPORT_ENV};

/// The plugin ABI version this host implements, as semver (major.minor.0).
pub fn abi_version() -> semver::Version {
    semver::Version::new(
        plugin_api::abi::ABI_MAJOR.into(),
        plugin_api::abi::ABI_MINOR.into(),
        0,
    )
}
