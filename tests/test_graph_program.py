"""Splitting at a node of the traced graph, and storing parts without pickle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from handlers.graph_program import UnsafeGraphError, dump_graph_module, load_graph_module, split, weights_sha256


def test_resnet_split_and_round_trip():
    model = torchvision.models.resnet18(weights=None, num_classes=7).eval()
    upstream, downstream = split(model, "layer4_1_relu_1")
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        reference = model(x)
        features = upstream(x)
        assert features.shape == (2, 512, 2, 2)
        assert torch.equal(downstream(features), reference)
        up2 = load_graph_module(*dump_graph_module(upstream))
        down2 = load_graph_module(*dump_graph_module(downstream))
        assert torch.equal(down2(up2(x)), reference)
    assert weights_sha256(upstream, downstream) == weights_sha256(up2, down2)


def test_a_layer_bypassed_by_a_skip_connection_is_refused():
    model = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(ValueError, match="does not separate the graph"):
        split(model, "layer4_1_conv1")


def test_unknown_layer_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        split(nn.Sequential(nn.Linear(2, 2)), "nope")


class _Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def test_a_functional_relu_node_can_be_the_layer():
    model = _Functional().eval()
    upstream, downstream = split(model, "relu")
    x = torch.randn(3, 1, 8, 8)
    with torch.inference_mode():
        assert (upstream(x) >= 0).all()
        assert torch.allclose(downstream(upstream(x)), model(x))
        restored = load_graph_module(*dump_graph_module(downstream))
        assert torch.allclose(restored(upstream(x)), model(x))


class _Unlisted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = nn.Hardswish()  # a torch.nn leaf module outside the allow-list

    def forward(self, x):
        return torch.exp(self.act(self.fc(x)))


def test_operations_outside_the_allow_list_cannot_be_packaged():
    with pytest.raises(UnsafeGraphError, match="Hardswish is not allowed"):
        split(_Unlisted().eval(), "fc")


def test_parts_keep_the_traced_models_parameter_names():
    upstream, downstream = split(_Functional().eval(), "relu")
    assert sorted(upstream.state_dict()) == ["conv.bias", "conv.weight"]
    assert sorted(downstream.state_dict()) == ["fc.bias", "fc.weight"]
