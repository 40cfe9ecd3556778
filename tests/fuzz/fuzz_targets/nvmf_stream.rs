//! The NVMe/TCP receive state machine (`conn::Rx`) fed a peer's byte stream through a real
//! socket, in chunks the input decides, as controller or host, with every PDU's data steered
//! into a buffer at an offset the input decides (clamped as the target and initiator clamp it).
//! Nothing may panic and nothing may be written outside the buffer (canaries).
#![no_main]

use leap_runtime::nvmf::conn::{Pieces, Rx, RxEvent};
use leap_runtime::nvmf::pdu::{Limits, Params, Role};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

const BUF: usize = 8192;
const CANARY: usize = 64;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let role = if data[0] & 1 == 0 { Role::Controller } else { Role::Host };
    let params = Params {
        hdgst: data[0] & 2 != 0,
        ddgst: data[0] & 4 != 0,
        cpda: 0,
        hpda: data[1] & 3,
        maxh2cdata: 4096,
        maxr2t: 0,
    };
    let limits = Limits {
        max_icd: 4096,
        max_plen: 16384,
    };
    let chunk = 1 + data[2] as usize;
    let stream = &data[3..];
    let (a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let mut mem = vec![0x5au8; BUF + 2 * CANARY];
    let mut rx = Rx::new();
    let mut iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    for piece in stream.chunks(chunk) {
        (&a).write_all(piece).unwrap();
        loop {
            match rx.poll(b.as_raw_fd(), role, &params, &limits) {
                Ok(RxEvent::Idle) => break,
                Ok(RxEvent::Header) => {
                    // Data goes into the buffer at an offset taken from the header, limited to
                    // the buffer the way the target and the initiator limit it.
                    let h = rx.header();
                    let off = h.get(12).copied().unwrap_or(0) as usize * 16 % BUF;
                    let len = (rx.layout().datal as usize).min(BUF - off);
                    iov = libc::iovec {
                        // SAFETY: off < BUF: inside the buffer past the leading canary.
                        iov_base: unsafe { mem.as_mut_ptr().add(CANARY + off) }.cast(),
                        iov_len: len,
                    };
                    // SAFETY: `iov` and `mem` live until the PDU is complete (this loop).
                    rx.set_sink(unsafe { Pieces::new(&iov, 1, 0) });
                }
                Ok(RxEvent::Pdu { .. }) => {}
                Err(_) => return,
            }
        }
    }
    let _ = iov;
    assert!(mem[..CANARY].iter().all(|&x| x == 0x5a), "write before the buffer");
    assert!(mem[CANARY + BUF..].iter().all(|&x| x == 0x5a), "write after the buffer");
});
