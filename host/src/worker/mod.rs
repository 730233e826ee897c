//! The worker: the process that runs one untrusted plugin for the host.
//!
//! Applications call [`run_if_worker`] first in `main` to be their own worker; the
//! dedicated `worker-shim` binary (`src/bin/worker-shim.rs`) only calls [`main`]. The
//! rest of this module is the host's business.
//!
//! Inside: connect to the host, handshake, load the plugin, serve calls.
//!
//! Threads: `concurrency + 1` identical threads take turns as the reader (leader/follower).
//! The thread that reads a `Call` runs it itself and writes the `Reply`, so a call costs no
//! thread hand-off; while it runs, another thread holds the reader role and sees `Cancel`,
//! `Ping` and further calls. A call read while all `concurrency` slots are busy waits in a
//! queue that finishing threads drain first.
//!
//! With shared memory ([`shm`](crate::protocol::shm)), the hand-off of the reader role is
//! lazy: the thread that reads a `Call` leaves the role vacant and runs the call; nobody
//! is woken unless the host has a frame that must not wait for that call to end, and then
//! the host wakes one standby thread through the region.

mod app;
mod limits;
#[cfg(target_os = "linux")]
pub(crate) mod sandbox;
#[cfg(target_os = "linux")]
mod seccomp;

use std::collections::{HashMap, VecDeque};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use std::io::BufReader;

pub(crate) use app::opted_in;
pub use app::{run_if_worker, WORKER_ARG};

use crate::loader::{HostServices, Instance, Library};
use crate::protocol::frame::{write_frame, FrameError};
use crate::protocol::{self, Message, WireLimits, WireSandbox};

/// Environment variable with the host's pid; the worker exits if its parent is another.
#[doc(hidden)]
pub const PARENT_ENV: &str = "PLUGIN_HOST_PARENT_PID";
/// Test hook: makes the worker announce this protocol version instead of its own.
#[doc(hidden)]
pub const VERSION_OVERRIDE_ENV: &str = "PLUGIN_HOST_TEST_PROTOCOL_VERSION";

/// Exit code when the worker cannot even reach the host.
const EXIT_NO_HOST: u8 = 70;
/// Exit code on a protocol violation by the host.
const EXIT_PROTOCOL: u8 = 71;

fn die(code: u8, message: &str) -> u8 {
    eprintln!("worker-shim: {message}");
    code
}

/// The worker process's entry point: `worker-shim --fd N [--plugin NAME] [--sandbox MODE]`.
/// The host hands the worker its end of a socket pair as descriptor `N` (by default 0,
/// standard input): there is no socket anyone else could connect to.
///
/// The `worker-shim` binary's `main` is this function. An application that is its own
/// worker calls [`run_if_worker`] instead, which runs this when the process was started
/// as a worker.
pub fn main() -> ExitCode {
    ExitCode::from(run())
}

