//! Turning kubeconfigs into API clients, and the checks that make a kubeconfig from an Istio
//! remote secret safe to use. Remote secrets are written by whoever administers the remote
//! cluster, so, as istiod does, meshdns refuses anything in them that would run a program or
//! read a file of the pod: exec credential plugins, auth providers, and file paths. It also
//! refuses what would send the pod's requests somewhere other than a verified API server:
//! `insecure-skip-tls-verify`, `proxy-url`, and servers on link-local or unspecified addresses
//! (the cloud metadata service lives at `169.254.169.254`). Loopback and plain `http://` stay
//! allowed (test fakes use them); [`plain_http_servers`] names the latter for a warning.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use thiserror::Error;

use crate::cluster::{GatewayRefusal, Ingress, gateway_refusal};

/// No response bytes for this long and a request is abandoned. kube sets no read timeout, so a
/// hung list would hold a cluster unloaded forever; the API server sends watch bookmarks about
/// once a minute, so a quiet but healthy watch stays well under this.
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(120);
/// A kubeconfig is a few KiB even with embedded certificates; anything larger is not one.
pub const MAX_KUBECONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Error)]
pub enum KubeconfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: larger than {MAX_KUBECONFIG_BYTES} bytes, not a kubeconfig")]
    TooLarge { path: PathBuf },
    #[error("not a valid kubeconfig: {0}")]
    Parse(String),
    #[error("refused: {field} is not allowed in a remote-secret kubeconfig ({why})")]
    Untrusted { field: String, why: &'static str },
    #[error("cannot build a client: {0}")]
    Client(String),
    #[error("in-cluster service account not usable: {0}")]
    InCluster(String),
}

/// Reads a kubeconfig file with a size cap.
pub fn read_kubeconfig(path: &Path) -> Result<String, KubeconfigError> {
    let read_err = |source| KubeconfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let too_large = || KubeconfigError::TooLarge {
        path: path.to_path_buf(),
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    if file.metadata().map_err(read_err)?.len() > MAX_KUBECONFIG_BYTES {
        return Err(too_large());
    }
    // Capped while reading too: a file that grows meanwhile, or a path naming a device that
    // never ends (`/dev/zero`), must not be read into memory whole.
    let mut bytes = Vec::new();
    file.take(MAX_KUBECONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_KUBECONFIG_BYTES {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| {
        read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not UTF-8 text: invalid byte at offset {}",
                e.utf8_error().valid_up_to()
            ),
        ))
    })
}

/// Parses kubeconfig text; with `untrusted`, also applies the remote-secret rules.
pub fn parse_kubeconfig(text: &str, untrusted: bool) -> Result<Kubeconfig, KubeconfigError> {
    let config = Kubeconfig::from_yaml(text).map_err(|e| KubeconfigError::Parse(e.to_string()))?;
    // YAML accepts almost any text as some document; a kubeconfig must name a server.
    if !config
        .clusters
        .iter()
        .any(|c| c.cluster.as_ref().is_some_and(|c| c.server.is_some()))
    {
        return Err(KubeconfigError::Parse("no cluster with a server address".into()));
    }
    // The client is built from the current context, so a file cut short before its contexts
    // (or naming one it lacks) is unusable: say so here, where `check` sees it too.
    let current = config
        .current_context
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| KubeconfigError::Parse("current-context is not set".into()))?;
    let context = config
        .contexts
        .iter()
        .find(|c| c.name == current)
        .and_then(|c| c.context.as_ref())
        .ok_or_else(|| KubeconfigError::Parse(format!("current-context {current:?} names no context")))?;
    if !config
        .clusters
        .iter()
        .any(|c| c.name == context.cluster && c.cluster.as_ref().is_some_and(|c| c.server.is_some()))
    {
        return Err(KubeconfigError::Parse(format!(
            "context {current:?} names cluster {:?}, which is missing or has no server",
            context.cluster
        )));
    }
    if untrusted {
        check_untrusted(&config)?;
    }
    Ok(config)
}

