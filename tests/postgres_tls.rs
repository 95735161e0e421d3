//! PostgreSQL over TLS: a server with `ssl = on`, a certificate from a throwaway CA, and a
//! pg_hba.conf that takes TCP logins over TLS only (`hostssl`, PostgreSQL
//! src/backend/libpq/hba.c), so every connection that works (preflight, the admin's
//! `ALTER ROLE`, logins, the journal) proved it used TLS. `sslmode` follows libpq's meaning
//! (src/interfaces/libpq/fe-secure-openssl.c, `verify_peer_name_matches_certificate`):
//! `require` encrypts without checking the certificate, `verify-full` checks the chain against
//! `ca_file` and the host name against the certificate's subjectAltName.

use support::config::{quoted, ConfigBuilder};
use support::pki::Pki;
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, random_password, Rotator};

struct Tls {
    pg: Postgres,
    rotator: Rotator,
    old: String,
    ca: std::path::PathBuf,
}

/// A TLS server whose certificate names only `DNS:localhost`, a login `llmtrace` and a
/// dotenv store holding its URL.
async fn start() -> Tls {
    let pki = Pki::new("DNS:localhost");
    let ca = pki.ca();
    // The CA must outlive the server's copy of the PKI dir: keep a copy beside the config.
    let pg = Postgres::start_tls(pki).await;
    let old = random_password();
    pg.create_login("llmtrace", &old, "llmtrace").await;
    let mut rotator = Rotator::new("");
    let ca_copy = rotator.path("ca.crt");
    std::fs::copy(&ca, &ca_copy).unwrap();
    std::fs::write(
        rotator.path(".env"),
        format!("LLMTRACE_POSTGRES_URL=postgres://llmtrace:{old}@localhost:{}/llmtrace?sslmode=verify-full\n", pg.port()),
    )
    .unwrap();
    rotator
        .env
        .insert("PG_ADMIN_PASSWORD".into(), pg.admin_password().to_string());
    Tls {
        pg,
        rotator,
        old,
        ca: ca_copy,
    }
}

fn config(journal: &str, host: &str, port: u16, sslmode: &str, ca_file: Option<&str>) -> String {
    let config = ConfigBuilder::new()
        .rotator("journal", quoted(journal))
        .postgres(&format!("{host}:{port}"))
        .str("sslmode", sslmode);
    match ca_file {
        Some(path) => config.str("ca_file", path),
        None => config,
    }
    .file_store("LLMTRACE_POSTGRES_URL", "url")
    .command_consumer(&["true"])
    .build()
}

impl Tls {
    fn stored(&self) -> String {
        let text = std::fs::read_to_string(self.rotator.path(".env")).unwrap();
        let url =
            url::Url::parse(text.trim().strip_prefix("LLMTRACE_POSTGRES_URL=").unwrap()).unwrap();
        url.password().unwrap().to_string()
    }

