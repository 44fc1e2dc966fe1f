//! Kiln's HTTP API: wire types and the typed client.
//!
//! This crate owns the JSON shapes of every request and response under `/v1` and the one client
//! the CLI, the agents and the edges use to call the control plane. It owns no server logic: the
//! control plane implements these routes, and only these types cross between the services.
//! With the `openapi` feature (enabled by the control plane only), the types derive
//! `utoipa::ToSchema` for the generated OpenAPI document.

pub mod client;
pub mod domains;
pub mod secrets;
pub mod types;

pub use client::{ApiError, Client};
pub use types::*;
