//! The one integration-test binary (one link, many areas).

mod corpus;
mod harness;
mod plan;
mod trigger;
