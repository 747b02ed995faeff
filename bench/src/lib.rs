//! Pieces of the `offload` command line that other crates (the integration
//! tests) use too: the runtime's view of a loader model.

pub mod source;
