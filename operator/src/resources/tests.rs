//! Unit and snapshot tests of the pure builders.

use super::*;
use crate::fixtures::{pool, with_public_keys};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use tether_crds::{NatsRoutingSpec, RoutingSpec, UpstreamSpec};

fn build(pool: &ConnectionPool) -> Desired {
    desired(pool, &Settings::default(), 1).expect("valid pool builds")
}

/// A pool whose routing runs on a NATS server the operator manages for it.
fn managed_nats_pool(name: &str) -> ConnectionPool {
    let mut p = pool(name);
    p.spec.routing = Some(RoutingSpec {
        nats: NatsRoutingSpec {
            url: None,
            managed: Some(true),
            auth: None,
            tls: None,
            replicas: None,
            resources: None,
        },
    });
    p
}

/// The pod template's spec of a StatefulSet.
fn template_spec(sts: &StatefulSet) -> &PodSpec {
    sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn pod_spec(d: &Desired) -> &PodSpec {
    template_spec(&d.stateful_set)
}

fn container(d: &Desired) -> &Container {
    &pod_spec(d).containers[0]
}

fn all_metas(d: &Desired) -> Vec<&kube::api::ObjectMeta> {
    let mut metas = vec![
        &d.config_map.metadata,
        &d.service_account.metadata,
        &d.role.metadata,
        &d.role_binding.metadata,
        &d.headless_service.metadata,
        &d.client_service.metadata,
        &d.api_service.metadata,
        &d.pdb.metadata,
        &d.stateful_set.metadata,
    ];
    if let Some((sts, svc)) = &d.nats {
        metas.push(&sts.metadata);
        metas.push(&svc.metadata);
    }
    metas
}

#[test]
fn every_object_is_owned_by_the_pool_and_labelled() {
    let p = managed_nats_pool("acme");
    let d = build(&p);
    let metas = all_metas(&d);
    assert_eq!(metas.len(), 11);
    for meta in metas {
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "ConnectionPool");
        assert_eq!(owners[0].api_version, "tether.dev/v1alpha1");
        assert_eq!(owners[0].uid, p.metadata.uid.clone().unwrap());
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("tenants"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[POOL_LABEL], "acme");
        assert_eq!(labels["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert_eq!(labels[TENANT_LABEL], "acme");
    }
}

#[test]
fn an_unsaved_pool_cannot_own_anything() {
    let mut p = pool("acme");
    p.metadata.uid = None;
    assert_eq!(
        desired(&p, &Settings::default(), 1),
        Err(SpecError::NotPersisted)
    );
}

#[test]
fn stateful_set_shape() {
    let mut p = pool("acme");
    p.spec.drain.deadline_seconds = 90;
    let d = desired(&p, &Settings::default(), 3).unwrap();
    let spec = d.stateful_set.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(spec.service_name.as_deref(), Some("acme-headless"));
    assert_eq!(
        spec.selector.match_labels.as_ref(),
        Some(&selector_labels(&p))
    );
    let pod = pod_spec(&d);
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(90 + GRACE_MARGIN_SECONDS)
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("acme-gateway"));
    let c = container(&d);
    assert_eq!(
        c.args.as_ref().unwrap(),
        &vec!["--config".to_string(), CONFIG_PATH.to_string()]
    );
    assert_eq!(
        c.image.as_deref(),
        Some(Settings::default().gateway_image.as_str())
    );
    let ports: Vec<_> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("ws".into(), WS_PORT),
            ("api".into(), API_PORT),
            ("probes".into(), PROBE_PORT)
        ]
    );
    let readiness = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    // Probes on their own port: a client holding the API port's cap cannot fail them.
    assert_eq!(
        readiness.port,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("probes".into())
    );
    let liveness = c
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(liveness.path.as_deref(), Some("/healthz"));
    let env = c.env.as_ref().unwrap();
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let var = env.iter().find(|v| v.name == name).unwrap();
        let field = var.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
        assert_eq!(field.field_path, path);
    }
    // The template carries the config hash, so a config change rolls the pods.
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION], d.config_hash);
}

#[test]
fn secrets_are_mounted_read_only_and_never_in_the_config_map() {
    let mut p = with_public_keys(pool("acme"));
    p.spec.routing = Some(RoutingSpec {
        nats: NatsRoutingSpec {
            url: Some("nats://bus:4222".into()),
            managed: None,
            auth: None,
            tls: None,
            replicas: None,
            resources: None,
        },
    });
    p.spec.upstream = Some(UpstreamSpec {
        url: "https://backend.example/events".into(),
        secret_ref: crate::fixtures::secret("acme-upstream", "hmac"),
        timeout_ms: 2000,
        events: vec![tether_crds::UpstreamEvent::Message],
    });
    let d = build(&p);
    let c = container(&d);
    let mounts = c.volume_mounts.as_ref().unwrap();
    for m in mounts {
        assert_eq!(m.read_only, Some(true), "{}", m.name);
    }
    let volumes = pod_spec(&d).volumes.as_ref().unwrap();
    let secret_names: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.secret.as_ref())
        .map(|s| s.secret_name.clone().unwrap())
        .collect();
    assert_eq!(
        secret_names,
        ["acme-jwt-keys", "acme-api-keys", "acme-upstream"]
    );

    let yaml = &d.config_map.data.as_ref().unwrap()["gateway.yaml"];
    let config = tether_config::GatewayConfig::from_yaml(yaml).expect("the gateway accepts it");
    assert_eq!(config, d.config);
    assert_eq!(
        config.auth.jwt.public_keys_file.as_deref(),
        Some(std::path::Path::new(
            "/etc/tether/secrets/jwt/public-keys.pem"
        ))
    );
    assert_eq!(config.auth.jwt.hs256_secret_file, None);
    assert_eq!(
        config.auth.jwt.issuer.as_deref(),
        Some("https://id.example")
    );
    assert_eq!(
        config.auth.api_keys_file.as_deref(),
        Some(std::path::Path::new("/etc/tether/secrets/api-keys/keys"))
    );
    let upstream = config.upstream.as_ref().unwrap();
    assert_eq!(
        upstream.secret_file.as_deref(),
        Some(std::path::Path::new("/etc/tether/secrets/upstream/hmac"))
    );
    assert_eq!(upstream.timeout_ms, 2000);
    assert_eq!(config.routing.nats.as_ref().unwrap().url, "nats://bus:4222");
    let status = config.status.as_ref().unwrap();
    assert_eq!(
        (status.namespace.as_str(), status.pool.as_str()),
        ("tenants", "acme")
    );
    // Each mounted file path is where the secret volume puts it.
    for mount in secret_mounts(&p) {
        let dir = format!("{SECRETS_DIR}/{}", mount.volume);
        assert!(mounts.iter().any(|m| m.mount_path == dir), "{dir}");
    }
    assert!(
        !yaml.contains("REPLACE"),
        "no secret material in the ConfigMap"
    );
}

