//! The Pusher HTTP API (`/apps/{app_id}/…`), as the `pusher` server SDKs call it: events to
//! channels and users, and what is occupied.
//!
//! Every request is signed as Pusher signs it: the query carries `auth_key` (one of the
//! app's keys), `auth_timestamp` (within [`MAX_CLOCK_SKEW_SECS`] of the server's clock),
//! `auth_version` `1.0`, `body_md5` (hex MD5 of the body, for a request with one) and
//! `auth_signature`, the hex HMAC-SHA256, with the app's secret, of
//! `METHOD\nPATH\nQUERY` where QUERY is every other parameter as `key=value` (keys in
//! lower case, decoded values), sorted by key and joined with `&`.
//!
//! Refusals have Pusher's statuses (400 bad request, 401 bad or missing signature or stale
//! timestamp, 404 unknown app, 413 data over 10 KB) and a JSON body
//! `{"error": message, "code": status}`.
//!
//! Events go to the hub's channels ([`crate::hub::Hub::publish`]), so to every node.
//! Occupancy covers every node: the subscribers of each channel on any node (the broker's
//! [`Occupancy`](crate::broker::Occupancy)) and, for presence channels, the members.

use std::collections::{BTreeMap, HashMap};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use md5::{Digest, Md5};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{App, Kind, MAX_EVENT_BYTES, MAX_EVENT_NAME_LEN, SERVER_TO_USER, invalid_channel};
use crate::hub::ChannelEvent;
use crate::transport::AppState;
use crate::transport::ws::pusher::TERMINATE;

/// How far `auth_timestamp` may be from the server's clock, as Pusher allows.
pub const MAX_CLOCK_SKEW_SECS: i64 = 600;
/// Most channels one event may go to.
const MAX_EVENT_CHANNELS: usize = 100;
/// Most events in one batch.
const MAX_BATCH: usize = 10;

/// A refused request: Pusher's status and a message.
#[derive(Debug)]
pub struct Refused(StatusCode, String);

impl Refused {
    fn bad(message: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, message.into())
    }

    fn unauthorised(message: impl Into<String>) -> Self {
        Self(StatusCode::UNAUTHORIZED, message.into())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.1, "code": self.0.as_u16() });
        (self.0, Json(body)).into_response()
    }
}

/// The query of a signed request, decoded, by lower-case key.
fn query_params(raw: Option<&str>) -> Result<BTreeMap<String, String>, Refused> {
    let mut params = BTreeMap::new();
    for (key, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if params
            .insert(key.to_ascii_lowercase(), value.into_owned())
            .is_some()
        {
            return Err(Refused::bad(format!("query parameter {key} given twice")));
        }
    }
    Ok(params)
}

/// A request signed by one of the app's keys (see the module's header): its app, its query
/// (decoded, by lower-case key) and its body. Every handler of the API takes one, last.
#[derive(Debug)]
pub struct Signed {
    app: App,
    params: BTreeMap<String, String>,
    body: Bytes,
}

impl FromRequest<AppState> for Signed {
    type Rejection = Refused;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Refused> {
        let (mut parts, body) = req.into_parts();
        let Path(path) = Path::<HashMap<String, String>>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| Refused::bad(e.body_text()))?;
        let app_id = path.get("app_id").cloned().unwrap_or_default();
        let (method, uri) = (parts.method.clone(), parts.uri.clone());
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|e| Refused(e.status(), e.body_text()))?;
        let (app, params) = authenticate(state, &app_id, &method, &uri, &body)?;
        Ok(Self { app, params, body })
    }
}

