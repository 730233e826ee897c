//! Fuzzing the decoders a worker's bytes reach, on stable Rust: a structure-aware mutation
//! loop (no coverage feedback) over the seed corpus in `tests/fuzz/corpus/<target>/`.
//!
//! Targets (`plugin_host::protocol::fuzzing`, and the manifest parser):
//! - `host_stream`: the host's incremental frame reader, fed in reads of random sizes;
//! - `worker_stream`: the worker's blocking frame reader;
//! - `message`: one MessagePack header decoded into a message;
//! - `handshake`: what the host does with a worker's first frames;
//! - `manifest`: `Manifest::parse` on mutated manifest text.
//!
//! Every execution must not panic (each runs under `catch_unwind`), must finish within
//! [`HANG`], and must stay within memory: a counting global allocator records, for the
//! executing thread only, the largest single allocation (at most [`MAX_FRAME`], the frame
//! limit the stream targets run with) and the peak of live bytes (at most twice the input
//! plus [`MAX_FRAME`]). The host stream is also checked for consistency: the same bytes read
//! in chunks of different sizes decode to the same outcome, and whatever the worker's reader
//! decodes whole the host's decodes too.
//!
//! Executions per target: `PLUGIN_HOST_FUZZ_EXECS` (default [`DEFAULT_EXECS`], a CI-sized
//! pass); seed: `PLUGIN_HOST_FUZZ_SEED`. A finding prints the input in hex and writes it to
//! `target/fuzz-findings/`. `PLUGIN_HOST_WRITE_CORPUS=1 cargo test -p plugin-host-tests
//! --test fuzz golden` regenerates the corpus (the frames of a real session with the
//! worker-shim included); the single-message seeds double as golden frames. docs/testing.md has the totals of the long runs.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugin_host::protocol::fuzzing;
use plugin_host::protocol::{self, Message, WireLimits, WireSandbox};
use plugin_host_tests::Rng;
use rmpv::Value;

/// The frame limit the stream targets run with.
const MAX_FRAME: u32 = 1 << 20;
/// An execution slower than this is a hang.
const HANG: Duration = Duration::from_secs(1);
/// Executions per target without `PLUGIN_HOST_FUZZ_EXECS`: all five targets together take
/// well under 45 s in a debug build on 2 cores.
const DEFAULT_EXECS: u64 = 40_000;
/// Most findings kept (and printed) per target.
const KEEP: usize = 10;

// ---------------------------------------------------------------------------------------
// The counting allocator: per thread, only while an execution is being measured.

struct Counting;

thread_local! {
    static TRACK: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            LIVE.with(|l| {
                let live = l.get() + size as isize;
                l.set(live);
                PEAK.with(|p| p.set(p.get().max(live)));
            });
            LARGEST.with(|m| m.set(m.get().max(size)));
        }
    });
}

fn note_free(size: usize) {
    let _ = TRACK.try_with(|t| {
        if t.get() {
            LIVE.with(|l| l.set(l.get() - size as isize));
        }
    });
}

// SAFETY: every call is forwarded to `System` with the same arguments; the bookkeeping
// touches only `const`-initialised thread-locals without destructors (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: forwarded as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What one execution cost.
struct Cost {
    largest: usize,
    peak: usize,
    took: Duration,
}

/// Runs `f` measured: allocations of this thread only, under `catch_unwind`.
fn measured<T>(f: impl FnOnce() -> T) -> (std::thread::Result<T>, Cost) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|m| m.set(0));
    let started = Instant::now();
    TRACK.with(|t| t.set(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    TRACK.with(|t| t.set(false));
    let cost = Cost {
        largest: LARGEST.with(|m| m.get()),
        peak: PEAK.with(|p| p.get()).max(0) as usize,
        took: started.elapsed(),
    };
    (result, cost)
}

// ---------------------------------------------------------------------------------------
// Mutations.

const INTERESTING: &[u8] = &[
    0x00, 0xff, 0x7f, 0x80, 0xc0, 0xc1, 0xc2, 0xc3, 0xdc, 0xdd, 0xde, 0xdf, 0xd9, 0xda, 0xdb, 0xc4,
    0xc5, 0xc6, 0xcf, 0xd3, 0xcb, 0x90, 0x9f, 0x8f, 0xa0, 0xbf, 0x91, 0x81, 0xe0,
];

/// MessagePack prefixes that claim a huge count or length with nothing behind them.
const HUGE: &[&[u8]] = &[
    b"\xdc\xff\xff",
    b"\xdd\xff\xff\xff\xff",
    b"\xdd\x7f\xff\xff\xff",
    b"\xde\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdf\x00\x01\x00\x00",
    b"\xdb\xff\xff\xff\xff",
    b"\xda\xff\xff",
    b"\xd9\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\xc6\x00\x10\x00\x00",
    b"\xc9\xff\xff\xff\xff\x01",
    b"\xc8\xff\xff\x01",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
];

/// Field names and kinds of the protocol (as the decoder knows them), and a few it does
/// not know.
static NAMES: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    fuzzing::KINDS
        .iter()
        .chain(fuzzing::FIELDS)
        .chain(fuzzing::NESTED_FIELDS)
        .chain(&[
            "teleport",
            protocol::PROTOCOL,
            protocol::VERSION,
            "",
            "KIND",
        ])
        .copied()
        .collect()
});

/// The message kinds, and one the protocol does not know.
static KINDS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    fuzzing::KINDS
        .iter()
        .chain(&["teleport"])
        .copied()
        .collect()
});

/// `n` levels of one-element arrays around a nil (or of one-entry maps, or a mix).
fn nesting(rng: &mut Rng, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 2 + 1);
    match rng.below(3) {
        0 => out.resize(n, 0x91),
        1 => {
            for _ in 0..n {
                out.extend_from_slice(&[0x81, 0xa0]);
            }
        }
        _ => {
            for _ in 0..n {
                if rng.chance(2) {
                    out.push(0x91);
                } else {
                    out.extend_from_slice(&[0x81, 0xa1, b'k']);
                }
            }
        }
    }
    out.push(0xc0);
    out
}

/// How deep: mostly modest, sometimes the full 100,000 levels.
fn depth(rng: &mut Rng) -> usize {
    if rng.chance(8) {
        100_000
    } else {
        1 + rng.size(17).min(100_000)
    }
}

