//! Parses a config text (TOML, or JSON with comments) into a JSON value plus an index from
//! field path (`routes[1].prefix`) to line number, so every problem can name file:line.

use std::collections::HashMap;

use jsonc_parser::ast;
use jsonc_parser::common::Ranged;
use toml::de::{DeTable, DeValue};

/// Field path → 1-based line of that field in the source text.
#[derive(Debug, Default)]
pub struct SpanIndex {
    lines: HashMap<String, usize>,
}

impl SpanIndex {
    /// The line of `path`, or of its nearest parent that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }

    fn insert(&mut self, path: String, line: usize) {
        self.lines.entry(path).or_insert(line);
    }
}

/// A syntax error, with the line it was found on.
#[derive(Debug)]
pub struct SyntaxError {
    pub line: Option<usize>,
    pub message: String,
}

pub enum Format {
    Toml,
    Json,
}

impl Format {
    pub fn of_path(path: &str) -> Format {
        if path.ends_with(".json") || path.ends_with(".jsonc") { Format::Json } else { Format::Toml }
    }
}

pub fn parse(text: &str, format: Format) -> Result<(serde_json::Value, SpanIndex), SyntaxError> {
    match format {
        Format::Toml => parse_toml(text),
        Format::Json => parse_json(text),
    }
}

pub fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

fn parse_toml(text: &str) -> Result<(serde_json::Value, SpanIndex), SyntaxError> {
    let table = DeTable::parse(text).map_err(|e| SyntaxError {
        line: e.span().map(|s| line_at(text, s.start)),
        message: e.message().trim().to_string(),
    })?;
    let mut index = SpanIndex::default();
    let value = toml_table(text, "", table.get_ref(), &mut index);
    Ok((value, index))
}

fn toml_table(text: &str, path: &str, table: &DeTable<'_>, index: &mut SpanIndex) -> serde_json::Value {
    let mut map = serde_json::Map::new();
    for (key, value) in table.iter() {
        let child = join(path, key.get_ref());
        index.insert(child.clone(), line_at(text, key.span().start));
        map.insert(key.get_ref().to_string(), toml_value(text, &child, value.get_ref(), index));
    }
    serde_json::Value::Object(map)
}

fn toml_value(text: &str, path: &str, value: &DeValue<'_>, index: &mut SpanIndex) -> serde_json::Value {
    match value {
        DeValue::String(s) => serde_json::Value::String(s.to_string()),
        DeValue::Integer(i) => {
            let parsed = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok();
            parsed.map(serde_json::Value::from).unwrap_or(serde_json::Value::String(i.as_str().to_string()))
        }
        DeValue::Float(f) => f
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::String(f.as_str().to_string())),
        DeValue::Boolean(b) => serde_json::Value::Bool(*b),
        DeValue::Datetime(d) => serde_json::Value::String(d.to_string()),
        DeValue::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let child = format!("{path}[{i}]");
                    index.insert(child.clone(), line_at(text, item.span().start));
                    toml_value(text, &child, item.get_ref(), index)
                })
                .collect(),
        ),
        DeValue::Table(table) => toml_table(text, path, table, index),
    }
}

fn parse_json(text: &str) -> Result<(serde_json::Value, SpanIndex), SyntaxError> {
    let options = jsonc_parser::ParseOptions::default();
    let collect = jsonc_parser::CollectOptions::default();
    let parsed = jsonc_parser::parse_to_ast(text, &collect, &options)
        .map_err(|e| SyntaxError { line: Some(e.line_display()), message: e.kind().to_string() })?;
    let root = parsed.value.ok_or_else(|| SyntaxError { line: Some(1), message: "the file is empty".to_string() })?;
    let mut index = SpanIndex::default();
    let value = json_value(text, "", &root, &mut index);
    Ok((value, index))
}

fn json_value(text: &str, path: &str, value: &ast::Value<'_>, index: &mut SpanIndex) -> serde_json::Value {
    match value {
        ast::Value::StringLit(s) => serde_json::Value::String(s.value.to_string()),
        ast::Value::NumberLit(n) => {
            serde_json::from_str(n.value).unwrap_or(serde_json::Value::String(n.value.to_string()))
        }
        ast::Value::BooleanLit(b) => serde_json::Value::Bool(b.value),
        ast::Value::NullKeyword(_) => serde_json::Value::Null,
        ast::Value::Array(array) => serde_json::Value::Array(
            array
                .elements
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let child = format!("{path}[{i}]");
                    index.insert(child.clone(), line_at(text, item.range().start));
                    json_value(text, &child, item, index)
                })
                .collect(),
        ),
        ast::Value::Object(object) => {
            let mut map = serde_json::Map::new();
            for prop in &object.properties {
                let key = prop.name.as_str();
                let child = join(path, key);
                index.insert(child.clone(), line_at(text, prop.range.start));
                map.insert(key.to_string(), json_value(text, &child, &prop.value, index));
            }
            serde_json::Value::Object(map)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_paths_map_to_lines() {
        let text = "[server]\nlisten = \"x\"\n\n[[routes]]\nname = \"a\"\n[[routes]]\nname = \"b\"\nprefix = \"/b\"\n";
        let (value, index) = parse(text, Format::Toml).unwrap();
        assert_eq!(value["routes"][1]["prefix"], "/b");
        assert_eq!(index.line_of("server.listen"), Some(2));
        assert_eq!(index.line_of("routes[1].prefix"), Some(8));
        assert_eq!(index.line_of("routes[1].missing"), Some(6));
    }

    #[test]
    fn json_with_comments_maps_to_lines() {
        let text = "{\n  // a comment\n  \"a\": {\n    \"b\": [1, 2]\n  }\n}\n";
        let (value, index) = parse(text, Format::Json).unwrap();
        assert_eq!(value["a"]["b"][1], 2);
        assert_eq!(index.line_of("a.b"), Some(4));
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let err = parse("a = 1\nb = [\n", Format::Toml).err().unwrap();
        assert!(err.line.is_some());
        let err = parse("{\n\"a\": }", Format::Json).err().unwrap();
        assert_eq!(err.line, Some(2));
    }
}
