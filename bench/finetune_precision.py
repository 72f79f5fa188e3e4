"""Fine-tuning EfficientNet-Lite0 in mixed bfloat16 against float32, side by side on one CPU.

    .venv/bin/python -m bench.finetune_precision [--work bench/work] [--epochs 3]

The same head run (the finetune suite's logistic regression on Lite0's 224 px cache, ELPV binary,
75/25, split seed 0; made by `bench/accuracy.py --suite finetune` if it is not there), the same
recipe (`sgd-top-block`: block7a unfrozen, SGD 1e-4 with momentum, flips both ways, batch 16), the
same seed, `--epochs` epochs with no early stop, once per precision. Seconds per epoch are the
epochs after the first (which holds the tracing); the ratio is float32's over bf16's. Validation
and test accuracy of the kept epoch are beside them: bf16 is only worth its speed if it scores as
float32 does. Results go to bench/results/finetune-precision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import accuracy_finetune as suite  # noqa: E402
from bench.common import machine_line, markdown_table  # noqa: E402

PRECISIONS = ("mixed-bf16", "fp32")
TASK, PROTOCOL, SEED = "binary", "75/25", 0


def measure(work: Path, epochs: int) -> dict:
    from bench.elpv import export
    from pipeline import api

    data = export(TASK, work)
    head = suite.Start().directory(work, TASK, PROTOCOL, SEED)
    if head.is_dir():
        suite.split_cache(data, work, PROTOCOL, SEED)  # the head's own splits
    else:
        _, head = suite.head_row(data, work, TASK, PROTOCOL, SEED)
    recipe = next(r for r in suite.RECIPES if r.name == "sgd-top-block")
    settings = recipe.options() | {"epochs": epochs, "patience": epochs}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="finetune-precision-") as models:
        for precision in PRECISIONS:
            tuned = api.finetune(head, models=models, name=f"precision-{precision}", seed=SEED, precision=precision,
                                 progress=False, **settings)
            config = tuned.config
            rows[precision] = {"epoch_seconds": config["epoch_seconds"],
                               "seconds_per_epoch": config["seconds_per_epoch"],
                               "kept_epoch": config["finetune"]["kept_epoch"],
                               "validation_accuracy": tuned.metrics["validation"]["accuracy"],
                               "test_accuracy": tuned.metrics["test"]["accuracy"]}
            print(f"{precision}: {config['epoch_seconds']} s per epoch, validation "
                  f"{rows[precision]['validation_accuracy']:.2%}, test {rows[precision]['test_accuracy']:.2%}",
                  flush=True)
    ratio = rows["fp32"]["seconds_per_epoch"] / rows["mixed-bf16"]["seconds_per_epoch"]
    return {"machine": machine_line(), "head": head.name, "recipe": recipe.name, "settings": settings,
            "rows": rows, "fp32_over_bf16": round(ratio, 2)}


def report(result: dict) -> str:
    table = [[precision, " / ".join(f"{s:.1f}" for s in row["epoch_seconds"]), f"{row['seconds_per_epoch']:.1f}",
              str(row["kept_epoch"]), f"{row['validation_accuracy']:.2%}", f"{row['test_accuracy']:.2%}"]
             for precision, row in result["rows"].items()]
    return "\n".join([result["machine"], markdown_table(
        ["precision", "s per epoch (each)", "s per epoch (after the first)", "kept epoch", "validation", "test"],
        table), f"float32 / bf16 seconds per epoch: {result['fp32_over_bf16']}x"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench/work"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/finetune-precision.json"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (the first holds the tracing)")
    result = measure(args.work, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
