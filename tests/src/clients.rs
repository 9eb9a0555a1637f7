//! Real DNS clients (`dig`, `kdig`, `dnsperf`) run as processes with hard timeouts, their
//! text output parsed into plain structs.
//!
//! Async (tokio) on purpose: the server under test may run in-process on the same runtime,
//! and a blocking wait for a client would starve it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::NamedTempFile;
use tokio::io::AsyncReadExt as _;
use tokio::process::Command;

use crate::tool_path;

/// Slack on top of a client's own timeouts before the process is killed.
const KILL_SLACK: Duration = Duration::from_secs(5);

/// Query options shared by [`dig`] and [`kdig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigOpts {
    /// Query over TCP from the start.
    pub tcp: bool,
    /// Keep a truncated UDP answer instead of retrying over TCP (`+ignore`).
    pub ignore_tc: bool,
    /// Send an EDNS(0) OPT record. dig does by default, kdig does not; this sets both.
    pub edns: bool,
    /// Seconds to wait for each try.
    pub timeout_s: u32,
    /// Total attempts (dig `+tries`; kdig gets `+retry=tries-1`).
    pub tries: u32,
    /// Source address to send from (`-b`).
    pub source: Option<IpAddr>,
}

impl Default for DigOpts {
    fn default() -> Self {
        Self {
            tcp: false,
            ignore_tc: false,
            edns: true,
            timeout_s: 2,
            tries: 1,
            source: None,
        }
    }
}

impl DigOpts {
    pub fn tcp() -> Self {
        Self {
            tcp: true,
            ..Self::default()
        }
    }

    pub fn with_source(self, source: IpAddr) -> Self {
        Self {
            source: Some(source),
            ..self
        }
    }

    fn kill_after(&self) -> Duration {
        Duration::from_secs(u64::from(self.timeout_s) * u64::from(self.tries.max(1))) + KILL_SLACK
    }
}

/// One resource record from a reply, fields as the client printed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, absolute with the trailing dot, case as received.
    pub name: String,
    pub ttl: u32,
    /// Type mnemonic, upper case: `A`, `CNAME`, ...
    pub rtype: String,
    /// RDATA in presentation format (TXT keeps its quotes).
    pub data: String,
}

/// A parsed DNS reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsReply {
    /// RCODE mnemonic: `NOERROR`, `NXDOMAIN`, `REFUSED`, `SERVFAIL`, ...
    pub status: String,
    /// Header flags, lower case: `qr`, `aa`, `tc`, `rd`, `ra`, ...
    pub flags: Vec<String>,
    pub answers: Vec<Record>,
    pub authority: Vec<Record>,
    /// `UDP` or `TCP`: the transport of the reply shown (dig retries TC answers over TCP).
    pub transport: Option<String>,
    /// Reply size in bytes as the client reported it.
    pub size: Option<usize>,
    /// Round trip as the client reported it (dig only has whole milliseconds).
    pub time_ms: Option<f64>,
    /// The client's output for this reply, for assertion messages.
    pub raw: String,
}

impl DnsReply {
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f.eq_ignore_ascii_case(flag))
    }

    pub fn truncated(&self) -> bool {
        self.has_flag("tc")
    }

    /// Answer records of `rtype` (case-insensitive).
    pub fn answers_of<'a>(&'a self, rtype: &'a str) -> impl Iterator<Item = &'a Record> + 'a {
        self.answers
            .iter()
            .filter(move |r| r.rtype.eq_ignore_ascii_case(rtype))
    }

    /// Addresses of the A and AAAA answers, in answer order.
    pub fn ips(&self) -> Vec<IpAddr> {
        self.answers
            .iter()
            .filter(|r| r.rtype == "A" || r.rtype == "AAAA")
            .filter_map(|r| r.data.parse().ok())
            .collect()
    }

    /// Smallest TTL in the answer section (for a CNAME chain: the chain's TTL).
    pub fn min_ttl(&self) -> Option<u32> {
        self.answers.iter().map(|r| r.ttl).min()
    }
}

