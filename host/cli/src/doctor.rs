//! `plugin-host doctor`: what this system offers the sandbox, and what an untrusted plugin
//! with the default policy (sandbox required, no permissions) gets here.
//!
//! Exit 0 when the default policy can be enforced (no layer missing), 10 when it cannot
//! (untrusted plugins then fail to load unless the app grants `sandbox = "best-effort"`).

use std::process::ExitCode;

use plugin_host::sandbox::SystemSupport;

/// The exit code when a layer the default policy requires is missing.
pub const EXIT_MISSING: u8 = 10;

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn landlock(abi: i32) -> String {
    match abi {
        0 => "not available (needs Linux 5.13+ with Landlock in the `lsm=` list)".into(),
        1..=3 => {
            format!("ABI {abi}: filesystem rules; no network rules (ABI 4), no scopes (ABI 6)")
        }
        4 | 5 => format!("ABI {abi}: filesystem and network rules; no scopes (ABI 6)"),
        _ => format!("ABI {abi}: filesystem and network rules, scopes (signals, abstract sockets)"),
    }
}

fn yama(scope: Option<u32>) -> String {
    match scope {
        None => "not active (the worker's not-dumpable flag and seccomp still stop ptrace)".into(),
        Some(0) => "0 (classic: a process may ptrace any same-user process it could signal)".into(),
        Some(1) => "1 (restricted: only ancestors may ptrace)".into(),
        Some(2) => "2 (admin only: ptrace needs CAP_SYS_PTRACE)".into(),
        Some(3) => "3 (no ptrace at all)".into(),
        Some(n) => format!("{n}"),
    }
}

fn root(is_root: bool) -> &'static str {
    if is_root {
        "yes: the kernel does not count root's tasks, so workers get no task limit \
         (RLIMIT_NPROC, the fork-bomb guard); run as an ordinary user to have it"
    } else {
        "no"
    }
}

/// Runs the doctor.
pub fn run(json: bool) -> ExitCode {
    let support = SystemSupport::detect();
    let (enforced, missing) = support.layers();
    let ok = missing.is_empty();
    if json {
        let value = serde_json::json!({
            "kernel": support.kernel,
            "landlock_abi": support.landlock_abi,
            "seccomp": support.seccomp,
            "no_new_privs": support.no_new_privs,
            "user_namespace": support.user_namespace,
            "pid_namespace": support.pid_namespace,
            "ipc_namespace": support.ipc_namespace,
            "network_namespace": support.network_namespace,
            "yama_ptrace_scope": support.yama_ptrace_scope,
            "root": support.root,
            "task_limit": !support.root,
            "layers": {
                "enforced": enforced,
                "missing": missing
                    .iter()
                    .map(|(layer, why)| serde_json::json!({"layer": layer, "why": why}))
                    .collect::<Vec<_>>(),
            },
            "default_policy_enforceable": ok,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        println!("plugin-host doctor: what this system offers the sandbox\n");
        println!("kernel:             {}", support.kernel);
        println!("landlock:           {}", landlock(support.landlock_abi));
        println!("seccomp:            {}", yes(support.seccomp));
        println!("no_new_privs:       {}", yes(support.no_new_privs));
        println!("user namespace:     {}", yes(support.user_namespace));
        println!("pid namespace:      {}", yes(support.pid_namespace));
        println!("ipc namespace:      {}", yes(support.ipc_namespace));
        println!(
            "network namespace:  {} (not used: without the network grant no socket can be created)",
            yes(support.network_namespace)
        );
        println!("yama ptrace_scope:  {}", yama(support.yama_ptrace_scope));
        println!("running as root:    {}", root(support.root));
        println!(
            "\nan untrusted plugin with the default policy (sandbox required, no permissions) gets:"
        );
        for layer in &enforced {
            println!("  enforced  {layer}");
        }
        for (layer, why) in &missing {
            println!("  MISSING   {layer}: {why}");
        }
        // Not one of the required layers (a resource limit, not a boundary), but the worker
        // reports it, so say whether it will be there.
        if support.root {
            println!("  (absent)  task limit: not counted for root (not a required layer)");
        } else {
            println!("  enforced  task limit (RLIMIT_NPROC; not a required layer)");
        }
        println!();
        if ok {
            println!(
                "ok: the default policy can be enforced here; untrusted plugins load with every layer"
            );
        } else {
            println!(
                "NOT ENFORCEABLE: {} layer(s) missing; untrusted plugins fail to load with the \
                 default policy (sandbox required) unless the app grants sandbox = \"best-effort\" \
                 (with plugin-host: --grant, for a manifest that requests it)",
                missing.len()
            );
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_MISSING)
    }
}
