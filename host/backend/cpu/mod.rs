//! The CPU backend: f32 reference kernels run by worker threads.

pub mod ops;
