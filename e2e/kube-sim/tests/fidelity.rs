//! Conformance: what a real API server refuses, refused the same way — strict decoding of
//! built-in kinds, immutable fields (StatefulSet, Service, PVC) on every write path,
//! etcd's object size limit and the request body limit, and a watcher that stops
//! reading closed after a bound while the others keep receiving.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tether_kube_sim::Server;

fn sts(name: &str, service: &str, storage: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1, "serviceName": service,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "gw", "image": "gw:1"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}}}]
        }
    })
}

/// A raw request: (status, Warning headers, body).
async fn send(
    sim: &Server,
    method: reqwest::Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Vec<String>, Value) {
    let resp = reqwest::Client::new()
        .request(method, format!("{}{path}", sim.url()))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let warnings = resp
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    let body = resp.json().await.unwrap_or(Value::Null);
    (code, warnings, body)
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("not an API error: {other}"),
    }
}

const STS_MESSAGE: &str = "StatefulSet.apps \"web\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden";

#[tokio::test]
async fn statefulset_immutable_fields_are_refused_on_every_write_path() {
    let sim = Server::start().await.unwrap();
    let api: Api<StatefulSet> = Api::default_namespaced(sim.client().unwrap());
    let ssa = PatchParams::apply("op");
    api.patch("web", &ssa, &Patch::Apply(sts("web", "web-h", "1Gi")))
        .await
        .unwrap();
    // Apply, merge patch, strategic patch, JSON patch, PUT: each is refused with 422.
    let e = api
        .patch("web", &ssa, &Patch::Apply(sts("web", "web-h", "2Gi")))
        .await
        .unwrap_err();
    let e = api_err(e);
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(e.message, STS_MESSAGE);
    for patch in [
        Patch::Merge(json!({"spec": {"serviceName": "other"}})),
        Patch::Strategic(json!({"spec": {"selector": {"matchLabels": {"app": "x"}}}})),
        Patch::Json(json_patch::Patch(
            serde_json::from_value(
                json!([{"op": "add", "path": "/spec/podManagementPolicy", "value": "Parallel"}]),
            )
            .unwrap(),
        )),
    ] {
        let e = api_err(
            api.patch("web", &PatchParams::default(), &patch)
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.message.as_str()), (422, STS_MESSAGE));
    }
    let mut current = api.get("web").await.unwrap();
    current.spec.as_mut().unwrap().service_name = Some("renamed".into());
    let e = api_err(
        api.replace("web", &PostParams::default(), &current)
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.message.as_str()), (422, STS_MESSAGE));
    // The six mutable fields change freely (and /scale goes through the same rules).
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3, "minReadySeconds": 2, "updateStrategy": {"type": "OnDelete"},
            "template": {"metadata": {"annotations": {"a": "b"}}}}})),
    )
    .await
    .unwrap();
    api.patch_scale(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .unwrap();
    // Defaults written out are no change (the real server compares after defaulting).
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"spec": {"podManagementPolicy": "OrderedReady", "revisionHistoryLimit": 10}}),
        ),
    )
    .await
    .unwrap();
    let stored = api.get("web").await.unwrap();
    assert_eq!(stored.spec.unwrap().replicas, Some(5));
}

