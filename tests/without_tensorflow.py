"""Runs the pipeline's command line (or a script: a first argument ending in .py) in a Python
where `import tensorflow` raises, and checks at the end that no TensorFlow module was imported:
`python tests/without_tensorflow.py extract ...`, `python tests/without_tensorflow.py bench/gpu.py ...`."""

import runpy
import sys
from pathlib import Path


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the import hook protocol
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"{name} is made unimportable by tests/without_tensorflow.py")
        return None


sys.meta_path.insert(0, _NoTensorFlow())
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if sys.argv[1:] and sys.argv[1].endswith(".py"):
    sys.argv = sys.argv[1:]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        rc = 0
    except SystemExit as stop:
        rc = stop.code if isinstance(stop.code, int) else 1
else:
    from pipeline.cli import main

    rc = main(sys.argv[1:])
imported = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
if imported:
    print(f"tensorflow was imported: {imported[:5]}", file=sys.stderr)
    sys.exit(3)
sys.exit(rc)
