//! `serve`: the HTTP API, its auth and errors, scheduled runs, metrics and graceful shutdown,
//! against a real PostgreSQL with a dotenv store and a command consumer.

use std::time::{Duration, Instant};

use support::config::quoted;
use support::rotator::{
    assert_no_secret, file_builder, file_config_with, free_port, sample, step, ComposeHost, Server,
};

const TARGET: [(&str, &str); 1] = [("target", "postgres")];

/// A compose host whose config runs `serve` on a free port with `rotator_extra`/`target_extra`,
/// and whose restart command is `command` (default: log a line).
async fn host_with(
    command: Option<&str>,
    rotator_extra: &str,
    target_extra: &str,
) -> (ComposeHost, u16) {
    let host = ComposeHost::start().await;
    let port = free_port();
    let log = host.restart_log.display().to_string();
    let script = match command {
        Some(extra) => format!("echo restarted >> {log}; {extra}"),
        None => format!("echo restarted >> {log}"),
    };
    let rotator = format!(
        "listen = \"127.0.0.1:{port}\"\napi_tokens = \"env:ROTATOR_API_TOKENS\"\n{rotator_extra}"
    );
    host.rotator.write_config(&file_config_with(
        &host.pg.address(),
        &["sh".into(), "-c".into(), script],
        &rotator,
        target_extra,
    ));
    (host, port)
}

