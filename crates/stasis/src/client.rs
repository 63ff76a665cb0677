//! The command-line client of a running platform: the Computers API, with the connection taken
//! from `MIOSA_BASE_URL` / `MIOSA_API_KEY` (or flags), errors showing the server's message and
//! request id, and `-o json` for scripts.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::ValueEnum;
use serde_json::Value;
use stasis_types::Computer;

/// An error that should end the process with a specific exit code (e.g. exec's own code).
#[derive(Debug)]
pub struct ExitCode(pub i32);

/// A failure with its own exit code and message.
#[derive(Debug)]
pub struct Fail(pub i32, pub String);

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for Fail {}

/// Exit codes scripts can test (`exec` instead ends with the command's own code).
pub mod exit {
    /// Anything else: the server could not be reached, a local problem.
    pub const OTHER: i32 = 1;
    // 2: bad command-line usage (clap's own).
    pub const NOT_FOUND: i32 = 3;
    /// The request conflicts with the current state (not running, not ready, no capacity).
    pub const CONFLICT: i32 = 4;
    /// Missing or wrong API key, or another tenant's resource.
    pub const AUTH: i32 = 5;
    /// The server refused the input (400, 413, 422).
    pub const INVALID: i32 = 6;
    /// The server failed (5xx).
    pub const SERVER: i32 = 7;
    /// A snapshot waited for ended `failed`, or a computer waited for ended in `error`.
    pub const FAILED: i32 = 8;
    /// `--wait` gave up after `--timeout`.
    pub const TIMEOUT: i32 = 9;
}

/// An error answer of the API: the server's message, code and request id.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub request_id: String,
    pub what: String,
}

impl ApiFailure {
    pub fn exit_code(&self) -> i32 {
        match self.status {
            404 => exit::NOT_FOUND,
            409 => exit::CONFLICT,
            401 | 403 => exit::AUTH,
            400 | 413 | 422 => exit::INVALID,
            500..=599 => exit::SERVER,
            _ => exit::OTHER,
        }
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {}", self.message, self.status, self.what)?;
        if !self.code.is_empty() {
            write!(f, ", {}", self.code)?;
        }
        if !self.request_id.is_empty() {
            write!(f, ", request {}", self.request_id)?;
        }
        write!(f, ")")
    }
}

impl std::error::Error for ApiFailure {}

/// The exit code for an error that ends the process.
pub fn exit_code_of(e: &anyhow::Error) -> i32 {
    if let Some(c) = e.downcast_ref::<ExitCode>() {
        return c.0;
    }
    if let Some(f) = e.downcast_ref::<ApiFailure>() {
        return f.exit_code();
    }
    if let Some(f) = e.downcast_ref::<Fail>() {
        return f.0;
    }
    exit::OTHER
}

impl std::fmt::Display for ExitCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for ExitCode {}

#[derive(clap::Args, Clone)]
pub struct Connection {
    /// API base URL; `/api/v1` is added unless the URL ends in a version segment.
    #[arg(
        long,
        env = "MIOSA_BASE_URL",
        default_value = "http://127.0.0.1:8080/api/v1",
        global = true
    )]
    pub base_url: String,
    #[arg(long, env = "MIOSA_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text", global = true)]
    pub output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Base URL normalised as the official SDK does.
pub fn normalize_base(raw: &str) -> String {
    let trimmed = raw.trim().trim_end_matches('/');
    let has_version = trimmed
        .rsplit('/')
        .next()
        .is_some_and(|seg| seg.len() > 1 && seg.starts_with('v') && seg[1..].chars().all(|c| c.is_ascii_digit()));
    if has_version {
        trimmed.to_string()
    } else {
        format!("{trimmed}/api/v1")
    }
}

pub struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    pub fn new(conn: &Connection) -> Result<Api> {
        let key = conn
            .api_key
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| anyhow!("no API key: set MIOSA_API_KEY or pass --api-key"))?;
        Ok(Api::with(normalize_base(&conn.base_url), key))
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn with(base: String, key: String) -> Api {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3700))
            .build()
            .expect("an HTTP client without TLS always builds");
        Api { http, base, key }
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let mut req = self.request(method.clone(), path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = self.send(req, &format!("{method} {path}")).await?;
        let text = resp.text().await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get_computer(&self, id: &str) -> Result<Computer> {
        Ok(serde_json::from_value(
            self.call(reqwest::Method::GET, &format!("/computers/{id}"), None)
                .await?,
        )?)
    }

    /// Polls until the computer runs; fails fast if it ends in `error`.
    pub async fn wait_running(&self, id: &str, limit: Duration) -> Result<Computer> {
        let start = Instant::now();
        loop {
            let c = self.get_computer(id).await?;
            match c.status.as_str() {
                "running" => return Ok(c),
                "error" | "stopped" | "destroyed" => {
                    let why = c.error.map(|e| format!(": {e}")).unwrap_or_default();
                    return Err(Fail(exit::FAILED, format!("computer {id} is {}{why}", c.status.as_str())).into());
                }
                _ if start.elapsed() > limit => {
                    return Err(Fail(
                        exit::TIMEOUT,
                        format!("computer {id} is not running after {}s", limit.as_secs()),
                    )
                    .into())
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// A request builder with the key, for calls `call` does not fit (streams).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key)
    }

    /// Sends `req` (`what` names it in errors); an error answer is an [`ApiFailure`].
    pub async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<reqwest::Response> {
        let resp = req
            .send()
            .await
            .map_err(|e| anyhow!("cannot reach {}: {e}", self.base))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let request_id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let value: Value = serde_json::from_str(&resp.text().await.unwrap_or_default()).unwrap_or(Value::Null);
        Err(ApiFailure {
            status: status.as_u16(),
            code: value["error"]["code"].as_str().unwrap_or("").to_string(),
            message: value["error"]["message"]
                .as_str()
                .unwrap_or(status.canonical_reason().unwrap_or("request failed"))
                .to_string(),
            request_id: value["error"]["request_id"]
                .as_str()
                .map(str::to_string)
                .unwrap_or(request_id),
            what: what.to_string(),
        }
        .into())
    }
}

pub fn print(output: Output, value: &Value, text: impl FnOnce() -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Text => println!("{}", text()),
    }
}

pub fn row(c: &Computer) -> String {
    format!("{}  {:<12} {:<7} {}", c.id, c.status.as_str(), c.size.as_str(), c.name)
}

#[cfg(test)]
mod tests {
    use super::normalize_base;

    #[test]
    fn base_urls_are_normalised_like_the_sdk() {
        assert_eq!(normalize_base("http://h:8080"), "http://h:8080/api/v1");
        assert_eq!(normalize_base("http://h:8080/api/v1/"), "http://h:8080/api/v1");
        assert_eq!(normalize_base("http://h/v2"), "http://h/v2");
        assert_eq!(normalize_base("http://h/vx"), "http://h/vx/api/v1");
    }
}
