//! The fallback chain: providers tried in order with retries and circuit breakers, then
//! the knowledge base.

use super::*;

/// Consecutive failures that open a provider's circuit.
pub(super) const BREAKER_FAILURES: u32 = 3;
/// How long an open circuit skips its provider.
pub(super) const BREAKER_OPEN: Duration = Duration::from_secs(30);
/// Longest back-off before a retry.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// One configured provider with its settings and circuit breaker.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) name: String,
    pub(super) provider: Arc<dyn Provider>,
    pub(super) model: String,
    pub(super) max_tokens: u32,
    pub(super) timeouts: Timeouts,
    pub(super) retries: u32,
    pub(super) breaker: Mutex<Breaker>,
}

#[derive(Debug, Default)]
pub(super) struct Breaker {
    pub(super) failures: u32,
    pub(super) open_until: Option<Instant>,
}

impl Slot {
    pub(super) fn is_open(&self) -> bool {
        self.breaker
            .lock()
            .open_until
            .is_some_and(|t| t > Instant::now())
    }

    pub(super) fn record(&self, ok: bool) {
        let mut b = self.breaker.lock();
        if ok {
            *b = Breaker::default();
        } else {
            b.failures += 1;
            if b.failures >= BREAKER_FAILURES {
                b.open_until = Some(Instant::now() + BREAKER_OPEN);
                b.failures = 0;
                tracing::warn!(provider = %self.name, "circuit open for 30 s after repeated failures");
            }
        }
    }
}
/// `chain` with the provider `model` asks for first (see [`AiService::generate`]), and
/// the model name to use with it.
pub(super) fn ordered_chain(chain: &[Arc<Slot>], model: Option<&str>) -> Vec<(Arc<Slot>, String)> {
    let mut ordered: Vec<(Arc<Slot>, String)> = chain
        .iter()
        .map(|s| (Arc::clone(s), s.model.clone()))
        .collect();
    let Some(wanted) = model.map(str::trim).filter(|m| !m.is_empty()) else {
        return ordered;
    };
    let kind_of = |m: &str| -> Option<&'static str> {
        let m = m.to_ascii_lowercase();
        match m.as_str() {
            "openai" => Some("openai"),
            "google" | "gemini" => Some("gemini"),
            "anthropic" | "claude" => Some("anthropic"),
            _ if m.starts_with("gpt-")
                || m.starts_with("o1")
                || m.starts_with("o3")
                || m.starts_with("o4") =>
            {
                Some("openai")
            }
            _ if m.starts_with("gemini-") => Some("gemini"),
            _ if m.starts_with("claude-") => Some("anthropic"),
            _ => None,
        }
    };
    let alias = matches!(
        wanted.to_ascii_lowercase().as_str(),
        "openai" | "google" | "gemini" | "anthropic" | "claude"
    );
    let pick = ordered
        .iter()
        .position(|(s, _)| s.name == wanted)
        .or_else(|| {
            let kind = kind_of(wanted)?;
            ordered.iter().position(|(s, _)| s.provider.kind() == kind)
        });
    if let Some(i) = pick {
        let (slot, mut m) = ordered.remove(i);
        if !alias && slot.name != wanted {
            wanted.clone_into(&mut m);
        }
        ordered.insert(0, (slot, m));
    }
    ordered
}

