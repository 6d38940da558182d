"""MMFS: the authors' maths (checked against a literal per-query loop), masks, sinks, relative index, backends."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mmfs
from mmfs import MMFS, msda, msda_reference, pos_embed_2d, sincos_1d, sincos_2d



@pytest.fixture(autouse=True)
def float64_default():
    """Every tensor and module here is float64 (restored afterwards, so other test files keep float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def make(levels=((4, 4), (2, 3)), n_heads=2, n_points=3, d_model=12, d_value=10, ratio=0.5, base=4, max_img=6,
         seed=0, randomize=True):
    """A small MMFS in float64; `randomize` replaces the zero inits so every term of the maths is exercised."""
    torch.manual_seed(seed)
    m = MMFS(d_model, len(levels), n_heads, n_points, list(levels), base, d_value=d_value, d_out=7, ratio=ratio,
             offset_init_magnitude=2.0, max_num_image_per_seq=max_img)
    if randomize:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
    return m


def inputs(m, B=2, Lq=5, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in m.spatial_shapes)
    query = torch.randn(B, Lq, m.d_query, generator=g)
    ref = torch.rand(B, Lq, 2, generator=g)
    value = torch.randn(B, n, S, m.d_value, generator=g)
    mask = torch.rand(B, Lq, n, generator=g) < 0.6
    return query, ref, value, mask


def bilinear(vmap, x, y):
    """Sample a (H, W, C) map at normalised (x, y): pixel = loc·size − 0.5, corners outside read 0 (reference §1.4)."""
    H, W, C = vmap.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = vmap.new_zeros(C)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out = out + wy * wx * vmap[yy, xx]
    return out


def literal_mmfs(m, query, ref, value, mask):
    """The official computation spelled out per (batch, query, head): repeated query, per-image linears, sinks."""
    B, Lq, _ = query.shape
    n = value.shape[1]
    M, L, P, D = m.n_heads, m.n_levels, m.n_points, m.dv // m.n_heads
    v = m.value_proj(value)                                                     # (B, n, S, dv)
    out = torch.zeros(B, Lq, m.dv)
    for b in range(B):
        for t in range(Lq):
            visible = [i for i in range(n) if mask[b, t, i]]
            rel = {i: len(visible) - k for k, i in enumerate(visible)}          # most recent visible = 1
            q_n = [m.dynamic_offset_mask(query[b, t]) + m.query_relpos.weight[rel.get(i, 0)] for i in range(n)]
            for h in range(M):
                logits, samples = [], []
                for i in range(n):
                    off = m.sampling_offsets(q_n[i]).view(M, P, 2)[h]             # (P, 2)
                    lg = m.attention_weights(q_n[i]).view(M, L, P + 1)[h]         # (L, P+1)
                    start = 0
                    for lvl, (H, W) in enumerate(m.spatial_shapes):
                        vmap = v[b, i, start:start + H * W, h * D:(h + 1) * D].reshape(H, W, D)
                        start += H * W
                        for p in range(P):
                            x = ref[b, t, 0] + off[p, 0] * (W / m.base[1]) / W
                            y = ref[b, t, 1] + off[p, 1] * (H / m.base[0]) / H
                            logits.append(lg[lvl, p] + (0.0 if mask[b, t, i] else -10000.0))
                            samples.append(bilinear(vmap, float(x), float(y)))
                        logits.append(torch.tensor(-math.log(n * L)))           # the sink slot, value 0
                        samples.append(torch.zeros(D))
                w = torch.stack(logits).softmax(0)
                out[b, t, h * D:(h + 1) * D] = (w[:, None] * torch.stack(samples)).sum(0)
    return m.output_proj(out)


@settings(deadline=None, max_examples=6)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 3), two_d=st.booleans())
def test_matches_literal_official_computation(seed, n, two_d):
    m = make(seed=seed)
    query, ref, value, mask = inputs(m, B=2, Lq=3, n=n, seed=seed + 1)
    if two_d:
        mask2 = mask[:, 0]
        got, mask = m(query, ref, value, mask2), mask2[:, None, :].expand_as(mask)
    else:
        got = m(query, ref, value, mask)
    with torch.no_grad():
        want = literal_mmfs(m, query, ref, value, mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_hidden_image_does_not_change_output():
    m = make()
    query, ref, value, mask = inputs(m, n=3)
    mask[:, :, 1] = False
    mask[0, 2, 1] = True  # only query 2 of batch row 0 sees image 1
    out = m(query, ref, value, mask)
    value2 = value.clone()
    value2[:, 1] = torch.randn_like(value2[:, 1]) * 10
    out2 = m(query, ref, value2, mask)
    changed = (out - out2).abs().amax(-1) > 1e-9                               # (B, Lq)
    expect = torch.zeros_like(changed)
    expect[0, 2] = True
    assert torch.equal(changed, expect)


def test_masked_padding_slots_change_nothing():
    m = make()
    query, ref, value, mask = inputs(m, n=2)
    padded_value = torch.cat([value, torch.randn(2, 3, *value.shape[2:])], dim=1)   # 3 padded slots of junk
    padded_mask = torch.cat([mask, torch.zeros(2, mask.shape[1], 3, dtype=torch.bool)], dim=2)
    torch.testing.assert_close(m(query, ref, padded_value, padded_mask), m(query, ref, value, mask),
                               rtol=1e-12, atol=1e-12)


def test_all_masked_gives_output_bias():
    m = make()
    query, ref, value, mask = inputs(m, n=3)
    out = m(query, ref, value, torch.zeros_like(mask))
    assert torch.equal(out, m.output_proj.bias.expand_as(out))
    out0 = m(query, ref, value[:, :0], mask[:, :, :0])  # no image slots at all
    assert torch.equal(out0, m.output_proj.bias.expand_as(out0))


@pytest.mark.parametrize("two_d", [False, True])
def test_rows_that_see_no_image_are_left_out_of_sampling(two_d):
    """Rows 1 and 3 of four see no image (a UNet frame opening its story): the module samples only rows 0 and 2 and
    gives the others output_proj(ignore_token). Output and every gradient must equal two separate calls: one on the
    seeing rows alone and one on the blind rows alone (which computes them in full: no row there sees anything)."""
    m = make()
    query, ref, value, mask = inputs(m, B=4, n=3)
    mask = mask[:, 0] if two_d else mask
    mask[1] = False
    mask[3] = False
    mask[0, ..., 0] = True  # rows 0 and 2 see at least one image
    mask[2, ..., 2] = True
    grad_out = torch.randn(4, query.shape[1], 7, generator=torch.Generator().manual_seed(3))

    def run(rows):
        m.zero_grad()
        leaves = [t[rows].clone().requires_grad_() for t in (query, ref, value)]
        out = m(leaves[0], leaves[1], leaves[2], mask[rows])
        out.backward(grad_out[rows])
        return out.detach(), [t.grad for t in leaves], {k: p.grad.clone() for k, p in m.named_parameters()}

    sampled = []  # batch sizes that reach the sampling
    sampling = m.sampling
    m.sampling = lambda q, *rest: sampled.append(q.shape[0]) or sampling(q, *rest)
    out, grads, params = run([0, 1, 2, 3])
    assert sampled == [2]
    out_a, grads_a, params_a = run([0, 2])
    out_b, grads_b, params_b = run([1, 3])
    torch.testing.assert_close(out[[0, 2]], out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[[1, 3]], out_b, rtol=0, atol=0)
    assert torch.equal(out[1], m.output_proj.bias.expand_as(out[1]))
    for g, ga, gb in zip(grads, grads_a, grads_b):
        torch.testing.assert_close(g[[0, 2]], ga, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g[[1, 3]], gb, rtol=0, atol=0)
    for k in params:
        torch.testing.assert_close(params[k], params_a[k] + params_b[k], rtol=1e-12, atol=1e-12, msg=k)
    assert params["sampling_offsets.weight"].abs().max() > 0  # the seeing rows train the sampling


def test_relative_index():
    m = make()
    mask = torch.tensor([[[1, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]], dtype=torch.bool)
    assert m.relative_index(mask).tolist() == [[[3, 2, 1, 0, 0], [3, 0, 2, 1, 0], [0, 0, 0, 0, 0]]]
    with pytest.raises(ValueError, match="max_num_image_per_seq"):
        m.relative_index(torch.ones(1, 1, 6, dtype=torch.bool))


def test_pre_projected_values_give_the_same_output():
    m = make()
    query, ref, value, mask = inputs(m, n=2)
    with torch.no_grad():
        projected = m.value_proj(value)                                         # (B, n, S, dv)
    torch.testing.assert_close(m(query, ref, projected, mask, value_projected=True), m(query, ref, value, mask),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="value must be"):
        m(query, ref, value, mask, value_projected=True)  # raw features where projected ones are expected


def test_init_matches_authors():
    m = MMFS(16, 3, 2, 4, [8, 4, 2], 4, d_value=8, offset_init_magnitude=3.0)
    assert torch.equal(m.sampling_offsets.weight, torch.zeros_like(m.sampling_offsets.weight))
    assert m.sampling_offsets.bias.abs().max() <= 3.0 and m.sampling_offsets.bias.std() > 0.5
    for b in (m.attention_weights.bias, m.value_proj.bias, m.output_proj.bias, m.dynamic_offset_mask.bias):
        assert torch.equal(b, torch.zeros_like(b))
    assert m.attention_weights.weight.abs().sum() > 0  # left as nn.Linear made it
    assert "ignore_token" in m.state_dict() and not m.ignore_token.requires_grad


def test_sink_shrinks_total_weight():
    """With uniform logits the n·L·P sample weights sum to n·L·P / (n·L·P + 1): the sink keeps one share."""
    m = make(randomize=False)
    with torch.no_grad():
        m.attention_weights.weight.zero_()
        m.value_proj.weight.zero_()
        m.value_proj.bias.fill_(1.0)  # every sample reads 1 (if inside the map)
        m.output_proj.weight.copy_(torch.eye(7, m.dv))
        m.sampling_offsets.bias.zero_()
    query, ref, value, mask = inputs(m, n=2)
    out = m(query, torch.full_like(ref, 0.5), value, torch.ones_like(mask))
    k = 2 * m.n_levels * m.n_points
    torch.testing.assert_close(out[..., :m.dv], torch.full_like(out[..., :m.dv], k / (k + 1)))


def test_backends_agree_on_output_and_gradients(monkeypatch):
    m = make()
    query, ref, value, mask = inputs(m, n=3)
    results = []
    for backend in ("reference", "fused"):
        monkeypatch.setattr(mmfs, "BACKEND", backend)
        m.zero_grad()
        q, v = query.clone().requires_grad_(), value.clone().requires_grad_()
        out = m(q, ref, v, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), q.grad, v.grad] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_msda_reference_matches_literal_bilinear():
    g = torch.Generator().manual_seed(3)
    shapes = torch.tensor([[3, 5], [1, 1], [2, 4]])
    starts = torch.tensor([0, 15, 16])
    value = torch.randn(1, 24, 2, 3, generator=g)
    loc = torch.rand(1, 4, 2, 3, 2, 2, generator=g) * 1.4 - 0.2  # inside and outside [0, 1]
    w = torch.rand(1, 4, 2, 3, 2, generator=g)
    out = msda_reference(value, shapes, starts, loc, w)
    for q in range(4):
        for h in range(2):
            want = torch.zeros(3)
            for lvl, ((H, W), s) in enumerate(zip(shapes.tolist(), starts.tolist())):
                vmap = value[0, s:s + H * W, h].reshape(H, W, 3)
                for p in range(2):
                    x, y = loc[0, q, h, lvl, p].tolist()
                    want += w[0, q, h, lvl, p] * bilinear(vmap, x, y)
            torch.testing.assert_close(out[0, q, h * 3:(h + 1) * 3], want, rtol=1e-12, atol=1e-12)


def test_msda_dispatch_and_bad_input(monkeypatch):
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    value, loc, w = torch.randn(1, 4, 1, 2), torch.rand(1, 3, 1, 1, 2, 2), torch.rand(1, 3, 1, 1, 2)
    monkeypatch.setattr(mmfs, "BACKEND", "bogus")
    with pytest.raises(ValueError, match="BACKEND"):
        msda(value, shapes, starts, loc, w)
    monkeypatch.setattr(mmfs, "BACKEND", "auto")
    with pytest.raises(ValueError, match="value"):
        msda(torch.randn(1, 5, 1, 2), shapes, starts, loc, w)  # 5 != 2·2


def test_module_bad_input():
    m = make()
    query, ref, value, mask = inputs(m, n=2)
    with pytest.raises(ValueError, match="value must be"):
        m(query, ref, value[:, :, :-1], mask)
    with pytest.raises(ValueError, match="image_mask must be"):
        m(query, ref, value, mask[:, :-1])
    with pytest.raises(ValueError, match="divisible"):
        MMFS(10, 1, 3, 2, [4], 4)


def test_position_tables():
    t = sincos_2d(8, 3, 4)                                                      # (12, 8)
    rows = torch.arange(12) // 4
    torch.testing.assert_close(t[:, 0], torch.sin(rows.double()).float())       # first half: the row
    torch.testing.assert_close(t[:, 4 + 1], torch.sin((torch.arange(12) % 4) * 0.01).float())  # second: column
    torch.testing.assert_close(sincos_1d(6, 5)[:, 3], torch.arange(5).double().cos().float())  # cos(p·w_0)
    assert torch.equal(pos_embed_2d(8, 4, 4, 4), sincos_2d(8, 4, 4))
    assert pos_embed_2d(8, 4, 2, 6).shape == (12, 8)


def test_sampling_is_where_forward_reads():
    """MMFS.sampling (what bench/probe_visual.py inspects) gives the very points and weights forward() samples with,
    and a location is the reference point plus (W_dyn·q + relpos) offsets in cells of the base grid."""
    m = make()
    query, ref, value, mask = inputs(m)
    B, Lq, n = mask.shape
    M, L, P, D = m.n_heads, m.n_levels, m.n_points, m.dv // m.n_heads
    loc, w, w_sink = m.sampling(query, ref, mask)
    assert loc.shape == (B, Lq, M, n * L, P, 2) and w.shape == (B, Lq, M, n * L, P)
    assert w_sink.shape == (B, Lq, M, n * L)
    torch.testing.assert_close(w.sum((-1, -2)) + w_sink.sum(-1), torch.ones(B, Lq, M))  # one softmax per head
    shapes = torch.tensor(m.spatial_shapes * n)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    v = m.value_proj(value).reshape(B, n * value.shape[2], M, D)
    out = m.output_proj(msda_reference(v, shapes, starts, loc, w))  # the sink reads the zero ignore_token
    torch.testing.assert_close(out, m(query, ref, value, mask), atol=1e-12, rtol=0)
    b, t, h, i, p = 1, 3, 1, 2, 0  # one point by hand: image 2 of row 1, as query 3 sees it
    rel = int(m.relative_index(mask)[b, t, i])
    off = m.sampling_offsets(m.dynamic_offset_mask(query[b, t]) + m.query_relpos.weight[rel]).view(M, P, 2)[h, p]
    for lvl in range(L):  # the same normalised point at every level
        torch.testing.assert_close(loc[b, t, h, i * L + lvl, p], ref[b, t] + off / torch.tensor(m.base[::-1]))
