//! What the file store writes is read back byte-identical by bash (`set -a; . ./.env`) and by
//! python-dotenv, for every alphabet and format; a combination that cannot promise that is
//! refused by the config.
//!
//! python-dotenv's rules (theskumar/python-dotenv, src/dotenv/parser.py: `_single_quoted_value`,
//! `_double_quoted_value`, `_double_quote_escapes`, `parse_unquoted_value`; src/dotenv/main.py
//! `resolve_variables` with src/dotenv/variables.py `_posix_variable`: `${...}` is expanded in
//! every value, quoted or not) are exercised here through the real library, not re-implemented.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use llmtrace_rotator::config::{Config, ConfigError, Format};
use llmtrace_rotator::password::{generate, Alphabet, PasswordPolicy};
use llmtrace_rotator::secret::{Credential, Secret};
use llmtrace_rotator::store::{dotenv, format};
use support::config::{quoted, ConfigBuilder};

const PER_COMBINATION: usize = 200;
const ALPHABETS: [(&str, Alphabet); 3] = [
    ("alphanumeric", Alphabet::Alphanumeric),
    ("urlsafe", Alphabet::Urlsafe),
    ("printable", Alphabet::Printable),
];
/// `&` and `?` in the query: bash would run `&` as a background job if left unquoted.
const CURRENT_URL: &str =
    "postgres://llmtrace:old@db:5432/llmtrace?sslmode=disable&application_name=proxy";

fn formats() -> Vec<(&'static str, Format, &'static str)> {
    vec![
        ("url", Format::Url, ""),
        ("password", Format::Password, ""),
        (
            "template",
            Format::Template("host=db user={user} password={password}".into()),
            "template = \"host=db user={user} password={password}\"",
        ),
        (
            "template",
            Format::Template("redis://{user}:{password}@cache:6379/0".into()),
            "template = \"redis://{user}:{password}@cache:6379/0\"",
        ),
    ]
}

/// Every key's value as bash sees it after `set -a; . FILE`.
fn bash_reads(file: &Path, keys: &[String]) -> Vec<String> {
    let script = format!(
        "set -a; . \"$1\" || exit 1; for k in {}; do printf '%s\\0' \"${{!k}}\"; done",
        keys.join(" ")
    );
    let out = Command::new("bash")
        .args(["-c", &script, "bash"])
        .arg(file)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "bash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    split_nul(&out.stdout, keys.len())
}

