-- pgshift's control schema, version 3: failures of the dual-write triggers.
-- Applied in place to a version-2 schema (and right after the earlier scripts to a new
-- one), in one transaction under the control schema's advisory lock.
-- `__SCHEMA__` is replaced by the quoted control schema name.
--
-- A dual-write trigger must never fail an application's write. When its
-- expression raises for a row, the trigger catches it (an EXCEPTION block),
-- lets the write through as the application wrote it, and reports the row
-- here through `record_dual_write_failure`. The application's role (Supabase's
-- `authenticated`, say) has no privilege on these tables: the function runs as
-- its owner, the role that migrates (SECURITY DEFINER), with a pinned
-- search_path, and it records only what a pgshift trigger firing on its own
-- table reports.

-- The dual-write triggers that the plans of this control schema installed
-- (written by the trigger step, in its own transaction): which control schema
-- a failing trigger reports to when one database holds several.
CREATE TABLE IF NOT EXISTS __SCHEMA__.dual_writes (
    table_oid    oid NOT NULL,
    trigger      text NOT NULL,
    plan_id      text NOT NULL,
    step         text NOT NULL,
    installed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_oid, trigger)
);

-- One row per (plan, trigger step, table, row key) whose dual write failed.
CREATE TABLE IF NOT EXISTS __SCHEMA__.trigger_failures (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    plan_id     text NOT NULL,
    step        text NOT NULL,                 -- the step the trigger was generated for
    table_oid   oid NOT NULL,
    table_name  text NOT NULL,                 -- schema-qualified, when it failed
    key         jsonb,                         -- the row's primary key; NULL when the table has none
    sqlstate    text NOT NULL,
    error       text NOT NULL,
    hits        bigint NOT NULL DEFAULT 1,     -- writes of that row that failed
    first_at    timestamptz NOT NULL DEFAULT now(),
    last_at     timestamptz NOT NULL DEFAULT now(),
    resolved_at timestamptz,                   -- NULL while the row still needs fixing
    resolution  text                           -- how it was found fixed
);
CREATE UNIQUE INDEX IF NOT EXISTS trigger_failures_row
    ON __SCHEMA__.trigger_failures (plan_id, step, table_oid, (coalesce(key, 'null'::jsonb)));

-- Called by a failing dual-write trigger (never by pgshift itself). Returns
-- true when this control schema recorded the failure; false when the trigger
-- is not one of its plans' (the trigger then asks the next control schema).
-- `strict`: only a trigger registered in `dual_writes` here; the second pass
-- (false) takes any trigger of a plan recorded here (the triggers an
-- operation installs inside an `sql` step are not registered).
CREATE OR REPLACE FUNCTION __SCHEMA__.record_dual_write_failure(
    p_plan text, p_step text, p_table oid, p_trigger text, p_row jsonb,
    p_sqlstate text, p_error text, p_strict boolean)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $pgshift_v2$
DECLARE
    v_key jsonb;
BEGIN
    -- A trigger firing on `p_table` as `p_trigger`, not a direct call.
    IF pg_trigger_depth() < 1 OR NOT EXISTS (
        SELECT FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = p_trigger
    ) THEN
        RETURN false;
    END IF;
    IF p_strict THEN
        IF NOT EXISTS (SELECT FROM __SCHEMA__.dual_writes d
                       WHERE d.table_oid = p_table AND d.trigger = p_trigger AND d.plan_id = p_plan) THEN
            RETURN false;
        END IF;
    ELSIF NOT EXISTS (SELECT FROM __SCHEMA__.plans p WHERE p.id = p_plan) THEN
        RETURN false;
    END IF;
    -- The row's key: the primary key, else the replica identity, else another
    -- unique index on plain columns. Only the key is kept, never the row.
    SELECT jsonb_object_agg(a.attname, p_row -> a.attname::text) INTO v_key
    FROM (
        SELECT i.indkey FROM pg_index i
        WHERE i.indrelid = p_table AND i.indisunique AND i.indisvalid
          AND i.indexprs IS NULL AND i.indpred IS NULL
        ORDER BY i.indisprimary DESC, i.indisreplident DESC, i.indexrelid
        LIMIT 1
    ) AS k
    JOIN pg_attribute a ON a.attrelid = p_table AND a.attnum = ANY (k.indkey);
    INSERT INTO __SCHEMA__.trigger_failures AS f
        (plan_id, step, table_oid, table_name, key, sqlstate, error)
    VALUES (p_plan, p_step, p_table, p_table::regclass::text, v_key,
            left(coalesce(p_sqlstate, '?'), 5), left(coalesce(p_error, '?'), 2000))
    ON CONFLICT (plan_id, step, table_oid, (coalesce(key, 'null'::jsonb))) DO UPDATE
    SET hits = f.hits + 1, last_at = now(), sqlstate = EXCLUDED.sqlstate,
        error = EXCLUDED.error, resolved_at = NULL, resolution = NULL;
    RETURN true;
END;
$pgshift_v2$;

-- Any role's write may fire a dual-write trigger. USAGE on the schema lets it
-- call the function and nothing else: no table here grants anything to PUBLIC,
-- and this is the schema's only function. (Granting needs the schema's owner;
-- for another role's schema this grants nothing, with a warning, and a failing
-- trigger then reports through the server log only.)
GRANT USAGE ON SCHEMA __SCHEMA__ TO PUBLIC;
GRANT EXECUTE ON FUNCTION __SCHEMA__.record_dual_write_failure(text, text, oid, text, jsonb, text, text, boolean) TO PUBLIC;
