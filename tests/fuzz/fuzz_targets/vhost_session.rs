//! A vhost-user session as a buggy or hostile front end could run it, against leapd's own
//! request handling (`vhost` crate parser + `BlkDevice`) on a RAM disk, over a real socketpair:
//! raw messages of any code, size and body with memfds or eventfds attached; structured memory
//! tables, ring setups and inflight regions near the valid ones; and guest memory (rings,
//! descriptor chains, request headers) written from the input, served by a real poller.
//! Nothing may panic, hang, or touch memory outside what the session mapped.
//!
//! Input: a sequence of operations, each starting with a selector byte (see `step`).
#![no_main]

use leap_runtime::backend::RamBackend;
use leap_runtime::{DeviceIoStats, Namespace, Poller, PollerConfig};
use leap_vhost::{BlkDevice, DeviceConfig, DeviceContext, VhostStats};
use libfuzzer_sys::fuzz_target;
use std::fs::File;
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vhost::vhost_user::BackendReqHandler;

const MEM: u64 = 256 << 10;
const VA: u64 = 0x7f00_0000_0000;
const QUEUES: u16 = 2;

fn ctx() -> &'static DeviceContext {
    static C: OnceLock<DeviceContext> = OnceLock::new();
    C.get_or_init(|| {
        let poller = Poller::spawn(PollerConfig {
            idle_spin: Duration::ZERO,
            stop_timeout: Duration::from_millis(100),
            ..Default::default()
        })
        .unwrap();
        DeviceContext {
            ns: Namespace::new(Arc::new(RamBackend::new(1 << 20, 512).unwrap())),
            pollers: Arc::new(vec![poller]),
            config: DeviceConfig {
                num_queues: QUEUES,
                max_queue_size: 256,
                ..Default::default()
            },
            stats: Arc::new(VhostStats::default()),
            io_stats: Arc::new(DeviceIoStats::new(QUEUES as usize)),
            writeback: true,
        }
    })
}

fn memfd(len: u64) -> File {
    let fd = nix::sys::memfd::memfd_create(c"fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    let f = File::from(fd);
    f.set_len(len).unwrap();
    f
}

fn eventfd() -> File {
    File::from(leap_runtime::eventfd::new().unwrap())
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v: Vec<u8> = self.0.iter().take(n).copied().collect();
        self.0 = &self.0[v.len()..];
        v.resize(n, 0);
        v
    }
}

struct Session {
    ours: UnixStream,
    handler: BackendReqHandler<Mutex<BlkDevice>>,
    dev: Arc<Mutex<BlkDevice>>,
    guest: File,
    kicks: Vec<File>,
    alive: bool,
}