/// The client ran but got no reply at all (timeout, connection refused, reset). Returned
/// inside `anyhow::Error`; tests expecting a dropped query check
/// `err.downcast_ref::<NoReply>()`.
#[derive(Debug, thiserror::Error)]
#[error("{client}: no reply from {server} for {query}\n{output}")]
pub struct NoReply {
    pub client: &'static str,
    pub server: SocketAddr,
    pub query: String,
    pub output: String,
}

/// `dig @server name qtype` with `opts`, parsed.
pub async fn dig(server: SocketAddr, name: &str, qtype: &str, opts: DigOpts) -> Result<DnsReply> {
    dig_with(server, name, qtype, opts, |_| Ok(())).await
}

/// [`dig`] with `prepare` applied to the command before it is spawned: the lab uses it to
/// start the same dig inside a cgroup, so both share one command line and one parser.
pub(crate) async fn dig_with(
    server: SocketAddr,
    name: &str,
    qtype: &str,
    opts: DigOpts,
    prepare: impl FnOnce(&mut Command) -> Result<()>,
) -> Result<DnsReply> {
    let mut cmd = Command::new(tool_path("dig").context("dig not found (package dnsutils)")?);
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([name, qtype])
        // +comments for header and flags, +stats for transport, size and time.
        .args(["+noall", "+comments", "+answer", "+authority", "+stats"])
        .arg(format!("+time={}", opts.timeout_s.max(1)))
        .arg(format!("+tries={}", opts.tries.max(1)));
    if opts.tcp {
        cmd.arg("+tcp");
    }
    if opts.ignore_tc {
        cmd.arg("+ignore");
    }
    if !opts.edns {
        cmd.arg("+noedns");
    }
    if let Some(src) = opts.source {
        cmd.args(["-b", &src.to_string()]);
    }
    prepare(&mut cmd)?;
    let out = run(&mut cmd, opts.kill_after()).await?;
    single_reply("dig", server, &format!("{name} {qtype}"), &out)
}

/// `kdig @server name qtype` with `opts`, parsed.
pub async fn kdig(server: SocketAddr, name: &str, qtype: &str, opts: DigOpts) -> Result<DnsReply> {
    let mut cmd = kdig_command(server, opts)?;
    cmd.args([name, qtype]);
    let out = run(&mut cmd, opts.kill_after()).await?;
    single_reply("kdig", server, &format!("{name} {qtype}"), &out)
}

/// A queries for `names`, all over one TCP connection (`kdig +tcp +keepopen`). Fails unless
/// kdig's debug output says every query after the first reused the connection, so a server
/// that closes the connection early makes this an error rather than a silent reconnect.
pub async fn kdig_tcp_multi(server: SocketAddr, names: &[&str]) -> Result<Vec<DnsReply>> {
    if names.is_empty() {
        bail!("kdig_tcp_multi needs at least one name");
    }
    let opts = DigOpts::tcp();
    let mut cmd = kdig_command(server, opts)?;
    // -d makes kdig say ";; DEBUG: Querying for owner(..), ..., reused connection".
    cmd.args(["-d", "+keepopen"]);
    for name in names {
        cmd.args([*name, "A"]);
    }
    let timeout = opts.kill_after() * u32::try_from(names.len()).unwrap_or(u32::MAX);
    let out = run(&mut cmd, timeout).await?;
    let text = combined(&out);
    let replies = parse_replies(&text);
    if replies.len() != names.len() {
        return Err(NoReply {
            client: "kdig",
            server,
            query: format!("{names:?} over one TCP connection"),
            output: format!("got {} of {} replies\n{text}", replies.len(), names.len()),
        }
        .into());
    }
    let reused = text.matches("reused connection").count();
    if reused != names.len() - 1 {
        bail!(
            "kdig reused the TCP connection for {reused} of {} follow-up queries\n{text}",
            names.len() - 1
        );
    }
    Ok(replies)
}

