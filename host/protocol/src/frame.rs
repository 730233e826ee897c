//! Framing: `[u32 LE body length][u32 LE header length][MessagePack header][payload]`.
//!
//! The body length is checked against the negotiated maximum before anything is allocated,
//! so a hostile length costs nothing. The payload is raw bytes beside the header: a 1 MiB
//! input is written from the caller's buffer with one vectored write and never re-encoded.

use std::io::{self, IoSlice, Read, Write};

use super::Message;

/// A decoded frame.
#[derive(Debug, PartialEq)]
pub struct Frame {
    /// The message header.
    pub message: Message,
    /// The bulk bytes beside it (a call's input, a reply's output, a configuration).
    pub payload: Vec<u8>,
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection at a frame boundary.
    Eof,
    /// The peer closed the connection in the middle of a frame.
    Truncated {
        /// Bytes of the frame received.
        have: usize,
        /// Bytes the frame declared.
        need: usize,
    },
    /// The declared length exceeds the limit.
    TooLarge {
        /// The declared length.
        len: u64,
        /// The limit in force.
        max: u64,
    },
    /// The bytes are not a valid frame or message.
    Malformed(String),
    /// The transport failed.
    Io(io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Eof => write!(f, "connection closed"),
            FrameError::Truncated { have, need } => {
                write!(
                    f,
                    "connection closed in the middle of a frame ({have} of {need} bytes)"
                )
            }
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max} bytes")
            }
            FrameError::Malformed(m) => write!(f, "malformed frame: {m}"),
            FrameError::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

/// Encodes the length prefix and header for a frame whose payload is `payload_len` bytes.
pub fn encode_head(message: &Message, payload_len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    encode_head_into(&mut out, message, payload_len);
    out
}

