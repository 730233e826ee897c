//! The shared-memory transport (Linux): two byte rings in one sealed `memfd` region.
//!
//! After the handshake, when both sides announce [`FEATURE_SHM`](crate::FEATURE_SHM),
//! frames stop travelling through the socket: the host writes them into the *request*
//! ring and the worker into the *reply* ring, in exactly the socket's byte format (so the
//! framing, its limits and every message are unchanged). The socket stays for the
//! handshake, for liveness (its end-of-file is still how a dead worker is noticed at once)
//! and as the doorbell: a side about to sleep says so in the region, and the other side,
//! after publishing bytes, writes one byte to the socket to wake it.
//!
//! Each ring is single-producer, single-consumer. Positions are `u64` byte counts that
//! only grow; a position's offset in the ring is `pos % capacity` (the capacity is a power
//! of two). The producer owns `tail`, the consumer owns `head`; each keeps its own copy
//! and only *reads* the other's from the region.
//!
//! The region is shared with a process that may be hostile. Nothing read from it is
//! trusted: a peer's position is checked against the reader's own (no more than
//! `capacity` ahead, never backwards) before it is used, every copy is bounded by the
//! capacity, and the bytes themselves go through the same frame decoder as the socket's.
//! The host seals the region's size, so the worker cannot shrink it under the host
//! (which would turn the host's next access into `SIGBUS`).
//!
//! ```
//! use plugin_host_protocol::shm::{Region, Ring};
//!
//! let (host, fd) = Region::create(64 * 1024).unwrap();
//! let worker = Region::open(&fd).unwrap();
//! let mut tx = host.writer(Ring::Request);
//! let mut rx = worker.reader(Ring::Request);
//! assert_eq!(tx.try_write(&[b"hello, ", b"worker"]).unwrap(), 13);
//! let mut buf = [0u8; 32];
//! let n = std::io::Read::read(&mut rx, &mut buf).unwrap();
//! assert_eq!(&buf[..n], b"hello, worker");
//! ```

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

/// `"PHSHM01\0"`: the region's first eight bytes.
const MAGIC: u64 = u64::from_le_bytes(*b"PHSHM01\0");
/// The layout's version (the region's bytes 8..12).
const LAYOUT: u32 = 1;

// The header: one cache line each for what one side writes, so the two sides never
// share a line they both write.
const OFF_MAGIC: usize = 0;
const OFF_LAYOUT: usize = 8;
const OFF_CAPACITY: usize = 16;
const OFF_REQ_TAIL: usize = 64; // host writes
const OFF_REQ_HEAD: usize = 128; // worker writes
const OFF_REP_TAIL: usize = 192; // worker writes
const OFF_REP_HEAD: usize = 256; // host writes
const OFF_HOST_SLEEP: usize = 320; // host sets, worker clears
const OFF_WORKER_STATE: usize = 384; // worker sets, host moves SLEEPING -> READING
const OFF_STANDBY: usize = 448; // futex word: the host bumps it to wake a standby thread
const OFF_HOST_CPU: usize = 512; // host writes: the CPU its waiting thread last ran on
const OFF_WORKER_CPU: usize = 576; // worker writes: likewise
/// No CPU noted yet (a peer that never notes one, as one built before, reads as this).
const NO_CPU: u32 = u32::MAX;
/// Where the rings' bytes start.
const DATA: usize = 4096;

/// A writer publishes its position after every this many bytes of a large write, so that
/// the reader's copy overlaps the writer's.
const PUBLISH_EVERY: usize = 128 * 1024;

/// Smallest ring capacity accepted.
pub const MIN_CAPACITY: usize = 4096;
/// Largest ring capacity accepted.
pub const MAX_CAPACITY: usize = 1 << 30;
/// The capacity of each ring unless the host asks for another: a 1 MiB payload and its
/// header fit whole.
pub const DEFAULT_CAPACITY: usize = 2 << 20;

