//! Backends: the communication layer every inter-worker byte goes through, and the
//! compute kernels of each device kind (`cpu` now).

pub mod comm;
pub mod cpu;
pub mod cuda;
