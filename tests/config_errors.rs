//! Bad configuration: exit 2, every bad field named, nothing touched.

use support::config::ConfigBuilder;
use support::rotator::Rotator;

#[tokio::test(flavor = "multi_thread")]
async fn bad_config_exits_2_naming_every_field_and_writes_nothing() {
    let rotator = Rotator::new(
        &ConfigBuilder::new()
            .postgres("127.0.0.1:5432")
            .set(
                "admin",
                "{ user = \"postgres\", password = \"literal:Sup3rSecretAdmin\" }",
            )
            .str("strategy", "sometimes")
            .str("confirm_timeout", "until drained")
            .store("kubernetes")
            .str("namespace", "llmtrace")
            .str("key", "LLMTRACE_POSTGRES_URL")
            .str("format", "uri")
            .deployment_consumer("soon")
            .build(),
    );
    for args in [
        &["rotate"][..],
        &["check"],
        &["history"],
        &["recover"],
        &["migrate"],
        &["rbac"],
    ] {
        let out = rotator.run(args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.all());
        for path in [
            "target[0].strategy",
            "target[0].store[0].secret",
            "target[0].store[0].format",
            "consumer[0].timeout",
            "target[0].confirm_timeout",
        ] {
            assert!(
                out.stderr.contains(path),
                "{args:?} names {path}: {}",
                out.stderr
            );
        }
        assert!(!out.all().contains("Sup3rSecretAdmin"));
    }
    assert!(!rotator.path("journal.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_target_and_bad_flags_exit_2() {
    let rotator = Rotator::new(&support::rotator::file_config(
        "127.0.0.1:1",
        &["true".into()],
    ));
    let out = rotator.run(&["rotate", "--target", "mysql"]).await;
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("unknown target \"mysql\""),
        "{}",
        out.stderr
    );
    let out = rotator.run(&["rotate", "--output", "yaml"]).await;
    assert_eq!(out.code, 2, "{}", out.all());
    let out = rotator.run(&["rotate", "--log-format", "xml"]).await;
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(out.stderr.contains("--log-format"), "{}", out.stderr);
    let out = rotator
        .run_with(&["rotate"], &[("ROTATOR_LOG_FORMAT", "xml")])
        .await;
    assert_eq!(out.code, 2, "{}", out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn syntax_error_shows_the_position_not_the_line() {
    let rotator = Rotator::new("[rotator]\njournal_key = \"literal:Sup3rSecretKey\nx");
    let out = rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("line 2"), "{}", out.stderr);
    assert!(!out.all().contains("Sup3rSecretKey"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_key_of_the_wrong_size_cannot_start() {
    let mut rotator = Rotator::new(&support::rotator::file_config(
        "127.0.0.1:1",
        &["true".into()],
    ));
    rotator
        .env
        .insert("ROTATOR_JOURNAL_KEY".into(), "c2hvcnQ=".into());
    let out = rotator.run(&["history"]).await;
    assert_eq!(out.code, 4, "{}", out.all());
    assert!(
        out.stderr.contains("journal_key must be 32 bytes"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn huge_or_negative_durations_exit_2_naming_the_field() {
    let config = support::rotator::file_builder("127.0.0.1:1", &["true".into()])
        .rotator_lines("check_interval = \"8785h\"\nshutdown_grace = \"99999999999999999999s\"\nverify_relogin_after = \"-1s\"")
        .target_lines("schedule = \"0 3 * * *\"\njitter = \"-5s\"\nwindow = \"5124095576030431h\"\nmax_age = \"8784h1ms\"")
        .str("timeout", "307445734561825861m")
        .build();
    let rotator = Rotator::new(&config);
    for args in [&["rotate"][..], &["check"], &["serve"]] {
        let out = rotator.run(args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.all());
        for path in [
            "check_interval",
            "shutdown_grace",
            "verify_relogin_after",
            "target[0].jitter",
            "target[0].window",
            "target[0].max_age",
            "consumer[0].timeout",
        ] {
            assert!(
                out.stderr.contains(path),
                "{args:?} names {path}: {}",
                out.stderr
            );
        }
        assert!(out.stderr.contains("maximum of 366 days"), "{}", out.stderr);
    }
    assert!(!rotator.path("journal.db").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_store_with_an_alphabet_dotenv_readers_disagree_on_exits_2() {
    // PGPASSWORD holds the bare password: a printable one may hold both ' and $.
    let config = support::rotator::file_config_with(
        "127.0.0.1:1",
        &["true".into()],
        "",
        "password = { alphabet = \"printable\" }",
    );
    let rotator = Rotator::new(&config);
    let out = rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr
            .contains("target[0].password.alphabet: \"printable\"")
            && out.stderr.contains("target[0].store[1]"),
        "{}",
        out.stderr
    );
    // The URL store percent-encodes the password: printable is fine there.
    assert!(!out.stderr.contains("target[0].store[0]"), "{}", out.stderr);

    // The same from the [password] defaults names that field.
    rotator.write_config(
        &config
            .replace("password = { alphabet = \"printable\" }", "")
            .replace(
                "[[target]]",
                "[password]\nalphabet = \"printable\"\n\n[[target]]",
            ),
    );
    let out = rotator.run(&["check"]).await;
    assert_eq!(out.code, 2, "{}", out.all());
    assert!(
        out.stderr.contains("  password.alphabet: \"printable\""),
        "{}",
        out.stderr
    );
    assert!(!rotator.path("journal.db").exists());
}
