//! The deployment files agree with the binary: alert rules pass promtool, every metric the
//! dashboard and the alerts use is one the worker exports, the manifests' images, args, ports,
//! probe paths and environment match what the binary accepts, and the manifests validate against
//! the Kubernetes schemas.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn manifests() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/base"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        if f.file_name().unwrap() == "kustomization.yaml" {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            out.push((f.clone(), v));
        }
    }
    out
}

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("embed_worker_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let mut name = &text[start..end];
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                name = base;
            }
        }
        names.insert(name.to_string());
        i = end;
    }
    names
}

/// The PrometheusRule's groups as a plain rules file `rules.yaml` in a fresh folder `tag-<pid>`.
fn rules_dir(tag: &str) -> std::path::PathBuf {
    let (_, rule) = manifests()
        .into_iter()
        .find(|(_, v)| v["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("rules.yaml"),
        serde_yaml_ng::to_string(&rule["spec"]).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn alert_rules_pass_promtool() {
    let file = rules_dir("rules").join("rules.yaml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("10 rules found"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn an_unfinished_model_switch_alerts_after_a_day_and_a_finished_one_never() {
    let dir = rules_dir("rule-tests");
    // Samples every minute for 26 hours: b writes at 60% while a serves; then the same with
    // b both writing and serving (and a's old serving series NaN, as the worker leaves it).
    let cases = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'embed_worker_model_coverage_ratio{model="a",role="serving"}'
        values: '1x1560'
      - series: 'embed_worker_model_coverage_ratio{model="b",role="writing"}'
        values: '0.6x1560'
    alert_rule_test:
      - eval_time: 23h
        alertname: EmbedWorkerModelSwitchUnfinished
        exp_alerts: []
      - eval_time: 25h
        alertname: EmbedWorkerModelSwitchUnfinished
        exp_alerts:
          - exp_labels: {severity: warning, model: b}
            exp_annotations:
              summary: "The writing model b has not become the serving model in a day (60% covered)"
              description: "`embed-worker models` shows coverage and index; below 100%, is the backfill running (`embed-worker status`)? At 100% with a valid index, `embed-worker models promote b` (automatic unless models.auto_promote = false)."
  - interval: 1m
    input_series:
      - series: 'embed_worker_model_coverage_ratio{model="a",role="serving"}'
        values: 'NAN_SERIES'
      - series: 'embed_worker_model_coverage_ratio{model="a",role="retired"}'
        values: '1x1560'
      - series: 'embed_worker_model_coverage_ratio{model="b",role="writing"}'
        values: '1x1560'
      - series: 'embed_worker_model_coverage_ratio{model="b",role="serving"}'
        values: '1x1560'
    alert_rule_test:
      - eval_time: 25h
        alertname: EmbedWorkerModelSwitchUnfinished
        exp_alerts: []
  # A standby whose replay is paused for 10 minutes, then resumed: lag over the 30 s the worker
  # exports as the threshold fires after 2 minutes, and clears once it has caught up.
  - interval: 30s
    input_series:
      - series: 'embed_worker_replica_lag_alert_seconds{instance="w1"}'
        values: '30x60'
      - series: 'embed_worker_replica_lag_seconds{application_name="standby",instance="w1"}'
        values: '0x4 10+30x20 0x30'
    alert_rule_test:
      - eval_time: 3m
        alertname: EmbedWorkerReplicaLagging
        exp_alerts: []
      - eval_time: 8m
        alertname: EmbedWorkerReplicaLagging
        exp_alerts:
          - exp_labels: {severity: warning, application_name: standby}
            exp_annotations:
              summary: "Replica standby is 5m 40s behind the primary"
              description: "Embeddings written on the primary are not searchable there yet. On the standby: is replay paused (SELECT pg_is_wal_replay_paused()), or a long query holding it back (max_standby_streaming_delay)? `embed-worker status` on the primary lists each replica's lag. +Inf: a replica seen streaming has disconnected and answers as of its last replay (if it was removed on purpose, restart the workers)."
      - eval_time: 25m
        alertname: EmbedWorkerReplicaLagging
        exp_alerts: []
  # A standby cut off from the primary: the worker exports +Inf for it (it left
  # pg_stat_replication); the alert fires after 2 minutes instead of losing its series.
  - interval: 30s
    input_series:
      - series: 'embed_worker_replica_lag_alert_seconds{instance="w1"}'
        values: '30x20'
      - series: 'embed_worker_replica_lag_seconds{application_name="standby",instance="w1"}'
        values: '0x4 INF_SERIES'
    alert_rule_test:
      - eval_time: 3m
        alertname: EmbedWorkerReplicaLagging
        exp_alerts: []
      - eval_time: 6m
        alertname: EmbedWorkerReplicaLagging
        exp_alerts:
          - exp_labels: {severity: warning, application_name: standby}
            exp_annotations:
              summary: "Replica standby is +Inf behind the primary"
              description: "DESCRIPTION"
  # A probe finding recall 0.91 for the large user (target 0.95) fires after 5 minutes; the
  # next probe, after `tune`, finds 0.97 and it clears. The everyone scope stays quiet.
  - interval: 1m
    input_series:
      - series: 'embed_worker_search_recall_target{instance="w1"}'
        values: '0.95x90'
      - series: 'embed_worker_search_recall{model="m",scope="large_user",instance="w1"}'
        values: '0.99x9 0.91x50 0.97x30'
      - series: 'embed_worker_search_recall{model="m",scope="all",instance="w1"}'
        values: '0.99x90'
    alert_rule_test:
      - eval_time: 12m
        alertname: EmbedWorkerSearchRecallLow
        exp_alerts: []
      - eval_time: 20m
        alertname: EmbedWorkerSearchRecallLow
        exp_alerts:
          - exp_labels: {severity: warning, model: m, scope: large_user}
            exp_annotations:
              summary: "Search recall of m (large_user) is 91%, under its target"
              description: "RECALL_DESCRIPTION"
      - eval_time: 70m
        alertname: EmbedWorkerSearchRecallLow
        exp_alerts: []
"#;
    let cases = cases.replace("RECALL_DESCRIPTION", "Searches miss some of the nearest chunks. `embed-worker tune` sweeps ef_search (and max_scan_tuples for user scopes) and stores the smallest setting that meets the target; `embed-worker tune --candidate m=32` compares a denser index on a sample. A user scope alone: the filter is selective (iterative scans stop at max_scan_tuples).");
    let cases = cases.replace("NAN_SERIES", &vec!["NaN"; 1561].join(" "));
    let cases = cases.replace("INF_SERIES", &vec!["+Inf"; 16].join(" "));
    let cases = cases.replace("DESCRIPTION", "Embeddings written on the primary are not searchable there yet. On the standby: is replay paused (SELECT pg_is_wal_replay_paused()), or a long query holding it back (max_standby_streaming_delay)? `embed-worker status` on the primary lists each replica's lag. +Inf: a replica seen streaming has disconnected and answers as of its last replay (if it was removed on purpose, restart the workers).");
    std::fs::write(dir.join("tests.yaml"), cases).unwrap();
    let out = Command::new("promtool")
        .current_dir(&dir)
        .args(["test", "rules", "tests.yaml"])
        .output()
        .expect("promtool (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let exported: BTreeSet<String> = embed_worker::meter::ALL
        .iter()
        .map(|s| s.to_string())
        .collect();
    let dashboard =
        std::fs::read_to_string(root().join("deploy/grafana/embed-worker-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut exprs = String::new();
    for p in json["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push_str(t["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let used_dash = metric_names(&exprs);
    assert!(used_dash.len() >= 8, "{used_dash:?}");
    let rules = std::fs::read_to_string(root().join("deploy/base/prometheusrule.yaml")).unwrap();
    let used_rules = metric_names(&rules);
    for name in used_dash.iter().chain(&used_rules) {
        assert!(
            exported.contains(name),
            "{name} is not exported by the worker (meter::ALL)"
        );
    }
    // And meter::ALL names the metrics the code really records.
    let src: String = ["src/meter.rs"]
        .iter()
        .map(|f| std::fs::read_to_string(root().join(f)).unwrap())
        .collect();
    for name in &exported {
        assert!(src.contains(&format!("\"{name}\"")), "{name}");
    }
}

fn containers(v: &Value) -> Vec<Value> {
    let spec = match v["kind"].as_str() {
        Some("Deployment") | Some("Job") => &v["spec"]["template"]["spec"],
        Some("CronJob") => &v["spec"]["jobTemplate"]["spec"]["template"]["spec"],
        _ => return vec![],
    };
    spec["containers"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn manifests_agree_with_the_binary() {
    let bin = env!("CARGO_BIN_EXE_embed-worker");
    let kustomization: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/base/kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let image_name = kustomization["images"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let all = manifests();
    for (f, _) in &all {
        assert!(
            listed.contains(f.file_name().unwrap().to_str().unwrap()),
            "{} not in kustomization",
            f.display()
        );
    }
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    assert!(dockerfile.contains("EXPOSE 9898") && dockerfile.contains("USER 65532"));

    let mut checked = 0;
    for (f, doc) in &all {
        for c in containers(doc) {
            checked += 1;
            assert_eq!(
                c["image"].as_str(),
                Some(image_name.as_str()),
                "{}",
                f.display()
            );
            let args: Vec<String> = c["args"]
                .as_sequence()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            // The binary accepts the args (clap validates subcommand and flags before --help).
            let out = Command::new(bin)
                .args(&args)
                .arg("--help")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{} args {args:?}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            // The binary accepts the environment: every EMBED_WORKER__ key is a real setting.
            let mut cmd = Command::new(bin);
            cmd.arg("config").env_remove("DATABASE_URL");
            let mut names = Vec::new();
            for e in c["env"].as_sequence().unwrap() {
                let name = e["name"].as_str().unwrap();
                names.push(name.to_string());
                if let Some(v) = e["value"].as_str()
                    && name.starts_with("EMBED_WORKER__")
                {
                    cmd.env(name, v);
                }
            }
            let out = cmd.output().unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                f.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                names.contains(&"DATABASE_URL".to_string()),
                "{}",
                f.display()
            );
            if doc["kind"] == "Deployment" {
                let printed = String::from_utf8_lossy(&out.stdout);
                assert!(printed.contains("addr = \"0.0.0.0:9898\""), "{printed}");
                assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(9898));
                assert_eq!(
                    c["livenessProbe"]["httpGet"]["path"].as_str(),
                    Some("/healthz")
                );
                assert_eq!(
                    c["readinessProbe"]["httpGet"]["path"].as_str(),
                    Some("/readyz")
                );
                let grace: u64 = c["env"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == "EMBED_WORKER__SHUTDOWN__GRACE_SECS")
                    .unwrap()["value"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                let pod_grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                    .as_u64()
                    .unwrap();
                assert!(
                    pod_grace > grace + 5,
                    "terminationGracePeriodSeconds {pod_grace} must exceed the shutdown grace {grace}"
                );
                // The API key comes from the mounted Secret file, never a literal.
                let key_file = c["env"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .find(|e| e["name"] == "OPENAI_API_KEY_FILE")
                    .unwrap()["value"]
                    .as_str()
                    .unwrap()
                    .to_string();
                let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
                let item =
                    doc["spec"]["template"]["spec"]["volumes"][0]["secret"]["items"][0]["path"]
                        .as_str()
                        .unwrap();
                assert_eq!(key_file, format!("{mount}/{item}"));
                assert!(!names.contains(&"OPENAI_API_KEY".to_string()));
            }
        }
    }
    assert_eq!(
        checked, 4,
        "Deployment, migrate Job, enqueue-stale and index-build CronJobs"
    );

    embed_worker::init_tls();
    // The probe paths answer on the worker HTTP server.
    let health = std::sync::Arc::new(embed_worker::guard::health::Health::default());
    let addr = embed_worker::http::serve("127.0.0.1:0", health)
        .await
        .unwrap();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
}

#[test]
fn manifests_validate_against_kubernetes_schemas() {
    let tool =
        std::env::var("KUBERNETES_VALIDATE").unwrap_or_else(|_| "kubernetes-validate".into());
    let core: Vec<PathBuf> = manifests()
        .into_iter()
        .filter(|(_, v)| {
            matches!(
                v["kind"].as_str(),
                Some("Deployment" | "Job" | "CronJob" | "ServiceAccount")
            )
        })
        .map(|(f, _)| f)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(core.len(), 5);
    let out = Command::new(&tool)
        .args(["--strict", "--kubernetes-version", "1.31"])
        .args(core.iter().map(|p| p.as_path()))
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e} (scripts/test installs kubernetes-validate)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let _ = Path::new("");
}

/// The pool a container's command opens: `migrate`, `verify` and `models` a login pool of 4
/// (`db::connect_as_login`), the rest `database.max_connections` (its env, else the default).
fn container_pool(c: &Value, default: u64) -> u64 {
    let first = c["args"][0].as_str().unwrap_or("");
    if ["migrate", "verify", "models"].contains(&first) {
        return 4;
    }
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "EMBED_WORKER__DATABASE__MAX_CONNECTIONS")
        .map_or(default, |e| e["value"].as_str().unwrap().parse().unwrap())
}

#[test]
fn replicas_and_pools_fit_the_documented_connection_budget() {
    let default = embed_worker::config::Settings::load(None)
        .unwrap()
        .database
        .max_connections as u64;
    let all = manifests();
    let scaled = all
        .iter()
        .find(|(_, v)| v["kind"] == "ScaledObject")
        .map(|(_, v)| v.clone())
        .unwrap();
    let budget: u64 = scaled["metadata"]["annotations"]["embed-worker/connection-budget"]
        .as_str()
        .expect("scaledobject.yaml states its connection budget")
        .parse()
        .unwrap();
    let replicas = scaled["spec"]["maxReplicaCount"].as_u64().unwrap();
    let mut total = 0;
    let mut parts = Vec::new();
    for (file, v) in &all {
        for c in containers(v) {
            let pool = container_pool(&c, default);
            // Index builds and promotions borrow a connection of their process's pool.
            let n = match v["kind"].as_str() {
                Some("Deployment") => replicas * pool,
                _ => pool,
            };
            parts.push(format!("{}: {n}", file.display()));
            total += n;
        }
    }
    assert!(
        total <= budget,
        "{total} connections > the stated budget {budget}: {parts:#?}"
    );
    // Every pod's pool is at least the worker's minimum.
    let deployment = all.iter().find(|(_, v)| v["kind"] == "Deployment").unwrap();
    let min = embed_worker::config::Settings::load(None)
        .unwrap()
        .min_pool()
        .total() as u64;
    for c in containers(&deployment.1) {
        assert!(container_pool(&c, default) >= min);
    }
}
