//! leapd's SoC side of the agent protocol, in process: the tenant's RAM is a memfd, which the
//! "SoC" reaches as a window (the file mapped at a SoC address, as an ivshmem BAR would show
//! it). The test plays the host agent over a socketpair (memory table, ring, start, kicks) and
//! the tenant's driver (descriptor chains written straight into the RAM file). Requests are
//! served out of the window; only control crosses the channel.

use leap_runtime::backend::{Backend, RamBackend};
use leap_runtime::window::Window;
use leap_runtime::{DeviceIoStats, Namespace};
use leap_tests::spawn_pollers;
use leap_vhost::region::WindowFile;
use leap_vhost::relay::{self, Framer, MemRegion, Msg, Role, Vring};
use leap_vhost::soc::{serve, SocDevice};
use leap_vhost::{DeviceConfig, DeviceContext, Malformed, VhostStats};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RAM: u64 = 1 << 20;
const SOC: u64 = 0xc000_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;

fn memfd(len: u64) -> std::fs::File {
    let fd = nix::sys::memfd::memfd_create(c"tenant-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    let f = std::fs::File::from(fd);
    f.set_len(len).unwrap();
    f
}

fn desc(ram: &std::fs::File, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write_all_at(&d, DESC + 16 * i).unwrap();
}

/// Writes request `k` (head 3k: header, 512 bytes of data, status) and publishes it.
fn request(ram: &std::fs::File, k: u16, write: bool, sector: u64, data: u64) {
    let base = 0x8000 + 0x1000 * k as u64;
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&(write as u32).to_le_bytes());
    hdr[8..16].copy_from_slice(&sector.to_le_bytes());
    ram.write_all_at(&hdr, base).unwrap();
    ram.write_all_at(&[0xff], base + 0x100).unwrap();
    let h = 3 * k as u64;
    desc(ram, h, base, 16, 1, (h + 1) as u16);
    desc(
        ram,
        h + 1,
        data,
        512,
        1 | if write { 0 } else { 2 },
        (h + 2) as u16,
    );
    desc(ram, h + 2, base + 0x100, 1, 2, 0);
    ram.write_all_at(&(h as u16).to_le_bytes(), AVAIL + 4 + 2 * k as u64)
        .unwrap();
    ram.write_all_at(&(k + 1).to_le_bytes(), AVAIL + 2).unwrap();
}

fn used_idx(ram: &std::fs::File) -> u16 {
    let mut b = [0u8; 2];
    ram.read_exact_at(&mut b, USED + 2).unwrap();
    u16::from_le_bytes(b)
}

