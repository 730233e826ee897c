//! The host owns what it loads: a registry by name, a whole directory at once, unload and
//! shutdown.

mod common;

use std::path::Path;
use std::time::Duration;

#[cfg(target_os = "linux")]
use common::wait_until;
use common::{host, manifest, run};
use plugin_host::{CallError, Error, LoadError, Manifest, Trust};

/// Writes `text` as a manifest file under `dir/sub/plugin.toml`.
fn write_manifest(dir: &Path, sub: &str, text: &str) {
    let d = dir.join(sub);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("plugin.toml"), text).unwrap();
}

fn example(name: &str) -> String {
    std::fs::read_to_string(
        common::repo()
            .join("plugins")
            .join(name)
            .join("plugin.toml"),
    )
    .unwrap()
}

#[test]
fn load_dir_loads_the_good_manifests_and_reports_each_broken_one_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    write_manifest(dir.path(), "hello", &example("hello"));
    write_manifest(dir.path(), "faulty", &example("faulty"));
    // Invalid TOML field, and a valid manifest whose library does not exist.
    write_manifest(dir.path(), "broken", "name = \"broken\"\nversion = 1\n");
    write_manifest(
        dir.path(),
        "missing",
        "name = \"missing\"\nversion = \"1.0.0\"\nlibrary = \"no_such_plugin\"\napi = \"^1\"\n",
    );
    let host = host();
    let report = run(host.load_dir(dir.path())).unwrap();

    let mut loaded: Vec<&str> = report.loaded.iter().map(|p| p.name()).collect();
    loaded.sort();
    assert_eq!(loaded, ["faulty", "hello"]);
    assert_eq!(report.failed.len(), 2, "{:?}", report.failed);
    let (path, error) = &report.failed[0];
    assert_eq!(path, &dir.path().join("broken/plugin.toml"));
    match error {
        Error::Manifest(e) => assert_eq!(e.field, "version"),
        other => panic!("expected a manifest error, got {other}"),
    }
    let (path, error) = &report.failed[1];
    assert_eq!(path, &dir.path().join("missing/plugin.toml"));
    assert!(
        matches!(error, Error::Load(LoadError::LibraryNotFound { .. })),
        "{error}"
    );

    assert_eq!(host.names(), ["faulty", "hello"]);
    let hello = host.get("hello").expect("registered");
    assert_eq!(
        run(hello.call_raw("echo", b"hi".to_vec())).unwrap(),
        b"hi",
        "a plugin from the directory serves"
    );
    assert!(host.get("broken").is_none());
}

#[test]
fn load_dir_on_a_missing_directory_names_it() {
    let err = run(host().load_dir("/no/such/plugin/dir")).unwrap_err();
    match err {
        Error::Manifest(e) => {
            assert_eq!(e.path, Path::new("/no/such/plugin/dir"));
            assert!(e.message.contains("cannot read"), "{}", e.message);
        }
        other => panic!("expected a manifest error, got {other}"),
    }
}

#[test]
fn names_are_unique_in_a_host() {
    let host = host();
    let first = run(host.load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    let err = run(host.load_manifest(manifest("hello", Trust::Untrusted))).unwrap_err();
    match &err {
        Error::Load(LoadError::NameTaken { plugin, existing }) => {
            assert_eq!(plugin, "hello");
            assert!(existing.ends_with("plugin.toml"), "{existing}");
        }
        other => panic!("expected NameTaken, got {other}"),
    }
    assert!(err.to_string().contains("unload"), "says what to do: {err}");
    // The first one is untouched.
    assert_eq!(run(first.call_raw("echo", b"1".to_vec())).unwrap(), b"1");
    // Another host is another namespace.
    let other = run(common::host().load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    assert_ne!(other.worker_pid(), first.worker_pid());
}

#[test]
fn two_loads_of_one_name_at_once_let_exactly_one_win() {
    let host = host();
    let (a, b) = run(async {
        let a = host.load_manifest(manifest("faulty", Trust::Untrusted));
        let b = host.load_manifest(manifest("faulty", Trust::Untrusted));
        futures_lite::future::zip(a, b).await
    });
    let wins = [a.is_ok(), b.is_ok()].iter().filter(|w| **w).count();
    assert_eq!(wins, 1);
    let loser = a.err().or(b.err()).unwrap();
    assert!(
        matches!(loser, Error::Load(LoadError::NameTaken { .. })),
        "{loser}"
    );
}

#[test]
fn unload_stops_the_plugin_and_frees_its_name() {
    let host = host();
    let plugin = run(host.load_manifest(manifest("faulty", Trust::Untrusted))).unwrap();
    #[cfg(target_os = "linux")]
    let pid = plugin.worker_pid().unwrap();
    run(host.unload("faulty")).unwrap();
    assert!(host.get("faulty").is_none());
    assert!(matches!(
        run(plugin.call_raw("echo", vec![])),
        Err(Error::Call(CallError::Stopped { .. }))
    ));
    #[cfg(target_os = "linux")]
    assert!(wait_until(Duration::from_secs(5), || {
        !common::process_exists(pid)
    }));
    // The name is free again.
    let again = run(host.load_manifest(manifest("faulty", Trust::Untrusted))).unwrap();
    assert_eq!(run(again.call_raw("echo", b"x".to_vec())).unwrap(), b"x");

    let err = run(host.unload("nope")).unwrap_err();
    match err {
        Error::Load(LoadError::NotLoaded { plugin, loaded }) => {
            assert_eq!(plugin, "nope");
            assert_eq!(loaded, ["faulty"]);
        }
        other => panic!("expected NotLoaded, got {other}"),
    }
}

#[test]
fn a_plugin_shut_down_through_its_handle_leaves_the_registry() {
    let host = host();
    let plugin = run(host.load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    run(plugin.shutdown());
    assert!(host.get("hello").is_none());
    assert!(host.plugins().is_empty());
    run(host.load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
}

#[test]
fn shutdown_stops_every_worker_and_lets_calls_in_flight_finish() {
    let host = host();
    let mut m: Manifest = manifest("faulty", Trust::Untrusted);
    m.instances = Some(2);
    let faulty = run(host.load_manifest(m)).unwrap();
    let hello = run(host.load_manifest(manifest("hello", Trust::Untrusted))).unwrap();
    let trusted = {
        let mut m = manifest("faulty", Trust::Trusted);
        m.name = "faulty-in-process".into();
        run(host.load_manifest(m)).unwrap()
    };
    let mut pids: Vec<u32> = faulty
        .status()
        .instances
        .iter()
        .filter_map(|i| i.pid)
        .collect();
    pids.push(hello.worker_pid().unwrap());
    assert_eq!(pids.len(), 3);
    let slow = run(async {
        let p = faulty.clone();
        let call = smol::spawn(async move {
            p.call::<_, u64>("sleep", &serde_json::json!({"ms": 300}))
                .await
        });
        smol::Timer::after(Duration::from_millis(50)).await;
        host.shutdown().await;
        call.await
    });
    assert_eq!(slow.unwrap(), 300, "the call in flight finished");
    assert!(host.plugins().is_empty());
    #[cfg(target_os = "linux")]
    for pid in pids {
        assert!(
            !common::process_exists(pid),
            "worker {pid} exited before shutdown returned"
        );
    }
    for p in [&faulty, &hello, &trusted] {
        assert!(
            matches!(
                run(p.call_raw("echo", vec![])),
                Err(Error::Call(CallError::Stopped { .. }))
            ),
            "{} is stopped",
            p.name()
        );
    }
}
