"""MMInterleaved on hand-built sequences: labels, image bookkeeping, loss masking, causality, generation, checkpoints;
and data.py's tokenisation, packing and batch streams."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import data
import diffusion
import model as M
import vit as vit_lib
import weights

K = 8  # the tiny preset's visual tokens per image
VOCAB = 302
BOS, EOS, PAD, BOI, IMG = 1, 2, 3, VOCAB - 2, VOCAB - 1


def tiny(**overrides):
    cfg = M.preset("tiny", **overrides)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=VOCAB)
    torch.manual_seed(0)
    return M.MMInterleaved(cfg)


@pytest.fixture(scope="module")
def net():
    return tiny()


def unet_inputs(net, tokens, images, per_row, gens):
    """What forward gives the UNet, step by step (every draw of every image, before the CFG swap and the masks):
    the pyramid, each image's condition, x0, the draws (drop, t, noise), the previous image's MMFS features, mask."""
    h, pyramid = net.hidden_states(tokens, images, per_row)
    rows, cols, start, prev = net.image_index(tokens, per_row)
    cond, _ = net.image_condition(h, rows, cols, start)
    x0 = net.to_diffusion_space(images)
    drop, t, noise, _ = net.draws(x0, per_row, gens)
    feats, fmask = net.previous_features(pyramid, prev)
    return pyramid, cond, x0, drop, t, noise, feats, fmask


def image_run():
    return [BOI] + [IMG] * K


def batch_of(rows, seed=0):
    """Right-pad id rows; one random frame per <BoI>."""
    L = max(map(len, rows))
    tokens = torch.full((len(rows), L), PAD)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r)
    per_row = [r.count(BOI) for r in rows]
    g = torch.Generator().manual_seed(seed)
    return tokens, torch.rand(sum(per_row), 3, 32, 32, generator=g), per_row


def test_text_labels_mask_pad_image_bos_and_bos_boi(net):
    row = [BOS, BOI] + [IMG] * K + [10, 11, EOS, BOS, 12, BOI] + [IMG] * K + [EOS, PAD, PAD]
    labels = net.text_labels(torch.tensor([row]))[0].tolist()
    assert len(labels) == len(row) - 1
    for i, tgt in enumerate(row[1:]):
        prev = row[i]
        ignored = tgt in (PAD, IMG, BOS) or (prev == BOS and tgt == BOI)
        assert (labels[i] == -100) == ignored, (i, prev, tgt)
    assert labels.count(BOI) == 1 and labels.count(EOS) == 2  # <BoI> after text and </s> stay targets


def test_image_index_segments_and_previous_image(net):
    r0 = [BOS] + image_run() + [10] + image_run() + [EOS, BOS, 11] + image_run() + [EOS]
    r1 = [BOS, 12, 13] + image_run() + [14]
    tokens, _, per_row = batch_of([r0, r1])
    rows, cols, start, prev = net.image_index(tokens, per_row)
    assert rows.tolist() == [0, 0, 0, 1]
    assert cols.tolist() == [1, 11, 23, 3]
    assert start.tolist() == [0, 0, 21, 0]
    assert prev.tolist() == [-1, 0, -1, -1]  # image 2 opens a new <s> segment: it has no previous image
    with pytest.raises(ValueError, match="images_per_row"):
        net.image_index(tokens, [3, 2])


def test_context_is_reversed_segment_up_to_boi(net):
    r0 = [BOS, 10, 11] + image_run() + [12] + image_run() + [EOS]
    tokens, images, per_row = batch_of([r0])
    h, _ = net.hidden_states(tokens, images, per_row)
    rows, cols, start, _ = net.image_index(tokens, per_row)
    seen = {}
    hook = net.context_feat_proj.register_forward_hook(lambda m, i, o: seen.setdefault("ctx", i[0].detach()))
    try:
        _, lengths = net.image_condition(h, rows, cols, start)
    finally:
        hook.remove()
    assert lengths.tolist() == [4, 4 + K + 2]
    ctx = seen["ctx"]
    for i in range(2):
        n = int(lengths[i])
        want = h[0, :int(cols[i]) + 1].flip(0)  # the <BoI> state first, back to the segment's <s>
        torch.testing.assert_close(ctx[i, :n], want, rtol=0, atol=0)
        if n < ctx.shape[1]:
            assert ctx[i, n:].abs().max().item() == 0  # padding positions are zero before the projection


def test_pooled_condition_token_is_the_mean_context_state():
    net = tiny()
    c = net.cfg
    assert c.pooled_condition and net.neg_prompt_embeds.shape[1] == c.decoder.num_queries + c.direct_context + 1
    rows = [[BOS, 10, 11, 12] + image_run() + [EOS], [BOS, 20] + image_run() + [EOS]]
    tokens, images, per_row = batch_of(rows)
    with torch.no_grad():
        h, _ = net.hidden_states(tokens, images, per_row)
        r, cols, start, _ = net.image_index(tokens, per_row)
        cond, lengths = net.image_condition(h, r, cols, start)
        for i in range(2):
            ctx = h[i, int(start[i]):int(cols[i]) + 1]  # the segment up to its <BoI>; order does not matter for a mean
            want = net.pooled_ctx_proj(net.context_feat_proj(ctx).mean(0))
            torch.testing.assert_close(cond[i, -1], want, rtol=1e-5, atol=1e-6)
    assert (cond[0, -1] - cond[1, -1]).abs().max() > 1e-3  # another prompt, another pooled token


@pytest.mark.parametrize("n", [3, 12])  # the images have 5, 3 and 14 context states: n below, at and above them
def test_direct_context_tokens_are_the_nearest_states_past_the_decoder(n):
    net = tiny(direct_context=n)
    Q = net.cfg.decoder.num_queries
    assert net.neg_prompt_embeds.shape[1] == Q + n + 1  # the learned negative has the same tokens
    rows = [[BOS, 10, 11, 12] + image_run() + [EOS], [BOS, 20] + image_run() + [21, 22] + image_run() + [EOS]]
    tokens, images, per_row = batch_of(rows)
    with torch.no_grad():
        h, _ = net.hidden_states(tokens, images, per_row)
        r, cols, start, _ = net.image_index(tokens, per_row)
        cond, lengths = net.image_condition(h, r, cols, start)
        assert cond.shape[1] == Q + n + 1 and lengths.tolist() == [5, 3, 3 + K + 3]
        for i in range(3):
            ctx = h[int(r[i]), int(start[i]):int(cols[i]) + 1].flip(0)[:n]  # the <BoI> state first
            m = len(ctx)
            want = net.direct_proj(net.context_feat_proj(ctx) + net.context_pos[:m])
            torch.testing.assert_close(cond[i, Q:Q + m], want, rtol=1e-5, atol=1e-6)
            assert cond[i, Q + m:Q + n].abs().max().item() == 0 if m < n else True  # past the segment start: zero
    # the direct tokens come after the decoder's and before the pooled one, which the UNet reads last
    torch.testing.assert_close(cond[:, :Q], tiny(direct_context=0).image_condition(h, r, cols, start)[0][:, :Q])


def pooled_visual_tiny():
    cfg = M.preset("tiny", pooled_visual=True)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=VOCAB)
    cfg.resampler = dataclasses.replace(cfg.resampler, num_queries=4)  # a 2 × 2 grid of cells over the 4 × 4 tokens
    torch.manual_seed(0)
    return M.MMInterleaved(cfg)


def test_pooled_visual_adds_one_linear_token_per_grid_cell():
    net = pooled_visual_tiny()
    assert net.cfg.vit.grid == 4 and net.cfg.num_image_tokens == 4
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        visual, _ = net.encode_images(images)                                            # (3, 4, dim)
        tokens, _ = net.vit(images)
        full = net.neck(tokens)                                                          # (3, 1 + 16, D)
        queried = net.resampler(full)                                                    # (3, 4, dim)
        neck = full[:, 1:].reshape(3, 4, 4, -1)                                          # (3, row, col, D), no CLS
        for cell, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # row-major, as the tokens go
            mean = neck[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2))                 # (3, D)
            want = queried[:, cell] + net.pooled_visual_proj(mean)
            torch.testing.assert_close(visual[:, cell], want, rtol=1e-5, atol=1e-6)
        # the cells see different parts of the image: the tokens differ from each other and across images
        assert (visual[:, 0] - visual[:, 3]).abs().max() > 1e-3
        assert (visual[0] - visual[1]).abs().max() > 1e-3
    # the flag travels with the config (checkpoints store it), and the weights load strictly into a rebuilt model
    back = M.MMInterleaved(M.MMConfig.from_dict(net.cfg.to_dict()))
    assert back.cfg.pooled_visual and back.pooled_visual_proj is not None
    back.load_state_dict(net.state_dict(), strict=True)
    assert not tiny().cfg.pooled_visual and tiny().pooled_visual_proj is None  # off unless asked for


def test_pooled_visual_needs_a_square_token_count():
    cfg = M.preset("tiny", pooled_visual=True)  # 8 visual tokens: not a square grid
    with pytest.raises(ValueError, match="pooled_visual"):
        M.MMInterleaved(cfg)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_mmfs_hide_prob_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="mmfs_hide_prob .* not a probability"):
        M.MMInterleaved(M.preset("tiny", mmfs_hide_prob=p))


def test_mmfs_hide_prob_needs_the_unets_mmfs():
    with pytest.raises(ValueError, match="needs the UNet's MMFS"):
        M.MMInterleaved(M.without_mmfs(M.preset("tiny", mmfs_hide_prob=0.5)))
    assert M.MMInterleaved(M.without_mmfs(M.preset("tiny"))).cfg.mmfs_hide_prob == 0  # 0 needs nothing


def test_segment_opening_images_get_no_diffusion_loss(net):
    # every image directly follows <s>: context [<s>, <BoI>], length 2 -> no loss (§5.4), text loss still there
    r0 = [BOS] + image_run() + [10, 11, EOS, BOS] + image_run() + [12, EOS]
    tokens, images, per_row = batch_of([r0])
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    assert out["n_img"] == 2 and out["loss_img"].item() == 0.0
    assert out["loss_txt"].item() > 0 and torch.isfinite(out["loss"])
    # with text before the image it is a text-to-image example and does count
    tokens, images, per_row = batch_of([[BOS, 10, 11] + image_run() + [EOS]])
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    assert out["loss_img"].item() > 0


def test_back_loss_names_the_tokens_before_each_state():
    """MMConfig.back_tokens: state i names token i - j; <image> and pad targets and pad states are skipped, and the
    sum is per text target (as loss_txt), then averaged over the offsets and added with the text loss's weight."""
    net = tiny(back_tokens=2)
    r0 = [BOS, 10, 11] + image_run() + [12, EOS]
    r1 = [BOS, 13, 14, 15, EOS]
    tokens, images, per_row = batch_of([r0, r1])
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, _ = net.hidden_states(tokens, images, per_row)
        total, pairs = 0.0, 0
        for j in (1, 2):
            for b, row in enumerate([r0, r1]):
                for i in range(j, len(row)):  # pads only ever follow the row, so states past it are skipped
                    if row[i - j] == IMG:
                        continue
                    logp = torch.log_softmax(net.back_heads[j - 1](h[b, i]).double(), -1)
                    total, pairs = total - logp[row[i - j]].item(), pairs + 1
    n_txt = int((net.text_labels(tokens) != -100).sum())
    assert pairs == 5 + 4 + 4 + 3  # r0: 13 and 12 pairs less K <image> targets each; r1: 4 and 3
    assert out["loss_back"].item() == pytest.approx(total / 2 / n_txt, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_txt"].item() + out["loss_back"].item()
                                               + net.cfg.loss_img_weight * out["loss_img"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.back_heads.parameters())
    assert tiny(back_tokens=0)(tokens, images, per_row)["loss_back"].item() == 0.0  # off: nothing added


def test_ahead_loss_names_the_tokens_after_the_next_within_a_document():
    """MMConfig.ahead_tokens: state i names token i + 1 + j, wherever the text loss counts that token as a target and
    no <s> (a packed document's start) lies between them; per text target, averaged over the offsets, added with the
    text loss's weight."""
    net = tiny(ahead_tokens=2)
    r0 = [BOS, 10, 11] + image_run() + [12, EOS, BOS, 13, 14, 15, EOS]  # two documents packed in one row
    r1 = [BOS, 16, BOI] + [IMG] * K + [17, EOS]
    tokens, images, per_row = batch_of([r0, r1])
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    labels = net.text_labels(tokens)
    with torch.no_grad():
        h, _ = net.hidden_states(tokens, images, per_row)
        total, pairs = 0.0, []
        for j in (1, 2):
            for b, row in enumerate([r0, r1]):
                for i in range(len(row) - 1 - j):
                    tgt = row[i + 1 + j]
                    if labels[b, i + j] == -100 or BOS in row[i + 1:i + 2 + j]:
                        continue
                    logp = torch.log_softmax(net.ahead_heads[j - 1](h[b, i]).double(), -1)
                    total = total - logp[tgt].item()
                    pairs.append((j, b, i, tgt))
    second = 3 + len(image_run()) + 2                                   # r0's second <s>
    assert (1, 0, 0, 11) in pairs and (2, 0, 0, BOI) in pairs          # the first <s> names 11 (j = 1), <BoI> (j = 2)
    assert not any(b == 0 and tgt == 13 and i < second for _, b, i, tgt in pairs)  # nothing names 13 across its <s>
    assert (1, 0, second, 14) in pairs and (2, 0, second, 15) in pairs  # its own <s> names 14 and 15
    assert not any(tgt in (IMG, PAD) for *_, tgt in pairs)
    n_txt = int((labels != -100).sum())
    assert out["loss_ahead"].item() == pytest.approx(total / 2 / n_txt, rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["loss_txt"].item() + out["loss_back"].item()
                                               + out["loss_ahead"].item()
                                               + net.cfg.loss_img_weight * out["loss_img"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.ahead_heads.parameters())
    off = tiny()(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    assert off["loss_ahead"].item() == 0.0 and tiny().ahead_heads is None  # off (every preset): nothing added


def test_skipping_segment_opening_images_keeps_the_loss():
    """The UNet runs only on images that count; the loss equals the UNet on every image with the others weighted 0,
    since the draws are made for every image first."""
    net = tiny()
    assert net.cfg.min_snr_gamma == 0  # the plain MSE below is the preset's loss
    with torch.no_grad():  # live MMFS residuals and pooled condition, so the previous image and cond matter
        for p in [*net.unet.mmfs.parameters(), *net.pooled_proj.parameters()]:
            p.normal_(0, 0.1)
    r0 = [BOS] + image_run() + [10, 11] + image_run() + [EOS, BOS, 12] + image_run() + [13, EOS]
    tokens, images, per_row = batch_of([r0])
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, pyramid = net.hidden_states(tokens, images, per_row)
        rows, cols, start, prev = net.image_index(tokens, per_row)
        cond, lengths = net.image_condition(h, rows, cols, start)
        assert lengths.tolist() == [2, 2 + K + 2 + 1, 3]  # image 0 opens its segment
        x0 = net.to_diffusion_space(images)
        drop, t, noise, hide = net.draws(x0, per_row, torch.Generator().manual_seed(0))
        assert not hide.any()  # mmfs_hide_prob 0: MMFS sees every previous image
        cond = torch.where(drop[:, None, None], net.neg_prompt_embeds, cond)
        feats, fmask = net.previous_features(pyramid, prev)
        pred = net.unet_forward(diffusion.q_sample(x0, t, noise, net.cfg.schedule), t, cond, feats, fmask)
        err = (pred - diffusion.training_target(x0, noise, t, net.cfg.schedule)).pow(2).flatten(1).mean(1)
        want = (err * torch.tensor([0.0, 1.0, 1.0])).sum() / 3  # the mean over all 3 images
    assert want.item() > 0
    torch.testing.assert_close(out["loss_img"], want, rtol=1e-5, atol=0)
    # t2i_loss_weight scales only the text-to-image frame (image 2: text before it, no earlier image in its segment)
    net.cfg.t2i_loss_weight = 3.0
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    want3 = (err * torch.tensor([0.0, 1.0, 3.0])).sum() / 3
    assert err[1] > 0 and err[2] > 0
    torch.testing.assert_close(out["loss_img"], want3, rtol=1e-5, atol=0)
    # mmfs_hide_prob 1: the continuation (image 1) is drawn as if it had no previous image; the other draws are the
    # same (the hide draw comes last), so only its error changes, to what a masked MMFS input gives
    net.cfg.t2i_loss_weight, net.cfg.mmfs_hide_prob = 1.0, 1.0
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        d2 = net.draws(x0, per_row, torch.Generator().manual_seed(0))
        assert all(torch.equal(a, b) for a, b in zip(d2[:3], (drop, t, noise))) and d2[3].all()
        feats, fmask = net.previous_features(pyramid, torch.full_like(prev, -1))
        pred = net.unet_forward(diffusion.q_sample(x0, t, noise, net.cfg.schedule), t, cond, feats, fmask)
        err_h = (pred - diffusion.training_target(x0, noise, t, net.cfg.schedule)).pow(2).flatten(1).mean(1)
    assert (err_h[1] - err[1]).abs() > 1e-6  # the previous image mattered, so hiding it is seen
    torch.testing.assert_close(err_h[2], err[2], rtol=1e-6, atol=0)  # image 2 had none to hide
    torch.testing.assert_close(out["loss_img"], (err_h * torch.tensor([0.0, 1.0, 1.0])).sum() / 3, rtol=1e-5, atol=0)


def test_noise_draws_average_the_image_loss_over_draws_that_share_a_condition():
    """noise_draws R: every image is noised R times, each draw with its own timestep, noise and CFG coin but the one
    condition the LLM gave it; the image loss is the mean over all R·ΣI draws (segment-opening ones weighted 0)."""
    net = tiny(noise_draws=2)
    with torch.no_grad():  # live MMFS residuals and pooled condition, so the previous image and cond matter
        for p in [*net.unet.mmfs.parameters(), *net.pooled_proj.parameters()]:
            p.normal_(0, 0.1)
    r0 = [BOS] + image_run() + [10, 11] + image_run() + [EOS]  # image 0 opens its segment, image 1 continues it
    r1 = [BOS, 12] + image_run() + [13, EOS]                     # image 2: text-to-image
    tokens, images, per_row = batch_of([r0, r1])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731  (one per row, as train.py)
    out = net(tokens, images, per_row, generator=gens())
    with torch.no_grad():
        h, pyramid = net.hidden_states(tokens, images, per_row)
        rows, cols, start, prev = net.image_index(tokens, per_row)
        cond, lengths = net.image_condition(h, rows, cols, start)                      # (3, Q, ctx)
        x0 = net.to_diffusion_space(images)
        drop, t, noise, hide = net.draws(x0, per_row, gens())
        assert t.shape == (6,) and noise.shape == (6, *x0.shape[1:]) and drop.shape == hide.shape == (6,)
        # draw-major: row 0 drew (2, 2) values, row 1 (2, 1), laid out as [draw 0 of images 0-2, draw 1 of 0-2]
        g0 = gens()[0]
        torch.rand(2, 2, generator=g0)
        assert torch.equal(t.view(2, 3)[:, :2], diffusion.sample_timesteps(4, net.cfg.schedule, g0).view(2, 2))
        assert not torch.equal(noise[:3], noise[3:])  # the draws of an image differ
        err = []
        for r in range(2):
            sl = slice(3 * r, 3 * r + 3)
            c = torch.where(drop[sl, None, None], net.neg_prompt_embeds, cond)  # each draw: the image's own cond
            feats, fmask = net.previous_features(pyramid, prev)
            pred = net.unet_forward(diffusion.q_sample(x0, t[sl], noise[sl], net.cfg.schedule), t[sl], c, feats,
                                    fmask)
            err.append((pred - diffusion.training_target(x0, noise[sl], t[sl], net.cfg.schedule)).pow(2)
                       .flatten(1).mean(1))
        err = torch.stack(err)                                                           # (R, 3)
        want = (err * torch.tensor([0.0, 1.0, 1.0])).sum() / 6  # image 0 opens its segment: weighted 0
    assert (err[:, 1:] > 0).all() and not torch.allclose(err[0], err[1])
    torch.testing.assert_close(out["loss_img"], want, rtol=1e-5, atol=0)
    assert out["n_img"] == 3  # images, not draws


def test_repa_adds_one_term_and_leaves_everything_else_as_its_twin():
    """repa_weight w: the same init (the projector is drawn on a forked RNG) and draws as the run without it, the same
    text and image losses, and loss = their loss + w · loss_repa. loss_repa is the image-weighted mean over the kept
    draws of 1 - cosine(repa_proj(the UNet's 16×16 down state), the clean frame's pyramid map minus its position)."""
    plain, net = tiny(), tiny(repa_weight=0.5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in plain.state_dict().items())
    r0 = [BOS] + image_run() + [10, 11] + image_run() + [EOS]  # image 0 opens its segment: weighted 0
    r1 = [BOS, 12] + image_run() + [13, EOS]
    tokens, images, per_row = batch_of([r0, r1])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    a, b = plain(tokens, images, per_row, generator=gens()), net(tokens, images, per_row, generator=gens())
    assert a["loss_img"] == b["loss_img"] and a["loss_txt"] == b["loss_txt"]
    assert 0 < b["loss_repa"] < 2 and a["loss_repa"] == 0
    torch.testing.assert_close(b["loss"], a["loss"] + 0.5 * b["loss_repa"], rtol=1e-6, atol=0)
    # by hand, with the draws and the UNet's 16x16 down state as forward makes them
    with torch.no_grad():
        pyramid, cond, x0, drop, t, noise, feats, fmask = unet_inputs(net, tokens, images, per_row, gens())
        cond = torch.where(drop[:, None, None], net.neg_prompt_embeds, cond)
        _, state = net.unet_forward(diffusion.q_sample(x0, t, noise, net.cfg.schedule), t, cond, feats, fmask, tap=16)
        target = pyramid[0] - vit_lib._pyramid_pos(32, net.cfg.vit.grid, 16, "cpu", torch.float32)  # (3, C, 16, 16)
        z = net.repa_proj(state.flatten(2).transpose(1, 2))                             # (3, 256, C)
        cos = F.cosine_similarity(z, target.flatten(2).transpose(1, 2), dim=-1)         # (3, 256)
        want = ((1 - cos).mean(1) * torch.tensor([0.0, 1.0, 1.0])).sum() / 3
    torch.testing.assert_close(b["loss_repa"], want, rtol=1e-5, atol=0)


def test_repa_loss_reads_the_pyramid_detached_and_without_its_position():
    """The term pulls the UNet toward the frame's map, never the map (the ViT) toward the UNet; and a projection equal
    to the map minus its fixed position scores 0, its negation 2."""
    net = tiny(repa_weight=1.0)
    state = torch.randn(3, 64, 16, 16, requires_grad=True)  # the tiny UNet: 64 channels at 16x16
    target = torch.randn(3, 32, 16, 16, requires_grad=True)
    net.repa_loss(state, target).sum().backward()
    assert target.grad is None and state.grad.abs().sum() > 0
    pos = vit_lib._pyramid_pos(32, net.cfg.vit.grid, 16, "cpu", torch.float32)
    content = (target - pos).detach().flatten(2).transpose(1, 2)                       # (3, 256, 32)

    class Exact(torch.nn.Module):  # a projector that answers `out` whatever the state
        def __init__(self, out):
            super().__init__()
            self.out = out

        def forward(self, z):
            return self.out

    for sign, want in ((1, 0.0), (-1, 2.0)):
        net.repa_proj = Exact(sign * content)
        torch.testing.assert_close(net.repa_loss(state, target), torch.full((3,), want), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bad, says", [(dict(repa_weight=float("nan")), "repa_weight nan"),
                                        (dict(repa_weight=-1.0), "repa_weight -1.0"),
                                        (dict(repa_weight=1.0, repa_side=4), "repa_side 4 is not a side of the UNet")])
def test_repa_settings_are_checked(bad, says):
    with pytest.raises(ValueError, match=says):
        tiny(**bad)


def test_stratified_timesteps_give_each_image_one_draw_per_part_of_the_range():
    """stratified_timesteps with R = 3: draw r of every image has t in the r-th third of [0, T), from the row's own
    generator (so DDP ranks draw what one process would); the CFG coins before it are the same as unstratified."""
    net = tiny(noise_draws=3, stratified_timesteps=True)
    r0 = [BOS] + image_run() + [10, 11] + image_run() + [EOS]
    r1 = [BOS, 12] + image_run() + [13, EOS]
    tokens, images, per_row = batch_of([r0, r1])
    x0 = net.to_diffusion_space(images)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    drop, t, noise, hide = net.draws(x0, per_row, gens())
    T = net.cfg.schedule.num_train_timesteps
    assert t.shape == (9,) and ((t.view(3, 3) * 3) // T == torch.arange(3)[:, None]).all()
    g0 = gens()[0]
    torch.rand(3, 2, generator=g0)  # row 0's CFG coins come first
    assert torch.equal(t.view(3, 3)[:, :2], diffusion.stratified_timesteps(3, 2, net.cfg.schedule, g0))
    net.cfg.stratified_timesteps = False
    d2 = net.draws(x0, per_row, gens())
    assert torch.equal(d2[0], drop) and not torch.equal(d2[1], t)
    assert net(tokens, images, per_row, generator=gens())["loss"].isfinite()


def test_noise_draws_t2i_gives_text_to_image_frames_their_own_number_of_draws():
    """noise_draws 1, noise_draws_t2i 3: all 3 draws are made for every image (the same as noise_draws 3), a
    continuation keeps draw 0, a text-to-image frame all 3; the image loss is the mean over images of each one's
    mean over its own draws."""
    net = tiny(noise_draws=1, noise_draws_t2i=3)
    with torch.no_grad():
        for p in [*net.unet.mmfs.parameters(), *net.pooled_proj.parameters()]:
            p.normal_(0, 0.1)
    r0 = [BOS] + image_run() + [10, 11] + image_run() + [EOS]  # image 0 opens its segment, image 1 continues it
    r1 = [BOS, 12] + image_run() + [13, EOS]                     # image 2: text-to-image
    tokens, images, per_row = batch_of([r0, r1])
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    out = net(tokens, images, per_row, generator=gens())
    with torch.no_grad():
        _, cond, x0, drop, t, noise, feats, fmask = unet_inputs(net, tokens, images, per_row, gens())
        assert t.shape == (9,)
        err = []
        for r in range(3):
            sl = slice(3 * r, 3 * r + 3)
            c = torch.where(drop[sl, None, None], net.neg_prompt_embeds, cond)
            pred = net.unet_forward(diffusion.q_sample(x0, t[sl], noise[sl], net.cfg.schedule), t[sl], c, feats,
                                    fmask)
            err.append((pred - diffusion.training_target(x0, noise[sl], t[sl], net.cfg.schedule)).pow(2)
                       .flatten(1).mean(1))
        err = torch.stack(err)                                                           # (3 draws, 3 images)
    assert not torch.allclose(err[:, 2], err[0, 2].expand(3))  # the t2i frame's draws differ
    torch.testing.assert_close(out["loss_img"], (err[0, 1] + err[:, 2].mean()) / 3, rtol=1e-5, atol=0)
    # the same draws as noise_draws 3 for every image, which averages all three draws of image 1 too
    net.cfg.noise_draws = 3
    assert torch.equal(net.draws(x0, per_row, gens())[1], t)
    torch.testing.assert_close(net(tokens, images, per_row, generator=gens())["loss_img"],
                               (err[:, 1].mean() + err[:, 2].mean()) / 3, rtol=1e-5, atol=0)


def test_stratified_timesteps_take_each_image_s_strata_from_its_own_draws():
    """noise_draws 1, noise_draws_t2i 3, stratified: a text-to-image frame's 3 draws fall in the thirds of [0, T),
    a continuation's one draw in all of it, from the same uniforms as if every image used 3 parts."""
    net = tiny(noise_draws=1, noise_draws_t2i=3, stratified_timesteps=True)
    r0 = [BOS] + image_run() + [10, 11] + image_run() + [EOS]  # image 1 continues image 0
    r1 = [BOS, 12] + image_run() + [13, EOS]                     # image 2: text-to-image
    tokens, images, per_row = batch_of([r0, r1])
    prev = net.image_index(tokens, per_row)[3]
    n = net.image_draws(prev)
    assert n.tolist() == [3, 1, 3]
    x0 = net.to_diffusion_space(images)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    t = net.draws(x0, per_row, gens(), n)[1].view(3, 3)                                 # (draws, images)
    T = net.cfg.schedule.num_train_timesteps
    assert ((t[:, [0, 2]] * 3) // T == torch.arange(3)[:, None]).all()
    t3 = net.draws(x0, per_row, gens())[1].view(3, 3)  # every image in thirds: the same u
    assert torch.equal(t[:, [0, 2]], t3[:, [0, 2]])
    assert t3[0, 1] < T / 3 and t3[0, 1] * 3 <= t[0, 1] <= t3[0, 1] * 3 + 2  # floor(u T) against floor(u T / 3)
    assert net(tokens, images, per_row, generator=gens())["loss"].isfinite()


def test_noise_draws_t2i_is_checked():
    with pytest.raises(ValueError, match="noise_draws_t2i -1 is not a whole number >= 0"):
        M.MMInterleaved(M.preset("tiny", noise_draws_t2i=-1))


@pytest.mark.parametrize("r", [0, -1, 1.5, True])
def test_noise_draws_must_be_a_whole_number_from_1(r):
    with pytest.raises(ValueError, match="noise_draws .* not a whole number"):
        M.MMInterleaved(M.preset("tiny", noise_draws=r))


def test_no_counted_image_still_gives_every_unet_parameter_a_gradient():
    net = tiny()
    tokens, images, per_row = batch_of([[BOS] + image_run() + [10, EOS]])  # one segment-opening image only
    out = net(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert out["loss_img"].item() == 0.0
    missing = [n for n, p in net.unet.named_parameters() if p.grad is None]
    assert not missing, missing[:3]  # DDP needs a gradient for every parameter on every rank


def test_later_images_do_not_change_earlier_states():
    net = tiny().eval()
    with torch.no_grad():  # live MMFS gates, so images really reach the text states
        for layer in net.llm.model.layers:
            if layer.llama_cross_attn is not None:
                layer.llama_cross_attn.gate.fill_(1.0)
    r0 = [BOS, 10] + image_run() + [11, 12] + image_run() + [13, EOS]
    tokens, images, per_row = batch_of([r0])
    h1, _ = net.hidden_states(tokens, images, per_row)
    images2 = images.clone()
    images2[1] = torch.rand(3, 32, 32)
    h2, _ = net.hidden_states(tokens, images2, per_row)
    first_slot = 2 + K + 2 + 1  # the first placeholder of image 1: where it becomes visible
    torch.testing.assert_close(h1[0, :first_slot], h2[0, :first_slot], rtol=0, atol=0)
    assert (h1[0, first_slot:] - h2[0, first_slot:]).abs().max() > 1e-6  # and it is visible after


def test_forward_draws_are_per_row(net):
    """Per-row generators: a row's random draws do not depend on the rows beside it (what DDP relies on)."""
    x0 = torch.zeros(5, 3, 32, 32)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (7, 8)]  # noqa: E731
    d_all = net.draws(x0, [2, 3], gens())
    d_one = net.draws(x0[:3], [3], [torch.Generator().manual_seed(8)])
    for a, b in zip(d_all, d_one):
        torch.testing.assert_close(a[2:], b)


def test_generate_images_is_seeded_and_checks_prompts(net):
    prompts = [[BOS, 10, 11, BOI], [BOS] + image_run() + [12, BOI]]
    imgs = [torch.zeros(0, 3, 32, 32), torch.rand(1, 3, 32, 32)]
    a = net.generate_images(prompts, imgs, steps=2, generator=torch.Generator().manual_seed(1))
    b = net.generate_images(prompts, imgs, steps=2, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b) and 0 <= a.min() and a.max() <= 1
    with pytest.raises(ValueError, match="end with <BoI>"):
        net.generate_images([[BOS, 10]], [torch.zeros(0, 3, 32, 32)], steps=1)


def test_generate_images_from_a_noised_frame_starts_at_its_timestep(net, monkeypatch):
    """start = (frames, t): the UNet's first input is those frames noised to t by q_sample with the generator's
    first draw, at timestep t (SDEdit), then the grid below t; seeded like the plain path."""
    prompts, imgs = [[BOS, 10, 11, BOI]] * 2, [torch.zeros(0, 3, 32, 32)] * 2
    frames = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    calls, real = [], net.unet_forward
    def spy(x, t, *a, **k):
        calls.append((x.clone(), t.clone()))
        return real(x, t, *a, **k)
    monkeypatch.setattr(net, "unet_forward", spy)
    a = net.generate_images(prompts, imgs, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1),
                            start=(frames, 600))
    x0 = net.to_diffusion_space(frames)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    want = diffusion.q_sample(x0, torch.full((2,), 600), noise, net.cfg.schedule)
    torch.testing.assert_close(calls[0][0], want, rtol=0, atol=0)
    assert [int(t[0]) for _, t in calls] == [600] + [t for t in diffusion.timesteps(net.cfg.schedule, 4) if t < 600]
    b = net.generate_images(prompts, imgs, steps=4, guidance=1.0, generator=torch.Generator().manual_seed(1),
                            start=(frames, 600))
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32)


def test_reading_step_moves_x0_by_its_scale_up_the_caption_likelihood(net):
    """One reading step moves each image by exactly `scale` (RMS) along the gradient of log p(text | image), so a
    small step raises caption_logprob; the weights get no gradient and keep their requires_grad."""
    texts = [[10, 11, 12], [13, 14]]
    flags = [p.requires_grad for p in net.parameters()]
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 1.6 - 0.8  # inside [-1, 1]
    before = net.caption_logprob(net.from_diffusion_space(x0), texts)
    moved = net.reading_step(x0, texts, 1e-3)
    step = (moved - x0).flatten(1)
    torch.testing.assert_close(step.pow(2).mean(1).sqrt(), torch.full((2,), 1e-3), rtol=1e-4, atol=0)
    assert not moved.requires_grad and (net.caption_logprob(net.from_diffusion_space(moved), texts) > before).all()
    assert all(p.grad is None for p in net.parameters()) and [p.requires_grad for p in net.parameters()] == flags


def test_reading_guidance_acts_in_its_window_only(net):
    """generate_images with read_texts: a window no sampling step falls in gives the plain drawing bit for bit; a
    window holding one timestep applies read_iters reading steps there, as a hand-written x0_fn does; bad settings
    and a text count that does not match the prompts are refused."""
    prompts, imgs, texts = [[BOS, 10, 11, BOI]] * 2, [torch.zeros(0, 3, 32, 32)] * 2, [[10, 11]] * 2

    def draw(**k):
        return net.generate_images(prompts, imgs, steps=4, generator=torch.Generator().manual_seed(1), **k)
    plain = draw()
    assert torch.equal(draw(read_texts=texts, read_window=(1000, 2000)), plain)
    assert torch.equal(draw(read_texts=texts, read_scale=0.0), plain)
    t_mid = diffusion.timesteps(net.cfg.schedule, 4)[1]
    guided = draw(read_texts=texts, read_scale=0.2, read_window=(t_mid, t_mid), read_iters=2)
    assert not torch.equal(guided, plain)

    def by_hand(x0, t):
        return net.reading_step(net.reading_step(x0, texts, 0.2), texts, 0.2) if t == t_mid else x0
    real = diffusion.sample
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diffusion, "sample", lambda *a, **k: real(*a, **{**k, "x0_fn": by_hand}))
        torch.testing.assert_close(draw(), guided, rtol=0, atol=0)
    for bad, says in ((dict(read_scale=-0.1), "scale"), (dict(read_scale=float("nan")), "scale"),
                      (dict(read_window=(900, 300)), "window"), (dict(read_iters=0), "iterations"),
                      (dict(read_texts=texts[:1]), "1 texts for 2 prompts")):
        with pytest.raises(ValueError, match=says):
            draw(**{"read_texts": texts, **bad})


def test_drawing_nll_is_the_elbo_of_the_image_under_the_text_alone(net):
    """drawing_nll: per image T × the mean over its (timestep, noise) draws of 1/2 (SNR(t-1) - SNR(t)) times the
    summed squared error of the UNet's x0 estimate, conditioned on `<s> text <BoI>` with no earlier image; written
    out here in float64 from prompt_conditions and the v-prediction identity x0 = sqrt(a) x_t - sqrt(1 - a) v. The
    same text and noise give the same value in any batch; another text gives another (the condition reaches the
    UNet)."""
    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 32, 32, generator=g)
    texts = [[10, 11, 12], [13, 14], [10, 11, 12]]
    ts = torch.tensor([50, 450, 950, 450])
    noise = torch.randn(3, len(ts), *net.diffusion_shape, generator=g)                   # (B, L, C, s, s)
    assert net.diffusion_shape == (3, 32, 32)  # the tiny preset diffuses in pixel space
    sched = net.cfg.schedule
    assert sched.prediction_type == "v_prediction"
    a = torch.as_tensor(sched.alphas_cumprod, dtype=torch.float64)
    got = net.drawing_nll(images, texts, ts, noise)
    assert got.shape == (3,) and got.dtype == torch.float64 and torch.isfinite(got).all() and (got > 0).all()
    for b in range(3):
        cond, kw = net.prompt_conditions([[BOS] + texts[b] + [BOI]], [torch.zeros(0, 3, 32, 32)])
        x0 = (images[b:b + 1] * 2 - 1).double()
        terms = []
        for i, t in enumerate(ts.tolist()):
            xt = a[t].sqrt() * x0 + (1 - a[t]).sqrt() * noise[b:b + 1, i].double()
            with torch.no_grad():
                v = net.unet_forward(xt.float(), torch.tensor([t]), cond, **kw).double()
            x0_hat = a[t].sqrt() * xt - (1 - a[t]).sqrt() * v
            snr = a / (1 - a)
            terms.append(0.5 * (snr[t - 1] - snr[t]) * (x0 - x0_hat).pow(2).sum())
        want = 1000 * torch.stack(terms).mean()
        assert abs(got[b].item() - want.item()) < 1e-4 * want.item(), (b, got[b].item(), want.item())
    # one image with both texts and the same noise: the words alone move the value
    pair = net.drawing_nll(images[:1].expand(2, -1, -1, -1), texts[:2], ts, noise[:1].expand(2, -1, -1, -1, -1))
    assert pair[0].item() == pytest.approx(got[0].item(), rel=1e-5) and pair[0] != pair[1]
    with pytest.raises(ValueError, match="start at 1"):
        net.drawing_nll(images, texts, torch.tensor([0, 450]), noise[:, :2])


