//! Crash reports: what a user needs to know when a worker process died.

use std::fmt;
use std::time::Duration;

/// The line a worker prints after a panic it caught (so reports do not blame it).
pub(crate) const CAUGHT_PANIC_MARKER: &str =
    "worker-shim: the panic above was caught and returned to the caller as an error";

/// How many stderr lines `Display` shows (the report keeps more).
const DISPLAY_STDERR_LINES: usize = 12;

/// How a worker process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitInfo {
    /// It exited with this code (for example a plugin calling `exit(3)`).
    Code(i32),
    /// It was killed by a signal.
    Signal {
        /// The signal number.
        number: i32,
        /// Its name, such as `SIGSEGV`.
        name: String,
        /// Whether the system wrote a core file.
        core_dumped: bool,
    },
    /// Windows: it ended with an exception status, as a crashed process does (its exit
    /// code is the status: `0xC0000005`, an access violation, and so on).
    Exception {
        /// The status, such as `0xC0000005`.
        code: u32,
        /// Its name, such as `STATUS_ACCESS_VIOLATION`.
        name: String,
    },
    /// WebAssembly (`runtime = "wasm"`): the instance trapped, or the host stopped it. The
    /// instance is dropped; nothing else in the process is affected.
    Trap {
        /// A short name: `unreachable` (a panic, `abort` or `exit`), `out of bounds memory
        /// access`, `stack overflow`, `bad buffer` (the module handed the host a buffer or
        /// pointer outside its memory, or an output over `limits.max_frame`), `interrupted`
        /// (the host stopped a call past its deadline and grace, or at shutdown),
        /// `deadline` (loading: the entry or `create` ran past the load timeout), `too
        /// large` (an input that cannot fit a 32-bit memory); other WebAssembly traps by
        /// their engine name.
        kind: String,
        /// What it means.
        message: String,
    },
}

impl ExitInfo {
    /// Describes a `std::process::ExitStatus`.
    pub fn from_status(status: std::process::ExitStatus) -> ExitInfo {
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(number) = status.signal() {
                return ExitInfo::Signal {
                    number,
                    name: signal_name(number),
                    core_dumped: status.core_dumped(),
                };
            }
        }
        let code = status.code().unwrap_or(-1);
        #[cfg(windows)]
        if let Some(info) = ExitInfo::from_windows_code(code as u32) {
            return info;
        }
        ExitInfo::Code(code)
    }

    /// A Windows exit code that is an exception status (its top bits say error or
    /// warning), as [`ExitInfo::Exception`]; `None` for an ordinary exit code.
    pub fn from_windows_code(code: u32) -> Option<ExitInfo> {
        let severe = code & 0xC000_0000 == 0xC000_0000 || code == 0x8000_0003;
        severe.then(|| ExitInfo::Exception {
            code,
            name: exception_name(code),
        })
    }

    /// Killed by SIGKILL, as the host kills a worker.
    #[cfg(unix)]
    pub(crate) fn sigkill() -> ExitInfo {
        let number = libc::SIGKILL;
        ExitInfo::Signal {
            number,
            name: signal_name(number),
            core_dumped: false,
        }
    }

    /// The signal name, if it was killed by one.
    pub fn signal_name(&self) -> Option<&str> {
        match self {
            ExitInfo::Signal { name, .. } => Some(name),
            ExitInfo::Code(_) | ExitInfo::Exception { .. } | ExitInfo::Trap { .. } => None,
        }
    }

    /// The exception status's name (Windows), if it ended with one.
    pub fn exception_name(&self) -> Option<&str> {
        match self {
            ExitInfo::Exception { name, .. } => Some(name),
            ExitInfo::Code(_) | ExitInfo::Signal { .. } | ExitInfo::Trap { .. } => None,
        }
    }

    /// The trap's kind, if a WebAssembly instance trapped (or was stopped).
    pub fn trap_kind(&self) -> Option<&str> {
        match self {
            ExitInfo::Trap { kind, .. } => Some(kind),
            _ => None,
        }
    }

    /// Whether the signal is one a process gets from outside (SIGKILL, SIGTERM, ...) rather
    /// than from a fault of its own (SIGSEGV, SIGABRT, a CPU limit, ...).
    pub fn is_outside_signal(&self) -> bool {
        match self {
            ExitInfo::Signal { name, .. } => !matches!(
                name.as_str(),
                "SIGSEGV"
                    | "SIGBUS"
                    | "SIGILL"
                    | "SIGFPE"
                    | "SIGABRT"
                    | "SIGSYS"
                    | "SIGTRAP"
                    | "SIGXCPU"
                    | "SIGXFSZ"
                    | "SIGPIPE"
            ),
            ExitInfo::Code(_) | ExitInfo::Exception { .. } | ExitInfo::Trap { .. } => false,
        }
    }

    /// The exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitInfo::Code(c) => Some(*c),
            ExitInfo::Signal { .. } | ExitInfo::Exception { .. } | ExitInfo::Trap { .. } => None,
        }
    }
}

