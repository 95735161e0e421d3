//! Checks of the throwaway-PostgreSQL test harness itself.

use support::postgres::Postgres;

#[tokio::test]
async fn two_servers_start_in_parallel_on_different_ports() {
    let (a, b) = tokio::join!(Postgres::start(), Postgres::start());
    assert_ne!(a.port(), b.port());
    assert_eq!(a.address(), format!("127.0.0.1:{}", a.port()));
    assert_ne!(a.admin_password(), b.admin_password());

    for pg in [&a, &b] {
        let pool = pg.admin().await;
        let port: String = sqlx::query_scalar("SHOW port")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(port, pg.port().to_string());
        pool.close().await;
    }
}

#[tokio::test]
async fn create_login_then_scram_login_with_right_password_only() {
    let pg = Postgres::start().await;
    // Characters that need quoting in SQL and percent-encoding in URLs.
    let password = "s3cr'et pa:ss@w/rd%";
    pg.create_login("app user", password, "app db").await;

    pg.try_login("app user", password, "app db")
        .await
        .expect("login with the right password");

    let err = pg
        .try_login("app user", "wrong", "app db")
        .await
        .expect_err("login with a wrong password must fail");
    assert!(err.contains("password authentication failed"), "{err}");

    // The URL form works too.
    let url = pg.url("app user", password, "app db");
    assert!(
        url.starts_with(&format!(
            "postgres://app%20user:s3cr%27et%20pa%3Ass%40w%2Frd%25@127.0.0.1:{}/",
            pg.port()
        )),
        "{url}"
    );
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .expect("connect by url");
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(db, "app db");

    // Calling it again re-passwords the role and keeps the database.
    pg.create_login("app user", "second", "app db").await;
    assert!(pg.try_login("app user", password, "app db").await.is_err());
    pg.try_login("app user", "second", "app db").await.unwrap();
}

#[tokio::test]
async fn log_records_statements_but_not_create_login_passwords() {
    let pg = Postgres::start().await;
    pg.exec("CREATE TABLE harness_marker_table (id int); SELECT 'harness-marker-42'")
        .await;
    pg.create_login("logger", "never-in-the-log-9c1f", "logger")
        .await;

    let log = pg.log_contents();
    assert!(log.contains("harness_marker_table"), "log:\n{log}");
    assert!(log.contains("harness-marker-42"), "log:\n{log}");
    assert!(!log.contains("never-in-the-log-9c1f"), "log:\n{log}");
}

#[tokio::test]
async fn rolpassword_is_a_scram_verifier() {
    let pg = Postgres::start().await;
    pg.create_login("scram_user", "pw", "scram_db").await;
    let verifier = pg
        .rolpassword("scram_user")
        .await
        .expect("role has a password");
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    assert_eq!(pg.rolpassword("no_such_role").await, None);
}

#[tokio::test]
async fn drop_stops_the_server_and_removes_its_files() {
    let pg = Postgres::start().await;
    let pid_file = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
    let pid = pid_file.lines().next().unwrap().trim().to_string();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let root = pg.data_dir().parent().unwrap().to_path_buf();
    drop(pg);
    assert!(!root.exists(), "{} still exists", root.display());
    // The postmaster may linger a moment as a zombie; wait for it to go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z");
        if gone {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "postmaster {pid} still running"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
