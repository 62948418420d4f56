//! The GPU kernels of `gpu-kernels/`, compiled to PTX by `build.rs` and embedded here.
//!
//! One PTX module per architecture holds every kernel; load it once per device
//! (`cuModuleLoadData`) and look kernels up by name. [`FAMILIES`] lists the kernel names
//! per family (in every module), [`arch_only`] the kernels only one module has (the
//! sm_90a module's wgmma GEMMs), [`names`] all of a module's; [`kernel`] finds a
//! kernel's family. Launch shapes and argument lists are documented on each kernel in
//! `gpu-kernels/src/` and in `docs/kernels.md`.

/// Target architecture of a PTX module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere (A100): `sm_80`.
    Sm80,
    /// `sm_90`: Hopper without its arch-specific instructions; also what later GPUs
    /// (compute capability 9.x other than 9.0, 10.x, 12.x) JIT.
    Sm90,
    /// Hopper (H100/H200, compute capability 9.0 exactly): `sm_90a`, every kernel of
    /// the sm_90 module plus the wgmma ones (sm_90a code runs on 9.0 only).
    Sm90a,
}

impl Arch {
    /// The architecture to use for a device of compute capability `major.minor`
    /// (`None` below sm_80: the kernels need `cp.async`, `ldmatrix` and bf16 `mma`).
    pub fn for_compute_capability(major: u32, minor: u32) -> Option<Arch> {
        match (major, minor) {
            (9, 0) => Some(Arch::Sm90a),
            (9.., _) => Some(Arch::Sm90),
            (8, _) => Some(Arch::Sm80),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
            Arch::Sm90a => "sm_90a",
        }
    }
}

static PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm80.ptx"));
static PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm90.ptx"));
static PTX_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm90a.ptx"));

/// The PTX module (all kernels) for `arch`.
pub fn ptx(arch: Arch) -> &'static str {
    match arch {
        Arch::Sm80 => PTX_SM80,
        Arch::Sm90 => PTX_SM90,
        Arch::Sm90a => PTX_SM90A,
    }
}

/// Kernel families, one source file each in `gpu-kernels/src/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `reshard.rs`: strided 2-D region copies, pack/unpack of send buffers.
    Reshard,
    /// `gemm.rs`: bf16 GEMM, tensor-core prefill path and weight-streaming decode path.
    Gemm,
    /// `attention.rs`: paged decode attention (split-K) and causal prefill attention.
    Attention,
    /// `small.rs`: RMSNorm, RoPE, SiLU·mul, embedding, residual add, argmax, top-p.
    Small,
}

/// Every kernel name, per family: the kernels every module has.
pub const FAMILIES: &[(Family, &[&str])] = &[
    (Family::Reshard, RESHARD),
    (Family::Gemm, GEMM),
    (Family::Attention, ATTENTION),
    (Family::Small, SMALL),
];

const RESHARD: &[&str] = &["reshard_copy2d", "reshard_copy2d_batched"];
const GEMM: &[&str] = &[
    "gemm_decode_bf16",
    "gemm_decode64_bf16",
    "gemm_decode_bf16_f32out",
    "gemm_decode_qkv_bf16",
    "gemm_decode_qkv_rope_bf16",
    "gemm_decode_silu_bf16",
    "gemm_decode_splitk_bf16",
    "gemm_splitk_reduce_bf16",
    "gemm_splitk_reduce_bf16_f32out",
    "gemm_mma_bf16",
    "gemm_mma_bf16_f32out",
    "gemm_mma_silu_bf16",
    "gemm_mma_wide_bf16",
    "gemm_mma_wide_bf16_f32out",
    "gemm_mma_wide_silu_bf16",
];
/// The sm_90a module's own kernels (`gpu-kernels/src/gemm_wgmma.rs`, family
/// [`Family::Gemm`]): not in [`FAMILIES`], which every module and the emulated device
/// offer.
pub const SM90A_ONLY: &[&str] = &[
    "gemm_wgmma_bf16",
    "gemm_wgmma_bf16_f32out",
    "gemm_wgmma_silu_bf16",
];

/// The kernels only `arch`'s module has (beside [`FAMILIES`]).
pub fn arch_only(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Sm90a => SM90A_ONLY,
        Arch::Sm80 | Arch::Sm90 => &[],
    }
}

