//! Resource types the stand-in serves: the built-in kinds and those registered at run time
//! from applied CustomResourceDefinitions, plus the per-field type facts (list types, merge
//! keys) that server-side apply and strategic-merge patch need.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

/// Where a CRD declares its `/scale` subresource's fields (`.spec.replicas` style paths).
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleInfo {
    /// JSON path of the desired replica count, e.g. `.spec.replicas`.
    pub spec_replicas_path: String,
    /// JSON path of the observed replica count, e.g. `.status.replicas`.
    pub status_replicas_path: String,
    /// JSON path of the label selector string (optional).
    pub label_selector_path: Option<String>,
}

/// One extra column of `kubectl get` (`additionalPrinterColumns`).
#[derive(Debug, Clone, PartialEq)]
pub struct PrinterColumn {
    /// Column header.
    pub name: String,
    /// OpenAPI type (`string`, `integer`, `date` ...).
    pub type_: String,
    /// JSONPath such as `.spec.tenant` or `.status.conditions[?(@.type=="Ready")].status`.
    pub json_path: String,
    /// 0: shown by `kubectl get`; higher: only with `-o wide`.
    pub priority: i64,
    /// Column description.
    pub description: String,
    /// OpenAPI format (`name`, `date-time` ...).
    pub format: String,
}

/// One served version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionInfo {
    /// Version name, e.g. `v1alpha1`.
    pub name: String,
    /// Whether this version is the storage version.
    pub storage: bool,
    /// `openAPIV3Schema` of a custom resource version (None for built-ins).
    pub schema: Option<Value>,
    /// Whether the `/status` subresource exists.
    pub status: bool,
    /// The `/scale` subresource, when it exists.
    pub scale: Option<ScaleInfo>,
    /// `additionalPrinterColumns`.
    pub columns: Vec<PrinterColumn>,
}

/// A resource (group + plural) and everything the server needs to serve it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceType {
    /// API group, empty for core.
    pub group: String,
    /// Plural resource name (`configmaps`).
    pub plural: String,
    /// Singular name (`configmap`).
    pub singular: String,
    /// Kind (`ConfigMap`).
    pub kind: String,
    /// List kind (`ConfigMapList`).
    pub list_kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names (`cm`).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Served versions, preferred (storage) first.
    pub versions: Vec<VersionInfo>,
    /// Built in (as opposed to registered from a CRD).
    pub builtin: bool,
    /// Whether the real server maintains `metadata.generation` for this kind.
    pub has_generation: bool,
}

/// The `(group, plural)` key that identifies a resource across versions.
pub type ResourceKey = (String, String);

// === impl ResourceType ===

impl ResourceType {
    /// Key in the registry and the store.
    pub fn key(&self) -> ResourceKey {
        (self.group.clone(), self.plural.clone())
    }

    /// `group/version` (or `v1` for core) of a version.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// The version entry, if served.
    pub fn version(&self, version: &str) -> Option<&VersionInfo> {
        self.versions.iter().find(|v| v.name == version)
    }

    /// The preferred version (storage version first).
    pub fn preferred(&self) -> &VersionInfo {
        self.versions
            .iter()
            .find(|v| v.storage)
            .unwrap_or(&self.versions[0])
    }

    /// Whether a `/status` subresource exists (in any version: the stand-in stores one copy).
    pub fn has_status(&self, version: &str) -> bool {
        self.version(version).is_some_and(|v| v.status)
    }
}

#[allow(clippy::too_many_arguments)] // one row of the built-in kinds table
fn builtin(
    group: &str,
    version: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    scale: bool,
) -> ResourceType {
    let scale = scale.then(|| ScaleInfo {
        spec_replicas_path: ".spec.replicas".into(),
        status_replicas_path: ".status.replicas".into(),
        label_selector_path: Some(".spec.selector".into()),
    });
    ResourceType {
        group: group.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        list_kind: format!("{kind}List"),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: if ["pods", "services", "statefulsets", "deployments"].contains(&plural) {
            vec!["all".into()]
        } else {
            vec![]
        },
        versions: vec![VersionInfo {
            name: version.into(),
            storage: true,
            schema: None,
            status,
            scale,
            columns: vec![],
        }],
        builtin: true,
        // The real server tracks generation for workloads, PDBs and CRDs, not for config data.
        has_generation: status
            && !matches!(plural, "namespaces" | "services" | "persistentvolumeclaims"),
    }
}

