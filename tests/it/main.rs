//! The one integration-test binary (one link, many areas).

mod backfill;
mod harness;
mod plan;
