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
    /// Calls a host function for the current call: a `host_status` code and the output
    /// (or a UTF-8 message). Blocks until it answers.
    fn call_host(&self, name: &str, input: &[u8]) -> (i32, Vec<u8>) {
        let _ = input;
        let text = format!(
            "host function `{name}`: host functions can be called from methods, not during create"
        );
        (abi::host_status::UNSUPPORTED, text.into_bytes())
    }
    /// Emits one stream item of the current call: an `emit_status` code. Blocks while the
    /// consumer is behind.
    fn emit(&self, item: &[u8]) -> i32 {
        let _ = item;
        abi::emit_status::UNSUPPORTED
    }
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
        for (what, value) in [("name", &name), ("version", &version)] {
            if value.len() > NAME_MAX {
                return Err(bad(format!(
                    "{what} is {} bytes long, more than {NAME_MAX}",
                    value.len()
                )));
            }
        }
        if descriptor.method_count > 0 && descriptor.methods.is_null() {
            return Err(bad("method table is null".into()));
        }
        if descriptor.method_count > METHODS_MAX {
            return Err(bad(format!(
                "method_count {} is more than the {METHODS_MAX} methods a plugin may declare",
                descriptor.method_count
            )));
        }
        let mut methods = Vec::with_capacity(descriptor.method_count);
        let mut names = 0usize;
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
            if method.len() > NAME_MAX {
                return Err(bad(format!(
                    "method #{i}'s name is {} bytes long, more than {NAME_MAX}",
                    method.len()
                )));
            }
            names = names.saturating_add(method.len());
            if names > METHOD_NAMES_MAX {
                return Err(bad(format!(
                    "the method names take more than {METHOD_NAMES_MAX} bytes in all"
                )));
            }
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

    /// The text of `create`'s error buffer (at most [`MESSAGE_MAX`] bytes of it, cut with a
    /// marker), which is given back to the plugin.
    fn take(&self, buffer: Buffer) -> String {
        let text = if buffer.ptr.is_null() || buffer.len == 0 {
            String::new()
        } else {
            // SAFETY: a non-null buffer from the plugin holds `len` initialised bytes until
            // we hand it back with `free_buffer`, below.
            unsafe { read_message(buffer.ptr, buffer.len) }.into_owned()
        };
        if !buffer.ptr.is_null() {
            // SAFETY: the buffer came from this plugin and is freed exactly once.
            unsafe { (self.descriptor.free_buffer)(buffer) };
        }
        text
    }
}

/// Most methods a plugin may declare (the protocol's limit for `Loaded`).
pub(crate) const METHODS_MAX: usize = 4096;
/// Longest plugin name, version or method name, in bytes (the protocol's limit).
pub(crate) const NAME_MAX: usize = 4096;
/// Most bytes of method names in all: `Loaded` must fit in a frame header (256 KiB).
pub(crate) const METHOD_NAMES_MAX: usize = 128 << 10;

/// The most of one message from a plugin (a log record, a progress message, `create`'s
/// error) that is read, in bytes; the rest is cut, with a marker that says how much
/// (`… [N bytes cut]`). Keeps every such message far below any frame limit.
pub(crate) const MESSAGE_MAX: usize = 16 << 10;

/// Why a plugin buffer of `len` bytes at `ptr` cannot be a buffer at all (a length past
/// `isize::MAX`, or one that wraps around the address space), without touching it.
fn impossible_buffer(ptr: *const u8, len: usize) -> Option<String> {
    if len > isize::MAX as usize || (ptr as usize).checked_add(len).is_none() {
        return Some(format!(
            "the plugin's output buffer claims {len} bytes at {ptr:p}, which no buffer can hold"
        ));
    }
    None
}

/// At most [`MESSAGE_MAX`] bytes of the plugin's `len` bytes at `ptr`, as text cut at a
/// character boundary, with a marker when anything was cut.
///
/// # Safety
/// `ptr` must point at `len` readable bytes (only the first `MESSAGE_MAX` are read), or
/// `len` must be 0.
unsafe fn read_message<'a>(ptr: *const u8, len: usize) -> std::borrow::Cow<'a, str> {
    if ptr.is_null() || len == 0 {
        return "".into();
    }
    let take = len.min(MESSAGE_MAX);
    if (ptr as usize).checked_add(take).is_none() {
        return format!(
            "[a message of {len} bytes at {ptr:p}, which wraps around the address space: not read]"
        )
        .into();
    }
    // SAFETY: guaranteed by the caller for `len >= take` bytes; `take` fits the address
    // space (checked above) and is far below isize::MAX.
    let bytes = unsafe { std::slice::from_raw_parts(ptr, take) };
    if take == len {
        return String::from_utf8_lossy(bytes);
    }
    truncated_text(bytes, take, len as u64).into()
}

