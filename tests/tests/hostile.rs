//! A hostile fake worker (`tests/src/bin/hostile-worker.rs`, started as the worker-shim)
//! completes the handshake, then sends hostile input: random bytes, a length prefix of
//! `0xFFFFFFFF`, random bytes behind a valid length, unknown kinds, a reply for an id never
//! sent, duplicate replies, 100,000 levels of nested MessagePack, a frame that claims 16 MiB
//! and stalls (in its header, or in its payload after a whole header), a 1-byte-per-100 ms
//! trickle, a 16 MiB header, a `loaded` with 8 million method names.
//!
//! For each: the host lives (a well-behaved worker on the same host serves a call
//! afterwards), the call gets a protocol error (`Crashed` with `protocol_error` set) or a
//! `Timeout` within its 1 s deadline (or its correct answer where the input is legal),
//! nothing leaks (no child process, descriptors back to their count), and the host's peak
//! memory (VmHWM, reset through `/proc/self/clear_refs` before each case) grows by less
//! than [`MEMORY_BUDGET`]. The cases run one at a time: they measure the whole process.
//!
//! Host calls and output streams (protocol 0.2.1): the worker sends `item`s past the window
//! the host granted (by count and by bytes), for a call that is not a stream, for an id
//! never sent; floods `host_call`s (300 at once; for 5 s; 200,000 without reading the
//! answers); repeats an outstanding (id, seq); calls the host for a call that is not
//! running or already over; sends a 5,000-byte function name; sends the host -> worker
//! kinds `credit` and `host_reply`. Each asserts the exact outcome (a protocol violation
//! that names the broken rule, or the answer the host must give), that the same plugin
//! then serves a call (from a restarted worker when this one was cut off), and that
//! nothing panicked in the process (a panic hook counts). A flood of unknown frames for
//! 5 s checks the deadline on its own.
//!
//! Shared memory (on a host that forces it; the `shm_*` workers map the region and check
//! that they use it): the worker sets the reply ring's write position to `u64::MAX`, to a
//! ring and a byte past the host's read position, one byte back; scribbles over both rings
//! and publishes 4 KiB of it; writes a length prefix of `0xFFFFFFFF`, a reply for an id
//! never sent, two replies for one call into the ring; moves the request ring's read
//! position past the host's write position or back, or the host's own write position
//! (found at the host's next write); fills the control words with garbage and the socket
//! with doorbells while answering correctly; stops reading the request ring (with a call
//! smaller, and one larger, than the ring). Each asserts the exact violation (or the
//! exact answers, or the deadline), and that the plugin serves the next call on shared
//! memory.
#![cfg(target_os = "linux")]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use plugin_host::{CallError, CallOptions, Error, Host, LoadError, Manifest, Plugin, Transport};

/// Host peak-memory growth allowed for any case (the largest frame sent is 16 MiB).
const MEMORY_BUDGET: u64 = 64 << 20;
/// The deadline of every call.
const DEADLINE: Duration = Duration::from_secs(1);
/// Time allowed past the deadline for the answer to arrive.
const SLACK: Duration = Duration::from_secs(2);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn hostile_worker() -> &'static str {
    env!("CARGO_BIN_EXE_hostile-worker")
}

fn manifest(mode: &str) -> Manifest {
    let text = format!(
        "name = \"hostile-{mode}\"\nversion = \"0.1.0\"\nlibrary = \"hello\"\napi = \"^1\"\n\
         imports = [\"echo\", \"hold\"]\n\
         [timeouts]\ncall = \"1s\"\nconnect = \"10s\"\ncancel_grace = \"200ms\"\n\
         [restart]\nbackoff = \"10ms\"\nbackoff_max = \"20ms\"\nmax_crashes = 100\n"
    );
    Manifest::parse(&text, "hostile.plugin.toml").unwrap()
}

fn status_field(name: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
}

/// CPU time this process used so far, in clock ticks (`utime + stime`).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses and may hold spaces).
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Waits (at most 20 s) until the process is idle: under 20 ms of CPU in 100 ms. Returns
/// how long that took.
fn wait_quiet() -> Duration {
    let started = Instant::now();
    let mut last = cpu_ticks();
    while started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        let now = cpu_ticks();
        if now - last <= 2 {
            break;
        }
        last = now;
    }
    started.elapsed()
}

/// What a call got, for the assertions.
#[derive(Debug)]
enum Outcome {
    Ok(Vec<u8>),
    ProtocolError(String),
    Timeout,
    /// Anything else (shown through `Debug`).
    #[allow(dead_code)]
    Other(String),
}

fn outcome(result: Result<Vec<u8>, Error>) -> Outcome {
    match result {
        Ok(out) => Outcome::Ok(out),
        Err(Error::Call(CallError::Crashed { report, .. })) => match &report.protocol_error {
            Some(p) => Outcome::ProtocolError(p.clone()),
            None => Outcome::Other(format!("Crashed without a protocol error: {report:?}")),
        },
        Err(Error::Call(CallError::Timeout { .. })) => Outcome::Timeout,
        Err(e) => Outcome::Other(e.to_string()),
    }
}

async fn call_method(plugin: &Plugin, method: &str, input: &[u8]) -> (Outcome, Duration) {
    let started = Instant::now();
    let result = plugin
        .call_raw_with(method, input.to_vec(), CallOptions::new().timeout(DEADLINE))
        .await;
    (outcome(result), started.elapsed())
}

