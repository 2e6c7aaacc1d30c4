//! Server-sent events from a streaming HTTP response, with transport failures mapped to
//! [`ProviderError`].

use std::pin::Pin;

use eventsource_stream::{EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};

use super::{Event, EventStream, FinishReason, ProviderError, Usage};

/// One SSE event's `data:` (every vendor names the event inside its JSON, so the
/// `event:` line is not needed).
pub(crate) struct SseEvent {
    pub(crate) data: String,
}

/// The events of `response`'s body.
pub(crate) fn events(
    response: reqwest::Response,
) -> impl Stream<Item = Result<SseEvent, ProviderError>> + Send {
    response
        .bytes_stream()
        .eventsource()
        .map(|item| match item {
            Ok(e) => Ok(SseEvent { data: e.data }),
            Err(EventStreamError::Transport(e)) => Err(super::transport_error(&e)),
            Err(EventStreamError::Utf8(e)) => Err(ProviderError::Protocol(format!(
                "event stream is not UTF-8: {e}"
            ))),
            Err(EventStreamError::Parser(e)) => {
                Err(ProviderError::Protocol(format!("bad event stream: {e}")))
            }
        })
}

/// Parses an event's JSON `data`.
pub(crate) fn json<T: serde::de::DeserializeOwned>(
    vendor: &str,
    data: &str,
) -> Result<T, ProviderError> {
    serde_json::from_str(data).map_err(|e| {
        let sample: String = data.chars().take(120).collect();
        ProviderError::Protocol(format!("{vendor} sent an unreadable event ({e}): {sample}"))
    })
}

/// Reads one vendor's events into [`Event`]s.
pub(crate) trait Decoder: Send + 'static {
    /// Reads one SSE event: the text it adds, if any, and whether the reply is complete.
    fn step(&mut self, event: &SseEvent) -> Result<(Option<String>, bool), ProviderError>;

    /// The closing [`Event::Finish`], from what the events said. `at_eof`: the body ended
    /// without an end marker; `None` then means the reply was cut off.
    fn finish(&mut self, at_eof: bool) -> Option<Event>;
}

/// Sends a streaming request: the reply as `decoder` reads it, or the error the vendor's
/// status and body mean.
pub(crate) async fn send(
    call: reqwest::RequestBuilder,
    decoder: impl Decoder,
) -> Result<EventStream, ProviderError> {
    let response = call.send().await.map_err(|e| super::transport_error(&e))?;
    if !response.status().is_success() {
        return Err(super::error_from(response).await);
    }
    Ok(decode(response, decoder))
}

/// The reply in `response`'s event stream, as `decoder` reads it.
pub(crate) fn decode(response: reqwest::Response, decoder: impl Decoder) -> EventStream {
    struct State<D> {
        events: Pin<Box<dyn Stream<Item = Result<SseEvent, ProviderError>> + Send>>,
        decoder: D,
        /// The reply is complete: [`Event::Finish`] comes next.
        complete: bool,
        /// Nothing more to yield.
        done: bool,
    }
    let state = State {
        events: Box::pin(events(response)),
        decoder,
        complete: false,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if s.done {
                return None;
            }
            if s.complete {
                s.done = true;
                let finish = s.decoder.finish(false).unwrap_or(Event::Finish {
                    reason: FinishReason::Stop,
                    usage: Usage::default(),
                });
                return Some((Ok(finish), s));
            }
            let step = match s.events.next().await {
                None => {
                    s.done = true;
                    let end = s.decoder.finish(true).ok_or_else(|| {
                        ProviderError::Unavailable(
                            "the reply stopped before its end (connection cut)".into(),
                        )
                    });
                    return Some((end, s));
                }
                Some(event) => event.and_then(|e| s.decoder.step(&e)),
            };
            match step {
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
                Ok((text, complete)) => {
                    s.complete = complete;
                    if let Some(text) = text.filter(|t| !t.is_empty()) {
                        return Some((Ok(Event::Text(text)), s));
                    }
                }
            }
        }
    }))
}
