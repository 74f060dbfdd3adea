//! Bare proxies for the gateway benchmark (benches/gateway.sh): what an HTTP
//! proxy costs on tokio with and without hyper, to tell the HTTP stack's
//! share of tokenwarden's added latency from the metering's. Not a product:
//! bodies with a `Content-Length` only (the benchmark's upstream, nginx
//! serving recorded answers from files, sends nothing else), no time limits.
//!
//! `cargo bench --bench bare_proxy -- MODE LISTEN UPSTREAM` (UPSTREAM as
//! `HOST:PORT`), MODE one of:
//! - `raw`: no HTTP library. A request and its answer are read with httparse
//!   and passed on as they came, on one upstream connection per client
//!   connection;
//! - `hyper-client`: the same server; upstream calls go through hyper-util's
//!   pooled client, as tokenwarden makes them;
//! - `hyper-server`: hyper's HTTP/1 server, as tokenwarden serves; upstream
//!   calls written and read by hand on pooled connections;
//! - `hyper`: hyper's server and hyper-util's client.

use std::io::{Error, Result};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::http;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;
/// Idle upstream connections for `hyper-server`.
type Pool = Arc<Mutex<Vec<TcpStream>>>;

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let [mode, listen, upstream] = args.as_slice() else {
        return Err("usage: bare_proxy raw|hyper-client|hyper-server|hyper LISTEN UPSTREAM".into());
    };
    if !["raw", "hyper-client", "hyper-server", "hyper"].contains(&mode.as_str()) {
        return Err(format!("unknown mode {mode}").into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build(connector);
        let pool: Pool = Arc::default();
        loop {
            let (conn, _) = listener.accept().await?;
            conn.set_nodelay(true)?;
            let (upstream, client, pool) = (upstream.clone(), client.clone(), pool.clone());
            match mode.as_str() {
                "raw" => drop(tokio::spawn(raw(conn, upstream))),
                "hyper-client" => drop(tokio::spawn(raw_server(conn, upstream, client))),
                _ => {
                    let by_hand = mode == "hyper-server";
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let (upstream, client, pool) =
                                (upstream.clone(), client.clone(), pool.clone());
                            async move {
                                if by_hand {
                                    by_hand_call(req, &upstream, &pool).await
                                } else {
                                    hyper_call(req, &upstream, &client).await
                                }
                            }
                        });
                        let io = hyper_util::rt::TokioIo::new(conn);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            }
        }
    })
}

/// The length of a complete head in `buf` and the `Content-Length` it
/// declares (0 if none); `None` while the head is incomplete.
fn head(buf: &[u8], request: bool) -> Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let parsed = if request {
        let mut r = httparse::Request::new(&mut headers);
        r.parse(buf).map_err(Error::other)?
    } else {
        let mut r = httparse::Response::new(&mut headers);
        r.parse(buf).map_err(Error::other)?
    };
    let httparse::Status::Complete(len) = parsed else {
        return Ok(None);
    };
    let length = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Error::other("bad content-length"))
        })
        .transpose()?
        .unwrap_or(0);
    Ok(Some((len, length)))
}

