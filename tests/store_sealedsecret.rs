//! The `sealedsecret` store against the API fake playing the sealed-secrets controller (with a
//! key pair made by openssl) and a real PostgreSQL.

use std::time::Duration;
use support::config::ConfigBuilder;

use base64::Engine as _;
use serde_json::json;
use support::kube_fake::{KubeFake, Rollout, Unsealer, WorkloadKind};
use support::postgres::Postgres;
use support::rotator::{assert_no_secret, failed_steps, random_password, Rotator, NS};
use support::sealed;

const NAME: &str = "llmtrace-postgresql";

struct Setup {
    pg: Postgres,
    kube: KubeFake,
    rotator: Rotator,
    key: rsa::RsaPrivateKey,
    old_password: String,
}

fn config(pg: &Postgres, timeout: &str, certificate: &str) -> String {
    ConfigBuilder::new()
        .postgres(&pg.address())
        .store("sealedsecret")
        .str("namespace", "llmtrace")
        .str("name", NAME)
        .str("key", "password")
        .str("format", "password")
        .lines(certificate)
        .str("timeout", timeout)
        .deployment_consumer("20s")
        .build()
}

async fn setup(timeout: &str, unsealer_running: bool) -> Setup {
    setup_with(timeout, unsealer_running, "certificate = \"cert.pem\"").await
}

async fn setup_with(timeout: &str, unsealer_running: bool, certificate: &str) -> Setup {
    setup_scoped(timeout, unsealer_running, certificate, &[]).await
}

/// `annotations` on the SealedSecret select its scope; the committed values are sealed for it.
async fn setup_scoped(
    timeout: &str,
    unsealer_running: bool,
    certificate: &str,
    annotations: &[(&str, &str)],
) -> Setup {
    let pg = Postgres::start().await;
    let old_password = random_password();
    pg.create_login("llmtrace", &old_password, "llmtrace").await;
    let mut rotator = Rotator::new(&config(&pg, timeout, certificate));
    let (_cert, key) = sealed::keypair(rotator.dir.path());
    let public = key.to_public_key();
    let kube = KubeFake::start().await;
    let label = sealed::label_for(&json!({ "metadata": {
        "namespace": NS, "name": NAME,
        "annotations": annotations.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
    }}));
    // What the controller made of the SealedSecret committed to Git.
    kube.add_scoped_sealed_secret(
        NS,
        NAME,
        annotations,
        &[
            (
                "password",
                &sealed::seal_with_label(&public, &label, old_password.as_bytes()),
            ),
            (
                "postgres-password",
                &sealed::seal_with_label(&public, &label, pg.admin_password().as_bytes()),
            ),
        ],
    );
    kube.put_unsealed_secret(
        NS,
        NAME,
        &[
            ("password", &old_password),
            ("postgres-password", pg.admin_password()),
        ],
    );
    kube.set_unsealer(if unsealer_running {
        Unsealer::Running {
            private_key: Box::new(key.clone()),
            delay: Duration::from_millis(300),
        }
    } else {
        Unsealer::Stopped
    });
    kube.add_deployment(
        NS,
        "llmtrace",
        2,
        Rollout::ReadyAfter(Duration::from_millis(300)),
    );
    let kubeconfig = kube.write_kubeconfig(rotator.dir.path());
    rotator
        .env
        .insert("KUBECONFIG".into(), kubeconfig.display().to_string());
    rotator
        .env
        .insert("PG_ADMIN_PASSWORD".into(), pg.admin_password().into());
    Setup {
        pg,
        kube,
        rotator,
        key,
        old_password,
    }
}

fn encrypted(kube: &KubeFake, key: &str) -> String {
    kube.sealed_secret(NS, NAME).unwrap()["spec"]["encryptedData"][key]
        .as_str()
        .unwrap()
        .to_string()
}

