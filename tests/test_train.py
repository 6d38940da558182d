"""train.py end to end on the tiny preset: checkpoint files, exact resume, NaN stop, bad resume, DDP = one process."""
import contextlib
import io
import json
import math
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

import model as M
import weights

ROOT = Path(__file__).resolve().parents[1]


# One thread per process. Many tests here compare two runs bit for bit (resume, flags off = the fixture's run), and
# with two threads they failed now and then: same losses, weights off by ~1e-8 in weight-gradient matrix products.
# The likely cause is a threaded MKL reduction whose split depends on scheduling. That is not resume's doing, and
# --small on a CPU trains as one-thread processes anyway (train.py --procs).
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(*args, env=ONE_THREAD, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--tiny", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def refused(out, *args, says, process=False):
    """train.py with a bad flag: a non-zero exit, one line naming the problem (`says`), no output directory.

    A flag is checked before any work, so by default the script runs in this process (runpy, its stderr and exit
    captured): a new Python that imports torch costs ~2 s a case. `process=True` runs it as a real command, for the
    checks that come later (a bad --data corpus, read by each rank)."""
    if process:
        r = run("--out", out, *args)
        code, stderr = r.returncode, r.stderr
    else:
        err = io.StringIO()
        argv = ["train.py", "--tiny", "--out", str(out), *map(str, args)]
        with mock.patch.object(sys, "argv", argv), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
            runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        code = e.value.code  # sys.exit("message") prints the message to stderr and exits with 1
        code, stderr = (1, err.getvalue() + code + "\n") if isinstance(code, str) else (code, err.getvalue())
    assert code != 0 and says in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not Path(out).exists()


def one_step(out, *flags):
    """train.py --tiny with `flags` for one step into `out` -> the checkpoint's model (the flag tests read it back)."""
    r = run("--out", out, *flags, "--stop-at", 1)
    assert r.returncode == 0, r.stderr
    return M.MMInterleaved.from_checkpoint(out)[0]


def losses(out):
    return [json.loads(ln)["loss"] for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    r = run("--out", out)
    assert r.returncode == 0, r.stderr
    return out


# The flags that only shape the model, set together in one one-step run: each test below reads its own part back
# (a run costs a Python start, the tokenizer and a checkpoint, ~7 s; one run for seven flags instead of seven)
SHAPING = {"--unet-layers": 2, "--noise-draws-t2i": 3, "--mmfs-first-layer": 1, "--mmfs-points": 3, "--spm-width": 12,
           "--ahead-tokens": 2, "--llm-levels": 4}


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    out = tmp_path_factory.mktemp("shaped")
    return out, one_step(out, *(str(x) for kv in SHAPING.items() for x in kv))


def test_tiny_run_writes_a_loadable_checkpoint(full_run):
    for name in ("model.safetensors", "tokenizer.model", "metrics.jsonl", "train/raw.safetensors",
                 "train/optimizer.pt", "train/state.json"):
        assert (full_run / name).is_file(), name
    ls = losses(full_run)
    assert len(ls) == 6 and all(torch.isfinite(torch.tensor(ls)))
    net, tok = M.MMInterleaved.from_checkpoint(full_run)
    assert net.cfg.llm.vocab_size == tok.n_vocab
    assert json.loads((full_run / "train/state.json").read_text())["step"] == 6


def test_benches_read_the_recipe_train_py_runs(full_run):
    """bench/recipe.py parses train.py's PRESETS instead of restating it: what it reads is what a run saves."""
    sys.path.insert(0, str(ROOT))
    from bench.recipe import train_preset
    settings = json.loads((full_run / "train/state.json").read_text())["settings"]
    tiny = train_preset("tiny")
    assert tiny and {k: settings[k] for k in tiny} == tiny
    small = train_preset("small")  # what bench_step.py and data_mix.py build batches from
    assert {"batch_size", "seq_len", "prefixes", "first_frame_prob", "events_text_first",
            "balance_window"} <= small.keys()
    with pytest.raises(KeyError, match="no preset 'huge'"):
        train_preset("huge")

def test_resume_after_interruption_repeats_the_run(full_run, tmp_path):
    r = run("--out", tmp_path, "--stop-at", 3)
    assert r.returncode == 0, r.stderr
    assert len(losses(tmp_path)) == 3
    r = run("--out", tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path) == losses(full_run)  # bit-identical: same batches, draws and optimizer state
    a, _ = M.MMInterleaved.from_checkpoint(full_run)
    b, _ = M.MMInterleaved.from_checkpoint(tmp_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []


def test_resume_with_ema_repeats_the_average(tmp_path):
    # the tiny preset keeps no average; --small does (0.99): its EMA must come back from model.safetensors exactly
    # --ema-also keeps more averages (here one with --ema's decay, one with another), each its own checkpoint
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = run("--out", whole, "--ema", 0.5, "--ema-also", 0.9, 0.5)
    assert r.returncode == 0, r.stderr
    assert run("--out", cut, "--ema", 0.5, "--ema-also", 0.5, 0.9, "--stop-at", 3).returncode == 0
    r = run("--out", cut, "--resume")  # the decays come back from the run's state, not from the command line
    assert r.returncode == 0, r.stderr
    assert losses(cut) == losses(whole)
    ema_whole, _ = weights.load_state(whole / "model.safetensors")
    for path in ("model.safetensors", "ema-0.5/model.safetensors", "ema-0.9/model.safetensors"):
        a, _ = weights.load_state(whole / path)
        b, _ = weights.load_state(cut / path)
        assert a.keys() == b.keys() == ema_whole.keys()
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], path
    same, _ = weights.load_state(whole / "ema-0.5/model.safetensors")  # the same decay as --ema: the same average
    assert [k for k in same if not torch.equal(same[k], ema_whole[k])] == []
    other, _ = weights.load_state(whole / "ema-0.9/model.safetensors")
    assert any(not torch.equal(other[k], ema_whole[k]) for k in other if other[k].is_floating_point())
    assert (whole / "ema-0.9" / "tokenizer.model").read_bytes() == (whole / "tokenizer.model").read_bytes()
    # and it is an average: the trained weights differ from the raw ones the optimiser left
    raw, _ = weights.load_state(whole / "train/raw.safetensors")
    moved = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], ema_whole[k])]
    assert len(moved) > len(raw) // 2
    refused(tmp_path / "bad", "--ema", 1, says="--ema")
    refused(tmp_path / "bad", "--ema-also", 0, says="--ema-also 0.0")


