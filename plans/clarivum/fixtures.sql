-- Clarivum fixture data, for CI and local testing.
--
-- Load it once into a database freshly migrated with 0001_core_schema.yaml
-- (it assumes the tables are empty). It is one plain SQL script with no psql
-- meta-commands, so it can be sent as a single simple-query message, and it
-- then runs as one implicit transaction: it loads completely or not at all.
--
-- Everything is deterministic: no random(), no now(). Values derive from
-- generate_series counters and md5() of the counter, timestamps from one fixed
-- base instant, and ids are UUID-v7-shaped values built from each row's
-- created_at plus hash bits, so ids still sort by created_at.
--
-- The number of leads comes from the custom setting clarivum.fixture_leads
-- (default 200000), e.g.:
--   PGOPTIONS='-c clarivum.fixture_leads=1000' psql -f plans/clarivum/fixtures.sql
--
-- Sizes: 7 personas (1 soft-deleted), 2,000 users (every 50th soft-deleted),
-- 20 categories (4 pillars x 4 topics), 40 tags (1 soft-deleted), 6,000 content
-- items (every 25th a draft, every 30th soft-deleted), 18,000 item-tag links,
-- about 4,000 entitlements (every 40th soft-deleted), N leads (every 100th
-- soft-deleted, every 10th without persona, every 20th repeating an earlier
-- address).

-- A UUID version 7 layout filled deterministically: the 48-bit Unix
-- millisecond timestamp of `ts`, then bits of md5(seed); version and variant
-- bits set as RFC 9562 requires. Lives in pg_temp: it vanishes with the session.
CREATE OR REPLACE FUNCTION pg_temp.fixture_uuid(ts timestamptz, seed text) RETURNS uuid
  LANGUAGE sql IMMUTABLE
  AS $fn$
    SELECT encode(
             set_byte(
               set_byte(b, 6, 112 + (get_byte(b, 6) & 15)),   -- version 7
               8, 128 + (get_byte(b, 8) & 63)),               -- variant 10
             'hex')::uuid
    FROM (SELECT substring(int8send(floor(extract(epoch FROM ts) * 1000)::bigint) FROM 3)
                 || substring(decode(md5(seed), 'hex') FROM 1 FOR 10) AS b) AS parts
  $fn$;

-- Personas: stable keys; the last one is retired (soft-deleted).
INSERT INTO public.personas (id, key, name, description, created_at, updated_at, revision, deleted_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'personas:' || p.n),
       p.key, p.name, p.description,
       t.created_at,
       coalesce(t.deleted_at, t.created_at),
       CASE WHEN t.deleted_at IS NULL THEN 1 ELSE 2 END,
       t.deleted_at
FROM (VALUES
        (1, 'explorer',        'Explorer',        'Curious newcomer browsing free content'),
        (2, 'evaluator',       'Evaluator',       'Comparing options before committing'),
        (3, 'practitioner',    'Practitioner',    'Hands-on user who wants depth and how-tos'),
        (4, 'decision_maker',  'Decision maker',  'Chooses and pays for a team or household'),
        (5, 'advocate',        'Advocate',        'Existing fan who shares and refers'),
        (6, 'partner',         'Partner',         'Professional or organisation working with us'),
        (7, 'legacy_prospect', 'Legacy prospect', 'Retired persona kept for old reports')
     ) AS p (n, key, name, description)
CROSS JOIN LATERAL (
  SELECT timestamptz '2024-01-01 00:00:00+00' + p.n * interval '1 hour' AS created_at,
         CASE WHEN p.n = 7 THEN timestamptz '2024-03-01 00:00:00+00' END AS deleted_at
) AS t;

-- Users: one every 4 hours from the base instant; every 50th soft-deleted.
INSERT INTO public.users (id, email, display_name, created_at, updated_at, revision, deleted_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'users:' || g.n),
       format('user%s@example.test', lpad(g.n::text, 5, '0')),
       format('User %s', g.n),
       t.created_at,
       coalesce(t.deleted_at, t.created_at),
       CASE WHEN t.deleted_at IS NULL THEN 1 ELSE 2 END,
       t.deleted_at
