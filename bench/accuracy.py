"""ELPV accuracy on the published protocol, every configuration through the pipeline's own commands.

    .venv/bin/python bench/accuracy.py [--task binary 4class] [--finetune-epochs N] [--quick]

Protocol (Deitsch et al. 2019): a stratified 75% train / 25% test split, the validation split
carved out of train (12.5% of all images, so train 62.5%), fixed seeds; binary is functional
(p < 0.5) against defective (p >= 0.5), 4-class the four annotated probabilities. Each
configuration (image size, layers, pooling, head and its settings) is scored on validation and on
test; the configuration is chosen on validation accuracy only, and its test accuracy is the
headline. The test split is looked at once per configuration and never used to choose.

Feature caches and runs go under bench/work/ (reused by the next run: a second run extracts
nothing); the tables go to stdout and bench/results/accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.common import machine_line, markdown_table  # noqa: E402
from pipeline.dataset import SplitConfig  # noqa: E402
from pipeline.demo_data import export_elpv  # noqa: E402
from pipeline.extract import ExtractOptions, extract_features  # noqa: E402
from pipeline.train import TrainOptions, train_head  # noqa: E402

PROTOCOL = SplitConfig(validation_fraction=0.125, test_fraction=0.25, seed=0)
ANCHORS = {
    "binary": {"SVM on hand-crafted features (Deitsch et al. 2019)": 0.8244,
               "fine-tuned VGG19 on a GPU (Deitsch et al. 2019)": 0.8842},
    "4class": {"CNN (Hindawi 2023)": 0.835},
}
TARGETS = {"binary": {"head": 0.885, "finetune": 0.91}, "4class": {"head": 0.84}}


@dataclass(frozen=True)
class Features:
    """One extraction: everything that decides the cached features."""

    image_size: int
    layers: tuple[str, ...]
    pooling: str = "none"  # at extraction; read-time pooling is part of the Config
    backbone: str = "vgg16"

    def label(self) -> str:
        return f"{self.backbone} {self.image_size}px {'+'.join(self.layers)}"


@dataclass(frozen=True)
class Config:
    features: Features
    head: str
    pooling: str  # read-time: none (flatten) | avg | max
    layers: tuple[str, ...] | None = None  # a subset of the cached layers (default: all)
    params: dict = field(default_factory=dict, hash=False)

    def label(self) -> str:
        layers = "+".join(self.layers or self.features.layers)
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        features = f"{self.features.backbone} {self.features.image_size}px {layers}"
        return f"{features} {self.pooling} {self.head} {params}".strip()


F150 = Features(150, ("block5_pool",))
F224 = Features(224, ("block4_pool", "block5_pool"))
F300 = Features(300, ("block4_pool", "block5_pool"))

CONFIGS = [
    Config(F150, "logreg", "none"),  # the demo's configuration, on this protocol
    Config(F150, "dense", "none"),
    Config(F224, "logreg", "avg", ("block5_pool",)),
    Config(F224, "logreg", "max", ("block5_pool",)),
    Config(F224, "logreg", "none", ("block5_pool",)),
    Config(F224, "logreg", "avg"),
    Config(F224, "logreg", "max"),
    Config(F300, "logreg", "avg", ("block5_pool",)),
    Config(F300, "logreg", "max", ("block5_pool",)),
    Config(F300, "logreg", "avg"),
    Config(F300, "logreg", "max"),
    Config(F300, "logreg", "max", params={"class_weight": "balanced"}),
    Config(F300, "dense", "max"),
    Config(F300, "dense", "max", params={"units": 512, "dropout": 0.3}),
    Config(F300, "dense", "avg"),
]
QUICK = CONFIGS[:2]


def export(task: str, work: Path) -> Path:
    data = work / "data" / f"elpv-{task}"
    export_elpv(data, task)
    return data


def extract(features: Features, data: Path, cache: Path) -> Path:
    summary = extract_features(ExtractOptions(
        data=data, backbone=features.backbone, image_size=features.image_size, layers=features.layers,
        pooling=features.pooling, cache_root=cache, splits=PROTOCOL, progress=sys.stderr.isatty(),
    ))
    if summary.new:
        print(f"  extracted {features.label()}: {summary.new} images in {summary.seconds:.0f} s", flush=True)
    return summary.cache_dir


def evaluate(config: Config, cache_dir: Path, models: Path) -> dict:
    started = time.perf_counter()
    run = train_head(TrainOptions(
        head=config.head, features=cache_dir, models=models, pooling=config.pooling,
        layers=list(config.layers) if config.layers else None, head_params=dict(config.params), progress=False,
    ))
    return {
        "configuration": config.label(),
        "run": run.directory.name,
        "validation_accuracy": run.metrics["validation"]["accuracy"],
        "test_accuracy": run.metrics["test"]["accuracy"],
        "test_mean_per_class": run.metrics["test"]["mean_per_class_accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
        "counts": {split: run.metrics[split]["images"] for split in ("train", "validation", "test")},
    }


def finetune_best(best: dict, models: Path, epochs: int) -> dict:
    from pipeline.finetune import FinetuneOptions, finetune

    started = time.perf_counter()
    run = finetune(FinetuneOptions(source=str(models / best["run"]), models=models, epochs=epochs, patience=epochs,
                                   progress=False))
    return {
        "from": best["run"],
        "epochs": epochs,
        "epochs_run": run.config["finetune"]["epochs_run"],
        "kept_epoch": run.config["finetune"]["kept_epoch"],
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "validation_accuracy": run.metrics["validation"]["accuracy"],
        "test_before": run.config["test_before_finetune"]["accuracy"],
        "test_after": run.metrics["test"]["accuracy"],
    }


def run_task(task: str, configs: list[Config], work: Path, finetune_epochs: int) -> dict:
    print(f"\n== ELPV {task} ==", flush=True)
    data = export(task, work)
    cache, models = work / "features", work / "models" / task
    caches: dict[Features, Path] = {}
    rows = []
    for config in configs:
        if config.features not in caches:
            caches[config.features] = extract(config.features, data, cache)
        rows.append(evaluate(config, caches[config.features], models))
        print(f"  {rows[-1]['configuration']}: validation {rows[-1]['validation_accuracy']:.2%}, "
              f"test {rows[-1]['test_accuracy']:.2%} ({rows[-1]['seconds']} s)", flush=True)
    best = max(rows, key=lambda r: r["validation_accuracy"])
    result = {"task": task, "protocol": vars(PROTOCOL), "counts": best["counts"], "rows": rows, "best": best,
              "anchors": ANCHORS[task], "targets": TARGETS[task]}
    if finetune_epochs and task in ("binary",):
        result["finetune"] = finetune_best(best, models, finetune_epochs)
    return result


def report(result: dict) -> str:
    task, best = result["task"], result["best"]
    counts = result["counts"]
    lines = [f"ELPV {task}: train {counts['train']} / validation {counts['validation']} / test {counts['test']} "
             "images; chosen on validation accuracy", ""]
    chosen = [r["configuration"] == best["configuration"] for r in result["rows"]]
    table = [[("**" if bold else "") + r["configuration"] + ("**" if bold else ""),
              f"{r['validation_accuracy']:.2%}", f"{r['test_accuracy']:.2%}", f"{r['test_mean_per_class']:.2%}",
              f"{r['seconds']}"] for r, bold in zip(result["rows"], chosen)]
    lines.append(markdown_table(["configuration", "validation", "test", "test mean per-class", "seconds"], table))
    target = result["targets"]["head"]
    gap = best["test_accuracy"] - target
    lines.append("")
    lines.append(f"chosen: {best['configuration']}: test {best['test_accuracy']:.2%}; target {target:.1%}: "
                 + ("reached" if gap >= 0 else f"not reached, short by {-gap * 100:.2f} points"))
    for name, value in result["anchors"].items():
        lines.append(f"  vs {name}: {value:.2%} ({(best['test_accuracy'] - value) * 100:+.2f} points)")
    if "finetune" in result:
        tuned = result["finetune"]
        target = result["targets"]["finetune"]
        gap = tuned["test_after"] - target
        lines.append(f"fine-tuned {tuned['from']} for {tuned['epochs_run']} epochs ({tuned['minutes']} min, kept epoch "
                     f"{tuned['kept_epoch']}): test {tuned['test_before']:.2%} -> {tuned['test_after']:.2%}; target "
                     f"{target:.0%}: " + ("reached" if gap >= 0 else f"not reached, short by {-gap * 100:.2f} points"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="+", default=["binary", "4class"], choices=("binary", "4class"))
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tune the chosen binary head for this many epochs (slow on a CPU)")
    parser.add_argument("--quick", action="store_true", help="only the 150 px configurations")
    parser.add_argument("--out", type=Path, default=Path("bench/results/accuracy.json"))
    args = parser.parse_args()
    print(machine_line(), flush=True)
    results = [run_task(task, QUICK if args.quick else CONFIGS, args.work, args.finetune_epochs) for task in args.task]
    print()
    for result in results:
        print(report(result) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
