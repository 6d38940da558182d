"""The bench scripts' CPU helpers run (no timing is asserted): bench_mmfs.py once lost its CPU path's functions when
its CUDA path was added, and nothing noticed until it was next run. probe_features.py's fit and sampling are checked
against what they claim to compute, and its --parts maps are laid out as the image is;
probe_caption_paths.py's switches remove exactly the MMFS blocks, its weight shares are shares, and its pins move
one block's points at the given states only. probe_caption_check.py runs end to end and no pick beats its bound."""
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import model as M
import vit as vit_lib
from bench.bench_mmfs import MASKED_LLM, fused_reading_all, make_inputs, measure_in_subprocess
from bench.probe_caption_paths import gates_off, level_shares, mmfs_blocks, pinned, shape_positions, shape_reads
from bench.probe_features import adapter_parts, first_frames, linear_probe, object_features
from kernels.msda import msda_fused


def test_bench_mmfs_memory_and_first_call_helpers_run():
    # each in a fresh process, as bench_mmfs.py itself runs them; a failing subprocess raises CalledProcessError
    peak, result_bytes = measure_in_subprocess("--memory", "tiny", "fused", "fwd+bwd")
    # tiny: out (1, 16, 16) float32, its upstream gradient, and the gradients of value, locations, weights
    assert result_bytes == 4 * (2 * 16 * 16 + 20 * 2 * 8 + 16 * 2 * 2 * 4 * 2 + 16 * 2 * 2 * 4)
    assert peak >= 0
    assert isinstance(measure_in_subprocess("--first-call"), float)


def test_the_read_all_variant_reads_the_masked_samples_and_gives_the_same_output():
    """bench_mmfs's "0s read" column must time the same sum with nothing skipped: its weights are the masked ones
    raised from 0 to 1e-30, so its output equals the fused kernel's to float32 rounding."""
    value, maps, starts, loc, attn = make_inputs("small-llm")
    zero = (attn == 0).double().mean().item()
    assert abs(zero - MASKED_LLM) < 0.02  # whole (query, image) pairs masked, at the stated fraction
    torch.testing.assert_close(fused_reading_all(value, maps, starts, loc, attn),
                               msda_fused(value, maps, starts, loc, attn), rtol=1e-5, atol=1e-6)


