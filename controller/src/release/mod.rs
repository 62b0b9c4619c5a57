//! Fleet releases: a version of an app rolled out to many hosts in waves, gated on health,
//! halted (and reverted) past a failure budget. `plan` (in the model, `drover_model::waves`,
//! because an app spec's `[release]` table is checked with it) decides which hosts go in which
//! wave; `engine` is the pure state machine a release follows. Both are pure; the task that
//! drives releases, their storage and their RPCs are built on them.

pub mod engine;
pub use drover_model::waves as plan;
