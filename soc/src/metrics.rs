//! `--metrics ADDR`: the Prometheus endpoint (`GET /metrics`, OpenMetrics text, encoded with the
//! prometheus-client crate).
//!
//! Nothing here touches the I/O path: pollers only bump their own per-queue relaxed counters and
//! histograms (see `leap_runtime::stats`). A scrape reads them through a [`Collector`], sums
//! what needs summing and encodes the result. It allocates, and takes the daemon's disk and
//! target tables and each target's list of connected queues: locks the data path never takes
//! (a closing connection takes its target's list once, on its way out).
//!
//! Families (all prefixed `leap_`): per disk and queue, operations, bytes, in-flight depth,
//! errors, throttled commands; per disk, latency histograms by class, malformed requests by
//! reason and back-end events (retries, reconnects, page-cache fallbacks, window bytes); per
//! poller, busy seconds, a busy ratio since the previous scrape, wake-ups, rounds and CPU time;
//! per NVMe/TCP target, connections, open queues, PDUs, rejects and retries, operations, bytes
//! and latency. `docs/operations.md` lists them with their labels.

use leap_runtime::backend::Backend;
use leap_runtime::nvmf::target::Subsystem;
use leap_runtime::stats::{Histogram, IoStats, OpClass, BUCKETS};
use leap_runtime::{DeviceIoStats, Poller};
use leap_vhost::VhostStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A disk as the metrics see it.
#[derive(Clone)]
pub struct DiskView {
    /// Its name (the `disk` label).
    pub name: String,
    /// Per-queue I/O counters.
    pub io: Arc<DeviceIoStats>,
    /// Malformed requests by reason.
    pub malformed: Arc<VhostStats>,
    /// The back end (its size and event counters).
    pub backend: Arc<dyn Backend>,
}

/// An NVMe/TCP target as the metrics see it.
#[derive(Clone)]
pub struct TargetView {
    /// Its name (the `target` label).
    pub name: String,
    /// Its subsystem.
    pub subsystem: Arc<Subsystem>,
}

/// Where the metrics come from: the daemon's disks and targets, read at each scrape.
pub trait Source: Send + Sync {
    /// The disks now.
    fn disks(&self) -> Vec<DiskView>;
    /// The targets now.
    fn targets(&self) -> Vec<TargetView> {
        Vec::new()
    }
}

/// A fixed set of disks and targets (`leapd target`, the SoC modes).
pub struct Fixed {
    /// The disks.
    pub disks: Vec<DiskView>,
    /// The targets.
    pub targets: Vec<TargetView>,
}

impl Source for Fixed {
    fn disks(&self) -> Vec<DiskView> {
        self.disks.clone()
    }
    fn targets(&self) -> Vec<TargetView> {
        self.targets.clone()
    }
}

struct LeapCollector {
    source: Arc<dyn Source>,
    pollers: Arc<Vec<Poller>>,
    /// Each poller's (age, busy) at the previous scrape, for the busy ratio and to keep the
    /// busy counter from going back: a scrape racing a wake-up can see one idle spell twice.
    last: Mutex<Vec<(Duration, Duration)>>,
}

impl std::fmt::Debug for LeapCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeapCollector")
            .field("pollers", &self.pollers.len())
            .finish()
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric family: a descriptor, then one sample per label set.
struct Family<'e> {
    m: MetricEncoder<'e>,
}

fn family<'e>(
    enc: &'e mut DescriptorEncoder,
    name: &'e str,
    help: &str,
    ty: MetricType,
) -> Result<Family<'e>, std::fmt::Error> {
    Ok(Family {
        m: enc.encode_descriptor(name, help, None, ty)?,
    })
}

