//! `plugin-host demo`: the main job in one command. Loads the example plugins, calls them,
//! shows a plugin calling back into the app (a host function) and streaming its output,
//! crashes one on purpose and shows the host surviving and the plugin recovering; then a
//! call that never returns (timeout, then the worker is killed and restarted) and a plugin
//! that keeps crashing (quarantined, then re-enabled). Last, the same plugin (`faulty`) in
//! the three backends side by side, in-process (trusted), isolated (a sandboxed worker)
//! and WebAssembly, given the same faults where each backend contains them, with a table of
//! what the caller got and whether the next call was served.
//!
//! Host: the demo plays the app, so it builds its own host: the CLI's search paths, the
//! library's default policy (deny-all), and one host function, `image.get` (an image by
//! id, from the app's "library" of one generated picture), which `thumbnail`'s
//! `thumbnail_by_id` calls. Host functions are registered when a host is built, hence a
//! host of its own. Its bundled plugins (hello, thumbnail, faulty, callbacks) request
//! nothing beyond the default (untrusted, sandbox required, no permissions), so `--grant`
//! would change nothing: every plugin runs in a sandboxed worker, and the demo prints each
//! one's sandbox layers once. A bundled plugin that requested trust or permissions would
//! need the app to grant it, e.g. a host built with `HostBuilder::grant_requested()`,
//! which is acceptable only for plugins the app ships.
//!
//! The three-backend part builds one more host, whose policy grants trust to the one
//! plugin the demo itself marks trusted (`faulty`, which it ships), and nothing else. Its
//! WebAssembly column needs `faulty.wasm`, looked for in the CLI's search paths (`-L`, then
//! beside the executable and in `../wasm32-unknown-unknown/release` from it); without it
//! the demo says how to build it and shows the other two columns.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use plugin_host::{
    CallError, CallOptions, Error, ExitInfo, Grant, Host, HostCallContext, HostError, Manifest,
    Plugin, PluginEvent, PluginState, Runtime, SandboxMode, Trust,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Serialize)]
struct Greet<'a> {
    name: &'a str,
}

#[derive(Deserialize)]
struct Greeting {
    message: String,
}

#[derive(Serialize, Deserialize)]
struct Image {
    width: u32,
    height: u32,
    #[serde(with = "serde_bytes")]
    pixels: Vec<u8>,
}

#[derive(Serialize)]
struct Thumb<'a> {
    image: &'a Image,
    max_size: u32,
}

#[derive(Serialize)]
struct ThumbById {
    id: u64,
    max_size: u32,
}

#[derive(Serialize)]
struct Count {
    n: u64,
}

/// The one image the demo app holds, under this id.
const PHOTO_ID: u64 = 1;

/// The host function `image.get`: the app's image by id, or an error for an unknown id.
async fn image_get(ctx: HostCallContext, id: u64) -> Result<Image, HostError> {
    let found = (id == PHOTO_ID).then(|| gradient(640, 480));
    println!(
        "  [app] image.get({id}) for {}.{} -> {}",
        ctx.plugin(),
        ctx.method(),
        match &found {
            Some(image) => format!(
                "{}x{} RGBA ({} KiB)",
                image.width,
                image.height,
                image.pixels.len() / 1024
            ),
            None => "no such image".to_string(),
        }
    );
    found.ok_or_else(|| HostError::new(format!("the app has no image with id {id}")))
}

fn gradient(width: u32, height: u32) -> Image {
    let mut pixels = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            pixels.extend_from_slice(&[
                (x * 255 / width) as u8,
                (y * 255 / height) as u8,
                128,
                255,
            ]);
        }
    }
    Image {
        width,
        height,
        pixels,
    }
}

async fn load(host: &Host, dir: &Path, name: &str) -> Result<Plugin, Error> {
    let manifest = Manifest::from_file(dir.join(name).join("plugin.toml"))?;
    load_manifest(host, manifest).await
}

async fn load_manifest(host: &Host, manifest: Manifest) -> Result<Plugin, Error> {
    let plugin = host.load_manifest(manifest).await?;
    let place = match plugin.worker_pid() {
        Some(pid) => format!("worker process {pid}"),
        None => "in-process".to_string(),
    };
    println!(
        "loaded {} {} ({place}); methods: {}",
        plugin.name(),
        plugin.version(),
        plugin.methods().join(", ")
    );
    print_sandbox(&plugin);
    Ok(plugin)
}

