//! Binding parameters with their declared types: the core's typed statements (`Bind`, `Bound`), the positional `typed` lists, pgvector's binary vectors.

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

/// A value bound as a parameter, with the Postgres type it is declared as.
///
/// Every statement goes out unnamed with its parameter types declared (tokio-postgres's
/// `query_typed`/`execute_typed`: Parse, Bind, Describe, Execute and Sync in one message, one
/// round trip). A named prepared statement (what `query(&str)` does: `s0`, `s1`, ... prepared in
/// one round trip and executed in the next) would tie two messages to one server connection,
/// which a transaction-mode pooler (Hyperdrive, PgBouncer) does not promise outside a
/// transaction; the unnamed statement lives and dies within one Sync, so it works through any
/// pooler, and it saves a round trip per statement everywhere.
pub(crate) trait Param: ToSql + Sync {
    /// The declared type: the one Postgres would infer, which the Rust type must match anyway.
    fn pg_type(&self) -> Type;
    /// Itself as a bindable value.
    fn as_sql(&self) -> &(dyn ToSql + Sync);
}

macro_rules! param {
    ($($rust:ty => $pg:expr),* $(,)?) => {$(
        impl Param for $rust {
            fn pg_type(&self) -> Type {
                $pg
            }
            fn as_sql(&self) -> &(dyn ToSql + Sync) {
                self
            }
        }
    )*};
}

param! {
    String => Type::TEXT,
    &str => Type::TEXT,
    i64 => Type::INT8,
    bool => Type::BOOL,
    f64 => Type::FLOAT8,
    Vec<String> => Type::TEXT_ARRAY,
    Vec<&str> => Type::TEXT_ARRAY,
    Vec<i32> => Type::INT4_ARRAY,
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

/// A typed statement's text and its parameters bound with their declared types; `vector_array`
/// is pgvector's `vector[]` ([`PgStore::vector_array_type`]), needed only by statements that bind
/// vectors.
pub(crate) struct Bound<'a> {
    text: std::borrow::Cow<'static, str>,
    params: Vec<SqlParam<'a>>,
    vector_array: Option<Type>,
}

impl<'a> Bound<'a> {
    pub(crate) fn new(statement: &'a impl Statement) -> Bound<'a> {
        Bound { text: statement.text(), params: statement.params(), vector_array: None }
    }

    pub(crate) fn with_vectors(statement: &'a impl Statement, vector_array: Type) -> Bound<'a> {
        Bound { vector_array: Some(vector_array), ..Bound::new(statement) }
    }

    fn binds(&self) -> (Vec<Bind<'_>>, Vec<Type>) {
        let types = self
            .params
            .iter()
            .map(|p| match p.pg_type() {
                PgType::Text => Type::TEXT,
                PgType::Int8 => Type::INT8,
                PgType::Bool => Type::BOOL,
                PgType::Float8 => Type::FLOAT8,
                PgType::TextArray => Type::TEXT_ARRAY,
                PgType::Int4Array => Type::INT4_ARRAY,
                PgType::VectorArray => self.vector_array.clone().expect("a statement that binds vectors is bound with_vectors"),
            })
            .collect();
        (self.params.iter().map(Bind).collect(), types)
    }
}

/// Runs a typed statement: rows.
pub(crate) async fn query<'a>(
    client: &impl tokio_postgres::GenericClient,
    b: &Bound<'a>,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let (binds, types) = b.binds();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = binds.iter().zip(types).map(|(b, t)| (b as &(dyn ToSql + Sync), t)).collect();
    client.query_typed(&b.text, &params).await
}

/// Runs a typed statement: one row.
pub(crate) async fn query_one<'a>(
    client: &impl tokio_postgres::GenericClient,
    b: &Bound<'a>,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    let (binds, types) = b.binds();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = binds.iter().zip(types).map(|(b, t)| (b as &(dyn ToSql + Sync), t)).collect();
    client.query_typed_one(&b.text, &params).await
}

/// Runs a typed statement: rows affected.
pub(crate) async fn execute<'a>(client: &impl tokio_postgres::GenericClient, b: &Bound<'a>) -> Result<u64, tokio_postgres::Error> {
    let (binds, types) = b.binds();
    let params: Vec<(&(dyn ToSql + Sync), Type)> = binds.iter().zip(types).map(|(b, t)| (b as &(dyn ToSql + Sync), t)).collect();
    client.execute_typed(&b.text, &params).await
}

/// The parameters of a statement with their declared types.
pub(crate) fn typed<'a>(params: &[&'a dyn Param]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params.iter().map(|p| (p.as_sql(), p.pg_type())).collect()
}
