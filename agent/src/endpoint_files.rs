//! `endpoints_dir`: the node's workloads as files, one or more per file, so that they come and
//! go without a restart (a CNI plugin or a pod watcher writes a file per pod and removes it).
//!
//! Each file is read on its own, once it has settled (not modified for [`SETTLE`]): one that
//! does not parse or validate is refused with an error naming it, and what it last held that
//! was in force stays. Files in force keep what they declare: a changed file whose new
//! endpoints would take a key or an address declared elsewhere (the config, or a file in force)
//! keeps its old ones, and a new file that would is left out. What each file holds in force is
//! saved in `state_dir`, so that an agent restarted while the folder cannot be read, or while
//! a file is broken, starts with those endpoints rather than without them: a workload missing
//! from the table is unenrolled, and its traffic passes unpoliced.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use warden_config::{ConfigError, EndpointConfig, endpoints_from_yaml, validate_endpoints};
use warden_policy::folder_files;

use crate::folder::{SETTLE, unsettled};

/// The file in `state_dir` that keeps what each endpoint file holds in force.
const SAVED_FILE: &str = "endpoint-files.json";

/// The folder and what each of its files holds.
#[derive(Debug)]
pub struct EndpointFiles {
    dir: PathBuf,
    saved: PathBuf,
    /// The config's own endpoints, which come first.
    declared: Vec<EndpointConfig>,
    files: BTreeMap<PathBuf, FileState>,
    /// Why the folder itself could not be read, while it cannot.
    folder_error: Option<String>,
    /// What the last read put together.
    merged: Vec<EndpointConfig>,
    /// What was last written to `saved` (`None`: nothing yet in this run).
    last_saved: Option<Vec<u8>>,
    /// What last failed to be written: retried at every read, said once.
    last_failed: Option<Vec<u8>>,
    /// [`SETTLE`], longer in tests that must not race it.
    settle: Duration,
}

#[derive(Debug, Default)]
struct FileState {
    /// Of the text last read, good or bad: an unchanged file is not parsed again.
    fingerprint: Option<u64>,
    /// The endpoints of its last good text.
    good: Vec<EndpointConfig>,
    /// What it holds in force (its `good` of an earlier read when the newer clashes).
    in_force: Vec<EndpointConfig>,
    /// Why its current text is not in force: it does not read, parse or validate.
    invalid: Option<String>,
    /// Why its good endpoints are not in force: they clash with others.
    conflict: Option<String>,
}

/// What a read found.
#[derive(Debug, Default)]
pub struct EndpointRead {
    /// The endpoints now, when they changed.
    pub changed: Option<Vec<EndpointConfig>>,
    /// Errors first seen in this read.
    pub new_errors: Vec<String>,
}

