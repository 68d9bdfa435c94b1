"""A served model as two parts around the explained layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from handlers.graph_program import non_negative_layers, split, weights_sha256


@dataclass
class InputSpec:
    """What one example looks like, and how an encoded image becomes one.

    shape : the example's shape without batch dimension, e.g. [1, 28, 28] or [1, 140]
    image : how to turn an encoded PNG/JPEG into an input (None: tensors only), e.g.
            ``{"mode": "L", "size": [28, 28], "scale": 1/255, "mean": [0.0], "std": [1.0]}``
    """

    shape: list[int]
    dtype: str = "float32"
    image: dict | None = None

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "image": self.image}

    @classmethod
    def from_json(cls, d: dict) -> "InputSpec":
        return cls(shape=[int(s) for s in d["shape"]], dtype=d.get("dtype", "float32"), image=d.get("image"))


@dataclass
class ModelParts:
    """``downstream(upstream(x))`` is the model; ``upstream(x)`` the explained layer.

    upstream   : (B, *input_shape) -> (B, *feature_shape)
    downstream : (B, *feature_shape) -> (B, K)
    """

    upstream: nn.Module
    downstream: nn.Module
    input_spec: InputSpec
    labels: list[str]
    layer: str
    feature_shape: list[int] = field(default_factory=list)
    weights_sha256: str = ""

    def __post_init__(self):
        self.upstream.eval()
        self.downstream.eval()
        if not self.feature_shape:
            with torch.no_grad():
                probe = torch.zeros(1, *self.input_spec.shape)
                self.feature_shape = list(self.upstream(probe).shape[1:])
        if not self.weights_sha256:
            self.weights_sha256 = weights_sha256(self.upstream, self.downstream)

    @classmethod
    def from_model(cls, model: nn.Module, layer: str, input_spec: InputSpec, labels: list[str]) -> "ModelParts":
        upstream, downstream = split(model, layer)
        return cls(upstream, downstream, input_spec, list(labels), layer)

    @property
    def device(self) -> torch.device:
        return next(self.upstream.parameters()).device

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "ModelParts":
        self.upstream.to(device)
        self.downstream.to(device)
        return self

    def features(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The layer's output for many inputs, in chunks. (N, *input_shape) -> (N, *feature_shape)."""
        with torch.inference_mode():
            return torch.cat([self.upstream(x[i:i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)])

    def logits(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N, *input_shape) -> (N, K)."""
        with torch.inference_mode():
            return torch.cat([self.downstream(self.upstream(x[i:i + batch_size].to(self.device)))
                              for i in range(0, len(x), batch_size)])


_NOT_POOLED_LINEAR = ("the network after layer {layer!r} is not global average pooling + linear; ProtoNMF's "
                      "decomposition is exact only for such a head: choose the last non-negative layer before it")


def pooled_linear_head(parts: ModelParts, atol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the downstream as global average pooling followed by a linear map.

    Returns ``(weight (K, D), bias (K,))`` with ``downstream(F) == mean_hw(F) @ weight.T + bias``
    for non-negative features ``F`` of shape (B, D, *grid) (a fully connected layer has no grid).
    The head must first be affine between random non-negative features (three small passes);
    it is then probed with constant feature maps, one per channel, and the identity is checked
    on the random features (a head starting with a ReLU passes: on those it is linear).

    Raises
    ------
    ValueError
        If the downstream is not of that form (within ``atol``, relative to the logits' scale).
    """
    d, *grid = parts.feature_shape
    device = parts.device
    with torch.inference_mode():
        generator = torch.Generator().manual_seed(0)
        probe = (torch.rand(8, d, *grid, generator=generator)
                 * torch.rand(8, 1, *([1] * len(grid)), generator=generator) * 4).to(device)
        # Affine on the segment between two probes, checked first: a deep head is refused after
        # three small passes instead of one pass per channel.
        halves = parts.downstream(torch.cat([probe, probe.flip(0), (probe + probe.flip(0)) / 2]))
        got, flipped, middle = halves.split(len(probe))
        if (middle - (got + flipped) / 2).abs().max().item() > atol * max(1.0, got.abs().max().item()):
            raise ValueError(_NOT_POOLED_LINEAR.format(layer=parts.layer))
        zero = torch.zeros(1, d, *grid, device=device)
        bias = parts.downstream(zero)[0]
        basis = torch.eye(d, device=device).reshape(d, d, *([1] * len(grid))).expand(d, d, *grid)
        weight = torch.cat([parts.downstream(basis[i:i + 512]) for i in range(0, d, 512)]) - bias
        weight = weight.T.contiguous()  # (K, D)
        expected = probe.flatten(2).mean(2) @ weight.T + bias if grid else probe @ weight.T + bias
        scale = max(1.0, got.abs().max().item())
    if (got - expected).abs().max().item() > atol * scale:
        raise ValueError(_NOT_POOLED_LINEAR.format(layer=parts.layer))
    return weight, bias


def linear_head_weight(parts: ModelParts) -> torch.Tensor | None:
    """The weight (K, D) of an average-pool + linear head after a non-negative layer, else None.

    When the explained layer is a ReLU's output, every feature map the methods derive from it by
    scaling channels stays non-negative, and then ``downstream(F) = mean_hw(F) @ weight.T + bias``
    holds exactly: removing channels or concepts changes the logits by a product with the weight,
    and no downstream pass is needed.
    """
    if parts.layer not in non_negative_layers(parts.upstream):
        return None
    try:
        return pooled_linear_head(parts)[0]
    except ValueError:
        return None
