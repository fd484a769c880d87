//! Statements that cost one round trip.
//!
//! Given a text query, tokio-postgres first prepares a named statement (a round
//! trip to learn the parameter types), then binds and executes it (a second),
//! and closes it afterwards. pgshift's own statements (the control table, the
//! catalog, preflight) each run once or a few times per step, so that prepare
//! buys nothing: at a 2 ms round trip (a database in another region) the
//! statements around a backfill's batches cost a third of a second more than
//! they need to.
//!
//! Here each parameter carries the type it is sent as, and the statement goes
//! out as one unnamed parse-bind-execute: one round trip. The statements that
//! run many times on one connection (a backfill's batch) are still prepared once.

use std::future::Future;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row};

/// The PostgreSQL type a Rust value is sent as.
pub trait PgType {
    const TYPE: Type;
}

macro_rules! pg_types {
    ($($rust:ty => $pg:ident),* $(,)?) => {
        $(impl PgType for $rust {
            const TYPE: Type = Type::$pg;
        })*
    };
}

pg_types! {
    str => TEXT,
    String => TEXT,
    bool => BOOL,
    i16 => INT2,
    i32 => INT4,
    i64 => INT8,
    f64 => FLOAT8,
    u32 => OID,
    serde_json::Value => JSONB,
    Vec<String> => TEXT_ARRAY,
    Vec<&str> => TEXT_ARRAY,
    Vec<i64> => INT8_ARRAY,
}

impl<T: PgType + ?Sized> PgType for &T {
    const TYPE: Type = T::TYPE;
}

impl<T: PgType> PgType for Option<T> {
    const TYPE: Type = T::TYPE;
}

/// A parameter of a one-round-trip statement: a value and the type it is sent as.
pub trait Param: Sync {
    fn pg_type(&self) -> Type;
    fn value(&self) -> &(dyn ToSql + Sync);
}

impl<T: PgType + ToSql + Sync> Param for T {
    fn pg_type(&self) -> Type {
        T::TYPE
    }
    fn value(&self) -> &(dyn ToSql + Sync) {
        self
    }
}

fn typed<'a>(params: &'a [&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.value(), p.pg_type())).collect()
}

/// `query`, `query_one`, `query_opt` and `execute` in one round trip each (see the module).
pub trait OneTrip: GenericClient {
    fn rows<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a dyn Param],
    ) -> impl Future<Output = Result<Vec<Row>, Error>> + 'a {
        async move { self.query_typed(sql, &typed(params)).await }
    }

    /// Exactly one row, or an error.
    fn row<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a dyn Param],
    ) -> impl Future<Output = Result<Row, Error>> + 'a {
        async move { self.query_typed_one(sql, &typed(params)).await }
    }

    /// At most one row, or an error.
    fn row_opt<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a dyn Param],
    ) -> impl Future<Output = Result<Option<Row>, Error>> + 'a {
        async move { self.query_typed_opt(sql, &typed(params)).await }
    }

    /// The number of rows the statement changed.
    fn exec<'a>(
        &'a self,
        sql: &'a str,
        params: &'a [&'a dyn Param],
    ) -> impl Future<Output = Result<u64, Error>> + 'a {
        async move { self.execute_typed(sql, &typed(params)).await }
    }
}

impl<C: GenericClient> OneTrip for C {}
