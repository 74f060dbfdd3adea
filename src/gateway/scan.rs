//! What settling reads of an answer or of a stream's chunk (its `usage`,
//! `model`, and whether its `choices` are empty), found without parsing
//! the rest.
//!
//! Settling a whole (non-streamed) answer needs two of its top-level
//! members (a streamed chat chunk, a third: whether its `choices` are
//! empty). Deserializing the answer into a struct of those still reads
//! every key and string of the rest (the choices, the text): about 9,000
//! instructions for a short chat answer, 6,000 of them in the usage
//! object's dozen keys. [`members_of`] walks the answer's objects,
//! arrays and strings instead (strings eight bytes at a time) and reads the
//! four numbers settling needs by hand. Anything it is not sure of (not one
//! object with its brackets, quotes, colons and commas in place, an escaped
//! key, a number that is not a plain unsigned integer, a value of another
//! type) is a `None`, and the caller parses the whole body as before. It
//! does not check the numbers and literals it skips: of an answer whose
//! structure is right but which holds, say, `01` or `nul` elsewhere, it
//! reads the usage, where the full parse reads none and the call is
//! settled with an estimate.

use serde::Deserialize;

use crate::meter::Usage;
use crate::tokens::request::Endpoint;

/// Deepest nesting walked; a deeper answer goes to the full parse (which
/// has its own limit).
const MAX_DEPTH: u32 = 64;

/// What settling reads of a whole answer or a streamed chunk: its
/// top-level members `usage`, `model` and `choices`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Members {
    /// Read as the endpoint reports it; absent or `null`: `None`.
    pub usage: Option<Usage>,
    /// Absent or `null`: `None`.
    pub model: Option<String>,
    /// Whether `choices` is an empty array (absent or `null`: `false`).
    pub no_choices: bool,
}

/// The members settling reads of the JSON object `body` (a whole answer or
/// a chunk's data); when several members share a name, the last one, as
/// `serde_json::Value` keeps. `None` when the scan is not sure (see the
/// module's comment), `choices` of another type than an array included.
pub fn members_of(body: &[u8], endpoint: Endpoint) -> Option<Members> {
    // The A/B benchmark's plain build (benches/ab.sh): every answer and
    // chunk goes to the full parse.
    if cfg!(feature = "bench-plain-scan") {
        return None;
    }
    let mut read = Members::default();
    let end = object(body, skip_whitespace(body, 0), 0, |key, at| {
        let null = is_null(body, at);
        match key? {
            b"usage" if null => read.usage = None,
            b"usage" => {
                let (usage, end) = usage_at(body, at, endpoint)?;
                read.usage = Some(usage);
                return Some(end);
            }
            b"model" if null => read.model = None,
            b"model" => {
                let (model, end) = string_at(body, at)?;
                read.model = Some(model);
                return Some(end);
            }
            b"choices" if null => read.no_choices = false,
            b"choices" => {
                if body.get(at) != Some(&b'[') {
                    return None;
                }
                read.no_choices = body.get(skip_whitespace(body, at + 1)) == Some(&b']');
            }
            _ => {}
        }
        if null {
            Some(at + 4)
        } else {
            value_end(body, at, 0)
        }
    })?;
    (skip_whitespace(body, end) == body.len()).then_some(read)
}

/// The usage object at `at`, with the field names of `endpoint`, and the
/// index after it.
fn usage_at(body: &[u8], at: usize, endpoint: Endpoint) -> Option<(Usage, usize)> {
    let [input, input_details, output, output_details]: [&[u8]; 4] = match endpoint {
        Endpoint::Responses => [
            b"input_tokens",
            b"input_tokens_details",
            b"output_tokens",
            b"output_tokens_details",
        ],
        _ => [
            b"prompt_tokens",
            b"prompt_tokens_details",
            b"completion_tokens",
            b"completion_tokens_details",
        ],
    };
    let mut usage = Usage::default();
    let end = object(body, at, 1, |key, at| {
        let key = key?;
        let (field, read) = if key == input {
            (&mut usage.input, number_at(body, at))
        } else if key == output {
            (&mut usage.output, number_at(body, at))
        } else if key == input_details {
            (&mut usage.cached, detail_at(body, at, b"cached_tokens"))
        } else if key == output_details {
            (
                &mut usage.reasoning,
                detail_at(body, at, b"reasoning_tokens"),
            )
        } else {
            return value_end(body, at, 1);
        };
        let (number, end) = read?;
        *field = number;
        Some(end)
    })?;
    Some((usage, end))
}

