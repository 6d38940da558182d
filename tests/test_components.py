"""MMInterleaved.from_components: the paper model assembled from a tiny CLIP, LLaMA and SD 2.x saved by
transformers / diffusers. Every released tensor lands unchanged where it belongs, the freezing follows §7.2, the
whole model trains one step and survives a save / load round trip."""
import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import llm
import model as M
import resampler
import weights

ROOT = Path(__file__).resolve().parents[1]
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

# the paper preset's MMFS and resamplers are 1024-wide and 12 layers deep: shrink them, keep the wiring
SMALL = dict(resampler=resampler.PRESETS["tiny"], decoder=resampler.PRESETS["tiny_decoder"])


def overrides():
    p = M.preset("paper")
    return dict(SMALL, llm=dataclasses.replace(p.llm, mmfs_heads=2, mmfs_points=2, mmfs_every=1),
                unet=dataclasses.replace(p.unet, mmfs_dim=32, mmfs_heads=2, mmfs_points=2))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """clip/ (CLIPVisionModel), llm/ (LlamaForCausalLM + a sentencepiece tokenizer.model), sd/ (unet/, vae/,
    scheduler/), all random, all safetensors."""
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
        patch_size=8))
    clip.save_pretrained(root / "clip", safe_serialization=True)
    tok = llm.Tokenizer.train(data.story_corpus(40, 0), root / "sp", 320)
    (root / "llm").mkdir()
    shutil.copy(tok.path, root / "llm" / "tokenizer.model")
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.n_vocab - 2, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=512))
    lm.save_pretrained(root / "llm", safe_serialization=True)
    diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        attention_head_dim=(2, 4), cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True, norm_num_groups=8,
    ).save_pretrained(root / "sd" / "unet", safe_serialization=True)
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4, sample_size=16,
    ).save_pretrained(root / "sd" / "vae", safe_serialization=True)
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="v_prediction").save_pretrained(root / "sd" / "scheduler")
    return root


@pytest.fixture(scope="module")
def assembled(parts):
    return M.MMInterleaved.from_components(parts / "clip", parts / "llm", parts / "sd", **overrides())


def test_every_released_tensor_lands_unchanged(parts, assembled):
    net, tok = assembled
    clip, _ = weights.load_state(parts / "clip")
    vit = net.vit.state_dict()
    for k, v in clip.items():
        assert torch.equal(vit[k.removeprefix("vision_model.")], v), k
    lm, _ = weights.load_state(parts / "llm")
    mine = net.llm.state_dict()
    for k, v in lm.items():
        got = mine[k]
        if got.shape != v.shape:  # the embedding and the head grew by the <BoI>, <image> rows
            assert got.shape[0] == v.shape[0] + 2 and k in ("model.embed_tokens.weight", "lm_head.weight")
            got = got[:v.shape[0]]
        assert torch.equal(got, v), k
    for part, module in (("unet", net.unet), ("vae", net.vae)):
        saved, _ = weights.load_state(parts / "sd" / part)
        state = module.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items()), part
    # the frozen text head starts as the LLM head on the old pieces (§3.3)
    assert torch.equal(net.text_head.head.weight[:-2], lm["lm_head.weight"])


def test_config_comes_from_the_checkpoints(assembled):
    net, tok = assembled
    c = net.cfg
    assert c.image_size == 16  # latent 8 x (2 VAE blocks -> one halving)
    assert c.schedule.prediction_type == "v_prediction" and c.schedule.beta_schedule == "scaled_linear"
    assert c.llm.vocab_size == tok.n_vocab and c.ids["boi"] == tok.boi_id and c.ids["image"] == tok.image_id
    assert c.llm.mmfs_levels == (8, 4, 2) and c.unet.mmfs_levels == (16, 8, 4, 2)  # the adapter's 16/8/4/2 pyramid
    assert c.llm.image_dim == c.unet.mmfs_value_dim == 32
    assert (c.bos_id, c.eos_id, c.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)