/// [`main`], returning the exit code as a number.
fn run() -> u8 {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let conn_flag = if cfg!(windows) { "--handle" } else { "--fd" };
    if args.iter().any(|a| a == "--help" || a == "-h") || arg(conn_flag).is_none() {
        eprintln!(
            "worker-shim: runs one untrusted plugin for plugin-host.\n\
             Started by the host, not by hand: worker-shim {conn_flag} N [--plugin NAME] [--sandbox MODE]\n\
             (N is the worker's end of the connection the host made: a socket pair's \
             descriptor on Unix, an inherited pipe handle on Windows)."
        );
        return 2;
    }
    let plugin = arg("--plugin").unwrap_or_else(|| "plugin".into());
    // Taken before standard output is pointed at standard error.
    #[cfg(target_os = "linux")]
    let region_fd = arg("--shm-fd").and_then(|fd| take_region_fd(&fd));
    #[cfg(not(target_os = "linux"))]
    let region: Option<Region> = None;
    let sandboxed = arg("--sandbox").as_deref() != Some("off");
    #[cfg(unix)]
    let fd: i32 = match arg("--fd").unwrap_or_default().parse() {
        Ok(fd) if fd >= 0 => fd,
        _ => return die(EXIT_NO_HOST, "--fd takes a descriptor number"),
    };

    #[cfg(target_os = "linux")]
    {
        // Before anything else: no same-user process may read our memory or copy the
        // connection (ptrace, /proc/<pid>/mem, pidfd_getfd).
        if sandboxed {
            if let Err(message) = sandbox::not_dumpable() {
                return die(EXIT_NO_HOST, &message);
            }
        }
        if let Err(message) = limits::die_with_parent() {
            return die(EXIT_NO_HOST, &message);
        }
    }
    #[cfg(target_os = "macos")]
    if let Err(message) = limits::die_with_parent() {
        return die(EXIT_NO_HOST, &message);
    }
    limits::stdout_to_stderr();
    let version = std::env::var(VERSION_OVERRIDE_ENV).ok();
    if sandboxed {
        // Ours, not the plugin's.
        std::env::remove_var(VERSION_OVERRIDE_ENV);
        std::env::remove_var(PARENT_ENV);
    }
    #[cfg(unix)]
    {
        #[cfg(target_os = "linux")]
        let (conn, region_fd) = match sandbox::settle_fds(fd, region_fd) {
            Ok((conn, region_fd)) => (Ok(conn), region_fd),
            Err(e) => (Err(e), None),
        };
        // The descriptor stays open (at 4) for the worker's life.
        #[cfg(target_os = "linux")]
        let region = region_fd.as_ref().and_then(map_region);
        #[cfg(not(target_os = "linux"))]
        let conn = {
            use std::os::fd::FromRawFd;
            // SAFETY: the host passed this descriptor to us; nothing else in this process
            // owns it.
            Ok::<_, String>(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return die(EXIT_NO_HOST, &format!("cannot take the connection: {e}")),
        };
        let stream = std::os::unix::net::UnixStream::from(conn);
        match serve(stream, version, sandboxed, region) {
            Ok(()) => 0,
            Err(message) => die(EXIT_PROTOCOL, &format!("plugin `{plugin}`: {message}")),
        }
    }
    #[cfg(windows)]
    {
        let handle: usize = match arg("--handle").unwrap_or_default().parse() {
            Ok(h) if h != 0 => h,
            _ => return die(EXIT_NO_HOST, "--handle takes a handle number"),
        };
        windows::quiet_crashes();
        use std::os::windows::io::FromRawHandle;
        // SAFETY: the host made this handle inheritable for this process alone, and
        // nothing else in this process owns it.
        let conn = unsafe { std::os::windows::io::OwnedHandle::from_raw_handle(handle as _) };
        let stream = crate::winpipe::PipeStream::from_handle(conn);
        match serve(stream, version, sandboxed, region) {
            Ok(()) => 0,
            Err(message) => die(EXIT_PROTOCOL, &format!("plugin `{plugin}`: {message}")),
        }
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = (version, plugin, region);
        die(
            EXIT_NO_HOST,
            "the worker process is only implemented on Unix and Windows",
        )
    }
}

#[cfg(unix)]
type Stream = std::os::unix::net::UnixStream;
#[cfg(windows)]
type Stream = crate::winpipe::PipeStream;

/// The connection, shared by the reading and the writing side (`&Stream` does both).
struct SharedStream(Arc<Stream>);

impl std::io::Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl std::io::Write for SharedStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        (&*self.0).write_vectored(bufs)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sending side; whole frames are written under its lock.
type Writer = Mutex<Output>;
/// The receiving side.
type Reader = Input;

/// The shared region, on the worker's side.
#[cfg(target_os = "linux")]
type Region = Arc<protocol::shm::Region>;
#[cfg(not(target_os = "linux"))]
type Region = ();

/// A copy (numbered 10 or more, clear of the descriptors `settle_fds` places) of the
/// region the host passed as descriptor `fd` (`--shm-fd`).
#[cfg(target_os = "linux")]
fn take_region_fd(fd: &str) -> Option<std::os::fd::OwnedFd> {
    let fd: i32 = fd.parse().ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the host passed this descriptor and it is open until `stdout_to_stderr`
    // replaces it, later; the borrow only lives to duplicate it.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match rustix::io::fcntl_dupfd_cloexec(fd, 10) {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("worker-shim: not using shared memory: cannot take its descriptor: {e}");
            None
        }
    }
}

/// Maps the region the host passed. On failure the worker says why on stderr and does
/// not announce `shm`: the host then uses the socket.
#[cfg(target_os = "linux")]
fn map_region(fd: &std::os::fd::OwnedFd) -> Option<Region> {
    match protocol::shm::Region::open(fd) {
        Ok(region) => Some(region),
        Err(e) => {
            eprintln!("worker-shim: not using shared memory: {e}");
            None
        }
    }
}

/// Where frames come from: the socket (buffered: one read can bring in many pipelined
/// calls), or after `Loaded` the shared region's request ring.
enum Input {
    Socket(BufReader<SharedStream>),
    #[cfg(target_os = "linux")]
    Shm(ShmInput),
}

/// Where frames go: the socket, or after `Loaded` the shared region's reply ring.
enum Output {
    Socket(SharedStream),
    #[cfg(target_os = "linux")]
    Shm(ShmOutput),
}

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Output::Socket(w) => w.write_vectored(bufs),
            #[cfg(target_os = "linux")]
            Output::Shm(w) => w.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How long the reader spins on an empty request ring before it sleeps on the socket:
/// the host's next call in a run of calls usually comes sooner.
#[cfg(target_os = "linux")]
const WORKER_SPIN: Duration = Duration::from_micros(50);

/// How long a standby thread sleeps before it looks for a vacant reader role by itself
/// (the host wakes it sooner when a frame waits).
#[cfg(target_os = "linux")]
const STANDBY_TIMEOUT: Duration = Duration::from_secs(1);

/// The request ring, read with the wait strategy: spin, then sleep on the socket until
/// the host's doorbell (or its end: the host is gone).
#[cfg(target_os = "linux")]
struct ShmInput {
    rx: protocol::shm::RingReader,
    sock: Arc<Stream>,
}

#[cfg(target_os = "linux")]
impl ShmInput {
    /// Runs `op` on the ring until it has something; `Ok(0)` when the host is gone.
    fn wait_for(
        &mut self,
        mut op: impl FnMut(&mut protocol::shm::RingReader) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        use std::io::Read;
        let region = self.rx.region().clone();
        loop {
            match op(&mut self.rx) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            if region.spin_until(protocol::shm::Side::Worker, WORKER_SPIN, || {
                self.rx.has_data()
            }) {
                continue;
            }
            if region.worker_may_sleep(|| self.rx.has_data()) {
                let mut bells = [0u8; 64];
                match (&*self.sock).read(&mut bells) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                region.worker_reading();
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl std::io::Read for ShmInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.wait_for(|rx| rx.read(buf))
    }
}

impl std::io::Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Input::Socket(r) => r.read(buf),
            #[cfg(target_os = "linux")]
            Input::Shm(r) => r.read(buf),
        }
    }
}

