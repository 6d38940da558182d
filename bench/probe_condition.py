"""Is it the path the text takes to the UNet? probe_decoder.py with the condition path changed, side by side.

    python bench/probe_condition.py [--paths base xattn16 direct nollm coord] [probe_decoder.py flags]

Each path trains a fresh `--small` model on text-to-image documents only (probe_decoder.py: x0 target, 32 documents
per step, 300 steps, same seed and batches) with one change to how the sentence reaches the UNet:

  base     the small model as it is;
  xattn16  cross-attention at 16×16 too (the preset has it only at 8×8);
  direct   the UNet's cross-attention also reads the 40 reversed context states nearest `<BoI>` (projected, with
           their 1-D positions, zero past the segment start) next to the decoder Q-Former's tokens;
  nollm    no LLM layers in the condition: it reads the RMS-normed token embeddings (the text loss becomes a
           bigram model's; only the image rows mean anything);
  coord    CoordConv: the UNet's first convolution also sees two channels of x and y in [-1, 1], so "at the top
           left" has coordinates to bind to.

The changes are monkeypatches of model.py, so each path runs in its own process; every line of probe_decoder.py's
output is passed through, and the last lines are the table. ~6 minutes per path on a 2-core CPU (23 min for
xattn16, direct, nollm and coord).
"""
import argparse
import dataclasses
import os
import runpy
import subprocess
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "bench", "probe_decoder.py")
PATHS = ("base", "xattn16", "direct", "nollm", "coord")
N_DIRECT = 40  # context states the `direct` path hands to the cross-attention (a t2i context is <= 40 tokens)


def patch(path):
    """Change model.py's small model in this process (before probe_decoder.py builds it)."""
    sys.path.insert(0, ROOT)
    import model as M
    init, preset = M.MMInterleaved.__init__, M.preset
    if path == "xattn16":
        def small(name, **kw):
            cfg = preset(name, **kw)
            cfg.unet = dataclasses.replace(
                cfg.unet, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
            return cfg
        M.preset = small
    elif path == "direct":
        condition = M.MMInterleaved.image_condition

        def __init__(self, cfg):
            init(self, cfg)
            n = self.neg_prompt_embeds.shape[1] + N_DIRECT  # the learned negative grows with the condition
            self.neg_prompt_embeds = nn.Parameter(torch.zeros(1, n, cfg.decoder.hidden_size))
            self.direct_proj = nn.Linear(cfg.llm.dim, cfg.decoder.hidden_size)

        def image_condition(self, h, rows, cols, start):
            cond, lengths = condition(self, h, rows, cols, start)                         # (n, Q + 1, ctx)
            j = torch.arange(N_DIRECT, device=h.device)
            idx = (cols[:, None] - j[None, :]).clamp(min=0)                               # (n, N): reversed
            valid = (j[None, :] < lengths[:, None]).to(h.dtype)                            # (n, N)
            feats = self.context_feat_proj(h[rows[:, None], idx]) + self.context_pos[:N_DIRECT].to(h.dtype)
            direct = self.direct_proj(feats) * valid[..., None]                            # (n, N, ctx)
            # the pooled token stays last: unet_forward reads it there
            return torch.cat([cond[:, :-1], direct, cond[:, -1:]], 1), lengths
        M.MMInterleaved.__init__, M.MMInterleaved.image_condition = __init__, image_condition
    elif path == "nollm":
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
    rows.append(f"{path:>8} | " + lines[-1].split("|", 1)[1].strip())

print("\n    path | found | chance | extra / frame | gap t = T-1 / 0.6(T-1) / 0.3(T-1) | s/step")
print("\n".join(rows))
