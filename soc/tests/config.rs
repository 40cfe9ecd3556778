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
