//! Manifest parsing: what is accepted, and for each malformed file, the exact field and
//! kind of error.

use std::time::Duration;

use plugin_host::manifest::{RestartMode, Runtime, Trust};
use plugin_host::{Manifest, ManifestErrorKind};

const MINIMAL: &str = r#"
name = "thumbnail"
version = "1.2.3"
library = "thumbnail"
api = "^1"
"#;

#[test]
fn minimal_manifest_gets_safe_defaults() {
    let m = Manifest::parse(MINIMAL, "min.toml").unwrap();
    assert_eq!(m.name, "thumbnail");
    assert_eq!(m.version, plugin_host::semver::Version::new(1, 2, 3));
    assert_eq!(m.trust, Trust::Untrusted, "untrusted is the default");
    assert_eq!(m.runtime, Runtime::Native, "native is the default");
    assert!(m.config.is_empty());
    assert_eq!(m.timeouts.call, Duration::from_secs(30));
    assert_eq!(m.timeouts.connect, None, "unset: environment or default");
    assert_eq!(m.restart.mode, RestartMode::OnCrash);
    assert_eq!(m.restart.max_crashes, 3);
    assert_eq!(m.limits.memory, None);
    assert!(!m.limits.core_dumps);
}

#[test]
fn full_manifest_parses_every_section() {
    let text = r#"
name = "full-plugin_1.x"
version = "0.3.0-beta.1"
description = "everything set"
library = "../lib/libfull.so"
api = ">=1.0, <2"
trust = "trusted"

[config]
quality = 90
modes = ["fast", "best"]
nested = { a = 1 }

[timeouts]
call = "250ms"
connect = "3s"
shutdown = "1.5s"
cancel_grace = "500ms"
ping_interval = "1m"

[limits]
memory = "512MiB"
cpu = "60s"
open_files = 128
core_dumps = true
max_frame = "8MiB"
concurrency = 16
stderr_lines = 10

[restart]
policy = "never"
max_crashes = 5
window = "10m"
backoff = "50ms"
backoff_max = "2s"
"#;
    let m = Manifest::parse(text, "full.toml").unwrap();
    assert_eq!(m.trust, Trust::Trusted);
    assert_eq!(m.description.as_deref(), Some("everything set"));
    assert_eq!(m.config["quality"].as_integer(), Some(90));
    assert_eq!(m.timeouts.call, Duration::from_millis(250));
    assert_eq!(m.timeouts.shutdown, Duration::from_millis(1500));
    assert_eq!(m.timeouts.connect, Some(Duration::from_secs(3)));
    assert_eq!(m.timeouts.connect_timeout(), Duration::from_secs(3));
    assert_eq!(m.timeouts.ping_interval, Duration::from_secs(60));
    assert_eq!(m.limits.memory, Some(512 << 20));
    assert_eq!(m.limits.cpu, Some(Duration::from_secs(60)));
    assert_eq!(m.limits.open_files, Some(128));
    assert!(m.limits.core_dumps);
    assert_eq!(m.limits.max_frame, 8 << 20);
    assert_eq!(m.limits.concurrency, 16);
    assert_eq!(m.limits.stderr_lines, 10);
    assert_eq!(m.restart.mode, RestartMode::Never);
    assert_eq!(m.restart.max_crashes, 5);
    assert_eq!(m.restart.window, Duration::from_secs(600));
    assert_eq!(m.restart.backoff_max, Duration::from_secs(2));
    assert!(m.api.matches(&plugin_host::semver::Version::new(1, 4, 0)));
    assert!(!m.api.matches(&plugin_host::semver::Version::new(2, 0, 0)));
}

#[test]
fn example_manifests_are_valid() {
    for name in ["hello", "thumbnail", "faulty", "c-echo"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../plugins")
            .join(name)
            .join("plugin.toml");
        let m = Manifest::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.name, name);
        assert_eq!(m.path.as_deref(), Some(path.as_path()));
    }
}

/// Each case: manifest text (appended to or replacing MINIMAL), expected field, kind, and a
/// fragment the message must contain.
fn assert_rejected(text: &str, field: &str, kind: ManifestErrorKind, fragment: &str) {
    let err = Manifest::parse(text, "bad/plugin.toml").expect_err(text);
    assert_eq!(err.field, field, "field for {text:?}: {err}");
    assert_eq!(err.kind, kind, "kind for {text:?}: {err}");
    assert!(
        err.message.contains(fragment),
        "message {:?} lacks {fragment:?}",
        err.message
    );
    let shown = err.to_string();
    assert!(
        shown.starts_with("bad/plugin.toml"),
        "error names the file: {shown}"
    );
    if !field.is_empty() {
        assert!(
            shown.contains(&format!("`{field}`")),
            "error names the field: {shown}"
        );
    }
}

fn with(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}")
}

