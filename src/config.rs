//! Typed configuration: `config/default.toml`, then an optional `--config` file, then the
//! environment (`EMBED_WORKER__SECTION__KEY`, plus `DATABASE_URL`).
//!
//! Why typed and layered: a pod gets its settings from env and Secrets (12-factor) while a
//! developer edits one file; either way a typo fails at start-up, not at 3 a.m. The API key is
//! never part of this file-backed struct's serialised form: it is read from `OPENAI_API_KEY` or
//! `OPENAI_API_KEY_FILE` and kept in a [`SecretString`] whose `Debug` prints `[REDACTED]`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub queue: QueueSettings,
    pub batch: BatchSettings,
    pub api: ApiSettings,
    pub model: ModelSettings,
    pub render: RenderSettings,
    pub shutdown: ShutdownSettings,
    pub log: LogSettings,
    pub rate_limit: RateLimitSettings,
    pub retry: RetrySettings,
    pub retention: RetentionSettings,
    pub http: HttpSettings,
    pub capture: CaptureSettings,
    pub freshness: FreshnessSettings,
    pub budget: BudgetSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    pub monthly_usd: f64,
    pub recheck_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSettings {
    pub sessions: bool,
    pub templates: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreshnessSettings {
    pub max_age_days: u64,
    pub scan_interval_secs: u64,
    pub scan_limit: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub addr: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    pub done_after_hours: u64,
    pub failed_after_hours: u64,
    pub interval_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
    pub period_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub request_retries: u32,
    pub base_ms: u64,
    pub cap_ms: u64,
    pub job_backoff_base_secs: u64,
    pub job_backoff_cap_secs: u64,
    pub quota_recheck_secs: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    /// Role to `SET ROLE` to after connecting; empty means the login role.
    pub role: String,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("role", &self.role)
            .finish()
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub name: String,
    pub fetch_batch: usize,
    pub concurrency: usize,
    pub poll_interval_ms: u64,
    pub max_attempts: i32,
    pub heartbeat_secs: u64,
    pub missed_heartbeats: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub max_jobs: usize,
    pub linger_ms: u64,
    pub max_in_flight: usize,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub base_url: String,
    pub timeout_secs: u64,
    pub max_inputs_per_request: usize,
    pub max_tokens_per_request: usize,
    /// Never from the file: filled from the environment by [`Settings::load`].
    #[serde(skip)]
    pub api_key: Option<SecretString>,
}

impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("base_url", &self.base_url)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_inputs_per_request", &self.max_inputs_per_request)
            .field("max_tokens_per_request", &self.max_tokens_per_request)
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    /// `openai` (any OpenAI-compatible API) or `local` (all-MiniLM-L6-v2 in-process).
    pub provider: String,
    /// The local model's folder (config.json, tokenizer.json, model.safetensors).
    pub local_path: String,
    pub name: String,
    pub dimensions: usize,
    pub send_dimensions: bool,
    pub max_input_tokens: usize,
    pub chunk_overlap_tokens: usize,
    pub usd_per_million_tokens: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderSettings {
    pub session: String,
    pub template: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    pub grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: String,
}

/// `EMBED_WORKER_CONFIG_DIR`, else the source tree's `config/` (development), else `./config`.
fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBED_WORKER_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    let source_tree = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    if source_tree.join("default.toml").exists() {
        source_tree
    } else {
        PathBuf::from("config")
    }
}

impl Settings {
    /// Defaults file, optional extra file, environment. Reads the API key from the environment.
    pub fn load(extra_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")).required(true));
        if let Some(path) = extra_file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("EMBED_WORKER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        let mut settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.api.api_key = api_key_from_env()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (1..=2048).contains(&self.api.max_inputs_per_request),
            "api.max_inputs_per_request must be 1..=2048"
        );
        anyhow::ensure!(
            self.model.chunk_overlap_tokens < self.model.max_input_tokens / 2,
            "model.chunk_overlap_tokens must be below half of model.max_input_tokens"
        );
        anyhow::ensure!(self.model.dimensions > 0, "model.dimensions must be > 0");
        anyhow::ensure!(
            self.batch.max_in_flight > 0,
            "batch.max_in_flight must be > 0"
        );
        anyhow::ensure!(self.batch.max_jobs > 0, "batch.max_jobs must be > 0");
        Ok(())
    }
}

/// `OPENAI_API_KEY`, or the trimmed contents of the file named by `OPENAI_API_KEY_FILE`.
fn api_key_from_env() -> anyhow::Result<Option<SecretString>> {
    if let Ok(path) = std::env::var("OPENAI_API_KEY_FILE") {
        let key = std::fs::read_to_string(&path)
            .with_context(|| format!("reading OPENAI_API_KEY_FILE {path}"))?;
        return Ok(Some(SecretString::from(key.trim().to_string())));
    }
    Ok(std::env::var("OPENAI_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(SecretString::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_in_url() {
        assert_eq!(
            redact_url("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn api_key_never_in_debug() {
        let api = ApiSettings {
            base_url: "http://x".into(),
            timeout_secs: 1,
            max_inputs_per_request: 1,
            max_tokens_per_request: 1,
            api_key: Some(SecretString::from("sk-supersecret".to_string())),
        };
        let printed = format!("{api:?}");
        assert!(!printed.contains("sk-supersecret"), "{printed}");
        assert!(printed.contains("[REDACTED]"));
    }
}
