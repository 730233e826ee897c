//! End-to-end tests for plugin-host live in `tests/tests/`; this crate's library holds only
//! what its binaries and tests share. Its build script builds the example plugins, the
//! worker-shim and the C plugins first.
//!
//! Other crates' tests (the example GUI app's) depend on this crate to have the example
//! plugins built before they run, and read where they are from [`E2E_DIR`] and
//! [`WASM_DIR`].

/// Where `build.rs` put the example plugins' native libraries, the `worker-shim` and the
/// `plugin-host` binary (`target/e2e/debug`, or `target/e2e/TARGET/debug` when
/// cross-compiling): a search path (`-L`) for them.
pub const E2E_DIR: &str = env!("PLUGIN_HOST_E2E_DIR");

/// Where `build.rs` put the example plugins built as WebAssembly modules (`NAME.wasm`,
/// in `target/e2e/wasm32-unknown-unknown/release`); set, but not built, when
/// cross-compiling.
pub const WASM_DIR: &str = env!("PLUGIN_HOST_WASM_DIR");

/// xorshift64*: a small seeded generator for the fuzz tests and the hostile worker
/// (reproducible runs, no dependency).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n.max(1) as u64) as usize
    }

    /// True once in `one_in` times.
    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A size biased towards small values: `0..2^k` for a random `k` up to `bits`.
    pub fn size(&mut self, bits: u32) -> usize {
        let k = self.below(bits as usize + 1) as u32;
        self.below(1usize << k)
    }
}

/// Runs `cmd` with stdout and stderr captured, killing it if it runs longer than `limit`
/// (on Unix, its whole process group: it starts one of its own, so what it started goes
/// too). Returns its exit status (`None` if it was killed for taking too long) and its
/// output (stdout then stderr).
pub fn output_with_limit(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(cmd, 0);
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    })
    .collect();
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            #[cfg(unix)]
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // The pipes close when the child and anything that inherited them are gone; a
    // grandchild keeping them open must not hang the test.
    let mut output = String::new();
    for reader in readers {
        let until = deadline.max(std::time::Instant::now()) + std::time::Duration::from_secs(5);
        while !reader.is_finished() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if reader.is_finished() {
            output.push_str(&reader.join().unwrap());
        } else {
            output.push_str("\n[output pipe still open 5 s after the child exited]\n");
        }
    }
    (status, output)
}
