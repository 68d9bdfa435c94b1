"""The explanation methods by the name the API uses.

Each has an online explainer (``handlers/explainers/``, what the server imports) and an
offline fit with its report (``handlers/fitting/``, imported only when fitting, so that a
serving process never loads the fitting code and its libraries).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from handlers.base import Explainer, FittedMethod, MethodConfig
from handlers.explainers.coupled_nmf import CoupledNMFExplainer
from handlers.explainers.gradcam_rules import GradCAMRulesExplainer
from handlers.explainers.protofac import ProtoFacExplainer
from handlers.explainers.protonmf import ProtoNMFExplainer
from handlers.explainers.srae import SRAEExplainer


@dataclass(frozen=True)
class Method:
    name: str
    config: type[MethodConfig]  # the hyperparameters, stored in archives and read back typed
    explainer: type[Explainer]
    fitting_module: str  # offline code: imported on first use of ``fit``

    @property
    def fit(self) -> Callable[..., FittedMethod]:
        """The offline fit, ``fit(parts, data, config, log=print) -> FittedMethod``."""
        return importlib.import_module(self.fitting_module).fit


METHODS: dict[str, Method] = {
    explainer.name: Method(explainer.name, explainer.config_class, explainer, f"handlers.fitting.{explainer.name}")
    for explainer in (ProtoNMFExplainer, CoupledNMFExplainer, SRAEExplainer, GradCAMRulesExplainer, ProtoFacExplainer)
}
