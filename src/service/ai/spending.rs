//! What a call may spend: per-address and per-visitor limits, the domain's daily token
//! budget and running calls, and the meter that records each call's usage.

use super::*;

impl AiService {
    /// Meters calls made for `domain` (in `room`, asked by `user`, let in by `admitted`).
    pub(super) fn meter(
        &self,
        domain: &str,
        room: Option<&RoomKey>,
        user: Option<&str>,
        admitted: Admitted,
    ) -> Meter {
        Meter {
            admitted: Arc::new(admitted),
            spending: Arc::clone(&self.spending),
            store: Arc::clone(self.chat.store()),
            metrics: Arc::clone(&self.metrics),
            spent: Arc::clone(&self.spent),
            shared: self.shared.clone(),
            domain: domain.to_owned(),
            room: room.map(|r| r.room_id.to_string()),
            user: user.map(str::to_owned),
            supervisor: self.supervisor.clone(),
        }
    }

    /// Whether `user` (a visitor when `visitor`, asking from `address`) of `domain` may ask
    /// now: the address's requests and tokens per minute, the visitor's questions per
    /// minute, the domain's daily token budget and its calls running at once. What lets it
    /// in goes with the call ([`Admitted`]).
    pub(super) async fn admit(
        &self,
        bot: &Bot,
        domain: &str,
        user: &str,
        visitor: bool,
        address: Option<std::net::IpAddr>,
    ) -> Result<Admitted, ServiceError> {
        let address = address.filter(|_| visitor);
        if let Some(ip) = address {
            Box::pin(self.spending.admit_address(ip, &self.shared)).await?;
        }
        if visitor {
            let rate = bot.config.visitor_messages_per_minute.max(1);
            let mut entry = self
                .visitor_limits
                .entry(domain.to_owned())
                .or_insert_with(|| {
                    (
                        rate,
                        RateLimiter::keyed(Quota::per_minute(
                            NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
                        )),
                    )
                });
            if entry.0 != rate {
                *entry = (
                    rate,
                    RateLimiter::keyed(Quota::per_minute(
                        NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN),
                    )),
                );
            }
            // Visitors who went quiet are forgotten, so the map follows the active ones.
            if entry.1.len() > 10_000 {
                entry.1.retain_recent();
            }
            let local = entry
                .1
                .check_key(&user.to_owned())
                .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()));
            drop(entry);
            let checked = match local {
                // Boxed, like the counter below: the Redis call's future would otherwise sit in
                // every connection's task, used or not.
                Ok(()) => {
                    Box::pin(self.shared.take(
                        "ai-visitor",
                        &format!("{domain}/{user}"),
                        Rate::per_minute(rate),
                    ))
                    .await
                }
                Err(wait) => Err(wait),
            };
            if let Err(wait) = checked {
                return Err(ServiceError::Limited {
                    code: ErrorCode::RateLimited,
                    message: format!(
                        "more than {rate} questions to the assistant per minute; slow down"
                    ),
                    retry_after: wait,
                });
            }
        }
        self.within_daily_budget(bot, domain).await?;
        let running = self.spending.start_call(domain)?;
        Ok(Admitted {
            address,
            _running: running,
        })
    }

    /// The daily token budget of `domain`'s assistant, if it has an assistant and a budget.
    pub async fn daily_token_budget(&self, domain: &str) -> Option<u64> {
        self.bot(domain).await?.config.daily_token_budget
    }

    /// Whether `domain` has tokens left of its daily budget (if it has one).
    pub(super) async fn within_daily_budget(
        &self,
        bot: &Bot,
        domain: &str,
    ) -> Result<(), ServiceError> {
        let Some(budget) = bot.config.daily_token_budget else {
            return Ok(());
        };
        let now = chrono::Utc::now();
        let today = now.date_naive();
        let midnight = today.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
        // What the store holds for today (other nodes, restarts).
        let stored = || async {
            let used: u64 = self
                .chat
                .store()
                .usage(
                    domain,
                    midnight,
                    now + chrono::Duration::days(1),
                    UsageGrouping::Day,
                )
                .await?
                .iter()
                .map(|g| g.prompt_tokens + g.completion_tokens)
                .sum();
            Ok::<u64, ServiceError>(used)
        };
        // With several nodes the count is the cluster's, kept in Redis; this node's own
        // count stands in when Redis does not answer.
        let cluster = if self.shared.is_cluster() {
            Box::pin(
                self.shared
                    .counter(&day_key(domain, today), DAY_COUNTER_TTL, async {
                        stored().await.ok()
                    }),
            )
            .await
        } else {
            None
        };
        if cluster.is_none() && self.spent.get(domain).is_none_or(|s| s.day != today) {
            let used = stored().await?;
            self.spent.insert(
                domain.to_owned(),
                DaySpend {
                    day: today,
                    tokens: used,
                },
            );
        }
        let used = cluster.unwrap_or_else(|| self.spent.get(domain).map_or(0, |s| s.tokens));
        if used >= budget {
            let tomorrow = (today + chrono::Duration::days(1))
                .and_hms_opt(0, 0, 0)
                .unwrap_or_default()
                .and_utc();
            return Err(ServiceError::Limited {
                code: ErrorCode::BudgetExceeded,
                message: format!("this domain used its {budget} AI tokens for today"),
                retry_after: (tomorrow - now).to_std().unwrap_or(Duration::from_secs(60)),
            });
        }
        Ok(())
    }
}

