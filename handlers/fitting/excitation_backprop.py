"""Excitation backprop (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016), pure torch.

Offline only (fit reports); the server never imports it.

Marginal winning probabilities (MWP). A top-down signal P, a probability distribution over
the units of a layer, is passed to the layer below. For an affine layer y = W x + b on
non-negative inputs x (post-ReLU activations or pixels), each output splits its probability
among its inputs in proportion to their excitatory input (the bias is ignored):

    P(x_j) = x_j Σ_i W⁺_ij P(y_i) / Σ_j' W⁺_ij' x_j'          W⁺ = max(W, 0)

so Σ_j P(x_j) = Σ_i P(y_i) wherever Σ_j' W⁺_ij' x_j' > 0 (an output with no excitatory input
passes nothing on). A ReLU passes P through (its output units are its input units); max
pooling sends each output's P to the input that won it; average pooling is an affine layer
with positive weights; a BatchNorm after a convolution or a linear layer is folded into it
(one affine map, whose W⁺ is taken after folding).

Contrastive MWP (c-MWP): the dual of the top unit is the same unit with its own incoming
weights negated ((−W)⁺ = W⁻ in the step above). Both signals go down to a contrast layer,
where c-MWP = max(P_unit − P_dual, 0); that map then goes further down by plain MWP to the
layer the saliency map is read at (TorchRay's ``contrastive_excitation_backprop``: its
``contrast_layer`` and ``saliency_layer``). Below the contrast layer MWP is linear in the
signal, so the mass a map puts in fixed regions of the input can be had from the transposed
map (:func:`region_operator`) at a cost that does not grow with the number of units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from handlers.graph_program import GraphProgram, Ref

_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS = (nn.ReLU, nn.Flatten, nn.Dropout, nn.Identity)
_MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


@dataclass
class Stage:
    """One layer of a chain, as excitation backprop sees it.

    forward : the layer as the model computes it, (B, *in) -> (B, *out)
    kind    : "affine" (learned weights), "pool" (average pooling: fixed positive weights),
              "max" (max pooling) or "pass" (ReLU, flatten: the same units)
    excite  : for "affine" and "pool", ``excite(x, negate)`` is the layer with W⁺ (W⁻ if
              ``negate``) and no bias, the map whose input gradient gives the step
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    kind: str
    excite: Callable[[torch.Tensor, bool], torch.Tensor] | None = None


def affine_stage(module: nn.Module, norm: nn.Module | None = None) -> Stage:
    """A Linear / Conv1d / Conv2d stage, with the BatchNorm that follows it folded in."""
    weight = module.weight.detach()
    if norm is not None:
        scale = (norm.weight.detach() / (norm.running_var + norm.eps).sqrt()) if norm.affine else \
            1 / (norm.running_var + norm.eps).sqrt()
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    if isinstance(module, nn.Linear):
        def layer(x, w):
            return F.linear(x, w)
    else:
        conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
        if module.padding_mode != "zeros":
            raise ValueError(f"excitation backprop: padding mode {module.padding_mode!r} is not supported")

        def layer(x, w):
            return conv(x, w, None, module.stride, module.padding, module.dilation, module.groups)
    positive, negative = weight.clamp_min(0), (-weight).clamp_min(0)

    def forward(x):
        return norm(module(x)) if norm is not None else module(x)

    return Stage(forward, "affine", lambda x, negate: layer(x, negative if negate else positive))


