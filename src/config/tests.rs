use super::*;
use std::net::SocketAddr;

#[test]
fn durations_are_written_with_units() {
    let ms = |t: &str| duration_text::parse(t).map(|d| d.as_millis());
    assert_eq!(ms("500ms"), Some(500));
    assert_eq!(ms("30s"), Some(30_000));
    assert_eq!(ms("15m"), Some(900_000));
    assert_eq!(ms("24h"), Some(86_400_000));
    assert_eq!(ms("7d"), Some(604_800_000));
    assert_eq!(ms(" 90 "), Some(90_000));
    for bad in ["", "h", "1w", "-1s", "1.5h", "99999999999999999999d"] {
        assert_eq!(ms(bad), None, "{bad}");
    }
    let config = toml_from("[sessions]\nstale_after = \"2h\"\nkeep_completed = 3600\n");
    assert_eq!(config.sessions.stale_after, Duration::from_secs(7200));
    assert_eq!(config.sessions.keep_completed, Duration::from_secs(3600));
    let wrong = Figment::from(Toml::string("[sessions]\nstale_after = \"soon\"\n"))
        .extract::<Config>()
        .expect_err("refused");
    assert!(wrong.to_string().contains("is not a duration"), "{wrong}");
    let mut zero = toml_from("[sessions]\nstale_after = \"0s\"\n");
    let refused = zero.validate().expect_err("0s refused");
    assert!(
        refused.to_string().contains("sessions.stale_after"),
        "{refused}"
    );
}

#[test]
fn urls_are_redacted() {
    assert_eq!(
        redact_url("postgres://parlor:s3cret@db:5432/parlor?sslmode=require"),
        "postgres://parlor:…@db:5432/parlor?sslmode=require"
    );
    assert_eq!(
        redact_url("redis://:pw@cache:6379"),
        "redis://:…@cache:6379"
    );
    assert_eq!(redact_url("redis://cache:6379"), "redis://cache:6379");
    assert_eq!(
        redact_url("postgres://parlor@db/parlor"),
        "postgres://parlor@db/parlor"
    );
    assert_eq!(redact_url("sqlite://parlor.db"), "sqlite://parlor.db");
    assert_eq!(
        redact_url("sqlite:///a@b/parlor.db"),
        "sqlite:///a@b/parlor.db"
    );
}

#[test]
fn business_hours() {
    use chrono::TimeZone;
    let h = HandoffConfig {
        timezone: "Europe/Berlin".into(),
        business_hours: vec!["mon-fri 09:00-17:00".into(), "sat 10:00-13:00".into()],
        ..HandoffConfig::default()
    }
    .hours()
    .unwrap();
    // 2026-12-02 is a Wednesday; Berlin is UTC+1 in December.
    let utc = |d, hh, mm| {
        chrono::Utc
            .with_ymd_and_hms(2026, 12, d, hh, mm, 0)
            .unwrap()
    };
    assert!(h.is_open(utc(2, 8, 0)), "09:00 Berlin");
    assert!(!h.is_open(utc(2, 7, 59)), "08:59 Berlin");
    assert!(!h.is_open(utc(2, 16, 0)), "17:00 Berlin is closed");
    assert!(h.is_open(utc(5, 9, 30)), "Saturday 10:30");
    assert!(!h.is_open(utc(6, 10, 0)), "Sunday");
    assert!(
        HandoffConfig::default()
            .hours()
            .unwrap()
            .is_open(utc(6, 3, 0))
    );
    for bad in [
        "mon-fri",
        "xyz 09:00-10:00",
        "mon 10:00-09:00",
        "mon 25:00-26:00",
    ] {
        let c = HandoffConfig {
            business_hours: vec![bad.into()],
            ..HandoffConfig::default()
        };
        assert!(c.hours().is_err(), "{bad}");
    }
    let tz = HandoffConfig {
        timezone: "Mars/Olympus".into(),
        ..HandoffConfig::default()
    };
    assert!(tz.hours().unwrap_err().contains("time zone"));
}

