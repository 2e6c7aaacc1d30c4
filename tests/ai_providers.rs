//! Each AI provider client against a local fake server speaking that vendor's exact
//! streaming wire format: the deltas and usage read, the request sent, error bodies, 429
//! with `Retry-After`, a stall before the first token, a connection cut mid-stream, an
//! error event mid-stream, and cancellation (the fake sees the client hang up).
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "common/fake_ai.rs"]
mod fake_ai;

use std::time::Duration;

use fake_ai::{FakeVendor, Reply};
use futures_util::StreamExt;
use parlor::ai::{
    ChatRequest, Endpoint, Event, FinishReason, Provider, ProviderError, Speaker, Stage, Timeouts,
    Turn, Usage, anthropic::Anthropic, gemini::Gemini, openai::OpenAi, timed,
};
use parlor::config::Secret;

const KEY: &str = "sk-test-key-0123456789";

#[derive(Debug, Clone, Copy)]
enum Vendor {
    OpenAi,
    Anthropic,
    Gemini,
}

const VENDORS: [Vendor; 3] = [Vendor::OpenAi, Vendor::Anthropic, Vendor::Gemini];

impl Vendor {
    fn provider(self, fake: &FakeVendor) -> Box<dyn Provider> {
        let base = match self {
            Vendor::OpenAi => fake.url("/v1"),
            Vendor::Anthropic | Vendor::Gemini => fake.url(""),
        };
        let endpoint = Endpoint {
            base_url: base,
            api_key: Some(Secret::new(KEY)),
        };
        match self {
            Vendor::OpenAi => Box::new(OpenAi::new(endpoint).unwrap()),
            Vendor::Anthropic => Box::new(Anthropic::new(endpoint).unwrap()),
            Vendor::Gemini => Box::new(Gemini::new(endpoint).unwrap()),
        }
    }

    fn stream(self, texts: &[&str], usage: (u64, u64), end: bool) -> Vec<String> {
        match self {
            Vendor::OpenAi => fake_ai::openai_stream(texts, usage, end),
            Vendor::Anthropic => fake_ai::anthropic_stream(texts, usage, end),
            Vendor::Gemini => fake_ai::gemini_stream(texts, usage, end),
        }
    }

    fn error(self, status: u16, message: &str) -> String {
        match self {
            Vendor::OpenAi => fake_ai::openai_error(message, "rate_limit_exceeded"),
            Vendor::Anthropic => fake_ai::anthropic_error(message, "rate_limit_error"),
            Vendor::Gemini => fake_ai::gemini_error(status, message, "RESOURCE_EXHAUSTED"),
        }
    }

    fn model(self) -> &'static str {
        match self {
            Vendor::OpenAi => "gpt-4o-mini",
            Vendor::Anthropic => "claude-sonnet-4-5",
            Vendor::Gemini => "gemini-2.5-flash",
        }
    }
}

fn request(vendor: Vendor) -> ChatRequest {
    ChatRequest {
        model: vendor.model().to_owned(),
        system: Some("You are Acme's support assistant.".into()),
        turns: vec![
            Turn {
                speaker: Speaker::User,
                text: "Hi".into(),
            },
            Turn {
                speaker: Speaker::Assistant,
                text: "Hello! How can I help?".into(),
            },
            Turn {
                speaker: Speaker::User,
                text: "Where is my order?".into(),
            },
        ],
        max_tokens: 256,
        temperature: None,
    }
}

fn quick() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        first_token: Duration::from_millis(400),
        total: Duration::from_secs(10),
    }
}

/// Everything the stream yields, up to and including the first error.
async fn collect(
    provider: &dyn Provider,
    req: &ChatRequest,
) -> (Vec<Event>, Option<ProviderError>) {
    let mut stream = match timed(provider, req, quick()).await {
        Ok(s) => s,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(e) => events.push(e),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

fn texts(events: &[Event]) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Text(t) => Some(t.as_str()),
            Event::Sources(_) | Event::Finish { .. } => None,
        })
        .collect()
}

