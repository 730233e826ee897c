//! The WebAssembly face of a plugin: flat exports a wasm host can call, and the host
//! services as imports. [`export_plugin!`](crate::export_plugin) emits the exports (through
//! [`wasm_exports!`](crate::wasm_exports)) when the plugin is built for a wasm target, so a
//! plugin's source does not change between a native library and a `.wasm` module.
//!
//! Why not the native ABI as it is: in wasm the descriptor's function pointers are indices
//! into a table the module does not export, so a host reads the descriptor (name, version,
//! methods: plain data in linear memory) and calls these exports instead. They forward to
//! the descriptor's functions, so a library with a hand-written `plugin_api_entry` gets
//! the same exports from one `wasm_exports!(plugin_api_entry)`. The contract is in
//! `docs/abi.md` ("WebAssembly modules").
//!
//! A wasm module is single-threaded and holds one plugin instance: the host instantiates
//! the module once per concurrent call slot and calls `plugin_api_create` once per
//! instance.

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

use crate::abi::{Buffer, HostContext, PluginDescriptor};

/// The host services a wasm plugin imports (module `plugin_host`).
mod host {
    #[link(wasm_import_module = "plugin_host")]
    extern "C" {
        /// A log record at `level` (see `abi::level`), UTF-8.
        pub fn log(level: u32, message: *const u8, len: usize);
        /// Progress of the current call.
        pub fn progress(fraction: f64, message: *const u8, len: usize);
        /// 1 once the caller gave up on the current call.
        pub fn is_cancelled() -> i32;
        /// Calls host function `name`; returns a `host_status` code and writes the length
        /// of its output (result or message) to `output_len`; `take_output` fetches it.
        pub fn call_host(
            name: *const u8,
            name_len: usize,
            input: *const u8,
            input_len: usize,
            output_len: *mut u32,
        ) -> i32;
        /// Copies the last `call_host` output (its whole length) to `into`.
        pub fn take_output(into: *mut u8);
        /// Emits a stream item; returns an `emit_status` code.
        pub fn emit(item: *const u8, len: usize) -> i32;
        /// Hands the host a panic's message and location before the module traps.
        pub fn panic(message: *const u8, len: usize, location: *const u8, location_len: usize);
    }
}

unsafe extern "C" fn log(_: *mut c_void, level: u32, message: *const u8, len: usize) {
    // SAFETY: an import; the pointer/length describe the caller's live bytes.
    unsafe { host::log(level, message, len) }
}

unsafe extern "C" fn progress(_: *mut c_void, fraction: f64, message: *const u8, len: usize) {
    // SAFETY: as in `log`.
    unsafe { host::progress(fraction, message, len) }
}

unsafe extern "C" fn is_cancelled(_: *mut c_void) -> i32 {
    // SAFETY: an import without arguments.
    unsafe { host::is_cancelled() }
}

unsafe extern "C" fn call_host(
    _: *mut c_void,
    name: *const u8,
    name_len: usize,
    input: *const u8,
    input_len: usize,
    output: *mut Buffer,
) -> i32 {
    let mut len = 0u32;
    // SAFETY: an import; the pointers describe the caller's live bytes and `len`.
    let status = unsafe { host::call_host(name, name_len, input, input_len, &mut len) };
    let mut bytes = Vec::<u8>::with_capacity(len as usize);
    // SAFETY: `take_output` writes exactly the `len` bytes it announced into the
    // vector's spare capacity, which holds at least `len` bytes.
    unsafe {
        host::take_output(bytes.as_mut_ptr());
        bytes.set_len(len as usize);
    }
    if !output.is_null() {
        // SAFETY: the plugin-api caller passes a writable buffer.
        unsafe { output.write(Buffer::from_vec(bytes)) };
    }
    status
}

unsafe extern "C" fn emit(_: *mut c_void, item: *const u8, len: usize) -> i32 {
    // SAFETY: as in `log`.
    unsafe { host::emit(item, len) }
}

unsafe extern "C" fn free_host_buffer(buffer: Buffer) {
    // SAFETY: `call_host` above made every host buffer with `Buffer::from_vec` in this
    // module; plugin-api gives each back once.
    drop(unsafe { buffer.into_vec() });
}

/// The host services, as the plugin's `Context` expects them.
const SERVICES: HostContext = HostContext {
    data: std::ptr::null_mut(),
    log,
    progress,
    is_cancelled,
    call_host,
    emit,
    free_host_buffer,
};

