//! The AI-service contract (seed 003), as Parlor calls it:
//!
//! `POST {url}/v1/chat/next-question` with `Authorization: Bearer {key}` and
//! `{"sessionId", "templateId", "userId", "history": [{role, content, questionId?,
//! timestamp}]}` (the seed sends only `sessionId`; the rest saves the service a read of
//! `GET /api/sessions/{id}`). The service answers
//! `{"status": "in_progress", "nextQuestion": {"text", "id"?}}`, or
//! `{"status": "complete" | "completed"}` with `documentId` (the service keeps the
//! document) or `document: {title?, content, format?}` (Parlor keeps it).
//!
//! A 5xx, a timeout, a refused connection or an unreadable answer is a failure the caller
//! retries; a 4xx is a refusal it reports and does not retry on its own.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::template::MAX_DOCUMENT_BYTES;
use super::turn_json;
use crate::config::redact_url;
use crate::store::guided::GuidedSession;

/// Where a session's AI service is.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Base URL (`https://ai.example.com`); the path is appended.
    pub url: String,
    /// Sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// Longest a call may take.
    pub timeout: Duration,
}

/// A document the service finished with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The service's id for it, when it keeps it.
    pub id: Option<String>,
    /// Title.
    pub title: Option<String>,
    /// `markdown`, `html` or `text`.
    pub format: String,
    /// The text, when Parlor is to keep it.
    pub content: Option<String>,
}

/// What a call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Ask this next.
    Next {
        /// The service's id for the question, if it gave one.
        id: Option<String>,
        /// The question.
        text: String,
    },
    /// The session is done.
    Complete {
        /// Its document.
        document: Document,
    },
    /// The service refused the call (4xx).
    Rejected {
        /// The HTTP status.
        status: u16,
    },
    /// The call failed and may succeed later.
    Failed {
        /// Metric label: `server_error`, `timeout`, `unreachable`, `bad_answer`.
        label: &'static str,
        /// What happened, for the log.
        why: String,
    },
}

impl Reply {
    /// Metric label of the outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Reply::Next { .. } | Reply::Complete { .. } => "ok",
            Reply::Rejected { .. } => "client_error",
            Reply::Failed { label, .. } => label,
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(rename = "nextQuestion")]
    next_question: Option<NextQuestion>,
    #[serde(rename = "documentId")]
    document_id: Option<String>,
    document: Option<AnswerDocument>,
}

#[derive(Deserialize)]
struct NextQuestion {
    text: String,
    id: Option<Value>,
}

#[derive(Deserialize)]
struct AnswerDocument {
    id: Option<String>,
    title: Option<String>,
    content: String,
    format: Option<String>,
}

/// Asks the service what comes next in `session`.
pub async fn next_question(
    client: &reqwest::Client,
    endpoint: &Endpoint,
    session: &GuidedSession,
) -> Reply {
    let url = format!(
        "{}/v1/chat/next-question",
        endpoint.url.trim_end_matches('/')
    );
    let body = json!({
        "sessionId": session.id,
        "templateId": session.template_id,
        "userId": session.user_id,
        "history": session.turns.iter().map(turn_json).collect::<Vec<_>>(),
    });
    let mut request = client.post(&url).json(&body).timeout(endpoint.timeout);
    if let Some(key) = &endpoint.api_key {
        request = request.bearer_auth(key);
    }
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => return failure(e, &url),
    };
    let status = response.status();
    if status.is_client_error() {
        return Reply::Rejected {
            status: status.as_u16(),
        };
    }
    if !status.is_success() {
        return Reply::Failed {
            label: "server_error",
            why: format!("{} answered {status}", redact_url(&url)),
        };
    }
    let bytes = match read_capped(response, MAX_ANSWER_BYTES, &url).await {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    read(&bytes).unwrap_or_else(|why| Reply::Failed {
        label: "bad_answer",
        why: format!("{}: {why}", redact_url(&url)),
    })
}

