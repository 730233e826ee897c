//! The machinery behind [`export_plugin!`](crate::export_plugin): one `extern "C"` entry
//! per plugin type, a descriptor built once, and `catch_unwind` on every entry point so a
//! panic never unwinds into the host.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::abi::{self, Buffer, HostContext, PluginDescriptor, Str};
use crate::{Context, CreateContext, Handler, Methods, Plugin};

/// Everything a plugin exports, built once per library by [`export_plugin!`].
///
/// [`export_plugin!`]: crate::export_plugin
pub struct Exported {
    descriptor: PluginDescriptor,
    // Owners of the memory the descriptor points into.
    _name: CString,
    _version: CString,
    _method_names: Vec<Box<str>>,
    _method_table: Vec<Str>,
}

// SAFETY: `Exported` is immutable after construction; its raw pointers point into the
// heap data it owns, which lives as long as the static that holds it.
unsafe impl Sync for Exported {}
// SAFETY: as above.
unsafe impl Send for Exported {}

impl Exported {
    /// Builds the descriptor for plugin type `P` with this name and version.
    pub fn new<P: Plugin>(name: &str, version: &str) -> Exported {
        let mut methods = Methods::<P>::new();
        P::methods(&mut methods);
        let method_names: Vec<Box<str>> = methods.names().map(Box::from).collect();
        let method_table: Vec<Str> = method_names
            .iter()
            .map(|n| Str {
                ptr: n.as_ptr(),
                len: n.len(),
            })
            .collect();
        let name = CString::new(name.replace('\0', "")).unwrap_or_default();
        let version = CString::new(version.replace('\0', "")).unwrap_or_default();
        let descriptor = PluginDescriptor {
            abi_major: abi::ABI_MAJOR,
            abi_minor: abi::ABI_MINOR,
            name: name.as_ptr(),
            version: version.as_ptr(),
            methods: method_table.as_ptr(),
            method_count: method_table.len(),
            create: create::<P>,
            call: call::<P>,
            free_buffer,
            destroy: destroy::<P>,
        };
        Exported {
            descriptor,
            _name: name,
            _version: version,
            _method_names: method_names,
            _method_table: method_table,
        }
    }

    /// The descriptor the entry symbol returns.
    pub fn descriptor(&self) -> *const PluginDescriptor {
        &self.descriptor
    }
}

/// Builds the descriptor inside `catch_unwind`; a panic yields a null pointer, which the
/// host reports as a broken entry point.
pub fn entry<P: Plugin>(
    cell: &'static std::sync::OnceLock<Option<Exported>>,
    name: &str,
    version: &str,
) -> *const PluginDescriptor {
    let exported = cell
        .get_or_init(|| catch_unwind(AssertUnwindSafe(|| Exported::new::<P>(name, version))).ok());
    match exported {
        Some(e) => e.descriptor(),
        None => std::ptr::null(),
    }
}

struct Instance<P> {
    plugin: P,
    methods: HashMap<String, Handler<P>>,
}

/// A panic payload's text.
pub(crate) fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    let message = payload_text(&*payload);
    // Dropping an arbitrary payload could itself panic; leak it instead.
    std::mem::forget(payload);
    message
}

/// Moves `bytes` into `out` for the host; it comes back through [`free_buffer`].
///
/// # Safety
/// `out` must be valid for writes (or null, in which case the bytes are dropped).
unsafe fn write_buffer(out: *mut Buffer, bytes: Vec<u8>) {
    if out.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `out` is valid for writes.
    unsafe { out.write(Buffer::from_vec(bytes)) };
}

/// # Safety
/// `ptr`/`len` must describe readable memory, or `len` must be 0.
unsafe fn slice<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts(ptr, len) }
    }
}

unsafe extern "C" fn create<P: Plugin>(
    host: *const HostContext,
    config: *const u8,
    config_len: usize,
    instance: *mut *mut c_void,
    error: *mut Buffer,
) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host passes a context valid for the duration of this call and a
        // config pointer/length describing readable bytes.
        let (context, config) = unsafe { (Context::from_raw(&*host), slice(config, config_len)) };
        let ctx = CreateContext::new(context, config);
        let plugin = P::create(&ctx)?;
        let mut methods = Methods::<P>::new();
        P::methods(&mut methods);
        let methods = methods.into_entries().into_iter().collect();
        Ok::<_, crate::PluginError>(Box::new(Instance { plugin, methods }))
    }));
    match result {
        Ok(Ok(boxed)) => {
            // SAFETY: the host passes a writable out-pointer.
            unsafe { instance.write(Box::into_raw(boxed).cast()) };
            abi::status::OK
        }
        Ok(Err(e)) => {
            // SAFETY: the host passes a writable buffer.
            unsafe { write_buffer(error, e.message.into_bytes()) };
            abi::status::ERROR
        }
        Err(payload) => {
            // SAFETY: as above.
            unsafe { write_buffer(error, panic_message(payload).into_bytes()) };
            abi::status::PANIC
        }
    }
}

