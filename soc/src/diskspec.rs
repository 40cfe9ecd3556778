//! The `--disk` option: `PATH[,size=SIZE][,direct=on|off][,readonly=on]`, where PATH may also be
//! `null` or `ram` for the in-memory back ends. One parser, one struct, used by the CLI and tests.

use std::path::PathBuf;

/// The syntax, for help texts and error messages.
pub const DISK_SYNTAX: &str = "PATH[,size=SIZE][,direct=on|off][,readonly=on]  (PATH may be `null` or `ram`), or \
     nvme-tcp://HOST:PORT/NQN[/NSID][,queues=N][,depth=N][,digest=on|off][,hostnqn=NQN][,timeout=30s], or \
     vfio:PCI-ADDRESS[/NSID][,queues=N][,depth=N][,timeout=30s] (an NVMe controller bound to vfio-pci); \
     any disk also takes rate limits [,iops=N][,iops-rd=N][,iops-wr=N][,bps=SIZE][,bps-rd=SIZE][,bps-wr=SIZE]";

/// What kind of back end a disk spec names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A file or block device.
    File(PathBuf),
    /// The null back end.
    Null,
    /// A RAM disk.
    Ram,
    /// A namespace on an NVMe/TCP target.
    NvmeTcp(NvmeTcpSpec),
    /// A namespace of a local NVMe controller driven from userspace through VFIO.
    Vfio(VfioSpec),
}

/// `vfio:PCI-ADDRESS[/NSID]` and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VfioSpec {
    /// PCI address, e.g. 0000:01:00.0.
    pub bdf: String,
    /// Namespace ID (default 1).
    pub nsid: u32,
    /// I/O queues to ask for (default 8; one per poller is used).
    pub queues: u16,
    /// Entries per I/O queue (default 256).
    pub depth: u16,
    /// Command timeout before Abort; twice that and the controller is reset (default 30 s).
    pub timeout: std::time::Duration,
}

fn parse_vfio(rest: &str) -> Result<VfioSpec, String> {
    let bad = |why: String| format!("bad vfio disk `vfio:{rest}`: {why}; syntax: {DISK_SYNTAX}");
    let (bdf, nsid) = match rest.split_once('/') {
        Some((b, n)) => (
            b,
            n.parse::<u32>()
                .ok()
                .filter(|&n| n > 0 && n < 0xffff_ffff)
                .ok_or_else(|| bad("NSID must be a number from 1".into()))?,
        ),
        None => (rest, 1),
    };
    leap_runtime::backend::vfio::check_bdf(bdf).map_err(bad)?;
    Ok(VfioSpec {
        bdf: bdf.to_string(),
        nsid,
        queues: 8,
        depth: 256,
        timeout: std::time::Duration::from_secs(30),
    })
}

/// `nvme-tcp://HOST:PORT/NQN[/NSID]` and its options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmeTcpSpec {
    /// HOST:PORT.
    pub addr: String,
    /// Subsystem NQN.
    pub nqn: String,
    /// Namespace ID (default 1).
    pub nsid: u32,
    /// I/O queues (default 4).
    pub queues: u16,
    /// Entries per I/O queue (default 128).
    pub depth: u16,
    /// Header and data digests (default off).
    pub digest: bool,
    /// Host NQN (default: derived from /etc/machine-id).
    pub hostnqn: Option<String>,
    /// How long a command may wait through outages and retries (default 30 s).
    pub timeout: std::time::Duration,
}

