//! Helpers for NVMe/TCP tests: an in-process `leapd target`, and a synchronous driver for a back
//! end's queue that keeps many commands in flight and checks what comes back.

use leap_queues::nvme::io;
use leap_queues::{Sqe, Status};
use leap_runtime::backend::{Backend, BackendQueue, IoOp, IoRequest, Submitted};
use leap_runtime::nvmf::initiator::{InitiatorConfig, NvmeTcpBackend};
use leap_runtime::nvmf::target::{Subsystem, Target, TargetConfig};
use leap_runtime::{Namespace, Namespaces, Poller};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A target on 127.0.0.1 (a port the system picks) exporting `disks`.
pub struct TestTarget {
    /// The target (drop it to stop accepting).
    pub target: Option<Target>,
    /// Its pollers (drop them to end every connection).
    pub pollers: Option<Arc<Vec<Poller>>>,
    /// The subsystem (counters).
    pub sub: Arc<Subsystem>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl TestTarget {
    /// Starts a target with `cfg` over `disks` on `pollers` poller threads.
    pub fn start(cfg: TargetConfig, disks: Vec<Arc<dyn Backend>>, pollers: usize) -> TestTarget {
        let _ = env_logger::builder().is_test(true).try_init();
        let nss = Namespaces::new(disks.into_iter().map(Namespace::new).collect());
        let sub = Subsystem::new(cfg, nss);
        let pollers = Arc::new(crate::spawn_pollers(pollers, "tgt-poller"));
        let target = Target::start(
            sub.clone(),
            &["127.0.0.1:0".parse().expect("addr")],
            pollers.clone(),
        )
        .expect("target");
        let addr = target.local_addrs()[0];
        TestTarget {
            target: Some(target),
            pollers: Some(pollers),
            sub,
            addr,
        }
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        self.target.take();
        self.pollers.take();
    }
}

/// An initiator configuration for `addr`/`nqn` with a test host NQN.
pub fn initiator(addr: SocketAddr, nqn: &str, queues: u16, depth: u16) -> InitiatorConfig {
    InitiatorConfig {
        addr,
        subnqn: nqn.into(),
        nsid: 1,
        queues,
        depth,
        digests: false,
        hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-8000-8000-00000000test".into(),
        hostid: [7; 16],
        timeout: Duration::from_secs(20),
    }
}

/// Connects an initiator back end.
pub fn connect(cfg: InitiatorConfig) -> Arc<NvmeTcpBackend> {
    NvmeTcpBackend::open(cfg).expect("initiator")
}

/// The pattern block `lba` holds after a test writes it with `seed`.
pub fn pattern(lba: u64, seed: u8, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = (lba as u8)
            .wrapping_mul(13)
            .wrapping_add(i as u8)
            .wrapping_add(seed)
            ^ (i >> 9) as u8;
    }
}

/// One command for [`Driver::run`].
#[derive(Clone, Copy, Debug)]
pub struct Op {
    /// Write (true) or read.
    pub write: bool,
    /// First block.
    pub slba: u64,
    /// Blocks.
    pub nlb: u32,
}

/// Drives one back-end queue the way the poller does: keeps up to `depth` commands in flight,
/// respects `room`, and polls for completions.
pub struct Driver {
    /// The queue.
    pub q: Box<dyn BackendQueue>,
    /// Block size.
    pub block: usize,
}

impl Driver {
    /// A driver on a new queue of `backend`.
    pub fn new(backend: &dyn Backend, depth: usize) -> Driver {
        Driver {
            q: backend.open_queue(depth).expect("open_queue"),
            block: backend.info().block_size as usize,
        }
    }

    /// Runs `ops` with at most `depth` in flight, data in `buf` (each op uses its own region of
    /// `nlb * block` bytes at offset `k * stride`). Returns each op's status, in order.
    pub fn run(&mut self, ops: &[Op], buf: &mut [u8], stride: usize, depth: usize) -> Vec<Status> {
        let mut st = vec![None; ops.len()];
        let mut next = 0;
        let mut inflight = 0;
        let mut sqes: Vec<Sqe> = vec![Sqe::default(); ops.len()];
        let start = Instant::now();
        while st.iter().any(|s| s.is_none()) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "commands did not complete"
            );
            while next < ops.len() && inflight < depth && self.q.room() > 0 {
                let o = ops[next];
                let len = o.nlb as usize * self.block;
                let off = next * stride;
                let iov = [libc::iovec {
                    iov_base: buf[off..off + len].as_mut_ptr().cast(),
                    iov_len: len,
                }];
                let mut s = Sqe::new(if o.write { io::WRITE } else { io::READ }, next as u16);
                s.set_nsid(1);
                s.set_slba(o.slba);
                s.set_nlb(o.nlb);
                sqes[next] = s;
                let req = IoRequest {
                    tag: next as u64,
                    op: if o.write {
                        IoOp::Write { fua: false }
                    } else {
                        IoOp::Read
                    },
                    offset: o.slba * self.block as u64,
                    len: len as u64,
                    iov: &iov,
                    cmd: Some(&sqes[next]),
                };
                // SAFETY: `buf` outlives the loop, which waits for every completion; each op
                // has its own region.
                match unsafe { self.q.submit(&req) } {
                    Submitted::Done(s) => st[next] = Some(s),
                    Submitted::Queued => inflight += 1,
                }
                next += 1;
            }
            self.q.flush();
            let mut got = Vec::new();
            self.q.poll(&mut |tag, s| got.push((tag, s)));
            for (tag, s) in got {
                st[tag as usize] = Some(s);
                inflight -= 1;
            }
            if inflight > 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        st.into_iter()
            .map(|s| s.unwrap_or(Status::INTERNAL_ERROR))
            .collect()
    }

    /// Writes `n` blocks of patterns (one command per `per` blocks, from `first`) and reads them
    /// back, `depth` in flight; panics on any error or mismatch.
    pub fn write_verify(&mut self, first: u64, n: u64, per: u32, seed: u8, depth: usize) {
        let cmds = n.div_ceil(per as u64) as usize;
        let stride = per as usize * self.block;
        let mut data = vec![0u8; cmds * stride];
        let mut ops = Vec::new();
        for k in 0..cmds {
            let slba = first + k as u64 * per as u64;
            let nlb = per.min((first + n - slba) as u32);
            for b in 0..nlb as usize {
                let at = k * stride + b * self.block;
                pattern(slba + b as u64, seed, &mut data[at..at + self.block]);
            }
            ops.push(Op {
                write: true,
                slba,
                nlb,
            });
        }
        let expect = data.clone();
        for (k, s) in self.run(&ops, &mut data, stride, depth).iter().enumerate() {
            assert!(s.is_success(), "write {k}: {s}");
        }
        for o in ops.iter_mut() {
            o.write = false;
        }
        data.fill(0xee);
        for (k, s) in self.run(&ops, &mut data, stride, depth).iter().enumerate() {
            assert!(s.is_success(), "read {k}: {s}");
        }
        for (k, o) in ops.iter().enumerate() {
            let len = o.nlb as usize * self.block;
            assert!(
                data[k * stride..k * stride + len] == expect[k * stride..k * stride + len],
                "blocks {}..{} read back differ",
                o.slba,
                o.slba + o.nlb as u64
            );
        }
    }
}

/// The default target configuration with `nqn`.
pub fn target_config(nqn: &str) -> TargetConfig {
    TargetConfig {
        nqn: nqn.into(),
        ..TargetConfig::default()
    }
}
