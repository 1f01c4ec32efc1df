//! Where the agent's kernel programs spend their time, by source line: `perf record -a -g`
//! samples (`perf script`'s text) attributed to the programs' JIT-compiled code through the
//! kernel's line information for it (`bpf_prog_info.jited_line_info`), for `program-profile`.
//!
//! `bpf_stats` gives a program's run time; this says which of its lines (or which helper it
//! calls) the time goes to. On a machine without a PMU (this VM) the samples come from a timer
//! interrupt, so they land on the instruction after a stall: a cache miss shows up on the
//! line that uses the loaded value or on the next load.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context, bail};
use keepalive_agent::kernel::bpf_syscall::{
    BPF_BTF_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_GET_FD_BY_ID, bpf,
};

/// One frame of a sample: its address, the symbol and offset perf named it by, and for BPF
/// code the length of the function perf saw loaded there at the sample's time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub address: u64,
    pub symbol: String,
    pub offset: u64,
    pub loaded_len: Option<u64>,
}

/// What `perf script --show-bpf-events` printed: each sample's frames.
#[derive(Debug, Default)]
pub struct Script {
    pub samples: Vec<Vec<Frame>>,
    /// `PERF_RECORD_KSYMBOL` registrations read: none while BPF frames were sampled means perf
    /// recorded no load events, and no frame can be told apart.
    pub registrations: usize,
}

/// Parses `perf script --show-bpf-events`'s default output, in time order: a sample is a
/// header line, then one `\tADDRESS SYMBOL+0xOFFSET (DSO)` line per frame, leaf first, and a
/// blank line; an event is one line (`... PERF_RECORD_KSYMBOL addr ADDRESS len LENGTH type 1
/// flags 0x0 name SYMBOL`, flags 0x1 an unregistration). A BPF function's address is reused by
/// the next one loaded, so a frame's length is the one registered there when it was sampled.
/// Frames without a symbol (`[unknown]`) keep offset 0.
pub fn parse_perf_script(text: &str) -> Script {
    let mut script = Script::default();
    let mut frames = Vec::new();
    let mut loaded: HashMap<(u64, String), u64> = HashMap::new();
    for line in text.lines() {
        // An event, whose process name perf may pad with leading spaces, or a blank line or a
        // sample's header: the frames before are done.
        let event = ksymbol(line);
        if event.is_some() || line.trim().is_empty() || !line.starts_with(char::is_whitespace) {
            if !frames.is_empty() {
                script.samples.push(std::mem::take(&mut frames));
            }
            match event {
                Some(Ksymbol::Registered(address, len, name)) => {
                    script.registrations += 1;
                    loaded.insert((address, name), len);
                }
                Some(Ksymbol::Unregistered(address, name)) => {
                    loaded.remove(&(address, name));
                }
                None => {}
            }
            continue;
        }
        let Some((address, rest)) = line.trim().split_once(char::is_whitespace) else {
            continue;
        };
        let Ok(address) = u64::from_str_radix(address, 16) else {
            continue;
        };
        let symbol = rest
            .rsplit_once(" (")
            .map_or(rest, |(symbol, _dso)| symbol)
            .trim();
        let (symbol, offset) = match symbol.rsplit_once("+0x") {
            Some((name, hex)) => match u64::from_str_radix(hex, 16) {
                Ok(offset) => (name, offset),
                Err(_) => (symbol, 0),
            },
            None => (symbol, 0),
        };
        let loaded_len = symbol
            .starts_with("bpf_prog_")
            .then(|| loaded.get(&(address.wrapping_sub(offset), symbol.to_owned())))
            .flatten()
            .copied();
        frames.push(Frame {
            address,
            symbol: symbol.to_owned(),
            offset,
            loaded_len,
        });
    }
    if !frames.is_empty() {
        script.samples.push(frames);
    }
    script
}

enum Ksymbol {
    Registered(u64, u64, String),
    Unregistered(u64, String),
}

