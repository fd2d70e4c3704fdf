//! HTTP helpers shared by the CRM and Schema Registry clients.
//!
//! Both clients follow no redirect: reqwest would otherwise follow one to another host and
//! send it the `X-Api-Key` and `X-Auth-Token` headers (and a 307 on login would re-send the
//! password). A 3xx answer is an error naming where it pointed. Answer bodies are read up to
//! a size limit, so a broken or hostile server cannot make the process allocate without end.

use reqwest::header::LOCATION;
use reqwest::Response;

/// Builds an HTTP client builder that follows no redirect.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none())
}

/// Why an answer body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body is larger than the limit.
    #[error("the answer is larger than {limit} bytes ({key})")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
        /// The configuration key that sets it.
        key: &'static str,
    },
    /// Reading failed (connection reset, timeout).
    #[error(transparent)]
    Read(#[from] reqwest::Error),
}

/// Reads a response's body, failing as soon as it exceeds `limit` bytes.
pub async fn read_body(
    mut response: Response,
    limit: u64,
    key: &'static str,
) -> Result<Vec<u8>, BodyError> {
    let too_large = BodyError::TooLarge { limit, key };
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Describes a redirect answer: its status and where it pointed.
pub fn redirect_message(response: &Response) -> String {
    let target = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(no Location)");
    format!(
        "HTTP {} redirect to {target} not followed (ibstream follows no redirect, so no credential is sent elsewhere); configure the final address",
        response.status().as_u16()
    )
}
