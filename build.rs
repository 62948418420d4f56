//! Compiles the GPU kernels (`gpu-kernels/src/lib.rs`) to PTX with the host's own rustc
//! and rustc's built-in NVPTX backend: no CUDA toolkit, no extra rustup target. The
//! crate is `#![no_core]` on nvptx64 and uses unstable features, hence
//! `RUSTC_BOOTSTRAP=1` for that child rustc only. Output: `$OUT_DIR/kernels_<arch>.ptx`
//! for every arch in `ARCHS`, embedded by `host/kernels/mod.rs`. The sm_90a module is
//! the whole crate again plus the kernels gated on `target_feature = "sm_90a"` (wgmma,
//! `gemm_wgmma.rs`), which the sm_80 / sm_90 modules must not contain. A failed
//! compile, a PTX that calls an undefined function (`.extern .func`, which would only
//! fail at module load), or wgmma in a module other than sm_90a fails the build.
use std::path::{Path, PathBuf};
use std::process::Command;

/// (name used in the file, rustc target-cpu).
const ARCHS: &[(&str, &str)] = &[("sm80", "sm_80"), ("sm90", "sm_90"), ("sm90a", "sm_90a")];

fn main() {
    println!("cargo:rerun-if-changed=gpu-kernels/src");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu-kernels/src/lib.rs");
    let caps = register_caps(&src.with_file_name("maxnreg.txt"));
    for (name, cpu) in ARCHS {
        let ptx = out.join(format!("kernels_{name}.ptx"));
        let result = Command::new(&rustc)
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .args([
                "--edition",
                "2021",
                "--crate-name",
                "remp_gpu_kernels",
                "--crate-type=lib",
            ])
            .args(["--target", "nvptx64-nvidia-cuda", "--emit=asm"])
            .args(["-C", "opt-level=3", "-C", &format!("target-cpu={cpu}")])
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .output()
            .expect("could not run rustc to build the GPU kernels");
        if !result.status.success() {
            panic!(
                "compiling gpu-kernels to PTX for {cpu} failed:\n{}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
        let text = cap_registers(&std::fs::read_to_string(&ptx).expect("read PTX"), &caps);
        std::fs::write(&ptx, &text).expect("write PTX");
        if let Some(line) = text.lines().find(|l| l.contains(".extern .func")) {
            panic!(
                "PTX for {cpu} calls an undefined function (inline it into the kernel crate): {line}"
            );
        }
        if !text.contains(".entry") {
            panic!("PTX for {cpu} has no kernels");
        }
        let wgmma = text.contains("wgmma.");
        if wgmma != (*cpu == "sm_90a") {
            panic!("PTX for {cpu}: wgmma instructions present = {wgmma} (only sm_90a has them)");
        }
    }
}

/// `gpu-kernels/src/maxnreg.txt`: (kernel name prefix, register cap) per line, `#`
/// comments (tools/ptx-report reads the same file).
fn register_caps(path: &Path) -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(path).expect("read gpu-kernels/src/maxnreg.txt");
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [prefix, n] => (
                prefix.to_string(),
                n.parse()
                    .unwrap_or_else(|_| panic!("maxnreg.txt: bad count in `{l}`")),
            ),
            _ => panic!("maxnreg.txt: expected `prefix count`, got `{l}`"),
        })
        .collect()
}

/// The PTX with `.maxnreg N` after the parameter list of every entry whose name starts
/// with a prefix of `caps` (a performance directive goes between the parameters and
/// the body). Panics if a capped entry's parameter list does not end on a line `)`.
fn cap_registers(ptx: &str, caps: &[(String, u32)]) -> String {
    let mut out = String::with_capacity(ptx.len() + 1024);
    let mut pending: Option<(String, u32)> = None;
    for line in ptx.lines() {
        if let Some(rest) = line.strip_prefix(".visible .entry ") {
            if let Some((name, _)) = &pending {
                panic!("PTX entry {name}: no `)` line closing its parameters");
            }
            let name = rest.split('(').next().unwrap_or(rest).to_string();
            pending = caps
                .iter()
                .find(|(p, _)| name.starts_with(p.as_str()))
                .map(|(_, n)| (name, *n));
        }
        out.push_str(line);
        out.push('\n');
        if line == ")" {
            if let Some((_, n)) = pending.take() {
                out.push_str(&format!(".maxnreg {n}\n"));
            }
        }
    }
    if let Some((name, _)) = pending {
        panic!("PTX entry {name}: no `)` line closing its parameters");
    }
    out
}
