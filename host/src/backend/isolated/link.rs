//! The byte stream between the host and one worker, as the connection uses it:
//! non-blocking reads into a frame buffer, a readiness wait, and writes.
//!
//! - **Unix**: the host's end of a socket pair, registered with the async-io reactor; the
//!   caller's own thread reads and writes (no hand-off).
//! - **Windows**: the host's end of a named pipe ([`crate::winpipe`]). The reactor has no
//!   pipe support, so a reader thread fills a bounded inbox (the connection reads from it
//!   as from a non-blocking socket) and a writer thread writes queued frames.

use std::io;
use std::task::{Context, Poll};

use crate::protocol::frame::FrameBuffer;

#[cfg(unix)]
pub(crate) use unix::{Link, PeerProbe};
#[cfg(windows)]
pub(crate) use windows::{Link, PeerProbe};

impl Link {
    /// Reads once into `buf`, waiting until something is readable (the handshake's reads).
    pub async fn fill_wait(&self, buf: &mut FrameBuffer) -> io::Result<usize> {
        loop {
            match self.fill(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            std::future::poll_fn(|cx| self.poll_readable(cx)).await?;
        }
    }
}

#[cfg(unix)]
mod unix {
    use super::*;
    use std::io::{IoSlice, Write};
    use std::os::unix::net::UnixStream;

    use smol::Async;

    /// The host's end of the worker's socket pair.
    pub(crate) struct Link(Async<UnixStream>);

    /// Tells whether the worker's end is closed, apart from the connection.
    pub(crate) struct PeerProbe(UnixStream);

    impl Link {
        /// Registers `stream` (the host's end) with the reactor.
        pub fn new(stream: UnixStream) -> io::Result<Link> {
            crate::protocol::tune_socket(&stream);
            Ok(Link(Async::new(stream)?))
        }

        /// The socket itself (shared memory rings its doorbell through it).
        #[cfg(target_os = "linux")]
        pub fn socket(&self) -> &UnixStream {
            self.0.get_ref()
        }

        /// Reads what is there into `buf` without blocking (`WouldBlock`: nothing yet;
        /// `Ok(0)`: end of stream).
        pub fn fill(&self, buf: &mut FrameBuffer) -> io::Result<usize> {
            buf.fill(&mut self.0.get_ref())
        }

        /// Ready when a read would not block.
        pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.poll_readable(cx)
        }

        /// Writes what fits of `a` then `b` (waiting for room); returns how much.
        pub async fn write(&self, a: &[u8], b: &[u8]) -> io::Result<usize> {
            self.0
                .write_with(|s| {
                    let mut w: &UnixStream = s;
                    w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])
                })
                .await
        }

        /// Ends the stream both ways: the worker reads end-of-file.
        pub fn shutdown(&self) {
            let _ = self.0.get_ref().shutdown(std::net::Shutdown::Both);
        }

        /// A second handle on the host's end, to see later whether the worker's end closed.
        pub fn probe(&self) -> Option<PeerProbe> {
            self.0.get_ref().try_clone().ok().map(PeerProbe)
        }
    }

    impl PeerProbe {
        /// A probe on `stream` (the host's end).
        #[cfg(test)]
        pub fn of(stream: UnixStream) -> PeerProbe {
            PeerProbe(stream)
        }

        /// Whether every holder of the worker's end closed it (the worker died, or closed
        /// it deliberately). Does not block or read.
        pub fn hung_up(&self) -> bool {
            use rustix::event::{poll, PollFd, PollFlags, Timespec};
            let mut fds = [PollFd::new(&self.0, PollFlags::IN)];
            let now = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            poll(&mut fds, Some(&now)).is_ok() && fds[0].revents().contains(PollFlags::HUP)
        }
    }
}

#[cfg(windows)]
mod windows {
    use super::*;
    use std::collections::VecDeque;
    use std::io::{Read, Write};
    use std::sync::{Arc, Condvar, Mutex, MutexGuard};
    use std::task::Waker;

    use crate::winpipe::PipeStream;

    /// How many bytes the reader thread takes in before the connection reads them: a
    /// worker cannot make the host buffer more than this (frames are bounded as they are
    /// parsed, as on Unix).
    const INBOX_MAX: usize = 1 << 20;
    /// How much the reader thread reads at once.
    const READ_CHUNK: usize = 64 << 10;
    /// Frames queued for the writer thread before a sender waits.
    const WRITE_QUEUE: usize = 32;

    /// The host's end of the worker's pipe, with its reader and writer threads.
    pub(crate) struct Link {
        shared: Arc<Shared>,
        writes: async_channel::Sender<Vec<u8>>,
    }

    /// Tells whether the worker's end is closed, apart from the connection.
    pub(crate) struct PeerProbe(Arc<Shared>);

    struct Shared {
        pipe: PipeStream,
        inbox: Mutex<Inbox>,
        /// Signalled when the connection took bytes out of a full inbox, or it closed.
        room: Condvar,
    }