/// Checks a request's signature and returns its app and query.
fn authenticate(
    state: &AppState,
    app_id: &str,
    method: &Method,
    uri: &Uri,
    body: &[u8],
) -> Result<(App, BTreeMap<String, String>), Refused> {
    let mut params = query_params(uri.query())?;
    let key = params
        .get("auth_key")
        .ok_or_else(|| Refused::unauthorised("auth_key is missing from the query"))?;
    let app = App::by_key(state, key)
        .filter(|app| &*app.id == app_id)
        .ok_or_else(|| Refused::unauthorised(format!("unknown auth_key for app {app_id:?}")))?;
    let signature = params
        .remove("auth_signature")
        .ok_or_else(|| Refused::unauthorised("auth_signature is missing from the query"))?;
    let timestamp: i64 = params
        .get("auth_timestamp")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| Refused::unauthorised("auth_timestamp is missing or not a number"))?;
    let now = chrono::Utc::now().timestamp();
    if (now - timestamp).abs() > MAX_CLOCK_SKEW_SECS {
        return Err(Refused::unauthorised(format!(
            "Timestamp expired: given timestamp ({timestamp}) not within \
             {MAX_CLOCK_SKEW_SECS}s of server time ({now})"
        )));
    }
    if params.get("auth_version").is_some_and(|v| v != "1.0") {
        return Err(Refused::unauthorised("auth_version must be 1.0"));
    }
    if !body.is_empty() {
        let md5 = hex::encode(Md5::digest(body));
        if params.get("body_md5") != Some(&md5) {
            return Err(Refused::unauthorised(
                "body_md5 is missing or is not the MD5 of the body",
            ));
        }
    }
    let query: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let signed = format!("{method}\n{}\n{}", uri.path(), query.join("&"));
    if !app.verify(&[signed.as_bytes()], &signature) {
        state.metrics.client_error("invalid_signature");
        return Err(Refused::unauthorised(
            "Invalid signature: you should have sent HmacSHA256Hex of the method, path and \
             sorted query, with your secret",
        ));
    }
    Ok((app, params))
}

/// One event as `events` and `batch_events` take it.
#[derive(Debug, Deserialize)]
struct EventBody {
    name: Option<String>,
    data: Option<Value>,
    channel: Option<String>,
    channels: Option<Vec<String>>,
    socket_id: Option<String>,
    info: Option<String>,
}

/// An event checked: what it is, and where it goes.
struct Checked {
    name: String,
    data: String,
    channels: Vec<String>,
    except: Option<String>,
    info: Option<String>,
}

/// Checks one event of a request: a name, data of at most 10 KB, 1–100 good channels, a
/// socket id of the form `digits.digits`.
fn check_event(body: EventBody) -> Result<Checked, Refused> {
    let name = body
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Refused::bad("an event needs a name"))?;
    if name.len() > MAX_EVENT_NAME_LEN {
        return Err(Refused::bad(format!(
            "an event name has at most {MAX_EVENT_NAME_LEN} characters"
        )));
    }
    // Pusher takes data as a string; an SDK that sends an object gets it as its JSON.
    let data = match body.data {
        Some(Value::String(s)) => s,
        Some(other) => other.to_string(),
        None => return Err(Refused::bad("an event needs data")),
    };
    if data.len() > MAX_EVENT_BYTES {
        return Err(Refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("event data is over {MAX_EVENT_BYTES} bytes"),
        ));
    }
    let channels = match (body.channel, body.channels) {
        (Some(one), None) => vec![one],
        (None, Some(many)) => many,
        _ => return Err(Refused::bad("an event needs either channel or channels")),
    };
    if channels.is_empty() || channels.len() > MAX_EVENT_CHANNELS {
        return Err(Refused::bad(format!(
            "an event goes to 1–{MAX_EVENT_CHANNELS} channels"
        )));
    }
    for channel in &channels {
        let to_user = channel
            .strip_prefix(SERVER_TO_USER)
            .is_some_and(|user| !user.is_empty() && invalid_channel(user).is_none());
        if !to_user && let Some(message) = invalid_channel(channel) {
            return Err(Refused::bad(message));
        }
    }
    if let Some(socket_id) = &body.socket_id
        && !valid_socket_id(socket_id)
    {
        return Err(Refused::bad(format!(
            "socket_id {:?} is not of the form digits.digits",
            super::truncate(socket_id)
        )));
    }
    Ok(Checked {
        name,
        data,
        channels,
        except: body.socket_id,
        info: body.info,
    })
}

pub fn valid_socket_id(id: &str) -> bool {
    id.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.len() <= 20
            && b.len() <= 20
            && (a.bytes().chain(b.bytes())).all(|c| c.is_ascii_digit())
    })
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| Refused::bad(format!("the body is not valid: {e}")))
}

/// Publishes a checked event to each of its channels.
fn publish(state: &AppState, app: &App, event: &Checked) {
    // Subscribers get `data` as a JSON string, as Pusher sends it.
    let data = Value::String(event.data.clone()).to_string();
    for channel in &event.channels {
        state.chat.hub().publish(ChannelEvent {
            key: app.channel(channel),
            event: event.name.clone(),
            data: data.clone(),
            user_id: None,
            except: event.except.clone(),
        });
    }
}