/// `bytes`, the start of a text of `total` bytes, as at most `max` bytes of text cut at a
/// character boundary (invalid UTF-8 replaced), followed by `… [N bytes cut]` when anything
/// of the `total` bytes is left out.
pub(crate) fn truncated_text(bytes: &[u8], max: usize, total: u64) -> String {
    let mut end = bytes.len().min(max);
    if (end as u64) < total {
        end = char_boundary_before(bytes, end);
    }
    let mut text = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let cut = total.saturating_sub(end as u64);
    if cut > 0 {
        text.push_str(&cut_marker(cut));
    }
    text
}

/// The marker appended where `cut` bytes of a text were left out.
pub(crate) fn cut_marker(cut: u64) -> String {
    format!("… [{cut} bytes cut]")
}

/// The largest position `<= end` in `bytes` that does not split a UTF-8 sequence (bytes
/// that are not UTF-8 count as whole characters).
pub(crate) fn char_boundary_before(bytes: &[u8], end: usize) -> usize {
    // Look back at most 3 bytes for the lead byte of the sequence `end` may split.
    for back in 1..=3.min(end) {
        let b = bytes[end - back];
        if b & 0xc0 == 0x80 {
            continue; // a continuation byte: keep looking for its lead
        }
        let needed = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if needed > back { end - back } else { end };
    }
    end
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
        // A length no buffer can have is the plugin's bug: that call's BadOutput, decided
        // without touching the memory (the buffer is still given back on drop).
        let impossible = match output.ptr.is_null() {
            true => None,
            false => impossible_buffer(output.ptr, output.len),
        };
        let (status, replaced) = match impossible {
            Some(why) => (abi::status::BAD_OUTPUT, Some(why.into_bytes())),
            None => (status, None),
        };
        (
            status,
            Output {
                descriptor: self.descriptor,
                buffer: output,
                replaced,
            },
        )
    }
}

/// Bytes a plugin returned, still in its own allocation; given back on drop.
pub(crate) struct Output {
    descriptor: &'static PluginDescriptor,
    buffer: Buffer,
    /// The host's message that stands for a buffer whose length is impossible.
    replaced: Option<Vec<u8>>,
}

impl Output {
    /// How many bytes [`as_slice`](Self::as_slice) holds, without touching them: check it
    /// before reading a buffer whose length the plugin may have got wrong.
    pub fn len(&self) -> usize {
        match &self.replaced {
            Some(message) => message.len(),
            None if self.buffer.ptr.is_null() => 0,
            None => self.buffer.len,
        }
    }

    /// The bytes. The length is at most `isize::MAX` and does not wrap around the address
    /// space (`Instance::call` replaced any such buffer with a message).
    pub fn as_slice(&self) -> &[u8] {
        if let Some(message) = &self.replaced {
            return message;
        }
        if self.buffer.ptr.is_null() || self.buffer.len == 0 {
            return &[];
        }
        // SAFETY: a non-null buffer from the plugin holds `len` initialised bytes until
        // we give it back in `drop`; `len` was checked to be a possible slice length.
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
        call_host: host_call_host,
        emit: host_emit,
        free_host_buffer: host_free_buffer,
    };
    f(&ctx)
}

/// # Safety
/// `data` must be the pointer built by `with_context`, still alive.
unsafe fn services<'a>(data: *mut c_void) -> &'a dyn HostServices {
    // SAFETY: guaranteed by the caller.
    unsafe { *(data as *const &dyn HostServices) }
}

// Log and progress messages are read up to `MESSAGE_MAX` bytes: a plugin may log 70 MB
// (the ABI does not forbid it), but the worker must never send a frame the host refuses.

unsafe extern "C" fn host_log(data: *mut c_void, level: u32, msg: *const u8, len: usize) {
    // A panic must not unwind into the plugin's frames.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the plugin passes back our `data` and a valid message during the call.
        unsafe { services(data).log(level, &read_message(msg, len)) }
    }));
}

unsafe extern "C" fn host_progress(data: *mut c_void, fraction: f64, msg: *const u8, len: usize) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`.
        unsafe { services(data).progress(fraction, &read_message(msg, len)) }
    }));
}

unsafe extern "C" fn host_is_cancelled(data: *mut c_void) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_log`.
        unsafe { services(data).is_cancelled() as i32 }
    }))
    .unwrap_or(0)
}

/// Reads a plugin-supplied byte range, or says why it cannot be one.
///
/// # Safety
/// When the range is possible (non-null, length within `isize::MAX` and not wrapping), the
/// plugin guarantees it is readable for the duration of the call.
unsafe fn plugin_bytes<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8], String> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(format!("a null pointer with length {len}"));
    }
    if let Some(why) = impossible_buffer(ptr, len) {
        return Err(why);
    }
    // SAFETY: non-null, a possible length, and readable by the ABI's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Hands `bytes` to the plugin as a buffer it gives back through `host_free_buffer`.
