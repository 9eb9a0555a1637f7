//! Warden's configuration: the YAML schema shared by `warden-agent` and `warden-dnsproxy`, its
//! defaults, validation, and the command-line flags that override single fields.
//!
//! [`AgentConfig`] is the whole file. [`load`] reads it (unknown fields are errors, so a typo
//! never silently falls back to a default), resolves relative paths against the file's folder,
//! and [`ConfigOverrides`] applies flags on top before [`AgentConfig::validate`] runs.

#![forbid(unsafe_code)]

mod error;
mod flags;
mod schema;

pub use error::ConfigError;
pub use flags::{ConfigOverrides, DnsOverrides, ProxyOverrides};
pub use schema::{
    AdminConfig, AgentConfig, DEFAULT_SOCKET, DatapathConfig, DatapathMode, DnsConfig,
    EndpointConfig, PolicyConfig, Prefer, ProxyConfig, ProxyDatapathConfig, RejectCode,
    endpoints_from_yaml, validate_endpoints,
};

use std::path::Path;

/// Reads and validates a config file. Relative paths in it (`policy.dir`, `endpoints_dir`,
/// `state_dir`, `socket`) are taken relative to the file's own folder, so a lab can be started
/// from anywhere; endpoint cgroups are relative to `datapath.cgroup_root`.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    load_with(path, &ConfigOverrides::default())
}

/// Reads and validates a `warden-dnsproxy` config file, with its command-line overrides.
pub fn load_proxy(path: &Path, overrides: &ProxyOverrides) -> Result<ProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = ProxyConfig::from_yaml(&text, path)?;
    config.resolve_paths(path.parent().unwrap_or_else(|| Path::new(".")));
    overrides.apply(&mut config);
    config.validate()?;
    Ok(config)
}

/// Like [`load`], with command-line overrides applied before validation.
pub fn load_with(path: &Path, overrides: &ConfigOverrides) -> Result<AgentConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config = AgentConfig::from_yaml(&text, path)?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    config.resolve_paths(base);
    overrides.apply(&mut config);
    config.validate()?;
    Ok(config)
}