#[test]
fn limits_map_onto_the_gateway_config() {
    let mut p = pool("acme");
    p.spec.limits.max_connections_per_pod = 1234;
    p.spec.limits.max_message_bytes = 4 * 1024 * 1024;
    p.spec.limits.messages_per_second_per_connection = 500;
    p.spec.limits.idle_timeout_seconds = 60;
    let config = gateway_config(&p).unwrap();
    assert_eq!(config.limits.max_connections, 1234);
    assert_eq!(config.limits.max_message_bytes, 4 * 1024 * 1024);
    // Raised so the gateway's own rules hold (burst >= rate, write buffer >= message).
    assert_eq!(config.limits.message_burst, 1000);
    assert!(config.limits.max_write_buffer_bytes >= 4 * 1024 * 1024);
    assert_eq!(config.limits.idle_timeout_seconds, 60);
    assert_eq!(config.tenant.as_deref(), Some("acme"));
}

#[test]
fn a_large_pools_pods_report_at_the_stretched_interval() {
    let mut p = pool("acme");
    p.spec.report_interval_seconds = 10;
    p.spec.max_reports_per_second = 20;
    p.spec.replicas.max = 100;
    let status = |p: &ConnectionPool| gateway_config(p).unwrap().status.unwrap();
    assert_eq!(status(&p).report_interval_seconds, 10);
    // The largest pool the CRD allows (800 pods) at 20 reports/s: each pod reports every
    // 40 s, and the operator judges staleness by the same interval (three of them).
    p.spec.replicas.max = tether_crds::MAX_POOL_PODS;
    assert_eq!(status(&p).report_interval_seconds, 40);
    assert_eq!(
        crate::scaling::Policy::from_spec(&p.spec).stale_after(),
        std::time::Duration::from_secs(120)
    );
}

#[test]
fn config_hash_changes_with_config_only() {
    let p = pool("acme");
    let one = desired(&p, &Settings::default(), 1).unwrap();
    let three = desired(&p, &Settings::default(), 3).unwrap();
    assert_eq!(one.config_hash, three.config_hash);
    assert_eq!(
        one.stateful_set.spec.as_ref().unwrap().template,
        three.stateful_set.spec.as_ref().unwrap().template,
        "a resize must not roll the pods"
    );
    let mut q = p.clone();
    q.spec.limits.outbound_queue = 128;
    let changed = build(&q);
    assert_ne!(one.config_hash, changed.config_hash);
}

#[test]
fn gateway_rbac_is_limited_to_the_pools_own_status() {
    let d = build(&pool("acme"));
    let rules = d.role.rules.as_ref().unwrap();
    assert_eq!(rules.len(), 2);
    // Reading (and watching) its own Pod object, for the operator's instructions; never
    // the pool, which every pod writes.
    assert_eq!(
        rules[1].resources.as_deref(),
        Some(&["pods".to_string()][..])
    );
    assert_eq!(rules[1].api_groups.as_deref(), Some(&["".to_string()][..]));
    assert_eq!(
        rules[1].resource_names.as_deref(),
        Some(&["acme-0".to_string()][..]),
        "the pool's own pods by name (replicas.max = 1)"
    );
    assert_eq!(rules[1].verbs, ["get", "list", "watch"]);
    assert!(
        !rules
            .iter()
            .any(|r| r.resources.as_deref() == Some(&["connectionpools".to_string()][..])),
        "gateways do not read the shared pool object"
    );
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["connectionpools/status".to_string()][..])
    );
    assert_eq!(
        rules[0].resource_names.as_deref(),
        Some(&["acme".to_string()][..])
    );
    assert_eq!(rules[0].verbs, ["get", "patch"]);
    assert_eq!(d.role_binding.role_ref.name, "acme-gateway");
    let subject = &d.role_binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", "acme-gateway")
    );
}

#[test]
fn services_split_public_and_internal_ports() {
    let mut p = pool("acme");
    p.spec.service.type_ = ServiceType::LoadBalancer;
    p.spec.service.annotations = Some([("lb".to_string(), "nlb".to_string())].into());
    let d = build(&p);
    let client = d.client_service.spec.as_ref().unwrap();
    assert_eq!(client.type_.as_deref(), Some("LoadBalancer"));
    let client_ports: Vec<_> = client
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(
        client_ports,
        [WS_PORT],
        "the push API never rides on the public Service"
    );
    assert_eq!(
        d.client_service.metadata.annotations.as_ref().unwrap()["lb"],
        "nlb"
    );
    let api = d.api_service.spec.as_ref().unwrap();
    assert_eq!(api.type_.as_deref(), Some("ClusterIP"));
    let headless = d.headless_service.spec.as_ref().unwrap();
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    let pdb = d.pdb.spec.as_ref().unwrap();
    assert_eq!(
        pdb.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("10%".into()))
    );
}

