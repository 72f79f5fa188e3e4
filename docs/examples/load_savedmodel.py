"""Classify an image with an exported SavedModel in plain TensorFlow: no pipeline import.

    python -I docs/examples/load_savedmodel.py models/best-export/saved_model cell.png

TensorFlow's native start-up lines (absl, oneDNN, the CUDA stubs on a CPU machine) are written to
file descriptor 2 before any setting can stop them; they are kept off the terminal while
TensorFlow starts and loads the model, and every later line (an error included) is shown.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def native_stderr_silenced():
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(model_path: str, image_path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with native_stderr_silenced():
        import tensorflow as tf

        model = tf.saved_model.load(model_path)
        serve = model.signatures["serving_default"]
        out = serve(images=tf.constant([open(image_path, "rb").read()]))
    assert "pipeline" not in sys.modules, "plain TensorFlow: the pipeline was not imported"
    names = [n.decode() for n in out["class_names"].numpy()[0]]
    probabilities = out["probabilities"].numpy()[0].round(4).tolist()
    print(image_path, out["class"].numpy()[0].decode(), dict(zip(names, probabilities)))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -I load_savedmodel.py SAVED_MODEL_DIR IMAGE")
    main(sys.argv[1], sys.argv[2])
