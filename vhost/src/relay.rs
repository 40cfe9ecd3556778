//! The control protocol between the host agent (`leapd agent`, which terminates vhost-user for
//! the hypervisor) and leapd on a SoC or in a SoC VM, which serves the disk through a window onto
//! host memory. Only control crosses it — memory tables as host addresses, ring addresses, ring
//! start and stop, kicks and completion interrupts, the inflight region — never request data.
//!
//! Wire format, version 1, all integers little-endian (docs/agent-protocol.md):
//!
//! ```text
//! frame:  magic "LPAG" | version u16 | kind u16 | seq u32 | body length u32 | body
//! ```
//!
//! Each side is another trust domain for the other: [`decode`] checks magic, version, kind, the
//! exact body length of the kind, every count and every enumerated value before it returns a
//! message, and [`Framer`] never buffers more than one maximal frame. A peer that speaks a newer
//! version gets [`ProtoError::Version`], which names both.

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"LPAG";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Header bytes.
pub const HEADER: usize = 16;
/// Largest body.
pub const MAX_BODY: usize = 4096;
/// Most memory regions in a table (vhost-user's limit).
pub const MAX_REGIONS: usize = 8;
/// Largest configuration space carried.
pub const MAX_CONFIG: usize = 256;
/// Longest peer name.
pub const MAX_NAME: usize = 64;
/// The host address at which the agent's inflight file appears (its offset 0): far above any
/// guest memory, so the SoC's window onto that file cannot overlap a guest-memory window.
pub const INFLIGHT_HOST: u64 = 1 << 62;

/// Who is speaking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The host agent.
    Agent,
    /// leapd on the SoC.
    Soc,
}

/// One guest memory region as the SoC sees it: guest range and host address (in the window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// First guest address.
    pub guest: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host address of `guest`.
    pub host: u64,
}

/// A virtqueue's setup, guest addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vring {
    /// Queue index.
    pub queue: u16,
    /// Entries.
    pub size: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Avail ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Where to start (SET_VRING_BASE).
    pub base: u16,
}

/// A protocol message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// First message of each side.
    Hello {
        /// Who.
        role: Role,
        /// Optional features (none defined in version 1; unknown bits are ignored).
        features: u64,
        /// A name for logs (UTF-8, at most 64 bytes).
        name: String,
    },
    /// The SoC's device, for the agent to answer the hypervisor.
    DeviceInfo {
        /// Virtio features offered.
        features: u64,
        /// vhost-user protocol features offered.
        protocol: u64,
        /// Queues.
        num_queues: u16,
        /// Largest queue size.
        max_queue_size: u16,
        /// The configuration space.
        config: Vec<u8>,
    },
    /// The guest memory table.
    MemTable(Vec<MemRegion>),
    /// A ring's setup.
    Vring(Vring),
    /// Start serving a ring.
    VringStart(u16),
    /// Stop a ring; the reply's value is where it stopped.
    VringStop(u16),
    /// The guest kicked a ring (when the SoC does not poll it).
    Kick(u16),
    /// The SoC completed requests on a ring: interrupt the guest.
    Call(u16),
    /// The inflight region, at a host address inside a window.
    Inflight {
        /// Host address.
        host: u64,
        /// Bytes.
        size: u64,
        /// Queues it covers.
        num_queues: u16,
        /// Entries per queue.
        queue_size: u16,
    },
    /// A configuration-space write.
    SetConfig {
        /// Offset.
        offset: u32,
        /// Bytes.
        bytes: Vec<u8>,
    },
    /// The answer to the message with the same sequence number: 0 or an errno, and a value.
    Reply {
        /// 0 for success, else a positive errno.
        status: u32,
        /// Message-specific (a ring's base for VringStop).
        value: u64,
    },
    /// Reset the device (all rings stop).
    Reset,
    /// Liveness; answered with a Reply.
    KeepAlive,
}

/// Why bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Not a frame of this protocol.
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// A version this build does not speak.
    #[error("peer speaks protocol version {0}, this leapd speaks {VERSION}")]
    Version(u16),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    Kind(u16),
    /// A body longer than allowed, or of the wrong length for its kind.
    #[error("message kind {kind}: body of {len} bytes ({why})")]
    Length {
        /// Kind.
        kind: u16,
        /// Body length.
        len: usize,
        /// What was expected.
        why: &'static str,
    },
    /// A field out of range.
    #[error("message kind {kind}: {why}")]
    Field {
        /// Kind.
        kind: u16,
        /// What is wrong.
        why: String,
    },
}