/// A `PERF_RECORD_KSYMBOL` line: code registered at an address with a length, or taken away.
fn ksymbol(line: &str) -> Option<Ksymbol> {
    let (_, event) = line.split_once("PERF_RECORD_KSYMBOL ")?;
    let mut fields = HashMap::new();
    let mut words = event.split_whitespace();
    while let (Some(key), Some(value)) = (words.next(), words.next()) {
        fields.insert(key, value);
    }
    let address = u64::from_str_radix(fields.get("addr")?, 16).ok()?;
    let name = (*fields.get("name")?).to_owned();
    match *fields.get("flags")? {
        "0x0" => Some(Ksymbol::Registered(
            address,
            fields.get("len")?.parse().ok()?,
            name,
        )),
        "0x1" => Some(Ksymbol::Unregistered(address, name)),
        _ => None,
    }
}

/// A source line of a program, as its BTF line information names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceLine {
    /// The program's name (its main function's, from its symbol).
    pub program: String,
    /// The file's name, without its directory.
    pub file: String,
    pub line: u32,
    /// The line's text, trimmed.
    pub text: String,
}

/// Each program's JIT code addresses to source lines: every address from one entry up to the
/// next belongs to that entry's line.
#[derive(Debug, Default)]
pub struct LineTable {
    starts: Vec<(u64, usize)>,
    lines: Vec<SourceLine>,
    /// Each function's start and length (the programs and their subprograms), so an address
    /// past them is no line of theirs.
    functions: HashMap<u64, u64>,
}

impl LineTable {
    /// Adds a program's lines: `(address, line)` in any order, and its functions as
    /// `(start, length)`.
    pub fn add(&mut self, lines: Vec<(u64, SourceLine)>, functions: &[(u64, u64)]) {
        for (address, line) in lines {
            self.starts.push((address, self.lines.len()));
            self.lines.push(line);
        }
        self.starts.sort_unstable();
        self.functions.extend(functions.iter().copied());
    }

    /// The length of the function that starts at `start`.
    pub fn function_len(&self, start: u64) -> Option<u64> {
        self.functions.get(&start).copied()
    }

    /// The line an address of JIT code belongs to.
    pub fn find(&self, address: u64) -> Option<&SourceLine> {
        if !self
            .functions
            .iter()
            .any(|(&start, &len)| (start..start + len).contains(&address))
        {
            return None;
        }
        let at = self.starts.partition_point(|&(start, _)| start <= address);
        let (_, index) = *self.starts.get(at.checked_sub(1)?)?;
        Some(&self.lines[index])
    }
}

/// What the samples in the agent's programs went to.
#[derive(Debug, Default)]
pub struct Profile {
    /// Samples per program.
    pub programs: BTreeMap<String, u64>,
    /// Samples per (line, helper): the innermost frame in a program's code, and the kernel
    /// function the program called (or "an interrupt") when the sample was not in its own
    /// code.
    pub lines: HashMap<(SourceLine, Option<String>), u64>,
    /// Samples in BPF code of other programs: the bench's own, an agent's started with other
    /// flags (its `.rodata` differs, so its JIT code does too under the same symbol), programs
    /// without line information, a subprogram two reloaded programs share.
    pub other: u64,
}

