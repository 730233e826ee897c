//! Windows: the pipe between the host and one worker.
//!
//! The host creates a named pipe under a fresh random name that admits one client, opens
//! the client end itself, checks that the client is its own process, and hands that end
//! to the worker as an inherited handle. As with the Unix socket pair, no name is left
//! that another process could connect to, and no token travels.
//!
//! Both ends are opened for overlapped I/O, so one thread can read while another writes
//! on the same handle (Windows serializes every operation on a synchronous handle: a read
//! waiting for data would hold up every write). [`PipeStream`]'s `Read` and `Write` block
//! the calling thread until their operation completes, as a socket would.

use std::cell::OnceCell;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::windows::io::{AsRawHandle, FromRawHandle, OwnedHandle, RawHandle};
use std::sync::atomic::{AtomicU64, Ordering};

use windows_sys::Win32::Foundation::{
    GetLastError, ERROR_BROKEN_PIPE, ERROR_HANDLE_EOF, ERROR_IO_PENDING, ERROR_NO_DATA,
    ERROR_PIPE_NOT_CONNECTED, GENERIC_READ, GENERIC_WRITE, HANDLE, INVALID_HANDLE_VALUE,
};
use windows_sys::Win32::Storage::FileSystem::{
    CreateFileW, ReadFile, WriteFile, FILE_FLAG_FIRST_PIPE_INSTANCE, FILE_FLAG_OVERLAPPED,
    OPEN_EXISTING, PIPE_ACCESS_DUPLEX, SECURITY_IDENTIFICATION, SECURITY_SQOS_PRESENT,
};
use windows_sys::Win32::System::Pipes::{
    CreateNamedPipeW, DisconnectNamedPipe, GetNamedPipeClientProcessId, PeekNamedPipe,
    PIPE_READMODE_BYTE, PIPE_REJECT_REMOTE_CLIENTS, PIPE_TYPE_BYTE, PIPE_WAIT,
};
use windows_sys::Win32::System::Threading::{CreateEventW, GetCurrentProcessId};
use windows_sys::Win32::System::IO::{CancelIoEx, GetOverlappedResult, OVERLAPPED};

/// Each direction's buffer in the pipe, in bytes.
const PIPE_BUFFER: u32 = 256 << 10;

/// One end of a worker's pipe.
pub(crate) struct PipeStream {
    handle: OwnedHandle,
}

impl PipeStream {
    /// Creates a connected pipe: the host's end, and the worker's end (not inheritable:
    /// the spawner makes it so for the one spawn that passes it on).
    pub fn pair() -> io::Result<(PipeStream, OwnedHandle)> {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let mut last = None;
        // A name someone else took first (they cannot guess it, but may be lucky) fails
        // with access denied: try another.
        for _ in 0..8 {
            let random = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let name = format!(
                r"\\.\pipe\plugin-host-{}-{}-{random:016x}",
                std::process::id(),
                MADE.fetch_add(1, Ordering::Relaxed)
            );
            let wide: Vec<u16> = name.encode_utf16().chain([0]).collect();
            // SAFETY: `wide` is a NUL-terminated UTF-16 string that outlives the call; a
            // null security-attributes pointer is allowed (default security, not
            // inheritable).
            let server = unsafe {
                CreateNamedPipeW(
                    wide.as_ptr(),
                    PIPE_ACCESS_DUPLEX | FILE_FLAG_OVERLAPPED | FILE_FLAG_FIRST_PIPE_INSTANCE,
                    PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
                    1,
                    PIPE_BUFFER,
                    PIPE_BUFFER,
                    0,
                    std::ptr::null(),
                )
            };
            if server == INVALID_HANDLE_VALUE {
                last = Some(io::Error::last_os_error());
                continue;
            }
            // SAFETY: a valid handle we just created and nobody else owns.
            let server = unsafe { OwnedHandle::from_raw_handle(server as RawHandle) };
            // SAFETY: as above; the client end asks to be identified, never impersonated.
            let client = unsafe {
                CreateFileW(
                    wide.as_ptr(),
                    GENERIC_READ | GENERIC_WRITE,
                    0,
                    std::ptr::null(),
                    OPEN_EXISTING,
                    FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION,
                    std::ptr::null_mut(),
                )
            };
            if client == INVALID_HANDLE_VALUE {
                // Busy: another process connected in between (the one instance is taken).
                last = Some(io::Error::last_os_error());
                continue;
            }
            // SAFETY: a valid handle we just opened and nobody else owns.
            let client = unsafe { OwnedHandle::from_raw_handle(client as RawHandle) };
            let server = PipeStream { handle: server };
            // The one client must be us: then nobody else holds the connection.
            let mut pid = 0u32;
            // SAFETY: a valid pipe handle and a valid out pointer.
            let known = unsafe { GetNamedPipeClientProcessId(server.raw(), &mut pid) } != 0;
            // SAFETY: no arguments.
            let ours = unsafe { GetCurrentProcessId() };
            if known && pid != ours {
                last = Some(io::Error::other(format!(
                    "the pipe's client is process {pid}, not this one"
                )));
                continue;
            }
            return Ok((server, client));
        }
        Err(last.unwrap_or_else(|| io::Error::other("cannot create a pipe")))
    }

    /// Takes an end the host passed down (an inherited handle).
    pub fn from_handle(handle: OwnedHandle) -> PipeStream {
        PipeStream { handle }
    }

    fn raw(&self) -> HANDLE {
        self.handle.as_raw_handle() as HANDLE
    }

