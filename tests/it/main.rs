//! The one integration-test binary (one link, many areas).

mod harness;
mod plan;
mod trigger;