impl protocol::frame::ReadSpare for Input {
    fn read_spare(&mut self, buf: &mut Vec<u8>, max: usize) -> std::io::Result<usize> {
        use std::io::Read;
        match self {
            // `read_to_end` on the buffered socket reads into spare capacity as it is.
            Input::Socket(r) => r.take(max as u64).read_to_end(buf),
            #[cfg(target_os = "linux")]
            Input::Shm(r) => r.wait_for(|rx| protocol::frame::ReadSpare::read_spare(rx, buf, max)),
        }
    }
}

/// The reply ring: a full ring waits (spin, then short sleeps) for the host to read; a
/// host asleep on the socket gets a doorbell byte once something is published.
#[cfg(target_os = "linux")]
struct ShmOutput {
    tx: protocol::shm::RingWriter,
    sock: Arc<Stream>,
}

#[cfg(target_os = "linux")]
impl ShmOutput {
    fn wake_host(&self) {
        if self.tx.region().host_needs_doorbell() {
            protocol::shm::ring_doorbell(&*self.sock);
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut parts: [&[u8]; 2] = [&[], &[]];
        for (part, buf) in parts.iter_mut().zip(bufs.iter().filter(|b| !b.is_empty())) {
            *part = buf;
        }
        let mut backoff = Duration::from_micros(20);
        loop {
            match self.tx.try_write(&parts) {
                Ok(n) => {
                    self.wake_host();
                    return Ok(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Full: the host must read. Yield a while, then sleep in growing steps.
                    self.wake_host();
                    let start = Instant::now();
                    while self
                        .tx
                        .unread()
                        .is_ok_and(|n| n == self.tx.region().capacity())
                        && start.elapsed() < WORKER_SPIN
                    {
                        std::thread::yield_now();
                    }
                    if self
                        .tx
                        .unread()
                        .is_ok_and(|n| n == self.tx.region().capacity())
                    {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(1));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn send(writer: &Writer, message: &Message, payload: &[u8]) {
    let mut half = writer.lock().unwrap_or_else(|e| e.into_inner());
    match write_frame(&mut *half, message, payload) {
        Ok(()) => {}
        // The shared ring was written by someone else (the plugin, in this process): the
        // stream is not ours any more. Stop, leaving what is there for the host to judge.
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            eprintln!("worker-shim: {e}");
            std::process::exit(EXIT_PROTOCOL as i32);
        }
        // The host is gone: nothing left to serve.
        Err(_) => std::process::exit(0),
    }
}

fn read(reader: &mut Reader, max: u32) -> Result<protocol::frame::Frame, String> {
    match protocol::frame::read_frame_spare(reader, max) {
        Ok(frame) => Ok(frame),
        Err(FrameError::Eof) => std::process::exit(0),
        Err(e) => Err(format!("reading from the host: {e}")),
    }
}

#[cfg(any(unix, windows))]
fn serve(
    stream: Stream,
    version: Option<String>,
    sandboxed: bool,
    region: Option<Region>,
) -> Result<(), String> {
    #[cfg(unix)]
    protocol::tune_socket(&stream);
    let stream = Arc::new(stream);
    let mut reader = Input::Socket(BufReader::with_capacity(
        64 * 1024,
        SharedStream(stream.clone()),
    ));
    let writer = Mutex::new(Output::Socket(SharedStream(stream.clone())));
    let mut hello = protocol::hello(None, Some(std::process::id()));
    let ours = match &mut hello {
        Message::Hello {
            version: v,
            features,
            ..
        } => {
            if let Some(version) = version {
                *v = version;
            }
            if region.is_some() {
                features.push(protocol::FEATURE_SHM.to_string());
            }
            // Tests play an older worker by announcing fewer features.
            if let Ok(list) = std::env::var(FEATURES_OVERRIDE_ENV) {
                *features = list
                    .split(',')
                    .filter(|f| !f.is_empty())
                    .map(str::to_string)
                    .collect();
            }
            features.clone()
        }
        _ => Vec::new(),
    };
    if sandboxed {
        std::env::remove_var(FEATURES_OVERRIDE_ENV);
    }
    send(&writer, &hello, &[]);
    let theirs = match read(&mut reader, protocol::HANDSHAKE_MAX_FRAME)?.message {
        Message::Hello {
            protocol,
            version,
            features,
            ..
        } => {
            protocol::check_hello(&protocol, &version)?;
            features
        }
        other => return Err(format!("expected Hello from the host, got {other:?}")),
    };
    // A feature is used only when both sides announce it.
    let both = |f: &str| ours.iter().any(|o| o == f) && theirs.iter().any(|t| t == f);
    let (host_calls, streams) = (
        both(protocol::FEATURE_HOST_CALL),
        both(protocol::FEATURE_STREAM),
    );
    let region = region.filter(|_| both(protocol::FEATURE_SHM));
    #[cfg(not(target_os = "linux"))]
    let _ = region;
    let load = read(&mut reader, protocol::HANDSHAKE_MAX_FRAME.max(16 << 20))?;
    let Message::Load {
        name,
        library,
        max_frame,
        concurrency,
        limits,
        sandbox,
    } = load.message
    else {
        return Err(format!(
            "expected Load from the host, got {:?}",
            load.message
        ));
    };
    let max_frame = max_frame.clamp(4096, u32::MAX as u64) as u32;
    let concurrency = concurrency.clamp(1, 1024);
    let sandbox = sandbox.filter(|_| sandboxed);
    let setup = Setup {
        name: &name,
        library: &library,
        config: &load.payload,
        limits: &limits,
        sandbox: sandbox.as_ref(),
        concurrency,
        conn: &stream,
    };
    let instance = match load_plugin(&setup, &writer) {
        Ok((instance, loaded)) => {
            send(&writer, &loaded, &[]);
            // From here on, frames travel through the region (when both sides use it).
            #[cfg(target_os = "linux")]
            if let Some(region) = &region {
                use protocol::shm::Ring;
                reader = Input::Shm(ShmInput {
                    rx: region.reader(Ring::Request),
                    sock: stream.clone(),
                });
                *writer.lock().unwrap_or_else(|e| e.into_inner()) = Output::Shm(ShmOutput {
                    tx: region.writer(Ring::Reply),
                    sock: stream.clone(),
                });
            }
            instance
        }
        Err(failed) => {
            send(&writer, &failed, &[]);
            return Ok(());
        }
    };
    let shared = Arc::new(Shared {
        writer,
        reader: Mutex::new(reader),
        queue: Mutex::new(VecDeque::new()),
        running: AtomicU32::new(0),
        waiting: AtomicU32::new(0),
        concurrency,
        calls: Mutex::new(HashMap::new()),
        instance,
        max_frame,
        shutting_down: AtomicBool::new(false),
        idle: AtomicU32::new(concurrency + 1),
        threads: AtomicU32::new(concurrency + 1),
        host_calls,
        streams,
        #[cfg(target_os = "linux")]
        region,
    });
    for _ in 0..concurrency {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("worker".into())
            .stack_size(THREAD_STACK)
            .spawn(move || serve_loop(&shared))
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
    }
    serve_loop(&shared);
    Ok(())
}

/// Sends a load failure in the wire form.
fn failed(reason: &str, message: String, abi: Option<(u16, u16)>) -> Message {
    Message::LoadFailed {
        reason: reason.into(),
        message,
        abi,
    }
}

/// Host services during `create`: logs become `Log` frames.
struct LoadServices<'a> {
    writer: &'a Writer,
}

impl HostServices for LoadServices<'_> {
    fn log(&self, level: u32, message: &str) {
        send(
            self.writer,
            &Message::Log {
                level,
                message: message.into(),
                call: None,
            },
            &[],
        );
    }
    fn progress(&self, _: f64, _: &str) {}
    fn is_cancelled(&self) -> bool {
        false
    }
}

/// What the worker needs to set up and load the plugin.
#[cfg(any(unix, windows))]
struct Setup<'a> {
    name: &'a str,
    library: &'a str,
    config: &'a [u8],
    limits: &'a WireLimits,
    sandbox: Option<&'a WireSandbox>,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    concurrency: u32,
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    conn: &'a Stream,
}

/// Enters the sandbox (if any), applies the limits, opens the library and creates the
/// plugin. Returns the `Loaded` message, or the `LoadFailed` one.
#[cfg(any(unix, windows))]
#[allow(clippy::result_large_err)] // once per worker, never on a call's path
fn load_plugin(setup: &Setup<'_>, writer: &Writer) -> Result<(Instance, Message), Message> {
    use crate::error::LoadError as E;
    let (name, library, config) = (setup.name, setup.library, setup.config);
    let (enforced, missing) =
        confine(setup).map_err(|(reason, message)| failed(reason, message, None))?;
    let path = std::path::Path::new(library);
    if !path.is_file() {
        return Err(failed(
            "not_found",
            format!("{library} does not exist"),
            None,
        ));
    }
    let (lib, desc) = Library::open(path, name).map_err(|e| match e {
        E::NotALibrary { reason, .. } => failed("not_a_library", reason, None),
        E::EntryMissing { symbol, .. } => failed("entry_missing", symbol, None),
        E::AbiMismatch { found, .. } => failed("abi_mismatch", e.to_string(), Some(found)),
        other => failed("bad_descriptor", other.to_string(), None),
    })?;
    let services = LoadServices { writer };
    let instance = lib.create(name, config, &services).map_err(|e| match e {
        E::CreatePanicked { message, .. } => failed("create_panicked", message, None),
        E::CreateFailed { message, .. } => failed("create_failed", message, None),
        other => failed("create_failed", other.to_string(), None),
    })?;
    let loaded = Message::Loaded {
        name: desc.name,
        version: desc.version,
        abi_major: desc.abi.0,
        abi_minor: desc.abi.1,
        methods: desc.methods,
        sandbox: enforced,
        sandbox_missing: missing,
    };
    Ok((instance, loaded))
}

/// Why the plugin cannot be confined: the `LoadFailed` reason and message.
type Refusal = (&'static str, String);

/// Confines the plugin before its library is opened, in this order: the processes (with the
/// sandbox, the namespaces fork here, and this becomes the plugin's process), the
/// resource limits, then the restrictions of the process itself. Returns the sandbox
/// layers in force and those missing.
#[cfg(target_os = "linux")]
fn confine(setup: &Setup<'_>) -> Result<(Vec<String>, Vec<String>), Refusal> {
    use std::os::fd::AsRawFd;
    let host_is_root = rustix::process::getuid().is_root();
    let mut layers = sandbox::Applied::default();
    match setup.sandbox {
        Some(spec) => {
            layers.enforced.extend([
                "environment".to_string(),
                "file descriptors".into(),
                "not dumpable".into(),
            ]);
            sandbox::enter_namespaces(spec, setup.conn.as_raw_fd(), &mut layers)
                .map_err(|m| ("sandbox", m))?;
        }
        None => contain_processes(setup.conn),
    }
    limits::apply(setup.limits).map_err(|m| ("limits", m))?;
    if let Some(spec) = setup.sandbox {
        sandbox::restrict(spec, setup.concurrency, host_is_root, &mut layers)
            .map_err(|m| ("sandbox", m))?;
    }
    Ok((layers.enforced, layers.missing))
}

/// Elsewhere: no sandbox. A required one refuses the load; best-effort says plainly that
/// nothing is enforced.
#[cfg(not(target_os = "linux"))]
fn confine(setup: &Setup<'_>) -> Result<(Vec<String>, Vec<String>), Refusal> {
    let mut missing = Vec::new();
    if let Some(spec) = setup.sandbox {
        if spec.mode == "required" {
            return Err(("sandbox", "sandboxing: only implemented on Linux".into()));
        }
        missing.push(
            "every layer: sandboxing is only implemented on Linux; this worker runs with the host's rights"
                .into(),
        );
    }
    limits::apply(setup.limits).map_err(|m| ("limits", m))?;
    // Windows: the host's job object holds the memory and CPU limits; nothing holds this.
    if cfg!(windows) && setup.limits.open_files.is_some() {
        missing.push("open-file limit (limits.open_files): not available on Windows".into());
    }
    Ok((Vec::new(), missing))
}

/// With the sandbox off (Linux): the plugin still runs in its own pid namespace, as with
/// the sandbox on (`sandbox::enter_namespaces`: the worker the host spawned becomes a relay,
/// an init process forks the plugin's process), so that when the worker ends the kernel
/// ends every process the plugin started, even one that left the worker's process group.
/// Nothing else of the sandbox applies: the user namespace maps the worker's own user and
/// group (the plugin sees its real ids), and the plugin's process stays dumpable (a
/// debugger can attach). Where unprivileged user namespaces are not available this does
/// nothing, and a process that leaves the worker's group may outlive it.
#[cfg(target_os = "linux")]
fn contain_processes(conn: &Stream) {
    use std::os::fd::AsRawFd;
    let (uid, gid) = (rustix::process::getuid(), rustix::process::getgid());
    let spec = WireSandbox {
        mode: "best-effort".into(),
        read: Vec::new(),
        write: Vec::new(),
        network: true,
        exec: true,
        tasks: 0,
    };
    let mut layers = sandbox::Applied::default();
    if sandbox::enter_namespaces(&spec, conn.as_raw_fd(), &mut layers).is_err()
        || !layers.missing.is_empty()
    {
        return;
    }
    // In the plugin's process: undo `enter_namespaces`'s non-dumpable (a debugger can
    // attach), first, since /proc/self of a non-dumpable process belongs to root; then map
    // our ids into the namespace (best effort; unmapped, they read as the overflow ids
    // 65534).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    let _ = std::fs::write("/proc/self/setgroups", "deny");
    let _ = std::fs::write("/proc/self/uid_map", format!("{0} {0} 1", uid.as_raw()));
    let _ = std::fs::write("/proc/self/gid_map", format!("{0} {0} 1", gid.as_raw()));
}

struct QueuedCall {
    id: u64,
    method: String,
    input: Vec<u8>,
}

struct Shared {
    writer: Writer,
    reader: Mutex<Reader>,
    queue: Mutex<VecDeque<QueuedCall>>,
    /// Calls running plugin code (a call waiting on a host function gives its slot up).
    running: AtomicU32,
    /// Calls waiting on a host function.
    waiting: AtomicU32,
    concurrency: u32,
    /// The calls this worker holds (running or queued), by id.
    calls: Mutex<HashMap<u64, Arc<CallState>>>,
    instance: Instance,
    max_frame: u32,
    shutting_down: AtomicBool,
    /// Threads not running a call (reading, or waiting to read). At least one stays so,
    /// so replies to host calls and stream credit are always read.
    idle: AtomicU32,
    /// Threads serving calls.
    threads: AtomicU32,
    /// Whether the host takes host calls (both sides announced the feature).
    host_calls: bool,
    /// Whether the host takes stream items.
    streams: bool,
    /// The shared region, when frames travel through it: the reader role is then handed
    /// on lazily (see the module's documentation).
    #[cfg(target_os = "linux")]
    region: Option<Region>,
}

/// How long a call waiting on a host function spins before it sleeps.
const HOST_REPLY_SPIN: Duration = Duration::from_micros(60);

/// Stack of every thread that runs plugin code.
const THREAD_STACK: usize = 4 << 20;

/// Threads the worker may start beyond `concurrency + 1` while calls wait on host
/// functions (the sandbox's task limit leaves room for them).
pub(crate) const HOST_WAIT_THREADS: u32 = 64;

/// Test hook: the features this worker announces (comma-separated), to play an older one.
#[doc(hidden)]
pub const FEATURES_OVERRIDE_ENV: &str = "PLUGIN_HOST_TEST_PROTOCOL_FEATURES";

/// One call the worker holds: its cancellation, its host calls' replies, its stream's
/// flow control.
struct CallState {
    cancelled: AtomicBool,
    /// Bumped with every host call reply that arrives (for the brief spin in
    /// `call_host`).
    replies: std::sync::atomic::AtomicU64,
    /// `(window, window_bytes)` for a streaming call.
    stream: Option<(u32, u64)>,
    inner: Mutex<CallInner>,
    changed: Condvar,
}

#[derive(Default)]
struct CallInner {
    next_seq: u64,
    /// Host call replies not yet taken, by seq.
    replies: HashMap<u64, (i32, Vec<u8>)>,
    /// Stream items (and bytes) sent and not yet credited back by the host.
    out_items: u32,
    out_bytes: u64,
}

impl CallState {
    /// A call's state; `stream` is its `(window, window_bytes)` when it is a stream.
    fn new(stream: Option<(u32, u64)>) -> CallState {
        CallState {
            cancelled: AtomicBool::new(false),
            replies: Default::default(),
            stream,
            inner: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CallInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        // Taking the lock orders the change before a waiter's check.
        drop(self.lock());
        self.changed.notify_all();
    }
}

impl Shared {
    fn try_acquire_slot(&self) -> bool {
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.concurrency).then_some(n + 1)
            })
            .is_ok()
    }

    fn release_slot(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
    }

    /// A queued call, with its slot and (unless `draining`) thread reservation taken.
    fn take_queued(self: &Arc<Self>, draining: bool) -> Option<QueuedCall> {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.is_empty() || !self.try_acquire_slot() {
            return None;
        }
        if !draining && !self.reserve_thread() {
            self.release_slot();
            return None;
        }
        queue.pop_front()
    }

    fn send(&self, message: &Message, payload: &[u8]) {
        send(&self.writer, message, payload);
    }

    /// The reader role, if this thread can have it. With the socket, waits for it. With
    /// shared memory, takes it only if it is free; otherwise sleeps as a standby (until
    /// the host wakes one, or a while) and returns `None`.
    fn take_reader(&self) -> Option<std::sync::MutexGuard<'_, Reader>> {
        #[cfg(target_os = "linux")]
        if let Some(region) = &self.region {
            use std::sync::TryLockError;
            let take = || match self.reader.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            let seen = region.standby_seen();
            let Some(guard) = take() else {
                region.standby_wait(seen, STANDBY_TIMEOUT);
                return None;
            };
            region.worker_reading();
            return Some(guard);
        }
        Some(self.reader.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Gives the reader role up to run a call. With shared memory nobody is woken unless
    /// frames wait in the ring (the host wakes a standby for frames that come later).
    fn vacate(&self, reader: std::sync::MutexGuard<'_, Reader>) {
        #[cfg(target_os = "linux")]
        if let Some(region) = &self.region {
            region.worker_vacates();
            let waiting = match &*reader {
                Input::Shm(input) => input.rx.has_data(),
                Input::Socket(_) => false,
            };
            drop(reader);
            if waiting {
                region.claim_and_wake_standby();
            } else if region.standby_claimed() {
                // The host woke a standby while this thread still held the role: that
                // standby found it taken and went back to sleep. Wake one again, or the
                // frame waits for a standby's timeout.
                region.wake_standby();
            }
            return;
        }
        drop(reader);
    }

    fn call(&self, id: u64) -> Option<Arc<CallState>> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Takes this thread out of the idle ones to run a call, if another thread stays
    /// idle to read (replies to host calls and stream credit must always be read), or a
    /// new one can be started for that. Calls waiting on host functions are what make
    /// more threads than `concurrency + 1` necessary.
    fn reserve_thread(self: &Arc<Self>) -> bool {
        let spare = self
            .idle
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 1).then(|| n - 1)
            });
        if spare.is_ok() {
            return true;
        }
        let cap = self.concurrency + 1 + HOST_WAIT_THREADS;
        let grown = self
            .threads
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            });
        if grown.is_err() {
            return false;
        }
        // The new thread is idle from the start and takes this one's place among the idle.
        let shared = self.clone();
        let started = std::thread::Builder::new()
            .name("worker".into())
            .stack_size(THREAD_STACK)
            .spawn(move || serve_loop(&shared));
        if started.is_err() {
            self.threads.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Runs a call whose slot and thread reservation this thread holds, then gives both
    /// back.
    fn run_taken(self: &Arc<Self>, call: QueuedCall) {
        run_call(self, call);
        self.release_slot();
        self.idle.fetch_add(1, Ordering::AcqRel);
    }
}