FROM generate_series(1, 2000) AS g (n)
CROSS JOIN LATERAL (
  SELECT timestamptz '2024-01-01 00:00:00+00' + g.n * interval '4 hours' AS created_at
) AS c
CROSS JOIN LATERAL (
  SELECT c.created_at,
         CASE WHEN g.n % 50 = 0 THEN c.created_at + interval '30 days' END AS deleted_at
) AS t;

-- Content categories: 4 pillars, each with 4 topics (parent_id = pillar).
INSERT INTO public.content_categories (id, parent_id, key, name, description, created_at, updated_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'content_categories:' || p.key),
       NULL, p.key, initcap(p.key), format('Pillar: %s', p.key),
       t.created_at, t.created_at
FROM (VALUES (1, 'foundations'), (2, 'practice'), (3, 'research'), (4, 'stories')) AS p (n, key)
CROSS JOIN LATERAL (
  SELECT timestamptz '2024-01-01 00:00:00+00' + p.n * interval '1 minute' AS created_at
) AS t;

INSERT INTO public.content_categories (id, parent_id, key, name, description, created_at, updated_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'content_categories:' || pillar.key || '_' || topic.key),
       pillar.id,
       pillar.key || '_' || topic.key,
       initcap(pillar.key) || ': ' || replace(topic.key, '_', ' '),
       format('Topic %s under %s', topic.key, pillar.key),
       t.created_at, t.created_at
FROM public.content_categories AS pillar
CROSS JOIN (VALUES (1, 'basics'), (2, 'guides'), (3, 'deep_dives'), (4, 'news')) AS topic (n, key)
CROSS JOIN LATERAL (
  SELECT pillar.created_at + interval '1 hour' + topic.n * interval '1 minute' AS created_at
) AS t
WHERE pillar.parent_id IS NULL;

-- Tags: tag_01 .. tag_40; tag_40 soft-deleted.
INSERT INTO public.content_tags (id, key, name, created_at, updated_at, revision, deleted_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'content_tags:' || g.n),
       format('tag_%s', lpad(g.n::text, 2, '0')),
       format('Tag %s', g.n),
       t.created_at,
       coalesce(t.deleted_at, t.created_at),
       CASE WHEN t.deleted_at IS NULL THEN 1 ELSE 2 END,
       t.deleted_at
FROM generate_series(1, 40) AS g (n)
CROSS JOIN LATERAL (
  SELECT timestamptz '2024-01-02 00:00:00+00' + g.n * interval '1 minute' AS created_at,
         CASE WHEN g.n = 40 THEN timestamptz '2024-06-01 00:00:00+00' END AS deleted_at
) AS t;

-- Content items: one every 90 minutes, spread over the 16 topics by hash,
-- written by the first 20 users; every 25th a draft, every 30th soft-deleted.
INSERT INTO public.content_items
  (id, category_id, slug, title, summary, body, published_at,
   created_at, created_by, updated_at, updated_by, revision, deleted_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'content_items:' || g.n),
       cat.id,
       format('item-%s', lpad(g.n::text, 5, '0')),
       format('Item %s: %s', g.n, cat.name),
       format('Summary of item %s', g.n),
       repeat(format('Body of item %s. ', g.n), 1 + get_byte(h.b, 1) % 8),
       CASE WHEN g.n % 25 <> 0 THEN t.created_at + (get_byte(h.b, 2) % 72) * interval '1 hour' END,
       t.created_at, author.id,
       coalesce(t.deleted_at, t.created_at), author.id,
       CASE WHEN t.deleted_at IS NULL THEN 1 ELSE 2 END,
       t.deleted_at