impl fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitInfo::Code(code) => write!(f, "exited with code {code}"),
            ExitInfo::Signal {
                name,
                number,
                core_dumped,
            } => {
                write!(f, "killed by {name} (signal {number}")?;
                if let Some(meaning) = signal_meaning(name) {
                    write!(f, ", {meaning}")?;
                }
                if *core_dumped {
                    write!(f, ", core dumped")?;
                }
                write!(f, ")")
            }
            ExitInfo::Exception { code, name } => {
                write!(f, "ended by {name} (status {code:#010X}")?;
                if let Some(meaning) = exception_meaning(*code) {
                    write!(f, ", {meaning}")?;
                }
                write!(f, ")")
            }
            ExitInfo::Trap { kind, message } => write!(f, "trapped ({kind}: {message})"),
        }
    }
}

/// Windows exception statuses a crashed process ends with.
const EXCEPTIONS: [(u32, &str, &str); 14] = [
    (
        0xC000_0005,
        "STATUS_ACCESS_VIOLATION",
        "invalid memory access",
    ),
    (0xC000_00FD, "STATUS_STACK_OVERFLOW", "stack overflow"),
    (
        0xC000_0409,
        "STATUS_STACK_BUFFER_OVERRUN",
        "fast fail: abort(), a panic that could not unwind, or a failed security check",
    ),
    (0xC000_0602, "STATUS_FAIL_FAST_EXCEPTION", "fast fail"),
    (0xC000_0374, "STATUS_HEAP_CORRUPTION", "heap corruption"),
    (
        0xC000_001D,
        "STATUS_ILLEGAL_INSTRUCTION",
        "illegal instruction",
    ),
    (
        0xC000_0096,
        "STATUS_PRIVILEGED_INSTRUCTION",
        "privileged instruction",
    ),
    (
        0xC000_0094,
        "STATUS_INTEGER_DIVIDE_BY_ZERO",
        "integer division by zero",
    ),
    (
        0xC000_0006,
        "STATUS_IN_PAGE_ERROR",
        "invalid memory access (paging)",
    ),
    (0xC000_0017, "STATUS_NO_MEMORY", "out of memory"),
    (
        0xC000_0135,
        "STATUS_DLL_NOT_FOUND",
        "a DLL it needs was not found",
    ),
    (
        0xC000_0142,
        "STATUS_DLL_INIT_FAILED",
        "a DLL failed to initialise",
    ),
    (0xC000_013A, "STATUS_CONTROL_C_EXIT", "ended by Ctrl+C"),
    (
        0x8000_0003,
        "STATUS_BREAKPOINT",
        "breakpoint hit with no debugger",
    ),
];

/// The name of a Windows exception status (`STATUS_0x…` if unknown).
pub fn exception_name(code: u32) -> String {
    known_exception(code).map_or_else(|| format!("STATUS_{code:#010X}"), |(name, _)| name.into())
}

fn exception_meaning(code: u32) -> Option<&'static str> {
    known_exception(code).map(|(_, meaning)| meaning)
}

/// The name and meaning of a status in [`EXCEPTIONS`].
fn known_exception(code: u32) -> Option<(&'static str, &'static str)> {
    EXCEPTIONS
        .iter()
        .find(|(c, _, _)| *c == code)
        .map(|&(_, name, meaning)| (name, meaning))
}

/// The conventional name of a signal number on this platform (`SIG?<n>` if unknown).
pub fn signal_name(number: i32) -> String {
    #[cfg(unix)]
    {
        let names = [
            (libc::SIGHUP, "SIGHUP"),
            (libc::SIGINT, "SIGINT"),
            (libc::SIGQUIT, "SIGQUIT"),
            (libc::SIGILL, "SIGILL"),
            (libc::SIGTRAP, "SIGTRAP"),
            (libc::SIGABRT, "SIGABRT"),
            (libc::SIGBUS, "SIGBUS"),
            (libc::SIGFPE, "SIGFPE"),
            (libc::SIGKILL, "SIGKILL"),
            (libc::SIGUSR1, "SIGUSR1"),
            (libc::SIGSEGV, "SIGSEGV"),
            (libc::SIGUSR2, "SIGUSR2"),
            (libc::SIGPIPE, "SIGPIPE"),
            (libc::SIGALRM, "SIGALRM"),
            (libc::SIGTERM, "SIGTERM"),
            (libc::SIGXCPU, "SIGXCPU"),
            (libc::SIGXFSZ, "SIGXFSZ"),
            (libc::SIGSYS, "SIGSYS"),
        ];
        if let Some((_, name)) = names.iter().find(|(n, _)| *n == number) {
            return name.to_string();
        }
    }
    format!("SIG?{number}")
}

