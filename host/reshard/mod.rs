//! Online reconfiguration: the planner (which worker plays which new rank, what moves
//! where) and the executor (background copies, per-layer flips).

pub mod bench;
pub mod device;
pub mod executor;
pub mod planner;
