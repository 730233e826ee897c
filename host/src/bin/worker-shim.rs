//! `worker-shim`: the generic worker process that runs one untrusted plugin for
//! plugin-host. The host starts it; see `plugin_host::worker`.

fn main() -> std::process::ExitCode {
    plugin_host::worker::main()
}
