//! Builds what the end-to-end tests load, so `cargo test --workspace` works from a fresh
//! clone with no other step:
//! - the example plugins (cdylib) and the `worker-shim`/`plugin-host` binaries, by a nested
//!   `cargo build` into `target/e2e` (a separate target directory, so it never waits on
//!   the lock the outer build holds);
//! - the example plugins `hello`, `thumbnail`, `faulty` and `callbacks` again as WebAssembly
//!   modules, by a second nested `cargo build --release --target wasm32-unknown-unknown`
//!   into the same directory (`target/e2e/wasm32-unknown-unknown/release/NAME.wasm`), for
//!   the wasm backend's tests. It needs the `wasm32-unknown-unknown` standard library: if
//!   the toolchain lacks it, `rustup target add wasm32-unknown-unknown` is tried once, and
//!   if that does not help the build goes on with a warning (the wasm tests will fail);
//! - the C plugins `plugins/c-echo/echo.c` and `plugins/attack/attack.c` (the sandbox
//!   tests' malicious plugin), with the C compiler the `cc` crate finds;
//! - the frozen ABI 1.0 C plugin `tests/abi-1.0/echo.c`, against the frozen ABI 1.0 header
//!   next to it (not `plugin-api/include`), to prove hosts still load 1.0 libraries.
//!
//! The tests read the resulting paths from `PLUGIN_HOST_E2E_DIR`, `PLUGIN_HOST_WASM_DIR`
//! (the directory of the `.wasm` modules), `C_ECHO_LIBRARY` (and its variants
//! `C_ECHO_ABI99_LIBRARY`, `C_ECHO_NO_ENTRY_LIBRARY`), `C_ECHO_ABI10_LIBRARY` and
//! `ATTACK_LIBRARY`.
//!
//! Everything is built for the target being compiled (`TARGET`), not for the machine
//! running the build: when cross-compiling (`cargo test --target x86_64-pc-windows-gnu`),
//! the nested build gets `--target` and its output lands in `target/e2e/$TARGET/debug`,
//! library names follow the target's OS, and the C plugins are compiled by the target's C
//! compiler (the `cc` crate picks it from `TARGET`, e.g. `x86_64-w64-mingw32-gcc`). The
//! WebAssembly modules are built only when building for the build machine's own target
//! (not when cross-compiling; `PLUGIN_HOST_WASM_DIR` is set all the same). An Apple target
//! from a non-Apple machine has no toolchain to link with: the artifacts are
//! skipped (with a warning) and the variables point at files that do not exist, so that
//! `cargo check`/`cargo clippy --target x86_64-apple-darwin` still work.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the example plugins are built for as WebAssembly modules.
const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The example plugins built as WebAssembly modules (`NAME.wasm`).
const WASM_PLUGINS: [&str; 4] = ["hello", "thumbnail", "faulty", "callbacks"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    for path in [
        "plugins",
        "plugin-api",
        "host/src",
        "host/Cargo.toml",
        "host/protocol",
        "host/cli",
        "Cargo.toml",
        "Cargo.lock",
        "tests/abi-1.0",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }

    let target = env::var("TARGET").unwrap();
    let host = env::var("HOST").unwrap();
    let target_os = env::var("CARGO_CFG_TARGET_OS").unwrap();
    let cross = target != host;
    // No Apple linker or SDK on other machines: type-check only.
    let apple_target = env::var("CARGO_CFG_TARGET_VENDOR").as_deref() == Ok("apple");
    let skip_artifacts = apple_target && !host.contains("-apple-");
    if skip_artifacts {
        println!(
            "cargo:warning=cross-compiling for {target} from {host}: the e2e plugins, \
             worker-shim and C plugins are not built (no Apple toolchain); the tests \
             compile but cannot run"
        );
    }

    let target_dir = root.join("target").join("e2e");
    // Where the nested build puts its output: with `--target`, under a directory named
    // after the target.
    let e2e_dir = if cross {
        target_dir.join(&target).join("debug")
    } else {
        target_dir.join("debug")
    };
    if !skip_artifacts {
        build_e2e_artifacts(&root, &target_dir, cross.then_some(&target[..]), &host);
    }
    println!("cargo:rustc-env=PLUGIN_HOST_E2E_DIR={}", e2e_dir.display());

    // The example plugins as WebAssembly modules: only when building for this machine (the
    // tests of a cross build run elsewhere, e.g. under Wine, and do not load them).
    let wasm_dir = target_dir.join(WASM_TARGET).join("release");
    if !cross {
        build_wasm_plugins(&root, &target_dir, &host);
    }
    println!(
        "cargo:rustc-env=PLUGIN_HOST_WASM_DIR={}",
        wasm_dir.display()
    );

    // The C plugin, compiled as a shared library; two broken variants for the tests; and
    // the frozen ABI 1.0 plugin against the frozen ABI 1.0 header.
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    const CURRENT: &str = "plugin-api/include";
    for (name, source, include, defines, var) in [
        (
            "c_echo",
            "plugins/c-echo/echo.c",
            CURRENT,
            &[][..],
            "C_ECHO_LIBRARY",
        ),
        (
            "c_echo_abi99",
            "plugins/c-echo/echo.c",
            CURRENT,
            &["C_ECHO_ABI_MAJOR=99"][..],
            "C_ECHO_ABI99_LIBRARY",
        ),
        (
            "c_echo_no_entry",
            "plugins/c-echo/echo.c",
            CURRENT,
            &["C_ECHO_NO_ENTRY"][..],
            "C_ECHO_NO_ENTRY_LIBRARY",
        ),
        (
            "c_echo_abi10",
            "tests/abi-1.0/echo.c",
            "tests/abi-1.0",
            &[][..],
            "C_ECHO_ABI10_LIBRARY",
        ),
    ] {
        let library = out_dir.join(library_file_name(&target_os, name));
        if !skip_artifacts {
            compile_c_plugin(&root, source, include, &library, defines, &target_os);
        }
        println!("cargo:rustc-env={var}={}", library.display());
    }

    // The attack plugin (Unix targets only: it is made of POSIX and Linux calls).
    if env::var("CARGO_CFG_UNIX").is_ok() {
        let library = out_dir.join(library_file_name(&target_os, "attack"));
        if !skip_artifacts {
            compile_c_plugin(
                &root,
                "plugins/attack/attack.c",
                CURRENT,
                &library,
                &[],
                &target_os,
            );
        }
        println!("cargo:rustc-env=ATTACK_LIBRARY={}", library.display());
    }
}

