//! What both binaries do the same at the edges of their lives: log setup and the stop signal.

/// Logs to stderr, at `RUST_LOG`'s levels (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on SIGTERM (what Kubernetes and systemd send) or SIGINT, caught from the moment
/// this is called (inside the runtime), not from the first poll: call it before starting to
/// serve. Until a handler is in place a signal has its default action, and a SIGTERM during
/// the start (a pod deleted as it comes up) killed the process with its sockets already
/// taking queries, without the drain.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let caught = |kind: SignalKind, name: &'static str| match signal(kind) {
        Ok(stream) => Some(stream),
        Err(error) => {
            tracing::error!(%error, "cannot listen for {name}; it will not stop the process gracefully");
            None
        }
    };
    let terminate = caught(SignalKind::terminate(), "SIGTERM");
    let interrupt = caught(SignalKind::interrupt(), "SIGINT");
    async move {
        tokio::select! {
            () = received(terminate) => {}
            () = received(interrupt) => {}
        }
    }
}

/// The next signal of `stream`; never, without one.
async fn received(stream: Option<tokio::signal::unix::Signal>) {
    match stream {
        Some(mut stream) => {
            stream.recv().await;
        }
        None => std::future::pending().await,
    }
}
