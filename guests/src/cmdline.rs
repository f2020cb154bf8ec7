//! `key=value` command-line parsing and number syntax (`4k`, `1.5`, `250ms`).

/// Splits a command line into `(key, value)` pairs; a bare word has value "".
pub fn pairs(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline.split_ascii_whitespace().map(|w| match w.find('=') {
        Some(i) => (&w[..i], &w[i + 1..]),
        None => (w, ""),
    })
}

/// Finds the value of `key` (last occurrence wins).
pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    pairs(cmdline).filter(|(k, _)| *k == key).map(|(_, v)| v).last()
}

/// Parses a decimal or 0x-hex unsigned integer.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).ok();
    }
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses a size with an optional binary suffix: `512`, `4k`, `128K`, `1m`, `2g`, `1t`.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    parse_u64(num)?.checked_mul(1u64 << shift)
}

/// Parses a duration into nanoseconds: `5`, `2.5` (seconds), `250ms`, `10s`, `100us`.
pub fn parse_duration_ns(s: &str) -> Option<u64> {
    let (num, unit_ns) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1_000_000)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix("ns") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000_000_000)
    } else {
        (s, 1_000_000_000)
    };
    parse_fixed(num, unit_ns)
}

/// Parses `int[.frac]` and scales it by `unit` without floating point.
fn parse_fixed(s: &str, unit: u64) -> Option<u64> {
    let (int, frac) = match s.find('.') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let int = if int.is_empty() { 0 } else { parse_u64(int)? };
    if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    let mut value = int.checked_mul(unit)?;
    let mut scale = unit;
    for b in frac.bytes() {
        scale /= 10;
        value = value.checked_add(u64::from(b - b'0') * scale)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_pairs_bare_word_and_last_wins() {
        let v: Vec<_> = pairs(" a=1  b  c=x=y ").collect();
        assert_eq!(v, [("a", "1"), ("b", ""), ("c", "x=y")]);
        assert_eq!(get("qd=1 qd=8", "qd"), Some("8"));
        assert_eq!(get("qd=1", "bs"), None);
    }

    #[test]
    fn test_parse_size_suffixes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("128K"), Some(128 << 10));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("0x200"), Some(512));
        for bad in ["", "k", "4kb", "-1", "1.5k", "99999999999999999999"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn test_parse_duration_units_and_fractions() {
        assert_eq!(parse_duration_ns("5"), Some(5_000_000_000));
        assert_eq!(parse_duration_ns("2.5"), Some(2_500_000_000));
        assert_eq!(parse_duration_ns(".5s"), Some(500_000_000));
        assert_eq!(parse_duration_ns("250ms"), Some(250_000_000));
        assert_eq!(parse_duration_ns("100us"), Some(100_000));
        assert_eq!(parse_duration_ns("1.5ms"), Some(1_500_000));
        for bad in ["", "s", "1.2.3", "abc", "1e3", "-1"] {
            assert_eq!(parse_duration_ns(bad), None, "{bad}");
        }
    }
}