#[tokio::test]
async fn each_vendor_streams_deltas_then_the_finish_with_usage() {
    for vendor in VENDORS {
        let fake = FakeVendor::start(vec![Reply::stream(vendor.stream(
            &["Your order ", "ships ", "today."],
            (42, 7),
            true,
        ))])
        .await;
        let provider = vendor.provider(&fake);
        let (events, error) = collect(&*provider, &request(vendor)).await;
        assert_eq!(error, None, "{vendor:?}");
        assert_eq!(
            events,
            vec![
                Event::Text("Your order ".into()),
                Event::Text("ships ".into()),
                Event::Text("today.".into()),
                Event::Finish {
                    reason: FinishReason::Stop,
                    usage: Usage {
                        prompt_tokens: 42,
                        completion_tokens: 7
                    }
                }
            ],
            "{vendor:?}"
        );

        // What the vendor was asked, in its own terms.
        let received = fake.received();
        assert_eq!(received.len(), 1);
        let r = &received[0];
        let b = &r.body;
        match vendor {
            Vendor::OpenAi => {
                assert_eq!(r.path_and_query, "/v1/chat/completions");
                assert_eq!(r.headers["authorization"], format!("Bearer {KEY}"));
                assert_eq!(b["model"], "gpt-4o-mini");
                assert_eq!(b["stream"], true);
                assert_eq!(b["stream_options"]["include_usage"], true);
                assert_eq!(b["messages"][0]["role"], "system");
                assert_eq!(b["messages"][2]["role"], "assistant");
                assert_eq!(b["messages"][3]["content"], "Where is my order?");
                assert_eq!(b["max_tokens"], 256);
            }
            Vendor::Anthropic => {
                assert_eq!(r.path_and_query, "/v1/messages");
                assert_eq!(r.headers["x-api-key"], KEY);
                assert_eq!(r.headers["anthropic-version"], "2023-06-01");
                assert_eq!(b["system"], "You are Acme's support assistant.");
                assert_eq!(b["messages"].as_array().unwrap().len(), 3);
                assert_eq!(b["messages"][1]["role"], "assistant");
                assert_eq!(b["max_tokens"], 256);
                assert_eq!(b["stream"], true);
            }
            Vendor::Gemini => {
                assert_eq!(
                    r.path_and_query,
                    "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
                );
                assert_eq!(r.headers["x-goog-api-key"], KEY);
                assert_eq!(
                    b["systemInstruction"]["parts"][0]["text"],
                    "You are Acme's support assistant."
                );
                assert_eq!(b["contents"][1]["role"], "model");
                assert_eq!(b["contents"][2]["parts"][0]["text"], "Where is my order?");
                assert_eq!(b["generationConfig"]["maxOutputTokens"], 256);
            }
        }
        assert!(
            !r.path_and_query.contains(KEY),
            "{vendor:?}: the key must not travel in the URL"
        );
    }
}

#[tokio::test]
async fn a_429_carries_retry_after_and_the_vendors_message() {
    for vendor in VENDORS {
        let fake = FakeVendor::start(vec![Reply::Error {
            status: 429,
            headers: vec![("retry-after", "7".into())],
            body: vendor.error(429, "Rate limit reached for requests"),
        }])
        .await;
        let (events, error) = collect(&*vendor.provider(&fake), &request(vendor)).await;
        assert!(events.is_empty());
        let error = error.expect("an error");
        assert_eq!(
            error,
            ProviderError::RateLimited {
                retry_after: Some(Duration::from_secs(7)),
                message: "Rate limit reached for requests".into()
            },
            "{vendor:?}"
        );
        assert!(error.retryable());
    }
}

#[tokio::test]
async fn server_errors_are_retryable_and_refusals_are_not() {
    for vendor in VENDORS {
        let fake = FakeVendor::start(vec![
            Reply::Error {
                status: 529,
                headers: vec![],
                body: vendor.error(529, "Overloaded"),
            },
            Reply::Error {
                status: 500,
                headers: vec![],
                body: "<html>upstream exploded</html>".into(),
            },
            Reply::Error {
                status: 401,
                headers: vec![],
                body: vendor.error(401, "Incorrect API key provided"),
            },
        ])
        .await;
        let provider = vendor.provider(&fake);
        let (_, e) = collect(&*provider, &request(vendor)).await;
        let e = e.unwrap();
        assert!(e.retryable(), "{vendor:?} 529: {e:?}");
        assert!(e.to_string().contains("Overloaded"), "{e}");
        let (_, e) = collect(&*provider, &request(vendor)).await;
        let e = e.unwrap();
        assert!(
            matches!(e, ProviderError::Unavailable(ref m) if m.contains("upstream exploded")),
            "{e:?}"
        );
        let (_, e) = collect(&*provider, &request(vendor)).await;
        assert_eq!(
            e.unwrap(),
            ProviderError::Rejected {
                status: 401,
                message: "Incorrect API key provided".into()
            },
            "{vendor:?}"
        );
    }
}

#[tokio::test]
async fn a_stall_before_the_first_token_times_out() {
    for vendor in VENDORS {
        let mut pieces = vendor.stream(&["late"], (1, 1), true);
        // The headers come at once, the first event only after 2 s.
        let first = pieces.remove(0);
        let mut timed_pieces = vec![(Duration::from_secs(2), first)];
        timed_pieces.extend(pieces.into_iter().map(|p| (Duration::ZERO, p)));
        let fake = FakeVendor::start(vec![Reply::Stream {
            pieces: timed_pieces,
            cut: false,
        }])
        .await;
        let started = std::time::Instant::now();
        let (events, error) = collect(&*vendor.provider(&fake), &request(vendor)).await;
        assert!(events.is_empty(), "{vendor:?}: {events:?}");
        assert_eq!(
            error,
            Some(ProviderError::Timeout {
                stage: Stage::FirstToken
            }),
            "{vendor:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert!(
            fake.wait_hung_up(1).await,
            "{vendor:?}: the upstream request was not dropped"
        );
    }
}