#[test]
fn managed_nats_gets_its_own_server() {
    let p = managed_nats_pool("acme");
    let d = build(&p);
    let (sts, svc) = d.nats.as_ref().unwrap();
    assert_eq!(sts.metadata.name.as_deref(), Some("acme-nats"));
    assert_eq!(svc.metadata.name.as_deref(), Some("acme-nats"));
    let selector = sts
        .spec
        .as_ref()
        .unwrap()
        .selector
        .match_labels
        .clone()
        .unwrap();
    let pod_labels = sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert!(
        selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "selector matches the pods"
    );
    assert_eq!(
        svc.spec.as_ref().unwrap().selector.as_ref(),
        Some(&selector)
    );
    assert_eq!(
        d.config.routing.nats.as_ref().unwrap().url,
        "nats://acme-nats.tenants.svc:4222"
    );
    assert!(build(&pool("acme")).nats.is_none());
}

/// Issue 21: two pools with one tenant on one bus are kept apart by the pool's identity
/// (namespace/name), which the gateway encodes into every subject, bucket and stream.
#[test]
fn the_bus_namespace_is_the_pools_namespace_and_name_not_its_tenant() {
    let a = managed_nats_pool("web-a");
    let b = managed_nats_pool("web-b");
    assert_eq!(a.spec.tenant, b.spec.tenant, "one tenant");
    let ns = |p: &ConnectionPool| {
        build(p)
            .config
            .routing
            .nats
            .as_ref()
            .unwrap()
            .namespace
            .clone()
            .unwrap()
    };
    assert_eq!(ns(&a), "tenants/web-a");
    assert_ne!(ns(&a), ns(&b));
    // The probe port the rendered probes use is the one the config opens.
    assert_eq!(
        build(&a).config.listen.probes.as_deref(),
        Some(format!("0.0.0.0:{PROBE_PORT}").as_str())
    );
}

#[test]
fn template_knobs_reach_the_pod() {
    let mut p: ConnectionPool = pool("acme");
    p.spec.template = serde_json::from_value(serde_json::json!({
        "image": "registry.example/gw:1.2.3",
        "imagePullPolicy": "Always",
        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}},
        "nodeSelector": {"pool": "edge"},
        "tolerations": [{"key": "dedicated", "operator": "Exists"}],
        "env": [{"name": "RUST_LOG", "value": "debug"}],
        "annotations": {"mesh": "off"},
    }))
    .unwrap();
    let d = build(&p);
    let c = container(&d);
    assert_eq!(c.image.as_deref(), Some("registry.example/gw:1.2.3"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert!(
        c.resources
            .as_ref()
            .unwrap()
            .requests
            .as_ref()
            .unwrap()
            .contains_key("cpu")
    );
    assert!(c.env.as_ref().unwrap().iter().any(|v| v.name == "RUST_LOG"));
    let pod = pod_spec(&d);
    assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "edge");
    assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    let annotations = d
        .stateful_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["mesh"], "off");
    assert!(annotations.contains_key(CONFIG_HASH_ANNOTATION));
}

/// Snapshot of every object of the minimal pool. A deliberate change to the builders is
/// recorded with `UPDATE_SNAPSHOTS=1 cargo test -p tether-operator`; the diff shows up in
/// review.
#[test]
fn snapshot_of_the_minimal_pool() {
    let d = build(&pool("acme"));
    let mut docs = vec![
        serde_yaml::to_string(&d.config_map).unwrap(),
        serde_yaml::to_string(&d.service_account).unwrap(),
        serde_yaml::to_string(&d.role).unwrap(),
        serde_yaml::to_string(&d.role_binding).unwrap(),
        serde_yaml::to_string(&d.headless_service).unwrap(),
        serde_yaml::to_string(&d.client_service).unwrap(),
        serde_yaml::to_string(&d.api_service).unwrap(),
        serde_yaml::to_string(&d.pdb).unwrap(),
        serde_yaml::to_string(&d.stateful_set).unwrap(),
    ];
    // The default image carries the crate version; pin it so a release does not churn.
    for doc in &mut docs {
        *doc = doc.replace(env!("CARGO_PKG_VERSION"), "VERSION");
    }
    let got = docs.join("---\n");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/snapshots/minimal-pool.yaml");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "objects of the minimal pool changed; review and record with UPDATE_SNAPSHOTS=1\n--- got ---\n{got}"
    );
}

#[test]
fn nats_credentials_and_tls_are_mounted_and_rendered_as_paths() {
    let mut p = pool("acme");
    p.spec.routing = Some(RoutingSpec {
        nats: NatsRoutingSpec {
            url: Some("tls://bus:4222".into()),
            managed: None,
            auth: Some(tether_crds::NatsAuthSpec {
                user: Some("acme".into()),
                password_secret_ref: Some(crate::fixtures::secret("acme-nats", "password")),
                ..Default::default()
            }),
            tls: Some(tether_crds::NatsTlsSpec {
                ca_secret_ref: Some(crate::fixtures::secret("acme-nats", "ca.crt")),
                ..Default::default()
            }),
            replicas: None,
            resources: None,
        },
    });
    let d = build(&p);
    let volumes = pod_spec(&d).volumes.as_ref().unwrap();
    let nats_volumes: Vec<_> = volumes
        .iter()
        .filter(|v| v.name.starts_with("secret-nats"))
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(nats_volumes, ["secret-nats-password", "secret-nats-ca"]);
    let yaml = &d.config_map.data.as_ref().unwrap()["gateway.yaml"];
    assert!(
        !yaml.contains("acme-nats"),
        "no Secret content or name in the ConfigMap"
    );
    let config = tether_config::GatewayConfig::from_yaml(yaml).expect("the gateway accepts it");
    let nats = config.routing.nats.unwrap();
    assert_eq!(nats.auth.user.as_deref(), Some("acme"));
    assert_eq!(
        nats.auth.password_file.as_deref(),
        Some(std::path::Path::new(
            "/etc/tether/secrets/nats-password/password"
        ))
    );
    assert_eq!(
        nats.tls.unwrap().ca_file.as_deref(),
        Some(std::path::Path::new("/etc/tether/secrets/nats-ca/ca.pem"))
    );
}

