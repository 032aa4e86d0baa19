//! The hosts file: agent names and their gRPC addresses, so operators can say
//! `--agent kvm1` and `migrate web01 --to kvm2`, and `ferryctl ui` knows which agents to
//! show. TOML:
//!
//! ```toml
//! [hosts]
//! kvm1 = "10.0.0.1:7701"
//! kvm2 = "10.0.0.2:7701"
//! ```

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Agent names and addresses, in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hosts {
    /// name -> `host:port` of its gRPC listener.
    #[serde(default)]
    pub hosts: BTreeMap<String, String>,
}

impl Hosts {
    /// Parses a hosts file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Hosts> {
        let h: Hosts = toml::from_str(text).with_context(|| format!("hosts file {origin}"))?;
        for (name, addr) in &h.hosts {
            check_name(name).with_context(|| format!("hosts file {origin}"))?;
            if addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                bail!("hosts file {origin}: {name} = {addr:?} is not host:port");
            }
        }
        Ok(h)
    }

    /// Reads and parses a hosts file.
    pub fn load(path: &Path) -> Result<Hosts> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading hosts file {}", path.display()))?;
        Hosts::parse(&text, &path.display().to_string())
    }

    /// The hosts file given (`--hosts`, env `FERRY_HOSTS`), else the default one
    /// (`$XDG_CONFIG_HOME/ferry/hosts.toml` or `~/.config/ferry/hosts.toml`) if it exists,
    /// else none.
    pub fn from_option(path: Option<&Path>) -> Result<Hosts> {
        match path {
            Some(p) => Hosts::load(p),
            None => match default_path() {
                Some(p) if p.exists() => Hosts::load(&p),
                _ => Ok(Hosts::default()),
            },
        }
    }

    /// The address for `name_or_addr`: a name in the file gives its address; anything
    /// with a `:` is taken as an address already; an unknown bare name is an error that
    /// lists the names known.
    pub fn resolve(&self, name_or_addr: &str) -> Result<String> {
        if let Some(addr) = self.hosts.get(name_or_addr) {
            return Ok(addr.clone());
        }
        if name_or_addr.contains(':') {
            return Ok(name_or_addr.to_string());
        }
        if self.hosts.is_empty() {
            bail!(
                "{name_or_addr:?} is neither host:port nor a name in a hosts file \
                 (none given: --hosts FILE or env FERRY_HOSTS)"
            );
        }
        bail!(
            "unknown host {name_or_addr:?}: the hosts file names {}",
            self.hosts.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    }

    /// The name the file gives an address, if any.
    pub fn name_of(&self, addr: &str) -> Option<&str> {
        self.hosts
            .iter()
            .find(|(_, a)| a.as_str() == addr)
            .map(|(n, _)| n.as_str())
    }
}

/// Host names: letters, digits, `-`, `_`, `.`; 1-63 characters.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        bail!("host name {name:?}: use 1-63 letters, digits, '-', '_' or '.'");
    }
    Ok(())
}

fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ferry").join("hosts.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_addresses_pass_through() {
        let h = Hosts::parse(
            "[hosts]\nkvm1 = \"10.0.0.1:7701\"\nkvm2 = \"[::1]:7702\"\n",
            "t",
        )
        .expect("parses");
        assert_eq!(h.resolve("kvm1").expect("name"), "10.0.0.1:7701");
        assert_eq!(h.resolve("kvm2").expect("name"), "[::1]:7702");
        assert_eq!(h.resolve("10.9.9.9:1").expect("addr"), "10.9.9.9:1");
        assert_eq!(h.name_of("10.0.0.1:7701"), Some("kvm1"));
        let e = h.resolve("kvm3").expect_err("unknown").to_string();
        assert!(e.contains("kvm1, kvm2"), "{e}");
        let e = Hosts::default()
            .resolve("kvm3")
            .expect_err("no file")
            .to_string();
        assert!(e.contains("--hosts"), "{e}");
    }

    #[test]
    fn bad_files_are_refused_with_the_line_at_fault() {
        let e = format!(
            "{:#}",
            Hosts::parse("[hosts]\nkvm1 = \"nowhere\"\n", "f.toml").expect_err("no port")
        );
        assert!(e.contains("kvm1") && e.contains("host:port"), "{e}");
        let e = format!(
            "{:#}",
            Hosts::parse("[hosts]\n\"a b\" = \"h:1\"\n", "f.toml").expect_err("bad name")
        );
        assert!(e.contains("host name"), "{e}");
        assert!(Hosts::parse("[other]\n", "f.toml").is_err());
        assert!(Hosts::parse("", "f.toml").expect("empty").hosts.is_empty());
    }
}