/// The built-in kinds served from start-up.
pub fn builtins() -> Vec<ResourceType> {
    vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        builtin("", "v1", "secrets", "Secret", true, &[], false, false),
        builtin("", "v1", "services", "Service", true, &["svc"], true, false),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin("", "v1", "pods", "Pod", true, &["po"], true, false),
        builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            &["pvc"],
            true,
            false,
        ),
        builtin("", "v1", "events", "Event", true, &["ev"], false, false),
        builtin(
            "",
            "v1",
            "resourcequotas",
            "ResourceQuota",
            true,
            &["quota"],
            true,
            false,
        ),
        builtin(
            "",
            "v1",
            "endpoints",
            "Endpoints",
            true,
            &["ep"],
            false,
            false,
        ),
        builtin("", "v1", "nodes", "Node", false, &["no"], true, false),
        builtin(
            "apps",
            "v1",
            "statefulsets",
            "StatefulSet",
            true,
            &["sts"],
            true,
            true,
        ),
        // The StatefulSet controller's record of each template revision (the e2e
        // kubelet writes them: see tether_e2e::kubelet).
        builtin(
            "apps",
            "v1",
            "controllerrevisions",
            "ControllerRevision",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
        ),
        builtin(
            "networking.k8s.io",
            "v1",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
            false,
            false,
        ),
        builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
            true,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            false,
            false,
        ),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            true,
            &["ev"],
            false,
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            false,
        ),
    ]
}

/// Builds the resource type a CustomResourceDefinition declares.
///
/// Returns an error message when the CRD lacks what the real server requires
/// (group, names.plural, names.kind, scope, at least one version, exactly one storage version).
pub fn from_crd(crd: &Value) -> Result<ResourceType, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let group = s(spec.get("group")).ok_or("spec.group: Required value")?;
    let names = spec.get("names").ok_or("spec.names: Required value")?;
    let plural = s(names.get("plural")).ok_or("spec.names.plural: Required value")?;
    let kind = s(names.get("kind")).ok_or("spec.names.kind: Required value")?;
    let singular = s(names.get("singular")).unwrap_or_else(|| kind.to_lowercase());
    let list_kind = s(names.get("listKind")).unwrap_or_else(|| format!("{kind}List"));
    let scope = s(spec.get("scope")).ok_or("spec.scope: Required value")?;
    let strs = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let expected_name = format!("{plural}.{group}");
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    if name != expected_name {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let mut versions = Vec::new();
    for v in spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions: Required value")?
    {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let vname = s(v.get("name")).ok_or("spec.versions.name: Required value")?;
        let sub = v.get("subresources");
        let scale = sub.and_then(|s| s.get("scale")).map(|sc| ScaleInfo {
            spec_replicas_path: sc
                .get("specReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".spec.replicas")
                .into(),
            status_replicas_path: sc
                .get("statusReplicasPath")
                .and_then(Value::as_str)
                .unwrap_or(".status.replicas")
                .into(),
            label_selector_path: sc
                .get("labelSelectorPath")
                .and_then(Value::as_str)
                .map(str::to_string),
        });
        let columns = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .map(|cols| {
                cols.iter()
                    .filter_map(|c| {
                        Some(PrinterColumn {
                            name: c.get("name")?.as_str()?.to_string(),
                            type_: c
                                .get("type")
                                .and_then(Value::as_str)
                                .unwrap_or("string")
                                .to_string(),
                            json_path: c.get("jsonPath")?.as_str()?.to_string(),
                            priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
                            description: c
                                .get("description")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                            format: c
                                .get("format")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        versions.push(VersionInfo {
            name: vname,
            storage: v.get("storage").and_then(Value::as_bool).unwrap_or(false),
            schema: v.pointer("/schema/openAPIV3Schema").cloned(),
            status: sub.and_then(|s| s.get("status")).is_some(),
            scale,
            columns,
        });
    }
    if versions.is_empty() {
        return Err("spec.versions: Invalid value: must have at least one served version".into());
    }
    if versions.iter().filter(|v| v.storage).count() > 1 {
        return Err(
            "spec.versions: Invalid value: must have exactly one version marked as storage version"
                .into(),
        );
    }
    // Preferred version first; kubectl and kube-rs Discovery pick the first listed.
    versions.sort_by_key(|v| !v.storage);
    Ok(ResourceType {
        group,
        plural,
        singular,
        kind,
        list_kind,
        namespaced: scope == "Namespaced",
        short_names: strs(names.get("shortNames")),
        categories: strs(names.get("categories")),
        versions,
        builtin: false,
        has_generation: true,
    })
}

/// All served resource types, keyed by `(group, plural)`.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    types: BTreeMap<ResourceKey, Arc<ResourceType>>,
}

// === impl Registry ===

impl Registry {
    /// A registry holding the built-in kinds.
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        for t in builtins() {
            r.insert(t);
        }
        r
    }

    /// Adds or replaces a type.
    pub fn insert(&mut self, t: ResourceType) {
        self.types.insert(t.key(), Arc::new(t));
    }

    /// Removes a type.
    pub fn remove(&mut self, key: &ResourceKey) -> Option<Arc<ResourceType>> {
        self.types.remove(key)
    }

    /// Finds a type by group, version and plural.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceType>> {
        let t = self.types.get(&(group.to_string(), plural.to_string()))?;
        t.version(version).is_some().then(|| t.clone())
    }

    /// Finds a type by key, any version.
    pub fn get(&self, key: &ResourceKey) -> Option<Arc<ResourceType>> {
        self.types.get(key).cloned()
    }

    /// Finds a type by apiVersion and kind.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceType>> {
        let (group, version) = split_api_version(api_version);
        self.types
            .values()
            .find(|t| t.group == group && t.kind == kind && t.version(version).is_some())
            .cloned()
    }

    /// Every type, sorted by group then plural.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ResourceType>> {
        self.types.values()
    }

    /// Served group names with their versions (core group excluded), built-ins first.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>, bool)> = Vec::new();
        for t in self.types.values().filter(|t| !t.group.is_empty()) {
            let entry = match out.iter_mut().find(|(g, _, _)| *g == t.group) {
                Some(e) => e,
                None => {
                    out.push((t.group.clone(), Vec::new(), t.builtin));
                    out.last_mut().expect("just pushed")
                }
            };
            for v in &t.versions {
                if !entry.1.contains(&v.name) {
                    entry.1.push(v.name.clone());
                }
            }
        }
        out.sort_by_key(|(_, _, builtin)| !*builtin);
        for (_, versions, _) in &mut out {
            versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        }
        out.into_iter().map(|(g, v, _)| (g, v)).collect()
    }
}

/// Splits `group/version` (or `v1`) into `(group, version)`.
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Kubernetes version priority: GA > beta > alpha, higher numbers first
/// (`k8s.io/apimachinery/pkg/version.CompareKubeAwareVersionStrings`).
pub fn version_priority(v: &str) -> (u8, u32, u32) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major = digits.parse().unwrap_or(0);
    let tail = &rest[digits.len()..];
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (level, n) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    (level, major, n.parse().unwrap_or(0))
}

