//! A `leapd serve` process killed (SIGKILL) while it holds requests out of order, then started
//! again on the same socket: the front end (the in-process driver, speaking GET/SET_INFLIGHT_FD
//! as QEMU does) reconnects, and every request completes exactly once with the right data. The
//! same crash without inflight tracking replays finished requests and loses unfinished ones,
//! which the second test shows, so the first one cannot pass by accident.
//!
//! Requests are held out of order by a write rate limit (`iops-wr=4`): the first four writes
//! pass, the rest wait for tokens, and reads submitted after them complete at once.

use leap_vhost::driver::{blk_status, submit_blk, Desc, Driver, DriverOptions, DriverQueue};
use leap_vhost::driver::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const BLOCK: usize = 4096;
const WRITES: u64 = 12;
const READS: u64 = 16;
/// Reads come from blocks READ_BASE.. (filled before leapd starts); writes go to blocks 0...
const READ_BASE: u64 = 100;

/// A leapd child, killed when dropped (so a failing test leaves no process behind).
struct Leapd(Child);

impl Drop for Leapd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(sock: &Path, img: &Path, log: &Path, inflight: bool) -> Leapd {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = leap_tests::program(env!("CARGO_BIN_EXE_leapd"));
    cmd.arg("serve")
        .arg("--socket")
        .arg(sock)
        .arg("--disk")
        .arg(format!("{},iops-wr=4", img.display()))
        .args(["--queues", "1", "--pollers", "1", "--block-size", "4096"]);
    if !inflight {
        cmd.arg("--no-inflight");
    }
    let child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn leapd serve");
    let t = Instant::now();
    while !sock.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "leapd did not listen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Leapd(child)
}

fn fill(block: u64) -> u8 {
    (block as u8).wrapping_mul(7).wrapping_add(1)
}

fn pattern(i: u64) -> u8 {
    0xa0 + i as u8
}

/// What the front end saw.
#[derive(Debug, Default)]
struct Outcome {
    /// Completions of heads that were not in flight (a finished request replayed).
    duplicates: u64,
    /// Requests that never completed.
    missing: usize,
    /// Requests that completed with a status other than OK.
    failed: usize,
    /// Reads whose data was wrong, and written blocks that did not read back right.
    bad_data: usize,
}

/// Waits until `want(done)` holds or `timeout` passes, collecting completions.
fn collect(
    q: &mut DriverQueue,
    done: &mut HashMap<u16, u32>,
    timeout: Duration,
    want: impl Fn(&HashMap<u16, u32>) -> bool,
) {
    let end = Instant::now() + timeout;
    while !want(done) && Instant::now() < end {
        if let Some((id, _)) = q.wait_used(Duration::from_millis(50)) {
            *done.entry(id).or_default() += 1;
        }
    }
}

