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
//! Frames: `[u32 LE body length][u32 LE header length][MessagePack header][payload]`.

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

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

fn read_exact_or_exit(stream: &mut UnixStream, buf: &mut [u8]) {
    if stream.read_exact(buf).is_err() {
        // The host closed the connection (or killed us first): nothing left to do.
        std::process::exit(0);
    }
}

/// Reads one frame (blocking); exits quietly at end of file.
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

fn write(stream: &mut UnixStream, bytes: &[u8]) {
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

/// Waits for the host to close the connection (or kill us), ignoring what it sends.
fn drain(stream: &mut UnixStream) -> ! {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => std::process::exit(0),
            Ok(_) => {}
        }
    }
}

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
    // SAFETY: the host handed us this descriptor (our end of the socket pair); nothing else
    // in this process owns it.
    let mut stream = unsafe { UnixStream::from_raw_fd(fd) };

    let hello = protocol::hello(None, Some(std::process::id()));
    write(&mut stream, &frame(&hello, b""));
    let (host_hello, _) = read_frame(&mut stream);
    assert!(
        matches!(host_hello, Message::Hello { .. }),
        "hostile-worker: expected hello, got {host_hello:?}"
    );
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
        head.push(0x92);
        head.extend_from_slice(b"\xa4echo\xa4ping");
    }
    write(&mut stream, &raw_frame(&head, b""));

    let mut misbehaved = false;
    loop {
        let (message, payload) = read_frame(&mut stream);
        match message {
            Message::Ping { seq } => write(&mut stream, &frame(&Message::Pong { seq }, b"")),
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
