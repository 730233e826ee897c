//! Permissions: what a plugin asks for (the manifest's `[permissions]`), what the
//! application grants (its policy, see [`HostBuilder::permissions`]), and what the worker
//! then enforces (their intersection).
//!
//! Trust comes from the application, never from the plugin: a manifest only *requests*
//! `trust = "trusted"`, a sandbox mode and permissions. The host hands every request to the
//! app's policy as a [`PermissionRequest`] and the plugin gets what was both requested and
//! granted. The default policy, [`Grant::deny_all`], runs every plugin untrusted, in the
//! required sandbox, with no permissions at all.
//!
//! [`HostBuilder::permissions`]: crate::HostBuilder::permissions

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::manifest::{Manifest, Trust};

/// How strictly an untrusted plugin's worker is sandboxed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SandboxMode {
    /// Every layer must be in force; a layer this system cannot provide fails the load with
    /// [`LoadError::Sandbox`](crate::LoadError::Sandbox) naming it. The default.
    #[default]
    Required,
    /// Apply every layer this system provides; load anyway (with a warning listing what
    /// is missing) when some are not available.
    BestEffort,
    /// No sandbox: the worker runs with the host's environment and rights (crash
    /// containment only). For debugging.
    Off,
}

impl SandboxMode {
    /// The manifest spelling: `"required"`, `"best-effort"`, `"off"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Required => "required",
            SandboxMode::BestEffort => "best-effort",
            SandboxMode::Off => "off",
        }
    }

    /// Parses the manifest spelling.
    pub fn parse(text: &str) -> Option<SandboxMode> {
        match text {
            "required" => Some(SandboxMode::Required),
            "best-effort" => Some(SandboxMode::BestEffort),
            "off" => Some(SandboxMode::Off),
            _ => None,
        }
    }

    /// The stricter of two modes.
    fn stricter(self, other: SandboxMode) -> SandboxMode {
        let rank = |m: SandboxMode| match m {
            SandboxMode::Required => 2,
            SandboxMode::BestEffort => 1,
            SandboxMode::Off => 0,
        };
        if rank(self) >= rank(other) {
            self
        } else {
            other
        }
    }
}

/// The `[permissions]` of a manifest (requested), or of a [`Grant`] (granted).
///
/// Paths may start with a placeholder: `$PLUGIN_DIR` (the directory of the plugin's
/// library), `$DATA_DIR` (a private directory per plugin that the host creates, see
/// [`HostBuilder::data_dir`](crate::HostBuilder::data_dir)) or `$TMP` (a private temporary
/// directory per plugin, removed when the plugin stops). Other paths must be absolute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Permissions {
    /// Paths the plugin may read (files, or directories and everything beneath).
    pub read: Vec<String>,
    /// Paths the plugin may read and write, create and remove files in.
    pub write: Vec<String>,
    /// Whether the plugin may open network sockets (TCP, UDP, DNS). Default `false`.
    pub network: bool,
    /// Environment variables the plugin may see (names); every other variable is removed.
    pub env: Vec<String>,
    /// Whether the plugin may run other programs (`execve`). Default `false`.
    pub exec: bool,
    /// Threads the plugin may start beyond the worker's own; `None`: the default budget.
    pub threads: Option<u32>,
    /// Child processes the plugin may start; `None`: the default budget.
    pub processes: Option<u32>,
}

/// Threads and processes a plugin may start when its manifest does not say.
pub const DEFAULT_TASK_BUDGET: u32 = 32;

impl Permissions {
    /// Whether nothing at all is asked for.
    pub fn is_empty(&self) -> bool {
        *self == Permissions::default()
    }

