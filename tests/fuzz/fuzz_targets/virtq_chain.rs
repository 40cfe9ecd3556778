//! Descriptor chains as a guest could write them: a descriptor table (direct and indirect
//! descriptors, any flags, next indexes and lengths) in guest memory of two regions with a gap,
//! walked from any head for any queue size. The walk must end (no loops), report only
//! descriptors it read from guest memory, and never panic.
#![no_main]

use leap_vhost::chain::walk;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let size = u16::from_le_bytes([data[0], data[1]]) % 1025;
    let head = u16::from_le_bytes([data[2], data[3]]);
    let table = u32::from_le_bytes([data[4], data[5], data[6], data[7]]) as u64 % 0x3_0000;
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x1_0000),
    ])
    .unwrap();
    let body = &data[8..];
    let n = body.len().min(0x1_0000);
    mem.write_slice(&body[..n], GuestAddress(0)).unwrap();
    let m = body.len().saturating_sub(n).min(0x1_0000);
    mem.write_slice(&body[n..n + m], GuestAddress(0x2_0000)).unwrap();
    let mut seen = 0usize;
    let r = walk(&mem, GuestAddress(table), size, head, |_| {
        seen += 1;
        true
    });
    // At most one visit per ring entry, plus one per entry of one indirect table.
    assert!(seen <= size as usize + u16::MAX as usize, "{seen} descriptors visited");
    if r.is_ok() {
        assert!(seen >= 1);
    }
});
