//! Windows onto host memory, as the SoC modes find them: the BAR of an ivshmem device (PCI
//! 1af4:1110, whose BAR 2 is host memory — in the emulated machine, the tenant's RAM file), or a
//! file named with `--window` that stands in for one.
//!
//! A window exposes host addresses `[0, len)` (the agent's host addresses are offsets in the
//! tenant's RAM file) at the BAR's physical address, and is mapped through its sysfs
//! `resource2` file, which is what lets a process map a BAR at all. A window whose first bytes
//! are the inflight magic (`leap_vhost::inflight::WINDOW_MAGIC`) is onto the agent's inflight
//! file instead, at host address `relay::INFLIGHT_HOST`.

use leap_runtime::window::Window;
use leap_vhost::inflight::is_window_file;
use leap_vhost::region::WindowFile;
use leap_vhost::relay::INFLIGHT_HOST;
use std::path::{Path, PathBuf};

/// ivshmem's PCI identity (Red Hat, Inter-VM shared memory).
const IVSHMEM: (&str, &str) = ("0x1af4", "0x1110");
/// ivshmem's shared-memory BAR.
const SHMEM_BAR: usize = 2;

/// A window: where it comes from and where it lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The file to map (a BAR's sysfs resource file, or a stand-in).
    pub path: PathBuf,
    /// What it is, for logs.
    pub what: String,
    /// Host address of its first byte (0 for guest memory, `INFLIGHT_HOST` for the inflight
    /// file).
    pub host: u64,
    /// SoC (physical) address of its first byte.
    pub soc: u64,
    /// Bytes.
    pub len: u64,
}

impl Source {
    /// A stand-in file (`--window FILE`): mapped whole, at SoC address `soc`.
    pub fn file(path: &Path, soc: u64) -> Result<Source, String> {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("--window {}: {e}", path.display()))?
            .len();
        if len == 0 {
            return Err(format!("--window {}: the file is empty", path.display()));
        }
        Ok(Source {
            path: path.to_path_buf(),
            what: format!("file {}", path.display()),
            host: 0,
            soc,
            len,
        }
        .classified())
    }

    /// Recognizes the inflight file's window by its magic.
    fn classified(mut self) -> Source {
        let inflight = std::fs::File::open(&self.path)
            .map(|f| is_window_file(&f))
            .unwrap_or(false);
        if inflight {
            self.host = INFLIGHT_HOST;
            self.what.push_str(" (inflight regions)");
        }
        self
    }

    /// Opens it: the window (host addresses from 0) and the file to map it from.
    pub fn open(&self) -> Result<(Window, WindowFile), String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| format!("window {}: {e}", self.what))?;
        Ok((
            Window {
                host: self.host,
                len: self.len,
                soc: self.soc,
            },
            WindowFile {
                file,
                soc: self.soc,
                len: self.len,
            },
        ))
    }
}

/// The ivshmem BARs under `devices` (normally /sys/bus/pci/devices), in PCI address order.
pub fn ivshmem(devices: &Path) -> Vec<Source> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir(devices) else {
        return found;
    };
    let mut entries: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
    entries.sort();
    for dev in entries {
        let read = |f: &str| std::fs::read_to_string(dev.join(f)).unwrap_or_default();
        if read("vendor").trim() != IVSHMEM.0 || read("device").trim() != IVSHMEM.1 {
            continue;
        }
        let name = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match bar(&read("resource"), SHMEM_BAR) {
            Some((soc, len)) => found.push(
                Source {
                    path: dev.join(format!("resource{SHMEM_BAR}")),
                    what: format!("ivshmem {name} BAR{SHMEM_BAR}"),
                    host: 0,
                    soc,
                    len,
                }
                .classified(),
            ),
            None => log::warn!("ivshmem {name}: BAR{SHMEM_BAR} is not assigned; ignored"),
        }
    }
    found
}

/// BAR `n` of a sysfs `resource` file (one "start end flags" line per resource): (start, size).
fn bar(resource: &str, n: usize) -> Option<(u64, u64)> {
    let line = resource.lines().nth(n)?;
    let mut it = line
        .split_whitespace()
        .map(|x| u64::from_str_radix(x.trim_start_matches("0x"), 16).ok());
    let (start, end) = (it.next()??, it.next()??);
    if start == 0 || end < start {
        return None;
    }
    Some((start, end - start + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_ivshmem_bars_and_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let dev = |name: &str, vendor: &str, device: &str, resource: &str| {
            let p = d.path().join(name);
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("vendor"), format!("{vendor}\n")).unwrap();
            std::fs::write(p.join("device"), format!("{device}\n")).unwrap();
            std::fs::write(p.join("resource"), resource).unwrap();
        };
        let zero = "0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        dev(
            "0000:00:04.0",
            "0x1af4",
            "0x1110",
            &format!(
                "0x00000000fe800000 0x00000000fe8000ff 0x0000000000040200\n{zero}\
                 0x0000008000000000 0x000000801fffffff 0x000000000014220c\n"
            ),
        );
        dev("0000:00:02.0", "0x1af4", "0x1001", zero); // virtio-blk
        dev("0000:00:05.0", "0x1af4", "0x1110", &zero.repeat(3)); // BAR not assigned
        let found = ivshmem(d.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].soc, 0x80_0000_0000);
        assert_eq!(found[0].len, 512 << 20);
        assert!(found[0].path.ends_with("0000:00:04.0/resource2"));
        assert!(ivshmem(&d.path().join("missing")).is_empty());
    }

    #[test]
    fn stand_in_files_open_as_windows_from_host_zero() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ram");
        std::fs::write(&p, vec![0u8; 1 << 16]).unwrap();
        let s = Source::file(&p, 1 << 40).unwrap();
        let (w, f) = s.open().unwrap();
        assert_eq!((w.host, w.len, w.soc), (0, 1 << 16, 1 << 40));
        assert_eq!((f.soc, f.len), (1 << 40, 1 << 16));
        std::fs::write(d.path().join("empty"), b"").unwrap();
        assert!(Source::file(&d.path().join("empty"), 0).is_err());
        assert!(Source::file(&d.path().join("nope"), 0).is_err());
        // The agent's inflight file is recognized by its header.
        let inf = d.path().join("inflight");
        leap_vhost::inflight::WindowFile::prepare(&inf, 1 << 20).unwrap();
        let s = Source::file(&inf, 1 << 41).unwrap();
        assert_eq!(s.host, INFLIGHT_HOST);
        assert_eq!(s.open().unwrap().0.host, INFLIGHT_HOST);
    }
}
