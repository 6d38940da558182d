"""sample.py: prompt parsing, end-to-end stories on the tiny checkpoint, the continuation loop's limits, bad input."""
import base64
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import data
import diffusion
import model as M
import sample

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "1", "--max-new-tokens", "6"]  # a random tiny model: keep every run short
REF = re.compile(r"!\[[^\]]*\]\(([^)]*)\)")


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def frame_png(path, index=0):
    """A ShapeStories frame (32 px) saved as a PNG; returns the frame."""
    frame = data.make_story("eval", 0, index).images[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(path)
    return frame


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tok = M.MMInterleaved.from_checkpoint(tiny_checkpoint)
    return model, tok


# --- prompt parsing --------------------------------------------------------------------------------------------------

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzé0123456789.,'-", min_size=1, max_size=8)
SPACE = st.sampled_from([" ", "  ", "\t", "\n", " \n ", "\n\n"])
PATH = st.lists(st.text(alphabet="abcxyz019_-", min_size=1, max_size=6), min_size=1, max_size=3).map(
    lambda parts: "/".join(parts) + ".png")
PIECE = st.one_of(
    st.tuples(st.just("text"), st.lists(WORD, min_size=1, max_size=6), st.lists(SPACE, min_size=6, max_size=6)),
    st.tuples(st.just("image"), PATH, st.text(alphabet="abc xyz.", max_size=10), st.booleans()),
    st.tuples(st.just("generate"), st.sampled_from(["<image>", "  <image>", "<image>\t"])))


def render(pieces):
    """Pieces -> prompt text and the pieces parse_prompt should find (adjacent text merged, whitespace collapsed)."""
    out, want = "", []
    for p in pieces:
        if p[0] == "text":
            out += "".join(w + s for w, s in zip(p[1], p[2]))
            if want and want[-1][0] == "text":
                want[-1] = ("text", want[-1][1] + " " + " ".join(p[1]))
            else:
                want.append(("text", " ".join(p[1])))
        elif p[0] == "image":
            inline = p[3] and out and not out.endswith("\n")  # an image may stand inside a text line
            out += ("" if inline or not out or out.endswith("\n") else "\n") + f"![{p[2]}]({p[1]})"
            out += " " if p[3] else "\n"
            want.append(("image", Path("/prompts") / p[1]))
        else:
            out += ("" if not out or out.endswith("\n") else "\n") + p[1] + "\n"
            want.append(("generate", None))
    return out, want


@settings(deadline=None, max_examples=200)
@given(st.lists(PIECE, max_size=8))
def test_parse_prompt_finds_text_images_and_markers_in_order(pieces):
    text, want = render(pieces)
    got = sample.parse_prompt(text, Path("/prompts"), "p.txt")
    assert [(k, v) for k, v, _ in got] == want
    lines = text.splitlines()
    for kind, value, n in got:  # the line numbers point at the piece
        if kind == "image":
            assert f"]({value.relative_to('/prompts')})" in lines[n - 1]
        elif kind == "generate":
            assert lines[n - 1].strip() == "<image>"
        else:
            assert value.split()[0] in lines[n - 1].split()


def test_parse_prompt_paths_and_inline_specials(tmp_path):
    got = sample.parse_prompt("a b ![x](/abs/f.png) c\n![](../up/g.png)\n", tmp_path / "dir")
    assert got == [("text", "a b", 1), ("image", Path("/abs/f.png"), 1), ("text", "c", 1),
                   ("image", tmp_path / "dir" / "../up/g.png", 2)]
    for bad in ("the red circle <image> moves.", "a <BoI> b", "![alt]( )"):
        with pytest.raises(ValueError, match=r"^p\.txt:1: "):
            sample.parse_prompt(bad, tmp_path, "p.txt")


def test_read_prompt_resolves_images_next_to_the_prompt(tmp_path, monkeypatch):
    frame = frame_png(tmp_path / "imgs" / "f.png")
    (tmp_path / "p.txt").write_text("there is a cat.\n![first](imgs/f.png)\n<image>\n")
    monkeypatch.chdir(ROOT)  # not the prompt's directory
    got = sample.read_prompt(tmp_path / "p.txt")
    assert [k for k, _, _ in got] == ["text", "image", "generate"]
    assert got[1][1].dtype == np.uint8 and np.array_equal(got[1][1], frame)


# --- end to end ------------------------------------------------------------------------------------------------------

def check_story(out, size):
    """story.md references every PNG, in order; story.html embeds the same bytes; each PNG is an RGB frame."""
    md = (out / "story.md").read_text()
    names = REF.findall(md)
    assert sorted(names) == sorted(p.name for p in out.glob("*.png"))
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', (out / "story.html").read_text())
    assert [base64.b64decode(u) for u in uris] == [(out / n).read_bytes() for n in names]
    for n in names:
        with Image.open(out / n) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            if n.endswith("_generated.png"):
                assert im.size == (size, size)
    return md, names


def test_end_to_end_writes_the_story_and_is_reproducible(tiny, tiny_checkpoint, tmp_path, capsys):
    model, _ = tiny
    frame_png(tmp_path / "f0.png")
    prompt = tmp_path / "p.txt"
    prompt.write_text("![first frame](f0.png)\nthere is a small red circle at the top.\n"
                      "the red circle moves right.\n<image>\n")
    flags = ["--prompt", prompt, "--checkpoint", tiny_checkpoint, "--seed", 3, "--temperature", 0.8,
             "--max-images", 1, *FAST]
    r = run_cli(*flags, "--out", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    sample.main([str(f) for f in flags] + ["--out", str(tmp_path / "b")])  # the same seed again, in-process
    printed = capsys.readouterr().out
    runs = []
    for name, out in (("a", r.stdout), ("b", printed)):
        assert "there is a small red circle at the top. the red circle moves right." in out
        md, names = check_story(tmp_path / name, model.cfg.image_size)
        assert names[:2] == ["01_given.png", "02_generated.png"]
        assert len([n for n in names if n.endswith("_generated.png")]) == 1  # --max-images 1: the marker only
        runs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir()})
    assert runs[0] == runs[1] and r.stdout == printed  # same seed, same story, byte for byte


