//! A fake `worker-shim` for `tests/tests/hostile.rs`: it completes the handshake like the
//! real worker, then misbehaves on purpose when the first `call` arrives.
//!
//! The host starts it as `hostile-worker --fd 0 --plugin NAME --sandbox MODE`; the mode is
//! the plugin's manifest name after `hostile-` (the host clears a sandboxed worker's
//! environment, so the name is the one channel that always arrives):
//!
//! | mode | what it does |
//! |---|---|
//! | `echo` | behaves: answers every call with its input |
//! | `random` | 64 KiB of random bytes instead of a reply, then waits |
//! | `random_frame` | a frame with a valid length prefix and 4 KiB of random header bytes |
//! | `ffff` | a body length of `0xFFFFFFFF`, then waits |
//! | `unknown_kinds` | frames of unknown kinds (and unknown fields) around a correct reply |
//! | `never_sent` | a reply for an id the host never sent |
//! | `duplicate` | two replies for the call, `first` then `second`, in one write |
//! | `deep` | a reply whose header is 100,000 levels of nested arrays (`0x91`) |
//! | `stall16m` | a frame that claims 16 MiB, then nothing after its first 10 bytes |
//! | `stall16m_payload` | a reply's whole header, then 10 of its 16 MiB of payload, then nothing |
//! | `trickle` | a correct reply, one byte every 100 ms |
//! | `header16m` | a correct reply whose header carries 16 Mi `nil`s in an unknown field |
//! | `huge_methods` | (handshake) a `loaded` listing 8,000,000 empty method names |
//!
//! The modes below (host calls and output streams, protocol 0.2.1) misbehave on every call
//! of the method `attack` and answer any other method correctly, so the same plugin serves
//! an `echo` call afterwards (from the restarted worker when the host cut this one off):
//!
//! | mode | what `attack` does |
//! |---|---|
//! | `items_past_window` | 300 `item`s (8 bytes each) and a reply in one write, never waiting for `credit` |
//! | `item_bytes_past_window` | an `item` of 500 KiB, one of 600 KiB, then a reply (1.1 MiB > the 1 MiB window, unless the first was credited before the second was read) |
//! | `item_not_stream` | an `item` for the call (a plain call, not a stream), then a reply |
//! | `item_never_sent` | an `item` for an id the host never sent, then a reply |
//! | `host_call_flood` | 300 `host_call`s to `hold` (seq 1..=300) in one write; collects the `host_reply`s, replies `limit=N other=M: <first LIMIT message>` |
//! | `host_call_flood_5s` | `host_call`s to `echo` as fast as it can for 5 s (reading the answers); never replies |
//! | `host_call_flood_unread` | 200,000 `host_call`s to `echo`, and it stops reading: the host's answers fill the socket; never replies |
//! | `unknown_flood_5s` | frames of an unknown kind for 5 s (from another thread); never replies |
//! | `host_call_duplicate` | two `host_call`s to `hold` with the same (id, seq) in one write |
//! | `host_call_unknown_id` | a `host_call` for an id never sent; replies `status=S <message>` from the `host_reply` |
//! | `host_call_after_reply` | 1st `attack`: replies `first`, then a `host_call` for that call, and remembers the `host_reply`; 2nd `attack`: replies `status=S <message>` |
//! | `host_call_huge_name` | a `host_call` whose name is 5,000 bytes |
//! | `credit_from_worker` | a `credit` (a host -> worker kind), then a reply |
//! | `host_reply_from_worker` | a `host_reply` (a host -> worker kind), then a reply |
//!
//! The shared-memory modes (`shm_*`) map the region the host passes as standard output
//! (`--shm-fd 1`, mapped before anything else), announce `shm` in their `hello` and, once
//! `loaded` went out on the socket, read frames from the request ring and write them into
//! the reply ring (polling with short sleeps; it never says it sleeps, so the host never
//! rings for it; a doorbell byte when the host sleeps). Any method but `attack` is
//! answered correctly; `attack` scribbles on the region (`shm::raw`):
//!
//! | mode | what `attack` does |
//! |---|---|
//! | `shm_echo` | behaves: answers `attack` with its input too |
//! | `shm_tail_max` | sets the reply ring's write position to `u64::MAX` |
//! | `shm_tail_past` | sets the reply ring's write position to the host's read position + capacity + 1 |
//! | `shm_tail_back` | publishes a 64-byte frame of an unknown kind, waits until the host read it, then moves the reply ring's write position back one byte |
//! | `shm_scribble` | fills both rings' data with `0x02` (`raw::scribble`), then advances the reply ring's write position by 4096 bytes |
//! | `shm_ffff` | a body length of `0xFFFFFFFF` in the reply ring |
//! | `shm_never_sent` | a reply in the ring for an id the host never sent |
//! | `shm_duplicate` | two replies in the ring for the call, `first` then `second`, in one publish |
//! | `shm_head_past` | sets the request ring's read position one byte past all the host wrote; replies `poked` |
//! | `shm_head_back` | sets the request ring's read position back to 0; replies `poked` |
//! | `shm_request_tail` | sets the request ring's write position (the host's own word) to 12345; replies `poked` |
//! | `shm_control_garbage` | for 2 s, from another thread: cycles `worker_state` through 12345, `SLEEPING`, `VACANT`, `WAKING`, `u32::MAX`, `host_sleep` through 0, 1, 7, `u32::MAX`, bumps the standby word, and writes 4 KiB of doorbell bytes to the socket, round after round; replies with its input at once (and from then on rings after every publish, whatever `host_sleep` says) |
//! | `shm_never_reads` | stops reading the request ring for good once the header of the `attack` call is in (however much of its input is still to come); never replies |
//!
//! Frames: `[u32 LE body length][u32 LE header length][MessagePack header][payload]`.
//!
//! Unix only (it speaks over the socket the host hands it, and `tests/tests/hostile.rs` is
//! Linux-only): on other targets it compiles to a program that exits with status 2, so that
//! this package builds for them.
#![cfg_attr(not(unix), allow(dead_code, unused_imports))]

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{Read, Write};
#[cfg(unix)]
use std::os::fd::FromRawFd;
#[cfg(unix)]
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use plugin_host::protocol::{self, Message};
use plugin_host_tests::Rng;
use serde::Serialize;