fn signal_meaning(name: &str) -> Option<&'static str> {
    Some(match name {
        "SIGSEGV" => "segmentation fault: invalid memory access",
        "SIGABRT" => "aborted: abort(), a failed allocation, a panic that could not unwind, or a stack overflow",
        "SIGBUS" => "bus error: invalid memory access",
        "SIGILL" => "illegal instruction",
        "SIGFPE" => "arithmetic fault",
        "SIGKILL" => "killed outright",
        "SIGXCPU" => "CPU time limit exceeded",
        "SIGSYS" => "forbidden system call",
        _ => return None,
    })
}

/// A resource limit from the manifest that the worker ran into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitExceeded {
    /// `limits.memory`: an allocation failed under the address-space limit.
    Memory {
        /// The limit in bytes.
        bytes: u64,
    },
    /// `limits.cpu`: the CPU-time limit ran out (SIGXCPU).
    Cpu {
        /// The limit.
        limit: Duration,
    },
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitExceeded::Memory { bytes } => {
                write!(
                    f,
                    "out of memory: hit its memory limit of {} MiB (limits.memory)",
                    bytes >> 20
                )
            }
            LimitExceeded::Cpu { limit } => {
                write!(f, "hit its CPU-time limit of {limit:?} (limits.cpu)")
            }
        }
    }
}

/// Everything known about one worker crash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CrashReport {
    /// The plugin's name.
    pub plugin: String,
    /// How the process ended, if it could be observed.
    pub exit: Option<ExitInfo>,
    /// The methods that were running when it died.
    pub in_flight: Vec<String>,
    /// The panic message, if the plugin panicked in a way that ended the process.
    pub panic: Option<String>,
    /// Where that panic happened (`file:line:column`), when the message says.
    pub panic_location: Option<String>,
    /// A resource limit it ran into, when that is why it died.
    pub limit: Option<LimitExceeded>,
    /// Why the host killed it, when the host did (a call ignored its deadline, the worker
    /// stopped answering pings).
    pub killed_by_host: Option<String>,
    /// The worker died of a signal the host did not send and that is not a fault of its
    /// own (SIGKILL, SIGTERM, ...): another process, the plugin itself, or the kernel's
    /// out-of-memory killer sent it.
    pub outside_signal: bool,
    /// Set when a fresh worker failed to start (after an earlier crash): why.
    pub start_error: Option<String>,
    /// How many times this plugin had been restarted before this crash.
    pub restarts: u64,
    /// A protocol violation that made the host cut the worker off, if that was the cause.
    pub protocol_error: Option<String>,
    /// The last lines the worker wrote to stderr (or stdout).
    pub stderr_tail: Vec<String>,
    /// How long the worker had been running.
    pub uptime: Duration,
}

impl CrashReport {
    /// A report for a restart that failed before the plugin was ready.
    pub(crate) fn start_failure(
        plugin: &str,
        error: &crate::error::LoadError,
        restarts: u64,
    ) -> CrashReport {
        use crate::error::LoadError as E;
        let (exit, stderr_tail) = match error {
            E::WorkerTimeout { exit, stderr, .. } | E::WorkerExited { exit, stderr, .. } => {
                (exit.clone(), stderr.clone())
            }
            _ => (None, Vec::new()),
        };
        CrashReport {
            plugin: plugin.to_string(),
            exit,
            in_flight: vec!["create".to_string()],
            panic: None,
            panic_location: None,
            limit: None,
            killed_by_host: None,
            outside_signal: false,
            protocol_error: None,
            start_error: Some(error.to_string()),
            stderr_tail,
            uptime: Duration::ZERO,
            restarts,
        }
    }

    /// Finds the panic message and location in the worker's stderr (the standard panic
    /// hook's format).
    pub(crate) fn find_panic(lines: &[String]) -> Option<(String, Option<String>)> {
        let i = lines.iter().rposition(|l| l.contains("panicked at"))?;
        if lines[i..].iter().any(|l| l == CAUGHT_PANIC_MARKER) {
            // That panic was caught and returned as an error; it is not why the worker died.
            return None;
        }
        let head = lines[i].trim();
        let location = head
            .split("panicked at ")
            .nth(1)
            .map(|l| l.trim_end_matches(':').to_string());
        // Rust >= 1.73: "thread 'x' panicked at src/lib.rs:1:2:" then the message.
        match lines.get(i + 1) {
            Some(message) if head.ends_with(':') => Some((message.trim().to_string(), location)),
            _ => Some((head.to_string(), location)),
        }
    }
}