class Scripted:
    """Stands in for generate_text: checks the sequence it is given, answers with scripted ids."""

    def __init__(self, model, tok, replies):
        self.model, self.tok, self.replies, self.calls = model, tok, list(replies), []

    def __call__(self, model, tokens, images, max_new_tokens=30, temperature=0.0, top_p=1.0, generator=None):
        ids, cfg, K = tokens[0].tolist(), model.cfg, model.cfg.num_image_tokens
        n_img = 0 if images is None else images.shape[0]
        assert ids.count(self.tok.boi_id) == n_img and ids.count(self.tok.image_id) == K * n_img
        for i, t in enumerate(ids):  # every <BoI> is followed by its placeholders
            if t == self.tok.boi_id:
                assert ids[i + 1:i + 1 + K] == [self.tok.image_id] * K
        assert images is None or images.shape[1:] == (3, cfg.image_size, cfg.image_size)
        assert 1 <= max_new_tokens and len(ids) + max_new_tokens <= cfg.llm.max_seq_len
        self.calls.append(len(ids))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return [(reply(max_new_tokens) if callable(reply) else reply)[:max_new_tokens]]


@pytest.fixture
def story(monkeypatch, capsys, tiny, tiny_checkpoint):
    """Run sample.main in-process with a Scripted generate_text -> (fake, stdout, stderr, story.md, PNG names)."""
    model, tok = tiny

    def run(tmp_path, prompt_text, replies, *flags):
        fake = Scripted(model, tok, replies)
        monkeypatch.setattr(M.MMInterleaved, "generate_text", lambda self, *a, **kw: fake(self, *a, **kw))
        frame_png(tmp_path / "f.png")
        (tmp_path / "p.txt").write_text(prompt_text)
        sample.main(["--prompt", str(tmp_path / "p.txt"), "--checkpoint", str(tiny_checkpoint),
                     "--out", str(tmp_path / "o"), "--steps", "1", "--guidance", "1", "--device", "cpu",
                     *map(str, flags)])
        out, err = capsys.readouterr()
        md, names = check_story(tmp_path / "o", model.cfg.image_size)
        return fake, out, err, md, names
    return run


