//! leapd: the Leap daemon.

mod agent;
mod bench;
mod config;
mod daemon;
mod diskspec;
mod metrics;
mod platform;
mod rpc;
mod serve;
mod signals;
mod target;

use clap::{Parser, Subcommand};
use diskspec::{DiskSpec, DISK_SYNTAX};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "leapd",
    version,
    about = "Leap: virtual NVMe storage runtime serving vhost-user-blk disks"
)]
struct Cli {
    /// Log lines as text (default) or as JSON objects, one per line (`ts`, `level`, `target`,
    /// `msg`, and each `key=value` field of an event line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// One log record as a JSON object. A message made of `key=value` words (leapd's event lines:
/// `event=disk_added disk=vm1 ...`) also gets each pair as a field.
fn json_record(ts: &str, level: log::Level, target: &str, msg: &str) -> serde_json::Value {
    let mut v =
        serde_json::json!({ "ts": ts, "level": level.as_str(), "target": target, "msg": msg });
    if msg.starts_with("event=") {
        for (k, val) in event_fields(msg) {
            if !["ts", "level", "target", "msg"].contains(&k) {
                v[k] = serde_json::Value::String(val);
            }
        }
    }
    v
}

/// The `key=value` pairs of an event line; a value in double quotes may hold spaces. Words that
/// are not pairs (a rate limiter's "(and 3 similar messages suppressed)") are skipped.
fn event_fields(msg: &str) -> Vec<(&str, String)> {
    let mut out = Vec::new();
    let mut rest = msg.trim_start();
    while !rest.is_empty() {
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        match rest[..end].split_once('=') {
            Some((k, v)) if !k.is_empty() && v.starts_with('"') => {
                let after = &rest[k.len() + 2..];
                let close = after.find('"').unwrap_or(after.len());
                out.push((k, after[..close].to_string()));
                rest = after.get(close + 1..).unwrap_or("").trim_start();
                continue;
            }
            Some((k, v)) if !k.is_empty() => out.push((k, v.to_string())),
            _ => {}
        }
        rest = rest[end..].trim_start();
    }
    out
}

fn init_logging(format: LogFormat) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    match format {
        LogFormat::Text => {
            b.format_timestamp_millis();
        }
        LogFormat::Json => {
            b.format(|buf, r| {
                use std::io::Write;
                let ts = buf.timestamp_millis().to_string();
                let msg = r.args().to_string();
                writeln!(buf, "{}", json_record(&ts, r.level(), r.target(), &msg))
            });
        }
    }
    b.init();
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve a disk over vhost-user-blk. With no options: ./leapd-data/disk0.img (8 GiB, sparse,
    /// created if absent) on ./leapd-data/disk0.sock.
    Serve(ServeArgs),
    /// Measure the data path in-process (in-process vhost-user driver → leapd → back end).
    Bench(bench::BenchArgs),
    /// Export disks over NVMe/TCP as the namespaces of one subsystem (with a discovery service).
    Target(target::TargetArgs),
    /// Check a configuration file (`leapd serve --config`) and print what it would serve.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// The host agent of the SoC modes: terminates vhost-user for the hypervisor and relays only
    /// control to `leapd serve --mode socvm|arm-soc` (no request data passes through it).
    Agent(agent::AgentArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Where leapd runs: host (a process serving vhost-user), socvm (an x86 VM behind a host
    /// agent), arm-soc (a SmartNIC's ARM cores behind a host agent), or auto (a SoC mode if a
    /// window onto host memory is found, else host; the choice is logged).
    #[arg(long, value_enum, default_value = "auto")]
    mode: platform::Mode,
    /// SoC modes: address host agents connect to.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7300")]
    listen: String,
    /// SoC modes: a file standing in for a window onto host memory instead of the ivshmem BARs
    /// (the tenant's RAM file; the agent's inflight file, recognized by its header); repeatable.
    /// For tests and for a SoC-mode leapd on the host itself.
    #[arg(long, value_name = "FILE")]
    window: Vec<PathBuf>,
    /// Serve the disks (and poller options) of a configuration file (docs/leapd.example.toml)
    /// instead of one disk from the command line.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket", "disk", "queues", "no_inflight"])]
    config: Option<PathBuf>,
    /// Unix socket to listen on (host mode).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The disk.
    #[arg(long, value_name = "SPEC", value_parser = parse_disk_arg, long_help = format!("The disk: {DISK_SYNTAX}. size creates or grows a sparse file; without size the file must exist."))]
    disk: Option<String>,
    /// The control API's socket (JSON-RPC 2.0; `leapctl -s PATH`). Default
    /// ./leapd-data/leapd.rpc, skipped with a warning if another leapd has it.
    #[arg(long, value_name = "PATH")]
    rpc_socket: Option<PathBuf>,
    /// Permissions of the control socket, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    rpc_socket_mode: u32,
    /// No control API.
    #[arg(long, conflicts_with = "rpc_socket")]
    no_rpc: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Number of virtqueues (default: one per CPU, at most 4).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=32))]
    queues: Option<u16>,
    /// Logical block size reported to the guest.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_block_size)]
    block_size: u32,
    /// Permissions of the socket, in octal.
    #[arg(long, value_name = "MODE", default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Do not offer inflight I/O tracking (INFLIGHT_SHMFD). Without it a leapd restarted after a
    /// crash cannot tell which requests its predecessor had finished: only for showing that.
    #[arg(long)]
    no_inflight: bool,
    #[command(flatten)]
    poll: PollerArgs,
}

