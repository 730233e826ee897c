//! What the app knows about the repository's example plugins: a typical input for their
//! methods (filled into the input box when a method is picked), the one call the tour makes
//! on each, and the faults the fault-injection plugin (`faulty`) offers as buttons.
//!
//! Nothing here is needed to load or call a plugin: any plugin works with typed JSON.

use std::time::Duration;

use serde_json::Value;

/// A typical input for `method` of the example plugin `base` (its manifest name, without
/// the ` (wasm)` of the WebAssembly copy), as JSON text; `null` when the app knows none.
pub fn input(base: &str, method: &str) -> &'static str {
    match (base, method) {
        ("hello", "greet") => r#"{"name": "world"}"#,
        ("hello" | "faulty" | "callbacks" | "c-echo", "echo") => r#""any value""#,
        ("thumbnail", "resize") => {
            r#"{"image": {"$image": [1536, 1536]}, "width": 256, "height": 256}"#
        }
        ("thumbnail", "thumbnail") => r#"{"image": {"$image": [1024, 768]}, "max_size": 128}"#,
        ("thumbnail", "grayscale" | "info") => r#"{"$image": [64, 64]}"#,
        ("thumbnail", "thumbnail_by_id") => r#"{"id": 1, "max_size": 128}"#,
        ("faulty", "progress") => r#"{"steps": 20}"#,
        ("faulty", "sleep") => r#"{"ms": 3000, "cooperative": true}"#,
        ("faulty", "fail" | "panic") => r#"{"message": "asked to from the app"}"#,
        ("faulty", "exit") => r#"{"code": 3}"#,
        ("faulty", "output") => r#"{"bytes": 1000}"#,
        ("callbacks", "add") => r#"{"a": 2, "b": 3}"#,
        ("callbacks", "double") => "21",
        ("c-echo", "ask") => r#""hello from C""#,
        _ => "null",
    }
}

/// The call the tour makes on an example plugin, and what a correct answer looks like.
pub struct Typical {
    /// The method.
    pub method: &'static str,
    /// Its input, JSON.
    pub input: &'static str,
    /// Whether the method reports progress (the tour checks that reports arrived).
    pub progress: bool,
    /// Whether an output is the right one.
    pub check: fn(&Value) -> bool,
}

/// The tour's call for the example plugin `base`, if it is one.
pub fn typical(base: &str) -> Option<Typical> {
    let (method, progress, check): (_, _, fn(&Value) -> bool) = match base {
        "hello" => ("greet", false, |v| v["message"] == "Hello, world!"),
        // A smaller picture than the input box's: the interpreter is slow in a debug build.
        "thumbnail" => {
            return Some(Typical {
                method: "resize",
                input: r#"{"image": {"$image": [512, 256]}, "width": 128, "height": 64}"#,
                progress: true,
                check: |v| v["width"] == 128 && v["height"] == 64,
            })
        }
        "faulty" => ("progress", true, |v| v == 20),
        // A host function: the plugin asks the app to add (`math.add`).
        "callbacks" => ("add", false, |v| v == 5),
        // A host function: the plugin hands its input to the app's `echo`.
        "c-echo" => ("ask", false, |v| v == "hello from C"),
        _ => return None,
    };
    Some(Typical {
        method,
        input: input(base, method),
        progress,
        check,
    })
}

/// One of `faulty`'s faults, as a button.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The button's label.
    pub label: &'static str,
    /// The method that misbehaves.
    pub method: &'static str,
    /// Its input, JSON.
    pub input: &'static str,
    /// A deadline of its own (the infinite loop's).
    pub timeout: Option<Duration>,
    /// Whether it takes its process down: never run in-process (it would take the app down
    /// with it).
    pub kills_the_process: bool,
}

/// `faulty`'s faults.
pub const FAULTS: [Fault; 5] = [
    Fault {
        label: "Panic",
        method: "panic",
        input: r#"{"message": "boom, from the Panic button"}"#,
        timeout: None,
        kills_the_process: false,
    },
    Fault {
        label: "Segfault",
        method: "segfault",
        input: "null",
        timeout: None,
        kills_the_process: true,
    },
    Fault {
        label: "Abort",
        method: "abort",
        input: "null",
        timeout: None,
        kills_the_process: true,
    },
    Fault {
        label: "Infinite loop (1 s deadline)",
        method: "infinite_loop",
        input: "null",
        timeout: Some(Duration::from_secs(1)),
        kills_the_process: true,
    },
    Fault {
        label: "Memory bomb",
        method: "alloc",
        input: r#"{"chunk": 67108864}"#,
        timeout: None,
        kills_the_process: true,
    },
];
