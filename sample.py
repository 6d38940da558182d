"""Continue an interleaved story of text and pictures with a trained MM-Interleaved checkpoint (paper §3.6).

    python sample.py --prompt examples/story.txt          # reads out/small, the output of `python train.py --small`
    python sample.py --prompt my.txt --checkpoint out/run --out out/my --seed 1 --temperature 0.8

The prompt file is plain UTF-8 text, read top to bottom:
  - text is the story so far; line breaks and runs of spaces collapse into single spaces, as the model was trained
    on sentences joined by spaces; a letter the tokenizer never saw is read in lower case where it saw that (a
    ShapeStories model knows no capitals), and a note on stderr names it;
  - `![optional alt](path/to/image.png)` gives an image (the path is relative to the prompt file; any format Pillow
    reads, taken as RGB, centre-cropped and resized to the model's image size), on a line of its own or inside one;
  - a line holding only `<image>` asks the model to draw an image at that point, from everything before it.
Then the model goes on: it samples text (with the KV cache) and whenever it writes `<BoI>` it draws an image with
the diffusion sampler (classifier-free guidance; the UNet's MMFS reads the previous image), encodes the new image
and goes on, until it writes `</s>` or the story reaches --max-new-tokens text tokens, --max-images generated
images (the prompt's `<image>` markers included) or the model's sequence or image limit. With --caption-rerank N,
the sentence after a story-opening image is checked by drawing it back (`checked_caption`).

Output in --out: `story.md` (the text with the images inline, the PNGs beside it: NN_given.png, NN_generated.png)
and `story.html` (one self-contained file, the images embedded as base64, for a browser). The story is printed as
Markdown while it grows; the diffusion progress bar goes to stderr. The same --seed gives the same story.
"""
import argparse
import base64
import html
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import diffusion
import model as model_lib
from eval import CHECK_DRAWS, CHECK_LEVELS, add_sentences, pick_captions

IMAGE_REF = re.compile(r"!\[([^\]]*)\]\(([^)]*)\)")  # Markdown image: ![alt](path)
MARKER = "<image>"

# ---------------------------------------------------------------------------------------------------------------
# the prompt


def parse_prompt(text, root, where="prompt"):
    """Prompt text -> pieces in order: ("text", str, line), ("image", Path, line) or ("generate", None, line)."""
    pieces, words = [], []  # words: (line, word) of the text piece being read

    def flush():
        if words:
            pieces.append(("text", " ".join(w for _, w in words), words[0][0]))
            words.clear()

    def add_text(s, n):
        if "<BoI>" in s or MARKER in s:  # the specials would enter the sequence without their image
            raise ValueError(f"{where}:{n}: write <image> on a line of its own to ask for an image")
        words.extend((n, w) for w in s.split())

    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() == MARKER:
            flush()
            pieces.append(("generate", None, n))
            continue
        pos = 0
        for m in IMAGE_REF.finditer(line):
            add_text(line[pos:m.start()], n)
            flush()
            if not m[2].strip():
                raise ValueError(f"{where}:{n}: image with an empty path")
            pieces.append(("image", Path(root) / m[2].strip(), n))
            pos = m.end()
        add_text(line[pos:], n)
    flush()
    return pieces


def read_prompt(path):
    """Read and parse the prompt file, loading its images as uint8 (H, W, 3); errors name the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompt file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: the prompt is not UTF-8 text") from None
    pieces = parse_prompt(text, path.parent, str(path))
    if not pieces:
        raise ValueError(f"{path}: the prompt is empty")
    out = []
    for kind, value, n in pieces:
        if kind == "image":
            file = value
            if not file.is_file():
                raise ValueError(f"{path}:{n}: image file not found: {file}")
            try:
                with Image.open(file) as im:
                    value = np.array(im.convert("RGB"))  # a writable copy for torch
            except Exception as e:  # Pillow raises several types (UnidentifiedImageError, OSError, SyntaxError)
                raise ValueError(f"{path}:{n}: cannot read image {file} ({type(e).__name__})") from None
        out.append((kind, value, n))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the story on disk: Markdown with PNGs beside it, and one self-contained HTML page


class StoryWriter:
    """Collects text blocks and images in order; prints each block and writes images as they come."""

    def __init__(self, out):
        self.out, self.blocks, self.n_images = Path(out), [], 0
        self.out.mkdir(parents=True, exist_ok=True)
        for kind in ("given", "generated"):  # a rerun must not leave an earlier run's frames behind
            for old in self.out.glob(f"[0-9][0-9]_{kind}.png"):
                old.unlink()

    def text(self, s):
        if s:
            self.blocks.append(("text", s))
            print(s + "\n", flush=True)

    def image(self, frame, given):
        """Save a uint8 (H, W, 3) frame as the story's next PNG."""
        self.n_images += 1
        name = f"{self.n_images:02d}_{'given' if given else 'generated'}.png"
        Image.fromarray(frame).save(self.out / name)
        alt = f"image {self.n_images} ({'given' if given else 'generated'})"
        self.blocks.append(("image", name, alt))
        print(f"![{alt}]({name})\n", flush=True)

    def save(self):
        md = "\n\n".join(b[1] if b[0] == "text" else f"![{b[2]}]({b[1]})" for b in self.blocks) + "\n"
        (self.out / "story.md").write_text(md, encoding="utf-8")
        body = []
        for b in self.blocks:
            if b[0] == "text":
                body.append(f"<p>{html.escape(b[1])}</p>")
            else:
                uri = "data:image/png;base64," + base64.b64encode((self.out / b[1]).read_bytes()).decode("ascii")
                body.append(f'<p><img src="{uri}" alt="{html.escape(b[2])}" title="{html.escape(b[1])}"></p>')
        page = ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>MM-Interleaved story</title>\n"
                "<style>body{font:18px/1.5 sans-serif;max-width:40em;margin:2em auto}"
                "img{width:192px;image-rendering:pixelated;border:1px solid #ccc}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")
        (self.out / "story.html").write_text(page, encoding="utf-8")