def test_continuation_draws_at_boi_and_ends_at_eos(story, tiny, tmp_path):
    _, tok = tiny
    said = tok.encode("the red circle moves left.", bos=False)
    fake, out, err, md, names = story(tmp_path,
                                          "![](f.png) there is a big red circle at the top left.\n<image>\n",
                                          [said + [tok.boi_id], [tok.eos_id]], "--max-images", 2)
    assert names == ["01_given.png", "02_generated.png", "03_generated.png"]
    assert len(fake.calls) == 2 and "the red circle moves left." in md and "the red circle moves left." in out
    assert md.index("02_generated") < md.index("moves left") < md.index("03_generated")
    assert "</s>" in err.splitlines()[-1]


def test_limits_stop_the_story_cleanly(story, tiny, tmp_path):
    model, tok = tiny
    # --max-images: the model asks for images forever
    *_, err, md, names = story(tmp_path / "a", "there is a cat.\n",
                                   [[tok.boi_id]], "--max-images", 1)
    assert names == ["01_generated.png"] and "--max-images 1" in err.splitlines()[-1]
    # the model's image limit (max_images - 1 per story)
    n = model.cfg.llm.max_images - 2
    *_, err, md, names = story(tmp_path / "b", "![](f.png)\n" * n,
                                   [[tok.boi_id]], "--max-images", 50)
    assert len(names) == n + 1 and "image limit" in err.splitlines()[-1]
    # max_seq_len: text forever, never asking past the end
    word = tok.encode("red", bos=False)[:1]
    fake, _, err, md, names = story(tmp_path / "c", "there is a cat.\n",
                                        [lambda n: word * n], "--max-new-tokens", 10 ** 6)
    assert "max_seq_len" in err.splitlines()[-1] and fake.calls[-1] < model.cfg.llm.max_seq_len
    # --max-new-tokens counts all the text the model adds
    fake, _, err, md, names = story(tmp_path / "d", "there is a cat.\n",
                                        [word * 3 + [tok.boi_id], lambda n: word * n], "--max-new-tokens", 10,
                                        "--max-images", 5)
    assert fake.calls == [fake.calls[0], fake.calls[0] + 4 + model.cfg.num_image_tokens]
    assert "--max-new-tokens 10" in err.splitlines()[-1] and len(names) == 1