/// What the worker's reader is doing, as the host sees it (`worker_state`).
pub mod worker_state {
    /// A thread is reading the request ring (spinning or working through frames).
    pub const READING: u32 = 0;
    /// The reading thread sleeps until the host writes a byte to the socket.
    pub const SLEEPING: u32 = 1;
    /// No thread reads: the last reader went off to run a call. A standby thread takes
    /// over when the host bumps the standby word.
    pub const VACANT: u32 = 2;
    /// Vacant, and a standby thread was woken to take over (no need to wake another).
    pub const WAKING: u32 = 3;
}

/// One of the region's two rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Host to worker.
    Request,
    /// Worker to host.
    Reply,
}

impl Ring {
    fn offsets(self, capacity: usize) -> (usize, usize, usize) {
        match self {
            Ring::Request => (OFF_REQ_TAIL, OFF_REQ_HEAD, DATA),
            Ring::Reply => (OFF_REP_TAIL, OFF_REP_HEAD, DATA + capacity),
        }
    }
}

/// A mapped region: the header and both rings.
pub struct Region {
    base: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: the region is plain shared memory; every access from this side goes through
// atomics (the control words) or bounded copies made by the one reader or writer of a
// ring, so sharing the mapping between threads adds nothing beyond what sharing it with
// the other process already requires.
unsafe impl Send for Region {}
// SAFETY: as for `Send`.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Region {
    /// The host's side: creates a sealed memfd with two rings of `capacity` bytes each
    /// (rounded up to a power of two, within [`MIN_CAPACITY`]..=[`MAX_CAPACITY`]), maps
    /// it and writes the header. Returns the mapping and the descriptor to hand the
    /// worker.
    pub fn create(capacity: usize) -> io::Result<(Arc<Region>, OwnedFd)> {
        let capacity = capacity
            .clamp(MIN_CAPACITY, MAX_CAPACITY)
            .next_power_of_two();
        let len = DATA + 2 * capacity;
        let fd = rustix::fs::memfd_create(
            "plugin-host-shm",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        // Neither side can change the size from now on: a worker shrinking the region
        // would make the host's next access fault.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        let region = Region::map(&fd, len, capacity)?;
        region
            .word64(OFF_CAPACITY)
            .store(capacity as u64, Ordering::Relaxed);
        region.word32(OFF_LAYOUT).store(LAYOUT, Ordering::Relaxed);
        region.word32(OFF_HOST_CPU).store(NO_CPU, Ordering::Relaxed);
        region
            .word32(OFF_WORKER_CPU)
            .store(NO_CPU, Ordering::Relaxed);
        region.word64(OFF_MAGIC).store(MAGIC, Ordering::Release);
        Ok((Arc::new(region), fd))
    }

    /// The worker's side: maps the region the host created and checks its header
    /// against the descriptor's size.
    pub fn open(fd: impl AsFd) -> Result<Arc<Region>, String> {
        let fd = fd.as_fd();
        let stat = rustix::fs::fstat(fd).map_err(|e| format!("fstat of the shared region: {e}"))?;
        let len = usize::try_from(stat.st_size)
            .ok()
            .filter(|l| (DATA + 2 * MIN_CAPACITY..=DATA + 2 * MAX_CAPACITY).contains(l))
            .ok_or_else(|| format!("the shared region's size {} is out of range", stat.st_size))?;
        let mut region =
            Region::map(fd, len, 0).map_err(|e| format!("mapping the shared region: {e}"))?;
        if region.word64(OFF_MAGIC).load(Ordering::Acquire) != MAGIC {
            return Err("the shared region has no plugin-host header".into());
        }
        let layout = region.word32(OFF_LAYOUT).load(Ordering::Relaxed);
        if layout != LAYOUT {
            return Err(format!(
                "the shared region's layout {layout} is not {LAYOUT}"
            ));
        }
        let capacity = region.word64(OFF_CAPACITY).load(Ordering::Relaxed);
        let fits = usize::try_from(capacity).ok().filter(|&c| {
            c.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&c) && DATA + 2 * c == len
        });
        let Some(capacity) = fits else {
            return Err(format!(
                "the shared region's ring capacity {capacity} does not match its size {len}"
            ));
        };
        region.capacity = capacity;
        Ok(Arc::new(region))
    }

