//! Where leapd runs. Deployment modes (host process, SoCvm, ARM SmartNIC SoC) differ in how they
//! see host memory, their page size and their cores; they share one trait so the rest of leapd is
//! mode-agnostic. Each mode lives in its own module (a `sys/`-style seam). Only the host mode
//! exists so far.

mod host;

pub use host::Host;

/// A deployment mode.
pub trait Platform {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The CPU page size, read at run time (4, 16 or 64 KiB on arm64).
    fn page_size(&self) -> usize;
    /// CPUs leapd may run pollers on, in order of preference.
    fn poller_cpus(&self) -> Vec<usize>;
    /// The NUMA node of `cpu`, if the platform knows it.
    fn numa_node(&self, cpu: usize) -> Option<usize>;
}

/// The platform leapd is running on.
pub fn detect() -> Box<dyn Platform> {
    Box::new(Host)
}
