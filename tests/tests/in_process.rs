//! The in-process (trusted) backend, end to end through real shared libraries.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{host, manifest, run, Greet, Greeting};
use plugin_host::{CallError, CallOptions, Error, LoadError, Manifest, Trust};
use serde::{Deserialize, Serialize};

#[test]
fn typed_and_raw_calls() {
    run(async {
        let plugin = host()
            .load_manifest(manifest("hello", Trust::Trusted))
            .await
            .unwrap();
        assert_eq!(plugin.name(), "hello");
        assert_eq!(plugin.version(), "0.1.0");
        assert_eq!(plugin.info().abi, (1, plugin_api::abi::ABI_MINOR));
        assert_eq!(plugin.methods(), ["greet", "echo"]);
        assert!(plugin.has_method("greet"));
        assert!(!plugin.has_method("nope"));

        let out: Greeting = plugin.call("greet", &Greet { name: "Ada" }).await.unwrap();
        assert_eq!(out.message, "Hello, Ada!");
        let raw = plugin.call_raw("echo", vec![0u8, 1, 2, 255]).await.unwrap();
        assert_eq!(raw, [0, 1, 2, 255]);
        plugin.shutdown().await;
        assert!(matches!(
            plugin.call_raw("echo", vec![]).await,
            Err(Error::Call(CallError::Stopped { .. }))
        ));
    });
}

#[test]
fn config_reaches_create() {
    let mut m = manifest("hello", Trust::Trusted);
    m.config.insert("greeting".into(), "Bonjour".into());
    let plugin = futures_lite::future::block_on(host().load_manifest(m)).unwrap();
    let out: Greeting = plugin
        .call_blocking("greet", &Greet { name: "Marie" })
        .unwrap();
    assert_eq!(out.message, "Bonjour, Marie!");
}

#[test]
fn blocking_variants_need_no_runtime() {
    let host = host();
    let path = common::repo().join("plugins/c-echo/plugin.toml");
    let mut m = Manifest::from_file(path).unwrap();
    m.library = env!("C_ECHO_LIBRARY").into();
    let plugin = futures_lite::future::block_on(host.load_manifest(m)).unwrap();
    let n: u64 = plugin.call_blocking("length", &"four").unwrap();
    assert_eq!(n, 5, "msgpack fixstr of 4 bytes is 5 bytes");
    assert_eq!(
        plugin.call_raw_blocking("echo", b"xyz".to_vec()).unwrap(),
        b"xyz"
    );
}

#[test]
fn plugin_errors_and_bad_input_are_distinct() {
    run(async {
        let plugin = host()
            .load_manifest(manifest("hello", Trust::Trusted))
            .await
            .unwrap();
        let err = plugin
            .call::<_, Greeting>("greet", &Greet { name: "" })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Call(CallError::Plugin { message, .. }) if message == "name must not be empty"),
            "{err}"
        );
        let err = plugin.call::<_, Greeting>("greet", &42).await.unwrap_err();
        assert!(
            matches!(&err, Error::Call(CallError::BadInput { method, .. }) if method == "greet"),
            "{err}"
        );
        let err = plugin
            .call::<_, u32>("greet", &Greet { name: "x" })
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Call(CallError::Decode { .. })),
            "{err}"
        );
        let err = plugin.call::<_, ()>("missing", &()).await.unwrap_err();
        match err {
            Error::Call(CallError::UnknownMethod {
                method, available, ..
            }) => {
                assert_eq!(method, "missing");
                assert_eq!(available, ["greet", "echo"]);
            }
            other => panic!("expected UnknownMethod, got {other}"),
        }
    });
}

#[test]
fn a_panic_fails_that_call_only() {
    run(async {
        let plugin = host()
            .load_manifest(manifest("faulty", Trust::Trusted))
            .await
            .unwrap();
        let err = plugin
            .call::<_, ()>("panic", &serde_json::json!({"message": "kaboom"}))
            .await
            .unwrap_err();
        match &err {
            Error::Call(CallError::Panicked {
                plugin,
                method,
                message,
            }) => {
                assert_eq!(plugin, "faulty");
                assert_eq!(method, "panic");
                assert_eq!(message, "kaboom");
            }
            other => panic!("expected Panicked, got {other}"),
        }
        // The same instance keeps serving.
        assert_eq!(
            plugin.call_raw("echo", b"next".to_vec()).await.unwrap(),
            b"next"
        );
    });
}

