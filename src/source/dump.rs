//! Reads a saved `kubectl get services,endpointslices -A -o yaml` (or `-o json`) dump into a
//! [`ClusterState`].
//!
//! A dump lets meshdns know a remote cluster without credentials for it, and makes demos and
//! tests reproducible. Real dumps are large (tens of MB, mostly `managedFields`, annotations
//! and objects of kinds we do not care about) and may come from hand-edited files, so the
//! reader keeps only the handful of fields the name table needs, never fails on the shape of
//! objects it does not read, and names the document, object and field of every error.
//!
//! Every field is decoded through [`Field`], which accepts any value and remembers a value of
//! the wrong shape instead of failing: Kubernetes output sorts keys, so an EndpointSlice's
//! `endpoints` arrive before its `kind`, and what a field must look like is only known once
//! the whole object has been read.

use std::fmt;
use std::marker::PhantomData;
use std::net::IpAddr;

use serde::de::{self, DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_saphyr::options::NonFiniteFloatPolicy;
use thiserror::Error;

use crate::cluster::{
    ClusterState, Endpoint, EndpointSlice, Ingress, LabelSelector, ObjectKey, PortProtocol, SERVICE_NAME_LABEL,
    Service, ServiceKind, ServicePort,
};

/// A dump larger than this is refused: dumps of large clusters run to about 20 MB, and the
/// limit bounds the memory and time one parse can take.
pub const MAX_DUMP_BYTES: usize = 32 * 1024 * 1024;

/// The densest YAML a real dump can hold spends at least this many bytes per node (`- a\n`),
/// so the node budget below never refuses a dump that passed the size check.
const YAML_MIN_BYTES_PER_NODE: usize = 4;
const YAML_MAX_NODES: usize = MAX_DUMP_BYTES / YAML_MIN_BYTES_PER_NODE;
/// A collection node produces a start and an end event, and every document (far fewer than
/// nodes) adds a pair too.
const YAML_MAX_EVENTS: usize = 3 * YAML_MAX_NODES;
/// A multi-document dump holds one object per document, and no object fits in fewer bytes.
const YAML_MIN_BYTES_PER_DOCUMENT: usize = 64;
const YAML_MAX_DOCUMENTS: usize = MAX_DUMP_BYTES / YAML_MIN_BYTES_PER_DOCUMENT;
/// Real objects nest about 20 levels (`managedFields` being the deepest). The YAML decoder
/// recurses once per level, skipped values included, and an unoptimized build spends some
/// 20 KiB of stack per level: 64 levels fit the 2 MiB stack of test and blocking-pool threads.
/// (serde_json skips values without recursion and stops at 128 levels of the rest.)
const YAML_MAX_DEPTH: usize = 64;
/// Escapes never make scalar text longer than its source, so beyond the input size only alias
/// replay could add text; kubectl never writes aliases.
const YAML_MAX_SCALAR_BYTES: usize = 2 * MAX_DUMP_BYTES;

const CORE_API_VERSION: &str = "v1";
const DISCOVERY_API_VERSION: &str = "discovery.k8s.io/v1";
const DEFAULT_NAMESPACE: &str = "default";
const HEADLESS_CLUSTER_IP: &str = "None";
const EXTERNAL_NAME_TYPE: &str = "ExternalName";
const FQDN_ADDRESS_TYPE: &str = "FQDN";

const EXPECT_STRING: &str = "a string";
const EXPECT_INTEGER: &str = "an integer";
const EXPECT_BOOL: &str = "true or false";
const EXPECT_LIST: &str = "a list";
const EXPECT_MAPPING: &str = "a mapping";

/// Why a dump was refused. Documents are counted from 1, skipping empty ones; list items are
/// counted from 0, as in `items[0]`.
#[derive(Debug, Error)]
pub enum DumpError {
    #[error("the dump is {size} bytes, more than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("the dump is not UTF-8 text: invalid byte at offset {offset}")]
    NotUtf8 { offset: usize },
    #[error("the dump is not valid YAML: {0}")]
    Yaml(#[source] serde_saphyr::Error),
    #[error("the dump is not valid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{at}: expected a Kubernetes object, found {found}")]
    NotAnObject { at: String, found: String },
    #[error("{at}: {field}: {problem}")]
    Malformed {
        at: String,
        field: &'static str,
        problem: String,
    },
    #[error("{at}: a {kind} inside a list is not supported")]
    NestedList { at: String, kind: String },
    #[error("{at}: a {list} cannot hold a {kind}")]
    WrongKindInList {
        at: String,
        list: &'static str,
        kind: String,
    },
    /// No document at all: never what kubectl writes (an empty result is an empty `List`), but
    /// what a file truncated to nothing, or read between a shell's `>` and its writer, holds.
    #[error("the dump is empty: no objects, not even an empty List (a file cut short?)")]
    Empty,
    /// Objects, but none a dump of services has: the wrong file (a ConfigMap, a Deployment).
    #[error("no Service or EndpointSlice in the dump, only other kinds (first: {kind}, {at})")]
    NoServices { kind: String, at: String },
    /// A Service or EndpointSlice with a missing or unusable field.
    #[error("{kind} {object}: {field}: {problem} ({at})")]
    Invalid {
        kind: &'static str,
        /// `namespace/name`, or `in namespace X` when the name itself is the problem.
        object: String,
        field: String,
        problem: String,
        at: String,
    },
}

/// Parses a dump (YAML or JSON, a `List`, a stream of documents, or a single object) into the
/// state of one cluster. Services matching `gateway_selector` contribute their load-balancer
/// addresses as the cluster's east-west gateways.
pub fn parse_dump(bytes: &[u8], gateway_selector: &LabelSelector) -> Result<ClusterState, DumpError> {
    if bytes.len() > MAX_DUMP_BYTES {
        return Err(DumpError::TooLarge {
            size: bytes.len(),
            limit: MAX_DUMP_BYTES,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DumpError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    // Editors on Windows like to prepend a byte-order mark; it is not content.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);

    let mut builder = Builder::new(gateway_selector);
    let documents = read_documents(text)?;
    // A dump that loads as nothing would take every name of its cluster away.
    if documents.iter().all(|d| matches!(d, Field::Absent)) {
        return Err(DumpError::Empty);
    }
    for (index, document) in documents.into_iter().enumerate() {
        builder.document(index + 1, document)?;
    }
    if !builder.relevant
        && let Some((kind, at)) = builder.other.take()
    {
        return Err(DumpError::NoServices { kind, at });
    }
    Ok(builder.finish())
}

fn read_documents(text: &str) -> Result<Vec<Field<Document>>, DumpError> {
    let first = text.bytes().find(|b| !b.is_ascii_whitespace());
    if matches!(first, Some(b'{' | b'[')) {
        // A stream, so that `{...}{...}` (several `kubectl -o json` runs appended) works too.
        // A `null` is skipped as the YAML reader skips empty documents, so both count alike.
        serde_json::Deserializer::from_str(text)
            .into_iter::<Field<Document>>()
            .filter(|document| !matches!(document, Ok(Field::Absent)))
            .collect::<Result<_, _>>()
            .map_err(DumpError::Json)
    } else {
        serde_saphyr::from_multiple_with_options(text, yaml_options()).map_err(DumpError::Yaml)
    }
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_nodes: YAML_MAX_NODES,
            max_events: YAML_MAX_EVENTS,
            max_documents: YAML_MAX_DOCUMENTS,
            max_depth: YAML_MAX_DEPTH,
            max_total_scalar_bytes: YAML_MAX_SCALAR_BYTES,
        },
        // The error goes to a log line; a multi-line source snippet would garble it.
        with_snippet: false,
        // `.nan` in some ConfigMap must not fail the dump: even skipped values are inferred.
        non_finite_float_policy: NonFiniteFloatPolicy::PassThrough,
    }
}

// ---------------------------------------------------------------------------------------
// Shape-tolerant decoding
// ---------------------------------------------------------------------------------------

/// What a value turned out to be, for "expected X, found Y" messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    Null,
    Bool,
    Integer,
    Number,
    Text,
    Bytes,
    List,
    Mapping,
    Tagged,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Null => "null",
            Self::Bool => "a boolean",
            Self::Integer => "an integer",
            Self::Number => "a number",
            Self::Text => "a string",
            Self::Bytes => "binary data",
            Self::List => "a list",
            Self::Mapping => "a mapping",
            Self::Tagged => "a tagged value",
        })
    }
}

