//! Reads the facts of the live catalog that the plan's operations need
//! (`ops::catalog`): every table an operation names, and the tables whose
//! foreign keys point at one whose column changes type. Read-only.

use std::collections::BTreeMap;

use tokio_postgres::GenericClient;

use crate::db::{self, OneTrip};
use crate::ident::QualifiedName;
use crate::ops::catalog::{Catalog, Column, Constraint, Dependent, Index, Table};
use crate::ops::{Change, Op};

/// The facts of the tables `changes` name (those that exist).
pub async fn read(c: &impl GenericClient, changes: &[Change]) -> Result<Catalog, db::Error> {
    let version: i32 = c
        .row("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let mut cat = Catalog {
        tables: BTreeMap::new(),
        server_version: version,
    };
    let mut names: Vec<QualifiedName> = changes
        .iter()
        .filter_map(|ch| ch.op.table().cloned())
        .collect();
    for ch in changes {
        if let Op::AddForeignKey(s) = &ch.op {
            names.push(s.ref_table.clone());
        }
    }
    // `drop_index` names an index: read the table it belongs to.
    for ch in changes {
        if let Op::DropIndex(s) = &ch.op {
            let row = c
                .row_opt(
                    "SELECT i.indrelid::regclass::text FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
                    &[&s.name.quoted()],
                )
                .await?;
            if let Some(r) = row {
                let t: String = r.get(0);
                if let Ok(q) = crate::ident::parse_qualified(&t) {
                    names.push(q);
                }
            }
        }
    }
    let mut queue = names;
    while let Some(name) = queue.pop() {
        let Some(table) = table(c, &name).await? else {
            continue;
        };
        let key = format!("{}.{}", table.schema, table.name);
        if cat.tables.contains_key(&key) {
            continue;
        }
        // A type change converts the columns that reference it too: read their tables.
        for fk in &table.referenced_by {
            if let Ok(q) = crate::ident::parse_qualified(&quote_parts(&fk.table)) {
                queue.push(q);
            }
        }
        cat.tables.insert(key, table);
    }
    Ok(cat)
}

/// `schema.table` (unquoted parts) as a quoted name.
fn quote_parts(t: &str) -> String {
    match t.split_once('.') {
        Some((s, n)) => format!(
            "{}.{}",
            crate::ident::quote_ident(s),
            crate::ident::quote_ident(n)
        ),
        None => crate::ident::quote_ident(t),
    }
}

async fn table(c: &impl GenericClient, name: &QualifiedName) -> Result<Option<Table>, db::Error> {
    let row = c
        .row_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relrowsecurity
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p')",
            &[&name.quoted()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let oid: u32 = row.get(0);
    let mut t = Table {
        schema: row.get(1),
        name: row.get(2),
        row_security: row.get(3),
        ..Table::default()
    };
    let q = t.quoted();
    t.columns = columns(c, oid, &q).await?;
    t.indexes = indexes(c, oid).await?;
    t.constraints = constraints(c, "c.conrelid = $1", oid).await?;
    t.referenced_by = constraints(c, "c.confrelid = $1 AND c.contype = 'f'", oid).await?;
    t.has_rows = c
        .row(&format!("SELECT EXISTS (SELECT FROM {q})"), &[])
        .await?
        .get(0);
    t.grants = c
        .rows(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee)::text END, a.privilege_type
             FROM pg_class c, aclexplode(c.relacl) a
             WHERE c.oid = $1 AND a.grantee <> c.relowner ORDER BY 1, 2",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    t.dependents = dependents(c, oid).await?;
    Ok(Some(t))
}

async fn columns(c: &impl GenericClient, oid: u32, quoted: &str) -> Result<Vec<Column>, db::Error> {
    let rows = c
        .rows(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                    pg_get_expr(d.adbin, d.adrelid),
                    nullif(a.attidentity::text, ''), a.attgenerated <> '',
                    pg_get_serial_sequence($2, a.attname)
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid, &quoted],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            type_sql: r.get(1),
            not_null: r.get(2),
            default: if r.get::<_, Option<String>>(4).is_some() || r.get::<_, bool>(5) {
                None
            } else {
                r.get(3)
            },
            identity: r.get(4),
            generated: r.get(5),
            sequence: r.get(6),
        })
        .collect())
}

