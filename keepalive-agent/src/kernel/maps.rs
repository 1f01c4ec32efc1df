//! Taking a typed map out of the loaded programs object, for every room of `kernel/` that owns
//! maps (the hooks' and the audit's).

use aya::{
    Ebpf,
    maps::{Map, MapError},
};

#[derive(Debug, thiserror::Error)]
pub enum TakeMapError {
    #[error("the kernel programs object has no map {0}: agent built from mismatched sources")]
    Missing(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
}

/// Takes map `name` out of the object as the typed map `T`.
pub(crate) fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, TakeMapError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(TakeMapError::Missing(name))?;
    T::try_from(map).map_err(|source| TakeMapError::Map { name, source })
}
