//! The IPVS modules of a matrix kernel, for the guest to load: `ip_vs` and its round-robin
//! scheduler with everything they depend on (read from each module's `depends=`), taken out of
//! the kernel's package, decompressed, and packed in load order into a cpio archive that is
//! appended to the shared initramfs (the kernel unpacks concatenated archives in turn).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use super::{cpio, deb::fsys_tarfile, write_atomically};

/// What the guest's IPVS scenario needs: IPVS, and the scheduler of the service it adds.
const WANTED: [&str; 2] = ["ip_vs", "ip_vs_rr"];
/// Where the archive puts them; the guest's `/init` loads `*.ko` here in name order.
pub(super) const GUEST_DIR: &str = "lib/ipvs";
/// More dependency levels than any module of the kernel has.
const MAX_LEVELS: usize = 8;

/// Writes `out`: a gzip-compressed newc archive of [`GUEST_DIR`]`/NN-<module>.ko`, dependencies
/// first, from the package `deb` of kernel `release`.
pub(super) fn ipvs_archive(deb: &Path, release: &str, out: &Path) -> Result<()> {
    let available = module_paths(deb, release)?;
    let mut found: BTreeMap<String, (Vec<u8>, Vec<String>)> = BTreeMap::new();
    let mut wanted: BTreeSet<String> = WANTED.iter().map(|m| (*m).to_owned()).collect();
    for _ in 0..MAX_LEVELS {
        wanted.retain(|m| !found.contains_key(m));
        if wanted.is_empty() {
            break;
        }
        let members: Vec<&str> = wanted
            .iter()
            .map(|m| {
                available
                    .get(m)
                    .map(String::as_str)
                    .with_context(|| format!("{} has no module {m} for {release}", deb.display()))
            })
            .collect::<Result<_>>()?;
        for (module, member) in wanted.iter().zip(extract(deb, &members)?) {
            let ko = decompress(&member.0, &member.1)?;
            let depends = depends(&ko)
                .with_context(|| format!("reading the modinfo of {module} ({})", member.0))?;
            found.insert(module.clone(), (ko, depends));
        }
        wanted = found
            .values()
            .flat_map(|(_, depends)| depends.iter().cloned())
            .collect();
    }
    ensure!(
        wanted.iter().all(|m| found.contains_key(m)),
        "the IPVS modules of {release} depend more than {MAX_LEVELS} levels deep"
    );
    let order = load_order(&found)?;
    let mut archive = cpio::Newc::default();
    archive.dir("lib");
    archive.dir(GUEST_DIR);
    for (i, module) in order.iter().enumerate() {
        let (ko, _) = &found[module];
        archive.file(&format!("{GUEST_DIR}/{i:02}-{module}.ko"), ko, 0o644);
    }
    let gz = cpio::gzip(&archive.finish())?;
    write_atomically(out, &gz)?;
    println!(
        "IPVS modules for {release}: {} ({} KiB)",
        order.join(", "),
        gz.len() / 1024
    );
    Ok(())
}

/// Module name (`-` as `_`, as the kernel names them) → path in the package.
fn module_paths(deb: &Path, release: &str) -> Result<BTreeMap<String, String>> {
    let mut listing = fsys_tarfile(deb)?;
    let tar = Command::new("tar")
        .arg("-t")
        .stdin(listing.stdout.take().context("dpkg-deb stdout")?)
        .output()
        .context("starting tar -t")?;
    let _ = listing.wait();
    ensure!(tar.status.success(), "listing {} failed", deb.display());
    let prefix = format!("./lib/modules/{release}/kernel/");
    Ok(String::from_utf8_lossy(&tar.stdout)
        .lines()
        .filter(|path| path.starts_with(&prefix))
        .filter_map(|path| {
            let file = path.rsplit('/').next()?;
            let name = file
                .strip_suffix(".ko")
                .or_else(|| file.strip_suffix(".ko.xz"))?;
            Some((name.replace('-', "_"), path.to_owned()))
        })
        .collect())
}

/// The members' bytes, in the order given: (path, bytes).
fn extract(deb: &Path, members: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = std::env::temp_dir().join(format!("keepalive-ipvs-modules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut dpkg = fsys_tarfile(deb)?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&dir)
        .args(members)
        .stdin(dpkg.stdout.take().context("dpkg-deb stdout")?)
        .output()
        .context("starting tar -x")?;
    let _ = dpkg.wait();
    ensure!(
        tar.status.success(),
        "extracting {} from {} failed: {}",
        members.join(" "),
        deb.display(),
        String::from_utf8_lossy(&tar.stderr).trim()
    );
    let read = members
        .iter()
        .map(|member| {
            let path = dir.join(member);
            std::fs::read(&path)
                .map(|bytes| ((*member).to_owned(), bytes))
                .with_context(|| format!("reading {}", path.display()))
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    read
}

/// Busybox's `insmod` takes the module as the kernel wants it: uncompressed.
fn decompress(path: &str, bytes: &[u8]) -> Result<Vec<u8>> {
    if !path.ends_with(".xz") {
        return Ok(bytes.to_vec());
    }
    let out = super::pipe_through(Command::new("xz").args(["-d", "-c"]), bytes, "xz")?;
    ensure!(
        out.status.success(),
        "xz -d of {path} failed: install xz-utils"
    );
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` (NUL-separated `key=value` strings).
fn depends(ko: &[u8]) -> Result<Vec<String>> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        bail!("no depends= in its .modinfo");
    };
    let value = &ko[at + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    let value = std::str::from_utf8(&value[..end]).context("depends= is not UTF-8")?;
    Ok(value
        .split(',')
        .filter(|m| !m.is_empty())
        .map(|m| m.replace('-', "_"))
        .collect())
}

/// Every module after the ones it depends on.
fn load_order(found: &BTreeMap<String, (Vec<u8>, Vec<String>)>) -> Result<Vec<String>> {
    let mut order: Vec<String> = Vec::new();
    while order.len() < found.len() {
        let ready: Vec<String> = found
            .iter()
            .filter(|(m, (_, depends))| {
                !order.contains(m) && depends.iter().all(|d| order.contains(d))
            })
            .map(|(m, _)| m.clone())
            .collect();
        ensure!(
            !ready.is_empty(),
            "the IPVS modules depend on each other in a cycle"
        );
        order.extend(ready);
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_dependencies_and_their_order() {
        let ko =
            b"\x7fELF...\0license=GPL\0depends=nf_conntrack,libcrc32c,nf_defrag_ipv6\0intree=Y\0";
        assert_eq!(
            depends(ko).expect("depends"),
            ["nf_conntrack", "libcrc32c", "nf_defrag_ipv6"]
        );
        assert!(depends(b"\0depends=\0").expect("none").is_empty());
        let module = |deps: &[&str]| (Vec::new(), deps.iter().map(|d| (*d).to_owned()).collect());
        let found: BTreeMap<String, (Vec<u8>, Vec<String>)> = [
            ("ip_vs_rr", module(&["ip_vs"])),
            ("ip_vs", module(&["nf_conntrack", "libcrc32c"])),
            ("nf_conntrack", module(&["nf_defrag_ipv4", "libcrc32c"])),
            ("nf_defrag_ipv4", module(&[])),
            ("libcrc32c", module(&[])),
        ]
        .into_iter()
        .map(|(m, v)| (m.to_owned(), v))
        .collect();
        assert_eq!(
            load_order(&found).expect("order"),
            [
                "libcrc32c",
                "nf_defrag_ipv4",
                "nf_conntrack",
                "ip_vs",
                "ip_vs_rr"
            ]
        );
    }
}
