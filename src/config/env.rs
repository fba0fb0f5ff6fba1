//! Topology settings from the environment, for containers: every setting of the
//! topology file can be overridden without editing it.
//!
//! The rule: `AUGUR_<SECTION>__<KEY>[__<KEY>...]`, `__` between path segments, each
//! segment lower-cased. `AUGUR_KAFKA__BROKERS` sets `kafka.brokers`,
//! `AUGUR_STATE__CHECKPOINT_INTERVAL` sets `state.checkpoint_interval`,
//! `AUGUR_FEATURES__3__WINDOW` sets `features[3].window` and `AUGUR__APP` the top-level
//! `app`.
//!
//! - The librdkafka maps `kafka.consumer` and `kafka.producer` take one more segment,
//!   the librdkafka key, with `_` read as `.`: `AUGUR_KAFKA__CONSUMER__SASL_PASSWORD`
//!   sets `kafka.consumer."sasl.password"`. `AUGUR_KAFKA__SECURITY__<KEY>` sets the key
//!   in both maps (credentials); a consumer- or producer-specific variable for the same
//!   key wins over it.
//! - Values: text settings (topics, durations, URLs, versions, librdkafka values) are
//!   taken verbatim, so a password such as `007` or `a #b` stays what it is. Numbers
//!   and booleans are parsed as YAML scalars; lists take a YAML flow sequence
//!   (`[impression, click]`) or a single item.
//! - Only names containing `__` are overrides. The single-underscore variables of the
//!   command line (`AUGUR_BROKERS`, `AUGUR_STATE_DIR`, `AUGUR_LOG`, ...) are not, and a
//!   command-line flag or variable still wins over the topology, overridden or not.
//! - A variable that names no known setting is an error naming the variable, never
//!   ignored.
//!
//! Values from the environment are often secrets, so no message here shows a
//! librdkafka value or an online-store URL.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde_norway::{Mapping, Value};

use super::{Problem, Topology};

