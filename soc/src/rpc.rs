//! The control API: JSON-RPC 2.0 on a unix socket, in the style of SPDK's `rpc.py`. One request
//! per line, one response per line (docs/control-api.md). `leapctl` is its command-line client.
//!
//! Methods: `leapd_version`, `disk_list`, `disk_add` (params: a `[[disk]]` table as JSON),
//! `disk_remove` ({"name"}), `disk_set_limits` ({"name", "iops", ...}), `disk_stats` ({"name"}
//! optional), `target_list`, `target_add` (a `[[target]]` table as JSON), `target_remove`
//! ({"name"}), `target_ns_add` ({"target", "disk", "nsid" optional}), `target_ns_remove`
//! ({"target", "nsid"}), `config_get`, `config_save` ({"path"} optional: default the `--config`
//! file).

use crate::config::{ConfigOut, DiskConfig, Pollers, TargetConfig};
use crate::daemon::Daemon;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// JSON-RPC error codes.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
/// A request leapd could not carry out (the message says why).
const FAILED: i64 = -32000;
/// Longest request line.
const MAX_LINE: usize = 64 << 10;

/// What the handlers need.
pub struct Control {
    /// The disks.
    pub daemon: Arc<Daemon>,
    /// The `--config` file, where `config_save` writes by default.
    pub config_file: Option<PathBuf>,
    /// The pollers section, for `config_get` and `config_save`.
    pub pollers: Pollers,
}

type RpcResult = Result<Value, (i64, String)>;

impl Control {
    fn config(&self) -> ConfigOut {
        ConfigOut {
            pollers: self.pollers.clone(),
            disk: self.daemon.configs(),
            target: self.daemon.target_configs(),
        }
    }

    fn call(&self, method: &str, params: Value) -> RpcResult {
        let bad = |e: String| (INVALID_PARAMS, e);
        let failed = |e: String| (FAILED, e);
        match method {
            "leapd_version" => Ok(json!({ "version": env!("CARGO_PKG_VERSION") })),
            "disk_list" => {
                serde_json::to_value(self.daemon.list()).map_err(|e| failed(e.to_string()))
            }
            "disk_add" => {
                let cfg: DiskConfig =
                    serde_json::from_value(params).map_err(|e| bad(format!("disk_add: {e}")))?;
                self.daemon.add(&cfg).map_err(failed)?;
                Ok(Value::Bool(true))
            }
            "disk_remove" => {
                let name = name_param(&params, true).map_err(bad)?.unwrap_or_default();
                self.daemon.remove(&name).map_err(failed)?;
                Ok(Value::Bool(true))
            }
            "disk_set_limits" => {
                let name = name_param(&params, true).map_err(bad)?.unwrap_or_default();
                let limits = limits_param(&params).map_err(bad)?;
                self.daemon.set_limits(&name, &limits).map_err(failed)?;
                Ok(Value::Bool(true))
            }
            "disk_stats" => {
                let name = name_param(&params, false).map_err(bad)?;
                let s = self.daemon.stats(name.as_deref()).map_err(failed)?;
                serde_json::to_value(s).map_err(|e| failed(e.to_string()))
            }
            "target_list" => {
                serde_json::to_value(self.daemon.target_list()).map_err(|e| failed(e.to_string()))
            }
            "target_add" => {
                let cfg: TargetConfig =
                    serde_json::from_value(params).map_err(|e| bad(format!("target_add: {e}")))?;
                self.daemon.target_add(&cfg).map_err(failed)?;
                Ok(Value::Bool(true))
            }
            "target_remove" => {
                let name = name_param(&params, true).map_err(bad)?.unwrap_or_default();
                self.daemon.target_remove(&name).map_err(failed)?;
                Ok(Value::Bool(true))
            }
            "target_ns_add" => {
                let p: NsAdd = serde_json::from_value(params)
                    .map_err(|e| bad(format!("target_ns_add: {e}")))?;
                let nsid = self
                    .daemon
                    .namespace_add(&p.target, p.nsid, &p.disk)
                    .map_err(failed)?;
                Ok(json!({ "nsid": nsid }))
            }
            "target_ns_remove" => {
                let p: NsRemove = serde_json::from_value(params)
                    .map_err(|e| bad(format!("target_ns_remove: {e}")))?;
                self.daemon
                    .namespace_remove(&p.target, p.nsid)
                    .map_err(failed)?;
                Ok(Value::Bool(true))
            }
            "config_get" => serde_json::to_value(self.config()).map_err(|e| failed(e.to_string())),
            "config_save" => {
                let path = match params.get("path") {
                    Some(Value::String(p)) => PathBuf::from(p),
                    Some(_) => return Err(bad("config_save: path must be a string".into())),
                    None => self.config_file.clone().ok_or_else(|| {
                        bad("config_save: leapd runs without --config: give a path".into())
                    })?,
                };
                let text = self.config().to_toml().map_err(failed)?;
                // Written whole, then renamed: a reader never sees half a file.
                let tmp = path.with_extension("toml.tmp");
                std::fs::write(&tmp, text)
                    .and_then(|()| std::fs::rename(&tmp, &path))
                    .map_err(|e| failed(format!("{}: {e}", path.display())))?;
                log::info!("event=config_saved path={}", path.display());
                Ok(json!({ "path": path }))
            }
            _ => Err((METHOD_NOT_FOUND, format!("no method `{method}`"))),
        }
    }