impl Family<'_> {
    fn counter(&mut self, labels: &Labels, v: u64) -> Result<(), std::fmt::Error> {
        self.m
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)
    }
    fn counter_f(&mut self, labels: &Labels, v: f64) -> Result<(), std::fmt::Error> {
        self.m
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, f64>(&v, None)
    }
    fn gauge(&mut self, labels: &Labels, v: f64) -> Result<(), std::fmt::Error> {
        self.m.encode_family(labels)?.encode_gauge(&v)
    }
    /// A counter or gauge sample of a whole number.
    fn sample(&mut self, ty: MetricType, labels: &Labels, v: u64) -> Result<(), std::fmt::Error> {
        match ty {
            MetricType::Gauge => self.gauge(labels, v as f64),
            _ => self.counter(labels, v),
        }
    }
    fn histogram(&mut self, labels: &Labels, h: &[&Histogram]) -> Result<(), std::fmt::Error> {
        let mut counts = [0u64; BUCKETS];
        let mut sum_ns = 0u64;
        for x in h {
            sum_ns += x.add_to(&mut counts);
        }
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(k, c)| (Histogram::bound(k), *c))
            .collect();
        let count = counts.iter().sum();
        self.m
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum_ns as f64 * 1e-9, count, &buckets, None)
    }
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// A family read from each queue's [`IoStats`]: per disk and queue, and (when it has a
/// `target_name`) per target, summed over its connections.
struct QueueFamily {
    disk_name: &'static str,
    target_name: &'static str,
    help: &'static str,
    ty: MetricType,
    /// The label that tells the samples of one queue apart (`op`, `kind`), if any.
    label: Option<&'static str>,
    /// The samples of one queue: (label value, value).
    samples: fn(&IoStats) -> Vec<(&'static str, u64)>,
}

const QUEUE_FAMILIES: [QueueFamily; 5] = [
    QueueFamily {
        disk_name: "leap_disk_ops",
        target_name: "leap_target_ops",
        help: "Commands completed successfully, by operation",
        ty: MetricType::Counter,
        label: Some("op"),
        samples: |s| OPS.iter().map(|(op, c)| (*op, load(c(s)))).collect(),
    },
    QueueFamily {
        disk_name: "leap_disk_bytes",
        target_name: "leap_target_bytes",
        help: "Bytes read and written",
        ty: MetricType::Counter,
        label: Some("op"),
        samples: |s| vec![("read", load(&s.bytes_read)), ("write", load(&s.bytes_written))],
    },
    QueueFamily {
        disk_name: "leap_disk_inflight",
        target_name: "",
        help: "Commands taken off the queue and not yet completed",
        ty: MetricType::Gauge,
        label: None,
        samples: |s| vec![("", s.in_flight())],
    },
    QueueFamily {
        disk_name: "leap_disk_errors",
        target_name: "",
        help: "Commands that failed: refused as invalid (range, opcode, data pointer) or failed by the back end",
        ty: MetricType::Counter,
        label: Some("kind"),
        samples: |s| vec![("invalid", load(&s.invalid)), ("backend", load(&s.errors))],
    },
    QueueFamily {
        disk_name: "leap_disk_throttled",
        target_name: "",
        help: "Commands a rate limit held back",
        ty: MetricType::Counter,
        label: None,
        samples: |s| vec![("", load(&s.throttled))],
    },
];

/// Back-end counters with this prefix are bytes through a SoC window, not events.
const WINDOW: &str = "window_bytes_";

/// Picks one counter of an [`IoStats`].
type Field = fn(&IoStats) -> &std::sync::atomic::AtomicU64;

/// Operation counters of [`IoStats`] with their `op` label.
const OPS: [(&str, Field); 5] = [
    ("read", |s| &s.reads),
    ("write", |s| &s.writes),
    ("flush", |s| &s.flushes),
    ("discard", |s| &s.discards),
    ("write_zeroes", |s| &s.write_zeroes),
];

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Collector for LeapCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let disks = self.source.disks();
        let targets = self.source.targets();
        let per_queue = |d: &DiskView| -> Vec<(String, Arc<IoStats>)> {
            d.io.per_queue()
                .iter()
                .enumerate()
                .map(|(q, s)| (q.to_string(), s.clone()))
                .collect()
        };

        let mut f = family(&mut enc, "leap_build", "leapd's version", MetricType::Gauge)?;
        f.gauge(&l(&[("version", env!("CARGO_PKG_VERSION"))]), 1.0)?;

        let mut f = family(
            &mut enc,
            "leap_disk_size_bytes",
            "Disk size",
            MetricType::Gauge,
        )?;
        for d in &disks {
            let i = d.backend.info();
            f.gauge(
                &l(&[("disk", &d.name), ("backend", d.backend.kind())]),
                i.size as f64,
            )?;
        }

        for fam in &QUEUE_FAMILIES {
            let mut f = family(&mut enc, fam.disk_name, fam.help, fam.ty)?;
            for d in &disks {
                for (q, s) in per_queue(d) {
                    for (v, value) in (fam.samples)(&s) {
                        let mut labels = l(&[("disk", &d.name), ("queue", &q)]);
                        labels.extend(fam.label.map(|k| (k, v.to_string())));
                        f.sample(fam.ty, &labels, value)?;
                    }
                }
            }
        }

        let mut f = family(
            &mut enc,
            "leap_disk_latency_seconds",
            "Time from taking a command off its queue to its completion (all queues)",
            MetricType::Histogram,
        )?;
        for d in &disks {
            let qs = d.io.per_queue();
            for class in OpClass::ALL {
                let h: Vec<&Histogram> = qs.iter().map(|s| &s.latency[class as usize]).collect();
                f.histogram(&l(&[("disk", &d.name), ("op", class.name())]), &h)?;
            }
        }

