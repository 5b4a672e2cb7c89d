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

/// Why the database cannot be used, for readiness and the logs: what a user needs to fix a TLS,
/// network or login problem, and nothing that is a secret (sqlx's messages for these name no
/// password and no statement).
pub(super) fn unreachable_reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Tls(t) => format!("TLS: {t}"),
        // rustls' verdicts reach sqlx as I/O errors of kind InvalidData.
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => format!("TLS: {io}"),
        sqlx::Error::Io(io) => format!("network: {io}"),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("28P01") | Some("28000") => "the server refused the login".into(),
            Some(code) => format!("the server answered SQLSTATE {code}"),
            None => "the server answered an error".into(),
        },
        sqlx::Error::PoolTimedOut => "no connection within the acquire timeout".into(),
        sqlx::Error::Configuration(_) => "the connection settings are not usable".into(),
        sqlx::Error::Protocol(_) => "the server does not speak PostgreSQL's protocol".into(),
        _ => "the database client failed".into(),
    }
}
