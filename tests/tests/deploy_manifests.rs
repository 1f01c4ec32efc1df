//! The Kubernetes manifests (deploy/kubernetes): rendered with kustomize, validated offline
//! against the Kubernetes schemas, and held to the security properties the DaemonSet promises.
//! Also the PrometheusRule (same groups as the plain rules file), the PodMonitor and the plain
//! scrape config.

use std::collections::BTreeSet;
use std::fs;

use keepalive_tests::agent_bin;
use keepalive_tests::deploy::{
    ScratchDir, deploy_path, read_yaml, run_tool, tool_available, yaml_documents,
};
use serde_yaml_ng::Value as Yaml;

type TestResult = anyhow::Result<()>;

/// Exactly what the agent needs (see the comments in daemonset.yaml and
/// deploy_end_to_end.rs, which runs the agent with this set and without CAP_SYSLOG).
const CAPABILITIES: [&str; 5] = ["BPF", "PERFMON", "SYSLOG", "SYS_PTRACE", "DAC_READ_SEARCH"];
/// Host paths the pod may mount, all read-only.
const HOST_PATHS: [&str; 3] = ["/sys/kernel/btf", "/sys/fs/cgroup", "/proc"];

fn strings(value: &Yaml) -> Vec<String> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

fn daemonset() -> anyhow::Result<Yaml> {
    read_yaml(&deploy_path("kubernetes/daemonset.yaml"))
}

#[test]
fn kustomize_renders_every_manifest_and_they_pass_kubernetes_schema_validation() -> TestResult {
    let test = "kustomize_renders_every_manifest_and_they_pass_kubernetes_schema_validation";
    if !tool_available(
        test,
        "kubectl",
        "--help",
        "Debian package kubernetes-client",
    ) || !tool_available(
        test,
        "kubernetes-validate",
        "--version",
        "PyPI kubernetes-validate",
    ) {
        return Ok(());
    }
    let dir = deploy_path("kubernetes");
    // Every manifest in the directory is part of the kustomization.
    let kustomization = read_yaml(&dir.join("kustomization.yaml"))?;
    let listed: BTreeSet<String> = strings(&kustomization["resources"]).into_iter().collect();
    let on_disk: BTreeSet<String> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed,
        on_disk,
        "kustomization.yaml resources vs files in {}",
        dir.display()
    );

    let (ok, rendered) = run_tool("kubectl", &["kustomize", &dir.to_string_lossy()], None)?;
    assert!(ok, "kubectl kustomize failed:\n{rendered}");
    let documents = yaml_documents(&rendered)?;
    let kinds: BTreeSet<&str> = documents
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "DaemonSet",
            "Namespace",
            "PodMonitor",
            "PrometheusRule",
            "ServiceAccount"
        ])
    );
    for document in &documents {
        if document["kind"] != "Namespace" {
            assert_eq!(
                document["metadata"]["namespace"], "keepalive-agent",
                "{:?} is outside the namespace",
                document["kind"]
            );
        }
    }

    let scratch = ScratchDir::new("manifests")?;
    let rendered_path = scratch.0.join("rendered.yaml");
    fs::write(&rendered_path, &rendered)?;
    let (ok, output) = run_tool(
        "kubernetes-validate",
        &["--strict", &rendered_path.to_string_lossy()],
        None,
    )?;
    assert!(ok, "kubernetes-validate --strict failed:\n{output}");
    // The built-in kinds must have been checked, not skipped; the operator's CRDs have no
    // schema there (checked structurally by the tests below).
    for kind in ["namespace", "serviceaccount", "daemonset"] {
        assert!(
            output.contains(&format!("passed for resource {kind}/keepalive-agent")),
            "{kind} was not validated:\n{output}"
        );
    }
    Ok(())
}

#[test]
fn daemonset_uses_capabilities_only_with_a_read_only_root_and_read_only_host_mounts() -> TestResult
{
    let ds = daemonset()?;
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    let security = &container["securityContext"];

    assert_ne!(security["privileged"], Yaml::Bool(true), "privileged");
    assert_eq!(security["privileged"], Yaml::Bool(false));
    assert_eq!(security["allowPrivilegeEscalation"], Yaml::Bool(false));
    assert_eq!(security["readOnlyRootFilesystem"], Yaml::Bool(true));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    assert_eq!(added, CAPABILITIES.iter().map(|c| c.to_string()).collect());
    assert!(!added.contains("SYS_ADMIN"));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    assert_ne!(
        pod["hostNetwork"],
        Yaml::Bool(true),
        "hostNetwork is not needed"
    );
    assert_eq!(pod["automountServiceAccountToken"], Yaml::Bool(false));

    // Host mounts: only the documented paths, all read-only; no tracefs.
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let mut host_paths = BTreeSet::new();
    for volume in volumes {
        let path = volume["hostPath"]["path"]
            .as_str()
            .expect("only hostPath volumes");
        assert!(HOST_PATHS.contains(&path), "unexpected host mount {path}");
        assert!(!path.contains("tracing") && !path.contains("debugfs"));
        host_paths.insert(path);
    }
    assert_eq!(host_paths, HOST_PATHS.into_iter().collect());
    for mount in container["volumeMounts"].as_sequence().expect("mounts") {
        assert_eq!(mount["readOnly"], Yaml::Bool(true), "{mount:?} is writable");
    }
    Ok(())
}

