//! The client against a scripted server on a real socket: framing, interim
//! answers, keep-alive reuse, the one retry on a connection closed while
//! idle, and cancellation by dropping a body; and HTTPS against a server
//! with a test certificate (tests/data/tls).

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpListener;

use super::*;

/// What the scripted server does with one request.
enum Reply {
    /// Write these bytes and keep the connection.
    Keep(Vec<u8>),
    /// Write these bytes one at a time, then keep the connection.
    Trickle(Vec<u8>),
    /// Write these bytes, then close.
    Close(Vec<u8>),
    /// Write these bytes, then tell when the client closes the connection.
    AwaitClose(Vec<u8>, tokio::sync::mpsc::UnboundedSender<()>),
}

/// The requests a server saw, and how many connections it accepted.
#[derive(Default)]
struct Seen {
    accepted: AtomicUsize,
    requests: Mutex<Vec<String>>,
}

/// A server on port 0 answering each request by `script(connection, index
/// on that connection, request)`.
async fn server<F>(script: F) -> (Arc<Origin>, Arc<Seen>)
where
    F: Fn(usize, usize, &str) -> Reply + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let script = Arc::new(script);
    let state = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let index = state.accepted.fetch_add(1, Ordering::SeqCst);
            let script = Arc::clone(&script);
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                for n in 0.. {
                    let Some(request) = read_request(&mut socket, &mut buf).await else {
                        return;
                    };
                    state.requests.lock().unwrap().push(request.clone());
                    match script(index, n, &request) {
                        Reply::Keep(bytes) => socket.write_all(&bytes).await.unwrap(),
                        Reply::Trickle(bytes) => {
                            for b in bytes {
                                socket.write_all(&[b]).await.unwrap();
                                tokio::task::yield_now().await;
                            }
                        }
                        Reply::Close(bytes) => {
                            let _ = socket.write_all(&bytes).await;
                            return;
                        }
                        Reply::AwaitClose(bytes, closed) => {
                            socket.write_all(&bytes).await.unwrap();
                            let mut rest = [0u8; 64];
                            while socket.read(&mut rest).await.is_ok_and(|n| n > 0) {}
                            let _ = closed.send(());
                            return;
                        }
                    }
                }
            });
        }
    });
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let origin = Origin::new(&format!("http://{addr}/v1/"), &connector).unwrap();
    (Arc::new(origin), seen)
}