/// Read one whole message (head and body) into `buf`; returns the head's
/// length, or `None` if the peer closed the connection first.
async fn read_message(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    request: bool,
) -> Result<Option<usize>> {
    buf.clear();
    let mut chunk = [0u8; 16384];
    loop {
        if let Some((len, body)) = head(buf, request)? {
            while buf.len() < len + body {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Ok(Some(len));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn raw(mut conn: TcpStream, upstream: String) -> Result<()> {
    let mut up = TcpStream::connect(&upstream).await?;
    up.set_nodelay(true)?;
    let (mut request, mut answer) = (Vec::with_capacity(4096), Vec::with_capacity(16384));
    while read_message(&mut conn, &mut request, true).await?.is_some() {
        up.write_all(&request).await?;
        if read_message(&mut up, &mut answer, false).await?.is_none() {
            break;
        }
        conn.write_all(&answer).await?;
    }
    Ok(())
}

/// The raw server, with upstream calls through hyper-util's client.
async fn raw_server(mut conn: TcpStream, upstream: String, client: Client) -> Result<()> {
    let (mut request, mut answer) = (Vec::with_capacity(4096), Vec::with_capacity(16384));
    while let Some(len) = read_message(&mut conn, &mut request, true).await? {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        parsed.parse(&request).map_err(Error::other)?;
        let uri = format!("http://{upstream}{}", parsed.path.unwrap_or("/"));
        let mut builder = http::Request::builder()
            .method(parsed.method.unwrap_or("GET"))
            .uri(uri);
        for h in parsed.headers.iter() {
            if !h.name.eq_ignore_ascii_case("host")
                && !h.name.eq_ignore_ascii_case("content-length")
            {
                builder = builder.header(h.name, h.value);
            }
        }
        let body = Full::new(Bytes::copy_from_slice(&request[len..]));
        let response = client
            .request(builder.body(body).map_err(Error::other)?)
            .await
            .map_err(Error::other)?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(Error::other)?.to_bytes();
        answer.clear();
        answer.extend_from_slice(format!("HTTP/1.1 {}\r\n", parts.status).as_bytes());
        let framing = [
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
        ];
        put_rest(&mut answer, &parts.headers, &framing, &body);
        conn.write_all(&answer).await?;
    }
    Ok(())
}

/// Write a message's headers but `skip`, its `Content-Length`, and its body.
fn put_rest(out: &mut Vec<u8>, headers: &http::HeaderMap, skip: &[http::HeaderName], body: &[u8]) {
    for (name, value) in headers {
        if !skip.contains(name) {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
}

/// hyper's server, the upstream call written and read by hand.
async fn by_hand_call(
    req: http::Request<hyper::body::Incoming>,
    upstream: &str,
    pool: &Pool,
) -> Result<http::Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(Error::other)?.to_bytes();
    let mut out = Vec::with_capacity(1024 + body.len());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(
        format!("{} {path} HTTP/1.1\r\nhost: {upstream}\r\n", parts.method).as_bytes(),
    );
    let skip = [http::header::HOST, http::header::CONTENT_LENGTH];
    put_rest(&mut out, &parts.headers, &skip, &body);
    let idle = pool.lock().map_err(|_| Error::other("poisoned"))?.pop();
    let mut up = match idle {
        Some(up) => up,
        None => {
            let up = TcpStream::connect(upstream).await?;
            up.set_nodelay(true)?;
            up
        }
    };
    up.write_all(&out).await?;
    let mut answer = Vec::with_capacity(16384);
    let len = read_message(&mut up, &mut answer, false)
        .await?
        .ok_or_else(|| Error::other("upstream closed"))?;
    pool.lock().map_err(|_| Error::other("poisoned"))?.push(up);
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    parsed.parse(&answer).map_err(Error::other)?;
    let mut builder = http::Response::builder().status(parsed.code.unwrap_or(502));
    for h in parsed.headers.iter() {
        if !h.name.eq_ignore_ascii_case("content-length")
            && !h.name.eq_ignore_ascii_case("connection")
        {
            builder = builder.header(h.name, h.value);
        }
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(&answer[len..])))
        .map_err(Error::other)
}

/// hyper's server and hyper-util's client.
async fn hyper_call(
    req: http::Request<hyper::body::Incoming>,
    upstream: &str,
    client: &Client,
) -> Result<http::Response<Full<Bytes>>> {
    let (mut parts, body) = req.into_parts();
    let body = body.collect().await.map_err(Error::other)?.to_bytes();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{upstream}{path}")
        .parse()
        .map_err(Error::other)?;
    parts.headers.remove(http::header::HOST);
    let response = client
        .request(http::Request::from_parts(parts, Full::new(body)))
        .await
        .map_err(Error::other)?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(Error::other)?.to_bytes();
    Ok(http::Response::from_parts(parts, Full::new(body)))
}