/// Every kernel of `arch`'s module: [`FAMILIES`], then [`arch_only`].
pub fn names(arch: Arch) -> impl Iterator<Item = &'static str> {
    FAMILIES
        .iter()
        .flat_map(|(_, names)| names.iter().copied())
        .chain(arch_only(arch).iter().copied())
}

const ATTENTION: &[&str] = &[
    "attn_decode_bf16",
    "attn_decode_combine_bf16",
    "attn_decode_pipelined_bf16",
    "attn_prefill_bf16",
    "attn_prefill_mma_bf16",
    "kv_cache_write_bf16",
    "rope_kv_write_bf16",
];
const SMALL: &[&str] = &[
    "rmsnorm_bf16",
    "rmsnorm_f16",
    "rmsnorm_f32",
    "add_rmsnorm_bf16",
    "add_rmsnorm_f16",
    "add_rmsnorm_f32",
    "rope_bf16",
    "rope_f16",
    "rope_f32",
    "silu_mul_bf16",
    "silu_mul_f16",
    "silu_mul_f32",
    "residual_add_bf16",
    "residual_add_f16",
    "residual_add_f32",
    "embedding_bf16",
    "embedding_f16",
    "embedding_f32",
    "argmax_bf16",
    "argmax_f16",
    "argmax_f32",
    "top_p_sample_f32",
];

/// Dynamic shared memory (bytes) every launch of kernel `name` needs: CUDA's
/// `sharedMemBytes`, which the backends pass by kernel name (the CUDA backend also
/// The argument list of the plain GEMM kernels (`gemm_decode_bf16*`, `gemm_mma*_bf16*`,
/// `gemm_wgmma_bf16*`): `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias) (+ residual)` with row
/// strides `ldx` (x) and `ldy` (y, residual); device pointers, 0 for no bias / residual.
pub fn gemm_args(
    [y, x, w, bias, residual]: [u64; 5],
    (m, n, k): (usize, usize, usize),
    (ldx, ldy): (usize, usize),
) -> [crate::backend::device::Arg; 10] {
    use crate::backend::device::Arg::{Ptr, U32};
    [
        Ptr(y),
        Ptr(x),
        Ptr(w),
        Ptr(bias),
        Ptr(residual),
        U32(m as u32),
        U32(n as u32),
        U32(k as u32),
        U32(ldx as u32),
        U32(ldy as u32),
    ]
}

/// raises the function's `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES` to it at
/// module load, as it is over the default 48 KiB). 0 for kernels whose shared memory is
/// all static. Such kernels trap when launched with less.
pub fn dynamic_smem(name: &str) -> u32 {
    match name {
        "gemm_mma_wide_bf16" | "gemm_mma_wide_bf16_f32out" | "gemm_mma_wide_silu_bf16" => {
            remp_gpu_kernels::gemm::MMA_WIDE_SMEM
        }
        "gemm_wgmma_bf16" | "gemm_wgmma_bf16_f32out" | "gemm_wgmma_silu_bf16" => {
            remp_gpu_kernels::gemm_wgmma::WGMMA_SMEM
        }
        _ => 0,
    }
}

