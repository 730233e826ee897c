//! The example app end to end, as a user would see it: its scripted tour under a virtual X
//! server (`xvfb-run`), then a look at the screenshot it saved: the window's size, not
//! blank, and the Ready and Quarantined badge colours in the table.
//!
//! The example plugins come from the `plugin-host-tests` crate's build script (natively and
//! as WebAssembly); the app is this package's binary. Needs `xvfb-run` (Debian: `apt-get
//! install xvfb`) and OpenGL (Mesa's software renderer does).
#![cfg(target_os = "linux")]

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use plugin_host_tests::{output_with_limit, E2E_DIR, WASM_DIR};
use plugin_manager::style::{QUARANTINED, READY};
use plugin_manager::ui::DETAILS_HEIGHT;
use plugin_manager::WINDOW_SIZE;

/// The app gets this long (the tour takes seconds; a hang or a lost window must not hang the
/// test).
const LIMIT: Duration = Duration::from_secs(120);

/// Pixels of a badge colour the table must show at least: a badge is 92 x 18 points, most
/// of it not covered by its label.
const MIN_BADGE_PIXELS: usize = 600;

#[test]
fn the_tour_passes_and_its_screenshot_shows_ready_and_quarantined_plugins() {
    assert!(
        on_path("xvfb-run"),
        "xvfb-run is not installed: install xvfb (Debian/Ubuntu: apt-get install xvfb) to run \
         the example app's screenshot test"
    );
    let dir = std::env::temp_dir().join(format!("plugin-manager-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("tour.png");
    let started = Instant::now();
    let (status, output) = output_with_limit(
        Command::new("xvfb-run")
            .args(["-a", "-s", "-screen 0 1024x768x24"])
            .arg(env!("CARGO_BIN_EXE_plugin-manager"))
            .args(["-L", E2E_DIR, "-L", WASM_DIR])
            .args(["--scenario", "tour", "--screenshot"])
            .arg(&png),
        LIMIT,
    );
    println!("{output}");
    let status = status.unwrap_or_else(|| {
        panic!("plugin-manager did not finish within {LIMIT:?} (killed); its output:\n{output}")
    });
    assert!(
        status.success(),
        "plugin-manager exited with {status}; its output:\n{output}"
    );
    println!("the tour and its screenshot took {:.1?}", started.elapsed());

    let image = decode(&png);
    let _ = std::fs::remove_dir_all(&dir);
    let expected = (WINDOW_SIZE[0] as u32, WINDOW_SIZE[1] as u32);
    assert_eq!(
        (image.width, image.height),
        expected,
        "the screenshot is not the size of the window the app asks for"
    );
    let distinct: HashSet<[u8; 3]> = image.pixels.iter().copied().collect();
    assert!(
        distinct.len() > 100,
        "the screenshot looks blank: {} distinct colours",
        distinct.len()
    );
    // The table is everything above the details and log.
    let table_rows = image.height - DETAILS_HEIGHT as u32;
    let in_table = &image.pixels[..(image.width * table_rows) as usize];
    for (name, colour) in [("Ready", READY), ("Quarantined", QUARANTINED)] {
        let rgb = [colour.r(), colour.g(), colour.b()];
        let count = in_table.iter().filter(|&&p| p == rgb).count();
        assert!(
            count >= MIN_BADGE_PIXELS,
            "the table shows {count} pixels of the {name} badge colour {rgb:?} (expected at \
             least {MIN_BADGE_PIXELS}); the app's output:\n{output}"
        );
    }
}

/// A decoded screenshot, one RGB triple a pixel.
struct Image {
    width: u32,
    height: u32,
    pixels: Vec<[u8; 3]>,
}

fn decode(path: &Path) -> Image {
    let file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("the app said it saved {}: {e}", path.display()));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("a sane size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "8 bits a channel");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    Image {
        width: info.width,
        height: info.height,
        pixels,
    }
}

/// Whether `program` is on the `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