def test_linear_probe_reads_a_linear_label_and_not_noise():
    """probe_features.py's fit: near-perfect where the label is one linear read of the features, near chance (1/3)
    where the label is independent of them; fitted on two rows in three, scored on the third."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g, dtype=torch.float64)
    test = torch.arange(600) % 3 == 0
    linear = (x @ torch.randn(8, 3, generator=g, dtype=torch.float64)).argmax(1)
    noise = torch.randint(0, 3, (600,), generator=g)
    assert linear_probe(x, linear, test, 3) > 0.95
    assert linear_probe(x, noise, test, 3) < 0.45


def test_probe_features_samples_each_level_at_the_object_centroid(tiny_checkpoint):
    """The feature of an object is its pyramid maps bilinearly interpolated at its centroid, pixel centres at
    (j + 0.5) * S / s: checked by hand-written interpolation against grid_sample's convention."""
    net, _ = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    stories = [data.make_story("eval", 0, i, net.cfg.image_size) for i in range(3)]
    feats, shape, colour, frame, sides = object_features(net, stories)
    assert len(shape) == sum(len(s.objects[0]) for s in stories) and feats.shape[:2] == (len(shape), len(sides))
    assert torch.isfinite(feats).all()
    with torch.no_grad():
        _, pyramid = net.encode_images(torch.stack([data.to_tensor(s.images[0]) for s in stories]))
    S = net.cfg.image_size
    k = int((frame == 2).nonzero()[0])  # the first object of the third frame
    o = stories[2].objects[0][0]
    assert (shape[k], colour[k]) == (data.SHAPES.index(o.shape), data.COLOURS.index(o.colour))
    for j, p in enumerate(pyramid):
        s = p.shape[-1]
        u, v = o.x * s / S - 0.5, o.y * s / S - 0.5  # continuous map coordinates, 0 = the first pixel's centre
        x0, y0 = int(u // 1), int(v // 1)
        want = 0
        for yy, wy in ((y0, 1 - (v - y0)), (y0 + 1, v - y0)):
            for xx, wx in ((x0, 1 - (u - x0)), (x0 + 1, u - x0)):
                if 0 <= xx < s and 0 <= yy < s:  # outside the map: zeros (grid_sample's padding)
                    want = want + wy * wx * p[2, :, yy, xx].double()
        torch.testing.assert_close(feats[k, j], want, rtol=1e-5, atol=1e-5)


def test_adapter_parts_are_the_spm_maps_and_the_vit_token_maps_in_row_major_order(tiny_checkpoint):
    """probe_features.py --parts: each caught map is laid out as the image is (row r, column c of a map is token
    r·s + c), checked against the spatial prior module run by hand and against the tokens the ViT returns."""
    net, _ = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    cfg = net.cfg.vit
    frames = first_frames([data.make_story("eval", 0, i, net.cfg.image_size) for i in range(3)])
    parts = adapter_parts(net, frames)
    runs, g, sides = cfg.runs, cfg.grid, cfg.pyramid_sizes
    assert sorted(parts) == sorted([f"SPM {s}x{s}" for s in sides] + [f"ViT layers {a}-{b} {g}x{g}" for a, b in runs])
    with torch.no_grad():
        spm_in = F.interpolate(vit_lib.normalize(frames), size=(cfg.spm_size, cfg.spm_size), mode="bilinear",
                               align_corners=False)
        c1, tokens = net.vit.adapter_spm(spm_in)
        last, _ = net.vit(frames)                                                    # (3, 1+g², D)
    torch.testing.assert_close(parts[f"SPM {sides[0]}x{sides[0]}"], c1)
    for t, s in zip(tokens, sides[1:]):
        m = parts[f"SPM {s}x{s}"]
        assert m.shape == (3, cfg.hidden_size, s, s)
        torch.testing.assert_close(m[1, :, s - 1, 0], t[1, (s - 1) * s])  # bottom-left cell = token (s-1)·s
    a, b = runs[-1]
    vit_map = parts[f"ViT layers {a}-{b} {g}x{g}"]
    torch.testing.assert_close(vit_map[2, :, 0, g - 1], last[2, 1 + g - 1])  # top-right cell = token g-1 after CLS
    torch.testing.assert_close(vit_map.flatten(2).transpose(1, 2), last[:, 1:])


def test_gates_off_removes_exactly_the_llm_mmfs_blocks_and_restores_them(tiny_checkpoint):
    """probe_caption_paths.py: with a block's gate at 0 the LLM's states no longer depend on the pyramid (only the
    MMFS blocks read it); with the gates on they do; the gates come back on exit."""
    net, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    story = data.make_story("eval", 0, 0, net.cfg.image_size)
    tokens = torch.tensor([[tok.bos_id] + tok.image_tokens(net.cfg.num_image_tokens)
                           + tok.encode(story.sentences[0], bos=False)])
    images = data.to_tensor(story.images[0])[None]
    blocks = mmfs_blocks(net)
    assert len(blocks) == net.cfg.llm.n_layers  # the tiny LLM has a block in every layer
    for b in blocks:
        b.gate.data.fill_(0.5)  # a two-step checkpoint's gates are still near 0
    encode = net.encode_images

    def states(shift):  # the LLM's states with every pyramid map shifted by `shift`, the visual tokens unchanged
        visual, pyramid = encode(images)
        net.encode_images = lambda im: (visual, [p + shift for p in pyramid])
        try:
            return net.hidden_states(tokens, images, torch.tensor([1]))[0]
        finally:
            del net.encode_images

    with torch.no_grad():
        on = states(0.0), states(1.0)
        with gates_off(net, range(len(blocks))):
            off = states(0.0), states(1.0)
        with gates_off(net, [0]):
            one_off = states(0.0), states(1.0)
    assert (on[0] - on[1]).abs().max() > 1e-4
    assert (one_off[0] - one_off[1]).abs().max() > 1e-4  # the other blocks still read
    torch.testing.assert_close(off[0], off[1], rtol=0, atol=0)
    assert [b.gate.item() for b in blocks] == [0.5] * len(blocks)


def test_level_shares_are_per_head_shares_of_the_decoding_steps(tiny_checkpoint):
    net, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    stories = [data.make_story("eval", 0, i, net.cfg.image_size) for i in range(2)]
    prompt = torch.tensor([[tok.bos_id] + tok.image_tokens(net.cfg.num_image_tokens)] * 2)
    images = torch.stack([data.to_tensor(s.images[0]) for s in stories])
    with torch.no_grad(), level_shares(net) as shares:
        net.generate_text(prompt, images, max_new_tokens=3)
    cfg = net.cfg.llm
    assert sorted(shares) == list(range(len(mmfs_blocks(net))))
    for w in shares.values():
        assert w.shape == (cfg.mmfs_heads, len(cfg.mmfs_levels) + 1) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(cfg.mmfs_heads, dtype=w.dtype))
    assert not any("sampling" in vars(b.attn) for b in mmfs_blocks(net))  # the class's method again on exit


