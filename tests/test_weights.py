"""weights.py: finding, reading, checking and atomically writing checkpoints; every failure names the file."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from weights import (WeightsError, atomic_write_bytes, atomic_write_text, load_into, load_state, read_json, resolve,
                     save_state)


def tiny_state():
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "b.weight": torch.randn(2, 3)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def test_single_file_directory_and_shards(tmp_path):
    state = tiny_state()
    save_file(state, tmp_path / "model.safetensors", metadata={"config": "{}"})
    got, meta = load_state(tmp_path)
    assert meta == {"config": "{}"} and all(torch.equal(got[k], state[k]) for k in state)

    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a.weight": state["a.weight"]}, shards / "model-00001-of-00002.safetensors")
    save_file({"a.bias": state["a.bias"], "b.weight": state["b.weight"]}, shards / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "a.bias": "model-00002-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    got, _ = load_state(shards)
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert len(resolve(shards)) == 2


def test_load_into_meta_module_assigns(tmp_path):
    state = tiny_state()
    with torch.device("meta"):
        m = Net()
    load_into(m, dict(state), "ckpt")
    assert m.a.weight.device.type == "cpu" and torch.equal(m.a.weight, state["a.weight"])
    torch.testing.assert_close(m(torch.ones(1, 2)), (torch.ones(1, 2) @ state["a.weight"].T + state["a.bias"]) @
                               state["b.weight"].T)


def test_load_into_casts_half_checkpoints_to_module_dtype():
    state = {k: v.half() for k, v in tiny_state().items()}
    m = load_into(Net(), state, "ckpt")
    assert m.a.weight.dtype == torch.float32
    m = load_into(Net(), {k: v.float() for k, v in state.items()}, "ckpt", dtype=torch.bfloat16)
    assert m.b.weight.dtype == torch.bfloat16


def test_key_errors_list_every_problem():
    state = tiny_state()
    state["extra.weight"] = torch.zeros(1)
    state["b.weight"] = torch.zeros(5, 5)
    del state["a.bias"]
    with pytest.raises(WeightsError) as e:
        load_into(Net(), state, "some/ckpt.safetensors")
    msg = str(e.value)
    assert msg.startswith("some/ckpt.safetensors: does not match Net")
    assert "missing keys: a.bias" in msg and "unexpected keys: extra.weight" in msg
    assert "mis-shaped keys: b.weight (5, 5) (expected (2, 3))" in msg


@pytest.mark.parametrize("content, message", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "git-lfs pointer"),
    (b"abc", "not a safetensors file"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00<html>oops</html>", "not a safetensors file or truncated"),
])
def test_bad_files_are_named(tmp_path, content, message):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match=message) as e:
        load_state(tmp_path)
    assert str(bad) in str(e.value)


def test_truncated_file(tmp_path):
    save_file(tiny_state(), tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_state(tmp_path / "model.safetensors")


def test_missing_paths_and_shards(tmp_path):
    with pytest.raises(WeightsError, match="no such file or directory"):
        load_state(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no model.safetensors"):
        load_state(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    with pytest.raises(WeightsError, match="gone.safetensors"):
        load_state(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="config.json: not valid JSON"):
        read_json(tmp_path / "config.json")


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_state(tiny_state(), path, metadata={"step": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("weights.save_file", boom)
    with pytest.raises(OSError):
        save_state(tiny_state(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind
    assert load_state(path)[1] == {"step": "1"}
    atomic_write_text(tmp_path / "state.json", "{}")
    assert (tmp_path / "state.json").read_text() == "{}"


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "tokenizer.model"
    atomic_write_bytes(path, b"old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "text is not bytes")  # fails inside the write, after the temporary exists
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]