def test_existing_run_is_not_overwritten(full_run):
    before = (full_run / "model.safetensors").read_bytes()
    r = run("--out", full_run)
    assert r.returncode != 0 and "--resume" in r.stderr and "Traceback" not in r.stderr
    assert (full_run / "model.safetensors").read_bytes() == before


def test_corrupt_checkpoint_on_resume_is_a_clear_error(full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    state = json.loads((out / "train/state.json").read_text())
    state["step"] = 3  # so it is not finished
    (out / "train/state.json").write_text(json.dumps(state))
    raw = out / "train/raw.safetensors"
    raw.write_bytes(raw.read_bytes()[:1000])  # truncated
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run("--out", out, "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "raw.safetensors" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot  # nothing touched
    # the EMA file holds the config --resume builds the model from: truncated, it is named in the error
    (out / "model.safetensors").write_bytes((full_run / "model.safetensors").read_bytes()[:1000])
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = run("--out", out, "--resume")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "model.safetensors" in r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_mmfs_hide_prob_flag_changes_the_run_and_survives_resume(full_run, tmp_path):
    for bad, why in ((["--mmfs-hide-prob", "1.5"], "not a probability"),
                     (["--mmfs-hide-prob", "0.5", "--no-mmfs"], "needs MMFS")):
        refused(tmp_path / "bad", *bad, says=why)
    out = tmp_path / "hide"
    assert run("--out", out, "--mmfs-hide-prob", 1, "--stop-at", 3).returncode == 0
    r = run("--out", out, "--resume")  # the setting comes back from the run's state, not from the command line
    assert r.returncode == 0, r.stderr
    net, _ = M.MMInterleaved.from_checkpoint(out)
    assert net.cfg.mmfs_hide_prob == 1.0
    hidden, shown = losses(out), losses(full_run)
    assert len(hidden) == 6 and all(torch.isfinite(torch.tensor(hidden)))
    assert hidden != shown  # continuation frames lose their previous image, so the diffusion loss moves


def test_prediction_type_flag_reaches_the_checkpoint_and_survives_resume(full_run, tmp_path):
    out = tmp_path / "x0"
    assert run("--out", out, "--prediction-type", "sample", "--stop-at", 3).returncode == 0
    r = run("--out", out, "--resume")  # the setting comes back from the run's state
    assert r.returncode == 0, r.stderr
    net, _ = M.MMInterleaved.from_checkpoint(out)
    assert net.cfg.schedule.prediction_type == "sample"  # what eval.py and sample.py then decode with
    assert M.MMInterleaved.from_checkpoint(full_run)[0].cfg.schedule.prediction_type == "v_prediction"
    x0, v = losses(out), losses(full_run)
    assert len(x0) == 6 and all(torch.isfinite(torch.tensor(x0))) and x0 != v


def test_mmfs_max_side_flag_reaches_the_checkpoint(tmp_path):
    refused(tmp_path / "bad", "--mmfs-max-side", "8", "--no-mmfs", says="--no-mmfs")
    out = tmp_path / "side16"  # the tiny UNet draws 32x32: its two 32x32 maps get no residual, the 16x16 ones do
    assert run("--out", out, "--mmfs-max-side", 16, "--stop-at", 2).returncode == 0
    net, _ = M.MMInterleaved.from_checkpoint(out)
    residuals = [not isinstance(b, torch.nn.Identity) for b in net.unet.mmfs.blocks]
    assert net.cfg.unet.mmfs_max_side == 16 and any(residuals) and not all(residuals)
    r = run("--out", tmp_path / "side8", "--mmfs-max-side", 8, "--stop-at", 1)  # none at all, the mid block included
    assert r.returncode == 0, r.stderr
    net, _ = M.MMInterleaved.from_checkpoint(tmp_path / "side8")
    assert all(isinstance(b, torch.nn.Identity) for b in net.unet.mmfs.blocks)
    assert all(not isinstance(b, torch.nn.Identity) for b in M.MMInterleaved(M.preset("tiny")).unet.mmfs.blocks)


def test_unet_attn_side_flag_reaches_the_checkpoint_and_resume_keeps_it(tmp_path):
    for bad in ("0", "8,16,32", "8,x", "-8"):
        refused(tmp_path / "bad", f"--unet-attn-side={bad}", says="--unet-attn-side")
    out = tmp_path / "attn"
    c = one_step(out, "--unet-attn-side", 64).cfg.unet
    assert set(c.down_block_types) == {"CrossAttnDownBlock2D"} and set(c.up_block_types) == {"CrossAttnUpBlock2D"}
    assert set(M.preset("tiny").unet.down_block_types) != {"CrossAttnDownBlock2D"}  # so the flag did it
    # --resume builds the model from the config saved with the checkpoint, not from the preset and flags: drop the
    # flag from the run's settings, as if the run had started under a preset that had this attention built in
    state = json.loads((out / "train" / "state.json").read_text())
    del state["settings"]["unet_attn_side"]
    (out / "train" / "state.json").write_text(json.dumps(state))
    r = run("--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert M.MMInterleaved.from_checkpoint(out)[0].cfg.unet.down_block_types == c.down_block_types
    # N,M: the tiny UNet (32x32, blocks at 32 and 16) with no attention in the down path, all of it in the up path
    c = one_step(tmp_path / "up", "--unet-attn-side", "8,32").cfg.unet
    assert c.down_block_types == ("DownBlock2D",) * 2 and c.up_block_types == ("CrossAttnUpBlock2D",) * 2


def test_unet_layers_flag_reaches_the_checkpoint(shaped, tmp_path):
    refused(tmp_path / "bad", "--unet-layers", 0, says="--unet-layers")
    net = shaped[1]  # --unet-layers 2
    assert net.cfg.unet.layers_per_block == 2 != M.preset("tiny").unet.layers_per_block
    # the blocks really hold two ResNets (the up blocks one more, as in diffusers), not just the config's number
    assert [len(b.resnets) for b in net.unet.down_blocks] == [2] * len(net.unet.down_blocks)
    assert [len(b.resnets) for b in net.unet.up_blocks] == [3] * len(net.unet.up_blocks)


def test_noise_draws_flag_reaches_the_checkpoint_and_changes_the_run(full_run, tmp_path):
    refused(tmp_path / "bad", "--noise-draws", 0, says="--noise-draws")
    out = tmp_path / "nd2"
    assert run("--out", out, "--noise-draws", 2, "--stop-at", 2).returncode == 0
    net, _ = M.MMInterleaved.from_checkpoint(out)
    assert net.cfg.noise_draws == 2 != M.preset("tiny").noise_draws
    # the same batches and init, other draws: the first step's text loss is the same, its image loss is not
    a, b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (full_run, out))
    assert a["loss_txt"] == b["loss_txt"] and a["loss_img"] != b["loss_img"]


def test_stratified_timesteps_flag_reaches_the_checkpoint_and_changes_the_run(tmp_path):
    runs = {}
    for flag in ("--stratified-timesteps", "--no-stratified-timesteps"):
        runs[flag] = tmp_path / flag
        assert run("--out", runs[flag], "--noise-draws", 2, flag, "--stop-at", 1).returncode == 0
    on, off = (M.MMInterleaved.from_checkpoint(d)[0].cfg for d in runs.values())
    assert on.stratified_timesteps and not off.stratified_timesteps and not M.preset("tiny").stratified_timesteps
    # the same batches, init and CFG coins, other timesteps: the text loss is the same, the image loss is not
    a, b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in runs.values())
    assert a["loss_txt"] == b["loss_txt"] and a["loss_img"] != b["loss_img"]


def test_timestep_logit_normal_flag_reaches_the_checkpoint_and_is_checked(tmp_path):
    for bad, says in (("1", "two numbers"), ("0,0", "std > 0"), ("nan,1", "finite")):
        refused(tmp_path / "bad", f"--timestep-logit-normal={bad}", "--noise-draws", 2, "--stratified-timesteps",
                says=says)
    refused(tmp_path / "bad", "--timestep-logit-normal=-0.2,1", says="needs stratified_timesteps")  # tiny: off
    out = tmp_path / "ln"
    r = run("--out", out, "--noise-draws", 2, "--stratified-timesteps", "--timestep-logit-normal=-0.2,1.5",
            "--stop-at", 1)
    assert r.returncode == 0, r.stderr
    cfg = M.MMInterleaved.from_checkpoint(out)[0].cfg
    assert (cfg.timestep_logit_mean, cfg.timestep_logit_std) == (-0.2, 1.5)
    assert M.preset("small").timestep_logit_std == 0  # the recipe's draws stay uniform unless asked


def test_repa_weight_flag_reaches_the_checkpoint_and_logs_its_term(full_run, tmp_path):
    for bad, says in (("-1", "--repa-weight -1.0"), ("nan", "--repa-weight nan"), ("inf", "--repa-weight inf")):
        refused(tmp_path / "bad", f"--repa-weight={bad}", says=says)
    out = tmp_path / "repa"
    r = run("--out", out, "--repa-weight", 0.5, "--stop-at", 1)
    assert r.returncode == 0, r.stderr
    assert M.MMInterleaved.from_checkpoint(out)[0].cfg.repa_weight == 0.5 != M.preset("small").repa_weight
    # the same init and batches (the projector draws on a forked RNG): the first step's text and image losses are
    # the fixture's, and the total adds 0.5 x the logged term
    a, b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[0]) for d in (full_run, out))
    assert (a["loss_txt"], a["loss_img"]) == (b["loss_txt"], b["loss_img"]) and "loss_repa" not in a
    assert b["loss_repa"] > 0 and math.isclose(b["loss"], a["loss"] + 0.5 * b["loss_repa"], rel_tol=1e-5)


