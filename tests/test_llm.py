"""llm.py: HF parity (sharded, GQA, tied), KV cache, MMFS gating and the §3.4 visibility rule, tokenizer, bad input.

Tolerances: float32 parity with transformers 1e-5 (same op order, so usually exact); float64 invariants 1e-9.
Nothing here depends on which msda backend mmfs.py picks (both are checked against each other in test_mmfs.py).
"""
import json
import os
import random
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import llm
import weights
from llm import LLaMA, PRESETS, Tokenizer, generate, image_visibility, insert_visual_tokens

TINY = PRESETS["tiny"]
BOS, BOI, IMG, K = 1, TINY.vocab_size - 2, TINY.vocab_size - 1, 3  # the ids the sequences below use
F64 = dict(atol=1e-9, rtol=1e-9)


def hf_llama(tmp_path, kv_heads=4, tie=False, shard="24KB"):
    """A tiny random transformers LlamaForCausalLM saved sharded; returns (hf model, directory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=tie,
                      rope_theta=500.0, rms_norm_eps=1e-5)  # not our default eps: the config must be read
    model = LlamaForCausalLM(cfg).float().eval()
    path = tmp_path / "hf"
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard)
    return model, path


def make_row(rng, T, n_max):
    """Random text ids with `<s>` document starts and images written as <BoI> + K <image>; returns (ids, n_images)."""
    row, n = [BOS], 0
    while len(row) < T:
        r = rng.random()
        if r < 0.12 and len(row) + 1 + K <= T and n < n_max:
            row += [BOI] + [IMG] * K
            n += 1
        elif r < 0.17:
            row.append(BOS)
        else:
            row.append(rng.randrange(3, BOI))
    return row, n


def mm_inputs(seed, B=2, T=24, n_max=3, cfg=TINY, dtype=torch.float64):
    """Tokens (B, T) with images, image features (B, n_max, S, C) and the (B, T, n_max) visibility."""
    rng = random.Random(seed)
    tokens = torch.tensor([make_row(rng, T, n_max)[0] for _ in range(B)])
    g = torch.Generator().manual_seed(seed)
    S = sum(s * s for s in cfg.mmfs_levels)
    images = torch.randn(B, n_max, S, cfg.image_dim, generator=g, dtype=dtype)
    return tokens, images, image_visibility(tokens, BOS, BOI, n_max)


def mm_model(cfg=TINY, seed=0, gate=0.7):
    """A tiny MMFS-LLaMA in float64 with non-zero gates (so images matter)."""
    torch.manual_seed(seed)
    model = LLaMA(cfg).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, llm.CrossAttention):
                m.gate.fill_(gate)
    return model


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("kv_heads,tie", [(4, False), (2, False), (2, True)])
def test_hf_parity_sharded(tmp_path, kv_heads, tie):
    hf, path = hf_llama(tmp_path, kv_heads, tie)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    ours = LLaMA.from_pretrained(path).eval()
    assert ours.cfg.n_kv_heads == kv_heads and ours.cfg.rope_theta == 500.0 and ours.cfg.mmfs_every == 0
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie
    x = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        logits, hidden = ours(x, return_hidden=True)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden, ref.hidden_states[-1], atol=1e-5, rtol=1e-5)  # final-normed state


def test_from_pretrained_adds_initialised_mmfs(tmp_path):
    hf, path = hf_llama(tmp_path)
    mm = dict(image_dim=16, mmfs_levels=(4, 2), mmfs_base=4, mmfs_heads=2, mmfs_points=2, max_images=8)
    ours = LLaMA.from_pretrained(path, mmfs_every=2, **mm).eval()
    names = [n for n, _ in ours.named_parameters()]
    assert "model.layers.0.llama_cross_attn.gate" in names  # the authors' parameter-group substrings
    assert "model.layers.0.llama_cross_attn.attn.sampling_offsets.weight" in names
    assert not any("layers.1.llama_cross_attn" in n for n in names)
    block = ours.model.layers[0].llama_cross_attn
    assert block.gate.item() == 0 and block.attn.sampling_offsets.weight.abs().max() == 0
    tokens, images, mask = mm_inputs(2, T=20, cfg=replace(TINY, **mm), dtype=torch.float32)
    tokens = tokens.clamp(max=95)
    with torch.no_grad():  # gates at 0: the images change nothing, the base model's logits come out
        torch.testing.assert_close(ours(tokens, images=images, image_mask=mask), hf(tokens).logits,
                                   atol=1e-5, rtol=1e-5)
    grown = LLaMA.from_pretrained(path, vocab_size=98)
    assert grown.model.embed_tokens.weight.shape == (98, 32) and grown.lm_head.weight.shape == (98, 32)
    torch.testing.assert_close(grown.lm_head.weight[:96], hf.lm_head.weight.detach())


def test_fresh_init_follows_authors():
    model = LLaMA(TINY)
    for i, layer in enumerate(model.model.layers):
        a = layer.llama_cross_attn.attn
        assert layer.llama_cross_attn.gate.item() == 0
        assert 0.012 < a.attention_weights.weight.std().item() < 0.028  # HF init N(0, 0.02), not MMFS's own
        assert 0.015 < a.dynamic_offset_mask.weight.std().item() < 0.025
        assert a.sampling_offsets.weight.abs().max() == 0 and a.attention_weights.bias.abs().max() == 0
        assert a.sampling_offsets.bias.abs().max() <= TINY.mmfs_offset_init
    assert 0.018 < model.lm_head.weight.std().item() < 0.022


def test_mmfs_first_moves_the_blocks():
    """mmfs_first: MMFS blocks in layers first, first + every, ...; 0 (the paper's) keeps layers 0, every, ..."""
    assert [replace(TINY, n_layers=4, mmfs_every=2).has_mmfs(i) for i in range(4)] == [True, False, True, False]
    cfg = replace(TINY, n_layers=4, mmfs_every=2, mmfs_first=1)
    assert [cfg.has_mmfs(i) for i in range(4)] == [False, True, False, True]
    assert [layer.llama_cross_attn is not None for layer in LLaMA(cfg).model.layers] == [False, True, False, True]
    late = replace(TINY, n_layers=5, mmfs_every=1, mmfs_first=3)
    assert [late.has_mmfs(i) for i in range(5)] == [False, False, False, True, True]
    assert not any(replace(TINY, n_layers=4, mmfs_every=0, mmfs_first=1).has_mmfs(i) for i in range(4))


# ---------------------------------------------------------------------------------------------------------------
# MMFS inside the LLM


def test_zero_gate_equals_plain_llama():
    torch.manual_seed(3)
    mm = LLaMA(TINY).double().eval()
    plain = LLaMA(replace(TINY, mmfs_every=0)).double().eval()
    plain.load_state_dict({k: v for k, v in mm.state_dict().items() if "llama_cross_attn" not in k})
    tokens, images, mask = mm_inputs(4)
    with torch.no_grad():
        base = plain(tokens)
        torch.testing.assert_close(mm(tokens, images=images, image_mask=mask), base, atol=0, rtol=0)
        mm.model.layers[0].llama_cross_attn.gate.fill_(0.5)
        assert (mm(tokens, images=images, image_mask=mask) - base).abs().max() > 1e-6  # a live gate does matter


def test_visibility_handmade():
    # row 0: <s> a <BoI> i i b <s> <BoI> i i c ; row 1: no <s>, one image, one padded slot
    A, I = 5, IMG
    tokens = torch.tensor([[BOS, A, BOI, I, I, A, BOS, BOI, I, I, A],
                           [A, BOI, I, I, A, A, A, A, A, A, A]])
    vis = image_visibility(tokens, BOS, BOI, 3)
    want = torch.zeros(2, 11, 3, dtype=torch.bool)
    want[0, 3:6, 0] = True   # image 0 from its first placeholder to the end of its document (the <BoI> itself: no)
    want[0, 8:, 1] = True    # the second document sees only its own image
    want[1, 2:, 0] = True    # no <s>: every earlier image is visible
    assert torch.equal(vis, want)
    # more <BoI>s than image slots (generation stopped at a <BoI>): the extra one opens nothing
    vis = image_visibility(torch.tensor([[BOI, I, BOI, I, BOI]]), BOS, BOI, 2)
    assert vis[0].tolist() == [[False, False], [True, False], [True, False], [True, True], [True, True]]
    # rows with fewer real images than <BoI>s (padded batch, truncated image): only the first images_per_row count
    tokens = torch.tensor([[BOS, BOI, I, A, BOI, I, A], [BOS, BOI, I, A, BOI, A, A]])
    vis = image_visibility(tokens, BOS, BOI, 2, images_per_row=[2, 1])
    assert vis[0, 5:, 1].all() and not vis[1, :, 1].any() and vis[1, 2:, 0].all()


@settings(deadline=None, max_examples=6)
@given(st.integers(0, 10_000))
def test_token_output_ignores_images_it_cannot_see(seed):
    # One layer with MMFS after self-attention: token t's logits depend on image k exactly when t sees k (§3.4).
    cfg = replace(TINY, n_layers=1)
    model = mm_model(cfg, seed)
    tokens, images, mask = mm_inputs(seed, B=2, T=20, n_max=3, cfg=cfg)
    with torch.no_grad():
        base = model(tokens, images=images, image_mask=mask)
        for k in range(3):
            other = images.clone()
            other[:, k] += torch.randn_like(other[:, k])
            changed = (model(tokens, images=other, image_mask=mask) - base).abs().amax(-1) > 1e-12  # (B, T)
            assert torch.equal(changed, mask[:, :, k])
    # Two layers: self-attention carries image k only forward, never to tokens before its first placeholder.
    model = mm_model(TINY, seed)
    with torch.no_grad():
        base = model(tokens, images=images, image_mask=mask)
        for k in range(3):
            other = images.clone()
            other[:, k] += 1.0
            changed = (model(tokens, images=other, image_mask=mask) - base).abs().amax(-1) > 1e-12
            seen = mask[:, :, k].long().cummax(1).values.bool()  # from the first token that sees k
            assert not (changed & ~seen).any()


# ---------------------------------------------------------------------------------------------------------------
# KV cache and generation


@settings(deadline=None, max_examples=5)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_incremental_decoding_equals_full_forward(seed, chunk):
    model = mm_model(TINY, seed)
    tokens, images, mask = mm_inputs(seed, B=2, T=22)
    with torch.no_grad():
        full = model(tokens, images=images, image_mask=mask)
        cache = model.new_cache(2, 32)
        pieces, start = [], 0
        for size in [7] + [chunk] * 20:  # a prefill, then chunks of 1..6 tokens (1 = ordinary decoding)
            end = min(start + size, 22)
            if start == end:
                break
            pieces.append(model(tokens[:, start:end], images=images, image_mask=mask[:, start:end], cache=cache,
                                start_pos=start))
            start = end
    torch.testing.assert_close(torch.cat(pieces, 1), full, **F64)


def test_generate_cache_equals_no_cache_and_stops():
    model = mm_model(TINY, 5)
    tokens, images, _ = mm_inputs(5, B=2, T=12)
    kw = dict(images=images, bos_id=BOS, boi_id=BOI)
    a = generate(model, tokens, 15, **kw)
    b = generate(model, tokens, 15, use_cache=False, **kw)
    assert a == b and all(len(r) == 15 for r in a)
    stop = a[0][4]  # stop at a token row 0 is known to produce
    c = generate(model, tokens, 15, stop_ids=(stop,), **kw)
    assert c[0] == a[0][:a[0].index(stop) + 1]
    # inputs_embeds in place of the prompt ids (as model.py does after inserting visual tokens) gives the same
    embeds = model.model.embed_tokens(tokens)
    assert generate(model, tokens, 15, inputs_embeds=embeds, **kw) == a
    assert generate(model, tokens, 15, inputs_embeds=embeds, use_cache=False, **kw) == a


def test_cached_decoding_projects_images_once():
    """With the KV cache each MMFS layer projects the image features once, not once per generated token."""
    model = mm_model(TINY, 5)
    tokens, images, _ = mm_inputs(5, B=2, T=12)
    blocks = [m for m in model.modules() if isinstance(m, llm.CrossAttention)]
    calls = []
    hooks = [b.attn.value_proj.register_forward_hook(lambda *a: calls.append(1)) for b in blocks]
    generate(model, tokens, 6, images=images, bos_id=BOS, boi_id=BOI)
    cached = len(calls)
    generate(model, tokens, 6, images=images, bos_id=BOS, boi_id=BOI, use_cache=False)
    for h in hooks:
        h.remove()
    assert cached == len(blocks) and len(calls) - cached == 6 * len(blocks)


def test_cache_notices_images_edited_in_place():
    """The per-layer MMFS value memo must not serve stale projections after `images` changes in place."""
    model = mm_model(TINY, 7)
    tokens, images, mask = mm_inputs(7, B=2, T=12)
    block = model.model.layers[0].llama_cross_attn
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        model(tokens[:, :6], images=images, image_mask=mask[:, :6], cache=cache)
        images.add_(torch.randn_like(images))  # e.g. a placeholder replaced by the generated image
        model(tokens[:, 6:], images=images, image_mask=mask[:, 6:], cache=cache, start_pos=6)
        torch.testing.assert_close(cache.mmfs[0]["values"], block.attn.value_proj(block.norm2(images)), **F64)


def test_sampling_is_seeded_and_top_p_limits():
    model = mm_model(TINY, 6)
    prompt = torch.tensor([[BOS, 7, 8, 9]])

    def run(seed, **kw):
        return generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert run(1) == run(1)
    assert run(1) != run(2) or run(1) != run(3)
    assert run(1, top_p=1e-9) == generate(model, prompt, 12)  # the nucleus of mass ~0 is the arg-max token
    logits = torch.tensor([[0.0, 10.0, 9.9, -5.0]])
    picks = {int(llm.sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {1, 2}


def test_gradient_checkpointing_same_grads():
    model = mm_model(TINY, 7).train()
    tokens, images, mask = mm_inputs(7)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(tokens, images=images, image_mask=mask).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("llama_cross_attn.gate" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], **F64)


def test_insert_visual_tokens():
    tokens = torch.tensor([[BOS, BOI, IMG, IMG, 5, 6], [BOI, IMG, IMG, 7, 8, 9]])
    embeds = torch.randn(2, 6, 4, dtype=torch.float64)
    visual = torch.randn(2, 2, 4, dtype=torch.float64)
    boi = torch.randn(4, dtype=torch.float64)
    out = insert_visual_tokens(embeds, tokens, visual, IMG, BOI, boi)
    torch.testing.assert_close(out[0, 2:4], visual[0])
    torch.testing.assert_close(out[1, 1:3], visual[1])
    torch.testing.assert_close(out[:, [1]][0], embeds[0, [1]] + boi)
    torch.testing.assert_close(out[1, 0], embeds[1, 0] + boi)
    torch.testing.assert_close(out[0, [0, 4, 5]], embeds[0, [0, 4, 5]])
    with pytest.raises(ValueError, match="4 <image> slots"):
        insert_visual_tokens(embeds, tokens, visual[:1], IMG)


def test_text_head_starts_as_lm_head_with_new_logits_at_minus_5():
    model = LLaMA(TINY).double()
    head = llm.TextHead(TINY.dim, TINY.vocab_size).double().init_from(model.lm_head)
    h = torch.randn(2, 5, TINY.dim, dtype=torch.float64)
    logits = head(h)
    torch.testing.assert_close(logits[..., :-2], model.lm_head(h)[..., :-2], **F64)
    torch.testing.assert_close(logits[..., -2:], torch.full((2, 5, 2), -5.0, dtype=torch.float64), **F64)
    assert [n for n, p in head.named_parameters() if p.requires_grad] == ["head_new.weight", "head_new.bias"]


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    rng = random.Random(0)
    words = "a red green blue circle square triangle moves left right up down appears disappears the".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randrange(3, 12))) + "." for _ in range(200)]
    out = tmp_path_factory.mktemp("sp")
    tok = Tokenizer.train(texts, out / "a", 320)
    tok.again = Tokenizer.train(texts, out / "b", 320)
    return tok


