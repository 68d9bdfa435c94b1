"""Offline half of srae: the fit and its report (the online explainer is handlers/explainers/srae.py).

SRAE: per-class explanation modules whose few x-features reproduce the class's logit.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from handlers.base import Component, FitData, FittedMethod
from handlers.exemplars import crops_png, grid_cell_box
from handlers.explainers.srae import NAME, SRAEConfig, encode, grad_cam, spatial_mean, xfeature_gradient
from handlers.fitting.excitation_backprop import (
    RELU,
    activations,
    chain_of,
    contrast_signal,
    linear_stage,
    region_operator,
    spatial_mean_stage,
)
from handlers.model import ModelParts, pooled_linear_head

EXEMPLARS_PER_XFEATURE = 3


VARIANTS = ("srae", "nn", "sae")  # the served module and the fit report's two baselines


LOCALITY_REGIONS = 3  # locality: the input image cut into 3 x 3 regions
# The paper's held-out data: the remaining positives and 2000 negatives per class.
TEST_NEGATIVES = 2000
# Z column of Table 1: held-out images per class its c-MWP maps average over (128 maps per image).
Z_LOCALITY_IMAGES = 5


# The x-features' biases start positive: a ReLU x-feature that starts negative on every
# example never gets a gradient, and without this a few of every 50 stay zero for good.
XFEATURE_BIAS_INIT = 0.5


def region_masks(grid_hw: tuple[int, int]) -> torch.Tensor:
    """(R, H, W) 0/1 masks of LOCALITY_REGIONS x LOCALITY_REGIONS regions of a grid, row-major.

    Rows and columns are cut into bands of as equal size as the grid allows, the middle
    band the largest (7 -> 2, 3, 2; 28 -> 9, 10, 9).
    """
    rows, cols = (torch.tensor(_bands(size)) for size in grid_hw)
    index = rows[:, None] * LOCALITY_REGIONS + cols[None, :]  # (H, W) region of each cell
    return (index == torch.arange(LOCALITY_REGIONS ** 2)[:, None, None]).float()


def locality(mass: torch.Tensor) -> torch.Tensor:
    """The paper's locality H_n of each unit: the entropy (nats) of its region histogram averaged over examples.

    Parameters
    ----------
    mass : (U, B, R) the mass of unit u's map on example b in each region (non-negative)

    Returns
    -------
    (U,) H_n = −Σ_p S̄_p log S̄_p, S̄ the mean over the examples whose map has mass of their histograms
    S_p = mass_p / Σ_p' mass_p' (the paper's P(region p | unit)); NaN for a unit without mass anywhere
    """
    total = mass.sum(2, keepdim=True)
    has_mass = total > 0
    histogram = torch.where(has_mass, mass / total.clamp_min(1e-30), 0.0)
    count = has_mass.sum(1)
    mean = histogram.sum(1) / count.clamp_min(1)  # sums to 1 where count > 0
    entropy = -(mean * mean.clamp_min(1e-30).log()).sum(1)
    return torch.where(count.squeeze(1) > 0, entropy, float("nan"))


def _bands(size: int) -> list[int]:
    """Band index of each of ``size`` rows: LOCALITY_REGIONS symmetric bands (7 -> 0,0,1,1,1,2,2)."""
    edge = size // LOCALITY_REGIONS
    return [0 if i < edge else LOCALITY_REGIONS - 1 if i >= size - edge else 1 for i in range(size)]


def _training_sets(y: torch.Tensor, classes: list[int], positives: int | None, negatives: int | None,
                   negative_ratio: float | None, generator: torch.Generator) -> list[torch.Tensor]:
    """Per class: ``positives`` of its examples (None: all), then negatives drawn from the other classes:
    ``negative_ratio`` times as many as the positives when set, else ``negatives`` (None: all); both
    capped at what the data has."""
    sets = []
    for c in classes:
        own = (y == c).nonzero().flatten()
        others = (y != c).nonzero().flatten()
        n_pos = len(own) if positives is None else min(len(own), positives)
        chosen = own[torch.randperm(len(own), generator=generator)[:n_pos]].sort().values
        n_neg = (round(negative_ratio * n_pos) if negative_ratio is not None
                 else len(others) if negatives is None else negatives)
        drawn = others[torch.randperm(len(others), generator=generator)[:min(len(others), n_neg)]].sort().values
        sets.append(torch.cat([chosen, drawn]))
    return sets


def _init_linear(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """nn.Linear's default initialisation, U(−1/√fan_in, 1/√fan_in)."""
    return (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)


def _train(z: torch.Tensor, target: torch.Tensor, sets: list[torch.Tensor], config: SRAEConfig,
           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Train SRAE, NN and SAE modules for every class at once, as one batched program.

    Parameters
    ----------
    z : (N, D) standardized pooled training features
    target : (M, N) standardized logit of each explained class
    sets : M index tensors into z, each class's training examples

    Returns
    -------
    Parameters stacked over G = 3·M modules, variant-major (VARIANTS order):
    w1 (G, D, Hd), b1 (G, Hd), w2 (G, Hd, n), b2 (G, n), v (G, n), b (G,),
    u1 (G, n, Hd), c1 (G, Hd), u2 (G, Hd, D), c2 (G, D).
    """
    m, dim, device = len(sets), z.shape[1], z.device
    n_xfeatures, hidden = config.n_xfeatures, config.hidden
    v_count = len(VARIANTS)
    # The variants of a class share initialisation and batches: a controlled comparison.
    shapes = {"w1": ((dim, hidden), dim), "b1": ((hidden,), dim), "w2": ((hidden, n_xfeatures), hidden),
              "b2": ((n_xfeatures,), hidden), "v": ((n_xfeatures,), n_xfeatures), "b": ((), n_xfeatures),
              "u1": ((n_xfeatures, hidden), n_xfeatures), "c1": ((hidden,), n_xfeatures),
              "u2": ((hidden, dim), hidden), "c2": ((dim,), hidden)}
    params = {name: _init_linear((m, *shape), fan_in, generator).to(device).repeat(v_count, *([1] * len(shape)))
              for name, (shape, fan_in) in shapes.items()}
    params["b2"] += XFEATURE_BIAS_INIT
    for p in params.values():
        p.requires_grad_()
    # Which reconstruction penalty each module pays: SRAE the log penalty, SAE its quadratic limit, NN none.
    log_penalty, square_penalty = (torch.tensor([float(v == name) for v in VARIANTS for _ in range(m)], device=device)
                                   for name in ("srae", "sae"))
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)
    sizes = torch.tensor([len(s) for s in sets])
    padded = torch.stack([s[torch.arange(int(sizes.max())) % len(s)] for s in sets])  # (M, L)
    rows = torch.arange(m).unsqueeze(1)
    for _ in range(config.epochs):
        # One permutation per class; a class with fewer examples wraps around.
        order = torch.argsort(torch.rand(padded.shape, generator=generator), dim=1)
        order = order % sizes.unsqueeze(1)
        for batch in order.split(config.batch_size, dim=1):
            index = padded[rows, batch]  # (M, b) example indices
            xb = z[index.to(device)].repeat(v_count, 1, 1)  # (G, b, D)
            yb = target[rows.to(device), index.to(device)].repeat(v_count, 1)  # (G, b)
            _, x = encode(xb, params["w1"], params["b1"], params["w2"], params["b2"])
            prediction = (x * params["v"].unsqueeze(1)).sum(2) + params["b"].unsqueeze(1)
            fit_loss = (prediction - yb).pow(2).mean(1)
            decoded = torch.baddbmm(params["c1"].unsqueeze(1), x, params["u1"]).relu()
            reconstruction = torch.baddbmm(params["c2"].unsqueeze(1), decoded, params["u2"])
            mse = (reconstruction - xb).pow(2).mean(1)  # (G, D): mean_i of the squared error per dimension
            penalty = log_penalty * torch.log1p(config.q * mse).mean(1) + square_penalty * (config.q * mse).mean(1)
            loss = (fit_loss + config.beta * penalty).sum()  # modules are independent: Adam is elementwise
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {name: p.detach() for name, p in params.items()}


def fit(parts: ModelParts, data: FitData, config: SRAEConfig = SRAEConfig(), log=print) -> FittedMethod:
    """Fit an SRAE explanation module per explained class on ``data.x_train``; report on ``data.x_test``.

    Returns
    -------
    FittedMethod with tensors ``classes_`` (M,) int64, ``encoder_w1_`` (M, D, Hd), ``encoder_b1_`` (M, Hd),
    ``encoder_w2_`` (M, Hd, n), ``encoder_b2_`` (M, n), ``readout_weight_`` (M, n) and ``readout_bias_`` (M,),
    the encoder reading the raw pooled features and the readout speaking logits.
    """
    start = time.perf_counter()
    num_classes = parts.num_classes
    classes = list(range(num_classes)) if config.classes is None else sorted(set(config.classes))
    if not all(0 <= c < num_classes for c in classes):
        raise ValueError(f"classes must be a subset of 0..{num_classes - 1}, got {classes}")
    config = dataclasses.replace(config, classes=classes)
    generator = torch.Generator().manual_seed(config.random_state)
    train_sets = _training_sets(data.y_train, classes, config.positives, config.negatives, config.negative_ratio,
                                generator)
    test_sets = _training_sets(data.y_test, classes, None, TEST_NEGATIVES, config.negative_ratio, generator)
    for c, s in zip(classes, train_sets):
        if not (data.y_train[s] == c).any():
            raise ValueError(f"class {c} ({parts.labels[c]!r}) has no training examples")

    features = parts.features(data.x_train)
    logits = _logits(parts, features)
    z = spatial_mean(features).float()
    mean = z.mean(0)
    # Standardize while training; a (nearly) constant dimension keeps a floor on its scale.
    scale = z.std(0).clamp_min(1e-2 * z.std(0).mean())
    class_index = torch.tensor(classes, device=z.device)
    target = logits.float()[:, class_index].T  # (M, N)
    target_mean = torch.stack([target[i, s.to(z.device)].mean() for i, s in enumerate(train_sets)])
    target_scale = torch.stack([target[i, s.to(z.device)].std() for i, s in enumerate(train_sets)]).clamp_min(1e-6)
    n_pos = int((data.y_train[train_sets[0]] == classes[0]).sum())
    log(f"srae: {len(classes)} classes x {len(VARIANTS)} variants ({', '.join(VARIANTS)}), "
        f"{n_pos} positives + {len(train_sets[0]) - n_pos} negatives for class {parts.labels[classes[0]]!r}")
    params = _train((z - mean) / scale, (target - target_mean[:, None]) / target_scale[:, None], train_sets, config,
                    generator)
    modules = _fold(params, mean, scale, target_mean.repeat(len(VARIANTS)), target_scale.repeat(len(VARIANTS)))
    train_seconds = time.perf_counter() - start
    log(f"srae: features and {len(VARIANTS) * len(classes)} trained modules in {train_seconds:.1f}s")

    test_features = parts.features(data.x_test)
    report = _report(parts, modules, params, (mean, scale), classes,
                     train=(z, logits, data.y_train, train_sets),
                     test=(test_features, _logits(parts, test_features), data.y_test, test_sets))
    locality_start = time.perf_counter()
    report["z_definition"] = (f"the spatial mean of {parts.layer!r} ({parts.feature_shape[0]} values)" if features.dim() > 2
                              else f"{parts.layer!r} as is ({parts.feature_shape[0]} values)")
    report.update(_locality(parts, modules, classes, data.x_test, data.y_test, config.locality_images))
    log(f"srae: excitation-backprop locality in {time.perf_counter() - locality_start:.1f}s")
    m = len(classes)
    served = {name: t[:m].contiguous().cpu() for name, t in modules.items()}  # the SRAE variant comes first
    factors = {"classes_": torch.tensor(classes, dtype=torch.int64),
               "encoder_w1_": served["w1"], "encoder_b1_": served["b1"],
               "encoder_w2_": served["w2"], "encoder_b2_": served["b2"],
               "readout_weight_": served["v"], "readout_bias_": served["b"]}
    components = [Component(id=f"c{c}.x{j}", label=f"{parts.labels[c]} x-feature {j}", class_index=c)
                  for c in classes for j in range(config.n_xfeatures)]
    exemplars = {}
    if features.dim() == 4 and len(parts.input_spec.shape) == 3:
        exemplars = _exemplars(data.x_train, data.y_train, features, served, classes, parts.input_spec.shape[1:])
    report["fit_seconds"] = round(time.perf_counter() - start, 6)
    log("srae: F_reg train / test / locality: " + "; ".join(
        f"{v} {report['f_reg_train'][v]:.4f} / {report['f_reg_test'][v]:.4f} / {report.get('locality', {}).get(v)}"
        for v in VARIANTS) + f" ({report['fit_seconds']:.1f}s)")
    return FittedMethod(NAME, factors, components, dataclasses.asdict(config), report, exemplars)


def _logits(parts: ModelParts, features: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The downstream on precomputed features: (N, *feature_shape) -> (N, K)."""
    with torch.inference_mode():
        return torch.cat([parts.downstream(features[i:i + batch_size]) for i in range(0, len(features), batch_size)])


def _fold(params: dict[str, torch.Tensor], mean: torch.Tensor, scale: torch.Tensor, target_mean: torch.Tensor,
          target_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fold the standardizations into the weights: an encoder on raw Z and a readout in logits."""
    w1 = params["w1"] / scale[:, None]
    return {"w1": w1, "b1": params["b1"] - torch.einsum("d,gdh->gh", mean, w1),
            "w2": params["w2"], "b2": params["b2"],
            "v": params["v"] * target_scale[:, None], "b": params["b"] * target_scale + target_mean}


def _forward(modules: dict[str, torch.Tensor], z: torch.Tensor, sets: list[torch.Tensor],
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every module on its class's examples: per module (hidden, x-features, readout ȳ)."""
    out = []
    m = len(sets)
    for g in range(len(modules["w1"])):
        zg = z[sets[g % m].to(z.device)].unsqueeze(0)
        hidden, x = encode(zg, *(modules[k][g:g + 1] for k in ("w1", "b1", "w2", "b2")))
        out.append((hidden[0], x[0], x[0] @ modules["v"][g] + modules["b"][g]))
    return out


def _report(parts: ModelParts, modules: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
            standardization: tuple[torch.Tensor, torch.Tensor], classes: list[int], *, train: tuple, test: tuple,
            ) -> dict:
    """The paper's Table 1 for SRAE and the baselines: F_reg on train and test, locality."""
    m, labels = len(classes), parts.labels
    mean, scale = standardization

    def r(x) -> float:
        return round(float(x), 6)

    def per_variant(values: list) -> dict[str, float | None]:
        """Mean over classes of each variant's per-module values (NaN values left out; None if all are)."""
        means = torch.tensor([float(x) for x in values]).reshape(len(VARIANTS), m).nanmean(1)
        return {v: None if math.isnan(means[i]) else r(means[i]) for i, v in enumerate(VARIANTS)}

    with torch.no_grad():
        f_reg, reference = {}, {}
        for split, (feats, logits, _, sets) in (("train", train), ("test", test)):
            z = spatial_mean(feats).float()
            outputs = _forward(modules, z, sets)
            gaps = [(yb - logits[sets[g % m].to(z.device), classes[g % m]]).abs().mean() for g, (_, _, yb)
                    in enumerate(outputs)]
            f_reg[split] = gaps
            target = [logits[s.to(z.device), c] for s, c in zip(sets, classes)]
            reference[split] = r(sum((t - t.mean()).abs().mean() for t in target) / m)
            if split == "train":
                inactive = [int((x.amax(0) <= 0).sum()) for _, x, _ in outputs]
            else:
                # Reconstruction of the standardized features, for the SRAE / SAE contrast.
                zs = (z - mean) / scale
                reconstruction = []
                for g, (_, x, _) in enumerate(outputs):
                    decoded = (x @ params["u1"][g] + params["c1"][g]).relu() @ params["u2"][g] + params["c2"][g]
                    reconstruction.append((decoded - zs[sets[g % m].to(z.device)]).pow(2).mean())
        test_sets = test[3]
    report = {
        "f_reg_train": per_variant(f_reg["train"]),
        "f_reg_test": per_variant(f_reg["test"]),
        "f_reg_definition": "mean |ȳ − ŷ| in logits over each explained class's examples (its positives and "
                            "sampled negatives; train: the training set, test: the same sampling of the held-out "
                            "set), averaged over classes; ȳ the module's readout, ŷ the model's logit",
        "f_reg_reference": {"train": reference["train"], "test": reference["test"],
                            "definition": "mean |ŷ − mean(ŷ)| on the same examples: F_reg of a constant readout"},
        "f_reg_test_per_class": {v: {labels[c]: r(f_reg["test"][i * m + j]) for j, c in enumerate(classes)}
                                 for i, v in enumerate(VARIANTS)},
        "reconstruction_error_test": per_variant(reconstruction),
        "reconstruction_error_definition": "mean over dimensions and held-out examples of the decoder's squared "
                                           "error on the standardized pooled features (1 ~ no reconstruction; "
                                           "NN's decoder is never trained)",
        "inactive_xfeatures": {v: sum(inactive[i * m:(i + 1) * m]) for i, v in enumerate(VARIANTS)},
        "n_train_per_class": {labels[c]: len(s) for c, s in zip(classes, train[3])},
        "n_train_positives_per_class": {labels[c]: int((train[2][s] == c).sum()) for c, s in zip(classes, train[3])},
        "n_test_per_class": {labels[c]: len(s) for c, s in zip(classes, test_sets)},
    }
    return report


def _locality(parts: ModelParts, modules: dict[str, torch.Tensor], classes: list[int], x_test: torch.Tensor,
              y_test: torch.Tensor, images_per_class: int) -> dict:
    """Table 1's locality row: the entropy over image regions of c-MWP maps (excitation backprop).

    Columns: the x-features of each variant's modules (SRAE, NN, SAE) and ExcitationBP on the class's
    logit, each on the first ``images_per_class`` held-out positives of its class; Z, each dimension
    of the layer the modules read, on the first Z_LOCALITY_IMAGES held-out images of every explained
    class. Empty when the input is not an image or the upstream is not a chain that excitation
    backprop supports.
    """
    if len(parts.input_spec.shape) != 3:
        return {}
    try:
        chain = chain_of(parts.upstream)
    except ValueError:
        return {}
    pooled = len(parts.feature_shape) > 1
    base = [*chain, spatial_mean_stage()] if pooled else chain
    # The contrast layer: the input of the stage that computes Z (the paper's pool5 below VGG's fc6),
    # the explained layer for a pooled one; Z's own incoming weights are there.
    z_stage = len(chain) if pooled else max(k for k, stage in enumerate(chain) if stage.kind == "affine")
    grid_hw = tuple(parts.input_spec.shape[1:])
    regions = region_masks(grid_hw).unsqueeze(1).expand(-1, parts.input_spec.shape[0], *grid_hw)
    device = parts.device
    m = len(classes)

    def table_column(top: list, x: torch.Tensor, signal: torch.Tensor, negate_at: int) -> torch.Tensor:
        """(U,) the locality of U units above ``base`` on images x, from their signals (U, B, out)."""
        stages = [*base, *top]
        values = activations(stages, x.to(device))
        operator = region_operator(stages, values, regions, z_stage).flatten(2)  # (B, R, K)
        mass = torch.cat([torch.einsum("brk,ubk->ubr", operator,
                                       contrast_signal(stages, values, part, negate_at, z_stage).flatten(2))
                          for part in signal.split(16)])
        return locality(mass)

    def one_hot(units: int, examples: int, size: int) -> torch.Tensor:
        """(U, B, size): unit u's signal 1 on output u."""
        return torch.eye(units, size, device=device).unsqueeze(1).expand(-1, examples, -1).contiguous()

    positives = [x_test[(y_test == c).nonzero().flatten()[:images_per_class]] for c in classes]
    n = modules["w2"].shape[2]
    xfeatures = []  # per module (variant-major): mean locality of its x-features
    for g in range(len(modules["w1"])):
        encoder = [linear_stage(modules["w1"][g], modules["b1"][g]), RELU,
                   linear_stage(modules["w2"][g], modules["b2"][g]), RELU]
        x = positives[g % m]
        # The dual of x-feature n: its own incoming weights, column n of the second layer, negated.
        xfeatures.append(table_column(encoder, x, one_hot(n, len(x), n), len(base) + 2).nanmean())
    logit = []
    try:
        weight, bias = pooled_linear_head(parts)
    except ValueError:  # a deeper head: no single linear map from Z to the logits
        weight = None
    if weight is not None:
        head = [linear_stage(weight.T, bias)]
        for c, x in zip(classes, positives):
            signal = torch.zeros(1, len(x), parts.num_classes, device=device)
            signal[..., c] = 1
            logit.append(table_column(head, x, signal, len(base))[0])
    shown = torch.cat([x_test[(y_test == c).nonzero().flatten()[:Z_LOCALITY_IMAGES]] for c in classes])
    dim = parts.feature_shape[0]
    z_locality = table_column([], shown, one_hot(dim, len(shown), dim), z_stage)

    def r(x) -> float | None:
        x = float(x)
        return None if math.isnan(x) else round(x, 6)

    per_module = torch.stack(xfeatures).reshape(len(VARIANTS), m).nanmean(1)
    table = {v: r(per_module[i]) for i, v in enumerate(VARIANTS)}
    table["z"] = r(z_locality.nanmean())
    table["excitation_backprop"] = r(torch.stack(logit).nanmean()) if logit else None
    rows, cols = (_bands(size) for size in grid_hw)
    return {
        "locality": table,
        "locality_per_class": {v: {parts.labels[c]: r(xfeatures[i * m + j]) for j, c in enumerate(classes)}
                               for i, v in enumerate(VARIANTS)}
                              | {"excitation_backprop": {parts.labels[c]: r(h) for c, h in zip(classes, logit)}},
        "locality_definition": (
            f"the paper's locality: per unit, H = entropy (nats, max ln {LOCALITY_REGIONS ** 2} = "
            f"{math.log(LOCALITY_REGIONS ** 2):.4f}) of its region histogram averaged over images, the histogram "
            f"of an image being its c-MWP map's mass in each of {LOCALITY_REGIONS}x{LOCALITY_REGIONS} regions of "
            f"the {grid_hw[0]}x{grid_hw[1]} input (row and column bands of {rows.count(0)}, {rows.count(1)}, "
            f"{rows.count(2)} / {cols.count(0)}, {cols.count(1)}, {cols.count(2)} pixels; the paper: 15 Voronoi "
            "regions of bird-part annotations, which MNIST lacks). c-MWP: excitation backprop (Zhang et al. "
            "2016) from the unit down to the input pixels, contrasted at the layer Z is computed from (the "
            "explained layer) with the unit's dual (its own incoming weights negated; a dimension of Z, a "
            "spatial mean, has positive ones, so its dual is empty and its map plain MWP), summed over input "
            "channels. Columns: srae / nn / sae, each x-feature over its class's first "
            f"{images_per_class} held-out positives, averaged over x-features (ones without mass left out) and "
            "classes; excitation_backprop, the class's logit on the same images; z, each dimension of Z over the "
            f"first {Z_LOCALITY_IMAGES} held-out images of every explained class, averaged over dimensions. "
            "Lower = more local."),
    }


def _exemplars(x_train: torch.Tensor, y_train: torch.Tensor, features: torch.Tensor,
               modules: dict[str, torch.Tensor], classes: list[int], input_hw: list[int]) -> dict[str, bytes]:
    """Per x-feature: the class's training images where it is strongest, cropped at its Grad-CAM peak."""
    exemplars = {}
    grid_hw = tuple(features.shape[2:])
    with torch.no_grad():
        for i, c in enumerate(classes):
            members = (y_train == c).nonzero().flatten()
            feats = features[members.to(features.device)].float()
            hidden, x = encode(spatial_mean(feats)[None], *(modules[k][i:i + 1].to(feats.device)
                                                    for k in ("w1", "b1", "w2", "b2")))
            gradient = xfeature_gradient(hidden, x, modules["w1"][i:i + 1].to(feats.device),
                                         modules["w2"][i:i + 1].to(feats.device))[0]
            for j in range(x.shape[2]):
                top = x[0, :, j].argsort(descending=True)[:EXEMPLARS_PER_XFEATURE]
                cam = grad_cam(gradient[top, j:j + 1], feats[top])[:, 0]  # (top, H·W)
                images, boxes = [], []
                for k, where in zip(top.tolist(), cam.argmax(1).tolist()):
                    row, col = divmod(where, grid_hw[1])
                    images.append(x_train[members[k]])
                    boxes.append(grid_cell_box(tuple(input_hw), grid_hw, row, col))
                exemplars[f"c{c}.x{j}"] = crops_png(images, boxes)
    return exemplars