/// The family of the kernel called `name`, if there is one (in any module).
pub fn kernel(name: &str) -> Option<Family> {
    if SM90A_ONLY.contains(&name) {
        return Some(Family::Gemm);
    }
    FAMILIES
        .iter()
        .find(|(_, names)| names.contains(&name))
        .map(|(f, _)| *f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(ptx: &str) -> Vec<&str> {
        ptx.lines()
            .filter_map(|l| l.trim().strip_prefix(".visible .entry "))
            .map(|l| l.split('(').next().unwrap().trim())
            .collect()
    }

    const ARCHS: [Arch; 3] = [Arch::Sm80, Arch::Sm90, Arch::Sm90a];

    #[test]
    fn every_listed_kernel_is_in_the_ptx_and_back() {
        for arch in ARCHS {
            let mut found = entries(ptx(arch));
            found.sort_unstable();
            let mut listed: Vec<&str> = names(arch).collect();
            listed.sort_unstable();
            assert_eq!(found, listed, "{}", arch.name());
            assert!(!ptx(arch).contains(".extern .func"));
            assert!(ptx(arch).contains(&format!(".target {}", arch.name())));
            // wgmma only where the target has it
            assert_eq!(ptx(arch).contains("wgmma."), arch == Arch::Sm90a);
        }
        assert_eq!(kernel("gemm_mma_bf16"), Some(Family::Gemm));
        assert_eq!(kernel("gemm_wgmma_bf16"), Some(Family::Gemm));
        assert_eq!(kernel("nope"), None);
    }

    /// sm_90a code runs only on compute capability 9.0; later GPUs JIT the sm_90 module.
    #[test]
    fn arch_per_compute_capability() {
        let cc = |a, b| Arch::for_compute_capability(a, b);
        assert_eq!(cc(7, 5), None);
        assert_eq!(cc(8, 0), Some(Arch::Sm80));
        assert_eq!(cc(8, 9), Some(Arch::Sm80));
        assert_eq!(cc(9, 0), Some(Arch::Sm90a));
        assert_eq!(cc(10, 0), Some(Arch::Sm90));
        assert_eq!(cc(12, 0), Some(Arch::Sm90));
    }

    /// A kernel uses the module's dynamic shared memory exactly when `dynamic_smem`
    /// gives it some (else its launches would trap, or pass memory it ignores).
    #[test]
    fn dynamic_smem_matches_the_ptx() {
        for arch in ARCHS {
            let text = ptx(arch);
            let mut seen = 0;
            for body in text.split(".visible .entry ").skip(1) {
                let name = body.split('(').next().unwrap().trim();
                let uses = body.contains("remp_dyn_smem");
                assert_eq!(uses, dynamic_smem(name) > 0, "{name} ({})", arch.name());
                seen += 1;
            }
            assert_eq!(seen, names(arch).count());
        }
        // every module's kernels fit sm_86/sm_89's 99 KiB per block (they run the sm_80
        // module); the sm_90a-only ones sm_90's 227 KiB
        for name in names(Arch::Sm80) {
            assert!(dynamic_smem(name) <= 99 * 1024, "{name}");
        }
        for name in SM90A_ONLY {
            assert!(dynamic_smem(name) <= 227 * 1024, "{name}");
        }
        assert_eq!(dynamic_smem("gemm_wgmma_bf16"), 193 * 1024);
        // over the 48 KiB default, within every sm_80+ GPU's opt-in limit (99 KiB on
        // sm_86/sm_89, 163 KiB A100, 227 KiB H100/H200)
        assert_eq!(dynamic_smem("gemm_mma_wide_bf16"), 96 * 1024);
        assert_eq!(dynamic_smem("gemm_mma_bf16"), 0);
    }

    /// Through the emulated device (which, like the CUDA backend, gives a launch its
    /// kernel's `dynamic_smem`), the wide GEMM runs and equals `gemm_mma_bf16` bit for bit.
    #[test]
    fn emulated_device_launches_the_wide_gemm() {
        use crate::backend::device::{download_vec, emu::EmuDevice, upload_new, Arg, Device};
        let dev = EmuDevice::new();
        let (m, n, k) = (300usize, 136usize, 168usize);
        let bits = |i: usize, s: usize| 0x3c00u16 + ((i * s) % 509) as u16; // bf16 in [2^-7, 2^-3)
        let x: Vec<u16> = (0..m * k)
            .map(|i| bits(i, 7) ^ (i as u16 & 0x8000))
            .collect();
        let w: Vec<u16> = (0..n * k)
            .map(|i| bits(i, 13) | ((i as u16 & 1) << 15))
            .collect();
        let (xb, wb) = (upload_new(&dev, &x).unwrap(), upload_new(&dev, &w).unwrap());
        let mut outs = vec![];
        for (name, bm, block) in [
            ("gemm_mma_bf16", 128, 128),
            ("gemm_mma_wide_bf16", 256, 256),
        ] {
            let y = upload_new(&dev, &vec![0xFFFFu16; m * n]).unwrap();
            let mut args = vec![Arg::from(&y), Arg::from(&xb), Arg::from(&wb)];
            args.extend([Arg::Ptr(0), Arg::Ptr(0)]);
            args.extend([m, n, k, k, n].map(|v| Arg::U32(v as u32)));
            let grid = [n.div_ceil(128) as u32, m.div_ceil(bm) as u32, 1];
            unsafe { dev.launch(name, grid, block, &args) }.unwrap();
            outs.push(download_vec::<u16>(&dev, &y, m * n).unwrap());
        }
        assert!(!outs[1].contains(&0xFFFF), "an output left unwritten");
        assert!(outs[0] == outs[1], "wide and 128x128 GEMMs differ");
    }
}
