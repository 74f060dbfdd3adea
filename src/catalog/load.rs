//! Loading a catalog: TOML in its raw form, then one pass that parses every
//! price and date and checks every cross-reference (groups, image families,
//! downgrade targets), so lookups on the request path never fail half-way.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{Catalog, CatalogError, Group, ImageCost, Kind, Model, Prices};
use crate::day::Day;
use crate::tokens::Encoding;

fn invalid(message: impl Into<String>) -> CatalogError {
    CatalogError::Invalid(message.into())
}

// ---- raw form, as written in TOML -----------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    effective: String,
    program: RawProgram,
    groups: BTreeMap<String, RawGroup>,
    #[serde(default)]
    images: BTreeMap<String, RawImages>,
    models: Vec<RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    starts: String,
    ends: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    daily_tokens: u64,
    daily_tokens_tiers_1_2: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "method", rename_all = "snake_case")]
enum RawImages {
    Tiles { base: u64, per_tile: u64 },
    Patches { multiplier: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: String,
    cached_input: Option<String>,
    output: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    #[serde(default)]
    snapshots: Vec<String>,
    #[serde(default)]
    kind: Kind,
    encoding: Encoding,
    group: Option<String>,
    price: RawPrice,
    fine_tuned_price: Option<RawPrice>,
    max_output: u64,
    images: Option<String>,
    downgrade: Option<String>,
}

impl Catalog {
    pub fn from_toml(text: &str) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = toml::from_str(text)?;
        let day = |key: &str, value: &str| {
            Day::parse(value)
                .ok_or_else(|| invalid(format!("{key} = {value:?} is not a YYYY-MM-DD date")))
        };
        let effective = day("effective", &raw.effective)?;
        let program_starts = day("program.starts", &raw.program.starts)?;
        let program_ends = match &raw.program.ends {
            Some(ends) => Some(day("program.ends", ends)?),
            None => None,
        };

        let groups: Vec<Group> = raw
            .groups
            .into_iter()
            .map(|(name, g)| Group {
                name: name.into(),
                daily_tokens: g.daily_tokens,
                daily_tokens_tiers_1_2: g.daily_tokens_tiers_1_2,
            })
            .collect();

        let mut images = HashMap::new();
        for (name, raw) in raw.images {
            let cost = match raw {
                RawImages::Tiles { base, per_tile } => ImageCost::Tiles { base, per_tile },
                RawImages::Patches { multiplier } => ImageCost::Patches {
                    multiplier_milli: parse_decimal(&multiplier, 3).ok_or_else(|| {
                        invalid(format!("images.{name}.multiplier = {multiplier:?} is not a decimal with at most 3 places"))
                    })?,
                },
            };
            images.insert(name, cost);
        }

        let mut models = Vec::with_capacity(raw.models.len());
        let mut exact = crate::FastMap::default();
        let mut patterns = Vec::new();
        for m in raw.models {
            let index = models.len();
            let ctx = |key: &str| format!("models.{}.{key}", m.name);
            let group = match &m.group {
                Some(g) => Some(
                    groups
                        .iter()
                        .position(|group| *group.name == **g)
                        .ok_or_else(|| {
                            invalid(format!("{} = {g:?} names no [groups] entry", ctx("group")))
                        })?,
                ),
                None => None,
            };
            let image_cost = match &m.images {
                Some(family) => Some(*images.get(family).ok_or_else(|| {
                    invalid(format!(
                        "{} = {family:?} names no [images] entry",
                        ctx("images")
                    ))
                })?),
                None => None,
            };
            let prices = parse_prices(&m.price, &ctx("price"))?;
            let fine_tuned_prices = match &m.fine_tuned_price {
                Some(p) => Some(parse_prices(p, &ctx("fine_tuned_price"))?),
                None => None,
            };
            for name in std::iter::once(&m.name).chain(&m.snapshots) {
                if name.is_empty() || name.trim() != name {
                    return Err(invalid(format!(
                        "{}: {name:?} is not a model name",
                        ctx("snapshots")
                    )));
                }
                if name.contains('*') {
                    if patterns.iter().any(|(p, _)| p == name) {
                        return Err(invalid(format!("pattern {name:?} appears twice")));
                    }
                    patterns.push((name.clone(), index));
                } else if exact.insert(name.clone(), index).is_some() {
                    return Err(invalid(format!("model name {name:?} appears twice")));
                }
            }
            models.push(Model {
                name: m.name.into(),
                kind: m.kind,
                encoding: m.encoding,
                group,
                prices,
                fine_tuned_prices,
                max_output: m.max_output,
                images: image_cost,
                served_as: m.snapshots.iter().find(|s| !s.contains('*')).cloned(),
                downgrade: m.downgrade,
            });
        }
        // Most literal characters first: `gpt-5.*-mini` must win over `gpt-5.*`.
        patterns.sort_by_key(|(p, _)| std::cmp::Reverse(p.chars().filter(|&c| c != '*').count()));