    /// What is in both `self` and `other`: paths and names present in both, flags set in
    /// both, the smaller of two task budgets.
    pub fn intersect(&self, other: &Permissions) -> Permissions {
        let both = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|x| b.contains(x)).cloned().collect()
        };
        let min = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, None) => a,
            (None, b) => b,
        };
        Permissions {
            read: both(&self.read, &other.read),
            write: both(&self.write, &other.write),
            network: self.network && other.network,
            env: both(&self.env, &other.env),
            exec: self.exec && other.exec,
            threads: min(self.threads, other.threads),
            processes: min(self.processes, other.processes),
        }
    }

    /// One line for humans: `read [..], write [..], network, env [..], exec`, or `none`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.read.is_empty() {
            parts.push(format!("read {}", self.read.join(", ")));
        }
        if !self.write.is_empty() {
            parts.push(format!("write {}", self.write.join(", ")));
        }
        if self.network {
            parts.push("network".into());
        }
        if !self.env.is_empty() {
            parts.push(format!("env {}", self.env.join(", ")));
        }
        if self.exec {
            parts.push("exec".into());
        }
        if let Some(n) = self.threads {
            parts.push(format!("threads {n}"));
        }
        if let Some(n) = self.processes {
            parts.push(format!("processes {n}"));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join("; ")
        }
    }
}

/// What a plugin's manifest asks of the application, handed to the app's policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermissionRequest {
    /// The plugin's manifest name.
    pub plugin: String,
    /// The manifest file, if the plugin came from one.
    pub manifest_path: Option<PathBuf>,
    /// The requested trust (`trust = "trusted"` asks to run in-process).
    pub trust: Trust,
    /// The requested sandbox mode.
    pub sandbox: SandboxMode,
    /// The requested permissions.
    pub permissions: Permissions,
    /// A content hash of everything above but the path: store it with a grant, and ask
    /// again when it changes (the plugin's update asks for something new).
    pub digest: String,
}

impl PermissionRequest {
    /// The request a manifest makes.
    pub fn from_manifest(manifest: &Manifest) -> PermissionRequest {
        let mut request = PermissionRequest {
            plugin: manifest.name.clone(),
            manifest_path: manifest.path.clone(),
            trust: manifest.trust,
            sandbox: manifest.sandbox,
            permissions: manifest.permissions.clone(),
            digest: String::new(),
        };
        request.digest = request.compute_digest();
        request
    }

    /// A stable hash (FNV-1a, 64 bits, hex) of the plugin name, trust, sandbox mode and
    /// permissions, in a canonical text form.
    fn compute_digest(&self) -> String {
        let p = &self.permissions;
        let text = format!(
            "plugin={}\ntrust={}\nsandbox={}\nread={:?}\nwrite={:?}\nnetwork={}\nenv={:?}\nexec={}\nthreads={:?}\nprocesses={:?}\n",
            self.plugin,
            match self.trust {
                Trust::Trusted => "trusted",
                Trust::Untrusted => "untrusted",
            },
            self.sandbox.as_str(),
            p.read,
            p.write,
            p.network,
            p.env,
            p.exec,
            p.threads,
            p.processes
        );
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// What the application grants a plugin. The plugin gets the intersection of this and its
/// request ([`Grant::effective`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// `Trusted` runs the plugin in-process (only if it also asked for it).
    pub trust: Trust,
    /// The sandbox mode of its worker (the app decides; the manifest's is a request).
    pub sandbox: SandboxMode,
    /// The permissions granted.
    pub permissions: Permissions,
}

impl Default for Grant {
    fn default() -> Self {
        Grant::deny_all()
    }
}

impl Grant {
    /// Nothing: untrusted, sandbox required, no permissions. The default policy.
    pub fn deny_all() -> Grant {
        Grant {
            trust: Trust::Untrusted,
            sandbox: SandboxMode::Required,
            permissions: Permissions::default(),
        }
    }

    /// Everything the request asks for (trust, sandbox mode and permissions). For plugins
    /// the app ships itself, or after the user agreed to the request.
    pub fn requested(request: &PermissionRequest) -> Grant {
        Grant {
            trust: request.trust,
            sandbox: request.sandbox,
            permissions: request.permissions.clone(),
        }
    }

