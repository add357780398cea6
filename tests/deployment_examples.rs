//! The deployment examples agree with legate and with each other (`kubernetes-validate
//! --strict` and `hadolint` check their schemas in scripts/test; this checks their meaning):
//! - every TOML in a Kubernetes ConfigMap passes `legate check`, every endpoint file in one parses;
//! - legate's container is a native sidecar (an init container with `restartPolicy: Always`)
//!   whose `-c FILE` and every `file:` target are ConfigMap keys mounted whole (no `subPath`,
//!   which would never see an update), whose startup/readiness/liveness probes hit
//!   `/startup`, `/ready`, `/live` on the config's admin port, which listens beyond loopback
//!   (the kubelet probes the Pod IP); resource requests are set; the Pod's user is the image's;
//! - compose: the app `depends_on` legate being healthy, legate's health check is
//!   `legate wait` against its admin address, its config is mounted and passes `legate check`,
//!   and `stop_grace_period` outlasts `shutdown_delay + drain_timeout`;
//! - the OpenKruise SidecarSet hot-upgrades legate: `upgradeType: HotUpgrade` with an empty
//!   image that is a legate image by another tag, a PostStart hook of `/legate wait
//!   --handover`, a config (from the ConfigMap beside it) that passes `legate check` and names
//!   an abstract `handoff_socket`; and scripts/validate-crd.py, which checks it against the
//!   vendored CRD in scripts/test, accepts it and rejects broken copies of it.

use legate::config::{Config, Target};
use serde_norway::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|document| {
            serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .filter(|value: &Value| !value.is_null())
        .collect()
}

fn kubernetes_documents() -> Vec<Value> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(root().join("config/kubernetes")).expect("config/kubernetes") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            all.extend(documents(&path));
        }
    }
    assert!(!all.is_empty(), "no manifests in config/kubernetes");
    all
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |value, key| value.get(*key))
}

fn seq<'a>(value: &'a Value, path: &[&str]) -> Vec<&'a Value> {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(|items| items.iter().collect())
        .unwrap_or_default()
}

fn strings(value: &Value, path: &[&str]) -> Vec<String> {
    seq(value, path)
        .into_iter()
        .map(|item| item.as_str().expect("a string").to_string())
        .collect()
}

/// Writes `text` to a temp file named `name` and runs `legate check -c` on it.
fn legate_check(name: &str, text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_legate"))
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("LEGATE_CONFIG")
        .output()
        .expect("legate runs");
    assert!(
        output.status.success(),
        "{name} failed legate check: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Config::load(&path).expect("checked config loads")
}

/// The value after `flag` in `args` (`-c FILE`, `--config FILE`).
fn flag_value(args: &[String], flags: &[&str]) -> Option<String> {
    args.iter()
        .position(|arg| flags.contains(&arg.as_str()))
        .and_then(|i| args.get(i + 1).cloned())
}

#[test]
fn configmap_files_pass_legate_check() {
    let mut tomls = 0;
    for document in kubernetes_documents() {
        if str_at(&document, &["kind"]) != Some("ConfigMap") {
            continue;
        }
        let data = at(&document, &["data"]).and_then(Value::as_mapping);
        for (key, value) in data.into_iter().flatten() {
            let (key, value) = (key.as_str().unwrap(), value.as_str().unwrap());
            if key.ends_with(".toml") {
                legate_check(key, value);
                tomls += 1;
            } else if key.ends_with(".endpoints") {
                legate::discovery::endpoint_file::parse_endpoint_file(value)
                    .unwrap_or_else(|e| panic!("ConfigMap key {key}: {e}"));
            }
        }
    }
    assert!(tomls > 0, "no legate TOML in any ConfigMap");
}

/// ConfigMap name -> its data (key -> contents).
fn configmaps(documents: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    documents
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("ConfigMap"))
        .map(|d| {
            let data = at(d, &["data"])
                .and_then(Value::as_mapping)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().unwrap().to_string(),
                                v.as_str().unwrap().to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            (str_at(d, &["metadata", "name"]).unwrap().to_string(), data)
        })
        .collect()
}