/// The remote-secret rules: credentials and CAs must be inline data, nothing may run a
/// command or name a path on this pod.
pub fn check_untrusted(config: &Kubeconfig) -> Result<(), KubeconfigError> {
    let refuse = |field: String, why| Err(KubeconfigError::Untrusted { field, why });
    for named in &config.auth_infos {
        let Some(auth) = &named.auth_info else { continue };
        let at = |f: &str| format!("users[{}].user.{f}", named.name);
        if auth.exec.is_some() {
            return refuse(at("exec"), "it runs a program inside the meshdns container");
        }
        if auth.auth_provider.is_some() {
            return refuse(at("auth-provider"), "auth providers run plugins and read local files");
        }
        if auth.token_file.is_some() {
            return refuse(at("tokenFile"), "it reads a file of the pod; use an inline token");
        }
        if auth.client_certificate.is_some() {
            return refuse(
                at("client-certificate"),
                "it reads a file of the pod; use client-certificate-data",
            );
        }
        if auth.client_key.is_some() {
            return refuse(at("client-key"), "it reads a file of the pod; use client-key-data");
        }
    }
    for named in &config.clusters {
        let Some(cluster) = &named.cluster else { continue };
        let at = |f: &str| format!("clusters[{}].cluster.{f}", named.name);
        if cluster.certificate_authority.is_some() {
            return refuse(
                at("certificate-authority"),
                "it reads a file of the pod; use certificate-authority-data",
            );
        }
        if cluster.insecure_skip_tls_verify == Some(true) {
            return refuse(
                at("insecure-skip-tls-verify"),
                "anyone on the path could pose as the API server; use certificate-authority-data",
            );
        }
        if cluster.proxy_url.is_some() {
            return refuse(
                at("proxy-url"),
                "it sends the pod's requests through a proxy of the secret's choosing",
            );
        }
        if let Some(why) = cluster.server.as_deref().and_then(refused_server) {
            return refuse(at("server"), why);
        }
    }
    Ok(())
}

/// Why a remote secret's server address is refused: a link-local host (the cloud metadata
/// service, the node's own link) or an unspecified one (this host). Loopback is allowed.
fn refused_server(server: &str) -> Option<&'static str> {
    let ip = server_ip(server)?;
    match gateway_refusal(&Ingress::Ip(ip), "") {
        Some(GatewayRefusal::LinkLocal) => Some("its host is link-local, where the cloud metadata service answers"),
        Some(GatewayRefusal::Unspecified) => Some("its host is unspecified (0.0.0.0 or ::), which reaches this pod"),
        _ => None,
    }
}

/// The IP address a server URL's host stands for, if it is one. Besides the usual forms this
/// reads what the system resolver takes for an IPv4 address (`2852039166`, `0xa9.254.0251.254`),
/// since that is what the client's connector ends up connecting to.
fn server_ip(server: &str) -> Option<IpAddr> {
    let (_, rest) = server.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = match host_port.strip_prefix('[') {
        // A zone (`fe80::1%25eth0`) does not change the address.
        Some(v6) => v6.split_once(']')?.0.split('%').next()?,
        None => host_port.split(':').next()?,
    };
    host.parse().ok().or_else(|| inet_aton(host).map(IpAddr::V4))
}

/// `inet_aton(3)`: one to four parts in decimal, octal (leading `0`) or hex (`0x`), the last
/// filling the remaining bytes.
fn inet_aton(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut value: u32 = 0;
    for (i, part) in parts.iter().enumerate() {
        let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (*part, 10)
        };
        if digits.is_empty() && radix != 8 {
            return None;
        }
        let n = if digits.is_empty() {
            0
        } else {
            u32::from_str_radix(digits, radix).ok()?
        };
        let last = i + 1 == parts.len();
        // Earlier parts are one byte each; the last fills what is left.
        let bits = if last { 8 * (4 - i as u32) } else { 8 };
        if bits < 32 && n >> bits != 0 {
            return None;
        }
        value = if last {
            value | n
        } else {
            value | (n << (24 - 8 * i as u32))
        };
    }
    Some(Ipv4Addr::from(value))
}

