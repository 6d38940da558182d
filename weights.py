"""Safetensors I/O shared by every loader: read (single file, directory, shards), check, load, save atomically.

Read top-down: `load_state` finds and reads the tensors, `load_into` checks them against a module and assigns them,
`save_state` writes our own checkpoints. Every failure is a `WeightsError` (a ValueError) whose one-line message
names the file, so a user knows which download or which key is wrong.
"""
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# file names that checkpoints from transformers / diffusers / our own trainer use, in order of preference
WEIGHT_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class WeightsError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the problem."""


def read_json(path):
    """Read a JSON file, failing with a message that names it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def _check_file(path):
    """Reject the usual wrong files (missing, empty, git-lfs pointer, truncated header) before safetensors does."""
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"version https://git-lfs"):
        raise WeightsError(f"{path}: is a git-lfs pointer, not the weights (run `git lfs pull` or download the file)")
    if size < 8:
        raise WeightsError(f"{path}: not a safetensors file ({size} bytes)")
    header_len = int.from_bytes(head[:8], "little")
    if header_len <= 0 or 8 + header_len > size or head[8:9] != b"{":
        raise WeightsError(f"{path}: not a safetensors file or truncated (header says {header_len} bytes, "
                           f"file has {size})")


def _read_file(path):
    """Read every tensor of one safetensors file; returns (tensors, metadata)."""
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, RuntimeError) as e:
        raise WeightsError(f"{path}: cannot read safetensors ({e})") from None


def resolve(path):
    """Map a user path to the list of safetensors files it stands for (one file, or the shards of an index)."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            index = read_json(path)
            if not isinstance(index.get("weight_map"), dict):
                raise WeightsError(f"{path}: shard index has no 'weight_map'")
            shards = sorted(set(index["weight_map"].values()))
            missing = [s for s in shards if not (path.parent / s).is_file()]
            if missing:
                raise WeightsError(f"{path}: names shard(s) that do not exist: {', '.join(missing)}")
            return [path.parent / s for s in shards]
        return [path]
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return [path / name]
    for name in WEIGHT_NAMES:
        if (path / f"{name}.index.json").is_file():
            return resolve(path / f"{name}.index.json")
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if len(found) == 1:
        return [path / found[0]]
    raise WeightsError(f"{path}: no {' or '.join(WEIGHT_NAMES)} (or shard index) in this directory"
                       + (f"; found {found}" if found else ""))


def load_state(path):
    """All tensors of a checkpoint (file, directory or shards) as one dict, plus the first file's metadata."""
    state, metadata = {}, None
    for file in resolve(path):
        tensors, meta = _read_file(file)
        dup = state.keys() & tensors.keys()
        if dup:
            raise WeightsError(f"{file}: keys also present in another shard: {sorted(dup)[:5]}")
        state.update(tensors)
        metadata = meta if metadata is None else metadata
    return state, metadata or {}


def check_keys(module, state, source):
    """Compare a state dict with a module's tensors; one error lists every missing, extra or mis-shaped key."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    bad = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
                 for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{what} keys: {shown}")
    if problems:
        raise WeightsError(f"{source}: does not match {type(module).__name__}: " + "; ".join(problems))


def load_into(module, state, source, dtype=None):
    """Strictly load `state` into `module` (typically built on the meta device) by assignment: no second copy."""
    check_keys(module, state, source)
    expected = module.state_dict()
    for k, v in state.items():  # cast in place, one tensor at a time, so memory stays near one copy
        want = dtype if dtype is not None and v.is_floating_point() else expected[k].dtype
        if v.dtype != want:
            state[k] = v.to(want)
    module.load_state_dict(state, strict=True, assign=True)
    return module


def save_state(state, path, metadata=None):
    """Atomically write tensors to a safetensors file (temp file in the same directory, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_write(path, data, mode):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # the old file stays as it was; leave no half-written temporary beside it
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path, text):
    """Write a small text/JSON file atomically (used for configs and training state)."""
    _atomic_write(path, text, "w")


def atomic_write_bytes(path, data):
    """Write a small binary file atomically (a tokenizer.model copied into a run or a checkpoint)."""
    _atomic_write(path, data, "wb")
