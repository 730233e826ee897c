//! One worker process: spawned, watched and reaped by a dedicated thread.
//!
//! That thread spawns the child (so Linux's parent-death signal, which follows the
//! spawning *thread*, fires only when the host process dies), then waits for it; a second
//! thread drains stderr into a bounded buffer and the host's log. When the child exits the
//! waiter kills what is left of its process group, records the status, lets the stderr
//! reader catch up (briefly: see [`drain_stderr`]), and closes a channel every waiter
//! listens on. Nothing is left unreaped.
//!
//! What is kept of stderr is bounded in bytes whatever the worker writes: each line at
//! most [`STDERR_LINE_MAX`] bytes (the rest is cut as it arrives, never buffered, and
//! counted in a `… [N bytes cut]` marker), the tail at most `limits.stderr_lines` lines and
//! [`STDERR_TAIL_MAX`] bytes, the panic lines two lines.

use std::collections::VecDeque;
use std::io::Read;
#[cfg(unix)]
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crash::ExitInfo;

/// What is kept (and logged) of one stderr line, in bytes (escaped); the rest of the line
/// is cut with a marker.
pub(crate) const STDERR_LINE_MAX: usize = 4096;
/// What is kept of a worker's stderr tail in all, in bytes.
pub(crate) const STDERR_TAIL_MAX: usize = 64 << 10;
/// How much the stderr reader reads at once.
const STDERR_CHUNK: usize = 8 << 10;
/// After the worker exited, the stderr reader stops once the pipe stays quiet this long:
/// what the worker wrote before it died is in the pipe already, and a process that
/// escaped the worker and still holds the pipe must not delay the crash report.
#[cfg(unix)]
const STDERR_QUIET: Duration = Duration::from_millis(10);
/// ... and in any case this long after the exit (a process still writing to the pipe).
const STDERR_AFTER_EXIT: Duration = Duration::from_millis(200);

/// A callback run once the process has been reaped.
type OnExit = Box<dyn FnOnce() + Send>;

/// What the waiter thread knows.
#[derive(Default)]
struct State {
    exit: Option<ExitStatus>,
    /// The process was reaped by someone else: never signal its pid again.
    reaped_elsewhere: bool,
    /// The host's SIGKILL reached it while it was still running: however it then ended,
    /// the kill is why (and a SIGKILL exit is not someone else's doing). Not set when it
    /// had already exited on its own: the kill then changed nothing.
    killed_by_host: bool,
    on_exit: Option<OnExit>,
}

/// What the worker gets from the host besides its stderr pipe.
#[cfg(unix)]
pub(crate) struct Inherit {
    /// Its standard input (the connection): `None` for /dev/null.
    pub stdin: Option<OwnedFd>,
    /// Its standard output (the shared region, when there is one): `None` for /dev/null.
    pub stdout: Option<OwnedFd>,
}

/// What the worker gets from the host besides its stderr pipe.
#[cfg(windows)]
pub(crate) struct Inherit {
    /// Its end of the pipe, inherited (the command line names it).
    pub conn: std::os::windows::io::OwnedHandle,
    /// The job the worker is put in before it runs any plugin code.
    pub job: super::job::Job,
}

/// A running (or finished) worker process.
pub(crate) struct WorkerProcess {
    pid: u32,
    /// The job holding it and what it starts.
    #[cfg(windows)]
    job: Arc<super::job::Job>,
    state: Arc<Mutex<State>>,
    exited: async_channel::Receiver<()>,
    stderr: Arc<Mutex<Stderr>>,
    started: Instant,
}

