"""The audit at scale and on ELPV.

    .venv/bin/python -m bench.audit --suite scale [--rows 100000] [--export-rows 1000000] [--dimension 1280]
    .venv/bin/python -m bench.audit --suite elpv [--data data/elpv] [--seeds 5]
    .venv/bin/python -m bench.audit --suite speed --baseline DIR [--rows 13000 --dimension 1900]

speed: the audit's label issues (the folds, most of its time) of today's code against a checkout
of an earlier version (--baseline, e.g. `git worktree add /tmp/base <commit>`), on the same
synthetic cache (10 overlapping clusters, 5% of labels flipped), each in a child process of this
run that imports its own tree: seconds, the C chosen, the suspects and how far they agree
(the share of either's suspects both found). Written to bench/results/audit-speed.json.

scale: a synthetic cache (Gaussian clusters, written through the store like extract writes it) of
--rows x --dimension float32: the embeddings export (Parquet) and the audit's parts, each timed
with its peak memory (in a child process per step, so each peak is its own); the approximate
neighbour search (faiss HNSW) against the exact one (scikit-learn, brute force), recall at 10 on
a sample of queries. --export-rows: a larger cache for the export alone (bounded memory).

elpv: EfficientNet-Lite0 features of the ELPV images (binary): the audit's figures (suspects,
near-duplicate pairs across splits at several similarities), and whether a logistic-regression
head trained without the suspects changes validation and test accuracy, over --seeds split
seeds of the 70/15/15 split. Honest by construction: the suspects of each seed are found from
out-of-fold probabilities of that seed's training images alone (no validation or test label
informs them), only training images are excluded, and validation and test keep every image and
label. Each seed's row is written to bench/results/audit-elpv.json as it ends (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench.common import machine_line, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work" / "audit"


def synthetic_cache(directory: Path, rows: int, dimension: int, shard_rows: int = 8192, seed: int = 0,
                    spread: float = 0.6) -> Path:
    """A finished cache of `rows` pooled vectors in 10 Gaussian clusters (5% of labels flipped),
    shard by shard; reused when it is there."""
    from pipeline import atomic
    from pipeline.cache import store

    if (directory / store.MANIFEST_NAME).is_file():
        return directory
    rng = np.random.default_rng(seed)
    classes = [f"class{i}" for i in range(10)]
    centres = rng.normal(size=(10, dimension)).astype(np.float32) * spread
    fingerprint = store.Fingerprint("efficientnet_lite0", "none", "synthetic", 224, "area-down-bilinear-up", "lite",
                                    ("features",), "avg", "fp32", "2.21")
    directory.mkdir(parents=True, exist_ok=True)
    indexes = []
    for number, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        labels = rng.integers(0, 10, n).astype(np.int32)
        vectors = (centres[labels] + rng.normal(size=(n, dimension)).astype(np.float32)).astype(np.float32)
        flipped = rng.random(n) < 0.05
        labels[flipped] = rng.integers(0, 10, int(flipped.sum()))
        splits = rng.choice(["train", "validation", "test"], n, p=[0.7, 0.15, 0.15]).tolist()
        ids = [f"{start + i:064x}" for i in range(n)]
        rows_ = store.Rows([f"{classes[y]}/img{start + i:08d}.png" for i, y in enumerate(labels)], ids, labels, splits,
                           {"features": vectors})
        path = directory / store.shard_name(number)
        store.write_shard(path, rows_, classes, fingerprint)
        indexes.append(store.read_shard_index(path, fingerprint))
    manifest = store.manifest_core(fingerprint, classes, indexes, {"features": (dimension,)})
    manifest["weights"] = {"source": "synthetic", "pretrained": True}  # clusters stand for pretrained features
    manifest["dataset"] = {"root": str(directory / "images")}
    atomic.write_json(directory / store.MANIFEST_NAME, manifest)
    return directory


def measured(step: str, *args: str) -> dict:
    """Run one step of this script in a child process: its seconds and peak resident memory."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--step", step, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{step} failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"seconds": round(time.perf_counter() - started, 1)}


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_step(step: str, cache: str, extra: list[str]) -> None:
    """One measured step, in this (child) process; prints a JSON line."""
    from pipeline.auditing.duplicates import exact_duplicates, nearest_neighbours, recall_at_k
    from pipeline.auditing.labels import label_issues
    from pipeline.cache.reader import FeatureView, load_splits
    from pipeline.cache.store import FeatureStore

    store = FeatureStore(Path(cache))
    view = FeatureView.for_cache(store)
    started = time.perf_counter()
    if step == "export":
        from pipeline.auditing.embeddings import write_embeddings

        out = WORK / f"{store.directory.name}.parquet"
        written = write_embeddings(store, view, out, progress=False)
        result = {"rows": written.rows, "megabytes": round(out.stat().st_size / 2**20, 1)}
        out.unlink()
    else:
        splits = load_splits(store, view)
        x = np.concatenate([splits[s].matrix for s in ("train", "validation", "test")])
        labels = np.concatenate([splits[s].labels for s in ("train", "validation", "test")])
        load = time.perf_counter() - started
        started = time.perf_counter()
        if step == "labels":
            found = label_issues(x, labels, store.class_names, folds=5, progress=False)
            result = {"suspects": len(found.issues)}
        elif step == "exact-duplicates":
            ids = [d for s in ("train", "validation", "test") for d in store.split_indexes()[s].sha256]
            result = {"pairs": len(exact_duplicates(ids))}
        elif step in ("neighbours-exact", "neighbours-hnsw"):
            _, indices, method = nearest_neighbours(x, approximate=step == "neighbours-hnsw")
            np.save(WORK / f"{step}.npy", indices[:int(extra[0])])
            result = {"method": method}
        else:  # recall of the approximate search on the first queries
            exact, approximate = np.load(WORK / "neighbours-exact.npy"), np.load(WORK / "neighbours-hnsw.npy")
            result = {"recall_at_10": round(recall_at_k(exact, approximate), 4), "queries": len(exact)}
        result["load_seconds"] = round(load, 1)
    print(json.dumps(result | {"step_seconds": round(time.perf_counter() - started, 1), "peak_mb": _peak_mb()}))


