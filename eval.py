"""The synthetic image-QA task, model loading and the QA check for MGVQ.

    python eval.py --model toy                 # accuracy of the toy model on 200 eval questions
    python eval.py --model q --ref toy         # a quantized model against its full-precision one
    python eval.py --train-toy                 # rebuild toy/ (a tiny Qwen2-VL trained on the task)

Scorer: multiple choice by summed answer log-likelihood (plus exact match of greedy generation).
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from kernels import VQLinear

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


def load_jsonl(path) -> list[Sample]:
    """Samples from lines {"image", "question", "choices", "answer"[, "kind"]}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"the jsonl file {path} does not exist")
    samples = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"image", "question", "choices", "answer"} <= row.keys():
            raise DataError(f"{path} line {i} needs the keys image, question, choices and answer")
        choices = row["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{path} line {i}: choices must be a non-empty list of strings")
        if row["answer"] not in choices:
            raise DataError(f"{path} line {i}: the answer {row['answer']!r} is not one of the choices")
        image_path = path.parent / row["image"]   # an absolute image path stays absolute
        try:
            with Image.open(image_path) as im:
                image = im.convert("RGB")
        except OSError:
            raise DataError(f"{path} line {i}: the image {image_path} is missing or unreadable") from None
        samples.append(Sample(image, str(row["question"]), row["answer"], str(row.get("kind", "jsonl")),
                              choices))
    if not samples:
        raise DataError(f"the jsonl file {path} holds no samples")
    return samples


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


def toy_config(tokenizer):
    """Tiny Qwen2-VL: decoder linear input widths 512 / 1024, multiples of 256 as the quantizer needs."""
    from transformers import Qwen2VLConfig
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    # vision hidden_size is the merger's output width and must equal the text hidden size
    vision = dict(depth=2, embed_dim=128, hidden_size=512, num_heads=4, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                         image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                         vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


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

    def prompt_ids(self, sample: Sample, grid_thw: torch.Tensor) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.question}]}]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        merge = self.model.config.vision_config.spatial_merge_size
        n_image = int(grid_thw.prod()) // merge ** 2   # t·h·w / merge² tokens for this image
        pad = "<|image_pad|>"
        assert text.count(pad) == 1, "the chat template must place exactly one image"
        text = text.replace(pad, pad * n_image)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch(self, samples: list[Sample], with_answer: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded model inputs; "labels" marks the answer tokens and the closing <|im_end|>."""
        vision = self.image_processor(images=[s.image for s in samples], return_tensors="pt")
        rows, answer_lens = [], []
        for sample, grid_thw in zip(samples, vision["image_grid_thw"]):
            ids = self.prompt_ids(sample, grid_thw)
            answer = self.tokenizer(sample.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
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
        out = dict(input_ids=input_ids, attention_mask=attention_mask,
                   pixel_values=vision["pixel_values"].to(self.dtype), image_grid_thw=vision["image_grid_thw"],
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
    if name == "toy":
        if not (TOY_DIR / "config.json").is_file():
            raise ModelNotFound(f"the toy checkpoint {TOY_DIR} is missing; build it with python eval.py --train-toy")
        return TOY_DIR
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
    for key in ("generate_accuracy", "parse_failure", "accuracy_fp", "accuracy_q", "agreement", "kl"):
        if key in result:
            print(f"{key:<18} {result[key]:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy", help="toy, qwen2-vl-2b, qwen2-vl-7b, a Hub id or a local folder")
    p.add_argument("--ref", help="full-precision model to compare --model against")
    p.add_argument("--n", type=int, default=200, help="questions from the synthetic eval split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="eval", choices=["train", "calib", "eval"])
    p.add_argument("--jsonl", help="your own questions instead of the synthetic task")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also score greedy generation by exact match")
    p.add_argument("--train-toy", action="store_true", help="train toy/ from scratch")
    p.add_argument("--steps", type=int, default=2000, help="training steps for --train-toy")
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    args = p.parse_args(argv)
    from transformers.utils import logging
    logging.set_verbosity_error()   # hides the "torchvision missing, using the PIL backend" notice
    try:
        if args.train_toy:
            device = "cpu" if args.device == "auto" else args.device
            info = train_toy(TOY_DIR, args.steps, args.train_batch, args.lr, args.seed, device)
            print(f"trained in {info['seconds']} s")
        samples = load_jsonl(args.jsonl) if args.jsonl else make_task(args.split, args.n, args.seed)
        vlm = load_model(args.model, args.device, args.dtype)
        ref = load_model(args.ref, args.device, args.dtype) if args.ref else None
    except (ModelNotFound, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = qa_check(vlm, samples, ref=ref, generate=args.generate, batch_size=args.batch_size)
    print_table(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
