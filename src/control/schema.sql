-- pgshift's control schema as version 1 created it (the baseline; `migrate_N.sql`
-- bring it to the current version). Created on first use, idempotently.
-- `__SCHEMA__` is replaced by the quoted control schema name, `__STATUSES__`
-- and `__RUNNING__` by the statuses of `types.rs` (their one home).
-- A transaction-scoped advisory lock (taken by the caller) serialises two
-- runners that race to create it.

CREATE SCHEMA IF NOT EXISTS __SCHEMA__;

CREATE TABLE IF NOT EXISTS __SCHEMA__.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- One row per plan ever started against this database.
CREATE TABLE IF NOT EXISTS __SCHEMA__.plans (
    id               text PRIMARY KEY,
    checksum         text NOT NULL,
    file             text NOT NULL,
    description      text,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN (__STATUSES__)),
    applied_by       text NOT NULL,           -- user@host of the runner that started it
    application_name text,
    runner           text,                    -- who runs it now (user@host pid N), NULL when nobody
    runner_since     timestamptz,
    started_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);

-- One row per step of a plan.
CREATE TABLE IF NOT EXISTS __SCHEMA__.steps (
    plan_id       text NOT NULL REFERENCES __SCHEMA__.plans (id) ON DELETE CASCADE,
    position      integer NOT NULL,
    phase         text NOT NULL,
    name          text NOT NULL,
    kind          text NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN (__STATUSES__)),
    attempts      integer NOT NULL DEFAULT 0,
    started_at    timestamptz,
    finished_at   timestamptz,
    last_error    text,
    last_sqlstate text,
    checkpoint    jsonb,                      -- backfill: key range, batch size in use
    rows_done     bigint NOT NULL DEFAULT 0,
    rows_total    bigint,                     -- estimate
    overrides     jsonb NOT NULL DEFAULT '{}', -- live throttle overrides set by `pgshift throttle`
    PRIMARY KEY (plan_id, name),
    UNIQUE (plan_id, position)
);

-- At most one running step per plan.
CREATE UNIQUE INDEX IF NOT EXISTS steps_one_running ON __SCHEMA__.steps (plan_id) WHERE status = '__RUNNING__';

-- Backfill progress per worker: each worker owns one contiguous key range and
-- commits its checkpoint with every batch it applies.
CREATE TABLE IF NOT EXISTS __SCHEMA__.backfill_ranges (
    plan_id    text NOT NULL,
    step       text NOT NULL,
    worker     integer NOT NULL,
    lower_key  jsonb,                        -- exclusive; NULL = from the start
    upper_key  jsonb,                        -- inclusive; NULL = empty range
    last_key   jsonb,                        -- last key done; NULL = none yet
    rows_done  bigint NOT NULL DEFAULT 0,
    batches    bigint NOT NULL DEFAULT 0,
    batch_size integer,
    done       boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, step, worker),
    FOREIGN KEY (plan_id, step) REFERENCES __SCHEMA__.steps (plan_id, name) ON DELETE CASCADE
);

-- Append-only log of everything that happened, for the postmortem.
CREATE TABLE IF NOT EXISTS __SCHEMA__.events (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    plan_id text NOT NULL,
    step    text,
    event   text NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_plan ON __SCHEMA__.events (plan_id, id);

INSERT INTO __SCHEMA__.meta (key, value) VALUES ('schema_version', '1')
ON CONFLICT (key) DO NOTHING;
