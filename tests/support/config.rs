//! Writes rotator configs: the `[rotator]` preamble every test needs, then targets with their
//! stores and consumers, each with the usual values of this suite that a test overrides with
//! [`ConfigBuilder::set`] or [`ConfigBuilder::str`].

/// A config under construction: sections in order, each a header and `key = value` lines
/// (values are TOML as written; a line with no key is written as it is).
pub struct ConfigBuilder {
    sections: Vec<(String, Vec<(String, String)>)>,
}

/// `s` as a TOML string.
pub fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// `items` as a TOML array of strings.
pub fn array(items: &[impl AsRef<str>]) -> String {
    let items: Vec<String> = items.iter().map(|s| quoted(s.as_ref())).collect();
    format!("[{}]", items.join(", "))
}

impl Default for ConfigBuilder {
    fn default() -> Self {
        ConfigBuilder::new()
    }
}

impl ConfigBuilder {
    /// `[rotator]` with a SQLite journal in the rotator's directory and its key from the env.
    pub fn new() -> ConfigBuilder {
        ConfigBuilder {
            sections: Vec::new(),
        }
        .table("[rotator]")
        .str("journal", "sqlite://journal.db")
        .str("journal_key", "env:ROTATOR_JOURNAL_KEY")
    }

    /// Starts a section; the following `set`s go into it.
    pub fn table(mut self, header: &str) -> ConfigBuilder {
        self.sections.push((header.to_string(), Vec::new()));
        self
    }

    /// Sets `key` in the latest section to `value` (TOML), in place when it is already there.
    pub fn set(self, key: &str, value: impl std::fmt::Display) -> ConfigBuilder {
        let last = self.sections.len() - 1;
        self.set_in(last, key, value)
    }

    fn set_in(mut self, section: usize, key: &str, value: impl std::fmt::Display) -> ConfigBuilder {
        let lines = &mut self.sections[section].1;
        let value = value.to_string();
        match lines.iter_mut().find(|(k, _)| k == key) {
            Some(line) => line.1 = value,
            None => lines.push((key.to_string(), value)),
        }
        self
    }

    /// [`ConfigBuilder::set`] with a string value.
    pub fn str(self, key: &str, value: &str) -> ConfigBuilder {
        self.set(key, quoted(value))
    }

    /// Removes `key` from the latest section.
    pub fn unset(mut self, key: &str) -> ConfigBuilder {
        self.sections
            .last_mut()
            .unwrap()
            .1
            .retain(|(k, _)| k != key);
        self
    }

    /// Appends raw TOML lines to the latest section.
    pub fn lines(mut self, text: &str) -> ConfigBuilder {
        if !text.is_empty() {
            let lines = &mut self.sections.last_mut().unwrap().1;
            lines.push((String::new(), text.to_string()));
        }
        self
    }

    /// Sets `key` in the latest target (after its stores were added, too).
    pub fn target_set(self, key: &str, value: impl std::fmt::Display) -> ConfigBuilder {
        let target = self.last_target();
        self.set_in(target, key, value)
    }

    /// Appends raw TOML lines to the latest target.
    pub fn target_lines(mut self, text: &str) -> ConfigBuilder {
        if !text.is_empty() {
            let target = self.last_target();
            self.sections[target]
                .1
                .push((String::new(), text.to_string()));
        }
        self
    }

    fn last_target(&self) -> usize {
        self.sections
            .iter()
            .rposition(|(header, _)| header == "[[target]]")
            .expect("a target")
    }

    /// Sets `key` in `[rotator]`.
    pub fn rotator(self, key: &str, value: impl std::fmt::Display) -> ConfigBuilder {
        self.set_in(0, key, value)
    }

    /// Appends raw TOML lines to `[rotator]`.
    pub fn rotator_lines(mut self, text: &str) -> ConfigBuilder {
        if !text.is_empty() {
            self.sections[0].1.push((String::new(), text.to_string()));
        }
        self
    }