def test_text_logprob_is_the_teacher_forced_sum_and_ignores_padding(net):
    """log p of each row's last `scored` tokens: the log-softmax of the logits at the positions before them, summed
    (float64 by hand on the row alone); in a batch with a longer row (right padding) the same, in float32."""
    rows = [[BOS] + image_run() + [10, 11, 12], [BOS, 20] + image_run() + [13, 14, 15, 16, 17, 18]]
    tokens, images, per_row = batch_of(rows)
    got = net.text_logprob(rows, images, [3, 4])
    for b, (r, k) in enumerate(zip(rows, (3, 4))):
        alone = torch.tensor([r])
        im = images[:1] if b == 0 else images[1:]
        with torch.no_grad():
            h, _ = net.hidden_states(alone, im, [1])
            logp = net.logits(h[0, :-1]).double().log_softmax(-1)                        # (T-1, V)
        want = sum(logp[i - 1, r[i]] for i in range(len(r) - k, len(r)))
        assert torch.isfinite(got[b]) and abs(got[b].item() - want.item()) < 1e-4 * max(1.0, abs(want.item()))
        assert net.text_logprob([r], im, [k]).item() == pytest.approx(got[b].item(), rel=1e-5, abs=1e-5)
    other = net.text_logprob(rows, torch.rand_like(images), [3, 4])  # another picture: another score
    assert (other != got).all()
    with pytest.raises(ValueError, match="at least one token"):
        net.text_logprob(rows, images, [0, 4])
    with pytest.raises(ValueError, match="at least one token"):
        net.text_logprob(rows, images, [3, len(rows[1])])


