//! The Identify command (Base Specification 2.0, section 5.17): controller, namespaces, active
//! namespace list, namespace identification descriptors, and the two structures an NVMe 2.0
//! host may ask for (I/O Command Set specific controller for the NVM command set, I/O Command
//! Set independent namespace).

use super::config::ControllerKind;
use super::features::has_volatile_cache;
use super::logs::ERROR_LOG_ENTRIES;
use super::{at, Controller, Done, Fail};
use crate::exec::Namespace;
use leap_queues::identify::{
    oncs, sgls, FabricsAttributes, IdentifyController, IdentifyNamespace, IDENTIFY_SIZE,
};
use leap_queues::nvme::cns;
use leap_queues::{Sqe, Status};
use std::sync::Arc;

/// CNS 06h: I/O Command Set specific Identify Controller (figure 273).
pub const CNS_CS_CONTROLLER: u8 = 0x06;
/// CNS 08h: I/O Command Set Independent Identify Namespace (figure 273).
pub const CNS_CS_INDEPENDENT_NAMESPACE: u8 = 0x08;

/// Log Page Attributes bit 2: extended data for Get Log Page (NUMDU, LPOL/LPOU offsets).
const LPA_EXTENDED_DATA: u8 = 1 << 2;
/// Optional Asynchronous Events Supported (figure 275): Namespace Attribute Notices.
const OAES_NAMESPACE_ATTRIBUTE: u32 = 1 << 8;
/// Optional Asynchronous Events Supported: Discovery Log Page Change Notices.
const OAES_DISCOVERY_LOG_CHANGE: u32 = 1 << 31;

/// Namespace Identification Descriptor types (Base Specification 2.0, figure 279).
pub mod nidt {
    /// IEEE Extended Unique Identifier, 8 bytes.
    pub const EUI64: u8 = 1;
    /// Namespace Globally Unique Identifier, 16 bytes.
    pub const NGUID: u8 = 2;
    /// Namespace UUID, 16 bytes.
    pub const UUID: u8 = 3;
    /// Command Set Identifier, 1 byte.
    pub const CSI: u8 = 4;
}

/// The identifiers of a namespace, derived from the subsystem NQN and the NSID, so every
/// controller of the subsystem (and every restart of leapd) reports the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceIds {
    /// NGUID.
    pub nguid: [u8; 16],
    /// EUI-64, with the locally administered bit set (no IEEE OUI is behind it).
    pub eui64: [u8; 8],
    /// An RFC 9562 version 8 (custom) UUID.
    pub uuid: [u8; 16],
}

