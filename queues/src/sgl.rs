//! SGL walker: turns a command's SGL descriptor 1 into the data descriptors it describes,
//! following Segment and Last Segment descriptors (NVM Express Base Specification 2.0, section
//! 4.1.2 "Scatter Gather List (SGL)").
//!
//! Rules applied, with the status reported when one is broken:
//! * Descriptor types and subtypes: Data Block (subtype Address or Offset), Bit Bucket (subtype
//!   Address), Segment and Last Segment (Address or Offset), Transport Data Block (subtype Ah, as
//!   NVMe/TCP uses). Anything else, including Keyed Data Block (RDMA only):
//!   [`Status::SGL_TYPE_INVALID`].
//! * A Segment or Last Segment descriptor has a non-zero length that is a multiple of 16:
//!   otherwise [`Status::INVALID_SGL_SEGMENT`].
//! * Only the last descriptor of a segment may be a Segment or Last Segment descriptor, and the
//!   segment a Last Segment descriptor points to contains none: [`Status::INVALID_SGL_SEGMENT`].
//!   A segment reached through a Segment descriptor that ends with a data descriptor ends the
//!   list (accepted, as Linux and SPDK hosts never produce it and it is unambiguous).
//! * At most `max_descriptors` descriptors in all, counting descriptor 1 and segment
//!   descriptors; this bounds the walk whatever the lists contain (a segment pointing to itself
//!   included): [`Status::INVALID_SGL_COUNT`].
//! * The data lengths (data and bit bucket descriptors) add up, overflow-checked, to exactly the
//!   transfer length: [`Status::SGL_LENGTH_INVALID`]. A range that wraps past the end of the
//!   address space is [`Status::DATA_TRANSFER_ERROR`] (Offset subtype:
//!   [`Status::SGL_OFFSET_INVALID`]).
//!
//! Bit Bucket descriptors are reported, not judged: for a read they stand for data to discard,
//! and a write command that contains one should be failed by the caller
//! ([`SglSummary::bit_bucket_bytes`] says whether there were any).
//!
//! Nothing is allocated: segments are fetched through a caller closure into a fixed buffer in
//! chunks of at most [`FETCH_CHUNK`] descriptors, and descriptors go out through a callback.

use crate::nvme::{sgl_subtype, sgl_type, SglDescriptor, Status};

/// Largest number of descriptors requested from the `fetch` closure in one call.
pub const FETCH_CHUNK: usize = 16;

/// Default bound on the number of descriptors in one command's SGL.
pub const DEFAULT_MAX_DESCRIPTORS: usize = 1024;

/// What a walk found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SglSummary {
    /// Bytes described by data descriptors (equal to the transfer length on success, bit bucket
    /// bytes included).
    pub total_bytes: u64,
    /// Bytes described by Bit Bucket descriptors.
    pub bit_bucket_bytes: u64,
    /// Data and bit bucket descriptors emitted (zero-length ones are not emitted).
    pub emitted: usize,
    /// All descriptors visited, including descriptor 1 and segment descriptors.
    pub descriptors: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data,
    BitBucket,
    Segment,
    LastSegment,
}

fn classify(d: &SglDescriptor) -> Result<Kind, Status> {
    let addressable = matches!(d.subtype(), sgl_subtype::ADDRESS | sgl_subtype::OFFSET);
    match d.ty() {
        sgl_type::DATA_BLOCK if addressable => Ok(Kind::Data),
        sgl_type::TRANSPORT_DATA_BLOCK if d.subtype() == sgl_subtype::TRANSPORT_A => Ok(Kind::Data),
        sgl_type::BIT_BUCKET if d.subtype() == sgl_subtype::ADDRESS => Ok(Kind::BitBucket),
        sgl_type::SEGMENT if addressable => Ok(Kind::Segment),
        sgl_type::LAST_SEGMENT if addressable => Ok(Kind::LastSegment),
        _ => Err(Status::SGL_TYPE_INVALID),
    }
}

/// Checks that the range a descriptor's address field describes does not wrap.
fn check_range(d: &SglDescriptor, len: u64) -> Result<(), Status> {
    if d.addr().checked_add(len).is_some() {
        Ok(())
    } else if d.subtype() == sgl_subtype::OFFSET {
        Err(Status::SGL_OFFSET_INVALID)
    } else {
        Err(Status::DATA_TRANSFER_ERROR)
    }
}