def test_tokenizer_ids_and_determinism(tok):
    assert tok.n_vocab == 322 and (tok.boi_id, tok.image_id) == (320, 321)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3) and tok.sp.id_to_piece(3) == "<pad>"
    assert tok.image_tokens(3) == [320, 321, 321, 321]
    pieces = lambda t: [(t.sp.id_to_piece(i), t.sp.get_score(i)) for i in range(t.sp.get_piece_size())]
    assert pieces(tok) == pieces(tok.again)  # same corpus, same model
    ids = tok.encode("a red circle<BoI><image><image> moves", eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(tok.image_id) == 2 and ids.count(tok.boi_id) == 1
    assert ids[ids.index(tok.boi_id) + 1] == tok.image_id
    assert tok.decode(ids) == "a red circle<BoI><image><image> moves"
    with pytest.raises(ValueError, match="322 ids"):
        LLaMA(TINY).check_vocab(tok)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.one_of(st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",))),
                          st.sampled_from(["<BoI>", "<image>", " <image>", "<BoI> "])), max_size=6))
def test_tokenizer_round_trip(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text, bos=True, eos=True)
    assert all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


def byte_pieces(tok, text):
    """The characters of text that encode into byte-fallback pieces (`<0x..>`)."""
    return sorted(c for c in set(text) if not c.isspace()
                  and any(tok.sp.id_to_piece(i).startswith("<0x") for i in tok.sp.encode(c)))


