//! One configuration model for the command line, the configuration file and (later) the control
//! API: a disk is what `leapd serve` takes on its command line — a name, a vhost-user socket, a
//! `--disk` spec, queues, block size — and a file lists any number of them with the pollers they
//! share:
//!
//! ```toml
//! [pollers]                 # optional: shared by every disk
//! count = 2                 # or: cores = "2-3"
//! idle_spin_us = 100
//!
//! [[disk]]
//! name = "file0"
//! socket = "leapd-data/file0.sock"
//! disk = "leapd-data/file0.img,size=1G"   # the --disk syntax
//! queues = 2
//! ```
//!
//! Unknown keys are refused, and every error is one line that names the file, the line, the key
//! or value and what is wrong. Relative paths are relative to the directory leapd runs in.

use crate::diskspec::{DiskKind, DiskSpec};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The pollers every disk shares.
    #[serde(default)]
    pub pollers: Pollers,
    /// The disks.
    #[serde(default, rename = "disk")]
    pub disks: Vec<toml::Spanned<DiskConfig>>,
    /// The NVMe/TCP targets.
    #[serde(default, rename = "target")]
    pub targets: Vec<toml::Spanned<TargetConfig>>,
}

/// `[[target]]`: an NVMe/TCP subsystem on one address, exporting namespaces, as `leapd target`
/// takes it on its command line.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A unique name (logs, metrics, the control API).
    pub name: String,
    /// Address to listen on, `IP:PORT` (4420 is NVMe/TCP's port).
    pub listen: String,
    /// The subsystem NQN (default `nqn.2026-12.io.leap:NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nqn: Option<String>,
    /// A separate discovery port on the same address (the I/O port answers discovery too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_port: Option<u16>,
    /// Logical block size of the namespaces, 512 or 4096 (default 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Only these host NQNs may connect (default: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
    /// Hosts that may use the reserved share of capacity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub priority_hosts: Vec<String>,
    /// Commands in flight per I/O queue before retryable rejects (default 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_inflight: Option<u32>,
    /// Commands in flight over all queues before retryable rejects (default 4096).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<u32>,
    /// Percent of max_inflight kept for priority hosts and retries (default 10, at most 90).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserve_pct: Option<u8>,
    /// Largest I/O queue a host may connect, entries (default 128, 2..=1024).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_entries: Option<u16>,
    /// Accept header and data digests (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digests: Option<bool>,
    /// NSIDs the subsystem has room for; namespaces can be added live up to it (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_namespaces: Option<u32>,
    /// The namespaces.
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceConfig>,
}

/// `[[target.namespace]]`: one namespace of a target.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Its NSID (default: the lowest free one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsid: Option<u32>,
    /// The back end, in the `--disk` syntax.
    pub disk: String,
}

/// A target after validation.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its name.
    pub name: String,
    /// The I/O address (and the discovery one, if separate).
    pub listen: Vec<std::net::SocketAddr>,
    /// The runtime configuration.
    pub cfg: leap_runtime::nvmf::target::TargetConfig,
    /// Logical block size.
    pub block_size: u32,
    /// (NSID, back end), every NSID given.
    pub namespaces: Vec<(u32, DiskSpec)>,
    /// What it was configured with, NSIDs filled in.
    pub config: TargetConfig,
}

/// Checks a name: 1 to 64 letters, digits, `-`, `_` or `.`.
fn check_name(n: &str) -> Result<(), String> {
    if n.is_empty()
        || n.len() > 64
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "name `{n}`: use 1 to 64 letters, digits, `-`, `_` or `.`"
        ));
    }
    Ok(())
}

/// Checks a `--disk` spec whose file must exist unless it has `size=`.
pub(crate) fn check_spec(text: &str) -> Result<DiskSpec, String> {
    let spec: DiskSpec = text.parse()?;
    if let DiskKind::File(p) = &spec.kind {
        if spec.size.is_none() && !p.exists() {
            return Err(format!(
                "{} does not exist (add `,size=SIZE` to create it)",
                p.display()
            ));
        }
    }
    Ok(spec)
}