fn parse_duration(v: &str) -> Result<std::time::Duration, String> {
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else {
        (v, 1.0)
    };
    let x: f64 = num
        .parse()
        .map_err(|_| format!("bad duration `{v}`: use e.g. 30s, 500ms or 2m"))?;
    if !(x > 0.0 && x * mult <= 86400.0) {
        return Err(format!(
            "bad duration `{v}`: must be between 1 ms and 1 day"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(x * mult))
}

fn parse_nvme_tcp(rest: &str) -> Result<NvmeTcpSpec, String> {
    let bad =
        |why: &str| format!("bad nvme-tcp disk `nvme-tcp://{rest}`: {why}; syntax: {DISK_SYNTAX}");
    let mut parts = rest.splitn(3, '/');
    let addr = parts
        .next()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| bad("no HOST:PORT"))?;
    if !addr.contains(':') {
        return Err(bad("HOST:PORT needs a port (4420 is the usual one)"));
    }
    let nqn = parts
        .next()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("no subsystem NQN"))?;
    let nsid = match parts.next() {
        None => 1,
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|&n| n > 0 && n < 0xffff_ffff)
            .ok_or_else(|| bad("NSID must be a number from 1"))?,
    };
    Ok(NvmeTcpSpec {
        addr: addr.to_string(),
        nqn: nqn.to_string(),
        nsid,
        queues: 4,
        depth: 128,
        digest: false,
        hostnqn: None,
        timeout: std::time::Duration::from_secs(30),
    })
}

/// A parsed `--disk` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The back end.
    pub kind: DiskKind,
    /// Create/grow to this size (files) or the size of a null/ram disk.
    pub size: Option<u64>,
    /// O_DIRECT.
    pub direct: bool,
    /// Read-only.
    pub read_only: bool,
    /// Rate limits (`iops=`, `iops-rd=`, `iops-wr=`, `bps=`, `bps-rd=`, `bps-wr=`).
    pub limits: leap_runtime::throttle::Limits,
}

impl DiskSpec {
    /// A short description for messages: `file x.img (1 GiB to create)`, `ram (64 MiB)`, ...
    pub fn describe(&self) -> String {
        let size = |s: Option<u64>| s.map(|b| format!(" ({} MiB)", b >> 20)).unwrap_or_default();
        let mut out = match &self.kind {
            DiskKind::File(p) => format!("file {}{}", p.display(), size(self.size)),
            DiskKind::Null => format!("null{}", size(self.size)),
            DiskKind::Ram => format!("ram{}", size(self.size)),
            DiskKind::NvmeTcp(t) => format!("nvme-tcp://{}/{}/{}", t.addr, t.nqn, t.nsid),
            DiskKind::Vfio(v) => format!("vfio:{}/{}", v.bdf, v.nsid),
        };
        if self.read_only {
            out.push_str(", read-only");
        }
        if self.direct {
            out.push_str(", O_DIRECT");
        }
        if self.limits.any() {
            out.push_str(", rate-limited");
        }
        out
    }
}

/// Parses sizes like `8G`, `512M`, `4k`, `1T`, `4096` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => {
            let unit = t[i..].to_ascii_lowercase();
            let m: u64 = match unit.trim_end_matches("ib").trim_end_matches('b') {
                "" => 1,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => {
                    return Err(format!(
                        "bad size `{s}`: unknown unit `{}` (use K, M, G or T)",
                        &t[i..]
                    ))
                }
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size `{s}`: expected a number with an optional K/M/G/T unit"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("bad size `{s}`: must be between 1 byte and 16 EiB"))
}

/// `spec` (the `--disk` syntax) with its rate-limit options replaced by `l`'s.
pub fn with_limits(spec: &str, l: &leap_runtime::throttle::Limits) -> String {
    let keys = ["iops", "iops-rd", "iops-wr", "bps", "bps-rd", "bps-wr"];
    let mut parts: Vec<String> = spec
        .split(',')
        .filter(|p| !p.split_once('=').is_some_and(|(k, _)| keys.contains(&k)))
        .map(str::to_string)
        .collect();
    for (k, v) in keys
        .iter()
        .zip([l.iops, l.iops_rd, l.iops_wr, l.bps, l.bps_rd, l.bps_wr])
    {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    }
    parts.join(",")
}