/// [`encode_head`] into `out` (cleared first), so a sender can reuse one buffer; takes
/// any message type that encodes like a [`Message`] (such as [`CallHead`](crate::CallHead)).
pub fn encode_head_into(out: &mut Vec<u8>, message: &impl serde::Serialize, payload_len: usize) {
    out.clear();
    out.extend_from_slice(&[0u8; 8]);
    rmp_serde::encode::write_named(out, message).expect("messages always encode");
    let head_len = out.len() - 8;
    let body_len = 4 + head_len + payload_len;
    // Both sides check payloads against the negotiated limit (at most 2 GiB) first.
    assert!(
        body_len <= u32::MAX as usize,
        "frame of {body_len} bytes cannot be encoded"
    );
    out[0..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[4..8].copy_from_slice(&(head_len as u32).to_le_bytes());
}

/// Checks a body length read from the wire.
fn check_len(body_len: u32, max: u32) -> Result<usize, FrameError> {
    if body_len > max {
        return Err(FrameError::TooLarge {
            len: body_len as u64,
            max: max as u64,
        });
    }
    if body_len < 4 {
        return Err(FrameError::Malformed(format!(
            "body length {body_len} is shorter than its header length field"
        )));
    }
    Ok(body_len as usize)
}

/// Splits a complete body into message and payload.
fn decode_body(body: &[u8]) -> Result<(Message, std::ops::Range<usize>), FrameError> {
    let head_len = u32::from_le_bytes(body[0..4].try_into().unwrap()) as usize;
    check_head_len(head_len, body.len())?;
    let message = decode_head(&body[4..4 + head_len])?;
    Ok((message, 4 + head_len..body.len()))
}

fn decode_head(head: &[u8]) -> Result<Message, FrameError> {
    super::decode::message(head).map_err(|e| {
        let preview: Vec<String> = head.iter().take(16).map(|b| format!("{b:02x}")).collect();
        FrameError::Malformed(format!(
            "header is not a valid message ({e}); first bytes: {}",
            preview.join(" ")
        ))
    })
}

/// Checks a header length read from the wire against the body and [`MAX_HEADER`].
fn check_head_len(head_len: usize, body_len: usize) -> Result<(), FrameError> {
    if head_len > body_len - 4 {
        return Err(FrameError::Malformed(format!(
            "header length {head_len} exceeds the body ({} bytes)",
            body_len - 4
        )));
    }
    if head_len > MAX_HEADER {
        return Err(FrameError::Malformed(format!(
            "header of {head_len} bytes exceeds the limit of {MAX_HEADER} bytes"
        )));
    }
    Ok(())
}

/// Largest message header either side accepts, whatever the frame limit: headers carry
/// names, ids and short texts, never bulk data (that is the payload).
pub const MAX_HEADER: usize = 256 * 1024;

/// A reader that can append straight into a vector's spare capacity, without the zero-fill
/// `Read::read_to_end` does for readers that do not implement `read_buf` (a shared-memory
/// ring: its bytes are copied once, into their final place).
pub trait ReadSpare: Read {
    /// Appends at most `max` bytes to `buf` (within its spare capacity, `max` at most
    /// `buf.capacity() - buf.len()`); returns how many. `Ok(0)` only at end of stream.
    fn read_spare(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize>;
}

/// Reads one frame from a blocking reader. The payload is read straight into its own
/// buffer (no copy after the read).
pub fn read_frame(reader: &mut impl Read, max: u32) -> Result<Frame, FrameError> {
    read_frame_with(reader, max, |reader, len| {
        let mut payload = vec![0u8; len];
        read_full(reader, &mut payload, false)?;
        Ok(payload)
    })
}

/// [`read_frame`] from a [`ReadSpare`] reader: the payload is copied once, with no
/// zero-fill first.
pub fn read_frame_spare(reader: &mut impl ReadSpare, max: u32) -> Result<Frame, FrameError> {
    read_frame_with(reader, max, |reader, len| {
        let mut payload = Vec::with_capacity(len);
        while payload.len() < len {
            let left = len - payload.len();
            match reader.read_spare(&mut payload, left) {
                Ok(0) => {
                    return Err(FrameError::Truncated {
                        have: payload.len(),
                        need: len,
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
        Ok(payload)
    })
}

fn read_frame_with<R: Read>(
    reader: &mut R,
    max: u32,
    payload: impl FnOnce(&mut R, usize) -> Result<Vec<u8>, FrameError>,
) -> Result<Frame, FrameError> {
    let mut len = [0u8; 4];
    read_full(reader, &mut len, true)?;
    let body_len = check_len(u32::from_le_bytes(len), max)?;
    let mut head_len = [0u8; 4];
    read_full(reader, &mut head_len, false)?;
    let head_len = u32::from_le_bytes(head_len) as usize;
    check_head_len(head_len, body_len)?;
    let mut head = vec![0u8; head_len];
    read_full(reader, &mut head, false)?;
    let message = decode_head(&head)?;
    let payload = payload(reader, body_len - 4 - head_len)?;
    Ok(Frame { message, payload })
}

fn read_full(reader: &mut impl Read, buf: &mut [u8], at_boundary: bool) -> Result<(), FrameError> {
    let mut have = 0;
    while have < buf.len() {
        match reader.read(&mut buf[have..]) {
            Ok(0) if have == 0 && at_boundary => return Err(FrameError::Eof),
            Ok(0) => {
                return Err(FrameError::Truncated {
                    have,
                    need: buf.len(),
                })
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Writes one frame to a blocking writer: header and payload in one vectored write where
/// the OS allows.
pub fn write_frame(writer: &mut impl Write, message: &Message, payload: &[u8]) -> io::Result<()> {
    let head = encode_head(message, payload.len());
    write_all_vectored(writer, &head, payload)
}

/// Writes `a` then `b` with as few syscalls as the OS allows.
pub fn write_all_vectored(writer: &mut impl Write, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(a), IoSlice::new(b)];
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match writer.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Payloads at least this large are read straight into their own buffer.
const DIRECT_PAYLOAD: usize = 64 * 1024;

/// A large frame whose header is decoded and whose payload is still arriving.
struct Partial {
    message: Message,
    payload: Vec<u8>,
    len: usize,
}

/// Incremental frame reader for a non-blocking stream: feed it bytes, take whole frames.
///
/// Small frames are parsed out of one shared buffer. For a large payload, once its header
/// is in, the payload gets its own exactly-sized buffer and the socket is read straight
/// into it: no copy after the read, no zero-filling.
pub struct FrameBuffer {
    /// Always initialised; valid data is `buf[start..end]`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: u32,
    partial: Option<Partial>,
}

impl FrameBuffer {
    /// An empty buffer that refuses frames longer than `max`.
    pub fn new(max: u32) -> Self {
        FrameBuffer {
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
            max,
            partial: None,
        }
    }

    /// Raises (or lowers) the frame limit, e.g. after the handshake.
    pub fn set_max(&mut self, max: u32) {
        self.max = max;
    }

    /// Reads once from `reader`. Returns the byte count (0 at EOF); a `WouldBlock` error
    /// passes through.
    pub fn fill(&mut self, reader: &mut impl Read) -> io::Result<usize> {
        if let Some(p) = &mut self.partial {
            let before = p.payload.len();
            let result = reader
                .take((p.len - before) as u64)
                .read_to_end(&mut p.payload);
            let got = p.payload.len() - before;
            return match result {
                Err(e) if got == 0 => Err(e),
                _ => Ok(got),
            };
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // Grow once; the new space is zeroed only this one time.
                let len = self.buf.len() * 2;
                self.buf.resize(len, 0);
            }
        }
        let n = reader.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// [`fill`](Self::fill) from a [`ReadSpare`] reader: a large payload is copied into
    /// its own buffer with no zero-fill first.
    pub fn fill_spare(&mut self, reader: &mut impl ReadSpare) -> io::Result<usize> {
        match &mut self.partial {
            Some(p) => {
                let left = p.len - p.payload.len();
                reader.read_spare(&mut p.payload, left)
            }
            None => self.fill(reader),
        }
    }

    /// Whether a whole frame is buffered (so reading is not needed to make progress).
    pub fn has_frame(&self) -> bool {
        match &self.partial {
            Some(p) => p.payload.len() == p.len,
            None => self
                .declared_len()
                .is_some_and(|len| self.end - self.start >= 4 + len),
        }
    }

    fn declared_len(&self) -> Option<usize> {
        let avail = &self.buf[self.start..self.end];
        (avail.len() >= 4).then(|| u32::from_le_bytes(avail[0..4].try_into().unwrap()) as usize)
    }

    /// Takes the next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.next_frame_with(|_, _| None)
    }

    /// Like [`next_frame`](Self::next_frame), but a large payload (read straight into
    /// its own buffer once the header is in) goes into the buffer `buffer_for` returns
    /// for its message and length, if any, when that buffer's capacity is between the
    /// length and twice it. A caller can so reuse memory that is already mapped (the
    /// call's own input, for its reply) instead of faulting in fresh pages.
    pub fn next_frame_with(
        &mut self,
        buffer_for: impl FnOnce(&Message, usize) -> Option<Vec<u8>>,
    ) -> Result<Option<Frame>, FrameError> {
        if let Some(p) = &self.partial {
            if p.payload.len() < p.len {
                return Ok(None);
            }
            let p = self.partial.take().unwrap();
            return Ok(Some(Frame {
                message: p.message,
                payload: p.payload,
            }));
        }
        let Some(declared) = self.declared_len() else {
            return Ok(None);
        };
        let body_len = check_len(declared as u32, self.max)?;
        let avail = self.end - self.start;
        let body_start = self.start + 4;
        if avail < 4 + body_len {
            if avail >= 8 {
                // Refuse an oversized header before buffering it.
                let head_len =
                    u32::from_le_bytes(self.buf[body_start..body_start + 4].try_into().unwrap())
                        as usize;
                check_head_len(head_len, body_len)?;
            }
            // A large payload: once the header is here, read the rest into its own buffer.
            if avail >= 8 && body_len >= DIRECT_PAYLOAD {
                let head_len =
                    u32::from_le_bytes(self.buf[body_start..body_start + 4].try_into().unwrap())
                        as usize;
                let payload_start = body_start + 4 + head_len;
                if avail >= 8 + head_len {
                    let message = decode_head(&self.buf[body_start + 4..payload_start])?;
                    let len = body_len - 4 - head_len;
                    let mut payload = buffer_for(&message, len)
                        .filter(|b| (len..=len.saturating_mul(2)).contains(&b.capacity()))
                        .map(|mut b| {
                            b.clear();
                            b
                        })
                        .unwrap_or_else(|| Vec::with_capacity(len));
                    payload.extend_from_slice(&self.buf[payload_start..self.end]);
                    self.start = self.end;
                    self.partial = Some(Partial {
                        message,
                        payload,
                        len,
                    });
                }
            }
            return Ok(None);
        }
        let body = &self.buf[body_start..body_start + body_len];
        let (message, range) = decode_body(body)?;
        let payload = body[range].to_vec();
        self.start = body_start + body_len;
        Ok(Some(Frame { message, payload }))
    }

    /// Bytes of an incomplete frame still buffered (for truncation reports at EOF).
    pub fn partial(&self) -> Option<(usize, usize)> {
        if let Some(p) = &self.partial {
            return Some((p.payload.len(), p.len));
        }
        let have = self.end - self.start;
        if have == 0 {
            return None;
        }
        Some((have, self.declared_len().map_or(4, |b| b + 4)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(message: &Message, payload: &[u8]) -> Vec<u8> {
        let mut out = encode_head(message, payload.len());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn a_borrowed_call_head_encodes_exactly_as_the_message() {
        let long = "m".repeat(300);
        for (id, method, window, window_bytes) in [
            (0, "echo", 0, 0),
            (u64::MAX, "", 0, 0),
            (1 << 40, long.as_str(), 16, 1 << 20),
            (7, "stream", 4, 0),
        ] {
            let message = Message::Call {
                id,
                method: method.into(),
                window,
                window_bytes,
            };
            let head = crate::CallHead {
                id,
                method,
                window,
                window_bytes,
            };
            let mut out = vec![1, 2, 3];
            encode_head_into(&mut out, &head, 5);
            assert_eq!(out, encode_head(&message, 5), "{message:?}");
        }
    }

    #[test]
    fn blocking_round_trip_with_payload() {
        let msg = Message::Call {
            id: 9,
            method: "resize".into(),
            window: 0,
            window_bytes: 0,
        };
        let bytes = frame(&msg, b"input bytes");
        let got = read_frame(&mut &bytes[..], 1 << 20).unwrap();
        assert_eq!(
            got,
            Frame {
                message: msg,
                payload: b"input bytes".to_vec()
            }
        );
    }

    #[test]
    fn eof_at_boundary_and_truncation_are_distinct() {
        assert!(matches!(
            read_frame(&mut &[][..], 1024),
            Err(FrameError::Eof)
        ));
        let bytes = frame(&Message::Ping { seq: 1 }, b"");
        let cut = &bytes[..bytes.len() - 1];
        assert!(matches!(
            read_frame(&mut &cut[..], 1024),
            Err(FrameError::Truncated { .. })
        ));
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let bytes = u32::MAX.to_le_bytes();
        match read_frame(&mut &bytes[..], 1024) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!((len, max), (u32::MAX as u64, 1024))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        let mut fb = FrameBuffer::new(1024);
        fb.fill(&mut &bytes[..]).unwrap();
        assert!(matches!(fb.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut bytes = 12u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&8u32.to_le_bytes());
        bytes.extend_from_slice(b"\xc1garbage");
        assert!(matches!(
            read_frame(&mut &bytes[..], 1024),
            Err(FrameError::Malformed(_))
        ));
        let mut bad_head = 8u32.to_le_bytes().to_vec();
        bad_head.extend_from_slice(&999u32.to_le_bytes());
        bad_head.extend_from_slice(b"abcd");
        assert!(matches!(
            read_frame(&mut &bad_head[..], 1024),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn a_large_payload_goes_into_the_offered_buffer_only_when_it_fits_snugly() {
        let len = 200_000;
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let bytes = frame(&Message::Reply { id: 9, status: 0 }, &payload);
        // (offered capacity, whether it is used)
        for (capacity, used) in [
            (len, true),
            (2 * len, true),
            (len - 1, false),
            (2 * len + 1, false),
        ] {
            let offered = vec![0xAAu8; capacity];
            let address = offered.as_ptr();
            let mut offered = Some(offered);
            let mut asked = None;
            let mut fb = FrameBuffer::new(1 << 20);
            let mut frames = Vec::new();
            for piece in bytes.chunks(4096) {
                let mut reader = piece;
                while !reader.is_empty() {
                    fb.fill(&mut reader).unwrap();
                }
                let next = fb.next_frame_with(|message, n| {
                    asked = Some((message.clone(), n));
                    offered.take()
                });
                frames.extend(next.unwrap());
            }
            assert_eq!(asked, Some((Message::Reply { id: 9, status: 0 }, len)));
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].payload, payload, "capacity {capacity}");
            let got = &frames[0].payload;
            if used {
                assert!(got.as_ptr() == address && got.capacity() == capacity);
            } else {
                // A buffer of its own (the allocator may hand out the refused one's
                // address again, so the capacity tells).
                assert_eq!(got.capacity(), len, "capacity {capacity}");
            }
        }
    }

    #[test]
    fn frame_buffer_reassembles_frames_split_anywhere() {
        let a = frame(&Message::Reply { id: 1, status: 0 }, &[7u8; 10_000]);
        let b = frame(&Message::Pong { seq: 2 }, b"");
        let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        for chunk in [1usize, 3, 7, 4096, 100_000] {
            let mut fb = FrameBuffer::new(1 << 20);
            let mut frames = Vec::new();
            for piece in all.chunks(chunk) {
                let mut reader = piece;
                while !reader.is_empty() {
                    fb.fill(&mut reader).unwrap();
                }
                while let Some(f) = fb.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames.len(), 2, "chunk size {chunk}");
            assert_eq!(frames[0].payload.len(), 10_000);
            assert_eq!(frames[1].message, Message::Pong { seq: 2 });
            assert!(fb.partial().is_none());
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_it_is_buffered() {
        // A frame claiming a 16 MiB header inside a 32 MiB body: refused from its first
        // 8 bytes, by both readers, whatever the frame limit.
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(32u32 << 20).to_le_bytes());
        bytes.extend_from_slice(&(16u32 << 20).to_le_bytes());
        bytes.extend_from_slice(&[0x80; 64]);
        let mut buf = FrameBuffer::new(64 << 20);
        buf.fill(&mut &bytes[..]).unwrap();
        let err = buf.next_frame().unwrap_err().to_string();
        assert!(err.contains("exceeds the limit of"), "{err}");
        let err = read_frame(&mut &bytes[..], 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exceeds the limit of"), "{err}");
    }
}