/// Byte-level mutations on any input.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, others: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(12) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(INTERESTING);
        }
        2 => {
            let at = rng.below(len + 1);
            let huge = *rng.pick(HUGE);
            data.splice(at..at, huge.iter().copied());
        }
        3 => {
            let at = rng.below(len + 1);
            let d = depth(rng);
            let deep = nesting(rng, d);
            data.splice(at..at, deep);
        }
        4 if len > 0 => {
            // Truncate.
            data.truncate(rng.below(len));
        }
        5 if len > 0 => {
            // Delete a chunk.
            let at = rng.below(len);
            let n = 1 + rng.size(10).min(len - at - 1);
            data.drain(at..at + n.min(len - at));
        }
        6 if len > 0 => {
            // Duplicate a chunk.
            let at = rng.below(len);
            let n = (1 + rng.size(10)).min(len - at);
            let chunk: Vec<u8> = data[at..at + n].to_vec();
            let to = rng.below(data.len() + 1);
            data.splice(to..to, chunk);
        }
        7 if !others.is_empty() => {
            // Splice in part of another seed.
            let other = rng.pick(others);
            if !other.is_empty() {
                let at = rng.below(other.len());
                let n = (1 + rng.size(12)).min(other.len() - at);
                let to = rng.below(len + 1);
                data.splice(to..to, other[at..at + n].iter().copied());
            }
        }
        8 => {
            // Replace a known name with another (as a MessagePack fixstr).
            let from = rng.pick(&NAMES).as_bytes();
            let to = rng.pick(&NAMES).as_bytes();
            if let Some(at) = find(data, from) {
                let start = at.saturating_sub(1);
                let mut with = vec![0xa0 | to.len() as u8];
                with.extend_from_slice(to);
                data.splice(start..at + from.len(), with);
            }
        }
        9 if len > 0 => {
            // Overwrite a few bytes with random ones.
            let at = rng.below(len);
            let end = (at + 1 + rng.below(8)).min(len);
            for b in &mut data[at..end] {
                *b = rng.bits() as u8;
            }
        }
        10 if len >= 4 => {
            // A big-endian count/length somewhere set to an edge value.
            let at = rng.below(len - 3);
            let v: u32 = *rng.pick(&[0, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0xffff, 4096]);
            data[at..at + 4].copy_from_slice(&v.to_be_bytes());
        }
        _ => {
            let at = rng.below(len + 1);
            data.insert(at, rng.bits() as u8);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Placeholders put into a value tree and replaced by raw bytes after encoding.
const SENTINELS: &[&str] = &[
    "\u{1}DEEP\u{1}",
    "\u{1}HUGE\u{1}",
    "\u{1}LONGSTR\u{1}",
    "\u{1}MANY\u{1}",
];

fn random_value(rng: &mut Rng) -> Value {
    match rng.below(20) {
        0 => Value::Nil,
        1 => Value::Boolean(rng.chance(2)),
        2 => Value::from(u64::MAX),
        3 => Value::from(i64::MIN),
        4 => Value::from(-1),
        5 => Value::from(rng.bits()),
        6 => Value::from(rng.below(300) as u64),
        7 => Value::F64(*rng.pick(&[f64::NAN, f64::INFINITY, -0.0, 1e308, 0.5, -1.0])),
        8 => Value::F32(1.5),
        9 => Value::from(*rng.pick(&NAMES)),
        10 => Value::from(*rng.pick(&KINDS)),
        11 => Value::Binary((0..rng.size(8)).map(|_| rng.bits() as u8).collect()),
        12 => Value::Array(
            (0..rng.size(4))
                .map(|_| Value::from(*rng.pick(&NAMES)))
                .collect(),
        ),
        13 => Value::Map(vec![(Value::from("kind"), Value::from(*rng.pick(&KINDS)))]),
        14 => Value::Ext(rng.bits() as i8, vec![1, 2, 3]),
        15 => Value::from(String::from_utf8_lossy(&[0xff, 0xfe, b'x']).into_owned()),
        16 => Value::Array(vec![Value::from(1), Value::from(0)]),
        _ => Value::from(*rng.pick(SENTINELS)),
    }
}

fn key_of(entry: &(Value, Value)) -> Option<&str> {
    entry.0.as_str()
}

/// One structural mutation of a decoded header.
fn mutate_value(rng: &mut Rng, root: &mut Value) {
    let Value::Map(entries) = root else {
        *root = match rng.below(3) {
            0 => Value::Map(Vec::new()),
            1 => random_value(rng),
            _ => Value::Array(vec![root.clone()]),
        };
        return;
    };
    let n = entries.len();
    match rng.below(10) {
        0 => {
            // Another kind.
            let kind = Value::from(*rng.pick(&KINDS));
            match entries.iter_mut().find(|e| key_of(e) == Some("kind")) {
                Some(e) => e.1 = kind,
                None => entries.insert(0, (Value::from("kind"), kind)),
            }
        }
        1 if n > 0 => {
            // A key renamed to another known name.
            let i = rng.below(n);
            entries[i].0 = Value::from(*rng.pick(&NAMES));
        }
        2 if n > 0 => {
            entries.remove(rng.below(n));
        }
        3 if n > 0 => {
            // A duplicate field.
            let e = entries[rng.below(n)].clone();
            entries.insert(rng.below(n + 1), e);
        }
        4 => {
            let key = if rng.chance(2) {
                Value::from(*rng.pick(&NAMES))
            } else {
                random_value(rng)
            };
            let value = random_value(rng);
            entries.insert(rng.below(n + 1), (key, value));
        }
        5 | 6 if n > 0 => {
            // A value of another type or size.
            let i = rng.below(n);
            entries[i].1 = random_value(rng);
        }
        7 if n > 0 => {
            // A value wrapped in an array or a map.
            let i = rng.below(n);
            let v = entries[i].1.clone();
            entries[i].1 = if rng.chance(2) {
                Value::Array(vec![v])
            } else {
                Value::Map(vec![(Value::from("x"), v)])
            };
        }
        8 if n > 1 => {
            let (a, b) = (rng.below(n), rng.below(n));
            entries.swap(a, b);
        }
        _ => {
            // A list field with many (empty) entries: methods, features, sandbox, ...
            let key = *rng.pick(&["methods", "features", "sandbox", "sandbox_missing", "abi"]);
            let count = rng.size(13);
            let items = vec![Value::from(""); count];
            match entries.iter_mut().find(|e| key_of(e) == Some(key)) {
                Some(e) => e.1 = Value::Array(items),
                None => entries.push((Value::from(key), Value::Array(items))),
            }
        }
    }
}

fn encode_value(rng: &mut Rng, value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    // Placeholders become raw MessagePack no value tree could build cheaply.
    for sentinel in SENTINELS {
        let mut encoded = Vec::new();
        rmpv::encode::write_value(&mut encoded, &Value::from(*sentinel)).unwrap();
        while let Some(at) = find(&out, &encoded) {
            let with: Vec<u8> = match *sentinel {
                "\u{1}DEEP\u{1}" => {
                    let d = depth(rng);
                    nesting(rng, d)
                }
                "\u{1}HUGE\u{1}" => rng.pick(HUGE).to_vec(),
                "\u{1}LONGSTR\u{1}" => {
                    let n = rng.size(18);
                    let mut s = vec![0xdb];
                    s.extend_from_slice(&(n as u32).to_be_bytes());
                    s.resize(5 + n, b'a');
                    s
                }
                _ => {
                    // An array of many nils.
                    let n = rng.size(17);
                    let mut s = vec![0xdd];
                    s.extend_from_slice(&(n as u32).to_be_bytes());
                    s.resize(5 + n, 0xc0);
                    s
                }
            };
            out.splice(at..at + encoded.len(), with);
        }
    }
    out
}

/// Mutates a MessagePack header: structurally (decode, change, re-encode) or as bytes.
fn mutate_head(rng: &mut Rng, head: &mut Vec<u8>, others: &[Vec<u8>]) {
    if rng.chance(2) {
        // A shallow limit: the value tree is recursive (decoding, encoding and dropping it);
        // deep nesting is inserted as raw bytes instead.
        if let Ok(mut value) = rmpv::decode::read_value_with_max_depth(&mut &head[..], 32) {
            for _ in 0..1 + rng.below(3) {
                mutate_value(rng, &mut value);
            }
            *head = encode_value(rng, &value);
            return;
        }
    }
    mutate_bytes(rng, head, others);
}

/// A frame stream as (header, payload) pairs, if it parses as one.
fn split_frames(bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut frames = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let body = u32::from_le_bytes(rest.get(0..4)?.try_into().unwrap()) as usize;
        let head = u32::from_le_bytes(rest.get(4..8)?.try_into().unwrap()) as usize;
        let frame = rest.get(4..4 + body)?;
        let header = frame.get(4..4 + head)?;
        frames.push((header.to_vec(), frame[4 + head..].to_vec()));
        rest = &rest[4 + body..];
    }
    Some(frames)
}

