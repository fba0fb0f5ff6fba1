//! Models in the running stream: which versions serve, and how that changes without a
//! restart. A [`ModelManager`] per worker resolves the topology's model references
//! (champion, experiment arms, shadows) against the registry, loads and probes new
//! versions off the hot path, and publishes an immutable [`ModelSet`]. Partition tasks
//! take one snapshot per batch, so no batch ever mixes versions, and the previous
//! champion stays loaded so a rollback needs no load at all.
//!
//! Changes arrive three ways, whichever is first: the manager polls the registry's
//! aliases (`model.poll_interval`, default 500 ms), every worker reads the
//! `<app>-control` topic where `augur models promote|rollback` and the admin API
//! publish the new aliases, and the admin API of a worker tells its own manager directly.

pub mod control;
pub mod experiment;
pub mod shadow;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::alerts::Alerts;
use crate::config::Topology;
use crate::metrics as m;
use crate::model::registry::{CHAMPION, PREVIOUS};
use crate::model::{Model, ModelError, ModelRegistry};

/// The models one batch is scored with.
#[derive(Debug)]
pub struct ModelSet {
    /// Bumped on every change; partition tasks log the switch.
    pub generation: u64,
    pub champion: Arc<Model>,
    /// The previous champion, kept loaded as the rollback target.
    pub previous: Option<Arc<Model>>,
    /// The experiment's arms, in topology order (empty without an experiment).
    pub arms: Vec<Arc<Model>>,
    /// Shadow models that loaded.
    pub shadows: Vec<Arc<Model>>,
}

impl ModelSet {
    /// The model that scores rows of arm `arm` (the champion without an experiment).
    pub fn scorer(&self, arm: usize) -> &Model {
        self.arms.get(arm).unwrap_or(&self.champion)
    }
}

/// What can ask a manager to act.
#[derive(Debug)]
pub enum ModelCommand {
    /// Re-read the registry now (the admin API changed it).
    Reload,
    /// Aliases published on the control topic.
    Aliases(BTreeMap<String, u32>),
}

/// A change of aliases, from the CLI or the admin API.
#[derive(Debug, Clone)]
pub enum AliasOp {
    /// Point `alias` at `version` (`champion` keeps the old one as `previous`).
    Promote { alias: String, version: u32 },
    /// Swap `champion` and `previous`.
    Rollback,
}

/// Applies `op` to the registry and returns a one-line summary and the new aliases,
/// which the caller publishes on the control topic.
pub fn change_aliases(
    registry: &dyn ModelRegistry,
    name: &str,
    op: &AliasOp,
) -> Result<(String, BTreeMap<String, u32>), ModelError> {
    let summary = match op {
        AliasOp::Promote { alias, version } => {
            registry.set_alias(name, alias, *version)?;
            format!("{name}: {alias} is now v{version}")
        }
        AliasOp::Rollback => {
            let (from, to) = registry.rollback(name)?;
            format!("{name}: rolled back, champion v{from} -> v{to} (v{from} is now previous)")
        }
    };
    Ok((summary, registry.aliases(name)?))
}

/// The topology's model references, as written (versions or aliases).
#[derive(Debug, Clone)]
struct Refs {
    name: String,
    champion: String,
    arms: Vec<String>,
    shadows: Vec<String>,
}

/// The versions the references resolve to under one alias map.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    champion: u32,
    previous: Option<u32>,
    arms: Vec<u32>,
    shadows: Vec<u32>,
}

pub struct ModelManager {
    registry: Arc<dyn ModelRegistry>,
    refs: Refs,
    features: Vec<String>,
    loaded: HashMap<u32, Arc<Model>>,
    /// Versions that failed to load, with the alias map they failed under: not retried
    /// until the aliases change again.
    failed: HashMap<u32, String>,
    /// The alias map last read from the registry (a change there is applied).
    registry_aliases: BTreeMap<String, u32>,
    current: Wanted,
    generation: u64,
    sender: watch::Sender<Arc<ModelSet>>,
    alerts: Alerts,
}