/// A field that decodes from any value: absent (or null), the value we wanted, or a note of
/// what was there instead. Only the objects we read turn a mismatch into an error.
#[derive(Debug, Default)]
enum Field<T> {
    #[default]
    Absent,
    Present(T),
    Mismatch(Found),
}

impl<T> Field<T> {
    /// The value if present; a mismatch becomes the problem text of an error.
    fn optional(self, expected: &str) -> Result<Option<T>, String> {
        match self {
            Self::Absent => Ok(None),
            Self::Present(value) => Ok(Some(value)),
            Self::Mismatch(found) => Err(format!("expected {expected}, found {found}")),
        }
    }

    fn required(self, expected: &str) -> Result<T, String> {
        self.optional(expected)?.ok_or_else(|| "missing".to_string())
    }

    fn or_default(self, expected: &str) -> Result<T, String>
    where
        T: Default,
    {
        Ok(self.optional(expected)?.unwrap_or_default())
    }

    fn from_option(value: Option<T>, found: Found) -> Self {
        value.map_or(Self::Mismatch(found), Self::Present)
    }
}

/// How a type is built from each kind of value; the defaults reject (and skip) everything.
trait Loose: Sized {
    fn from_text(_: &str) -> Option<Self> {
        None
    }
    fn from_integer(_: i128) -> Option<Self> {
        None
    }
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

impl<'de, T: Loose> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor(PhantomData))
    }
}

struct FieldVisitor<T>(PhantomData<T>);

impl<'de, T: Loose> Visitor<'de> for FieldVisitor<T> {
    type Value = Field<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Field::from_option(T::from_bool(v), Found::Bool))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.visit_i128(v.into())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.visit_i128(v.into())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        Ok(Field::from_option(T::from_integer(v), Found::Integer))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        // Nothing we read is that large; saturating keeps it out of every valid range.
        self.visit_i128(i128::try_from(v).unwrap_or(i128::MAX))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Mismatch(Found::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::from_option(T::from_text(v), Found::Text))
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        Ok(Field::Mismatch(Found::Bytes))
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Absent)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Absent)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Field::deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        Field::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Ok(Field::from_option(T::from_seq(seq)?, Found::List))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok(Field::from_option(T::from_map(map)?, Found::Mapping))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant::<IgnoredAny>(variant)?;
        Ok(Field::Mismatch(Found::Tagged))
    }
}

impl Loose for String {
    fn from_text(v: &str) -> Option<Self> {
        Some(v.to_string())
    }
    // An unquoted `name: 123` in a hand-written file still means the text "123".
    fn from_integer(v: i128) -> Option<Self> {
        Some(v.to_string())
    }
}

impl Loose for i128 {
    fn from_integer(v: i128) -> Option<Self> {
        Some(v)
    }
}

impl Loose for bool {
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
}

// Lists keep one raw object per item until the dump is read; boxing the larger parts keeps
// items of kinds we skip (which have none of them) small.
impl<T: Loose> Loose for Box<T> {
    fn from_text(v: &str) -> Option<Self> {
        T::from_text(v).map(Box::new)
    }
    fn from_integer(v: i128) -> Option<Self> {
        T::from_integer(v).map(Box::new)
    }
    fn from_bool(v: bool) -> Option<Self> {
        T::from_bool(v).map(Box::new)
    }
    fn from_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Option<Self>, A::Error> {
        Ok(T::from_seq(seq)?.map(Box::new))
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        Ok(T::from_map(map)?.map(Box::new))
    }
}

impl<T: DeserializeOwned> Loose for Vec<T> {
    fn from_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Option<Self>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Some(items))
    }
}

/// `metadata.labels`; entries whose key or value is not text cannot match a selector and are
/// dropped.
#[derive(Debug, Default)]
struct Labels(Vec<(String, String)>);

impl Labels {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn matches(&self, selector: &LabelSelector) -> bool {
        selector.matches(self.0.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

impl Loose for Labels {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        let mut labels = Vec::new();
        while let Some((key, value)) = map.next_entry::<Field<String>, Field<String>>()? {
            if let (Field::Present(key), Field::Present(value)) = (key, value) {
                labels.push((key, value));
            }
        }
        Ok(Some(Self(labels)))
    }
}

/// Declares a struct read from a mapping: listed keys fill their fields, any other key (of
/// any shape, even a non-text YAML key) is skipped.
macro_rules! loose_object {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty = $key:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        struct $name {
            $($field: $ty,)*
        }

        impl Loose for $name {
            fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
                let mut object = Self::default();
                while let Some(key) = map.next_key::<Field<String>>()? {
                    match key {
                        $(Field::Present(key) if key == $key => object.$field = map.next_value()?,)*
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Some(object))
            }
        }
    };
}

loose_object! {
    /// Any Kubernetes object, reduced to the fields of a Service, an EndpointSlice or a List.
    struct RawObject {
        api_version: Field<String> = "apiVersion",
        kind: Field<String> = "kind",
        metadata: Field<Box<RawMetadata>> = "metadata",
        spec: Field<Box<RawServiceSpec>> = "spec",
        status: Field<RawServiceStatus> = "status",
        address_type: Field<String> = "addressType",
        endpoints: Field<Vec<Field<RawEndpoint>>> = "endpoints",
        ports: Field<Vec<Field<RawPort>>> = "ports",
        items: Field<Vec<Field<RawObject>>> = "items",
    }
}

loose_object! {
    struct RawMetadata {
        name: Field<String> = "name",
        namespace: Field<String> = "namespace",
        labels: Field<Labels> = "labels",
    }
}

loose_object! {
    struct RawServiceSpec {
        service_type: Field<String> = "type",
        cluster_ip: Field<String> = "clusterIP",
        cluster_ips: Field<Vec<Field<String>>> = "clusterIPs",
        external_name: Field<String> = "externalName",
        ports: Field<Vec<Field<RawPort>>> = "ports",
        publish_not_ready_addresses: Field<bool> = "publishNotReadyAddresses",
    }
}

loose_object! {
    struct RawPort {
        name: Field<String> = "name",
        port: Field<i128> = "port",
        protocol: Field<String> = "protocol",
    }
}

loose_object! {
    struct RawServiceStatus {
        load_balancer: Field<RawLoadBalancer> = "loadBalancer",
    }
}

loose_object! {
    struct RawLoadBalancer {
        ingress: Field<Vec<Field<RawIngress>>> = "ingress",
    }
}

loose_object! {
    struct RawIngress {
        ip: Field<String> = "ip",
        hostname: Field<String> = "hostname",
    }
}

loose_object! {
    struct RawEndpoint {
        addresses: Field<Vec<Field<String>>> = "addresses",
        conditions: Field<RawConditions> = "conditions",
        hostname: Field<String> = "hostname",
    }
}

loose_object! {
    struct RawConditions {
        ready: Field<bool> = "ready",
    }
}

/// The root of one YAML or JSON document: an object, or (as `jq .items` prints) a bare list
/// of objects.
#[derive(Debug)]
enum Document {
    Object(RawObject),
    List(Vec<Field<RawObject>>),
}

impl Loose for Document {
    fn from_seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Option<Self>, A::Error> {
        Ok(Vec::from_seq(seq)?.map(Self::List))
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        Ok(RawObject::from_map(map)?.map(Self::Object))
    }
}

// ---------------------------------------------------------------------------------------
// From raw objects to cluster state
// ---------------------------------------------------------------------------------------

/// Which objects a list may hold: typed lists from the API omit each item's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListKind {
    Any,
    Services,
    EndpointSlices,
}

