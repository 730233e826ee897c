//! Starting a worker: spawn, accept, handshake, load. Bounded as a whole by the connect
//! timeout; every way it can fail is a distinct [`LoadError`].

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{CloseReason, Closed, Conn};
use super::link::{Link, PeerProbe};
use super::process::{Inherit, WorkerProcess};
use super::{Spec, Worker};
use crate::crash::ExitInfo;
use crate::error::LoadError;
use crate::loader::{emit_log, Descriptor};
use crate::protocol::frame::{Frame, FrameError};
use crate::protocol::{self, Message, WireLimits};
use crate::worker::PARENT_ENV;

/// Kills a worker that is still starting when the start is abandoned.
struct KillOnDrop(Option<Arc<WorkerProcess>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(process) = self.0.take() {
            process.kill();
        }
    }
}

/// The host's end of a new worker connection, and how the worker gets its end.
#[cfg(unix)]
fn connection(
    spec: &Spec,
    command: &mut Command,
) -> std::io::Result<(Link, Inherit, Option<Region>)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (region, region_fd) = shared_region(spec);
    command.arg("--fd").arg("0");
    if region_fd.is_some() {
        // The region arrives as the worker's standard output, which it maps and then
        // points at its standard error (the plugin never sees the descriptor).
        command.arg("--shm-fd").arg("1");
    }
    let inherit = Inherit {
        stdin: Some(theirs.into()),
        stdout: region_fd,
    };
    Ok((Link::new(ours)?, inherit, region))
}

/// The host's end of a new worker connection, and how the worker gets its end.
#[cfg(windows)]
fn connection(
    spec: &Spec,
    command: &mut Command,
) -> std::io::Result<(Link, Inherit, Option<Region>)> {
    use std::os::windows::io::AsRawHandle;
    let (ours, theirs) = crate::winpipe::PipeStream::pair()?;
    let job = super::job::Job::new(&spec.limits, spec.sandbox.as_ref())
        .map_err(|e| std::io::Error::other(format!("cannot create a job object: {e}")))?;
    command
        .arg("--handle")
        .arg((theirs.as_raw_handle() as usize).to_string());
    let inherit = Inherit { conn: theirs, job };
    Ok((Link::new(ours)?, inherit, None))
}

/// Spawns a worker and brings it to `Loaded`, all within the connect timeout.
///
/// The connection is made by the host before the worker starts, and the worker inherits
/// its end: a socket pair on Unix (the worker's standard input), a named pipe on Windows
/// whose one client the host opened itself. There is no name anyone could connect to, no
/// token to steal and no peer to check.
pub(super) async fn start(spec: &Spec) -> Result<Worker, LoadError> {
    let plugin = spec.plugin.to_string();
    let spawn_error = |reason: String| LoadError::WorkerSpawn {
        plugin: plugin.clone(),
        shim: spec.shim.program.clone(),
        reason,
    };
    let mut command = Command::new(&spec.shim.program);
    command.args(&spec.shim.args);
    let (link, inherit, region) = connection(spec, &mut command)
        .map_err(|e| spawn_error(format!("cannot connect to a new worker: {e}")))?;
    command
        .arg("--plugin")
        .arg(&plugin)
        .arg("--sandbox")
        .arg(spec.sandbox.as_ref().map_or("off", |s| s.mode.as_str()));
    // Windows has no sandbox (the worker runs with the host's rights, and says so), and a
    // process started with an empty environment cannot start there (nor, under Wine, find
    // its prefix): the environment is filtered on Unix only.
    if spec.sandbox.is_some() && cfg!(unix) {
        // The plugin sees only the variables it was granted.
        command.env_clear();
        for (name, value) in &spec.env {
            command.env(name, value);
        }
    }
    command.env(PARENT_ENV, std::process::id().to_string());
    if spec.limits.memory.is_some() {
        // glibc reserves 64 MiB of address space per thread arena; under an address-space
        // limit that, not the plugin, would run out first.
        command.env("MALLOC_ARENA_MAX", "2");
    }
    let process = Arc::new(
        WorkerProcess::spawn(command, &plugin, spec.limits.stderr_lines as usize, inherit)
            .map_err(|e| {
                spawn_error(format!("cannot start {}: {e}", spec.shim.program.display()))
            })?,
    );
    // If this future is dropped before the worker is ready, the worker must not outlive it.
    let mut armed = KillOnDrop(Some(process.clone()));
    let attempt = handshake(spec, link, &process, region);
    let limit = spec.timeouts.connect_timeout();
    let result = futures_lite::future::or(async { Some(attempt.await) }, async {
        smol::Timer::after(limit).await;
        None
    })
    .await;
    match result {
        Some(Ok(worker)) => {
            armed.0 = None;
            Ok(worker)
        }
        Some(Err(e)) => {
            process.kill();
            process.wait_exit(Duration::from_secs(2)).await;
            Err(e)
        }
        None => {
            process.kill();
            let exit = process
                .wait_exit(Duration::from_secs(2))
                .await
                .map(ExitInfo::from_status);
            Err(LoadError::WorkerTimeout {
                plugin,
                after: limit,
                exit,
                stderr: process.stderr_tail(),
            })
        }
    }
}