async fn call(plugin: &Plugin, input: &[u8]) -> (Outcome, Duration) {
    call_method(plugin, "echo", input).await
}

/// A plain call of the hostile worker's `attack` method.
async fn attack(plugin: &Plugin) -> (Outcome, Duration) {
    call_method(plugin, "attack", b"input").await
}

/// A streaming call of `attack`: its items and how it ended. The consumer waits `pause`
/// after the first item before it polls again (so everything the worker wrote meanwhile
/// is read before the consumer takes anything more).
async fn attack_stream(plugin: &Plugin, pause: Duration) -> (Vec<Vec<u8>>, Outcome, Duration) {
    let started = Instant::now();
    let mut stream = plugin.call_stream_raw(
        "attack",
        b"input".to_vec(),
        CallOptions::new().timeout(DEADLINE),
    );
    let mut items = Vec::new();
    let end = loop {
        match stream.next().await {
            Some(Ok(item)) => {
                items.push(item);
                if items.len() == 1 && !pause.is_zero() {
                    smol::Timer::after(pause).await;
                }
            }
            Some(Err(e)) => {
                assert!(
                    stream.next().await.is_none(),
                    "items after the stream's error"
                );
                break outcome(Err(e));
            }
            None => break Outcome::Ok(stream.output_raw().unwrap_or_default().to_vec()),
        }
    };
    (items, end, started.elapsed())
}

/// Panics anywhere in this process (the host's threads included), counted by a hook.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// A host whose worker-shim is the hostile worker, with two host functions for the
/// plugins' `imports`: `echo` (returns its input) and `hold` (runs until its call ends).
fn hostile_host() -> Host {
    hostile_builder().build().unwrap()
}

/// [`hostile_host`] with frames in shared memory wherever the worker maps the region (the
/// `shm_*` modes do; the others stay on the socket), whatever `PLUGIN_HOST_TRANSPORT` says.
fn shm_host() -> Host {
    hostile_builder()
        .transport(Transport::SharedMemory)
        .build()
        .unwrap()
}

fn hostile_builder() -> plugin_host::HostBuilder {
    common::builder_with_shim(std::path::Path::new(hostile_worker()))
        .raw_function("echo", |_, input| async move { Ok(input) })
        .raw_function("hold", |ctx, _| async move {
            ctx.cancelled().await;
            Ok(Vec::new())
        })
}

/// Runs one case: `body` gets a host (a clone) whose worker-shim is the hostile worker and returns a
/// line for the report. Then checks the host lives, nothing leaked, memory stayed bounded.
fn case<F: std::future::Future<Output = String>>(name: &str, body: impl FnOnce(Host) -> F) {
    run_case(name, false, body)
}

/// [`case`] on a host that uses shared memory ([`shm_host`]); the well-behaved worker
/// checked afterwards (`shm_echo`) must use it too.
fn shm_case<F: std::future::Future<Output = String>>(name: &str, body: impl FnOnce(Host) -> F) {
    run_case(name, true, body)
}

fn run_case<F: std::future::Future<Output = String>>(
    name: &str,
    shm: bool,
    body: impl FnOnce(Host) -> F,
) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The first case in this process starts the async runtime's threads and descriptors
    // (they live on): start them before counting.
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        common::run(async {
            let host = hostile_host();
            let plugin = host.load_manifest(manifest("echo")).await.unwrap();
            let _ = call(&plugin, b"warm").await;
            plugin.shutdown().await;
        })
    });
    assert!(common::wait_until(Duration::from_secs(5), || {
        common::children().is_empty()
    }));
    // Work an earlier case left running in the background (the host's tasks) must not be
    // counted against this one.
    let quiet = wait_quiet();
    // Heap an earlier case freed but the allocator kept would hide this case's growth:
    // give it back first.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free memory to the system; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    let fds_before = common::open_fds();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let rss_before = status_field("VmRSS:");
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let report = common::run_with_limit(Duration::from_secs(60), async {
        let host = if shm { shm_host() } else { hostile_host() };
        let report = body(host.clone()).await;
        // The host lives: a well-behaved worker on the same host serves a call.
        let good = host
            .load_manifest(manifest(if shm { "shm_echo" } else { "echo" }))
            .await
            .unwrap_or_else(|e| panic!("{name}: the host cannot load a good worker after: {e}"));
        if shm {
            assert_shm(&good, name);
        }
        let (outcome, _) = call(&good, b"still here").await;
        assert!(
            matches!(&outcome, Outcome::Ok(out) if out == b"still here"),
            "{name}: the good worker after: {outcome:?}"
        );
        good.shutdown().await;
        report
    });
    let peak = status_field("VmHWM:");
    let growth = peak.saturating_sub(rss_before);
    let reaped = common::wait_until(Duration::from_secs(5), || common::children().is_empty());
    let fds_back = common::wait_until(Duration::from_secs(5), || common::open_fds() <= fds_before);
    println!(
        "hostile {name}: {report}; host peak memory +{:.1} MiB (quiet after {quiet:?})",
        growth as f64 / (1 << 20) as f64
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics_before,
        "{name}: something panicked in the host (see the output above)"
    );
    assert!(reaped, "{name}: children left: {:?}", common::children());
    assert!(
        fds_back,
        "{name}: {} descriptors open, {fds_before} before",
        common::open_fds()
    );
    assert!(
        growth < MEMORY_BUDGET,
        "{name}: the host's peak memory grew by {growth} bytes ({:.1} MiB; budget {} MiB)",
        growth as f64 / (1 << 20) as f64,
        MEMORY_BUDGET >> 20
    );
}

