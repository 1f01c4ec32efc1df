//! Builds the kernel programs (keepalive-ebpf) for the BPF target so the agent binary embeds
//! them. Needs the nightly toolchain with `rust-src` and `bpf-linker`; `cargo xtask build`
//! installs both and names the toolchain in KEEPALIVE_BPF_TOOLCHAIN.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=KEEPALIVE_BPF_TOOLCHAIN");
    let toolchain =
        std::env::var("KEEPALIVE_BPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    let package = aya_build::Package {
        name: "keepalive-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../keepalive-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(&toolchain))
}
