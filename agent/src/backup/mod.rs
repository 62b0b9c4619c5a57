//! Backups on the agent: the streaming file pipeline (`pipeline`) and the pure retention rule
//! (`retention`). Uploads go through `crate::objectstore`, the only module that talks S3.

pub mod pipeline;
pub mod retention;
