//! The agent's side: the Unix socket and the connections on it.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{ApiError, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};

/// Called with a short reason (`credentials`, `protocol`, `connections`) for each refused
/// connection.
pub type RejectHook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Connections served at once: a node's warden-dnsproxy holds one. Past it a new one is closed
/// at once: connections from allowed peers that never speak (a stuck client, a script left
/// running) would otherwise hold descriptors the agent's DNS proxy needs.
const MAX_CONNECTIONS: usize = 64;

/// A connection that has not sent its HTTP/2 preface (which comes with the connect) within this
/// long is closed: past it, HTTP/2's keepalive pings find a peer gone silent.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(10);

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, what an HTTP/2 client sends first.
const HTTP2_PREFACE_BYTES: usize = 24;

/// The agent's socket, bound: the listener, and the file it was bound at as it was right
/// after the bind, so that an agent exiting removes only its own socket file.
#[derive(Debug)]
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

/// Binds the socket at `path`: stale socket files from a previous run are replaced, the
/// folder is created, and the socket gets mode 0600, or 0660 owned by `group` when one is given
/// (so a non-root dnsproxy in that group may connect). The socket is bound in a private folder
/// and moved into place once its mode and group are set: between the bind and the chmod it
/// would take connections from whoever the umask lets in, and with a group the file's
/// permissions are the only check.
pub fn bind(path: &Path, group: Option<&str>) -> Result<BoundSocket, ApiError> {
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|source| ApiError::Folder {
        path: folder.to_path_buf(),
        source,
    })?;
    // Only a socket is replaced: a regular file at that path is somebody's data.
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !metadata.file_type().is_socket() {
            return Err(ApiError::Bind {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "something other than a socket is there",
                ),
            });
        }
    }
    let name = path
        .file_name()
        .unwrap_or(std::ffi::OsStr::new("agent.sock"));
    // Short (a socket's path is limited to 107 bytes), and one per bind: in-process tests
    // bind several agents in one process.
    static BINDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let bind_number = BINDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = folder.join(format!(".staging-{}-{bind_number}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|source| ApiError::Folder {
            path: staging.clone(),
            source,
        })?;
    let staged = staging.join(name);
    // Read before the rename, which keeps it: read after, it could be the file of an agent
    // that bound over this one meanwhile.
    let mut identity = None;
    let bound = bind_private(&staged, group).and_then(|listener| {
        identity = file_identity(&staged);
        std::fs::rename(&staged, path).map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&staging);
    // Taken at the bind: an agent started later binds over the file, and one taken at
    // `serve` (after the agent's first datapath pass) could be that agent's.
    bound.map(|listener| BoundSocket {
        listener,
        path: path.to_path_buf(),
        identity,
    })
}

/// Binds at `path`, in a folder only this process can enter, and sets the socket's mode and
/// group.
fn bind_private(path: &Path, group: Option<&str>) -> Result<UnixListener, ApiError> {
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let permissions = |source| ApiError::Permissions {
        path: path.to_path_buf(),
        source,
    };
    match group {
        None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(permissions)?,
        Some(name) => {
            let group = nix::unistd::Group::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| ApiError::UnknownGroup {
                    group: name.to_owned(),
                })?;
            nix::unistd::chown(path, None, Some(group.gid))
                .map_err(|errno| permissions(errno.into()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .map_err(permissions)?;
        }
    }
    Ok(listener)
}

/// Which peers may talk to the agent: root, the agent's own user, and the listed uids; or,
/// for a socket opened to a group ([`bind`] with a group), whoever the socket file's mode
/// lets connect.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    /// `None`: the file's permissions decide.
    allowed_uids: Option<Vec<u32>>,
}

impl PeerPolicy {
    pub fn new(extra_uids: &[u32]) -> PeerPolicy {
        let mut allowed_uids = vec![0, nix::unistd::geteuid().as_raw()];
        allowed_uids.extend_from_slice(extra_uids);
        PeerPolicy {
            allowed_uids: Some(allowed_uids),
        }
    }

