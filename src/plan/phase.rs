//! The four phases, in the only order they ever run.

use std::fmt;

/// The four phases, in the only order they ever run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Expand,
    DualWrite,
    Backfill,
    Contract,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Expand,
        Phase::DualWrite,
        Phase::Backfill,
        Phase::Contract,
    ];

    /// The phase's key in the plan file and in the control table.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Expand => "expand",
            Phase::DualWrite => "dual_write",
            Phase::Backfill => "backfill",
            Phase::Contract => "contract",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
