//! Dotenv files (`KEY=VALUE` lines): find one key's value and rewrite only that value.

/// Where one key's value sits in the file text, and how it was quoted.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    /// Byte range of the value as written, quotes included.
    pub span: std::ops::Range<usize>,
    pub value: String,
    pub quote: Quote,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quote {
    None,
    Single,
    Double,
}

/// What one line says of a key.
enum Line {
    /// A comment, another key, no assignment.
    Other,
    Assigns(Entry),
    /// A quoted value whose closing quote is not on the line.
    Unclosed,
}

/// The last assignment of `key` wins, as in shells and docker compose.
pub fn find(text: &str, key: &str) -> Option<Entry> {
    let mut found = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if let Line::Assigns(entry) = parse_line(line, key) {
            found = Some(Entry {
                span: entry.span.start + offset..entry.span.end + offset,
                ..entry
            });
        }
        offset += line.len();
    }
    found
}

/// The 1-based number of a line that assigns `key` a quoted value without its closing quote (a
/// value running over several lines, say): [`find`] passes such a line over, so the file must
/// not be read or rewritten as if the key were absent.
pub fn unclosed_quote(text: &str, key: &str) -> Option<usize> {
    text.split_inclusive('\n')
        .position(|line| matches!(parse_line(line, key), Line::Unclosed))
        .map(|n| n + 1)
}

fn parse_line(line: &str, key: &str) -> Line {
    let body = line.trim_end_matches(['\n', '\r']);
    let trimmed = body.trim_start();
    if trimmed.starts_with('#') {
        return Line::Other;
    }
    let after_export = trimmed
        .strip_prefix("export")
        .filter(|r| r.starts_with([' ', '\t']))
        .map_or(trimmed, |r| r.trim_start());
    let Some((name, _)) = after_export.split_once('=') else {
        return Line::Other;
    };
    if name.trim() != key {
        return Line::Other;
    }
    let eq = body.len() - after_export.len() + name.len() + 1;
    let rest = &body[eq..];
    let start = eq + (rest.len() - rest.trim_start().len());
    let value_text = &body[start..];
    let (len, value, quote) = match value_text.chars().next() {
        Some('\'') => match value_text[1..].find('\'') {
            Some(end) => (end + 2, value_text[1..end + 1].to_string(), Quote::Single),
            None => return Line::Unclosed,
        },
        Some('"') => match read_double_quoted(value_text) {
            Some((len, value)) => (len, value, Quote::Double),
            None => return Line::Unclosed,
        },
        _ => {
            let end = value_text.find(" #").unwrap_or(value_text.len());
            let value = value_text[..end].trim_end();
            (value.len(), value.to_string(), Quote::None)
        }
    };
    Line::Assigns(Entry {
        span: start..start + len,
        value,
        quote,
    })
}

fn read_double_quoted(text: &str) -> Option<(usize, String)> {
    let mut value = String::new();
    let mut chars = text.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((i + 1, value)),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            _ => value.push(c),
        }
    }
    None
}

// What the file holds must read back byte-identical in bash (`set -a; . ./.env`), in
// python-dotenv (and tools that follow it) and in [`find`]. python-dotenv
// (theskumar/python-dotenv, src/dotenv/parser.py) takes an unquoted value raw up to ` #`; inside
// '...' it decodes only \\ and \'; inside "..." it decodes \\, \", \' and \a\b\f\n\r\t\v; its quoted
// patterns take a \ before the closing quote as escaping it, so no quoted value may end in \; and
// (src/dotenv/main.py resolve_variables, variables.py) it expands `${NAME}` in every value
// whatever its quoting. bash takes '...' literally, and inside "..." expands $ and ` while
// a backslash escapes only $ ` " \ and newline.

/// Characters bash and python-dotenv both leave alone in an unquoted value (an assignment is
/// not globbed; `~` and `&` are left out: tilde expansion, a background job).
fn is_bare_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.:/@%+=,?".contains(c)
}

fn fits(value: &str, quote: Quote) -> bool {
    match quote {
        Quote::None => !value.is_empty() && value.chars().all(is_bare_safe),
        Quote::Single => !value.contains(['\'', '\\']),
        // python-dotenv's "..." pattern takes the \" of an escaped trailing \ for a quote.
        Quote::Double => !value.contains(['$', '`']) && !value.ends_with('\\'),
    }
}

/// Why no quoting holds a value made of `chars` the same for bash and python-dotenv; `None`
/// when every value over `chars` can be written. Used on an alphabet at config time.
pub fn unwritable(chars: &std::collections::BTreeSet<char>) -> Option<&'static str> {
    let any = |set: &str| set.chars().any(|c| chars.contains(&c));
    if chars.iter().any(|c| c.is_control()) {
        Some("a control character, which a line-based file cannot hold")
    } else if any("$") && any("{") {
        Some("${, which python-dotenv expands whatever the quoting")
    } else if any("\\") {
        Some("a trailing \\, which python-dotenv takes as escaping the closing quote")
    } else if any("'") && any("$`") {
        Some("' together with $ or `, which no quoting reads back the same in bash and python-dotenv")
    } else {
        None
    }
}

