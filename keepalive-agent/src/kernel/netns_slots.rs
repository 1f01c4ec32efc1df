//! The namespaces' counter slots ([`keepalive_ebpf::NetnsCounterSlot`]), mapped into the
//! agent's memory: where the agent places a namespace's counters so that the programs find them
//! without hashing, and reads what the programs added there. Which namespace goes where, and
//! when a slot may be used again, is the caller's (`record::netns_counters`).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use keepalive_ebpf::{NETNS_COUNTER_SLOTS, NetnsCounterSlot, NetnsCounters, NetnsKey, names};

use super::mmapped::{MmapError, MmappedArray};

/// [`names::NETNS_SLOTS_MAP`] mapped read-write.
#[derive(Debug)]
pub(crate) struct NetnsSlotsMap {
    slots: MmappedArray<NetnsCounterSlot>,
}

/// The words of a slot as atomics: the programs add to the counts with atomic adds and read
/// the key with single loads, so every access here is one aligned word.
struct SlotWords<'a> {
    cookie: &'a AtomicU64,
    inum: &'a AtomicU32,
    counters: &'a [AtomicU64; size_of::<NetnsCounters>() / 8],
}

impl NetnsSlotsMap {
    /// Takes the map out of the programs object and maps its values.
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, MmapError> {
        Ok(Self {
            slots: MmappedArray::take(ebpf, names::NETNS_SLOTS_MAP, NETNS_COUNTER_SLOTS)?,
        })
    }

    fn words(&self, index: usize) -> SlotWords<'_> {
        let slot = self.slots.value(index);
        // SAFETY: `slot` is a live, 8-byte aligned value of the mapping (page-aligned, 128-byte
        // elements) for `self`'s lifetime; its words are only ever accessed whole, here and by
        // the programs, so viewing them as atomics of their own size is sound.
        unsafe {
            SlotWords {
                cookie: AtomicU64::from_ptr((&raw mut (*slot).key.cookie).cast()),
                inum: AtomicU32::from_ptr((&raw mut (*slot).key.inum).cast()),
                counters: &*(&raw mut (*slot).counters).cast(),
            }
        }
    }

    /// The namespace slot `index` holds now (an `inum` of 0: none) and its counts.
    pub(crate) fn read(&self, index: usize) -> (NetnsKey, NetnsCounters) {
        let words = self.words(index);
        let key = NetnsKey {
            inum: words.inum.load(Ordering::Acquire),
            cookie: words.cookie.load(Ordering::Relaxed),
            _pad: 0,
        };
        let mut values = [0u64; size_of::<NetnsCounters>() / 8];
        for (value, word) in values.iter_mut().zip(words.counters) {
            *value = word.load(Ordering::Relaxed);
        }
        // SAFETY: `NetnsCounters` is `#[repr(C)]` u64s only, this many of them.
        let counters = unsafe { std::mem::transmute::<[u64; _], NetnsCounters>(values) };
        (key, counters)
    }

    /// Places namespace `key` (inserted by the programs at `created_ns`) in the free slot
    /// `index`: its counts from 0, the inode last, after everything else is visible.
    pub(crate) fn place(&mut self, index: usize, key: NetnsKey, created_ns: u64) {
        let words = self.words(index);
        debug_assert_eq!(
            words.inum.load(Ordering::Relaxed),
            0,
            "slot {index} is taken"
        );
        for word in words.counters {
            word.store(0, Ordering::Relaxed);
        }
        // Word 0 is `created_ns` (asserted in keepalive_ebpf).
        words.counters[0].store(created_ns, Ordering::Relaxed);
        words.cookie.store(key.cookie, Ordering::Relaxed);
        fence(Ordering::Release);
        words.inum.store(key.inum, Ordering::Release);
    }

    /// Frees slot `index`: from now on the programs count its namespace in the hash map again.
    /// Its cookie and stamp are zeroed too. A program's loads of the three are not ordered
    /// (arm64; BPF has no load-acquire before 6.15), nor are these stores to other CPUs (a
    /// partly cleared slot matches no key: that program counts in the hash map); what keeps a
    /// program from seeing the next namespace placed here, which may be this one again after
    /// the retention deleted it, with this one's stamp is the caller's quarantine, by the end
    /// of which every CPU sees these zeros.
    pub(crate) fn clear(&mut self, index: usize) {
        let words = self.words(index);
        words.inum.store(0, Ordering::Release);
        words.cookie.store(0, Ordering::Relaxed);
        words.counters[0].store(0, Ordering::Relaxed);
    }
}
