//! Opening a plugin library through the C ABI: the one place (with `plugin-api`'s
//! `export.rs`) where the host crosses into foreign code. The in-process backend and the
//! worker process both load plugins through it.
//!
//! Order of operations, each a distinct error: find the file, dlopen it, look up the entry
//! symbol, call it, read the ABI version (before any other field), read the name, version
//! and method table, then `create`.

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use plugin_api::abi::{self, Buffer, HostContext, PluginDescriptor};

use crate::error::LoadError;

/// The services a loaded plugin can ask of whoever loaded it.
pub(crate) trait HostServices: Sync {
    /// A log record from the plugin.
    fn log(&self, level: u32, message: &str);
    /// A progress report for the current call.
    fn progress(&self, fraction: f64, message: &str);
    /// Whether the current call was cancelled.
    fn is_cancelled(&self) -> bool;
}

/// An open library and its descriptor. Libraries are never unloaded (thread-local
/// destructors running after `dlclose` crash processes), so the descriptor is `'static`.
pub(crate) struct Library {
    descriptor: &'static PluginDescriptor,
}

/// What a library says about itself.
#[derive(Clone, Debug, Default)]
pub(crate) struct Descriptor {
    pub name: String,
    pub version: String,
    pub abi: (u16, u16),
    pub methods: Vec<String>,
}

