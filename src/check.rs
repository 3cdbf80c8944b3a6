//! `meshdns check`: validates a config file and everything it names (object dumps, kubeconfigs,
//! resolv.conf, remote secrets) without starting anything, and reports every problem found.

use std::path::Path;

use crate::cluster::is_dns_label;
use crate::config::{ClusterSource, Config, Overrides};
use crate::resolv::ResolvConf;
use crate::source::kubeconfig::{parse_kubeconfig, plain_http_servers, read_kubeconfig};
use crate::source::{load_dump, parse_dump};

/// The outcome of a check: problems (empty when the config is good) and notes for the operator.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

/// Checks the config at `path` with the command line's overrides applied.
pub fn check(path: &Path, overrides: &Overrides) -> Report {
    let mut report = Report::default();
    let config = match Config::load(path, overrides) {
        Ok(config) => config,
        Err(error) => {
            report.problems = error.lines();
            return report;
        }
    };
    check_config(&config, &mut report);
    report
}

/// Checks the files a valid config names.
pub fn check_config(config: &Config, report: &mut Report) {
    for cluster in &config.clusters {
        let name = &cluster.name;
        let selector = &cluster.gateway.selector;
        match &cluster.source {
            ClusterSource::Objects(path) => match load_dump(path, selector) {
                Ok((state, _)) => report.notes.push(format!(
                    "cluster {name}: {} services, {} gateway addresses in {}",
                    state.services.len(),
                    state.gateway_addresses().len(),
                    path.display()
                )),
                Err(error) => report.problems.push(format!("cluster {name}: {error}")),
            },
            ClusterSource::Embedded(text) => {
                if let Err(error) = parse_dump(text.as_bytes(), selector) {
                    report.problems.push(format!("cluster {name}: embedded dump: {error}"));
                }
            }
            ClusterSource::Kubeconfig(path) => {
                match read_kubeconfig(path).and_then(|text| parse_kubeconfig(&text, false)) {
                    Ok(_) => report
                        .notes
                        .push(format!("cluster {name}: kubeconfig {} is usable", path.display())),
                    Err(error) => report.problems.push(format!("cluster {name}: {error}")),
                }
            }
            ClusterSource::InCluster => report.notes.push(format!(
                "cluster {name}: in-cluster service account (checked only inside a pod)"
            )),
        }
    }

    match ResolvConf::read(&config.resolv_conf) {
        Ok(resolv) => {
            if config.upstreams.is_none() && resolv.nameservers.is_empty() {
                report.problems.push(format!(
                    "{}: lists no nameserver and no `upstreams` are configured",
                    config.resolv_conf.display()
                ));
            }
            for warning in resolv.warnings {
                report
                    .notes
                    .push(format!("{}: line skipped: {warning}", config.resolv_conf.display()));
            }
        }
        Err(error) if config.upstreams.is_none() => report.problems.push(error.to_string()),
        Err(error) => report.notes.push(format!(
            "{error} (upstreams are configured; only the search domains are lost)"
        )),
    }

    if let Some(dir) = &config.remote_secrets_dir {
        check_remote_secrets(dir, config.local_cluster(), report);
    }
}

fn check_remote_secrets(dir: &Path, local: &str, report: &mut Report) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // The secret volume is optional: it may be mounted only once remotes exist.
            report
                .notes
                .push(format!("{}: no remote secrets directory (yet)", dir.display()));
            return;
        }
        Err(error) => {
            report.problems.push(format!("{}: cannot read: {error}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || name == local || !path.is_file() {
            continue;
        }
        if !is_dns_label(&name) {
            report.problems.push(format!(
                "{}: the entry name is not a valid cluster name",
                path.display()
            ));
            continue;
        }
        match read_kubeconfig(&path).and_then(|text| parse_kubeconfig(&text, true)) {
            Ok(config) => {
                report
                    .notes
                    .push(format!("remote cluster {name}: kubeconfig is usable"));
                for field in plain_http_servers(&config) {
                    report
                        .notes
                        .push(format!("remote cluster {name}: warning: {field} is plain http"));
                }
            }
            Err(error) => report
                .problems
                .push(format!("remote cluster {name} ({}): {error}", path.display())),
        }
    }
}