impl CrashReport {
    /// The first line of the report: how it ended and what was running.
    pub fn headline(&self) -> String {
        self.to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.exit {
            Some(ExitInfo::Trap { .. }) => write!(f, "wasm instance of plugin `{}` ", self.plugin)?,
            _ => write!(f, "worker for plugin `{}` ", self.plugin)?,
        }
        match &self.exit {
            Some(exit) => write!(f, "{exit}")?,
            None => write!(f, "ended (exit status unknown)")?,
        }
        match self.in_flight.as_slice() {
            [] => {}
            [one] => write!(f, " while running `{one}`")?,
            many => write!(
                f,
                " while running {}",
                many.iter()
                    .map(|m| format!("`{m}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
        }
        write!(f, " after {:.1?}", self.uptime)?;
        match self.restarts {
            0 => {}
            1 => write!(f, " (after 1 restart)")?,
            n => write!(f, " (after {n} restarts)")?,
        }
        if let Some(limit) = &self.limit {
            write!(f, "\n  cause: {limit}")?;
        }
        if let Some(e) = &self.start_error {
            write!(f, "\n  restart failed: {e}")?;
        }
        if let Some(reason) = &self.killed_by_host {
            write!(f, "\n  killed by the host: {reason}")?;
        } else if self.outside_signal {
            write!(
                f,
                "\n  cause: a signal the host did not send (another process, the plugin itself, or the kernel's out-of-memory killer)"
            )?;
        }
        if let Some(p) = &self.protocol_error {
            write!(f, "\n  protocol error: {p}")?;
        }
        if let Some(p) = &self.panic {
            write!(f, "\n  panic: {p}")?;
            if let Some(at) = &self.panic_location {
                write!(f, " at {at}")?;
            }
        }
        if !self.stderr_tail.is_empty() {
            let skip = self.stderr_tail.len().saturating_sub(DISPLAY_STDERR_LINES);
            write!(f, "\n  last stderr lines:")?;
            for line in &self.stderr_tail[skip..] {
                write!(f, "\n    | {line}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_message_is_found_in_modern_format() {
        let lines = vec![
            "thread 'worker-0' panicked at plugins/faulty/src/lib.rs:10:5:".to_string(),
            "kaboom".to_string(),
            "note: run with `RUST_BACKTRACE=1`".to_string(),
        ];
        let (message, location) = CrashReport::find_panic(&lines).unwrap();
        assert_eq!(message, "kaboom");
        assert_eq!(location.as_deref(), Some("plugins/faulty/src/lib.rs:10:5"));
        assert!(CrashReport::find_panic(&["nothing".to_string()]).is_none());
        let mut caught = lines.clone();
        caught.push(CAUGHT_PANIC_MARKER.to_string());
        assert!(
            CrashReport::find_panic(&caught).is_none(),
            "a caught panic is not the cause"
        );
    }

    #[test]
    fn windows_exception_statuses_have_names_and_plain_codes_stay_codes() {
        let segv = ExitInfo::from_windows_code(0xC000_0005).unwrap();
        assert_eq!(segv.exception_name(), Some("STATUS_ACCESS_VIOLATION"));
        assert_eq!(
            segv.to_string(),
            "ended by STATUS_ACCESS_VIOLATION (status 0xC0000005, invalid memory access)"
        );
        let abort = ExitInfo::from_windows_code(0xC000_0409).unwrap();
        assert_eq!(abort.exception_name(), Some("STATUS_STACK_BUFFER_OVERRUN"));
        assert_eq!(
            ExitInfo::from_windows_code(0xC0DE_0001)
                .unwrap()
                .exception_name(),
            Some("STATUS_0xC0DE0001")
        );
        assert_eq!(ExitInfo::from_windows_code(3), None);
        assert_eq!(ExitInfo::from_windows_code(0x4000_0000), None);
    }

    #[cfg(unix)]
    #[test]
    fn signals_have_names() {
        assert_eq!(signal_name(libc::SIGSEGV), "SIGSEGV");
        assert_eq!(signal_name(libc::SIGABRT), "SIGABRT");
        assert_eq!(signal_name(1000), "SIG?1000");
        assert_eq!(ExitInfo::sigkill().signal_name(), Some("SIGKILL"));
        assert_eq!(
            ExitInfo::sigkill().to_string(),
            "killed by SIGKILL (signal 9, killed outright)"
        );
    }
}
