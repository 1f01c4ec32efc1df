//! A kernel's BTF from its bzImage (setup header → compressed payload → vmlinux ELF → `.BTF`),
//! and the few layout facts the matrix prints from it.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, Result, bail, ensure};
use btf_rs::{Btf, Type};

use super::pipe_through;

/// The raw `.BTF` section of the kernel in `bzimage`.
pub(super) fn from_bzimage(bzimage: &[u8]) -> Result<Vec<u8>> {
    let payload = payload(bzimage)?;
    let vmlinux = decompress(payload)?;
    let btf = elf_section(&vmlinux, ".BTF")?;
    ensure!(
        btf.get(..2) == Some(&[0x9f, 0xeb][..]),
        "the .BTF section does not start with the BTF magic"
    );
    Ok(btf.to_vec())
}

/// The compressed kernel inside a bzImage (Documentation/arch/x86/boot.rst): the protected-mode
/// part starts after `setup_sects + 1` sectors, `payload_offset`/`payload_length` (boot protocol
/// 2.08+) locate the compressed vmlinux within it.
fn payload(image: &[u8]) -> Result<&[u8]> {
    let u32_at = |at: usize| -> Result<u32> {
        Ok(u32::from_le_bytes(
            image
                .get(at..at + 4)
                .context("bzImage header truncated")?
                .try_into()?,
        ))
    };
    ensure!(
        image.get(0x202..0x206) == Some(b"HdrS".as_slice()),
        "not a bzImage (no HdrS setup header)"
    );
    let protocol = u16::from_le_bytes(image[0x206..0x208].try_into()?);
    ensure!(
        protocol >= 0x208,
        "boot protocol {protocol:#x} predates payload_offset (2.08)"
    );
    let setup_sects = match image[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + usize::try_from(u32_at(0x248)?)?;
    let length = usize::try_from(u32_at(0x24c)?)?;
    image
        .get(start..start + length)
        .context("payload_offset/payload_length point outside the bzImage")
}

/// Decompresses the payload with the matching command-line tool. x86's build appends the
/// uncompressed size as 4 little-endian bytes (arch/x86/boot/compressed/mkpiggy.c reads it from
/// there), which no decompressor expects: they are cut off and checked against the output.
fn decompress(payload: &[u8]) -> Result<Vec<u8>> {
    ensure!(payload.len() > 8, "payload too short");
    let (stream, size) = payload.split_at(payload.len() - 4);
    let size = u32::from_le_bytes(size.try_into()?) as usize;
    let (tool, args, package): (&str, &[&str], &str) = match stream {
        [0x1f, 0x8b, ..] => ("gzip", &["-dc"], "gzip"),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => ("xz", &["-dc", "--single-stream"], "xz-utils"),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => ("zstd", &["-dcq"], "zstd"),
        [0x5d, 0, 0, ..] => ("xz", &["-dc", "--format=lzma"], "xz-utils"),
        [b'B', b'Z', b'h', ..] => ("bzip2", &["-dc"], "bzip2"),
        [0x02, 0x21, 0x4c, 0x18, ..] => ("lz4", &["-dc"], "lz4"),
        [a, b, c, d, ..] => {
            bail!("unknown kernel compression (payload starts {a:02x} {b:02x} {c:02x} {d:02x})")
        }
        _ => bail!("payload too short"),
    };
    let out = pipe_through(Command::new(tool).args(args), stream, package)?;
    ensure!(
        out.status.success(),
        "{tool} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    ensure!(
        out.stdout.len() == size,
        "{tool} produced {} bytes, the bzImage says {size}",
        out.stdout.len()
    );
    Ok(out.stdout)
}

/// The bytes of section `name` in a little-endian ELF64 file.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<&'a [u8]> {
    ensure!(
        elf.get(..6) == Some(b"\x7fELF\x02\x01".as_slice()),
        "the decompressed kernel is not a little-endian ELF64 vmlinux"
    );
    let u16_at = |at: usize| -> Result<usize> {
        Ok(usize::from(u16::from_le_bytes(
            elf.get(at..at + 2).context("ELF truncated")?.try_into()?,
        )))
    };
    let u32_at = |at: usize| -> Result<usize> {
        Ok(usize::try_from(u32::from_le_bytes(
            elf.get(at..at + 4).context("ELF truncated")?.try_into()?,
        ))?)
    };
    let u64_at = |at: usize| -> Result<usize> {
        Ok(usize::try_from(u64::from_le_bytes(
            elf.get(at..at + 8).context("ELF truncated")?.try_into()?,
        ))?)
    };
    // e_shoff 0x28, e_shentsize 0x3a, e_shnum 0x3c, e_shstrndx 0x3e; in a section header
    // sh_name +0, sh_offset +0x18, sh_size +0x20.
    let (shoff, shentsize, shnum, shstrndx) =
        (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?, u16_at(0x3e)?);
    let header = |index: usize| shoff + index * shentsize;
    let section = |index: usize| -> Result<&'a [u8]> {
        let (offset, size) = (u64_at(header(index) + 0x18)?, u64_at(header(index) + 0x20)?);
        elf.get(offset..offset + size)
            .context("section outside the file")
    };
    let names = section(shstrndx)?;
    for index in 0..shnum {
        let at = u32_at(header(index))?;
        let this = names
            .get(at..)
            .and_then(|rest| rest.split(|&b| b == 0).next())
            .context("section name outside .shstrtab")?;
        if this == name.as_bytes() {
            return section(index);
        }
    }
    bail!("vmlinux has no {name} section (kernel built without CONFIG_DEBUG_INFO_BTF?)")
}