/// The one instance `plugin_api_create` made.
static INSTANCE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

/// A panic traps a wasm module (it cannot unwind); this hook hands the message and
/// location to the host first, for its crash report.
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let message = crate::export::payload_text(info.payload());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            // SAFETY: an import; both pointer/length pairs describe live strings.
            unsafe {
                host::panic(
                    message.as_ptr(),
                    message.len(),
                    location.as_ptr(),
                    location.len(),
                )
            }
        }));
    });
}

/// The descriptor `entry` returns, or null when it has none.
fn descriptor(
    entry: extern "C" fn() -> *const PluginDescriptor,
) -> Option<&'static PluginDescriptor> {
    // SAFETY: a descriptor lives as long as the module (it is never unloaded).
    unsafe { entry().as_ref() }
}

/// The layout of a block for the host: 8-aligned, since the host puts the 12-byte output
/// buffer (three `u32`s the module writes as a `Buffer`) at a 4-aligned offset inside it.
fn block(len: usize) -> Option<std::alloc::Layout> {
    std::alloc::Layout::from_size_align(len.max(1), 8).ok()
}

/// `plugin_api_alloc`: `len` bytes for the host to write into; null when out of memory.
pub fn alloc(len: usize) -> *mut u8 {
    match block(len) {
        // SAFETY: the layout's size is at least 1.
        Some(layout) => unsafe { std::alloc::alloc(layout) },
        None => std::ptr::null_mut(),
    }
}

/// `plugin_api_dealloc`: gives back what [`alloc`] returned for `len`.
///
/// # Safety
/// `ptr` must come from [`alloc`] with this `len`, given back once.
pub unsafe fn dealloc(ptr: *mut u8, len: usize) {
    if let (false, Some(layout)) = (ptr.is_null(), block(len)) {
        // SAFETY: guaranteed by the caller: `alloc(len)` allocated `ptr` with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) }
    }
}

/// `plugin_api_create`: makes this module's one instance from MessagePack `config`.
///
/// # Safety
/// `config`/`config_len` describe readable memory and `error` is writable (the host
/// allocated both with [`alloc`]).
pub unsafe fn create(
    entry: extern "C" fn() -> *const PluginDescriptor,
    config: *const u8,
    config_len: usize,
    error: *mut Buffer,
) -> i32 {
    install_panic_hook();
    let Some(descriptor) = descriptor(entry) else {
        return crate::abi::status::PANIC;
    };
    let mut instance = std::ptr::null_mut();
    let services = SERVICES;
    // SAFETY: the descriptor's own `create`, with the host's arguments and our services.
    let status =
        unsafe { (descriptor.create)(&services, config, config_len, &mut instance, error) };
    if status == crate::abi::status::OK {
        INSTANCE.store(instance, Ordering::Release);
    }
    status
}

/// `plugin_api_call`: calls `method` on the instance with MessagePack `input`.
///
/// # Safety
/// As for the descriptor's `call`: the pointers describe readable memory, `output` is
/// writable; `plugin_api_create` succeeded first.
pub unsafe fn call(
    entry: extern "C" fn() -> *const PluginDescriptor,
    method: *const u8,
    method_len: usize,
    input: *const u8,
    input_len: usize,
    output: *mut Buffer,
) -> i32 {
    let Some(descriptor) = descriptor(entry) else {
        return crate::abi::status::PANIC;
    };
    let instance = INSTANCE.load(Ordering::Acquire);
    let services = SERVICES;
    // SAFETY: the descriptor's own `call`, on the instance `create` made.
    unsafe {
        (descriptor.call)(
            instance, method, method_len, input, input_len, &services, output,
        )
    }
}

/// `plugin_api_free_buffer`: gives back a buffer `create` or `call` wrote.
///
/// # Safety
/// The buffer's fields are exactly those `create`/`call` wrote, given back once.
pub unsafe fn free_buffer(
    entry: extern "C" fn() -> *const PluginDescriptor,
    ptr: *mut u8,
    len: usize,
    cap: usize,
) {
    if let Some(descriptor) = descriptor(entry) {
        // SAFETY: guaranteed by the caller.
        unsafe { (descriptor.free_buffer)(Buffer { ptr, len, cap }) }
    }
}