/// A case whose first call must fail with a protocol error or time out, in time.
fn error_or_timeout(mode: &str) {
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(outcome, Outcome::ProtocolError(_) | Outcome::Timeout),
            "{mode}: expected a protocol error or a timeout, got {outcome:?}"
        );
        assert!(took < DEADLINE + SLACK, "{mode}: answered after {took:?}");
        // The worker was cut off, or will be after `cancel_grace`: the next worker serves
        // (it misbehaves in turn on its first call, so only require an answer in time).
        let (second, took2) = call(&plugin, b"again").await;
        assert!(
            took2 < DEADLINE + SLACK,
            "{mode}: second call answered after {took2:?}: {second:?}"
        );
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}; then {second:?}")
    });
}

#[test]
fn random_bytes() {
    error_or_timeout("random");
}

#[test]
fn length_prefix_ffffffff() {
    case("ffff", |host| async move {
        let plugin = host.load_manifest(manifest("ffff")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(outcome, Outcome::ProtocolError(_)),
            "a length over the limit is refused at once: {outcome:?}"
        );
        assert!(took < DEADLINE, "{took:?}");
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

#[test]
fn unknown_kinds_and_fields_are_tolerated() {
    case("unknown_kinds", |host| async move {
        let plugin = host.load_manifest(manifest("unknown_kinds")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(&outcome, Outcome::Ok(out) if out == b"input"),
            "{outcome:?}"
        );
        let status = plugin.status();
        assert_eq!(status.crashes, 0, "{status:?}");
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

#[test]
fn reply_for_an_id_never_sent() {
    case("never_sent", |host| async move {
        let plugin = host.load_manifest(manifest("never_sent")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(&outcome, Outcome::ProtocolError(p) if p.contains("never sent")),
            "{outcome:?}"
        );
        assert!(took < DEADLINE, "{took:?}");
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

#[test]
fn duplicate_replies_are_a_protocol_violation() {
    case("duplicate", |host| async move {
        let plugin = host.load_manifest(manifest("duplicate")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        match &outcome {
            Outcome::Ok(out) => assert_eq!(
                out, b"first",
                "the caller got the duplicate reply, not the first"
            ),
            Outcome::ProtocolError(_) => {}
            other => panic!("expected the first reply or a protocol error, got {other:?}"),
        }
        // Either way the duplicate is a violation: the worker is cut off and the crash is
        // recorded with its protocol error.
        let mut crash = None;
        let noticed = common::wait_until(Duration::from_secs(3), || {
            crash = plugin.status().last_crash.clone();
            crash.is_some()
        });
        let status = plugin.status();
        plugin.shutdown().await;
        assert!(
            noticed,
            "a duplicate reply was accepted silently: call got {outcome:?}, status {status:?}"
        );
        let crash = crash.unwrap();
        assert!(
            crash.protocol_error.is_some(),
            "the crash names no protocol error: {crash:?}"
        );
        format!(
            "{outcome:?} after {took:?}; crash: {:?}",
            crash.protocol_error
        )
    });
}

#[test]
fn deeply_nested_header() {
    case("deep", |host| async move {
        let plugin = host.load_manifest(manifest("deep")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(outcome, Outcome::ProtocolError(_)),
            "100,000 levels of arrays are not a valid reply: {outcome:?}"
        );
        assert!(took < DEADLINE, "{took:?}");
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

#[test]
fn a_16_mib_frame_that_stalls() {
    error_or_timeout("stall16m");
}

#[test]
fn random_bytes_behind_a_valid_length() {
    case("random_frame", |host| async move {
        let plugin = host.load_manifest(manifest("random_frame")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(outcome, Outcome::ProtocolError(_)),
            "random header bytes are not a message: {outcome:?}"
        );
        assert!(took < DEADLINE, "{took:?}");
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

#[test]
fn a_16_mib_payload_that_stalls() {
    error_or_timeout("stall16m_payload");
}

#[test]
fn a_trickle_of_one_byte_per_100_ms() {
    error_or_timeout("trickle");
}

#[test]
fn a_16_mib_header() {
    case("header16m", |host| async move {
        let plugin = host.load_manifest(manifest("header16m")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(&outcome, Outcome::Ok(out) if out == b"input")
                || matches!(outcome, Outcome::ProtocolError(_)),
            "{outcome:?}"
        );
        assert!(took < DEADLINE + SLACK, "{took:?}");
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

#[test]
fn a_loaded_with_8_million_methods() {
    case("huge_methods", |host| async move {
        let started = Instant::now();
        let result = host.load_manifest(manifest("huge_methods")).await;
        let took = started.elapsed();
        let line = match &result {
            Ok(p) => format!("loaded with {} methods", p.methods().len()),
            Err(Error::Load(
                e @ (LoadError::Handshake { .. } | LoadError::CreateCrashed { .. }),
            )) => {
                format!("refused: {e}")
            }
            Err(e) => panic!("expected a handshake error: {e}"),
        };
        if let Ok(p) = result {
            p.shutdown().await;
        }
        assert!(took < Duration::from_secs(5), "{line}, after {took:?}");
        format!("{line} after {took:?}")
    });
}

#[test]
fn a_good_worker_is_cheap() {
    case("echo", |host| async move {
        let plugin = host.load_manifest(manifest("echo")).await.unwrap();
        let (outcome, took) = call(&plugin, b"input").await;
        assert!(
            matches!(&outcome, Outcome::Ok(o) if o == b"input"),
            "{outcome:?}"
        );
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}")
    });
}

// ---------------------------------------------------------------------------------------
// Host calls and output streams. The hostile worker misbehaves on `attack` and answers
// `echo` correctly, so the same plugin must serve `echo` afterwards.

/// The worker was cut off for a protocol violation mentioning every one of `needles`: the
/// crash is recorded with that violation, and the plugin (a restarted worker) serves the
/// next call.
async fn cut_off(plugin: &Plugin, mode: &str, outcome: &Outcome, needles: &[&str]) -> String {
    let Outcome::ProtocolError(violation) = outcome else {
        panic!("{mode}: expected a protocol violation, got {outcome:?}");
    };
    for needle in needles {
        assert!(
            violation.contains(needle),
            "{mode}: the violation does not mention `{needle}`: {violation}"
        );
    }
    // The supervisor records the crash as it reaps the worker, a moment after the call
    // failed.
    let recorded = common::wait_until(Duration::from_secs(3), || {
        plugin.status().last_crash.is_some()
    });
    let status = plugin.status();
    assert!(recorded, "{mode}: no crash recorded: {status:?}");
    let crash = status.last_crash.as_ref().unwrap();
    assert_eq!(
        crash.protocol_error.as_deref(),
        Some(violation.as_str()),
        "{mode}: the crash report"
    );
    assert_eq!(status.crashes, 1, "{mode}: {status:?}");
    let (next, took) = call(plugin, b"next").await;
    assert!(
        matches!(&next, Outcome::Ok(out) if out == b"next"),
        "{mode}: the call after the restart: {next:?} after {took:?}"
    );
    assert_eq!(plugin.status().restarts, 1, "{mode}: {:?}", plugin.status());
    violation.clone()
}

/// The worker was not cut off: no crash, and the same worker serves the next call.
async fn still_up(plugin: &Plugin, mode: &str) {
    let pid = plugin.status().pid;
    let (next, took) = call(plugin, b"next").await;
    assert!(
        matches!(&next, Outcome::Ok(out) if out == b"next"),
        "{mode}: the next call: {next:?} after {took:?}"
    );
    let status = plugin.status();
    assert_eq!(status.crashes, 0, "{mode}: {status:?}");
    assert_eq!(
        status.pid, pid,
        "{mode}: the worker was replaced: {status:?}"
    );
}

fn text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(out) => String::from_utf8_lossy(out).into_owned(),
        other => panic!("expected the call to succeed, got {other:?}"),
    }
}

#[test]
fn stream_items_past_the_item_window() {
    let mode = "items_past_window";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (items, end, took) = attack_stream(&plugin, Duration::ZERO).await;
        // 300 items in one write: the 256 the window allows reach the consumer, the 257th
        // is the violation.
        assert_eq!(
            items.len(),
            256,
            "{mode}: items delivered before the error: {end:?}"
        );
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item, &(i as u64).to_le_bytes(), "{mode}: item {i}");
        }
        assert!(took < DEADLINE, "{mode}: {took:?}");
        let violation = cut_off(
            &plugin,
            mode,
            &end,
            &[
                "past the window",
                "256 items, 2048 bytes outstanding",
                "window 256 items, 1048576 bytes",
            ],
        )
        .await;
        plugin.shutdown().await;
        format!("{} items, then {violation} after {took:?}", items.len())
    });
}

#[test]
fn stream_item_bytes_past_the_byte_window() {
    let mode = "item_bytes_past_window";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        // The worker sends 500 KiB, then 600 KiB without waiting for credit. The host
        // holds at most one window: if it reads the second before crediting the first,
        // that is past the 1 MiB window and the worker is cut off; if the consumer took
        // the first and the host credited it before the second was read (the socket holds
        // less than 1.1 MiB, so the worker may still be writing), the second fits. Both
        // are within the rules; which one happens depends on scheduling.
        let (items, end, took) = attack_stream(&plugin, Duration::from_millis(300)).await;
        assert!(!items.is_empty(), "{mode}: {end:?}");
        assert_eq!(items[0], vec![0xaa; 500 << 10], "{mode}: the first item");
        assert!(took < DEADLINE, "{mode}: {took:?}");
        let summary = match items.len() {
            1 => {
                cut_off(
                    &plugin,
                    mode,
                    &end,
                    &[
                        "past the window",
                        "1 items, 512000 bytes outstanding",
                        "window 256 items, 1048576 bytes",
                    ],
                )
                .await
            }
            _ => {
                assert_eq!(items.len(), 2, "{mode}: {end:?}");
                assert_eq!(items[1], vec![0xbb; 600 << 10], "{mode}: the second item");
                assert!(
                    matches!(&end, Outcome::Ok(out) if out == b"done"),
                    "{mode}: {end:?}"
                );
                still_up(&plugin, mode).await;
                "the first item was credited before the second was read".to_string()
            }
        };
        plugin.shutdown().await;
        format!("{} item(s), then {summary} after {took:?}", items.len())
    });
}

#[test]
fn stream_item_for_a_call_that_is_not_a_stream() {
    let mode = "item_not_stream";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = attack(&plugin).await;
        assert!(took < DEADLINE, "{mode}: {took:?}");
        let violation = cut_off(&plugin, mode, &outcome, &["not a streaming call"]).await;
        plugin.shutdown().await;
        format!("{violation} after {took:?}")
    });
}

#[test]
fn stream_item_for_a_call_never_sent() {
    let mode = "item_never_sent";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = attack(&plugin).await;
        assert!(took < DEADLINE, "{mode}: {took:?}");
        let violation = cut_off(&plugin, mode, &outcome, &["stream item", "not running"]).await;
        plugin.shutdown().await;
        format!("{violation} after {took:?}")
    });
}

#[test]
fn host_call_flood_is_answered_with_limit() {
    let mode = "host_call_flood";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = attack(&plugin).await;
        // 300 calls of `hold` (which runs until its call ends): 256 run, the other 44
        // are refused with LIMIT at once, none answered otherwise while the call runs.
        let summary = text(&outcome);
        assert!(
            summary.starts_with("limit=44 other=0: "),
            "{mode}: the worker saw: {summary}"
        );
        assert!(
            summary.contains("more than 256 host calls"),
            "{mode}: the LIMIT message: {summary}"
        );
        assert!(took < DEADLINE, "{mode}: {took:?}");
        still_up(&plugin, mode).await;
        plugin.shutdown().await;
        format!("{summary} after {took:?}")
    });
}

/// A call of `attack` that the worker never answers while it floods the host with frames:
/// the call must time out at its deadline, the worker be killed, and the plugin (a
/// restarted worker) serve the next call. The checks run after the case, so that its memory check
/// runs (and reports) first.
fn flood_then_timeout(mode: &'static str) {
    flood_then_timeout_or("", mode)
}

/// The host's message when a worker has too many host calls outstanding.
const HOST_CALL_CUTOFF: &str = "more than 512 host calls outstanding";

/// [`flood_then_timeout`], where the host may also cut the worker off earlier with a
/// protocol violation containing `violation` (when not empty).
fn flood_then_timeout_or(violation: &'static str, mode: &'static str) {
    let seen = std::sync::Arc::new(Mutex::new(None));
    let record = seen.clone();
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = attack(&plugin).await;
        // The host kills the worker `cancel_grace` after the deadline; a call sent before
        // that could reach it and die with it: wait for the kill.
        let killed = common::wait_until(Duration::from_secs(5), || plugin.status().crashes > 0);
        let (next, took2) = call(&plugin, b"next").await;
        let line = format!(
            "{outcome:?} after {took:?}; worker killed: {killed}; next call: {next:?} after {took2:?}"
        );
        println!("hostile {mode}: {line}");
        *record.lock().unwrap() = Some((outcome, took, killed, next));
        plugin.shutdown().await;
        line
    });
    let (outcome, took, killed, next) = seen.lock().unwrap().take().unwrap();
    let cut_off = !violation.is_empty()
        && matches!(&outcome, Outcome::ProtocolError(m) if m.contains(violation));
    assert!(
        matches!(outcome, Outcome::Timeout) || cut_off,
        "{mode}: expected a timeout, got {outcome:?}"
    );
    assert!(
        took < DEADLINE + SLACK,
        "{mode}: the 1 s deadline fired after {took:?}"
    );
    assert!(
        killed,
        "{mode}: the worker was not killed after the deadline"
    );
    assert!(
        matches!(&next, Outcome::Ok(out) if out == b"next"),
        "{mode}: the call after: {next:?}"
    );
}

#[test]
fn host_call_flood_for_5_s_does_not_outlast_the_deadline() {
    // Host calls for 5 s as fast as the worker can write them (it reads the answers): at
    // most 256 run at once and the rest are refused with LIMIT; a worker with more than
    // 512 outstanding is cut off. The host's memory stays bounded, and the call ends by
    // its 1 s deadline.
    flood_then_timeout_or(HOST_CALL_CUTOFF, "host_call_flood_5s");
}

#[test]
fn host_call_flood_without_reading_the_answers() {
    // 200,000 host calls, and the worker never reads the answers: the host must not hold
    // an answer per refused call (it cuts the worker off past 512 outstanding).
    flood_then_timeout_or(HOST_CALL_CUTOFF, "host_call_flood_unread");
}

#[test]
fn a_flood_of_unknown_frames_does_not_outlast_the_deadline() {
    flood_then_timeout("unknown_flood_5s");
}

#[test]
fn host_call_with_a_duplicate_outstanding_seq() {
    attack_is_cut_off(
        "host_call_duplicate",
        &["a second host call with seq 7", "while the first runs"],
    );
}

#[test]
fn host_call_for_a_call_never_sent_is_cancelled() {
    let mode = "host_call_unknown_id";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = attack(&plugin).await;
        let got = text(&outcome);
        assert_eq!(
            got, "status=8 host function `echo`: the call it was made for is over",
            "{mode}"
        );
        assert!(took < DEADLINE, "{mode}: {took:?}");
        still_up(&plugin, mode).await;
        plugin.shutdown().await;
        format!("{got} after {took:?}")
    });
}

