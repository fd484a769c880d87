//! The one integration-test binary (one link, many areas).

mod backfill;
mod backfill_cli;
mod clarivum;
mod cluster;
mod corpus;
mod demo;
mod executor;
mod faults;
mod harness;
mod hostile;
mod locks;
mod plan;
mod proof;
mod pty;
mod regressions;
mod replica;
mod runtime;
mod status;
mod terminal;
mod tls;
mod trigger;
mod ux;
