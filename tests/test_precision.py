"""The default precision follows the hardware; every choice resolves to a fingerprint name."""

from __future__ import annotations

import pytest

from pipeline.backbone import precision
from pipeline.errors import PipelineError


@pytest.mark.parametrize(("gpu", "bf16", "expected"), [
    (True, True, "mixed-fp16"),
    (False, True, "bf16"),
    (False, False, "fp32"),
])
def test_default_is_the_fastest_safe_choice(monkeypatch: pytest.MonkeyPatch, gpu: bool, bf16: bool,
                                            expected: str) -> None:
    monkeypatch.setattr(precision, "gpu_available", lambda: gpu)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: bf16)
    assert precision.resolve_precision(None) == expected


@pytest.mark.parametrize(("requested", "compute", "variables"), [
    ("fp32", "float32", "float32"),
    ("bf16", "bfloat16", "bfloat16"),
    ("mixed", "bfloat16", "float32"),  # on a CPU: bfloat16 compute, float32 weights
])
def test_a_layer_built_under_a_precision_computes_in_its_dtype(monkeypatch: pytest.MonkeyPatch, requested: str,
                                                              compute: str, variables: str) -> None:
    """Checked on a real layer and its output, not on the policy table."""
    import keras
    import numpy as np

    monkeypatch.setattr(precision, "gpu_available", lambda: False)
    resolved = precision.resolve_precision(requested)
    before = keras.config.dtype_policy().name
    with precision.dtype_policy(resolved):
        layer = keras.layers.Dense(4)
        output = layer(np.ones((2, 3), np.float32))
    assert keras.config.dtype_policy().name == before, "the global policy is restored"
    assert keras.backend.standardize_dtype(output.dtype) == compute
    assert keras.backend.standardize_dtype(layer.kernel.dtype) == variables


def test_unknown_precision_is_a_clear_error() -> None:
    with pytest.raises(PipelineError, match="unknown precision 'fp8'"):
        precision.resolve_precision("fp8")