#[test]
fn host_call_for_a_call_already_answered_is_cancelled() {
    let mode = "host_call_after_reply";
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (first, _) = attack(&plugin).await;
        assert_eq!(text(&first), "first", "{mode}");
        // The second `attack` reports the `host_reply` the first one's late host call got.
        let (second, took) = attack(&plugin).await;
        let got = text(&second);
        assert_eq!(
            got, "status=8 host function `echo`: the call it was made for is over",
            "{mode}"
        );
        still_up(&plugin, mode).await;
        plugin.shutdown().await;
        format!("{got} after {took:?}")
    });
}

#[test]
fn host_call_with_a_huge_name() {
    attack_is_cut_off(
        "host_call_huge_name",
        &["host_call.name", "5000 bytes", "at most 4096"],
    );
}

#[test]
fn credit_sent_by_the_worker() {
    // A host -> worker kind from the worker is a violation, not ignored.
    attack_is_cut_off(
        "credit_from_worker",
        &["unexpected message from the worker", "Credit"],
    );
}

#[test]
fn host_reply_sent_by_the_worker() {
    attack_is_cut_off(
        "host_reply_from_worker",
        &["unexpected message from the worker", "HostReply"],
    );
}

/// A call of `attack` on a worker in `mode` ends before the deadline with the worker cut
/// off for a protocol violation whose message contains each of `expected`; the plugin
/// then serves the next call.
fn attack_is_cut_off(mode: &'static str, expected: &'static [&'static str]) {
    case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let (outcome, took) = attack(&plugin).await;
        assert!(took < DEADLINE, "{mode}: {took:?}");
        let violation = cut_off(&plugin, mode, &outcome, expected).await;
        plugin.shutdown().await;
        format!("{violation} after {took:?}")
    });
}