#[tokio::test]
async fn a_connection_cut_mid_stream_is_an_error_after_the_text_so_far() {
    for vendor in VENDORS {
        let fake = FakeVendor::start(vec![Reply::Stream {
            pieces: vendor
                .stream(&["Half ", "an answer"], (5, 5), false)
                .into_iter()
                .map(|p| (Duration::ZERO, p))
                .collect(),
            cut: true,
        }])
        .await;
        let (events, error) = collect(&*vendor.provider(&fake), &request(vendor)).await;
        assert_eq!(texts(&events), "Half an answer", "{vendor:?}");
        assert!(
            !events.iter().any(|e| matches!(e, Event::Finish { .. })),
            "{vendor:?}"
        );
        let error = error.expect("a cut stream ends in an error");
        assert!(error.retryable(), "{vendor:?}: {error:?}");
    }
}

#[tokio::test]
async fn a_body_that_ends_without_its_end_marker_counts_as_cut() {
    for vendor in VENDORS {
        let fake =
            FakeVendor::start(vec![Reply::stream(vendor.stream(&["Half"], (5, 5), false))]).await;
        let (events, error) = collect(&*vendor.provider(&fake), &request(vendor)).await;
        assert_eq!(texts(&events), "Half", "{vendor:?}");
        assert!(
            matches!(error, Some(ProviderError::Unavailable(_))),
            "{vendor:?}: {error:?}"
        );
    }
}

#[tokio::test]
async fn an_error_event_mid_stream_fails_the_reply() {
    let mut pieces = fake_ai::anthropic_stream(&["Let me "], (3, 1), false);
    pieces.push(format!(
        "event: error\ndata: {}\n\n",
        fake_ai::anthropic_error("Overloaded", "overloaded_error")
    ));
    let fake = FakeVendor::start(vec![Reply::stream(pieces)]).await;
    let (events, error) = collect(
        &*Vendor::Anthropic.provider(&fake),
        &request(Vendor::Anthropic),
    )
    .await;
    assert_eq!(texts(&events), "Let me ");
    assert_eq!(
        error,
        Some(ProviderError::Unavailable(
            "overloaded_error: Overloaded".into()
        ))
    );

    let mut pieces = fake_ai::openai_stream(&["Let me "], (3, 1), false);
    pieces.push(format!(
        "data: {}\n\n",
        fake_ai::openai_error("server had an error", "server_error")
    ));
    let fake = FakeVendor::start(vec![Reply::stream(pieces)]).await;
    let (events, error) = collect(&*Vendor::OpenAi.provider(&fake), &request(Vendor::OpenAi)).await;
    assert_eq!(texts(&events), "Let me ");
    assert!(
        matches!(&error, Some(ProviderError::Unavailable(m)) if m.contains("server had an error")),
        "{error:?}"
    );

    // Garbage where JSON belongs is a protocol error, not a panic or a silent stop.
    let fake = FakeVendor::start(vec![Reply::stream(vec!["data: {not json\n\n".into()])]).await;
    let (_, error) = collect(&*Vendor::Gemini.provider(&fake), &request(Vendor::Gemini)).await;
    assert!(
        matches!(error, Some(ProviderError::Protocol(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn dropping_the_stream_hangs_up_on_the_vendor() {
    for vendor in VENDORS {
        let pieces: Vec<(Duration, String)> = vendor
            .stream(&["one ", "two ", "three ", "four"], (1, 4), true)
            .into_iter()
            .map(|p| (Duration::from_millis(200), p))
            .collect();
        let fake = FakeVendor::start(vec![Reply::Stream { pieces, cut: false }]).await;
        let provider = vendor.provider(&fake);
        let mut stream = timed(&*provider, &request(vendor), Timeouts::default())
            .await
            .unwrap();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first, Event::Text("one ".into()), "{vendor:?}");
        assert_eq!(fake.hung_up(), 0);
        drop(stream);
        assert!(
            fake.wait_hung_up(1).await,
            "{vendor:?}: the vendor did not see the request dropped"
        );
    }
}

#[tokio::test]
async fn an_unreachable_vendor_is_unavailable_not_a_hang() {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let provider = OpenAi::new(Endpoint {
        base_url: format!("http://{addr}/v1"),
        api_key: None,
    })
    .unwrap();
    let (_, error) = collect(&provider, &request(Vendor::OpenAi)).await;
    assert!(
        matches!(error, Some(ProviderError::Unavailable(_))),
        "{error:?}"
    );
}
