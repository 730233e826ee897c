//! `callbacks`: a plugin that calls host functions (`ctx.host_call`) and streams output
//! (`ctx.emit`). The tests and `plugin-host bench` drive it; each method exercises one
//! behaviour.
//!
//! - `ask {function, input}`: one raw host call; returns the outcome as data
//!   (`{ok}` or `{kind, message}`) so callers can check the exact error kind.
//! - `add {a, b}`: typed host call to `math.add`.
//! - `reenter n`: host call to `reenter` (whose host function calls `double` back).
//! - `double n`: `2 * n`, a plain method for re-entrant calls.
//! - `ask_many {function, n}`: `n` host calls in a row; returns the nanoseconds they took.
//! - `count {n, size, sizes}`: emits one item of each size in `sizes`, then `n` items
//!   (the index as `u64`, or `size` bytes when `size > 0`); returns `n`.
//! - `count_then_crash {n}`: emits `n` items, then aborts the process.
//! - `ask_then_crash {function}`: one host call, then aborts.
//! - `emit_plain`: emits in a call that is not a stream; returns the error kind.
//! - `echo`: returns its input bytes.

use plugin_api::{export_plugin, Context, CreateContext, Methods, Plugin, PluginError};
use serde::{Deserialize, Serialize};

/// The plugin (stateless).
pub struct Callbacks;

#[derive(Deserialize)]
struct Ask {
    function: String,
    #[serde(with = "serde_bytes", default)]
    input: Vec<u8>,
}

/// A host call's outcome as data.
#[derive(Serialize, Default)]
struct Outcome {
    #[serde(with = "serde_bytes")]
    ok: Option<Vec<u8>>,
    kind: Option<String>,
    message: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[derive(Deserialize)]
struct Many {
    function: String,
    n: u64,
}

#[derive(Deserialize)]
struct Count {
    n: u64,
    #[serde(default)]
    size: usize,
    /// When given: emit one item of each of these sizes instead.
    #[serde(default)]
    sizes: Vec<usize>,
}

fn ask(ctx: &Context<'_>, function: &str, input: &[u8]) -> Outcome {
    match ctx.host_call_raw(function, input) {
        Ok(bytes) => Outcome {
            ok: Some(bytes),
            ..Outcome::default()
        },
        Err(e) => Outcome {
            kind: Some(format!("{:?}", e.kind())),
            message: Some(e.message().to_string()),
            ..Outcome::default()
        },
    }
}

impl Plugin for Callbacks {
    fn create(_: &CreateContext<'_>) -> Result<Self, PluginError> {
        Ok(Callbacks)
    }

    fn methods(methods: &mut Methods<Self>) {
        methods
            .add("ask", |_: &Callbacks, ctx: &Context<'_>, a: Ask| {
                Ok(ask(ctx, &a.function, &a.input))
            })
            .add("add", |_: &Callbacks, ctx: &Context<'_>, add: Add| {
                let sum: i64 = ctx.host_call("math.add", &add)?;
                Ok(sum)
            })
            .add("reenter", |_: &Callbacks, ctx: &Context<'_>, n: u64| {
                let doubled: u64 = ctx.host_call("reenter", &n)?;
                Ok(doubled + 1)
            })
            .add("double", |_: &Callbacks, _: &Context<'_>, n: u64| Ok(n * 2))
            .add("ask_many", |_: &Callbacks, ctx: &Context<'_>, m: Many| {
                let start = std::time::Instant::now();
                for _ in 0..m.n {
                    ctx.host_call_raw(&m.function, b"0123456789abcdef")?;
                }
                Ok(start.elapsed().as_nanos() as u64)
            })
            .add("count", |_: &Callbacks, ctx: &Context<'_>, c: Count| {
                for size in &c.sizes {
                    ctx.emit_raw(&vec![0x5au8; *size])?;
                }
                let blob = vec![0xa5u8; c.size];
                for i in 0..c.n {
                    if c.size == 0 {
                        ctx.emit(&i)?;
                    } else {
                        ctx.emit_raw(&blob)?;
                    }
                }
                Ok(c.n)
            })
            .add(
                "count_then_crash",
                |_: &Callbacks, ctx: &Context<'_>, n: u64| -> Result<(), PluginError> {
                    for i in 0..n {
                        ctx.emit(&i)?;
                    }
                    eprintln!("callbacks: aborting after {n} items, as asked");
                    std::process::abort()
                },
            )
            .add(
                "ask_then_crash",
                |_: &Callbacks, ctx: &Context<'_>, a: Ask| -> Result<(), PluginError> {
                    let outcome = ask(ctx, &a.function, &a.input);
                    eprintln!(
                        "callbacks: aborting after a host call ({:?}), as asked",
                        outcome.kind
                    );
                    std::process::abort()
                },
            )
            .add("emit_plain", |_: &Callbacks, ctx: &Context<'_>, (): ()| {
                Ok(match ctx.emit(&1u8) {
                    Ok(()) => "Ok".to_string(),
                    Err(e) => format!("{:?}", e.kind()),
                })
            })
            .add_raw("echo", |_: &Callbacks, _: &Context<'_>, input: &[u8]| {
                Ok(input.to_vec())
            });
    }
}

export_plugin!(Callbacks);
