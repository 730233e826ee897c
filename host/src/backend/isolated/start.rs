//! Starting a worker: spawn, accept, handshake, load. Bounded as a whole by the connect
//! timeout; every way it can fail is a distinct [`LoadError`].

use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smol::Async;

use super::conn::{CloseReason, Closed, Conn};
use super::process::WorkerProcess;
use super::{Spec, Worker};
use crate::crash::ExitInfo;
use crate::error::LoadError;
use crate::loader::{emit_log, Descriptor};
use crate::protocol::frame::{Frame, FrameError};
use crate::protocol::{self, Message, WireLimits};
use crate::worker::{PARENT_ENV, TOKEN_ENV};

/// Kills a worker that is still starting when the start is abandoned.
struct KillOnDrop(Option<Arc<WorkerProcess>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(process) = self.0.take() {
            process.kill();
        }
    }
}

/// How long an accepted connection has to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Spawns a worker and brings it to `Loaded`, all within the connect timeout.
pub(super) async fn start(spec: &Spec) -> Result<Worker, LoadError> {
    let plugin = spec.plugin.to_string();
    let spawn_error = |reason: String| LoadError::WorkerSpawn {
        plugin: plugin.clone(),
        shim: spec.shim.clone(),
        reason,
    };
    let name = format!("plugin-host-{}-{}.sock", std::process::id(), random_hex(8));
    let token = random_hex(16);
    let listener = listen(&name)
        .map_err(|e| spawn_error(format!("cannot listen on local socket `{name}`: {e}")))?;
    let mut command = Command::new(&spec.shim);
    command
        .arg("--connect")
        .arg(&name)
        .arg("--plugin")
        .arg(&plugin)
        .env(TOKEN_ENV, &token)
        .env(PARENT_ENV, std::process::id().to_string());
    if spec.limits.memory.is_some() {
        // glibc reserves 64 MiB of address space per thread arena; under an address-space
        // limit that, not the plugin, would run out first.
        command.env("MALLOC_ARENA_MAX", "2");
    }
    let process = Arc::new(
        WorkerProcess::spawn(command, &plugin, spec.limits.stderr_lines as usize)
            .map_err(|e| spawn_error(format!("cannot start {}: {e}", spec.shim.display())))?,
    );
    let refused = std::sync::Mutex::new(Vec::new());
    // If this future is dropped before the worker is ready, the worker must not outlive it.
    let mut armed = KillOnDrop(Some(process.clone()));
    let attempt = handshake(spec, &listener, &process, &token, &refused);
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
            let refused = refused.into_inner().unwrap_or_default();
            Err(LoadError::WorkerTimeout {
                plugin,
                after: limit,
                exit,
                refused,
                stderr: process.stderr_tail(),
            })
        }
    }
}

