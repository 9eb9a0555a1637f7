//! Watched folders of YAML files, as `policy.dir` and `endpoints_dir` are: whether a file may
//! still be being written. Which files count is `warden_policy::folder_files`, as for
//! `warden policy validate`.

use std::path::PathBuf;
use std::time::Duration;

/// A file modified more recently than this may be half-written: it is read at a later pass.
pub const SETTLE: Duration = Duration::from_millis(100);

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
