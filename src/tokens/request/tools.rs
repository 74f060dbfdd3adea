//! Tool and function definitions, and structured-output schemas: the
//! cookbook's per-function and per-property constants, which OpenAI calls an
//! estimate.

use serde_json::{Map, Value};

use super::{
    missing, wrong_type, Counter, RequestError, NOTE_BUILTIN_TOOLS, NOTE_SCHEMA, NOTE_TOOLS,
};
use crate::tokens::{Count, Encoding, Exactness};

impl Counter<'_> {
    /// Tool definitions: `tools` (Chat's nested and Responses' flat function
    /// shapes) and the legacy `functions`.
    pub(super) fn tools(
        &self,
        body: &Map<String, Value>,
        count: &mut Count,
    ) -> Result<(), RequestError> {
        // The cookbook's constants; cl100k models were measured with 10 at the start of a function.
        let func_init: u64 = if self.encoding == Encoding::Cl100kBase {
            10
        } else {
            7
        };
        let (prop_init, prop_key, enum_item, func_end): (u64, u64, u64, u64) = (3, 3, 3, 12);
        let enum_init: i64 = -3;

        let mut functions: Vec<(&Map<String, Value>, String)> = Vec::new();
        for key in ["tools", "functions"] {
            let list = match body.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(list)) => list,
                Some(other) => return Err(wrong_type(key, "an array", other)),
            };
            for (i, tool) in list.iter().enumerate() {
                let param = format!("{key}[{i}]");
                let Value::Object(tool) = tool else {
                    return Err(wrong_type(&param, "an object", tool));
                };
                let is_function = key == "functions"
                    || tool.get("type").and_then(Value::as_str) == Some("function");
                if !is_function {
                    count.add_inexact(0, Exactness::Estimate, NOTE_BUILTIN_TOOLS);
                    continue;
                }
                // Chat nests the definition under "function"; Responses and "functions" do not.
                let (def, def_param) = match tool.get("function") {
                    Some(Value::Object(def)) => (def, format!("{param}.function")),
                    Some(other) => {
                        return Err(wrong_type(&format!("{param}.function"), "an object", other))
                    }
                    None => (tool, param),
                };
                functions.push((def, def_param));
            }
        }
        if functions.is_empty() {
            return Ok(());
        }
        let mut tokens: i64 = 0;
        for (def, param) in functions {
            let name = match def.get("name") {
                Some(Value::String(name)) => name.as_str(),
                None => return Err(missing(&format!("{param}.name"))),
                Some(other) => return Err(wrong_type(&format!("{param}.name"), "a string", other)),
            };
            let description = def
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let description = description.strip_suffix('.').unwrap_or(description);
            tokens += func_init as i64 + self.text(&format!("{name}:{description}")) as i64;
            let properties = def
                .get("parameters")
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object);
            let Some(properties) = properties.filter(|p| !p.is_empty()) else {
                continue;
            };
            tokens += prop_init as i64;
            for (key, property) in properties {
                tokens += prop_key as i64;
                let p_type = match property.get("type") {
                    Some(Value::String(t)) => t.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let p_desc = property
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if let Some(Value::Array(items)) = property.get("enum") {
                    tokens += enum_init;
                    for item in items {
                        tokens += enum_item as i64;
                        tokens += match item {
                            Value::String(s) => self.text(s),
                            other => self.text(&other.to_string()),
                        } as i64;
                    }
                }
                let p_desc = p_desc.strip_suffix('.').unwrap_or(p_desc);
                tokens += self.text(&format!("{key}:{p_type}:{p_desc}")) as i64;
                for nested in ["properties", "items", "anyOf", "oneOf", "allOf"] {
                    if let Some(schema) = property.get(nested) {
                        count.add_inexact(self.json_text(schema), Exactness::Estimate, NOTE_SCHEMA);
                    }
                }
            }
        }
        tokens += func_end as i64;
        count.add_inexact(tokens.max(0) as u64, Exactness::Estimate, NOTE_TOOLS);
        Ok(())
    }

    /// A JSON schema in `response_format` (Chat) or `text.format` (Responses).
    pub(super) fn response_format(&self, format: Option<&Value>, count: &mut Count) {
        if let Some(schema) = format.and_then(|f| f.get("json_schema").or_else(|| f.get("schema")))
        {
            count.add_inexact(self.json_text(schema), Exactness::Estimate, NOTE_SCHEMA);
        }
    }
}
