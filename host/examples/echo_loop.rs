//! Calls a plugin's `echo` method in a loop and prints the mean time per call: the smallest
//! program that embeds the host, and a handy target for `strace -c` or `perf`.
//!
//! ```sh
//! cargo build --release --workspace
//! ./target/release/examples/echo_loop plugins/hello/plugin.toml 20000        # 16 B calls
//! ./target/release/examples/echo_loop plugins/hello/plugin.toml 500 1048576  # 1 MiB calls
//! ./target/release/examples/echo_loop plugins/hello/plugin.toml 20000 16 warm # one CPU kept busy
//! ```
//!
//! `warm` keeps one CPU busy with a spinning thread meanwhile (as `plugin-host bench
//! --warm` does): the host and its worker then mostly share the other CPU.

use std::time::Instant;

use plugin_host::Host;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let manifest = args
        .next()
        .unwrap_or_else(|| "plugins/hello/plugin.toml".into());
    let calls: u32 = args.next().map_or(Ok(10_000), |n| n.parse())?;
    let size: usize = args.next().map_or(Ok(16), |n| n.parse())?;
    let warm = args.next().is_some_and(|a| a == "warm");
    let spinning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(warm));
    let spinner = warm.then(|| {
        let spinning = spinning.clone();
        std::thread::spawn(move || {
            while spinning.load(std::sync::atomic::Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        })
    });
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(|d| d.join(".."))
        .unwrap_or_default();
    let host = Host::builder()
        .search_path(&exe_dir)
        .worker_shim(exe_dir.join("worker-shim"))
        .build()?;
    let result = smol::block_on(async {
        let plugin = host.load(&manifest).await?;
        let payload = vec![7u8; size];
        let started = Instant::now();
        for _ in 0..calls {
            let out = plugin.call_raw("echo", payload.clone()).await?;
            assert_eq!(out.len(), size);
        }
        let per_call = started.elapsed() / calls;
        println!(
            "{calls} calls of {size} bytes to {} ({:?}): {per_call:?} per call",
            plugin.name(),
            plugin.trust()
        );
        plugin.shutdown().await;
        Ok(())
    });
    spinning.store(false, std::sync::atomic::Ordering::Relaxed);
    if let Some(spinner) = spinner {
        let _ = spinner.join();
    }
    result
}