fn join_frames(frames: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (head, payload) in frames {
        out.extend_from_slice(&((4 + head.len() + payload.len()) as u32).to_le_bytes());
        out.extend_from_slice(&(head.len() as u32).to_le_bytes());
        out.extend_from_slice(head);
        out.extend_from_slice(payload);
    }
    out
}

/// Offsets where frames start, following the length prefixes as far as they lead.
fn frame_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0usize;
    while at + 4 <= bytes.len() && starts.len() < 64 {
        starts.push(at);
        let body = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at = at.saturating_add(4).saturating_add(body);
    }
    starts
}

/// Sets a body or header length field to an edge value.
fn patch_length(rng: &mut Rng, bytes: &mut [u8]) {
    let starts = frame_starts(bytes);
    if starts.is_empty() {
        return;
    }
    let at = *rng.pick(&starts) + if rng.chance(2) { 4 } else { 0 };
    if at + 4 > bytes.len() {
        return;
    }
    let old = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let v = match rng.below(14) {
        0 => u32::MAX,
        1 => 0,
        2 => 3,
        3 => 4,
        4 => 5,
        5 => MAX_FRAME,
        6 => MAX_FRAME + 1,
        7 => 0x7fff_ffff,
        8 => 0x8000_0000,
        9 => old.wrapping_add(1),
        10 => old.wrapping_sub(1),
        11 => old.wrapping_add(1 + rng.below(64) as u32),
        12 => 256 * 1024 + rng.below(3) as u32 - 1,
        _ => rng.bits() as u32,
    };
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Mutates a frame stream: structurally (frames re-joined with correct lengths), then
/// sometimes as raw bytes (lengths patched, chunks cut or spliced).
fn mutate_stream(rng: &mut Rng, seed: &[u8], all: &[Vec<u8>]) -> Vec<u8> {
    let mut out = seed.to_vec();
    if let (true, Some(mut frames)) = (!rng.chance(4), split_frames(seed)) {
        for _ in 0..1 + rng.below(3) {
            let n = frames.len();
            match rng.below(10) {
                0..=4 if n > 0 => {
                    let i = rng.below(n);
                    mutate_head(rng, &mut frames[i].0, all);
                }
                5 if n > 0 => {
                    // A payload resized: empty, small, or past the direct-read threshold.
                    let i = rng.below(n);
                    let len = match rng.below(4) {
                        0 => 0,
                        1 => rng.size(10),
                        2 => 64 * 1024 + rng.below(64),
                        _ => rng.size(17),
                    };
                    frames[i].1.resize(len, 0x5a);
                }
                6 if n > 0 => {
                    let f = frames[rng.below(n)].clone();
                    frames.insert(rng.below(n + 1), f);
                }
                7 if n > 1 => {
                    frames.remove(rng.below(n));
                }
                8 if n > 1 => {
                    let (a, b) = (rng.below(n), rng.below(n));
                    frames.swap(a, b);
                }
                _ => {
                    // A frame of another seed.
                    let seed: &Vec<u8> = rng.pick(all);
                    if let Some(other) = split_frames(seed) {
                        if !other.is_empty() {
                            let f = other[rng.below(other.len())].clone();
                            frames.insert(rng.below(n + 1), f);
                        }
                    }
                }
            }
        }
        out = join_frames(&frames);
        if rng.chance(2) {
            return out;
        }
    }
    for _ in 0..1 + rng.below(3) {
        if rng.chance(3) {
            patch_length(rng, &mut out);
        } else {
            mutate_bytes(rng, &mut out, all);
        }
    }
    out
}

/// Text mutations of a manifest: lines dropped, duplicated, values replaced with TOML-ish
/// noise, plus byte-level damage.
fn mutate_text(rng: &mut Rng, seed: &[u8], all: &[Vec<u8>]) -> Vec<u8> {
    const NOISE: &[&str] = &[
        "[limits]",
        "[timeouts]",
        "[restart]",
        "[permissions]",
        "[config]",
        "[[x]]",
        "a = ",
        "\"\"\"",
        "'''",
        "= = =",
        "[",
        "]",
        "{",
        "}",
        "inf",
        "nan",
        "-0",
        "1e999",
        "0x7fffffffffffffff",
        "-9223372036854775808",
        "18446744073709551616",
        "1979-05-27T07:32:00Z",
        "\"99999999999999999999GiB\"",
        "\"-1s\"",
        "\"1.5.5ms\"",
        "\"0s\"",
        "\"$DATA_DIR/../..\"",
        "\"../../etc/passwd\"",
        "\"\\u0000\"",
        "\"\\uD800\"",
        "max_frame = \"3GiB\"",
        "memory = \"1B\"",
        "api = \">=1, <0\"",
        "sandbox = \"maybe\"",
        "trust = \"trusted\"",
        "env = [\"PATH\", \"\"]",
        "read = [\"$PLUGIN_DIR\", \"$TMP\", \"/\"]",
        "name = \"\"",
        "name = \"a b\"",
        "library = \"/\"",
        "[config.a.b.c.d.e.f]",
        "x = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
        "\u{feff}",
        "\r\n",
        "\t",
        "#",
    ];
    let mut text = String::from_utf8_lossy(seed).into_owned();
    for _ in 0..1 + rng.below(4) {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let n = lines.len();
        match rng.below(8) {
            0 if n > 0 => {
                lines.remove(rng.below(n));
            }
            1 if n > 0 => {
                let l = lines[rng.below(n)].clone();
                lines.insert(rng.below(n + 1), l);
            }
            2 if n > 0 => {
                // A value replaced.
                let i = rng.below(n);
                if let Some((key, _)) = lines[i].split_once('=') {
                    lines[i] = format!("{key}= {}", rng.pick(NOISE));
                }
            }
            3 => lines.insert(rng.below(n + 1), rng.pick(NOISE).to_string()),
            4 if n > 0 => {
                let i = rng.below(n);
                let noise = rng.pick(NOISE);
                let at = rng.below(lines[i].len() + 1);
                if lines[i].is_char_boundary(at) {
                    lines[i].insert_str(at, noise);
                }
            }
            5 => {
                // Deeply nested arrays or inline tables.
                let depth = 1 + rng.size(14);
                let (open, close) = if rng.chance(2) {
                    ("[", "]")
                } else {
                    ("{a=", "}")
                };
                lines.push(format!(
                    "deep = {}{}",
                    open.repeat(depth),
                    close.repeat(depth)
                ));
            }
            _ => {
                let mut bytes = text.into_bytes();
                mutate_bytes(rng, &mut bytes, all);
                text = String::from_utf8_lossy(&bytes).into_owned();
                continue;
            }
        }
        text = lines.join("\n");
    }
    text.into_bytes()
}

// ---------------------------------------------------------------------------------------
// Targets.

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Frames,
    Header,
    Text,
}

