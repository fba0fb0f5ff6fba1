//! augur: a streaming prediction engine. Events come in from Kafka, each user's windowed
//! state is kept (hot in memory, checkpointed to sled with the input offset), features
//! declared in a topology file are computed, an ONNX model scores them, and predictions
//! go back to Kafka.
//!
//! The modules follow the data path: [`source`] → [`codec`] → [`state`] → [`features`]
//! → [`model`] → [`sink`], wired by [`pipeline`]; [`config`] reads topologies, [`admin`]
//! serves metrics and health, [`demo`] runs it all in one process.

pub mod admin;
pub mod alerts;
pub mod cli;
pub mod codec;
pub mod config;
pub mod demo;
pub mod features;
pub mod gen;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod offline;
pub mod online_store;
pub mod pipeline;
pub mod serving;
pub mod sink;
pub mod source;
pub mod state;
pub mod stats;
pub mod util;

/// Generated protobuf messages (`proto/augur/v1/*.proto`).
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/augur.v1.rs"));
}