#[test]
fn network_policies_keep_neighbours_off_the_push_api_and_the_bus() {
    let p = pool("acme");
    let gw = gateway_network_policy(&p).unwrap();
    let spec = gw.spec.as_ref().unwrap();
    assert_eq!(
        spec.policy_types.as_deref(),
        Some(&["Ingress".to_string()][..])
    );
    assert_eq!(
        spec.pod_selector.as_ref().unwrap().match_labels.as_ref(),
        Some(&selector_labels(&p))
    );
    let rules = spec.ingress.as_ref().unwrap();
    let port_of = |r: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        r.ports.as_ref().unwrap()[0].port.clone().unwrap()
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    // Agents: the WebSocket port from anywhere.
    assert_eq!(port_of(&rules[0]), IntOrString::Int(WS_PORT));
    assert!(rules[0].from.is_none());
    // The push API: only the pool's pods and labelled clients in the namespace.
    assert_eq!(port_of(&rules[1]), IntOrString::Int(API_PORT));
    let from = rules[1].from.as_ref().unwrap();
    assert_eq!(from.len(), 2);
    for peer in from {
        assert!(peer.namespace_selector.is_none() && peer.ip_block.is_none());
    }
    assert_eq!(
        from[1]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()[API_CLIENT_LABEL],
        "acme"
    );
    assert_eq!(rules.len(), 2, "no other port is open");

    let nats = nats_network_policy(&p).unwrap();
    let rules = nats.spec.as_ref().unwrap().ingress.clone().unwrap();
    // The client port from the gateways, the route port only from the NATS servers.
    assert_eq!(rules.len(), 2);
    assert_eq!(port_of(&rules[0]), IntOrString::Int(NATS_PORT));
    assert_eq!(port_of(&rules[1]), IntOrString::Int(NATS_CLUSTER_PORT));
    assert_eq!(
        rules[0].from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref(),
        Some(&selector_labels(&p))
    );
    for policy in [&gw, &nats] {
        assert_eq!(policy.metadata.owner_references.as_ref().unwrap().len(), 1);
    }
}

/// The managed NATS server's container.
fn nats_container(sts: &StatefulSet) -> &Container {
    &template_spec(sts).containers[0]
}

#[test]
fn a_managed_nats_with_auth_requires_the_pools_credentials() {
    let mut p = pool("acme");
    p.spec.routing = Some(RoutingSpec {
        nats: NatsRoutingSpec {
            url: None,
            managed: Some(true),
            auth: Some(tether_crds::NatsAuthSpec {
                user: Some("acme".into()),
                password_secret_ref: Some(crate::fixtures::secret("acme-nats", "password")),
                ..Default::default()
            }),
            tls: None,
            replicas: None,
            resources: None,
        },
    });
    let d = build(&p);
    let (sts, _) = d.nats.as_ref().unwrap();
    let nats = nats_container(sts);
    // Credentials live in the configuration file by reference, not on the command line.
    let args = nats.args.as_ref().unwrap();
    assert!(
        !args
            .iter()
            .any(|a| a.contains("NATS_PASSWORD") || a == "--user")
    );
    let conf = &d.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY];
    assert!(
        conf.contains("authorization {\n  user: \"acme\"\n  password: $NATS_PASSWORD\n}"),
        "{conf}"
    );
    // POD_NAME comes first (the server's name in a cluster); then the credentials.
    let env = nats
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NATS_PASSWORD")
        .expect("NATS_PASSWORD from the Secret");
    let source = env
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (source.name.as_str(), source.key.as_str()),
        ("acme-nats", "password")
    );
    // The gateways present the same credentials to it.
    let nats_config = d.config.routing.nats.as_ref().unwrap();
    assert_eq!(nats_config.auth.user.as_deref(), Some("acme"));
    assert!(nats_config.auth.password_file.is_some());
}

#[test]
fn a_managed_nats_without_auth_never_runs_open() {
    let mut p = managed_nats_pool("acme");
    assert!(generates_nats_token(&p));
    let d = build(&p);
    let (sts, _) = d.nats.as_ref().unwrap();
    let nats = nats_container(sts);
    let args = nats.args.as_ref().unwrap();
    assert!(
        !args
            .iter()
            .any(|a| a.contains("NATS_TOKEN") || a == "--auth")
    );
    let conf = &d.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY];
    assert!(conf.contains("token: $NATS_TOKEN"), "{conf}");
    let source = nats
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "NATS_TOKEN")
        .expect("NATS_TOKEN from the Secret")
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .clone()
        .unwrap();
    assert_eq!(
        (source.name.as_str(), source.key.as_str()),
        ("acme-nats-auth", NATS_TOKEN_KEY)
    );
    // The gateways present the generated token, mounted like any Secret.
    let nats_config = d.config.routing.nats.as_ref().unwrap();
    assert!(nats_config.auth.token_file.is_some());
    assert!(
        secret_mounts(&p)
            .iter()
            .any(|m| m.source.name == "acme-nats-auth")
    );
    // The Secret the operator creates for it is owned by the pool.
    let secret = nats_token_secret(&p, "00ff").unwrap();
    assert_eq!(secret.metadata.name.as_deref(), Some("acme-nats-auth"));
    assert_eq!(
        secret.metadata.owner_references.as_ref().unwrap()[0].kind,
        "ConnectionPool"
    );
    assert_eq!(secret.string_data.as_ref().unwrap()[NATS_TOKEN_KEY], "00ff");
    // An external NATS or explicit credentials: nothing generated.
    p.spec.routing.as_mut().unwrap().nats.managed = None;
    p.spec.routing.as_mut().unwrap().nats.url = Some("nats://nats:4222".into());
    assert!(!generates_nats_token(&p));
}

