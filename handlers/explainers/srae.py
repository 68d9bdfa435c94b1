"""SRAE: per-class explanation modules whose few x-features reproduce the class's logit.

Seed paper: "Learning Explainable Embeddings for Deep Networks" (Qi and Li; later
"Embedding Deep Networks into Visual Explanations", Qi, Khorram and Li).

Offline, for every explained class c an explanation module reads Z (D,): the explained layer
itself when it is fully connected (the paper's Z, a fully connected layer), else its spatial
mean, which for a model whose head is global average pooling + linear (the demo MNIST CNN, which
has no hidden fully connected layer) is the vector the fully connected head reads. It is trained
on the class's positives and negatives drawn from the other classes (by default the paper's 50
and 8000 per class, capped at what the data has):

    encoder      E(Z) = ReLU(W2ᵀ ReLU(W1ᵀ Z + b1) + b2)        n non-negative x-features
    readout      ȳ    = vᵀ E(Z) + b                              reproduces the logit ŷ_c
    decoder      φ⁻¹(E) = U2ᵀ ReLU(U1ᵀ E + c1) + c2              reconstructs Z

    loss = mean_i (ȳ_i − ŷ_i)² / var(ŷ)
           + (β / S_z) Σ_k log(1 + q · mean_i (φ⁻¹(E(Z_i))_k − Z_ik)²)      (the SRAE loss)

with Z standardized per dimension and ŷ per class while training (both folded back into
the stored weights afterwards, so the served modules read raw features and speak logits).
The log penalty is the paper's sparse reconstruction: it saturates, so a module may give up
on dimensions of Z that its few x-features cannot carry instead of spending them on it.
The seed paper's later version adds a pull-away term between x-features; it is not used.
Two baselines are trained the same way (same data, initialisation, batches and steps) for
the fit report only: NN (same encoder and readout, no reconstruction term) and SAE (a plain
autoencoder: the log penalty replaced by its small-error limit (β / S_z) Σ_k q · mse_k).

Per request, for target class c with module (E, v, b), model logit ŷ and readout ȳ:

    weight_n       = E_n(Z)                   contribution_n = v_n · E_n(Z)
    bias           = b                        residual_contribution = ŷ − ȳ

so Σ_n contribution_n + bias + residual_contribution = ŷ exactly (float32 rounding only).
Heatmaps are Grad-CAM of each x-feature at the explained layer F (D, H, W), whose pooling
makes ∂E_n/∂F_dhw = (∂E_n/∂Z_d) / (H·W); the gradient of the ReLU network is evaluated in
closed form (the same value autograd gives), so no autograd graph is needed:

    cam_n(h, w) = ReLU(Σ_d mean_hw(∂E_n/∂F_d) · F_dhw),   heatmap_n = contribution_n · cam_n / Σ_hw cam_n

(the Grad-CAM map scaled into a density that sums to the contribution; zero where cam_n
is zero everywhere). An intervention zeroes the suppressed x-features: each class's logit
becomes its readout with those x-features zeroed plus its residual ŷ − ȳ, i.e.
ŷ_c − Σ_{suppressed n of c} v_n E_n; classes without suppressed x-features keep ŷ exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from handlers.base import (
    MAX_SIZE,
    MAX_STEPS,
    AdditiveExplainer,
    Decomposition,
    ExplainBatch,
    FittedMethod,
    MethodConfig,
)
from handlers.model import ModelParts

NAME = "srae"


@dataclass(frozen=True)
class SRAEConfig(MethodConfig):
    """SRAE's hyperparameters.

    n_xfeatures : x-features per class (the paper's explanation space has 5).
    hidden : width of the encoder's and the decoder's hidden layer.
    beta, q : weight and sharpness of the log reconstruction penalty.
    positives : training positives per class (the paper's 50; None: all of the class's examples).
    negatives : training negatives per class, drawn from the other classes (the paper's 8000;
        None: all), capped at what the data has.
    negative_ratio : when set, negatives = this times the positives used, instead of ``negatives``
        (archives written before ``positives`` existed: all positives and 3 negatives per positive).
    epochs, batch_size, lr : Adam's schedule (a fixed number of steps; on the demo's 50 + 3600
        examples per class, 13 epochs are 377 steps, about the 390 of the previous default).
    classes : the explained classes (None: all; archives store the list).
    locality_images : held-out positives per class whose excitation-backprop maps give the fit
        report's locality.
    """

    method = NAME
    n_xfeatures: int = 5
    hidden: int = 64
    beta: float = 0.1
    q: float = 100.0
    positives: int | None = 50
    negatives: int | None = 8000
    negative_ratio: float | None = None
    epochs: int = 13
    batch_size: int = 128
    lr: float = 3e-3
    classes: tuple[int, ...] | None = None
    random_state: int = 0
    locality_images: int = 20

    def __post_init__(self):
        super().__post_init__()
        self.require_at_least(1, "n_xfeatures", "hidden", "epochs", "batch_size", "locality_images")
        self.require_at_most(MAX_STEPS, "epochs")
        self.require_at_most(MAX_SIZE, "n_xfeatures", "hidden", "positives", "negatives", "batch_size",
                             "locality_images")
        self.require_at_least(0, "beta", "q")
        self.require(self.lr > 0, "lr", "positive")
        self.require(self.positives is None or self.positives >= 1, "positives", "None or at least 1")
        self.require(self.negatives is None or self.negatives >= 0, "negatives", "None or at least 0")
        self.require(self.negative_ratio is None or self.negative_ratio >= 0, "negative_ratio", "None or at least 0")
        self.require(self.classes is None or len(self.classes) > 0, "classes", "None or not empty")

    @classmethod
    def from_hyperparameters(cls, stored: dict) -> "SRAEConfig":
        """The stored config; an archive from before ``positives`` existed (it stored a ratio) was fitted on every
        positive."""
        if "positives" not in stored and stored.get("negative_ratio") is not None:
            stored = {**stored, "positives": None}
        return super().from_hyperparameters(stored)


def spatial_mean(features: torch.Tensor) -> torch.Tensor:
    """(B, D, *grid) -> (B, D): the spatial mean (a fully connected layer is returned as is)."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


