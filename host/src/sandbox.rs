//! The sandbox as the host sees it: turning a [`Grant`] into what the worker must enforce,
//! and finding out what this system can enforce at all ([`SystemSupport`], which
//! `plugin-host doctor` prints).
//!
//! The worker applies the layers itself (see `docs/security.md` for the threat model and
//! which layer stops what); the host decides which paths, variables and rights it gets.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::LoadError;
use crate::permissions::{
    expand, uses_placeholder, Grant, Places, SandboxMode, DEFAULT_TASK_BUDGET,
};
use crate::protocol::WireSandbox;

/// Environment variable naming the plugin's directory (`$PLUGIN_DIR`), set for every
/// untrusted plugin.
pub const PLUGIN_DIR_ENV: &str = "PLUGIN_DIR";
/// Environment variable naming the plugin's data directory (`$DATA_DIR`), set when a
/// granted path uses it.
pub const DATA_DIR_ENV: &str = "PLUGIN_DATA_DIR";
/// Environment variable naming the plugin's private temporary directory (`$TMP`), set
/// (with `TMPDIR`) when a granted path uses it.
pub const TMP_DIR_ENV: &str = "PLUGIN_TMP_DIR";

/// What the worker gets for one plugin.
pub(crate) struct Plan {
    /// The sandbox to send in `Load` (`None`: off).
    pub wire: Option<WireSandbox>,
    /// The worker's environment.
    pub env: Vec<(OsString, OsString)>,
    /// A private `$TMP` created for the plugin, to remove when it stops.
    pub tmp_dir: Option<PathBuf>,
}

/// The default base of `$DATA_DIR`: `$XDG_DATA_HOME/plugin-host/data`, else
/// `~/.local/share/plugin-host/data`, else a directory under the system's temp dir.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("plugin-host").join("data");
    }
    if let Some(home) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join(".local/share/plugin-host/data");
    }
    std::env::temp_dir().join("plugin-data")
}

/// A directory only we can enter.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Works out the sandbox for an untrusted plugin from its effective grant.
pub(crate) fn plan(
    plugin: &str,
    library: &Path,
    grant: &Grant,
    data_base: Option<&Path>,
) -> Result<Plan, LoadError> {
    let error = |message: String| LoadError::Sandbox {
        plugin: plugin.to_string(),
        message,
    };
    if grant.sandbox == SandboxMode::Off {
        tracing::warn!(
            plugin,
            "sandbox off: the plugin runs with the host's rights (debugging only)"
        );
        return Ok(Plan {
            wire: None,
            env: std::env::vars_os().collect(),
            tmp_dir: None,
        });
    }
    if !cfg!(target_os = "linux") && grant.sandbox == SandboxMode::Required {
        return Err(error(
            "sandboxing is only implemented on Linux; on this platform an untrusted plugin loads only without one: when its manifest asks for sandbox = \"best-effort\" and the app grants that, or when the app grants sandbox = \"off\"".into(),
        ));
    }
    let p = &grant.permissions;
    let plugin_dir = library
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let data_dir = data_base
        .map(Path::to_path_buf)
        .unwrap_or_else(default_data_dir)
        .join(plugin);
    let wants = |placeholder: &str| {
        uses_placeholder(&p.read, placeholder) || uses_placeholder(&p.write, placeholder)
    };
    if wants("$DATA_DIR") {
        private_dir(&data_dir).map_err(|e| {
            error(format!(
                "cannot create the data directory {}: {e}",
                data_dir.display()
            ))
        })?;
    }
    let tmp_dir = std::env::temp_dir().join(format!(
        "plugin-tmp-{plugin}-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    let tmp_dir = if wants("$TMP") {
        private_dir(&tmp_dir).map_err(|e| {
            error(format!(
                "cannot create the temporary directory {}: {e}",
                tmp_dir.display()
            ))
        })?;
        Some(tmp_dir)
    } else {
        None
    };
    let places = Places {
        plugin_dir: &plugin_dir,
        data_dir: &data_dir,
        tmp_dir: tmp_dir.as_deref().unwrap_or(Path::new("/nonexistent")),
    };
    let expand_all = |paths: &[String]| -> Result<Vec<String>, LoadError> {
        paths
            .iter()
            .map(|path| {
                let expanded = expand(path, &places).map_err(&error)?;
                if !expanded.exists() {
                    tracing::warn!(
                        plugin,
                        "granted path {} does not exist; skipped",
                        expanded.display()
                    );
                }
                Ok(expanded.to_string_lossy().into_owned())
            })
            .collect()
    };
    let mut read = vec![plugin_dir.to_string_lossy().into_owned()];
    read.extend(expand_all(&p.read)?);
    let write = expand_all(&p.write)?;
    let mut env: Vec<(OsString, OsString)> = p
        .env
        .iter()
        .filter_map(|name| std::env::var_os(name).map(|v| (OsString::from(name), v)))
        .collect();
    // Where the placeholders point, so the plugin can find its directories.
    env.push((PLUGIN_DIR_ENV.into(), plugin_dir.clone().into()));
    if wants("$DATA_DIR") {
        env.push((DATA_DIR_ENV.into(), data_dir.clone().into()));
    }
    if let Some(tmp) = &tmp_dir {
        env.push((TMP_DIR_ENV.into(), tmp.clone().into()));
        env.push(("TMPDIR".into(), tmp.clone().into()));
    }
    let tasks = p
        .threads
        .unwrap_or(DEFAULT_TASK_BUDGET)
        .saturating_add(p.processes.unwrap_or(DEFAULT_TASK_BUDGET));
    Ok(Plan {
        wire: Some(WireSandbox {
            mode: grant.sandbox.as_str().to_string(),
            read,
            write,
            network: p.network,
            exec: p.exec,
            tasks,
        }),
        env,
        tmp_dir,
    })
}

/// What this system offers the sandbox, as `plugin-host doctor` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemSupport {
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// Landlock ABI version (0: none).
    pub landlock_abi: i32,
    /// Whether seccomp filters are available.
    pub seccomp: bool,
    /// Whether `no_new_privs` can be set.
    pub no_new_privs: bool,
    /// Whether an unprivileged process can create user namespaces.
    pub user_namespace: bool,
    /// Whether it can create pid namespaces (inside a user namespace).
    pub pid_namespace: bool,
    /// Whether it can create IPC namespaces (inside a user namespace).
    pub ipc_namespace: bool,
    /// Whether it can create network namespaces (inside a user namespace). Informational:
    /// workers do not use one (see `docs/security.md`).
    pub network_namespace: bool,
    /// Yama's `ptrace_scope` (None: Yama is not active).
    pub yama_ptrace_scope: Option<u32>,
    /// Whether this process runs as root (the kernel then does not count its tasks).
    pub root: bool,
}