def scale(args: argparse.Namespace) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    results_path = RESULTS / "audit-scale.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["machine"] = machine_line()
    cache = synthetic_cache(WORK / f"synthetic-{args.rows}x{args.dimension}", args.rows, args.dimension)
    rows = []
    for step in ("export", "exact-duplicates", "neighbours-hnsw", "neighbours-exact", "recall", "labels"):
        key = f"{args.rows}:{step}"
        if key not in results:
            results[key] = measured(step, str(cache), str(args.queries))
            results_path.write_text(json.dumps(results, indent=2) + "\n")  # each result as it ends
        rows.append((f"{args.rows:,} x {args.dimension}", step, results[key]["seconds"],
                     results[key]["peak_mb"], json.dumps({k: v for k, v in results[key].items()
                                                          if k not in ("seconds", "peak_mb")})))
        print(rows[-1], flush=True)
    if args.export_rows:
        key = f"{args.export_rows}:export"
        if key not in results:
            big = synthetic_cache(WORK / f"synthetic-{args.export_rows}x{args.dimension}", args.export_rows,
                                  args.dimension)
            results[key] = measured("export", str(big), "0")
            results_path.write_text(json.dumps(results, indent=2) + "\n")
        rows.append((f"{args.export_rows:,} x {args.dimension}", "export", results[key]["seconds"],
                     results[key]["peak_mb"], json.dumps({k: v for k, v in results[key].items()
                                                          if k not in ("seconds", "peak_mb")})))
    print(results["machine"])
    print(markdown_table(["cache", "step", "seconds", "peak MB", "details"], rows))


def elpv(args: argparse.Namespace) -> None:
    import pipeline
    from pipeline.auditing.labels import label_issues
    from pipeline.cache.reader import FeatureView, load_splits

    results_path = RESULTS / "audit-elpv.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"seeds": {}}
    results["machine"] = machine_line()
    models = WORK / "elpv-models"
    for seed in range(args.seeds):
        if str(seed) in results["seeds"]:
            continue
        cache = pipeline.extract(args.data, backbone="efficientnet_lite0", split_seed=seed, cache=WORK / "features",
                                 progress=False)
        if seed == 0:
            audited = pipeline.audit(cache, out=WORK / "elpv-audit", progress=False)
            results["audit"] = {"images": audited.images, "suspects": audited.suspects,
                                "seconds": round(audited.seconds, 1), "details": audited.details}
            pairs = [row.split(",") for row in (WORK / "elpv-audit" / "duplicates.csv").read_text().splitlines()[1:]]
            results["audit"]["pairs_by_similarity"] = {
                str(t): {"pairs": sum(1 for p in pairs if float(p[6]) >= t),
                         "cross_split": sum(1 for p in pairs if float(p[6]) >= t and p[1] != p[4])}
                for t in (0.99, 0.995, 0.998)}
        view = FeatureView.for_cache(cache)
        train = load_splits(cache, view)["train"]
        found = label_issues(train.matrix, train.labels, cache.class_names, folds=5, seed=seed, progress=False)
        exclude = WORK / f"train-suspects-{seed}.txt"
        exclude.write_text("".join(f"{train.paths[i]}\n" for i in found.issues))
        row = {"train_suspects": len(found.issues), "train_images": len(train.labels)}
        for name, extra in (("all", {}), ("without suspects", {"exclude": exclude})):
            run = pipeline.train_head(cache, head="logreg", models=models, name=f"seed{seed}-{name.replace(' ', '-')}",
                                      progress=False, **extra)
            row[name] = {split: run.metrics[split]["accuracy"] for split in ("validation", "test")}
            row[name]["train_images"] = run.metrics["train"]["images"]
        results["seeds"][str(seed)] = row
        results_path.write_text(json.dumps(results, indent=2) + "\n")  # each seed as it ends
        print(seed, row, flush=True)
    table = []
    for name in ("all", "without suspects"):
        for split in ("validation", "test"):
            values = [results["seeds"][s][name][split] for s in sorted(results["seeds"])]
            table.append((name, split, f"{np.mean(values):.2%} +- {np.std(values):.2%}",
                          " ".join(f"{v:.2%}" for v in values)))
    print(results["machine"])
    print(markdown_table(["training images", "split", f"accuracy ({len(results['seeds'])} seeds)", "per seed"], table))