/// Runs the demo; exit code 0 when every step behaved as expected. `cli` lends its search
/// paths to the demo's own host.
pub fn run(cli: &Host, dir: &Path) -> ExitCode {
    let host = cli
        .search_paths()
        .iter()
        .fold(Host::builder(), |b, path| b.search_path(path))
        .function("image.get", image_get)
        // The fault-injection plugin imports it (for its host-call fault); the demo does
        // not use that fault, but grants what the manifest imports.
        .raw_function("fault.ping", |_, input: Vec<u8>| async move { Ok(input) });
    // Sandboxing is Linux-only: elsewhere the default policy refuses every plugin whose
    // manifest requires a sandbox (all of the demo's). The demo's own plugins run in
    // workers without one there: still isolated processes, with the host's rights.
    #[cfg(not(target_os = "linux"))]
    let host = host.permissions(|_| plugin_host::permissions::Grant {
        sandbox: plugin_host::permissions::SandboxMode::Off,
        ..plugin_host::permissions::Grant::deny_all()
    });
    let host = host.build();
    let search_paths = cli.search_paths().to_vec();
    let result = match host {
        Ok(host) => smol::block_on(async {
            demo(&host, dir).await?;
            three_backends(&search_paths, dir).await?;
            println!(
                "\nall plugins shut down; the host (pid {}) never stopped",
                std::process::id()
            );
            Ok(())
        }),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed:");
            crate::report::print(&e, None);
            ExitCode::from(1)
        }
    }
}

