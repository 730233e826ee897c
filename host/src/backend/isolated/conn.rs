//! The host's end of one worker connection.
//!
//! Calls are multiplexed by id. There is no reader thread: the callers themselves take
//! turns reading (one at a time holds the reader role, reads every frame available,
//! completes whichever calls they answer and wakes those callers). A lone call therefore
//! writes its request and reads its reply on its own thread, with no hand-off; under
//! `smol::block_on` (or any executor built on async-io) the wait for readability parks that
//! same thread in the reactor. When the role holder's reply arrives it passes the role to
//! another waiting caller.
//!
//! After the handshake the frames may move to shared memory ([`Conn::use_shm`]): the same
//! bytes, written into and read out of the region's rings instead of the socket, which
//! then carries only doorbell bytes (and its end-of-file, still how a dead worker is seen
//! at once). The reader role spins briefly on the reply ring before it sleeps on the
//! socket; a worker whose reader went off to run a call gets a standby thread woken
//! through the region when a frame arrives for it (`kick_worker`).

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use super::link::Link;
use crate::backend::ProgressFn;
use crate::cancel::CancelHandle;
use crate::host_fn::{HostCallInfo, Imports};
use crate::loader::emit_log;
use crate::plugin::Progress;
use crate::protocol::frame::{encode_head, Frame, FrameBuffer, FrameError};
use crate::protocol::Message;
#[cfg(target_os = "linux")]
use crate::protocol::{frame::encode_head_into, CallHead};
use plugin_api::abi::host_status;

/// Why a connection is no longer usable.
#[derive(Clone, Debug)]
pub(crate) enum CloseReason {
    /// The worker closed it (usually: it died).
    Eof,
    /// The worker broke the protocol and was cut off.
    Protocol(String),
    /// The transport failed.
    Io(String),
    /// The host ended it (shutdown).
    Host,
    /// The host killed the worker for a reason (a call ignored its deadline, no answer to
    /// a ping).
    Killed(String),
}

impl CloseReason {
    /// A transport error. A reset or broken pipe means the worker went away: that is an
    /// end of stream, not a fault of the connection.
    fn from_io(doing: &str, e: &io::Error) -> CloseReason {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => CloseReason::Eof,
            _ => CloseReason::Io(format!("{doing}: {e}")),
        }
    }
}

/// A closed connection: why, and which methods were in flight at that moment.
#[derive(Clone, Debug)]
pub(crate) struct Closed {
    pub reason: CloseReason,
    pub in_flight: Vec<String>,
}

/// How long the reader role may sit with a holder that is not polled before another
/// waiting call (or the ping) takes it over.
const STALE_READER: Duration = Duration::from_millis(20);

/// How many reads one poll of a waiting call makes before it yields (the worker may write
/// without pause; the caller's deadline must still fire).
const READS_PER_POLL: u32 = 64;

/// The least time a worker gets to take the rest of a frame abandoned half-written (its
/// call ended first), whatever the plugin's cancel grace.
const ABANDONED_FRAME_MIN: Duration = Duration::from_millis(100);

/// Pending-table keys for pings carry this bit, so they never collide with call ids.
const PING_BIT: u64 = 1 << 63;

/// How long the reader role spins on an empty reply ring before it sleeps on the socket
/// (shared memory only). A short call's reply comes within a few microseconds; a
/// sleeping host costs the worker a socket write and the host a wake-up, ~15 us each here.
#[cfg(target_os = "linux")]
const HOST_SPIN: Duration = Duration::from_micros(50);

/// Input buffers at least this large are kept for their call's reply (smaller ones cost
/// little to allocate and are not worth the lock).
const SPARE_MIN: usize = 64 * 1024;

/// The shared-memory rings, once the connection moved to them.
#[cfg(target_os = "linux")]
struct ShmLink {
    region: Arc<crate::protocol::shm::Region>,
    /// The reply ring: read only by the reader role holder.
    rx: Mutex<crate::protocol::shm::RingReader>,
    /// The request ring: written only under the write lock.
    tx: Mutex<crate::protocol::shm::RingWriter>,
}

struct Pending {
    method: String,
    waker: Option<Waker>,
    reply: Option<(i32, Vec<u8>)>,
    progress: Option<ProgressFn>,
    /// Fires when the call is over for its caller: its host calls are cancelled. Made
    /// with the call's first host call (most calls make none), or when its caller gives
    /// up first.
    cancel: Option<CancelHandle>,
    /// A streaming call's items and window.
    stream: Option<StreamState>,
    /// The call's input buffer, once sent: a large reply is read into it (its pages are
    /// mapped already; a fresh buffer would fault each one in).
    spare: Option<Vec<u8>>,
}

/// The host's side of a streaming call's flow control.
pub(crate) struct StreamState {
    items: async_channel::Sender<Vec<u8>>,
    window: u32,
    window_bytes: u64,
    /// Items (and their bytes) received and not yet credited back.
    out_items: u32,
    out_bytes: u64,
}

impl StreamState {
    pub fn new(items: async_channel::Sender<Vec<u8>>, window: u32, window_bytes: u64) -> Self {
        StreamState {
            items,
            window,
            window_bytes,
            out_items: 0,
            out_bytes: 0,
        }
    }
}

/// What an outstanding host call holds in the host's accounting.
#[derive(Clone, Copy)]
struct HostCallHeld {
    /// Input bytes kept for it (0 when refused).
    bytes: u64,
    /// Whether it counts its plugin call as waiting on the host (it runs, for a call
    /// that is running): refused ones never make the pool send more calls.
    waiting: bool,
}

