"""ELPV's labels as data: hard classes against soft targets, from one feature cache, no backbone pass.

    .venv/bin/python -m bench.labels [--seeds 0 1 2 3 4] [--cache DIR] [--quick]

ELPV annotates each cell with a defect probability (0, 1/3, 2/3, 1). Binary (functional p < 0.5
against defective) is the usual task; the published CNN regressed p. On the frozen
EfficientNet-Lite0 features of the demo's cache (224 px, average-pooled; extracted once), for five
split seeds on both protocols (Deitsch et al.'s 75/25 with validation carved out of train, and the
project's 70/15/15), stratified by the four levels, every split given to train-head as a labels
table (`--labels TABLE --split-column split`), so re-splitting costs no backbone pass:

- binary, hard labels (`--label-column class`) against soft targets (`--target-column p`), for the
  logistic regression and the dense head; each scored at the threshold 0.5 and at the threshold
  chosen on validation (train-head --threshold validation's rule, pipeline/heads/thresholds.py, on
  the run's own validation probabilities), test accuracy per cell type (mono, poly) beside;
- 4-class: the four levels as classes (logistic regression, dense head) and as ordered levels
  (the dense head with the ordinal loss);
- the majority class of each task's test split as the baseline.

The configuration is compared on mean test accuracy over the seeds (mean +- standard deviation);
the threshold is chosen on validation only. Rows are written as they end into
bench/results/labels.json (a second run resumes), and the tables to stdout.
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
RESULTS = ROOT / "bench" / "results" / "labels.json"
WORK = ROOT / "bench" / "work" / "labels"
PROTOCOLS = {"75/25 (Deitsch)": (0.125, 0.25), "70/15/15 (project)": (0.15, 0.15)}
CONFIGS = [  # (task, head, labels: hard | soft | ordinal)
    ("binary", "logreg", "hard"), ("binary", "logreg", "soft"), ("binary", "dense", "hard"),
    ("binary", "dense", "soft"), ("4class", "logreg", "hard"), ("4class", "dense", "hard"),
    ("4class", "dense", "ordinal"),
]


def elpv_cache(cache_root: Path) -> Path:
    """The demo's EfficientNet-Lite0 cache of data/elpv (extracted once; reused when there)."""
    import pipeline

    data = ROOT / "data" / "elpv"
    if not data.is_dir():
        from pipeline.data.demo import export_elpv

        export_elpv(data, "binary")
    store = pipeline.extract(data, backbone="efficientnet_lite0", cache=cache_root, progress=False)
    return Path(store.directory)


def split_table(data: Path, seed: int, validation: float, test: float, out: Path) -> Path:
    """The labels table of one split: path, class (binary), level (4-class), p, cell_type, split;
    stratified by the four levels, with `seed`."""
    from sklearn.model_selection import train_test_split

    with open(data / "elpv_labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    levels = [f"{float(r['defect_probability']):.2f}" for r in rows]
    index = np.arange(len(rows))
    rest, tested = train_test_split(index, test_size=test, stratify=levels, random_state=seed)
    trained, validated = train_test_split(rest, test_size=validation / (1 - test),
                                          stratify=[levels[i] for i in rest], random_state=seed)
    split = {**{int(i): "train" for i in trained}, **{int(i): "validation" for i in validated},
             **{int(i): "test" for i in tested}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class", "level", "p", "cell_type", "split"])
        for i, r in enumerate(rows):
            writer.writerow([r["file"], r["class"], f"defect-{levels[i]}", r["defect_probability"], r["cell_type"],
                             split[i]])
    return out


def scores(run: object, table: Path, task: str) -> dict:
    """Test accuracy at 0.5 and at the validation-chosen threshold (binary), per cell type too."""
    from pipeline.cache.reader import load_splits

    store = run.features()  # the cache as the run saw it: its labelling
    splits = load_splits(store, run.view)
    head = run.head()
    proba = {name: head.predict_proba(data) for name, data in splits.items()}
    if task == "binary":  # column 1: the probability of a defect (soft: class "1"; hard: "defective")
        positive = run.class_names.index("defective") if "defective" in run.class_names else 1
        proba = {name: np.stack([1 - q[:, positive], q[:, positive]], axis=1) for name, q in proba.items()}
    with open(table, newline="", encoding="utf-8") as handle:
        kind = {r["path"]: r["cell_type"] for r in csv.DictReader(handle)}
        with open(table, newline="", encoding="utf-8") as again:
            p = {r["path"]: float(r["p"]) for r in csv.DictReader(again)}
    truth = {name: (np.array([p[x] >= 0.5 for x in data.paths]) if task == "binary" else data.labels)
             for name, data in splits.items()}
    out = {}
    thresholds = {"0.5": 0.5}
    if task == "binary":  # the rule of train-head --threshold validation
        from pipeline.heads.thresholds import choose_binary_threshold

        thresholds["validation"] = choose_binary_threshold(proba["validation"][:, 1], truth["validation"])
    for name, t in thresholds.items():
        said = (proba["test"][:, 1] >= t) if task == "binary" else proba["test"].argmax(1)
        right = said == truth["test"]
        out[name] = {"threshold": t if task == "binary" else None, "test_accuracy": float(np.mean(right)),
                     "validation_accuracy": float(np.mean(((proba["validation"][:, 1] >= t) if task == "binary"
                                                           else proba["validation"].argmax(1))
                                                          == truth["validation"])),
                     "by_cell_type": {c: float(np.mean(right[[kind[x] == c for x in splits["test"].paths]]))
                                      for c in ("mono", "poly")}}
    if task == "binary":
        q = proba["test"][:, 1]
        t = np.array([p[x] for x in splits["test"].paths])
        out["soft_scores"] = {"brier": float(np.mean((q - t) ** 2)), "mean_absolute_error": float(np.mean(abs(q - t)))}
    labels = truth["test"].astype(int)
    out["majority"] = float(np.max(np.bincount(labels)) / len(labels))
    return out


def run_config(task: str, head: str, labels: str, table: Path, cache: Path, models: Path, seed: int,
               quick: bool) -> dict:
    import pipeline

    options: dict = {"labels": table, "split_column": "split", "models": models, "progress": False, "seed": seed}
    if labels == "soft":
        options["target"] = "p"
    else:
        options["label"] = "class" if task == "binary" else "level"
    if labels == "ordinal":
        options["loss"] = "ordinal"
    if head == "logreg" and quick:
        options["c_grid"] = "1e-3:1e1:5"
    if head == "dense" and quick:
        options["epochs"] = 5
    started = time.perf_counter()
    run = pipeline.train_head(cache, head=head, **options)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 1), "run": run.name, **scores(run, table, task)}


