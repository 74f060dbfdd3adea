//! The gateway's own process in front of an HTTPS upstream: the simulator
//! behind a TLS front with the test certificate for `localhost`
//! (tests/data/tls), trusted through `SSL_CERT_FILE` or the upstream's
//! `ca_file`, or not.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use serde_json::{json, Value};
use tokenwarden::catalog::Catalog;
use tokenwarden::simulator::{self, SimConfig, Simulator};

use crate::harness::{http_client, repo, serve_process, spawn, temp_dir, UPSTREAM_KEY};

const KEY: &str = "tw-https-test-key-000001";

/// A TLS front on port 0 with the `localhost` certificate, passing each
/// connection's bytes to and from `upstream` as they are.
async fn tls_front(upstream: std::net::SocketAddr) -> u16 {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let read = |name: &str| {
        std::fs::read(repo(&format!("tests/data/tls/{name}"))).unwrap_or_else(|e| panic!("{e}"))
    };
    tokenwarden::gateway::upstream::install_crypto_provider();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![
                CertificateDer::from(read("localhost.der")),
                CertificateDer::from(read("ca.der")),
            ],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(read("localhost.key.der"))),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    port
}

/// `tokenwarden serve` in front of `https://localhost:PORT/v1`, trusting the
/// roots in the PEM file `roots` as the platform's, and those in `ca_file`
/// (the upstream's `ca_file`) for that upstream; its base URL.
fn start_gateway(
    dir: &std::path::Path,
    port: u16,
    roots: &str,
    ca_file: Option<&str>,
) -> (Gateway, String) {
    let config = dir.join("tokenwarden.toml");
    let ca_file = ca_file.map_or(String::new(), |name| {
        format!(
            "ca_file = \"{}\"\n",
            repo(&format!("tests/data/tls/{name}")).display()
        )
    });
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}\"\n\n[upstreams.private]\nbase_url = \"https://localhost:{port}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n{ca_file}\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nupstream = \"private\"\nkeys = [\"{KEY}\"]\n",
            dir.join("ledger.db").display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (child, base) = serve_process(
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("UPSTREAM_KEY", UPSTREAM_KEY)
            .env("SSL_CERT_FILE", repo(&format!("tests/data/tls/{roots}")))
            .env_remove("SSL_CERT_DIR")
            .stderr(Stdio::piped()),
    );
    (Gateway(Some(child)), base)
}

/// A chat completion through the gateway at `base`.
async fn chat(client: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(KEY)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A gateway process, killed when dropped (a failed assertion included).
struct Gateway(Option<Child>);

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Stop a gateway and return what it logged.
fn stop(mut gateway: Gateway) -> String {
    let Some(mut child) = gateway.0.take() else {
        return String::new();
    };
    let _ = child.kill();
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_when_its_authority_is_trusted_and_refused_when_not() {
    let sim = Simulator::new(
        Catalog::builtin().unwrap_or_else(|e| panic!("{e}")),
        SimConfig::default(),
    );
    let (sim_addr, _sim_stop) = spawn(simulator::router(sim.clone())).await;
    let port = tls_front(sim_addr).await;
    let client = http_client();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello over TLS"}], "max_tokens": 5});

    // Trusting the test authority: the call goes through and is metered.
    let dir = temp_dir("https-trusted");
    let (gateway, base) = start_gateway(&dir, port, "ca.pem", None);
    for _ in 0..2 {
        let response = chat(&client, &base, &body).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("x-free-tokens-remaining"));
        let answer: Value = response.json().await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer["object"], "chat.completion", "{answer}");
        assert_eq!(answer["usage"]["completion_tokens"], 5, "{answer}");
    }
    let served = sim.stats().get(UPSTREAM_KEY).cloned().unwrap_or_default();
    assert_eq!(served.requests, 2);
    stop(gateway);

    // Trusting only the server's own certificate, not its issuer: refused.
    let dir = temp_dir("https-untrusted");
    let (gateway, base) = start_gateway(&dir, port, "localhost.pem", None);
    let response = chat(&client, &base, &body).await;
    assert_eq!(response.status(), 502);
    let text = response.text().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(text.contains("could not be reached"), "{text}");
    assert!(!text.contains(UPSTREAM_KEY));
    let log = stop(gateway);
    assert!(
        log.contains("upstream call failed upstream=\"private\" error=client error (Connect): invalid peer certificate: UnknownIssuer"),
        "{log}"
    );
    // Piped, not a terminal: plain text, no colour codes.
    assert!(!log.contains('\u{1b}'), "{log:?}");
    assert!(!log.contains(UPSTREAM_KEY));
    assert_eq!(
        sim.stats()
            .get(UPSTREAM_KEY)
            .map(|s| s.requests)
            .unwrap_or_default(),
        2
    );

    // The same platform roots, and the authority named by the upstream's
    // own `ca_file`: the call goes through again.
    let dir = temp_dir("https-ca-file");
    let (gateway, base) = start_gateway(&dir, port, "localhost.pem", Some("ca.pem"));
    let response = chat(&client, &base, &body).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(answer["usage"]["completion_tokens"], 5, "{answer}");
    assert_eq!(
        sim.stats()
            .get(UPSTREAM_KEY)
            .map(|s| s.requests)
            .unwrap_or_default(),
        3
    );
    stop(gateway);

    // `ca_file` adds to the platform's roots rather than replacing them:
    // with the authority among the platform's and only the server's own
    // certificate in `ca_file`, the call still goes through.
    let dir = temp_dir("https-ca-file-adds");
    let (gateway, base) = start_gateway(&dir, port, "ca.pem", Some("localhost.pem"));
    let response = chat(&client, &base, &body).await;
    assert_eq!(response.status(), 200);
    stop(gateway);
}