    fn map(fd: impl AsFd, len: usize, capacity: usize) -> io::Result<Region> {
        // SAFETY: a fresh shared mapping of the whole descriptor (its size was checked
        // or set by the caller and is sealed by the host); no existing memory is
        // replaced since the address is chosen by the kernel.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::InvalidData)?;
        Ok(Region {
            base,
            len,
            capacity,
        })
    }

    /// Each ring's capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= DATA);
        // SAFETY: `off` is one of the header's constants: 8-byte aligned (the mapping is
        // page-aligned), inside the mapping, which lives as long as `self`. Another
        // process may change the word at any time; that is what atomics allow.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU64>() }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= DATA);
        // SAFETY: as in `word64`, 4-byte aligned.
        unsafe { &*self.base.as_ptr().add(off).cast::<AtomicU32>() }
    }

    /// The word the host sets before it sleeps on the socket; the worker, seeing it set
    /// after publishing a reply, clears it and writes a byte to the socket.
    pub fn host_sleep(&self) -> &AtomicU32 {
        self.word32(OFF_HOST_SLEEP)
    }

    /// What the worker's reader is doing ([`worker_state`]).
    pub fn worker_state(&self) -> &AtomicU32 {
        self.word32(OFF_WORKER_STATE)
    }

    /// The host's reader, about to sleep on the socket: says so in `host_sleep`, then
    /// looks at the reply ring once more (`ready`). Returns whether it may sleep; if not,
    /// the flag is taken back. The fence pairs with [`Region::host_needs_doorbell`]'s, so
    /// a reply published meanwhile is either seen here or rings the doorbell.
    pub fn host_may_sleep(&self, ready: impl Fn() -> bool) -> bool {
        self.host_sleep().store(1, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if ready() {
            self.host_sleep().store(0, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The worker, after publishing into the reply ring: whether the host's reader sleeps
    /// and must get a doorbell byte (the flag is cleared: one byte per sleep).
    pub fn host_needs_doorbell(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        self.host_sleep().swap(0, Ordering::SeqCst) == 1
    }

    /// The worker's reader, about to sleep on the socket: says so in `worker_state`, then
    /// looks at the request ring once more (`ready`). Returns whether it may sleep; if
    /// not, it is reading again. Pairs with [`Region::worker_needs_doorbell`].
    pub fn worker_may_sleep(&self, ready: impl Fn() -> bool) -> bool {
        self.worker_state()
            .store(worker_state::SLEEPING, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if ready() {
            self.worker_reading();
            return false;
        }
        true
    }

    /// A worker thread holds the reader role and reads (after a sleep, or on taking it).
    pub fn worker_reading(&self) {
        self.worker_state()
            .store(worker_state::READING, Ordering::SeqCst);
    }

    /// The worker's reader leaves the role vacant to run a call. The fence orders that
    /// before the caller's last look at the request ring (pairs with the host's look at
    /// the state in [`Region::worker_needs_doorbell`]).
    pub fn worker_vacates(&self) {
        self.worker_state()
            .store(worker_state::VACANT, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The host, after publishing into the request ring: whether the worker's reader
    /// sleeps and must get a doorbell byte (its state moves to reading: one byte per
    /// sleep).
    pub fn worker_needs_doorbell(&self) -> bool {
        use worker_state::{READING, SLEEPING};
        std::sync::atomic::fence(Ordering::SeqCst);
        let state = self.worker_state();
        // A plain load first: the compare-and-swap would take the line from the worker
        // on every call even when its reader is awake.
        state.load(Ordering::SeqCst) == SLEEPING
            && state
                .compare_exchange(SLEEPING, READING, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
    }

    /// Whether the worker's reader role is vacant (no thread reads; no standby woken yet).
    pub fn worker_vacant(&self) -> bool {
        self.worker_state().load(Ordering::SeqCst) == worker_state::VACANT
    }

    /// Wakes one standby thread if the worker's reader role is vacant and no standby was
    /// woken for it yet (a frame waits in the request ring). Either side may call it.
    pub fn claim_and_wake_standby(&self) {
        use worker_state::{VACANT, WAKING};
        let state = self.worker_state();
        if state
            .compare_exchange(VACANT, WAKING, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            self.wake_standby();
        }
    }

    /// Whether a standby thread was woken for the vacant role and has not taken it yet.
    pub fn standby_claimed(&self) -> bool {
        self.worker_state().load(Ordering::SeqCst) == worker_state::WAKING
    }

    /// Wakes one of the worker's standby threads, unconditionally.
    pub fn wake_standby(&self) {
        let word = self.word32(OFF_STANDBY);
        word.fetch_add(1, Ordering::SeqCst);
        let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), 1);
    }

    /// The standby word's value now; pass it to [`Region::standby_wait`].
    pub fn standby_seen(&self) -> u32 {
        self.word32(OFF_STANDBY).load(Ordering::SeqCst)
    }

    /// Sleeps until the standby word moves past `seen` (or `timeout` passes).
    pub fn standby_wait(&self, seen: u32, timeout: Duration) {
        let timeout = rustix::thread::futex::Timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let _ = rustix::thread::futex::wait(
            self.word32(OFF_STANDBY),
            rustix::thread::futex::Flags::empty(),
            seen,
            Some(&timeout),
        );
    }

    /// The consuming end of `ring`. Each ring has exactly one reader per side.
    pub fn reader(self: &Arc<Self>, ring: Ring) -> RingReader {
        let (tail, head, data) = ring.offsets(self.capacity);
        let start = self.word64(head).load(Ordering::Acquire);
        RingReader {
            region: self.clone(),
            ring,
            tail,
            head_word: head,
            data,
            head: start,
        }
    }

    /// The producing end of `ring`.
    pub fn writer(self: &Arc<Self>, ring: Ring) -> RingWriter {
        let (tail, head, data) = ring.offsets(self.capacity);
        let start = self.word64(tail).load(Ordering::Acquire);
        RingWriter {
            region: self.clone(),
            ring,
            tail_word: tail,
            head_word: head,
            data,
            tail: start,
            head: start,
        }
    }

    /// Copies `n` bytes of ring data starting at ring offset `at` (wrapping) to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writing `n` bytes, and `n` at most the capacity.
    unsafe fn copy_out(&self, data: usize, at: usize, dst: *mut u8, n: usize) {
        debug_assert!(at < self.capacity && n <= self.capacity);
        let first = n.min(self.capacity - at);
        // SAFETY: `at < capacity`, `first <= capacity - at` and `n - first <= capacity`:
        // both source ranges lie inside this ring's data, inside the mapping; `dst` is the
        // caller's promise. The source is shared memory the other side may be writing;
        // the bytes copied are treated as untrusted input.
        unsafe {
            let src = self.base.as_ptr().add(data);
            std::ptr::copy_nonoverlapping(src.add(at), dst, first);
            std::ptr::copy_nonoverlapping(src, dst.add(first), n - first);
        }
    }

    /// Copies `src` into ring data starting at ring offset `at`, wrapping.
    fn copy_in(&self, data: usize, at: usize, src: &[u8]) {
        // What keeps the copy inside the ring (the callers' positions are reduced modulo
        // the capacity and their lengths bounded by the free space).
        assert!(at < self.capacity && src.len() <= self.capacity);
        let first = src.len().min(self.capacity - at);
        // SAFETY: by the assertion, `first <= capacity - at` and `len - first <= capacity`:
        // both destination ranges lie inside this ring's data, inside the mapping. The
        // other side may scribble on these bytes at the same time (a hostile worker): they
        // are never seen through a Rust reference, only copied, so that is a race on
        // plain bytes whose result the reader treats as untrusted input.
        unsafe {
            let dst = self.base.as_ptr().add(data);
            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), dst, src.len() - first);
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this length and nothing borrows it
        // any more (every reader, writer and word reference borrows `self`).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// Which side of the region a thread waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The host process.
    Host,
    /// The worker process.
    Worker,
}

impl Region {
    /// The wait both sides use before they sleep: spins until `ready` or `limit` passes
    /// (yielding the CPU every 64 rounds); returns whether `ready` came true.
    ///
    /// Spinning only pays while the other side runs on another CPU. When both share one
    /// (the machine's other CPUs are busy), every round spun is taken from the side
    /// being waited for. So each side notes in the region the CPU it waits on, and stops
    /// spinning (to sleep, as it would after `limit`) when the other side's CPU is its
    /// own. What the worker notes is a hint for the host's spin, nothing more: a wrong
    /// value costs the host a sleep or a spin, never correctness.
    pub fn spin_until(&self, me: Side, limit: Duration, ready: impl Fn() -> bool) -> bool {
        let (mine, theirs) = match me {
            Side::Host => (self.word32(OFF_HOST_CPU), self.word32(OFF_WORKER_CPU)),
            Side::Worker => (self.word32(OFF_WORKER_CPU), self.word32(OFF_HOST_CPU)),
        };
        // Whether the other side was last seen on this thread's CPU (noting it).
        let shared = || {
            let here = u32::try_from(rustix::thread::sched_getcpu()).unwrap_or(NO_CPU);
            mine.store(here, Ordering::Relaxed);
            here != NO_CPU && theirs.load(Ordering::Relaxed) == here
        };
        if shared() {
            return ready();
        }
        let start = std::time::Instant::now();
        let mut spins = 0u32;
        loop {
            if ready() {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) {
                std::thread::yield_now();
                // The scheduler may have moved either side meanwhile.
                if shared() {
                    return ready();
                }
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// One byte on the socket: wakes the other side's reader, asleep reading it. Never blocks
/// (a full socket already holds wake-ups enough) and never raises `SIGPIPE`.
pub fn ring_doorbell(socket: impl AsFd) {
    use rustix::net::SendFlags;
    let _ = rustix::net::send(socket, &[1], SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
}

fn bad_index(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn ring_name(ring: Ring) -> &'static str {
    match ring {
        Ring::Request => "request",
        Ring::Reply => "reply",
    }
}

/// The consuming end of a ring. `Read` returns `WouldBlock` when the ring is empty and
/// `InvalidData` when the producer's position is impossible.
pub struct RingReader {
    region: Arc<Region>,
    ring: Ring,
    tail: usize,
    head_word: usize,
    data: usize,
    /// Our position: the source of truth, whatever the region says.
    head: u64,
}

impl RingReader {
    /// Bytes published and not yet read, or why the producer's position is impossible.
    pub fn available(&self) -> io::Result<usize> {
        let tail = self.region.word64(self.tail).load(Ordering::Acquire);
        let ahead = tail.wrapping_sub(self.head);
        if ahead > self.region.capacity as u64 {
            return Err(bad_index(format!(
                "the {} ring's write position {tail} is impossible: the reader is at {} and the ring holds {} bytes",
                ring_name(self.ring),
                self.head,
                self.region.capacity
            )));
        }
        Ok(ahead as usize)
    }

    /// Whether bytes are waiting (an impossible position counts as waiting: reading
    /// reports it).
    pub fn has_data(&self) -> bool {
        self.available().map_or(true, |n| n > 0)
    }

    /// The region this ring lives in.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
}

impl io::Read for RingReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.available()?;
        if available == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.min(buf.len());
        let at = (self.head % self.region.capacity as u64) as usize;
        // SAFETY: `buf[..n]` is initialised memory we may write; `n` is at most the
        // capacity (`available` never exceeds it).
        unsafe { self.region.copy_out(self.data, at, buf.as_mut_ptr(), n) };
        self.consume(n);
        Ok(n)
    }
}

impl RingReader {
    fn consume(&mut self, n: usize) {
        self.head += n as u64;
        self.region
            .word64(self.head_word)
            .store(self.head, Ordering::Release);
    }
}

impl crate::frame::ReadSpare for RingReader {
    fn read_spare(&mut self, buf: &mut Vec<u8>, max: usize) -> io::Result<usize> {
        let available = self.available()?;
        if available == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = available.min(max).min(buf.capacity() - buf.len());
        let at = (self.head % self.region.capacity as u64) as usize;
        let len = buf.len();
        // SAFETY: `n` bytes fit in the vector's spare capacity and `n` is at most the
        // capacity; `copy_out` writes all of them before `set_len` makes them part of the
        // vector.
        unsafe {
            self.region
                .copy_out(self.data, at, buf.as_mut_ptr().add(len), n);
            buf.set_len(len + n);
        }
        self.consume(n);
        Ok(n)
    }
}

/// The producing end of a ring.
pub struct RingWriter {
    region: Arc<Region>,
    ring: Ring,
    tail_word: usize,
    head_word: usize,
    data: usize,
    /// Our position: the source of truth, whatever the region says.
    tail: u64,
    /// The consumer's position as last seen (it never moves back).
    head: u64,
}

impl RingWriter {
    /// Bytes written and not yet consumed by the other side, or why its position is
    /// impossible.
    pub fn unread(&mut self) -> io::Result<usize> {
        let head = self.region.word64(self.head_word).load(Ordering::Acquire);
        let behind = self.tail.wrapping_sub(head);
        if behind > self.region.capacity as u64
            || head.wrapping_sub(self.head) > self.region.capacity as u64
        {
            return Err(bad_index(format!(
                "the {} ring's read position {head} is impossible: the writer is at {}, the reader was at {} and the ring holds {} bytes",
                ring_name(self.ring),
                self.tail,
                self.head,
                self.region.capacity
            )));
        }
        self.head = head;
        Ok(behind as usize)
    }

    /// Writes as much of `parts` (in order) as fits and publishes it; `WouldBlock` when
    /// the ring is full. `InvalidData` when the reader's position is impossible, or when
    /// the published write position is not the one this writer left (someone else wrote
    /// into the ring: the stream is no longer ours, and writing on would hide that).
    pub fn try_write(&mut self, parts: &[&[u8]]) -> io::Result<usize> {
        let published = self.region.word64(self.tail_word).load(Ordering::Acquire);
        if published != self.tail {
            return Err(bad_index(format!(
                "the {} ring's write position was moved to {published} by someone else (the writer is at {})",
                ring_name(self.ring),
                self.tail
            )));
        }
        let space = self.region.capacity - self.unread()?;
        if space == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut written = 0;
        for part in parts {
            let mut part = &part[..part.len().min(space - written)];
            // Published a piece at a time, so that the reader copies out while this side
            // still copies in.
            while !part.is_empty() {
                let n = part.len().min(PUBLISH_EVERY);
                let at = (self.tail % self.region.capacity as u64) as usize;
                self.region.copy_in(self.data, at, &part[..n]);
                self.tail += n as u64;
                self.region
                    .word64(self.tail_word)
                    .store(self.tail, Ordering::Release);
                written += n;
                part = &part[n..];
            }
            if written == space {
                break;
            }
        }
        Ok(written)
    }

    /// The region this ring lives in.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }
}

/// Test support: raw access to the region's control words, to play a hostile peer.
#[doc(hidden)]
pub mod raw {
    use super::*;

    /// Every control word's offset, by name.
    pub const WORDS: &[(&str, usize)] = &[
        ("request_tail", OFF_REQ_TAIL),
        ("request_head", OFF_REQ_HEAD),
        ("reply_tail", OFF_REP_TAIL),
        ("reply_head", OFF_REP_HEAD),
        ("host_sleep", OFF_HOST_SLEEP),
        ("worker_state", OFF_WORKER_STATE),
        ("standby", OFF_STANDBY),
        ("host_cpu", OFF_HOST_CPU),
        ("worker_cpu", OFF_WORKER_CPU),
    ];

    /// Stores `value` into the control word `name` (see [`WORDS`]).
    pub fn poke(region: &Region, name: &str, value: u64) {
        let off = WORDS
            .iter()
            .find(|(n, _)| *n == name)
            .expect("a known word")
            .1;
        if [
            OFF_HOST_SLEEP,
            OFF_WORKER_STATE,
            OFF_STANDBY,
            OFF_HOST_CPU,
            OFF_WORKER_CPU,
        ]
        .contains(&off)
        {
            region.word32(off).store(value as u32, Ordering::SeqCst);
        } else {
            region.word64(off).store(value, Ordering::SeqCst);
        }
    }

    /// Fills every byte of both rings' data with `byte`.
    pub fn scribble(region: &Region, byte: u8) {
        // SAFETY: the rings' data lies inside the mapping (DATA .. DATA + 2 * capacity).
        unsafe { std::ptr::write_bytes(region.base.as_ptr().add(DATA), byte, 2 * region.capacity) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair(capacity: usize) -> (Arc<Region>, Arc<Region>) {
        let (host, fd) = Region::create(capacity).unwrap();
        (host, Region::open(&fd).unwrap())
    }

    /// Keeps the calling thread on one CPU (so `sched_getcpu` is stable) and says which.
    fn pin_to_one_cpu() -> u32 {
        let cpu = rustix::thread::sched_getcpu();
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        rustix::thread::sched_setaffinity(None, &set).unwrap();
        cpu as u32
    }

    #[test]
    fn a_side_spins_only_while_the_other_is_on_another_cpu() {
        let result = std::thread::spawn(|| {
            let (host, _worker) = pair(4096);
            let cpu = pin_to_one_cpu();
            // The worker's CPU unknown (as with a peer that never notes one): spin until
            // ready, and note the host's CPU.
            let rounds = std::sync::atomic::AtomicU32::new(0);
            let ready = || rounds.fetch_add(1, Ordering::Relaxed) >= 500;
            assert!(host.spin_until(Side::Host, Duration::from_secs(30), ready));
            assert_eq!(host.word32(OFF_HOST_CPU).load(Ordering::Relaxed), cpu);
            // The worker was last on another CPU: the same.
            raw::poke(&host, "worker_cpu", u64::from(cpu) + 1);
            rounds.store(0, Ordering::Relaxed);
            assert!(host.spin_until(Side::Host, Duration::from_secs(30), ready));
            // The worker is on this CPU: one look, no spin (with a limit of 30 s, a spin
            // would not end before the test's own limit).
            raw::poke(&host, "worker_cpu", u64::from(cpu));
            let looks = std::sync::atomic::AtomicU32::new(0);
            let never = || {
                looks.fetch_add(1, Ordering::Relaxed);
                false
            };
            assert!(!host.spin_until(Side::Host, Duration::from_secs(30), never));
            assert_eq!(looks.load(Ordering::Relaxed), 1);
            // And the worker's side reads the host's word the same way.
            raw::poke(&host, "host_cpu", u64::from(cpu));
            let worker = host.clone();
            looks.store(0, Ordering::Relaxed);
            assert!(!worker.spin_until(Side::Worker, Duration::from_secs(30), never));
            assert_eq!(looks.load(Ordering::Relaxed), 1);
        });
        result.join().unwrap();
    }

    #[test]
    fn bytes_wrap_around_the_ring_in_order() {
        let (host, worker) = pair(4096);
        let mut tx = host.writer(Ring::Request);
        let mut rx = worker.reader(Ring::Request);
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for round in 0..50u32 {
            let chunk: Vec<u8> = (0..1000 + round).map(|i| (i * 7 + round) as u8).collect();
            assert_eq!(
                tx.try_write(&[&chunk[..10], &chunk[10..]]).unwrap(),
                chunk.len()
            );
            expected.extend_from_slice(&chunk);
            let mut buf = vec![0u8; 3000];
            let n = rx.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, expected);
        assert_eq!(
            rx.read(&mut [0u8; 8]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn a_full_ring_takes_what_fits_then_would_block() {
        let (host, worker) = pair(4096);
        let mut tx = host.writer(Ring::Reply);
        let big = vec![1u8; 10_000];
        assert_eq!(tx.try_write(&[&big]).unwrap(), 4096);
        assert_eq!(
            tx.try_write(&[&big]).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut rx = worker.reader(Ring::Reply);
        let mut buf = vec![0u8; 1000];
        assert_eq!(rx.read(&mut buf).unwrap(), 1000);
        assert_eq!(tx.try_write(&[&big]).unwrap(), 1000);
    }

    #[test]
    fn an_impossible_write_position_is_refused_not_followed() {
        for tail in [u64::MAX, 4097, 1 << 40] {
            let (host, worker) = pair(4096);
            let mut rx = host.reader(Ring::Reply);
            raw::poke(&worker, "reply_tail", tail);
            let err = rx.read(&mut [0u8; 16]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "tail {tail}");
            assert!(
                err.to_string().contains("reply ring's write position"),
                "{err}"
            );
        }
    }

    #[test]
    fn an_impossible_read_position_is_refused() {
        let (host, worker) = pair(4096);
        let mut tx = host.writer(Ring::Request);
        tx.try_write(&[b"abc"]).unwrap();
        for head in [u64::MAX, 4, 1 << 50] {
            raw::poke(&worker, "request_head", head);
            let err = tx.try_write(&[b"x"]).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "head {head}");
        }
        // Back to a position it had reached: accepted again.
        raw::poke(&worker, "request_head", 0);
        assert_eq!(tx.try_write(&[b"x"]).unwrap(), 1);
    }

    #[test]
    fn a_write_position_moved_by_someone_else_stops_the_writer() {
        let (host, worker) = pair(4096);
        let mut tx = host.writer(Ring::Request);
        tx.try_write(&[b"abc"]).unwrap();
        raw::poke(&worker, "request_tail", 100);
        let err = tx.try_write(&[b"x"]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("moved to 100 by someone else"),
            "{err}"
        );
    }

    #[test]
    fn the_worker_cannot_resize_a_sealed_region() {
        let (_host, fd) = Region::create(4096).unwrap();
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::fs::ftruncate(&fd, 1 << 30).is_err());
    }

    #[test]
    fn a_region_without_the_header_is_refused() {
        let fd = rustix::fs::memfd_create("x", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, (DATA + 2 * MIN_CAPACITY) as u64).unwrap();
        assert!(Region::open(&fd)
            .unwrap_err()
            .contains("no plugin-host header"));
        rustix::fs::ftruncate(&fd, 100).unwrap();
        assert!(Region::open(&fd).unwrap_err().contains("out of range"));
    }

    #[test]
    fn standby_wait_returns_on_wake_or_timeout() {
        let (host, worker) = pair(4096);
        let seen = worker.standby_seen();
        let t = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            worker.standby_wait(seen, Duration::from_secs(10));
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        host.wake_standby();
        assert!(t.join().unwrap() < Duration::from_secs(10));
    }
}
