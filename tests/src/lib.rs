//! Shared helpers for Leap's end-to-end tests: start a leapd vhost-user-blk server in-process on a
//! real unix socket, over a real back end, so tests drive it through the vhost-user protocol with
//! the in-process driver.

use leap_runtime::backend::Backend;
use leap_runtime::{DeviceIoStats, Namespace, Poller, PollerConfig};
use leap_vhost::driver::{blk_request, Desc, Driver, DriverOptions};
use leap_vhost::driver::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use leap_vhost::{DeviceConfig, DeviceContext, Server, StopHandle, VhostStats};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// A command that runs the program at `path` (a binary cargo built for the tests). When the tests
/// run under an emulator (`scripts/build-aarch64.sh --test` sets `LEAP_TEST_RUNNER` to
/// qemu-aarch64-static), the program runs under it too: test binaries get cargo's runner, but the
/// programs they start do not.
pub fn program(path: &str) -> std::process::Command {
    match std::env::var_os("LEAP_TEST_RUNNER").filter(|r| !r.is_empty()) {
        Some(runner) => {
            let mut c = std::process::Command::new(runner);
            c.arg(path);
            c
        }
        None => std::process::Command::new(path),
    }
}

/// A running server.
pub struct TestServer {
    /// The socket.
    pub socket: PathBuf,
    /// Malformed-request counters.
    pub stats: Arc<VhostStats>,
    /// NVMe counters.
    pub io_stats: Arc<DeviceIoStats>,
    /// The pollers (for their CPU time).
    pub pollers: Arc<Vec<Poller>>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

/// `n` pollers named `name0`, `name1`, ... with a short idle spin (tests share two cores).
pub fn spawn_pollers(n: usize, name: &str) -> Vec<Poller> {
    (0..n)
        .map(|i| {
            Poller::spawn(PollerConfig {
                name: format!("{name}{i}"),
                idle_spin: Duration::from_micros(20),
                cpu: None,
                ..Default::default()
            })
            .expect("poller")
        })
        .collect()
}

impl TestServer {
    /// Serves `backend` with `queues` queues and `pollers` pollers.
    pub fn start(backend: Arc<dyn Backend>, queues: u16, pollers: usize) -> TestServer {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("leap.sock");
        let pollers = spawn_pollers(pollers, "test-poller");
        let stats = Arc::new(VhostStats::default());
        let io_stats = Arc::new(DeviceIoStats::new(queues as usize));
        let pollers = Arc::new(pollers);
        let ctx = DeviceContext {
            ns: Namespace::new(backend),
            pollers: pollers.clone(),
            config: DeviceConfig {
                num_queues: queues,
                ..DeviceConfig::default()
            },
            stats: stats.clone(),
            io_stats: io_stats.clone(),
            writeback: true,
        };
        let mut server = Server::bind(&socket, 0o600, ctx).expect("bind");
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.run().expect("server run"));
        TestServer {
            socket,
            stats,
            io_stats,
            pollers,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub mod nvmf;

/// Writes `rounds` × 64 KiB of a pattern particular to `seed` and reads each back; on the null
/// disk (which keeps nothing) the reads must return zeroes. Returns the rounds done, or the
/// driver's error (the disk went away) with the rounds done before it; wrong data panics.
pub fn verified_io(
    sock: &Path,
    seed: u8,
    keeps_data: bool,
    block: u64,
    rounds: u64,
    timeout: Duration,
) -> Result<u64, (u64, String)> {
    let mut d = Driver::connect(
        sock,
        DriverOptions {
            queue_size: 64,
            mem_size: 4 << 20,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    let buf = d.alloc(128 << 10, 4096).unwrap();
    let mut q = d.take_queues().remove(0);
    let t = timeout;
    for round in 0..rounds {
        let data: Vec<u8> = (0..65536u64)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(round as u8))
            .collect();
        d.memory().write_slice(&data, GuestAddress(buf)).unwrap();
        let sector = (round % 64) * 128 * 512 / block * (block / 512);
        let gone = |e: leap_vhost::driver::DriverError| (round, e.to_string());
        let (st, _) = blk_request(
            &mut q,
            VIRTIO_BLK_T_OUT,
            sector,
            &[Desc::readable(buf, 65536)],
            t,
        )
        .map_err(gone)?;
        assert_eq!(st, VIRTIO_BLK_S_OK as u8, "{}: write", sock.display());
        let (st, _) = blk_request(
            &mut q,
            VIRTIO_BLK_T_IN,
            sector,
            &[Desc::writable(buf + 65536, 65536)],
            t,
        )
        .map_err(gone)?;
        assert_eq!(st, VIRTIO_BLK_S_OK as u8, "{}: read", sock.display());
        let mut back = vec![0u8; 65536];
        d.memory()
            .read_slice(&mut back, GuestAddress(buf + 65536))
            .unwrap();
        if keeps_data {
            assert!(
                back == data,
                "{}: round {round} read back wrong data",
                sock.display()
            );
        } else {
            assert!(back.iter().all(|&b| b == 0), "null disk returned data");
        }
    }
    drop(q);
    d.disconnect();
    Ok(rounds)
}

/// Reads `child`'s stderr until a line contains `needle` and returns that line; the rest of
/// its stderr is drained in the background.
pub fn log_until(child: &mut Child, needle: &str) -> String {
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains(needle) {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "leapd exited before logging {needle:?}"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    line
}

/// Sends SIGTERM to `child` and waits (at most 10 s) for it to exit.
pub fn terminate(mut child: Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on the PID of a child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "leapd did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
