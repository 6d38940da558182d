"""train.py's recipe table, for the benches that must build its batches: read from its source, never copied.

train.py is a script (importing it would train), so `train_preset(name)` parses the file and evaluates the
PRESETS assignment alone. A bench that restated the preset's numbers by hand would drift when the recipe changes.
"""
import ast
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
