//! `/v1/files`: OpenAI's Files API for batch input, kept in the ledger.
//!
//! A client key uploads (`multipart/form-data`, `purpose=batch`), lists,
//! retrieves, downloads and deletes its project's files; another project's
//! file is a 404, as a file that is nowhere. A file is stored in parts of
//! at most [`FILE_PART`] bytes as it arrives and read back a few parts at a
//! time, so its size never sets the memory it takes; at most
//! [`MAX_FILE_BYTES`] a file, [`MAX_FILES`] a project. A project whose
//! `forward` rules open `/files` upstream keeps doing that instead.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, RawQuery, Request, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::{Bytes, BytesMut};
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::Gateway;
use crate::store::{FileMeta, FILE_PART};

/// OpenAI's limit for a batch input file.
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// Files a project keeps at most.
pub const MAX_FILES: usize = 1000;
/// An upload not complete this long after it began was cut by a stop (a
/// slow one may take a while: at most [`MAX_FILE_BYTES`], each piece within
/// [`PIECE_TIMEOUT`]); its parts are deleted.
const ABANDONED_AFTER_S: i64 = 6 * 3600;
/// How long the upload may wait for its next piece.
const PIECE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// OpenAI's `file` object.
pub fn object(f: &FileMeta) -> Value {
    json!({
        "object": "file",
        "id": f.id,
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": null,
        "status_details": null,
    })
}

fn no_file(id: &str) -> ApiError {
    ApiError::NoSuchObject(format!("No such File object: {}", crate::excerpt(id, 64)))
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
        code: None,
    }
}

/// Whether the project's `forward` rules send this call upstream instead.
fn forwarded(caller: &Caller, request: &Request) -> bool {
    let path = request.uri().path();
    let upstream_path = path.strip_prefix("/v1").unwrap_or(path);
    caller.org_project().is_some_and(|(_, p)| {
        p.forward
            .iter()
            .any(|r| r.allows(request.method().as_str(), upstream_path))
    })
}

/// Middleware on the `/v1/files` and `/v1/batches` routes: a project whose
/// `forward` rules open the call sends it upstream (OpenAI keeps its files
/// and runs its batches), as before tokenwarden did.
pub async fn forward_opened(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    if forwarded(&caller, &request) {
        return super::routes::passthrough(State(gateway), Extension(caller), request).await;
    }
    next.run(request).await
}

/// The caller's file `id`, or the 404 of a file that is nowhere.
pub async fn find(gateway: &Gateway, caller: &Caller, id: &str) -> Result<FileMeta, ApiError> {
    let (org, project) = caller.owner()?;
    gateway
        .store
        .files(org, project)
        .await
        .map_err(ApiError::store)?
        .into_iter()
        .find(|f| f.id == id)
        .ok_or_else(|| no_file(id))
}