def test_generate_text_stops_at_eos_or_boi(net):
    tokens = torch.tensor([[BOS] + image_run() + [10]])
    out = net.generate_text(tokens, torch.rand(1, 3, 32, 32), max_new_tokens=5)
    assert len(out) == 1 and 1 <= len(out[0]) <= 5
    assert all(t not in (EOS, BOI) for t in out[0][:-1])


def test_generate_text_never_samples_placeholders_or_pad():
    net = tiny().eval()
    with torch.no_grad():  # make <image>, pad and <s> the most likely next tokens by far
        net.llm.lm_head.weight[[IMG, PAD, BOS]] = net.llm.model.norm.weight * 50
    out = net.generate_text(torch.tensor([[BOS, 10, 11]]), None, max_new_tokens=4)[0]
    assert len(out) == 4 and not set(out) & {IMG, PAD, BOS}


def test_no_mmfs_ablation_has_no_mmfs_parameters():
    net = tiny()
    ablation = M.MMInterleaved(M.without_mmfs(net.cfg))
    assert any("llama_cross_attn" in k for k in net.state_dict()) and any(k.startswith("unet.mmfs.")
                                                                       for k in net.state_dict())
    assert not any("llama_cross_attn" in k or k.startswith("unet.mmfs.") for k in ablation.state_dict())
    tokens, images, per_row = batch_of([[BOS, 10] + image_run() + [11] + image_run() + [EOS]])
    out = ablation(tokens, images, per_row, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    # what nothing reads gets no gradient: the pyramid in the ablation, no level in the preset (DDP is told)
    out["loss"].backward()
    unread = [n for n, p in ablation.named_parameters() if p.grad is None]
    assert ablation.unread_pyramid_levels() == [16, 8, 4, 2] and net.unread_pyramid_levels() == []
    assert unread and all(n.startswith("vit.") for n in unread)  # the adapter's pyramid side of the ViT


def test_presets_are_independent_copies():
    a = M.preset("small")
    a.llm.dim = 7
    assert M.preset("small").llm.dim != 7
    cfg = M.preset("paper")
    assert cfg.freeze_pretrained and cfg.vae is not None and cfg.decoder.num_queries == 77
    assert M.MMConfig.from_dict(cfg.to_dict()) == cfg


def test_checkpoint_round_trip_and_bad_dirs(tmp_path, tiny_checkpoint):
    net, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    again, _ = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    for (k, v), (k2, v2) in zip(net.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert tok.n_vocab == net.cfg.llm.vocab_size and net.cfg.ids["boi"] == tok.boi_id
    with pytest.raises(weights.WeightsError, match="not found"):
        M.MMInterleaved.from_checkpoint(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(weights.WeightsError, match="model.safetensors"):
        M.MMInterleaved.from_checkpoint(bad)


# ---------------------------------------------------------------------------------------------------------------
# data.py: tokenisation, packing, batches

class FakeTok:
    bos_id, eos_id, pad_id, boi_id, image_id = BOS, EOS, PAD, BOI, IMG

    def encode(self, text, bos=False):
        return [10 + (len(w) % 50) for w in text.split()]

    def image_tokens(self, k):
        return [BOI] + [IMG] * k


def test_tokenize_document_order():
    img = np.zeros((32, 32, 3), np.uint8)
    ids, images = data.tokenize_document([{"text": "a bb"}, {"image": img}, {"text": "ccc"}], FakeTok(), K)
    assert ids == [BOS, 11, 12] + image_run() + [13, EOS] and len(images) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(["t", "i"]), min_size=1, max_size=12), min_size=1, max_size=6),
       st.integers(K + 1, 40), st.integers(1, 6))