#[test]
fn example_file_matches_defaults() {
    let text = include_str!("../../parlor.example.toml");
    let mut from_example: Config = toml_from(text);
    from_example.validate().ok();
    let mut defaults = Config::default();
    defaults.validate().ok();
    assert_eq!(
        from_example, defaults,
        "parlor.example.toml drifted from the defaults"
    );
}

fn toml_from(text: &str) -> Config {
    match Figment::from(Toml::string(text)).extract() {
        Ok(c) => c,
        Err(e) => panic!("example config does not parse: {e}"),
    }
}

#[test]
fn loads_a_file_and_flags_win() {
    let dir = std::env::temp_dir().join(format!("parlor-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("parlor.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:9999\"\n[limits]\nmessages_per_second = 7\n[[domains]]\nid = \"acme\"\n",
    )
    .unwrap();
    let flags = Overrides {
        database: Some("sqlite:///tmp/x.db".into()),
        ..Overrides::default()
    };
    let c = Config::load(Some(&path), &flags).unwrap();
    assert_eq!(c.listen, "127.0.0.1:9999".parse().unwrap());
    assert_eq!(c.limits.messages_per_second, 7);
    assert_eq!(
        c.limits.messages_burst,
        Limits::default().messages_burst,
        "unset keys keep defaults"
    );
    assert_eq!(c.database, "sqlite:///tmp/x.db", "flags win over the file");
    let ids: Vec<&str> = c.domains.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["acme", "demo"], "the demo domain is always there");
    assert!(Config::load(Some(&dir.join("missing.toml")), &Overrides::default()).is_err());
    std::fs::write(&path, "[limits]\nmessages_per_second = \"fast\"\n").unwrap();
    assert!(
        Config::load(Some(&path), &Overrides::default()).is_err(),
        "wrong types are refused"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rejects_bad_values() {
    let mut c = Config::default();
    c.limits.outbound_queue = 0;
    assert!(c.validate().is_err());
    for database in ["mysql://x", "postgres://", "parlor.db"] {
        let mut c = Config {
            database: database.into(),
            ..Config::default()
        };
        assert!(c.validate().is_err(), "{database}");
    }
    for database in ["postgres://parlor@db/parlor", "postgresql://db:5433/parlor"] {
        let mut c = Config {
            database: database.into(),
            ..Config::default()
        };
        c.validate().expect(database);
        assert_eq!(c.postgres_url(), Some(database));
        assert_eq!(c.database_path(), None);
    }
    let mut c = Config::default();
    c.auth.jwt_secret = Some(Secret::new("short"));
    assert!(c.validate().is_err());
}

#[test]
fn vendor_variables_add_providers_for_the_demo_bot() {
    let env = |vars: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    let mut c = Config::default();
    c.add_vendor_providers(env(&[
        ("GEMINI_API_KEY", "g-key"),
        ("OPENAI_API_KEY", "x"),
        ("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1"),
        ("OPENAI_MODEL", "llama3.2"),
    ]));
    let openai = &c.ai.providers["openai"];
    assert_eq!(openai.kind, ProviderKind::Openai);
    assert_eq!(
        openai.base_url.as_deref(),
        Some("http://127.0.0.1:11434/v1")
    );
    assert_eq!(openai.model, "llama3.2");
    assert_eq!(c.ai.providers["gemini"].api_key, Some(Secret::new("g-key")));
    let demo_bot = c.domains[0].bot.as_ref().unwrap();
    assert_eq!(demo_bot.providers, ["openai", "gemini"], "OpenAI first");
    c.validate().unwrap();

    // A configured provider of that name, or a demo bot with its own list, wins.
    let mut c = Config::default();
    c.ai.providers.insert(
        "openai".into(),
        ProviderConfig::new(ProviderKind::Openai, "gpt-4o"),
    );
    c.domains[0].bot.as_mut().unwrap().providers = vec!["openai".into()];
    c.add_vendor_providers(env(&[("OPENAI_API_KEY", "x"), ("ANTHROPIC_API_KEY", "a")]));
    assert_eq!(c.ai.providers["openai"].model, "gpt-4o");
    assert!(c.ai.providers.contains_key("anthropic"));
    assert_eq!(c.domains[0].bot.as_ref().unwrap().providers, ["openai"]);
    // A trusted proxy that is not an address or a range is refused too.
    let mut bad = Config {
        trusted_proxies: vec!["10.0.0.0/8".into(), "proxy.local".into()],
        ..Config::default()
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("proxy.local")
    );
    // A bot naming a provider that does not exist is refused at start-up.
    c.domains[0].bot.as_mut().unwrap().providers = vec!["nope".into()];
    assert!(c.validate().unwrap_err().to_string().contains("nope"));
}

#[test]
fn secrets_are_redacted() {
    let mut c = Config::default();
    c.auth.jwt_secret = Some(Secret::new("a-very-secret-value"));
    assert!(!format!("{c:?}").contains("a-very-secret-value"));
}

#[test]
fn only_configuration_variables_are_read() {
    assert!(is_config_key("LIMITS__MESSAGES_PER_SECOND"));
    assert!(is_config_key("listen"));
    assert!(!is_config_key("BIN"));
    assert!(!is_config_key("TEST_DATABASE_URL"));
    assert!(!is_config_key("CONFIG"));
}

#[test]
fn listen_addresses() {
    let parse = |s: &str| s.parse::<ListenAddr>();
    assert_eq!(
        parse("localhost:8080"),
        Ok(ListenAddr::new("localhost", 8080))
    );
    assert_eq!(parse("[::1]:0"), Ok(ListenAddr::new("::1", 0)));
    assert_eq!(parse("[::1]:0").unwrap().to_string(), "[::1]:0");
    assert_eq!(
        parse("0.0.0.0:8080").unwrap().resolve().unwrap(),
        [SocketAddr::from(([0, 0, 0, 0], 8080))]
    );
    for bad in [
        "8080",
        ":8080",
        "localhost",
        "::1:8080",
        "[::1:8080",
        "a b:1",
        "h:99999",
    ] {
        let e = parse(bad).unwrap_err();
        assert!(e.contains("HOST:PORT"), "{bad}: {e}");
    }
    assert_eq!(Config::default().listen.to_string(), "127.0.0.1:8080");
}

#[test]
fn unknown_keys_are_refused() {
    let r: Result<Config, _> = Figment::from(Toml::string("[limits]\nnope = 1\n")).extract();
    assert!(r.is_err());
}

#[test]
fn webhook_delivery_settings_that_cannot_work_are_refused() {
    let refused = |text: &str| {
        let mut config = toml_from(text);
        config.validate().err().map(|e| e.to_string())
    };
    assert_eq!(
        refused("[webhooks]\nlease = \"2s\"\nattempt_timeout = \"1s\"\n"),
        None
    );
    let error = refused("[webhooks]\nlease = \"5s\"\nattempt_timeout = \"10s\"\n").unwrap();
    assert!(error.contains("webhooks.lease must be longer"), "{error}");
    let error = refused("[webhooks]\nmin_backoff = \"2h\"\n").unwrap();
    assert!(error.contains("min_backoff cannot exceed"), "{error}");
    let error = refused("[webhooks]\nretry_for = \"0s\"\n").unwrap();
    assert!(
        error.contains("webhooks.retry_for must be longer than 0s"),
        "{error}"
    );
    let error = refused("[webhooks]\nper_destination = 0\n").unwrap();
    assert!(error.contains("per_destination"), "{error}");
    let unknown = Figment::from(Toml::string("[webhooks]\nlease_secs = 3\n")).extract::<Config>();
    assert!(unknown.is_err());
}
