//! The C ABI between a plugin library and the process that loads it.
//!
//! Everything here is `#[repr(C)]` and mirrors `include/plugin_api.h` field for field.
//! Only bytes and C types cross the boundary: inputs, outputs and the configuration are
//! MessagePack bytes, names are UTF-8. See `docs/abi.md` for the contract in prose.
//!
//! Stability rule: [`PluginDescriptor::abi_major`] and [`PluginDescriptor::abi_minor`] are
//! the first two fields forever, so a loader can read them from a library built against any
//! version before it touches anything else.

use std::ffi::{c_char, c_void};

/// Major version of the ABI described in this module. A loader refuses a library whose
/// major differs.
pub const ABI_MAJOR: u16 = 1;
/// Minor version of the ABI. A loader accepts libraries whose minor is at most its own.
pub const ABI_MINOR: u16 = 1;

/// Name of the one symbol every plugin library exports. Its type is [`EntryFn`].
pub const ENTRY_SYMBOL: &str = "plugin_api_entry";

/// The entry symbol's type: returns a pointer to a descriptor that lives as long as the
/// library stays loaded (libraries are never unloaded).
pub type EntryFn = unsafe extern "C" fn() -> *const PluginDescriptor;

/// Status codes returned by [`PluginDescriptor::create`] and [`PluginDescriptor::call`].
pub mod status {
    /// Success; the output buffer holds the MessagePack result.
    pub const OK: i32 = 0;
    /// The plugin returned an error; the output buffer holds a UTF-8 message.
    pub const ERROR: i32 = 1;
    /// The plugin panicked (the panic was caught); the output buffer holds the message.
    pub const PANIC: i32 = 2;
    /// The method name is not one the plugin exposes.
    pub const UNKNOWN_METHOD: i32 = 3;
    /// The input bytes could not be decoded into the method's input type; the output
    /// buffer holds the decoder's message.
    pub const BAD_INPUT: i32 = 4;
    /// The plugin could not encode its output; the output buffer holds the message.
    pub const BAD_OUTPUT: i32 = 5;
}

/// Status codes returned by [`HostContext::call_host`] (ABI 1.1).
pub mod host_status {
    /// Success; the output buffer holds the host function's output.
    pub const OK: i32 = 0;
    /// The host function returned an error; the output buffer holds its UTF-8 message.
    pub const ERROR: i32 = 1;
    /// The host function panicked (the host caught it); the output holds the message.
    pub const PANIC: i32 = 2;
    /// No host function has that name.
    pub const NOT_FOUND: i32 = 3;
    /// The host function could not decode the input.
    pub const BAD_INPUT: i32 = 4;
    /// The plugin's manifest does not list the function in `imports`.
    pub const NOT_IMPORTED: i32 = 6;
    /// The function exists, but the app did not grant it to this plugin.
    pub const NOT_GRANTED: i32 = 7;
    /// The plugin call that made the host call was cancelled (its deadline passed, its
    /// caller gave up, or the host is going away); stop and return.
    pub const CANCELLED: i32 = 8;
    /// Host functions cannot be called here: during `create`, or the host is too old to
    /// offer them.
    pub const UNSUPPORTED: i32 = 9;
    /// A limit was hit: the input is larger than a frame, or too many host calls are
    /// outstanding at once.
    pub const LIMIT: i32 = 10;
}

/// Status codes returned by [`HostContext::emit`] (ABI 1.1).
pub mod emit_status {
    /// The item was handed to the host.
    pub const OK: i32 = 0;
    /// The consumer is gone (the stream was dropped or the call cancelled): stop emitting
    /// and return.
    pub const CLOSED: i32 = 1;
    /// The caller did not ask for a stream (it used `call`, not `call_stream`).
    pub const NOT_STREAM: i32 = 2;
    /// Streams are not available here: during `create`, or the host is too old.
    pub const UNSUPPORTED: i32 = 9;
    /// The item is larger than a frame.
    pub const LIMIT: i32 = 10;
}

/// Log levels used by [`HostContext::log`].
pub mod level {
    /// Errors.
    pub const ERROR: u32 = 1;
    /// Warnings.
    pub const WARN: u32 = 2;
    /// Information.
    pub const INFO: u32 = 3;
    /// Debugging detail.
    pub const DEBUG: u32 = 4;
    /// Very verbose tracing.
    pub const TRACE: u32 = 5;
}

/// A borrowed UTF-8 string or byte slice: pointer and length, not NUL-terminated.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Str {
    /// First byte; may be dangling when `len == 0`.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

/// A buffer allocated by the plugin and handed to the host, which gives it back through
/// [`PluginDescriptor::free_buffer`] once it has copied or decoded the bytes.
#[repr(C)]
#[derive(Debug)]
pub struct Buffer {
    /// First byte, or null for an empty buffer.
    pub ptr: *mut u8,
    /// Number of initialised bytes.
    pub len: usize,
    /// Whatever the plugin needs to free the buffer (the Rust side stores the capacity).
    pub cap: usize,
}

impl Buffer {
    /// An empty buffer that owns nothing.
    pub const EMPTY: Buffer = Buffer {
        ptr: std::ptr::null_mut(),
        len: 0,
        cap: 0,
    };

