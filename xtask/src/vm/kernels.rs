//! Which Debian kernels make the matrix, and getting them: packages chosen by name pattern from
//! apt (never a hard-coded ABI: old ones leave the archive), downloaded once into the cache, with
//! `/boot/vmlinuz-*` and its BTF extracted next to them.
//!
//! bookworm and bookworm-security come from the machine's own apt; bullseye (5.10) from a
//! private apt state under the cache directory, so the machine's sources stay untouched.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{btf, deb::fsys_tarfile, modules, output_text, write_atomically};
use crate::{env, setup::Setup};

/// A kernel of the matrix, ready to boot.
pub(super) struct Kernel {
    /// Matrix id (`6.1`, `6.1-pre-backport`, ...).
    pub id: &'static str,
    pub package: String,
    /// Debian version of the package, e.g. `6.1.192-3`.
    pub version: String,
    /// What `uname -r` says: the package name without `linux-image-`.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// The raw `.BTF` section of its vmlinux.
    pub btf: Vec<u8>,
    /// Its IPVS modules, an archive appended to the guest's initramfs ([`modules`]).
    pub ipvs_modules: PathBuf,
    pub facts: btf::Facts,
    /// Why this package was picked, for the log.
    pub why: String,
}

impl Kernel {
    /// `6.1.192` from `6.1.192-3`.
    pub(super) fn upstream(&self) -> &str {
        upstream(&self.version)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Archive {
    /// The machine's apt (bookworm, bookworm-security).
    Machine,
    /// A private apt state for bullseye under the cache directory.
    Bullseye,
}

/// A kernel series and how its package names look: `<prefix><N><middle><flavour>`.
struct Family {
    series: &'static str,
    prefix: &'static str,
    middle: &'static str,
    archive: Archive,
    /// First upstream release of the series known (from Debian's changelog) to carry the stable
    /// backport "tcp: introduce icsk->icsk_keepalive_timer". Only a hint for where to look: the
    /// kernel's BTF decides.
    backport_hint: Option<(u32, u32, u32)>,
}

const FAMILIES: [Family; 3] = [
    Family {
        series: "5.10",
        prefix: "linux-image-5.10.0-",
        middle: "-",
        archive: Archive::Bullseye,
        backport_hint: None,
    },
    Family {
        series: "6.1",
        prefix: "linux-image-6.1.0-",
        middle: "-",
        archive: Archive::Machine,
        backport_hint: Some((6, 1, 192)),
    },
    Family {
        series: "6.12",
        prefix: "linux-image-6.12.",
        middle: "+deb12-",
        archive: Archive::Machine,
        backport_hint: Some((6, 12, 113)),
    },
];

/// Flavours in order of preference: cloud kernels are smaller and boot faster; the generic one
/// is the fallback when a series has no cloud build.
const FLAVOURS: [&str; 2] = ["cloud-amd64", "amd64"];

/// What the matrix takes from a family.
#[derive(Clone, Copy)]
enum Pick {
    Newest,
    /// The newest package whose BTF has no `icsk_keepalive_timer`: the last layout before the
    /// backport, next to the newest with it.
    NewestBeforeBackport,
}

/// The matrix: (id, family, pick), in the order it is printed.
const MATRIX: [(&str, &str, Pick); 5] = [
    ("5.10", "5.10", Pick::Newest),
    ("6.1-pre-backport", "6.1", Pick::NewestBeforeBackport),
    ("6.1", "6.1", Pick::Newest),
    ("6.12-pre-backport", "6.12", Pick::NewestBeforeBackport),
    ("6.12", "6.12", Pick::Newest),
];

const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// The private bullseye lists are refreshed when older than this.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Chooses, downloads and extracts the matrix kernels (`only`: ids to keep; empty = all),
/// printing which package was picked and why.
pub(super) fn pick(setup: &Setup, cache: &Path, only: &[String]) -> Result<Vec<Kernel>> {
    for id in only {
        ensure!(
            MATRIX.iter().any(|(m, ..)| m == id),
            "unknown kernel {id:?}; the matrix has {}",
            MATRIX.map(|(m, ..)| m).join(", ")
        );
    }
    let debs = cache.join("debs");
    let extracted = cache.join("kernels");
    for dir in [&debs, &extracted] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut store = Store {
        setup,
        cache,
        debs,
        extracted,
        bullseye: None,
    };
    let mut kernels = Vec::new();
    for (id, series, pick) in MATRIX {
        if !only.is_empty() && !only.iter().any(|o| o == id) {
            continue;
        }
        let family = FAMILIES
            .iter()
            .find(|f| f.series == series)
            .context("matrix names a family that does not exist")?;
        let candidates = store.candidates(family)?;
        let kernel = match pick {
            Pick::Newest => {
                let newest = candidates.last().context("no candidates")?;
                let mut kernel = store.fetch(id, newest)?;
                kernel.why = format!(
                    "newest {} package ({} candidates); {}",
                    family.series,
                    candidates.len(),
                    kernel.facts.timer_layout()
                );
                kernel
            }
            Pick::NewestBeforeBackport => before_backport(&mut store, id, family, &candidates)?,
        };
        println!(
            "kernel {id}: {} {} ({}) — {}",
            kernel.package, kernel.version, kernel.release, kernel.why
        );
        kernels.push(kernel);
    }
    Ok(kernels)
}

/// Walks from the hint to the newest candidate without `icsk_keepalive_timer` in its BTF whose
/// next newer candidate has it, downloading only the packages it looks at.
fn before_backport(
    store: &mut Store,
    id: &'static str,
    family: &Family,
    candidates: &[Candidate],
) -> Result<Kernel> {
    let hint = family
        .backport_hint
        .context("a pre-backport pick needs a backport hint")?;
    // Start at the newest candidate older than the hinted first release with the backport.
    let mut at = candidates
        .iter()
        .rposition(|c| upstream_triple(&c.version).is_some_and(|v| v < hint))
        .unwrap_or(candidates.len().saturating_sub(2));
    loop {
        let kernel = store.fetch(id, &candidates[at])?;
        if kernel.facts.keepalive_timer_member {
            ensure!(
                at > 0,
                "every {} package has icsk_keepalive_timer in its BTF: none from before the \
                 backport is left in the archive ({} candidates); drop {id} from the matrix",
                family.series,
                candidates.len()
            );
            at -= 1;
            continue;
        }
        let Some(newer) = candidates.get(at + 1) else {
            bail!(
                "no {} package has icsk_keepalive_timer in its BTF (newest {} {}): the backport \
                 this matrix entry brackets is not in the archive",
                family.series,
                candidates[at].name,
                candidates[at].version
            );
        };
        let newer_kernel = store.fetch(id, newer)?;
        if !newer_kernel.facts.keepalive_timer_member {
            at += 1;
            continue;
        }
        let mut kernel = kernel;
        kernel.why = format!(
            "newest {} package before the icsk_keepalive_timer backport: its BTF has no \
             icsk_keepalive_timer, the next newer {} {} has it; {}",
            family.series,
            newer.name,
            newer.version,
            kernel.facts.timer_layout()
        );
        return Ok(kernel);
    }
}

/// A package apt knows, with its ABI/upstream number (the `<N>` of the name) for ordering.
#[derive(Clone, Debug)]
struct Candidate {
    name: String,
    version: String,
    number: u32,
    archive: Archive,
}

struct Store<'a> {
    setup: &'a Setup,
    cache: &'a Path,
    debs: PathBuf,
    extracted: PathBuf,
    bullseye: Option<Apt>,
}

impl Store<'_> {
    fn apt(&mut self, archive: Archive) -> Result<Apt> {
        match archive {
            Archive::Machine => Ok(Apt::machine(self.setup)),
            Archive::Bullseye => {
                if self.bullseye.is_none() {
                    self.bullseye = Some(Apt::bullseye(self.setup, self.cache)?);
                }
                Ok(self.bullseye.clone().context("just set")?)
            }
        }
    }

