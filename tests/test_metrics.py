"""The Prometheus exposition, scraped over HTTP and read by prometheus_client's parser."""

from __future__ import annotations

import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families


def _scrape(server) -> dict:
    port = server.app.settings.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(family, sample_name, **labels) -> float:
    return sum(s.value for s in family.samples
               if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_count_requests_stages_batches_and_residual_share(server, client, mnist_split):
    before = _scrape(server)
    x = mnist_split["x_test"][0].numpy()
    answers = [client.explain(x, model="mnist", method="protonmf", heatmaps="none") for _ in range(3)]
    top = max(answers[0].components, key=lambda c: abs(c.contribution)).id  # the first of equals
    client.predict(x, model="mnist")
    try:
        client.explain(np.zeros((2, 2), np.float32), model="mnist")
    except Exception:
        pass
    after = _scrape(server)

    def delta(name, sample, **labels):
        return _value(after[name], sample, **labels) - (_value(before[name], sample, **labels) if name in before else 0)

    assert after["protoserve_request_duration_seconds"].type == "histogram"
    assert after["protoserve_stage_duration_seconds"].type == "histogram"
    assert after["protoserve_batch_size"].type == "histogram"
    assert after["protoserve_residual_share"].type == "histogram"
    assert after["protoserve_requests"].type == "counter"
    assert after["protoserve_queue_depth"].type == "gauge"
    assert delta("protoserve_requests", "protoserve_requests_total", rpc="Explain", model="mnist", code="OK") == 3
    assert delta("protoserve_requests", "protoserve_requests_total", rpc="Explain", model="mnist",
                 code="INVALID_ARGUMENT") == 1
    assert delta("protoserve_requests", "protoserve_requests_total", rpc="Predict", model="mnist", code="OK") == 1
    assert delta("protoserve_request_duration_seconds", "protoserve_request_duration_seconds_count",
                 rpc="Explain", model="mnist") == 4
    for stage in ("queue", "preprocess", "forward", "explain", "rows", "encode"):
        assert delta("protoserve_stage_duration_seconds", "protoserve_stage_duration_seconds_count",
                     model="mnist", stage=stage) >= 1, stage
    assert delta("protoserve_residual_share", "protoserve_residual_share_count", model="mnist", method="protonmf") == 3
    assert delta("protoserve_batch_size", "protoserve_batch_size_sum", model="mnist") == 4
    assert delta("protoserve_component_reported", "protoserve_component_reported_total", model="mnist",
                 method="protonmf", component=top) == 3
    assert delta("protoserve_component_reported", "protoserve_component_reported_total", model="mnist") == 3
    # Histogram buckets are cumulative and end in +Inf == count.
    family = after["protoserve_residual_share"]
    buckets = [s for s in family.samples if s.name.endswith("_bucket") and s.labels["method"] == "protonmf"]
    values = [s.value for s in buckets]
    assert values == sorted(values) and buckets[-1].labels["le"] == "+Inf"


def test_unknown_model_names_do_not_become_label_values(server, client):
    try:
        client.predict(np.zeros((1, 28, 28), np.float32), model="attacker-controlled-name")
    except Exception:
        pass
    families = _scrape(server)
    labels = {s.labels.get("model") for s in families["protoserve_requests"].samples}
    assert "attacker-controlled-name" not in labels
