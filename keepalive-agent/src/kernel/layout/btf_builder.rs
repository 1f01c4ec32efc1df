//! Emits raw BTF (the format of `/sys/kernel/btf/vmlinux`, see the kernel's
//! Documentation/bpf/btf.rst), so the resolver can be tested on layouts this machine does not
//! run.

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_FUNC_PROTO: u32 = 13;

/// A struct/union member: byte offset, or bit offset and width for bitfields.
pub(super) struct M {
    name: String,
    ty: u32,
    bit_offset: u32,
    bits: u32,
}

/// A plain member at a byte offset.
pub(super) fn m(name: &str, ty: u32, byte_offset: u32) -> M {
    M {
        name: name.to_string(),
        ty,
        bit_offset: byte_offset * 8,
        bits: 0,
    }
}

/// A bitfield member.
pub(super) fn bf(name: &str, ty: u32, bit_offset: u32, bits: u32) -> M {
    M {
        name: name.to_string(),
        ty,
        bit_offset,
        bits,
    }
}

pub(super) struct BtfBuilder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl BtfBuilder {
    pub(super) fn new() -> Self {
        Self {
            types: Vec::new(),
            // Offset 0 is the empty string (anonymous types and members).
            strings: vec![0],
            next_id: 1,
        }
    }

    fn str(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let offset = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        offset
    }

    fn word(&mut self, v: u32) {
        self.types.extend_from_slice(&v.to_le_bytes());
    }

    /// Writes a `struct btf_type` header and returns the new type's id.
    fn header(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, size_type: u32) -> u32 {
        let name_off = self.str(name);
        self.word(name_off);
        self.word((u32::from(kflag) << 31) | (kind << 24) | vlen);
        self.word(size_type);
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub(super) fn int(&mut self, name: &str, size: u32, signed: bool) -> u32 {
        let id = self.header(name, KIND_INT, 0, false, size);
        // encoding (bits 24-27) | offset (16-23) | nr_bits (0-7)
        self.word((u32::from(signed) << 24) | (size * 8));
        id
    }

    pub(super) fn ptr(&mut self, target: u32) -> u32 {
        self.header("", KIND_PTR, 0, false, target)
    }

    pub(super) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
        let id = self.header("", KIND_ARRAY, 0, false, 0);
        self.word(elem);
        self.word(index);
        self.word(n);
        id
    }

    pub(super) fn typedef(&mut self, name: &str, target: u32) -> u32 {
        self.header(name, KIND_TYPEDEF, 0, false, target)
    }

    pub(super) fn volatile(&mut self, target: u32) -> u32 {
        self.header("", KIND_VOLATILE, 0, false, target)
    }

    pub(super) fn constant(&mut self, target: u32) -> u32 {
        self.header("", KIND_CONST, 0, false, target)
    }

    /// A function prototype: return type, then the parameters' (name, type).
    pub(super) fn func_proto(&mut self, ret: u32, params: &[(&str, u32)]) -> u32 {
        let id = self.header("", KIND_FUNC_PROTO, params.len() as u32, false, ret);
        for (name, ty) in params {
            let name_off = self.str(name);
            self.word(name_off);
            self.word(*ty);
        }
        id
    }

    fn composite(&mut self, kind: u32, name: &str, size: u32, members: &[M]) -> u32 {
        // As pahole does: a struct containing bitfields sets kind_flag, and then every
        // member's offset carries its bitfield size in the top 8 bits (0 = not a bitfield).
        let kflag = members.iter().any(|m| m.bits != 0);
        let id = self.header(name, kind, members.len() as u32, kflag, size);
        for member in members {
            let name_off = self.str(&member.name);
            self.word(name_off);
            self.word(member.ty);
            self.word(if kflag {
                (member.bits << 24) | member.bit_offset
            } else {
                member.bit_offset
            });
        }
        id
    }

    pub(super) fn structure(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
        self.composite(KIND_STRUCT, name, size, members)
    }

    pub(super) fn union(&mut self, name: &str, size: u32, members: &[M]) -> u32 {
        self.composite(KIND_UNION, name, size, members)
    }

    pub(super) fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) -> u32 {
        let id = self.header(name, KIND_ENUM, values.len() as u32, false, 4);
        for (value_name, value) in values {
            let name_off = self.str(value_name);
            self.word(name_off);
            self.word(*value);
        }
        id
    }

    /// The raw BTF blob: header, type section, string section.
    pub(super) fn build(self) -> Vec<u8> {
        const HDR_LEN: u32 = 24;
        let type_len = self.types.len() as u32;
        let mut out = Vec::new();
        out.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        out.push(1); // version
        out.push(0); // flags
        for v in [HDR_LEN, 0, type_len, type_len, self.strings.len() as u32] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}
