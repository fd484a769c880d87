//! The one integration-test binary (one link, many areas).

mod backfill;
mod clarivum;
mod cluster;
mod corpus;
mod executor;
mod faults;
mod harness;
mod plan;
mod trigger;
