//! A Confluent Schema Registry client: the two REST calls ibstream needs, by hand.
//!
//! - register: `POST /subjects/{subject}/versions` `{"schema": "..."}` → `{"id": N}`
//!   (idempotent: registering an existing schema returns its id);
//! - look up: `POST /subjects/{subject}` `{"schema": "..."}` → `{"id": N, ...}`, 404 when the
//!   subject or the schema is not registered.
//!
//! Ids are cached per (subject, schema). Subjects follow the TopicNameStrategy:
//! `<topic>-value`. Basic auth and a private CA (`ca_file`) are supported.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{json, Value};

use crate::config::{expose, ConfigError, SchemaRegistryConfig};

/// Errors of registry calls.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The schema is not registered under the subject and `auto_register` is off.
    #[error("schema registry {url}: no schema registered under subject {subject} matches ours; register it (`ibstream schemas register`) or set schema_registry.auto_register = true")]
    NotRegistered {
        /// Registry URL.
        url: String,
        /// The subject.
        subject: String,
    },
    /// The registry refused the schema (e.g. incompatible with the subject's latest version).
    #[error("schema registry {url} refused the schema for {subject} (HTTP {status}): {message}")]
    Refused {
        /// Registry URL.
        url: String,
        /// The subject.
        subject: String,
        /// HTTP status.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// The registry could not be reached or answered garbage.
    #[error("schema registry {url} failed: {message}")]
    Unavailable {
        /// Registry URL.
        url: String,
        /// What happened.
        message: String,
    },
}

/// A Schema Registry client with an id cache.
pub struct SchemaRegistry {
    http: reqwest::Client,
    url: String,
    username: Option<String>,
    password: Option<SecretString>,
    auto_register: bool,
    cache: Mutex<HashMap<(String, String), u32>>,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("auto_register", &self.auto_register)
            .finish_non_exhaustive()
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The largest registry answer read: an id or an error message is a few hundred bytes.
const MAX_ANSWER_BYTES: u64 = 1 << 20;

impl SchemaRegistry {
    /// Builds the client (reads `password_file` and `ca_file`; no network).
    pub fn build(config: &SchemaRegistryConfig) -> Result<SchemaRegistry, ConfigError> {
        config.validate()?;
        let mut builder =
            crate::net::client_builder().timeout(Duration::from_secs(config.request_timeout_secs));
        if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|source| ConfigError::SecretFile {
                key: "schema_registry.ca_file",
                path: path.clone(),
                source,
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| ConfigError::Invalid {
                key: "schema_registry.ca_file",
                reason: format!("is not a PEM certificate: {e}"),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| ConfigError::Invalid {
            key: "schema_registry",
            reason: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(SchemaRegistry {
            http,
            url: config.url.trim_end_matches('/').to_owned(),
            username: config.username.clone(),
            password: config.resolve_password()?,
            auto_register: config.auto_register,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Returns the id of `schema` under `subject`: registered if `auto_register`, else looked
    /// up (and an error if absent). Cached.
    pub async fn id_for(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let key = (subject.to_owned(), schema.to_owned());
        if let Some(id) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(*id);
        }
        let id = if self.auto_register {
            self.register(subject, schema).await?
        } else {
            self.lookup(subject, schema).await?
        };
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key, id);
        Ok(id)
    }

    /// Registers `schema` under `subject` and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let path = format!("/subjects/{}/versions", encode_segment(subject));
        match self.post(&path, schema).await? {
            (200, body) => parse_id(&self.url, &body),
            (status, body) => Err(RegistryError::Refused {
                url: self.url.clone(),
                subject: subject.to_owned(),
                status,
                message: message_of(&body),
            }),
        }
    }

    /// Looks `schema` up under `subject` and returns its id.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let path = format!("/subjects/{}", encode_segment(subject));
        match self.post(&path, schema).await? {
            (200, body) => parse_id(&self.url, &body),
            (404, _) => Err(RegistryError::NotRegistered {
                url: self.url.clone(),
                subject: subject.to_owned(),
            }),
            (status, body) => Err(RegistryError::Refused {
                url: self.url.clone(),
                subject: subject.to_owned(),
                status,
                message: message_of(&body),
            }),
        }
    }

    /// Returns the schema registered under `id` (`GET /schemas/ids/{id}`), as its JSON text:
    /// what a consumer of Confluent-framed values reads them with.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        let request = self
            .http
            .get(format!("{}/schemas/ids/{id}", self.url))
            .header("Accept", CONTENT_TYPE);
        match self.send(request).await? {
            (200, body) => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("schema").and_then(Value::as_str).map(str::to_owned))
                .ok_or_else(|| RegistryError::Unavailable {
                    url: self.url.clone(),
                    message: format!("answer has no schema: {}", message_of(&body)),
                }),
            (status, body) => Err(RegistryError::Refused {
                url: self.url.clone(),
                subject: format!("schema id {id}"),
                status,
                message: message_of(&body),
            }),
        }
    }

    async fn post(&self, path: &str, schema: &str) -> Result<(u16, Vec<u8>), RegistryError> {
        let request = self
            .http
            .post(format!("{}{path}", self.url))
            .header("Content-Type", CONTENT_TYPE)
            .header("Accept", CONTENT_TYPE)
            .body(json!({ "schema": schema }).to_string());
        self.send(request).await
    }

    async fn send(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), RegistryError> {
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            request = request.basic_auth(user, Some(expose(password)));
        }
        let unavailable = |e: reqwest::Error| RegistryError::Unavailable {
            url: self.url.clone(),
            message: e.without_url().to_string(),
        };
        let response = request.send().await.map_err(unavailable)?;
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            return Err(RegistryError::Unavailable {
                url: self.url.clone(),
                message: crate::net::redirect_message(&response),
            });
        }
        let body = crate::net::read_body(response, MAX_ANSWER_BYTES, "the registry's answers")
            .await
            .map_err(|e| RegistryError::Unavailable {
                url: self.url.clone(),
                message: match e {
                    crate::net::BodyError::Read(e) => e.without_url().to_string(),
                    other => other.to_string(),
                },
            })?;
        if status == 401 || status == 403 {
            return Err(RegistryError::Unavailable {
                url: self.url.clone(),
                message: format!(
                    "HTTP {status}: check schema_registry.username and password ({})",
                    message_of(&body)
                ),
            });
        }
        Ok((status, body))
    }
}

fn parse_id(url: &str, body: &[u8]) -> Result<u32, RegistryError> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("id").and_then(Value::as_u64))
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| RegistryError::Unavailable {
            url: url.to_owned(),
            message: format!("answer has no schema id: {}", message_of(body)),
        })
}

fn message_of(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or(text)
}

/// Percent-encodes a path segment (subjects may hold characters URLs reserve).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Returns the subject of a topic's values (TopicNameStrategy).
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}