fn kdig_command(server: SocketAddr, opts: DigOpts) -> Result<Command> {
    let mut cmd =
        Command::new(tool_path("kdig").context("kdig not found (package knot-dnsutils)")?);
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .arg(format!("+timeout={}", opts.timeout_s.max(1)))
        .arg(format!("+retry={}", opts.tries.max(1) - 1));
    if opts.tcp {
        cmd.arg("+tcp");
    }
    if opts.ignore_tc {
        cmd.arg("+ignore");
    }
    cmd.arg(if opts.edns { "+edns" } else { "+noedns" });
    if let Some(src) = opts.source {
        cmd.args(["-b", &src.to_string()]);
    }
    Ok(cmd)
}

fn single_reply(
    client: &'static str,
    server: SocketAddr,
    query: &str,
    out: &Output,
) -> Result<DnsReply> {
    let text = combined(out);
    // dig prints a header per attempt only when it got one; the last is the one it kept.
    match parse_replies(&text).pop() {
        Some(mut reply) => {
            reply.raw = text;
            Ok(reply)
        }
        None => Err(NoReply {
            client,
            server,
            query: query.to_owned(),
            output: format!("({}) {text}", out.status),
        }
        .into()),
    }
}

fn combined(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        s.push_str("\n;; stderr:\n");
        s.push_str(&err);
    }
    s
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Other,
    Answer,
    Authority,
}

/// Splits dig/kdig text output into replies, one per `->>HEADER<<-` line. Both clients print
/// the same shape with small differences (`,` vs `;` separators, `flags` vs `Flags`).
pub fn parse_replies(text: &str) -> Vec<DnsReply> {
    let mut replies: Vec<DnsReply> = Vec::new();
    let mut section = Section::Other;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix(";; ->>HEADER<<-") {
            replies.push(DnsReply {
                status: header_field(rest, "status:").unwrap_or_default(),
                ..DnsReply::default()
            });
            section = Section::Other;
        }
        let Some(reply) = replies.last_mut() else {
            continue;
        };
        reply.raw.push_str(line);
        reply.raw.push('\n');
        let lower = l.to_ascii_lowercase();
        if let Some(flags) = lower.strip_prefix(";; flags:") {
            let flags = flags.split(';').next().unwrap_or_default();
            reply.flags = flags.split_whitespace().map(str::to_owned).collect();
        } else if lower.starts_with(";; answer section") {
            section = Section::Answer;
        } else if lower.starts_with(";; authority section") {
            section = Section::Authority;
        } else if l.is_empty() || (lower.starts_with(";;") && lower.ends_with("section:")) {
            section = Section::Other;
        } else if let Some(rest) = lower.strip_prefix(";; server:") {
            // dig: ";; SERVER: 127.0.0.1#53(127.0.0.1) (UDP)"
            reply.transport = rest
                .rsplit('(')
                .next()
                .map(|t| t.trim_end_matches(')').trim().to_ascii_uppercase());
        } else if let Some(rest) = lower.strip_prefix(";; query time:") {
            reply.time_ms = rest.trim().trim_end_matches("msec").trim().parse().ok();
        } else if let Some(rest) = lower.strip_prefix(";; msg size  rcvd:") {
            reply.size = rest.trim().parse().ok();
        } else if let Some(rest) = lower.strip_prefix(";; received ") {
            // kdig: ";; Received 51 B"
            reply.size = rest.split_whitespace().next().and_then(|n| n.parse().ok());
        } else if let Some(rest) = lower.strip_prefix(";; from ") {
            // kdig: ";; From 127.0.0.1@53(TCP) in 0.8 ms"
            reply.transport = rest
                .split('(')
                .nth(1)
                .and_then(|t| t.split(')').next())
                .map(str::to_ascii_uppercase);
            reply.time_ms = rest
                .split(" in ")
                .nth(1)
                .and_then(|t| t.trim().trim_end_matches("ms").trim().parse().ok());
        } else if !l.starts_with(';')
            && section != Section::Other
            && let Some(record) = parse_record(l)
        {
            match section {
                Section::Answer => reply.answers.push(record),
                Section::Authority => reply.authority.push(record),
                Section::Other => {}
            }
        }
    }
    replies
}

/// `status: NOERROR,` / `status: NOERROR;` → `NOERROR`.
fn header_field(header: &str, key: &str) -> Option<String> {
    let at = header.find(key)? + key.len();
    header[at..]
        .split([',', ';'])
        .next()
        .map(|v| v.trim().to_owned())
}

