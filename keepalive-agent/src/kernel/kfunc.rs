//! The kfunc `bpf_rdonly_cast` (6.2+), which the timer programs use to read the socket with
//! typed loads instead of helper calls. aya 0.14 has no kfunc relocation, so the programs call
//! helper number [`RDONLY_CAST_CALL`] (no kernel has it) and [`patch`] rewrites every such call
//! in the programs object into a kfunc call with this kernel's BTF id of `bpf_rdonly_cast`,
//! before aya parses the object. The cast's target type, `struct tcp_sock`, is a load-time
//! constant of the programs (`TCP_SOCK_BTF_ID`).

use btf_rs::{Btf, Type};
use keepalive_ebpf::RDONLY_CAST_CALL;
use object::{Object, ObjectSection, SectionKind};

/// What the typed timer programs need of this kernel's BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RdonlyCast {
    /// The BTF id of the function `bpf_rdonly_cast`: the kfunc call's `imm`.
    pub(crate) func: u32,
    /// The BTF id of `struct tcp_sock`: the cast's second argument.
    pub(crate) tcp_sock: u32,
}

impl RdonlyCast {
    /// Both ids, or `None` where the kernel has no `bpf_rdonly_cast` (before 6.2): the timer
    /// programs then read the socket with helper calls.
    pub(crate) fn resolve(btf: &Btf) -> Option<Self> {
        let id_of = |name: &str, wanted: fn(&Type) -> bool| {
            btf.resolve_ids_by_name(name)
                .ok()?
                .into_iter()
                .find(|&id| btf.resolve_type_by_id(id).is_ok_and(|ty| wanted(&ty)))
        };
        Some(Self {
            func: id_of("bpf_rdonly_cast", |ty| matches!(ty, Type::Func(_)))?,
            tcp_sock: id_of("tcp_sock", |ty| matches!(ty, Type::Struct(_)))?,
        })
    }
}

/// `BPF_JMP | BPF_CALL`.
const CALL: u8 = 0x85;
/// A call's `src_reg` for a kfunc (`BPF_PSEUDO_KFUNC_CALL`), with `off` 0: the kfunc is in the
/// kernel's own BTF.
const PSEUDO_KFUNC_CALL: u8 = 2;
const INSN_BYTES: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the kernel programs object is not a readable ELF file: {0}")]
    Elf(#[from] object::Error),
    #[error(
        "the kernel programs object has no call of bpf_rdonly_cast to rewrite: agent built from \
         mismatched sources"
    )]
    NoCall,
    #[error(
        "the kernel programs object is big-endian; the agent rewrites little-endian BPF only: \
         build it for a little-endian target"
    )]
    BigEndian,
}