def test_fold_case_lowers_only_letters_the_tokenizer_never_saw(tok, tmp_path):
    text = "The Red CIRCLE moves Left!  Ÿ"
    assert tok.unseen(text) == byte_pieces(tok, text) == ["!", "C", "E", "I", "L", "R", "T", "Ÿ"]
    folded, lowered, unseen = tok.fold_case(text)
    assert folded == "the red circle moves left!  Ÿ"  # ÿ was never seen either, so Ÿ stays
    assert lowered == ["C", "E", "I", "L", "R", "T"] and unseen == ["!", "Ÿ"] == byte_pieces(tok, folded)
    assert tok.fold_case("a red circle.") == ("a red circle.", [], [])
    capitals = Tokenizer.train(["The Red circle moves.", "the red square."] * 50, tmp_path / "cap", 300)
    assert capitals.fold_case("The Red circle") == ("The Red circle", [], [])  # it knows T and R: nothing folds


@settings(deadline=None, max_examples=60)
@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_fold_case_changes_only_the_folded_letters(tok, text):
    folded, lowered, unseen = tok.fold_case(text)
    assert folded == "".join(c.lower() if c in lowered else c for c in text) and tok.unseen(folded) == unseen
    assert all(c in tok.unseen(text) and c.lower() != c and not tok.unseen(c.lower()) for c in lowered)


