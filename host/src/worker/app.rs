//! The application as its own worker: [`run_if_worker`].

use std::sync::atomic::{AtomicBool, Ordering};

/// The argument that marks a process as a worker: the host puts it first (`argv[1]`) when
/// it starts the application's own executable to run an untrusted plugin.
pub const WORKER_ARG: &str = "--plugin-host-worker";

/// Exit code of a worker started after other threads (see [`run_if_worker`]).
const EXIT_NOT_FIRST: u8 = 72;

/// Set by [`run_if_worker`]: this executable serves as a worker when started with
/// [`WORKER_ARG`], so the host may start it for untrusted plugins.
static OPTED_IN: AtomicBool = AtomicBool::new(false);

/// Makes the application its own worker. Call it as the **first line of `main`**:
///
/// ```no_run
/// fn main() {
///     plugin_host::worker::run_if_worker();
///     // ... the application: build a Host, load plugins ...
/// }
/// ```
///
/// In the application it records that this executable can serve as a worker and returns
/// at once. When the host later loads an untrusted plugin and finds no dedicated
/// `worker-shim` (neither `HostBuilder::worker_shim`, nor `PLUGIN_HOST_WORKER_SHIM`, nor
/// a `worker-shim` beside the executable), it starts the current executable again with
/// [`WORKER_ARG`] as its first argument. In that process `run_if_worker` does not return:
/// it runs the worker (the same code as the `worker-shim` binary, [`main`](super::main))
/// and exits the process with the worker's exit code. So the application needs no second
/// executable, and its worker is always the same build as its host.
///
/// Without a call to `run_if_worker` the host never starts the application's executable:
/// running an application's `main` as a worker by surprise would start a second copy of
/// the application. The call is the opt-in.
///
/// # Requirements
///
/// - **Call it before anything else**, unconditionally. Whatever `main` does before the
///   call also runs in every worker process (and so do static initializers, which `main`
///   cannot avoid): parsing the command line (a worker's, `--plugin-host-worker --fd 0
///   --plugin NAME --sandbox MODE`, is not the application's), opening files, logging.
/// - **No other thread may run yet**: no thread started, no async runtime or thread pool
///   built (`#[tokio::main]` builds its runtime before the body of `main` runs: use a plain
///   `main` that calls this, then builds the runtime), no logging backend with a
///   background thread. On Linux the worker enters its sandbox with
///   `unshare(CLONE_NEWUSER | CLONE_NEWPID)` and `fork`, which require a single-threaded
///   process. A worker that finds other threads running refuses to start: it writes why
///   to stderr and exits with code 72, and the load fails with
///   [`LoadError::WorkerExited`](crate::LoadError::WorkerExited), whose `stderr` says to
///   call `run_if_worker` first.
/// - In the worker, standard output goes to standard error (which the host captures for
///   crash reports), the environment is only what the application granted the plugin
///   (when the sandbox is on), and control never returns to `main`.
#[allow(clippy::needless_doctest_main)] // the example is about `main` itself
pub fn run_if_worker() {
    OPTED_IN.store(true, Ordering::SeqCst);
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == WORKER_ARG)
    {
        std::process::exit(i32::from(serve()));
    }
}

/// Whether this process called [`run_if_worker`], so its executable can be a worker.
pub(crate) fn opted_in() -> bool {
    OPTED_IN.load(Ordering::SeqCst)
}

/// Runs the worker, unless other threads already run.
fn serve() -> u8 {
    if let Some(threads) = threads().filter(|&n| n > 1) {
        eprintln!(
            "worker-shim: {threads} threads run in this process before \
             plugin_host::worker::run_if_worker(), but the worker's sandbox needs a \
             single-threaded process: call run_if_worker() first in main, before starting \
             threads or an async runtime"
        );
        return EXIT_NOT_FIRST;
    }
    super::run()
}

/// How many threads this process runs, where the system tells.
fn threads() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        std::fs::read_dir("/proc/self/task")
            .ok()
            .map(|tasks| tasks.count())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}
