//! `leapd bench`: the data path measured in-process. A vhost-user driver thread (the guest side)
//! keeps `iodepth` 4 KiB random reads (or writes) in flight on one virtqueue; leapd serves it with one poller
//! over the chosen back end. Prints IOPS, mean and p99 latency, and poller CPU time per I/O.

use crate::diskspec::{DiskKind, DiskSpec};
use leap_runtime::{DeviceIoStats, Namespace};
use leap_vhost::driver::{
    blk_status, submit_blk, Desc, Driver, DriverOptions, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use leap_vhost::{DeviceConfig, DeviceContext, Server, VhostStats};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `leapd bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Back ends to measure, as `--disk` specs: `null`, `ram`, or a file such as
    /// `PATH,direct=on` (repeatable; default: null and ram). Buffers are 4 KiB aligned, so
    /// `direct=on` really bypasses the page cache; any request that did not is counted and
    /// reported.
    #[arg(long, value_name = "SPEC")]
    backend: Vec<String>,
    /// Queue depths to measure (repeatable; default: 1, 32 and 128).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=512))]
    iodepth: Vec<u16>,
    /// Seconds per case.
    #[arg(long, value_name = "S", default_value_t = 3.0)]
    seconds: f64,
    /// Random or sequential reads or writes.
    #[arg(long, value_name = "randread|randwrite|read|write", default_value = "randread", value_parser = ["randread", "randwrite", "read", "write"])]
    rw: String,
    /// Block size of each request, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 4096)]
    bs: u32,
    /// Size of null/ram disks (and of a file back end created for the run).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::diskspec::parse_size)]
    size: u64,
    /// Microseconds the poller spins idle before sleeping.
    #[arg(long, value_name = "US", default_value_t = 100)]
    idle_spin_us: u64,
    /// Bounce request data through local buffers, as the SoC modes do for window memory (the
    /// Host DRAM → SoC DRAM hop); rows are named `BACKEND+bounce`.
    #[arg(long)]
    bounce: bool,
}

/// One case's results.
struct Row {
    backend: String,
    qd: u16,
    iops: f64,
    mean_us: f64,
    p99_us: f64,
    cpu_ns_per_io: f64,
    /// Requests that bypassed O_DIRECT (page cache) although the disk asked for it.
    direct_fallbacks: u64,
}

/// Latency histogram: log2 buckets split 16 ways (≤ 6 % error), no allocation while recording.
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    sum_ns: u128,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            buckets: vec![0; 64 * 16],
            count: 0,
            sum_ns: 0,
        }
    }
    fn index(ns: u64) -> usize {
        if ns < 16 {
            return ns as usize;
        }
        let lg = 63 - ns.leading_zeros() as usize;
        let sub = ((ns >> (lg - 4)) & 15) as usize;
        (lg - 3) * 16 + sub
    }
    fn lower(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let lg = i / 16 + 3;
        (16 + (i % 16) as u64) << (lg - 4)
    }
    fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns).min(64 * 16 - 1)] += 1;
        self.count += 1;
        self.sum_ns += ns as u128;
    }
    fn quantile(&self, q: f64) -> u64 {
        let target = ((self.count as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= target.max(1) {
                return Self::lower(i);
            }
        }
        0
    }
}

fn run_case(backend_name: &str, qd: u16, a: &BenchArgs) -> Result<Row, String> {
    let mut spec: DiskSpec = backend_name.parse()?;
    match &spec.kind {
        DiskKind::Null | DiskKind::Ram => spec.size = spec.size.or(Some(a.size)),
        DiskKind::File(p) if !p.exists() => {
            let size = spec.size.unwrap_or(a.size);
            spec.size = Some(size);
            if spec.direct {
                // Reads of a hole never reach the disk: give the run real blocks to read.
                fill(p, size)?;
            }
        }
        DiskKind::File(_) | DiskKind::NvmeTcp(_) | DiskKind::Vfio(_) => {}
    }
    if let DiskKind::File(p) = &spec.kind {
        warn_if_sparse(p, backend_name);
    }
    let mut backend = crate::serve::open_backend(&spec, 512)?;
    if a.bounce {
        backend = Arc::new(
            leap_runtime::backend::BounceBackend::new(backend, crate::serve::BOUNCE_MAX_TRANSFER)
                .map_err(|e| e.to_string())?,
        );
    }
    let backend_ref = backend.clone();
    let size = backend.info().size;
    let platform = crate::platform::detect();
    let pollers = crate::serve::start_pollers(
        &*platform,
        &crate::serve::Placement::Float(1),
        Duration::from_micros(a.idle_spin_us),
    )?;
    let ctx = DeviceContext {
        ns: Namespace::with_limits(backend, &spec.limits),
        pollers: pollers.clone(),
        config: DeviceConfig {
            num_queues: 1,
            ..DeviceConfig::default()
        },
        stats: Arc::new(VhostStats::default()),
        io_stats: Arc::new(DeviceIoStats::new(1)),
        writeback: true,
    };
    let dir = tempfile_dir()?;
    let sock = dir.join("bench.sock");
    let mut server = Server::bind(&sock, 0o600, ctx).map_err(|e| e.to_string())?;
    let stop = server.stop_handle();
    let srv = std::thread::spawn(move || server.run());

    let queue_size = (qd as usize * 3).next_power_of_two().clamp(64, 1024) as u16;
    let mem = 16 << 20 | (qd as usize * a.bs as usize * 2);
    let mut drv = Driver::connect(
        &sock,
        DriverOptions {
            num_queues: 1,
            queue_size,
            mem_size: mem,
            event_idx: true,
            features_mask: 0,
            ..Default::default()
        },
    )
    .map_err(|e| format!("driver: {e}"))?;
    let mut bufs = Vec::new();
    for _ in 0..qd {
        bufs.push(
            drv.alloc(a.bs as usize, 4096)
                .map_err(|e| format!("driver: {e}"))?,
        );
    }
    let mut q = drv.take_queues().pop().ok_or("driver has no queue")?;
    q.set_interrupts(false);
    let blocks = size / a.bs as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let sequential = matches!(a.rw.as_str(), "read" | "write");
    let mut seq = 0u64;
    let mut next_sector = move || {
        let block = if sequential {
            seq = (seq + 1) % blocks;
            seq
        } else {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        };
        block * (a.bs as u64 / 512)
    };
    let mut started = vec![Instant::now(); queue_size as usize];
    let mut buf_of = vec![0usize; queue_size as usize];
    let mut hist = Histogram::new();
    // One clock read per batch: every request submitted in a batch shares its start time, and
    // every completion reaped in a batch its end time (clock reads cost ~100 ns on some VMs).
    let write = matches!(a.rw.as_str(), "randwrite" | "write");
    let submit = |q: &mut leap_vhost::driver::DriverQueue,
                  buf: usize,
                  now: Instant,
                  started: &mut [Instant],
                  buf_of: &mut [usize],
                  sector: u64|
     -> Result<(), String> {
        let data = if write {
            Desc::readable(bufs[buf], a.bs)
        } else {
            Desc::writable(bufs[buf], a.bs)
        };
        let head = submit_blk(
            q,
            if write {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            },
            sector,
            &[data],
        )
        .map_err(|e| format!("submit: {e}"))?;
        started[head as usize] = now;
        buf_of[head as usize] = buf;
        Ok(())
    };
    let now = Instant::now();
    for b in 0..qd as usize {
        submit(&mut q, b, now, &mut started, &mut buf_of, next_sector())?;
    }
    q.publish_and_kick();
    let cpu0 = pollers[0].cpu_time();
    let t0 = Instant::now();
    let dur = Duration::from_secs_f64(a.seconds);
    let mut last_progress = t0;
    let mut errors = 0u64;
    let mut done = 0u64;
    let mut spins = 0u32;
    loop {
        let mut now = None;
        while let Some((head, _len)) = q.poll_used() {
            let t = *now.get_or_insert_with(Instant::now);
            let h = head as usize;
            hist.record(t.duration_since(started[h]).as_nanos() as u64);
            if blk_status(&q, head) != 0 {
                errors += 1;
            }
            done += 1;
            submit(
                &mut q,
                buf_of[h],
                t,
                &mut started,
                &mut buf_of,
                next_sector(),
            )?;
        }
        let t = match now {
            Some(t) => {
                q.publish_and_kick();
                t
            }
            None => {
                std::hint::spin_loop();
                spins += 1;
                if spins % 256 != 0 {
                    continue;
                }
                Instant::now()
            }
        };
        if t.duration_since(t0) >= dur {
            break;
        }
        if t.duration_since(last_progress) >= Duration::from_secs(1) {
            last_progress = t;
            let s = t.duration_since(t0).as_secs_f64();
            eprint!(
                "\r  {backend_name} qd={qd}: {:>5.1}s  {:>10.0} IOPS   ",
                s,
                done as f64 / s
            );
            let _ = std::io::stderr().flush();
        }
    }
    let elapsed = t0.elapsed();
    let cpu = pollers[0].cpu_time().saturating_sub(cpu0);
    eprint!("\r{:60}\r", "");
    // Drain what is in flight, then disconnect.
    let drain_until = Instant::now() + Duration::from_secs(5);
    let mut inflight = qd as u64;
    while inflight > 0 && Instant::now() < drain_until {
        if q.poll_used().is_some() {
            inflight -= 1;
        }
    }
    drop(q);
    drv.disconnect();
    stop.stop();
    let _ = srv.join();
    drop(pollers);
    let _ = std::fs::remove_dir_all(&dir);
    let fallbacks = backend_ref.direct_fallbacks();
    if spec.direct && fallbacks > 0 {
        eprintln!(
            "leapd bench: WARNING: {fallbacks} of {done} requests on {backend_name} went through \
             the page cache although direct=on: this figure measures memory, not the disk"
        );
    }
    if errors > 0 {
        return Err(format!("{errors} requests failed during the run"));
    }
    Ok(Row {
        backend: if a.bounce {
            format!("{backend_name}+bounce")
        } else {
            backend_name.to_string()
        },
        qd,
        iops: done as f64 / elapsed.as_secs_f64(),
        mean_us: hist.sum_ns as f64 / hist.count.max(1) as f64 / 1000.0,
        p99_us: hist.quantile(0.99) as f64 / 1000.0,
        cpu_ns_per_io: cpu.as_nanos() as f64 / done.max(1) as f64,
        direct_fallbacks: fallbacks,
    })
}

/// Writes `size` bytes of non-zero data to a new file at `p`.
fn fill(p: &std::path::Path, size: u64) -> Result<(), String> {
    eprintln!(
        "leapd bench: writing {} MiB to {} so direct reads reach the disk",
        size >> 20,
        p.display()
    );
    let mut f = std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| format!("{}: {e}", p.display()))?;
        left -= n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", p.display()))
}

/// Warns when a file back end has holes: reading them measures the file system, not the disk.
fn warn_if_sparse(p: &std::path::Path, name: &str) {
    use std::os::unix::fs::MetadataExt;
    if let Ok(m) = std::fs::metadata(p) {
        if m.is_file() && m.blocks() * 512 < m.len() {
            eprintln!(
                "leapd bench: WARNING: {name} is sparse ({} of {} MiB allocated): reads of holes \
                 never reach the disk",
                (m.blocks() * 512) >> 20,
                m.len() >> 20
            );
        }
    }
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let base = std::env::temp_dir().join(format!("leapd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    Ok(base)
}

/// Runs every (back end, queue depth) case and prints the table.
pub fn run(a: BenchArgs) -> Result<(), String> {
    let backends = if a.backend.is_empty() {
        vec!["null".to_string(), "ram".to_string()]
    } else {
        a.backend.clone()
    };
    let qds = if a.iodepth.is_empty() {
        vec![1, 32, 128]
    } else {
        a.iodepth.clone()
    };
    eprintln!(
        "leapd bench: {} B {}, 1 poller, {} s per case",
        a.bs, a.rw, a.seconds
    );
    let mut rows = Vec::new();
    for b in &backends {
        for &qd in &qds {
            let r = run_case(b, qd, &a)?;
            println!(
                "bench backend={} qd={} iops={:.0} mib_s={:.1} mean_us={:.2} p99_us={:.2} cpu_ns_per_io={:.0} rw={} bs={} direct_fallbacks={}",
                r.backend, r.qd, r.iops, r.iops * a.bs as f64 / (1 << 20) as f64, r.mean_us, r.p99_us, r.cpu_ns_per_io, a.rw, a.bs, r.direct_fallbacks
            );
            rows.push(r);
        }
    }
    println!();
    println!(
        "{:<12} {:>5} {:>12} {:>10} {:>10} {:>14}",
        "backend", "qd", "IOPS", "mean µs", "p99 µs", "poller ns/IO"
    );
    for r in &rows {
        println!(
            "{:<12} {:>5} {:>12.0} {:>10.2} {:>10.2} {:>14.0}",
            r.backend, r.qd, r.iops, r.mean_us, r.p99_us, r.cpu_ns_per_io
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Histogram;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::new();
        for ns in 1..=10_000u64 {
            h.record(ns * 100);
        }
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.07, "{p99}");
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.07, "{p50}");
    }
}
