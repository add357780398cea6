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
//!   and `stop_grace_period` outlasts `shutdown_delay + drain_timeout`.

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
