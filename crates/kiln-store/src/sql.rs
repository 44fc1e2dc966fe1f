//! The small dialect-neutral layer both backends share: parameter values, `$N` placeholders,
//! and typed access to result columns.
//!
//! View statements and queries are written once, in the subset of SQL that SQLite and Postgres
//! both accept, with Postgres-style `$N` placeholders; the SQLite backend rewrites them to `?N`
//! (which SQLite binds by number, exactly like `$N` in Postgres).

use std::borrow::Cow;

use crate::error::DbError;

/// A statement parameter. Integers are 64-bit everywhere (Postgres columns are BIGINT) so that a
/// value binds the same way on both backends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Val {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
    OptText(Option<String>),
    /// Arrays, for Postgres bulk statements (`UNNEST($1::bigint[])`) only.
    IntArray(Vec<i64>),
    TextArray(Vec<String>),
    OptIntArray(Vec<Option<i64>>),
    OptTextArray(Vec<Option<String>>),
}

impl From<&str> for Val {
    fn from(s: &str) -> Self {
        Val::Text(s.to_owned())
    }
}
impl From<String> for Val {
    fn from(s: String) -> Self {
        Val::Text(s)
    }
}
impl From<Option<String>> for Val {
    fn from(s: Option<String>) -> Self {
        Val::OptText(s)
    }
}
impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<u64> for Val {
    fn from(v: u64) -> Self {
        // Sequence numbers, versions and sizes stay far below 2^63.
        Val::Int(v as i64)
    }
}
impl From<u32> for Val {
    fn from(v: u32) -> Self {
        Val::Int(v.into())
    }
}
impl From<u16> for Val {
    fn from(v: u16) -> Self {
        Val::Int(v.into())
    }
}
impl From<Option<i64>> for Val {
    fn from(v: Option<i64>) -> Self {
        Val::OptInt(v)
    }
}

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Val::Int(v) => v.to_sql(),
            Val::OptInt(v) => v.to_sql(),
            Val::Text(v) => v.to_sql(),
            Val::OptText(v) => v.to_sql(),
            Val::IntArray(_) | Val::TextArray(_) | Val::OptIntArray(_) | Val::OptTextArray(_) => {
                Err(rusqlite::Error::ToSqlConversionFailure(
                    "arrays are bound only on Postgres".into(),
                ))
            }
        }
    }
}

impl tokio_postgres::types::ToSql for Val {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Int(v) => v.to_sql(ty, out),
            Val::OptInt(v) => v.to_sql(ty, out),
            Val::Text(v) => v.to_sql(ty, out),
            Val::OptText(v) => v.to_sql(ty, out),
            Val::IntArray(v) => v.to_sql(ty, out),
            Val::TextArray(v) => v.to_sql(ty, out),
            Val::OptIntArray(v) => v.to_sql(ty, out),
            Val::OptTextArray(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        <i64 as tokio_postgres::types::ToSql>::accepts(ty)
            || <String as tokio_postgres::types::ToSql>::accepts(ty)
            || <Vec<i64> as tokio_postgres::types::ToSql>::accepts(ty)
            || <Vec<String> as tokio_postgres::types::ToSql>::accepts(ty)
    }

    /// Checks the type of the value actually held, not just of the enum: an integer bound to a
    /// text parameter is an error, not eight raw bytes.
    fn to_sql_checked(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Int(v) => v.to_sql_checked(ty, out),
            Val::OptInt(v) => v.to_sql_checked(ty, out),
            Val::Text(v) => v.to_sql_checked(ty, out),
            Val::OptText(v) => v.to_sql_checked(ty, out),
            Val::IntArray(v) => v.to_sql_checked(ty, out),
            Val::TextArray(v) => v.to_sql_checked(ty, out),
            Val::OptIntArray(v) => v.to_sql_checked(ty, out),
            Val::OptTextArray(v) => v.to_sql_checked(ty, out),
        }
    }
}

