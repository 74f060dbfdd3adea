//! The model catalog: a model's name -> its program group, encoding, list
//! prices, largest output, downgrade target and image-token constants.
//!
//! The data lives in `catalog.toml` (compiled in) because the provider changes
//! groups and prices every few months (the configuration's `[program]`
//! overrides groups, caps and membership). Loading
//! parses, then validates every cross-reference once, so a lookup on the
//! request path is a hash probe and, failing that, a short pattern scan.

use std::fmt;

use serde::Deserialize;

use crate::day::Day;
use crate::tokens::Encoding;

pub mod load;

pub use load::parse_decimal;

/// The catalog compiled into the binary.
pub const BUILTIN_TOML: &str = include_str!("../catalog.toml");

/// Money on the request path: pico-dollars (10^-12 USD). A price per token
/// in pico-dollars is the same number as micro-dollars per million tokens, so
/// every list price is a whole number and `tokens * price` is exact.
pub type Picodollars = u128;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("catalog: {0}")]
    Invalid(String),
}

// ---- validated form -------------------------------------------------------

/// What a model does, which decides the endpoint a body is guessed to be for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Chat,
    Embedding,
}

/// List prices in pico-dollars per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Prices {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl Prices {
    /// The list price of a call; `cached` is part of `input`, as the API reports it.
    pub fn cost(&self, input: u64, cached: u64, output: u64) -> Picodollars {
        let cached = cached.min(input);
        u128::from(input - cached) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input)
            + u128::from(output) * u128::from(self.output)
    }
}

/// How image inputs are turned into tokens for a family of models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum ImageCost {
    /// 512px tiles after scaling: `base + per_tile * tiles`; `detail: low` is `base`.
    Tiles { base: u64, per_tile: u64 },
    /// 32px patches (at most 1,536) times `multiplier_milli / 1000`.
    Patches { multiplier_milli: u64 },
}

/// A program group: one daily pool shared by all of its models.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Group {
    pub name: std::sync::Arc<str>,
    /// The cap for usage tiers 3-5.
    pub daily_tokens: u64,
    /// The cap for usage tiers 1-2.
    pub daily_tokens_tiers_1_2: u64,
}

impl Group {
    /// The daily cap for an organization of usage tier `tier` (1-5).
    pub fn daily_tokens_for_tier(&self, tier: u8) -> u64 {
        if tier <= 2 {
            self.daily_tokens_tiers_1_2
        } else {
            self.daily_tokens
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Model {
    /// The catalog's name for the family (an alias or a pattern).
    pub name: std::sync::Arc<str>,
    pub kind: Kind,
    pub encoding: Encoding,
    /// Index into `Catalog::groups`; `None` for models outside the program.
    #[serde(skip)]
    pub group: Option<usize>,
    pub prices: Prices,
    /// Prices for fine-tuned variants (`ft:BASE:...`); the base's when absent.
    pub fine_tuned_prices: Option<Prices>,
    pub max_output: u64,
    pub images: Option<ImageCost>,
    /// The catalog name the `downgrade` policy sends this model's calls to.
    pub downgrade: Option<String>,
    /// The dated snapshot the provider serves for the alias (its first
    /// listed snapshot), which a response's `model` field names.
    pub served_as: Option<String>,
}

/// A model name resolved against the catalog.
#[derive(Clone, Copy, Debug)]
pub struct ModelRef<'a> {
    pub model: &'a Model,
    group: Option<&'a Group>,
    /// `ft:BASE:...`: same encoding and limits as the base, outside the program.
    pub fine_tuned: bool,
}

impl<'a> ModelRef<'a> {
    /// The program group, or `None` when the model is always billed.
    pub fn group(&self) -> Option<&'a Group> {
        if self.fine_tuned {
            None
        } else {
            self.group
        }
    }

    /// Index of the program group in `Catalog::groups`, `None` when always billed.
    pub fn group_index(&self) -> Option<usize> {
        if self.fine_tuned {
            None
        } else {
            self.model.group
        }
    }

    pub fn prices(&self) -> Prices {
        match (self.fine_tuned, self.model.fine_tuned_prices) {
            (true, Some(prices)) => prices,
            _ => self.model.prices,
        }
    }
}

/// The most of an unknown model's name an error repeats.
const MAX_ECHOED_NAME_BYTES: usize = 128;
/// Names longer than this get no close-name suggestions.
const MAX_SUGGESTED_NAME_BYTES: usize = 64;

/// A model name that matches nothing in the catalog.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct UnknownModel {
    pub model: String,
    /// Close names, best first.
    pub suggestions: Vec<String>,
}