    #[derive(Default)]
    struct Inbox {
        data: VecDeque<u8>,
        /// The stream ended: `None` at end-of-file, else how it failed.
        ended: Option<Option<io::ErrorKind>>,
        /// The host shut it down.
        closed: bool,
        wakers: Vec<Waker>,
    }

    impl Shared {
        fn inbox(&self) -> MutexGuard<'_, Inbox> {
            self.inbox.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl Link {
        /// Starts the threads serving the host's end of the pipe.
        pub fn new(pipe: PipeStream) -> io::Result<Link> {
            let shared = Arc::new(Shared {
                pipe,
                inbox: Mutex::new(Inbox::default()),
                room: Condvar::new(),
            });
            let (writes, queued) = async_channel::bounded::<Vec<u8>>(WRITE_QUEUE);
            let reader = shared.clone();
            std::thread::Builder::new()
                .name("plugin-pipe-reader".into())
                .spawn(move || read_loop(&reader))?;
            let writer = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("plugin-pipe-writer".into())
                .spawn(move || {
                    while let Ok(frame) = queued.recv_blocking() {
                        if (&writer.pipe).write_all(&frame).is_err() {
                            break;
                        }
                    }
                    queued.close();
                });
            if let Err(e) = spawned {
                shared.pipe.cancel();
                return Err(e);
            }
            Ok(Link { shared, writes })
        }

        /// Takes what the reader thread buffered into `buf` (`WouldBlock`: nothing yet;
        /// `Ok(0)`: end of stream).
        pub fn fill(&self, buf: &mut FrameBuffer) -> io::Result<usize> {
            buf.fill(&mut InboxReader(&self.shared))
        }

        /// Ready when there is something to take (or the stream ended).
        pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            let mut inbox = self.shared.inbox();
            if !inbox.data.is_empty() || inbox.ended.is_some() {
                return Poll::Ready(Ok(()));
            }
            if !inbox.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                inbox.wakers.push(cx.waker().clone());
            }
            Poll::Pending
        }

        /// Queues `a` then `b` as one write for the writer thread; returns their length.
        pub async fn write(&self, a: &[u8], b: &[u8]) -> io::Result<usize> {
            let mut frame = Vec::with_capacity(a.len() + b.len());
            frame.extend_from_slice(a);
            frame.extend_from_slice(b);
            let n = frame.len();
            self.writes
                .send(frame)
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
            Ok(n)
        }

        /// Ends the stream both ways: the worker reads end-of-file, the threads stop.
        pub fn shutdown(&self) {
            self.writes.close();
            let mut inbox = self.shared.inbox();
            inbox.closed = true;
            drop(inbox);
            self.shared.room.notify_all();
            self.shared.pipe.disconnect();
            self.shared.pipe.cancel();
        }

        /// A handle to see later whether the worker's end closed.
        pub fn probe(&self) -> Option<PeerProbe> {
            Some(PeerProbe(self.shared.clone()))
        }
    }

    impl Drop for Link {
        fn drop(&mut self) {
            self.shutdown();
        }
    }

    impl PeerProbe {
        /// Whether the worker's end is closed (the worker died, or closed it). Does not
        /// block or read.
        pub fn hung_up(&self) -> bool {
            matches!(self.0.inbox().ended, Some(None)) || self.0.pipe.peer_closed()
        }
    }

    /// The reader thread: pipe -> inbox, waiting while the inbox is full.
    fn read_loop(shared: &Shared) {
        let mut chunk = vec![0u8; READ_CHUNK];
        loop {
            {
                let mut inbox = shared.inbox();
                while inbox.data.len() >= INBOX_MAX && !inbox.closed {
                    inbox = shared.room.wait(inbox).unwrap_or_else(|e| e.into_inner());
                }
                if inbox.closed {
                    return;
                }
            }
            let read = (&shared.pipe).read(&mut chunk);
            let mut inbox = shared.inbox();
            let last = match read {
                Ok(0) => {
                    inbox.ended = Some(None);
                    true
                }
                Ok(n) => {
                    inbox.data.extend(&chunk[..n]);
                    false
                }
                Err(e) => {
                    inbox.ended = Some(Some(e.kind()));
                    true
                }
            };
            let wakers = std::mem::take(&mut inbox.wakers);
            drop(inbox);
            for waker in wakers {
                waker.wake();
            }
            if last {
                return;
            }
        }
    }

    /// Reads the inbox like a non-blocking socket.
    struct InboxReader<'a>(&'a Shared);

    impl Read for InboxReader<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut inbox = self.0.inbox();
            if inbox.data.is_empty() {
                return match inbox.ended {
                    Some(None) => Ok(0),
                    Some(Some(kind)) => Err(kind.into()),
                    None => Err(io::ErrorKind::WouldBlock.into()),
                };
            }
            let was_full = inbox.data.len() >= INBOX_MAX;
            let n = inbox.data.read(buf)?;
            drop(inbox);
            if was_full {
                self.0.room.notify_all();
            }
            Ok(n)
        }
    }
}
