//! Agent accounts over real HTTP and sockets (docs/accounts.md): an invite, a password, a
//! session cookie and the inbox token it gets; brute force locked out; the cookie's flags;
//! sign-in requests from another site refused; accounts kept to their domain; domain admins
//! managing their own agents; removing an account ending its sessions.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use common::{Client, TestServer};
use parlor::auth::keys;
use parlor::config::DomainConfig;
use reqwest::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use serde_json::{Value, json};

const SHOP: &str = "https://shop.example";

struct Fixture {
    s: TestServer,
    admin: String,
}

async fn fixture() -> Fixture {
    let (admin, entry) = keys::generate_with(keys::ADMIN_KEY_PREFIX);
    let s = TestServer::start_with(move |c| {
        c.auth.admin_keys = vec![entry];
        c.limits.ip_visitor_tokens_per_minute = 10_000;
        let mut shop = DomainConfig::new("shop", "Shop");
        shop.allowed_origins = vec![SHOP.into()];
        c.domains.push(shop);
        c.domains.push(DomainConfig::new("blog", "Blog"));
    })
    .await;
    Fixture { s, admin }
}

/// A request to the server as its own page would send it (`Origin` = the server).
fn from_page(f: &Fixture, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new()
        .request(method, f.s.http(path))
        .header("Origin", format!("http://{}", f.s.addr))
}

async fn json_of(res: reqwest::Response) -> (u16, Value, Option<String>) {
    let status = res.status().as_u16();
    let cookie = res
        .headers()
        .get(SET_COOKIE)
        .map(|v| v.to_str().unwrap().to_owned());
    (status, res.json().await.unwrap_or(Value::Null), cookie)
}

/// `name=value` of a `Set-Cookie`.
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

async fn create_agent(
    f: &Fixture,
    domain: &str,
    email: &str,
    role: &str,
    key: &str,
) -> (u16, Value) {
    f.s.post_with(
        &format!("/api/admin/domains/{domain}/agents"),
        key,
        &json!({ "email": email, "name": email.split('@').next().unwrap(), "role": role }),
    )
    .await
}

