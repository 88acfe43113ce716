//! Environment overrides: `MOSAIC_AUTH_PROXY__SERVER__LISTEN=0.0.0.0:8080` sets
//! `server.listen`, applied to the file's table before it is validated, so a container
//! needs no templated file. Segments are matched to the file's keys without regard to case
//! (`_` also matches `-`), array entries by index (`ROUTES__0__UPSTREAM`; the next index
//! appends an entry). Values are strings (numbers and `true`/`false` are read from them where
//! a key wants one); a value starting with `[` or `{` is TOML (an array, an inline table).

use super::ConfigError;
use toml::{Table, Value};

/// The prefix of every override variable.
pub const PREFIX: &str = "MOSAIC_AUTH_PROXY__";

/// One applied override: the dotted key it set and the variable that set it.
pub(super) struct Applied {
    pub key: String,
    pub var: String,
}

/// Applies the overrides among `vars` to `root`; returns those applied and the problems of
/// those that could not be.
pub(super) fn apply(
    root: &mut Table,
    vars: &[(String, String)],
) -> (Vec<Applied>, Vec<ConfigError>) {
    let mut applied = Vec::new();
    let mut errors = Vec::new();
    let mut vars: Vec<&(String, String)> =
        vars.iter().filter(|(n, _)| n.starts_with(PREFIX)).collect();
    vars.sort();
    for (var, value) in vars {
        let segments: Vec<&str> = var[PREFIX.len()..].split("__").collect();
        if segments.iter().any(|s| s.is_empty()) {
            errors.push(problem(var, "has an empty segment", "separate keys with exactly two underscores, such as MOSAIC_AUTH_PROXY__SERVER__LISTEN"));
            continue;
        }
        match set(root, &segments, parse(value)) {
            Ok(key) => applied.push(Applied {
                key,
                var: var.clone(),
            }),
            Err((problem_text, fix)) => errors.push(problem(var, &problem_text, fix)),
        }
    }
    (applied, errors)
}

fn problem(var: &str, problem: &str, fix: &str) -> ConfigError {
    ConfigError {
        key: var.to_owned(),
        problem: problem.to_owned(),
        fix: fix.to_owned(),
    }
}

fn parse(value: &str) -> Value {
    let trimmed = value.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        if let Ok(mut table) = format!("v = {value}").parse::<Table>() {
            if let Some(v) = table.remove("v") {
                return v;
            }
        }
    }
    Value::String(value.to_owned())
}

/// Sets `value` at `segments` below `table`; returns the dotted key it set.
fn set(
    table: &mut Table,
    segments: &[&str],
    value: Value,
) -> Result<String, (String, &'static str)> {
    let (first, rest) = segments.split_first().expect("at least one segment");
    let key = table
        .keys()
        .find(|k| same(k, first))
        .cloned()
        .unwrap_or_else(|| first.to_ascii_lowercase());
    if rest.is_empty() {
        table.insert(key.clone(), value);
        return Ok(key);
    }
    let child = table
        .entry(key.clone())
        .or_insert_with(|| Value::Table(Table::new()));
    let below = match child {
        Value::Table(t) => set(t, rest, value)?,
        Value::Array(items) => {
            let (index, rest) = rest.split_first().expect("checked above");
            let i: usize = index.parse().map_err(|_| {
                (
                    format!("{key} is a list; {index:?} is not an index"),
                    "give the entry's index, from 0",
                )
            })?;
            if i == items.len() {
                items.push(Value::Table(Table::new()));
            }
            let Some(item) = items.get_mut(i) else {
                return Err((
                    format!(
                        "{key} has {} entries; {i} is past the next one",
                        items.len()
                    ),
                    "use an existing index, or the next one to add an entry",
                ));
            };
            let below = match (item, rest.is_empty()) {
                (item, true) => {
                    *item = value;
                    String::new()
                }
                (Value::Table(t), false) => set(t, rest, value)?,
                (_, false) => {
                    return Err((
                        format!("{key}[{i}] is not a table"),
                        "set the entry itself, without further keys",
                    ))
                }
            };
            return Ok(if below.is_empty() {
                format!("{key}[{i}]")
            } else {
                format!("{key}[{i}].{below}")
            });
        }
        _ => {
            return Err((
                format!("{key} is a single value, not a table"),
                "set the key itself, without further segments",
            ));
        }
    };
    Ok(format!("{key}.{below}"))
}

fn same(key: &str, segment: &str) -> bool {
    key.len() == segment.len()
        && key
            .chars()
            .zip(segment.chars())
            .all(|(k, s)| k.eq_ignore_ascii_case(&s) || (k == '-' && s == '_'))
}

/// Names the variable behind each problem of a key that an override set (or below which it
/// set one: an unknown table).
pub(super) fn attribute(errors: &mut [ConfigError], applied: &[Applied]) {
    for error in errors {
        let by = applied.iter().find(|a| {
            a.key == error.key
                || a.key.starts_with(&format!("{}.", error.key))
                || a.key.starts_with(&format!("{}[", error.key))
        });
        if let Some(by) = by {
            error.problem = format!("{} (set by {})", error.problem, by.var);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn segments_find_existing_keys_and_array_entries() {
        let mut root: Table =
            "[accounts.media-team]\nclient_id = \"a\"\n[[routes]]\nupstream = \"http://a\"\n"
                .parse()
                .unwrap();
        let (applied, errors) = apply(
            &mut root,
            &vars(&[
                ("MOSAIC_AUTH_PROXY__ACCOUNTS__MEDIA_TEAM__CLIENT_ID", "b"),
                ("MOSAIC_AUTH_PROXY__ROUTES__0__UPSTREAM", "http://c"),
                ("MOSAIC_AUTH_PROXY__ROUTES__1__UPGRADES", "[\"websocket\"]"),
                ("MOSAIC_AUTH_PROXY__SERVER__LISTEN", "0.0.0.0:8080"),
                ("UNRELATED", "x"),
            ]),
        );
        assert!(errors.is_empty());
        assert_eq!(applied.len(), 4);
        assert_eq!(
            root["accounts"]["media-team"]["client_id"].as_str(),
            Some("b")
        );
        assert_eq!(root["routes"][0]["upstream"].as_str(), Some("http://c"));
        assert_eq!(root["routes"][1]["upgrades"][0].as_str(), Some("websocket"));
        assert_eq!(root["server"]["listen"].as_str(), Some("0.0.0.0:8080"));
        let keys: Vec<&str> = applied.iter().map(|a| a.key.as_str()).collect();
        assert!(keys.contains(&"routes[1].upgrades"), "{keys:?}");
    }

    #[test]
    fn impossible_paths_are_named_by_their_variable() {
        let mut root: Table = "[server]\nlisten = \"x\"\n[[routes]]\n".parse().unwrap();
        let (_, errors) = apply(
            &mut root,
            &vars(&[
                ("MOSAIC_AUTH_PROXY__SERVER__LISTEN__PORT", "1"),
                ("MOSAIC_AUTH_PROXY__ROUTES__5__UPSTREAM", "http://a"),
                ("MOSAIC_AUTH_PROXY__ROUTES__X", "1"),
                ("MOSAIC_AUTH_PROXY____LISTEN", "1"),
            ]),
        );
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys.len(), 4, "{errors:?}");
        assert!(errors.iter().all(|e| e.key.starts_with(PREFIX)));
    }
}