/// Waits (at most 10 s) until the device has used `n` requests.
fn wait_used(ram: &std::fs::File, n: u16, what: &str) {
    let t = Instant::now();
    while used_idx(ram) < n {
        assert!(t.elapsed() < Duration::from_secs(10), "{what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Agent {
    s: UnixStream,
    framer: Framer,
    seq: u32,
    got: Vec<(u32, Msg)>,
}

impl Agent {
    fn send(&mut self, m: Msg) -> u32 {
        self.seq += 1;
        let mut out = Vec::new();
        relay::encode(&m, self.seq, &mut out).unwrap();
        self.s.write_all(&out).unwrap();
        self.seq
    }
    /// Waits for a message `want` accepts.
    fn wait(&mut self, want: impl Fn(u32, &Msg) -> bool) -> Msg {
        let t = Instant::now();
        loop {
            if let Some(i) = self.got.iter().position(|(s, m)| want(*s, m)) {
                return self.got.remove(i).1;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no such message; got {:?}",
                self.got
            );
            let mut buf = [0u8; 4096];
            match self.s.read(&mut buf) {
                Ok(0) => panic!("the SoC side closed the session"),
                Ok(n) => self.got.extend(self.framer.push(&buf[..n]).unwrap()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    fn call(&mut self, m: Msg) -> (u32, u64) {
        let seq = self.send(m);
        match self.wait(|s, m| s == seq && matches!(m, Msg::Reply { .. })) {
            Msg::Reply { status, value } => (status, value),
            _ => unreachable!(),
        }
    }
}

/// A SoC session over a socketpair, serving a RAM disk through `windows`.
struct Session {
    agent: Agent,
    stats: Arc<VhostStats>,
    io_stats: Arc<DeviceIoStats>,
    stop: Arc<AtomicBool>,
    soc: std::thread::JoinHandle<Result<(), String>>,
}

/// A one-queue device context on a 1 MiB RAM disk.
fn ram_disk_context() -> DeviceContext {
    let disk: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
    DeviceContext {
        ns: Namespace::new(disk),
        pollers: Arc::new(spawn_pollers(1, "soc-poller")),
        config: DeviceConfig::default(),
        stats: Arc::new(VhostStats::default()),
        io_stats: Arc::new(DeviceIoStats::new(1)),
        writeback: true,
    }
}

impl Session {
    fn start(windows: Vec<(Window, WindowFile)>) -> (Session, Msg) {
        let ctx = ram_disk_context();
        let (stats, io_stats) = (ctx.stats.clone(), ctx.io_stats.clone());
        let (w, f) = windows.into_iter().unzip();
        let dev = SocDevice::new(ctx, w, f).unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let soc = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut dev, mut s) = (dev, theirs);
                serve(&mut s, &mut dev, &stop)
            })
        };
        let mut agent = Agent {
            s: ours,
            framer: Framer::default(),
            seq: 0,
            got: Vec::new(),
        };
        assert!(matches!(
            agent.wait(|_, m| matches!(m, Msg::Hello { .. })),
            Msg::Hello {
                role: Role::Soc,
                ..
            }
        ));
        let info = agent.wait(|_, m| matches!(m, Msg::DeviceInfo { .. }));
        let s = Session {
            agent,
            stats,
            io_stats,
            stop,
            soc,
        };
        (s, info)
    }

    fn end(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.soc.join().unwrap().unwrap();
    }
}

/// Describes and starts queue 0 (16 entries at DESC, AVAIL, USED); returns its description.
fn start_ring0(a: &mut Agent) -> Vring {
    let ring = Vring {
        queue: 0,
        size: 16,
        event_idx: false,
        desc: DESC,
        avail: AVAIL,
        used: USED,
        base: 0,
    };
    assert_eq!(a.call(Msg::Vring(ring)).0, 0);
    assert_eq!(a.call(Msg::VringStart(0)).0, 0);
    ring
}

/// The tenant's RAM as the only window.
fn ram_window(ram: &std::fs::File) -> (Window, WindowFile) {
    (
        Window {
            host: 0,
            len: RAM,
            soc: SOC,
        },
        WindowFile {
            file: ram.try_clone().unwrap(),
            soc: SOC,
            len: RAM,
        },
    )
}

#[test]
fn requests_are_served_through_the_window_and_only_control_crosses() {
    let ram = memfd(RAM);
    let (session, info) = Session::start(vec![ram_window(&ram)]);
    let Msg::DeviceInfo {
        num_queues,
        config,
        protocol,
        ..
    } = info
    else {
        unreachable!()
    };
    assert_eq!(protocol, 0, "no inflight window, no inflight tracking");
    let (stats, io_stats) = (session.stats.clone(), session.io_stats.clone());
    let mut session = session;
    let a = &mut session.agent;
    assert_eq!(num_queues, 1);
    assert_eq!(
        u64::from_le_bytes(config[0..8].try_into().unwrap()),
        (1 << 20) / 512,
        "capacity"
    );
    a.send(Msg::Hello {
        role: Role::Agent,
        features: 0,
        name: "test-agent".into(),
    });
    // Guest memory: guest address 0 is offset 0 of the tenant's RAM file, behind the window.
    assert_eq!(
        a.call(Msg::MemTable(vec![MemRegion {
            guest: 0,
            len: RAM,
            host: 0
        }]))
        .0,
        0
    );
    let ring = start_ring0(a);
    // A started ring interrupts the guest once (completions a predecessor may not have
    // signalled).
    a.wait(|_, m| *m == Msg::Call(0));
    // A write of 512 bytes at sector 8, then a read of it into another buffer.
    let data: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    ram.write_all_at(&data, 0x20000).unwrap();
    request(&ram, 0, true, 8, 0x20000);
    a.send(Msg::Kick(0));
    a.wait(|_, m| *m == Msg::Call(0));
    assert_eq!(used_idx(&ram), 1);
    request(&ram, 1, false, 8, 0x30000);
    a.send(Msg::Kick(0));
    wait_used(&ram, 2, "the read never completed");
    let mut back = vec![0u8; 512];
    ram.read_exact_at(&mut back, 0x30000).unwrap();
    assert_eq!(back, data, "read back through the window");
    for k in 0..2u64 {
        let mut st = [0xffu8];
        ram.read_exact_at(&mut st, 0x8000 + 0x1000 * k + 0x100)
            .unwrap();
        assert_eq!(st[0], 0, "request {k} status");
    }
    let io = io_stats.snapshot();
    let get = |k: &str| io.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap();
    assert_eq!((get("writes"), get("reads")), (1, 1));
    // Bad requests are refused with an errno and counted; the session goes on.
    let before = stats.get(Malformed::Message);
    assert_ne!(a.call(Msg::VringStart(5)).0, 0, "no queue 5");
    let outside = Vring {
        desc: RAM - 64,
        ..ring
    };
    assert_eq!(
        a.call(Msg::VringStop(0)),
        (0, 2),
        "stopped after two requests"
    );
    assert_eq!(a.call(Msg::Vring(outside)).0, 0);
    assert_ne!(
        a.call(Msg::VringStart(0)).0,
        0,
        "rings outside guest memory"
    );
    assert_ne!(
        a.call(Msg::MemTable(vec![MemRegion {
            guest: 0,
            len: 2 * RAM,
            host: 0
        }]))
        .0,
        0,
        "guest memory beyond the window"
    );
    assert_eq!(stats.get(Malformed::Message) - before, 3);
    assert_eq!(a.call(Msg::KeepAlive).0, 0);
    session.end();
}

/// The whole relay in process: the in-process driver (the tenant, through vhost-user) talks to
/// the agent, which relays control to the SoC side; the SoC serves the rings out of the tenant's
/// memfd seen as a window. The agent never maps guest memory.
#[test]
fn tenant_agent_and_soc_run_verified_io() {
    use leap_vhost::agent::{AgentDevice, Link};
    use leap_vhost::driver::{
        blk_request, Desc, Driver, DriverOptions, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use std::sync::Mutex;
    use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
    use vm_memory::{Bytes, GuestAddress};

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let listener = Listener::new(&sock, true).unwrap();
    let disk: Arc<dyn Backend> = Arc::new(RamBackend::new(4 << 20, 512).unwrap());
    let stats = Arc::new(VhostStats::default());
    let ctx = DeviceContext {
        ns: Namespace::new(disk),
        pollers: Arc::new(spawn_pollers(1, "soc-poller")),
        config: DeviceConfig::default(),
        stats: stats.clone(),
        io_stats: Arc::new(DeviceIoStats::new(1)),
        writeback: true,
    };
    // The tenant connects first (its memfd is the window); the agent answers it.
    let tenant = std::thread::spawn(move || {
        let mut d = Driver::connect(
            &sock,
            DriverOptions {
                queue_size: 64,
                mem_size: 8 << 20,
                inflight: true,
                ..Default::default()
            },
        )
        .expect("tenant connects through the agent");
        let buf = d.alloc(64 << 10, 4096).unwrap();
        let mut q = d.take_queues().pop().unwrap();
        let data: Vec<u8> = (0..32768u32).map(|i| (i * 13 + 5) as u8).collect();
        d.memory().write_slice(&data, GuestAddress(buf)).unwrap();
        let t = Duration::from_secs(10);
        let (st, _) = blk_request(
            &mut q,
            VIRTIO_BLK_T_OUT,
            64,
            &[Desc::readable(buf, 32768)],
            t,
        )
        .unwrap();
        assert_eq!(st, VIRTIO_BLK_S_OK as u8);
        let (st, used) = blk_request(
            &mut q,
            VIRTIO_BLK_T_IN,
            64,
            &[Desc::writable(buf + 32768, 32768)],
            t,
        )
        .unwrap();
        assert_eq!((st, used), (VIRTIO_BLK_S_OK as u8, 32769));
        let mut back = vec![0u8; 32768];
        d.memory()
            .read_slice(&mut back, GuestAddress(buf + 32768))
            .unwrap();
        assert_eq!(back, data, "data read back through agent and window");
        drop(q);
        d.disconnect();
    });
    let stream = loop {
        if let Some(s) = listener.accept().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The agent needs the window's file: the tenant's memfd, passed with SET_MEM_TABLE. Here
    // the test takes it from the first memory table the agent sees, through a probe device.
    let window_file = probe_memory_file(&stream);
    // The agent's inflight file, which the SoC reaches through a second window.
    let inflight = Arc::new(
        leap_vhost::inflight::WindowFile::prepare(&dir.path().join("inflight"), 1 << 20).unwrap(),
    );
    let (agent_end, soc_end) = UnixStream::pair().unwrap();
    let soc_dev = SocDevice::new(
        ctx,
        vec![
            Window {
                host: 0,
                len: 8 << 20,
                soc: SOC,
            },
            Window {
                host: leap_vhost::relay::INFLIGHT_HOST,
                len: 1 << 20,
                soc: 2 * SOC,
            },
        ],
        vec![
            WindowFile {
                file: window_file.try_clone().unwrap(),
                soc: SOC,
                len: 8 << 20,
            },
            WindowFile {
                file: inflight.file().try_clone().unwrap(),
                soc: 2 * SOC,
                len: 1 << 20,
            },
        ],
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let soc = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut dev, mut s) = (soc_dev, soc_end);
            serve(&mut s, &mut dev, &stop)
        })
    };
    let link = Link::connect(agent_end, "test-agent").unwrap();
    let dev = Arc::new(Mutex::new(
        AgentDevice::new(link, &window_file, Some(inflight.clone()), stats.clone()).unwrap(),
    ));
    let mut handler = BackendReqHandler::from_stream(stream, dev.clone());
    loop {
        match handler.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected | VuError::PartialMessage) => break,
            Err(e) => panic!("agent: {e}"),
        }
    }
    tenant.join().unwrap();
    dev.lock().unwrap().shutdown();
    stop.store(true, std::sync::atomic::Ordering::Release);
    soc.join().unwrap().unwrap();
    assert_eq!(stats.get(Malformed::Message), 0);
    // The tenant's inflight region is in the agent's file, and the SoC used it (version 1).
    let mut v = [0u8; 2];
    inflight
        .file()
        .read_exact_at(&mut v, leap_vhost::inflight::WINDOW_REGION_OFFSET + 8)
        .unwrap();
    assert_eq!(u16::from_le_bytes(v), 1);
}