const K_HELLO: u16 = 1;
const K_DEVICE_INFO: u16 = 2;
const K_MEM_TABLE: u16 = 3;
const K_VRING: u16 = 4;
const K_VRING_START: u16 = 5;
const K_VRING_STOP: u16 = 6;
const K_KICK: u16 = 7;
const K_CALL: u16 = 8;
const K_INFLIGHT: u16 = 9;
const K_SET_CONFIG: u16 = 10;
const K_REPLY: u16 = 11;
const K_RESET: u16 = 12;
const K_KEEP_ALIVE: u16 = 13;

impl Msg {
    fn kind(&self) -> u16 {
        match self {
            Msg::Hello { .. } => K_HELLO,
            Msg::DeviceInfo { .. } => K_DEVICE_INFO,
            Msg::MemTable(_) => K_MEM_TABLE,
            Msg::Vring(_) => K_VRING,
            Msg::VringStart(_) => K_VRING_START,
            Msg::VringStop(_) => K_VRING_STOP,
            Msg::Kick(_) => K_KICK,
            Msg::Call(_) => K_CALL,
            Msg::Inflight { .. } => K_INFLIGHT,
            Msg::SetConfig { .. } => K_SET_CONFIG,
            Msg::Reply { .. } => K_REPLY,
            Msg::Reset => K_RESET,
            Msg::KeepAlive => K_KEEP_ALIVE,
        }
    }
}

/// Appends the frame of `msg` with sequence number `seq` to `out`. Fails only for a message
/// that no peer could accept (too many regions, a name or configuration too long).
pub fn encode(msg: &Msg, seq: u32, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let kind = msg.kind();
    let mut b = Vec::with_capacity(64);
    let field = |why: &str| ProtoError::Field {
        kind,
        why: why.into(),
    };
    match msg {
        Msg::Hello {
            role,
            features,
            name,
        } => {
            if name.len() > MAX_NAME {
                return Err(field("name longer than 64 bytes"));
            }
            b.push(match role {
                Role::Agent => 0,
                Role::Soc => 1,
            });
            b.extend_from_slice(&[0; 3]);
            b.extend_from_slice(&features.to_le_bytes());
            b.extend_from_slice(&(name.len() as u16).to_le_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        Msg::DeviceInfo {
            features,
            protocol,
            num_queues,
            max_queue_size,
            config,
        } => {
            if config.len() > MAX_CONFIG {
                return Err(field("configuration space longer than 256 bytes"));
            }
            b.extend_from_slice(&features.to_le_bytes());
            b.extend_from_slice(&protocol.to_le_bytes());
            b.extend_from_slice(&num_queues.to_le_bytes());
            b.extend_from_slice(&max_queue_size.to_le_bytes());
            b.extend_from_slice(&(config.len() as u16).to_le_bytes());
            b.extend_from_slice(config);
        }
        Msg::MemTable(regions) => {
            if regions.len() > MAX_REGIONS {
                return Err(field("more than 8 regions"));
            }
            b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
            for r in regions {
                for v in [r.guest, r.len, r.host] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        Msg::Vring(v) => {
            b.extend_from_slice(&v.queue.to_le_bytes());
            b.extend_from_slice(&v.size.to_le_bytes());
            b.extend_from_slice(&u32::from(v.event_idx).to_le_bytes());
            for a in [v.desc, v.avail, v.used] {
                b.extend_from_slice(&a.to_le_bytes());
            }
            b.extend_from_slice(&v.base.to_le_bytes());
            b.extend_from_slice(&[0; 6]);
        }
        Msg::VringStart(q) | Msg::VringStop(q) | Msg::Kick(q) | Msg::Call(q) => {
            b.extend_from_slice(&q.to_le_bytes());
        }
        Msg::Inflight {
            host,
            size,
            num_queues,
            queue_size,
        } => {
            b.extend_from_slice(&host.to_le_bytes());
            b.extend_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&num_queues.to_le_bytes());
            b.extend_from_slice(&queue_size.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
        }
        Msg::SetConfig { offset, bytes } => {
            if bytes.len() > MAX_CONFIG {
                return Err(field("configuration write longer than 256 bytes"));
            }
            b.extend_from_slice(&offset.to_le_bytes());
            b.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            b.extend_from_slice(bytes);
        }
        Msg::Reply { status, value } => {
            b.extend_from_slice(&status.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&value.to_le_bytes());
        }
        Msg::Reset | Msg::KeepAlive => {}
    }
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(&b);
    Ok(())
}

/// A frame's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Message kind.
    pub kind: u16,
    /// Sequence number (a reply carries the request's).
    pub seq: u32,
    /// Body bytes.
    pub len: usize,
}

/// Checks a frame header (the first [`HEADER`] bytes).
pub fn header(h: &[u8; HEADER]) -> Result<Header, ProtoError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtoError::Magic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(ProtoError::Version(version));
    }
    let kind = u16::from_le_bytes([h[6], h[7]]);
    if !(K_HELLO..=K_KEEP_ALIVE).contains(&kind) {
        return Err(ProtoError::Kind(kind));
    }
    let len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize;
    if len > MAX_BODY {
        return Err(ProtoError::Length {
            kind,
            len,
            why: "more than 4096",
        });
    }
    Ok(Header {
        kind,
        seq: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        len,
    })
}

/// A cursor over a body that never reads past it.
struct Body<'a>(&'a [u8]);

