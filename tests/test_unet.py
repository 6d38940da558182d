"""unet.py: parity with diffusers' UNet2DConditionModel, the MMFS residuals, presets and bad input.

Parity runs in float64 (both models converted), so the tolerance is 1e-10 rather than float32 rounding. The MMFS
tests hold whichever msda backend runs (reference or fused): they compare a model with itself.
"""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mmfs
import weights
from unet import PRESETS, UNet, UNetConfig, with_attention

diffusers = pytest.importorskip("diffusers")

# SD 2.x style (linear projections, per-level head counts), SD 1.x style (1x1 convs, one int), and a
# small-preset-like layout with plain Down/Up blocks and cross-attention only at the lowest level
STYLES = {
    "sd2": dict(block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=(2, 4), cross_attention_dim=24,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), use_linear_projection=True,
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, sample_size=16),
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8, cross_attention_dim=40,
                down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                use_linear_projection=False, norm_num_groups=8, sample_size=16),
    "plain": dict(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=4,
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"), cross_attention_dim=48,
                  use_linear_projection=True, norm_num_groups=8, sample_size=16),
}


def save_diffusers(path, **config):
    """A random diffusers UNet (weights perturbed so no layer is a zero-init no-op) saved as safetensors."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(path, safe_serialization=True)
    return ref


@pytest.mark.parametrize("style", STYLES)
def test_parity_with_diffusers(tmp_path, style):
    config = STYLES[style]
    ref = save_diffusers(tmp_path, **config).double()
    ours = UNet.from_pretrained(tmp_path, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, config.get("in_channels", 4), 8, 8, generator=g, dtype=torch.float64)
    context = torch.randn(4, 7, config["cross_attention_dim"], generator=g, dtype=torch.float64)
    with torch.no_grad():
        t = torch.tensor([0, 17, 640, 999])  # one timestep per sample
        torch.testing.assert_close(ours(x, t, context), ref(x, t, context).sample, rtol=0, atol=1e-10)
        odd = x[:, :, :6, :5]  # sides not divisible by 4: upsampling must follow the skip tensors' sizes
        torch.testing.assert_close(ours(odd, 5, context), ref(odd, 5, context).sample, rtol=0, atol=1e-10)


def test_sd_directory_and_mmfs_zero_at_init(tmp_path):
    """An SD root (reads unet/) loads, and attached MMFS residuals leave the output unchanged at init."""
    ref = save_diffusers(tmp_path / "unet", **STYLES["sd2"])
    ours = UNet.from_pretrained(tmp_path, mmfs=True, mmfs_dim=32, mmfs_value_dim=16, mmfs_levels=(8, 4),
                                mmfs_heads=2, mmfs_points=2, mmfs_pos_grid=16).eval()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 24)
    features = [torch.randn(2, 1, 16, s, s) for s in (8, 4)]
    with torch.no_grad():
        with_features = ours(x, 50, context, features, torch.ones(2, 1))
        plain = ours(x, 50, context)
        torch.testing.assert_close(plain, ref(x, 50, context).sample, rtol=1e-5, atol=1e-5)
    assert torch.equal(with_features, plain)
    assert len(ours.mmfs.blocks) == 1 + 2 * 2 + 1 + 1  # conv_in, 2 per level + 1 downsampler, mid output


# ----------------------------------------------------------------------------------------------------------------
# MMFS residuals


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = PRESETS["tiny"]
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, c.cross_attention_dim, generator=g)
    features = [torch.randn(2, n, c.mmfs_value_dim, s, s, generator=g) for s in c.mmfs_levels]
    return x, context, features


def tiny_with_live_mmfs():
    """The tiny preset with its zero convs made non-zero, so the residuals show."""
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"]).eval()
    with torch.no_grad():
        for block in model.mmfs.blocks:
            block.zero_conv.weight.normal_(0, 0.5)
            block.zero_conv.bias.normal_(0, 0.1)
    return model


LIVE = tiny_with_live_mmfs()


def test_mmfs_zero_at_init():
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"]).eval()
    x, context, features = inputs(2)
    with torch.no_grad():
        with_features = model(x, 10, context, features, torch.tensor([[1, 1], [1, 0]]))
        assert torch.equal(with_features, model(x, 10, context))
        assert not torch.equal(LIVE(x, 10, context, features), LIVE(x, 10, context))  # and live ones do act


@settings(deadline=None, max_examples=6)
@given(mask=st.lists(st.integers(0, 1), min_size=6, max_size=6), slot=st.integers(0, 2))
def test_mmfs_reads_only_visible_images(mask, slot):
    """Changing image `slot` changes a sample's output iff that sample sees it; other samples never move."""
    mask = torch.tensor(mask).view(2, 3)
    x, context, features = inputs(3)
    changed = [f.clone() for f in features]
    for f in changed:
        f[:, slot] += torch.randn_like(f[:, slot])
    with torch.no_grad():
        before, after = LIVE(x, 10, context, features, mask), LIVE(x, 10, context, changed, mask)
    for b in range(2):
        assert torch.isfinite(after[b]).all()
        assert torch.equal(before[b], after[b]) != bool(mask[b, slot]), (b, mask[b].tolist(), slot)