#[test]
fn delivery_renders_the_durable_queue_and_sizes_the_managed_nats_volume() {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut p = managed_nats_pool("acme");
    // Without `delivery`: direct only, JetStream in an emptyDir, no delivery section.
    let d = build(&p);
    assert_eq!(d.config.delivery, tether_config::DeliveryConfig::default());
    assert!(!d.config.to_yaml().contains("delivery"));
    let (sts, _) = d.nats.as_ref().unwrap();
    let spec = sts.spec.as_ref().unwrap();
    assert!(spec.volume_claim_templates.is_none());
    let volumes = spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap();
    assert!(volumes[0].empty_dir.is_some());

    p.spec.delivery = Some(tether_crds::DeliverySpec {
        mode: tether_crds::DeliveryMode::Durable,
        max_age_seconds: 3600,
        max_messages_per_agent: 50,
        max_bytes: 1 << 30,
        replicas: 1,
        storage: Some(Quantity("10Gi".into())),
    });
    let d = build(&p);
    assert_eq!(d.config.delivery.mode, tether_config::DeliveryMode::Durable);
    let durable = d.config.delivery.durable.as_ref().unwrap();
    assert_eq!(
        (
            durable.max_age_seconds,
            durable.max_messages_per_agent,
            durable.max_bytes,
            durable.replicas
        ),
        (3600, 50, 1 << 30, 1)
    );
    d.config.validate().unwrap();
    let (sts, _) = d.nats.as_ref().unwrap();
    let spec = sts.spec.as_ref().unwrap();
    let claims = spec.volume_claim_templates.as_ref().unwrap();
    assert_eq!(claims[0].metadata.name.as_deref(), Some("data"));
    let requests = claims[0]
        .spec
        .as_ref()
        .unwrap()
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(requests["storage"], Quantity("10Gi".into()));
    // The claim template is the data volume; only the config file stays a volume.
    let volumes = spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap();
    assert_eq!(
        volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["config"]
    );
    let mount = &nats_container(sts).volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (mount.name.as_str(), mount.mount_path.as_str()),
        ("data", "/data")
    );
}

/// Issue 21: a managed NATS carries the pool's largest message: its `max_payload`
/// (a config file from the pool's ConfigMap; flags cannot set it) follows
/// `limits.maxMessageBytes` plus the envelope, and a real nats-server accepts the file.
#[test]
fn a_managed_nats_carries_the_pools_largest_message() {
    let mut p = managed_nats_pool("big");
    p.spec.limits.max_message_bytes = 4 * 1024 * 1024;
    let d = build(&p);
    let conf = d
        .config_map
        .data
        .as_ref()
        .unwrap()
        .get(NATS_CONFIG_KEY)
        .unwrap()
        .clone();
    let expected = 4 * 1024 * 1024 + NATS_ENVELOPE_BYTES;
    assert!(
        conf.starts_with(&format!("max_payload: {expected}\n")),
        "{conf}"
    );
    let (sts, _) = d.nats.as_ref().unwrap();
    let nats = nats_container(sts);
    let args = nats.args.as_ref().unwrap();
    let at = args.iter().position(|a| a == "--config").unwrap();
    assert_eq!(args[at + 1], "/etc/nats/nats.conf");
    let mounts = nats.volume_mounts.as_ref().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "config" && m.mount_path == "/etc/nats")
    );
    let volumes = template_spec(sts).volumes.as_ref().unwrap();
    let config = volumes.iter().find(|v| v.name == "config").unwrap();
    assert_eq!(
        config.config_map.as_ref().unwrap().name,
        config_map_name(&p)
    );
    // A new limit rolls the server.
    let annotations = sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION], config_hash(&conf));
    // The real server accepts the rendered file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nats.conf");
    std::fs::write(&file, &conf).unwrap();
    let binary = tether_test_support::nats_server_binary().unwrap();
    let check = std::process::Command::new(binary)
        .arg("-c")
        .arg(&file)
        .arg("-t")
        .env("NATS_TOKEN", "token-from-the-secret")
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");

    // Small limits keep NATS's default (1 MiB); pools without a managed NATS get no file.
    let small = build(&managed_nats_pool("small"));
    assert!(
        small.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY]
            .starts_with("max_payload: 1048576\n")
    );
    assert!(
        !build(&pool("plain"))
            .config_map
            .data
            .as_ref()
            .unwrap()
            .contains_key(NATS_CONFIG_KEY)
    );
}