/// The attributes `info` asks for, of `channel` (`subscription_count`, `user_count`);
/// `subscriptions` is its subscriber count where the caller knows it.
async fn channel_info(
    state: &AppState,
    app: &App,
    channel: &str,
    info: Option<&str>,
    subscriptions: Option<usize>,
) -> Result<serde_json::Map<String, Value>, Refused> {
    let mut out = serde_json::Map::new();
    let key = app.channel(channel);
    for attribute in info.unwrap_or_default().split(',').map(str::trim) {
        match attribute {
            "" => {}
            "subscription_count" => {
                let count = match subscriptions {
                    Some(count) => count,
                    None => state.chat.hub().subscriptions(&key).await,
                };
                out.insert(attribute.to_owned(), count.into());
            }
            "user_count" => {
                if Kind::of(channel) != Kind::Presence {
                    return Err(Refused::bad("user_count is for presence channels only"));
                }
                out.insert(
                    attribute.to_owned(),
                    state.chat.hub().presence_all(&key).await.len().into(),
                );
            }
            other => {
                return Err(Refused::bad(format!(
                    "unknown info attribute {:?}: subscription_count or user_count",
                    super::truncate(other)
                )));
            }
        }
    }
    Ok(out)
}

/// `POST /apps/{app_id}/events`: one event to 1–100 channels.
pub async fn events(
    State(state): State<AppState>,
    Signed { app, body, .. }: Signed,
) -> Result<Json<Value>, Refused> {
    let event = check_event(parse_body(&body)?)?;
    publish(&state, &app, &event);
    if event.info.is_none() {
        return Ok(Json(json!({})));
    }
    let mut channels = serde_json::Map::new();
    for channel in &event.channels {
        let info = channel_info(&state, &app, channel, event.info.as_deref(), None).await?;
        channels.insert(channel.clone(), Value::Object(info));
    }
    Ok(Json(json!({ "channels": channels })))
}

/// `batch_events`' body.
#[derive(Debug, Deserialize)]
struct Batch {
    batch: Vec<EventBody>,
}

/// `POST /apps/{app_id}/batch_events`: up to 10 events, each to one channel; all checked
/// before any is published.
pub async fn batch_events(
    State(state): State<AppState>,
    Signed { app, body, .. }: Signed,
) -> Result<Json<Value>, Refused> {
    let batch: Batch = parse_body(&body)?;
    if batch.batch.len() > MAX_BATCH {
        return Err(Refused::bad(format!(
            "a batch has at most {MAX_BATCH} events"
        )));
    }
    let events = batch
        .batch
        .into_iter()
        .map(|e| {
            if e.channels.is_some() {
                return Err(Refused::bad("a batched event has one channel"));
            }
            check_event(e)
        })
        .collect::<Result<Vec<_>, _>>()?;
    for event in &events {
        publish(&state, &app, event);
    }
    if events.iter().all(|e| e.info.is_none()) {
        return Ok(Json(json!({})));
    }
    let mut infos = Vec::with_capacity(events.len());
    for event in &events {
        let channel = &event.channels[0];
        let info = channel_info(&state, &app, channel, event.info.as_deref(), None).await?;
        infos.push(Value::Object(info));
    }
    Ok(Json(json!({ "batch": infos })))
}

/// `GET /apps/{app_id}/channels`: the occupied channels, optionally those starting with
/// `filter_by_prefix`, with `info=user_count` for presence channels.
pub async fn channels(
    State(state): State<AppState>,
    Signed { app, params, .. }: Signed,
) -> Result<Json<Value>, Refused> {
    let prefix = params
        .get("filter_by_prefix")
        .map(String::as_str)
        .unwrap_or_default();
    let info = params.get("info").map(String::as_str);
    let wants_users = info.is_some_and(|i| i.split(',').any(|a| a.trim() == "user_count"));
    if wants_users && !prefix.starts_with("presence-") {
        return Err(Refused::bad(
            "info=user_count needs filter_by_prefix=presence-",
        ));
    }
    let mut occupied: HashMap<String, serde_json::Map<String, Value>> = HashMap::new();
    for (name, count) in state.chat.hub().occupied(&app.domain, &app.id).await {
        if name.starts_with(prefix) && !name.starts_with('#') {
            let attributes = channel_info(&state, &app, &name, info, Some(count)).await?;
            occupied.insert(name, attributes);
        }
    }
    Ok(Json(json!({ "channels": occupied })))
}