impl EndpointFiles {
    /// The folder `dir`, starting from what `state_dir` says its files held in force.
    pub fn new(dir: &Path, state_dir: &Path, declared: &[EndpointConfig]) -> EndpointFiles {
        let saved = state_dir.join(SAVED_FILE);
        let mut files = EndpointFiles {
            dir: dir.to_path_buf(),
            saved,
            declared: declared.to_vec(),
            files: BTreeMap::new(),
            folder_error: None,
            merged: Vec::new(),
            last_saved: None,
            last_failed: None,
            settle: SETTLE,
        };
        for (path, endpoints) in files.load_saved() {
            files.files.insert(
                path,
                FileState {
                    good: endpoints.clone(),
                    in_force: endpoints,
                    ..FileState::default()
                },
            );
        }
        let mut ignored = Vec::new();
        files.merged = files.merge(&mut ignored);
        // Said at the first read, which meets them again.
        for state in files.files.values_mut() {
            state.conflict = None;
        }
        files
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The endpoints in force: the config's, then the files'.
    pub fn merged(&self) -> &[EndpointConfig] {
        &self.merged
    }

    /// The folder's and the files' errors while they last.
    #[cfg(test)]
    fn errors(&self) -> Vec<String> {
        self.folder_error
            .iter()
            .cloned()
            .chain(
                self.files
                    .values()
                    .flat_map(|state| state.invalid.iter().chain(&state.conflict).cloned()),
            )
            .collect()
    }

    /// How long until every file was last modified [`SETTLE`] ago, if one was more recently.
    pub fn unsettled(&self) -> Option<Duration> {
        let (paths, _) = folder_files(&self.dir).ok()?;
        unsettled(&paths, self.settle)
    }

    /// Reads the folder. A folder that cannot be read, or a file still being written, changes
    /// nothing; a file gone takes its endpoints with it.
    pub fn read(&mut self) -> EndpointRead {
        let mut read = EndpointRead::default();
        let (paths, not_files) = match folder_files(&self.dir) {
            Ok(listed) => listed,
            Err(error) => {
                let error = format!("cannot read endpoints_dir {}: {error}", self.dir.display());
                if self.folder_error.as_ref() != Some(&error) {
                    read.new_errors.push(error.clone());
                }
                self.folder_error = Some(error);
                return read;
            }
        };
        self.folder_error = None;
        // A name on something else than a file (a folder) is an error, not a removal: its
        // endpoints stay.
        self.files
            .retain(|path, _| paths.contains(path) || not_files.contains(path));
        for path in &not_files {
            let state = self.files.entry(path.clone()).or_default();
            let error = format!("{}: not a regular file", path.display());
            if state.invalid.as_ref() != Some(&error) {
                read.new_errors.push(error.clone());
            }
            state.invalid = Some(error);
            state.fingerprint = None;
        }
        for path in &paths {
            // Still being written (it could read as fewer endpoints): it keeps what it holds
            // until a later read.
            if unsettled(std::slice::from_ref(path), self.settle).is_some() {
                continue;
            }
            let text = match crate::folder::read_text(path) {
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
            match text.and_then(|text| parse_file(&text, path)) {
                Ok(endpoints) => {
                    state.good = endpoints;
                    state.invalid = None;
                }
                Err(error) => {
                    read.new_errors.push(error.clone());
                    state.invalid = Some(error);
                    // What it holds in force stays, not a later text that clashed: the file
                    // holds neither now.
                    state.good.clone_from(&state.in_force);
                }
            }
        }
        let merged = self.merge(&mut read.new_errors);
        self.save();
        if merged != self.merged {
            self.merged = merged.clone();
            read.changed = Some(merged);
        }
        read
    }

    /// The config's endpoints, then each file's in force, in name order. What the files hold
    /// in force was merged together before, so it stands first; then each changed or new
    /// file's endpoints take the place of what it held if they clash with nothing else, else
    /// it keeps what it held.
    fn merge(&mut self, new_errors: &mut Vec<String>) -> Vec<EndpointConfig> {
        let mut conflict = |state: &mut FileState, error: Option<String>| {
            if let Some(error) = &error
                && state.conflict.as_ref() != Some(error)
            {
                new_errors.push(error.clone());
            }
            state.conflict = error;
        };
        // Held in force: a clash is possible only with the config's own, after a restart on a
        // changed config, and the config wins.
        let mut incumbents = Merged::new(&self.declared);
        for (path, state) in &mut self.files {
            match incumbents.clash(&state.in_force) {
                None => incumbents.add_unchecked(&state.in_force),
                Some(clash) => {
                    state.in_force.clear();
                    conflict(state, Some(format!("{}: {clash}", path.display())));
                }
            }
        }
        // Until nothing more can be granted: a file that gives up an endpoint or an address
        // may be checked after one that takes it over, in the same read.
        loop {
            let mut granted = false;
            let moving = self.moving();
            for path in moving {
                let others = self.in_force_but(&path);
                if let Some(state) = self.files.get_mut(&path)
                    && others.clash(&state.good).is_none()
                {
                    state.in_force.clone_from(&state.good);
                    conflict(state, None);
                    granted = true;
                }
            }
            if !granted {
                break;
            }
        }
        // What still clashes keeps what it holds, and says why.
        let moving = self.moving();
        for path in moving {
            let others = self.in_force_but(&path);
            if let Some(state) = self.files.get_mut(&path)
                && let Some(clash) = others.clash(&state.good)
            {
                conflict(state, Some(format!("{}: {clash}", path.display())));
            }
        }
        for state in self.files.values_mut() {
            if state.good == state.in_force {
                state.conflict = None;
            }
        }
        self.declared
            .iter()
            .chain(self.files.values().flat_map(|state| &state.in_force))
            .cloned()
            .collect()
    }

    /// The files whose good endpoints are not (all) in force.
    fn moving(&self) -> Vec<PathBuf> {
        self.files
            .iter()
            .filter(|(_, state)| state.good != state.in_force)
            .map(|(path, _)| path.clone())
            .collect()
    }

    /// The config's endpoints and every file's in force but `path`'s.
    fn in_force_but(&self, path: &Path) -> Merged {
        let mut others = Merged::new(&self.declared);
        for (other, state) in &self.files {
            if other != path {
                others.add_unchecked(&state.in_force);
            }
        }
        others
    }

    fn load_saved(&self) -> Vec<(PathBuf, Vec<EndpointConfig>)> {
        let text = match std::fs::read_to_string(&self.saved) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(error) => {
                tracing::warn!(%error, file = %self.saved.display(), "cannot read the endpoint files' saved state");
                return Vec::new();
            }
        };
        match serde_json::from_str::<Vec<(PathBuf, Vec<EndpointConfig>)>>(&text) {
            // Only this folder's files: the folder may have moved since.
            Ok(saved) => saved
                .into_iter()
                .filter(|(path, endpoints)| {
                    path.parent() == Some(&self.dir) && !endpoints.is_empty()
                })
                .collect(),
            Err(error) => {
                let set_aside = warden_state::set_aside(&self.saved);
                tracing::warn!(%error, set_aside, "the endpoint files' saved state does not decode");
                Vec::new()
            }
        }
    }

    /// Writes what each file holds in force, when that changed since the last write; a failure
    /// is said once per text, and the write tried again at the next read.
    fn save(&mut self) {
        let saved: Vec<(&PathBuf, &Vec<EndpointConfig>)> = self
            .files
            .iter()
            .filter(|(_, state)| !state.in_force.is_empty())
            .map(|(path, state)| (path, &state.in_force))
            .collect();
        let text = serde_json::to_vec(&saved).unwrap_or_default();
        if self.last_saved.as_ref() == Some(&text) {
            return;
        }
        match warden_state::write_atomically(&self.saved, &text) {
            Ok(()) => {
                self.last_saved = Some(text);
                self.last_failed = None;
            }
            Err(error) => {
                if self.last_failed.as_ref() != Some(&text) {
                    tracing::warn!(%error, "cannot save the endpoint files' state in state_dir");
                }
                self.last_failed = Some(text);
            }
        }
    }
}

/// A file's endpoints, or why not, naming the file once.
fn parse_file(text: &str, path: &Path) -> Result<Vec<EndpointConfig>, String> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let named = |error: String| format!("{}: {error}", path.display());
    warden_policy::check_yaml_text(text).map_err(named)?;
    let endpoints = endpoints_from_yaml(text, path).map_err(|error| match error {
        ConfigError::Parse { message, .. } => named(message),
        other => named(other.to_string()),
    })?;
    validate_endpoints(&endpoints).map_err(|error| match error {
        ConfigError::Invalid { field, message } => named(format!("{field}: {message}")),
        other => named(other.to_string()),
    })?;
    Ok(endpoints)
}