FROM generate_series(1, 6000) AS g (n)
CROSS JOIN LATERAL (SELECT decode(md5('content_items:' || g.n), 'hex') AS b) AS h
CROSS JOIN LATERAL (
  SELECT timestamptz '2024-01-03 00:00:00+00' + g.n * interval '90 minutes' AS created_at,
         CASE WHEN g.n % 30 = 0
              THEN timestamptz '2024-01-03 00:00:00+00' + g.n * interval '90 minutes' + interval '10 days'
         END AS deleted_at
) AS t
JOIN public.content_categories AS cat
  ON cat.key = (ARRAY['foundations', 'practice', 'research', 'stories'])[1 + get_byte(h.b, 0) % 4]
               || '_' || (ARRAY['basics', 'guides', 'deep_dives', 'news'])[1 + (get_byte(h.b, 0) / 4) % 4]
JOIN public.users AS author
  ON author.email = format('user%s@example.test', lpad((1 + g.n % 20)::text, 5, '0'));

-- Three distinct tags per item: offsets 0, 1..13 and 14..26 modulo 40 never collide.
INSERT INTO public.content_item_tags (content_item_id, content_tag_id, created_at, created_by)
SELECT i.id, tag.id, i.created_at, i.created_by
FROM public.content_items AS i
CROSS JOIN LATERAL (SELECT decode(md5('content_item_tags:' || i.slug), 'hex') AS b) AS h
CROSS JOIN LATERAL (
  VALUES (get_byte(h.b, 0) % 40),
         ((get_byte(h.b, 0) % 40 + 1 + get_byte(h.b, 1) % 13) % 40),
         ((get_byte(h.b, 0) % 40 + 14 + get_byte(h.b, 2) % 13) % 40)
) AS pick (slot)
JOIN public.content_tags AS tag ON tag.key = format('tag_%s', lpad((pick.slot + 1)::text, 2, '0'));

-- Entitlements: 1 to 3 per user, on different features; a third open-ended,
-- a third for a year, a third for 30 days; every 40th soft-deleted.
INSERT INTO public.entitlements
  (id, user_id, feature_key, plan_key, starts_at, ends_at, created_at, updated_at, revision, deleted_at)
SELECT pg_temp.fixture_uuid(t.starts_at, format('entitlements:%s:%s', u.n, j.j)),
       u.id,
       (ARRAY['library', 'courses', 'community', 'coaching'])[1 + (get_byte(h.b, 0) + j.j) % 4],
       (ARRAY['free', 'plus', 'pro'])[1 + (get_byte(h.b, 1) + j.j) % 3],
       t.starts_at,
       CASE (u.n + j.j) % 3
         WHEN 0 THEN NULL
         WHEN 1 THEN t.starts_at + interval '365 days'
         ELSE t.starts_at + interval '30 days'
       END,
       t.starts_at,
       coalesce(t.deleted_at, t.starts_at),
       CASE WHEN t.deleted_at IS NULL THEN 1 ELSE 2 END,
       t.deleted_at
FROM (
  SELECT id, created_at, substring(email FROM 5 FOR 5)::int AS n FROM public.users
) AS u
CROSS JOIN LATERAL (SELECT decode(md5('entitlements:' || u.n), 'hex') AS b) AS h
CROSS JOIN LATERAL generate_series(0, get_byte(h.b, 2) % 3) AS j (j)
CROSS JOIN LATERAL (
  SELECT u.created_at + j.j * interval '30 days' + interval '1 minute' AS starts_at,
         CASE WHEN (u.n + j.j) % 40 = 0
              THEN u.created_at + j.j * interval '30 days' + interval '2 days'
         END AS deleted_at
) AS t;