/// `name ttl [class] type rdata...`; the class column is optional (kdig +noclass).
fn parse_record(line: &str) -> Option<Record> {
    let mut rest = line;
    let mut next = || {
        let s = rest.trim_start();
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let (tok, tail) = s.split_at(end);
        rest = tail;
        (!tok.is_empty()).then_some(tok)
    };
    let name = next()?.to_owned();
    let ttl = next()?.parse().ok()?;
    let mut rtype = next()?;
    if matches!(rtype, "IN" | "CH" | "HS" | "ANY") {
        rtype = next()?;
    }
    let rtype = rtype.to_ascii_uppercase();
    Some(Record {
        name,
        ttl,
        rtype,
        data: rest.trim().to_owned(),
    })
}

/// Knobs for [`dnsperf_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsperfOpts {
    /// Query file, one `name TYPE` per line (see [`write_queries_file`]).
    pub queries_file: PathBuf,
    /// Run time (`-l`).
    pub duration_s: u32,
    /// Rate limit (`-Q`); unlimited if `None`.
    pub qps: Option<u32>,
    /// Simulated clients, i.e. source ports (`-c`).
    pub clients: u32,
    /// `-m tcp` instead of UDP.
    pub tcp: bool,
    /// Per-query timeout after which dnsperf counts a query as lost (`-t`).
    pub timeout_s: u32,
    /// Source address (`-a`).
    pub source: Option<IpAddr>,
}

impl DnsperfOpts {
    pub fn new(queries_file: &Path, duration_s: u32) -> Self {
        Self {
            queries_file: queries_file.to_owned(),
            duration_s,
            qps: None,
            clients: 1,
            tcp: false,
            timeout_s: 2,
            source: None,
        }
    }
}

/// dnsperf's summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DnsperfReport {
    pub sent: u64,
    pub completed: u64,
    pub lost: u64,
    pub qps: f64,
    pub run_time_s: f64,
    pub avg_latency_s: f64,
    pub min_latency_s: f64,
    pub max_latency_s: f64,
    pub latency_stddev_s: f64,
    /// Replies per RCODE mnemonic.
    pub rcodes: BTreeMap<String, u64>,
    /// The whole stdout and stderr, for assertion messages.
    pub raw: String,
}

impl fmt::Display for DnsperfReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sent {} completed {} lost {} qps {:.1} avg {:.6}s max {:.6}s rcodes {:?}",
            self.sent,
            self.completed,
            self.lost,
            self.qps,
            self.avg_latency_s,
            self.max_latency_s,
            self.rcodes
        )
    }
}

/// Writes a dnsperf query file (`name TYPE` per line); removed when the handle drops.
pub fn write_queries_file(queries: &[(&str, &str)]) -> Result<NamedTempFile> {
    let mut f = tempfile::Builder::new()
        .prefix("warden-dnsperf-")
        .suffix(".txt")
        .tempfile()
        .context("creating dnsperf query file")?;
    for (name, qtype) in queries {
        writeln!(f, "{name} {qtype}").context("writing dnsperf query file")?;
    }
    f.flush().context("flushing dnsperf query file")?;
    Ok(f)
}

/// Runs dnsperf over UDP against `server` for `duration_s` seconds.
pub async fn dnsperf(
    server: SocketAddr,
    queries_file: &Path,
    duration_s: u32,
    qps: Option<u32>,
    clients: u32,
) -> Result<DnsperfReport> {
    let opts = DnsperfOpts {
        qps,
        clients,
        ..DnsperfOpts::new(queries_file, duration_s)
    };
    dnsperf_with(server, &opts).await
}

/// Runs dnsperf with full options.
pub async fn dnsperf_with(server: SocketAddr, opts: &DnsperfOpts) -> Result<DnsperfReport> {
    dnsperf_prepared(server, opts, |_| Ok(())).await
}