/// The contents of `file` as the container sees it: it must sit directly in a ConfigMap
/// volume mounted whole.
fn mounted_file(
    pod: &Value,
    container: &Value,
    maps: &BTreeMap<String, BTreeMap<String, String>>,
    file: &Path,
) -> String {
    let name = container["name"].as_str().unwrap();
    let mount = seq(container, &["volumeMounts"])
        .into_iter()
        .find(|mount| Some(Path::new(mount["mountPath"].as_str().unwrap())) == file.parent())
        .unwrap_or_else(|| panic!("{name}: nothing is mounted at {}", file.display()));
    assert!(
        mount.get("subPath").is_none(),
        "{name}: {} is mounted with subPath, which never sees ConfigMap updates",
        file.display()
    );
    let volume_name = mount["name"].as_str().unwrap();
    let volume = seq(pod, &["volumes"])
        .into_iter()
        .find(|v| v["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("no volume {volume_name}"));
    let map = str_at(volume, &["configMap", "name"])
        .unwrap_or_else(|| panic!("volume {volume_name} is not a ConfigMap"));
    let key = file.file_name().unwrap().to_str().unwrap();
    maps.get(map)
        .unwrap_or_else(|| panic!("no ConfigMap {map} in config/kubernetes"))
        .get(key)
        .unwrap_or_else(|| panic!("ConfigMap {map} has no key {key} for {}", file.display()))
        .clone()
}

fn dockerfile_user() -> i64 {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let user = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("USER "))
        .next_back()
        .expect("a USER line");
    user.split(':')
        .next()
        .unwrap()
        .trim()
        .parse()
        .expect("numeric USER")
}

#[test]
fn the_native_sidecar_matches_the_config_it_mounts() {
    let documents = kubernetes_documents();
    let maps = configmaps(&documents);
    let mut sidecars = 0;
    for deployment in documents
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("Deployment"))
    {
        let pod = &deployment["spec"]["template"]["spec"];
        for container in seq(pod, &["initContainers"]) {
            let args = strings(container, &["args"]);
            if args.first().map(String::as_str) != Some("run") {
                continue;
            }
            sidecars += 1;
            let name = container["name"].as_str().unwrap();
            assert_eq!(
                str_at(container, &["restartPolicy"]),
                Some("Always"),
                "{name}: a native sidecar is an init container with restartPolicy: Always"
            );
            let config_path = flag_value(&args, &["-c", "--config"])
                .unwrap_or_else(|| panic!("{name}: no -c FILE in {args:?}"));
            let text = mounted_file(pod, container, &maps, Path::new(&config_path));
            let config = legate_check("legate.toml", &text);

            for listener in &config.listeners {
                for target in &listener.upstream {
                    if let Target::File(path) = target {
                        let endpoints = mounted_file(pod, container, &maps, path);
                        legate::discovery::endpoint_file::parse_endpoint_file(&endpoints)
                            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    }
                }
            }

            let admin = config.admin.listen;
            assert!(
                admin.ip().is_unspecified(),
                "{name}: the kubelet probes the Pod IP, so admin.listen {admin} must not be loopback"
            );
            for (probe, path) in [
                ("startupProbe", "/startup"),
                ("readinessProbe", "/ready"),
                ("livenessProbe", "/live"),
            ] {
                let get = at(container, &[probe, "httpGet"])
                    .unwrap_or_else(|| panic!("{name}: no {probe}.httpGet"));
                assert_eq!(get["path"].as_str(), Some(path), "{name}: {probe} path");
                let port = &get["port"];
                let port = port.as_u64().map(|p| p as u16).unwrap_or_else(|| {
                    // A named port: look it up in the container's ports.
                    let wanted = port.as_str().expect("a port number or name");
                    seq(container, &["ports"])
                        .into_iter()
                        .find(|p| p["name"].as_str() == Some(wanted))
                        .and_then(|p| p["containerPort"].as_u64())
                        .unwrap_or_else(|| panic!("{name}: no port named {wanted}"))
                        as u16
                });
                assert_eq!(
                    port,
                    admin.port(),
                    "{name}: {probe} port vs admin.listen {admin}"
                );
            }

            for resource in ["cpu", "memory"] {
                assert!(
                    at(container, &["resources", "requests", resource]).is_some(),
                    "{name}: no {resource} request"
                );
            }
            assert!(
                at(container, &["resources", "limits", "memory"]).is_some(),
                "{name}: no memory limit"
            );
            let user = at(container, &["securityContext", "runAsUser"])
                .or_else(|| at(pod, &["securityContext", "runAsUser"]))
                .and_then(Value::as_i64);
            assert_eq!(
                user,
                Some(dockerfile_user()),
                "{name}: runAsUser vs the Dockerfile's USER"
            );
        }
        for container in seq(pod, &["containers"]) {
            assert_ne!(
                strings(container, &["args"]).first().map(String::as_str),
                Some("run"),
                "legate as a regular container is not a native sidecar: it would start beside the app, not before it"
            );
        }
    }
    assert!(
        sidecars > 0,
        "no Deployment runs legate as a native sidecar"
    );
    assert!(
        documents
            .iter()
            .any(|d| str_at(d, &["kind"]) == Some("Service")
                && str_at(d, &["spec", "clusterIP"]) == Some("None")),
        "no headless Service for DNS discovery"
    );
}