impl WorkerProcess {
    /// Spawns `command` (with what `inherit` says, stderr captured): on Unix in its own
    /// process group, on Windows in its job. `plugin` names it in logs; `stderr_lines`
    /// bounds the kept stderr tail.
    pub fn spawn(
        mut command: Command,
        plugin: &str,
        stderr_lines: usize,
        inherit: Inherit,
    ) -> std::io::Result<WorkerProcess> {
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            command
                .stdin(inherit.stdin.map_or_else(Stdio::null, Stdio::from))
                .stdout(inherit.stdout.map_or_else(Stdio::null, Stdio::from))
                .process_group(0);
        }
        #[cfg(windows)]
        let (conn, job) = {
            use std::os::windows::process::CommandExt;
            // No console window of its own; errors go to the host, not to dialogs.
            const CREATE_NO_WINDOW: u32 = 0x0800_0000;
            command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .creation_flags(CREATE_NO_WINDOW);
            (inherit.conn, Arc::new(inherit.job))
        };
        command.stderr(Stdio::piped());
        #[cfg(windows)]
        let thread_job = job.clone();
        let state = Arc::new(Mutex::new(State::default()));
        let stderr = Arc::new(Mutex::new(Stderr::default()));
        let (exited_tx, exited) = async_channel::bounded::<()>(1);
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
        let (thread_state, thread_stderr, name) =
            (state.clone(), stderr.clone(), plugin.to_string());
        std::thread::Builder::new()
            .name(format!("plugin-{plugin}-waiter"))
            .spawn(move || {
                #[cfg(unix)]
                let spawned = command.spawn();
                #[cfg(windows)]
                let spawned = windows::spawn_in_job(&mut command, conn, &thread_job);
                let mut child = match spawned {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = spawned_tx.send(Err(e));
                        return;
                    }
                };
                let pid = child.id();
                // The child has its copies of the descriptors; ours (the worker's end of
                // the socket pair) must go, or the host would never see end-of-file.
                drop(command);
                let (drained_tx, drained) = std::sync::mpsc::channel::<()>();
                // Closed (dropped) when the worker has exited: wakes the stderr reader.
                #[cfg(windows)]
                let exit_rx: Option<()> = None;
                #[cfg(unix)]
                let (exit_rx, exit_tx) = match std::io::pipe() {
                    Ok((rx, tx)) => (Some(OwnedFd::from(rx)), Some(tx)),
                    Err(e) => {
                        tracing::warn!(
                            "cannot create a pipe for worker {pid}'s stderr reader: {e}"
                        );
                        (None, None)
                    }
                };
                if let Some(pipe) = child.stderr.take() {
                    let spawn = std::thread::Builder::new()
                        .name(format!("plugin-{name}-stderr"))
                        .spawn(move || {
                            drain_stderr(pipe, exit_rx, &name, &thread_stderr, stderr_lines);
                            drop(drained_tx);
                        });
                    if let Err(e) = spawn {
                        tracing::warn!("cannot start the stderr reader for worker {pid}: {e}");
                    }
                }
                let _ = spawned_tx.send(Ok(pid));
                // Wait for the exit without reaping, so the pid stays reserved while we clean up
                // under the lock `kill` takes: nobody can signal a recycled pid.
                // (Windows: the `Child` holds the process handle, so its pid is not reused
                // before the handle closes; waiting reaps nothing.)
                #[cfg(windows)]
                let status = child.wait();
                let still_ours = wait_without_reaping(pid);
                let mut state = thread_state.lock().unwrap_or_else(|e| e.into_inner());
                if still_ours {
                    // Whatever the plugin started in the worker's group (job) goes with it.
                    #[cfg(unix)]
                    {
                        kill_group(pid);
                        state.exit = child.wait().ok();
                    }
                    #[cfg(windows)]
                    {
                        thread_job.terminate();
                        state.exit = status.ok();
                    }
                } else {
                    // Someone else reaped it (the application reaps children itself, or
                    // ignores SIGCHLD): its pid may already be reused, so signal nothing.
                    state.reaped_elsewhere = true;
                }
                drop(state);
                // Let the stderr reader take in the last lines before anyone reads the tail.
                // Bounded: a process that escaped the worker may still hold the pipe; the
                // reader stops soon after the exit (see `drain_stderr`).
                #[cfg(unix)]
                drop(exit_tx);
                let _ = drained.recv_timeout(STDERR_AFTER_EXIT + Duration::from_millis(100));
                drop(exited_tx);
                let on_exit = thread_state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .on_exit
                    .take();
                if let Some(f) = on_exit {
                    f();
                }
            })?;
        let pid = spawned_rx.recv().map_err(|_| {
            std::io::Error::other("the worker's waiter thread ended before spawning")
        })??;
        Ok(WorkerProcess {
            pid,
            #[cfg(windows)]
            job,
            state,
            exited,
            stderr,
            started: Instant::now(),
        })
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How long since it was spawned.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Its exit status, once reaped.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).exit
    }

    /// Runs `f` (once) when the process has been reaped; at once if it already was.
    pub fn on_exit(&self, f: impl FnOnce() + Send + 'static) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.exited.is_closed() {
            drop(state);
            f();
        } else {
            state.on_exit = Some(Box::new(f));
        }
    }

    /// Whether it has been reaped.
    pub fn has_exited(&self) -> bool {
        self.exited.is_closed()
    }

    /// Kills the worker and its process group with SIGKILL, unless it has already exited
    /// (then it ended on its own, and the waiter thread, woken by that exit, kills what is
    /// left of its group) or was reaped (its pid may then belong to someone else). The
    /// waiter thread reaps it.
    pub fn kill(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // `exit` is set under this lock in the same step that reaps the pid, so the pid is
        // still ours here, a zombie at worst.
        if state.exit.is_some() || state.reaped_elsewhere || self.exited.is_closed() {
            return;
        }
        #[cfg(unix)]
        if !has_exited(self.pid) {
            state.killed_by_host = true;
            kill_group(self.pid);
        }
        #[cfg(windows)]
        if self.job.active_processes() != Some(0) {
            state.killed_by_host = true;
            self.job.terminate();
        }
    }

    /// The job's limits this system does not enforce (Wine), one line each.
    #[cfg(windows)]
    pub fn limits_not_enforced(&self) -> Vec<String> {
        self.job.not_enforced().to_vec()
    }

    /// How it ended, once reaped (waiting up to `limit`): killed by SIGKILL if the host's
    /// kill reached it while it was running, else its own exit status. A worker whose
    /// connection is cut exits with code 0 as soon as it notices; once the host has sent
    /// the kill, that clean exit is the kill's doing, not a cause of its own.
    pub async fn wait_exit_info(&self, limit: Duration) -> Option<ExitInfo> {
        let status = self.wait_exit(limit).await?;
        // Windows has no kill signal: a terminated job's processes end with its exit
        // code, which is what the status says.
        #[cfg(windows)]
        return Some(ExitInfo::from_status(status));
        #[cfg(unix)]
        Some(match self.killed_by_host() {
            true => ExitInfo::sigkill(),
            false => ExitInfo::from_status(status),
        })
    }

    /// Whether the host's kill reached it while it was running (as opposed to a signal
    /// from elsewhere, or an end of its own just before the host's kill).
    pub fn killed_by_host(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .killed_by_host
    }

    /// Waits up to `limit` for the process to be reaped.
    pub async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let exited = self.exited.clone();
        futures_lite::future::or(
            async move {
                // Resolves when the waiter thread drops the sender.
                let _ = exited.recv().await;
            },
            async move {
                smol::Timer::after(limit).await;
            },
        )
        .await;
        self.exit_status()
    }

    /// The last lines of stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        lock(&self.stderr).tail.iter().cloned().collect()
    }

    /// How many stderr lines have been taken in so far: a mark for
    /// [`stderr_tail_since`](Self::stderr_tail_since).
    pub fn stderr_mark(&self) -> u64 {
        lock(&self.stderr).pushed
    }

    /// The last lines of stderr written from `mark` on and after the last caught panic's
    /// report (which belongs to a call that already got its answer). When earlier lines
    /// are left out, the first line says how many.
    pub fn stderr_tail_since(&self, mark: u64) -> Vec<String> {
        let stderr = lock(&self.stderr);
        let first = stderr.pushed - stderr.tail.len() as u64;
        let start = mark.max(stderr.caught_through).max(first);
        let skip = (start - first) as usize;
        let mut lines = Vec::with_capacity(stderr.tail.len() - skip + 1);
        if skip > 0 {
            lines.push(format!(
                "[{skip} earlier line(s), written before the call that crashed began, left out]"
            ));
        }
        lines.extend(stderr.tail.iter().skip(skip).cloned());
        lines
    }

    /// The lines of the last panic that was not caught (the panic header and message),
    /// kept even when a long backtrace pushed them out of the tail.
    pub fn panic_lines(&self) -> Vec<String> {
        lock(&self.stderr).panic.clone()
    }

    /// Whether the worker reported a failed memory allocation.
    pub fn allocation_failed(&self) -> bool {
        lock(&self.stderr).allocation_failed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the stderr reader keeps: the tail, and notable lines that must not scroll away.
/// Every line is at most [`STDERR_LINE_MAX`] bytes plus a marker.
#[derive(Default)]
struct Stderr {
    tail: VecDeque<String>,
    /// Bytes of the lines in `tail`.
    tail_bytes: usize,
    panic: Vec<String>,
    allocation_failed: bool,
    /// Lines taken in so far (the index the next line gets).
    pushed: u64,
    /// The index just past the last caught panic's marker line.
    caught_through: u64,
}

impl Stderr {
    fn push(&mut self, line: String, keep: usize) {
        if line.contains("panicked at") {
            self.panic = vec![line.clone()];
        } else if self.panic.len() == 1 {
            self.panic.push(line.clone());
        }
        if line == crate::crash::CAUGHT_PANIC_MARKER {
            self.panic.clear();
            self.caught_through = self.pushed + 1;
        }
        self.pushed += 1;
        if line.contains("memory allocation of") && line.contains("failed") {
            self.allocation_failed = true;
        }
        if keep == 0 {
            return;
        }
        while !self.tail.is_empty()
            && (self.tail.len() >= keep || self.tail_bytes + line.len() > STDERR_TAIL_MAX)
        {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.len();
            }
        }
        self.tail_bytes += line.len();
        self.tail.push_back(line);
    }
}