/// The file name of the shared library `name` on `target_os` (the target's, not this
/// build machine's, naming: `name.dll`, `libname.dylib` or `libname.so`).
fn library_file_name(target_os: &str, name: &str) -> String {
    match target_os {
        "windows" => format!("{name}.dll"),
        "macos" | "ios" => format!("lib{name}.dylib"),
        _ => format!("lib{name}.so"),
    }
}

/// Builds the example plugins and the `worker-shim`/`plugin-host` binaries by a nested
/// `cargo build` into `target_dir`, for `target` when cross-compiling (`None`: the build
/// machine's own target).
fn build_e2e_artifacts(root: &Path, target_dir: &Path, target: Option<&str>, host: &str) {
    let triples: Vec<&str> = [Some(host), target].into_iter().flatten().collect();
    let mut cmd = nested_cargo_build(root, target_dir, &triples);
    cmd.args([
        "-p",
        "hello",
        "-p",
        "thumbnail",
        "-p",
        "faulty",
        "-p",
        "callbacks",
        "-p",
        "plugin-host",
        "-p",
        "plugin-host-cli",
    ])
    .arg("--bins")
    .arg("--lib");
    if let Some(target) = target {
        cmd.arg("--target").arg(target);
    }
    let status = cmd
        .status()
        .expect("run the nested cargo build for the e2e artifacts");
    assert!(
        status.success(),
        "building the example plugins and worker-shim failed: {status}"
    );
}

/// Builds the example plugins in [`WASM_PLUGINS`] as WebAssembly modules (release) by a
/// nested `cargo build --target wasm32-unknown-unknown` into `target_dir`. Without the
/// target's standard library (after one `rustup target add`), builds nothing and warns.
fn build_wasm_plugins(root: &Path, target_dir: &Path, host: &str) {
    if !wasm_std_available() {
        return;
    }
    let mut cmd = nested_cargo_build(root, target_dir, &[host, WASM_TARGET]);
    cmd.args(["--release", "--lib", "--target", WASM_TARGET]);
    for plugin in WASM_PLUGINS {
        cmd.args(["-p", plugin]);
    }
    let status = cmd
        .status()
        .expect("run the nested cargo build for the WebAssembly plugins");
    assert!(
        status.success(),
        "building the example plugins for {WASM_TARGET} failed: {status}"
    );
}