fn compose_duration(value: &Value) -> Duration {
    legate::config::duration::parse_duration(value.as_str().expect("a duration string"))
        .expect("a duration compose and legate both read")
}

#[test]
fn compose_starts_the_app_after_legate_is_healthy_and_drains_within_the_grace_period() {
    let compose_dir = root().join("config");
    let compose = documents(&compose_dir.join("compose.yaml"))
        .pop()
        .expect("config/compose.yaml");
    let services = &compose["services"];
    let legate = &services["legate"];
    assert_eq!(
        str_at(services, &["app", "depends_on", "legate", "condition"]),
        Some("service_healthy"),
        "the app must wait for legate to be healthy"
    );

    let args = strings(legate, &["command"]);
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let config_path = flag_value(&args, &["-c", "--config"]).expect("legate -c FILE");
    let host_file = strings(legate, &["volumes"])
        .into_iter()
        .find_map(|volume| {
            let mut parts = volume.split(':');
            let (host, container) = (parts.next()?, parts.next()?);
            (container == config_path).then(|| compose_dir.join(host))
        })
        .unwrap_or_else(|| panic!("{config_path} is not mounted into legate"));
    let config = legate_check(
        "compose.toml",
        &std::fs::read_to_string(&host_file).expect("the mounted config exists"),
    );

    let test = strings(legate, &["healthcheck", "test"]);
    assert_eq!(
        &test[..3],
        ["CMD", "/legate", "wait"],
        "the image has no shell or curl: the health check is legate wait"
    );
    let checked: SocketAddr = flag_value(&test, &["--admin"])
        .unwrap_or_else(|| "127.0.0.1:9901".into())
        .parse()
        .unwrap();
    assert_eq!(
        checked, config.admin.listen,
        "healthcheck --admin vs admin.listen"
    );

    let grace = compose_duration(&legate["stop_grace_period"]);
    let needed = config.runtime.shutdown_delay + config.runtime.drain_timeout;
    assert!(
        grace > needed,
        "stop_grace_period {grace:?} must outlast shutdown_delay + drain_timeout ({needed:?}), or Docker kills legate mid-drain"
    );
}

const SIDECARSET: &str = "config/kubernetes/sidecarset-hotupgrade.yaml";
const SIDECARSET_CRD: &str = "config/kubernetes/schemas/apps.kruise.io_sidecarsets.yaml";
/// What a Pod gets when its spec says nothing, and a SidecarSet cannot say it.
const DEFAULT_TERMINATION_GRACE: Duration = Duration::from_secs(30);

fn dockerfile_entrypoint() -> Vec<String> {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let line = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ENTRYPOINT "))
        .next_back()
        .expect("an ENTRYPOINT line");
    serde_json::from_str(line).expect("ENTRYPOINT in exec form")
}

/// `registry/name` of `registry/name:tag` (a port in the registry is not a tag).
fn image_repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap();
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => &image[..colon],
        _ => image,
    }
}