// ---------------------------------------------------------------------------------------
// Shared memory. The `shm_*` workers move their frames to the region's rings after
// `Loaded`; their `attack` scribbles on the region (positions, bytes, control words). The
// host must trust nothing it reads there: every case asserts the exact violation (or the
// exact answers), then that the plugin serves the next call on shared memory.

/// Every live worker of `plugin` moves its frames through shared memory (so what a case
/// does goes through the rings, not the socket).
fn assert_shm(plugin: &Plugin, mode: &str) {
    let status = plugin.status();
    assert!(
        !status.instances.is_empty()
            && status
                .instances
                .iter()
                .all(|i| i.transport == Some(Transport::SharedMemory)),
        "{mode}: the worker does not use shared memory: {:?}",
        status.instances
    );
}

/// An outcome for a message, without a large payload.
fn brief(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Ok(out) if out.len() > 64 => format!("Ok({} bytes)", out.len()),
        other => format!("{other:?}"),
    }
}

/// The number that follows `label` in `text`.
fn number_after(text: &str, label: &str) -> u64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no `{label}` in: {text}"))
        + label.len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after `{label}` in: {text}"))
}

/// A shared-memory case: `attack` ends before the deadline with the worker cut off for a
/// protocol violation containing each of `expected`; a restarted worker (on shared memory
/// too) serves the next call.
fn shm_attack_is_cut_off(mode: &'static str, expected: &'static [&'static str]) {
    shm_case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        assert_shm(&plugin, mode);
        let (outcome, took) = attack(&plugin).await;
        assert!(took < DEADLINE, "{mode}: {outcome:?} after {took:?}");
        let violation = cut_off(&plugin, mode, &outcome, expected).await;
        assert_shm(&plugin, mode);
        plugin.shutdown().await;
        format!("{violation} after {took:?}")
    });
}