def test_tokenizer_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "junk.model")


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_checkpoints(tmp_path):
    _, path = hf_llama(tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # a shard file that lost one tensor: the key is named
    victim = shards[-1]
    state = load_file(path / victim)
    dropped = sorted(state)[0]
    save_file({k: v for k, v in state.items() if k != dropped}, path / victim)
    with pytest.raises(weights.WeightsError, match=f"missing keys: {dropped}"):
        LLaMA.from_pretrained(path)
    # a deleted shard and an index naming a file that does not exist: the file is named
    os.remove(path / victim)
    with pytest.raises(weights.WeightsError, match=victim):
        LLaMA.from_pretrained(path)
    index["weight_map"][dropped] = "model-99-of-99.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(weights.WeightsError, match="model-99-of-99.safetensors"):
        LLaMA.from_pretrained(path)
    os.remove(path / "config.json")
    with pytest.raises(weights.WeightsError, match="config.json"):
        LLaMA.from_pretrained(path)


def test_bad_model_inputs():
    model = LLaMA(TINY).eval()
    with pytest.raises(ValueError, match="longer than max_seq_len = 128"):
        model(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(torch.tensor([[1, TINY.vocab_size]]))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    tokens, images, mask = mm_inputs(0, dtype=torch.float32)
    with pytest.raises(ValueError, match="image_mask must be"):
        model(tokens, images=images)
    with pytest.raises(ValueError, match="exceed max_seq_len = 128"):
        generate(model, torch.ones(1, 120, dtype=torch.long), 20)
    with pytest.raises(ValueError, match="needs the KV cache"):
        model(tokens[:, 3:], start_pos=3)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        model(tokens, cache=model.new_cache(2, 8))