unsafe extern "C" fn call<P: Plugin>(
    instance: *mut c_void,
    method: *const u8,
    method_len: usize,
    input: *const u8,
    input_len: usize,
    host: *const HostContext,
    output: *mut Buffer,
) -> i32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` came from `create::<P>` and is alive until `destroy`; the
        // host guarantees the pointers/lengths describe readable memory for this call.
        let (instance, method, input, context) = unsafe {
            (
                &*(instance as *const Instance<P>),
                slice(method, method_len),
                slice(input, input_len),
                Context::from_raw(&*host),
            )
        };
        let method = String::from_utf8_lossy(method);
        match instance.methods.get(method.as_ref()) {
            Some(handler) => handler(&instance.plugin, &context, input),
            None => Err((
                abi::status::UNKNOWN_METHOD,
                format!("no method named `{method}`"),
            )),
        }
    }));
    let (status, bytes) = match result {
        Ok(Ok(bytes)) => (abi::status::OK, bytes),
        Ok(Err((status, message))) => (status, message.into_bytes()),
        Err(payload) => (abi::status::PANIC, panic_message(payload).into_bytes()),
    };
    // SAFETY: the host passes a writable buffer.
    unsafe { write_buffer(output, bytes) };
    status
}

unsafe extern "C" fn free_buffer(buffer: Buffer) {
    // SAFETY: every non-null buffer we hand out comes from `Buffer::from_vec` in
    // `write_buffer`, and the host gives each back once.
    drop(unsafe { buffer.into_vec() });
}

unsafe extern "C" fn destroy<P: Plugin>(instance: *mut c_void) {
    if instance.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` came from `Box::into_raw` in `create::<P>` and the host
        // destroys it at most once.
        drop(unsafe { Box::from_raw(instance as *mut Instance<P>) });
    }));
}

/// Exports a type implementing [`Plugin`](crate::Plugin) as this library's plugin.
///
/// Use it once, at the crate root of a `cdylib` crate. It defines the `extern "C"` symbol
/// `plugin_api_entry` that hosts look up; the plugin's name and version are the crate's
/// (`CARGO_PKG_NAME`, `CARGO_PKG_VERSION`). Built for a wasm target, the library also
/// exports what a WebAssembly host calls ([`wasm_exports!`](crate::wasm_exports)).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        /// The plugin's entry point, looked up by the host.
        #[no_mangle]
        pub extern "C" fn plugin_api_entry() -> *const $crate::abi::PluginDescriptor {
            static EXPORTED: ::std::sync::OnceLock<
                ::std::option::Option<$crate::export::Exported>,
            > = ::std::sync::OnceLock::new();
            $crate::export::entry::<$plugin>(
                &EXPORTED,
                env!("CARGO_PKG_NAME"),
                env!("CARGO_PKG_VERSION"),
            )
        }
        $crate::wasm_exports!(plugin_api_entry);
    };
}

/// Emits the WebAssembly exports for a library whose entry function is `$entry`
/// (`plugin_api_entry`). [`export_plugin!`] calls it for you; a
/// library that writes its own entry function calls it once, at its crate root. On
/// targets other than wasm it emits nothing.
///
/// The exports (`plugin_api_alloc`, `plugin_api_dealloc`, `plugin_api_create`,
/// `plugin_api_call`, `plugin_api_free_buffer`) are described in `docs/abi.md`.
#[macro_export]
macro_rules! wasm_exports {
    ($entry:path) => {
        #[cfg(target_family = "wasm")]
        const _: () = {
            #[no_mangle]
            extern "C" fn plugin_api_alloc(len: usize) -> *mut u8 {
                $crate::wasm::alloc(len)
            }

            #[no_mangle]
            unsafe extern "C" fn plugin_api_dealloc(ptr: *mut u8, len: usize) {
                // SAFETY: the host gives back what `plugin_api_alloc` returned, once.
                unsafe { $crate::wasm::dealloc(ptr, len) }
            }

            #[no_mangle]
            unsafe extern "C" fn plugin_api_create(
                config: *const u8,
                config_len: usize,
                error: *mut $crate::abi::Buffer,
            ) -> i32 {
                // SAFETY: the host passes memory it allocated with `plugin_api_alloc`.
                unsafe { $crate::wasm::create($entry, config, config_len, error) }
            }

            #[no_mangle]
            unsafe extern "C" fn plugin_api_call(
                method: *const u8,
                method_len: usize,
                input: *const u8,
                input_len: usize,
                output: *mut $crate::abi::Buffer,
            ) -> i32 {
                // SAFETY: as above.
                unsafe { $crate::wasm::call($entry, method, method_len, input, input_len, output) }
            }

            #[no_mangle]
            unsafe extern "C" fn plugin_api_free_buffer(ptr: *mut u8, len: usize, cap: usize) {
                // SAFETY: the host gives back a buffer `create`/`call` wrote, once.
                unsafe { $crate::wasm::free_buffer($entry, ptr, len, cap) }
            }
        };
    };
}
