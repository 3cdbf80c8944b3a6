//! Starting a real meshdns for a test: object dumps, resolv.conf and config are written to a
//! temporary directory and loaded exactly as `meshdns serve --config` would load them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use meshdns::app::App;
use meshdns::config::{Config, Overrides};
use tempfile::TempDir;

/// The search path kubelet writes for a pod in namespace `sleep`, plus a node domain outside
/// the cluster domain that must never be stripped.
pub const SEARCH: &[&str] = &[
    "sleep.svc.cluster.local",
    "svc.cluster.local",
    "cluster.local",
    "corp.example",
];

/// Builds `kubectl get services,endpointslices -A -o yaml` style dumps.
#[derive(Default, Clone)]
pub struct Dump {
    items: Vec<String>,
    /// A whole dump as written, replacing the built items (fixtures from real kubectl output).
    raw: Option<String>,
}

impl Dump {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn raw(text: &str) -> Self {
        Self {
            items: Vec::new(),
            raw: Some(text.to_string()),
        }
    }

    /// A ClusterIP service; several IPs make it dual-stack.
    pub fn service(mut self, ns: &str, name: &str, ips: &[&str]) -> Self {
        let ips_yaml: Vec<String> = ips.iter().map(|ip| format!("\"{ip}\"")).collect();
        let first = ips.first().copied().unwrap_or("");
        self.items.push(format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {name}\n    namespace: {ns}\n    resourceVersion: \"1001\"\n    managedFields:\n    - manager: kubectl\n      operation: Apply\n  spec:\n    type: ClusterIP\n    clusterIP: \"{first}\"\n    clusterIPs: [{}]\n    ports:\n    - name: http\n      port: 80\n      protocol: TCP\n  status:\n    loadBalancer: {{}}\n",
            ips_yaml.join(", ")
        ));
        self
    }

    pub fn headless(mut self, ns: &str, name: &str) -> Self {
        self.items.push(format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {name}\n    namespace: {ns}\n  spec:\n    clusterIP: None\n    clusterIPs: [None]\n    ports:\n    - name: web\n      port: 80\n"
        ));
        self
    }

    pub fn external_name(mut self, ns: &str, name: &str, target: &str) -> Self {
        self.items.push(format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {name}\n    namespace: {ns}\n  spec:\n    type: ExternalName\n    externalName: {target}\n"
        ));
        self
    }

    /// The Istio east-west gateway, with the given load-balancer ingress (IPs or host names).
    pub fn gateway(mut self, ingress: &[&str]) -> Self {
        let mut list = String::new();
        for entry in ingress {
            let key = if entry.parse::<std::net::IpAddr>().is_ok() {
                "ip"
            } else {
                "hostname"
            };
            let _ = writeln!(list, "      - {key}: {entry}");
        }
        self.items.push(format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: istio-eastwestgateway\n    namespace: istio-system\n    labels:\n      istio: eastwestgateway\n      app: istio-eastwestgateway\n  spec:\n    type: LoadBalancer\n    clusterIP: 10.200.0.7\n    clusterIPs: [10.200.0.7]\n    ports:\n    - name: tls\n      port: 15443\n  status:\n    loadBalancer:\n      ingress:\n{list}"
        ));
        self
    }

    pub fn yaml(&self) -> String {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let mut out = String::from("apiVersion: v1\nkind: List\nmetadata:\n  resourceVersion: \"\"\nitems:\n");
        if self.items.is_empty() {
            out = String::from("apiVersion: v1\nkind: List\nitems: []\n");
        }
        for item in &self.items {
            out.push_str(item);
        }
        out
    }
}

pub struct ClusterSpec {
    pub name: &'static str,
    pub local: bool,
    pub dump: Dump,
}

pub struct Proxy {
    pub app: App,
    pub addr: SocketAddr,
    pub dir: TempDir,
}

/// Where a test cluster's state comes from.
pub enum Src {
    Dump(Dump),
    /// A kubeconfig (YAML text) of a fake API server: a live cluster.
    Kubeconfig(String),
}

pub struct Spec {
    pub name: &'static str,
    pub local: bool,
    pub src: Src,
}

impl Proxy {
    /// Starts meshdns on 127.0.0.1:0 with these clusters, forwarding to `upstreams`.
    pub async fn start(clusters: &[ClusterSpec], upstreams: &[SocketAddr], extra_yaml: &str) -> Proxy {
        let specs: Vec<Spec> = clusters
            .iter()
            .map(|c| Spec {
                name: c.name,
                local: c.local,
                src: Src::Dump(c.dump.clone()),
            })
            .collect();
        Self::start_specs(&specs, upstreams, extra_yaml).await
    }

    /// Like [`Proxy::start`], with live clusters among the dumps.
    pub async fn start_specs(clusters: &[Spec], upstreams: &[SocketAddr], extra_yaml: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_config(dir.path(), clusters, upstreams, extra_yaml);
        let config = Config::load(&path, &Overrides::default()).expect("config loads");
        let app = App::start(&config).await.expect("meshdns starts");
        let addr = app.dns_addrs()[0];
        Proxy { app, addr, dir }
    }

    pub fn dump_path(&self, cluster: &str) -> PathBuf {
        self.dir.path().join(format!("{cluster}.yaml"))
    }
}

/// Writes dumps, kubeconfigs, resolv.conf and `meshdns.yaml` into `dir`; returns the config path.
pub fn write_config(dir: &Path, clusters: &[Spec], upstreams: &[SocketAddr], extra_yaml: &str) -> PathBuf {
    let mut config = String::from("listen: [\"127.0.0.1:0\"]\nadmin: \"127.0.0.1:0\"\nresolvConf: resolv.conf\n");
    config.push_str("upstreamTimeout: 300ms\nupstreamDeadline: 900ms\n");
    let ups: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    let _ = writeln!(config, "upstreams: [{}]", ups.join(", "));
    config.push_str(extra_yaml);
    config.push_str("clusters:\n");
    for c in clusters {
        let _ = writeln!(config, "  - name: {}\n    local: {}", c.name, c.local);
        match &c.src {
            Src::Dump(dump) => {
                std::fs::write(dir.join(format!("{}.yaml", c.name)), dump.yaml()).expect("write dump");
                let _ = writeln!(config, "    objects: {}.yaml", c.name);
            }
            Src::Kubeconfig(text) => {
                std::fs::write(dir.join(format!("{}.kubeconfig", c.name)), text).expect("write kubeconfig");
                let _ = writeln!(config, "    kubeconfig: {}.kubeconfig", c.name);
            }
        }
    }
    // The resolv.conf nameserver is never used: upstreams are explicit and on loopback.
    let resolv = format!("nameserver 127.0.0.1\nsearch {}\noptions ndots:5\n", SEARCH.join(" "));
    std::fs::write(dir.join("resolv.conf"), resolv).expect("write resolv.conf");
    let path = dir.join("meshdns.yaml");
    std::fs::write(&path, config).expect("write config");
    path
}