fn run(inflight: bool) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("vhost.sock");
    let log = dir.path().join("leapd.log");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(16 << 20).unwrap();
    for b in READ_BASE..READ_BASE + READS {
        f.write_all_at(&[fill(b); BLOCK], b * BLOCK as u64).unwrap();
    }
    drop(f);
    let leapd = start(&sock, &img, &log, inflight);
    let mut d = Driver::connect(
        &sock,
        DriverOptions {
            num_queues: 1,
            queue_size: 128,
            mem_size: 4 << 20,
            event_idx: true,
            features_mask: 0,
            inflight,
        },
    )
    .expect("connect");
    let buf = d.alloc((WRITES + READS) as usize * BLOCK, BLOCK).unwrap();
    let mut q = d.take_queues().pop().unwrap();
    // Writes first, then reads: the limit holds writes 4.., the reads pass them.
    let mut heads = Vec::new();
    for i in 0..WRITES {
        let a = buf + i * BLOCK as u64;
        d.memory()
            .write_slice(&[pattern(i); BLOCK], GuestAddress(a))
            .unwrap();
        let h = submit_blk(
            &mut q,
            VIRTIO_BLK_T_OUT,
            i * 8,
            &[Desc::readable(a, BLOCK as u32)],
        )
        .unwrap();
        heads.push((h, None));
    }
    for k in 0..READS {
        let a = buf + (WRITES + k) * BLOCK as u64;
        let b = READ_BASE + k;
        let h = submit_blk(
            &mut q,
            VIRTIO_BLK_T_IN,
            b * 8,
            &[Desc::writable(a, BLOCK as u32)],
        )
        .unwrap();
        heads.push((h, Some((a, b))));
    }
    q.publish_and_kick();
    let reads: Vec<u16> = heads
        .iter()
        .filter(|h| h.1.is_some())
        .map(|h| h.0)
        .collect();
    let mut done = HashMap::new();
    collect(&mut q, &mut done, Duration::from_secs(10), |d| {
        reads.iter().all(|h| d.contains_key(h))
    });
    let writes_done = heads
        .iter()
        .filter(|h| h.1.is_none() && done.contains_key(&h.0))
        .count();
    assert!(
        reads.iter().all(|h| done.contains_key(h)),
        "the reads should pass the throttled writes"
    );
    assert!(
        (writes_done as u64) < WRITES,
        "writes should still be held when leapd is killed ({writes_done} done)"
    );
    // Kill leapd while it holds writes that precede completed reads in the ring.
    drop(leapd); // SIGKILL
    let leapd = start(&sock, &img, &log, inflight);
    let t = Instant::now();
    loop {
        match d.reconnect() {
            Ok(()) => break,
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("reconnect: {e}"),
        }
    }
    let all: Vec<u16> = heads.iter().map(|h| h.0).collect();
    collect(&mut q, &mut done, Duration::from_secs(8), |d| {
        all.iter().all(|h| d.contains_key(h))
    });
    let mut out = Outcome {
        duplicates: q.device_errors() + done.values().map(|&n| n as u64 - 1).sum::<u64>(),
        missing: all.iter().filter(|h| !done.contains_key(h)).count(),
        ..Default::default()
    };
    for &(h, read) in &heads {
        if !done.contains_key(&h) {
            continue;
        }
        if blk_status(&q, h) != VIRTIO_BLK_S_OK as u8 {
            out.failed += 1;
        }
        if let Some((a, b)) = read {
            let mut got = vec![0u8; BLOCK];
            d.memory().read_slice(&mut got, GuestAddress(a)).unwrap();
            if got.iter().any(|&x| x != fill(b)) {
                out.bad_data += 1;
            }
        }
    }
    if out.missing == 0 {
        // Every acknowledged write is on disk (read back by the new leapd's own file).
        let mut f = vec![0u8; BLOCK];
        let file = std::fs::File::open(&img).unwrap();
        for i in 0..WRITES {
            file.read_exact_at(&mut f, i * 8 * 512).unwrap();
            if f.iter().any(|&x| x != pattern(i)) {
                out.bad_data += 1;
            }
        }
    }
    drop(leapd);
    if out.missing > 0 || out.duplicates > 0 {
        eprintln!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    out
}

#[test]
fn sigkill_with_requests_held_out_of_order_loses_nothing_with_inflight_tracking() {
    let o = run(true);
    assert_eq!(o.duplicates, 0, "{o:?}");
    assert_eq!(o.missing, 0, "{o:?}");
    assert_eq!(o.failed, 0, "{o:?}");
    assert_eq!(o.bad_data, 0, "{o:?}");
}

#[test]
fn without_inflight_tracking_the_same_crash_replays_and_loses_requests() {
    let o = run(false);
    assert!(
        o.duplicates > 0 && o.missing > 0,
        "without inflight tracking the restarted leapd cannot know what was done: {o:?}"
    );
}

#[test]
fn sigterm_finishes_in_bounded_time_whatever_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let sock = dir.path().join("vhost.sock");
    let log = dir.path().join("leapd.log");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut leapd = start(&sock, &img, &log, true);
    let mut d = Driver::connect(
        &sock,
        DriverOptions {
            queue_size: 256,
            mem_size: 4 << 20,
            ..Default::default()
        },
    )
    .expect("connect");
    let buf = d.alloc(BLOCK, BLOCK).unwrap();
    let mut q = d.take_queues().pop().unwrap();
    // 64 writes at 4 per second would take 15 s: most are held when SIGTERM arrives.
    for i in 0..64u64 {
        submit_blk(
            &mut q,
            VIRTIO_BLK_T_OUT,
            i * 8,
            &[Desc::readable(buf, BLOCK as u32)],
        )
        .unwrap();
    }
    q.publish_and_kick();
    assert!(
        q.wait_used(Duration::from_secs(5)).is_some(),
        "the first writes pass"
    );
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leapd.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    loop {
        if let Some(st) = leapd.0.try_wait().unwrap() {
            assert!(st.success(), "leapd exited with {st}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "leapd did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("abandoned"),
        "abandoned commands are reported:\n{log}"
    );
    assert!(!sock.exists(), "the socket is removed");
}
