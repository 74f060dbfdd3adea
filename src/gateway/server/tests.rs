//! The server against a client that writes HTTP/1.1 by hand on a real
//! socket: keep-alive and pipelining, request bodies (whole, chunked, after
//! `100 Continue`, refused), answers (whole, chunked, HEAD), bad heads,
//! HTTP/1.0, a client that hangs up, and a graceful shutdown.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedSender;

use super::*;

/// Sends once when dropped: tells the test a handler's future was dropped.
struct Dropped(UnboundedSender<()>);
impl Drop for Dropped {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

fn router(dropped: UnboundedSender<()>) -> Router {
    let dropped = Arc::new(dropped);
    Router::new()
        .route("/echo", post(|body: Bytes| async move { body }))
        .route(
            "/stream",
            get(|| async {
                let pieces = futures_util::stream::unfold(0, |n| async move {
                    if n == 3 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Ok::<_, io::Error>(Bytes::from(format!("piece {n};"))),
                        n + 1,
                    ))
                });
                Body::from_stream(pieces)
            }),
        )
        .route(
            "/refuse",
            post(|| async { (StatusCode::UNAUTHORIZED, "no") }),
        )
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        )
        .route(
            "/forever",
            post(move || {
                let dropped = Dropped((*dropped).clone());
                async move {
                    let _dropped = dropped;
                    std::future::pending::<()>().await;
                }
            }),
        )
}

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<io::Result<()>>,
    dropped: tokio::sync::mpsc::UnboundedReceiver<()>,
}

async fn start() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (tx, dropped) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(crate::gateway::serve_with_timeout(
        listener,
        router(tx),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    Server {
        addr,
        stop: Some(stop),
        task,
        dropped,
    }
}

/// An answer as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// Read one answer from `socket` (`buf` keeps what follows it); `None` if
/// the connection closed first.
async fn read_answer(
    socket: &mut TcpStream,
    buf: &mut BytesMut,
    head_request: bool,
) -> Option<Answer> {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Response::new(&mut slots);
        if let Ok(httparse::Status::Complete(len)) = parsed.parse(buf) {
            let status = parsed.code.unwrap();
            let head = String::from_utf8(buf[..len].to_vec())
                .unwrap()
                .to_ascii_lowercase();
            let mut framing = if head_request || status == 100 {
                Framing::Length(0)
            } else if head.contains("transfer-encoding: chunked") {
                Framing::ChunkSize
            } else if let Some(n) = head.split("content-length: ").nth(1) {
                Framing::Length(n.split("\r\n").next().unwrap().parse().unwrap())
            } else {
                Framing::Eof
            };
            buf.advance(len);
            let mut body = Vec::new();
            loop {
                match http1::decode(&mut framing, buf).unwrap() {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::End => break,
                    Decoded::More => {
                        if socket.read_buf(buf).await.unwrap() == 0 {
                            assert_eq!(framing, Framing::Eof, "cut: {head}");
                            break;
                        }
                    }
                }
            }
            let body = String::from_utf8(body).unwrap();
            return Some(Answer { status, head, body });
        }
        if socket.read_buf(buf).await.unwrap_or(0) == 0 {
            return None;
        }
    }
}

/// Whether the server closes `socket` (within a bound that only keeps a
/// broken server from hanging the suite).
async fn closes(socket: &mut TcpStream) -> bool {
    let mut rest = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match socket.read(&mut rest).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = BytesMut::new();
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nfirst")
        .await
        .unwrap();
    let first = read_answer(&mut socket, &mut buf, false).await.unwrap();
    assert_eq!((first.status, first.body.as_str()), (200, "first"));
    assert!(
        first.head.contains("content-length: 5\r\n"),
        "{}",
        first.head
    );
    assert!(first.head.contains("\r\ndate: "), "{}", first.head);
    // Two requests and a HEAD in one write.
    socket
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 6\r\n\r\nsecondPOST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nthirdHEAD /stream HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
    let second = read_answer(&mut socket, &mut buf, false).await.unwrap();
    let third = read_answer(&mut socket, &mut buf, false).await.unwrap();
    let head = read_answer(&mut socket, &mut buf, true).await.unwrap();
    assert_eq!(
        (second.body.as_str(), third.body.as_str()),
        ("second", "third")
    );
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    // A streamed answer is chunked, and the connection still goes on.
    socket
        .write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let streamed = read_answer(&mut socket, &mut buf, false).await.unwrap();
    assert!(
        streamed.head.contains("transfer-encoding: chunked"),
        "{}",
        streamed.head
    );
    assert_eq!(streamed.body, "piece 0;piece 1;piece 2;");
    assert!(buf.is_empty());
}

