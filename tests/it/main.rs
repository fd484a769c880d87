//! The one integration-test binary (one link, many areas).

mod backfill;
mod clarivum;
mod cluster;
mod corpus;
mod executor;
mod harness;
mod plan;
mod replica;
mod trigger;
