//! Asynchronous events (Base Specification 2.0, section 5.2): the host keeps up to AERL + 1
//! Asynchronous Event Request commands outstanding; the controller completes one when an event
//! it enabled (Asynchronous Event Configuration) occurs. An event reported once is masked until
//! the host reads its log page with RAE cleared, so a host is never flooded.

use super::config::ControllerKind;
use super::features::aec;
use super::logs::lid;
use super::{Controller, Reply, AER_LIMIT_EXCEEDED};
use leap_queues::{Sqe, Status};
use std::collections::VecDeque;

/// Asynchronous Event Type "Notice" (figure 146).
const TYPE_NOTICE: u32 = 2;
/// Notice information: Namespace Attribute Changed (figure 150).
const NOTICE_NAMESPACE_ATTRIBUTE: u32 = 0x00;
/// Notice information: Discovery Log Page Change (figure 150).
const NOTICE_DISCOVERY_LOG_CHANGE: u32 = 0xf0;

/// An event the controller reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// The Changed Namespace List has new entries.
    NamespaceAttribute,
    /// The Discovery log changed.
    DiscoveryLogChange,
}

impl Event {
    fn mask_bit(self) -> u8 {
        match self {
            Event::NamespaceAttribute => 1 << 0,
            Event::DiscoveryLogChange => 1 << 1,
        }
    }
    /// Completion dword 0: event type (2:0), event information (15:8), log page (23:16).
    fn dw0(self) -> u32 {
        let (info, log) = match self {
            Event::NamespaceAttribute => (NOTICE_NAMESPACE_ATTRIBUTE, lid::CHANGED_NS),
            Event::DiscoveryLogChange => (NOTICE_DISCOVERY_LOG_CHANGE, lid::DISCOVERY),
        };
        TYPE_NOTICE | info << 8 | (log as u32) << 16
    }
}

/// Held requests, events waiting for one, and the events reported but not yet cleared.
#[derive(Debug, Default)]
pub(super) struct Events {
    held: VecDeque<u16>,
    pending: VecDeque<Event>,
    masked: u8,
}

impl Events {
    /// Queues `e` unless it is already reported or queued.
    fn raise(&mut self, e: Event) {
        if self.masked & e.mask_bit() == 0 {
            self.masked |= e.mask_bit();
            self.pending.push_back(e);
        }
    }
    /// The host read the event's log page with RAE cleared: it may be reported again.
    pub fn unmask(&mut self, e: Event) {
        // A queued but not yet delivered event stays queued (and masked).
        if !self.pending.contains(&e) {
            self.masked &= !e.mask_bit();
        }
    }
    /// Drops everything; returns the held commands' identifiers.
    pub fn reset(&mut self) -> Vec<u16> {
        self.pending.clear();
        self.masked = 0;
        self.held.drain(..).collect()
    }
    #[cfg(test)]
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

impl Controller {
    /// Asynchronous Event Request: completes at once if an event is waiting, else is held; more
    /// than AERL + 1 outstanding is refused.
    pub(super) fn async_event_request(&mut self, sqe: &Sqe) -> Result<Reply, super::Fail> {
        let cid = sqe.cid();
        if self.events.held.contains(&cid) {
            return Err(Status::CID_CONFLICT.into());
        }
        if let Some(e) = self.events.pending.pop_front() {
            return Ok(Reply::Done(super::Done {
                dw0: e.dw0(),
                bytes: 0,
            }));
        }
        if self.events.held.len() > self.cfg.aerl as usize {
            return Err(AER_LIMIT_EXCEEDED.into());
        }
        self.events.held.push_back(cid);
        Ok(Reply::Held)
    }

    /// A held Asynchronous Event Request to complete now, with success and this dword 0, when
    /// an event is waiting. The transport calls it after anything that may raise an event
    /// ([`Controller::notify_namespace_changed`], [`Controller::notify_discovery_changed`],
    /// [`Controller::set_namespaces`]) until it returns `None`.
    pub fn take_event_completion(&mut self) -> Option<(u16, u32)> {
        if self.events.held.is_empty() {
            return None;
        }
        let e = self.events.pending.pop_front()?;
        let cid = self.events.held.pop_front()?;
        Some((cid, e.dw0()))
    }

    /// The identifiers of the held Asynchronous Event Requests, oldest first.
    pub fn held_event_requests(&self) -> impl Iterator<Item = u16> + '_ {
        self.events.held.iter().copied()
    }

    /// Namespace `nsid` was attached, detached or changed: adds it to the Changed Namespace List
    /// and, if the host enabled Namespace Attribute Notices (Asynchronous Event Configuration
    /// bit 8), raises a Notice (type 2, information 00h, log page 04h) unless one is already
    /// outstanding. Ignored by discovery controllers.
    pub fn notify_namespace_changed(&mut self, nsid: u32) {
        if self.cfg.kind != ControllerKind::Io || nsid == 0 {
            return;
        }
        self.changed.add(nsid);
        if self.features.aec & aec::NAMESPACE_ATTRIBUTE != 0 {
            self.events.raise(Event::NamespaceAttribute);
        }
    }