    /// A target `name` of `kind` at `address`, restarting consumer `proxy`.
    pub fn target(self, name: &str, kind: &str, address: &str) -> ConfigBuilder {
        self.table("[[target]]")
            .str("name", name)
            .str("kind", kind)
            .str("address", address)
    }

    /// The `postgres` target: login `llmtrace` on database `llmtrace`, the admin password in
    /// PG_ADMIN_PASSWORD, no TLS.
    pub fn postgres(self, address: &str) -> ConfigBuilder {
        self.target("postgres", "postgres", address)
            .str("database", "llmtrace")
            .str("user", "llmtrace")
            .set(
                "admin",
                "{ user = \"postgres\", password = \"env:PG_ADMIN_PASSWORD\" }",
            )
            .str("sslmode", "disable")
            .set("consumers", r#"["proxy"]"#)
    }

    /// The `redis` target for ACL user `user`, the admin `admin` with REDIS_ADMIN_PASSWORD.
    pub fn redis(self, address: &str, user: &str) -> ConfigBuilder {
        self.target("redis", "redis", address)
            .str("user", user)
            .set(
                "admin",
                "{ user = \"admin\", password = \"env:REDIS_ADMIN_PASSWORD\" }",
            )
            .set("consumers", r#"["proxy"]"#)
    }

    /// A store of `kind` on the latest target.
    pub fn store(self, kind: &str) -> ConfigBuilder {
        self.table("  [[target.store]]").str("kind", kind)
    }

    /// A `file` store: `key` in `.env` beside the config, as `format`.
    pub fn file_store(self, key: &str, format: &str) -> ConfigBuilder {
        self.store("file")
            .str("path", ".env")
            .str("key", key)
            .str("format", format)
    }

    /// A `kubernetes` store: `key` of Secret `llmtrace/<secret>`, as `format`.
    pub fn kubernetes_store(self, secret: &str, key: &str, format: &str) -> ConfigBuilder {
        self.store("kubernetes")
            .str("namespace", "llmtrace")
            .str("secret", secret)
            .str("key", key)
            .str("format", format)
    }

    /// Consumer `proxy` running `argv`, with a 20s timeout.
    pub fn command_consumer(self, argv: &[impl AsRef<str>]) -> ConfigBuilder {
        self.table("[[consumer]]")
            .str("name", "proxy")
            .str("kind", "command")
            .set("command", array(argv))
            .str("timeout", "20s")
    }

    /// Consumer `proxy`: the Deployment `llmtrace/llmtrace`, given `timeout` to roll out.
    pub fn deployment_consumer(self, timeout: &str) -> ConfigBuilder {
        self.table("[[consumer]]")
            .str("name", "proxy")
            .str("kind", "deployment")
            .str("namespace", "llmtrace")
            .str("object", "llmtrace")
            .str("timeout", timeout)
    }

    pub fn build(&self) -> String {
        let mut out = String::new();
        for (header, lines) in &self.sections {
            let indent = &header[..header.len() - header.trim_start().len()];
            out.push('\n');
            out.push_str(header);
            out.push('\n');
            for (key, value) in lines {
                if key.is_empty() {
                    out.push_str(value);
                } else {
                    out.push_str(&format!("{indent}{key} = {value}"));
                }
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_in_place_and_target_set_reaches_back_past_the_stores() {
        let text = ConfigBuilder::new()
            .postgres("127.0.0.1:5432")
            .str("user", "other")
            .file_store("URL", "url")
            .target_set("confirm_timeout", quoted("5s"))
            .command_consumer(&["sh", "-c", "echo \"hi\""])
            .unset("timeout")
            .build();
        let config: toml::Table = toml::from_str(&text).unwrap();
        let target = &config["target"][0];
        assert_eq!(target["user"].as_str(), Some("other"));
        assert_eq!(target["confirm_timeout"].as_str(), Some("5s"));
        assert_eq!(target["store"][0]["key"].as_str(), Some("URL"));
        assert_eq!(
            config["consumer"][0]["command"][2].as_str(),
            Some("echo \"hi\"")
        );
        assert!(config["consumer"][0].get("timeout").is_none());
        assert!(!text.contains("user = \"llmtrace\""), "{text}");
    }
}
