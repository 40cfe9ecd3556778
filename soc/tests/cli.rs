//! The leapd binary as a user meets it: clear one-line errors, socket permissions, refusing a
//! socket a live leapd serves, and a clean exit on SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn leapd() -> Command {
    let mut c = leap_tests::program(env!("CARGO_BIN_EXE_leapd"));
    c.env("RUST_LOG", "info");
    c
}

fn fails_with(args: &[&str], needle: &str) {
    let out = leapd().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in: {err}"
    );
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve(dir: &Path, extra: &[&str]) -> Child {
    let sock = dir.join("d.sock");
    let disk = format!("{},size=16M", dir.join("d.img").display());
    let mut child = leapd()
        .args([
            "serve",
            "--socket",
            sock.to_str().unwrap(),
            "--disk",
            &disk,
            "--queues",
            "1",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Ready when it logs that it serves (the socket may exist already: a stale one).
    leap_tests::log_until(&mut child, "serving");
    wait_for(&sock);
    child
}

/// Reads a leapd child's log (its piped stderr) up to the first line containing `needle`, and
/// returns that line; the rest is drained in the background so leapd never blocks on the pipe.
#[test]
fn bad_input_gets_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sock = d.join("s.sock");
    let s = sock.to_str().unwrap();
    let missing = format!("{}", d.join("missing.img").display());
    fails_with(
        &["serve", "--socket", s, "--disk", &missing],
        "does not exist (add `,size=SIZE`",
    );
    fails_with(
        &["serve", "--socket", s, "--disk", "x.img,size=12Q"],
        "unknown unit",
    );
    fails_with(
        &["serve", "--socket", s, "--disk", "x.img,colour=red"],
        "unknown disk option",
    );
    fails_with(
        &["serve", "--socket", s, "--disk", "/proc/nope/x.img,size=1M"],
        "cannot open",
    );
    fails_with(
        &[
            "serve",
            "--socket",
            s,
            "--disk",
            "x.img,size=1M",
            "--block-size",
            "1000",
        ],
        "512 or 4096",
    );
    fails_with(
        &[
            "serve",
            "--socket",
            s,
            "--disk",
            "x.img,size=1M",
            "--socket-mode",
            "999",
        ],
        "octal",
    );
    fails_with(
        &["serve", "--disk", "x.img,size=1M"],
        "--disk needs --socket",
    );
    fails_with(
        &[
            "serve",
            "--socket",
            "/proc/nope/s.sock",
            "--disk",
            &format!("{},size=1M", d.join("y.img").display()),
        ],
        "cannot create /proc/nope",
    );
    // Core placement: a core leapd may not use, a bad list, a poller count that disagrees.
    let img = format!("{},size=1M", d.join("z.img").display());
    let s = d.join("z.sock");
    let base = ["serve", "--socket", s.to_str().unwrap(), "--disk", &img];
    fails_with(
        &[&base[..], &["--cores", "1000"]].concat(),
        "is not available to leapd",
    );
    fails_with(
        &[&base[..], &["--cores", "3-1"]].concat(),
        "range runs backwards",
    );
    fails_with(
        &[&base[..], &["--cores", "0", "--pollers", "2"]].concat(),
        "disagrees with --cores",
    );
    assert!(!sock.exists());
}

#[test]
fn sigterm_stops_cleanly_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let child = serve(dir.path(), &[]);
    let sock = dir.path().join("d.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket is private by default");
    let img = std::fs::metadata(dir.path().join("d.img")).unwrap();
    assert_eq!(img.len(), 16 << 20, "size= creates the file");
    let status = leap_tests::terminate(child);
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(!sock.exists(), "socket removed on exit");
}

#[test]
fn socket_mode_is_honoured_and_a_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let child = serve(dir.path(), &["--socket-mode", "0660"]);
    let sock = dir.path().join("d.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o660
    );
    let disk = format!("{},size=16M", dir.path().join("e.img").display());
    let out = leapd()
        .args(["serve", "--socket", sock.to_str().unwrap(), "--disk", &disk])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already served"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(sock.exists(), "the live server's socket is left alone");
    assert_eq!(leap_tests::terminate(child).code(), Some(0));
    // A stale socket (nobody listening) is replaced.
    std::os::unix::net::UnixListener::bind(&sock)
        .map(drop)
        .unwrap();
    let child = serve(dir.path(), &[]);
    assert_eq!(leap_tests::terminate(child).code(), Some(0));
}

/// The SoC-mode command line as the SoC VM's job runs it: a window stand-in, a TCP listener, a
/// disk and no socket; it serves, and stops cleanly on SIGTERM.
#[test]
fn soc_mode_serves_a_disk_to_host_agents() {
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("tenant-ram");
    std::fs::write(&ram, vec![0u8; 1 << 20]).unwrap();
    let mut child = leapd()
        .args([
            "serve",
            "--mode",
            "socvm",
            "--listen",
            "127.0.0.1:0",
            "--window",
        ])
        .arg(&ram)
        .args(["--disk", "ram,size=16M", "--queues", "1"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = leap_tests::log_until(&mut child, "to host agents on");
    assert!(line.contains("platform socvm"), "{line}");
    assert!(leap_tests::terminate(child).success());
    // --socket belongs to host mode.
    fails_with(
        &[
            "serve",
            "--mode",
            "socvm",
            "--window",
            ram.to_str().unwrap(),
            "--socket",
            "x.sock",
            "--disk",
            "ram",
        ],
        "--socket is for host mode",
    );
}