impl Library {
    /// Opens `path` and validates its descriptor. `plugin` names the plugin in errors.
    pub fn open(path: &Path, plugin: &str) -> Result<(Library, Descriptor), LoadError> {
        // SAFETY: loading a library runs its initialisers. That is the point of a trusted
        // plugin, and for untrusted ones this runs inside the disposable worker process.
        let library =
            unsafe { libloading::Library::new(path) }.map_err(|e| LoadError::NotALibrary {
                plugin: plugin.to_string(),
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        // Never unloaded: see the type's documentation.
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        let symbol = format!("{}\0", abi::ENTRY_SYMBOL);
        // SAFETY: the symbol's type is fixed by the ABI (`EntryFn`); a library exporting the
        // name with another type breaks the documented contract.
        let entry: libloading::Symbol<'static, abi::EntryFn> =
            unsafe { library.get(symbol.as_bytes()) }.map_err(|_| LoadError::EntryMissing {
                plugin: plugin.to_string(),
                path: path.to_path_buf(),
                symbol: abi::ENTRY_SYMBOL.to_string(),
            })?;
        let bad = |reason: String| LoadError::BadDescriptor {
            plugin: plugin.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        // SAFETY: the entry function takes no arguments and returns a pointer to a
        // descriptor that lives as long as the library (forever, here).
        let raw = unsafe { entry() };
        if raw.is_null() {
            return Err(bad("the entry function returned a null descriptor".into()));
        }
        // The ABI version comes first in every version of the descriptor; read it alone
        // before trusting any other field's layout.
        // SAFETY: `raw` is non-null and points to a descriptor whose first two fields are
        // the u16 ABI major and minor in every ABI version.
        let (major, minor) = unsafe { ((*raw).abi_major, (*raw).abi_minor) };
        if major != abi::ABI_MAJOR || minor > abi::ABI_MINOR {
            return Err(LoadError::AbiMismatch {
                plugin: plugin.to_string(),
                path: path.to_path_buf(),
                found: (major, minor),
                supported: (abi::ABI_MAJOR, abi::ABI_MINOR),
            });
        }
        // SAFETY: the major matches, so the layout is the one this host was built with.
        let descriptor: &'static PluginDescriptor = unsafe { &*raw };
        let text = |ptr: *const std::ffi::c_char, what: &str| -> Result<String, LoadError> {
            if ptr.is_null() {
                return Err(bad(format!("{what} is null")));
            }
            // SAFETY: the ABI requires NUL-terminated strings that live with the library.
            let s = unsafe { CStr::from_ptr(ptr) };
            s.to_str()
                .map(str::to_string)
                .map_err(|_| bad(format!("{what} is not UTF-8")))
        };
        let name = text(descriptor.name, "name")?;
        let version = text(descriptor.version, "version")?;
        if descriptor.method_count > 0 && descriptor.methods.is_null() {
            return Err(bad("method table is null".into()));
        }
        if descriptor.method_count > 100_000 {
            return Err(bad(format!(
                "method_count {} is implausible",
                descriptor.method_count
            )));
        }
        let mut methods = Vec::with_capacity(descriptor.method_count);
        for i in 0..descriptor.method_count {
            // SAFETY: the table holds `method_count` entries (checked non-null above).
            let entry = unsafe { *descriptor.methods.add(i) };
            if entry.len > 0 && entry.ptr.is_null() {
                return Err(bad(format!("method #{i} has a null name")));
            }
            let bytes = if entry.len == 0 {
                &[][..]
            } else {
                // SAFETY: the ABI requires each entry to point at `len` readable bytes.
                unsafe { std::slice::from_raw_parts(entry.ptr, entry.len) }
            };
            let method =
                std::str::from_utf8(bytes).map_err(|_| bad(format!("method #{i} is not UTF-8")))?;
            methods.push(method.to_string());
        }
        let info = Descriptor {
            name,
            version,
            abi: (major, minor),
            methods,
        };
        Ok((Library { descriptor }, info))
    }

    /// Calls the plugin's `create` with MessagePack `config`.
    pub fn create(
        &self,
        plugin: &str,
        config: &[u8],
        services: &dyn HostServices,
    ) -> Result<Instance, LoadError> {
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut error = Buffer::EMPTY;
        let status = with_context(services, |ctx| {
            // SAFETY: all pointers are valid for the duration of the call; the context
            // outlives it.
            unsafe {
                (self.descriptor.create)(
                    ctx,
                    config.as_ptr(),
                    config.len(),
                    &mut instance,
                    &mut error,
                )
            }
        });
        let message = self.take(error);
        match status {
            abi::status::OK if !instance.is_null() => Ok(Instance {
                descriptor: self.descriptor,
                ptr: instance,
            }),
            abi::status::OK => Err(LoadError::CreateFailed {
                plugin: plugin.to_string(),
                message: "create reported success but returned a null instance".into(),
            }),
            abi::status::PANIC => Err(LoadError::CreatePanicked {
                plugin: plugin.to_string(),
                message,
            }),
            _ => Err(LoadError::CreateFailed {
                plugin: plugin.to_string(),
                message,
            }),
        }
    }

    fn take(&self, buffer: Buffer) -> String {
        String::from_utf8_lossy(&take_bytes(self.descriptor, buffer)).into_owned()
    }
}

/// Copies a plugin buffer's bytes and gives the buffer back to the plugin.
fn take_bytes(descriptor: &PluginDescriptor, buffer: Buffer) -> Vec<u8> {
    if buffer.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: a non-null buffer from the plugin holds `len` initialised bytes until we
    // hand it back with `free_buffer`, which we do right after copying.
    let bytes = unsafe { std::slice::from_raw_parts(buffer.ptr, buffer.len) }.to_vec();
    // SAFETY: the buffer came from this plugin and is freed exactly once.
    unsafe { (descriptor.free_buffer)(buffer) };
    bytes
}

/// A plugin instance created by `create`.
pub(crate) struct Instance {
    descriptor: &'static PluginDescriptor,
    ptr: *mut c_void,
}

// SAFETY: the ABI requires `call` to be safe to invoke from several threads at once on one
// instance (Rust plugins are `Send + Sync` by the `Plugin` trait bound; C authors are told
// so in plugin_api.h), and `destroy` runs once, from `Drop`, when no call can be running.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Instance {
    /// Calls `method` and returns the status code and the output (or message) bytes,
    /// still in the plugin's buffer (freed when the [`Output`] is dropped).
    pub fn call(&self, method: &str, input: &[u8], services: &dyn HostServices) -> (i32, Output) {
        let mut output = Buffer::EMPTY;
        let status = with_context(services, |ctx| {
            // SAFETY: the instance is alive (we hold it), and every pointer is valid for
            // the duration of the call.
            unsafe {
                (self.descriptor.call)(
                    self.ptr,
                    method.as_ptr(),
                    method.len(),
                    input.as_ptr(),
                    input.len(),
                    ctx,
                    &mut output,
                )
            }
        });
        (
            status,
            Output {
                descriptor: self.descriptor,
                buffer: output,
            },
        )
    }
}

/// Bytes a plugin returned, still in its own allocation; given back on drop.
pub(crate) struct Output {
    descriptor: &'static PluginDescriptor,
    buffer: Buffer,
}

impl Output {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.buffer.ptr.is_null() || self.buffer.len == 0 {
            return &[];
        }
        // SAFETY: a non-null buffer from the plugin holds `len` initialised bytes until
        // we give it back in `drop`.
        unsafe { std::slice::from_raw_parts(self.buffer.ptr, self.buffer.len) }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if !self.buffer.ptr.is_null() {
            let buffer = std::mem::replace(&mut self.buffer, Buffer::EMPTY);
            // SAFETY: the buffer came from this plugin and is freed exactly once.
            unsafe { (self.descriptor.free_buffer)(buffer) };
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: created by this plugin's `create`; dropped once, with no call running
        // (calls borrow the instance).
        unsafe { (self.descriptor.destroy)(self.ptr) }
    }
}

/// Runs `f` with a `HostContext` whose functions forward to `services`.
fn with_context<R>(services: &dyn HostServices, f: impl FnOnce(*const HostContext) -> R) -> R {
    // A thin pointer to the fat `&dyn` reference, which lives on this stack frame for the
    // duration of `f`.
    let fat: &dyn HostServices = services;
    let data = &fat as *const &dyn HostServices as *mut c_void;
    let ctx = HostContext {
        data,
        log: host_log,
        progress: host_progress,
        is_cancelled: host_is_cancelled,
    };
    f(&ctx)
}

/// # Safety
/// `data` must be the pointer built by `with_context`, still alive.
unsafe fn services<'a>(data: *mut c_void) -> &'a dyn HostServices {
    // SAFETY: guaranteed by the caller.
    unsafe { *(data as *const &dyn HostServices) }
}

/// # Safety
/// `ptr`/`len` must describe readable bytes, or `len` must be 0.
unsafe fn text<'a>(ptr: *const u8, len: usize) -> std::borrow::Cow<'a, str> {
    if ptr.is_null() || len == 0 {
        return "".into();
    }
    // SAFETY: guaranteed by the caller.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(ptr, len) })
}

unsafe extern "C" fn host_log(data: *mut c_void, level: u32, msg: *const u8, len: usize) {
    // A panic must not unwind into the plugin's frames.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the plugin passes back our `data` and a valid message during the call.
        unsafe { services(data).log(level, &text(msg, len)) }
    }));
}