def test_noise_draws_t2i_flag_reaches_the_checkpoint(shaped, tmp_path):
    refused(tmp_path / "bad", "--noise-draws-t2i", -1, says="--noise-draws-t2i")
    cfg = shaped[1].cfg  # --noise-draws-t2i 3
    assert (cfg.noise_draws, cfg.noise_draws_t2i) == (M.preset("tiny").noise_draws, 3)


def test_mmfs_first_layer_flag_reaches_the_checkpoint(shaped, tmp_path):
    for bad, says in (("-1", ">= 0"), ("2", "layers 0 to 1")):  # the tiny LLM has 2 layers
        refused(tmp_path / "bad", f"--mmfs-first-layer={bad}", says=says)
    refused(tmp_path / "bad", "--mmfs-first-layer", 1, "--no-mmfs", says="--no-mmfs")
    # the tiny LLM has MMFS in every layer: from layer 1 on, only layer 1 keeps one
    net = shaped[1]  # --mmfs-first-layer 1
    assert M.preset("tiny").llm.mmfs_first == 0
    assert net.cfg.llm.mmfs_first == 1
    assert [layer.llama_cross_attn is not None for layer in net.llm.model.layers] == [False, True]


def test_mmfs_points_flag_reaches_the_checkpoint(shaped, tmp_path):
    for bad in (("--mmfs-points", "0"), ("--mmfs-points", "2", "--no-mmfs")):
        refused(tmp_path / "bad", *bad, says="--mmfs-points")
    net = shaped[1]  # --mmfs-points 3
    c = net.cfg.llm
    assert c.mmfs_points == 3 != M.preset("tiny").llm.mmfs_points
    attn = net.llm.model.layers[1].llama_cross_attn.attn  # offsets: one (x, y) per head and point
    assert attn.n_points == 3 and attn.sampling_offsets.out_features == c.mmfs_heads * 3 * 2