struct Walk<E> {
    expected: u64,
    summary: SglSummary,
    emit: E,
}

impl<E: FnMut(&SglDescriptor) -> Result<(), Status>> Walk<E> {
    fn data(&mut self, d: &SglDescriptor, kind: Kind) -> Result<(), Status> {
        let len = u64::from(d.len());
        let total = self
            .summary
            .total_bytes
            .checked_add(len)
            .ok_or(Status::SGL_LENGTH_INVALID)?;
        if total > self.expected {
            return Err(Status::SGL_LENGTH_INVALID);
        }
        if d.ty() != sgl_type::TRANSPORT_DATA_BLOCK {
            // A transport data block's address field is reserved; the others address memory or
            // the capsule.
            check_range(d, len)?;
        }
        self.summary.total_bytes = total;
        if kind == Kind::BitBucket {
            self.summary.bit_bucket_bytes += len; // <= total, cannot overflow
        }
        if len != 0 {
            self.summary.emitted += 1;
            (self.emit)(d)?;
        }
        Ok(())
    }
}

/// Walks the SGL that starts at `sgl1` (the descriptor in the command's data pointer) for a
/// transfer of `expected_len` bytes.
///
/// `fetch(desc, out)` must read the `out.len()` descriptors of the segment piece `desc`
/// describes (type and subtype as in the SGL, length `16 * out.len()`) into `out` and return how
/// many it read; the walker may split one segment into several calls of at most
/// [`FETCH_CHUNK`]. The closure decides where a segment lives: guest memory for subtype Address,
/// the command's capsule for subtype Offset ([`read_capsule_segment`] does that). Its error is
/// returned as is; returning fewer descriptors than asked is [`Status::DATA_TRANSFER_ERROR`].
///
/// `emit(desc)` receives the non-empty Data Block, Transport Data Block and Bit Bucket
/// descriptors in order; its error stops the walk. When the walk fails, descriptors already
/// emitted must be discarded.
pub fn walk_sgl<F, E>(
    sgl1: SglDescriptor,
    expected_len: u64,
    max_descriptors: usize,
    mut fetch: F,
    emit: E,
) -> Result<SglSummary, Status>
where
    F: FnMut(&SglDescriptor, &mut [SglDescriptor]) -> Result<usize, Status>,
    E: FnMut(&SglDescriptor) -> Result<(), Status>,
{
    let mut w = Walk {
        expected: expected_len,
        summary: SglSummary::default(),
        emit,
    };
    if max_descriptors == 0 {
        return Err(Status::INVALID_SGL_COUNT);
    }
    w.summary.descriptors = 1;
    let mut seg = sgl1;
    let mut seg_kind = classify(&sgl1)?;
    let mut buf = [SglDescriptor::default(); FETCH_CHUNK];

    loop {
        match seg_kind {
            Kind::Data | Kind::BitBucket => {
                w.data(&seg, seg_kind)?;
                break;
            }
            Kind::Segment | Kind::LastSegment => {}
        }
        // `seg` points to a segment: validate it, then visit its descriptors.
        let seg_len = seg.len();
        if seg_len == 0 || seg_len % 16 != 0 {
            return Err(Status::INVALID_SGL_SEGMENT);
        }
        let n = (seg_len / 16) as usize;
        if n > max_descriptors - w.summary.descriptors {
            return Err(Status::INVALID_SGL_COUNT);
        }
        check_range(&seg, u64::from(seg_len))?;
        let in_last = seg_kind == Kind::LastSegment;
        let mut next: Option<(SglDescriptor, Kind)> = None;
        let mut start = 0usize;
        while start < n {
            let k = (n - start).min(FETCH_CHUNK);
            // Cannot overflow: checked against the whole segment above.
            let piece = SglDescriptor::new(
                seg.ty(),
                seg.subtype(),
                seg.addr() + 16 * start as u64,
                16 * k as u32,
            );
            let got = fetch(&piece, &mut buf[..k])?;
            if got != k {
                return Err(Status::DATA_TRANSFER_ERROR);
            }
            for (j, d) in buf[..k].iter().enumerate() {
                w.summary.descriptors += 1;
                let kind = classify(d)?;
                match kind {
                    Kind::Data | Kind::BitBucket => w.data(d, kind)?,
                    Kind::Segment | Kind::LastSegment => {
                        if in_last || start + j != n - 1 {
                            return Err(Status::INVALID_SGL_SEGMENT);
                        }
                        next = Some((*d, kind));
                    }
                }
            }
            start += k;
        }
        match next {
            Some((d, kind)) => {
                seg = d;
                seg_kind = kind;
            }
            None => break,
        }
    }

    if w.summary.total_bytes != expected_len {
        return Err(Status::SGL_LENGTH_INVALID);
    }
    Ok(w.summary)
}

