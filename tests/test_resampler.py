"""resampler.py: parity with transformers' Blip2QFormerModel, BLIP-2 checkpoints, masks, q/k-norm, bad input."""
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import weights
from resampler import PRESETS, Resampler, ResamplerConfig

transformers = pytest.importorskip("transformers")

HF = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=24,
          cross_attention_frequency=2)


def hf_qformer(tmp_path, **kw):
    """A tiny random Blip2QFormerModel saved with safe_serialization; returns (model, directory)."""
    torch.manual_seed(0)
    model = transformers.Blip2QFormerModel(transformers.Blip2QFormerConfig(**{**HF, **kw})).eval()
    model.save_pretrained(tmp_path / "qformer", safe_serialization=True)
    return model, tmp_path / "qformer"


def inputs(B=3, N=7, E=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    enc = torch.randn(B, N, E, generator=g, dtype=dtype)
    mask = torch.ones(B, N, dtype=torch.long)
    mask[1, 4:] = 0  # one padded row
    return enc, mask


def compare(hf, ours, queries):
    hf, ours = hf.double(), ours.double()
    enc, mask = inputs()
    with torch.no_grad():
        ref = hf(query_embeds=queries.double().expand(3, -1, -1), encoder_hidden_states=enc,
                 encoder_attention_mask=mask).last_hidden_state
        out = ours(enc, mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # float64: same maths, rounding only


@pytest.mark.parametrize("text_input", [False, True])  # with the text path its keys exist and are ignored
def test_qformer_parity(tmp_path, text_input):
    hf, path = hf_qformer(tmp_path, use_qformer_text_input=text_input)
    ours = Resampler.from_pretrained(path, num_queries=5).eval()
    assert (ours.cfg.num_hidden_layers, ours.cfg.cross_attention_frequency, ours.cfg.encoder_hidden_size) == (3, 2, 24)
    assert ours.cfg.output_size is None and not ours.cfg.qk_normalization
    queries = torch.randn(1, 5, 32)
    ours.query_tokens.data.copy_(queries)
    compare(hf, ours, queries)


def test_blip2_checkpoint_layout(tmp_path):
    """`qformer.*` plus `query_tokens` (as in Blip2ForConditionalGeneration); other parts are ignored."""
    hf, path = hf_qformer(tmp_path, cross_attention_frequency=1)
    queries = torch.randn(1, 4, 32)
    state = {f"qformer.{k}": v for k, v in load_file(path / "model.safetensors").items()}
    state.update({"query_tokens": queries, "language_projection.weight": torch.zeros(3, 32),
                  "vision_model.embeddings.class_embedding": torch.zeros(24)})
    (tmp_path / "blip2").mkdir()
    save_file(state, tmp_path / "blip2" / "model.safetensors")
    # a Blip2Config nests the Q-Former's config; its heads (4, not the 64-per-head guess 1) must be read from it
    (tmp_path / "blip2" / "config.json").write_text(json.dumps({"num_query_tokens": 4, "qformer_config": HF}))
    ours = Resampler.from_pretrained(tmp_path / "blip2", output_size=40).eval()
    assert ours.cfg.num_queries == 4 and ours.cfg.cross_attention_frequency == 1
    assert ours.proj.weight.shape == (40, 32) and ours.proj.weight.std() < 0.01  # our fresh proj, init std 1e-3
    torch.testing.assert_close(ours.query_tokens, queries)
    ours.proj = None
    compare(hf, ours, queries)


@settings(deadline=None, max_examples=5)
@given(n_valid=st.integers(1, 6), n_pad=st.integers(1, 4))
def test_padding_is_invisible(n_valid, n_pad):
    """Outputs do not depend on padded inputs, and equal the outputs on the unpadded sequence."""
    torch.manual_seed(0)
    m = Resampler(PRESETS["tiny"]).double().eval()
    enc = torch.randn(2, n_valid + n_pad, 32, dtype=torch.float64)
    mask = torch.cat([torch.ones(2, n_valid), torch.zeros(2, n_pad)], 1)
    out = m(enc, mask)
    enc2 = enc.clone()
    enc2[:, n_valid:] = 1e3 * torch.randn(2, n_pad, 32, dtype=torch.float64)
    torch.testing.assert_close(m(enc2, mask), out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m(enc[:, :n_valid]), out, rtol=1e-10, atol=1e-10)


def test_fully_masked_input_stays_finite():
    m = Resampler(PRESETS["tiny"]).eval()
    out = m(torch.randn(2, 3, 32), torch.zeros(2, 3))
    assert torch.isfinite(out).all()


def test_qk_norm_makes_attention_scale_invariant():
    """LayerNorm on q and k: scaling the q/k projections leaves the output unchanged; without it, it does not."""
    enc = torch.randn(2, 5, 32, dtype=torch.float64)
    outs = {}
    for qk in (True, False):
        torch.manual_seed(0)
        cfg = ResamplerConfig(**{**vars(PRESETS["tiny"]), "qk_normalization": qk, "output_size": None})
        m = Resampler(cfg).double().eval()
        before = m(enc)
        with torch.no_grad():
            for name, lin in m.named_modules():
                if name.endswith(("attention.attention.query", "crossattention.attention.key")):
                    lin.weight.mul_(30.0)
                    lin.bias.mul_(30.0)
        outs[qk] = (before, m(enc))
    torch.testing.assert_close(outs[True][1], outs[True][0], rtol=1e-9, atol=1e-9)
    assert (outs[False][1] - outs[False][0]).abs().max() > 1e-2
    assert "encoder.layer.0.attention.attention.q_norm.weight" in Resampler(PRESETS["tiny"]).state_dict()


@pytest.mark.parametrize("preset", ["tiny", "tiny_decoder", "small", "small_decoder"])
def test_preset_shapes(preset):
    cfg = PRESETS[preset]
    out = Resampler(cfg)(torch.randn(2, 9, cfg.encoder_hidden_size), torch.ones(2, 9))
    assert out.shape == (2, cfg.num_queries, cfg.output_size or cfg.hidden_size) and torch.isfinite(out).all()


def test_paper_presets():
    with torch.device("meta"):
        vis, dec = Resampler(PRESETS["paper"]), Resampler(PRESETS["paper_decoder"])
    assert vis.proj.weight.shape == (5120, 768) and vis.query_tokens.shape == (1, 64, 768)
    assert [hasattr(layer, "crossattention") for layer in vis.encoder["layer"]] == [True, False] * 6
    assert dec.proj is None and dec.query_tokens.shape == (1, 77, 1024) and len(dec.encoder["layer"]) == 1
    assert dec.encoder["layer"][0].crossattention.attention.key.in_features == 5120


def test_dropout_is_active_in_training_only():
    m = Resampler(PRESETS["tiny"])  # dropout 0.1, as the paper's visual resampler
    enc = torch.randn(2, 5, 32)
    assert (m.train()(enc) - m(enc)).abs().max() > 0
    m.eval()
    torch.testing.assert_close(m(enc), m(enc), rtol=0, atol=0)


def test_bad_input(tmp_path):
    m = Resampler(PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(B, N, 32\), got \(2, 5, 31\)"):
        m(torch.randn(2, 5, 31))
    with pytest.raises(ValueError, match=r"encoder_mask must be \(B, N\) = \(2, 5\), got \(2, 4\)"):
        m(torch.randn(2, 5, 32), torch.ones(2, 4))
    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4)}, tmp_path / "x.safetensors")
    with pytest.raises(weights.WeightsError, match="no Q-Former keys"):
        Resampler.from_pretrained(tmp_path / "x.safetensors")


def test_mis_shaped_checkpoint(tmp_path):
    _, path = hf_qformer(tmp_path)
    state = load_file(path / "model.safetensors")
    state["encoder.layer.2.output_query.dense.weight"] = torch.zeros(32, 65)
    save_file(state, path / "model.safetensors")
    with pytest.raises(weights.WeightsError, match=r"mis-shaped keys: encoder\.layer\.2\.output_query\.dense\.weight"):
        Resampler.from_pretrained(path)