def test_spm_width_flag_reaches_the_checkpoint(shaped, tmp_path):
    refused(tmp_path / "bad", "--spm-width", 0, says="--spm-width 0")
    net = shaped[1]  # --spm-width 12
    assert net.cfg.vit.conv_inplane == 12 != M.preset("tiny").vit.conv_inplane
    spm = net.vit.adapter_spm  # the stem 12 wide, then 2x and 4x deeper
    assert (spm.stem[0].out_channels, spm.conv2[0].out_channels, spm.conv3[0].out_channels) == (12, 24, 48)


def test_llm_levels_flag_reaches_the_checkpoint(shaped, tmp_path):
    for bad in ("3", "2,4", "4,4", "x", ""):  # not a side of the tiny pyramid (16, 8, 4, 2); order; repeat; not ints
        refused(tmp_path / "bad", "--llm-levels", bad, says=f"--llm-levels {bad}")
    refused(tmp_path / "bad", "--llm-levels", 4, "--no-mmfs", says="--no-mmfs has no MMFS")
    net = shaped[1]  # --llm-levels 4: the tiny LLM reads (4, 2); here only the 4x4 map
    c = net.cfg.llm
    assert c.mmfs_levels == (4,) != M.preset("tiny").llm.mmfs_levels
    attn = net.llm.model.layers[1].llama_cross_attn.attn  # one level: heads x 1 x (points + sink) logits
    assert attn.n_levels == 1 and attn.spatial_shapes == [(4, 4)]
    assert attn.attention_weights.out_features == c.mmfs_heads * 1 * (c.mmfs_points + 1)


