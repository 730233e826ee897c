//! Everything a plugin author needs to write a plugin for `plugin-host`, and nothing of the
//! host.
//!
//! A plugin is a `cdylib` crate that implements [`Plugin`], declares its methods in
//! [`Plugin::methods`] and exports itself with [`export_plugin!`]. Method inputs and outputs
//! are serde types; they cross the boundary as MessagePack bytes through a small C ABI
//! ([`abi`]), so a plugin built with another compiler version (or written in C against
//! `include/plugin_api.h`) loads the same way. A panic inside a method becomes an error for
//! that one call.
//!
//! ```
//! use plugin_api::{export_plugin, CreateContext, Context, Methods, Plugin, PluginError};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Config { greeting: String }
//!
//! #[derive(Deserialize)]
//! struct Greet { name: String }
//!
//! #[derive(Serialize)]
//! struct Greeting { text: String }
//!
//! struct Hello { greeting: String }
//!
//! impl Plugin for Hello {
//!     fn create(ctx: &CreateContext<'_>) -> Result<Self, PluginError> {
//!         let config: Config = ctx.config()?;
//!         ctx.info("hello plugin created");
//!         Ok(Hello { greeting: config.greeting })
//!     }
//!
//!     fn methods(methods: &mut Methods<Self>) {
//!         methods.add("greet", |this: &Hello, ctx: &Context<'_>, input: Greet| {
//!             ctx.progress(1.0, "done");
//!             Ok(Greeting { text: format!("{}, {}!", this.greeting, input.name) })
//!         });
//!     }
//! }
//!
//! export_plugin!(Hello);
//! # fn main() {}
//! ```
#![warn(missing_docs)]

pub mod abi;
mod config;
#[doc(hidden)]
pub mod export;
mod host_call;
mod stream;
#[cfg(target_family = "wasm")]
#[doc(hidden)]
pub mod wasm;

pub use host_call::{HostCallError, HostCallErrorKind};
pub use stream::{EmitError, EmitErrorKind};

use std::collections::BTreeMap;
use std::fmt;

pub use serde;
pub use serde_bytes;

/// An error a plugin method (or `create`) returns. The host receives its message.
///
/// Any `std::error::Error` converts into it, so `?` works on most results; build one from
/// text with [`PluginError::new`].
pub struct PluginError {
    message: String,
}

impl PluginError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        PluginError {
            message: message.to_string(),
        }
    }

    /// The message the host will see.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl<E: std::error::Error> From<E> for PluginError {
    fn from(err: E) -> Self {
        PluginError::new(err)
    }
}

impl fmt::Debug for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.message, f)
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Log levels for [`Context::log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something looks wrong.
    Warn,
    /// Normal operation.
    Info,
    /// Detail for debugging.
    Debug,
    /// Very verbose detail.
    Trace,
}

impl Level {
    fn to_raw(self) -> u32 {
        match self {
            Level::Error => abi::level::ERROR,
            Level::Warn => abi::level::WARN,
            Level::Info => abi::level::INFO,
            Level::Debug => abi::level::DEBUG,
            Level::Trace => abi::level::TRACE,
        }
    }
}

/// What a method can ask of the host while it runs: logging, progress, cancellation,
/// host functions ([`host_call`](Context::host_call)) and output streams
/// ([`emit`](Context::emit)).
pub struct Context<'a> {
    host: &'a abi::HostContext,
}

impl<'a> Context<'a> {
    /// Wraps the host's services.
    ///
    /// # Safety
    /// `host` must hold function pointers and data that stay valid for `'a`, as the host
    /// guarantees for the duration of a `create` or `call`.
    #[doc(hidden)]
    pub unsafe fn from_raw(host: &'a abi::HostContext) -> Self {
        Context { host }
    }

    /// Sends a log record to the host, which forwards it into its `tracing` output with the
    /// plugin's name attached.
    pub fn log(&self, level: Level, message: impl AsRef<str>) {
        let message = message.as_ref();
        // SAFETY: the host guarantees the function pointer and its data are valid while
        // this context exists; the message pointer/length describe a live &str.
        unsafe {
            (self.host.log)(
                self.host.data,
                level.to_raw(),
                message.as_ptr(),
                message.len(),
            )
        }
    }

    /// Logs at [`Level::Error`].
    pub fn error(&self, message: impl AsRef<str>) {
        self.log(Level::Error, message)
    }

    /// Logs at [`Level::Warn`].
    pub fn warn(&self, message: impl AsRef<str>) {
        self.log(Level::Warn, message)
    }

    /// Logs at [`Level::Info`].
    pub fn info(&self, message: impl AsRef<str>) {
        self.log(Level::Info, message)
    }

    /// Logs at [`Level::Debug`].
    pub fn debug(&self, message: impl AsRef<str>) {
        self.log(Level::Debug, message)
    }

    /// Reports progress of the current call to its caller. `fraction` is in `0.0..=1.0`;
    /// pass a negative value when the total is unknown.
    pub fn progress(&self, fraction: f64, message: impl AsRef<str>) {
        let message = message.as_ref();
        // SAFETY: as in `log`.
        unsafe { (self.host.progress)(self.host.data, fraction, message.as_ptr(), message.len()) }
    }

    /// True once the caller has given up on this call (its deadline passed or it was
    /// cancelled). Long-running methods should check it and return early.
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: as in `log`.
        unsafe { (self.host.is_cancelled)(self.host.data) != 0 }
    }
}