def test_pack_keeps_image_runs_whole(docs, seq_len, max_images):
    tokenized = []
    for d, kinds in enumerate(docs):
        ids, images = [BOS], []
        for j, kind in enumerate(kinds):
            if kind == "i":
                ids += image_run()
                images.append((d, j))
            else:
                ids += [10 + j, 11]
        tokenized.append((ids + [EOS], images))
    if any(len(im) > max_images for _, im in tokenized):
        max_images = max(len(im) for _, im in tokenized) + 1  # cap above any chunk (the error path is tested below)
    rows = data.pack(tokenized, seq_len, max_images, BOI, K)
    assert [t for r, _ in rows for t in r] == [t for ids, _ in tokenized for t in ids]  # nothing lost or reordered
    assert [x for _, im in rows for x in im] == [x for _, im in tokenized for x in im]
    for ids, images in rows:
        assert len(ids) <= seq_len and ids.count(BOI) == len(images) <= max_images
        for p, t in enumerate(ids):
            if t == BOI:
                assert ids[p + 1:p + 1 + K] == [IMG] * K  # never cut inside an image run


def test_pack_rejects_impossible_rows():
    with pytest.raises(ValueError, match="cannot hold one image"):
        data.pack([([BOS] + image_run() + [EOS], [0])], K, 4, BOI, K)
    with pytest.raises(ValueError, match="more than the model"):
        data.pack([([BOS] + image_run() * 3 + [EOS], [0, 1, 2])], 100, 2, BOI, K)