/// Issue 21: the managed NATS's token is not on its command line; a real nats-server
/// reads it from the environment through the rendered file and refuses a client
/// without it.
#[test]
fn a_real_nats_server_takes_its_token_from_the_rendered_file_and_env() {
    use std::io::{BufRead, BufReader, Write};
    let d = build(&managed_nats_pool("acme"));
    let conf = d.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY].clone();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nats.conf");
    std::fs::write(&file, &conf).unwrap();
    let port = tether_test_support::free_port();
    let mut server = std::process::Command::new(tether_test_support::nats_server_binary().unwrap())
        .args([
            "-c",
            file.to_str().unwrap(),
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("NATS_TOKEN", "s3cret-token-from-the-secret")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let connect = |token: &str| -> String {
        let stream = (0..200)
            .find_map(|_| {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .or_else(|| {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        None
                    })
            })
            .expect("nats-server listens");
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut info = String::new();
        reader.read_line(&mut info).unwrap();
        assert!(info.contains("\"auth_required\":true"), "{info}");
        let mut writer = stream;
        writeln!(
            writer,
            "CONNECT {{\"verbose\":true,\"auth_token\":\"{token}\"}}\r\nPING\r"
        )
        .unwrap();
        let mut answer = String::new();
        reader.read_line(&mut answer).unwrap();
        answer
    };
    let accepted = connect("s3cret-token-from-the-secret");
    let refused = connect("wrong");
    let _ = server.kill();
    let _ = server.wait();
    assert!(accepted.starts_with("+OK"), "{accepted}");
    assert!(refused.contains("Authorization Violation"), "{refused}");
}

#[test]
fn image_pull_secrets_reach_the_gateway_and_managed_nats_pods() {
    let mut p = managed_nats_pool("acme");
    p.spec.template = serde_json::from_value(serde_json::json!({
        "image": "registry.internal/tether-gateway:1.2.3",
        "imagePullSecrets": [{"name": "registry-creds"}],
    }))
    .unwrap();
    let d = build(&p);
    let names = |pod: &PodSpec| -> Vec<String> {
        pod.image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.clone())
            .collect()
    };
    assert_eq!(names(pod_spec(&d)), ["registry-creds"]);
    let nats = d.nats.as_ref().expect("a managed NATS");
    assert_eq!(names(template_spec(&nats.0)), ["registry-creds"]);
    // Without the field, no pod spec names one.
    let plain = build(&pool("acme"));
    assert!(pod_spec(&plain).image_pull_secrets.is_none());
}

#[test]
fn api_allowed_from_admits_backends_in_other_namespaces() {
    let mut p = pool("acme");
    p.spec.api = Some(
        serde_json::from_value(serde_json::json!({"allowedFrom": [
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "backends"}}},
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
        ]}))
        .unwrap(),
    );
    let gw = gateway_network_policy(&p).unwrap();
    let rules = gw.spec.unwrap().ingress.unwrap();
    assert_eq!(rules.len(), 2, "still only the two ports");
    let from = rules[1].from.clone().unwrap();
    assert_eq!(
        from.len(),
        4,
        "the pool's pods, labelled clients, and the two peers"
    );
    let labels = |s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>| {
        s.as_ref()
            .and_then(|s| s.match_labels.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        labels(&from[2].namespace_selector)["kubernetes.io/metadata.name"],
        "backends"
    );
    assert!(
        from[2].pod_selector.is_none(),
        "every pod of that namespace"
    );
    assert_eq!(
        labels(&from[3].namespace_selector)["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(
        labels(&from[3].pod_selector)["app.kubernetes.io/name"],
        "prometheus",
        "both selectors in one peer: those pods of those namespaces"
    );
    // The WebSocket rule is unchanged.
    assert!(rules[0].from.is_none());
}

#[test]
fn gateway_tls_mounts_the_secret_read_only_and_renders_the_paths() {
    let plain = build(&pool("acme"));
    let plain_yaml = &plain.config_map.data.as_ref().unwrap()["gateway.yaml"];
    let plain_config = tether_config::GatewayConfig::from_yaml(plain_yaml).unwrap();
    assert_eq!(plain_config.listen.tls, None);

    let mut p = pool("acme");
    p.spec.tls = Some(tether_crds::GatewayTlsSpec {
        secret_ref: tether_crds::SecretNameRef {
            name: "acme-gateway-tls".into(),
        },
    });
    let d = build(&p);
    let volumes = pod_spec(&d).volumes.as_ref().unwrap();
    for (volume, key) in [
        ("secret-tls-cert", "tls.crt"),
        ("secret-tls-key", "tls.key"),
    ] {
        let v = volumes.iter().find(|v| v.name == volume).unwrap();
        let secret = v.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("acme-gateway-tls"));
        let items = secret.items.as_ref().unwrap();
        assert_eq!((items[0].key.as_str(), items[0].path.as_str()), (key, key));
        let mount = container(&d)
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == volume)
            .unwrap();
        assert_eq!(mount.read_only, Some(true));
        // A directory, not a subPath: the kubelet's updates reach the gateway.
        assert_eq!(mount.sub_path, None);
    }
    let yaml = &d.config_map.data.as_ref().unwrap()["gateway.yaml"];
    assert!(
        !yaml.contains("acme-gateway-tls"),
        "no Secret name in the ConfigMap"
    );
    let config = tether_config::GatewayConfig::from_yaml(yaml).expect("the gateway accepts it");
    let tls = config.listen.tls.unwrap();
    assert_eq!(
        tls.cert_file,
        std::path::Path::new("/etc/tether/secrets/tls-cert/tls.crt")
    );
    assert_eq!(
        tls.key_file,
        std::path::Path::new("/etc/tether/secrets/tls-key/tls.key")
    );
    // The pods roll when TLS is switched on (the config's hash changes).
    assert_ne!(plain.config_hash, d.config_hash);
    // Both keys are checked like every referenced Secret key.
    let fields: Vec<_> = secret_mounts(&p)
        .into_iter()
        .filter(|m| m.source.name == "acme-gateway-tls")
        .map(|m| (m.source.key, m.field))
        .collect();
    assert_eq!(
        fields,
        [
            ("tls.crt".to_string(), "tls.secretRef (tls.crt)"),
            ("tls.key".to_string(), "tls.secretRef (tls.key)")
        ]
    );
}

