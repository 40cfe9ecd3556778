//! A host's admin session against the NVMe controller: property reads and writes (enable,
//! reset, shutdown) and admin commands with host data, all from the input, 64-byte SQEs and
//! arbitrary transfer sizes up to 64 KiB. Nothing may panic, and a command may never claim to
//! return more bytes than its buffer holds.
#![no_main]

use leap_queues::Sqe;
use leap_runtime::backend::{Backend, RamBackend};
use leap_runtime::controller::{AdminOutcome, Controller, ControllerConfig};
use leap_runtime::{Namespace, Namespaces};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

fn nss() -> Arc<Namespaces> {
    static N: OnceLock<Arc<Namespaces>> = OnceLock::new();
    N.get_or_init(|| {
        let a: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
        let b: Arc<dyn Backend> = Arc::new(RamBackend::new(2 << 20, 4096).unwrap());
        Namespaces::new(vec![Namespace::new(a), Namespace::new(b)])
    })
    .clone()
}

fuzz_target!(|data: &[u8]| {
    let mut c = Controller::new(
        Arc::new(ControllerConfig::default()),
        1,
        "nqn.2014-08.org.nvmexpress:uuid:fuzz",
        [1; 16],
        data.first().copied().unwrap_or(0) as u32 * 100,
        nss(),
    );
    let mut out = vec![0u8; 64 << 10];
    let mut rest = data.get(1..).unwrap_or(&[]);
    while rest.len() >= 4 {
        let (op, tail) = rest.split_at(4);
        rest = tail;
        match op[0] % 4 {
            0 => {
                let off = u32::from(op[1]) * 4;
                let _ = c.property_get(off, if op[2] & 1 == 0 { 4 } else { 8 });
            }
            1 => {
                let v = u32::from_le_bytes([op[1], op[2], op[3], 0]) as u64;
                // Mostly CC (offset 0x14): enable, reset and shutdown sequences.
                let _ = c.property_set(0x14, 4, v | 1);
            }
            _ => {
                if rest.len() < 64 {
                    return;
                }
                let (raw, tail) = rest.split_at(64);
                rest = tail;
                let mut b = [0u8; 64];
                b.copy_from_slice(raw);
                // SAFETY: Sqe is a plain 64-byte repr(C) struct of integers.
                let sqe: Sqe = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
                let len = (u16::from_le_bytes([op[1], op[2]]) as usize).min(out.len());
                let host = &raw[..(op[3] as usize).min(raw.len())];
                match c.admin(&sqe, host, &mut out[..len]) {
                    AdminOutcome::Complete { bytes, .. } => assert!(bytes <= len),
                    AdminOutcome::Held => {
                        let _ = c.take_event_completion();
                    }
                }
            }
        }
    }
});