/// Renders a statement with its parameters inlined as SQL literals, for sending many statements
/// in one simple-protocol message (replay): thousands of prepared executions would each cost a
/// round of messages and task wake-ups, a script costs one. Text is quoted by doubling `'`,
/// which is exact under `standard_conforming_strings = on` (Postgres' default, and set
/// explicitly on the connections that use this); text with a NUL byte cannot be stored at all
/// and is refused.
pub(crate) fn inline_literals(sql: &str, params: &[Val]) -> Result<String, DbError> {
    let mut out = String::with_capacity(sql.len() + 64);
    let mut rest = sql;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let digits: usize = rest[i + 1..].bytes().take_while(u8::is_ascii_digit).count();
        let n: usize = rest[i + 1..i + 1 + digits]
            .parse()
            .map_err(|_| DbError::Column {
                column: 0,
                value: format!("placeholder in {sql}"),
            })?;
        let v = params
            .get(n.wrapping_sub(1))
            .ok_or_else(|| DbError::Column {
                column: n,
                value: format!("missing parameter for {sql}"),
            })?;
        match v {
            Val::Int(i) | Val::OptInt(Some(i)) => out.push_str(&i.to_string()),
            Val::OptInt(None) | Val::OptText(None) => out.push_str("NULL"),
            Val::Text(t) | Val::OptText(Some(t)) => {
                if t.contains('\0') {
                    return Err(DbError::Column {
                        column: n,
                        value: "text with a NUL byte".into(),
                    });
                }
                out.push('\'');
                out.push_str(&t.replace('\'', "''"));
                out.push('\'');
            }
            Val::IntArray(_) | Val::TextArray(_) | Val::OptIntArray(_) | Val::OptTextArray(_) => {
                return Err(DbError::Column {
                    column: n,
                    value: "arrays are not inlined".into(),
                })
            }
        }
        rest = &rest[i + 1 + digits..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Rewrites `$N` placeholders to SQLite's `?N`. Statements contain no string literal with a `$`.
pub(crate) fn sqlite_sql(sql: &str) -> Cow<'_, str> {
    if !sql.contains('$') {
        return Cow::Borrowed(sql);
    }
    Cow::Owned(sql.replace('$', "?"))
}

/// Typed access to one result row, on either backend. Errors name the column.
pub(crate) trait Cols {
    fn text(&self, i: usize) -> Result<String, DbError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, DbError>;
    fn int(&self, i: usize) -> Result<i64, DbError>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, DbError>;
    fn boolean(&self, i: usize) -> Result<bool, DbError>;

    fn uint(&self, i: usize) -> Result<u64, DbError> {
        let v = self.int(i)?;
        u64::try_from(v).map_err(|_| DbError::Column {
            column: i,
            value: v.to_string(),
        })
    }
}

/// A text column holding a typed value (id, name, JSON, enum); a value that does not parse is
/// an error naming the column, never a panic.
pub(crate) fn parsed<T>(
    r: &dyn Cols,
    i: usize,
    f: impl FnOnce(&str) -> Option<T>,
) -> Result<T, DbError> {
    let s = r.text(i)?;
    f(&s).ok_or(DbError::Column {
        column: i,
        value: s,
    })
}

impl Cols for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String, DbError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64, DbError> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, DbError> {
        Ok(self.get(i)?)
    }
    fn boolean(&self, i: usize) -> Result<bool, DbError> {
        Ok(self.get(i)?)
    }
}

impl Cols for tokio_postgres::Row {
    fn text(&self, i: usize) -> Result<String, DbError> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64, DbError> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, DbError> {
        Ok(self.try_get(i)?)
    }
    fn boolean(&self, i: usize) -> Result<bool, DbError> {
        Ok(self.try_get(i)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inlined_literals_quote_text_and_keep_numbers() {
        let sql = inline_literals(
            "UPDATE t SET a = $2, b = $10, c = $3 WHERE id = $1",
            &[
                Val::Text("x'; DROP TABLE t; --".into()),
                Val::Int(-5),
                Val::OptText(None),
                Val::Int(0),
                Val::Int(0),
                Val::Int(0),
                Val::Int(0),
                Val::Int(0),
                Val::Int(0),
                Val::OptInt(Some(10)),
            ],
        )
        .unwrap();
        assert_eq!(
            sql,
            "UPDATE t SET a = -5, b = 10, c = NULL WHERE id = 'x''; DROP TABLE t; --'"
        );
        assert!(inline_literals("SELECT $1", &[Val::Text("a\0b".into())]).is_err());
        assert!(inline_literals("SELECT $2", &[Val::Int(1)]).is_err());
    }
}