/// `GET /apps/{app_id}/channels/{channel}`: whether it is occupied, and the counts `info`
/// asks for.
pub async fn channel(
    State(state): State<AppState>,
    Path((_, channel)): Path<(String, String)>,
    Signed { app, params, .. }: Signed,
) -> Result<Json<Value>, Refused> {
    if let Some(message) = invalid_channel(&channel) {
        return Err(Refused::bad(message));
    }
    let key = app.channel(&channel);
    let subscriptions = state.chat.hub().subscriptions(&key).await;
    let occupied = subscriptions > 0
        || (Kind::of(&channel) == Kind::Presence
            && !state.chat.hub().presence_all(&key).await.is_empty());
    let info = params.get("info").map(String::as_str);
    let mut body = channel_info(&state, &app, &channel, info, Some(subscriptions)).await?;
    body.insert("occupied".to_owned(), occupied.into());
    Ok(Json(Value::Object(body)))
}

/// `GET /apps/{app_id}/channels/{channel}/users`: a presence channel's members, on every
/// node.
pub async fn users(
    State(state): State<AppState>,
    Path((_, channel)): Path<(String, String)>,
    Signed { app, .. }: Signed,
) -> Result<Json<Value>, Refused> {
    if let Some(message) = invalid_channel(&channel) {
        return Err(Refused::bad(message));
    }
    if Kind::of(&channel) != Kind::Presence {
        return Err(Refused::bad("users are listed for presence channels only"));
    }
    let users: Vec<Value> = state
        .chat
        .hub()
        .presence_all(&app.channel(&channel))
        .await
        .into_iter()
        .map(|u| json!({ "id": u.user_id }))
        .collect();
    Ok(Json(json!({ "users": users })))
}

/// `POST /apps/{app_id}/users/{user_id}/terminate_connections`: closes every connection
/// signed in as the user, on every node.
pub async fn terminate(
    State(state): State<AppState>,
    Path((_, user_id)): Path<(String, String)>,
    Signed { app, .. }: Signed,
) -> Result<Json<Value>, Refused> {
    if user_id.is_empty() || invalid_channel(&user_id).is_some() {
        return Err(Refused::bad(
            "a user id is 1–164 characters of A-Z a-z 0-9 _ - = @ , . ;",
        ));
    }
    state.chat.hub().publish(ChannelEvent {
        key: app.channel(&format!("{SERVER_TO_USER}{user_id}")),
        event: TERMINATE.to_owned(),
        data: "null".to_owned(),
        user_id: None,
        except: None,
    });
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_are_digits_dot_digits() {
        assert!(valid_socket_id("123.456"));
        assert!(!valid_socket_id("123."));
        assert!(!valid_socket_id(".1"));
        assert!(!valid_socket_id("1.2.3"));
        assert!(!valid_socket_id("a.1"));
    }

    #[test]
    fn an_event_is_checked_field_by_field() {
        let event = |v: Value| check_event(serde_json::from_value(v).unwrap());
        assert!(event(json!({"name": "e", "data": "x", "channel": "c"})).is_ok());
        assert!(event(json!({"name": "e", "data": {"a": 1}, "channels": ["a", "b"]})).is_ok());
        assert!(event(json!({"data": "x", "channel": "c"})).is_err());
        assert!(event(json!({"name": "e", "channel": "c"})).is_err());
        assert!(event(json!({"name": "e", "data": "x"})).is_err());
        assert!(
            event(json!({"name": "e", "data": "x", "channel": "c", "channels": ["d"]})).is_err()
        );
        assert!(event(json!({"name": "e", "data": "x", "channel": "bad name"})).is_err());
        assert!(
            event(json!({"name": "e", "data": "x", "channel": "c", "socket_id": "1"})).is_err()
        );
        assert!(event(json!({"name": "e", "data": "x", "channels": []})).is_err());
        let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
        assert!(event(json!({"name": "e", "data": "x", "channels": many})).is_err());
        let big = "x".repeat(MAX_EVENT_BYTES + 1);
        let too_big = event(json!({"name": "e", "data": big, "channel": "c"}));
        assert!(matches!(
            too_big,
            Err(Refused(StatusCode::PAYLOAD_TOO_LARGE, _))
        ));
        assert!(event(json!({"name": "e", "data": "x", "channel": "#server-to-user-7"})).is_ok());
        assert!(event(json!({"name": "e", "data": "x", "channel": "#server-to-user-"})).is_err());
    }
}
