//! Process hardening both servers apply at start: no core dumps (a dump would write
//! key material and card data to disk), and not dumpable (no ptrace attach or
//! /proc/<pid>/mem reads by other processes of the same user).

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
