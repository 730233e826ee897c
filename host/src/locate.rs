//! Finding the executable that runs untrusted plugins (the worker).
//!
//! In this order:
//! 1. `HostBuilder::worker_shim(path)`: authoritative, a wrong path is an error;
//! 2. the environment variable [`WORKER_SHIM_ENV`], likewise;
//! 3. a `worker-shim` beside the current executable, or one directory up (test binaries
//!    in `target/*/deps` find `target/*/worker-shim`);
//! 4. the current executable itself, started with [`WORKER_ARG`] first, if the
//!    application opted in by calling [`run_if_worker`](crate::worker::run_if_worker).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::LoadError;
use crate::worker::WORKER_ARG;

/// Environment variable naming the `worker-shim` executable: consulted when
/// `HostBuilder::worker_shim` was not set; if set and not empty it must name a file (no
/// fallback).
pub const WORKER_SHIM_ENV: &str = "PLUGIN_HOST_WORKER_SHIM";

/// The worker to start: a program and the arguments that go before the worker's own.
#[derive(Clone, Debug)]
pub(crate) struct WorkerExe {
    /// The executable.
    pub program: PathBuf,
    /// Leading arguments: [`WORKER_ARG`] when the program is the application itself.
    pub args: Vec<OsString>,
}

impl WorkerExe {
    fn shim(program: PathBuf) -> WorkerExe {
        WorkerExe {
            program,
            args: Vec::new(),
        }
    }
}

/// Finds the worker for `plugin` (see the module's documentation for the order).
/// `configured` is the builder's `worker_shim`.
pub(crate) fn worker(configured: Option<&Path>, plugin: &str) -> Result<WorkerExe, LoadError> {
    let env = std::env::var_os(WORKER_SHIM_ENV).map(PathBuf::from);
    let exe = std::env::current_exe();
    find(
        configured,
        env.as_deref(),
        exe.as_deref().map_err(ToString::to_string),
        crate::worker::opted_in(),
    )
    .map_err(|(shim, reason)| LoadError::WorkerSpawn {
        plugin: plugin.to_string(),
        shim,
        reason,
    })
}