async fn demo(host: &Host, dir: &Path) -> Result<(), Error> {
    println!("== plugin-host demo: host pid {} ==\n", std::process::id());
    println!("-- 1. load plugins and call them");
    let hello = load(host, dir, "hello").await?;
    let greeting: Greeting = hello.call("greet", &Greet { name: "world" }).await?;
    println!("hello.greet -> {:?}", greeting.message);

    let thumbnail = load(host, dir, "thumbnail").await?;
    let image = gradient(1024, 768);
    let started = Instant::now();
    let options = CallOptions::new().on_progress(|p| {
        if let Some(f) = p.fraction {
            println!("  progress {:>3.0}% {}", f * 100.0, p.message);
        }
    });
    let thumb: Image = thumbnail
        .call_with(
            "thumbnail",
            &Thumb {
                image: &image,
                max_size: 128,
            },
            options,
        )
        .await?;
    println!(
        "thumbnail.thumbnail: 1024x768 RGBA ({} KiB) -> {}x{} in {:.1?}",
        image.pixels.len() / 1024,
        thumb.width,
        thumb.height,
        started.elapsed()
    );

    println!("\n-- 2. a plugin calls the app (host function) and streams its output");
    let started = Instant::now();
    let request = ThumbById {
        id: PHOTO_ID,
        max_size: 128,
    };
    let thumb: Image = thumbnail.call("thumbnail_by_id", &request).await?;
    println!(
        "thumbnail.thumbnail_by_id {{id: {PHOTO_ID}}} -> {}x{} in {:.1?}: the plugin fetched the \
         image from the app",
        thumb.width,
        thumb.height,
        started.elapsed()
    );
    let request = ThumbById {
        id: 42,
        max_size: 128,
    };
    match thumbnail
        .call::<_, Image>("thumbnail_by_id", &request)
        .await
    {
        Err(e) => println!("thumbnail.thumbnail_by_id {{id: 42}} -> the app's error: {e}"),
        Ok(_) => return Err(unexpected("thumbnail_by_id with an unknown id succeeded")),
    }
    let mut manifest = Manifest::from_file(dir.join("callbacks/plugin.toml"))?;
    // The demo uses only its stream method: no host functions for it.
    manifest.imports.clear();
    let callbacks = load_manifest(host, manifest).await?;
    let mut items = callbacks.call_stream::<_, u64>("count", &Count { n: 5 });
    let mut received = Vec::new();
    while let Some(item) = items.next().await {
        received.push(item?.to_string());
    }
    let returned: u64 = items
        .output()
        .ok_or_else(|| unexpected("callbacks.count ended without its output"))??;
    println!(
        "callbacks.count {{n: 5}} (a stream) -> items {} as they came, then the method's \
         output: {returned}",
        received.join(", ")
    );

    println!("\n-- 3. a plugin misbehaves");
    let faulty = load(host, dir, "faulty").await?;
    match faulty
        .call::<_, ()>("panic", &json!({"message": "boom"}))
        .await
    {
        Err(e) => println!("faulty.panic -> error for that call only: {e}"),
        Ok(()) => return Err(unexpected("faulty.panic succeeded")),
    }
    let first_pid = faulty.worker_pid();
    match faulty.call::<_, ()>("segfault", &json!(null)).await {
        Err(Error::Call(CallError::Crashed { report, .. })) => {
            println!("faulty.segfault -> the worker crashed; crash report:\n  {report}")
        }
        Err(e) => return Err(e),
        Ok(()) => return Err(unexpected("faulty.segfault succeeded")),
    }

    println!("\n-- 4. the host survives and the plugin recovers");
    let greeting: Greeting = hello.call("greet", &Greet { name: "again" }).await?;
    println!(
        "hello.greet (another plugin, untouched) -> {:?}",
        greeting.message
    );
    let echoed = faulty.call_raw("echo", b"still alive".to_vec()).await?;
    println!(
        "faulty.echo -> {:?}: restarted in a fresh worker (pid {:?} -> {:?})",
        String::from_utf8_lossy(&echoed),
        first_pid,
        faulty.worker_pid()
    );

    println!("\n-- 5. a call that never returns");
    let mut manifest = Manifest::from_file(dir.join("faulty/plugin.toml"))?;
    manifest.timeouts.cancel_grace = Duration::from_millis(300);
    // A second instance of the plugin in this host: names are unique, so it gets its own.
    manifest.name = "faulty-stuck".into();
    let stuck = host.load_manifest(manifest).await?;
    let events = stuck.subscribe();
    let started = Instant::now();
    let options = CallOptions::new().timeout(Duration::from_millis(500));
    match stuck
        .call_with::<_, ()>("infinite_loop", &json!(null), options)
        .await
    {
        Err(e) => println!(
            "faulty.infinite_loop -> after {:.1?}: {e}",
            started.elapsed()
        ),
        Ok(()) => return Err(unexpected("infinite_loop returned")),
    }
    println!(
        "  the plugin ignores the cancellation; {:?} later the host kills its worker:",
        Duration::from_millis(300)
    );
    print_events_until_restart(&events).await;
    let echoed = stuck.call_raw("echo", b"ok".to_vec()).await?;
    println!("faulty.echo -> {:?}", String::from_utf8_lossy(&echoed));

    println!("\n-- 6. a plugin that keeps crashing is quarantined");
    let mut manifest = Manifest::from_file(dir.join("faulty/plugin.toml"))?;
    manifest.restart.max_crashes = 2;
    manifest.name = "faulty-flaky".into();
    let flaky = host.load_manifest(manifest).await?;
    let events = flaky.subscribe();
    println!(
        "restart policy: at most {} crashes in {:?}",
        2,
        flaky.manifest().restart.window
    );
    for (i, method) in ["abort", "segfault", "exit"].into_iter().enumerate() {
        let input = json!({"code": 3});
        let err = flaky.call::<_, ()>(method, &input).await.err();
        println!(
            "crash {}: faulty.{method} -> {}",
            i + 1,
            err.map(|e| first_line(&e.to_string())).unwrap_or_default()
        );
        if i < 2 {
            print_events_until_restart(&events).await;
        }
    }
    let started = Instant::now();
    while flaky.status().state != PluginState::Quarantined
        && started.elapsed() < Duration::from_secs(5)
    {
        smol::Timer::after(Duration::from_millis(10)).await;
    }
    for event in std::iter::from_fn(|| events.try_recv().ok()) {
        print_event(&event);
    }
    let started = Instant::now();
    match flaky.call_raw("echo", b"hello?".to_vec()).await {
        Err(e) => println!(
            "faulty.echo -> fails at once ({:.1?}): {}",
            started.elapsed(),
            first_line(&e.to_string())
        ),
        Ok(_) => return Err(unexpected("quarantined plugin answered")),
    }
    println!(
        "status: {:?}, {} crashes, {} restarts",
        flaky.status().state,
        flaky.status().crashes,
        flaky.status().restarts
    );
    flaky.enable().await;
    let echoed = flaky.call_raw("echo", b"back".to_vec()).await?;
    println!(
        "after Plugin::enable: faulty.echo -> {:?}",
        String::from_utf8_lossy(&echoed)
    );

    for plugin in [hello, thumbnail, callbacks, faulty, stuck, flaky] {
        plugin.shutdown().await;
    }
    Ok(())
}

/// One backend's `faulty` in the side-by-side part.
struct Column {
    /// `in-process`, `isolated`, `wasm`.
    backend: &'static str,
    plugin: Plugin,
}

/// One row of the side-by-side table.
struct Row {
    backend: &'static str,
    fault: &'static str,
    got: String,
    next: String,
}

