//! remp's GPU kernels, written once in Rust and compiled two ways:
//! - to PTX by rustc's NVPTX backend (`--target nvptx64-nvidia-cuda`, see the root
//!   `build.rs`): a `#![no_core]` crate whose few lang items live in [`minicore`];
//! - for the host against the real `core`, where [`prims`] is a CPU emulator (threads
//!   with real barriers, shared memory, warp shuffles, the `mma.sync` fragment layout),
//!   so `cargo test -p remp-gpu-kernels` checks every kernel against a CPU reference.
//!
//! See `docs/kernels.md` for the design, data layouts and the PTX report.
#![no_std]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(
        no_core,
        lang_items,
        abi_ptx,
        asm_experimental_arch,
        link_llvm_intrinsics,
        intrinsics,
        rustc_attrs,
        decl_macro,
        auto_traits
    )
)]
#![cfg_attr(target_arch = "nvptx64", no_core)]
#![cfg_attr(
    target_arch = "nvptx64",
    allow(internal_features, improper_ctypes_definitions, unnecessary_transmutes)
)]
// The kernel source also compiles as `#![no_core]` for nvptx64, where core's helpers
// (`div_ceil`, `is_multiple_of`, `f32::consts`, iterators) do not exist.
#![allow(
    clippy::missing_safety_doc,
    clippy::too_many_arguments,
    clippy::manual_div_ceil,
    clippy::manual_is_multiple_of,
    clippy::approx_constant,
    clippy::excessive_precision,
    clippy::needless_range_loop,
    clippy::while_let_loop,
    clippy::zero_ptr
)]

#[cfg(target_arch = "nvptx64")]
mod minicore;
#[cfg(not(target_arch = "nvptx64"))]
extern crate std;

/// Defines kernels: `extern "ptx-kernel"` entry points on the GPU, plain `unsafe fn`s
/// (run them with `prims::emu::launch`) on the host.
///
/// Every kernel starts with [`prims::pdl_wait`] and [`prims::pdl_launch_dependents`], so
/// the host may launch any of them with programmatic dependent launch (Hopper: the
/// kernel's blocks are scheduled while the previous kernel finishes, and wait for it
/// before touching memory). An optional `prefetch { .. }` block before the body runs
/// ahead of the wait: it may only read the kernel's arguments and issue
/// [`prims::prefetch_l2`] hints for memory no earlier kernel of the step writes (weights).
#[cfg(target_arch = "nvptx64")]
macro_rules! kernels {
    ($( $(#[$m:meta])* pub fn $name:ident($($a:ident : $t:ty),* $(,)?) $(prefetch $pre:block)? $body:block )*) => { $(
        $(#[$m])*
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name($($a: $t),*) {
            $( $pre )?
            $crate::prims::pdl_wait();
            $crate::prims::pdl_launch_dependents();
            $body
        }
    )* };
}
#[cfg(not(target_arch = "nvptx64"))]
macro_rules! kernels {
    ($( $(#[$m:meta])* pub fn $name:ident($($a:ident : $t:ty),* $(,)?) $(prefetch $pre:block)? $body:block )*) => { $(
        $(#[$m])*
        pub unsafe fn $name($($a: $t),*) {
            $( $pre )?
            $crate::prims::pdl_wait();
            $crate::prims::pdl_launch_dependents();
            $body
        }
    )* };
}

/// A statically sized shared-memory array of `$bytes` bytes, 16-byte aligned, named
/// `$name` in the PTX. Declare shared arrays at the top of the kernel body, outside any
/// branch or loop (the declaration must appear exactly once in each kernel).
#[cfg(target_arch = "nvptx64")]
macro_rules! shared_bytes {
    ($name:ident, $bytes:expr) => {{
        let p: u64;
        $crate::minicore::asm!(
            $crate::minicore::concat!(
                ".shared .align 16 .b8 ",
                $crate::minicore::stringify!($name),
                "[{n}];\n\tcvta.shared.u64 {p}, ",
                $crate::minicore::stringify!($name),
                ";"
            ),
            n = const $bytes,
            p = out(reg64) p,
            options(nostack)
        );
        p as *mut u8
    }};
}
#[cfg(not(target_arch = "nvptx64"))]
macro_rules! shared_bytes {
    ($name:ident, $bytes:expr) => {
        $crate::prims::shared_alloc($bytes)
    };
}

/// `unroll!(i in 0..N => { ... })` with N in {2, 4, 8, 16}: the body repeated with
/// `i` a constant (`usize`), like `#pragma unroll`. Register arrays indexed by an
/// unrolled counter stay in registers; with a runtime index they go to local memory.
macro_rules! unroll {
    ($i:ident in 0..2 => $body:block) => { unroll!(@ $i [0 1] $body) };
    ($i:ident in 0..4 => $body:block) => { unroll!(@ $i [0 1 2 3] $body) };
    ($i:ident in 0..8 => $body:block) => { unroll!(@ $i [0 1 2 3 4 5 6 7] $body) };
    ($i:ident in 0..16 => $body:block) => { unroll!(@ $i [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15] $body) };
    (@ $i:ident [$($n:literal)*] $body:block) => { $( { #[allow(unused)] let $i: usize = $n; $body } )* };
}

pub mod prims;

pub mod attention;
pub mod gemm;
/// The sm_90a-only kernels (wgmma): in the sm_90a PTX module and the host build only.
#[cfg(any(not(target_arch = "nvptx64"), target_feature = "sm_90a"))]
pub mod gemm_wgmma;
pub mod reshard;
pub mod small;