def test_story_batches_are_pure_and_split_by_rank(tiny_checkpoint):
    _, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    sb = data.StoryBatches(tok, K, 256, 4, 7, seed=3)
    a, b = sb.batch(5), sb.batch(5)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["images"], b["images"])
    assert not torch.equal(sb.batch(6)["tokens"], a["tokens"])  # another step, other stories
    r0, r1 = sb.batch(5, rank=0, world=2), sb.batch(5, rank=1, world=2)
    assert r0["images_per_row"] == a["images_per_row"][0::2] and r1["images_per_row"] == a["images_per_row"][1::2]
    for b_, part in ((0, r0), (1, r1)):
        for j in range(2):
            n = part["tokens"].shape[1]
            assert torch.equal(part["tokens"][j], a["tokens"][b_ + 2 * j, :n])
    assert all(1 <= k <= 7 for k in a["images_per_row"])
    assert (a["tokens"] == tok.boi_id).sum().item() == a["images"].shape[0]
    with pytest.raises(ValueError, match="does not fit"):
        data.StoryBatches(tok, K, 40, 1, 7).batch(0)


def test_balance_window_trains_the_same_rows_in_groups_of_alike_work(tiny_checkpoint):
    _, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    mix = dict(seed=3, prefixes=True, first_frame_prob=0.6, events_text_first=True)
    W, B = 4, 2
    plain = data.StoryBatches(tok, K, 256, B, 7, **mix)
    sb = data.StoryBatches(tok, K, 256, B, 7, balance_window=W, unet_passes=2, **mix)
    gaps, plain_gaps = [], []
    for w in range(3):
        steps = range(w * W, (w + 1) * W)
        groups = [sb.step_rows(s) for s in steps]
        # every row of the window's W·B is trained once in it, B a step
        assert sorted(i for g in groups for i in g) == list(range(w * W * B, (w + 1) * W * B))
        work = {i: data.row_work(sb.row(i)[0], tok, 2) for g in groups for i in g}
        spans = sorted((min(work[i] for i in g), max(work[i] for i in g)) for g in groups)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # groups are runs of the sorted work
        assert [min(g) for g in groups] == sorted(min(g) for g in groups)  # trained in the order of their first row
        gaps += [hi - lo for lo, hi in spans]
        plain_gaps += [abs(work[2 * s] - work[2 * s + 1]) for s in steps]
        for s in steps:  # the rows are the plain ones, and each rank gets its share of them
            a = sb.batch(s)
            assert torch.equal(a["tokens"], data.collate([plain.row(i) for i in sb.step_rows(s)], tok.pad_id,
                                                         32)["tokens"])
            r1 = sb.batch(s, rank=1, world=2)
            assert torch.equal(r1["tokens"][0], a["tokens"][1, :r1["tokens"].shape[1]])
    assert sum(gaps) < sum(plain_gaps)  # the ranks' work is closer than in the plain order
    fresh = data.StoryBatches(tok, K, 256, B, 7, balance_window=W, unet_passes=2, **mix)
    assert torch.equal(fresh.batch(5)["images"], sb.batch(5)["images"])  # a pure function of the step, not of the cache
    with pytest.raises(ValueError, match="balance_window"):
        data.StoryBatches(tok, K, 256, B, 7, balance_window=-1)