#[test]
fn shm_a_good_worker_through_the_rings() {
    // The fake worker's rings work (so the cases below test the host, not the fake):
    // inputs of every size, some larger than a ring (2 MiB), wrapping around it.
    let mode = "shm_echo";
    shm_case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        assert_shm(&plugin, mode);
        let sizes = [
            0usize,
            1,
            100,
            5000,
            64 << 10,
            3 << 20,
            1 << 20,
            7,
            3 << 20,
            10,
        ];
        for (i, &size) in sizes.iter().enumerate() {
            let input: Vec<u8> = (0..size).map(|b| (b * 31 + i) as u8).collect();
            let method = if i % 2 == 0 { "echo" } else { "attack" };
            let (outcome, took) = call_method(&plugin, method, &input).await;
            assert!(
                matches!(&outcome, Outcome::Ok(out) if *out == input),
                "{mode}: {method} of {size} bytes: {} after {took:?}",
                brief(&outcome)
            );
        }
        still_up(&plugin, mode).await;
        plugin.shutdown().await;
        format!("{} calls of up to 3 MiB answered", sizes.len())
    });
}

#[test]
fn shm_reply_write_position_u64_max() {
    shm_attack_is_cut_off(
        "shm_tail_max",
        &[
            "the reply ring's write position 18446744073709551615 is impossible: \
           the reader is at 0 and the ring holds 2097152 bytes",
        ],
    );
}

#[test]
fn shm_reply_write_position_a_ring_and_a_byte_past_the_reader() {
    shm_attack_is_cut_off(
        "shm_tail_past",
        &["the reply ring's write position 2097153 is impossible: \
           the reader is at 0 and the ring holds 2097152 bytes"],
    );
}

#[test]
fn shm_reply_write_position_moved_backwards() {
    // The host read a 64-byte frame; the write position goes back to 63.
    shm_attack_is_cut_off(
        "shm_tail_back",
        &["the reply ring's write position 63 is impossible: \
           the reader is at 64 and the ring holds 2097152 bytes"],
    );
}