    /// The family's packages of the first flavour that has any, oldest first.
    fn candidates(&mut self, family: &Family) -> Result<Vec<Candidate>> {
        let apt = self.apt(family.archive)?;
        let mut found = self.search(&apt, family)?;
        if found.is_empty() && family.archive == Archive::Machine && env::is_root() {
            println!(
                "updating: the machine's apt lists know no {} kernel package (apt-get update)",
                family.series
            );
            env::run(self.setup.env.command("apt-get").arg("update"))
                .context("apt-get update failed")?;
            found = self.search(&apt, family)?;
        }
        if found.is_empty() {
            bail!(
                "apt ({}) knows no package named {}<N>{}{{{}}}: run `apt-get update` as root, \
                 or check that the sources include {}",
                apt.what,
                family.prefix,
                family.middle,
                FLAVOURS.join(","),
                if family.archive == Archive::Machine {
                    "bookworm and bookworm-security"
                } else {
                    "bullseye (private state, see above)"
                }
            );
        }
        Ok(found)
    }

    fn search(&self, apt: &Apt, family: &Family) -> Result<Vec<Candidate>> {
        for flavour in FLAVOURS {
            let regex = format!(
                "^{}[0-9]+{}{}$",
                regex_escape(family.prefix),
                regex_escape(family.middle),
                regex_escape(flavour)
            );
            let names: Vec<String> = output_text(apt.cache_command(self.setup).args([
                "search",
                "--names-only",
                &regex,
            ]))?
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| abi_number(name, family, flavour).is_some())
            .map(str::to_owned)
            .collect();
            if names.is_empty() {
                continue;
            }
            let shown = output_text(
                apt.cache_command(self.setup)
                    .args(["show", "--no-all-versions"])
                    .args(&names),
            )?;
            let mut found: Vec<Candidate> = parse_show(&shown)
                .into_iter()
                .filter_map(|(name, version)| {
                    Some(Candidate {
                        number: abi_number(&name, family, flavour)?,
                        name,
                        version,
                        archive: family.archive,
                    })
                })
                .collect();
            found.sort_by_key(|c| c.number);
            return Ok(found);
        }
        Ok(Vec::new())
    }

    /// Downloads (unless cached) and extracts one candidate.
    fn fetch(&mut self, id: &'static str, candidate: &Candidate) -> Result<Kernel> {
        let release = candidate
            .name
            .strip_prefix("linux-image-")
            .context("kernel package name without linux-image-")?
            .to_owned();
        let stem = format!("{release}_{}", candidate.version.replace(['~', ':'], "_"));
        let vmlinuz = self.extracted.join(format!("{stem}.vmlinuz"));
        let btf_path = self.extracted.join(format!("{stem}.btf"));
        if !vmlinuz.is_file() {
            let deb = self.download(candidate)?;
            let image = extract_vmlinuz(&deb, &release)?;
            write_atomically(&vmlinuz, &image)?;
        }
        let btf = if btf_path.is_file() {
            std::fs::read(&btf_path).with_context(|| format!("reading {}", btf_path.display()))?
        } else {
            let image = std::fs::read(&vmlinuz)
                .with_context(|| format!("reading {}", vmlinuz.display()))?;
            let btf = btf::from_bzimage(&image)
                .with_context(|| format!("taking the BTF out of {}", vmlinuz.display()))?;
            write_atomically(&btf_path, &btf)?;
            btf
        };
        let facts = btf::Facts::from_btf(&btf)
            .with_context(|| format!("reading the BTF of {}", candidate.name))?;
        let ipvs_modules = self.extracted.join(format!("{stem}.ipvs-modules.cpio.gz"));
        if !ipvs_modules.is_file() {
            let deb = self.download(candidate)?;
            modules::ipvs_archive(&deb, &release, &ipvs_modules)
                .with_context(|| format!("taking the IPVS modules out of {}", deb.display()))?;
        }
        Ok(Kernel {
            id,
            package: candidate.name.clone(),
            version: candidate.version.clone(),
            release,
            vmlinuz,
            btf,
            ipvs_modules,
            facts,
            why: String::new(),
        })
    }

    fn download(&mut self, candidate: &Candidate) -> Result<PathBuf> {
        let file = format!(
            "{}_{}_amd64.deb",
            candidate.name,
            candidate.version.replace(':', "%3a")
        );
        let deb = self.debs.join(&file);
        if deb.is_file() {
            return Ok(deb);
        }
        let apt = self.apt(candidate.archive)?;
        println!(
            "downloading: {} {} ({})",
            candidate.name, candidate.version, apt.what
        );
        env::run(
            apt.get_command(self.setup)
                .current_dir(&self.debs)
                // apt drops to _apt to download, which cannot write into a root-owned cache
                // (it warns and downloads as root anyway): say so up front instead.
                .args(["-o", "APT::Sandbox::User=root"])
                .arg("download")
                .arg(format!("{}={}", candidate.name, candidate.version)),
        )
        .with_context(|| {
            format!(
                "downloading {} failed: is a Debian mirror reachable? (the package may also \
                 have just left the archive: run `apt-get update`)",
                candidate.name
            )
        })?;
        ensure!(
            deb.is_file(),
            "apt-get download succeeded but {} is missing",
            deb.display()
        );
        Ok(deb)
    }
}