def encode(z: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoders of G modules on their own batches.

    Parameters
    ----------
    z : (G, B, D) pooled features;  w1 : (G, D, Hd);  b1 : (G, Hd);  w2 : (G, Hd, n);  b2 : (G, n)

    Returns
    -------
    hidden : (G, B, Hd) the hidden layer after its ReLU
    x : (G, B, n) the x-features E(Z) >= 0
    """
    hidden = torch.baddbmm(b1.unsqueeze(1), z, w1).relu()
    return hidden, torch.baddbmm(b2.unsqueeze(1), hidden, w2).relu()


def xfeature_gradient(hidden: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """∂E_n/∂Z of the encoders in closed form (ReLU derivative 0 at 0, as autograd takes it).

    Parameters
    ----------
    hidden : (G, B, Hd);  x : (G, B, n);  w1 : (G, D, Hd);  w2 : (G, Hd, n)

    Returns
    -------
    (G, B, n, D)
    """
    gate = w2.transpose(1, 2).unsqueeze(1) * (hidden > 0).unsqueeze(2) * (x > 0).unsqueeze(3)  # (G, B, n, Hd)
    return gate @ w1.transpose(1, 2).unsqueeze(1)


def grad_cam(gradient: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps of the x-features on the feature grid.

    Parameters
    ----------
    gradient : (B, n, D) ∂E_n/∂Z for the pooled features Z = mean_hw(F)
    features : (B, D, H, W) the layer F

    Returns
    -------
    (B, n, H·W): ReLU(Σ_d α_nd F_dhw) with α_nd = mean_hw ∂E_n/∂F_dhw = ∂E_n/∂Z_d / (H·W)
    """
    grid = features.flatten(2)
    return torch.bmm(gradient / grid.shape[2], grid).relu()


class SRAEExplainer(AdditiveExplainer):
    """Served SRAE modules: x-features, contributions, Grad-CAM heatmaps and interventions, batched."""

    name = NAME
    config_class = SRAEConfig
    residual_share_definition = (
        "|residual_contribution| / (sum_n |contribution_n| + |residual_contribution|), residual_contribution = "
        "ŷ − ȳ the faithfulness gap between the model's logit ŷ and the explanation module's readout ȳ: the share "
        "of the target logit's magnitude (bias excluded) that the x-features do not reproduce"
    )
    contribution_definition = (
        "v_n * E_n(Z): the readout weight of x-feature n times its value (weight = E_n(Z) >= 0, Z the spatially "
        "pooled layer); bias = the readout's bias; sum + bias + residual (ŷ − ȳ) = the model's logit exactly. "
        "Heatmaps: Grad-CAM of E_n at the layer, scaled to sum to the contribution. Interventions: the suppressed "
        "x-features' contributions are removed from their own class's logit (its readout with them zeroed plus "
        "its residual)"
    )
    # M modules (one per explained class), each D -> Hd -> n x-features -> a logit.
    factors = {
        "classes_": (torch.int64, ("M",)),
        "encoder_w1_": (torch.float32, ("M", "D", "Hd")),
        "encoder_b1_": (torch.float32, ("M", "Hd")),
        "encoder_w2_": (torch.float32, ("M", "Hd", "n")),
        "encoder_b2_": (torch.float32, ("M", "n")),
        "readout_weight_": (torch.float32, ("M", "n")),
        "readout_bias_": (torch.float32, ("M",)),
    }

    def __init__(self, model: ModelParts, fitted: FittedMethod):
        super().__init__(model, fitted)
        m, n = self.readout_weight_.shape
        if m and not bool(((self.classes_ >= 0) & (self.classes_ < model.num_classes)).all()):
            raise ValueError(f"srae classes {self.classes_.tolist()} do not fit a model with "
                             f"{model.num_classes} classes")
        # Component i·n + j is x-feature j of module i, of class classes_[i]: interventions take it from that logit.
        if [c.class_index for c in self.components] != self.classes_.repeat_interleave(n).tolist():
            raise ValueError(f"srae has {len(self.components)} components; its factors hold {n} x-features for each "
                             f"of {m} modules, listed module by module, each of its module's class (classes_)")
        # The module tables padded with an all-zero module (index m) that every class without a module
        # reads: its x-features, contributions and bias are zeros, so no example needs a branch.
        self._module_of_class = torch.full((model.num_classes,), m, dtype=torch.int64)
        self._module_of_class[self.classes_] = torch.arange(m)
        self._w1 = torch.cat([self.encoder_w1_, torch.zeros_like(self.encoder_w1_[:1])])
        self._b1 = torch.cat([self.encoder_b1_, torch.zeros_like(self.encoder_b1_[:1])])
        self._w2 = torch.cat([self.encoder_w2_, torch.zeros_like(self.encoder_w2_[:1])])
        self._b2 = torch.cat([self.encoder_b2_, torch.zeros_like(self.encoder_b2_[:1])])
        self._readout_weight = torch.cat([self.readout_weight_, torch.zeros_like(self.readout_weight_[:1])])
        self._readout_bias = torch.cat([self.readout_bias_, torch.zeros_like(self.readout_bias_[:1])])
        # Each class's component indices (-1: none): x-feature j of module i is component i * n + j.
        self._class_components = torch.where(self._module_of_class[:, None] < m,
                                             self._module_of_class[:, None] * n + torch.arange(n), -1)

    def decompose(self, batch: ExplainBatch, suppressed: torch.Tensor) -> Decomposition:
        features = batch.features.detach().float()
        z = spatial_mean(features)  # (B, D)
        b, (m, n) = len(z), self.readout_weight_.shape
        # Every module (and the zero module) on every example, (M + 1, B, ·): interventions may touch any class.
        hidden_all, x_all = encode(z.expand(m + 1, b, -1), self._w1, self._b1, self._w2, self._b2)
        # (B, M + 1, n), written example-major so that it flattens to the component order without a copy.
        contribution_all = torch.mul(x_all.transpose(0, 1), self._readout_weight.unsqueeze(0),
                                     out=torch.empty(b, m + 1, n, device=z.device))
        module = self._module_of_class[batch.targets]  # (B,)
        weight = x_all.gather(0, module.view(1, b, 1).expand(1, b, n))[0]
        contribution = contribution_all.gather(1, module.view(b, 1, 1).expand(b, 1, n))[:, 0]
        heatmaps = None
        if batch.heatmaps and features.dim() > 2:  # a fully connected layer has no grid to map
            hidden = hidden_all.gather(0, module.view(1, b, 1).expand(1, b, hidden_all.shape[2]))[0]  # (B, Hd)
            # ∂E_n/∂Z (xfeature_gradient) without its x > 0 gate: an x-feature at 0 has a zero contribution,
            # which scales its density below to zero whatever its map.
            gate = self._w2[module].transpose(1, 2) * (hidden > 0).unsqueeze(1)  # (B, n, Hd)
            gradient = gate @ self._w1[module].transpose(1, 2)  # (B, n, D)
            cam = grad_cam(gradient, features)  # (B, n, P)
            # cam >= 0: where its total is 0, cam is 0 everywhere and so is the density.
            density = cam / cam.sum(2, keepdim=True).clamp_min(1e-30) * contribution.unsqueeze(2)
            heatmaps = density.reshape(b, n, *features.shape[2:])
        return Decomposition(
            component_index=self._class_components[batch.targets],
            weight=weight,
            contribution=contribution,
            bias=self._readout_bias[module],
            residual=None,  # ŷ − ȳ
            heatmaps=heatmaps,
            # Component i is x-feature i % n of module i // n.
            suppressed_contribution=contribution_all.reshape(b, (m + 1) * n)[:, suppressed],
        )