impl ListKind {
    fn name(self) -> &'static str {
        match self {
            Self::Any => "List",
            Self::Services => "ServiceList",
            Self::EndpointSlices => "EndpointSliceList",
        }
    }

    fn item_kind(self) -> Option<&'static str> {
        match self {
            Self::Any => None,
            Self::Services => Some(SERVICE_KIND),
            Self::EndpointSlices => Some(ENDPOINT_SLICE_KIND),
        }
    }
}

const SERVICE_KIND: &str = "Service";
const ENDPOINT_SLICE_KIND: &str = "EndpointSlice";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    List(ListKind),
    Service,
    EndpointSlice,
    Other,
}

/// An absent `apiVersion` is taken as the expected one; a different one (a Knative `Service`,
/// a `v1beta1` EndpointSlice) is another kind altogether.
fn classify(kind: &str, api_version: Option<&str>) -> Class {
    let is = |expected: &str| api_version.is_none_or(|v| v == expected);
    match kind {
        "List" => Class::List(ListKind::Any),
        "ServiceList" if is(CORE_API_VERSION) => Class::List(ListKind::Services),
        "EndpointSliceList" if is(DISCOVERY_API_VERSION) => Class::List(ListKind::EndpointSlices),
        SERVICE_KIND if is(CORE_API_VERSION) => Class::Service,
        ENDPOINT_SLICE_KIND if is(DISCOVERY_API_VERSION) => Class::EndpointSlice,
        _ => Class::Other,
    }
}

/// Where an object sits in the dump, for error messages.
#[derive(Clone, Copy)]
struct Location {
    document: usize,
    item: Option<(&'static str, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some((container, index)) = self.item {
            write!(f, ", {container}[{index}]")?;
        }
        Ok(())
    }
}

/// Names one Service or EndpointSlice in its errors.
struct Context {
    kind: &'static str,
    object: String,
    at: Location,
}

impl Context {
    fn error(&self, field: impl Into<String>, problem: impl Into<String>) -> DumpError {
        DumpError::Invalid {
            kind: self.kind,
            object: self.object.clone(),
            field: field.into(),
            problem: problem.into(),
            at: self.at.to_string(),
        }
    }

    /// Attaches the field path, built only on error, to a problem.
    fn check<T, F: Into<String>>(&self, field: impl FnOnce() -> F, result: Result<T, String>) -> Result<T, DumpError> {
        result.map_err(|problem| self.error(field(), problem))
    }

    fn ip(&self, field: impl FnOnce() -> String, text: &str) -> Result<IpAddr, DumpError> {
        text.parse()
            .map_err(|_| self.error(field(), format!("{text:?} is not an IP address")))
    }
}

/// Lowercase, without the trailing dot of an absolute name: how the table stores DNS names.
fn normalize_dns_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

struct Builder<'a> {
    gateway_selector: &'a LabelSelector,
    state: ClusterState,
    /// A Service or an EndpointSlice was read.
    relevant: bool,
    /// The first object of another kind (`apiVersion kind`) and where it is.
    other: Option<(String, String)>,
}

impl<'a> Builder<'a> {
    fn new(gateway_selector: &'a LabelSelector) -> Self {
        Self {
            gateway_selector,
            state: ClusterState::default(),
            relevant: false,
            other: None,
        }
    }

    fn document(&mut self, document: usize, root: Field<Document>) -> Result<(), DumpError> {
        let at = Location { document, item: None };
        match root {
            Field::Absent => Ok(()),
            Field::Mismatch(found) => Err(DumpError::NotAnObject {
                at: at.to_string(),
                found: found.to_string(),
            }),
            Field::Present(Document::List(items)) => self.items(at, "", ListKind::Any, items),
            Field::Present(Document::Object(object)) => match self.class(at, &object, None)? {
                Class::List(list) => {
                    let items = object
                        .items
                        .or_default(EXPECT_LIST)
                        .map_err(|problem| DumpError::Malformed {
                            at: at.to_string(),
                            field: "items",
                            problem,
                        })?;
                    self.items(at, "items", list, items)
                }
                class => self.object(at, class, object),
            },
        }
    }

    fn items(
        &mut self,
        at: Location,
        container: &'static str,
        list: ListKind,
        items: Vec<Field<RawObject>>,
    ) -> Result<(), DumpError> {
        for (index, item) in items.into_iter().enumerate() {
            let at = Location {
                item: Some((container, index)),
                ..at
            };
            let object = match item {
                Field::Present(object) => object,
                Field::Absent => return Err(not_an_object(at, Found::Null)),
                Field::Mismatch(found) => return Err(not_an_object(at, found)),
            };
            match self.class(at, &object, Some(list))? {
                Class::List(nested) => {
                    return Err(DumpError::NestedList {
                        at: at.to_string(),
                        kind: nested.name().to_string(),
                    });
                }
                class => self.object(at, class, object)?,
            }
        }
        Ok(())
    }

