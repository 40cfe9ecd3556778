//! The VFIO NVMe driver against a real controller: QEMU's emulated NVMe behind its emulated
//! IOMMU, with vfio-pci bound inside a guest. `tests/guest/vfio-guest.sh driver` builds this test
//! statically and runs it in that guest with LEAP_VFIO_DEVICE=<PCI address>; `.ci/run` does so.
//! Without the variable (any ordinary machine) the tests say so and return: there is no device
//! to drive, and the guest run is where they are required.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leap_queues::nvme::{io, Status};
use leap_queues::Sqe;
use leap_runtime::backend::{
    run_one, Backend, BackendQueue, DmaGuard, IoOp, IoRequest, Submitted, VfioBackend, VfioOptions,
};

fn device() -> Option<String> {
    match std::env::var("LEAP_VFIO_DEVICE") {
        Ok(d) if !d.is_empty() => Some(d),
        _ => {
            eprintln!(
                "LEAP_VFIO_DEVICE is not set: this test runs inside the VFIO guest \
                 (tests/guest/vfio-guest.sh driver, part of .ci/run)"
            );
            None
        }
    }
}

/// Page-aligned anonymous memory, DMA-mapped for the backend while it lives.
struct Buf {
    ptr: *mut u8,
    len: usize,
    _dma: Option<DmaGuard>,
}

