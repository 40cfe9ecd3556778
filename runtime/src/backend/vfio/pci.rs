//! Opening a PCI NVMe controller through VFIO: the checks a user needs explained (driver, IOMMU,
//! group), BAR0, bus mastering, and the interrupt eventfds (one MSI-X vector per queue, and the
//! request channel through which the kernel asks for the device back on hot-remove).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use super::regs::Bar;
use crate::backend::BackendError;

/// PCI config space: the command register and its bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Class code (base, sub, programming interface) at 0x09..0x0b: NVM Express I/O controller.
const NVME_CLASS: [u8; 3] = [0x02, 0x08, 0x01];
/// vfio-pci region and interrupt indices.
const BAR0: u32 = 0;
const CONFIG: u32 = 7;
const MSIX_IRQ: u32 = 2;
const REQ_IRQ: u32 = 4;
/// VFIO_REGION_INFO_FLAG_MMAP.
const REGION_MMAP: u32 = 1 << 2;

/// A PCI device held through VFIO.
pub struct PciDevice {
    /// The PCI address (0000:01:00.0).
    pub bdf: String,
    /// The IOMMU group.
    pub group: u32,
    /// The container: DMA mappings go through it.
    pub container: Arc<VfioContainer>,
    device: VfioDevice,
    /// Interrupt eventfds, vector k for queue k (0: admin).
    pub vectors: Vec<EventFd>,
    /// Signalled when the kernel wants the device back (hot-remove, unbind).
    pub request: Option<EventFd>,
}

impl std::fmt::Debug for PciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciDevice")
            .field("bdf", &self.bdf)
            .field("group", &self.group)
            .finish()
    }
}

fn invalid(bdf: &str, why: impl std::fmt::Display) -> BackendError {
    BackendError::Invalid(format!("vfio:{bdf}: {why}"))
}

/// Checks `bdf`'s form (domain:bus:device.function, hex).
pub fn check_bdf(bdf: &str) -> Result<(), String> {
    let ok = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    let mut parts = bdf.split(':');
    let (Some(d), Some(b), Some(df), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "'{bdf}' is not a PCI address (domain:bus:device.function, e.g. 0000:01:00.0)"
        ));
    };
    let (dev, func) = df.split_once('.').unwrap_or((df, ""));
    if ok(d, 4) && ok(b, 2) && ok(dev, 2) && func.len() == 1 && ok(func, 1) {
        Ok(())
    } else {
        Err(format!(
            "'{bdf}' is not a PCI address (domain:bus:device.function, e.g. 0000:01:00.0)"
        ))
    }
}

fn link_name(p: &Path) -> Option<String> {
    Some(
        std::fs::read_link(p)
            .ok()?
            .file_name()?
            .to_str()?
            .to_string(),
    )
}