/// Poller options shared by `serve` and `target`.
#[derive(clap::Args, Debug)]
pub(crate) struct PollerArgs {
    /// Number of poller threads (default: serve, one per queue; target, one per CPU; at most
    /// one per CPU and 4 for the target).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub pollers: Option<u16>,
    /// Longest time (µs) a poller keeps polling an idle disk before it sleeps; the actual window
    /// adapts below it (shrinks to zero when requests are sparse). Lower it on hosts where CPU is
    /// scarce, raise it for lower latency.
    #[arg(long, value_name = "US", default_value_t = 100)]
    pub idle_spin_us: u64,
    /// Pin each poller to its own CPU.
    #[arg(long)]
    pub pin: bool,
    /// Run one poller per listed core, pinned to it (e.g. `2-3` or `0,2,4-5`); queues are spread
    /// over them. Each poller's core and NUMA node are logged.
    #[arg(long, value_name = "LIST", value_parser = serve::parse_core_list)]
    pub cores: Option<serve::CoreList>,
}

/// clap's check of `--disk`: kept as written (the configuration model holds the text).
fn parse_disk_arg(s: &str) -> Result<String, String> {
    s.parse::<DiskSpec>().map(|_| s.to_string())
}

pub(crate) fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err(format!("block size must be 512 or 4096, not `{s}`")),
    }
}

pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("bad socket mode `{s}`: use octal like 0600"))
}

pub(crate) fn default_queues() -> u16 {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(4) as u16
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let mode = if a.mode == platform::Mode::Auto && a.socket.is_some() {
        log::info!("mode auto: --socket given (a vhost-user socket served here): host mode");
        platform::Mode::Host
    } else {
        a.mode
    };
    let platform = platform::select(mode, &a.window)?;
    let soc = !platform.windows().is_empty();
    if soc && a.socket.is_some() {
        return Err(format!(
            "--socket is for host mode: in {} mode the host agent owns the vhost-user socket",
            platform.name()
        ));
    }
    let embedded = a.config.is_none() && a.socket.is_none() && a.disk.is_none();
    let mut poll = a.poll;
    let mut pollers_cfg = config::Pollers::default();
    let mut targets = Vec::new();
    let disks = if let Some(file) = &a.config {
        let c = config::load(file)?;
        // The file's [pollers] settings win over the command line's.
        poll.pollers = c.pollers.count.or(poll.pollers);
        poll.idle_spin_us = c.pollers.idle_spin_us.unwrap_or(poll.idle_spin_us);
        poll.pin |= c.pollers.pin;
        if let Some(cores) = c.cores {
            poll.cores = Some(serve::CoreList(cores));
        }
        pollers_cfg = c.pollers;
        targets = c.targets;
        c.disks
    } else {
        let (socket, disk) = match (a.socket, a.disk) {
            (Some(s), Some(d)) => (s, d),
            (None, Some(d)) if soc => (PathBuf::new(), d),
            (None, None) => {
                let dir = PathBuf::from("leapd-data");
                let img = dir.join("disk0.img");
                let disk = if img.exists() {
                    img.display().to_string()
                } else {
                    log::info!("creating {} (8 GiB, sparse)", img.display());
                    format!("{},size=8G", img.display())
                };
                (dir.join("disk0.sock"), disk)
            }
            (None, Some(_)) => {
                return Err(
                    "--disk needs --socket too (or give neither for the default disk)".into(),
                )
            }
            (Some(_), None) => {
                return Err(
                    "--socket needs --disk too (or give neither for the default disk)".into(),
                )
            }
        };
        let cfg = config::DiskConfig {
            name: "disk0".into(),
            socket,
            disk,
            queues: Some(a.queues.unwrap_or_else(default_queues)),
            block_size: Some(a.block_size),
            inflight: Some(!a.no_inflight),
            socket_mode: Some(format!("{:o}", a.socket_mode)),
        };
        if !soc {
            if let Some(dir) = cfg.socket.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            }
        }
        vec![if soc {
            cfg.validate_without_socket()?
        } else {
            cfg.validate()?
        }]
    };
    let rpc = if a.no_rpc || soc {
        None
    } else {
        Some(serve::RpcOptions {
            explicit: a.rpc_socket.is_some(),
            path: a
                .rpc_socket
                .unwrap_or_else(|| PathBuf::from("leapd-data/leapd.rpc")),
            mode: a.rpc_socket_mode,
        })
    };
    let opts = serve::ServeOptions {
        disks,
        targets,
        pollers: poll.pollers.map(|p| p as usize),
        idle_spin: Duration::from_micros(poll.idle_spin_us),
        pin: poll.pin,
        cores: poll.cores.map(|c| c.0),
        listen: a.listen,
        rpc,
        metrics: a.metrics,
        config_file: a.config.clone(),
        pollers_cfg,
    };
    serve::run(&*platform, &opts, |o| print_attach(o, embedded))
}

