//! The wire protocol between the host and a `worker-shim`: messages, framing and the
//! handshake. Shared by both sides; `docs/protocol.md` describes it for other
//! implementations.
//!
//! The protocol has its own semver ([`VERSION`]), separate from the crates' versions.
//!
//! This crate is used by both sides (the host library and the worker) and depends on
//! nothing of either. A frame is a little-endian `u32` length, a MessagePack map (the
//! [`Message`]) and the bulk bytes beside it:
//!
//! ```
//! use plugin_host_protocol::frame::{read_frame, write_frame};
//! use plugin_host_protocol::{check_hello, hello, Message};
//!
//! let mut wire = Vec::new();
//! write_frame(&mut wire, &hello(None, None), &[]).unwrap();
//! let call = Message::Call { id: 7, method: "greet".into(), window: 0, window_bytes: 0 };
//! write_frame(&mut wire, &call, b"input").unwrap();
//!
//! let mut reader = &wire[..];
//! let first = read_frame(&mut reader, 64 * 1024).unwrap();
//! let Message::Hello { protocol, version, .. } = first.message else { panic!() };
//! assert!(check_hello(&protocol, &version).is_ok());
//! let call = read_frame(&mut reader, 64 * 1024).unwrap();
//! assert_eq!(call.message, Message::Call { id: 7, method: "greet".into(), window: 0, window_bytes: 0 });
//! assert_eq!(call.payload, b"input");
//! ```

mod decode;
pub mod frame;
#[cfg(target_os = "linux")]
pub mod shm;

use serde::{Deserialize, Serialize};

/// The protocol's name, sent in every `Hello`.
pub const PROTOCOL: &str = "plugin-host-ipc";

/// The protocol version this build speaks.
///
/// While the major is 0, the patch position plays the role of the minor: `0.2.1` adds
/// host calls and output streams (announced as the `host_call` and `stream` features) and
/// `0.2.2` the shared-memory transport (`shm`) to `0.2.0`, and peers of these versions
/// still talk (each uses a feature only when both sides announce it).
pub const VERSION: &str = "0.2.2";

/// Features this build offers. Unknown features from the peer are ignored.
pub const FEATURES: &[&str] = &["cancel", "progress", "log", "ping", "host_call", "stream"];

/// Feature: `HostCall`/`HostReply` (plugins calling host functions).
pub const FEATURE_HOST_CALL: &str = "host_call";
/// Feature: `Item`/`Credit` and streaming calls.
pub const FEATURE_STREAM: &str = "stream";
/// Feature: after `Loaded`, frames travel through shared-memory rings ([`shm`], Linux);
/// announced by a host that created a region and a worker that mapped it.
pub const FEATURE_SHM: &str = "shm";

/// Room left in a frame for the message header beside a call's input or a reply's output:
/// a payload larger than `max_frame - FRAME_ROOM` is refused before it is sent.
pub const FRAME_ROOM: u64 = 1024;

/// Largest frame accepted before the `Load` message negotiates the real limit (the
/// `Hello`s).
pub const HANDSHAKE_MAX_FRAME: u32 = 64 * 1024;

/// Largest frame the host accepts from a worker while it loads the plugin (its logs from
/// `create`, then `Loaded` or `LoadFailed`), before the negotiated limit applies to calls.
pub const LOAD_MAX_FRAME: u32 = 256 * 1024;