#[test]
fn shm_scribbled_rings_with_a_plausible_write_position() {
    // Both rings filled with 0x02, 4096 bytes of it published: a body of 0x02020202
    // bytes (under the 64 MiB limit) whose header claims as many.
    shm_attack_is_cut_off(
        "shm_scribble",
        &["malformed frame: header length 33686018 exceeds the body (33686014 bytes)"],
    );
}

#[test]
fn shm_length_prefix_ffffffff() {
    shm_attack_is_cut_off(
        "shm_ffff",
        &["frame of 4294967295 bytes exceeds the limit of 67108864 bytes"],
    );
}

#[test]
fn shm_reply_for_an_id_never_sent() {
    // The plugin's first call has id 1; the reply is for 1,000,001.
    shm_attack_is_cut_off(
        "shm_never_sent",
        &["reply to call id 1000001, which was never sent"],
    );
}

#[test]
fn shm_duplicate_replies() {
    let mode = "shm_duplicate";
    shm_case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        assert_shm(&plugin, mode);
        let (outcome, took) = attack(&plugin).await;
        // Both replies are published at once, so the host reads them together: the first
        // answers the call, the second cuts the worker off.
        assert!(
            matches!(&outcome, Outcome::Ok(out) if out == b"first"),
            "{mode}: {outcome:?}"
        );
        assert!(took < DEADLINE, "{mode}: {took:?}");
        let recorded = common::wait_until(Duration::from_secs(3), || {
            plugin.status().last_crash.is_some()
        });
        let status = plugin.status();
        assert!(
            recorded,
            "{mode}: the second reply was accepted: {status:?}"
        );
        let violation = status.last_crash.as_ref().unwrap().protocol_error.clone();
        assert_eq!(
            violation.as_deref(),
            Some("a second reply to call id 1"),
            "{mode}: the crash report"
        );
        assert_eq!(status.crashes, 1, "{mode}: {status:?}");
        let (next, took) = call(&plugin, b"next").await;
        assert!(
            matches!(&next, Outcome::Ok(out) if out == b"next"),
            "{mode}: the call after the restart: {next:?} after {took:?}"
        );
        assert_eq!(plugin.status().restarts, 1, "{mode}: {:?}", plugin.status());
        assert_shm(&plugin, mode);
        plugin.shutdown().await;
        format!("{outcome:?}, then {violation:?}")
    });
}

/// `attack` answers `poked` after the worker wrote one of the request ring's positions,
/// which the host looks at only when it writes: the call itself is fine, the host's next
/// write (the next call's frame) must see the position. The worker is cut off with a
/// violation `check` accepts, and the next call (which never reached it) is answered by
/// a restarted worker. `warm_up`: an `echo` call first, so the host has seen the worker
/// read something before the attack.
fn shm_next_write_detects(mode: &'static str, warm_up: bool, check: fn(&str)) {
    shm_case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        assert_shm(&plugin, mode);
        if warm_up {
            let (warm, _) = call(&plugin, b"warm").await;
            assert!(
                matches!(&warm, Outcome::Ok(out) if out == b"warm"),
                "{mode}: {warm:?}"
            );
        }
        let pid = plugin.status().pid;
        let (outcome, took) = attack(&plugin).await;
        assert!(
            matches!(&outcome, Outcome::Ok(out) if out == b"poked"),
            "{mode}: {outcome:?}"
        );
        assert!(took < DEADLINE, "{mode}: {took:?}");
        assert_eq!(
            plugin.status().crashes,
            0,
            "{mode}: cut off before the host wrote again"
        );
        let (next, took) = call(&plugin, b"next").await;
        assert!(
            matches!(&next, Outcome::Ok(out) if out == b"next"),
            "{mode}: the next call: {next:?} after {took:?}"
        );
        let recorded = common::wait_until(Duration::from_secs(3), || {
            plugin.status().last_crash.is_some()
        });
        let status = plugin.status();
        assert!(recorded, "{mode}: the host wrote on: {status:?}");
        let violation = status
            .last_crash
            .as_ref()
            .unwrap()
            .protocol_error
            .clone()
            .unwrap_or_else(|| panic!("{mode}: no protocol error: {status:?}"));
        check(&violation);
        assert_eq!(status.crashes, 1, "{mode}: {status:?}");
        assert_eq!(status.restarts, 1, "{mode}: {status:?}");
        assert_ne!(
            status.pid, pid,
            "{mode}: the same worker answered: {status:?}"
        );
        assert_shm(&plugin, mode);
        plugin.shutdown().await;
        format!("{violation}; the next call answered after {took:?}")
    });
}

#[test]
fn shm_request_read_position_past_the_writer() {
    shm_next_write_detects("shm_head_past", false, |violation| {
        assert!(
            violation.starts_with("the request ring's read position ")
                && violation.ends_with("and the ring holds 2097152 bytes"),
            "{violation}"
        );
        let (read, writer) = (
            number_after(violation, "read position "),
            number_after(violation, "the writer is at "),
        );
        assert_eq!(read, writer + 1, "one byte past the writer: {violation}");
    });
}

