//! A batch's input file, checked a part at a time as OpenAI checks it:
//! every line a JSON object with a unique `custom_id`, `method` POST, the
//! batch's `url`, and a `body` object naming a `model`; at most 50,000
//! lines. Good lines go to the ledger as they are read, so the file's size
//! never sets the memory this takes.

use std::collections::HashSet;

use serde_json::{json, Value};

use crate::gateway::Gateway;
use crate::store::{BatchLine, FileMeta, StoreError};
use crate::tokens::request::Endpoint;

/// OpenAI's limit of lines a batch.
pub const MAX_LINES: i64 = 50_000;
/// Errors reported at most (the first ones).
const MAX_ERRORS: usize = 100;
/// Lines written to the ledger at a time.
const LINES_AT_ONCE: usize = 500;

pub enum Invalid {
    /// OpenAI's `errors.data`: `{code, message, param, line}` each.
    Lines(Vec<Value>),
    Store(StoreError),
}

struct Check {
    endpoint: &'static str,
    seen: HashSet<String>,
    errors: Vec<Value>,
    good: Vec<BatchLine>,
    lines: i64,
    max_line: usize,
    /// The first line's model.
    model: Option<String>,
}

impl Check {
    fn error(&mut self, code: &str, message: String, param: Option<&str>, line: i64) {
        if self.errors.len() < MAX_ERRORS {
            self.errors
                .push(json!({"code": code, "message": message, "param": param, "line": line}));
        }
    }

    /// Check line `n`.
    fn line(&mut self, n: i64, text: &[u8]) {
        if text.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.lines += 1;
        if self.lines > MAX_LINES {
            if self.lines == MAX_LINES + 1 {
                self.error(
                    "too_many_tasks",
                    format!("A batch holds at most {MAX_LINES} requests."),
                    None,
                    n,
                );
            }
            return;
        }
        if text.len() > self.max_line {
            return self.error(
                "request_too_large",
                format!("This line is larger than {} bytes.", self.max_line),
                None,
                n,
            );
        }
        let Ok(Value::Object(mut line)) = serde_json::from_slice::<Value>(text) else {
            return self.error(
                "invalid_json_line",
                "This line is not a JSON object.".into(),
                None,
                n,
            );
        };
        let custom_id = match line.get("custom_id").and_then(Value::as_str) {
            Some(id) if !id.is_empty() && id.chars().count() <= 512 => id.to_owned(),
            _ => {
                return self.error(
                    "missing_required_parameter",
                    "'custom_id' must be a string of 1 to 512 characters.".into(),
                    Some("custom_id"),
                    n,
                )
            }
        };
        if line.get("method").and_then(Value::as_str) != Some("POST") {
            return self.error(
                "invalid_method",
                "'method' must be POST.".into(),
                Some("method"),
                n,
            );
        }
        if line.get("url").and_then(Value::as_str) != Some(self.endpoint) {
            return self.error(
                "invalid_url",
                format!("'url' must be {}, the batch's endpoint.", self.endpoint),
                Some("url"),
                n,
            );
        }
        let body = match line.remove("body") {
            Some(body @ Value::Object(_)) if body.get("model").is_some_and(Value::is_string) => {
                body
            }
            _ => {
                return self.error(
                    "missing_required_parameter",
                    "'body' must be an object naming a 'model'.".into(),
                    Some("body"),
                    n,
                )
            }
        };
        if !self.seen.insert(custom_id.clone()) {
            return self.error(
                "duplicate_custom_id",
                format!(
                    "The custom_id {:?} is on an earlier line too.",
                    crate::excerpt(&custom_id, 64)
                ),
                Some("custom_id"),
                n,
            );
        }
        if self.model.is_none() {
            self.model = body["model"].as_str().map(str::to_owned);
        }
        if self.errors.is_empty() {
            self.good.push(BatchLine {
                line: n,
                custom_id,
                body: body.to_string(),
                state: "pending".into(),
                result: String::new(),
                claimed_ms: 0,
            });
        }
    }
}

