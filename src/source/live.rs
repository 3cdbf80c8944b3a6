//! Live cluster state from a Kubernetes API server: kube-runtime watchers on Services (all
//! namespaces) and headless EndpointSlices, folded event by event into the compact
//! [`ClusterState`]. No object is kept whole; a relist (after `410 Gone`) builds the new state
//! aside and swaps it in only when complete, so entries the relist did not return are swept
//! then, and answers never go missing meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Service as K8sService;
use k8s_openapi::api::discovery::v1::EndpointSlice as K8sEndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch};
use kube::{Api, Client};
use tracing::warn;

use super::{BoxFuture, ClusterSource};
use crate::cluster::{
    ClusterState, Endpoint, EndpointSlice, Ingress, LabelSelector, ObjectKey, PortProtocol, SERVICE_NAME_LABEL,
    Service, ServiceKind, ServicePort,
};
use crate::hub::ClusterHandle;

/// Label the EndpointSlice controller puts on the slices of headless services; only those are
/// needed, so only those are watched.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const DEFAULT_NAMESPACE: &str = "default";
/// Upper bound of events folded before one publish, so a long burst still shows progress.
const MAX_BATCH: usize = 4096;

/// A live cluster.
pub struct KubeSource {
    client: Client,
    selector: LabelSelector,
}

impl KubeSource {
    pub fn from_parts(client: Client, selector: LabelSelector) -> Self {
        Self { client, selector }
    }

    async fn watch(self, handle: ClusterHandle) {
        let services = watch(Api::<K8sService>::all(self.client.clone()), watcher::Config::default())
            .default_backoff()
            .map(|r| r.map(Change::Service));
        let slices = watch(
            Api::<K8sEndpointSlice>::all(self.client),
            watcher::Config::default().labels(HEADLESS_LABEL),
        )
        .default_backoff()
        .map(|r| r.map(Change::Slice));
        let mut changes = std::pin::pin!(futures::stream::select(services, slices));
        let mut folder = Folder::new(self.selector);
        while let Some(first) = changes.next().await {
            let mut changed = folder.fold(first, &handle);
            // Fold whatever else is already buffered so a burst costs one publish.
            for _ in 0..MAX_BATCH {
                match changes.next().now_or_never() {
                    Some(Some(more)) => changed |= folder.fold(more, &handle),
                    _ => break,
                }
            }
            if changed && folder.listed() {
                handle.publish(folder.state.clone());
            }
        }
    }
}

impl ClusterSource for KubeSource {
    fn run(self: Box<Self>, handle: ClusterHandle) -> BoxFuture {
        Box::pin(self.watch(handle))
    }
}

/// One watch event of either resource. Events pass through once each, so their size matters
/// less than not copying the objects again.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Change {
    Service(Event<K8sService>),
    Slice(Event<K8sEndpointSlice>),
}

/// Services and gateways returned so far by a relist in progress.
type RelistServices = (HashMap<ObjectKey, Service>, BTreeMap<ObjectKey, Vec<Ingress>>);

/// Folds watch events into a [`ClusterState`].
#[derive(Debug)]
pub struct Folder {
    selector: LabelSelector,
    pub state: ClusterState,
    /// A relist in progress: the services and gateways it has returned so far.
    relist_services: Option<RelistServices>,
    relist_slices: Option<HashMap<ObjectKey, EndpointSlice>>,
    services_listed: bool,
    slices_listed: bool,
}

impl Folder {
    pub fn new(selector: LabelSelector) -> Self {
        Self {
            selector,
            state: ClusterState::default(),
            relist_services: None,
            relist_slices: None,
            services_listed: false,
            slices_listed: false,
        }
    }

    /// Whether both resources have completed their first full list.
    pub fn listed(&self) -> bool {
        self.services_listed && self.slices_listed
    }

    /// Folds one event (or watch error); returns whether the published state changed.
    pub fn fold(&mut self, change: Result<Change, watcher::Error>, handle: &ClusterHandle) -> bool {
        match change {
            Err(error) => {
                handle.report_error(&error);
                false
            }
            Ok(Change::Service(event)) => {
                handle.mark_current();
                self.fold_service(event, handle.cluster())
            }
            Ok(Change::Slice(event)) => {
                handle.mark_current();
                self.fold_slice(event, handle.cluster())
            }
        }
    }

