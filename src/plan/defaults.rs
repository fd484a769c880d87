//! Defaults for every setting a plan can leave out. This is the one place they live;
//! docs/plan-format.md repeats them for readers.

use std::time::Duration;
/// The longest any application query may queue behind one of our DDL statements.
pub const LOCK_TIMEOUT: Duration = Duration::from_millis(500);
/// A statement that runs longer is cancelled (it is most likely scanning under a lock).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Lock-timeout retries per statement before the step fails.
pub const RETRIES: u32 = 30;
/// A `run` step or hook that runs longer is killed.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a `check` with `wait` polls.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Backfill batches.
pub const BATCH_SIZE: u32 = 1000;
pub const MIN_BATCH_SIZE: u32 = 100;
pub const MAX_BATCH_SIZE: u32 = 50_000;
pub const BATCH_SIZE_LIMIT: u32 = 1_000_000;
pub const WORKERS: u32 = 1;
pub const WORKERS_LIMIT: u32 = 32;
pub const SLEEP: Duration = Duration::ZERO;
