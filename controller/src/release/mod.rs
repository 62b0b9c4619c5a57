//! Fleet releases: a version of an app rolled out to many hosts in waves, gated on health,
//! halted (and reverted) past a failure budget. `plan` (in the model, `drover_model::waves`,
//! because an app spec's `[release]` table is checked with it) decides which hosts go in which
//! wave; `engine` is the pure state machine a release follows; `record` the release as stored
//! and the pure rules at its edges (options over the spec's `[release]`, health); `driver` the
//! one task that steps every running release, stores each new state (flushed) and only then
//! starts, cancels or rolls back jobs through `launch`.

pub mod driver;
pub mod engine;
pub mod record;
pub use drover_model::waves as plan;
