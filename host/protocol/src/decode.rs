//! Decoding a frame's MessagePack header into a [`Message`] with bounded cost.
//!
//! The header comes from a worker the host does not trust, so the decoder allocates only
//! what the message it finds needs, within per-field limits, and never more than a small
//! multiple of the header's size:
//!
//! - one pass over the top-level map records where each known field's value lies and skips
//!   everything else without materialising it (a skip keeps a counter of items left, not a
//!   stack: nesting 100,000 levels deep costs nothing but the bytes);
//! - only then, knowing the `kind`, the fields that kind has are decoded, each with a limit
//!   on its length (strings) or count (lists);
//! - a map or array that declares more items than bytes remain is refused at once.
//!
//! `serde`'s internally tagged enums buffer the whole map as generic values first, which
//! is what made a 16 MiB header cost 561 MB; this decoder replaces that on the read side.
//! Encoding stays `rmp_serde::to_vec_named` (tests check the two agree for every kind).

use super::{Message, WireLimits, WireSandbox};

/// Longest `kind`, protocol name, version or similar short word.
const SHORT: usize = 256;
/// Longest name (plugin name, method name, library name).
const NAME: usize = 4096;
/// Longest path.
const PATH: usize = 4096;
/// Longest free text (log and progress messages, load failure reasons). The header limit
/// bounds it further.
const TEXT: usize = 1 << 20;
/// Most methods a plugin may declare.
const METHODS: usize = 4096;
/// Most entries in other lists (features, sandbox layers, granted paths).
const LIST: usize = 1024;
/// Longest map key.
const KEY: usize = 64;

