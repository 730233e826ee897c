//! `faulty`: misbehaves on request, one method per fault, so tests can prove the host
//! survives. Every method takes its parameters as input (MessagePack map; fields are
//! optional where a default makes sense):
//!
//! | method | input | does |
//! |---|---|---|
//! | `echo` | any bytes (raw) | returns them |
//! | `panic` | `{message}` | panics with the message |
//! | `abort` | anything | `std::process::abort()` (SIGABRT) |
//! | `segfault` | anything | writes through a null pointer (SIGSEGV) |
//! | `stack_overflow` | anything | unbounded recursion |
//! | `infinite_loop` | anything | spins forever, ignoring cancellation |
//! | `sleep` | `{ms, cooperative}` | sleeps; if `cooperative`, stops early when cancelled |
//! | `alloc` | `{chunk}` | allocates and touches memory until allocation fails |
//! | `exit` | `{code}` | `std::process::exit(code)` mid-call |
//! | `output` | `{bytes}` | returns that many bytes (MessagePack binary) |
//! | `progress` | `{steps}` | reports progress `steps` times, returns `steps` |
//! | `fail` | `{message}` | returns an error with the message |
//! | `wire` | `{mode}` | writes to the worker's socket (Windows: pipe) behind its back (Linux, Windows; isolated only): `garbage`, `oversized` (a length past any limit), `unknown_reply` (a reply to a call never made), `truncated` (half a frame, then exit) |
//! | `stderr_flood` | `{bytes, newline, abort}` | writes `bytes` bytes to stderr (one line without a newline unless `newline`: then lines of 100 bytes); then aborts if `abort` |
//! | `huge_log` | `{bytes, progress}` | logs one message of `bytes` bytes (and, if `progress`, reports progress with one), returns `bytes` |
//! | `bogus_output` | `{len}` | returns a 16-byte buffer that claims to hold `len` bytes (the ABI's `len` lies; see [`plugin_api_entry`]) |
//! | `host_call_then_crash` | a string: a host function's name | calls that host function (`ctx.host_call_raw`, with the name's bytes as input; it must be in the manifest's `imports`), then `std::process::abort()` (SIGABRT) whatever it answered |
//!
//! Configuration (`[config]`): `create_sleep_ms`, `create_fail`, `create_panic`,
//! `create_abort`, to misbehave in `create()`; `create_abort_if_exists = "PATH"` aborts
//! in `create()` while that file exists (a crash loop a test can switch on and off).

use plugin_api::abi::{Buffer, HostContext, PluginDescriptor};
use plugin_api::{Context, CreateContext, Methods, Plugin, PluginError};
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    create_sleep_ms: u64,
    create_fail: Option<String>,
    create_panic: Option<String>,
    create_abort: bool,
    create_abort_if_exists: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "faulty plugin was asked to fail".into()
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
    #[serde(default)]
    cooperative: bool,
}

#[derive(Deserialize)]
struct Alloc {
    #[serde(default = "default_chunk")]
    chunk: usize,
}

fn default_chunk() -> usize {
    64 << 20
}

#[derive(Deserialize)]
struct Exit {
    code: i32,
}

#[derive(Deserialize)]
struct Output {
    bytes: usize,
}

#[derive(Deserialize)]
struct Wire {
    mode: String,
}

/// Where `corrupt_wire` writes.
#[cfg(target_os = "linux")]
struct WireOut {
    socket: std::fs::File,
    ring: Option<Ring>,
}

#[cfg(target_os = "linux")]
impl WireOut {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &self.ring {
            Some(ring) => {
                ring.write(bytes, &mut self.socket);
                Ok(())
            }
            None => std::io::Write::write_all(&mut self.socket, bytes),
        }
    }
}

/// Finds the worker's connection: its only socket (Linux, via /proc).
#[cfg(target_os = "linux")]
fn worker_socket() -> Result<std::fs::File, PluginError> {
    use std::os::fd::BorrowedFd;
    use std::os::unix::fs::FileTypeExt;
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        // The sandbox hides /proc; the worker keeps its connection on descriptor 3.
        // SAFETY: in a worker process descriptor 3 is the connection, open for the
        // process's whole life; the borrow only lives long enough to duplicate it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(3) };
        let file = std::fs::File::from(borrowed.try_clone_to_owned()?);
        if !file.metadata()?.file_type().is_socket() {
            return Err(PluginError::new("descriptor 3 is not the worker's socket"));
        }
        return Ok(file);
    };
    for entry in fds.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("socket:") {
            // SAFETY: the fd was just listed as open in this process, and the borrow only
            // lives long enough to duplicate it into an owned descriptor.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
            return Ok(std::fs::File::from(borrowed.try_clone_to_owned()?));
        }
    }
    Err(PluginError::new(
        "no socket found: not running in a worker process?",
    ))
}

