//! The in-process driver against a real vhost-user-blk backend: `qemu-storage-daemon`.
//!
//! Skips (loudly) when `qemu-storage-daemon` is not on PATH; CI installs it.
#![cfg(feature = "driver")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leap_vhost::driver::{
    blk_data_desc, blk_request, blk_status, submit_blk, submit_blk_segments, Desc, DiscardSegment,
    Driver, DriverOptions, DriverQueue, RawDesc, DESC_F_NEXT, DESC_F_WRITE, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
use vm_memory::{Bytes, GuestAddress};

const IMAGE_SIZE: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);
const IO_LEN: usize = 8192;

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Kills the daemon by PID however the test ends.
struct Qsd {
    child: Child,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qsd(bin: &Path, dir: &Path) -> (Qsd, PathBuf) {
    let img = dir.join("disk.img");
    let sock = dir.join("vhost.sock");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(IMAGE_SIZE))
        .expect("create sparse image");
    let child = Command::new(bin)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=d,file=f")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues=2",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let mut qsd = Qsd { child };
    let deadline = Instant::now() + TIMEOUT;
    while !sock.exists() {
        if let Some(status) = qsd.child.try_wait().expect("try_wait") {
            panic!("qemu-storage-daemon exited early: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (qsd, sock)
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..IO_LEN)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// OUT a pattern, IN it back, FLUSH, GET_ID, WRITE_ZEROES, then a batch of reads in flight.
fn exercise_queue(q: &mut DriverQueue, wbuf: u64, rbuf: u64, idbuf: u64, sector: u64, seed: u8) {
    let mem = q.memory().clone();
    let data = pattern(seed);
    mem.write_slice(&data, GuestAddress(wbuf)).unwrap();

    let (status, _) = blk_request(
        q,
        VIRTIO_BLK_T_OUT,
        sector,
        &[blk_data_desc(VIRTIO_BLK_T_OUT, wbuf, IO_LEN as u32)],
        TIMEOUT,
    )
    .expect("OUT");
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "OUT status");

    mem.write_slice(&vec![0u8; IO_LEN], GuestAddress(rbuf))
        .unwrap();
    let (status, used_len) = blk_request(
        q,
        VIRTIO_BLK_T_IN,
        sector,
        &[blk_data_desc(VIRTIO_BLK_T_IN, rbuf, IO_LEN as u32)],
        TIMEOUT,
    )
    .expect("IN");
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "IN status");
    assert!(used_len as usize >= IO_LEN, "IN used len {used_len}");
    let mut back = vec![0u8; IO_LEN];
    mem.read_slice(&mut back, GuestAddress(rbuf)).unwrap();
    assert!(back == data, "read back differs from what was written");

    let (status, _) = blk_request(q, VIRTIO_BLK_T_FLUSH, 0, &[], TIMEOUT).expect("FLUSH");
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "FLUSH status");

    let (status, _) = blk_request(
        q,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[blk_data_desc(VIRTIO_BLK_T_GET_ID, idbuf, 20)],
        TIMEOUT,
    )
    .expect("GET_ID");
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "GET_ID status");
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(idbuf)).unwrap();
    let end = id.iter().position(|&b| b == 0).unwrap_or(id.len());
    assert!(end > 0, "empty device id");
    eprintln!(
        "queue {}: GET_ID = {:?}",
        q.index(),
        String::from_utf8_lossy(&id[..end])
    );

    // WRITE_ZEROES over the second half, then read everything back.
    let half = (IO_LEN / 2 / 512) as u64;
    let head = submit_blk_segments(
        q,
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[DiscardSegment {
            sector: sector + half,
            num_sectors: half as u32,
            flags: 0,
        }],
    )
    .expect("submit WRITE_ZEROES");
    q.publish_and_kick();
    let (got, _) = q.wait_used(TIMEOUT).expect("WRITE_ZEROES completion");
    assert_eq!(got, head);
    assert_eq!(
        u32::from(blk_status(q, head)),
        VIRTIO_BLK_S_OK,
        "WRITE_ZEROES status"
    );
    let (status, _) = blk_request(
        q,
        VIRTIO_BLK_T_IN,
        sector,
        &[blk_data_desc(VIRTIO_BLK_T_IN, rbuf, IO_LEN as u32)],
        TIMEOUT,
    )
    .expect("IN after WRITE_ZEROES");
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK);
    mem.read_slice(&mut back, GuestAddress(rbuf)).unwrap();
    assert!(
        back[..IO_LEN / 2] == data[..IO_LEN / 2],
        "first half changed"
    );
    assert!(
        back[IO_LEN / 2..].iter().all(|&b| b == 0),
        "second half not zeroed"
    );

    // Many requests in flight, one publish: exercises the free list, wrap-around of the ring
    // indices over several rounds, and notification suppression.
    let size = q.size();
    let batch = usize::from(size / 3); // 3 descriptors per request
    for round in 0..4u64 {
        let mut heads = Vec::with_capacity(batch);
        for k in 0..batch {
            let desc = Desc::writable(rbuf + (k as u64 % 16) * 512, 512);
            heads.push(submit_blk(q, VIRTIO_BLK_T_IN, sector + (k as u64 % 16), &[desc]).unwrap());
        }
        assert!(q.free_descriptors() < 3);
        q.publish_and_kick();
        let mut done = 0;
        while done < batch {
            let (id, _) = q.wait_used(TIMEOUT).expect("batched completion");
            assert!(heads.contains(&id), "round {round}: unexpected id {id}");
            assert_eq!(u32::from(blk_status(q, id)), VIRTIO_BLK_S_OK);
            done += 1;
        }
        assert_eq!(q.free_descriptors(), size);
    }
    assert_eq!(q.device_errors(), 0);

    // A valid request written through the raw API: links point where peek_free_ids says.
    let ids = q.peek_free_ids(3);
    let hdr = q.scratch_addr(ids[0]);
    let mut raw_hdr = [0u8; 16];
    raw_hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    raw_hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw_hdr, GuestAddress(hdr)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(hdr + 16)).unwrap();
    let head = q
        .add_raw_chain(&[
            RawDesc {
                addr: hdr,
                len: 16,
                flags: DESC_F_NEXT,
                next: ids[1],
            },
            RawDesc {
                addr: rbuf,
                len: 512,
                flags: DESC_F_WRITE | DESC_F_NEXT,
                next: ids[2],
            },
            RawDesc {
                addr: hdr + 16,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        ])
        .unwrap();
    assert_eq!(head, ids[0]);
    q.publish_and_kick();
    assert_eq!(q.wait_used(TIMEOUT).map(|(id, _)| id), Some(head));
    assert_eq!(u32::from(blk_status(q, head)), VIRTIO_BLK_S_OK);
    assert_eq!(q.free_descriptors(), size);
}