/// [`dnsperf_with`], with `prepare` run on the command first (to start it in a cgroup, say).
pub(crate) async fn dnsperf_prepared(
    server: SocketAddr,
    opts: &DnsperfOpts,
    prepare: impl FnOnce(&mut Command) -> Result<()>,
) -> Result<DnsperfReport> {
    let mut cmd = Command::new(tool_path("dnsperf").context("dnsperf not found")?);
    prepare(&mut cmd)?;
    cmd.args(["-s", &server.ip().to_string()])
        .args(["-p", &server.port().to_string()])
        .arg("-d")
        .arg(&opts.queries_file)
        .args(["-l", &opts.duration_s.to_string()])
        .args(["-c", &opts.clients.max(1).to_string()])
        .args(["-t", &opts.timeout_s.max(1).to_string()])
        .args(["-m", if opts.tcp { "tcp" } else { "udp" }]);
    if let Some(qps) = opts.qps {
        cmd.args(["-Q", &qps.to_string()]);
    }
    if let Some(src) = opts.source {
        cmd.args(["-a", &src.to_string()]);
    }
    let kill_after =
        Duration::from_secs(u64::from(opts.duration_s) + u64::from(opts.timeout_s)) + KILL_SLACK;
    let out = run(&mut cmd, kill_after).await?;
    let raw = combined(&out);
    if !out.status.success() {
        bail!("dnsperf failed ({}):\n{raw}", out.status);
    }
    parse_dnsperf(&raw)
}

/// Parses dnsperf 2.x's "Statistics:" block.
pub fn parse_dnsperf(raw: &str) -> Result<DnsperfReport> {
    let mut r = DnsperfReport {
        raw: raw.to_owned(),
        ..DnsperfReport::default()
    };
    let mut seen_sent = false;
    for line in raw.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        let first = || value.split_whitespace().next().unwrap_or_default();
        match key.trim() {
            "Queries sent" => {
                r.sent = first().parse().context("Queries sent")?;
                seen_sent = true;
            }
            "Queries completed" => r.completed = first().parse().context("Queries completed")?,
            "Queries lost" => r.lost = first().parse().context("Queries lost")?,
            "Queries per second" => r.qps = first().parse().context("Queries per second")?,
            "Run time (s)" => r.run_time_s = first().parse().context("Run time")?,
            "Latency StdDev (s)" => r.latency_stddev_s = first().parse().context("StdDev")?,
            "Average Latency (s)" => {
                // "0.000074 (min 0.000019, max 0.000950)"
                r.avg_latency_s = first().parse().context("Average Latency")?;
                let num = |tag: &str| -> Option<f64> {
                    let at = value.find(tag)? + tag.len();
                    value[at..].split([',', ')']).next()?.trim().parse().ok()
                };
                r.min_latency_s = num("min ").unwrap_or_default();
                r.max_latency_s = num("max ").unwrap_or_default();
            }
            "Response codes" => {
                // "NOERROR 267 (66.75%), NXDOMAIN 133 (33.25%)"
                for part in value.split(',') {
                    let mut it = part.split_whitespace();
                    if let (Some(code), Some(n)) = (it.next(), it.next())
                        && let Ok(n) = n.parse()
                    {
                        r.rcodes.insert(code.to_owned(), n);
                    }
                }
            }
            _ => {}
        }
    }
    if !seen_sent {
        bail!("no dnsperf statistics in output:\n{raw}");
    }
    Ok(r)
}

