//! The `--disk` option: `PATH[,size=SIZE][,direct=on|off][,readonly=on]`, where PATH may also be
//! `null` or `ram` for the in-memory back ends. One parser, one struct, used by the CLI and tests.

use std::path::PathBuf;

/// The syntax, for help texts and error messages.
pub const DISK_SYNTAX: &str =
    "PATH[,size=SIZE][,direct=on|off][,readonly=on]  (PATH may be `null` or `ram`)";

/// What kind of back end a disk spec names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A file or block device.
    File(PathBuf),
    /// The null back end.
    Null,
    /// A RAM disk.
    Ram,
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
            p => DiskKind::File(PathBuf::from(p)),
        };
        let mut spec = DiskSpec {
            kind,
            size: None,
            direct: false,
            read_only: false,
        };
        for opt in parts {
            let (k, v) = opt.split_once('=').ok_or_else(|| {
                format!("bad disk option `{opt}`: expected key=value; syntax: {DISK_SYNTAX}")
            })?;
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
    }
}
