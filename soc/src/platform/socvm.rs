//! SoCvm mode: leapd runs in an x86 VM beside the tenants ("SoCvm", for servers without a
//! SmartNIC). The host agent relays vhost-user control to it; guest memory is reached through a
//! window onto host memory (an ivshmem BAR over the tenant's RAM file), so request data is
//! bounced through the VM's own memory and never crosses the control channel.

use super::windows::Source;
use super::Platform;

/// leapd in a SoC VM.
pub struct SocVm {
    pub(super) windows: Vec<Source>,
}

impl Platform for SocVm {
    fn name(&self) -> &'static str {
        "socvm"
    }
    fn windows(&self) -> &[Source] {
        &self.windows
    }
}