/// `POST /v1/files`.
pub async fn upload(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Response {
    match receive(&gateway, &caller, request).await {
        Ok(file) => Json(object(&file)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn next_field(
    multipart: &mut Multipart,
) -> Result<Option<axum::extract::multipart::Field<'_>>, ApiError> {
    match tokio::time::timeout(PIECE_TIMEOUT, multipart.next_field()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(field)) => Ok(field),
        Ok(Err(e)) => Err(bad(
            format!("The multipart body could not be read: {e}"),
            "file",
        )),
    }
}

/// Read the upload's fields, storing the file as it comes.
async fn receive(
    gateway: &Gateway,
    caller: &Caller,
    request: Request,
) -> Result<FileMeta, ApiError> {
    let (org, project) = caller.owner()?;
    room(gateway, &org, &project).await?;
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|e| bad(format!("The body must be multipart/form-data: {e}"), "file"))?;
    let mut purpose = None;
    let mut file: Option<FileMeta> = None;
    let result = async {
        while let Some(mut field) = next_field(&mut multipart).await? {
            match field.name() {
                Some("purpose") => {
                    let text = small_text(&mut field).await?;
                    purpose = Some(text);
                }
                Some("file") if file.is_none() => {
                    let meta = FileMeta {
                        id: format!("file-{}", &super::auth::new_key("")[..24]),
                        org: org.clone(),
                        project: project.clone(),
                        purpose: String::new(),
                        filename: crate::excerpt(field.file_name().unwrap_or("file"), 256),
                        bytes: 0,
                        created_at: gateway.clock.now_ms().div_euclid(1000),
                    };
                    gateway.store.file_begin(meta.clone()).await.map_err(ApiError::store)?;
                    let id = meta.id.clone();
                    file = Some(meta);
                    let chunks = futures_util::stream::unfold(&mut field, |field| async {
                        next_chunk(field).await.transpose().map(|chunk| (chunk, field))
                    });
                    let bytes = store_parts(gateway, &org, &id, chunks).await?;
                    if let Some(f) = file.as_mut() {
                        f.bytes = bytes;
                    }
                }
                other => {
                    return Err(bad(
                        format!(
                            "Unrecognized field: {}",
                            crate::excerpt(other.unwrap_or(""), 64)
                        ),
                        other.unwrap_or("file"),
                    ))
                }
            }
        }
        let purpose = purpose.take().ok_or_else(|| bad("Missing required parameter: 'purpose'.", "purpose"))?;
        if purpose != "batch" {
            return Err(bad(
                format!(
                    "tokenwarden keeps files for batches only (purpose=batch), not {:?}; other purposes go to the upstream when the project's forward rules open POST /files.",
                    crate::excerpt(&purpose, 32)
                ),
                "purpose",
            ));
        }
        let mut done = file.clone().ok_or_else(|| bad("Missing required parameter: 'file'.", "file"))?;
        gateway
            .store
            .file_end(org.clone(), done.id.clone(), purpose.clone(), done.bytes)
            .await
            .map_err(ApiError::store)?;
        done.purpose = purpose;
        Ok(done)
    }
    .await;
    if result.is_err() {
        if let Some(f) = &file {
            if let Err(e) = gateway.store.file_delete(org.clone(), f.id.clone()).await {
                tracing::error!(error = %e, "could not remove a refused upload");
            }
        }
    }
    result
}

/// Refused when the project keeps [`MAX_FILES`] already.
async fn room(gateway: &Gateway, org: &str, project: &str) -> Result<(), ApiError> {
    let kept = gateway
        .store
        .files(org.to_owned(), project.to_owned())
        .await
        .map_err(ApiError::store)?
        .len();
    if kept >= MAX_FILES {
        return Err(bad(
            format!("A project keeps at most {MAX_FILES} files: delete some first."),
            "file",
        ));
    }
    Ok(())
}

/// Keep a batch input file given piece by piece (`tokenwarden batch`
/// reading a local file), as an upload would.
pub async fn keep(
    gateway: &Gateway,
    caller: &Caller,
    filename: &str,
    chunks: impl futures_util::Stream<Item = Result<Bytes, ApiError>>,
) -> Result<FileMeta, ApiError> {
    let (org, project) = caller.owner()?;
    room(gateway, &org, &project).await?;
    let mut meta = FileMeta {
        id: format!("file-{}", &super::auth::new_key("")[..24]),
        org: org.clone(),
        project,
        purpose: "batch".into(),
        filename: crate::excerpt(filename, 256),
        bytes: 0,
        created_at: gateway.clock.now_ms().div_euclid(1000),
    };
    gateway
        .store
        .file_begin(meta.clone())
        .await
        .map_err(ApiError::store)?;
    let stored = async {
        meta.bytes = store_parts(gateway, &org, &meta.id, chunks).await?;
        gateway
            .store
            .file_end(
                org.clone(),
                meta.id.clone(),
                meta.purpose.clone(),
                meta.bytes,
            )
            .await
            .map_err(ApiError::store)
    }
    .await;
    if let Err(e) = stored {
        if let Err(e) = gateway.store.file_delete(org, meta.id).await {
            tracing::error!(error = %e, "could not remove a file not kept whole");
        }
        return Err(e);
    }
    Ok(meta)
}

/// Delete the uploads a stop cut (begun [`ABANDONED_AFTER_S`] before
/// `now_s` and never complete).
pub async fn purge_abandoned(gateway: &Gateway, now_s: i64) -> Result<(), ApiError> {
    let abandoned = gateway
        .store
        .files_abandoned(now_s - ABANDONED_AFTER_S)
        .await
        .map_err(ApiError::store)?;
    for (org, id) in abandoned {
        gateway
            .store
            .file_delete(org, id)
            .await
            .map_err(ApiError::store)?;
    }
    Ok(())
}

/// A text field of at most 64 bytes.
async fn small_text(field: &mut axum::extract::multipart::Field<'_>) -> Result<String, ApiError> {
    let mut text = Vec::new();
    while let Some(chunk) = next_chunk(field).await? {
        text.extend_from_slice(&chunk);
        if text.len() > 64 {
            return Err(bad("'purpose' is at most 64 bytes.", "purpose"));
        }
    }
    String::from_utf8(text).map_err(|_| bad("'purpose' is not UTF-8.", "purpose"))
}

async fn next_chunk(
    field: &mut axum::extract::multipart::Field<'_>,
) -> Result<Option<Bytes>, ApiError> {
    match tokio::time::timeout(PIECE_TIMEOUT, field.chunk()).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(chunk)) => Ok(chunk),
        Ok(Err(e)) => Err(bad(format!("The file could not be read: {e}"), "file")),
    }
}