#[test]
fn the_sidecarset_hot_upgrades_legate_with_a_handover() {
    let documents = documents(&root().join(SIDECARSET));
    // Its ConfigMap is in the same file, so `kubectl apply -f` of that file is complete.
    let maps = configmaps(&documents);
    let sidecarsets: Vec<&Value> = documents
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("SidecarSet"))
        .collect();
    assert_eq!(sidecarsets.len(), 1, "{SIDECARSET}: one SidecarSet");
    let sidecarset = sidecarsets[0];
    assert!(
        str_at(sidecarset, &["apiVersion"]).is_some_and(|v| v.starts_with("apps.kruise.io/")),
        "an OpenKruise SidecarSet"
    );
    let spec = &sidecarset["spec"];
    assert!(
        at(spec, &["selector", "matchLabels"])
            .and_then(Value::as_mapping)
            .is_some_and(|labels| !labels.is_empty()),
        "the SidecarSet selects Pods by a label"
    );

    let legates: Vec<&Value> = seq(spec, &["containers"])
        .into_iter()
        .filter(|c| strings(c, &["args"]).first().map(String::as_str) == Some("run"))
        .collect();
    assert_eq!(legates.len(), 1, "one legate container in the SidecarSet");
    let container = legates[0];
    let name = container["name"].as_str().unwrap();

    // Hot upgrade: Kruise runs NAME-1 and NAME-2, one of them on the empty image, and tells
    // them apart by their image. The empty container keeps this container's args, hook and
    // probe, so the empty image is a legate image too (busybox would crash-loop on `run`).
    assert_eq!(
        str_at(container, &["upgradeStrategy", "upgradeType"]),
        Some("HotUpgrade"),
        "{name}: upgradeStrategy.upgradeType"
    );
    let image = str_at(container, &["image"]).expect("an image");
    let empty = str_at(container, &["upgradeStrategy", "hotUpgradeEmptyImage"])
        .filter(|empty| !empty.is_empty())
        .unwrap_or_else(|| panic!("{name}: HotUpgrade needs upgradeStrategy.hotUpgradeEmptyImage"));
    assert_ne!(
        empty, image,
        "{name}: Kruise tells the empty container by its image: hotUpgradeEmptyImage must differ from image"
    );
    assert_eq!(
        image_repository(empty),
        image_repository(image),
        "{name}: the empty container runs this container's args and PostStart hook: hotUpgradeEmptyImage must be a legate image (another tag)"
    );
    for env in seq(container, &["env"]) {
        let var = env["name"].as_str().unwrap_or_default();
        assert!(
            !var.starts_with("SIDECARSET_VERSION"),
            "{name}: Kruise sets {var} itself, from the Pod's annotations"
        );
    }

    // The hook returns once this container's legate has taken the sockets over (at once in
    // the empty container); Kruise swaps the old container out only after it returned.
    let hook = strings(container, &["lifecycle", "postStart", "exec", "command"]);
    let entrypoint = dockerfile_entrypoint();
    assert_eq!(
        hook.first(),
        entrypoint.first(),
        "{name}: the PostStart hook runs the image's binary by its path (no shell, no PATH entry for it)"
    );
    assert_eq!(
        hook.get(1).map(String::as_str),
        Some("wait"),
        "{name}: PostStart is `legate wait --handover`, not {hook:?}"
    );
    assert!(
        hook.iter().any(|arg| arg == "--handover"),
        "{name}: PostStart without --handover returns while the old container's legate still answers: {hook:?}"
    );
    if let Some(timeout) = flag_value(&hook, &["--timeout"]) {
        legate::config::duration::parse_duration(&timeout)
            .unwrap_or_else(|e| panic!("{name}: PostStart --timeout {timeout}: {e}"));
    }

    let args = strings(container, &["args"]);
    let config_path = flag_value(&args, &["-c", "--config"])
        .unwrap_or_else(|| panic!("{name}: no -c FILE in {args:?}"));
    // A SidecarSet's volumes are in its spec, where a Pod's are in the Pod spec.
    let text = mounted_file(spec, container, &maps, Path::new(&config_path));
    let config = legate_check("legate.toml", &text);

    // Both containers must find the same socket, across containers: an abstract one, which
    // lives in the network namespace they share (a path would need a shared writable volume).
    let raw: toml::Table = text.parse().expect("the checked config is TOML");
    let handoff = raw
        .get("runtime")
        .and_then(|runtime| runtime.get("handoff_socket"))
        .and_then(toml::Value::as_str)
        .unwrap_or_else(|| panic!("{name}: set [runtime] handoff_socket explicitly"));
    assert!(
        handoff.starts_with('@') && handoff.len() > 1,
        "{name}: handoff_socket {handoff:?} must be an abstract @NAME, which reaches across the Pod's containers"
    );

    let admin = config.admin.listen;
    assert!(
        admin.ip().is_unspecified(),
        "{name}: the kubelet probes the Pod IP, so admin.listen {admin} must not be loopback"
    );
    let hooked: SocketAddr = flag_value(&hook, &["--admin"])
        .unwrap_or_else(|| "127.0.0.1:9901".into())
        .parse()
        .unwrap();
    assert_eq!(
        hooked.port(),
        admin.port(),
        "{name}: PostStart --admin {hooked} vs admin.listen {admin}"
    );
    let get = at(container, &["readinessProbe", "httpGet"])
        .unwrap_or_else(|| panic!("{name}: no readinessProbe.httpGet"));
    assert_eq!(
        get["path"].as_str(),
        Some("/ready"),
        "{name}: readinessProbe path"
    );
    assert_eq!(
        get["port"].as_u64(),
        Some(u64::from(admin.port())),
        "{name}: readinessProbe port vs admin.listen {admin}"
    );

    // A plain container (hot upgrade is for `containers`, not native sidecars): it gets
    // SIGTERM together with the app, and within the Pod's grace period, which is the app's.
    let runtime = &config.runtime;
    assert!(
        !runtime.shutdown_delay.is_zero(),
        "{name}: legate gets SIGTERM together with the app: shutdown_delay keeps it accepting while the app finishes"
    );
    assert!(
        runtime.shutdown_delay + runtime.drain_timeout < DEFAULT_TERMINATION_GRACE,
        "{name}: shutdown_delay + drain_timeout must fit in the default terminationGracePeriodSeconds (30s)"
    );

    for resource in ["cpu", "memory"] {
        assert!(
            at(container, &["resources", "requests", resource]).is_some(),
            "{name}: no {resource} request"
        );
    }
    assert!(
        at(container, &["resources", "limits", "memory"]).is_some(),
        "{name}: no memory limit"
    );
    assert_eq!(
        at(container, &["securityContext", "runAsUser"]).and_then(Value::as_i64),
        Some(dockerfile_user()),
        "{name}: runAsUser (on the container: the Pod's securityContext is the app's) vs the Dockerfile's USER"
    );
}

