//! Fields Hyperpool knows but does not implement: accepted at their default value, refused
//! otherwise. Clients generated from Cloud Hypervisor's OpenAPI document send many of them with
//! defaults, so refusing their mere presence would break those clients; ignoring a non-default
//! value would silently give the user a different VM than asked for.

use serde_json::{Map, Value};

/// A field that was set to something Hyperpool cannot honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    /// Dotted path of the field, e.g. `disks[1].vhost_user`.
    pub field: String,
    pub why: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.why)
    }
}

impl std::error::Error for Unsupported {}

/// What a known-but-unimplemented field may hold.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Allowed {
    /// `null`, `false` or absent.
    False,
    /// `null`, `[]` or absent.
    Empty,
    /// `null` or absent only.
    Null,
    /// `null`, absent, or this integer.
    Int(i64),
    /// `null`, absent, or this string.
    Str(&'static str),
    /// `null`, absent, `true`.
    True,
    /// Anything: the field only tunes Hyperpool's own behaviour or is informational.
    Any,
}

impl Allowed {
    fn admits(self, v: &Value) -> bool {
        if v.is_null() {
            return true;
        }
        match self {
            Allowed::False => v == &Value::Bool(false),
            Allowed::True => v == &Value::Bool(true),
            Allowed::Empty => v.as_array().is_some_and(Vec::is_empty),
            Allowed::Null => false,
            Allowed::Int(n) => v.as_i64() == Some(n),
            Allowed::Str(s) => v.as_str() == Some(s),
            Allowed::Any => true,
        }
    }

    fn describe(self) -> String {
        match self {
            Allowed::False => "only false is supported".into(),
            Allowed::True => "only true is supported".into(),
            Allowed::Empty => "not supported by Hyperpool yet (leave it empty)".into(),
            Allowed::Null => "not supported by Hyperpool yet (leave it out)".into(),
            Allowed::Int(n) => format!("only {n} is supported"),
            Allowed::Str(s) => format!("only \"{s}\" is supported"),
            Allowed::Any => String::new(),
        }
    }
}

/// Checks the fields of `extra` (everything a struct did not parse itself) against `known`.
pub(crate) fn check(
    path: &str,
    extra: &Map<String, Value>,
    known: &[(&str, Allowed)],
) -> Result<(), Unsupported> {
    for (name, value) in extra {
        let field = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        match known.iter().find(|(k, _)| k == name) {
            Some((_, allowed)) if allowed.admits(value) => {}
            Some((_, allowed)) => {
                return Err(Unsupported {
                    field,
                    why: allowed.describe(),
                });
            }
            None => {
                return Err(Unsupported {
                    field,
                    why: "unknown field".into(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn defaults_pass_and_other_values_name_the_field() {
        let known = [
            ("iommu", Allowed::False),
            ("queue_size", Allowed::Int(256)),
            ("fs", Allowed::Empty),
            ("mode", Allowed::Str("Acpi")),
        ];
        let ok = map(json!({"iommu": false, "queue_size": 256, "fs": [], "mode": null}));
        assert_eq!(check("disks[0]", &ok, &known), Ok(()));

        let e = check("disks[0]", &map(json!({"iommu": true})), &known).unwrap_err();
        assert_eq!(e.field, "disks[0].iommu");
        assert_eq!(
            e.to_string(),
            "field `disks[0].iommu`: only false is supported"
        );

        let e = check("", &map(json!({"fs": [{"tag": "x"}]})), &known).unwrap_err();
        assert_eq!(e.field, "fs");
        let e = check("", &map(json!({"queue_size": 128})), &known).unwrap_err();
        assert!(e.why.contains("256"), "{e}");
        let e = check("", &map(json!({"bogus": 1})), &known).unwrap_err();
        assert_eq!(e.to_string(), "field `bogus`: unknown field");
    }
}