def progress(label, steps):
    """A diffusion-step callback drawing a \\r progress bar on stderr."""
    def callback(i, t, x):
        done = int(30 * (i + 1) / steps)
        end = "\n" if i + 1 == steps else ""
        print(f"\r{label} [{'#' * done}{'.' * (30 - done)}] {i + 1}/{steps}", end=end, file=sys.stderr, flush=True)
    return callback


# ---------------------------------------------------------------------------------------------------------------
# generation


def draw(model, ids, images, args, generator, label):
    """The image the ids (ending in <BoI>) open -> (1, 3, S, S) in [0, 1] and the uint8 (S, S, 3) frame.

    The frame is rounded to 8 bits before the model reads it back, so the story goes on from exactly the PNG saved.
    With --rerank K, a frame drawn from text alone (no earlier image in the story) is the best of K drawings: the one
    after which the model, reading it as a caption, finds the text before it likeliest (as eval.py --rerank). With
    --read-guidance S, such a frame is drawn under reading guidance toward that text (as eval.py --read-guidance)."""
    S, text = model.cfg.image_size, ids[1:-1]  # the text between <s> and <BoI>
    given = torch.cat(images) if images else torch.zeros(0, 3, S, S, device=args.device)  # (n, 3, S, S)
    from_text = not images and text  # a continuation has no sentence that describes its whole frame
    k = args.rerank if from_text else 1
    read = dict(read_texts=[text] * k, read_scale=args.read_guidance, read_window=args.read_window,
                read_iters=args.read_iters) if from_text and args.read_guidance > 0 else {}
    x = model.generate_images([ids] * k, [given] * k, steps=args.steps, guidance=args.guidance, sampler=args.sampler,
                              generator=generator, callback=progress(label, args.steps), **read)  # (k, 3, S, S)
    frames = (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # (k, S, S, 3)
    best = 0
    if k > 1:  # the text read after each drawing, as a caption
        scores = model.caption_logprob(torch.stack([data.to_tensor(f) for f in frames]), [text] * k)
        best = int(scores.argmax())
        print(f"{label}: drawing {best + 1} of {k}, the likeliest by the model's own reading", file=sys.stderr)
    return data.to_tensor(frames[best])[None].to(x.device), frames[best]


def checked_caption(model, tok, ids, images, n, args, generator):
    """The first sentence after a story-opening image, checked by drawing (as eval.py --caption-rerank): the one the
    model writes anyway (--temperature) and the distinct ones of --caption-rerank N written at temperature 1, the one
    with the highest log p(c | x) + W · log p(x | c) kept -> its ids (at most n).

    The LLM reads the frame (caption_logprob) and the UNet draws it back under `<s> c <BoI>` (drawing_nll, the same
    noise for every candidate), which is the condition of a story's first image: no other frame has a sentence
    that describes all of it, so sample.py checks this one alone."""
    prompt, x = torch.tensor([ids], device=args.device), torch.cat(images)                      # (1, T), (1, 3, S, S)
    first = model.generate_text(prompt, x, max_new_tokens=n, temperature=args.temperature, top_p=args.top_p,
                                generator=generator)[0]
    more = model.generate_text(prompt.expand(args.caption_rerank, -1), x.expand(args.caption_rerank, -1, -1, -1),
                               max_new_tokens=n, temperature=1.0, generator=generator)            # N id lists
    cands = []
    add_sentences(cands, tok, [first] + more)
    if len(cands) < 2:  # nothing to choose between: the model's own text, as without the check
        return first
    texts = [tok.encode(c, bos=False)[:n] for c in cands]
    levels = diffusion.spread_timesteps(model.cfg.schedule.num_train_timesteps, CHECK_LEVELS, CHECK_DRAWS)  # (L,)
    noise = torch.randn(1, len(levels), *model.diffusion_shape, generator=generator, device=args.device)
    frames = x.expand(len(texts), -1, -1, -1)                                                     # (C, 3, S, S)
    read = model.caption_logprob(frames, texts).tolist()                                          # log p(c | x)
    drawn = model.drawing_nll(frames, texts, levels, noise.expand(len(texts), *noise.shape[1:])).tolist()
    best = pick_captions([read], [drawn], args.caption_weight)[0]
    print(f"caption: candidate {best + 1} of {len(cands)} (the first is the one written at --temperature), the "
          "likeliest read and drawn back", file=sys.stderr)
    return texts[best]


def check_args(args):
    """Flag values out of range, or a device this machine lacks -> ValueError."""
    rules = (("--steps", args.steps, args.steps >= 1, ">= 1"), ("--temperature", args.temperature,
             args.temperature >= 0, ">= 0"), ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
             ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
             ("--max-images", args.max_images, args.max_images >= 0, ">= 0"),
             ("--rerank", args.rerank, args.rerank >= 1, ">= 1"),
             ("--caption-rerank", args.caption_rerank, args.caption_rerank >= 0, ">= 0"),
             ("--caption-weight", args.caption_weight, args.caption_weight >= 0, ">= 0"))
    for flag, value, ok, rule in rules:
        if not ok:
            raise ValueError(f"{flag} must be {rule}, got {value}")
    args.read_window = model_lib.parse_window(args.read_window)
    model_lib.check_reading(args.read_guidance, args.read_window, args.read_iters)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")


def check_prompt(pieces, encoded, cfg, args):
    """The prompt must fit the model: its images in the per-story image limit, its ids in max_seq_len."""
    K, max_imgs = cfg.num_image_tokens, cfg.llm.max_images - 1
    n_given = sum(kind == "image" for kind, _, _ in pieces)
    n_marked = sum(kind == "generate" for kind, _, _ in pieces)
    if n_given + n_marked > max_imgs:
        raise ValueError(f"{args.prompt}: {n_given} given + {n_marked} asked-for images, but the model reads at most "
                         f"{max_imgs} images per story")
    if n_marked > args.max_images:
        raise ValueError(f"{args.prompt}: {n_marked} <image> markers, more than --max-images {args.max_images}")
    length = 1 + sum(len(e) for e in encoded if e is not None) + (K + 1) * (n_given + n_marked)
    if length > cfg.llm.max_seq_len:
        raise ValueError(f"{args.prompt}: the prompt is {length} tokens, the model reads at most "
                         f"{cfg.llm.max_seq_len}")


def fold_prompt(pieces, tok, where):
    """Text pieces with each letter the tokenizer never saw lower-cased where it saw the lower case (Tokenizer.
    fold_case: a ShapeStories model reads "There" as raw bytes); a note on stderr names the letters folded and the
    characters left that the model reads as raw bytes. The story shows the text as the model read it."""
    out, folded, unseen = [], set(), set()
    for kind, value, n in pieces:
        if kind == "text":
            value, f, u = tok.fold_case(value)
            folded.update(f)
            unseen.update(u)
        out.append((kind, value, n))
    if folded:
        print(f"sample.py: note: {where}: lower-cased {' '.join(sorted(folded))} (the tokenizer saw only their "
              "lower case)", file=sys.stderr)
    if unseen:
        print(f"sample.py: note: {where}: the tokenizer never saw {' '.join(sorted(unseen))}; the model reads them "
              "as raw bytes", file=sys.stderr)
    return out


def run(args):
    check_args(args)
    pieces = read_prompt(args.prompt)
    if not Path(args.checkpoint).is_dir():
        raise ValueError(f"{args.checkpoint}: checkpoint directory not found (train one with python train.py --small)")
    model, tok = model_lib.MMInterleaved.from_checkpoint(args.checkpoint, device=args.device)
    cfg = model.cfg
    pieces = fold_prompt(pieces, tok, args.prompt)
    K, S, max_len, max_imgs = cfg.num_image_tokens, cfg.image_size, cfg.llm.max_seq_len, cfg.llm.max_images - 1
    encoded = [tok.encode(v, bos=False) if kind == "text" else None for kind, v, _ in pieces]
    check_prompt(pieces, encoded, cfg, args)

    # the prompt: text ids, given images as <BoI> + K <image>, markers drawn in place
    generator = torch.Generator(args.device).manual_seed(args.seed)  # text sampling and diffusion noise
    story = StoryWriter(args.out)
    ids, images, n_drawn = [tok.bos_id], [], 0  # images: (1, 3, S, S) each, in the order of their <BoI>s
    for (kind, value, _), enc in zip(pieces, encoded):
        if kind == "text":
            ids += enc
            story.text(value)
        elif kind == "image":
            ids += tok.image_tokens(K)
            images.append(data.image_tensor(value, S)[None].to(args.device))
            story.image(value, given=True)
        else:
            n_drawn += 1
            ids.append(tok.boi_id)
            x, frame = draw(model, ids, images, args, generator, f"image {len(images) + 1}")
            ids += [tok.image_id] * K
            images.append(x)
            story.image(frame, given=False)

    # the continuation: text until </s> or <BoI>; at <BoI> draw the image, read it back, go on
    new_tokens, stop = 0, None
    while stop is None:
        n = min(args.max_new_tokens - new_tokens, max_len - len(ids))
        if n <= 0:
            stop = (f"--max-new-tokens {args.max_new_tokens} reached" if new_tokens >= args.max_new_tokens
                    else f"the model's max_seq_len ({max_len} tokens) reached")
            break
        if args.caption_rerank and ids == [tok.bos_id] + tok.image_tokens(K):  # the story opens with its image
            out = checked_caption(model, tok, ids, images, n, args, generator)
        else:
            prompt = torch.tensor([ids], device=args.device)
            out = model.generate_text(prompt, torch.cat(images) if images else None, max_new_tokens=n,
                                      temperature=args.temperature, top_p=args.top_p, generator=generator)[0]
        new_tokens += len(out)
        ids += out
        end = out[-1] if out else None
        story.text(tok.decode([t for t in out if t not in (tok.eos_id, tok.boi_id)]).strip())
        if end == tok.eos_id:
            stop = "the model ended the story (</s>)"
        elif end == tok.boi_id:
            if n_drawn >= args.max_images or len(images) >= max_imgs:
                stop = (f"--max-images {args.max_images} reached" if n_drawn >= args.max_images
                        else f"the model's image limit ({max_imgs} per story) reached")
                break
            n_drawn += 1
            x, frame = draw(model, ids, images, args, generator, f"image {len(images) + 1}")
            story.image(frame, given=False)
            if len(ids) + K > max_len:  # drawn, but there is no room left to read it back
                stop = f"the model's max_seq_len ({max_len} tokens) reached"
                break
            ids += [tok.image_id] * K
            images.append(x)
    story.save()
    print(f"sample.py: stopped: {stop}; wrote {story.out / 'story.md'} and {story.out / 'story.html'} "
          f"({story.n_images} images)", file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Continue an interleaved text-and-image story (see the docstring "
                                             "of sample.py for the prompt format).")
    g = ap.add_argument_group("input and output")
    g.add_argument("--prompt", required=True, help="prompt file: text, ![alt](image.png) lines and <image> lines")
    g.add_argument("--checkpoint", default="out/small", help="checkpoint directory written by train.py")
    g.add_argument("--out", default="out/story", help="directory for story.md, story.html and the PNGs")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--seed", type=int, default=0, help="seeds text sampling and diffusion noise")
    g = ap.add_argument_group("text")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with --temperature > 0)")
    g.add_argument("--caption-rerank", type=int, default=0, metavar="N", help="when the story opens with an image, "
                   "write its first sentence N more times at temperature 1 and keep the likeliest read and drawn back "
                   "(as eval.py --caption-rerank; 16 and 8 measured; 0: off)")
    g.add_argument("--caption-weight", type=float, default=1.0, metavar="W", help="--caption-rerank's score: "
                   "log p(sentence | image) + W x log p(image | sentence)")
    g.add_argument("--max-new-tokens", type=int, default=60, help="text tokens the model may add in all")
    g.add_argument("--max-images", type=int, default=4, help="images the model may draw (<image> markers included)")
    g = ap.add_argument_group("images")
    g.add_argument("--steps", type=int, default=20, help="diffusion sampling steps")
    g.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    g.add_argument("--rerank", type=int, default=1, metavar="K", help="draw a frame that has no earlier image K times "
                   "and keep the one the model itself captions likeliest (as eval.py --rerank; 1: off)")
    g.add_argument("--read-guidance", type=float, default=0.0, metavar="S", help="draw a frame that has no earlier "
                   "image under reading guidance of step S toward its text (0.3 measured; 0: off)")
    g.add_argument("--read-window", default="300,900", metavar="LO,HI",
                   help="timesteps (of the training schedule's) where reading guidance acts")
    g.add_argument("--read-iters", type=int, default=4, metavar="N", help="reading-guidance steps per sampling step")
    args = ap.parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:
        sys.exit(f"sample.py: error: {' '.join(str(e).split())}")


if __name__ == "__main__":
    main()
