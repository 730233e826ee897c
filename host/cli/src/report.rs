//! Errors as the command line prints them.
//!
//! The library's messages are written for application developers: where there is something
//! to do they name library calls (`HostBuilder::search_path`, `HostBuilder::worker_shim`,
//! `cargo build -p plugin-host`, `Plugin::enable`). A user of the command has flags and
//! environment variables instead, so for those error kinds the message is rebuilt from the
//! error's fields and followed by hints that speak the command's language (`-L DIR`,
//! `PLUGIN_HOST_WORKER_SHIM=...`, the command that builds a missing library or WebAssembly
//! module). Every other error is printed as the library displays it.

use std::path::{Path, PathBuf};

use plugin_host::{CallError, Error, LoadError, Manifest, WORKER_SHIM_ENV};

use crate::WASM_TARGET;

/// An error in the command's words: one message, then zero or more hints.
pub struct Report {
    /// What went wrong (the `error:` line).
    pub message: String,
    /// What the user can do about it (one `hint:` line each).
    pub hints: Vec<String>,
}

/// Describes `err` for the command line. `manifest` is the manifest file the failing
/// operation was about, if known: it tells where a missing library would be built.
pub fn explain(err: &Error, manifest: Option<&Path>) -> Report {
    let plain = |message: String| Report {
        message,
        hints: Vec::new(),
    };
    match err {
        Error::Load(LoadError::LibraryNotFound {
            plugin,
            library,
            searched,
        }) => {
            let mut hints = Vec::new();
            let plugin_dir = manifest
                .map(manifest_dir)
                .or_else(|| searched.first().and_then(|p| p.parent()).map(nonempty));
            let wasm = library.ends_with(".wasm")
                || searched
                    .first()
                    .is_some_and(|p| p.extension().is_some_and(|e| e == "wasm"));
            if wasm {
                hints.extend(wasm_build_hints(plugin_dir.as_deref(), library, searched));
            } else if let Some(command) = plugin_dir.and_then(|dir| build_command(&dir, searched)) {
                hints.push(format!("build it: {command}"));
            } else {
                let file = searched.first().map_or_else(
                    || Manifest::library_file_name(library),
                    |p| p.display().to_string(),
                );
                hints.push(format!("build the plugin's library ({file})"));
            }
            hints.push(
                "if it is built elsewhere, pass its directory with -L DIR (--search-path DIR)"
                    .into(),
            );
            Report {
                message: format!(
                    "plugin `{plugin}`: {} `{library}` not found; looked in: {}",
                    match wasm {
                        true => "WebAssembly module",
                        false => "library",
                    },
                    list(searched)
                ),
                hints,
            }
        }
        Error::Load(LoadError::WorkerSpawn { plugin, shim, .. }) if !shim.is_file() => {
            worker_missing(plugin)
        }
        Error::Load(LoadError::Sandbox { plugin, message }) => Report {
            message: format!("plugin `{plugin}`: cannot sandbox the worker: {message}"),
            hints: vec![
                "`plugin-host doctor` lists the sandbox layers this system lacks; with \
                 `--grant`, a plugin you trust gets the sandbox mode its manifest requests \
                 (sandbox = \"best-effort\" or \"off\")"
                    .into(),
            ],
        },
        Error::Load(LoadError::ProtocolMismatch {
            plugin, message, ..
        }) => Report {
            message: format!("plugin `{plugin}`: {message}"),
            hints: vec![format!(
                "use the worker-shim built with this plugin-host: keep the two in the same \
                 directory, or set {WORKER_SHIM_ENV}=/path/to/worker-shim"
            )],
        },
        Error::Call(CallError::Quarantined { plugin, report }) => Report {
            message: format!(
                "plugin `{plugin}` is quarantined after repeated crashes. Last crash: {report}"
            ),
            hints: vec!["each `plugin-host call` loads the plugin afresh".into()],
        },
        other => plain(other.to_string()),
    }
}

