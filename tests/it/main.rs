//! The one integration-test binary (one link, many areas).

mod backfill;
mod backfill_cli;
mod clarivum;
mod cluster;
mod corpus;
mod demo;
mod executor;
mod faults;
mod fencing;
mod fleet;
mod harness;
mod hostile;
mod lifecycle;
mod live;
mod locks;
mod one_trip;
mod ops;
mod plan;
mod proof;
mod pty;
mod regressions;
mod replica;
mod replication;
mod runtime;
#[macro_use]
mod runtime_cases;
mod runtime_data;
mod status;
mod terminal;
mod tls;
mod trigger;
mod upgrade;
mod ux;