#[tokio::test]
async fn a_chunked_body_after_100_continue() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = BytesMut::new();
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let interim = read_answer(&mut socket, &mut buf, false).await.unwrap();
    assert_eq!(interim.status, 100);
    socket.write_all(b"4\r\nchun\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    socket
        .write_all(b"3;x=y\r\nked\r\n0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut socket, &mut buf, false).await.unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "chunked"));
    // The connection goes on.
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nok")
        .await
        .unwrap();
    assert_eq!(
        read_answer(&mut socket, &mut buf, false)
            .await
            .unwrap()
            .body,
        "ok"
    );
}

#[tokio::test]
async fn a_body_the_handler_does_not_read_closes_the_connection_after_the_answer() {
    let server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = BytesMut::new();
    socket
        .write_all(b"POST /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\nstart")
        .await
        .unwrap();
    let answer = read_answer(&mut socket, &mut buf, false).await.unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (401, "no"));
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    assert!(closes(&mut socket).await);
}

#[tokio::test]
async fn bad_heads_get_an_answer_and_the_connection_closes() {
    let server = start().await;
    let many: String = (0..120).map(|i| format!("x-{i}: v\r\n")).collect();
    let huge = format!("GET /echo HTTP/1.1\r\nx: {}\r\n\r\n", "v".repeat(70_000));
    for (request, status) in [
        ("GARBAGE\r\n\r\n".to_owned(), 400),
        (
            "POST /echo HTTP/1.1\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
                .to_owned(),
            400,
        ),
        (
            "POST /echo HTTP/1.1\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc".to_owned(),
            400,
        ),
        (
            "POST /echo HTTP/1.1\r\ncontent-length: -2\r\n\r\n".to_owned(),
            400,
        ),
        (
            "POST /echo HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n".to_owned(),
            501,
        ),
        (format!("GET /echo HTTP/1.1\r\n{many}\r\n"), 431),
        (huge, 431),
    ] {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        let _ = socket.write_all(request.as_bytes()).await;
        let answer = read_answer(&mut socket, &mut BytesMut::new(), false)
            .await
            .unwrap();
        assert_eq!(
            answer.status,
            status,
            "{}",
            &request[..40.min(request.len())]
        );
        assert!(answer.head.contains("connection: close"));
        assert!(closes(&mut socket).await);
    }
    // A head begun and never finished: 408 after the limit, then closed.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"POST /echo HTTP/1.1\r\nhost")
        .await
        .unwrap();
    let answer = read_answer(&mut socket, &mut BytesMut::new(), false)
        .await
        .unwrap();
    assert_eq!(answer.status, 408);
}

#[tokio::test]
async fn http_1_0_and_connection_close_end_the_connection() {
    let server = start().await;
    for request in [
        &b"POST /echo HTTP/1.0\r\ncontent-length: 2\r\n\r\nhi"[..],
        b"POST /echo HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
    ] {
        let mut socket = TcpStream::connect(server.addr).await.unwrap();
        socket.write_all(request).await.unwrap();
        let answer = read_answer(&mut socket, &mut BytesMut::new(), false)
            .await
            .unwrap();
        assert_eq!(answer.body, "hi");
        assert!(answer.head.contains("connection: close"), "{}", answer.head);
        assert!(closes(&mut socket).await);
    }
}

#[tokio::test]
async fn a_client_that_hangs_up_drops_its_call() {
    let mut server = start().await;
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket
        .write_all(b"POST /forever HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        server.dropped.try_recv().is_err(),
        "dropped before the client left"
    );
    drop(socket);
    let dropped = tokio::time::timeout(Duration::from_secs(10), server.dropped.recv()).await;
    assert_eq!(dropped.ok().flatten(), Some(()));
}

#[tokio::test]
async fn a_shutdown_closes_idle_connections_and_lets_calls_finish() {
    let mut server = start().await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut busy = TcpStream::connect(server.addr).await.unwrap();
    busy.write_all(b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = server.stop.take().unwrap().send(());
    assert!(closes(&mut idle).await);
    let answer = read_answer(&mut busy, &mut BytesMut::new(), false)
        .await
        .unwrap();
    assert_eq!((answer.status, answer.body.as_str()), (200, "done"));
    assert!(answer.head.contains("connection: close"), "{}", answer.head);
    assert!(closes(&mut busy).await);
    tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // No new connection is accepted.
    assert!(TcpStream::connect(server.addr).await.is_err());
}
