-- Control schema version 1 → 2: backfills at the physical limit (issue 12),
-- replication-aware throttles (issue 15). Run by `migrations.rs` inside one
-- transaction, under the creation lock, only when `meta.schema_version` is 1;
-- every statement is also safe to run twice. Adding
-- a column with a constant default rewrites nothing (PostgreSQL 11+): each ALTER
-- holds its table's lock only for a catalog update.

-- The run epoch: bumped each time a runner takes the plan's lock. Every backfill
-- batch checks it inside its own statement, so a runner that lost the lock to
-- another applies no further batch (fencing).
ALTER TABLE __SCHEMA__.plans ADD COLUMN IF NOT EXISTS run_epoch bigint NOT NULL DEFAULT 0;

-- What a running backfill reports about itself, written by its coordinator about
-- once a second: current rate, ETA, batch size, and why it is throttled.
ALTER TABLE __SCHEMA__.steps ADD COLUMN IF NOT EXISTS progress jsonb;

-- The epoch of the runner that owns each worker range now, and the rows each
-- range's batches changed. Each batch writes only its own range row, so workers
-- never serialise on a shared row; the step's totals are derived from these.
ALTER TABLE __SCHEMA__.backfill_ranges ADD COLUMN IF NOT EXISTS epoch bigint NOT NULL DEFAULT 0;
ALTER TABLE __SCHEMA__.backfill_ranges ADD COLUMN IF NOT EXISTS rows_updated bigint NOT NULL DEFAULT 0;

-- Version 1 counted the rows changed on the step's row; carry that count over to
-- worker 0 of a backfill that was under way when the schema was upgraded.
UPDATE __SCHEMA__.backfill_ranges AS r
SET rows_updated = (s.checkpoint->>'rows_updated')::bigint
FROM __SCHEMA__.steps AS s
WHERE s.plan_id = r.plan_id AND s.name = r.step AND r.worker = 0 AND r.rows_updated = 0
  AND jsonb_typeof(s.checkpoint->'rows_updated') = 'number';
