"""MMFS, the Multi-Modal Feature Synchronizer (paper §3.2, Fig. 3), and the deformable sampling core it runs on.

Read bottom-up: fixed sin-cos position tables, the sampling core (`msda_reference`, the readable `grid_sample`
oracle, and `msda`, which dispatches to the fused numba kernel of kernels/msda.py), then the `MMFS` module.

Notation (as in the reference notes): n image slots, L levels per image, P sampling points, M heads,
D = channels per head, Lq queries. MMFS folds images into the level axis: the sampling core sees n·L "levels".
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.msda import check_inputs, msda_fused, supports

# ----------------------------------------------------------------------------------------------------------------
# fixed sin-cos position tables (reference §4.3: [sin(p·w_k), cos(p·w_k)], w_k = 10000^(-k/(dim/2)))


def sincos(dim, pos):
    """Sin-cos embedding of float positions `pos` (N,) -> (N, dim), first half sin, second half cos."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angles = pos.double()[:, None] * omega[None, :]                                     # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()                       # (N, dim)


def sincos_1d(dim, n):
    """1-D table for positions 0..n-1 -> (n, dim); used for the image-decoder context (reference §5.1)."""
    return sincos(dim, torch.arange(n))


def sincos_2d(dim, h, w):
    """2-D table of an h×w grid -> (h·w, dim), row-major; first half encodes the row (y), second the column (x)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")        # (h, w) each
    return torch.cat([sincos(dim // 2, rows.flatten()), sincos(dim // 2, cols.flatten())], dim=1)  # (h·w, dim)


def pos_embed_2d(dim, grid, h, w):
    """A grid×grid sin-cos table bicubic-resized to h×w -> (h·w, dim), as the authors add to pyramids and UNet maps."""
    table = sincos_2d(dim, grid, grid)                                                  # (grid², dim)
    if (h, w) == (grid, grid):
        return table
    table = table.T.reshape(1, dim, grid, grid)                                         # (1, dim, grid, grid)
    table = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)      # (1, dim, h, w)
    return table.reshape(dim, h * w).T.contiguous()                                     # (h·w, dim)


# ----------------------------------------------------------------------------------------------------------------
# the sampling core: multi-scale deformable attention (Deformable DETR, Zhu et al. 2021, eq. 3) without projections


def msda_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Σ_l Σ_p w[l,p] · bilinear(V_l, loc[l,p]) with grid_sample(2·loc−1, zeros, align_corners=False): the oracle."""
    B, S, M, D = value.shape
    Q, Lv, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    grids = 2 * sampling_locations - 1                                                  # (B, Q, M, Lv, P, 2) in [-1, 1]
    out = value.new_zeros(B * M, D, Q)                                                  # (B·M, D, Q)
    for level, (H, W) in enumerate(spatial_shapes.tolist()):
        start = int(level_start_index[level])
        v = value[:, start:start + H * W]                                               # (B, H·W, M, D)
        v = v.permute(0, 2, 3, 1).reshape(B * M, D, H, W)                               # (B·M, D, H, W)
        g = grids[:, :, :, level].transpose(1, 2).reshape(B * M, Q, P, 2)               # (B·M, Q, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B·M, D, Q, P)
        w = attention_weights[:, :, :, level].transpose(1, 2).reshape(B * M, 1, Q, P)   # (B·M, 1, Q, P)
        out = out + (s * w).sum(-1)                                                     # (B·M, D, Q)
    return out.view(B, M, D, Q).permute(0, 3, 1, 2).reshape(B, Q, M * D)               # (B, Q, M·D)


# "auto": the fused kernel when kernels/msda.py supports the tensor's device and dtype, else the reference.
# Tests set this to "reference" or "fused" to force one path.
BACKEND = "auto"


def msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable sampling through the fast path when there is one; same arguments as msda_reference."""
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_inputs(*args)
    if BACKEND not in ("auto", "fused", "reference"):
        raise ValueError(f"mmfs.BACKEND must be 'auto', 'fused' or 'reference', not {BACKEND!r}")
    if BACKEND == "reference" or (BACKEND == "auto" and not supports(value)):
        return msda_reference(*args)
    return msda_fused(*args)


# ----------------------------------------------------------------------------------------------------------------
# the module


def _pairs(shapes):
    """Spatial shapes as (H, W) pairs: ints mean square maps."""
    return [(s, s) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in shapes]


class MMFS(nn.Module):
    """Multi-image, multi-scale deformable cross-attention from queries to the feature pyramids of visible images.

    Each query makes one copy of itself per image slot (tagged with the image's relative index), predicts P offsets
    per head around its reference point, and reads every level of every image there; one softmax spans
    images × levels × points plus a sink worth one key of logit 0, so weak evidence shrinks the output.
    """

    def __init__(self, d_model, n_levels, n_heads, n_points, spatial_shapes, base_spatial_shape, d_query=None,
                 d_value=None, d_out=None, ratio=1.0, offset_init_magnitude=3.0, max_num_image_per_seq=50):
        super().__init__()
        d_query, d_value, d_out = d_query or d_model, d_value or d_model, d_out or d_model
        dv = int(d_model * ratio)  # width of the projected values and of the sampled output
        if dv % n_heads:
            raise ValueError(f"MMFS: value width int(d_model·ratio) = {dv} is not divisible by n_heads = {n_heads}")
        if len(spatial_shapes) != n_levels:
            raise ValueError(f"MMFS: {len(spatial_shapes)} spatial_shapes given for n_levels = {n_levels}")
        self.d_query, self.d_value, self.dv = d_query, d_value, dv
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.spatial_shapes = _pairs(spatial_shapes)
        self.base = _pairs([base_spatial_shape])[0]
        self.offset_init_magnitude = offset_init_magnitude
        self.max_num_image_per_seq = max_num_image_per_seq

        self.sampling_offsets = nn.Linear(d_query, n_heads * n_points * 2)  # one (x, y) per head, point; all levels
        self.dynamic_offset_mask = nn.Linear(d_query, d_query)  # per-image query map (just a linear, despite the name)
        self.attention_weights = nn.Linear(d_query, n_heads * n_levels * (n_points + 1))  # slot P is the sink
        self.value_proj = nn.Linear(d_value, dv)
        self.output_proj = nn.Linear(dv, d_out)
        self.query_relpos = nn.Embedding(max_num_image_per_seq, d_query)  # 1 = most recent visible image, 0 = none
        # what the sink slot returns: zero and frozen, kept as a buffer so the authors' checkpoints load strictly
        self.register_buffer("ignore_token", torch.zeros(1, 1, 1, dv))
        self.reset_parameters()

    def reset_parameters(self):
        """The authors' init (reference §1.1); weights of dynamic_offset_mask / attention_weights are left as built."""
        nn.init.zeros_(self.sampling_offsets.weight)  # offsets start as a fixed random cloud around the reference
        nn.init.uniform_(self.sampling_offsets.bias, -self.offset_init_magnitude, self.offset_init_magnitude)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.zeros_(self.dynamic_offset_mask.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)
        nn.init.zeros_(self.ignore_token)

    def relative_index(self, mask):
        """(B, Lq, n) 0/1 visibility -> relative image index: 1 for the most recent visible image, counting back."""
        m = mask.long()
        rel = (m.sum(-1, keepdim=True) + 1 - m.cumsum(-1)) * m                          # (B, Lq, n)
        if rel.numel() and int(rel.max()) >= self.max_num_image_per_seq:
            raise ValueError(f"MMFS: a query sees {int(rel.max())} images, more than max_num_image_per_seq - 1 = "
                             f"{self.max_num_image_per_seq - 1}")
        return rel

    def sampling(self, query, reference_points, mask):
        """Where each query reads and how much: query (B, Lq, d_query), reference_points (B|1, Lq|1, 2), a bool mask
        (B, 1 or Lq, n) -> locations (B, Lq, M, n·L, P, 2) in [0, 1] as (x, y), weights (B, Lq, M, n·L, P) and the
        sink's weight (B, Lq, M, n·L). forward() samples the values there; bench/probe_visual.py asks where that is."""
        B, Lq, _ = query.shape
        n = mask.shape[-1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        rel = self.relative_index(mask)                                                  # (B, 1 or Lq, n)
        # Per-image query q_n = W_dyn·q + relpos[r_n]. The heads f are linear, so f(q_n) = f(W_dyn·q) + W_f·relpos[r_n]
        # is one linear over the Lq queries plus a gathered per-image term, never a (B, n, Lq, d_query) query copy.
        q = self.dynamic_offset_mask(query)                                              # (B, Lq, d_query)
        rel_off = F.linear(self.query_relpos.weight, self.sampling_offsets.weight)       # (max_img, M·P·2)
        rel_att = F.linear(self.query_relpos.weight, self.attention_weights.weight)      # (max_img, M·L·(P+1))
        offsets = self.sampling_offsets(q)[:, :, None] + F.embedding(rel, rel_off)       # (B, Lq, n, M·P·2)
        offsets = offsets.view(B, Lq, n, M, 1, P, 2).permute(0, 1, 3, 2, 4, 5, 6)         # (B, Lq, M, n, 1, P, 2)
        logits = self.attention_weights(q)[:, :, None] + F.embedding(rel, rel_att)       # (B, Lq, n, M·L·(P+1))
        logits = logits.view(B, Lq, n, M, L, P + 1).permute(0, 1, 3, 2, 4, 5)            # (B, Lq, M, n, L, P+1)

        # Offsets are shared across levels and scaled by S_l / base, then normalised by (W_l, H_l) — so a raw offset
        # of 1 is one cell of a base×base grid at every level and all levels are read at the same normalised point.
        ratios = [(w / self.base[1], h / self.base[0]) for h, w in self.spatial_shapes]  # S_l / base as (x, y)
        scale = torch.tensor([[rx / w, ry / h] for (rx, ry), (h, w) in zip(ratios, self.spatial_shapes)],
                             dtype=offsets.dtype, device=offsets.device)                  # (L, 2): = 1 / base
        ref = reference_points.expand(B, Lq, 2)[:, :, None, None, None, None, :]          # (B, Lq, 1, 1, 1, 1, 2)
        loc = (ref + offsets * scale[:, None, :]).flatten(3, 4)                           # (B, Lq, M, n·L, P, 2)

        # one softmax per (query, head) over images × levels × (points + sink); masked images get -10000 logits
        logits = logits + (~mask).to(logits.dtype)[:, :, None, :, None, None] * -10000.0  # (B, Lq, M, n, L, P+1)
        logits[..., P] = -math.log(n * L)  # n·L sink slots worth exp(-log(n·L)) each: one key of logit 0 in all
        weights = logits.flatten(3).softmax(-1).view(B, Lq, M, n * L, P + 1)              # (B, Lq, M, n·L, P+1)
        w_sink, w = weights[..., P], weights[..., :P]                                     # (B, Lq, M, n·L), (..., P)
        return loc, w, w_sink

    def forward(self, query, reference_points, value, image_mask, value_projected=False):
        """query (B, Lq, d_query), reference_points (B|1, Lq|1, 2) in [0,1] as (x, y), value (B, n, Σ_l H_l·W_l,
        d_value), image_mask (B, n) or (B, Lq, n) with 1 = visible -> (B, Lq, d_out).

        With value_projected=True, `value` is already `value_proj(features)` (B, n, Σ_l H_l·W_l, dv): a caller that
        decodes token by token projects its images once instead of once per token.
        """
        B, Lq, _ = query.shape
        n, S = value.shape[1], value.shape[2]
        M, D = self.n_heads, self.dv // self.n_heads
        hw, width = sum(h * w for h, w in self.spatial_shapes), self.dv if value_projected else self.d_value
        if value.dim() != 4 or value.shape[0] != B or S != hw or value.shape[3] != width:
            raise ValueError(f"MMFS: value must be (B={B}, n, {hw}, {width}) for levels {self.spatial_shapes}, "
                             f"got {tuple(value.shape)}")
        mask = image_mask[:, None, :] if image_mask.dim() == 2 else image_mask             # (B, 1 or Lq, n)
        if mask.shape not in ((B, 1, n), (B, Lq, n)):
            raise ValueError(f"MMFS: image_mask must be (B, n) = ({B}, {n}) or (B, Lq, n) = ({B}, {Lq}, {n}), "
                             f"got {tuple(image_mask.shape)}")
        if n == 0:  # no image slots at all: the sink takes all the mass, as when every image is masked
            return self.output_proj(query.new_zeros(B, Lq, self.dv))
        # A 2-D mask is the same for every query: keep its query axis at 1 and let it broadcast below.
        mask = mask.bool()
        sees = mask.flatten(1).any(1)                                                     # (B,)
        if 0 < int(sees.sum()) < B:
            # A row that sees no image (a UNet frame that opens its story) gets what the sink returns for every
            # query, output_proj(ignore_token): only the other rows are sampled, and the result is the same. When
            # no row sees one, all are computed, so every parameter stays in the graph (as DDP expects).
            rows = sees.nonzero()[:, 0]                                                   # (B',)
            ref = reference_points[rows] if reference_points.shape[0] == B else reference_points
            part = self(query[rows], ref, value[rows], mask[rows], value_projected)       # (B', Lq, d_out)
            sink = self.output_proj(self.ignore_token.view(1, 1, self.dv).to(part.dtype))  # (1, 1, d_out)
            return sink.expand(B, Lq, -1).index_copy(0, rows, part)                      # (B, Lq, d_out)
        v = (value if value_projected else self.value_proj(value)).reshape(B, n * S, M, D)  # (B, n·S, M, D)
        loc, w, w_sink = self.sampling(query, reference_points, mask)                     # (B, Lq, M, n·L, P, 2), ...

        # Sample in at least float32: a bf16 location is off by up to ~0.1 pixel of a 32×32 map.
        dtype = torch.promote_types(v.dtype, torch.float32)
        shapes = torch.tensor(self.spatial_shapes * n, dtype=torch.long, device=v.device)  # (n·L, 2) as (H, W)
        starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])  # (n·L,)
        out = msda(v.to(dtype).contiguous(), shapes, starts, loc.to(dtype).contiguous(), w.to(dtype).contiguous())
        out = out.view(B, Lq, M, D) + w_sink.sum(-1)[..., None] * self.ignore_token.view(M, D)  # (B, Lq, M, D)
        return self.output_proj(out.flatten(2).to(v.dtype))                               # (B, Lq, d_out)
