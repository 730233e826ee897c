//! `plugin-host demo`: the main job in one command. Loads the example plugins, calls them,
//! crashes one on purpose and shows the host surviving and the plugin recovering.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use plugin_host::{CallError, CallOptions, Error, Host, Manifest, Plugin};
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
    Ok(plugin)
}

/// Runs the demo; exit code 0 when every step behaved as expected.
pub fn run(host: &Host, dir: &Path) -> ExitCode {
    match smol::block_on(demo(host, dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
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

    println!("\n-- 2. a plugin misbehaves");
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

    println!("\n-- 3. the host survives and the plugin recovers");
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
    for plugin in [hello, thumbnail, faulty] {
        plugin.shutdown().await;
    }
    println!(
        "\nall plugins shut down; the host (pid {}) never stopped",
        std::process::id()
    );
    Ok(())
}

fn unexpected(what: &str) -> Error {
    Error::Call(CallError::Plugin {
        plugin: "demo".into(),
        method: what.into(),
        message: "unexpected".into(),
    })
}
