//! The pod's `/etc/resolv.conf`: where meshdns finds its default upstreams and the search
//! domains that its short-form answers must mirror.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Port of a nameserver line; resolv.conf has no syntax for another one.
pub const DNS_PORT: u16 = 53;
/// glibc refuses to read more than a handful of nameservers; we keep the same bound.
pub const MAX_NAMESERVERS: usize = 3;
/// A resolv.conf is a few hundred bytes; anything this large is not one.
pub const MAX_RESOLV_CONF_BYTES: u64 = 64 * 1024;

#[derive(Debug, Error)]
pub enum ResolvConfError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: larger than {MAX_RESOLV_CONF_BYTES} bytes, not a resolv.conf")]
    TooLarge { path: PathBuf },
}

/// What meshdns takes from resolv.conf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<SocketAddr>,
    /// Search domains in order, lowercase, without the trailing dot.
    pub search: Vec<String>,
    pub ndots: u32,
    /// Lines the parser skipped, as glibc skips them; reported so a typo does not go unnoticed.
    pub warnings: Vec<String>,
}

impl ResolvConf {
    /// Parses resolv.conf text leniently, like glibc: a malformed line is skipped, not fatal,
    /// because the pod's own resolver would also carry on without it.
    pub fn parse(text: &[u8]) -> Self {
        let (config, errors) = resolv_conf::Config::parse_with_errors(text);
        let nameservers = config
            .nameservers
            .iter()
            .take(MAX_NAMESERVERS)
            .map(|ip| SocketAddr::new(IpAddr::from(ip), DNS_PORT))
            .collect();
        let search = config
            .get_last_search_or_domain()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
            .filter(|d| !d.is_empty())
            .collect();
        Self {
            nameservers,
            search,
            ndots: config.ndots,
            warnings: errors.iter().map(ToString::to_string).collect(),
        }
    }

    pub fn read(path: &Path) -> Result<Self, ResolvConfError> {
        let read_err = |source| ResolvConfError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > MAX_RESOLV_CONF_BYTES {
            return Err(ResolvConfError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read(path).map_err(read_err)?;
        Ok(Self::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_style_file() {
        let conf = ResolvConf::parse(
            b"search sleep.svc.cluster.local svc.cluster.local cluster.local corp.example.\n\
              nameserver 10.96.0.10\noptions ndots:5\n",
        );
        assert_eq!(conf.nameservers, vec!["10.96.0.10:53".parse().unwrap()]);
        assert_eq!(
            conf.search,
            [
                "sleep.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "corp.example"
            ]
        );
        assert_eq!(conf.ndots, 5);
    }

    #[test]
    fn domain_only_ipv6_and_garbage() {
        let conf = ResolvConf::parse(b"domain Example.Org\nnameserver ::1\nnameserver not-an-ip\nbogus line\n\xff\xfe");
        assert_eq!(conf.search, ["example.org"]);
        assert_eq!(conf.nameservers, vec!["[::1]:53".parse().unwrap()]);
        assert!(!conf.warnings.is_empty());
    }

    #[test]
    fn empty_file() {
        let conf = ResolvConf::parse(b"");
        assert!(conf.nameservers.is_empty());
        assert!(conf.search.is_empty());
    }
}
