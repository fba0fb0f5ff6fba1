//! Every metric name the engine exports, in one place: `augur_<area>_<name>_<unit>`.
//! Labels are bounded (topic, partition, model, version, variant, stage, reason) and
//! never carry a user id.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Input records read, by topic and partition.
pub const SOURCE_EVENTS: &str = "augur_source_events_total";
/// Records sent to the dead-letter topic, by reason.
pub const DEAD_LETTERS: &str = "augur_source_dead_letters_total";
/// Predictions produced, by model, version and variant.
pub const PREDICTIONS: &str = "augur_sink_predictions_total";
/// Input record timestamp to prediction produce time.
pub const E2E_LATENCY: &str = "augur_pipeline_e2e_latency_seconds";
/// Rows per model call.
pub const BATCH_ROWS: &str = "augur_model_batch_rows";
/// Time to checkpoint a partition (wait for acks, sled batch, flush).
pub const CHECKPOINT_SECONDS: &str = "augur_state_checkpoint_duration_seconds";
/// Checkpoint ticks skipped because the partition had a backlog, by partition.
pub const CHECKPOINTS_POSTPONED: &str = "augur_state_checkpoints_postponed_total";
/// Users in a partition's hot map.
pub const HOT_USERS: &str = "augur_state_hot_users";
/// Partitions currently owned by this worker.
pub const ASSIGNED_PARTITIONS: &str = "augur_source_assigned_partitions";
/// Users waiting to be mirrored to the online store.
pub const ONLINE_PENDING_USERS: &str = "augur_online_store_pending_users";
/// Age of the oldest update waiting for the online store.
pub const ONLINE_SECONDS_BEHIND: &str = "augur_online_store_behind_seconds";
/// Failed online-store batch writes.
pub const ONLINE_WRITE_ERRORS: &str = "augur_online_store_write_errors_total";
/// Users written to the online store.
pub const ONLINE_USERS_WRITTEN: &str = "augur_online_store_users_written_total";
/// Registry reads that failed (the current models keep serving).
pub const MODEL_REGISTRY_ERRORS: &str = "augur_model_registry_errors_total";
/// The champion version serving, by model.
pub const MODEL_CHAMPION_VERSION: &str = "augur_model_champion_version";
/// Model sets published (startup, promotion, rollback, shadow changes).
pub const MODEL_SWAPS: &str = "augur_model_swaps_total";
/// Versions that failed to load and were not put into service.
pub const MODEL_LOAD_FAILURES: &str = "augur_model_load_failures_total";
/// Shadow predictions produced, by shadow model and version.
pub const SHADOW_PREDICTIONS: &str = "augur_shadow_predictions_total";
/// Shadow decisions (at the shadow's threshold) that differ from the served one.
pub const SHADOW_DISAGREEMENTS: &str = "augur_shadow_disagreements_total";
/// |shadow score - served score|; its _sum / _count is the mean absolute difference.
pub const SHADOW_ABS_DELTA: &str = "augur_shadow_abs_score_delta";
/// Time for a shadow to score one batch.
pub const SHADOW_SCORE_SECONDS: &str = "augur_shadow_score_duration_seconds";
/// Rows not shadow-scored because the shadow thread was behind.
pub const SHADOW_DROPPED: &str = "augur_shadow_dropped_rows_total";
/// Shadow scoring or delivery failures.
pub const SHADOW_FAILURES: &str = "augur_shadow_failures_total";
/// Alerts raised, by alert.
pub const ALERTS: &str = "augur_alerts_total";
/// 1 while a condition alert fires, by alert and subject.
pub const ALERT_ACTIVE: &str = "augur_alert_active";
/// Per-stage processing time of one input batch (decode, state, features, score,
/// produce; decode/state/features are sampled on every 8th record and scaled).
pub const STAGE_SECONDS: &str = "augur_pipeline_stage_duration_seconds";
/// Consumer lag per partition, from librdkafka's statistics.
pub const CONSUMER_LAG: &str = "augur_source_consumer_lag_records";
/// Approximate bytes of a partition's hot state.
pub const HOT_STATE_BYTES: &str = "augur_state_hot_bytes";
/// Size of the sled database on disk.
pub const STATE_DISK_BYTES: &str = "augur_state_disk_bytes";
/// Input offsets that never arrived (transaction markers, compaction, retention, or a
/// broker that skipped them).
pub const SKIPPED_OFFSETS: &str = "augur_source_skipped_offsets_total";
/// State store failures (disk full, I/O errors); each pauses the worker's partitions
/// until the store is reopened.
pub const STORE_FAULTS: &str = "augur_state_store_failures_total";
/// Partitions whose fetching is paused because their task's queue is full (or the
/// state store is failing).
pub const PAUSED_PARTITIONS: &str = "augur_source_paused_partitions";
/// KS statistic, KS p-value and PSI of each watched feature's recent window against the
/// champion's reference (feature `score` is the prediction).
pub const DRIFT_KS_STATISTIC: &str = "augur_drift_ks_statistic";
pub const DRIFT_KS_P_VALUE: &str = "augur_drift_ks_p_value";
pub const DRIFT_PSI: &str = "augur_drift_psi";
/// Mean score of the recent window, and the reference positive rate it is held to.
pub const DRIFT_POSITIVE_RATE: &str = "augur_drift_positive_rate";
pub const DRIFT_REFERENCE_POSITIVE_RATE: &str = "augur_drift_reference_positive_rate";
/// Rolling quality from the in-stream label join, by model, version and variant.
pub const QUALITY_AUC: &str = "augur_quality_auc";
pub const QUALITY_LOG_LOSS: &str = "augur_quality_log_loss";
pub const QUALITY_ACCURACY: &str = "augur_quality_accuracy";
pub const QUALITY_LABELS: &str = "augur_quality_labels";
/// Users that left memory because the hot state was over its byte budget.
pub const BUDGET_EVICTIONS: &str = "augur_state_budget_evictions_total";
/// 1 while a partition is being restored from the changelog.
pub const RESTORING: &str = "augur_state_restoring";
/// Users restored from the changelog, and how long each restore took.
pub const RESTORED_USERS: &str = "augur_state_restored_users_total";
pub const RESTORE_SECONDS: &str = "augur_state_restore_duration_seconds";
/// Time one monitor check takes (every window tested, gauges and alarms updated).
pub const MONITOR_CHECK_SECONDS: &str = "augur_monitor_check_duration_seconds";
/// Monitor inputs dropped because the monitor was behind.
pub const MONITOR_DROPPED: &str = "augur_monitor_dropped_total";
/// Bandit posterior mean per arm and partition.
pub const BANDIT_POSTERIOR_MEAN: &str = "augur_bandit_posterior_mean";
/// Bandit rewards settled, by arm and reward (1 click, 0 expiry), per partition.
pub const BANDIT_REWARDS: &str = "augur_bandit_rewards_total";
/// Impressions waiting for their reward, per partition.
pub const BANDIT_PENDING: &str = "augur_bandit_pending_rewards";
/// Impressions scored but not tracked for a reward (the pending set was full).
pub const BANDIT_UNTRACKED: &str = "augur_bandit_untracked_total";