/// Sets a rate limit option (`iops`, `iops-rd`, `bps-wr`, ...); false if `k` is not one.
pub(crate) fn limit(
    l: &mut leap_runtime::throttle::Limits,
    k: &str,
    v: &str,
) -> Result<bool, String> {
    let slot = match k {
        "iops" => &mut l.iops,
        "iops-rd" => &mut l.iops_rd,
        "iops-wr" => &mut l.iops_wr,
        "bps" => &mut l.bps,
        "bps-rd" => &mut l.bps_rd,
        "bps-wr" => &mut l.bps_wr,
        _ => return Ok(false),
    };
    let n = if k.starts_with("bps") {
        parse_size(v)?
    } else {
        v.parse::<u64>()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("bad value `{v}` for {k}: a number of commands per second"))?
    };
    *slot = Some(n);
    Ok(true)
}

/// A `queues=` or `depth=` value within `min..=max`.
fn depth_or_queues(k: &str, v: &str, min: u16, max: u16) -> Result<u16, String> {
    v.parse::<u16>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            if k == "depth" && v.parse::<u16>().is_ok_and(|n| n < min) {
                format!(
                    "depth={v}: at least {min} (a guest request may be split into {min} commands)"
                )
            } else {
                format!("bad value `{v}` for {k}: {min}..={max}")
            }
        })
}

fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("bad value `{v}` for {key}: use on or off")),
    }
}

