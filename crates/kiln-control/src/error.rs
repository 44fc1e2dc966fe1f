//! Errors of the control plane, and their mapping to `application/problem+json`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use kiln_api::{Problem, PROBLEM_JSON};

/// A control-plane operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("store operation {op} failed")]
    Store {
        op: &'static str,
        #[source]
        source: kiln_store::StoreError,
    },
    #[error("cannot create the user: {reason}")]
    InvalidUser { reason: String },
    #[error("cannot load the master key for secrets")]
    MasterKey {
        #[source]
        source: crate::secrets::KeyringError,
    },
    #[error("cannot build the registry client")]
    RegistryClient {
        #[source]
        source: kiln_oci::OciError,
    },
}

impl ControlError {
    pub(crate) fn store(op: &'static str) -> impl FnOnce(kiln_store::StoreError) -> ControlError {
        move |source| ControlError::Store { op, source }
    }
}

/// The problem `code` of an error response, as a response extension (read by the audit layer).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProblemCode(pub &'static str);

/// An error answered to an API client: status, stable code, human detail.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub errors: Option<serde_json::Value>,
}

impl ApiFailure {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            errors: None,
        }
    }
    pub fn not_found(what: &str, name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {name:?} does not exist"),
        )
    }
    pub fn internal(err: &dyn std::error::Error) -> Self {
        // The chain goes to the log, once; the client gets a stable code.
        tracing::error!(error = %error_chain(err), "internal error serving request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the control plane's log",
        )
    }
}

pub(crate) use kiln_types::error_chain;

impl From<kiln_store::StoreError> for ApiFailure {
    fn from(e: kiln_store::StoreError) -> Self {
        match &e {
            kiln_store::StoreError::VersionConflict { .. } => ApiFailure::new(
                StatusCode::CONFLICT,
                "conflict",
                "the resource changed concurrently; retry",
            ),
            kiln_store::StoreError::IdempotencyConflict { key } => ApiFailure::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!("Idempotency-Key {key:?} was already used for a different request"),
            ),
            _ => ApiFailure::internal(&e),
        }
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let problem = Problem {
            type_: format!("https://kiln.dev/problems/{}", self.code),
            title: self.status.canonical_reason().unwrap_or("error").to_owned(),
            status: self.status.as_u16(),
            code: self.code.to_owned(),
            detail: Some(self.detail),
            errors: self.errors,
            request_id: None,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut resp = (
            self.status,
            [(axum::http::header::CONTENT_TYPE, PROBLEM_JSON)],
            body,
        )
            .into_response();
        resp.extensions_mut().insert(ProblemCode(self.code));
        resp
    }
}