/// Decodes one 16-byte descriptor as stored in memory (little-endian).
pub fn decode_descriptor(b: &[u8; 16]) -> SglDescriptor {
    let lo = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let hi = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
    SglDescriptor::from_raw([lo.to_le(), hi.to_le()])
}

/// Encodes a descriptor as the 16 bytes stored in memory (little-endian).
pub fn encode_descriptor(d: &SglDescriptor) -> [u8; 16] {
    let [lo, hi] = d.to_raw();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&u64::from_le(lo).to_le_bytes());
    out[8..].copy_from_slice(&u64::from_le(hi).to_le_bytes());
    out
}

/// The descriptors stored in a byte area, 16 bytes each (a trailing partial descriptor is
/// ignored). Useful for a command's capsule or a segment copied out of guest memory.
pub fn capsule_descriptors(bytes: &[u8]) -> impl Iterator<Item = SglDescriptor> + '_ {
    bytes.chunks_exact(16).map(|c| {
        let mut b = [0u8; 16];
        b.copy_from_slice(c);
        decode_descriptor(&b)
    })
}

/// A `fetch` for [`walk_sgl`] that reads segments with subtype Offset from `capsule` (the
/// command's in-capsule data or a queue pair's capsule area). A segment with another subtype is
/// [`Status::SGL_TYPE_INVALID`]; one that does not fit in the capsule is
/// [`Status::SGL_OFFSET_INVALID`].
pub fn read_capsule_segment(
    capsule: &[u8],
    desc: &SglDescriptor,
    out: &mut [SglDescriptor],
) -> Result<usize, Status> {
    if desc.subtype() != sgl_subtype::OFFSET {
        return Err(Status::SGL_TYPE_INVALID);
    }
    let start = usize::try_from(desc.addr()).map_err(|_| Status::SGL_OFFSET_INVALID)?;
    let len = (desc.len() as usize).min(out.len() * 16);
    let end = start.checked_add(len).ok_or(Status::SGL_OFFSET_INVALID)?;
    let bytes = capsule.get(start..end).ok_or(Status::SGL_OFFSET_INVALID)?;
    let mut n = 0;
    for (o, d) in out.iter_mut().zip(capsule_descriptors(bytes)) {
        *o = d;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Guest memory holding SGL segments, keyed by descriptor address.
    #[derive(Default, Clone)]
    struct Mem(HashMap<u64, SglDescriptor>);

    impl Mem {
        fn fetch(&self, d: &SglDescriptor, out: &mut [SglDescriptor]) -> Result<usize, Status> {
            assert_eq!(d.len() as usize, out.len() * 16);
            assert!(out.len() <= FETCH_CHUNK);
            for (i, o) in out.iter_mut().enumerate() {
                *o = *self
                    .0
                    .get(&(d.addr() + 16 * i as u64))
                    .ok_or(Status::DATA_TRANSFER_ERROR)?;
            }
            Ok(out.len())
        }
        fn put(&mut self, addr: u64, ds: &[SglDescriptor]) {
            for (i, d) in ds.iter().enumerate() {
                self.0.insert(addr + 16 * i as u64, *d);
            }
        }
    }

    fn walk(
        sgl1: SglDescriptor,
        len: u64,
        max: usize,
        mem: &Mem,
    ) -> Result<Vec<SglDescriptor>, Status> {
        let mut out = Vec::new();
        let s = walk_sgl(
            sgl1,
            len,
            max,
            |d, o| mem.fetch(d, o),
            |d| {
                out.push(*d);
                Ok(())
            },
        )?;
        assert_eq!(s.emitted, out.len());
        assert_eq!(s.total_bytes, len);
        Ok(out)
    }

    fn seg(addr: u64, n: usize) -> SglDescriptor {
        SglDescriptor::new(sgl_type::SEGMENT, sgl_subtype::ADDRESS, addr, 16 * n as u32)
    }
    fn last(addr: u64, n: usize) -> SglDescriptor {
        SglDescriptor::new(
            sgl_type::LAST_SEGMENT,
            sgl_subtype::ADDRESS,
            addr,
            16 * n as u32,
        )
    }

    #[test]
    fn single_data_block() {
        let d = SglDescriptor::data(0x1000, 512);
        assert_eq!(walk(d, 512, 8, &Mem::default()).unwrap(), [d]);
        assert_eq!(
            walk(d, 1024, 8, &Mem::default()),
            Err(Status::SGL_LENGTH_INVALID)
        );
        assert_eq!(
            walk(d, 256, 8, &Mem::default()),
            Err(Status::SGL_LENGTH_INVALID)
        );
    }

    #[test]
    fn chained_segments_in_order() {
        let mut mem = Mem::default();
        let a = SglDescriptor::data(0x10_000, 4096);
        let b = SglDescriptor::data(0x30_000, 100);
        let c = SglDescriptor::data(0x50_000, 0); // empty: counted, not emitted
        let d = SglDescriptor::data(0x70_000, 3996);
        mem.put(0x1000, &[a, b, last(0x2000, 2)]);
        mem.put(0x2000, &[c, d]);
        let got = walk(seg(0x1000, 3), 8192, 16, &mem).unwrap();
        assert_eq!(got, [a, b, d]);
    }

    #[test]
    fn long_segment_is_fetched_in_chunks() {
        let mut mem = Mem::default();
        let ds: Vec<_> = (0..40u64)
            .map(|i| SglDescriptor::data(0x100_0000 + i * 0x1000, 512))
            .collect();
        mem.put(0x8000, &ds);
        assert_eq!(walk(last(0x8000, 40), 40 * 512, 64, &mem).unwrap(), ds);
        assert_eq!(
            walk(last(0x8000, 40), 40 * 512, 40, &mem),
            Err(Status::INVALID_SGL_COUNT)
        );
    }

    #[test]
    fn segment_rules_are_enforced() {
        let mut mem = Mem::default();
        let a = SglDescriptor::data(0x10_000, 512);
        // A segment descriptor that is not last in its segment.
        mem.put(0x1000, &[seg(0x2000, 1), a]);
        assert_eq!(
            walk(seg(0x1000, 2), 512, 16, &mem),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        // A Last Segment that contains a segment descriptor.
        mem.put(0x3000, &[a, last(0x2000, 1)]);
        assert_eq!(
            walk(last(0x3000, 2), 512, 16, &mem),
            Err(Status::INVALID_SGL_SEGMENT)
        );
        // Bad segment lengths.
        let bad = SglDescriptor::new(sgl_type::LAST_SEGMENT, sgl_subtype::ADDRESS, 0x3000, 24);
        assert_eq!(walk(bad, 512, 16, &mem), Err(Status::INVALID_SGL_SEGMENT));
        assert_eq!(
            walk(last(0x3000, 0), 512, 16, &mem),
            Err(Status::INVALID_SGL_SEGMENT)
        );
    }

    #[test]
    fn self_referencing_segment_is_bounded() {
        let mut mem = Mem::default();
        mem.put(0x1000, &[SglDescriptor::data(0x10_000, 1), seg(0x1000, 2)]);
        assert_eq!(
            walk(seg(0x1000, 2), 1 << 40, 100, &mem),
            Err(Status::INVALID_SGL_COUNT)
        );
    }

    #[test]
    fn types_are_checked() {
        let keyed = SglDescriptor::new(sgl_type::KEYED_DATA_BLOCK, 0, 0x1000, 512);
        assert_eq!(
            walk(keyed, 512, 4, &Mem::default()),
            Err(Status::SGL_TYPE_INVALID)
        );
        let odd = SglDescriptor::new(sgl_type::DATA_BLOCK, 0x5, 0x1000, 512);
        assert_eq!(
            walk(odd, 512, 4, &Mem::default()),
            Err(Status::SGL_TYPE_INVALID)
        );
        let tcp = SglDescriptor::new(
            sgl_type::TRANSPORT_DATA_BLOCK,
            sgl_subtype::TRANSPORT_A,
            0,
            4096,
        );
        assert_eq!(walk(tcp, 4096, 4, &Mem::default()).unwrap(), [tcp]);
    }

    #[test]
    fn bit_buckets_are_reported() {
        let mut mem = Mem::default();
        let bb = SglDescriptor::new(sgl_type::BIT_BUCKET, 0, 0, 512);
        let a = SglDescriptor::data(0x10_000, 512);
        mem.put(0x1000, &[a, bb]);
        let mut seen = Vec::new();
        let s = walk_sgl(
            last(0x1000, 2),
            1024,
            8,
            |d, o| mem.fetch(d, o),
            |d| {
                seen.push(d.ty());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(s.bit_bucket_bytes, 512);
        assert_eq!(seen, [sgl_type::DATA_BLOCK, sgl_type::BIT_BUCKET]);
    }

    #[test]
    fn wrapping_ranges_and_length_overflow_are_rejected() {
        let d = SglDescriptor::data(u64::MAX - 10, 512);
        assert_eq!(
            walk(d, 512, 4, &Mem::default()),
            Err(Status::DATA_TRANSFER_ERROR)
        );
        let o = SglDescriptor::new(sgl_type::DATA_BLOCK, sgl_subtype::OFFSET, u64::MAX, 2);
        assert_eq!(
            walk(o, 2, 4, &Mem::default()),
            Err(Status::SGL_OFFSET_INVALID)
        );
        let mut mem = Mem::default();
        let big = SglDescriptor::data(0, u32::MAX);
        mem.put(0x1000, &[big, big, big]);
        assert_eq!(
            walk(last(0x1000, 3), 1 << 33, 8, &mem),
            Err(Status::SGL_LENGTH_INVALID)
        );
    }

    #[test]
    fn capsule_segments() {
        let a = SglDescriptor::data(0x10_000, 512);
        let b = SglDescriptor::data(0x20_000, 512);
        let mut capsule = vec![0u8; 64];
        capsule[16..32].copy_from_slice(&encode_descriptor(&a));
        capsule[32..48].copy_from_slice(&encode_descriptor(&b));
        assert_eq!(
            capsule_descriptors(&capsule[16..])
                .take(2)
                .collect::<Vec<_>>(),
            [a, b]
        );
        assert_eq!(capsule_descriptors(&capsule[..31]).count(), 1);

        let sgl1 = SglDescriptor::new(sgl_type::LAST_SEGMENT, sgl_subtype::OFFSET, 16, 32);
        let mut out = Vec::new();
        walk_sgl(
            sgl1,
            1024,
            8,
            |d, o| read_capsule_segment(&capsule, d, o),
            |d| {
                out.push(*d);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, [a, b]);

        let beyond = SglDescriptor::new(sgl_type::LAST_SEGMENT, sgl_subtype::OFFSET, 48, 32);
        let r = walk_sgl(
            beyond,
            1024,
            8,
            |d, o| read_capsule_segment(&capsule, d, o),
            |_| Ok(()),
        );
        assert_eq!(r, Err(Status::SGL_OFFSET_INVALID));
        let r = walk_sgl(
            last(16, 2),
            1024,
            8,
            |d, o| read_capsule_segment(&capsule, d, o),
            |_| Ok(()),
        );
        assert_eq!(r, Err(Status::SGL_TYPE_INVALID));
    }

    #[test]
    fn descriptor_bytes_round_trip() {
        let d = SglDescriptor::new(
            sgl_type::LAST_SEGMENT,
            sgl_subtype::OFFSET,
            0x0102_0304_0506_0708,
            0x30,
        );
        let b = encode_descriptor(&d);
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 0x30);
        assert_eq!(b[15], 0x31);
        assert_eq!(decode_descriptor(&b), d);
    }

    /// Builds a host-style SGL for `data` split into segments of the given sizes; returns
    /// descriptor 1 and the memory holding the segments.
    fn build(data: &[SglDescriptor], splits: &[usize]) -> (SglDescriptor, Mem) {
        let mut mem = Mem::default();
        if data.len() == 1 && splits.is_empty() {
            return (data[0], mem);
        }
        // Cut `data` into chunks; the last chunk takes what is left and must not be empty.
        let mut chunks: Vec<&[SglDescriptor]> = Vec::new();
        let mut rest = data;
        for &s in splits {
            let s = s.min(rest.len().saturating_sub(1));
            chunks.push(&rest[..s]);
            rest = &rest[s..];
        }
        chunks.push(rest);
        let base = |i: usize| 0x100_0000 + (i as u64) * 0x1_0000;
        let mut first = None;
        for (i, chunk) in chunks.iter().enumerate() {
            let is_last = i + 1 == chunks.len();
            let mut entries = chunk.to_vec();
            if !is_last {
                let next_len = chunks[i + 1].len() + usize::from(i + 2 < chunks.len());
                let next = if i + 2 == chunks.len() {
                    last(base(i + 1), next_len)
                } else {
                    seg(base(i + 1), next_len)
                };
                entries.push(next);
            }
            mem.put(base(i), &entries);
            if i == 0 {
                first = Some(if is_last {
                    last(base(0), entries.len())
                } else {
                    seg(base(0), entries.len())
                });
            }
        }
        (first.unwrap(), mem)
    }

    fn data_desc() -> impl Strategy<Value = SglDescriptor> {
        (0u64..1 << 40, 0u32..70_000, 0u8..10).prop_map(|(a, l, k)| match k {
            0 => SglDescriptor::new(sgl_type::BIT_BUCKET, 0, 0, l),
            1 => SglDescriptor::new(sgl_type::DATA_BLOCK, sgl_subtype::OFFSET, a & 0xffff, l),
            _ => SglDescriptor::data(a, l),
        })
    }

    proptest! {
        /// Host-built SGLs of random shape walk back to their non-empty data descriptors.
        #[test]
        fn valid_lists_reproduce_segments(
            data in proptest::collection::vec(data_desc(), 1..60),
            splits in proptest::collection::vec(0usize..20, 0..5),
        ) {
            let (sgl1, mem) = build(&data, &splits);
            let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
            let want: Vec<_> = data.iter().copied().filter(|d| !d.is_empty()).collect();
            prop_assert_eq!(walk(sgl1, total, 1000, &mem).unwrap(), want);
        }

        /// Corrupted lists (random bytes changed in descriptor 1 or a segment, random length
        /// expectations and bounds) never panic, and any success still adds up.
        #[test]
        fn corrupted_lists_never_panic(
            data in proptest::collection::vec(data_desc(), 1..30),
            splits in proptest::collection::vec(0usize..10, 0..4),
            flips in proptest::collection::vec((any::<usize>(), 0usize..16, any::<u8>()), 1..4),
            max in 0usize..80,
            len_delta in -2i64..2,
        ) {
            let (mut sgl1, mut mem) = build(&data, &splits);
            let mut keys: Vec<u64> = mem.0.keys().copied().collect();
            keys.sort_unstable();
            for (which, byte, val) in flips {
                let target = if keys.is_empty() || which % (keys.len() + 1) == 0 {
                    &mut sgl1
                } else {
                    mem.0.get_mut(&keys[which % keys.len()]).unwrap()
                };
                let mut b = encode_descriptor(target);
                b[byte] = val;
                *target = decode_descriptor(&b);
            }
            let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
            let expected = total.saturating_add_signed(len_delta);
            let mut sum = 0u64;
            let r = walk_sgl(sgl1, expected, max, |d, o| mem.fetch(d, o), |d| {
                sum += u64::from(d.len());
                Ok(())
            });
            if let Ok(s) = r {
                prop_assert_eq!(sum, expected);
                prop_assert_eq!(s.total_bytes, expected);
                prop_assert!(s.descriptors <= max);
            }
        }
    }
}