/// What [`Plugin::create`] receives: the manifest's `[config]` table and the host's
/// services.
pub struct CreateContext<'a> {
    context: Context<'a>,
    config: &'a [u8],
}

impl<'a> CreateContext<'a> {
    #[doc(hidden)]
    pub fn new(context: Context<'a>, config: &'a [u8]) -> Self {
        CreateContext { context, config }
    }

    /// Deserializes the manifest's `[config]` table into `T`.
    ///
    /// An absent table deserializes as an empty map, so a struct whose fields all have
    /// defaults (`#[serde(default)]`) works without any configuration.
    ///
    /// A value that does not fit `T` fails with a message naming the field and both types,
    /// such as ``config field `size`: expected u32, found string "big"`` (nested fields as
    /// `output.quality`, array elements as `modes[1]`); a missing field as ``config field
    /// `size`: required field is missing``. Returned from `create` with `?`, that is the
    /// message of the host's load error.
    pub fn config<T: serde::de::DeserializeOwned>(&self) -> Result<T, PluginError> {
        if self.config.is_empty() {
            let empty: BTreeMap<String, ()> = BTreeMap::new();
            let bytes = rmp_serde::to_vec_named(&empty).map_err(PluginError::from)?;
            return config::decode(&bytes).map_err(PluginError::from);
        }
        config::decode(self.config).map_err(PluginError::from)
    }

    /// The raw MessagePack bytes of the `[config]` table (empty when there is none).
    pub fn config_bytes(&self) -> &[u8] {
        self.config
    }
}

impl<'a> std::ops::Deref for CreateContext<'a> {
    type Target = Context<'a>;
    fn deref(&self) -> &Context<'a> {
        &self.context
    }
}

/// The outcome of a method in wire form: MessagePack bytes, or a status code and message.
pub(crate) type RawOutcome = Result<Vec<u8>, (i32, String)>;

type Handler<P> = Box<dyn Fn(&P, &Context<'_>, &[u8]) -> RawOutcome + Send + Sync>;

/// The table of named methods a plugin exposes, filled in by [`Plugin::methods`].
pub struct Methods<P> {
    entries: Vec<(String, Handler<P>)>,
}

impl<P: 'static> Methods<P> {
    pub(crate) fn new() -> Self {
        Methods {
            entries: Vec::new(),
        }
    }

    /// Adds a method whose input and output are serde types (MessagePack on the wire).
    /// A later method with the same name replaces an earlier one.
    pub fn add<I, O, F>(&mut self, name: &str, method: F) -> &mut Self
    where
        I: serde::de::DeserializeOwned,
        O: serde::Serialize,
        F: Fn(&P, &Context<'_>, I) -> Result<O, PluginError> + Send + Sync + 'static,
    {
        let method_name = name.to_string();
        let handler = move |plugin: &P, ctx: &Context<'_>, input: &[u8]| -> RawOutcome {
            let input: I = rmp_serde::from_slice(input).map_err(|e| {
                (
                    abi::status::BAD_INPUT,
                    format!("invalid input for method `{method_name}`: {e}"),
                )
            })?;
            let output = method(plugin, ctx, input).map_err(|e| (abi::status::ERROR, e.message))?;
            rmp_serde::to_vec_named(&output).map_err(|e| {
                (
                    abi::status::BAD_OUTPUT,
                    format!("cannot encode output of `{method_name}`: {e}"),
                )
            })
        };
        self.insert(name, Box::new(handler))
    }

    /// Adds a method that takes and returns raw bytes, unchanged by any encoding.
    pub fn add_raw<F>(&mut self, name: &str, method: F) -> &mut Self
    where
        F: Fn(&P, &Context<'_>, &[u8]) -> Result<Vec<u8>, PluginError> + Send + Sync + 'static,
    {
        let handler = move |plugin: &P, ctx: &Context<'_>, input: &[u8]| -> RawOutcome {
            method(plugin, ctx, input).map_err(|e| (abi::status::ERROR, e.message))
        };
        self.insert(name, Box::new(handler))
    }

    fn insert(&mut self, name: &str, handler: Handler<P>) -> &mut Self {
        self.entries.retain(|(n, _)| n != name);
        self.entries.push((name.to_string(), handler));
        self
    }

    /// The declared method names, in declaration order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    pub(crate) fn into_entries(self) -> Vec<(String, Handler<P>)> {
        self.entries
    }
}

/// The trait a plugin implements. One instance is created per load (per worker process for
/// untrusted plugins) and its methods may be called from several threads at once.
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Builds the instance from the manifest's `[config]` table. An error here fails the
    /// host's `load` with this message.
    fn create(ctx: &CreateContext<'_>) -> Result<Self, PluginError>;

    /// Declares the methods callers can invoke by name.
    fn methods(methods: &mut Methods<Self>);
}
