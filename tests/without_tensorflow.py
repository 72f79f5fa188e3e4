"""Runs the pipeline's command line (or a script: a first argument ending in .py) in a Python
where `import tensorflow` raises, and checks at the end that no TensorFlow module was imported:
`python tests/without_tensorflow.py extract ...`, `python tests/without_tensorflow.py bench/gpu.py ...`.

`python tests/without_tensorflow.py --serve` runs many command lines in this one Python (a test
module's JAX side pays for one JAX import, not one a command): each a JSON line on stdin,
{"argv": [...], "env": {...}}, answered by one JSON line on stdout, {"rc", "stdout", "stderr"},
with the same check after each command."""

import contextlib
import io
import json
import os
import runpy
import sys
import traceback
from pathlib import Path


class _NoTensorFlow:
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the import hook protocol
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"{name} is made unimportable by tests/without_tensorflow.py")
        return None


def _tensorflow_imported() -> list[str]:
    return sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))


def _serve() -> int:
    from pipeline.cli import main

    for line in sys.stdin:
        request = json.loads(line)
        before = dict(os.environ)
        os.environ.update(request.get("env", {}))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(request["argv"])
            except SystemExit as stop:  # argparse's refusals
                rc = stop.code if isinstance(stop.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported to the test, as a crashed process would be
                traceback.print_exc()
                rc = 70
        os.environ.clear()
        os.environ.update(before)
        if _tensorflow_imported():
            err.write(f"tensorflow was imported: {_tensorflow_imported()[:5]}\n")
            rc = 3
        sys.__stdout__.write(json.dumps({"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\n")
        sys.__stdout__.flush()
    return 0


sys.meta_path.insert(0, _NoTensorFlow())
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if sys.argv[1:] == ["--serve"]:
    sys.exit(_serve())
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
imported = _tensorflow_imported()
if imported:
    print(f"tensorflow was imported: {imported[:5]}", file=sys.stderr)
    sys.exit(3)
sys.exit(rc)