def test_reference_point_is_the_pixel_centre_in_xy():
    """With zero offsets a pixel reads exactly its own place: changing one value pixel moves one output pixel."""
    x, context, features = inputs(1)
    block = LIVE.mmfs.blocks[0]
    with torch.no_grad():
        saved = block.attn.sampling_offsets.bias.clone()
        block.attn.sampling_offsets.bias.zero_()                                       # loc = reference point
        h = LIVE.conv_in(x)
        value = torch.cat([f.flatten(3).transpose(2, 3) for f in features], dim=2)    # (B, 1, ΣHW, C)
        changed = value.clone()
        changed[:, :, 15] += 10.0                                                      # level 0 (16×16): row 0, col 15
        r1, r2 = block(h, value, torch.ones(2, 1)), block(h, changed, torch.ones(2, 1))
        block.attn.sampling_offsets.bias.copy_(saved)
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    expected[:, 0, 15] = True
    assert torch.equal((r1 != r2).any(1), expected)                                    # only that pixel moves


def test_block_formula_and_bases():
    """One block is zero_conv(MMFS(LN(x, eps 1e-6) + pos, LN(value))) at pixel centres; base = the map's size."""
    x, context, features = inputs(1)
    block, h = LIVE.mmfs.blocks[2], torch.randn(2, 32, 8, 8)
    value = torch.cat([f.flatten(3).transpose(2, 3) for f in features], dim=2)        # (B, 1, ΣHW, C)
    ys, xs = torch.meshgrid((torch.arange(8) + 0.5) / 8, (torch.arange(8) + 0.5) / 8, indexing="ij")
    ref = torch.stack([xs, ys], -1).reshape(1, 64, 2)                                  # (1, 64, 2) as (x, y)
    with torch.no_grad():
        q = F.layer_norm(h.flatten(2).mT, (32,), block.query_norm.weight, block.query_norm.bias, 1e-6)
        q = q + mmfs.pos_embed_2d(32, 16, 8, 8)
        v = F.layer_norm(value, (value.shape[-1],), block.value_norm.weight, block.value_norm.bias, 1e-6)
        expected = block.zero_conv(block.attn(q, ref, v, torch.ones(2, 1)).mT.reshape(2, 32, 8, 8))
        torch.testing.assert_close(block(h, value, torch.ones(2, 1)), expected)
    assert [b.attn.base for b in LIVE.mmfs.blocks] == [(16, 16)] * 2 + [(8, 8)] * 3
    with torch.device("meta"):
        paper = UNet(PRESETS["paper"])
    assert [b.attn.base[0] for b in paper.mmfs.blocks] == [64] * 3 + [32] * 3 + [16] * 3 + [8] * 4


