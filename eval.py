"""The synthetic image-QA task, model loading and the QA check for MGVQ; and what mgvq.py needs that is not
the algorithm: calibration files, feeding the model, saving a quantized model, the report.

    python eval.py --model toy                 # accuracy of the toy model on 200 eval questions
    python eval.py --model q --ref toy         # a quantized model against its full-precision one
    python eval.py --train-toy                 # rebuild toy/ (a tiny Qwen2-VL trained on the task)

Scorer: multiple choice by summed answer log-likelihood (plus exact match of greedy generation).
"""

import argparse
import copy
import ctypes
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from kernels import VQLinear, transformers_error

HERE = Path(__file__).resolve().parent
TOY_DIR = HERE / "toy"

# --- the synthetic task

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30), "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")
KINDS = ("color", "shape", "count", "exists")
IMAGE_SIZE = 112   # 8x8 patches of 14 px -> 16 image tokens after the 2x2 merge
CELL = IMAGE_SIZE // 2   # shapes sit in a 2x2 grid, one per cell, so they never overlap


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    choices: list[str]


@dataclass
class Shape:
    shape: str
    color: str
    cx: int   # centre, pixels
    cy: int
    r: int    # half size, pixels


def make_scene(rng: random.Random) -> list[Shape]:
    """1-4 shapes, each in its own cell of a 2x2 grid, jittered."""
    cells = rng.sample(range(4), rng.randint(1, 4))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLORS)),
                  cx=(c % 2) * CELL + CELL // 2 + rng.randint(-6, 6),
                  cy=(c // 2) * CELL + CELL // 2 + rng.randint(-6, 6),
                  r=rng.randint(14, 20)) for c in cells]


