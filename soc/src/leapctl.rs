//! leapctl: the command-line client of leapd's control API (JSON-RPC 2.0 on a unix socket,
//! docs/control-api.md), in the style of SPDK's `rpc.py -s`. Human tables by default, the JSON
//! result with `--json`.

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "leapctl",
    version,
    about = "Control a running leapd (its JSON-RPC socket)"
)]
struct Cli {
    /// leapd's control socket (`leapd serve --rpc-socket`).
    #[arg(
        short = 's',
        long,
        value_name = "PATH",
        default_value = "leapd-data/leapd.rpc"
    )]
    socket: PathBuf,
    /// Print the JSON result instead of a table (for scripts).
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// leapd's version.
    Version,
    /// Disks: list, add, remove, stats.
    Disk {
        #[command(subcommand)]
        cmd: DiskCmd,
    },
    /// NVMe/TCP targets and their namespaces: list, add, remove, ns-add, ns-remove.
    Target {
        #[command(subcommand)]
        cmd: TargetCmd,
    },
    /// The running configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum TargetCmd {
    /// Every target with its namespaces.
    List,
    /// Start a target (the keys of a `[[target]]` table).
    Add {
        /// A unique name.
        name: String,
        /// Address to listen on (IP:PORT).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: String,
        /// Subsystem NQN (default nqn.2026-12.io.leap:NAME).
        #[arg(long, value_name = "NQN")]
        nqn: Option<String>,
        /// A namespace's back end, `--disk` syntax (repeatable: NSIDs 1, 2, ...).
        #[arg(long, value_name = "SPEC")]
        disk: Vec<String>,
        /// Logical block size (512 or 4096).
        #[arg(long, value_name = "BYTES")]
        block_size: Option<u32>,
        /// Only this host NQN may connect (repeatable).
        #[arg(long, value_name = "NQN")]
        allow_host: Vec<String>,
    },
    /// Stop a target (its hosts' in-flight commands complete; the rest of leapd goes on).
    Remove {
        /// The target.
        name: String,
    },
    /// Attach a namespace to a running target; connected hosts are told.
    NsAdd {
        /// The target.
        target: String,
        /// The back end, `--disk` syntax.
        #[arg(long, value_name = "SPEC")]
        disk: String,
        /// Its NSID (default: the lowest free one).
        #[arg(long, value_name = "N")]
        nsid: Option<u32>,
    },
    /// Detach a namespace (in-flight commands complete; the target's other namespaces go on).
    NsRemove {
        /// The target.
        target: String,
        /// The NSID.
        nsid: u32,
    },
}

#[derive(Subcommand)]
enum DiskCmd {
    /// Every disk.
    List,
    /// Serve a new disk (the keys of a `[[disk]]` table).
    Add {
        /// A unique name.
        name: String,
        /// Its vhost-user socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The back end, in `leapd serve --disk` syntax.
        #[arg(long, value_name = "SPEC")]
        disk: String,
        /// Virtqueues.
        #[arg(long, value_name = "N")]
        queues: Option<u16>,
        /// Logical block size (512 or 4096).
        #[arg(long, value_name = "BYTES")]
        block_size: Option<u32>,
        /// Socket permissions, octal.
        #[arg(long, value_name = "MODE")]
        socket_mode: Option<String>,
        /// Do not offer inflight I/O tracking.
        #[arg(long)]
        no_inflight: bool,
    },
    /// Stop serving a disk (in-flight I/O completes first; the other disks go on).
    Remove {
        /// The disk.
        name: String,
    },
    /// Replace a disk's rate limits while it serves (none given: unlimited).
    Limits {
        /// The disk.
        name: String,
        /// Commands per second, reads and writes.
        #[arg(long, value_name = "N")]
        iops: Option<u64>,
        /// Reads per second.
        #[arg(long, value_name = "N")]
        iops_rd: Option<u64>,
        /// Writes per second.
        #[arg(long, value_name = "N")]
        iops_wr: Option<u64>,
        /// Bytes per second, reads and writes (100M, 1G, ...).
        #[arg(long, value_name = "SIZE")]
        bps: Option<String>,
        /// Bytes read per second.
        #[arg(long, value_name = "SIZE")]
        bps_rd: Option<String>,
        /// Bytes written per second.
        #[arg(long, value_name = "SIZE")]
        bps_wr: Option<String>,
    },
    /// Counters of one disk, or of all.
    Stats {
        /// The disk (default: all).
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the running configuration (TOML; JSON with --json).
    Get,
    /// Write it back: to PATH, or to the file leapd was started with (`--config`).
    Save {
        /// Where.
        path: Option<PathBuf>,
    },
}

fn call(socket: &PathBuf, method: &str, params: Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "{}: {e} (is leapd running? give its control socket with -s)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(|e| e.to_string())?;
    let mut req =
        json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }).to_string();
    req.push('\n');
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading leapd's answer: {e}"))?;
    let v: Value = serde_json::from_str(&line).map_err(|e| format!("leapd's answer: {e}"))?;
    if let Some(err) = v.get("error") {
        return Err(err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("unknown error")
            .to_string());
    }
    Ok(v.get("result").cloned().unwrap_or(Value::Null))
}

fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(x) => x.to_string(),
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 40 && b % (1 << 40) == 0 => format!("{}T", b >> 40),
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}G", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b => b.to_string(),
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let (method, params) = match &cli.cmd {
        Cmd::Version => ("leapd_version", json!({})),
        Cmd::Disk { cmd } => match cmd {
            DiskCmd::List => ("disk_list", json!({})),
            DiskCmd::Add {
                name,
                socket,
                disk,
                queues,
                block_size,
                socket_mode,
                no_inflight,
            } => {
                let mut p = json!({ "name": name, "socket": socket, "disk": disk });
                if let Some(q) = queues {
                    p["queues"] = json!(q);
                }
                if let Some(b) = block_size {
                    p["block_size"] = json!(b);
                }
                if let Some(m) = socket_mode {
                    p["socket_mode"] = json!(m);
                }
                if *no_inflight {
                    p["inflight"] = json!(false);
                }
                ("disk_add", p)
            }
            DiskCmd::Remove { name } => ("disk_remove", json!({ "name": name })),
            DiskCmd::Limits {
                name,
                iops,
                iops_rd,
                iops_wr,
                bps,
                bps_rd,
                bps_wr,
            } => {
                let mut p = json!({ "name": name });
                for (k, v) in [("iops", iops), ("iops_rd", iops_rd), ("iops_wr", iops_wr)] {
                    if let Some(v) = v {
                        p[k] = json!(v);
                    }
                }
                for (k, v) in [("bps", bps), ("bps_rd", bps_rd), ("bps_wr", bps_wr)] {
                    if let Some(v) = v {
                        p[k] = json!(v);
                    }
                }
                ("disk_set_limits", p)
            }
            DiskCmd::Stats { name } => match name {
                Some(n) => ("disk_stats", json!({ "name": n })),
                None => ("disk_stats", json!({})),
            },
        },
        Cmd::Target { cmd } => match cmd {
            TargetCmd::List => ("target_list", json!({})),
            TargetCmd::Add {
                name,
                listen,
                nqn,
                disk,
                block_size,
                allow_host,
            } => {
                let mut p = json!({ "name": name, "listen": listen });
                if let Some(n) = nqn {
                    p["nqn"] = json!(n);
                }
                if let Some(b) = block_size {
                    p["block_size"] = json!(b);
                }
                if !allow_host.is_empty() {
                    p["allow_hosts"] = json!(allow_host);
                }
                p["namespace"] = json!(disk
                    .iter()
                    .map(|d| json!({ "disk": d }))
                    .collect::<Vec<_>>());
                ("target_add", p)
            }
            TargetCmd::Remove { name } => ("target_remove", json!({ "name": name })),
            TargetCmd::NsAdd { target, disk, nsid } => {
                let mut p = json!({ "target": target, "disk": disk });
                if let Some(n) = nsid {
                    p["nsid"] = json!(n);
                }
                ("target_ns_add", p)
            }
            TargetCmd::NsRemove { target, nsid } => (
                "target_ns_remove",
                json!({ "target": target, "nsid": nsid }),
            ),
        },
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Get => ("config_get", json!({})),
            ConfigCmd::Save { path: Some(p) } => ("config_save", json!({ "path": p })),
            ConfigCmd::Save { path: None } => ("config_save", json!({})),
        },
    };
    let result = call(&cli.socket, method, params)?;
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    match &cli.cmd {
        Cmd::Version => println!("leapd {}", text(&result, "version")),
        Cmd::Disk { cmd } => match cmd {
            DiskCmd::List => {
                let rows: Vec<Vec<String>> = result
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|d| {
                        vec![
                            text(d, "name"),
                            text(d, "backend"),
                            size(d.get("size").and_then(Value::as_u64).unwrap_or(0)),
                            text(d, "queues"),
                            text(d, "block_size"),
                            text(d, "socket"),
                        ]
                    })
                    .collect();
                table(
                    &["NAME", "BACKEND", "SIZE", "QUEUES", "BLOCK", "SOCKET"],
                    &rows,
                );
            }
            DiskCmd::Add { name, .. } => println!("disk {name} added"),
            DiskCmd::Remove { name } => println!("disk {name} removed"),
            DiskCmd::Limits { name, .. } => println!("disk {name}: limits set"),
            DiskCmd::Stats { .. } => {
                let cols = [
                    "reads",
                    "writes",
                    "flushes",
                    "bytes_read",
                    "bytes_written",
                    "errors",
                ];
                let rows: Vec<Vec<String>> = result
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(name, c)| {
                                let get = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
                                let malformed: u64 = c
                                    .as_object()
                                    .map(|o| {
                                        o.iter()
                                            .filter(|(k, _)| k.starts_with("malformed_"))
                                            .filter_map(|(_, v)| v.as_u64())
                                            .sum()
                                    })
                                    .unwrap_or(0);
                                let mut r = vec![name.clone()];
                                r.extend(cols.iter().map(|k| get(k).to_string()));
                                r.push(malformed.to_string());
                                r
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(
                    &[
                        "DISK",
                        "READS",
                        "WRITES",
                        "FLUSHES",
                        "BYTES_READ",
                        "BYTES_WRITTEN",
                        "ERRORS",
                        "MALFORMED",
                    ],
                    &rows,
                );
            }
        },
        Cmd::Target { cmd } => match cmd {
            TargetCmd::List => {
                let mut rows: Vec<Vec<String>> = Vec::new();
                for t in result.as_array().map(|a| a.as_slice()).unwrap_or_default() {
                    let listen = t
                        .get("listen")
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        })
                        .unwrap_or_default();
                    let nss = t
                        .get("namespaces")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let ns_text = |n: &Value| {
                        format!(
                            "{}: {} {}",
                            text(n, "nsid"),
                            text(n, "backend"),
                            size(n.get("size").and_then(Value::as_u64).unwrap_or(0))
                        )
                    };
                    rows.push(vec![
                        text(t, "name"),
                        text(t, "nqn"),
                        listen,
                        text(t, "queues_open"),
                        nss.first().map(ns_text).unwrap_or_else(|| "-".into()),
                    ]);
                    for n in nss.iter().skip(1) {
                        rows.push(vec![
                            String::new(),
                            String::new(),
                            String::new(),
                            String::new(),
                            ns_text(n),
                        ]);
                    }
                }
                table(&["NAME", "NQN", "LISTEN", "QUEUES", "NAMESPACES"], &rows);
            }
            TargetCmd::Add { name, .. } => println!("target {name} added"),
            TargetCmd::Remove { name } => println!("target {name} removed"),
            TargetCmd::NsAdd { target, .. } => {
                println!("target {target}: namespace {} added", text(&result, "nsid"))
            }
            TargetCmd::NsRemove { target, nsid } => {
                println!("target {target}: namespace {nsid} removed")
            }
        },
        Cmd::Config { cmd } => match cmd {
            ConfigCmd::Get => print!(
                "{}",
                toml::to_string_pretty(&result).map_err(|e| e.to_string())?
            ),
            ConfigCmd::Save { .. } => println!("saved to {}", text(&result, "path")),
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leapctl: {e}");
            ExitCode::FAILURE
        }
    }
}