/// Attributes each sample to the innermost frame in a BPF program's code that is the code of
/// exactly one function in `table`: the frame's symbol names it in `symbols` (its addresses
/// now, as in `/proc/kallsyms`), and the function perf saw loaded at the frame's address then
/// had the same length (a subprogram two loaded programs share matches twice, and is other
/// code). A return address (a frame below which the program called a function) is looked up
/// one byte back, in the call; a frame an interrupt stopped is where it stopped.
pub fn attribute(
    script: &Script,
    symbols: &HashMap<String, Vec<u64>>,
    table: &LineTable,
) -> Profile {
    let mut profile = Profile::default();
    for frames in &script.samples {
        let Some((depth, frame)) = frames
            .iter()
            .enumerate()
            .find(|(_, frame)| frame.symbol.starts_with("bpf_prog_"))
        else {
            continue;
        };
        let same_code = |&start: &u64| {
            table
                .function_len(start)
                .is_some_and(|len| frame.loaded_len == Some(len))
        };
        let matching: Vec<u64> = symbols
            .get(&frame.symbol)
            .into_iter()
            .flatten()
            .copied()
            .filter(|start| same_code(start))
            .collect();
        let callee = depth
            .checked_sub(1)
            .map(|below| frames[below].symbol.as_str());
        let interrupted =
            callee.is_some_and(|callee| callee.starts_with("asm_") || callee.contains("interrupt"));
        let back = u64::from(callee.is_some() && !interrupted && frame.offset > 0);
        let Some(line) = (matching.len() == 1)
            .then(|| table.find(matching[0] + frame.offset - back))
            .flatten()
        else {
            profile.other += 1;
            continue;
        };
        *profile.programs.entry(line.program.clone()).or_default() += 1;
        let helper = callee.map(|callee| {
            if interrupted {
                "an interrupt".to_owned()
            } else {
                callee.to_owned()
            }
        });
        *profile.lines.entry((line.clone(), helper)).or_default() += 1;
    }
    profile
}

impl Profile {
    /// Each program's samples, then its `top` lines by samples, with their share of the
    /// program's.
    pub fn render(&self, top: usize) -> String {
        let mut out = String::new();
        for (program, &total) in &self.programs {
            let _ = writeln!(out, "{program}: {total} samples");
            let _ = writeln!(out, "| samples | share | where | in |");
            let _ = writeln!(out, "|---|---|---|---|");
            let mut lines: Vec<_> = self
                .lines
                .iter()
                .filter(|((line, _), _)| &line.program == program)
                .collect();
            lines.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
            for ((line, helper), &samples) in lines.into_iter().take(top) {
                let _ = writeln!(
                    out,
                    "| {samples} | {:.1} % | {}:{} `{}` | {} |",
                    100.0 * samples as f64 / total as f64,
                    line.file,
                    line.line,
                    line.text.replace('|', "\\|"),
                    helper.as_deref().unwrap_or("the program"),
                );
            }
        }
        if self.other != 0 {
            let _ = writeln!(
                out,
                "{} samples in other BPF code: the bench's own programs, an agent's with other \
                 flags (other code under the same symbols), programs skipped above",
                self.other
            );
        }
        out
    }
}

/// The addresses of the BPF programs' functions in `/proc/kallsyms` (`bpf_prog_TAG_NAME`),
/// every one where a symbol is loaded more than once (the same program in two processes).
pub fn bpf_symbols(kallsyms: &str) -> HashMap<String, Vec<u64>> {
    let mut symbols: HashMap<String, Vec<u64>> = HashMap::new();
    for line in kallsyms.lines() {
        let mut fields = line.split_whitespace();
        let (Some(address), Some(name)) = (fields.next(), fields.nth(1)) else {
            continue;
        };
        if let (Ok(address), true) = (
            u64::from_str_radix(address, 16),
            name.starts_with("bpf_prog_"),
        ) {
            symbols.entry(name.to_owned()).or_default().push(address);
        }
    }
    symbols
}

/// A program's name from its symbol (`bpf_prog_TAG_NAME`): the kernel keeps only 15 bytes of
/// it, which `timer_expire_entry` and `timer_expire_entry_typed` share.
fn name_of(symbol: &str) -> Option<&str> {
    let rest = symbol.strip_prefix("bpf_prog_")?;
    rest.split_once('_').map(|(_tag, name)| name)
}

/// `struct bpf_prog_info`'s size up to `attach_btf_id` (the fields read here come before it).
const PROG_INFO_SIZE: usize = 232;