    pub fn fold_service(&mut self, event: Event<K8sService>, cluster: &str) -> bool {
        match event {
            Event::Init => {
                self.relist_services = Some(Default::default());
                false
            }
            Event::InitApply(svc) => {
                if let Some((services, gateways)) = &mut self.relist_services {
                    insert_service(services, gateways, &svc, &self.selector, cluster);
                }
                false
            }
            Event::InitDone => {
                if let Some((services, gateways)) = self.relist_services.take() {
                    self.state.services = services;
                    self.state.gateways = gateways;
                }
                self.services_listed = true;
                true
            }
            Event::Apply(svc) => {
                insert_service(
                    &mut self.state.services,
                    &mut self.state.gateways,
                    &svc,
                    &self.selector,
                    cluster,
                );
                true
            }
            Event::Delete(svc) => {
                let key = object_key(svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref());
                // A gateway Service whose spec could not be used is in `gateways` only: its
                // removal is a change too.
                let gateway = self.state.gateways.remove(&key).is_some();
                self.state.services.remove(&key).is_some() || gateway
            }
        }
    }

    pub fn fold_slice(&mut self, event: Event<K8sEndpointSlice>, cluster: &str) -> bool {
        match event {
            Event::Init => {
                self.relist_slices = Some(HashMap::new());
                false
            }
            Event::InitApply(slice) => {
                if let Some(slices) = &mut self.relist_slices {
                    insert_slice(slices, &slice, cluster);
                }
                false
            }
            Event::InitDone => {
                if let Some(slices) = self.relist_slices.take() {
                    self.state.endpoint_slices = slices;
                }
                self.slices_listed = true;
                true
            }
            Event::Apply(slice) => {
                insert_slice(&mut self.state.endpoint_slices, &slice, cluster);
                true
            }
            Event::Delete(slice) => {
                let key = object_key(slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref());
                self.state.endpoint_slices.remove(&key).is_some()
            }
        }
    }
}

fn object_key(namespace: Option<&str>, name: Option<&str>) -> ObjectKey {
    ObjectKey::new(namespace.unwrap_or(DEFAULT_NAMESPACE), name.unwrap_or_default())
}

fn insert_service(
    services: &mut HashMap<ObjectKey, Service>,
    gateways: &mut BTreeMap<ObjectKey, Vec<Ingress>>,
    svc: &K8sService,
    selector: &LabelSelector,
    cluster: &str,
) {
    let key = object_key(svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref());
    match convert_service(svc) {
        Ok(service) => {
            services.insert(key.clone(), service);
        }
        Err(problem) => {
            // One bad object must not take the rest of the cluster down; it is left out.
            warn!(cluster, service = %key, %problem, "service left out of the table");
            services.remove(&key);
        }
    }
    let labels = svc
        .metadata
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()));
    if selector.matches(labels) {
        gateways.insert(key, gateway_ingress(svc, cluster));
    } else {
        gateways.remove(&key);
    }
}

/// The compact form of a Service, or why it cannot be used.
pub fn convert_service(svc: &K8sService) -> Result<Service, String> {
    if svc.metadata.name.as_deref().unwrap_or_default().is_empty() {
        return Err("metadata.name is empty".into());
    }
    let spec = svc.spec.as_ref();
    let kind = match spec {
        Some(spec) if spec.type_.as_deref() == Some("ExternalName") => {
            let target = spec.external_name.as_deref().unwrap_or_default().trim_end_matches('.');
            if target.is_empty() {
                return Err("spec.externalName is empty".into());
            }
            ServiceKind::ExternalName(target.to_ascii_lowercase())
        }
        _ => {
            let ips: Vec<&str> = match spec.and_then(|s| s.cluster_ips.as_ref()) {
                Some(list) if !list.is_empty() => list.iter().map(String::as_str).collect(),
                _ => spec.and_then(|s| s.cluster_ip.as_deref()).into_iter().collect(),
            };
            if ips.iter().any(|ip| ip.eq_ignore_ascii_case("None")) {
                ServiceKind::Headless
            } else {
                let parsed = ips
                    .iter()
                    .filter(|ip| !ip.is_empty())
                    .map(|ip| {
                        ip.parse::<IpAddr>()
                            .map_err(|_| format!("spec.clusterIPs: {ip:?} is not an IP address"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                ServiceKind::ClusterIp(parsed)
            }
        }
    };
    let ports: Vec<ServicePort> = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: u16::try_from(p.port).ok().filter(|&port| port != 0)?,
                protocol: PortProtocol::parse(p.protocol.as_deref())?,
            })
        })
        .collect();
    Ok(Service {
        kind,
        ports: ports.into(),
        publish_not_ready: spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false),
    })
}

fn gateway_ingress(svc: &K8sService, cluster: &str) -> Vec<Ingress> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut out = Vec::new();
    for entry in ingress.into_iter().flatten() {
        if let Some(ip) = entry.ip.as_deref().filter(|ip| !ip.is_empty()) {
            match ip.parse() {
                Ok(ip) => out.push(Ingress::Ip(ip)),
                Err(_) => warn!(cluster, %ip, "gateway ingress IP is not an IP address; ignored"),
            }
        } else if let Some(host) = entry.hostname.as_deref().filter(|h| !h.is_empty()) {
            out.push(Ingress::Hostname(host.trim_end_matches('.').to_ascii_lowercase()));
        }
    }
    out
}

