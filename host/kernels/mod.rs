//! The GPU kernels of `gpu-kernels/`, compiled to PTX by `build.rs` and embedded here.
//!
//! One PTX module per architecture holds every kernel; load it once per device
//! (`cuModuleLoadData`) and look kernels up by name. [`FAMILIES`] lists the kernel names
//! per family and [`kernel`] finds a kernel's family; launch shapes and argument lists
//! are documented on each kernel in `gpu-kernels/src/` and in `docs/kernels.md`.

/// Target architecture of a PTX module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    /// Ampere (A100): `sm_80`.
    Sm80,
    /// Hopper (H100/H200): `sm_90`.
    Sm90,
}

impl Arch {
    /// The architecture to use for a device of compute capability `major.minor`
    /// (`None` below sm_80: the kernels need `cp.async`, `ldmatrix` and bf16 `mma`).
    pub fn for_compute_capability(major: u32, minor: u32) -> Option<Arch> {
        match (major, minor) {
            (9.., _) => Some(Arch::Sm90),
            (8, _) => Some(Arch::Sm80),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }
}

static PTX_SM80: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm80.ptx"));
static PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/kernels_sm90.ptx"));

/// The PTX module (all kernels) for `arch`.
pub fn ptx(arch: Arch) -> &'static str {
    match arch {
        Arch::Sm80 => PTX_SM80,
        Arch::Sm90 => PTX_SM90,
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

/// Every kernel name, per family.
pub const FAMILIES: &[(Family, &[&str])] = &[
    (Family::Reshard, RESHARD),
    (Family::Gemm, GEMM),
    (Family::Attention, ATTENTION),
    (Family::Small, SMALL),
];

const RESHARD: &[&str] = &["reshard_copy2d", "reshard_copy2d_batched"];
const GEMM: &[&str] = &[
    "gemm_decode_bf16",
    "gemm_decode_bf16_f32out",
    "gemm_decode_silu_bf16",
    "gemm_decode_splitk_bf16",
    "gemm_splitk_reduce_bf16",
    "gemm_splitk_reduce_bf16_f32out",
    "gemm_mma_bf16",
    "gemm_mma_bf16_f32out",
    "gemm_mma_silu_bf16",
];
const ATTENTION: &[&str] = &[
    "attn_decode_bf16",
    "attn_decode_combine_bf16",
    "attn_decode_pipelined_bf16",
    "attn_prefill_bf16",
    "kv_cache_write_bf16",
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

/// The family of the kernel called `name`, if there is one.
pub fn kernel(name: &str) -> Option<Family> {
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

    #[test]
    fn every_listed_kernel_is_in_the_ptx_and_back() {
        for arch in [Arch::Sm80, Arch::Sm90] {
            let mut found = entries(ptx(arch));
            found.sort_unstable();
            let mut listed: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|(_, n)| n.iter().copied())
                .collect();
            listed.sort_unstable();
            assert_eq!(found, listed, "{}", arch.name());
            assert!(!ptx(arch).contains(".extern .func"));
        }
        assert_eq!(kernel("gemm_mma_bf16"), Some(Family::Gemm));
        assert_eq!(kernel("nope"), None);
    }
}