fn assert_clean(host: &ComposeHost, server: &Server, texts: &[&str]) {
    let (now, _) = host.stored_passwords();
    let secrets = [
        host.old_password.as_str(),
        now.as_str(),
        host.pg.admin_password(),
        server.token.as_str(),
    ];
    for text in texts {
        assert_no_secret(text, &secrets, "serve output");
    }
    assert_no_secret(&server.log(), &secrets, "serve log at trace level");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_requires_a_token_and_answers_every_error_as_json() {
    let (host, port) = host_with(None, "", "").await;
    let server = host.rotator.serve(port).await;
    let http = &server.http;

    for (method, path) in [
        ("GET", "/v1/rotations"),
        ("POST", "/v1/rotations"),
        ("GET", "/v1/rotations/x"),
        ("GET", "/v1/targets"),
        ("GET", "/v1/openapi.json"),
    ] {
        for token in [None, Some("wrong"), Some("")] {
            let mut request = http
                .request(method.parse().unwrap(), server.url(path))
                .body("{}");
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status().as_u16(),
                401,
                "{method} {path} with {token:?}"
            );
            let body: serde_json::Value = response.json().await.unwrap();
            assert!(body["error"].as_str().unwrap().contains("bearer token"));
        }
    }
    // The second configured token works as well.
    let response = http
        .get(server.url("/v1/targets"))
        .bearer_auth(format!("second-token-{}", server.token))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    // RFC 7235 §2.1: the auth-scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let response = http
            .get(server.url("/v1/targets"))
            .header("authorization", format!("{scheme} {}", server.token))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{scheme}");
    }

    let (status, body) = server
        .post("/v1/rotations", r#"{"targets": ["mysql"]}"#)
        .await;
    assert_eq!(
        (status, body["error"].as_str().unwrap()),
        (404, "unknown target \"mysql\": it is not in the config")
    );
    let (status, body) = server
        .post("/v1/rotations", r#"{"targets": "postgres"}"#)
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("invalid type"),
        "{body}"
    );
    let (status, body) = server
        .post("/v1/rotations", r#"{"target": ["postgres"]}"#)
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `target`"),
        "{body}"
    );
    let (status, body) = server.post("/v1/rotations", "{not json").await;
    assert_eq!(status, 400, "{body}");
    let big = format!(r#"{{"targets": ["{}"]}}"#, "x".repeat(70 * 1024));
    let (status, body) = server.post("/v1/rotations", &big).await;
    assert_eq!(status, 413);
    assert!(body["error"].as_str().unwrap().contains("65536"), "{body}");
    let (status, _) = server.get("/v1/rotations/no-such-run").await;
    assert_eq!(status, 404);
    for bad in ["0", "abc", "100000"] {
        let (status, body) = server.get(&format!("/v1/rotations?limit={bad}")).await;
        assert_eq!(status, 400, "limit={bad}: {body}");
    }
    // A misspelt or repeated parameter is named, in the API's JSON shape, not ignored.
    for (query, named) in [
        ("/v1/rotations?limt=5", "limt"),
        ("/v1/rotations?limit=5&limit=6", "limit"),
        ("/v1/rotations/no-such-run?wiat=5s", "wiat"),
    ] {
        let (status, body) = server.get(query).await;
        assert_eq!(status, 400, "{query}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("`{named}`")), "{query}: {body}");
    }
    let (status, _) = server.get("/nope").await;
    assert_eq!(status, 404);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http.get(server.url(open))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200,
            "{open}"
        );
    }

    let (status, openapi) = server.get("/v1/openapi.json").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/rotations",
        "/v1/rotations/{id}",
        "/v1/targets",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} documented");
    }
    // Nothing was rotated by any of this.
    assert_eq!(host.stored_passwords().0, host.old_password);
    assert_clean(&host, &server, &[]);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_rotation_runs_it_and_reports_it_everywhere() {
    let (host, port) = host_with(None, "check_interval = \"0s\"", "").await;
    let server = host.rotator.serve(port).await;

    let (status, dry) = server.post("/v1/rotations", r#"{"dry_run": true}"#).await;
    assert_eq!(status, 200);
    assert_eq!(dry["preflight"][0]["ok"], true);
    assert_eq!(
        host.stored_passwords().0,
        host.old_password,
        "a dry run changes nothing"
    );

    let started = Instant::now();
    let (status, body) = server
        .post("/v1/rotations", r#"{"targets": ["postgres"]}"#)
        .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(body["status_url"], format!("/v1/rotations/{id}"));
    let run = server.wait_for_run(&id).await;
    println!(
        "POST /v1/rotations to a finished run: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(run["outcome"], "succeeded", "{run:#}");
    assert_eq!(run["trigger"], "api");
    assert!(run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["duration_ms"].is_i64()));
    host.assert_stores_log_in().await;
    assert_ne!(host.stored_passwords().0, host.old_password);

    let (_, runs) = server.get("/v1/rotations?limit=1").await;
    assert_eq!(runs[0]["id"], id.as_str());
    // The drift check that follows a run lands just after its outcome: give it a moment.
    let mut targets = serde_json::Value::Null;
    for _ in 0..100 {
        targets = server.get("/v1/targets").await.1;
        if !targets[0]["credential_valid"].is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(targets[0]["name"], "postgres");
    assert_eq!(targets[0]["last_outcome"], "succeeded");
    assert_eq!(targets[0]["credential_valid"], true);
    assert_eq!(targets[0]["rotating"], false);
    assert!(targets[0]["credential_age_seconds"].as_f64().unwrap() < 60.0);

    let metrics = server.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "rotator_rotations_total",
            &[("target", "postgres"), ("outcome", "succeeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "rotator_rotations_total",
            &[("target", "postgres"), ("outcome", "rolled_back")]
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "rotator_rotation_duration_seconds_count", &TARGET),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "rotator_credential_valid", &TARGET),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "rotator_rotation_in_progress", &TARGET),
        Some(0.0)
    );
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - sample(&metrics, "rotator_last_success_timestamp_seconds", &TARGET).unwrap()).abs()
            < 60.0
    );
    assert!(sample(&metrics, "rotator_credential_age_seconds", &TARGET).unwrap() < 60.0);
    assert_eq!(
        sample(
            &metrics,
            "rotator_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_clean(
        &host,
        &server,
        &[
            &metrics,
            &runs.to_string(),
            &targets.to_string(),
            &run.to_string(),
            &dry.to_string(),
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_rotation_and_drift_show_in_the_metrics() {
    let (host, port) = host_with(Some("exit 1"), "check_interval = \"1s\"", "").await;
    let server = host.rotator.serve(port).await;

    let (status, body) = server.post("/v1/rotations", "{}").await;
    assert_eq!(status, 202, "{body}");
    let run = server.wait_for_run(body["id"].as_str().unwrap()).await;
    assert_eq!(run["outcome"], "rolled_back");
    let metrics = server.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "rotator_rotations_total",
            &[("target", "postgres"), ("outcome", "rolled_back")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "rotator_rollbacks_total",
            &[("target", "postgres"), ("outcome", "rolled_back")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "rotator_step_failures_total",
            &[
                ("target", "postgres"),
                ("step", "restart"),
                ("error", "command_failed")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "rotator_credential_valid", &TARGET),
        Some(1.0),
        "the old credential still works"
    );
    assert_eq!(
        sample(&metrics, "rotator_last_success_timestamp_seconds", &TARGET),
        None
    );

    // Someone breaks the stored credential: the periodic check notices.
    let broken = host
        .env_text()
        .replace(&format!(":{}@", host.old_password), ":wrong@");
    std::fs::write(&host.env_file, broken).unwrap();
    let mut drift = None;
    for _ in 0..100 {
        let metrics = server.metrics().await;
        drift = sample(&metrics, "rotator_credential_valid", &TARGET);
        if drift == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(drift, Some(0.0));
    let (_, targets) = server.get("/v1/targets").await;
    assert_eq!(targets[0]["credential_valid"], false);
    assert_clean(&host, &server, &[&metrics]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_rotates_and_racing_requests_get_409_or_a_counted_skip() {
    // Every 2 s, with a restart that takes 3 s: fires and API calls keep meeting a busy target.
    let (host, port) = host_with(
        Some("sleep 3"),
        "check_interval = \"0s\"",
        "schedule = \"*/2 * * * * *\"\nwindow = \"1m\"",
    )
    .await;
    let server = host.rotator.serve(port).await;

    let mut conflicts = 0;
    let deadline = Instant::now() + Duration::from_secs(9);
    while Instant::now() < deadline {
        let (_, targets) = server.get("/v1/targets").await;
        if targets[0]["rotating"] == true {
            let (status, body) = server.post("/v1/rotations", "{}").await;
            assert!(status == 409 || status == 202, "{status} {body}");
            if status == 409 {
                assert!(body["error"]
                    .as_str()
                    .unwrap()
                    .contains("being rotated by another run"));
                conflicts += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = server.metrics().await;
    let skipped = sample(
        &metrics,
        "rotator_skipped_schedules_total",
        &[("target", "postgres"), ("reason", "busy")],
    )
    .unwrap();
    assert!(
        conflicts > 0,
        "an API call met a running scheduled rotation"
    );
    assert!(
        skipped > 0.0,
        "a fire met a running rotation and was counted"
    );
    assert!(
        sample(&metrics, "rotator_next_rotation_timestamp_seconds", &TARGET).unwrap()
            > chrono::Utc::now().timestamp() as f64 - 5.0
    );

    let (_, runs) = server.get("/v1/rotations?limit=100").await;
    let runs = runs.as_array().unwrap();
    assert!(
        runs.iter()
            .any(|r| r["trigger"] == "schedule" && r["outcome"] == "succeeded"),
        "{runs:#?}"
    );
    // Never two runs at once: each started after the previous one finished.
    let mut spans: Vec<(i64, i64)> = runs
        .iter()
        .filter_map(|r| Some((r["started_at"].as_i64()?, r["finished_at"].as_i64()?)))
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "runs overlapped: {spans:?}");
    }
    assert_clean(&host, &server, &[&metrics]);
}

/// `?wait=` holds the answer until the run has an outcome, or until the wait is over.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_waits_for_the_outcome_in_one_request_instead_of_polling() {
    let (host, port) = host_with(Some("sleep 1"), "check_interval = \"0s\"", "").await;
    let server = host.rotator.serve(port).await;
    let (status, body) = server.post("/v1/rotations", "{}").await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    // The run's consumer takes a second: a short wait answers with the run still going.
    let asked = Instant::now();
    let (status, run) = server.get(&format!("/v1/rotations/{id}?wait=200ms")).await;
    assert_eq!(status, 200, "{run}");
    assert!(run["outcome"].is_null(), "{run:#}");
    assert!(
        asked.elapsed() >= Duration::from_millis(200),
        "{:?}",
        asked.elapsed()
    );

    // A long wait answers once, with the outcome, as soon as the run ends.
    let (status, run) = server.get(&format!("/v1/rotations/{id}?wait=60s")).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["outcome"], "succeeded", "{run:#}");
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );

    for bad in ["soon", "301s", "-1s"] {
        let (status, body) = server.get(&format!("/v1/rotations/{id}?wait={bad}")).await;
        assert_eq!(status, 400, "wait={bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().starts_with("wait must be"),
            "{body}"
        );
    }
    let asked = Instant::now();
    let (status, _) = server.get("/v1/rotations/no-such-run?wait=5s").await;
    assert_eq!(status, 404);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "an unknown run is answered at once, not after the wait: {:?}",
        asked.elapsed()
    );
    host.assert_stores_log_in().await;
    assert_clean(&host, &server, &[]);
}

/// SIGTERM cancels the run in flight, which rolls back within the grace; a client that sent
/// half a request head, or keeps an idle connection, does not hold the exit.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_rolls_back_the_run_in_flight_and_exits_whatever_clients_do() {
    use tokio::io::AsyncWriteExt;
    let (host, port) = host_with(
        Some("sleep 3"),
        "check_interval = \"0s\"\nshutdown_grace = \"20s\"",
        "",
    )
    .await;
    let env_before = host.env_text();
    let mut server = host.rotator.serve(port).await;
    let (status, body) = server.post("/v1/rotations", "{}").await;
    assert_eq!(status, 202);
    while host.restarts() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut half_head = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    half_head
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let _idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let signalled = Instant::now();
    server.signal("TERM");
    assert_eq!(
        server.wait(Duration::from_secs(30)).await,
        0,
        "{}",
        server.log()
    );
    // The rollback rolls the consumer out again (3 s); the exit follows within seconds.
    assert!(
        signalled.elapsed() < Duration::from_secs(12),
        "{:?}",
        signalled.elapsed()
    );
    assert_eq!(host.env_text(), env_before, "rolled back");
    host.assert_stores_log_in().await;
    let history = host.rotator.run(&["history", "--output", "json"]).await;
    assert_eq!(history.json()[0]["id"], body["id"]);
    assert_eq!(history.json()[0]["outcome"], "rolled_back");
    assert_clean(&host, &server, &[&history.all()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_the_grace_leaves_the_run_to_recovery() {
    let (host, port) = host_with(
        Some("sleep 5"),
        "check_interval = \"0s\"\nshutdown_grace = \"1s\"",
        "",
    )
    .await;
    let mut server = host.rotator.serve(port).await;
    let (status, _) = server.post("/v1/rotations", "{}").await;
    assert_eq!(status, 202);
    while host.restarts() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal("TERM");
    assert_eq!(
        server.wait(Duration::from_secs(10)).await,
        0,
        "{}",
        server.log()
    );
    assert!(
        server.log().contains("left to recovery"),
        "{}",
        server.log()
    );

    // Restarting recovers it; the stores' credential logs in, and the metrics know the history.
    let server = host.rotator.serve(port).await;
    host.assert_stores_log_in().await;
    let (_, runs) = server.get("/v1/rotations?limit=1").await;
    assert!(
        runs[0]["outcome"] == "succeeded" || runs[0]["outcome"] == "rolled_back",
        "{runs:#}"
    );
    let metrics = server.metrics().await;
    if runs[0]["outcome"] == "succeeded" {
        assert!(
            sample(&metrics, "rotator_last_success_timestamp_seconds", &TARGET).is_some(),
            "{metrics}"
        );
    }
    assert!(sample(&metrics, "rotator_last_attempt_timestamp_seconds", &TARGET).is_some());
    assert_clean(&host, &server, &[&metrics]);
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_hides_the_journal_error_and_logs_it() {
    let host = ComposeHost::start().await;
    let journal_password = support::rotator::random_password();
    host.pg
        .create_login("rotator_journal", &journal_password, "rotator_journal")
        .await;
    let port = free_port();
    let rotator = format!(
        "listen = \"127.0.0.1:{port}\"\napi_tokens = \"env:ROTATOR_API_TOKENS\"\ncheck_interval = \"0s\""
    );
    let journal = host
        .pg
        .url("rotator_journal", &journal_password, "rotator_journal");
    let config = file_builder(&host.pg.address(), &["true".into()])
        .rotator_lines(&rotator)
        .rotator("journal", quoted(&journal))
        .build();
    host.rotator.write_config(&config);
    let server = host.rotator.serve(port).await;
    let (status, _) = server.get("/readyz").await;
    assert_eq!(status, 200);

    // The journal's role can no longer log in and its sessions are gone.
    host.pg
        .exec(
            "ALTER ROLE rotator_journal NOLOGIN; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'rotator_journal'",
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let response = server.http.get(server.url("/readyz")).send().await.unwrap();
        if response.status().as_u16() == 503 {
            break response.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "/readyz never failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"error": "the journal is not reachable (the log says why)"})
    );
    for detail in ["rotator_journal", "127.0.0.1", "role", "permitted"] {
        assert!(!body.contains(detail), "{detail:?} in {body}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !server
        .log()
        .contains("readiness check: the journal is not reachable")
    {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_secret(
        &server.log(),
        &[journal_password.as_str(), host.pg.admin_password()],
        "serve log",
    );
}

/// Polls `GET /v1/targets` with `token` until it answers `status`, for at most `within`.
async fn wait_for_status(server: &Server, token: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let response = server
            .http
            .get(server.url("/v1/targets"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{token:?} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn api_tokens_from_a_file_are_reloaded_when_it_changes() {
    let host = ComposeHost::start().await;
    let port = free_port();
    let tokens = host.rotator.path("tokens");
    // A Secret volume update swaps a symlink to a new directory; a rename is as atomic.
    let replace = |text: &str| {
        let staged = host.rotator.path("tokens.new");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, &tokens).unwrap();
    };
    replace("first-token\n");
    let rotator = format!(
        "listen = \"127.0.0.1:{port}\"\napi_tokens = \"file:{}\"\ncheck_interval = \"0s\"",
        tokens.display()
    );
    host.rotator.write_config(&file_config_with(
        &host.pg.address(),
        &["true".into()],
        &rotator,
        "",
    ));
    let server = host.rotator.serve(port).await;
    wait_for_status(&server, "first-token", 200, Duration::ZERO).await;
    wait_for_status(&server, "second-token", 401, Duration::ZERO).await;

    replace("second-token\n");
    wait_for_status(&server, "second-token", 200, Duration::from_secs(20)).await;
    wait_for_status(&server, "first-token", 401, Duration::ZERO).await;

    // Empty, then unreadable: the tokens in force stay, and the log says why.
    replace("# nothing yet\n");
    tokio::time::sleep(Duration::from_secs(6)).await;
    std::fs::remove_file(&tokens).unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    wait_for_status(&server, "second-token", 200, Duration::ZERO).await;
    let log = server.log();
    assert!(log.contains("holds no token"), "{log}");
    assert!(log.contains("cannot read the API token file"), "{log}");
    assert_no_secret(&log, &["first-token", "second-token"], "serve log");
}

/// Polls `/metrics` until `name{labels}` reads `value`, for at most `within`.
async fn wait_for_sample(
    server: &Server,
    name: &str,
    labels: &[(&str, &str)],
    value: f64,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let metrics = server.metrics().await;
        if sample(&metrics, name, labels) == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} never read {value}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_left_on_the_old_credential_is_a_warning_and_a_gauge_until_it_ends() {
    use sqlx::Connection;
    let (host, port) = host_with(None, "check_interval = \"1s\"", "confirm_timeout = \"2s\"").await;
    let held = sqlx::PgConnection::connect_with(&host.pg.connect_options(
        "llmtrace",
        &host.old_password,
        "llmtrace",
    ))
    .await
    .unwrap();
    let server = host.rotator.serve(port).await;

    let (status, body) = server
        .post("/v1/rotations", r#"{"targets": ["postgres"]}"#)
        .await;
    assert_eq!(status, 202, "{body}");
    let run = server.wait_for_run(body["id"].as_str().unwrap()).await;

    assert_eq!(run["outcome"], "succeeded", "{run}");
    let confirm = step(&run, "confirm");
    assert_eq!(confirm["status"], "warning", "{confirm}");
    let warning = [("kind", "sessions_not_drained"), ("target", "postgres")];
    wait_for_sample(
        &server,
        "rotator_warnings_total",
        &warning,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    wait_for_sample(
        &server,
        "rotator_sessions_on_old_credential",
        &TARGET,
        1.0,
        Duration::from_secs(5),
    )
    .await;

    // The drift check sees the session end.
    held.close().await.unwrap();
    wait_for_sample(
        &server,
        "rotator_sessions_on_old_credential",
        &TARGET,
        0.0,
        Duration::from_secs(10),
    )
    .await;
    assert_clean(&host, &server, &[&run.to_string()]);
}