struct Target {
    name: &'static str,
    kind: Kind,
}

const TARGETS: &[Target] = &[
    Target {
        name: "host_stream",
        kind: Kind::Frames,
    },
    Target {
        name: "worker_stream",
        kind: Kind::Frames,
    },
    Target {
        name: "message",
        kind: Kind::Header,
    },
    Target {
        name: "handshake",
        kind: Kind::Frames,
    },
    Target {
        name: "manifest",
        kind: Kind::Text,
    },
];

fn corpus_dir(target: &str) -> PathBuf {
    common::repo().join("tests/fuzz/corpus").join(target)
}

fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// One execution of a target. Returns a short outcome (for the consistency checks).
fn execute(target: &str, input: &[u8], chunk: usize) -> Result<usize, String> {
    match target {
        "host_stream" => fuzzing::host_stream(input, chunk, MAX_FRAME),
        "worker_stream" => fuzzing::worker_stream(input, MAX_FRAME),
        "message" => fuzzing::message(input).map(|()| 0),
        "handshake" => fuzzing::handshake(input).map(|()| 0),
        "manifest" => {
            plugin_host::Manifest::parse(&String::from_utf8_lossy(input), "fuzz/plugin.toml")
                .map(|_| 0)
                .map_err(|e| e.to_string())
        }
        other => unreachable!("{other}"),
    }
}

/// A problem an input caused.
struct Finding {
    what: String,
    input: Vec<u8>,
}

fn hex(bytes: &[u8], max: usize) -> String {
    let shown: String = bytes.iter().take(max).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > max {
        format!("{shown}... ({} bytes)", bytes.len())
    } else {
        shown
    }
}

/// The input running now, for the watchdog.
struct Current {
    target: &'static str,
    input: Vec<u8>,
    started: Option<Instant>,
}

static CURRENT: Mutex<Vec<Arc<Mutex<Current>>>> = Mutex::new(Vec::new());

/// Aborts the process (after printing the input) if an execution runs 30x past [`HANG`]:
/// a real hang would otherwise stall the test forever.
fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            for slot in CURRENT.lock().unwrap().iter() {
                let c = slot.lock().unwrap();
                if c.started.is_some_and(|s| s.elapsed() > HANG * 30) {
                    let path = save_finding(c.target, "hang", &c.input);
                    eprintln!(
                        "fuzz {}: HANG: an execution has run for {:?}; input ({}): {}",
                        c.target,
                        c.started.unwrap().elapsed(),
                        path.display(),
                        hex(&c.input, 512)
                    );
                    std::process::abort();
                }
            }
        });
    });
}

fn save_finding(target: &str, what: &str, input: &[u8]) -> PathBuf {
    let dir = common::repo().join("target/fuzz-findings");
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("{target}-{what}-{:016x}.bin", fnv(input)));
    let _ = std::fs::write(&path, input);
    path
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Runs one input, checks it, and returns what went wrong, if anything.
/// The host reader's own buffer (64 KiB, grown to hold one header of at most 256 KiB).
const READ_BUFFER: usize = 512 * 1024;
/// The issue's target for any handshake: at most 1 MiB of host memory.
const HANDSHAKE_PEAK: usize = 1 << 20;

