//! Every NVMe/TCP and Fabrics decoder on bytes a peer controls: the common-header check under
//! parameters drawn from the input, each PDU decoder and validator on whatever passes, the IC
//! exchange, Connect command and data, properties, and the discovery log. Nothing may panic, and
//! what `check` accepts must describe a consistent layout.
#![no_main]

use leap_runtime::nvmf::fabrics::{
    decode_discovery_log, ConnectCmd, ConnectData, DiscoveryEntry, PropertyGet, PropertySet,
};
use leap_runtime::nvmf::pdu::{self, CommonHeader, Limits, Params, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (knobs, pdu_bytes) = data.split_at(4);
    let params = Params {
        hdgst: knobs[0] & 1 != 0,
        ddgst: knobs[0] & 2 != 0,
        cpda: knobs[1] & 31,
        hpda: knobs[2] & 31,
        maxh2cdata: 4096 << (knobs[3] & 7),
        maxr2t: 0,
    };
    let limits = Limits {
        max_icd: 8192,
        max_plen: 1 << 20,
    };
    for role in [Role::Controller, Role::Host] {
        let Some(ch) = CommonHeader::from_prefix(pdu_bytes) else { continue };
        let Ok(layout) = pdu::check(&ch, role, &params, &limits) else { continue };
        assert_eq!(
            layout.header_len as u64 + layout.rest_len(),
            layout.plen as u64,
            "a checked layout adds up"
        );
        let hdr = pdu_bytes.get(..layout.header_len).unwrap_or(pdu_bytes);
        if layout.hdgst {
            let _ = pdu::verify_hdgst(hdr);
        }
        if let Ok(sqe) = pdu::decode_capsule_cmd(hdr) {
            let _ = pdu::check_in_capsule(&sqe, &layout);
            if let Some(c) = ConnectCmd::from_sqe(&sqe) {
                let _ = c.validate(127);
            }
            let _ = PropertyGet::from_sqe(&sqe);
            let _ = PropertySet::from_sqe(&sqe);
        }
        let _ = pdu::decode_capsule_resp(hdr);
        if let Ok(d) = pdu::decode_data_hdr(hdr) {
            let _ = d.validate(&layout, u32::from_le_bytes([knobs[0], knobs[1], knobs[2], 0]));
        }
        if let Ok(r) = pdu::decode_r2t(hdr) {
            let _ = r.validate(1 << 20);
        }
        let _ = pdu::decode_term(hdr);
    }
    let _ = pdu::IcReq::decode(pdu_bytes);
    let _ = pdu::IcResp::decode(pdu_bytes);
    let _ = ConnectData::decode(pdu_bytes);
    let _ = DiscoveryEntry::decode(pdu_bytes);
    if let Ok((_, entries)) = decode_discovery_log(pdu_bytes) {
        for e in entries.take(64) {
            let _ = e;
        }
    }
});