/// The shared region for a worker that should use shared memory (`None` otherwise, or
/// when it cannot be made: the worker then uses the socket, and the log says why).
#[cfg(target_os = "linux")]
fn shared_region(spec: &Spec) -> (Option<Region>, Option<std::os::fd::OwnedFd>) {
    if spec.transport != crate::Transport::SharedMemory {
        return (None, None);
    }
    match crate::protocol::shm::Region::create(crate::protocol::shm::DEFAULT_CAPACITY) {
        Ok((region, fd)) => (Some(region), Some(fd)),
        Err(e) => {
            tracing::warn!(plugin = %spec.plugin, "cannot create a shared-memory region ({e}); the worker uses the socket");
            (None, None)
        }
    }
}

#[cfg(all(unix, not(target_os = "linux")))]
fn shared_region(_: &Spec) -> (Option<Region>, Option<std::os::fd::OwnedFd>) {
    (None, None)
}

/// A worker's shared region, on the host's side.
#[cfg(target_os = "linux")]
type Region = Arc<crate::protocol::shm::Region>;
#[cfg(not(target_os = "linux"))]
type Region = ();

async fn handshake(
    spec: &Spec,
    stream: Link,
    process: &Arc<WorkerProcess>,
    region: Option<Region>,
) -> Result<Worker, LoadError> {
    let plugin = spec.plugin.to_string();
    let on_close_process = process.clone();
    // To see, once the connection closes, whether the worker's end is already closed.
    let peer = stream.probe();
    let conn = Arc::new(Conn::new(
        stream,
        spec.plugin.clone(),
        protocol::HANDSHAKE_MAX_FRAME,
        Box::new(move |reason| on_close(&on_close_process, peer.as_ref(), reason)),
        (spec.imports.clone(), spec.timeouts.cancel_grace),
    ));
    let worker_features = match conn.recv().await {
        Ok(Frame {
            message:
                Message::Hello {
                    protocol,
                    version,
                    features,
                    ..
                },
            ..
        }) => {
            if let Err(message) = protocol::check_hello(&protocol, &version) {
                return Err(LoadError::ProtocolMismatch {
                    plugin,
                    host: protocol::VERSION.to_string(),
                    worker: version,
                    message,
                });
            }
            features
        }
        Ok(other) => {
            return Err(LoadError::Handshake {
                plugin,
                message: format!("expected Hello, got {:?}", other.message),
            })
        }
        Err(FrameError::Eof | FrameError::Truncated { .. } | FrameError::Io(_)) => {
            // The worker went away (or never spoke): say how it ended.
            let exit = process
                .wait_exit(Duration::from_secs(2))
                .await
                .map(ExitInfo::from_status);
            return Err(LoadError::WorkerExited {
                plugin,
                exit,
                stderr: process.stderr_tail(),
            });
        }
        Err(e) => {
            return Err(LoadError::Handshake {
                plugin,
                message: format!("no valid Hello: {e}"),
            })
        }
    };
    // Shared memory is used when the host made a region and the worker mapped it.
    let region = region.filter(|_| worker_features.iter().any(|f| f == protocol::FEATURE_SHM));

    let io_error = |e: std::io::Error| LoadError::Handshake {
        plugin: plugin.clone(),
        message: format!("writing to the worker failed: {e}"),
    };
    let mut hello = protocol::hello(None, None);
    if let (Some(_), Message::Hello { features, .. }) = (&region, &mut hello) {
        features.push(protocol::FEATURE_SHM.to_string());
    }
    conn.send(&hello, &[]).await.map_err(io_error)?;
    let limits = &spec.limits;
    let load = Message::Load {
        name: plugin.clone(),
        library: spec.library.to_string_lossy().into_owned(),
        max_frame: limits.max_frame,
        concurrency: limits.concurrency,
        limits: WireLimits {
            memory: limits.memory,
            cpu_seconds: limits.cpu.map(|d| d.as_secs().max(1)),
            open_files: limits.open_files,
            core_dumps: limits.core_dumps,
        },
        sandbox: spec.sandbox.clone(),
    };
    conn.send(&load, &spec.config).await.map_err(io_error)?;
    // Until `Loaded`, the worker sends only logs and that answer: a small limit.
    conn.set_max_frame(protocol::LOAD_MAX_FRAME);
    loop {
        match conn.recv().await {
            Ok(Frame {
                message:
                    Message::Loaded {
                        name,
                        version,
                        abi_major,
                        abi_minor,
                        methods,
                        sandbox,
                        sandbox_missing,
                    },
                ..
            }) => {
                // A task limit the kernel does not apply to root is worth a note, not a
                // warning on every load; any other missing layer is a warning.
                let (notes, warnings): (Vec<&String>, Vec<&String>) = sandbox_missing
                    .iter()
                    .partition(|m| m.starts_with("task limit"));
                if !warnings.is_empty() {
                    tracing::warn!(
                        plugin = %spec.plugin,
                        "sandbox layers not in force (best-effort): {}",
                        warnings.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("; ")
                    );
                }
                if !notes.is_empty() {
                    tracing::debug!(plugin = %spec.plugin, "{}", notes[0]);
                }
                let desc = Descriptor {
                    name,
                    version,
                    abi: (abi_major, abi_minor),
                    methods,
                };
                conn.set_max_frame(limits.max_frame.min(u32::MAX as u64) as u32);
                #[cfg(target_os = "linux")]
                if let Some(region) = region {
                    conn.use_shm(region)
                        .map_err(|message| LoadError::Handshake {
                            plugin: plugin.clone(),
                            message,
                        })?;
                }
                let mut worker = Worker::new(process.clone(), conn, desc);
                worker.sandbox = sandbox;
                worker.sandbox_missing = sandbox_missing;
                #[cfg(windows)]
                worker.sandbox_missing.extend(process.limits_not_enforced());
                return Ok(worker);
            }
            Ok(Frame {
                message:
                    Message::LoadFailed {
                        reason,
                        message,
                        abi,
                    },
                ..
            }) => {
                return Err(load_failure(spec, &reason, message, abi));
            }
            Ok(Frame {
                message: Message::Log { level, message, .. },
                ..
            }) => emit_log(&plugin, level, &message),
            Ok(Frame {
                message: Message::Unknown,
                ..
            }) => {}
            Ok(other) => {
                return Err(LoadError::Handshake {
                    plugin,
                    message: format!("expected Loaded, got {:?}", other.message),
                })
            }
            Err(FrameError::Eof | FrameError::Truncated { .. } | FrameError::Io(_)) => {
                let closed = Closed {
                    reason: CloseReason::Eof,
                    in_flight: vec!["create".into()],
                };
                let worker = Worker::new(process.clone(), conn, Descriptor::default());
                let report = worker.report(spec, &closed, 0).await;
                return Err(LoadError::CreateCrashed {
                    plugin,
                    report: Arc::new(report),
                });
            }
            Err(e) => {
                return Err(LoadError::Handshake {
                    plugin,
                    message: e.to_string(),
                });
            }
        }
    }
}

