//! The error classes of docs/crm-api.md ("Errors the client must tell apart").

use std::time::Duration;

/// Why a CRM call failed, in the classes the poll loop acts on differently.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CrmError {
    /// Login was refused, or a call was refused again right after a fresh login.
    /// Fatal for the source: the credentials or the API key need fixing.
    #[error("crm authentication failed at {url}: {reason}")]
    Auth {
        /// The URL called (no secrets in it).
        url: String,
        /// What the CRM answered and what to check.
        reason: String,
    },
    /// HTTP 403 on a data call made with a token just issued (by the call's own login at most
    /// [`crate::crm::client::JUST_ISSUED`] before the attempt) or after the call's one login
    /// again (a 403 to an older token first logs in again once, as some CRMs answer an expired
    /// token with 403): the role lacks "IB Reports" or the endpoint's module is off. Fatal for
    /// that stream only.
    #[error("crm denied {endpoint} (HTTP 403): {}; CRM says: {message}", kind.hint(module))]
    Forbidden {
        /// Endpoint path segment (`leads`, `positions`, …).
        endpoint: String,
        /// The CRM module the endpoint depends on.
        module: &'static str,
        /// Missing permission or module off, as far as the answer tells.
        kind: ForbiddenKind,
        /// The CRM's message (truncated).
        message: String,
    },
    /// HTTP 400 or another 4xx: the request itself is wrong (a bug in ibstream, or a wrong
    /// `crm.api_path`). Not retried.
    #[error("crm rejected the request {url} (HTTP {status}): {message}")]
    BadRequest {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The CRM's message (truncated).
        message: String,
    },
    /// Still HTTP 429 after every retry (each waited for its `Retry-After`, at most
    /// [`crate::crm::client::MAX_RETRY_AFTER`], with every other call of the process).
    #[error("crm rate limit still exceeded at {url} after {attempts} attempts")]
    RateLimited {
        /// The URL called.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last `Retry-After` seen.
        retry_after: Option<Duration>,
    },
    /// 5xx, timeout, connection failure or garbled answer, still failing after every retry.
    /// Garbled includes a 2xx that is not the data: an envelope reporting an error
    /// (`"success": false`, `"status": "error"`, an `errors` member, …), an HTML page, a body
    /// that is not JSON or cannot be decompressed. The cycle fails (no window completes); the
    /// next cycle tries again.
    #[error("crm request {url} failed after {attempts} attempts: {message}")]
    Transient {
        /// The URL called.
        url: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        message: String,
    },
    /// An answer ibstream will not use: a redirect (none is followed, so credentials never
    /// reach another address) or a body above `crm.max_response_bytes`. Not retried.
    #[error("crm answer from {url} not used: {message}")]
    Unusable {
        /// The URL called.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// The pages of one window did not end within their bound (a CRM whose `total` keeps
    /// growing, or whose pages never run short). The cycle fails; the next one tries again.
    #[error("crm paging of {url} did not end: {reason}")]
    Paging {
        /// The query (first page's URL).
        url: String,
        /// What was seen.
        reason: String,
    },
}

/// What a 403 most likely means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForbiddenKind {
    /// The CRM said a permission is missing (the role lacks "IB Reports").
    PermissionMissing,
    /// The CRM said the endpoint's module is off.
    ModuleOff,
    /// The answer does not tell which.
    Unknown,
}

impl ForbiddenKind {
    /// Classifies a 403 answer body.
    pub fn from_message(message: &str) -> Self {
        let lower = message.to_ascii_lowercase();
        if lower.contains("module") {
            ForbiddenKind::ModuleOff
        } else if lower.contains("permission") || lower.contains("role") {
            ForbiddenKind::PermissionMissing
        } else {
            ForbiddenKind::Unknown
        }
    }

    fn hint(self, module: &str) -> String {
        match self {
            ForbiddenKind::PermissionMissing => {
                "the CRM user's role lacks the \"IB Reports\" permission (Settings > System > User Management > Roles)".to_owned()
            }
            ForbiddenKind::ModuleOff => format!("the CRM's {module} module is off for this brand"),
            ForbiddenKind::Unknown => format!(
                "the role lacks the \"IB Reports\" permission or the CRM's {module} module is off"
            ),
        }
    }
}

impl CrmError {
    /// Returns whether a later cycle may succeed without anyone changing the CRM setup.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CrmError::Transient { .. } | CrmError::RateLimited { .. } | CrmError::Paging { .. }
        )
    }
}
