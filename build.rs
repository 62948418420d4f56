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
        let text = std::fs::read_to_string(&ptx).expect("read PTX");
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