/// Prints `err` to stderr: `error: MESSAGE`, then one `hint: ...` line per hint.
pub fn print(err: &Error, manifest: Option<&Path>) {
    let report = explain(err, manifest);
    eprintln!("error: {}", report.message);
    for hint in &report.hints {
        eprintln!("hint: {hint}");
    }
}

/// No worker-shim where the command looks for it (the library's lookup order, see
/// docs/guide.md "Finding the worker-shim": the environment variable, else this
/// executable's directory and its parent).
fn worker_missing(plugin: &str) -> Report {
    let file = format!("worker-shim{}", std::env::consts::EXE_SUFFIX);
    if let Some(value) = std::env::var_os(WORKER_SHIM_ENV).filter(|v| !v.is_empty()) {
        return Report {
            message: format!(
                "plugin `{plugin}`: cannot start the worker: {WORKER_SHIM_ENV}={} names no file",
                value.to_string_lossy()
            ),
            hints: vec![format!(
                "set {WORKER_SHIM_ENV} to the {file} executable built with this plugin-host, or \
                 unset it (plugin-host is its own worker)"
            )],
        };
    }
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(Path::parent);
    let tried: Vec<PathBuf> = [dir, dir.and_then(Path::parent)]
        .into_iter()
        .flatten()
        .map(|d| d.join(&file))
        .collect();
    Report {
        message: format!(
            "plugin `{plugin}`: cannot start the worker: no {file} executable found (looked in: \
             {})",
            list(&tried)
        ),
        hints: vec![format!(
            "untrusted plugins run in {file}, which is built along with plugin-host: keep it in \
             the same directory as plugin-host, or set {WORKER_SHIM_ENV}=/path/to/{file}"
        )],
    }
}

fn list(paths: &[PathBuf]) -> String {
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    list.join(", ")
}

/// The directory of a manifest file (`.` for a bare file name).
fn manifest_dir(manifest: &Path) -> PathBuf {
    manifest
        .parent()
        .map_or_else(|| PathBuf::from("."), nonempty)
}

fn nonempty(dir: &Path) -> PathBuf {
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_path_buf()
    }
}

/// The shell command that builds the library of the plugin in `dir`, if the directory
/// says how: a `build.sh`, a `Makefile`, a Cargo package, or a single C source file next
/// to a `plugin-api/include` directory. `searched` is where the library was looked for;
/// its first entry is where the manifest expects it.
fn build_command(dir: &Path, searched: &[PathBuf]) -> Option<String> {
    if dir.join("build.sh").is_file() {
        return Some(format!("sh {}", quote(&dir.join("build.sh"))));
    }
    if dir.join("Makefile").is_file() {
        return Some(format!("make -C {}", quote(dir)));
    }
    if dir.join("Cargo.toml").is_file() {
        return Some(cargo_command(&dir.join("Cargo.toml")));
    }
    let sources: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    let [source] = sources.as_slice() else {
        return None;
    };
    let include = dir
        .ancestors()
        .take(6)
        .map(|d| d.join("plugin-api").join("include"))
        .find(|d| d.join("plugin_api.h").is_file())?;
    let output = searched.first()?;
    Some(format!(
        "cc -shared -fPIC -O2 -I {} -o {} {}",
        quote(&include),
        quote(output),
        quote(source)
    ))
}