impl TargetConfig {
    /// Checks every value; the error names the target and the key.
    pub fn validate(&self) -> Result<Target, String> {
        check_name(&self.name)?;
        let n = &self.name;
        let bad = |key: &str, why: String| format!("target `{n}`: {key}: {why}");
        use std::net::ToSocketAddrs;
        let addr = self
            .listen
            .to_socket_addrs()
            .map_err(|e| bad("listen", format!("`{}`: {e} (IP:PORT)", self.listen)))?
            .next()
            .ok_or_else(|| bad("listen", format!("`{}`: no address", self.listen)))?;
        let mut listen = vec![addr];
        if let Some(p) = self.discovery_port.filter(|&p| p != 0 && p != addr.port()) {
            listen.push(std::net::SocketAddr::new(addr.ip(), p));
        }
        let nqn = self
            .nqn
            .clone()
            .unwrap_or_else(|| format!("nqn.2026-12.io.leap:{n}"));
        if !nqn.starts_with("nqn.") || nqn.len() > 223 || nqn.contains(char::is_whitespace) {
            return Err(bad(
                "nqn",
                format!("`{nqn}`: an NQN starts with `nqn.`, has no spaces and at most 223 bytes"),
            ));
        }
        let block_size = match self.block_size {
            None => 512,
            Some(b) => crate::parse_block_size(&b.to_string()).map_err(|e| bad("block_size", e))?,
        };
        let d = leap_runtime::nvmf::target::TargetConfig::default();
        let queue_entries = self.queue_entries.unwrap_or(d.max_queue_entries);
        if !(2..=1024).contains(&queue_entries) {
            return Err(bad(
                "queue_entries",
                format!("{queue_entries} is not between 2 and 1024"),
            ));
        }
        let reserve_pct = self.reserve_pct.unwrap_or(d.reserve_pct);
        if reserve_pct > 90 {
            return Err(bad("reserve_pct", format!("{reserve_pct} is above 90")));
        }
        let max_namespaces = self.max_namespaces.unwrap_or(d.max_namespaces);
        if !(1..=1024).contains(&max_namespaces) {
            return Err(bad(
                "max_namespaces",
                format!("{max_namespaces} is not between 1 and 1024"),
            ));
        }
        for (key, v) in [
            ("queue_inflight", self.queue_inflight),
            ("max_inflight", self.max_inflight),
        ] {
            if v == Some(0) {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        let mut namespaces: Vec<(u32, DiskSpec)> = Vec::new();
        let mut config = self.clone();
        config.nqn = Some(nqn.clone());
        for (k, ns) in self.namespaces.iter().enumerate() {
            let nsid = match ns.nsid {
                Some(id) => id,
                None => (1..=max_namespaces)
                    .find(|id| {
                        !namespaces.iter().any(|(x, _)| x == id)
                            && !self.namespaces.iter().any(|o| o.nsid == Some(*id))
                    })
                    .ok_or_else(|| {
                        bad(
                            "namespace",
                            format!("more than max_namespaces ({max_namespaces})"),
                        )
                    })?,
            };
            if nsid == 0 || nsid > max_namespaces {
                return Err(bad(
                    "namespace.nsid",
                    format!("{nsid} is not between 1 and max_namespaces ({max_namespaces})"),
                ));
            }
            if namespaces.iter().any(|(x, _)| *x == nsid) {
                return Err(bad("namespace.nsid", format!("{nsid} is used twice")));
            }
            let spec = check_spec(&ns.disk).map_err(|e| bad("namespace.disk", e))?;
            namespaces.push((nsid, spec));
            config.namespaces[k].nsid = Some(nsid);
        }
        let cfg = leap_runtime::nvmf::target::TargetConfig {
            nqn,
            allowed_hosts: self.allow_hosts.clone(),
            priority_hosts: self.priority_hosts.clone(),
            max_queue_entries: queue_entries,
            queue_inflight: self.queue_inflight.unwrap_or(d.queue_inflight),
            total_inflight: self.max_inflight.unwrap_or(d.total_inflight),
            reserve_pct,
            digests: self.digests.unwrap_or(true),
            max_namespaces,
            ..d
        };
        Ok(Target {
            name: n.clone(),
            listen,
            cfg,
            block_size,
            namespaces,
            config,
        })
    }
}

/// `[pollers]`: the `--pollers`, `--cores`, `--idle-spin-us` and `--pin` options.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pollers {
    /// Poller threads (default: one per queue of all disks, at most one per CPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
    /// One pinned poller per listed core (`2-3`, `0,2,4-5`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<String>,
    /// Longest idle spin, µs (default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_spin_us: Option<u64>,
    /// Pin each poller to its own CPU.
    #[serde(default)]
    pub pin: bool,
}

/// `[[disk]]`: one vhost-user-blk disk, as `leapd serve` takes it on its command line.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// A unique name (logs, metrics, the control API).
    pub name: String,
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// The back end, in the `--disk` syntax.
    pub disk: String,
    /// Virtqueues (default: one per CPU, at most 4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Logical block size, 512 or 4096 (default 512).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    /// Offer inflight I/O tracking (default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflight: Option<bool>,
    /// Socket permissions, octal (default "0600").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
}

