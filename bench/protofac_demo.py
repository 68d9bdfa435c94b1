"""ProtoFac's fits of the demo build, timed, with their fit reports (issue 18's figures).

    python -m bench.protofac_demo [--work build/demo] [--models mnist ecg] [--out FILE.json]

Runs exactly the ProtoFac fits `model_store.build_demo` runs (MNIST at its layer; ECG at ``fc_3``
with the k sweep and at ``fc_1`` without), on the demo's cached models (trained into ``--work``
when missing), and prints per fit the wall and CPU seconds and the report (without the prototype
listing and the projection history), as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from handlers.explainers.protofac import ProtoFacConfig
from handlers.fitting import protofac
from handlers.model import ModelParts
from model_store import build_demo
from model_store.recipes.ecg import ECG_LABELS, ECG_LAYER, ECG_OTHER_FC_LAYER
from model_store.recipes.mnist import MNIST_LABELS, MNIST_LAYER


def timed_fit(parts: ModelParts, data, params: dict) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    fitted = protofac.fit(parts, data, ProtoFacConfig.from_dict(params))
    report = {key: value for key, value in fitted.fit_report.items() if key not in ("prototypes", "history")}
    return {"seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1),
            "report": report}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("build/demo"))
    parser.add_argument("--models", nargs="+", choices=["mnist", "ecg"], default=["mnist", "ecg"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    if "mnist" in args.models:
        model, _ = build_demo.mnist_model(args.work)
        parts = ModelParts.from_model(model, MNIST_LAYER, build_demo.MNIST_INPUT, MNIST_LABELS)
        results["mnist"] = timed_fit(parts, build_demo.mnist_fit_data(args.work), build_demo.MNIST_METHODS["protofac"])
    if "ecg" in args.models:
        model, _ = build_demo.ecg_model(args.work)
        data = build_demo.ecg_fit_data(args.work)
        params = build_demo.ECG_METHODS["protofac"]
        results["ecg_fc_3"] = timed_fit(ModelParts.from_model(model, ECG_LAYER, build_demo.ECG_INPUT, ECG_LABELS),
                                        data, params)
        results["ecg_fc_1"] = timed_fit(
            ModelParts.from_model(model, ECG_OTHER_FC_LAYER, build_demo.ECG_INPUT, ECG_LABELS), data,
            {**params, "k_sweep": []})
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