#[test]
fn daemonset_runs_on_every_node_with_agent_served_probes_and_sized_resources() -> TestResult {
    let ds = daemonset()?;
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];

    // Every taint tolerated: one toleration, operator Exists, no key or effect.
    let tolerations = pod["tolerations"].as_sequence().expect("tolerations");
    assert!(
        tolerations.iter().any(|t| t["operator"] == "Exists"
            && t.get("key").is_none()
            && t.get("effect").is_none()),
        "{tolerations:?}"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_ne!(
        pod["hostPID"],
        Yaml::Bool(true),
        "the host's /proc is read via --proc.root"
    );

    let ports = container["ports"].as_sequence().expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["name"], "metrics");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    for probe in ["readinessProbe", "startupProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    let resources = &container["resources"];
    for (kind, key) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        assert!(
            resources[kind][key].as_str().is_some(),
            "resources.{kind}.{key} missing"
        );
    }

    // The args are flags the agent has, and the timer list is read from the host's /proc mount.
    let args = strings(&container["args"]);
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let (ok, help) = run_tool(&agent_bin().to_string_lossy(), &["run", "--help"], None)?;
    assert!(ok, "keepalive-agent run --help failed: {help}");
    for arg in &args[1..] {
        let flag = arg.split('=').next().unwrap_or(arg);
        assert!(
            help.contains(flag),
            "`keepalive-agent run` has no flag {flag}"
        );
    }
    let timer_list = args
        .iter()
        .find_map(|a| a.strip_prefix("--kernel.timer-list="))
        .expect("--kernel.timer-list: the container's /proc/timer_list is masked");
    let host_proc_mount = container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "host-proc")
        .and_then(|m| m["mountPath"].as_str())
        .expect("host /proc mount");
    assert_eq!(timer_list, format!("{host_proc_mount}/timer_list"));
    let proc_root = args.iter().find_map(|a| a.strip_prefix("--proc.root="));
    assert_eq!(proc_root, Some(host_proc_mount), "--proc.root");
    let cgroup_mount = container["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "cgroup")
        .and_then(|m| m["mountPath"].as_str())
        .expect("host cgroup mount");
    let cgroup_root = args.iter().find_map(|a| a.strip_prefix("--cgroup.root="));
    assert_eq!(cgroup_root, Some(cgroup_mount), "--cgroup.root");
    Ok(())
}

#[test]
fn podmonitor_scrapes_the_daemonset_metrics_port_as_job_keepalive_agent() -> TestResult {
    let ds = daemonset()?;
    let monitor = read_yaml(&deploy_path("kubernetes/podmonitor.yaml"))?;
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_mapping()
        .expect("matchLabels");
    for (key, value) in selector {
        assert_eq!(
            &pod_labels[key], value,
            "PodMonitor selects {key:?}={value:?}"
        );
    }
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], "metrics");
    let sets_job = endpoint["relabelings"]
        .as_sequence()
        .into_iter()
        .flatten()
        .any(|r| r["targetLabel"] == "job" && r["replacement"] == "keepalive-agent");
    assert!(sets_job, "the alerts select job=\"keepalive-agent\"");
    Ok(())
}

#[test]
fn prometheusrule_holds_exactly_the_plain_rules_file_groups() -> TestResult {
    let plain_path = deploy_path("prometheus/keepalive-rules.yml");
    let crd_path = deploy_path("kubernetes/prometheusrule.yaml");
    let crd_text = fs::read_to_string(&crd_path)?;
    if std::env::var_os("KEEPALIVE_REGENERATE").is_some() {
        // Header (everything up to `spec:`) kept, the groups re-indented from the plain file.
        let plain = fs::read_to_string(&plain_path)?;
        let header_end = crd_text.find("\nspec:\n").expect("spec:") + "\nspec:\n".len();
        let groups_start = plain.find("\ngroups:\n").expect("groups:") + 1;
        let indented: String = plain[groups_start..]
            .lines()
            .map(|l| {
                if l.is_empty() {
                    "\n".to_owned()
                } else {
                    format!("  {l}\n")
                }
            })
            .collect();
        fs::write(&crd_path, format!("{}{indented}", &crd_text[..header_end]))?;
    }
    let plain = read_yaml(&plain_path)?;
    let crd = read_yaml(&crd_path)?;
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(
        crd["spec"]["groups"],
        plain["groups"],
        "{} differs from {}; regenerate it with KEEPALIVE_REGENERATE=1 cargo test -p \
         keepalive-tests --test deploy_manifests",
        crd_path.display(),
        plain_path.display()
    );
    Ok(())
}

#[test]
fn plain_scrape_config_passes_promtool_check_config() -> TestResult {
    let test = "plain_scrape_config_passes_promtool_check_config";
    if !tool_available(test, "promtool", "--version", "Debian package prometheus") {
        return Ok(());
    }
    let mut config = read_yaml(&deploy_path("prometheus/scrape-config.yml"))?;
    let job = &mut config["scrape_configs"][0];
    assert_eq!(job["job_name"], "keepalive-agent");
    // Debian builds Prometheus without Kubernetes service discovery, so promtool here rejects
    // `kubernetes_sd_configs`; check everything else (relabelling included) with a static
    // target in its place, and the discovery block by shape.
    let discovery = job
        .as_mapping_mut()
        .expect("job")
        .remove("kubernetes_sd_configs")
        .expect("kubernetes_sd_configs");
    assert_eq!(discovery[0]["role"], "pod");
    job["static_configs"] = serde_yaml_ng::from_str("[{targets: ['127.0.0.1:9879']}]")?;
    let scratch = ScratchDir::new("scrape-config")?;
    let path = scratch.0.join("prometheus.yml");
    fs::write(&path, serde_yaml_ng::to_string(&config)?)?;
    let (ok, output) = run_tool(
        "promtool",
        &["check", "config", &path.to_string_lossy()],
        None,
    )?;
    assert!(ok, "promtool check config failed:\n{output}");
    Ok(())
}