/// Check `file`'s lines for batch `batch` and keep them; their count, and
/// the first line's model.
pub async fn lines(
    gateway: &Gateway,
    file: &FileMeta,
    batch: &str,
    endpoint: Endpoint,
) -> Result<(u64, Option<String>), Invalid> {
    let mut check = Check {
        endpoint: endpoint.path(),
        seen: HashSet::new(),
        errors: Vec::new(),
        good: Vec::new(),
        lines: 0,
        max_line: gateway.live().config.server.max_body_bytes,
        model: None,
    };
    let (mut carry, mut n, mut part) = (Vec::new(), 0i64, 0i64);
    loop {
        let parts = gateway
            .store
            .file_parts(file.org.clone(), file.id.clone(), part, 4)
            .await
            .map_err(Invalid::Store)?;
        let last = parts.len() < 4;
        part += parts.len() as i64;
        for data in parts {
            carry.extend_from_slice(&data);
            let mut start = 0;
            while let Some(end) = memchr::memchr(b'\n', &carry[start..]) {
                n += 1;
                check.line(n, &carry[start..start + end]);
                start += end + 1;
            }
            carry.drain(..start);
            if carry.len() > check.max_line {
                check.error(
                    "request_too_large",
                    "A line is too large.".into(),
                    None,
                    n + 1,
                );
                break;
            }
            keep(gateway, file, batch, &mut check, false).await?;
        }
        if last || check.errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if !carry.is_empty() {
        n += 1;
        check.line(n, &carry);
    }
    if check.lines == 0 && check.errors.is_empty() {
        check.error(
            "empty_file",
            "The input file has no requests.".into(),
            None,
            0,
        );
    }
    keep(gateway, file, batch, &mut check, true).await?;
    if check.errors.is_empty() {
        Ok((u64::try_from(check.lines).unwrap_or(0), check.model))
    } else {
        Err(Invalid::Lines(check.errors))
    }
}

/// Write the good lines gathered (all of them at the end), while the file is good.
async fn keep(
    gateway: &Gateway,
    file: &FileMeta,
    batch: &str,
    check: &mut Check,
    all: bool,
) -> Result<(), Invalid> {
    if !check.errors.is_empty() {
        check.good.clear();
        return Ok(());
    }
    if check.good.len() >= LINES_AT_ONCE || (all && !check.good.is_empty()) {
        let lines = std::mem::take(&mut check.good);
        gateway
            .store
            .batch_lines_add(file.org.clone(), batch.to_owned(), lines)
            .await
            .map_err(Invalid::Store)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> Check {
        Check {
            endpoint: "/v1/chat/completions",
            seen: HashSet::new(),
            errors: Vec::new(),
            good: Vec::new(),
            lines: 0,
            max_line: 1024,
            model: None,
        }
    }

    fn line(id: &str) -> String {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "gpt-4o-mini", "messages": []}})
        .to_string()
    }

    #[test]
    fn each_bad_line_is_named_by_its_number() {
        let mut c = check();
        let lines = [
            line("a"),
            "not json".into(),
            "[1, 2]".into(),
            line("a"),
            line("b").replace("POST", "GET"),
            line("c").replace("chat/completions", "embeddings"),
            json!({"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {}})
                .to_string(),
            json!({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}})
                .to_string(),
            "   ".into(),
            "x".repeat(2000),
            line("e"),
        ];
        for (i, l) in lines.iter().enumerate() {
            c.line(i as i64 + 1, l.as_bytes());
        }
        let found: Vec<(i64, String)> = c
            .errors
            .iter()
            .map(|e| {
                (
                    e["line"].as_i64().unwrap_or(0),
                    e["code"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let want = [
            (2, "invalid_json_line"),
            (3, "invalid_json_line"),
            (4, "duplicate_custom_id"),
            (5, "invalid_method"),
            (6, "invalid_url"),
            (7, "missing_required_parameter"),
            (8, "missing_required_parameter"),
            (10, "request_too_large"),
        ];
        assert_eq!(
            found,
            want.iter()
                .map(|(n, c)| (*n, (*c).to_owned()))
                .collect::<Vec<_>>()
        );
        assert_eq!(c.lines, 10, "the blank line is not a request");
    }

    #[test]
    fn past_fifty_thousand_lines_is_one_error() {
        let mut c = check();
        for n in 1..=MAX_LINES + 2 {
            c.line(n, line(&n.to_string()).as_bytes());
        }
        assert_eq!(c.errors.len(), 1);
        assert_eq!(c.errors[0]["code"], "too_many_tasks");
        assert_eq!(c.errors[0]["line"], MAX_LINES + 1);
    }
}
