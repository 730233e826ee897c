//! One worker process: spawned, watched and reaped by a dedicated thread.
//!
//! That thread spawns the child (so Linux's parent-death signal, which follows the
//! spawning *thread*, fires only when the host process dies), then waits for it; a second
//! thread drains stderr into a bounded buffer and the host's log. When the child exits the
//! waiter kills what is left of its process group, records the status, and closes a
//! channel every waiter listens on. Nothing is left unreaped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A callback run once the process has been reaped.
type OnExit = Box<dyn FnOnce() + Send>;

/// What the waiter thread knows.
#[derive(Default)]
struct State {
    exit: Option<ExitStatus>,
    /// The process was reaped by someone else: never signal its pid again.
    reaped_elsewhere: bool,
    /// The host sent it SIGKILL (so a SIGKILL exit is not someone else's doing).
    killed_by_host: bool,
    on_exit: Option<OnExit>,
}

/// A running (or finished) worker process.
pub(crate) struct WorkerProcess {
    pid: u32,
    state: Arc<Mutex<State>>,
    exited: async_channel::Receiver<()>,
    stderr: Arc<Mutex<Stderr>>,
    started: Instant,
}

impl WorkerProcess {
    /// Spawns `command` (stdin from `stdin` or /dev/null, stdout to /dev/null, stderr
    /// captured) in its own process group. `plugin` names it in logs; `stderr_lines` bounds
    /// the kept stderr tail.
    pub fn spawn(
        mut command: Command,
        plugin: &str,
        stderr_lines: usize,
        stdin: Option<std::os::fd::OwnedFd>,
    ) -> std::io::Result<WorkerProcess> {
        command
            .stdin(stdin.map_or_else(Stdio::null, Stdio::from))
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let state = Arc::new(Mutex::new(State::default()));
        let stderr = Arc::new(Mutex::new(Stderr::default()));
        let (exited_tx, exited) = async_channel::bounded::<()>(1);
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
        let (thread_state, thread_stderr, name) =
            (state.clone(), stderr.clone(), plugin.to_string());
        std::thread::Builder::new()
            .name(format!("plugin-{plugin}-waiter"))
            .spawn(move || {
                let mut child = match command.spawn() {
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
                if let Some(pipe) = child.stderr.take() {
                    let spawn = std::thread::Builder::new()
                        .name(format!("plugin-{name}-stderr"))
                        .spawn(move || {
                            drain_stderr(pipe, &name, &thread_stderr, stderr_lines);
                            drop(drained_tx);
                        });
                    if let Err(e) = spawn {
                        tracing::warn!("cannot start the stderr reader for worker {pid}: {e}");
                    }
                }
                let _ = spawned_tx.send(Ok(pid));
                // Wait for the exit without reaping, so the pid stays reserved while we clean up
                // under the lock `kill` takes: nobody can signal a recycled pid.
                let still_ours = wait_without_reaping(pid);
                let mut state = thread_state.lock().unwrap_or_else(|e| e.into_inner());
                if still_ours {
                    // Whatever the plugin started in the worker's group goes with it.
                    kill_group(pid);
                    state.exit = child.wait().ok();
                } else {
                    // Someone else reaped it (the application reaps children itself, or
                    // ignores SIGCHLD): its pid may already be reused, so signal nothing.
                    state.reaped_elsewhere = true;
                }
                drop(state);
                // Let the stderr reader take in the last lines before anyone reads the tail
                // (bounded: a process that escaped the group may still hold the pipe).
                let _ = drained.recv_timeout(Duration::from_millis(500));
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

    /// Kills the worker and its process group with SIGKILL, unless it was already reaped
    /// (its pid may then belong to someone else). The waiter thread reaps it.
    pub fn kill(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // `exit` is set under this lock in the same step that reaps the pid.
        if state.exit.is_none() && !state.reaped_elsewhere && !self.exited.is_closed() {
            state.killed_by_host = true;
            kill_group(self.pid);
        }
    }

    /// Whether the host killed it (as opposed to a signal from elsewhere).
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
#[derive(Default)]
struct Stderr {
    tail: VecDeque<String>,
    panic: Vec<String>,
    allocation_failed: bool,
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
        }
        if line.contains("memory allocation of") && line.contains("failed") {
            self.allocation_failed = true;
        }
        if keep > 0 {
            if self.tail.len() == keep {
                self.tail.pop_front();
            }
            self.tail.push_back(line);
        }
    }
}

fn drain_stderr(
    pipe: std::process::ChildStderr,
    plugin: &str,
    stderr: &Mutex<Stderr>,
    keep: usize,
) {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = crate::loader::escape_text(String::from_utf8_lossy(&line).trim_end());
                tracing::info!(target: "plugin::stderr", plugin = %plugin, "{text}");
                lock(stderr).push(text, keep);
            }
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
        let _ = pid;
        true
    }
}

/// SIGKILL to the process group `pid` leads, and to `pid` itself in case it left the
/// group. Only called while `pid` is not yet reaped.
fn kill_group(pid: u32) {
    #[cfg(unix)]
    {
        use rustix::process::{kill_process, kill_process_group, Pid, Signal};
        if let Some(pid) = Pid::from_raw(pid as i32) {
            let _ = kill_process_group(pid, Signal::KILL);
            let _ = kill_process(pid, Signal::KILL);
        }
    }
    #[cfg(not(unix))]
    let _ = pid;
}