    /// Takes `bytes` apart into a buffer that owns them, to hand across the boundary;
    /// [`into_vec`](Self::into_vec) puts it back together on the side that allocated it.
    pub fn from_vec(bytes: Vec<u8>) -> Buffer {
        let mut bytes = std::mem::ManuallyDrop::new(bytes);
        Buffer {
            ptr: bytes.as_mut_ptr(),
            len: bytes.len(),
            cap: bytes.capacity(),
        }
    }

    /// The vector a buffer was made from (an empty one for a null buffer).
    ///
    /// # Safety
    /// A non-null buffer must come from [`from_vec`](Self::from_vec) in this same
    /// library (same allocator), unchanged, and not have been given back already.
    pub unsafe fn into_vec(self) -> Vec<u8> {
        if self.ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: guaranteed by the caller: these are a `Vec<u8>`'s pointer, length and
        // capacity, owned by nobody else.
        unsafe { Vec::from_raw_parts(self.ptr, self.len, self.cap) }
    }
}

/// Services the host offers to a plugin: logging, progress, cancellation, and (ABI 1.1)
/// host functions and output streams.
///
/// During `create` the same structure is passed; progress is ignored there,
/// `is_cancelled` returns 0, and `call_host`/`emit` return `UNSUPPORTED`. During a call it
/// is valid until `call` returns.
///
/// Version rule: fields are only ever appended. A host always passes the structure of its
/// own ABI minor, and never loads a library whose minor is higher than its own, so a
/// library built against minor `n` may use every field of minor `n`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HostContext {
    /// Opaque host data passed back to every function below.
    pub data: *mut c_void,
    /// Emit a log record at `level` (see [`level`]) with a UTF-8 message.
    pub log: unsafe extern "C" fn(data: *mut c_void, level: u32, msg: *const u8, len: usize),
    /// Report progress: `fraction` in `0.0..=1.0` (or negative when unknown) and a UTF-8
    /// message (may be empty).
    pub progress:
        unsafe extern "C" fn(data: *mut c_void, fraction: f64, msg: *const u8, len: usize),
    /// Returns 1 when the caller has given up on this call (timeout, cancellation), else 0.
    pub is_cancelled: unsafe extern "C" fn(data: *mut c_void) -> i32,
    /// ABI 1.1: calls the host function `name` (UTF-8) with `input` and blocks until it
    /// answers. Returns a [`host_status`] code; on any code the host may have written a
    /// buffer to `output` (the result on `OK`, else a UTF-8 message), which the plugin
    /// gives back with `free_host_buffer` (an empty buffer needs no freeing).
    pub call_host: unsafe extern "C" fn(
        data: *mut c_void,
        name: *const u8,
        name_len: usize,
        input: *const u8,
        input_len: usize,
        output: *mut Buffer,
    ) -> i32,
    /// ABI 1.1: emits one stream item (the bytes are copied before it returns). Blocks
    /// while the consumer is behind (backpressure). Returns an [`emit_status`] code.
    pub emit: unsafe extern "C" fn(data: *mut c_void, item: *const u8, len: usize) -> i32,
    /// ABI 1.1: frees a buffer `call_host` wrote. Callable at any time, also after the
    /// call returned; does not take `data`.
    pub free_host_buffer: unsafe extern "C" fn(buffer: Buffer),
}

/// What the entry symbol returns. Read `abi_major`/`abi_minor` first; the remaining fields
/// are only meaningful when the major matches.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDescriptor {
    /// ABI major version the library was built against. Must equal [`ABI_MAJOR`].
    pub abi_major: u16,
    /// ABI minor version the library was built against. Must be at most [`ABI_MINOR`].
    pub abi_minor: u16,
    /// Plugin name, NUL-terminated UTF-8.
    pub name: *const c_char,
    /// Plugin version (semver), NUL-terminated UTF-8.
    pub version: *const c_char,
    /// The method names the plugin exposes.
    pub methods: *const Str,
    /// Number of entries in `methods`.
    pub method_count: usize,
    /// Create an instance from MessagePack configuration bytes. On [`status::OK`] writes the
    /// instance pointer to `instance`; otherwise writes a UTF-8 message into `error`.
    pub create: unsafe extern "C" fn(
        host: *const HostContext,
        config: *const u8,
        config_len: usize,
        instance: *mut *mut c_void,
        error: *mut Buffer,
    ) -> i32,
    /// Call `method` with MessagePack `input`. On [`status::OK`] `output` holds MessagePack;
    /// otherwise a UTF-8 message. May be called from several threads at once.
    pub call: unsafe extern "C" fn(
        instance: *mut c_void,
        method: *const u8,
        method_len: usize,
        input: *const u8,
        input_len: usize,
        host: *const HostContext,
        output: *mut Buffer,
    ) -> i32,
    /// Free a buffer the plugin returned from `create` or `call`.
    pub free_buffer: unsafe extern "C" fn(buffer: Buffer),
    /// Destroy an instance. A host may never call it: a worker process simply ends, and
    /// an in-process host calls it when the last handle to the plugin is gone. Do not
    /// rely on it to persist anything.
    pub destroy: unsafe extern "C" fn(instance: *mut c_void),
}

// SAFETY: a descriptor is immutable after construction and only holds pointers to data
// with static lifetime (strings and method tables owned by the loaded library) and
// function pointers, so sharing it between threads is sound.
unsafe impl Sync for PluginDescriptor {}
// SAFETY: as above; the pointed-to data is 'static and never mutated.
unsafe impl Send for PluginDescriptor {}
