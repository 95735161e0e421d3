//! How a credential sits inside a stored value: a URL, the bare password, or a template.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::config::Format;
use crate::secret::{Credential, Secret};

/// Everything but RFC 3986 unreserved characters is encoded in userinfo: safe in any URL parser.
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a stored value does not hold a credential where its format says. Never quotes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("the stored value is not a URL (no scheme://)")]
    NotAUrl,
    #[error("the stored URL has no user@ part to put a password in")]
    NoUserinfo,
    #[error("the stored URL has no password")]
    NoPassword,
    #[error("the URL's user or password is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error("the store holds no URL yet to put the password in")]
    NoUrlYet,
    #[error("the stored value does not match the store's template")]
    TemplateMismatch,
}

fn encode(text: &str) -> String {
    utf8_percent_encode(text, USERINFO).to_string()
}

fn decode(text: &str) -> Result<String, FormatError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| FormatError::NotUtf8)
}

/// Byte ranges of the user and password inside a URL's userinfo.
struct Userinfo {
    user: std::ops::Range<usize>,
    password: Option<std::ops::Range<usize>>,
}

fn userinfo(url: &str) -> Result<Userinfo, FormatError> {
    let authority_start = url.find("://").map(|i| i + 3).ok_or(FormatError::NotAUrl)?;
    let authority_len = url[authority_start..]
        .find(['/', '?', '#'])
        .unwrap_or(url.len() - authority_start);
    let authority = &url[authority_start..authority_start + authority_len];
    let at = authority.rfind('@').ok_or(FormatError::NoUserinfo)?;
    let info = &authority[..at];
    Ok(match info.find(':') {
        Some(colon) => Userinfo {
            user: authority_start..authority_start + colon,
            password: Some(authority_start + colon + 1..authority_start + at),
        },
        None => Userinfo {
            user: authority_start..authority_start + at,
            password: None,
        },
    })
}

/// Reads the credential out of a stored value. `default_user` is used where the value names none.
pub fn credential_from(
    raw: &Secret,
    format: &Format,
    default_user: &str,
) -> Result<Credential, FormatError> {
    let raw = raw.expose();
    match format {
        Format::Password => Ok(Credential {
            user: default_user.to_string(),
            password: Secret::new(raw),
        }),
        Format::Url => {
            let info = userinfo(raw)?;
            let password = info.password.ok_or(FormatError::NoPassword)?;
            let user = decode(&raw[info.user])?;
            Ok(Credential {
                user: if user.is_empty() {
                    default_user.to_string()
                } else {
                    user
                },
                password: Secret::new(decode(&raw[password])?),
            })
        }
        Format::Template(template) => match_template(template, raw, default_user),
    }
}

/// Writes `credential` into a value of this format. For URLs only the userinfo changes; every
/// other byte of `current` stays as it was.
pub fn render(
    format: &Format,
    current: Option<&Secret>,
    credential: &Credential,
) -> Result<Secret, FormatError> {
    match format {
        Format::Password => Ok(credential.password.clone()),
        Format::Template(template) => Ok(Secret::new(fill_template(template, credential))),
        Format::Url => {
            let current = current.ok_or(FormatError::NoUrlYet)?;
            let url = current.expose();
            let info = userinfo(url)?;
            let user =
                if decode(&url[info.user.clone()])? == credential.user || info.user.is_empty() {
                    url[info.user.clone()].to_string()
                } else {
                    encode(&credential.user)
                };
            let rest_start = info.password.as_ref().map_or(info.user.end, |p| p.end);
            Ok(Secret::new(format!(
                "{}{}:{}{}",
                &url[..info.user.start],
                user,
                encode(credential.password.expose()),
                &url[rest_start..]
            )))
        }
    }
}

/// Placeholders are percent-encoded where the template is a URL, inserted as they are elsewhere.
fn fill_template(template: &str, credential: &Credential) -> String {
    let is_url = template.contains("://");
    let fit = |s: &str| if is_url { encode(s) } else { s.to_string() };
    template
        .replace("{user}", &fit(&credential.user))
        .replace("{password}", &fit(credential.password.expose()))
}