/// Transactions of `delivery: exactly_once`, by outcome (`committed`, `aborted`,
/// `failed`: neither, the producer being fenced or in a fatal state) and partition.
pub const TRANSACTIONS: &str = "augur_sink_transactions_total";
/// Time to add the offsets to a transaction and commit it.
pub const TRANSACTION_COMMIT_SECONDS: &str = "augur_sink_transaction_commit_duration_seconds";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
const DELTA_BUCKETS: &[f64] = &[0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// Installs the Prometheus recorder; the handle renders `/metrics`. Every histogram
/// gets explicit buckets (the exporter would otherwise emit summaries).
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_ROWS.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(SHADOW_ABS_DELTA.into()), DELTA_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SOURCE_EVENTS, "Input records read");
    describe_counter!(
        DEAD_LETTERS,
        "Records sent to the dead-letter topic, by reason"
    );
    describe_counter!(PREDICTIONS, "Predictions produced");
    describe_histogram!(
        E2E_LATENCY,
        Unit::Seconds,
        "Input record timestamp to prediction produce time"
    );
    describe_histogram!(BATCH_ROWS, "Rows per model call");
    describe_histogram!(
        CHECKPOINT_SECONDS,
        Unit::Seconds,
        "Partition checkpoint duration"
    );
    describe_counter!(
        CHECKPOINTS_POSTPONED,
        "Checkpoint ticks skipped while the partition had a backlog"
    );
    describe_gauge!(HOT_USERS, "Users in a partition's hot map");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions owned by this worker");
    describe_gauge!(
        ONLINE_PENDING_USERS,
        "Users waiting to be mirrored to the online store"
    );
    describe_gauge!(
        ONLINE_SECONDS_BEHIND,
        Unit::Seconds,
        "Age of the oldest update waiting for the online store"
    );
    describe_counter!(ONLINE_WRITE_ERRORS, "Failed online-store batch writes");
    describe_counter!(ONLINE_USERS_WRITTEN, "Users written to the online store");
    describe_counter!(MODEL_REGISTRY_ERRORS, "Failed registry reads");
    describe_gauge!(MODEL_CHAMPION_VERSION, "Champion version serving");
    describe_counter!(MODEL_SWAPS, "Model sets published");
    describe_counter!(MODEL_LOAD_FAILURES, "Model versions that failed to load");
    describe_counter!(SHADOW_PREDICTIONS, "Shadow predictions produced");
    describe_counter!(
        SHADOW_DISAGREEMENTS,
        "Shadow decisions that differ from the served decision"
    );
    describe_histogram!(
        SHADOW_ABS_DELTA,
        "Absolute shadow - served score difference"
    );
    describe_histogram!(
        SHADOW_SCORE_SECONDS,
        Unit::Seconds,
        "Shadow scoring time per batch"
    );
    describe_counter!(SHADOW_DROPPED, "Rows the shadow thread had no room for");
    describe_counter!(SHADOW_FAILURES, "Shadow scoring or delivery failures");
    describe_counter!(ALERTS, "Alerts raised");
    describe_gauge!(ALERT_ACTIVE, "1 while a condition alert fires");
    describe_histogram!(
        STAGE_SECONDS,
        Unit::Seconds,
        "Per-stage processing time of one input batch"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Consumer lag per partition (librdkafka statistics)"
    );
    describe_gauge!(
        HOT_STATE_BYTES,
        "Approximate bytes of a partition's hot state"
    );
    describe_gauge!(STATE_DISK_BYTES, "Size of the sled database on disk");
    describe_counter!(
        SKIPPED_OFFSETS,
        "Input offsets that never arrived (transaction markers, compaction, or skipped by the broker)"
    );
    describe_counter!(
        STORE_FAULTS,
        "State store failures; each pauses the partitions until the store reopens"
    );
    describe_gauge!(
        PAUSED_PARTITIONS,
        "Partitions whose fetching is paused (queue full or state store failing)"
    );
    describe_gauge!(DRIFT_KS_STATISTIC, "KS statistic against the reference");
    describe_gauge!(DRIFT_KS_P_VALUE, "KS p-value against the reference");
    describe_gauge!(
        DRIFT_PSI,
        "Population stability index against the reference"
    );
    describe_gauge!(DRIFT_POSITIVE_RATE, "Mean score of the recent window");
    describe_gauge!(DRIFT_REFERENCE_POSITIVE_RATE, "Reference positive rate");
    describe_gauge!(QUALITY_AUC, "Rolling ROC AUC from the label join");
    describe_gauge!(QUALITY_LOG_LOSS, "Rolling log loss from the label join");
    describe_gauge!(
        QUALITY_ACCURACY,
        "Rolling accuracy at the model's threshold"
    );
    describe_gauge!(QUALITY_LABELS, "Labelled predictions in the quality window");
    describe_counter!(
        MONITOR_DROPPED,
        "Monitor inputs dropped because it was behind"
    );
    describe_gauge!(BANDIT_POSTERIOR_MEAN, "Bandit posterior mean per arm");
    describe_counter!(BANDIT_REWARDS, "Bandit rewards settled");
    describe_gauge!(BANDIT_PENDING, "Impressions waiting for a reward");
    describe_counter!(BANDIT_UNTRACKED, "Impressions not tracked for a reward");
    describe_counter!(
        TRANSACTIONS,
        "Transactions (delivery: exactly_once) by outcome"
    );
    describe_histogram!(
        TRANSACTION_COMMIT_SECONDS,
        Unit::Seconds,
        "Time to add the offsets to a transaction and commit it"
    );
}