fn check_one(
    target: &'static str,
    input: &[u8],
    chunk: usize,
    current: &Mutex<Current>,
    stats: &mut Stats,
) -> Vec<String> {
    {
        let mut c = current.lock().unwrap();
        c.input.clear();
        c.input.extend_from_slice(input);
        c.started = Some(Instant::now());
    }
    let (result, cost) = measured(|| execute(target, input, chunk));
    current.lock().unwrap().started = None;
    stats.largest = stats.largest.max(cost.largest);
    stats.peak = stats.peak.max(cost.peak);
    stats.slowest = stats.slowest.max(cost.took);
    let over = cost.peak as i64 - 2 * input.len() as i64;
    if over > stats.peak_over_2x_input {
        stats.peak_over_2x_input = over;
    }
    let mut problems = Vec::new();
    let outcome = match result {
        Ok(outcome) => Some(outcome),
        Err(payload) => {
            problems.push(format!("panic: {}", panic_message(&*payload)));
            None
        }
    };
    if cost.took > HANG {
        problems.push(format!("hang: took {:?}", cost.took));
    }
    if target != "manifest" && cost.largest > MAX_FRAME as usize {
        problems.push(format!(
            "allocation of {} bytes exceeds the frame limit of {MAX_FRAME}",
            cost.largest
        ));
    }
    // Decoders of what a worker sends: at most twice the input, plus one frame's payload
    // reserved from its declared length (at most the frame limit; its pages are touched
    // only as bytes arrive), plus the reader's buffer. A handshake, under its own small
    // limits, stays under 1 MiB in all. The manifest is a local file, parsed into a TOML
    // tree first: a looser bound.
    let factor = if target == "manifest" { 16 } else { 2 };
    let bound = match target {
        "handshake" => HANDSHAKE_PEAK,
        _ => factor * input.len() + MAX_FRAME as usize + READ_BUFFER,
    };
    if cost.peak > bound {
        problems.push(format!(
            "peak of {} live bytes exceeds the bound of {bound} for {} input bytes",
            cost.peak,
            input.len()
        ));
    }
    // Consistency: the host's reader must not depend on how the bytes were split, and
    // must decode whatever the worker's reader decodes.
    if let (Some(outcome), "host_stream") = (&outcome, target) {
        let again = std::panic::catch_unwind(|| {
            (
                fuzzing::host_stream(input, usize::MAX, MAX_FRAME),
                fuzzing::worker_stream(input, MAX_FRAME),
            )
        });
        let Ok((whole, worker)) = again else {
            problems.push("panic: in one read or the worker's reader".into());
            return problems;
        };
        let same = match (outcome, &whole) {
            (Ok(a), Ok(b)) => a == b,
            (Err(_), Err(_)) => true,
            _ => false,
        };
        if !same {
            problems.push(format!(
                "chunk size {chunk} gave {outcome:?}, one read gave {whole:?}"
            ));
        }
        if let Ok(n) = worker {
            if whole != Ok(n) {
                problems.push(format!(
                    "the worker's reader decodes {n} frames, the host's gives {whole:?}"
                ));
            }
        }
    }
    problems
}

/// The largest costs seen in a run.
#[derive(Default, Clone, Copy)]
struct Stats {
    largest: usize,
    peak: usize,
    /// Largest peak of live bytes minus twice the input's size.
    peak_over_2x_input: i64,
    slowest: Duration,
}

struct Totals {
    stats: Stats,
    execs: u64,
    seeds: usize,
    corpus_bytes: usize,
    findings: Vec<Finding>,
    took: Duration,
    ok: u64,
}