    /// The Discovery log changed: raises a Discovery Log Page Change notice (information F0h,
    /// log page 70h) if the host enabled it (Asynchronous Event Configuration bit 31). Ignored by
    /// I/O controllers.
    pub fn notify_discovery_changed(&mut self) {
        if self.cfg.kind == ControllerKind::Discovery
            && self.features.aec & aec::DISCOVERY_LOG_CHANGE != 0
        {
            self.events.raise(Event::DiscoveryLogChange);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::AdminOutcome;
    use super::*;
    use crate::exec::Namespaces;
    use leap_queues::nvme::{admin, feature};

    fn aer(cid: u16) -> Sqe {
        Sqe::new(admin::ASYNC_EVENT_REQUEST, cid)
    }

    fn enable_events(c: &mut Controller, bits: u32) {
        let mut s = cmd(admin::SET_FEATURES);
        s.set_cdw(10, feature::ASYNC_EVENT_CONFIG as u32);
        s.set_cdw(11, bits);
        assert_eq!(run(c, &s).0, Status::SUCCESS);
    }

    fn read_changed(c: &mut Controller, rae: bool) {
        let mut s = cmd(admin::GET_LOG_PAGE);
        s.set_cdw(
            10,
            lid::CHANGED_NS as u32 | (1023 << 16) | (rae as u32) << 15,
        );
        assert_eq!(run(c, &s).0, Status::SUCCESS);
    }

    const NS_NOTICE: u32 = 0x0004_0002;

    #[test]
    fn requests_are_held_up_to_the_limit() {
        // Arrange: AERL 3, so four may be outstanding.
        let mut c = io_controller();
        // Act
        let outcomes: Vec<_> = (1..=5)
            .map(|cid| c.admin(&aer(cid), &[], &mut []))
            .collect();
        // Assert
        assert!(outcomes[..4].iter().all(|o| *o == AdminOutcome::Held));
        assert_eq!(outcomes[4].status(), Some(AER_LIMIT_EXCEEDED));
        assert_eq!(
            c.held_event_requests().collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            c.admin(&aer(2), &[], &mut []).status(),
            Some(Status::CID_CONFLICT)
        );
    }

    #[test]
    fn a_namespace_change_completes_a_held_request() {
        // Arrange
        let mut c = io_controller();
        enable_events(&mut c, 1 << 8);
        assert_eq!(c.admin(&aer(10), &[], &mut []), AdminOutcome::Held);
        assert_eq!(c.admin(&aer(11), &[], &mut []), AdminOutcome::Held);
        // Act
        c.notify_namespace_changed(1);
        c.notify_namespace_changed(2);
        // Assert: one notice, on the oldest request; the second change is masked.
        assert_eq!(c.take_event_completion(), Some((10, NS_NOTICE)));
        assert_eq!(c.take_event_completion(), None);
        // Reading the log with RAE keeps the mask; without RAE it is re-armed.
        read_changed(&mut c, true);
        c.notify_namespace_changed(3);
        assert_eq!(c.take_event_completion(), None);
        read_changed(&mut c, false);
        c.notify_namespace_changed(4);
        assert_eq!(c.take_event_completion(), Some((11, NS_NOTICE)));
    }

    #[test]
    fn an_event_waits_for_a_request() {
        // Arrange: an event before any request.
        let mut c = io_controller();
        enable_events(&mut c, 1 << 8);
        c.notify_namespace_changed(1);
        assert_eq!(c.take_event_completion(), None);
        // Act
        let o = c.admin(&aer(3), &[], &mut []);
        // Assert
        assert_eq!(
            o,
            AdminOutcome::Complete {
                status: Status::SUCCESS,
                dw0: NS_NOTICE,
                dw1: 0,
                bytes: 0
            }
        );
    }

    #[test]
    fn disabled_events_are_not_reported() {
        let mut c = io_controller();
        assert_eq!(c.admin(&aer(1), &[], &mut []), AdminOutcome::Held);
        c.notify_namespace_changed(1);
        assert_eq!(c.take_event_completion(), None);
        assert_eq!(c.changed.list(), vec![1], "the list is kept anyway");
        c.notify_discovery_changed();
        assert_eq!(c.take_event_completion(), None);
    }

    #[test]
    fn discovery_log_changes_are_reported_to_discovery_hosts() {
        // Arrange
        let mut d = enabled(discovery_config(), Namespaces::new(vec![]));
        enable_events(&mut d, 1 << 31);
        assert_eq!(d.admin(&aer(1), &[], &mut []), AdminOutcome::Held);
        assert_eq!(d.admin(&aer(2), &[], &mut []), AdminOutcome::Held);
        // Act
        d.notify_discovery_changed();
        d.notify_namespace_changed(1);
        // Assert
        assert_eq!(d.take_event_completion(), Some((1, 0x0070_f002)));
        assert_eq!(d.take_event_completion(), None);
    }
}