#[test]
fn shm_request_read_position_moved_backwards() {
    shm_next_write_detects("shm_head_back", true, |violation| {
        assert!(
            violation.starts_with("the request ring's read position 0 is impossible: ")
                && violation.ends_with("and the ring holds 2097152 bytes"),
            "{violation}"
        );
        let seen = number_after(violation, "the reader was at ");
        assert!(seen > 0, "the host had seen the worker read: {violation}");
    });
}

#[test]
fn shm_request_write_position_moved_by_the_worker() {
    shm_next_write_detects("shm_request_tail", false, |violation| {
        assert!(
            violation.starts_with(
                "the request ring's write position was moved to 12345 by someone else \
                 (the writer is at "
            ),
            "{violation}"
        );
        let writer = number_after(violation, "the writer is at ");
        assert!(writer > 0 && writer != 12345, "{violation}");
    });
}

#[test]
fn shm_garbage_in_the_control_words_and_a_doorbell_flood() {
    // For 2 s after `attack`, the worker cycles `worker_state` and `host_sleep` through
    // legal and illegal values and floods the socket with doorbell bytes; it answers
    // every call correctly. Nothing there is a violation, but every call must still get
    // its own answer in time, and so must another plugin's.
    let mode = "shm_control_garbage";
    shm_case(mode, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        let other = host.load_manifest(manifest("shm_echo")).await.unwrap();
        assert_shm(&plugin, mode);
        assert_shm(&other, mode);
        let started = Instant::now();
        let (outcome, took) = attack(&plugin).await;
        assert!(
            matches!(&outcome, Outcome::Ok(out) if out == b"input"),
            "{mode}: {outcome:?} after {took:?}"
        );
        let mut calls = 0;
        let mut slowest = Duration::ZERO;
        // Through the 2 s of garbage and a second past it.
        while started.elapsed() < Duration::from_secs(3) {
            let input = format!("call {calls}");
            for (who, p) in [("the attacker", &plugin), ("another plugin", &other)] {
                let (outcome, took) = call(p, input.as_bytes()).await;
                assert!(
                    matches!(&outcome, Outcome::Ok(out) if out == input.as_bytes()),
                    "{mode}: {who}, {input}: {outcome:?} after {took:?}"
                );
                slowest = slowest.max(took);
            }
            calls += 1;
        }
        assert!(calls >= 20, "{mode}: only {calls} calls in 3 s");
        still_up(&plugin, mode).await;
        assert_eq!(other.status().crashes, 0, "{mode}: {:?}", other.status());
        plugin.shutdown().await;
        other.shutdown().await;
        format!("{calls} calls to each plugin answered, the slowest in {slowest:?}")
    });
}

/// `attack` with `input_len` bytes of input to a worker that stops reading the request
/// ring once the call's header is in: the call ends at its deadline with `Timeout`, the
/// host kills the worker `cancel_grace` later (a crash whose report says why), and a
/// restarted worker serves the next call.
fn shm_never_reads(name: &'static str, input_len: usize) {
    let mode = "shm_never_reads";
    shm_case(name, |host| async move {
        let plugin = host.load_manifest(manifest(mode)).await.unwrap();
        assert_shm(&plugin, mode);
        let (outcome, took) = call_method(&plugin, "attack", &vec![0x33; input_len]).await;
        assert!(
            matches!(outcome, Outcome::Timeout),
            "{name}: expected a timeout, got {outcome:?}"
        );
        assert!(
            took >= DEADLINE && took < DEADLINE + SLACK,
            "{name}: the 1 s deadline fired after {took:?}"
        );
        let killed = common::wait_until(Duration::from_secs(5), || {
            plugin.status().last_crash.is_some()
        });
        let status = plugin.status();
        if !killed {
            // Say what that means for the plugin's next call before failing.
            let (next, took2) = call(&plugin, b"next").await;
            panic!(
                "{name}: the worker was not killed within 5 s of the deadline: {status:?}; \
                 the next call: {next:?} after {took2:?}"
            );
        }
        let crash = status.last_crash.as_ref().unwrap();
        // A call whose input fits the ring was sent whole: it is the call that ran past
        // its deadline. One that does not fit was cut off mid-frame: the rest of the
        // frame is what the worker never took.
        let why = if input_len < 2 << 20 {
            "call `attack` was still running 200ms after its 1s deadline"
        } else {
            "it stopped reading: a frame abandoned when its call ended was still not taken 200ms later"
        };
        assert_eq!(
            crash.killed_by_host.as_deref(),
            Some(why),
            "{name}: {crash:?}"
        );
        assert_eq!(crash.protocol_error, None, "{name}: {crash:?}");
        assert_eq!(status.crashes, 1, "{name}: {status:?}");
        let (next, took2) = call(&plugin, b"next").await;
        assert!(
            matches!(&next, Outcome::Ok(out) if out == b"next"),
            "{name}: the call after: {next:?} after {took2:?}"
        );
        assert_shm(&plugin, mode);
        plugin.shutdown().await;
        format!("{outcome:?} after {took:?}; killed; next call {next:?} after {took2:?}")
    });
}

#[test]
fn shm_a_worker_that_stops_reading_the_request_ring() {
    shm_never_reads("shm_never_reads", 5);
}

#[test]
fn shm_a_worker_that_stops_reading_a_call_larger_than_the_ring() {
    // 3 MiB of input: the host fills the ring and is still writing the frame when the
    // deadline comes.
    shm_never_reads("shm_never_reads (3 MiB)", 3 << 20);
}