/// What the matrix reports about a kernel's layout and hooks, read from its BTF.
#[derive(Debug, Clone)]
pub(super) struct Facts {
    /// `inet_connection_sock.icsk_keepalive_timer` exists (backport or 6.19+).
    pub keepalive_timer_member: bool,
    /// `inet_connection_sock.icsk_retransmit_timer` exists (everything before 6.19).
    pub retransmit_timer_member: bool,
    /// Arguments of the `tcp_send_reset` tracepoint (2 before 6.10: sk, skb; 3 with reason).
    pub send_reset_args: Option<usize>,
    /// Every BTF tracepoint the kernel has (`btf_trace_<name>` typedefs): a hook the agent did
    /// not attach although its tracepoint is here is the agent's failure, not the kernel's.
    pub tracepoints: BTreeSet<String>,
    /// The kfunc `bpf_rdonly_cast` (6.2+) is in the kernel's BTF: the agent's timer programs
    /// must load their typed variants.
    pub rdonly_cast: bool,
}

impl Facts {
    pub(super) fn from_btf(raw: &[u8]) -> Result<Facts> {
        let btf = Btf::from_bytes(raw).map_err(|e| anyhow::anyhow!("parsing BTF: {e}"))?;
        let icsk = btf
            .resolve_types_by_name("inet_connection_sock")
            .map_err(|e| anyhow::anyhow!("no struct inet_connection_sock in BTF: {e}"))?
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) => Some(s),
                _ => None,
            })
            .context("inet_connection_sock is not a struct in BTF")?;
        let mut members = Vec::new();
        member_names(&btf, &icsk, &mut members)?;
        let tracepoints = btf
            .resolve_types_by_regex(&regex::Regex::new("^btf_trace_")?)
            .map_err(|e| anyhow::anyhow!("listing btf_trace_ typedefs: {e}"))?
            .iter()
            .filter_map(|t| match t {
                Type::Typedef(t) => btf.resolve_name(t).ok(),
                _ => None,
            })
            .filter_map(|name| name.strip_prefix("btf_trace_").map(str::to_owned))
            .collect();
        let rdonly_cast = btf
            .resolve_types_by_name("bpf_rdonly_cast")
            .is_ok_and(|types| types.iter().any(|t| matches!(t, Type::Func(_))));
        Ok(Facts {
            tracepoints,
            rdonly_cast,
            keepalive_timer_member: members.iter().any(|m| m == "icsk_keepalive_timer"),
            retransmit_timer_member: members.iter().any(|m| m == "icsk_retransmit_timer"),
            send_reset_args: tracepoint_args(&btf, "tcp_send_reset"),
        })
    }

    /// Which timer is which, as the kernel notes' table names the layouts.
    pub(super) fn timer_layout(&self) -> String {
        let layout = match (self.keepalive_timer_member, self.retransmit_timer_member) {
            (false, true) => "keepalive timer = sock.sk_timer, write timer = icsk_retransmit_timer",
            (true, true) => {
                "keepalive timer = icsk_keepalive_timer, write timer = icsk_retransmit_timer \
                 (stable backport layout)"
            }
            (true, false) => "keepalive timer = icsk_keepalive_timer, write timer = sock.sk_timer",
            (false, false) => "no TCP timer member found",
        };
        format!("BTF: {layout}")
    }

    /// The hook-relevant difference: `tcp_send_reset(sk, skb)` or `(sk, skb, reason)`.
    pub(super) fn hooks(&self) -> String {
        match self.send_reset_args {
            Some(2) => "tcp_send_reset(sk, skb)".to_owned(),
            Some(3) => "tcp_send_reset(sk, skb, reason)".to_owned(),
            Some(n) => format!("tcp_send_reset with {n} args"),
            None => "no tcp_send_reset".to_owned(),
        }
    }
}