/// A disk after validation.
#[derive(Clone, Debug)]
pub struct Disk {
    /// Its name.
    pub name: String,
    /// The socket.
    pub socket: PathBuf,
    /// The back end.
    pub spec: DiskSpec,
    /// Virtqueues.
    pub queues: u16,
    /// Logical block size.
    pub block_size: u32,
    /// Inflight tracking offered.
    pub inflight: bool,
    /// Socket permissions.
    pub socket_mode: u32,
    /// What it was configured with (for listing and writing back).
    pub config: DiskConfig,
}

impl DiskConfig {
    /// Checks every value; the error names the disk and the key.
    pub fn validate(&self) -> Result<Disk, String> {
        self.check(true)
    }

    /// [`DiskConfig::validate`] for a disk with no vhost-user socket of its own (the SoC modes,
    /// where the host agent owns the socket).
    pub fn validate_without_socket(&self) -> Result<Disk, String> {
        self.check(false)
    }

    fn check(&self, needs_socket: bool) -> Result<Disk, String> {
        let n = &self.name;
        check_name(n)?;
        let bad = |key: &str, why: String| format!("disk `{n}`: {key}: {why}");
        if needs_socket && self.socket.as_os_str().is_empty() {
            return Err(bad("socket", "empty path".into()));
        }
        if let Some(dir) = self.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            if dir.exists() && !dir.is_dir() {
                return Err(bad(
                    "socket",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        let spec = check_spec(&self.disk).map_err(|e| bad("disk", e))?;
        let queues = match self.queues {
            None => crate::default_queues(),
            Some(q @ 1..=32) => q,
            Some(q) => return Err(bad("queues", format!("{q} is not between 1 and 32"))),
        };
        let block_size = match self.block_size {
            None => 512,
            Some(b) => crate::parse_block_size(&b.to_string()).map_err(|e| bad("block_size", e))?,
        };
        let socket_mode = match &self.socket_mode {
            None => 0o600,
            Some(m) => crate::parse_mode(m).map_err(|e| bad("socket_mode", e))?,
        };
        Ok(Disk {
            name: n.clone(),
            socket: self.socket.clone(),
            spec,
            queues,
            block_size,
            inflight: self.inflight.unwrap_or(true),
            socket_mode,
            config: self.clone(),
        })
    }
}

/// A configuration as written back (`config_save`): the same keys as the file.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigOut {
    /// Pollers.
    pub pollers: Pollers,
    /// Disks.
    pub disk: Vec<DiskConfig>,
    /// Targets.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub target: Vec<TargetConfig>,
}

impl ConfigOut {
    /// TOML text, with a header saying where it came from.
    pub fn to_toml(&self) -> Result<String, String> {
        let body = toml::to_string_pretty(self).map_err(|e| e.to_string())?;
        Ok(format!(
            "# Written by leapd (control API config_save); the format is docs/leapd.example.toml's.\n\n{body}"
        ))
    }
}

/// Line (1-based) of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// A checked configuration: its disks, targets and poller options.
#[derive(Clone, Debug)]
pub struct Checked {
    /// The disks, in file order.
    pub disks: Vec<Disk>,
    /// The targets, in file order.
    pub targets: Vec<Target>,
    /// The poller options.
    pub pollers: Pollers,
    /// `pollers.cores`, parsed.
    pub cores: Option<Vec<usize>>,
}

/// Parses and checks configuration `text` read from `path` (for messages). Every error is one
/// line: `PATH:LINE: what`.
pub fn parse(path: &Path, text: &str) -> Result<Checked, String> {
    let where_ = |line: usize| format!("{}:{line}", path.display());
    let cfg: Config = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        format!("{}: {}", where_(line), e.message().trim())
    })?;
    let cores = match &cfg.pollers.cores {
        Some(c) => Some(crate::serve::parse_cores(c).map_err(|e| {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with("cores"))
                .map_or(1, |i| i + 1);
            format!("{}: pollers.cores: {e}", where_(line))
        })?),
        None => None,
    };
    if cfg.pollers.count == Some(0) {
        return Err(format!("{}: pollers.count: must be at least 1", where_(1)));
    }
    if cfg.disks.is_empty() && cfg.targets.is_empty() {
        return Err(format!(
            "{}: no [[disk]] or [[target]] entries: nothing to serve",
            where_(1)
        ));
    }
    let mut disks = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut sockets: HashMap<PathBuf, usize> = HashMap::new();
    for d in &cfg.disks {
        let line = line_of(text, d.span().start);
        let disk = d
            .get_ref()
            .validate()
            .map_err(|e| format!("{}: {e}", where_(line)))?;
        if let Some(first) = names.insert(disk.name.clone(), line) {
            return Err(format!(
                "{}: disk `{}`: name already used by the disk at line {first}",
                where_(line),
                disk.name
            ));
        }
        let key = normalize(&disk.socket);
        if let Some(first) = sockets.insert(key, line) {
            return Err(format!(
                "{}: disk `{}`: socket {} already used by the disk at line {first}",
                where_(line),
                disk.name,
                disk.socket.display()
            ));
        }
        disks.push(disk);
    }
    let mut targets: Vec<Target> = Vec::new();
    let mut t_lines: Vec<usize> = Vec::new();
    for t in &cfg.targets {
        let line = line_of(text, t.span().start);
        let target = t
            .get_ref()
            .validate()
            .map_err(|e| format!("{}: {e}", where_(line)))?;
        for (other, first) in targets.iter().zip(&t_lines) {
            if other.name == target.name {
                return Err(format!(
                    "{}: target `{}`: name already used by the target at line {first}",
                    where_(line),
                    target.name
                ));
            }
            if let Some(a) = target.listen.iter().find(|a| other.listen.contains(a)) {
                return Err(format!(
                    "{}: target `{}`: listen address {a} already used by the target at line {first}",
                    where_(line),
                    target.name
                ));
            }
        }
        targets.push(target);
        t_lines.push(line);
    }
    Ok(Checked {
        disks,
        targets,
        pollers: cfg.pollers,
        cores,
    })
}