impl Session {
    /// Sends one message and lets the device handle it; replies are read and dropped.
    fn send(&mut self, code: u32, flags: u32, body: &[u8], fds: &[RawFd]) {
        if !self.alive {
            return;
        }
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&code.to_le_bytes());
        hdr[4..8].copy_from_slice(&flags.to_le_bytes());
        hdr[8..12].copy_from_slice(&(body.len() as u32).to_le_bytes());
        let iov = [IoSlice::new(&hdr), IoSlice::new(body)];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(fds)];
        let cmsgs: &[nix::sys::socket::ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        if nix::sys::socket::sendmsg::<()>(
            self.ours.as_raw_fd(),
            &iov,
            cmsgs,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .is_err()
        {
            self.alive = false;
            return;
        }
        match self.handler.handle_request() {
            Ok(()) => {}
            Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {
                if self.dev.lock().unwrap().take_hangup() {
                    self.alive = false;
                }
            }
            // The server ends the connection on anything else.
            Err(_) => self.alive = false,
        }
        let mut buf = [0u8; 4096];
        while matches!((&self.ours).read(&mut buf), Ok(n) if n > 0) {}
    }

    fn u64_body(v: u64) -> Vec<u8> {
        v.to_le_bytes().to_vec()
    }

    fn state(index: u32, num: u32) -> Vec<u8> {
        let mut b = index.to_le_bytes().to_vec();
        b.extend_from_slice(&num.to_le_bytes());
        b
    }

    /// Waits until the poller has run a couple of rounds (it picked up attached rings).
    fn settle(&self) {
        let st = ctx().pollers[0].stats();
        let r0 = st.rounds.load(std::sync::atomic::Ordering::Relaxed);
        let t = Instant::now();
        while st.rounds.load(std::sync::atomic::Ordering::Relaxed) < r0 + 1
            && t.elapsed() < Duration::from_millis(2)
        {
            std::hint::spin_loop();
        }
    }

    fn step(&mut self, inp: &mut Input) {
        const V1: u32 = 0x1;
        const NEED_REPLY: u32 = 0x8;
        let flags = if inp.u8() & 1 == 0 { V1 | NEED_REPLY } else { V1 };
        match inp.u8() % 8 {
            // A raw message: any code, size, body, with 0..2 fds of either kind.
            0 => {
                let code = (inp.u8() % 48) as u32;
                let flags = inp.u32();
                let len = (inp.u16() % 320) as usize;
                let body = inp.bytes(len);
                let n = inp.u8();
                let files: Vec<File> = (0..n % 3)
                    .map(|k| {
                        if n & (0x10 << k) != 0 {
                            eventfd()
                        } else {
                            memfd(inp.u16() as u64 * 64)
                        }
                    })
                    .collect();
                let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
                self.send(code, flags, &body, &fds);
            }
            // SET_MEM_TABLE: one or two regions of the guest memfd, fields near the valid ones.
            1 => {
                let n = 1 + (inp.u8() % 2) as u32;
                let mut body = n.to_le_bytes().to_vec();
                body.extend_from_slice(&0u32.to_le_bytes());
                let mut fds = Vec::new();
                for k in 0..n {
                    let sel = inp.u8();
                    let half = MEM / 2;
                    let (gpa, size, ua, off) = if sel & 0x80 == 0 {
                        (k as u64 * half, half, VA + k as u64 * half, k as u64 * half)
                    } else {
                        (
                            inp.u32() as u64 * 4096,
                            (inp.u16() as u64 + 1) * 4096,
                            VA + inp.u32() as u64,
                            inp.u16() as u64 * 4096,
                        )
                    };
                    let size = if n == 1 && sel & 0x80 == 0 { MEM } else { size };
                    for v in [gpa, size, ua, off] {
                        body.extend_from_slice(&v.to_le_bytes());
                    }
                    fds.push(self.guest.as_raw_fd());
                }
                self.send(5, flags, &body, &fds);
            }
            // A ring: NUM, BASE, ADDR (VAs inside guest memory), KICK, CALL, ENABLE.
            2 => {
                let q = (inp.u8() % (QUEUES as u8 + 1)) as u32;
                let num = 1u32 << (inp.u8() % 10);
                self.send(8, flags, &Self::state(q, num), &[]);
                self.send(10, flags, &Self::state(q, inp.u16() as u32), &[]);
                let mut addr = q.to_le_bytes().to_vec();
                addr.extend_from_slice(&0u32.to_le_bytes());
                for _ in 0..4 {
                    let off = (inp.u16() as u64) << 2;
                    addr.extend_from_slice(&(VA + off).to_le_bytes());
                }
                self.send(9, flags, &addr, &[]);
                let kick = eventfd();
                let call = eventfd();
                self.send(13, flags, &Self::u64_body(q as u64), &[call.as_raw_fd()]);
                self.send(12, flags, &Self::u64_body(q as u64), &[kick.as_raw_fd()]);
                self.send(18, flags, &Self::state(q, 1), &[]);
                self.kicks.push(kick);
                self.settle();
            }
            // Guest memory: rings, descriptors, headers.
            3 => {
                let off = (inp.u16() as u64 * 4) % MEM;
                let len = inp.u8() as usize;
                let bytes = inp.bytes(len);
                let _ = self.guest.write_all_at(&bytes, off);
            }
            // Kick every ring and let the poller serve them.
            4 => {
                for k in &self.kicks {
                    let _ = nix::unistd::write(k, &1u64.to_ne_bytes());
                }
                self.settle();
            }
            // GET_VRING_BASE: stops a ring, completing what it holds.
            5 => {
                let q = (inp.u8() % (QUEUES as u8 + 1)) as u32;
                self.send(11, flags, &Self::state(q, 0), &[]);
            }
            // GET_INFLIGHT_FD, or SET_INFLIGHT_FD with a region written from the input.
            6 => {
                let nq = (inp.u8() % 4) as u16;
                let qs = 1u16 << (inp.u8() % 10);
                let mut body = Vec::new();
                if inp.u8() & 1 == 0 {
                    for v in [0u64, 0] {
                        body.extend_from_slice(&v.to_le_bytes());
                    }
                    body.extend_from_slice(&nq.to_le_bytes());
                    body.extend_from_slice(&qs.to_le_bytes());
                    body.extend_from_slice(&[0; 4]);
                    self.send(31, flags, &body, &[]);
                } else {
                    let size = nq as u64 * leap_vhost::inflight::queue_region_bytes(qs) as u64;
                    let size = if inp.u8() & 1 == 0 { size } else { inp.u16() as u64 };
                    let f = memfd(size.max(1));
                    let flen = inp.u8() as usize;
                    let fill = inp.bytes(flen);
                    let _ = f.write_all_at(&fill, inp.u16() as u64 % size.max(1));
                    for v in [size, 0] {
                        body.extend_from_slice(&v.to_le_bytes());
                    }
                    body.extend_from_slice(&nq.to_le_bytes());
                    body.extend_from_slice(&qs.to_le_bytes());
                    body.extend_from_slice(&[0; 4]);
                    self.send(32, flags, &body, &[f.as_raw_fd()]);
                }
            }
            // Features: what a front end would ack (with protocol features), or anything.
            _ => {
                let f = if inp.u8() & 1 == 0 {
                    (1u64 << 32) | (1 << 30) | (1 << 29) | (1 << 28) | 0x1246
                } else {
                    inp.u32() as u64 | (inp.u32() as u64) << 32
                };
                self.send(2, flags, &Self::u64_body(f), &[]);
                self.send(16, flags, &Self::u64_body(0x1209), &[]);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let dev = Arc::new(Mutex::new(BlkDevice::new(ctx().clone())));
    let handler = BackendReqHandler::from_stream(theirs, dev.clone());
    let mut s = Session {
        ours,
        handler,
        dev,
        guest: memfd(MEM),
        kicks: Vec::new(),
        alive: true,
    };
    let mut inp = Input(data);
    let mut steps = 0;
    while !inp.0.is_empty() && steps < 64 {
        s.step(&mut inp);
        steps += 1;
    }
    // The connection ends: every ring stops, what is in flight completes.
    s.dev.lock().unwrap().shutdown(Some(Duration::from_secs(5)));
});