/// Names of `s`'s members, descending into anonymous structs and unions (where the backport put
/// `icsk_keepalive_timer`, next to `mptcp_tout_timer`).
fn member_names(btf: &Btf, s: &btf_rs::Struct, out: &mut Vec<String>) -> Result<()> {
    for member in &s.members {
        let name = btf
            .resolve_name(member)
            .map_err(|e| anyhow::anyhow!("member name: {e}"))?;
        if name.is_empty() {
            match btf
                .resolve_chained_type(member)
                .map_err(|e| anyhow::anyhow!("member type: {e}"))?
            {
                Type::Struct(inner) | Type::Union(inner) => member_names(btf, &inner, out)?,
                _ => {}
            }
        } else {
            out.push(name);
        }
    }
    Ok(())
}

/// The tracepoint's argument count as a BTF program sees it (`btf_trace_<name>` is a pointer to
/// a prototype whose first parameter is the tracepoint's `void *data`, not an argument).
fn tracepoint_args(btf: &Btf, tracepoint: &str) -> Option<usize> {
    let typedef = btf
        .resolve_types_by_name(&format!("btf_trace_{tracepoint}"))
        .ok()?
        .into_iter()
        .find_map(|t| match t {
            Type::Typedef(t) => Some(t),
            _ => None,
        })?;
    let mut current = btf.resolve_chained_type(&typedef).ok()?;
    loop {
        current = match current {
            Type::Ptr(p) => btf.resolve_chained_type(&p).ok()?,
            Type::FuncProto(proto) => return Some(proto.parameters.len().saturating_sub(1)),
            _ => return None,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write as _, process::Stdio};

    use super::*;

    /// A minimal ELF64 with a section-name table and one named section.
    fn tiny_elf(section: &str, data: &[u8]) -> Vec<u8> {
        let names = format!("\0.shstrtab\0{section}\0");
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_at = elf.len();
        elf.extend_from_slice(names.as_bytes());
        let data_at = elf.len();
        elf.extend_from_slice(data);
        let shoff = elf.len();
        let mut header = |name: u32, offset: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        header(0, 0, 0);
        header(1, names_at, names.len());
        header(11, data_at, data.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf
    }

    #[test]
    fn finds_a_section_by_name() {
        let elf = tiny_elf(".BTF", b"\x9f\xeb\x01");
        assert_eq!(elf_section(&elf, ".BTF").expect("found"), b"\x9f\xeb\x01");
        assert!(elf_section(&elf, ".data").is_err());
        assert!(elf_section(b"MZ", ".BTF").is_err());
    }

    #[test]
    fn gzip_payload_with_size_trailer_decompresses_and_is_checked() {
        let original = b"vmlinux bytes ".repeat(100);
        let mut gz = Command::new("gzip")
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("gzip runs (apt-get install gzip)");
        gz.stdin
            .take()
            .expect("stdin")
            .write_all(&original)
            .expect("write");
        let mut payload = gz.wait_with_output().expect("gzip").stdout;
        let mut wrong = payload.clone();
        payload.extend_from_slice(&(original.len() as u32).to_le_bytes());
        assert_eq!(decompress(&payload).expect("decompresses"), original);
        wrong.extend_from_slice(&7u32.to_le_bytes());
        assert!(
            decompress(&wrong).is_err(),
            "a wrong size trailer is caught"
        );
    }

    /// The stored fixtures (`cargo xtask vm --update-btf-fixtures`) parse, and between them
    /// cover what the agent must handle: both timer layouts before 6.19 and both
    /// `tcp_send_reset` prototypes.
    #[test]
    fn btf_fixtures_cover_both_timer_layouts_and_both_reset_prototypes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(super::super::fixtures::FIXTURE_DIR);
        let mut facts = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("fixture directory") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "zst") {
                let out = Command::new("zstd")
                    .arg("-dcq")
                    .arg(&path)
                    .output()
                    .expect("zstd runs (apt-get install zstd)");
                assert!(out.status.success(), "{}", path.display());
                facts.push(Facts::from_btf(&out.stdout).expect("fixture parses"));
            }
        }
        let layout = |f: &Facts| (f.keepalive_timer_member, f.retransmit_timer_member);
        assert!(
            facts.iter().any(|f| layout(f) == (false, true)),
            "no sk_timer layout"
        );
        assert!(
            facts.iter().any(|f| layout(f) == (true, true)),
            "no backport layout"
        );
        assert!(facts.iter().any(|f| f.send_reset_args == Some(2)));
        assert!(facts.iter().any(|f| f.send_reset_args == Some(3)));
        assert!(
            facts
                .iter()
                .all(|f| f.tracepoints.contains("timer_expire_entry"))
        );
    }
}