/// Writes `value` for a dotenv file, keeping the quoting already used when it can hold the
/// value; `None` when no quoting reads back the same everywhere (see [`unwritable`]).
pub fn encode(value: &str, preferred: Quote) -> Option<String> {
    if value.chars().any(char::is_control) || value.contains("${") {
        return None;
    }
    let quote = [preferred, Quote::None, Quote::Single, Quote::Double]
        .into_iter()
        .find(|&q| fits(value, q))?;
    Some(match quote {
        Quote::None => value.to_string(),
        Quote::Single => format!("'{value}'"),
        Quote::Double => format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\"")),
    })
}

/// The file text with `key` set to `value` (appended when absent) or removed (`None`); `None`
/// when the value cannot be written (see [`encode`]).
pub fn replace(text: &str, key: &str, value: Option<&str>) -> Option<String> {
    Some(match (find(text, key), value) {
        (Some(entry), Some(value)) => {
            let encoded = encode(value, entry.quote)?;
            format!(
                "{}{}{}",
                &text[..entry.span.start],
                encoded,
                &text[entry.span.end..]
            )
        }
        (Some(entry), None) => {
            let line_start = text[..entry.span.start].rfind('\n').map_or(0, |i| i + 1);
            let line_end = text[entry.span.end..]
                .find('\n')
                .map_or(text.len(), |i| entry.span.end + i + 1);
            format!("{}{}", &text[..line_start], &text[line_end..])
        }
        (None, Some(value)) => {
            let separator = if text.is_empty() || text.ends_with('\n') {
                ""
            } else {
                "\n"
            };
            format!("{text}{separator}{key}={}\n", encode(value, Quote::None)?)
        }
        (None, None) => text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# proxy settings\nexport LLMTRACE_LISTEN=0.0.0.0:8080\nLLMTRACE_POSTGRES_URL=postgres://u:old@db/x # primary\n\nPGPASSWORD='old pw'\nQUOTED=\"a\\\"b\"\n";

    #[test]
    fn finds_values_in_every_quoting_style() {
        assert_eq!(
            find(FILE, "LLMTRACE_POSTGRES_URL").unwrap().value,
            "postgres://u:old@db/x"
        );
        assert_eq!(find(FILE, "LLMTRACE_LISTEN").unwrap().value, "0.0.0.0:8080");
        assert_eq!(find(FILE, "PGPASSWORD").unwrap().value, "old pw");
        assert_eq!(find(FILE, "QUOTED").unwrap().value, "a\"b");
        assert_eq!(find(FILE, "proxy"), None);
    }

    #[test]
    fn replace_changes_only_that_value() {
        let out = replace(FILE, "LLMTRACE_POSTGRES_URL", Some("postgres://u:new@db/x")).unwrap();
        assert_eq!(out, FILE.replace("u:old@db", "u:new@db"));
        let out = replace(FILE, "PGPASSWORD", Some("n'ew")).unwrap();
        assert_eq!(out, FILE.replace("'old pw'", "\"n'ew\""));
    }

    #[test]
    fn values_needing_quotes_round_trip() {
        for value in ["a b", "x#y", "it's", "q\"uo\\te", "$HOME", "plain"] {
            let out = replace("K=old\n", "K", Some(value)).unwrap();
            assert_eq!(find(&out, "K").unwrap().value, value, "{out}");
        }
    }

    #[test]
    fn appends_and_removes_keys() {
        let out = replace("A=1", "B", Some("2")).unwrap();
        assert_eq!(out, "A=1\nB=2\n");
        assert_eq!(replace(&out, "B", None).unwrap(), "A=1\n");
    }

    #[test]
    fn quoting_is_chosen_per_value() {
        assert_eq!(encode("abc-1.2:3", Quote::None).unwrap(), "abc-1.2:3");
        assert_eq!(encode("a&b", Quote::None).unwrap(), "'a&b'");
        assert_eq!(encode("~x", Quote::None).unwrap(), "'~x'");
        assert_eq!(encode("a$b`c", Quote::Double).unwrap(), "'a$b`c'");
        assert_eq!(encode("it's\\a", Quote::Single).unwrap(), "\"it's\\\\a\"");
        assert_eq!(encode("a\\b", Quote::None).unwrap(), "\"a\\\\b\"");
        for unwritable in ["'$", "'`", "${HOME}", "a\nb", "it's\\", "ab\\"] {
            assert_eq!(encode(unwritable, Quote::None), None, "{unwritable:?}");
        }
    }

    #[test]
    fn alphabets_that_can_produce_unwritable_values_are_named() {
        let set = |s: &str| s.chars().collect::<std::collections::BTreeSet<char>>();
        assert_eq!(unwritable(&set("abcXYZ019-_%.~")), None);
        assert_eq!(unwritable(&set("ab'\"!")), None);
        assert_eq!(unwritable(&set("ab$`\"!")), None);
        assert!(unwritable(&set("ab\\")).is_some());
        assert!(unwritable(&set("a'$")).is_some());
        assert!(unwritable(&set("a${}")).is_some());
    }
}
