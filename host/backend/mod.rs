//! Backends: the communication layer every inter-worker byte goes through, and the
//! compute of each device kind: `cpu` (f32 reference ops), and `device` (the Rust GPU
//! kernels, on a CUDA GPU through `cuda` or on the host emulator).

pub mod collective;
pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod device;