/// Host services during a call: logs and progress become frames tied to the call's id.
struct CallServices<'a> {
    shared: &'a Shared,
    id: u64,
    state: &'a CallState,
}

impl HostServices for CallServices<'_> {
    fn log(&self, level: u32, message: &str) {
        self.shared.send(
            &Message::Log {
                level,
                message: message.into(),
                call: Some(self.id),
            },
            &[],
        );
    }
    fn progress(&self, fraction: f64, message: &str) {
        self.shared.send(
            &Message::Event {
                id: self.id,
                fraction,
                message: message.into(),
            },
            &[],
        );
    }
    fn is_cancelled(&self) -> bool {
        self.state.cancelled.load(Ordering::Relaxed)
    }
    fn call_host(&self, name: &str, input: &[u8]) -> (i32, Vec<u8>) {
        use plugin_api::abi::host_status;
        let refuse = |status, text: String| (status, text.into_bytes());
        if !self.shared.host_calls {
            return refuse(
                host_status::UNSUPPORTED,
                format!("host function `{name}`: this host does not offer host functions (its protocol predates them); update the application"),
            );
        }
        let fits = (input.len() as u64).saturating_add(protocol::FRAME_ROOM)
            <= u64::from(self.shared.max_frame);
        if !fits {
            return refuse(
                host_status::LIMIT,
                format!(
                    "host function `{name}`: an input of {} bytes exceeds the frame limit of {} bytes (limits.max_frame)",
                    input.len(),
                    self.shared.max_frame
                ),
            );
        }
        let cancelled = || {
            refuse(
                host_status::CANCELLED,
                format!("host function `{name}`: this call was cancelled"),
            )
        };
        let seq = {
            let mut inner = self.state.lock();
            if self.is_cancelled() {
                return cancelled();
            }
            inner.next_seq += 1;
            inner.next_seq
        };
        // While it waits, the call runs no plugin code: its slot can serve another call
        // (the host function may call this plugin back).
        let replies = self.state.replies.load(Ordering::Acquire);
        self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        self.shared.release_slot();
        self.shared.send(
            &Message::HostCall {
                id: self.id,
                seq,
                name: name.to_string(),
            },
            input,
        );
        // A host function that answers at once is back within a couple of socket round
        // trips: spinning that long saves the futex sleep and wake-up (costly on virtual
        // machines); past it, sleep.
        let spin = Instant::now();
        while self.state.replies.load(Ordering::Acquire) == replies
            && !self.is_cancelled()
            && spin.elapsed() < HOST_REPLY_SPIN
        {
            // Yield rather than spin hard: on a busy machine the host that must answer
            // may need this CPU.
            std::thread::yield_now();
        }
        let outcome = {
            let mut inner = self.state.lock();
            loop {
                if let Some(reply) = inner.replies.remove(&seq) {
                    break reply;
                }
                if self.is_cancelled() {
                    break cancelled();
                }
                inner = self
                    .state
                    .changed
                    .wait(inner)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        self.shared.running.fetch_add(1, Ordering::AcqRel);
        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
        outcome
    }
    fn emit(&self, item: &[u8]) -> i32 {
        use plugin_api::abi::emit_status;
        if !self.shared.streams {
            return emit_status::UNSUPPORTED;
        }
        let Some((window, window_bytes)) = self.state.stream else {
            return emit_status::NOT_STREAM;
        };
        let len = item.len() as u64;
        if len.saturating_add(protocol::FRAME_ROOM) > u64::from(self.shared.max_frame) {
            return emit_status::LIMIT;
        }
        {
            let mut inner = self.state.lock();
            loop {
                if self.is_cancelled() {
                    return emit_status::CLOSED;
                }
                // The host checks the same rule; items past it are a protocol violation.
                let fits = inner.out_items < window
                    && (inner.out_items == 0
                        || inner.out_bytes.saturating_add(len) <= window_bytes);
                if fits {
                    break;
                }
                inner = self
                    .state
                    .changed
                    .wait(inner)
                    .unwrap_or_else(|e| e.into_inner());
            }
            inner.out_items += 1;
            inner.out_bytes = inner.out_bytes.saturating_add(len);
        }
        self.shared.send(&Message::Item { id: self.id }, item);
        emit_status::OK
    }
}

fn run_call(shared: &Shared, call: QueuedCall) {
    let state = shared
        .call(call.id)
        .unwrap_or_else(|| Arc::new(CallState::new(None)));
    let services = CallServices {
        shared,
        id: call.id,
        state: &state,
    };
    let (status, output) = shared.instance.call(&call.method, &call.input, &services);
    if status == plugin_api::abi::status::PANIC {
        // Tells crash reports that the panic printed above did not end the process.
        eprintln!("{}", crate::crash::CAUGHT_PANIC_MARKER);
    }
    shared
        .calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&call.id);
    // An honest worker never sends a frame the host would have to refuse. The length is
    // the plugin's word: checked (with checked arithmetic) before the bytes are touched.
    let len = output.len();
    let fits = u64::try_from(len)
        .ok()
        .and_then(|len| len.checked_add(protocol::FRAME_ROOM))
        .is_some_and(|size| size <= u64::from(shared.max_frame));
    if !fits {
        let text = format!(
            "output of {len} bytes exceeds the frame limit of {} bytes (limits.max_frame)",
            shared.max_frame
        );
        let status = plugin_api::abi::status::BAD_OUTPUT;
        shared.send(
            &Message::Reply {
                id: call.id,
                status,
            },
            text.as_bytes(),
        );
        return;
    }
    // Written straight from the plugin's buffer.
    shared.send(
        &Message::Reply {
            id: call.id,
            status,
        },
        output.as_slice(),
    );
}

