"""monitoring/: Prometheus rules and config, the Grafana dashboard, the compose stack.

`promtool` (Debian/Ubuntu package `prometheus`, or the Prometheus release tarball) checks
the rules, runs their unit tests and parses every dashboard query; without it those
tests skip and say so. Independently of promtool, every metric and label name the rules,
the dashboard and the autoscaler use must be in the live server's exposition.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
MONITORING = REPO_ROOT / "monitoring"
RULES = MONITORING / "prometheus" / "alerts.yaml"
RULES_TEST = MONITORING / "prometheus" / "alerts_test.yaml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "protoserve-dashboard.json"
COMPOSE = MONITORING / "docker-compose.yaml"
HPA = REPO_ROOT / "deploy" / "k8s" / "hpa.yaml"

METRIC_NAME = re.compile(r"\bprotoserve_[a-z0-9_]+")
BY_CLAUSE = re.compile(r"\b(?:by|without|ignoring|on)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\{([^{}]*)\}")
LABEL_IN_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# Labels Prometheus adds or histograms carry, beside the ones the server defines.
TARGET_LABELS = {"le", "instance", "job", "pod", "namespace", "service", "container", "endpoint"}
# Grafana's variables, replaced by representative values so that promtool can parse a query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "1m", "$model": ".*", "$method": ".*"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (apt-get install prometheus, or put the Prometheus release's "
                    "promtool on PATH); the rules are still checked by the name tests below")
    return path


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=cwd)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_queries() -> list[str]:
    queries = [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["definition"]))
    return queries


def _with_values(query: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        query = query.replace(variable, value)
    return query


# ------------------------------------------------------------------------------- promtool


def test_promtool_accepts_the_rules():
    result = _run(_promtool(), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rules_unit_tests_pass():
    """Target down, server-error rate (client errors excluded), queue saturation, residual-share drift."""
    result = _run(_promtool(), "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config():
    result = _run(_promtool(), "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_dashboard_query_parses(tmp_path):
    promtool = _promtool()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": _with_values(q)} for i, q in enumerate(_dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = _run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------ names against the server


@pytest.fixture(scope="module")
def exposition(server) -> tuple[set[str], set[str]]:
    """(sample names, label names) the live server exports, families without samples included."""
    port = server.app.settings.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",),
                "summary": ("_sum", "_count", "")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    labels = set(TARGET_LABELS)
    for metric in vars(server.app.metrics).values():
        labels.update(getattr(metric, "_labelnames", ()))
    return names, labels


def _names_and_labels(query: str) -> tuple[set[str], set[str]]:
    labels = set()
    for clause in BY_CLAUSE.findall(query):
        labels.update(name.strip() for name in clause.split(",") if name.strip())
    for matcher in MATCHER.findall(query):
        labels.update(LABEL_IN_MATCHER.findall(matcher))
    return set(METRIC_NAME.findall(query)), labels


def _check(queries: list[str], exposition) -> None:
    names, labels = exposition
    for query in queries:
        used_names, used_labels = _names_and_labels(query)
        assert used_names, query
        assert used_names <= names, f"{sorted(used_names - names)} not exported by the server: {query}"
        assert used_labels <= labels, f"labels {sorted(used_labels - labels)} not on any metric: {query}"


def test_rule_metric_names_exist_in_the_exposition(exposition):
    _check([rule["expr"] for rule in _rules() if "protoserve_" in rule["expr"]], exposition)


def test_dashboard_metric_names_exist_in_the_exposition(exposition):
    _check(_dashboard_queries(), exposition)


def test_hpa_custom_metric_exists_in_the_exposition(exposition):
    hpa = yaml.safe_load(HPA.read_text())
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods and set(pods) <= exposition[0]


def test_a_misspelled_metric_would_be_caught(exposition):
    with pytest.raises(AssertionError):
        _check(["rate(protoserve_request_total[5m])"], exposition)
    with pytest.raises(AssertionError):
        _check(["sum by (modle) (protoserve_queue_depth)"], exposition)


# ---------------------------------------------------------------------------- content


def test_alerts_cover_latency_errors_saturation_drift_and_down():
    alerts = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    assert {"ProtoserveTargetDown", "ProtoserveHighP99Latency", "ProtoserveHighErrorRate",
            "ProtoserveQueueSaturated", "ProtoserveResidualShareDrift"} <= set(alerts)
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    records = {rule["record"]: rule["expr"] for rule in _rules() if "record" in rule}
    assert "[1h]" in records["protoserve:residual_share:p90_1h"]
    assert "[1d]" in records["protoserve:residual_share:p90_1d_baseline"]
    assert "0.99" in alerts["ProtoserveHighP99Latency"]["expr"]


def test_dashboard_shows_what_the_issue_asks_for():
    dashboard = _dashboard()
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    by_metric = {}
    for panel in panels:
        for target in panel["targets"]:
            for name in METRIC_NAME.findall(target["expr"]):
                by_metric.setdefault(name, []).append((panel, target["expr"]))

    def has(metric: str, *fragments: str, kind: str | None = None) -> bool:
        return any(all(f in expr for f in fragments) and (kind is None or panel["type"] == kind)
                   for panel, expr in by_metric.get(metric, []))

    assert has("protoserve_request_duration_seconds_bucket", "histogram_quantile(0.5")
    assert has("protoserve_request_duration_seconds_bucket", "histogram_quantile(0.99")
    assert has("protoserve_stage_duration_seconds_bucket", "histogram_quantile(0.99", "stage")
    assert has("protoserve_batch_size_bucket") and has("protoserve_queue_depth")
    assert has("protoserve_requests_total", "by (code)")
    assert has("protoserve_residual_share_bucket", kind="heatmap")
    assert has("protoserve_residual_share_bucket", "model, method", "histogram_quantile(0.9")
    assert has("protoserve_component_reported_total", "topk(")
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_compose_wires_the_service_prometheus_and_grafana():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"protoserve", "prometheus", "grafana"}
    protoserve = services["protoserve"]
    assert protoserve["image"] == "protoserve:0.1.0"
    assert (COMPOSE.parent / protoserve["build"]["context"] / protoserve["build"]["dockerfile"]).is_file()
    assert {p.rsplit(":", 1)[-1] for p in protoserve["ports"]} == {"50051", "8000", "9100"}
    assert any(v.endswith(":/models:ro") for v in protoserve["volumes"])

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "protoserve"]
    assert job["static_configs"][0]["targets"] == ["protoserve:9100"]  # the compose service and metrics port
    assert config["rule_files"] == [RULES.name]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]

    grafana = services["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    assert (COMPOSE.parent / "grafana" / "protoserve-dashboard.json").samefile(
        COMPOSE.parent / next(src for src, dst in mounts.items() if dst.endswith("protoserve-dashboard.json")))
    provisioning = COMPOSE.parent / next(src for src, dst in mounts.items() if dst == "/etc/grafana/provisioning")
    provider = yaml.safe_load((provisioning / "dashboards" / "protoserve.yaml").read_text())["providers"][0]
    assert any(dst.startswith(provider["options"]["path"] + "/") for dst in mounts.values())
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    variable = next(v for v in _dashboard()["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]

    gpu = yaml.safe_load((COMPOSE.parent / "docker-compose.gpu.yaml").read_text())
    [device] = gpu["services"]["protoserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
