//! A value valid against a JSON schema, made deterministically: the
//! arguments of a simulated function call, or the content of a
//! `json_schema` answer. It reads what OpenAI's structured outputs accept
//! (objects with their properties, arrays, strings, numbers, integers,
//! booleans, null, `enum`, `const`, `anyOf`, `oneOf`, `allOf`, `$ref` into
//! `$defs` or `definitions`, type lists such as `["string", "null"]`, and
//! the bounds `minimum`, `maximum`, `minItems`, `maxItems`, `minLength`,
//! `maxLength`, `format`); anything else gets a value of its type.

use serde_json::{json, Map, Value};

/// How deep a schema is followed (a recursive `$ref` stops here with the
/// smallest value of its type).
const MAX_DEPTH: usize = 12;

/// A value valid against `schema`; `seed` picks its words.
pub fn instance(schema: &Value, seed: usize) -> Value {
    Maker { root: schema, seed }.make(schema, 0)
}

struct Maker<'a> {
    root: &'a Value,
    seed: usize,
}

impl Maker<'_> {
    fn word(&self, n: usize) -> &'static str {
        super::WORDS[(self.seed + n) % super::WORDS.len()].trim()
    }

    /// The schema `$ref` names in the root (`#/$defs/X`, `#/definitions/X`, `#`).
    fn resolve(&self, reference: &str) -> Option<&Value> {
        let path = reference.strip_prefix('#')?;
        if path.is_empty() {
            return Some(self.root);
        }
        self.root.pointer(path)
    }

    fn make(&self, schema: &Value, depth: usize) -> Value {
        let Some(s) = schema.as_object() else {
            // `true` or `{}`: anything; a string will do.
            return json!(self.word(depth));
        };
        if let Some(v) = s.get("const") {
            return v.clone();
        }
        if let Some(first) = s
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return first.clone();
        }
        if depth >= MAX_DEPTH {
            return smallest(s);
        }
        if let Some(target) = s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| self.resolve(r))
        {
            return self.make(target, depth + 1);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(options) = s.get(key).and_then(Value::as_array) {
                // The first option that is not null (an Optional field's value).
                let pick = options
                    .iter()
                    .find(|o| o.get("type").and_then(Value::as_str) != Some("null"))
                    .or(options.first());
                if let Some(pick) = pick {
                    return self.make(pick, depth + 1);
                }
            }
        }
        if let Some(all) = s.get("allOf").and_then(Value::as_array) {
            let mut merged = Map::new();
            for part in all {
                if let Value::Object(o) = self.make(part, depth + 1) {
                    merged.extend(o);
                }
            }
            return Value::Object(merged);
        }
        match type_of(s) {
            "object" => self.object(s, depth),
            "array" => self.array(s, depth),
            "string" => self.string(s, depth),
            "integer" => json!(integer(s)),
            "number" => number(s),
            "boolean" => json!(true),
            "null" => Value::Null,
            _ => json!(self.word(depth)),
        }
    }

    fn object(&self, s: &Map<String, Value>, depth: usize) -> Value {
        let mut out = Map::new();
        if let Some(properties) = s.get("properties").and_then(Value::as_object) {
            for (i, (name, schema)) in properties.iter().enumerate() {
                let maker = Maker {
                    root: self.root,
                    seed: self.seed + i + 1,
                };
                out.insert(name.clone(), maker.make(schema, depth + 1));
            }
        }
        Value::Object(out)
    }

    fn array(&self, s: &Map<String, Value>, depth: usize) -> Value {
        let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(1);
        let max = s
            .get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        let n = min.max(1).min(max).min(8);
        let items = s.get("items").unwrap_or(&Value::Bool(true));
        (0..n as usize)
            .map(|i| {
                Maker {
                    root: self.root,
                    seed: self.seed + i,
                }
                .make(items, depth + 1)
            })
            .collect()
    }

    fn string(&self, s: &Map<String, Value>, depth: usize) -> Value {
        let mut text = match s.get("format").and_then(Value::as_str) {
            Some("date-time") => "2026-01-01T00:00:00Z".to_owned(),
            Some("date") => "2026-01-01".to_owned(),
            Some("time") => "00:00:00".to_owned(),
            Some("duration") => "P1D".to_owned(),
            Some("email") => "someone@example.com".to_owned(),
            Some("uuid") => "00000000-0000-4000-8000-000000000000".to_owned(),
            Some("uri") => "https://example.com/".to_owned(),
            Some("ipv4") => "192.0.2.1".to_owned(),
            Some("ipv6") => "2001:db8::1".to_owned(),
            Some("hostname") => "example.com".to_owned(),
            _ => self.word(depth).to_owned(),
        };
        let min = s.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
        while text.chars().count() < min.min(4096) {
            text.push('x');
        }
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
            text = text.chars().take(max as usize).collect();
        }
        json!(text)
    }
}

/// The schema's type: its `type`, or the first not null of a list, or
/// what its keywords imply.
fn type_of(s: &Map<String, Value>) -> &str {
    match s.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if s.contains_key("properties") => "object",
        _ if s.contains_key("items") => "array",
        _ => "",
    }
}

/// A value of the type for a schema past [`MAX_DEPTH`].
fn smallest(s: &Map<String, Value>) -> Value {
    match type_of(s) {
        "object" => json!({}),
        "array" => json!([]),
        "integer" => json!(integer(s)),
        "number" => number(s),
        "boolean" => json!(false),
        "string" => json!(""),
        _ => Value::Null,
    }
}

fn integer(s: &Map<String, Value>) -> i64 {
    let min = s.get("minimum").and_then(Value::as_f64);
    let exclusive = s.get("exclusiveMinimum").and_then(Value::as_f64);
    let max = s.get("maximum").and_then(Value::as_f64);
    let mut n = 1.0f64;
    if let Some(m) = min {
        n = n.max(m.ceil());
    }
    if let Some(m) = exclusive {
        n = n.max(m.floor() + 1.0);
    }
    if let Some(m) = max {
        n = n.min(m.floor());
    }
    n as i64
}

fn number(s: &Map<String, Value>) -> Value {
    let min = s.get("minimum").and_then(Value::as_f64);
    let max = s.get("maximum").and_then(Value::as_f64);
    let mut n = 1.5f64;
    if let Some(m) = min {
        n = n.max(m);
    }
    if let Some(m) = max {
        n = n.min(m);
    }
    json!(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pydantic_schema_with_defs_optionals_and_enums() {
        let schema = json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer", "minimum": 18, "maximum": 99},
                "score": {"type": "number", "maximum": 1},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "kind": {"enum": ["a", "b"]},
                "home": {"$ref": "#/$defs/Address"},
                "nick": {"anyOf": [{"type": "null"}, {"type": "string", "minLength": 3}]},
                "when": {"type": ["string", "null"], "format": "date"}
            },
            "required": ["name", "age", "score", "tags", "kind", "home", "nick", "when"],
            "additionalProperties": false,
            "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"}, "next": {"$ref": "#/$defs/Address"}}}}
        });
        let v = instance(&schema, 3);
        assert!(v["name"].is_string());
        assert_eq!(v["age"], 18);
        assert_eq!(v["score"], 1.0);
        assert_eq!(v["tags"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["kind"], "a");
        assert!(v["home"]["city"].is_string() && v["home"]["next"].is_object());
        assert!(v["nick"].as_str().is_some_and(|n| n.len() >= 3));
        assert_eq!(v["when"], "2026-01-01");
        assert_eq!(instance(&schema, 3), v, "the same every time");
    }
}