/// Where a generation's provider calls are recorded: usage rows, metrics, the domain's
/// daily token count.
#[derive(Debug, Clone)]
pub struct Meter {
    /// What let the call in: the visitor's address (charged the tokens) and the domain's
    /// running-call place, given back when the call ends.
    pub(super) admitted: Arc<Admitted>,
    pub(super) spending: Arc<Spending>,
    pub(super) store: Arc<dyn Store>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) spent: Arc<DashMap<String, DaySpend>>,
    pub(super) shared: Shared,
    pub(super) domain: String,
    pub(super) room: Option<String>,
    pub(super) user: Option<String>,
    pub(super) supervisor: Supervisor,
}

/// What lets one AI call in (see [`AiService::admit`]): the asking visitor's address, which
/// is charged the call's tokens, and the call's place among its domain's running calls.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) address: Option<std::net::IpAddr>,
    pub(super) _running: tokio::sync::OwnedSemaphorePermit,
}

/// What callers without an account may make the assistant spend, per address (an IPv6
/// address by its /64): requests per minute (across the cluster, like the other per-address
/// limits) and tokens per minute (on each node), and how many calls each domain may have
/// running at once. A token-less caller is a new visitor on every request, so these, not
/// the per-visitor limit, are what bound the bill a stranger can run up.
#[derive(Debug)]
pub(super) struct Spending {
    pub(super) requests: DefaultKeyedRateLimiter<std::net::IpAddr>,
    pub(super) requests_per_minute: u32,
    /// Tokens each address spent in its current one-minute window (window start, tokens).
    pub(super) tokens: DashMap<std::net::IpAddr, (Instant, u64)>,
    pub(super) tokens_per_minute: u64,
    /// Calls running per domain.
    pub(super) running: DashMap<String, Arc<tokio::sync::Semaphore>>,
    pub(super) max_running: usize,
    /// Where each visitor on this node last wrote from (`domain/user`), with when it was
    /// noted, so that the bot's replies in rooms are charged to an address too.
    pub(super) visitors: DashMap<String, (std::net::IpAddr, Instant)>,
}

/// The length of a per-address token window.
pub(super) const TOKEN_WINDOW: Duration = Duration::from_secs(60);
/// How long a visitor's address is remembered after it was last noted.
pub(super) const VISITOR_ADDRESS_TTL: Duration = Duration::from_secs(3600);

impl Spending {
    pub(super) fn new(limits: &crate::config::Limits) -> Self {
        let rate = NonZeroU32::new(limits.ip_ai_requests_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            requests: RateLimiter::keyed(Quota::per_minute(rate)),
            requests_per_minute: rate.get(),
            tokens: DashMap::new(),
            tokens_per_minute: limits.ip_ai_tokens_per_minute,
            running: DashMap::new(),
            max_running: limits.ai_calls_per_domain,
            visitors: DashMap::new(),
        }
    }

