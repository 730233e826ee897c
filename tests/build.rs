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

    let target_dir = root.join("target").join("e2e");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
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
        .arg(&target_dir);
    // The outer build's settings must not leak into the nested one (they name the outer
    // target, wrappers such as clippy-driver, and flags meant for this build script).
    for (key, _) in env::vars() {
        let keep = key == "CARGO_HOME" || key == "CARGO_MAKEFLAGS" || key == "CARGO_NET_OFFLINE";
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
    println!(
        "cargo:rustc-env=PLUGIN_HOST_E2E_DIR={}",
        target_dir.join("debug").display()
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
        let library = out_dir.join(format!(
            "{}{name}{}",
            env::consts::DLL_PREFIX,
            env::consts::DLL_SUFFIX
        ));
        compile_c_plugin(&root, source, include, &library, defines);
        println!("cargo:rustc-env={var}={}", library.display());
    }

    // The attack plugin (Unix only: it is made of POSIX and Linux calls).
    if env::var("CARGO_CFG_UNIX").is_ok() {
        let library = out_dir.join(format!(
            "{}attack{}",
            env::consts::DLL_PREFIX,
            env::consts::DLL_SUFFIX
        ));
        compile_c_plugin(&root, "plugins/attack/attack.c", CURRENT, &library, &[]);
        println!("cargo:rustc-env=ATTACK_LIBRARY={}", library.display());
    }
}

/// Compiles `source` (relative to `root`) into the shared library `library`, with the
/// headers in `include` (relative to `root`; the only include directory) and `defines`.
fn compile_c_plugin(
    root: &std::path::Path,
    source: &str,
    include: &str,
    library: &std::path::Path,
    defines: &[&str],
) {
    let compiler = cc::Build::new().cargo_metadata(false).get_compiler();
    let mut cmd = compiler.to_command();
    if compiler.is_like_msvc() {
        cmd.arg("/LD").arg(format!("/Fe{}", library.display()));
    } else {
        cmd.args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
            .arg(library);
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
