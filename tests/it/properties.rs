//! Properties that must hold for any input: counting never panics, counts
//! equal the number of ids, and ids decode back to the text.

use proptest::prelude::*;
use tokenwarden::tokens::request::count_body;
use tokenwarden::tokens::Encoding;

use crate::catalog;

/// Strings mixing the classes the pre-tokenizer distinguishes, so that
/// shrinking finds short counter-examples at the boundaries between them.
fn tricky_text() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        " ", "  ", "\t", "\n", "\r\n", "\u{a0}", "\u{3000}", "a", "Z", "d", "'", "'s", "'LL", "'d",
        "'Re", "'ve", "'M", "'t", "'ſ", "é", "ǅ", "ß", "1", "٣", "42", "!", "/", "//", ".", "中文",
        "🎉", "\u{301}", "\u{200b}", "\0", "x", "HELLO", "world",
    ]);
    prop::collection::vec(pieces, 0..40).prop_map(|parts| parts.concat())
}

/// The count equals the number of ids, and the ids decode back to the text.
fn round_trip(text: &str) -> Result<(), TestCaseError> {
    for encoding in Encoding::ALL {
        let ids = encoding.encode(text);
        prop_assert_eq!(encoding.count(text), ids.len() as u64);
        let decoded = encoding.decode(&ids);
        prop_assert_eq!(decoded.as_deref(), Some(text));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_utf8_counts_without_panicking(text in any::<String>()) {
        round_trip(&text)?;
    }

    #[test]
    fn boundary_mixes_round_trip(text in tricky_text()) {
        round_trip(&text)?;
    }

    #[test]
    fn ids_match_two_independent_implementations(text in tricky_text()) {
        // bpe-openai runs the pre-tokenization regex on every piece, and
        // tiktoken-rs runs tiktoken's own pattern with a backtracking engine:
        // the ASCII fast path must agree with both.
        let o200k = tiktoken_rs::o200k_base_singleton();
        let cl100k = tiktoken_rs::cl100k_base_singleton();
        let ours = Encoding::O200kBase.encode(&text);
        prop_assert_eq!(&ours, &bpe_openai::o200k_base().encode(text.as_str()));
        prop_assert_eq!(&ours, &o200k.encode_ordinary(&text));
        let ours = Encoding::Cl100kBase.encode(&text);
        prop_assert_eq!(&ours, &bpe_openai::cl100k_base().encode(text.as_str()));
        prop_assert_eq!(&ours, &cl100k.encode_ordinary(&text));
    }

    #[test]
    fn any_body_is_counted_or_refused_never_a_panic(body in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = count_body(&catalog(), None, &body, None);
    }

    #[test]
    fn any_message_text_is_counted(content in any::<String>(), name in "[a-z_]{0,12}") {
        let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "name": name, "content": content}]});
        let counted = count_body(&catalog(), None, body.to_string().as_bytes(), None);
        prop_assert!(counted.is_ok());
    }
}
