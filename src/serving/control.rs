//! The `<app>-control` topic: every worker reads it (no consumer group, from its end),
//! and `augur models promote|rollback` and the admin API publish to it. A record is the
//! model's whole alias map, keyed by the model name, so a compacted topic keeps exactly
//! the latest map per model. The registry stays the source of truth: the topic is how a
//! change reaches every worker at once, whatever its view of the registry.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::ModelCommand;

/// One control record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasChange {
    pub model: String,
    pub aliases: BTreeMap<String, u32>,
    /// Who changed it (`cli promote`, `admin rollback`, ...), for the log.
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub at_ms: i64,
}

/// Publishes an alias change and waits for the broker's acknowledgement.
pub async fn publish(
    mut config: ClientConfig,
    topic: &str,
    change: &AliasChange,
) -> Result<(), rdkafka::error::KafkaError> {
    if config.get("message.timeout.ms").is_none() {
        config.set("message.timeout.ms", "5000");
    }
    let producer: FutureProducer = config.create()?;
    let payload = serde_json::to_vec(change).expect("an alias change serializes");
    producer
        .send(
            FutureRecord::to(topic).key(&change.model).payload(&payload),
            Duration::from_secs(5),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| e)
}

/// Reads the control topic and forwards the changes of `model` to its manager, until
/// the manager is gone. When the topic does not exist yet it looks again every 10 s;
/// meanwhile alias changes arrive by polling the registry.
pub async fn follow(
    mut config: ClientConfig,
    topic: String,
    model: String,
    commands: mpsc::Sender<ModelCommand>,
) {
    config
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: StreamConsumer = match config.create() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(topic, error = %e, "cannot create the control-topic consumer; alias changes arrive by registry polling only");
            return;
        }
    };
    let mut warned = false;
    loop {
        let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5));
        let partitions: Vec<i32> = metadata
            .ok()
            .and_then(|md| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            })
            .unwrap_or_default();
        if !partitions.is_empty() {
            let mut list = TopicPartitionList::new();
            for p in partitions {
                let _ = list.add_partition_offset(&topic, p, Offset::End);
            }
            match consumer.assign(&list) {
                Ok(()) => break,
                Err(e) => tracing::warn!(topic, error = %e, "cannot assign the control topic"),
            }
        } else if !warned {
            tracing::warn!(
                topic,
                "control topic not found; alias changes arrive by registry polling until it exists"
            );
            warned = true;
        }
        if commands.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    // A record from before we started is not news (and a broker whose end offset lags,
    // as tansu's does, may hand one back).
    let since = crate::codec::now_ms() - 1_000;
    tracing::info!(topic, "following the control topic");
    loop {
        let message = tokio::select! {
            () = commands.closed() => return,
            m = consumer.recv() => m,
        };
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(topic, error = %e, "control topic read failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let payload = message.payload().unwrap_or_default();
        match serde_json::from_slice::<AliasChange>(payload) {
            Ok(change) if change.model == model && change.at_ms < since => {
                tracing::debug!(
                    topic,
                    model,
                    at_ms = change.at_ms,
                    "skipping an alias change from before this worker started"
                );
            }
            Ok(change) if change.model == model => {
                tracing::info!(topic, model, aliases = ?change.aliases, by = %change.by, "alias change from the control topic");
                if commands
                    .send(ModelCommand::Aliases(change.aliases))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(
                topic, partition = message.partition(), offset = message.offset(), error = %e,
                "ignoring a control record that is not an alias change"
            ),
        }
    }
}