impl Buf {
    fn new(b: &dyn Backend, len: usize) -> Buf {
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let ptr = p.cast::<u8>();
        // SAFETY: the mapping lives as long as the Buf, which drops the guard first (field
        // order: `_dma` is dropped before munmap in Drop).
        let dma = unsafe { b.map_dma(ptr, len) }.expect("map_dma");
        Buf {
            ptr,
            len,
            _dma: dma,
        }
    }
    fn fill(&self, at: usize, len: usize, seed: u64) {
        for i in 0..len {
            let v = (seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> ((i % 8) * 8)) as u8 ^ (i as u8);
            // SAFETY: in bounds (callers stay within len).
            unsafe { self.ptr.add(at + i).write_volatile(v) };
        }
    }
    fn get(&self, at: usize, len: usize) -> Vec<u8> {
        assert!(at + len <= self.len);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds; the device is not writing it now (its command completed).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), v.as_mut_ptr(), len) };
        v
    }
    fn iov(&self, at: usize, len: usize) -> libc::iovec {
        assert!(at + len <= self.len);
        libc::iovec {
            // SAFETY: in bounds.
            iov_base: unsafe { self.ptr.add(at) }.cast(),
            iov_len: len,
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self._dma.take();
        // SAFETY: our mapping, no longer DMA-mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn open(dev: &str) -> VfioBackend {
    let mut o = VfioOptions::new(dev);
    o.queues = 4;
    VfioBackend::open(o).expect("open the VFIO controller")
}

fn cmd(op: u8, slba: u64, blocks: u32) -> Sqe {
    let mut s = Sqe::new(op, 0);
    s.set_nsid(1);
    if blocks > 0 {
        s.set_slba(slba);
        s.set_nlb(blocks);
    }
    s
}

/// The request for `sqe` with data `iov`, under `tag`.
fn request<'a>(sqe: &'a Sqe, iov: &'a [libc::iovec], tag: u64) -> IoRequest<'a> {
    let op = match sqe.opcode() {
        io::READ => IoOp::Read,
        io::WRITE => IoOp::Write { fua: false },
        io::FLUSH => IoOp::Flush,
        io::DATASET_MANAGEMENT => IoOp::Discard,
        _ => IoOp::WriteZeroes { unmap: false },
    };
    IoRequest {
        tag,
        op,
        offset: 0,
        len: iov.iter().map(|v| v.iov_len as u64).sum(),
        iov,
        cmd: Some(sqe),
    }
}

/// Starts `sqe` without waiting.
fn start(q: &mut dyn BackendQueue, sqe: &Sqe, iov: &[libc::iovec], tag: u64) -> Submitted {
    // SAFETY: every caller's iovecs point into a Buf that outlives the completions it polls.
    unsafe { q.submit(&request(sqe, iov, tag)) }
}

fn run(q: &mut dyn BackendQueue, sqe: &Sqe, iov: &[libc::iovec]) -> Status {
    // SAFETY: the iovecs point into Bufs that outlive the call, which waits for completion.
    unsafe { run_one(q, &request(sqe, iov, 1)) }
}

#[test]
fn verified_io_through_the_device() {
    let Some(dev) = device() else { return };
    let b = open(&dev);
    let info = b.info().clone();
    let bs = info.block_size as usize;
    println!(
        "vfio: {} bytes, {bs}-byte blocks, max transfer {}, {} queues",
        info.size,
        info.max_transfer,
        b.queues()
    );
    assert!(info.size >= 16 << 20);
    let buf = Buf::new(&b, 4 << 20);
    let mut qs: Vec<Box<dyn BackendQueue>> = (0..b.queues().min(4))
        .map(|_| b.open_queue(64).expect("open_queue"))
        .collect();
    assert!(qs.len() >= 2, "several I/O queues");

    // Every queue writes its own blocks, then reads them back.
    for (k, q) in qs.iter_mut().enumerate() {
        let slba = (k * 64) as u64;
        buf.fill(0, 8 * bs, k as u64 + 1);
        let want = buf.get(0, 8 * bs);
        assert!(run(&mut **q, &cmd(io::WRITE, slba, 8), &[buf.iov(0, 8 * bs)]).is_success());
        buf.fill(0, 8 * bs, 999);
        assert!(run(&mut **q, &cmd(io::READ, slba, 8), &[buf.iov(0, 8 * bs)]).is_success());
        assert_eq!(buf.get(0, 8 * bs), want, "queue {k}: data read back");
    }
    let q = &mut *qs[0];
    assert!(run(q, &cmd(io::FLUSH, 0, 0), &[]).is_success(), "flush");

    // A large transfer needing a PRP list, from pages scattered over the buffer.
    let max = (info.max_transfer as usize).min(512 << 10);
    let page = leap_runtime::mem::page_size();
    let pages = max / page;
    let iov: Vec<libc::iovec> = (0..pages)
        .map(|i| buf.iov((2 * i + 1) * page, page))
        .collect();
    for i in 0..pages {
        buf.fill((2 * i + 1) * page, page, 7000 + i as u64);
    }
    let written: Vec<Vec<u8>> = (0..pages)
        .map(|i| buf.get((2 * i + 1) * page, page))
        .collect();
    let blocks = (max / bs) as u32;
    assert!(
        run(q, &cmd(io::WRITE, 4096, blocks), &iov).is_success(),
        "scattered write"
    );
    let rd = buf.iov(0, max);
    buf.fill(0, max, 1);
    assert!(
        run(q, &cmd(io::READ, 4096, blocks), &[rd]).is_success(),
        "large read"
    );
    for (i, w) in written.iter().enumerate() {
        assert_eq!(
            &buf.get(i * page, page),
            w,
            "page {i} of the PRP-list transfer"
        );
    }

    // Buffers only 512-byte aligned: not expressible with PRPs; the controller's SGLs carry them.
    buf.fill(3 * page + 512, 2 * bs, 42);
    let want = buf.get(3 * page + 512, 2 * bs);
    let st = run(
        q,
        &cmd(io::WRITE, 9000, 2),
        &[buf.iov(3 * page + 512, 2 * bs)],
    );
    if st.is_success() {
        buf.fill(5 * page + 1024, 2 * bs, 0);
        assert!(run(
            q,
            &cmd(io::READ, 9000, 2),
            &[buf.iov(5 * page + 1024, 2 * bs)]
        )
        .is_success());
        assert_eq!(buf.get(5 * page + 1024, 2 * bs), want, "SGL transfer");
        println!("vfio: unaligned buffers went through SGLs");
    } else {
        assert_eq!(st, Status::INVALID_FIELD, "no SGLs: refused with a status");
        assert!(b.stats().unaligned.load(Ordering::Relaxed) > 0);
    }

    // Write Zeroes reads back zeros.
    buf.fill(0, 4 * bs, 5);
    assert!(run(q, &cmd(io::WRITE, 200, 4), &[buf.iov(0, 4 * bs)]).is_success());
    assert!(
        run(q, &cmd(io::WRITE_ZEROES, 200, 4), &[]).is_success(),
        "write zeroes"
    );
    buf.fill(0, 4 * bs, 6);
    assert!(run(q, &cmd(io::READ, 200, 4), &[buf.iov(0, 4 * bs)]).is_success());
    assert!(buf.get(0, 4 * bs).iter().all(|&x| x == 0), "zeroed");

    // Deallocate: the range list travels in the slot's own page; the command must succeed.
    if info.discard {
        let mut ranges = [0u8; 32];
        ranges[4..8].copy_from_slice(&8u32.to_le_bytes());
        ranges[8..16].copy_from_slice(&300u64.to_le_bytes());
        ranges[20..24].copy_from_slice(&8u32.to_le_bytes());
        ranges[24..32].copy_from_slice(&400u64.to_le_bytes());
        let mut d = cmd(io::DATASET_MANAGEMENT, 0, 0);
        d.set_cdw(10, 1);
        d.set_cdw(11, 1 << 2);
        let iov = [libc::iovec {
            iov_base: ranges.as_mut_ptr().cast(),
            iov_len: 32,
        }];
        assert!(run(q, &d, &iov).is_success(), "deallocate");
    }

    // Many commands in flight on one queue at once.
    let n = q.depth().min(48);
    for i in 0..n {
        buf.fill(i * bs, bs, 500 + i as u64);
    }
    let want = buf.get(0, n * bs);
    for i in 0..n {
        let c = cmd(io::WRITE, 20_000 + i as u64, 1);
        let iov = [buf.iov(i * bs, bs)];
        assert!(q.room() > 0);
        assert_eq!(start(q, &c, &iov, i as u64), Submitted::Queued);
    }
    q.flush();
    let mut seen = vec![false; n];
    let until = Instant::now() + Duration::from_secs(30);
    while seen.iter().any(|s| !s) {
        q.poll(&mut |tag, s| {
            assert!(s.is_success(), "write {tag}: {s}");
            seen[tag as usize] = true;
        });
        assert!(Instant::now() < until, "completions missing");
    }
    buf.fill(0, n * bs, 0);
    assert!(run(q, &cmd(io::READ, 20_000, n as u32), &[buf.iov(0, n * bs)]).is_success());
    assert_eq!(buf.get(0, n * bs), want, "{n} concurrent writes");
    println!("vfio: verified I/O passed on {} queues", qs.len());
}

#[test]
fn unmapped_memory_is_refused_before_submission() {
    let Some(dev) = device() else { return };
    let b = open(&dev);
    let mut q = b.open_queue(8).unwrap();
    let mut local = vec![0u8; 8192];
    let iov = [libc::iovec {
        iov_base: local.as_mut_ptr().cast(),
        iov_len: 4096,
    }];
    let before = b.stats().unmapped.load(Ordering::Relaxed);
    let st = run(&mut *q, &cmd(io::READ, 0, 4096 / b.info().block_size), &iov);
    assert_eq!(st, Status::DATA_TRANSFER_ERROR.with_dnr());
    assert_eq!(b.stats().unmapped.load(Ordering::Relaxed), before + 1);
    assert_eq!(q.in_flight(), 0, "nothing was sent");
}

#[test]
fn reset_during_io_loses_no_acknowledged_write() {
    let Some(dev) = device() else { return };
    let b = Arc::new(open(&dev));
    let bs = b.info().block_size as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (b, stop) = (b.clone(), stop.clone());
        std::thread::spawn(move || {
            let buf = Buf::new(&*b, 64 * bs);
            let mut q = b.open_queue(32).unwrap();
            let mut acked = Vec::new();
            let mut gen = 0u64;
            while !stop.load(Ordering::Acquire) || gen < 64 {
                let k = (gen % 64) as usize;
                buf.fill(k * bs, bs, 1_000_000 + gen);
                let st = run(
                    &mut *q,
                    &cmd(io::WRITE, 50_000 + k as u64, 1),
                    &[buf.iov(k * bs, bs)],
                );
                assert!(st.is_success(), "write {gen}: {st}");
                acked.push((k, buf.get(k * bs, bs)));
                gen += 1;
            }
            // The last acknowledged content of every block.
            let mut last = vec![Vec::new(); 64];
            for (k, d) in acked {
                last[k] = d;
            }
            (last, gen, q)
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        b.reset().expect("reset");
    }
    stop.store(true, Ordering::Release);
    let (last, writes, mut q) = writer.join().unwrap();
    let buf = Buf::new(&*b, 64 * bs);
    assert!(run(&mut *q, &cmd(io::READ, 50_000, 64), &[buf.iov(0, 64 * bs)]).is_success());
    for (k, d) in last.iter().enumerate() {
        assert_eq!(
            &buf.get(k * bs, bs),
            d,
            "block {k} after 3 resets and {writes} writes"
        );
    }
    assert!(b.stats().resets.load(Ordering::Relaxed) >= 3);
    println!(
        "vfio: {writes} writes across 3 resets, {} resubmitted, all acknowledged data intact",
        b.stats().resubmitted.load(Ordering::Relaxed)
    );
}

#[test]
fn timed_out_commands_are_aborted_then_reset_and_resubmitted() {
    let Some(dev) = device() else { return };
    let mut o = VfioOptions::new(&dev);
    o.queues = 2;
    o.io_timeout = Duration::from_millis(300);
    let b = VfioBackend::open(o).expect("open");
    let bs = b.info().block_size as usize;
    let buf = Buf::new(&b, 16 * bs);
    let mut q = b.open_queue(16).unwrap();
    // Commands the device never hears of: pushed to the SQ, but its tail doorbell is not rung
    // (no flush), as with a lost doorbell write or a hung command. The watchdog must abort them
    // after the timeout and, when that does not help, reset the controller, whose queue
    // re-creation resubmits them.
    for i in 0..4 {
        buf.fill(i * bs, bs, 77 + i as u64);
        let c = cmd(io::WRITE, 60_000 + i as u64, 1);
        let iov = [buf.iov(i * bs, bs)];
        assert_eq!(start(&mut *q, &c, &iov, i as u64), Submitted::Queued);
    }
    let want = buf.get(0, 4 * bs);
    let t0 = Instant::now();
    let mut seen = [false; 4];
    while seen.iter().any(|s| !s) {
        q.poll(&mut |tag, s| {
            assert!(s.is_success(), "write {tag}: {s}");
            seen[tag as usize] = true;
        });
        assert!(t0.elapsed() < Duration::from_secs(20), "never recovered");
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = b.stats();
    let (timeouts, aborts, resets) = (
        s.timeouts.load(Ordering::Relaxed),
        s.aborts.load(Ordering::Relaxed),
        s.resets.load(Ordering::Relaxed),
    );
    assert_eq!(
        (timeouts, aborts),
        (4, 4),
        "each command timed out once and was aborted"
    );
    assert!(resets >= 1, "then the controller was reset");
    assert!(s.resubmitted.load(Ordering::Relaxed) >= 4);
    buf.fill(0, 4 * bs, 0);
    assert!(run(&mut *q, &cmd(io::READ, 60_000, 4), &[buf.iov(0, 4 * bs)]).is_success());
    assert_eq!(buf.get(0, 4 * bs), want, "the resubmitted writes landed");
    println!(
        "vfio: 4 stuck commands: aborted, reset, resubmitted and completed after {:?}",
        t0.elapsed()
    );
}

/// Hot-remove: the kernel takes the device back (`echo 1 > .../remove`, as on a surprise
/// removal). It asks through VFIO's request channel and waits for the driver to let go; the
/// driver must fail what was in flight and everything after with a status, and release the
/// device so the removal completes. Destroys the device for the rest of the boot: it runs only
/// with LEAP_VFIO_HOTREMOVE=1 (the guest job runs it last, on its own).
#[test]
fn hot_remove_fails_commands_cleanly() {
    let Some(dev) = device() else { return };
    if std::env::var("LEAP_VFIO_HOTREMOVE").as_deref() != Ok("1") {
        eprintln!("LEAP_VFIO_HOTREMOVE is not 1: the hot-remove test runs on its own, last");
        return;
    }
    let b = open(&dev);
    let bs = b.info().block_size as usize;
    let buf = Buf::new(&b, 64 * bs);
    let mut q = b.open_queue(32).unwrap();
    assert!(run(&mut *q, &cmd(io::WRITE, 0, 8), &[buf.iov(0, 8 * bs)]).is_success());
    let path = format!("/sys/bus/pci/devices/{dev}/remove");
    let remover = std::thread::spawn(move || {
        let t = Instant::now();
        std::fs::write(&path, "1").map(|_| t.elapsed())
    });
    // Keep I/O going until the device is gone: every command completes, with success before
    // and a clean error status after.
    let t0 = Instant::now();
    let (mut ok, mut gone) = (0u64, 0u64);
    while gone == 0 {
        for i in 0..8 {
            let c = cmd(io::READ, i * 8, 8);
            let iov = [buf.iov(i as usize * 8 * bs, 8 * bs)];
            if q.room() == 0 {
                break;
            }
            match start(&mut *q, &c, &iov, i) {
                Submitted::Queued => {}
                Submitted::Done(s) => {
                    assert_eq!(
                        s,
                        Status::ABORTED_SQ_DELETION.with_dnr(),
                        "refused with a clean status"
                    );
                    gone += 1;
                }
            }
        }
        q.flush();
        q.poll(&mut |_, s| {
            if s.is_success() {
                ok += 1;
            } else {
                assert_eq!(
                    s,
                    Status::ABORTED_SQ_DELETION.with_dnr(),
                    "failed with a clean status"
                );
                gone += 1;
            }
        });
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the removal was not noticed"
        );
    }
    let until = Instant::now() + Duration::from_secs(10);
    while q.in_flight() > 0 {
        q.poll(&mut |_, s| assert!(s.is_success() || s == Status::ABORTED_SQ_DELETION.with_dnr()));
        assert!(
            Instant::now() < until,
            "commands left in flight after the removal"
        );
    }
    let took = remover.join().unwrap().expect("writing remove");
    assert!(
        !std::path::Path::new(&format!("/sys/bus/pci/devices/{dev}")).exists(),
        "the device is gone"
    );
    assert!(b.stats().failed.load(Ordering::Relaxed) > 0);
    drop(q);
    drop(buf);
    drop(b);
    println!(
        "vfio: hot-remove after {ok} reads: released in {took:?}, {gone} commands failed cleanly"
    );
}