def test_the_latent_path_draws_and_reads_at_the_vae_s_size(assembled):
    """With a VAE, the UNet works on latents at the VAE's scale (here one halving: 16 px -> 8 x 8, not SD's 1/8):
    generate_images draws there and decodes to image_size; drawing_nll reads the posterior mean, so one frame's
    texts see the same latents (the same value in any row and on any call)."""
    net, tok = assembled
    net.eval()
    frames = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert net.diffusion_shape == (4, 8, 8) == tuple(net.to_diffusion_space(frames).shape[1:])
    texts = [tok.encode("there is a red circle at the top.", bos=False)] * 2
    out = net.generate_images([[tok.bos_id] + texts[0] + [tok.boi_id]], [torch.zeros(0, 3, 16, 16)], steps=2,
                              generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    noise = torch.randn(1, 3, *net.diffusion_shape, generator=torch.Generator().manual_seed(4))
    noise = noise.expand(2, -1, -1, -1, -1)                                                # (2, L, C, s, s)
    levels = torch.tensor([100, 500, 900])
    nll = net.drawing_nll(frames[:1].expand(2, -1, -1, -1), texts, levels, noise)
    assert torch.isfinite(nll).all() and nll[0] == nll[1]
    assert torch.equal(nll, net.drawing_nll(frames[:1].expand(2, -1, -1, -1), texts, levels, noise))


def test_freezing_follows_the_authors(assembled):
    net, _ = assembled
    trained = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("vit.adapter_") for n in trained if n.startswith("vit."))
    assert any(n.startswith("vit.adapter_") for n in trained)
    assert all(".llama_cross_attn." in n for n in trained if n.startswith("llm."))
    assert not any(n.startswith("vae.") for n in trained)
    assert any(n.startswith("unet.mmfs.") for n in trained) and "unet.conv_in.weight" in trained
    assert {"resampler.query_tokens", "text_head.head_new.weight"} <= trained


def test_trains_and_round_trips(tmp_path, assembled):
    net, tok = assembled
    story = data.make_story("train", 0, 1)  # 32 px frames; collate resizes them to 16
    ids, images = data.tokenize_document(story.segments(), tok, net.cfg.num_image_tokens)
    batch = data.collate([(ids, images)], tok.pad_id, net.cfg.image_size)
    args = (batch["tokens"], batch["images"], batch["images_per_row"])
    out = net(*args, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["n_img"] == len(images)
    for name in ("resampler.query_tokens", "decoder.query_tokens", "unet.conv_in.weight"):
        assert net.get_parameter(name).grad.abs().sum() > 0, name
    net.zero_grad(set_to_none=True)
    net.save_pretrained(tmp_path / "ckpt", tok.path)
    back, tok2 = M.MMInterleaved.from_checkpoint(tmp_path / "ckpt")
    assert tok2.n_vocab == tok.n_vocab
    with torch.no_grad():  # the VAE's posterior sample draws from the global RNG (train.py seeds it per step)
        torch.manual_seed(1)
        again = back(*args, generator=torch.Generator().manual_seed(0))
        net.eval()
        torch.manual_seed(1)
        ref = net(*args, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["loss"], ref["loss"], rtol=1e-6, atol=0)


def test_tokenizer_that_does_not_match_the_llm(parts, tmp_path):
    bad = tmp_path / "llm"
    shutil.copytree(parts / "llm", bad)
    other = llm.Tokenizer.train(data.story_corpus(40, 0), tmp_path / "sp", 300)
    shutil.copy(other.path, bad / "tokenizer.model")
    with pytest.raises(weights.WeightsError, match="tokenizer.model: 300 pieces but the LLM has 320 embeddings"):
        M.MMInterleaved.from_components(parts / "clip", bad, parts / "sd", **overrides())


def test_train_py_paper_preset_from_the_parts(parts, tmp_path):
    """train.py --paper loads the parts, trains on a JSONL corpus and writes a checkpoint that loads back."""
    data.write_jsonl([data.make_story("train", 0, i) for i in range(2)], tmp_path / "docs.jsonl")
    cmd = [sys.executable, str(ROOT / "train.py"), "--paper", "--clip", parts / "clip", "--llm", parts / "llm",
           "--sd", parts / "sd", "--data", tmp_path / "docs.jsonl", "--steps", "2", "--batch-size", "1",
           "--out", tmp_path / "run"]
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1] and math.isfinite(steps[0]["loss"])  # logged every 10 and at the end
    net, tok = M.MMInterleaved.from_checkpoint(tmp_path / "run")
    assert net.cfg.freeze_pretrained and net.cfg.vae is not None and tok.n_vocab == net.cfg.llm.vocab_size
    clip, _ = weights.load_state(parts / "clip")  # frozen: still the released tensor after training
    k = next(k for k in clip if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    assert torch.equal(net.vit.state_dict()[k.removeprefix("vision_model.")], clip[k])
    # a missing part is a one-line error before anything is loaded
    r = subprocess.run(list(map(str, cmd[:3] + ["--out", tmp_path / "bad"])), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("train.py: error: --paper needs")