fn check_config(file: &std::path::Path) -> Result<(), String> {
    let c = config::load(file)?;
    for d in &c.disks {
        println!(
            "disk {}: {} on {} ({} queue(s), {}-byte blocks)",
            d.name,
            d.spec.describe(),
            d.socket.display(),
            d.queues,
            d.block_size
        );
    }
    for t in &c.targets {
        let addrs: Vec<String> = t.listen.iter().map(|a| a.to_string()).collect();
        println!(
            "target {}: {} on {} ({} namespace(s){})",
            t.name,
            t.cfg.nqn,
            addrs.join(", "),
            t.namespaces.len(),
            t.namespaces
                .iter()
                .map(|(n, s)| format!(", {n}: {}", s.describe()))
                .collect::<String>()
        );
    }
    println!(
        "{}: OK, {} disk(s), {} target(s)",
        file.display(),
        c.disks.len(),
        c.targets.len()
    );
    Ok(())
}

/// Prints the QEMU arguments that attach the served disks.
fn print_attach(o: &serve::ServeOptions, embedded: bool) {
    if embedded {
        println!("leapd: serving the default disk; stop with Ctrl-C.");
    }
    for d in &o.disks {
        let sock = std::fs::canonicalize(&d.socket).unwrap_or_else(|_| d.socket.clone());
        println!("leapd: attach disk {} to a QEMU guest with:", d.name);
        println!(
            "  -object memory-backend-memfd,id=mem,size=1G,share=on -machine q35,memory-backend=mem -m 1G \\\n  \
             -chardev socket,id={0},path={1},reconnect-ms=1000 -device vhost-user-blk-pci,chardev={0},num-queues={2}",
            d.name,
            sock.display(),
            d.queues
        );
    }
    for t in &o.targets {
        println!(
            "leapd: NVMe/TCP target {} ({}); connect with: nvme connect -t tcp -a {} -s {} -n {}",
            t.name,
            t.cfg.nqn,
            t.listen[0].ip(),
            t.listen[0].port(),
            t.cfg.nqn
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let r = match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Target(a) => target::run(&*platform::detect(), a),
        Cmd::Agent(a) => agent::run(a),
        Cmd::CheckConfig { file } => check_config(&file),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("leapd: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::json_record;

    #[test]
    fn event_lines_become_json_fields() {
        let v = json_record(
            "2026-12-02T00:00:00.000Z",
            log::Level::Info,
            "leapd::daemon",
            "event=disk_added disk=vm1 queues=2 socket=/run/a.sock",
        );
        assert_eq!(v["event"], "disk_added");
        assert_eq!(v["disk"], "vm1");
        assert_eq!(v["queues"], "2");
        assert_eq!(v["level"], "INFO");
        let quoted = json_record(
            "t",
            log::Level::Warn,
            "leap_vhost::server",
            "event=frontend_disconnected disk=d1 error=\"bad ring: index 9\" (and 2 similar messages suppressed)",
        );
        assert_eq!(quoted["error"], "bad ring: index 9");
        assert_eq!(quoted["disk"], "d1");
        assert!(quoted.get("(and").is_none());
        let plain = json_record("t", log::Level::Warn, "x", "a=b but not an event");
        assert!(plain.get("a").is_none());
        assert_eq!(plain["msg"], "a=b but not an event");
    }
}