def test_ahead_tokens_flag_reaches_the_checkpoint_and_the_metrics(shaped, tmp_path):
    refused(tmp_path / "bad", "--ahead-tokens", -1, says="--ahead-tokens -1")
    out, net = shaped  # --ahead-tokens 2
    assert net.cfg.ahead_tokens == 2 and len(net.ahead_heads) == 2 and M.preset("tiny").ahead_tokens == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["loss_ahead"] > 0 and math.isfinite(row["loss_ahead"])


def resumed_mix(out, *flag):
    """train.py --tiny with a training-mix flag, stopped after step 3 and resumed without the flag -> (the run's
    saved settings, its 6 losses, all finite): the mix must come back from the run's state."""
    assert run("--out", out, *flag, "--stop-at", 3).returncode == 0
    r = run("--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    got = losses(out)
    assert len(got) == 6 and all(torch.isfinite(torch.tensor(got)))
    return json.loads((out / "train" / "state.json").read_text())["settings"], got


def test_first_frame_prob_flag_changes_the_batches_and_survives_resume(full_run, tmp_path):
    for bad in (("--first-frame-prob", "1.5"), ("--first-frame-prob", "most"), ("--first-frame-prob", "nan"),
                ("--first-frame-prob", "0.5", "--data", "x.jsonl")):
        refused(tmp_path / "bad", *bad, says="--first-frame-prob")
    settings, lone = resumed_mix(tmp_path / "first", "--first-frame-prob", 1)
    mixed = losses(full_run)
    assert settings["first_frame_prob"] == 1.0 and lone != mixed  # other documents
    uni = tmp_path / "uniform"  # 'uniform' is the default's draw: the same batches, so the same losses
    assert run("--out", uni, "--first-frame-prob", "uniform", "--stop-at", 3).returncode == 0
    assert json.loads((uni / "train" / "state.json").read_text())["settings"]["first_frame_prob"] is None
    assert losses(uni) == mixed[:3]


def test_shared_colour_prob_flag_changes_the_batches_and_survives_resume(full_run, tmp_path):
    for bad in (("--shared-colour-prob", "1.5"), ("--shared-colour-prob", "nan"),
                ("--shared-colour-prob", "0.5", "--data", "x.jsonl")):
        refused(tmp_path / "bad", *bad, says="--shared-colour-prob")
    settings, swapped = resumed_mix(tmp_path / "shared", "--shared-colour-prob", 1)
    assert settings["shared_colour_prob"] == 1.0 and swapped != losses(full_run)  # other stories


def test_events_text_first_flag_changes_the_batches_and_survives_resume(full_run, tmp_path):
    refused(tmp_path / "bad", "--events-text-first", "--data", "x.jsonl", says="--events-text-first")
    settings, told = resumed_mix(tmp_path / "tf", "--events-text-first")
    mixed = losses(full_run)
    assert settings["events_text_first"] is True and told != mixed  # events moved before images
    off = tmp_path / "coin"  # --no-events-text-first keeps the story's coin: the default's batches and losses
    assert run("--out", off, "--no-events-text-first", "--stop-at", 3).returncode == 0
    assert json.loads((off / "train" / "state.json").read_text())["settings"]["events_text_first"] is False
    assert losses(off) == mixed[:3]


def test_balance_window_flag_reorders_the_rows_and_survives_resume(full_run, tmp_path):
    for bad in (("--balance-window", "-1"), ("--balance-window", "2", "--data", "x.jsonl")):
        refused(tmp_path / "bad", *bad, says="--balance-window")
    out = tmp_path / "balanced"
    assert run("--out", out, "--balance-window", 2, "--stop-at", 3).returncode == 0  # stops inside a window
    r = run("--out", out, "--resume")  # the order comes back from the run's state, not from the command line
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train" / "state.json").read_text())["settings"]["balance_window"] == 2
    paired, plain = losses(out), losses(full_run)
    assert len(paired) == 6 and all(torch.isfinite(torch.tensor(paired))) and paired != plain  # rows moved
    off = tmp_path / "in-order"  # 0 is the plain order: the default's batches and losses
    assert run("--out", off, "--balance-window", 0, "--stop-at", 3).returncode == 0
    assert losses(off) == plain[:3]


def test_conv_bf16_flag_changes_the_numerics_and_survives_resume(full_run, tmp_path):
    # the tiny preset keeps float32 convolutions (the default decides per preset and CPU); the flag turns them on
    assert json.loads((full_run / "train" / "state.json").read_text())["settings"]["conv_bf16"] is False
    out, whole = tmp_path / "bf16", tmp_path / "bf16-whole"
    assert run("--out", out, "--conv-bf16", "--stop-at", 3).returncode == 0
    r = run("--out", out, "--resume")  # the format comes back from the run's state, not from the command line
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "train" / "state.json").read_text())["settings"]["conv_bf16"] is True
    r = run("--out", whole, "--conv-bf16")
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(whole)  # exact resume holds in bfloat16 too
    bf16, fp32 = torch.tensor(losses(out)), torch.tensor(losses(full_run))
    # bfloat16 keeps 8 bits of mantissa: the losses move (the convolutions really ran in it), but not far
    assert torch.isfinite(bf16).all() and not torch.equal(bf16, fp32)
    assert bf16.tolist() == pytest.approx(fp32.tolist(), rel=0.05)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    r = run("--out", tmp_path, "--lr", "1e30", "--save-every", 1)
    assert r.returncode != 0 and "loss is" in r.stderr and "Traceback" not in r.stderr
    step = json.loads((tmp_path / "train/state.json").read_text())["step"]
    assert 1 <= step < 6
    net, _ = M.MMInterleaved.from_checkpoint(tmp_path)  # the last good checkpoint loads and is finite
    assert all(torch.isfinite(v).all() for v in net.state_dict().values() if v.is_floating_point())