/// The number `name` of the details object (or `null`: 0) at `at`, and the
/// index after it.
fn detail_at(body: &[u8], at: usize, name: &[u8]) -> Option<(u64, usize)> {
    if is_null(body, at) {
        return Some((0, at + 4));
    }
    let mut number = 0;
    let end = object(body, at, 2, |key, at| {
        if key? != name {
            return value_end(body, at, 2);
        }
        let (read, end) = number_at(body, at)?;
        number = read;
        Some(end)
    })?;
    Some((number, end))
}

/// The unsigned integer (or `null`: 0) at `at`, and the index after it;
/// `None` for anything else, a fraction, an exponent, a sign or a leading
/// zero included.
fn number_at(body: &[u8], at: usize) -> Option<(u64, usize)> {
    if is_null(body, at) {
        return Some((0, at + 4));
    }
    let mut number: u64 = 0;
    let mut i = at;
    while let Some(digit) = body
        .get(i)
        .and_then(|b| b.checked_sub(b'0'))
        .filter(|d| *d <= 9)
    {
        number = number.checked_mul(10)?.checked_add(u64::from(digit))?;
        i += 1;
    }
    let leading_zero = i - at > 1 && body[at] == b'0';
    if i == at || leading_zero || matches!(body.get(i), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    Some((number, i))
}

/// The string at `at` (its bytes when it has no escape, else serde's
/// reading), and the index after it.
fn string_at(body: &[u8], at: usize) -> Option<(String, usize)> {
    if body.get(at) != Some(&b'"') {
        return None;
    }
    let (end, escaped) = string_end(body, at + 1)?;
    let text = if escaped {
        String::deserialize(&mut serde_json::Deserializer::from_slice(
            body.get(at..=end)?,
        ))
        .ok()?
    } else {
        std::str::from_utf8(body.get(at + 1..end)?).ok()?.to_owned()
    };
    Some((text, end + 1))
}

fn is_null(body: &[u8], at: usize) -> bool {
    body.get(at..at + 4) == Some(b"null")
}

/// The object that opens at `open`, `depth` containers deep: `member` is
/// given each key (`None` when it holds an escape) and where its value
/// starts, and returns the index after the value. Returns the index after
/// the object; `None` when no object opens there, its members are not
/// separated by `:` and `,`, or `member` gives up.
fn object(
    body: &[u8],
    open: usize,
    depth: u32,
    mut member: impl FnMut(Option<&[u8]>, usize) -> Option<usize>,
) -> Option<usize> {
    if body.get(open) != Some(&b'{') || depth >= MAX_DEPTH {
        return None;
    }
    let mut i = skip_whitespace(body, open + 1);
    if body.get(i) == Some(&b'}') {
        return Some(i + 1);
    }
    loop {
        if body.get(i) != Some(&b'"') {
            return None;
        }
        let (end, escaped) = string_end(body, i + 1)?;
        let key = (!escaped).then(|| &body[i + 1..end]);
        let colon = skip_whitespace(body, end + 1);
        if body.get(colon) != Some(&b':') {
            return None;
        }
        i = skip_whitespace(body, member(key, skip_whitespace(body, colon + 1))?);
        match body.get(i)? {
            b',' => i = skip_whitespace(body, i + 1),
            b'}' => return Some(i + 1),
            _ => return None,
        }
    }
}

/// The index after the value at `at`, `depth` containers deep. Strings,
/// objects and arrays are walked; any other value is taken to run to the
/// next delimiter, unchecked.
fn value_end(body: &[u8], at: usize, depth: u32) -> Option<usize> {
    match *body.get(at)? {
        b'"' => string_end(body, at + 1).map(|(end, _)| end + 1),
        b'{' => object(body, at, depth + 1, |_, at| value_end(body, at, depth + 1)),
        b'[' => {
            if depth + 1 >= MAX_DEPTH {
                return None;
            }
            let mut i = skip_whitespace(body, at + 1);
            if body.get(i) == Some(&b']') {
                return Some(i + 1);
            }
            loop {
                i = skip_whitespace(body, value_end(body, i, depth + 1)?);
                match body.get(i)? {
                    b',' => i = skip_whitespace(body, i + 1),
                    b']' => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        _ => scalar_end(body, at),
    }
}

/// The index after the number or literal at `at` (unchecked: it runs to
/// the next delimiter).
fn scalar_end(body: &[u8], at: usize) -> Option<usize> {
    let rest = body.get(at..)?;
    let len = rest
        .iter()
        .position(|&b| ENDS_SCALAR[usize::from(b)])
        .unwrap_or(rest.len());
    (len > 0).then_some(at + len)
}

/// The bytes that end a number or a literal: a delimiter or whitespace
/// (a table: an embedding's answer is thousands of numbers).
static ENDS_SCALAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 7 {
        table[[b',', b'}', b']', b' ', b'\n', b'\r', b'\t'][i] as usize] = true;
        i += 1;
    }
    table
};

/// The index of the quote that ends the string whose text starts at
/// `from`, and whether the string holds an escape.
fn string_end(body: &[u8], mut from: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        let at = from + quote_or_backslash(body.get(from..)?)?;
        if body[at] == b'"' {
            return Some((at, escaped));
        }
        // An escape: the backslash and the byte it escapes.
        escaped = true;
        from = at + 2;
    }
}

/// The index of the first `"` or `\` in `bytes`, eight bytes at a time
/// (`memchr` costs more to set up than most strings here are long).
fn quote_or_backslash(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_ne_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
    // The high bit of each zero byte of `v` (exact up to the first zero).
    let zeros = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        let word = u64::from_le_bytes(word);
        let found = zeros(word ^ QUOTES) | zeros(word ^ BACKSLASHES);
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let tail = chunks.remainder();
    tail.iter()
        .position(|&b| b == b'"' || b == b'\\')
        .map(|k| offset + k)
}

fn skip_whitespace(body: &[u8], mut i: usize) -> usize {
    while matches!(body.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gateway::stream::{usage_of, UsageFields};
    use proptest::prelude::*;
    use serde_json::Value;

    const ENDPOINTS: [Endpoint; 3] = [
        Endpoint::ChatCompletions,
        Endpoint::Responses,
        Endpoint::Embeddings,
    ];

    fn usage_and_model(body: &[u8], endpoint: Endpoint) -> Option<(Option<Usage>, Option<String>)> {
        members_of(body, endpoint).map(|m| (m.usage, m.model))
    }

    /// What settling read before the scan: the body deserialized into a
    /// struct of `usage`, `model` and `choices`, or, when that fails, the
    /// body parsed into a `Value`.
    fn full_parse(body: &[u8], endpoint: Endpoint) -> Members {
        #[derive(serde::Deserialize)]
        struct Whole {
            usage: Option<UsageFields>,
            model: Option<String>,
            choices: Option<Vec<serde::de::IgnoredAny>>,
        }
        if let Ok(whole) = serde_json::from_slice::<Whole>(body) {
            return Members {
                usage: whole.usage.map(|u| u.usage(endpoint)),
                model: whole.model,
                no_choices: whole.choices.is_some_and(|c| c.is_empty()),
            };
        }
        let parsed: Value = serde_json::from_slice(body).unwrap_or_default();
        Members {
            usage: parsed.get("usage").and_then(|u| usage_of(endpoint, u)),
            model: parsed
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned),
            no_choices: parsed
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty),
        }
    }

    /// The scan agrees with the full parse wherever it answers (settling
    /// falls back to the full parse otherwise), for any body that is JSON.
    /// (It does not validate what it skips: of a body that is not, it reads
    /// the usage if it can, where the full parse reads none.)
    fn check(body: &[u8]) -> Result<(), TestCaseError> {
        if serde_json::from_slice::<Value>(body).is_err() {
            return Ok(());
        }
        for endpoint in ENDPOINTS {
            if let Some(members) = members_of(body, endpoint) {
                prop_assert_eq!(
                    members,
                    full_parse(body, endpoint),
                    "{:?} {}",
                    endpoint,
                    String::from_utf8_lossy(body)
                );
            }
        }
        Ok(())
    }

    /// The scan answers for every JSON object whose top-level keys hold no
    /// escape, whose usage (if any) holds only unsigned integers, `null`s
    /// and objects of them, whose model (if any) is a string and whose
    /// choices (if any) an array: it gives up only on what it must.
    fn answers(body: &[u8]) -> Result<(), TestCaseError> {
        fn plain(v: &Value) -> bool {
            v.is_u64()
                || v.is_null()
                || v.as_object()
                    .is_some_and(|o| o.iter().all(|(k, v)| !k.contains(['"', '\\']) && plain(v)))
        }
        let value: Value = serde_json::from_slice(body).unwrap();
        let field = |name: &str, ok: fn(&Value) -> bool| {
            value.get(name).is_none_or(|v| v.is_null() || ok(v))
        };
        if field("usage", |u| u.is_object() && plain(u))
            && field("model", Value::is_string)
            && field("choices", Value::is_array)
        {
            for endpoint in ENDPOINTS {
                prop_assert!(
                    members_of(body, endpoint).is_some(),
                    "the scan gave up on a plain body: {:?} {}",
                    endpoint,
                    String::from_utf8_lossy(body)
                );
            }
        }
        Ok(())
    }

    const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Say \"usage\": {\"prompt_tokens\": 9} \\ }] and a longer text after it, past sixteen bytes","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":2,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_1"}"#;

    #[test]
    fn an_answers_usage_and_model_are_read_past_its_text() {
        let (usage, model) = usage_and_model(ANSWER.as_bytes(), Endpoint::ChatCompletions).unwrap();
        let expected = Usage {
            input: 12,
            cached: 4,
            output: 7,
            reasoning: 2,
        };
        assert_eq!(usage, Some(expected));
        assert_eq!(model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        check(ANSWER.as_bytes()).unwrap();
        answers(ANSWER.as_bytes()).unwrap();
        let responses = br#"{"id":"resp_1","object":"response","model":"o3-mini","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens":7,"output_tokens_details":{"reasoning_tokens":2},"total_tokens":19}}"#;
        let (usage, model) = usage_and_model(responses, Endpoint::Responses).unwrap();
        assert_eq!(usage, Some(expected));
        assert_eq!(model.as_deref(), Some("o3-mini"));
        check(responses).unwrap();
        answers(responses).unwrap();
    }

    #[test]
    fn a_chunks_choices_are_read_as_empty_or_not() {
        let usage_chunk = br#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[ ],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let read = members_of(usage_chunk, Endpoint::ChatCompletions).unwrap();
        assert!(read.no_choices);
        assert_eq!(read.usage.map(|u| (u.input, u.output)), Some((3, 4)));
        assert_eq!(read.model.as_deref(), Some("m"));
        let delta = br#"{"choices":[{"delta":{"content":"[]"},"index":0}],"usage":null}"#;
        let read = members_of(delta, Endpoint::ChatCompletions).unwrap();
        assert_eq!(read, Members::default());
        for body in [
            &br#"{"choices":null}"#[..],
            br#"{"choices":[],"choices":[1]}"#,
            br#"{"choices":[1],"choices":[]}"#,
            usage_chunk,
            delta,
        ] {
            check(body).unwrap();
            answers(body).unwrap();
        }
        assert!(members_of(br#"{"choices":"none"}"#, Endpoint::ChatCompletions).is_none());
    }

    #[test]
    fn members_inside_other_values_are_not_the_answers() {
        // A `usage` and a `model` nested in the choices, and in strings.
        let body = br#"{"choices":[{"usage":{"prompt_tokens":1},"model":"inner"},["model","usage"]],"x":{"usage":{"prompt_tokens":2}},"s":"\"usage\":{\"prompt_tokens\":3}","usage":{"prompt_tokens":5,"x":{"completion_tokens":9},"completion_tokens":6},"model":"outer"}"#;
        let (usage, model) = usage_and_model(body, Endpoint::ChatCompletions).unwrap();
        assert_eq!(usage.map(|u| (u.input, u.output)), Some((5, 6)));
        assert_eq!(model.as_deref(), Some("outer"));
        check(body).unwrap();
    }

    #[test]
    fn what_the_scan_is_not_sure_of_goes_to_the_full_parse() {
        for body in [
            &br#"{"us\u0061ge":{"prompt_tokens":5}}"#[..],
            br#"{"usage":{"prompt_t\u006fkens":5}}"#,
            br#"{"usage":{"prompt_tokens":"5"}}"#,
            br#"{"usage":{"prompt_tokens":5.0}}"#,
            br#"{"usage":{"prompt_tokens":5e2}}"#,
            br#"{"usage":{"prompt_tokens":-5}}"#,
            br#"{"usage":{"prompt_tokens":05}}"#,
            br#"{"usage":{"prompt_tokens":99999999999999999999}}"#,
            br#"{"usage":{"prompt_tokens_details":7}}"#,
            br#"{"usage":[5]}"#,
            br#"{"usage":{"prompt_tokens":5},"model":7}"#,
            br#"{"usage":{"prompt_tokens":5}"#,
            br#"{"usage":{"prompt_tokens":5}]"#,
            br#"{"choices":[},"usage":{"prompt_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":5}} x"#,
            br#"{"usage":{"prompt_tokens":5}}}"#,
            br#"{"s":"unterminated}"#,
            br#"{"s":"unterminated and longer than sixteen bytes}"#,
            br#"{"s":"ends in a backslash\"#,
            br#"[{"usage":{"prompt_tokens":5}}]"#,
            b"",
            b"null",
        ] {
            let text = String::from_utf8_lossy(body);
            let scanned = usage_and_model(body, Endpoint::ChatCompletions);
            assert!(
                scanned.as_ref().is_none_or(|(usage, _)| usage.is_none()),
                "{text}"
            );
            check(body).unwrap();
        }
        let deep = format!(
            "{{\"a\":{}{},\"usage\":{{}}}}",
            "[".repeat(70),
            "]".repeat(70)
        );
        assert!(usage_and_model(deep.as_bytes(), Endpoint::ChatCompletions).is_none());
        assert!(serde_json::from_str::<Value>(&deep).is_ok());
    }

    #[test]
    fn absent_null_and_repeated_members_read_as_the_full_parse_reads_them() {
        for body in [
            &b"{}"[..],
            b" {\n} \n",
            br#"{"usage":null,"model":null}"#,
            br#"{"usage":{},"model":"m"}"#,
            br#"{"usage":{"prompt_tokens":null,"prompt_tokens_details":null},"model":"m"}"#,
            br#"{"model":"a","usage":{"prompt_tokens":1}}"#,
            br#"{ "usage" : { "prompt_tokens" : 1 , "completion_tokens":0} , "model" : "m\u00e9" }"#,
            br#"{"usage":{"prompt_tokens":1},"model":"a","usage":{"prompt_tokens":2},"model":"b"}"#,
            br#"{"usage":{"prompt_tokens":1,"prompt_tokens":2,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}}"#,
            br#"{"usage":{"prompt_tokens":18446744073709551615}}"#,
        ] {
            check(body).unwrap();
        }
        // Repeated members: the struct refuses them, a `Value` keeps the last.
        let body =
            br#"{"usage":{"prompt_tokens":1},"model":"a","usage":{"prompt_tokens":2},"model":"b"}"#;
        let (usage, model) = usage_and_model(body, Endpoint::ChatCompletions).unwrap();
        assert_eq!(usage.map(|u| u.input), Some(2));
        assert_eq!(model.as_deref(), Some("b"));
    }

    /// JSON values with the members settling reads, at any depth, numbers
    /// that are and are not unsigned integers, and strings that hold the
    /// members' names, quotes and backslashes.
    fn json_value() -> impl Strategy<Value = Value> {
        use serde_json::json;
        let text = prop_oneof![
            Just("usage".to_owned()),
            Just("model".to_owned()),
            Just("\"usage\":{\"prompt_tokens\":1}".to_owned()),
            "[a-z\\\\\"{}\\[\\]:, é]{0,24}",
        ];
        let number = prop_oneof![
            (0u64..1_000_000).prop_map(|n| json!(n)),
            Just(json!(u64::MAX)),
            Just(json!(-3)),
            Just(json!(1.5)),
            Just(Value::Null),
        ];
        let usage = (
            number.clone(),
            number.clone(),
            number.clone(),
            number,
            any::<bool>(),
        )
            .prop_map(|(a, b, c, d, responses)| {
                if responses {
                    json!({"input_tokens": a, "output_tokens": b, "total_tokens": 1,
                        "input_tokens_details": {"cached_tokens": c},
                        "output_tokens_details": {"reasoning_tokens": d}})
                } else {
                    json!({"prompt_tokens": a, "completion_tokens": b, "total_tokens": 1,
                        "prompt_tokens_details": {"cached_tokens": c, "audio_tokens": 0},
                        "completion_tokens_details": {"reasoning_tokens": d}})
                }
            });
        let leaf = prop_oneof![
            Just(Value::Null),
            Just(json!([])),
            any::<bool>().prop_map(Value::Bool),
            (0u64..1_000_000).prop_map(|n| json!(n)),
            text.prop_map(Value::String),
            usage,
        ];
        leaf.prop_recursive(4, 32, 5, move |inner| {
            let key = prop_oneof![
                Just("usage".to_owned()),
                Just("model".to_owned()),
                "[a-z\"\\\\]{0,6}",
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((key, inner), 0..5)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_scan_reads_what_the_full_parse_reads(
            members in prop::collection::vec(
                (
                    prop_oneof![
                        Just("usage".to_owned()),
                        Just("model".to_owned()),
                        Just("choices".to_owned()),
                        "[a-z]{1,5}",
                    ],
                    json_value(),
                ),
                0..6,
            ),
            pretty in any::<bool>(),
        ) {
            let object = Value::Object(members.into_iter().collect());
            let body = if pretty {
                serde_json::to_vec_pretty(&object).unwrap()
            } else {
                serde_json::to_vec(&object).unwrap()
            };
            check(&body)?;
            answers(&body)?;
        }
    }
}