    fn class(&self, at: Location, object: &RawObject, list: Option<ListKind>) -> Result<Class, DumpError> {
        let malformed = |field, problem| DumpError::Malformed {
            at: at.to_string(),
            field,
            problem,
        };
        let kind = match &object.kind {
            Field::Present(kind) => kind.as_str(),
            Field::Absent => list
                .and_then(ListKind::item_kind)
                .ok_or_else(|| malformed("kind", "missing".to_string()))?,
            Field::Mismatch(found) => {
                return Err(malformed("kind", format!("expected {EXPECT_STRING}, found {found}")));
            }
        };
        let api_version = match &object.api_version {
            Field::Present(version) => Some(version.as_str()),
            Field::Absent => None,
            Field::Mismatch(found) => {
                return Err(malformed(
                    "apiVersion",
                    format!("expected {EXPECT_STRING}, found {found}"),
                ));
            }
        };
        let class = classify(kind, api_version);
        if let Some(list) = list
            && let Some(expected) = list.item_kind()
            && !matches!(
                (expected, class),
                (SERVICE_KIND, Class::Service) | (ENDPOINT_SLICE_KIND, Class::EndpointSlice)
            )
        {
            return Err(DumpError::WrongKindInList {
                at: at.to_string(),
                list: list.name(),
                kind: kind.to_string(),
            });
        }
        Ok(class)
    }

    fn object(&mut self, at: Location, class: Class, object: RawObject) -> Result<(), DumpError> {
        match class {
            Class::Service => {
                self.relevant = true;
                self.service(at, object)
            }
            Class::EndpointSlice => {
                self.relevant = true;
                self.endpoint_slice(at, object)
            }
            Class::List(_) | Class::Other => {
                if self.other.is_none() {
                    let kind = match (&object.api_version, &object.kind) {
                        (Field::Present(version), Field::Present(kind)) => format!("{version} {kind}"),
                        (_, Field::Present(kind)) => kind.clone(),
                        _ => "object without a kind".to_string(),
                    };
                    self.other = Some((kind, at.to_string()));
                }
                Ok(())
            }
        }
    }

    fn service(&mut self, at: Location, object: RawObject) -> Result<(), DumpError> {
        let (key, labels, cx) = identity(SERVICE_KIND, at, object.metadata)?;
        let spec = cx.check(|| "spec", object.spec.or_default(EXPECT_MAPPING))?;

        let service_type = cx.check(|| "spec.type", spec.service_type.optional(EXPECT_STRING))?;
        let kind = if service_type.as_deref() == Some(EXTERNAL_NAME_TYPE) {
            let target = cx
                .check(|| "spec.externalName", spec.external_name.required(EXPECT_STRING))
                .map(|name| normalize_dns_name(&name))?;
            if target.is_empty() {
                return Err(cx.error("spec.externalName", "empty"));
            }
            ServiceKind::ExternalName(target)
        } else {
            cluster_ips(&cx, spec.cluster_ip, spec.cluster_ips)?
        };

        let ports = parse_ports(&cx, "spec.ports", spec.ports)?;

        let publish_not_ready = cx
            .check(
                || "spec.publishNotReadyAddresses",
                spec.publish_not_ready_addresses.optional(EXPECT_BOOL),
            )?
            .unwrap_or(false);

        if labels.matches(self.gateway_selector) {
            let ingress = gateway_ingress(&cx, object.status)?;
            self.state.gateways.insert(key.clone(), ingress);
        }
        self.state.services.insert(
            key,
            Service {
                kind,
                ports: ports.into(),
                publish_not_ready,
            },
        );
        Ok(())
    }

    fn endpoint_slice(&mut self, at: Location, object: RawObject) -> Result<(), DumpError> {
        let (key, labels, cx) = identity(ENDPOINT_SLICE_KIND, at, object.metadata)?;
        let address_type = cx.check(|| "addressType", object.address_type.optional(EXPECT_STRING))?;
        // FQDN slices are deprecated and carry names, not addresses to answer with.
        if address_type.is_some_and(|t| t.eq_ignore_ascii_case(FQDN_ADDRESS_TYPE)) {
            return Ok(());
        }
        // A slice without the label belongs to no Service (a custom controller's, say).
        let Some(service) = labels.get(SERVICE_NAME_LABEL).filter(|s| !s.is_empty()) else {
            return Ok(());
        };
        let service = service.to_ascii_lowercase();

        let mut endpoints = Vec::new();
        let raw_endpoints = cx.check(|| "endpoints", object.endpoints.or_default(EXPECT_LIST))?;
        for (i, raw) in raw_endpoints.into_iter().enumerate() {
            let path = |field: &str| format!("endpoints[{i}]{field}");
            let raw = cx.check(|| path(""), raw.or_default(EXPECT_MAPPING))?;
            let raw_addresses = cx.check(|| path(".addresses"), raw.addresses.or_default(EXPECT_LIST))?;
            let mut addresses = Vec::with_capacity(raw_addresses.len());
            for (j, address) in raw_addresses.into_iter().enumerate() {
                let address_path = || path(&format!(".addresses[{j}]"));
                let text = cx.check(address_path, address.required(EXPECT_STRING))?;
                addresses.push(cx.ip(address_path, &text)?);
            }
            let conditions = cx.check(|| path(".conditions"), raw.conditions.or_default(EXPECT_MAPPING))?;
            let ready = cx
                .check(|| path(".conditions.ready"), conditions.ready.optional(EXPECT_BOOL))?
                .unwrap_or(true);
            let hostname = cx
                .check(|| path(".hostname"), raw.hostname.optional(EXPECT_STRING))?
                .filter(|h| !h.is_empty())
                .map(|h| h.to_ascii_lowercase());
            endpoints.push(Endpoint {
                addresses,
                ready,
                hostname,
            });
        }
        let ports = parse_ports(&cx, "ports", object.ports)?;
        self.state.endpoint_slices.insert(
            key,
            EndpointSlice {
                service,
                endpoints,
                ports,
            },
        );
        Ok(())
    }

    /// Only headless names are answered from endpoints; slices of other services, or of
    /// services missing from the dump, would only take memory.
    fn finish(mut self) -> ClusterState {
        let services = &self.state.services;
        self.state.endpoint_slices.retain(|key, slice| {
            let owner = ObjectKey::new(key.namespace(), &slice.service);
            matches!(
                services.get(&owner),
                Some(Service {
                    kind: ServiceKind::Headless,
                    ..
                })
            )
        });
        self.state
    }
}

/// The ports of a Service (`spec.ports`) or an EndpointSlice (`ports`). A protocol this version
/// does not know cannot be answered for, so that port is skipped; the rest still can be.
fn parse_ports(cx: &Context, field: &str, raw: Field<Vec<Field<RawPort>>>) -> Result<Vec<ServicePort>, DumpError> {
    let mut ports = Vec::new();
    let raw_ports = cx.check(|| field.to_string(), raw.or_default(EXPECT_LIST))?;
    for (i, raw) in raw_ports.into_iter().enumerate() {
        let path = |sub: &str| format!("{field}[{i}]{sub}");
        let raw = cx.check(|| path(""), raw.or_default(EXPECT_MAPPING))?;
        let protocol = cx.check(|| path(".protocol"), raw.protocol.optional(EXPECT_STRING))?;
        let number = cx.check(|| path(".port"), raw.port.required(EXPECT_INTEGER))?;
        let name = cx.check(|| path(".name"), raw.name.optional(EXPECT_STRING))?;
        let port = u16::try_from(number)
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(|| cx.error(path(".port"), format!("{number} is not a port number (1-65535)")))?;
        if let Some(protocol) = PortProtocol::parse(protocol.as_deref()) {
            ports.push(ServicePort {
                name: name.filter(|name| !name.is_empty()),
                port,
                protocol,
            });
        }
    }
    Ok(ports)
}