/// The faults of the side-by-side part: `faulty`'s method, and whether it crashes a
/// native plugin (so it is not run in-process).
const FAULTS: [(&str, bool); 4] = [
    ("panic", false),
    ("segfault", true),
    ("abort", true),
    ("stack_overflow", true),
];

/// The same plugin, `faulty`, in the three backends side by side: the same faults where
/// each backend contains them, then a call that must be served.
async fn three_backends(search_paths: &[PathBuf], dir: &Path) -> Result<(), Error> {
    println!("\n-- 7. the same plugin crashing in the three backends");
    // A host per backend, so each copy keeps the name `faulty` (a host's names are unique).
    // The demo ships `faulty` and marks the in-process copy trusted itself; the policy
    // grants trust to what asks for it and nothing else (no permissions; a worker's sandbox
    // required where there is one).
    let host = || {
        search_paths
            .iter()
            .fold(Host::builder(), |b, path| b.search_path(path))
            .raw_function("fault.ping", |_, input: Vec<u8>| async move { Ok(input) })
            .permissions(|request| Grant {
                trust: request.trust,
                sandbox: match cfg!(target_os = "linux") {
                    true => SandboxMode::Required,
                    false => SandboxMode::Off,
                },
                ..Grant::deny_all()
            })
            .build()
    };
    // Kept for as long as their plugins are (host functions reach the app through them).
    let hosts = [host()?, host()?, host()?];
    let base = Manifest::from_file(dir.join("faulty/plugin.toml"))?;
    let mut columns = Vec::new();
    for (i, (backend, trust)) in [
        ("in-process", Trust::Trusted),
        ("isolated", Trust::Untrusted),
    ]
    .into_iter()
    .enumerate()
    {
        let mut manifest = base.clone();
        manifest.trust = trust;
        let plugin = hosts[i].load_manifest(manifest).await?;
        columns.push(Column { backend, plugin });
    }
    match crate::find_wasm(search_paths, "faulty") {
        Some(module) => {
            let mut manifest = base.clone();
            manifest.runtime = Runtime::Wasm;
            manifest.library = module.display().to_string();
            let plugin = hosts[2].load_manifest(manifest).await?;
            columns.push(Column {
                backend: "wasm",
                plugin,
            });
        }
        None => println!(
            "faulty.wasm not found (looked in: {}); the wasm column is skipped. Build it \
             with:\n  {}",
            search_paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            crate::wasm_build_hint(&["faulty", "hello"])
        ),
    }
    for column in &columns {
        println!("{:<10} {}", column.backend, where_it_runs(&column.plugin));
    }
    let mut rows = Vec::new();
    for (fault, crashes) in FAULTS {
        for column in &columns {
            if crashes && column.backend == "in-process" {
                rows.push(Row {
                    backend: column.backend,
                    fault,
                    got: "not run: a crash in-process takes the host down with it".into(),
                    next: "-".into(),
                });
                continue;
            }
            rows.push(fault_then_echo(column, fault).await?);
        }
    }
    print_table(&rows);
    if columns.iter().any(|c| c.backend == "wasm") {
        println!(
            "wasm: a panic traps like any other fault (the instance is dropped and replaced, \
             not caught); a null write is no fault (address 0 is ordinary linear memory); the \
             next call waited for the restart backoff, as a worker's restart does"
        );
    }
    for column in columns {
        column.plugin.shutdown().await;
    }
    Ok(())
}

/// Where a plugin of the side-by-side part runs.
fn where_it_runs(plugin: &Plugin) -> String {
    match (plugin.runtime(), plugin.trust(), plugin.worker_pid()) {
        (Runtime::Wasm, _, _) => {
            "a WebAssembly instance in the host process (wasmi, the engine contains it)".into()
        }
        (_, Trust::Trusted, _) => "native, in the host process (trusted)".into(),
        (_, Trust::Untrusted, Some(pid)) => format!("native, in worker process {pid} (sandboxed)"),
        (_, Trust::Untrusted, None) => "native, in a worker process (sandboxed)".into(),
    }
}

