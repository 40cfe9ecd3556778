//! Shared helpers for Leap's end-to-end tests: start a leapd vhost-user-blk server in-process on a
//! real unix socket, over a real back end, so tests drive it through the vhost-user protocol with
//! the in-process driver.

use leap_runtime::backend::Backend;
use leap_runtime::{DeviceIoStats, Namespace, Poller, PollerConfig};
use leap_vhost::{DeviceConfig, DeviceContext, Server, StopHandle, VhostStats};
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

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
