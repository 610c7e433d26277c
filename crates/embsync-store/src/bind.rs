//! Binding the core's typed statements ([`sql::Statement`]) with their declared types (`Bind`,
//! `Bound`, and `query`, `query_one`, `query_opt`, `execute` to run them), and pgvector's binary
//! vectors. Public for the store's tests, which also run statements of their own (an `EXPLAIN`
//! of one).
//!
//! Every statement goes out unnamed with its parameter types declared (tokio-postgres's
//! `query_typed`/`execute_typed`: Parse, Bind, Describe, Execute and Sync in one message, one
//! round trip). A named prepared statement (what `query(&str)` does: `s0`, `s1`, ... prepared in
//! one round trip and executed in the next) would tie two messages to one server connection,
//! which a transaction-mode pooler (Hyperdrive, PgBouncer) does not promise outside a
//! transaction; the unnamed statement lives and dies within one Sync, so it works through any
//! pooler, and it saves a round trip per statement everywhere. The declared types are the ones
//! Postgres would infer, which the values' Rust types must match anyway.

use super::*;

/// A vector bound as pgvector's binary format.
#[derive(Debug)]
pub(crate) struct PgVector<'a>(&'a Vector);

impl ToSql for PgVector<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_pgvector_binary());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }

    to_sql_checked!();
}

/// A core [`SqlParam`] bound with tokio-postgres.
#[derive(Debug)]
pub(crate) struct Bind<'a>(&'a SqlParam<'a>);

impl ToSql for Bind<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            SqlParam::Text(v) => v.as_ref().to_sql(ty, out),
            SqlParam::Int8(v) => v.to_sql(ty, out),
            SqlParam::Bool(v) => v.to_sql(ty, out),
            SqlParam::Float8(v) => v.to_sql(ty, out),
            SqlParam::TextArray(v) => v.to_sql(ty, out),
            SqlParam::Int4Array(v) => v.to_sql(ty, out),
            SqlParam::VectorArray(v) => v.iter().map(|v| v.map(PgVector)).collect::<Vec<_>>().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // The type is the one the parameter declares (`bound`).
        true
    }

    to_sql_checked!();
}

/// A typed statement's text and its `N` parameters bound with their declared types;
/// `vector_array` is pgvector's `vector[]` ([`PgStore::vector_array_type`]), needed only by
/// statements that bind vectors.
pub struct Bound<'a, const N: usize> {
    text: sql::Text<N>,
    params: [SqlParam<'a>; N],
    vector_array: Option<Type>,
}

impl<'a, const N: usize> Bound<'a, N> {
    /// `statement`, bound.
    pub fn new(statement: &'a impl Statement<N>) -> Bound<'a, N> {
        Bound { text: statement.text(), params: statement.params(), vector_array: None }
    }

    /// `statement`, which binds vectors, bound with pgvector's `vector[]` type.
    pub fn with_vectors(statement: &'a impl Statement<N>, vector_array: Type) -> Bound<'a, N> {
        Bound { vector_array: Some(vector_array), ..Bound::new(statement) }
    }

    fn binds(&self) -> [(Bind<'_>, Type); N] {
        self.params.each_ref().map(|p| {
            let ty = match p.pg_type() {
                PgType::Text => Type::TEXT,
                PgType::Int8 => Type::INT8,
                PgType::Bool => Type::BOOL,
                PgType::Float8 => Type::FLOAT8,
                PgType::TextArray => Type::TEXT_ARRAY,
                PgType::Int4Array => Type::INT4_ARRAY,
                PgType::VectorArray => self.vector_array.clone().expect("a statement that binds vectors is bound with_vectors"),
            };
            (Bind(p), ty)
        })
    }
}

/// The parameters as tokio-postgres takes them.
fn as_params<'b, const N: usize>(binds: &'b [(Bind<'_>, Type); N]) -> [(&'b (dyn ToSql + Sync), Type); N] {
    binds.each_ref().map(|(b, t)| (b as &(dyn ToSql + Sync), t.clone()))
}

/// Runs a typed statement: rows.
pub async fn query<const N: usize>(
    client: &impl tokio_postgres::GenericClient,
    b: &Bound<'_, N>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    client.query_typed(&b.text, &as_params(&b.binds())).await
}

/// Runs a typed statement: one row.
pub async fn query_one<const N: usize>(
    client: &impl tokio_postgres::GenericClient,
    b: &Bound<'_, N>,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    client.query_typed_one(&b.text, &as_params(&b.binds())).await
}

/// Runs a typed statement: at most one row.
pub async fn query_opt<const N: usize>(
    client: &impl tokio_postgres::GenericClient,
    b: &Bound<'_, N>,
) -> Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
    client.query_typed_opt(&b.text, &as_params(&b.binds())).await
}

/// Runs a typed statement: rows affected.
pub async fn execute<const N: usize>(client: &impl tokio_postgres::GenericClient, b: &Bound<'_, N>) -> Result<u64, tokio_postgres::Error> {
    client.execute_typed(&b.text, &as_params(&b.binds())).await
}
