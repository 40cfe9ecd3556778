//! A real Prometheus (Debian's `prometheus` package) scrapes `leapd serve --metrics` while the
//! in-process driver does verified I/O on the example config's ram disk; a query through
//! Prometheus's HTTP API must return a non-zero rate of the disk's reads, and the scrape must be
//! up. The endpoint itself is checked too: the latency histogram, the poller busy time, the
//! malformed-request and back-end families, and a 404 for other paths.
//!
//! Without a `prometheus` binary the test fails under CI=true and is skipped loudly elsewhere.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// GET `path` from `addr` (HTTP/1.0: the server closes when done). Returns (status, body).
fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

/// Percent-encodes a query parameter.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One instant query through Prometheus's HTTP API: the first sample's value, if any.
fn query(prom: &str, q: &str) -> Option<f64> {
    let (status, body) = get(prom, &format!("/api/v1/query?query={}", encode(q))).ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

/// Whether Prometheus accepts and evaluates `q` (status "success").
fn evaluates(prom: &str, q: &str) -> Result<(), String> {
    let (status, body) =
        get(prom, &format!("/api/v1/query?query={}", encode(q))).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if status == 200 && v["status"] == "success" {
        Ok(())
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// The PromQL expressions of the Grafana dashboard, with its variables filled in.
fn dashboard_queries() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana-leapd.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"].as_str().unwrap();
            out.push(e.replace("$__rate_interval", "10s").replace("$disk", ".*"));
        }
    }
    out
}

/// The value of the sample on the line that starts with `series` in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child killed if the test fails before it ends it.
struct Killed(Option<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn prometheus_binary() -> Option<&'static str> {
    let bin = "/usr/bin/prometheus";
    if Path::new(bin).exists() {
        return Some(bin);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "prometheus is not installed (/usr/bin/prometheus): scripts/install-deps.sh installs \
             Debian's `prometheus` package; CI=true needs it"
        );
    }
    eprintln!(
        "\n*** SKIPPED the_prometheus_server_scrapes_leapd: /usr/bin/prometheus is missing \
         (apt-get install prometheus, or scripts/install-deps.sh) ***\n"
    );
    None
}

#[test]
fn the_prometheus_server_scrapes_leapd() {
    let Some(prom_bin) = prometheus_binary() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/leapd.example.toml");
    let mut leapd = leap_tests::program(env!("CARGO_BIN_EXE_leapd"))
        .args(["serve", "--config"])
        .arg(&example)
        .args(["--metrics", "127.0.0.1:0", "--no-rpc"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn leapd");
    let line = leap_tests::log_until(&mut leapd, "event=metrics_listening");
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .expect("the metrics address in the log")
        .to_string();
    let mut leapd = Killed(Some(leapd));
    let sock = dir.path().join("leapd-data/ram0.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no ram0 socket");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The endpoint as Prometheus will see it, before any I/O.
    let (status, text) = get(&addr, "/metrics").unwrap();
    assert_eq!(status, 200, "{text}");
    for family in [
        "# TYPE leap_disk_ops counter",
        "# TYPE leap_disk_latency_seconds histogram",
        "# TYPE leap_disk_inflight gauge",
        "# TYPE leap_disk_malformed counter",
        "# TYPE leap_poller_busy_seconds counter",
        "# TYPE leap_poller_busy_ratio gauge",
        "# TYPE leap_poller_wakeups counter",
        "leap_disk_backend_events_total{disk=\"file0\",event=\"direct_fallbacks\"} 0",
        "leap_disk_malformed_total{disk=\"ram0\",reason=\"range\"} 0",
        "# EOF",
    ] {
        assert!(text.contains(family), "no `{family}` in:\n{text}");
    }
    assert_eq!(get(&addr, "/nothing").unwrap().0, 404);
    // Every metric the Grafana dashboard plots is one leapd exports.
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "{queries:?}");
    for q in &queries {
        for name in q
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("leap_"))
        {
            let base = ["_total", "_bucket"]
                .iter()
                .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
            assert!(
                text.contains(&format!("# TYPE {base} ")),
                "the dashboard plots {name}, which leapd does not export"
            );
        }
    }

    // Prometheus scraping leapd every second.
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: leapd\n    static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let prom = Killed(Some(
        Command::new(prom_bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(prom_log)
            .spawn()
            .expect("spawn prometheus"),
    ));

    // Reads (verified writes, then reads) on ram0 until Prometheus reports their rate.
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let io = std::thread::spawn(move || {
        let mut rounds = 0;
        while !s2.load(Ordering::Relaxed) {
            rounds += leap_tests::verified_io(&sock, 3, true, 512, 16, Duration::from_secs(20))
                .unwrap_or_else(|(_, e)| panic!("I/O on ram0: {e}"));
        }
        rounds
    });
    let rate_q = "sum(rate(leap_disk_ops_total{disk=\"ram0\",op=\"read\"}[10s]))";
    let t = Instant::now();
    let mut rate = None;
    while t.elapsed() < Duration::from_secs(90) {
        rate = query(&prom_addr, rate_q).filter(|r| *r > 0.0);
        if rate.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let up = query(&prom_addr, "up{job=\"leapd\"}");
    stop.store(true, Ordering::Relaxed);
    let rounds = io.join().unwrap();
    let prom_text = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let rate = rate.unwrap_or_else(|| {
        panic!(
            "Prometheus reported no read rate for ram0 within 90 s (up={up:?}, {rounds} rounds \
             of I/O); its log:\n{prom_text}"
        )
    });
    assert_eq!(up, Some(1.0), "the scrape of leapd is not up");
    for q in &queries {
        if let Err(e) = evaluates(&prom_addr, q) {
            panic!("Prometheus refuses the dashboard's query {q}: {e}");
        }
    }
    eprintln!("prometheus: ram0 read rate {rate:.1}/s after {rounds} rounds of I/O");

    // What the reads left in the histogram and the poller counters.
    let (_, text) = get(&addr, "/metrics").unwrap();
    let count = sample(
        &text,
        "leap_disk_latency_seconds_count{disk=\"ram0\",op=\"read\"}",
    )
    .expect("a read latency count");
    let reads: f64 = text
        .lines()
        .filter(|l| l.starts_with("leap_disk_ops_total{disk=\"ram0\"") && l.contains("op=\"read\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        reads > 0.0 && count >= reads,
        "{count} latencies for {reads} reads"
    );
    assert_eq!(
        sample(
            &text,
            "leap_disk_latency_seconds_bucket{le=\"+Inf\",disk=\"ram0\",op=\"read\"}"
        )
        .or_else(|| sample(
            &text,
            "leap_disk_latency_seconds_bucket{disk=\"ram0\",op=\"read\",le=\"+Inf\"}"
        )),
        Some(count),
        "the +Inf bucket holds every latency"
    );
    let busy = sample(&text, "leap_poller_busy_seconds_total{poller=\"0\"}").unwrap();
    assert!(busy > 0.0, "poller 0 never busy");
    drop(prom);
    let status = leap_tests::terminate(leapd.0.take().unwrap());
    assert!(status.success(), "leapd exited with {status}");
}