/// A cursor over MessagePack bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type R<T> = Result<T, String>;

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> R<u8> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| format!("header ends early at byte {}", self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "header declares {n} bytes at byte {} but has {} left",
                self.pos,
                self.left()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> R<u64> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Length of a map header.
    fn map_len(&mut self) -> R<usize> {
        let at = self.pos;
        let n = match self.byte()? {
            b @ 0x80..=0x8f => usize::from(b & 0x0f),
            0xde => self.be(2)? as usize,
            0xdf => self.be(4)? as usize,
            other => return Err(format!("expected a map at byte {at}, found 0x{other:02x}")),
        };
        // Every entry needs at least two bytes.
        if n > self.left() / 2 {
            return Err(format!(
                "map at byte {at} declares {n} entries but the header has {} bytes left",
                self.left()
            ));
        }
        Ok(n)
    }

    /// Length of an array header.
    fn array_len(&mut self) -> R<usize> {
        let at = self.pos;
        let n = match self.byte()? {
            b @ 0x90..=0x9f => usize::from(b & 0x0f),
            0xdc => self.be(2)? as usize,
            0xdd => self.be(4)? as usize,
            other => {
                return Err(format!(
                    "expected an array at byte {at}, found 0x{other:02x}"
                ))
            }
        };
        if n > self.left() {
            return Err(format!(
                "array at byte {at} declares {n} items but the header has {} bytes left",
                self.left()
            ));
        }
        Ok(n)
    }

    /// A UTF-8 string of at most `max` bytes, borrowed from the header.
    fn str(&mut self, max: usize) -> R<&'a str> {
        let at = self.pos;
        let n = match self.byte()? {
            b @ 0xa0..=0xbf => usize::from(b & 0x1f),
            0xd9 => self.be(1)? as usize,
            0xda => self.be(2)? as usize,
            0xdb => self.be(4)? as usize,
            other => {
                return Err(format!(
                    "expected a string at byte {at}, found 0x{other:02x}"
                ))
            }
        };
        if n > max {
            return Err(format!(
                "string at byte {at} is {n} bytes long; at most {max} are allowed here"
            ));
        }
        std::str::from_utf8(self.take(n)?).map_err(|e| format!("string at byte {at}: {e}"))
    }

    fn string(&mut self, max: usize) -> R<String> {
        self.str(max).map(str::to_string)
    }

    /// Any integer that fits in `u64`.
    fn u64(&mut self) -> R<u64> {
        let at = self.pos;
        let v = self.int()?;
        u64::try_from(v)
            .map_err(|_| format!("expected a non-negative integer at byte {at}, found {v}"))
    }

    /// Any integer, as i128 so every MessagePack integer fits.
    fn int(&mut self) -> R<i128> {
        let at = self.pos;
        Ok(match self.byte()? {
            b @ 0x00..=0x7f => i128::from(b),
            b @ 0xe0..=0xff => i128::from(b as i8),
            0xcc => i128::from(self.be(1)?),
            0xcd => i128::from(self.be(2)?),
            0xce => i128::from(self.be(4)?),
            0xcf => i128::from(self.be(8)?),
            0xd0 => i128::from(self.be(1)? as u8 as i8),
            0xd1 => i128::from(self.be(2)? as u16 as i16),
            0xd2 => i128::from(self.be(4)? as u32 as i32),
            0xd3 => i128::from(self.be(8)? as i64),
            other => {
                return Err(format!(
                    "expected an integer at byte {at}, found 0x{other:02x}"
                ))
            }
        })
    }

    fn num<T: TryFrom<i128>>(&mut self, what: &str) -> R<T> {
        let at = self.pos;
        let v = self.int()?;
        T::try_from(v).map_err(|_| format!("{what} at byte {at}: {v} is out of range"))
    }

    fn f64(&mut self) -> R<f64> {
        match self.peek() {
            Some(0xca) => {
                self.pos += 1;
                Ok(f64::from(f32::from_bits(self.be(4)? as u32)))
            }
            Some(0xcb) => {
                self.pos += 1;
                Ok(f64::from_bits(self.be(8)?))
            }
            _ => Ok(self.int()? as f64),
        }
    }

    fn bool(&mut self) -> R<bool> {
        let at = self.pos;
        match self.byte()? {
            0xc2 => Ok(false),
            0xc3 => Ok(true),
            other => Err(format!(
                "expected true or false at byte {at}, found 0x{other:02x}"
            )),
        }
    }

    /// Consumes a nil if one is next.
    fn nil(&mut self) -> bool {
        if self.peek() == Some(0xc0) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn list(&mut self, max_items: usize, max_len: usize) -> R<Vec<String>> {
        let at = self.pos;
        let n = self.array_len()?;
        if n > max_items {
            return Err(format!(
                "list at byte {at} has {n} items; at most {max_items} are allowed here"
            ));
        }
        (0..n).map(|_| self.string(max_len)).collect()
    }

    /// Skips one value of any shape without allocating: a count of items still to skip
    /// replaces recursion.
    fn skip(&mut self) -> R<()> {
        let mut remaining: u64 = 1;
        while remaining > 0 {
            remaining -= 1;
            if remaining > self.left() as u64 {
                return Err(format!(
                    "value at byte {} declares more items than the header holds",
                    self.pos
                ));
            }
            let at = self.pos;
            let skip_bytes = |c: &mut Self, n: u64| c.take(n as usize).map(|_| ());
            match self.byte()? {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => {}
                b @ 0x80..=0x8f => remaining += 2 * u64::from(b & 0x0f),
                b @ 0x90..=0x9f => remaining += u64::from(b & 0x0f),
                b @ 0xa0..=0xbf => skip_bytes(self, u64::from(b & 0x1f))?,
                0xc4 | 0xd9 => {
                    let n = self.be(1)?;
                    skip_bytes(self, n)?
                }
                0xc5 | 0xda => {
                    let n = self.be(2)?;
                    skip_bytes(self, n)?
                }
                0xc6 | 0xdb => {
                    let n = self.be(4)?;
                    skip_bytes(self, n)?
                }
                0xcc | 0xd0 => skip_bytes(self, 1)?,
                0xcd | 0xd1 => skip_bytes(self, 2)?,
                0xca | 0xce | 0xd2 => skip_bytes(self, 4)?,
                0xcb | 0xcf | 0xd3 => skip_bytes(self, 8)?,
                0xd4 => skip_bytes(self, 2)?,
                0xd5 => skip_bytes(self, 3)?,
                0xd6 => skip_bytes(self, 5)?,
                0xd7 => skip_bytes(self, 9)?,
                0xd8 => skip_bytes(self, 17)?,
                0xc7 => {
                    let n = self.be(1)?;
                    skip_bytes(self, n + 1)?
                }
                0xc8 => {
                    let n = self.be(2)?;
                    skip_bytes(self, n + 1)?
                }
                0xc9 => {
                    let n = self.be(4)?;
                    skip_bytes(self, n + 1)?
                }
                0xdc => remaining += self.be(2)?,
                0xdd => remaining += self.be(4)?,
                0xde => remaining += 2 * self.be(2)?,
                0xdf => remaining += 2 * self.be(4)?,
                0xc1 => return Err(format!("invalid MessagePack byte 0xc1 at byte {at}")),
            }
        }
        Ok(())
    }
}