fn insert_slice(slices: &mut HashMap<ObjectKey, EndpointSlice>, slice: &K8sEndpointSlice, cluster: &str) {
    let key = object_key(slice.metadata.namespace.as_deref(), slice.metadata.name.as_deref());
    match convert_slice(slice) {
        Some(converted) => {
            slices.insert(key, converted);
        }
        None => {
            if slice.address_type != "FQDN" {
                warn!(cluster, slice = %key, "endpoint slice without a service label; ignored");
            }
            slices.remove(&key);
        }
    }
}

/// The compact form of an EndpointSlice; `None` for slices the table cannot use.
pub fn convert_slice(slice: &K8sEndpointSlice) -> Option<EndpointSlice> {
    if slice.address_type == "FQDN" {
        return None;
    }
    let service = slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)?
        .to_ascii_lowercase();
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| Endpoint {
            addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            hostname: e.hostname.as_ref().map(|h| h.to_ascii_lowercase()),
        })
        .collect();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: p
                    .port
                    .and_then(|port| u16::try_from(port).ok())
                    .filter(|&port| port != 0)?,
                protocol: PortProtocol::parse(p.protocol.as_deref())?,
            })
        })
        .collect();
    Some(EndpointSlice {
        service,
        endpoints,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn svc(ns: &str, name: &str, ips: &[&str]) -> K8sService {
        K8sService {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ips: Some(ips.iter().map(ToString::to_string).collect()),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn gateway(ip: &str) -> K8sService {
        let mut g = svc("istio-system", "gw", &["10.0.0.9"]);
        g.metadata.labels = Some([("istio".to_string(), "eastwestgateway".to_string())].into());
        g.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        g
    }

    fn folder() -> Folder {
        let mut f = Folder::new(LabelSelector::parse("istio=eastwestgateway").unwrap());
        f.fold_slice(Event::Init, "c");
        f.fold_slice(Event::InitDone, "c");
        f
    }

    #[test]
    fn events_fold_into_state_and_relists_sweep_only_when_done() {
        let mut f = folder();
        assert!(!f.listed());
        f.fold_service(Event::Init, "c");
        f.fold_service(Event::InitApply(svc("a", "one", &["10.0.0.1"])), "c");
        f.fold_service(Event::InitApply(gateway("34.1.1.1")), "c");
        assert!(f.state.services.is_empty(), "nothing shows before the list completes");
        assert!(f.fold_service(Event::InitDone, "c"));
        assert!(f.listed());
        assert_eq!(f.state.services.len(), 2);
        assert_eq!(
            f.state.gateway_addresses(),
            vec![Ingress::Ip("34.1.1.1".parse().unwrap())]
        );

        f.fold_service(Event::Apply(svc("a", "two", &["10.0.0.2", "fd00::2"])), "c");
        f.fold_service(Event::Delete(svc("a", "one", &[])), "c");
        assert_eq!(f.state.services.len(), 2);
        assert!(f.state.services.contains_key(&ObjectKey::new("a", "two")));

        // A relist (after 410 Gone) that no longer returns `two`: kept until InitDone, then swept.
        f.fold_service(Event::Init, "c");
        f.fold_service(Event::InitApply(svc("a", "three", &["10.0.0.3"])), "c");
        assert!(f.state.services.contains_key(&ObjectKey::new("a", "two")));
        f.fold_service(Event::InitDone, "c");
        assert!(!f.state.services.contains_key(&ObjectKey::new("a", "two")));
        assert!(f.state.services.contains_key(&ObjectKey::new("a", "three")));
        assert!(f.state.gateways.is_empty(), "the gateway was not relisted either");
    }

    #[test]
    fn conversion_rules_and_bad_objects() {
        let mut headless = svc("a", "h", &["None"]);
        assert_eq!(convert_service(&headless).unwrap().kind, ServiceKind::Headless);
        headless.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        headless.spec.as_mut().unwrap().external_name = Some("Example.COM.".into());
        assert_eq!(
            convert_service(&headless).unwrap().kind,
            ServiceKind::ExternalName("example.com".into())
        );
        assert!(convert_service(&svc("a", "bad", &["10.0.0.x"])).is_err());
        assert!(convert_service(&svc("a", "", &["10.0.0.1"])).is_err());

        // A bad update of a known service removes it rather than keeping a wrong answer.
        let mut f = folder();
        f.fold_service(Event::Init, "c");
        f.fold_service(Event::InitDone, "c");
        f.fold_service(Event::Apply(svc("a", "s", &["10.0.0.1"])), "c");
        f.fold_service(Event::Apply(svc("a", "s", &["nonsense"])), "c");
        assert!(f.state.services.is_empty());
    }
}