/// The worker's shared region (descriptor 4 when its connection uses shared memory),
/// mapped again by the plugin: where a compromised plugin would write its frames.
#[cfg(target_os = "linux")]
struct Ring {
    base: *mut u8,
}

#[cfg(target_os = "linux")]
impl Ring {
    /// The region's layout (see `plugin_host_protocol::shm`): the capacity at byte 16,
    /// the reply ring's write position at 192, the host's sleep flag at 320, the data at
    /// 4096 (requests) and 4096 + capacity (replies).
    const MAGIC: &'static [u8; 8] = b"PHSHM01\0";

    fn open() -> Option<Ring> {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes into the buffer it is given.
        if unsafe { libc::fstat(4, stat.as_mut_ptr()) } != 0 {
            return None;
        }
        // SAFETY: fstat succeeded, so the buffer is initialised.
        let stat = unsafe { stat.assume_init() };
        let len = usize::try_from(stat.st_size).ok().filter(|&l| l > 4096)?;
        // SAFETY: a new shared mapping of descriptor 4 at an address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                4,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base.cast::<u8>();
        // SAFETY: the mapping is at least 4096 bytes long.
        let magic = unsafe { std::slice::from_raw_parts(base, 8) };
        (magic == Self::MAGIC).then_some(Ring { base })
    }

    /// Appends `bytes` to the reply ring as the worker would, and wakes the host. The
    /// worker's own writer may be publishing a reply at the same moment and write over
    /// them (it read the write position just before this did): they are written again,
    /// after the reply, until they stay.
    fn write(&self, bytes: &[u8], socket: &mut std::fs::File) {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        for _ in 0..20 {
            // SAFETY: offsets inside the region's header (checked by its magic),
            // aligned; the data offsets are reduced modulo the capacity, inside the
            // reply ring.
            let stayed = unsafe {
                let capacity = (*self.base.add(16).cast::<AtomicU64>()).load(Ordering::Acquire);
                let tail = &*self.base.add(192).cast::<AtomicU64>();
                let at = tail.load(Ordering::Acquire);
                let data = self.base.add(4096 + capacity as usize);
                let byte = |i: usize| data.add(((at + i as u64) % capacity) as usize);
                for (i, b) in bytes.iter().enumerate() {
                    *byte(i) = *b;
                }
                tail.store(at + bytes.len() as u64, Ordering::Release);
                let sleeping = &*self.base.add(320).cast::<AtomicU32>();
                if sleeping.swap(0, Ordering::SeqCst) == 1 {
                    let _ = std::io::Write::write(socket, &[1]);
                }
                // A writer racing with this one has finished well within this.
                std::thread::sleep(Duration::from_millis(2));
                bytes.iter().enumerate().all(|(i, b)| *byte(i) == *b)
            };
            if stayed {
                return;
            }
        }
    }
}

/// Windows: the worker's pipe, found as a compromised plugin would find it: the handle
/// number on the worker's command line (`--handle N`).
#[cfg(windows)]
struct WireOut {
    handle: windows_sys::Win32::Foundation::HANDLE,
}

#[cfg(windows)]
impl WireOut {
    fn find() -> Result<WireOut, PluginError> {
        let args: Vec<String> = std::env::args().collect();
        let handle = args
            .iter()
            .position(|a| a == "--handle")
            .and_then(|i| args.get(i + 1))
            .and_then(|h| h.parse::<usize>().ok())
            .ok_or_else(|| PluginError::new("no --handle: not running in a worker process?"))?;
        Ok(WireOut {
            handle: handle as windows_sys::Win32::Foundation::HANDLE,
        })
    }