LABEL_ISSUES = r'''
import json, sys, time
import numpy as np
from pipeline.cache.reader import FeatureView, load_splits
from pipeline.cache.store import FeatureStore
from pipeline.auditing.labels import label_issues
store = FeatureStore(sys.argv[1])
splits = load_splits(store, FeatureView.for_cache(store))
x = np.concatenate([splits[s].matrix for s in ("train", "validation", "test")]).astype(np.float32)
y = np.concatenate([splits[s].labels for s in ("train", "validation", "test")]).astype(np.int64)
started = time.perf_counter()
found = label_issues(x, y, list(store.class_names), 5, 0, progress=False)
print(json.dumps({"seconds": time.perf_counter() - started, "suspects": found.issues.tolist(),
                  "chosen_C": found.chosen_c}))
'''


def speed(args: argparse.Namespace) -> None:
    """The audit's folds, an earlier checkout against this one, on the same features."""
    from bench.common import cpu_model

    cache = args.cache or synthetic_cache(WORK / f"speed-{args.rows}x{args.dimension}-{args.spread}", args.rows,
                                          args.dimension, spread=args.spread)
    print(machine_line(), flush=True)
    results = {"machine": machine_line(), "cpu": cpu_model(), "cache": str(cache), "trees": {}}
    if args.cache is None:
        results |= {"rows": args.rows, "dimension": args.dimension, "spread": args.spread}
    for name, tree in (("before", args.baseline.resolve()), ("now", ROOT)):
        done = subprocess.run([sys.executable, "-c", LABEL_ISSUES, str(Path(cache).resolve())], capture_output=True,
                              text=True,
                              env=dict(os.environ, PYTHONPATH=str(tree)), cwd=tree, check=True)
        results["trees"][name] = json.loads(done.stdout.strip().splitlines()[-1]) | {"tree": str(tree)}
        row = results["trees"][name]
        print(f"  {name}: {row['seconds']:.1f} s, {len(row['suspects'])} suspects, C {row['chosen_C']}", flush=True)
    before, now = (set(results["trees"][k]["suspects"]) for k in ("before", "now"))
    results["suspects_in_both"] = len(before & now)
    results["agreement"] = len(before & now) / max(len(before | now), 1)
    results["speed_up"] = results["trees"]["before"]["seconds"] / results["trees"]["now"]["seconds"]
    name = "audit-speed.json" if args.cache is None else f"audit-speed-{Path(args.cache).name}.json"
    (RESULTS / name).write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(["code", "seconds (5 folds)", "suspects", "C chosen"],
                         [[k, f"{v['seconds']:.1f}", len(v["suspects"]), ", ".join(f"{c:g}" for c in v["chosen_C"])]
                          for k, v in results["trees"].items()]))
    print(f"speed-up {results['speed_up']:.1f}x; suspects found by both: {results['suspects_in_both']} "
          f"(agreement {results['agreement']:.1%} of either's)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=("scale", "elpv", "speed"), default="scale")
    parser.add_argument("--baseline", type=Path, default=None, help="speed: a checkout of the earlier version")
    parser.add_argument("--spread", type=float, default=0.08, help="speed: the clusters' centres' scale")
    parser.add_argument("--cache", type=Path, default=None, help="speed: a real cache instead of the synthetic one")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--export-rows", type=int, default=1_000_000)
    parser.add_argument("--dimension", type=int, default=1280)
    parser.add_argument("--queries", type=int, default=2000, help="queries for the recall at 10")
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.step:
        run_step(args.step, rest[0], rest[1:])
    elif args.suite == "speed":
        if args.baseline is None:
            raise SystemExit("--suite speed needs --baseline DIR: a checkout of the earlier version")
        speed(args)
    elif args.suite == "scale":
        scale(args)
    else:
        elpv(args)


if __name__ == "__main__":
    main()
