"""The explanation methods by the name the API uses.

Each has an online explainer (``handlers/explainers/``, what the server imports) and an
offline fit with its report (``handlers/fitting/``, imported only when fitting, so that a
serving process never loads the fitting code and its libraries).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from handlers.base import Explainer, FittedMethod
from handlers.explainers import coupled_nmf, gradcam_rules, protofac, protonmf, srae


@dataclass(frozen=True)
class Method:
    name: str
    explainer: type[Explainer]
    fitting_module: str  # offline code: imported on first use of ``fit``

    @property
    def fit(self) -> Callable[..., FittedMethod]:
        """The offline fit, ``fit(parts, data, **hyperparameters) -> FittedMethod``."""
        return importlib.import_module(self.fitting_module).fit


METHODS: dict[str, Method] = {
    module.NAME: Method(module.NAME, explainer, f"handlers.fitting.{module.NAME}")
    for module, explainer in (
        (protonmf, protonmf.ProtoNMFExplainer),
        (coupled_nmf, coupled_nmf.CoupledNMFExplainer),
        (srae, srae.SRAEExplainer),
        (gradcam_rules, gradcam_rules.GradCAMRulesExplainer),
        (protofac, protofac.ProtoFacExplainer),
    )
}