/// What a setting holds, which says how an override's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Taken verbatim.
    Text,
    /// A YAML number.
    Number,
    /// A YAML boolean.
    Bool,
    /// A YAML flow sequence, or one item.
    List,
    /// Text, or a YAML flow sequence when it starts with `[`.
    TextOrList,
    /// A librdkafka map: the next segment is the key, `_` read as `.`.
    Librdkafka,
    /// Not in the file: sets the key in both librdkafka maps of this section.
    Security,
    /// A section of named settings.
    Section(&'static [Key]),
    /// A list of sections, addressed by index (`features[3]`).
    Items(&'static [Key]),
}

type Key = (&'static str, Kind);

use Kind::*;

const KAFKA: &[Key] = &[
    ("brokers", Text),
    ("group", Text),
    ("session_timeout", Text),
    ("max_poll_interval", Text),
    ("consumer", Librdkafka),
    ("producer", Librdkafka),
    ("security", Security),
];
const SOURCE: &[Key] = &[
    ("topic", Text),
    ("codec", Text),
    ("lateness", Text),
    ("max_message_bytes", Text),
];
const FILTER: &[Key] = &[("type", TextOrList)];
const FEATURE: &[Key] = &[
    ("name", Text),
    ("kind", Text),
    ("filter", Section(FILTER)),
    ("field", Text),
    ("window", Text),
    ("resolution", Text),
    ("default", Number),
    ("unit", Text),
    ("numerator", Text),
    ("denominator", Text),
    ("min_denominator", Number),
];
const SCORING: &[Key] = &[("event_types", List), ("max_batch", Number)];
const MODEL: &[Key] = &[
    ("registry", Text),
    ("name", Text),
    ("version", Text),
    ("shadows", List),
    ("poll_interval", Text),
];
const TOPIC_SINK: &[Key] = &[("topic", Text), ("codec", Text)];
const SINKS: &[Key] = &[
    ("predictions", Section(TOPIC_SINK)),
    ("dead_letter", Section(TOPIC_SINK)),
    ("shadow_predictions", Section(TOPIC_SINK)),
    ("alerts", Section(TOPIC_SINK)),
    ("log_features", Bool),
];
const STATE: &[Key] = &[
    ("dir", Text),
    ("checkpoint_interval", Text),
    ("backlog_checkpoint_interval", Text),
    ("idle_after", Text),
    ("shutdown_grace", Text),
    ("max_hot_bytes", Text),
    ("store_cache_bytes", Text),
];
const ADMIN: &[Key] = &[("listen", Text)];
const ONLINE_STORE: &[Key] = &[
    ("url", Text),
    ("prefix", Text),
    ("ttl", Text),
    ("batch", Number),
    ("max_pending_users", Number),
];
const ARM: &[Key] = &[("name", Text), ("model", Text), ("fraction", Number)];
const EXPERIMENT: &[Key] = &[
    ("name", Text),
    ("mode", Text),
    ("arms", Items(ARM)),
    ("seed", Number),
    ("max_pending_rewards", Number),
];
const MONITORING: &[Key] = &[
    ("enabled", Bool),
    ("features", List),
    ("window", Number),
    ("check_every", Number),
    ("min_samples", Number),
    ("ks_p_value", Number),
    ("psi", Number),
    ("positive_rate_tolerance", Number),
    ("auc_floor", Number),
    ("label_window", Number),
    ("min_labels", Number),
    ("raise_after", Number),
    ("clear_after", Number),
    ("cooldown", Text),
];
/// Every setting of the topology file (`Topology` and its sections). A unit test
/// checks this against the structs, so a new setting cannot be forgotten here.
const TOPOLOGY: &[Key] = &[
    ("app", Text),
    ("kafka", Section(KAFKA)),
    ("source", Section(SOURCE)),
    ("features", Items(FEATURE)),
    ("scoring", Section(SCORING)),
    ("model", Section(MODEL)),
    ("sinks", Section(SINKS)),
    ("state", Section(STATE)),
    ("admin", Section(ADMIN)),
    ("online_store", Section(ONLINE_STORE)),
    ("experiment", Section(EXPERIMENT)),
    ("monitoring", Section(MONITORING)),
    ("delivery", Text),
];

/// Whether an environment variable is a topology override: `AUGUR` or `AUGUR_<...>`
/// before its first `__`.
pub fn is_override(name: &str) -> bool {
    match name.split_once("__") {
        Some((head, _)) => {
            let head = head.to_ascii_uppercase();
            head == "AUGUR" || head.starts_with("AUGUR_")
        }
        None => false,
    }
}

/// The process's override variables (names that are not UTF-8 cannot be overrides).
pub fn from_process() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            is_override(&name).then(|| (name, value.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Which variable set which setting, to name the variable in later errors.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// (setting path as in problems, e.g. `features[3].window`; variable name)
    settings: Vec<(String, String)>,
}

impl Applied {
    pub fn is_empty(&self) -> bool {
        self.settings.is_empty()
    }

    /// The variables that set `path`, a section holding it, or a setting inside it.
    fn variables_for(&self, path: &str) -> Vec<&str> {
        let related = |a: &str, b: &str| {
            a == b || (a.starts_with(b) && matches!(a.as_bytes().get(b.len()), Some(b'.' | b'[')))
        };
        let mut vars: Vec<&str> = self
            .settings
            .iter()
            .filter(|(p, _)| related(p, path) || related(path, p))
            .map(|(_, v)| v.as_str())
            .collect();
        vars.sort_unstable();
        vars.dedup();
        vars
    }

    /// Names the variables behind a validation problem in its path.
    pub fn annotate(&self, problem: Problem) -> Problem {
        let vars = self.variables_for(&problem.path);
        if vars.is_empty() {
            return problem;
        }
        Problem {
            path: format!("{} (set by {})", problem.path, vars.join(", ")),
            message: problem.message,
        }
    }

    /// Adjusts a parse error of the overridden text: its line and column refer to the
    /// regenerated YAML, so they are dropped, and the variables behind the failing
    /// setting (or all of them) are named.
    pub fn explain(&self, location: String, message: String) -> (String, String) {
        if self.is_empty() {
            return (location, message);
        }
        let path = message.split(": ").next().unwrap_or_default();
        let vars = self.variables_for(path);
        let vars = if vars.is_empty() {
            let mut all: Vec<&str> = self.settings.iter().map(|(_, v)| v.as_str()).collect();
            all.sort_unstable();
            all.dedup();
            format!("with overrides from {}", all.join(", "))
        } else {
            format!("set by {}", vars.join(", "))
        };
        (String::new(), format!("{message} ({vars})"))
    }
}

/// Applies the override variables to a topology file's text. Without overrides the
/// text is returned unchanged (so parse errors keep their line and column); with
/// them, the file is parsed, overridden and written out again as YAML. A file that is
/// not YAML is returned unchanged, for the parser to report.
pub fn apply_to_text(
    text: &str,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<(Cow<'_, str>, Applied), Vec<Problem>> {
    let vars: Vec<(String, String)> = vars.into_iter().filter(|(n, _)| is_override(n)).collect();
    if vars.is_empty() {
        return Ok((Cow::Borrowed(text), Applied::default()));
    }
    let Ok(mut root) = serde_norway::from_str::<Value>(text) else {
        return Ok((Cow::Borrowed(text), Applied::default()));
    };
    let applied = apply(&mut root, vars)?;
    let text = serde_norway::to_string(&root).map_err(|e| {
        vec![Problem::new(
            "environment overrides",
            format!("cannot write the overridden topology: {e}"),
        )]
    })?;
    Ok((Cow::Owned(text), applied))
}

/// Applies `AUGUR_..__..` variables (others are skipped) to a parsed topology file.
/// Every variable that does not name a known setting, or whose value does not fit it,
/// is a problem whose path is the variable's name.
pub fn apply(
    root: &mut Value,
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Applied, Vec<Problem>> {
    let mut problems = Vec::new();
    // Security variables first, so that a consumer- or producer-specific one wins.
    let mut overrides: Vec<(bool, String, Vec<String>, String)> = Vec::new();
    for (name, value) in vars {
        if !is_override(&name) {
            continue;
        }
        match segments(&name) {
            Ok(segs) => {
                let specific = !(segs.len() > 1 && segs[0] == "kafka" && segs[1] == "security");
                overrides.push((specific, name, segs, value));
            }
            Err(message) => problems.push(Problem::new(name, message)),
        }
    }
    overrides.sort();
    if root.is_null() {
        *root = Value::Mapping(Mapping::new());
    }
    let mut setters: BTreeMap<String, (bool, String)> = BTreeMap::new();
    for (specific, name, segs, value) in &overrides {
        let mut set = Vec::new();
        match walk(root, TOPOLOGY, "", segs, value, &mut set) {
            Ok(()) => {
                for path in set {
                    if let Some((prev_specific, prev)) = setters.get(&path) {
                        if prev_specific == specific && prev != name {
                            problems.push(Problem::new(
                                name.clone(),
                                format!("{prev} sets {path} too; set it once"),
                            ));
                            continue;
                        }
                    }
                    setters.insert(path, (*specific, name.clone()));
                }
            }
            Err(message) => problems.push(Problem::new(name.clone(), message)),
        }
    }
    if problems.is_empty() {
        Ok(Applied {
            settings: setters.into_iter().map(|(p, (_, v))| (p, v)).collect(),
        })
    } else {
        Err(problems)
    }
}

/// The lower-cased path segments of an override variable's name.
fn segments(name: &str) -> Result<Vec<String>, String> {
    let mut parts = name.split("__");
    let head = parts.next().unwrap_or_default();
    let mut segs = Vec::new();
    if head.len() > "AUGUR".len() {
        segs.push(head["AUGUR_".len()..].to_ascii_lowercase());
    }
    segs.extend(parts.map(str::to_ascii_lowercase));
    if segs.is_empty() || segs.iter().any(String::is_empty) {
        return Err("expected AUGUR_<SECTION>__<KEY>, with one `__` between path segments".into());
    }
    Ok(segs)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn names(schema: &[Key]) -> String {
    schema
        .iter()
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The mapping at `key` of `node`, created when absent or null.
fn child_mapping<'a>(node: &'a mut Value, key: &str, path: &str) -> Result<&'a mut Value, String> {
    let map = node
        .as_mapping_mut()
        .ok_or_else(|| format!("{path} is not a mapping in the topology file"))?;
    let child = map
        .entry(Value::String(key.to_owned()))
        .or_insert(Value::Null);
    if child.is_null() {
        *child = Value::Mapping(Mapping::new());
    }
    if child.is_mapping() {
        Ok(child)
    } else {
        Err(format!(
            "{} is not a section in the topology file",
            join(path, key)
        ))
    }
}

/// Sets the setting `segs` names under `node` (at `path`, described by `schema`);
/// pushes the paths it set.
fn walk(
    node: &mut Value,
    schema: &'static [Key],
    path: &str,
    segs: &[String],
    raw: &str,
    set: &mut Vec<String>,
) -> Result<(), String> {
    let (seg, rest) = segs.split_first().expect("at least one segment");
    let Some(&(key, kind)) = schema.iter().find(|(n, _)| n == seg) else {
        let within = if path.is_empty() {
            "the topology".to_owned()
        } else {
            path.to_owned()
        };
        return Err(format!(
            "{within} has no setting \"{seg}\" (expected one of: {})",
            names(schema)
        ));
    };
    let here = join(path, key);
    match kind {
        Section(keys) => {
            if rest.is_empty() {
                return Err(format!(
                    "{here} is a section; name one of its settings: {}",
                    names(keys)
                ));
            }
            let child = child_mapping(node, key, path)?;
            walk(child, keys, &here, rest, raw, set)
        }
        Items(keys) => {
            let Some((index, rest)) = rest.split_first() else {
                return Err(format!(
                    "{here} is a list; name an index and a setting, e.g. __0__{}",
                    keys[0].0.to_ascii_uppercase()
                ));
            };
            let items = node
                .as_mapping_mut()
                .and_then(|m| m.get_mut(key))
                .and_then(Value::as_sequence_mut)
                .ok_or_else(|| format!("the topology file has no list {here}"))?;
            let len = items.len();
            let i: usize = index.parse().ok().filter(|i| *i < len).ok_or_else(|| {
                format!("{here} has {len} entries; \"{index}\" is not an index in it")
            })?;
            let item = &mut items[i];
            if item.is_null() {
                *item = Value::Mapping(Mapping::new());
            }
            let here = format!("{here}[{i}]");
            if !item.is_mapping() {
                return Err(format!("{here} is not a mapping in the topology file"));
            }
            if rest.is_empty() {
                return Err(format!(
                    "{here} is a section; name one of its settings: {}",
                    names(keys)
                ));
            }
            walk(item, keys, &here, rest, raw, set)
        }
        Librdkafka | Security => {
            let setting = librdkafka_key(rest).ok_or_else(|| {
                format!(
                    "name a librdkafka setting after {}, e.g. {}__SASL_PASSWORD for sasl.password",
                    key.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                )
            })?;
            let maps: &[&str] = if kind == Security {
                &["consumer", "producer"]
            } else {
                &[key]
            };
            for map in maps {
                let child = child_mapping(node, map, path)?;
                child
                    .as_mapping_mut()
                    .expect("child_mapping returns a mapping")
                    .insert(
                        Value::String(setting.clone()),
                        Value::String(raw.to_owned()),
                    );
                set.push(format!("{}.{setting}", join(path, map)));
            }
            Ok(())
        }
        Text | Number | Bool | List | TextOrList => {
            if !rest.is_empty() {
                return Err(format!("{here} is a setting, not a section"));
            }
            let value = leaf_value(kind, raw)?;
            node.as_mapping_mut()
                .ok_or_else(|| format!("{} is not a mapping in the topology file", path))?
                .insert(Value::String(key.to_owned()), value);
            set.push(here);
            Ok(())
        }
    }
}

/// `SASL_PASSWORD` -> `sasl.password`; None unless it is a plausible librdkafka key.
fn librdkafka_key(rest: &[String]) -> Option<String> {
    let key = rest.join(".").replace('_', ".");
    let plausible = !key.is_empty()
        && key
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    plausible.then_some(key)
}

fn leaf_value(kind: Kind, raw: &str) -> Result<Value, String> {
    let yaml = || serde_norway::from_str::<Value>(raw).ok();
    match kind {
        Number => match yaml() {
            Some(v @ Value::Number(_)) => Ok(v),
            _ => Err(format!("expected a number, got \"{raw}\"")),
        },
        Bool => match yaml() {
            Some(v @ Value::Bool(_)) => Ok(v),
            _ => Err(format!("expected true or false, got \"{raw}\"")),
        },
        List | TextOrList if raw.trim_start().starts_with('[') => match yaml() {
            Some(Value::Sequence(items))
                if items
                    .iter()
                    .all(|v| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))) =>
            {
                Ok(Value::Sequence(items))
            }
            _ => Err(format!(
                "expected a YAML flow sequence such as [a, b], got \"{raw}\""
            )),
        },
        List if raw.trim().is_empty() => Ok(Value::Sequence(Vec::new())),
        List => Ok(Value::Sequence(vec![Value::String(raw.to_owned())])),
        _ => Ok(Value::String(raw.to_owned())),
    }
}

/// Keys whose values librdkafka treats as secrets (and a little more).
fn sensitive(key: &str) -> bool {
    [
        "password",
        "secret",
        "pem",
        "jaas",
        "token",
        "oauthbearer.config",
        "keytab",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Checks every librdkafka setting with librdkafka itself (no client is created, no
/// broker contacted). Without this, a misspelt key or a refused value would surface
/// only when the worker creates its clients, in rdkafka's error text, which includes
/// the value: a mistyped `AUGUR_KAFKA__SECURITY__SASL_PASWORD` would print the
/// password. Messages here never show the value of a secret-looking key.
pub fn librdkafka_problems(topology: &Topology) -> Vec<Problem> {
    let mut problems = Vec::new();
    for (section, map) in [
        ("kafka.consumer", &topology.kafka.consumer),
        ("kafka.producer", &topology.kafka.producer),
    ] {
        for (key, value) in map {
            let mut config = rdkafka::ClientConfig::new();
            config.set(key, value.to_string());
            if let Err(e) = config.create_native_config() {
                let desc = match e {
                    rdkafka::error::KafkaError::ClientConfig(_, desc, _, _) => desc,
                    other => other.to_string(),
                };
                problems.push(Problem::new(
                    format!("{section}.{key}"),
                    librdkafka_message(key, &desc),
                ));
            }
        }
    }
    problems
}

/// librdkafka's refusal, without the value when the key may hold a secret (librdkafka
/// names the value in its "Invalid value ..." messages).
fn librdkafka_message(key: &str, desc: &str) -> String {
    if sensitive(key) && !desc.starts_with("No such configuration") {
        "librdkafka refuses this value (not shown: it may be a secret)".to_owned()
    } else {
        format!("librdkafka: {desc}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigValue;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn reference() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/topologies/ctr.yaml"))
            .unwrap()
    }

    /// The reference topology with these overrides, parsed (not validated).
    fn overridden(list: &[(&str, &str)]) -> Result<(Topology, Applied), String> {
        let text = reference();
        let (text, applied) = apply_to_text(&text, vars(list)).map_err(|problems| {
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        })?;
        let topology = Topology::parse(&text).map_err(|(l, m)| {
            let (l, m) = applied.explain(l, m);
            format!("{l}{m}")
        })?;
        Ok((topology, applied))
    }

    fn text(value: Option<&ConfigValue>) -> Option<String> {
        match value {
            Some(ConfigValue::Text(s)) => Some(s.clone()),
            other => panic!("expected a text value, got {other:?}"),
        }
    }

    #[test]
    fn only_names_with_a_double_underscore_after_augur_are_overrides() {
        for name in [
            "AUGUR_KAFKA__BROKERS",
            "AUGUR__APP",
            "augur_state__dir",
            "AUGUR_TEST__X",
        ] {
            assert!(is_override(name), "{name}");
        }
        for name in [
            "AUGUR_TOPOLOGY",
            "AUGUR_BROKERS",
            "AUGUR_GROUP",
            "AUGUR_INSTANCE_ID",
            "AUGUR_STATE_DIR",
            "AUGUR_LOG",
            "AUGUR_LOG_FEATURES",
            "AUGUR_SESSION_TIMEOUT",
            "AUGUR_ADMIN_LISTEN",
            "AUGUR_ONLINE_STORE",
            "AUGUR_ADMIN_TOKEN",
            "AUGUR_PYTHON",
            "AUGUR_TEST_TANSU",
            "AUGUR_TEST_REDIS_URL",
            "AUGURX__BROKERS",
            "MY_AUGUR__X",
            "HOSTNAME",
        ] {
            assert!(!is_override(name), "{name}");
        }
        // Ignored, not refused: the command line's own variables are left to clap.
        let (topology, applied) =
            overridden(&[("AUGUR_BROKERS", "elsewhere:1"), ("AUGUR_LOG", "debug")]).unwrap();
        assert!(applied.is_empty());
        assert_eq!(topology.kafka.brokers, "localhost:9092");
    }

    #[test]
    fn overrides_set_settings_at_every_depth() {
        let (t, applied) = overridden(&[
            ("AUGUR_KAFKA__BROKERS", "k1:9092,k2:9092"),
            ("AUGUR_STATE__CHECKPOINT_INTERVAL", "5s"),
            ("AUGUR_ONLINE_STORE__URL", "redis://redis:6379"),
            ("AUGUR_MODEL__VERSION", "2"),
            ("AUGUR_ADMIN__LISTEN", "0.0.0.0:9898"),
            ("AUGUR_SCORING__MAX_BATCH", "64"),
            ("AUGUR_SCORING__EVENT_TYPES", "[impression, click]"),
            ("AUGUR_MODEL__SHADOWS", "challenger"),
            ("AUGUR_SINKS__LOG_FEATURES", "true"),
            ("AUGUR_SINKS__PREDICTIONS__TOPIC", "preds"),
            ("AUGUR_SINKS__ALERTS__TOPIC", "alerts-x"),
            ("AUGUR_FEATURES__3__WINDOW", "12h"),
            ("AUGUR_FEATURES__0__FILTER__TYPE", "[impression, click]"),
            ("AUGUR_FEATURES__7__DEFAULT", "-2.5"),
            ("AUGUR__APP", "ctr-eu"),
        ])
        .unwrap();
        assert_eq!(t.kafka.brokers, "k1:9092,k2:9092");
        assert_eq!(t.state.checkpoint_interval, "5s");
        assert_eq!(t.online_store.url, "redis://redis:6379");
        assert_eq!(t.model.version, "2");
        assert_eq!(t.admin.listen, "0.0.0.0:9898");
        assert_eq!(t.scoring.max_batch, 64);
        assert_eq!(t.scoring.event_types, ["impression", "click"]);
        assert_eq!(t.model.shadows, ["challenger"]);
        assert!(t.sinks.log_features);
        assert_eq!(t.sinks.predictions.topic, "preds");
        assert_eq!(t.sinks.predictions.codec, "json", "siblings are kept");
        assert_eq!(t.sinks.alerts.as_ref().unwrap().topic, "alerts-x");
        assert_eq!(t.features[3].window.as_deref(), Some("12h"));
        assert_eq!(
            t.features[0].filter.as_ref().unwrap().event_type.as_slice(),
            ["impression", "click"]
        );
        assert_eq!(t.features[7].default, Some(-2.5));
        assert_eq!(t.app, "ctr-eu");
        // Untouched settings keep the file's values.
        assert_eq!(t.kafka.session_timeout, "10s");
        assert_eq!(t.features.len(), 12);
        assert_eq!(t.features[3].resolution.as_deref(), Some("1h"));
        assert!(t.validate().is_empty(), "{:?}", t.validate());
        assert_eq!(
            applied.variables_for("features[3].window"),
            ["AUGUR_FEATURES__3__WINDOW"]
        );
    }

    #[test]
    fn without_overrides_the_text_is_untouched() {
        let text = reference();
        let (out, applied) = apply_to_text(&text, vars(&[("AUGUR_LOG", "x")])).unwrap();
        assert!(matches!(out, Cow::Borrowed(_)));
        assert!(applied.is_empty());
    }

    #[test]
    fn librdkafka_keys_map_underscores_to_dots_and_values_stay_verbatim() {
        let (t, _) = overridden(&[
            ("AUGUR_KAFKA__CONSUMER__SASL_PASSWORD", "007"),
            ("AUGUR_KAFKA__PRODUCER__LINGER_MS", "5"),
            ("AUGUR_KAFKA__CONSUMER__FETCH_WAIT_MAX_MS", "50"),
        ])
        .unwrap();
        assert_eq!(
            text(t.kafka.consumer.get("sasl.password")).as_deref(),
            Some("007")
        );
        assert_eq!(
            text(t.kafka.producer.get("linger.ms")).as_deref(),
            Some("5")
        );
        assert_eq!(
            text(t.kafka.consumer.get("fetch.wait.max.ms")).as_deref(),
            Some("50"),
            "the file's value is replaced"
        );
        // Secrets that YAML would mangle, each taken verbatim.
        for password in [
            "007", "null", "a #b", "[x]", "1e3", ": x", "'q'", "yes", " sp ",
        ] {
            let (t, _) = overridden(&[("AUGUR_KAFKA__SECURITY__SASL_PASSWORD", password)]).unwrap();
            for map in [&t.kafka.consumer, &t.kafka.producer] {
                assert_eq!(
                    text(map.get("sasl.password")).as_deref(),
                    Some(password),
                    "{password:?}"
                );
            }
            let (t, _) = overridden(&[(
                "AUGUR_ONLINE_STORE__URL",
                &format!("redis://:{password}@h:6379"),
            )])
            .unwrap();
            assert_eq!(t.online_store.url, format!("redis://:{password}@h:6379"));
        }
    }

    #[test]
    fn security_sets_both_maps_and_a_specific_variable_wins() {
        let (t, applied) = overridden(&[
            ("AUGUR_KAFKA__SECURITY__SECURITY_PROTOCOL", "SASL_SSL"),
            ("AUGUR_KAFKA__SECURITY__SASL_USERNAME", "augur"),
            ("AUGUR_KAFKA__PRODUCER__SASL_USERNAME", "augur-producer"),
        ])
        .unwrap();
        assert_eq!(
            text(t.kafka.consumer.get("security.protocol")).as_deref(),
            Some("SASL_SSL")
        );
        assert_eq!(
            text(t.kafka.producer.get("security.protocol")).as_deref(),
            Some("SASL_SSL")
        );
        assert_eq!(
            text(t.kafka.consumer.get("sasl.username")).as_deref(),
            Some("augur")
        );
        assert_eq!(
            text(t.kafka.producer.get("sasl.username")).as_deref(),
            Some("augur-producer")
        );
        assert!(
            matches!(
                t.kafka.consumer.get("fetch.wait.max.ms"),
                Some(ConfigValue::Integer(10))
            ),
            "the file's other settings are kept as they were"
        );
        assert_eq!(
            applied.variables_for("kafka.producer.sasl.username"),
            ["AUGUR_KAFKA__PRODUCER__SASL_USERNAME"]
        );
        // Order of the environment does not matter.
        let (t, _) = overridden(&[
            ("AUGUR_KAFKA__PRODUCER__SASL_USERNAME", "augur-producer"),
            ("AUGUR_KAFKA__SECURITY__SASL_USERNAME", "augur"),
        ])
        .unwrap();
        assert_eq!(
            text(t.kafka.producer.get("sasl.username")).as_deref(),
            Some("augur-producer")
        );
    }

    fn problems(list: &[(&str, &str)]) -> Vec<String> {
        let mut root: Value = serde_norway::from_str(&reference()).unwrap();
        match apply(&mut root, vars(list)) {
            Ok(_) => Vec::new(),
            Err(problems) => problems.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn unknown_names_are_reported_with_the_variable_never_ignored() {
        let cases: &[(&str, &str, &str)] = &[
            ("AUGUR_KAFK__BROKERS", "x", "AUGUR_KAFK__BROKERS: the topology has no setting \"kafk\" (expected one of: app, kafka,"),
            ("AUGUR_STATE__CHECKPOINT_INTERVL", "1s", "AUGUR_STATE__CHECKPOINT_INTERVL: state has no setting \"checkpoint_intervl\" (expected one of: dir, checkpoint_interval, backlog_checkpoint_interval, idle_after, shutdown_grace, max_hot_bytes, store_cache_bytes)"),
            ("AUGUR_TEST__X", "1", "AUGUR_TEST__X: the topology has no setting \"test\""),
            ("AUGUR_STATE__DIR__X", "1", "AUGUR_STATE__DIR__X: state.dir is a setting, not a section"),
            ("AUGUR_SINKS__PREDICTIONS", "x", "AUGUR_SINKS__PREDICTIONS: sinks.predictions is a section"),
            ("AUGUR_KAFKA__CONSUMER", "x", "AUGUR_KAFKA__CONSUMER: name a librdkafka setting after CONSUMER"),
            ("AUGUR_KAFKA__SECURITY__SASL-PASSWORD", "x", "AUGUR_KAFKA__SECURITY__SASL-PASSWORD: name a librdkafka setting"),
            ("AUGUR_FEATURES__12__WINDOW", "1h", "AUGUR_FEATURES__12__WINDOW: features has 12 entries; \"12\" is not an index in it"),
            ("AUGUR_FEATURES__WINDOW", "1h", "AUGUR_FEATURES__WINDOW: features has 12 entries; \"window\" is not an index"),
            ("AUGUR_FEATURES__0__WINDOWS", "1h", "AUGUR_FEATURES__0__WINDOWS: features[0] has no setting \"windows\""),
            ("AUGUR_EXPERIMENT__ARMS__0__FRACTION", "1", "AUGUR_EXPERIMENT__ARMS__0__FRACTION: the topology file has no list experiment.arms"),
            ("AUGUR_SCORING__MAX_BATCH", "lots", "AUGUR_SCORING__MAX_BATCH: expected a number, got \"lots\""),
            ("AUGUR_SINKS__LOG_FEATURES", "1", "AUGUR_SINKS__LOG_FEATURES: expected true or false"),
            ("AUGUR_SCORING__EVENT_TYPES", "[a, [b]]", "AUGUR_SCORING__EVENT_TYPES: expected a YAML flow sequence"),
            ("AUGUR_KAFKA____BROKERS", "x", "AUGUR_KAFKA____BROKERS: expected AUGUR_<SECTION>__<KEY>"),
            ("AUGUR__", "x", "AUGUR__: expected AUGUR_<SECTION>__<KEY>"),
        ];
        for (name, value, want) in cases {
            let got = problems(&[(name, value)]);
            assert_eq!(got.len(), 1, "{name}: {got:?}");
            assert!(
                got[0].starts_with(want),
                "{name}: got {:?}, want {want:?}",
                got[0]
            );
        }
        // Every bad variable is reported, not just the first.
        let got = problems(&[("AUGUR_KAFK__BROKERS", "x"), ("AUGUR_STATE__NOPE", "y")]);
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn the_same_setting_from_two_variables_is_refused() {
        let got = problems(&[
            ("AUGUR_KAFKA__BROKERS", "a:1"),
            ("AUGUR__KAFKA__BROKERS", "b:1"),
        ]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].contains("sets kafka.brokers too"), "{got:?}");
    }

    #[test]
    fn errors_name_the_variable_behind_a_bad_value() {
        // A value that passes the override but not the parser.
        let err = overridden(&[
            ("AUGUR_SCORING__MAX_BATCH", "-3"),
            ("AUGUR_STATE__DIR", "/x"),
        ])
        .unwrap_err();
        assert!(err.starts_with("scoring.max_batch: "), "{err}");
        assert!(err.ends_with("(set by AUGUR_SCORING__MAX_BATCH)"), "{err}");
        assert!(
            !err.contains("line "),
            "line numbers of the regenerated text: {err}"
        );
        // A value that parses but does not validate.
        let (t, applied) = overridden(&[("AUGUR_STATE__CHECKPOINT_INTERVAL", "bad")]).unwrap();
        let problems: Vec<String> = t
            .validate()
            .into_iter()
            .map(|p| applied.annotate(p).to_string())
            .collect();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "state.checkpoint_interval (set by AUGUR_STATE__CHECKPOINT_INTERVAL): "
            ),
            "{problems:?}"
        );
        // A problem about the list an overridden item belongs to names it too.
        assert_eq!(
            applied.variables_for("state"),
            ["AUGUR_STATE__CHECKPOINT_INTERVAL"]
        );
        assert!(applied.variables_for("state.dir").is_empty());
        assert!(applied.variables_for("state.checkpoint").is_empty());
    }

    #[test]
    fn an_empty_file_can_be_filled_from_the_environment() {
        let mut root = Value::Null;
        apply(&mut root, vars(&[("AUGUR_ADMIN__LISTEN", "0.0.0.0:1")])).unwrap();
        assert_eq!(
            serde_norway::to_string(&root).unwrap().trim(),
            "admin:\n  listen: 0.0.0.0:1"
        );
    }

    #[test]
    fn librdkafka_settings_are_checked_without_showing_secret_values() {
        let (t, _) = overridden(&[
            ("AUGUR_KAFKA__SECURITY__SASL_PASWORD", "hunter2-secret"),
            ("AUGUR_KAFKA__CONSUMER__SECURITY_PROTOCOL", "SASL_PLAINTXT"),
            ("AUGUR_KAFKA__PRODUCER__SASL_PASSWORD", "fine-secret"),
            ("AUGUR_KAFKA__PRODUCER__SSL_KEY_PASSWORD", "another-secret"),
        ])
        .unwrap();
        let problems: Vec<String> = librdkafka_problems(&t)
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        let all = problems.join("\n");
        assert!(
            all.contains("kafka.consumer.sasl.pasword: librdkafka: No such configuration property"),
            "{all}"
        );
        assert!(all.contains("kafka.producer.sasl.pasword"), "{all}");
        assert!(
            all.contains("kafka.consumer.security.protocol: librdkafka: Invalid value"),
            "{all}"
        );
        assert!(!all.contains("secret"), "a secret value is shown: {all}");
        // A refused value of a secret-looking key is not repeated.
        let message = librdkafka_message(
            "ssl.key.password",
            "Invalid value \"hunter2\" for configuration property \"ssl.key.password\"",
        );
        assert!(!message.contains("hunter2"), "{message}");
        assert!(librdkafka_message("linger.ms", "Invalid value \"x\"").contains("\"x\""));
        // The reference topology's settings are fine.
        let (t, _) = overridden(&[]).unwrap();
        assert!(librdkafka_problems(&t).is_empty());
    }

    /// The field names (and kinds) serde expects at `path`, probed through the
    /// structs: an unknown key makes serde list the fields it knows; a mapping where a
    /// value belongs makes it name the expected type.
    fn probe(value: Value) -> (String, String) {
        match serde_path_to_error::deserialize::<_, Topology>(value) {
            Ok(_) => (String::new(), String::new()),
            Err(e) => (e.path().to_string(), e.into_inner().to_string()),
        }
    }

    /// `{"a": {"b": [{"c": leaf}]}}` for path ["a", "b", "0", "c"].
    fn nest(path: &[&str], leaf: Value) -> Value {
        match path.split_first() {
            None => leaf,
            Some((seg, rest)) if seg.parse::<usize>().is_ok() => {
                Value::Sequence(vec![nest(rest, leaf)])
            }
            Some((seg, rest)) => {
                let mut m = Mapping::new();
                m.insert(Value::String(seg.to_string()), nest(rest, leaf));
                Value::Mapping(m)
            }
        }
    }

    fn fields_at(path: &[&str]) -> Vec<String> {
        let mut unknown = Mapping::new();
        unknown.insert(Value::String("\u{1}probe".into()), Value::Null);
        let (_, message) = probe(nest(path, Value::Mapping(unknown)));
        let expected = message
            .split_once("expected")
            .unwrap_or_else(|| panic!("{path:?}: {message}"))
            .1;
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    fn check_schema(path: &mut Vec<&'static str>, schema: &'static [Key]) {
        let mut want: Vec<String> = schema
            .iter()
            .filter(|(_, k)| *k != Security)
            .map(|(n, _)| n.to_string())
            .collect();
        let mut got = fields_at(path);
        want.sort();
        got.sort();
        assert_eq!(
            got, want,
            "settings of {path:?} (update the tables in env.rs)"
        );
        for (name, kind) in schema {
            path.push(name);
            match kind {
                Section(keys) => check_schema(path, keys),
                Items(keys) => {
                    path.push("0");
                    check_schema(path, keys);
                    path.pop();
                }
                Security => {}
                leaf => {
                    // A mapping where the setting is: serde names what it expects,
                    // at this path, unless a mapping is what it takes.
                    let (at, message) = probe(nest(path, Value::Mapping(Mapping::new())));
                    let dotted = path
                        .iter()
                        .map(|s| {
                            if s.parse::<usize>().is_ok() {
                                format!("[{s}]")
                            } else {
                                format!(".{s}")
                            }
                        })
                        .collect::<String>();
                    let dotted = dotted.trim_start_matches('.');
                    let expect = match leaf {
                        Text => "a string",
                        Number => "",
                        Bool => "a boolean",
                        List => "a sequence",
                        TextOrList => "untagged enum OneOrMany",
                        Librdkafka => "<accepted>",
                        _ => unreachable!(),
                    };
                    if *leaf == Librdkafka {
                        assert_ne!(at, dotted, "{dotted} should take a mapping: {message}");
                    } else {
                        assert_eq!(at, dotted, "{dotted}: {message}");
                        if *leaf == Number {
                            assert!(
                                ["u64", "usize", "f64", "i64", "u32"]
                                    .iter()
                                    .any(|t| message.contains(t)),
                                "{dotted} is not a number: {message}"
                            );
                        } else {
                            assert!(
                                message.contains(expect),
                                "{dotted} is not {expect}: {message}"
                            );
                        }
                    }
                }
            }
            path.pop();
        }
    }

    #[test]
    fn the_override_tables_match_the_topology_structs() {
        check_schema(&mut Vec::new(), TOPOLOGY);
    }
}