unsafe extern "C" fn host_progress(data: *mut c_void, fraction: f64, msg: *const u8, len: usize) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`.
        unsafe { services(data).progress(fraction, &text(msg, len)) }
    }));
}

unsafe extern "C" fn host_is_cancelled(data: *mut c_void) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`.
        unsafe { services(data).is_cancelled() as i32 }
    }))
    .unwrap_or(0)
}

/// Emits a plugin's log record into `tracing` with the plugin's name as a field.
pub(crate) fn emit_log(plugin: &str, level: u32, message: &str) {
    let message = escape_text(message);
    match level {
        abi::level::ERROR => tracing::error!(target: "plugin", plugin = %plugin, "{message}"),
        abi::level::WARN => tracing::warn!(target: "plugin", plugin = %plugin, "{message}"),
        abi::level::INFO => tracing::info!(target: "plugin", plugin = %plugin, "{message}"),
        abi::level::DEBUG => tracing::debug!(target: "plugin", plugin = %plugin, "{message}"),
        _ => tracing::trace!(target: "plugin", plugin = %plugin, "{message}"),
    }
}

/// Plugin text made safe for one log line: newlines, carriage returns, escape sequences and
/// other control characters (and Unicode line separators and direction overrides) are
/// written as escapes, so a plugin cannot forge host log lines or repaint a terminal.
pub(crate) fn escape_text(text: &str) -> String {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\t')
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod escape_tests {
    use super::escape_text;

    #[test]
    fn control_characters_cannot_forge_log_lines() {
        assert_eq!(escape_text("plain text\tok"), "plain text\tok");
        assert_eq!(
            escape_text("one\nERROR forged\r\u{1b}[31m"),
            "one\\nERROR forged\\r\\u{1b}[31m"
        );
        assert_eq!(escape_text("a\u{2028}b"), "a\\u{2028}b");
        assert!(!escape_text("x\ny\0z").contains('\n'));
    }
}