/// The message kinds this decoder knows (any other decodes as `Message::Unknown`).
pub(crate) const KINDS: &[&str] = &[
    "hello",
    "load",
    "loaded",
    "load_failed",
    "call",
    "reply",
    "cancel",
    "event",
    "log",
    "ping",
    "pong",
    "shutdown",
    "host_call",
    "host_reply",
    "item",
    "credit",
];

/// The fields of the maps nested in `load` (`limits` and `sandbox`).
pub(crate) const NESTED_FIELDS: &[&str] = &[
    "memory",
    "cpu_seconds",
    "open_files",
    "core_dumps",
    "mode",
    "read",
    "write",
    "network",
    "exec",
    "tasks",
];

/// The fields any message kind can have; each remembers where its value lies.
pub(crate) const FIELDS: &[&str] = &[
    "kind",
    "protocol",
    "version",
    "features",
    "token",
    "pid",
    "name",
    "library",
    "max_frame",
    "concurrency",
    "limits",
    "sandbox",
    "abi_major",
    "abi_minor",
    "methods",
    "sandbox_missing",
    "reason",
    "message",
    "abi",
    "id",
    "method",
    "status",
    "fraction",
    "level",
    "call",
    "seq",
    "grace_ms",
    "window",
    "window_bytes",
    "items",
    "bytes",
];

/// Where each known field's value is, after the first pass.
struct Found<'a> {
    head: &'a [u8],
    at: [Option<usize>; FIELDS.len()],
}

