//! Child processes that cannot outlive the test that started them.

use std::fmt;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const POLL: Duration = Duration::from_millis(10);

/// Owns a spawned process; dropping it sends SIGTERM, waits up to the grace period, then
/// SIGKILLs and reaps it, so a failing test leaves no process behind.
pub struct ProcessGuard {
    child: Option<Child>,
    name: String,
    grace: Duration,
}

impl fmt::Debug for ProcessGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcessGuard")
            .field("name", &self.name)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl ProcessGuard {
    /// Spawns `cmd`; `name` only labels errors and logs. Grace period before SIGKILL: 2 s.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        tracing::debug!(name, pid = child.id(), "spawned");
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
            grace: Duration::from_secs(2),
        })
    }

    /// How long [`Self::stop`] and `Drop` wait after SIGTERM before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Some(status)` once the process has exited (it is reaped then).
    pub fn try_exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("polling {}", self.name)),
            None => bail!("{} was already stopped", self.name),
        }
    }

    /// Sends `signal` to the process (by PID), e.g. SIGHUP for a reload.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().context("process already stopped")?;
        kill(pid_of(pid)?, signal).with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// SIGTERM, wait up to the grace period, SIGKILL; returns how it ended.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        let mut child = self
            .child
            .take()
            .with_context(|| format!("{} was already stopped", self.name))?;
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // ESRCH is harmless here: the process may exit between try_wait and kill.
        let _ = kill(pid_of(child.id())?, Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(POLL);
        }
        tracing::warn!(name = %self.name, pid = child.id(), "no exit after SIGTERM, killing");
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("reaping {}", self.name))
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.terminate()
        {
            tracing::warn!(name = %self.name, "stopping process: {e:#}");
        }
    }
}

fn pid_of(id: u32) -> Result<Pid> {
    Ok(Pid::from_raw(
        i32::try_from(id).context("pid out of range")?,
    ))
}

/// Runs `cmd` to completion with output captured, killing it (and failing) after `timeout`.
/// For sync code paths; async callers use the tokio-based runner in `clients`.
pub fn run_blocking(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ProcessGuard::spawn(cmd, &what)?.with_grace(Duration::ZERO);
    let child = guard.child.as_mut().context("child vanished")?;
    // Readers on their own threads so a chatty child cannot block on a full pipe.
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = guard.try_exited()? {
            break status;
        }
        if Instant::now() >= deadline {
            drop(guard);
            bail!("{what} did not finish within {timeout:?}");
        }
        thread::sleep(POLL);
    };
    let stdout = out.map(join_reader).unwrap_or_default();
    let stderr = err.map(join_reader).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn reader<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn join_reader(h: thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    h.join().unwrap_or_default()
}