#[tokio::test]
async fn service_cluster_ip_is_allocated_and_immutable_and_pvc_storage_only_grows() {
    let sim = Server::start().await.unwrap();
    let client = sim.client().unwrap();
    let svcs: Api<Service> = Api::default_namespaced(client.clone());
    let created = svcs
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let ip = created.spec.as_ref().unwrap().cluster_ip.clone().unwrap();
    assert!(ip.starts_with("10.96."), "{ip}");
    // A PUT that leaves it empty keeps it (the update strategy carries it over) ...
    let mut again = created.clone();
    again.spec.as_mut().unwrap().cluster_ip = None;
    again.spec.as_mut().unwrap().cluster_ips = None;
    let kept = svcs
        .replace("s", &PostParams::default(), &again)
        .await
        .unwrap();
    assert_eq!(
        kept.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some(ip.as_str())
    );
    // ... one that changes it is refused.
    let e = api_err(
        svcs.patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"clusterIP": "10.96.9.9", "clusterIPs": ["10.96.9.9"]}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert_eq!(
        e.message,
        "Service \"s\" is invalid: [spec.clusterIP: Invalid value: \"10.96.9.9\": field is immutable, spec.clusterIPs[0]: Invalid value: []string{\"10.96.9.9\"}: may not change once set]"
    );

    let pvcs: Api<kube::core::DynamicObject> = Api::default_namespaced_with(
        client,
        &kube::core::ApiResource::erase::<k8s_openapi::api::core::v1::PersistentVolumeClaim>(&()),
    );
    let pvc = |size: &str, mode: &str| {
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "d"},
               "spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}}})
    };
    let ssa = PatchParams::apply("t");
    pvcs.patch("d", &ssa, &Patch::Apply(pvc("1Gi", "ReadWriteOnce")))
        .await
        .unwrap();
    pvcs.patch("d", &ssa, &Patch::Apply(pvc("2Gi", "ReadWriteOnce")))
        .await
        .unwrap();
    let shrink = api_err(
        pvcs.patch("d", &ssa, &Patch::Apply(pvc("1Gi", "ReadWriteOnce")))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        shrink.message,
        "PersistentVolumeClaim \"d\" is invalid: spec.resources.requests.storage: Forbidden: field can not be less than previous value"
    );
    let mode = api_err(
        pvcs.patch("d", &ssa, &Patch::Apply(pvc("2Gi", "ReadWriteMany")))
            .await
            .unwrap_err(),
    );
    assert_eq!(mode.code, 422);
    assert!(
        mode.message
            .contains("spec: Forbidden: spec is immutable after creation"),
        "{}",
        mode.message
    );
}

#[tokio::test]
async fn unknown_fields_of_built_in_kinds_are_refused_or_pruned_as_fieldvalidation_says() {
    let sim = Server::start().await.unwrap();
    let path = "/apis/apps/v1/namespaces/default/statefulsets";
    let mut typo = sts("web", "web-h", "1Gi");
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = json!("Always");
    typo["spec"]["replicaz"] = json!(2);
    let body = serde_json::to_vec(&typo).unwrap();
    // Strict (kubectl's default): 400 naming every unknown field; nothing stored.
    let (code, _, status) = send(
        &sim,
        reqwest::Method::POST,
        &format!("{path}?fieldValidation=Strict"),
        "application/json",
        body.clone(),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(
        status["message"],
        "StatefulSet in version \"v1\" cannot be handled as a StatefulSet: strict decoding error: unknown field \"spec.replicaz\", unknown field \"spec.template.spec.containers[0].imagePullPolicyy\""
    );
    // A bare request (Warn, the server's default): stored without them, one Warning each.
    let (code, warnings, stored) = send(
        &sim,
        reqwest::Method::POST,
        path,
        "application/json",
        body.clone(),
    )
    .await;
    assert_eq!(code, 201);
    assert_eq!(
        warnings,
        [
            "299 - \"unknown field \\\"spec.replicaz\\\"\"",
            "299 - \"unknown field \\\"spec.template.spec.containers[0].imagePullPolicyy\\\"\""
        ]
    );
    assert!(stored["spec"].get("replicaz").is_none());
    assert!(
        stored["spec"]["template"]["spec"]["containers"][0]
            .get("imagePullPolicyy")
            .is_none()
    );
    // A patch that adds one: the same rules on the patched object.
    let (code, _, status) = send(
        &sim,
        reqwest::Method::PATCH,
        &format!("{path}/web?fieldValidation=Strict"),
        "application/merge-patch+json",
        br#"{"spec":{"minReadySecond":1}}"#.to_vec(),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .ends_with("unknown field \"spec.minReadySecond\"")
    );
    // A wrong type is a decoding error whatever the mode.
    let (code, _, _) = send(
        &sim,
        reqwest::Method::PATCH,
        &format!("{path}/web?fieldValidation=Ignore"),
        "application/merge-patch+json",
        br#"{"spec":{"replicas":"three"}}"#.to_vec(),
    )
    .await;
    assert_eq!(code, 400);
    // Server-side apply converts the configuration to the type first: refused in any mode.
    let api: Api<StatefulSet> = Api::default_namespaced(sim.client().unwrap());
    let e = api_err(
        api.patch("web", &PatchParams::apply("op"), &Patch::Apply(&typo))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 500);
    assert_eq!(
        e.message,
        "failed to create typed patch object (default/web; apps/v1, Kind=StatefulSet): .spec.replicaz: field not declared in schema\n.spec.template.spec.containers[0].imagePullPolicyy: field not declared in schema"
    );
}

#[tokio::test]
async fn objects_over_etcds_limit_and_bodies_over_3_mib_are_refused() {
    let sim = Server::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(sim.client().unwrap());
    let sized = |name: &str, bytes: usize| -> ConfigMap {
        serde_json::from_value(
            json!({"metadata": {"name": name}, "data": {"blob": "x".repeat(bytes)}}),
        )
        .unwrap()
    };
    // Under 1.5 MiB stored: fine.
    cms.create(&PostParams::default(), &sized("small", 1_500_000))
        .await
        .unwrap();
    // Over 1.5 MiB (but under the 3 MiB body limit): etcd refuses it, a reason-less 500.
    let e = api_err(
        cms.create(&PostParams::default(), &sized("big", 1_600_000))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (500, "etcdserver: request is too large")
    );
    assert!(
        cms.get_opt("big").await.unwrap().is_none(),
        "nothing stored"
    );
    // Growing a stored object past the limit is refused the same way, and leaves it as it was.
    let rv = sim.store().resource_version();
    let e = api_err(
        cms.patch(
            "small",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"more": "y".repeat(100_000)}})),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 500);
    assert_eq!(
        sim.store().resource_version(),
        rv,
        "no resourceVersion taken"
    );
    let kept = cms.get("small").await.unwrap().data.unwrap();
    assert!(!kept.contains_key("more"), "the object is as it was");
    // Over 3 MiB: 413 before anything is decoded.
    let body = serde_json::to_vec(&sized("huge", 3 << 20)).unwrap();
    let (code, _, status) = send(
        &sim,
        reqwest::Method::POST,
        "/api/v1/namespaces/default/configmaps",
        "application/json",
        body,
    )
    .await;
    assert_eq!(code, 413);
    assert_eq!(status["reason"], "RequestEntityTooLarge");
    assert_eq!(
        status["message"],
        "Request entity too large: limit is 3145728"
    );
}

