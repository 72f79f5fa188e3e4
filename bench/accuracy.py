"""ELPV accuracy over 5 split seeds, through the pipeline's own commands.

    .venv/bin/python -m bench.accuracy [--suite backbones|heads|vgg16|finetune|ordinal] [--task binary 4class]
                                       [--seeds 0 1 2 3 4] [--finetune-epochs N] [--quick]
                                       [--recipes NAME ...] [--protocols 75/25 70/15/15]

--suite finetune: stage three, EfficientNet-Lite0 end to end (bench/accuracy_finetune.py), resumable
row by row into bench/results/accuracy-finetune.json.

--suite heads: every head (logistic regression, dense, SVM, nearest neighbours) on EfficientNet-Lite0's
features (224 px, average-pooled), both protocols, five split seeds, binary and 4-class; each head
chosen on validation as it chooses itself.

--suite ordinal: ELPV's four levels as ordered classes on frozen Lite0 features, the dense head
with cross-entropy against the ordinal loss, each also read as a binary classifier
(bench/accuracy_ordinal.py), resumable into bench/results/accuracy-ordinal.json.


--suite backbones (the default): every backbone alone (VGG16, EfficientNet-Lite0/1/2) and the
useful fusions of their features (`train-head --features A,B`), frozen features with a logistic
regression, on both protocols: Deitsch et al.'s 75/25 below and the project's own 70/15/15
(extract's defaults); with each backbone's extraction speed on this CPU beside it. All backbones
at 224 px (fused caches share one image size), average-pooled at extraction: VGG16 block4_pool +
block5_pool (1,024 values), the Lite models their last three stages and head (Lite0 1,904).

--suite vgg16: the 15 VGG16 configurations (sizes, layers, pooling, heads) of earlier rounds, on
the 75/25 protocol, with --finetune-epochs N for fine-tuning.

Protocol (Deitsch et al. 2019): a stratified 75% train / 25% test split, the validation split
carved out of train (12.5% of all images, so train 62.5%), fixed seeds; binary is functional
(p < 0.5) against defective (p >= 0.5), 4-class the four annotated probabilities. Each
configuration (image size, layers, pooling, head and its settings) is scored on validation and on
test on every split seed (re-splitting a cache rewrites its labels, no backbone pass): one split's
test accuracy moves by about 1.4 points (standard error) from the split alone. The configuration
is chosen on mean validation accuracy only, and its mean +- standard deviation of test accuracy is
the headline. The test split is never used to choose.

With --finetune-epochs N (binary), the best 150 px head is fine-tuned on every seed: end to end
for N epochs, and on cached block4_pool activations (`finetune --cached`) for the epochs the same
time buys (N x the end-to-end seconds per epoch / the cached seconds per epoch, measured on the
first seed), with flips of the cached maps and without them (the CLI's default for --cached).

Feature caches and runs go under bench/work/ (reused by the next run: a second run extracts
nothing); the tables go to stdout and bench/results/accuracy.json (accuracy-backbones.json for
the backbones suite).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402
from bench.elpv import export  # noqa: E402
from pipeline.backbone.registry import BACKBONES  # noqa: E402
from pipeline.data.dataset import SplitConfig  # noqa: E402
from pipeline.extraction.extract import ExtractOptions, extract_features  # noqa: E402
from pipeline.training.train import TrainOptions, run_training  # noqa: E402

PROTOCOL = SplitConfig(validation_fraction=0.125, test_fraction=0.25, seed=0)
PROTOCOLS = {"75/25 (Deitsch)": PROTOCOL, "70/15/15 (project)": SplitConfig(validation_fraction=0.15,
                                                                           test_fraction=0.15, seed=0)}
SEEDS = (0, 1, 2, 3, 4)
ANCHORS = {
    "binary": {"SVM on hand-crafted features (Deitsch et al. 2019)": 0.8244,
               "fine-tuned VGG19 on a GPU (Deitsch et al. 2019)": 0.8842},
    "4class": {"CNN (Hindawi 2023)": 0.835},
}
TARGETS = {"binary": {"head": 0.885, "finetune": 0.91}, "4class": {"head": 0.84}}
# the backbones suite's goals (frozen features, a cheap head): past the fine-tuned VGG19 and the 4-class CNN
GOALS = {"binary": 0.8842, "4class": 0.835}
BACKBONE_LAYERS = {name: spec.default_layers for name, spec in BACKBONES.items()}


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
    features: Features | tuple[Features, ...]  # several: their features fused
    head: str
    pooling: str  # read-time: none (flatten) | avg | max
    layers: tuple[str, ...] | None = None  # a subset of the cached layers (default: all)
    params: dict = field(default_factory=dict, hash=False)

    @property
    def sources(self) -> tuple[Features, ...]:
        return self.features if isinstance(self.features, tuple) else (self.features,)

    def label(self) -> str:
        params = " ".join(f"{k}={v}" for k, v in self.params.items())
        if len(self.sources) > 1:
            return f"{' + '.join(f.backbone for f in self.sources)} {self.sources[0].image_size}px fused " \
                   f"{self.pooling} {self.head} {params}".strip()
        layers = "+".join(self.layers or self.features.layers)
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

# --suite backbones: one size for all (fused caches share it), pooled at extraction
VGG = Features(224, ("block4_pool", "block5_pool"), "avg", "vgg16")
LITE = {n: Features(224, BACKBONE_LAYERS[f"efficientnet_lite{n}"], "avg", f"efficientnet_lite{n}") for n in (0, 1, 2)}
BACKBONE_CONFIGS = [
    Config(VGG, "logreg", "avg"),
    Config(LITE[0], "logreg", "avg"),
    Config(LITE[1], "logreg", "avg"),
    Config(LITE[2], "logreg", "avg"),
    Config((LITE[0], LITE[2]), "logreg", "avg"),
    Config((LITE[0], LITE[1], LITE[2]), "logreg", "avg"),
    Config((VGG, LITE[0], LITE[2]), "logreg", "avg"),
    Config((VGG, LITE[0], LITE[1], LITE[2]), "logreg", "avg"),
]
BACKBONE_QUICK = [BACKBONE_CONFIGS[1], BACKBONE_CONFIGS[4]]
# --suite heads: every head on the same cached features (EfficientNet-Lite0, 224 px, average-pooled)
HEAD_CONFIGS = [Config(LITE[0], head, "avg") for head in ("logreg", "dense", "svm", "knn")]
# VGG16 at 224 px extracts at about 2 images/s on a 2-core CPU in fp32 (20 minutes for ELPV, per
# task): the 4-class task runs the Lite models and their fusions only (VGG16's 4-class figure is
# --suite vgg16's, at 150 px)
SKIPPED = {"4class": {VGG}}


def extract(features: Features, data: Path, cache: Path, seed: int, protocol: SplitConfig = PROTOCOL) -> Path:
    """The cache of `features` split with `seed` (the first call extracts; later seeds and
    protocols only rewrite the labels and splits of its shards). The extraction's speed is kept
    in bench/work/speeds.json, for the runs that reuse the cache."""
    summary = extract_features(ExtractOptions(
        data=data, backbone=features.backbone, image_size=features.image_size, layers=features.layers,
        pooling=features.pooling, cache_root=cache, splits=replace(protocol, seed=seed),
        progress=sys.stderr.isatty(),
    ))
    if summary.new:
        print(f"  extracted {features.label()}: {summary.new} images in {summary.seconds:.0f} s", flush=True)
        speeds = _speeds(cache)
        speeds[features.label()] = {"images": summary.new, "seconds": round(summary.seconds, 1),
                                    "loop_seconds": round(summary.loop_seconds, 1),
                                    "images_per_second": round(summary.new / summary.loop_seconds, 1),
                                    "machine": machine_line()}
        (cache / "speeds.json").write_text(json.dumps(speeds, indent=2) + "\n")
    return summary.cache_dir


def _speeds(cache: Path) -> dict:
    path = cache / "speeds.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate(config: Config, cache_dir: Path | list[Path], models: Path, seed: int, protocol: str = "") -> dict:
    started = time.perf_counter()
    key = config.label() + (f" {protocol}" if protocol and protocol != next(iter(PROTOCOLS)) else "")
    name = f"{config.head}-{hashlib.sha256(key.encode()).hexdigest()[:8]}-split{seed}"
    run = run_training(TrainOptions(
        head=config.head, features=cache_dir, models=models, pooling=config.pooling, name=name,
        layers=list(config.layers) if config.layers else None, head_params=dict(config.params), progress=False,
    ))
    return {
        "configuration": config.label(),
        "split_seed": seed,
        "run": run.directory.name,
        "validation_accuracy": run.metrics["validation"]["accuracy"],
        "test_accuracy": run.metrics["test"]["accuracy"],
        "test_accuracy_ci95": [run.metrics["test"]["accuracy_ci95_low"], run.metrics["test"]["accuracy_ci95_high"]],
        "test_mean_per_class": run.metrics["test"]["mean_per_class_accuracy"],
        "seconds": round(time.perf_counter() - started, 1),
        "counts": {split: run.metrics[split]["images"] for split in ("train", "validation", "test")},
    }


def summarise(rows: list[dict]) -> dict:
    """One configuration over its split seeds: mean and standard deviation (ddof=1)."""
    validation = np.array([r["validation_accuracy"] for r in rows])
    test = np.array([r["test_accuracy"] for r in rows])
    spread = (lambda v: float(v.std(ddof=1)) if len(v) > 1 else 0.0)
    return {
        "configuration": rows[0]["configuration"],
        "seeds": [r["split_seed"] for r in rows],
        "validation_mean": float(validation.mean()), "validation_std": spread(validation),
        "test_mean": float(test.mean()), "test_std": spread(test),
        "test_mean_per_class_mean": float(np.mean([r["test_mean_per_class"] for r in rows])),
        "seconds": round(float(np.mean([r["seconds"] for r in rows])), 1),
        "runs": [r["run"] for r in rows],
        "counts": rows[0]["counts"],
    }


def _finetune_row(source: Path, models: Path, epochs: int, cached: bool, seed: int, name: str,
                  flips: bool = True) -> dict:
    from pipeline.finetuning.examples import Augmentation
    from pipeline.finetuning.finetune import FinetuneOptions, run_finetuning

    started = time.perf_counter()
    tuned = run_finetuning(FinetuneOptions(source=str(source), models=models, epochs=epochs, patience=epochs,
                                           cached=cached,
                                          progress=False, name=name,
                                          augmentation=Augmentation() if flips else Augmentation.off()))
    return {
        "split_seed": seed, "epochs": epochs, "epochs_run": tuned.config["finetune"]["epochs_run"],
        "kept_epoch": tuned.config["finetune"]["kept_epoch"],
        "seconds_per_epoch": tuned.config["seconds_per_epoch"],
        "minutes": round((time.perf_counter() - started) / 60, 2),
        "validation_accuracy": tuned.metrics["validation"]["accuracy"],
        "test_before": tuned.config["test_before_finetune"]["accuracy"],
        "test_after": tuned.metrics["test"]["accuracy"],
    }


def finetune_seeds(best: dict, features: Features, data: Path, cache: Path, models: Path, seeds: list[int],
                   epochs: int) -> dict:
    """The chosen head fine-tuned on every seed, end to end for `epochs`, and on cached block4_pool
    activations for the epochs the same time buys (seconds per epoch of both, timed on the first
    seed: the end-to-end run itself, and a one-epoch cached run that is not counted)."""
    below = Features(features.image_size, ("block4_pool",), "none", features.backbone)
    results: dict[str, list[dict]] = {"end to end": [], "cached, flipped maps": [], "cached, no flips": []}
    cached_epochs = 0
    for seed, run in zip(seeds, best["runs"]):
        extract(features, data, cache, seed)
        if "block4_pool" not in features.layers or features.pooling != "none":
            extract(below, data, cache, seed)
        source = models / run
        results["end to end"].append(_finetune_row(source, models, epochs, False, seed, f"{run}-finetuned"))
        if not cached_epochs:
            timing = _finetune_row(source, models, 1, True, seed, f"{run}-finetuned-cached-timing")
            ratio = results["end to end"][0]["seconds_per_epoch"] / timing["seconds_per_epoch"]
            cached_epochs = max(epochs, int(epochs * ratio))
            print(f"  cached fine-tuning: {ratio:.1f}x faster per epoch: {cached_epochs} epochs for the time of "
                  f"{epochs} end to end", flush=True)
        results["cached, flipped maps"].append(_finetune_row(source, models, cached_epochs, True, seed,
                                                             f"{run}-finetuned-cached"))
        results["cached, no flips"].append(_finetune_row(source, models, cached_epochs, True, seed,
                                                         f"{run}-finetuned-cached-noflip", flips=False))
        for how in results:
            row = results[how][-1]
            print(f"  split {seed} fine-tuned {how} for {row['epochs_run']} epochs ({row['seconds_per_epoch']:.1f} s "
                  f"each, kept {row['kept_epoch']}): test {row['test_before']:.2%} -> {row['test_after']:.2%}",
                  flush=True)
    summary = {}
    for how, rows in results.items():
        after = np.array([r["test_after"] for r in rows])
        summary[how] = {"rows": rows, "epochs": rows[0]["epochs"], "test_mean": float(after.mean()),
                        "test_std": float(after.std(ddof=1)) if len(after) > 1 else 0.0,
                        "test_before_mean": float(np.mean([r["test_before"] for r in rows])),
                        "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in rows])),
                        "minutes_mean": float(np.mean([r["minutes"] for r in rows]))}
    return summary


def run_task(task: str, configs: list[Config], work: Path, seeds: list[int], finetune_epochs: int) -> dict:
    print(f"\n== ELPV {task} ==", flush=True)
    data = export(task, work)
    cache, models = work / "features", work / "models" / task
    rows: dict[str, list[dict]] = {}
    for seed in seeds:
        caches = {features: extract(features, data, cache, seed) for features in dict.fromkeys(c.features
                                                                                           for c in configs)}
        for config in configs:
            row = evaluate(config, caches[config.features], models, seed)
            rows.setdefault(config.label(), []).append(row)
            print(f"  split {seed}: {row['configuration']}: validation {row['validation_accuracy']:.2%}, "
                  f"test {row['test_accuracy']:.2%} ({row['seconds']} s)", flush=True)
    summaries = [summarise(r) for r in rows.values()]
    best = max(summaries, key=lambda r: r["validation_mean"])
    result = {"task": task, "protocol": vars(PROTOCOL) | {"seeds": list(seeds)}, "counts": best["counts"],
              "rows": summaries, "per_seed": rows, "best": best, "anchors": ANCHORS[task], "targets": TARGETS[task]}
    if finetune_epochs and task in ("binary",):
        # from the best 150 px head (as the demo does): end to end at 300 px costs about 7 minutes per seed
        # here, which would put this benchmark past two hours on two cores
        small = [r for r in summaries if r["configuration"].split()[1] == "150px"]
        start = max(small, key=lambda r: r["validation_mean"])
        chosen = next(c for c in configs if c.label() == start["configuration"])
        result["finetune"] = finetune_seeds(start, chosen.features, data, cache, models, list(seeds), finetune_epochs)
        result["finetune_from"] = start["configuration"]
    return result


def run_backbones_task(task: str, configs: list[Config], work: Path, seeds: list[int]) -> dict:
    """Every configuration on both protocols and every seed; the best of each protocol chosen on
    mean validation accuracy."""
    print(f"\n== ELPV {task}: backbones and fusions ==", flush=True)
    data = export(task, work)
    cache, models = work / "features", work / "models" / f"{task}-backbones"
    configs = [c for c in configs if not set(c.sources) & SKIPPED.get(task, set())]
    sources = list(dict.fromkeys(f for c in configs for f in c.sources))
    protocols = {}
    for protocol_name, protocol in PROTOCOLS.items():
        rows: dict[str, list[dict]] = {}
        for seed in seeds:
            caches = {f: extract(f, data, cache, seed, protocol) for f in sources}
            for config in configs:
                named = [caches[f] for f in config.sources]
                row = evaluate(config, named if len(named) > 1 else named[0], models, seed, protocol_name)
                rows.setdefault(config.label(), []).append(row)
                print(f"  {protocol_name} split {seed}: {row['configuration']}: validation "
                      f"{row['validation_accuracy']:.2%}, test {row['test_accuracy']:.2%} ({row['seconds']} s)",
                      flush=True)
        summaries = [summarise(r) for r in rows.values()]
        best = max(summaries, key=lambda r: r["validation_mean"])
        protocols[protocol_name] = {"protocol": vars(protocol) | {"seeds": list(seeds)}, "rows": summaries,
                                    "per_seed": rows, "best": best, "counts": best["counts"]}
    speeds = _speeds(cache)
    return {"task": task, "suite": "backbones", "protocols": protocols, "goal": GOALS[task],
            "anchors": ANCHORS[task], "speeds": {f.label(): speeds.get(f.label()) for f in sources}}


def report_backbones(result: dict) -> str:
    task, goal = result["task"], result["goal"]
    lines = [f"ELPV {task}: frozen features, logistic regression (standardised, C chosen on validation); "
             "mean +- standard deviation over the split seeds; the best chosen on mean validation accuracy", ""]
    for name, outcome in result["protocols"].items():
        counts, best = outcome["counts"], outcome["best"]
        lines.append(f"{name}: train {counts['train']} / validation {counts['validation']} / test {counts['test']} "
                     f"images, seeds {', '.join(map(str, outcome['protocol']['seeds']))}")
        table = [[("**" if r is best else "") + r["configuration"] + ("**" if r is best else ""),
                  _pm(r["validation_mean"], r["validation_std"]), _pm(r["test_mean"], r["test_std"]),
                  f"{r['test_mean_per_class_mean']:.2%}", f"{r['seconds']}"] for r in outcome["rows"]]
        lines.append(markdown_table(["configuration", "validation", "test", "test mean per-class",
                                     "head seconds per seed"], table))
        gap = best["test_mean"] - goal
        lines.append(f"chosen: {best['configuration']}: test {_pm(best['test_mean'], best['test_std'])}; goal above "
                     f"{goal:.2%}: " + (f"reached by {gap * 100:.2f} points" if gap > 0
                                        else f"missed by {-gap * 100:.2f} points"))
        lines.append("")
    rows = [[label, f"{s['images_per_second']}", f"{s['seconds']}"] if s else [label, "(not measured)", ""]
            for label, s in result["speeds"].items()]
    lines.append("extraction on this CPU (2,624 images, the first pass; loop images/s excludes start-up):")
    lines.append(markdown_table(["features", "images/s", "seconds in all"], rows))
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2%} +- {std * 100:.2f}"


def report(result: dict) -> str:
    task, best = result["task"], result["best"]
    counts = result["counts"]
    seeds = result["protocol"]["seeds"]
    lines = [f"ELPV {task}: train {counts['train']} / validation {counts['validation']} / test {counts['test']} "
             f"images; split seeds {', '.join(map(str, seeds))}; mean +- standard deviation over the seeds; chosen on "
             "mean validation accuracy", ""]
    table = [[("**" if r is best else "") + r["configuration"] + ("**" if r is best else ""),
              _pm(r["validation_mean"], r["validation_std"]), _pm(r["test_mean"], r["test_std"]),
              f"{r['test_mean_per_class_mean']:.2%}", f"{r['seconds']}"] for r in result["rows"]]
    lines.append(markdown_table(["configuration", "validation", "test", "test mean per-class", "seconds per seed"],
                                table))
    target = result["targets"]["head"]
    gap = best["test_mean"] - target
    lines.append("")
    lines.append(f"chosen: {best['configuration']}: test {_pm(best['test_mean'], best['test_std'])}; target "
                 f"{target:.1%}: " + ("reached" if gap >= 0 else f"not reached, short by {-gap * 100:.2f} points"))
    for name, value in result["anchors"].items():
        lines.append(f"  vs {name}: {value:.2%} ({(best['test_mean'] - value) * 100:+.2f} points)")
    if "finetune" in result:
        lines.append("")
        lines.append(f"fine-tuned from the best 150 px head ({result['finetune_from']}), block5 unfrozen:")
        rows = [[how, str(t["epochs"]), f"{t['seconds_per_epoch']:.1f}", f"{t['minutes_mean']:.1f}",
                 f"{t['test_before_mean']:.2%}", _pm(t["test_mean"], t["test_std"])]
                for how, t in result["finetune"].items()]
        lines.append(markdown_table(["fine-tuning", "epochs", "s/epoch", "minutes per seed", "test before (mean)",
                                     "test after"], rows))
        for how, t in result["finetune"].items():
            for name, value in result["anchors"].items():
                if "VGG19" in name:
                    lines.append(f"  {how}: {(t['test_mean'] - value) * 100:+.2f} points against {name} ({value:.2%})")
    return "\n".join(lines)


def _plain(value: object) -> object:
    """JSON for what a result holds beside numbers and text: sets sorted, anything else as text."""
    return sorted(value) if isinstance(value, frozenset | set) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="backbones", choices=("backbones", "heads", "vgg16", "finetune", "ordinal"))
    parser.add_argument("--task", nargs="+", default=["binary", "4class"], choices=("binary", "4class"))
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tune the chosen binary head for this many epochs (slow on a CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="vgg16: only the 150 px configurations; backbones: Lite0 alone and Lite0 + Lite2")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="split seeds (default 0-4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default bench/results/accuracy.json (vgg16), accuracy-backbones.json (backbones), "
                             "accuracy-finetune.json (finetune)")
    parser.add_argument("--recipes", nargs="+", default=None, help="finetune: only these recipes (default all)")
    parser.add_argument("--protocols", nargs="+", default=None, choices=("75/25", "70/15/15"),
                        help="finetune, ordinal: only these protocols (default both)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    if args.suite == "finetune":
        from bench import accuracy_finetune

        out = args.out or Path("bench/results/accuracy-finetune.json")
        accuracy_finetune.run(args.work, args.task, args.seeds, out, args.recipes, args.protocols)
        return
    if args.suite == "ordinal":
        from bench import accuracy_ordinal

        out = args.out or Path("bench/results/accuracy-ordinal.json")
        accuracy_ordinal.run(args.work, args.seeds, out, args.protocols)
        return
    if args.suite in ("backbones", "heads"):
        out = args.out or Path(f"bench/results/accuracy-{args.suite}.json")
        configs = HEAD_CONFIGS if args.suite == "heads" else BACKBONE_QUICK if args.quick else BACKBONE_CONFIGS
        results = [run_backbones_task(task, configs, args.work, args.seeds) for task in args.task]
        print()
        for result in results:
            print(report_backbones(result) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2, default=_plain) + "\n")
        return
    args.out = args.out or Path("bench/results/accuracy.json")
    results = [run_task(task, QUICK if args.quick else CONFIGS, args.work, args.seeds, args.finetune_epochs)
               for task in args.task]
    print()
    for result in results:
        print(report(result) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_line(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
