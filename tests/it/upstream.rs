//! The upstream side of the gateway against a misbehaving upstream: a fake
//! one on port 0 that writes the bytes each test wants (extra headers, a
//! second answer after the first, an endless event, a stream past the time
//! limit) and records which connection each request came on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{start_with_server, Harness};

const KEY_A: &str = "tw-upstream-org-a-0000001";
const KEY_B: &str = "tw-upstream-org-b-0000001";

/// One request as the fake upstream read it.
struct Seen {
    head: String,
    body: Vec<u8>,
    /// The gateway's end of the connection it came on.
    port: u16,
}

/// Read one request (head and `content-length` body); `None` when the
/// connection ends first.
async fn read_request(stream: &mut TcpStream, port: u16) -> Option<Seen> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&piece[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let n = stream.read(&mut piece).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&piece[..n]);
    }
    Some(Seen {
        head,
        body: buf[head_end..head_end + length].to_vec(),
        port,
    })
}

/// A fake upstream on port 0: `answer` gets each request and its
/// connection, writes what it likes, and hands the connection back to read
/// the next request on it (or `None` to close it).
async fn fake<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(Seen, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<TcpStream>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                while let Some(seen) = read_request(&mut stream, peer.port()).await {
                    match answer(seen, stream).await {
                        Some(again) => stream = again,
                        None => return,
                    }
                }
            });
        }
    });
    addr
}

/// A whole answer: status 200, `headers` (lines ending in CRLF), the body
/// framed by its length.
fn whole(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\n{headers}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A chat completion whose text is `text`, with its usage.
fn completion(text: &str) -> Vec<u8> {
    json!({
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    })
    .to_string()
    .into_bytes()
}

/// The `marker-…` word a request's body carries.
fn marker(seen: &Seen) -> String {
    let body = String::from_utf8_lossy(&seen.body);
    body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|w| w.starts_with("marker-"))
        .unwrap_or("none")
        .to_owned()
}

/// A chunk of the chunked coding.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

const STREAM_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

/// Orgs `a` and `b`, each with a project on the fake upstream at `addr`.
fn config(addr: SocketAddr) -> String {
    format!(
        "[upstreams.fake]\nbase_url = \"http://{addr}/v1\"\napi_key = \"sk-fake-upstream-key\"\n\n[[orgs]]\nname = \"a\"\n\n[[orgs.projects]]\nname = \"app\"\nupstream = \"fake\"\nkeys = [\"{KEY_A}\"]\nforward = [\"GET /files\"]\n\n[[orgs]]\nname = \"b\"\n\n[[orgs.projects]]\nname = \"app\"\nupstream = \"fake\"\nkeys = [\"{KEY_B}\"]\nforward = [\"GET /files\"]\n"
    )
}

async fn gateway(label: &str, addr: SocketAddr, server: &str) -> Harness {
    start_with_server(label, &config(addr), server).await
}

fn chat(text: &str, stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], "max_tokens": 5, "stream": stream})
}

/// A whole chat call; its status and body.
async fn call(h: &Harness, key: &str, text: &str) -> (u16, Value) {
    let response = h
        .post("/chat/completions", key)
        .json(&chat(text, false))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or_else(|e| panic!("{e}"));
    (status, body)
}