fn serve_loop(shared: &Arc<Shared>) {
    loop {
        if let Some(call) = shared.take_queued(false) {
            shared.run_taken(call);
            continue;
        }
        let Some(mut reader) = shared.take_reader() else {
            continue;
        };
        let frame = match read(&mut reader, shared.max_frame) {
            Ok(f) => f,
            Err(message) => {
                eprintln!("worker-shim: {message}");
                std::process::exit(EXIT_PROTOCOL as i32);
            }
        };
        match frame.message {
            Message::Call {
                id,
                method,
                window,
                window_bytes,
            } => {
                if shared.shutting_down.load(Ordering::Acquire) {
                    let text = b"the worker is shutting down";
                    shared.send(
                        &Message::Reply {
                            id,
                            status: plugin_api::abi::status::ERROR,
                        },
                        text,
                    );
                    continue;
                }
                let stream = (window > 0 && shared.streams).then_some((window, window_bytes));
                let state = CallState::new(stream);
                shared
                    .calls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, Arc::new(state));
                let call = QueuedCall {
                    id,
                    method,
                    input: frame.payload,
                };
                let slot = shared.try_acquire_slot();
                if slot && shared.reserve_thread() {
                    shared.vacate(reader);
                    shared.run_taken(call);
                } else {
                    if slot {
                        shared.release_slot();
                    }
                    shared
                        .queue
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(call);
                }
            }
            Message::Cancel { id } => {
                if let Some(call) = shared.call(id) {
                    call.cancelled.store(true, Ordering::Relaxed);
                    call.wake();
                }
            }
            Message::HostReply { id, seq, status } => {
                // A reply for a call that ended is dropped.
                if let Some(call) = shared.call(id) {
                    call.lock().replies.insert(seq, (status, frame.payload));
                    call.replies.fetch_add(1, Ordering::AcqRel);
                    call.changed.notify_all();
                }
            }
            Message::Credit { id, items, bytes } => {
                if let Some(call) = shared.call(id) {
                    let mut inner = call.lock();
                    inner.out_items = inner.out_items.saturating_sub(items);
                    inner.out_bytes = inner.out_bytes.saturating_sub(bytes);
                    drop(inner);
                    call.changed.notify_all();
                }
            }
            Message::Ping { seq } => shared.send(&Message::Pong { seq }, &[]),
            Message::Shutdown { grace_ms } => {
                // Other threads read on (replies to host calls the drain waits for).
                shared.vacate(reader);
                shared.shutting_down.store(true, Ordering::Release);
                let deadline = Instant::now() + Duration::from_millis(grace_ms);
                // Drain: wait for running and queued calls, at most the grace period.
                loop {
                    let queued = shared.queue.lock().unwrap_or_else(|e| e.into_inner()).len();
                    let busy = shared.running.load(Ordering::Acquire)
                        + shared.waiting.load(Ordering::Acquire);
                    if (busy == 0 && queued == 0) || Instant::now() >= deadline {
                        std::process::exit(0);
                    }
                    if let Some(call) = shared.take_queued(true) {
                        run_call(shared, call);
                        shared.release_slot();
                    } else {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(windows)]
mod windows {
    use windows_sys::Win32::Foundation::EXCEPTION_STACK_OVERFLOW;
    use windows_sys::Win32::System::Diagnostics::Debug::{
        AddVectoredExceptionHandler, SetErrorMode, SetUnhandledExceptionFilter, EXCEPTION_POINTERS,
        SEM_FAILCRITICALERRORS, SEM_NOGPFAULTERRORBOX, SEM_NOOPENFILEERRORBOX,
    };
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, TerminateProcess};

    /// A crash ends the worker at once with its exception status as the exit code, which
    /// the host reports: no error dialog, no debugger (Windows Error Reporting, Wine's
    /// winedbg), nothing that keeps the dead worker around.
    pub(super) fn quiet_crashes() {
        // SAFETY: sets this process's error mode and top-level exception filter; the
        // filter is a plain function that lives as long as the process.
        unsafe {
            SetErrorMode(SEM_FAILCRITICALERRORS | SEM_NOGPFAULTERRORBOX | SEM_NOOPENFILEERRORBOX);
            SetUnhandledExceptionFilter(Some(end_with_status));
            // After Rust's own handler (added at start-up; it prints the overflow message).
            AddVectoredExceptionHandler(0, Some(end_on_stack_overflow));
        }
    }

    /// A stack overflow is never handled: end at once, on what is left of the stack (the
    /// search for a handler that would come next needs more of it than there is; under
    /// Wine it never finishes).
    unsafe extern "system" fn end_on_stack_overflow(info: *mut EXCEPTION_POINTERS) -> i32 {
        // SAFETY: the system passes valid exception pointers to vectored handlers.
        let code = unsafe {
            info.as_ref()
                .and_then(|i| i.ExceptionRecord.as_ref())
                .map(|r| r.ExceptionCode)
        };
        if code == Some(EXCEPTION_STACK_OVERFLOW) {
            // SAFETY: terminating our own process; no pointers.
            unsafe { TerminateProcess(GetCurrentProcess(), EXCEPTION_STACK_OVERFLOW as u32) };
        }
        // EXCEPTION_CONTINUE_SEARCH: anything else goes on to its handlers (panics that
        // unwind raise exceptions too).
        0
    }

    /// Runs for an exception nothing handled (after Rust's own stack-overflow message):
    /// ends the process with the exception's code.
    unsafe extern "system" fn end_with_status(info: *const EXCEPTION_POINTERS) -> i32 {
        // SAFETY: the system passes valid exception pointers to the top-level filter.
        let code = unsafe {
            info.as_ref()
                .and_then(|i| i.ExceptionRecord.as_ref())
                .map_or(0xC000_0001, |r| r.ExceptionCode as u32)
        };
        // SAFETY: terminating our own process; no pointers.
        unsafe { TerminateProcess(GetCurrentProcess(), code) };
        // Not reached; otherwise "execute the handler": the process ends with the code.
        1
    }
}