fn not_an_object(at: Location, found: Found) -> DumpError {
    DumpError::NotAnObject {
        at: at.to_string(),
        found: found.to_string(),
    }
}

/// The object's key, its labels, and the context naming it in later errors.
fn identity(
    kind: &'static str,
    at: Location,
    metadata: Field<Box<RawMetadata>>,
) -> Result<(ObjectKey, Labels, Context), DumpError> {
    let mut cx = Context {
        kind,
        object: "(unnamed)".to_string(),
        at,
    };
    let metadata = cx.check(|| "metadata", metadata.or_default(EXPECT_MAPPING))?;
    let namespace = cx
        .check(|| "metadata.namespace", metadata.namespace.optional(EXPECT_STRING))?
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    cx.object = format!("in namespace {}", namespace.to_ascii_lowercase());
    let name = cx.check(|| "metadata.name", metadata.name.required(EXPECT_STRING))?;
    if name.is_empty() {
        return Err(cx.error("metadata.name", "empty"));
    }
    let key = ObjectKey::new(&namespace, &name);
    cx.object = key.to_string();
    let labels = cx.check(|| "metadata.labels", metadata.labels.or_default(EXPECT_MAPPING))?;
    Ok((key, labels, cx))
}

/// `clusterIPs` lists one address per family and supersedes `clusterIP`, which older objects
/// carry alone. `None` in either marks a headless service.
fn cluster_ips(
    cx: &Context,
    cluster_ip: Field<String>,
    cluster_ips: Field<Vec<Field<String>>>,
) -> Result<ServiceKind, DumpError> {
    let single = cx.check(|| "spec.clusterIP", cluster_ip.optional(EXPECT_STRING))?;
    let listed = cx.check(|| "spec.clusterIPs", cluster_ips.or_default(EXPECT_LIST))?;
    let mut texts = Vec::with_capacity(listed.len());
    for (i, text) in listed.into_iter().enumerate() {
        texts.push(cx.check(|| format!("spec.clusterIPs[{i}]"), text.required(EXPECT_STRING))?);
    }
    let is_headless = |ip: &String| ip.eq_ignore_ascii_case(HEADLESS_CLUSTER_IP);
    if single.as_ref().is_some_and(is_headless) || texts.iter().any(is_headless) {
        return Ok(ServiceKind::Headless);
    }
    let mut ips = Vec::with_capacity(texts.len().max(1));
    if texts.is_empty() {
        // A service still waiting for an address exists all the same: its name is known.
        if let Some(ip) = single.filter(|ip| !ip.is_empty()) {
            ips.push(cx.ip(|| "spec.clusterIP".to_string(), &ip)?);
        }
    } else {
        for (i, text) in texts.iter().enumerate() {
            ips.push(cx.ip(|| format!("spec.clusterIPs[{i}]"), text)?);
        }
    }
    Ok(ServiceKind::ClusterIp(ips))
}

