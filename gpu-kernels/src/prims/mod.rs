//! The primitive layer: everything a kernel needs from the hardware, with one
//! implementation per target (`nvptx.rs` for the GPU, `emu.rs` for the host emulator)
//! behind identical signatures, plus helpers written once on top of them (element types,
//! warp/block reductions). Kernels `use crate::prims::*` and read like ordinary Rust;
//! on nvptx this also brings in the few `core` items the kernels use (from `minicore`).
//!
//! Conventions: blocks are one-dimensional (`thread_idx()`, `block_dim()`), grids up to
//! three-dimensional; warp operations must be called by all 32 lanes of a warp.

#[cfg(target_arch = "nvptx64")]
mod nvptx;
#[cfg(target_arch = "nvptx64")]
pub use crate::minicore::{Clone, Copy, PtrAdd, Sized};
#[cfg(target_arch = "nvptx64")]
pub use nvptx::*;

#[cfg(not(target_arch = "nvptx64"))]
pub mod emu;
#[cfg(not(target_arch = "nvptx64"))]
pub use emu::*;

pub const WARP: u32 = 32;
pub const U32_MAX: u32 = 0xffff_ffff;
pub const LOG2E: f32 = 1.442_695_f32;

#[inline(always)]
pub fn lane_id() -> u32 {
    thread_idx() & 31
}
#[inline(always)]
pub fn warp_id() -> u32 {
    thread_idx() >> 5
}
#[inline(always)]
pub fn shfl_xor_f32(v: f32, lane_mask: u32) -> f32 {
    f32_from_bits(shfl_xor_u32(f32_to_bits(v), lane_mask))
}
#[inline(always)]
pub fn shfl_idx_f32(v: f32, src: u32) -> f32 {
    f32_from_bits(shfl_idx_u32(f32_to_bits(v), src))
}
/// Sum over the whole warp (every lane gets the result).
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor_f32(v, m);
        m >>= 1;
    }
    v
}
/// Max over the whole warp (every lane gets the result).
#[inline(always)]
pub fn warp_max(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v = fmax(v, shfl_xor_f32(v, m));
        m >>= 1;
    }
    v
}
/// Sum over groups of `width` lanes (`width` a power of two <= 32).
#[inline(always)]
pub fn group_sum(mut v: f32, width: u32) -> f32 {
    let mut m = width >> 1;
    while m > 0 {
        v += shfl_xor_f32(v, m);
        m >>= 1;
    }
    v
}
/// Block-wide sum; `scratch` is a shared array of at least `block_dim()/32` floats.
/// Contains barriers: every thread of the block must call it.
#[inline(always)]
pub unsafe fn block_sum(v: f32, scratch: *mut f32) -> f32 {
    let w = warp_sum(v);
    if lane_id() == 0 {
        *scratch.add(warp_id() as usize) = w;
    }
    sync_threads();
    let nw = block_dim() >> 5;
    let mut s = 0.0f32;
    let mut i = 0;
    while i < nw {
        s += *scratch.add(i as usize);
        i += 1;
    }
    sync_threads();
    s
}
/// Block-wide max (see [`block_sum`]).
#[inline(always)]
pub unsafe fn block_max(v: f32, scratch: *mut f32) -> f32 {
    let w = warp_max(v);
    if lane_id() == 0 {
        *scratch.add(warp_id() as usize) = w;
    }
    sync_threads();
    let nw = block_dim() >> 5;
    let mut s = *scratch;
    let mut i = 1;
    while i < nw {
        s = fmax(s, *scratch.add(i as usize));
        i += 1;
    }
    sync_threads();
    s
}

/// e^x through `exp2` (GPU: `ex2.approx`).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp2(x * LOG2E)
}
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32_from_bits((h as u32) << 16)
}
#[inline(always)]
pub fn umin(a: u32, b: u32) -> u32 {
    if a < b {
        a
    } else {
        b
    }
}
#[inline(always)]
pub fn umax(a: u32, b: u32) -> u32 {
    if a > b {
        a
    } else {
        b
    }
}
#[inline(always)]
pub fn div_ceil(a: u32, b: u32) -> u32 {
    (a + b - 1) / b
}
/// Unpack two bf16 stored in one 32-bit word (low half first).
#[inline(always)]
pub fn bf16x2_to_f32(w: u32) -> (f32, f32) {
    (f32_from_bits(w << 16), f32_from_bits(w & 0xffff_0000))
}
#[inline(always)]
pub fn pack_bf16x2(lo: f32, hi: f32) -> u32 {
    (f32_to_bf16(lo) as u32) | ((f32_to_bf16(hi) as u32) << 16)
}

/// bf16 storage type (bits).
#[repr(transparent)]
pub struct Bf16(pub u16);
/// IEEE half storage type (bits).
#[repr(transparent)]
pub struct F16(pub u16);
impl Clone for Bf16 {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for Bf16 {}
impl Clone for F16 {
    #[inline(always)]
    fn clone(&self) -> Self {
        *self
    }
}
impl Copy for F16 {}

/// A storage element type: arithmetic always happens in f32.
pub trait Elem: Copy {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// Round an f32 to this type's precision (what PyTorch does after every op).
    #[inline(always)]
    fn round(x: f32) -> f32 {
        Self::from_f32(x).to_f32()
    }
}
impl Elem for Bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        Bf16(f32_to_bf16(x))
    }
}
impl Elem for F16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        F16(f32_to_f16(x))
    }
}
impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
}
