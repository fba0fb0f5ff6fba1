//! Alerts: each one is a JSON record on the alerts topic, a gauge or counter, and one
//! log line.

use serde::Serialize;

use crate::metrics as m;
use crate::sink::{OutputProducer, PendingDeliveries};

#[derive(Serialize)]
struct AlertRecord<'a> {
    alert: &'a str,
    /// `firing`, `resolved`, or `event` for one-off alerts.
    state: &'a str,
    severity: &'a str,
    app: &'a str,
    subject: &'a str,
    message: &'a str,
    at_ms: i64,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    details: serde_json::Value,
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

    /// Logs, counts and publishes a one-off critical alert about `subject` (a model).
    pub fn raise(&self, alert: &str, subject: &str, message: &str) {
        tracing::error!(alert, subject, "{message}");
        metrics::counter!(m::ALERTS, "alert" => alert.to_owned()).increment(1);
        self.publish(alert, "event", subject, message, serde_json::Value::Null);
    }

    /// A condition alert changing state: `firing` (counted, gauge 1, error log) or
    /// `resolved` (gauge 0, info log).
    pub fn set(
        &self,
        alert: &str,
        subject: &str,
        firing: bool,
        message: &str,
        details: serde_json::Value,
    ) {
        let gauge = metrics::gauge!(m::ALERT_ACTIVE, "alert" => alert.to_owned(), "subject" => subject.to_owned());
        if firing {
            tracing::error!(alert, subject, %details, "alert firing: {message}");
            metrics::counter!(m::ALERTS, "alert" => alert.to_owned()).increment(1);
            gauge.set(1.0);
        } else {
            tracing::info!(alert, subject, %details, "alert resolved: {message}");
            gauge.set(0.0);
        }
        let state = if firing { "firing" } else { "resolved" };
        self.publish(alert, state, subject, message, details);
    }

    fn publish(
        &self,
        alert: &str,
        state: &str,
        subject: &str,
        message: &str,
        details: serde_json::Value,
    ) {
        let record = AlertRecord {
            alert,
            state,
            severity: "critical",
            app: &self.app,
            subject,
            message,
            at_ms: crate::codec::now_ms(),
            details,
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
        } else {
            tracing::warn!(
                topic,
                alert,
                "alert record not published: raised outside the worker's runtime"
            );
        }
    }
}