/// The line being read: its first [`STDERR_LINE_MAX`] bytes, and how many more arrived
/// (counted, not kept).
#[derive(Default)]
struct Line {
    kept: Vec<u8>,
    cut: u64,
}

impl Line {
    fn add(&mut self, bytes: &[u8]) {
        let room = STDERR_LINE_MAX.saturating_sub(self.kept.len());
        let n = room.min(bytes.len());
        self.kept.extend_from_slice(&bytes[..n]);
        self.cut = self.cut.saturating_add((bytes.len() - n) as u64);
    }

    fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.cut == 0
    }

    /// The line as kept and logged: escaped (no control characters), at most
    /// `STDERR_LINE_MAX` bytes, then `… [N bytes cut]` if anything was cut.
    fn finish(&mut self) -> String {
        let total = (self.kept.len() as u64).saturating_add(self.cut);
        let end = match self.cut {
            0 => self.kept.len(),
            // Do not split the character the cut went through.
            _ => crate::loader::char_boundary_before(&self.kept, self.kept.len()),
        };
        let text = String::from_utf8_lossy(&self.kept[..end]);
        let text = match self.cut {
            0 => text.trim_end(),
            _ => &text,
        };
        let (mut line, consumed) = crate::loader::escape_text_capped(text, STDERR_LINE_MAX);
        if self.cut > 0 || consumed < text.len() {
            let shown = consumed.min(end) as u64;
            line.push_str(&crate::loader::cut_marker(total.saturating_sub(shown)));
        }
        self.kept.clear();
        self.cut = 0;
        line
    }
}