def test_our_checkpoint_with_mmfs_round_trips(tmp_path):
    """A UNet saved with its MMFS residuals loads back whole (diffusers checkpoints have none to load)."""
    config = dataclasses.asdict(PRESETS["tiny"])
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items()}))
    weights.save_state(LIVE.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = UNet.from_pretrained(tmp_path).eval()
    x, context, features = inputs(1)
    with torch.no_grad():
        assert torch.equal(loaded(x, 10, context, features), LIVE(x, 10, context, features))
    with pytest.raises(ValueError, match="t must be a scalar or"):
        loaded(x, torch.tensor([1, 2, 3]), context)


def test_mmfs_residual_is_local_to_the_previous_image():
    """With one previous image (the authors' use), a pixel's residual depends on the image near that pixel only:
    offsets start within ±1 pixel, so changing a far corner of every level leaves the opposite corner's skips."""
    x, context, features = inputs(1)
    first = LIVE.mmfs.blocks[0]
    with torch.no_grad():
        value = torch.cat([f.flatten(3).transpose(2, 3) for f in features], dim=2)     # (B, 1, ΣHW, C)
        h = LIVE.conv_in(x)
        changed = [f.clone() for f in features]
        for f in changed:
            f[..., -1, -1] += 10.0  # bottom-right pixel of every level
        value2 = torch.cat([f.flatten(3).transpose(2, 3) for f in changed], dim=2)
        r1, r2 = first(h, value, torch.ones(2, 1)), first(h, value2, torch.ones(2, 1))
    assert torch.equal(r1[..., :2, :2], r2[..., :2, :2])  # top-left pixels: untouched
    assert not torch.equal(r1[..., -1, -1], r2[..., -1, -1])  # bottom-right pixel: moved


def test_tap_returns_the_last_down_state_of_a_side_before_mmfs():
    """tap=s: the output is the plain forward's, and the state is the down path's last s×s map, the one the skip
    carries before its MMFS residual: the tiny UNet's 8×8 down block's resnet output (down_blocks[1])."""
    x, context, features = inputs(1)
    mask = torch.ones(2, 1)
    seen = []
    hook = LIVE.down_blocks[1].register_forward_hook(lambda m, args, out: seen.append(out[1][-1]))
    try:
        with torch.no_grad():
            plain = LIVE(x, 10, context, features, mask)
            out, state = LIVE(x, 10, context, features, mask, tap=8)
    finally:
        hook.remove()
    assert torch.equal(out, plain) and state.shape == (2, 64, 8, 8)
    assert torch.equal(state, seen[1])  # the second call's down block 1: its last state
    with pytest.raises(ValueError, match="tap 4: the down path's maps have sides \\[16, 8\\]"):
        LIVE(x, 10, context, tap=4)


def test_gradients_reach_mmfs_parameters():
    x, context, features = inputs(1)
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    model(x, 10, context, features).square().mean().backward()
    grads = {k: p.grad for k, p in model.mmfs.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # at init only the zero convs learn (ControlNet-style); everything behind them is still cut off
    assert all(g.abs().sum() > 0 for k, g in grads.items() if "zero_conv.weight" in k)
    assert all(g.abs().sum() == 0 for k, g in grads.items() if "zero_conv" not in k)
    LIVE(x, 10, context, features).square().mean().backward()
    missing = [k for k, p in LIVE.mmfs.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in LIVE.parameters())
    LIVE.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# presets and key layout


@pytest.mark.parametrize("name", ["tiny", "small", "paper", "small+attn8"])
def test_presets_match_diffusers_keys(name):
    """Every preset's plain UNet (and the small one with attention only at 8x8, train.py --unet-attn-side 8) has
    exactly the state-dict keys and shapes of the diffusers model of that config."""
    c = with_attention(PRESETS["small"], 8) if name == "small+attn8" else PRESETS[name]
    fields = ("in_channels", "out_channels", "sample_size", "block_out_channels", "layers_per_block",
              "down_block_types", "up_block_types", "attention_head_dim", "cross_attention_dim",
              "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{f: getattr(c, f) for f in fields})
        ours = UNet(c)
    mmfs_keys = {k for k in ours.state_dict() if k.startswith("mmfs.")}
    assert {k: v.shape for k, v in ours.state_dict().items() if k not in mmfs_keys} == \
           {k: v.shape for k, v in ref.state_dict().items()}
    if name == "paper":  # 865.9M UNet parameters (SD 2.1-base) + about 57M for the MMFSNet (reference §5.3)
        assert sum(p.numel() for p in ref.parameters()) == 865_910_724
        assert 56e6 < sum(p.numel() for p in ours.mmfs.parameters()) < 59e6
        assert len(ours.mmfs.blocks) == 13


def test_with_attention_turns_the_blocks_at_and_below_a_side():
    c = PRESETS["small"]  # 32x32 pixels: down blocks at 32, 16, 8; the up path mirrors them
    assert with_attention(c, 16) == c  # the preset has attention at 16x16 and 8x8 already
    c8 = with_attention(c, 8)  # blocks on larger maps lose their attention
    assert c8.down_block_types == ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D")
    assert c8.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")
    assert with_attention(c8, 16) == c
    assert set(with_attention(c, 32).down_block_types) == {"CrossAttnDownBlock2D"}
    assert c.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")  # c is unchanged
    up16 = with_attention(c, 8, 16)  # the down path to 8x8, the up path to 16x16
    assert up16.down_block_types == c8.down_block_types and up16.up_block_types == c.up_block_types
    none = with_attention(c, 4)
    assert none.down_block_types == ("DownBlock2D",) * 3 and none.up_block_types == ("UpBlock2D",) * 3


# ----------------------------------------------------------------------------------------------------------------
# bad input: one clear error each


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet")
    save_diffusers(path, **STYLES["sd2"])
    return path


def test_missing_config(tmp_path):
    with pytest.raises(weights.WeightsError, match=r"config\.json: file not found"):
        UNet.from_pretrained(tmp_path)


def test_missing_weights(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    with pytest.raises(weights.WeightsError, match=r"no model\.safetensors or diffusion_pytorch_model\.safetensors"):
        UNet.from_pretrained(tmp_path)


def test_config_that_does_not_fit_the_weights(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 32}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (saved / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(weights.WeightsError, match=r"mis-shaped keys: .*attn2\.to_k\.weight \(64, 24\) "
                                                   r"\(expected \(64, 32\)\)"):
        UNet.from_pretrained(tmp_path)


def test_unsupported_config_field(saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "class_embed_type": "timestep"}))
    with pytest.raises(ValueError, match=r"config\.json: class_embed_type = 'timestep' is not supported"):
        UNet.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"UNetConfig: 48 channels are not divisible by 5 heads"):
        UNetConfig(block_out_channels=(32, 48), attention_head_dim=(2, 5), norm_num_groups=8,
                   down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)


def test_wrong_inputs():
    model = LIVE
    x, context, features = inputs(1)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"UNet: x must be \(B, 4, H, W\) \(config\.in_channels\), "
                                             r"got \(2, 3, 16, 16\)"):
            model(x[:, :3], 1, context)
        with pytest.raises(ValueError, match=r"UNet: context must be \(B=2, T, 32\) \(config\.cross_attention_dim\)"):
            model(x, 1, torch.randn(2, 5, 24))
        with pytest.raises(ValueError, match=r"UNet: mmfs_features must be 4 tensors of shapes"):
            model(x, 1, context, features[:1])
        with pytest.raises(ValueError, match=r"UNet: mmfs_mask must be \(B, n\) = \(2, 1\)"):
            model(x, 1, context, features, torch.ones(2, 3))
        plain = UNet(dataclasses.replace(PRESETS["tiny"], mmfs=False))
        with pytest.raises(ValueError, match=r"UNet: mmfs_features given but this UNet has no MMFS residuals"):
            plain(x, 1, context, features)