/// Frame with a ready-made header.
fn raw_frame(head: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + head.len() + payload.len());
    out.extend_from_slice(&((4 + head.len() + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(payload);
    out
}

fn frame(message: &Message, payload: &[u8]) -> Vec<u8> {
    raw_frame(&rmp_serde::to_vec_named(message).unwrap(), payload)
}

#[cfg(unix)]
fn read_exact_or_exit(stream: &mut UnixStream, buf: &mut [u8]) {
    if stream.read_exact(buf).is_err() {
        // The host closed the connection (or killed us first): nothing left to do.
        std::process::exit(0);
    }
}

/// Reads one frame (blocking); exits quietly at end of file.
#[cfg(unix)]
fn read_frame(stream: &mut UnixStream) -> (Message, Vec<u8>) {
    let mut len = [0u8; 4];
    read_exact_or_exit(stream, &mut len);
    let body_len = u32::from_le_bytes(len) as usize;
    assert!(
        (4..=64 << 20).contains(&body_len),
        "hostile-worker: the host sent a body length of {body_len}"
    );
    let mut body = vec![0u8; body_len];
    read_exact_or_exit(stream, &mut body);
    let head_len = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize;
    let message = rmp_serde::from_slice(&body[4..4 + head_len]).unwrap_or(Message::Unknown);
    (message, body[4 + head_len..].to_vec())
}

/// Held for each write: frames from different threads must not interleave.
static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(unix)]
fn write(stream: &mut UnixStream, bytes: &[u8]) {
    let _one = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    if stream.write_all(bytes).is_err() {
        std::process::exit(0);
    }
}

/// The fields of `loaded` but `methods`, which `huge_methods` appends by hand.
#[derive(Serialize)]
struct LoadedWithoutMethods<'a> {
    kind: &'static str,
    name: &'a str,
    version: &'static str,
    abi_major: u16,
    abi_minor: u16,
    sandbox: Vec<String>,
    sandbox_missing: Vec<String>,
}

/// A message of a kind no host knows, with fields of every shape.
#[derive(Serialize)]
struct Teleport {
    kind: &'static str,
    id: u64,
    destination: &'static str,
    nested: Vec<Vec<u32>>,
}

/// A reply with an extra field the host does not know.
#[derive(Serialize)]
struct ReplyWithExtra {
    kind: &'static str,
    id: u64,
    status: i32,
    added_later: Vec<()>,
}

/// Waits for the host to close the connection (or kill us), ignoring what it sends: the
/// reader thread exits the process at end of file.
#[cfg(unix)]
fn drain(_stream: &mut UnixStream) -> ! {
    loop {
        std::thread::park();
    }
}

/// Set by `host_call_flood_unread`: the reader thread stops reading (the host's replies
/// pile up in the socket).
static STOP_READING: AtomicBool = AtomicBool::new(false);

/// The status `host_reply` carries when the host refuses a host call over its limit.
const LIMIT: i32 = plugin_api::abi::host_status::LIMIT;