/// Keeps `depth` reads in flight for `total` requests: crosses the 2^16 wrap of the ring
/// indices. `spin` polls with interrupts off (how `leapd bench` runs); otherwise sleeps on the
/// call eventfd.
fn sustained(q: &mut DriverQueue, buf: u64, total: u32, depth: u16, spin: bool) -> f64 {
    q.set_interrupts(!spin);
    let start = Instant::now();
    let (mut submitted, mut completed) = (0u32, 0u32);
    let mut idle_since = Instant::now();
    while completed < total {
        while submitted < total && submitted - completed < u32::from(depth) {
            let k = u64::from(submitted % 64);
            submit_blk(q, VIRTIO_BLK_T_IN, k, &[Desc::writable(buf + k * 512, 512)]).unwrap();
            submitted += 1;
        }
        q.publish_and_kick();
        let got = if spin {
            q.poll_used()
        } else {
            q.wait_used(TIMEOUT)
        };
        match got {
            Some((id, _)) => {
                assert_eq!(u32::from(blk_status(q, id)), VIRTIO_BLK_S_OK);
                completed += 1;
                idle_since = Instant::now();
                while let Some((id, _)) = q.poll_used() {
                    assert_eq!(u32::from(blk_status(q, id)), VIRTIO_BLK_S_OK);
                    completed += 1;
                }
            }
            None => {
                assert!(
                    idle_since.elapsed() < TIMEOUT,
                    "stalled at {completed}/{total}"
                );
                std::hint::spin_loop();
            }
        }
    }
    assert_eq!(q.free_descriptors(), q.size());
    assert_eq!(q.device_errors(), 0);
    q.set_interrupts(true);
    f64::from(total) / start.elapsed().as_secs_f64()
}

fn run(sock: &Path, event_idx: bool) {
    let opts = DriverOptions {
        num_queues: 2,
        event_idx,
        ..DriverOptions::default()
    };
    let mut drv = Driver::connect(sock, opts).expect("connect");
    let acked = drv.acked_features();
    assert_eq!(acked & (1 << 29) != 0, event_idx, "EVENT_IDX negotiation");
    assert_ne!(acked & (1 << 32), 0, "VERSION_1 negotiated");

    let cfg = drv.config().expect("GET_CONFIG");
    assert_eq!(cfg.capacity, IMAGE_SIZE / 512, "capacity in sectors");
    assert_eq!(cfg.num_queues, 2);
    eprintln!("event_idx={event_idx}: {cfg:?}");

    if drv.device_features() & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 {
        drv.set_writeback(false).expect("SET_CONFIG wce=0");
        assert!(!drv.config().unwrap().writeback);
        drv.set_writeback(true).expect("SET_CONFIG wce=1");
        assert!(drv.config().unwrap().writeback);
    }

    let mut bufs = Vec::new();
    for _ in 0..2 {
        let w = drv.alloc(IO_LEN, 4096).unwrap();
        let r = drv.alloc(IO_LEN, 4096).unwrap();
        let id = drv.alloc(20, 8).unwrap();
        bufs.push((w, r, id));
    }
    let queues = drv.take_queues();
    assert_eq!(queues.len(), 2);
    // One thread per queue, as `leapd bench` runs them.
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            let (w, r, id) = bufs[i];
            let sector = 2048 * i as u64 + if event_idx { 0 } else { 64 };
            s.spawn(move || {
                exercise_queue(&mut q, w, r, id, sector, i as u8 + u8::from(event_idx));
                let iops = sustained(&mut q, r, 70_000, 32, i == 1);
                eprintln!(
                    "event_idx={event_idx} queue {i} (spin={}): {} kicks, {iops:.0} IOPS at QD32",
                    i == 1,
                    q.kicks()
                );
            });
        }
    });
    drv.disconnect();
}

#[test]
fn driver_against_qemu_storage_daemon() {
    let Some(bin) = find_on_path("qemu-storage-daemon") else {
        eprintln!();
        eprintln!("==================================================================");
        eprintln!("SKIP driver_against_qemu_storage_daemon: qemu-storage-daemon not on PATH");
        eprintln!("==================================================================");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_qsd, sock) = start_qsd(&bin, dir.path());
    // The same daemon serves one connection after another, like QEMU reconnecting.
    run(&sock, true);
    run(&sock, false);
}
