//! Process hardening both servers apply at start: no core dumps (a dump would write
//! key material and card data to disk), not dumpable (no ptrace attach or
//! /proc/<pid>/mem reads by other processes of the same user), and all memory locked
//! so that nothing is ever written to swap.
//!
//! Why lock everything rather than only the pages of `SecretKey`: data keys are not
//! the only secrets in a server's memory. The vault holds card numbers in request
//! buffers (hyper, prost, rustls), in decrypted records while it renders a forward,
//! and CVCs for up to an hour; the keyservice holds the root key and every key
//! version while it seals the keyring. Only `mlockall` covers buffers that libraries
//! allocate. The cost is that the whole working set, RocksDB's block cache and
//! memtables included, stays resident: size them to fit the host's memory
//! (docs/operations.md, "Memory locking").

use serde::Deserialize;

/// `[memory]` in both servers' configs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemorySettings {
    /// Refuse to start unless all memory could be locked (`mlockall`). When false (the
    /// default), a server that cannot lock its memory warns at start and runs.
    #[serde(default)]
    pub require_lock: bool,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "memory could not be locked against swapping ({reason}), and [memory] require_lock = \
     true requires it"
)]
pub struct MemoryLockError {
    reason: String,
}

/// Applies what the platform allows and logs what it could not.
pub fn harden_process() {
    #[cfg(target_os = "linux")]
    {
        use nix::sys::resource::{Resource, setrlimit};
        if let Err(e) = setrlimit(Resource::RLIMIT_CORE, 0, 0) {
            tracing::warn!(error = %e, "could not disable core dumps");
        }
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            tracing::warn!(error = %e, "could not mark the process non-dumpable");
        }
    }
}

/// Locks all current and future memory of the process (`mlockall`), so that key
/// material and card data never reach a swap device. When that is not possible it
/// warns, or, with `require_lock`, fails.
///
/// It locks only when nothing can run into the locked-memory limit: with
/// `RLIMIT_MEMLOCK` unlimited or with `CAP_IPC_LOCK`. Under a finite limit, a process
/// whose future mappings are all locked gets allocation failures (and aborts) the
/// moment it grows past the limit, which is worse than not locking. Pages are locked
/// as they are first touched (`MCL_ONFAULT`), so reserved but unused address space
/// (thread stacks, allocator arenas) costs no memory.
pub fn lock_memory(settings: &MemorySettings) -> Result<(), MemoryLockError> {
    match try_lock_memory() {
        Ok(()) => {
            tracing::info!("memory locked: key material and card data are never swapped out");
            Ok(())
        }
        Err(reason) if settings.require_lock => Err(MemoryLockError { reason }),
        Err(reason) => {
            tracing::warn!(
                %reason,
                "memory NOT locked: key material or card data could be written to swap; \
                 see docs/operations.md, \"Memory locking\" ([memory] require_lock = true \
                 makes this fatal)"
            );
            Ok(())
        }
    }
}

#[cfg(target_os = "linux")]
fn try_lock_memory() -> Result<(), String> {
    use nix::errno::Errno;
    use nix::libc::RLIM_INFINITY;
    use nix::sys::mman::{MlockAllFlags, mlockall};
    use nix::sys::resource::{Resource, getrlimit, setrlimit};

    let (mut soft, hard) =
        getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| format!("getrlimit: {e}"))?;
    if soft != hard && setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard).is_ok() {
        soft = hard;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if soft != RLIM_INFINITY && !has_capability(&status, CAP_IPC_LOCK) {
        return Err(format!(
            "RLIMIT_MEMLOCK is {soft} bytes and the process lacks CAP_IPC_LOCK; set \
             LimitMEMLOCK=infinity in the systemd unit (or `ulimit -l unlimited`)"
        ));
    }
    let all = MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE;
    let on_fault = MlockAllFlags::from_bits_retain(nix::libc::MCL_ONFAULT);
    match mlockall(all | on_fault) {
        // Kernels before 4.4 know no MCL_ONFAULT: lock everything at once.
        Err(Errno::EINVAL) => mlockall(all),
        other => other,
    }
    .map_err(|e| format!("mlockall: {e}"))
}

#[cfg(not(target_os = "linux"))]
fn try_lock_memory() -> Result<(), String> {
    Err("memory locking is implemented for Linux only".into())
}

/// `CAP_IPC_LOCK` (linux/capability.h): lock memory beyond `RLIMIT_MEMLOCK`.
#[cfg(target_os = "linux")]
const CAP_IPC_LOCK: u32 = 14;

/// Whether the effective capability set in a `/proc/<pid>/status` text holds `cap`.
#[cfg(target_os = "linux")]
fn has_capability(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|effective| effective & (1 << cap) != 0)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_effective_capability_set_is_read_from_proc_status() {
        let status = "Name:\tkeyservice\nCapInh:\t0000000000000000\nCapPrm:\t0000000000004000\n\
                      CapEff:\t0000000000004000\n";
        assert!(has_capability(status, CAP_IPC_LOCK));
        assert!(!has_capability(
            &status.replace("CapEff:\t0000000000004000", "CapEff:\t0000000000000000"),
            CAP_IPC_LOCK
        ));
        assert!(!has_capability("", CAP_IPC_LOCK));
        assert!(has_capability("CapEff:\t000001ffffffffff\n", CAP_IPC_LOCK));
    }
}
