//! `plugin-host bench`: measures an isolated plugin against raw baselines measured in the
//! same run, and prints median, p99 and the ratio for each figure.
//!
//! Baselines: a raw Unix-socket echo in a child process (length-prefixed frames of the same
//! sizes, one in flight and 64 in flight), and a bare spawn-and-connect for cold start.
//! Host functions and streams (the `callbacks` plugin) are measured against the plugin's
//! own calls: a host call made by the plugin against a plain call to the same plugin, and
//! stream items/s against calls/s with 64 in flight.
//!
//! The bench sets its own policies, whatever `--grant` says: the isolated figures are for
//! the default, an untrusted worker with the sandbox required (deny-all); cold start is
//! also measured with the sandbox off (a policy granting `SandboxMode::Off`) to show what
//! the sandbox costs; the in-process figure needs a policy granting trust.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use interprocess::local_socket::{
    prelude::*, GenericNamespaced, Listener, ListenerOptions, Stream,
};
use plugin_host::{
    CallOptions, Grant, Host, HostBuilder, HostCallContext, HostError, Manifest, Plugin,
    PluginEvent, SandboxMode, Trust,
};
use serde::Serialize;

/// Settings for one run.
pub struct Settings {
    pub plugins: PathBuf,
    pub quick: bool,
    pub warm: bool,
}

struct Stats {
    median: Duration,
    p99: Duration,
}

fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        median: at(0.5),
        p99: at(0.99),
    }
}

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
pub fn echo_server(socket: &str) -> ExitCode {
    let Ok(name) = socket.to_ns_name::<GenericNamespaced>() else {
        return ExitCode::from(2);
    };
    let Ok(stream) = Stream::connect(name) else {
        return ExitCode::from(1);
    };
    let mut stream = &stream;
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

struct RawPeer {
    child: Child,
    stream: UnixStream,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listen() -> std::io::Result<(String, UnixListener)> {
    let name = format!(
        "plugin-host-bench-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    );
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

/// Spawns the echo child and accepts its connection: the bare spawn-and-connect.
fn spawn_raw_peer() -> std::io::Result<RawPeer> {
    let (name, listener) = listen()?;
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg("bench-echo-server")
        .arg(&name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let (stream, _) = listener.accept()?;
    Ok(RawPeer { child, stream })
}

/// One request/reply. `frame` is the length prefix and payload in one buffer (one write).
fn raw_round_trip(stream: &mut UnixStream, frame: &[u8], reply: &mut Vec<u8>) {
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
/// flatters us because of how the baseline waits.
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
    let stream = smol::Async::new(peer.stream.try_clone().unwrap()).unwrap();
    let reactor = smol::block_on(async {
        use futures_lite::{AsyncReadExt, AsyncWriteExt};
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..iterations + iterations / 10 {
            let t = Instant::now();
            (&stream).write_all(&payload).await.unwrap();
            let mut len = [0u8; 4];
            (&stream).read_exact(&mut len).await.unwrap();
            reply.resize(u32::from_le_bytes(len) as usize, 0);
            (&stream).read_exact(&mut reply).await.unwrap();
            if i >= iterations / 10 {
                samples.push(t.elapsed());
            }
        }
        stats(samples)
    });
    if reactor.median < blocking.median {
        reactor
    } else {
        blocking
    }
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

fn line(name: &str, s: &Stats, base: &Stats, target: &str) {
    let ratio = s.median.as_secs_f64() / base.median.as_secs_f64();
    println!(
        "{name:<34} median {:>10}  p99 {:>10}  ratio {ratio:>5.2}x  {target}",
        fmt(s.median),
        fmt(s.p99)
    );
}

fn baseline(name: &str, s: &Stats) {
    println!(
        "{name:<34} median {:>10}  p99 {:>10}  (baseline)",
        fmt(s.median),
        fmt(s.p99)
    );
}

pub fn run(settings: &Settings, host: &Host) -> ExitCode {
    let backtrace = std::env::var("RUST_BACKTRACE").unwrap_or_default();
    // Errors are not on the measured path, but measure without backtrace capture anyway:
    // the variable is removed before any thread or worker starts.
    // SAFETY (of the environment change): no other thread exists yet in this process.
    std::env::remove_var("RUST_BACKTRACE");
    let spinning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(settings.warm));
    if settings.warm {
        // Keeps one CPU from going idle, so wake-ups cost what they cost on a busy machine
        // rather than a virtual CPU's exit from idle.
        let spinning = spinning.clone();
        std::thread::spawn(move || {
            while spinning.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
    }
    let (n_small, n_big, total) = if settings.quick {
        (200, 10, 2_000)
    } else {
        (5_000, 200, 100_000)
    };
    println!(
        "plugin-host bench: {} CPUs, RUST_BACKTRACE={:?} in the environment (removed for the run)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        backtrace
    );
    println!(
        "one call in flight unless stated; ratios are against baselines measured in this run\n"
    );

    let manifest_path = settings.plugins.join("hello/plugin.toml");
    let callbacks_path = settings.plugins.join("callbacks/plugin.toml");
    // The CLI's search paths, with a policy of the bench's own, and the trivial host
    // function `echo` the host-call figures use.
    let with_policy = |policy: fn(HostBuilder) -> HostBuilder| -> Host {
        let builder = host
            .search_paths()
            .iter()
            .fold(Host::builder(), |b, dir| b.search_path(dir))
            .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
                Ok::<_, HostError>(input)
            });
        policy(builder).build().expect("build a host")
    };
    // Deny-all: untrusted, sandbox required (the library's default policy).
    let sandboxed = with_policy(|b| b.permissions(|_| Grant::deny_all()));
    // Untrusted, sandbox off: the worker without the sandbox, for comparison only.
    let unsandboxed = with_policy(|b| {
        b.permissions(|_| Grant {
            sandbox: SandboxMode::Off,
            ..Grant::deny_all()
        })
    });
    // The in-process measurement: hello is our own example plugin, and the bench asks for
    // trust below, so granting what is requested is right here.
    let trusting = with_policy(HostBuilder::grant_requested);
    let load = |host: &Host, trust: Trust| -> Result<Plugin, plugin_host::Error> {
        let mut m = Manifest::from_file(&manifest_path)?;
        m.trust = trust;
        smol::block_on(host.load_manifest(m))
    };
    let isolated = match load(&sandboxed, Trust::Untrusted) {
        Ok(p) => p,
        Err(e) => {
            crate::report::print(&e, Some(&manifest_path));
            return ExitCode::from(4);
        }
    };
    let isolated_off = match load(&unsandboxed, Trust::Untrusted) {
        Ok(p) => p,
        Err(e) => {
            crate::report::print(&e, Some(&manifest_path));
            return ExitCode::from(4);
        }
    };
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
    println!("isolated worker, sandbox on: layers {}", layers(&isolated));
    println!(
        "isolated worker, sandbox off (for comparison only; never for untrusted plugins): layers {}\n",
        layers(&isolated_off)
    );

    for (size, iterations, target) in [
        (16, n_small, "target <= 1.5x"),
        (4096, n_small, ""),
        (1 << 20, n_big, "target <= 2x"),
    ] {
        let raw = raw_latency(size, iterations);
        let ours = plugin_latency(&isolated, size, iterations);
        baseline(&format!("raw socket echo {}", size_name(size)), &raw);
        line(
            &format!("isolated call {}", size_name(size)),
            &ours,
            &raw,
            target,
        );
        if size == 16 {
            let off = plugin_latency(&isolated_off, size, iterations);
            line("isolated call 16 B, sandbox off", &off, &raw, "");
            let inproc = plugin_latency(&in_process, size, iterations);
            line("in-process call 16 B (vs raw)", &inproc, &raw, "");
        }
    }
    smol::block_on(isolated_off.shutdown());
    smol::block_on(in_process.shutdown());

    // Host functions and streams: `callbacks`, isolated (sandboxed) and in-process. Of its
    // imports only `echo` is provided (the others would each be warned about).
    let load_callbacks = |host: &Host, trust: Trust| -> Result<Plugin, plugin_host::Error> {
        let mut m = Manifest::from_file(&callbacks_path)?;
        m.trust = trust;
        m.imports = vec!["echo".into()];
        smol::block_on(host.load_manifest(m))
    };
    let callbacks = [
        load_callbacks(&sandboxed, Trust::Untrusted),
        load_callbacks(&trusting, Trust::Trusted),
    ];
    let (per_batch, batches) = if settings.quick { (20, 20) } else { (100, 200) };
    println!();
    for (plugin, place) in callbacks.iter().zip(["isolated", "in-process"]) {
        let plugin = match plugin {
            Ok(p) => p,
            Err(e) => {
                crate::report::print(e, Some(&callbacks_path));
                return ExitCode::from(4);
            }
        };
        match host_call_latency(plugin, batches, per_batch) {
            Ok((plain, hosted)) => {
                baseline(&format!("{place} call 16 B (callbacks)"), &plain);
                line(
                    &format!("host call from {place} plugin"),
                    &hosted,
                    &plain,
                    match place {
                        "isolated" => "target <= 1.2x",
                        _ => "",
                    },
                );
            }
            Err(e) => eprintln!("error: host calls from the {place} plugin: {e}"),
        }
    }
    println!(
        "  (per call: the mean of a batch of {per_batch} calls; median and p99 over {batches} \
         batches of each, alternating; host calls timed in the plugin)\n"
    );

    let depth = 64;
    let raw_rate = raw_pipelined(depth, total);
    let our_rate = plugin_pipelined(&isolated, depth, total);
    println!(
        "{:<34} {:>10.0} calls/s  (baseline)",
        format!("raw socket, {depth} in flight"),
        raw_rate
    );
    println!(
        "{:<34} {:>10.0} calls/s  ratio {:>5.2}x  target >= 0.5x",
        format!("isolated, {depth} in flight"),
        our_rate,
        our_rate / raw_rate
    );
    // The same load over a pool of two workers (a distinct name: names are unique).
    let pool = {
        let mut m = Manifest::from_file(&manifest_path).expect("the hello manifest");
        m.name = "hello-pool".into();
        m.trust = Trust::Untrusted;
        m.instances = Some(2);
        smol::block_on(sandboxed.load_manifest(m))
    };
    match pool {
        Ok(pool) => {
            let pool_rate = plugin_pipelined(&pool, depth, total);
            println!(
                "{:<34} {:>10.0} calls/s  ratio {:>5.2}x  (vs 1 instance; each worker runs {} calls at once)",
                format!("pool of 2, {depth} in flight"),
                pool_rate,
                pool_rate / our_rate,
                pool.manifest().limits.concurrency
            );
            smol::block_on(pool.shutdown());
        }
        Err(e) => eprintln!("error: pool of 2: {e}"),
    }
    // Stream throughput, against the 64-in-flight rate above: both move small messages
    // one way as fast as the plugin makes them.
    let items = total as u64;
    for (plugin, place) in callbacks.iter().zip(["isolated", "in-process"]) {
        let Ok(plugin) = plugin else { continue };
        match stream_rate(plugin, items, 16) {
            Ok(rate) => println!(
                "{:<34} {:>10.0} items/s  ratio {:>5.2}x  (vs isolated calls, {depth} in flight; {items} items)",
                format!("stream of 16 B items, {place}"),
                rate,
                rate / our_rate
            ),
            Err(e) => eprintln!("error: stream from the {place} plugin: {e}"),
        }
    }
    for plugin in callbacks.into_iter().flatten() {
        smol::block_on(plugin.shutdown());
    }
    smol::block_on(isolated.shutdown());

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
    // Interleaved, so a drift in the machine's speed affects both alike.
    let mut off_samples = Vec::with_capacity(starts);
    let mut on_samples = Vec::with_capacity(starts);
    let mut on_layers = Vec::new();
    let mut off_layers = Vec::new();
    for _ in 0..starts {
        let (d, l) = cold_start(&unsandboxed);
        off_samples.push(d);
        off_layers = l;
        let (d, l) = cold_start(&sandboxed);
        on_samples.push(d);
        on_layers = l;
    }
    let cold_off = stats(off_samples);
    let cold_on = stats(on_samples);
    baseline("bare spawn + connect + echo", &bare);
    line(
        "cold start, sandbox off",
        &cold_off,
        &bare,
        "(spawn..first reply)",
    );
    line("cold start, sandbox on", &cold_on, &bare, "target <= 2x");
    let cost_us = (cold_on.median.as_secs_f64() - cold_off.median.as_secs_f64()) * 1e6;
    println!(
        "{:<34} {:>+10.0} us on the median  ratio {:>5.2}x  (sandbox on vs off)",
        "sandbox cost at cold start",
        cost_us,
        cold_on.median.as_secs_f64() / cold_off.median.as_secs_f64()
    );
    println!(
        "cold-start worker layers: sandbox on: {}; sandbox off: {}",
        match on_layers.is_empty() {
            true => "none".to_string(),
            false => on_layers.join(", "),
        },
        match off_layers.is_empty() {
            true => "none".to_string(),
            false => off_layers.join(", "),
        }
    );
    // A call that finds its worker reclaimed for being idle starts it again: the cost, next
    // to a cold start (load + first call) measured above.
    match wake_latency(&sandboxed, &manifest_path, starts) {
        Ok(wake) => line(
            "call waking an idle worker",
            &wake,
            &cold_on,
            "(vs cold start, sandbox on)",
        ),
        Err(e) => eprintln!("error: idle wake-up: {e}"),
    }
    spinning.store(false, std::sync::atomic::Ordering::Relaxed);
    ExitCode::SUCCESS
}
