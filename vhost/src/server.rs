//! The listening side: a unix socket that serves one vhost-user connection at a time, with a new
//! device per connection so the same socket serves QEMU again after the guest, QEMU or leapd
//! restarts. The connection's requests are handled on the thread that calls [`Server::run`]; the
//! data path runs on the pollers. The same loop serves the host agent's relayed device
//! ([`Server::run_with`] with any [`Session`]).

use crate::device::{BlkDevice, DeviceContext};
use crate::stats::VhostStats;
use leap_runtime::{log_limited, log_limited_by};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::{
    BackendReqHandler, Error as VuError, Listener, VhostUserBackendReqHandlerMut,
};

/// The device of one vhost-user connection.
pub trait Session: VhostUserBackendReqHandlerMut + Send {
    /// Whether the last refusal left the front end waiting for a reply that will not come (a
    /// refused getter): the connection must end. Clears the flag.
    fn take_hangup(&mut self) -> bool;
    /// Stops every ring; in-flight requests complete first, for at most `timeout` each.
    fn shutdown(&mut self, timeout: Option<std::time::Duration>);
}

impl Session for BlkDevice {
    fn take_hangup(&mut self) -> bool {
        BlkDevice::take_hangup(self)
    }
    fn shutdown(&mut self, timeout: Option<std::time::Duration>) {
        BlkDevice::shutdown(self, timeout)
    }
}

/// How long a connection's end waits for its in-flight requests.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
}

/// A device's counters as `name=value` pairs: NVMe commands by kind, bytes, refused commands,
/// back-end errors (when served here), and malformed requests by reason (only the non-zero ones).
pub fn counters(io: Option<&leap_runtime::DeviceIoStats>, stats: &VhostStats) -> String {
    let mut out: Vec<String> = io
        .map(|io| io.snapshot())
        .unwrap_or_default()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    out.extend(
        stats
            .snapshot()
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("malformed_{k}={v}")),
    );
    out.join(" ")
}

/// Lets another thread (a signal handler thread) stop a [`Server`].
#[derive(Clone, Default)]
pub struct StopHandle {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Option<UnixStream>>>,
}