/// FNV-1a over `parts`, then a SplitMix64 finaliser so every input bit reaches every output bit.
fn hash64(tag: u8, subnqn: &str, nsid: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = [tag]
        .into_iter()
        .chain(subnqn.bytes())
        .chain([0])
        .chain(nsid.to_le_bytes());
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl NamespaceIds {
    /// The identifiers of namespace `nsid` of subsystem `subnqn`.
    pub fn derive(subnqn: &str, nsid: u32) -> NamespaceIds {
        let word = |tag| hash64(tag, subnqn, nsid).to_be_bytes();
        let mut nguid = [0u8; 16];
        nguid[..8].copy_from_slice(&word(1));
        nguid[8..].copy_from_slice(&word(2));
        let mut eui64 = word(3);
        // Unicast, locally administered (IEEE 802 U/L bit).
        eui64[0] = (eui64[0] & !0x01) | 0x02;
        let mut uuid = [0u8; 16];
        uuid[..8].copy_from_slice(&word(4));
        uuid[8..].copy_from_slice(&word(5));
        uuid[6] = (uuid[6] & 0x0f) | 0x80; // version 8
        uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC variant
        NamespaceIds { nguid, eui64, uuid }
    }
}

/// Copies a structure to the start of `out`: Data SGL Length Invalid when `out` is shorter.
fn put(out: &mut [u8], data: &[u8]) -> Result<Done, Fail> {
    let dst = out
        .get_mut(..data.len())
        .ok_or(Fail::from(Status::SGL_LENGTH_INVALID))?;
    dst.copy_from_slice(data);
    Ok(Done {
        dw0: 0,
        bytes: data.len(),
    })
}

/// The 4096-byte window at the start of `out`, zeroed.
fn page(out: &mut [u8]) -> Result<&mut [u8], Fail> {
    let p = out
        .get_mut(..IDENTIFY_SIZE)
        .ok_or(Fail::from(Status::SGL_LENGTH_INVALID))?;
    p.fill(0);
    Ok(p)
}

/// Writes the NSIDs of `ids` (increasing) that are greater than `after` into a zeroed NSID list
/// `p`, as many as fit.
fn nsid_list(ids: impl Iterator<Item = u32>, after: u32, p: &mut [u8]) {
    for (slot, id) in p.chunks_exact_mut(4).zip(ids.filter(|&id| id > after)) {
        slot.copy_from_slice(&id.to_le_bytes());
    }
}

const PAGE: Done = Done {
    dw0: 0,
    bytes: IDENTIFY_SIZE,
};

impl Controller {
    /// The Identify Controller data structure this controller reports (CNS 01h; figure 275).
    pub fn identify_controller(&self) -> IdentifyController {
        let cfg = &self.cfg;
        let io = cfg.kind == ControllerKind::Io;
        let mut oncs_bits = oncs::SAVE_FEATURES;
        if io {
            for (_, n) in self.namespaces.iter() {
                if n.info().discard {
                    oncs_bits |= oncs::DSM;
                }
                if n.info().write_zeroes {
                    oncs_bits |= oncs::WRITE_ZEROES;
                }
            }
        }
        let mut c =
            IdentifyController::new(cfg.vid, cfg.ssvid, &cfg.serial, &cfg.model, &cfg.firmware)
                .with_mdts(cfg.mdts)
                .with_cntlid(self.cntlid)
                .with_nn(if io { self.namespaces.max_nsid() } else { 0 })
                .with_oncs(oncs_bits)
                .with_vwc(io && has_volatile_cache(&self.namespaces))
                // NVMe over Fabrics 1.1, section 2.3.1: fabrics use SGLs; NVMe/TCP moves data with
                // Transport SGL Data Blocks and in-capsule data with Offset descriptors. Linux refuses
                // a fabrics controller reporting SGLS 0.
                .with_sgls(sgls::SUPPORTED | sgls::OFFSET | sgls::TRANSPORT_DATA_BLOCK)
                .with_crdt(cfg.crdt)
                .with_kas(cfg.kas)
                .with_maxcmd(cfg.queue_entries().min(u16::MAX as u32) as u16)
                .with_cmic(0)
                .with_subnqn(&cfg.subnqn)
                .with_fabrics(FabricsAttributes {
                    ioccsz: cfg.ioccsz,
                    iorcsz: cfg.iorcsz,
                    icdoff: cfg.icdoff,
                    // Bit 0 clear: dynamic controller model (a controller per Connect).
                    fcatt: 0,
                    // NVMe/TCP carries one data block descriptor per command.
                    msdbd: 1,
                });
        c.cntrltype = cfg.kind.cntrltype();
        c.aerl = cfg.aerl;
        c.lpa = LPA_EXTENDED_DATA;
        c.elpe = (ERROR_LOG_ENTRIES - 1) as u8;
        let oaes = if io {
            OAES_NAMESPACE_ATTRIBUTE
        } else {
            OAES_DISCOVERY_LOG_CHANGE
        };
        c.oaes = oaes.to_le();
        c
    }

    /// The Identify Namespace data structure of `ns` (CNS 00h; NVM Command Set 1.0, figure 97).
    pub fn identify_namespace(
        &self,
        nsid: u32,
        ns: &Namespace,
    ) -> Result<IdentifyNamespace, Status> {
        let info = ns.info();
        let shift = u8::try_from(info.block_shift()).map_err(|_| Status::INTERNAL_ERROR)?;
        let mut id =
            IdentifyNamespace::new(ns.blocks(), shift).map_err(|_| Status::INTERNAL_ERROR)?;
        if info.discard {
            // Leap's back ends read zeroes from deallocated blocks; Write Zeroes with DEAC
            // deallocates when the back end has native Write Zeroes.
            id = id.with_thin_provisioning(ns.blocks());
            id.dlfeat = if info.write_zeroes { 0b1001 } else { 0b0001 };
        }
        let ids = NamespaceIds::derive(&self.cfg.subnqn, nsid);
        Ok(id
            .with_write_protected(info.read_only)
            .with_nguid(ids.nguid)
            .with_eui64(ids.eui64))
    }

    /// Identify (Base Specification 2.0, section 5.17). Discovery controllers answer only CNS
    /// 01h (NVMe over Fabrics 1.1, section 5.2).
    pub(super) fn identify(&self, sqe: &Sqe, out: &mut [u8]) -> Result<Done, Fail> {
        let io = self.cfg.kind == ControllerKind::Io;
        match sqe.cdw(10) as u8 {
            cns::CONTROLLER => put(out, self.identify_controller().as_bytes()),
            cns::NAMESPACE if io => match self.namespace_for_identify(sqe)? {
                Some(ns) => {
                    let id = self.identify_namespace(sqe.nsid(), &ns)?;
                    put(out, id.as_bytes())
                }
                // Section 5.17.2.1: an inactive NSID returns a zero filled structure.
                None => put(out, IdentifyNamespace::zeroed().as_bytes()),
            },
            cns::ACTIVE_NS_LIST if io => self.active_ns_list(sqe, out),
            cns::NS_DESCRIPTORS if io => self.ns_descriptors(sqe, out),
            CNS_CS_CONTROLLER if io => {
                // Figure 273: CSI in CDW11 bits 31:24. The NVM command set's structure (NVM
                // Command Set 1.0, figure 99) with every limit 0: no limit beyond MDTS.
                if sqe.cdw(11) >> 24 != 0 {
                    return Err(Fail::field(at::CDW11 + 3));
                }
                page(out)?;
                Ok(PAGE)
            }
            CNS_CS_INDEPENDENT_NAMESPACE if io => {
                let ns = self.namespace_for_identify(sqe)?;
                let p = page(out)?;
                if let Some(ns) = ns {
                    self.independent_namespace(&ns, p);
                }
                Ok(PAGE)
            }
            _ => Err(Fail::field(at::CDW10)),
        }
    }

    /// The namespace an Identify addresses: `None` for an allocated but inactive NSID, Invalid
    /// Namespace or Format for NSID 0 or above NN (including FFFFFFFFh, which needs namespace
    /// management).
    fn namespace_for_identify(&self, sqe: &Sqe) -> Result<Option<Arc<Namespace>>, Fail> {
        let nsid = sqe.nsid();
        if nsid == 0 || nsid > self.namespaces.max_nsid() {
            return Err(Fail::at(Status::INVALID_NAMESPACE, at::NSID, 0));
        }
        Ok(self.namespaces.get(nsid).cloned())
    }

    /// CNS 02h: up to 1024 active NSIDs greater than the command's NSID, increasing, zero
    /// terminated (section 5.17.2.3).
    fn active_ns_list(&self, sqe: &Sqe, out: &mut [u8]) -> Result<Done, Fail> {
        let after = sqe.nsid();
        if after >= 0xffff_fffe {
            return Err(Fail::at(Status::INVALID_NAMESPACE, at::NSID, 0));
        }
        nsid_list(self.namespaces.iter().map(|(id, _)| id), after, page(out)?);
        Ok(PAGE)
    }

    /// CNS 03h: EUI-64, NGUID, UUID and CSI descriptors of an active namespace (section
    /// 5.17.2.4, figure 278).
    fn ns_descriptors(&self, sqe: &Sqe, out: &mut [u8]) -> Result<Done, Fail> {
        let nsid = sqe.nsid();
        if self.namespace_for_identify(sqe)?.is_none() {
            return Err(Fail::at(Status::INVALID_NAMESPACE, at::NSID, 0));
        }
        let ids = NamespaceIds::derive(&self.cfg.subnqn, nsid);
        let p = page(out)?;
        let mut at = 0usize;
        let descriptors: [(u8, &[u8]); 4] = [
            (nidt::EUI64, &ids.eui64),
            (nidt::NGUID, &ids.nguid),
            (nidt::UUID, &ids.uuid),
            (nidt::CSI, &[0]), // NVM command set
        ];
        for (ty, id) in descriptors {
            // Header: NIDT, NIDL, two reserved bytes; then the identifier.
            p[at] = ty;
            p[at + 1] = id.len() as u8;
            p[at + 4..at + 4 + id.len()].copy_from_slice(id);
            at += 4 + id.len();
        }
        Ok(PAGE)
    }

    /// CNS 08h (Base Specification 2.0, figure 280): NMIC, NSATTR and NSTAT (ready). NVMe 2.0
    /// hosts (Linux since 6.x) read it before Identify Namespace.
    fn independent_namespace(&self, ns: &Namespace, p: &mut [u8]) {
        let info = ns.info();
        // NSFEAT bit 5 (VWCNP, NVMe 2.1): this namespace has no volatile write cache even though
        // the controller reports one; Linux then skips Flush for it.
        if !info.volatile_cache && has_volatile_cache(&self.namespaces) {
            p[0] |= 1 << 5;
        }
        p[8] = info.read_only as u8; // NSATTR: write protected
        p[14] = 1; // NSTAT: namespace ready
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use crate::backend::DiskInfo;
    use crate::exec::Namespaces;
    use leap_queues::identify::nsfeat;

    fn two_namespaces() -> Controller {
        enabled(
            io_config(),
            Namespaces::new(vec![
                ns(disk(1 << 20, 512)),
                ns(DiskInfo {
                    discard: true,
                    write_zeroes: true,
                    volatile_cache: true,
                    max_transfer: 0,
                    read_only: true,
                    ..disk(8 << 20, 4096)
                }),
            ]),
        )
    }

    #[test]
    fn identify_controller_reports_the_subsystem() {
        // Arrange
        let mut c = two_namespaces();
        // Act
        let (status, _, b) = run(&mut c, &identify(cns::CONTROLLER, 0));
        // Assert
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(b.len(), IDENTIFY_SIZE);
        let id = IdentifyController::from_bytes(b.as_slice().try_into().unwrap());
        assert_eq!(&b[4..12], b"LEAP0001");
        assert_eq!(&b[24..41], b"Leap virtual NVMe");
        assert_eq!(b[77], 8, "MDTS");
        assert_eq!(id.cntlid_value(), 7);
        assert_eq!(id.ver_value(), 0x0002_0000);
        assert_eq!(b[111], 1, "CNTRLTYPE: I/O controller");
        assert_eq!(
            (id.crdt_value(1), id.crdt_value(2), id.crdt_value(3)),
            (1, 10, 100)
        );
        assert_eq!(b[259], 3, "AERL");
        assert_eq!(b[261] & LPA_EXTENDED_DATA, LPA_EXTENDED_DATA);
        assert_eq!(b[262] as usize, ERROR_LOG_ENTRIES - 1, "ELPE");
        assert_eq!(le32(&b, 92), OAES_NAMESPACE_ATTRIBUTE);
        assert_eq!(le16(&b, 320), 10, "KAS");
        assert_eq!((b[512], b[513]), (0x66, 0x44), "SQES/CQES");
        assert_eq!(le16(&b, 514), 128, "MAXCMD");
        assert_eq!(id.nn_value(), 2);
        assert_eq!(
            id.oncs_value(),
            oncs::DSM | oncs::WRITE_ZEROES | oncs::SAVE_FEATURES
        );
        assert_eq!(b[525] & 1, 1, "VWC");
        assert_ne!(id.sgls_value(), 0);
        assert_eq!(
            id.sgls_value(),
            sgls::SUPPORTED | sgls::OFFSET | sgls::TRANSPORT_DATA_BLOCK
        );
        assert_eq!(id.subnqn_str(), Some("nqn.2026-01.io.leap:test"));
        assert_eq!(b[76], 0, "CMIC");
        assert_eq!(le32(&b, 1792), 4 + 512, "IOCCSZ");
        assert_eq!(le32(&b, 1796), 1, "IORCSZ");
        assert_eq!(le16(&b, 1800), 0, "ICDOFF");
        assert_eq!(b[1803], 1, "MSDBD");
    }

    #[test]
    fn identify_controller_without_optional_namespace_features() {
        let mut c = io_controller();
        let (_, _, b) = run(&mut c, &identify(cns::CONTROLLER, 0));
        let id = IdentifyController::from_bytes(b.as_slice().try_into().unwrap());
        assert_eq!(id.oncs_value(), oncs::SAVE_FEATURES);
        assert_eq!(b[525], 0, "no volatile write cache");
        assert_eq!(id.nn_value(), 1);
    }

    #[test]
    fn identify_discovery_controller() {
        // Arrange
        let mut d = enabled(
            discovery_config(),
            Namespaces::single(ns(disk(1 << 20, 512))),
        );
        // Act
        let (status, _, b) = run(&mut d, &identify(cns::CONTROLLER, 0));
        // Assert
        assert_eq!(status, Status::SUCCESS);
        let id = IdentifyController::from_bytes(b.as_slice().try_into().unwrap());
        assert_eq!(b[111], 2, "CNTRLTYPE: discovery controller");
        assert_eq!(id.nn_value(), 0);
        assert_eq!(
            id.subnqn_str(),
            Some("nqn.2014-08.org.nvmexpress.discovery")
        );
        assert_ne!(id.sgls_value(), 0);
        assert_eq!(le32(&b, 92), OAES_DISCOVERY_LOG_CHANGE);
        for c in [cns::NAMESPACE, cns::ACTIVE_NS_LIST, cns::NS_DESCRIPTORS] {
            assert_eq!(run(&mut d, &identify(c, 1)).0, Status::INVALID_FIELD);
        }
    }

    #[test]
    fn identify_namespace_describes_the_disk() {
        // Arrange
        let mut c = two_namespaces();
        // Act
        let (s1, _, plain) = run(&mut c, &identify(cns::NAMESPACE, 1));
        let (s2, _, rich) = run(&mut c, &identify(cns::NAMESPACE, 2));
        // Assert
        assert_eq!((s1, s2), (Status::SUCCESS, Status::SUCCESS));
        let plain = IdentifyNamespace::from_bytes(plain.as_slice().try_into().unwrap());
        assert_eq!(plain.nsze_value(), 2048);
        assert_eq!(u64::from_le(plain.ncap), 2048);
        assert_eq!(plain.block_size(), Some(512));
        assert_eq!((plain.nsfeat, plain.dlfeat, plain.nsattr), (0, 0, 0));
        let rich_ns = IdentifyNamespace::from_bytes(rich.as_slice().try_into().unwrap());
        assert_eq!(rich_ns.nsze_value(), 2048);
        assert_eq!(rich_ns.block_size(), Some(4096));
        assert_eq!(rich_ns.nlbaf, 0, "one LBA format");
        assert_eq!(
            rich_ns.nsfeat & nsfeat::THIN_PROVISIONING,
            nsfeat::THIN_PROVISIONING
        );
        assert_eq!(rich_ns.dlfeat, 0b1001);
        assert_eq!(rich_ns.nsattr, 1, "read-only disk is write protected");
        let ids = NamespaceIds::derive("nqn.2026-01.io.leap:test", 2);
        assert_eq!(rich_ns.nguid, ids.nguid);
        assert_eq!(rich_ns.eui64, ids.eui64);
        assert_ne!(plain.nguid, rich_ns.nguid);
    }

    #[test]
    fn identify_namespace_checks_the_nsid() {
        // Arrange
        let mut c = enabled(io_config(), Namespaces::new(vec![ns(disk(1 << 20, 512))]));
        // Act / Assert
        for nsid in [0, 2, 0xffff_ffff] {
            assert_eq!(
                run(&mut c, &identify(cns::NAMESPACE, nsid)).0,
                Status::INVALID_NAMESPACE,
                "{nsid}"
            );
            assert_eq!(
                run(&mut c, &identify(CNS_CS_INDEPENDENT_NAMESPACE, nsid)).0,
                Status::INVALID_NAMESPACE,
                "{nsid}"
            );
        }
    }

    #[test]
    fn active_namespace_list_skips_holes() {
        // Arrange: NSIDs 1, 3 and 6 active. (`Namespaces` has no public constructor with holes
        // yet, so the list builder is tested on its own.)
        let active = [1u32, 3, 6];
        let mut all = [0u8; IDENTIFY_SIZE];
        let mut after3 = [0u8; IDENTIFY_SIZE];
        let mut after6 = [0u8; IDENTIFY_SIZE];
        // Act
        nsid_list(active.into_iter(), 0, &mut all);
        nsid_list(active.into_iter(), 3, &mut after3);
        nsid_list(active.into_iter(), 6, &mut after6);
        // Assert
        assert_eq!(
            (le32(&all, 0), le32(&all, 4), le32(&all, 8), le32(&all, 12)),
            (1, 3, 6, 0)
        );
        assert_eq!((le32(&after3, 0), le32(&after3, 4)), (6, 0));
        assert!(after6.iter().all(|&b| b == 0));
    }

    #[test]
    fn active_namespace_list_through_admin() {
        let mut c = two_namespaces();
        let (status, _, b) = run(&mut c, &identify(cns::ACTIVE_NS_LIST, 0));
        assert_eq!(status, Status::SUCCESS);
        assert_eq!((le32(&b, 0), le32(&b, 4), le32(&b, 8)), (1, 2, 0));
        let (_, _, b) = run(&mut c, &identify(cns::ACTIVE_NS_LIST, 1));
        assert_eq!((le32(&b, 0), le32(&b, 4)), (2, 0));
        for nsid in [0xffff_fffe, 0xffff_ffff] {
            assert_eq!(
                run(&mut c, &identify(cns::ACTIVE_NS_LIST, nsid)).0,
                Status::INVALID_NAMESPACE
            );
        }
    }

    #[test]
    fn active_namespace_list_holds_at_most_1024() {
        let table = Namespaces::new((0..1500).map(|_| ns(disk(4096, 512))).collect());
        let mut c = enabled(io_config(), table);
        let (_, _, b) = run(&mut c, &identify(cns::ACTIVE_NS_LIST, 0));
        assert_eq!(le32(&b, 4092), 1024);
        let (_, _, b) = run(&mut c, &identify(cns::ACTIVE_NS_LIST, 1024));
        assert_eq!(
            (le32(&b, 0), le32(&b, 4 * 475), le32(&b, 4 * 476)),
            (1025, 1500, 0)
        );
    }

    #[test]
    fn namespace_descriptors_list_the_identifiers() {
        // Arrange
        let mut c = enabled(
            io_config(),
            Namespaces::new((0..3).map(|_| ns(disk(1 << 20, 512))).collect()),
        );
        let ids = NamespaceIds::derive("nqn.2026-01.io.leap:test", 3);
        // Act
        let (status, _, b) = run(&mut c, &identify(cns::NS_DESCRIPTORS, 3));
        // Assert
        assert_eq!(status, Status::SUCCESS);
        assert_eq!(&b[0..4], &[nidt::EUI64, 8, 0, 0]);
        assert_eq!(&b[4..12], &ids.eui64);
        assert_eq!(&b[12..16], &[nidt::NGUID, 16, 0, 0]);
        assert_eq!(&b[16..32], &ids.nguid);
        assert_eq!(&b[32..36], &[nidt::UUID, 16, 0, 0]);
        assert_eq!(&b[36..52], &ids.uuid);
        assert_eq!(&b[52..57], &[nidt::CSI, 1, 0, 0, 0]);
        assert!(b[57..].iter().all(|&x| x == 0), "terminated by a zero NIDT");
        for nsid in [0, 4, 7, 0xffff_ffff] {
            assert_eq!(
                run(&mut c, &identify(cns::NS_DESCRIPTORS, nsid)).0,
                Status::INVALID_NAMESPACE
            );
        }
    }

    #[test]
    fn namespace_ids_are_stable_and_well_formed() {
        let a = NamespaceIds::derive("nqn.a", 1);
        assert_eq!(a, NamespaceIds::derive("nqn.a", 1));
        assert_ne!(a, NamespaceIds::derive("nqn.a", 2));
        assert_ne!(a, NamespaceIds::derive("nqn.b", 1));
        assert_eq!(a.eui64[0] & 0x03, 0x02);
        assert_eq!(a.uuid[6] >> 4, 8);
        assert_eq!(a.uuid[8] >> 6, 0b10);
        assert_ne!(a.nguid, [0; 16]);
    }

    #[test]
    fn nvme_2_0_structures() {
        // Arrange
        let mut c = two_namespaces();
        let mut cs = identify(CNS_CS_CONTROLLER, 0);
        // Act / Assert: the NVM command set's controller structure, all limits 0.
        let (status, _, b) = run(&mut c, &cs);
        assert_eq!((status, b.len()), (Status::SUCCESS, IDENTIFY_SIZE));
        assert!(b.iter().all(|&x| x == 0));
        cs.set_cdw(11, 2 << 24); // CSI 2: zoned namespaces
        assert_eq!(run(&mut c, &cs).0, Status::INVALID_FIELD);
        // Command set independent namespace: ready, VWC not present on NSID 1, NSID 2 RO.
        let (_, _, one) = run(&mut c, &identify(CNS_CS_INDEPENDENT_NAMESPACE, 1));
        let (_, _, two) = run(&mut c, &identify(CNS_CS_INDEPENDENT_NAMESPACE, 2));
        assert_eq!((one[0], one[8], one[14]), (1 << 5, 0, 1));
        assert_eq!((two[0], two[8], two[14]), (0, 1, 1));
    }

    #[test]
    fn unknown_cns_and_short_buffers_are_refused() {
        let mut c = io_controller();
        for cns in [0x04, 0x05, 0x07, 0x10, 0x1c, 0xff] {
            assert_eq!(
                run(&mut c, &identify(cns, 1)).0,
                Status::INVALID_FIELD,
                "{cns:#x}"
            );
        }
        assert_eq!(
            run_with(&mut c, &identify(cns::CONTROLLER, 0), &[], 4095).0,
            Status::SGL_LENGTH_INVALID
        );
        let (status, _, b) = run_with(&mut c, &identify(cns::CONTROLLER, 0), &[], 8192);
        assert_eq!((status, b.len()), (Status::SUCCESS, IDENTIFY_SIZE));
    }
}