impl fmt::Display for UnknownModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "The model `{}` does not exist or you do not have access to it.",
            crate::excerpt(&self.model, MAX_ECHOED_NAME_BYTES)
        )?;
        if !self.suggestions.is_empty() {
            write!(f, " Did you mean {}?", self.suggestions.join(", "))?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Catalog {
    pub effective: Day,
    pub program_starts: Day,
    pub program_ends: Option<Day>,
    pub groups: Vec<Group>,
    pub models: Vec<Model>,
    /// Exact names (aliases and snapshots) -> index into `models`.
    exact: crate::FastMap<String, usize>,
    /// `*` patterns, most literal characters first.
    patterns: Vec<(String, usize)>,
}

impl Catalog {
    /// The catalog compiled into the binary.
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Catalog::from_toml(BUILTIN_TOML)
    }

    /// Resolve a model name: exact name, then pattern, then `ft:BASE:...`.
    pub fn lookup(&self, name: &str) -> Result<ModelRef<'_>, UnknownModel> {
        if let Some(found) = self.find(name) {
            return Ok(found);
        }
        if let Some(rest) = name.strip_prefix("ft:") {
            let base = rest.split(':').next().unwrap_or_default();
            if let Some(found) = self.find(base) {
                return Ok(ModelRef {
                    fine_tuned: true,
                    ..found
                });
            }
        }
        Err(UnknownModel {
            model: crate::excerpt(name, MAX_ECHOED_NAME_BYTES),
            // The edit distance costs the product of the names' lengths:
            // only a name of a real model's length gets suggestions.
            suggestions: if name.len() <= MAX_SUGGESTED_NAME_BYTES {
                self.suggest(name)
            } else {
                Vec::new()
            },
        })
    }

    fn find(&self, name: &str) -> Option<ModelRef<'_>> {
        let index = match self.exact.get(name) {
            Some(&index) => index,
            None => self
                .patterns
                .iter()
                .find(|(pattern, _)| glob_match(pattern, name))
                .map(|&(_, index)| index)?,
        };
        let model = self.models.get(index)?;
        Some(ModelRef {
            model,
            group: model.group.and_then(|g| self.groups.get(g)),
            fine_tuned: false,
        })
    }

    /// Put every model that `name` matches (an exact name, a `*` pattern over
    /// the exact names, or a pattern entry itself) in group `group`; `false`
    /// when it matches none.
    pub fn assign_group(&mut self, name: &str, group: usize) -> bool {
        let mut hits: Vec<usize> = self
            .exact
            .iter()
            .filter(|(known, _)| known.as_str() == name || glob_match(name, known))
            .map(|(_, &index)| index)
            .collect();
        hits.extend(
            self.patterns
                .iter()
                .filter(|(p, _)| p == name)
                .map(|&(_, index)| index),
        );
        for &index in &hits {
            if let Some(model) = self.models.get_mut(index) {
                model.group = Some(group);
            }
        }
        !hits.is_empty()
    }

    /// Whether a model name or a `*` pattern matches a model of the catalog.
    pub fn matches_any(&self, pattern: &str) -> bool {
        self.lookup(pattern).is_ok()
            || self.exact.keys().any(|name| glob_match(pattern, name))
            || self.models.iter().any(|m| glob_match(pattern, &m.name))
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| *g.name == *name)
    }

    /// Up to three exact names close to `name` (edit distance), closest first.
    pub fn suggest(&self, name: &str) -> Vec<String> {
        let limit = (name.chars().count() / 3).clamp(2, 4);
        let length = name.chars().count();
        // Ties go to names of the same length: a typo more often swaps a character than drops one.
        let mut scored: Vec<(usize, usize, &String)> = self
            .exact
            .keys()
            .map(|known| {
                (
                    edit_distance(name, known),
                    known.chars().count().abs_diff(length),
                    known,
                )
            })
            .filter(|(d, _, _)| *d <= limit)
            .collect();
        scored.sort();
        scored
            .into_iter()
            .take(3)
            .map(|(_, _, n)| n.clone())
            .collect()
    }
}

/// Format pico-dollars as exact US dollars ("$0.000027500000").
pub fn format_usd(amount: Picodollars) -> String {
    format!(
        "${}.{:012}",
        amount / 1_000_000_000_000,
        amount % 1_000_000_000_000
    )
}

