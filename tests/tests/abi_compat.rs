//! ABI compatibility across minors, with C plugins (no plugin-api crate involved):
//! - a library built for ABI 1.0 (`tests/abi-1.0/echo.c` against the frozen 1.0 header:
//!   its `PluginHostContext` has no `call_host`, `emit` or `free_host_buffer`) still loads
//!   and behaves as before, in-process and isolated, on a host that offers host functions;
//! - the current C plugin (`plugins/c-echo/echo.c`, ABI 1.1) calls a host function (`ask`)
//!   and streams items (`count`) through the C ABI.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::run;
use futures_lite::StreamExt;
use plugin_host::{CallError, Error, Host, HostError, Manifest, Plugin, Trust};
use serde_json::json;

const TRUSTS: [Trust; 2] = [Trust::Trusted, Trust::Untrusted];

/// The test host (as `common::host`), with `functions` registered on its builder.
fn host_with(functions: impl FnOnce(plugin_host::HostBuilder) -> plugin_host::HostBuilder) -> Host {
    functions(common::builder()).build().unwrap()
}

/// A host that offers `echo` (its input back, unchanged), counting its calls in `calls`.
fn echo_host(calls: Arc<AtomicUsize>) -> Host {
    host_with(move |b| {
        b.raw_function("echo", move |_ctx, bytes| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(bytes) }
        })
    })
}

/// The manifest the 1.0 plugin shipped with (no `imports`, `api = "^1"`), for the frozen
/// ABI 1.0 library.
fn abi10_manifest(trust: Trust) -> Manifest {
    let text = "name = \"c-echo\"\nversion = \"1.0.0\"\nlibrary = \"c_echo\"\napi = \"^1\"\n";
    let mut m = Manifest::parse(text, "<abi-1.0 c-echo>").unwrap();
    m.library = env!("C_ECHO_ABI10_LIBRARY").into();
    m.trust = trust;
    m
}

/// The repository's c-echo manifest (imports `echo`), for the current (ABI 1.1) build.
fn c_echo_manifest(trust: Trust) -> Manifest {
    let mut m = Manifest::from_file(common::repo().join("plugins/c-echo/plugin.toml")).unwrap();
    m.library = env!("C_ECHO_LIBRARY").into();
    m.trust = trust;
    m
}

/// Loads `manifest`, checking it runs where its trust says: a worker process (untrusted)
/// or this one (trusted).
fn load(host: &Host, manifest: Manifest) -> Plugin {
    let trust = manifest.trust;
    let plugin = run(host.load_manifest(manifest)).unwrap_or_else(|e| panic!("{trust:?}: {e}"));
    assert_eq!(
        plugin.status().pid.is_some(),
        trust == Trust::Untrusted,
        "{trust:?}: {:?}",
        plugin.status()
    );
    plugin
}

fn plugin_message(err: &Error) -> &str {
    match err {
        Error::Call(CallError::Plugin { message, .. }) => message,
        other => panic!("expected a plugin error, got {other}"),
    }
}

