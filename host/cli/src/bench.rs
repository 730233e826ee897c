//! `plugin-host bench`: measures an isolated plugin against raw baselines measured in the
//! same run, and prints median, p99 and the ratio for each figure.
//!
//! Baselines: a raw Unix-socket echo in a child process (on Windows a raw named-pipe echo;
//! length-prefixed frames of the same sizes, one in flight and 64 in flight); on Linux a
//! shared-memory ping-pong with a child
//! process (the same messages through the transport's rings, with its wait strategy: the
//! mechanism alone, no protocol); and a bare spawn-and-connect for cold start.
//! Host functions and streams (the `callbacks` plugin) are measured against the plugin's
//! own calls: a host call made by the plugin against a plain call to the same plugin, and
//! stream items/s against calls/s with 64 in flight.
//!
//! `--transport` picks the transport of the isolated plugins (shm by default); `both`
//! measures each figure with both, side by side, and prints shm-vs-socket ratios. After the
//! calls: the CPU an idle worker and the host use (Linux: `/proc`; Windows:
//! `GetProcessTimes`), and how long a call that crashes its worker takes to come back as an
//! error.
//!
//! The WebAssembly backend (`hello.wasm`, found in the CLI's search paths like the demo's
//! `faulty.wasm`) is measured in the same run: calls of 16 B, 4 KiB and 1 MiB against the
//! same raw baselines and the isolated call, and its cold start (module load + first
//! call) next to the isolated one. Its 16 B figure is also set against Extism's, measured
//! separately on this machine (a reference printed as such, not a baseline of this run).
//! Without `hello.wasm` the bench says how to build it and skips those lines.
//!
//! The bench sets its own policies, whatever `--grant` says: the isolated figures are for
//! the default, an untrusted worker with the sandbox required (deny-all); cold start is
//! also measured with the sandbox off (a policy granting `SandboxMode::Off`) to show what
//! the sandbox costs; the in-process figure needs a policy granting trust.
//!
//! Where there is no sandbox (anywhere but Linux) the default policy refuses every plugin,
//! so the isolated figures are for untrusted workers with the sandbox off, and the bench
//! says so and skips the sandbox-on figures. Where there is no shared memory (anywhere but
//! Linux) `--transport shm` falls back to the socket (a named pipe on Windows): the bench
//! says so and measures the socket once.

use std::io::{Read, Write};
#[cfg(unix)]
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use interprocess::local_socket::{prelude::*, GenericNamespaced, Stream};
#[cfg(unix)]
use interprocess::local_socket::{Listener, ListenerOptions};
#[cfg(windows)]
use interprocess::os::windows::named_pipe;
use plugin_host::{
    CallOptions, Grant, Host, HostBuilder, HostCallContext, HostError, Manifest, Plugin,
    PluginEvent, SandboxMode, Transport, Trust,
};
use serde::Serialize;

/// Whether this system has the sandbox the default policy requires (Linux only).
const SANDBOX: bool = cfg!(target_os = "linux");

/// Whether this system has the shared-memory transport (Linux only).
const SHM: bool = cfg!(target_os = "linux");

/// The raw baseline's name in the figures: what it goes through.
#[cfg(unix)]
const RAW: &str = "raw socket";
#[cfg(windows)]
const RAW: &str = "raw pipe";

/// The stream of the raw baseline: a Unix socket, or on Windows a named pipe.
#[cfg(unix)]
type RawStream = UnixStream;
#[cfg(windows)]
type RawStream = std::fs::File;

/// Windows: each direction's buffer in the raw baseline's pipe, in bytes: the library's
/// (`winpipe::PIPE_BUFFER`). The local-socket listener's default (512 bytes) would also
/// deadlock the 64-in-flight baseline: both sides blocked in a write.
#[cfg(windows)]
const PIPE_BUFFER: u32 = 256 << 10;

/// Windows: where named pipes are.
#[cfg(windows)]
const PIPE_PREFIX: &str = r"\\.\pipe\";

/// Settings for one run.
pub struct Settings {
    pub plugins: PathBuf,
    pub quick: bool,
    pub warm: bool,
    /// The transports of the isolated plugins, measured side by side (at least one).
    pub transports: Vec<Transport>,
}

struct Stats {
    median: Duration,
    p99: Duration,
    mean: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Stats {
        median: at(0.5),
        p99: at(0.99),
        mean: total / samples.len().max(1) as u32,
    }
}

/// Extism's 16-byte call on this machine, measured separately (its own harness, not in
/// this run): the low and high ends of its median over several runs. A reference for the
/// WebAssembly figure, not a baseline.
const EXTISM_16B: (Duration, Duration) = (Duration::from_nanos(8_000), Duration::from_nanos(9_500));

fn fmt(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} us")
    }
}

