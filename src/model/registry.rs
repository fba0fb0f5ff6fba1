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
