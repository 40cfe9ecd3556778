//! ARM SoC mode: leapd runs on the ARM cores of a SmartNIC (emulated here by an aarch64 VM on a
//! 16 KiB-page kernel). Host memory is a PCIe BAR: device memory to the SoC, where unaligned or
//! over-wide accesses fault, so every access to it is naturally aligned (the runtime's window
//! copies) and request data is bounced through SoC DRAM. The page size is whatever the SoC's
//! kernel uses (4, 16 or 64 KiB), read at run time.

use super::windows::Source;
use super::Platform;

/// leapd on a SmartNIC's ARM cores.
pub struct ArmSoc {
    pub(super) windows: Vec<Source>,
}

impl ArmSoc {
    /// Only on aarch64: an x86 "SoC" is a SoC VM.
    pub fn check_arch() -> Result<(), String> {
        if cfg!(target_arch = "aarch64") {
            Ok(())
        } else {
            Err(format!(
                "arm-soc mode runs on aarch64; this is {} (use --mode socvm)",
                std::env::consts::ARCH
            ))
        }
    }
}

impl Platform for ArmSoc {
    fn name(&self) -> &'static str {
        "arm-soc"
    }
    fn windows(&self) -> &[Source] {
        &self.windows
    }
}
