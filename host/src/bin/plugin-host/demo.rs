//! `plugin-host demo`: the main job in one command. Loads the example plugins, calls them,
//! and shows what happens when a plugin misbehaves.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use plugin_host::{CallOptions, Error, Host, Manifest, Plugin};
use serde::{Deserialize, Serialize};

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

fn load(host: &Host, dir: &Path, name: &str) -> Result<Plugin, Error> {
    let manifest = Manifest::from_file(dir.join(name).join("plugin.toml"))?;
    smol::block_on(host.load_manifest(manifest))
}

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
    println!("== plugin-host demo ==");
    let hello = load(host, dir, "hello")?;
    println!(
        "loaded {} {} ({:?}), methods: {}",
        hello.name(),
        hello.version(),
        hello.trust(),
        hello.methods().join(", ")
    );
    let greeting: Greeting = hello.call("greet", &Greet { name: "world" }).await?;
    println!("hello.greet -> {:?}", greeting.message);

    let thumbnail = load(host, dir, "thumbnail")?;
    println!(
        "loaded {} {} ({:?})",
        thumbnail.name(),
        thumbnail.version(),
        thumbnail.trust()
    );
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
        "thumbnail.thumbnail 1024x768 ({} KiB) -> {}x{} in {:.1?}",
        image.pixels.len() / 1024,
        thumb.width,
        thumb.height,
        started.elapsed()
    );

    let faulty = load(host, dir, "faulty")?;
    println!("loaded {} ({:?})", faulty.name(), faulty.trust());
    match faulty
        .call::<_, ()>("panic", &serde_json::json!({"message": "boom"}))
        .await
    {
        Err(e) => println!("faulty.panic -> error, as expected: {e}"),
        Ok(()) => println!("faulty.panic -> unexpectedly succeeded"),
    }
    let echoed = faulty.call_raw("echo", b"still alive".to_vec()).await?;
    println!(
        "faulty.echo after the panic -> {:?}",
        String::from_utf8_lossy(&echoed)
    );
    println!("the host survived; all plugins still serve calls");
    for p in [hello, thumbnail, faulty] {
        p.shutdown().await;
    }
    Ok(())
}