impl SystemSupport {
    /// Probes this system. Namespace support is tested in a short-lived child process,
    /// so this process is left as it was.
    pub fn detect() -> SystemSupport {
        #[cfg(target_os = "linux")]
        {
            linux::detect()
        }
        #[cfg(not(target_os = "linux"))]
        {
            SystemSupport {
                kernel: std::env::consts::OS.to_string(),
                landlock_abi: 0,
                seccomp: false,
                no_new_privs: false,
                user_namespace: false,
                pid_namespace: false,
                ipc_namespace: false,
                network_namespace: false,
                yama_ptrace_scope: None,
                root: false,
            }
        }
    }

    /// The layers a default untrusted plugin (no permissions granted) gets here, and
    /// those it would miss, each with why.
    pub fn layers(&self) -> (Vec<&'static str>, Vec<(&'static str, String)>) {
        let mut enforced = Vec::new();
        let mut missing = Vec::new();
        let mut check = |ok: bool, layer: &'static str, why: &str| {
            if ok {
                enforced.push(layer);
            } else {
                missing.push((layer, why.to_string()));
            }
        };
        let linux = cfg!(target_os = "linux");
        let only_linux = "sandboxing is only implemented on Linux";
        for layer in ["environment", "file descriptors", "not dumpable"] {
            check(linux, layer, only_linux);
        }
        check(self.user_namespace, "user namespace", "unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or an AppArmor restriction)");
        check(
            self.pid_namespace,
            "pid namespace",
            "cannot create a pid namespace in a user namespace",
        );
        check(
            self.ipc_namespace,
            "ipc namespace",
            "cannot create an IPC namespace in a user namespace",
        );
        check(linux, "capabilities", only_linux);
        check(
            self.no_new_privs,
            "no_new_privs",
            "prctl(PR_SET_NO_NEW_PRIVS) failed",
        );
        let abi = self.landlock_abi;
        check(
            abi >= 1,
            "landlock filesystem",
            &format!(
                "Landlock ABI {abi}: needs 1 (Linux 5.13+, Landlock enabled in the `lsm=` list)"
            ),
        );
        check(
            abi >= 4,
            "landlock network",
            &format!("Landlock ABI {abi}: needs 4 (Linux 6.7+)"),
        );
        check(
            abi >= 6,
            "landlock scopes",
            &format!("Landlock ABI {abi}: needs 6 (Linux 6.12+)"),
        );
        check(self.seccomp, "seccomp", "seccomp filters are not available");
        (enforced, missing)
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::SystemSupport;

    pub(super) fn detect() -> SystemSupport {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let yama_ptrace_scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let seccomp = std::fs::read_to_string("/proc/self/status")
            .map(|s| s.lines().any(|l| l.starts_with("Seccomp:")))
            .unwrap_or(false);
        let (user, pid, ipc, net, nnp) = probe_in_child();
        SystemSupport {
            kernel,
            landlock_abi: crate::worker::sandbox::landlock_abi(),
            seccomp,
            no_new_privs: nnp,
            user_namespace: user,
            pid_namespace: pid,
            ipc_namespace: ipc,
            network_namespace: net,
            yama_ptrace_scope,
            root: rustix::process::geteuid().is_root(),
        }
    }

    /// Forks a child that tries each namespace and `no_new_privs`, and reports a bit each
    /// in its exit code.
    fn probe_in_child() -> (bool, bool, bool, bool, bool) {
        // SAFETY: the child only makes system calls (prctl, unshare) and `_exit`s: nothing
        // that could depend on locks other threads of this process held at the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut bits = 0;
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0 {
                bits |= 8;
            }
            // SAFETY: unshare with flags only, in the single-threaded child.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0 {
                bits |= 1;
                // SAFETY: as above.
                if unsafe { libc::unshare(libc::CLONE_NEWPID) } == 0 {
                    bits |= 2;
                }
                // SAFETY: as above.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
                    bits |= 4;
                }
                // SAFETY: as above.
                if unsafe { libc::unshare(libc::CLONE_NEWIPC) } == 0 {
                    bits |= 16;
                }
            }
            // SAFETY: ends the child at once, running nothing of the parent's.
            unsafe { libc::_exit(bits) };
        }
        if pid < 0 {
            return (false, false, false, false, false);
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked; writes its status into `status`.
        while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
        let bits = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            0
        };
        (
            bits & 1 != 0,
            bits & 2 != 0,
            bits & 16 != 0,
            bits & 4 != 0,
            bits & 8 != 0,
        )
    }
}
