//! Turning a TOML error into "file, key, reason".
//!
//! `toml` reports *where* (a byte span) and *what* (a message), not the key path. To name the
//! key we let the real parser find it: the span is replaced by (or, for a missing field, the
//! table at the span receives) a marker, the edited text is parsed into a plain value tree, and
//! the marker's path in that tree is the key. When that fails we fall back to `line L, column C`.

use std::ops::Range;

use serde::de::DeserializeOwned;

use super::ConfigError;

const MARK: &str = "__tollgate_locate__";

/// Parses `text` as `T`; any error names `file`, the key and the reason.
pub(crate) fn parse_toml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, ConfigError> {
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return Err(ConfigError::Syntax {
            file: file.to_owned(),
            key: position(text, e.span()),
            reason: e.message().trim().to_owned(),
        });
    }
    toml::from_str::<T>(text).map_err(|e| {
        let reason = e.message().trim().to_owned();
        let key = e
            .span()
            .and_then(|span| locate(text, span, &reason))
            .unwrap_or_else(|| position(text, e.span()));
        ConfigError::invalid(file, key, reason)
    })
}

/// Formats one key segment: bare when TOML allows it, quoted otherwise.
pub(crate) fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_owned()
    } else {
        let escaped = key.replace('\\', "\\\\").replace('"', "\\\"");
        format!("\"{escaped}\"")
    }
}

fn position(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else {
        return "(document)".to_owned();
    };
    let before = text.get(..span.start.min(text.len())).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

fn backticked<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?;
    rest.split('`').next()
}

#[derive(Debug, Clone)]
enum Seg {
    Key(String),
    Index(usize),
}

fn join(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key_segment(k));
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn with_field(mut path: Vec<Seg>, field: &str) -> String {
    path.push(Seg::Key(field.to_owned()));
    join(&path)
}

fn locate(text: &str, span: Range<usize>, message: &str) -> Option<String> {
    let frag = text.get(span.clone())?;
    let trimmed = frag.trim_start();
    let lead = frag.len() - trimmed.len();
    if let Some(field) = backticked(message, "missing field `") {
        let at = span.start + lead;
        let edited = if trimmed.starts_with('[') {
            // A `[table]` / `[[array]]`: the marker goes on the line after the header.
            match text.get(at..)?.find('\n') {
                Some(nl) => splice(text, at + nl..at + nl, &format!("\n{MARK} = 0")),
                None => format!("{text}\n{MARK} = 0"),
            }
        } else if let Some(inner) = trimmed.strip_prefix('{') {
            let sep = if inner.trim_start().starts_with('}') {
                ""
            } else {
                ","
            };
            splice(text, at + 1..at + 1, &format!(" {MARK} = 0{sep} "))
        } else {
            // The document's root table.
            return Some(with_field(Vec::new(), field));
        };
        let path = find(&parse_tree(&edited)?, Want::Key)?;
        return Some(with_field(path, field));
    }
    if let Some(field) = backticked(message, "unknown field `") {
        let edited = splice(text, span, MARK);
        let path = find(&parse_tree(&edited)?, Want::Key)?;
        return Some(with_field(path, field));
    }
    if trimmed.starts_with('[') && trimmed.contains('\n') {
        // A whole `[table]` has the wrong type: name it by its header.
        let header = trimmed.lines().next()?;
        return Some(
            header
                .trim_matches(|c| c == '[' || c == ']' || c == ' ')
                .to_owned(),
        );
    }
    let edited = splice(text, span, &format!("\"{MARK}\""));
    find(&parse_tree(&edited)?, Want::Value).map(|p| join(&p))
}

fn splice(text: &str, range: Range<usize>, with: &str) -> String {
    let mut out = String::with_capacity(text.len() + with.len());
    out.push_str(text.get(..range.start).unwrap_or(""));
    out.push_str(with);
    out.push_str(text.get(range.end..).unwrap_or(""));
    out
}

fn parse_tree(text: &str) -> Option<toml::Value> {
    toml::from_str::<toml::Table>(text)
        .ok()
        .map(toml::Value::Table)
}

#[derive(Clone, Copy)]
enum Want {
    /// The path of the table holding the marker key.
    Key,
    /// The path of the marker string value.
    Value,
}

fn find(root: &toml::Value, want: Want) -> Option<Vec<Seg>> {
    let mut path = Vec::new();
    if walk(root, want, &mut path) {
        Some(path)
    } else {
        None
    }
}

fn walk(value: &toml::Value, want: Want, path: &mut Vec<Seg>) -> bool {
    match value {
        toml::Value::Table(table) => {
            if matches!(want, Want::Key) && table.contains_key(MARK) {
                return true;
            }
            for (k, v) in table {
                if matches!(want, Want::Value) && v.as_str() == Some(MARK) {
                    path.push(Seg::Key(k.clone()));
                    return true;
                }
                path.push(Seg::Key(k.clone()));
                if walk(v, want, path) {
                    return true;
                }
                path.pop();
            }
            false
        }
        toml::Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if matches!(want, Want::Value) && v.as_str() == Some(MARK) {
                    path.push(Seg::Index(i));
                    return true;
                }
                path.push(Seg::Index(i));
                if walk(v, want, path) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        version: u32,
        #[serde(default)]
        hosts: Vec<Host>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Host {
        name: String,
        #[serde(default)]
        transport: Option<Transport>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Transport {
        agent: Agent,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Agent {
        address: String,
        port: Option<u16>,
    }

    fn key_of(text: &str) -> String {
        match parse_toml::<Doc>(text, "f.toml") {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.key().to_owned(),
        }
    }

    #[test]
    fn names_keys_in_every_shape() {
        let cases = [
            ("[[hosts]]\nname = \"a\"\n", "version"),
            ("version = 1\nhosts = [{}]\n", "hosts[0].name"),
            (
                "version = 1\n[[hosts]]\nname = \"a\"\n[[hosts]]\nname = \"b\"\ntransport.agent = { address = \"x\", adress = 3 }\n",
                "hosts[1].transport.agent.adress",
            ),
            (
                "version = 1\n[[hosts]]\nname = \"a\"\n[hosts.transport.agent]\naddress = \"x\"\nport = 99999\n",
                "hosts[0].transport.agent.port",
            ),
            (
                "version = 1\n[[hosts]]\nname = \"a\"\n[hosts.transport.agent]\nport = 1\n",
                "hosts[0].transport.agent.address",
            ),
            (
                "version = 1\n[[hosts]]\nname = \"a\"\ntransport.agent = {}\n",
                "hosts[0].transport.agent.address",
            ),
            ("version = \"one\"\n", "version"),
            ("version = 1\nextra = true\n", "extra"),
            ("version = 1\n\"odd key\" = true\n", "\"odd key\""),
            ("version = 1\nhosts = [ { name = 5 } ]\n", "hosts[0].name"),
            ("version = 1\n[hosts]\nname = \"x\"\n", "hosts"),
            ("version = \n", "line 1, column 11"),
        ];
        for (text, want) in cases {
            assert_eq!(key_of(text), want, "for {text:?}");
        }
    }

    #[test]
    fn quotes_keys_that_are_not_bare() {
        assert_eq!(key_segment("web-1_a"), "web-1_a");
        assert_eq!(key_segment("spiffe://x/y"), "\"spiffe://x/y\"");
        assert_eq!(key_segment("a\"b"), "\"a\\\"b\"");
    }
}
