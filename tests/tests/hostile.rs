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
#![cfg(target_os = "linux")]

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use plugin_host::{CallError, CallOptions, Error, Host, LoadError, Manifest, Plugin};

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

async fn call(plugin: &Plugin, input: &[u8]) -> (Outcome, Duration) {
    let started = Instant::now();
    let result = plugin
        .call_raw_with("echo", input.to_vec(), CallOptions::new().timeout(DEADLINE))
        .await;
    let outcome = match result {
        Ok(out) => Outcome::Ok(out),
        Err(Error::Call(CallError::Crashed { report, .. })) => match &report.protocol_error {
            Some(p) => Outcome::ProtocolError(p.clone()),
            None => Outcome::Other(format!("Crashed without a protocol error: {report:?}")),
        },
        Err(Error::Call(CallError::Timeout { .. })) => Outcome::Timeout,
        Err(e) => Outcome::Other(e.to_string()),
    };
    (outcome, started.elapsed())
}

/// Runs one case: `body` gets a host (a clone) whose worker-shim is the hostile worker and returns a
/// line for the report. Then checks the host lives, nothing leaked, memory stayed bounded.
fn case<F: std::future::Future<Output = String>>(name: &str, body: impl FnOnce(Host) -> F) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The first case in this process starts the async runtime's threads and descriptors
    // (they live on): start them before counting.
    static WARM: std::sync::Once = std::sync::Once::new();
    WARM.call_once(|| {
        common::run(async {
            let host = common::host_with_shim(hostile_worker().as_ref());
            let plugin = host.load_manifest(manifest("echo")).await.unwrap();
            let _ = call(&plugin, b"warm").await;
            plugin.shutdown().await;
        })
    });
    assert!(common::wait_until(Duration::from_secs(5), || {
        common::children().is_empty()
    }));
    let fds_before = common::open_fds();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let rss_before = status_field("VmRSS:");
    let report = common::run_with_limit(Duration::from_secs(60), async {
        let host = common::host_with_shim(hostile_worker().as_ref());
        let report = body(host.clone()).await;
        // The host lives: a well-behaved worker on the same host serves a call.
        let good = host
            .load_manifest(manifest("echo"))
            .await
            .unwrap_or_else(|e| panic!("{name}: the host cannot load a good worker after: {e}"));
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
        "hostile {name}: {report}; host peak memory +{:.1} MiB",
        growth as f64 / (1 << 20) as f64
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
