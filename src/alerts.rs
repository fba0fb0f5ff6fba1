//! Alerts: each one is a JSON record on the alerts topic, a counter and one log line.

use serde::Serialize;

use crate::metrics as m;
use crate::sink::{OutputProducer, PendingDeliveries};

#[derive(Serialize)]
struct AlertRecord<'a> {
    alert: &'a str,
    severity: &'a str,
    app: &'a str,
    subject: &'a str,
    message: &'a str,
    at_ms: i64,
}

/// Raises alerts for one app. Cheap to clone.
#[derive(Clone)]
pub struct Alerts {
    app: String,
    topic: String,
    producer: Option<OutputProducer>,
}

impl Alerts {
    pub fn new(app: &str, topic: String, producer: Option<OutputProducer>) -> Alerts {
        Alerts {
            app: app.to_owned(),
            topic,
            producer,
        }
    }

    /// Logs, counts and publishes a critical alert about `subject` (a model, a feature).
    pub fn raise(&self, alert: &str, subject: &str, message: &str) {
        tracing::error!(alert, subject, "{message}");
        metrics::counter!(m::ALERTS, "alert" => alert.to_owned()).increment(1);
        let record = AlertRecord {
            alert,
            severity: "critical",
            app: &self.app,
            subject,
            message,
            at_ms: crate::codec::now_ms(),
        };
        let payload = serde_json::to_vec(&record).expect("an alert serializes");
        let Some(producer) = self.producer.clone() else {
            return;
        };
        let (topic, key) = (self.topic.clone(), subject.to_owned());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut pending = PendingDeliveries::default();
                producer
                    .send(
                        &topic,
                        Some(key.as_bytes()),
                        &payload,
                        None,
                        &mut pending,
                        "alert",
                    )
                    .await;
                if let Err(e) = pending.wait_all().await {
                    tracing::warn!(topic, error = %e, "alert record not acknowledged");
                }
            });
        }
    }
}
