//! PostgreSQL's errors as the protocol sees them.

use crate::core::types::DbError;

/// The protocol's view of a database error; no SQL and no values reach its message.
pub(super) fn db_error(e: sqlx::Error, key_only: bool) -> DbError {
    match &e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            let message = db.message().to_string();
            match code.get(..2) {
                Some("22") if key_only => DbError::BadKey(format!("invalid key: {message}")),
                Some("22") | Some("23") => DbError::Rejected(message),
                Some("08") | Some("53") | Some("57") | Some("40") => DbError::Unavailable,
                _ if code == "42703" => DbError::Rejected(message),
                _ => {
                    tracing::error!(sqlstate = %code, "database error");
                    DbError::Internal
                }
            }
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => {
            tracing::debug!(error = %e, "database unavailable");
            DbError::Unavailable
        }
        other => {
            tracing::error!(error = %other, "database client error");
            DbError::Internal
        }
    }
}