fn get_fd(cmd: libc::c_long, id: u32) -> anyhow::Result<OwnedFd> {
    // `union bpf_attr` as the `*_GET_FD_BY_ID` commands read it: the id first.
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: the attribute is the prefix those commands read, with no pointers in it.
    let fd = unsafe { bpf(cmd, &mut attr) }?;
    // SAFETY: the kernel just opened this descriptor for us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn info(fd: &OwnedFd, info: &mut [u8]) -> anyhow::Result<()> {
    // `union bpf_attr` as `BPF_OBJ_GET_INFO_BY_FD` reads it: fd, info_len, info.
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    // SAFETY: the kernel writes at most `info.len()` bytes to `info`, and through the pointers
    // the callers put in it, to buffers they keep alive and sized as the counts say.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(())
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_ptr(buf: &mut [u8], at: usize, to: &mut [u8]) {
    buf[at..at + 8].copy_from_slice(&(to.as_mut_ptr() as u64).to_ne_bytes());
}

/// A loaded program's source lines at their JIT addresses, and its functions.
#[derive(Debug)]
pub struct ProgramLines {
    pub lines: Vec<(u64, SourceLine)>,
    /// `(start, length)` of each function (the program and its subprograms).
    pub functions: Vec<(u64, u64)>,
}

/// [`ProgramLines`] of program `id`: from its `jited_line_info` and `line_info`, whose strings
/// are in its BTF; its name from the symbol at its first function in `names` (addresses to
/// `/proc/kallsyms` names).
pub fn program_lines(id: u32, names: &HashMap<u64, String>) -> anyhow::Result<ProgramLines> {
    let prog = get_fd(BPF_PROG_GET_FD_BY_ID, id).with_context(|| format!("program {id}"))?;
    let mut first = [0u8; PROG_INFO_SIZE];
    info(&prog, &mut first).with_context(|| format!("program {id}'s info"))?;
    let short_name = String::from_utf8_lossy(&first[64..80])
        .trim_end_matches('\0')
        .to_owned();
    let (n_ksyms, n_lens) = (u32_at(&first, 104) as usize, u32_at(&first, 108) as usize);
    let btf_id = u32_at(&first, 128);
    let n_lines = u32_at(&first, 148) as usize;
    let (n_jited_lines, line_size, jited_line_size) = (
        u32_at(&first, 168) as usize,
        u32_at(&first, 172) as usize,
        u32_at(&first, 176) as usize,
    );
    if n_lines == 0 || n_jited_lines != n_lines || line_size != 16 || jited_line_size != 8 {
        bail!(
            "program {id} ({short_name}) has no usable line information ({n_lines} lines, \
             {n_jited_lines} JIT lines; without CAP_BPF and CAP_PERFMON the kernel gives none)"
        );
    }
    let mut ksyms = vec![0u8; 8 * n_ksyms];
    let mut lens = vec![0u8; 4 * n_lens];
    let mut lines = vec![0u8; line_size * n_lines];
    let mut jited = vec![0u8; 8 * n_jited_lines];
    let mut second = [0u8; PROG_INFO_SIZE];
    put_u32(&mut second, 104, n_ksyms as u32);
    put_u32(&mut second, 108, n_lens as u32);
    put_ptr(&mut second, 112, &mut ksyms);
    put_ptr(&mut second, 120, &mut lens);
    put_u32(&mut second, 148, n_lines as u32);
    put_ptr(&mut second, 152, &mut lines);
    put_ptr(&mut second, 160, &mut jited);
    put_u32(&mut second, 168, n_jited_lines as u32);
    put_u32(&mut second, 172, line_size as u32);
    put_u32(&mut second, 176, jited_line_size as u32);
    info(&prog, &mut second).with_context(|| format!("program {id}'s line information"))?;
    let ksyms: Vec<u64> = ksyms
        .chunks_exact(8)
        .map(|bytes| u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
        .collect();
    if ksyms.iter().all(|&address| address == 0) {
        bail!(
            "program {id} ({short_name}): the kernel hid its code's addresses (they read 0): \
             run as root, with kernel.kptr_restrict at 0 or 1"
        );
    }
    let name = ksyms
        .first()
        .and_then(|start| names.get(start))
        .and_then(|symbol| name_of(symbol))
        .unwrap_or(&short_name)
        .to_owned();

    let strings = btf_strings(btf_id).with_context(|| format!("program {id}'s BTF"))?;
    let string = |at: u32| -> String {
        let from = &strings[(at as usize).min(strings.len())..];
        let end = from.iter().position(|&b| b == 0).unwrap_or(from.len());
        String::from_utf8_lossy(&from[..end]).into_owned()
    };
    let lines = (0..n_lines)
        .map(|i| {
            let record = &lines[i * line_size..];
            let address = u64::from_ne_bytes(jited[i * 8..i * 8 + 8].try_into().expect("8"));
            let file = string(u32_at(record, 4));
            let line = SourceLine {
                program: name.clone(),
                file: file.rsplit('/').next().unwrap_or(&file).to_owned(),
                line: u32_at(record, 12) >> 10,
                text: string(u32_at(record, 8)).trim().to_owned(),
            };
            (address, line)
        })
        .collect();
    let functions = (0..n_ksyms.min(n_lens))
        .map(|i| (ksyms[i], u64::from(u32_at(&lens, i * 4))))
        .collect();
    Ok(ProgramLines { lines, functions })
}

/// The string section of BTF object `id`.
fn btf_strings(id: u32) -> anyhow::Result<Vec<u8>> {
    let btf = get_fd(BPF_BTF_GET_FD_BY_ID, id)?;
    let mut size_info = [0u8; 32];
    info(&btf, &mut size_info)?;
    let size = u32_at(&size_info, 8) as usize;
    let mut data = vec![0u8; size];
    let mut full = [0u8; 32];
    put_ptr(&mut full, 0, &mut data);
    put_u32(&mut full, 8, size as u32);
    info(&btf, &mut full)?;
    // struct btf_header: magic u16, version u8, flags u8, hdr_len, type_off, type_len,
    // str_off, str_len (u32 each).
    if data.len() < 24 || u16::from_ne_bytes([data[0], data[1]]) != 0xeb9f {
        bail!("BTF object {id} has no BTF header");
    }
    let (header, str_off, str_len) = (
        u32_at(&data, 4) as usize,
        u32_at(&data, 16) as usize,
        u32_at(&data, 20) as usize,
    );
    data.get(header + str_off..header + str_off + str_len)
        .map(<[u8]>::to_vec)
        .with_context(|| format!("BTF object {id}'s strings lie past its end"))
}

/// The line table of every program in `ids` that has line information, named by their
/// symbols in `symbols` ([`bpf_symbols`]); the others are named in the second value.
pub fn line_table(
    ids: &HashSet<u32>,
    symbols: &HashMap<String, Vec<u64>>,
) -> (LineTable, Vec<String>) {
    let names: HashMap<u64, String> = symbols
        .iter()
        .flat_map(|(name, starts)| starts.iter().map(move |&start| (start, name.clone())))
        .collect();
    let mut table = LineTable::default();
    let mut skipped = Vec::new();
    for &id in ids {
        match program_lines(id, &names) {
            Ok(program) => table.add(program.lines, &program.functions),
            Err(err) => skipped.push(format!("{err:#}")),
        }
    }
    (table, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILL: &str = "bpf_prog_0123456789abcdef_fill_record";
    const ENTRY: &str = "bpf_prog_fedcba9876543210_timer_expire_entry_typed";

    /// Both functions loaded while perf recorded (fill_record at ...1000; the entry at ...5000,
    /// where other code of the same symbol was before), and the entry once more with other
    /// code (another length, at ...9000); samples in each.
    fn script() -> String {
        format!(
            "\
hook-cost 1 [000] 1.0: PERF_RECORD_KSYMBOL addr ffffffffa0005000 len 600 type 1 flags 0x0 name {ENTRY}
hook-cost 1 [000] 1.0: PERF_RECORD_KSYMBOL addr ffffffffa0005000 len 600 type 1 flags 0x1 name {ENTRY}
hook-cost 1 [000] 1.0: PERF_RECORD_KSYMBOL addr ffffffffa0001000 len 256 type 1 flags 0x0 name {FILL}
hook-cost 1 [000] 1.0: PERF_RECORD_KSYMBOL addr ffffffffa0005000 len 512 type 1 flags 0x0 name {ENTRY}
       hook-cost 1 [000] 1.0: PERF_RECORD_KSYMBOL addr ffffffffa0009000 len 600 type 1 flags 0x0 name {ENTRY}
swapper     0 [001]   582.712877:     200040 cpu-clock:ppp: 
\tffffffffa000106e {FILL}+0x6e ({FILL})
\tffffffffa0005139 {ENTRY}+0x139 ({ENTRY})
\tffffffff81234567 call_timer_fn+0x2c ([kernel.kallsyms])

perf-exec 13217 [000]   582.713005:     200040 cpu-clock:ppp: 
\tffffffff81600001 read_tsc+0x5 ([kernel.kallsyms])
\tffffffff81600101 ktime_get_mono_fast_ns+0x21 ([kernel.kallsyms])
\tffffffffa000502d {ENTRY}+0x2d ({ENTRY})
\t           d4ad7 [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)

a 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffff81700005 bpf_ringbuf_submit+0x5 ([kernel.kallsyms])
\tffffffffa0005100 {ENTRY}+0x100 ({ENTRY})

b 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffffa0009010 {ENTRY}+0x10 ({ENTRY})

d 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffffa0001060 {FILL}+0x60 ({FILL})

e 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffff81800000 asm_sysvec_apic_timer_interrupt+0x0 ([kernel.kallsyms])
\tffffffffa0005100 {ENTRY}+0x100 ({ENTRY})

hook-cost 1 [000] 1.0: PERF_RECORD_KSYMBOL addr ffffffffa0009000 len 600 type 1 flags 0x1 name {ENTRY}
c 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffffa0009010 {ENTRY}+0x10 ({ENTRY})

x 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffff81000000 pv_native_safe_halt+0xb ([kernel.kallsyms])
"
        )
    }

    #[test]
    fn parses_frames_of_each_sample_and_the_code_loaded() {
        let script = parse_perf_script(&script());
        assert_eq!(script.samples.len(), 8);
        assert_eq!(
            script.registrations, 4,
            "an indented event line is an event too"
        );
        assert_eq!(
            script.samples[0][0],
            Frame {
                address: 0xffff_ffff_a000_106e,
                symbol: FILL.into(),
                offset: 0x6e,
                loaded_len: Some(256),
            }
        );
        assert_eq!(script.samples[0].len(), 3);
        // The length registered last at that address, not the one before.
        assert_eq!(script.samples[0][1].loaded_len, Some(512));
        assert_eq!(script.samples[1][0].loaded_len, None, "not BPF code");
        assert_eq!(script.samples[1][3].symbol, "[unknown]");
        assert_eq!(script.samples[3][0].loaded_len, Some(600));
        assert_eq!(
            script.samples[6][0].loaded_len, None,
            "after its unregistration"
        );
        assert_eq!(script.samples[7][0].offset, 0xb);
    }

    fn line(line: u32) -> SourceLine {
        SourceLine {
            program: "timer_expire_entry_typed".into(),
            file: "socket.rs".into(),
            line,
            text: format!("line {line}"),
        }
    }

    fn table() -> LineTable {
        let mut table = LineTable::default();
        // Reloaded: the entry at 0x5000 (512 bytes) with its subprogram at 0x1000 (256).
        table.add(
            vec![
                (0x1000, line(700)),
                (0x1060, line(718)),
                (0x5000, line(40)),
                (0x5100, line(99)),
            ],
            &[(0x5000, 512), (0x1000, 256)],
        );
        table
    }

    #[test]
    fn attributes_to_the_innermost_program_frame_and_the_function_it_called() {
        let symbols = HashMap::from([
            (FILL.to_owned(), vec![0x1000]),
            // Loaded twice now: the instance in the table is the one read.
            (ENTRY.to_owned(), vec![0x7000, 0x5000]),
        ]);
        let profile = attribute(&parse_perf_script(&script()), &symbols, &table());
        assert_eq!(profile.programs.get("timer_expire_entry_typed"), Some(&5));
        // 0x1000 + 0x6e lies in line 718's range, in the program's own code, and so does its
        // first byte (a leaf is no return address).
        assert_eq!(profile.lines.get(&(line(718), None)), Some(&2));
        // An interrupt stopped the program at 0x5100: line 99, not the line before.
        assert_eq!(
            profile
                .lines
                .get(&(line(99), Some("an interrupt".to_owned()))),
            Some(&1)
        );
        // A helper's sample goes to the line of the call (its return address less one), under
        // the function the program called.
        assert_eq!(
            profile
                .lines
                .get(&(line(40), Some("ktime_get_mono_fast_ns".to_owned()))),
            Some(&1)
        );
        assert_eq!(
            profile
                .lines
                .get(&(line(40), Some("bpf_ringbuf_submit".to_owned()))),
            Some(&1),
            "a return address at a line's first byte is the call on the line before"
        );
        // The instance of other length is other code under the same symbol, and so is code
        // perf did not see loaded.
        assert_eq!(profile.other, 2);
        let rendered = profile.render(5);
        assert!(
            rendered.contains("timer_expire_entry_typed: 5 samples"),
            "{rendered}"
        );
        assert!(
            rendered.contains("| 1 | 20.0 % | socket.rs:40 `line 40` | bpf_ringbuf_submit |"),
            "{rendered}"
        );
    }

    #[test]
    fn a_function_loaded_twice_with_the_same_code_is_other_code() {
        let mut table = table();
        // A copy of the subprogram in a second reloaded program, as long as the first.
        table.add(vec![(0x3000, line(700))], &[(0x3000, 256)]);
        let symbols = HashMap::from([
            (FILL.to_owned(), vec![0x1000, 0x3000]),
            (ENTRY.to_owned(), vec![0x5000]),
        ]);
        let profile = attribute(&parse_perf_script(&script()), &symbols, &table);
        assert_eq!(profile.lines.get(&(line(718), None)), None);
        assert_eq!(profile.other, 4);
    }

    #[test]
    fn an_address_past_every_function_has_no_line() {
        let mut table = LineTable::default();
        table.add(vec![(0x1000, line(1))], &[(0x1000, 0x10)]);
        assert_eq!(table.find(0x1008), Some(&line(1)));
        assert_eq!(table.find(0x1010), None);
        assert_eq!(table.find(0xfff), None);
    }

    #[test]
    fn reads_bpf_symbols_and_names_from_kallsyms() {
        let symbols = bpf_symbols(&format!(
            "ffffffffa0001000 t {ENTRY}\t[bpf]\n\
             ffffffffa0007000 t {ENTRY}\t[bpf]\n\
             ffffffff81000000 T _stext\n"
        ));
        assert_eq!(
            symbols.get(ENTRY),
            Some(&vec![0xffff_ffff_a000_1000, 0xffff_ffff_a000_7000])
        );
        assert_eq!(symbols.len(), 1);
        assert_eq!(name_of(ENTRY), Some("timer_expire_entry_typed"));
        assert_eq!(name_of("_stext"), None);
    }
}
