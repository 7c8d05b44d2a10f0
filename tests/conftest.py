"""Shared fixtures: the real data directory ($REARANK_DATA, as CI sets it) and float64 models that are float64."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the modules are flat files at the top level


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = os.environ.get("REARANK_DATA")
    if not root or not Path(root, "trec_dl").is_dir():
        pytest.skip("set REARANK_DATA to the shared data directory (CI does: ../shared/data)")
    return Path(root)


def _rms_norm_in_input_dtype(self, hidden_states):
    # LlamaRMSNorm always computes in float32, which caps a float64 comparison near 1e-8; same maths, input dtype
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture
def true_float64(monkeypatch):
    """A float64 Llama in transformers 5.24 is not all float64: LlamaRMSNorm computes in float32 (so does the eager
    attention softmax, and HF's loss), which caps float64 agreement near 1e-8. This runs the norm in the input dtype;
    the default sdpa attention stays float64."""
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)