        let catalog = Catalog {
            effective,
            program_starts,
            program_ends,
            groups,
            models,
            exact,
            patterns,
        };
        catalog.check_downgrades()?;
        Ok(catalog)
    }

    /// Every downgrade target exists, is in the program, and is in another group.
    fn check_downgrades(&self) -> Result<(), CatalogError> {
        for model in &self.models {
            let Some(target) = &model.downgrade else {
                continue;
            };
            let resolved = self.lookup(target).map_err(|_| {
                invalid(format!(
                    "models.{}.downgrade = {target:?} is not in the catalog",
                    model.name
                ))
            })?;
            if resolved.group.is_none() || resolved.model.group == model.group {
                return Err(invalid(format!(
                    "models.{}.downgrade = {target:?} must be a model of another program group",
                    model.name
                )));
            }
        }
        Ok(())
    }
}

fn parse_prices(raw: &RawPrice, ctx: &str) -> Result<Prices, CatalogError> {
    let price = |key: &str, value: &str| {
        parse_decimal(value, 6).ok_or_else(|| {
            invalid(format!(
                "{ctx}.{key} = {value:?} is not a price in dollars per million tokens (like \"2.50\", at most 6 decimals)"
            ))
        })
    };
    let input = price("input", &raw.input)?;
    Ok(Prices {
        input,
        cached_input: match &raw.cached_input {
            Some(v) => price("cached_input", v)?,
            None => input,
        },
        output: match &raw.output {
            Some(v) => price("output", v)?,
            None => 0,
        },
    })
}

/// A non-negative decimal string as an integer scaled by 10^`places`
/// ("2.50", 6 -> 2_500_000); `None` for anything else or more places.
pub fn parse_decimal(text: &str, places: u32) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > places as usize {
        return None;
    }
    if text.ends_with('.') {
        return None;
    }
    let scale = 10u64.checked_pow(places)?;
    let whole: u64 = whole.parse().ok()?;
    let mut frac: u64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    frac = frac.checked_mul(10u64.checked_pow(places - fraction.len() as u32)?)?;
    whole.checked_mul(scale)?.checked_add(frac)
}

// ---- the configuration's overlay ------------------------------------------

/// A model the configuration adds or changes (`[catalog.models.NAME]`, or
/// a catalog overlay file's `[models.NAME]`): for a new model, `encoding`,
/// `price` and `max_output` are needed; for one the catalog has, what is
/// given replaces the catalog's.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayModel {
    #[serde(default)]
    pub snapshots: Vec<String>,
    pub kind: Option<Kind>,
    pub encoding: Option<Encoding>,
    /// A program group, or `"none"` for a model that is always billed.
    pub group: Option<String>,
    pub price: Option<OverlayPrice>,
    pub max_output: Option<u64>,
    pub downgrade: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlayPrice {
    pub input: String,
    pub cached_input: Option<String>,
    pub output: Option<String>,
}