    /// Ends every read or write in progress on this end (they fail with "aborted");
    /// used to stop the threads serving it.
    pub fn cancel(&self) {
        // SAFETY: a valid handle; a null OVERLAPPED cancels all of this process's I/O on it.
        unsafe { CancelIoEx(self.raw(), std::ptr::null()) };
    }

    /// Cuts the host's end off from the worker's (which then reads end-of-file).
    pub fn disconnect(&self) {
        // SAFETY: a valid handle; on a handle that is not a pipe's server end this fails
        // and changes nothing.
        unsafe { DisconnectNamedPipe(self.raw()) };
    }

    /// Whether the other end has been closed (does not read or block).
    pub fn peer_closed(&self) -> bool {
        let mut available = 0u32;
        // SAFETY: a valid handle; no buffer (size 0); valid out pointer.
        let ok = unsafe {
            PeekNamedPipe(
                self.raw(),
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                &mut available,
                std::ptr::null_mut(),
            )
        } != 0;
        // SAFETY: no arguments.
        !ok && is_disconnected(unsafe { GetLastError() })
    }

    /// Runs one overlapped operation and blocks until it completes; returns the bytes
    /// transferred.
    fn overlapped(&self, start: impl FnOnce(HANDLE, *mut OVERLAPPED) -> i32) -> io::Result<usize> {
        let event = thread_event()?;
        // SAFETY: OVERLAPPED is plain data; all zero is its documented initial state.
        let mut op: OVERLAPPED = unsafe { std::mem::zeroed() };
        op.hEvent = event;
        // The operation refers to `op` (and the caller's buffer) until it completes: we
        // wait for completion below on every path, before either goes away.
        if start(self.raw(), &mut op) == 0 {
            // SAFETY: no arguments.
            let error = unsafe { GetLastError() };
            if error != ERROR_IO_PENDING {
                return Err(io::Error::from_raw_os_error(error as i32));
            }
        }
        let mut done = 0u32;
        // SAFETY: `op` is the OVERLAPPED of an operation started on this handle; waiting
        // (TRUE) returns only once it has completed, after which nothing refers to it.
        if unsafe { GetOverlappedResult(self.raw(), &op, &mut done, 1) } == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(done as usize)
    }
}

/// This thread's event for overlapped operations (made once per thread; the system resets
/// it when an operation starts).
fn thread_event() -> io::Result<HANDLE> {
    thread_local! {
        static EVENT: OnceCell<OwnedHandle> = const { OnceCell::new() };
    }
    EVENT.with(|cell| {
        if let Some(event) = cell.get() {
            return Ok(event.as_raw_handle() as HANDLE);
        }
        // SAFETY: default security, manual reset, not signalled, no name.
        let event = unsafe { CreateEventW(std::ptr::null(), 1, 0, std::ptr::null()) };
        if event.is_null() {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a valid handle we just created and nobody else owns.
        let event = unsafe { OwnedHandle::from_raw_handle(event as RawHandle) };
        Ok(cell.get_or_init(|| event).as_raw_handle() as HANDLE)
    })
}

/// Whether `error` says the other end of the pipe is gone.
fn is_disconnected(error: u32) -> bool {
    matches!(
        error,
        ERROR_BROKEN_PIPE | ERROR_PIPE_NOT_CONNECTED | ERROR_NO_DATA | ERROR_HANDLE_EOF
    )
}

impl io::Read for &PipeStream {
    /// Blocks until some bytes arrive; `Ok(0)` once the other end is closed.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let ptr = buf.as_mut_ptr();
        // SAFETY: `ptr` is valid for `len` bytes for the whole operation (`overlapped`
        // waits for it to complete before `buf`'s borrow ends).
        match self.overlapped(|h, op| unsafe { ReadFile(h, ptr, len, std::ptr::null_mut(), op) }) {
            Err(e) if e.raw_os_error().is_some_and(|c| is_disconnected(c as u32)) => Ok(0),
            other => other,
        }
    }
}

impl io::Read for PipeStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl io::Write for &PipeStream {
    /// Blocks until the pipe took the bytes (some of them, as a socket would).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(u32::MAX as usize) as u32;
        let ptr = buf.as_ptr();
        // SAFETY: `ptr` is valid for `len` bytes for the whole operation (`overlapped`
        // waits for it to complete before `buf`'s borrow ends).
        match self.overlapped(|h, op| unsafe { WriteFile(h, ptr, len, std::ptr::null_mut(), op) }) {
            Err(e) if e.raw_os_error().is_some_and(|c| is_disconnected(c as u32)) => {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            other => other,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for PipeStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn a_pair_carries_bytes_both_ways_and_reads_end_of_file_once_the_other_end_closes() {
        let (host, theirs) = PipeStream::pair().unwrap();
        let worker = PipeStream::from_handle(theirs);
        (&worker).write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        (&host).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        (&host).write_all(b"back").unwrap();
        let mut buf = [0u8; 4];
        (&worker).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"back");
        assert!(!host.peer_closed());
        drop(worker);
        assert!(host.peer_closed());
        assert_eq!((&host).read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_read_waiting_on_one_thread_does_not_hold_up_a_write_on_another() {
        let (host, theirs) = PipeStream::pair().unwrap();
        let host = std::sync::Arc::new(host);
        let worker = PipeStream::from_handle(theirs);
        let reader = host.clone();
        let waiting = std::thread::spawn(move || {
            let mut buf = [0u8; 3];
            (&*reader).read_exact(&mut buf).map(|_| buf)
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        (&*host).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&worker).read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        (&worker).write_all(b"pon").unwrap();
        assert_eq!(&waiting.join().unwrap().unwrap(), b"pon");
    }
}