def test_pinned_moves_one_blocks_points_at_the_given_states_only(tiny_checkpoint):
    """probe_caption_paths.py: shape_positions finds the states whose next word is an object's shape; pinning the
    last block there puts all its points on the target, changes the LLM's state there and none before it (the LLM
    is causal), and the patch goes on exit."""
    net, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    K, size = net.cfg.num_image_tokens, net.cfg.image_size
    blocks = mmfs_blocks(net)
    for b in blocks:
        b.gate.data.fill_(0.5)  # a two-step checkpoint's gates are still near 0
    stories = [data.make_story("eval", 0, i, size) for i in range(8)]
    story, (ids, found) = next((s, f) for s in stories if len((f := shape_positions(tok, s, K))[1]) >= 2)
    for pos, obj, cand, true in found:  # the words after each state begin with its object's shape
        assert tok.decode(ids[pos + 1:].tolist()).strip().startswith(obj.shape)
        assert int(cand[true]) == int(ids[pos + 1])
    pos = found[1][0]
    image = data.to_tensor(story.images[0])[None]
    attn = blocks[-1].attn
    caught = {}
    hook = attn.register_forward_pre_hook(lambda m, a: caught.setdefault("args", a))
    with torch.no_grad():
        base = net.hidden_states(ids[None], image, [1])[0][0]                            # (T, dim)
        with pinned(net, len(blocks) - 1, {pos: (0.1, 0.9)}):
            moved = net.hidden_states(ids[None], image, [1])[0][0]
            q, ref, _, mask = caught["args"]
            loc = attn.sampling(q, ref, mask.bool())[0]                                   # (1, T, M, n·L, P, 2)
    hook.remove()
    torch.testing.assert_close(loc[:, pos], torch.tensor([0.1, 0.9]).expand_as(loc[:, pos]), rtol=0, atol=0)
    assert not torch.equal(loc[:, pos - 1], loc[:, pos])
    torch.testing.assert_close(moved[:pos], base[:pos], rtol=0, atol=0)
    assert (moved[pos] - base[pos]).abs().max() > 1e-5
    assert "sampling" not in vars(attn)
    reads, count = shape_reads(net, tok, stories)
    assert count >= len(found) and set(reads) == {"as trained", "on the object", "on another object"}
    assert all(0 <= r <= 1 for r in reads.values())


def test_probe_caption_check_prints_a_row_per_weight_under_its_bound(tiny_checkpoint):
    """probe_caption_check.py end to end on the tiny checkpoint: one row per weight, then the greedy caption and the
    bound; no pick of the same candidates names more objects right than the bound, and a bad weight is refused."""
    script = Path(__file__).resolve().parent.parent / "bench" / "probe_caption_check.py"
    r = subprocess.run([sys.executable, str(script), "--checkpoint", str(tiny_checkpoint), "--n", "3", "--samples",
                        "2", "--levels", "2", "--draws", "1", "--weights", "0,1,inf"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {m[0]: float(m[1]) for m in re.findall(r"^\s*(\S+)\s+([\d.]+)%", r.stdout, re.M)}
    assert set(rows) == {"0", "1", "inf", "greedy", "bound"}, r.stdout
    assert all(v <= rows["bound"] for v in rows.values())
    bad = subprocess.run([sys.executable, str(script), "--weights", "1,x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--weights '1,x'" in bad.stderr
