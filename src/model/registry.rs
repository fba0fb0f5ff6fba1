//! Model registries. The engine reaches a registry only through [`ModelRegistry`], so a
//! remote one (MLflow over its REST API, say) can be added without touching the stream.
//!
//! The default, [`DirRegistry`], is a directory: `<root>/<name>/<version>/{model.onnx,
//! model.json}`, aliases in `<root>/<name>/aliases.json` (`{"champion": 3, "previous": 2}`)
//! and archived versions in `<root>/<name>/archived.json` (`[1]`). Versions are
//! immutable; aliases move.
//!
//! The classic registry stages map onto aliases: Production is `champion`, Staging is
//! `challenger`, Archived is a version listed as archived, and None is everything else.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use super::ModelError;

/// The classic registry stages (MLflow's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    None,
    Staging,
    Production,
    Archived,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Stage::None => "None",
            Stage::Staging => "Staging",
            Stage::Production => "Production",
            Stage::Archived => "Archived",
        })
    }
}

/// The alias that carries the Production stage.
pub const CHAMPION: &str = "champion";
/// The alias that the last promotion moved `champion` away from: the rollback target.
pub const PREVIOUS: &str = "previous";
/// The alias that carries the Staging stage.
pub const CHALLENGER: &str = "challenger";

/// What a model registry offers the engine and the CLI.
pub trait ModelRegistry: Send + Sync + fmt::Debug {
    /// Where the registry lives, for messages.
    fn location(&self) -> String;
    /// Registered versions of a model, ascending.
    fn versions(&self, name: &str) -> Result<Vec<u32>, ModelError>;
    /// The model's aliases; empty when it has none.
    fn aliases(&self, name: &str) -> Result<BTreeMap<String, u32>, ModelError>;
    /// Replaces the model's aliases in one step (readers see the old map or the new one).
    fn write_aliases(&self, name: &str, aliases: &BTreeMap<String, u32>) -> Result<(), ModelError>;
    /// Archived versions.
    fn archived(&self, name: &str) -> Result<BTreeSet<u32>, ModelError>;
    fn set_archived(&self, name: &str, archived: &BTreeSet<u32>) -> Result<(), ModelError>;
    /// A local directory holding the version's `model.onnx` and `model.json` (a remote
    /// registry downloads into a cache).
    fn local_dir(&self, name: &str, version: u32) -> Result<PathBuf, ModelError>;
    /// Adds a checked model directory as the next version; returns the version.
    fn add_version(&self, name: &str, source: &Path) -> Result<u32, ModelError>;

    fn error(&self, message: String) -> ModelError {
        ModelError::Registry {
            path: PathBuf::from(self.location()),
            message,
        }
    }

    /// Resolves a version number or alias to a version and its local directory.
    /// Without any aliases, `champion` means the newest version.
    fn resolve(&self, name: &str, version_or_alias: &str) -> Result<(u32, PathBuf), ModelError> {
        let versions = self.versions(name)?;
        let version = match version_or_alias.parse::<u32>() {
            Ok(v) => v,
            Err(_) => match self.aliases(name)?.get(version_or_alias) {
                Some(v) => *v,
                None if version_or_alias == CHAMPION => *versions
                    .last()
                    .ok_or_else(|| self.error(format!("model \"{name}\" has no versions")))?,
                None => {
                    return Err(self.error(format!(
                        "model \"{name}\" has no alias \"{version_or_alias}\""
                    )))
                }
            },
        };
        if !versions.contains(&version) {
            return Err(self.error(format!(
                "model \"{name}\" has no version {version} (registered: {versions:?})"
            )));
        }
        Ok((version, self.local_dir(name, version)?))
    }

    /// Registers a model directory as the next version of `name`, after checking that it
    /// loads in tract, that its inputs are exactly the features the topology produces,
    /// and that it scores a probe batch to probabilities. Returns the new version.
    fn register(
        &self,
        name: &str,
        source: &Path,
        topology_features: &[String],
    ) -> Result<u32, ModelError> {
        let model =
            super::Model::load(source, topology_features).map_err(|e| ModelError::Registry {
                path: source.to_owned(),
                message: format!("refused as a version of \"{name}\": {e}"),
            })?;
        if model.width() != topology_features.len() {
            return Err(ModelError::Mismatch {
                name: name.to_owned(),
                version: model.meta.version,
                message: format!(
                    "model takes {} inputs but the topology produces {} features ({})",
                    model.width(),
                    topology_features.len(),
                    topology_features.join(", ")
                ),
            });
        }
        self.add_version(name, source)
    }

    /// Points `alias` at `version`. Moving `champion` keeps the old one as `previous`.
    /// Archived versions cannot take an alias.
    fn set_alias(&self, name: &str, alias: &str, version: u32) -> Result<(), ModelError> {
        if !self.versions(name)?.contains(&version) {
            return Err(self.error(format!("model \"{name}\" has no version {version}")));
        }
        if self.archived(name)?.contains(&version) {
            return Err(self.error(format!(
                "model \"{name}\" v{version} is archived; it cannot become {alias}"
            )));
        }
        let mut aliases = self.aliases(name)?;
        if alias == CHAMPION {
            if let Some(old) = aliases.get(CHAMPION).copied().filter(|old| *old != version) {
                aliases.insert(PREVIOUS.into(), old);
            }
        }
        aliases.insert(alias.to_owned(), version);
        self.write_aliases(name, &aliases)
    }