async fn indexes(c: &impl GenericClient, oid: u32) -> Result<Vec<Index>, db::Error> {
    let rows = c
        .rows(
            "SELECT ic.relname::text, pg_get_indexdef(i.indexrelid), am.amname::text,
                    i.indisunique, i.indisprimary, pg_get_expr(i.indpred, i.indrelid), i.indisvalid,
                    (SELECT con.conname::text FROM pg_constraint con WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid LIMIT 1),
                    i.indnkeyatts,
                    ARRAY(SELECT CASE WHEN k.attnum = 0 THEN NULL ELSE (SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = i.indrelid AND a.attnum = k.attnum) END
                          FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) ORDER BY k.ord)
             FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
             WHERE i.indrelid = $1 ORDER BY ic.relname",
            &[&oid],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let all: Vec<Option<String>> = r.get(9);
            let nkey = r.get::<_, i16>(8).max(0) as usize;
            let (keys, include) = all.split_at(nkey.min(all.len()));
            Index {
                name: r.get(0),
                definition: r.get(1),
                method: r.get(2),
                unique: r.get(3),
                primary: r.get(4),
                predicate: r.get(5),
                valid: r.get(6),
                constraint: r.get(7),
                columns: keys.to_vec(),
                include: include.iter().flatten().cloned().collect(),
            }
        })
        .collect())
}

async fn constraints(
    c: &impl GenericClient,
    filter: &str,
    oid: u32,
) -> Result<Vec<Constraint>, db::Error> {
    let sql = format!(
        "SELECT c.conname::text, c.contype::text, pg_get_constraintdef(c.oid),
                n.nspname::text || '.' || t.relname::text, c.convalidated,
                ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o),
                CASE WHEN c.confrelid <> 0 THEN (SELECT rn.nspname::text || '.' || r.relname::text FROM pg_class r JOIN pg_namespace rn ON rn.oid = r.relnamespace WHERE r.oid = c.confrelid) END,
                ARRAY(SELECT a.attname::text FROM unnest(c.confkey) WITH ORDINALITY k(n, o) JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n ORDER BY k.o)
         FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid JOIN pg_namespace n ON n.oid = t.relnamespace
         WHERE {filter} ORDER BY c.conname"
    );
    let rows = c.rows(&sql, &[&oid]).await?;
    Ok(rows
        .iter()
        .map(|r| Constraint {
            name: r.get(0),
            kind: r.get(1),
            definition: r.get(2),
            table: r.get(3),
            validated: r.get(4),
            columns: r.get(5),
            ref_table: r.get(6),
            ref_columns: r.get(7),
        })
        .collect())
}

/// What depends on each column, besides indexes and constraints (which the
/// operations handle): views and rules, policies, user triggers, generated columns.
async fn dependents(
    c: &impl GenericClient,
    oid: u32,
) -> Result<BTreeMap<String, Vec<Dependent>>, db::Error> {
    let rows = c
        .rows(
            "SELECT a.attname::text, x.kind, x.name
             FROM pg_depend d
             JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             CROSS JOIN LATERAL (
               SELECT 'view'::text AS kind, r.ev_class::regclass::text AS name FROM pg_rewrite r
                 WHERE d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid AND r.ev_class <> $1
               UNION ALL
               SELECT 'policy', p.polname::text FROM pg_policy p
                 WHERE d.classid = 'pg_policy'::regclass AND p.oid = d.objid
               UNION ALL
               SELECT 'trigger', tg.tgname::text FROM pg_trigger tg
                 WHERE d.classid = 'pg_trigger'::regclass AND tg.oid = d.objid AND tg.tgname::text NOT LIKE 'pgshift\\_%'
               UNION ALL
               SELECT 'generated column', g.attname::text FROM pg_attribute g
                 WHERE d.classid = 'pg_class'::regclass AND d.objid = $1 AND g.attrelid = $1 AND g.attnum = d.objsubid AND g.attgenerated <> ''
             ) x
             WHERE d.refobjid = $1 AND d.refobjsubid > 0 AND d.deptype IN ('n', 'a')
             ORDER BY 1, 2, 3",
            &[&oid],
        )
        .await?;
    let mut out: BTreeMap<String, Vec<Dependent>> = BTreeMap::new();
    for r in rows {
        let dep = Dependent {
            kind: r.get(1),
            name: r.get(2),
        };
        let list = out.entry(r.get(0)).or_default();
        if !list.contains(&dep) {
            list.push(dep);
        }
    }
    Ok(out)
}