    /// Writes `bytes` (the pipe is opened for overlapped I/O: one overlapped write, waited
    /// for).
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use windows_sys::Win32::Foundation::{CloseHandle, GetLastError, ERROR_IO_PENDING};
        use windows_sys::Win32::Storage::FileSystem::WriteFile;
        use windows_sys::Win32::System::Threading::CreateEventW;
        use windows_sys::Win32::System::IO::{GetOverlappedResult, OVERLAPPED};
        // SAFETY: an overlapped write of `bytes` on the worker's own pipe handle (open for
        // the process's whole life), waited for before `bytes` and `op` go away; the event
        // is ours and closed at the end.
        unsafe {
            let event = CreateEventW(std::ptr::null(), 1, 0, std::ptr::null());
            if event.is_null() {
                return Err(std::io::Error::last_os_error());
            }
            let mut op: OVERLAPPED = std::mem::zeroed();
            op.hEvent = event;
            let started = WriteFile(
                self.handle,
                bytes.as_ptr(),
                bytes.len() as u32,
                std::ptr::null_mut(),
                &mut op,
            );
            let mut result = Ok(());
            if started == 0 && GetLastError() != ERROR_IO_PENDING {
                result = Err(std::io::Error::last_os_error());
            } else {
                let mut done = 0u32;
                if GetOverlappedResult(self.handle, &op, &mut done, 1) == 0 {
                    result = Err(std::io::Error::last_os_error());
                }
            }
            CloseHandle(event);
            result
        }
    }
}

/// Writes bytes that break the wire protocol, as a compromised plugin could: into the
/// shared region's reply ring when the connection uses shared memory, else the socket
/// (on Windows the pipe).
#[cfg(any(target_os = "linux", windows))]
fn corrupt_wire(mode: &str) -> Result<(), PluginError> {
    #[cfg(target_os = "linux")]
    let mut wire = WireOut {
        socket: worker_socket()?,
        ring: Ring::open(),
    };
    #[cfg(windows)]
    let mut wire = WireOut::find()?;
    match mode {
        "garbage" => wire.write_all(&[
            12, 0, 0, 0, 8, 0, 0, 0, 0xc1, 0xc1, 0xc1, 0xc1, 0xde, 0xad, 0xbe, 0xef,
        ])?,
        "oversized" => wire.write_all(&0xfff0_0000u32.to_le_bytes())?,
        "unknown_reply" => {
            // {"kind": "reply", "id": 2^62, "status": 0} as a MessagePack map.
            let mut head = vec![0x83, 0xa4];
            head.extend_from_slice(b"kind");
            head.push(0xa5);
            head.extend_from_slice(b"reply");
            head.push(0xa2);
            head.extend_from_slice(b"id");
            head.push(0xcf);
            head.extend_from_slice(&(1u64 << 62).to_be_bytes());
            head.push(0xa6);
            head.extend_from_slice(b"status");
            head.push(0x00);
            let mut frame = ((4 + head.len()) as u32).to_le_bytes().to_vec();
            frame.extend_from_slice(&(head.len() as u32).to_le_bytes());
            frame.extend_from_slice(&head);
            wire.write_all(&frame)?;
        }
        "truncated" => {
            wire.write_all(&[100, 0, 0, 0, 8, 0, 0, 0])?;
            std::process::exit(0);
        }
        other => return Err(PluginError::new(format!("unknown mode `{other}`"))),
    }
    // Keep the call running so the host, not this reply, decides what happens next.
    std::thread::sleep(Duration::from_secs(10));
    Ok(())
}

#[derive(Deserialize)]
struct Flood {
    bytes: usize,
    #[serde(default)]
    newline: bool,
    #[serde(default)]
    abort: bool,
}

#[derive(Deserialize)]
struct HugeLog {
    bytes: usize,
    #[serde(default)]
    progress: bool,
}

#[derive(Deserialize)]
struct Bogus {
    len: u64,
}

/// Writes `bytes` bytes to stderr in 64 KiB writes: one line without a newline, or lines of
/// 100 bytes.
fn flood(bytes: usize, newline: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut chunk = vec![b'x'; 64 << 10];
    if newline {
        for line in chunk.chunks_mut(100) {
            if let Some(last) = line.last_mut() {
                *last = b'\n';
            }
        }
    }
    let mut stderr = std::io::stderr().lock();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stderr.write_all(&chunk[..n])?;
        left -= n;
    }
    stderr.flush()
}

#[derive(Deserialize)]
struct Steps {
    steps: u32,
}

struct Faulty;

#[inline(never)]
#[allow(unconditional_recursion)] // the point of `stack_overflow`
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(depth + 1) + frame[0]
}

