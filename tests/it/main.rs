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
mod harness;
mod hostile;
mod live;
mod locks;
mod plan;
mod proof;
mod regressions;
mod replica;
mod replication;
mod runtime;
mod status;
mod tls;
mod trigger;
mod upgrade;
