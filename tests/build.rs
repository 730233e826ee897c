//! Builds what the end-to-end tests load, so `cargo test --workspace` works from a fresh
//! clone with no other step:
//! - the example plugins (cdylib) and the `worker-shim`/`plugin-host` binaries, by a nested
//!   `cargo build` into `target/e2e` (a separate target directory, so it never waits on
//!   the lock the outer build holds);
//! - the C plugins `plugins/c-echo/echo.c` and `plugins/attack/attack.c` (the sandbox
//!   tests' malicious plugin), with the C compiler the `cc` crate finds;
//! - the frozen ABI 1.0 C plugin `tests/abi-1.0/echo.c`, against the frozen ABI 1.0 header
//!   next to it (not `plugin-api/include`), to prove hosts still load 1.0 libraries.
//!
//! The tests read the resulting paths from `PLUGIN_HOST_E2E_DIR`, `C_ECHO_LIBRARY` (and its
//! variants `C_ECHO_ABI99_LIBRARY`, `C_ECHO_NO_ENTRY_LIBRARY`), `C_ECHO_ABI10_LIBRARY` and
//! `ATTACK_LIBRARY`.
//!
//! Everything is built for the target being compiled (`TARGET`), not for the machine
//! running the build: when cross-compiling (`cargo test --target x86_64-pc-windows-gnu`),
//! the nested build gets `--target` and its output lands in `target/e2e/$TARGET/debug`,
//! library names follow the target's OS, and the C plugins are compiled by the target's C
//! compiler (the `cc` crate picks it from `TARGET`, e.g. `x86_64-w64-mingw32-gcc`). An
//! Apple target from a non-Apple machine has no toolchain to link with: the artifacts are
//! skipped (with a warning) and the variables point at files that do not exist, so that
//! `cargo check`/`cargo clippy --target x86_64-apple-darwin` still work.

use std::env;
use std::path::PathBuf;
use std::process::Command;

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
fn build_e2e_artifacts(
    root: &std::path::Path,
    target_dir: &std::path::Path,
    target: Option<&str>,
    host: &str,
) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
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
        .arg("--lib")
        .arg("--target-dir")
        .arg(target_dir);
    if let Some(target) = target {
        cmd.arg("--target").arg(target);
    }
    // The user's per-target settings (`CARGO_TARGET_<TRIPLE>_LINKER`, `_RUNNER`, `_AR`,
    // `_RUSTFLAGS`) for the target and for this machine are kept: a cross build needs the
    // target's linker.
    let per_target: Vec<String> = [Some(host), target]
        .into_iter()
        .flatten()
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
    let status = cmd
        .status()
        .expect("run the nested cargo build for the e2e artifacts");
    assert!(
        status.success(),
        "building the example plugins and worker-shim failed: {status}"
    );
}

/// Compiles `source` (relative to `root`) into the shared library `library`, with the
/// headers in `include` (relative to `root`; the only include directory) and `defines`,
/// with the C compiler for the target (`TARGET`).
///
/// For Windows (MinGW), no `-fPIC` (all code is position independent there) and no
/// export annotations needed: a DLL whose sources mark nothing `__declspec(dllexport)`
/// exports every global symbol, `plugin_api_entry` included.
fn compile_c_plugin(
    root: &std::path::Path,
    source: &str,
    include: &str,
    library: &std::path::Path,
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