/// Finds `{user}` and `{password}` in `raw` by matching the template's literal text around them.
fn match_template(
    template: &str,
    raw: &str,
    default_user: &str,
) -> Result<Credential, FormatError> {
    let is_url = template.contains("://");
    let mismatch = || FormatError::TemplateMismatch;
    let mut user = None;
    let mut password = None;
    let mut rest = raw;
    let mut pieces = split_placeholders(template).into_iter().peekable();
    while let Some(piece) = pieces.next() {
        match piece {
            Piece::Literal(text) => rest = rest.strip_prefix(text).ok_or_else(mismatch)?,
            Piece::Placeholder(name) => {
                let end = match pieces.peek() {
                    Some(Piece::Literal(next)) => rest.find(next).ok_or_else(mismatch)?,
                    _ => rest.len(),
                };
                let value = if is_url {
                    decode(&rest[..end])?
                } else {
                    rest[..end].to_string()
                };
                match name {
                    "user" => user = Some(value),
                    _ => password = Some(value),
                }
                rest = &rest[end..];
            }
        }
    }
    if !rest.is_empty() {
        return Err(mismatch());
    }
    Ok(Credential {
        user: user.unwrap_or_else(|| default_user.to_string()),
        password: Secret::new(password.ok_or_else(mismatch)?),
    })
}

/// Why values written with `template` could not be split back into user and password, if they
/// could not. Reading ends a placeholder at the first occurrence of the text after it, so that
/// text must never occur inside what fills the placeholder: a `{user}` (one of `logins`) or a
/// `{password}` drawn from `password_chars` (percent-encoded where the template is a URL).
pub fn template_ambiguity(
    template: &str,
    logins: &[&str],
    password_chars: &[u8],
) -> Option<String> {
    let is_url = template.contains("://");
    let inserted = |s: &str| if is_url { encode(s) } else { s.to_string() };
    // What a generated password may hold once inserted (percent-encoded in a URL).
    let can_hold: String = password_chars
        .iter()
        .map(|&c| inserted(&char::from(c).to_string()))
        .collect();
    let pieces = split_placeholders(template);
    for pair in pieces.windows(2) {
        match pair {
            [Piece::Placeholder(a), Piece::Placeholder(b)] => {
                return Some(format!(
                    "{{{a}}} and {{{b}}} need text between them, or a stored value cannot be split back"
                ))
            }
            [Piece::Placeholder("user"), Piece::Literal(next)] => {
                // Reading takes the first match of `next`: it must be the one after the login.
                let misread = |login: &&&str| {
                    let user = inserted(login);
                    format!("{user}{next}").find(next) != Some(user.len())
                };
                if let Some(login) = logins.iter().find(misread) {
                    return Some(format!(
                        "the text {next:?} after {{user}} is found inside login {login:?} (or across its end), so a stored value cannot be split back"
                    ));
                }
            }
            // A password may hold any run of those characters: the text after it needs one
            // that never appears in it.
            [Piece::Placeholder(_), Piece::Literal(next)]
                if next.chars().all(|c| can_hold.contains(c)) =>
            {
                return Some(format!(
                    "the text {next:?} after {{password}} can occur inside a generated password, so a stored value cannot be split back: follow {{password}} with a character the password alphabet lacks, or put it last"
                ));
            }
            _ => {}
        }
    }
    None
}

