"""Offline half of protofac: the fit and its report (the online explainer is handlers/explainers/protofac.py).

ProtoFac: a layer's activations factorized into real prototypes with simplex weights.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from handlers.base import Component, FitData, FittedMethod
from handlers.exemplars import png_bytes, to_uint8_image
from handlers.explainers.protofac import (
    NAME,
    PROTOCOLS,
    ProtoFacConfig,
    activation_rows,
    affine_prototype_logits,
    objective_terms,
    paper_codes,
    surrogate_logits,
    weighted_objective,
)
from handlers.model import ModelParts
from handlers.solvers.nmf import NMF, nnls_encode
from handlers.solvers.simplex import (
    project_to_simplex,
    simplex_kkt_violation,
    simplex_least_squares,
)

EXEMPLAR_SCALE = 4  # image exemplars are drawn at 4x the input size


SERIES_EXEMPLAR_PX = (280, 96)


def window_positions(side: int, window: int, per_side: int) -> list[int]:
    """Top-left offsets of ``per_side`` evenly spaced windows along an axis of ``side`` pixels."""
    if window >= side:
        return [0]
    return sorted({int(round(x)) for x in np.linspace(0, side - window, per_side)})


def candidate_boxes(input_shape: list[int], window: int, per_side: int) -> list[tuple[int, int, int, int]]:
    """The candidate regions (top, left, bottom, right) of one input.

    An image (C, H, W) gets a sliding window; any other input is one whole candidate
    (a series (C, T) is one heartbeat), given as the box (0, 0, 1, T).
    """
    if len(input_shape) == 3:
        height, width = input_shape[1:]
        return [(top, left, min(height, top + window), min(width, left + window))
                for top in window_positions(height, window, per_side)
                for left in window_positions(width, window, per_side)]
    return [(0, 0, 1, int(input_shape[-1]))]


def candidate_input(x: torch.Tensor, box: tuple[int, int, int, int], is_image: bool) -> torch.Tensor:
    """The input of a candidate: ``x`` (*input_shape) masked to zero outside the box (images)."""
    if not is_image:
        return x
    top, left, bottom, right = box
    masked = torch.zeros_like(x)
    masked[:, top:bottom, left:right] = x[:, top:bottom, left:right]
    return masked


def sample_candidates(parts: ModelParts, x_train: torch.Tensor, y_train: torch.Tensor, fraction: float,
                      window: int, windows_per_side: int, generator: torch.Generator,
                      batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate prototypes: ``fraction`` of every class's training inputs, each cut into windows.

    Returns
    -------
    latents : Tensor of shape (N, m)
        The candidates' clipped, flattened features, on the model's device.
    source : Tensor of shape (N, 5) int64
        (training index, top, left, bottom, right) of every candidate.
    """
    chosen = []
    for c in torch.unique(y_train).tolist():
        members = (y_train == c).nonzero().flatten()
        count = max(1, int(round(fraction * len(members))))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:count]].sort().values)
    chosen = torch.cat(chosen)
    boxes = torch.tensor(candidate_boxes(list(x_train.shape[1:]), window, windows_per_side))
    source = torch.cat([chosen.repeat_interleave(len(boxes)).unsqueeze(1), boxes.repeat(len(chosen), 1)], 1)
    is_image = x_train.dim() == 4
    latents = []
    for start in range(0, len(source), batch_size):
        rows = source[start:start + batch_size]
        inputs = torch.stack([candidate_input(x_train[i], tuple(box), is_image)
                              for i, box in zip(rows[:, 0].tolist(), rows[:, 1:].tolist())])
        latents.append(activation_rows(parts.features(inputs, batch_size)))
    return torch.cat(latents), source