impl<'a> Found<'a> {
    /// A cursor at `field`'s value, if the field is present (and not nil, for optional
    /// fields that decode nil as absent).
    fn get(&self, field: &str) -> Option<Cursor<'a>> {
        let i = FIELDS.iter().position(|f| *f == field)?;
        self.at[i].map(|pos| Cursor {
            buf: self.head,
            pos,
        })
    }

    fn required<T>(
        &self,
        kind: &str,
        field: &str,
        read: impl FnOnce(&mut Cursor<'a>) -> R<T>,
    ) -> R<T> {
        let mut c = self
            .get(field)
            .ok_or_else(|| format!("`{kind}` message without `{field}`"))?;
        read(&mut c).map_err(|e| format!("`{kind}.{field}`: {e}"))
    }

    /// An optional field: absent or nil is `None`.
    fn optional<T>(
        &self,
        kind: &str,
        field: &str,
        read: impl FnOnce(&mut Cursor<'a>) -> R<T>,
    ) -> R<Option<T>> {
        let Some(mut c) = self.get(field) else {
            return Ok(None);
        };
        if c.nil() {
            return Ok(None);
        }
        read(&mut c)
            .map(Some)
            .map_err(|e| format!("`{kind}.{field}`: {e}"))
    }
}

/// Decodes one message header.
pub(crate) fn message(head: &[u8]) -> Result<Message, String> {
    let mut c = Cursor::new(head);
    let entries = c.map_len()?;
    let mut found = Found {
        head,
        at: [None; FIELDS.len()],
    };
    for _ in 0..entries {
        let at = c.pos;
        let key = c.str(KEY).map_err(|e| format!("field name: {e}"))?;
        let value_at = c.pos;
        c.skip()?;
        if let Some(i) = FIELDS.iter().position(|f| *f == key) {
            if found.at[i].replace(value_at).is_some() {
                return Err(format!("field `{key}` appears twice (second at byte {at})"));
            }
        }
    }
    if c.left() != 0 {
        return Err(format!("{} bytes after the end of the message", c.left()));
    }
    let kind = found.required("message", "kind", |c| c.str(SHORT))?;
    let k = kind;
    let id = |f: &Found<'_>| f.required(k, "id", Cursor::u64);
    let text = |c: &mut Cursor<'_>| c.string(TEXT);
    Ok(match kind {
        "hello" => Message::Hello {
            protocol: found.required(k, "protocol", |c| c.string(SHORT))?,
            version: found.required(k, "version", |c| c.string(SHORT))?,
            features: found
                .optional(k, "features", |c| c.list(LIST, SHORT))?
                .unwrap_or_default(),
            token: found.optional(k, "token", |c| c.string(SHORT))?,
            pid: found.optional(k, "pid", |c| c.num::<u32>("pid"))?,
        },
        "load" => Message::Load {
            name: found.required(k, "name", |c| c.string(NAME))?,
            library: found.required(k, "library", |c| c.string(PATH))?,
            max_frame: found.required(k, "max_frame", Cursor::u64)?,
            concurrency: found.required(k, "concurrency", |c| c.num::<u32>("concurrency"))?,
            limits: found.optional(k, "limits", limits)?.unwrap_or_default(),
            sandbox: found.optional(k, "sandbox", sandbox)?,
        },
        "loaded" => Message::Loaded {
            name: found.required(k, "name", |c| c.string(NAME))?,
            version: found.required(k, "version", |c| c.string(SHORT))?,
            abi_major: found.required(k, "abi_major", |c| c.num::<u16>("abi_major"))?,
            abi_minor: found.required(k, "abi_minor", |c| c.num::<u16>("abi_minor"))?,
            methods: found.required(k, "methods", |c| c.list(METHODS, NAME))?,
            sandbox: found
                .optional(k, "sandbox", |c| c.list(LIST, NAME))?
                .unwrap_or_default(),
            sandbox_missing: found
                .optional(k, "sandbox_missing", |c| c.list(LIST, NAME))?
                .unwrap_or_default(),
        },
        "load_failed" => Message::LoadFailed {
            reason: found.required(k, "reason", |c| c.string(SHORT))?,
            message: found.required(k, "message", text)?,
            abi: found.optional(k, "abi", |c| {
                if c.array_len()? != 2 {
                    return Err("expected [major, minor]".into());
                }
                Ok((c.num::<u16>("major")?, c.num::<u16>("minor")?))
            })?,
        },
        "call" => Message::Call {
            id: id(&found)?,
            method: found.required(k, "method", |c| c.string(NAME))?,
            window: found
                .optional(k, "window", |c| c.num::<u32>("window"))?
                .unwrap_or(0),
            window_bytes: found.optional(k, "window_bytes", Cursor::u64)?.unwrap_or(0),
        },
        "host_call" => Message::HostCall {
            id: id(&found)?,
            seq: found.required(k, "seq", Cursor::u64)?,
            name: found.required(k, "name", |c| c.string(NAME))?,
        },
        "host_reply" => Message::HostReply {
            id: id(&found)?,
            seq: found.required(k, "seq", Cursor::u64)?,
            status: found.required(k, "status", |c| c.num::<i32>("status"))?,
        },
        "item" => Message::Item { id: id(&found)? },
        "credit" => Message::Credit {
            id: id(&found)?,
            items: found.required(k, "items", |c| c.num::<u32>("items"))?,
            bytes: found.required(k, "bytes", Cursor::u64)?,
        },
        "reply" => Message::Reply {
            id: id(&found)?,
            status: found.required(k, "status", |c| c.num::<i32>("status"))?,
        },
        "cancel" => Message::Cancel { id: id(&found)? },
        "event" => Message::Event {
            id: id(&found)?,
            fraction: found.required(k, "fraction", Cursor::f64)?,
            message: found.required(k, "message", text)?,
        },
        "log" => Message::Log {
            level: found.required(k, "level", |c| c.num::<u32>("level"))?,
            message: found.required(k, "message", text)?,
            call: found.optional(k, "call", Cursor::u64)?,
        },
        "ping" => Message::Ping {
            seq: found.required(k, "seq", Cursor::u64)?,
        },
        "pong" => Message::Pong {
            seq: found.required(k, "seq", Cursor::u64)?,
        },
        "shutdown" => Message::Shutdown {
            grace_ms: found.required(k, "grace_ms", Cursor::u64)?,
        },
        _ => Message::Unknown,
    })
}

/// Reads the fields of a nested map, calling `field` for each known name; others are
/// skipped.
fn nested(c: &mut Cursor<'_>, mut field: impl FnMut(&str, &mut Cursor<'_>) -> R<bool>) -> R<()> {
    let n = c.map_len()?;
    for _ in 0..n {
        let key = c.str(KEY)?;
        if !field(key, c)? {
            c.skip()?;
        }
    }
    Ok(())
}

fn opt_u64(c: &mut Cursor<'_>) -> R<Option<u64>> {
    if c.nil() {
        Ok(None)
    } else {
        c.u64().map(Some)
    }
}