fn size_name(n: usize) -> String {
    match n {
        n if n >= 1 << 20 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

/// The child side of the raw baseline: connect, then echo length-prefixed frames.
/// `socket` is a local socket name; on Windows a path `\\.\pipe\NAME` is opened as a
/// file instead, for plain blocking reads and writes.
pub fn echo_server(socket: &str) -> ExitCode {
    #[cfg(windows)]
    if socket.starts_with(PIPE_PREFIX) {
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(socket);
        let Ok(file) = opened else {
            return ExitCode::from(1);
        };
        return echo(&file);
    }
    let Ok(name) = socket.to_ns_name::<GenericNamespaced>() else {
        return ExitCode::from(2);
    };
    let Ok(stream) = Stream::connect(name) else {
        return ExitCode::from(1);
    };
    echo(&stream)
}

/// Echoes length-prefixed frames until the stream ends.
fn echo(mut stream: impl Read + Write) -> ExitCode {
    // One buffer holds the length prefix and the body, so each reply is one write.
    let mut buf = vec![0u8; 4];
    loop {
        buf.truncate(4);
        if stream.read_exact(&mut buf).is_err() {
            return ExitCode::SUCCESS;
        }
        let n = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        buf.resize(4 + n, 0);
        if stream.read_exact(&mut buf[4..]).is_err() || stream.write_all(&buf).is_err() {
            return ExitCode::SUCCESS;
        }
    }
}

struct RawPeer<S = RawStream> {
    child: Child,
    stream: S,
}

impl<S> Drop for RawPeer<S> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh name for a raw baseline's socket or pipe: this process's id and a count (two
/// peers can be alive at once, and a name is taken until its peer is dropped).
fn peer_name() -> String {
    static MADE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "plugin-host-bench-{}-{}",
        std::process::id(),
        MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A listener for the raw baseline's child, and the name it listens on.
#[cfg(unix)]
fn listen() -> std::io::Result<(String, UnixListener)> {
    let name = peer_name();
    let listener = ListenerOptions::new()
        .name(name.as_str().to_ns_name::<GenericNamespaced>()?)
        .create_sync()?;
    #[allow(irrefutable_let_patterns)]
    let Listener::UdSocket(listener) = listener
    else {
        unreachable!()
    };
    Ok((name, UnixListener::from(listener)))
}

/// A pipe for the raw baseline's child, and the path the child opens (Windows): a named
/// pipe `\\.\pipe\NAME` with the library's buffers, for plain blocking reads and writes.
#[cfg(windows)]
fn listen() -> std::io::Result<(String, rawpipe::Listener)> {
    let path = format!("{PIPE_PREFIX}{}", peer_name());
    let listener = rawpipe::Listener::create(&path, PIPE_BUFFER)?;
    Ok((path, listener))
}

#[cfg(unix)]
fn accept(listener: UnixListener) -> std::io::Result<RawStream> {
    listener.accept().map(|(stream, _)| stream)
}

#[cfg(windows)]
fn accept(listener: rawpipe::Listener) -> std::io::Result<RawStream> {
    listener.accept()
}

/// The raw baseline's named pipe (Windows): one instance, opened without overlapped I/O,
/// so both ends' reads and writes are plain blocking `ReadFile` and `WriteFile`.
#[cfg(windows)]
mod rawpipe {
    use std::io;
    use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle};

    use windows_sys::Win32::Foundation::{
        GetLastError, ERROR_PIPE_CONNECTED, INVALID_HANDLE_VALUE,
    };
    use windows_sys::Win32::Storage::FileSystem::{
        FILE_FLAG_FIRST_PIPE_INSTANCE, PIPE_ACCESS_DUPLEX,
    };
    use windows_sys::Win32::System::Pipes::{
        ConnectNamedPipe, CreateNamedPipeW, PIPE_READMODE_BYTE, PIPE_REJECT_REMOTE_CLIENTS,
        PIPE_TYPE_BYTE, PIPE_WAIT,
    };

    /// The server end, not yet connected.
    pub struct Listener(OwnedHandle);

    impl Listener {
        /// Creates the pipe `path` (`\\.\pipe\NAME`) with `buffer` bytes each way.
        pub fn create(path: &str, buffer: u32) -> io::Result<Listener> {
            let wide: Vec<u16> = path.encode_utf16().chain([0]).collect();
            // SAFETY: `wide` is a NUL-terminated UTF-16 string that outlives the call; no
            // security attributes (null).
            let handle = unsafe {
                CreateNamedPipeW(
                    wide.as_ptr(),
                    PIPE_ACCESS_DUPLEX | FILE_FLAG_FIRST_PIPE_INSTANCE,
                    PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
                    1,
                    buffer,
                    buffer,
                    0,
                    std::ptr::null(),
                )
            };
            if handle == INVALID_HANDLE_VALUE {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a valid handle, just created, owned by nothing else.
            Ok(Listener(unsafe { OwnedHandle::from_raw_handle(handle) }))
        }

        /// Waits for the client, then returns the server end as a file.
        pub fn accept(self) -> io::Result<std::fs::File> {
            // SAFETY: a valid pipe handle; no OVERLAPPED (a synchronous handle).
            let ok = unsafe { ConnectNamedPipe(self.0.as_raw_handle(), std::ptr::null_mut()) };
            // SAFETY: reads the calling thread's last error.
            if ok == 0 && unsafe { GetLastError() } != ERROR_PIPE_CONNECTED {
                return Err(io::Error::last_os_error());
            }
            Ok(std::fs::File::from(self.0))
        }
    }
}

/// Spawns the echo child and accepts its connection: the bare spawn-and-connect.
fn spawn_raw_peer() -> std::io::Result<RawPeer> {
    let context = |what: &'static str| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    let (name, listener) = listen().map_err(context("listen"))?;
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg("bench-echo-server")
        .arg(&name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(context("spawn the echo child"))?;
    let stream = accept(listener).map_err(context("accept its connection"))?;
    Ok(RawPeer { child, stream })
}

/// One request/reply. `frame` is the length prefix and payload in one buffer (one write).
fn raw_round_trip(stream: &mut (impl Read + Write), frame: &[u8], reply: &mut Vec<u8>) {
    stream.write_all(frame).unwrap();
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    reply.resize(u32::from_le_bytes(len) as usize, 0);
    stream.read_exact(reply).unwrap();
}

fn raw_frame(size: usize) -> Vec<u8> {
    let mut frame = (size as u32).to_le_bytes().to_vec();
    frame.resize(4 + size, 7);
    frame
}

/// The raw round trip, measured twice: with blocking reads, and with the same async-io
/// reactor wait the host uses. The faster of the two is the baseline, so the ratio never
/// flatters us because of how the baseline waits. On Windows with blocking reads only:
/// async-io cannot wait on a named pipe.
fn raw_latency(size: usize, iterations: usize) -> Stats {
    let mut peer = spawn_raw_peer().expect("start the raw echo baseline");
    let payload = raw_frame(size);
    let mut reply = Vec::new();
    for _ in 0..iterations / 10 + 1 {
        raw_round_trip(&mut peer.stream, &payload, &mut reply);
    }
    let blocking = stats(
        (0..iterations)
            .map(|_| {
                let t = Instant::now();
                raw_round_trip(&mut peer.stream, &payload, &mut reply);
                t.elapsed()
            })
            .collect(),
    );
    raw_latency_reactor(&peer, &payload, &mut reply, iterations, blocking)
}

/// The raw round trip on the async-io reactor; returns it or `blocking`, the faster.
#[cfg(unix)]
fn raw_latency_reactor(
    peer: &RawPeer,
    payload: &[u8],
    reply: &mut Vec<u8>,
    iterations: usize,
    blocking: Stats,
) -> Stats {
    let stream = smol::Async::new(peer.stream.try_clone().unwrap()).unwrap();
    let reactor = smol::block_on(async {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..iterations + iterations / 10 {
            let t = Instant::now();
            (&stream).write_all(payload).await.unwrap();
            let mut len = [0u8; 4];
            (&stream).read_exact(&mut len).await.unwrap();
            reply.resize(u32::from_le_bytes(len) as usize, 0);
            (&stream).read_exact(reply).await.unwrap();
            if i >= iterations / 10 {
                samples.push(t.elapsed());
            }
        }
        stats(samples)
    });
    faster(reactor, blocking)
}

/// Windows: async-io cannot wait on a named pipe. Instead the round trip once more
/// through `interprocess`'s local socket on both ends (a named pipe with overlapped I/O
/// and completion routines, blocking the caller all the same); returns it or `blocking`,
/// the faster.
#[cfg(windows)]
fn raw_latency_reactor(
    _: &RawPeer,
    payload: &[u8],
    reply: &mut Vec<u8>,
    iterations: usize,
    blocking: Stats,
) -> Stats {
    let mut peer = spawn_local_socket_peer().expect("start the raw echo baseline");
    for _ in 0..iterations / 10 + 1 {
        raw_round_trip(&mut peer.stream, payload, reply);
    }
    let overlapped = stats(
        (0..iterations)
            .map(|_| {
                let t = Instant::now();
                raw_round_trip(&mut peer.stream, payload, reply);
                t.elapsed()
            })
            .collect(),
    );
    faster(overlapped, blocking)
}

/// The faster of two ways of measuring the same baseline (by median).
fn faster(a: Stats, b: Stats) -> Stats {
    if a.median < b.median {
        a
    } else {
        b
    }
}

/// Windows: the echo child connected through `interprocess`'s local socket, with the
/// library's pipe buffers (the local-socket listener's default, 512 bytes, is smaller).
#[cfg(windows)]
fn spawn_local_socket_peer(
) -> std::io::Result<RawPeer<named_pipe::DuplexPipeStream<named_pipe::pipe_mode::Bytes>>> {
    let name = peer_name();
    let listener = named_pipe::PipeListenerOptions::new()
        .path(format!("{PIPE_PREFIX}{name}"))
        .input_buffer_size_hint(PIPE_BUFFER)
        .output_buffer_size_hint(PIPE_BUFFER)
        .create_duplex::<named_pipe::pipe_mode::Bytes>()?;
    let child = Command::new(std::env::current_exe()?)
        .arg("bench-echo-server")
        .arg(&name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let stream = listener.accept()?;
    Ok(RawPeer { child, stream })
}

/// Calls per second with `depth` 16-byte requests kept in flight, raw: write `depth`
/// frames, then one more for each reply read.
fn raw_pipelined(depth: usize, total: usize) -> f64 {
    let mut peer = spawn_raw_peer().expect("start the raw echo baseline");
    let mut frame = 16u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[7u8; 16]);
    let started = Instant::now();
    let (mut sent, mut received) = (0, 0);
    let mut buf = [0u8; 20];
    while received < total {
        while sent < total && sent - received < depth {
            peer.stream.write_all(&frame).unwrap();
            sent += 1;
        }
        peer.stream.read_exact(&mut buf).unwrap();
        received += 1;
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn plugin_latency(plugin: &Plugin, size: usize, iterations: usize) -> Stats {
    let payload = vec![7u8; size];
    smol::block_on(async {
        for _ in 0..iterations / 10 + 1 {
            plugin.call_raw("echo", payload.clone()).await.unwrap();
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let input = payload.clone();
            let t = Instant::now();
            let out = plugin.call_raw("echo", input).await.unwrap();
            samples.push(t.elapsed());
            debug_assert_eq!(out.len(), size);
        }
        stats(samples)
    })
}

fn plugin_pipelined(plugin: &Plugin, depth: usize, total: usize) -> f64 {
    let ex = smol::LocalExecutor::new();
    let per_task = total / depth;
    let started = Instant::now();
    smol::block_on(ex.run(async {
        let tasks: Vec<_> = (0..depth)
            .map(|_| {
                let plugin = plugin.clone();
                ex.spawn(async move {
                    for _ in 0..per_task {
                        plugin.call_raw("echo", vec![7u8; 16]).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await;
        }
    }));
    (per_task * depth) as f64 / started.elapsed().as_secs_f64()
}

#[derive(Serialize)]
struct AskMany<'a> {
    function: &'a str,
    n: u64,
}

#[derive(Serialize)]
struct Count {
    n: u64,
    size: usize,
}

/// Host calls against plain calls, in alternating batches (so a drift in the machine's
/// speed affects both alike); one sample per batch: the mean per call. Host calls are made
/// by the plugin: `callbacks`' `ask_many` calls the host function `echo` (16 bytes in and
/// out) `per_batch` times in a row and returns the nanoseconds that took, timed in the
/// plugin. Plain calls are `per_batch` calls of the plugin's `echo` with 16 bytes, timed
/// in the host. Returns (plain, host call).
fn host_call_latency(
    plugin: &Plugin,
    batches: usize,
    per_batch: u64,
) -> Result<(Stats, Stats), plugin_host::Error> {
    let input = AskMany {
        function: "echo",
        n: per_batch,
    };
    smol::block_on(async {
        let mut plain = Vec::with_capacity(batches);
        let mut hosted = Vec::with_capacity(batches);
        for i in 0..batches + batches / 10 + 1 {
            let t = Instant::now();
            for _ in 0..per_batch {
                plugin.call_raw("echo", vec![7u8; 16]).await?;
            }
            let plain_ns = t.elapsed().as_nanos() as u64;
            let hosted_ns: u64 = plugin.call("ask_many", &input).await?;
            // The first tenth warms up.
            if i > batches / 10 {
                plain.push(Duration::from_nanos(plain_ns / per_batch));
                hosted.push(Duration::from_nanos(hosted_ns / per_batch));
            }
        }
        Ok((stats(plain), stats(hosted)))
    })
}

/// Items per second of one stream: `callbacks`' `count` emitting `n` items of `size` bytes
/// (`call_stream_raw`), from the call to the stream's end.
fn stream_rate(plugin: &Plugin, n: u64, size: usize) -> Result<f64, plugin_host::Error> {
    let run = |n: u64| async move {
        let input = rmp_serde::to_vec_named(&Count { n, size }).expect("encode the input");
        let started = Instant::now();
        let mut stream = plugin.call_stream_raw("count", input, CallOptions::default());
        let mut items = 0u64;
        while let Some(item) = stream.next().await {
            let item = item?;
            debug_assert_eq!(item.len(), size);
            items += 1;
        }
        let elapsed = started.elapsed();
        assert_eq!(items, n, "the stream ended early");
        Ok::<f64, plugin_host::Error>(items as f64 / elapsed.as_secs_f64())
    };
    smol::block_on(async {
        run(n / 10 + 1).await?;
        run(n).await
    })
}

/// The latency of a call that wakes an idle-reclaimed worker, `samples` times.
fn wake_latency(host: &Host, manifest: &Path, samples: usize) -> Result<Stats, String> {
    let mut m = Manifest::from_file(manifest).map_err(|e| e.to_string())?;
    m.name = "hello-idle".into();
    m.trust = Trust::Untrusted;
    m.idle_timeout = Some(Duration::from_millis(30));
    let plugin = smol::block_on(host.load_manifest(m)).map_err(|e| e.to_string())?;
    let events = plugin.subscribe();
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        // Wait (bounded) until the worker is reclaimed.
        let reclaimed = smol::block_on(async {
            futures_lite::future::or(
                async {
                    while let Ok(event) = events.recv().await {
                        if matches!(event, PluginEvent::Idle { .. }) {
                            return true;
                        }
                    }
                    false
                },
                async {
                    smol::Timer::after(Duration::from_secs(5)).await;
                    false
                },
            )
            .await
        });
        if !reclaimed {
            break;
        }
        let t = Instant::now();
        let answered = smol::block_on(plugin.call_raw("echo", vec![1u8; 16]));
        times.push(t.elapsed());
        answered.map_err(|e| e.to_string())?;
    }
    smol::block_on(plugin.shutdown());
    match times.len() == samples {
        true => Ok(stats(times)),
        false => Err("the idle worker was not reclaimed within 5 s".into()),
    }
}

/// The width of the name column.
const W: usize = 40;

fn ratio(s: &Stats, base: &Stats) -> f64 {
    s.median.as_secs_f64() / base.median.as_secs_f64()
}

/// ` [shm]` or ` [socket]`: which transport a line's isolated plugin was asked to use.
fn tag(t: Transport) -> String {
    format!(" [{}]", t.name())
}

/// `target TEXT: met` (or `MISSED`).
fn target(text: &str, met: bool) -> String {
    format!("target {text}: {}", if met { "met" } else { "MISSED" })
}

fn line(name: &str, s: &Stats, base: &Stats, target: &str) {
    println!(
        "{name:<W$} median {:>10}  p99 {:>10}  ratio {:>5.2}x  {target}",
        fmt(s.median),
        fmt(s.p99),
        ratio(s, base)
    );
}

/// A line with its ratio to each of several baselines, e.g. `ratio 0.31x raw socket,
/// 2.70x shm ping-pong`.
fn line_vs(name: &str, s: &Stats, bases: &[(&str, &Stats)], target: &str) {
    let ratios = bases
        .iter()
        .map(|(what, base)| format!("{:>5.2}x {what}", ratio(s, base)))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{name:<W$} median {:>10}  p99 {:>10}  ratio {ratios}  {target}",
        fmt(s.median),
        fmt(s.p99)
    );
}

/// A line with the mean too (the WebAssembly figures), and ratios as [`line_vs`].
fn line_mean(name: &str, s: &Stats, bases: &[(&str, &Stats)], target: &str) {
    let ratios = bases
        .iter()
        .map(|(what, base)| format!("{:>5.2}x {what}", ratio(s, base)))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{name:<W$} median {:>10}  mean {:>10}  p99 {:>10}  ratio {ratios}  {target}",
        fmt(s.median),
        fmt(s.mean),
        fmt(s.p99)
    );
}

fn baseline(name: &str, s: &Stats) {
    println!(
        "{name:<W$} median {:>10}  p99 {:>10}  (baseline)",
        fmt(s.median),
        fmt(s.p99)
    );
}

/// With both transports measured, the shm figure over the socket one: `what` is the
/// figure's name, `values` one per transport (durations or rates, as `unit` says).
fn versus(what: &str, values: &[(Transport, f64)], unit: &str) {
    let find = |t: Transport| values.iter().find(|(x, _)| *x == t).map(|(_, v)| *v);
    if let (Some(shm), Some(socket)) = (find(Transport::SharedMemory), find(Transport::Socket)) {
        println!(
            "{:<W$} ratio {:>5.2}x  ({what}: shm / socket, {unit})",
            "  shm vs socket",
            shm / socket
        );
    }
}

/// The transport each of a plugin's workers uses now (`Plugin::status`), e.g. `shm`;
/// says so when it is not the one asked for (the worker or the system could not use it).
fn transport_in_use(p: &Plugin, asked: Transport) -> String {
    let used: Vec<&str> = p
        .status()
        .instances
        .iter()
        .map(|i| i.transport.map_or("none", Transport::name))
        .collect();
    let mut text = used.join(", ");
    if used.iter().any(|u| *u != asked.name()) {
        text.push_str(&format!(" (NOT the {} asked for)", asked.name()));
    }
    text
}

/// Keeps one CPU from going idle while on (`--warm`): a thread spinning in this process.
/// Off while idle CPU is measured.
struct Warm {
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Warm {
    fn new(on: bool) -> Warm {
        let mut warm = Warm {
            on: Default::default(),
            thread: None,
        };
        warm.set(on);
        warm
    }

    fn set(&mut self, on: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        match (on, self.thread.take()) {
            (true, None) => {
                self.on.store(true, Relaxed);
                let spinning = self.on.clone();
                // Keeps one CPU from going idle, so wake-ups cost what they cost on a busy
                // machine rather than a virtual CPU's exit from idle.
                self.thread = Some(std::thread::spawn(move || {
                    while spinning.load(Relaxed) {
                        std::hint::spin_loop();
                    }
                }));
            }
            (false, Some(thread)) => {
                self.on.store(false, Relaxed);
                let _ = thread.join();
            }
            (_, thread) => self.thread = thread,
        }
    }
}

/// What [`crash_latency`] measured.
struct CrashTimes {
    /// Each method's times, call to error.
    methods: Vec<(&'static str, Stats)>,
    /// The transport the worker used (`Plugin::status`).
    in_use: String,
}

/// How long a call that crashes its worker takes to come back as an error: `faulty`'s
/// `segfault` and `abort` (SIGSEGV, SIGABRT), `rounds` times each, alternating, each
/// right after a successful `echo` (which also waits for the restart after the last
/// crash).
fn crash_latency(
    host: &Host,
    manifest: &Path,
    transport: Transport,
    rounds: usize,
) -> Result<CrashTimes, String> {
    let mut m = Manifest::from_file(manifest).map_err(|e| e.to_string())?;
    m.name = "faulty-bench".into();
    m.trust = Trust::Untrusted;
    // The bench registers none of its host functions (each would be warned about).
    m.imports = Vec::new();
    m.restart.max_crashes = u32::MAX;
    m.restart.backoff = Duration::from_millis(1);
    m.restart.backoff_max = Duration::from_millis(1);
    let plugin = smol::block_on(host.load_manifest(m)).map_err(|e| e.to_string())?;
    let methods = ["segfault", "abort"];
    let mut samples = vec![Vec::with_capacity(rounds); methods.len()];
    let mut in_use = String::new();
    let result = (|| {
        for _ in 0..rounds {
            for (method, times) in methods.iter().zip(samples.iter_mut()) {
                smol::block_on(plugin.call_raw("echo", vec![1u8; 16]))
                    .map_err(|e| format!("`echo` before `{method}`: {e}"))?;
                in_use = transport_in_use(&plugin, transport);
                // MessagePack nil: the methods take anything.
                let t = Instant::now();
                let answer = smol::block_on(plugin.call_raw(method, vec![0xc0]));
                let elapsed = t.elapsed();
                match answer {
                    Err(plugin_host::Error::Call(
                        plugin_host::CallError::Crashed { .. }
                        | plugin_host::CallError::Killed { .. },
                    )) => times.push(elapsed),
                    Err(e) => return Err(format!("`{method}`: not a crash: {e}")),
                    Ok(_) => return Err(format!("`{method}` returned instead of crashing")),
                }
            }
        }
        Ok(())
    })();
    smol::block_on(plugin.shutdown());
    result?;
    Ok(CrashTimes {
        methods: methods
            .into_iter()
            .zip(samples.into_iter().map(stats))
            .collect(),
        in_use,
    })
}

/// How many pairs of processes the shared-memory ping-pong is measured on.
#[cfg(target_os = "linux")]
const PING_PONG_PAIRS: usize = 3;

/// The shared-memory ping-pong baseline, where there is one (Linux): the best of
/// [`PING_PONG_PAIRS`] fresh pairs of processes, and each pair's median. Two spinning
/// processes that the scheduler leaves on one CPU take turns through `sched_yield` and
/// measure many times slower than on two; the best pair is the mechanism's cost, and a
/// baseline must not flatter the figures compared with it.
fn shm_pingpong(size: usize, iterations: usize) -> Option<(Stats, Vec<Duration>)> {
    #[cfg(target_os = "linux")]
    {
        let mut best: Option<Stats> = None;
        let mut medians = Vec::with_capacity(PING_PONG_PAIRS);
        for _ in 0..PING_PONG_PAIRS {
            match pingpong::latency(size, iterations) {
                Ok(s) => {
                    medians.push(s.median);
                    match &best {
                        Some(b) if b.median <= s.median => {}
                        _ => best = Some(s),
                    }
                }
                Err(e) => {
                    eprintln!("error: the shared-memory ping-pong baseline: {e}");
                    return None;
                }
            }
        }
        best.map(|b| (b, medians))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (size, iterations);
        None
    }
}

/// One transport's isolated plugins and the hosts that made them.
struct Side {
    transport: Transport,
    /// Deny-all: untrusted, sandbox required (the library's default policy).
    sandboxed: Host,
    /// Untrusted, sandbox off: the worker without the sandbox, for comparison only.
    unsandboxed: Host,
    /// `hello`, sandboxed: the plugin most figures are about.
    isolated: Plugin,
}

pub fn run(settings: &Settings, host: &Host) -> ExitCode {
    // The machine's load as the bench found it (before any of its own work).
    let loadavg = match cfg!(target_os = "linux") {
        true => {
            std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".into())
                + " (1, 5, 15 min; read before the run)"
        }
        false => "unknown (read from /proc/loadavg, on Linux only)".into(),
    };
    let backtrace = std::env::var_os("RUST_BACKTRACE");
    // Errors are mostly not on the measured path (the crash figures are), but measure
    // without backtrace capture anyway: the variable is removed before any thread or
    // worker starts (workers inherit the environment as it is then).
    // SAFETY (of the environment change): no other thread exists yet in this process.
    std::env::remove_var("RUST_BACKTRACE");
    let mut warm = Warm::new(settings.warm);
    let (n_small, n_big, total) = if settings.quick {
        (200, 10, 2_000)
    } else {
        (5_000, 200, 100_000)
    };
    println!(
        "plugin-host bench: {} CPUs, load average {loadavg}{}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if settings.warm {
            "; --warm: one CPU kept busy"
        } else {
            ""
        }
    );
    match &backtrace {
        None => println!("RUST_BACKTRACE: not set"),
        Some(v) => println!(
            "RUST_BACKTRACE={v:?} was set: removed before anything started (measured without backtraces)"
        ),
    }
    // Without shared memory the library gives a worker asked for it the socket: measure
    // the socket once, and say so.
    let mut transports = settings.transports.clone();
    if !SHM && transports.contains(&Transport::SharedMemory) {
        transports.retain(|t| *t != Transport::SharedMemory);
        if transports.is_empty() {
            transports.push(Transport::Socket);
        }
        println!(
            "transport shm: not available on this system (shared memory is Linux-only); a \
             worker asked for it uses the socket, measured instead"
        );
    }
    let names: Vec<&str> = transports.iter().map(|t| t.name()).collect();
    println!(
        "transport of the isolated plugins: {}{}",
        names.join(" and "),
        if names.len() > 1 {
            ", side by side in this run (lines tagged [shm] / [socket])"
        } else if cfg!(windows) {
            " (on Windows a named pipe)"
        } else {
            ""
        }
    );
    #[cfg(windows)]
    {
        println!(
            "{RAW}: a named-pipe echo in a child process ({} KiB buffers each way, as the \
             library's pipe); async-io cannot wait on a named pipe, so one call in flight is \
             the faster of plain blocking ReadFile/WriteFile and interprocess's local socket \
             (overlapped I/O), 64 in flight and spawn + connect plain blocking",
            PIPE_BUFFER >> 10
        );
    }
    if !SANDBOX {
        println!(
            "sandbox: not available on this system (Linux only); the default policy would \
             refuse every plugin here, so the isolated figures are for untrusted workers with \
             the sandbox off (separate processes, the host's rights) and the sandbox-on \
             figures are skipped"
        );
    }
    println!(
        "one call in flight unless stated; ratios are against baselines measured in this run;\n\
         targets: issue 11's on [shm] lines, the earlier ones on [socket] lines\n"
    );

    let manifest_path = settings.plugins.join("hello/plugin.toml");
    let callbacks_path = settings.plugins.join("callbacks/plugin.toml");
    let faulty_path = settings.plugins.join("faulty/plugin.toml");
    // The CLI's search paths, with a policy and a transport of the bench's own, and the
    // trivial host function `echo` the host-call figures use.
    let with_policy =
        |transport: Option<Transport>, policy: &dyn Fn(HostBuilder) -> HostBuilder| -> Host {
            let mut builder = host
                .search_paths()
                .iter()
                .fold(Host::builder(), |b, dir| b.search_path(dir))
                .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                    Ok::<_, HostError>(input)
                });
            if let Some(t) = transport {
                builder = builder.transport(t);
            }
            policy(builder).build().expect("build a host")
        };
    let deny_all = |b: HostBuilder| b.permissions(|_| Grant::deny_all());
    let sandbox_off = |b: HostBuilder| {
        b.permissions(|_| Grant {
            sandbox: SandboxMode::Off,
            ..Grant::deny_all()
        })
    };
    // The in-process measurement: hello is our own example plugin, and the bench asks for
    // trust below, so granting what is requested is right here.
    let trusting = with_policy(None, &HostBuilder::grant_requested);
    let load = |host: &Host, trust: Trust| -> Result<Plugin, plugin_host::Error> {
        let mut m = Manifest::from_file(&manifest_path)?;
        m.trust = trust;
        smol::block_on(host.load_manifest(m))
    };
    let layers = |p: &Plugin| {
        let s = p.status();
        let mut text = match s.sandbox.is_empty() {
            true => "none".to_string(),
            false => format!("{} ({})", s.sandbox.len(), s.sandbox.join(", ")),
        };
        if !s.sandbox_missing.is_empty() {
            text.push_str(&format!("; missing: {}", s.sandbox_missing.join("; ")));
        }
        text
    };
    let mut sides = Vec::new();
    let mut sandbox_off_plugins = Vec::new();
    for &transport in &transports {
        // Without a sandbox, the isolated figures are with the sandbox off.
        let sandboxed = match SANDBOX {
            true => with_policy(Some(transport), &deny_all),
            false => with_policy(Some(transport), &sandbox_off),
        };
        let unsandboxed = with_policy(Some(transport), &sandbox_off);
        if !SANDBOX {
            let isolated = match load(&sandboxed, Trust::Untrusted) {
                Ok(p) => p,
                Err(e) => {
                    crate::report::print(&e, Some(&manifest_path));
                    return ExitCode::from(4);
                }
            };
            println!(
                "isolated worker{}, sandbox off (no sandbox on this system): transport in use {}; \
                 layers {}",
                tag(transport),
                transport_in_use(&isolated, transport),
                layers(&isolated)
            );
            sides.push(Side {
                transport,
                sandboxed,
                unsandboxed,
                isolated,
            });
            continue;
        }
        let (isolated, off) = match (
            load(&sandboxed, Trust::Untrusted),
            load(&unsandboxed, Trust::Untrusted),
        ) {
            (Ok(on), Ok(off)) => (on, off),
            (Err(e), _) | (_, Err(e)) => {
                crate::report::print(&e, Some(&manifest_path));
                return ExitCode::from(4);
            }
        };
        println!(
            "isolated worker{}, sandbox on: transport in use {}; layers {}",
            tag(transport),
            transport_in_use(&isolated, transport),
            layers(&isolated)
        );
        println!(
            "isolated worker{}, sandbox off (for comparison only; never for untrusted plugins): \
             transport in use {}; layers {}",
            tag(transport),
            transport_in_use(&off, transport),
            layers(&off)
        );
        sandbox_off_plugins.push(off);
        sides.push(Side {
            transport,
            sandboxed,
            unsandboxed,
            isolated,
        });
    }
    let in_process = match load(&trusting, Trust::Trusted) {
        Ok(p) if p.trust() == Trust::Trusted => p,
        Ok(_) => {
            eprintln!("error: the in-process plugin was not granted trust");
            return ExitCode::from(4);
        }
        Err(e) => {
            crate::report::print(&e, Some(&manifest_path));
            return ExitCode::from(4);
        }
    };
    // The WebAssembly backend: hello.wasm, run in this process by the interpreter (the
    // policy does not apply to it: the engine contains it).
    let wasm_host = with_policy(None, &deny_all);
    let load_wasm = |module: &Path| -> Result<Plugin, plugin_host::Error> {
        let mut m = Manifest::from_file(&manifest_path)?;
        m.runtime = plugin_host::Runtime::Wasm;
        m.library = module.display().to_string();
        smol::block_on(wasm_host.load_manifest(m))
    };
    let wasm_module = crate::find_wasm(host.search_paths(), "hello");
    let wasm = match &wasm_module {
        None => {
            println!(
                "wasm: hello.wasm not found in the search paths (-L, then beside this executable \
                 and in ../{}/release from it); build it with `{}`; the wasm lines are skipped",
                crate::WASM_TARGET,
                crate::wasm_build_hint(&["hello"])
            );
            None
        }
        Some(module) => match load_wasm(module) {
            Ok(p) => {
                println!(
                    "wasm: {}, in this process (wasmi); layers {}",
                    module.display(),
                    layers(&p)
                );
                Some(p)
            }
            Err(e) => {
                crate::report::print(&e, Some(module));
                return ExitCode::from(4);
            }
        },
    };
    println!();

    for (size, iterations) in [(16, n_small), (4096, n_small), (1 << 20, n_big)] {
        let size_text = size_name(size);
        let raw = raw_latency(size, iterations);
        let (ping, pairs) = match shm_pingpong(size, iterations) {
            Some((best, pairs)) => (Some(best), pairs),
            None => (None, Vec::new()),
        };
        baseline(&format!("{RAW} echo {size_text}"), &raw);
        let mut bases = vec![(RAW, &raw)];
        if let Some(ping) = &ping {
            line_vs(
                &format!("shm ping-pong {size_text}"),
                ping,
                &bases,
                &format!(
                    "(baseline: the best of {} pairs of processes, medians {})",
                    pairs.len(),
                    pairs
                        .iter()
                        .map(|d| fmt(*d))
                        .collect::<Vec<_>>()
                        .join(" / ")
                ),
            );
            bases.push(("shm ping-pong", ping));
        }
        let mut medians = Vec::new();
        // Each transport's isolated figure, for the WebAssembly line's ratios.
        let mut isolated_now: Vec<(String, Stats)> = Vec::new();
        for side in &sides {
            let ours = plugin_latency(&side.isolated, size, iterations);
            let vs_raw = ratio(&ours, &raw);
            let vs_ping = ping.as_ref().map(|p| ratio(&ours, p));
            let goal = match (side.transport, size) {
                (Transport::SharedMemory, 16) => target(
                    &format!("<= 0.5x {RAW}, <= 3x shm ping-pong"),
                    vs_raw <= 0.5 && vs_ping.into_iter().all(|r| r <= 3.0),
                ),
                (Transport::SharedMemory, 1_048_576) => {
                    target(&format!("<= 1.0x {RAW}"), vs_raw <= 1.0)
                }
                (Transport::Socket, 16) => target(&format!("<= 1.5x {RAW}"), vs_raw <= 1.5),
                (Transport::Socket, 1_048_576) => target(&format!("<= 2x {RAW}"), vs_raw <= 2.0),
                _ => String::new(),
            };
            line_vs(
                &format!("isolated call {size_text}{}", tag(side.transport)),
                &ours,
                &bases,
                &goal,
            );
            medians.push((side.transport, ours.median.as_secs_f64()));
            isolated_now.push((format!("isolated{}", tag(side.transport)), ours));
        }
        versus(&format!("isolated call {size_text}"), &medians, "median");
        let mut in_process_now = None;
        if size == 16 {
            for (side, off) in sides.iter().zip(&sandbox_off_plugins) {
                let s = plugin_latency(off, size, iterations);
                line_vs(
                    &format!("isolated call 16 B, sandbox off{}", tag(side.transport)),
                    &s,
                    &bases,
                    "",
                );
            }
            let inproc = plugin_latency(&in_process, size, iterations);
            line_vs("in-process call 16 B", &inproc, &bases, "");
            in_process_now = Some(inproc);
        }
        if let Some(wasm) = &wasm {
            let ours = plugin_latency(wasm, size, iterations);
            let mut vs: Vec<(&str, &Stats)> = vec![(RAW, &raw)];
            vs.extend(isolated_now.iter().map(|(n, s)| (n.as_str(), s)));
            if let Some(inproc) = &in_process_now {
                vs.push(("in-process", inproc));
            }
            let goal = match size {
                16 => target(
                    "<= 1.5 us median",
                    ours.median <= Duration::from_nanos(1_500),
                ),
                1_048_576 => target(
                    "<= 0.3 ms median",
                    ours.median <= Duration::from_micros(300),
                ),
                _ => String::new(),
            };
            line_mean(&format!("wasm call {size_text}"), &ours, &vs, &goal);
            if size == 16 {
                let (low, high) = EXTISM_16B;
                let faster = low.as_secs_f64() / ours.median.as_secs_f64();
                println!(
                    "{:<W$} {faster:>5.1}x faster than Extism's {}..{} median (a reference: \
                     measured separately on this machine, not in this run; against its low \
                     end)  {}",
                    "  wasm 16 B vs Extism",
                    fmt(low),
                    fmt(high),
                    target(">= 5x faster", faster >= 5.0)
                );
            }
        }
    }
    if let Some(wasm) = wasm {
        smol::block_on(wasm.shutdown());
    }
    for off in sandbox_off_plugins {
        smol::block_on(off.shutdown());
    }
    smol::block_on(in_process.shutdown());

    // Host functions and streams: `callbacks`, isolated (sandboxed, each transport) and
    // in-process. Of its imports only `echo` is provided (the others would each be warned
    // about).
    let load_callbacks = |host: &Host, trust: Trust| -> Result<Plugin, plugin_host::Error> {
        let mut m = Manifest::from_file(&callbacks_path)?;
        m.trust = trust;
        m.imports = vec!["echo".into()];
        smol::block_on(host.load_manifest(m))
    };
    // (place, the transport asked for, the plugin)
    let mut callbacks: Vec<(&str, Option<Transport>, Plugin)> = Vec::new();
    for (place, transport, loaded) in sides
        .iter()
        .map(|s| {
            (
                "isolated",
                Some(s.transport),
                load_callbacks(&s.sandboxed, Trust::Untrusted),
            )
        })
        .chain([(
            "in-process",
            None,
            load_callbacks(&trusting, Trust::Trusted),
        )])
    {
        match loaded {
            Ok(p) => {
                if let Some(t) = transport {
                    let used = transport_in_use(&p, t);
                    if used != t.name() {
                        println!("note: callbacks{}: transport in use {used}", tag(t));
                    }
                }
                callbacks.push((place, transport, p));
            }
            Err(e) => {
                crate::report::print(&e, Some(&callbacks_path));
                return ExitCode::from(4);
            }
        }
    }
    let (per_batch, batches) = if settings.quick { (20, 20) } else { (100, 200) };
    println!();
    let mut hosted_medians = Vec::new();
    for (place, transport, plugin) in &callbacks {
        let t = transport.map_or(String::new(), tag);
        match host_call_latency(plugin, batches, per_batch) {
            Ok((plain, hosted)) => {
                baseline(&format!("{place} call 16 B (callbacks){t}"), &plain);
                let goal = match *place {
                    "isolated" => target("<= 1.2x", ratio(&hosted, &plain) <= 1.2),
                    _ => String::new(),
                };
                line(
                    &format!("host call from {place} plugin{t}"),
                    &hosted,
                    &plain,
                    &goal,
                );
                if let Some(transport) = transport {
                    hosted_medians.push((*transport, hosted.median.as_secs_f64()));
                }
            }
            Err(e) => eprintln!("error: host calls from the {place} plugin{t}: {e}"),
        }
    }
    versus("host call from isolated plugin", &hosted_medians, "median");
    println!(
        "  (per call: the mean of a batch of {per_batch} calls; median and p99 over {batches} \
         batches of each, alternating; host calls timed in the plugin)\n"
    );

    let depth = 64;
    let raw_rate = raw_pipelined(depth, total);
    println!(
        "{:<W$} {:>10.0} calls/s  (baseline)",
        format!("{RAW}, {depth} in flight"),
        raw_rate
    );
    let mut rates = Vec::new();
    for side in &sides {
        let rate = plugin_pipelined(&side.isolated, depth, total);
        let goal = match side.transport {
            Transport::SharedMemory => target(&format!(">= 1.0x {RAW}"), rate / raw_rate >= 1.0),
            Transport::Socket => target(&format!(">= 0.5x {RAW}"), rate / raw_rate >= 0.5),
        };
        println!(
            "{:<W$} {:>10.0} calls/s  ratio {:>5.2}x  {goal}",
            format!("isolated, {depth} in flight{}", tag(side.transport)),
            rate,
            rate / raw_rate
        );
        rates.push((side.transport, rate));
    }
    versus(&format!("{depth} in flight"), &rates, "calls/s");
    // The same load over a pool of two workers (a distinct name: names are unique).
    for (side, &(_, our_rate)) in sides.iter().zip(&rates) {
        let pool = {
            let mut m = Manifest::from_file(&manifest_path).expect("the hello manifest");
            m.name = "hello-pool".into();
            m.trust = Trust::Untrusted;
            m.instances = Some(2);
            smol::block_on(side.sandboxed.load_manifest(m))
        };
        match pool {
            Ok(pool) => {
                let pool_rate = plugin_pipelined(&pool, depth, total);
                println!(
                    "{:<W$} {:>10.0} calls/s  ratio {:>5.2}x  (vs 1 instance; each worker runs {} calls at once; transports in use {})",
                    format!("pool of 2, {depth} in flight{}", tag(side.transport)),
                    pool_rate,
                    pool_rate / our_rate,
                    pool.manifest().limits.concurrency,
                    transport_in_use(&pool, side.transport)
                );
                smol::block_on(pool.shutdown());
            }
            Err(e) => eprintln!("error: pool of 2{}: {e}", tag(side.transport)),
        }
    }
    // Stream throughput, against the 64-in-flight rate above: both move small messages
    // one way as fast as the plugin makes them. In-process streams are compared with the
    // first transport's rate.
    let items = total as u64;
    let mut stream_rates = Vec::new();
    for (place, transport, plugin) in &callbacks {
        let (t, base, base_name) = match transport {
            Some(t) => (
                tag(*t),
                rates.iter().find(|(x, _)| x == t).map_or(0.0, |r| r.1),
                format!("isolated calls{}", tag(*t)),
            ),
            None => (
                String::new(),
                rates[0].1,
                format!("isolated calls{}", tag(rates[0].0)),
            ),
        };
        match stream_rate(plugin, items, 16) {
            Ok(rate) => {
                println!(
                    "{:<W$} {:>10.0} items/s  ratio {:>5.2}x  (vs {base_name}, {depth} in flight; {items} items)",
                    format!("stream of 16 B items, {place}{t}"),
                    rate,
                    rate / base
                );
                if let Some(transport) = transport {
                    stream_rates.push((*transport, rate));
                }
            }
            Err(e) => eprintln!("error: stream from the {place} plugin{t}: {e}"),
        }
    }
    versus("stream of 16 B items", &stream_rates, "items/s");
    for (_, _, plugin) in callbacks {
        smol::block_on(plugin.shutdown());
    }

    // Idle CPU: only the sandboxed `hello` of each transport is loaded now, idle after
    // its calls. The spinning thread of --warm is stopped meanwhile.
    #[cfg(any(target_os = "linux", windows))]
    {
        warm.set(false);
        let window = if settings.quick {
            Duration::from_secs(2)
        } else {
            Duration::from_secs(10)
        };
        println!();
        idle_cpu(&sides, window);
        warm.set(settings.warm);
    }
    #[cfg(not(any(target_os = "linux", windows)))]
    println!(
        "\nidle CPU: not measured on this system (read from /proc on Linux, GetProcessTimes \
         on Windows)"
    );

    // Crash -> error: a call that kills its worker, to the caller's error. The figure is
    // bimodal on virtual machines (about 1 ms or 3-4 ms with one CPU kept busy): enough
    // rounds for the median to say which mode dominates.
    let rounds = if settings.quick { 3 } else { 30 };
    println!();
    let mut crash_medians: Vec<(&str, Transport, f64)> = Vec::new();
    for side in &sides {
        match crash_latency(&side.sandboxed, &faulty_path, side.transport, rounds) {
            Ok(CrashTimes { methods, in_use }) => {
                for (method, s) in methods {
                    println!(
                        "{:<W$} median {:>10}  p99 {:>10}  ({rounds} rounds; call to error; transport in use {in_use})",
                        format!("crash -> error, {method}{}", tag(side.transport)),
                        fmt(s.median),
                        fmt(s.p99),
                    );
                    crash_medians.push((method, side.transport, s.median.as_secs_f64()));
                }
            }
            Err(e) => eprintln!("error: crash latency{}: {e}", tag(side.transport)),
        }
    }
    for method in ["segfault", "abort"] {
        let values: Vec<(Transport, f64)> = crash_medians
            .iter()
            .filter(|(m, _, _)| *m == method)
            .map(|&(_, t, v)| (t, v))
            .collect();
        versus(&format!("crash -> error, {method}"), &values, "median");
    }
    for side in &sides {
        smol::block_on(side.isolated.shutdown());
    }
    println!();

    let starts = if settings.quick { 5 } else { 30 };
    let bare = stats(
        (0..starts)
            .map(|_| {
                let t = Instant::now();
                let mut peer = spawn_raw_peer().expect("spawn the baseline peer");
                let mut reply = Vec::new();
                raw_round_trip(&mut peer.stream, &raw_frame(16), &mut reply);
                let d = t.elapsed();
                drop(peer);
                d
            })
            .collect(),
    );
    // Load, first reply, shutdown; returns the time to the first reply and the layers the
    // worker had.
    let cold_start = |host: &Host| -> (Duration, Vec<String>) {
        let t = Instant::now();
        let plugin = load(host, Trust::Untrusted).expect("load the plugin");
        smol::block_on(plugin.call_raw("echo", vec![1u8; 16])).unwrap();
        let d = t.elapsed();
        let layers = plugin.status().sandbox;
        smol::block_on(plugin.shutdown());
        (d, layers)
    };
    // Interleaved (sandbox off and on, each transport), so a drift in the machine's speed
    // affects all alike. Without a sandbox, off only.
    let mut off_samples = vec![Vec::with_capacity(starts); sides.len()];
    let mut on_samples = vec![Vec::with_capacity(starts); sides.len()];
    let mut on_layers = Vec::new();
    let mut off_layers = Vec::new();
    let mut wasm_samples = Vec::with_capacity(starts);
    let mut wasm_failed = false;
    for _ in 0..starts {
        // The WebAssembly plugin's cold start: module load (read, compile, instantiate,
        // the plugin's create), first reply, shutdown.
        if let Some(module) = wasm_module.as_deref().filter(|_| !wasm_failed) {
            let t = Instant::now();
            match load_wasm(module).and_then(|p| {
                let echoed = smol::block_on(p.call_raw("echo", vec![1u8; 16]));
                let d = t.elapsed();
                smol::block_on(p.shutdown());
                echoed.map(|_| d)
            }) {
                Ok(d) => wasm_samples.push(d),
                Err(e) => {
                    eprintln!("error: wasm cold start: {e}");
                    wasm_failed = true;
                }
            }
        }
        for (i, side) in sides.iter().enumerate() {
            let (d, l) = cold_start(&side.unsandboxed);
            off_samples[i].push(d);
            off_layers = l;
            if SANDBOX {
                let (d, l) = cold_start(&side.sandboxed);
                on_samples[i].push(d);
                on_layers = l;
            }
        }
    }
    baseline("bare spawn + connect + echo", &bare);
    let mut cold_medians = Vec::new();
    let mut cold_on_stats = Vec::new();
    for (side, (off, on)) in sides.iter().zip(off_samples.into_iter().zip(on_samples)) {
        let t = tag(side.transport);
        let cold_off = stats(off);
        line(
            &format!("cold start, sandbox off{t}"),
            &cold_off,
            &bare,
            "(spawn..first reply)",
        );
        if !SANDBOX {
            println!(
                "{:<W$} not available on this system (no sandbox): skipped",
                format!("cold start, sandbox on{t}")
            );
            // The idle wake-up below is compared with the cold start there is.
            cold_on_stats.push(cold_off);
            continue;
        }
        let cold_on = stats(on);
        line(
            &format!("cold start, sandbox on{t}"),
            &cold_on,
            &bare,
            &target("<= 2x", ratio(&cold_on, &bare) <= 2.0),
        );
        let cost_us = (cold_on.median.as_secs_f64() - cold_off.median.as_secs_f64()) * 1e6;
        println!(
            "{:<W$} {:>+10.0} us on the median  ratio {:>5.2}x  (sandbox on vs off)",
            format!("sandbox cost at cold start{t}"),
            cost_us,
            ratio(&cold_on, &cold_off)
        );
        cold_medians.push((side.transport, cold_on.median.as_secs_f64()));
        cold_on_stats.push(cold_on);
    }
    versus("cold start, sandbox on", &cold_medians, "median");
    if !wasm_samples.is_empty() && !wasm_failed {
        let cold = stats(wasm_samples);
        let names: Vec<String> = sides
            .iter()
            .map(|side| {
                format!(
                    "isolated cold start, sandbox {}{}",
                    if SANDBOX { "on" } else { "off" },
                    tag(side.transport)
                )
            })
            .collect();
        let mut vs: Vec<(&str, &Stats)> = vec![("bare spawn", &bare)];
        vs.extend(names.iter().map(String::as_str).zip(&cold_on_stats));
        line_mean(
            "cold start, wasm (load + first call)",
            &cold,
            &vs,
            "(read, compile, instantiate, create, first reply)",
        );
    }
    let names = |layers: &[String]| match layers.is_empty() {
        true => "none".to_string(),
        false => layers.join(", "),
    };
    match SANDBOX {
        true => println!(
            "cold-start worker layers: sandbox on: {}; sandbox off: {}",
            names(&on_layers),
            names(&off_layers)
        ),
        false => println!(
            "cold-start worker layers: sandbox off: {}",
            names(&off_layers)
        ),
    }
    // A call that finds its worker reclaimed for being idle starts it again: the cost, next
    // to a cold start (load + first call) measured above.
    for (side, cold_on) in sides.iter().zip(&cold_on_stats) {
        let t = tag(side.transport);
        match wake_latency(&side.sandboxed, &manifest_path, starts) {
            Ok(wake) => line(
                &format!("call waking an idle worker{t}"),
                &wake,
                cold_on,
                match SANDBOX {
                    true => "(vs cold start, sandbox on)",
                    false => "(vs cold start, sandbox off)",
                },
            ),
            Err(e) => eprintln!("error: idle wake-up{t}: {e}"),
        }
    }
    warm.set(false);
    ExitCode::SUCCESS
}

/// Prints the CPU used over `window` by each side's idle worker (the worker process and
/// all its descendants: the sandbox makes the plugin's process a grandchild) and by this
/// process, as a share of one CPU.
#[cfg(target_os = "linux")]
fn idle_cpu(sides: &[Side], window: Duration) {
    let tps = cpu::ticks_per_second();
    // Let the last call's aftermath (spinning readers, threads going back to sleep) end.
    std::thread::sleep(Duration::from_millis(500));
    let workers: Vec<(Transport, Option<u32>)> = sides
        .iter()
        .map(|s| {
            let status = s.isolated.status();
            (
                s.transport,
                status.instances.first().and_then(|i| i.pid).or(status.pid),
            )
        })
        .collect();
    let before: Vec<_> = workers
        .iter()
        .map(|(_, pid)| pid.map(cpu::tree).unwrap_or_default())
        .collect();
    let host_before = cpu::this_process();
    let started = Instant::now();
    std::thread::sleep(window);
    let host_after = cpu::this_process();
    let after: Vec<_> = workers
        .iter()
        .map(|(_, pid)| pid.map(cpu::tree).unwrap_or_default())
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let percent = |ticks: u64| ticks as f64 / tps / seconds * 100.0;
    for (((transport, pid), before), after) in workers.iter().zip(&before).zip(&after) {
        let name = format!("idle worker{}", tag(*transport));
        let Some(pid) = pid else {
            println!("{name:<W$} no worker process running");
            continue;
        };
        let (ticks, ended) = cpu::used(before, after);
        let p = percent(ticks);
        println!(
            "{name:<W$} {p:>9.2}% of one CPU  ({} processes from pid {pid}{})  {}",
            after.len(),
            match ended {
                0 => String::new(),
                n => format!("; {n} ended in the window, not counted"),
            },
            target("< 1%", p < 1.0)
        );
    }
    let p = percent(host_after.saturating_sub(host_before));
    println!(
        "{:<W$} {p:>9.2}% of one CPU  (this process, all threads)  {}",
        "idle host process",
        target("< 1%", p < 1.0)
    );
    println!(
        "  (utime + stime from /proc over {seconds:.1} s, starting 0.5 s after the last call, \
         no other plugin loaded; one clock tick is {:.2}% here)",
        100.0 / tps / seconds
    );
}

/// Prints the CPU used over `window` by each side's idle worker and by this process, as a
/// share of one CPU (Windows: user + kernel time from `GetProcessTimes`). Without a
/// sandbox the worker is one process: the plugin runs in it.
#[cfg(windows)]
fn idle_cpu(sides: &[Side], window: Duration) {
    if cpu::under_wine() {
        println!(
            "idle CPU: not measured under Wine (its GetProcessTimes gives a worker the same \
             time as this process: not the worker's own)"
        );
        return;
    }
    // Let the last call's aftermath (threads going back to sleep) end.
    std::thread::sleep(Duration::from_millis(500));
    // Each worker, opened before the window (so its pid cannot be reused meanwhile).
    let workers: Vec<(Transport, Option<u32>, Option<cpu::Process>)> = sides
        .iter()
        .map(|s| {
            let status = s.isolated.status();
            let pid = status.instances.first().and_then(|i| i.pid).or(status.pid);
            (s.transport, pid, pid.and_then(cpu::Process::open))
        })
        .collect();
    let before: Vec<Option<Duration>> = workers
        .iter()
        .map(|(_, _, p)| p.as_ref().and_then(cpu::Process::time))
        .collect();
    let host_before = cpu::this_process();
    let started = Instant::now();
    std::thread::sleep(window);
    let host_after = cpu::this_process();
    let after: Vec<Option<Duration>> = workers
        .iter()
        .map(|(_, _, p)| p.as_ref().and_then(cpu::Process::time))
        .collect();
    let seconds = started.elapsed().as_secs_f64();
    let percent = |used: Duration| used.as_secs_f64() / seconds * 100.0;
    for (((transport, pid), before), after) in workers
        .iter()
        .map(|(t, pid, _)| (t, pid))
        .zip(&before)
        .zip(&after)
    {
        let name = format!("idle worker{}", tag(*transport));
        let Some(pid) = pid else {
            println!("{name:<W$} no worker process running");
            continue;
        };
        let (Some(before), Some(after)) = (before, after) else {
            println!("{name:<W$} unknown  (cannot read the CPU times of pid {pid})");
            continue;
        };
        let p = percent(after.saturating_sub(*before));
        println!(
            "{name:<W$} {p:>9.2}% of one CPU  (1 process, pid {pid})  {}",
            target("< 1%", p < 1.0)
        );
    }
    match (host_before, host_after) {
        (Some(before), Some(after)) => {
            let p = percent(after.saturating_sub(before));
            println!(
                "{:<W$} {p:>9.2}% of one CPU  (this process, all threads)  {}",
                "idle host process",
                target("< 1%", p < 1.0)
            );
        }
        _ => println!(
            "{:<W$} unknown  (cannot read this process's CPU times)",
            "idle host process"
        ),
    }
    println!(
        "  (user + kernel time from GetProcessTimes over {seconds:.1} s, starting 0.5 s after \
         the last call, no other plugin loaded)"
    );
}

/// CPU time from `GetProcessTimes` (Windows): a process's user + kernel time.
#[cfg(windows)]
mod cpu {
    use std::time::Duration;

    use windows_sys::Win32::Foundation::{CloseHandle, FILETIME, HANDLE};
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
    use windows_sys::Win32::System::Threading::{
        GetCurrentProcess, GetProcessTimes, OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION,
    };

    /// A process opened to read its times; closed on drop.
    pub struct Process(HANDLE);

    impl Process {
        /// Opens process `pid`, if it is there and may be queried.
        pub fn open(pid: u32) -> Option<Process> {
            // SAFETY: OpenProcess takes no pointers; a null handle is failure.
            let handle = unsafe { OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid) };
            (!handle.is_null()).then_some(Process(handle))
        }

        /// The user + kernel time it has used (all its threads).
        pub fn time(&self) -> Option<Duration> {
            times(self.0)
        }
    }

    impl Drop for Process {
        fn drop(&mut self) {
            // SAFETY: the handle is ours, open since `open`, and closed only here.
            unsafe { CloseHandle(self.0) };
        }
    }

    /// Whether this runs under Wine (its ntdll exports `wine_get_version`).
    pub fn under_wine() -> bool {
        let ntdll: Vec<u16> = "ntdll.dll".encode_utf16().chain([0]).collect();
        // SAFETY: a NUL-terminated UTF-16 name that outlives the call; the module is not
        // freed (ntdll stays loaded), and the handle is not closed (it needs no closing).
        let module = unsafe { GetModuleHandleW(ntdll.as_ptr()) };
        // SAFETY: a module handle from GetModuleHandleW and a NUL-terminated name; the
        // address found is not called.
        !module.is_null()
            && unsafe { GetProcAddress(module, c"wine_get_version".as_ptr().cast()) }.is_some()
    }

    /// The user + kernel time this process has used (all its threads).
    pub fn this_process() -> Option<Duration> {
        // SAFETY: GetCurrentProcess returns a pseudo-handle; it needs no closing.
        times(unsafe { GetCurrentProcess() })
    }

    fn times(handle: HANDLE) -> Option<Duration> {
        let zero = FILETIME {
            dwLowDateTime: 0,
            dwHighDateTime: 0,
        };
        let (mut created, mut exited, mut kernel, mut user) = (zero, zero, zero, zero);
        // SAFETY: `handle` is a process handle with query rights; the four pointers are
        // to FILETIMEs that live through the call.
        let ok =
            unsafe { GetProcessTimes(handle, &mut created, &mut exited, &mut kernel, &mut user) };
        // FILETIMEs count 100 ns units.
        let units = |t: FILETIME| (u64::from(t.dwHighDateTime) << 32) | u64::from(t.dwLowDateTime);
        (ok != 0).then(|| Duration::from_nanos((units(kernel) + units(user)) * 100))
    }
}

/// The shared-memory ping-pong baseline (Linux): the transport's mechanism alone, with no
/// protocol and no MessagePack. A child process maps a region made by
/// [`Region::create`](shm::Region::create) and echoes length-prefixed messages through the
/// request and reply rings, with the transport's wait strategy on both sides: spin for
/// [`SPIN`] ([`Region::spin_until`](shm::Region::spin_until), which stops spinning
/// while both sides share a CPU), then sleep on a socket until the other side's doorbell
/// byte; the host side announces its sleep in `host_sleep`, the child in `worker_state`
/// (`SLEEPING`/`READING`), as the host's connection and the worker do.
#[cfg(target_os = "linux")]
mod pingpong {
    use std::io::{self, Read};
    use std::os::fd::{AsFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::process::{Child, Command, ExitCode, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use plugin_host::protocol::shm::{self, ring_doorbell, Region, Ring, RingReader, RingWriter};

    use super::{raw_frame, stats, Stats};

    /// How long either side spins before it sleeps: the transport's `HOST_SPIN` and
    /// `WORKER_SPIN`.
    const SPIN: Duration = Duration::from_micros(50);

    /// The child (the worker's side): maps the region passed as its stdin, takes the
    /// doorbell socket passed as its stdout, and echoes every message until the socket
    /// ends.
    pub fn echo_server() -> ExitCode {
        let Ok(fd) = io::stdin().as_fd().try_clone_to_owned() else {
            return ExitCode::from(2);
        };
        let region = match Region::open(&fd) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("bench-shm-echo-server: {e}");
                return ExitCode::from(2);
            }
        };
        let Ok(bell) = io::stdout().as_fd().try_clone_to_owned() else {
            return ExitCode::from(2);
        };
        let bell = UnixStream::from(bell);
        let mut rx = region.reader(Ring::Request);
        let mut tx = region.writer(Ring::Reply);
        // The length prefix and the body in one buffer, so each reply is one ring write.
        // It only grows: no clearing of a megabyte per message.
        let mut buf = vec![0u8; 4];
        loop {
            if recv(&mut rx, &region, &bell, &mut buf[..4]).is_err() {
                return ExitCode::SUCCESS;
            }
            let n = 4 + u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
            if buf.len() < n {
                buf.resize(n, 0);
            }
            if recv(&mut rx, &region, &bell, &mut buf[4..n]).is_err()
                || send(&mut tx, &region, &bell, &buf[..n]).is_err()
            {
                return ExitCode::SUCCESS;
            }
        }
    }

    /// The worker's read (`ShmInput`): read what is there; else spin; else say SLEEPING,
    /// look once more, and sleep on the socket until a doorbell.
    fn recv(
        rx: &mut RingReader,
        region: &Region,
        bell: &UnixStream,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match rx.read(&mut buf[got..]) {
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if region.spin_until(shm::Side::Worker, SPIN, || rx.has_data()) {
                continue;
            }
            if region.worker_may_sleep(|| rx.has_data()) {
                let mut bells = [0u8; 64];
                match (&*bell).read(&mut bells) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                region.worker_reading();
            }
        }
        Ok(())
    }

    /// The worker's write (`ShmOutput`): publish, then ring the doorbell if the host said
    /// it sleeps; on a full ring yield for a while, then sleep in growing steps.
    fn send(
        tx: &mut RingWriter,
        region: &Region,
        bell: &UnixStream,
        data: &[u8],
    ) -> io::Result<()> {
        let wake_host = || {
            if region.host_needs_doorbell() {
                ring_doorbell(bell);
            }
        };
        let mut sent = 0;
        let mut backoff = Duration::from_micros(20);
        while sent < data.len() {
            match tx.try_write(&[&data[sent..]]) {
                Ok(n) => {
                    sent += n;
                    wake_host();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wake_host();
                    let full =
                        |tx: &mut RingWriter| tx.unread().is_ok_and(|n| n == region.capacity());
                    let start = Instant::now();
                    while full(tx) && start.elapsed() < SPIN {
                        std::thread::yield_now();
                    }
                    if full(tx) {
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(1));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The parent (the host's side) of one ping-pong.
    struct Peer {
        child: Child,
        region: Arc<Region>,
        tx: RingWriter,
        rx: RingReader,
        bell: UnixStream,
    }

    impl Drop for Peer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn spawn() -> io::Result<Peer> {
        let (region, fd) = Region::create(shm::DEFAULT_CAPACITY)?;
        let (bell, theirs) = UnixStream::pair()?;
        let child = Command::new(std::env::current_exe()?)
            .arg("bench-shm-echo-server")
            .stdin(Stdio::from(fd))
            .stdout(Stdio::from(OwnedFd::from(theirs)))
            .spawn()?;
        Ok(Peer {
            child,
            tx: region.writer(Ring::Request),
            rx: region.reader(Ring::Reply),
            region,
            bell,
        })
    }

    /// How the host side sleeps once it stops spinning: a blocking read of the socket, or
    /// the async-io reactor's readiness wait (what the host's connection does).
    enum Bell<'a> {
        Blocking(&'a UnixStream),
        Reactor(&'a smol::Async<UnixStream>),
    }

    impl Bell<'_> {
        /// Sleeps until a doorbell byte (or the end); drains what is there. `Ok(0)`: the
        /// child is gone.
        async fn wait(&self) -> io::Result<usize> {
            let mut bells = [0u8; 64];
            let read = match self {
                Bell::Blocking(s) => (&**s).read(&mut bells),
                Bell::Reactor(s) => {
                    s.readable().await?;
                    s.get_ref().read(&mut bells)
                }
            };
            match read {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    Ok(1)
                }
                other => other,
            }
        }
    }

    /// The host's write (`write_some` + `kick_worker`): publish, then if the child sleeps,
    /// move it to READING and ring the doorbell.
    fn host_send(peer: &mut Peer, data: &[u8]) -> io::Result<()> {
        let kick = |region: &Region, bell: &UnixStream| {
            if region.worker_needs_doorbell() {
                ring_doorbell(bell);
            }
        };
        let mut sent = 0;
        let mut backoff = Duration::from_micros(20);
        while sent < data.len() {
            match peer.tx.try_write(&[&data[sent..]]) {
                Ok(n) => {
                    sent += n;
                    kick(&peer.region, &peer.bell);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    kick(&peer.region, &peer.bell);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(1));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The host's read (`poll_wait` + `fill`): read what is there; else spin; else set
    /// `host_sleep`, look once more, and sleep until a doorbell.
    async fn host_recv(
        rx: &mut RingReader,
        region: &Region,
        bell: &Bell<'_>,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let mut got = 0;
        while got < buf.len() {
            match rx.read(&mut buf[got..]) {
                Ok(n) => {
                    got += n;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if region.spin_until(shm::Side::Host, SPIN, || rx.has_data()) {
                continue;
            }
            if !region.host_may_sleep(|| rx.has_data()) {
                continue;
            }
            if bell.wait().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    async fn round_trip(
        peer: &mut Peer,
        bell: &Bell<'_>,
        frame: &[u8],
        reply: &mut Vec<u8>,
    ) -> io::Result<()> {
        host_send(peer, frame)?;
        let mut len = [0u8; 4];
        host_recv(&mut peer.rx, &peer.region, bell, &mut len).await?;
        reply.resize(u32::from_le_bytes(len) as usize, 0);
        host_recv(&mut peer.rx, &peer.region, bell, reply).await
    }

    /// One pair's round trip of `size` bytes: a warm-up (until the rings wrapped once, so
    /// every page of both is mapped on both sides and no sample pays its first touch; at
    /// most 200 ms beyond the usual tenth), then `iterations` samples.
    async fn measure(
        peer: &mut Peer,
        bell: &Bell<'_>,
        size: usize,
        iterations: usize,
    ) -> io::Result<Stats> {
        let frame = raw_frame(size);
        let mut reply = Vec::new();
        let started = Instant::now();
        let mut warm = 0;
        while warm < iterations / 10 + 1
            || (warm * frame.len() < peer.region.capacity()
                && started.elapsed() < Duration::from_millis(200))
        {
            round_trip(peer, bell, &frame, &mut reply).await?;
            warm += 1;
        }
        let mut samples = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            round_trip(peer, bell, &frame, &mut reply).await?;
            samples.push(t.elapsed());
        }
        debug_assert_eq!(reply.len(), size);
        Ok(stats(samples))
    }

    /// The ping-pong round trip of `size` bytes on one fresh pair of processes, measured
    /// twice: sleeping in a blocking read and in the async-io reactor; the faster is the
    /// pair's figure (as for the socket).
    pub fn latency(size: usize, iterations: usize) -> io::Result<Stats> {
        let mut peer = spawn()?;
        let bell = peer.bell.try_clone()?;
        let blocking =
            smol::block_on(measure(&mut peer, &Bell::Blocking(&bell), size, iterations))?;
        let bell = smol::Async::new(bell)?;
        let reactor = smol::block_on(measure(&mut peer, &Bell::Reactor(&bell), size, iterations))?;
        Ok(if reactor.median < blocking.median {
            reactor
        } else {
            blocking
        })
    }
}

/// CPU time from `/proc` (Linux): a process's user + system time, and a process tree's.
#[cfg(target_os = "linux")]
mod cpu {
    use std::collections::HashMap;

    /// Clock ticks per second: the unit of `utime` and `stime` in `/proc/<pid>/stat`.
    pub fn ticks_per_second() -> f64 {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if n > 0 {
            n as f64
        } else {
            100.0
        }
    }

    /// `(ppid, utime + stime)` of process `pid`, in clock ticks (all its threads).
    fn stat(pid: &str) -> Option<(u32, u64)> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) is in parentheses and may hold anything: count the
        // fields after its last `)`, which starts at field 3 (state).
        let rest = text.get(text.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ppid = fields.get(1)?.parse().ok()?;
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        Some((ppid, utime + stime))
    }

    /// The clock ticks each process has used, by pid: `root` and all its descendants.
    pub fn tree(root: u32) -> HashMap<u32, u64> {
        let mut all = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Ok(pid) = name.parse::<u32>() else {
                    continue;
                };
                if let Some((ppid, ticks)) = stat(name) {
                    all.push((pid, ppid, ticks));
                }
            }
        }
        let mut found: HashMap<u32, u64> = HashMap::new();
        let mut frontier = vec![root];
        if let Some(&(_, _, ticks)) = all.iter().find(|(pid, _, _)| *pid == root) {
            found.insert(root, ticks);
        } else {
            return found;
        }
        while let Some(parent) = frontier.pop() {
            for &(pid, ppid, ticks) in &all {
                if ppid == parent && found.insert(pid, ticks).is_none() {
                    frontier.push(pid);
                }
            }
        }
        found
    }

    /// Ticks this process has used.
    pub fn this_process() -> u64 {
        stat("self").map_or(0, |(_, ticks)| ticks)
    }

    /// Ticks used between two snapshots of a tree: by the processes alive at the end
    /// (all of it for one born in between). Returns the ticks and how many processes
    /// ended in between (their time is not counted).
    pub fn used(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> (u64, usize) {
        let ticks = after
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
            .sum();
        let ended = before.keys().filter(|pid| !after.contains_key(pid)).count();
        (ticks, ended)
    }
}

/// The child side of the shared-memory ping-pong baseline (`bench-shm-echo-server`).
#[cfg(target_os = "linux")]
pub fn shm_echo_server() -> ExitCode {
    pingpong::echo_server()
}