impl Plugin for Faulty {
    fn create(ctx: &CreateContext<'_>) -> Result<Self, PluginError> {
        let config: Config = ctx.config()?;
        if config.create_sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(config.create_sleep_ms));
        }
        if let Some(message) = config.create_panic {
            panic!("{message}");
        }
        if config.create_abort {
            std::process::abort();
        }
        if let Some(path) = config.create_abort_if_exists {
            if std::path::Path::new(&path).exists() {
                std::process::abort();
            }
        }
        if let Some(message) = config.create_fail {
            return Err(PluginError::new(message));
        }
        Ok(Faulty)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .add_raw("echo", |_: &Faulty, _: &Context<'_>, input: &[u8]| {
                Ok(input.to_vec())
            })
            .add(
                "panic",
                |_: &Faulty, _: &Context<'_>, m: Message| -> Result<(), PluginError> {
                    panic!("{}", m.message)
                },
            )
            .add(
                "fail",
                |_: &Faulty, _: &Context<'_>, m: Message| -> Result<(), PluginError> {
                    Err(PluginError::new(m.message))
                },
            )
            .add(
                "abort",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| -> Result<(), PluginError> {
                    std::process::abort()
                },
            )
            .add(
                "segfault",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| -> Result<(), PluginError> {
                    // SAFETY: deliberately unsound: this method exists to crash its process
                    // with SIGSEGV so tests can prove the host survives it.
                    unsafe { std::ptr::null_mut::<u64>().write_volatile(0xdead) };
                    Ok(())
                },
            )
            .add(
                "stack_overflow",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| Ok(recurse(0)),
            )
            .add(
                "infinite_loop",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| -> Result<(), PluginError> {
                    let mut n = 0u64;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                },
            )
            .add("sleep", |_: &Faulty, ctx: &Context<'_>, s: Sleep| {
                let deadline = std::time::Instant::now() + Duration::from_millis(s.ms);
                while std::time::Instant::now() < deadline {
                    if s.cooperative && ctx.is_cancelled() {
                        return Err(PluginError::new("cancelled"));
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    std::thread::sleep(left.min(Duration::from_millis(5)));
                }
                Ok(s.ms)
            })
            .add(
                "alloc",
                |_: &Faulty, _: &Context<'_>, a: Alloc| -> Result<usize, PluginError> {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        let mut chunk = vec![0u8; a.chunk.max(4096)];
                        for i in (0..chunk.len()).step_by(4096) {
                            chunk[i] = 1;
                        }
                        hoard.push(std::hint::black_box(chunk));
                    }
                },
            )
            .add(
                "exit",
                |_: &Faulty, _: &Context<'_>, e: Exit| -> Result<(), PluginError> {
                    std::process::exit(e.code)
                },
            )
            .add("output", |_: &Faulty, _: &Context<'_>, o: Output| {
                Ok(plugin_api::serde_bytes::ByteBuf::from(vec![
                    0xabu8;
                    o.bytes
                ]))
            })
            .add("wire", |_: &Faulty, _: &Context<'_>, w: Wire| {
                #[cfg(any(target_os = "linux", windows))]
                return corrupt_wire(&w.mode);
                #[cfg(not(any(target_os = "linux", windows)))]
                return Err::<(), _>(PluginError::new(format!(
                    "`wire` ({}) needs Linux or Windows",
                    w.mode
                )));
            })
            .add(
                "stderr_flood",
                |_: &Faulty, _: &Context<'_>, f: Flood| -> Result<usize, PluginError> {
                    flood(f.bytes, f.newline)?;
                    if f.abort {
                        std::process::abort();
                    }
                    Ok(f.bytes)
                },
            )
            .add("huge_log", |_: &Faulty, ctx: &Context<'_>, h: HugeLog| {
                // Starts with a tag a test can look for in its log.
                let mut message = String::with_capacity(h.bytes);
                message.push_str("huge-log:");
                message.extend(std::iter::repeat_n('y', h.bytes.saturating_sub(9)));
                ctx.info(&message);
                if h.progress {
                    ctx.progress(0.5, &message);
                }
                Ok(h.bytes)
            })
            .add("bogus_output", |_: &Faulty, _: &Context<'_>, b: Bogus| {
                // The wrapped `call` (see `plugin_api_entry`) swaps this output for the lie.
                BOGUS_LEN.with(|len| len.set(Some(b.len as usize)));
                Ok(())
            })
            .add(
                "host_call_then_crash",
                |_: &Faulty, ctx: &Context<'_>, function: String| -> Result<(), PluginError> {
                    let outcome = ctx.host_call_raw(&function, function.as_bytes());
                    eprintln!(
                        "faulty: aborting after host function `{function}` answered {}, as asked",
                        match &outcome {
                            Ok(output) => format!("{} bytes", output.len()),
                            Err(e) => format!("{:?}: {e}", e.kind()),
                        }
                    );
                    std::process::abort()
                },
            )
            .add("progress", |_: &Faulty, ctx: &Context<'_>, s: Steps| {
                for i in 1..=s.steps {
                    ctx.progress(i as f64 / s.steps as f64, format!("step {i}"));
                }
                ctx.info(format!("reported {} steps", s.steps));
                Ok(s.steps)
            });
    }
}