impl Body<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn bytes(&mut self, n: usize) -> Option<Vec<u8>> {
        if self.0.len() < n {
            return None;
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(a.to_vec())
    }
}

/// Decodes a body of the kind `h` announced.
pub fn decode(h: &Header, body: &[u8]) -> Result<Msg, ProtoError> {
    let kind = h.kind;
    let short = ProtoError::Length {
        kind,
        len: body.len(),
        why: "shorter than its fields",
    };
    let field = |why: String| ProtoError::Field { kind, why };
    let mut b = Body(body);
    let msg = (|| -> Option<Result<Msg, ProtoError>> {
        Some(Ok(match kind {
            K_HELLO => {
                let role = match b.take::<4>()?[0] {
                    0 => Role::Agent,
                    1 => Role::Soc,
                    r => return Some(Err(field(format!("unknown role {r}")))),
                };
                let features = b.u64()?;
                let n = b.u16()? as usize;
                if n > MAX_NAME {
                    return Some(Err(field(format!("name of {n} bytes"))));
                }
                let name = match String::from_utf8(b.bytes(n)?) {
                    Ok(s) => s,
                    Err(_) => return Some(Err(field("name is not UTF-8".into()))),
                };
                Msg::Hello {
                    role,
                    features,
                    name,
                }
            }
            K_DEVICE_INFO => {
                let features = b.u64()?;
                let protocol = b.u64()?;
                let num_queues = b.u16()?;
                let max_queue_size = b.u16()?;
                let n = b.u16()? as usize;
                if n > MAX_CONFIG {
                    return Some(Err(field(format!("configuration of {n} bytes"))));
                }
                if num_queues == 0 || !max_queue_size.is_power_of_two() {
                    return Some(Err(field(format!(
                        "{num_queues} queue(s) of at most {max_queue_size} entries"
                    ))));
                }
                Msg::DeviceInfo {
                    features,
                    protocol,
                    num_queues,
                    max_queue_size,
                    config: b.bytes(n)?,
                }
            }
            K_MEM_TABLE => {
                let n = b.u32()? as usize;
                if n > MAX_REGIONS {
                    return Some(Err(field(format!("{n} regions"))));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let r = MemRegion {
                        guest: b.u64()?,
                        len: b.u64()?,
                        host: b.u64()?,
                    };
                    if r.len == 0
                        || r.guest.checked_add(r.len).is_none()
                        || r.host.checked_add(r.len).is_none()
                    {
                        return Some(Err(field(format!("region {r:x?} is empty or overflows"))));
                    }
                    v.push(r);
                }
                Msg::MemTable(v)
            }
            K_VRING => {
                let queue = b.u16()?;
                let size = b.u16()?;
                let flags = b.u32()?;
                let (desc, avail, used) = (b.u64()?, b.u64()?, b.u64()?);
                let base = b.u16()?;
                b.take::<6>()?;
                if !size.is_power_of_two() || flags > 1 {
                    return Some(Err(field(format!(
                        "queue {queue}: size {size}, flags {flags:#x}"
                    ))));
                }
                Msg::Vring(Vring {
                    queue,
                    size,
                    event_idx: flags == 1,
                    desc,
                    avail,
                    used,
                    base,
                })
            }
            K_VRING_START => Msg::VringStart(b.u16()?),
            K_VRING_STOP => Msg::VringStop(b.u16()?),
            K_KICK => Msg::Kick(b.u16()?),
            K_CALL => Msg::Call(b.u16()?),
            K_INFLIGHT => {
                let host = b.u64()?;
                let size = b.u64()?;
                let num_queues = b.u16()?;
                let queue_size = b.u16()?;
                b.take::<4>()?;
                if host.checked_add(size).is_none()
                    || num_queues == 0
                    || !queue_size.is_power_of_two()
                {
                    return Some(Err(field(format!(
                        "{size} bytes at {host:#x} for {num_queues} queue(s) of {queue_size}"
                    ))));
                }
                Msg::Inflight {
                    host,
                    size,
                    num_queues,
                    queue_size,
                }
            }
            K_SET_CONFIG => {
                let offset = b.u32()?;
                let n = b.u16()? as usize;
                if n > MAX_CONFIG {
                    return Some(Err(field(format!("configuration write of {n} bytes"))));
                }
                Msg::SetConfig {
                    offset,
                    bytes: b.bytes(n)?,
                }
            }
            K_REPLY => {
                let status = b.u32()?;
                b.take::<4>()?;
                Msg::Reply {
                    status,
                    value: b.u64()?,
                }
            }
            K_RESET => Msg::Reset,
            K_KEEP_ALIVE => Msg::KeepAlive,
            k => return Some(Err(ProtoError::Kind(k))),
        }))
    })();
    let msg = match msg {
        None => return Err(short),
        Some(r) => r?,
    };
    if !b.0.is_empty() {
        return Err(ProtoError::Length {
            kind,
            len: body.len(),
            why: "longer than its fields",
        });
    }
    Ok(msg)
}