/// A copy of `object` with every call of helper [`RDONLY_CAST_CALL`] in its program sections
/// made a call of the kfunc whose BTF id is `func`. Returns the copy and the calls rewritten.
pub(crate) fn patch(object: &[u8], func: u32) -> Result<(Vec<u8>, usize), PatchError> {
    let mut patched = object.to_vec();
    let file = object::File::parse(object)?;
    // The instruction layout below (`src_reg` in the high nibble, `imm` little-endian) is
    // bpfel's; a bpfeb object would never match and the agent would refuse to start with
    // NoCall, which blames the build for the wrong reason.
    if !file.is_little_endian() {
        return Err(PatchError::BigEndian);
    }
    let mut calls = 0;
    for section in file.sections() {
        if section.kind() != SectionKind::Text {
            continue;
        }
        let Some((start, len)) = section.file_range() else {
            continue;
        };
        let (Ok(start), Ok(len)) = (usize::try_from(start), usize::try_from(len)) else {
            continue;
        };
        let Some(code) = patched.get_mut(start..start.saturating_add(len)) else {
            continue;
        };
        for insn in code.chunks_exact_mut(INSN_BYTES) {
            // code, dst_reg:4 | src_reg:4, off (i16), imm (i32), little-endian.
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]);
            if insn[0] == CALL && insn[1] == 0 && imm == RDONLY_CAST_CALL {
                insn[1] = PSEUDO_KFUNC_CALL << 4;
                insn[2..4].copy_from_slice(&0i16.to_le_bytes());
                insn[4..8].copy_from_slice(&func.to_le_bytes());
                calls += 1;
            }
        }
    }
    if calls == 0 {
        return Err(PatchError::NoCall);
    }
    Ok((patched, calls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::programs::PROGRAMS_OBJECT;

    /// The instructions of the object's program sections that `matches` accepts.
    fn count(object: &[u8], matches: impl Fn(&[u8]) -> bool) -> usize {
        let file = object::File::parse(object).unwrap();
        file.sections()
            .filter(|s| s.kind() == SectionKind::Text)
            .map(|s| {
                s.data()
                    .unwrap()
                    .chunks_exact(INSN_BYTES)
                    .filter(|insn| matches(insn))
                    .count()
            })
            .sum()
    }

    fn imm(insn: &[u8]) -> i32 {
        i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]])
    }

    /// The raw calls left in the object's program sections.
    fn raw_calls(object: &[u8]) -> usize {
        count(object, |insn| {
            insn[0] == CALL && imm(insn) == RDONLY_CAST_CALL
        })
    }

    #[test]
    fn every_cast_in_the_programs_becomes_a_kfunc_call_and_nothing_else_changes() {
        let before = raw_calls(PROGRAMS_OBJECT);
        assert!(before >= 2, "entry and exit each cast: {before}");
        let (patched, calls) = patch(PROGRAMS_OBJECT, 12345).unwrap();
        assert_eq!(calls, before);
        assert_eq!(raw_calls(&patched), 0);
        let changed: Vec<usize> = PROGRAMS_OBJECT
            .iter()
            .zip(&patched)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        // Per call: src_reg, and the four bytes of imm at most.
        assert!(
            changed.len() <= calls * 5,
            "{} bytes changed",
            changed.len()
        );
        let kfunc_calls = count(&patched, |insn| {
            insn[0] == CALL && insn[1] == PSEUDO_KFUNC_CALL << 4 && imm(insn) == 12345
        });
        assert_eq!(kfunc_calls, calls);
    }

    /// The rewrite checked against the kernel's instruction encoding written out, not against
    /// this module's constants: `85 20 00 00 <imm le>` is `call` with `src_reg` 2
    /// (`BPF_PSEUDO_KFUNC_CALL` in include/uapi/linux/bpf.h) and `off` 0, and the object still
    /// parses as aya parses it before loading (sections, BTF, relocations).
    #[test]
    fn the_rewritten_calls_are_kfunc_calls_in_the_kernels_encoding_and_aya_parses_the_object() {
        let func: u32 = 0x0001_e240;
        let (patched, calls) = patch(PROGRAMS_OBJECT, func).unwrap();
        let expected = [0x85, 0x20, 0x00, 0x00, 0x40, 0xe2, 0x01, 0x00];
        assert_eq!(count(&patched, |insn| insn == expected), calls);
        aya_obj::Object::parse(&patched).expect("aya parses the rewritten object");
    }

    /// `resolve` finds the ids aya's own BTF parser finds for the same names and kinds, on a
    /// kernel with the kfunc, and nothing on kernels before it (6.2).
    #[test]
    fn resolve_returns_the_ids_of_the_kfunc_and_of_tcp_sock() {
        use crate::kernel::layout::fixtures::fixture_bytes;
        use aya_obj::btf::BtfKind;
        let name = "6.18.44_6.18.44-fc-v1045.btf.zst";
        let bytes = fixture_bytes(name);
        let cast = RdonlyCast::resolve(&Btf::from_bytes(&bytes).unwrap()).expect(name);
        let aya = aya_obj::btf::Btf::parse(&bytes, object::Endianness::Little).unwrap();
        assert_eq!(
            cast.func,
            aya.id_by_type_name_kind("bpf_rdonly_cast", BtfKind::Func)
                .unwrap()
        );
        assert_eq!(
            cast.tcp_sock,
            aya.id_by_type_name_kind("tcp_sock", BtfKind::Struct)
                .unwrap()
        );
        assert_ne!(cast.func, cast.tcp_sock);
        for old in [
            "5.10.262_5.10.0-46-cloud-amd64.btf.zst",
            "6.1.192_6.1.0-57-cloud-amd64.btf.zst",
        ] {
            let btf = Btf::from_bytes(&fixture_bytes(old)).unwrap();
            assert_eq!(RdonlyCast::resolve(&btf), None, "{old}");
        }
    }

    #[test]
    fn an_object_without_the_call_is_refused() {
        let file = object::File::parse(PROGRAMS_OBJECT).unwrap();
        let mut stripped = PROGRAMS_OBJECT.to_vec();
        for section in file.sections().filter(|s| s.kind() == SectionKind::Text) {
            let (start, len) = section.file_range().unwrap();
            stripped[start as usize..(start + len) as usize].fill(0);
        }
        assert!(matches!(patch(&stripped, 1), Err(PatchError::NoCall)));
        assert!(matches!(patch(b"not an ELF", 1), Err(PatchError::Elf(_))));
    }
}
