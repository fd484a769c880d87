//! The exit codes, the same for every command, in one place.

/// How a pgshift command ended, as the shell sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok = 0,
    /// A step failed; `status` says which and why.
    StepFailed = 1,
    /// Invalid plan or usage; nothing was changed.
    Invalid = 2,
    /// Stopped resumably: gate, interrupt, pause, lost connection.
    Resumable = 3,
    /// The plan is held by another runner.
    Locked = 4,
    /// The plan file changed since the plan started.
    PlanChanged = 5,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// An error that knows its exit code. Library errors implement it; `main` asks the chain.
pub trait ExitStatus {
    fn exit(&self) -> Exit;
}

impl ExitStatus for crate::plan::Error {
    fn exit(&self) -> Exit {
        Exit::Invalid
    }
}
