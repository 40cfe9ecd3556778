//! Where leapd runs. Deployment modes differ in how they see host memory, their page size and
//! their cores; they share one trait so the rest of leapd is mode-agnostic, and each lives in its
//! own module (a `sys/`-style seam):
//!
//! - `host`: a process on the host; guest memory comes as vhost-user file descriptors.
//! - `socvm`: an x86 VM beside the tenants; guest memory through a window (ivshmem BAR).
//! - `arm-soc`: a SmartNIC's ARM cores; guest memory through a PCIe BAR (device memory).
//!
//! In the two SoC modes a host agent (`leapd agent`) terminates vhost-user and relays only
//! control; leapd serves the rings through the windows.

mod armsoc;
mod host;
mod socvm;
pub mod windows;

pub use armsoc::ArmSoc;
pub use host::Host;
pub use socvm::SocVm;
use std::path::{Path, PathBuf};
use windows::Source;

/// A deployment mode.
pub trait Platform {
    /// Short name for logs.
    fn name(&self) -> &'static str;
    /// The CPU page size, read at run time (4, 16 or 64 KiB on arm64).
    fn page_size(&self) -> usize {
        leap_runtime::mem::page_size()
    }
    /// CPUs leapd may run pollers on, in order of preference: those this process may run on.
    fn poller_cpus(&self) -> Vec<usize> {
        host::allowed_cpus()
    }
    /// The NUMA node of `cpu`, if the platform knows it (Linux's sysfs).
    fn numa_node(&self, cpu: usize) -> Option<usize> {
        host::numa_node_of(cpu)
    }
    /// Windows onto host memory through which guest memory is reached; empty when guest memory
    /// is mapped from vhost-user's file descriptors (host mode).
    fn windows(&self) -> &[Source] {
        &[]
    }
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A process on the host, serving vhost-user itself.
    Host,
    /// In an x86 SoC VM, behind a host agent, through a window onto host memory.
    Socvm,
    /// On a SmartNIC's ARM cores, behind a host agent, through a PCIe BAR.
    ArmSoc,
    /// A SoC mode if a window onto host memory is there (arm-soc on aarch64, socvm elsewhere),
    /// else host.
    Auto,
}

/// Where ivshmem devices are looked for.
const PCI_DEVICES: &str = "/sys/bus/pci/devices";
/// SoC address given to the first `--window` stand-in file (any page-aligned address would do).
const STAND_IN_SOC: u64 = 1 << 40;

/// The platform for `mode`. `stand_in` files (`--window`) replace the discovered BARs. `auto`
/// logs what it found and why it chose.
pub fn select(mode: Mode, stand_in: &[PathBuf]) -> Result<Box<dyn Platform>, String> {
    select_in(mode, stand_in, Path::new(PCI_DEVICES))
}

fn select_in(
    mode: Mode,
    stand_in: &[PathBuf],
    devices: &Path,
) -> Result<Box<dyn Platform>, String> {
    let found = || -> Result<Vec<Source>, String> {
        if stand_in.is_empty() {
            return Ok(windows::ivshmem(devices));
        }
        // Each stand-in at its own SoC address, 1 TiB apart.
        stand_in
            .iter()
            .enumerate()
            .map(|(i, p)| Source::file(p, STAND_IN_SOC * (i as u64 + 1)))
            .collect()
    };
    let need = |w: Vec<Source>, mode: &str| {
        for (i, a) in w.iter().enumerate() {
            for b in &w[i + 1..] {
                if a.host < b.host.saturating_add(b.len) && b.host < a.host.saturating_add(a.len) {
                    return Err(format!(
                        "windows {} and {} show the same host memory (two windows onto guest \
                         memory, or two onto the inflight file)",
                        a.what, b.what
                    ));
                }
            }
        }
        if w.is_empty() {
            Err(format!(
                "{mode} mode needs a window onto host memory: no ivshmem device (PCI 1af4:1110) \
                 under {} and no --window FILE",
                devices.display()
            ))
        } else {
            Ok(w)
        }
    };
    match mode {
        Mode::Host if !stand_in.is_empty() => Err("--window is for the SoC modes".into()),
        Mode::Host => Ok(Box::new(Host)),
        Mode::Socvm => Ok(Box::new(SocVm {
            windows: need(found()?, "socvm")?,
        })),
        Mode::ArmSoc => {
            ArmSoc::check_arch()?;
            Ok(Box::new(ArmSoc {
                windows: need(found()?, "arm-soc")?,
            }))
        }
        Mode::Auto => {
            let w = found()?;
            let Some(first) = w.first() else {
                log::info!(
                    "mode auto: no window onto host memory (no ivshmem device, no --window): host mode"
                );
                return Ok(Box::new(Host));
            };
            let what = format!("{} ({} MiB)", first.what, first.len >> 20);
            if ArmSoc::check_arch().is_ok() {
                log::info!("mode auto: window {what} on aarch64: arm-soc mode");
                Ok(Box::new(ArmSoc { windows: w }))
            } else {
                log::info!(
                    "mode auto: window {what} on {}: socvm mode",
                    std::env::consts::ARCH
                );
                Ok(Box::new(SocVm { windows: w }))
            }
        }
    }
}

/// The platform of commands that have no `--mode` (the NVMe/TCP target): this host.
pub fn detect() -> Box<dyn Platform> {
    Box::new(Host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_need_what_they_serve_through() {
        let d = tempfile::tempdir().unwrap();
        let none = d.path().join("no-pci");
        assert_eq!(select_in(Mode::Host, &[], &none).unwrap().name(), "host");
        assert_eq!(select_in(Mode::Auto, &[], &none).unwrap().name(), "host");
        let e = select_in(Mode::Socvm, &[], &none).err().unwrap();
        assert!(e.contains("ivshmem"), "{e}");
        let ram = d.path().join("ram");
        std::fs::write(&ram, vec![0u8; 8192]).unwrap();
        let w = [ram];
        let p = select_in(Mode::Socvm, &w, &none).unwrap();
        assert_eq!((p.name(), p.windows().len()), ("socvm", 1));
        let auto = select_in(Mode::Auto, &w, &none).unwrap();
        let want = if cfg!(target_arch = "aarch64") {
            "arm-soc"
        } else {
            "socvm"
        };
        assert_eq!(auto.name(), want);
        assert!(select_in(Mode::Host, &w, &none).is_err());
        let twice = [w[0].clone(), w[0].clone()];
        let e = select_in(Mode::Socvm, &twice, &none).err().unwrap();
        assert!(e.contains("same host memory"), "{e}");
        assert_eq!(
            select_in(Mode::ArmSoc, &w, &none).is_ok(),
            cfg!(target_arch = "aarch64")
        );
    }
}