def _initial_prototypes(votes: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k candidate indices, balanced over the classes the oracle assigns to the candidates.

    Round-robin over the classes (classes with no candidates left are skipped), a random
    candidate of the class each time: every class the model predicts starts represented.
    """
    pools = []
    for c in torch.unique(votes).tolist():
        members = (votes == c).nonzero().flatten()
        pools.append(members[torch.randperm(len(members), generator=generator)].tolist())
    chosen, depth = [], 0
    while len(chosen) < k:
        chosen += [pool[depth] for pool in pools if depth < len(pool)][:k - len(chosen)]
        depth += 1
    return torch.tensor(chosen)


def _nearest_distinct(prototypes: torch.Tensor, latents: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """The index of a distinct nearest candidate for every prototype, closest prototype first."""
    distance = (prototypes * prototypes).sum(1, keepdim=True) + sq_norms.unsqueeze(0) - 2 * prototypes @ latents.T
    result = torch.empty(len(prototypes), dtype=torch.long)
    taken = torch.zeros(distance.shape[1], dtype=torch.bool, device=distance.device)
    for j in distance.min(1).values.argsort().tolist():
        index = distance[j].masked_fill(taken, float("inf")).argmin()
        taken[index] = True
        result[j] = int(index)
    return result


class _Problem:
    """What every fit at one layer shares: A, the oracle, the candidates, the downstream."""

    def __init__(self, parts: ModelParts, a_train: torch.Tensor, oracle: torch.Tensor, latents: torch.Tensor,
                 config: ProtoFacConfig, eval_rows: torch.Tensor, scale: torch.Tensor | None = None,
                 votes: torch.Tensor | None = None):
        self.parts, self.config = parts, config
        self.a, self.oracle, self.latents = a_train, oracle, latents
        self.sq_norms = (latents * latents).sum(1)
        self.scale = a_train.norm(dim=1).mean().clamp_min(1e-12) if scale is None else scale  # ā
        self.eval_rows = eval_rows.to(a_train.device)
        with torch.no_grad():
            self.zero_logits = parts.downstream(torch.zeros(1, *parts.feature_shape, device=a_train.device))[0].float()
            self.votes = self.surrogate(latents).argmax(1).cpu() if votes is None else votes

    def subset(self, rows: torch.Tensor, a: torch.Tensor | None = None) -> _Problem:
        """The problem on training rows ``rows`` (all of them evaluated), with the same candidates and ā;
        ``a`` replaces those rows' activations (the missing-values test)."""
        a = self.a[rows.to(self.a.device)] if a is None else a
        return _Problem(self.parts, a, self.oracle[rows.to(self.a.device)], self.latents, self.config,
                        torch.arange(len(rows)), self.scale, self.votes)

    def surrogate(self, reconstruction: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """f_down on flattened reconstructions (N, m) -> logits (N, K)."""
        shape = self.parts.feature_shape
        return torch.cat([self.parts.downstream(reconstruction[i:i + batch_size].reshape(-1, *shape))
                          for i in range(0, len(reconstruction), batch_size)])

    def codes(self, a: torch.Tensor, prototypes: torch.Tensor, oracle: torch.Tensor, protocol: str,
              batch_size: int = 1024) -> torch.Tensor:
        """W (N, k) of rows ``a`` (N, m) with H = ``prototypes`` frozen, by ``protocol`` ("paper": eq. 4
        with ``oracle`` (N,) as the labels; "least_squares"), as the explainer computes them. Rows are
        independent; batches of ``batch_size`` because the active-set solver stops when a batch's
        slowest row is optimal."""
        prototypes = prototypes.detach()
        with torch.no_grad():
            gram = prototypes.double() @ prototypes.double().T
        surrogate = surrogate_logits(self.parts, prototypes, affine_prototype_logits(self.parts, prototypes),
                                     self.zero_logits)
        codes = []
        for i in range(0, len(a), batch_size):
            rows = a[i:i + batch_size]
            if protocol == "paper":
                codes.append(paper_codes(rows, prototypes, gram, oracle[i:i + batch_size], surrogate, self.scale,
                                         self.config))
            else:
                with torch.no_grad():
                    codes.append(simplex_least_squares(rows, prototypes, gram, self.config.solver_steps))
        return torch.cat(codes)

    def evaluate(self, prototypes: torch.Tensor, a: torch.Tensor, oracle: torch.Tensor, labels: torch.Tensor,
                 protocol: str, w: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
        """The surrogate f_down(wH), W by ``protocol`` (or ``w`` (n, k) when given), against the oracle and
        ``labels``, and eq. 1's F-loss (1/n)‖A − WH‖_F as written; returns the figures and W."""
        if w is None:
            w = self.codes(a, prototypes, oracle, protocol)
        with torch.no_grad():
            reconstruction = w @ prototypes
            predicted = self.surrogate(reconstruction).argmax(1).cpu()
            residual = float((a - reconstruction).norm())
        return {"acc_vs_oracle": round(float((predicted == oracle.cpu()).double().mean()), 6),
                "acc_vs_ground_truth": round(float((predicted == labels.cpu()).double().mean()), 6),
                "f_loss": round(residual / len(a), 6),
                "relative_error": round(residual / (float(a.norm()) or 1.0), 6)}, w

    def train_accuracy(self, prototypes: torch.Tensor, paper_codes: torch.Tensor | None = None) -> float:
        """Accuracy against the oracle, W by the served protocol, on the fixed evaluation subset of the training
        rows; ``paper_codes`` (n, k), every training row's W by the paper protocol, saves solving them again."""
        rows = self.eval_rows
        reuse = paper_codes is not None and self.config.served_protocol == "paper"
        figures, _ = self.evaluate(prototypes, self.a[rows], self.oracle[rows], self.oracle[rows],
                                   self.config.served_protocol, paper_codes[rows] if reuse else None)
        return figures["acc_vs_oracle"]


def _fit_prototypes(problem: _Problem, config: ProtoFacConfig, generator: torch.Generator,
                    log) -> tuple[torch.Tensor, list[dict]]:
    """Algorithm 1 for ``config.n_prototypes`` prototypes: returns the kept candidate indices (k,)
    and the per-projection history."""
    k, epochs = config.n_prototypes, config.epochs
    if k > len(problem.latents):
        raise ValueError(f"n_prototypes={k} exceeds the {len(problem.latents)} candidates")
    a, oracle, latents = problem.a, problem.oracle, problem.latents
    n, m = a.shape
    device = a.device
    chosen = _initial_prototypes(problem.votes, k, generator)
    prototypes = latents[chosen.to(device)].clone()
    weights = problem.codes(a, prototypes, oracle, "paper")
    best_accuracy = problem.train_accuracy(prototypes, weights)
    best, history = chosen, [{"epoch": 0, "acc_vs_oracle_train": round(best_accuracy, 6), "replaced": k}]
    prototypes.requires_grad_(True)
    weights.requires_grad_(True)
    # Adam moves every coordinate by about its learning rate: H's is relative to the
    # features' root-mean-square entry, W's is on the simplex's scale.
    optimizer = torch.optim.Adam([
        {"params": [prototypes], "lr": config.lr_prototypes * float(problem.scale) / math.sqrt(m)},
        {"params": [weights], "lr": config.lr_weights},
    ])
    # A progress bar where stderr is a terminal.
    bar = tqdm(range(1, epochs + 1), desc=f"protofac k={k}", disable=None, leave=False)
    for epoch in bar:
        for rows in torch.randperm(n, generator=generator).split(config.batch_size):
            rows = rows.to(device)
            reconstruction = weights[rows] @ prototypes
            terms = objective_terms(weights[rows], problem.surrogate(reconstruction), oracle[rows],
                                    (a[rows] - reconstruction).norm(dim=1), problem.scale)
            loss = weighted_objective(terms, config).mean()
            optimizer.zero_grad(set_to_none=True)
            # Only W and H: the frozen model's parameters get no gradients.
            loss.backward(inputs=[prototypes, weights])
            optimizer.step()
            with torch.no_grad():
                prototypes.clamp_(min=0)
                weights.copy_(project_to_simplex(weights))
        bar.set_postfix(ce=f"{float(terms['ce'].detach().mean()):.3f}",
                        rec=f"{float(terms['reconstruction'].detach().mean()):.3f}")
        if epoch % config.projection_interval == 0 or epoch == epochs:
            with torch.no_grad():
                projected = _nearest_distinct(prototypes, latents, problem.sq_norms)
                replaced = int(len(set(projected.tolist()) - set(chosen.tolist())))
                chosen = projected
                prototypes.copy_(latents[projected.to(device)])
            # Algorithm 1, lines 15-21: W trained alone with the full loss, H frozen.
            codes = problem.codes(a, prototypes, oracle, "paper")
            with torch.no_grad():
                weights.copy_(codes)
            accuracy = problem.train_accuracy(prototypes.detach(), codes)
            history.append({"epoch": epoch, "acc_vs_oracle_train": round(accuracy, 6), "replaced": replaced})
            log(f"protofac k={k}: epoch {epoch}: projected ({replaced} prototypes replaced), "
                f"train accuracy vs oracle {accuracy:.4f}")
            if accuracy > best_accuracy:
                best_accuracy, best = accuracy, projected
    return best, history


def objective_report(config: ProtoFacConfig) -> dict:
    """The fitted loss's terms, with the paper's equation numbers and weights."""
    return {
        "cross_entropy": {"equation": 2, "weight": config.lambda_ce,
                          "definition": "mean_i CE(f_down(w_i H), oracle_i), the oracle the model's prediction"},
        "reconstruction": {"equation": 1, "weight": config.lambda_r,
                           "definition": "mean_i ||a_i - w_i H|| / a_bar (eq. 1 row by row; a_bar the mean row "
                                         "norm of the training activations)"},
        "concentration": {"equation": 3, "weight": config.lambda_c,
                          "definition": "mean_i min_j ||w_i - e_j||^2"},
        "total": "eq. 4: sum of weight * term; W rows on the simplex, H >= 0",
    }


def _sweep(problem: _Problem, config: ProtoFacConfig, a_test: torch.Tensor, oracle_test: torch.Tensor,
           y_test: torch.Tensor, generator: torch.Generator, log) -> tuple[list[dict], dict | None, dict]:
    """Fig. 5's accuracy vs k and Sec. IV-C's missing-values test, each a fit on ``config.sweep_rows``
    training rows with ``config.sweep_epochs`` epochs, evaluated on the held-out rows by the served protocol.
    The missing-values fit is at the sweep's largest k up to ``n_prototypes``.

    Returns the sweep's rows, the missing-values figures (None without a sweep) and the settings.
    """
    n = len(problem.a)
    rows = torch.randperm(n, generator=generator)[:config.sweep_rows or n].sort().values
    settings = {"rows": len(rows), "epochs": config.sweep_epochs,
                "projection_interval": max(1, config.sweep_epochs // 2), "protocol": config.served_protocol}
    small = problem.subset(rows)
    protocol = config.served_protocol

    def fit_and_evaluate(subproblem: _Problem, k: int, a_eval: torch.Tensor) -> dict:
        point = dataclasses.replace(config, n_prototypes=k, epochs=settings["epochs"],
                                    projection_interval=settings["projection_interval"])
        picked, _ = _fit_prototypes(subproblem, point, torch.Generator().manual_seed(config.random_state),
                                    lambda _: None)
        figures, _ = subproblem.evaluate(problem.latents[picked.to(a_eval.device)], a_eval, oracle_test, y_test,
                                         protocol)
        return {"k": k, **{key: figures[key] for key in ("acc_vs_oracle", "acc_vs_ground_truth", "f_loss")}}

    sweep = []
    for k in [k for k in config.k_sweep if k <= len(problem.latents)]:
        sweep.append(fit_and_evaluate(small, k, a_test))
        log(f"protofac: k sweep: k={k}: held-out accuracy vs oracle {sweep[-1]['acc_vs_oracle']:.4f}, "
            f"vs ground truth {sweep[-1]['acc_vs_ground_truth']:.4f}")
    if not sweep:
        return sweep, None, settings
    # At the sweep's largest k up to n_prototypes: its fit with nothing missing is the comparison, at no cost.
    complete = max((row for row in sweep if row["k"] <= config.n_prototypes), key=lambda row: row["k"],
                   default=sweep[0])
    k = complete["k"]
    # Sec. IV-C: a share of the activation matrix's values replaced by zeros, training and held-out alike.
    missing = torch.Generator().manual_seed(config.random_state + 1)

    def with_missing(a: torch.Tensor) -> torch.Tensor:
        keep = torch.rand(a.shape, generator=missing) >= config.missing_fraction
        return a * keep.to(a.device)

    masked = fit_and_evaluate(problem.subset(rows, with_missing(small.a)), k, with_missing(a_test))
    result = {"fraction": config.missing_fraction, "k": k,
              "acc_vs_oracle": masked["acc_vs_oracle"], "acc_vs_ground_truth": masked["acc_vs_ground_truth"],
              "acc_vs_ground_truth_complete": complete["acc_vs_ground_truth"],
              "ground_truth_drop": round(complete["acc_vs_ground_truth"] - masked["acc_vs_ground_truth"], 6)}
    log(f"protofac: {config.missing_fraction:.0%} of the values missing: held-out accuracy vs oracle "
        f"{result['acc_vs_oracle']:.4f}, vs ground truth {result['acc_vs_ground_truth']:.4f} "
        f"({result['acc_vs_ground_truth_complete']:.4f} with none missing)")
    return sweep, result, settings


def fit(parts: ModelParts, data: FitData, config: ProtoFacConfig = ProtoFacConfig(), log=print) -> FittedMethod:
    """Fit ProtoFac on ``data.x_train`` and report on ``data.x_test``.

    Returns
    -------
    FittedMethod with factors ``prototypes_`` (k, m) — H, real candidates' latent vectors —
    ``prototype_inputs_`` (k, *input_shape) — the candidates' (masked) inputs — ``feature_scale_`` (1,)
    — ā, eq. 1's scale, for the ``paper`` protocol — and, with a sweep, ``k_sweep_png_`` (bytes,)
    uint8, the PNG of the accuracy-vs-k plot.
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.random_state)
    device = parts.device
    raw = parts.features(data.x_train)
    if (raw < 0).any():
        log(f"protofac: {(raw < 0).float().mean().item():.1%} of the features at {parts.layer!r} are negative "
            "and are clipped to zero (offline and online alike)")
    a_train = activation_rows(raw)
    with torch.no_grad():
        oracle = parts.downstream(raw).argmax(1)
    del raw
    latents, source = sample_candidates(parts, data.x_train, data.y_train, config.candidate_fraction, config.window,
                                        config.windows_per_side, generator)
    eval_rows = torch.randperm(len(a_train), generator=generator)[:config.eval_size].sort().values
    config = dataclasses.replace(config, solver_iter=config.solver_steps)
    problem = _Problem(parts, a_train, oracle, latents, config, eval_rows)
    log(f"protofac: A is {tuple(a_train.shape)}, {len(latents)} candidates "
        f"({time.perf_counter() - start:.1f}s)")
    chosen, history = _fit_prototypes(problem, config, generator, log)
    # Prototypes ordered by the class of their source input, for people reading the list.
    chosen = chosen[torch.argsort(data.y_train[source[chosen, 0]] * len(source) + chosen)]
    prototypes = latents[chosen.to(device)].contiguous()

    a_test = activation_rows(parts.features(data.x_test))
    oracle_test = parts.logits(data.x_test).argmax(1)
    protocols = {}
    for protocol in PROTOCOLS:
        protocols[protocol], w = problem.evaluate(prototypes, a_test, oracle_test, data.y_test, protocol)
        if protocol == "least_squares":
            converged = simplex_kkt_violation(w, a_test, prototypes) <= 1e-6
            protocols[protocol]["solver_converged"] = round(float(converged.double().mean()), 6)
    served = protocols[config.served_protocol]
    nmf = NMF(config.n_prototypes, max_iter=config.nmf_max_iter, random_state=config.random_state)
    nmf.fit(a_train)
    with torch.no_grad():
        nmf_reconstruction = nnls_encode(a_test, nmf.components_, n_iter=200) @ nmf.components_
        nmf_predicted = problem.surrogate(nmf_reconstruction).argmax(1).cpu()
    residual_nmf = float((a_test - nmf_reconstruction).norm())
    row = {"n_prototypes": len(prototypes), **served,
           "f_loss_nmf": round(residual_nmf / len(a_test), 6),
           "relative_error_nmf": round(residual_nmf / (float(a_test.norm()) or 1.0), 6),
           "solver_converged": protocols["least_squares"]["solver_converged"]}
    log(f"protofac: held-out accuracy vs oracle {row['acc_vs_oracle']:.4f}, vs ground truth "
        f"{row['acc_vs_ground_truth']:.4f}, F-loss {row['f_loss']:.4f} (NMF {row['f_loss_nmf']:.4f}) "
        f"by the {config.served_protocol} protocol; least squares: {protocols['least_squares']['acc_vs_oracle']:.4f}, "
        f"F-loss {protocols['least_squares']['f_loss']:.4f} ({time.perf_counter() - start:.1f}s)")

    factors = {"prototypes_": prototypes.cpu(),
               "prototype_inputs_": _prototype_inputs(data.x_train, source[chosen]).contiguous(),
               "feature_scale_": problem.scale.reshape(1).float().cpu()}
    sweep, missing_values, sweep_settings = _sweep(problem, config, a_test, oracle_test, data.y_test, generator, log)
    if sweep:
        factors["k_sweep_png_"] = torch.frombuffer(bytearray(_sweep_png(sweep, parts.layer)), dtype=torch.uint8)

    with torch.no_grad():
        votes = problem.surrogate(prototypes).argmax(1).cpu().tolist()
    components, exemplars, listing = [], {}, []
    kind = "patch" if data.x_train.dim() == 4 else "heartbeat" if data.x_train.dim() == 3 else "example"
    for i, (index, top, left, bottom, right) in enumerate(source[chosen].tolist()):
        label = int(data.y_train[index])
        component = Component(id=f"p{i}", label=f"{parts.labels[label]} {kind} (train #{index})", class_index=label)
        components.append(component)
        exemplars[component.id] = _exemplar(data.x_train[index], (top, left, bottom, right), kind == "patch")
        listing.append({"id": component.id, "train_index": index, "box": [top, left, bottom, right],
                        "class_index": label, "votes": votes[i]})
    report = {
        **{key: row[key] for key in ("acc_vs_oracle", "acc_vs_ground_truth", "f_loss", "f_loss_nmf",
                                     "solver_converged")},
        "objective": objective_report(config),
        "served_protocol": config.served_protocol,
        "protocols": protocols,
        "nmf_surrogate_accuracy": {
            "acc_vs_oracle": round(float((nmf_predicted == oracle_test.cpu()).double().mean()), 6),
            "acc_vs_ground_truth": round(float((nmf_predicted == data.y_test).double().mean()), 6)},
        "layer": parts.layer,
        "layers": {parts.layer: row},
        "acc_black_box": round(float((oracle_test.cpu() == data.y_test).double().mean()), 6),
        "acc_vs_oracle_train": max(h["acc_vs_oracle_train"] for h in history),
        "history": history,
        "k_sweep": sweep,
        "k_sweep_plot": "factors['k_sweep_png_']: PNG bytes as a uint8 tensor" if sweep else None,
        "k_sweep_settings": sweep_settings,
        "missing_values": missing_values,
        "prototypes": listing,
        "n_candidates": len(latents),
        "n_train": len(data.x_train),
        "n_test": len(data.x_test),
        "candidates": f"{kind}es" if kind == "patch" else f"{kind}s",
    }
    log(f"protofac: done ({time.perf_counter() - start:.1f}s)")
    return FittedMethod(NAME, factors, components, dataclasses.asdict(config), report, exemplars)


def _prototype_inputs(x_train: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    is_image = x_train.dim() == 4
    return torch.stack([candidate_input(x_train[r[0]], tuple(r[1:]), is_image) for r in rows.tolist()]).float()


def _exemplar(x: torch.Tensor, box: tuple[int, int, int, int], is_image: bool) -> bytes:
    """An image patch as its box on the source image, or a series as a line plot (PNG)."""
    if is_image:
        image = Image.fromarray(to_uint8_image(x)).convert("RGB")
        image = image.resize((image.width * EXEMPLAR_SCALE, image.height * EXEMPLAR_SCALE), Image.NEAREST)
        top, left, bottom, right = (v * EXEMPLAR_SCALE for v in box)
        ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), outline=(230, 30, 30), width=2)
        return png_bytes(image)
    series = x.reshape(-1, x.shape[-1]).float().mean(0).numpy()
    width, height = SERIES_EXEMPLAR_PX
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    low, high = float(series.min()), float(series.max())
    span = (high - low) or 1.0
    xs = np.linspace(4, width - 5, len(series))
    ys = height - 5 - (series - low) / span * (height - 10)
    if low < 0 < high:  # the zero line
        zero = height - 5 - (0 - low) / span * (height - 10)
        draw.line([(4, zero), (width - 5, zero)], fill=(200, 200, 200))
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(20, 60, 160), width=2)
    return png_bytes(image)


def _sweep_png(sweep: list[dict], layer: str) -> bytes:
    """The accuracy-vs-k plot (paper Fig. 5) as PNG bytes (matplotlib's Agg canvas, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4, 3), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([r["k"] for r in sweep], [r["acc_vs_oracle"] for r in sweep], marker="o")
    axes.set_xlabel("number of prototypes k")
    axes.set_ylabel("held-out accuracy vs oracle")
    axes.set_title(f"ProtoFac at {layer}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

