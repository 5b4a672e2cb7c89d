//! Strict types: a JSON value must have the JSON type its column takes, or the write is refused
//! with 422 naming the column. PostgreSQL's `jsonb_populate_record` would otherwise coerce
//! silently: an object into a text column (its JSON text), `"yes"` into a boolean, `"12"` into
//! an integer.
//!
//! | column type | JSON accepted (and `null`, which NOT NULL may still refuse) |
//! | --- | --- |
//! | `smallint`, `integer`, `bigint` | a number without fraction or exponent |
//! | `numeric`, `real`, `double precision` | a number |
//! | `boolean` | `true` or `false` |
//! | `text`, `character varying`, `character`, `citext` | a string |
//! | `uuid`, `date`, `time...`, `timestamp...`, `interval`, `inet`, `cidr`, `macaddr`, `bytea`, `money` | a string (the database checks its form) |
//! | `json`, `jsonb` | any JSON value |
//! | arrays (`integer[]`, ...) | an array |
//! | other types (enums, domains, composites, ranges) | any value: the database decides |

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValueKind {
    Integer,
    Number,
    Boolean,
    String,
    Json,
    Array,
    Any,
}

impl ValueKind {
    /// The kind of value a column takes, from `format_type` (`integer`, `numeric(10,2)`, ...).
    pub fn of(format_type: &str) -> ValueKind {
        if format_type.ends_with("[]") {
            return ValueKind::Array;
        }
        let base = format_type.split('(').next().unwrap_or_default().trim();
        match base {
            "smallint" | "integer" | "bigint" => ValueKind::Integer,
            "numeric" | "real" | "double precision" => ValueKind::Number,
            "boolean" => ValueKind::Boolean,
            "json" | "jsonb" => ValueKind::Json,
            "text" | "character varying" | "character" | "citext" | "uuid" | "date" | "bytea"
            | "interval" | "inet" | "cidr" | "macaddr" | "macaddr8" | "money" => ValueKind::String,
            t if t.starts_with("time") => ValueKind::String,
            _ => ValueKind::Any,
        }
    }

    pub fn accepts(self, v: &Value) -> bool {
        match (self, v) {
            (_, Value::Null) | (ValueKind::Json | ValueKind::Any, _) => true,
            (ValueKind::Integer, Value::Number(n)) => n.is_i64() || n.is_u64(),
            (ValueKind::Number, Value::Number(_)) => true,
            (ValueKind::Boolean, Value::Bool(_)) => true,
            (ValueKind::String, Value::String(_)) => true,
            (ValueKind::Array, Value::Array(_)) => true,
            _ => false,
        }
    }

    /// What the column takes, for the error message.
    pub fn expected(self) -> &'static str {
        match self {
            ValueKind::Integer => "an integer",
            ValueKind::Number => "a number",
            ValueKind::Boolean => "true or false",
            ValueKind::String => "a string",
            ValueKind::Array => "an array",
            ValueKind::Json | ValueKind::Any => "any value",
        }
    }
}

/// The JSON type of a value, for the error message.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number with a fraction",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_column_type_takes_its_json_type() {
        let cases = [
            ("integer", json!(12), true),
            ("bigint", json!("12"), false),
            ("integer", json!(1.5), false),
            ("smallint", json!({"a": 1}), false),
            ("numeric(10,2)", json!(1.25), true),
            ("double precision", json!("1.5"), false),
            ("boolean", json!(true), true),
            ("boolean", json!("yes"), false),
            ("boolean", json!(1), false),
            ("text", json!("x"), true),
            ("text", json!({"a": 1}), false),
            ("character varying(20)", json!(12), false),
            ("uuid", json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), true),
            (
                "timestamp with time zone",
                json!("2026-11-29T00:00:00Z"),
                true,
            ),
            ("timestamp without time zone", json!(12), false),
            ("jsonb", json!({"a": [1, "b"]}), true),
            ("json", json!("x"), true),
            ("integer[]", json!([1, 2]), true),
            ("text[]", json!("x"), false),
            ("mood", json!("happy"), true),
        ];
        for (t, v, ok) in cases {
            assert_eq!(ValueKind::of(t).accepts(&v), ok, "{t} with {v}");
        }
        for t in ["integer", "boolean", "text", "uuid", "integer[]"] {
            assert!(ValueKind::of(t).accepts(&Value::Null), "{t} with null");
        }
    }
}
