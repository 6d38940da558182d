"""train.py's recipe table, for the benches that must build its batches: read from its source, never copied.

train.py is a script (importing it would train), so `train_preset(name)` parses the file and evaluates the
PRESETS assignment alone. A bench that restated the preset's numbers by hand would drift when the recipe changes.
"""
import ast
import os
import tempfile
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def train_preset(name, path=TRAIN_PY):
    """-> a copy of train.py's PRESETS[name] ("tiny", "small" or "paper"), a dict of plain values."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["PRESETS"]:
            # the table holds literals and dict(...) calls only: evaluate it with nothing else in scope
            table = eval(compile(ast.Expression(node.value), str(path), "eval"), {"__builtins__": {}, "dict": dict})
            if name not in table:
                raise KeyError(f"{path}: no preset {name!r} in PRESETS (it has {', '.join(table)})")
            return dict(table[name])
    raise KeyError(f"{path}: no top-level PRESETS = {{...}} assignment")


def small_tokenizer(directory, seed=0):
    """train.py --small's tokenizer (its corpus and vocabulary), trained into `directory`."""
    import data
    import llm
    small = train_preset("small")
    return llm.Tokenizer.train(data.story_corpus(small["corpus"], seed), str(Path(directory) / "tok"), small["vocab"])


def small_config(tok):
    """train.py --small's MMConfig for tokenizer `tok`: its ids and vocabulary, and the recipe's noise draws."""
    import dataclasses
    import model as M
    small = train_preset("small")
    cfg = M.preset("small", bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    cfg.llm = dataclasses.replace(cfg.llm, vocab_size=tok.n_vocab)
    cfg.noise_draws = small.get("noise_draws", 1)
    cfg.stratified_timesteps = small.get("stratified_timesteps", False)  # which t each draw takes: no cost
    return cfg


def small_batches(tok, cfg, batch_size=None, **options):
    """The batches train.py --small --seed 0 trains on, in its order (`batch_size` rows a step, default the recipe's;
    `options` are more StoryBatches arguments: balance_window=0 gives the plain order)."""
    import data
    small = train_preset("small")
    options = {"balance_window": small.get("balance_window", 0), "unet_passes": cfg.noise_draws, **options}
    return data.StoryBatches(tok, cfg.num_image_tokens, small["seq_len"], batch_size or small["batch_size"],
                             cfg.llm.max_images - 1, 0, cfg.image_size, prefixes=small["prefixes"],
                             first_frame_prob=small["first_frame_prob"],
                             events_text_first=small["events_text_first"], **options)


def two_adamw_groups(params):
    """Two AdamW groups (decay and none), half the parameters each, as train.py's param_groups gives the small preset
    more than one: what a bench's optimiser needs to walk the same group structure as the recipe's."""
    return [dict(params=params[0::2]), dict(params=params[1::2], weight_decay=0.0)]


def spawn_two_ranks(worker, args, port):
    """Train the --small tokenizer once, then run worker(rank, args, tok) in two one-thread gloo processes on
    127.0.0.1:`port`, as train.py runs --small on a 2-core CPU. `worker` must be a module-level function."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:  # one tokenizer for both processes
        tok = small_tokenizer(tmp)
        mp.spawn(_rank, args=(worker, args, str(tok.path), port), nprocs=2)


def _rank(rank, worker, args, tok_path, port):
    import torch
    import torch.distributed as dist
    import llm
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        worker(rank, args, llm.Tokenizer(tok_path))
    finally:
        dist.destroy_process_group()
