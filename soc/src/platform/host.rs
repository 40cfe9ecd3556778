//! Host mode: leapd is a process on the machine whose guests it serves; guest memory arrives as
//! vhost-user memory-table file descriptors and is mapped into this process.

use super::Platform;

/// A plain host process.
pub struct Host;

impl Platform for Host {
    fn name(&self) -> &'static str {
        "host"
    }
}

/// The CPUs this process may run on (cgroups and taskset respected).
pub(super) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data, filled in by sched_getaffinity for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = 8 * std::mem::size_of::<libc::cpu_set_t>();
            let v: Vec<usize> = (0..n).filter(|&c| libc::CPU_ISSET(c, &set)).collect();
            if !v.is_empty() {
                return v;
            }
        }
    }
    (0..std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1))
        .collect()
}

/// sysfs links each CPU to its node: /sys/devices/system/cpu/cpuN/nodeM.
pub(super) fn numa_node_of(cpu: usize) -> Option<usize> {
    std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}"))
        .ok()?
        .flatten()
        .find_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
}
