//! Small value grammars shared by the three files: names, durations, identities.

/// A host, role, phase or step name: 1 to 63 of `[a-z0-9-]`, not starting or ending with `-`
/// (a DNS label, so it is safe in host lists, file names and shell commands).
pub fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The reason text used when a name is not a DNS label.
pub(crate) const DNS_LABEL_RULE: &str =
    "must be 1 to 63 characters of a-z, 0-9 and '-', not starting or ending with '-'";

/// Parses a duration written as an integer number of seconds (`30`) or as an integer with a
/// unit: `ms`, `s`, `m`, `h` (`250ms`, `30s`, `5m`, `1h`). Returns milliseconds.
pub fn parse_duration_ms(value: &toml::Value) -> Result<u64, String> {
    const HINT: &str =
        "expected a duration such as \"30s\", \"5m\", \"250ms\" or an integer number of seconds";
    match value {
        toml::Value::Integer(secs) => u64::try_from(*secs)
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .ok_or_else(|| format!("{HINT}, got {secs}")),
        toml::Value::String(text) => {
            let digits_end = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            let (number, unit) = text.split_at(digits_end);
            let scale: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                _ => return Err(format!("{HINT}, got \"{text}\"")),
            };
            number
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(scale))
                .ok_or_else(|| format!("{HINT}, got \"{text}\""))
        }
        other => Err(format!("{HINT}, got a {}", other.type_str())),
    }
}

/// Checks a duration against an inclusive range, naming the bounds in the error.
pub(crate) fn duration_in(value: &toml::Value, min_ms: u64, max_ms: u64) -> Result<u64, String> {
    let ms = parse_duration_ms(value)?;
    if ms < min_ms || ms > max_ms {
        return Err(format!(
            "must be between {} and {}, got {}",
            show_ms(min_ms),
            show_ms(max_ms),
            show_ms(ms)
        ));
    }
    Ok(ms)
}

/// Checks a duration that a program takes in whole seconds (ssh's `ConnectTimeout`,
/// `ServerAliveInterval`): it must be a whole number of seconds within the inclusive range.
pub(crate) fn whole_seconds_in(
    value: &toml::Value,
    min_ms: u64,
    max_ms: u64,
) -> Result<u64, String> {
    let ms = parse_duration_ms(value)?;
    if !ms.is_multiple_of(1_000) {
        return Err(format!(
            "must be a whole number of seconds (ssh takes seconds), got {}",
            show_ms(ms)
        ));
    }
    duration_in(value, min_ms, max_ms)
}

/// Renders milliseconds the way they are written in the files.
pub fn show_ms(ms: u64) -> String {
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// A SPIFFE-style identity: `spiffe://TRUST-DOMAIN/PATH` with a non-empty domain and path and no
/// whitespace.
pub fn is_spiffe_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let Some((domain, path)) = rest.split_once('/') else {
        return false;
    };
    !domain.is_empty()
        && !path.is_empty()
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels() {
        for ok in ["a", "web1", "web-1", &"a".repeat(63)] {
            assert!(is_dns_label(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", "a b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad}");
        }
    }

    #[test]
    fn durations() {
        let s = |t: &str| parse_duration_ms(&toml::Value::String(t.into()));
        assert_eq!(s("250ms"), Ok(250));
        assert_eq!(s("30s"), Ok(30_000));
        assert_eq!(s("5m"), Ok(300_000));
        assert_eq!(s("2h"), Ok(7_200_000));
        assert_eq!(parse_duration_ms(&toml::Value::Integer(7)), Ok(7_000));
        for bad in [
            "",
            "s",
            "5",
            "5 s",
            "5d",
            "-5s",
            "1.5s",
            "99999999999999999999s",
        ] {
            assert!(s(bad).is_err(), "{bad}");
        }
        assert!(parse_duration_ms(&toml::Value::Integer(-1)).is_err());
        assert!(parse_duration_ms(&toml::Value::Boolean(true)).is_err());
        assert_eq!(show_ms(90_000), "90s");
        assert_eq!(show_ms(300_000), "5m");
        assert_eq!(show_ms(1_500), "1500ms");
    }

    #[test]
    fn whole_seconds() {
        let s = |t: &str| whole_seconds_in(&toml::Value::String(t.into()), 1_000, 300_000);
        assert_eq!(s("10s"), Ok(10_000));
        assert_eq!(s("2000ms"), Ok(2_000));
        assert_eq!(s("5m"), Ok(300_000));
        assert_eq!(
            s("1500ms"),
            Err("must be a whole number of seconds (ssh takes seconds), got 1500ms".into())
        );
        assert_eq!(s("6m"), Err("must be between 1s and 5m, got 6m".into()));
        assert_eq!(s("0s"), Err("must be between 1s and 5m, got 0s".into()));
    }

    #[test]
    fn spiffe_ids() {
        assert!(is_spiffe_id("spiffe://fleet/agent/web1"));
        for bad in [
            "spiffe://",
            "spiffe://fleet",
            "spiffe:///x",
            "http://a/b",
            "spiffe://a/b c",
        ] {
            assert!(!is_spiffe_id(bad), "{bad}");
        }
    }
}