// ---- the entry point ------------------------------------------------------------------
//
// What `export_plugin!(Faulty)` would define, with `call` and `free_buffer` wrapped: after
// `bogus_output` the wrapper hands the host a 16-byte buffer whose `len` says `len` bytes,
// as a buggy or hostile plugin could. Such a buffer is recognised in `free_buffer` by
// `len > cap` (never true of the Vec-backed buffers plugin-api hands out).

thread_local! {
    /// Set by `bogus_output` during a call on this thread: the length to lie about.
    static BOGUS_LEN: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Size of the real allocation behind a lying buffer.
const BOGUS_CAP: usize = 16;

static INNER: std::sync::OnceLock<&'static PluginDescriptor> = std::sync::OnceLock::new();

fn inner() -> &'static PluginDescriptor {
    INNER.get().copied().expect("plugin_api_entry ran first")
}

unsafe extern "C" fn wrapped_call(
    instance: *mut std::ffi::c_void,
    method: *const u8,
    method_len: usize,
    input: *const u8,
    input_len: usize,
    host: *const HostContext,
    output: *mut Buffer,
) -> i32 {
    BOGUS_LEN.with(|len| len.set(None));
    let inner = inner();
    // SAFETY: the host's arguments, passed through unchanged.
    let status =
        unsafe { (inner.call)(instance, method, method_len, input, input_len, host, output) };
    let Some(len) = BOGUS_LEN.with(|len| len.take()) else {
        return status;
    };
    if output.is_null() {
        return status;
    }
    // SAFETY: `output` is the host's writable buffer, which the inner call just filled.
    let real = unsafe { std::ptr::replace(output, Buffer::EMPTY) };
    // SAFETY: the inner call's buffer, given back once.
    unsafe { (inner.free_buffer)(real) };
    let bytes: Box<[u8]> = vec![0xc0u8; BOGUS_CAP].into_boxed_slice();
    let ptr = Box::into_raw(bytes) as *mut u8;
    // SAFETY: as above.
    unsafe {
        output.write(Buffer {
            ptr,
            len,
            cap: BOGUS_CAP,
        })
    };
    status
}

unsafe extern "C" fn wrapped_free_buffer(buffer: Buffer) {
    if !buffer.ptr.is_null() && buffer.len > buffer.cap {
        // SAFETY: only `wrapped_call` hands out buffers with `len > cap`: a boxed slice of
        // `cap` bytes, freed here once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(buffer.ptr, buffer.cap)) });
        return;
    }
    // SAFETY: any other buffer is the inner plugin's, given back once.
    unsafe { (inner().free_buffer)(buffer) }
}

/// The plugin's entry point, looked up by the host: `export_plugin!`'s descriptor with
/// `call` and `free_buffer` wrapped (see above).
#[no_mangle]
pub extern "C" fn plugin_api_entry() -> *const PluginDescriptor {
    static EXPORTED: std::sync::OnceLock<Option<plugin_api::export::Exported>> =
        std::sync::OnceLock::new();
    static WRAPPED: std::sync::OnceLock<Option<PluginDescriptor>> = std::sync::OnceLock::new();
    let wrapped = WRAPPED.get_or_init(|| {
        let raw = plugin_api::export::entry::<Faulty>(
            &EXPORTED,
            env!("CARGO_PKG_NAME"),
            env!("CARGO_PKG_VERSION"),
        );
        // SAFETY: a non-null descriptor from `entry` lives in `EXPORTED`, forever.
        let inner: &'static PluginDescriptor = unsafe { raw.as_ref() }?;
        INNER.get_or_init(|| inner);
        Some(PluginDescriptor {
            call: wrapped_call,
            free_buffer: wrapped_free_buffer,
            ..*inner
        })
    });
    match wrapped {
        Some(descriptor) => descriptor,
        None => std::ptr::null(),
    }
}

// The WebAssembly exports for this hand-written entry (nothing on native targets).
plugin_api::wasm_exports!(plugin_api_entry);
