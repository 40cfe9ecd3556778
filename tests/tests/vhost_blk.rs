//! The in-process vhost-user driver against a real leapd socket: negotiation, configuration,
//! data round trips on every queue, every kind of malformed request, disconnect and reconnect.

use leap_runtime::backend::{Backend, FileBackend, FileOptions, RamBackend};
use leap_tests::TestServer;
use leap_vhost::driver::*;
use leap_vhost::Malformed;
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

fn ram(size: u64, block: u32) -> Arc<dyn Backend> {
    Arc::new(RamBackend::new(size, block).unwrap())
}

fn connect(s: &TestServer, queues: u16, event_idx: bool) -> Driver {
    Driver::connect(
        &s.socket,
        DriverOptions {
            num_queues: queues,
            queue_size: 128,
            mem_size: 32 << 20,
            event_idx,
            features_mask: 0,
            ..Default::default()
        },
    )
    .expect("connect")
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write(d: &Driver, q: &mut DriverQueue, buf: u64, sector: u64, data: &[u8]) -> u8 {
    use vm_memory_shim::*;
    put(d, buf, data);
    let (st, _) = blk_request(
        q,
        VIRTIO_BLK_T_OUT,
        sector,
        &[Desc::readable(buf, data.len() as u32)],
        T,
    )
    .unwrap();
    st
}

fn read(d: &Driver, q: &mut DriverQueue, buf: u64, sector: u64, len: usize) -> (u8, Vec<u8>) {
    use vm_memory_shim::*;
    put(d, buf, &vec![0xee; len]);
    let (st, used) = blk_request(
        q,
        VIRTIO_BLK_T_IN,
        sector,
        &[Desc::writable(buf, len as u32)],
        T,
    )
    .unwrap();
    if st == VIRTIO_BLK_S_OK as u8 {
        assert_eq!(used as usize, len + 1, "used length counts data and status");
    }
    (st, get(d, buf, len))
}

/// Guest-memory access through the driver's mapping.
mod vm_memory_shim {
    use leap_vhost::driver::Driver;
    use vm_memory::{Bytes, GuestAddress};
    pub fn put(d: &Driver, addr: u64, data: &[u8]) {
        d.memory().write_slice(data, GuestAddress(addr)).unwrap();
    }
    pub fn get(d: &Driver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        d.memory().read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn negotiates_features_and_config() {
    let s = TestServer::start(ram(64 * MIB, 4096), 2, 1);
    let mut d = connect(&s, 2, true);
    let f = d.acked_features();
    for bit in [32u32, 29, 1, 2, 6, 9, 12, 13, 14] {
        assert!(
            f & (1 << bit) != 0,
            "feature bit {bit} not negotiated (acked {f:#x})"
        );
    }
    assert!(f & (1 << 5) == 0, "a writable disk is not RO");
    let c = d.config().unwrap();
    assert_eq!(c.capacity, 64 * MIB / 512);
    assert_eq!(c.blk_size, 4096);
    assert_eq!(c.num_queues, 2);
    // RAM has no volatile cache: write-through, and the guest cannot switch it.
    assert!(f & (1 << 11) == 0, "CONFIG_WCE offered without a cache");
    assert!(
        !c.writeback,
        "a disk without a volatile cache is write-through"
    );
    // A file has one (the page cache): write-back by default, so guests send FLUSH.
    let dir = tempfile::tempdir().unwrap();
    let file: Arc<dyn Backend> = Arc::new(
        FileBackend::open(&FileOptions {
            path: dir.path().join("wce.img"),
            size: Some(MIB),
            direct: false,
            read_only: false,
            block_size: 512,
        })
        .unwrap(),
    );
    let sf = TestServer::start(file, 1, 1);
    let mut df = connect(&sf, 1, true);
    assert!(df.acked_features() & (1 << 11) != 0, "CONFIG_WCE offered");
    assert!(
        df.config().unwrap().writeback,
        "write-back cache by default, so guests send FLUSH"
    );
    // The writeback byte is writable; nothing else in the configuration space is.
    df.set_writeback(false).expect("writeback byte");
    assert!(!df.config().unwrap().writeback);
    for (offset, len) in [(0u32, 8usize), (20, 4), (32, 2)] {
        // Refused with a failure reply, counted, and the connection goes on.
        assert!(
            df.set_config_raw(offset, &vec![0xff; len]).is_err(),
            "SET_CONFIG of {len} byte(s) at {offset} accepted"
        );
    }
    let after = df.config().unwrap();
    assert_eq!(after.capacity, MIB / 512, "capacity untouched");
    assert!(!after.writeback, "writeback untouched by the wider writes");
    assert_eq!(sf.stats.get(Malformed::Config), 3);
    // A disk without a volatile cache refuses even the writeback byte.
    assert!(d.set_writeback(true).is_err());
    assert!(
        !d.config().unwrap().writeback,
        "no CONFIG_WCE, no writeback switch"
    );
    assert_eq!(s.stats.get(Malformed::Config), 1);
    assert!(c.seg_max >= 32 && c.size_max >= 4096);
    assert!(c.max_discard_seg >= 1 && c.max_discard_sectors > 0);
    assert_eq!(c.max_write_zeroes_seg, 1);
    assert!(c.write_zeroes_may_unmap);
}

fn round_trips(event_idx: bool, backend: Arc<dyn Backend>) {
    let s = TestServer::start(backend, 2, 2);
    let mut d = connect(&s, 2, event_idx);
    let buf = d.alloc(1 << 20, 4096).unwrap();
    let mut qs = d.take_queues();
    for (qi, q) in qs.iter_mut().enumerate() {
        let base = 1000 + 4000 * qi as u64;
        let data = pattern(qi as u8, 128 << 10);
        assert_eq!(write(&d, q, buf, base, &data), OK);
        let (st, back) = read(&d, q, buf + (512 << 10), base, data.len());
        assert_eq!(st, OK);
        assert!(back == data, "queue {qi}: data read back differs");
        let (st, _) = blk_request(q, VIRTIO_BLK_T_FLUSH, 0, &[], T).unwrap();
        assert_eq!(st, OK, "flush");
        // GET_ID answers the serial, NUL padded to 20 bytes.
        let (st, used) =
            blk_request(q, VIRTIO_BLK_T_GET_ID, 0, &[Desc::writable(buf, 20)], T).unwrap();
        assert_eq!((st, used), (OK, 21));
        let id = vm_memory_shim::get(&d, buf, 20);
        assert!(
            id.starts_with(b"leap"),
            "serial {:?}",
            String::from_utf8_lossy(&id)
        );
        // Discard 8 sectors in the middle, write-zeroes (with unmap) 8 more: both read as zeros.
        let h = submit_blk_segments(
            q,
            VIRTIO_BLK_T_DISCARD,
            &[DiscardSegment {
                sector: base + 8,
                num_sectors: 8,
                flags: 0,
            }],
        )
        .unwrap();
        q.publish_and_kick();
        assert_eq!(q.wait_used(T).map(|u| u.0), Some(h));
        assert_eq!(blk_status(q, h), OK, "discard");
        let h = submit_blk_segments(
            q,
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[DiscardSegment {
                sector: base + 24,
                num_sectors: 8,
                flags: DiscardSegment::FLAG_UNMAP,
            }],
        )
        .unwrap();
        q.publish_and_kick();
        assert_eq!(q.wait_used(T).map(|u| u.0), Some(h));
        assert_eq!(blk_status(q, h), OK, "write zeroes");
        let (st, back) = read(&d, q, buf, base, 32 * 512);
        assert_eq!(st, OK);
        assert_eq!(back[..4096], data[..4096]);
        assert!(
            back[4096..8192].iter().all(|&b| b == 0),
            "discarded range reads zeros"
        );
        assert_eq!(back[8192..12288], data[8192..12288]);
        assert!(
            back[12288..16384].iter().all(|&b| b == 0),
            "zeroed range reads zeros"
        );
    }
    assert_eq!(s.stats.total(), 0, "no request was malformed");
}

#[test]
fn round_trips_on_every_queue_with_event_idx() {
    round_trips(true, ram(64 * MIB, 512));
}

#[test]
fn round_trips_without_event_idx() {
    round_trips(false, ram(64 * MIB, 512));
}

#[test]
fn round_trips_through_io_uring_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = FileBackend::open(&FileOptions {
        path: dir.path().join("d.img"),
        size: Some(64 * MIB),
        direct: false,
        read_only: false,
        block_size: 512,
    })
    .unwrap();
    round_trips(true, Arc::new(f));
}

#[test]
fn queues_run_in_parallel_threads() {
    let s = TestServer::start(ram(64 * MIB, 512), 2, 2);
    let mut d = connect(&s, 2, true);
    let bufs: Vec<u64> = (0..2).map(|_| d.alloc(2 << 20, 4096).unwrap()).collect();
    let mem = d.memory().clone();
    let handles: Vec<_> = d
        .take_queues()
        .into_iter()
        .zip(bufs)
        .enumerate()
        .map(|(qi, (mut q, buf))| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                use vm_memory::{Bytes, GuestAddress};
                for round in 0..50u64 {
                    let data = pattern((qi as u64 * 100 + round) as u8, 64 << 10);
                    let sector = qi as u64 * 40_000 + round * 128;
                    mem.write_slice(&data, GuestAddress(buf)).unwrap();
                    let out = [Desc::readable(buf, data.len() as u32)];
                    assert_eq!(
                        blk_request(&mut q, VIRTIO_BLK_T_OUT, sector, &out, T)
                            .unwrap()
                            .0,
                        OK
                    );
                    let inn = [Desc::writable(buf + (1 << 20), data.len() as u32)];
                    assert_eq!(
                        blk_request(&mut q, VIRTIO_BLK_T_IN, sector, &inn, T)
                            .unwrap()
                            .0,
                        OK
                    );
                    let mut back = vec![0; data.len()];
                    mem.read_slice(&mut back, GuestAddress(buf + (1 << 20)))
                        .unwrap();
                    assert!(back == data, "queue {qi} round {round}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    drop(d);
}

/// Submits a raw chain and returns (status byte at `status_addr`, used length).
fn raw(
    q: &mut DriverQueue,
    d: &Driver,
    descs: &[RawDesc],
    status_addr: Option<u64>,
) -> (Option<u8>, u32) {
    if let Some(a) = status_addr {
        vm_memory_shim::put(d, a, &[0xff]);
    }
    let h = q.add_raw_chain(descs).unwrap();
    q.publish_and_kick();
    let (id, len) = q.wait_used(T).expect("a malformed request still completes");
    assert_eq!(id, h);
    (status_addr.map(|a| vm_memory_shim::get(d, a, 1)[0]), len)
}

fn hdr(d: &Driver, at: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    vm_memory_shim::put(d, at, &h);
}

#[test]
fn malformed_requests_fail_cleanly_and_are_counted() {
    let s = TestServer::start(ram(16 * MIB, 512), 1, 1);
    let mut d = connect(&s, 1, true);
    let mem = d.alloc(1 << 20, 4096).unwrap();
    let (h, data, st) = (mem, mem + 4096, mem + 8192);
    let mut q = d.take_queues().pop().unwrap();
    let (r, w, n) = (0u16, DESC_F_WRITE, DESC_F_NEXT);
    let sectors = 16 * MIB / 512;
    // (name, counter, chain, header type, header sector, expected status; 0xff: none written)
    type Case = (&'static str, Malformed, Vec<RawDesc>, u32, u64, u8);
    let cases: Vec<Case> = vec![
        // (name, counter, chain, header type, header sector, expected status)
        (
            "short header",
            Malformed::Header,
            vec![
                RawDesc {
                    addr: h,
                    len: 8,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            0,
            IOERR,
        ),
        (
            "oversized header (data in the wrong direction)",
            Malformed::Layout,
            vec![
                RawDesc {
                    addr: h,
                    len: 32,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 512,
                    flags: w | n,
                    next: 2,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            0,
            IOERR,
        ),
        (
            "sector out of range",
            Malformed::Range,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 512,
                    flags: w | n,
                    next: 2,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            sectors,
            IOERR,
        ),
        (
            "sector + length past the end",
            Malformed::Range,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 1024,
                    flags: w | n,
                    next: 2,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            sectors - 1,
            IOERR,
        ),
        (
            "huge sector",
            Malformed::Range,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 512,
                    flags: w | n,
                    next: 2,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            u64::MAX - 1,
            IOERR,
        ),
        (
            "length not a multiple of the block size",
            Malformed::Length,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 100,
                    flags: w | n,
                    next: 2,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            0,
            IOERR,
        ),
        (
            "unknown request type",
            Malformed::Unsupported,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            77,
            0,
            UNSUPP,
        ),
        (
            "readable after writable",
            Malformed::Layout,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 512,
                    flags: w | n,
                    next: 2,
                },
                RawDesc {
                    addr: data,
                    len: 512,
                    flags: r | n,
                    next: 3,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_OUT,
            0,
            0xff,
        ),
        (
            "descriptor loop",
            Malformed::BrokenChain,
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: data,
                    len: 512,
                    flags: r | n,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_OUT,
            0,
            0xff,
        ),
        (
            "next index out of range",
            Malformed::BrokenChain,
            vec![RawDesc {
                addr: h,
                len: 16,
                flags: r | n,
                next: 1000,
            }],
            VIRTIO_BLK_T_IN,
            0,
            0xff,
        ),
        (
            "header outside guest memory",
            Malformed::Unmapped,
            vec![
                RawDesc {
                    addr: 1 << 40,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: w,
                    next: 0,
                },
            ],
            VIRTIO_BLK_T_IN,
            0,
            IOERR,
        ),
    ];
    for (name, counter, chain, ty, sector, want) in cases {
        hdr(&d, h, ty, sector);
        let before = s.stats.get(counter);
        // Chains are written starting at the next free id, so `next` values are relative: map them.
        let ids = q.peek_free_ids(chain.len());
        let chain: Vec<RawDesc> = chain
            .iter()
            .map(|c| RawDesc {
                next: ids.get(c.next as usize).copied().unwrap_or(c.next),
                ..*c
            })
            .collect();
        let (status, used) = raw(&mut q, &d, &chain, Some(st));
        if want == 0xff {
            // No usable status byte: the chain comes back with nothing written.
            assert_eq!(used, 0, "{name}");
        } else {
            assert_eq!(status, Some(want), "{name}: status");
        }
        assert_eq!(
            s.stats.get(counter),
            before + 1,
            "{name}: counted as {counter:?}"
        );
    }
    // Data outside guest memory is refused by the NVMe layer: IOERR, and guest memory untouched.
    hdr(&d, h, VIRTIO_BLK_T_IN, 0);
    let ids = q.peek_free_ids(3);
    let chain = [
        RawDesc {
            addr: h,
            len: 16,
            flags: r | n,
            next: ids[1],
        },
        RawDesc {
            addr: (32 << 20) - 256,
            len: 512,
            flags: w | n,
            next: ids[2],
        },
        RawDesc {
            addr: st,
            len: 1,
            flags: w,
            next: 0,
        },
    ];
    let (status, _) = raw(&mut q, &d, &chain, Some(st));
    assert_eq!(
        status,
        Some(IOERR),
        "data straddling the end of guest memory"
    );
    assert!(s.io_stats.total(|s| &s.invalid) >= 1);
    // Missing status descriptor (all readable) and a zero-length status.
    for (name, chain) in [
        (
            "no status descriptor",
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: st,
                    len: 1,
                    flags: r,
                    next: 0,
                },
            ],
        ),
        (
            "zero-length status",
            vec![
                RawDesc {
                    addr: h,
                    len: 16,
                    flags: r | n,
                    next: 1,
                },
                RawDesc {
                    addr: st,
                    len: 0,
                    flags: w,
                    next: 0,
                },
            ],
        ),
    ] {
        let before = s.stats.get(Malformed::NoStatus);
        let ids = q.peek_free_ids(chain.len());
        let chain: Vec<RawDesc> = chain
            .iter()
            .map(|c| RawDesc {
                next: ids.get(c.next as usize).copied().unwrap_or(0),
                ..*c
            })
            .collect();
        let (_, used) = raw(&mut q, &d, &chain, None);
        assert_eq!(used, 0, "{name}");
        assert_eq!(s.stats.get(Malformed::NoStatus), before + 1, "{name}");
    }
    // The device still works.
    let data_v = pattern(9, 4096);
    assert_eq!(write(&d, &mut q, data, 8, &data_v), OK);
    assert_eq!(read(&d, &mut q, data + 8192, 8, 4096), (OK, data_v));
}

#[test]
fn read_only_disks_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ro.img");
    std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
    let f = FileBackend::open(&FileOptions {
        path: p,
        size: None,
        direct: false,
        read_only: true,
        block_size: 512,
    })
    .unwrap();
    let s = TestServer::start(Arc::new(f), 1, 1);
    let mut d = connect(&s, 1, true);
    assert!(
        d.acked_features() & (1 << 5) != 0,
        "RO offered and negotiated"
    );
    let buf = d.alloc(8192, 4096).unwrap();
    let mut q = d.take_queues().pop().unwrap();
    assert_eq!(write(&d, &mut q, buf, 0, &[1u8; 512]), IOERR);
    assert_eq!(s.stats.get(Malformed::ReadOnly), 1);
    let (st, back) = read(&d, &mut q, buf, 0, 512);
    assert_eq!(
        (st, back),
        (OK, vec![7u8; 512]),
        "the write changed nothing"
    );
}

#[test]
fn reconnect_sees_earlier_writes() {
    let s = TestServer::start(ram(16 * MIB, 512), 1, 1);
    let data = pattern(3, 64 << 10);
    {
        let mut d = connect(&s, 1, true);
        let buf = d.alloc(1 << 20, 4096).unwrap();
        let mut q = d.take_queues().pop().unwrap();
        assert_eq!(write(&d, &mut q, buf, 64, &data), OK);
        drop(q);
        d.disconnect();
    }
    for round in 0..3 {
        let mut d = connect(&s, 1, round % 2 == 0);
        let buf = d.alloc(1 << 20, 4096).unwrap();
        let mut q = d.take_queues().pop().unwrap();
        let (st, back) = read(&d, &mut q, buf, 64, data.len());
        assert_eq!(st, OK);
        assert!(back == data, "round {round}: data survives reconnects");
        drop(q);
        d.disconnect();
    }
}

/// Thousands of random descriptor chains, mostly nearly valid: every one must come back as a used
/// element (the guest never waits forever), nothing may panic or stop the poller, and the device
/// must still serve normal requests afterwards.
#[test]
fn random_chains_never_wedge_the_device() {
    let s = TestServer::start(ram(16 * MIB, 512), 1, 1);
    let mut d = connect(&s, 1, true);
    let area = d.alloc(1 << 20, 4096).unwrap();
    let mut q = d.take_queues().pop().unwrap();
    let sectors = 16 * MIB / 512;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    let types = [
        VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID,
        VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_WRITE_ZEROES,
        5,
        0xffff_ffff,
    ];
    for round in 0..3000u32 {
        // A header, and discard/write-zeroes segments right after it, at a random place.
        let hdr_at = area + next(1 << 19) / 16 * 16;
        let ty = types[next(types.len() as u64) as usize];
        let sector = match next(4) {
            0 => next(sectors),
            1 => sectors - next(8),
            2 => u64::MAX - next(4),
            _ => next(64),
        };
        hdr(&d, hdr_at, ty, sector);
        let seg = [
            (next(sectors) as u32 as u64).to_le_bytes(),
            (next(64) | (next(3) << 32)).to_le_bytes(),
        ]
        .concat();
        vm_memory_shim::put(&d, hdr_at + 16, &seg);
        // A well-formed skeleton (header, data in the direction the type wants, status byte),
        // then up to three random mutations.
        let data_write = ty == VIRTIO_BLK_T_IN || ty == VIRTIO_BLK_T_GET_ID;
        let ndata = next(4) as usize;
        let mut chain = vec![RawDesc {
            addr: hdr_at,
            len: 16,
            flags: 0,
            next: 0,
        }];
        for _ in 0..ndata {
            let len = [512u32, 1024, 4096, 8192][next(4) as usize];
            let addr = area + (1 << 19) + next(1 << 18) / 512 * 512;
            chain.push(RawDesc {
                addr,
                len,
                flags: if data_write { DESC_F_WRITE } else { 0 },
                next: 0,
            });
        }
        if matches!(ty, VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) {
            chain.truncate(1);
            chain.push(RawDesc {
                addr: hdr_at + 16,
                len: 16,
                flags: 0,
                next: 0,
            });
        }
        chain.push(RawDesc {
            addr: area + (1 << 20) - 1 - next(64),
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        });
        for _ in 0..next(4) {
            let k = next(chain.len() as u64) as usize;
            let c = &mut chain[k];
            match next(7) {
                0 => c.len = [0, 1, 8, 15, 17, 100, 513, 65536][next(8) as usize],
                1 => c.flags ^= DESC_F_WRITE,
                2 => {
                    c.addr =
                        [1 << 40, (32 << 20) - next(1024), u64::MAX - next(4096)][next(3) as usize]
                }
                3 => c.flags |= DESC_F_INDIRECT,
                4 => c.flags |= DESC_F_NEXT, // on the last one: a dangling link
                5 => {
                    chain.remove(k);
                    if chain.is_empty() {
                        chain.push(RawDesc {
                            addr: hdr_at,
                            len: 16,
                            flags: 0,
                            next: 0,
                        });
                    }
                }
                _ => c.addr = c.addr.wrapping_add(next(4096)),
            }
        }
        let n = chain.len();
        let ids = q.peek_free_ids(n);
        for (i, c) in chain.iter_mut().enumerate() {
            if i + 1 < n {
                c.flags |= DESC_F_NEXT;
                c.next = if next(32) == 0 {
                    next(1024) as u16
                } else {
                    ids[i + 1]
                };
            } else if c.flags & DESC_F_NEXT != 0 {
                c.next = if next(2) == 0 {
                    ids[0]
                } else {
                    next(1024) as u16
                };
            }
        }
        let h = q.add_raw_chain(&chain).unwrap();
        q.publish_and_kick();
        match q.wait_used(T) {
            Some((id, _)) => assert_eq!(id, h, "round {round}: completions stay in order here"),
            None => panic!("round {round}: chain {chain:?} never completed"),
        }
    }
    let data = pattern(1, 8192);
    assert_eq!(write(&d, &mut q, area, 100, &data), OK);
    assert_eq!(read(&d, &mut q, area + 65536, 100, data.len()), (OK, data));
    let io = &s.io_stats;
    let served = io.total(|s| &s.reads)
        + io.total(|s| &s.writes)
        + io.total(|s| &s.flushes)
        + io.total(|s| &s.discards)
        + io.total(|s| &s.write_zeroes);
    eprintln!(
        "malformed: {:?}; nvme: {:?}",
        s.stats.snapshot(),
        io.snapshot()
    );
    assert!(
        s.stats.total() > 100,
        "malformed chains were refused and counted"
    );
    assert!(
        served > 300,
        "the generator also reaches the data path ({served} served)"
    );
}

#[test]
fn a_broken_avail_ring_stops_only_its_queue_and_costs_no_cpu() {
    let s = TestServer::start(ram(16 * MIB, 512), 2, 1);
    let mut d = connect(&s, 2, true);
    let buf = d.alloc(1 << 20, 4096).unwrap();
    let mut qs = d.take_queues();
    // Queue 0 claims far more requests than it has entries: the ring protocol is broken.
    let size = qs[0].size();
    qs[0].publish_bogus_avail_idx(size + 10);
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        qs[0].publish_bogus_avail_idx(size + 11);
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        s.stats.get(Malformed::Ring),
        1,
        "counted once, not re-polled"
    );
    // The poller sleeps: the broken queue costs nothing.
    let cpu0 = s.pollers[0].cpu_time();
    std::thread::sleep(Duration::from_millis(500));
    let cpu = s.pollers[0].cpu_time() - cpu0;
    assert!(
        cpu < Duration::from_millis(50),
        "{cpu:?} of CPU in 500 ms on a broken ring"
    );
    // The other queue of the same device keeps working.
    let data = pattern(9, 64 << 10);
    assert_eq!(write(&d, &mut qs[1], buf, 100, &data), OK);
    let (st, back) = read(&d, &mut qs[1], buf + (256 << 10), 100, data.len());
    assert_eq!(st, OK);
    assert!(back == data);
    // And the next connection gets a working device.
    drop(qs);
    d.disconnect();
    let mut d = connect(&s, 1, true);
    let buf = d.alloc(1 << 20, 4096).unwrap();
    let mut q = d.take_queues().pop().unwrap();
    assert_eq!(write(&d, &mut q, buf, 0, &data), OK);
}

/// A memfd of `len` bytes, as a front end would pass for guest memory or an inflight region.
fn memfd(len: u64) -> std::fs::File {
    let fd =
        nix::sys::memfd::memfd_create(c"hostile", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(len).unwrap();
    f
}

#[test]
fn hostile_messages_are_refused_and_the_connection_goes_on() {
    use std::os::fd::AsRawFd;
    use vhost::vhost_user::message::VhostUserInflight;
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
    let s = TestServer::start(ram(16 * MIB, 512), 2, 1);
    let mut d = connect(&s, 2, true);
    let buf = d.alloc(1 << 20, 4096).unwrap();
    let mut qs = d.take_queues();
    let mut fe = d.frontend().clone();
    let page = leap_runtime::mem::page_size() as u64;
    let works = |d: &Driver, q: &mut DriverQueue, seed: u8| {
        let data = pattern(seed, 8 << 10);
        assert_eq!(write(d, q, buf, 64, &data), OK);
        assert!(read(d, q, buf + (512 << 10), 64, data.len()).1 == data);
    };
    works(&d, &mut qs[0], 1);
    let before = s.stats.get(Malformed::Message);
    // Memory tables: a region past the end of its file (SIGBUS on first touch if mapped), an
    // offset beyond the file, an unaligned offset. Each keeps its file open for the request.
    let small = memfd(page);
    let region = |fd: &std::fs::File, size: u64, offset: u64| VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0x7000_0000_0000,
        mmap_offset: offset,
        mmap_handle: fd.as_raw_fd(),
    };
    for (what, r) in [
        (
            "region past the end of its file",
            region(&small, 16 * page, 0),
        ),
        ("offset beyond the file", region(&small, page, 8 * page)),
        ("unaligned offset", region(&small, page / 2, 1)),
    ] {
        assert!(fe.set_mem_table(&[r]).is_err(), "{what} accepted");
    }
    // Stop queue 1 and feed it bad ring parameters; queue 0 keeps running throughout.
    fe.get_vring_base(1).unwrap();
    assert!(fe.set_vring_num(1, 100).is_err(), "ring size 100 accepted");
    assert!(fe.set_vring_num(1, 0).is_err(), "ring size 0 accepted");
    assert!(
        fe.set_vring_num(1, 4096).is_err(),
        "ring size beyond the maximum accepted"
    );
    fe.set_vring_num(1, 128).unwrap();
    let ring = |desc: u64| VringConfigData {
        queue_max_size: 128,
        queue_size: 128,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: desc + 0x1000,
        avail_ring_addr: desc + 0x800,
        log_addr: None,
    };
    // Guest memory is the driver's one region: rings straddling its end, or outside it.
    let end = d.memory_va_range().end;
    for (what, c) in [
        (
            "rings straddling the end of guest memory",
            ring(end - 0x800),
        ),
        ("rings outside guest memory", ring(end + (1 << 30))),
    ] {
        assert!(fe.set_vring_addr(1, &c).is_err(), "{what} accepted");
    }
    // Inflight regions of the wrong size, and queue sizes that are not powers of two.
    let f = memfd(64 << 10);
    for (what, msg) in [
        ("a wrong size", VhostUserInflight::new(100, 0, 2, 128)),
        (
            "a queue size of 100",
            VhostUserInflight::new(2 * 1664, 0, 2, 100),
        ),
        (
            "more queues than the device",
            VhostUserInflight::new(9 * 2112, 0, 9, 128),
        ),
    ] {
        assert!(
            fe.set_inflight_fd(&msg, f.as_raw_fd()).is_err(),
            "inflight region with {what} accepted"
        );
    }
    // Features never offered.
    assert!(
        fe.set_features(1 << 63).is_err(),
        "unoffered feature accepted"
    );
    let refused = s.stats.get(Malformed::Message) - before;
    assert_eq!(refused, 12, "every refusal counted");
    // The connection goes on, and the queue that kept running still works.
    works(&d, &mut qs[0], 2);
    // A message the protocol layer cannot accept (a misaligned descriptor table fails the
    // message's own validation, and no reply can be sent): the connection ends, counted...
    assert!(fe.set_vring_addr(1, &ring(end - (8 << 20) + 8)).is_err());
    assert_eq!(s.stats.get(Malformed::Message) - before, 13);
    assert!(
        fe.get_features().is_err(),
        "the connection should be closed"
    );
    // ...and the next connection is served as usual.
    drop(qs);
    d.disconnect();
    let mut d = connect(&s, 2, true);
    let mut qs = d.take_queues();
    let buf2 = d.alloc(1 << 20, 4096).unwrap();
    assert_eq!(buf2, buf, "same layout");
    works(&d, &mut qs[1], 3);
}
