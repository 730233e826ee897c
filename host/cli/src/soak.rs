//! `plugin-host soak`: a bounded chaos run. Thousands of concurrent calls over several
//! plugins, with faults injected at random; then it checks that every call was answered
//! exactly once, that restarts match crashes, that no process or descriptor leaked, and
//! that the host's peak memory grew by less than a budget.
//!
//! Besides crashes, the faults include what a worker can do to the host's memory and
//! bookkeeping without crashing: a flood on stderr (with or without newlines, sometimes
//! followed by an abort), a huge log or progress message, an output buffer whose length
//! lies (near `usize::MAX`), and, with `--attack` (the C attack plugin, built by the
//! tests), a grandchild that calls `setsid()` and keeps the worker's stderr open, after
//! which the worker is killed from outside: the crash must be noticed at once and the
//! grandchild must not survive.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plugin_host::{CallError, CallOptions, Error, Host, Manifest, Plugin, PluginState, Trust};
use serde_json::json;

/// Settings for one run.
pub struct Settings {
    pub plugins: PathBuf,
    pub calls: u64,
    pub instances: u32,
    pub fault_rate: f64,
    pub concurrency: u32,
    pub seed: u64,
    /// The attack plugin's library (`plugins/attack/attack.c` compiled), for the setsid
    /// grandchild fault; without it that fault is skipped.
    pub attack: Option<PathBuf>,
    /// Largest growth of the host's peak resident memory (VmHWM) allowed, in MiB.
    pub max_rss_growth_mib: u64,
}

/// xorshift64*: small, seedable, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

const FAULTS: &[&str] = &[
    "abort",
    "segfault",
    "exit",
    "panic",
    "stack_overflow",
    "infinite_loop",
    "wire",
    "stderr_flood",
    "huge_log",
    "bogus_output",
    "setsid",
];

/// Sizes of a stderr flood.
const FLOOD_BYTES: &[u64] = &[64 << 10, 1 << 20, 8 << 20, 32 << 20];
/// Sizes of a huge log message (the last is past the default 64 MiB frame limit).
const LOG_BYTES: &[u64] = &[100 << 10, 4 << 20, 70 << 20];
/// Lengths an output buffer claims to have.
const BOGUS_LENGTHS: &[u64] = &[
    u64::MAX,
    u64::MAX - 15,
    u64::MAX - 1023,
    u64::MAX / 2,
    1 << 40,
];