/// An apt configuration: the machine's, or the private bullseye one.
#[derive(Clone)]
struct Apt {
    options: Vec<String>,
    what: String,
}

impl Apt {
    fn machine(_setup: &Setup) -> Apt {
        Apt {
            options: Vec::new(),
            what: "the machine's apt sources".to_owned(),
        }
    }

    /// A private apt state for bullseye under `<cache>/apt-bullseye`; its lists are refreshed
    /// when older than a day. Nothing of the machine's apt configuration is written.
    fn bullseye(setup: &Setup, cache: &Path) -> Result<Apt> {
        let dir = cache.join("apt-bullseye");
        let lists = dir.join("lists");
        let archives = dir.join("cache/archives");
        for sub in [lists.join("partial"), archives.join("partial")] {
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        let sources = dir.join("sources.list");
        let text = format!(
            "deb [signed-by={KEYRING}] http://deb.debian.org/debian bullseye main\n\
             deb [signed-by={KEYRING}] http://deb.debian.org/debian bullseye-updates main\n\
             deb [signed-by={KEYRING}] http://deb.debian.org/debian-security bullseye-security main\n"
        );
        if std::fs::read_to_string(&sources).ok().as_deref() != Some(&text) {
            std::fs::write(&sources, &text)
                .with_context(|| format!("writing {}", sources.display()))?;
        }
        let apt = Apt {
            options: vec![
                format!("Dir::Etc::sourcelist={}", sources.display()),
                "Dir::Etc::sourceparts=-".to_owned(),
                format!("Dir::State::Lists={}", lists.display()),
                format!("Dir::Cache={}", dir.join("cache").display()),
            ],
            what: format!("private bullseye apt state in {}", dir.display()),
        };
        let stamp = lists.join("kat-updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < LISTS_MAX_AGE);
        if !fresh {
            println!("updating: {} (apt-get update)", apt.what);
            env::run(apt.get_command(setup).arg("update")).with_context(|| {
                format!(
                    "apt-get update of the private bullseye state failed: is deb.debian.org \
                     reachable, and is {KEYRING} (debian-archive-keyring) installed?"
                )
            })?;
            std::fs::write(&stamp, b"").with_context(|| format!("writing {}", stamp.display()))?;
        }
        Ok(apt)
    }

    fn with_options(&self, mut cmd: Command) -> Command {
        for option in &self.options {
            cmd.arg("-o").arg(option);
        }
        cmd
    }

    fn cache_command(&self, setup: &Setup) -> Command {
        self.with_options(setup.env.command("apt-cache"))
    }

    fn get_command(&self, setup: &Setup) -> Command {
        self.with_options(setup.env.command("apt-get"))
    }
}

/// `/boot/vmlinuz-<release>` out of a kernel package.
fn extract_vmlinuz(deb: &Path, release: &str) -> Result<Vec<u8>> {
    let member = format!("./boot/vmlinuz-{release}");
    let mut dpkg = fsys_tarfile(deb)?;
    let tar_in = dpkg.stdout.take().context("dpkg-deb stdout")?;
    let tar = Command::new("tar")
        .args(["-x", "-O", &member])
        .stdin(tar_in)
        .output()
        .context("starting tar")?;
    let dpkg_status = dpkg.wait().context("waiting for dpkg-deb")?;
    ensure!(
        dpkg_status.success() && tar.status.success() && !tar.stdout.is_empty(),
        "extracting {member} from {} failed (dpkg-deb {dpkg_status}, tar {}): {}",
        deb.display(),
        tar.status,
        String::from_utf8_lossy(&tar.stderr).trim()
    );
    Ok(tar.stdout)
}

/// The `<N>` of `<prefix><N><middle><flavour>`, if `name` has exactly that shape.
fn abi_number(name: &str, family: &Family, flavour: &str) -> Option<u32> {
    let rest = name.strip_prefix(family.prefix)?;
    let digits = rest.strip_suffix(flavour)?.strip_suffix(family.middle)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// (Package, Version) of each stanza of `apt-cache show`.
fn parse_show(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |key: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        if let (Some(name), Some(version)) = (field("Package:"), field("Version:")) {
            out.push((name, version));
        }
    }
    out
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped = matches!(c, '.' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '^' | '$');
            escaped
                .then_some('\\')
                .into_iter()
                .chain(std::iter::once(c))
        })
        .collect()
}

