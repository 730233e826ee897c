//! One WebAssembly module and its instances, on the wasmi interpreter: loading and
//! checking a module, the host services it imports, and running one call in slices of
//! fuel.
//!
//! Nothing read from the module's memory is trusted: every pointer and length the module
//! hands over (its descriptor, the buffers it returns, the strings it logs) is checked
//! against the memory's size and the frame limit before it is read, and a module that
//! lies gets an error or a trap, never an out-of-bounds read in the host.

use std::path::Path;
use std::time::{Duration, Instant};

use plugin_api::abi::{emit_status, host_status, status};
use wasmi::{
    Caller, Config, Engine, Linker, Memory, Module, Store, TrapCode, TypedFunc, TypedResumableCall,
    Val,
};
use wasmi_core::{LimiterError, ResourceLimiter};

use crate::backend::ProgressFn;
use crate::cancel::CancelHandle;
use crate::error::LoadError;
use crate::loader::{Descriptor, METHODS_MAX, METHOD_NAMES_MAX, NAME_MAX};
use crate::plugin::Progress;

/// The import module every host service lives in.
pub(crate) const IMPORT_MODULE: &str = "plugin_host";
/// The host services a module may import (all in [`IMPORT_MODULE`]).
const SERVICES: [&str; 7] = [
    "log",
    "progress",
    "is_cancelled",
    "call_host",
    "take_output",
    "emit",
    "panic",
];
/// The largest module file the host reads.
const MODULE_MAX: u64 = 256 << 20;
/// The longest log message or panic text the host copies out (longer ones are cut).
const TEXT_MAX: usize = 64 << 10;
/// Fuel (about one unit per instruction) a call runs on the caller's thread before it
/// moves to a thread of its own: a fraction of a millisecond.
pub(crate) const INLINE_FUEL: u64 = 200_000;
/// Fuel for a module's start function (it cannot be paused, so this is all it gets): about a
/// millisecond. Rust and C plugins have none; a constructor that needs more belongs in
/// `create`.
const START_FUEL: u64 = 2_000_000;
/// Fuel between two looks at the deadline once a call runs on its own thread: about a
/// millisecond.
pub(crate) const SLICE_FUEL: u64 = 2_000_000;

/// What a service import asks of the host that cannot be answered inside the import (it
/// waits on the application): the import stops the module with a [`Suspend`] and the
/// driver answers, then resumes it.
#[derive(Debug)]
pub(crate) enum Request {
    /// `call_host`: run host function `name`; its output length goes to `output_len`.
    HostCall {
        name: String,
        input: Vec<u8>,
        output_len: u32,
    },
    /// `emit`: hand a stream item to the consumer.
    Emit(Vec<u8>),
}

/// The marker error a service import returns to hand its [`Request`] to the driver.
#[derive(Debug)]
struct Suspend;

impl std::fmt::Display for Suspend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("waiting for the host")
    }
}

impl wasmi::errors::HostError for Suspend {}

/// The error a service import returns for a pointer or length outside the module's memory:
/// the module traps, reported as a `bad buffer`.
#[derive(Debug)]
struct BadPointer(String);

impl std::fmt::Display for BadPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl wasmi::errors::HostError for BadPointer {}

/// What the services see of the call running now.
pub(crate) struct CallContext {
    pub progress: Option<ProgressFn>,
    pub cancel: CancelHandle,
    pub streaming: bool,
}

/// A store's own data: the memory cap, the running call, what the module said before
/// it trapped.
pub(crate) struct Guest {
    plugin: std::sync::Arc<str>,
    limiter: Limiter,
    memory: Option<Memory>,
    max_frame: usize,
    /// The call running now (`None` during `create`).
    pub call: Option<CallContext>,
    /// The request a service import left for the driver.
    pub request: Option<Request>,
    /// The last `call_host` output, until `take_output` fetches it.
    pending: Vec<u8>,
    /// The panic message and location the module handed over before trapping.
    pub panic: Option<(String, Option<String>)>,
}

