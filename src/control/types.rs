//! The control table's vocabulary as Rust types: the status of a plan or step,
//! the events of the log with their details, the operator's live overrides of a
//! backfill, and a backfill's checkpoint. Each is written and read through its
//! type here; the strings they are stored as appear nowhere else.

use std::error::Error as StdError;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tokio_postgres::types::{FromSql, Type};

/// Where a plan or a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not started (or rolled back and not started again).
    Pending,
    /// A runner works on it now, or died while it did (its lock tells which).
    Running,
    Succeeded,
    Failed,
    /// Stopped resumably: an interrupt, a lost connection.
    Interrupted,
    /// A gate waits for the operator.
    Waiting,
    RolledBack,
}

impl Status {
    /// Every status, in the order the schema's CHECK constraint lists them.
    pub const ALL: [Status; 7] = [
        Status::Pending,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Interrupted,
        Status::Waiting,
        Status::RolledBack,
    ];

    /// The status as stored in the control tables and printed by `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Interrupted => "interrupted",
            Status::Waiting => "waiting",
            Status::RolledBack => "rolled_back",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// A step in this status has ended (its `finished_at` is set).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::RolledBack
        )
    }

    /// `'pending', 'running', …`: the list for the schema's CHECK constraints.
    pub fn sql_list() -> String {
        Status::ALL
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'a> FromSql<'a> for Status {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Status, Box<dyn StdError + Sync + Send>> {
        let s = <&str as FromSql>::from_sql(ty, raw)?;
        Status::parse(s).ok_or_else(|| format!("unknown status `{s}` in the control table").into())
    }

    fn accepts(ty: &Type) -> bool {
        <&str as FromSql>::accepts(ty)
    }
}

/// The operator's live overrides of a running backfill (`pgshift throttle`),
/// stored in `steps.overrides` and read by the backfill before each batch.
/// A field left out is not overridden; a patch merges into what is stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_ms: Option<u64>,
    /// `0` lifts the plan's cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows_per_sec: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
}

impl Overrides {
    pub fn is_empty(&self) -> bool {
        *self == Overrides::default()
    }

    /// Reads stored overrides; a value that is not what pgshift writes counts as none.
    pub fn from_json(v: &Json) -> Overrides {
        serde_json::from_value(v.clone()).unwrap_or_default()
    }

    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or_else(|_| Json::Object(Default::default()))
    }
}

/// What a backfill step records when it fixes its key range (`steps.checkpoint`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The key columns, in order.
    #[serde(default)]
    pub key: Vec<String>,
    /// The largest key when the step started (the range's end); `None` for an empty table.
    #[serde(default)]
    pub upper_key: Option<Json>,
    #[serde(default)]
    pub workers: u32,
    /// The batch size the run started with.
    #[serde(default)]
    pub batch_size: u32,
    /// Rows the batches changed (the rest of the range already had the right values).
    #[serde(default)]
    pub rows_updated: u64,
}

impl Checkpoint {
    pub fn from_json(v: &Json) -> Option<Checkpoint> {
        serde_json::from_value(v.clone()).ok()
    }

    pub fn to_json(&self) -> Json {
        serde_json::to_value(self).unwrap_or(Json::Null)
    }
}

/// The output of a shell command, as the events log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandOutput {
    pub command: String,
    pub code: Option<i32>,
    #[serde(default)]
    pub timed_out: bool,
    #[serde(default)]
    pub elapsed_ms: u64,
    pub output: String,
}

/// A hook that ran (or could not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookRun {
    pub hook: String,
    pub command: String,
    pub code: Option<i32>,
    pub output: String,
}