#[tokio::test]
async fn a_watcher_that_stops_reading_is_closed_while_the_others_keep_receiving() {
    use futures::AsyncBufReadExt;
    let sim = Server::builder().watch_buffer(8).start().await.unwrap();
    let client = sim.client().unwrap();
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    // Each event is a 256 KiB line: the sockets' buffers hold a few, then the buffer of 8.
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "big"}, "data": {"payload": "x".repeat(256 << 10), "n": "0"}}))
            .unwrap(),
    )
    .await
    .unwrap();
    let from = sim.store().resource_version();
    let open = |client: kube::Client| async move {
        let req = http::Request::get(format!(
            "/api/v1/namespaces/default/configmaps?watch=1&resourceVersion={from}"
        ))
        .body(Vec::new())
        .unwrap();
        Box::pin(client.request_stream(req).await.unwrap())
    };
    let mut stalled = open(client.clone()).await;
    let mut reader = open(client.clone()).await;
    // The reader reads every event as it comes; the stalled client reads nothing.
    let total = 200u64;
    let reading = tokio::spawn(async move {
        let mut last = String::new();
        for _ in 0..total {
            let mut l = String::new();
            assert!(
                reader.read_line(&mut l).await.unwrap() > 0,
                "the reader's watch ended"
            );
            last = l;
        }
        serde_json::from_str::<Value>(&last).unwrap()["object"]["data"]["n"].clone()
    });
    for n in 1..=total {
        cms.patch(
            "big",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"n": n.to_string()}})),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        reading.await.unwrap(),
        json!(total.to_string()),
        "the reader got every event"
    );
    assert_eq!(
        sim.stats().snapshot().watches_overflowed,
        1,
        "one watcher closed"
    );
    // The stalled client, reading now, gets what was written or buffered for it, then
    // the end of the stream: far fewer than every event.
    let mut got = 0u64;
    loop {
        let mut l = String::new();
        if stalled.read_line(&mut l).await.unwrap() == 0 {
            break;
        }
        got += 1;
    }
    assert!(
        got < total / 2,
        "the stalled watch was closed after {got} events"
    );
}