/// How a list field merges under server-side apply and strategic-merge patch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole (the default for CRD lists without `x-kubernetes-list-type`).
    Atomic,
    /// Set of scalars, merged by value.
    Set,
    /// List of objects merged by the given key fields.
    Map(Vec<String>),
}

/// A position in an object's type: answers "what list type is here" while walking a value.
///
/// CRD kinds are answered from their OpenAPI schema; built-in kinds from a table of the
/// merge keys that matter (see [`builtin_list_type`]); `metadata` the same way for all kinds.
#[derive(Debug, Clone, Copy)]
pub enum TypeCursor<'a> {
    /// A node of a CRD schema (None: unknown or preserved field).
    Schema(Option<&'a Value>),
    /// A built-in kind, remembering the last two field names.
    Builtin(&'a str, &'a str),
    /// Inside `metadata`.
    Meta(&'a str),
}

// === impl TypeCursor ===

impl<'a> TypeCursor<'a> {
    /// The cursor at an object's root.
    pub fn root(t: &'a ResourceType, version: &str) -> TypeCursor<'a> {
        if t.builtin {
            TypeCursor::Builtin("", "")
        } else {
            TypeCursor::Schema(t.version(version).and_then(|v| v.schema.as_ref()))
        }
    }

    /// Moves into a field of an object (`root` tells whether this is the object's top level).
    pub fn field(self, name: &'a str, root: bool) -> TypeCursor<'a> {
        if root && name == "metadata" {
            return TypeCursor::Meta("");
        }
        match self {
            TypeCursor::Schema(Some(s)) => TypeCursor::Schema(
                s.get("properties")
                    .and_then(|p| p.get(name))
                    .or_else(|| s.get("additionalProperties").filter(|a| a.is_object())),
            ),
            TypeCursor::Schema(None) => TypeCursor::Schema(None),
            TypeCursor::Builtin(_, last) => TypeCursor::Builtin(last, name),
            TypeCursor::Meta(_) => TypeCursor::Meta(name),
        }
    }

    /// Moves into the items of a list.
    pub fn item(self) -> TypeCursor<'a> {
        match self {
            TypeCursor::Schema(Some(s)) => TypeCursor::Schema(s.get("items")),
            other => other,
        }
    }

    /// The list type at this position.
    pub fn list_type(&self) -> ListType {
        match self {
            TypeCursor::Schema(Some(s)) => {
                match s.get("x-kubernetes-list-type").and_then(Value::as_str) {
                    Some("map") => ListType::Map(
                        s.get("x-kubernetes-list-map-keys")
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(|k| k.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    ),
                    Some("set") => ListType::Set,
                    _ => ListType::Atomic,
                }
            }
            TypeCursor::Schema(None) => ListType::Atomic,
            TypeCursor::Builtin(parent, last) => builtin_list_type(parent, last),
            TypeCursor::Meta(name) => match *name {
                "ownerReferences" => ListType::Map(vec!["uid".into()]),
                "finalizers" => ListType::Set,
                _ => ListType::Atomic,
            },
        }
    }

    /// Whether an object at this position is replaced as a whole (`x-kubernetes-map-type: atomic`).
    pub fn atomic_map(&self) -> bool {
        matches!(self, TypeCursor::Schema(Some(s))
            if s.get("x-kubernetes-map-type").and_then(Value::as_str) == Some("atomic"))
    }
}

/// Merge keys of built-in lists, from the `patchMergeKey`/`listMapKeys` tags of k8s.io/api.
///
/// Covered: containers/initContainers/ephemeralContainers (name), container ports
/// (containerPort, protocol), Service ports (port, protocol), env (name), volumes (name),
/// volumeMounts (mountPath), imagePullSecrets (name), conditions (type), hostAliases (ip),
/// topologySpreadConstraints (topologyKey, whenUnsatisfiable). Every other list is atomic.
pub fn builtin_list_type(parent: &str, last: &str) -> ListType {
    let keys: &[&str] = match last {
        "containers" | "initContainers" | "ephemeralContainers" => &["name"],
        "ports"
            if matches!(
                parent,
                "containers" | "initContainers" | "ephemeralContainers"
            ) =>
        {
            &["containerPort", "protocol"]
        }
        "ports" if parent == "spec" => &["port", "protocol"],
        "env" | "volumes" | "imagePullSecrets" => &["name"],
        "volumeMounts" => &["mountPath"],
        "conditions" => &["type"],
        "hostAliases" => &["ip"],
        "topologySpreadConstraints" => &["topologyKey", "whenUnsatisfiable"],
        _ => return ListType::Atomic,
    };
    ListType::Map(keys.iter().map(|k| k.to_string()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1alpha1", "served": true, "storage": false,
                     "schema": {"openAPIV3Schema": {"type": "object"}}},
                    {"name": "v1", "served": true, "storage": true,
                     "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.size", "statusReplicasPath": ".status.size"}},
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "status": {"type": "object", "properties": {"pods": {"type": "array",
                            "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                            "items": {"type": "object"}}}}}}}}
                ]
            }
        })
    }

    #[test]
    fn crd_registration_reads_names_versions_and_subresources() {
        let t = from_crd(&crd()).unwrap();
        assert_eq!(t.kind, "Widget");
        assert_eq!(t.singular, "widget");
        assert_eq!(t.list_kind, "WidgetList");
        assert!(t.namespaced);
        assert_eq!(t.versions[0].name, "v1", "storage version is preferred");
        assert!(t.has_status("v1"));
        assert!(!t.has_status("v1alpha1"));
        assert_eq!(
            t.version("v1")
                .unwrap()
                .scale
                .as_ref()
                .unwrap()
                .spec_replicas_path,
            ".spec.size"
        );
    }

    #[test]
    fn crd_name_must_match() {
        let mut c = crd();
        c["metadata"]["name"] = json!("wrong");
        assert!(from_crd(&c).unwrap_err().contains("metadata.name"));
    }

    #[test]
    fn schema_cursor_finds_list_map_keys() {
        let t = from_crd(&crd()).unwrap();
        let c = TypeCursor::root(&t, "v1")
            .field("status", true)
            .field("pods", false);
        assert_eq!(c.list_type(), ListType::Map(vec!["name".into()]));
        let meta = TypeCursor::root(&t, "v1").field("metadata", true);
        assert_eq!(meta.field("finalizers", false).list_type(), ListType::Set);
        assert_eq!(
            meta.field("ownerReferences", false).list_type(),
            ListType::Map(vec!["uid".into()])
        );
    }

    #[test]
    fn builtin_merge_keys() {
        assert_eq!(
            builtin_list_type("spec", "containers"),
            ListType::Map(vec!["name".into()])
        );
        assert_eq!(
            builtin_list_type("containers", "ports"),
            ListType::Map(vec!["containerPort".into(), "protocol".into()])
        );
        assert_eq!(
            builtin_list_type("spec", "ports"),
            ListType::Map(vec!["port".into(), "protocol".into()])
        );
        assert_eq!(builtin_list_type("spec", "tolerations"), ListType::Atomic);
    }

    #[test]
    fn version_ordering() {
        let mut v = vec!["v1alpha1", "v2", "v1beta2", "v1", "v1beta1"];
        v.sort_by_key(|x| std::cmp::Reverse(version_priority(x)));
        assert_eq!(v, ["v2", "v1", "v1beta2", "v1beta1", "v1alpha1"]);
    }
}