/// Read a response's stream to its end or its error: the bytes received,
/// and whether it ended in an error.
async fn drain(response: reqwest::Response) -> (usize, bool) {
    let mut stream = response.bytes_stream();
    let mut received = 0;
    while let Some(piece) = stream.next().await {
        match piece {
            Ok(bytes) => received += bytes.len(),
            Err(_) => return (received, true),
        }
    }
    (received, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_allowed_answer_headers_reach_the_client() {
    let addr = fake(|seen, mut stream| async move {
        let body = if seen.head.starts_with("POST") {
            completion("hello")
        } else {
            br#"{"object":"list","data":[]}"#.to_vec()
        };
        let headers = "content-type: application/json\r\nserver: upstream/1.0\r\nset-cookie: session=upstream-secret\r\nx-evil: 1\r\nx-request-id: req-123\r\nopenai-processing-ms: 42\r\nopenai-version: 2020-10-01\r\nx-ratelimit-remaining-tokens: 999\r\nretry-after: 7\r\nalt-svc: h3=\":443\"\r\n";
        stream.write_all(&whole(headers, &body)).await.ok()?;
        Some(stream)
    })
    .await;
    let h = gateway("upstream-headers", addr, "").await;
    let metered = h
        .post("/chat/completions", KEY_A)
        .json(&chat("hi", false))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let passthrough = h
        .client
        .get(format!("{}/files", h.base))
        .bearer_auth(KEY_A)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for response in [metered, passthrough] {
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        for allowed in [
            "content-type",
            "x-request-id",
            "openai-processing-ms",
            "openai-version",
            "x-ratelimit-remaining-tokens",
            "retry-after",
        ] {
            assert!(headers.contains_key(allowed), "{allowed}: {headers:?}");
        }
        assert_eq!(headers["x-request-id"], "req-123");
        for dropped in ["set-cookie", "x-evil", "alt-svc"] {
            assert!(!headers.contains_key(dropped), "{dropped}: {headers:?}");
        }
        // A `server` header, if any, is the gateway's own, not upstream's.
        assert!(
            headers.get("server").is_none_or(|v| v != "upstream/1.0"),
            "{headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_answer_past_max_answer_bytes_is_a_502_and_is_settled() {
    let addr = fake(|seen, mut stream| async move {
        // `marker-big` asks for an answer past the bound, anything else fits.
        let text = if marker(&seen) == "marker-big" {
            "x".repeat(64 * 1024)
        } else {
            "small".to_owned()
        };
        let headers = "content-type: application/json\r\n";
        stream
            .write_all(&whole(headers, &completion(&text)))
            .await
            .ok()?;
        Some(stream)
    })
    .await;
    let h = gateway("upstream-answer-bound", addr, "max_answer_bytes = 4096\n").await;
    let (status, body) = call(&h, KEY_A, "marker-small").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "small");

    let (status, body) = call(&h, KEY_A, "marker-big").await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    h.settled().await;
    let recent = h
        .gateway
        .store
        .recent(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recent[0].state, "settled");
    assert_eq!(recent[0].status, 502);

    // The connection was closed mid-answer, not reused: the next call is whole.
    let (status, body) = call(&h, KEY_A, "marker-small").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_past_the_bound_ends_the_stream_as_cut() {
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let addr = fake(move |_, mut stream| {
        let written = counter.clone();
        async move {
            let first = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
            stream.write_all(STREAM_HEAD).await.ok()?;
            stream.write_all(&chunk(first)).await.ok()?;
            stream
                .write_all(&chunk(b"data: {\"choices\":[{\"delta\":{\"content\":\""))
                .await
                .ok()?;
            // One event that never ends, sent in pieces: 48 MiB at most.
            let piece = chunk(&[b'a'; 256 * 1024]);
            for _ in 0..192 {
                if stream.write_all(&piece).await.is_err() {
                    return None;
                }
                written.fetch_add(256 * 1024, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            stream.write_all(&chunk(b"\"}}]}\n\n")).await.ok()?;
            stream.write_all(b"0\r\n\r\n").await.ok()?;
            None
        }
    })
    .await;
    let h = gateway("upstream-event-bound", addr, "").await;
    let response = h
        .post("/chat/completions", KEY_A)
        .json(&chat("hi", true))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), 200);
    let (received, cut) = tokio::time::timeout(Duration::from_secs(60), drain(response))
        .await
        .unwrap_or_else(|_| panic!("the stream did not end"));
    assert!(cut, "the client sees the stream cut");
    assert!(received < 1024 * 1024, "only the first event: {received}");
    let sent = written.load(Ordering::Relaxed);
    assert!(
        sent < 40 * 1024 * 1024,
        "the gateway stopped reading near 16 MiB, upstream wrote {sent}"
    );
    h.settled().await;
    let recent = h
        .gateway
        .store
        .recent(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recent[0].state, "settled");
    assert!(
        recent[0].estimated,
        "a cut stream is settled on an estimate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_longer_than_the_time_limit_is_ended_near_it() {
    let addr = fake(|_, mut stream| async move {
        // Events of 4 MiB (padding: the text is one letter, so settling
        // the cut stream counts little) as fast as they go, for 10 s at most.
        let start_event =
            chunk(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}],\"pad\":\"");
        let piece = chunk(&[b'x'; 64 * 1024]);
        let end_event = chunk(b"\"}\n\n");
        stream.write_all(STREAM_HEAD).await.ok()?;
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            stream.write_all(&start_event).await.ok()?;
            for _ in 0..64 {
                stream.write_all(&piece).await.ok()?;
            }
            stream.write_all(&end_event).await.ok()?;
        }
        stream.write_all(b"0\r\n\r\n").await.ok()?;
        None
    })
    .await;
    let h = gateway("upstream-stream-time", addr, "upstream_timeout_secs = 1\n").await;
    let start = Instant::now();
    let response = h
        .post("/chat/completions", KEY_A)
        .json(&chat("hi", true))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status(), 200);
    let (received, cut) = tokio::time::timeout(Duration::from_secs(20), drain(response))
        .await
        .unwrap_or_else(|_| panic!("the stream did not end"));
    let took = start.elapsed();
    assert!(cut, "the stream is cut at its limit after {received} bytes");
    assert!(
        took < Duration::from_secs(3),
        "a 1 s limit ended the stream after {took:?}"
    );
    h.settled().await;
}

/// A fake upstream that answers each call with its marker, then writes
/// `after` (once `delay` has passed) on the same connection, which it
/// keeps open.
async fn answer_then(after: fn(&str) -> Vec<u8>, delay: Duration) -> SocketAddr {
    fake(move |seen, mut stream| async move {
        let mark = marker(&seen);
        let mut out = whole("content-type: application/json\r\n", &completion(&mark));
        if delay.is_zero() {
            out.extend_from_slice(&after(&mark));
            stream.write_all(&out).await.ok()?;
        } else {
            stream.write_all(&out).await.ok()?;
            tokio::time::sleep(delay).await;
            stream.write_all(&after(&mark)).await.ok()?;
        }
        Some(stream)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_an_answer_never_answer_the_next_call() {
    // A whole second answer, the first call's marker in it.
    fn second_answer(mark: &str) -> Vec<u8> {
        whole(
            "content-type: application/json\r\n",
            &completion(&format!("{mark}-again")),
        )
    }
    fn stray(_: &str) -> Vec<u8> {
        b"garbage".to_vec()
    }
    for (label, after, delay) in [
        ("same-write", second_answer as fn(&str) -> Vec<u8>, 0),
        ("later", second_answer, 100),
        ("stray", stray, 0),
    ] {
        let addr = answer_then(after, Duration::from_millis(delay)).await;
        let h = gateway(&format!("upstream-desync-{label}"), addr, "").await;
        for (n, key) in [KEY_A, KEY_A, KEY_B, KEY_A, KEY_B].into_iter().enumerate() {
            let mark = format!("marker-{n}");
            let (status, body) = call(&h, key, &mark).await;
            assert_eq!(status, 200, "{label} call {n}: {body}");
            assert_eq!(
                body["choices"][0]["message"]["content"], mark,
                "{label}: call {n} got another call's answer"
            );
            // Let the extra bytes arrive before the next call.
            tokio::time::sleep(Duration::from_millis(delay + 100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_client_left_does_not_answer_the_next_call() {
    let addr = fake(|seen, mut stream| async move {
        let mark = marker(&seen);
        if !String::from_utf8_lossy(&seen.body).contains("\"stream\":true") {
            let out = whole("content-type: application/json\r\n", &completion(&mark));
            stream.write_all(&out).await.ok()?;
            return Some(stream);
        }
        // A stream that goes on for a while, each event naming the call.
        stream.write_all(STREAM_HEAD).await.ok()?;
        for _ in 0..50 {
            let event = format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{mark}\"}}}}]}}\n\n"
            );
            stream.write_all(&chunk(event.as_bytes())).await.ok()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stream.write_all(b"0\r\n\r\n").await.ok()?;
        Some(stream)
    })
    .await;
    let h = gateway("upstream-left-stream", addr, "").await;
    let response = h
        .post("/chat/completions", KEY_A)
        .json(&chat("marker-streamed", true))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = response.bytes_stream();
    let first = stream.next().await;
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(50)).await;
    for n in 0..3 {
        let mark = format!("marker-{n}");
        let (status, body) = call(&h, KEY_A, &mark).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], mark, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orgs_never_share_an_upstream_connection() {
    // The port of the gateway's end of each request's connection, by org.
    let ports: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let seen_ports = ports.clone();
    let addr = fake(move |seen, mut stream| {
        let ports = seen_ports.clone();
        async move {
            let org = seen
                .head
                .lines()
                .find_map(|l| l.strip_prefix("x-test-org: "))
                .unwrap_or("?")
                .to_owned();
            if let Ok(mut ports) = ports.lock() {
                ports.push((org, seen.port));
            }
            let out = if seen.head.starts_with("POST") {
                whole("content-type: application/json\r\n", &completion("hi"))
            } else {
                whole("content-type: application/json\r\n", br#"{"data":[]}"#)
            };
            stream.write_all(&out).await.ok()?;
            Some(stream)
        }
    })
    .await;
    let h = gateway("upstream-org-pools", addr, "").await;
    for round in 0..3 {
        for (org, key) in [("a", KEY_A), ("b", KEY_B)] {
            let metered = h
                .post("/chat/completions", key)
                .header("x-test-org", org)
                .json(&chat("hi", false))
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(metered.status(), 200, "round {round}, org {org}");
            let _ = metered.bytes().await;
            let passthrough = h
                .client
                .get(format!("{}/files", h.base))
                .bearer_auth(key)
                .header("x-test-org", org)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(passthrough.status(), 200, "round {round}, org {org}");
            let _ = passthrough.bytes().await;
        }
    }
    let ports = ports.lock().map(|p| p.clone()).unwrap_or_default();
    assert_eq!(ports.len(), 12, "{ports:?}");
    let of = |org: &str| -> Vec<u16> {
        let mut p: Vec<u16> = ports
            .iter()
            .filter(|(o, _)| o == org)
            .map(|(_, p)| *p)
            .collect();
        p.sort_unstable();
        p.dedup();
        p
    };
    let (a, b) = (of("a"), of("b"));
    // Calls one after another reuse a kept-alive connection...
    assert_eq!(a.len(), 1, "org a's connections: {ports:?}");
    assert_eq!(b.len(), 1, "org b's connections: {ports:?}");
    // ...but never another org's.
    assert!(a.iter().all(|p| !b.contains(p)), "{ports:?}");
}

/// An upstream that closes each keep-alive connection once it has answered
/// (as servers do with idle connections): the next call is not lost on the
/// closed pooled connection, it goes on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    let addr = fake(|seen, mut stream| async move {
        let out = whole(
            "content-type: application/json\r\n",
            &completion(&marker(&seen)),
        );
        stream.write_all(&out).await.ok()?;
        // Closed a moment after the answer, without `connection: close`.
        tokio::time::sleep(Duration::from_millis(20)).await;
        None
    })
    .await;
    let h = gateway("upstream-closed-pooled", addr, "").await;
    for n in 0..4 {
        let mark = format!("marker-{n}");
        let (status, body) = call(&h, KEY_A, &mark).await;
        assert_eq!(status, 200, "call {n}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], mark);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The upstream closes a pooled connection just as the next call is sent
/// on it (it read the call, answered nothing): that call goes again, once,
/// on a new connection. A call on a new connection is never sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_before_answering_is_replaced_once() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u16, String)>::new()));
    let log = seen.clone();
    let addr = fake(move |request, mut stream| {
        let log = log.clone();
        async move {
            let mark = marker(&request);
            let second_on_this_connection = {
                let mut log = log.lock().ok()?;
                let again = log.iter().any(|(port, _)| *port == request.port);
                log.push((request.port, mark.clone()));
                again
            };
            if second_on_this_connection || mark == "marker-never" {
                // Read, and closed without a byte of an answer.
                return None;
            }
            let out = whole("content-type: application/json\r\n", &completion(&mark));
            stream.write_all(&out).await.ok()?;
            Some(stream)
        }
    })
    .await;
    let h = gateway("upstream-closed-unanswered", addr, "").await;
    for n in 0..3 {
        let mark = format!("marker-{n}");
        let (status, body) = call(&h, KEY_A, &mark).await;
        assert_eq!(status, 200, "call {n}: {body}");
        assert_eq!(body["choices"][0]["message"]["content"], mark);
    }
    let calls: Vec<(u16, String)> = seen.lock().map(|l| l.clone()).unwrap_or_default();
    // Calls 1 and 2 each went first on the pooled connection, then again on a new one.
    let marks: Vec<&str> = calls.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        marks,
        ["marker-0", "marker-1", "marker-1", "marker-2", "marker-2"],
        "{calls:?}"
    );
    // An upstream that closes a new connection unanswered: a 502, sent once.
    let other = gateway("upstream-closed-unanswered-new", addr, "").await;
    let before = seen.lock().map(|l| l.len()).unwrap_or_default();
    let (status, _) = call(&other, KEY_B, "marker-never").await;
    assert_eq!(status, 502);
    let after = seen.lock().map(|l| l.len()).unwrap_or_default();
    assert_eq!(
        after - before,
        1,
        "a call on a new connection is not sent twice"
    );
}