/// One request (head and `content-length` body) as text; `None` at the end.
async fn read_request(socket: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(at) = memchr::memmem::find(buf, b"\r\n\r\n") {
            let head = String::from_utf8(buf[..at].to_vec()).unwrap();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |n| n.parse::<usize>().unwrap());
            if buf.len() >= at + 4 + length {
                let request = String::from_utf8(buf[..at + 4 + length].to_vec()).unwrap();
                buf.drain(..at + 4 + length);
                return Some(request);
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn post(origin: &Arc<Origin>, body: &'static str) -> io::Result<Answer> {
    let mut head = origin.start_head("POST", "/chat/completions");
    put_header(
        &mut head,
        &HeaderName::from_static("x-test"),
        &HeaderValue::from_static("1"),
    );
    end_head(&mut head, body.len(), true);
    origin
        .call(head, Bytes::from_static(body.as_bytes()), false)
        .await
}

async fn text(answer: Answer) -> io::Result<String> {
    let mut body = answer.body;
    Ok(String::from_utf8(body.collect().await?.to_vec()).unwrap())
}

fn json(body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn a_content_length_body_and_the_connection_reused() {
    let (origin, seen) = server(|_, n, _| Reply::Keep(json(&format!("{{\"n\":{n}}}")))).await;
    for n in 0..3 {
        let answer = post(&origin, "{\"a\":1}").await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers["content-type"], "application/json");
        assert_eq!(text(answer).await.unwrap(), format!("{{\"n\":{n}}}"));
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    let requests = seen.requests.lock().unwrap();
    assert_eq!(
        requests[0],
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nx-test: 1\r\ncontent-length: 7\r\n\r\n{{\"a\":1}}",
            origin.authority
        )
    );
}

#[tokio::test]
async fn a_chunked_body_read_a_byte_at_a_time_with_extensions_and_trailers() {
    let wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
        5;ext=1\r\nhello\r\n19\r\n, world, in two chunks..!\r\n0\r\nx-trailer: y\r\n\r\n"
        .to_vec();
    let (origin, seen) = server(move |_, _, _| Reply::Trickle(wire.clone())).await;
    for _ in 0..2 {
        let answer = post(&origin, "{}").await.unwrap();
        assert!(!answer.headers.contains_key("content-length"));
        assert_eq!(
            text(answer).await.unwrap(),
            "hello, world, in two chunks..!"
        );
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn chunks_pass_on_as_they_arrive() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let tx = Mutex::new(Some(tx));
    let (origin, _) = server(move |_, _, _| {
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n".to_vec();
        Reply::AwaitClose(head, tx.lock().unwrap().take().unwrap())
    })
    .await;
    let answer = post(&origin, "{}").await.unwrap();
    let mut body = answer.body;
    let first = std::future::poll_fn(|cx| body.poll_chunk(cx)).await;
    assert_eq!(&first.unwrap().unwrap()[..], b"abc");
    // The rest never comes; dropping the body closes the connection.
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_body_to_the_connections_end_then_a_new_connection() {
    let (origin, seen) = server(|_, _, _| {
        Reply::Close(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the end".to_vec())
    })
    .await;
    for _ in 0..2 {
        let answer = post(&origin, "{}").await.unwrap();
        assert_eq!(text(answer).await.unwrap(), "until the end");
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn interim_answers_are_skipped_and_bodiless_answers_have_no_body() {
    let (origin, seen) = server(|_, n, request| {
        let head_request = request.starts_with("HEAD ");
        Reply::Keep(match (n, head_request) {
            (_, true) => b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n".to_vec(),
            (0, _) => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            _ => json("{}"),
        })
    })
    .await;
    let answer = post(&origin, "{}").await.unwrap();
    assert_eq!(answer.status, StatusCode::NO_CONTENT);
    assert_eq!(text(answer).await.unwrap(), "");
    let mut head = origin.start_head("HEAD", "/models");
    end_head(&mut head, 0, false);
    let answer = origin.call(head, Bytes::new(), true).await.unwrap();
    assert_eq!(answer.headers["content-length"], "99");
    assert_eq!(text(answer).await.unwrap(), "");
    assert_eq!(
        text(post(&origin, "{}").await.unwrap()).await.unwrap(),
        "{}"
    );
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    assert!(seen.requests.lock().unwrap()[1].starts_with("HEAD /v1/models HTTP/1.1\r\n"));
    assert!(!seen.requests.lock().unwrap()[1].contains("content-length"));
}

#[tokio::test]
async fn a_pooled_connection_closed_while_idle_is_replaced() {
    // Closed after the first answer, without saying so: the probe finds it.
    let (origin, seen) = server(|_, _, _| Reply::Close(json("{}"))).await;
    for _ in 0..3 {
        assert_eq!(
            text(post(&origin, "{}").await.unwrap()).await.unwrap(),
            "{}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_reused_connection_closed_before_answering_is_retried_once() {
    // The first connection answers once, then takes a request and closes
    // without a word (as when an idle timeout and a request cross).
    let (origin, seen) = server(|conn, n, _| match (conn, n) {
        (0, 0) => Reply::Keep(json("first")),
        (0, _) => Reply::Close(Vec::new()),
        _ => Reply::Keep(json("second")),
    })
    .await;
    assert_eq!(
        text(post(&origin, "{}").await.unwrap()).await.unwrap(),
        "first"
    );
    assert_eq!(
        text(post(&origin, "{}").await.unwrap()).await.unwrap(),
        "second"
    );
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(seen.requests.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_new_connection_closed_before_answering_is_not_retried() {
    let (origin, seen) = server(|_, _, _| Reply::Close(Vec::new())).await;
    let e = post(&origin, "{}").await.err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn cut_and_malformed_bodies_are_errors() {
    let (origin, _) = server(|_, _, request| {
        Reply::Close(if request.contains("\r\n\r\ncut") {
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten..".to_vec()
        } else if request.contains("\r\n\r\nchunk") {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec()
        } else if request.contains("\r\n\r\nnocrlf") {
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n".to_vec()
        } else if request.contains("\r\n\r\nhuge") {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..2000 {
                head.extend_from_slice(format!("x-h{i}: {}\r\n", "v".repeat(40)).as_bytes());
            }
            head
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab".to_vec()
        })
    })
    .await;
    let e = text(post(&origin, "cut").await.unwrap())
        .await
        .err()
        .unwrap();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    for body in ["chunk", "nocrlf"] {
        let e = text(post(&origin, body).await.unwrap())
            .await
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{body}");
    }
    for body in ["huge", "conflict"] {
        let e = post(&origin, body).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{body}");
    }
}

/// A file of the test certificate authority and its `localhost` certificate.
fn tls_data(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/data/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// An HTTPS server on port 0 with the `localhost` certificate, answering
/// each request on a connection with its index there.
async fn tls_server() -> (u16, Arc<Seen>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![
            CertificateDer::from(tls_data("localhost.der")),
            CertificateDer::from(tls_data("ca.der")),
        ],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls_data("localhost.key.der"))),
    )
    .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Seen::default());
    let state = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            state.accepted.fetch_add(1, Ordering::SeqCst);
            let (acceptor, state) = (acceptor.clone(), Arc::clone(&state));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut buf = Vec::new();
                for n in 0.. {
                    let Some(request) = read_request(&mut tls, &mut buf).await else {
                        return;
                    };
                    state.requests.lock().unwrap().push(request);
                    let answer = json(&format!("{{\"n\":{n}}}"));
                    if tls.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// A client of `base` that trusts the test certificate authority, or no one.
fn tls_origin(base: &str, trust_test_ca: bool) -> Arc<Origin> {
    let mut roots = rustls::RootCertStore::empty();
    if trust_test_ca {
        roots
            .add(rustls::pki_types::CertificateDer::from(tls_data("ca.der")))
            .unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    Arc::new(Origin::new(base, &connector).unwrap())
}

#[tokio::test]
async fn https_calls_are_verified_and_share_one_connection() {
    let (port, seen) = tls_server().await;
    let origin = tls_origin(&format!("https://localhost:{port}/v1"), true);
    for n in 0..3 {
        let answer = post(&origin, "{}").await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.headers.get("content-type").unwrap(),
            "application/json"
        );
        assert_eq!(text(answer).await.unwrap(), format!("{{\"n\":{n}}}"));
    }
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    let requests = seen.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert!(
            request.starts_with(&format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost:{port}\r\n"
            )),
            "{request}"
        );
        assert!(
            request.ends_with("content-length: 2\r\n\r\n{}"),
            "{request}"
        );
    }
}

#[tokio::test]
async fn https_refuses_a_certificate_for_another_name_or_from_an_unknown_authority() {
    let (port, seen) = tls_server().await;
    // The certificate names `localhost`, not this address.
    let by_address = tls_origin(&format!("https://127.0.0.1:{port}/v1"), true);
    let e = post(&by_address, "{}").await.err().unwrap();
    assert!(e.to_string().contains("certificate"), "{e}");
    // The right name, but the client does not trust the test authority.
    let untrusted = tls_origin(&format!("https://localhost:{port}/v1"), false);
    let e = post(&untrusted, "{}").await.err().unwrap();
    assert!(e.to_string().contains("certificate"), "{e}");
    // No request got through either way.
    assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    assert!(seen.requests.lock().unwrap().is_empty());
}
