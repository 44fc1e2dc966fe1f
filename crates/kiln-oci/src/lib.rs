//! Getting OCI images onto a host, verified.
//!
//! This crate owns:
//! - image references as users write them ([`Reference`], Docker's normalisation rules);
//! - the OCI distribution (registry) client ([`RegistryClient`]): resolving a tag to a pinned
//!   single-platform manifest digest, and pulling a pinned image, with anonymous, bearer-token
//!   and basic authentication;
//! - digest verification of everything fetched, while it streams;
//! - the content-addressed blob store ([`BlobStore`]) that pulls land in, crash-safe;
//! - the image documents (manifests, indexes, configs; [`config`]);
//! - applying layers onto a directory with whiteout semantics, safely for untrusted layers
//!   ([`apply_layer`]).
//!
//! It deliberately does not run anything, build root filesystem images (ext4 and the like belong
//! to the agent), or decide what to keep: caching policy and garbage collection of the blob store
//! are the agent's. The control plane uses [`RegistryClient::resolve`]; the agent uses
//! [`RegistryClient::pull`] and [`apply_layer`].

mod auth;
pub mod blobs;
pub mod client;
pub mod config;
mod digest;
mod error;
pub mod reference;
pub mod unpack;

pub use blobs::{BlobStore, BlobWriter};
pub use client::{ClientConfig, ClientStats, RegistryClient};
pub use config::{
    media_types, Descriptor, ImageConfig, ImageIndex, ImageManifest, LayerRef, Platform, PullStats,
    PulledImage,
};
pub use digest::{is_valid_digest, sha256_digest};
pub use error::OciError;
pub use reference::{Reference, ReferenceError, DOCKER_HUB};
pub use unpack::{apply_layer, UnpackLimits, UnpackStats};