def linear_stage(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Stage:
    """An affine stage ``x @ weight + bias`` for ``weight`` (in, out): an explanation module's layer."""
    positive, negative = weight.clamp_min(0), (-weight).clamp_min(0)

    def forward(x):
        return x @ weight + bias if bias is not None else x @ weight

    return Stage(forward, "affine", lambda x, negate: x @ (negative if negate else positive))


def spatial_mean_stage() -> Stage:
    """(B, D, *grid) -> (B, D): the spatial mean, an average pooling."""
    def mean(x, negate=False):
        return x.flatten(2).mean(2)
    return Stage(mean, "pool", mean)


RELU = Stage(torch.relu, "pass")


def chain_of(program: GraphProgram) -> list[Stage]:
    """The stages of a program that is one chain of supported modules (each step reads the previous one).

    Raises
    ------
    ValueError
        If a step is not a module call on the previous value, or its module is not supported.
    """
    modules, previous = [], program.program.input_name
    for step in program.program.steps:
        if step.op != "call_module" or step.args != (Ref(previous),) or step.kwargs:
            raise ValueError(f"excitation backprop needs a chain of modules; step {step.name!r} is not one")
        modules.append(program.get_submodule(step.target))
        previous = step.name
    stages, i = [], 0
    while i < len(modules):
        module = modules[i]
        if isinstance(module, _AFFINE):
            norm = modules[i + 1] if i + 1 < len(modules) and isinstance(modules[i + 1], _NORMS) else None
            stages.append(affine_stage(module, norm))
            i += 2 if norm is not None else 1
            continue
        if isinstance(module, _PASS):
            stages.append(Stage(module, "pass"))
        elif isinstance(module, _MAX_POOLS):
            stages.append(Stage(module, "max"))
        elif isinstance(module, _AVG_POOLS):
            stages.append(Stage(module, "pool", lambda x, negate, pool=module: pool(x)))
        else:
            raise ValueError(f"excitation backprop does not support {type(module).__name__}")
        i += 1
    return stages


def activations(stages: list[Stage], x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every stage and the last output: ``len(stages) + 1`` tensors (B, ...)."""
    values = [x]
    with torch.no_grad():
        for stage in stages:
            values.append(stage.forward(values[-1]))
    return values


def step_down(stage: Stage, x: torch.Tensor, signal: torch.Tensor, negate: bool = False) -> torch.Tensor:
    """The signal at a stage's input from the signal at its output.

    Parameters
    ----------
    x : (B, *in) the stage's input (non-negative for "affine" and "pool" stages)
    signal : (B, *out) P at the stage's output

    Returns
    -------
    (B, *in) P at the stage's input; "affine" and "pool" stages conserve the mass of every
    output that has excitatory input, "max" and "pass" stages conserve all of it.
    """
    if stage.kind == "pass":
        return signal.reshape(x.shape)
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        if stage.kind == "max":
            (routed,) = torch.autograd.grad(stage.forward(x), x, signal)
            return routed
        total = stage.excite(x, negate)  # Σ_j' W⁺_ij' x_j'
        share = torch.where(total > 0, signal / total.clamp_min(1e-30), 0.0)
        (back,) = torch.autograd.grad(total, x, share)  # Σ_i W⁺_ij P(y_i) / total_i
    return x.detach() * back


def step_up(stage: Stage, x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`step_down` (a linear map of the signal once ``x`` is fixed), applied to ``row``.

    Parameters
    ----------
    x : (B, *in) the stage's input;  row : (B, *in)

    Returns
    -------
    (B, *out) with Σ row · step_down(signal) = Σ step_up(row) · signal for every signal
    """
    with torch.no_grad():
        if stage.kind == "pass":
            return row.reshape(stage.forward(x).shape)
        if stage.kind == "max":  # the row's value at each window's winner
            pool = stage.forward
            max_pool = F.max_pool1d if isinstance(pool, nn.MaxPool1d) else F.max_pool2d
            _, winner = max_pool(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                                 return_indices=True)
            return row.flatten(2).gather(2, winner.flatten(2)).reshape(winner.shape)
        total = stage.excite(x, False)
        return torch.where(total > 0, stage.excite(x * row, False) / total.clamp_min(1e-30), 0.0)


def contrast_signal(stages: list[Stage], values: list[torch.Tensor], signal: torch.Tensor, negate_at: int,
                    contrast: int) -> torch.Tensor:
    """c-MWP at the contrast layer: max(P_unit − P_dual, 0).

    Parameters
    ----------
    stages : S stages; ``values`` their inputs and last output (:func:`activations`) for B examples
    signal : (U, B, *out) one signal per unit and example at the last stage's output
    negate_at : the stage whose weights the dual has negated (the unit's own incoming weights); a
                "pool" stage's are positive, so there the dual passes nothing on
    contrast : index of the stage whose input is the contrast layer (at most ``negate_at``)

    Returns
    -------
    (U, B, *in of stage ``contrast``)
    """
    if not contrast <= negate_at < len(stages):
        raise ValueError(f"the dual's negated stage {negate_at} must lie between the contrast stage {contrast} "
                         f"and the top")
    u, b = signal.shape[:2]
    target, dual = signal.flatten(0, 1), signal.flatten(0, 1)
    for k in range(len(stages) - 1, contrast - 1, -1):
        x = values[k].repeat(u, *([1] * (values[k].dim() - 1)))
        target = step_down(stages[k], x, target)
        if k == negate_at and stages[k].kind == "pool":
            dual = torch.zeros_like(target)
        else:
            dual = step_down(stages[k], x, dual, negate=k == negate_at)
    contrasted = (target - dual).clamp_min(0)
    return contrasted.reshape(u, b, *contrasted.shape[1:])


def contrastive_mwp(stages: list[Stage], values: list[torch.Tensor], signal: torch.Tensor, negate_at: int,
                    contrast: int, saliency: int = 0) -> torch.Tensor:
    """c-MWP maps: :func:`contrast_signal`, then plain MWP down to the input of stage ``saliency``.

    Returns
    -------
    (U, B, *in of stage ``saliency``)
    """
    contrasted = contrast_signal(stages, values, signal, negate_at, contrast)
    u, b = contrasted.shape[:2]
    current = contrasted.flatten(0, 1)
    for k in range(contrast - 1, saliency - 1, -1):
        current = step_down(stages[k], values[k].repeat(u, *([1] * (values[k].dim() - 1))), current)
    return current.reshape(u, b, *current.shape[1:])


def region_operator(stages: list[Stage], values: list[torch.Tensor], regions: torch.Tensor,
                    contrast: int) -> torch.Tensor:
    """What a signal at the contrast layer puts in each region of the input, per example.

    MWP below the contrast layer is linear in the signal, so the mass that region p of the
    input gets from a signal c at the contrast layer is ⟨O_p, c⟩ with O_p the transpose of that
    map applied to region p's indicator: R propagations per example, however many units.

    Parameters
    ----------
    regions : (R, *input) 0/1 indicators of the input's regions
    contrast : index of the stage whose input is the contrast layer

    Returns
    -------
    (B, R, *in of stage ``contrast``) O
    """
    b, r = len(values[0]), len(regions)
    row = regions.to(values[0]).unsqueeze(0).expand(b, *regions.shape).flatten(0, 1)
    for k in range(contrast):
        row = step_up(stages[k], values[k].repeat_interleave(r, 0), row)
    return row.reshape(b, r, *row.shape[1:])
