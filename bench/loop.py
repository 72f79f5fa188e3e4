"""A labelling project's loop, measured: suggestions against random choice, and unknowns.

    .venv/bin/python -m bench.loop [--suite loop|unknowns|all] [--seeds 0 1 2] [--rounds 5]

--suite loop: on ELPV (binary; the demo's frozen EfficientNet-Lite0 features) and on a synthetic
set (six Gaussian clusters of 64 values, one of them rare), validation and test fixed and labelled
(70/15/15, stratified), the training pool starts 5% labelled (stratified, by seed); each round
trains the logistic regression on what is labelled (`train-head --labels`), then labels N more
images of the pool "from the truth": the N that `suggest` ranks first, or N chosen at random,
with the same budget (N = 5% of the pool a round). Test accuracy against the number of labels, for
both, over three seeds. No backbone pass: every round is a labels table over one cache.

--suite unknowns: ELPV's four levels (the demo's 4-class cache): a head trained on three levels,
each held-out level's test images against the known levels' test images: the area under the ROC
curve of the run's unknown score (cosine distance to the nearest training image) and of the
head's own 1 - max probability (the baseline), and the share of each flagged at the run's recorded
threshold (5% of validation).

Rows are written as they end into bench/results/loop.json (a second run resumes).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "loop.json"
WORK = ROOT / "bench" / "work" / "loop"
FAST = {"c_grid": "1e-3:1e2:6", "n_jobs": 1}


def _save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def _write_table(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    return path


def elpv_truth(classing: str) -> tuple[Path, dict[str, str]]:
    """The demo's Lite0 cache of ELPV (binary: data/elpv; 4class: data/elpv4) and each path's class."""
    import pipeline
    from pipeline.data.demo import export_elpv

    data = ROOT / "data" / ("elpv" if classing == "binary" else "elpv4")
    if not data.is_dir():
        export_elpv(data, classing)
    store = pipeline.extract(data, backbone="efficientnet_lite0", cache=ROOT / "features", progress=False)
    with open(data / "elpv_labels.csv", newline="", encoding="utf-8") as handle:
        truth = {row["file"]: row["class"] for row in csv.DictReader(handle)}
    return Path(store.directory), truth


def synthetic_truth(work: Path) -> tuple[Path, dict[str, str]]:
    """Six overlapping clusters of 64 values (centres 0.35 standard deviations apart per value), 300
    images each but one of 60 (the rare class), in one unlabelled cache."""
    from pipeline import atomic
    from pipeline.cache import store

    directory = work / "synthetic-cache-2"
    rng = np.random.default_rng(0)
    sizes = [300, 300, 300, 300, 300, 60]
    centres = rng.normal(size=(6, 64)) * 0.35
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(sizes)])
    features = (centres[labels] + rng.normal(size=(len(labels), 64))).astype(np.float32)
    paths = [f"images/img{i:05d}.png" for i in range(len(labels))]
    truth = {p: f"c{k}" for p, k in zip(paths, labels)}
    if (directory / store.MANIFEST_NAME).is_file():
        return directory, truth
    fingerprint = store.Fingerprint("vgg16", "none", "synthetic-loop", 32, "area-down-bilinear-up", "torch",
                                    ("pool",), "avg", "fp32", "none")
    directory.mkdir(parents=True, exist_ok=True)
    rows = store.Rows(paths, [f"{i:064x}" for i in range(len(paths))], np.full(len(paths), -1, np.int32),
                      ["train"] * len(paths), {"pool": features})
    store.write_shard(directory / store.shard_name(0), rows, [], fingerprint)
    index = store.read_shard_index(directory / store.shard_name(0), fingerprint)
    manifest = store.manifest_core(fingerprint, [], [index], {"pool": (64,)})
    manifest["weights"] = {"source": "none", "pretrained": True}
    manifest["dataset"] = {"root": str(work / "synthetic")}
    atomic.write_json(directory / store.MANIFEST_NAME, manifest)
    return directory, truth


def fixed_splits(truth: dict[str, str], seed: int) -> tuple[list[str], list[str], list[str]]:
    """(pool, validation, test) paths: 70/15/15 stratified by class, with `seed`."""
    from sklearn.model_selection import train_test_split

    paths = sorted(truth)
    classes = [truth[p] for p in paths]
    pool, rest = train_test_split(paths, test_size=0.3, stratify=classes, random_state=seed)
    validation, test = train_test_split(rest, test_size=0.5, stratify=[truth[p] for p in rest], random_state=seed)
    return pool, validation, test


def loop_rows(name: str, cache: Path, truth: dict[str, str], seed: int, rounds: int, strategy: str) -> list[dict]:
    """Test accuracy after each round of one strategy on one seed."""
    import pipeline

    rng = np.random.default_rng(seed)
    pool, validation, test = fixed_splits(truth, seed)
    from sklearn.model_selection import train_test_split

    labelled, _ = train_test_split(pool, train_size=0.05, stratify=[truth[p] for p in pool], random_state=seed)
    labelled = set(labelled)
    step = max(1, round(0.05 * len(pool)))
    out = []
    work = WORK / f"{name}-{strategy}-{seed}"
    for round_ in range(rounds + 1):
        table = _write_table(work / f"labels-{round_}.csv",  # the rest of the pool named unlabelled
                             [(p, truth[p], "train") if p in labelled else (p, "", "") for p in sorted(pool)]
                             + [(p, truth[p], "validation") for p in validation]
                             + [(p, truth[p], "test") for p in test])
        started = time.perf_counter()
        run = pipeline.train_head(cache, labels=table, split_column="split", models=work / "models",
                                  name=f"round-{round_}", progress=False, **FAST)
        seconds = time.perf_counter() - started
        out.append({"set": name, "strategy": strategy, "seed": seed, "round": round_, "labels": len(labelled),
                    "test_accuracy": run.metrics["test"]["accuracy"],
                    "test_macro_f1": run.metrics["test"]["macro_f1"], "seconds": round(seconds, 2)})
        if round_ == rounds:
            break
        if strategy == "suggest":
            found = pipeline.suggest(model=run, budget=step, progress=False)
            chosen = [row["path"] for row in found.rows]
        else:
            remaining = sorted(set(pool) - labelled)
            chosen = list(rng.choice(remaining, size=min(step, len(remaining)), replace=False))
        labelled |= set(chosen)
    return out


def loop_suite(results: dict, seeds: list[int], rounds: int) -> None:
    done = {(r["set"], r["strategy"], r["seed"]) for r in results.setdefault("loop", [])}
    sets = {"synthetic": synthetic_truth(WORK), "elpv": elpv_truth("binary")}
    for name, (cache, truth) in sets.items():
        for seed in seeds:
            for strategy in ("suggest", "random"):
                if (name, strategy, seed) in done:
                    continue
                rows = loop_rows(name, cache, truth, seed, rounds, strategy)
                results["loop"] += rows
                print(f"{name} seed {seed} {strategy}: " + ", ".join(
                    f"{r['labels']}: {r['test_accuracy']:.2%}" for r in rows), flush=True)
                _save(results)


def unknowns_suite(results: dict) -> None:
    """Each ELPV level held out in turn (4class cache), and each class of the synthetic set."""
    done = {(r.get("set", "elpv4"), r["held_out"]) for r in results.setdefault("unknowns", [])}
    for name, (cache, truth) in (("elpv4", elpv_truth("4class")), ("synthetic", synthetic_truth(WORK))):
        _held_out_rows(results, name, cache, truth, done)


def _held_out_rows(results: dict, name: str, cache: Path, truth: dict[str, str], done: set) -> None:
    from sklearn.metrics import roc_auc_score

    import pipeline
    from pipeline.cache.reader import load_splits
    from pipeline.heads import ArrayFeatures

    levels = sorted(set(truth.values()))
    pool, validation, test = fixed_splits(truth, 0)
    for held in levels:
        if (name, held) in done:
            continue
        rows = [(p, truth[p] if truth[p] != held else "", split) for paths, split in
                ((pool, "train"), (validation, "validation"), (test, "test")) for p in paths]  # held out: unlabelled
        table = _write_table(WORK / f"unknowns-{name}-{held}.csv", rows)
        run = pipeline.train_head(cache, labels=table, split_column="split", models=WORK / "models",
                                  name=f"{name}-without-{held}", progress=False, **FAST)
        unknowns = run.unknowns()
        store = run.features()
        known = load_splits(store, run.view)["test"]
        known_vectors = known.matrix
        held_paths = [p for p in test if truth[p] == held]
        locations = {p: loc for p, loc in zip(store.rows_index().paths, store.rows_index().locations)}
        held_vectors = run.view.vectors(store.read_rows(np.stack([locations[p] for p in held_paths]), run.view.layers))
        head = run.head()
        distance = np.concatenate([unknowns.scores(known_vectors), unknowns.scores(held_vectors)])
        proba = np.concatenate([head.predict_proba(ArrayFeatures(v, np.zeros(len(v), np.int32), run.class_names))
                                for v in (known_vectors, held_vectors)])
        truth_unknown = np.concatenate([np.zeros(len(known_vectors)), np.ones(len(held_vectors))])
        row = {"set": name, "held_out": held, "known_test": len(known_vectors), "held_out_test": len(held_vectors),
               "auroc_distance": float(roc_auc_score(truth_unknown, distance)),
               "auroc_max_probability": float(roc_auc_score(truth_unknown, 1 - proba.max(axis=1))),
               "threshold": unknowns.threshold,
               "flagged_held_out": float(np.mean(distance[truth_unknown == 1] > unknowns.threshold)),
               "flagged_known": float(np.mean(distance[truth_unknown == 0] > unknowns.threshold))}
        results["unknowns"].append(row)
        print(f"{name}: held out {held}: AUROC distance {row['auroc_distance']:.3f}, max-probability "
              f"{row['auroc_max_probability']:.3f}; flagged {row['flagged_held_out']:.1%} held out, "
              f"{row['flagged_known']:.1%} known", flush=True)
        _save(results)


def summary(results: dict) -> str:
    lines = []
    for name in ("synthetic", "elpv"):
        rows = [r for r in results.get("loop", []) if r["set"] == name]
        if not rows:
            continue
        table = []
        for round_ in sorted({r["round"] for r in rows}):
            cells = [round_]
            for strategy in ("suggest", "random"):
                these = [r for r in rows if r["round"] == round_ and r["strategy"] == strategy]
                accuracy = [r["test_accuracy"] for r in these]
                cells += [int(np.mean([r["labels"] for r in these])) if these else "",
                          f"{np.mean(accuracy):.2%} +- {np.std(accuracy):.2%}" if these else ""]
            table.append(cells)
        lines.append(f"\n{name} (seeds: {sorted({r['seed'] for r in rows})})\n")
        lines.append(markdown_table(["round", "labels (suggest)", "test accuracy (suggest)", "labels (random)",
                                     "test accuracy (random)"], table))
    if results.get("unknowns"):
        lines.append("\nunknowns (one class held out)\n")
        lines.append(markdown_table(
            ["set", "held out", "AUROC distance", "AUROC 1 - max probability", "flagged: held out",
             "flagged: known"],
            [[r.get("set", "elpv4"), r["held_out"], f"{r['auroc_distance']:.3f}", f"{r['auroc_max_probability']:.3f}",
              f"{r['flagged_held_out']:.1%}", f"{r['flagged_known']:.1%}"] for r in results["unknowns"]]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", default="all", choices=("loop", "unknowns", "all"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine_line(), flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["machine"] = machine_line()
    if args.suite in ("unknowns", "all"):
        unknowns_suite(results)
    if args.suite in ("loop", "all"):
        loop_suite(results, args.seeds, args.rounds)
    print(summary(results))


if __name__ == "__main__":
    main()