/// How many host calls the host runs at once per worker; more are refused with `LIMIT`.
const HOST_CALLS_MAX: u64 = 256;

/// What the attack modes keep between frames.
struct Attacker {
    frames: Receiver<(Message, Vec<u8>)>,
    /// Frames read while an attack waited for something else (calls), handled next.
    backlog: VecDeque<(Message, Vec<u8>)>,
    /// `host_call_after_reply`: what the first attack learnt, the second one's reply.
    learnt: Option<Vec<u8>>,
}

#[cfg(unix)]
impl Attacker {
    /// The next frame from the host: the backlog first.
    fn next(&mut self) -> (Message, Vec<u8>) {
        if let Some(f) = self.backlog.pop_front() {
            return f;
        }
        self.frames.recv().unwrap_or_else(|_| std::process::exit(0))
    }

    /// Reads frames until `want` takes one, answering pings and keeping calls for later.
    /// `None` after `limit`.
    fn wait_for<T>(
        &mut self,
        stream: &mut UnixStream,
        limit: Duration,
        mut want: impl FnMut(&Message, &[u8]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (message, payload) = match self.frames.recv_timeout(left) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) => return None,
                Err(RecvTimeoutError::Disconnected) => std::process::exit(0),
            };
            if let Some(t) = want(&message, &payload) {
                return Some(t);
            }
            match message {
                Message::Ping { seq } => write(stream, &frame(&Message::Pong { seq }, b"")),
                Message::Call { .. } => self.backlog.push_back((message, payload)),
                _ => {}
            }
        }
    }

    /// Misbehaves on a call of `attack` according to `mode`.
    fn attack(&mut self, stream: &mut UnixStream, mode: &str, id: u64, input: &[u8]) {
        let reply = |id: u64, out: &[u8]| frame(&Message::Reply { id, status: 0 }, out);
        let item = |id: u64, bytes: &[u8]| frame(&Message::Item { id }, bytes);
        let host_call = |id: u64, seq: u64, name: &str, input: &[u8]| {
            frame(
                &Message::HostCall {
                    id,
                    seq,
                    name: name.to_string(),
                },
                input,
            )
        };
        let host_reply_to = |want_id: u64, want_seq: u64| {
            move |m: &Message, payload: &[u8]| match m {
                Message::HostReply { id, seq, status } if *id == want_id && *seq == want_seq => {
                    Some(format!(
                        "status={status} {}",
                        String::from_utf8_lossy(payload)
                    ))
                }
                _ => None,
            }
        };
        match mode {
            "items_past_window" => {
                // One write (about 10 KB: one socket buffer), so the host reads all of it
                // before its consumer takes an item and it grants any credit.
                let mut bytes = Vec::new();
                for i in 0..300u64 {
                    bytes.extend_from_slice(&item(id, &i.to_le_bytes()));
                }
                bytes.extend_from_slice(&reply(id, b"done"));
                write(stream, &bytes);
            }
            "item_bytes_past_window" => {
                // Past the 1 MiB window unless the host credited the first item (its
                // consumer took it and found nothing more buffered) before reading the
                // second: the test's consumer pauses after the first item to rule that out.
                let mut bytes = item(id, &vec![0xaa; 500 << 10]);
                bytes.extend_from_slice(&item(id, &vec![0xbb; 600 << 10]));
                bytes.extend_from_slice(&reply(id, b"done"));
                write(stream, &bytes);
            }
            "item_not_stream" => {
                let mut bytes = item(id, b"not a stream");
                bytes.extend_from_slice(&reply(id, b"done"));
                write(stream, &bytes);
            }
            "item_never_sent" => {
                let mut bytes = item(id + 1_000_000, b"nobody asked");
                bytes.extend_from_slice(&reply(id, b"done"));
                write(stream, &bytes);
            }
            "host_call_flood" => {
                const FLOOD: u64 = 300;
                let mut bytes = Vec::new();
                for seq in 1..=FLOOD {
                    bytes.extend_from_slice(&host_call(id, seq, "hold", &seq.to_le_bytes()));
                }
                write(stream, &bytes);
                // `hold` runs until the call ends: 256 stay outstanding, the rest must be
                // refused with LIMIT. Count what comes back; then a little longer, to see
                // anything that should not.
                let (limited, other) = (Cell::new(0u64), Cell::new(0u64));
                let first = RefCell::new(None::<String>);
                let mut count = |m: &Message, payload: &[u8]| {
                    if let Message::HostReply {
                        id: got, status, ..
                    } = m
                    {
                        if *got == id && *status == LIMIT {
                            limited.set(limited.get() + 1);
                            first.borrow_mut().get_or_insert_with(|| {
                                String::from_utf8_lossy(payload).into_owned()
                            });
                        } else if *got == id {
                            other.set(other.get() + 1);
                        }
                    }
                    None::<()>
                };
                let expected = FLOOD - HOST_CALLS_MAX;
                let started = Instant::now();
                while limited.get() < expected && started.elapsed() < Duration::from_secs(3) {
                    self.wait_for(stream, Duration::from_millis(50), &mut count);
                }
                self.wait_for(stream, Duration::from_millis(100), &mut count);
                let summary = format!(
                    "limit={} other={}: {}",
                    limited.get(),
                    other.get(),
                    first.take().unwrap_or_default()
                );
                write(stream, &reply(id, summary.as_bytes()));
            }
            "host_call_flood_unread" | "host_call_flood_5s" => {
                if mode == "host_call_flood_unread" {
                    STOP_READING.store(true, Ordering::SeqCst);
                }
                // Host calls as fast as it can, from another thread so that this one goes
                // on answering pings (and reading the answers): 200,000 of them (11 MB of
                // frames) for `host_call_flood_unread`, for 5 s for `host_call_flood_5s`.
                // Frames are a template with the seq patched in, so that writing them costs
                // the worker far less than answering them costs the host. Never replies.
                let template = host_call(id, u64::MAX, "echo", b"");
                let at = template
                    .windows(9)
                    .position(|w| w == [0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
                    .expect("seq u64::MAX is 0xcf and 8 bytes")
                    + 1;
                let mut writer = stream.try_clone().unwrap();
                let started = Instant::now();
                let batches = if mode == "host_call_flood_unread" {
                    200
                } else {
                    u64::MAX
                };
                std::thread::spawn(move || {
                    let mut bytes = template.repeat(1000);
                    for batch in 0..batches {
                        if started.elapsed() > Duration::from_secs(5) {
                            break;
                        }
                        for (i, frame) in bytes.chunks_mut(template.len()).enumerate() {
                            let seq = batch * 1000 + i as u64 + 1;
                            frame[at..at + 8].copy_from_slice(&seq.to_be_bytes());
                        }
                        write(&mut writer, &bytes);
                    }
                });
            }
            "unknown_flood_5s" => {
                // Frames of an unknown kind (which the host ignores) for 5 s, from another
                // thread; never replies.
                let mut writer = stream.try_clone().unwrap();
                let teleport = Teleport {
                    kind: "teleport",
                    id,
                    destination: "mars",
                    nested: vec![],
                };
                let one = raw_frame(&rmp_serde::to_vec_named(&teleport).unwrap(), b"");
                let bytes = one.repeat(1000);
                let started = Instant::now();
                std::thread::spawn(move || {
                    while started.elapsed() < Duration::from_secs(5) {
                        write(&mut writer, &bytes);
                    }
                });
            }
            "host_call_duplicate" => {
                let mut bytes = host_call(id, 7, "hold", b"first");
                bytes.extend_from_slice(&host_call(id, 7, "hold", b"second"));
                write(stream, &bytes);
            }
            "host_call_unknown_id" => {
                let bogus = id + 1_000_000;
                write(stream, &host_call(bogus, 1, "echo", b"for nobody"));
                let got = self
                    .wait_for(stream, Duration::from_secs(3), host_reply_to(bogus, 1))
                    .unwrap_or_else(|| "no host_reply".into());
                write(stream, &reply(id, got.as_bytes()));
            }
            "host_call_after_reply" => {
                if let Some(learnt) = self.learnt.take() {
                    write(stream, &reply(id, &learnt));
                    return;
                }
                let mut bytes = reply(id, b"first");
                bytes.extend_from_slice(&host_call(id, 1, "echo", b"too late"));
                write(stream, &bytes);
                let got = self
                    .wait_for(stream, Duration::from_secs(3), host_reply_to(id, 1))
                    .unwrap_or_else(|| "no host_reply".into());
                self.learnt = Some(got.into_bytes());
            }
            "host_call_huge_name" => {
                write(stream, &host_call(id, 1, &"n".repeat(5000), b""));
            }
            "credit_from_worker" => {
                let mut bytes = frame(
                    &Message::Credit {
                        id,
                        items: 1,
                        bytes: 1,
                    },
                    b"",
                );
                bytes.extend_from_slice(&reply(id, b"done"));
                write(stream, &bytes);
            }
            "host_reply_from_worker" => {
                let mut bytes = frame(
                    &Message::HostReply {
                        id,
                        seq: 1,
                        status: 0,
                    },
                    b"unasked",
                );
                bytes.extend_from_slice(&reply(id, b"done"));
                write(stream, &bytes);
            }
            _ => write(stream, &reply(id, input)),
        }
    }
}

#[cfg(unix)]
fn misbehave(stream: &mut UnixStream, mode: &str, id: u64, input: &[u8]) {
    let reply = |id: u64| Message::Reply { id, status: 0 };
    match mode {
        "random" => {
            // 64 KiB of random bytes...
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let bytes: Vec<u8> = (0..64 * 1024).map(|_| rng.bits() as u8).collect();
            write(stream, &bytes);
            drain(stream);
        }
        "random_frame" => {
            // ... and random bytes behind a valid length prefix, so they reach the decoder.
            let mut rng = Rng(0x2545_f491_4f6c_dd1d);
            let head: Vec<u8> = (0..4096).map(|_| rng.bits() as u8).collect();
            write(stream, &raw_frame(&head, &head));
            drain(stream);
        }
        "ffff" => {
            write(stream, &u32::MAX.to_le_bytes());
            drain(stream);
        }
        "unknown_kinds" => {
            let teleport = Teleport {
                kind: "teleport",
                id,
                destination: "mars",
                nested: vec![vec![1, 2], vec![]],
            };
            let head = rmp_serde::to_vec_named(&teleport).unwrap();
            write(stream, &raw_frame(&head, b"unknown payload"));
            let mut map = vec![0x81];
            map.extend_from_slice(b"\xa4kind\xa0");
            write(stream, &raw_frame(&map, b""));
            let extra = ReplyWithExtra {
                kind: "reply",
                id,
                status: 0,
                added_later: vec![(); 3],
            };
            let head = rmp_serde::to_vec_named(&extra).unwrap();
            write(stream, &raw_frame(&head, input));
        }
        "never_sent" => write(stream, &frame(&reply(id + 1_000_000), b"nobody asked")),
        "duplicate" => {
            let mut both = frame(&reply(id), b"first");
            both.extend_from_slice(&frame(&reply(id), b"second"));
            write(stream, &both);
        }
        "deep" => {
            let mut head = vec![0x91u8; 100_000];
            head.push(0xc0);
            write(stream, &raw_frame(&head, b""));
            drain(stream);
        }
        "stall16m" => {
            // Body 16 MiB, a 20-byte header of which 2 bytes arrive, then nothing.
            let mut bytes = (16u32 << 20).to_le_bytes().to_vec();
            bytes.extend_from_slice(&20u32.to_le_bytes());
            bytes.extend_from_slice(&[0x83, 0xa4]);
            write(stream, &bytes);
            drain(stream);
        }
        "stall16m_payload" => {
            // A whole, valid reply header for the call, a 16 MiB payload of which 10 bytes
            // arrive, then nothing.
            let head = rmp_serde::to_vec_named(&reply(id)).unwrap();
            let mut bytes = ((4 + head.len()) as u32 + (16 << 20))
                .to_le_bytes()
                .to_vec();
            bytes.extend_from_slice(&(head.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&head);
            bytes.extend_from_slice(b"0123456789");
            write(stream, &bytes);
            drain(stream);
        }
        "trickle" => {
            let bytes = frame(&reply(id), input);
            let mut writer = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                for b in bytes {
                    if writer.write_all(&[b]).is_err() {
                        std::process::exit(0);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            drain(stream);
        }
        "header16m" => {
            // {"kind": "reply", "id": id, "status": 0, "junk": [nil x 16 Mi]}
            let mut head = rmp_serde::to_vec_named(&reply(id)).unwrap();
            assert_eq!(head[0], 0x83);
            head[0] = 0x84;
            head.extend_from_slice(b"\xa4junk\xdd");
            let count = (16u32 << 20) - 64;
            head.extend_from_slice(&count.to_be_bytes());
            head.resize(head.len() + count as usize, 0xc0);
            write(stream, &raw_frame(&head, input));
        }
        _ => write(stream, &frame(&reply(id), input)),
    }
}

#[cfg(not(unix))]
fn main() {
    eprintln!("hostile-worker: Unix only");
    std::process::exit(2);
}

#[cfg(unix)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let fd: i32 = arg("--fd")
        .and_then(|f| f.parse().ok())
        .expect("hostile-worker: --fd N");
    let plugin = arg("--plugin").unwrap_or_default();
    let mode = plugin
        .strip_prefix("hostile-")
        .unwrap_or("echo")
        .to_string();
    // The shared region arrives as standard output (`--shm-fd 1`): mapped before anything
    // could write there. Only the `shm_*` modes use it.
    #[cfg(target_os = "linux")]
    let region = arg("--shm-fd")
        .filter(|_| mode.starts_with("shm_"))
        .and_then(|fd| shm_attacks::map(&fd));
    #[cfg(not(target_os = "linux"))]
    let region: Option<()> = None;
    // SAFETY: the host handed us this descriptor (our end of the socket pair); nothing else
    // in this process owns it.
    let mut stream = unsafe { UnixStream::from_raw_fd(fd) };

    let mut hello = protocol::hello(None, Some(std::process::id()));
    if let (Some(_), Message::Hello { features, .. }) = (&region, &mut hello) {
        features.push(protocol::FEATURE_SHM.to_string());
    }
    write(&mut stream, &frame(&hello, b""));
    let (host_hello, _) = read_frame(&mut stream);
    let Message::Hello { features, .. } = host_hello else {
        panic!("hostile-worker: expected hello, got {host_hello:?}");
    };
    // Shared memory when both sides announce it.
    let region = region.filter(|_| features.iter().any(|f| f == protocol::FEATURE_SHM));
    let (load, _config) = read_frame(&mut stream);
    let Message::Load { name, .. } = load else {
        panic!("hostile-worker: expected load, got {load:?}");
    };
    let fields = LoadedWithoutMethods {
        kind: "loaded",
        name: &name,
        version: "0.1.0",
        abi_major: plugin_api::abi::ABI_MAJOR,
        abi_minor: plugin_api::abi::ABI_MINOR,
        sandbox: Vec::new(),
        sandbox_missing: Vec::new(),
    };
    let mut head = rmp_serde::to_vec_named(&fields).unwrap();
    assert_eq!(head[0], 0x87, "a fixmap of seven fields");
    head[0] = 0x88;
    head.extend_from_slice(b"\xa7methods");
    if mode == "huge_methods" {
        let count: u32 = 8_000_000;
        head.push(0xdd);
        head.extend_from_slice(&count.to_be_bytes());
        head.resize(head.len() + count as usize, 0xa0);
    } else {
        head.push(0x93);
        head.extend_from_slice(b"\xa4echo\xa4ping\xa6attack");
    }
    write(&mut stream, &raw_frame(&head, b""));

    // From here on, frames travel through the rings (the socket carries doorbells only).
    #[cfg(target_os = "linux")]
    if let Some(region) = region {
        shm_attacks::ShmPeer::new(region, &stream, &mode).serve();
    }
    #[cfg(not(target_os = "linux"))]
    let _ = region;

    // A reader thread hands the host's frames over, so attacks can wait with a timeout;
    // it exits the process at end of file.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = stream.try_clone().unwrap();
    std::thread::spawn(move || loop {
        if STOP_READING.load(Ordering::SeqCst) {
            std::thread::park();
            continue;
        }
        if tx.send(read_frame(&mut reader)).is_err() {
            return;
        }
    });
    let mut attacker = Attacker {
        frames: rx,
        backlog: VecDeque::new(),
        learnt: None,
    };
    let mut misbehaved = false;
    loop {
        let (message, payload) = attacker.next();
        match message {
            Message::Ping { seq } => write(&mut stream, &frame(&Message::Pong { seq }, b"")),
            Message::Call { id, method, .. } if method == "attack" => {
                attacker.attack(&mut stream, &mode, id, &payload);
            }
            Message::Call { id, .. } if !misbehaved => {
                misbehaved = true;
                misbehave(&mut stream, &mode, id, &payload);
            }
            Message::Call { id, .. } => write(
                &mut stream,
                &frame(&Message::Reply { id, status: 0 }, &payload),
            ),
            Message::Shutdown { .. } => std::process::exit(0),
            _ => {}
        }
    }
}

/// The shared-memory modes (`shm_*`): after `Loaded`, frames go through the region's
/// rings, read by polling (the worker never says it sleeps, so the host never rings its
/// doorbell) and written with `RingWriter::try_write`, plus a doorbell byte when the host
/// sleeps. The attacks scribble on the region's words and bytes directly.
#[cfg(target_os = "linux")]
mod shm_attacks {
    use super::*;
    use plugin_host::protocol::shm::{self, raw, Region, Ring, RingReader, RingWriter};
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::sync::atomic::{fence, Ordering::SeqCst};
    use std::sync::Arc;

    /// How long `shm_control_garbage` keeps scribbling on the control words and flooding
    /// the socket with doorbells after its `attack`.
    const GARBAGE_FOR: Duration = Duration::from_secs(2);

    /// The bytes of `shm_scribble`: both rings are filled with it, so the frame the host
    /// reads declares a body of `0x02020202` bytes and a header of as many.
    const SCRIBBLE: u8 = 0x02;

    /// Maps the region the host passed as descriptor `fd` (`--shm-fd`, our standard
    /// output). Called first thing, before anything could write to standard output.
    pub fn map(fd: &str) -> Option<Arc<Region>> {
        let fd: i32 = fd.parse().ok().filter(|&fd| fd >= 0)?;
        // SAFETY: the host passed this descriptor and nothing in this process closes or
        // replaces it; the borrow only lives for `open` (the mapping outlives it).
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        match Region::open(fd) {
            Ok(region) => Some(region),
            Err(e) => {
                eprintln!("hostile-worker: cannot map the shared region: {e}");
                None
            }
        }
    }

    /// One byte (or more) on the socket without blocking: a full socket already holds
    /// doorbells enough.
    fn doorbell(sock: &UnixStream, bytes: &[u8]) {
        // SAFETY: `sock` is an open socket for the call; `bytes` is valid for its length.
        unsafe {
            libc::send(
                sock.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }

    /// The worker's end of the rings.
    pub struct ShmPeer {
        region: Arc<Region>,
        rx: RingReader,
        tx: RingWriter,
        sock: UnixStream,
        /// Bytes read from the request ring and not yet taken as frames.
        buf: Vec<u8>,
        /// Bytes read from the request ring so far: the worker's real read position.
        read: u64,
        /// Bytes published in the reply ring so far: the worker's real write position.
        written: u64,
        /// Ring the doorbell after every write, whatever `host_sleep` says (the worker
        /// scribbles on `host_sleep` itself).
        always_ring: bool,
        mode: String,
    }

    impl ShmPeer {
        /// Takes over after `Loaded`. A thread reads the socket (doorbells, if the host
        /// ever sends any) and exits the process at its end.
        pub fn new(region: Arc<Region>, stream: &UnixStream, mode: &str) -> ShmPeer {
            let mut bells = stream.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    match bells.read(&mut buf) {
                        Ok(0) => std::process::exit(0),
                        Ok(_) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => std::process::exit(0),
                    }
                }
            });
            ShmPeer {
                rx: region.reader(Ring::Request),
                tx: region.writer(Ring::Reply),
                region,
                sock: stream.try_clone().unwrap(),
                buf: Vec::new(),
                read: 0,
                written: 0,
                always_ring: false,
                mode: mode.to_string(),
            }
        }

        /// After publishing: a host asleep on the socket gets a doorbell.
        fn wake_host(&self) {
            fence(SeqCst);
            if self.region.host_sleep().swap(0, SeqCst) == 1 || self.always_ring {
                doorbell(&self.sock, &[1]);
            }
        }

        /// Publishes `bytes` in the reply ring (waiting for room), waking the host.
        fn publish(&mut self, bytes: &[u8]) {
            let mut rest = bytes;
            while !rest.is_empty() {
                match self.tx.try_write(&[rest]) {
                    Ok(n) => {
                        rest = &rest[n..];
                        self.written += n as u64;
                        self.wake_host();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.wake_host();
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(e) => {
                        eprintln!("hostile-worker: writing the reply ring: {e}");
                        std::process::exit(0);
                    }
                }
            }
        }

        /// The host's read position in the reply ring.
        fn host_read(&mut self) -> u64 {
            self.written - self.tx.unread().expect("the host's read position") as u64
        }

        /// Waits (at most `limit`) until the host has read everything published.
        fn wait_consumed(&mut self, limit: Duration) {
            let started = Instant::now();
            while self.tx.unread().is_ok_and(|n| n > 0) && started.elapsed() < limit {
                std::thread::sleep(Duration::from_micros(100));
            }
        }

        /// Moves what the request ring holds (64 KiB at most) into `buf`; false when it
        /// was empty.
        fn pull(&mut self) -> bool {
            let mut chunk = vec![0u8; 64 * 1024];
            match self.rx.read(&mut chunk) {
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.read += n as u64;
                    true
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                Err(e) => {
                    eprintln!("hostile-worker: reading the request ring: {e}");
                    std::process::exit(0);
                }
            }
        }

        /// The header of the frame at the front of `buf`, once it is all in.
        fn front_header(&self) -> Option<Message> {
            let head_len = u32::from_le_bytes(self.buf.get(4..8)?.try_into().unwrap()) as usize;
            let head = self.buf.get(8..8 + head_len)?;
            Some(rmp_serde::from_slice(head).unwrap_or(Message::Unknown))
        }

        /// The frame at the front of `buf`, once it is all in.
        fn take_frame(&mut self) -> Option<(Message, Vec<u8>)> {
            let body_len = u32::from_le_bytes(self.buf.get(0..4)?.try_into().unwrap()) as usize;
            if self.buf.len() < 4 + body_len {
                return None;
            }
            let message = self.front_header()?;
            let head_len = u32::from_le_bytes(self.buf[4..8].try_into().unwrap()) as usize;
            let payload = self.buf[8 + head_len..4 + body_len].to_vec();
            self.buf.drain(..4 + body_len);
            Some((message, payload))
        }

        /// The next frame from the host: polls the request ring with short sleeps.
        /// `shm_never_reads` stops here for good as soon as the header of a call of
        /// `attack` is in (however much of its input is still to come).
        fn next_frame(&mut self) -> (Message, Vec<u8>) {
            loop {
                if self.mode == "shm_never_reads" {
                    if let Some(Message::Call { method, .. }) = self.front_header() {
                        if method == "attack" {
                            loop {
                                std::thread::park();
                            }
                        }
                    }
                }
                if let Some(frame) = self.take_frame() {
                    return frame;
                }
                if !self.pull() {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }

        /// Serves the host through the rings until it goes away.
        pub fn serve(mut self) -> ! {
            loop {
                let (message, payload) = self.next_frame();
                match message {
                    Message::Ping { seq } => self.publish(&frame(&Message::Pong { seq }, b"")),
                    Message::Call { id, method, .. } if method == "attack" => {
                        self.attack(id, &payload)
                    }
                    Message::Call { id, .. } => {
                        self.publish(&frame(&Message::Reply { id, status: 0 }, &payload))
                    }
                    Message::Shutdown { .. } => std::process::exit(0),
                    _ => {}
                }
            }
        }

        fn attack(&mut self, id: u64, input: &[u8]) {
            let reply = |id: u64, out: &[u8]| frame(&Message::Reply { id, status: 0 }, out);
            let capacity = self.region.capacity() as u64;
            match self.mode.as_str() {
                "shm_tail_max" => {
                    raw::poke(&self.region, "reply_tail", u64::MAX);
                    self.wake_host();
                }
                "shm_tail_past" => {
                    let host = self.host_read();
                    raw::poke(&self.region, "reply_tail", host + capacity + 1);
                    self.wake_host();
                }
                "shm_tail_back" => {
                    // A frame of 64 bytes the host ignores (an unknown kind), read by the
                    // host; then the write position one byte back.
                    let head = b"\x81\xa4kind\xa8teleport";
                    let filler = [b'.'; 64 - 8 - 15];
                    let bytes = raw_frame(head, &filler);
                    assert_eq!(bytes.len(), 64);
                    self.publish(&bytes);
                    self.wait_consumed(Duration::from_secs(1));
                    raw::poke(&self.region, "reply_tail", self.written - 1);
                    self.wake_host();
                }
                "shm_scribble" => {
                    raw::scribble(&self.region, SCRIBBLE);
                    raw::poke(&self.region, "reply_tail", self.written + 4096);
                    self.wake_host();
                }
                "shm_ffff" => self.publish(&u32::MAX.to_le_bytes()),
                "shm_never_sent" => self.publish(&reply(id + 1_000_000, b"nobody asked")),
                "shm_duplicate" => {
                    let mut both = reply(id, b"first");
                    both.extend_from_slice(&reply(id, b"second"));
                    self.publish(&both);
                }
                "shm_head_past" => {
                    // One byte past everything the host wrote.
                    raw::poke(&self.region, "request_head", self.read + 1);
                    self.publish(&reply(id, b"poked"));
                }
                "shm_head_back" => {
                    raw::poke(&self.region, "request_head", 0);
                    self.publish(&reply(id, b"poked"));
                }
                "shm_request_tail" => {
                    raw::poke(&self.region, "request_tail", 12345);
                    self.publish(&reply(id, b"poked"));
                }
                "shm_control_garbage" => {
                    self.always_ring = true;
                    let region = self.region.clone();
                    let sock = self.sock.try_clone().unwrap();
                    std::thread::spawn(move || {
                        use shm::worker_state::{SLEEPING, VACANT, WAKING};
                        let states = [12345, SLEEPING, VACANT, WAKING, u32::MAX];
                        let sleeps = [0, 1, 7, u32::MAX];
                        let bells = [0x5au8; 4096];
                        let started = Instant::now();
                        let mut i = 0usize;
                        while started.elapsed() < GARBAGE_FOR {
                            raw::poke(&region, "worker_state", states[i % states.len()].into());
                            raw::poke(&region, "host_sleep", sleeps[i % sleeps.len()].into());
                            raw::poke(&region, "standby", i as u64);
                            doorbell(&sock, &bells);
                            i += 1;
                            std::thread::yield_now();
                        }
                        raw::poke(&region, "worker_state", 12345);
                    });
                    self.publish(&reply(id, input));
                }
                _ => self.publish(&reply(id, input)),
            }
        }
    }
}
