"""`bench/accuracy.py --suite ordinal`: ELPV's four defect levels as ordered classes, on frozen
EfficientNet-Lite0 features (224 px, its default layers averaged), five split seeds, both protocols.

For each protocol and split seed, on the same 4-class split: the dense head with cross-entropy
(plain softmax) against the dense head with the ordinal loss (`--loss ordinal`,
pipeline/heads/ordinal.py), and the logistic regression beside them. Each is scored as a 4-class
classifier (accuracy, mean absolute error in levels) and, read at the cut ">= defect-0.67", as a
binary classifier of functional against defective (the binary task read off the 4-level model,
from its probabilities: P(level >= 2/3) >= 1/2). Beside them, on the binary task's own split of
the same seed and protocol: the dense head trained on the two classes. Everything is chosen on
validation only; the headline is test. Rows are written as each ends (resumable).

bench/results/accuracy-ordinal.json: `rows` (one per protocol, seed and head) and `results`
(per protocol and head: per-seed test figures and their means).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.accuracy_finetune import PROTOCOLS
from bench.common import machine_line, markdown_table
from bench.elpv import load, majority, save
from pipeline.cache.reader import load_splits
from pipeline.extraction.extract import ExtractOptions, extract_features
from pipeline.heads.ordinal import ordinal_metrics
from pipeline.runs import Run
from pipeline.training.train import TrainOptions, run_training

BACKBONE = "efficientnet_lite0"
HEADS = {  # name: (head, parameters)
    "dense, cross-entropy": ("dense", {}),
    "dense, ordinal loss": ("dense", {"loss": "ordinal"}),
    "logistic regression": ("logreg", {"c_grid": "1e-4:1e2:7"}),
}
BINARY_HEAD = "binary task: dense, cross-entropy"
BINARY_CUT = ">= defect-0.67"  # functional (0, 1/3) against defective (2/3, 1), as Deitsch et al. 2019


def _cache(data: Path, work: Path, protocol: str, seed: int) -> Path:
    return extract_features(ExtractOptions(data=data, backbone=BACKBONE, cache_root=work / "features", progress=False,
                                           splits=replace(PROTOCOLS[protocol], seed=seed))).cache_dir


def _scored(directory: Path) -> dict:
    """A 4-class run's figures from its test probabilities: accuracy, the error in levels, the
    binary read off at the cut."""
    run = Run.open(directory)
    store = run.features()
    test = load_splits(store, run.view)["test"]
    figures = ordinal_metrics(test.labels, run.head().predict_proba(test), store.class_names)
    return {"test_mae_levels": figures["mean_absolute_error_levels"],
            "test_binary_read_off": figures["cuts"][BINARY_CUT]["accuracy"]}


def rows_for(protocol: str, seed: int, data4: Path, data2: Path, work: Path, state: dict, out: Path) -> None:
    models = work / "models" / "ordinal-suite"
    tag = f"{protocol.replace('/', '-')}-split{seed}"
    wanted = [*HEADS, BINARY_HEAD]
    if all(_row(state, protocol, seed, name) for name in wanted):
        return
    cache = _cache(data4, work, protocol, seed)  # re-splits the one cache (no second extraction)
    for name, (kind, params) in HEADS.items():
        if _row(state, protocol, seed, name):
            continue
        started = time.perf_counter()
        run = run_training(TrainOptions(head=kind, features=cache, models=models, progress=False, head_params=params,
                                        name=f"4class-{tag}-{name.replace(', ', '-').replace(' ', '-')}"))
        row = {"protocol": protocol, "split_seed": seed, "head": name,
               "validation_accuracy": run.metrics["validation"]["accuracy"],
               "test_accuracy": run.metrics["test"]["accuracy"], **_scored(run.directory),
               "seconds": round(time.perf_counter() - started, 1)}
        _append(state, out, row)
    if not _row(state, protocol, seed, BINARY_HEAD):
        cache2 = _cache(data2, work, protocol, seed)
        started = time.perf_counter()
        run = run_training(TrainOptions(head="dense", features=cache2, models=models, progress=False,
                                        name=f"binary-{tag}-dense"))
        _append(state, out, {"protocol": protocol, "split_seed": seed, "head": BINARY_HEAD,
                             "validation_accuracy": run.metrics["validation"]["accuracy"],
                             "test_accuracy": run.metrics["test"]["accuracy"],
                             "seconds": round(time.perf_counter() - started, 1)})


def _row(state: dict, protocol: str, seed: int, head: str) -> dict | None:
    return next((r for r in state["rows"] if (r["protocol"], r["split_seed"], r["head"]) == (protocol, seed, head)),
                None)


def _append(state: dict, out: Path, row: dict) -> None:
    state["rows"].append(row)
    save(out, state | {"results": summary(state)})
    binary = f", binary read off {row['test_binary_read_off']:.2%}" if "test_binary_read_off" in row else ""
    print(f"  {row['protocol']} split {row['split_seed']} {row['head']}: validation {row['validation_accuracy']:.2%}, "
          f"test {row['test_accuracy']:.2%}{binary} ({row['seconds']} s)", flush=True)


def summary(state: dict) -> dict:
    results: dict = {}
    for protocol in PROTOCOLS:
        for head in [*HEADS, BINARY_HEAD]:
            found = sorted((r for r in state["rows"] if r["protocol"] == protocol and r["head"] == head),
                           key=lambda r: r["split_seed"])
            if not found:
                continue
            entry = {"seeds": [r["split_seed"] for r in found]}
            for key in ("validation_accuracy", "test_accuracy", "test_mae_levels", "test_binary_read_off"):
                values = [r[key] for r in found if key in r]
                if values:
                    entry[key] = values
                    entry[f"{key}_mean"] = float(np.mean(values))
                    entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            results.setdefault(protocol, {})[head] = entry
    return results


def report(results: dict, majorities: dict[str, float]) -> str:
    def figure(entry: dict, key: str, percent: bool = True) -> str:
        if f"{key}_mean" not in entry:
            return "-"
        mean, std = entry[f"{key}_mean"], entry[f"{key}_std"]
        return f"{mean:.2%} +- {std * 100:.2f}" if percent else f"{mean:.3f} +- {std:.3f}"

    lines = []
    for protocol, heads in results.items():
        four, two = majorities.get("4class", float("nan")), majorities.get("binary", float("nan"))
        lines.append(f"ELPV, {protocol}, frozen Lite0 features; majority baselines: 4-class {four:.1%}, "
                     f"binary {two:.1%}")
        lines.append(markdown_table(
            ["head", "seeds", "validation", "test (its task)", "test error in levels", "binary read off (>= 0.67)"],
            [[name, str(len(e["seeds"])), figure(e, "validation_accuracy"), figure(e, "test_accuracy"),
              figure(e, "test_mae_levels", percent=False), figure(e, "test_binary_read_off")]
             for name, e in heads.items()]))
        lines.append("")
    return "\n".join(lines)


def run(work: Path, seeds: list[int], out: Path, protocols: list[str] | None = None) -> dict:
    from bench.elpv import export

    state = load(out)
    state["machine"] = machine_line()
    data4, data2 = export("4class", work), export("binary", work)
    majorities = {"4class": majority(data4), "binary": majority(data2)}
    for protocol in protocols or list(PROTOCOLS):
        for seed in seeds:
            rows_for(protocol, seed, data4, data2, work, state, out)
    results = summary(state)
    save(out, state | {"results": results, "majority_baselines": majorities})
    print(report(results, majorities))
    return results