/// Store a file's bytes in parts as they come; its size.
async fn store_parts(
    gateway: &Gateway,
    org: &str,
    id: &str,
    chunks: impl futures_util::Stream<Item = Result<Bytes, ApiError>>,
) -> Result<u64, ApiError> {
    use futures_util::StreamExt;
    let mut chunks = std::pin::pin!(chunks);
    let mut part = BytesMut::with_capacity(FILE_PART);
    let (mut seq, mut total) = (0i64, 0u64);
    let mut flush = |part: &mut BytesMut| {
        let data = part.split().freeze();
        let store = gateway.store.clone();
        let (org, id, this) = (org.to_owned(), id.to_owned(), seq);
        seq += 1;
        async move {
            store
                .file_part(org, id, this, data)
                .await
                .map_err(ApiError::store)
        }
    };
    while let Some(mut chunk) = chunks.next().await.transpose()? {
        total += chunk.len() as u64;
        if total > MAX_FILE_BYTES {
            return Err(ApiError::PayloadTooLarge {
                limit: MAX_FILE_BYTES as usize,
            });
        }
        while !chunk.is_empty() {
            let take = chunk.len().min(FILE_PART - part.len());
            part.extend_from_slice(&chunk.split_to(take));
            if part.len() == FILE_PART {
                flush(&mut part).await?;
            }
        }
    }
    if !part.is_empty() {
        flush(&mut part).await?;
    }
    Ok(total)
}

/// `GET /v1/files`: `purpose`, `limit` (1-10,000), `order` (`asc`, `desc`:
/// the default), `after`.
pub async fn list(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Response {
    listing(&gateway, &caller, raw.as_deref())
        .await
        .map_or_else(IntoResponse::into_response, |v| Json(v).into_response())
}

async fn listing(gateway: &Gateway, caller: &Caller, raw: Option<&str>) -> Result<Value, ApiError> {
    let (org, project) = caller.owner()?;
    let mut files = gateway
        .store
        .files(org, project)
        .await
        .map_err(ApiError::store)?;
    let (mut limit, mut after, mut purpose, mut asc) = (10_000usize, None, None, false);
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = super::usage::decode(v);
        match k {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| bad("'limit' must be an integer from 1 to 10,000.", "limit"))?
            }
            "after" => after = Some(v),
            "purpose" => purpose = Some(v),
            "order" if v == "asc" || v == "desc" => asc = v == "asc",
            "order" => return Err(bad("'order' must be asc or desc.", "order")),
            _ => {}
        }
    }
    if !asc {
        files.reverse();
    }
    files.retain(|f| purpose.as_deref().is_none_or(|p| p == f.purpose));
    let start = after
        .and_then(|id| files.iter().position(|f| f.id == id).map(|p| p + 1))
        .unwrap_or(0);
    let page: Vec<&FileMeta> = files.iter().skip(start).take(limit).collect();
    Ok(json!({
        "object": "list",
        "data": page.iter().map(|f| object(f)).collect::<Vec<_>>(),
        "first_id": page.first().map(|f| &f.id),
        "last_id": page.last().map(|f| &f.id),
        "has_more": start + page.len() < files.len(),
    }))
}

/// `GET /v1/files/{id}`.
pub async fn retrieve(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    find(&gateway, &caller, &id)
        .await
        .map_or_else(IntoResponse::into_response, |f| {
            Json(object(&f)).into_response()
        })
}

/// `DELETE /v1/files/{id}`.
pub async fn delete(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let deleted = async {
        let f = find(&gateway, &caller, &id).await?;
        gateway
            .store
            .file_delete(f.org, f.id.clone())
            .await
            .map_err(ApiError::store)?;
        Ok::<_, ApiError>(json!({"object": "file", "id": f.id, "deleted": true}))
    };
    deleted
        .await
        .map_or_else(IntoResponse::into_response, |v| Json(v).into_response())
}

/// Parts read at a time when a file is sent.
const PARTS_AT_ONCE: i64 = 4;

/// `GET /v1/files/{id}/content`: the bytes as uploaded, a few parts at a time.
pub async fn content(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let f = match find(&gateway, &caller, &id).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let stream = futures_util::stream::unfold(Some(0i64), move |next| {
        let (gateway, f) = (gateway.clone(), f.clone());
        async move {
            let from = next?;
            match gateway
                .store
                .file_parts(f.org.clone(), f.id.clone(), from, PARTS_AT_ONCE)
                .await
            {
                Ok(parts) if parts.is_empty() => None,
                Ok(parts) => {
                    let more = parts.len() as i64 == PARTS_AT_ONCE;
                    let bytes: Vec<u8> = parts.concat();
                    Some((
                        Ok::<_, std::io::Error>(Bytes::from(bytes)),
                        more.then_some(from + PARTS_AT_ONCE),
                    ))
                }
                Err(e) => {
                    tracing::error!(error = %e, "a file's parts could not be read");
                    Some((
                        Err(std::io::Error::other("the ledger could not be read")),
                        None,
                    ))
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/octet-stream"),
    );
    response
}