/// `*` matches any run of characters (including none); everything else is literal.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        match Catalog::builtin() {
            Ok(c) => c,
            Err(e) => panic!("built-in catalog: {e}"),
        }
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_decimal("2.50", 6), Some(2_500_000));
        assert_eq!(parse_decimal("0.075", 6), Some(75_000));
        assert_eq!(parse_decimal("150", 6), Some(150_000_000));
        assert_eq!(parse_decimal("0.0000001", 6), None);
        assert_eq!(parse_decimal("1.", 6), None);
        assert_eq!(parse_decimal(".5", 6), None);
        assert_eq!(parse_decimal("-1", 6), None);
        assert_eq!(parse_decimal("1e3", 6), None);
        assert_eq!(format_usd(27_500_000), "$0.000027500000");
    }

    #[test]
    fn globs() {
        assert!(glob_match("gpt-5.*", "gpt-5.1"));
        assert!(glob_match("gpt-5.*-mini", "gpt-5.1-mini"));
        assert!(!glob_match("gpt-5.*-mini", "gpt-5.1-minis"));
        assert!(!glob_match("gpt-5.*", "gpt-5"));
        assert!(glob_match("a*b*c", "abc"));
        assert!(!glob_match("a*bc*c", "abc"));
    }

    #[test]
    fn resolves_aliases_snapshots_patterns_and_fine_tunes() {
        let c = catalog();
        let group = |name: &str| {
            c.lookup(name)
                .ok()
                .and_then(|m| m.group())
                .map(|g| &*g.name)
        };
        assert_eq!(group("gpt-4o"), Some("flagship"));
        assert_eq!(group("gpt-4o-2024-11-20"), Some("flagship"));
        assert_eq!(group("gpt-4o-2024-05-13"), Some("flagship"));
        assert_eq!(group("gpt-4o-mini-2024-07-18"), Some("mini"));
        assert_eq!(group("gpt-5.1"), Some("flagship"));
        assert_eq!(group("gpt-5.1-mini"), Some("mini"));
        assert_eq!(group("gpt-5.2-nano"), Some("mini"));
        assert_eq!(group("o3-mini-2025-01-31"), Some("mini"));
        assert_eq!(group("o1-pro"), None);
        assert_eq!(group("text-embedding-3-small"), None);
        assert_eq!(group("ft:gpt-4o-mini-2024-07-18:acme::abc123"), None);
        let ft = c.lookup("ft:gpt-4o-mini-2024-07-18:acme::abc123").ok();
        assert_eq!(ft.map(|m| m.prices().input), Some(300_000));
        let old = c.lookup("gpt-4o-2024-05-13").ok();
        assert_eq!(
            old.map(|m| (
                m.prices().input,
                m.prices().cached_input,
                m.model.max_output
            )),
            Some((5_000_000, 5_000_000, 4096))
        );
    }

    #[test]
    fn unknown_models_suggest_close_names() {
        let c = catalog();
        let err = c.lookup("gpt-4p").err();
        let err = err.as_ref();
        assert_eq!(
            err.and_then(|e| e.suggestions.first()).map(String::as_str),
            Some("gpt-4o")
        );
        let message = err.map(ToString::to_string).unwrap_or_default();
        assert!(message.contains("`gpt-4p` does not exist"), "{message}");
        assert!(c
            .lookup("completely-different-thing")
            .is_err_and(|e| e.suggestions.is_empty()));
    }

    #[test]
    fn downgrades_land_in_another_group() {
        let c = catalog();
        for (from, to) in [
            ("gpt-4o", "gpt-4o-mini"),
            ("o1", "o1-mini"),
            ("o3", "o4-mini"),
            ("gpt-4.1", "gpt-4.1-mini"),
            ("gpt-5", "gpt-5-mini"),
        ] {
            let m = c.lookup(from).ok();
            assert_eq!(
                m.and_then(|m| m.model.downgrade.clone()).as_deref(),
                Some(to)
            );
        }
    }

    #[test]
    fn bad_catalogs_name_the_key() {
        let base =
            BUILTIN_TOML.replace("downgrade = \"gpt-4o-mini\"", "downgrade = \"gpt-4o-mega\"");
        let err = Catalog::from_toml(&base)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("downgrade") && err.contains("gpt-4o-mega"),
            "{err}"
        );
        let base = BUILTIN_TOML.replacen("input = \"2.50\"", "input = \"2,50\"", 1);
        let err = Catalog::from_toml(&base)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("models.gpt-4o.price.input"), "{err}");
        let base = BUILTIN_TOML.replacen("max_output = 16384", "max_output = 16384\ncolour = 1", 1);
        let err = Catalog::from_toml(&base)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("colour"), "{err}");
    }
}