/// One entry of the events log: its name is the variant, its details the fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", content = "detail", rename_all = "snake_case")]
pub enum Event {
    PlanRegistered {
        checksum: String,
        file: String,
        by: String,
        steps: usize,
    },
    RunStarted {
        mode: String,
        runner: String,
    },
    RunResumed {
        mode: String,
        runner: String,
    },
    PlanChangeAccepted {
        recorded: String,
        current: String,
        by: String,
    },
    Reconnected {
        after: Option<String>,
    },
    FoundInterrupted {
        previous_status: Status,
    },
    StepStarted {
        kind: String,
        phase: String,
        attempt: i32,
    },
    StepSucceeded {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    StepFailed {
        error: String,
        sqlstate: Option<String>,
    },
    Interrupted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sqlstate: Option<String>,
    },
    GateWaiting {
        message: String,
    },
    GatePassed {
        by: String,
        who: String,
    },
    PlanSucceeded {},
    BackfillPassRestarted {
        why: String,
    },
    RunOutput(CommandOutput),
    RollbackOutput(CommandOutput),
    Hook(HookRun),
    HookFailed(HookRun),
    RollbackStarted {
        by: String,
    },
    RollbackBlocked {},
    RollbackDone {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    RollbackFinished {},
    Retry {
        attempt: u32,
        of: u32,
        error: String,
        sqlstate: Option<String>,
        backoff_ms: u64,
    },
    RetriesExhausted {
        attempts: u32,
        error: String,
        sqlstate: Option<String>,
    },
    LockWait {
        attempt: u32,
        relation: String,
        blocker_pid: i32,
        blocker_type: String,
        blocker_query: String,
    },
    InvalidIndexDropped {
        index: String,
    },
    BackfillRangeFixed {
        key: Vec<String>,
        upper_key: Option<Json>,
        boundaries: Vec<Json>,
        workers: usize,
        rows_total: Option<i64>,
    },
    /// The backfill applied the operator's overrides (the details are the overrides).
    OverrideApplied(Overrides),
    /// `pgshift throttle` stored a patch of overrides.
    OverrideSet {
        set: Overrides,
        by: String,
    },
    /// `pgshift backfill` was given throttles on the command line.
    CliOverrides {
        batch_size: Option<u32>,
        sleep_ms: Option<u64>,
        max_rows_per_sec: Option<u32>,
        target_batch_time_ms: Option<u64>,
        workers: Option<u32>,
        step: Option<String>,
        by: String,
    },
    BatchRetry {
        worker: i32,
        sqlstate: Option<String>,
        error: String,
        attempt: u32,
        batch_size: u32,
        next_batch_size: u32,
    },
    ThrottleHold {
        worker: i32,
        reason: String,
    },
    ThrottleReleased {
        worker: i32,
        was: String,
    },
    VerifyFailed {
        missed: i64,
    },
    BackfillFinished {
        rows_done: u64,
        verified_missed: Option<i64>,
    },
    /// The catalog facts the plan's operations were expanded with (read at its first run).
    CatalogRead {
        catalog: Json,
    },
    /// The pre-flight found what would make the plan fail; nothing was changed.
    PreflightFailed {
        findings: Vec<String>,
    },
    /// Rows whose dual write failed were checked again before a gate or the contract phase.
    TriggerFailuresChecked {
        fixed: usize,
        open: usize,
        unchecked: usize,
    },
    /// A backfill batch failed; narrowing it found the first row that fails.
    BackfillRowFailed {
        worker: i32,
        key: Json,
        error: String,
        sqlstate: Option<String>,
        /// Statements the narrowing ran (the smaller batches that committed included).
        statements: u32,
    },
    /// A failing backfill batch passed once narrowed: the error did not come back.
    BackfillNarrowed {
        worker: i32,
        error: String,
        statements: u32,
    },
    /// What the plan needs or created is gone or changed (someone else changed the database).
    DriftFound {
        object: String,
        found: String,
        expected: String,
    },
    /// `pgshift finalize` dropped what the contract phase set aside.
    Finalized {
        by: String,
        steps: Vec<String>,
    },
}

impl Event {
    /// The event's name and its details, as the `events` table stores them.
    pub fn to_row(&self) -> (String, Json) {
        let mut v = serde_json::to_value(self).unwrap_or(Json::Null);
        let name = v
            .get("event")
            .and_then(Json::as_str)
            .unwrap_or("unknown")
            .to_string();
        let detail = match v.get_mut("detail").map(Json::take) {
            Some(Json::Null) | None => Json::Object(Default::default()),
            Some(d) => d,
        };
        (name, detail)
    }

    /// Reads a stored event back; `None` for a name or shape this version does not know.
    pub fn from_row(name: &str, detail: &Json) -> Option<Event> {
        serde_json::from_value(serde_json::json!({"event": name, "detail": detail})).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_strings() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                Json::String(s.as_str().into())
            );
        }
        assert_eq!(Status::parse("done"), None);
    }

    #[test]
    fn events_are_stored_as_name_and_details_and_read_back() {
        let e = Event::Retry {
            attempt: 2,
            of: 31,
            error: "lock timeout".into(),
            sqlstate: Some("55P03".into()),
            backoff_ms: 180,
        };
        let (name, detail) = e.to_row();
        assert_eq!(name, "retry");
        assert_eq!(detail["sqlstate"], "55P03");
        assert_eq!(Event::from_row(&name, &detail), Some(e));

        let (name, detail) = Event::PlanSucceeded {}.to_row();
        assert_eq!(
            (name.as_str(), detail.clone()),
            ("plan_succeeded", serde_json::json!({}))
        );
        assert_eq!(
            Event::from_row(&name, &detail),
            Some(Event::PlanSucceeded {})
        );

        // The overrides are the details themselves: `detail->>'batch_size'` reads them.
        let (name, detail) = Event::OverrideApplied(Overrides {
            batch_size: Some(500),
            ..Default::default()
        })
        .to_row();
        assert_eq!(name, "override_applied");
        assert_eq!(detail, serde_json::json!({"batch_size": 500}));
    }

    #[test]
    fn overrides_leave_out_what_is_not_set() {
        let o = Overrides {
            paused: Some(true),
            ..Default::default()
        };
        assert_eq!(o.to_json(), serde_json::json!({"paused": true}));
        assert_eq!(
            Overrides::from_json(&serde_json::json!({"paused": true})),
            o
        );
        assert!(Overrides::from_json(&serde_json::json!("junk")).is_empty());
    }
}
