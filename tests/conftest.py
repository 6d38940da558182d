"""Shared fixtures: a tiny MMInterleaved checkpoint directory written by `train.py --tiny` (the script tests' model)."""
import subprocess
import sys
from pathlib import Path

import pytest

from hf_oracle import hide_hub_kernels

ROOT = Path(__file__).resolve().parents[1]
hide_hub_kernels()  # before any test module imports transformers or diffusers (hf_oracle.py says why)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Two optimiser steps of the tiny preset: a real train.py checkpoint (weights, config, tokenizer)."""
    out = tmp_path_factory.mktemp("tiny_ckpt")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--tiny", "--steps", "2", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out
