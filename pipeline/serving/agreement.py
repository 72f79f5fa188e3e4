"""How far an export is from the run it came from, measured as it is written.

The exported file is loaded back (as a user would load it) and fed the run's validation images;
`predict` with the run is fed the same images. A run whose features were computed in bf16 (extract
chooses it by itself on CPUs with bf16 hardware) exported in float32 differs from `predict` by more
than float32 rounding: this says by how much, with both accuracies, the largest and mean probability
difference and the number of images whose top class differs. The run's own validation accuracy
(scored from its cached features when it was trained) is recorded beside them.

Each format is fed what it takes: the `.keras` model and ONNX and TFLite the pixels of the
pipeline's image path (already N x N, so the `.keras` model's own resize is the identity), the
SavedModel the files' encoded bytes (its own decoding and resize). A quantised TFLite model is fed
one image a call (dynamic-range quantisation computes its scales per call); the static int8 ONNX
graph takes batches (its ranges are fixed at calibration).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

DEFAULT_IMAGES = 500  # at most this many of the run's validation images, in split order
BATCH = 32

def measure(opened: Any, exported: Callable[[np.ndarray, list[str]], np.ndarray], size: int,
            limit: int = DEFAULT_IMAGES, reference: Any = None, tta: str = "none",
            progress: bool = False) -> dict[str, Any]:
    """The exported model (`exported`: its format's loader, pixels and files to probabilities)
    against `predict` with the run (`predict --tta` with the export's views), on up to `limit` of
    the run's validation images. Never fails the export: where the images cannot be read, says
    why. `reference`: the run's model at its own precision, where the caller has it built already."""
    from pipeline.images.reading import EncodedImages
    from pipeline.images.views import averaged

    try:
        validation = opened.split_images("validation")
    except PipelineError as error:
        return {"measured": False, "why": str(error)}
    files, labels = list(validation.files)[:limit], np.asarray(validation.labels)[:limit]
    if not files:
        return {"measured": False, "why": "the run has no validation images"}
    if reference is None:
        reference = opened.classifier()  # what predict computes: the run's model at the run's precision
    import sys

    from tqdm import tqdm

    from pipeline.errors import option

    source = EncodedImages(files)
    kept, ours, theirs = [], [], []
    bar = tqdm(total=len(files), unit="img", leave=False, disable=not progress, file=sys.stderr,
               desc=f"agreement check: {len(files)} of {len(validation.files)} validation images "
                    f"({option('check_images', 0)} skips it)")
    for indices, pixels in source.batches(size, BATCH):
        bar.update(len(indices))
        indices, pixels = np.asarray(indices), np.asarray(pixels, np.float32)
        ours.append(np.asarray(averaged(reference.predict_on_batch, pixels, tta), np.float64))
        theirs.append(np.asarray(exported(pixels, [files[i] for i in indices]), np.float64))
        kept.extend(indices.tolist())
    bar.close()
    if not kept:
        return {"measured": False, "why": f"none of the run's {len(files)} validation images could be read"}
    predicted, exported_probabilities = np.concatenate(ours), np.concatenate(theirs)
    truth = labels[np.asarray(kept)]
    difference = np.abs(predicted - exported_probabilities)
    recorded = opened.metrics.get("validation", {}).get("accuracy")
    return {
        "measured": True,
        "images": len(kept),
        "split": "validation",
        "against": "predict with the run (the run's model at its own precision)"
                   + ("" if tta == "none" else f", --tta {tta}"),
        "accuracy_export": float(np.mean(exported_probabilities.argmax(1) == truth)),
        "accuracy_predict": float(np.mean(predicted.argmax(1) == truth)),
        "accuracy_recorded": recorded if len(kept) == len(validation.files) else None,
        "largest_probability_difference": float(difference.max()),
        "mean_probability_difference": float(difference.mean()),
        "top_class_differs": int(np.sum(predicted.argmax(1) != exported_probabilities.argmax(1))),
        **({"label_sets_differ": int(np.sum(np.any((predicted >= np.asarray(opened.thresholds))
                                                   != (exported_probabilities >= np.asarray(opened.thresholds)),
                                                   axis=1)))}
           if opened.thresholds is not None else {}),  # multi-label: the decisions at the run's thresholds
        **({"decisions_differ": int(np.sum((predicted[:, 1] >= opened.threshold)
                                           != (exported_probabilities[:, 1] >= opened.threshold)))}
           if opened.threshold is not None else {}),  # binary: the class said at the run's threshold
    }


def describe(agreement: dict[str, Any], export_precision: str, run_precision: str) -> str:
    """One line for the console."""
    if not agreement.get("measured"):
        return f"agreement with predict not measured: {agreement.get('why')}"
    return (f"against predict ({run_precision}) on {agreement['images']} validation images, this export "
            f"({export_precision}): accuracy {agreement['accuracy_export']:.2%} (predict "
            f"{agreement['accuracy_predict']:.2%}), largest probability difference "
            f"{agreement['largest_probability_difference']:.2e} (mean {agreement['mean_probability_difference']:.1e}), "
            f"top class differs on {agreement['top_class_differs']}")