/// Endpoints put together, with their keys and addresses for the clash checks.
struct Merged {
    endpoints: Vec<EndpointConfig>,
    keys: HashSet<String>,
    owners: HashMap<IpAddr, String>,
}

impl Merged {
    fn new(declared: &[EndpointConfig]) -> Merged {
        let mut merged = Merged {
            endpoints: Vec::new(),
            keys: HashSet::new(),
            owners: HashMap::new(),
        };
        merged.add_unchecked(declared);
        merged
    }

    fn add_unchecked(&mut self, endpoints: &[EndpointConfig]) {
        for endpoint in endpoints {
            self.keys.insert(endpoint.key());
            for ip in &endpoint.ips {
                self.owners.insert(ip.to_canonical(), endpoint.key());
            }
            self.endpoints.push(endpoint.clone());
        }
    }

    /// Why `endpoints` (valid among themselves) cannot join, if they cannot.
    fn clash(&self, endpoints: &[EndpointConfig]) -> Option<String> {
        for (index, endpoint) in endpoints.iter().enumerate() {
            let key = endpoint.key();
            if self.keys.contains(&key) {
                return Some(format!(
                    "endpoints[{index}]: endpoint {key} is already declared elsewhere"
                ));
            }
            for ip in &endpoint.ips {
                if let Some(owner) = self.owners.get(&ip.to_canonical()) {
                    return Some(format!(
                        "endpoints[{index}].ips: {ip} already belongs to endpoint {owner}"
                    ));
                }
            }
        }
        None
    }
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