/// Most host calls one worker may have running at once; more are refused with `LIMIT`.
const HOST_CALLS_MAX: usize = 256;
/// Most host calls (running, or refused and not yet answered) one worker may have
/// outstanding: past this the worker is cut off. An honest worker has one per thread.
const HOST_CALLS_CUTOFF: usize = 2 * HOST_CALLS_MAX;
/// Most input bytes the host holds for one worker's running host calls; a host call past
/// it is refused with `LIMIT`.
const HOST_CALL_BYTES_MAX: u64 = 64 << 20;

/// Hashes the call ids the host chose (sequential, never picked by the worker) with one
/// multiplication: the default hasher costs more than the rest of a lookup.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

struct State {
    /// Calls waiting for their reply, by id. Only the host inserts (ids it chose); the
    /// worker's ids are only looked up.
    pending: IdMap<Pending>,
    reader_busy: bool,
    /// Bumped whenever the reader role changes hands, so a holder knows if it lost it.
    reader_epoch: u64,
    /// When the role holder last ran; a holder idle longer than [`STALE_READER`] (a future
    /// polled once and then kept unpolled) can have the role taken over.
    reader_seen: Instant,
    buf: Option<FrameBuffer>,
    closed: Option<Closed>,
    max_issued: u64,
    /// Calls whose callers gave up before the reply came: the one late reply each may still
    /// get is discarded. Any other reply to a call not waiting is a protocol violation.
    abandoned: HashSet<u64>,
    /// Host calls outstanding (running, or refused and not yet answered), by (call id,
    /// seq), with the input bytes each holds.
    host_calls: HashMap<(u64, u64), HostCallHeld>,
    /// The input bytes of the host calls outstanding.
    host_call_bytes: u64,
    /// Calls with at least one host call running, and how many each has.
    waiting_on_host: HashMap<u64, u32>,
}

/// Work to do after the state lock is released (user callbacks never run under it).
enum Deferred {
    Progress(ProgressFn, Progress),
    Log(u32, String),
    HostCall(HostCallRequest),
}

/// A host call the reader accepted: to run, or to answer at once with a refusal.
struct HostCallRequest {
    id: u64,
    seq: u64,
    work: Result<(HostCallInfo, Vec<u8>), (i32, String)>,
}

pub(crate) struct Conn {
    stream: Link,
    /// Held while a frame is written; its buffer is scratch space for frame headers.
    write_lock: Arc<smol::lock::Mutex<Vec<u8>>>,
    state: Mutex<State>,
    plugin: Arc<str>,
    on_close: Box<dyn Fn(&CloseReason) + Send + Sync>,
    imports: Arc<Imports>,
    /// How long a host function may run on after its call was cancelled.
    grace: Duration,
    /// The frame limit, for host function outputs.
    max_frame: std::sync::atomic::AtomicU32,
    /// Calls waiting on a host call (they do not run plugin code meanwhile).
    waiting: std::sync::atomic::AtomicUsize,
    /// Told when a call starts waiting on a host call (the pool has room for another).
    on_waiting: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The rings, once frames moved to shared memory.
    #[cfg(target_os = "linux")]
    shm: std::sync::OnceLock<ShmLink>,
}

impl Conn {
    /// Wraps a connected stream. `on_close` runs once when the connection is cut, with
    /// the reason (the backend kills the worker there).
    pub fn new(
        stream: Link,
        plugin: Arc<str>,
        max_frame: u32,
        on_close: Box<dyn Fn(&CloseReason) + Send + Sync>,
        (imports, grace): (Arc<Imports>, Duration),
    ) -> Conn {
        Conn {
            stream,
            write_lock: Arc::new(smol::lock::Mutex::new(Vec::new())),
            state: Mutex::new(State {
                pending: IdMap::default(),
                reader_busy: false,
                reader_epoch: 0,
                reader_seen: Instant::now(),
                buf: Some(FrameBuffer::new(max_frame)),
                closed: None,
                max_issued: 0,
                abandoned: HashSet::new(),
                host_calls: HashMap::new(),
                host_call_bytes: 0,
                waiting_on_host: HashMap::new(),
            }),
            plugin,
            on_close,
            imports,
            grace,
            max_frame: std::sync::atomic::AtomicU32::new(max_frame),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            on_waiting: std::sync::OnceLock::new(),
            #[cfg(target_os = "linux")]
            shm: std::sync::OnceLock::new(),
        }
    }

    /// Moves the frames to the shared region's rings (both sides announced `shm` and the
    /// worker is `Loaded`): from now on the socket carries only doorbell bytes. Nothing
    /// may be buffered from the socket at this point.
    #[cfg(target_os = "linux")]
    pub fn use_shm(&self, region: Arc<crate::protocol::shm::Region>) -> Result<(), String> {
        use crate::protocol::shm::Ring;
        let state = self.lock();
        if state.buf.as_ref().is_some_and(|b| b.partial().is_some()) {
            return Err("the worker sent bytes after `Loaded` on the socket".into());
        }
        let link = ShmLink {
            rx: Mutex::new(region.reader(Ring::Reply)),
            tx: Mutex::new(region.writer(Ring::Request)),
            region,
        };
        self.shm
            .set(link)
            .map_err(|_| "the connection already uses shared memory".to_string())
    }

    /// Whether frames travel through shared memory.
    pub fn uses_shm(&self) -> bool {
        #[cfg(target_os = "linux")]
        return self.link().is_some();
        #[cfg(not(target_os = "linux"))]
        false
    }

    #[cfg(target_os = "linux")]
    fn link(&self) -> Option<&ShmLink> {
        self.shm.get()
    }