/// Largest answer read from a service: a document and its envelope.
const MAX_ANSWER_BYTES: usize = MAX_DOCUMENT_BYTES + 64 * 1024;

/// The body, read as it arrives and given up past `max` bytes.
async fn read_capped(
    mut response: reqwest::Response,
    max: usize,
    url: &str,
) -> Result<Vec<u8>, Reply> {
    let too_large = || Reply::Failed {
        label: "bad_answer",
        why: format!("the answer is larger than {max} bytes"),
    };
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(failure(e, url)),
        }
    }
}

/// A failed request, for the log: the URL without credentials, and what went wrong.
fn failure(e: reqwest::Error, url: &str) -> Reply {
    Reply::Failed {
        label: if e.is_timeout() {
            "timeout"
        } else {
            "unreachable"
        },
        why: format!("{}: {}", redact_url(url), e.without_url()),
    }
}

/// Reads the service's answer.
fn read(bytes: &[u8]) -> Result<Reply, String> {
    let answer: Answer =
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable answer: {e}"))?;
    match answer.status.as_str() {
        "in_progress" => {
            let q = answer
                .next_question
                .ok_or("status in_progress without nextQuestion")?;
            let text = q.text.trim();
            if text.is_empty() {
                return Err("nextQuestion.text is empty".into());
            }
            let id = q.id.and_then(|v| match v {
                Value::String(s) if !s.is_empty() => Some(s),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            Ok(Reply::Next {
                id,
                text: text.to_owned(),
            })
        }
        "complete" | "completed" => {
            let document = match (answer.document, answer.document_id) {
                (Some(d), id) => {
                    if d.content.len() > MAX_DOCUMENT_BYTES {
                        return Err(format!(
                            "the document is larger than {MAX_DOCUMENT_BYTES} bytes"
                        ));
                    }
                    let format = d.format.unwrap_or_else(|| "markdown".into());
                    if !matches!(format.as_str(), "markdown" | "html" | "text") {
                        return Err(format!(
                            "document.format {format:?} is not markdown, html or text"
                        ));
                    }
                    Document {
                        id: d.id.or(id).filter(|i| valid_document_id(i)),
                        title: d.title,
                        format,
                        content: Some(d.content),
                    }
                }
                (None, Some(id)) if valid_document_id(&id) => Document {
                    id: Some(id),
                    title: None,
                    format: "markdown".into(),
                    content: None,
                },
                (None, Some(id)) => return Err(format!("documentId {id:?} is not a usable id")),
                (None, None) => return Err("a completed session names no document".into()),
            };
            Ok(Reply::Complete { document })
        }
        other => Err(format!("unknown status {other:?}")),
    }
}

/// Ids a document may have: what URLs carry without escaping.
fn valid_document_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b':' | b'@'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_the_contract_says() {
        assert_eq!(
            read(br#"{"status":"in_progress","nextQuestion":{"text":" Who? "}}"#),
            Ok(Reply::Next {
                id: None,
                text: "Who?".into()
            })
        );
        assert_eq!(
            read(br#"{"status":"completed","documentId":"doc-1"}"#),
            Ok(Reply::Complete {
                document: Document {
                    id: Some("doc-1".into()),
                    title: None,
                    format: "markdown".into(),
                    content: None
                }
            })
        );
        let kept = read(br##"{"status":"complete","document":{"title":"NDA","content":"# NDA"}}"##);
        assert!(
            matches!(kept, Ok(Reply::Complete { document }) if document.content.as_deref() == Some("# NDA"))
        );
        for bad in [
            &br#"{"status":"in_progress"}"#[..],
            br#"{"status":"in_progress","nextQuestion":{"text":""}}"#,
            br#"{"status":"complete"}"#,
            br#"{"status":"complete","documentId":"../etc"}"#,
            br#"{"status":"done"}"#,
            br#"<html>"#,
            br#"{"status":"complete","document":{"content":"x","format":"pdf"}}"#,
        ] {
            assert!(read(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