async fn handshake(
    spec: &Spec,
    listener: &Async<UnixListener>,
    process: &Arc<WorkerProcess>,
    token: &str,
    refused: &std::sync::Mutex<Vec<String>>,
) -> Result<Worker, LoadError> {
    let plugin = spec.plugin.to_string();
    let refuse = |why: String| {
        tracing::warn!(plugin = %spec.plugin, "refused a connection on the worker socket: {why}");
        refused.lock().unwrap_or_else(|e| e.into_inner()).push(why);
    };
    let conn = loop {
        let exited = async {
            process
                .wait_exit(Duration::from_secs(u32::MAX as u64))
                .await;
            None
        };
        let accepted =
            futures_lite::future::or(async { Some(listener.accept().await) }, exited).await;
        let Some(accepted) = accepted else {
            return Err(LoadError::WorkerExited {
                plugin,
                exit: process.exit_status().map(ExitInfo::from_status),
                refused: refused.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                stderr: process.stderr_tail(),
            });
        };
        let (stream, _) = accepted.map_err(|e| LoadError::Handshake {
            plugin: plugin.clone(),
            message: format!("accepting the worker's connection failed: {e}"),
        })?;
        if let Some(refusal) = check_peer(&stream, process.pid()) {
            refuse(refusal);
            continue;
        }
        protocol::tune_socket(stream.get_ref());
        let on_close_process = process.clone();
        let conn = Arc::new(Conn::new(
            stream,
            spec.plugin.clone(),
            protocol::HANDSHAKE_MAX_FRAME,
            Box::new(move || on_close_process.kill()),
        ));
        let hello = futures_lite::future::or(async { Some(conn.recv().await) }, async {
            smol::Timer::after(HELLO_TIMEOUT).await;
            None
        })
        .await;
        match hello {
            Some(Ok(Frame {
                message:
                    Message::Hello {
                        protocol,
                        version,
                        token: t,
                        ..
                    },
                ..
            })) => {
                if t.as_deref() != Some(token) {
                    refuse("wrong token".into());
                    continue;
                }
                if let Err(message) = protocol::check_hello(&protocol, &version) {
                    return Err(LoadError::ProtocolMismatch {
                        plugin,
                        host: protocol::VERSION.to_string(),
                        worker: version,
                        message,
                    });
                }
                break conn;
            }
            Some(Ok(other)) => refuse(format!("expected Hello, got {:?}", other.message)),
            Some(Err(e)) => refuse(format!("no valid Hello: {e}")),
            None => refuse(format!("no Hello within {HELLO_TIMEOUT:?}")),
        }
    };

    let io_error = |e: std::io::Error| LoadError::Handshake {
        plugin: plugin.clone(),
        message: format!("writing to the worker failed: {e}"),
    };
    conn.send(&protocol::hello(None, None), &[])
        .await
        .map_err(io_error)?;
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
    };
    conn.send(&load, &spec.config).await.map_err(io_error)?;
    conn.set_max_frame(limits.max_frame.min(u32::MAX as u64) as u32);
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
                    },
                ..
            }) => {
                let desc = Descriptor {
                    name,
                    version,
                    abi: (abi_major, abi_minor),
                    methods,
                };
                return Ok(Worker::new(process.clone(), conn, desc));
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
                    report: Box::new(report),
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
        _ => LoadError::BadDescriptor {
            plugin,
            path,
            reason: message,
        },
    }
}

/// Listens on a local socket name (Linux: abstract namespace, so there is no file to leak).
fn listen(name: &str) -> std::io::Result<Async<UnixListener>> {
    use interprocess::local_socket::{
        prelude::*, GenericNamespaced, Listener, ListenerNonblockingMode, ListenerOptions,
    };
    let listener = ListenerOptions::new()
        .name(name.to_ns_name::<GenericNamespaced>()?)
        .nonblocking(ListenerNonblockingMode::Both)
        .create_sync()?;
    #[allow(irrefutable_let_patterns)]
    let Listener::UdSocket(listener) = listener
    else {
        unreachable!("Unix local sockets are Unix domain sockets")
    };
    Async::new(UnixListener::from(listener))
}

/// Refuses a peer whose credentials are not the spawned worker's. `None` means accepted.
fn check_peer(stream: &Async<UnixStream>, expected_pid: u32) -> Option<String> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        match rustix::net::sockopt::socket_peercred(stream.get_ref()) {
            Ok(cred) => {
                let pid = cred.pid.as_raw_nonzero().get() as u32;
                if pid != expected_pid {
                    return Some(format!(
                        "peer pid {pid} is not the worker's ({expected_pid})"
                    ));
                }
                if cred.uid != rustix::process::geteuid() {
                    return Some(format!("peer uid {} is not ours", cred.uid.as_raw()));
                }
            }
            Err(e) => return Some(format!("cannot read peer credentials: {e}")),
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, expected_pid);
    None
}

/// `n` random bytes as hex, from the OS's random source.
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_os.is_err() {
        // No /dev/urandom: fall back on std's per-process random hash keys.
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(Instant::now().elapsed().as_nanos());
            chunk.copy_from_slice(&h.finish().to_le_bytes()[..chunk.len()]);
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