    /// Swaps `champion` and `previous`; returns (from, to).
    fn rollback(&self, name: &str) -> Result<(u32, u32), ModelError> {
        let mut aliases = self.aliases(name)?;
        let (Some(champion), Some(previous)) = (
            aliases.get(CHAMPION).copied(),
            aliases.get(PREVIOUS).copied(),
        ) else {
            return Err(self.error(format!(
                "model \"{name}\" has no {CHAMPION} and {PREVIOUS} aliases to roll back between \
                 (aliases: {aliases:?})"
            )));
        };
        aliases.insert(CHAMPION.into(), previous);
        aliases.insert(PREVIOUS.into(), champion);
        self.write_aliases(name, &aliases)?;
        Ok((champion, previous))
    }

    /// Archives a version. A version some alias points at is refused, naming the alias.
    fn archive(&self, name: &str, version: u32) -> Result<(), ModelError> {
        if !self.versions(name)?.contains(&version) {
            return Err(self.error(format!("model \"{name}\" has no version {version}")));
        }
        let aliases = self.aliases(name)?;
        let holding: Vec<&str> = aliases
            .iter()
            .filter(|(_, v)| **v == version)
            .map(|(a, _)| a.as_str())
            .collect();
        if !holding.is_empty() {
            return Err(self.error(format!(
                "model \"{name}\" v{version} is still {}; move the alias first",
                holding.join(" and ")
            )));
        }
        let mut archived = self.archived(name)?;
        archived.insert(version);
        self.set_archived(name, &archived)
    }

    /// The stage of every version, ascending.
    fn stages(&self, name: &str) -> Result<Vec<(u32, Stage, Vec<String>)>, ModelError> {
        let aliases = self.aliases(name)?;
        let archived = self.archived(name)?;
        Ok(self
            .versions(name)?
            .into_iter()
            .map(|v| {
                let names: Vec<String> = aliases
                    .iter()
                    .filter(|(_, a)| **a == v)
                    .map(|(n, _)| n.clone())
                    .collect();
                let stage = if archived.contains(&v) {
                    Stage::Archived
                } else if aliases.get(CHAMPION) == Some(&v) {
                    Stage::Production
                } else if aliases.get(CHALLENGER) == Some(&v) {
                    Stage::Staging
                } else {
                    Stage::None
                };
                (v, stage, names)
            })
            .collect())
    }
}

/// The directory registry.
#[derive(Debug, Clone)]
pub struct DirRegistry {
    root: PathBuf,
}