impl Catalog {
    /// Add model `name` or change the catalog's model of that name (its
    /// family's name, or any of its exact names). An error names the key at
    /// fault, after `models.NAME.`.
    pub fn overlay(&mut self, name: &str, m: &OverlayModel) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((key.to_owned(), message));
        if name.is_empty() || name.trim() != name || name.starts_with("ft:") {
            return fail("", format!("{name:?} is not a model name"));
        }
        let group = match m.group.as_deref() {
            None => None,
            Some("none") => Some(None),
            Some(g) => match self.groups.iter().position(|group| *group.name == *g) {
                Some(index) => Some(Some(index)),
                None => return fail("group", format!("{g:?} names no program group")),
            },
        };
        let prices = match &m.price {
            Some(raw) => {
                let raw = RawPrice {
                    input: raw.input.clone(),
                    cached_input: raw.cached_input.clone(),
                    output: raw.output.clone(),
                };
                Some(parse_prices(&raw, "price").map_err(|e| ("price".to_owned(), e.to_string()))?)
            }
            None => None,
        };
        let existing = self
            .exact
            .get(name)
            .copied()
            .or_else(|| self.models.iter().position(|model| *model.name == *name));
        let index = match existing {
            Some(index) => index,
            None => {
                let (Some(encoding), Some(prices), Some(max_output)) =
                    (m.encoding, prices, m.max_output)
                else {
                    return fail(
                        "",
                        "a model the catalog does not have needs encoding, price and max_output"
                            .into(),
                    );
                };
                self.models.push(Model {
                    name: name.into(),
                    kind: m.kind.unwrap_or_default(),
                    encoding,
                    group: None,
                    prices,
                    fine_tuned_prices: None,
                    max_output,
                    images: None,
                    downgrade: None,
                    served_as: m.snapshots.iter().find(|s| !s.contains('*')).cloned(),
                });
                let index = self.models.len() - 1;
                self.name(name, index).map_err(|e| (String::new(), e))?;
                index
            }
        };
        for snapshot in &m.snapshots {
            self.name(snapshot, index)
                .map_err(|e| ("snapshots".to_owned(), e))?;
        }
        let model = &mut self.models[index];
        if let Some(kind) = m.kind {
            model.kind = kind;
        }
        if let Some(encoding) = m.encoding {
            model.encoding = encoding;
        }
        if let Some(group) = group {
            model.group = group;
        }
        if let Some(prices) = prices {
            model.prices = prices;
        }
        if let Some(max_output) = m.max_output {
            model.max_output = max_output;
        }
        if m.downgrade.is_some() {
            model.downgrade.clone_from(&m.downgrade);
        }
        self.check_downgrades()
            .map_err(|e| ("downgrade".to_owned(), e.to_string()))
    }

    /// Point the exact name or `*` pattern `name` at model `index` (from
    /// whichever model had it).
    fn name(&mut self, name: &str, index: usize) -> Result<(), String> {
        if name.is_empty() || name.trim() != name {
            return Err(format!("{name:?} is not a model name"));
        }
        if name.contains('*') {
            self.patterns.retain(|(p, _)| p != name);
            self.patterns.push((name.to_owned(), index));
            self.patterns
                .sort_by_key(|(p, _)| std::cmp::Reverse(p.chars().filter(|&c| c != '*').count()));
        } else {
            self.exact.insert(name.to_owned(), index);
        }
        Ok(())
    }
}

#[cfg(test)]
mod overlay_tests {
    use super::*;

    fn model(text: &str) -> OverlayModel {
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_new_model_a_changed_price_and_errors_by_key() {
        let mut catalog = Catalog::builtin().unwrap_or_else(|e| panic!("{e}"));
        catalog
            .overlay(
                "gpt-oss-120b",
                &model("encoding = \"o200k_base\"\ngroup = \"mini\"\nmax_output = 32768\nprice = { input = \"0.15\", output = \"0.60\" }\nsnapshots = [\"gpt-oss-120b-*\"]"),
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        let found = catalog
            .lookup("gpt-oss-120b-2026")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(*found.model.name, *"gpt-oss-120b");
        assert_eq!(found.group().map(|g| &*g.name), Some("mini"));
        assert_eq!(found.prices().input, 150_000);

        catalog
            .overlay(
                "gpt-4o",
                &model("price = { input = \"2.00\", output = \"8.00\" }\ngroup = \"none\""),
            )
            .unwrap_or_else(|e| panic!("{e:?}"));
        let gpt4o = catalog
            .lookup("gpt-4o-2024-08-06")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (gpt4o.prices().input, gpt4o.prices().output),
            (2_000_000, 8_000_000)
        );
        assert!(gpt4o.group().is_none(), "always billed now");

        let missing = catalog.overlay("new-model", &model("max_output = 10"));
        assert!(missing.is_err_and(|(_, m)| m.contains("needs encoding")));
        let group = catalog.overlay("gpt-4o-mini", &model("group = \"nope\""));
        assert!(group.is_err_and(|(k, _)| k == "group"));
        let price = catalog.overlay("gpt-4o-mini", &model("price = { input = \"abc\" }"));
        assert!(price.is_err_and(|(k, _)| k == "price"));
    }
}
