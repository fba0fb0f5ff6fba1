//! The directory model registry: `<root>/<name>/<version>/{model.onnx, model.json}` with
//! aliases in `<root>/<name>/aliases.json` (`{"champion": 3, "previous": 2}`).
//! Versions are immutable; aliases move.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::ModelError;

#[derive(Debug, Clone)]
pub struct Registry {
    root: PathBuf,
}

impl Registry {
    pub fn open(root: impl Into<PathBuf>) -> Registry {
        Registry { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn error(&self, message: String) -> ModelError {
        ModelError::Registry {
            path: self.root.clone(),
            message,
        }
    }

    /// Registered versions of a model, ascending.
    pub fn versions(&self, name: &str) -> Result<Vec<u32>, ModelError> {
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

    /// The aliases of a model; empty when it has no `aliases.json`.
    pub fn aliases(&self, name: &str) -> Result<BTreeMap<String, u32>, ModelError> {
        let path = self.root.join(name).join("aliases.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|source| ModelError::Meta { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(source) => Err(ModelError::Read { path, source }),
        }
    }

    /// Resolves a version number or alias to a version and its directory.
    /// Without an alias file, `champion` means the newest version.
    pub fn resolve(
        &self,
        name: &str,
        version_or_alias: &str,
    ) -> Result<(u32, PathBuf), ModelError> {
        let versions = self.versions(name)?;
        let version = match version_or_alias.parse::<u32>() {
            Ok(v) => v,
            Err(_) => match self.aliases(name)?.get(version_or_alias) {
                Some(v) => *v,
                None if version_or_alias == "champion" => *versions
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
        Ok((version, self.root.join(name).join(version.to_string())))
    }
}

impl Registry {
    /// Registers a model directory (`model.onnx` + `model.json`) as the next version of
    /// `name`, after checking that it loads in tract, that its inputs are features the
    /// topology produces, and that it scores a probe batch to probabilities. Versions
    /// are never overwritten. Returns the new version.
    pub fn register(
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
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| ModelError::Read {
            path: dir.clone(),
            source,
        })?;
        let version = self
            .versions(name)
            .unwrap_or_default()
            .last()
            .map_or(1, |v| v + 1);
        let target = dir.join(version.to_string());
        let staging = dir.join(format!(".{version}.staging"));
        let copy = |file: &str| {
            std::fs::copy(source.join(file), staging.join(file)).map_err(|source_err| {
                ModelError::Read {
                    path: source.join(file),
                    source: source_err,
                }
            })
        };
        std::fs::create_dir_all(&staging).map_err(|source| ModelError::Read {
            path: staging.clone(),
            source,
        })?;
        copy("model.onnx")?;
        // The registered model.json records the name and version it was registered as.
        let meta_path = source.join("model.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|source| ModelError::Read {
            path: meta_path.clone(),
            source,
        })?;
        let mut meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| ModelError::Meta {
                path: meta_path.clone(),
                source,
            })?;
        meta["name"] = serde_json::json!(name);
        meta["version"] = serde_json::json!(version);
        let pretty = serde_json::to_string_pretty(&meta).expect("a JSON value serializes");
        std::fs::write(staging.join("model.json"), pretty).map_err(|source| ModelError::Read {
            path: staging.clone(),
            source,
        })?;
        // Rename last, so a half-copied version is never visible.
        std::fs::rename(&staging, &target).map_err(|source| ModelError::Read {
            path: target.clone(),
            source,
        })?;
        Ok(version)
    }

    /// Points `alias` at `version`; moving `champion` keeps the old one as `previous`.
    pub fn set_alias(&self, name: &str, alias: &str, version: u32) -> Result<(), ModelError> {
        if !self.versions(name)?.contains(&version) {
            return Err(self.error(format!("model \"{name}\" has no version {version}")));
        }
        let mut aliases = self.aliases(name)?;
        if alias == "champion" {
            if let Some(old) = aliases
                .get("champion")
                .copied()
                .filter(|old| *old != version)
            {
                aliases.insert("previous".into(), old);
            }
        }
        aliases.insert(alias.to_owned(), version);
        let path = self.root.join(name).join("aliases.json");
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&aliases).expect("a map serializes");
        std::fs::write(&tmp, text).map_err(|source| ModelError::Read {
            path: tmp.clone(),
            source,
        })?;
        std::fs::rename(&tmp, &path).map_err(|source| ModelError::Read { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        Registry::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
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
}
