"""A two-stage bottleneck-feature pipeline for transfer-learning image classification.

The front door for Python (the command line `run_pipeline.py` / `bottleneck-pipeline` stands on
the same functions)::

    import pipeline

    cache = pipeline.extract("data/elpv", backbone="efficientnet_lite0", cache="features")
    run = pipeline.train_head(cache, head="logreg", models="models")
    print(run.metrics["test"]["accuracy"])
    pipeline.predict(run, ["data/elpv/defective/cell0001.png"])
    pipeline.export(run, "savedmodel", "out/")
    tuned = pipeline.finetune(run, epochs=1)

Importing the package imports neither TensorFlow nor Keras, so the Keras backend can still be
chosen (KERAS_BACKEND, or `backend=` on the first stage function called). The classes are loaded
on first use.
"""

from pipeline.api import (
    audit,
    embeddings,
    evaluate,
    export,
    extract,
    finetune,
    list_backbones,
    list_caches,
    list_runs,
    open_run,
    predict,
    report_page,
    suggest,
    train_head,
)
from pipeline.errors import PipelineError

__version__ = "0.3.0"

# name -> module that defines it, imported when the name is first used (PEP 562)
_LAZY = {
    "Run": "pipeline.runs",
    "RunResult": "pipeline.runs",
    "FeatureStore": "pipeline.cache.store",
    "ExtractedCache": "pipeline.extraction.extract",
    "Head": "pipeline.heads",
    "LogRegHead": "pipeline.heads",
    "DenseHead": "pipeline.heads",
    "SVMHead": "pipeline.heads",
    "KNNHead": "pipeline.heads",
    "EstimatorHead": "pipeline.heads",
    "ArrayFeatures": "pipeline.heads",
    "make_head": "pipeline.heads",
    "Prediction": "pipeline.serving.predict",
    "ExportSummary": "pipeline.serving.export",
    "LabelSpec": "pipeline.labelling",
}

__all__ = [
    "extract", "train_head", "evaluate", "finetune", "predict", "export", "embeddings", "audit", "suggest",
    "report_page", "list_runs",
    "list_caches", "open_run", "list_backbones", "PipelineError", *_LAZY, "__version__",
]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
