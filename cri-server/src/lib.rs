//! The cri-systemd daemon: it owns the configuration, the CRI gRPC services on a unix socket,
//! and the handlers that translate CRI calls into calls on `runtime` (pods, containers, systemd),
//! `imagestore` (images), or `node` (what uses both: container creation from an image's layers,
//! removals and image garbage collection, readiness, stats). Handlers hold no logic of their own
//! beyond that translation and the mapping of library errors to gRPC codes.
//!
//! A library (with the `cri-systemd` binary in main.rs) so that fuzz targets and benchmarks can
//! reach the parsers and translators; nothing outside this workspace is meant to link it.

pub mod authority;
pub mod cdi;
pub mod config;
pub mod container_translate;
pub mod errors;
pub mod image_service;
pub mod list_streaming;
pub mod logging;
pub mod measurements;
pub mod metrics;
pub mod node;
pub mod otel;
pub mod pod_translate;
pub mod preflight;
pub mod prometheus;
pub mod runtime_service;
pub mod server;
pub mod streaming;

#[cfg(test)]
mod translate_tests;
