//! SIGINT/SIGTERM handling: the signals are blocked in every thread (the mask is inherited, so
//! block them before starting any) and taken synchronously by one thread with sigwait.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it starts afterwards.
pub fn block_termination() -> Result<SigSet, String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| format!("cannot block signals: {e}"))?;
    Ok(set)
}

/// Runs `f` on the first SIGINT or SIGTERM, from a dedicated thread. A signal that arrives more
/// than two seconds later (the user insisting; duplicates sent to the whole process group arrive
/// at once and are ignored) exits without waiting for the clean stop.
pub fn on_termination(
    set: SigSet,
    f: impl FnOnce(Signal) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("leap-signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                let first = std::time::Instant::now();
                f(sig);
                while set.wait().is_ok() {
                    if first.elapsed() > std::time::Duration::from_secs(2) {
                        eprintln!(
                            "leapd: second signal, exiting without waiting for in-flight I/O"
                        );
                        std::process::exit(130);
                    }
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))
}