def draw_scene(shapes: list[Shape]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    pen = ImageDraw.Draw(image)
    for s in shapes:
        fill = COLORS[s.color]
        if s.shape == "circle":
            pen.ellipse([s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r], fill=fill)
        elif s.shape == "square":
            h = round(0.85 * s.r)   # a square of the same area feel as the circle
            pen.rectangle([s.cx - h, s.cy - h, s.cx + h, s.cy + h], fill=fill)
        else:   # the base sits low so the centre pixel is well inside the triangle
            pen.polygon([(s.cx, s.cy - s.r), (s.cx - s.r, s.cy + 0.8 * s.r),
                         (s.cx + s.r, s.cy + 0.8 * s.r)], fill=fill)
    return image


def ask(rng: random.Random, shapes: list[Shape]) -> tuple[str, str, str, list[str]]:
    """(question, answer, kind, choices), only among questions the scene answers unambiguously."""
    by_shape = [s for s in shapes if sum(t.shape == s.shape for t in shapes) == 1]
    by_color = [s for s in shapes if sum(t.color == s.color for t in shapes) == 1]
    kinds = ["count", "exists"] + ["color"] * bool(by_shape) + ["shape"] * bool(by_color)
    kind = rng.choice(kinds)
    if kind == "count":
        return "How many shapes are there?", str(len(shapes)), kind, list(COUNTS)
    if kind == "color":
        s = rng.choice(by_shape)
        return f"What color is the {s.shape}?", s.color, kind, list(COLORS)
    if kind == "shape":
        s = rng.choice(by_color)
        return f"What shape is the {s.color} one?", s.shape, kind, list(SHAPES)
    present = {(s.color, s.shape) for s in shapes}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    yes = rng.random() < 0.5   # kind == "exists"
    color, shape = rng.choice(sorted(present)) if yes else rng.choice(absent)
    return f"Is there a {color} {shape}?", "yes" if yes else "no", kind, ["yes", "no"]


def make_sample(rng: random.Random) -> tuple[Sample, list[Shape]]:
    shapes = make_scene(rng)
    question, answer, kind, choices = ask(rng, shapes)
    return Sample(draw_scene(shapes), question, answer, kind, choices), shapes


def describe(sample: Sample, shapes: list[Shape]) -> Sample:
    """The same image captioned cell by cell: a training-only kind that supervises every object at once."""
    cells = {(s.cy // CELL, s.cx // CELL): f"{s.color} {s.shape}" for s in shapes}
    caption = " ".join(cells.get((row, col), "empty") for row in range(2) for col in range(2))
    return Sample(sample.image, "Describe the image.", caption, "describe", [caption])


def task_rng(split: str, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512, so each (split, seed) is its own stream.
    assert split in ("train", "calib", "eval"), f"unknown split {split!r}"
    return random.Random(f"mgvq-task:{split}:{seed}")


def make_task(split: str, n: int, seed: int = 0) -> list[Sample]:
    """n samples of a split; the same (split, n, seed) always gives the same samples."""
    rng = task_rng(split, seed)
    return [make_sample(rng)[0] for _ in range(n)]


class DataError(ValueError):
    """A user's data file cannot be read; the message is one sentence."""


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 text file") from None


def read_records(path: Path, text: str | None = None) -> list[tuple[str, object]]:
    """The records of a JSON array or of JSON lines, each with where it sits in the file ("record i" or
    "line i", from 1), so that an error can name it. LLaVA's and ShareGPT4V's files are arrays, ours are lines."""
    text = read_text(path) if text is None else text
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not a valid JSON array ({e.msg} at line {e.lineno})") from None
        return [(f"record {i}", row) for i, row in enumerate(rows, start=1)]
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {i}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i} is not valid JSON ({e.msg})") from None
    return records


def open_image(path: Path, where: str) -> Image.Image:
    """The image at path as RGB, or one sentence naming the record that points to it."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        raise DataError(f"{where}: the image {path} is missing or unreadable") from None


def load_jsonl(path) -> list[Sample]:
    """Samples from records {"image", "question", "choices", "answer"[, "kind"]}, as JSON lines or a JSON array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the jsonl file {path} does not exist")
    samples = []
    for where, row in read_records(path):
        where = f"{path} {where}"
        if not isinstance(row, dict) or not {"image", "question", "choices", "answer"} <= row.keys():
            raise DataError(f"{where} needs the keys image, question, choices and answer")
        choices = row["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: choices must be a non-empty list of strings")
        if row["answer"] not in choices:
            raise DataError(f"{where}: the answer {row['answer']!r} is not one of the choices")
        image = open_image(path.parent / row["image"], where)   # an absolute image path stays absolute
        samples.append(Sample(image, str(row["question"]), row["answer"], str(row.get("kind", "jsonl")), choices))
    if not samples:
        raise DataError(f"the jsonl file {path} holds no samples")
    return samples


# --- calibration files: LLaVA / ShareGPT4V conversations (JSON array or JSON lines), COCO captions

COCO_PROMPT = "Describe the image."   # the question put to every COCO image; its caption is the answer


def first_exchange(turns, where: str) -> tuple[str, str]:
    """The first human turn and the gpt turn that answers it. Later turns are left out: a sample is one
    question and one answer, and the first exchange is the one that carries the image."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns):
        raise DataError(f"{where} has no conversations list of {{\"from\", \"value\"}} turns")
    for turn, reply in zip(turns, turns[1:]):
        if turn.get("from") == "human" and reply.get("from") == "gpt":
            return turn["value"], reply["value"]
    raise DataError(f"{where} has no human turn followed by a gpt turn")


def llava_sample(rec, where: str, image_folder: Path) -> Sample:
    """A LLaVA / ShareGPT4V record as a calibration sample: the first exchange's question, with every <image>
    tag taken out wherever it sits, and its answer. A record without "image" (LLaVA's text-only ShareGPT
    conversations) is a text-only chat sample: no image, the same question and answer, the same template."""
    if not isinstance(rec, dict):
        raise DataError(f"{where} is not a JSON object")
    if "id" in rec:
        where = f"{where} (id {rec['id']})"
    question, answer = first_exchange(rec.get("conversations"), where)
    question = " ".join(question.replace("<image>", " ").split())
    image = rec.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: its image must be one path (a string), not {str(image)[:60]}")
    image = None if image is None else open_image(image_folder / image, where)   # an absolute path stays absolute
    return Sample(image, question, answer.strip(), "calib", [answer.strip()])


def coco_samples(data: dict, path: Path, image_folder: Path, n: int, rng: random.Random) -> list[Sample]:
    """n COCO images drawn by rng, each with the first of its captions as the answer to COCO_PROMPT."""
    names = {im.get("id"): im.get("file_name") for im in data.get("images") or [] if isinstance(im, dict)}
    captions = {}
    for i, ann in enumerate(data.get("annotations") or [], start=1):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) or \
                not isinstance(ann.get("image_id"), (int, str)):
            raise DataError(f"{path} annotation {i} is not a caption with an image_id")
        if names.get(ann["image_id"]) is None:
            raise DataError(f"{path} annotation {i}: image id {ann['image_id']} is not among its images")
        captions.setdefault(ann["image_id"], ann["caption"].strip())
    if not captions:
        raise DataError(f"the COCO file {path} holds no captions (its annotations list is missing or empty)")
    ids = rng.sample(sorted(captions), min(n, len(captions)))
    return [Sample(open_image(image_folder / names[i], f"{path} image id {i}"), COCO_PROMPT, captions[i], "calib",
                   [captions[i]]) for i in ids]


def load_calibration(path, n: int, seed: int = 0, image_folder=None) -> list[Sample]:
    """n calibration samples from a user's file, drawn by a seeded shuffle (not the first n: such files are
    concatenated by source): a COCO captions file ({"images", "annotations"}), or LLaVA / ShareGPT4V records
    ({"image": path, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}) as a
    JSON array or JSON lines. Relative image paths start at image_folder (LLaVA's --image-folder; default: the
    file's folder). Only the records drawn are checked; the first bad one stops the run with one sentence."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the calibration file {path} does not exist")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not folder.is_dir():
        raise DataError(f"the image folder {folder} does not exist")
    rng, text = random.Random(f"mgvq-calib:{seed}"), read_text(path)
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None                                         # JSON lines: read_records says what is wrong
        if isinstance(data, dict) and ({"images", "annotations"} & data.keys()):
            return coco_samples(data, path, folder, n, rng)
    records = read_records(path, text)
    if not records:
        raise DataError(f"the calibration file {path} holds no records")
    picked = rng.sample(range(len(records)), min(n, len(records)))
    return [llava_sample(records[i][1], f"{path} {records[i][0]}", folder) for i in picked]


# --- the toy model: tokenizer, image processor, config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<unk>"]

# Qwen2-VL's chat template, less its default system prompt (shorter rows train faster), and with the
# question rendered before the image: under causal attention the image tokens can then look for what
# is asked, which a 3-layer model needs to learn "is there a red circle?" in minutes.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] if content['type'] == 'text' %}{{ content['text'] }}{% endfor %}"
    "{% for content in message['content'] if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def toy_words() -> list[str]:
    """Every word the task and the chat template can produce."""
    from tokenizers import pre_tokenizers
    texts = ["system You are a helpful assistant. user assistant",
             "How many shapes are there? What color is the one? What shape is the one?",
             "Is there a yes no", "Describe the image. empty", *COLORS, *SHAPES, *COUNTS]
    split = pre_tokenizers.Whitespace().pre_tokenize_str(" ".join(texts))
    return sorted({word for word, _ in split})


def build_toy_tokenizer():
    """A word-level tokenizer with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + toy_words())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:7]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_toy_image_processor(size: int = IMAGE_SIZE):
    """Qwen2-VL's image processor; min = max pixels, so a 112x112 image gives 8x8 patches, 16 tokens."""
    import tempfile
    from transformers import AutoImageProcessor
    config = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
              "temporal_patch_size": 2, "min_pixels": size ** 2, "max_pixels": size ** 2,
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    with tempfile.TemporaryDirectory() as folder:   # AutoImageProcessor builds from a folder only
        Path(folder, "preprocessor_config.json").write_text(json.dumps(config))
        return AutoImageProcessor.from_pretrained(folder)


def toy_config(tokenizer, layers: int = 3, tie: bool = False, width: int = 512, mlp: int = 1024):
    """Tiny Qwen2-VL: decoder linear input widths 512 / 1024 (multiples of 256 as the quantizer needs), heads of 64."""
    from transformers import Qwen2VLConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                num_attention_heads=width // 64, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=tie)
    # vision hidden_size is the merger's output width and must equal the text hidden size
    vision = dict(depth=2, embed_dim=128, hidden_size=width, num_heads=4, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


# --- the testbed: a harder scene task, real English text, a byte-level BPE

# The toy above keeps its full-precision accuracy under every method at 2 bits, so it cannot tell methods
# apart. The testbed is a Qwen2-VL trained on a harder scene task *and* on English (the docstrings that ship
# with Python), with a 4,096-token byte-level BPE: weights that carry real information, as in a real VLM.
TESTBED_DIR = HERE / "testbed"
TB_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
             "purple": (140, 60, 180), "orange": (245, 140, 20), "pink": (240, 120, 190), "gray": (120, 120, 120)}
TB_SHAPES = ("circle", "square", "triangle", "diamond")
TB_SIZES = {"small": (6, 8), "large": (11, 13)}       # half size in pixels
TB_GRID = 4                                           # a 4x4 grid of 28 px cells: one cell = one image token
TB_IMAGE = 112                                        # 8x8 patches of 14 px -> 16 image tokens after the merge
TB_KINDS = ("count", "count_attr", "color", "shape", "size", "exists", "where", "relation")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
DIGITS = tuple(str(i) for i in range(9))


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    row: int
    col: int


def tb_scene(rng: random.Random) -> list[Obj]:
    """1-8 objects, each in its own cell of the 4x4 grid."""
    cells = rng.sample(range(TB_GRID ** 2), rng.randint(1, 8))
    return [Obj(rng.choice(TB_SHAPES), rng.choice(list(TB_COLORS)), rng.choice(list(TB_SIZES)), c // TB_GRID,
                c % TB_GRID) for c in sorted(cells)]


def cell_tint(row: int, col: int) -> tuple[int, int, int]:
    """A cell's faint background: red falls with the row, green with the column. Position is then something
    the image shows, as in a photograph, not only something the decoder must infer through rotary attention
    (without it, "where" and "left of" stayed at chance after 3,400 steps while every look-up was learned)."""
    return 250 - 8 * row, 250 - 8 * col, 250


def tb_draw(objs: list[Obj], rng: random.Random) -> Image.Image:
    cell = TB_IMAGE // TB_GRID
    image = Image.new("RGB", (TB_IMAGE, TB_IMAGE), "white")
    pen = ImageDraw.Draw(image)
    for r in range(TB_GRID):
        for c in range(TB_GRID):
            pen.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=cell_tint(r, c))
    for o in objs:
        r = rng.randint(*TB_SIZES[o.size])
        cx, cy = o.col * cell + cell // 2 + rng.randint(-2, 2), o.row * cell + cell // 2 + rng.randint(-2, 2)
        fill = TB_COLORS[o.color]
        if o.shape == "circle":
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "square":
            pen.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
        elif o.shape == "triangle":
            pen.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def unique(objs: list[Obj], *keys: str) -> list[Obj]:
    """The objects that the attributes `keys` name unambiguously in this scene."""
    sig = lambda o: tuple(getattr(o, k) for k in keys)
    return [o for o in objs if sum(sig(t) == sig(o) for t in objs) == 1]


def tb_ask(rng: random.Random, objs: list[Obj], weights: dict | None = None) \
        -> tuple[str, str, str, list[str], list[Obj]]:
    """(question, answer, kind, choices, referents: the objects the question is about); every answer needs the
    image, and binds attributes to one object. The kind is drawn uniformly among those the scene can ask, or
    by `weights` (training only)."""
    by = {keys: unique(objs, *keys) for keys in (("size", "shape"), ("size", "color"), ("color", "shape"))}
    pairs = [(a, b) for a in by["color", "shape"] for b in by["color", "shape"] if a.col != b.col]
    ok = {"count": True, "count_attr": True, "color": bool(by["size", "shape"]), "shape": bool(by["size", "color"]),
          "size": bool(by["color", "shape"]), "exists": True, "where": bool(by["color", "shape"]),
          "relation": bool(pairs)}
    kinds = [k for k in TB_KINDS if ok[k]]
    kind = rng.choices(kinds, [weights[k] for k in kinds])[0] if weights else rng.choice(kinds)
    if kind == "count":
        return "How many shapes are there?", str(len(objs)), kind, list(DIGITS[1:]), objs
    if kind == "count_attr":
        some = rng.choice(objs) if rng.random() < 0.75 else None     # mostly an attribute the scene has
        if rng.random() < 0.5:
            color = some.color if some else rng.choice(list(TB_COLORS))
            match = [o for o in objs if o.color == color]
            return f"How many {color} shapes are there?", str(len(match)), kind, list(DIGITS), match
        shape = some.shape if some else rng.choice(TB_SHAPES)
        match = [o for o in objs if o.shape == shape]
        return f"How many {shape}s are there?", str(len(match)), kind, list(DIGITS), match
    if kind == "color":
        o = rng.choice(by["size", "shape"])
        return f"What color is the {o.size} {o.shape}?", o.color, kind, list(TB_COLORS), [o]
    if kind == "shape":
        o = rng.choice(by["size", "color"])
        return f"What shape is the {o.size} {o.color} one?", o.shape, kind, list(TB_SHAPES), [o]
    if kind == "size":
        o = rng.choice(by["color", "shape"])
        return f"Is the {o.color} {o.shape} small or large?", o.size, kind, list(TB_SIZES), [o]
    if kind == "where":
        o = rng.choice(by["color", "shape"])
        answer = QUADRANTS[2 * (o.row >= TB_GRID // 2) + (o.col >= TB_GRID // 2)]
        return f"Where is the {o.color} {o.shape}?", answer, kind, list(QUADRANTS), [o]
    if kind == "relation":
        a, b = rng.choice(pairs)
        return f"Is the {a.color} {a.shape} left of the {b.color} {b.shape}?", "yes" if a.col < b.col else "no", \
            kind, ["yes", "no"], [a, b]
    present = {(o.color, o.shape) for o in objs}            # kind == "exists"
    # half the negatives bind wrongly: the colour and the shape are both in the scene, but not together
    swapped = [(o.color, t.shape) for o in objs for t in objs if (o.color, t.shape) not in present]
    absent = [(c, s) for c in TB_COLORS for s in TB_SHAPES if (c, s) not in present]
    if rng.random() < 0.5:
        (color, shape), answer = rng.choice(sorted(present)), "yes"
    else:
        (color, shape), answer = rng.choice(sorted(swapped) if swapped and rng.random() < 0.5 else absent), "no"
    match = [o for o in objs if (o.color, o.shape) == (color, shape)]
    return f"Is there a {color} {shape}?", answer, kind, ["yes", "no"], match


def tb_caption(objs: list[Obj]) -> str:
    """Every object in reading order: a training-only kind that supervises every object at once."""
    return ", ".join(f"{o.size} {o.color} {o.shape}" for o in objs)


# Training asks the kinds that need positions (M-RoPE's row and column) and counting more often.
TRAIN_KIND_WEIGHTS = dict(count=2, count_attr=1.5, color=1.5, shape=1.5, size=1, exists=1.5, where=2, relation=2)


def tb_sample(rng: random.Random, caption: bool = False, weights: dict | None = None) \
        -> tuple[Sample, list[Obj], list[Obj]]:
    """A scene and a question about it (or its caption), the scene's objects, and those the question is about."""
    objs = tb_scene(rng)
    image = tb_draw(objs, rng)
    if caption:
        text = tb_caption(objs)
        return Sample(image, "Describe the image.", text, "describe", [text]), objs, objs
    question, answer, kind, choices, referents = tb_ask(rng, objs, weights)
    return Sample(image, question, answer, kind, choices), objs, referents


def testbed_task(split: str, n: int, seed: int = 0) -> list[Sample]:
    """n scene questions of a split (train / calib / eval: separate random streams)."""
    assert split in ("train", "calib", "eval"), f"unknown split {split!r}"
    rng = random.Random(f"mgvq-testbed:{split}:{seed}")
    return [tb_sample(rng)[0] for _ in range(n)]


@functools.cache
def stdlib_documents() -> dict[str, str]:
    """English that ships with Python: every docstring of the standard library's modules (read with ast, not
    imported; tests, demos and IDLE left out), one document per module, and each pydoc help topic. The text,
    so the testbed's data, is fixed for a given Python version (the testbed was made with the one in its
    config.json's "mgvq_python")."""
    import ast
    import sysconfig
    import pydoc_data.topics
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "tkinter", "ensurepip", "venv"}
    docs = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts[:-1]) or any(p.startswith((".", "__pycache__")) for p in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        found = [ast.get_docstring(node) for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in found if d and len(d) > 40)
        if text:
            docs[f"module:{rel.as_posix()}"] = text
    for name, text in sorted(pydoc_data.topics.topics.items()):
        docs[f"topic:{name}"] = text.strip()
    return docs


def text_split(name: str) -> str:
    """Documents are split by name (a stable hash): 10 % eval, 5 % calib, the rest train."""
    bucket = zlib.crc32(name.encode()) % 20
    return "eval" if bucket < 2 else "calib" if bucket == 2 else "train"


@functools.cache                       # parsing the standard library takes ~2 s
def text_corpus(split: str) -> str:
    docs = stdlib_documents()
    return "\n\n".join(docs[k] for k in sorted(docs) if text_split(k) == split)


def testbed_calib(n: int, seed: int = 0) -> list[Sample]:
    """The testbed's default calibration set, mixed as a user's calibration file would be: three quarters scene
    conversations of its calib split, one quarter plain text (windows of ~500 characters of the calib text)."""
    n_text = n // 4
    rng = random.Random(f"mgvq-testbed:calib-text:{seed}")
    corpus = text_corpus("calib")
    texts = []
    for _ in range(n_text):
        start = corpus.find(" ", rng.randrange(len(corpus) - 600)) + 1   # start and end on a word boundary
        texts.append(Sample(None, "", corpus[start:corpus.rfind(" ", start, start + 500)], "text", []))
    scenes = testbed_task("calib", n - n_text, seed)
    out = []
    for i, scene in enumerate(scenes):                     # a text after every third scene: in every batch of 4
        out += [scene] + ([texts.pop(0)] if i % 3 == 2 and texts else [])
    return out + texts


def build_bpe_tokenizer(vocab_size: int = 4096):
    """A byte-level BPE trained on the training split of the text and the scene task's words, with Qwen's
    special tokens and the chat template (question before the image, as the toy's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = " ".join([*TB_COLORS, *TB_SHAPES, *TB_SIZES, *QUADRANTS, *DIGITS, "shapes", "circles", "squares",
                      "triangles", "diamonds"])
    task = [text for s in testbed_task("train", 2000, seed=99) for text in (s.question, s.answer)]
    captions = [tb_caption(tb_scene(rng)) for rng in [random.Random("mgvq-testbed:bpe")] for _ in range(500)]
    core.train_from_iterator([text_corpus("train"), words, *task, *captions, "Describe the image."], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:7]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def testbed_config(tokenizer):
    """6 decoder layers of width 256 (MLP 768, 4 heads of 64, 2 KV heads), tied 4,096-token embedding, a 2-block
    vision tower: 6.7 M parameters, 13 MB in bf16. (4 layers of width 512 reached 0.860 held out in the same
    time; 6 narrower layers, 0.967: the scene questions need depth more than width.)"""
    config = toy_config(tokenizer, layers=6, tie=True, width=256, mlp=768)
    config.mgvq_python = sys.version.split()[0]
    config.mgvq_testbed = True          # eval.py and mgvq.py score any folder that says so on the testbed's task
    return config


def text_samples(tokenizer, split: str, n: int, length: int = 128) -> list[Sample]:
    """The first n consecutive chunks of `length` tokens of a text split, as text-only samples (no image)."""
    ids = tokenizer(text_corpus(split), add_special_tokens=False)["input_ids"]
    assert len(ids) >= n * length, f"the {split} text has {len(ids)} tokens, fewer than {n} x {length}"
    return [Sample(None, "", tokenizer.decode(ids[i * length:(i + 1) * length]), "text", [])
            for i in range(n)]



def referent_cells(objs: list[Obj]) -> torch.Tensor:
    """(16,) 1.0 at the grid cells of the objects, in the image tokens' order (raster)."""
    target = torch.zeros(TB_GRID ** 2)
    target[[o.row * TB_GRID + o.col for o in objs]] = 1.0
    return target


def cell_targets(objs: list[Obj]) -> torch.Tensor:
    """(16,) the class of each grid cell, in the image tokens' order (raster): 0 empty, else 1 + the index of
    (colour, shape, size) among the 64 combinations. (Its position is the index itself: see train_testbed.)"""
    target = torch.zeros(TB_GRID ** 2, dtype=torch.long)
    for o in objs:
        c = (list(TB_COLORS).index(o.color) * len(TB_SHAPES) + TB_SHAPES.index(o.shape)) * len(TB_SIZES)
        target[o.row * TB_GRID + o.col] = 1 + c + list(TB_SIZES).index(o.size)
    return target


def answer_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """row_mean_loss of the logits of the decoder's output `hidden` (B, T, H), with the LM head applied at the
    labelled positions only."""
    target, mask = labels[:, 1:], labels[:, 1:] != -100
    nll = F.cross_entropy(model.lm_head(hidden[:, :-1][mask]).float(), target[mask], reduction="none")
    per_row = torch.zeros(target.shape, dtype=nll.dtype, device=nll.device).masked_scatter(mask, nll)
    return (per_row.sum(1) / mask.sum(1)).mean()


@contextmanager
def fast_training(model):
    """Training-only speed-ups on CPU that leave the saved model as it is: eager attention (its small matmuls
    run in bf16; the fused kernel's backward does not), and the vision patch embedding, a Conv3d whose kernel
    equals its stride, computed as the Linear it is (the Conv3d backward is slow on CPU)."""
    embed = model.model.visual.patch_embed
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    embed.forward = lambda x: F.linear(x.reshape(-1, embed.proj.weight[0].numel()).to(embed.proj.weight.dtype),
                                       embed.proj.weight.flatten(1))
    try:
        yield
    finally:
        del embed.forward
        model.set_attn_implementation(implementation)


def train_testbed(out: Path = TESTBED_DIR, steps: int = 3400, qa_batch: int = 24, text_batch: int = 6,
                  lr: float = 1.5e-3, seed: int = 0, device: str = "cpu", threads: int = 1, eval_every: int = 500,
                  log=print) -> dict:
    """Train the testbed from scratch and save it (bf16, hub layout). Each step: qa_batch scene rows (one in six
    of them captions) and text_batch windows of 128 tokens of the training text; the loss is the scene rows' mean
    answer loss + the text's mean token loss + two auxiliary losses, whose heads are not part of the saved
    model: one asks each image token at the vision merger's output for its cell's object and for the cell
    itself (it gets the vision tower going from the first steps), one asks each image token halfway up the decoder whether its cell holds
    an object the question is about (the question comes before the image, so the image tokens can see it):
    the look-up that every kind needs, supervised directly, early enough for the later layers to read it. Mixed precision (bf16 autocast, fp32 weights). Everything is seeded: the
    same command on the same kind of machine gives the same weights."""
    from transformers import Qwen2VLForConditionalGeneration
    torch.set_num_threads(threads)            # CPU sums depend on the thread count: the recipe fixes it
    torch.manual_seed(seed)
    tokenizer = build_bpe_tokenizer()
    model = Qwen2VLForConditionalGeneration(testbed_config(tokenizer)).to(device)
    vlm = VLM(model, "testbed", tokenizer, build_toy_image_processor(TB_IMAGE), torch.device(device), torch.float32)
    n_objects = 1 + len(TB_COLORS) * len(TB_SHAPES) * len(TB_SIZES)                 # 65 cell classes, then 16 cells
    aux = torch.nn.Linear(model.config.text_config.hidden_size, n_objects + TB_GRID ** 2).to(device)
    where = torch.arange(TB_GRID ** 2).repeat(qa_batch).to(device)                  # (B*16,) each token's cell
    referent = torch.nn.Linear(model.config.text_config.hidden_size, 1).to(device)
    merged = {}
    hook = model.model.visual.merger.register_forward_hook(lambda mod, args, y: merged.update(y=y))
    stream = torch.tensor(tokenizer(text_corpus("train"), add_special_tokens=False)["input_ids"])
    params = list(model.parameters()) + list(aux.parameters()) + list(referent.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = max(steps // 30, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(   # linear warmup, then cosine down to 5 %
        opt, lambda t: min(1.0, (t + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / steps))))
    rng, gen = random.Random(f"mgvq-testbed:train:{seed}"), torch.Generator().manual_seed(seed)
    calib = testbed_task("calib", 192, seed)
    log(f"training the testbed: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{len(stream)} training text tokens, {steps} steps, {threads} threads")
    start, running = time.time(), None
    with fast_training(model), tqdm(total=steps, desc="train testbed", mininterval=5) as bar:
        for step in range(steps):
            model.train()
            rows, scenes, about = zip(*[tb_sample(rng, i % 6 == 5, TRAIN_KIND_WEIGHTS) for i in range(qa_batch)])
            cells = torch.cat([cell_targets(objs) for objs in scenes]).to(device)       # (B*16,)
            asked = torch.cat([referent_cells(objs) for objs in about]).to(device)     # (B*16,)
            scene = vlm.batch(list(rows))
            labels = scene.pop("labels")
            starts = torch.randint(0, len(stream) - 129, (text_batch,), generator=gen)
            text = torch.stack([stream[s:s + 129] for s in starts.tolist()]).to(device)   # (B, 129)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
                states = model.model(**scene, output_hidden_states=True)
                losses = [answer_loss(model, states.last_hidden_state, labels)]               # (B, T, H)
                guess = aux(merged["y"]).float()                                           # (B*16, 65 + 16)
                losses.append(F.cross_entropy(guess[:, :n_objects], cells) + F.cross_entropy(guess[:, n_objects:], where))
                middle = states.hidden_states[len(states.hidden_states) // 2]                    # what the later layers read
                image = middle[scene["input_ids"] == model.config.image_token_id]          # (B*16, H), raster
                losses.append(F.binary_cross_entropy_with_logits(referent(image).float().squeeze(1), asked))
                logits = model(input_ids=text[:, :-1]).logits.float()                      # (B, 128, V)
                losses.append(F.cross_entropy(logits.flatten(0, 1), text[:, 1:].flatten()))
            opt.zero_grad(set_to_none=True)
            sum(losses).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            bar.update()
            now = torch.tensor([l.item() for l in losses])
            running = now if running is None else 0.98 * running + 0.02 * now
            if step % 100 == 0 or step == steps - 1:
                line = (f"step {step:5d}/{steps}  loss: scene {running[0]:.3f}  cells {running[1]:.3f}  "
                        f"referents {running[2]:.3f}  text {running[3]:.3f}  {time.time() - start:6.0f} s")
                if step % eval_every == 0 or step == steps - 1:
                    model.eval()
                    line += f"  calib accuracy {qa_check(vlm, calib, batch_size=64)['accuracy']:.3f}"
                bar.write(line)
    hook.remove()
    save_toy(vlm, out)
    return {"seconds": round(time.time() - start, 1)}


# --- loading

ALIASES = {"qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct", "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct"}


class ModelNotFound(Exception):
    """No weights for the requested model; the message is one sentence."""


@dataclass
class VLM:
    """A loaded model plus the way to feed it."""
    model: "torch.nn.Module"   # Qwen2VLForConditionalGeneration
    name: str
    tokenizer: object
    image_processor: object
    device: torch.device
    dtype: torch.dtype

    def prompt_ids(self, sample: Sample, grid_thw: torch.Tensor | None) -> list[int]:
        """The chat prompt of a sample; a text-only sample (no image, no question) has none: all of it is answer."""
        if sample.image is None and not sample.question:
            return []
        content = [{"type": "text", "text": sample.question}]
        if sample.image is not None:
            content.insert(0, {"type": "image"})
        messages = [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pad = "<|image_pad|>"
        if sample.image is not None:
            merge = self.model.config.vision_config.spatial_merge_size
            n_image = int(grid_thw.prod()) // merge ** 2   # t·h·w / merge² tokens for this image
            assert text.count(pad) == 1, "the chat template must place exactly one image"
            text = text.replace(pad, pad * n_image)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch(self, samples: list[Sample], with_answer: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded model inputs; "labels" marks the answer tokens and the closing <|im_end|> (every token of
        a text-only sample). Samples without an image get no image tokens."""
        images = [s.image for s in samples if s.image is not None]
        vision = self.image_processor(images=images, return_tensors="pt") if images else {}
        grids = iter(vision.get("image_grid_thw", []))
        rows, answer_lens = [], []
        for sample in samples:
            ids = self.prompt_ids(sample, next(grids) if sample.image is not None else None)
            end = "" if not ids else "<|im_end|>"        # plain text ends where it ends
            answer = self.tokenizer(sample.answer + end, add_special_tokens=False)["input_ids"]
            rows.append(ids + answer if with_answer else ids)
            answer_lens.append(len(answer) if with_answer else 0)
        T = max(len(r) for r in rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)   # (B, T)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, (row, k) in enumerate(zip(rows, answer_lens)):
            # left padding: every row ends at T - 1, so generation and the answer span line up
            input_ids[b, T - len(row):] = torch.tensor(row)
            attention_mask[b, T - len(row):] = 1
            if k:
                labels[b, T - k:] = input_ids[b, T - k:]
        mm_token_type_ids = (input_ids == self.model.config.image_token_id).long()
        out = dict(input_ids=input_ids, attention_mask=attention_mask)
        if images:
            out.update(pixel_values=vision["pixel_values"].to(self.dtype), image_grid_thw=vision["image_grid_thw"],
                       mm_token_type_ids=mm_token_type_ids)
        if with_answer:
            out["labels"] = labels
        return {k: v.to(self.device) for k, v in out.items()}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":   # CPU bf16 matmuls are slow; bf16 is the native width on GPU
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert dtype in names, f"dtype must be auto or one of {list(names)}, got {dtype!r}"
    return names[dtype]


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def model_folder(name: str) -> Path:
    """The local folder of a model name: toy, an alias, a Hub id or a folder."""
    if name in ("toy", "testbed"):
        folder, how = (TOY_DIR, "--train-toy") if name == "toy" else (TESTBED_DIR, "--train-testbed")
        if not (folder / "config.json").is_file():
            raise ModelNotFound(f"the {name} checkpoint {folder} is missing; build it with python eval.py {how}")
        return folder
    repo = ALIASES.get(name, name)
    if Path(repo).expanduser().is_dir():
        return Path(repo).expanduser()
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise ModelNotFound(f"the model folder {repo} does not exist; pass an existing folder with --model")
    from huggingface_hub import snapshot_download
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
    try:   # the local cache first, so that an offline machine never waits on the network
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    if not hub_reachable():
        raise ModelNotFound(f"no local copy of {repo} and the Hugging Face Hub cannot be reached; download it on "
                            f"a connected machine and pass its folder with --model /path/to/{repo.split('/')[1]}")
    return Path(snapshot_download(repo, allow_patterns=patterns))


QWEN2_VL_CONFIGS = {   # the published configs' shapes, for --random-init dry runs (no download)
    "Qwen/Qwen2-VL-2B-Instruct": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, mrope_section=[16, 24, 24],
                  tie_word_embeddings=True),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)),
    "Qwen/Qwen2-VL-7B-Instruct": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, mrope_section=[16, 24, 24],
                  tie_word_embeddings=False),
        vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)),
}


def random_init_model(name: str, device: str = "auto", dtype: str = "auto", image_size: int = 224) -> VLM:
    """A Qwen2-VL of a published size with random weights (no download), fed by the toy's tokenizer
    (its ids fit any vocabulary) and an image processor that resizes to image_size^2, for timing and memory runs."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    repo = ALIASES.get(name, name)
    if repo not in QWEN2_VL_CONFIGS:
        raise ModelNotFound(f"--random-init knows {', '.join(ALIASES)}, not {name}")
    shape = QWEN2_VL_CONFIGS[repo]
    tokenizer = build_toy_tokenizer()
    tokenizer.padding_side = "left"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(shape["text"])
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta"),
                               "mrope_section": text.pop("mrope_section")}
    text.update(max_position_embeddings=32768, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    config = Qwen2VLConfig(text_config=text, vision_config=dict(shape["vision"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2), tie_word_embeddings=text["tie_word_embeddings"],
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    torch_dtype = resolve_dtype(dtype, dev)
    torch.manual_seed(0)
    with dev:
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
    processor = build_toy_image_processor(image_size)
    return VLM(model.eval(), f"{name} (random init)", tokenizer, processor, dev, torch_dtype)


def load_quantized(folder: Path, dtype: torch.dtype):
    """A model saved by mgvq.py --out: build the architecture from config.json, put a VQLinear (from the
    layouts in mgvq.json) where each quantized linear was, then load every tensor strictly."""
    from safetensors.torch import load_model as load_safetensors
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration
    layouts = json.loads((folder / "mgvq.json").read_text())["layouts"]
    model = Qwen2VLForConditionalGeneration._from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    for name, layout in layouts.items():
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, VQLinear(**{**layout, "dtype": dtype}))
    load_safetensors(model, folder / "model.safetensors", strict=True)   # raises on any missing or unexpected key
    return model


def load_model(name: str, device: str = "auto", dtype: str = "auto") -> VLM:
    """A Qwen2-VL (the toy, a Hub id or a local hub-layout folder) with its tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    folder = model_folder(name)
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"the folder {folder} holds no config.json, so it is not a saved model")
    if (folder / "mgvq.json").is_file():
        model = load_quantized(folder, torch_dtype)
    else:
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    image_processor = AutoImageProcessor.from_pretrained(folder)
    return VLM(model.to(device).eval(), name, tokenizer, image_processor, device, torch_dtype)


# --- feeding a Qwen2-VL, for mgvq.py's calibration passes: hooks, its blocks and linears, token tags, the
# full multimodal forward and the logits at the answer positions

@contextmanager
def hooked(handles):
    """Remove the given hook handles when the block ends, whatever happens."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised from a hook once it has what it needs: the rest of the forward is skipped."""


def quantizable_blocks(model, vision: bool) -> list[tuple[str, torch.nn.Module]]:
    """Blocks in quantization order, found by walking the containers (module *names* moved between
    transformers 4.x and 5.x; name patterns quantized the vision tower by accident in peer tools).
    Vision blocks first (opt-in), then the decoder layers; embeddings, lm_head and the merger stay."""
    names = {id(mod): name for name, mod in model.named_modules()}
    blocks = list(model.model.visual.blocks) if vision else []
    blocks += list(model.model.language_model.layers)
    return [(names[id(b)], b) for b in blocks]


def linears(block) -> dict[str, torch.nn.Linear]:
    return {name: mod for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)}


def token_tags(batch, x: torch.Tensor):
    """Per-token (image?, valid?) flags for an activation x (..., n) of this batch. Activations that are not
    laid out (B, T) - the vision tower's patches - count as valid image tokens."""
    mask = batch["attention_mask"]
    if x.shape[:-1] == mask.shape:                          # a batch of text alone has no mm_token_type_ids
        img = batch["mm_token_type_ids"] == 1 if "mm_token_type_ids" in batch else torch.zeros_like(mask, dtype=torch.bool)
        return img.reshape(-1), (mask > 0).reshape(-1)
    n = x.numel() // x.shape[-1]
    return torch.ones(n, dtype=torch.bool, device=x.device), torch.ones(n, dtype=torch.bool, device=x.device)


def loss_mask(batch) -> torch.Tensor:
    """(B, T-1) bool: positions whose next token is an answer token (the loss positions)."""
    return batch["labels"][:, 1:] != -100


def contiguous_input(mod, args):
    """On CPU, a bf16 matmul of a strided (B, k, n) view with a weight that needs no gradient copies the weight
    B times (3.5 GB for Qwen2-VL-2B's head at B = 8, measured): hand the head a contiguous input."""
    return (args[0].contiguous(),) + args[1:]


def forward(model, batch, keep: int = 0) -> torch.Tensor:
    """The full multimodal forward (3-D M-RoPE positions included): logits (B, T, V), or of the last `keep`."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with hooked([model.lm_head.register_forward_pre_hook(contiguous_input)]):
        return model(**inputs, use_cache=False, logits_to_keep=keep).logits


def answer_logits(model, batch) -> torch.Tensor:
    """(N, V) fp32 logits at the N loss positions of the batch. Left padding puts every answer at the end,
    so only the last k positions need the (large-vocabulary) head."""
    k = int((batch["labels"] != -100).sum(1).max()) + 1
    logits = forward(model, batch, keep=k)[:, :-1]                            # (B, k-1, V) predicting t+1
    return logits[batch["labels"][:, -k:][:, 1:] != -100].float()


def block_input(model, block, batch) -> torch.Tensor:
    """The current model's input to `block` for this batch (the rest of the forward is skipped)."""
    got = []

    def grab(mod, args):
        got.append(args[0].detach())
        raise StopForward

    with torch.no_grad(), hooked([block.register_forward_pre_hook(grab)]):
        try:
            forward(model, batch)
        except StopForward:
            pass
    return got[0]


# --- saving a quantized model (mgvq.py): one folder that load_model and transformers' Auto classes both load

def is_toy(name: str) -> bool:
    return name == "toy" or Path(name).expanduser().resolve() == TOY_DIR.resolve()


def file_mode(folder: bool) -> int:
    """The mode os.mkdir or open would give under this process's umask (0o755 and 0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


@contextmanager
def output_folder(out: str | None):
    """Where a run writes, made when it starts: a hidden folder beside `out`, so that a path that cannot be
    written fails at once, in one sentence, and not after the quantization. When the block ends it is renamed
    to `out` (so `out` never holds half a model); on any failure or interrupt it is removed. None: no folder."""
    if out is None:
        yield None
        return
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty folder")
    parent = out.absolute().parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write into {parent} ({e.strerror})") from None
    try:
        os.chmod(tmp, file_mode(folder=True))              # mkdtemp makes it 0700
        yield tmp
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def draw_allocation(alloc: dict, path: Path, choices: list[int]) -> None:
    """The allocation as a picture: one row per layer, one cell per column group, colour = bits."""
    colours = {1: (49, 54, 149), 2: (116, 173, 209), 3: (254, 224, 144), 4: (244, 109, 67), 5: (165, 0, 38)}
    cell, label = 10, 360
    width = label + cell * max(len(v) for v in alloc.values()) + 10
    img = Image.new("RGB", (width, 20 + cell * len(alloc) + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 2), "bits per column group (rows: layers)", fill="black")
    for r, (name, bits) in enumerate(alloc.items()):
        y = 20 + r * cell
        draw.text((4, y - 1), name.replace("model.language_model.", "")[:56], fill="black")
        for g, b in enumerate(bits):
            draw.rectangle([label + g * cell, y, label + (g + 1) * cell - 2, y + cell - 2], fill=colours.get(b, (0, 0, 0)))
    for i, b in enumerate(choices):
        x = label + i * 60
        draw.rectangle([x, img.height - 22, x + 12, img.height - 10], fill=colours.get(b, (0, 0, 0)))
        draw.text((x + 16, img.height - 23), f"{b} bits", fill="black")
    img.save(path)


def save_quantized(vlm: VLM, report: dict, folder: Path, choices: list[int]) -> None:
    """Write a quantized model into folder (output_folder's): config.json, which holds every VQLinear's layout
    and names the class of modeling_mgvq.py in auto_map; the generation, tokenizer and image-processor files;
    model.safetensors (VQLinear buffers included); mgvq.json (method, bits, layouts, allocation, sensitivities,
    figures); allocation.png; modeling_mgvq.py and the kernels.py it imports. load_model(folder) loads it back,
    and so does AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True) without this code."""
    from safetensors.torch import save_model
    config = copy.deepcopy(vlm.model.config)
    config.architectures = ["Qwen2VLMGVQForConditionalGeneration"]
    config.auto_map = {"AutoModelForImageTextToText": "modeling_mgvq.Qwen2VLMGVQForConditionalGeneration"}
    config.mgvq_layouts = report["layouts"]
    config.save_pretrained(folder)
    if getattr(vlm.model, "generation_config", None) is not None:
        vlm.model.generation_config.save_pretrained(folder)
    vlm.tokenizer.save_pretrained(folder)
    vlm.image_processor.save_pretrained(folder)
    save_model(vlm.model, str(folder / "model.safetensors"))
    (folder / "mgvq.json").write_text(json.dumps(report, indent=1))
    if report["allocation"]:
        draw_allocation(report["allocation"], folder / "allocation.png", choices)
    for name in ("modeling_mgvq.py", "kernels.py"):
        shutil.copyfile(HERE / name, folder / name)
    for f in folder.iterdir():
        os.chmod(f, file_mode(folder=False))


# --- reporting a run of mgvq.py: honest bits, memory, the summary and the ablation table

HELDOUT_KEYS = ("accuracy_fp", "accuracy_q", "agreement", "ppl_fp", "ppl_q", "kl", "kl_qa", "kl_text", "kl_choices",
                "per_kind")
SUMMARY_KEYS = ("method", "bits", "bits_per_weight", "bits_per_weight_model", *HELDOUT_KEYS, "seconds",
                "quantize_seconds", "peak_mem_gb")             # the JSON line mgvq.py prints (--json: everything)


def bits_report(model) -> dict:
    """Honest bits per weight: index + codebook + scale bits over the quantized layers' weights, and over
    the whole model with everything else counted at 16 bits (bf16 storage, biases included)."""
    q_bits = q_weights = other = total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, VQLinear):
            sb = mod.storage_bits()
            q_bits += sb["index"] + sb["codebook"] + sb["scale"]
            q_weights += sb["weights"]
    for name, p in model.named_parameters():
        other += 16 * p.numel()
        total += p.numel()
    for name, b in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "bias" and isinstance(model.get_submodule(name.rsplit(".", 1)[0]), VQLinear):
            other += 16 * b.numel()
            total += b.numel()
    return dict(bits_per_weight=q_bits / max(q_weights, 1), bits_per_weight_model=(q_bits + other) / (q_weights + total))


def release_memory() -> None:
    """Hand freed memory back to the system between phases. glibc keeps what torch frees in its arenas: at 2B
    size the process held 1.2-2.4 GB of freed memory after each calibration pass (measured), which the next
    phase's peak stacks on. No-op where malloc_trim does not exist."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mem_gb(device) -> float:
    """Peak memory of this process: CUDA max allocated on GPU, max RSS on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def layer_row(name: str, vq: VQLinear, bits: list[int], seconds: float, info: dict) -> dict:
    """A quantized layer's entry in the report (shape, bits per column group, honest bits per weight, seconds,
    the quantizer's figures), printed as one line when it is made."""
    sb = vq.storage_bits()
    row = dict(name=name, shape=[vq.out_features, vq.in_features], bits=bits,
               bpw=(sb["index"] + sb["codebook"] + sb["scale"]) / sb["weights"], seconds=seconds, **info)
    grad = f"  shift {info['shift']:.3f}  loss {info['proxy_rtn']:.2e} -> {info['proxy']:.2e}" if "proxy" in info else ""
    tqdm.write(f"{name:48s} {row['bpw']:.3f} b/w  err {info['err_rtn']:.4f} -> {info['err']:.4f}{grad}  {seconds:.1f}s")
    return row


def print_summary(r: dict) -> None:
    f = lambda v, w, p=3: f"{v:{w}.{p}f}" if isinstance(v, float) else f"{'-':>{w}}"
    print(f"\n{'method':8s} {'bits/w':>7s} {'bits/w model':>13s} {'acc FP':>7s} {'acc Q':>6s} {'agree':>6s} "
          f"{'ppl FP':>7s} {'ppl Q':>7s} {'KL':>7s} {'time':>6s}")
    print(f"{r['method']:8s} {r['bits_per_weight']:7.3f} {r['bits_per_weight_model']:13.3f} {f(r['accuracy_fp'], 7)} "
          f"{f(r['accuracy_q'], 6)} {f(r['agreement'], 6)} {f(r['ppl_fp'], 7, 2)} {f(r['ppl_q'], 7, 2)} "
          f"{f(r['kl'], 7, 4)} {r['seconds']:5.0f}s")


def mean_std(values) -> tuple[float, float]:
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


def ablation_row(label: str, runs: list[dict], seeds) -> dict:
    """One row of the ablation table from its runs (one per calibration seed): each figure's mean, standard
    deviation and per-seed values. Prints the row as it is made."""
    row = dict(row=label, bits_per_weight=runs[0]["bits_per_weight"], seeds=list(seeds),
               seconds=sum(r["seconds"] for r in runs) / len(runs))
    for key in ("accuracy_q", "agreement", "ppl_q", "kl", "kl_qa", "kl_text"):
        if runs[0].get(key) is not None:
            row[key], row[key + "_std"] = mean_std(r[key] for r in runs)
            row[key + "_runs"] = [r[key] for r in runs]
    print(f"{label:28s} {row['bits_per_weight']:.3f} b/w  acc {row['accuracy_q']:.3f} +- {row['accuracy_q_std']:.3f}"
          f"  ppl {row.get('ppl_q', float('nan')):.2f}  KL {row['kl']:.4f}  {row['seconds']:.0f}s", flush=True)
    return row


def ablation_table(model: str, bits: int, held: "HeldOut", fp: dict, rows: list[dict], seeds) -> dict:
    """Print the ablation table in markdown, the FP model first; return it as mgvq.py's JSON line."""
    pm = lambda r, k, f: f"{r[k]:{f}} ± {r[k + '_std']:{f}}" if k in r else "-"
    print(f"\n| row | bits/weight | QA accuracy | perplexity | KL (full vocabulary) | agreement | seconds |")
    print("|---|---|---|---|---|---|---|")
    print(f"| FP | 16 (bf16) | {fp['accuracy']:.3f} | {fp.get('ppl', float('nan')):.2f} | 0 | 1.000 | - |")
    for r in rows:
        print(f"| {r['row']} | {r['bits_per_weight']:.3f} | {pm(r, 'accuracy_q', '.3f')} | {pm(r, 'ppl_q', '.2f')} | "
              f"{pm(r, 'kl', '.4f')} | {pm(r, 'agreement', '.3f')} | {r['seconds']:.0f} |")
    return dict(model=model, bits=bits, accuracy_fp=fp["accuracy"], ppl_fp=fp.get("ppl"), per_kind_fp=fp["per_kind"],
                n_questions=len(held.questions), text_tokens=fp.get("text_tokens"), seeds=list(seeds), rows=rows)


# --- scoring

def answer_logprobs(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) summed log p(label tokens); left padding puts every answer at the end of its row."""
    labels = inputs["labels"]                                      # (B, T)
    k = int((labels != -100).sum(1).max()) + 1                     # last k positions hold all answers
    fwd = {key: v for key, v in inputs.items() if key != "labels"}
    logits = model(**fwd, logits_to_keep=k).logits.float()        # (B, k, V)
    targets = labels[:, -k:][:, 1:]                                # (B, k-1), position t predicts t+1
    logp = logits[:, :-1].log_softmax(-1)                          # (B, k-1, V)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)   # (B, k-1)
    return picked.masked_fill(targets == -100, 0.0).sum(1)


@torch.no_grad()
def choice_logprobs(vlm: VLM, samples: list[Sample], batch_size: int = 16) -> torch.Tensor:
    """(N, max_choices) summed log-likelihood of each candidate answer, -inf for padding."""
    pairs = [(i, j) for i, s in enumerate(samples) for j in range(len(s.choices))]
    scores = torch.full((len(samples), max(len(s.choices) for s in samples)), -math.inf)
    for start in tqdm(range(0, len(pairs), batch_size), desc=f"score {vlm.name}", leave=False):
        chunk = pairs[start:start + batch_size]
        batch = vlm.batch([dataclasses.replace(samples[i], answer=samples[i].choices[j]) for i, j in chunk])
        lp = answer_logprobs(vlm.model, batch).cpu()
        for (i, j), value in zip(chunk, lp):
            scores[i, j] = value
    return scores


def normalize(text: str) -> str:
    return text.strip().strip(".!").strip().lower()


@torch.no_grad()
def generate_answers(vlm: VLM, samples: list[Sample], batch_size: int = 16, max_new_tokens: int = 8) -> list[str]:
    out = []
    for start in tqdm(range(0, len(samples), batch_size), desc=f"generate {vlm.name}", leave=False):
        batch = vlm.batch(samples[start:start + batch_size], with_answer=False)
        ids = vlm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=vlm.tokenizer.pad_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]                 # (B, new tokens)
        out += vlm.tokenizer.batch_decode(new, skip_special_tokens=True)
    return out


def accuracy_by_kind(samples: list[Sample], correct: list[bool]) -> dict[str, float]:
    kinds = sorted({s.kind for s in samples})
    return {k: sum(c for s, c in zip(samples, correct) if s.kind == k) / sum(s.kind == k for s in samples)
            for k in kinds}


def qa_check(vlm: VLM, samples: list[Sample], ref: VLM | None = None, generate: bool = False,
             batch_size: int = 16, ref_scores: torch.Tensor | None = None) -> dict:
    """Multiple-choice accuracy of vlm; with ref (full precision), or its choice_logprobs already computed
    as ref_scores (so that the FP model need not stay in memory), also agreement and KL(ref ‖ vlm)."""
    scores = choice_logprobs(vlm, samples, batch_size)
    correct = [s.choices[j] == s.answer for s, j in zip(samples, scores.argmax(1).tolist())]
    result = {"model": vlm.name, "scorer": "choice-loglik", "n": len(samples),
              "accuracy": sum(correct) / len(samples), "per_kind": accuracy_by_kind(samples, correct)}
    if generate:
        texts = [normalize(t) for t in generate_answers(vlm, samples, batch_size)]
        result["generate_accuracy"] = sum(t == normalize(s.answer) for t, s in zip(texts, samples)) / len(samples)
        result["parse_failure"] = sum(t not in map(normalize, s.choices) for t, s in zip(texts, samples)) / len(samples)
    if ref is not None:
        ref_scores = choice_logprobs(ref, samples, batch_size)
    if ref_scores is not None:
        ref_correct = [s.choices[j] == s.answer for s, j in zip(samples, ref_scores.argmax(1).tolist())]
        log_p = ref_scores.log_softmax(1)                          # (N, C) over the candidates only
        log_q = scores.log_softmax(1)
        # KL(p_ref ‖ p_q) = Σ p (log p - log q); padded candidates have p = 0 and contribute nothing
        kl = torch.where(log_p.isfinite(), log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(1)
        result.update(ref=ref.name if ref is not None else "full precision", accuracy_fp=sum(ref_correct) / len(samples), accuracy_q=result["accuracy"],
                      agreement=(scores.argmax(1) == ref_scores.argmax(1)).float().mean().item(),
                      kl=kl.mean().item())
    return result


# --- held-out scoring: QA accuracy, text perplexity, full-vocabulary KL to the FP model

@dataclass
class HeldOut:
    """What a model is scored on: multiple-choice questions and text chunks no calibration or training saw."""
    questions: list[Sample]
    texts: list[Sample]


def is_testbed(name: str) -> bool:
    """`testbed`, or a folder whose config says it is the testbed or made from it (a copy, a quantized one)."""
    config = Path(name).expanduser() / "config.json"
    return name == "testbed" or config.is_file() and json.loads(config.read_text()).get("mgvq_testbed", False)


def heldout_set(name: str, tokenizer, n_questions: int, n_texts: int = 96) -> HeldOut:
    """The testbed's own eval split (scene questions + 128-token chunks of the held-out text); for any other
    model the toy's synthetic questions, and the held-out text unless its vocabulary is the toy's 49 words."""
    if is_testbed(name):
        return HeldOut(testbed_task("eval", n_questions), text_samples(tokenizer, "eval", n_texts))
    texts = [] if name == "toy" or len(tokenizer) < 1000 else text_samples(tokenizer, "eval", n_texts)
    return HeldOut(make_task("eval", n_questions), texts)


@torch.no_grad()
def label_logprobs(vlm: VLM, samples: list[Sample], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities over the whole vocabulary (P, V) at every labelled position of the samples (the
    answer and its <|im_end|>, or every token of a text), in order, and the P target ids."""
    logps, targets = [], []
    for start in range(0, len(samples), batch_size):
        batch = vlm.batch(samples[start:start + batch_size])
        labels = batch.pop("labels")                                       # (B, T)
        k = int((labels != -100).sum(1).max()) + 1                         # left padding: labels sit at the end
        logits = vlm.model(**batch, logits_to_keep=k).logits[:, :-1]       # (B, k-1, V) predicting t+1
        target = labels[:, -k:][:, 1:]                                     # (B, k-1)
        logps.append(logits[target != -100].float().log_softmax(-1).cpu())
        targets.append(target[target != -100].cpu())
    return torch.cat(logps), torch.cat(targets)


def heldout_reference(vlm: VLM, held: HeldOut) -> dict:
    """The FP model's side of the comparison, computed once before quantizing: choice scores, and the full
    log-probabilities at the answer and text positions, on the CPU: fp32 for a small vocabulary (13k positions
    x 4,096 tokens = 210 MB for the testbed), fp16 for a real one (x 151,936 = 4 GB; fp16's rounding puts a
    floor of ~1e-5 under the KL)."""
    ref = {"scores": choice_logprobs(vlm, held.questions)}
    for part, samples in (("qa", held.questions), ("text", held.texts)):
        if samples:
            logp, target = label_logprobs(vlm, samples)
            ref[part] = (logp if logp.shape[1] <= 32768 else logp.half(), target)
    return ref


def full_kl(logp_ref: torch.Tensor, logp: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(P,) KL(p_ref ‖ p) = Σ_v p_ref (log p_ref − log p) over the whole vocabulary, per position."""
    out = []
    for i in range(0, len(logp), chunk):
        lr, lq = logp_ref[i:i + chunk].float(), logp[i:i + chunk]
        out.append((lr.exp() * (lr - lq)).sum(-1))
    return torch.cat(out)


def heldout_check(vlm: VLM, held: HeldOut, ref: dict | None = None, generate: bool = False) -> dict:
    """Accuracy (overall, per kind), text perplexity and, against the FP reference, agreement and
    KL(p_FP ‖ p) over the full vocabulary: kl_qa at the answer positions, kl_text at the text positions, and
    kl, their mean (the two kinds of position weigh alike; text positions outnumber answers 10 to 1)."""
    result = qa_check(vlm, held.questions, generate=generate, ref_scores=None if ref is None else ref["scores"])
    if "kl" in result:
        result["kl_choices"] = result.pop("kl")            # over the candidate answers only
    kls = []
    for part, samples in (("qa", held.questions), ("text", held.texts)):
        if not samples:
            continue
        logp, target = label_logprobs(vlm, samples)
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        if part == "text":
            result.update(ppl=math.exp(float(nll.mean())), text_tokens=len(nll))
        if ref is not None:
            kls.append(float(full_kl(ref[part][0], logp).mean()))
            result[f"kl_{part}"] = kls[-1]
            if part == "text":
                result["ppl_fp"] = math.exp(float(-ref[part][0].float().gather(1, target[:, None]).mean()))
    if kls:
        result["kl"] = sum(kls) / len(kls)
    if "ppl" in result and ref is not None:
        result["ppl_q"] = result["ppl"]
    return result


# --- training the toy

def row_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss averaged per row, then over rows: a long caption weighs no more than a one-word answer."""
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")   # (B, T-1)
    mask = labels[:, 1:] != -100
    return ((nll * mask).sum(1) / mask.sum(1)).mean()


def train_toy(out: Path = TOY_DIR, steps: int = 2000, batch_size: int = 32, lr: float = 5e-4, seed: int = 0,
              device: str = "cpu") -> dict:
    """Train the tiny Qwen2-VL on the task from scratch and save it (bf16) in the hub layout."""
    from transformers import Qwen2VLForConditionalGeneration
    torch.set_num_threads(2)   # the budget: ≤ 15 min on 2 CPU cores
    torch.manual_seed(seed)
    tokenizer = build_toy_tokenizer()
    model = Qwen2VLForConditionalGeneration(toy_config(tokenizer)).to(device)
    vlm = VLM(model, "toy", tokenizer, build_toy_image_processor(), torch.device(device), torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(   # linear warmup, then cosine down to 5 %
        opt, lambda t: min(1.0, (t + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / steps))))
    rng = task_rng("train", seed)
    calib = make_task("calib", 64, seed)
    start, running = time.time(), None
    for step in range(steps):
        # Half the rows caption their image: one caption supervises every object, which gets
        # the vision tower off the ground far sooner than one-word answers alone.
        rows = [make_sample(rng) for _ in range(batch_size)]
        batch = vlm.batch([describe(*r) if i % 2 else r[0] for i, r in enumerate(rows)])
        labels = batch.pop("labels")
        model.train()
        loss = row_mean_loss(model(**batch).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            line = f"step {step:5d}  loss {running:.4f}  {time.time() - start:6.0f} s"
            if step % 500 == 0 or step == steps - 1:
                model.eval()
                line += f"  calib accuracy {qa_check(vlm, calib, batch_size=64)['accuracy']:.3f}"
            print(line, flush=True)
    save_toy(vlm, out)
    return {"seconds": round(time.time() - start, 1)}


def save_toy(vlm: VLM, out: Path) -> None:
    """Write the checkpoint to a temporary folder, then swap it in, so a crash never leaves half a toy/."""
    out = Path(out)
    tmp, old = out.with_name(out.name + ".tmp"), out.with_name(out.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.model.to(torch.bfloat16).eval()   # bf16 weights keep the folder under 20 MB
    vlm.model.generation_config.eos_token_id = vlm.tokenizer.eos_token_id
    vlm.model.generation_config.pad_token_id = vlm.tokenizer.pad_token_id
    vlm.model.save_pretrained(tmp)
    vlm.tokenizer.save_pretrained(tmp)
    vlm.image_processor.save_pretrained(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# --- CLI

def print_table(result: dict) -> None:
    print(f"{'kind':<10} {'accuracy':>8}")
    for kind, acc in result["per_kind"].items():
        print(f"{kind:<10} {acc:8.3f}")
    print(f"{'all':<10} {result['accuracy']:8.3f}   ({result['n']} questions, {result['model']}, {result['scorer']})")
    for key in ("generate_accuracy", "parse_failure", "accuracy_fp", "accuracy_q", "agreement", "ppl", "ppl_fp",
                "kl", "kl_qa", "kl_text", "kl_choices"):
        if key in result:
            print(f"{key:<18} {result[key]:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="toy, testbed, qwen2-vl-2b, qwen2-vl-7b, a Hub id or a local folder")
    p.add_argument("--ref", help="full-precision model to compare --model against")
    p.add_argument("--n", type=int, help="held-out questions (480 on the testbed, else 200)")
    p.add_argument("--jsonl", help="your own questions instead of the held-out set")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also score greedy generation by exact match")
    p.add_argument("--train-toy", action="store_true", help="train toy/ from scratch (the earlier recipe)")
    p.add_argument("--train-testbed", action="store_true", help="train testbed/ from scratch (≈ 35 min on one CPU core)")
    p.add_argument("--out", help="where --train-testbed writes (default: testbed/)")
    p.add_argument("--steps", type=int, help="training steps (toy 2000, testbed 3400)")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    args = p.parse_args(argv)
    if error := transformers_error():
        print(f"error: {error}", file=sys.stderr)
        return 2
    from transformers.utils import logging
    logging.set_verbosity_error()   # hides the "torchvision missing, using the PIL backend" notice
    logging.disable_progress_bar()
    device = "cpu" if args.device == "auto" else args.device
    try:
        if args.train_toy:
            info = train_toy(TOY_DIR, args.steps or 2000, seed=args.seed, device=device)
            print(f"trained in {info['seconds']} s")
        if args.train_testbed:
            out = Path(args.out or TESTBED_DIR)
            info = train_testbed(out, args.steps or 3400, seed=args.seed, device=device)
            print(f"trained in {info['seconds']} s")
            args.model = str(out) if args.out else "testbed"
        vlm = load_model(args.model, args.device, args.dtype)
        ref = load_model(args.ref, args.device, args.dtype) if args.ref else None
        testbed = any(m and is_testbed(m) for m in (args.model, args.ref))
        n = args.n or (480 if testbed else 200)
        held = HeldOut(load_jsonl(args.jsonl), []) if args.jsonl else \
            heldout_set("testbed" if testbed else args.model, vlm.tokenizer, n)
    except (ModelNotFound, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = heldout_check(vlm, held, heldout_reference(ref, held) if ref else None, args.generate)
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