/// Invites `email` to `domain` and accepts with `password`: the session cookie.
async fn signed_up(f: &Fixture, domain: &str, email: &str, role: &str, password: &str) -> String {
    let (code, invited) = create_agent(f, domain, email, role, &f.admin).await;
    assert_eq!(code, 201, "{invited}");
    let (code, body, cookie) = json_of(
        from_page(f, reqwest::Method::POST, "/api/auth/invite")
            .json(&json!({ "token": invited["inviteToken"], "password": password }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    cookie_pair(&cookie.expect("a cookie"))
}

async fn login(f: &Fixture, email: &str, password: &str) -> (u16, Value, Option<String>) {
    json_of(
        from_page(f, reqwest::Method::POST, "/api/auth/login")
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn with_cookie(
    f: &Fixture,
    method: reqwest::Method,
    path: &str,
    cookie: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req = from_page(f, method, path).header(COOKIE, cookie);
    if let Some(b) = body {
        req = req.json(&b);
    }
    json_of(req.send().await.unwrap()).await
}

#[tokio::test]
async fn an_invited_agent_chooses_a_password_and_works_the_inbox_of_their_domain() {
    let f = fixture().await;
    let (code, invited) = create_agent(&f, "shop", " Ann@Shop.Example ", "agent", &f.admin).await;
    assert_eq!(code, 201, "{invited}");
    assert_eq!(invited["account"]["email"], "ann@shop.example");
    assert_eq!(invited["account"]["hasPassword"], false);
    let url = invited["inviteUrl"].as_str().unwrap();
    assert!(
        url.starts_with(&format!("http://{}/inbox#invite=", f.s.addr)),
        "{url}"
    );
    // A second account for the same address in the same domain is refused.
    let (code, again) = create_agent(&f, "shop", "ann@shop.example", "agent", &f.admin).await;
    assert_eq!(
        (code, again["error"]["code"].as_str()),
        (409, Some("account_exists"))
    );

    // Too short a password is refused, and the invite still works afterwards.
    let (code, weak, _) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/invite")
            .json(&json!({ "token": invited["inviteToken"], "password": "short" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, weak["error"]["code"].as_str()),
        (400, Some("weak_password"))
    );
    let (code, session, cookie) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/invite")
            .json(&json!({ "token": invited["inviteToken"], "password": "a long enough secret" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200, "{session}");
    assert_eq!(session["accounts"][0]["domainId"], "shop");
    assert_eq!(session["accounts"][0]["domainName"], "Shop");
    let set_cookie = cookie.unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP: {set_cookie}");
    // The invite works once.
    let (code, used, _) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/invite")
            .json(&json!({ "token": invited["inviteToken"], "password": "another long secret" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (code, used["error"]["code"].as_str()),
        (404, Some("invalid_invite"))
    );

    // Signing in again with the password, in any letter case of the address.
    let (code, _, cookie) = login(&f, "ANN@shop.example", "a long enough secret").await;
    assert_eq!(code, 200);
    let cookie = cookie_pair(&cookie.unwrap());
    let (code, me, _) =
        with_cookie(&f, reqwest::Method::GET, "/api/auth/session", &cookie, None).await;
    assert_eq!(
        (code, me["email"].as_str()),
        (200, Some("ann@shop.example")),
        "{me}"
    );

    // A token for the inbox of the domain: an agent token of the account.
    let (code, token, _) = with_cookie(
        &f,
        reqwest::Method::POST,
        "/api/auth/token",
        &cookie,
        Some(json!({ "domainId": "shop" })),
    )
    .await;
    assert_eq!(code, 200, "{token}");
    assert_eq!(
        (
            token["role"].as_str(),
            token["domainId"].as_str(),
            token["name"].as_str()
        ),
        (Some("agent"), Some("shop"), Some("Ann"))
    );
    assert_eq!(token["userId"], invited["account"]["id"]);
    // It opens the inbox's socket from Parlor's own origin, though the domain lists only its
    // shop's origin.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        f.s.ws(&format!("/ws?token={}", token["token"].as_str().unwrap())),
    )
    .unwrap();
    req.headers_mut()
        .insert("Origin", format!("http://{}", f.s.addr).parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let mut agent = Client { ws, next_id: 0 };
    let id = agent.request(json!({ "type": "subscribe-inbox" })).await;
    assert_eq!(agent.reply(&id).await["type"], "inbox");
    // No token for a domain the session has no account in.
    let (code, refused, _) = with_cookie(
        &f,
        reqwest::Method::POST,
        "/api/auth/token",
        &cookie,
        Some(json!({ "domainId": "blog" })),
    )
    .await;
    assert_eq!(
        (code, refused["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );

    // Signing out ends the session: no more tokens.
    let (code, _, cleared) =
        with_cookie(&f, reqwest::Method::POST, "/api/auth/logout", &cookie, None).await;
    assert_eq!(code, 204);
    assert!(cleared.unwrap().contains("Max-Age=0"));
    let (code, gone, _) = with_cookie(
        &f,
        reqwest::Method::POST,
        "/api/auth/token",
        &cookie,
        Some(json!({ "domainId": "shop" })),
    )
    .await;
    assert_eq!(
        (code, gone["error"]["code"].as_str()),
        (401, Some("not_signed_in"))
    );
}

#[tokio::test]
async fn wrong_passwords_lock_the_address_and_say_nothing_about_who_has_an_account() {
    let f = fixture().await;
    signed_up(
        &f,
        "shop",
        "bob@shop.example",
        "agent",
        "bob's real password",
    )
    .await;
    for i in 1..=4 {
        let (code, body, cookie) = login(&f, "bob@shop.example", "guess").await;
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (401, Some("invalid_credentials")),
            "try {i}"
        );
        assert!(cookie.is_none());
    }
    let res = from_page(&f, reqwest::Method::POST, "/api/auth/login")
        .json(&json!({ "email": "bob@shop.example", "password": "guess" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let wait: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((800..=900).contains(&wait), "{wait}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_failures");
    // Locked: even the right password waits.
    let (code, _, cookie) = login(&f, "bob@shop.example", "bob's real password").await;
    assert_eq!(code, 429);
    assert!(cookie.is_none());
    // An address without an account answers and locks the same way.
    for _ in 0..4 {
        assert_eq!(login(&f, "nobody@shop.example", "guess").await.0, 401);
    }
    assert_eq!(login(&f, "nobody@shop.example", "guess").await.0, 429);
    // Another address is not affected.
    signed_up(&f, "shop", "cy@shop.example", "agent", "cy's real password").await;
    assert_eq!(
        login(&f, "cy@shop.example", "cy's real password").await.0,
        200
    );
    assert!(
        f.s.metric("parlor_client_errors_total", "too_many_failures")
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn sign_in_refuses_requests_of_other_sites_and_non_json_bodies() {
    let f = fixture().await;
    let cookie = signed_up(
        &f,
        "shop",
        "dee@shop.example",
        "agent",
        "dee's real password",
    )
    .await;
    let http = reqwest::Client::new();
    for (origin, fetch_site) in [
        (Some("https://evil.example"), None),
        (Some(SHOP), None),
        (None, Some("cross-site")),
    ] {
        let mut req = http
            .post(f.s.http("/api/auth/token"))
            .header(COOKIE, &cookie)
            .json(&json!({ "domainId": "shop" }));
        if let Some(o) = origin {
            req = req.header("Origin", o);
        }
        if let Some(s) = fetch_site {
            req = req.header("Sec-Fetch-Site", s);
        }
        let (code, body, _) = json_of(req.send().await.unwrap()).await;
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (403, Some("cross_site")),
            "{origin:?} {fetch_site:?}"
        );
        let (code, _, _) = json_of(
            http.post(f.s.http("/api/auth/login"))
                .header("Origin", origin.unwrap_or("https://evil.example"))
                .json(&json!({ "email": "dee@shop.example", "password": "dee's real password" }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(code, 403);
    }
    // A form post (what a cross-site form can send without a preflight) is not JSON.
    let (code, _, cookie_set) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/login")
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("email=dee%40shop.example&password=dee%27s+real+password")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 415);
    assert!(cookie_set.is_none());
    // A non-browser client (no Origin) may sign in; over HTTPS the cookie is Secure.
    let (code, _, set) = json_of(
        http.post(f.s.http("/api/auth/login"))
            .header("X-Forwarded-Proto", "https")
            .json(&json!({ "email": "dee@shop.example", "password": "dee's real password" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    assert!(set.unwrap().ends_with("; Secure"));
    // Tokens are not session cookies: a token cannot ask for another token.
    let (code, _, _) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/token")
            .json(&json!({ "domainId": "shop" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 401);
}

#[tokio::test]
async fn domain_admins_manage_their_own_agents_and_removal_ends_sessions() {
    let f = fixture().await;
    let boss_cookie = signed_up(
        &f,
        "shop",
        "boss@shop.example",
        "admin",
        "the boss password",
    )
    .await;
    let (_, token, _) = with_cookie(
        &f,
        reqwest::Method::POST,
        "/api/auth/token",
        &boss_cookie,
        Some(json!({ "domainId": "shop" })),
    )
    .await;
    assert_eq!(token["role"], "admin");
    let boss = token["token"].as_str().unwrap().to_owned();
    // The shop's admin invites an agent of the shop, and sees the shop's accounts only.
    let (code, invited) = create_agent(&f, "shop", "eve@shop.example", "agent", &boss).await;
    assert_eq!(code, 201, "{invited}");
    let (code, _) = create_agent(&f, "blog", "eve@blog.example", "agent", &boss).await;
    assert_eq!(code, 404, "another domain is out of reach");
    let (code, list) = f.s.get_with("/api/admin/domains/shop/agents", &boss).await;
    assert_eq!(code, 200);
    let emails: Vec<&str> = list["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["boss@shop.example", "eve@shop.example"]);
    // An agent (not an admin) cannot manage accounts.
    let agent = parlor::auth::issue_token(
        &parlor::config::Secret::new(common::TEST_SECRET),
        "a",
        None,
        "agent",
        "shop",
        60,
    )
    .unwrap();
    assert_eq!(
        f.s.get_with("/api/admin/domains/shop/agents", &agent)
            .await
            .0,
        403
    );

    // A new invite voids the old one.
    let eve_id = invited["account"]["id"].as_str().unwrap().to_owned();
    let (code, fresh) =
        f.s.post_with(
            &format!("/api/admin/domains/shop/agents/{eve_id}/invite"),
            &boss,
            &json!({}),
        )
        .await;
    assert_eq!(code, 200, "{fresh}");
    let (code, _, _) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/invite")
            .json(&json!({ "token": invited["inviteToken"], "password": "eve's own password" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 404);
    let (code, _, eve) = json_of(
        from_page(&f, reqwest::Method::POST, "/api/auth/invite")
            .json(&json!({ "token": fresh["inviteToken"], "password": "eve's own password" }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(code, 200);
    let eve = cookie_pair(&eve.unwrap());

    // Revoking Eve's sessions signs her out; removing her account too, for good.
    let (code, ended) =
        f.s.post_with(
            &format!("/api/admin/domains/shop/agents/{eve_id}/sessions/revoke"),
            &boss,
            &json!({}),
        )
        .await;
    assert_eq!((code, ended["sessionsEnded"].as_u64()), (200, Some(1)));
    assert_eq!(
        with_cookie(&f, reqwest::Method::GET, "/api/auth/session", &eve, None)
            .await
            .1["signedIn"],
        false
    );
    let (_, _, eve) = login(&f, "eve@shop.example", "eve's own password").await;
    let eve = cookie_pair(&eve.unwrap());
    let (code, _) =
        f.s.delete_with(&format!("/api/admin/domains/shop/agents/{eve_id}"), &boss)
            .await;
    assert_eq!(code, 204);
    assert_eq!(
        with_cookie(&f, reqwest::Method::GET, "/api/auth/session", &eve, None)
            .await
            .1["signedIn"],
        false
    );
    assert_eq!(
        login(&f, "eve@shop.example", "eve's own password").await.0,
        401
    );
}

#[tokio::test]
async fn one_address_with_accounts_in_two_domains_signs_in_to_both() {
    let f = fixture().await;
    signed_up(
        &f,
        "shop",
        "fay@x.example",
        "agent",
        "same password for both",
    )
    .await;
    signed_up(
        &f,
        "blog",
        "fay@x.example",
        "admin",
        "same password for both",
    )
    .await;
    let (code, session, cookie) = login(&f, "fay@x.example", "same password for both").await;
    assert_eq!(code, 200);
    let domains: Vec<&str> = session["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["domainId"].as_str().unwrap())
        .collect();
    assert_eq!(domains, ["shop", "blog"]);
    let cookie = cookie_pair(&cookie.unwrap());
    for (domain, role) in [("shop", "agent"), ("blog", "admin")] {
        let (code, token, _) = with_cookie(
            &f,
            reqwest::Method::POST,
            "/api/auth/token",
            &cookie,
            Some(json!({ "domainId": domain })),
        )
        .await;
        assert_eq!((code, token["role"].as_str()), (200, Some(role)), "{token}");
    }
}