/// Reads the worker's stderr in chunks into the kept tail and the host's log, keeping at
/// most [`STDERR_LINE_MAX`] bytes of any line. Returns at end-of-file, or once the worker
/// has exited (`exited` reports end-of-file) and the pipe stays quiet for
/// [`STDERR_QUIET`] (or at the latest [`STDERR_AFTER_EXIT`] after the exit): a process the
/// worker left behind may hold the pipe forever, and the report must not wait for it.
#[cfg(unix)]
fn drain_stderr(
    mut pipe: std::process::ChildStderr,
    exited: Option<OwnedFd>,
    plugin: &str,
    stderr: &Mutex<Stderr>,
    keep: usize,
) {
    let mut sink = Lines::new(plugin, stderr, keep);
    let mut chunk = vec![0u8; STDERR_CHUNK];
    let mut exited = exited;
    let mut exit_seen: Option<Instant> = None;
    loop {
        if let Some(since) = exit_seen {
            // The worker is gone: read what it left, stop when the pipe goes quiet.
            let left = STDERR_AFTER_EXIT.saturating_sub(since.elapsed());
            if left.is_zero() {
                break;
            }
            match poll_in([pipe.as_fd()], STDERR_QUIET.min(left)) {
                Some(ready) if ready[0] => {}
                Some(_) => break,
                None => continue,
            }
        } else if let Some(exit_fd) = &exited {
            // Wait for output or for the exit.
            let Some(ready) = poll_in([pipe.as_fd(), exit_fd.as_fd()], Duration::MAX) else {
                continue;
            };
            if ready[1] {
                exit_seen = Some(Instant::now());
                exited = None;
            }
            if !ready[0] {
                continue;
            }
        }
        let Some(n) = read_some(&mut pipe, &mut chunk) else {
            break;
        };
        sink.take(&chunk[..n]);
    }
    sink.finish();
}

