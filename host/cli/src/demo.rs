//! `plugin-host demo`: the main job in one command. Loads the example plugins, calls them,
//! shows a plugin calling back into the app (a host function) and streaming its output,
//! crashes one on purpose and shows the host surviving and the plugin recovering; then a
//! call that never returns (timeout, then the worker is killed and restarted) and a plugin
//! that keeps crashing (quarantined, then re-enabled).
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

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use plugin_host::{
    CallError, CallOptions, Error, Host, HostCallContext, HostError, Manifest, Plugin, PluginEvent,
    PluginState, Trust,
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
    let result = match host {
        Ok(host) => smol::block_on(demo(&host, dir)),
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
    println!(
        "\nall plugins shut down; the host (pid {}) never stopped",
        std::process::id()
    );
    Ok(())
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