fn fuzz_target(target: &'static Target, execs: u64, seed: u64) -> Totals {
    watchdog();
    let started = Instant::now();
    let corpus = load_corpus(target.name);
    // Splice material: this target's seeds and the frame seeds of the others.
    let mut all = corpus.clone();
    if target.kind != Kind::Text {
        for other in TARGETS
            .iter()
            .filter(|t| t.kind != Kind::Text && t.name != target.name)
        {
            all.extend(load_corpus(other.name));
        }
    }
    let current = Arc::new(Mutex::new(Current {
        target: target.name,
        input: Vec::new(),
        started: None,
    }));
    CURRENT.lock().unwrap().push(current.clone());
    let mut rng = Rng((seed ^ fnv(target.name.as_bytes())) | 1);
    let mut findings: Vec<Finding> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut ok = 0;
    let mut stats = Stats::default();
    let mut record = |problems: Vec<String>, input: &[u8], findings: &mut Vec<Finding>| {
        for p in problems {
            // One finding per kind of problem (the first word: panic, hang, allocation,
            // peak, chunk, the).
            let class: String = p.split([' ', ':']).next().unwrap_or("").to_string();
            if findings.len() < KEEP && seen.insert(class) {
                let path = save_finding(target.name, "finding", input);
                eprintln!(
                    "fuzz {}: FINDING: {p}\n  input ({} bytes, saved to {}): {}",
                    target.name,
                    input.len(),
                    path.display(),
                    hex(input, 256)
                );
                findings.push(Finding {
                    what: p,
                    input: input.to_vec(),
                });
            }
        }
    };
    // Every seed as is first: the checked-in corpus is the regression suite.
    let mut done = 0u64;
    for s in &corpus {
        let problems = check_one(target.name, s, 4096, &current, &mut stats);
        record(problems, s, &mut findings);
        done += 1;
    }
    while done < execs {
        let base = rng.pick(&corpus);
        let input = match target.kind {
            Kind::Frames => mutate_stream(&mut rng, base, &all),
            Kind::Header => {
                let mut h = base.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_head(&mut rng, &mut h, &all);
                }
                h
            }
            Kind::Text => mutate_text(&mut rng, base, &all),
        };
        let chunk = match rng.below(6) {
            0 => 1 + rng.below(8),
            1 => 1 + rng.below(input.len().max(1)),
            2 => *rng.pick(&[4, 8, 4096, 65536]),
            _ => 1 + rng.size(16),
        };
        let problems = check_one(target.name, &input, chunk, &current, &mut stats);
        if problems.is_empty() {
            ok += 1;
        }
        record(problems, &input, &mut findings);
        done += 1;
    }
    CURRENT
        .lock()
        .unwrap()
        .retain(|c| !Arc::ptr_eq(c, &current));
    Totals {
        stats,
        execs: done,
        seeds: corpus.len(),
        corpus_bytes: corpus.iter().map(Vec::len).sum(),
        findings,
        took: started.elapsed(),
        ok,
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

static TOTAL_EXECS: AtomicU64 = AtomicU64::new(0);

fn run(name: &str) {
    let target = TARGETS.iter().find(|t| t.name == name).unwrap();
    let execs = env_u64("PLUGIN_HOST_FUZZ_EXECS", DEFAULT_EXECS);
    let seed = env_u64("PLUGIN_HOST_FUZZ_SEED", 0x5eed_f00d);
    // Long runs may split a target over threads, each with its own seed.
    let threads = env_u64("PLUGIN_HOST_FUZZ_THREADS", 1).max(1);
    let results: Vec<Totals> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let share = execs / threads + u64::from(i < execs % threads);
                s.spawn(move || {
                    fuzz_target(target, share, seed.wrapping_add(i.wrapping_mul(0x9e37)))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let execs_run: u64 = results.iter().map(|t| t.execs).sum();
    let ok: u64 = results.iter().map(|t| t.ok).sum();
    let took = results.iter().map(|t| t.took).max().unwrap_or_default();
    TOTAL_EXECS.fetch_add(execs_run, Ordering::Relaxed);
    let findings: Vec<&Finding> = results.iter().flat_map(|t| &t.findings).collect();
    let stats = results.iter().fold(Stats::default(), |a, t| Stats {
        largest: a.largest.max(t.stats.largest),
        peak: a.peak.max(t.stats.peak),
        peak_over_2x_input: a.peak_over_2x_input.max(t.stats.peak_over_2x_input),
        slowest: a.slowest.max(t.stats.slowest),
    });
    println!(
        "fuzz {name}: {execs_run} executions in {took:.2?} ({:.0}/s), corpus {} seeds / {} bytes, \
         {ok} clean of {execs_run}, {} findings (seed {seed:#x})",
        execs_run as f64 / took.as_secs_f64().max(1e-9),
        results[0].seeds,
        results[0].corpus_bytes,
        findings.len()
    );
    println!(
        "fuzz {name}: largest allocation {} bytes, peak live {} bytes, peak minus 2 x input \
         {} bytes, slowest execution {:.2?}",
        stats.largest, stats.peak, stats.peak_over_2x_input, stats.slowest
    );
    assert!(
        findings.is_empty(),
        "fuzz {name}: {} findings:\n{}",
        findings.len(),
        findings
            .iter()
            .map(|f| format!("- {}\n  input: {}", f.what, hex(&f.input, 256)))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn fuzz_host_stream() {
    run("host_stream");
}

#[test]
fn fuzz_worker_stream() {
    run("worker_stream");
}

#[test]
fn fuzz_message() {
    run("message");
}

#[test]
fn fuzz_handshake() {
    run("handshake");
}

#[test]
fn fuzz_manifest() {
    run("manifest");
}

/// The allocator counts what it should (a check of the harness, not of the decoders).
#[test]
fn the_counting_allocator_sees_allocations() {
    let (result, cost) = measured(|| vec![0u8; 3 << 20].len());
    assert_eq!(result.unwrap(), 3 << 20);
    assert!(cost.largest >= 3 << 20 && cost.peak >= 3 << 20);
    let (result, _) = measured(|| panic!("caught"));
    assert!(result.is_err());
}

// ---------------------------------------------------------------------------------------
// The corpus.

#[cfg(target_os = "linux")]
fn frames(messages: &[(Message, &[u8])]) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|(m, p)| fuzzing::encode(m, p))
        .collect()
}

fn head(message: &Message) -> Vec<u8> {
    rmp_serde::to_vec_named(message).unwrap()
}

/// Every message kind with realistic fields.
fn every_kind() -> Vec<(&'static str, Message, Vec<u8>)> {
    let config =
        rmp_serde::to_vec_named(&serde_json::json!({"greeting": "Hello", "max_dimension": 16384}))
            .unwrap();
    vec![
        ("hello_worker", protocol::hello(None, Some(4242)), vec![]),
        ("hello_host", protocol::hello(None, None), vec![]),
        (
            "load",
            Message::Load {
                name: "thumbnail".into(),
                library: "/opt/app/plugins/thumbnail/libthumbnail.so".into(),
                max_frame: 64 << 20,
                concurrency: 4,
                limits: WireLimits {
                    memory: Some(512 << 20),
                    cpu_seconds: Some(60),
                    open_files: Some(256),
                    core_dumps: false,
                },
                sandbox: Some(WireSandbox {
                    mode: "required".into(),
                    read: vec![
                        "/opt/app/plugins/thumbnail".into(),
                        "/usr/share/fonts".into(),
                    ],
                    write: vec!["/home/u/.local/share/app/plugins/thumbnail".into()],
                    network: false,
                    exec: false,
                    tasks: 32,
                }),
            },
            config,
        ),
        (
            "loaded",
            Message::Loaded {
                name: "thumbnail".into(),
                version: "1.2.0".into(),
                abi_major: 1,
                abi_minor: 0,
                methods: vec!["resize".into(), "info".into(), "echo".into()],
                sandbox: vec!["namespaces".into(), "landlock".into(), "seccomp".into()],
                sandbox_missing: vec!["task limit: root".into()],
            },
            vec![],
        ),
        (
            "load_failed",
            Message::LoadFailed {
                reason: "abi_mismatch".into(),
                message: "the library was built against ABI 2.0".into(),
                abi: Some((2, 0)),
            },
            vec![],
        ),
        (
            "call",
            Message::Call {
                id: 17,
                method: "resize".into(),
                window: 0,
                window_bytes: 0,
            },
            b"\x82\xa5width\xcd\x01\x00\xa6height\xcc\x80".to_vec(),
        ),
        (
            "reply",
            Message::Reply { id: 17, status: 0 },
            (0..200u8).collect(),
        ),
        (
            "reply_error",
            Message::Reply { id: 18, status: 3 },
            b"width must be positive".to_vec(),
        ),
        ("cancel", Message::Cancel { id: 19 }, vec![]),
        (
            "event",
            Message::Event {
                id: 20,
                fraction: 0.25,
                message: "decoding".into(),
            },
            vec![],
        ),
        (
            "log",
            Message::Log {
                level: 3,
                message: "cache warmed: 12 entries".into(),
                call: Some(20),
            },
            vec![],
        ),
        ("ping", Message::Ping { seq: 1 }, vec![]),
        ("pong", Message::Pong { seq: 1 }, vec![]),
        ("shutdown", Message::Shutdown { grace_ms: 0 }, vec![]),
        // Protocol 0.2.1: host calls and output streams.
        (
            "call_stream",
            Message::Call {
                id: 21,
                method: "frames".into(),
                window: 256,
                window_bytes: 1 << 20,
            },
            b"\x81\xa5count\xcd\x01\x2c".to_vec(),
        ),
        (
            "host_call",
            Message::HostCall {
                id: 21,
                seq: 1,
                name: "doc.selection".into(),
            },
            b"\x81\xa5range\x92\x00\x0a".to_vec(),
        ),
        (
            "host_reply",
            Message::HostReply {
                id: 21,
                seq: 1,
                status: 0,
            },
            b"\xa5hello".to_vec(),
        ),
        (
            "host_reply_error",
            Message::HostReply {
                id: 21,
                seq: 2,
                status: 10,
            },
            b"host function `doc.selection`: more than 256 host calls are outstanding".to_vec(),
        ),
        ("item", Message::Item { id: 21 }, (0..64u8).collect()),
        (
            "credit",
            Message::Credit {
                id: 21,
                items: 128,
                bytes: 8192,
            },
            vec![],
        ),
    ]
}

/// One side of a real session: the real worker-shim running `plugin`, driven through a
/// socket pair as the host drives it, both directions recorded.
#[cfg(target_os = "linux")]
struct Session {
    host: std::os::unix::net::UnixStream,
    child: std::process::Child,
    sent: Vec<u8>,
    received: Vec<u8>,
}

#[cfg(target_os = "linux")]
impl Session {
    /// Starts the worker-shim on `plugin` and completes the handshake.
    fn start(plugin: &str) -> Session {
        use std::os::unix::net::UnixStream;
        use std::process::{Command, Stdio};
        let (host, worker) = UnixStream::pair().unwrap();
        let child = Command::new(common::worker_shim())
            .args(["--fd", "0", "--plugin", plugin, "--sandbox", "off"])
            .env("PLUGIN_HOST_PARENT_PID", std::process::id().to_string())
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(worker)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut session = Session {
            host,
            child,
            sent: Vec::new(),
            received: Vec::new(),
        };
        assert!(matches!(session.read(), (Message::Hello { .. }, _)));
        session.send(&protocol::hello(None, None), &[]);
        let library = common::artifacts().join(plugin_host::Manifest::library_file_name(plugin));
        session.send(
            &Message::Load {
                name: plugin.into(),
                library: library.to_string_lossy().into_owned(),
                max_frame: 1 << 20,
                concurrency: 2,
                limits: WireLimits::default(),
                sandbox: None,
            },
            b"\x80",
        );
        loop {
            match session.read().0 {
                Message::Loaded { .. } => break,
                Message::Log { .. } | Message::Unknown => {}
                other => panic!("expected Loaded, got {other:?}"),
            }
        }
        session
    }

    fn read(&mut self) -> (Message, Vec<u8>) {
        use std::io::Read;
        let mut len = [0u8; 4];
        self.host.read_exact(&mut len).unwrap();
        let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
        self.host.read_exact(&mut body).unwrap();
        self.received.extend_from_slice(&len);
        self.received.extend_from_slice(&body);
        let head = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize;
        let message = rmp_serde::from_slice(&body[4..4 + head]).unwrap();
        (message, body[4 + head..].to_vec())
    }

    fn send(&mut self, m: &Message, p: &[u8]) {
        use std::io::Write;
        let f = fuzzing::encode(m, p);
        self.host.write_all(&f).unwrap();
        self.sent.extend_from_slice(&f);
    }

    fn call(&mut self, id: u64, method: &str, input: &[u8]) {
        let call = Message::Call {
            id,
            method: method.into(),
            window: 0,
            window_bytes: 0,
        };
        self.send(&call, input);
    }

    /// Reads until the reply to call `id`.
    fn reply(&mut self, id: u64) {
        loop {
            if let Message::Reply { id: got, .. } = self.read().0 {
                assert_eq!(got, id);
                return;
            }
        }
    }

    /// A ping, a cancel of a call long over, shutdown. Returns (sent, received).
    fn finish(mut self) -> (Vec<u8>, Vec<u8>) {
        self.send(&Message::Ping { seq: 7 }, &[]);
        while !matches!(self.read().0, Message::Pong { .. }) {}
        self.send(&Message::Cancel { id: 99 }, &[]);
        self.send(&Message::Shutdown { grace_ms: 0 }, &[]);
        let _ = self.child.wait();
        (self.sent, self.received)
    }
}

/// Frames of a real session with the `faulty` plugin: calls, progress, a panic, an
/// unknown method.
#[cfg(target_os = "linux")]
fn capture_session() -> (Vec<u8>, Vec<u8>) {
    let mut session = Session::start("faulty");
    let calls: &[(&str, &[u8])] = &[
        ("echo", b"hello, fuzzer"),
        ("progress", b"\x81\xa5steps\x03"),
        ("panic", b"\x81\xa7message\xa4seed"),
        ("no_such_method", b""),
    ];
    for (i, (method, input)) in calls.iter().enumerate() {
        let id = i as u64 + 1;
        session.call(id, method, input);
        session.reply(id);
    }
    session.finish()
}

/// MessagePack of a map of string keys.
#[cfg(target_os = "linux")]
fn msgpack_map(entries: Vec<(&str, Value)>) -> Vec<u8> {
    let map = Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).unwrap();
    out
}

/// Frames of a real session with the `callbacks` plugin (protocol 0.2.1): host calls
/// answered and refused, and a streaming call whose small window makes the worker wait
/// for `credit`.
#[cfg(target_os = "linux")]
fn capture_callbacks_session() -> (Vec<u8>, Vec<u8>) {
    let mut session = Session::start("callbacks");
    // A host call answered, then one refused (NOT_FOUND, with a message).
    let asks: [(&str, i32, &[u8]); 2] = [
        ("echo", 0, b"hi"),
        (
            "missing",
            plugin_api::abi::host_status::NOT_FOUND,
            b"host function `missing`: no such function",
        ),
    ];
    for (i, (function, status, answer)) in asks.into_iter().enumerate() {
        let id = i as u64 + 1;
        let input = msgpack_map(vec![
            ("function", Value::from(function)),
            ("input", Value::Binary(b"hi".to_vec())),
        ]);
        session.call(id, "ask", &input);
        loop {
            match session.read().0 {
                Message::HostCall { id: got, seq, name } => {
                    assert_eq!((got, name.as_str()), (id, function));
                    session.send(&Message::HostReply { id, seq, status }, answer);
                }
                Message::Reply { id: got, .. } => {
                    assert_eq!(got, id);
                    break;
                }
                Message::Log { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // A stream of 5 items through a window of 2: credit after every 2.
    let id = 3;
    let call = Message::Call {
        id,
        method: "count".into(),
        window: 2,
        window_bytes: 1 << 20,
    };
    session.send(&call, &msgpack_map(vec![("n", Value::from(5))]));
    let (mut items, mut bytes, mut total) = (0u32, 0u64, 0);
    loop {
        match session.read() {
            (Message::Item { id: got }, payload) => {
                assert_eq!(got, id);
                items += 1;
                total += 1;
                bytes += payload.len() as u64;
                if items == 2 {
                    session.send(&Message::Credit { id, items, bytes }, &[]);
                    (items, bytes) = (0, 0);
                }
            }
            (Message::Reply { id: got, status }, _) => {
                assert_eq!((got, status, total), (id, 0, 5));
                break;
            }
            (Message::Log { .. }, _) => {}
            (other, _) => panic!("unexpected {other:?}"),
        }
    }
    session.finish()
}

/// The seeds for single messages are golden frames: each message kind's encoding, checked
/// in. A change of encoding fails here; if it is meant, bump `protocol::VERSION` (a wire
/// change) and regenerate the corpus with `PLUGIN_HOST_WRITE_CORPUS=1 cargo test -p
/// plugin-host-tests --test fuzz golden`.
#[test]
fn golden_frames_match_the_encoder() {
    // The corpus is written on Linux (it records sessions with the worker-shim).
    #[cfg(target_os = "linux")]
    if std::env::var_os("PLUGIN_HOST_WRITE_CORPUS").is_some() {
        write_corpus();
    }
    for (name, message, _) in every_kind() {
        let path = corpus_dir("message").join(format!("{name}.bin"));
        let golden = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            head(&message),
            golden,
            "the encoding of `{name}` changed: a wire change needs a protocol version bump, \
             then PLUGIN_HOST_WRITE_CORPUS=1 to regenerate the corpus"
        );
        assert!(fuzzing::message(&golden).is_ok(), "{name} decodes");
    }
}

/// The kind of a message header (and its map), for the coverage check.
fn kind_of(head: &[u8]) -> (String, Vec<(Value, Value)>) {
    let value = rmpv::decode::read_value(&mut &head[..]).unwrap();
    let map = value.as_map().unwrap().clone();
    let kind = map
        .iter()
        .find(|(k, _)| k.as_str() == Some("kind"))
        .and_then(|(_, v)| v.as_str())
        .unwrap()
        .to_string();
    (kind, map)
}

/// The checked-in corpus covers every kind the decoder knows, a streaming `call` (with a
/// window) among them, and the recorded sessions carry the host-call and stream kinds in
/// the direction each travels.
#[test]
fn the_corpus_covers_every_kind() {
    let mut kinds = std::collections::BTreeSet::new();
    let mut windowed_call = false;
    for seed in load_corpus("message") {
        let (kind, map) = kind_of(&seed);
        windowed_call |= kind == "call"
            && map
                .iter()
                .any(|(k, v)| k.as_str() == Some("window") && v.as_u64() > Some(0));
        kinds.insert(kind);
    }
    for kind in fuzzing::KINDS {
        assert!(
            kinds.contains(*kind),
            "no `{kind}` seed in the message corpus"
        );
    }
    assert!(windowed_call, "no `call` seed with a window");
    for target in ["host_stream", "worker_stream"] {
        let seeds = load_corpus(target);
        for kind in fuzzing::KINDS {
            let covered = seeds.iter().any(|s| {
                split_frames(s)
                    .is_some_and(|frames| frames.iter().any(|(h, _)| kind_of(h).0 == *kind))
            });
            assert!(covered, "no `{kind}` frame in the {target} corpus");
        }
    }
    let session_kinds = |target: &str, name: &str| -> std::collections::BTreeSet<String> {
        let bytes = std::fs::read(corpus_dir(target).join(format!("{name}.bin"))).unwrap();
        split_frames(&bytes)
            .unwrap()
            .iter()
            .map(|(h, _)| kind_of(h).0)
            .collect()
    };
    let from_worker = session_kinds("host_stream", "session_callbacks_worker_to_host");
    for kind in ["host_call", "item", "reply"] {
        assert!(from_worker.contains(kind), "{kind}: {from_worker:?}");
    }
    let from_host = session_kinds("worker_stream", "session_callbacks_host_to_worker");
    for kind in ["host_reply", "credit", "call"] {
        assert!(from_host.contains(kind), "{kind}: {from_host:?}");
    }
}

/// Regenerates `tests/fuzz/corpus/` (see [`golden_frames_match_the_encoder`]).
#[cfg(target_os = "linux")]
fn write_corpus() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.bin")), bytes).unwrap();
    };
    for target in [
        "host_stream",
        "worker_stream",
        "message",
        "handshake",
        "manifest",
    ] {
        let _ = std::fs::remove_dir_all(corpus_dir(target));
    }
    let kinds = every_kind();
    for (name, message, payload) in &kinds {
        write("message", name, &head(message));
        let frame = fuzzing::encode(message, payload);
        write("host_stream", name, &frame);
        write("worker_stream", name, &frame);
    }
    // (Payloads past the host's 64 KiB direct-read threshold come from the mutator, which
    // resizes payloads, rather than from a large file here.)
    let (sent, received) = capture_session();
    write("host_stream", "session_worker_to_host", &received);
    write("worker_stream", "session_host_to_worker", &sent);
    let (callbacks_sent, callbacks_received) = capture_callbacks_session();
    write(
        "host_stream",
        "session_callbacks_worker_to_host",
        &callbacks_received,
    );
    write(
        "worker_stream",
        "session_callbacks_host_to_worker",
        &callbacks_sent,
    );
    // Handshakes as a worker sends them.
    let hello = protocol::hello(None, Some(4242));
    let loaded = kinds.iter().find(|k| k.0 == "loaded").unwrap().1.clone();
    let failed = kinds
        .iter()
        .find(|k| k.0 == "load_failed")
        .unwrap()
        .1
        .clone();
    let log = kinds.iter().find(|k| k.0 == "log").unwrap().1.clone();
    write(
        "handshake",
        "hello_loaded",
        &frames(&[(hello.clone(), b""), (loaded.clone(), b"")]),
    );
    write(
        "handshake",
        "hello_logs_loaded",
        &frames(&[
            (hello.clone(), b""),
            (log.clone(), b""),
            (Message::Unknown, b""),
            (loaded, b""),
        ]),
    );
    write(
        "handshake",
        "hello_load_failed",
        &frames(&[(hello, b""), (failed, b"")]),
    );
    if let Some(frames) = split_frames(&received) {
        // The real worker's hello and loaded.
        let upto = frames
            .iter()
            .position(|(h, _)| find(h, b"loaded").is_some())
            .unwrap();
        write("handshake", "session", &join_frames(&frames[..=upto]));
    }
    // (`attack`'s manifest is named so that discovery does not find it.)
    for (plugin, file) in [
        ("hello", "plugin.toml"),
        ("thumbnail", "plugin.toml"),
        ("faulty", "plugin.toml"),
        ("c-echo", "plugin.toml"),
        ("callbacks", "plugin.toml"),
        ("attack", "attack.toml"),
    ] {
        let path = common::repo().join("plugins").join(plugin).join(file);
        let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        write("manifest", plugin, &text);
    }
    let docs = std::fs::read_to_string(common::repo().join("docs/manifest.md")).unwrap();
    // The reference manifest in docs/manifest.md (its longest ```toml block).
    let block = docs
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .max_by_key(|b| b.len())
        .unwrap();
    write("manifest", "reference", block.as_bytes());
}