        let mut f = family(
            &mut enc,
            "leap_disk_malformed",
            "Requests refused before reaching the queue, by reason",
            MetricType::Counter,
        )?;
        for d in &disks {
            for (reason, v) in d.malformed.snapshot() {
                f.counter(&l(&[("disk", &d.name), ("reason", reason)]), v)?;
            }
        }

        let counters: Vec<Vec<(&str, u64)>> = disks.iter().map(|d| d.backend.counters()).collect();
        let mut f = family(
            &mut enc,
            "leap_disk_backend_events",
            "Events the back end counts: retries and reconnects (nvme-tcp), page-cache fallbacks (file)",
            MetricType::Counter,
        )?;
        for (d, c) in disks.iter().zip(&counters) {
            for (event, v) in c.iter().filter(|(n, _)| !n.starts_with(WINDOW)) {
                f.counter(&l(&[("disk", &d.name), ("event", event)]), *v)?;
            }
        }

        let mut f = family(
            &mut enc,
            "leap_disk_window_bytes",
            "SoC modes: request data copied across the window onto tenant memory (in: from it, out: to it)",
            MetricType::Counter,
        )?;
        for (d, c) in disks.iter().zip(&counters) {
            for (name, v) in c.iter() {
                if let Some(dir) = name.strip_prefix(WINDOW) {
                    f.counter(&l(&[("disk", &d.name), ("direction", dir)]), *v)?;
                }
            }
        }

        self.encode_pollers(&mut enc)?;
        encode_targets(&mut enc, &targets)
    }
}

impl LeapCollector {
    fn encode_pollers(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (now, ratios) = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let now: Vec<(Duration, Duration)> = self
                .pollers
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let (_, b0) = last.get(i).copied().unwrap_or_default();
                    (p.age(), p.busy().max(b0))
                })
                .collect();
            let ratios: Vec<f64> = now
                .iter()
                .enumerate()
                .map(|(i, &(age, busy))| {
                    let (a0, b0) = last.get(i).copied().unwrap_or_default();
                    let da = age.saturating_sub(a0).as_secs_f64();
                    if da <= 0.0 {
                        0.0
                    } else {
                        (busy.saturating_sub(b0).as_secs_f64() / da).clamp(0.0, 1.0)
                    }
                })
                .collect();
            *last = now.clone();
            (now, ratios)
        };
        let name = |i: usize| i.to_string();
        let mut f = family(
            enc,
            "leap_poller_busy_seconds",
            "Time each poller spent working (not spinning idle or asleep)",
            MetricType::Counter,
        )?;
        for (i, (_, busy)) in now.iter().enumerate() {
            f.counter_f(&l(&[("poller", &name(i))]), busy.as_secs_f64())?;
        }

        let mut f = family(
            enc,
            "leap_poller_busy_ratio",
            "Share of time each poller worked since the previous scrape (0..1)",
            MetricType::Gauge,
        )?;
        for (i, r) in ratios.iter().enumerate() {
            f.gauge(&l(&[("poller", &name(i))]), *r)?;
        }

        let mut f = family(
            enc,
            "leap_poller_cpu_seconds",
            "CPU time of each poller thread (spinning included)",
            MetricType::Counter,
        )?;
        for (i, p) in self.pollers.iter().enumerate() {
            f.counter_f(&l(&[("poller", &name(i))]), p.cpu_time().as_secs_f64())?;
        }

        for (metric, help, get) in [
            (
                "leap_poller_wakeups",
                "Times each poller slept and was woken",
                (|p: &Poller| load(&p.stats().sleeps)) as fn(&Poller) -> u64,
            ),
            ("leap_poller_rounds", "Poll rounds", |p: &Poller| {
                load(&p.stats().rounds)
            }),
            (
                "leap_poller_completed",
                "Commands completed to their front ends",
                |p: &Poller| load(&p.stats().completed),
            ),
        ] {
            let mut f = family(enc, metric, help, MetricType::Counter)?;
            for (i, p) in self.pollers.iter().enumerate() {
                f.counter(&l(&[("poller", &name(i))]), get(p))?;
            }
        }
        Ok(())
    }
}