#[test]
fn an_abi_1_0_library_loads_and_behaves_as_before() {
    for trust in TRUSTS {
        // A host that offers host functions, as a 1.1 app does: the old library never
        // looks at them.
        let calls = Arc::new(AtomicUsize::new(0));
        let host = echo_host(calls.clone());
        let plugin = load(&host, abi10_manifest(trust));
        let info = plugin.info();
        assert_eq!(info.abi, (1, 0), "{trust:?}");
        assert_eq!(info.library_name, "c-echo");
        assert_eq!(plugin.methods(), ["echo", "length", "fail"], "{trust:?}");
        run(async {
            let value = json!({"list": [1, 2, 3], "text": "héllo"});
            let back: serde_json::Value = plugin.call("echo", &value).await.unwrap();
            assert_eq!(back, value, "{trust:?}");
            assert_eq!(
                plugin
                    .call_raw("echo", b"\x00raw\xff".to_vec())
                    .await
                    .unwrap(),
                b"\x00raw\xff"
            );
            let n: u64 = plugin.call("length", &"four").await.unwrap();
            assert_eq!(n, 5, "msgpack fixstr of 4 bytes is 5 bytes");
            let err = plugin.call::<_, ()>("fail", &()).await.unwrap_err();
            assert_eq!(
                plugin_message(&err),
                "c-echo was asked to fail",
                "{trust:?}"
            );
            // The 1.1 methods are not there.
            let err = plugin.call_raw("ask", b"\xa1x".to_vec()).await.unwrap_err();
            assert!(
                matches!(&err, Error::Call(CallError::UnknownMethod { method, .. }) if method == "ask"),
                "{trust:?}: {err}"
            );
            // A stream call on a method that never emits: no items, then the output.
            let mut stream = plugin.call_stream::<_, u64>("length", &"four");
            assert!(stream.next().await.is_none(), "{trust:?}");
            assert_eq!(stream.output::<u64>().unwrap().unwrap(), 5);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        run(plugin.shutdown());
    }
}

#[test]
fn the_abi_1_1_c_plugin_calls_a_host_function() {
    for trust in TRUSTS {
        let calls = Arc::new(AtomicUsize::new(0));
        let host = echo_host(calls.clone());
        let plugin = load(&host, c_echo_manifest(trust));
        assert_eq!(plugin.info().abi, (1, 1), "{trust:?}");
        assert_eq!(
            plugin.methods(),
            ["echo", "length", "fail", "ask", "count"],
            "{trust:?}"
        );
        run(async {
            // Raw bytes, through the host function and back.
            let bytes = b"\x00\x01 round trip \xfe\xff".to_vec();
            assert_eq!(
                plugin.call_raw("ask", bytes.clone()).await.unwrap(),
                bytes,
                "{trust:?}"
            );
            // Typed: the host function sees and returns the MessagePack value.
            let value = json!({"nested": {"n": 42}, "text": "héllo"});
            let back: serde_json::Value = plugin.call("ask", &value).await.unwrap();
            assert_eq!(back, value, "{trust:?}");
            // Empty input and output.
            assert_eq!(
                plugin.call_raw("ask", Vec::new()).await.unwrap(),
                b"",
                "{trust:?}"
            );
            // The old methods are unchanged.
            let n: u64 = plugin.call("length", &"four").await.unwrap();
            assert_eq!(n, 5);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 3, "{trust:?}");
        run(plugin.shutdown());
    }
}

#[test]
fn a_host_function_error_reaches_the_c_plugin_with_its_status_and_message() {
    for trust in TRUSTS {
        // No `echo` at all: NOT_FOUND.
        let host = host_with(|b| b);
        let plugin = load(&host, c_echo_manifest(trust));
        let err = run(plugin.call_raw("ask", b"\xa1x".to_vec())).unwrap_err();
        let message = plugin_message(&err);
        assert!(
            message.contains("NOT_FOUND (3)") && message.contains("no host function named `echo`"),
            "{trust:?}: {message}"
        );
        // The plugin goes on.
        assert_eq!(
            run(plugin.call_raw("echo", b"\xa1y".to_vec())).unwrap(),
            b"\xa1y"
        );
        run(plugin.shutdown());

        // `echo` fails: ERROR, with the function's message.
        let host = host_with(|b| {
            b.raw_function("echo", |_ctx, _bytes| async move {
                Err(HostError::new("echo is closed today"))
            })
        });
        let plugin = load(&host, c_echo_manifest(trust));
        let err = run(plugin.call_raw("ask", b"\xa1x".to_vec())).unwrap_err();
        let message = plugin_message(&err);
        assert!(
            message.contains("ERROR (1)") && message.contains("echo is closed today"),
            "{trust:?}: {message}"
        );
        run(plugin.shutdown());
    }
}

#[test]
fn the_abi_1_1_c_plugin_streams_items_in_order() {
    for trust in TRUSTS {
        let host = host_with(|b| b);
        let plugin = load(&host, c_echo_manifest(trust));
        // More items than the host's window (256), with indexes past every short
        // MessagePack uint form (fixint, uint8, uint16).
        let input = serde_bytes::ByteBuf::from(vec![7u8; 300]);
        let n = rmp_serde::to_vec_named(&input).unwrap().len() as u64;
        assert_eq!(n, 303, "bin16: 3 header bytes");
        run(async {
            let mut stream = plugin.call_stream::<_, u64>("count", &input);
            let mut items = Vec::new();
            while let Some(item) = stream.next().await {
                items.push(item.unwrap_or_else(|e| panic!("{trust:?}: item {}: {e}", items.len())));
            }
            assert_eq!(items, (0..n).collect::<Vec<_>>(), "{trust:?}");
            assert_eq!(stream.output::<u64>().unwrap().unwrap(), n);

            // "" is one byte (an empty fixstr): one item.
            let mut stream = plugin.call_stream::<_, u64>("count", &"");
            assert_eq!(stream.next().await.unwrap().unwrap(), 0);
            assert!(stream.next().await.is_none());
            assert_eq!(stream.output::<u64>().unwrap().unwrap(), 1);

            // Not a stream call: emit answers NOT_STREAM and the plugin says so.
            let err = plugin.call::<_, u64>("count", &"ab").await.unwrap_err();
            let message = plugin_message(&err);
            assert!(
                message.contains("NOT_STREAM (2)") && message.contains("after 0 items"),
                "{trust:?}: {message}"
            );

            // The consumer goes away after a few items: the call ends, the plugin serves
            // the next one.
            let mut stream = plugin.call_stream::<_, u64>("count", &input);
            for i in 0..3 {
                assert_eq!(stream.next().await.unwrap().unwrap(), i);
            }
            drop(stream);
            let n: u64 = plugin.call("length", &"four").await.unwrap();
            assert_eq!(n, 5, "{trust:?}");
        });
        run(plugin.shutdown());
    }
}