#[derive(Clone)]
enum Job {
    Echo(Vec<u8>),
    Sleep(u64),
    /// A fault and a random parameter (sizes, flags) drawn with the jobs.
    Fault(&'static str, u64),
}

/// What the setsid fault observed.
#[derive(Default)]
struct Setsid {
    spawned: u64,
    /// Time from killing the worker to its crash being counted, per fault.
    detection: Vec<Duration>,
}

#[derive(Default)]
struct Tally {
    answered: HashMap<u64, u32>,
    ok: u64,
    fault_errors: u64,
    collateral: u64,
    /// Setsid faults drawn without an attack plugin to run them.
    skipped: u64,
    unexpected: Vec<String>,
    /// Faults per kind: answered with the fault's own outcome, and taken down with their
    /// worker by another fault (`Crashed` or `Killed` where the fault itself does not crash).
    per_fault: HashMap<&'static str, (u64, u64)>,
}

fn children() -> usize {
    #[cfg(target_os = "linux")]
    {
        let me = std::process::id().to_string();
        return std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .ok()
                            .and_then(|s| {
                                s.rsplit_once(')')
                                    .map(|(_, r)| r.split_whitespace().nth(1) == Some(&me))
                            })
                            .unwrap_or(false)
                    })
                    .count()
            })
            .unwrap_or(0);
    }
    #[allow(unreachable_code)]
    0
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Processes the setsid fault left (named `orph-sk…`), wherever they are.
fn orphans() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("orph-sk"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// A size from `/proc/self/status` (`VmRSS:`, `VmHWM:`), in bytes.
fn memory_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The attack plugin, for the setsid fault: its library at `library`, untrusted, restarted
/// at once after each kill.
fn load_attack(host: &Host, library: &std::path::Path) -> Result<Plugin, String> {
    let library = std::fs::canonicalize(library).map_err(|e| e.to_string())?;
    let text = format!(
        "name = \"attack-soak\"\nversion = \"1.0.0\"\nlibrary = {:?}\napi = \"^1\"\n",
        library.to_string_lossy()
    );
    let mut m = Manifest::parse(&text, "attack-soak.plugin.toml").map_err(|e| e.to_string())?;
    m.trust = Trust::Untrusted;
    m.restart.max_crashes = u32::MAX;
    m.restart.backoff = Duration::from_millis(5);
    m.restart.backoff_max = Duration::from_millis(50);
    smol::block_on(host.load_manifest(m)).map_err(|e| e.to_string())
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// The setsid fault on the attack plugin: a grandchild that leaves the worker's session and
/// keeps its stderr open, then the worker killed from outside. One at a time (the kill
/// would take down another one's call).
async fn setsid_fault(
    attack: &Plugin,
    n: u64,
    lock: &async_channel::Sender<()>,
    unlock: &async_channel::Receiver<()>,
    setsid: &Mutex<Setsid>,
) -> Result<(), Result<Error, String>> {
    let _ = lock.send(()).await;
    let result = async {
        let tag = format!("sk{n}");
        let out = attack
            .call_raw("spawn_orphan_stderr", tag.into_bytes())
            .await
            .map_err(Ok)?;
        let out = String::from_utf8_lossy(&out).into_owned();
        if !out.starts_with("ok") {
            return Err(Err(format!("spawn_orphan_stderr: {out}")));
        }
        setsid.lock().unwrap().spawned += 1;
        let crashes = attack.status().crashes;
        let Some(pid) = attack.worker_pid() else {
            return Err(Err("the attack plugin has no worker".into()));
        };
        let killed = Instant::now();
        // SAFETY: kill(2) on a pid; at worst the pid is gone already.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        if !wait_until(Duration::from_secs(10), || {
            attack.status().crashes > crashes
        }) {
            return Err(Err(
                "the worker killed after a setsid grandchild: crash not noticed in 10 s".into(),
            ));
        }
        let took = killed.elapsed();
        setsid.lock().unwrap().detection.push(took);
        if took > Duration::from_secs(1) {
            return Err(Err(format!(
                "the worker killed after a setsid grandchild: crash noticed after {took:?}"
            )));
        }
        // The next call is served by a new worker.
        match attack.call_raw("ping", Vec::new()).await {
            Ok(out) if out == b"pong" => Ok(()),
            Ok(out) => Err(Err(format!(
                "ping after the restart: {}",
                String::from_utf8_lossy(&out)
            ))),
            Err(e) => Err(Ok(e)),
        }
    }
    .await;
    let _ = unlock.recv().await;
    result
}

/// A worker crash or kill: another fault on the same worker may cause it first.
fn taken_down(e: &Error) -> bool {
    matches!(
        e,
        Error::Call(CallError::Crashed { .. } | CallError::Killed { .. })
    )
}