    /// Charges one request to `ip` and checks its tokens this minute.
    pub(super) async fn admit_address(
        &self,
        ip: std::net::IpAddr,
        shared: &Shared,
    ) -> Result<(), ServiceError> {
        let ip = crate::transport::edge::ip_key(ip);
        let now = Instant::now();
        if let Some(window) = self.tokens.get(&ip)
            && now.duration_since(window.0) < TOKEN_WINDOW
            && window.1 >= self.tokens_per_minute
        {
            let per_minute = self.tokens_per_minute;
            return Err(ServiceError::Limited {
                code: ErrorCode::RateLimited,
                message: format!(
                    "questions from this address used their {per_minute} AI tokens for this minute; slow down"
                ),
                retry_after: TOKEN_WINDOW.saturating_sub(now.duration_since(window.0)),
            });
        }
        let rate = self.requests_per_minute;
        let local = self
            .requests
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()));
        let checked = match local {
            Ok(()) => {
                shared
                    .take("ai-address", &ip.to_string(), Rate::per_minute(rate))
                    .await
            }
            Err(wait) => Err(wait),
        };
        checked.map_err(|wait| ServiceError::Limited {
            code: ErrorCode::RateLimited,
            message: format!(
                "more than {rate} questions to the assistant per minute from this address; slow down"
            ),
            retry_after: wait,
        })
    }

    /// Adds a call's tokens to `ip`'s minute.
    pub(super) fn spent(&self, ip: std::net::IpAddr, tokens: u64) {
        let ip = crate::transport::edge::ip_key(ip);
        let now = Instant::now();
        let mut window = self.tokens.entry(ip).or_insert((now, 0));
        if now.duration_since(window.0) >= TOKEN_WINDOW {
            *window = (now, 0);
        }
        window.1 += tokens;
    }

    /// A place among `domain`'s running calls, if one is free.
    pub(super) fn start_call(
        &self,
        domain: &str,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        let running = Arc::clone(
            self.running
                .entry(domain.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.max_running)))
                .value(),
        );
        running.try_acquire_owned().map_err(|_| {
            let max = self.max_running;
            ServiceError::Limited {
                code: ErrorCode::RateLimited,
                message: format!(
                    "this domain's assistant is already answering its limit of {max} questions at once; ask again in a moment"
                ),
                retry_after: Duration::from_secs(1),
            }
        })
    }

    /// Notes that `user` of `domain` is writing from `ip` (once a minute per visitor at
    /// most, so a chatty visitor costs a lookup per message, not a write).
    pub(super) fn note_visitor(&self, domain: &str, user: &str, ip: std::net::IpAddr) {
        let key = format!("{domain}/{user}");
        let now = Instant::now();
        let fresh = self
            .visitors
            .get(&key)
            .is_some_and(|v| v.0 == ip && now.duration_since(v.1) < Duration::from_secs(60));
        if !fresh {
            self.visitors.insert(key, (ip, now));
        }
    }

    /// Where `user` of `domain` was last noted connecting from (on this node).
    pub(super) fn visitor_address(&self, domain: &str, user: &str) -> Option<std::net::IpAddr> {
        self.visitors
            .get(&format!("{domain}/{user}"))
            .filter(|v| v.1.elapsed() < VISITOR_ADDRESS_TTL)
            .map(|v| v.0)
    }

    /// Forgets addresses and visitors that went quiet.
    pub(super) fn forget_idle(&self) {
        let now = Instant::now();
        self.tokens
            .retain(|_, w| now.duration_since(w.0) < TOKEN_WINDOW);
        self.visitors
            .retain(|_, v| now.duration_since(v.1) < VISITOR_ADDRESS_TTL);
        self.requests.retain_recent();
        self.requests.shrink_to_fit();
        self.running
            .retain(|_, s| s.available_permits() < self.max_running);
    }
}

/// How long a domain's daily token counter lives in Redis (past its day, for late calls).
pub(super) const DAY_COUNTER_TTL: Duration = Duration::from_secs(2 * 24 * 3600);

/// The cluster counter of the tokens `domain` used on `day`.
pub(super) fn day_key(domain: &str, day: chrono::NaiveDate) -> String {
    format!("ai-tokens:{domain}:{day}")
}

/// Tokens a domain used on one UTC day (on this node, plus what the store had when the
/// count started).
#[derive(Debug, Clone, Copy)]
pub(super) struct DaySpend {
    pub(super) day: chrono::NaiveDate,
    pub(super) tokens: u64,
}

impl Meter {
    /// Records one call: a usage row (written in the background, so a slow store never
    /// holds up a reply), metrics and the day's token count.
    pub(super) fn record(&self, call: &Call<'_>, usage: Usage, outcome: &'static str) {
        let provider = call.provider.to_owned();
        let took = call.started.elapsed();
        let m = &self.metrics;
        m.ai_calls
            .get_or_create(&AiCallLabel {
                provider: provider.clone(),
                outcome,
            })
            .inc();
        let label = ProviderLabel {
            provider: provider.clone(),
        };
        m.ai_duration
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if let Some(first) = call.first_token {
            m.ai_first_token
                .get_or_create(&label)
                .observe(first.as_secs_f64());
        }
        for (kind, n) in [
            ("prompt", usage.prompt_tokens),
            ("completion", usage.completion_tokens),
        ] {
            m.ai_tokens
                .get_or_create(&AiTokenLabel {
                    provider: provider.clone(),
                    kind,
                })
                .inc_by(n);
        }
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        if let Some(ip) = self.admitted.address {
            self.spending.spent(ip, tokens);
        }
        let today = chrono::Utc::now().date_naive();
        if let Some(mut spend) = self.spent.get_mut(&self.domain) {
            if spend.day == today {
                spend.tokens += tokens;
            } else {
                *spend = DaySpend { day: today, tokens };
            }
        }
        let record = UsageRecord {
            domain_id: self.domain.clone(),
            room_id: self.room.clone(),
            user_id: self.user.clone(),
            provider,
            model: call.model.to_owned(),
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            latency_ms: u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            outcome: outcome.to_owned(),
            created_at: chrono::Utc::now(),
        };
        if self.shared.is_cluster() && tokens > 0 {
            let shared = self.shared.clone();
            let key = day_key(&self.domain, today);
            self.supervisor.spawn_isolated("ai-usage", async move {
                shared.add(&key, tokens).await;
            });
        }
        let store = Arc::clone(&self.store);
        self.supervisor.spawn_isolated("ai-usage", async move {
            if let Err(e) = store.record_usage(record).await {
                tracing::warn!(error = %e, "cannot record AI usage");
            }
        });
    }
}