///
/// # Safety
/// `out` must be null or valid for writes.
unsafe fn give_buffer(out: *mut Buffer, bytes: Vec<u8>) {
    if out.is_null() {
        return;
    }
    // Nothing to give back for no bytes: a null buffer.
    let buffer = match bytes.is_empty() {
        true => Buffer::EMPTY,
        false => Buffer::from_vec(bytes),
    };
    // SAFETY: checked non-null; the plugin passes a writable buffer.
    unsafe { out.write(buffer) };
}

unsafe extern "C" fn host_call_host(
    data: *mut c_void,
    name: *const u8,
    name_len: usize,
    input: *const u8,
    input_len: usize,
    output: *mut Buffer,
) -> i32 {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the plugin passes back our `data` and ranges it owns during the call.
        let (name, input) =
            unsafe { (plugin_bytes(name, name_len), plugin_bytes(input, input_len)) };
        let name = match name.map(std::str::from_utf8) {
            Ok(Ok(name)) => name,
            Ok(Err(_)) => {
                return (
                    abi::host_status::NOT_FOUND,
                    b"the host function's name is not UTF-8".to_vec(),
                )
            }
            Err(why) => {
                let text = format!("the host function's name is {why}");
                return (abi::host_status::BAD_INPUT, text.into_bytes());
            }
        };
        let input = match input {
            Ok(input) => input,
            Err(why) => {
                let text = format!("host function `{name}`: the input is {why}");
                return (abi::host_status::BAD_INPUT, text.into_bytes());
            }
        };
        // SAFETY: as above.
        unsafe { services(data).call_host(name, input) }
    }));
    let (status, bytes) = outcome.unwrap_or_else(|_| {
        (
            abi::host_status::PANIC,
            b"the host panicked while running a host call".to_vec(),
        )
    });
    // SAFETY: the plugin passes a writable output buffer (or null).
    unsafe { give_buffer(output, bytes) };
    status
}

unsafe extern "C" fn host_emit(data: *mut c_void, item: *const u8, len: usize) -> i32 {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as in `host_call_host`.
        match unsafe { plugin_bytes(item, len) } {
            // SAFETY: the plugin passes back our `data`, alive during the call.
            Ok(item) => unsafe { services(data).emit(item) },
            Err(_) => abi::emit_status::LIMIT,
        }
    }))
    .unwrap_or(abi::emit_status::CLOSED)
}

unsafe extern "C" fn host_free_buffer(buffer: Buffer) {
    // SAFETY: every non-null buffer the host hands out comes from `Buffer::from_vec` in
    // `give_buffer`; the plugin gives it back once.
    drop(unsafe { buffer.into_vec() });
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
    escape_text_capped(text, usize::MAX).0
}

/// [`escape_text`] of as much of `text` as fits in `max` bytes once escaped (cut at a
/// character), and how many bytes of `text` that took.
pub(crate) fn escape_text_capped(text: &str, max: usize) -> (String, usize) {
    if text.len() <= max && !text.chars().any(needs_escape) {
        return (text.to_string(), text.len());
    }
    let mut out = String::with_capacity(text.len().min(max));
    for (i, c) in text.char_indices() {
        let before = out.len();
        push_escaped(&mut out, c);
        if out.len() > max {
            out.truncate(before);
            return (out, i);
        }
    }
    (out, text.len())
}

/// Whether `c` could break a log line or a terminal.
fn needs_escape(c: char) -> bool {
    (c.is_control() && c != '\t')
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        c if needs_escape(c) => {
            use std::fmt::Write;
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod escape_tests {
    use super::{escape_text, escape_text_capped, truncated_text};

    #[test]
    fn long_text_is_cut_at_a_character_with_a_marker() {
        let text = "é".repeat(10); // 20 bytes
        assert_eq!(truncated_text(text.as_bytes(), 5, 20), "éé… [16 bytes cut]");
        assert_eq!(
            truncated_text(text.as_bytes(), 6, 20),
            "ééé… [14 bytes cut]"
        );
        assert_eq!(truncated_text(b"abc", 3, 3), "abc");
        assert_eq!(truncated_text(b"abc", 3, 10), "abc… [7 bytes cut]");
        assert_eq!(escape_text_capped("a\nb", 10), ("a\\nb".to_string(), 3));
        assert_eq!(escape_text_capped("ab\ncd", 3), ("ab".to_string(), 2));
        assert_eq!(escape_text_capped("abcdef", 4), ("abcd".to_string(), 4));
    }

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