def summarise(rows: list[dict]) -> str:
    lines = []
    for protocol in PROTOCOLS:
        table = []
        for task, head, labels in CONFIGS:
            for threshold in (("0.5", "validation") if task == "binary" else ("0.5",)):
                mine = [r for r in rows if (r["protocol"], r["task"], r["head"], r["labels"]) ==
                        (protocol, task, head, labels)]
                if not mine:
                    continue
                test = [r[threshold]["test_accuracy"] for r in mine]
                mono = [r[threshold]["by_cell_type"]["mono"] for r in mine]
                poly = [r[threshold]["by_cell_type"]["poly"] for r in mine]
                brier = [r["soft_scores"]["brier"] for r in mine if "soft_scores" in r]
                table.append([task, head, labels, threshold if task == "binary" else "argmax", len(mine),
                              f"{np.mean(test):.2%} +- {np.std(test):.2%}", f"{np.mean(mono):.2%}",
                              f"{np.mean(poly):.2%}", f"{np.mean(brier):.4f}" if brier else "",
                              f"{np.mean([r['majority'] for r in mine]):.2%}"])
        lines.append(f"\n{protocol}\n")
        lines.append(markdown_table(["task", "head", "labels", "threshold", "seeds", "test accuracy", "mono",
                                     "poly", "Brier (test, vs p)", "majority"], table))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--cache", type=Path, default=ROOT / "features")
    parser.add_argument("--quick", action="store_true", help="a 5-value C grid and 5 dense epochs (a smoke run)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    cache = elpv_cache(args.cache)
    data = ROOT / "data" / "elpv"
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() and not args.quick else {"rows": []}
    results["machine"] = machine_line()
    done = {(r["protocol"], r["seed"], r["task"], r["head"], r["labels"]) for r in results["rows"]}
    for protocol, (validation, test) in PROTOCOLS.items():
        for seed in args.seeds:
            table = split_table(data, seed, validation, test,
                                WORK / f"split-{protocol.split()[0].replace('/', '-')}-{seed}.csv")
            for task, head, labels in CONFIGS:
                key = (protocol, seed, task, head, labels)
                if key in done:
                    continue
                row = {"protocol": protocol, "seed": seed, "task": task, "head": head, "labels": labels,
                       **run_config(task, head, labels, table, cache, WORK / "models", seed, args.quick)}
                results["rows"].append(row)
                print(f"{protocol} seed {seed} {task} {head} {labels}: test {row['0.5']['test_accuracy']:.2%}"
                      + (f" (validation threshold {row['validation']['threshold']:.3f}: "
                         f"{row['validation']['test_accuracy']:.2%})" if task == "binary" else "")
                      + f", {row['seconds']} s", flush=True)
                if not args.quick:
                    RESULTS.parent.mkdir(parents=True, exist_ok=True)
                    RESULTS.write_text(json.dumps(results, indent=1))
    print(summarise(results["rows"]))


if __name__ == "__main__":
    main()
