"""The monitoring profile: Prometheus (scrape config, alert rules) and Grafana (provisioned datasource and
dashboard) in docker-compose.yml, and every metric their queries name exported by a live gateway."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import ROOT

MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "internvl-serving.json"
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def exprs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "expr" and isinstance(v, str)] + [
            e for k, v in node.items() if k != "expr" for e in exprs(v)
        ]
    return [e for v in node for e in exprs(v)] if isinstance(node, list) else []


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: label matchers, ranges, grouping, functions and numbers left out."""
    s = re.sub(r'"[^"]*"', '""', expr)
    s = re.sub(r"\$\w+|\{[^{}]*\}|\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", s):
        if not s[m.end() :].lstrip().startswith("(") and m.group(0) not in PROMQL_WORDS:
            names.add(m.group(0))
    return names


def scraped_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("# TYPE "):
            names.add(parts[2])
            if parts[3] == "histogram":
                names |= {parts[2] + suffix for suffix in ("_bucket", "_sum", "_count")}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_compose_monitoring_profile() -> None:
    services = compose()["services"]
    in_profile = {name for name, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert in_profile == {"prometheus", "grafana"}
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name in in_profile:
        for volume in services[name]["volumes"]:
            host = volume.split(":", 1)[0]
            assert not host.startswith("./") or (ROOT / host).exists(), f"{name} mounts a missing {host}"
    assert all("monitoring" not in s.get("profiles", []) for n, s in services.items() if n not in in_profile)
    assert services["ui"]["environment"]["REDIS_URL"].startswith("redis://")  # the Operations page reads Redis


def test_prometheus_config_and_alert_rules() -> None:
    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert (job["metrics_path"], job["static_configs"][0]["targets"]) == ("/metrics", ["gateway:8000"])
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # ./monitoring/prometheus is /etc/prometheus
    rules = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} >= {
        "GatewayDown",
        "RedisUnreachable",
        "JobsWithoutWorkers",
        "DeadLettersGrowing",
    }
    assert all(r["expr"].strip() and r["annotations"]["summary"] for r in rules)


def test_grafana_provisioning() -> None:
    provisioning = MONITORING / "grafana" / "provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    [provider] = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())["providers"]
    grafana_volumes = compose()["services"]["grafana"]["volumes"]
    assert f"./monitoring/grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]} and datasource["url"] == "http://prometheus:9090"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for wanted in ("queue depth", "time to first token", "tokens/s", "live workers", "dead letters", "resumes"):
        assert wanted in titles
    assert "outcomes" in titles


def test_every_queried_metric_is_exported(start_worker, start_gateway) -> None:  # type: ignore[no-untyped-def]
    start_worker(delay=0.001)
    _, base = start_gateway()
    payload = {"model": "fake", "prompt": [{"role": "user", "content": "metrics"}], "max_new_tokens": 4}
    assert httpx.post(base + "/worker_generate_stream", json=payload, timeout=30).status_code == 200
    exported = scraped_names(httpx.get(base + "/metrics", timeout=10).text)
    alerts = yaml.safe_load((MONITORING / "prometheus" / "alerts.yml").read_text())
    queried = set().union(*(metric_names(e) for e in exprs(json.loads(DASHBOARD.read_text())) + exprs(alerts)))
    assert len(queried) >= 9
    assert queried - exported - {"up"} == set()
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{m="x"}[5m]))) > 10') == {"a_bucket"}


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose client here (the YAML structure is checked above)",
)
def test_compose_monitoring_config_is_valid() -> None:
    subprocess.run(["docker", "compose", "--profile", "monitoring", "config", "-q"], cwd=ROOT, check=True, timeout=60)