/// Whether the toolchain building this (the `RUSTC` cargo gives the build script) has the
/// `wasm32-unknown-unknown` standard library. If not, runs `rustup target add` for it once
/// (for that toolchain, when it is one rustup manages); if it is still missing, prints a
/// warning saying how to fix it, asks to be run again once it is installed, and returns
/// false.
fn wasm_std_available() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| PathBuf::from(text.trim()));
    let Some(sysroot) = sysroot else {
        println!(
            "cargo:warning=`{} --print sysroot` failed, so whether the {WASM_TARGET} standard \
             library is installed is unknown; building the WebAssembly plugins anyway",
            Path::new(&rustc).display()
        );
        return true;
    };
    let rustlib = sysroot.join("lib").join("rustlib");
    if rustlib.join(WASM_TARGET).is_dir() {
        return true;
    }

    let mut rustup = Command::new("rustup");
    rustup.args(["target", "add", WASM_TARGET]);
    // The toolchain this build uses, which need not be rustup's default: rustup keeps
    // each toolchain in `toolchains/NAME`.
    if sysroot.parent().and_then(Path::file_name) == Some("toolchains".as_ref()) {
        if let Some(name) = sysroot.file_name() {
            rustup.arg("--toolchain").arg(name);
        }
    }
    let tried = match rustup.status() {
        Ok(status) if status.success() => "`rustup target add` succeeded".to_string(),
        Ok(status) => format!("`rustup target add` failed: {status}"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "no rustup found".to_string(),
        Err(e) => format!("cannot run rustup: {e}"),
    };
    if rustlib.join(WASM_TARGET).is_dir() {
        return true;
    }
    // Run again (and build the modules) once the target is installed.
    println!("cargo:rerun-if-changed={}", rustlib.display());
    println!(
        "cargo:warning=the {WASM_TARGET} standard library is not installed in {} ({tried}): \
         the example plugins are not built as WebAssembly and the wasm tests will fail; fix: \
         rustup target add {WASM_TARGET}",
        sysroot.display()
    );
    false
}

/// A nested `cargo build` in `root` into `target_dir` (the caller adds what to build), with
/// the outer build's settings removed from its environment. The user's settings for the
/// targets `triples` are kept.
fn nested_cargo_build(root: &Path, target_dir: &Path, triples: &[&str]) -> Command {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir);
    // The user's per-target settings (`CARGO_TARGET_<TRIPLE>_LINKER`, `_RUNNER`, `_AR`,
    // `_RUSTFLAGS`) for the target and for this machine are kept: a cross build needs the
    // target's linker.
    let per_target: Vec<String> = triples
        .iter()
        .map(|triple| {
            format!(
                "CARGO_TARGET_{}_",
                triple.to_uppercase().replace(['-', '.'], "_")
            )
        })
        .collect();
    // The outer build's settings must not leak into the nested one (they name the outer
    // target, wrappers such as clippy-driver, and flags meant for this build script).
    for (key, _) in env::vars() {
        let keep = key == "CARGO_HOME"
            || key == "CARGO_MAKEFLAGS"
            || key == "CARGO_NET_OFFLINE"
            || per_target
                .iter()
                .any(|prefix| key.starts_with(prefix.as_str()));
        if !keep
            && (key.starts_with("CARGO_")
                || key.starts_with("RUSTC")
                || key == "RUSTFLAGS"
                || key == "RUSTDOCFLAGS"
                || key == "TARGET"
                || key == "HOST"
                || key == "OUT_DIR"
                || key == "OPT_LEVEL"
                || key == "PROFILE"
                || key == "DEBUG")
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Compiles `source` (relative to `root`) into the shared library `library`, with the
/// headers in `include` (relative to `root`; the only include directory) and `defines`,
/// with the C compiler for the target (`TARGET`).
///
/// For Windows (MinGW), no `-fPIC` (all code is position independent there) and no
/// export annotations needed: a DLL whose sources mark nothing `__declspec(dllexport)`
/// exports every global symbol, `plugin_api_entry` included.
fn compile_c_plugin(
    root: &Path,
    source: &str,
    include: &str,
    library: &Path,
    defines: &[&str],
    target_os: &str,
) {
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let mut cmd = compiler.to_command();
    if compiler.is_like_msvc() {
        cmd.arg("/LD").arg(format!("/Fe{}", library.display()));
    } else {
        cmd.arg("-shared");
        if target_os != "windows" {
            cmd.arg("-fPIC");
        }
        cmd.args(["-O2", "-Wall", "-Werror", "-o"]).arg(library);
    }
    for define in defines {
        cmd.arg(format!("-D{define}"));
    }
    cmd.arg(root.join(source))
        .arg(format!("-I{}", root.join(include).display()));
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("run the C compiler for {source}: {e}"));
    assert!(status.success(), "compiling {source} failed: {status}");
}
