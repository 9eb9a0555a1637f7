//! The stop signal, in a test binary of its own: it signals its own process.

use std::time::Duration;

/// A SIGTERM arriving after `shutdown_signal` is called but before it is awaited (the start
/// of a process) is caught and stops it gracefully. Caught only from the first poll, it
/// killed the process (here, this test binary).
#[tokio::test]
async fn a_sigterm_before_the_wait_is_caught() {
    let stop = warden_telemetry::process::shutdown_signal();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &std::process::id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    // The start going on meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("the SIGTERM was caught");
}
