//! `endpoints_dir`: the node's workloads as files, one or more per file, so that they come and
//! go without a restart (a CNI plugin or a pod watcher writes a file per pod and removes it).
//!
//! Each file is read on its own: one that does not parse or validate, or that declares an
//! endpoint or an address another file (or the config) already has, is refused with an error
//! naming it, and what it last held that was good stays in force, so one broken file never
//! takes the other workloads down with it.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use warden_config::{EndpointConfig, endpoints_from_yaml, validate_endpoints};

/// File names read: as for policies.
const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// The folder and what each of its files last held.
#[derive(Debug)]
pub struct EndpointFiles {
    dir: PathBuf,
    /// The config's own endpoints, which come first and win every conflict.
    declared: Vec<EndpointConfig>,
    files: BTreeMap<PathBuf, FileState>,
    /// What the last read put together.
    merged: Vec<EndpointConfig>,
}

#[derive(Debug, Default)]
struct FileState {
    /// Of the text last read, good or bad: an unchanged file is not parsed again.
    fingerprint: Option<u64>,
    /// The endpoints of its last good text, if any.
    good: Vec<EndpointConfig>,
    /// Why its current text is not in force: it does not read, parse or validate.
    invalid: Option<String>,
    /// Why its good endpoints are left out: they clash with those declared before them.
    conflict: Option<String>,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct EndpointRead {
    /// The endpoints now, when they changed.
    pub changed: Option<Vec<EndpointConfig>>,
    /// Errors first seen in this read, one per file.
    pub new_errors: Vec<String>,
}

impl EndpointFiles {
    pub fn new(dir: &Path, declared: &[EndpointConfig]) -> EndpointFiles {
        EndpointFiles {
            dir: dir.to_path_buf(),
            declared: declared.to_vec(),
            files: BTreeMap::new(),
            merged: declared.to_vec(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files whose text is not in force, with why.
    pub fn errors(&self) -> Vec<String> {
        self.files
            .values()
            .flat_map(|state| state.invalid.iter().chain(&state.conflict).cloned())
            .collect()
    }

    /// Reads the folder. A folder that cannot be read changes nothing (its files keep what
    /// they held); a file gone takes its endpoints with it.
    pub fn read(&mut self) -> EndpointRead {
        let mut read = EndpointRead::default();
        let paths = match endpoint_paths(&self.dir) {
            Ok(paths) => paths,
            Err(error) => {
                let error = format!("cannot read endpoints_dir {}: {error}", self.dir.display());
                if !self.errors().contains(&error) {
                    read.new_errors.push(error);
                }
                return read;
            }
        };
        self.files.retain(|path, _| paths.contains(path));
        for path in &paths {
            let text = match std::fs::read_to_string(path) {
                // Removed between the listing and the read: the next read settles it.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                text => text.map_err(|error| format!("{}: {error}", path.display())),
            };
            let fingerprint = {
                let mut hasher = DefaultHasher::new();
                text.hash(&mut hasher);
                hasher.finish()
            };
            let state = self.files.entry(path.clone()).or_default();
            if state.fingerprint == Some(fingerprint) {
                continue;
            }
            state.fingerprint = Some(fingerprint);
            let parsed = text.and_then(|text| {
                endpoints_from_yaml(&text, path)
                    .and_then(|endpoints| {
                        validate_endpoints(&endpoints)?;
                        Ok(endpoints)
                    })
                    .map_err(|error| format!("{}: {error}", path.display()))
            });
            match parsed {
                Ok(endpoints) => {
                    state.good = endpoints;
                    state.invalid = None;
                }
                Err(error) => {
                    read.new_errors.push(error.clone());
                    state.invalid = Some(error);
                }
            }
        }
        let merged = self.merge(&mut read.new_errors);
        if merged != self.merged {
            self.merged = merged.clone();
            read.changed = Some(merged);
        }
        read
    }

    /// The config's endpoints, then each file's good ones in name order; a file that would
    /// declare a key or an address twice is left out whole (with an error).
    fn merge(&mut self, new_errors: &mut Vec<String>) -> Vec<EndpointConfig> {
        let mut merged = self.declared.clone();
        for (path, state) in &mut self.files {
            let mut candidate = merged.clone();
            candidate.extend(state.good.iter().cloned());
            match validate_endpoints(&candidate) {
                Ok(()) => {
                    merged = candidate;
                    state.conflict = None;
                }
                Err(error) => {
                    let error = format!(
                        "{}: conflicts with the endpoints declared before it: {error}",
                        path.display()
                    );
                    if state.conflict.as_ref() != Some(&error) {
                        new_errors.push(error.clone());
                    }
                    state.conflict = Some(error);
                }
            }
        }
        merged
    }
}

/// The endpoint files of a folder, sorted by name; hidden files and others are skipped.
fn endpoint_paths(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_none_or(|name| name.starts_with('.'));
        let wanted = path
            .extension()
            .and_then(|extension| extension.to_str())
            .is_some_and(|extension| EXTENSIONS.contains(&extension));
        if !hidden && wanted && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(endpoints: &[EndpointConfig]) -> Vec<String> {
        endpoints.iter().map(EndpointConfig::key).collect()
    }

    fn declared() -> Vec<EndpointConfig> {
        endpoints_from_yaml(
            "- {name: server, namespace: infra, ips: [10.0.0.1]}",
            Path::new("config"),
        )
        .unwrap()
    }

    #[test]
    fn files_add_endpoints_and_take_them_away_when_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = EndpointFiles::new(dir.path(), &declared());
        assert!(files.read().changed.is_none());
        std::fs::write(
            dir.path().join("pod-a.yaml"),
            "- {name: a, namespace: youssef, labels: {app: test}, ips: [10.0.1.1]}",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not endpoints").unwrap();
        let read = files.read();
        assert_eq!(keys(&read.changed.unwrap()), ["infra/server", "youssef/a"]);
        assert!(read.new_errors.is_empty());
        // Nothing changed, nothing to do.
        assert!(files.read().changed.is_none());
        std::fs::remove_file(dir.path().join("pod-a.yaml")).unwrap();
        assert_eq!(keys(&files.read().changed.unwrap()), ["infra/server"]);
    }

    #[test]
    fn a_broken_file_keeps_what_it_held_and_others_still_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = EndpointFiles::new(dir.path(), &[]);
        let a = dir.path().join("a.yaml");
        std::fs::write(&a, "- {name: a, ips: [10.0.1.1]}").unwrap();
        files.read();
        std::fs::write(&a, "- {name: a, ips: [not-an-address]}").unwrap();
        std::fs::write(dir.path().join("b.yaml"), "- {name: b}").unwrap();
        let read = files.read();
        assert_eq!(keys(&read.changed.unwrap()), ["default/a", "default/b"]);
        assert_eq!(read.new_errors.len(), 1, "{:?}", read.new_errors);
        assert!(
            read.new_errors[0].contains("a.yaml"),
            "{:?}",
            read.new_errors
        );
        // Said once, not at every read.
        assert!(files.read().new_errors.is_empty());
        assert_eq!(files.errors().len(), 1);
        // Mended: the error goes.
        std::fs::write(&a, "- {name: a, ips: [10.0.1.2]}").unwrap();
        let read = files.read();
        assert_eq!(read.changed.unwrap()[0].ips[0].to_string(), "10.0.1.2");
        assert!(files.errors().is_empty());
    }

    #[test]
    fn a_file_that_takes_a_declared_key_or_address_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = EndpointFiles::new(dir.path(), &declared());
        std::fs::write(
            dir.path().join("a.yaml"),
            "- {name: thief, ips: [10.0.0.1]}\n- {name: fine, ips: [10.0.2.2]}",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            "- {name: server, namespace: infra}",
        )
        .unwrap();
        std::fs::write(dir.path().join("c.yaml"), "- {name: c}").unwrap();
        let read = files.read();
        assert_eq!(keys(&read.changed.unwrap()), ["infra/server", "default/c"]);
        assert_eq!(read.new_errors.len(), 2, "{:?}", read.new_errors);
        assert!(read.new_errors[0].contains("10.0.0.1 already belongs to endpoint infra/server"));
        assert!(read.new_errors[1].contains("declared twice"));
    }
}