impl ModelManager {
    /// Resolves and loads everything the topology names. The champion and the arms
    /// must load; a shadow that fails is reported and left out.
    pub async fn start(
        topology: &Topology,
        registry: Arc<dyn ModelRegistry>,
        alerts: Alerts,
    ) -> Result<(ModelManager, watch::Receiver<Arc<ModelSet>>), ModelError> {
        let refs = Refs {
            name: topology.model.name.clone(),
            champion: topology.model.version.clone(),
            arms: topology
                .experiment
                .iter()
                .flat_map(|e| e.arms.iter().map(|a| a.model.clone()))
                .collect(),
            shadows: topology.model.shadows.clone(),
        };
        let features = topology.feature_set().names().to_vec();
        let aliases = registry.aliases(&refs.name)?;
        let versions = registry.versions(&refs.name)?;
        let wanted =
            resolve(&refs, &aliases, &versions).map_err(|message| ModelError::Registry {
                path: registry.location().into(),
                message,
            })?;
        let (sender, receiver) = watch::channel(Arc::new(ModelSet {
            generation: 0,
            champion: Arc::new(load(&registry, &refs.name, wanted.champion, &features).await?),
            previous: None,
            arms: Vec::new(),
            shadows: Vec::new(),
        }));
        let champion = Arc::clone(&sender.borrow().champion);
        let mut manager = ModelManager {
            registry,
            refs,
            features,
            loaded: HashMap::from([(wanted.champion, champion)]),
            failed: HashMap::new(),
            registry_aliases: aliases,
            current: Wanted {
                champion: wanted.champion,
                previous: None,
                arms: Vec::new(),
                shadows: Vec::new(),
            },
            generation: 0,
            sender,
            alerts,
        };
        for &arm in &wanted.arms {
            if !manager.loaded.contains_key(&arm) {
                let model = load(
                    &manager.registry,
                    &manager.refs.name,
                    arm,
                    &manager.features,
                )
                .await?;
                manager.loaded.insert(arm, Arc::new(model));
            }
        }
        manager.current.arms = wanted.arms.clone();
        manager.apply(wanted, "startup").await;
        Ok((manager, receiver))
    }

    /// Watches the registry and the command channel until `stop` resolves.
    pub async fn run(
        mut self,
        poll: Duration,
        mut commands: mpsc::Receiver<ModelCommand>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => self.poll_registry(false).await,
                command = commands.recv(), if commands_open => match command {
                    Some(ModelCommand::Reload) => self.poll_registry(true).await,
                    Some(ModelCommand::Aliases(aliases)) => self.apply_aliases(aliases, "control topic").await,
                    None => commands_open = false,
                },
            }
        }
    }

    async fn poll_registry(&mut self, forced: bool) {
        match self.registry.aliases(&self.refs.name) {
            Ok(aliases) if forced || aliases != self.registry_aliases => {
                self.registry_aliases = aliases.clone();
                self.apply_aliases(aliases, "registry").await;
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(m::MODEL_REGISTRY_ERRORS).increment(1);
                tracing::warn!(error = %e, "cannot read the registry's aliases; keeping the current models");
            }
        }
    }

    async fn apply_aliases(&mut self, aliases: BTreeMap<String, u32>, source: &'static str) {
        let versions = match self.registry.versions(&self.refs.name) {
            Ok(v) => v,
            Err(e) => {
                metrics::counter!(m::MODEL_REGISTRY_ERRORS).increment(1);
                tracing::warn!(error = %e, "cannot list the registry's versions");
                return;
            }
        };
        match resolve(&self.refs, &aliases, &versions) {
            Ok(wanted) => {
                if wanted != self.current {
                    self.apply(wanted, source).await;
                }
            }
            Err(message) => {
                self.alerts.raise(
                    "model_load_failed",
                    &self.refs.name,
                    &format!("aliases from the {source} cannot be applied: {message}"),
                );
            }
        }
    }

    /// Loads what `wanted` needs, keeps serving the current version of any role whose
    /// new version fails, then publishes the new set.
    async fn apply(&mut self, wanted: Wanted, source: &'static str) {
        let started = Instant::now();
        let mut next = self.current.clone();
        next.champion = self
            .ensure(wanted.champion, "champion")
            .await
            .unwrap_or(next.champion);
        next.previous = match wanted.previous {
            Some(v) => self
                .ensure(v, "previous")
                .await
                .map(Some)
                .unwrap_or(next.previous),
            None => None,
        };
        for (i, &v) in wanted.arms.iter().enumerate() {
            if let Some(v) = self.ensure(v, "experiment arm").await {
                next.arms[i] = v;
            }
        }
        let mut shadows = Vec::new();
        for (i, &v) in wanted.shadows.iter().enumerate() {
            match self.ensure(v, "shadow").await {
                Some(v) => shadows.push(v),
                // Keep the shadow it replaces, if it had one in this slot.
                None => shadows.extend(self.current.shadows.get(i).copied()),
            }
        }
        next.shadows = shadows;
        if next == self.current && self.generation > 0 {
            return;
        }
        let from = self.current.champion;
        self.current = next;
        self.generation += 1;
        let get = |v: &u32| Arc::clone(&self.loaded[v]);
        let set = ModelSet {
            generation: self.generation,
            champion: get(&self.current.champion),
            previous: self.current.previous.as_ref().map(get),
            arms: self.current.arms.iter().map(get).collect(),
            shadows: self.current.shadows.iter().map(get).collect(),
        };
        self.sender.send_replace(Arc::new(set));
        // Keep only what the set uses: champion, previous, arms, shadows.
        let keep: Vec<u32> = std::iter::once(self.current.champion)
            .chain(self.current.previous)
            .chain(self.current.arms.iter().copied())
            .chain(self.current.shadows.iter().copied())
            .collect();
        self.loaded.retain(|v, _| keep.contains(v));
        metrics::gauge!(m::MODEL_CHAMPION_VERSION, "model" => self.refs.name.clone())
            .set(self.current.champion as f64);
        metrics::counter!(m::MODEL_SWAPS, "model" => self.refs.name.clone()).increment(1);
        tracing::info!(
            model = %self.refs.name, source, from, champion = self.current.champion,
            previous = ?self.current.previous, arms = ?self.current.arms,
            shadows = ?self.current.shadows, generation = self.generation,
            took_ms = started.elapsed().as_millis() as u64,
            "model set published"
        );
    }

    /// The loaded model of `version`, loading it off the hot path when needed. A
    /// failure is reported once (metric, alert record, log) and None returned.
    async fn ensure(&mut self, version: u32, role: &str) -> Option<u32> {
        if self.loaded.contains_key(&version) {
            return Some(version);
        }
        if self.failed.contains_key(&version) {
            return None;
        }
        match load(&self.registry, &self.refs.name, version, &self.features).await {
            Ok(model) => {
                self.loaded.insert(version, Arc::new(model));
                Some(version)
            }
            Err(e) => {
                metrics::counter!(m::MODEL_LOAD_FAILURES, "model" => self.refs.name.clone())
                    .increment(1);
                let message = format!("{role} v{version} failed to load and does not serve: {e}");
                self.alerts
                    .raise("model_load_failed", &self.refs.name, &message);
                self.failed.insert(version, e.to_string());
                None
            }
        }
    }
}