async fn run_job(plugin: &Plugin, job: &Job) -> Result<(), Result<Error, String>> {
    match job {
        Job::Echo(bytes) => match plugin.call_raw("echo", bytes.clone()).await {
            Ok(out) if out == *bytes => Ok(()),
            Ok(_) => Err(Err("echo returned different bytes".into())),
            Err(e) => Err(Ok(e)),
        },
        Job::Sleep(ms) => match plugin.call::<_, u64>("sleep", &json!({ "ms": ms })).await {
            Ok(n) if n == *ms => Ok(()),
            Ok(n) => Err(Err(format!("sleep returned {n}, expected {ms}"))),
            Err(e) => Err(Ok(e)),
        },
        Job::Fault("stderr_flood", p) => {
            let bytes = FLOOD_BYTES[(*p % FLOOD_BYTES.len() as u64) as usize];
            let (newline, abort) = ((p >> 8) & 1 == 1, (p >> 9) & 1 == 1);
            let input = json!({"bytes": bytes, "newline": newline, "abort": abort});
            match plugin.call::<_, u64>("stderr_flood", &input).await {
                Ok(n) if n == bytes && !abort => Ok(()),
                Ok(n) => Err(Err(format!("stderr_flood returned {n} (abort: {abort})"))),
                Err(e) if abort || taken_down(&e) => Err(Ok(e)),
                Err(e) => Err(Err(format!("stderr_flood of {bytes} bytes: {e}"))),
            }
        }
        Job::Fault("huge_log", p) => {
            let bytes = LOG_BYTES[(*p % LOG_BYTES.len() as u64) as usize];
            let input = json!({"bytes": bytes, "progress": (p >> 8) & 1 == 1});
            let options = CallOptions::new().on_progress(|_| {});
            match plugin
                .call_with::<_, u64>("huge_log", &input, options)
                .await
            {
                Ok(n) if n == bytes => Ok(()),
                Ok(n) => Err(Err(format!("huge_log returned {n}, expected {bytes}"))),
                Err(e) if taken_down(&e) => Err(Ok(e)),
                Err(e) => Err(Err(format!("huge_log of {bytes} bytes: {e}"))),
            }
        }
        Job::Fault("bogus_output", p) => {
            let len = BOGUS_LENGTHS[(*p % BOGUS_LENGTHS.len() as u64) as usize];
            match plugin
                .call::<_, serde_json::Value>("bogus_output", &json!({ "len": len }))
                .await
            {
                Err(Error::Call(CallError::BadOutput { .. })) => Ok(()),
                Ok(_) => Err(Err(format!("bogus_output claiming {len} bytes succeeded"))),
                Err(e) if taken_down(&e) => Err(Ok(e)),
                Err(e) => Err(Err(format!("bogus_output claiming {len} bytes: {e}"))),
            }
        }
        Job::Fault(method, _) => {
            let input = match *method {
                "exit" => json!({"code": 7}),
                "wire" => json!({"mode": "garbage"}),
                "panic" => json!({"message": "soak"}),
                _ => json!(null),
            };
            // Only the endless loop needs a short deadline; the others end by themselves.
            let mut options = CallOptions::new();
            if *method == "infinite_loop" {
                options = options.timeout(Duration::from_millis(200));
            }
            match plugin
                .call_with::<_, serde_json::Value>(method, &input, options)
                .await
            {
                Ok(_) => Err(Err(format!("fault `{method}` succeeded"))),
                Err(e) => Err(Ok(e)),
            }
        }
    }
}

/// Classifies one outcome; returns a description if it is not an outcome the run allows.
fn classify(job: &Job, result: Result<(), Result<Error, String>>, tally: &mut Tally) {
    match (job, result) {
        (Job::Fault(method, _), Ok(())) => {
            // A fault answered as it should without an error (a flood, a huge log, a lying
            // output length refused as BadOutput, a setsid grandchild survived).
            tally.fault_errors += 1;
            tally.per_fault.entry(method).or_default().0 += 1;
        }
        (_, Ok(())) => tally.ok += 1,
        (_, Err(Err(wrong))) => tally.unexpected.push(wrong),
        (Job::Fault(method, _), Err(Ok(e))) => {
            let own = matches!(
                (*method, &e),
                ("panic", Error::Call(CallError::Panicked { .. }))
                    | ("infinite_loop", Error::Call(CallError::Timeout { .. }))
                    | (
                        "abort" | "segfault" | "exit" | "stack_overflow" | "wire" | "stderr_flood",
                        Error::Call(CallError::Crashed { .. }),
                    )
            );
            let expected = match (*method, &e) {
                ("panic", Error::Call(CallError::Panicked { .. })) => true,
                ("infinite_loop", Error::Call(CallError::Timeout { .. })) => true,
                // Another fault may take the worker down first.
                (_, Error::Call(CallError::Crashed { .. } | CallError::Killed { .. })) => true,
                _ => false,
            };
            if expected {
                tally.fault_errors += 1;
                let entry = tally.per_fault.entry(method).or_default();
                if own {
                    entry.0 += 1;
                } else {
                    entry.1 += 1;
                }
            } else {
                tally.unexpected.push(format!("fault `{method}`: {e}"));
            }
        }
        (_, Err(Ok(Error::Call(CallError::Crashed { .. } | CallError::Killed { .. })))) => {
            tally.collateral += 1
        }
        (_, Err(Ok(e))) => tally.unexpected.push(format!("innocent call: {e}")),
    }
}