impl StopHandle {
    /// Stops accepting, and ends the current connection (in-flight requests complete first).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Ok(c) = self.current.lock() {
            if let Some(s) = c.as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
    /// Ends the current connection, if any, and goes on serving (the front end may reconnect).
    pub fn end_connection(&self) {
        if let Ok(c) = self.current.lock() {
            if let Some(s) = c.as_ref() {
                let _ = s.shutdown(std::net::Shutdown::Both);
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
    /// The local device's context (None for a relayed device).
    ctx: Option<DeviceContext>,
    stats: Arc<VhostStats>,
    stop: StopHandle,
}

impl Server {
    /// Binds `path` with permissions `mode`. A stale socket (nobody answering) is replaced; a live
    /// one is an error.
    pub fn bind(path: &Path, mode: u32, ctx: DeviceContext) -> Result<Server, ServeError> {
        let stats = ctx.stats.clone();
        let mut s = Self::listen(path, mode, stats)?;
        s.ctx = Some(ctx);
        Ok(s)
    }

    /// Binds `path` for a device that is not served here ([`Server::run_with`]); refusals are
    /// counted in `stats`.
    pub fn listen(path: &Path, mode: u32, stats: Arc<VhostStats>) -> Result<Server, ServeError> {
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
            ctx: None,
            stats,
            stop: StopHandle::default(),
        })
    }

    /// `disk=NAME socket=PATH` (no disk for a relayed device), for event lines.
    fn who(&self) -> String {
        match &self.ctx {
            Some(c) => format!("disk={} socket={}", c.config.name, self.path.display()),
            None => format!("socket={}", self.path.display()),
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's counters since the server started, as `name=value` pairs: NVMe commands by
    /// kind, bytes, refused commands, back-end errors, and malformed virtio requests by reason
    /// (only the non-zero ones).
    pub fn counters(&self) -> String {
        counters(self.ctx.as_ref().map(|c| &*c.io_stats), &self.stats)
    }

    /// A handle to stop [`Server::run`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Serves connections one after another until stopped, a new device for each.
    pub fn run(&mut self) -> Result<(), ServeError> {
        let ctx = self.ctx.clone().ok_or_else(|| ServeError::Listen {
            path: self.path.clone(),
            source: std::io::Error::other("no local device to serve"),
        })?;
        self.run_with(|| Some(BlkDevice::new(ctx.clone())))
    }

    /// Serves connections one after another until stopped, each with the device `make` returns
    /// when one is waiting. While `make` returns None (what the device needs is not there yet)
    /// the connection waits in the socket's backlog and `make` is asked again.
    pub fn run_with<D: Session>(
        &mut self,
        mut make: impl FnMut() -> Option<D>,
    ) -> Result<(), ServeError> {
        while !self.stop.stopped() {
            if !self.wait_for_connection()? {
                continue;
            }
            match make() {
                Some(dev) => self.serve_one(dev)?,
                None => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
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
    fn serve_one<D: Session>(&mut self, dev: D) -> Result<(), ServeError> {
        let stream = match self.listener.accept() {
            Ok(Some(s)) => s,
            Ok(None) => return Ok(()),
            Err(e) => {
                log::warn!("{}: accept: {e}", self.path.display());
                return Ok(());
            }
        };
        let dev = Arc::new(Mutex::new(dev));
        let mut handler = BackendReqHandler::from_stream(stream, dev.clone());
        if let Ok(mut c) = self.stop.current.lock() {
            *c = handler.try_clone_connection().ok();
        }
        if self.stop.stopped() {
            self.stop.stop();
        }
        let who = self.who();
        log_limited_by!(
            &self.stats.events,
            log::Level::Info,
            "event=frontend_connected {who}"
        );
        let end = loop {
            match handler.handle_request() {
                Ok(()) => {}
                // The device refused the request and, where the front end asked for one, sent
                // a failure reply: the connection goes on, unless the front end now waits for
                // a reply that will never come.
                Err(VuError::ReqHandlerError(e)) => {
                    let hangup = dev.lock().map(|mut d| d.take_hangup()).unwrap_or(true);
                    if hangup {
                        break Err(format!(
                            "{e}; the front end waits for a reply, disconnecting"
                        ));
                    }
                }
                // A front end that goes away (guest shutdown, QEMU exit) ends the connection
                // this way; so does StopHandle::stop.
                Err(VuError::Disconnected | VuError::PartialMessage) => break Ok(()),
                // A message the protocol layer could not parse or that is not allowed now:
                // nothing was answered, so the connection cannot go on.
                Err(e) => {
                    self.stats.count(crate::stats::Malformed::Message);
                    log_limited!(log::Level::Warn, "{}: vhost-user: {e}", self.path.display());
                    break Err(e.to_string());
                }
            }
        };
        if let Ok(mut c) = self.stop.current.lock() {
            *c = None;
        }
        // Complete in-flight I/O before the guest memory goes away, for a bounded time: a back
        // end that never answers must not keep the socket from serving the next connection, or
        // leapd from stopping. What is still in flight then finishes on its poller, with the
        // memory it uses kept mapped until it has.
        match dev.lock() {
            Ok(mut d) => d.shutdown(Some(DRAIN_TIMEOUT)),
            Err(p) => p.into_inner().shutdown(Some(DRAIN_TIMEOUT)),
        }
        match end {
            Ok(()) => log_limited_by!(
                &self.stats.events,
                log::Level::Info,
                "event=frontend_disconnected {who}"
            ),
            Err(e) => log_limited_by!(
                &self.stats.events,
                log::Level::Warn,
                "event=frontend_disconnected {who} error=\"{}\"",
                e.replace('"', "'")
            ),
        }
        log_limited_by!(
            &self.stats.events,
            log::Level::Info,
            "event=frontend_totals {who} {}",
            self.counters()
        );
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