/// Caps the instance's memory; remembers a refused growth for the crash report.
struct Limiter {
    memory: usize,
    refused: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, LimiterError> {
        let allow = desired <= self.memory && maximum.is_none_or(|m| desired <= m);
        self.refused |= !allow;
        Ok(allow)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool, LimiterError> {
        Ok(desired <= 100_000 && maximum.is_none_or(|m| desired <= m))
    }

    fn instances(&self) -> usize {
        1
    }

    fn tables(&self) -> usize {
        4
    }

    fn memories(&self) -> usize {
        1
    }
}

/// How a module's call or `create` ended abnormally.
#[derive(Clone, Debug)]
pub(crate) struct Trap {
    /// A short name: `unreachable`, `out of bounds memory access`, `stack overflow`, ...
    pub kind: String,
    /// What it means for a plugin author.
    pub message: String,
    pub panic: Option<Box<(String, Option<String>)>>,
    /// The memory cap, when a refused growth is why.
    pub memory_limit: Option<u64>,
    /// Why the host stopped the call, when it did (it ran past its deadline).
    pub stopped: Option<String>,
}

/// A loaded module: compiled (lazily) and checked, ready to instantiate.
pub(crate) struct Code {
    module: Module,
    linker: Linker<Guest>,
    pub descriptor: Descriptor,
    pub memory_limit: u64,
    pub max_frame: usize,
}

fn bad(plugin: &str, path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::BadDescriptor {
        plugin: plugin.to_string(),
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Code {
    /// Reads, validates and links the module at `path` (blocking), and reads its
    /// descriptor from a first instance.
    pub fn load(
        plugin: &str,
        path: &Path,
        memory_limit: u64,
        max_frame: u64,
        time_limit: Duration,
    ) -> Result<(Code, Instance), LoadError> {
        let not_wasm = |reason: String| LoadError::NotALibrary {
            plugin: plugin.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let size = std::fs::metadata(path)
            .map_err(|e| not_wasm(e.to_string()))?
            .len();
        if size > MODULE_MAX {
            return Err(not_wasm(format!(
                "the module is {size} bytes, more than the {} MiB a module may have",
                MODULE_MAX >> 20
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| not_wasm(e.to_string()))?;
        let mut config = Config::default();
        config.consume_fuel(true);
        // Debug information and names: nothing the host reads (a release build keeps
        // megabytes of them).
        config.ignore_custom_sections(true);
        // Functions are validated when the module loads and translated on first use. That
        // translation is not charged: it cannot be paused, so a function larger than a slice
        // of fuel could never run. Bytes copied by `memory.copy`/`fill`/`grow` are charged
        // (wasmi's default rate).
        config.fuel_cost(wasmi::CustomFuelCosts {
            bytes_copied_per_fuel: 64,
            fuel_per_bytes_translated: 0,
            fuel_per_bytes_validated: 0,
        });
        let engine = Engine::new(&config);
        let module = Module::new(&engine, &bytes[..])
            .map_err(|e| not_wasm(format!("not a valid WebAssembly module: {e}")))?;
        for import in module.imports() {
            if import.module() != IMPORT_MODULE || !SERVICES.contains(&import.name()) {
                return Err(LoadError::Unsupported {
                    plugin: plugin.to_string(),
                    message: format!(
                        "{}: the module imports `{}::{}`, which the host does not provide: a \
                         wasm plugin gets only the host services of `{IMPORT_MODULE}` (no WASI); \
                         build it for wasm32-unknown-unknown with plugin-api's export_plugin!",
                        path.display(),
                        import.module(),
                        import.name()
                    ),
                });
            }
        }
        let linker = linker(&engine).map_err(|e| bad(plugin, path, e.to_string()))?;
        let mut code = Code {
            module,
            linker,
            descriptor: Descriptor {
                name: String::new(),
                version: String::new(),
                abi: (0, 0),
                methods: Vec::new(),
            },
            memory_limit,
            max_frame: usize::try_from(max_frame).unwrap_or(usize::MAX),
        };
        let started = Instant::now();
        let mut first = code.instantiate(plugin).map_err(|e| match e {
            Started::Load(e) => e,
            Started::Trap(t) => not_wasm(format!("starting the module trapped: {}", t.message)),
        })?;
        code.descriptor =
            first.descriptor(plugin, path, time_limit.saturating_sub(started.elapsed()))?;
        Ok((code, first))
    }

    /// A fresh instance (its plugin not created yet).
    pub fn instantiate(&self, plugin: &str) -> Result<Instance, Started> {
        let guest = Guest {
            plugin: plugin.into(),
            limiter: Limiter {
                memory: usize::try_from(self.memory_limit).unwrap_or(usize::MAX),
                refused: false,
            },
            memory: None,
            max_frame: self.max_frame,
            call: None,
            request: None,
            pending: Vec::new(),
            panic: None,
        };
        let mut store = Box::new(Store::new(self.module.engine(), guest));
        store.limiter(|guest| &mut guest.limiter);
        store
            .set_fuel(START_FUEL)
            .map_err(|e| Started::Load(internal(plugin, e)))?;
        let instance = self
            .linker
            .instantiate_and_start(&mut *store, &self.module)
            .map_err(|e| Started::Trap(trap_of(&e, store.data_mut(), self.memory_limit)))?;
        let missing = |what: &str, e: wasmi::Error| {
            Started::Load(LoadError::Unsupported {
                plugin: plugin.to_string(),
                message: format!(
                    "the module does not export {what} ({e}): build it with plugin-api's \
                     export_plugin! (see docs/abi.md, \"WebAssembly modules\")"
                ),
            })
        };
        let memory = instance
            .get_memory(&*store, "memory")
            .ok_or_else(|| missing("its `memory`", wasmi::Error::new("no memory export")))?;
        store.data_mut().memory = Some(memory);
        macro_rules! export {
            ($name:literal) => {
                instance
                    .get_typed_func(&*store, $name)
                    .map_err(|e| missing(concat!("`", $name, "`"), e))?
            };
        }
        Ok(Instance {
            entry: export!("plugin_api_entry"),
            alloc: export!("plugin_api_alloc"),
            dealloc: export!("plugin_api_dealloc"),
            create: export!("plugin_api_create"),
            call: export!("plugin_api_call"),
            free: export!("plugin_api_free_buffer"),
            memory,
            store,
            scratch: None,
            born: Instant::now(),
        })
    }
}

/// Why an instance could not be made.
pub(crate) enum Started {
    Load(LoadError),
    Trap(Trap),
}

fn internal(plugin: &str, e: wasmi::Error) -> LoadError {
    LoadError::Unsupported {
        plugin: plugin.to_string(),
        message: format!("the WebAssembly engine failed: {e}"),
    }
}

/// An instance of a module: one plugin instance, single-threaded.
pub(crate) struct Instance {
    /// Boxed: a store is large, and instances move in and out of the pool on every call.
    store: Box<Store<Guest>>,
    memory: Memory,
    entry: TypedFunc<(), i32>,
    alloc: TypedFunc<i32, i32>,
    dealloc: TypedFunc<(i32, i32), ()>,
    create: TypedFunc<(i32, i32, i32), i32>,
    call: TypedFunc<(i32, i32, i32, i32, i32), i32>,
    free: TypedFunc<(i32, i32, i32), ()>,
    /// A block of the module's memory kept for inputs: (address, size).
    scratch: Option<(u32, u32)>,
    /// When it was made.
    pub born: Instant,
}

/// What a slice of a call came to.
pub(crate) enum Step {
    /// The module returned: its status and output bytes.
    Done(i32, Vec<u8>),
    /// The module waits for the host: answer with [`Running::answer`].
    Wait(Request),
    /// The slice's fuel ran out; [`Running::resume`] runs another.
    Fuel,
    /// The module trapped (or broke the ABI): the instance is finished.
    Trapped(Trap),
}

impl Instance {
    /// The instance's store data.
    pub fn guest(&mut self) -> &mut Guest {
        self.store.data_mut()
    }

    /// Copies `len` bytes at `addr` out of the module's memory, if they are inside it.
    fn read(&self, addr: u32, len: u32) -> Option<Vec<u8>> {
        read_memory(self.memory.data(&*self.store), addr, len)
    }

    fn read_u32s<const N: usize>(&self, addr: u32) -> Option<[u32; N]> {
        let data = self.memory.data(&*self.store);
        let start = addr as usize;
        let bytes = data.get(start..start.checked_add(4 * N)?)?;
        let mut out = [0u32; N];
        for (word, chunk) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        Some(out)
    }

    /// Runs `f` to completion with fuel slices, for at most `limit` (load-time calls).
    fn run_bounded<R>(
        &mut self,
        limit: Duration,
        f: impl FnOnce(&mut Store<Guest>) -> Result<TypedResumableCall<R>, wasmi::Error>,
    ) -> Result<R, Trap>
    where
        R: wasmi::WasmResults,
    {
        let started = Instant::now();
        let memory_limit = u64::try_from(self.store.data().limiter.memory).unwrap_or(u64::MAX);
        let _ = self.store.set_fuel(SLICE_FUEL);
        let mut call = f(&mut self.store);
        loop {
            match call {
                Ok(TypedResumableCall::Finished(r)) => return Ok(r),
                Ok(TypedResumableCall::OutOfFuel(paused)) => {
                    if started.elapsed() > limit {
                        return Err(Trap {
                            kind: "deadline".into(),
                            message: format!("still running after {limit:?}"),
                            panic: None,
                            memory_limit: None,
                            stopped: None,
                        });
                    }
                    let _ = self.store.set_fuel(SLICE_FUEL.max(paused.required_fuel()));
                    call = paused.resume(&mut *self.store);
                }
                Ok(TypedResumableCall::HostTrap(paused)) => {
                    // During `create` the services that wait are refused inside the import;
                    // a suspension here is the module breaking the ABI.
                    return Err(trap_of(
                        paused.host_error(),
                        self.store.data_mut(),
                        memory_limit,
                    ));
                }
                Err(e) => return Err(trap_of(&e, self.store.data_mut(), memory_limit)),
            }
        }
    }

    /// Reads and checks the module's descriptor (name, version, ABI, methods).
    fn descriptor(
        &mut self,
        plugin: &str,
        path: &Path,
        limit: Duration,
    ) -> Result<Descriptor, LoadError> {
        let entry = self.entry;
        let trapped = |t: Trap| {
            bad(
                plugin,
                path,
                format!("`plugin_api_entry` trapped: {}", t.message),
            )
        };
        let addr = self
            .run_bounded(limit, |store| entry.call_resumable(store, ()))
            .map_err(trapped)? as u32;
        if addr == 0 {
            return Err(bad(
                plugin,
                path,
                "the entry function returned a null descriptor",
            ));
        }
        // wasm32 layout: u16 major, u16 minor, then 32-bit pointers and sizes: name,
        // version, methods, method_count (function pointers follow; a wasm host does not
        // use them).
        let outside = || {
            bad(
                plugin,
                path,
                "the descriptor lies outside the module's memory",
            )
        };
        let head = self.read(addr, 4).ok_or_else(outside)?;
        let major = u16::from_le_bytes([head[0], head[1]]);
        let minor = u16::from_le_bytes([head[2], head[3]]);
        if major != plugin_api::abi::ABI_MAJOR || minor > plugin_api::abi::ABI_MINOR {
            return Err(LoadError::AbiMismatch {
                plugin: plugin.to_string(),
                path: path.to_path_buf(),
                found: (major, minor),
                supported: (plugin_api::abi::ABI_MAJOR, plugin_api::abi::ABI_MINOR),
            });
        }
        let [name, version, methods, count] = self
            .read_u32s::<4>(addr.checked_add(4).ok_or_else(outside)?)
            .ok_or_else(outside)?;
        let text = |ptr: u32, what: &str| -> Result<String, LoadError> {
            if ptr == 0 {
                return Err(bad(plugin, path, format!("{what} is null")));
            }
            let data = self.memory.data(&*self.store);
            let start = ptr as usize;
            let rest = data.get(start..).ok_or_else(outside)?;
            let window = &rest[..rest.len().min(NAME_MAX + 1)];
            let end = window.iter().position(|b| *b == 0).ok_or_else(|| {
                bad(
                    plugin,
                    path,
                    format!("{what} is not NUL-terminated within {NAME_MAX} bytes"),
                )
            })?;
            String::from_utf8(window[..end].to_vec())
                .map_err(|_| bad(plugin, path, format!("{what} is not UTF-8")))
        };
        let name = text(name, "name")?;
        let version = text(version, "version")?;
        let count = count as usize;
        if count > METHODS_MAX {
            return Err(bad(
                plugin,
                path,
                format!("method_count {count} is more than the {METHODS_MAX} methods a plugin may declare"),
            ));
        }
        let mut names = Vec::with_capacity(count);
        let mut total = 0usize;
        for i in 0..count {
            let at = methods.checked_add(8 * i as u32).ok_or_else(outside)?;
            let [ptr, len] = self.read_u32s::<2>(at).ok_or_else(outside)?;
            if len as usize > NAME_MAX {
                return Err(bad(
                    plugin,
                    path,
                    format!("method #{i}'s name is {len} bytes long, more than {NAME_MAX}"),
                ));
            }
            total += len as usize;
            if total > METHOD_NAMES_MAX {
                return Err(bad(
                    plugin,
                    path,
                    format!("the method names take more than {METHOD_NAMES_MAX} bytes in all"),
                ));
            }
            let bytes = self.read(ptr, len).ok_or_else(|| {
                bad(
                    plugin,
                    path,
                    format!("method #{i} lies outside the module's memory"),
                )
            })?;
            let method = String::from_utf8(bytes)
                .map_err(|_| bad(plugin, path, format!("method #{i} is not UTF-8")))?;
            names.push(method);
        }
        Ok(Descriptor {
            name,
            version,
            abi: (major, minor),
            methods: names,
        })
    }

    /// The scratch block's size for `need` bytes: room to grow, so inputs of similar sizes
    /// reuse the block.
    fn scratch_size(need: u32) -> u32 {
        need.max(256).saturating_add(need / 4)
    }

    /// Checks the block `plugin_api_alloc(size)` returned and keeps it as the scratch block.
    fn keep_scratch(&mut self, addr: u32, size: u32) -> Result<u32, Trap> {
        let fits = (addr as usize)
            .checked_add(size as usize)
            .is_some_and(|end| addr != 0 && end <= self.memory.data_size(&*self.store));
        if !fits {
            let limiter = &self.store.data().limiter;
            let mut trap = bad_buffer(format!(
                "`plugin_api_alloc({size})` returned {addr:#x}, which is not a block inside the module's memory (out of memory?)"
            ));
            trap.memory_limit = limiter.refused.then_some(limiter.memory as u64);
            return Err(trap);
        }
        self.scratch = Some((addr, size));
        Ok(addr)
    }

    /// Makes sure the scratch block holds `len` bytes; returns its address (load time).
    fn scratch(&mut self, len: usize, limit: Duration) -> Result<u32, Trap> {
        let need = u32::try_from(len).map_err(|_| too_big(len))?;
        if let Some((addr, size)) = self.scratch {
            if size >= need {
                return Ok(addr);
            }
            self.scratch = None;
            let dealloc = self.dealloc;
            self.run_bounded(limit, |store| {
                dealloc.call_resumable(store, (addr as i32, size as i32))
            })?;
        }
        let size = Self::scratch_size(need);
        let alloc = self.alloc;
        let addr =
            self.run_bounded(limit, |store| alloc.call_resumable(store, size as i32))? as u32;
        self.keep_scratch(addr, size)
    }

    /// Writes `parts` one after the other into the scratch block at `base` (which holds
    /// them), followed by a zeroed 12-byte buffer slot (4-aligned); returns their
    /// addresses and the slot's.
    fn write_parts(&mut self, base: u32, parts: &[&[u8]]) -> (Vec<u32>, u32) {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let data = self.memory.data_mut(&mut *self.store);
        let mut at = base as usize;
        let mut addrs = Vec::with_capacity(parts.len());
        for part in parts {
            addrs.push(at as u32);
            data[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        let slot = base as usize + slot_offset(body);
        data[slot..slot + 12].fill(0);
        (addrs, slot as u32)
    }

    /// Writes `parts` into the scratch block (grown if needed, load time).
    fn stage(&mut self, parts: &[&[u8]], limit: Duration) -> Result<(Vec<u32>, u32), Trap> {
        let body: usize = parts.iter().map(|p| p.len()).sum();
        let base = self.scratch(slot_offset(body) + 12, limit)?;
        Ok(self.write_parts(base, parts))
    }

    /// Reads and checks the buffer the module wrote at `slot`: its bytes (copied out) and
    /// its words, to give it back; `None` for an empty buffer.
    fn output(&self, slot: u32) -> Result<Option<Output>, Trap> {
        let [ptr, len, cap] = self.read_u32s::<3>(slot).ok_or_else(|| {
            bad_buffer("the output slot moved outside the module's memory".into())
        })?;
        if ptr == 0 {
            return Ok(None);
        }
        let max = self.store.data().max_frame;
        if len as usize > max {
            return Err(bad_buffer(format!(
                "the output is {len} bytes, more than limits.max_frame ({max} bytes)"
            )));
        }
        let bytes = self.read(ptr, len).ok_or_else(|| {
            bad_buffer(format!(
                "the output buffer ({len} bytes at {ptr:#x}) lies outside the module's memory"
            ))
        })?;
        Ok(Some((bytes, [ptr, len, cap])))
    }

    /// Takes the buffer the module wrote at `slot` and gives it back (load time).
    fn take_buffer(&mut self, slot: u32, limit: Duration) -> Result<Vec<u8>, Trap> {
        let Some((bytes, [ptr, len, cap])) = self.output(slot)? else {
            return Ok(Vec::new());
        };
        let free = self.free;
        self.run_bounded(limit, |store| {
            free.call_resumable(store, (ptr as i32, len as i32, cap as i32))
        })?;
        Ok(bytes)
    }

    /// Creates the plugin instance from MessagePack `config` (blocking; bounded by
    /// `limit`). `Ok(Err(status, message))` when the plugin refused.
    pub fn create_plugin(
        &mut self,
        config: &[u8],
        limit: Duration,
    ) -> Result<Result<(), (i32, String)>, Trap> {
        let (addrs, slot) = self.stage(&[config], limit)?;
        let create = self.create;
        let code = self.run_bounded(limit, |store| {
            create.call_resumable(store, (addrs[0] as i32, config.len() as i32, slot as i32))
        })?;
        let message = self.take_buffer(slot, limit)?;
        Ok(match code {
            status::OK => Ok(()),
            other => Err((other, String::from_utf8_lossy(&message).into_owned())),
        })
    }

    /// Starts `method` with `input`: runs it on this thread for `fuel`.
    pub fn start(mut self, method: &str, input: Vec<u8>, fuel: u64) -> (Running, Step) {
        // A growth refused in an earlier call (that the module survived) is not this call's.
        let guest = self.guest();
        guest.limiter.refused = false;
        // Nothing of an earlier call: a host call's output it did not take, a request.
        guest.pending = Vec::new();
        guest.request = None;
        let mut running = Running {
            instance: self,
            phase: Phase::Stage,
            paused: None,
            input: Some((method.as_bytes().to_vec(), input)),
            out: 0,
            result: None,
        };
        let step = running.stage(fuel);
        (running, step)
    }
}

/// Where a call is: everything the module runs for it (growing the input block, the call,
/// giving back the output) can run out of fuel, so each can be paused and resumed.
#[derive(Clone, Copy)]
enum Phase {
    /// Writing the input (first making room, if the block is too small).
    Stage,
    /// `plugin_api_dealloc` of a block too small.
    Dealloc,
    /// `plugin_api_alloc` of a larger one.
    Alloc { size: u32 },
    /// `plugin_api_call`.
    Call,
    /// `plugin_api_free_buffer` of the output.
    Free,
}

enum Paused {
    /// `plugin_api_alloc` or `plugin_api_call` out of fuel.
    Value(wasmi::TypedResumableCallOutOfFuel<i32>),
    /// `plugin_api_dealloc` or `plugin_api_free_buffer` out of fuel.
    Unit(wasmi::TypedResumableCallOutOfFuel<()>),
    /// `plugin_api_call` waiting on the host.
    Host(wasmi::TypedResumableCallHostTrap<i32>),
}

/// A call in progress: the instance, where the module stopped, what is still to do.
pub(crate) struct Running {
    pub instance: Instance,
    phase: Phase,
    paused: Option<Paused>,
    /// The method name and input, until they are written into the module.
    input: Option<(Vec<u8>, Vec<u8>)>,
    /// Where the output buffer goes (inside the scratch block).
    out: u32,
    /// The status and output, once the call returned (while the output is given back).
    result: Option<(i32, Vec<u8>)>,
}

impl Running {
    fn input_len(&self) -> usize {
        self.input.as_ref().map_or(0, |(m, i)| m.len() + i.len())
    }

    /// Writes the input (making room first if needed), then starts the call.
    fn stage(&mut self, fuel: u64) -> Step {
        let len = slot_offset(self.input_len()) + 12;
        let Ok(need) = u32::try_from(len) else {
            return Step::Trapped(too_big(len));
        };
        match self.instance.scratch {
            Some((base, size)) if size >= need => {
                let (method, input) = self.input.take().unwrap_or_default();
                let (addrs, out) = self.instance.write_parts(base, &[&method, &input]);
                self.out = out;
                self.phase = Phase::Call;
                let _ = self.instance.store.set_fuel(fuel);
                let call = self.instance.call;
                let args = (
                    addrs[0] as i32,
                    method.len() as i32,
                    addrs[1] as i32,
                    input.len() as i32,
                    out as i32,
                );
                let result = call.call_resumable(&mut *self.instance.store, args);
                self.value(result, fuel)
            }
            Some((addr, size)) => {
                self.instance.scratch = None;
                self.phase = Phase::Dealloc;
                let _ = self.instance.store.set_fuel(fuel);
                let dealloc = self.instance.dealloc;
                let result =
                    dealloc.call_resumable(&mut *self.instance.store, (addr as i32, size as i32));
                self.unit(result, fuel)
            }
            None => self.alloc(Instance::scratch_size(need), fuel),
        }
    }

    fn alloc(&mut self, size: u32, fuel: u64) -> Step {
        self.phase = Phase::Alloc { size };
        let _ = self.instance.store.set_fuel(fuel);
        let alloc = self.instance.alloc;
        let result = alloc.call_resumable(&mut *self.instance.store, size as i32);
        self.value(result, fuel)
    }

    /// What a function returning a value (`alloc`, `call`) came to.
    fn value(&mut self, result: Result<TypedResumableCall<i32>, wasmi::Error>, fuel: u64) -> Step {
        match result {
            Ok(TypedResumableCall::Finished(value)) => match self.phase {
                Phase::Alloc { size } => match self.instance.keep_scratch(value as u32, size) {
                    Ok(_) => self.stage(fuel),
                    Err(trap) => Step::Trapped(trap),
                },
                Phase::Call => match self.instance.output(self.out) {
                    Ok(None) => Step::Done(value, Vec::new()),
                    Ok(Some((bytes, [ptr, len, cap]))) => {
                        self.result = Some((value, bytes));
                        self.phase = Phase::Free;
                        let _ = self.instance.store.set_fuel(fuel);
                        let free = self.instance.free;
                        let result = free.call_resumable(
                            &mut *self.instance.store,
                            (ptr as i32, len as i32, cap as i32),
                        );
                        self.unit(result, fuel)
                    }
                    Err(trap) => Step::Trapped(trap),
                },
                _ => Step::Trapped(misuse("a value returned in the wrong phase")),
            },
            Ok(TypedResumableCall::OutOfFuel(paused)) => {
                self.paused = Some(Paused::Value(paused));
                Step::Fuel
            }
            Ok(TypedResumableCall::HostTrap(paused)) => {
                let request = self.instance.guest().request.take();
                match request {
                    Some(request)
                        if matches!(self.phase, Phase::Call)
                            && paused.host_error().downcast_ref::<Suspend>().is_some() =>
                    {
                        self.paused = Some(Paused::Host(paused));
                        Step::Wait(request)
                    }
                    _ => Step::Trapped(self.trap(paused.host_error())),
                }
            }
            Err(e) => Step::Trapped(self.trap(&e)),
        }
    }

    /// What a function without a result (`dealloc`, `free_buffer`) came to.
    fn unit(&mut self, result: Result<TypedResumableCall<()>, wasmi::Error>, fuel: u64) -> Step {
        match result {
            Ok(TypedResumableCall::Finished(())) => match self.phase {
                Phase::Dealloc => self.stage(fuel),
                Phase::Free => match self.result.take() {
                    Some((code, bytes)) => Step::Done(code, bytes),
                    None => Step::Trapped(misuse("freed an output it did not have")),
                },
                _ => Step::Trapped(misuse("a function returned in the wrong phase")),
            },
            Ok(TypedResumableCall::OutOfFuel(paused)) => {
                self.paused = Some(Paused::Unit(paused));
                Step::Fuel
            }
            // A service that waits on the host, called from the allocator: not allowed.
            Ok(TypedResumableCall::HostTrap(paused)) => {
                self.instance.guest().request = None;
                Step::Trapped(self.trap(paused.host_error()))
            }
            Err(e) => Step::Trapped(self.trap(&e)),
        }
    }

    fn trap(&mut self, error: &wasmi::Error) -> Trap {
        let memory_limit = self.instance.store.data().limiter.memory as u64;
        trap_of(error, self.instance.guest(), memory_limit)
    }

    /// Runs another slice of `fuel` after the last one ran out.
    /// One instruction may need more than a slice (a `memory.copy` of hundreds of MiB):
    /// it gets what it needs.
    pub fn resume(&mut self, fuel: u64) -> Step {
        match self.paused.take() {
            Some(Paused::Value(paused)) => {
                let _ = self
                    .instance
                    .store
                    .set_fuel(fuel.max(paused.required_fuel()));
                let result = paused.resume(&mut *self.instance.store);
                self.value(result, fuel)
            }
            Some(Paused::Unit(paused)) => {
                let _ = self
                    .instance
                    .store
                    .set_fuel(fuel.max(paused.required_fuel()));
                let result = paused.resume(&mut *self.instance.store);
                self.unit(result, fuel)
            }
            other => {
                self.paused = other;
                Step::Trapped(misuse("resumed while not out of fuel"))
            }
        }
    }

    /// Answers the module's request with `code` (for a host call, `output` is what
    /// `take_output` hands over next) and runs a slice of `fuel`.
    pub fn answer(
        &mut self,
        code: i32,
        output: Vec<u8>,
        output_len_at: Option<u32>,
        fuel: u64,
    ) -> Step {
        let Some(Paused::Host(paused)) = self.paused.take() else {
            return Step::Trapped(misuse("answered while not waiting"));
        };
        if let Some(at) = output_len_at {
            let len = (output.len() as u32).to_le_bytes();
            let data = self.instance.memory.data_mut(&mut *self.instance.store);
            match (at as usize)
                .checked_add(4)
                .and_then(|end| data.get_mut(at as usize..end))
            {
                Some(dest) => dest.copy_from_slice(&len),
                None => {
                    return Step::Trapped(bad_buffer(format!(
                    "`call_host`'s output length pointer {at:#x} lies outside the module's memory"
                )))
                }
            }
            self.instance.guest().pending = output;
        }
        let _ = self.instance.store.set_fuel(fuel);
        let result = paused.resume(&mut *self.instance.store, &[Val::I32(code)]);
        self.value(result, fuel)
    }

    /// The instance back, once the call is done (and only then: a paused call's instance
    /// is in an unknown state and must be dropped).
    pub fn finish(self) -> Option<Instance> {
        self.paused.is_none().then_some(self.instance)
    }
}

/// An output buffer's bytes (copied out) and its words `{ptr, len, cap}`.
type Output = (Vec<u8>, [u32; 3]);

/// Where the 12-byte buffer slot goes after `body` bytes of input (4-aligned).
fn slot_offset(body: usize) -> usize {
    (body + 3) & !3
}

fn misuse(what: &str) -> Trap {
    Trap {
        kind: "host".into(),
        message: format!("internal error: a wasm call {what}"),
        panic: None,
        memory_limit: None,
        stopped: None,
    }
}

/// A buffer or pointer the module handed over that the host could not use.
fn bad_buffer(message: String) -> Trap {
    Trap {
        kind: "bad buffer".into(),
        message,
        panic: None,
        memory_limit: None,
        stopped: None,
    }
}

/// `len` bytes at `addr` of `data`, if all inside.
fn read_memory(data: &[u8], addr: u32, len: u32) -> Option<Vec<u8>> {
    let start = addr as usize;
    let end = start.checked_add(len as usize)?;
    data.get(start..end).map(<[u8]>::to_vec)
}

fn too_big(len: usize) -> Trap {
    Trap {
        kind: "too large".into(),
        message: format!("{len} bytes do not fit a 32-bit module's memory"),
        panic: None,
        memory_limit: None,
        stopped: None,
    }
}

/// Describes a wasmi error for a crash report.
fn trap_of(error: &wasmi::Error, guest: &mut Guest, memory_limit: u64) -> Trap {
    let refused = guest.limiter.refused;
    let (kind, message) = match error.as_trap_code() {
        Some(TrapCode::UnreachableCodeReached) => (
            "unreachable".to_string(),
            "the module executed `unreachable`: a panic, `abort` or `process::exit` in a wasm plugin traps".to_string(),
        ),
        Some(TrapCode::MemoryOutOfBounds) => (
            "out of bounds memory access".to_string(),
            "the module read or wrote outside its memory (in wasm32 a deep recursion that overflows the shadow stack also ends here)".to_string(),
        ),
        Some(TrapCode::StackOverflow) => (
            "stack overflow".to_string(),
            "the module's call stack is exhausted (deep or endless recursion)".to_string(),
        ),
        Some(TrapCode::GrowthOperationLimited) => (
            "out of memory".to_string(),
            format!("the module tried to grow its memory past {} MiB", memory_limit >> 20),
        ),
        Some(code) => (format!("{code:?}"), code.to_string()),
        None => match error.downcast_ref::<BadPointer>() {
            Some(BadPointer(message)) => ("bad buffer".to_string(), message.clone()),
            None => ("error".to_string(), error.to_string()),
        },
    };
    Trap {
        kind,
        message,
        panic: guest.panic.take().map(Box::new),
        memory_limit: refused.then_some(memory_limit),
        stopped: None,
    }
}

/// The host services, as wasm imports.
fn linker(engine: &Engine) -> Result<Linker<Guest>, wasmi::Error> {
    let mut linker = Linker::<Guest>::new(engine);
    linker.func_wrap(
        IMPORT_MODULE,
        "log",
        |mut caller: Caller<'_, Guest>, level: i32, ptr: i32, len: i32| {
            charge(&mut caller, (len as u32 as usize).min(TEXT_MAX));
            let text = text(&caller, ptr, len);
            crate::loader::emit_log(&caller.data().plugin, level as u32, &text);
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "progress",
        |mut caller: Caller<'_, Guest>, fraction: f64, ptr: i32, len: i32| {
            charge(&mut caller, (len as u32 as usize).min(TEXT_MAX));
            let progress = caller.data().call.as_ref().and_then(|c| c.progress.clone());
            if let Some(progress) = progress {
                progress(Progress::new(fraction, &text(&caller, ptr, len)));
            }
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "is_cancelled",
        |caller: Caller<'_, Guest>| {
            caller
                .data()
                .call
                .as_ref()
                .is_some_and(|c| c.cancel.is_cancelled()) as i32
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "call_host",
        |mut caller: Caller<'_, Guest>,
         name: i32,
         name_len: i32,
         input: i32,
         input_len: i32,
         output_len: i32|
         -> Result<i32, wasmi::Error> {
            let refuse = |caller: &mut Caller<'_, Guest>, code: i32, message: String| {
                caller.data_mut().pending = message.into_bytes();
                let len = caller.data().pending.len() as u32;
                write_u32(caller, output_len, len)?;
                Ok(code)
            };
            if caller.data().call.is_none() {
                return refuse(
                    &mut caller,
                    host_status::UNSUPPORTED,
                    "host functions cannot be called during create".into(),
                );
            }
            let max = caller.data().max_frame;
            if input_len as u32 as usize > max {
                return refuse(
                    &mut caller,
                    host_status::LIMIT,
                    format!(
                        "the input is {} bytes, more than limits.max_frame ({max} bytes)",
                        input_len as u32
                    ),
                );
            }
            let name_len = (name_len as u32).min(crate::loader::NAME_MAX as u32) as i32;
            charge(
                &mut caller,
                name_len as u32 as usize + input_len as u32 as usize,
            );
            let name = String::from_utf8_lossy(&bytes(&caller, name, name_len)?).into_owned();
            let input = bytes(&caller, input, input_len)?;
            caller.data_mut().request = Some(Request::HostCall {
                name,
                input,
                output_len: output_len as u32,
            });
            Err(wasmi::Error::host(Suspend))
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "take_output",
        |mut caller: Caller<'_, Guest>, into: i32| -> Result<(), wasmi::Error> {
            let pending = std::mem::take(&mut caller.data_mut().pending);
            charge(&mut caller, pending.len());
            let memory = memory_of(&caller)?;
            let data = memory.data_mut(&mut caller);
            let start = into as u32 as usize;
            match start
                .checked_add(pending.len())
                .and_then(|end| data.get_mut(start..end))
            {
                Some(dest) => {
                    dest.copy_from_slice(&pending);
                    Ok(())
                }
                None => Err(wasmi::Error::host(BadPointer(format!(
                    "`take_output` asked for {} bytes at {start:#x}, outside the module's memory",
                    pending.len()
                )))),
            }
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "emit",
        |mut caller: Caller<'_, Guest>, ptr: i32, len: i32| -> Result<i32, wasmi::Error> {
            let Some(call) = caller.data().call.as_ref() else {
                return Ok(emit_status::UNSUPPORTED);
            };
            if !call.streaming {
                return Ok(emit_status::NOT_STREAM);
            }
            if len as u32 as usize > caller.data().max_frame {
                return Ok(emit_status::LIMIT);
            }
            charge(&mut caller, len as u32 as usize);
            let item = bytes(&caller, ptr, len)?;
            caller.data_mut().request = Some(Request::Emit(item));
            Err(wasmi::Error::host(Suspend))
        },
    )?;
    linker.func_wrap(
        IMPORT_MODULE,
        "panic",
        |mut caller: Caller<'_, Guest>, msg: i32, msg_len: i32, at: i32, at_len: i32| {
            let copied =
                (msg_len as u32 as usize).min(TEXT_MAX) + (at_len as u32 as usize).min(TEXT_MAX);
            charge(&mut caller, copied);
            let message = text(&caller, msg, msg_len);
            let location = text(&caller, at, at_len);
            caller.data_mut().panic = Some((message, (!location.is_empty()).then_some(location)));
        },
    )?;
    Ok(linker)
}

/// Charges a service's work to the module's fuel, as if it were instructions: the bytes it
/// copies (and escapes, for log text), so that a module calling services in a loop runs out
/// of its slice as fast as one computing, and the host gets to look at the deadline.
fn charge(caller: &mut Caller<'_, Guest>, bytes: usize) {
    let cost = 100 + bytes as u64 / 2;
    if let Ok(fuel) = caller.get_fuel() {
        let _ = caller.set_fuel(fuel.saturating_sub(cost));
    }
}

fn write_u32(caller: &mut Caller<'_, Guest>, at: i32, value: u32) -> Result<(), wasmi::Error> {
    let memory = memory_of(caller)?;
    let data = memory.data_mut(caller);
    let start = at as u32 as usize;
    match start
        .checked_add(4)
        .and_then(|end| data.get_mut(start..end))
    {
        Some(dest) => {
            dest.copy_from_slice(&value.to_le_bytes());
            Ok(())
        }
        None => Err(wasmi::Error::host(BadPointer(format!(
            "a pointer the module passed ({start:#x}) lies outside its memory"
        )))),
    }
}

/// The module's memory (an error before instantiation set it: a start function that
/// calls a service).
fn memory_of(caller: &Caller<'_, Guest>) -> Result<Memory, wasmi::Error> {
    caller
        .data()
        .memory
        .ok_or_else(|| wasmi::Error::new("a host service was called before the module was ready"))
}

/// The module's bytes at `ptr`, `len` (an error, which traps the module, when they lie
/// outside its memory).
fn bytes(caller: &Caller<'_, Guest>, ptr: i32, len: i32) -> Result<Vec<u8>, wasmi::Error> {
    let memory = memory_of(caller)?;
    read_memory(memory.data(caller), ptr as u32, len as u32).ok_or_else(|| {
        wasmi::Error::host(BadPointer(format!(
            "the module passed {} bytes at {:#x}, outside its memory",
            len as u32, ptr as u32
        )))
    })
}

/// A log message or panic text: at most [`TEXT_MAX`] bytes, lossy UTF-8, empty when it
/// lies outside the memory.
fn text(caller: &Caller<'_, Guest>, ptr: i32, len: i32) -> String {
    let Some(memory) = caller.data().memory else {
        return String::new();
    };
    let len = (len as u32).min(TEXT_MAX as u32);
    read_memory(memory.data(caller), ptr as u32, len)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