def test_rerank_keeps_the_likeliest_of_k_drawings_from_text(story, tiny, tmp_path, monkeypatch):
    """--rerank 3: a frame drawn from text alone is drawn 3 times in one batch and the one the model scores highest
    (the text read after it, as a caption) is saved and read back; a frame after a given image is drawn once."""
    model, tok = tiny
    real_draw, drawn, scored = M.MMInterleaved.generate_images, [], []

    def spy_draw(self, prompts, images, **kw):
        x = real_draw(self, prompts, images, **kw)
        drawn.append(x)
        return x

    def fake_score(self, rows, images, counts):  # the third drawing wins
        scored.append((rows, images, counts))
        return torch.tensor([-3.0, -2.0, -1.0])
    monkeypatch.setattr(M.MMInterleaved, "generate_images", spy_draw)
    monkeypatch.setattr(M.MMInterleaved, "text_logprob", fake_score)
    text = "there is a big red circle at the top left."
    *_, err, md, names = story(tmp_path / "a", f"{text}\n<image>\n", [[tok.eos_id]], "--rerank", 3)
    assert names == ["01_generated.png"] and len(drawn) == 1 and drawn[0].shape[0] == 3
    want = (drawn[0][2].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (S, S, 3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "o" / "01_generated.png")), want)
    assert not np.array_equal(want, (drawn[0][0].permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy())
    (rows, images, counts), = scored
    ids = tok.encode(text, bos=False)
    assert rows == [[tok.bos_id] + tok.image_tokens(model.cfg.num_image_tokens) + ids] * 3 and counts == [len(ids)] * 3
    assert images.shape == (3, 3, 32, 32) and "drawing 3 of 3" in err
    drawn.clear()
    story(tmp_path / "b", f"![](f.png) {text}\n<image>\n", [[tok.eos_id]], "--rerank", 3)
    assert [x.shape[0] for x in drawn] == [1] and len(scored) == 1  # a continuation: one drawing, nothing scored


def test_read_guidance_steers_a_frame_from_text_only(story, tiny, tmp_path, monkeypatch):
    """--read-guidance 0.3: a frame drawn from text alone is drawn under reading guidance toward that text (its
    ids, the window and iterations as given); a frame after a given image is drawn without it; bad values are
    refused in one line."""
    model, tok = tiny
    real_draw, calls = M.MMInterleaved.generate_images, []

    def spy_draw(self, prompts, images, **kw):
        calls.append(kw)
        return real_draw(self, prompts, images, **kw)
    monkeypatch.setattr(M.MMInterleaved, "generate_images", spy_draw)
    text = "there is a big red circle at the top left."
    story(tmp_path / "a", f"{text}\n<image>\n", [[tok.eos_id]], "--read-guidance", 0.3, "--read-window", "0,999",
          "--read-iters", 2)
    (kw,) = calls
    assert kw["read_texts"] == [tok.encode(text, bos=False)] and kw["read_scale"] == 0.3
    assert kw["read_window"] == (0, 999) and kw["read_iters"] == 2
    calls.clear()
    story(tmp_path / "b", f"![](f.png) {text}\n<image>\n", [[tok.eos_id]], "--read-guidance", 0.3)
    assert [("read_texts" in kw) for kw in calls] == [False]  # a continuation: no sentence describes its frame
    for flags, says in ((("--read-guidance", -1), "scale must be"), (("--read-window", "9"), "window '9'"),
                        (("--read-iters", 0), "iterations must be")):
        with pytest.raises(SystemExit, match=says):
            story(tmp_path / "c", f"{text}\n<image>\n", [[tok.eos_id]], *flags)


def test_caption_rerank_checks_the_sentence_after_an_opening_image(tiny, tiny_checkpoint, tmp_path, monkeypatch,
                                                                    capsys):
    """--caption-rerank 3: after a story-opening image the model writes its sentence once at --temperature and 3
    times at temperature 1; the distinct first sentences are read (log p(c | x)) and drawn back (-log p(x | c), the
    same noise for each, eval.py's timesteps), and the one with the best read - W · drawn goes into the story; a story
    that opens with text is not checked; bad values are refused in one line."""
    model, tok = tiny
    says = ["there is a big red circle at the top.", "there is a small red circle at the top. the red",
            "there is a big red circle at the top.", "there is a big blue square at the left."]
    written, read_in, drawn_in = [], [], []

    def fake_text(self, tokens, images, max_new_tokens=30, temperature=0.0, top_p=1.0, generator=None):
        written.append((tokens.tolist(), temperature, images.shape))
        replies = {1: says[:1], 2: says[1:]}.get(len(written), [""])  # the first, then the 3 samples, then </s>
        return [tok.encode(r, bos=False)[:max_new_tokens - 1] + [tok.eos_id] for r in replies]

    def fake_read(self, images, texts):
        read_in.append((images.clone(), texts))
        return torch.tensor([-1.0, -2.0, -3.0])

    def fake_drawn(self, images, texts, timesteps, noise):
        drawn_in.append((images.clone(), texts, timesteps, noise))
        return torch.tensor([5.0, 0.0, 10.0], dtype=torch.float64)
    monkeypatch.setattr(M.MMInterleaved, "generate_text", fake_text)
    monkeypatch.setattr(M.MMInterleaved, "caption_logprob", fake_read)
    monkeypatch.setattr(M.MMInterleaved, "drawing_nll", fake_drawn)
    frame = frame_png(tmp_path / "f.png")
    (tmp_path / "p.txt").write_text("![](f.png)\n")
    opening = [tok.bos_id] + tok.image_tokens(model.cfg.num_image_tokens)
    cands = [tok.encode(c, bos=False) for c in (says[0], "there is a small red circle at the top.", says[3])]
    for weight, want in ((1.0, 1), (0.0, 0)):  # read - W drawn: -6, -2, -13 picks the 2nd; W = 0: the 1st
        written.clear(), read_in.clear(), drawn_in.clear()
        sample.main(["--prompt", str(tmp_path / "p.txt"), "--checkpoint", str(tiny_checkpoint), "--out",
                     str(tmp_path / f"o{weight}"), "--caption-rerank", "3", "--caption-weight", str(weight),
                     "--temperature", "0.5"])
        out, err = capsys.readouterr()
        assert [(w[0], w[1], w[2][0]) for w in written[:2]] == [([opening], 0.5, 1), ([opening] * 3, 1.0, 3)]
        assert written[2][0][0] == opening + cands[want]  # the story goes on from the sentence kept
        (images, texts), = read_in
        assert texts == cands and drawn_in[0][1] == cands
        want_x = data.image_tensor(frame, model.cfg.image_size)
        for x in (images, drawn_in[0][0]):
            assert x.shape[0] == 3 and all(torch.equal(row, want_x) for row in x)
        noise, levels = drawn_in[0][3], drawn_in[0][2]
        assert torch.equal(levels, diffusion.spread_timesteps(model.cfg.schedule.num_train_timesteps, 10, 2))
        assert noise.shape == (3, len(levels), *model.diffusion_shape) and torch.equal(noise[0], noise[2])
        story_md = (tmp_path / f"o{weight}" / "story.md").read_text()
        assert story_md.count("there is") == 1 and tok.decode(cands[want]) in story_md
        assert f"candidate {want + 1} of 3" in err
    written.clear(), read_in.clear()
    (tmp_path / "q.txt").write_text("there is a cat.\n![](f.png)\n")  # opens with text: nothing to check
    sample.main(["--prompt", str(tmp_path / "q.txt"), "--checkpoint", str(tiny_checkpoint), "--out",
                 str(tmp_path / "q"), "--caption-rerank", "3"])
    assert len(written) == 1 and not read_in
    for flag, value in (("--caption-rerank", "-1"), ("--caption-weight", "-0.5")):
        with pytest.raises(SystemExit, match=f"{flag} must be >= 0"):
            sample.main(["--prompt", str(tmp_path / "p.txt"), "--checkpoint", str(tiny_checkpoint), "--out",
                         str(tmp_path / "r"), flag, value])


def test_capitals_the_tokenizer_never_saw_are_read_in_lower_case(story, tiny, tmp_path, monkeypatch):
    """ShapeStories is all lower case, so its tokenizer reads "There" as raw bytes: the prompt's letters it never
    saw are lower-cased (its other unseen characters kept), the model reads exactly the lower-case ids, the story
    shows that text and stderr says so."""
    model, tok = tiny
    real_draw, prompts = M.MMInterleaved.generate_images, []

    def spy_draw(self, ids, images, **kw):
        prompts.append([list(p) for p in ids])  # sample.py goes on to extend its list
        return real_draw(self, ids, images, **kw)
    monkeypatch.setattr(M.MMInterleaved, "generate_images", spy_draw)
    assert tok.unseen("TIABRED") == list("ABDEIRT") and tok.unseen("!") == ["!"]  # what the test relies on
    *_, err, md, _ = story(tmp_path, "There Is A Big RED circle at the top left!\n<image>\n", [[tok.eos_id]])
    text = "there is a big red circle at the top left!"
    assert prompts == [[[tok.bos_id] + tok.encode(text, bos=False) + [tok.boi_id]]] and text in md
    assert "lower-cased A B D E I R T" in err and "never saw !" in err and "p.txt" in err


# --- bad input -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing prompt", "empty prompt", "missing image", "not an image", "too many images",
                                  "not a checkpoint"])
def test_bad_input_is_one_line_naming_the_file(case, tiny, tiny_checkpoint, tmp_path):
    model, _ = tiny
    prompt, ckpt = tmp_path / "story.txt", tiny_checkpoint
    if case == "missing prompt":
        prompt, named = tmp_path / "nope.txt", "nope.txt"
    elif case == "empty prompt":
        prompt.write_text("  \n\n\t\n")
        named = "story.txt"
    elif case == "missing image":
        prompt.write_text("there is a cat.\n![a cat](cats/cat.png)\n")
        named = "cat.png"
    elif case == "not an image":
        (tmp_path / "cat.png").write_text("not a png")
        prompt.write_text("![a cat](cat.png)\n")
        named = "cat.png"
    elif case == "too many images":
        frame_png(tmp_path / "f.png")
        prompt.write_text("![](f.png)\n" * model.cfg.llm.max_images)
        named = "story.txt"
    else:
        prompt.write_text("there is a cat.\n")
        ckpt, named = tmp_path, "model.safetensors"
    r = run_cli("--prompt", prompt, "--checkpoint", ckpt, "--out", tmp_path / "out", *FAST)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("sample.py: error: ") and named in r.stderr