fn unsealed(s: &Setup, key: &str) -> String {
    let plain = sealed::unseal(&s.key, NS, NAME, &encrypted(&s.kube, key)).expect("unseals");
    String::from_utf8(plain).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn seals_the_new_password_and_waits_for_the_controller() {
    let s = setup("20s", true).await;
    let admin_blob = encrypted(&s.kube, "postgres-password");

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let secret = s.kube.secret(NS, NAME).unwrap();
    let new = secret["password"].clone();
    assert_ne!(new, s.old_password);
    assert_eq!(
        unsealed(&s, "password"),
        new,
        "kubeseal's format, strict scope"
    );
    let blob = encrypted(&s.kube, "password");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(&blob)
        .unwrap();
    assert!(!blob.contains(&new));
    assert!(!raw.windows(new.len()).any(|w| w == new.as_bytes()));
    assert!(
        sealed::unseal(&s.key, NS, "another-name", &blob).is_err(),
        "bound to namespace/name"
    );
    assert_eq!(
        encrypted(&s.kube, "postgres-password"),
        admin_blob,
        "other keys untouched"
    );
    assert_eq!(secret["postgres-password"], s.pg.admin_password());
    let restarts = s.kube.restarts(WorkloadKind::Deployment, NS, "llmtrace");
    assert_eq!(restarts.len(), 1);
    s.pg.assert_only_login("llmtrace", "llmtrace", &new, &s.old_password)
        .await;
    assert!(out.all().contains(" TRACE "), "ran at trace level");
    assert_no_secret(
        &out.all(),
        &[s.old_password.as_str(), &new, s.pg.admin_password()],
        "rotator output at trace level",
    );
    // RBAC proof for a SealedSecret store: every request is allowed by what `rbac` prints.
    assert!(support::rotator::assert_rbac_allows(&s.rotator, &s.kube) > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_that_never_unseals_times_out_and_rolls_back() {
    let s = setup("2s", false).await;

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    let report = out.json();
    assert_eq!(report["outcome"], "rolled_back");
    let failed = failed_steps(&report);
    assert_eq!(failed[0]["step"], "publish", "{report:#}");
    assert!(failed[0]["error"]
        .as_str()
        .unwrap()
        .contains("did not unseal"));
    assert_eq!(
        unsealed(&s, "password"),
        s.old_password,
        "the old value sealed back"
    );
    assert_eq!(s.kube.secret(NS, NAME).unwrap()["password"], s.old_password);
    assert!(s
        .kube
        .restarts(WorkloadKind::Deployment, NS, "llmtrace")
        .is_empty());
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("old password logs in");
    assert_no_secret(
        &out.all(),
        &[s.old_password.as_str(), s.pg.admin_password()],
        "rotator output at trace level",
    );
}

/// `certificate_url`: the PEM comes from the controller's `/v1/cert.pem`.
#[tokio::test(flavor = "multi_thread")]
async fn fetches_the_certificate_from_the_controller() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/cert.pem", listener.local_addr().unwrap());
    let s = setup_with("20s", true, &format!("certificate_url = \"{url}\"")).await;
    let pem = std::fs::read_to_string(s.rotator.path("cert.pem")).unwrap();
    let app = axum::Router::new().route(
        "/v1/cert.pem",
        axum::routing::get(move || async move { pem }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    server.abort();

    assert_eq!(out.code, 0, "{}", out.all());
    let new = s.kube.secret(NS, NAME).unwrap()["password"].clone();
    assert_ne!(new, s.old_password);
    assert_eq!(unsealed(&s, "password"), new);
}

/// Killed while waiting for a controller that is down: the Secret still shows the old password
/// but the SealedSecret holds the new one; recovery must seal the old one back, or the controller
/// would later unseal a password the backend no longer accepts.
#[tokio::test(flavor = "multi_thread")]
async fn killed_while_waiting_for_the_controller_then_recovered() {
    let s = setup("60s", false).await;
    let generation = |kube: &KubeFake| {
        kube.sealed_secret(NS, NAME).unwrap()["metadata"]["generation"]
            .as_i64()
            .unwrap()
    };
    let before = generation(&s.kube);
    let mut child = s.rotator.spawn(&["rotate"]);
    tokio::time::timeout(Duration::from_secs(30), async {
        while generation(&s.kube) == before {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the rotator wrote the SealedSecret");
    child.kill().await.unwrap();
    assert_ne!(
        unsealed(&s, "password"),
        s.old_password,
        "the new value is sealed"
    );

    // The controller is still down: the Secret shows the old password, so recovery rolls back.
    let out = s.rotator.run(&["recover", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    assert_eq!(out.json()[0]["outcome"], "rolled_back", "{}", out.stdout);
    assert_eq!(
        unsealed(&s, "password"),
        s.old_password,
        "the old value sealed back"
    );
    // When the controller comes back, it unseals the old password.
    s.kube.set_unsealer(Unsealer::Running {
        private_key: Box::new(s.key.clone()),
        delay: Duration::ZERO,
    });
    assert_eq!(s.kube.secret(NS, NAME).unwrap()["password"], s.old_password);
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("old password logs in");
}

/// The password as the controller would unseal it, with the label it derives from the object.
fn unsealed_as_controller(s: &Setup, key: &str) -> Result<String, String> {
    let object = s.kube.sealed_secret(NS, NAME).unwrap();
    let label = sealed::label_for(&object);
    sealed::unseal_with_label(&s.key, &label, &encrypted(&s.kube, key))
        .map(|p| String::from_utf8(p).unwrap())
}

/// The controller decrypts with `labelFor` of the SealedSecret's annotations: strict
/// `namespace/name`, `namespace-wide: "true"` the namespace, `cluster-wide: "true"` empty
/// (bitnami-labs/sealed-secrets pkg/apis/sealedsecrets/v1alpha1/sealedsecret_expansion.go
/// `labelFor`, `SecretScope`, `EncryptionLabel`; `Unseal` fails the object if one key fails).
/// The write and the rollback's write-back both seal for the object's scope.
#[tokio::test(flavor = "multi_thread")]
async fn every_scope_is_sealed_with_the_label_the_controller_derives() {
    for (annotations, label) in [
        (vec![], "llmtrace/llmtrace-postgresql"),
        (
            vec![("sealedsecrets.bitnami.com/namespace-wide", "true")],
            "llmtrace",
        ),
        (vec![("sealedsecrets.bitnami.com/cluster-wide", "true")], ""),
    ] {
        let s = setup_scoped("5s", true, "certificate = \"cert.pem\"", &annotations).await;
        let object = s.kube.sealed_secret(NS, NAME).unwrap();
        assert_eq!(sealed::label_for(&object), label);

        let out = s.rotator.run(&["rotate", "--output", "json"]).await;

        assert_eq!(out.code, 0, "{label:?}: {}", out.all());
        let new = s.kube.secret(NS, NAME).unwrap()["password"].clone();
        assert_ne!(new, s.old_password, "{label:?}");
        assert_eq!(
            unsealed_as_controller(&s, "password").unwrap(),
            new,
            "{label:?}"
        );
        s.pg.try_login("llmtrace", &new, "llmtrace")
            .await
            .expect("new password logs in");

        // A rollback seals the previous value back for the same scope, and the controller
        // unseals it.
        s.kube.set_rollout(
            WorkloadKind::Deployment,
            NS,
            "llmtrace",
            Rollout::Stuck {
                deadline: Duration::from_secs(1),
            },
        );
        let out = s.rotator.run(&["rotate", "--output", "json"]).await;
        assert_eq!(out.code, 1, "{label:?}: {}", out.all());
        assert_eq!(
            out.json()["outcome"],
            "rolled_back",
            "{label:?}: {}",
            out.stdout
        );
        assert_eq!(
            unsealed_as_controller(&s, "password").unwrap(),
            new,
            "{label:?}"
        );
        assert_eq!(
            s.kube.secret(NS, NAME).unwrap()["password"],
            new,
            "{label:?}"
        );
        let status = &s.kube.sealed_secret(NS, NAME).unwrap()["status"]["conditions"][0];
        assert_eq!(status["status"], "True", "{label:?}: {status}");
        s.pg.try_login("llmtrace", &new, "llmtrace")
            .await
            .expect("the previous password logs in again");
    }
}

/// kubeseal's `ParseKey` (pkg/kubeseal/kubeseal.go) takes the first certificate of a chain
/// and refuses an expired one; so does the store, at preflight, before anything changes.
#[tokio::test(flavor = "multi_thread")]
async fn takes_the_first_certificate_of_a_chain_and_refuses_an_expired_one() {
    let s = setup("20s", true).await;
    let cert = s.rotator.path("cert.pem");
    let controller = std::fs::read_to_string(&cert).unwrap();
    // An unrelated CA certificate after the controller's.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = sealed::keypair(other_dir.path());
    std::fs::write(
        &cert,
        format!("{controller}{}", std::fs::read_to_string(other).unwrap()),
    )
    .unwrap();

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 0, "{}", out.all());
    let new = s.kube.secret(NS, NAME).unwrap()["password"].clone();
    assert_eq!(unsealed(&s, "password"), new);

    // The same key in a certificate that expired yesterday.
    let key = s.rotator.path("key.pem");
    let expired = s.rotator.path("expired.pem");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl req -new -key {key} -subj /CN=expired | openssl x509 -req -signkey {key} -days -1 -out {expired}",
            key = key.display(),
            expired = expired.display()
        ))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy(&expired, &cert).unwrap();
    let generation = s.kube.sealed_secret(NS, NAME).unwrap()["metadata"]["generation"].clone();

    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout.contains("certificate: expired on "),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("kubeseal --fetch-cert"),
        "{}",
        out.stdout
    );
    assert_eq!(
        s.kube.sealed_secret(NS, NAME).unwrap()["metadata"]["generation"],
        generation,
        "the SealedSecret is untouched"
    );
    s.pg.try_login("llmtrace", &new, "llmtrace")
        .await
        .expect("the password is untouched");
}

/// `certificate_sha256` pins a fetched certificate (certificate_url is plain HTTP in most
/// clusters): a different one is refused at preflight; the pinned one (openssl's
/// colon-separated fingerprint) works.
#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_certificate_url_refuses_any_other_certificate() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/cert.pem", listener.local_addr().unwrap());
    let s = setup_with(
        "20s",
        true,
        &format!("certificate_url = \"{url}\"\n  certificate_sha256 = \"PIN\""),
    )
    .await;
    let pem = std::fs::read_to_string(s.rotator.path("cert.pem")).unwrap();
    let app = axum::Router::new().route(
        "/v1/cert.pem",
        axum::routing::get(move || async move { pem }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let fingerprint = |path: &std::path::Path| {
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        text.trim().split_once('=').unwrap().1.to_string()
    };
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = sealed::keypair(other_dir.path());
    let config = std::fs::read_to_string(&s.rotator.config).unwrap();

    s.rotator
        .write_config(&config.replace("PIN", &fingerprint(&other)));
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;

    assert_eq!(out.code, 1, "{}", out.all());
    assert_eq!(out.json()["outcome"], "refused");
    assert!(
        out.stdout.contains("but certificate_sha256 pins"),
        "{}",
        out.stdout
    );
    assert_eq!(s.kube.secret(NS, NAME).unwrap()["password"], s.old_password);

    s.rotator
        .write_config(&config.replace("PIN", &fingerprint(&s.rotator.path("cert.pem"))));
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    server.abort();

    assert_eq!(out.code, 0, "{}", out.all());
    let new = s.kube.secret(NS, NAME).unwrap()["password"].clone();
    assert_ne!(new, s.old_password);
    assert_eq!(unsealed(&s, "password"), new);
}

/// `check` compares the SealedSecret with its Secret through the controller's own report
/// (bitnami-labs/sealed-secrets pkg/controller/controller.go `updateSealedSecretStatus`: a
/// `Synced` condition and `observedGeneration`): a spec the controller has not unsealed (a
/// GitOps revert while it is down: the Secret still logs in, but the next start of the
/// controller brings the old password) or one it cannot decrypt is drift.
#[tokio::test(flavor = "multi_thread")]
async fn check_reports_a_sealed_secret_its_controller_has_not_or_cannot_unseal() {
    let s = setup("20s", true).await;
    let public = s.key.to_public_key();
    let out = s.rotator.run(&["check"]).await;
    assert_eq!(out.code, 0, "{}", out.all());

    // The controller is down; Git brings back a value sealed before.
    s.kube.set_unsealer(Unsealer::Stopped);
    let reverted = sealed::seal(&public, NS, NAME, b"an-older-password");
    s.kube
        .apply_sealed_secret(NS, NAME, &[("password", &reverted)]);
    let out = s.rotator.run(&["check", "--output", "json"]).await;
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout
            .contains("the controller has not unsealed the SealedSecret's current spec"),
        "{}",
        out.stdout
    );
    assert_eq!(
        s.kube.secret(NS, NAME).unwrap()["password"],
        s.old_password,
        "the Secret still logs in: only the comparison finds it"
    );

    // Back up, but the value was sealed for another name (strict scope): no key decrypts it.
    s.kube.set_unsealer(Unsealer::Running {
        private_key: Box::new(s.key.clone()),
        delay: Duration::ZERO,
    });
    let foreign = sealed::seal(&public, NS, "another-name", s.old_password.as_bytes());
    s.kube
        .apply_sealed_secret(NS, NAME, &[("password", &foreign)]);
    let out = s.rotator.run(&["check", "--output", "json"]).await;
    assert_ne!(out.code, 0, "{}", out.all());
    assert!(
        out.stdout
            .contains("the controller cannot unseal the SealedSecret"),
        "{}",
        out.stdout
    );

    // Sealed right again: no drift.
    let good = sealed::seal(&public, NS, NAME, s.old_password.as_bytes());
    s.kube.apply_sealed_secret(NS, NAME, &[("password", &good)]);
    let out = s.rotator.run(&["check"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    assert_no_secret(&out.all(), &[s.old_password.as_str()], "check output");
}

/// The controller unseals only into a Secret it controls, or one annotated for it to manage or
/// patch (sealed-secrets pkg/controller/controller.go, `unseal`: "Resource ... already exists and
/// is not managed by SealedSecret"). A Secret made by hand before the SealedSecret is refused at
/// preflight, before the password changes, with what to do; once annotated `managed`, the
/// rotation goes through and the controller adopts it.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_the_controller_does_not_manage_is_refused_before_anything_changes() {
    let s = setup("20s", true).await;
    // The same Secret, made by hand: no controller reference.
    s.kube.delete_secret(NS, NAME);
    s.kube.put_secret(
        NS,
        NAME,
        &[
            ("password", &s.old_password),
            ("postgres-password", s.pg.admin_password()),
        ],
    );
    let secret = s.kube.secret_json(NS, NAME).unwrap();
    assert!(secret["metadata"]["ownerReferences"].is_null());
    let sealed_before = encrypted(&s.kube, "password");

    let refused = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_ne!(refused.code, 0, "{}", refused.all());
    assert_eq!(refused.json()["outcome"], "refused", "{}", refused.stdout);
    assert!(
        refused.stdout.contains("not managed by the SealedSecret")
            && refused.stdout.contains("sealedsecrets.bitnami.com/managed"),
        "{}",
        refused.stdout
    );
    assert_eq!(
        encrypted(&s.kube, "password"),
        sealed_before,
        "not resealed"
    );
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("the password did not change");

    s.kube
        .annotate_secret(NS, NAME, "sealedsecrets.bitnami.com/managed", "true");
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    assert_eq!(out.code, 0, "{}", out.all());
    let new = s.kube.secret(NS, NAME).unwrap()["password"].clone();
    assert!(new != s.old_password, "rotated");
    s.pg.try_login("llmtrace", &new, "llmtrace").await.unwrap();
    let owners = &s.kube.secret_json(NS, NAME).unwrap()["metadata"]["ownerReferences"];
    assert_eq!(owners[0]["kind"], "SealedSecret", "adopted: {owners}");
    assert_no_secret(
        &format!("{}{}", refused.all(), out.all()),
        &[&s.old_password, &new, s.pg.admin_password()],
        "both runs",
    );
}

/// The controller renders `spec.template.data` over `encryptedData` (sealed-secrets
/// sealedsecret_expansion.go `Unseal`), and the API server refuses any change to an immutable
/// Secret's data (controller.go `isImmutableError`): a new sealed value would never show. Both
/// are refused at preflight, before the password changes.
#[tokio::test(flavor = "multi_thread")]
async fn a_template_that_sets_the_key_or_an_immutable_secret_is_refused() {
    let s = setup("20s", true).await;
    let refused = |out: &support::rotator::Output, why: &str| {
        assert_ne!(out.code, 0, "{}", out.all());
        assert_eq!(out.json()["outcome"], "refused", "{}", out.stdout);
        assert!(out.stdout.contains(why), "{why}: {}", out.stdout);
        assert_no_secret(
            &out.all(),
            &[&s.old_password, s.pg.admin_password()],
            "refused rotate",
        );
    };
    // The controller unseals a change once its delay (300 ms) is over.
    let unsealed_after_delay = || tokio::time::sleep(Duration::from_millis(400));

    s.kube.edit_sealed_secret(NS, NAME, |obj| {
        obj["spec"]["template"]["data"] = json!({ "password": "set-by-the-template" });
    });
    unsealed_after_delay().await;
    // The controller shows what it renders: the template's value, not the sealed one.
    assert_eq!(
        s.kube.secret(NS, NAME).unwrap()["password"],
        "set-by-the-template"
    );
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    refused(&out, "spec.template.data sets password");

    s.kube.edit_sealed_secret(NS, NAME, |obj| {
        obj["spec"]["template"]
            .as_object_mut()
            .unwrap()
            .remove("data");
    });
    // The template no longer overrides it; then the Secret is made immutable.
    unsealed_after_delay().await;
    let unsealed_now = s.kube.secret(NS, NAME).unwrap()["password"].clone();
    assert!(unsealed_now == s.old_password, "the sealed value is back");
    s.kube
        .edit_secret(NS, NAME, |secret| secret["immutable"] = json!(true));
    let out = s.rotator.run(&["rotate", "--output", "json"]).await;
    refused(&out, "the Secret is immutable");

    // Nothing changed: the sealed value and the password are the ones from before.
    assert!(unsealed(&s, "password") == s.old_password, "not resealed");
    s.pg.try_login("llmtrace", &s.old_password, "llmtrace")
        .await
        .expect("the password did not change");
}
