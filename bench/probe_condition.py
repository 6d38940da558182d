"""Is it the path the text takes to the UNet? probe_decoder.py with the condition path changed, side by side.

    python bench/probe_condition.py [--paths base oracle ...] [probe_decoder.py flags: --steps, --eval-every, ...]

Each path trains a fresh `--small` model on text-to-image documents only (probe_decoder.py: x0 target, 32 documents
per step, 300 steps unless --steps, same seed and batches) with one change to how the sentence reaches the UNet.

The route from the LLM to the UNet:
  base     the small model as it is;
  xattn16  cross-attention at 16×16 too (run when the preset had it only at 8×8; since session 15 the
           preset has it, and this path equals base);
  nollm    no LLM layers in the condition: it reads the RMS-normed token embeddings (the text loss becomes a
           bigram model's; only the image rows mean anything);
  coord    CoordConv: the UNet's first convolution also sees two channels of x and y in [-1, 1], so "at the top
           left" has coordinates to bind to.

Binding the words of an object ("a small red square at the top left") into one thing the UNet can use:
  oracle   no language at all: the sentence is parsed (data.parse) and each named object becomes one condition
           token, the sum of learned colour, shape, size, place and slot embeddings, straight to the UNet. The
           words are bound to their objects before the UNet sees them: how well it draws when the text is understood
           (text-to-image only: with --continuations it would name the previous frame's objects);
  oracle-qformer  the same object tokens (at the LLM's width) as the decoder Q-Former's inputs in place of the
           context states: is the Q-Former in the way?
  encoder  a 2-layer bidirectional transformer over the projected context states before the decoder Q-Former,
           so each word's state can take in its neighbours ("red" its "square" and "at the top left");
  conv     the same place, a residual 1-D convolution over 9 neighbouring context states instead: each state
           becomes a linear mix of its neighbourhood by offset (n-gram features), no attention to learn;
  contrast the base plus a CLIP-style contrastive loss (weight 1) between the mean context state of each frame's
           text and the mean of its visual tokens: telling the batch's 32 scenes apart needs the text side to
           bind each colour and shape to its object;
  layout   the base plus a loss that makes the decoder Q-Former's 16 tokens, as a 4×4 grid, predict the frame's
           8×8-pixel patches through one linear head (weight 10): an object-level target at the text path's end;
  qinit    the decoder Q-Former's Linears drawn N(0, 1/fan_in) instead of HF's N(0, 0.02): at init its tokens
           vary across prompts by 16 % of their scale instead of 1.4 %.

`base` is the preset as it is now: MMConfig.back_tokens = 6 (each LLM state also names the 6 tokens before it)
and direct_context = 40 (the UNet's cross-attention also reads the 40 context states nearest `<BoI>`, past the
decoder Q-Former). EXPERIMENTS.md's tables from before they were in the preset ran with `--back-tokens 0
--direct-context 0`; its `direct` row with `--back-tokens 0`. oracle, oracle-qformer, encoder and conv build the
whole condition themselves, so they always run with direct_context 0.

The changes are monkeypatches of model.py, so each path runs in its own process; every line of probe_decoder.py's
output is passed through, and the last lines are the table. On a 2-core CPU a path takes ~6 minutes at 300 steps
and 13-16 minutes at `--steps 600 --eval-every 300` (EXPERIMENTS.md's binding table; 731-881 s of training).
"""
import argparse
import dataclasses
import math
import os
import re
import runpy
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "bench", "probe_decoder.py")
PATHS = ("base", "xattn16", "nollm", "coord", "oracle", "oracle-qformer", "encoder", "conv", "contrast",
         "layout", "qinit")