/// Peeks at the tenant's memfd: in a real deployment the window's file is configured (the
/// tenant RAM file QEMU and the SoC VM's ivshmem share); the in-process driver makes its memfd
/// itself, so the test recovers it from /proc/self/fd by its name.
fn probe_memory_file(_s: &UnixStream) -> std::fs::File {
    let t = Instant::now();
    loop {
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                if target
                    .to_string_lossy()
                    .contains("memfd:leap-driver-guest-mem")
                {
                    if let Ok(f) = std::fs::File::options()
                        .read(true)
                        .write(true)
                        .open(e.path())
                    {
                        return f;
                    }
                }
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the tenant's memfd never appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The inflight region lives in the agent's inflight file, which the SoC reaches through a window
/// of its own (recognized by its header). A request a crashed predecessor left marked in flight
/// is resubmitted when the ring starts, before any kick, and completes exactly once; a region
/// outside every window is refused.
#[test]
fn inflight_regions_through_a_window_resubmit_what_was_left() {
    use leap_vhost::inflight::{self, queue_region_bytes};
    use leap_vhost::relay::INFLIGHT_HOST;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inflight");
    let file = inflight::WindowFile::prepare(&path, 1 << 20).unwrap();
    let (off, size) = file.fresh_region(1, 16, 1).unwrap();
    assert_eq!(size, queue_region_bytes(16) as u64);
    let f = file.file();
    // A predecessor took request 0 (head 0) and crashed before completing it: version 1,
    // desc_num 16, used_idx 0, head 0 marked with counter 1.
    f.write_all_at(&1u16.to_le_bytes(), off + 8).unwrap();
    f.write_all_at(&16u16.to_le_bytes(), off + 10).unwrap();
    f.write_all_at(&[1], off + 16).unwrap();
    f.write_all_at(&1u64.to_le_bytes(), off + 16 + 8).unwrap();
    let ram = memfd(RAM);
    let data: Vec<u8> = (0..512u32).map(|i| (i * 13 + 5) as u8).collect();
    ram.write_all_at(&data, 0x20000).unwrap();
    request(&ram, 0, true, 8, 0x20000);
    const WIN: u64 = 0x1_0000_0000;
    let inflight_window = (
        Window {
            host: INFLIGHT_HOST,
            len: 1 << 20,
            soc: WIN,
        },
        WindowFile {
            file: f.try_clone().unwrap(),
            soc: WIN,
            len: 1 << 20,
        },
    );
    let (mut session, info) = Session::start(vec![ram_window(&ram), inflight_window]);
    let Msg::DeviceInfo { protocol, .. } = info else {
        unreachable!()
    };
    assert_ne!(protocol, 0, "an inflight window: inflight tracking offered");
    let a = &mut session.agent;
    let region = |host| Msg::Inflight {
        host,
        size,
        num_queues: 1,
        queue_size: 16,
    };
    assert_ne!(a.call(region(RAM + 0x10000)).0, 0, "in no window");
    assert_eq!(a.call(region(INFLIGHT_HOST + off)).0, 0);
    let mem = Msg::MemTable(vec![MemRegion {
        guest: 0,
        len: RAM,
        host: 0,
    }]);
    assert_eq!(a.call(mem).0, 0);
    start_ring0(a);
    // No kick: the resubmitted request completes on its own.
    wait_used(&ram, 1, "never resubmitted");
    // Read it back; the write happened once and only once.
    request(&ram, 1, false, 8, 0x30000);
    a.send(Msg::Kick(0));
    wait_used(&ram, 2, "the read never completed");
    let mut back = vec![0u8; 512];
    ram.read_exact_at(&mut back, 0x30000).unwrap();
    assert_eq!(back, data);
    let io = session.io_stats.snapshot();
    let get = |k: &str| io.iter().find(|(n, _)| *n == k).map(|(_, v)| *v).unwrap();
    assert_eq!((get("writes"), get("reads")), (1, 1));
    // Completed requests are no longer marked.
    let mut flag = [9u8];
    f.read_exact_at(&mut flag, off + 16).unwrap();
    assert_eq!(flag[0], 0);
    assert_eq!(session.stats.get(Malformed::Message), 1);
    session.end();
}

/// An agent that goes silent (a crashed host, a half-open connection) loses its session: the
/// SoC stops waiting for it and is free for the next agent.
#[test]
fn a_silent_agent_loses_its_session() {
    let ram = memfd(RAM);
    let (w, f) = ram_window(&ram);
    let mut dev = SocDevice::new(ram_disk_context(), vec![w], vec![f]).unwrap();
    let (_agent, mut theirs) = UnixStream::pair().unwrap();
    let t = Instant::now();
    let r = leap_vhost::soc::serve_within(
        &mut theirs,
        &mut dev,
        &AtomicBool::new(false),
        Duration::from_millis(300),
    );
    let e = r.unwrap_err();
    assert!(e.contains("silent"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}