/// One message. Encoded as a MessagePack map with a `kind` field, so fields can be added
/// without breaking older peers; an unknown `kind` decodes as [`Message::Unknown`] and is
/// ignored. Bulk bytes (call input, reply output, configuration) travel beside the message
/// in the frame's payload, not inside it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// First message in each direction.
    Hello {
        /// Always [`PROTOCOL`].
        protocol: String,
        /// The sender's protocol version (semver).
        version: String,
        /// Optional capabilities.
        #[serde(default)]
        features: Vec<String>,
        /// Worker -> host: the one-time token the host handed to the worker.
        #[serde(default)]
        token: Option<String>,
        /// Worker -> host: the worker's process id.
        #[serde(default)]
        pid: Option<u32>,
    },
    /// Host -> worker: load this library. Payload: the MessagePack configuration.
    Load {
        /// The plugin's manifest name (for logs and errors).
        name: String,
        /// Absolute path of the library.
        library: String,
        /// Largest frame either side may send from now on.
        max_frame: u64,
        /// How many calls the worker runs at once.
        concurrency: u32,
        /// Resource limits to apply before loading.
        #[serde(default)]
        limits: WireLimits,
        /// The sandbox to enter before loading (absent: none).
        #[serde(default)]
        sandbox: Option<WireSandbox>,
    },
    /// Worker -> host: the plugin is ready.
    Loaded {
        /// The name the library declares.
        name: String,
        /// The version the library declares.
        version: String,
        /// ABI major the library was built against.
        abi_major: u16,
        /// ABI minor the library was built against.
        abi_minor: u16,
        /// Method names.
        methods: Vec<String>,
        /// The sandbox layers in force in the process that runs the plugin.
        #[serde(default)]
        sandbox: Vec<String>,
        /// Layers that could not be applied (best-effort mode), each `layer: why`.
        #[serde(default)]
        sandbox_missing: Vec<String>,
    },
    /// Worker -> host: loading failed.
    LoadFailed {
        /// One of `not_found`, `not_a_library`, `entry_missing`, `bad_descriptor`,
        /// `abi_mismatch`, `create_failed`, `create_panicked`, `limits`.
        reason: String,
        /// Human-readable detail.
        message: String,
        /// For `abi_mismatch`: the library's (major, minor).
        #[serde(default)]
        abi: Option<(u16, u16)>,
    },
    /// Host -> worker: run a method. Payload: the input bytes.
    Call {
        /// Unique per connection, chosen by the host.
        id: u64,
        /// The method name.
        method: String,
        /// For a streaming call (feature `stream`): how many items the worker may send
        /// before the host grants more with `Credit`. 0 (absent): not a stream.
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        window: u32,
        /// For a streaming call: how many item bytes the worker may send before the host
        /// grants more (one item may exceed it when no other is outstanding).
        #[serde(default, skip_serializing_if = "is_zero_u64")]
        window_bytes: u64,
    },
    /// Worker -> host: a call's outcome. Payload: output bytes, or a UTF-8 message.
    Reply {
        /// The call's id.
        id: u64,
        /// The ABI status code (`plugin_api::abi::status`).
        status: i32,
    },
    /// Host -> worker: the caller gave up on this call.
    Cancel {
        /// The call's id.
        id: u64,
    },
    /// Worker -> host: progress of a call.
    Event {
        /// The call's id.
        id: u64,
        /// Fraction done, negative if unknown.
        fraction: f64,
        /// What the plugin is doing.
        message: String,
    },
    /// Worker -> host: a log record.
    Log {
        /// `plugin_api::abi::level`.
        level: u32,
        /// The text.
        message: String,
        /// The call it was emitted from, if any.
        #[serde(default)]
        call: Option<u64>,
    },
    /// Worker -> host (feature `host_call`): the plugin, running call `id`, calls the
    /// host function `name`. Payload: the input bytes. Answered by `HostReply` with the
    /// same `id` and `seq`.
    HostCall {
        /// The plugin call that makes it.
        id: u64,
        /// Unique among this call's host calls.
        seq: u64,
        /// The host function's name.
        name: String,
    },
    /// Host -> worker: a host call's outcome. Payload: output bytes, or a UTF-8 message.
    HostReply {
        /// The plugin call.
        id: u64,
        /// The host call's `seq`.
        seq: u64,
        /// A `plugin_api::abi::host_status` code.
        status: i32,
    },
    /// Worker -> host (feature `stream`): one item of streaming call `id`. Payload: the
    /// item's bytes.
    Item {
        /// The streaming call.
        id: u64,
    },
    /// Host -> worker: the consumer took `items` items of `bytes` bytes from streaming
    /// call `id`; the worker may send that much more.
    Credit {
        /// The streaming call.
        id: u64,
        /// Items consumed since the last credit.
        items: u32,
        /// Bytes consumed since the last credit.
        bytes: u64,
    },
    /// Host -> worker liveness check; the worker answers with `Pong` carrying the same
    /// `seq`. (A `Ping` from a worker is ignored.)
    Ping {
        /// Echoed back.
        seq: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// The `Ping`'s `seq`.
        seq: u64,
    },
    /// Host -> worker: finish running calls within `grace_ms`, then exit.
    Shutdown {
        /// Milliseconds.
        grace_ms: u64,
    },
    /// A message kind this build does not know; ignored.
    #[serde(other)]
    Unknown,
}

