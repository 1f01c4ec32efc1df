//! The kernel's marks of which connections the agent's table may hold
//! ([`keepalive_ebpf::TrackedMarks`]), mapped into the agent's memory. The programs mark a
//! connection at an expiry that puts it in the table; the agent moves the epochs on and marks,
//! in the new epoch, every connection its table holds ([`TrackedMarksMap::renew`]). A mark three
//! epochs old is a connection the table no longer holds (closed unseen, evicted, its records
//! lost): its close stays in the kernel again, as if it had never probed. Without the renewal
//! the marks only accumulated, and with them the closes sent: after some 100 000 distinct
//! probing connections, nearly every close of a keepalive connection.

use keepalive_ebpf::{TRACKED_SLOTS, TrackedEpochs, TrackedMarks, names, tracked_slot};

use super::mmapped::{MmapError, MmappedArray};

/// [`TrackedMarks`] mapped read-write. Owns the map and the mapping.
#[derive(Debug)]
pub struct TrackedMarksMap {
    marks: MmappedArray<TrackedMarks>,
}

impl TrackedMarksMap {
    /// Takes the map out of the programs object and maps its value.
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MmapError> {
        Ok(Self {
            marks: MmappedArray::take(ebpf, names::TRACKED_MAP, 1)?,
        })
    }

    /// The epochs the programs read now.
    pub(crate) fn epochs(&self) -> TrackedEpochs {
        // SAFETY: the mapping is live and aligned (page); one aligned `u32` load, as the
        // programs do.
        TrackedEpochs::from_bits(unsafe {
            std::ptr::read_volatile((&raw const (*self.marks.value(0)).epochs).cast::<u32>())
        })
    }

    /// Starts the next epoch, then marks in it the connections with these ports (remote,
    /// local), which the table holds. A connection the programs marked in an earlier epoch,
    /// whose record the table had not taken in when this renewal read it, is still held by
    /// that mark until the next renewal marks it from the table. Returns the new epochs.
    pub(crate) fn renew(&mut self, ports: impl IntoIterator<Item = (u16, u16)>) -> TrackedEpochs {
        let epochs = self.epochs().next();
        let marks = self.marks.value(0);
        // SAFETY: the mapping is live for `self`'s lifetime; the epochs are one aligned `u32`,
        // stored at once so no program reads some moved and others not; each slot is a
        // byte below `TRACKED_SLOTS` (`tracked_slot` masks it), stored whole as the programs
        // store it.
        unsafe {
            std::ptr::write_volatile((&raw mut (*marks).epochs).cast::<u32>(), epochs.to_bits());
            let slots = (&raw mut (*marks).slots).cast::<u8>();
            let mark = epochs.mark();
            for (remote, local) in ports {
                let slot = slots.add(tracked_slot(remote, local));
                if std::ptr::read_volatile(slot) != mark {
                    std::ptr::write_volatile(slot, mark);
                }
            }
        }
        epochs
    }

    /// How many slots hold a mark of a live epoch: the connections the table held at the last
    /// renewal (less those sharing a slot) and those the programs marked since. A close of a
    /// keepalive connection the agent does not track finds its slot held, and is sent, in this
    /// share of the [`TRACKED_SLOTS`] cases.
    pub(crate) fn held(&self) -> usize {
        let epochs = self.epochs();
        // SAFETY: the mapping is live for `self`'s lifetime.
        let slots = unsafe { (&raw const (*self.marks.value(0)).slots).cast::<u8>() };
        (0..TRACKED_SLOTS)
            // SAFETY: `i < TRACKED_SLOTS`, inside the mapping; a whole-byte load, as the
            // programs store them.
            .filter(|&i| epochs.holds(unsafe { std::ptr::read_volatile(slots.add(i)) }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_holds_for_its_epoch_and_the_next_two_then_lets_go() {
        let mut epochs = TrackedEpochs::default();
        let first = epochs.mark();
        assert_ne!(first, 0, "0 is a slot never marked");
        assert!(epochs.holds(first));
        assert!(!epochs.holds(0));
        for _ in 0..2 {
            epochs = epochs.next();
            assert!(
                epochs.holds(first),
                "{epochs:?}: an earlier epoch's mark still holds"
            );
            assert!(epochs.holds(epochs.mark()));
        }
        epochs = epochs.next();
        assert!(!epochs.holds(first), "three epochs old: let go");
    }

    #[test]
    fn epochs_wrap_without_ever_marking_zero() {
        let mut epochs = TrackedEpochs::default();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..600 {
            let before = epochs;
            epochs = epochs.next();
            assert_ne!(epochs.mark(), 0);
            assert!(epochs.current <= TrackedEpochs::LAST);
            assert!(epochs.holds(before.mark()), "{before:?} → {epochs:?}");
            assert!(!epochs.next().next().next().holds(epochs.mark()));
            assert_eq!(TrackedEpochs::from_bits(epochs.to_bits()), epochs);
            seen.insert(epochs.current);
        }
        assert_eq!(seen.len(), usize::from(TrackedEpochs::LAST) + 1);
    }

    #[test]
    fn ports_in_turn_get_slots_side_by_side() {
        let slots: Vec<usize> = (0..4096u16)
            .map(|port| tracked_slot(443, 32768 + port))
            .collect();
        assert!(slots.iter().all(|&slot| slot < TRACKED_SLOTS));
        // 64 blocks in turn take 64 lines of the 512.
        let distinct: std::collections::HashSet<usize> = slots.iter().copied().collect();
        assert_eq!(distinct.len(), slots.len());
        // A block's ports share a cache line: Linux takes ephemeral ports to one peer 2 apart,
        // plus a random even step up to 14 since 5.19, so 4 to 32 connections per line.
        let lines: std::collections::HashSet<usize> = slots
            .iter()
            .step_by(2)
            .take(32)
            .map(|slot| slot / 64)
            .collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        // Ports in turn to 80 and to 443 do not pair up slot for slot, as XORed ports would
        // (a port to 80 and the port XORed with 80 ^ 443 to 443).
        let shared = (0..4096u16)
            .map(|port| 32768 + port)
            .filter(|&port| tracked_slot(80, port) == tracked_slot(443, port ^ 80 ^ 443))
            .count();
        assert!(shared < 100, "{shared} of 4096 pairs share a slot");
    }
}
