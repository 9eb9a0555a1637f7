//! The `warden` command: status, FQDN cache listing and policy validation, over the agent's
//! admin API (`--agent URL`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use warden_telemetry::{CacheRow, InstanceStatus};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "warden",
    version,
    about = "Operate Warden: status, FQDN cache, policies"
)]
pub struct Cli {
    /// The agent's admin API.
    #[arg(
        long,
        global = true,
        env = "WARDEN_AGENT",
        default_value = "http://127.0.0.1:9890"
    )]
    pub agent: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Is the agent serving DNS, which policy revision is in force, how big is the cache.
    Status {
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The FQDN cache.
    Fqdn {
        #[command(subcommand)]
        command: FqdnCommand,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum FqdnCommand {
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Names resolved by endpoints, with their IPs and remaining TTL.
    List {
        /// Only this endpoint (`namespace/name`).
        #[arg(short = 'e', long)]
        endpoint: Option<String>,
        /// Only this name.
        #[arg(short = 'n', long)]
        name: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check CiliumNetworkPolicy files; exits non-zero with every error found.
    Validate {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Status { output } => status(&cli.agent, output).await,
        Command::Fqdn {
            command:
                FqdnCommand::Cache {
                    command:
                        CacheCommand::List {
                            endpoint,
                            name,
                            output,
                        },
                },
        } => cache_list(&cli.agent, endpoint, name, output).await,
        Command::Policy {
            command: PolicyCommand::Validate { files },
        } => return validate(&files),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("warden: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    match warden_policy::load_paths(files) {
        Ok(policies) => {
            println!(
                "{} policies in {} files: valid",
                policies.len(),
                files.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors {
                eprintln!("error: {error}");
            }
            eprintln!("{} error(s)", errors.len());
            ExitCode::FAILURE
        }
    }
}

async fn status(agent: &str, output: Output) -> anyhow::Result<String> {
    let body = get(agent, "/v1/status").await?;
    if output == Output::Json {
        return Ok(with_newline(body));
    }
    let status: InstanceStatus =
        serde_json::from_str(&body).context("the agent's status is not what this CLI expects")?;
    Ok(render_status(&status))
}

/// The human-readable status, one fact per line.
pub fn render_status(status: &InstanceStatus) -> String {
    let mut text = String::new();
    let yes_no = |flag: bool| if flag { "yes" } else { "no" };
    let _ = writeln!(
        text,
        "Instance:        {} ({})",
        status.instance, status.version
    );
    let _ = writeln!(
        text,
        "Serving DNS:     {} on {}",
        yes_no(status.serving),
        join(&status.dns_listen)
    );
    let _ = writeln!(text, "Ready:           {}", yes_no(status.ready));
    let _ = writeln!(text, "Mode:            {}", status.mode);
    let _ = writeln!(text, "Peer connected:  {}", yes_no(status.peer_connected));
    let _ = writeln!(
        text,
        "DNS port held by: {}",
        status.dns_port_holders.join(", ")
    );
    let _ = writeln!(
        text,
        "Policy:          revision {}, {} policies, {} selectors (from {})",
        status.policy.revision,
        status.policy.policies,
        status.policy.selectors,
        status.policy.source
    );
    if let Some(error) = &status.policy.last_error {
        let _ = writeln!(text, "Policy error:    {error}");
    }
    let _ = writeln!(
        text,
        "FQDN cache:      {} names, {} IPs",
        status.cache_names, status.cache_ips
    );
    let _ = writeln!(text, "Endpoints:       {}", status.endpoints);
    let _ = writeln!(text, "Datapath:        {}", status.datapath);
    let _ = writeln!(text, "Uptime:          {}s", status.uptime_s);
    text
}

async fn cache_list(
    agent: &str,
    endpoint: Option<String>,
    name: Option<String>,
    output: Output,
) -> anyhow::Result<String> {
    let mut query = Vec::new();
    if let Some(endpoint) = endpoint {
        query.push(format!("endpoint={}", encode(&endpoint)));
    }
    if let Some(name) = name {
        query.push(format!("name={}", encode(&name)));
    }
    let path = if query.is_empty() {
        "/v1/fqdn/cache".to_owned()
    } else {
        format!("/v1/fqdn/cache?{}", query.join("&"))
    };
    let body = get(agent, &path).await?;
    if output == Output::Json {
        return Ok(with_newline(body));
    }
    let rows: Vec<CacheRow> = serde_json::from_str(&body)
        .context("the agent's cache listing is not what this CLI expects")?;
    Ok(render_cache(&rows))
}

/// Columns: endpoint, name, IPs, TTL remaining, source.
pub fn render_cache(rows: &[CacheRow]) -> String {
    let header = ["ENDPOINT", "NAME", "IPS", "TTL", "SOURCE"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|row| {
            [
                row.endpoint.clone(),
                row.name.clone(),
                join(&row.ips),
                format!("{}s", row.ttl),
                row.source.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    let mut line = |cells: [&str; 5]| {
        let mut out = String::new();
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if index + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(header);
    for row in &cells {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    text
}

async fn get(agent: &str, path: &str) -> anyhow::Result<String> {
    let base = agent.trim_end_matches('/');
    let uri: hyper::Uri = format!("{base}{path}")
        .parse()
        .with_context(|| format!("bad agent URL {agent:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("the agent URL must be http://HOST:PORT, got {agent:?}");
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client.get(uri.clone()))
        .await
        .with_context(|| format!("no answer from the agent at {base} within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| format!("cannot reach the agent at {base}"))?;
    let status = response.status();
    let body = tokio::time::timeout(REQUEST_TIMEOUT, response.into_body().collect())
        .await
        .context("the agent's answer did not complete")?
        .context("cannot read the agent's answer")?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("{uri}: {status}: {}", body.trim());
    }
    Ok(body)
}

fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Percent-encodes a query parameter value.
fn encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~*".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_table_has_the_documented_columns() {
        let rows = vec![CacheRow {
            endpoint: "youssef/test".into(),
            name: "cilium.io.".into(),
            ips: vec!["198.18.1.10".parse().unwrap()],
            ttl: 299,
            expires_at: 1,
            source: "lookup".into(),
            entries: vec![],
        }];
        let text = render_cache(&rows);
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["ENDPOINT", "NAME", "IPS", "TTL", "SOURCE"]
        );
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            [
                "youssef/test",
                "cilium.io.",
                "198.18.1.10",
                "299s",
                "lookup"
            ]
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("youssef/test"), "youssef%2Ftest");
        assert_eq!(encode("*.cilium.io"), "*.cilium.io");
    }
}
