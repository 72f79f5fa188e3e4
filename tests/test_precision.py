"""The default precision follows the hardware; every choice resolves to a fingerprint name."""

from __future__ import annotations

import pytest

from pipeline import precision
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


def test_mixed_means_bfloat16_compute_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "gpu_available", lambda: False)
    assert precision.resolve_precision("mixed") == "mixed-bf16"
    assert precision.keras_policy("mixed-bf16") == "mixed_bfloat16"


def test_unknown_precision_is_a_clear_error() -> None:
    with pytest.raises(PipelineError, match="unknown precision 'fp8'"):
        precision.resolve_precision("fp8")