/// Runs the fallback chain, reporting on `tx`; returns early when `tx` is closed.
pub(super) async fn run_chain(
    bot: &Bot,
    chain: &[(Arc<Slot>, String)],
    system: Option<String>,
    turns: Vec<Turn>,
    tx: &mpsc::Sender<AiEvent>,
    meter: &Meter,
) {
    for (slot, model) in chain {
        if slot.is_open() {
            if tx
                .send(AiEvent::Fallback {
                    provider: slot.name.clone(),
                    error: "circuit_open",
                    after_text: false,
                })
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        let request = ChatRequest {
            model: model.clone(),
            system: system.clone(),
            turns: turns.clone(),
            max_tokens: slot.max_tokens,
            temperature: None,
        };
        match attempt(
            &*slot.provider,
            &slot.name,
            &request,
            slot.timeouts,
            slot.retries,
            tx,
            meter,
        )
        .await
        {
            Attempt::Done => {
                slot.record(true);
                return;
            }
            Attempt::Closed => return,
            Attempt::Failed { error, after_text } => {
                slot.record(false);
                tracing::warn!(provider = %slot.name, error = %error, "AI provider failed; falling back");
                if tx
                    .send(AiEvent::Fallback {
                        provider: slot.name.clone(),
                        error: error.label(),
                        after_text,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    if let Some(kb) = &bot.kb {
        let provider = KbProvider::new(Arc::clone(kb));
        let request = ChatRequest {
            model: "kb".to_owned(),
            system: None,
            turns,
            max_tokens: 0,
            temperature: None,
        };
        match attempt(&provider, "kb", &request, Timeouts::default(), 0, tx, meter).await {
            Attempt::Done | Attempt::Closed => return,
            Attempt::Failed { .. } => {}
        }
    }
    let _ = tx.send(AiEvent::NoAnswer).await;
}

pub(super) enum Attempt {
    Done,
    Closed,
    Failed {
        error: ProviderError,
        after_text: bool,
    },
}
/// One try of one provider.
pub(super) struct Call<'a> {
    pub(super) provider: &'a str,
    pub(super) model: &'a str,
    pub(super) started: Instant,
    pub(super) first_token: Option<Duration>,
}

/// One provider, with retries while nothing has been said. Every try is metered.
pub(super) async fn attempt(
    provider: &dyn Provider,
    name: &str,
    request: &ChatRequest,
    timeouts: Timeouts,
    retries: u32,
    tx: &mpsc::Sender<AiEvent>,
    meter: &Meter,
) -> Attempt {
    let mut tries = 0;
    loop {
        let mut call = Call {
            provider: name,
            model: &request.model,
            started: Instant::now(),
            first_token: None,
        };
        let mut sources = Vec::new();
        let result = match crate::ai::timed(provider, request, timeouts).await {
            Err(e) => Err(e),
            Ok(mut stream) => loop {
                match stream.next().await {
                    Some(Ok(Event::Sources(s))) => sources.extend(s),
                    Some(Ok(Event::Text(t))) => {
                        if call.first_token.is_none() {
                            call.first_token = Some(call.started.elapsed());
                            let started = AiEvent::Started {
                                provider: name.to_owned(),
                                model: request.model.clone(),
                            };
                            if tx.send(started).await.is_err() {
                                meter.record(&call, Usage::default(), "cancelled");
                                return Attempt::Closed;
                            }
                        }
                        if tx.send(AiEvent::Text(t)).await.is_err() {
                            meter.record(&call, Usage::default(), "cancelled");
                            return Attempt::Closed;
                        }
                    }
                    Some(Ok(Event::Finish { reason, usage })) => {
                        if call.first_token.is_none() {
                            // An empty answer is no answer.
                            break Err(ProviderError::NoAnswer);
                        }
                        meter.record(&call, usage, "ok");
                        let done = AiEvent::Done {
                            provider: name.to_owned(),
                            model: request.model.clone(),
                            reason,
                            usage,
                            sources: std::mem::take(&mut sources),
                        };
                        return if tx.send(done).await.is_err() {
                            Attempt::Closed
                        } else {
                            Attempt::Done
                        };
                    }
                    Some(Err(e)) => break Err(e),
                    None => break Err(ProviderError::Unavailable("stream ended".into())),
                }
            },
        };
        let error = match result {
            Ok(()) => return Attempt::Done,
            Err(e) => e,
        };
        meter.record(&call, Usage::default(), error.label());
        let after_text = call.first_token.is_some();
        if after_text || !error.retryable() || tries >= retries || tx.is_closed() {
            return Attempt::Failed { error, after_text };
        }
        tries += 1;
        let wait = match &error {
            ProviderError::RateLimited {
                retry_after: Some(d),
                ..
            } => (*d).min(MAX_BACKOFF),
            _ => Duration::from_millis(250 * 2u64.pow(tries.min(5))),
        };
        tracing::info!(provider = %name, error = %error, wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), "retrying AI provider");
        tokio::time::sleep(wait).await;
    }
}

pub(super) fn build_provider(p: &ProviderConfig) -> Result<Arc<dyn Provider>, ServiceError> {
    let endpoint = Endpoint {
        base_url: p
            .base_url
            .clone()
            .unwrap_or_else(|| p.kind.default_base_url().to_owned()),
        api_key: p.api_key.clone(),
    };
    let built: Result<Arc<dyn Provider>, ProviderError> = match p.kind {
        ProviderKind::Openai => OpenAi::new(endpoint).map(|c| Arc::new(c) as Arc<dyn Provider>),
        ProviderKind::Anthropic => {
            Anthropic::new(endpoint).map(|c| Arc::new(c) as Arc<dyn Provider>)
        }
        ProviderKind::Gemini => Gemini::new(endpoint).map(|c| Arc::new(c) as Arc<dyn Provider>),
    };
    built.map_err(|e| ServiceError::invalid(ErrorCode::InvalidProvider, e.to_string()))
}

/// The wire name of a finish reason.
pub fn finish_label(reason: &FinishReason) -> &str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::Other(other) => other,
    }
}
