//! The `tollgate` command line. Everything under `cli/` belongs to the binary only: the library
//! (`lib.rs`) never sees it.

pub mod demo;
pub mod serve;
