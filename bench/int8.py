"""int8 against fp32 and bf16, side by side, and the heads' certificate (issue 44).

    .venv/bin/python -m bench.int8 [--configs vgg16:150 vgg16:224 efficientnet_lite0:224] [--seeds 5]

For each backbone and size, on ELPV (2,624 images, the demo's binary folder):

- **the backbone alone**: images/s of fp32, bf16 (where the CPU has it) and int8 (the quantised
  graph on ONNX Runtime) on the same 256 preprocessed images, batches of 32, after a warm-up;
- **extract**: `extract --precision P` into a fresh cache for each precision, in its own process:
  wall time, images/s of the extraction loop, peak memory (max RSS);
- **the heads' certificate**: the logistic regression (`--c-grid 1e-4:1e1:6`) trained on the fp32
  cache and on the int8 cache with the same labels table and splits, for five split seeds
  (stratified 70/15/15, by seed): test accuracy of each, and the share of test images both heads
  give the same class. The int8 head is given the C the fp32 head chose on validation, so the two
  differ by their features alone (each choosing its own C is recorded too). Passed: mean accuracy
  within 0.5 points of fp32's and mean agreement at least 99%. The same figures for bf16 features
  (extract's default on CPUs with bf16) are the reference.

The CPU's model and its int8/bf16 flags are named beside every figure. Rows are written as they
end into bench/results/int8.json (a second run resumes); the certificate is also written to
pipeline/backbone/int8_certificate.json, which extract reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from bench.common import cpu_model, machine_line, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "int8.json"
WORK = ROOT / "bench" / "work" / "int8"
CERTIFICATE = ROOT / "pipeline" / "backbone" / "int8_certificate.json"
FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
C_GRID = "1e-4:1e1:6"


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text()
    present = set(text.split())
    return [flag for flag in FLAGS if flag in present]


def _save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))


def backbone_alone(backbone: str, size: int, precisions: list[str], images: int = 256, batch: int = 32) -> dict:
    """images/s of the backbone alone at each precision, on the same preprocessed images."""
    from pipeline.backbone import int8
    from pipeline.backbone.network import FeatureExtractor, build_backbone
    from pipeline.backbone.registry import get_backbone

    spec = get_backbone(backbone)
    weights = spec.resolve_weights("imagenet", None)
    rng = np.random.default_rng(0)
    pixels = rng.normal(0, 1, (images, size, size, 3)).astype(np.float32)
    rates = {}
    for precision in precisions:
        if precision == "int8":
            work = WORK / f"alone-{backbone}-{size}"
            work.mkdir(parents=True, exist_ok=True)
            float_extractor = FeatureExtractor(build_backbone(spec, size, "fp32", weights), spec.default_layers,
                                               spec.default_pooling)
            int8.float_graph(float_extractor, size, work / "fp32.onnx")
            int8.quantise(work / "fp32.onnx", work / "int8.onnx", (pixels[i:i + batch] for i in range(0, 128, batch)))
            extractor = int8.Int8Extractor(work / "int8.onnx", float_extractor.layers, float_extractor.pooling, {})
        else:
            extractor = FeatureExtractor(build_backbone(spec, size, precision, weights), spec.default_layers,
                                         spec.default_pooling)
        extractor(pixels[:batch])  # warm-up: traces or plans
        started = time.perf_counter()
        for start in range(0, images, batch):
            extractor(pixels[start:start + batch])
        rates[precision] = round(images / (time.perf_counter() - started), 2)
        print(f"  {backbone} {size} px backbone alone, {precision}: {rates[precision]} images/s", flush=True)
    return rates


def extract_in_a_process(data: Path, backbone: str, size: int, precision: str) -> dict:
    """extract into a fresh cache root, in its own process under /usr/bin/time (peak memory)."""
    cache = WORK / f"features-{backbone}-{size}-{precision}"
    command = ["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, str(ROOT / "run_pipeline.py"), "extract",
               "--data", str(data), "--backbone", backbone, "--image-size", str(size), "--precision", precision,
               "--cache", str(cache), "--no-progress", "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"extract {precision} failed: {done.stderr[-1500:]}")
    summary = json.loads(done.stdout)
    rss = int(re.findall(r"maxrss_kb=(\d+)", done.stderr)[-1])
    return {"wall_s": round(wall, 1), "loop_images_per_s": round(summary["images"] / summary["loop_seconds"], 2)
            if summary.get("loop_seconds") else None, "peak_rss_mb": round(rss / 1024), "images": summary["images"],
            "cache": summary["cache_dir"]}


def split_table(store, seed: int, path: Path) -> Path:  # noqa: ANN001 - a FeatureStore
    from sklearn.model_selection import train_test_split

    rows = store.rows_index()
    labels = np.asarray(rows.labels)
    order = np.arange(len(rows))
    train, rest = train_test_split(order, test_size=0.3, stratify=labels, random_state=seed)
    validation, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=seed)
    split = {**{int(i): "train" for i in train}, **{int(i): "validation" for i in validation},
             **{int(i): "test" for i in test}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for i, p in enumerate(rows.paths):
            writer.writerow([p, store.class_names[labels[i]], split[i]])
    return path


def heads(fp32_cache: str, int8_cache: str, seeds: int, tag: str) -> list[dict]:
    """The certificate's rows; `int8_cache` may be another precision's cache (bf16: the reference)."""
    import pipeline

    stores = {"fp32": pipeline.FeatureStore(Path(fp32_cache)), "int8": pipeline.FeatureStore(Path(int8_cache))}
    rows = []
    for seed in range(seeds):
        table = split_table(stores["fp32"], seed, WORK / f"splits-{seed}.csv")
        found = {}
        chosen_c = None
        # the same head: the fp32 head's C (chosen on validation) for the int8 head too, so the two differ
        # by their features alone; and, as a user would run it, each C chosen on its own features
        for precision, grid in (("fp32", C_GRID), ("int8", None), ("int8-own-c", C_GRID)):
            store = stores[precision.split("-")[0]]
            run = pipeline.train_head(store, labels=table, split_column="split", models=WORK / "models",
                                      name=f"{tag}-{precision}-seed{seed}", c_grid=grid or repr(chosen_c),
                                      progress=False)
            chosen_c = chosen_c if chosen_c is not None else run.config["head"]["chosen_C"]
            _, splits = run.cached_splits()
            proba = run.head().predict_proba(splits["test"])
            found[precision] = (run.metrics["test"]["accuracy"], dict(zip(splits["test"].paths, proba.argmax(1))))
        common = sorted(found["fp32"][1])
        agreement = {other: float(np.mean([found["fp32"][1][p] == found[other][1][p] for p in common]))
                     for other in ("int8", "int8-own-c")}
        rows.append({"seed": seed, "C": chosen_c, "test_accuracy_fp32": found["fp32"][0],
                     "test_accuracy_int8": found["int8"][0], "agreement": agreement["int8"],
                     "test_accuracy_int8_own_c": found["int8-own-c"][0], "agreement_own_c": agreement["int8-own-c"],
                     "test_images": len(common)})
        print(f"  seed {seed}: fp32 {found['fp32'][0]:.4f}, int8 (same C) {found['int8'][0]:.4f} agreement "
              f"{agreement['int8']:.4f}; int8 (own C) {found['int8-own-c'][0]:.4f} agreement "
              f"{agreement['int8-own-c']:.4f}", flush=True)
    return rows


def certify(rows: list[dict]) -> dict:
    from pipeline.backbone.int8 import MAX_ACCURACY_DROP, MIN_AGREEMENT

    drop = float(np.mean([r["test_accuracy_fp32"] - r["test_accuracy_int8"] for r in rows]))
    agreement = float(np.mean([r["agreement"] for r in rows]))
    own = {"accuracy_drop_points": round(100 * float(np.mean([r["test_accuracy_fp32"] - r["test_accuracy_int8_own_c"]
                                                               for r in rows])), 2),
           "agreement_percent": round(100 * float(np.mean([r["agreement_own_c"] for r in rows])), 2)}
    return {"seeds": len(rows),
            "head": "the same logistic regression: the fp32 head's C (chosen on validation) for both",
            "each_head_choosing_its_own_C": own, "accuracy_drop_points": round(100 * drop, 2),
            "largest_drop_points": round(100 * max(r["test_accuracy_fp32"] - r["test_accuracy_int8"]
                                                   for r in rows), 2),
            "agreement_percent": round(100 * agreement, 2),
            "lowest_agreement_percent": round(100 * min(r["agreement"] for r in rows), 2),
            "passed": abs(drop) <= MAX_ACCURACY_DROP and agreement >= MIN_AGREEMENT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["vgg16:150", "efficientnet_lite0:224", "vgg16:224"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "elpv")
    args = parser.parse_args()
    from pipeline.backbone.int8 import runtime_identity
    from pipeline.backbone.precision import cpu_has_bf16

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    flags = cpu_flags()
    results["machine"] = machine_line() + f"; CPU flags: {', '.join(flags) or 'none of ' + ', '.join(FLAGS)}"
    results["runtime"] = runtime_identity()
    print(results["machine"], flush=True)
    precisions = ["fp32", *(["bf16"] if cpu_has_bf16() else []), "int8"]
    # a configuration being certified again is taken out of the shipped certificate first: extract
    # refuses one that failed before, and this run measures it afresh
    shipped = json.loads(CERTIFICATE.read_text()) if CERTIFICATE.is_file() else {}
    again = [c for c in args.configs if "certificate" not in results.get("rows", {}).get(c, {})]
    if any(c in shipped for c in again):
        CERTIFICATE.write_text(json.dumps({k: v for k, v in shipped.items() if k not in again}, indent=1) + "\n")
    for config in args.configs:
        backbone, size = config.split(":")[0], int(config.split(":")[1])
        row = results.setdefault("rows", {}).setdefault(config, {"cpu": cpu_model(), "flags": flags})
        if "alone" not in row:
            row["alone"] = backbone_alone(backbone, size, precisions)
            _save(results)
        for precision in precisions:
            if precision not in row.setdefault("extract", {}):
                print(f"  {config} extract {precision} ...", flush=True)
                row["extract"][precision] = extract_in_a_process(args.data, backbone, size, precision)
                print(f"  {config} extract {precision}: {row['extract'][precision]}", flush=True)
                _save(results)
        if "heads" not in row:
            row["heads"] = heads(row["extract"]["fp32"]["cache"], row["extract"]["int8"]["cache"], args.seeds,
                                 config.replace(":", "-"))
            _save(results)
        row["certificate"] = certify(row["heads"])
        _save(results)
        if "bf16" in row["extract"] and "heads_bf16" not in row:  # the reference: bf16 features, the default
            print(f"  {config}: the same heads on bf16 features (the reference)", flush=True)
            row["heads_bf16"] = heads(row["extract"]["fp32"]["cache"], row["extract"]["bf16"]["cache"], args.seeds,
                                      config.replace(":", "-") + "-bf16")
            row["reference_bf16"] = certify(row["heads_bf16"])
            _save(results)
    certificate = {config: row["certificate"] | {
        "speedup_vs_fp32": round(row["alone"]["int8"] / row["alone"]["fp32"], 2),
        "speedup_vs_bf16": round(row["alone"]["int8"] / row["alone"]["bf16"], 2) if "bf16" in row["alone"] else None,
        "cpu": row["cpu"], "flags": row["flags"], "runtime": results["runtime"], "dataset": "ELPV (2,624 images)",
        "c_grid": C_GRID, "reference_bf16": row.get("reference_bf16")}
        for config, row in results["rows"].items() if "certificate" in row}
    certificate = {k: v for k, v in shipped.items() if k not in certificate and k not in again} | certificate
    CERTIFICATE.write_text(json.dumps(certificate, indent=1) + "\n")
    table = []
    for config, row in results["rows"].items():
        alone, extract = row.get("alone", {}), row.get("extract", {})
        for precision in precisions:
            if precision not in alone:
                continue
            e = extract.get(precision, {})
            table.append([config, precision, alone[precision], round(alone[precision] / alone["fp32"], 2),
                          e.get("loop_images_per_s"), e.get("wall_s"), e.get("peak_rss_mb")])
    print(markdown_table(["backbone:size", "precision", "backbone alone (img/s)", "x fp32", "extract loop (img/s)",
                          "extract wall (s)", "peak RSS (MB)"], table))
    print(json.dumps(certificate, indent=1))


if __name__ == "__main__":
    main()
