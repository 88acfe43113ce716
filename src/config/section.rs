//! A walker over one TOML table that records every bad key with its fix instead of stopping.
//! Numbers and booleans are also read from strings, the form environment overrides give.

use super::ConfigError;
use std::net::SocketAddr;
use std::time::Duration;
use toml::{Table, Value};

/// One table of the file, read key by key; unknown keys are reported when it is made.
pub(super) struct Section<'a> {
    path: String,
    table: &'a Table,
    pub(super) errors: Vec<ConfigError>,
}

impl<'a> Section<'a> {
    /// Opens `table` at `path` and reports each key that is not in `known`.
    pub(super) fn new(path: impl Into<String>, table: &'a Table, known: &[&str]) -> Section<'a> {
        let mut section = Section {
            path: path.into(),
            table,
            errors: Vec::new(),
        };
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let fix = format!("remove it; the keys known here are: {}", known.join(", "));
                section.error(key, "is not a known key", fix);
            }
        }
        section
    }

    /// Returns the full dotted name of `key` in this section.
    pub(super) fn key(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Records a problem with `key`.
    pub(super) fn error(&mut self, key: &str, problem: impl Into<String>, fix: impl Into<String>) {
        let key = self.key(key);
        self.errors.push(ConfigError {
            key,
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    fn typed<T>(
        &mut self,
        key: &str,
        expected: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Option<T> {
        let value = self.table.get(key)?;
        match read(value) {
            Some(v) => Some(v),
            None => {
                let found = value.type_str();
                self.error(
                    key,
                    format!("must be {expected}, found a {found}"),
                    format!("write it as {expected}"),
                );
                None
            }
        }
    }

    /// Reads an optional string.
    pub(super) fn string(&mut self, key: &str) -> Option<&'a str> {
        self.typed(key, "a string", Value::as_str)
    }

    /// Reads a string that must be present.
    pub(super) fn required_string(&mut self, key: &str, fix: &str) -> Option<&'a str> {
        if !self.table.contains_key(key) {
            self.error(key, "is missing", fix);
            return None;
        }
        self.string(key)
    }

    /// Reads an optional boolean with a default.
    pub(super) fn bool(&mut self, key: &str, default: bool) -> bool {
        self.typed(key, "true or false", |v| {
            v.as_bool().or_else(|| match v.as_str()? {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            })
        })
        .unwrap_or(default)
    }

    /// Reads an optional whole number with a default, within `range`.
    pub(super) fn integer(&mut self, key: &str, default: u64, range: (u64, u64)) -> u64 {
        let Some(n) = self.typed(key, "a whole number", |v| {
            v.as_integer()
                .or_else(|| v.as_str()?.trim().replace('_', "").parse().ok())
        }) else {
            return default;
        };
        match u64::try_from(n) {
            Ok(n) if n >= range.0 && n <= range.1 => n,
            _ => {
                self.error(
                    key,
                    format!("is {n}, out of range"),
                    format!("use a number from {} to {}", range.0, range.1),
                );
                default
            }
        }
    }

    /// Reads an optional whole number within `range`, with no default.
    pub(super) fn typed_integer(&mut self, key: &str, range: (u64, u64)) -> Option<u64> {
        self.table.get(key)?;
        let n = self.integer(key, u64::MAX, range);
        (n != u64::MAX).then_some(n)
    }

    /// Reads an optional array of strings.
    pub(super) fn string_list(&mut self, key: &str) -> Option<Vec<&'a str>> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?.iter().map(Value::as_str).collect()
        })
    }

    /// Reads an optional fraction with a default, within `range`.
    pub(super) fn fraction(&mut self, key: &str, default: f64, range: (f64, f64)) -> f64 {
        let Some(x) = self.typed(key, "a number", |v| {
            v.as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .or_else(|| v.as_str()?.trim().parse().ok())
        }) else {
            return default;
        };
        if x.is_finite() && x >= range.0 && x <= range.1 {
            x
        } else {
            self.error(
                key,
                format!("is {x}, out of range"),
                format!("use a number from {} to {}", range.0, range.1),
            );
            default
        }
    }

    /// Reads an optional duration such as `"30s"` or `"500ms"` with a default.
    pub(super) fn duration(&mut self, key: &str, default: Duration) -> Duration {
        let Some(text) = self.typed(key, "a duration string such as \"30s\"", Value::as_str) else {
            return default;
        };
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(_) => {
                self.error(
                    key,
                    format!("{text:?} is not a duration"),
                    "write a number with a unit, such as \"500ms\", \"30s\" or \"5m\"",
                );
                default
            }
        }
    }

    /// Reads an optional socket address such as `"127.0.0.1:8080"`.
    pub(super) fn socket_addr(&mut self, key: &str) -> Option<SocketAddr> {
        let text = self.string(key)?;
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    key,
                    format!("{text:?} is not an address with a port"),
                    "write an IP address and port, such as \"127.0.0.1:8080\" or \"[::1]:8080\"",
                );
                None
            }
        }
    }

    /// Reads an optional sub-table.
    pub(super) fn table(&mut self, key: &str) -> Option<&'a Table> {
        self.typed(key, "a table", Value::as_table)
    }

    /// Reads an optional array.
    pub(super) fn array(&mut self, key: &str) -> Option<&'a Vec<Value>> {
        self.typed(key, "an array", Value::as_array)
    }
}
