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

use anyhow::{Context, bail};

/// One frame of a sample: a symbol and the offset into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub symbol: String,
    pub offset: u64,
}

/// The frames of each sample in `perf script`'s default output (a header line, then one
/// `\tADDRESS SYMBOL+0xOFFSET (DSO)` line per frame, leaf first; a blank line between samples).
/// Frames without a symbol (`[unknown]`) keep offset 0.
pub fn parse_perf_script(text: &str) -> Vec<Vec<Frame>> {
    let mut samples = Vec::new();
    let mut frames = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !frames.is_empty() {
                samples.push(std::mem::take(&mut frames));
            }
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            // A sample's header; the frames follow.
            if !frames.is_empty() {
                samples.push(std::mem::take(&mut frames));
            }
            continue;
        }
        let Some((_address, rest)) = line.trim().split_once(char::is_whitespace) else {
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
        frames.push(Frame {
            symbol: symbol.to_owned(),
            offset,
        });
    }
    if !frames.is_empty() {
        samples.push(frames);
    }
    samples
}

/// A source line of a program, as its BTF line information names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceLine {
    /// The program's name (as the kernel keeps it: 15 bytes at most).
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
    /// Where each program's code ends (its last function's start plus length), so an address
    /// past it is no line of the program.
    ends: Vec<(u64, u64)>,
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
        self.ends
            .extend(functions.iter().map(|&(start, len)| (start, start + len)));
    }

    /// The line an address of JIT code belongs to.
    pub fn find(&self, address: u64) -> Option<&SourceLine> {
        if !self
            .ends
            .iter()
            .any(|&(start, end)| (start..end).contains(&address))
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
    /// function the sample was in when that was not the program's own code.
    pub lines: HashMap<(SourceLine, Option<String>), u64>,
    /// Samples whose program frame had no line (a program not in the table, or code without
    /// line information).
    pub unknown: u64,
}

/// Attributes each sample to the innermost frame in a BPF program's code (`bpf_prog_` symbols,
/// whose addresses `symbols` gives, as in `/proc/kallsyms`) that `table` knows a line of.
pub fn attribute(
    samples: &[Vec<Frame>],
    symbols: &HashMap<String, u64>,
    table: &LineTable,
) -> Profile {
    let mut profile = Profile::default();
    for frames in samples {
        let Some((depth, frame)) = frames
            .iter()
            .enumerate()
            .find(|(_, frame)| frame.symbol.starts_with("bpf_prog_"))
        else {
            continue;
        };
        let Some(line) = symbols
            .get(&frame.symbol)
            .and_then(|start| table.find(start + frame.offset))
        else {
            profile.unknown += 1;
            continue;
        };
        *profile.programs.entry(line.program.clone()).or_default() += 1;
        let helper = (depth > 0).then(|| frames[0].symbol.clone());
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
        if self.unknown != 0 {
            let _ = writeln!(
                out,
                "{} samples in BPF programs without a known line (not the agent's)",
                self.unknown
            );
        }
        out
    }
}

/// The addresses of the BPF programs' functions in `/proc/kallsyms` (`bpf_prog_TAG_NAME`).
pub fn bpf_symbols(kallsyms: &str) -> HashMap<String, u64> {
    kallsyms
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = u64::from_str_radix(fields.next()?, 16).ok()?;
            let name = fields.nth(1)?;
            name.starts_with("bpf_prog_")
                .then(|| (name.to_owned(), address))
        })
        .collect()
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;

/// `struct bpf_prog_info`'s size up to `attach_btf_id` (the fields read here come before it).
const PROG_INFO_SIZE: usize = 232;

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> anyhow::Result<i32> {
    // SAFETY: `attr` is a buffer of the size passed, laid out as the command's `union bpf_attr`
    // member; the kernel reads and writes within it (and the user buffers it points to, which
    // the callers keep alive and sized).
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(ret as i32)
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: a descriptor this process opened and owns.
        unsafe { libc::close(self.0) };
    }
}

fn get_fd(cmd: libc::c_long, id: u32) -> anyhow::Result<Fd> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&id.to_ne_bytes());
    Ok(Fd(bpf(cmd, &mut attr)?))
}

