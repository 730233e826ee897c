//! The host, as an application builds it: where libraries are looked up, its permission
//! policy, the functions plugins may call back; and loading the plugins.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use plugin_host::{
    Error, Grant, Host, HostCallContext, HostError, Manifest, PermissionRequest, Plugin, Runtime,
};
use serde::{Deserialize, Serialize};

use crate::image::{gradient, Image, PHOTO_ID};

/// The host: the search paths (`-L`), the policy and the host functions the example
/// plugins import (each manifest's `imports`).
pub fn host(search_paths: &[PathBuf], plugin_dirs: &[PathBuf]) -> Result<Host, Error> {
    let own = plugin_dirs.to_vec();
    search_paths
        .iter()
        .fold(Host::builder(), |builder, dir| builder.search_path(dir))
        .permissions(move |request| policy(&own, request))
        // `thumbnail`'s `thumbnail_by_id`: the plugin fetches the picture from the app.
        .function("image.get", image_get)
        // `callbacks`' `add`.
        .function("math.add", math_add)
        // `c-echo`'s `ask` and `callbacks`' `ask`: the bytes back, unchanged.
        .raw_function("echo", |_: HostCallContext, input: Vec<u8>| async move {
            Ok(input)
        })
        // `faulty`'s `host_call_then_crash`.
        .raw_function(
            "fault.ping",
            |_: HostCallContext, input: Vec<u8>| async move { Ok(input) },
        )
        .build()
}

/// The app's permission policy: asked on every load with what the plugin's manifest
/// requests (trust, sandbox, permissions); the plugin gets what is in both.
///
/// The plugins this example loads are the repository's own examples, which the app treats
/// as shipped with it: a manifest under one of the plugin directories it was started with
/// gets what it requests (`c-echo` asks to run in-process, the others ask for nothing: a
/// sandboxed worker with no permissions). Anything else would get nothing: untrusted, in the
/// required sandbox, no permissions. An app whose users install plugins decides per
/// request instead, and remembers the user's answer (`plugin_host::GrantStore`, see the
/// guide's "Asking the user once").
fn policy(own: &[PathBuf], request: &PermissionRequest) -> Grant {
    let shipped = request
        .manifest_path
        .as_deref()
        .is_some_and(|path| own.iter().any(|dir| path.starts_with(dir)));
    let grant = match shipped {
        true => Grant::requested(request),
        false => Grant::deny_all(),
    };
    // The sandbox is Linux-only: elsewhere a required sandbox refuses every load, so the
    // example's workers run without one there (still separate processes).
    match cfg!(target_os = "linux") {
        true => grant,
        false => Grant {
            sandbox: plugin_host::SandboxMode::Off,
            ..grant
        },
    }
}

/// The host function `image.get`: the app's picture by id.
async fn image_get(_: HostCallContext, id: u64) -> Result<Image, HostError> {
    match id {
        PHOTO_ID => Ok(gradient(640, 480)),
        other => Err(HostError::new(format!(
            "the app has no image with id {other}"
        ))),
    }
}

/// `math.add`'s input.
#[derive(Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

/// The host function `math.add`.
async fn math_add(_: HostCallContext, add: Add) -> Result<i64, HostError> {
    add.a
        .checked_add(add.b)
        .ok_or_else(|| HostError::new("the sum does not fit in 64 bits"))
}

/// One manifest's load: the plugin, or why not.
pub struct Loaded {
    /// The manifest's name (or, when it could not be read, its path).
    pub name: String,
    /// The manifest file.
    pub path: PathBuf,
    /// The example plugin it is a copy of (the manifest's own name; the WebAssembly copies
    /// are named `NAME (wasm)`).
    pub base: String,
    /// The plugin, or the load error.
    pub result: Result<Plugin, Error>,
}

/// What loading found.
pub struct LoadReport {
    /// Every manifest tried, loaded or not.
    pub loads: Vec<Loaded>,
    /// Directories that could not be read at all.
    pub unreadable: Vec<(PathBuf, Error)>,
    /// The plugins whose `.wasm` module was found, so a WebAssembly copy was tried.
    pub wasm_tried: Vec<String>,
    /// How long it all took.
    pub took: Duration,
}

/// Loads every plugin under each directory (`Host::load_dir`: at the same time, each
/// failure with its path), then each native plugin again as WebAssembly where a `.wasm`
/// module for it is found beside its manifest or in a search path.
pub async fn load_all(host: &Host, dirs: &[PathBuf]) -> LoadReport {
    let started = Instant::now();
    let mut report = LoadReport {
        loads: Vec::new(),
        unreadable: Vec::new(),
        wasm_tried: Vec::new(),
        took: Duration::ZERO,
    };
    let mut manifests = Vec::new();
    for dir in dirs {
        let found = match host.load_dir(dir).await {
            Ok(found) => found,
            Err(error) => {
                report.unreadable.push((dir.clone(), error));
                continue;
            }
        };
        for plugin in found.loaded {
            manifests.push(plugin.manifest().clone());
            report.loads.push(Loaded {
                name: plugin.name().to_string(),
                path: plugin.manifest().path.clone().unwrap_or_default(),
                base: plugin.name().to_string(),
                result: Ok(plugin),
            });
        }
        for (path, error) in found.failed {
            let manifest = Manifest::from_file(&path).ok();
            let name = manifest
                .as_ref()
                .map_or_else(|| path.display().to_string(), |m| m.name.clone());
            manifests.extend(manifest);
            report.loads.push(Loaded {
                base: name.clone(),
                name,
                path,
                result: Err(error),
            });
        }
    }
    for manifest in manifests {
        let Some(module) = wasm_module(&manifest, host.search_paths()) else {
            continue;
        };
        report.wasm_tried.push(manifest.name.clone());
        let base = manifest.name.clone();
        let path = manifest.path.clone().unwrap_or_default();
        let mut wasm = manifest;
        // The same plugin in the interpreter, under a name of its own (names are unique in
        // a host).
        wasm.name = format!("{base} (wasm)");
        wasm.runtime = Runtime::Wasm;
        wasm.library = module.display().to_string();
        report.loads.push(Loaded {
            name: wasm.name.clone(),
            path,
            base,
            result: host.load_manifest(wasm).await,
        });
    }
    report.loads.sort_by(|a, b| a.name.cmp(&b.name));
    report.took = started.elapsed();
    report
}

/// A native plugin's WebAssembly module (`LIBRARY.wasm`), beside its manifest or in a
/// search path.
fn wasm_module(manifest: &Manifest, search_paths: &[PathBuf]) -> Option<PathBuf> {
    if manifest.runtime != Runtime::Native {
        return None;
    }
    let file = Runtime::Wasm.library_file_name(Path::new(&manifest.library).file_name()?.to_str()?);
    let beside = manifest.path.as_deref().and_then(Path::parent);
    beside
        .into_iter()
        .chain(search_paths.iter().map(PathBuf::as_path))
        .map(|dir| dir.join(&file))
        .find(|path| path.is_file())
        // A relative `library` is taken from the manifest's directory: make it absolute.
        .map(|path| std::path::absolute(&path).unwrap_or(path))
}