/// The load-balancer addresses of a gateway Service, which may have none yet.
fn gateway_ingress(cx: &Context, status: Field<RawServiceStatus>) -> Result<Vec<Ingress>, DumpError> {
    let status = cx.check(|| "status", status.or_default(EXPECT_MAPPING))?;
    let load_balancer = cx.check(
        || "status.loadBalancer",
        status.load_balancer.or_default(EXPECT_MAPPING),
    )?;
    let entries = cx.check(
        || "status.loadBalancer.ingress",
        load_balancer.ingress.or_default(EXPECT_LIST),
    )?;
    let mut ingress = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let path = |field: &str| format!("status.loadBalancer.ingress[{i}]{field}");
        let entry = cx.check(|| path(""), entry.or_default(EXPECT_MAPPING))?;
        let ip = cx.check(|| path(".ip"), entry.ip.optional(EXPECT_STRING))?;
        let hostname = cx.check(|| path(".hostname"), entry.hostname.optional(EXPECT_STRING))?;
        if let Some(ip) = ip.filter(|ip| !ip.is_empty()) {
            ingress.push(Ingress::Ip(cx.ip(|| path(".ip"), &ip)?));
        } else if let Some(hostname) = hostname.map(|h| normalize_dns_name(&h))
            && !hostname.is_empty()
        {
            ingress.push(Ingress::Hostname(hostname));
        }
    }
    Ok(ingress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::DEFAULT_GATEWAY_SELECTOR;

    fn selector() -> LabelSelector {
        LabelSelector::parse(DEFAULT_GATEWAY_SELECTOR).expect("default selector parses")
    }

    fn parse(input: &str) -> Result<ClusterState, DumpError> {
        parse_dump(input.as_bytes(), &selector())
    }

    /// One sorted line per service, slice and gateway: compact enough for table-driven tests.
    fn summary(state: &ClusterState) -> Vec<String> {
        let mut lines = Vec::new();
        for (key, service) in &state.services {
            let kind = match &service.kind {
                ServiceKind::ClusterIp(ips) => {
                    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
                    format!("ip [{}]", ips.join(","))
                }
                ServiceKind::Headless => "headless".to_string(),
                ServiceKind::ExternalName(name) => format!("external {name}"),
            };
            let mut line = format!("service {key} {kind}");
            for port in service.ports.iter() {
                let name = port.name.as_deref().unwrap_or("-");
                line.push_str(&format!(" {name}:{}/{:?}", port.port, port.protocol));
            }
            if service.publish_not_ready {
                line.push_str(" publish-not-ready");
            }
            lines.push(line);
        }
        for (key, slice) in &state.endpoint_slices {
            let mut line = format!("slice {key} of {}:", slice.service);
            for endpoint in &slice.endpoints {
                let addresses: Vec<String> = endpoint.addresses.iter().map(ToString::to_string).collect();
                line.push_str(&format!(" {}", addresses.join(",")));
                if !endpoint.ready {
                    line.push_str("(not-ready)");
                }
                if let Some(host) = &endpoint.hostname {
                    line.push_str(&format!("(host {host})"));
                }
            }
            lines.push(line);
        }
        for (key, ingress) in &state.gateways {
            let ingress: Vec<String> = ingress
                .iter()
                .map(|i| match i {
                    Ingress::Ip(ip) => ip.to_string(),
                    Ingress::Hostname(name) => name.clone(),
                })
                .collect();
            lines.push(format!("gateway {key} [{}]", ingress.join(",")));
        }
        lines.sort();
        lines
    }

    const HEADLESS_WITH_SLICES: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: db, namespace: data}
  spec:
    clusterIP: None
    publishNotReadyAddresses: true
    ports: [{name: pg, port: 5432}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: db-abcde
    namespace: data
    labels: {kubernetes.io/service-name: DB}
  addressType: IPv4
  endpoints:
  - addresses: [10.0.0.5]
    hostname: DB-0
  - addresses: [10.0.0.6]
    conditions: {ready: false}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: db-fqdn
    namespace: data
    labels: {kubernetes.io/service-name: db}
  addressType: FQDN
  endpoints:
  - addresses: [db.example.com]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: orphan
    namespace: data
  endpoints:
  - addresses: [10.0.0.9]
- apiVersion: v1
  kind: Service
  metadata: {name: web, namespace: data}
  spec: {clusterIP: 10.0.1.1}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: web-xyz
    namespace: data
    labels: {kubernetes.io/service-name: web}
  endpoints: [{addresses: [10.0.0.7]}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: gone-xyz
    namespace: data
    labels: {kubernetes.io/service-name: gone}
  endpoints: [{addresses: [10.0.0.8]}]
"#;

    const OTHER_KINDS: &str = r#"
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: default}
  spec:
    ports: "not a list"
    clusterIP: [1, 2]
    type: {nested: map}
    template: {spec: {containers: [{name: web, ports: [{containerPort: 80}]}]}}
- apiVersion: v1
  kind: ConfigMap
  metadata: [not, a, mapping]
  data: {a: .nan, b: !custom-tag {x: 1}, c: 123456789012345678901234567890, ? [complex, key] : v}
- apiVersion: v1
  kind: Pod
  metadata: {name: p, labels: 7}
  spec: 42
  status: {loadBalancer: "weird"}
- apiVersion: serving.knative.dev/v1
  kind: Service
  metadata: {name: knative}
  spec: {template: {}}
- apiVersion: discovery.k8s.io/v1beta1
  kind: EndpointSlice
  metadata: {name: old}
  endpoints: [{addresses: [not-an-ip]}]
- apiVersion: v1
  kind: PodList
  items: [{kind: Service, metadata: {name: hidden}}]
- apiVersion: v1
  kind: Service
  metadata: {name: real}
  spec: {clusterIP: 10.0.0.1}
"#;

    #[test]
    fn valid_dumps() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("empty list", "apiVersion: v1\nkind: List\nitems: []\n", &[]),
            (
                "empty typed list",
                "apiVersion: v1\nkind: ServiceList\nitems: []\n",
                &[],
            ),
            ("list without items", "kind: List\nmetadata: {}\n", &[]),
            (
                "list",
                "apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata:\n    name: A\n    namespace: NS\n  spec:\n    clusterIP: 10.0.0.1\n    ports:\n    - {name: http, port: 80}\n    - {port: 53, protocol: UDP}\n    - {name: odd, port: 9, protocol: QUIC}\nkind: List\nmetadata:\n  resourceVersion: \"\"\n",
                &["service ns/a ip [10.0.0.1] http:80/Tcp -:53/Udp"],
            ),
            (
                "multi-document stream",
                "kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.0.0.1}\n---\n---\napiVersion: v1\nkind: List\nitems:\n- kind: Service\n  metadata: {name: b, namespace: x}\n",
                &["service default/a ip [10.0.0.1]", "service x/b ip []"],
            ),
            (
                "single object",
                "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: b}\nspec: {clusterIP: \"\", type: ClusterIP}\n",
                &["service b/a ip []"],
            ),
            (
                "json list",
                r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Service","metadata":{"name":"a","namespace":"b"},"spec":{"clusterIPs":["10.0.0.1"],"ports":[{"port":443,"protocol":"TCP","name":"https"}]}}]}"#,
                &["service b/a ip [10.0.0.1] https:443/Tcp"],
            ),
            (
                "json stream and bare array",
                r#" [{"kind":"Service","metadata":{"name":"a"}}] null {"kind":"Service","metadata":{"name":"b"},"spec":null} "#,
                &["service default/a ip []", "service default/b ip []"],
            ),
            (
                "typed lists without item kinds",
                "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: db}\n  spec: {clusterIP: None}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSliceList\nitems:\n- metadata: {name: db-1, labels: {kubernetes.io/service-name: db}}\n  endpoints: [{addresses: [10.0.0.2]}]\n",
                &["service default/db headless", "slice default/db-1 of db: 10.0.0.2"],
            ),
            (
                "other kinds of any shape",
                OTHER_KINDS,
                &["service default/real ip [10.0.0.1]"],
            ),
            (
                "headless keeps only its slices",
                HEADLESS_WITH_SLICES,
                &[
                    "service data/db headless pg:5432/Tcp publish-not-ready",
                    "service data/web ip [10.0.1.1]",
                    "slice data/db-abcde of db: 10.0.0.5(host db-0) 10.0.0.6(not-ready)",
                ],
            ),
            (
                "headless through clusterIPs",
                "kind: Service\nmetadata: {name: h}\nspec: {clusterIPs: [None]}\n",
                &["service default/h headless"],
            ),
            (
                "external name",
                "kind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: DB.Example.COM., clusterIP: ignored}\n",
                &["service default/ext external db.example.com"],
            ),
            (
                "dual stack prefers clusterIPs",
                "kind: Service\nmetadata: {name: ds}\nspec:\n  clusterIP: 10.0.0.9\n  clusterIPs: [10.0.0.9, 'fd00::9']\n",
                &["service default/ds ip [10.0.0.9,fd00::9]"],
            ),
            (
                "gateway with ip",
                "kind: Service\nmetadata: {name: gw, namespace: istio-system, labels: {istio: eastwestgateway}}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.3}\nstatus: {loadBalancer: {ingress: [{ip: 35.1.2.3, ipMode: VIP}]}}\n",
                &[
                    "gateway istio-system/gw [35.1.2.3]",
                    "service istio-system/gw ip [10.0.0.3]",
                ],
            ),
            (
                "gateway with hostname",
                "kind: Service\nmetadata: {name: gw, labels: {istio: eastwestgateway}}\nspec: {type: LoadBalancer}\nstatus: {loadBalancer: {ingress: [{hostname: ABC.elb.Amazonaws.com.}, {}]}}\n",
                &["gateway default/gw [abc.elb.amazonaws.com]", "service default/gw ip []"],
            ),
            (
                "gateway without ingress yet",
                "kind: Service\nmetadata: {name: gw, labels: {istio: eastwestgateway}}\nstatus: {loadBalancer: {}}\n",
                &["gateway default/gw []", "service default/gw ip []"],
            ),
            (
                "non-matching gateway label",
                "kind: Service\nmetadata: {name: gw, labels: {istio: ingressgateway}}\nstatus: {loadBalancer: {ingress: [{ip: not-checked}]}}\n",
                &["service default/gw ip []"],
            ),
            (
                "byte-order mark",
                "\u{feff}kind: Service\nmetadata: {name: a}\n",
                &["service default/a ip []"],
            ),
        ];
        for (name, input, want) in cases {
            let state = parse(input).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(summary(&state), *want, "{name}");
        }
    }

    #[test]
    fn invalid_dumps() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "bad cluster IP",
                b"kind: List\nitems:\n- kind: Service\n  metadata: {name: helloworld, namespace: helloworld}\n  spec: {clusterIPs: [10.0.0.x]}\n".to_vec(),
                r#"Service helloworld/helloworld: spec.clusterIPs[0]: "10.0.0.x" is not an IP address (document 1, items[0])"#,
            ),
            (
                "bad single cluster IP",
                b"kind: Service\nmetadata: {name: a}\nspec: {clusterIP: 300.1.1.1}\n".to_vec(),
                r#"Service default/a: spec.clusterIP: "300.1.1.1" is not an IP address (document 1)"#,
            ),
            (
                "bad endpoint address",
                b"---\nkind: Service\nmetadata: {name: a}\n---\nkind: EndpointSlice\napiVersion: discovery.k8s.io/v1\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\nendpoints: [{addresses: [10.0.0.1, nope]}]\n".to_vec(),
                r#"EndpointSlice default/a-1: endpoints[0].addresses[1]: "nope" is not an IP address (document 2)"#,
            ),
            (
                "bad gateway ip",
                b"kind: Service\nmetadata: {name: gw, labels: {istio: eastwestgateway}}\nstatus: {loadBalancer: {ingress: [{ip: 1.2.3}]}}\n".to_vec(),
                r#"Service default/gw: status.loadBalancer.ingress[0].ip: "1.2.3" is not an IP address"#,
            ),
            (
                "missing name",
                b"kind: Service\nmetadata: {namespace: x}\n".to_vec(),
                "Service in namespace x: metadata.name: missing (document 1)",
            ),
            (
                "external name without target",
                b"kind: Service\nmetadata: {name: e}\nspec: {type: ExternalName}\n".to_vec(),
                "Service default/e: spec.externalName: missing",
            ),
            (
                "port out of range",
                b"kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 70000}]}\n".to_vec(),
                "Service default/a: spec.ports[0].port: 70000 is not a port number (1-65535)",
            ),
            (
                "port zero",
                b"kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 0}]}\n".to_vec(),
                "spec.ports[0].port: 0 is not a port number",
            ),
            (
                "port as text",
                b"kind: Service\nmetadata: {name: a}\nspec: {ports: [{port: '80'}]}\n".to_vec(),
                "Service default/a: spec.ports[0].port: expected an integer, found a string",
            ),
            (
                "port missing",
                b"kind: Service\nmetadata: {name: a}\nspec: {ports: [{name: x}]}\n".to_vec(),
                "spec.ports[0].port: missing",
            ),
            (
                "spec of a service not a mapping",
                b"kind: Service\nmetadata: {name: a}\nspec: [1]\n".to_vec(),
                "Service default/a: spec: expected a mapping, found a list",
            ),
            (
                "ready not a boolean",
                b"kind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: a}}\nendpoints: [{conditions: {ready: maybe}}]\n".to_vec(),
                "EndpointSlice default/s: endpoints[0].conditions.ready: expected true or false, found a string",
            ),
            ("not UTF-8", b"kind: Service\nmetadata: {name: \xff}\n".to_vec(), "not UTF-8 text: invalid byte at offset 31"),
            ("truncated YAML", b"kind: List\nitems:\n- kind: Service\n  metadata: {name: a, namesp".to_vec(), "not valid YAML"),
            ("truncated JSON", br#"{"kind":"List","items":[{"kind":"Serv"#.to_vec(), "not valid JSON"),
            ("duplicate YAML key", b"kind: Service\nkind: Pod\n".to_vec(), "not valid YAML: duplicate mapping key"),
            (
                "too large",
                vec![b' '; MAX_DUMP_BYTES + 1],
                "the dump is 33554433 bytes, more than the limit of 33554432 bytes",
            ),
            (
                "wrong kind in a typed list",
                b"apiVersion: v1\nkind: ServiceList\nitems:\n- kind: Service\n  metadata: {name: a}\n- kind: Pod\n  metadata: {name: b}\n".to_vec(),
                "document 1, items[1]: a ServiceList cannot hold a Pod",
            ),
            (
                "nested list",
                b"kind: List\nitems:\n- kind: List\n  items: []\n".to_vec(),
                "document 1, items[0]: a List inside a list is not supported",
            ),
            ("scalar document", b"just text\n".to_vec(), "document 1: expected a Kubernetes object, found a string"),
            ("empty input", b"".to_vec(), "the dump is empty"),
            ("whitespace and comments", b"  \n# nothing here\n".to_vec(), "the dump is empty"),
            ("only separators", b"---\n---\n".to_vec(), "the dump is empty"),
            ("only a null document", b"~\n".to_vec(), "the dump is empty"),
            (
                "a ConfigMap list",
                b"apiVersion: v1\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n  metadata: {name: a}\nkind: List\n".to_vec(),
                "no Service or EndpointSlice in the dump, only other kinds (first: v1 ConfigMap, document 1, items[0])",
            ),
            (
                "a Deployment",
                b"apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\n".to_vec(),
                "only other kinds (first: apps/v1 Deployment, document 1)",
            ),
            (
                "an empty list of another kind",
                b"apiVersion: v1\nkind: ConfigMapList\nitems: []\n".to_vec(),
                "(first: v1 ConfigMapList, document 1)",
            ),
            (
                "a Knative Service",
                b"apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: a}\n".to_vec(),
                "(first: serving.knative.dev/v1 Service, document 1)",
            ),
            ("null list item", b"kind: List\nitems: [~]\n".to_vec(), "document 1, items[0]: expected a Kubernetes object, found null"),
            ("items not a list", b"kind: List\nitems: {a: 1}\n".to_vec(), "document 1: items: expected a list, found a mapping"),
            ("missing kind", b"metadata: {name: a}\n".to_vec(), "document 1: kind: missing"),
            ("kind not text", b"kind: [Service]\n".to_vec(), "document 1: kind: expected a string, found a list"),
            ("missing kind in a bare array", b"[{\"metadata\": {}}]".to_vec(), "document 1, [0]: kind: missing"),
            (
                "null JSON documents are not counted",
                br#"{"kind":"ConfigMap"} null {"kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"x"}}"#.to_vec(),
                r#"Service default/a: spec.clusterIP: "x" is not an IP address (document 2)"#,
            ),
        ];
        for (name, input, want) in cases {
            match parse_dump(&input, &selector()) {
                Ok(state) => panic!("{name}: parsed as {:?}", summary(&state)),
                Err(error) => {
                    let message = error.to_string();
                    assert!(message.contains(want), "{name}: {message:?} lacks {want:?}");
                }
            }
        }
    }

    #[test]
    fn realistic_kubectl_dump() {
        let dump = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      cloud.google.com/neg: '{"ingress":true}'
      kubectl.kubernetes.io/last-applied-configuration: |
        {"apiVersion":"v1","kind":"Service","metadata":{"annotations":{},"name":"cassandra","namespace":"data"},"spec":{"clusterIP":"None","ports":[{"port":9042}]}}
    creationTimestamp: "2024-03-02T11:20:45Z"
    labels:
      app: cassandra
    managedFields:
    - apiVersion: v1
      fieldsType: FieldsV1
      fieldsV1:
        f:metadata:
          f:annotations:
            .: {}
            f:kubectl.kubernetes.io/last-applied-configuration: {}
        f:spec:
          f:clusterIP: {}
          f:ports:
            .: {}
            k:{"port":9042,"protocol":"TCP"}:
              .: {}
              f:port: {}
              f:protocol: {}
      manager: kubectl-client-side-apply
      operation: Update
      time: "2024-03-02T11:20:45Z"
    name: cassandra
    namespace: data
    resourceVersion: "88213"
    uid: 0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b
  spec:
    clusterIP: None
    clusterIPs:
    - None
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    - IPv6
    ipFamilyPolicy: RequireDualStack
    ports:
    - name: cql
      port: 9042
      protocol: TCP
      targetPort: 9042
    publishNotReadyAddresses: true
    selector:
      app: cassandra
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv6
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - fd00:10:244::5
    conditions:
      ready: false
      serving: false
      terminating: false
    hostname: cassandra-0
    nodeName: worker-1
    targetRef:
      kind: Pod
      name: cassandra-0
      namespace: data
      uid: 11111111-2222-3333-4444-555555555555
  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: "2024-03-02T11:21:03Z"
    creationTimestamp: "2024-03-02T11:20:45Z"
    generateName: cassandra-
    generation: 4
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: cassandra
      service.kubernetes.io/headless: ""
    name: cassandra-v6p2k
    namespace: data
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: cassandra
      uid: 0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b
    resourceVersion: "88260"
    uid: 9a8b7c6d-5e4f-3a2b-1c0d-e9f8a7b6c5d4
  ports:
  - name: cql
    port: 9042
    protocol: TCP
- apiVersion: v1
  kind: Event
  count: 3
  involvedObject: {kind: Pod, name: cassandra-0}
  message: 'Back-off restarting failed container'
  metadata: {name: cassandra-0.17b, namespace: data}
kind: List
metadata:
  resourceVersion: ""
"#;
        let state = parse(dump).expect("realistic dump parses");
        assert_eq!(
            summary(&state),
            [
                "service data/cassandra headless cql:9042/Tcp publish-not-ready",
                "slice data/cassandra-v6p2k of cassandra: fd00:10:244::5(not-ready)(host cassandra-0)",
            ]
        );
    }

    #[test]
    fn demo_dumps() {
        let one = parse(include_str!("../demo/cluster-1.yaml")).expect("cluster-1 parses");
        assert_eq!(
            summary(&one),
            [
                "gateway istio-system/istio-eastwestgateway [35.202.10.51]",
                "service default/kubernetes ip [10.96.0.1] https:443/Tcp",
                "service helloworld/helloworld ip [10.96.120.15] http:5000/Tcp",
                "service istio-system/istio-eastwestgateway ip [10.96.201.44] status-port:15021/Tcp tls:15443/Tcp tls-istiod:15012/Tcp tls-webhook:15017/Tcp",
                "service istio-system/istiod ip [10.96.14.3] grpc-xds:15010/Tcp https-dns:15012/Tcp https-webhook:443/Tcp http-monitoring:15014/Tcp",
                "service kube-system/kube-dns ip [10.96.0.10] dns:53/Udp dns-tcp:53/Tcp metrics:9153/Tcp",
                "service sleep/sleep ip [10.96.88.40] http:80/Tcp",
            ]
        );
        let two = parse(include_str!("../demo/cluster-2.yaml")).expect("cluster-2 parses");
        assert_eq!(
            summary(&two),
            [
                "gateway istio-system/istio-eastwestgateway [34.136.67.85]",
                "service default/kubernetes ip [10.112.0.1] https:443/Tcp",
                "service helloworld/helloworld ip [10.112.4.20] http:5000/Tcp",
                "service istio-system/istio-eastwestgateway ip [10.112.9.7] status-port:15021/Tcp tls:15443/Tcp tls-istiod:15012/Tcp tls-webhook:15017/Tcp",
                "service kube-system/kube-dns ip [10.112.0.10] dns:53/Udp dns-tcp:53/Tcp metrics:9153/Tcp",
                "service sample/httpbin ip [10.112.30.2] http:8000/Tcp",
            ]
        );
        // The helloworld and httpbin slices are read, then dropped: neither is headless.
        assert!(two.endpoint_slices.is_empty());
    }

    /// Dumps near the size limit, as dense as kubectl writes them, fit the YAML budget: one
    /// `List` of many objects, and a stream of as many small documents as fit.
    #[test]
    #[cfg_attr(debug_assertions, ignore = "parses 64 MiB of YAML; run with --release")]
    fn full_size_dumps_fit_the_budget() {
        let ip = |i: usize| format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256);
        let listed = |i: usize| {
            format!(
                "- apiVersion: v1\n  kind: Service\n  metadata:\n    labels:\n      app: app-{i}\n    managedFields:\n    - fieldsV1:\n        f:spec:\n          f:ports:\n            .: {{}}\n    name: svc-{i}\n    namespace: ns-{}\n  spec:\n    clusterIP: {}\n    ports:\n    - name: http\n      port: 80\n",
                i % 100,
                ip(i)
            )
        };
        let document = |i: usize| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{i}\nspec:\n  clusterIP: {}\n",
                ip(i)
            )
        };
        let list_head = "apiVersion: v1\nkind: List\nitems:\n";
        for (head, object) in [(list_head, &listed as &dyn Fn(usize) -> String), ("", &document)] {
            let mut dump = String::from(head);
            let mut count = 0;
            loop {
                let next = object(count);
                if dump.len() + next.len() > MAX_DUMP_BYTES {
                    break;
                }
                dump.push_str(&next);
                count += 1;
            }
            let state = parse(&dump).expect("full-size dump parses");
            assert_eq!(state.services.len(), count);
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let depth = 100_000;
        let yaml = format!("kind: ConfigMap\ndata: {}", "[".repeat(depth));
        assert!(matches!(parse(&yaml), Err(DumpError::Yaml(_))));
        let block: String = (0..1000).map(|i| format!("{}a:\n", " ".repeat(i))).collect();
        assert!(matches!(parse(&block), Err(DumpError::Yaml(_))));
        let json = format!("{{\"kind\":\"ConfigMap\",\"data\":{}", "[".repeat(depth));
        assert!(matches!(parse(&json), Err(DumpError::Json(_))));
        // Just inside the budget still parses, within a test thread's stack.
        let inside = YAML_MAX_DEPTH - 2;
        let yaml = format!(
            "kind: ConfigMap\ndata: {}{}\n---\nkind: Service\nmetadata: {{name: a}}\n",
            "[".repeat(inside),
            "]".repeat(inside)
        );
        assert!(parse(&yaml).is_ok());
    }

    /// Cheap mutation fuzzing over the demo dumps: no input may panic.
    #[test]
    fn mutated_dumps_never_panic() {
        let seeds = [
            include_str!("../demo/cluster-1.yaml"),
            HEADLESS_WITH_SLICES,
            OTHER_KINDS,
        ];
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let noise = b"[]{}:-,'\"\n #!&*?|>~0Nn.x";
        for seed in seeds {
            for _ in 0..300 {
                let mut bytes = seed.as_bytes().to_vec();
                for _ in 0..(next() % 4 + 1) {
                    let at = (next() as usize) % bytes.len();
                    match next() % 3 {
                        0 => bytes[at] = noise[(next() as usize) % noise.len()],
                        1 => bytes.truncate(at),
                        _ => {
                            bytes.remove(at);
                        }
                    }
                    if bytes.is_empty() {
                        break;
                    }
                }
                let _ = parse_dump(&bytes, &selector());
            }
        }
    }
}