/// The managed NATS reads its file only at start: a change of credentials (not only of
/// the limit) must change its pod template, or it keeps refusing the gateways' new ones.
#[test]
fn a_managed_nats_rolls_when_its_file_changes() {
    let nats_hash = |p: &ConnectionPool| {
        let d = build(p);
        let (sts, _) = d.nats.unwrap();
        sts.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[CONFIG_HASH_ANNOTATION]
            .clone()
    };
    let token = managed_nats_pool("acme");
    let mut user = managed_nats_pool("acme");
    user.spec.routing.as_mut().unwrap().nats.auth = Some(tether_crds::NatsAuthSpec {
        user: Some("gateway".into()),
        password_secret_ref: Some(SecretKeyRef {
            name: "nats-user".into(),
            key: "password".into(),
        }),
        ..Default::default()
    });
    let mut bigger = managed_nats_pool("acme");
    bigger.spec.limits.max_message_bytes = 4 * 1024 * 1024;
    assert_eq!(nats_hash(&token), nats_hash(&managed_nats_pool("acme")));
    assert_ne!(nats_hash(&token), nats_hash(&user), "new credentials");
    assert_ne!(nats_hash(&token), nats_hash(&bigger), "a new limit");
}

#[test]
fn gateway_pods_get_requests_and_a_memory_limit_from_the_sizing_by_default() {
    let d = build(&pool("acme"));
    let r = container(&d).resources.clone().unwrap();
    let requests = r.requests.unwrap();
    let limits = r.limits.unwrap();
    // Defaults: target 10,000, max 20,000 connections per pod.
    // 64 MiB + 10,000 × 4.5 KiB = 107.9 MiB; 64 MiB + 20,000 × 18 KiB = 415.6 MiB;
    // 10,000 × 50 µs = 500m.
    assert_eq!(requests["memory"].0, "108Mi");
    assert_eq!(requests["cpu"].0, "500m");
    assert_eq!(limits["memory"].0, "416Mi");
    assert!(
        !limits.contains_key("cpu"),
        "no CPU limit: a throttled gateway misses pings"
    );

    // They follow the pool's own limits.
    let mut big = pool("big");
    big.spec.scaling.target_connections_per_pod = 40_000;
    big.spec.limits.max_connections_per_pod = 60_000;
    let r = container(&build(&big)).resources.clone().unwrap();
    assert_eq!(r.requests.as_ref().unwrap()["cpu"].0, "2000m");
    assert_eq!(r.requests.as_ref().unwrap()["memory"].0, "240Mi");
    assert_eq!(r.limits.as_ref().unwrap()["memory"].0, "1119Mi");
    let mut small = pool("small");
    small.spec.scaling.target_connections_per_pod = 100;
    let r = container(&build(&small)).resources.clone().unwrap();
    assert_eq!(
        r.requests.as_ref().unwrap()["cpu"].0,
        "100m",
        "at least 100m"
    );
}

#[test]
fn given_resources_replace_the_defaults_whole() {
    let mut p = pool("acme");
    p.spec.template.resources =
        Some(serde_json::from_value(serde_json::json!({"requests": {"memory": "1Gi"}})).unwrap());
    let r = container(&build(&p)).resources.clone().unwrap();
    assert_eq!(r.requests.as_ref().unwrap()["memory"].0, "1Gi");
    assert!(!r.requests.as_ref().unwrap().contains_key("cpu"));
    assert!(r.limits.is_none());
}

#[test]
fn gateway_pods_spread_over_zones_and_nodes_by_default() {
    let p = pool("acme");
    let d = build(&p);
    let spread = pod_spec(&d).topology_spread_constraints.clone().unwrap();
    let keys: Vec<&str> = spread.iter().map(|c| c.topology_key.as_str()).collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    for c in &spread {
        assert_eq!(c.max_skew, 1);
        assert_eq!(c.when_unsatisfiable, "ScheduleAnyway");
        assert_eq!(
            c.label_selector.as_ref().unwrap().match_labels.as_ref(),
            Some(&selector_labels(&p)),
            "the pool's own pods only"
        );
    }
    assert_eq!(pod_spec(&d).priority_class_name, None);
}

#[test]
fn given_spread_constraints_replace_the_defaults_and_get_the_pools_selector() {
    let mut p = pool("acme");
    p.spec.template = serde_json::from_value(serde_json::json!({
        "topologySpreadConstraints": [{
            "maxSkew": 2, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
        }, {
            "maxSkew": 1, "topologyKey": "rack",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"team": "edge"}},
        }],
        "priorityClassName": "tether-gateways",
    }))
    .unwrap();
    let d = build(&p);
    let spread = pod_spec(&d).topology_spread_constraints.clone().unwrap();
    assert_eq!(spread.len(), 2);
    assert_eq!(spread[0].max_skew, 2);
    assert_eq!(spread[0].when_unsatisfiable, "DoNotSchedule");
    assert_eq!(
        spread[0]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref(),
        Some(&selector_labels(&p))
    );
    assert_eq!(
        spread[1]
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["team"],
        "edge",
        "a given selector is kept"
    );
    assert_eq!(
        pod_spec(&d).priority_class_name.as_deref(),
        Some("tether-gateways")
    );

    // An empty list turns spreading off.
    p.spec.template.topology_spread_constraints = Some(vec![]);
    assert_eq!(pod_spec(&build(&p)).topology_spread_constraints, None);
}