/// Runs `cmd` with output captured; past `timeout` kills it by PID, reaps it and fails.
async fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Backstop for cancellation (the caller's future dropped mid-wait).
        .kill_on_drop(true);
    let what = format!("{:?}", cmd.as_std());
    tracing::debug!("running {what}");
    let mut child = cmd.spawn().with_context(|| format!("spawning {what}"))?;
    let mut stdout = child.stdout.take().context("no stdout pipe")?;
    let mut stderr = child.stderr.take().context("no stderr pipe")?;
    let result = tokio::time::timeout(timeout, async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (o, e, status) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            child.wait()
        );
        o.context("reading stdout")?;
        e.context("reading stderr")?;
        let status = status.context("waiting")?;
        anyhow::Ok(Output {
            status,
            stdout: out,
            stderr: err,
        })
    })
    .await;
    match result {
        Ok(output) => output.with_context(|| format!("running {what}")),
        Err(_) => {
            // kill() also waits, so nothing is left behind.
            let _ = child.kill().await;
            bail!("{what} did not finish within {timeout:?}, killed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dig_output() {
        let text = "\
;; Got answer:
;; ->>HEADER<<- opcode: QUERY, status: NOERROR, id: 34288
;; flags: qr aa rd; QUERY: 1, ANSWER: 3, AUTHORITY: 0, ADDITIONAL: 1
;; WARNING: recursion requested but not available

;; OPT PSEUDOSECTION:
; EDNS: version: 0, flags:; udp: 1232
;; ANSWER SECTION:
www.cilium.io.\t\t300\tIN\tCNAME\tweb.cilium.io.
web.cilium.io.\t\t120\tIN\tCNAME\tedge.cilium.io.
edge.cilium.io.\t\t60\tIN\tA\t198.18.1.11
big-txt.cilium.io.\t300\tIN\tTXT\t\"a b\" \"c\"

;; Query time: 3 msec
;; SERVER: 127.9.9.9#15353(127.9.9.9) (TCP)
;; WHEN: Thu Nov 26 10:15:20 UTC 2026
;; MSG SIZE  rcvd: 62
";
        let r = parse_replies(text);
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r.status, "NOERROR");
        assert_eq!(r.flags, ["qr", "aa", "rd"]);
        assert_eq!(r.answers.len(), 4);
        assert_eq!(r.answers[0].rtype, "CNAME");
        assert_eq!(r.answers[3].data, "\"a b\" \"c\"");
        assert_eq!(r.min_ttl(), Some(60));
        assert_eq!(r.ips(), ["198.18.1.11".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.transport.as_deref(), Some("TCP"));
        assert_eq!(r.size, Some(62));
        assert_eq!(r.time_ms, Some(3.0));
    }

    #[test]
    fn parses_kdig_output() {
        let text = "\
;; DEBUG: Querying for owner(example.org.), class(1), type(1), reused connection
;; ->>HEADER<<- opcode: QUERY; status: NXDOMAIN; id: 12841
;; Flags: qr aa rd; QUERY: 1; ANSWER: 0; AUTHORITY: 1; ADDITIONAL: 0

;; QUESTION SECTION:
;; nx.example.org.        \t\tIN\tA

;; AUTHORITY SECTION:
example.org.        \t60\tIN\tSOA\tns1.example.org. hostmaster.example.org. 1 3600 600 86400 60

;; Received 45 B
;; Time 2026-11-26 10:15:29 UTC
;; From 127.9.9.9@15353(TCP) in 0.4 ms
";
        let r = parse_replies(text);
        assert_eq!(r.len(), 1);
        let r = &r[0];
        assert_eq!(r.status, "NXDOMAIN");
        assert!(r.has_flag("AA"));
        assert!(r.answers.is_empty());
        assert_eq!(r.authority.len(), 1);
        assert_eq!(r.authority[0].rtype, "SOA");
        assert_eq!(r.transport.as_deref(), Some("TCP"));
        assert_eq!(r.size, Some(45));
        assert_eq!(r.time_ms, Some(0.4));
    }

    #[test]
    fn parses_dnsperf_summary() {
        let raw = "\
Statistics:

  Queries sent:         400
  Queries completed:    398 (99.50%)
  Queries lost:         2 (0.50%)

  Response codes:       NOERROR 267 (66.75%), NXDOMAIN 131 (33.25%)
  Average packet size:  request 31, response 59
  Run time (s):         2.000217
  Queries per second:   199.978302

  Average Latency (s):  0.000074 (min 0.000019, max 0.000950)
  Latency StdDev (s):   0.000053
";
        let r = parse_dnsperf(raw).unwrap();
        assert_eq!((r.sent, r.completed, r.lost), (400, 398, 2));
        assert_eq!(r.rcodes["NXDOMAIN"], 131);
        assert!((r.qps - 199.978302).abs() < 1e-9);
        assert!((r.max_latency_s - 0.000950).abs() < 1e-12);
        assert!((r.min_latency_s - 0.000019).abs() < 1e-12);
        assert!(parse_dnsperf("nothing").is_err());
    }
}
