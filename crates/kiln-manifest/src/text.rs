//! Small parsers and printers for values written as strings: durations, sizes, commands, DNS
//! names, and the "did you mean" suggestion. All of them are total: any input gives a value or
//! `None`, never a panic.

use std::time::Duration;

/// Parses a duration: one or more `<integer><unit>` parts with units `ms`, `s`, `m`, `h`, largest
/// first (`"500ms"`, `"30s"`, `"1m30s"`, `"1h"`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total: u64 = 0;
    let mut last_rank = usize::MAX;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (rank, factor) = match &after[..unit_len] {
            "h" => (3, 3_600_000),
            "m" => (2, 60_000),
            "s" => (1, 1_000),
            "ms" => (0, 1),
            _ => return None,
        };
        // Units must decrease (`1m30s`, not `30s1m` or `1s1s`).
        if rank >= last_rank {
            return None;
        }
        last_rank = rank;
        total = total.checked_add(n.checked_mul(factor)?)?;
        rest = &after[unit_len..];
    }
    Some(Duration::from_millis(total))
}

/// Prints milliseconds as the shortest duration [`parse_duration`] reads back to the same value.
pub fn format_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, factor) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if rest >= factor {
            out.push_str(&format!("{}{unit}", rest / factor));
            rest %= factor;
        }
    }
    out
}

/// Parses a size in binary units: `"512mb"`, `"1gb"`, `"2tb"` (also `mib`, `gib`, `tib`; any
/// case). Returns MiB.
pub fn parse_size_mib(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    if digits == 0 {
        return None;
    }
    let n: u64 = s[..digits].parse().ok()?;
    let factor = match s[digits..].trim_start() {
        "mb" | "mib" => 1,
        "gb" | "gib" => 1024,
        "tb" | "tib" => 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// Prints MiB in the largest unit that divides it exactly.
pub fn format_size_mib(mib: u64) -> String {
    if mib != 0 && mib.is_multiple_of(1024 * 1024) {
        format!("{}tb", mib / (1024 * 1024))
    } else if mib != 0 && mib.is_multiple_of(1024) {
        format!("{}gb", mib / 1024)
    } else {
        format!("{mib}mb")
    }
}

/// Splits a command string into words like a POSIX shell does, without expansions: whitespace
/// separates words, `'...'` is literal, `"..."` allows `\"` and `\\`, and `\` escapes one
/// character outside quotes. `None` for an unterminated quote or a trailing `\`.
pub fn split_command(s: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '\'' => break,
                        c => word.push(c),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next()? {
                        '"' => break,
                        '\\' => match chars.next()? {
                            c @ ('"' | '\\' | '$' | '`') => word.push(c),
                            c => {
                                word.push('\\');
                                word.push(c);
                            }
                        },
                        c => word.push(c),
                    }
                }
            }
            '\\' => {
                in_word = true;
                word.push(chars.next()?);
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

/// Why a DNS name was refused.
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    if name.starts_with("*.") {
        return Err("is a wildcard; list each hostname".into());
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "has uppercase letters; write {:?}",
            name.to_ascii_lowercase()
        ));
    }
    if !name.contains('.') {
        return Err("is a single label; use a full DNS name like \"www.example.com\"".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!(
                "has a label of {} characters (1 to 63)",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(format!("contains {c:?}"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("has a label {label:?} starting or ending with '-'"));
        }
    }
    Ok(())
}

/// Why an environment variable name was refused.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    match chars.next() {
        None => return Err("the name is empty".into()),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return Err("a name starts with a letter or '_'".into())
        }
        _ => {}
    }
    if let Some(c) = chars.find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!("{c:?} is not allowed; use letters, digits and '_'"));
    }
    if name.starts_with("KILN_") {
        return Err("names starting with KILN_ are set by the platform".into());
    }
    Ok(())
}

/// Edit distance with adjacent transpositions (optimal string alignment).
fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