    /// Makes sure the worker will read what the host put in the request ring: rings the
    /// doorbell if its reader sleeps; wakes a standby thread if no thread reads (its
    /// reader went off to run a call) and none was woken yet.
    #[cfg(target_os = "linux")]
    fn kick_worker(&self, link: &ShmLink) {
        if link.region.worker_needs_doorbell() {
            crate::protocol::shm::ring_doorbell(self.stream.socket());
        } else if link.region.worker_vacant() {
            let unread = {
                let mut tx = link.tx.lock().unwrap_or_else(|e| e.into_inner());
                tx.unread().is_ok_and(|n| n > 0)
            };
            if unread {
                link.region.claim_and_wake_standby();
            }
        }
        // Otherwise READING, WAKING, or whatever a hostile worker wrote there: nothing to do.
    }

    /// Reads (and drops) doorbell bytes: `Ok(0)` at end of stream, `WouldBlock` when none.
    #[cfg(target_os = "linux")]
    fn drain_doorbell(&self) -> io::Result<usize> {
        use std::io::Read;
        let mut bytes = [0u8; 4096];
        (&mut self.stream.socket()).read(&mut bytes)
    }

    /// Reads once from the transport into `buf`.
    fn fill(&self, buf: &mut FrameBuffer) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        if let Some(link) = self.link() {
            let mut rx = link.rx.lock().unwrap_or_else(|e| e.into_inner());
            return match buf.fill_spare(&mut *rx) {
                // Nothing in the ring: the socket says whether the worker is still there.
                // (This read costs a system call on every empty look, but it overlaps the
                // wait for the worker, and it lets streamed items gather: done only before
                // sleeping instead, 16 B calls were no faster and streams 27% slower.)
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(rx);
                    match self.drain_doorbell()? {
                        0 => Ok(0),
                        // Doorbells only: look at the ring again (after a yield).
                        _ => Err(io::ErrorKind::Interrupted.into()),
                    }
                }
                other => other,
            };
        }
        self.stream.fill(buf)
    }

    /// Waits until the transport may have something to read.
    fn poll_wait(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<()>> {
        #[cfg(target_os = "linux")]
        if let Some(link) = self.link() {
            let ready = || link.rx.lock().unwrap_or_else(|e| e.into_inner()).has_data();
            if link
                .region
                .spin_until(crate::protocol::shm::Side::Host, HOST_SPIN, ready)
                || !link.region.host_may_sleep(ready)
            {
                return Poll::Ready(Ok(()));
            }
            // A doorbell written since the last drain is in the socket: readable at once.
            return self.stream.poll_readable(cx);
        }
        self.stream.poll_readable(cx)
    }

    /// Writes what fits of `a` then `b`; returns how much.
    async fn write_some(&self, a: &[u8], b: &[u8]) -> io::Result<usize> {
        #[cfg(target_os = "linux")]
        if let Some(link) = self.link() {
            let mut backoff = Duration::from_micros(20);
            loop {
                let written = link
                    .tx
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .try_write(&[a, b]);
                match written {
                    Ok(n) => {
                        self.kick_worker(link);
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // The ring is full: the worker must read to make room.
                        if self.closed().is_some() {
                            return Err(io::ErrorKind::BrokenPipe.into());
                        }
                        self.kick_worker(link);
                        smol::Timer::after(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(1));
                    }
                    Err(e) => {
                        // An impossible read position: the worker scribbled on the region.
                        self.close(CloseReason::Protocol(e.to_string()));
                        return Err(e);
                    }
                }
            }
        }
        self.stream.write(a, b).await
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the frame limit after the handshake.
    pub fn set_max_frame(&self, max: u32) {
        self.max_frame
            .store(max, std::sync::atomic::Ordering::Relaxed);
        if let Some(buf) = self.lock().buf.as_mut() {
            buf.set_max(max);
        }
    }

    /// Sets what to tell when a call starts waiting on a host call (once).
    pub fn on_waiting(&self, f: Box<dyn Fn() + Send + Sync>) {
        let _ = self.on_waiting.set(f);
    }

    /// Calls that wait on a host call now: they hold no worker thread's plugin code, so
    /// the pool does not count them as load (a host function may call the plugin back).
    pub fn waiting_on_host(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Why the connection closed, if it did.
    pub fn closed(&self) -> Option<Closed> {
        self.lock().closed.clone()
    }

    /// Number of calls waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// Writes one frame. Small frames go out in one write; large payloads are written from
    /// the caller's buffer with a vectored write (no copy).
    ///
    /// Cancel-safe: if the future is dropped after part of the frame went out, the rest is
    /// copied and finished by a background task that keeps the write lock, so the stream
    /// never carries half a frame followed by another.
    pub async fn send(self: &Arc<Self>, message: &Message, payload: &[u8]) -> io::Result<()> {
        let mut head = encode_head(message, payload.len());
        let payload = if payload.len() <= 16 * 1024 {
            head.extend_from_slice(payload);
            &[][..]
        } else {
            payload
        };
        let lock = self.write_lock.lock_arc().await;
        let mut write = FrameWrite {
            conn: self,
            lock: Some(lock),
            a: &head,
            b: payload,
            started: false,
        };
        while !write.a.is_empty() || !write.b.is_empty() {
            let (a, b) = (write.a, write.b);
            let written = self.write_some(a, b).await;
            let n = match written {
                Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                other => other,
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    // Nothing to finish: the caller closes the connection.
                    write.a = &[];
                    write.b = &[];
                    return Err(e);
                }
            };
            write.started = true;
            let from_a = n.min(a.len());
            write.a = &a[from_a..];
            write.b = &b[n - from_a..];
        }
        Ok(())
    }

    /// Reads one frame outside the call machinery (handshake only, before any call).
    pub async fn recv(&self) -> Result<Frame, FrameError> {
        let mut buf = self
            .lock()
            .buf
            .take()
            .expect("recv runs before calls start");
        let result = loop {
            match buf.next_frame() {
                Ok(Some(frame)) => break Ok(frame),
                Ok(None) => {}
                Err(e) => break Err(e),
            }
            let filled = self.stream.fill_wait(&mut buf).await;
            match filled {
                Ok(0) => {
                    break Err(match buf.partial() {
                        Some((have, need)) => FrameError::Truncated { have, need },
                        None => FrameError::Eof,
                    })
                }
                Ok(_) => {}
                Err(e) => break Err(FrameError::Io(e)),
            }
        };
        self.lock().buf = Some(buf);
        result
    }

    /// Cuts the connection: every waiting call fails with `reason`.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        self.close_locked(&mut state, reason);
    }

    fn close_locked(&self, state: &mut State, reason: CloseReason) {
        if state.closed.is_some() {
            return;
        }
        let mut in_flight: Vec<String> = state.pending.values().map(|p| p.method.clone()).collect();
        in_flight.sort();
        (self.on_close)(&reason);
        state.closed = Some(Closed { reason, in_flight });
        for pending in state.pending.values_mut() {
            if let Some(cancel) = &pending.cancel {
                cancel.cancel();
            }
            if let Some(w) = pending.waker.take() {
                w.wake();
            }
        }
        self.stream.shutdown();
    }

    /// Registers call `id` as waiting for a reply. Dropping the guard abandons it (a late
    /// reply is then discarded).
    fn register(
        self: &Arc<Self>,
        id: u64,
        method: &str,
        progress: Option<ProgressFn>,
        stream: Option<StreamState>,
    ) -> Result<CallGuard, Closed> {
        let mut state = self.lock();
        if let Some(closed) = &state.closed {
            return Err(closed.clone());
        }
        Ok(self.register_locked(&mut state, id, method, progress, stream))
    }

    /// [`Conn::register`] on an open connection, its state already locked.
    fn register_locked(
        self: &Arc<Self>,
        state: &mut State,
        id: u64,
        method: &str,
        progress: Option<ProgressFn>,
        stream: Option<StreamState>,
    ) -> CallGuard {
        let pending = Pending {
            method: method.to_string(),
            waker: None,
            reply: None,
            progress,
            cancel: None,
            stream,
            spare: None,
        };
        state.pending.insert(id, pending);
        if id & PING_BIT == 0 {
            state.max_issued = state.max_issued.max(id);
        }
        CallGuard {
            conn: self.clone(),
            id,
            reader: false,
            epoch: 0,
            answered: false,
        }
    }

    /// Sends a call; wait for its reply with [`CallGuard::reply`]. An error means the
    /// call never reached the worker (the connection was closed before, or the frame
    /// could not be written whole), so it is safe to send it elsewhere.
    pub async fn call(
        self: &Arc<Self>,
        id: u64,
        method: &str,
        input: &[u8],
        progress: Option<ProgressFn>,
        stream: Option<StreamState>,
    ) -> Result<CallGuard, Closed> {
        let (window, window_bytes) = stream
            .as_ref()
            .map_or((0, 0), |s| (s.window, s.window_bytes));
        let mut guard = self.register(id, method, progress, stream)?;
        let message = Message::Call {
            id,
            method: method.to_string(),
            window,
            window_bytes,
        };
        if let Err(e) = self.send(&message, input).await {
            self.close(CloseReason::from_io("sending a call", &e));
            guard.answered = true;
            let closed = self.closed().unwrap_or(Closed {
                reason: CloseReason::Eof,
                in_flight: Vec::new(),
            });
            return Err(closed);
        }
        Ok(guard)
    }

    /// A call by the shortest path (shared memory only): written at once when nothing
    /// else is being written and the frame fits in the request ring, then, if no other
    /// call holds the reader role, its reply awaited by spinning on the reply ring on this
    /// thread (no timer, no waker, no system call) for as long as [`HOST_SPIN`], the
    /// deadline or a cancellation allow. A reply that does not come by then is awaited
    /// like any other, with the guard returned ([`Lone::Waiting`], reader role kept).
    /// Whatever else arrives meanwhile (other calls' replies, logs, host calls) is
    /// delivered as usual.
    ///
    /// `input` is taken once the frame is written (a large reply goes into its memory).
    #[cfg(target_os = "linux")]
    pub fn call_lone(
        self: &Arc<Self>,
        id: u64,
        method: &str,
        input: &mut Vec<u8>,
        progress: Option<ProgressFn>,
        deadline: Instant,
        cancel: Option<&CancelHandle>,
    ) -> Lone {
        let Some(link) = self.link() else {
            return Lone::NotTaken;
        };
        let Some(mut write) = self.write_lock.try_lock() else {
            return Lone::NotTaken;
        };
        let call = CallHead {
            id,
            method,
            window: 0,
            window_bytes: 0,
        };
        encode_head_into(&mut write, &call, input.len());
        let head = &write[..];
        let mut tx = link.tx.lock().unwrap_or_else(|e| e.into_inner());
        let fits = tx
            .unread()
            .is_ok_and(|unread| link.region.capacity() - unread >= head.len() + input.len());
        if !fits {
            return Lone::NotTaken;
        }
        let mut guard = {
            let mut state = self.lock();
            if state.closed.is_some() {
                return Lone::NotTaken;
            }
            let mut guard = self.register_locked(&mut state, id, method, progress, None);
            // The reader role too, if nobody holds it.
            if !state.reader_busy && state.buf.is_some() {
                state.reader_busy = true;
                state.reader_epoch += 1;
                state.reader_seen = Instant::now();
                guard.reader = true;
                guard.epoch = state.reader_epoch;
            }
            guard
        };
        // The ring had room for the whole frame and only the worker reads it (making
        // more room): it goes in whole, or the worker broke the ring.
        match tx.try_write(&[head, input]) {
            Ok(n) if n == head.len() + input.len() => {}
            Ok(_) => unreachable!("the free space was checked under the write lock"),
            Err(e) => {
                // The worker moved a position it does not own: cut off. The call never
                // reached it, so it may go to another worker (`call` says closed).
                drop(tx);
                self.close(CloseReason::Protocol(e.to_string()));
                guard.answered = true;
                return Lone::NotTaken;
            }
        }
        drop(tx);
        self.kick_worker(link);
        drop(write);
        if input.capacity() >= SPARE_MIN {
            guard.give_buffer(std::mem::take(input));
        }
        if !guard.reader {
            return Lone::Waiting(guard);
        }
        let cancelled = || cancel.is_some_and(CancelHandle::is_cancelled);
        // One bound for the whole spin, however many other frames arrive meanwhile.
        let until = (Instant::now() + HOST_SPIN).min(deadline);
        loop {
            let limit = until.saturating_duration_since(Instant::now());
            if limit.is_zero() {
                return Lone::Waiting(guard);
            }
            let ready =
                || link.rx.lock().unwrap_or_else(|e| e.into_inner()).has_data() || cancelled();
            if !link
                .region
                .spin_until(crate::protocol::shm::Side::Host, limit, ready)
                || cancelled()
            {
                return Lone::Waiting(guard);
            }
            // Still this call's role? A caller that found it stale (this thread held
            // up for longer than `STALE_READER`) may have taken it over meanwhile.
            let taken = {
                let mut state = self.lock();
                if state.reader_epoch == guard.epoch {
                    state.reader_seen = Instant::now();
                    state.buf.take()
                } else {
                    None
                }
            };
            let Some(mut buf) = taken else {
                return Lone::Waiting(guard);
            };
            let (frames, failure, _) = self.read_available(&mut buf, true);
            self.deliver(buf, frames, failure);
            let mut state = self.lock();
            let answer = match state.pending.get_mut(&id).and_then(|p| p.reply.take()) {
                Some(reply) => Ok(reply),
                None => match &state.closed {
                    Some(closed) => Err(closed.clone()),
                    None => continue,
                },
            };
            drop(state);
            guard.answered = true;
            return Lone::Done(answer);
        }
    }

    /// Pings the worker and waits for its `Pong`.
    pub async fn ping(self: &Arc<Self>, seq: u64) -> Result<(), Closed> {
        let mut guard = self.register(PING_BIT | seq, "ping", None, None)?;
        if let Err(e) = self.send(&Message::Ping { seq }, &[]).await {
            self.close(CloseReason::from_io("sending a ping", &e));
        }
        guard.reply().await.map(|_| ())
    }

    /// Reads whatever is available without blocking. Returns the frames read, why the
    /// connection must close (if it must), and whether the socket would block.
    /// `stop_at_frames`: return as soon as some frames are in, to deliver them promptly.
    fn read_available(
        &self,
        buf: &mut FrameBuffer,
        stop_at_frames: bool,
    ) -> (Vec<Frame>, Option<CloseReason>, bool) {
        let mut frames = Vec::new();
        // A large reply goes into its call's spare buffer, if it left one.
        let spare = |message: &Message, _: usize| match message {
            Message::Reply { id, .. } => {
                self.lock().pending.get_mut(id).and_then(|p| p.spare.take())
            }
            _ => None,
        };
        loop {
            match buf.next_frame_with(spare) {
                Ok(Some(frame)) => {
                    frames.push(frame);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return (frames, Some(CloseReason::Protocol(e.to_string())), false),
            }
            if stop_at_frames && !frames.is_empty() {
                return (frames, None, false);
            }
            match self.fill(buf) {
                Ok(0) => {
                    let reason = match buf.partial() {
                        Some((have, need)) => {
                            CloseReason::Protocol(FrameError::Truncated { have, need }.to_string())
                        }
                        None => CloseReason::Eof,
                    };
                    return (frames, Some(reason), false);
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (frames, None, true),
                // Doorbell bytes only (shared memory): report progress, so that a worker
                // writing nothing but doorbells cannot hold this loop.
                Err(e) if e.kind() == io::ErrorKind::Interrupted && self.uses_shm() => {
                    return (frames, None, false)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // An impossible position in the shared region: the worker scribbled on it.
                Err(e) if e.kind() == io::ErrorKind::InvalidData && self.uses_shm() => {
                    return (frames, Some(CloseReason::Protocol(e.to_string())), false)
                }
                Err(e) => return (frames, Some(CloseReason::from_io("reading", &e)), false),
            }
        }
    }

    /// Puts the buffer back, routes the frames (completing calls), closes the connection
    /// if `failure` says so, then runs callbacks outside the lock.
    fn deliver(
        self: &Arc<Self>,
        buf: FrameBuffer,
        frames: Vec<Frame>,
        mut failure: Option<CloseReason>,
    ) {
        let mut state = self.lock();
        state.buf = Some(buf);
        let mut deferred = Vec::new();
        for frame in frames {
            if let Err(violation) = self.dispatch(&mut state, frame, &mut deferred) {
                failure.get_or_insert(CloseReason::Protocol(violation));
                break;
            }
        }
        if let Some(reason) = failure {
            self.close_locked(&mut state, reason);
        }
        drop(state);
        self.run_deferred(deferred);
    }

    /// Called once the worker process is gone: reads what it wrote before dying (replies
    /// that made it out still reach their callers; half a frame is a protocol error), then
    /// closes. If a reader is mid-read it sees the end itself.
    pub fn finish_after_exit(self: &Arc<Self>) {
        for _ in 0..2000 {
            let mut state = self.lock();
            if state.closed.is_some() {
                return;
            }
            if !state.reader_busy {
                // Take the reader role for this one read.
                let Some(mut buf) = state.buf.take() else {
                    return;
                };
                state.reader_busy = true;
                drop(state);
                let (frames, failure, _) = self.read_available(&mut buf, false);
                // With the process gone, "would block" means something else holds the
                // socket open; the worker is over all the same.
                self.deliver(buf, frames, Some(failure.unwrap_or(CloseReason::Eof)));
                Conn::release_reader(&mut self.lock());
                return;
            }
            // A caller holds the reader role; the end of the stream wakes it and it will
            // report precisely what it finds. Give it a moment.
            drop(state);
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Hands the reader role to another waiting call, if any.
    fn release_reader(state: &mut State) {
        state.reader_busy = false;
        if let Some(w) = state.pending.values_mut().find_map(|p| p.waker.take()) {
            w.wake();
        }
    }

    /// Routes one frame from the worker.
    fn dispatch(
        &self,
        state: &mut State,
        frame: Frame,
        deferred: &mut Vec<Deferred>,
    ) -> Result<(), String> {
        match frame.message {
            Message::Reply { id, status } => match state.pending.get_mut(&id) {
                Some(p) if p.reply.is_some() || id & PING_BIT != 0 => {
                    return Err(format!("a second reply to call id {id}"))
                }
                Some(p) => {
                    p.reply = Some((status, frame.payload));
                    if let Some(w) = p.waker.take() {
                        w.wake();
                    }
                }
                // A late reply to a call its caller gave up on: discarded, once.
                None if state.abandoned.remove(&id) => {}
                None if id <= state.max_issued => {
                    return Err(format!("a second reply to call id {id}"))
                }
                None => return Err(format!("reply to call id {id}, which was never sent")),
            },
            Message::Event {
                id,
                fraction,
                message,
            } => {
                if let Some(progress) = state.pending.get(&id).and_then(|p| p.progress.clone()) {
                    deferred.push(Deferred::Progress(
                        progress,
                        Progress::new(fraction, &message),
                    ));
                }
            }
            Message::Log { level, message, .. } => deferred.push(Deferred::Log(level, message)),
            Message::HostCall { id, seq, name } => {
                let request = self.accept_host_call(state, id, seq, name, frame.payload)?;
                deferred.push(Deferred::HostCall(request));
            }
            Message::Item { id } => match state.pending.get_mut(&id) {
                Some(Pending {
                    stream: Some(stream),
                    ..
                }) => {
                    let len = frame.payload.len() as u64;
                    let fits = stream.out_items < stream.window
                        && (stream.out_items == 0
                            || stream.out_bytes.saturating_add(len) <= stream.window_bytes);
                    if !fits {
                        return Err(format!(
                            "stream item for call id {id} past the window the host granted \
                             ({} items, {} bytes outstanding; window {} items, {} bytes)",
                            stream.out_items, stream.out_bytes, stream.window, stream.window_bytes
                        ));
                    }
                    stream.out_items += 1;
                    stream.out_bytes = stream.out_bytes.saturating_add(len);
                    // The consumer may be gone (stream dropped): the item is dropped too.
                    let _ = stream.items.try_send(frame.payload);
                }
                Some(_) => {
                    return Err(format!(
                        "stream item for call id {id}, which is not a streaming call"
                    ))
                }
                None if state.abandoned.contains(&id) => {}
                None => {
                    return Err(format!(
                        "stream item for call id {id}, which is not running"
                    ))
                }
            },
            Message::Pong { seq } => {
                if let Some(p) = state.pending.get_mut(&(PING_BIT | seq)) {
                    p.reply = Some((0, Vec::new()));
                    if let Some(w) = p.waker.take() {
                        w.wake();
                    }
                }
            }
            // The host does not answer pings from the worker; they are harmless.
            Message::Ping { .. } | Message::Unknown => {}
            other => return Err(format!("unexpected message from the worker: {other:?}")),
        }
        Ok(())
    }

    /// Grants a streaming call `items` more items and `bytes` more bytes: the consumer
    /// took that many.
    pub async fn credit(self: &Arc<Self>, id: u64, items: u32, bytes: u64) {
        {
            let mut state = self.lock();
            let Some(stream) = state.pending.get_mut(&id).and_then(|p| p.stream.as_mut()) else {
                return;
            };
            stream.out_items = stream.out_items.saturating_sub(items);
            stream.out_bytes = stream.out_bytes.saturating_sub(bytes);
        }
        let _ = self.send(&Message::Credit { id, items, bytes }, &[]).await;
    }

    /// A host call ended (answered, or its answer could not be sent).
    fn host_call_done(&self, id: u64, seq: u64) {
        let mut state = self.lock();
        let Some(held) = state.host_calls.remove(&(id, seq)) else {
            return;
        };
        state.host_call_bytes -= held.bytes;
        if !held.waiting {
            return;
        }
        if let Some(n) = state.waiting_on_host.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                state.waiting_on_host.remove(&id);
            }
        }
        self.waiting.store(
            state.waiting_on_host.len(),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// Accounts for a host call from the worker: refused (at once, without running
    /// anything) past the limits or for a call that is over; a protocol violation when
    /// the worker reuses an outstanding `(id, seq)` or ignores its refusals.
    fn accept_host_call(
        &self,
        state: &mut State,
        id: u64,
        seq: u64,
        name: String,
        input: Vec<u8>,
    ) -> Result<HostCallRequest, String> {
        if state.host_calls.contains_key(&(id, seq)) {
            return Err(format!(
                "a second host call with seq {seq} for call id {id} while the first runs"
            ));
        }
        if state.host_calls.len() >= HOST_CALLS_CUTOFF {
            return Err(format!(
                "more than {HOST_CALLS_CUTOFF} host calls outstanding (at most \
                 {HOST_CALLS_MAX} run; the rest were refused and not waited for)"
            ));
        }
        let bytes = input.len() as u64;
        let refuse = |status, why: String| Err((status, format!("host function `{name}`: {why}")));
        let work = if state.host_calls.len() >= HOST_CALLS_MAX {
            refuse(
                host_status::LIMIT,
                format!("more than {HOST_CALLS_MAX} host calls are outstanding in this worker"),
            )
        } else if state.host_call_bytes.saturating_add(bytes) > HOST_CALL_BYTES_MAX {
            refuse(
                host_status::LIMIT,
                format!(
                    "the host calls outstanding in this worker hold more than \
                     {HOST_CALL_BYTES_MAX} bytes of input"
                ),
            )
        } else {
            let closed = state.closed.is_some();
            match state.pending.get_mut(&id) {
                Some(p) if id & PING_BIT == 0 && p.reply.is_none() => {
                    // Made cancelled if the connection closed meanwhile (closing cancels
                    // the handles that exist).
                    let cancel = p.cancel.get_or_insert_with(|| {
                        let cancel = CancelHandle::new();
                        if closed {
                            cancel.cancel();
                        }
                        cancel
                    });
                    let call = HostCallInfo {
                        function: name.clone(),
                        method: p.method.clone(),
                        call_id: id,
                        cancel: cancel.clone(),
                    };
                    Ok((call, input))
                }
                _ => refuse(
                    host_status::CANCELLED,
                    "the call it was made for is over".to_string(),
                ),
            }
        };
        // A refused call's input is not kept, and its call does not count as waiting on
        // the host.
        let runs = work.is_ok();
        let held = HostCallHeld {
            bytes: if runs { bytes } else { 0 },
            waiting: runs,
        };
        state.host_calls.insert((id, seq), held);
        state.host_call_bytes += held.bytes;
        if runs {
            *state.waiting_on_host.entry(id).or_default() += 1;
            self.waiting.store(
                state.waiting_on_host.len(),
                std::sync::atomic::Ordering::Release,
            );
        }
        Ok(HostCallRequest { id, seq, work })
    }

    /// Answers a host call: its refusal at once, or runs it (on this thread if it answers
    /// at once, else on the executor), then sends the `HostReply`.
    fn start_host_call(self: &Arc<Self>, request: HostCallRequest) {
        let HostCallRequest { id, seq, work } = request;
        let run = match work {
            Ok((call, input)) => {
                let max_output = (self.max_frame.load(std::sync::atomic::Ordering::Relaxed)
                    as usize)
                    .saturating_sub(crate::protocol::FRAME_ROOM as usize);
                self.imports.run(call, input, self.grace, max_output)
            }
            Err((status, text)) => Box::pin(async move { (status, text.into_bytes()) }),
        };
        let conn = self.clone();
        let work: crate::backend::BoxFuture<()> = Box::pin(async move {
            let (status, output) = run.await;
            let _ = conn
                .send(&Message::HostReply { id, seq, status }, &output)
                .await;
            conn.host_call_done(id, seq);
        });
        if let Err(task) = crate::host_fn::start(work) {
            task.detach();
        }
    }

    fn run_deferred(self: &Arc<Self>, deferred: Vec<Deferred>) {
        for d in deferred {
            match d {
                Deferred::HostCall(request) => {
                    // A call now waiting on the host leaves room for another in the pool.
                    if let (true, Some(f)) = (request.work.is_ok(), self.on_waiting.get()) {
                        f();
                    }
                    self.start_host_call(request)
                }
                Deferred::Progress(f, p) => {
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(p))).is_err() {
                        tracing::warn!(plugin = %self.plugin, "a progress callback panicked");
                    }
                }
                Deferred::Log(level, message) => emit_log(&self.plugin, level, &message),
            }
        }
    }
}

/// A frame being written. Dropped half-way, it hands the rest to a background task.
struct FrameWrite<'a> {
    conn: &'a Arc<Conn>,
    lock: Option<smol::lock::MutexGuardArc<Vec<u8>>>,
    a: &'a [u8],
    b: &'a [u8],
    started: bool,
}

impl Drop for FrameWrite<'_> {
    fn drop(&mut self) {
        if !self.started || (self.a.is_empty() && self.b.is_empty()) {
            return;
        }
        let Some(lock) = self.lock.take() else { return };
        let rest = [self.a, self.b].concat();
        let conn = self.conn.clone();
        smol::spawn(async move {
            let _lock = lock;
            let finish = async {
                let mut rest = &rest[..];
                while !rest.is_empty() {
                    match conn.write_some(rest, &[]).await {
                        Ok(n) if n > 0 => rest = &rest[n..],
                        Ok(_) => return conn.close(CloseReason::Eof),
                        Err(e) => {
                            return conn
                                .close(CloseReason::from_io("finishing an abandoned frame", &e))
                        }
                    }
                }
            };
            // Until the frame is whole nothing else can be sent (no cancel, no other
            // call): a worker that does not take the rest within the cancel grace has
            // stopped reading, and is cut off like a call that ignores its deadline.
            let limit = conn.grace.max(ABANDONED_FRAME_MIN);
            let timed_out = futures_lite::future::or(
                async {
                    finish.await;
                    false
                },
                async {
                    smol::Timer::after(limit).await;
                    true
                },
            )
            .await;
            if timed_out {
                conn.close(CloseReason::Killed(format!(
                    "it stopped reading: a frame abandoned when its call ended was still not taken {limit:?} later"
                )));
            }
        })
        .detach();
    }
}

/// How [`Conn::call_lone`] went.
#[cfg(target_os = "linux")]
pub(crate) enum Lone {
    /// The call is over: its reply, or why the connection closed after it was sent.
    Done(Result<(i32, Vec<u8>), Closed>),
    /// Sent, not answered yet: wait for the reply with the guard.
    Waiting(CallGuard),
    /// Not sent (another frame is being written, the ring is too full, the connection
    /// is closed or was just cut off for a broken ring): send it with [`Conn::call`],
    /// which says whether the connection is closed.
    NotTaken,
}

/// One waiting call. Dropping it removes the call and passes on the reader role.
pub(crate) struct CallGuard {
    conn: Arc<Conn>,
    id: u64,
    reader: bool,
    /// The role's epoch when this guard took it.
    epoch: u64,
    /// Set once the reply (or the connection's end) was returned to the caller.
    answered: bool,
}

impl CallGuard {
    /// Waits for the reply: `(status, bytes)`, or why the connection closed.
    pub async fn reply(&mut self) -> Result<(i32, Vec<u8>), Closed> {
        let result = poll_fn(|cx| self.poll_reply(cx)).await;
        self.answered = true;
        result
    }

    /// Hands the call's input buffer over once it is sent: a large reply is read into
    /// it when it is about the right size (see [`FrameBuffer::next_frame_with`]).
    pub fn give_buffer(&self, buffer: Vec<u8>) {
        if buffer.capacity() < SPARE_MIN {
            return;
        }
        if let Some(p) = self.conn.lock().pending.get_mut(&self.id) {
            p.spare = Some(buffer);
        }
    }

    /// The caller gave up on the call but the guard lives on (to see the worker finish
    /// it): cancel its host calls now.
    pub fn cancel_host_calls(&self) {
        if let Some(p) = self.conn.lock().pending.get_mut(&self.id) {
            // Made now if it had no host call yet: later ones start cancelled.
            p.cancel.get_or_insert_with(CancelHandle::new).cancel();
        }
    }

    fn poll_reply(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Result<(i32, Vec<u8>), Closed>> {
        let conn = &self.conn;
        let mut rounds = 0;
        loop {
            let mut guard = conn.lock();
            let state = &mut *guard;
            let Some(pending) = state.pending.get_mut(&self.id) else {
                unreachable!("a pending call is only removed by its own guard");
            };
            if let Some(reply) = pending.reply.take() {
                return Poll::Ready(Ok(reply));
            }
            if let Some(closed) = &state.closed {
                return Poll::Ready(Err(closed.clone()));
            }
            if self.reader && state.reader_epoch != self.epoch {
                // Taken over while this future was not being polled.
                self.reader = false;
            }
            if !self.reader {
                let stale = state.reader_busy
                    && state.buf.is_some()
                    && state.reader_seen.elapsed() > STALE_READER;
                if state.reader_busy && !stale {
                    pending.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                state.reader_busy = true;
                state.reader_epoch += 1;
                self.epoch = state.reader_epoch;
                self.reader = true;
                state.reader_seen = Instant::now();
                // If the role is taken from this future while it waits, its reply must
                // still wake it.
                pending.waker = Some(cx.waker().clone());
                // A reply cannot be here yet when the reader role was just taken with
                // nothing buffered: wait for readability first instead of a read that
                // would only return EAGAIN.
                let buffered = state.buf.as_ref().is_some_and(FrameBuffer::has_frame);
                if !buffered && !conn.uses_shm() && conn.stream.poll_readable(cx).is_pending() {
                    return Poll::Pending;
                }
            } else {
                state.reader_seen = Instant::now();
                if pending
                    .waker
                    .as_ref()
                    .is_none_or(|w| !w.will_wake(cx.waker()))
                {
                    pending.waker = Some(cx.waker().clone());
                }
            }
            let mut buf = state.buf.take().expect("the reader role owns the buffer");
            drop(guard);

            let (frames, failure, would_block) = conn.read_available(&mut buf, true);
            conn.deliver(buf, frames, failure);
            if !would_block {
                // A worker that writes without pause must not keep this poll from ending:
                // let the caller's deadline and other tasks run, then read on.
                rounds += 1;
                if rounds >= READS_PER_POLL {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            }
            match conn.poll_wait(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => conn.close(CloseReason::Io(e.to_string())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let mut state = self.conn.lock();
        let removed = state.pending.remove(&self.id);
        if let Some(cancel) = removed.as_ref().and_then(|p| p.cancel.as_ref()) {
            // Whatever host calls it still has are moot now.
            cancel.cancel();
        }
        let abandoned = removed.is_some_and(|p| p.reply.is_none())
            && !self.answered
            && state.closed.is_none()
            && self.id & PING_BIT == 0;
        if abandoned {
            state.abandoned.insert(self.id);
            // The caller gave up (dropped the future): tell the plugin, as at a deadline.
            let (conn, id) = (self.conn.clone(), self.id);
            smol::spawn(async move {
                let _ = conn.send(&Message::Cancel { id }, &[]).await;
            })
            .detach();
        }
        if self.reader && state.reader_epoch == self.epoch {
            state.reader_busy = false;
        }
        // Nobody reading (we held the role, or were woken to take it but no longer need
        // it): hand it to another waiting call.
        if !state.reader_busy {
            Conn::release_reader(&mut state);
        }
    }
}
