//! The listening side: a unix socket that serves one vhost-user connection at a time, with a new
//! device (and daemon) per connection so the same socket serves QEMU again after the guest or
//! QEMU restarts.

use crate::device::{BlkDevice, DeviceContext};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another live process answers on the socket.
    #[error("{0} is already served by a live process (is another leapd running?)")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The daemon failed to start on a connection.
    #[error("vhost-user: {0}")]
    Daemon(String),
}

/// Lets another thread (a signal handler thread) stop a [`Server`].
#[derive(Clone, Default)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<vhost_user_backend::ShutdownHandle>>>,
}

impl StopHandle {
    /// Stops accepting, and ends the current connection (in-flight requests complete first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(c) = self.current.lock() {
            if let Some(h) = c.as_ref() {
                h.shutdown();
            }
        }
    }
    /// Whether `stop` was called.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

/// A vhost-user-blk socket.
pub struct Server {
    path: PathBuf,
    listener: Listener,
    ctx: DeviceContext,
    stop: StopHandle,
}

impl Server {
    /// Binds `path` with permissions `mode`. A stale socket (nobody answering) is replaced; a live
    /// one is an error.
    pub fn bind(path: &Path, mode: u32, ctx: DeviceContext) -> Result<Server, ServeError> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServeError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listen_err = |source| ServeError::Listen {
            path: path.to_path_buf(),
            source,
        };
        let listener = Listener::new(path, true)
            .map_err(|e| listen_err(std::io::Error::other(e.to_string())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(listen_err)?;
        Ok(Server {
            path: path.to_path_buf(),
            listener,
            ctx,
            stop: StopHandle::default(),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's counters since the server started, as `name=value` pairs: NVMe commands by
    /// kind, bytes, refused commands, back-end errors, and malformed virtio requests by reason
    /// (only the non-zero ones).
    pub fn counters(&self) -> String {
        let io = self.ctx.io_stats.snapshot();
        let bad = self.ctx.stats.snapshot();
        let mut out: Vec<String> = io.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.extend(
            bad.iter()
                .filter(|(_, v)| *v > 0)
                .map(|(k, v)| format!("malformed_{k}={v}")),
        );
        out.join(" ")
    }

    /// A handle to stop [`Server::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Serves connections one after another until stopped.
    pub fn run(&mut self) -> Result<(), ServeError> {
        while !self.stop.stopped() {
            if !self.wait_for_connection()? {
                continue;
            }
            self.serve_one()?;
        }
        Ok(())
    }

    /// Waits up to 200 ms for a connection; true if one is ready to accept.
    fn wait_for_connection(&self) -> Result<bool, ServeError> {
        let mut pfd = libc::pollfd {
            fd: self.listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 200) };
        Ok(r > 0 && pfd.revents & libc::POLLIN != 0)
    }

    /// Serves one connection to its end.
    fn serve_one(&mut self) -> Result<(), ServeError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let dev =
            BlkDevice::new(self.ctx.clone()).map_err(|e| ServeError::Daemon(e.to_string()))?;
        let mut daemon = VhostUserDaemon::new("leap-vhost".into(), dev.clone(), mem)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        if let Err(e) = daemon.start(&mut self.listener) {
            log::warn!("{}: connection failed to start: {e}", self.path.display());
            dev.send_exit_events();
            return Ok(());
        }
        log::info!("{}: front end connected", self.path.display());
        if let Ok(mut c) = self.stop.current.lock() {
            *c = daemon.shutdown_handle();
        }
        if self.stop.stopped() {
            daemon.request_shutdown();
        }
        let r = daemon.wait();
        if let Ok(mut c) = self.stop.current.lock() {
            *c = None;
        }
        // Complete in-flight I/O before the guest memory goes away, then let workers exit.
        dev.shutdown();
        dev.send_exit_events();
        use vhost::vhost_user::Error as VuError;
        use vhost_user_backend::Error as DaemonError;
        match r {
            // A front end that goes away (guest shutdown, QEMU exit) ends the connection this way.
            Ok(())
            | Err(DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage)) => {
                log::info!("{}: front end disconnected", self.path.display())
            }
            Err(e) => log::warn!("{}: connection ended: {e}", self.path.display()),
        }
        log::info!("{}: totals: {}", self.path.display(), self.counters());
        // Give the worker threads a moment to leave before the next connection.
        std::thread::sleep(Duration::from_millis(1));
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
