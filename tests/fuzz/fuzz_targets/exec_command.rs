//! An NVMe I/O command as a guest or peer could write it — SQE, capsule (SGL segments, DSM
//! ranges) and guest memory (PRP lists, SGL segments, data) — executed against a RAM namespace
//! through a guest address space of up to three regions with gaps. Nothing may panic, and no byte
//! outside the regions (canaries around each) may change.
#![no_main]

use leap_queues::Sqe;
use leap_runtime::addr::{AddressSpace, Region};
use leap_runtime::backend::{Backend, RamBackend};
use leap_runtime::exec::{start, Scratch, Started};
use leap_runtime::{Namespace, Namespaces};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

const REGION: usize = 16 << 10;
const CANARY: usize = 64;
const BASES: [u64; 3] = [0x1000, 0x10_0000, 0xffff_ffff_0000];

fn disk() -> &'static (Arc<Namespaces>, Arc<dyn Backend>) {
    static D: OnceLock<(Arc<Namespaces>, Arc<dyn Backend>)> = OnceLock::new();
    D.get_or_init(|| {
        let b: Arc<dyn Backend> = Arc::new(RamBackend::new(1 << 20, 512).unwrap());
        (Namespaces::single(Namespace::new(b.clone())), b)
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 66 {
        return;
    }
    let mut raw = [0u8; 64];
    raw.copy_from_slice(&data[..64]);
    let nregions = 1 + (data[64] % 3) as usize;
    let capsule_len = (data[65] as usize) * 4;
    let rest = &data[66..];
    let (capsule, mem_init) = rest.split_at(capsule_len.min(rest.len()));
    // Guest memory: regions with canaries on both sides, initialised from the input.
    let mut mem = vec![0xa5u8; nregions * (REGION + 2 * CANARY)];
    let mut regions = Vec::new();
    for k in 0..nregions {
        let at = k * (REGION + 2 * CANARY) + CANARY;
        let src = mem_init.get(k * REGION..).unwrap_or(&[]);
        let n = src.len().min(REGION);
        mem[at..at + n].copy_from_slice(&src[..n]);
        regions.push(Region {
            guest: BASES[k],
            len: REGION as u64,
            host: mem.as_ptr() as usize + at,
            device: BASES[k],
        });
    }
    let aspace = AddressSpace::new(regions, None).unwrap();
    // SAFETY: `raw` is 64 bytes and Sqe is a plain 64-byte repr(C) struct of integers: every
    // bit pattern is valid.
    let sqe: Sqe = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let (nss, backend) = disk();
    let mut bqs = vec![Some(backend.open_queue(8).unwrap())];
    let mut scratch = Scratch::default();
    // SAFETY: `mem` (behind `aspace`) and `capsule` outlive the call; the RAM back end finishes
    // everything inside `submit`.
    let r = unsafe { start(nss, &mut bqs, &sqe, capsule, &aspace, &mut scratch) };
    assert!(!matches!(r, Started::Pending(..)), "RAM finishes at once");
    for k in 0..nregions {
        let base = k * (REGION + 2 * CANARY);
        assert!(mem[base..base + CANARY].iter().all(|&b| b == 0xa5), "write before region {k}");
        let after = base + CANARY + REGION;
        assert!(mem[after..after + CANARY].iter().all(|&b| b == 0xa5), "write after region {k}");
    }
});