impl DirRegistry {
    pub fn open(root: impl Into<PathBuf>) -> DirRegistry {
        DirRegistry { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read_json<T: serde::de::DeserializeOwned + Default>(
        &self,
        path: PathBuf,
    ) -> Result<T, ModelError> {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|source| ModelError::Meta { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(source) => Err(ModelError::Read { path, source }),
        }
    }

    /// Writes through a temporary file and a rename, so readers never see half a file.
    fn write_json(&self, path: PathBuf, value: &impl serde::Serialize) -> Result<(), ModelError> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(value).expect("registry files serialize");
        std::fs::write(&tmp, text).map_err(|source| ModelError::Read {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| ModelError::Read { path, source })
    }
}

impl ModelRegistry for DirRegistry {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn versions(&self, name: &str) -> Result<Vec<u32>, ModelError> {
        let dir = self.root.join(name);
        let entries = std::fs::read_dir(&dir).map_err(|source| ModelError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut versions: Vec<u32> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("model.onnx").is_file())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect();
        versions.sort_unstable();
        Ok(versions)
    }

    fn aliases(&self, name: &str) -> Result<BTreeMap<String, u32>, ModelError> {
        self.read_json(self.root.join(name).join("aliases.json"))
    }

    fn write_aliases(&self, name: &str, aliases: &BTreeMap<String, u32>) -> Result<(), ModelError> {
        self.write_json(self.root.join(name).join("aliases.json"), aliases)
    }

    fn archived(&self, name: &str) -> Result<BTreeSet<u32>, ModelError> {
        self.read_json(self.root.join(name).join("archived.json"))
    }

    fn set_archived(&self, name: &str, archived: &BTreeSet<u32>) -> Result<(), ModelError> {
        self.write_json(self.root.join(name).join("archived.json"), archived)
    }

    fn local_dir(&self, name: &str, version: u32) -> Result<PathBuf, ModelError> {
        Ok(self.root.join(name).join(version.to_string()))
    }

    /// Copies the directory in through a staging directory and a rename, so a
    /// half-copied version is never visible. The registered `model.json` records the
    /// name and version it was registered as.
    fn add_version(&self, name: &str, source: &Path) -> Result<u32, ModelError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ModelError::Read { path, source }
        };
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let version = self
            .versions(name)
            .unwrap_or_default()
            .last()
            .map_or(1, |v| v + 1);
        let target = dir.join(version.to_string());
        let staging = dir.join(format!(".{version}.staging"));
        std::fs::create_dir_all(&staging).map_err(io(&staging))?;
        let onnx = source.join("model.onnx");
        std::fs::copy(&onnx, staging.join("model.onnx")).map_err(io(&onnx))?;
        let meta_path = source.join("model.json");
        let text = std::fs::read_to_string(&meta_path).map_err(io(&meta_path))?;
        let mut meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Meta {
                path: meta_path.clone(),
                source,
            })?;
        meta["name"] = serde_json::json!(name);
        meta["version"] = serde_json::json!(version);
        let pretty = serde_json::to_string_pretty(&meta).expect("a JSON value serializes");
        std::fs::write(staging.join("model.json"), pretty).map_err(io(&staging))?;
        std::fs::rename(&staging, &target).map_err(io(&target))?;
        Ok(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> DirRegistry {
        DirRegistry::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
    }

    #[test]
    fn aliases_and_numbers_resolve() {
        let r = registry();
        assert_eq!(r.versions("ctr").unwrap(), vec![1, 2]);
        assert_eq!(
            r.resolve("ctr", "champion").unwrap().0,
            1,
            "aliases.json names v1 champion"
        );
        assert_eq!(r.resolve("ctr", "2").unwrap().0, 2);
    }

    #[test]
    fn unknown_versions_and_aliases_are_named() {
        let r = registry();
        let err = r.resolve("ctr", "7").unwrap_err().to_string();
        assert!(err.contains("no version 7 (registered: [1, 2])"), "{err}");
        let err = r.resolve("ctr", "challenger").unwrap_err().to_string();
        assert!(err.contains("no alias \"challenger\""), "{err}");
        assert!(r.resolve("nope", "champion").is_err());
    }

    /// A scratch registry holding copies of the committed ctr v1 and v2.
    fn scratch() -> (tempfile::TempDir, DirRegistry) {
        let dir = tempfile::tempdir().unwrap();
        let r = DirRegistry::open(dir.path());
        for v in [1, 2] {
            let src = registry().local_dir("ctr", v).unwrap();
            let dst = dir.path().join("ctr").join(v.to_string());
            std::fs::create_dir_all(&dst).unwrap();
            for f in ["model.onnx", "model.json"] {
                std::fs::copy(src.join(f), dst.join(f)).unwrap();
            }
        }
        (dir, r)
    }

    #[test]
    fn promote_rollback_and_archive_move_aliases_and_stages() {
        let (_dir, r) = scratch();
        r.set_alias("ctr", CHAMPION, 1).unwrap();
        r.set_alias("ctr", CHAMPION, 2).unwrap();
        assert_eq!(r.aliases("ctr").unwrap()[PREVIOUS], 1);
        assert_eq!(r.rollback("ctr").unwrap(), (2, 1));
        assert_eq!(r.resolve("ctr", CHAMPION).unwrap().0, 1);
        assert_eq!(r.resolve("ctr", PREVIOUS).unwrap().0, 2);

        let err = r.archive("ctr", 1).unwrap_err().to_string();
        assert!(err.contains("v1 is still champion"), "{err}");
        r.set_alias("ctr", CHAMPION, 2).unwrap();
        r.write_aliases("ctr", &BTreeMap::from([(CHAMPION.to_owned(), 2)]))
            .unwrap();
        r.archive("ctr", 1).unwrap();
        let err = r.set_alias("ctr", CHALLENGER, 1).unwrap_err().to_string();
        assert!(err.contains("v1 is archived"), "{err}");
        let stages: Vec<(u32, Stage)> = r
            .stages("ctr")
            .unwrap()
            .into_iter()
            .map(|(v, s, _)| (v, s))
            .collect();
        assert_eq!(stages, vec![(1, Stage::Archived), (2, Stage::Production)]);
    }

    #[test]
    fn rollback_without_a_previous_version_is_refused() {
        let (_dir, r) = scratch();
        r.set_alias("ctr", CHAMPION, 1).unwrap();
        let err = r.rollback("ctr").unwrap_err().to_string();
        assert!(err.contains("no champion and previous aliases"), "{err}");
    }

    #[test]
    fn register_refuses_a_model_of_the_wrong_width_and_names_it() {
        let (_dir, r) = scratch();
        let names: Vec<String> = [
            "impressions_1h",
            "clicks_1h",
            "ctr_1h",
            "impressions_24h",
            "clicks_24h",
            "ctr_24h",
            "purchases_30d",
            "avg_purchase_amount_30d",
            "distinct_categories_7d",
            "secs_since_last_event",
            "days_since_last_purchase",
            "events_total",
            "extra_feature",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let err = r
            .register("ctr", &registry().local_dir("ctr", 1).unwrap(), &names)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model takes 12 inputs but the topology produces 13 features"),
            "{err}"
        );
        assert_eq!(r.versions("ctr").unwrap(), vec![1, 2], "nothing was added");
    }
}