/// The upstream part of a Debian version: `6.12.117` of `6.12.117-1~deb12u1`.
fn upstream(version: &str) -> &str {
    let no_epoch = version.split_once(':').map_or(version, |(_, v)| v);
    no_epoch.split('-').next().unwrap_or(no_epoch)
}

fn upstream_triple(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = upstream(version).split('.').map(str::parse::<u32>);
    Some((
        parts.next()?.ok()?,
        parts.next()?.ok()?,
        parts.next().unwrap_or(Ok(0)).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_match_their_family_and_flavour_only() {
        let f61 = &FAMILIES[1];
        let f612 = &FAMILIES[2];
        assert_eq!(
            abi_number("linux-image-6.1.0-57-cloud-amd64", f61, "cloud-amd64"),
            Some(57)
        );
        assert_eq!(
            abi_number("linux-image-6.1.0-57-amd64", f61, "amd64"),
            Some(57)
        );
        // The generic flavour must not swallow cloud or rt packages.
        assert_eq!(
            abi_number("linux-image-6.1.0-57-cloud-amd64", f61, "amd64"),
            None
        );
        assert_eq!(
            abi_number("linux-image-6.1.0-57-rt-amd64", f61, "amd64"),
            None
        );
        assert_eq!(
            abi_number(
                "linux-image-6.12.117+deb12-cloud-amd64",
                f612,
                "cloud-amd64"
            ),
            Some(117)
        );
        assert_eq!(
            abi_number("linux-image-6.12-cloud-amd64", f612, "cloud-amd64"),
            None
        );
    }

    #[test]
    fn versions_and_apt_output() {
        assert_eq!(upstream("6.12.117-1~deb12u1"), "6.12.117");
        assert_eq!(upstream_triple("6.1.192-3"), Some((6, 1, 192)));
        assert_eq!(upstream_triple("1:5.10.262-1"), Some((5, 10, 262)));
        assert!(upstream_triple("6.1.190-1") < Some((6, 1, 192)));
        let show = "Package: a\nVersion: 1-1\nSize: 3\n\nPackage: b\nSource: x (2)\nVersion: 2-1\n";
        assert_eq!(
            parse_show(show),
            [("a".into(), "1-1".into()), ("b".into(), "2-1".into())]
        );
        assert_eq!(regex_escape("6.12.+deb12-"), "6\\.12\\.\\+deb12-");
    }
}