/// [`worker`] without the process's state: `env` is [`WORKER_SHIM_ENV`]'s value, `exe`
/// the current executable, `self_worker` whether the application called `run_if_worker`.
/// An error is the path to report and why.
fn find(
    configured: Option<&Path>,
    env: Option<&Path>,
    exe: Result<&Path, String>,
    self_worker: bool,
) -> Result<WorkerExe, (PathBuf, String)> {
    let file = format!("worker-shim{}", std::env::consts::EXE_SUFFIX);
    // An explicit setting is authoritative: a wrong path is an error, not a fallback.
    if let Some(shim) = configured {
        return match shim.is_file() {
            true => Ok(WorkerExe::shim(shim.to_path_buf())),
            false => Err((
                shim.to_path_buf(),
                "HostBuilder::worker_shim names no file".into(),
            )),
        };
    }
    if let Some(shim) = env.filter(|v| !v.as_os_str().is_empty()) {
        return match shim.is_file() {
            true => Ok(WorkerExe::shim(shim.to_path_buf())),
            false => Err((
                shim.to_path_buf(),
                format!("{WORKER_SHIM_ENV} names no file"),
            )),
        };
    }
    let dir = exe.as_ref().ok().and_then(|exe| exe.parent());
    let beside: Vec<PathBuf> = [dir, dir.and_then(Path::parent)]
        .into_iter()
        .flatten()
        .map(|d| d.join(&file))
        .collect();
    if let Some(found) = beside.iter().find(|c| c.is_file()) {
        return Ok(WorkerExe::shim(found.clone()));
    }
    let itself = match (&exe, self_worker) {
        (Ok(exe), true) => {
            return Ok(WorkerExe {
                program: exe.to_path_buf(),
                args: vec![WORKER_ARG.into()],
            })
        }
        (Ok(exe), false) => format!(
            "{} itself (it does not call plugin_host::worker::run_if_worker())",
            exe.display()
        ),
        (Err(e), _) => format!("the application itself (its path is unknown: {e})"),
    };
    let mut tried = vec![format!("{WORKER_SHIM_ENV} (not set)")];
    tried.extend(beside.iter().map(|c| c.display().to_string()));
    tried.push(itself);
    Err((
        PathBuf::from(&file),
        format!(
            "no worker executable found (tried: {}). Either (a) call \
             plugin_host::worker::run_if_worker() first in main, so the application is its \
             own worker; or (b) put the dedicated worker-shim beside the application \
             (`cargo install --locked --path <plugin-host>/host --bin worker-shim --root \
             DIR` installs DIR/bin/worker-shim; or copy it) or point {WORKER_SHIM_ENV} at \
             it; or (c) name it with HostBuilder::worker_shim(path)",
            tried.join(", ")
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A temporary directory (the library has no `tempfile` dependency), removed on drop.
    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn shim_name() -> String {
        format!("worker-shim{}", std::env::consts::EXE_SUFFIX)
    }

    /// A directory holding an `app` file and, if `shim`, a `worker-shim` beside it.
    fn layout(shim: bool) -> (TempDir, PathBuf) {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = TempDir(std::env::temp_dir().join(format!(
            "plugin-host-locate-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        std::fs::create_dir_all(dir.0.join("bin")).unwrap();
        let app = dir.0.join("bin").join("app");
        std::fs::write(&app, "").unwrap();
        if shim {
            std::fs::write(dir.0.join("bin").join(shim_name()), "").unwrap();
        }
        (dir, app)
    }

    #[test]
    fn the_builder_setting_wins_and_is_never_a_fallback() {
        let (_dir, app) = layout(true);
        let found = find(Some(&app), None, Ok(&app), true).unwrap();
        assert_eq!((found.program, found.args.len()), (app.clone(), 0));
        let missing = app.with_file_name("nothing");
        let (path, why) = find(Some(&missing), Some(&app), Ok(&app), true).unwrap_err();
        assert_eq!(path, missing);
        assert!(why.contains("HostBuilder::worker_shim"), "{why}");
    }

    #[test]
    fn the_environment_comes_next_and_is_never_a_fallback() {
        let (_dir, app) = layout(true);
        let found = find(None, Some(&app), Ok(&app), true).unwrap();
        assert_eq!(found.program, app);
        let missing = app.with_file_name("nothing");
        let (path, why) = find(None, Some(&missing), Ok(&app), true).unwrap_err();
        assert_eq!(path, missing);
        assert!(why.contains(WORKER_SHIM_ENV), "{why}");
        // Empty counts as unset.
        let found = find(None, Some(Path::new("")), Ok(&app), true).unwrap();
        assert_eq!(found.program, app.with_file_name(shim_name()));
    }

    #[test]
    fn a_shim_beside_the_executable_or_one_up_comes_before_the_executable_itself() {
        let (_dir, app) = layout(true);
        let found = find(None, None, Ok(&app), true).unwrap();
        assert_eq!(found.program, app.with_file_name(shim_name()));
        assert!(found.args.is_empty());

        let (dir, _) = layout(true);
        let deeper = dir.0.join("bin").join("deps").join("test");
        std::fs::create_dir_all(deeper.parent().unwrap()).unwrap();
        let found = find(None, None, Ok(&deeper), true).unwrap();
        assert_eq!(found.program, dir.0.join("bin").join(shim_name()));
    }

    #[test]
    fn the_executable_itself_only_if_it_opted_in() {
        let (_dir, app) = layout(false);
        let found = find(None, None, Ok(&app), true).unwrap();
        assert_eq!(found.program, app);
        assert_eq!(found.args, vec![OsString::from(WORKER_ARG)]);

        let (path, why) = find(None, None, Ok(&app), false).unwrap_err();
        assert_eq!(path, PathBuf::from(shim_name()));
        let beside = app.with_file_name(shim_name());
        let one_up = app.parent().unwrap().with_file_name(shim_name());
        for needle in [
            "run_if_worker()",
            "cargo install --locked --path",
            WORKER_SHIM_ENV,
            "HostBuilder::worker_shim(path)",
            &beside.display().to_string(),
            &one_up.display().to_string(),
            &format!("{} itself", app.display()),
        ] {
            assert!(why.contains(needle), "`{needle}` missing from: {why}");
        }
    }

    #[test]
    fn an_unknown_executable_path_is_reported() {
        let (_, why) = find(None, None, Err("gone".into()), true).unwrap_err();
        assert!(why.contains("its path is unknown: gone"), "{why}");
    }
}
