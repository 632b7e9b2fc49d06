"""Static checks of the deployment kit in deploy/ and docker-compose.yml.

Validates the Kubernetes manifests against the Kubernetes API schemas
(kubernetes-validate, strict: unknown fields are errors), checks what the
schemas cannot (the custom resources and the references between
manifests), checks that every file the compose file mounts exists, and
writes the ConfigMap's tollgate.toml to the path given as the only argument
so the caller can run `tollgate check-config` on it.

Exit status 0 when everything holds; otherwise every problem is printed.
"""

import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
problems = []


def check(condition, message):
    if not condition:
        problems.append(message)


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubernetes_schemas():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    check(listed == present, f"kustomization.yaml lists {sorted(listed)}, the directory holds {sorted(present)}")
    builtin = [K8S / name for name in sorted(listed) if name not in ("servicemonitor.yaml", "prometheusrule.yaml")]
    validate = pathlib.Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run(
        [str(validate), "--strict", "--quiet", *map(str, builtin)], capture_output=True, text=True
    )
    check(result.returncode == 0, f"kubernetes-validate failed:\n{result.stdout}{result.stderr}")
    return {name: documents(K8S / name) for name in listed}


def references(manifests):
    by_kind = {}
    for docs in manifests.values():
        for doc in docs:
            by_kind.setdefault(doc["kind"], []).append(doc)
            check(doc["metadata"].get("namespace", "tollgate") == "tollgate", f"{doc['kind']} outside the namespace")

    [deployment] = by_kind["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    check(deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), "Deployment selector misses its pods")
    [container] = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    check(ports == {"http": 8080, "admin": 8081}, f"container ports {ports}")

    secrets = {s["metadata"]["name"] for s in by_kind["Secret"]}
    for source in container.get("envFrom", []):
        check(source["secretRef"]["name"] in secrets, f"envFrom names a missing Secret {source}")
    config_maps = {c["metadata"]["name"]: c for c in by_kind["ConfigMap"]}
    for volume in pod["spec"]["volumes"]:
        if "configMap" in volume:
            check(volume["configMap"]["name"] in config_maps, f"volume names a missing ConfigMap {volume}")

    services = {s["metadata"]["name"]: s for s in by_kind["Service"]}
    for service in services.values():
        check(service["spec"]["selector"].items() <= labels.items(), f"Service {service['metadata']['name']} selects no pod")
        for port in service["spec"]["ports"]:
            check(port["targetPort"] in ports, f"Service port {port} targets an unknown container port")

    for kind in ("HorizontalPodAutoscaler",):
        [hpa] = by_kind[kind]
        target = hpa["spec"]["scaleTargetRef"]
        check(target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"], "HPA target")
    [pdb] = by_kind["PodDisruptionBudget"]
    check(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), "PDB selects no pod")
    check(pdb["spec"]["minAvailable"] < by_kind["HorizontalPodAutoscaler"][0]["spec"]["minReplicas"],
          "the PDB must leave room to evict one pod at the HPA's minimum")

    # Custom resources: checked by hand, the API schemas do not cover them.
    [monitor] = by_kind["ServiceMonitor"]
    check(monitor["apiVersion"] == "monitoring.coreos.com/v1", "ServiceMonitor apiVersion")
    matched = [s for s in services.values()
               if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    check(len(matched) == 1, f"the ServiceMonitor must select exactly the admin Service, selects {len(matched)}")
    if matched:
        service_ports = {p["name"] for p in matched[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            check(endpoint["port"] in service_ports, f"ServiceMonitor port {endpoint['port']} not on the Service")
            check(endpoint["path"] == "/metrics", "ServiceMonitor path")
        job = matched[0]["metadata"]["labels"].get(monitor["spec"].get("jobLabel", ""), matched[0]["metadata"]["name"])
        check(job == "tollgate", f"scraped as job {job!r}, the rules and dashboards expect 'tollgate'")

    [rule] = by_kind["PrometheusRule"]
    rules_file = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "tollgate-alerts.yml").read_text())
    check(rule["spec"]["groups"] == rules_file["groups"],
          "prometheusrule.yaml differs from deploy/prometheus/rules/tollgate-alerts.yml")
    return config_maps


def alert_runbooks():
    readme = (ROOT / "deploy" / "README.md").read_text().lower()
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "tollgate-alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule["alert"]
            check(rule["annotations"].get("summary"), f"{name} has no summary")
            check(rule["annotations"].get("runbook") == f"deploy/README.md#{name.lower()}", f"{name} runbook link")
            check(f"### {name.lower()}" in readme, f"deploy/README.md has no runbook section for {name}")


def compose():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = spec["services"]
    check({"tollgate", "postgres", "redis", "prometheus", "grafana"} <= services.keys(), "compose services")
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                check((ROOT / source).exists(), f"compose service {name} mounts missing {source}")
            else:
                check(source in spec.get("volumes", {}), f"compose service {name} uses undeclared volume {source}")
        for dependency in service.get("depends_on", []):
            check(dependency in services, f"{name} depends on unknown {dependency}")
    check(services["tollgate"]["build"] == ".", "tollgate is built from the root Dockerfile")
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    check(job["job_name"] == "tollgate", "scrape job name")
    check(job["static_configs"][0]["targets"] == ["tollgate:8081"], "Prometheus scrapes the admin listener")


def main():
    out = pathlib.Path(sys.argv[1])
    manifests = kubernetes_schemas()
    config_maps = references(manifests)
    alert_runbooks()
    compose()
    out.write_text(config_maps["tollgate-config"]["data"]["tollgate.toml"])
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{len(problems)} problems in the deployment kit")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