/// The header of a [`Message::Call`] with the method borrowed: it encodes to exactly the
/// bytes the message does (same `kind`, fields and order), without building a `String`
/// on every call.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "kind", rename = "call")]
pub struct CallHead<'a> {
    /// As in [`Message::Call`].
    pub id: u64,
    /// As in [`Message::Call`].
    pub method: &'a str,
    /// As in [`Message::Call`].
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub window: u32,
    /// As in [`Message::Call`].
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub window_bytes: u64,
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// Resource limits as sent in `Load`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLimits {
    /// Address space in bytes.
    pub memory: Option<u64>,
    /// CPU seconds.
    pub cpu_seconds: Option<u64>,
    /// Open file descriptors.
    pub open_files: Option<u64>,
    /// Allow core files.
    #[serde(default)]
    pub core_dumps: bool,
}

/// The sandbox as sent in `Load`: the effective grant, with placeholders already expanded
/// to absolute paths by the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireSandbox {
    /// `"required"` or `"best-effort"` (`"off"` is sent as no sandbox at all).
    pub mode: String,
    /// Paths the plugin may read (its library's directory included by the host).
    #[serde(default)]
    pub read: Vec<String>,
    /// Paths the plugin may write.
    #[serde(default)]
    pub write: Vec<String>,
    /// Network sockets allowed.
    #[serde(default)]
    pub network: bool,
    /// `execve` allowed.
    #[serde(default)]
    pub exec: bool,
    /// Threads and processes the plugin may start beyond the worker's own.
    #[serde(default)]
    pub tasks: u32,
}

/// Socket buffer size both sides ask for: a 1 MiB payload then crosses in a few large
/// chunks instead of many 200 KiB ones, each costing a wake-up of the other side. The
/// kernel caps it at `net.core.wmem_max`/`rmem_max`; failures are ignored.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Applies [`SOCKET_BUFFER`] to a connected Unix socket.
#[cfg(unix)]
pub fn tune_socket(fd: impl std::os::fd::AsFd) {
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, SOCKET_BUFFER);
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, SOCKET_BUFFER);
}

/// Whether a peer speaking `theirs` can talk to us: same major, and the same minor while
/// the major is 0.
pub fn compatible(ours: &semver::Version, theirs: &semver::Version) -> bool {
    ours.major == theirs.major && (ours.major != 0 || ours.minor == theirs.minor)
}

/// A `Hello` from this build.
pub fn hello(token: Option<String>, pid: Option<u32>) -> Message {
    Message::Hello {
        protocol: PROTOCOL.to_string(),
        version: VERSION.to_string(),
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
        token,
        pid,
    }
}