/// How long a worker that closed its connection has to exit before it is killed. The
/// plugin process's death closes the connection a moment before the process the host
/// spawned (the sandbox's relay) exits with the same status; killing it at once would
/// replace the real cause (SIGSEGV, exit 3, ...) with the host's SIGKILL.
const EOF_GRACE: Duration = Duration::from_millis(500);

/// Ends the worker when its connection is cut (before the host's end is shut down, so a
/// worker still running cannot notice the cut and exit on its own first).
///
/// At once, unless the worker's end is already closed (`Eof`, or the host closing for a
/// reason of its own, such as a missed deadline, the moment the plugin process died): then
/// the worker gets [`EOF_GRACE`] to exit with its own status, and is killed only if it does
/// not.
fn on_close(process: &Arc<WorkerProcess>, peer: Option<&PeerProbe>, reason: &CloseReason) {
    if matches!(reason, CloseReason::Eof) || peer.is_some_and(PeerProbe::hung_up) {
        let process = process.clone();
        smol::spawn(async move {
            if process.wait_exit(EOF_GRACE).await.is_none() {
                process.kill();
            }
        })
        .detach();
    } else {
        process.kill();
    }
}

/// Maps the worker's `LoadFailed` to the same error kinds the in-process loader returns.
fn load_failure(spec: &Spec, reason: &str, message: String, abi: Option<(u16, u16)>) -> LoadError {
    let plugin = spec.plugin.to_string();
    let path = spec.library.clone();
    match reason {
        "not_found" => LoadError::LibraryNotFound {
            plugin,
            library: path.display().to_string(),
            searched: vec![path],
        },
        "not_a_library" => LoadError::NotALibrary {
            plugin,
            path,
            reason: message,
        },
        "entry_missing" => LoadError::EntryMissing {
            plugin,
            path,
            symbol: message,
        },
        "abi_mismatch" => LoadError::AbiMismatch {
            plugin,
            path,
            found: abi.unwrap_or_default(),
            supported: (plugin_api::abi::ABI_MAJOR, plugin_api::abi::ABI_MINOR),
        },
        "create_failed" => LoadError::CreateFailed { plugin, message },
        "create_panicked" => LoadError::CreatePanicked { plugin, message },
        "limits" => LoadError::Limits { plugin, message },
        "sandbox" => LoadError::Sandbox { plugin, message },
        _ => LoadError::BadDescriptor {
            plugin,
            path,
            reason: message,
        },
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A stand-in worker: `sh -c script`, and the host's end of a connection.
    fn worker(script: &str) -> (Arc<WorkerProcess>, PeerProbe, UnixStream) {
        worker_with_stdin(script, None)
    }

    fn worker_with_stdin(
        script: &str,
        stdin: Option<std::os::fd::OwnedFd>,
    ) -> (Arc<WorkerProcess>, PeerProbe, UnixStream) {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        let inherit = Inherit {
            stdin,
            stdout: None,
        };
        let process = WorkerProcess::spawn(command, "test", 10, inherit).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        (Arc::new(process), PeerProbe::of(ours), theirs)
    }

    fn killed(why: &str) -> CloseReason {
        CloseReason::Killed(why.into())
    }

    #[test]
    fn a_running_worker_is_killed_at_once_and_reported_as_killed() {
        let (process, ours, theirs) = worker("sleep 30");
        on_close(&process, Some(&ours), &killed("deadline"));
        let exit = smol::block_on(process.wait_exit_info(Duration::from_secs(10)));
        assert_eq!(
            exit.as_ref().and_then(ExitInfo::signal_name),
            Some("SIGKILL")
        );
        assert!(process.killed_by_host());
        drop(theirs);
    }

    #[test]
    fn a_worker_whose_end_is_closed_keeps_its_own_cause() {
        // The plugin process is gone (its end of the connection closed); the process the
        // host spawned is about to exit the same way (here: code 3, once told to).
        let (go_rx, mut go) = std::io::pipe().unwrap();
        let script = "echo ready >&2; read line; exit 3";
        let (process, ours, theirs) = worker_with_stdin(script, Some(go_rx.into()));
        let started = std::time::Instant::now();
        while !process.stderr_tail().iter().any(|l| l == "ready") {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "sh did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(theirs);
        on_close(&process, Some(&ours), &killed("deadline"));
        std::io::Write::write_all(&mut go, b"go\n").unwrap();
        let exit = smol::block_on(process.wait_exit_info(Duration::from_secs(10)));
        assert_eq!(exit, Some(ExitInfo::Code(3)));
        assert!(!process.killed_by_host());
    }

    #[test]
    fn a_worker_that_does_not_exit_within_the_grace_is_killed() {
        let (process, ours, theirs) = worker("sleep 30");
        drop(theirs);
        on_close(&process, Some(&ours), &CloseReason::Eof);
        let exit = smol::block_on(process.wait_exit_info(Duration::from_secs(10)));
        assert_eq!(
            exit.as_ref().and_then(ExitInfo::signal_name),
            Some("SIGKILL")
        );
        assert!(process.killed_by_host());
    }

    #[test]
    fn a_worker_that_already_exited_is_not_reported_as_killed() {
        let (process, _ours, _theirs) = worker("exit 3");
        let exit = smol::block_on(process.wait_exit(Duration::from_secs(10)));
        assert!(exit.is_some());
        process.kill();
        assert!(!process.killed_by_host());
        let exit = smol::block_on(process.wait_exit_info(Duration::from_secs(10)));
        assert_eq!(exit, Some(ExitInfo::Code(3)));
    }
}