fn info(fd: &Fd, info: &mut [u8]) -> anyhow::Result<()> {
    let mut attr = [0u8; 16];
    attr[..4].copy_from_slice(&(fd.0 as u32).to_ne_bytes());
    attr[4..8].copy_from_slice(&(info.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
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
/// are in its BTF.
pub fn program_lines(id: u32) -> anyhow::Result<ProgramLines> {
    let prog = get_fd(BPF_PROG_GET_FD_BY_ID, id).with_context(|| format!("program {id}"))?;
    let mut first = [0u8; PROG_INFO_SIZE];
    info(&prog, &mut first).with_context(|| format!("program {id}'s info"))?;
    let name = String::from_utf8_lossy(&first[64..80])
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
    if n_lines == 0 || n_jited_lines != n_lines || line_size < 16 || jited_line_size != 8 {
        bail!(
            "program {id} ({name}) has no usable line information ({n_lines} lines, \
             {n_jited_lines} JIT lines)"
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
        .map(|i| {
            (
                u64::from_ne_bytes(ksyms[i * 8..i * 8 + 8].try_into().expect("8")),
                u64::from(u32_at(&lens, i * 4)),
            )
        })
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

/// The line table of every program in `ids` that has line information; the others are named
/// in the second value.
pub fn line_table(ids: &HashSet<u32>) -> (LineTable, Vec<String>) {
    let mut table = LineTable::default();
    let mut skipped = Vec::new();
    for &id in ids {
        match program_lines(id) {
            Ok(program) => table.add(program.lines, &program.functions),
            Err(err) => skipped.push(format!("{err:#}")),
        }
    }
    (table, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = "\
swapper     0 [001]   582.712877:     200040 cpu-clock:ppp: 
\tffffffffa0001234 bpf_prog_0123456789abcdef_fill_record+0x6e (bpf_prog_0123456789abcdef_fill_record)
\tffffffffa0005678 bpf_prog_fedcba9876543210_timer_expire_entry_typed+0x139 (bpf_prog_fedcba9876543210_timer_expire_entry_typed)
\tffffffff81234567 call_timer_fn+0x2c ([kernel.kallsyms])

perf-exec 13217 [000]   582.713005:     200040 cpu-clock:ppp: 
\tffffffff81600001 read_tsc+0x5 ([kernel.kallsyms])
\tffffffffa0005000 bpf_prog_fedcba9876543210_timer_expire_entry_typed+0x2c (bpf_prog_fedcba9876543210_timer_expire_entry_typed)
\t           d4ad7 [unknown] (/usr/lib/x86_64-linux-gnu/libc.so.6)

x 1 [000] 1.0: 1 cpu-clock:ppp: 
\tffffffff81000000 pv_native_safe_halt+0xb ([kernel.kallsyms])
";

    #[test]
    fn parses_frames_of_each_sample() {
        let samples = parse_perf_script(SCRIPT);
        assert_eq!(samples.len(), 3);
        assert_eq!(
            samples[0][0],
            Frame {
                symbol: "bpf_prog_0123456789abcdef_fill_record".into(),
                offset: 0x6e
            }
        );
        assert_eq!(samples[0].len(), 3);
        assert_eq!(samples[1][2].symbol, "[unknown]");
        assert_eq!(samples[2][0].offset, 0xb);
    }

    fn line(program: &str, line: u32) -> SourceLine {
        SourceLine {
            program: program.into(),
            file: "socket.rs".into(),
            line,
            text: format!("line {line}"),
        }
    }

    #[test]
    fn attributes_to_the_innermost_program_frame_and_its_helper() {
        let mut table = LineTable::default();
        // The entry program at 0x5000 (0x200 long) with a subprogram at 0x1000 (0x100 long).
        table.add(
            vec![
                (0x1000, line("entry", 700)),
                (0x1060, line("entry", 718)),
                (0x5000, line("entry", 40)),
                (0x5100, line("entry", 99)),
            ],
            &[(0x5000, 0x200), (0x1000, 0x100)],
        );
        let symbols = HashMap::from([
            ("bpf_prog_0123456789abcdef_fill_record".to_owned(), 0x1000),
            (
                "bpf_prog_fedcba9876543210_timer_expire_entry_typed".to_owned(),
                0x5000,
            ),
        ]);
        let profile = attribute(&parse_perf_script(SCRIPT), &symbols, &table);
        assert_eq!(profile.programs.get("entry"), Some(&2));
        // 0x1000 + 0x6e lies in line 718's range, in the program's own code.
        assert_eq!(profile.lines.get(&(line("entry", 718), None)), Some(&1));
        // A helper's sample goes to the line that called it.
        assert_eq!(
            profile
                .lines
                .get(&(line("entry", 40), Some("read_tsc".to_owned()))),
            Some(&1)
        );
        assert_eq!(profile.unknown, 0);
        let rendered = profile.render(5);
        assert!(rendered.contains("entry: 2 samples"), "{rendered}");
        assert!(
            rendered.contains("| 1 | 50.0 % | socket.rs:40 `line 40` | read_tsc |"),
            "{rendered}"
        );
    }

    #[test]
    fn an_address_past_every_function_has_no_line() {
        let mut table = LineTable::default();
        table.add(vec![(0x1000, line("p", 1))], &[(0x1000, 0x10)]);
        assert_eq!(table.find(0x1008), Some(&line("p", 1)));
        assert_eq!(table.find(0x1010), None);
        assert_eq!(table.find(0xfff), None);
    }

    #[test]
    fn reads_bpf_symbols_from_kallsyms() {
        let symbols = bpf_symbols(
            "ffffffffa0001000 t bpf_prog_0123456789abcdef_fill_record\t[bpf]\n\
             ffffffff81000000 T _stext\n",
        );
        assert_eq!(
            symbols.get("bpf_prog_0123456789abcdef_fill_record"),
            Some(&0xffff_ffff_a000_1000)
        );
        assert_eq!(symbols.len(), 1);
    }
}