def patch(path):
    """Change model.py's small model in this process (before probe_decoder.py builds it)."""
    sys.path.insert(0, ROOT)
    import model as M
    init, preset = M.MMInterleaved.__init__, M.preset
    if path in ("oracle", "oracle-qformer", "encoder", "conv"):  # their image_condition makes the whole condition
        M.preset = lambda name, **kw: preset(name, **{**kw, "direct_context": 0})
    if path == "xattn16":
        def small(name, **kw):
            cfg = preset(name, **kw)
            cfg.unet = dataclasses.replace(
                cfg.unet, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
            return cfg
        M.preset = small
    if path == "nollm":
        def hidden_states(self, tokens, images, images_per_row):
            _, pyramid = self.encode_images(images) if len(images) else (None, [])
            return self.llm.model.norm(self.llm.model.embed_tokens(tokens)), pyramid      # (B, T, dim)
        M.MMInterleaved.hidden_states = hidden_states
    elif path == "coord":
        class CoordIn(nn.Module):
            def __init__(self, conv):
                super().__init__()
                self.conv = nn.Conv2d(conv.in_channels + 2, conv.out_channels, 3, padding=1)

            def forward(self, x):
                B, _, H, W = x.shape
                ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)[:, None].expand(H, W)
                xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)[None, :].expand(H, W)
                return self.conv(torch.cat([x, torch.stack([ys, xs])[None].expand(B, -1, -1, -1)], 1))

        def __init__(self, cfg):
            init(self, cfg)
            self.unet.conv_in = CoordIn(self.unet.conv_in)
        M.MMInterleaved.__init__ = __init__
    elif path in ("oracle", "oracle-qformer"):
        import data
        import llm
        train, kept = llm.Tokenizer.train, {}

        def keep_tokenizer(*a, **kw):  # probe_decoder.py trains its tokenizer; the condition decodes with it
            kept["tok"] = train(*a, **kw)
            return kept["tok"]
        llm.Tokenizer.train = staticmethod(keep_tokenizer)
        states = M.MMInterleaved.hidden_states
        vocab = {"colour": data.COLOURS, "shape": data.SHAPES, "size": data.SIZES, "place": data.PLACES}
        direct = path == "oracle"  # else the object tokens are the decoder Q-Former's inputs, at the LLM's width

        def __init__(self, cfg):
            init(self, cfg)
            n = self.neg_prompt_embeds.shape[1] - 1  # 16 object slots (+ the pooled token)
            d = cfg.decoder.hidden_size if direct else cfg.llm.dim
            self.oracle = nn.ModuleDict({k: nn.Embedding(len(v), d) for k, v in vocab.items()})
            self.oracle["slot"] = nn.Embedding(n, d)
            self.oracle_empty = nn.Parameter(torch.randn(d))  # an unused slot

        def hidden_states(self, tokens, images, images_per_row):
            self.oracle_tokens = tokens  # image_condition reads the sentence from here
            return states(self, tokens, images, images_per_row)

        def image_condition(self, h, rows, cols, start):
            emb, n = self.oracle, self.neg_prompt_embeds.shape[1] - 1
            slots, pooled = [], []
            for r, c, s in zip(rows.tolist(), cols.tolist(), start.tolist()):
                text = kept["tok"].decode(self.oracle_tokens[r, s:c].tolist())  # the segment before its <BoI>
                m = re.search(r"there (?:is|are) [^.]*\.", text, re.IGNORECASE)
                objs = data.parse(m[0]) if m else []
                # the sum of 4 N(0, 1) embeddings, halved: about unit scale per channel
                tok = torch.stack([sum(emb[k].weight[vocab[k].index(getattr(o, k))] for k in vocab) / 2
                                   for o in objs]) if objs else h.new_zeros(0, emb["slot"].embedding_dim)
                tok = tok + emb["slot"].weight[:len(objs)]                                        # (m, d)
                pooled.append(tok.mean(0) if objs else self.oracle_empty)                         # (d,)
                slots.append(torch.cat([tok, self.oracle_empty.expand(n - len(objs), -1)]))      # (n, d)
            slots, pooled = torch.stack(slots).to(h.dtype), torch.stack(pooled).to(h.dtype)
            if direct:
                return torch.cat([slots, pooled[:, None]], 1), cols - start + 1                 # (ΣI, n + 1, ctx)
            cond = self.decoder(slots, slots.new_ones(slots.shape[:2]))                          # (ΣI, Q, ctx)
            return torch.cat([cond, self.pooled_ctx_proj(pooled)[:, None]], 1), cols - start + 1
        M.MMInterleaved.__init__, M.MMInterleaved.hidden_states = __init__, hidden_states
        M.MMInterleaved.image_condition = image_condition
    elif path in ("encoder", "conv"):
        class Conv(nn.Module):
            def __init__(self, d):
                super().__init__()
                self.conv = nn.Conv1d(d, d, 9, padding=4)

            def forward(self, x, src_key_padding_mask):
                keep = (~src_key_padding_mask)[..., None].to(x.dtype)                     # (n, L, 1)
                return x + self.conv((x * keep).transpose(1, 2)).transpose(1, 2) * keep

        def __init__(self, cfg):
            init(self, cfg)
            d = cfg.llm.dim
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.context_encoder = (nn.TransformerEncoder(layer, 2, enable_nested_tensor=False) if path == "encoder"
                                    else Conv(d))

        def image_condition(self, h, rows, cols, start):  # model.py's, with the encoder before the decoder
            lengths = cols - start + 1
            L = int(lengths.max())
            j = torch.arange(L, device=h.device)
            idx = (cols[:, None] - j[None, :]).clamp(min=0)
            valid = j[None, :] < lengths[:, None]
            feats = self.context_feat_proj(h[rows[:, None], idx] * valid[..., None])
            mask = valid.to(feats.dtype)
            x = self.context_encoder(feats + self.context_pos[:L].to(h.dtype), src_key_padding_mask=~valid)
            cond = self.decoder(x, mask)
            if self.pooled_ctx_proj is not None:
                mean = (x * mask[..., None]).sum(1) / lengths[:, None].to(x.dtype)
                cond = torch.cat([cond, self.pooled_ctx_proj(mean)[:, None]], 1)
            return cond, lengths
        M.MMInterleaved.__init__, M.MMInterleaved.image_condition = __init__, image_condition
    elif path == "contrast":
        encode, condition, forward = (M.MMInterleaved.encode_images, M.MMInterleaved.image_condition,
                                      M.MMInterleaved.forward)

        def __init__(self, cfg):
            init(self, cfg)
            d = cfg.llm.dim
            self.text_proj, self.image_proj = nn.Linear(d, d), nn.Linear(d, d)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

        def encode_images(self, images):
            visual, pyramid = encode(self, images)
            self.seen_visual = visual                                                    # (ΣI, K, dim)
            return visual, pyramid

        def image_condition(self, h, rows, cols, start):
            lengths = cols - start + 1
            L = int(lengths.max())
            j = torch.arange(L, device=h.device)
            valid = (j[None, :] < lengths[:, None]).to(h.dtype)
            ctx = h[rows[:, None], (cols[:, None] - j[None, :]).clamp(min=0)] * valid[..., None]
            self.seen_text = ctx.sum(1) / lengths[:, None].to(h.dtype)                   # (ΣI, dim): mean context
            return condition(self, h, rows, cols, start)

        def forward_(self, tokens, images, images_per_row, generator=None, counts=None):
            out = forward(self, tokens, images, images_per_row, generator, counts)
            t = F.normalize(self.text_proj(self.seen_text), dim=-1)
            v = F.normalize(self.image_proj(self.seen_visual.mean(1)), dim=-1)
            logits = self.logit_scale.exp().clamp(max=100) * t @ v.T                     # (ΣI, ΣI)
            target = torch.arange(len(t), device=t.device)
            aux = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            return {**out, "loss": out["loss"] + aux}
        M.MMInterleaved.__init__, M.MMInterleaved.encode_images = __init__, encode_images
        M.MMInterleaved.image_condition, M.MMInterleaved.forward = image_condition, forward_

    elif path == "layout":
        condition, forward = M.MMInterleaved.image_condition, M.MMInterleaved.forward

        def __init__(self, cfg):
            init(self, cfg)
            side = math.isqrt(cfg.decoder.num_queries)        # 16 tokens -> a 4×4 grid of regions
            self.layout_patch = cfg.image_size // side          # 8 px
            self.layout_head = nn.Linear(cfg.decoder.hidden_size, 3 * self.layout_patch ** 2)

        def image_condition(self, h, rows, cols, start):
            cond, lengths = condition(self, h, rows, cols, start)
            self.seen_cond, self.seen_lengths = cond, lengths
            return cond, lengths

        def forward_(self, tokens, images, images_per_row, generator=None, counts=None):
            out = forward(self, tokens, images, images_per_row, generator, counts)
            p, q = self.layout_patch, self.cfg.decoder.num_queries
            x0 = self.to_diffusion_space(images)                                         # (ΣI, 3, s, s)
            target = F.unfold(x0, p, stride=p).transpose(1, 2)                           # (ΣI, Q, 3·p·p)
            pred = self.layout_head(self.seen_cond[:, :q])                               # (ΣI, Q, 3·p·p)
            keep = (self.seen_lengths > 2).to(pred.dtype)                                # images with a loss
            aux = ((pred - target).pow(2).mean((1, 2)) * keep).sum() / max(len(keep), 1)
            return {**out, "loss": out["loss"] + self.cfg.loss_img_weight * aux}
        M.MMInterleaved.__init__, M.MMInterleaved.image_condition = __init__, image_condition
        M.MMInterleaved.forward = forward_

    elif path == "qinit":
        def __init__(self, cfg):
            init(self, cfg)
            for m in self.decoder.modules():  # variance-preserving N(0, 1/fan_in) instead of HF's N(0, 0.02)
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=m.in_features ** -0.5)
        M.MMInterleaved.__init__ = __init__


if len(sys.argv) > 2 and sys.argv[1] == "--run-one":  # a child: one path, then probe_decoder.py as a script
    path, rest = sys.argv[2], sys.argv[3:]
    patch(path)
    if "--frames" in rest:  # one picture per path
        i = rest.index("--frames") + 1
        rest[i] = f"-{path}".join(os.path.splitext(rest[i]))
    sys.argv = [PROBE, "--variants", "x0", *rest]
    runpy.run_path(PROBE, run_name="__main__")
    sys.exit(0)

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="condition paths to compare")
args, rest = ap.parse_known_args()  # the rest goes to probe_decoder.py (--steps, --n, --frames, ...)
rows = []
for path in args.paths:
    print(f"--- {path}", flush=True)
    proc = subprocess.Popen([sys.executable, __file__, "--run-one", path, *rest], stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if proc.wait():
        sys.exit(f"probe_condition.py: error: the {path} run failed (exit {proc.returncode})")
    rows.append(f"{path:>14} | " + lines[-1].split("|", 1)[1].strip())

print("\n          path | found | chance | extra / frame | gap t = T-1 / 0.6(T-1) / 0.3(T-1) | s/step")
print("\n".join(rows))
