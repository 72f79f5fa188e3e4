"""Import paths of 0.1, kept for one release: `import pipeline.classifier` still finds
pipeline/runs/classifier.py, with a DeprecationWarning naming the new path. Modules whose old
name is now a function of the front door (extract, export, predict, finetune) cannot be kept:
their functions are `pipeline.extract(...)` and so on."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "pipeline.classifier": "pipeline.runs.classifier",
    "pipeline.train": "pipeline.training.train",
    "pipeline.store": "pipeline.cache.store",
    "pipeline.reader": "pipeline.cache.reader",
    "pipeline.dataset": "pipeline.data.dataset",
    "pipeline.demo_data": "pipeline.data.demo",
    "pipeline.plan": "pipeline.extraction.plan",
    "pipeline.engine": "pipeline.extraction.engine",
    "pipeline.local_engine": "pipeline.extraction.local_engine",
    "pipeline.ray_engine": "pipeline.extraction.ray_engine",
    "pipeline.examples": "pipeline.finetuning.examples",
    "pipeline.fitting": "pipeline.heads.fitting",
    "pipeline.linear": "pipeline.heads.linear",
    "pipeline.pixels": "pipeline.images.decode_pillow",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):  # noqa: ANN001, ANN201 - the new module ran when it was imported
        return None


def install() -> None:
    if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModules())