def test_row_work_counts_diffused_images_images_and_tokens():
    tok = type("T", (), dict(bos_id=BOS, boi_id=BOI))()
    caption = [BOS] + image_run() + [5, 6, EOS]  # the image opens its document: no UNet
    drawn = [BOS, 5, 6] + image_run() + [EOS]  # text first: the UNet draws it
    assert data.row_work(caption, tok, 2) == 1 + len(caption) / 64
    assert data.row_work(drawn, tok, 2) == 2 + 1 + len(drawn) / 64
    assert data.row_work(caption + drawn, tok, 3) == 3 + 2 + (len(caption) + len(drawn)) / 64


def test_story_prefixes_are_seeded_prefixes_of_every_length():
    full = data.StoryBatches(None, K, 256, 4, 7, seed=3)
    pre = data.StoryBatches(None, K, 256, 4, 7, seed=3, prefixes=True)
    lengths = set()
    for i in range(40):
        whole, part = full.document(i), pre.document(i)
        assert len(part) % 2 == 0 and 2 <= len(part) <= len(whole)
        assert all(a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
                   for a, b in zip(part, whole))  # the story's first frames, in the story's order
        assert len(pre.document(i)) == len(part)  # the prefix is a function of (seed, story)
        lengths.add(len(part) // 2)
    assert lengths == {1, 2, 3, 4, 5}
    assert len(full.document(0)) == 2 * len(data.make_story("train", 3, 0).images)


def test_first_frame_prob_sets_the_share_of_lone_first_frames():
    uniform = data.StoryBatches(None, K, 256, 4, 7, seed=3, prefixes=True)

    def lengths(p):
        sb = data.StoryBatches(None, K, 256, 4, 7, seed=3, prefixes=True, first_frame_prob=p)
        return [len(sb.document(i)) // 2 for i in range(400)]

    assert set(lengths(1.0)) == {1}
    assert min(lengths(0.0)) == 2 and max(lengths(0.0)) == 5
    share = np.mean([n == 1 for n in lengths(0.6)])
    assert 0.53 < share < 0.67  # 400 draws: the standard error is 0.024
    # the default, a uniform prefix, makes a lone first frame of a third of the documents (E[1/L], L in 2..5)
    assert 0.25 < np.mean([len(uniform.document(i)) == 2 for i in range(400)]) < 0.39
    for bad in dict(first_frame_prob=1.5), dict(first_frame_prob=-0.1), dict(first_frame_prob=0.5, prefixes=False):
        with pytest.raises(ValueError, match="first_frame_prob"):
            data.StoryBatches(None, K, 256, 4, 7, **{"prefixes": True, **bad})


def test_shared_colour_prob_swaps_in_stories_whose_event_names_a_shared_colour():
    """With probability P a story gives way to one of a separate stream whose first event names an object whose
    colour another object shares; the others are the plain stories; seeded per story; P = 0 changes nothing."""
    plain = data.StoryBatches(None, K, 256, 4, 7, seed=3)
    half = data.StoryBatches(None, K, 256, 4, 7, seed=3, shared_colour_prob=0.5)
    shared = lambda s: data.names_shared_colour(s.objects[0], s.events[1])
    stories = [(plain.story(i), half.story(i)) for i in range(300)]
    swapped = [a.sentences != b.sentences for a, b in stories]
    assert all(shared(b) for (a, b), sw in zip(stories, swapped) if sw)  # a stand-in always names a shared colour
    assert 0.42 < np.mean(swapped) < 0.58  # 300 draws of P = 0.5: the standard error is 0.029
    assert 0.02 < np.mean([shared(a) for a, _ in stories]) < 0.15  # the plain mix: 7-8 % of stories
    assert np.mean([shared(b) for _, b in stories]) > 0.45
    again = data.StoryBatches(None, K, 256, 4, 7, seed=3, shared_colour_prob=0.5)
    assert [again.story(i).sentences for i in range(50)] == [b.sentences for _, b in stories[:50]]
    zero = data.StoryBatches(None, K, 256, 4, 7, seed=3, shared_colour_prob=0.0)
    assert [zero.story(i).sentences for i in range(50)] == [a.sentences for a, _ in stories[:50]]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="shared_colour_prob"):
            data.StoryBatches(None, K, 256, 4, 7, shared_colour_prob=bad)


def test_events_text_first_tells_every_event_before_its_image():
    coin = data.StoryBatches(None, K, 256, 4, 7, seed=3, prefixes=True, first_frame_prob=0.0)
    told = data.StoryBatches(None, K, 256, 4, 7, seed=3, prefixes=True, first_frame_prob=0.0, events_text_first=True)
    later_image_first = 0
    for i in range(60):
        a, b = coin.document(i), told.document(i)
        assert len(a) == len(b) >= 4  # the same prefix of the same story
        assert ("image" in a[0]) == ("image" in b[0])  # the first frame keeps its coin: caption or text-to-image
        for k in range(1, len(b) // 2):  # frame k of the told story: its sentence, then its image
            assert "text" in b[2 * k] and "image" in b[2 * k + 1]
            later_image_first += "image" in a[2 * k]
        same = lambda d: sorted((s.get("text", ""), s["image"].tobytes() if "image" in s else b"") for s in d)
        assert same(a) == same(b)  # only the order changed
    assert later_image_first > 30  # the coin put about half of the ~150 events after their image


def test_collate_resizes_and_pads():
    big = np.full((48, 64, 3), 200, np.uint8)
    out = data.collate([([BOS, 5], []), ([BOS] + image_run(), [big])], PAD, 32)
    assert out["tokens"].shape == (2, 2 + K) and out["tokens"][0, 2:].eq(PAD).all()
    assert out["images"].shape == (1, 3, 32, 32) and out["images_per_row"] == [0, 1]
    assert abs(out["images"].max().item() - 200 / 255) < 1e-6