def test_ddp_two_processes_match_one(full_run, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
           str(ROOT / "train.py"), "--tiny", "--out", str(tmp_path), "--steps", "6", "--stop-at", "2"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp, one = losses(tmp_path), losses(full_run)[:2]
    # same global batch and random draws; only float32 summation order differs between the two layouts
    assert ddp == pytest.approx(one, rel=1e-4)


def test_procs_starts_ddp_processes_that_match_one_and_resume_exactly(full_run, tmp_path):
    # train.py starts the ranks itself (what --small does on a multi-core CPU): the same losses as one process
    r = run("--out", tmp_path / "p", "--procs", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "on cpu x 2 ranks" in r.stderr
    two = losses(tmp_path / "p")
    assert len(two) == 6 and two == pytest.approx(losses(full_run), rel=1e-4)
    # interrupted after step 3 and resumed (the layout --small resumes in): the uninterrupted run, bit for bit
    assert run("--out", tmp_path / "q", "--procs", 2, "--stop-at", 3).returncode == 0
    # each rank kept the AdamW moments of about half the parameters (ZeRO stage 1); the checkpoint holds all of
    # them, in the one-process layout, so one process resumes it too and goes on as the two did
    saved = torch.load(tmp_path / "q" / "train" / "optimizer.pt", weights_only=True)["optimizer"]
    n_trained = sum(p.requires_grad for p in M.MMInterleaved.from_checkpoint(tmp_path / "q")[0].parameters())
    assert len(saved["state"]) == n_trained == sum(len(g["params"]) for g in saved["param_groups"])
    shutil.copytree(tmp_path / "q", tmp_path / "q1")
    r = run("--out", tmp_path / "q1", "--procs", 1, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(tmp_path / "q1") == pytest.approx(two, rel=1e-4)
    r = run("--out", tmp_path / "q", "--procs", 2, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert losses(tmp_path / "q") == two
    sa, sb = (M.MMInterleaved.from_checkpoint(tmp_path / d)[0].state_dict() for d in "pq")
    assert [k for k in sa if not torch.equal(sa[k], sb[k])] == []
    refused(tmp_path / "bad", "--procs", 3, says="does not split into 3 parts")  # the tiny batch is 2
    refused(tmp_path / "bad", "--procs", 0, says="--procs 0")
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"segments": [{"text": "a"}]}\n{"segments": [\n')
    for procs in (1, 2):  # a bad corpus: rank 0's one-line error (no traceback from either rank), nothing written
        refused(tmp_path / "bad", "--procs", procs, "--data", corpus, says=f"{corpus}:2: invalid JSON", process=True)


def test_procs_trains_where_some_parameters_get_no_gradient(tmp_path):
    # without MMFS nothing reads the adapter's pyramid, so the parameters that only build it get no gradient. One
    # process skips them; DDP (what --small starts on a CPU) must be told, or its second step stops with
    # "Expected to have finished reduction in the prior iteration"
    one, two = tmp_path / "one", tmp_path / "two"
    for out, procs in ((one, 1), (two, 2)):
        r = run("--out", out, "--no-mmfs", "--procs", procs)
        assert r.returncode == 0, r.stderr[-2000:]
    assert losses(two) == pytest.approx(losses(one), rel=1e-4) and len(losses(two)) == 6
    sa, _ = weights.load_state(one / "train/raw.safetensors")
    sb, _ = weights.load_state(two / "train/raw.safetensors")
    unread = [k for k in sa if k.startswith("vit.adapter_up.")]
    assert len(unread) == 2 and all(torch.equal(sa[k], sb[k]) for k in unread)  # no gradient in either layout
    # the same when only the finest map goes unread: the tiny LLM reads 4 and 2, and the UNet then has no MMFS block
    r = run("--out", tmp_path / "side4", "--mmfs-max-side", 4, "--procs", 2, "--steps", 3)
    assert r.returncode == 0, r.stderr[-2000:]
    # and a --data corpus whose batches hold no image (text-only documents): no vision parameter gets a gradient
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"segments": [{"text": f"story {i}: the red square moves left."}]}) + "\n"
                              for i in range(40)))
    r = run("--out", tmp_path / "text", "--data", corpus, "--procs", 2, "--steps", 3)
    assert r.returncode == 0, r.stderr[-2000:]


def training_procs(out, stderr):
    """A long `train.py --tiny --procs 2` into `out`, returned once its workers are training (metrics written)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--tiny", "--procs", "2", "--steps", "500",
                          "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    return p


def processes_of(out):
    """PIDs of the processes whose command line names `out` (train.py and its workers)."""
    found = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep to look for the workers")
def test_procs_workers_stop_when_train_py_is_killed(tmp_path):
    p = training_procs(tmp_path, subprocess.DEVNULL)
    p.terminate()
    assert p.wait(timeout=60) != 0
    time.sleep(2)
    assert processes_of(tmp_path) == [], "workers left running"


@pytest.mark.skipif(shutil.which("pgrep") is None or not Path("/proc/self/environ").exists(),
                    reason="finds the rank-1 worker with pgrep and /proc/PID/environ")
def test_procs_a_killed_worker_is_named_and_stops_the_others(tmp_path):
    # rank 1 dies without a word (kill -9, as the OOM killer does): rank 0 then fails on the lost connection, and
    # the launcher must name rank 1 as the cause, exit with the shell's code for the signal, and leave no worker
    err = tmp_path / "stderr.txt"
    with open(err, "w") as f:
        p = training_procs(tmp_path / "run", f)
    ranks = {pid: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for pid in processes_of(tmp_path / "run")
             if pid != p.pid}
    rank1 = [pid for pid, env in ranks.items() if b"RANK=1" in env]
    assert len(ranks) == 2 and len(rank1) == 1, ranks.keys()
    os.kill(rank1[0], signal.SIGKILL)
    assert p.wait(timeout=60) == 128 + signal.SIGKILL
    assert err.read_text().strip().splitlines()[-1] == "train.py: rank 1 of 2 was killed by SIGKILL"
    time.sleep(2)
    assert processes_of(tmp_path / "run") == [], "workers left running"