/// Checks a peer's `Hello` fields; the error names both versions.
pub fn check_hello(protocol: &str, version: &str) -> Result<(), String> {
    if protocol != PROTOCOL {
        return Err(format!(
            "peer speaks protocol `{protocol}`, expected `{PROTOCOL}`"
        ));
    }
    let ours = semver::Version::parse(VERSION).expect("VERSION is valid semver");
    let theirs = semver::Version::parse(version)
        .map_err(|e| format!("peer sent protocol version `{version}`, which is not semver: {e}"))?;
    if !compatible(&ours, &theirs) {
        return Err(format!(
            "protocol version mismatch: host speaks {PROTOCOL} {ours}, worker speaks {theirs}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_follows_semver_with_zero_major_rule() {
        let v = |s: &str| semver::Version::parse(s).unwrap();
        assert!(compatible(&v("1.2.0"), &v("1.0.5")));
        assert!(!compatible(&v("1.2.0"), &v("2.0.0")));
        assert!(compatible(&v("0.3.0"), &v("0.3.9")));
        assert!(!compatible(&v("0.3.0"), &v("0.4.0")));
    }

    #[test]
    fn unknown_kinds_decode_as_unknown() {
        #[derive(Serialize)]
        struct Future {
            kind: &'static str,
            x: u32,
        }
        let bytes = rmp_serde::to_vec_named(&Future {
            kind: "teleport",
            x: 1,
        })
        .unwrap();
        let msg: Message = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(msg, Message::Unknown);
    }

    #[test]
    fn messages_round_trip_and_tolerate_unknown_fields() {
        #[derive(Serialize)]
        struct Newer {
            kind: &'static str,
            id: u64,
            status: i32,
            added_later: bool,
        }
        let bytes = rmp_serde::to_vec_named(&Newer {
            kind: "reply",
            id: 7,
            status: 0,
            added_later: true,
        })
        .unwrap();
        let msg: Message = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(msg, Message::Reply { id: 7, status: 0 });
        let hello = hello(Some("t".into()), Some(3));
        let back: Message =
            rmp_serde::from_slice(&rmp_serde::to_vec_named(&hello).unwrap()).unwrap();
        assert_eq!(back, hello);
    }

    #[test]
    fn hello_mismatch_names_both_versions() {
        let err = check_hello(PROTOCOL, "9.0.0").unwrap_err();
        assert!(err.contains(VERSION) && err.contains("9.0.0"), "{err}");
        assert!(check_hello("http", VERSION).is_err());
        assert!(check_hello(PROTOCOL, VERSION).is_ok());
    }
}

/// Entry points for fuzzing the decoders from outside the crate (`tests/tests/fuzz.rs`).
/// Not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use super::frame::{read_frame, FrameBuffer, FrameError};
    use super::Message;

    /// The host's incremental frame reader fed `bytes` in reads of at most `chunk` bytes,
    /// decoding every frame. Returns the number of whole frames, or the first error.
    pub fn host_stream(bytes: &[u8], chunk: usize, max_frame: u32) -> Result<usize, String> {
        let chunk = chunk.max(1);
        let mut reader = Chunked { bytes, chunk };
        let mut buf = FrameBuffer::new(max_frame);
        let mut frames = 0;
        loop {
            match buf.next_frame() {
                Ok(Some(_)) => {
                    frames += 1;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match buf.fill(&mut reader) {
                Ok(0) => return Ok(frames),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    struct Chunked<'a> {
        bytes: &'a [u8],
        chunk: usize,
    }

    impl std::io::Read for Chunked<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.chunk).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    /// The worker's blocking frame reader over `bytes`.
    pub fn worker_stream(bytes: &[u8], max_frame: u32) -> Result<usize, String> {
        let mut reader = bytes;
        let mut frames = 0;
        loop {
            match read_frame(&mut reader, max_frame) {
                Ok(_) => frames += 1,
                Err(FrameError::Eof) => return Ok(frames),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The message kinds, the fields of messages, and those of the maps nested in `load`,
    /// as the decoder knows them.
    pub const KINDS: &[&str] = super::decode::KINDS;
    /// See [`KINDS`].
    pub const FIELDS: &[&str] = super::decode::FIELDS;
    /// See [`KINDS`].
    pub const NESTED_FIELDS: &[&str] = super::decode::NESTED_FIELDS;

    /// Decodes one message header.
    pub fn message(head: &[u8]) -> Result<(), String> {
        super::decode::message(head).map(|_| ())
    }

    /// What the host does with a worker's first frames: a `Hello` (checked) under the
    /// handshake limit, then logs and unknown kinds, then `Loaded` or `LoadFailed`, under
    /// the load limit.
    pub fn handshake(bytes: &[u8]) -> Result<(), String> {
        let mut reader = Chunked { bytes, chunk: 4096 };
        let mut buf = FrameBuffer::new(super::HANDSHAKE_MAX_FRAME);
        let mut hello = false;
        loop {
            match buf.next_frame().map_err(|e| e.to_string())? {
                Some(frame) => match (hello, frame.message) {
                    (
                        false,
                        Message::Hello {
                            protocol, version, ..
                        },
                    ) => {
                        super::check_hello(&protocol, &version)?;
                        hello = true;
                        buf.set_max(super::LOAD_MAX_FRAME);
                    }
                    (false, other) => return Err(format!("expected Hello, got {other:?}")),
                    (true, Message::Loaded { .. } | Message::LoadFailed { .. }) => return Ok(()),
                    (true, Message::Log { .. } | Message::Unknown) => {}
                    (true, other) => return Err(format!("expected Loaded, got {other:?}")),
                },
                None => {
                    if buf.fill(&mut reader).map_err(|e| e.to_string())? == 0 {
                        return Err("the worker went away during the handshake".into());
                    }
                }
            }
        }
    }

    /// A whole, valid frame (for seeds).
    pub fn encode(message: &Message, payload: &[u8]) -> Vec<u8> {
        let mut out = super::frame::encode_head(message, payload.len());
        out.extend_from_slice(payload);
        out
    }
}
