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
/// stored in `steps.overrides`. Every batch statement reads them (batch size and
/// pause take effect in the very batch that reads them; the rest right after it).
/// A field left out is not overridden; a patch merges into what is stored.
///
/// Precedence, lowest first: the plan, the flags of `pgshift backfill` (which
/// remove a stored override of the same setting when the run starts: the newer
/// instruction wins), then `pgshift throttle` during the run. `throttle --clear`
/// removes them all.
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
    /// Bytes; `0` lifts the plan's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_slot_lag: Option<u64>,
    /// The slots `max_slot_lag` watches; empty: every logical slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_inactive_slots: Option<bool>,
    /// Bytes of WAL per second; `0` lifts the plan's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wal_rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_on_autovacuum: Option<bool>,
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

    /// The overrides in words, for `status` and messages: `batch size 500, paused`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.batch_size {
            parts.push(format!("batch size {n}"));
        }
        if let Some(ms) = self.sleep_ms {
            parts.push(format!(
                "sleep {}",
                crate::duration::format(std::time::Duration::from_millis(ms))
            ));
        }
        match self.max_rows_per_sec {
            Some(0) => parts.push("no rows/s cap".into()),
            Some(n) => parts.push(format!("at most {n} rows/s")),
            None => {}
        }
        match self.max_slot_lag {
            Some(0) => parts.push("no slot lag limit".into()),
            Some(b) => parts.push(format!("max slot lag {}", crate::bytes::format(b))),
            None => {}
        }
        match self.slots.as_deref() {
            Some([]) => parts.push("every logical slot".into()),
            Some(s) => parts.push(format!("slots {}", s.join(", "))),
            None => {}
        }
        if let Some(i) = self.ignore_inactive_slots {
            parts.push(format!("ignore inactive slots: {}", on_off(i)));
        }
        match self.max_wal_rate {
            Some(0) => parts.push("no WAL rate limit".into()),
            Some(b) => parts.push(format!("max WAL rate {}/s", crate::bytes::format(b))),
            None => {}
        }
        if let Some(a) = self.pause_on_autovacuum {
            parts.push(format!(
                "pause on anti-wraparound autovacuum: {}",
                on_off(a)
            ));
        }
        match self.paused {
            Some(true) => parts.push("paused".into()),
            Some(false) => parts.push("not paused".into()),
            None => {}
        }
        parts.join(", ")
    }

    /// These overrides without the settings that `cli` sets (the flags of `pgshift
    /// backfill`), and the part removed.
    pub fn without(&self, cli: &Overrides) -> (Overrides, Overrides) {
        let mut kept = self.clone();
        let mut removed = Overrides::default();
        macro_rules! take {
            ($($f:ident),*) => {$(
                if cli.$f.is_some() && kept.$f.is_some() {
                    removed.$f = kept.$f.take();
                }
            )*};
        }
        take!(
            batch_size,
            sleep_ms,
            max_rows_per_sec,
            paused,
            max_slot_lag,
            slots,
            ignore_inactive_slots,
            max_wal_rate,
            pause_on_autovacuum
        );
        (kept, removed)
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// What a running backfill says about itself (`steps.progress`), written by its
/// coordinator about once a second and read by `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveProgress {
    /// Rows per second over the last few seconds (not since the start).
    pub rows_per_sec: f64,
    /// Time left at the current rate, never faster than the rows/s cap allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
    pub batch_size: u32,
    pub workers: u32,
    /// Why it is slowed or held right now, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttled: Option<String>,
    /// No batch runs until `throttled` clears (paused, or a signal holds it).
    #[serde(default)]
    pub held: bool,
    /// When the coordinator wrote this (the server's clock), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
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

/// One step as the plan file described it when the plan started (or when a
/// change was accepted): what `resume` compares a changed file against, step by step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSnapshot {
    pub name: String,
    pub phase: String,
    pub kind: String,
    /// What the step does (its SQL, trigger, backfill, check, message or command).
    pub body: String,
    /// Its lock timeout, statement timeout and retries.
    pub limits: String,
    /// How it is undone (its rollback, generated or written), or empty.
    pub rollback: String,
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
    /// The plan's steps as the file had them (first run, and each accepted change).
    PlanSnapshot {
        checksum: String,
        steps: Vec<StepSnapshot>,
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
    /// The backfill is held (version 1 recorded the worker; a step's signals now hold every worker).
    ThrottleHold {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<i32>,
        reason: String,
    },
    ThrottleReleased {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<i32>,
        was: String,
    },
    VerifyFailed {
        missed: i64,
    },
    /// The server started checkpoints close together while a backfill ran (said once per run).
    CheckpointPressure {
        checkpoints: i64,
        seconds: u64,
        max_wal_size: String,
    },
    BackfillFinished {
        rows_done: u64,
        verified_missed: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        verify_ms: Option<u64>,
    },
    /// A runner took the plan's lock; its batches carry this epoch.
    LockTaken {
        epoch: i64,
        runner: String,
    },
    /// This run took over a backfill's ranges from an earlier run (`previous` epoch).
    BackfillClaimed {
        epoch: i64,
        previous: i64,
    },
    /// A worker found that a newer run owns its range (or the plan): it applied nothing more.
    BackfillFenced {
        worker: i32,
        epoch: i64,
    },
    /// `pgshift throttle --clear` removed these overrides.
    OverridesCleared {
        cleared: Overrides,
        by: String,
    },
    /// Flags of `pgshift backfill` replaced these live overrides, set earlier.
    OverridesSuperseded {
        replaced: Overrides,
        by: String,
    },
    /// `--workers` was given for a step whose ranges were fixed with another count.
    WorkersUnchanged {
        requested: u32,
        fixed: u32,
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