    /// Every peer that could open the socket: connecting needs write access to the file, so
    /// its mode (0660) and group say who may. A uid check as well would refuse the non-root
    /// dnsproxy the group is there for.
    pub fn by_file_access() -> PeerPolicy {
        PeerPolicy { allowed_uids: None }
    }

    pub fn allows(&self, uid: u32) -> bool {
        self.allowed_uids
            .as_ref()
            .is_none_or(|allowed| allowed.contains(&uid))
    }
}

/// Accepts connections until `shutdown`, serving each with `routes` over HTTP/2. A peer whose
/// credentials are not allowed is closed before anything is read, as is one past
/// [`MAX_CONNECTIONS`]; a connection that breaks the protocol, or sends nothing for
/// [`PREFACE_TIMEOUT`], ends alone. Each is reported through `on_reject`.
pub async fn serve(
    bound: BoundSocket,
    routes: Routes,
    peers: PeerPolicy,
    on_reject: RejectHook,
    shutdown: CancellationToken,
) {
    let routes = routes.prepare();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let BoundSocket {
        listener,
        path,
        identity: ours,
    } = bound;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "agent socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(credentials) if peers.allows(credentials.uid()) => {}
            Ok(credentials) => {
                tracing::warn!(
                    uid = credentials.uid(),
                    pid = credentials.pid(),
                    "refused a peer on the agent socket: uid not allowed"
                );
                on_reject("credentials");
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "refused a peer on the agent socket: no credentials");
                on_reject("credentials");
                continue;
            }
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            static BUDGET: warden_telemetry::LogBudget =
                warden_telemetry::LogBudget::new(warden_telemetry::LogBudget::INTERVAL);
            if let Some(held_back) = BUDGET.allow() {
                tracing::warn!(
                    held_back,
                    "refused a peer on the agent socket: {MAX_CONNECTIONS} connections open"
                );
            }
            on_reject("connections");
            continue;
        };
        let service = TowerToHyperService::new(routes.clone());
        let on_reject = on_reject.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            // Read here, under a deadline: hyper's handshake has none, and a peer that sent
            // part of it and stopped would hold its place for good. Handed on to hyper, which
            // checks it, ahead of the rest of the stream.
            let mut preface = [0u8; HTTP2_PREFACE_BYTES];
            let (mut reader, writer) = stream.into_split();
            let read = tokio::select! {
                read = tokio::time::timeout(PREFACE_TIMEOUT, reader.read_exact(&mut preface)) => read,
                _ = shutdown.cancelled() => return,
            };
            if !matches!(read, Ok(Ok(_))) {
                tracing::warn!("a peer on the agent socket sent no HTTP/2 preface in time; closed");
                on_reject("protocol");
                return;
            }
            let stream = tokio::io::join(std::io::Cursor::new(preface).chain(reader), writer);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                // Keepalive pings need a timer; without one hyper panics on the first ping.
                .timer(TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT);
            let builder = builder.http2_only();
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        tracing::warn!(%error, "agent socket connection ended with an error");
                        on_reject("protocol");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
    // Only our own socket file: an agent started meanwhile (a supervisor that starts the new
    // process before the old one exits) bound its socket over ours, and removing it would
    // leave every dnsproxy unable to reach the agent until that one restarts.
    if ours.is_some() && file_identity(&path) == ours {
        let _ = std::fs::remove_file(&path);
    }
}