/// Runs scripts/validate-crd.py on `file` against the vendored SidecarSet CRD.
fn validate_crd(file: &Path) -> std::process::Output {
    const INSTALL: &str =
        "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install PyYAML jsonschema kubernetes-validate (scripts/test installs them)";
    let modules = Command::new("python3")
        .args(["-c", "import jsonschema, yaml, kubernetes_validate"])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 runs scripts/validate-crd.py: {e}; install python3, then {INSTALL}")
        });
    assert!(
        modules.status.success(),
        "scripts/validate-crd.py needs PyYAML, jsonschema and kubernetes-validate: {}install them: {INSTALL}",
        String::from_utf8_lossy(&modules.stderr)
    );
    Command::new("python3")
        .arg(root().join("scripts/validate-crd.py"))
        .args(["--kubernetes-version", "1.29.0", "--crd"])
        .arg(root().join(SIDECARSET_CRD))
        .arg(file)
        .output()
        .expect("python3 runs")
}

#[test]
fn the_crd_validator_accepts_the_sidecarset_and_rejects_broken_copies() {
    let path = root().join(SIDECARSET);
    let accepted = validate_crd(&path);
    let stdout = String::from_utf8_lossy(&accepted.stdout);
    assert!(
        accepted.status.success(),
        "{SIDECARSET} against {SIDECARSET_CRD}: {}{stdout}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(
        stdout.contains("(SidecarSet/legate): valid against its CRD"),
        "the SidecarSet was checked against the CRD: {stdout}"
    );
    assert!(
        stdout.contains("(ConfigMap/legate-sidecarset): valid against Kubernetes 1.29.0"),
        "the ConfigMap was checked against Kubernetes' schema: {stdout}"
    );

    let original = documents(&path);
    let kind_index = |kind: &str| {
        original
            .iter()
            .position(|d| str_at(d, &["kind"]) == Some(kind))
            .unwrap_or_else(|| panic!("no {kind} in {SIDECARSET}"))
    };
    let (ss, cm) = (kind_index("SidecarSet"), kind_index("ConfigMap"));
    let yaml = |text: &str| -> Value { serde_norway::from_str(text).unwrap() };
    type Break = Box<dyn Fn(&mut [Value])>;
    let broken: Vec<(&str, Break, &str)> = vec![
        (
            "an unknown field the CRD lists the siblings of",
            Box::new(move |d| {
                d[ss]["spec"]["containers"][0]["upgradeStrategy"]["hotUpgradeEmptyImag"] =
                    Value::from("legate:empty")
            }),
            "spec.containers[0].upgradeStrategy: Additional properties are not allowed ('hotUpgradeEmptyImag' was unexpected)",
        ),
        (
            "an unknown field in the container, which the CRD leaves open",
            Box::new(move |d| {
                let container = &mut d[ss]["spec"]["containers"][0];
                let hook = container.as_mapping_mut().unwrap().remove("lifecycle").unwrap();
                container["lifecyle"] = hook;
            }),
            "spec.containers[0]: Additional properties are not allowed ('lifecyle' was unexpected)",
        ),
        (
            "upgradeType: 5",
            Box::new(move |d| {
                d[ss]["spec"]["containers"][0]["upgradeStrategy"]["upgradeType"] = Value::from(5)
            }),
            "spec.containers[0].upgradeStrategy.upgradeType: 5 is not of type 'string'",
        ),
        (
            "containers as a string",
            Box::new(move |d| d[ss]["spec"]["containers"] = Value::from("legate")),
            "spec.containers: 'legate' is not of type 'array'",
        ),
        (
            "a wrong type in the container, which the CRD leaves open",
            Box::new(move |d| {
                d[ss]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] =
                    yaml("[9901]")
            }),
            "spec.containers[0].readinessProbe.httpGet.port: [9901] is not valid",
        ),
        (
            "a selector expression without its required operator",
            Box::new(move |d| {
                d[ss]["spec"]["selector"]["matchExpressions"] = yaml("[{key: legate-sidecar}]")
            }),
            "spec.selector.matchExpressions[0]: 'operator' is a required property",
        ),
        (
            "a container without its required name",
            Box::new(move |d| {
                d[ss]["spec"]["containers"][0]
                    .as_mapping_mut()
                    .unwrap()
                    .remove("name");
            }),
            "spec.containers[0]: 'name' is a required property",
        ),
        (
            "no metadata.name",
            Box::new(move |d| {
                d[ss]["metadata"].as_mapping_mut().unwrap().remove("name");
            }),
            "metadata: 'name' is a required property",
        ),
        (
            "a version the CRD does not have",
            Box::new(move |d| d[ss]["apiVersion"] = Value::from("apps.kruise.io/v1")),
            "apps.kruise.io/v1 is not a version of SidecarSet",
        ),
        (
            "an unknown field in the ConfigMap beside it",
            Box::new(move |d| {
                let data = d[cm].as_mapping_mut().unwrap().remove("data").unwrap();
                d[cm]["datas"] = data;
            }),
            "(ConfigMap/legate-sidecarset): (document): Additional properties are not allowed ('datas' was unexpected)",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, mutate, expected) in &broken {
        let mut copy = original.clone();
        mutate(&mut copy);
        let text = copy
            .iter()
            .map(|d| serde_norway::to_string(d).unwrap())
            .collect::<Vec<_>>()
            .join("---\n");
        let file = dir.path().join("broken.yaml");
        std::fs::write(&file, &text).unwrap();
        let output = validate_crd(&file);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{what}: the validator must reject it (exit 1), got {:?}: {stderr}\n{text}",
            output.status
        );
        assert!(
            stderr.contains(expected),
            "{what}: expected {expected:?} in:\n{stderr}"
        );
    }
}