/// The candidate closest to `word`, if it is close enough to be a likely misspelling: same
/// letters up to case and `-`/`_`, or within an edit distance of about a third of its length.
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // Keys are short; a long word is no misspelling of one and would only cost time.
    if word.len() > 64 {
        return None;
    }
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let w = norm(word);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let dist = if norm(c) == w {
            0
        } else {
            distance(&w, &norm(c))
        };
        let limit = (c.chars().count().max(w.chars().count()) / 3).max(1);
        if dist <= limit && best.is_none_or(|(d, _)| dist < d) {
            best = Some((dist, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Converts a byte offset into a 1-based (line, column), the column counted in characters.
pub fn position(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let upto = &source[..offset];
    let line = upto.matches('\n').count() + 1;
    let line_start = upto.rfind('\n').map_or(0, |i| i + 1);
    let column = upto[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(
            parse_duration("1h0m5s10ms"),
            Some(Duration::from_millis(3_605_010))
        );
        for bad in [
            "2",
            "s",
            "1d",
            "",
            "30s1m",
            "1s1s",
            "-1s",
            "1.5s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        for ms in [0, 1, 999, 1000, 1001, 60_000, 90_000, 3_600_000, 3_723_004] {
            assert_eq!(
                parse_duration(&format_duration(ms)),
                Some(Duration::from_millis(ms)),
                "{ms}"
            );
        }
        assert_eq!(format_duration(90_000), "1m30s");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_mib("512mb"), Some(512));
        assert_eq!(parse_size_mib("1GB"), Some(1024));
        assert_eq!(parse_size_mib("2 GiB"), Some(2048));
        assert_eq!(parse_size_mib("1tb"), Some(1024 * 1024));
        assert_eq!(parse_size_mib("1.5gb"), None);
        assert_eq!(parse_size_mib("gb"), None);
        assert_eq!(parse_size_mib("10kb"), None);
        for mib in [1, 64, 1024, 1536, 1024 * 1024, 3 * 1024 * 1024 + 1024] {
            assert_eq!(parse_size_mib(&format_size_mib(mib)), Some(mib));
        }
    }

    #[test]
    fn commands() {
        let w = |s: &str| split_command(s).map(|v| v.join("|"));
        assert_eq!(
            w("/app/server --port 8080").as_deref(),
            Some("/app/server|--port|8080")
        );
        assert_eq!(
            w(r#"sh -c "echo 'hi there'""#).as_deref(),
            Some("sh|-c|echo 'hi there'")
        );
        assert_eq!(w(r"a\ b 'c d' e").as_deref(), Some("a b|c d|e"));
        assert_eq!(w(r#"x "" y"#).as_deref(), Some("x||y"));
        assert_eq!(w("  ").as_deref(), Some(""));
        assert_eq!(w("'open"), None);
        assert_eq!(w("trailing\\"), None);
    }

    #[test]
    fn suggestions() {
        let keys = [
            "protocol",
            "internal_port",
            "ports",
            "hostnames",
            "proxy_protocol",
        ];
        assert_eq!(suggest("internal_prot", keys), Some("internal_port"));
        assert_eq!(suggest("internal-port", keys), Some("internal_port"));
        assert_eq!(suggest("Hostnames", keys), Some("hostnames"));
        assert_eq!(suggest("protcol", keys), Some("protocol"));
        assert_eq!(suggest("port", keys), Some("ports"));
        assert_eq!(suggest("something_else", keys), None);
        assert_eq!(suggest("tsl", ["tls", "tcp"]), Some("tls"));
    }

    #[test]
    fn names() {
        assert!(check_hostname("www.example.com").is_ok());
        assert!(check_hostname("a-b.c1.example").is_ok());
        for bad in [
            "",
            "localhost",
            "Www.example.com",
            "*.example.com",
            "a..b",
            "-a.b",
            "a_b.c",
        ] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
        assert!(check_env_name("DATABASE_URL").is_ok());
        assert!(check_env_name("_x1").is_ok());
        for bad in ["", "1A", "A-B", "A=B", "KILN_APP_NAME"] {
            assert!(check_env_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn positions_count_characters() {
        let s = "a = 1\né = \"x\"\n";
        assert_eq!(position(s, 0), (1, 1));
        assert_eq!(position(s, 6), (2, 1));
        // The byte after "é " is the third character of line 2.
        assert_eq!(position(s, 9), (2, 3));
        assert_eq!(position(s, 7), (2, 1), "inside a character rounds down");
        assert_eq!(position(s, 999), (3, 1));
    }
}
