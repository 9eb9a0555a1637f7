//! Watched folders of YAML files, as `policy.dir` and `endpoints_dir` are: which files count,
//! and whether one may still be being written.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// File names read: `*.yaml`, `*.yml`, `*.json`.
const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// A file modified more recently than this may be half-written: it is read at a later pass.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The files of `dir` with one of [`EXTENSIONS`], sorted by name, and, apart, such names that
/// are something else (a folder put in a file's place); hidden names are skipped, links
/// followed, and a dangling link is left out (a removal under way: a ConfigMap key deleted,
/// the kubelet swaps the data, then removes the link).
pub fn listing(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut files, mut not_files) = (Vec::new(), Vec::new());
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
        if hidden || !wanted {
            continue;
        }
        if path.is_file() {
            files.push(path);
        } else if path.exists() {
            not_files.push(path);
        }
    }
    files.sort();
    not_files.sort();
    Ok((files, not_files))
}

/// How long until every one of `paths` was last modified `settle` ago, if one was modified
/// more recently. A time in the future (a clock step, copied timestamps) counts as settled:
/// waiting for it could take for ever.
pub fn unsettled(paths: &[PathBuf], settle: Duration) -> Option<Duration> {
    let now = std::time::SystemTime::now();
    paths
        .iter()
        .filter_map(|path| std::fs::metadata(path).ok()?.modified().ok())
        .filter_map(|modified| now.duration_since(modified).ok())
        .filter(|age| *age < settle)
        .map(|age| settle - age)
        .max()
}