/// The `clusters[].cluster.server` fields that use plain `http://`: allowed (test fakes and
/// local proxies use them) but worth a warning, since the token then travels in clear.
pub fn plain_http_servers(config: &Kubeconfig) -> Vec<String> {
    config
        .clusters
        .iter()
        .filter(|named| {
            named
                .cluster
                .as_ref()
                .and_then(|c| c.server.as_deref())
                .and_then(|s| s.get(..7))
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("http://"))
        })
        .map(|named| format!("clusters[{}].cluster.server", named.name))
        .collect()
}

/// A client for the kubeconfig's current context.
pub async fn client_from_kubeconfig(config: Kubeconfig) -> Result<Client, KubeconfigError> {
    let options = KubeConfigOptions::default();
    let mut config = kube::Config::from_custom_kubeconfig(config, &options)
        .await
        .map_err(|e| KubeconfigError::Client(e.to_string()))?;
    config.read_timeout = Some(API_READ_TIMEOUT);
    Client::try_from(config).map_err(|e| KubeconfigError::Client(e.to_string()))
}

/// A client through the pod's service account (`KUBERNETES_SERVICE_HOST`, token and CA).
pub fn in_cluster_client() -> Result<Client, KubeconfigError> {
    let mut config = kube::Config::incluster().map_err(|e| KubeconfigError::InCluster(e.to_string()))?;
    config.read_timeout = Some(API_READ_TIMEOUT);
    Client::try_from(config).map_err(|e| KubeconfigError::Client(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "apiVersion: v1
kind: Config
clusters:
- name: c2
  cluster:
    server: https://10.0.0.1:6443
    certificate-authority-data: Zm9v
contexts:
- name: c2
  context: {cluster: c2, user: c2}
current-context: c2
users:
- name: c2
  user:
    token: abc
";
    const SERVER: &str = "server: https://10.0.0.1:6443";

    #[test]
    fn remote_secret_rules() {
        parse_kubeconfig(BASE, true).expect("inline token and CA are fine");
        let cases = [
            (
                "token: abc",
                "exec:\n      command: /bin/sh\n      apiVersion: client.authentication.k8s.io/v1",
                "exec",
            ),
            ("token: abc", "auth-provider:\n      name: gcp", "auth-provider"),
            ("token: abc", "tokenFile: /var/run/secrets/token", "tokenFile"),
            ("token: abc", "client-certificate: /etc/cert.pem", "client-certificate"),
            ("token: abc", "client-key: /etc/key.pem", "client-key"),
            (
                "certificate-authority-data: Zm9v",
                "certificate-authority: /etc/ca.pem",
                "certificate-authority",
            ),
            (
                "certificate-authority-data: Zm9v",
                "insecure-skip-tls-verify: true",
                "cluster.insecure-skip-tls-verify",
            ),
            (
                "certificate-authority-data: Zm9v",
                "certificate-authority-data: Zm9v\n    proxy-url: http://proxy.example.com:3128",
                "cluster.proxy-url",
            ),
            (SERVER, "server: http://169.254.169.254", "cluster.server"),
            (
                SERVER,
                "server: https://169.254.169.254:443/computeMetadata",
                "cluster.server",
            ),
            (SERVER, "server: https://user:pw@169.254.0.1:6443", "cluster.server"),
            (SERVER, "server: https://[fe80::1]:6443", "cluster.server"),
            (SERVER, "server: https://[fe80::1%25eth0]:6443", "cluster.server"),
            (SERVER, "server: https://[::ffff:169.254.169.254]", "cluster.server"),
            (SERVER, "server: https://0.0.0.0:6443", "cluster.server"),
            (SERVER, "server: https://[::]:6443", "cluster.server"),
            // Forms the system resolver reads as 169.254.169.254.
            (SERVER, "server: http://2852039166/", "cluster.server"),
            (SERVER, "server: http://0xa9.0xfe.0xa9.0xfe", "cluster.server"),
            (SERVER, "server: http://0251.254.43518", "cluster.server"),
        ];
        for (from, to, field) in cases {
            let text = BASE.replace(from, to);
            let err = parse_kubeconfig(&text, true).expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
            // The operator's own kubeconfig may use them.
            parse_kubeconfig(&text, false).expect("trusted kubeconfig");
        }
    }

    /// Allowed as untrusted; plain `http://` with a warning naming the field.
    #[test]
    fn remote_secret_servers_allowed() {
        let cases = [
            ("server: https://10.0.0.1:6443", false),
            ("server: https://api.example.com", false),
            ("server: https://34.136.67.85:443", false),
            ("server: https://[2001:db8::1]:6443", false),
            ("server: https://169.254.example.com", false),
            ("server: https://1.2.3.4.5", false),
            ("server: http://127.0.0.1:8080", true),
            ("server: HTTP://[::1]:8080", true),
            ("server: http://localhost:8080", true),
        ];
        for (server, plain_http) in cases {
            let text = BASE.replace(SERVER, server);
            let config = parse_kubeconfig(&text, true).expect(server);
            let want: &[&str] = if plain_http {
                &["clusters[c2].cluster.server"]
            } else {
                &[]
            };
            assert_eq!(plain_http_servers(&config), want, "{server}");
        }
        let text = BASE.replace("certificate-authority-data: Zm9v", "insecure-skip-tls-verify: false");
        parse_kubeconfig(&text, true).expect("verification left on");
    }

    #[test]
    fn inet_aton_forms() {
        let cases = [
            ("169.254.169.254", Some("169.254.169.254")),
            ("2852039166", Some("169.254.169.254")),
            ("0xa9fea9fe", Some("169.254.169.254")),
            ("169.16689662", Some("169.254.169.254")),
            ("0251.0376.0251.0376", Some("169.254.169.254")),
            ("0", Some("0.0.0.0")),
            ("127.1", Some("127.0.0.1")),
            ("256.1.1.1", None),
            ("1.2.3.4.5", None),
            ("4294967296", None),
            ("0x", None),
            ("09", None),
            ("api", None),
            ("", None),
        ];
        for (host, want) in cases {
            let want = want.map(|w| w.parse::<Ipv4Addr>().unwrap());
            assert_eq!(inet_aton(host), want, "{host}");
        }
    }

    #[test]
    fn garbage_is_a_parse_error() {
        for text in ["", "::::", "clusters: 7", "\u{0}\u{1}binary", "clusters: []\nusers: []"] {
            assert!(parse_kubeconfig(text, true).is_err(), "{text:?}");
        }
    }

    #[test]
    fn reading_is_capped_and_needs_utf8() {
        // A device reports no length: the cap must hold while reading.
        let err = read_kubeconfig(Path::new("/dev/zero"))
            .expect_err("endless")
            .to_string();
        assert!(err.contains("larger than 1048576 bytes"), "{err}");
        let dir = tempfile::tempdir().expect("tempdir");
        let latin1 = dir.path().join("latin1");
        std::fs::write(&latin1, b"apiVersion: v1\nkind: Config # caf\xe9\n").expect("write");
        let err = read_kubeconfig(&latin1).expect_err("not UTF-8").to_string();
        assert!(err.contains("not UTF-8 text: invalid byte at offset 33"), "{err}");
    }

    #[test]
    fn the_current_context_must_resolve() {
        let cut = &BASE[..BASE.find("contexts:").expect("contexts")];
        let cases = [
            (cut.to_string(), "current-context is not set"),
            (
                BASE.replace("current-context: c2", "current-context: c9"),
                "\"c9\" names no context",
            ),
            (
                BASE.replace("{cluster: c2,", "{cluster: c9,"),
                "names cluster \"c9\", which is missing",
            ),
        ];
        for (text, want) in cases {
            for untrusted in [false, true] {
                let err = parse_kubeconfig(&text, untrusted).expect_err(want).to_string();
                assert!(err.contains(want), "{want}: {err}");
            }
        }
    }
}