/// Reassembles frames from a byte stream, holding at most one maximal frame.
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    /// Adds received bytes; returns every complete message, in order, with its sequence
    /// number. After an error the stream cannot be trusted: the caller closes the connection.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<(u32, Msg)>, ProtoError> {
        let mut out = Vec::new();
        loop {
            // Take only what the current frame still needs, so the buffer stays bounded.
            let need = if self.buf.len() < HEADER {
                HEADER - self.buf.len()
            } else {
                let mut h = [0u8; HEADER];
                h.copy_from_slice(&self.buf[..HEADER]);
                HEADER + header(&h)?.len - self.buf.len()
            };
            if need == 0 {
                let mut h = [0u8; HEADER];
                h.copy_from_slice(&self.buf[..HEADER]);
                let hdr = header(&h)?;
                out.push((hdr.seq, decode(&hdr, &self.buf[HEADER..])?));
                self.buf.clear();
                continue;
            }
            if data.is_empty() {
                return Ok(out);
            }
            let n = need.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == HEADER {
                // Check the header as soon as it is complete (a bad one fails fast).
                let mut h = [0u8; HEADER];
                h.copy_from_slice(&self.buf[..HEADER]);
                header(&h)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn every_kind() -> Vec<Msg> {
        vec![
            Msg::Hello {
                role: Role::Agent,
                features: 0,
                name: "agent@host".into(),
            },
            Msg::DeviceInfo {
                features: 0x1_3000_1246,
                protocol: 0x1209,
                num_queues: 2,
                max_queue_size: 1024,
                config: vec![7; 60],
            },
            Msg::MemTable(vec![
                MemRegion {
                    guest: 0,
                    len: 1 << 31,
                    host: 0,
                },
                MemRegion {
                    guest: 1 << 32,
                    len: 1 << 30,
                    host: 1 << 31,
                },
            ]),
            Msg::Vring(Vring {
                queue: 1,
                size: 256,
                event_idx: true,
                desc: 0x1000,
                avail: 0x2000,
                used: 0x3000,
                base: 77,
            }),
            Msg::VringStart(0),
            Msg::VringStop(1),
            Msg::Kick(0),
            Msg::Call(1),
            Msg::Inflight {
                host: 0x4000_0000,
                size: 4224,
                num_queues: 2,
                queue_size: 128,
            },
            Msg::SetConfig {
                offset: 32,
                bytes: vec![1],
            },
            Msg::Reply {
                status: 22,
                value: 9,
            },
            Msg::Reset,
            Msg::KeepAlive,
        ]
    }

    #[test]
    fn every_kind_round_trips_with_its_fixed_layout() {
        for (seq, m) in every_kind().into_iter().enumerate() {
            let mut f = Vec::new();
            encode(&m, seq as u32, &mut f).unwrap();
            let mut h = [0u8; HEADER];
            h.copy_from_slice(&f[..HEADER]);
            let hdr = header(&h).unwrap();
            assert_eq!(hdr.seq, seq as u32);
            assert_eq!(hdr.len, f.len() - HEADER);
            assert_eq!(decode(&hdr, &f[HEADER..]).unwrap(), m);
        }
        // Wire sizes of the fixed-layout kinds.
        let size = |m: &Msg| {
            let mut f = Vec::new();
            encode(m, 0, &mut f).unwrap();
            f.len() - HEADER
        };
        let all = every_kind();
        assert_eq!(size(&all[3]), 40, "Vring");
        assert_eq!(size(&all[8]), 24, "Inflight");
        assert_eq!(size(&all[10]), 16, "Reply");
    }

    #[test]
    fn bad_frames_are_refused_with_a_reason() {
        let mut f = Vec::new();
        encode(&Msg::VringStart(3), 1, &mut f).unwrap();
        let mut h = [0u8; HEADER];
        h.copy_from_slice(&f[..HEADER]);
        let mut bad = h;
        bad[0] = b'X';
        assert!(matches!(header(&bad), Err(ProtoError::Magic(_))));
        let mut bad = h;
        bad[4] = 2;
        assert_eq!(header(&bad), Err(ProtoError::Version(2)));
        let mut bad = h;
        bad[6] = 99;
        assert_eq!(header(&bad), Err(ProtoError::Kind(99)));
        let mut bad = h;
        bad[12..16].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(matches!(header(&bad), Err(ProtoError::Length { .. })));
        // Wrong body lengths for the kind, and fields out of range.
        let hdr = header(&h).unwrap();
        assert!(decode(&hdr, &[0]).is_err());
        assert!(decode(&hdr, &[0, 0, 0]).is_err());
        let vr = Header {
            kind: K_VRING,
            seq: 0,
            len: 40,
        };
        let mut body = [0u8; 40];
        body[2..4].copy_from_slice(&100u16.to_le_bytes());
        assert!(matches!(decode(&vr, &body), Err(ProtoError::Field { .. })));
        let mt = Header {
            kind: K_MEM_TABLE,
            seq: 0,
            len: 4,
        };
        assert!(decode(&mt, &9u32.to_le_bytes()).is_err());
    }

    #[test]
    fn the_framer_reassembles_any_chunking_and_stays_bounded() {
        let mut stream = Vec::new();
        for (seq, m) in every_kind().into_iter().enumerate() {
            encode(&m, seq as u32, &mut stream).unwrap();
        }
        for chunk in [1, 3, 16, 17, 1000, stream.len()] {
            let mut f = Framer::default();
            let mut got = Vec::new();
            for c in stream.chunks(chunk) {
                got.extend(f.push(c).unwrap());
                assert!(f.buf.len() <= HEADER + MAX_BODY);
            }
            assert_eq!(got.len(), every_kind().len());
            assert!(got.iter().map(|(_, m)| m.clone()).eq(every_kind()));
        }
        // A bad header fails as soon as it is complete, before any body is awaited.
        let mut f = Framer::default();
        assert!(f.push(b"LPAG\x01\x00\x63\x00").unwrap().is_empty());
        assert!(f.push(&[0; 8]).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_are_decoded_or_refused_never_trusted(data in prop::collection::vec(any::<u8>(), 0..600), split in any::<usize>()) {
            let mut f = Framer::default();
            let cut = split % (data.len() + 1);
            if let Ok(msgs) = f.push(&data[..cut]) {
                if let Ok(more) = f.push(&data[cut..]) {
                    for (_, m) in msgs.into_iter().chain(more) {
                        // Whatever was accepted encodes back to a frame that decodes the same.
                        let mut out = Vec::new();
                        encode(&m, 0, &mut out).unwrap();
                        let mut h = [0u8; HEADER];
                        h.copy_from_slice(&out[..HEADER]);
                        prop_assert_eq!(decode(&header(&h).unwrap(), &out[HEADER..]).unwrap(), m);
                    }
                }
            }
            prop_assert!(f.buf.len() <= HEADER + MAX_BODY);
        }

        #[test]
        fn valid_frames_survive_byte_flips_without_panics(which in 0usize..13, at in any::<usize>(), bit in 0u8..8) {
            let m = every_kind()[which].clone();
            let mut out = Vec::new();
            encode(&m, 5, &mut out).unwrap();
            let i = at % out.len();
            out[i] ^= 1 << bit;
            let _ = Framer::default().push(&out);
        }
    }
}
