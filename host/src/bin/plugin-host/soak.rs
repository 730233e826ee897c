//! `plugin-host soak`: a bounded chaos run. Thousands of concurrent calls over several
//! plugins, with faults injected at random; then it checks that every call was answered
//! exactly once, that restarts match crashes, and that no process or descriptor leaked.

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
];

#[derive(Clone)]
enum Job {
    Echo(Vec<u8>),
    Sleep(u64),
    Fault(&'static str),
}

#[derive(Default)]
struct Tally {
    answered: HashMap<u64, u32>,
    ok: u64,
    fault_errors: u64,
    collateral: u64,
    unexpected: Vec<String>,
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
        Job::Fault(method) => {
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
        (_, Ok(())) => tally.ok += 1,
        (_, Err(Err(wrong))) => tally.unexpected.push(wrong),
        (Job::Fault(method), Err(Ok(e))) => {
            let expected = match (*method, &e) {
                ("panic", Error::Call(CallError::Panicked { .. })) => true,
                ("infinite_loop", Error::Call(CallError::Timeout { .. })) => true,
                // Another fault may take the worker down first.
                (_, Error::Call(CallError::Crashed { .. } | CallError::Killed { .. })) => true,
                _ => false,
            };
            if expected {
                tally.fault_errors += 1;
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
                eprintln!("error: {e}");
                return ExitCode::from(4);
            }
        }
    }

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
                Job::Fault(FAULTS[(rng.next() % FAULTS.len() as u64) as usize])
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
        .filter(|(_, j)| matches!(j, Job::Fault(_)))
        .count();
    let jobs = Arc::new(jobs);
    let next = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));

    let ex = smol::Executor::new();
    let workers: Vec<_> = (0..settings.concurrency)
        .map(|_| {
            let (jobs, next, tally, plugins) =
                (jobs.clone(), next.clone(), tally.clone(), plugins.clone());
            ex.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((target, job)) = jobs.get(i as usize) else {
                        return;
                    };
                    let result = run_job(&plugins[*target], job).await;
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

    // Let the supervisors finish restarting, then compare.
    let settled = wait_until(Duration::from_secs(30), || {
        plugins.iter().all(|p| {
            let s = p.status();
            s.state == PluginState::Ready && s.restarts == s.crashes
        })
    });
    let (crashes, restarts) = plugins.iter().fold((0, 0), |(c, r), p| {
        let s = p.status();
        (c + s.crashes, r + s.restarts)
    });
    for p in &plugins {
        smol::block_on(p.shutdown());
    }
    drop(plugins);
    let reaped = wait_until(Duration::from_secs(10), || children() == 0);
    let fds_back = wait_until(Duration::from_secs(5), || open_fds() <= fds_before);

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
    println!(
        "  fault errors:      {} (the injected faults, each with its expected kind)",
        tally.fault_errors
    );
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
        "  leaks:             children reaped: {reaped}; fds back to {fds_before}: {fds_back}"
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
        && fds_back;
    println!("{}", if ok { "soak passed" } else { "SOAK FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(9)
    }
}