/// Windows: reads the worker's stderr until end-of-file, which comes once every process
/// of its job is gone (the job is terminated when the worker exits), as
/// [`drain_stderr`] on Unix does for the process group.
#[cfg(windows)]
fn drain_stderr(
    mut pipe: std::process::ChildStderr,
    _exited: Option<()>,
    plugin: &str,
    stderr: &Mutex<Stderr>,
    keep: usize,
) {
    let mut sink = Lines::new(plugin, stderr, keep);
    let mut chunk = vec![0u8; STDERR_CHUNK];
    while let Some(n) = read_some(&mut pipe, &mut chunk) {
        sink.take(&chunk[..n]);
    }
    sink.finish();
}

/// One read of the stderr pipe: `Some(bytes read)`, or `None` at end of file or on an
/// error (an interrupted read is retried).
fn read_some(pipe: &mut std::process::ChildStderr, chunk: &mut [u8]) -> Option<usize> {
    loop {
        return match pipe.read(chunk) {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => None,
        };
    }
}

/// Where the stderr reader's bytes go: split into lines, each logged and kept.
struct Lines<'a> {
    line: Line,
    plugin: &'a str,
    stderr: &'a Mutex<Stderr>,
    keep: usize,
}

impl<'a> Lines<'a> {
    fn new(plugin: &'a str, stderr: &'a Mutex<Stderr>, keep: usize) -> Self {
        Lines {
            line: Line::default(),
            plugin,
            stderr,
            keep,
        }
    }

    /// Takes a chunk as read: every line it completes is logged and kept.
    fn take(&mut self, mut data: &[u8]) {
        while let Some(end) = data.iter().position(|&b| b == b'\n') {
            self.line.add(&data[..end]);
            self.emit();
            data = &data[end + 1..];
        }
        self.line.add(data);
    }

    /// The last line, if it had no newline.
    fn finish(mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }

    fn emit(&mut self) {
        let text = self.line.finish();
        tracing::info!(target: "plugin::stderr", plugin = %self.plugin, "{text}");
        lock(self.stderr).push(text, self.keep);
    }
}

/// Waits up to `limit` (`Duration::MAX`: forever) until one of `fds` is readable or at
/// its end; returns which are (all false on timeout), or `None` if interrupted by a
/// signal.
#[cfg(unix)]
fn poll_in<const N: usize>(
    fds: [std::os::fd::BorrowedFd<'_>; N],
    limit: Duration,
) -> Option<[bool; N]> {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let mut polled = fds.map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN));
    let timeout = (limit != Duration::MAX).then(|| Timespec {
        tv_sec: limit.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(limit.subsec_nanos()),
    });
    match poll(&mut polled, timeout.as_ref()) {
        Ok(_) => Some(polled.each_ref().map(|p| !p.revents().is_empty())),
        Err(rustix::io::Errno::INTR) => None,
        // Cannot poll (ENOMEM): say the first is readable, so the caller's read blocks as
        // a plain reader would; the waiter's own bound keeps reports from waiting.
        Err(_) => {
            let mut ready = [false; N];
            if let Some(first) = ready.first_mut() {
                *first = true;
            }
            Some(ready)
        }
    }
}