/// Every key's value as python-dotenv's `dotenv_values` (interpolation on, its default) sees it.
fn python_reads(file: &Path, keys: &[String]) -> Vec<String> {
    let program = "import sys, dotenv\n\
                   values = dotenv.dotenv_values(sys.argv[1])\n\
                   sys.stdout.write(''.join((values.get(k) or '') + '\\0' for k in sys.argv[2:]))";
    let out = Command::new("python3")
        .args(["-c", program])
        .arg(file)
        .args(keys)
        .output()
        .expect("python3 runs (scripts/test.sh installs python-dotenv)");
    assert!(
        out.status.success(),
        "python-dotenv failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    split_nul(&out.stdout, keys.len())
}

fn split_nul(bytes: &[u8], count: usize) -> Vec<String> {
    let text = String::from_utf8(bytes.to_vec()).expect("UTF-8");
    let mut values: Vec<String> = text.split('\0').map(str::to_string).collect();
    assert_eq!(values.pop().as_deref(), Some(""), "NUL-terminated");
    assert_eq!(values.len(), count);
    values
}

fn config_for(alphabet: &str, format: &str, template: &str) -> String {
    ConfigBuilder::new()
        .postgres("127.0.0.1:5432")
        .str("name", "x")
        .unset("sslmode")
        .unset("consumers")
        .set("password", format!("{{ alphabet = {} }}", quoted(alphabet)))
        .file_store("K", format)
        .lines(template)
        .build()
}

#[test]
fn every_written_value_reads_back_the_same_in_bash_and_python_dotenv() {
    let dir = tempfile::tempdir().unwrap();
    let mut refused = BTreeMap::new();
    for (alphabet_name, alphabet) in ALPHABETS {
        let policy = PasswordPolicy {
            length: 32,
            alphabet,
        };
        for (format_name, format, template_line) in formats() {
            let label = format!("{alphabet_name}/{format_name} {template_line}");
            let config = Config::parse(
                &config_for(alphabet_name, format_name, template_line),
                Path::new("/etc/rotator"),
            );
            let accepted = match &config {
                Ok(_) => true,
                Err(ConfigError::Invalid { errors, .. }) => {
                    assert!(
                        errors
                            .iter()
                            .all(|e| e.path == "target[0].password.alphabet"
                                && e.message.contains("target[0].store[0]")),
                        "{label}: {errors:?}"
                    );
                    false
                }
                Err(other) => panic!("{label}: {other}"),
            };
            // The existing values use every quoting style, so each preference is exercised.
            let mut text = String::from("# app settings\n");
            let keys: Vec<String> = (0..PER_COMBINATION).map(|i| format!("K{i}")).collect();
            for (i, key) in keys.iter().enumerate() {
                let old = match &format {
                    Format::Url => CURRENT_URL.to_string(),
                    _ => "old".to_string(),
                };
                match i % 3 {
                    0 => text.push_str(&format!("{key}={old}\n")),
                    1 => text.push_str(&format!("export {key}='{old}'\n")),
                    _ => text.push_str(&format!("{key}=\"{old}\" # comment\n")),
                }
            }
            let mut expected = Vec::new();
            let mut written = Vec::new();
            let mut unwritable = 0;
            for key in &keys {
                let credential = Credential {
                    user: "llmtrace".into(),
                    password: generate(&policy),
                };
                let current = Secret::new(CURRENT_URL);
                let value = format::render(&format, Some(&current), &credential).unwrap();
                match dotenv::replace(&text, key, Some(value.expose())) {
                    Some(updated) => {
                        text = updated;
                        assert_eq!(
                            dotenv::find(&text, key).unwrap().value,
                            value.expose(),
                            "{label}: the rotator reads back what it wrote"
                        );
                        expected.push(value.expose().to_string());
                        written.push(key.clone());
                    }
                    None => unwritable += 1,
                }
            }
            if accepted {
                assert_eq!(
                    unwritable, 0,
                    "{label}: accepted by config, so always writable"
                );
            } else {
                refused.insert(label.clone(), unwritable);
            }
            let file = dir.path().join("test.env");
            std::fs::write(&file, &text).unwrap();
            let by_bash = bash_reads(&file, &written);
            let by_python = python_reads(&file, &written);
            for (i, key) in written.iter().enumerate() {
                // Never print a value: compare and name the key and the combination.
                assert!(
                    by_bash[i] == expected[i],
                    "{label}: bash reads {key} differently"
                );
                assert!(
                    by_python[i] == expected[i],
                    "{label}: python-dotenv reads {key} differently"
                );
            }
        }
    }
    // Only printable passwords written raw are refused; URL-encoded ones are fine.
    let refused: Vec<&String> = refused.keys().collect();
    assert_eq!(
        refused,
        [
            "printable/password ",
            "printable/template template = \"host=db user={user} password={password}\"",
        ],
    );
}

#[test]
fn every_pair_of_printable_characters_reads_back_the_same_or_is_refused() {
    let printable: Vec<char> = (' '..='~').collect();
    let mut text = String::new();
    let mut keys = Vec::new();
    let mut expected = Vec::new();
    for &a in &printable {
        for &b in &printable {
            for value in [format!("{a}{b}"), format!("x{a}{b}y")] {
                let key = format!("P{}", keys.len());
                // One line per key, starting from each quoting style in turn.
                let before = ["=old\n", "='old'\n", "=\"old\"\n"][keys.len() % 3];
                if let Some(line) = dotenv::replace(&format!("{key}{before}"), &key, Some(&value)) {
                    assert_eq!(dotenv::find(&line, &key).unwrap().value, value);
                    text.push_str(&line);
                    keys.push(key);
                    expected.push(value);
                }
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pairs.env");
    std::fs::write(&file, &text).unwrap();
    let by_bash = bash_reads(&file, &keys);
    let by_python = python_reads(&file, &keys);
    for i in 0..keys.len() {
        assert_eq!(by_bash[i], expected[i], "bash");
        assert_eq!(by_python[i], expected[i], "python-dotenv");
    }
    // Most pairs are writable; only the combinations no quoting can hold are refused.
    assert!(keys.len() > 17_000, "{} of 18050 written", keys.len());
}
