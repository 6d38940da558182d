"""vit.py: parity with transformers' CLIP, the ViT-Adapter's shapes / zero-init identity / gradients, bad input."""
import dataclasses
import json
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import mmfs
import weights
from vit import PRESETS, MSDeformAttn, ViT, ViTAdapter, ViTConfig, normalize

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32,
            patch_size=8)


def hf_vision(tmp_path, **kw):
    """A tiny random CLIPVisionModel saved with safe_serialization; returns (model, directory)."""
    torch.manual_seed(0)
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**{**TINY, **kw})).eval()
    model.save_pretrained(tmp_path / "clip_vision", safe_serialization=True)
    return model, tmp_path / "clip_vision"


def assert_states_match(hf, ours, pixels, dtype, tol):
    hf, ours = hf.to(dtype), ours.to(dtype)
    with torch.no_grad():
        ref = hf(pixels.to(dtype), output_hidden_states=True)
        last, states = ours(pixels.to(dtype), output_hidden_states=True)
    assert len(states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
    torch.testing.assert_close(last, ref.last_hidden_state, rtol=tol, atol=tol)
    for a, b in zip(states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# float32: the same ops in the same order, so rounding-level agreement; float64: agreement to 1e-12
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_vision_model_parity(tmp_path, dtype, tol):
    hf, path = hf_vision(tmp_path)
    ours = ViT.from_pretrained(path).eval()
    assert ours.cfg.num_attention_heads == 4 and ours.cfg.image_size == 32
    assert_states_match(hf, ours, torch.randn(3, 3, 32, 32), dtype, tol)


def test_full_clip_model_parity_text_keys_ignored(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(vision_config={**TINY, "hidden_act": "gelu"},
                                  text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, vocab_size=99, bos_token_id=0,
                                                   eos_token_id=1, pad_token_id=1))
    full = transformers.CLIPModel(cfg).eval()
    full.save_pretrained(tmp_path / "clip", safe_serialization=True)
    assert any(k.startswith("text_model.") for k in load_file(tmp_path / "clip" / "model.safetensors"))
    ours = ViT.from_pretrained(tmp_path / "clip" / "model.safetensors").eval()  # a file: config.json next to it
    assert ours.cfg.hidden_act == "gelu"
    assert_states_match(full.vision_model, ours, torch.randn(2, 3, 32, 32), torch.float64, 1e-12)


def test_config_inferred_without_config_json(tmp_path):
    hf, path = hf_vision(tmp_path, hidden_size=128, num_attention_heads=2, num_hidden_layers=2)  # 64 per head
    (path / "config.json").unlink()
    ours = ViT.from_pretrained(path).eval()
    assert (ours.cfg.hidden_size, ours.cfg.num_attention_heads, ours.cfg.num_hidden_layers) == (128, 2, 2)
    assert_states_match(hf, ours, torch.randn(2, 3, 32, 32), torch.float64, 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# adapter


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_adapter_shapes(preset):
    cfg = PRESETS[preset]
    tokens, pyramid = ViTAdapter(cfg)(torch.rand(2, 3, cfg.image_size, cfg.image_size))
    assert tokens.shape == (2, 1 + cfg.grid ** 2, cfg.hidden_size)
    assert [tuple(p.shape) for p in pyramid] == [(2, cfg.hidden_size, s, s) for s in cfg.pyramid_sizes]
    assert all(torch.isfinite(p).all() for p in [tokens, *pyramid])


def test_paper_preset_geometry():
    cfg = PRESETS["paper"]
    assert (cfg.grid, cfg.spm_size, cfg.pyramid_sizes) == (16, 256, [64, 32, 16, 8])
    assert cfg.runs == [(0, 5), (6, 11), (12, 17), (18, 23)]
    with torch.device("meta"):  # structure only: no memory
        m = ViTAdapter(cfg)
    assert m.adapter_interactions[0].injector.attn.value_proj.out_features == 512  # deform_ratio 0.5
    assert m.adapter_interactions[0].extractor.ffn.fc1.out_features == 256  # cffn_ratio 0.25
    assert len(m.adapter_interactions[3].extra_extractors) == 2 and len(m.adapter_interactions[2].extra_extractors) == 0


def test_adapter_with_zero_gains_is_the_plain_vit(tmp_path):
    hf, path = hf_vision(tmp_path)
    adapter = ViTAdapter.from_pretrained(path).eval()  # CLIP loaded strictly, adapter freshly initialised
    assert all((b.injector.gamma == 0).all() for b in adapter.adapter_interactions)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens, _ = adapter(images)
        torch.testing.assert_close(tokens, hf(normalize(images)).last_hidden_state, rtol=1e-5, atol=1e-5)
        for b in adapter.adapter_interactions:  # a non-zero gain must change the tokens (the test can fail)
            b.injector.gamma.fill_(0.5)
        assert (adapter(images)[0] - tokens).abs().max() > 1e-3


def test_pyramid_is_resized_vit_maps_plus_position_when_the_spm_path_is_zero():
    """With γ = 0 and the SPM / extractor / up-conv outputs zeroed, level l = the ViT patch map after run l, bilinearly
    resized to the level, + the bicubic-resized 2-D sincos table: checks depths, the row-major map and the position."""
    torch.manual_seed(0)
    m = ViTAdapter(PRESETS["tiny"]).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if re.search(r"adapter_spm\.fc\d|adapter_up|attn\.output_proj|ffn\.fc2", name):
                p.zero_()
        images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
        _, pyramid = m(images)
        _, states = ViT.forward(m, normalize(images), output_hidden_states=True)
    cfg, D = m.cfg, m.cfg.hidden_size
    for level, (s, (_, last)) in enumerate(zip(cfg.pyramid_sizes, cfg.runs)):
        vit_map = states[last + 1][:, 1:].transpose(1, 2).reshape(2, D, cfg.grid, cfg.grid)
        vit_map = torch.nn.functional.interpolate(vit_map, size=(s, s), mode="bilinear", align_corners=False)
        pos = mmfs.pos_embed_2d(D, cfg.grid, s, s).T.reshape(1, D, s, s).double()
        torch.testing.assert_close(pyramid[level], vit_map + pos, rtol=1e-6, atol=1e-6)  # pos table is float32


def test_c1_stride_2_keeps_the_stem_resolution_and_changes_only_c1():
    """c1_stride 2: c1 = fc1(the stem before its max-pool) + the up-conv term + the ViT map + position, at twice the
    side; the other three levels equal the stride-4 model's (same weights), since c2 still reads the pooled stem."""
    torch.manual_seed(0)
    cfg4 = PRESETS["tiny"]
    cfg2 = dataclasses.replace(cfg4, c1_stride=2)
    assert cfg2.pyramid_sizes == [2 * cfg4.pyramid_sizes[0]] + cfg4.pyramid_sizes[1:]
    m4, m2 = ViTAdapter(cfg4).double().eval(), ViTAdapter(cfg2).double().eval()
    with torch.no_grad():
        m4.adapter_up.weight.zero_()  # drop the up-conv term, so c1 is the stem term + ViT map + position
        m4.adapter_up.bias.zero_()
    m2.load_state_dict(m4.state_dict())  # same keys: the stride changes no parameter
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        _, p4 = m4(images)
        _, p2 = m2(images)
        for a, b in zip(p4[1:], p2[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        pixels = normalize(images)
        spm_in = torch.nn.functional.interpolate(pixels, size=(cfg4.spm_size,) * 2, mode="bilinear",
                                                 align_corners=False)
        _, states = ViT.forward(m4, pixels, output_hidden_states=True)  # γ = 0 at init: the plain ViT's states
        D, g, last = cfg4.hidden_size, cfg4.grid, cfg4.runs[0][1]
        vit_map = states[last + 1][:, 1:].transpose(1, 2).reshape(2, D, g, g)
        for m, p, stem in ((m4, p4, m4.adapter_spm.stem), (m2, p2, m2.adapter_spm.stem[:-1])):
            s = m.cfg.pyramid_sizes[0]
            want = (m.adapter_spm.fc1(stem(spm_in))
                    + torch.nn.functional.interpolate(vit_map, size=(s, s), mode="bilinear", align_corners=False)
                    + mmfs.pos_embed_2d(D, g, s, s).T.reshape(1, D, s, s).double())
            torch.testing.assert_close(p[0], want, rtol=1e-6, atol=1e-6)  # pos table is float32
    with pytest.raises(ValueError, match="c1_stride"):
        ViTAdapter(dataclasses.replace(cfg4, c1_stride=3))


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    m = ViTAdapter(PRESETS["tiny"])
    with torch.no_grad():  # the zero inits block some gradients by design (γ = 0, query-independent DETR init)
        for b in m.adapter_interactions:
            b.injector.gamma.fill_(0.1)
        for name, p in m.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                p.normal_(std=0.1)
    tokens, pyramid = m(torch.rand(2, 3, 32, 32))
    (tokens.square().mean() + sum(p.square().mean() for p in pyramid)).backward()
    dead = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert dead == []
    assert not m.post_layernorm.weight.requires_grad  # unused by the adapter, so frozen


@settings(deadline=None, max_examples=10)
@given(h=st.integers(1, 6), w=st.integers(1, 6), heads=st.sampled_from([1, 2]), points=st.integers(1, 3))
def test_deformable_attention_reads_the_reference_cell(h, w, heads, points):
    """Zero offsets at a pixel centre read exactly that cell (catches (x, y) / (W, H) mix-ups on non-square maps)."""
    torch.manual_seed(h * 7 + w)
    attn = MSDeformAttn(8, 1, heads, points, ratio=1.0).double()
    attn.reset_parameters()
    torch.nn.init.zeros_(attn.sampling_offsets.bias)
    value = torch.randn(2, h * w, 8, dtype=torch.float64)
    idx = torch.stack([torch.randint(0, w, (5,)), torch.randint(0, h, (5,))], -1)  # (x, y) cells
    ref = (idx.double() + 0.5) / torch.tensor([w, h], dtype=torch.float64)
    query = torch.randn(2, 5, 8, dtype=torch.float64)
    out = attn(query, ref, value, [(h, w)])
    expected = attn.output_proj(attn.value_proj(value[:, idx[:, 1] * w + idx[:, 0]]))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # an offset of one pixel in x (then in y) reads the next cell along that axis: offsets are (x, y) in pixels
    for axis, (dx, dy) in enumerate(((1.0, 0.0), (0.0, 1.0))):
        with torch.no_grad():
            attn.sampling_offsets.bias.copy_(torch.tensor([dx, dy], dtype=torch.float64).repeat(heads * points))
        ok = idx[:, axis] < (w, h)[axis] - 1                                            # the next cell exists
        out = attn(query, ref, value, [(h, w)])[:, ok]
        cell = (idx[ok, 1] + int(dy)) * w + idx[ok, 0] + int(dx)
        expected = attn.output_proj(attn.value_proj(value[:, cell]))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_reference_centres_are_xy_row_major():
    from vit import centres
    got = centres([(2, 3), (1, 1)], "cpu", torch.float64)                               # (2·3 + 1, 2)
    want = torch.tensor([[1 / 6, .25], [.5, .25], [5 / 6, .25], [1 / 6, .75], [.5, .75], [5 / 6, .75], [.5, .5]],
                        dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_detr_init_of_the_sampling_offsets():
    attn = MSDeformAttn(16, 3, 4, 2, ratio=0.5)
    attn.reset_parameters()
    bias = attn.sampling_offsets.bias.view(4, 3, 2, 2)  # (heads, levels, points, xy)
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, :, 1], 2 * bias[:, :, 0])  # point p sits at radius p + 1
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_checkpoint_without_vision_keys(tmp_path):
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 2)}, tmp_path / "model.safetensors")
    with pytest.raises(weights.WeightsError, match="no CLIP vision keys"):
        ViT.from_pretrained(tmp_path)


def test_mis_shaped_tensor(tmp_path):
    _, path = hf_vision(tmp_path)
    state = load_file(path / "model.safetensors")
    state["encoder.layers.1.mlp.fc2.weight"] = torch.zeros(32, 65)
    save_file(state, path / "model.safetensors")
    with pytest.raises(weights.WeightsError, match=r"mis-shaped keys: encoder\.layers\.1\.mlp\.fc2\.weight"):
        ViT.from_pretrained(path)


def test_config_json_contradicting_the_weights(tmp_path):
    _, path = hf_vision(tmp_path)
    js = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**js, "hidden_size": 64}))
    with pytest.raises(weights.WeightsError, match="hidden_size = 64 but the weights have 32"):
        ViT.from_pretrained(path)


def test_truncated_file(tmp_path):
    _, path = hf_vision(tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(weights.WeightsError, match="truncated"):
        ViT.from_pretrained(path)


@pytest.mark.parametrize("shape", [(2, 3, 28, 32), (2, 1, 32, 32), (3, 32, 32)])
def test_pixels_of_the_wrong_shape(shape):
    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match=r"pixels must be \(B, 3, 32, 32\), got " + str(shape).replace("(", r"\(")
                       .replace(")", r"\)")):
        ViT(cfg)(torch.zeros(shape))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 32, 32\)"):
        ViTAdapter(cfg)(torch.zeros(shape))


def test_bad_interaction_indexes():
    with pytest.raises(ValueError, match="interaction_indexes must be 4 consecutive runs"):
        ViTAdapter(ViTConfig(**{**vars(PRESETS["tiny"]), "interaction_indexes": ((0, 0), (1, 1), (3, 3), (2, 2))}))
