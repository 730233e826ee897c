//! Echoes a large payload through a plugin in a loop and prints the mean time per call.
//!
//! ```sh
//! cargo build --release --workspace
//! ./target/release/examples/big_echo plugins/hello/plugin.toml 1048576 500
//! ```

use std::time::Instant;

use plugin_host::Host;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let manifest = args
        .next()
        .unwrap_or_else(|| "plugins/hello/plugin.toml".into());
    let size: usize = args.next().map_or(Ok(1 << 20), |n| n.parse())?;
    let calls: u32 = args.next().map_or(Ok(500), |n| n.parse())?;
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(|d| d.join(".."))
        .unwrap_or_default();
    let host = Host::builder()
        .search_path(&exe_dir)
        .worker_shim(exe_dir.join("worker-shim"))
        .build()?;
    smol::block_on(async {
        let plugin = host.load(&manifest).await?;
        let payload = vec![7u8; size];
        let started = Instant::now();
        for _ in 0..calls {
            let out = plugin.call_raw("echo", payload.clone()).await?;
            assert_eq!(out.len(), size);
        }
        println!(
            "{calls} calls of {size} bytes: {:?} per call",
            started.elapsed() / calls
        );
        plugin.shutdown().await;
        Ok(())
    })
}