impl std::str::FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("empty disk path; syntax: {DISK_SYNTAX}"))?;
        let kind = match path {
            "null" => DiskKind::Null,
            "ram" => DiskKind::Ram,
            p if p.starts_with("nvme-tcp://") => {
                DiskKind::NvmeTcp(parse_nvme_tcp(&p["nvme-tcp://".len()..])?)
            }
            p if p.starts_with("vfio:") => DiskKind::Vfio(parse_vfio(&p["vfio:".len()..])?),
            p => DiskKind::File(PathBuf::from(p)),
        };
        let mut spec = DiskSpec {
            kind,
            size: None,
            direct: false,
            read_only: false,
            limits: Default::default(),
        };
        for opt in parts {
            let (k, v) = opt.split_once('=').ok_or_else(|| {
                format!("bad disk option `{opt}`: expected key=value; syntax: {DISK_SYNTAX}")
            })?;
            if limit(&mut spec.limits, k, v)? {
                continue;
            }
            if let DiskKind::NvmeTcp(t) = &mut spec.kind {
                match k {
                    "queues" => t.queues = depth_or_queues(k, v, 1, 64)?,
                    "depth" => t.depth = depth_or_queues(k, v, 8, 1024)?,
                    "digest" => t.digest = on_off(k, v)?,
                    "hostnqn" => t.hostnqn = Some(v.to_string()),
                    "timeout" => t.timeout = parse_duration(v)?,
                    "readonly" => spec.read_only = on_off(k, v)?,
                    _ => {
                        return Err(format!(
                            "unknown nvme-tcp disk option `{k}`; syntax: {DISK_SYNTAX}"
                        ))
                    }
                }
                continue;
            }
            if let DiskKind::Vfio(f) = &mut spec.kind {
                match k {
                    "queues" => f.queues = depth_or_queues(k, v, 1, 64)?,
                    "depth" => f.depth = depth_or_queues(k, v, 8, 1024)?,
                    "timeout" => f.timeout = parse_duration(v)?,
                    "readonly" => spec.read_only = on_off(k, v)?,
                    _ => {
                        return Err(format!(
                            "unknown vfio disk option `{k}`; syntax: {DISK_SYNTAX}"
                        ))
                    }
                }
                continue;
            }
            match k {
                "size" => spec.size = Some(parse_size(v)?),
                "direct" => spec.direct = on_off(k, v)?,
                "readonly" => spec.read_only = on_off(k, v)?,
                _ => return Err(format!("unknown disk option `{k}`; syntax: {DISK_SYNTAX}")),
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_rewritten_in_the_spec() {
        let l = leap_runtime::throttle::Limits {
            iops_wr: Some(50),
            bps: Some(1 << 20),
            ..Default::default()
        };
        let s = with_limits("x.img,size=1G,iops=10,direct=on", &l);
        assert_eq!(s, "x.img,size=1G,direct=on,iops-wr=50,bps=1048576");
        let back: DiskSpec = s.parse().unwrap();
        assert_eq!(back.limits, l);
        assert_eq!(
            with_limits(&s, &Default::default()),
            "x.img,size=1G,direct=on"
        );
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999T").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn parses_disk_specs() {
        let d: DiskSpec = "/tmp/a.img,size=1G,direct=on,readonly=off".parse().unwrap();
        assert_eq!(d.kind, DiskKind::File("/tmp/a.img".into()));
        assert_eq!(
            (d.size, d.direct, d.read_only),
            (Some(1 << 30), true, false)
        );
        assert_eq!(
            "ram,size=64M".parse::<DiskSpec>().unwrap().kind,
            DiskKind::Ram
        );
        assert!("a.img,speed=fast"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("unknown disk option"));
        assert!("a.img,direct=maybe"
            .parse::<DiskSpec>()
            .unwrap_err()
            .contains("on or off"));
        assert!(",size=1G".parse::<DiskSpec>().is_err());
        let d: DiskSpec = "ram,iops-wr=100,bps-rd=10M".parse().unwrap();
        assert_eq!(
            (d.limits.iops_wr, d.limits.bps_rd),
            (Some(100), Some(10 << 20))
        );
        assert!("ram,iops=0".parse::<DiskSpec>().is_err());
        assert!("ram,bps=fast".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn parses_vfio_specs() {
        let d: DiskSpec = "vfio:0000:01:00.0/2,queues=4,depth=128,timeout=5s"
            .parse()
            .unwrap();
        let DiskKind::Vfio(v) = &d.kind else {
            panic!("not vfio")
        };
        assert_eq!(
            (v.bdf.as_str(), v.nsid, v.queues, v.depth),
            ("0000:01:00.0", 2, 4, 128)
        );
        assert_eq!(v.timeout, std::time::Duration::from_secs(5));
        let d: DiskSpec = "vfio:0000:00:04.0".parse().unwrap();
        assert_eq!(d.describe(), "vfio:0000:00:04.0/1");
        for bad in [
            "vfio:01:00.0",
            "vfio:0000:01:00.0/0",
            "vfio:0000:01:00.0,size=1G",
            "vfio:0000:01:00.0,depth=4",
            "vfio:0000:01:00.0,queues=0",
        ] {
            let e = bad.parse::<DiskSpec>().unwrap_err();
            assert!(
                e.contains("vfio") || e.contains("depth") || e.contains("queues"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn parses_nvme_tcp_specs() {
        let d: DiskSpec = "nvme-tcp://127.0.0.1:4420/nqn.2026-12.io.leap:t/2,queues=2,depth=64,digest=on,timeout=5s"
            .parse()
            .unwrap();
        let DiskKind::NvmeTcp(t) = d.kind else {
            panic!("not nvme-tcp")
        };
        assert_eq!(
            (t.addr.as_str(), t.nqn.as_str(), t.nsid),
            ("127.0.0.1:4420", "nqn.2026-12.io.leap:t", 2)
        );
        assert_eq!((t.queues, t.depth, t.digest), (2, 64, true));
        assert_eq!(t.timeout, std::time::Duration::from_secs(5));
        let d: DiskSpec = "nvme-tcp://h:4420/nqn.x".parse().unwrap();
        let DiskKind::NvmeTcp(t) = d.kind else {
            panic!("not nvme-tcp")
        };
        assert_eq!((t.nsid, t.queues, t.digest), (1, 4, false));
        for bad in [
            "nvme-tcp://h/nqn",
            "nvme-tcp://h:1/",
            "nvme-tcp://h:1/n/0",
            "nvme-tcp://h:1/n,size=1G",
            "nvme-tcp://h:1/n,timeout=x",
        ] {
            assert!(bad.parse::<DiskSpec>().is_err(), "{bad}");
        }
    }
}