    /// Writes a file as settled (modified a minute ago).
    fn write(dir: &Path, name: &str, text: &str) {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        backdate(&path);
    }

    fn backdate(path: &Path) {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(std::time::SystemTime::now() - Duration::from_secs(60))
            .unwrap();
    }

    /// A settle window no scheduling delay of a busy machine can outlast.
    const LONG_SETTLE: Duration = Duration::from_secs(30);

    struct Folder {
        endpoints: tempfile::TempDir,
        state: tempfile::TempDir,
    }

    impl Folder {
        fn new() -> Folder {
            Folder {
                endpoints: tempfile::tempdir().unwrap(),
                state: tempfile::tempdir().unwrap(),
            }
        }

        fn path(&self) -> &Path {
            self.endpoints.path()
        }

        fn files(&self, declared: &[EndpointConfig]) -> EndpointFiles {
            EndpointFiles::new(self.path(), self.state.path(), declared)
        }
    }

    #[test]
    fn files_add_endpoints_and_take_them_away_when_removed() {
        let folder = Folder::new();
        let mut files = folder.files(&declared());
        assert!(files.read().changed.is_none());
        write(
            folder.path(),
            "pod-a.yaml",
            "- {name: a, namespace: youssef, labels: {app: test}, ips: [10.0.1.1]}",
        );
        write(folder.path(), "notes.txt", "not endpoints");
        let read = files.read();
        assert_eq!(keys(&read.changed.unwrap()), ["infra/server", "youssef/a"]);
        assert!(read.new_errors.is_empty());
        // Nothing changed, nothing to do.
        assert!(files.read().changed.is_none());
        std::fs::remove_file(folder.path().join("pod-a.yaml")).unwrap();
        assert_eq!(keys(&files.read().changed.unwrap()), ["infra/server"]);
    }