fn limits(c: &mut Cursor<'_>) -> R<WireLimits> {
    let mut l = WireLimits::default();
    nested(c, |key, c| {
        match key {
            "memory" => l.memory = opt_u64(c)?,
            "cpu_seconds" => l.cpu_seconds = opt_u64(c)?,
            "open_files" => l.open_files = opt_u64(c)?,
            "core_dumps" => l.core_dumps = c.bool()?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(l)
}

fn sandbox(c: &mut Cursor<'_>) -> R<WireSandbox> {
    let mut s = WireSandbox::default();
    nested(c, |key, c| {
        match key {
            "mode" => s.mode = c.string(SHORT)?,
            "read" => s.read = c.list(LIST, PATH)?,
            "write" => s.write = c.list(LIST, PATH)?,
            "network" => s.network = c.bool()?,
            "exec" => s.exec = c.bool()?,
            "tasks" => s.tasks = c.num::<u32>("tasks")?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<Message> {
        vec![
            super::super::hello(Some("token".into()), Some(42)),
            super::super::hello(None, None),
            Message::Load {
                name: "thumbnail".into(),
                library: "/plugins/thumbnail/libthumbnail.so".into(),
                max_frame: 64 << 20,
                concurrency: 4,
                limits: WireLimits {
                    memory: Some(1 << 30),
                    cpu_seconds: None,
                    open_files: Some(64),
                    core_dumps: true,
                },
                sandbox: Some(WireSandbox {
                    mode: "required".into(),
                    read: vec!["/plugins/thumbnail".into(), "/usr/share/fonts".into()],
                    write: vec!["/data/thumbnail".into()],
                    network: true,
                    exec: false,
                    tasks: 64,
                }),
            },
            Message::Load {
                name: "x".into(),
                library: "/x.so".into(),
                max_frame: 4096,
                concurrency: 1,
                limits: WireLimits::default(),
                sandbox: None,
            },
            Message::Loaded {
                name: "thumbnail".into(),
                version: "1.2.3".into(),
                abi_major: 1,
                abi_minor: 0,
                methods: vec!["resize".into(), "info".into()],
                sandbox: vec!["seccomp".into()],
                sandbox_missing: vec!["task limit: root".into()],
            },
            Message::LoadFailed {
                reason: "abi_mismatch".into(),
                message: "built against 99.0".into(),
                abi: Some((99, 0)),
            },
            Message::LoadFailed {
                reason: "create_failed".into(),
                message: "no".into(),
                abi: None,
            },
            Message::Call {
                id: u64::MAX >> 1,
                method: "resize".into(),
                window: 0,
                window_bytes: 0,
            },
            Message::Call {
                id: 5,
                method: "frames".into(),
                window: 256,
                window_bytes: 1 << 20,
            },
            Message::HostCall {
                id: 5,
                seq: 0,
                name: "doc.selection".into(),
            },
            Message::HostReply {
                id: 5,
                seq: u64::MAX,
                status: 7,
            },
            Message::Item { id: 5 },
            Message::Credit {
                id: 5,
                items: 128,
                bytes: 4096,
            },
            Message::Reply { id: 7, status: -3 },
            Message::Reply {
                id: 0,
                status: i32::MIN,
            },
            Message::Cancel { id: 1 << 40 },
            Message::Event {
                id: 3,
                fraction: 0.25,
                message: "a quarter".into(),
            },
            Message::Event {
                id: 3,
                fraction: -1.0,
                message: String::new(),
            },
            Message::Log {
                level: 2,
                message: "hello\nworld".into(),
                call: Some(9),
            },
            Message::Log {
                level: 0,
                message: "é".repeat(1000),
                call: None,
            },
            Message::Ping { seq: 1 },
            Message::Pong { seq: u64::MAX },
            Message::Shutdown { grace_ms: 5000 },
        ]
    }

    #[test]
    fn decodes_what_the_encoder_writes_for_every_kind() {
        for m in every_kind() {
            let bytes = rmp_serde::to_vec_named(&m).unwrap();
            assert_eq!(message(&bytes).unwrap(), m, "{m:?}");
            // And agrees with serde's own decoding.
            let serde: Message = rmp_serde::from_slice(&bytes).unwrap();
            assert_eq!(serde, m);
        }
    }

    #[test]
    fn unknown_kinds_and_fields_are_tolerated_without_being_kept() {
        #[derive(serde::Serialize)]
        struct Newer {
            kind: &'static str,
            id: u64,
            status: i32,
            added_later: Vec<Vec<u32>>,
        }
        let bytes = rmp_serde::to_vec_named(&Newer {
            kind: "reply",
            id: 7,
            status: 0,
            added_later: vec![vec![1, 2], vec![]],
        })
        .unwrap();
        assert_eq!(
            message(&bytes).unwrap(),
            Message::Reply { id: 7, status: 0 }
        );
        let bytes = rmp_serde::to_vec_named(&Newer {
            kind: "teleport",
            id: 7,
            status: 0,
            added_later: vec![],
        })
        .unwrap();
        assert_eq!(message(&bytes).unwrap(), Message::Unknown);
    }

    /// A map `{"kind": "reply", "id": 1, "status": 0, "x": <value>}`.
    fn reply_with(value: &[u8]) -> Vec<u8> {
        let mut b = vec![0x84];
        for (k, v) in [
            ("kind", &b"\xa5reply"[..]),
            ("id", &[1][..]),
            ("status", &[0][..]),
        ] {
            b.push(0xa0 | k.len() as u8);
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(v);
        }
        b.extend_from_slice(b"\xa1x");
        b.extend_from_slice(value);
        b
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        assert_eq!(
            message(&reply_with(&deep)).unwrap(),
            Message::Reply { id: 1, status: 0 }
        );
        // Truncated deep nesting is an error, not a crash.
        assert!(message(&reply_with(&deep[..50_000])).is_err());
    }

    #[test]
    fn declared_counts_larger_than_the_header_are_refused() {
        for bad in [
            &b"\xdd\xff\xff\xff\xff"[..],     // array of 4 billion
            &b"\xdf\xff\xff\xff\xff"[..],     // map of 4 billion
            &b"\xdb\xff\xff\xff\xff"[..],     // string of 4 GiB
            &b"\xc6\x7f\xff\xff\xff"[..],     // bin of 2 GiB
            &b"\xc9\xff\xff\xff\xff\x01"[..], // ext of 4 GiB
            &b"\xc1"[..],                     // never used
        ] {
            let err = message(&reply_with(bad)).unwrap_err();
            assert!(!err.is_empty());
        }
        // The top-level map itself.
        assert!(message(b"\xdf\xff\xff\xff\xff").is_err());
        assert!(message(b"").is_err());
        assert!(message(b"\x93\x01\x02\x03").is_err(), "not a map");
    }

    #[test]
    fn field_limits_hold() {
        let many = Message::Loaded {
            name: "x".into(),
            version: "1.0.0".into(),
            abi_major: 1,
            abi_minor: 0,
            methods: vec![String::new(); METHODS + 1],
            sandbox: vec![],
            sandbox_missing: vec![],
        };
        let err = message(&rmp_serde::to_vec_named(&many).unwrap()).unwrap_err();
        assert!(err.contains("methods") && err.contains("4096"), "{err}");
        let long = Message::Call {
            id: 1,
            method: "m".repeat(NAME + 1),
            window: 0,
            window_bytes: 0,
        };
        let err = message(&rmp_serde::to_vec_named(&long).unwrap()).unwrap_err();
        assert!(err.contains("call.method"), "{err}");
        let negative = reply_with(b"\xc0");
        let mut negative_id = negative.clone();
        // id = -1
        let at = negative_id.windows(3).position(|w| w == b"\xa2id").unwrap() + 3;
        negative_id[at] = 0xff;
        assert!(message(&negative_id).unwrap_err().contains("id"));
    }

    #[test]
    fn the_lists_of_names_match_the_decoder() {
        // Every listed kind is known: without its fields it is an error, not `Unknown`.
        for kind in KINDS {
            let bytes =
                rmp_serde::to_vec_named(&std::collections::BTreeMap::from([("kind", kind)]))
                    .unwrap();
            assert!(message(&bytes).is_err(), "{kind}");
        }
        // Every kind the encoder writes is listed.
        for m in every_kind() {
            let bytes = rmp_serde::to_vec_named(&m).unwrap();
            let value = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
            let kind = value.as_map().unwrap()[0].1.as_str().unwrap().to_string();
            assert!(KINDS.contains(&kind.as_str()), "{kind}");
            for (key, _) in value.as_map().unwrap() {
                assert!(FIELDS.contains(&key.as_str().unwrap()), "{key}");
            }
        }
    }

    #[test]
    fn duplicate_fields_and_trailing_bytes_are_refused() {
        let mut twice = vec![0x83];
        for (k, v) in [
            ("kind", &b"\xa4ping"[..]),
            ("seq", &[1][..]),
            ("seq", &[2][..]),
        ] {
            twice.push(0xa0 | k.len() as u8);
            twice.extend_from_slice(k.as_bytes());
            twice.extend_from_slice(v);
        }
        assert!(message(&twice).unwrap_err().contains("twice"));
        let mut trailing = rmp_serde::to_vec_named(&Message::Ping { seq: 1 }).unwrap();
        trailing.push(0);
        assert!(message(&trailing).unwrap_err().contains("after the end"));
    }
}
