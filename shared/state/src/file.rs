use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::StateError;

/// `path` with `suffix` appended to its file name (`journal.pb` → `journal.pb.tmp`).
pub fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it over `path`: a
/// crash mid-write leaves the previous file, never half of one. The folder is synced too, so
/// that the rename itself survives a power loss (a peer may take a save as done).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let staging = beside(path, ".tmp");
    let written = create_private(&staging).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    // A failed save takes its staging copy with it: left behind on a full disk, a large
    // journal's, written again at every try, would keep the space every other save needs.
    let discard = |error| {
        let _ = std::fs::remove_file(&staging);
        error
    };
    written
        .map_err(|source| StateError::Write {
            path: staging.clone(),
            source,
        })
        .map_err(discard)?;
    std::fs::rename(&staging, path)
        .map_err(|source| StateError::Rename {
            from: staging.clone(),
            to: path.to_path_buf(),
            source,
        })
        .map_err(discard)?;
    match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => sync_folder(folder),
        _ => Ok(()),
    }
}

/// Creates (or empties) the file at `path`, readable and writable by its owner alone: state
/// names every workload's lookups, its policies and addresses, none of it for other users of
/// the node. A file left by an earlier release with wider permissions is narrowed too, where
/// the filesystem allows (some mounts refuse any chmod: said once, and the file written).
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0
        && let Err(error) = file.set_permissions(std::fs::Permissions::from_mode(0o600))
    {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(path = %path.display(), %error, "cannot make a state file private; other users of the node may read it");
        }
    }
    Ok(file)
}

/// Creates `folder` and its missing parents for the owner alone (what exists is left as the
/// operator made it).
pub fn create_private_dir(folder: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)
}

/// Makes the entries of `folder` (creations, renames) durable, where the filesystem can: some
/// (network, FUSE and shared-folder mounts) refuse to sync a folder, and a file they cannot
/// make durable is still better than none, or than a save that fails every time.
pub fn sync_folder(folder: &Path) -> Result<(), StateError> {
    let synced = std::fs::File::open(folder).and_then(|handle| handle.sync_all());
    match synced {
        Err(error) if refuses_folder_sync(&error) => {
            // Said once: every save meets it, and the operator can only move state_dir.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(folder = %folder.display(), %error, "the filesystem refuses to sync folders: a save may not survive a power loss");
            }
            Ok(())
        }
        synced => synced.map_err(|source| StateError::SyncFolder {
            folder: folder.to_path_buf(),
            source,
        }),
    }
}

fn refuses_folder_sync(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

/// Moves an unreadable `path` to `<path>.corrupt`, for a look: the next save would overwrite
/// it. Says how that went, for the log.
pub fn set_aside(path: &Path) -> String {
    let aside = beside(path, ".corrupt");
    match std::fs::rename(path, &aside) {
        Ok(()) => format!("set aside as {}", aside.display()),
        Err(error) => format!("could not be set aside: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// State was saved as 0644 (and its folder made 0755): every user of the node could read
    /// every workload's lookups and the policies.
    #[test]
    fn state_is_for_its_owner_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temporary folder");
        let folder = dir.path().join("state").join("inner");
        create_private_dir(&folder).expect("folder made");
        let mode = |path: &Path| {
            std::fs::metadata(path)
                .expect("metadata")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(&folder), 0o700);
        let path = folder.join("cache.json");
        // One an earlier release left readable by all is narrowed at the next save.
        std::fs::write(&path, b"old").expect("written");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomically(&path, b"new").expect("saved");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
    }

    #[test]
    fn a_save_replaces_the_file_whole_and_leaves_no_temporary_copy() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("journal.pb");
        write_atomically(&path, b"first").expect("first save");
        write_atomically(&path, b"second").expect("second save");
        assert_eq!(std::fs::read(&path).expect("saved file"), b"second");
        assert!(!beside(&path, ".tmp").exists());
    }

    #[test]
    fn a_failed_save_leaves_no_temporary_copy() {
        let dir = tempfile::tempdir().expect("temporary folder");
        // A non-empty folder where the file should be: the rename fails after the write.
        let path = dir.path().join("journal.pb");
        std::fs::create_dir(&path).expect("folder");
        std::fs::write(path.join("inside"), b"x").expect("write");
        let error = write_atomically(&path, b"x").expect_err("nothing to rename over");
        assert!(matches!(error, StateError::Rename { .. }), "{error:?}");
        assert!(!beside(&path, ".tmp").exists());
    }

    #[test]
    fn a_save_into_a_missing_folder_names_the_file() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("gone").join("journal.pb");
        let error = write_atomically(&path, b"x").expect_err("no folder to write in");
        assert!(matches!(error, StateError::Write { .. }), "{error:?}");
        assert!(error.to_string().contains("gone/journal.pb.tmp"), "{error}");
    }

    #[test]
    fn only_a_refusal_to_sync_a_folder_is_forgiven() {
        let refused = |code| std::io::Error::from_raw_os_error(code);
        assert!(refuses_folder_sync(&refused(libc::EINVAL)));
        assert!(refuses_folder_sync(&refused(libc::EOPNOTSUPP)));
        assert!(refuses_folder_sync(&refused(libc::ENOSYS)));
        assert!(!refuses_folder_sync(&refused(libc::EIO)));
        assert!(!refuses_folder_sync(&refused(libc::ENOSPC)));
    }

    #[test]
    fn a_missing_folder_does_not_sync() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let error = sync_folder(&dir.path().join("gone")).expect_err("nothing to sync");
        assert!(error.to_string().contains("cannot sync folder"), "{error}");
    }

    #[test]
    fn an_unreadable_file_is_moved_aside() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("policy.pb");
        std::fs::write(&path, b"garbage").expect("write");
        let said = set_aside(&path);
        assert!(said.starts_with("set aside as"), "{said}");
        assert!(!path.exists());
        assert_eq!(
            std::fs::read(beside(&path, ".corrupt")).expect("aside"),
            b"garbage"
        );
    }
}