pub fn run(settings: &Settings, host: &Host) -> ExitCode {
    let started = Instant::now();
    let manifest_path = settings.plugins.join("faulty/plugin.toml");
    // Warm up the runtime's long-lived threads and descriptors before counting.
    if let Ok(m) = Manifest::from_file(&manifest_path) {
        if let Ok(p) = smol::block_on(host.load_manifest(m)) {
            let _ = smol::block_on(p.call_raw("echo", vec![1]));
            smol::block_on(p.shutdown());
        }
    }
    wait_until(Duration::from_secs(5), || children() == 0);
    let fds_before = open_fds();
    let orphans_before = orphans();
    // Peak memory from here on: reset the high-water mark to the current resident size.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = memory_field("VmRSS:");
    let mut plugins = Vec::new();
    for i in 0..settings.instances {
        let mut m = match Manifest::from_file(&manifest_path) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(3);
            }
        };
        m.name = format!("faulty-{i}");
        m.trust = Trust::Untrusted;
        m.limits.concurrency = 8;
        m.timeouts.call = Duration::from_secs(20);
        m.timeouts.cancel_grace = Duration::from_millis(200);
        m.restart.max_crashes = u32::MAX;
        m.restart.backoff = Duration::from_millis(5);
        m.restart.backoff_max = Duration::from_millis(50);
        match smol::block_on(host.load_manifest(m)) {
            Ok(p) => plugins.push(p),
            Err(e) => {
                crate::report::print(&e, Some(&manifest_path));
                return ExitCode::from(4);
            }
        }
    }

    let attack = match &settings.attack {
        Some(library) => match load_attack(host, library) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("error: the attack plugin ({}): {e}", library.display());
                return ExitCode::from(4);
            }
        },
        None => None,
    };

    // The point of the soak is the default: untrusted workers in the sandbox.
    let sandbox = plugins
        .first()
        .map(|p| {
            let s = p.status();
            match s.sandbox.is_empty() {
                true => "off".to_string(),
                false => format!("{} layers ({})", s.sandbox.len(), s.sandbox.join(", ")),
            }
        })
        .unwrap_or_default();

    let mut rng = Rng(settings.seed.max(1));
    let jobs: Vec<(usize, Job)> = (0..settings.calls)
        .map(|_| {
            let target = (rng.next() % plugins.len() as u64) as usize;
            let job = if rng.unit() < settings.fault_rate {
                let fault = FAULTS[(rng.next() % FAULTS.len() as u64) as usize];
                Job::Fault(fault, rng.next())
            } else if rng.next().is_multiple_of(4) {
                Job::Sleep(rng.next() % 5)
            } else {
                let len = (rng.next() % 2048) as usize;
                Job::Echo((0..len).map(|i| (i as u64 ^ rng.next()) as u8).collect())
            };
            (target, job)
        })
        .collect();
    let faults = jobs
        .iter()
        .filter(|(_, j)| matches!(j, Job::Fault(..)))
        .count();
    let mut injected: HashMap<&'static str, u64> = HashMap::new();
    for (_, job) in jobs.iter() {
        if let Job::Fault(kind, _) = job {
            *injected.entry(kind).or_default() += 1;
        }
    }
    let setsid = Arc::new(Mutex::new(Setsid::default()));
    // One setsid fault at a time (a capacity-1 channel as a lock).
    let (setsid_lock, setsid_unlock) = async_channel::bounded::<()>(1);
    let jobs = Arc::new(jobs);
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));

    let ex = smol::Executor::new();
    let workers: Vec<_> = (0..settings.concurrency)
        .map(|_| {
            let (jobs, next, tally, plugins) =
                (jobs.clone(), next.clone(), tally.clone(), plugins.clone());
            let (attack, setsid, setsid_lock, setsid_unlock) = (
                attack.clone(),
                setsid.clone(),
                setsid_lock.clone(),
                setsid_unlock.clone(),
            );
            ex.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((target, job)) = jobs.get(i as usize) else {
                        return;
                    };
                    let result = match (job, &attack) {
                        (Job::Fault("setsid", _), None) => {
                            // No attack plugin: skipped (answered, counted apart).
                            let mut t = tally.lock().unwrap();
                            *t.answered.entry(i).or_default() += 1;
                            t.skipped += 1;
                            continue;
                        }
                        (Job::Fault("setsid", _), Some(attack)) => {
                            setsid_fault(attack, i, &setsid_lock, &setsid_unlock, &setsid).await
                        }
                        _ => run_job(&plugins[*target], job).await,
                    };
                    let mut t = tally.lock().unwrap();
                    *t.answered.entry(i).or_default() += 1;
                    classify(job, result, &mut t);
                }
            })
        })
        .collect();
    smol::block_on(ex.run(async {
        for w in workers {
            w.await;
        }
    }));
    let calls_done = started.elapsed();
    let rss_peak_calls = memory_field("VmHWM:");

    // Let the supervisors finish restarting, then compare.
    let supervised: Vec<Plugin> = plugins.iter().chain(attack.iter()).cloned().collect();
    let settled = wait_until(Duration::from_secs(30), || {
        supervised.iter().all(|p| {
            let s = p.status();
            s.state == PluginState::Ready && s.restarts == s.crashes
        })
    });
    let (crashes, restarts) = supervised.iter().fold((0, 0), |(c, r), p| {
        let s = p.status();
        (c + s.crashes, r + s.restarts)
    });
    for p in &supervised {
        smol::block_on(p.shutdown());
    }
    drop(supervised);
    drop(plugins);
    drop(attack);
    let reaped = wait_until(Duration::from_secs(10), || children() == 0);
    let fds_back = wait_until(Duration::from_secs(5), || open_fds() <= fds_before);
    // Every grandchild ends with its worker, however it detached.
    let no_orphans = wait_until(Duration::from_secs(5), || orphans() <= orphans_before);
    let orphans_left = orphans().saturating_sub(orphans_before);
    let rss_peak = memory_field("VmHWM:");
    let growth_mib = rss_peak.saturating_sub(rss_before) as f64 / (1 << 20) as f64;
    let memory_ok = growth_mib < settings.max_rss_growth_mib as f64;

    let tally = tally.lock().unwrap();
    let answered_once = (0..settings.calls).all(|i| tally.answered.get(&i) == Some(&1));
    println!(
        "plugin-host soak: {} calls over {} plugins, {} concurrent, {} faults injected (seed {})",
        settings.calls, settings.instances, settings.concurrency, faults, settings.seed
    );
    println!(
        "  answered:          {} of {} (each exactly once: {answered_once})",
        tally.answered.len(),
        settings.calls
    );
    println!("  sandbox:           {sandbox}");
    println!("  ok:                {}", tally.ok);
    if tally.skipped > 0 {
        println!(
            "  skipped:           {} setsid faults (no --attack library)",
            tally.skipped
        );
    }
    println!(
        "  fault outcomes:    {} (the injected faults, each answered as expected)",
        tally.fault_errors
    );
    let mut kinds: Vec<_> = injected.iter().collect();
    kinds.sort();
    for (kind, n) in kinds {
        let (own, taken) = tally.per_fault.get(kind).copied().unwrap_or_default();
        let note = match *kind {
            "setsid" if settings.attack.is_none() => {
                " (skipped: needs --attack, the C attack plugin; faulty has no setsid method)"
                    .to_string()
            }
            "setsid" => {
                let s = setsid.lock().unwrap();
                let max = s.detection.iter().max().copied().unwrap_or_default();
                let mean = s.detection.iter().sum::<Duration>() / s.detection.len().max(1) as u32;
                format!(
                    " ({} grandchildren spawned; worker killed after each, crash noticed in \
                     {mean:.0?} on average, {max:.0?} at most)",
                    s.spawned
                )
            }
            _ => String::new(),
        };
        println!(
            "    {kind:<16} {n:>4} injected, {own:>4} own outcome, {taken:>4} taken down by another{note}"
        );
    }
    println!(
        "  collateral:        {} (innocent calls on a worker that a fault took down)",
        tally.collateral
    );
    println!("  unexpected:        {}", tally.unexpected.len());
    for u in tally.unexpected.iter().take(10) {
        println!("    {u}");
    }
    println!("  crashes/restarts:  {crashes}/{restarts} (settled: {settled})");
    println!(
        "  leaks:             children reaped: {reaped}; fds back to {fds_before}: {fds_back}; \
         setsid grandchildren left: {orphans_left}"
    );
    println!(
        "  host memory:       peak RSS +{growth_mib:.1} MiB over the run (VmRSS {:.1} MiB before, \
         VmHWM {:.1} MiB after the calls, {:.1} MiB at the end; budget {} MiB)",
        rss_before as f64 / (1 << 20) as f64,
        rss_peak_calls as f64 / (1 << 20) as f64,
        rss_peak as f64 / (1 << 20) as f64,
        settings.max_rss_growth_mib
    );
    println!(
        "  time:              {:.2?} for the calls, {:.2?} in all",
        calls_done,
        started.elapsed()
    );
    let ok = answered_once
        && tally.answered.len() as u64 == settings.calls
        && tally.unexpected.is_empty()
        && settled
        && crashes == restarts
        && reaped
        && fds_back
        && no_orphans
        && memory_ok;
    println!("{}", if ok { "soak passed" } else { "SOAK FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(9)
    }
}