fn without(key: &str) -> String {
    MINIMAL
        .lines()
        .filter(|l| !l.starts_with(&format!("{key} ")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn not_toml_is_a_syntax_error() {
    assert_rejected(
        "name = \"x\nversion =",
        "",
        ManifestErrorKind::Syntax,
        "not valid TOML",
    );
}

#[test]
fn missing_required_fields_are_named() {
    for key in ["name", "version", "library", "api"] {
        assert_rejected(
            &without(key),
            key,
            ManifestErrorKind::MissingField,
            "required",
        );
    }
}

#[test]
fn unknown_top_level_key_is_rejected_by_name() {
    assert_rejected(
        &with("trusted = true"),
        "trusted",
        ManifestErrorKind::UnknownField,
        "expected one of",
    );
}

#[test]
fn unknown_key_in_a_section_is_rejected_with_its_path() {
    assert_rejected(
        &with("[timeouts]\ncal = \"1s\""),
        "timeouts.cal",
        ManifestErrorKind::UnknownField,
        "call",
    );
    assert_rejected(
        &with("[limits]\nmemroy = \"1GiB\""),
        "limits.memroy",
        ManifestErrorKind::UnknownField,
        "memory",
    );
    assert_rejected(
        &with("[restart]\nretries = 3"),
        "restart.retries",
        ManifestErrorKind::UnknownField,
        "max_crashes",
    );
}

#[test]
fn wrong_types_are_named() {
    let bad_name = MINIMAL.replace("name = \"thumbnail\"", "name = 42");
    assert_rejected(
        &bad_name,
        "name",
        ManifestErrorKind::WrongType,
        "found integer",
    );
    assert_rejected(
        &with("config = \"x\""),
        "config",
        ManifestErrorKind::WrongType,
        "a table",
    );
    assert_rejected(
        &with("timeouts = 5"),
        "timeouts",
        ManifestErrorKind::WrongType,
        "a table",
    );
    assert_rejected(
        &with("[limits]\ncore_dumps = \"no\""),
        "limits.core_dumps",
        ManifestErrorKind::WrongType,
        "true or false",
    );
    assert_rejected(
        &with("[limits]\nconcurrency = \"4\""),
        "limits.concurrency",
        ManifestErrorKind::WrongType,
        "an integer",
    );
    assert_rejected(
        &with("[timeouts]\ncall = 30"),
        "timeouts.call",
        ManifestErrorKind::WrongType,
        "a duration",
    );
}

#[test]
fn invalid_values_are_explained() {
    let bad_version = MINIMAL.replace("1.2.3", "1.2");
    assert_rejected(
        &bad_version,
        "version",
        ManifestErrorKind::InvalidValue,
        "semver",
    );
    let bad_api = MINIMAL.replace("\"^1\"", "\"one\"");
    assert_rejected(
        &bad_api,
        "api",
        ManifestErrorKind::InvalidValue,
        "semver requirement",
    );
    let bad_name = MINIMAL.replace("\"thumbnail\"\nversion", "\"my plugin!\"\nversion");
    assert_rejected(
        &bad_name,
        "name",
        ManifestErrorKind::InvalidValue,
        "not a valid name",
    );
    let empty_library = MINIMAL.replace("library = \"thumbnail\"", "library = \" \"");
    assert_rejected(
        &empty_library,
        "library",
        ManifestErrorKind::InvalidValue,
        "empty",
    );
    assert_rejected(
        &with("trust = \"maybe\""),
        "trust",
        ManifestErrorKind::InvalidValue,
        "\"trusted\" or \"untrusted\"",
    );
    assert_rejected(
        &with("[timeouts]\ncall = \"30 parsecs\""),
        "timeouts.call",
        ManifestErrorKind::InvalidValue,
        "unit",
    );
    assert_rejected(
        &with("[timeouts]\nconnect = \"0s\""),
        "timeouts.connect",
        ManifestErrorKind::InvalidValue,
        "greater than zero",
    );
    assert_rejected(
        &with("[limits]\nmemory = \"lots\""),
        "limits.memory",
        ManifestErrorKind::InvalidValue,
        "not a size",
    );
    assert_rejected(
        &with("[limits]\nmemory = \"1MiB\""),
        "limits.memory",
        ManifestErrorKind::InvalidValue,
        "16MiB",
    );
    assert_rejected(
        &with("[limits]\nconcurrency = 0"),
        "limits.concurrency",
        ManifestErrorKind::InvalidValue,
        "out of range",
    );
    assert_rejected(
        &with("[limits]\nopen_files = 3"),
        "limits.open_files",
        ManifestErrorKind::InvalidValue,
        "out of range",
    );
    assert_rejected(
        &with("[limits]\nmax_frame = 10"),
        "limits.max_frame",
        ManifestErrorKind::InvalidValue,
        "4KiB",
    );
    assert_rejected(
        &with("[restart]\npolicy = \"always\""),
        "restart.policy",
        ManifestErrorKind::InvalidValue,
        "on-crash",
    );
    assert_rejected(
        &with("[restart]\nmax_crashes = 0"),
        "restart.max_crashes",
        ManifestErrorKind::InvalidValue,
        "out of range",
    );
    assert_rejected(
        &with("[restart]\nbackoff = \"20s\"\nbackoff_max = \"1s\""),
        "restart.backoff",
        ManifestErrorKind::InvalidValue,
        "backoff_max",
    );
}

#[test]
fn unreadable_file_is_an_io_error_naming_the_path() {
    let err = Manifest::from_file("/definitely/not/here/plugin.toml").unwrap_err();
    assert_eq!(err.kind, ManifestErrorKind::Io);
    assert!(err.to_string().contains("/definitely/not/here/plugin.toml"));
}

#[test]
fn library_resolution_searches_manifest_dir_then_search_paths() {
    let dir = tempfile::tempdir().unwrap();
    let manifest_dir = dir.path().join("p");
    let search = dir.path().join("lib");
    std::fs::create_dir_all(&manifest_dir).unwrap();
    std::fs::create_dir_all(&search).unwrap();
    std::fs::write(manifest_dir.join("plugin.toml"), MINIMAL).unwrap();
    let m = Manifest::from_file(manifest_dir.join("plugin.toml")).unwrap();
    let file = Manifest::library_file_name("thumbnail");

    let err = m
        .resolve_library(std::slice::from_ref(&search))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&manifest_dir.join(&file).display().to_string()),
        "{text}"
    );
    assert!(
        text.contains(&search.join(&file).display().to_string()),
        "{text}"
    );

    std::fs::write(search.join(&file), b"x").unwrap();
    assert_eq!(
        m.resolve_library(std::slice::from_ref(&search)).unwrap(),
        search.join(&file)
    );
    std::fs::write(manifest_dir.join(&file), b"x").unwrap();
    assert_eq!(
        m.resolve_library(&[search]).unwrap(),
        manifest_dir.join(&file),
        "manifest dir wins"
    );
}

#[test]
fn runtime_is_native_or_wasm() {
    let m = Manifest::parse(&with("runtime = \"wasm\""), "w.toml").unwrap();
    assert_eq!(m.runtime, Runtime::Wasm);
    let m = Manifest::parse(&with("runtime = \"native\""), "n.toml").unwrap();
    assert_eq!(m.runtime, Runtime::Native);
    assert_eq!(Runtime::default(), Runtime::Native);
    assert_eq!(Runtime::Wasm.library_file_name("hello"), "hello.wasm");
    assert_eq!(
        Runtime::Native.library_file_name("hello"),
        Manifest::library_file_name("hello")
    );
}

#[test]
fn bad_runtimes_are_named() {
    use ManifestErrorKind::*;
    assert_rejected(
        &with("runtime = \"jvm\""),
        "runtime",
        InvalidValue,
        "\"native\" or \"wasm\"",
    );
    assert_rejected(&with("runtime = 3"), "runtime", WrongType, "a string");
}

#[test]
fn library_kind_must_match_the_runtime() {
    use ManifestErrorKind::*;
    for library in ["hello.wasm", "../modules/hello.wasm"] {
        let native = MINIMAL.replace("\"thumbnail\"\napi", &format!("\"{library}\"\napi"));
        assert_rejected(&native, "library", InvalidValue, "runtime = \"wasm\"");
    }
    for library in ["libhello.so", "hello.dll", "lib/libhello.dylib"] {
        let wasm = MINIMAL.replace("\"thumbnail\"\napi", &format!("\"{library}\"\napi"));
        assert_rejected(
            &format!("{wasm}\nruntime = \"wasm\""),
            "library",
            InvalidValue,
            "needs a `.wasm` module",
        );
    }
    let wasm_path = MINIMAL.replace("\"thumbnail\"\napi", "\"hello.wasm\"\napi");
    let m = Manifest::parse(&format!("{wasm_path}\nruntime = \"wasm\""), "w.toml").unwrap();
    assert_eq!(m.library, "hello.wasm");
}

#[test]
fn wasm_library_resolution_looks_for_name_dot_wasm() {
    let dir = tempfile::tempdir().unwrap();
    let manifest_dir = dir.path().join("p");
    let search = dir.path().join("lib");
    std::fs::create_dir_all(&manifest_dir).unwrap();
    std::fs::create_dir_all(&search).unwrap();
    std::fs::write(manifest_dir.join("plugin.toml"), with("runtime = \"wasm\"")).unwrap();
    let m = Manifest::from_file(manifest_dir.join("plugin.toml")).unwrap();
    assert_eq!(m.runtime, Runtime::Wasm);

    // A native library of that name does not count.
    std::fs::write(search.join(Manifest::library_file_name("thumbnail")), b"x").unwrap();
    let err = m
        .resolve_library(std::slice::from_ref(&search))
        .unwrap_err();
    let plugin_host::LoadError::LibraryNotFound { searched, .. } = &err else {
        panic!("expected LibraryNotFound, got {err}");
    };
    assert_eq!(
        searched,
        &[
            manifest_dir.join("thumbnail.wasm"),
            search.join("thumbnail.wasm")
        ],
        "the searched `.wasm` paths, in order"
    );
    let text = err.to_string();
    assert!(
        text.contains(&search.join("thumbnail.wasm").display().to_string()),
        "{text}"
    );

    std::fs::write(search.join("thumbnail.wasm"), b"\0asm").unwrap();
    assert_eq!(
        m.resolve_library(std::slice::from_ref(&search)).unwrap(),
        search.join("thumbnail.wasm")
    );
    std::fs::write(manifest_dir.join("thumbnail.wasm"), b"\0asm").unwrap();
    assert_eq!(
        m.resolve_library(std::slice::from_ref(&search)).unwrap(),
        manifest_dir.join("thumbnail.wasm"),
        "manifest dir wins"
    );

    // A `.wasm` path is taken relative to the manifest's directory, search paths unused.
    let wasm_path = with("runtime = \"wasm\"").replace("\"thumbnail\"\napi", "\"sub/x.wasm\"\napi");
    std::fs::write(manifest_dir.join("plugin.toml"), wasm_path).unwrap();
    let m = Manifest::from_file(manifest_dir.join("plugin.toml")).unwrap();
    let err = m.resolve_library(&[search]).unwrap_err();
    let plugin_host::LoadError::LibraryNotFound { searched, .. } = &err else {
        panic!("expected LibraryNotFound, got {err}");
    };
    assert_eq!(searched, &[manifest_dir.join("sub/x.wasm")]);
}

#[test]
fn permissions_are_requested_in_their_own_table() {
    let m = Manifest::parse(MINIMAL, "p.toml").unwrap();
    assert_eq!(
        m.sandbox,
        plugin_host::SandboxMode::Required,
        "required by default"
    );
    assert!(m.permissions.is_empty(), "nothing asked by default");
    let m = Manifest::parse(
        &with(
            r#"sandbox = "best-effort"
[permissions]
read = ["$PLUGIN_DIR/assets", "/usr/share/fonts"]
write = ["$DATA_DIR", "$TMP/cache"]
network = true
env = ["LANG", "TZ"]
exec = false
threads = 8
processes = 0
"#,
        ),
        "p.toml",
    )
    .unwrap();
    assert_eq!(m.sandbox, plugin_host::SandboxMode::BestEffort);
    let p = &m.permissions;
    assert_eq!(p.read, ["$PLUGIN_DIR/assets", "/usr/share/fonts"]);
    assert_eq!(p.write, ["$DATA_DIR", "$TMP/cache"]);
    assert!(p.network && !p.exec);
    assert_eq!(p.env, ["LANG", "TZ"]);
    assert_eq!((p.threads, p.processes), (Some(8), Some(0)));
}

#[test]
fn bad_permissions_are_named_with_their_path() {
    use ManifestErrorKind::*;
    assert_rejected(
        &with("sandbox = \"maybe\""),
        "sandbox",
        InvalidValue,
        "best-effort",
    );
    assert_rejected(
        &with("[permissions]\nnetwork = \"yes\""),
        "permissions.network",
        WrongType,
        "true or false",
    );
    assert_rejected(
        &with("[permissions]\nread = \"/etc\""),
        "permissions.read",
        WrongType,
        "array of strings",
    );
    assert_rejected(
        &with("[permissions]\nread = [\"/etc\", 3]"),
        "permissions.read[1]",
        WrongType,
        "a string",
    );
    assert_rejected(
        &with("[permissions]\nwrite = [\"data\"]"),
        "permissions.write[0]",
        InvalidValue,
        "not an absolute path",
    );
    assert_rejected(
        &with("[permissions]\nread = [\"$HOME/x\"]"),
        "permissions.read[0]",
        InvalidValue,
        "$PLUGIN_DIR",
    );
    assert_rejected(
        &with("[permissions]\nread = [\"\"]"),
        "permissions.read[0]",
        InvalidValue,
        "empty",
    );
    assert_rejected(
        &with("[permissions]\nenv = [\"A=B\"]"),
        "permissions.env[0]",
        InvalidValue,
        "environment variable",
    );
    assert_rejected(
        &with("[permissions]\nthreads = -1"),
        "permissions.threads",
        InvalidValue,
        "out of range",
    );
    assert_rejected(
        &with("[permissions]\nfiles = true"),
        "permissions.files",
        UnknownField,
        "network",
    );
}