    /// What the plugin gets: what was both requested and granted. The sandbox mode is the
    /// app's, except that a stricter mode the manifest asks for is kept.
    pub fn effective(&self, request: &PermissionRequest) -> Grant {
        let trust = match (self.trust, request.trust) {
            (Trust::Trusted, Trust::Trusted) => Trust::Trusted,
            _ => Trust::Untrusted,
        };
        let sandbox = match self.sandbox {
            SandboxMode::Off => SandboxMode::Off,
            granted => granted.stricter(request.sandbox),
        };
        Grant {
            trust,
            sandbox,
            permissions: request.permissions.intersect(&self.permissions),
        }
    }
}

/// The app's policy: the grant for each request.
pub(crate) type Policy = std::sync::Arc<dyn Fn(&PermissionRequest) -> Grant + Send + Sync>;

/// Remembers grants per plugin in a small TOML file, keyed by the request's digest: a
/// plugin whose manifest asks for something new (its digest changed) is not found, so the
/// app asks again.
///
/// ```
/// # fn main() -> std::io::Result<()> {
/// use plugin_host::{Grant, GrantStore, Host};
/// let dir = tempfile_dir();
/// let store = GrantStore::open(dir.join("grants.toml"))?;
/// let host = Host::builder()
///     .permissions(move |request| match store.get(request) {
///         Some(grant) => grant,
///         // Ask the user here; remember the answer with `store.remember`.
///         None => Grant::deny_all(),
///     })
///     .build();
/// # let _ = host;
/// # Ok(())
/// # }
/// # fn tempfile_dir() -> std::path::PathBuf {
/// #     let d = std::env::temp_dir().join(format!("grant-doc-{}", std::process::id()));
/// #     std::fs::create_dir_all(&d).unwrap();
/// #     d
/// # }
/// ```
#[derive(Debug)]
pub struct GrantStore {
    path: PathBuf,
    grants: std::sync::Mutex<BTreeMap<String, (String, Grant)>>,
}

impl GrantStore {
    /// Opens (or starts) the store at `path`. A missing file is an empty store.
    pub fn open(path: impl Into<PathBuf>) -> std::io::Result<GrantStore> {
        let path = path.into();
        let grants = match std::fs::read_to_string(&path) {
            Ok(text) => parse_store(&text).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(GrantStore {
            path,
            grants: std::sync::Mutex::new(grants),
        })
    }

    /// The remembered grant for this request, if the request has not changed since.
    pub fn get(&self, request: &PermissionRequest) -> Option<Grant> {
        let grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        match grants.get(&request.plugin) {
            Some((digest, grant)) if *digest == request.digest => Some(grant.clone()),
            _ => None,
        }
    }

    /// Remembers `grant` for this request and saves the file.
    pub fn remember(&self, request: &PermissionRequest, grant: &Grant) -> std::io::Result<()> {
        let mut grants = self.grants.lock().unwrap_or_else(|e| e.into_inner());
        grants.insert(
            request.plugin.clone(),
            (request.digest.clone(), grant.clone()),
        );
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&self.path, render_store(&grants))
    }
}

fn render_store(grants: &BTreeMap<String, (String, Grant)>) -> String {
    let mut table = toml::Table::new();
    for (plugin, (digest, grant)) in grants {
        let p = &grant.permissions;
        let mut entry = toml::Table::new();
        let list =
            |v: &[String]| toml::Value::Array(v.iter().cloned().map(toml::Value::String).collect());
        entry.insert("digest".into(), digest.clone().into());
        entry.insert(
            "trust".into(),
            match grant.trust {
                Trust::Trusted => "trusted",
                Trust::Untrusted => "untrusted",
            }
            .into(),
        );
        entry.insert("sandbox".into(), grant.sandbox.as_str().into());
        entry.insert("read".into(), list(&p.read));
        entry.insert("write".into(), list(&p.write));
        entry.insert("network".into(), p.network.into());
        entry.insert("env".into(), list(&p.env));
        entry.insert("exec".into(), p.exec.into());
        if let Some(n) = p.threads {
            entry.insert("threads".into(), i64::from(n).into());
        }
        if let Some(n) = p.processes {
            entry.insert("processes".into(), i64::from(n).into());
        }
        table.insert(plugin.clone(), toml::Value::Table(entry));
    }
    format!(
        "# Grants remembered by plugin-host: one table per plugin, valid while the plugin's\n# request has this digest.\n{table}"
    )
}

fn parse_store(text: &str) -> Result<BTreeMap<String, (String, Grant)>, String> {
    let table: toml::Table = text.parse().map_err(|e| format!("not valid TOML: {e}"))?;
    let mut grants = BTreeMap::new();
    for (plugin, entry) in table {
        let entry = entry
            .as_table()
            .ok_or_else(|| format!("`{plugin}` is not a table"))?;
        let text = |key: &str| entry.get(key).and_then(toml::Value::as_str).unwrap_or("");
        let list = |key: &str| -> Vec<String> {
            entry
                .get(key)
                .and_then(toml::Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let flag = |key: &str| {
            entry
                .get(key)
                .and_then(toml::Value::as_bool)
                .unwrap_or(false)
        };
        let count = |key: &str| {
            entry
                .get(key)
                .and_then(toml::Value::as_integer)
                .and_then(|n| u32::try_from(n).ok())
        };
        let grant = Grant {
            trust: if text("trust") == "trusted" {
                Trust::Trusted
            } else {
                Trust::Untrusted
            },
            sandbox: SandboxMode::parse(text("sandbox")).unwrap_or_default(),
            permissions: Permissions {
                read: list("read"),
                write: list("write"),
                network: flag("network"),
                env: list("env"),
                exec: flag("exec"),
                threads: count("threads"),
                processes: count("processes"),
            },
        };
        grants.insert(plugin, (text("digest").to_string(), grant));
    }
    Ok(grants)
}

/// Directories a plugin's placeholders stand for.
pub(crate) struct Places<'a> {
    pub plugin_dir: &'a Path,
    pub data_dir: &'a Path,
    pub tmp_dir: &'a Path,
}

/// Which placeholders a list of paths uses.
pub(crate) fn uses_placeholder(paths: &[String], placeholder: &str) -> bool {
    paths.iter().any(|p| p.starts_with(placeholder))
}

/// Replaces a leading placeholder; a path that is still not absolute is an error.
pub(crate) fn expand(path: &str, places: &Places<'_>) -> Result<PathBuf, String> {
    let (base, rest) = if let Some(rest) = path.strip_prefix("$PLUGIN_DIR") {
        (Some(places.plugin_dir), rest)
    } else if let Some(rest) = path.strip_prefix("$DATA_DIR") {
        (Some(places.data_dir), rest)
    } else if let Some(rest) = path.strip_prefix("$TMP") {
        (Some(places.tmp_dir), rest)
    } else {
        (None, path)
    };
    let expanded = match base {
        Some(base) => {
            let rest = rest.trim_start_matches('/');
            if rest.is_empty() {
                base.to_path_buf()
            } else {
                base.join(rest)
            }
        }
        None => PathBuf::from(rest),
    };
    if !expanded.is_absolute() {
        return Err(format!(
            "`{path}` is not an absolute path (use an absolute path or start with $PLUGIN_DIR, $DATA_DIR or $TMP)"
        ));
    }
    Ok(expanded)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(p: Permissions, trust: Trust) -> PermissionRequest {
        let mut r = PermissionRequest {
            plugin: "p".into(),
            manifest_path: None,
            trust,
            sandbox: SandboxMode::Required,
            permissions: p,
            digest: String::new(),
        };
        r.digest = r.compute_digest();
        r
    }

    #[test]
    fn the_plugin_gets_what_was_both_requested_and_granted() {
        let asked = Permissions {
            read: vec!["/a".into(), "/b".into()],
            network: true,
            exec: true,
            threads: Some(8),
            ..Permissions::default()
        };
        let req = request(asked, Trust::Trusted);
        let grant = Grant {
            trust: Trust::Untrusted,
            sandbox: SandboxMode::BestEffort,
            permissions: Permissions {
                read: vec!["/b".into(), "/c".into()],
                network: true,
                threads: Some(4),
                ..Permissions::default()
            },
        };
        let got = grant.effective(&req);
        assert_eq!(got.trust, Trust::Untrusted, "trust needs both");
        assert_eq!(got.permissions.read, ["/b"]);
        assert!(got.permissions.network);
        assert!(!got.permissions.exec, "exec was not granted");
        assert_eq!(got.permissions.threads, Some(4));
        assert_eq!(
            got.sandbox,
            SandboxMode::Required,
            "a stricter mode the manifest asks for is kept"
        );
        let denied = Grant::deny_all().effective(&req).permissions;
        assert_eq!(
            denied,
            Permissions {
                threads: Some(8),
                ..Permissions::default()
            },
            "nothing granted; a budget below the default stays the plugin's own"
        );
    }

    #[test]
    fn a_trusted_request_is_untrusted_unless_granted() {
        let req = request(Permissions::default(), Trust::Trusted);
        assert_eq!(Grant::deny_all().effective(&req).trust, Trust::Untrusted);
        assert_eq!(Grant::requested(&req).effective(&req).trust, Trust::Trusted);
    }

    #[test]
    fn the_digest_changes_with_the_request() {
        let a = request(Permissions::default(), Trust::Untrusted);
        let b = request(
            Permissions {
                network: true,
                ..Permissions::default()
            },
            Trust::Untrusted,
        );
        assert_ne!(a.digest, b.digest);
        assert_eq!(
            a.digest,
            request(Permissions::default(), Trust::Untrusted).digest
        );
    }

    #[test]
    fn placeholders_expand_and_relative_paths_are_refused() {
        // An absolute path on this platform.
        let abs = |p: &str| match cfg!(windows) {
            true => std::path::PathBuf::from(format!("C:{p}")),
            false => std::path::PathBuf::from(p),
        };
        let (plugin_dir, data_dir, tmp_dir) = (abs("/plugins/x"), abs("/data/x"), abs("/tmp/x"));
        let places = Places {
            plugin_dir: &plugin_dir,
            data_dir: &data_dir,
            tmp_dir: &tmp_dir,
        };
        assert_eq!(expand("$PLUGIN_DIR", &places).unwrap(), abs("/plugins/x"));
        assert_eq!(expand("$DATA_DIR/db", &places).unwrap(), abs("/data/x/db"));
        let fonts = abs("/etc/fonts");
        assert_eq!(expand(fonts.to_str().unwrap(), &places).unwrap(), fonts);
        assert!(expand("fonts", &places).unwrap_err().contains("absolute"));
    }

    #[test]
    fn a_store_remembers_grants_until_the_request_changes() {
        let dir = std::env::temp_dir().join(format!("grant-store-test-{}", std::process::id()));
        let path = dir.join("grants.toml");
        let req = request(
            Permissions {
                read: vec!["/x".into()],
                threads: Some(3),
                ..Permissions::default()
            },
            Trust::Untrusted,
        );
        let store = GrantStore::open(&path).unwrap();
        assert_eq!(store.get(&req), None);
        let grant = Grant::requested(&req);
        store.remember(&req, &grant).unwrap();
        let reopened = GrantStore::open(&path).unwrap();
        assert_eq!(reopened.get(&req), Some(grant));
        let changed = request(
            Permissions {
                read: vec!["/x".into(), "/home".into()],
                ..Permissions::default()
            },
            Trust::Untrusted,
        );
        assert_eq!(
            reopened.get(&changed),
            None,
            "a changed request needs a new grant"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
