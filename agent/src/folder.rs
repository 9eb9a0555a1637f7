//! Watched folders of YAML files, as `policy.dir` and `endpoints_dir` are: whether a file may
//! still be being written. Which files count is `warden_policy::folder_files`, as for
//! `warden policy validate`.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The most a file of a watched folder may hold: files are read whole at every change, and
/// the YAML reader refuses far less (a million nodes, 16 MiB of scalars) anyway; a file of
/// gigabytes dropped in the folder would otherwise be read into memory at every pass.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// The text of `path`, refused unread past [`MAX_FILE_BYTES`] (also one that grows past it
/// while being read).
pub fn read_text(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let too_long = |bytes: u64| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{bytes} bytes, more than the {} MiB a file here may hold",
                MAX_FILE_BYTES >> 20
            ),
        )
    };
    let length = file.metadata()?.len();
    if length > MAX_FILE_BYTES {
        return Err(too_long(length));
    }
    let mut text = String::with_capacity(usize::try_from(length).unwrap_or(0));
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(too_long(text.len() as u64));
    }
    Ok(text)
}

/// A file modified more recently than this may be half-written: it is read at a later pass.
pub const SETTLE: Duration = Duration::from_millis(100);

/// How long an empty file must stay unchanged before it is read: a shell's `>` empties the
/// file before its writer has written anything (`kubectl get cnp -o yaml > policies/web.yaml`
/// takes a second), and read then, it stood for no policy at all, enforced and kept as the
/// last good one until the writer was done.
pub const EMPTY_SETTLE: Duration = Duration::from_secs(1);

/// How long until every one of `paths` was last modified `settle` ago ([`EMPTY_SETTLE`] for
/// an empty file, if longer), if one was modified more recently. A time in the future (a clock
/// step, copied timestamps) counts as settled: waiting for it could take for ever.
pub fn unsettled(paths: &[PathBuf], settle: Duration) -> Option<Duration> {
    let now = std::time::SystemTime::now();
    paths
        .iter()
        .filter_map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            let settle = if metadata.len() == 0 {
                settle.max(EMPTY_SETTLE)
            } else {
                settle
            };
            Some((now.duration_since(metadata.modified().ok()?).ok()?, settle))
        })
        .filter(|(age, settle)| age < settle)
        .map(|(age, settle)| settle - age)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file a shell's `>` had just emptied was read as no policy at all, enforced and kept as
    /// the last good one, while its writer was still at work.
    #[test]
    fn an_empty_file_settles_longer() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, written) = (dir.path().join("empty.yaml"), dir.path().join("full.yaml"));
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&written, "kind: CiliumNetworkPolicy\n").unwrap();
        let set_at = std::time::Instant::now();
        let half_a_second_ago = std::time::SystemTime::now() - Duration::from_millis(500);
        for path in [&empty, &written] {
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(half_a_second_ago)
                .unwrap();
        }
        assert_eq!(unsettled(std::slice::from_ref(&written), SETTLE), None);
        let left = unsettled(std::slice::from_ref(&empty), SETTLE).expect("an empty file waits");
        // Half a second less the time this thread took since the file's time was set (a loaded
        // machine may hold it a while), and a few milliseconds for the two clocks read.
        let since_set = set_at.elapsed();
        assert!(
            left <= Duration::from_millis(500)
                && left + since_set + Duration::from_millis(5) >= Duration::from_millis(500),
            "{left:?} left, {since_set:?} since the time was set"
        );
    }

    /// A file of gigabytes in the policy folder was read whole at every pass.
    #[test]
    fn a_file_past_the_limit_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.yaml");
        let file = std::fs::File::create(&path).unwrap();
        // Sparse: no disk, and nothing to read if the size were not checked first.
        file.set_len(3 << 30).unwrap();
        let error = read_text(&path).unwrap_err();
        assert!(error.to_string().contains("3221225472 bytes"), "{error}");
        std::fs::write(&path, "kind: CiliumNetworkPolicy\n").unwrap();
        assert_eq!(read_text(&path).unwrap(), "kind: CiliumNetworkPolicy\n");
    }
}