/// Reads and checks a configuration file.
pub fn load(path: &Path) -> Result<Checked, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(path, &text)
}

/// `./a/../b.sock` and `b.sock` are the same socket.
pub(crate) fn normalize(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[pollers]
count = 2
idle_spin_us = 50

[[disk]]
name = "ram0"
socket = "s/ram0.sock"
disk = "ram,size=64M"
queues = 2

[[disk]]
name = "null0"
socket = "s/null0.sock"
disk = "null,size=1G,iops=1000"
block_size = 4096

[[target]]
name = "t0"
listen = "127.0.0.1:4420"
max_namespaces = 8

[[target.namespace]]
disk = "ram,size=16M"

[[target.namespace]]
nsid = 3
disk = "null"
"#;

    #[test]
    fn a_good_file_checks() {
        let c = parse(Path::new("leapd.toml"), GOOD).unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].queues, 2);
        assert_eq!(c.disks[1].block_size, 4096);
        assert_eq!(c.disks[1].spec.limits.iops, Some(1000));
        assert_eq!(c.pollers.count, Some(2));
    }

    #[test]
    fn written_back_configs_read_back_the_same() {
        let c = parse(Path::new("leapd.toml"), GOOD).unwrap();
        let out = ConfigOut {
            pollers: c.pollers.clone(),
            disk: c.disks.iter().map(|d| d.config.clone()).collect(),
            target: c.targets.iter().map(|t| t.config.clone()).collect(),
        };
        let text = out.to_toml().unwrap();
        let again = parse(Path::new("saved.toml"), &text).unwrap();
        let cfgs = |c: &Checked| c.disks.iter().map(|d| d.config.clone()).collect::<Vec<_>>();
        assert_eq!(cfgs(&again), cfgs(&c));
        let tcfgs = |c: &Checked| {
            c.targets
                .iter()
                .map(|t| t.config.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(tcfgs(&again), tcfgs(&c));
        assert_eq!(again.targets[0].namespaces[1].0, 3, "NSIDs are kept");
        assert_eq!(again.pollers.count, Some(2));
    }

    #[test]
    fn the_example_in_docs_checks() {
        let text = include_str!("../../docs/leapd.example.toml");
        let c = parse(Path::new("docs/leapd.example.toml"), text).unwrap();
        let kinds: Vec<&str> = c
            .disks
            .iter()
            .map(|d| match d.spec.kind {
                DiskKind::File(_) => "file",
                DiskKind::Ram => "ram",
                DiskKind::Null => "null",
                DiskKind::NvmeTcp(_) => "nvme-tcp",
                DiskKind::Vfio(_) => "vfio",
            })
            .collect();
        assert_eq!(kinds, ["file", "ram", "null"]);
        for d in &c.disks {
            assert!(d.socket.starts_with("leapd-data"), "{}", d.socket.display());
            assert!(d.socket.is_relative());
        }
    }

    /// Each broken file gets one line naming the place, the key or value, and what is wrong.
    #[test]
    fn broken_files_get_one_line_that_names_the_problem() {
        let disk = |extra: &str| {
            format!("[[disk]]\nname = \"d\"\nsocket = \"d.sock\"\ndisk = \"ram\"\n{extra}")
        };
        let target =
            |extra: &str| format!("[[target]]\nname = \"t\"\nlisten = \"127.0.0.1:4420\"\n{extra}");
        let two = "[[disk]]\nname = \"a\"\nsocket = \"x.sock\"\ndisk = \"ram\"\n\
                   [[disk]]\nname = \"b\"\nsocket = \"./x.sock\"\ndisk = \"null\"\n";
        let same_name = "[[disk]]\nname = \"a\"\nsocket = \"x.sock\"\ndisk = \"ram\"\n\
                         [[disk]]\nname = \"a\"\nsocket = \"y.sock\"\ndisk = \"null\"\n";
        let cases: Vec<(String, &str)> = vec![
            (disk("sise = 3\n"), "leapd.toml:5: unknown field `sise`"),
            (
                "[pollerz]\ncount = 1\n".into(),
                "leapd.toml:1: unknown field `pollerz`",
            ),
            (
                disk("queues = 0\n"),
                "leapd.toml:1: disk `d`: queues: 0 is not between 1 and 32",
            ),
            (disk("queues = \"two\"\n"), "leapd.toml:5: invalid type"),
            (
                disk("block_size = 1024\n"),
                "block_size: block size must be 512 or 4096",
            ),
            (
                disk("socket_mode = \"0999\"\n"),
                "socket_mode: bad socket mode `0999`",
            ),
            (
                "[[disk]]\nname = \"d\"\nsocket = \"d.sock\"\ndisk = \"ram,size=12Q\"\n".into(),
                "disk `d`: disk: bad size `12Q`",
            ),
            (
                "[[disk]]\nname = \"d\"\nsocket = \"d.sock\"\ndisk = \"ram,colour=red\"\n".into(),
                "disk `d`: disk: unknown disk option `colour`",
            ),
            (
                "[[disk]]\nname = \"d\"\nsocket = \"d.sock\"\ndisk = \"/nonexistent/x.img\"\n"
                    .into(),
                "/nonexistent/x.img does not exist (add `,size=SIZE` to create it)",
            ),
            (
                "[[disk]]\nname = \"d d\"\nsocket = \"d.sock\"\ndisk = \"ram\"\n".into(),
                "name `d d`: use 1 to 64 letters",
            ),
            (
                "[[disk]]\nname = \"d\"\ndisk = \"ram\"\n".into(),
                "missing field `socket`",
            ),
            (
                two.into(),
                "leapd.toml:5: disk `b`: socket ./x.sock already used by the disk at line 1",
            ),
            (
                same_name.into(),
                "leapd.toml:5: disk `a`: name already used by the disk at line 1",
            ),
            ("".into(), "no [[disk]] or [[target]] entries"),
            (
                target("colour = \"red\"\n"),
                "leapd.toml:4: unknown field `colour`",
            ),
            (
                "[[target]]\nname = \"t\"\nlisten = \"nowhere\"\n".into(),
                "target `t`: listen: `nowhere`",
            ),
            (
                target("nqn = \"leap target\"\n"),
                "target `t`: nqn: `leap target`: an NQN starts with `nqn.`",
            ),
            (
                target("queue_entries = 1\n"),
                "target `t`: queue_entries: 1 is not between 2 and 1024",
            ),
            (
                target("[[target.namespace]]\nnsid = 40\ndisk = \"ram\"\n"),
                "target `t`: namespace.nsid: 40 is not between 1 and max_namespaces (32)",
            ),
            (
                target(
                    "[[target.namespace]]\nnsid = 2\ndisk = \"ram\"\n\
                     [[target.namespace]]\nnsid = 2\ndisk = \"null\"\n",
                ),
                "target `t`: namespace.nsid: 2 is used twice",
            ),
            (
                target("[[target.namespace]]\ndisk = \"/nonexistent/t.img\"\n"),
                "target `t`: namespace.disk: /nonexistent/t.img does not exist",
            ),
            (
                format!("{}{}", target(""), target("")),
                "leapd.toml:4: target `t`: name already used by the target at line 1",
            ),
            (
                format!(
                    "{}[[target]]\nname = \"u\"\nlisten = \"127.0.0.1:4420\"\n",
                    target("")
                ),
                "target `u`: listen address 127.0.0.1:4420 already used by the target at line 1",
            ),
            (
                "[pollers]\ncores = \"3-1\"\n".into(),
                "leapd.toml:2: pollers.cores: '3-1': range runs backwards",
            ),
            (
                "[pollers]\ncount = 0\n".into(),
                "pollers.count: must be at least 1",
            ),
            ("[[disk]\n".into(), "leapd.toml:1: "),
        ];
        for (text, want) in &cases {
            let e = parse(Path::new("leapd.toml"), text)
                .err()
                .unwrap_or_else(|| {
                    panic!("accepted:\n{text}");
                });
            assert!(!e.contains('\n'), "more than one line: {e:?}");
            assert!(e.contains(want), "for\n{text}\nwanted `{want}` in: {e}");
        }
    }
}
