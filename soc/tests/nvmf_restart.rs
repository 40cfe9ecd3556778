//! A `leapd target` process killed (SIGKILL) and restarted in the middle of a workload: the
//! initiator reconnects, sends again what had not completed, and its user sees neither an error
//! nor a lost acknowledged write.

use leap_runtime::backend::Backend;
use leap_tests::nvmf::{connect, initiator, pattern, Driver, Op};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-12.io.leap:restart";

fn start(port: u16, img: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = leap_tests::program(env!("CARGO_BIN_EXE_leapd"))
        .args(["target", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--discovery-port",
            "0",
            "--nqn",
            NQN,
            "--pollers",
            "1",
            "--disk",
        ])
        .arg(format!("{},size=64M", img.display()))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn leapd target");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "target did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn target_killed_and_restarted_mid_workload_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ns.img");
    let log = dir.path().join("target.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Arc::new(Mutex::new(start(port, &img, &log)));
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let backend = connect(initiator(addr, NQN, 1, 32));
    let mut d = Driver::new(&backend, 32);
    let block = backend.info().block_size as usize;
    let batches = 40usize;
    let per = 64u64;
    let done = Arc::new(AtomicUsize::new(0));
    // Kill the target after a quarter of the batches, restart it 700 ms later.
    let killer = {
        let (child, done, img, log) = (child.clone(), done.clone(), img.clone(), log.clone());
        std::thread::spawn(move || {
            while done.load(Ordering::Acquire) < batches / 4 {
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut c = child.lock().unwrap();
            c.kill().unwrap();
            c.wait().unwrap();
            std::thread::sleep(Duration::from_millis(700));
            *c = start(port, &img, &log);
        })
    };
    for b in 0..batches {
        // Each batch writes and reads back its own blocks; every command must succeed.
        d.write_verify(b as u64 * per, per, 1, 7, 16);
        done.store(b + 1, Ordering::Release);
    }
    killer.join().unwrap();
    // Every acknowledged write is still there, read through the restarted target.
    let n = batches * per as usize;
    let mut buf = vec![0u8; n * block];
    let ops: Vec<Op> = (0..n as u64)
        .map(|lba| Op {
            write: false,
            slba: lba,
            nlb: 1,
        })
        .collect();
    for (k, s) in d.run(&ops, &mut buf, block, 16).iter().enumerate() {
        assert!(s.is_success(), "final read {k}: {s}");
    }
    let mut want = vec![0u8; block];
    for lba in 0..n {
        pattern(lba as u64, 7, &mut want);
        assert!(
            buf[lba * block..(lba + 1) * block] == want[..],
            "block {lba} lost or corrupted across the restart"
        );
    }
    let st = backend.stats();
    eprintln!(
        "restart: reconnects={} resent={} retries={} timeouts={}",
        st.reconnects.load(Ordering::Relaxed),
        st.resent.load(Ordering::Relaxed),
        st.retries.load(Ordering::Relaxed),
        st.timeouts.load(Ordering::Relaxed)
    );
    assert!(
        st.reconnects.load(Ordering::Relaxed) > 0,
        "the initiator never saw the target go"
    );
    assert_eq!(st.timeouts.load(Ordering::Relaxed), 0);
    drop(d);
    drop(backend);
    let mut c = child.lock().unwrap();
    let _ = c.kill();
    let _ = c.wait();
}