/// Blocks until `pid` (our child) has exited, leaving it a zombie. Returns false when the
/// wait failed (for example someone else reaped it): the pid is then no longer ours.
fn wait_without_reaping(pid: u32) -> bool {
    #[cfg(unix)]
    {
        use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
        let Some(pid) = Pid::from_raw(pid as i32) else {
            return false;
        };
        loop {
            match waitid(
                WaitId::Pid(pid),
                WaitIdOptions::EXITED | WaitIdOptions::NOWAIT,
            ) {
                Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => return true,
                Err(_) => return false,
            }
        }
    }
    #[cfg(not(unix))]
    {
        // Windows: the waiter has waited on its `Child` already.
        let _ = pid;
        true
    }
}

/// Whether our child `pid` has exited (a zombie, not yet reaped), without reaping it. A
/// pid that is no longer our child (reaped elsewhere) counts as exited: it must not be
/// signalled.
#[cfg(unix)]
fn has_exited(pid: u32) -> bool {
    use rustix::process::{waitid, Pid, WaitId, WaitIdOptions};
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return true;
    };
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    loop {
        match waitid(WaitId::Pid(pid), options) {
            Err(rustix::io::Errno::INTR) => continue,
            Ok(status) => return status.is_some(),
            Err(rustix::io::Errno::CHILD) => return true,
            // Cannot tell: it is still ours (not reaped), so killing it is safe.
            Err(_) => return false,
        }
    }
}

/// SIGKILL to the process group `pid` leads, and to `pid` itself in case it left the
/// group. Only called while `pid` is not yet reaped.
#[cfg(unix)]
fn kill_group(pid: u32) {
    use rustix::process::{kill_process, kill_process_group, Pid, Signal};
    if let Some(pid) = Pid::from_raw(pid as i32) {
        let _ = kill_process_group(pid, Signal::KILL);
        let _ = kill_process(pid, Signal::KILL);
    }
}

#[cfg(windows)]
mod windows {
    use std::os::windows::io::{AsRawHandle, OwnedHandle};
    use std::process::{Child, Command};
    use std::sync::Mutex;

    use windows_sys::Win32::Foundation::{SetHandleInformation, HANDLE, HANDLE_FLAG_INHERIT};

    use crate::backend::isolated::job::Job;

    /// Spawns `command`, which inherits `conn` (workers are spawned one at a time, so no
    /// sibling worker inherits another's connection; a process the application spawns
    /// through std's `Command` at this very moment could, since std has no handle list on
    /// stable: see docs/platforms.md), then puts the child
    /// in `job` before the host sends it anything: the worker runs no plugin code before
    /// the host's `Load`, so nothing it could start escapes the job.
    pub(super) fn spawn_in_job(
        command: &mut Command,
        conn: OwnedHandle,
        job: &Job,
    ) -> std::io::Result<Child> {
        static SPAWNING: Mutex<()> = Mutex::new(());
        let child = {
            let _one_at_a_time = SPAWNING.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: a valid handle we own.
            let inheritable = unsafe {
                SetHandleInformation(
                    conn.as_raw_handle() as HANDLE,
                    HANDLE_FLAG_INHERIT,
                    HANDLE_FLAG_INHERIT,
                )
            };
            if inheritable == 0 {
                return Err(std::io::Error::last_os_error());
            }
            let child = command.spawn();
            // Ours goes now: the worker's copy is its only one.
            drop(conn);
            child?
        };
        if let Err(e) = job.assign(child.as_raw_handle()) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "cannot put the worker in its job object: {e}"
            )));
        }
        Ok(child)
    }
}
