//! How frames travel between the host and an untrusted plugin's worker.

/// Environment variable that picks the transport for every host that does not set one
/// with [`HostBuilder::transport`](crate::HostBuilder::transport): `shm` or `socket`.
pub const TRANSPORT_ENV: &str = "PLUGIN_HOST_TRANSPORT";

/// The transport between the host and a worker, after the handshake (which always uses
/// the socket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// Shared memory where both sides support it (Linux), else the socket. The default.
    ///
    /// Frames go through two rings in a sealed memory region private to the worker; the
    /// socket stays for the handshake, as the doorbell that wakes a sleeping side, and to
    /// see the worker die. A small call costs a fraction of a socket round trip, and a
    /// large payload crosses with one copy on each side.
    SharedMemory,
    /// The socket for everything: for comparison, or where shared memory is unwanted.
    Socket,
}

impl Transport {
    /// The transport [`TRANSPORT_ENV`] names, if it is set to `shm` or `socket`.
    pub fn from_env() -> Option<Transport> {
        match std::env::var(TRANSPORT_ENV).ok()?.trim() {
            "shm" | "shared-memory" => Some(Transport::SharedMemory),
            "socket" => Some(Transport::Socket),
            _ => None,
        }
    }

    /// Its short name: `shm` or `socket`.
    pub fn name(self) -> &'static str {
        match self {
            Transport::SharedMemory => "shm",
            Transport::Socket => "socket",
        }
    }
}