-- Leads: N of them spread evenly over about 347 days from 2024-01-01 whatever
-- N is (with a hash jitter smaller than the spacing, so created_at and id grow
-- with the counter). Personas are skewed like real traffic: of the leads that
-- have one, explorer 35 %, evaluator 25 %, practitioner 20 %, decision_maker
-- 12 %, advocate 6 %, partner 2 %. Every 10th lead has no persona, every 20th
-- repeats the address of the lead 10 before it, every 7th has a mixed-case
-- address, every 5th has no UTM parameters, every 100th is soft-deleted a
-- week after capture.
WITH params AS (
  SELECT coalesce(nullif(current_setting('clarivum.fixture_leads', true), ''), '200000')::int AS n_leads
), spacing AS (
  SELECT n_leads, 30000000.0 / greatest(n_leads, 1) AS step_s FROM params
)
INSERT INTO public.leads
  (id, email, persona_id, utm, source, created_at, updated_at, revision, deleted_at)
SELECT pg_temp.fixture_uuid(t.created_at, 'leads:' || g.n),
       CASE WHEN a.n_addr % 7 = 0
            THEN format('Lead%s@%s', lpad(a.n_addr::text, 7, '0'), initcap(a.domain))
            ELSE format('lead%s@%s', lpad(a.n_addr::text, 7, '0'), a.domain)
       END,
       lp.id,
       CASE WHEN g.n % 5 = 0 THEN '{}'::jsonb
            ELSE jsonb_build_object(
                   'utm_source',   (ARRAY['google', 'meta', 'linkedin', 'newsletter'])[1 + get_byte(h.b, 2) % 4],
                   'utm_medium',   (ARRAY['cpc', 'social', 'email'])[1 + get_byte(h.b, 3) % 3],
                   'utm_campaign', format('campaign_%s', get_byte(h.b, 4) % 12))
       END,
       (ARRAY['landing_page', 'newsletter_signup', 'webinar', 'quiz', 'referral'])[1 + get_byte(h.b, 5) % 5],
       t.created_at,
       coalesce(t.deleted_at, t.created_at),
       CASE WHEN t.deleted_at IS NULL THEN 1 ELSE 2 END,
       t.deleted_at
FROM spacing AS s
CROSS JOIN LATERAL generate_series(1, s.n_leads) AS g (n)
CROSS JOIN LATERAL (SELECT decode(md5('leads:' || g.n), 'hex') AS b) AS h
CROSS JOIN LATERAL (
  SELECT CASE WHEN g.n % 20 = 0 THEN g.n - 10 ELSE g.n END AS n_addr,
         (ARRAY['example.test', 'mail.example.test', 'corp.example.test', 'example.org', 'example.net'])
           [1 + get_byte(decode(md5('lead-domain:' || CASE WHEN g.n % 20 = 0 THEN g.n - 10 ELSE g.n END), 'hex'), 0) % 5]
           AS domain
) AS a
CROSS JOIN LATERAL (
  SELECT timestamptz '2024-01-01 00:00:00+00'
           + make_interval(secs => (g.n * s.step_s + (get_byte(h.b, 0) / 256.0) * 0.8 * s.step_s)::double precision)
           AS created_at
) AS c
CROSS JOIN LATERAL (
  SELECT c.created_at,
         CASE WHEN g.n % 100 = 0 THEN c.created_at + interval '7 days' END AS deleted_at
) AS t
LEFT JOIN public.personas AS lp
  ON g.n % 10 <> 0
 AND lp.key = CASE
                WHEN (get_byte(h.b, 1) * 256 + get_byte(h.b, 6)) % 100 < 35 THEN 'explorer'
                WHEN (get_byte(h.b, 1) * 256 + get_byte(h.b, 6)) % 100 < 60 THEN 'evaluator'
                WHEN (get_byte(h.b, 1) * 256 + get_byte(h.b, 6)) % 100 < 80 THEN 'practitioner'
                WHEN (get_byte(h.b, 1) * 256 + get_byte(h.b, 6)) % 100 < 92 THEN 'decision_maker'
                WHEN (get_byte(h.b, 1) * 256 + get_byte(h.b, 6)) % 100 < 98 THEN 'advocate'
                ELSE 'partner'
              END;

-- Fresh statistics, so that plans right after loading match production's shape.
ANALYZE public.personas, public.users, public.content_categories, public.content_tags,
        public.content_items, public.content_item_tags, public.entitlements, public.leads;
