//! The privacy guard's detectors on hand-written positives and near misses,
//! per kind (the large labelled corpus, tests/data/guard/, is measured by
//! `guard::corpus` in the library's tests), and the guard in the gateway.

use tokenwarden::guard::{redact, scan, Kind};

/// (kind, text that holds exactly one finding of that kind).
const POSITIVES: &[(Kind, &str)] = &[
    (Kind::Email, "write to jane.doe@example.com today"),
    (Kind::Email, "cc: ops+alerts@mail.corp-example.co.uk"),
    (Kind::Email, "<a href=\"mailto:x_y@sub.example.org\">"),
    (Kind::Phone, "call +1 415 555 0132 after six"),
    (Kind::Phone, "office: (415) 555-0132"),
    (Kind::Phone, "tel 020 7946 0958"),
    (Kind::Phone, "mobile +44 7911 123456"),
    (Kind::Phone, "+33 1 23 45 67 89"),
    (Kind::PaymentCard, "card 4539 1488 0343 6467 exp 12/28"),
    (Kind::PaymentCard, "mc 5425-2914-1777-6318"),
    (Kind::PaymentCard, "amex 3701 152449 39094"),
    (Kind::PaymentCard, "4916398259791906"),
    (Kind::PaymentCard, "name=J+Doe&cc=4916+3982+5979+1906&exp=1228"),
    (Kind::Iban, "IBAN GB82 WEST 1234 5698 7654 32 please"),
    (Kind::Iban, "DE89370400440532013000"),
    (Kind::Iban, "FR14 2004 1010 0505 0001 3M02 606"),
    (Kind::UsSsn, "SSN 123-45-6789 on file"),
    (Kind::UsSsn, "ssn: 078-05-1121"),
    (Kind::UsSsn, "social_security_number: 219 09 9999"),
    (Kind::Phone, "Telefon: 030 901820"),
    (Kind::Phone, "WhatsApp 0044 7911 123456"),
    (Kind::OpenaiKey, "OPENAI_API_KEY=sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"),
    (Kind::OpenaiKey, "key sk-1234567890abcdefghijklmnopqrstuvwxyzABCD"),
    (Kind::AwsAccessKey, "aws_access_key_id = AKIAQ3EGUFXZ2D7KWSNR"),
    (Kind::AwsAccessKey, "ASIAY34FZKBOKMUTVV7A was leaked"),
    (Kind::GithubToken, "token ghp_16C7e42F292c6912E7710c838347Ae178B4a in ci"),
    (Kind::GithubToken, "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    (Kind::SlackToken, "SLACK_TOKEN=xoxb-1234567890-0987654321-AbCdEfGhIjKl"),
    (Kind::SlackToken, "SLACK_APP_TOKEN=xapp-1-A0123456789-1234567890123-0123456789abcdef0123456789abcdef"),
    (Kind::PemPrivateKey, "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0\n=AbCd\n-----END PGP PRIVATE KEY BLOCK-----"),
    (Kind::Jwt, "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    (Kind::PemPrivateKey, "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq\n-----END RSA PRIVATE KEY-----"),
    (Kind::PemPrivateKey, "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"),
];

/// Texts that look like findings and are not.
const NEGATIVES: &[&str] = &[
    // card-like numbers that fail Luhn, or are not card-shaped
    "order 4111 1111 1111 1112 shipped",
    "tracking 1234 5678 9012 3456",
    "0000 0000 0000 0000",
    // `sk-` inside ordinary words and short ids
    "the task-force met about risk-averse desk-bound plans",
    "sku sk-12 and sk-short",
    // dates and versions that look like phone numbers
    "released 2024-11-24 and 2025/01/31",
    "on 24/11/2024 at 10:30",
    "version 1.2.3.4 and build 20241124",
    "room 101, floor 3",
    // IBAN-shaped strings with wrong check digits
    "GB83 WEST 1234 5698 7654 32",
    "DE00370400440532013000",
    // SSN-shaped values in reserved ranges
    "ids 000-12-3456, 666-12-3456, 912-34-5678, 123-00-4567",
    // e-mail look-alikes
    "user at example dot com; @handle; a@b",
    "import foo@1.2.3",
    // key look-alikes
    "AKIA is a prefix; AKIASHORT",
    "ghp_short and xoxb-1",
    "eyJhbGciOiJIUzI1NiJ9 alone",
    "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----",
    // what code and logs carry: a UUID, a parcel, a millisecond timestamp
    // that passes Luhn, numbers in a browser's name, an AWS account id
    "id 123e4567-e89b-12d3-a456-426614174000 not found",
    "UPS tracking number 1Z999AA10123456784",
    "ts=1733500000000 level=info",
    "\"Mozilla/5.0 (iPhone) Mobile/15E148 Safari/604.1\" 1413826",
    "arn:aws:iam::123456789012:role/deploy",
    "ISBN 978-3-16-148410-0, published 2019",
    // numbers published for testing and documentation
    "Use Stripe's test card 4242 4242 4242 4242 with any future date",
    "curl -d card=4111111111111111 https://sandbox.example",
    "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
    // a national number with no word saying it is one
    "invoice 020 7946 0958 paid",
    // ordinary prose and code
    "The quick brown fox jumps over the lazy dog 42 times.",
    "fn main() { let x = 1_000_000; println!(\"{x}\"); }",
];

#[test]
fn detectors_find_every_positive_and_no_near_miss() {
    let mut missed = Vec::new();
    for (kind, text) in POSITIVES {
        let found = scan(text);
        if found.len() != 1 || found[0].kind != *kind {
            missed.push(format!("{kind:?} in {text:?}: found {found:?}"));
        }
    }
    let mut false_positives = Vec::new();
    for text in NEGATIVES {
        let found = scan(text);
        if !found.is_empty() {
            false_positives.push(format!("{text:?}: {found:?}"));
        }
    }
    let recall = 1.0 - missed.len() as f64 / POSITIVES.len() as f64;
    let fp_rate = false_positives.len() as f64 / NEGATIVES.len() as f64;
    eprintln!(
        "guard corpus: {} positives, recall {:.1}%; {} negatives, false positives {:.1}%",
        POSITIVES.len(),
        recall * 100.0,
        NEGATIVES.len(),
        fp_rate * 100.0
    );
    assert!(missed.is_empty(), "missed:\n{}", missed.join("\n"));
    assert!(
        false_positives.is_empty(),
        "false positives:\n{}",
        false_positives.join("\n")
    );
    // Every kind has positives.
    for kind in Kind::ALL {
        assert!(
            POSITIVES.iter().any(|(k, _)| *k == kind),
            "{kind:?} has no positive case"
        );
    }
}

#[test]
fn redaction_leaves_no_value_behind() {
    let text: String = POSITIVES
        .iter()
        .map(|(_, t)| *t)
        .collect::<Vec<_>>()
        .join("\n");
    let (redacted, kinds) = redact(&text);
    assert_eq!(kinds.len(), Kind::ALL.len());
    for value in [
        "jane.doe@example.com",
        "4539 1488 0343 6467",
        "GB82 WEST",
        "123-45-6789",
        "AKIAQ3EGUFXZ2D7KWSNR",
        "sk-proj-Ab3d",
        "MIIEowIBAAKCAQEA7bq",
        "+1 415 555 0132",
    ] {
        assert!(!redacted.contains(value), "{value} survived redaction");
    }
    assert!(
        redacted.contains("[REDACTED_EMAIL]") && redacted.contains("[REDACTED_PEM_PRIVATE_KEY]")
    );
    let left: Vec<&str> = scan(&redacted)
        .iter()
        .map(|f| &redacted[f.start..f.end])
        .collect();
    assert!(
        left.is_empty(),
        "a placeholder looks like a finding: {left:?}"
    );
}

mod gateway {
    use serde_json::{json, Value};
    use tokenwarden::tokens::request::{count_request, Endpoint};

    use crate::harness::{start, Harness};

    const BLOCK: &str = "tw-guard-block-0000000001";
    const REDACT: &str = "tw-guard-redact-000000001";
    const REROUTE: &str = "tw-guard-reroute-00000001";
    const VAULT: &str = "tw-guard-vault-0000000001";

    fn config() -> String {
        format!(
            r#"
[[orgs]]
name = "acme"
sharing = "selected"

[[orgs.projects]]
name = "shared-block"
privacy_guard = "block"
keys = ["{BLOCK}"]

[[orgs.projects]]
name = "shared-redact"
privacy_guard = "redact"
keys = ["{REDACT}"]

[[orgs.projects]]
name = "shared-reroute"
privacy_guard = "reroute"
reroute_to = "vault"
keys = ["{REROUTE}"]

[[orgs.projects]]
name = "vault"
sharing = false
keys = ["{VAULT}"]
"#
        )
    }

    fn body(content: &str) -> Value {
        json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
    }

    async fn send(h: &Harness, key: &str, content: &str, private: bool) -> (u16, Value) {
        let mut request = h.post("/chat/completions", key).json(&body(content));
        if private {
            request = request.header("x-tokenwarden-private", "true");
        }
        let r = request.send().await.unwrap_or_else(|e| panic!("{e}"));
        (r.status().as_u16(), r.json().await.unwrap_or_default())
    }

    #[tokio::test]
    async fn block_names_the_kinds_never_the_values() {
        let h = start("guard-block", &config()).await;
        let (status, body) = send(
            &h,
            BLOCK,
            "my card is 4539 1488 0343 6467, mail me at a.b@example.com",
            false,
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "sensitive_data_detected");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("payment_card") && message.contains("email"),
            "{message}"
        );
        assert!(
            !message.contains("4539") && !message.contains("a.b@"),
            "{message}"
        );
        assert_eq!(h.served().requests, 0);
        assert!(h
            .gateway
            .store
            .recent(5)
            .await
            .unwrap_or_default()
            .is_empty());
        // Clean text passes.
        assert_eq!(send(&h, BLOCK, "nothing to hide", false).await.0, 200);
        // No reroute_to: a private call cannot be honoured.
        let (status, body) = send(&h, BLOCK, "nothing to hide", true).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("no_private_route"))
        );
    }

    /// A secret in a function call's arguments, in a tool's result, or in
    /// a Responses input item is found as in a message's text.
    #[tokio::test]
    async fn tool_arguments_tool_results_and_responses_items_are_scanned() {
        let h = start("guard-tools", &config()).await;
        let key = "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z";
        let chat_args = json!({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "deploy"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "deploy", "arguments": format!("{{\"token\": \"{key}\"}}")}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"}]});
        let chat_result = json!({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": "who is on call?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "jane.doe@example.com"}]});
        let responses = json!({"model": "gpt-4o-mini", "input": [
            {"role": "user", "content": "card?"},
            {"type": "function_call", "call_id": "call_1", "name": "card", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "4539 1488 0343 6467"}]});
        for (path, body, kind) in [
            ("/chat/completions", chat_args, "openai_key"),
            ("/chat/completions", chat_result, "email"),
            ("/responses", responses, "payment_card"),
        ] {
            let r = h
                .post(path, BLOCK)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status().as_u16(), 400, "{kind}");
            let answer: Value = r.json().await.unwrap_or_default();
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(kind)),
                "{answer}"
            );
        }
        assert_eq!(h.served().requests, 0, "nothing went upstream");
    }

    #[tokio::test]
    async fn redact_replaces_findings_before_the_call_leaves() {
        let h = start("guard-redact", &config()).await;
        let (status, body) = send(&h, REDACT, "mail jane.doe@example.com please", false).await;
        assert_eq!(status, 200, "{body}");
        // The upstream counted the redacted prompt, not the original.
        let live = h.gateway.live();
        let catalog = &live.config.catalog;
        let expected = count_request(
            catalog,
            Some(Endpoint::ChatCompletions),
            &super::body_with("mail [REDACTED_EMAIL] please"),
            None,
        );
        let original = count_request(
            catalog,
            Some(Endpoint::ChatCompletions),
            &super::body_with("mail jane.doe@example.com please"),
            None,
        );
        let (expected, original) = (
            expected.map(|c| c.prompt.tokens).unwrap_or(0),
            original.map(|c| c.prompt.tokens).unwrap_or(0),
        );
        assert_ne!(expected, original);
        assert_eq!(body["usage"]["prompt_tokens"], expected);
        let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
        assert_eq!(
            (record.project.as_str(), record.free),
            ("shared-redact", true)
        );
    }

    #[tokio::test]
    async fn reroute_and_the_private_header_send_calls_to_a_project_that_does_not_share() {
        let h = start("guard-reroute", &config()).await;
        assert_eq!(
            send(&h, REROUTE, "my SSN is 123-45-6789", false).await.0,
            200
        );
        assert_eq!(
            send(&h, REROUTE, "nothing to hide, but private", true)
                .await
                .0,
            200
        );
        assert_eq!(send(&h, REROUTE, "nothing to hide", false).await.0, 200);
        let records = h.gateway.store.recent(3).await.unwrap_or_default();
        let projects: Vec<(&str, bool)> = records
            .iter()
            .rev()
            .map(|r| (r.project.as_str(), r.free))
            .collect();
        assert_eq!(
            projects,
            vec![("vault", false), ("vault", false), ("shared-reroute", true)]
        );
    }

    #[tokio::test]
    async fn no_content_reaches_the_ledger() {
        let h = start("guard-ledger", &config()).await;
        let marker = "zebra-quartz-7731-marker";
        for key in [VAULT, REDACT, REROUTE] {
            assert_eq!(
                send(&h, key, &format!("remember {marker}"), false).await.0,
                200
            );
        }
        h.settled().await;
        for entry in std::fs::read_dir(&h.dir).unwrap_or_else(|e| panic!("{e}")) {
            let path = entry.map(|e| e.path()).unwrap_or_default();
            let bytes = std::fs::read(&path).unwrap_or_default();
            let found = bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
            assert!(!found, "{} holds the call's content", path.display());
        }
    }
}

fn body_with(content: &str) -> serde_json::Value {
    serde_json::json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
}