#[test]
fn the_disruption_budget_is_a_share_of_the_pool_and_lets_unhealthy_pods_go() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let mut p = pool("acme");
    let spec = build(&p).pdb.spec.unwrap();
    assert_eq!(
        spec.max_unavailable,
        Some(IntOrString::String("10%".into()))
    );
    assert_eq!(spec.min_available, None);
    assert_eq!(
        spec.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    p.spec.disruption.max_unavailable = IntOrString::Int(3);
    let spec = build(&p).pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(3)));
    // A count written as a string passes the CRD's rule; the API server's
    // PodDisruptionBudget validation would refuse it as a string, so it goes out a number.
    p.spec.disruption.max_unavailable = IntOrString::String("2".into());
    let spec = build(&p).pdb.spec.unwrap();
    assert_eq!(spec.max_unavailable, Some(IntOrString::Int(2)));
}

/// Issue 22: a managed NATS of three servers is a cluster the pool survives one
/// server of: routes by stable DNS names, every server listed to the gateways, three
/// copies of the directory and the durable stream, one server away at a time, servers
/// apart, and requests and limits by default.
#[test]
fn a_managed_nats_of_three_is_a_cluster_with_replicated_streams() {
    let mut p = managed_nats_pool("acme");
    p.spec.replicas.max = 4;
    p.spec.routing.as_mut().unwrap().nats.replicas = Some(3);
    p.spec.delivery = Some(serde_json::from_value(serde_json::json!({"storage": "10Gi"})).unwrap());
    let d = build(&p);
    let (sts, _) = d.nats.as_ref().unwrap();
    let spec = sts.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(spec.service_name.as_deref(), Some("acme-nats-cluster"));
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));

    let hosts: Vec<String> = (0..3)
        .map(|i| format!("acme-nats-{i}.acme-nats-cluster.tenants.svc"))
        .collect();
    let nats = d.config.routing.nats.as_ref().unwrap();
    let urls: Vec<String> = hosts.iter().map(|h| format!("nats://{h}:4222")).collect();
    assert_eq!(nats.url, urls.join(","), "every server, so one may go away");
    assert_eq!(nats.replicas, Some(3), "the directory on three servers");
    assert_eq!(d.config.delivery.durable.as_ref().unwrap().replicas, 3);

    let conf = &d.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY];
    assert!(conf.contains("server_name: $POD_NAME"), "{conf}");
    for host in &hosts {
        assert!(conf.contains(&format!("nats://{host}:6222")), "{conf}");
    }
    let container = nats_container(sts);
    let env = container.env.as_ref().unwrap();
    assert!(env.iter().any(|e| {
        e.name == "POD_NAME"
            && e.value_from
                .as_ref()
                .unwrap()
                .field_ref
                .as_ref()
                .unwrap()
                .field_path
                == "metadata.name"
    }));
    let ports: Vec<i32> = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| p.container_port)
        .collect();
    assert!(ports.contains(&NATS_CLUSTER_PORT));

    // Defaults: requests for scheduling and quotas, a memory limit, no CPU limit.
    let resources = container.resources.as_ref().unwrap();
    let requests = resources.requests.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "100m");
    assert_eq!(requests["memory"].0, "256Mi");
    let limits = resources.limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "1Gi");
    assert!(!limits.contains_key("cpu"));

    let anti = template_spec(sts)
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap()
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap();
    assert_eq!(
        anti[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    assert_eq!(
        anti[0]
            .pod_affinity_term
            .label_selector
            .as_ref()
            .unwrap()
            .match_labels,
        spec.selector.match_labels
    );

    let pdb = d.nats_pdb.as_ref().unwrap();
    assert_eq!(pdb.metadata.name.as_deref(), Some("acme-nats"));
    let pdb_spec = pdb.spec.as_ref().unwrap();
    assert_eq!(
        pdb_spec.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        pdb_spec.selector.as_ref().unwrap().match_labels,
        spec.selector.match_labels
    );

    let headless = d.nats_cluster_service.as_ref().unwrap();
    let headless_spec = headless.spec.as_ref().unwrap();
    assert_eq!(headless_spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless_spec.publish_not_ready_addresses, Some(true));
    assert_eq!(headless_spec.selector, spec.selector.match_labels);

    // The servers reach each other's route port; nothing else does.
    let policy = d.nats_policy.as_ref().unwrap();
    let rules = policy.spec.as_ref().unwrap().ingress.as_ref().unwrap();
    let route_rule = rules
        .iter()
        .find(|r| {
            r.ports.as_ref().unwrap()[0].port
                == Some(
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
                        NATS_CLUSTER_PORT,
                    ),
                )
        })
        .expect("a rule for the route port");
    assert_eq!(
        route_rule.from.as_ref().unwrap()[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels,
        spec.selector.match_labels
    );
}

#[test]
fn a_single_managed_nats_keeps_one_server_and_takes_resources_from_the_spec() {
    let mut p = managed_nats_pool("acme");
    p.spec.routing.as_mut().unwrap().nats.resources = Some(
        serde_json::from_value(serde_json::json!({"requests": {"cpu": "1", "memory": "2Gi"}}))
            .unwrap(),
    );
    p.spec.delivery = Some(serde_json::from_value(serde_json::json!({})).unwrap());
    let d = build(&p);
    let (sts, _) = d.nats.as_ref().unwrap();
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(1));
    let nats = d.config.routing.nats.as_ref().unwrap();
    assert_eq!(nats.url, "nats://acme-nats.tenants.svc:4222");
    assert_eq!(nats.replicas, None);
    assert_eq!(d.config.delivery.durable.as_ref().unwrap().replicas, 1);
    let conf = &d.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY];
    assert!(!conf.contains("cluster"), "{conf}");
    let resources = nats_container(sts).resources.as_ref().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["memory"].0, "2Gi");
    assert!(
        resources.limits.is_none(),
        "the spec's resources replace the defaults"
    );
    // An existing NATS gets no server, no PDB and no headless Service.
    let external = build(&pool("acme"));
    assert!(external.nats_pdb.is_none() && external.nats_cluster_service.is_none());
}