#[test]
fn many_concurrent_calls_from_several_tasks() {
    let plugin =
        futures_lite::future::block_on(host().load_manifest(manifest("hello", Trust::Trusted)))
            .unwrap();
    let ex = smol::Executor::new();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let plugin = plugin.clone();
            ex.spawn(async move {
                for i in 0..50 {
                    let name = format!("task{t}-{i}");
                    let out: Greeting = plugin.call("greet", &Greet { name: &name }).await.unwrap();
                    assert_eq!(out.message, format!("Hello, {name}!"));
                }
            })
        })
        .collect();
    run(ex.run(async {
        for t in tasks {
            t.await;
        }
    }));
}

#[test]
fn progress_reaches_the_caller() {
    run(async {
        let plugin = host()
            .load_manifest(manifest("faulty", Trust::Trusted))
            .await
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let options = CallOptions::new().on_progress(move |p| sink.lock().unwrap().push(p));
        let n: u32 = plugin
            .call_with("progress", &serde_json::json!({"steps": 4}), options)
            .await
            .unwrap();
        assert_eq!(n, 4);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3].fraction, Some(1.0));
        assert_eq!(seen[0].message, "step 1");
    });
}

#[test]
fn a_deadline_returns_timeout_and_the_plugin_sees_cancellation() {
    run(async {
        let plugin = host()
            .load_manifest(manifest("faulty", Trust::Trusted))
            .await
            .unwrap();
        let options = CallOptions::new().timeout(Duration::from_millis(100));
        let err = plugin
            .call_with::<_, u64>(
                "sleep",
                &serde_json::json!({"ms": 20_000, "cooperative": true}),
                options,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Call(CallError::Timeout { after, .. }) if *after == Duration::from_millis(100)),
            "{err}"
        );
        let n: u64 = plugin
            .call("sleep", &serde_json::json!({"ms": 1}))
            .await
            .unwrap();
        assert_eq!(n, 1);
    });
}

#[test]
fn c_plugin_round_trip() {
    run(async {
        let mut m = Manifest::from_file(common::repo().join("plugins/c-echo/plugin.toml")).unwrap();
        m.library = env!("C_ECHO_LIBRARY").into();
        let plugin = host().load_manifest(m).await.unwrap();
        assert_eq!(plugin.info().library_name, "c-echo");
        assert_eq!(plugin.methods(), ["echo", "length", "fail", "ask", "count"]);
        let value = serde_json::json!({"list": [1, 2, 3], "text": "héllo"});
        let back: serde_json::Value = plugin.call("echo", &value).await.unwrap();
        assert_eq!(back, value);
        let err = plugin.call::<_, ()>("fail", &()).await.unwrap_err();
        assert!(
            matches!(&err, Error::Call(CallError::Plugin { message, .. }) if message == "c-echo was asked to fail"),
            "{err}"
        );
    });
}

fn c_manifest(library: &str) -> Manifest {
    let mut m = Manifest::parse(
        "name = \"c-echo\"\nversion = \"1.0.0\"\nlibrary = \"x\"\napi = \"^1\"\ntrust = \"trusted\"\n",
        "<test>",
    )
    .unwrap();
    m.library = library.into();
    m
}

#[test]
fn a_library_built_against_another_abi_is_refused() {
    let err = futures_lite::future::block_on(
        host().load_manifest(c_manifest(env!("C_ECHO_ABI99_LIBRARY"))),
    )
    .unwrap_err();
    match &err {
        Error::Load(LoadError::AbiMismatch {
            found, supported, ..
        }) => {
            // The C plugin declares the header's minor with a major of 99.
            assert_eq!(*found, (99, plugin_api::abi::ABI_MINOR));
            assert_eq!(*supported, (1, plugin_api::abi::ABI_MINOR));
        }
        other => panic!("expected AbiMismatch, got {other}"),
    }
    let found = format!("99.{}", plugin_api::abi::ABI_MINOR);
    assert!(err.to_string().contains(&found), "{err}");
}