/// Loads and probes a version on the blocking pool.
async fn load(
    registry: &Arc<dyn ModelRegistry>,
    name: &str,
    version: u32,
    features: &[String],
) -> Result<Model, ModelError> {
    let dir = registry.local_dir(name, version)?;
    let features = features.to_vec();
    tokio::task::spawn_blocking(move || Model::load(&dir, &features))
        .await
        .unwrap_or_else(|e| {
            Err(ModelError::Load {
                path: Default::default(),
                message: format!("loading task failed: {e}"),
            })
        })
}

/// Resolves every reference under `aliases`. A plain number names a version; an
/// unknown alias is an error, except `champion`, which then means the newest version.
fn resolve(
    refs: &Refs,
    aliases: &BTreeMap<String, u32>,
    versions: &[u32],
) -> Result<Wanted, String> {
    let one = |r: &str| -> Result<u32, String> {
        let v = match r.parse::<u32>() {
            Ok(v) => v,
            Err(_) => match aliases.get(r) {
                Some(v) => *v,
                None if r == CHAMPION => *versions
                    .last()
                    .ok_or_else(|| format!("model \"{}\" has no versions", refs.name))?,
                None => return Err(format!("model \"{}\" has no alias \"{r}\"", refs.name)),
            },
        };
        if versions.contains(&v) {
            Ok(v)
        } else {
            Err(format!(
                "model \"{}\" has no version {v} (for \"{r}\"; registered: {versions:?})",
                refs.name
            ))
        }
    };
    let champion = one(&refs.champion)?;
    Ok(Wanted {
        champion,
        previous: aliases
            .get(PREVIOUS)
            .copied()
            .filter(|v| *v != champion && versions.contains(v)),
        arms: refs.arms.iter().map(|r| one(r)).collect::<Result<_, _>>()?,
        // A shadow whose reference does not resolve is left out (and said so by the
        // caller's alert); it never blocks the champion.
        shadows: refs.shadows.iter().filter_map(|r| one(r).ok()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_through_aliases() {
        let refs = Refs {
            name: "ctr".into(),
            champion: "champion".into(),
            arms: vec!["champion".into(), "2".into()],
            shadows: vec!["challenger".into(), "missing".into()],
        };
        let aliases = BTreeMap::from([
            ("champion".to_owned(), 1),
            ("previous".to_owned(), 3),
            ("challenger".to_owned(), 3),
        ]);
        let wanted = resolve(&refs, &aliases, &[1, 2, 3]).unwrap();
        assert_eq!(
            wanted,
            Wanted {
                champion: 1,
                previous: Some(3),
                arms: vec![1, 2],
                shadows: vec![3],
            }
        );
        let err = resolve(&refs, &aliases, &[1, 3]).unwrap_err();
        assert!(err.contains("no version 2"), "{err}");
        // Without aliases, champion is the newest version.
        let wanted = resolve(&refs, &BTreeMap::new(), &[1, 2]).unwrap();
        assert_eq!((wanted.champion, wanted.previous), (2, None));
    }
}