/// How to build a missing WebAssembly module: the `cargo build --target
/// wasm32-unknown-unknown` command (for the Cargo package in the plugin's directory, else
/// for a package named after the module), where the module lands, and whether the command
/// looks there.
fn wasm_build_hints(plugin_dir: Option<&Path>, library: &str, searched: &[PathBuf]) -> Vec<String> {
    let stem = |p: &Path| p.file_stem().and_then(|s| s.to_str()).map(str::to_string);
    let package = plugin_dir.and_then(|dir| {
        let cargo_toml = dir.join("Cargo.toml");
        let text = std::fs::read_to_string(&cargo_toml).ok()?;
        let value: plugin_host::toml::Table = text.parse().ok()?;
        let name = value.get("package")?.get("name")?.as_str()?.to_string();
        Some((name, dir.to_path_buf()))
    });
    let target = format!("--release --target {WASM_TARGET}");
    let Some((name, dir)) = package else {
        let name = searched
            .first()
            .and_then(|p| stem(p))
            .or_else(|| stem(Path::new(library)))
            .unwrap_or_else(|| library.to_string());
        return vec![
            format!(
                "build it: cargo build {target} -p PACKAGE (in the plugin's Cargo workspace; \
                 PACKAGE is the plugin's crate, a cdylib, whose module is `{name}.wasm`)"
            ),
            format!(
                "it lands in target/{WASM_TARGET}/release/ of that workspace; point the \
                 manifest's `library` at it, or pass that directory with -L DIR"
            ),
            format!("the target, once: rustup target add {WASM_TARGET}"),
        ];
    };
    // The workspace the package builds in: the nearest directory up from it whose
    // Cargo.toml has a [workspace] (else the package's own directory).
    let absolute = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    let root = absolute
        .ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml"))
                .ok()
                .and_then(|t| t.parse::<plugin_host::toml::Table>().ok())
                .is_some_and(|t| t.contains_key("workspace"))
        })
        .unwrap_or(&absolute)
        .to_path_buf();
    let here = std::env::current_dir()
        .ok()
        .and_then(|d| d.canonicalize().ok());
    let cd = match here.as_deref() == Some(root.as_path()) {
        true => String::new(),
        false => format!("cd {} && ", quote(&root)),
    };
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target_dir.join(WASM_TARGET).join("release");
    let module = out_dir.join(format!("{}.wasm", name.replace('-', "_")));
    let out_canonical = out_dir.canonicalize().unwrap_or_else(|_| out_dir.clone());
    let looked_there = searched.iter().any(|p| {
        p.parent()
            .is_some_and(|d| d == out_dir || d.canonicalize().is_ok_and(|d| d == out_canonical))
    });
    let lands = match looked_there {
        true => format!("it lands in {}, where plugin-host looks", module.display()),
        false => format!(
            "it lands in {}; pass that directory with -L {} (or point the manifest's `library` \
             at the module)",
            module.display(),
            quote(&out_dir)
        ),
    };
    vec![
        format!("build it: {cd}cargo build {target} -p {name}"),
        lands,
        format!("the target, once: rustup target add {WASM_TARGET}"),
    ]
}

/// `cargo build` for the package at `cargo_toml`, in the profile this executable was built
/// with, so that the library lands next to it (where it looks).
fn cargo_command(cargo_toml: &Path) -> String {
    let exe = std::env::current_exe().ok();
    let profile_dir = exe
        .as_deref()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|n| n.to_str());
    let release = match profile_dir {
        Some("debug") => "",
        _ => " --release",
    };
    format!("cargo build{release} --manifest-path {}", quote(cargo_toml))
}

/// A path as a shell word: as it is when it needs no quoting, else in single quotes.
fn quote(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_only_when_needed() {
        assert_eq!(
            quote(Path::new("plugins/c-echo/build.sh")),
            "plugins/c-echo/build.sh"
        );
        assert_eq!(quote(Path::new("my plugins/x")), "'my plugins/x'");
        assert_eq!(quote(Path::new("it's")), r"'it'\''s'");
    }

    #[test]
    fn a_missing_library_gets_a_cli_hint_not_a_library_call() {
        let err = Error::Load(LoadError::LibraryNotFound {
            plugin: "x".into(),
            library: "x".into(),
            searched: vec![PathBuf::from("/nonexistent/dir/libx.so")],
        });
        let report = explain(&err, Some(Path::new("/nonexistent/dir/plugin.toml")));
        assert!(
            !report.message.contains("HostBuilder"),
            "{}",
            report.message
        );
        assert!(report.hints.iter().any(|h| h.contains("-L DIR")));
    }
}