fn encode_targets(
    enc: &mut DescriptorEncoder,
    targets: &[TargetView],
) -> Result<(), std::fmt::Error> {
    let totals: Vec<_> = targets.iter().map(|t| t.subsystem.totals()).collect();
    let mut f = family(
        enc,
        "leap_target_connections",
        "Connections (admin and I/O queues) that completed the handshake",
        MetricType::Counter,
    )?;
    for t in targets {
        f.counter(
            &l(&[("target", &t.name)]),
            load(&t.subsystem.stats().connections),
        )?;
    }

    let mut f = family(
        enc,
        "leap_target_queues_open",
        "Queues connected now",
        MetricType::Gauge,
    )?;
    for (t, x) in targets.iter().zip(&totals) {
        f.gauge(&l(&[("target", &t.name)]), x.open_queues as f64)?;
    }

    let mut f = family(
        enc,
        "leap_target_inflight",
        "Admitted commands in flight over all queues",
        MetricType::Gauge,
    )?;
    for t in targets {
        f.gauge(&l(&[("target", &t.name)]), t.subsystem.inflight() as f64)?;
    }

    let mut f = family(
        enc,
        "leap_target_pdus",
        "PDUs by direction",
        MetricType::Counter,
    )?;
    for (t, x) in targets.iter().zip(&totals) {
        f.counter(&l(&[("target", &t.name), ("direction", "rx")]), x.pdus_rx)?;
        f.counter(&l(&[("target", &t.name), ("direction", "tx")]), x.pdus_tx)?;
    }

    let mut f = family(
        enc,
        "leap_target_events",
        "Overload rejects (retryable), retried commands admitted, failed handshakes, fatal protocol errors, digest errors, keep-alive timeouts",
        MetricType::Counter,
    )?;
    for t in targets {
        let s = t.subsystem.stats();
        for (event, c) in [
            ("reject", &s.rejects),
            ("retry_admitted", &s.retries_admitted),
            ("handshake_failure", &s.handshake_failures),
            ("fatal_error", &s.fatal_errors),
            ("digest_error", &s.digest_errors),
            ("keep_alive_timeout", &s.keep_alive_timeouts),
        ] {
            f.counter(&l(&[("target", &t.name), ("event", event)]), load(c))?;
        }
    }

    for fam in QUEUE_FAMILIES.iter().filter(|f| !f.target_name.is_empty()) {
        let mut f = family(enc, fam.target_name, fam.help, fam.ty)?;
        for (t, x) in targets.iter().zip(&totals) {
            for (v, value) in (fam.samples)(&x.io) {
                let mut labels = l(&[("target", &t.name)]);
                labels.extend(fam.label.map(|k| (k, v.to_string())));
                f.sample(fam.ty, &labels, value)?;
            }
        }
    }

    let mut f = family(
        enc,
        "leap_target_latency_seconds",
        "Time from taking a command off its queue to its completion",
        MetricType::Histogram,
    )?;
    for (t, x) in targets.iter().zip(&totals) {
        for class in OpClass::ALL {
            f.histogram(
                &l(&[("target", &t.name), ("op", class.name())]),
                &[&x.io.latency[class as usize]],
            )?;
        }
    }
    Ok(())
}

/// The metrics endpoint: an HTTP thread answering `GET /metrics` until dropped.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (loopback unless you mean otherwise) and serves the metrics of
    /// `source` and `pollers`.
    pub fn start(
        addr: &str,
        source: Arc<dyn Source>,
        pollers: Arc<Vec<Poller>>,
    ) -> Result<MetricsServer, String> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| format!("--metrics {addr}: cannot listen: {e}"))?;
        let local = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| format!("--metrics {addr}: not an IP address"))?;
        let server = Arc::new(server);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(LeapCollector {
            last: Mutex::new(Vec::new()),
            source,
            pollers,
        }));
        let s = server.clone();
        let thread = std::thread::Builder::new()
            .name("leap-metrics".into())
            .spawn(move || serve(&s, &registry))
            .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
        log::info!("event=metrics_listening addr={local} path=/metrics");
        Ok(MetricsServer {
            server,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Encodes every metric (the text a scrape returns).
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(64 << 10);
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

fn serve(server: &tiny_http::Server, registry: &Registry) {
    // A constant header: it always parses (and a scrape without it still reads as text).
    let content_type = tiny_http::Header::from_bytes(
        &b"Content-Type"[..],
        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
    )
    .ok();
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("");
        let resp = match (req.method(), path) {
            (tiny_http::Method::Get, "/metrics") => match render(registry) {
                Ok(body) => {
                    let mut r = tiny_http::Response::from_string(body);
                    if let Some(h) = &content_type {
                        r.add_header(h.clone());
                    }
                    r.boxed()
                }
                Err(_) => tiny_http::Response::from_string("cannot encode the metrics\n")
                    .with_status_code(500)
                    .boxed(),
            },
            (tiny_http::Method::Get, "/") => {
                tiny_http::Response::from_string("leapd: metrics are at /metrics\n").boxed()
            }
            (tiny_http::Method::Get, _) => {
                tiny_http::Response::from_string("not found: try /metrics\n")
                    .with_status_code(404)
                    .boxed()
            }
            _ => tiny_http::Response::from_string("only GET\n")
                .with_status_code(405)
                .boxed(),
        };
        if let Err(e) = req.respond(resp) {
            log::debug!("metrics: answering a scrape: {e}");
        }
    }
}