/// Runs `fault` on a column's plugin, then `echo`; the row says what each call got.
async fn fault_then_echo(column: &Column, fault: &'static str) -> Result<Row, Error> {
    let plugin = &column.plugin;
    let pid = plugin.worker_pid();
    let restarts = plugin.status().restarts;
    let input = rmp_serde::to_vec_named(&json!({"message": "boom"})).expect("encode the input");
    let got = match plugin.call_raw(fault, input).await {
        Ok(output) => format!(
            "Ok({}): no fault",
            crate::json::from_msgpack(&output).map_or_else(|e| e, |v| v.to_string())
        ),
        Err(Error::Call(CallError::Panicked { message, .. })) => {
            format!("Panicked {message:?} (caught)")
        }
        Err(Error::Call(CallError::Crashed { report, .. })) => {
            let panic = report
                .panic
                .as_ref()
                .map_or(String::new(), |p| format!(", panic {p:?}"));
            match &report.exit {
                Some(ExitInfo::Trap { kind, .. }) => format!("Crashed: trap ({kind}){panic}"),
                Some(exit) => match exit.signal_name() {
                    Some(signal) => format!("Crashed: killed by {signal}{panic}"),
                    None => format!("Crashed: {exit}{panic}"),
                },
                None => format!("Crashed{panic}"),
            }
        }
        Err(e) => first_line(&e.to_string()),
    };
    let started = Instant::now();
    let echoed = plugin.call_raw("echo", b"ok".to_vec()).await?;
    let took = started.elapsed();
    let what = match (plugin.runtime(), pid, plugin.worker_pid()) {
        (Runtime::Wasm, _, _) if plugin.status().restarts > restarts => "instance replaced",
        (Runtime::Wasm, _, _) => "same instance",
        (_, Some(before), Some(after)) if before != after => {
            return Ok(Row {
                backend: column.backend,
                fault,
                got,
                next: format!(
                    "echo {:?} in {took:.1?} (worker restarted: pid {before} -> {after})",
                    String::from_utf8_lossy(&echoed)
                ),
            })
        }
        (_, Some(_), _) => "same worker",
        (_, None, _) => "same instance",
    };
    Ok(Row {
        backend: column.backend,
        fault,
        got,
        next: format!(
            "echo {:?} in {took:.1?} ({what})",
            String::from_utf8_lossy(&echoed)
        ),
    })
}

/// Prints the side-by-side table, columns aligned.
fn print_table(rows: &[Row]) {
    let head = ("backend", "fault", "what the caller got", "next call");
    let width = |f: fn(&Row) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let w0 = width(|r| r.backend.len(), head.0.len());
    let w1 = width(|r| r.fault.len(), head.1.len());
    let w2 = width(|r| r.got.chars().count(), head.2.len());
    println!(
        "{:<w0$} | {:<w1$} | {:<w2$} | {}",
        head.0, head.1, head.2, head.3
    );
    let w3 = width(|r| r.next.chars().count(), head.3.len());
    println!("{}", "-".repeat(w0 + w1 + w2 + w3 + 9));
    for row in rows {
        println!(
            "{:<w0$} | {:<w1$} | {:<w2$} | {}",
            row.backend, row.fault, row.got, row.next
        );
    }
}

/// The sandbox layers in force in an untrusted plugin's worker, and any missing.
fn print_sandbox(plugin: &Plugin) {
    if plugin.trust() == Trust::Trusted {
        println!("  sandbox: none (trusted: in-process, with the host's rights)");
        return;
    }
    let status = plugin.status();
    if status.sandbox.is_empty() {
        println!("  sandbox: off");
    } else {
        println!("  sandbox: {}", status.sandbox.join(", "));
    }
    for missing in &status.sandbox_missing {
        println!("  sandbox missing: {missing}");
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

fn print_event(event: &PluginEvent) {
    match event {
        PluginEvent::Crashed(report) => {
            println!("  [event] crashed: {}", report.headline());
            if let Some(why) = &report.killed_by_host {
                println!("          killed by the host: {why}");
            }
        }
        PluginEvent::Restarted { pid, restarts } => {
            println!("  [event] restarted: worker pid {pid} (restart #{restarts})")
        }
        PluginEvent::Quarantined(_) => {
            println!("  [event] quarantined: calls now fail at once until Plugin::enable")
        }
        PluginEvent::Enabled => println!("  [event] enabled"),
        PluginEvent::Stopped => println!("  [event] stopped"),
        other => println!("  [event] {other:?}"),
    }
}

/// Prints events as they arrive until a restart (or quarantine), for at most 10 s.
async fn print_events_until_restart(events: &async_channel::Receiver<PluginEvent>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let next = futures_lite::future::or(async { events.recv().await.ok() }, async {
            smol::Timer::after(left).await;
            None
        })
        .await;
        let Some(event) = next else { return };
        print_event(&event);
        if matches!(
            event,
            PluginEvent::Restarted { .. } | PluginEvent::Quarantined(_)
        ) {
            return;
        }
    }
}

fn unexpected(what: &str) -> Error {
    Error::Call(CallError::Plugin {
        plugin: "demo".into(),
        method: what.into(),
        message: "unexpected".into(),
    })
}