    /// A rotation that must be refused at preflight, leaving the password and the store alone.
    async fn assert_refused(&self, text: &str, why: &str) {
        self.rotator.write_config(text);
        let before = self.pg.rolpassword("llmtrace").await;
        let out = self.rotator.run(&["rotate", "--output", "json"]).await;
        assert_eq!(out.code, 1, "{why}: {}", out.all());
        assert_eq!(out.json()["outcome"], "refused", "{why}: {}", out.all());
        assert_eq!(self.stored(), self.old, "{why}: store unchanged");
        assert_eq!(
            self.pg.rolpassword("llmtrace").await,
            before,
            "{why}: role unchanged"
        );
        assert_no_secret(
            &out.all(),
            &[&self.old, self.pg.admin_password()],
            "rotator output",
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_with_the_right_ca_and_host_name_rotates_and_keeps_the_journal_over_tls() {
    let mut tls = start().await;
    let ca = tls.ca.display().to_string();
    tls.rotator.env.insert(
        "JOURNAL_URL".into(),
        format!(
            "postgres://postgres:{}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={ca}",
            tls.pg.admin_password(),
            tls.pg.port()
        ),
    );
    tls.rotator.write_config(&config(
        "env:JOURNAL_URL",
        "localhost",
        tls.pg.port(),
        "verify-full",
        Some(&ca),
    ));

    let out = tls.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = tls.stored();
    assert_ne!(new, tls.old);
    tls.pg
        .try_login("llmtrace", &new, "llmtrace")
        .await
        .expect("new password");
    assert!(tls
        .pg
        .try_login("llmtrace", &tls.old, "llmtrace")
        .await
        .is_err());
    // The journal is on the TLS-only server: the run is in it.
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM rotator_runs")
        .fetch_one(&tls.pg.admin().await)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    assert_no_secret(
        &out.all(),
        &[&tls.old, &new, tls.pg.admin_password()],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_full_refuses_a_wrong_ca_or_host_name_at_preflight_and_changes_nothing() {
    let tls = start().await;
    let port = tls.pg.port();
    let other = Pki::new("DNS:localhost");
    let wrong_ca = tls.rotator.path("other-ca.crt");
    std::fs::copy(other.ca(), &wrong_ca).unwrap();
    let (ca, wrong_ca) = (tls.ca.display().to_string(), wrong_ca.display().to_string());
    let journal = "sqlite://journal.db";

    tls.assert_refused(
        &config(journal, "localhost", port, "verify-full", Some(&wrong_ca)),
        "a CA that did not sign the server's certificate",
    )
    .await;
    // The certificate names localhost only: 127.0.0.1 is not its name.
    tls.assert_refused(
        &config(journal, "127.0.0.1", port, "verify-full", Some(&ca)),
        "a host name the certificate does not carry",
    )
    .await;
    // verify-ca checks the chain. It checks the name too here, unlike libpq: sqlx-core 0.8.6
    // (src/net/tls/tls_rustls.rs, `NoHostnameTlsVerifier`) forgives only
    // `CertificateError::NotValidForName`, while rustls 0.23.46 (src/error.rs) reports
    // `NotValidForNameContext`. Stricter, never weaker; the README says so.
    tls.assert_refused(
        &config(journal, "127.0.0.1", port, "verify-ca", Some(&ca)),
        "verify-ca with a name the certificate does not carry",
    )
    .await;
    tls.rotator
        .write_config(&config(journal, "localhost", port, "verify-ca", Some(&ca)));
    let out = tls.rotator.run(&["rotate"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_journal_with_a_wrong_ca_cannot_start_and_nothing_changes() {
    let mut tls = start().await;
    let other = Pki::new("DNS:localhost");
    let wrong_ca = tls.rotator.path("other-ca.crt");
    std::fs::copy(other.ca(), &wrong_ca).unwrap();
    tls.rotator.env.insert(
        "JOURNAL_URL".into(),
        format!(
            "postgres://postgres:{}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            tls.pg.admin_password(),
            tls.pg.port(),
            wrong_ca.display()
        ),
    );
    let ca = tls.ca.display().to_string();
    tls.rotator.write_config(&config(
        "env:JOURNAL_URL",
        "localhost",
        tls.pg.port(),
        "verify-full",
        Some(&ca),
    ));
    let before = tls.pg.rolpassword("llmtrace").await;

    let out = tls.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 4, "{}", out.all());
    assert_eq!(tls.stored(), tls.old);
    assert_eq!(tls.pg.rolpassword("llmtrace").await, before);
    assert_no_secret(
        &out.all(),
        &[&tls.old, tls.pg.admin_password()],
        "rotator output",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn require_encrypts_without_a_ca_and_disable_is_turned_away_by_a_tls_only_server() {
    let tls = start().await;
    let port = tls.pg.port();
    let journal = "sqlite://journal.db";
    // Without TLS the server's hostssl-only pg_hba.conf has no line for the login.
    tls.assert_refused(
        &config(journal, "127.0.0.1", port, "disable", None),
        "no TLS against a TLS-only server",
    )
    .await;

    tls.rotator
        .write_config(&config(journal, "127.0.0.1", port, "require", None));
    let out = tls.rotator.run(&["rotate"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    tls.pg
        .try_login("llmtrace", &tls.stored(), "llmtrace")
        .await
        .expect("new password");
}
