//! A `BPF_F_MMAPABLE` array's values mapped into the agent's memory: where the agent and the
//! programs share words they both write (the marks of tracked connections, the namespaces'
//! counter slots) without a syscall per access.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::{
    Ebpf,
    maps::{Map, MapData},
};

#[derive(Debug, thiserror::Error)]
pub enum MmapError {
    #[error("the kernel programs object has no array map {0}: agent built from mismatched sources")]
    Missing(&'static str),
    #[error(
        "the kernel programs' map {map} holds {entries} values of {value_size} bytes, where the \
         agent expects {len} of {size}: agent built from mismatched sources"
    )]
    Layout {
        map: &'static str,
        entries: u32,
        value_size: u32,
        len: usize,
        size: usize,
    },
    #[error("cannot read the kernel programs' map {map}: {source}")]
    Info {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "cannot map the kernel programs' map {map} into memory: {source}; the kernel needs \
         BPF_F_MMAPABLE arrays (5.5+)"
    )]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The values of an array map of `T`, `len` of them, mapped read-write. Owns the map (its
/// descriptor) and the mapping; the element type's size is a multiple of 8, so the values lie
/// side by side as the kernel lays them out.
pub(crate) struct MmappedArray<T> {
    values: NonNull<T>,
    len: usize,
    bytes: usize,
    _map: MapData,
}

impl<T> std::fmt::Debug for MmappedArray<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MmappedArray({} values at {:p})", self.len, self.values)
    }
}

// SAFETY: the mapping belongs to this value alone on the agent's side (the programs write it
// too, with the same whole-word stores its owners use).
unsafe impl<T> Send for MmappedArray<T> {}

impl<T> MmappedArray<T> {
    /// Takes array `name` out of the programs object and maps its `len` values.
    pub(crate) fn take(ebpf: &mut Ebpf, name: &'static str, len: usize) -> Result<Self, MmapError> {
        const { assert!(size_of::<T>().is_multiple_of(8)) };
        let Some(Map::Array(map)) = ebpf.take_map(name) else {
            return Err(MmapError::Missing(name));
        };
        let info = map
            .info()
            .map_err(|source| MmapError::Info { map: name, source })?;
        if info.max_entries() as usize != len || info.value_size() as usize != size_of::<T>() {
            return Err(MmapError::Layout {
                map: name,
                entries: info.max_entries(),
                value_size: info.value_size(),
                len,
                size: size_of::<T>(),
            });
        }
        let mmap_error = |source| MmapError::Mmap { map: name, source };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (size_of::<T>() * len).div_ceil(page) * page;
        // SAFETY: a new shared mapping of the map's values (an mmapable array maps its values
        // from offset 0, page-aligned, and is at least `bytes` long); nothing else is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(mmap_error(std::io::Error::last_os_error()));
        }
        let values = NonNull::new(addr.cast())
            .ok_or_else(|| mmap_error(std::io::Error::other("mmap returned a null address")))?;
        Ok(Self {
            values,
            len,
            bytes,
            _map: map,
        })
    }

    /// Value `index`, which the programs may write while the agent holds it: access it through
    /// volatile or atomic loads and stores only.
    ///
    /// # Panics
    /// When `index` is not below the length given to [`Self::take`].
    pub(crate) fn value(&self, index: usize) -> *mut T {
        assert!(index < self.len, "value {index} of {}", self.len);
        // SAFETY: inside the mapping (checked above), which lives as long as `self`.
        unsafe { self.values.as_ptr().add(index) }
    }
}

impl<T> Drop for MmappedArray<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `take`, unmapped once.
        unsafe {
            libc::munmap(self.values.as_ptr().cast(), self.bytes);
        }
    }
}