#[test]
fn a_library_without_the_entry_symbol_is_refused() {
    let err = futures_lite::future::block_on(
        host().load_manifest(c_manifest(env!("C_ECHO_NO_ENTRY_LIBRARY"))),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::EntryMissing { symbol, .. }) if symbol == "plugin_api_entry"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, b"this is not an ELF file").unwrap();
    let err =
        futures_lite::future::block_on(host().load_manifest(c_manifest(fake.to_str().unwrap())))
            .unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::NotALibrary { .. })),
        "{err}"
    );
}

#[test]
fn a_missing_library_lists_where_it_looked() {
    let mut m = manifest("hello", Trust::Trusted);
    m.library = "does_not_exist".into();
    let err = futures_lite::future::block_on(host().load_manifest(m)).unwrap_err();
    match &err {
        Error::Load(LoadError::LibraryNotFound { searched, .. }) => assert_eq!(searched.len(), 2),
        other => panic!("expected LibraryNotFound, got {other}"),
    }
}

#[test]
fn an_unsatisfied_api_requirement_is_refused_before_loading() {
    let mut m = manifest("hello", Trust::Trusted);
    m.api = "^2".parse().unwrap();
    let err = futures_lite::future::block_on(host().load_manifest(m)).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::ApiRequirement { .. })),
        "{err}"
    );
}

#[test]
fn create_errors_and_panics_fail_the_load() {
    let mut m = manifest("faulty", Trust::Trusted);
    m.config
        .insert("create_fail".into(), "no licence key".into());
    let err = futures_lite::future::block_on(host().load_manifest(m)).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::CreateFailed { message, .. }) if message == "no licence key"),
        "{err}"
    );

    let mut m = manifest("faulty", Trust::Trusted);
    m.config.insert("create_panic".into(), "bad state".into());
    let err = futures_lite::future::block_on(host().load_manifest(m)).unwrap_err();
    assert!(
        matches!(&err, Error::Load(LoadError::CreatePanicked { message, .. }) if message == "bad state"),
        "{err}"
    );
}

#[test]
fn thumbnail_resizes_real_pixels() {
    #[derive(Serialize, Deserialize, Debug)]
    struct Image {
        width: u32,
        height: u32,
        #[serde(with = "serde_bytes")]
        pixels: Vec<u8>,
    }
    run(async {
        let plugin = host()
            .load_manifest(manifest("thumbnail", Trust::Trusted))
            .await
            .unwrap();
        // Left half black, right half white: a 2:1 downscale keeps the halves.
        let (w, h) = (64u32, 32u32);
        let mut pixels = Vec::new();
        for _y in 0..h {
            for x in 0..w {
                let v = if x < w / 2 { 0 } else { 255 };
                pixels.extend_from_slice(&[v, v, v, 255]);
            }
        }
        let image = Image {
            width: w,
            height: h,
            pixels,
        };
        let out: Image = plugin
            .call(
                "resize",
                &serde_json::json!({"image": &image, "width": 32, "height": 16}),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (out.width, out.height, out.pixels.len()),
            (32, 16, 32 * 16 * 4)
        );
        assert_eq!(&out.pixels[0..4], &[0, 0, 0, 255]);
        assert_eq!(&out.pixels[31 * 4..32 * 4], &[255, 255, 255, 255]);
        let thumb: Image = plugin
            .call(
                "thumbnail",
                &serde_json::json!({"image": &image, "max_size": 16}),
            )
            .await
            .unwrap();
        assert_eq!((thumb.width, thumb.height), (16, 8));
        let err = plugin
            .call::<_, Image>(
                "grayscale",
                &Image {
                    width: 4,
                    height: 4,
                    pixels: vec![0; 3],
                },
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("must be 64 bytes"), "{err}");
    });
}