impl PciDevice {
    /// Opens `bdf` (bound to vfio-pci), checks it is an NVMe controller, maps BAR0, enables
    /// memory decoding and bus mastering, and sets up `vectors` MSI-X eventfds (as many as the
    /// device has, at most `vectors`).
    pub fn open(bdf: &str, vectors: usize) -> Result<(PciDevice, Arc<Bar>), BackendError> {
        check_bdf(bdf).map_err(|e| invalid(bdf, e))?;
        let sys = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
        if !sys.exists() {
            return Err(invalid(bdf, "no such PCI device (see lspci -D)"));
        }
        let bind_hint = format!(
            "bind it with: echo vfio-pci > {0}/driver_override; echo {bdf} > {0}/driver/unbind; \
             echo {bdf} > /sys/bus/pci/drivers_probe (docs/operations.md, \"VFIO disks\")",
            sys.display()
        );
        match link_name(&sys.join("driver")) {
            Some(d) if d == "vfio-pci" => {}
            Some(d) => {
                return Err(invalid(
                    bdf,
                    format!("bound to {d}, not vfio-pci; {bind_hint}"),
                ))
            }
            None => return Err(invalid(bdf, format!("bound to no driver; {bind_hint}"))),
        }
        let group = link_name(&sys.join("iommu_group"))
            .and_then(|g| g.parse::<u32>().ok())
            .ok_or_else(|| {
                invalid(
                    bdf,
                    "has no IOMMU group: the IOMMU is missing or off (boot with intel_iommu=on \
                     or amd_iommu=on; in a QEMU guest add -device intel-iommu,intremap=on)",
                )
            })?;
        if !Path::new("/dev/vfio/vfio").exists() {
            return Err(invalid(
                bdf,
                "/dev/vfio/vfio is missing (modprobe vfio-pci vfio_iommu_type1)",
            ));
        }
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| invalid(bdf, format!("cannot open the VFIO container: {e}")))?,
        );
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&sys, ops, false).map_err(|e| match e {
            VfioError::GroupViable => invalid(
                bdf,
                format!(
                    "IOMMU group {group} is not viable: every device in \
                     /sys/kernel/iommu_groups/{group}/devices must be bound to vfio-pci or to no \
                     driver"
                ),
            ),
            VfioError::OpenGroup(e, _) => invalid(
                bdf,
                format!(
                    "cannot open /dev/vfio/{group}: {e} (root, or a user owning it, is needed)"
                ),
            ),
            VfioError::ContainerSetIOMMU(e) => invalid(
                bdf,
                format!(
                    "the IOMMU refused the container ({e}); an emulated Intel IOMMU needs \
                     intremap=on"
                ),
            ),
            e => invalid(bdf, format!("cannot open through VFIO: {e}")),
        })?;
        let mut class = [0u8; 3];
        device.region_read(CONFIG, &mut class, 0x09);
        if class != NVME_CLASS {
            return Err(invalid(
                bdf,
                format!(
                    "class {:02x}{:02x}{:02x} is not an NVMe controller (010802)",
                    class[2], class[1], class[0]
                ),
            ));
        }
        if device.get_region_flags(BAR0) & REGION_MMAP == 0 {
            return Err(invalid(bdf, "BAR0 cannot be mapped"));
        }
        let size = device.get_region_size(BAR0);
        let offset = device.get_region_offset(BAR0);
        let len = usize::try_from(size)
            .ok()
            .filter(|&l| l >= 0x2000)
            .ok_or_else(|| invalid(bdf, format!("BAR0 of {size} bytes is too small")))?;
        let off =
            libc::off_t::try_from(offset).map_err(|_| invalid(bdf, "BAR0 offset out of range"))?;
        // SAFETY: maps the device's BAR0 region through its VFIO fd at the offset VFIO gave;
        // a fresh mapping that affects no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(invalid(
                bdf,
                format!("cannot map BAR0: {}", std::io::Error::last_os_error()),
            ));
        }
        // SAFETY: the BAR0 mapping just made, handed to the Bar that unmaps it.
        let bar = Arc::new(unsafe { Bar::new(p.cast(), len) });

        let have = device
            .get_irq_info(MSIX_IRQ)
            .map(|i| i.count as usize)
            .unwrap_or(0);
        let n = have.min(vectors);
        let mut fds = Vec::with_capacity(n);
        for _ in 0..n {
            fds.push(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| invalid(bdf, format!("eventfd: {e}")))?,
            );
        }
        if n > 0 {
            device
                .enable_msix(fds.iter().collect())
                .map_err(|e| invalid(bdf, format!("cannot enable MSI-X: {e}")))?;
        }
        let request = match device.get_irq_info(REQ_IRQ) {
            Some(i) if i.count > 0 => {
                let fd = EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|e| invalid(bdf, format!("eventfd: {e}")))?;
                match device.enable_irq(REQ_IRQ, vec![&fd]) {
                    Ok(()) => Some(fd),
                    Err(e) => {
                        log::warn!("vfio:{bdf}: no device request channel ({e}); hot-remove waits for the disk's removal");
                        None
                    }
                }
            }
            _ => None,
        };
        // Memory decoding and bus mastering last: an error above leaves the device as it was.
        let mut cmd = [0u8; 2];
        device.region_read(CONFIG, &mut cmd, PCI_COMMAND);
        let c = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        device.region_write(CONFIG, &c.to_le_bytes(), PCI_COMMAND);
        Ok((
            PciDevice {
                bdf: bdf.to_string(),
                group,
                container,
                device,
                vectors: fds,
                request,
            },
            bar,
        ))
    }

    /// Turns bus mastering off: the device can no longer read or write memory (config space
    /// only: works when the BAR is gone or the controller wedged).
    pub fn stop_dma(&self) {
        let mut cmd = [0u8; 2];
        self.device.region_read(CONFIG, &mut cmd, PCI_COMMAND);
        let c = u16::from_le_bytes(cmd) & !PCI_COMMAND_MASTER;
        self.device
            .region_write(CONFIG, &c.to_le_bytes(), PCI_COMMAND);
    }

    /// Whether the kernel asked for the device back (hot-remove).
    pub fn requested(&self) -> bool {
        let Some(fd) = &self.request else {
            return false;
        };
        fd.read().is_ok()
    }
}

impl Drop for PciDevice {
    fn drop(&mut self) {
        if !self.vectors.is_empty() {
            let _ = self.device.disable_msix();
        }
        if self.request.is_some() {
            let _ = self.device.disable_irq(REQ_IRQ);
        }
        // Bus mastering off before the device goes back: nothing it still has can DMA.
        self.stop_dma();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses() {
        assert!(check_bdf("0000:01:00.0").is_ok());
        assert!(check_bdf("0000:00:1f.7").is_ok());
        for bad in [
            "01:00.0",
            "0000:01:00",
            "0000:01:00.00",
            "000g:01:00.0",
            "",
            "0000:01:00.0:1",
        ] {
            assert!(check_bdf(bad).is_err(), "{bad}");
        }
    }
}