enum Piece<'a> {
    Literal(&'a str),
    Placeholder(&'a str),
}

fn split_placeholders(template: &str) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        let next = ["{user}", "{password}"]
            .iter()
            .filter_map(|p| rest.find(p).map(|i| (i, *p)))
            .min();
        match next {
            Some((i, placeholder)) => {
                if i > 0 {
                    pieces.push(Piece::Literal(&rest[..i]));
                }
                pieces.push(Piece::Placeholder(&placeholder[1..placeholder.len() - 1]));
                rest = &rest[i + placeholder.len()..];
            }
            None => {
                pieces.push(Piece::Literal(rest));
                rest = "";
            }
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_whose_values_cannot_be_split_back_is_named() {
        let alphanumeric: Vec<u8> = (b'0'..=b'9')
            .chain(b'a'..=b'z')
            .chain(b'A'..=b'Z')
            .collect();
        let printable: Vec<u8> = (b'!'..=b'~').collect();
        let fine = [
            ("{user}:{password}", &printable),
            ("PGPASSWORD={password}", &printable),
            ("postgres://{user}:{password}@db:5432/app", &printable),
            ("{password}:{user}", &alphanumeric),
        ];
        for (template, chars) in fine {
            assert_eq!(
                template_ambiguity(template, &["app"], chars),
                None,
                "{template}"
            );
        }
        let ambiguous = [
            ("{user}{password}", &alphanumeric, "need text between them"),
            ("{password}:{user}", &printable, "after {password}"),
            ("{password}-x@{user}", &alphanumeric, ""),
            (
                "{user}_y{password}",
                &alphanumeric,
                "inside login \"app_y_y\"",
            ),
            ("{user}y_y{password}", &alphanumeric, "across its end"),
        ];
        for (template, chars, why) in ambiguous {
            let found = template_ambiguity(template, &["app_y_y"], chars);
            match template {
                // `@` never occurs in an alphanumeric password: this one splits back.
                "{password}-x@{user}" => assert_eq!(found, None),
                _ => assert!(
                    found.as_deref().is_some_and(|f| f.contains(why)),
                    "{template}: {found:?}"
                ),
            }
        }
        // Why it matters: with `{password}:{user}` and a password holding ':', the user read
        // back is a piece of the password.
        let written = fill_template("{password}:{user}", &cred("app", "ab:cd"));
        let read = match_template("{password}:{user}", &written, "app").unwrap();
        assert_eq!(read.user, "cd:app");
    }

    fn cred(user: &str, password: &str) -> Credential {
        Credential {
            user: user.into(),
            password: Secret::new(password),
        }
    }

    #[test]
    fn url_reads_user_and_decoded_password() {
        let raw = Secret::new("postgres://llmtrace:p%40ss%2Fw@db:5432/llmtrace?sslmode=require");
        let c = credential_from(&raw, &Format::Url, "other").unwrap();
        assert_eq!(
            (c.user.as_str(), c.password.expose()),
            ("llmtrace", "p@ss/w")
        );
    }

    #[test]
    fn url_render_changes_only_the_password_bytes() {
        let raw = Secret::new(
            "postgres://llmtrace:old@db.svc:5432/llm%20trace?sslmode=require&x=a:b@c#frag",
        );
        let out = render(&Format::Url, Some(&raw), &cred("llmtrace", "n3w:p@ss/?#%")).unwrap();
        assert_eq!(
            out.expose(),
            "postgres://llmtrace:n3w%3Ap%40ss%2F%3F%23%25@db.svc:5432/llm%20trace?sslmode=require&x=a:b@c#frag"
        );
        let back = credential_from(&out, &Format::Url, "x").unwrap();
        assert_eq!(back.password.expose(), "n3w:p@ss/?#%");
    }

    #[test]
    fn url_render_keeps_the_existing_user_spelling() {
        let raw = Secret::new("redis://us%65r:old@h:6379/0");
        let out = render(&Format::Url, Some(&raw), &cred("user", "new")).unwrap();
        assert_eq!(out.expose(), "redis://us%65r:new@h:6379/0");
    }

    #[test]
    fn url_without_password_gets_one_and_without_userinfo_is_an_error() {
        let out = render(
            &Format::Url,
            Some(&Secret::new("postgres://app@h/db")),
            &cred("app", "pw"),
        )
        .unwrap();
        assert_eq!(out.expose(), "postgres://app:pw@h/db");
        assert!(render(
            &Format::Url,
            Some(&Secret::new("postgres://h/db")),
            &cred("app", "pw")
        )
        .is_err());
        assert!(credential_from(&Secret::new("not a url"), &Format::Url, "app").is_err());
    }

    #[test]
    fn printable_passwords_survive_a_url_round_trip() {
        let password: String = (b'!'..=b'~').map(char::from).collect();
        let out = render(
            &Format::Url,
            Some(&Secret::new("postgres://u:x@h/d")),
            &cred("u", &password),
        )
        .unwrap();
        assert_eq!(
            credential_from(&out, &Format::Url, "u")
                .unwrap()
                .password
                .expose(),
            password
        );
        assert!(url::Url::parse(out.expose()).unwrap().password().is_some());
    }

    #[test]
    fn template_fills_and_matches() {
        let template = Format::Template("redis://{user}:{password}@cache:6379/0".into());
        let out = render(&template, None, &cred("default", "a/b")).unwrap();
        assert_eq!(out.expose(), "redis://default:a%2Fb@cache:6379/0");
        let back = credential_from(&out, &template, "x").unwrap();
        assert_eq!(
            (back.user.as_str(), back.password.expose()),
            ("default", "a/b")
        );
        assert!(credential_from(&Secret::new("redis://other"), &template, "x").is_err());

        let plain = Format::Template("password={password};".into());
        let out = render(&plain, None, &cred("u", "a/b")).unwrap();
        assert_eq!(out.expose(), "password=a/b;");
        assert_eq!(
            credential_from(&out, &plain, "u")
                .unwrap()
                .password
                .expose(),
            "a/b"
        );
    }
}
