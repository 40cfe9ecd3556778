//! `leapd serve --config docs/leapd.example.toml`, run as it is from an empty directory: it
//! creates ./leapd-data/ with the file disk, the three sockets and the control socket, and serves
//! a file, a `ram` and a `null` disk on one set of pollers. The in-process driver does verified
//! I/O on all three at once; `leapctl disk remove` takes the ram disk away while I/O runs on it
//! (what completed is right, the others keep serving), `leapctl disk add` brings it back, and
//! SIGTERM stops leapd cleanly.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn leapctl(dir: &Path, args: &[&str]) -> String {
    let out = leap_tests::program(env!("CARGO_BIN_EXE_leapctl"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "leapctl {args:?}: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_example_config_serves_three_disks_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/leapd.example.toml");
    let log = std::fs::File::create(dir.path().join("leapd.log")).unwrap();
    let mut child = leap_tests::program(env!("CARGO_BIN_EXE_leapd"))
        .arg("serve")
        .arg("--config")
        .arg(&example)
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn leapd serve --config");
    let data = dir.path().join("leapd-data");
    let socks = ["file0", "ram0", "null0"].map(|n| data.join(format!("{n}.sock")));
    let t = Instant::now();
    while !socks.iter().all(|s| s.exists()) {
        if t.elapsed() > Duration::from_secs(20) || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "leapd did not create its sockets:\n{}",
                std::fs::read_to_string(dir.path().join("leapd.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(data.join("file0.img").exists(), "the file disk was created");
    let ctl = dir.path();
    assert!(leapctl(ctl, &["version"]).starts_with("leapd "));
    let list = leapctl(ctl, &["disk", "list"]);
    for n in ["file0", "ram0", "null0"] {
        assert!(list.contains(n), "{list}");
    }
    // file0 and null0 run a fixed workload; ram0 runs until it is removed under it.
    let fixed: Vec<_> = [(0usize, 3u8, true, 512u64), (2, 7, false, 4096)]
        .into_iter()
        .map(|(i, seed, keeps, block)| {
            let s = socks[i].clone();
            std::thread::spawn(move || {
                leap_tests::verified_io(&s, seed, keeps, block, 48, Duration::from_secs(20))
            })
        })
        .collect();
    let ram = {
        let s = socks[1].clone();
        std::thread::spawn(move || {
            leap_tests::verified_io(&s, 5, true, 512, u64::MAX, Duration::from_secs(3))
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(leapctl(ctl, &["disk", "remove", "ram0"]).contains("removed"));
    assert!(!socks[1].exists(), "the removed disk's socket is gone");
    let mut failed = Vec::new();
    match ram.join() {
        Ok(Err((rounds, e))) => assert!(rounds > 0, "no I/O before the removal: {e}"),
        Ok(Ok(_)) => failed.push("ram0 kept serving after its removal".to_string()),
        Err(e) => failed.push(format!("ram0: {e:?}")),
    }
    for r in fixed {
        match r.join() {
            Ok(Ok(48)) => {}
            other => failed.push(format!("a disk that was not removed: {other:?}")),
        }
    }
    // Back again, from the control API, on the same socket.
    leapctl(
        ctl,
        &[
            "disk",
            "add",
            "ram0",
            "--socket",
            "leapd-data/ram0.sock",
            "--disk",
            "ram,size=64M",
        ],
    );
    if let Err(e) = leap_tests::verified_io(&socks[1], 9, true, 512, 8, Duration::from_secs(20)) {
        failed.push(format!("ram0 after it was added back: {e:?}"));
    }
    // Rate limits change live and are written back with the configuration.
    leapctl(
        ctl,
        &[
            "disk", "limits", "null0", "--iops", "20000", "--bps-wr", "100M",
        ],
    );
    let cfg = leapctl(ctl, &["--json", "config", "get"]);
    assert!(
        cfg.contains("null,size=1G,iops=20000,bps-wr=104857600"),
        "{cfg}"
    );
    if let Err(e) = leap_tests::verified_io(&socks[2], 7, false, 4096, 4, Duration::from_secs(20)) {
        failed.push(format!("null0 with limits: {e:?}"));
    }
    leapctl(ctl, &["disk", "limits", "null0"]);
    let cfg = leapctl(ctl, &["--json", "config", "get"]);
    assert!(cfg.contains("\"null,size=1G\""), "{cfg}");
    let stats = leapctl(ctl, &["disk", "stats", "ram0"]);
    assert!(
        stats.lines().nth(1).is_some_and(|l| l.starts_with("ram0")),
        "{stats}"
    );
    let json = leapctl(ctl, &["--json", "disk", "stats"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ram0"]["writes"], 8, "{json}");
    assert_eq!(v["file0"]["writes"], 48, "{json}");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.path().join("leapd.log")).unwrap_or_default();
    assert!(
        failed.is_empty(),
        "I/O failed: {failed:?}\nleapd log:\n{log}"
    );
    assert!(status.success(), "leapd exit {status}\n{log}");
    for n in ["file0", "ram0", "null0"] {
        assert!(
            log.contains(&format!("event=disk_added disk={n} ")),
            "{log}"
        );
    }
    assert!(!socks.iter().any(|s| s.exists()), "sockets removed at exit");
}

/// The example's NVMe/TCP target, served by `leapd serve --config` next to its disks: Leap's
/// initiator does verified I/O on NSID 1 throughout while `leapctl` attaches a RAM namespace
/// (a second host reaches it with verified I/O), detaches it (that host's commands then fail
/// with Invalid Namespace), and starts and stops a second target; the configuration written
/// back holds what is running.
#[test]
fn targets_and_namespaces_change_while_hosts_do_io() {
    use leap_runtime::backend::Backend;
    use leap_tests::nvmf::{connect, initiator, Driver, Op};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/leapd.example.toml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("127.0.0.1:4421", &format!("127.0.0.1:{port}"));
    let cfg = dir.path().join("leapd.toml");
    std::fs::write(&cfg, text).unwrap();
    let log = std::fs::File::create(dir.path().join("leapd.log")).unwrap();
    let mut child = leap_tests::program(env!("CARGO_BIN_EXE_leapd"))
        .args(["serve", "--config", "leapd.toml"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn leapd");
    let ctl = dir.path();
    let t = Instant::now();
    while !dir.path().join("leapd-data/leapd.rpc").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20) && child.try_wait().unwrap().is_none(),
            "leapd did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let nqn = "nqn.2026-12.io.leap:tgt0";
    let list = leapctl(ctl, &["target", "list"]);
    assert!(
        list.contains("tgt0") && list.contains("1: file 256M"),
        "{list}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let steady = std::thread::spawn(move || {
        let b = connect(initiator(addr, nqn, 2, 32));
        let mut d = Driver::new(&b, 32);
        let mut rounds = 0u32;
        while !s2.load(Ordering::Relaxed) {
            d.write_verify(rounds as u64 * 64 % 8192, 64, 8, rounds as u8, 16);
            rounds += 1;
        }
        rounds
    });

    let added = leapctl(ctl, &["target", "ns-add", "tgt0", "--disk", "ram,size=64M"]);
    assert!(added.contains("namespace 2 added"), "{added}");
    let mut c2 = initiator(addr, nqn, 1, 16);
    c2.nsid = 2;
    let b2 = connect(c2);
    assert_eq!(b2.info().size, 64 << 20);
    let mut d2 = Driver::new(&b2, 16);
    d2.write_verify(0, 128, 8, 42, 8);
    let json = leapctl(ctl, &["--json", "config", "get"]);
    assert!(json.contains("\"ram,size=64M\""), "{json}");
    leapctl(ctl, &["target", "ns-remove", "tgt0", "2"]);
    let st = d2.run(
        &[Op {
            write: false,
            slba: 0,
            nlb: 8,
        }],
        &mut [0u8; 4096],
        4096,
        1,
    );
    assert_eq!(
        st[0],
        leap_queues::Status::INVALID_NAMESPACE,
        "a detached namespace answers Invalid Namespace: {}",
        st[0]
    );

    leapctl(
        ctl,
        &[
            "target",
            "add",
            "t2",
            "--listen",
            "127.0.0.1:0",
            "--disk",
            "null,size=1G",
        ],
    );
    let list = leapctl(ctl, &["--json", "target", "list"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2, "{list}");
    leapctl(ctl, &["target", "remove", "t2"]);
    leapctl(ctl, &["config", "save"]);
    let saved = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        saved.contains("[[target]]") && saved.contains("tgt0-ns1.img") && !saved.contains("t2"),
        "{saved}"
    );

    stop.store(true, Ordering::Relaxed);
    let rounds = steady.join();
    let status = leap_tests::terminate(child);
    let log = std::fs::read_to_string(dir.path().join("leapd.log")).unwrap_or_default();
    let rounds = rounds.unwrap_or_else(|_| panic!("I/O on NSID 1 failed\nleapd log:\n{log}"));
    assert!(rounds > 0);
    assert!(status.success(), "leapd exit {status}\n{log}");
    for e in [
        "event=target_added target=tgt0",
        "event=namespace_added target=tgt0 nsid=2",
        "event=namespace_removed target=tgt0 nsid=2 drained=true",
        "event=target_removed target=t2 drained=true",
    ] {
        assert!(log.contains(e), "no `{e}` in\n{log}");
    }
    // What was written back reads back.
    let out = leap_tests::program(env!("CARGO_BIN_EXE_leapd"))
        .args(["check-config", "leapd.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