    /// Answers one request line.
    pub fn handle_line(&self, line: &str) -> Value {
        let req: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => return error(Value::Null, PARSE_ERROR, format!("not JSON: {e}")),
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        if req.get("jsonrpc") != Some(&Value::String("2.0".into())) {
            return error(
                id,
                INVALID_REQUEST,
                "\"jsonrpc\": \"2.0\" is required".into(),
            );
        }
        let Some(method) = req.get("method").and_then(Value::as_str) else {
            return error(id, INVALID_REQUEST, "no method".into());
        };
        let params = req.get("params").cloned().unwrap_or(json!({}));
        if !params.is_object() {
            return error(id, INVALID_PARAMS, "params must be an object".into());
        }
        match self.call(method, params) {
            Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
            Err((code, msg)) => {
                log::warn!("event=rpc_refused method={method} reason={msg:?}");
                error(id, code, msg)
            }
        }
    }
}

/// `target_ns_add` params.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NsAdd {
    target: String,
    disk: String,
    #[serde(default)]
    nsid: Option<u32>,
}

/// `target_ns_remove` params.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NsRemove {
    target: String,
    nsid: u32,
}

fn name_param(params: &Value, required: bool) -> Result<Option<String>, String> {
    match params.get("name") {
        Some(Value::String(n)) => Ok(Some(n.clone())),
        Some(_) => Err("name must be a string".into()),
        None if required => Err("missing param `name`".into()),
        None => Ok(None),
    }
}

/// `iops`, `iops_rd`, `iops_wr` (numbers) and `bps`, `bps_rd`, `bps_wr` (numbers or sizes such
/// as "100M"); absent: unlimited. Nothing else besides `name`.
fn limits_param(params: &Value) -> Result<leap_runtime::throttle::Limits, String> {
    let mut l = leap_runtime::throttle::Limits::default();
    for (k, v) in params.as_object().into_iter().flatten() {
        if k == "name" {
            continue;
        }
        // The disk spec's options, with `_` for `-`; numbers, or sizes for the byte rates.
        let text = match v {
            Value::Number(n) => n
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n.to_string())
                .ok_or_else(|| format!("{k}: a positive whole number"))?,
            Value::String(s) if k.starts_with("bps") => s.clone(),
            _ => return Err(format!("{k}: a positive whole number")),
        };
        if k.contains('-') || !crate::diskspec::limit(&mut l, &k.replace('_', "-"), &text)? {
            return Err(format!("unknown param `{k}`"));
        }
    }
    Ok(l)
}

fn error(id: Value, code: i64, message: String) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

/// Serves one client connection until it closes.
fn serve_client(ctl: &Control, stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE as u64 + 1).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > MAX_LINE {
            error(
                Value::Null,
                INVALID_REQUEST,
                format!("request longer than {MAX_LINE} bytes"),
            )
        } else if line.trim().is_empty() {
            continue;
        } else {
            ctl.handle_line(line.trim())
        };
        let mut text = reply.to_string();
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() || line.len() > MAX_LINE {
            return;
        }
    }
}

/// The listening control socket; removed when dropped.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RpcServer {
    /// Binds `path` (mode `mode`; a stale socket is replaced, a live one is an error) and
    /// serves `ctl` on it, each client on its own thread.
    pub fn start(path: &Path, mode: u32, ctl: Arc<Control>) -> Result<RpcServer, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{} is in use by a live leapd (give --rpc-socket)",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("control socket {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("leap-rpc".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let ctl = ctl.clone();
                            let _ = std::thread::Builder::new()
                                .name("leap-rpc-client".into())
                                .spawn(move || serve_client(&ctl, c));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        log::info!("event=rpc_listening socket={}", path.display());
        Ok(RpcServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
