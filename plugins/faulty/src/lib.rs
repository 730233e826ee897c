//! `faulty`: misbehaves on request, one method per fault, so tests can prove the host
//! survives. Every method takes its parameters as input (MessagePack map; fields are
//! optional where a default makes sense):
//!
//! | method | input | does |
//! |---|---|---|
//! | `echo` | any bytes (raw) | returns them |
//! | `panic` | `{message}` | panics with the message |
//! | `abort` | anything | `std::process::abort()` (SIGABRT) |
//! | `segfault` | anything | writes through a null pointer (SIGSEGV) |
//! | `stack_overflow` | anything | unbounded recursion |
//! | `infinite_loop` | anything | spins forever, ignoring cancellation |
//! | `sleep` | `{ms, cooperative}` | sleeps; if `cooperative`, stops early when cancelled |
//! | `alloc` | `{chunk}` | allocates and touches memory until allocation fails |
//! | `exit` | `{code}` | `std::process::exit(code)` mid-call |
//! | `output` | `{bytes}` | returns that many bytes (MessagePack binary) |
//! | `progress` | `{steps}` | reports progress `steps` times, returns `steps` |
//! | `fail` | `{message}` | returns an error with the message |
//!
//! Configuration (`[config]`): `create_sleep_ms`, `create_fail`, `create_panic`,
//! `create_abort`, to misbehave in `create()`.

use plugin_api::{export_plugin, Context, CreateContext, Methods, Plugin, PluginError};
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Config {
    create_sleep_ms: u64,
    create_fail: Option<String>,
    create_panic: Option<String>,
    create_abort: bool,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default = "default_message")]
    message: String,
}

fn default_message() -> String {
    "faulty plugin was asked to fail".into()
}

#[derive(Deserialize)]
struct Sleep {
    ms: u64,
    #[serde(default)]
    cooperative: bool,
}

#[derive(Deserialize)]
struct Alloc {
    #[serde(default = "default_chunk")]
    chunk: usize,
}

fn default_chunk() -> usize {
    64 << 20
}

#[derive(Deserialize)]
struct Exit {
    code: i32,
}

#[derive(Deserialize)]
struct Output {
    bytes: usize,
}

#[derive(Deserialize)]
struct Steps {
    steps: u32,
}

struct Faulty;

#[inline(never)]
#[allow(unconditional_recursion)] // the point of `stack_overflow`
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(depth + 1) + frame[0]
}

impl Plugin for Faulty {
    fn create(ctx: &CreateContext<'_>) -> Result<Self, PluginError> {
        let config: Config = ctx.config()?;
        if config.create_sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(config.create_sleep_ms));
        }
        if let Some(message) = config.create_panic {
            panic!("{message}");
        }
        if config.create_abort {
            std::process::abort();
        }
        if let Some(message) = config.create_fail {
            return Err(PluginError::new(message));
        }
        Ok(Faulty)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .add_raw("echo", |_: &Faulty, _: &Context<'_>, input: &[u8]| {
                Ok(input.to_vec())
            })
            .add(
                "panic",
                |_: &Faulty, _: &Context<'_>, m: Message| -> Result<(), PluginError> {
                    panic!("{}", m.message)
                },
            )
            .add(
                "fail",
                |_: &Faulty, _: &Context<'_>, m: Message| -> Result<(), PluginError> {
                    Err(PluginError::new(m.message))
                },
            )
            .add(
                "abort",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| -> Result<(), PluginError> {
                    std::process::abort()
                },
            )
            .add(
                "segfault",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| -> Result<(), PluginError> {
                    // SAFETY: deliberately unsound: this method exists to crash its process
                    // with SIGSEGV so tests can prove the host survives it.
                    unsafe { std::ptr::null_mut::<u64>().write_volatile(0xdead) };
                    Ok(())
                },
            )
            .add(
                "stack_overflow",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| Ok(recurse(0)),
            )
            .add(
                "infinite_loop",
                |_: &Faulty, _: &Context<'_>, _: IgnoredAny| -> Result<(), PluginError> {
                    let mut n = 0u64;
                    loop {
                        n = std::hint::black_box(n.wrapping_add(1));
                    }
                },
            )
            .add("sleep", |_: &Faulty, ctx: &Context<'_>, s: Sleep| {
                let deadline = std::time::Instant::now() + Duration::from_millis(s.ms);
                while std::time::Instant::now() < deadline {
                    if s.cooperative && ctx.is_cancelled() {
                        return Err(PluginError::new("cancelled"));
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    std::thread::sleep(left.min(Duration::from_millis(5)));
                }
                Ok(s.ms)
            })
            .add(
                "alloc",
                |_: &Faulty, _: &Context<'_>, a: Alloc| -> Result<usize, PluginError> {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        let mut chunk = vec![0u8; a.chunk.max(4096)];
                        for i in (0..chunk.len()).step_by(4096) {
                            chunk[i] = 1;
                        }
                        hoard.push(std::hint::black_box(chunk));
                    }
                },
            )
            .add(
                "exit",
                |_: &Faulty, _: &Context<'_>, e: Exit| -> Result<(), PluginError> {
                    std::process::exit(e.code)
                },
            )
            .add("output", |_: &Faulty, _: &Context<'_>, o: Output| {
                Ok(plugin_api::serde_bytes::ByteBuf::from(vec![
                    0xabu8;
                    o.bytes
                ]))
            })
            .add("progress", |_: &Faulty, ctx: &Context<'_>, s: Steps| {
                for i in 1..=s.steps {
                    ctx.progress(i as f64 / s.steps as f64, format!("step {i}"));
                }
                ctx.info(format!("reported {} steps", s.steps));
                Ok(s.steps)
            });
    }
}

export_plugin!(Faulty);