/// The device and inode of the file at `path`, if there is one.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|metadata| (metadata.dev(), metadata.ino()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;

    #[tokio::test]
    async fn the_socket_appears_with_its_mode_and_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("agent.sock");
        let first = bind(&path, None).unwrap();
        let metadata = std::fs::symlink_metadata(&path).unwrap();
        assert!(metadata.file_type().is_socket());
        assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
        drop(first);
        // A stale socket is replaced, and no staging folder is left behind.
        let _second = bind(&path, None).unwrap();
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(entries, ["agent.sock"]);
        // Somebody's file is not.
        let file = dir.path().join("data");
        std::fs::write(&file, "keep me").unwrap();
        assert!(matches!(bind(&file, None), Err(ApiError::Bind { .. })));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    }

    /// Serves an empty router at a fresh socket, recording what `on_reject` is told.
    fn serve_recording(
        path: &Path,
    ) -> (
        CancellationToken,
        tokio::task::JoinHandle<()>,
        Arc<std::sync::Mutex<Vec<&'static str>>>,
    ) {
        let rejected = Arc::new(std::sync::Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let served = tokio::spawn(serve(
            bind(path, None).unwrap(),
            Routes::default(),
            PeerPolicy::new(&[]),
            Arc::new({
                let rejected = rejected.clone();
                move |reason| rejected.lock().unwrap().push(reason)
            }),
            shutdown.clone(),
        ));
        (shutdown, served, rejected)
    }

    /// Whether the agent closes `stream` within `within` (reads EOF or a reset).
    async fn closed_within(stream: &mut tokio::net::UnixStream, within: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(within, stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    /// Peers that connect and say nothing held a connection each for good: past
    /// MAX_CONNECTIONS a new one is closed at once, and a place freed is taken again.
    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let (shutdown, served, rejected) = serve_recording(&path);
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::UnixStream::connect(&path).await.unwrap());
        }
        let mut over = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert!(closed_within(&mut over, Duration::from_secs(5)).await);
        assert_eq!(*rejected.lock().unwrap(), ["connections"]);
        drop(silent.pop());
        // The freed place is released by its task: give it a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut next = tokio::net::UnixStream::connect(&path).await.unwrap();
        assert!(!closed_within(&mut next, Duration::from_millis(300)).await);
        let refused = |reason| {
            let rejected = rejected.lock().unwrap();
            rejected.iter().filter(|r| **r == reason).count()
        };
        assert_eq!(refused("connections"), 1);
        shutdown.cancel();
        served.await.unwrap();
    }

    /// A peer that connects and sends nothing, or part of the HTTP/2 preface, is closed after
    /// PREFACE_TIMEOUT (hyper's handshake waits for the rest for good).
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_sends_no_preface_is_closed() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let (shutdown, served, rejected) = serve_recording(&path);
        let mut silent = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut partial = tokio::net::UnixStream::connect(&path).await.unwrap();
        partial.write_all(b"PRI * HTTP/2.0").await.unwrap();
        assert!(closed_within(&mut silent, PREFACE_TIMEOUT * 2).await);
        assert!(closed_within(&mut partial, PREFACE_TIMEOUT * 2).await);
        assert_eq!(*rejected.lock().unwrap(), ["protocol", "protocol"]);
        shutdown.cancel();
        served.await.unwrap();
    }

    /// An agent that exits removes its socket file only if it is still its own: one started
    /// before it exited bound over it, and lost its socket to the old one's exit. Also when
    /// the newer one bound between the older one's bind and its serving (the agent's first
    /// datapath pass comes between them).
    #[tokio::test]
    async fn an_exiting_agent_leaves_a_newer_agents_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let serve_until = |listener: BoundSocket| {
            let shutdown = CancellationToken::new();
            let served = tokio::spawn(serve(
                listener,
                Routes::default(),
                PeerPolicy::new(&[]),
                Arc::new(|_| {}),
                shutdown.clone(),
            ));
            (shutdown, served)
        };
        let old = bind(&path, None).unwrap();
        let new = bind(&path, None).unwrap();
        let (old_shutdown, old_served) = serve_until(old);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (new_shutdown, new_served) = serve_until(new);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        old_shutdown.cancel();
        old_served.await.unwrap();
        assert!(
            tokio::net::UnixStream::connect(&path).await.is_ok(),
            "the newer agent's socket is gone"
        );
        new_shutdown.cancel();
        new_served.await.unwrap();
        assert!(!path.exists(), "an agent leaves its own socket behind");
    }
}