    #[test]
    fn a_file_still_being_written_is_read_later() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        files.settle = LONG_SETTLE;
        let a = folder.path().join("a.yaml");
        std::fs::write(&a, "- {name: a}").unwrap();
        assert!(files.read().changed.is_none(), "read while fresh");
        backdate(&a);
        assert_eq!(keys(&files.read().changed.unwrap()), ["default/a"]);
    }

    #[test]
    fn a_broken_file_keeps_what_it_held_and_others_still_change() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        write(folder.path(), "a.yaml", "- {name: a, ips: [10.0.1.1]}");
        files.read();
        write(
            folder.path(),
            "a.yaml",
            "- {name: a, ips: [not-an-address]}",
        );
        write(folder.path(), "b.yaml", "- {name: b}");
        let read = files.read();
        assert_eq!(keys(&read.changed.unwrap()), ["default/a", "default/b"]);
        assert_eq!(read.new_errors.len(), 1, "{:?}", read.new_errors);
        let error = &read.new_errors[0];
        assert!(
            error.contains("a.yaml") && !error.contains("config file"),
            "{error}"
        );
        // Said once, not at every read.
        assert!(files.read().new_errors.is_empty());
        assert_eq!(files.errors().len(), 1);
        // Mended: the error goes.
        write(folder.path(), "a.yaml", "- {name: a, ips: [10.0.1.2]}");
        let read = files.read();
        assert_eq!(read.changed.unwrap()[0].ips[0].to_string(), "10.0.1.2");
        assert!(files.errors().is_empty());
    }

    #[test]
    fn files_in_force_keep_their_endpoints_against_clashing_newcomers_and_edits() {
        let folder = Folder::new();
        let mut files = folder.files(&declared());
        write(folder.path(), "b.yaml", "- {name: b, ips: [10.0.2.2]}");
        files.read();
        // A newcomer sorted before b that takes b's address is left out, not b.
        write(folder.path(), "a.yaml", "- {name: thief, ips: [10.0.2.2]}");
        // A newcomer taking the config's key is left out too.
        write(
            folder.path(),
            "c.yaml",
            "- {name: server, namespace: infra}",
        );
        let read = files.read();
        assert!(read.changed.is_none(), "{:?}", read.changed);
        assert_eq!(read.new_errors.len(), 2, "{:?}", read.new_errors);
        assert!(read.new_errors[0].contains("10.0.2.2 already belongs to endpoint default/b"));
        assert!(read.new_errors[1].contains("already declared"));
        // b edited to take the config's address keeps its old endpoints.
        write(folder.path(), "b.yaml", "- {name: b, ips: [10.0.0.1]}");
        files.read();
        assert_eq!(keys(files.merged()), ["infra/server", "default/b"]);
        assert_eq!(files.merged()[1].ips[0].to_string(), "10.0.2.2");
    }

    #[test]
    fn an_endpoint_moving_to_an_earlier_file_in_one_read_stays_in_force() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        write(
            folder.path(),
            "1.yaml",
            "- {name: x, ips: [10.0.3.3]}\n- {name: y}",
        );
        files.read();
        write(folder.path(), "1.yaml", "- {name: y}");
        write(folder.path(), "0.yaml", "- {name: x, ips: [10.0.3.3]}");
        let read = files.read();
        assert!(read.new_errors.is_empty(), "{:?}", read.new_errors);
        // The same endpoints, now from two files: no change to publish.
        assert!(read.changed.is_none(), "{:?}", read.changed);
        assert_eq!(keys(files.merged()), ["default/x", "default/y"]);
    }

    #[test]
    fn a_file_being_written_holds_back_no_other() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        files.settle = LONG_SETTLE;
        write(folder.path(), "a.yaml", "- {name: a}");
        std::fs::write(folder.path().join("busy.yaml"), "- {name: busy}").unwrap();
        assert_eq!(keys(&files.read().changed.unwrap()), ["default/a"]);
    }

    #[test]
    fn a_restart_on_a_config_that_took_a_files_address_says_so() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        write(folder.path(), "a.yaml", "- {name: a, ips: [10.0.0.1]}");
        files.read();
        // The config now declares that address: the config wins, and the first read says so.
        let mut restarted = folder.files(&declared());
        assert_eq!(keys(restarted.merged()), ["infra/server"]);
        let read = restarted.read();
        assert_eq!(read.new_errors.len(), 1, "{:?}", read.new_errors);
        assert!(
            read.new_errors[0].contains("a.yaml"),
            "{:?}",
            read.new_errors
        );
    }

    #[test]
    fn a_restart_starts_from_what_the_files_held_in_force() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        write(folder.path(), "a.yaml", "- {name: a, ips: [10.0.1.1]}");
        files.read();
        // Broken, then the agent restarts: a still holds its endpoint.
        write(folder.path(), "a.yaml", "- {name: a, ips: [broken]}");
        let mut restarted = folder.files(&[]);
        assert_eq!(keys(restarted.merged()), ["default/a"]);
        assert!(restarted.read().changed.is_none());
        // And while the folder cannot be read at all (moved away, and back even on failure).
        struct MovedBack(PathBuf, PathBuf);
        impl Drop for MovedBack {
            fn drop(&mut self) {
                let _ = std::fs::rename(&self.1, &self.0);
            }
        }
        let moved = folder.path().with_extension("away");
        std::fs::rename(folder.path(), &moved).unwrap();
        let _back = MovedBack(folder.path().to_owned(), moved.clone());
        let mut unreadable = folder.files(&[]);
        assert_eq!(keys(unreadable.merged()), ["default/a"]);
        let read = unreadable.read();
        assert!(read.changed.is_none());
        assert_eq!(read.new_errors.len(), 1);
        assert!(unreadable.read().new_errors.is_empty(), "said once");
    }

    #[test]
    fn a_folder_in_place_of_a_file_keeps_its_endpoints() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        write(folder.path(), "a.yaml", "- {name: a}");
        files.read();
        std::fs::remove_file(folder.path().join("a.yaml")).unwrap();
        std::fs::create_dir(folder.path().join("a.yaml")).unwrap();
        let read = files.read();
        assert!(read.changed.is_none());
        assert!(
            read.new_errors[0].contains("not a regular file"),
            "{:?}",
            read.new_errors
        );
    }

    #[test]
    fn aliases_are_refused() {
        let folder = Folder::new();
        let mut files = folder.files(&[]);
        write(folder.path(), "a.yaml", "- &a {name: a}\n- *a\n");
        let read = files.read();
        assert!(read.changed.is_none());
        assert!(
            read.new_errors[0].contains("a.yaml"),
            "{:?}",
            read.new_errors
        );
    }
}
