"""Tests of MGVQ: each a known answer or a brute force, on small tensors or on the toy model.

Sections: the QA task and loading (eval.py) - the quantized layer (kernels.py) - the quantizer's math
(mgvq.py, on tensors) - the quantizer on the toy model, end to end.
"""
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import eval as E  # noqa: E402
import kernels  # noqa: E402
import mgvq  # noqa: E402
from kernels import VQLinear, pack_codes, unpack_codes  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))
if _error := kernels.transformers_error():  # the tests would fail one by one on it
    pytest.exit(_error, returncode=2)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def toy():
    return E.load_model("toy", device="cpu")


# --- the task

def test_task_is_deterministic():
    a, b = E.make_task("eval", 20, seed=3), E.make_task("eval", 20, seed=3)
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.question, s.answer, s.kind, s.choices) for s in a] == [(s.question, s.answer, s.kind, s.choices) for s in b]


def test_splits_and_seeds_differ():
    images = {split: [s.image.tobytes() for s in E.make_task(split, 20)] for split in ("train", "calib", "eval")}
    assert images["train"] != images["calib"] != images["eval"] != images["train"]
    assert not set(images["calib"]) & set(images["eval"])
    assert [s.image.tobytes() for s in E.make_task("eval", 20, seed=1)] != images["eval"]


def test_answers_match_the_drawn_scene():
    rng = random.Random(0)
    for _ in range(300):
        sample, shapes = E.make_sample(rng)
        assert sample.answer in sample.choices
        for s in shapes:   # the centre pixel has the shape's colour
            assert sample.image.getpixel((s.cx, s.cy)) == E.COLORS[s.color]
        if sample.kind == "count":
            assert sample.answer == str(len(shapes))
        if sample.kind == "color":
            named = [s for s in shapes if f" {s.shape}?" in sample.question]
            assert len(named) == 1 and named[0].color == sample.answer
        if sample.kind == "shape":
            named = [s for s in shapes if f" {s.color} " in sample.question]
            assert len(named) == 1 and named[0].shape == sample.answer
        if sample.kind == "exists":
            present = any(f" {s.color} {s.shape}?" in sample.question for s in shapes)
            assert sample.answer == ("yes" if present else "no")


def test_every_kind_appears():
    assert {s.kind for s in E.make_task("eval", 200)} == set(E.KINDS)


# --- the jsonl loader

def write_jsonl(folder: Path, rows: list) -> Path:
    E.make_task("eval", 1)[0].image.save(folder / "a.png")
    path = folder / "E.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"image": "a.png", "question": "How many shapes are there?", "choices": ["1", "2"], "answer": "2"}


def test_load_jsonl_good(tmp_path):
    samples = E.load_jsonl(write_jsonl(tmp_path, [GOOD, {**GOOD, "kind": "count"}]))
    assert len(samples) == 2 and samples[0].kind == "jsonl" and samples[1].kind == "count"
    assert samples[0].image.size == (112, 112) and samples[0].answer == "2"


@pytest.mark.parametrize("rows, words", [
    ([], "no samples"),
    (["{not json"], "line 1 is not valid JSON"),
    ([GOOD, {**GOOD, "answer": "3"}], "line 2: the answer"),
    ([{**GOOD, "image": "missing.png"}], "missing or unreadable"),
    ([{"image": "a.png"}], "needs the keys"),
])
def test_load_jsonl_bad(tmp_path, rows, words):
    with pytest.raises(ValueError, match=words) as info:
        E.load_jsonl(write_jsonl(tmp_path, rows))
    assert "\n" not in str(info.value)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        E.load_jsonl(tmp_path / "nope.jsonl")


# --- loading

def test_toy_config_fits_the_quantizer(toy):
    text, vision = toy.model.config.text_config, toy.model.config.vision_config
    assert text.hidden_size == 512 and text.intermediate_size == 1024 and vision.hidden_size == 512
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // text.num_attention_heads // 2
    for layer in toy.model.model.language_model.layers:
        for linear in (*[getattr(layer.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")],
                       *[getattr(layer.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")]):
            assert linear.in_features % 256 == 0


def test_toy_checkpoint_is_small():
    size = sum(f.stat().st_size for f in E.TOY_DIR.iterdir())
    assert size <= 20 * 2 ** 20


def test_toy_save_reload_same_logits(toy, tmp_path):
    batch = toy.batch(E.make_task("eval", 4))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = toy.model(**inputs).logits
    toy.model.save_pretrained(tmp_path)
    toy.tokenizer.save_pretrained(tmp_path)
    toy.image_processor.save_pretrained(tmp_path)
    again = E.load_model(str(tmp_path), device="cpu")
    with torch.no_grad():
        after = again.model(**inputs).logits
    assert torch.equal(before, after)


def test_unknown_models_raise_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, words in [("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct"), (str(tmp_path / "nope"), "does not exist")]:
        with pytest.raises(E.ModelNotFound, match=words) as info:
            E.load_model(name)
        assert "\n" not in str(info.value)


def test_cli_missing_model_exits_cleanly():
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--model", "qwen2-vl-2b", "--n", "2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0



def test_every_flag_has_its_config_comment_as_help(capsys):
    comments = mgvq.field_comments()
    assert set(comments) == {f.name for f in mgvq.fields(mgvq.Config)}
    assert comments["bits"] == "average index bits per weight"
    assert comments["grad"].endswith("under H_I); both weigh the rows by diag(H_O)")   # continuation lines joined
    with pytest.raises(SystemExit):
        mgvq.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "average index bits per weight (default: 2)" in text and "(default: set by --method)" in text

# --- batching

def test_batch_image_tokens_and_labels(toy):
    samples = E.make_task("eval", 5)
    batch = toy.batch(samples)
    merge = toy.model.config.vision_config.spatial_merge_size
    n_image = int((batch["input_ids"] == toy.model.config.image_token_id).sum())
    assert n_image == int(batch["image_grid_thw"].prod(1).sum()) // merge ** 2 == 5 * 16
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == toy.model.config.image_token_id)
    for b, sample in enumerate(samples):
        answer = toy.tokenizer(sample.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        marked = batch["labels"][b] != -100
        assert marked.sum() == len(answer) and marked[-len(answer):].all()   # left padding: answer at the end
        assert batch["labels"][b][marked].tolist() == answer
        assert batch["attention_mask"][b].sum() == (batch["input_ids"][b] != toy.tokenizer.pad_token_id).sum()
    prompt_only = toy.batch(samples, with_answer=False)
    assert "labels" not in prompt_only and prompt_only["input_ids"].shape[1] < batch["input_ids"].shape[1]


def test_choice_logprobs_shape_and_padding(toy):
    samples = [s for s in E.make_task("eval", 30) if s.kind in ("count", "exists")][:4]
    scores = E.choice_logprobs(toy, samples, batch_size=8)
    assert scores.shape == (4, 4)
    for s, row in zip(samples, scores):
        assert row[:len(s.choices)].isfinite().all() and (row[len(s.choices):] == -float("inf")).all()


# --- the QA check

def test_toy_accuracy_on_eval_split(toy):
    result = E.qa_check(toy, E.make_task("eval", 200), generate=True, batch_size=32)
    assert result["accuracy"] >= 0.95, result
    assert set(result["per_kind"]) == set(E.KINDS)
    assert result["parse_failure"] <= 0.05


def test_ref_against_itself_agrees(toy):
    result = E.qa_check(toy, E.make_task("eval", 8), ref=toy)
    assert result["agreement"] == 1.0 and abs(result["kl"]) < 1e-6
    assert result["accuracy_fp"] == result["accuracy_q"] == result["accuracy"]


# --- the testbed (eval.py): its task, its text, its held-out scoring

@pytest.fixture(scope="module")
def testbed():
    """A model of the testbed's shape (random weights) with its BPE tokenizer: the scoring needs no trained weights."""
    from transformers import Qwen2VLForConditionalGeneration
    tokenizer = E.build_bpe_tokenizer()
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(E.testbed_config(tokenizer)).eval()
    return E.VLM(model, "testbed", tokenizer, E.build_toy_image_processor(E.TB_IMAGE), torch.device("cpu"), torch.float32)


def answer_from_scene(question: str, objs) -> str:
    """The answer to a testbed question, worked out again from the objects with plain string matching."""
    words = question.rstrip("?").split()
    find = lambda c, s: [o for o in objs if o.color == c and o.shape == s]
    if question == "How many shapes are there?":
        return str(len(objs))
    if question.startswith("How many") and words[2] in E.TB_COLORS:
        return str(sum(o.color == words[2] for o in objs))
    if question.startswith("How many"):
        return str(sum(o.shape + "s" == words[2] for o in objs))
    if question.startswith("What color"):
        (o,) = [o for o in objs if o.size == words[4] and o.shape == words[5]]
        return o.color
    if question.startswith("What shape"):
        (o,) = [o for o in objs if o.size == words[4] and o.color == words[5]]
        return o.shape
    if question.endswith("small or large?"):
        (o,) = find(words[2], words[3])
        return o.size
    if question.startswith("Where"):
        (o,) = find(words[3], words[4])
        return ("top" if o.row < 2 else "bottom") + " " + ("left" if o.col < 2 else "right")
    if " left of " in question:
        (a,), (b,) = find(words[2], words[3]), find(words[7], words[8])
        assert a.col != b.col
        return "yes" if a.col < b.col else "no"
    assert question.startswith("Is there a")
    return "yes" if find(words[3], words[4]) else "no"


def test_testbed_answers_match_the_scene():
    rng = random.Random(0)
    kinds = set()
    for _ in range(2000):
        objs = E.tb_scene(rng)
        assert 1 <= len(objs) <= 8 and len({(o.row, o.col) for o in objs}) == len(objs)
        question, answer, kind, choices, referents = E.tb_ask(rng, objs)
        assert answer in choices and answer == answer_from_scene(question, objs), question
        assert all(o in objs for o in referents), question
        if kind in ("color", "shape", "size", "where"):                  # one object, named by two attributes
            (o,) = referents
            words = question.rstrip("?").split()                          # "small or large" names both sizes
            assert sum(w in words for w in (o.color, o.shape, o.size)) == (3 if kind == "size" else 2), question
        elif kind == "relation":
            assert len(referents) == 2 and (referents[0].col < referents[1].col) == (answer == "yes")
        elif kind == "exists":
            assert bool(referents) == (answer == "yes"), question
        else:                                                             # counts: every object counted
            assert len(referents) == int(answer), question
        kinds.add(kind)
    assert kinds == set(E.TB_KINDS)


def test_the_background_shows_each_cell_apart():
    image = E.tb_draw([], random.Random(0))                         # no objects: the background alone
    cell = E.TB_IMAGE // E.TB_GRID
    corners = {image.getpixel((c * cell + 1, r * cell + 1)) for r in range(E.TB_GRID) for c in range(E.TB_GRID)}
    assert len(corners) == E.TB_GRID ** 2 and image.getpixel((cell + 1, 2 * cell + 1)) == E.cell_tint(2, 1)
    assert all(min(px) >= 220 for px in corners)                    # faint: no object colour is that light


def test_referent_cells_mark_raster_positions():
    objs = [E.Obj("circle", "red", "small", 0, 3), E.Obj("square", "blue", "large", 2, 1)]
    assert E.referent_cells(objs).nonzero().flatten().tolist() == [3, 9]   # row * 4 + col
    assert E.cell_targets(objs)[3] == 1 + (0 * 4 + 0) * 2 + 0 and E.cell_targets(objs)[9] == 1 + (2 * 4 + 1) * 2 + 1


def test_testbed_task_is_deterministic_and_splits_differ():
    a, b = E.testbed_task("eval", 10), E.testbed_task("eval", 10)
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.question, s.answer) for s in a] == [(s.question, s.answer) for s in b]
    calib = {s.image.tobytes() for s in E.testbed_task("calib", 50)}
    assert not calib & {s.image.tobytes() for s in E.testbed_task("eval", 50)}


def test_text_splits_are_disjoint_and_stable():
    docs = E.stdlib_documents()
    split = {name: E.text_split(name) for name in docs}
    for part, lo, hi in (("eval", 0.05, 0.2), ("calib", 0.02, 0.1)):
        assert lo < sum(v == part for v in split.values()) / len(docs) < hi
    assert split == {name: E.text_split(name) for name in E.stdlib_documents.__wrapped__()}   # a second read, uncached
    eval_text, calib_text = E.text_corpus("eval"), E.text_corpus("calib")
    some = [docs[n] for n in docs if split[n] == "train"][:50]
    assert all(d not in eval_text and d not in calib_text for d in some if len(d) > 200)


def test_testbed_shape_is_small_and_fits_the_quantizer(testbed):
    n = sum(p.numel() for p in testbed.model.parameters())
    assert 2 * n <= 25e6, f"the testbed is {2 * n / 1e6:.1f} MB in bf16"
    assert len(testbed.model.model.language_model.layers) == 6
    for block in testbed.model.model.language_model.layers:
        for lin in E.linears(block).values():
            assert lin.in_features % 256 == 0
    assert len(testbed.tokenizer) == 4096 and testbed.model.config.tie_word_embeddings


def test_text_only_samples_batch_without_images(testbed):
    texts = E.text_samples(testbed.tokenizer, "eval", 2)
    scene = E.testbed_task("eval", 1)
    batch = testbed.batch(texts)
    assert "pixel_values" not in batch and "mm_token_type_ids" not in batch
    valid = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"] != -100, valid)                   # every token of a text is a loss position
    mixed = testbed.batch(texts + scene)
    assert mixed["image_grid_thw"].shape == (1, 3) and int(mixed["mm_token_type_ids"][:2].sum()) == 0
    assert int(mixed["mm_token_type_ids"][2].sum()) == 16


def test_testbed_calibration_mixes_scenes_and_text():
    samples = E.testbed_calib(64, seed=1)
    assert len(samples) == 64 and sum(s.image is None for s in samples) == 16
    for i in range(0, 64, 4):                                           # one text in every batch of 4
        assert sum(s.image is None for s in samples[i:i + 4]) == 1
    calib_text = E.text_corpus("calib")
    assert all(s.answer in calib_text for s in samples if s.image is None)
    assert [s.answer for s in samples] != [s.answer for s in E.testbed_calib(64, seed=2)]
    assert mgvq.load_calib(mgvq.resolve(mgvq.Config(model="testbed", seed=1)))[3].answer == samples[3].answer


def test_full_kl_known_answer_and_direction():
    p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)        # KL(p ‖ q) = 0.5108
    assert E.full_kl(p, q).item() == pytest.approx(expected, rel=1e-5)
    assert E.full_kl(q, p).item() == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), rel=1e-5)


def test_heldout_check_against_itself_and_a_perturbed_copy(testbed):
    held = E.HeldOut(E.testbed_task("eval", 8), E.text_samples(testbed.tokenizer, "eval", 2))
    ref = E.heldout_reference(testbed, held)
    same = E.heldout_check(testbed, held, ref)
    assert same["agreement"] == 1.0 and abs(same["kl"]) < 1e-4 and same["ppl_q"] == pytest.approx(same["ppl_fp"], rel=1e-3)
    # perplexity by hand: exp of the mean next-token loss over the text chunks
    batch = testbed.batch(held.texts)
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = testbed.model(**batch).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert same["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    lin = testbed.model.model.language_model.layers[0].mlp.down_proj
    W = lin.weight.data.clone()
    lin.weight.data += 0.5 * W.std() * torch.randn_like(W)
    try:
        worse = E.heldout_check(testbed, held, ref)
    finally:
        lin.weight.data = W
    assert worse["kl"] > 100 * max(abs(same["kl"]), 1e-7) and worse["ppl_fp"] == same["ppl_fp"] != worse["ppl_q"]
    assert worse["kl"] == pytest.approx((worse["kl_text"] + worse["kl_qa"]) / 2) and min(worse["kl_text"], worse["kl_qa"]) > 0


def test_testbed_run_reports_heldout_figures(testbed):
    import copy
    import dataclasses
    vlm = dataclasses.replace(testbed, model=copy.deepcopy(testbed.model))    # run() quantizes in place
    r = mgvq.run(mgvq.Config(model="testbed", method="rtn", nsamples=8, eval_n=16), log=lambda *a: None, vlm=vlm)
    for key in ("accuracy_fp", "accuracy_q", "ppl_fp", "ppl_q", "kl", "kl_qa", "kl_text"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert r["kl"] > 0 and r["bits_per_weight"] < 2.5 and r["config"]["eval_n"] == 16


def test_fast_training_forward_equals_the_plain_forward(testbed):
    # the trainer's speed-ups (eager attention, the patch Conv3d as a Linear, the LM head at labelled positions
    # only) must leave the model's function alone, and be undone afterwards
    batch = testbed.batch(E.testbed_task("eval", 3) + E.text_samples(testbed.tokenizer, "eval", 1))
    labels = batch.pop("labels")
    model, real = testbed.model, batch["attention_mask"].bool()        # padded positions may differ: masked out
    with torch.no_grad():
        ref = model(**batch).logits
        with E.fast_training(model):
            assert model.config._attn_implementation == model.config.vision_config._attn_implementation == "eager"
            got = model(**batch).logits
            loss = E.answer_loss(model, model.model(**batch).last_hidden_state, labels)
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
    assert loss.item() == pytest.approx(E.row_mean_loss(ref, labels).item(), rel=1e-5)
    assert model.config._attn_implementation == "sdpa" and "forward" not in vars(model.model.visual.patch_embed)


def test_a_testbed_folder_is_known_by_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "mgvq_testbed": True}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert E.is_testbed("testbed") and E.is_testbed(str(tmp_path))
    assert not E.is_testbed(str(tmp_path / "other")) and not E.is_testbed("toy") and not E.is_testbed("qwen2-vl-2b")


def test_missing_testbed_names_its_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(E, "TESTBED_DIR", tmp_path / "testbed")
    with pytest.raises(E.ModelNotFound, match="--train-testbed"):
        E.load_model("testbed", device="cpu")



# --- the quantized layer (kernels.py)

def random_vq(m, n, d, group_size, group_bits, tile_rows, per_coordinate=(), bias=True, dtype=torch.float32,
              seed=0):
    """A VQLinear with random indices, int8 codebooks and scales, built the way the quantizer builds it; the
    bit-widths in per_coordinate get a scalar codebook per coordinate."""
    gen = torch.Generator().manual_seed(seed)
    V = group_size // d
    idx = torch.cat([torch.randint(0, 2 ** (b * d), (m, V), generator=gen) for b in group_bits], 1)  # (m, n/d)
    cbs = [torch.randint(-128, 128, (m // tile_rows[b], 2 ** (b if b in per_coordinate else b * d), d),
                         generator=gen, dtype=torch.int8) for b in group_bits]
    scales = [torch.rand(m // tile_rows[b], generator=gen) / 64 + 1e-3 for b in group_bits]
    bias_t = torch.randn(m, generator=gen) if bias else None
    return VQLinear.from_parts(idx, group_bits, cbs, scales, d, group_size, tile_rows, bias_t, dtype)


# --- bit packing

@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
def test_pack_unpack_round_trip(bits):
    N = 8 * 3 + 8 // (bits & -bits) * 3 if bits % 8 else 7  # odd-ish counts with N·bits a multiple of 8
    N = next(k for k in range(N, N + 9) if (k * bits) % 8 == 0)
    idx = torch.randint(0, 2**bits, (5, N))
    packed = pack_codes(idx, bits)
    assert packed.shape == (5, N * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack_codes(packed, bits, N), idx)


def test_pack_layout_is_lsb_first():
    # indices 1, 2, 3 of 2 bits then 0: bits 10 01 11 00 (LSB first) -> byte 0b00_11_10_01 = 0x39
    assert pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0x39]]
    with pytest.raises(AssertionError):
        pack_codes(torch.tensor([[4, 0, 0, 0]]), 2)


# --- the reference

def test_dequantize_known_answer():
    # m = 2 rows, n = 8 columns, d = 2, one group of 8 columns at 1 bit: K = 4 codewords per row (tile_rows 1)
    idx = torch.tensor([[0, 1, 2, 3], [3, 3, 0, 1]])                       # (m, n/d)
    cb0 = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]], dtype=torch.int8)  # row 0's codebook
    cb1 = -cb0                                                              # row 1's
    layer = VQLinear.from_parts(idx, [1], [torch.stack([cb0, cb1])], [torch.tensor([0.5, 2.0])], d=2,
                                group_size=8, tile_rows={1: 1}, bias=None)
    W = torch.tensor([[0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0],
                      [-14., -16., -14., -16., -2., -4., -6., -8.]])
    assert torch.equal(layer.dequantize(), W)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer.reference_forward(x), x @ W.t())


def test_dequantize_per_coordinate_known_answer():
    # one row, 4 columns, d = 2, 2 bits: index k holds coordinate 0's value in bits 0-1, coordinate 1's in bits 2-3
    idx = torch.tensor([[0b0110, 0b1100]])                                  # (1, 2): values (2, 1) and (0, 3)
    cb = torch.tensor([[[10, -1], [20, -2], [30, -3], [40, -4]]], dtype=torch.int8)  # (K = 4, d): [value, coordinate]
    layer = VQLinear.from_parts(idx, [2], [cb], [torch.tensor([0.5])], d=2, group_size=4, tile_rows={2: 1})
    assert layer.per_coordinate == [2] and layer.codebook_2.shape == (1, 1, 4, 2)
    assert torch.equal(layer.dequantize(), torch.tensor([[15.0, -1.0, 5.0, -2.0]]))   # 0.5 · (30, -2, 10, -4)
    assert layer.storage_bits()["codebook"] == 4 * 2 * 8                              # 8 int8, not 16 x 2


def test_a_layout_saved_before_per_coordinate_codebooks_loads():
    layer = random_vq(16, 256, 2, 128, [3, 2], {2: 16, 3: 16}, bias=False)
    layout = json.loads(json.dumps(layer.layout()))
    assert layout.pop("per_coordinate") == []                               # the field older folders lack
    empty = VQLinear(**layout)
    empty.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(empty.dequantize(), layer.dequantize())


def test_from_parts_places_mixed_groups():
    m, n, d, gs, bits, tr = 8, 512, 2, 128, [2, 1, 3, 2], {1: 4, 2: 8, 3: 8}
    layer = random_vq(m, n, d, gs, bits, tr, bias=False)
    W = layer.dequantize()
    for g, b in enumerate(bits):  # group g's columns come from its bit-width's buffers, slot = rank among equals
        slot = [h for h, c in enumerate(bits) if c == b].index(g)
        idx = unpack_codes(getattr(layer, f"codes_{b}"), b * d, bits.count(b) * gs // d).reshape(m, -1, gs // d)
        cb = getattr(layer, f"codebook_{b}").float() * getattr(layer, f"scale_{b}").float()[..., None, None]
        for i in range(m):
            expect = cb[i // tr[b], slot][idx[i, slot]].reshape(gs)
            assert torch.equal(W[i, g * gs:(g + 1) * gs], expect)


def test_layout_state_dict_round_trip():
    layer = random_vq(16, 256, 2, 128, [3, 2], {2: 16, 3: 16}, [3], bias=True, dtype=torch.bfloat16)
    layout = json.loads(json.dumps(layer.layout()))                         # str keys, dtype as a string
    empty = VQLinear(**layout)
    empty.load_state_dict(layer.state_dict(), strict=True)
    assert torch.equal(empty.dequantize(), layer.dequantize()) and empty.dequantize().dtype == torch.bfloat16
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    torch.testing.assert_close(empty(x), layer(x))


def test_storage_bits_hand_computed():
    layer = random_vq(32, 256, 2, 128, [2, 3], {2: 16, 3: 32})
    s = layer.storage_bits()
    # index: 32 rows × 128 columns × (2 + 3) bits; codebook: 2 tiles × 16 × 2 + 1 × 64 × 2 int8; scale: 3 fp16
    assert s == dict(index=32 * 128 * 5, codebook=(2 * 16 * 2 + 64 * 2) * 8, scale=3 * 16, weights=32 * 256)
    assert abs((s["index"] + s["codebook"] + s["scale"]) / s["weights"] - 2.693359375) < 1e-9


# --- the fast path

@pytest.fixture(autouse=True)
def no_silent_fallback():
    # a kernel error must fail its test, not pass through the reference path that fallback takes
    yield
    failed = kernels._compiled.pop("failed", None)         # cleared, so that only the guilty test fails
    assert not failed, "the compiled fast path fell back to the reference"


LAYOUTS = [  # (m, n, d, group_size, group_bits, tile_rows[, per_coordinate]): mixed K, d in {1, 2, 4}, m not
    # always a multiple of 16. The first is the kind of layout --method mgvq emits (3-bit groups per coordinate).
    # (a tile-row count is a constant of the compiled kernels, so every new one recompiles every token count:
    # the uniform layout shares the mixed one's tile rows, and the odd row counts are m = 40 and m = 20)
    (48, 512, 2, 128, [3, 1, 3, 2], {1: 4, 2: 16, 3: 16}, [3]),
    (32, 512, 2, 128, [2, 2, 2, 2], {2: 16}),
    (40, 512, 1, 256, [2, 4], {2: 8, 4: 40}),
    (20, 256, 4, 128, [2, 1], {1: 4, 2: 20}),
]


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_select_tree_picks_every_index(B):
    # brute force: for each index i of B bits, the tree over B smeared bits returns values[i], lane by lane
    i = torch.arange(2**B, dtype=torch.int32)                               # one lane per index
    values = [torch.full((2**B,), 1000 * k - 7, dtype=torch.int32) for k in range(2**B)]
    masks = [(i << (31 - b)) >> 31 for b in range(B)]                       # bit b: all ones or zero
    assert set(masks[0].tolist()) <= {0, -1}
    assert torch.equal(kernels.select(masks, values), 1000 * i - 7)


@pytest.mark.parametrize("b,d", [(1, 1), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2), (1, 4)])
def test_byte_weights_decode_every_byte(b, d):
    # brute force: every value of an index word, one per lane (where a word holds at most 12 bits; else every
    # index of it at every value, the others random), decodes to the codewords of its p indices, with the
    # codebook as repack_part lays it out, whether a tree decodes one index per int32 word or several
    layer = random_vq(16, 128, d, 128, [b], {b: 16}, seed=10 * b + d)
    part = layer.fast_parts()[0]
    B, p, _ = part["code"]
    assert B == b * d <= kernels.SELECT_MAX_BITS
    assert kernels._nibbles(B, p) == (d == 1 and b > 2)                     # 3- and 4-bit scalars: 8 a word
    assert kernels._index_shifts(3, 8) == [0, 8, 16, 24, 4, 12, 20, 28]         # two nibbles a byte
    if p * B <= 12:
        idx = (torch.arange(2 ** (p * B))[:, None] >> (B * torch.arange(p))) & (2**B - 1)  # (lanes, p)
    else:
        idx = torch.randint(0, 2**B, (4096, p), generator=torch.Generator().manual_seed(b))
        idx[:2**B] = torch.arange(2**B)[:, None]                           # index j = k in lane k, every j
    word = (idx << torch.tensor(kernels._index_shifts(B, p))).sum(-1)      # index j from bit shifts[j]
    v = kernels.as_int32(word).reshape(1, 1, 1, -1)                       # (block, group, word, lane)
    got = torch.stack([w.reshape(-1) for w in kernels.byte_weights(v, part["P"][:1, :1], B, p, d)], -1)
    codebook = getattr(layer, f"codebook_{b}")[0, 0]                          # tile 0, group 0: (K, d) int8
    assert torch.equal(got, codebook[idx].reshape(-1, p * d).float())        # weight j·d + e: value e of index j


@pytest.mark.parametrize("d", [1, 2, 4])
def test_pack_fields_round_trip(d):
    v = torch.tensor([[-128, 127, -1, 0], [5, -6, 100, -100]], dtype=torch.int8)[:, :d]
    word = kernels.pack_fields(v, 32 // d)
    assert word.dtype == torch.int32
    got = torch.stack([kernels.unpack_field(word, j, 32 // d) for j in range(d)], -1)
    assert torch.equal(got, v.float())


def test_prefill_in_several_blocks(monkeypatch):
    layer = random_vq(96, 512, 2, 128, [2, 1, 3, 2], {1: 4, 2: 16, 3: 32})  # parts in blocks of 16, 16, 32 rows
    x = torch.randn(40, 512)
    parts = layer.fast_parts()
    assert [q["S"].shape[-1] for q in parts] == [16, 16, 32]                  # 1-bit tiles of 4 rows merged to 16
    deq, blocks = kernels._compiled_fn("dequantize", kernels.dequantize_parts), []
    monkeypatch.setitem(kernels._compiled, "dequantize", lambda Ss, *rest: blocks.append(Ss) or deq(Ss, *rest))
    # three blocks of 32 rows, each as four products over one column group (of one part) ...
    y = kernels.prefill_matmul(x, parts, layer.out_features, block_bytes=1, min_rows=1)
    assert [(len(Ss), Ss[0].shape[1], Ss[0].shape[0] * Ss[0].shape[-1]) for Ss in blocks] == [(1, 1, 32)] * 12
    blocks.clear()
    y2 = kernels.prefill_matmul(x, parts, layer.out_features)                # ... or one block, one product
    assert [(len(Ss), sum(S.shape[1] for S in Ss)) for Ss in blocks] == [(3, 4)]
    ref = layer.reference_forward(x) - layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y2, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"m{l[0]}n{l[1]}d{l[2]}b{''.join(map(str, l[4]))}")
# 1 and 3: decode calls of their own; 17: chunks of 8, 8 and 1; 300: prefill. Each decode token count compiles
# kernels of its own, so a count adds compile time to every layout: the set is the smallest that covers the paths.
@pytest.mark.parametrize("tokens", [1, 3, 17, 300])
def test_fast_path_equals_reference(layout, tokens):
    layer = random_vq(*layout)
    x = torch.randn(tokens, layout[1])
    torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUTS[::3], ids=lambda l: f"m{l[0]}n{l[1]}d{l[2]}b{''.join(map(str, l[4]))}")
def test_gather_path_equals_reference(layout, monkeypatch):
    # every bit-width through the gather (the path of codebooks past 16 codewords), not the select tree
    monkeypatch.setattr(kernels, "SELECT_MAX_BITS", 0)
    layer = random_vq(*layout)
    assert all(q["P"].dim() == 3 for q in layer.fast_parts())               # product codebooks: gather layout
    for tokens in (1, kernels.PREFILL_MIN_TOKENS):
        x = torch.randn(tokens, layout[1])
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 1), (3, 3), (4, 9), (1, 1, 3), ()])  # (4, 9): 36 tokens, prefill
def test_fast_path_odd_batch_shapes_and_bf16(shape):
    layer = random_vq(*LAYOUTS[0])
    x = torch.randn(*shape, 512)
    y = layer(x)
    assert y.shape == (*shape, 48)
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=1e-4, atol=1e-4)
    for dtype in (torch.bfloat16, torch.float16):  # in and out in dtype (its matmuls past the decode path)
        xb = x.to(dtype)
        yb, ref = layer(xb), layer.reference_forward(xb.float())
        assert yb.dtype == dtype
        assert (yb.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_int16_index_words():
    # d = 4 at 3 bits: 12-bit indices, one per int16 word, through the gather; beside a 1-bit part (select tree)
    layer = random_vq(16, 256, 4, 128, [3, 1], {3: 16, 1: 4})
    assert [q["S"].dtype for q in layer.fast_parts()] == [torch.uint8, torch.int16]
    for tokens in (1, kernels.PREFILL_MIN_TOKENS):
        x = torch.randn(tokens, 256)
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-4, atol=1e-4)


def test_new_buffers_replace_the_repacked_copy():
    a, b = random_vq(*LAYOUTS[1], seed=1), random_vq(*LAYOUTS[1], seed=2)
    x = torch.randn(1, 512)
    a(x)                                                                    # repacks a's buffers
    a.load_state_dict(b.state_dict())
    torch.testing.assert_close(a(x), b.reference_forward(x), rtol=1e-4, atol=1e-4)


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events()] + [0])


def test_decode_never_materialises_the_weight():
    m, n = 256, 1024
    layer = random_vq(m, n, 2, 128, [2] * 8, {2: 16}, bias=False)
    dense_bytes = m * n * 4
    P = kernels.PREFILL_MIN_TOKENS
    for T in (1, 3, kernels.DECODE_TOKENS, P):                              # warm-up (compiles)
        layer(torch.randn(T, n))
    assert _largest_allocation(lambda: layer(torch.randn(P, n))) >= dense_bytes // 4  # prefill forms W: the probe works
    largest = max(T for T in range(P) if T % kernels.DECODE_TOKENS in (0, 1, 3))  # the most tokens decoded ...
    for T in (1, 3, kernels.DECODE_TOKENS, largest):     # ... in chunks the warm-up compiled (P - 1 would add one)
        assert _largest_allocation(lambda: layer(torch.randn(T, n))) < dense_bytes // 8


def test_no_recompilation_after_warm_up(monkeypatch):
    tr = {1: 4, 2: 16, 3: 64}
    # 1 token and a full chunk (and two chunks and one more) decode, 32 prefill. Chunks of 2 instead of 8: what
    # is checked, that a new layer of a known family finds its kernels, does not depend on the chunk's length,
    # and a 2-token kernel compiles in a fraction of an 8-token one (test_fast_path_equals_reference runs 8)
    monkeypatch.setattr(kernels, "DECODE_TOKENS", 2)
    token_counts = [1, kernels.DECODE_TOKENS, 2 * kernels.DECODE_TOKENS + 1, kernels.PREFILL_MIN_TOKENS]
    # warm-up: each family once (a part with one group or one row tile is its own family: torch specialises 1)
    warm = [random_vq(64, 512, 2, 128, [1, 2, 3, 2], tr), random_vq(128, 768, 2, 128, [1, 3, 2, 2, 1, 3], tr)]
    later = [random_vq(64, 512, 2, 128, [3, 1, 2, 2], tr, seed=1),          # other layers, other sizes
             random_vq(192, 1024, 2, 128, [2, 2, 1, 3, 1, 3, 2, 2], tr, seed=2),
             random_vq(320, 1280, 2, 128, [2, 1, 2, 3, 3, 1, 2, 2, 2, 2], tr, seed=3)]
    for layer in warm:
        for T in token_counts:
            layer(torch.randn(T, layer.in_features))
    before = counters["stats"]["unique_graphs"]
    for layer in later:
        for T in token_counts:
            torch.testing.assert_close(layer(torch.randn(T, layer.in_features)).shape[-1], layer.out_features)
    assert counters["stats"]["unique_graphs"] == before, "a new layer of a known family recompiled"


def test_fallback_when_compile_is_unavailable(monkeypatch):
    layer = random_vq(*LAYOUTS[1])
    x = torch.randn(2, 512)

    def broken(name, fn):
        raise RuntimeError("no C++ compiler found\nmore lines")
    monkeypatch.setattr(kernels, "_compiled_fn", broken)
    monkeypatch.setattr(kernels, "_compiled", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y1, y2 = layer(x), layer(x)
    assert len(caught) == 1 and "torch.compile unavailable" in str(caught[0].message)
    torch.testing.assert_close(y1, layer.reference_forward(x))
    torch.testing.assert_close(y2, y1)


def test_bench_mgvq_variant_is_what_the_quantizer_emits(tmp_path):
    # the benchmark's `mgvq` layout: mgvq.py's tile rows and codebook kind for each of its bit-widths, at the
    # mix of a saved run (a made-up mgvq.json: 12 one-bit, 34 two-bit and 12 three-bit groups of 16 rows each)
    cfg = mgvq.resolve(mgvq.Config(method="mgvq", bits=2))
    layouts = {"a": dict(group_bits=[1, 2, 2, 3] * 3, out_features=16),
               "b": dict(group_bits=[2] * 28 + [1, 3] * 9, out_features=16)}
    (tmp_path / "mgvq.json").write_text(json.dumps(dict(layouts=layouts)))
    for v in (kernels.mgvq_variant(), kernels.mgvq_variant(tmp_path / "mgvq.json")):
        assert set(v["bits"]) <= set(mgvq.bit_choices(cfg)) and v["d"] == cfg.d
        for b in set(v["bits"]):
            for m in (1536, 8960):
                assert v["tile_rows"][b] == mgvq.tile_rows_for(m, b, cfg.d, cfg.group_size, cfg.codebook_overhead,
                                                              cfg.joint_bits)
        assert v["per_coordinate"] == [b for b in (1, 2, 3) if mgvq.per_coordinate(b, cfg.d, cfg.joint_bits)]
        assert min(v["tile_rows"].values()) >= kernels.LANES                # no per-lane codebook copies
    for b, t in kernels.SMALL_TILE_ROWS.items():                             # the older layout: gptvq's overhead
        assert t == mgvq.tile_rows_for(1536, b, cfg.d, cfg.group_size, 0.2, cfg.joint_bits)
    v = kernels.mgvq_variant(tmp_path / "mgvq.json")
    assert len(v["bits"]) == 16 and [v["bits"].count(b) for b in (1, 2, 3)] == [3, 10, 3]   # 16 × 12/58, 34/58
    assert v["bits"][:8].count(2) == 5                                      # spread out, not sorted


def test_to_bfloat16_keeps_fp16_scales():
    layer = random_vq(*LAYOUTS[0])
    scales = {b: getattr(layer, f"scale_{b}").clone() for b in layer.bits}
    layer.to(torch.bfloat16)
    assert all(torch.equal(getattr(layer, f"scale_{b}"), s) for b, s in scales.items())
    assert layer.bias.dtype == torch.bfloat16


# --- the quantizer's math, on tensors (mgvq.py)

def spd(n, seed=0, cond=1.0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return X.T @ X / (4 * n) + cond * 0.1 * torch.eye(n, dtype=torch.float64)


def fixed_grid(K):
    """fit() returning one fixed uniform codebook 0.5 * (q - K/2) for every tile (d = 1)."""
    def fit(X, D, K_):
        R = X.shape[0]
        q = (torch.arange(K_) - K_ // 2).to(torch.int8)
        return q[None, :, None].expand(R, K_, 1).clone(), torch.full((R,), 0.5, dtype=X.dtype)
    return fit


@pytest.mark.parametrize("d", [1, 2, 4])
def test_block_ldl_rebuilds_h(d):
    H = spd(16, seed=d)
    L, D = mgvq.block_ldl(H, d)
    nb = 16 // d
    Dfull = torch.block_diag(*D)
    assert torch.allclose(L @ Dfull @ L.T, H, atol=1e-10)
    assert torch.allclose(L.reshape(nb, d, nb, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1), torch.eye(d, dtype=H.dtype).expand(nb, d, d))
    assert torch.allclose(torch.triu(L, diagonal=d), torch.zeros_like(L))     # nothing above the diagonal blocks
    U, Du = mgvq.sweep_factors(H, d)
    assert torch.allclose(U @ torch.block_diag(*Du) @ U.T, H, atol=1e-10)
    assert torch.allclose(torch.tril(U, diagonal=-d), torch.zeros_like(U))    # block-upper


def gptq_reference(W, H, grid):
    """Textbook GPTQ (Frantar et al. 2022): Cholesky of H^-1 (upper), column by column, fixed grid."""
    W = W.clone()
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        w = W[:, j]
        q = grid[(w[:, None] - grid[None]).abs().argmin(1)]
        Q[:, j] = q
        err = (w - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None]
    return Q


def test_ldl_sweep_d1_reproduces_gptq():
    torch.manual_seed(0)
    n, m, K = 16, 6, 8
    H = spd(n, seed=3)
    W = torch.randn(m, n, dtype=torch.float64)
    U, D = mgvq.sweep_factors(H, 1)
    codes, Q, _, _ = mgvq.vq_sweep(W, U, D, [3, 3], 8, {3: 1}, fixed_grid(K), "ldl")
    grid = 0.5 * (torch.arange(K, dtype=torch.float64) - K // 2)
    assert torch.allclose(Q, gptq_reference(W, H, grid), atol=1e-9)


def gptq_paper(W, H, bits: int, group_size: int, blocksize: int = 128, fp16_scales: bool = False):
    """GPTQ as the paper (Frantar et al. 2022, Algorithm 1) and IST-DASLab's gptq.py run it, written afresh:
    Hinv = Cholesky(H^-1) upper; columns left to right in lazy blocks of `blocksize`; each column rounded to
    its row's asymmetric min-max grid (their Quantizer, per row), the grid of a group of `group_size` columns
    found from the current, error-updated weights when the sweep reaches its first column (groupsize with
    static_groups=False). fp16_scales rounds each scale to fp16, as VQLinear stores it (mgvq's one deliberate
    change to the grid). W (m, n), H (n, n) damped -> Q (m, n), levels q (m, n) in 0..2^bits - 1."""
    W = W.clone()
    m, n = W.shape
    maxq = 2 ** bits - 1
    assert group_size % blocksize == 0, "a group starts on a block boundary: W[:, j:] holds every update so far"
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q, levels = torch.zeros_like(W), torch.zeros(m, n, dtype=torch.long)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(m, i2 - i1, dtype=W.dtype)      # (m, B)
        for i in range(i2 - i1):
            j = i1 + i
            if j % group_size == 0:                   # Quantizer.find_params(W[:, j:j + group_size])
                x = W[:, j:j + group_size]                                         # (m, group_size)
                lo, hi = x.amin(1).clamp_max(0), x.amax(1).clamp_min(0)         # min(x, 0), max(x, 0)
                flat = (lo == 0) & (hi == 0)
                lo[flat], hi[flat] = -1.0, 1.0
                scale = (hi - lo) / maxq                                           # (m,)
                if fp16_scales:
                    scale = scale.half().to(W.dtype)
                zero = torch.round(-lo / scale)                                    # 0 on the grid
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            levels[:, j], Q[:, j] = q.long(), scale * (q - zero)
            err = (w - Q[:, j]) / Hinv[j, j]                                       # (m,)
            W1[:, i:] -= err[:, None] * Hinv[j, j:i2][None]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                                       # the lazy batch update
    return Q, levels


def test_gptq_matches_a_straight_reference_gptq():
    """Fair baselines: --method gptq is GPTQ itself, same grid and bits, on one real-size layer (1536 x 1536,
    inputs X = Z A correlated so that the damped H has a condition number in the hundreds).
    mgvq differs from the reference only in float order (fp32 LDL feedback vs fp64 Cholesky of H^-1; nearest
    codeword vs round-and-clamp) and in storing scales as fp16. Measured with a sweep that computes each group's
    grid from GPTQ's updated weights: objective 1.0008 x the reference's (the fp16 scales), levels 99.998 %
    equal to the fp16-scale reference (the rest fp32 ties). The asserts leave room for that and no more."""
    m = n = 1536
    g = torch.Generator().manual_seed(0)
    O = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    A = torch.logspace(0, 1, n, dtype=torch.float64)[:, None] * O                  # (n, n)
    X = torch.randn(2 * n, n, generator=g, dtype=torch.float64) @ A                # (T, n) correlated inputs
    H_I = (X.T @ X / X.shape[0]).float()                          # undamped, fp32 as hessian_add keeps it
    lin = torch.nn.Linear(n, m, bias=False)
    with torch.no_grad():
        lin.weight.copy_(0.02 * torch.randn(m, n, generator=g))
    W = lin.weight.detach().double()
    H = H_I.double()
    H.diagonal().add_(0.01 * H.diagonal().mean())                # GPTQ's percdamp 0.01 (= Config.damp)
    eig = torch.linalg.eigvalsh(H)
    assert 100 < eig[-1] / eig[0] < 1000

    cfg = mgvq.resolve(mgvq.Config(method="gptq", bits=2))
    factors = mgvq.damped_factors(lin, H_I.clone(), None, cfg, "lin")
    vq, info = mgvq.quantize_linear(lin, factors, None, None, [2] * (n // 256), cfg, torch.Generator().manual_seed(0),
                                    "lin")
    assert vq.tile_rows == {2: 1} and vq.groups_2.tolist() == list(range(n // 256))   # one grid per row and group
    Q = vq.dequantize().double()
    levels = unpack_codes(vq.codes_2, 2, n)                       # (m, n) q = 0..3, its codeword scale * (q - z)

    Q_ref, _ = gptq_paper(W, H, 2, 256)
    _, levels_ref = gptq_paper(W, H, 2, 256, fp16_scales=True)
    objective = lambda Qx: float((((W - Qx) @ H) * (W - Qx)).sum() / ((W @ H) * W).sum())   # tr(D H D^T) / tr(W H W^T)
    ours, ref = objective(Q), objective(Q_ref)
    agree = float((levels == levels_ref).double().mean())
    assert abs(info["err"] / ours - 1) < 1e-4                      # the layer's own figure is this objective
    assert abs(ours / ref - 1) < 0.002, f"gptq's objective {ours:.5f} vs the reference's {ref:.5f}"
    assert agree > 0.999, f"only {agree:.2%} of the levels agree with the reference's"


def test_sweep_beats_nearest_and_matches_brute_force():
    torch.manual_seed(1)
    n, K = 6, 4
    H = spd(n, seed=5, cond=0.2)
    W = torch.randn(3, n, dtype=torch.float64)
    U, D = mgvq.sweep_factors(H, 2)
    fit = lambda X, Dm, K_: (torch.tensor([[-2, -2], [-2, 2], [2, -2], [2, 2]], dtype=torch.int8)[None].expand(X.shape[0], 4, 2).clone(),
                             torch.full((X.shape[0],), 0.5, dtype=X.dtype))
    codes, Q, _, _ = mgvq.vq_sweep(W, U, D, [1], 6, {1: 1}, fit, "ldl")
    cb = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1]], dtype=torch.float64)
    loss = lambda Qr, w: float((w - Qr) @ H @ (w - Qr))
    for i in range(3):
        near = torch.cat([cb[((W[i, 2 * k:2 * k + 2] - cb) ** 2).sum(1).argmin()] for k in range(3)])
        best = min(loss(torch.cat([cb[a] for a in c]), W[i]) for c in itertools.product(range(4), repeat=3))
        assert loss(Q[i], W[i]) <= loss(near, W[i]) + 1e-12
        # Block-LDL is greedy, not exhaustive: it equals the optimum here in most rows, never beats it
        assert loss(Q[i], W[i]) >= best - 1e-12


def test_single_block_sweep_equals_brute_force():
    """With one d-block per group there is nothing to feed back: the sweep must find the exact optimum."""
    torch.manual_seed(8)
    d, K = 2, 16
    H = spd(d, seed=4, cond=0.05)
    W = torch.randn(5, d, dtype=torch.float64)
    cb = torch.randint(-60, 60, (1, K, d), dtype=torch.int8)
    scale = torch.tensor([0.02], dtype=torch.float64)
    fit = lambda X, Dm, K_: (cb.expand(X.shape[0], -1, -1).clone(), scale.expand(X.shape[0]).clone())
    U, D = mgvq.sweep_factors(H, d)
    _, Q, _, _ = mgvq.vq_sweep(W, U, D, [2], d, {2: 1}, fit, "ldl")
    C = cb[0].double() * scale
    for i in range(5):
        costs = torch.stack([(W[i] - c) @ H @ (W[i] - c) for c in C])
        assert torch.allclose(Q[i], C[costs.argmin()])


def test_codewords_round_trip_exactly():
    torch.manual_seed(2)
    m, n, d = 16, 8, 2
    cb = torch.randint(-100, 100, (1, 4, d), dtype=torch.int8)
    scale = torch.tensor([0.01]).half().float()
    codes = torch.randint(0, 4, (m, n // d))
    W = (cb[0].float() * scale)[codes].reshape(m, n)
    fit = lambda X, Dm, K: (cb.expand(X.shape[0], -1, -1).clone(), scale.expand(X.shape[0]).clone())
    U, D = mgvq.sweep_factors(spd(n, seed=1).float(), d)
    c2, Q, _, _ = mgvq.vq_sweep(W, U, D, [1], n, {1: m}, fit, "ldl")
    assert torch.equal(Q, W) and torch.equal(c2, codes)


def test_kmeans_recovers_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
    X = (centers[torch.arange(64) % 4] + 0.01 * torch.randn(64, 2, generator=g)).reshape(1, 4, 16, 2)
    D = torch.eye(2).expand(16, 2, 2)
    C = mgvq.kmeans(X, D, torch.ones(1, 4), 4, 25, g)
    found = sorted(map(tuple, C[0].round().tolist()))
    assert found == sorted(map(tuple, centers.tolist()))


def test_refit_never_increases_objective():
    torch.manual_seed(3)
    m, n, d = 32, 16, 2
    H = spd(n, seed=7).float()
    W = torch.randn(m, n)
    s = torch.rand(m) + 0.5
    U, D = mgvq.sweep_factors(H, d)
    g = torch.Generator().manual_seed(0)
    fit = lambda X, Dm, K: mgvq.int8_codebook(mgvq.kmeans(X, Dm, torch.ones(X.shape[:2]), K, 10, g))
    codes, Q, books, scales = mgvq.vq_sweep(W, U, D, [2, 2], 8, {2: 16}, fit, "ldl")
    obj = lambda Qx: float((s[:, None] * ((W - Qx) @ H) * (W - Qx)).sum())
    Q2 = mgvq.refit_codebooks(W, H, s, codes, books, scales, [2, 2], 8, {2: 16})
    assert obj(Q2) <= obj(Q) + 1e-6
    assert obj(Q2) < 0.999 * obj(Q)          # least squares with fixed codes does move the codewords


def test_newton_target_minimises_quadratic():
    torch.manual_seed(4)
    m, n = 5, 7
    W, G = torch.randn(m, n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64)
    H_O, H_I = spd(m, seed=1), spd(n, seed=2)
    Wt = mgvq.newton_target(W, G, H_O, H_I)
    delta = (Wt - W).requires_grad_()
    mgvq_loss = (G * delta).sum() + 0.5 * ((H_O @ delta) * (delta @ H_I)).sum()
    (grad,) = torch.autograd.grad(mgvq_loss, delta)
    assert grad.abs().max() < 1e-10
    assert mgvq.proxy_loss((Wt - W), H_I, G, H_O) < mgvq.proxy_loss(torch.zeros_like(W), H_I, G, H_O)


def test_shifted_sweep_equals_explicit_greedy():
    """Sweeping toward W~ = W - H_O^-1 G H_I^-1 under Block-LDL = choosing each block greedily to minimise
    <g, d> + 1/2 d H d^T with the later blocks re-solved continuously (one row, so H_O is a scalar)."""
    torch.manual_seed(5)
    n, d = 6, 2
    H = spd(n, seed=9, cond=0.3)
    w, gvec = torch.randn(1, n, dtype=torch.float64), 0.5 * torch.randn(1, n, dtype=torch.float64)
    cb = torch.tensor([[-1, -1], [-1, 1], [1, -1], [1, 1], [0, 0]], dtype=torch.float64)
    Wt = mgvq.newton_target(w, gvec, torch.ones(1, 1, dtype=torch.float64), H)
    U, D = mgvq.sweep_factors(H, d)
    fit = lambda X, Dm, K: (cb.to(torch.int8)[None].expand(X.shape[0], 5, 2).clone(), torch.ones(X.shape[0], dtype=X.dtype))
    fit4 = lambda X, Dm, K: tuple(t[:, :K] if t.dim() == 3 else t for t in fit(X, Dm, K))
    # K = 2^(b d) = 4 for b = 1: use the first four codewords in both
    _, Q, _, _ = mgvq.vq_sweep(Wt, U, D, [1], n, {1: 1}, fit4, "ldl")

    def ell(q):                                     # the layer objective with the gradient term
        dlt = q - w[0]
        return float(gvec[0] @ dlt + 0.5 * dlt @ H @ dlt)

    chosen = []
    for k in range(n // d):
        best, bestc = math.inf, None
        for c in range(4):
            fixed = torch.cat([*chosen, cb[c]]) if chosen else cb[c]
            j = len(fixed)
            if j < n:                                # re-solve the later coordinates: min over free part
                Hff, Hfx = H[j:, j:], H[j:, :j]
                free = w[0, j:] - torch.linalg.solve(Hff, gvec[0, j:] + Hfx @ (fixed - w[0, :j]))
                q = torch.cat([fixed, free])
            else:
                q = fixed
            if ell(q) < best - 1e-12:
                best, bestc = ell(q), c
        chosen.append(cb[bestc])
    assert torch.allclose(Q[0], torch.cat(chosen))


def test_allocation_meets_budget_and_favours_sensitive_group():
    N = 12
    choices = [1, 2, 3]
    sizes = torch.tensor([128 * 16] * 6 + [128 * 64] * 6)
    base = torch.tensor([4.0, 1.0, 0.25])                      # loss per weight at 1, 2, 3 bits
    costs = sizes[:, None] * base[None] * (1 + 0.01 * torch.arange(N))[:, None]
    costs[5] *= 100                                            # group 5 made artificially sensitive
    budget = int((sizes * 2).sum())
    a = mgvq.allocate_bits(costs, sizes, choices, budget)
    bits = torch.tensor(choices)[a]
    assert int((sizes * bits).sum()) == budget
    assert bits[5] == 3
    assert bits[5] > bits[torch.arange(N) != 5].float().median()
    uniform = torch.full((N,), 1)
    assert costs[torch.arange(N), a].sum() < costs[torch.arange(N), uniform].sum()


def test_tile_rows_keep_two_bit_overhead_small():
    for m in (128, 512, 1536, 8960):
        t = mgvq.tile_rows_for(m, 2, 2, 128, 0.2)
        assert m % t == 0 and (16 * 2 * 8 + 16) / (128 * t) <= 0.2


def test_integrated_gradients_known_answer_and_weights():
    """For a loss linear in h, IG is exact: a_t = |c_t a . (h_t - h_q,t)|, whatever the step count."""
    torch.manual_seed(6)
    T, n = 5, 3
    a, c = torch.randn(n), torch.tensor([0.1, 2.0, 0.5, 0.0, 1.0])
    h, h_q = torch.randn(T, n), torch.randn(T, n)
    attr = mgvq.integrated_gradients(lambda z: (c * (z @ a)).sum(), h, h_q, steps=8)
    assert torch.allclose(attr, (c * ((h - h_q) @ a)).abs(), atol=1e-6)
    # quadratic loss: the Riemann sum converges to the exact path integral (1/2)(h^2 - h_q^2)
    attr2 = mgvq.integrated_gradients(lambda z: 0.5 * (z ** 2).sum(), h, h_q, steps=400)
    assert torch.allclose(attr2, (0.5 * (h ** 2 - h_q ** 2)).sum(-1).abs(), rtol=0.02, atol=0.02)
    valid = torch.tensor([True, True, True, True, False])
    w = mgvq.normalise_weights(attr, valid)
    assert abs(float(w.sum()) - 4) < 1e-5 and w[4] == 0
    big, small = int(attr[:4].argmax()), int(attr[:4].argmin())
    assert w[big] > w[small]


def test_bits_accounting_hand_computed():
    from kernels import VQLinear
    m, n = 32, 256
    vq = VQLinear(n, m, d=2, group_size=128, group_bits=[2, 2], tile_rows={2: 16}, bias=False)
    sb = vq.storage_bits()
    # index: 2 bits x 8192 weights; codebooks: 2 row tiles x 2 groups x 16 codewords x 2 values x 8 bits;
    # scales: 4 codebooks x 16 bits
    assert (sb["index"], sb["codebook"], sb["scale"], sb["weights"]) == (16384, 1024, 64, 8192)
    assert abs((16384 + 1024 + 64) / 8192 - 2.1328125) < 1e-12


def kms(n, rho=0.95):
    """H_jk = rho^|j-k| (Kac-Murdock-Szego): neighbouring columns correlated rho; at n = 6, rho = 0.95 the
    condition number is 198 and each 2 x 2 block metric D_k has a correlation of 0.69 or more, so the plain
    distance and the diagonal of D_k pick other codewords than D_k itself."""
    j = torch.arange(n, dtype=torch.float64)
    return rho ** (j[:, None] - j[None]).abs()


def greedy_reference(W, H, C, d, metric):
    """The Block-LDL sweep written out by brute force, one row at a time: block k, the earlier blocks fixed at
    their codewords, takes the codeword whose objective (w - q) H (w - q)^T is least once the later columns are
    re-solved continuously ('ldl'); that continuous optimum's block k is the target t, and the objective's
    curvature in block k is the Schur complement S_k of the later columns. 'diag': nearest to the same t under
    diag(S_k) only (GPTVQ); 'plain': under the identity."""
    m, n = W.shape
    Q = torch.zeros_like(W)
    for i in range(m):
        w = W[i]
        for j in range(0, n, d):
            def resolved(fixed):                      # q = (fixed, argmin over the rest of the objective)
                k = len(fixed)
                rest = w[k:] - torch.linalg.solve(H[k:, k:], H[k:, :k] @ (fixed - w[:k])) if k < n else w[k:]
                return torch.cat([fixed, rest])
            if metric == "ldl":
                cost = torch.stack([(w - q) @ H @ (w - q) for q in (resolved(torch.cat([Q[i, :j], c])) for c in C)])
            else:
                t = resolved(Q[i, :j])[j:j + d]
                Hf = H[j:, j:]
                S = Hf[:d, :d] - (Hf[:d, d:] @ torch.linalg.solve(Hf[d:, d:], Hf[d:, :d]) if j + d < n else 0)
                S = torch.diag(S.diagonal()) if metric == "diag" else torch.eye(d, dtype=H.dtype)
                cost = (((t - C) @ S) * (t - C)).sum(1)
            Q[i, j:j + d] = C[cost.argmin()]
    return Q


@pytest.mark.parametrize("feedback", ["ldl", "diag"])
def test_sweep_metric_on_an_ill_conditioned_hessian(feedback):
    """--feedback ldl picks each block's codeword under the full block metric D_k, --feedback diag under its
    diagonal, both from the same error-fed target: each equals its brute force, and on this H the three metrics
    (full, diagonal, plain distance) disagree, so each answer pins its metric."""
    n, d, m = 6, 2, 24
    H = kms(n)
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    cb = torch.randint(-127, 128, (1, 16, d), generator=torch.Generator().manual_seed(12), dtype=torch.int8)
    scale = torch.tensor([2.5 / 127], dtype=torch.float64)                   # 16 codewords over [-2.5, 2.5]^2
    C = cb[0].double() * scale
    fit = lambda X, Dm, K: (cb.expand(X.shape[0], -1, -1).clone(), scale.expand(X.shape[0]).clone())
    U, D = mgvq.sweep_factors(H, d)
    _, Q, _, _ = mgvq.vq_sweep(W, U, D, [2], n, {2: 1}, fit, feedback)
    ref = {k: greedy_reference(W, H, C, d, k) for k in ("ldl", "diag", "plain")}
    rows_differ = lambda a, b: int((ref[a] != ref[b]).any(1).sum())
    assert min(rows_differ("ldl", "diag"), rows_differ("ldl", "plain"), rows_differ("diag", "plain")) >= 3
    assert torch.equal(Q, ref[feedback])


def test_single_block_sweep_is_the_exact_optimum_ill_conditioned():
    """One d = 4 block per row: the sweep's codeword is the exact optimum over all 256 codewords of
    (w - c) H (w - c)^T, asserted equal, on an H of condition number 10^3 where the plain nearest is not."""
    d = 4
    H = kms(d, 0.995)
    W = torch.randn(32, d, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    cb = torch.randint(-127, 128, (1, 256, d), generator=torch.Generator().manual_seed(14), dtype=torch.int8)
    scale = torch.tensor([2.0 / 127], dtype=torch.float64)
    C = cb[0].double() * scale
    fit = lambda X, Dm, K: (cb.expand(X.shape[0], -1, -1).clone(), scale.expand(X.shape[0]).clone())
    U, D = mgvq.sweep_factors(H, d)
    _, Q, _, _ = mgvq.vq_sweep(W, U, D, [2], d, {2: 1}, fit, "ldl")
    cost = torch.einsum("ica,ab,icb->ic", W[:, None] - C, H, W[:, None] - C)   # (rows, 256 codewords)
    best = C[cost.argmin(1)]
    assert torch.equal(Q, best)
    assert (C[((W[:, None] - C) ** 2).sum(-1).argmin(1)] != best).any(1).sum() >= 8   # plain nearest differs


@pytest.mark.parametrize("per_tile", [False, True])
def test_nearest_brute_force_under_full_metrics(per_tile):
    """nearest() against a loop over every vector and codeword, with correlated, badly conditioned metrics that
    differ per position (and per tile: the trial VQ's layout)."""
    g = torch.Generator().manual_seed(15)
    R, t, P, d, K = 3, 4, 5, 2, 16
    X = torch.randn(R, t, P, d, generator=g, dtype=torch.float64)
    C = torch.randn(R, K, d, generator=g, dtype=torch.float64)
    rho = torch.rand(*((R, P) if per_tile else (P,)), generator=g, dtype=torch.float64) * 1.98 - 0.99
    one = torch.ones_like(rho)
    D = torch.stack([torch.stack([one, rho], -1), torch.stack([rho, one], -1)], -1)      # correlation rho
    a = torch.tensor([1.0, 30.0], dtype=torch.float64).sqrt()                # the second coordinate weighs 30 x
    D = a[:, None] * D * a[None]
    got = mgvq.nearest(X, C, D)
    want = torch.empty(R, t, P, dtype=torch.long)
    plain_differs = 0
    for r, i, p in itertools.product(range(R), range(t), range(P)):
        Dm = D[r, p] if per_tile else D[p]
        e = X[r, i, p] - C[r]
        want[r, i, p] = int(((e @ Dm) * e).sum(1).argmin())
        plain_differs += int(want[r, i, p] != (e ** 2).sum(1).argmin())
    assert torch.equal(got, want)
    assert plain_differs >= 5


def test_kmeans_known_answer_weighted_by_row_and_position():
    """Two clusters, each of one point of row 0 and one of row 1 at different positions (d = 1): the centre is
    the mean weighted by s_i D_p. Rows weigh s = (1, 3), positions D = (1, 2):
        {0 (s 1, D 1), 1 (s 3, D 2)}       -> (0 + 6) / 7 = 6/7
        {100 (s 1, D 2), 102 (s 3, D 1)}   -> (200 + 306) / 5 = 101.2
    No data point (what seeding alone returns), plain mean (0.5, 101) or mean with one weight only is right."""
    X = torch.tensor([[0.0, 100.0], [102.0, 1.0]], dtype=torch.float64).reshape(1, 2, 2, 1)   # (R, t, P, d)
    D = torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(2, 1, 1)
    s = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    for seed in range(4):
        C = mgvq.kmeans(X, D, s, 2, 25, torch.Generator().manual_seed(seed))
        assert torch.allclose(C[0, :, 0].sort().values, torch.tensor([6 / 7, 101.2], dtype=torch.float64), atol=1e-6)


def lloyd_step(X, D, s, C):
    """One weighted Lloyd step written out: each vector to its nearest codeword under D_p, then each used
    codeword to argmin_c sum s_i (x - c) D_p (x - c)^T = (sum s_i D_p)^-1 sum s_i D_p x over its members."""
    R, t, P, d = X.shape
    new = C.clone()
    for r in range(R):
        A = torch.zeros(C.shape[1], d, d, dtype=X.dtype)
        v = torch.zeros(C.shape[1], d, dtype=X.dtype)
        for i, p in itertools.product(range(t), range(P)):
            Dm = D[r, p] if D.dim() == 4 else D[p]
            e = X[r, i, p] - C[r]
            c = int(((e @ Dm) * e).sum(1).argmin())
            A[c] += s[r, i] * Dm
            v[c] += s[r, i] * Dm @ X[r, i, p]
        for c in range(C.shape[1]):
            if A[c].abs().sum() > 0:
                new[r, c] = torch.linalg.solve(A[c], v[c])
    return new


@pytest.mark.parametrize("per_tile", [False, True])
def test_kmeans_ends_at_a_fixed_point_of_the_weighted_update(per_tile):
    """Converged k-means is a fixed point of the weighted Lloyd step under s_i D_p: on overlapping data with
    correlated metrics and row weights from 0.1 to 10, neither the seeds nor a plain or partly weighted mean is."""
    g = torch.Generator().manual_seed(16)
    R, t, P, d, K = 2, 4, 6, 2, 4
    X = torch.randn(R, t, P, d, generator=g, dtype=torch.float64)
    rho = torch.rand(*((R, P) if per_tile else (P,)), generator=g, dtype=torch.float64) * 1.9 - 0.95
    amp = 10 ** (2 * torch.rand(rho.shape, generator=g, dtype=torch.float64) - 1)
    one = torch.ones_like(rho)
    D = amp[..., None, None] * torch.stack([torch.stack([one, rho], -1), torch.stack([rho, one], -1)], -1)
    s = 10 ** (2 * torch.rand(R, t, generator=g, dtype=torch.float64) - 1)
    C = mgvq.kmeans(X, D, s, K, 200, torch.Generator().manual_seed(0))
    assert torch.allclose(lloyd_step(X, D, s, C), C, atol=1e-7)


@pytest.mark.parametrize("per_coord", [False, True], ids=["joint", "per-coordinate"])
def test_refit_is_the_least_squares_optimum(per_coord):
    """With the codes fixed, each group's codewords (per row tile) move to the solved optimum of
    sum_i s_i (w_i - q_i) H (w_i - q_i)^T, the other group held (Gauss-Seidel: group 0, then group 1 given the
    new group 0), up to the int8 rounding of the stored codebook. The optimum comes from torch.linalg.lstsq on
    the stacked system sqrt(s_i) R (w_i - q_i), H = R^T R: an independent solve of the same least squares.
    Per coordinate, the unknowns are the 4 values of each coordinate's scalar codebook (2 bits, d = 2: K = 16)."""
    g = torch.Generator().manual_seed(17)
    m, n, d, gs, tr = 8, 16, 2, 8, 4
    bits, K, Kc = (2, 16, 4) if per_coord else (1, 4, 4)                     # per coordinate: 2 bits, 4 + 4 values
    P, R = gs // d, m // tr
    entry = lambda code, e: (code >> (e * bits)) % Kc if per_coord else code  # the stored entry coordinate e reads
    H = kms(n)                                                                # condition number ~ 500
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    s = 10 ** (torch.rand(m, generator=g, dtype=torch.float64) - 0.5)
    perm = lambda: torch.randperm(tr * P, generator=g) % K                  # every codeword used in every tile
    codes = torch.cat([torch.stack([perm() for _ in range(R)]).reshape(m, P) for _ in range(2)], 1)   # (m, n/d)
    books = [torch.randint(-127, 128, (R, Kc, d), generator=g, dtype=torch.int8) for _ in range(2)]
    scales = [torch.full((R,), 0.01, dtype=torch.float64) for _ in range(2)]
    Q = torch.cat([mgvq.dequant_group(codes[:, k * P:(k + 1) * P], books[k], scales[k], tr, K) for k in range(2)], 1)
    Rt = torch.linalg.cholesky(H).T                                            # H = Rt^T Rt
    expect = []
    for k in range(2):                                                        # Gauss-Seidel over the groups
        Ck = torch.empty(R, Kc, d, dtype=torch.float64)
        for r in range(R):
            A, b = [], []
            for i in range(r * tr, (r + 1) * tr):
                E = torch.zeros(n, Kc * d, dtype=torch.float64)                 # q_i = base_i + E c
                for p in range(P):
                    for e in range(d):
                        E[k * gs + p * d + e, entry(int(codes[i, k * P + p]), e) * d + e] = 1
                base = Q[i].clone()
                base[k * gs:(k + 1) * gs] = 0
                A.append(s[i].sqrt() * Rt @ E)
                b.append(s[i].sqrt() * Rt @ (W[i] - base))
            Ck[r] = torch.linalg.lstsq(torch.cat(A), torch.cat(b)).solution.reshape(Kc, d)
        expect.append(Ck)
        Q[:, k * gs:(k + 1) * gs] = mgvq.dequant_group(codes[:, k * P:(k + 1) * P], *mgvq.int8_codebook(Ck), tr, K)
    Q2 = mgvq.refit_codebooks(W, H, s, codes, books, scales, [bits, bits], gs, {bits: tr})
    for k in range(2):
        got = books[k].double() * scales[k][:, None, None]
        assert (got - expect[k]).abs().max() <= 0.5 * float(scales[k].max()) * (1 + 1e-6)
    stored = torch.cat([mgvq.dequant_group(codes[:, k * P:(k + 1) * P], books[k], scales[k], tr, K) for k in range(2)], 1)
    assert torch.equal(Q2, stored.to(Q2.dtype))


def test_codewords_per_coordinate_known_answer():
    # 2 bits, d = 2: coordinate 0 reads bits 0-1 of the index, coordinate 1 bits 2-3; 16 codewords from 4 + 4 values
    Cq = torch.tensor([[[1, -1], [2, -2], [3, -3], [4, -4]]], dtype=torch.int8)          # (R = 1, 4, d = 2)
    C = mgvq.codewords(Cq, torch.tensor([0.5]), 16)
    assert C.shape == (1, 16, 2)
    assert C[0, 0b1001].tolist() == [1.0, -1.5] and C[0, 0b0111].tolist() == [2.0, -1.0]
    assert torch.equal(mgvq.codewords(Cq, torch.tensor([0.5]), 4), Cq.float() * 0.5)   # Kc = K: joint


def test_per_coordinate_layer_is_what_the_sweep_chose():
    """A 3-bit d = 2 layer through quantize_linear: per-coordinate codebooks of 8 values (not 64 codewords),
    8-row tiles, and the VQLinear's weight is exactly the sweep's Q (what the error figures were computed on)."""
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(128, 32, bias=False)
    lin.weight.data = torch.randn(32, 128, generator=g) / 10
    X = torch.randn(512, 128, generator=g) @ torch.randn(128, 128, generator=g) / 10
    cfg = mgvq.resolve(mgvq.Config(method="gptvq", bits=3, joint_bits=4))     # mgvq's codebooks, one linear
    assert mgvq.resolve(mgvq.Config(method="mgvq")).joint_bits == 4            # the default of mgvq ...
    assert mgvq.resolve(mgvq.Config(method="gptvq")).joint_bits == 12          # ... not of GPTVQ as published
    assert mgvq.per_coordinate(3, 2, cfg.joint_bits) and not mgvq.per_coordinate(2, 2, 4)
    factors = mgvq.damped_factors(lin, X.T @ X / len(X), None, cfg, "lin")
    vq, info = mgvq.quantize_linear(lin, factors, None, None, [3], cfg, torch.Generator().manual_seed(0), "lin")
    assert vq.per_coordinate == [3] and vq.codebook_3.shape == (32 // 8, 1, 8, 2) and vq.tile_rows == {3: 8}
    assert info["err"] < info["err_rtn"] < 0.05
    W, H = factors[0], factors[1]
    err = mgvq.proxy_loss(W - vq.dequantize(), H) / mgvq.proxy_loss(W, H)
    assert abs(err - info["err"]) <= 1e-6 * info["err"]                          # the stored weights were judged
    joint = mgvq.resolve(mgvq.Config(method="gptvq", bits=3))
    vq2, info2 = mgvq.quantize_linear(lin, factors, None, None, [3], joint, torch.Generator().manual_seed(0), "lin")
    assert vq2.per_coordinate == [] and vq2.codebook_3.shape[2] == 64
    assert vq.codebook_3[0, 0].numel() * 8 == vq2.codebook_3[0, 0].numel()          # 8 x 2 entries a tile, not 64 x 2


def scalar_rows(n=256, seed=20):
    """Rows of the kinds a scalar grid must hold: one-sided in [0, 1] and in [-1, 0], lopsided both ways, small
    (not below ~0.02 wide: at 8 bits its fp16 scale would be subnormal, with only a few significant bits)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(5, n, generator=g)
    return torch.stack([u[0], -u[1], 1.7 * u[2] - 0.3, 2.5 * u[3] - 2.0, 0.05 * (u[4] - 0.5)])


@pytest.mark.parametrize("bits", range(1, 9))
def test_minmax_grid_holds_every_row_at_every_bit_width(bits):
    """GPTQ's grid scale * (q - z): K consecutive int8 values with 0 among them, covering each row's
    [min(x, 0), max(x, 0)] to half a step (the int8 entries must not wrap at 8 bits), in at least K - 1 steps
    (at 8 bits min(K - 1, 127): 256 int8 values around 0 leave a one-sided row 127)."""
    K, X = 2 ** bits, scalar_rows()
    Cq, scale = mgvq.minmax_grid(X.reshape(5, 1, -1, 1), K)
    assert Cq.dtype == torch.int8 and Cq.shape == (5, K, 1)
    q = Cq[:, :, 0].int()
    assert ((q[:, 1:] - q[:, :-1]) == 1).all() and (q == 0).any(1).all()
    grid = q.double() * scale.double()[:, None]                               # (rows, K)
    lo, hi = X.amin(1).clamp_max(0).double(), X.amax(1).clamp_min(0).double()
    gap = (X.double()[:, :, None] - grid[:, None]).abs().amin(-1).amax(1)      # farthest weight from the grid
    assert (gap <= 0.5 * scale + 2 ** -10 * (hi - lo)).all(), (gap, scale)
    assert ((hi - lo) / scale >= min(K - 1, 127) * (1 - 2 ** -10)).all()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_scalar_methods_round_trip_at_every_bit_width(method, bits, monkeypatch):
    """Every --bits the CLI takes for the scalar baselines: the stored layer's dequantize() is the Q the sweep
    computed; RTN puts every weight within half a step of itself; GPTQ's feedback beats plain rounding to the
    same grid on the layer objective."""
    cfg = mgvq.resolve(mgvq.Config(method=method, bits=bits))
    lin = torch.nn.Linear(256, 5).requires_grad_(False)
    lin.weight.copy_(scalar_rows())
    factors = mgvq.damped_factors(lin, spd(256, seed=bits).float(), None, cfg, "lin")
    swept = []
    sweep = mgvq.vq_sweep
    monkeypatch.setattr(mgvq, "vq_sweep", lambda *a, **k: swept.append(sweep(*a, **k)) or swept[-1])
    vq, info = mgvq.quantize_linear(lin, factors, None, None, [bits], cfg, torch.Generator().manual_seed(0), "lin")
    Wq = vq.dequantize()
    assert torch.equal(Wq, swept[0][1])
    step = getattr(vq, f"scale_{bits}").float()                              # (rows, 1): one grid per row
    if method == "rtn":
        assert ((Wq - lin.weight).abs() <= 0.5 * step * (1 + 1e-3)).all()
    else:
        assert info["err"] < info["err_rtn"]


def test_proxy_loss_is_the_kronecker_quadratic_form():
    """l(delta) = <G, delta> + 1/2 vec(delta)^T (H_O (x) H_I) vec(delta) (row-major vec), against the explicit
    (mn x mn) Kronecker product; without H_O, H_O = I; and one number by hand."""
    g = torch.Generator().manual_seed(18)
    m, n = 3, 4
    delta, G = torch.randn(m, n, generator=g, dtype=torch.float64), torch.randn(m, n, generator=g, dtype=torch.float64)
    H_I, H_O = spd(n, seed=1), spd(m, seed=2)
    v = delta.reshape(-1)
    assert math.isclose(mgvq.proxy_loss(delta, H_I, G, H_O), float(G.reshape(-1) @ v + 0.5 * v @ torch.kron(H_O, H_I) @ v), rel_tol=1e-12)
    assert math.isclose(mgvq.proxy_loss(delta, H_I), float(0.5 * v @ torch.kron(torch.eye(m, dtype=torch.float64), H_I) @ v), rel_tol=1e-12)
    one = lambda x: torch.tensor([[x]], dtype=torch.float64)
    assert mgvq.proxy_loss(one(2.0), one(3.0), one(1.0), one(5.0)) == 1 * 2 + 0.5 * 5 * 3 * 2 * 2     # = 32


def test_token_weights_are_clipped_by_hand():
    """41 valid tokens, 40 of attribution 1 and one of 1000, one invalid: mean 1040/41, so the ratios are
    41/1040 = 0.039 and 41000/1040 = 39.4; clipped to [1/20, 20] -> 0.05 and 20 (sum 22), renormalised to sum 41:
    0.05 * 41/22 and 20 * 41/22. Unclipped they would be 0.039 and 39.4."""
    a = torch.cat([torch.ones(40), torch.tensor([1000.0, 7.0])])
    valid = torch.ones(42, dtype=torch.bool)
    valid[41] = False
    w = mgvq.normalise_weights(a, valid)
    assert torch.allclose(w[:40], torch.full((40,), 0.05 * 41 / 22)) and math.isclose(float(w[40]), 20 * 41 / 22, rel_tol=1e-6)
    assert w[41] == 0
    # the property, on heavy-tailed attributions with zeros: mean 1 over the valid tokens, none dropped,
    # none weighing more than clip^2 times another
    g = torch.Generator().manual_seed(19)
    a = torch.rand(500, generator=g) ** 8 * 1e4
    a[:50] = 0
    valid = torch.rand(500, generator=g) > 0.1
    for clip in (4.0, 20.0):
        w = mgvq.normalise_weights(a, valid, clip)
        assert math.isclose(float(w.sum()), int(valid.sum()), rel_tol=1e-5) and (w[~valid] == 0).all()
        assert w[valid].min() > 0 and float(w[valid].max() / w[valid].min()) <= clip ** 2 * (1 + 1e-5)


def test_line_search_backtracks_one_quarter_sixteenth(monkeypatch):
    """On a toy objective |w - 1/16| from w = 0 along a shift of 1, the scales 1 and 1/4 overshoot and 1/16 lands:
    the search must try 1, 1/4, 1/16 in that order and keep 1/16; with two tries it keeps nothing. The weights
    come back as they were either way."""
    lin = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    lin.weight.zero_()
    tried = []

    def kl(model, batches, teacher):
        tried.append(float(lin.weight))
        return abs(float(lin.weight) - 1 / 16)

    monkeypatch.setattr(mgvq, "mean_kl", kl)
    shift = {"a": torch.ones(1, 1)}
    assert mgvq.line_search(None, {"a": lin}, shift, [], [], 1 / 16, 3) == (1 / 16, 0.0)
    assert tried == [1.0, 0.25, 1 / 16] and float(lin.weight) == 0.0
    tried.clear()
    assert mgvq.line_search(None, {"a": lin}, shift, [], [], 1 / 16, 2) == (0.0, 1 / 16)
    assert tried == [1.0, 0.25] and float(lin.weight) == 0.0


def test_allocation_greedy_fill_reaches_the_exhaustive_optimum():
    """Groups A (2 weights), B and C (1 weight each), bits {1, 2, 3}, budget 9 index bits. The price of a bit
    alone stops at A 2, B 2, C 2 (8 bits): A's next step costs 2 bits and the next cheaper price would take both.
    The greedy fill must spend the last bit where it helps most per bit (B: 6 -> 4 beats C: 7 -> 5.5), which is
    also the unique optimum of all 27 allocations."""
    costs = torch.tensor([[20.0, 10.0, 5.5], [10.0, 6.0, 4.0], [10.0, 7.0, 5.5]])
    sizes = torch.tensor([2, 1, 1])
    choices, budget = [1, 2, 3], 9
    a = mgvq.allocate_bits(costs, sizes, choices, budget)
    feasible = [c for c in itertools.product(range(3), repeat=3) if sum(int(sizes[g]) * choices[c[g]] for g in range(3)) == budget]
    best = min(feasible, key=lambda c: sum(float(costs[g, c[g]]) for g in range(3)))
    assert a.tolist() == list(best) == [1, 2, 1]


@pytest.mark.parametrize("seed", range(4))
def test_allocation_equals_exhaustive_search_when_convex(seed):
    """Equal group sizes and convex costs (each extra bit buys less): the price-then-greedy allocation is the
    exact optimum of all 3^7 allocations at every reachable budget, ties aside."""
    g = torch.Generator().manual_seed(seed)
    N, choices = 7, [1, 2, 3]
    first = torch.rand(N, generator=g, dtype=torch.float64) * 10 + 1
    drops = torch.rand(N, 2, generator=g, dtype=torch.float64).sort(1, descending=True).values * first[:, None] / 2
    costs = torch.stack([first, first - drops[:, 0], first - drops.sum(1)], 1)
    sizes = torch.full((N,), 4)
    every = torch.tensor(list(itertools.product(range(3), repeat=N)))          # (3^N, N)
    total = costs[torch.arange(N), every].sum(1)
    used = (sizes * torch.tensor(choices)[every]).sum(1)
    for budget in range(4 * N, 4 * 3 * N + 1, 4):
        a = mgvq.allocate_bits(costs, sizes, choices, budget)
        assert int((sizes * torch.tensor(choices)[a]).sum()) == budget
        assert math.isclose(float(costs[torch.arange(N), a].sum()), float(total[used == budget].min()), rel_tol=1e-12)


def test_qa_check_kl_direction_by_hand(monkeypatch):
    """KL(p_FP || p_q) over the candidates, each side renormalised over its choices, not KL(q || p): the
    answers' likelihoods (0.2, 0.2) under FP and (0.45, 0.05) quantized are p = (1/2, 1/2), q = (0.9, 0.1), so
    KL = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = 0.5108 (the reverse is 0.3681); a padded third candidate adds
    nothing, and a second question with equal p and q adds 0 to the mean."""
    samples = [s for s in E.make_task("eval", 20) if len(s.choices) >= 3][:2]
    p = torch.tensor([[0.2, 0.2, 0.0], [0.02, 0.03, 0.05]]).log()           # (questions, choices) log-likelihoods
    q = torch.tensor([[0.45, 0.05, 0.0], [0.2, 0.3, 0.5]]).log()
    monkeypatch.setattr(E, "choice_logprobs", lambda vlm, samples, batch_size=16: q.clone())
    result = E.qa_check(type("Fake", (), {"name": "fake"})(), samples, ref_scores=p)
    assert math.isclose(result["kl"], (0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)) / 2, rel_tol=1e-5)
    assert result["agreement"] == 1.0



# --- the quantizer on the toy model

def calib(vlm, n=16, seed=0, bs=8):
    samples = E.make_task("calib", n, seed=seed)
    return [vlm.batch(samples[i:i + bs]) for i in range(0, n, bs)]


def test_topk_kl_is_zero_at_fp_and_bounds_the_full_kl():
    """KL over the FP top-k plus one bucket for the rest: zero with zero gradient at the FP logits (a renormalised
    top-k is not: it pulls the tail mass in), never above the full KL (merging outcomes cannot raise a KL)."""
    torch.manual_seed(0)
    z = torch.randn(6, 50) * 3
    logp = z.log_softmax(-1)
    val, idx = logp.topk(5, dim=-1)
    zq = z.clone().requires_grad_(True)
    kl = mgvq.kl_to_teacher(zq, (idx, val))
    kl.backward()
    assert abs(float(kl.detach())) < 1e-5 and zq.grad.abs().max() < 1e-6
    for seed in range(3):
        zq = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(seed))
        full = float((logp.exp() * (logp - zq.log_softmax(-1))).sum())
        part = float(mgvq.kl_to_teacher(zq, (idx, val)))
        assert 0 < part <= full + 1e-5


def test_gradient_is_zero_before_quantization_and_kfac_predicts_kl(toy):
    model = toy.model.requires_grad_(False)
    batches = calib(toy, n=32)
    teacher, _ = mgvq.teacher_pass(model, batches, 64)
    cfg = mgvq.resolve(mgvq.Config(method="mgvq", token_weights="none"))
    layer = model.model.language_model.layers[1]
    lin = layer.mlp.down_proj
    gen = torch.Generator().manual_seed(0)
    H_I, H_O, G, _, _ = mgvq.block_statistics(model, layer, batches, cfg, teacher, None, gen)
    W = lin.weight.detach().clone()
    assert G["mlp.down_proj"].abs().max() <= 1e-6 * W.abs().max()       # KL(p || p) has zero gradient
    # average the Fisher over a few label draws to tame the sampling noise of H_O
    H_Os = [H_O["mlp.down_proj"]] + [mgvq.block_statistics(model, layer, batches, cfg, teacher, None, gen)[1]["mlp.down_proj"] for _ in range(3)]
    H_Om = sum(H_Os) / len(H_Os)
    ratios = []
    for seed in range(3):
        delta = 0.02 * W.std() * torch.randn(W.shape, generator=torch.Generator().manual_seed(seed))
        lin.weight.data = W + delta
        real = mgvq.mean_kl(model, batches, teacher)
        lin.weight.data = W.clone()
        pred = mgvq.proxy_loss(delta, H_I["mlp.down_proj"], None, H_Om)
        ratios.append(pred / real)
    print("K-FAC predicted / real KL:", ratios)
    # Measured here: 0.37-0.76. K-FAC keeps only the token-diagonal terms: a perturbation applied to every
    # token also moves the loss through the cross-token terms, which it drops, so it under-predicts; H_O from
    # four label draws on 32 samples is noisy too. The trust scale and the allocation need the right order of
    # magnitude, so we accept a factor 4 either way (a wrong normalisation of G, H_O or H_I is off by the
    # token count, 10^3 here).
    assert all(0.25 < r < 4.0 for r in ratios), ratios


def perturbed_block0(toy, scale=0.1):
    """Block 0's linears moved off FP by a seeded relative perturbation (as quantizing them would), so that the
    KL and its gradient G in the later blocks are not zero; returns the weights to put back."""
    lins = E.linears(toy.model.model.language_model.layers[0])
    W0 = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    g = torch.Generator().manual_seed(0)
    for n, lin in lins.items():
        lin.weight.data = W0[n] + scale * W0[n].std() * torch.randn(W0[n].shape, generator=g)

    def restore():
        for n, lin in lins.items():
            lin.weight.data = W0[n]
    return restore


def test_gradient_drift_sign_and_scale_against_finite_difference(toy):
    """Away from FP, G = d mean KL(p_FP || p) / dW: a central difference of mean_kl along G itself equals |G|
    (same sign, same normalisation, within 5 %), and the KL block_statistics reports is mean_kl, positive."""
    model = toy.model.requires_grad_(False)
    batches = calib(toy, n=8)
    teacher, _ = mgvq.teacher_pass(model, batches, 64)
    restore = perturbed_block0(toy)
    try:
        layer = model.model.language_model.layers[1]
        cfg = mgvq.resolve(mgvq.Config(method="mgvq", token_weights="none"))
        _, _, G, _, _ = mgvq.block_statistics(model, layer, batches, cfg, teacher, None, torch.Generator().manual_seed(0))
        kl = mgvq.mean_kl(model, batches, teacher)
        assert kl > 1e-4 and math.isclose(G["kl"], kl, rel_tol=1e-4)
        lins = E.linears(layer)
        for name in ("mlp.down_proj", "self_attn.v_proj"):
            lin, Gn = lins[name], G[name]
            W = lin.weight.detach().clone()
            step = 1e-3 * W.norm() * Gn / Gn.norm()
            lin.weight.data = W + step
            up = mgvq.mean_kl(model, batches, teacher)
            lin.weight.data = W - step
            down = mgvq.mean_kl(model, batches, teacher)
            lin.weight.data = W
            slope = (up - down) / (2 * float(step.norm()))                    # d KL along G / |G|, measured
            assert 0.95 < slope / float(Gn.norm()) < 1.05, (name, slope, float(Gn.norm()))
    finally:
        restore()


def test_drift_target_is_the_least_squares_fit_of_the_fp_outputs(toy, tmp_path):
    """--grad drift, recomputed from the linears' own inputs: with block 0 perturbed (as quantizing it would),
    W + drift_shift minimises sum_t |W x_fp,t - Q x_t|^2 over the valid tokens (x_fp: the input when everything
    upstream is FP): it equals the fit damped toward W by the same 1 %, recomputed from the tokens' inputs, and
    beats keeping W by far (the toy's inputs span fewer dimensions than it has tokens: the fit is near exact). With
    nothing perturbed the drift, so G, is zero."""
    model = toy.model.requires_grad_(False)
    batches = calib(toy, n=16)
    layer = model.model.language_model.layers[1]
    lins = E.linears(layer)
    cfg = mgvq.resolve(mgvq.Config(method="gptvq", grad="drift", damp=0.01))

    def inputs():                                            # {linear: (valid tokens, n)} of the current model
        xs = {n: [] for n in lins}
        hooks = [m.register_forward_hook(lambda mod, a, o, n=n: xs[n].append(a[0].detach())) for n, m in lins.items()]
        with torch.no_grad(), E.hooked(hooks):
            for b in batches:
                E.forward(model, b)
        valid = torch.cat([(b["attention_mask"] > 0).reshape(-1) for b in batches])
        return {n: torch.cat([x.reshape(-1, x.shape[-1]) for x in v]).double()[valid] for n, v in xs.items()}

    _, fp_in = mgvq.teacher_pass(model, batches, 8, [layer], str(tmp_path))
    x_fp = inputs()
    G0 = mgvq.block_statistics(model, layer, batches, cfg, None, None, torch.Generator(), fp_in[0])[2]
    assert all(G0[n].abs().max() < 1e-6 * lin.weight.abs().max() for n, lin in lins.items())
    restore = perturbed_block0(toy)
    try:
        x_q = inputs()
        H_I, H_O, G, _, _ = mgvq.block_statistics(model, layer, batches, cfg, None, None, torch.Generator(), fp_in[0])
        factors = {n: mgvq.damped_factors(lin, H_I[n], H_O[n], cfg, n) for n, lin in lins.items()}
        assert set(G["damp"]) == set(lins) and all(v in mgvq.DRIFT_DAMPING for v in G["damp"].values())
        G["damp"] = {n: 0.0 for n in lins}                   # the metric's damping only: the plain fit
        shifts = mgvq.drift_shifts(factors, G)
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
            W = lins[name].weight.detach().double()
            Y = x_fp[name] @ W.T                                                   # FP outputs (T, m)
            loss = lambda Q: float(((Y - x_q[name] @ Q.T) ** 2).sum())
            X = x_q[name]                  # min |Y - X Q^T|^2 + lam |Q - W|^2, lam = the damping (toward W, not 0)
            lam = 0.01 * float((X * X).sum()) / X.shape[1]                         # 1 % of mean diag(X^T X)
            A = X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype)
            best = torch.linalg.solve(A, X.T @ Y + lam * W.T).T                    # (m, n)
            Wt = W + shifts[name].double()
            assert (Wt - best).norm() < 1e-3 * (best - W).norm(), (name, float((Wt - best).norm() / (best - W).norm()))
            assert loss(Wt) < 0.2 * loss(W), (name, loss(Wt), loss(W))                # measured: 10-25x less
    finally:
        restore()


def test_drift_damping_follows_the_evidence():
    """The cross-validated damping of the drift shift: a drift that is a linear function of the input, seen on
    many tokens, is fitted nearly undamped; a drift that is noise independent of the input is not fitted at all
    (inf); and the held-out loss it scores (drift_loss) is the explicit sum over the other half's tokens."""
    g = torch.Generator().manual_seed(0)
    n, m = 32, 16
    W = torch.randn(m, n, generator=g)
    M = 0.1 * torch.randn(n, n, generator=g)

    def folds(T, linear):
        H_f, R_f, data = [], [], []
        for _ in range(2):
            X = torch.randn(T, n, generator=g) @ torch.diag(torch.linspace(0.2, 2, n))
            dX = X @ M.T if linear else 0.3 * torch.randn(T, n, generator=g)
            H_f.append(X.T @ X / T)
            R_f.append(dX.T @ X / T)
            data.append((X, dX))
        return H_f, R_f, data

    H_f, R_f, _ = folds(4000, True)
    assert mgvq.drift_damping(W, H_f, R_f, 0.01) <= 0.03
    H_f, R_f, _ = folds(60, False)
    assert mgvq.drift_damping(W, H_f, R_f, 0.01) == math.inf
    H_f, R_f, ((Xa, dXa), (Xb, dXb)) = folds(50, True)               # the score, against the tokens themselves
    S = W @ R_f[0] @ torch.linalg.inv(mgvq.tikhonov(H_f[0], 0.01 + 0.3))
    Y = (Xb + dXb) @ W.T
    explicit = (((Y - Xb @ (W + S).T) ** 2).sum() - ((Y - Xb @ W.T) ** 2).sum()) / len(Xb)
    assert math.isclose(mgvq.drift_loss(S, W, H_f[1], R_f[1]), float(explicit), rel_tol=1e-4)
    # the choice itself, against a brute-force cross-validation on the tokens (fit on one half's tokens, score
    # the other half's), on a drift that is part signal, part noise, so that the answer is neither end
    data = []
    for _ in range(2):
        X = torch.randn(200, n, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.2, 2, n)).double()
        data.append((X, X @ M.T.double() + 0.3 * torch.randn(200, n, generator=g, dtype=torch.float64)))
    Wd = W.double()

    def cv(lam):
        total = 0.0
        for (Xa, dXa), (Xb, dXb) in ((data[0], data[1]), (data[1], data[0])):
            A = Xa.T @ Xa / len(Xa)
            A.diagonal().add_((0.01 + lam) * A.diagonal().mean())
            S = Wd @ (dXa.T @ Xa / len(Xa)) @ torch.linalg.inv(A)
            Y = (Xb + dXb) @ Wd.T
            total += float((((Y - Xb @ (Wd + S).T) ** 2).sum() - ((Y - Xb @ Wd.T) ** 2).sum()) / len(Xb))
        return total
    losses = {lam: cv(lam) for lam in mgvq.DRIFT_DAMPING[:-1]}
    expected = min(losses, key=losses.get) if min(losses.values()) < 0 else math.inf
    H_f = [X.T @ X / len(X) for X, _ in data]
    R_f = [dX.T @ X / len(X) for X, dX in data]
    assert 0 < expected < math.inf, losses
    assert mgvq.drift_damping(Wd, H_f, R_f, 0.01) == expected, losses


def test_kronecker_factors_known_answer(toy):
    """Recomputed from the linear's own inputs x and output gradients g, and the block's output gradients, with
    the same sampled labels: the modality weights are each modality's mean |g_block|^2 over its valid tokens,
    H_I = (w_txt sum_txt x x^T + w_img sum_img x x^T) / (w_txt n_txt + w_img n_img) (a weighted mean), and
    H_O = sum over tokens of g g^T / N, N the loss positions (the normalisation of G)."""
    model = toy.model.requires_grad_(False)
    batches = calib(toy, n=8)
    teacher, _ = mgvq.teacher_pass(model, batches, 64)
    layer = model.model.language_model.layers[1]
    cfg = mgvq.resolve(mgvq.Config(method="mgvq", token_weights="modality"))
    H_I, H_O, _, mw, _ = mgvq.block_statistics(model, layer, batches, cfg, teacher, None, torch.Generator().manual_seed(0))
    for name in ("mlp.down_proj", "self_attn.o_proj"):
        lin = layer.get_submodule(name)
        gen, xs, gs, outs = torch.Generator().manual_seed(0), [], [], []

        def grab(mod, args, out, into):
            into[0].append(args[0].detach())
            out.register_hook(lambda g: into[1].append(g.detach()))
        lin.weight.requires_grad_(True)
        try:
            hooks = [lin.register_forward_hook(lambda m, a, o: grab(m, a, o, (xs, gs))),
                     layer.register_forward_hook(lambda m, a, o: grab(m, a, o, ([], outs)))]
            with torch.enable_grad(), E.hooked(hooks):
                for batch in batches:
                    mgvq.sampled_nll(E.answer_logits(model, batch), gen).backward()
        finally:
            lin.weight.requires_grad_(False)
            lin.weight.grad = None
        valid = torch.cat([(b["attention_mask"] > 0).reshape(-1) for b in batches])
        img = torch.cat([(b["mm_token_type_ids"] == 1).reshape(-1) for b in batches])
        energy = torch.cat([o.pow(2).sum(-1).reshape(-1) for o in outs])                 # |g_block|^2 per token
        w = torch.stack([energy[valid & ~img].mean(), energy[valid & img].mean()])      # [text, image]
        assert torch.allclose(mw.float(), w, rtol=1e-4)
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])                        # (B T, n)
        S = [x[valid & mask].T @ x[valid & mask] for mask in (~img, img)]
        want_I = (w[0] * S[0] + w[1] * S[1]) / (w[0] * (valid & ~img).sum() + w[1] * (valid & img).sum())
        g = torch.cat([g.reshape(-1, g.shape[-1]) for g in gs])                            # (B T, m)
        n_pos = sum(int(E.loss_mask(b).sum()) for b in batches)
        for got, want in ((H_I[name], want_I), (H_O[name], g.T @ g / n_pos)):
            assert (got - want).abs().max() <= 1e-4 * want.abs().max()         # fp32 sums in another order


def test_sequential_linear_recollects_h_i_behind_the_quantized_linears(toy):
    """--sequential linear: the stages are the block's linears grouped by the input they are fed, in the order
    they are fed; once q/k/v are replaced by something that is no longer an nn.Linear (as a VQLinear is), the
    refreshed H_I of o_proj is the mean x x^T over the valid tokens of its input as it is now, damped as before,
    and the factors of the linears before and after its stage are left as they were."""
    model = toy.model.requires_grad_(False)
    layer = model.model.language_model.layers[1]
    batches = calib(toy, n=8)
    cfg = mgvq.resolve(mgvq.Config(method="gptq", sequential="linear"))
    gen = torch.Generator().manual_seed(0)
    H_I, _, _, mw, stages = mgvq.block_statistics(model, layer, batches, cfg, None, None, gen)
    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert stages == [attn, ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    lins = E.linears(layer)
    factors = {n: mgvq.damped_factors(lin, H_I[n], None, cfg, n) for n, lin in lins.items()}
    before = {n: f[1].clone() for n, f in factors.items()}

    class Moved(torch.nn.Module):                      # stands for a quantized linear: its output has moved
        def __init__(self, lin):
            super().__init__()
            self.weight, self.bias = lin.weight * 1.5, lin.bias

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)
    try:
        for n in attn:
            setattr(layer.self_attn, n.split(".")[1], Moved(lins[n]))
        mgvq.refresh_input_factors(model, layer, batches, cfg, None, gen, mw, factors, ["self_attn.o_proj"], "layer1",
                                   log=lambda m: None)
        xs = []
        with torch.no_grad(), E.hooked([lins["self_attn.o_proj"].register_forward_hook(lambda m, a, o: xs.append(a[0]))]):
            for batch in batches:
                E.forward(model, batch)
    finally:
        for n in attn:
            setattr(layer.self_attn, n.split(".")[1], lins[n])
    valid = torch.cat([(b["attention_mask"] > 0).reshape(-1) for b in batches])
    x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])[valid]
    want = x.T @ x / len(x)
    want.diagonal().add_(cfg.damp * want.diagonal().mean())
    got = factors["self_attn.o_proj"][1]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (before["self_attn.o_proj"] - want).abs().max() > 1e-2 * want.abs().max()   # it did move
    for n in attn + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:   # done, or refreshed at their own turn
        assert torch.equal(factors[n][1], before[n])


def test_damping_ladder_recovers_and_says_so():
    H = torch.zeros(6, 6)
    H[:3, :3] = torch.ones(3, 3)                      # rank one, and three dead inputs
    H[0, 1] = H[1, 0] = 1.5                           # indefinite
    W = torch.randn(4, 6)
    dead = mgvq.fix_dead_columns(H, W)
    assert dead == 3 and (W[:, 3:] == 0).all()
    said = []
    Hd, C = mgvq.damp_cholesky(H, 0.01, "test H", log=said.append)
    assert torch.allclose(C @ C.T, Hd, atol=1e-5)
    assert len(said) == 1 and "recovered" in said[0]


def test_nan_weight_is_refused():
    lin = torch.nn.Linear(256, 8, bias=False)
    lin.weight.data[0, 0] = float("nan")
    cfg = mgvq.resolve(mgvq.Config(method="gptvq"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        mgvq.damped_factors(lin, torch.eye(256), None, cfg, "lin")


SMALL = dict(nsamples=16, kmeans_iters=6, trial_iters=3, qig_steps=2, eval_n=40)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """One small end-to-end MGVQ run on the toy, saved as a user's real model is: the toy copied into a folder
    of its own (my-vlm), no --out, so the run saves to ./my-vlm-mgvq-2bit; with the Q that each layer's quantizer
    computed (the codebook refit's output), in the order of the report's layers."""
    work = tmp_path_factory.mktemp("q")
    shutil.copytree(E.TOY_DIR, work / "my-vlm")
    vlm = E.load_model("toy", device="cpu")
    computed, refit = [], mgvq.refit_codebooks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mgvq, "refit_codebooks", lambda *a, **k: computed.append(refit(*a, **k)) or computed[-1])
        mp.chdir(work)
        report = mgvq.run(mgvq.Config(model=str(work / "my-vlm"), method="mgvq", **SMALL), log=lambda *a: None,
                          vlm=vlm)
    return vlm, report, work / "my-vlm-mgvq-2bit", computed


def test_end_to_end_report_and_honest_bits(quantized):
    vlm, r, out, _ = quantized
    for key in ("method", "bits_per_weight", "bits_per_weight_model", "accuracy_fp", "accuracy_q", "seconds", "peak_mem_gb"):
        assert key in r
    assert 1.9 < r["bits_per_weight"] <= 2.25
    # recount from the saved buffers: packed index bytes + int8 codebooks + fp16 scales over the weights
    bits = weights = 0
    for mod in vlm.model.modules():
        if isinstance(mod, VQLinear):
            for name, buf in mod.named_buffers():
                kind = name.split("_")[0]
                bits += buf.numel() * {"codes": 8, "codebook": 8, "scale": 16}.get(kind, 0)
            weights += mod.in_features * mod.out_features
    assert abs(bits / weights - r["bits_per_weight"]) < 1e-12
    index_bits = sum(sum(b) * 128 * row["shape"][0] for b, row in ((row["bits"], row) for row in r["layers"]))
    assert index_bits == 2 * weights                  # the allocation spends exactly the budget
    assert r["accuracy_q"] >= 0.5                     # far above chance (1/3 on average) at 2 bits
    assert (out / "allocation.png").is_file() and (out / "mgvq.json").is_file()


def test_end_to_end_quality_on_the_toy(quantized):
    """What the run must show. Its KL(FP || Q) over the 40 eval questions' choices (kl_choices), measured on this
    toy with seed 0: 0.00165 with 2 threads, 0.00226 with 1 (float sums in another order move the codes a little), with
    agreement 1.0 both times; the band [0.0008, 0.003] fails a break that doubles it. (Other calibration seeds
    give 0.00025 to 0.010 on these 40 questions: the band is this run's, not the method's.) Every layer's
    proxy error ends below plain rounding to its own codebooks; the Newton step is taken (> 0) in every block
    after the first, where G != 0, and not in block 0, where G = 0, and the target W~ moves exactly where it
    is taken; each stored layer holds exactly the Q its quantizer computed."""
    vlm, r, out, computed = quantized
    assert 0.0008 <= r["kl_choices"] <= 0.003, r["kl_choices"]
    assert 0.0004 <= r["kl"] <= 0.0017, r["kl"]     # full vocabulary at the answer positions: 0.00086 measured, 2 threads
    assert r["agreement"] >= 0.95
    for row in r["layers"]:
        assert row["err"] < row["err_rtn"], row["name"]
        first = row["name"].startswith("model.language_model.layers.0.")
        assert (row["newton_step"] == 0) if first else (row["newton_step"] > 0), row["name"]
        assert (row["shift"] > 0) == (row["newton_step"] > 0), row["name"]          # a step taken moves W~
    assert len(computed) == len(r["layers"])
    for row, Q in zip(r["layers"], computed):
        assert torch.equal(vlm.model.get_submodule(row["name"]).dequantize(), Q.to(vlm.model.dtype)), row["name"]


def test_saved_model_loads_back_bit_for_bit(quantized):
    vlm, r, out, _ = quantized
    again = E.load_model(str(out), device="cpu")
    batch = vlm.batch(E.make_task("eval", 4))
    with torch.no_grad():
        a, b = E.forward(vlm.model, batch), E.forward(again.model, batch)
    assert torch.equal(a, b)
    result = E.qa_check(again, E.make_task("eval", 40))
    assert result["accuracy"] == r["accuracy_q"]


def test_sequential_linear_changes_only_the_layers_after_the_first_input():
    """The driver with --sequential linear: q/k/v, fed the block's input, come out as with block statistics;
    every later linear of the block is quantized under statistics re-collected behind them, so it differs."""
    rows = {}
    for seq in ("block", "linear"):
        r = mgvq.run(mgvq.Config(method="gptq", sequential=seq, max_blocks=1, **{**SMALL, "eval_n": 0}),
                     log=lambda *a: None)
        rows[seq] = {row["name"].split("layers.0.")[-1]: {k: v for k, v in row.items() if k != "seconds"}
                     for row in r["layers"]}
    assert rows["block"].keys() == rows["linear"].keys() and len(rows["block"]) == 7
    first = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}
    for name, row in rows["block"].items():
        assert (row == rows["linear"][name]) == (name in first), name


def test_same_command_gives_identical_codes_and_numbers(tmp_path):
    reports = []
    for k in range(2):
        r = mgvq.run(mgvq.Config(method="gptvq", out=str(tmp_path / f"r{k}"), max_blocks=1, **SMALL), log=lambda *a: None)
        reports.append(r)
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "r0" / "model.safetensors"), load_file(tmp_path / "r1" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keep = ("bits_per_weight", "accuracy_q", "agreement", "kl", "layers")
    assert [{k: v for k, v in l.items() if k != "seconds"} for l in reports[0]["layers"]] == \
           [{k: v for k, v in l.items() if k != "seconds"} for l in reports[1]["layers"]]
    assert all(reports[0][k] == reports[1][k] for k in keep[:-1])


@pytest.mark.parametrize("args, words", [
    (["--bits", "0"], "--bits must be"),
    (["--bits", "9"], "--bits must be"),
    (["--bits", "abc"], "invalid int value"),
    (["--bits", "2.5"], "invalid int value"),
    (["--d", "3"], "--d must be"),
    (["--method", "awq"], "--method must be"),
    (["--sequential", "layer"], "--sequential must be"),
    (["--model", "/nonexistent/folder"], "does not exist"),
    (["--calib", "/nonexistent/calib.jsonl"], "does not exist"),
])
def test_bad_input_one_line_and_nonzero_exit(args, words, capsys):
    assert mgvq.main(args + ["--eval-n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.strip().count("\n") == 0


def test_bad_calibration_files(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"image": "a.png", "conversations": [\n')
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                                          {"from": "gpt", "value": "a cat"}]}) + "\n")
    for path, words in ((empty, "holds no records"), (broken, "line 1 is not"), (missing, "missing or unreadable")):
        assert mgvq.main(["--calib", str(path), "--eval-n", "4"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.strip().count("\n") == 0


def test_out_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert mgvq.main(["--out", str(tmp_path / "full"), "--eval-n", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    assert mgvq.main(["--out", str(tmp_path / "file" / "out"), "--eval-n", "4"]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_interrupt_leaves_nothing_half_written(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(E, "draw_allocation", interrupted)         # Ctrl-C in the middle of writing --out
    out = tmp_path / "q"
    assert mgvq.main(["--method", "mgvq", "--out", str(out), "--max-blocks", "1", "--nsamples", "8",
                      "--kmeans-iters", "2", "--trial-iters", "2", "--qig-steps", "1", "--eval-n", "4"]) == 130
    assert not out.exists() and os.listdir(tmp_path) == []            # no temporary folder left either
    assert "nothing was written" in capsys.readouterr().err


def test_cli_subprocess_error_has_no_traceback():
    run = subprocess.run([sys.executable, str(ROOT / "mgvq.py"), "--model", "qwen2-vl-2b"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert "--model" in run.stderr and run.stderr.strip().count("\n") == 0


def test_newton_shift_damping_and_trust_scale():
    """The step solves with each factor damped by newton_damp of its mean diagonal; full step when the quadratic
    model predicts less than the measured KL, scaled to c = KL / predicted when it predicts more."""
    torch.manual_seed(7)
    lin = torch.nn.Linear(4, 3, bias=False)
    G = torch.randn(3, 4)
    cfg = mgvq.resolve(mgvq.Config(method="mgvq", newton_damp=0.5))
    eye = lambda k: torch.eye(k)
    curv = ((1 + cfg.damp) * (1 + cfg.newton_damp)) ** 2               # H_O = H_I = I, damped twice
    predicted = 0.5 * float((G ** 2).sum()) / curv
    for kl, c in ((10 * predicted, 1.0), (0.25 * predicted, 0.25)):
        factors = {"a": mgvq.damped_factors(lin, eye(4), eye(3), cfg, "a")}
        shifts = mgvq.newton_shifts(factors, {"a": G, "kl": kl}, cfg.alpha, cfg.newton_damp)
        assert torch.allclose(shifts["a"], -c * G / curv, atol=1e-6)


def test_line_search_on_the_calibration_kl(toy):
    """A shift that undoes a perturbation is taken whole and brings the KL back to ~0; one that makes it worse
    is refused (scale 0); the weights are restored either way."""
    model = toy.model.requires_grad_(False)
    batches = calib(toy, n=8)
    teacher, _ = mgvq.teacher_pass(model, batches, 64)
    lins = E.linears(model.model.language_model.layers[1])
    W = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    delta = {n: w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) for n, w in W.items()}
    for n, lin in lins.items():
        lin.weight.data = W[n] + delta[n]
    kl0 = mgvq.mean_kl(model, batches, teacher)
    assert kl0 > 1e-4
    scale, kl = mgvq.line_search(model, lins, {n: -d for n, d in delta.items()}, batches, teacher, kl0, 3)
    assert scale == 1.0 and kl < 1e-6
    scale, kl = mgvq.line_search(model, lins, delta, batches, teacher, kl0, 3)
    assert scale == 0.0 and kl == kl0
    for n, lin in lins.items():
        assert torch.equal(lin.weight, W[n] + delta[n])
        lin.weight.data = W[n]


def test_llava_calibration_jsonl(tmp_path):
    E.make_task("eval", 1)[0].image.save(tmp_path / "a.png")
    rec = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                               {"from": "gpt", "value": "a red circle"}]}
    (tmp_path / "calib.jsonl").write_text(json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    samples = mgvq.load_calib(mgvq.resolve(mgvq.Config(calib=str(tmp_path / "calib.jsonl"), nsamples=8)))
    assert len(samples) == 2 and samples[0].question == "Describe the image." and samples[0].answer == "a red circle"
    assert samples[0].image.size == (112, 112)


# --- a real run: calibration files as users have them, the saved folder, bad input caught up front

def llava_record(image="a.png", i=0, answer="a red circle"):
    rec = {"id": str(i), "conversations": [{"from": "human", "value": "What is in the picture?\n<image>"},
                                           {"from": "gpt", "value": answer},
                                           {"from": "human", "value": "And its colour?"},
                                           {"from": "gpt", "value": "red"}]}
    return rec if image is None else {**rec, "image": image}


def write_file(path: Path, content) -> str:
    """content: a JSON value (written as one JSON document), a list of lines (JSON lines) or raw text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, tuple):                                   # JSON lines
        path.write_text("\n".join(json.dumps(r) for r in content) + "\n")
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return str(path)


def coco(images=((1, "a.png"),), captions=((1, "A red circle."),)):
    return {"images": [{"id": i, "file_name": f} for i, f in images],
            "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)]}


def test_llava_json_array_multi_turn_text_only_and_image_folder(tmp_path, toy):
    """An array as LLaVA ships it; images relative to --image-folder; the first exchange of a multi-turn
    conversation, <image> taken out wherever it sits; a record without an image is a text-only chat sample."""
    (tmp_path / "imgs" / "coco").mkdir(parents=True)
    E.make_task("eval", 1)[0].image.save(tmp_path / "imgs" / "coco" / "a.png")
    path = write_file(tmp_path / "data" / "mix.json", [llava_record("coco/a.png"), llava_record(None, 1, "hello"),
                                                       llava_record(["coco/a.png"], 2)])
    samples = E.load_calibration(path, 8, image_folder=tmp_path / "imgs")
    by_answer = {s.answer: s for s in samples}
    assert len(samples) == 3 and set(by_answer) == {"a red circle", "hello"}
    assert all(s.question == "What is in the picture?" for s in samples)
    assert by_answer["hello"].image is None and by_answer["a red circle"].image.size == (112, 112)
    batch = toy.batch(samples)                                       # image and text-only samples in one batch
    assert int((batch["input_ids"] == toy.model.config.image_token_id).sum()) == 2 * 16
    with pytest.raises(E.DataError, match="missing or unreadable"):  # default folder: the file's own
        E.load_calibration(path, 8)


def test_calibration_records_are_drawn_by_a_seeded_shuffle(tmp_path):
    E.make_task("eval", 1)[0].image.save(tmp_path / "a.png")
    path = write_file(tmp_path / "c.jsonl", tuple(llava_record(i=i, answer=f"answer {i}") for i in range(40)))
    draw = lambda seed: [s.answer for s in E.load_calibration(path, 5, seed)]
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert draw(0) != [f"answer {i}" for i in range(5)] and len(set(draw(0))) == 5


def test_coco_captions(tmp_path):
    E.make_task("eval", 1)[0].image.save(tmp_path / "b.png")
    data = coco(images=((1, "b.png"), (2, "b.png"), (3, "unused.png")),
                captions=((1, " A red circle. "), (2, "Two shapes."), (1, "A second caption.")))
    path = write_file(tmp_path / "annotations" / "captions_train2017.json", data)
    samples = E.load_calibration(path, 8, image_folder=tmp_path)
    assert sorted(s.answer for s in samples) == ["A red circle.", "Two shapes."]   # one caption per image, the first
    assert all(s.question == E.COCO_PROMPT and s.image.size == (112, 112) for s in samples)


def test_real_model_on_synthetic_shapes_warns_once():
    said = []
    mgvq.load_calib(mgvq.resolve(mgvq.Config(model="qwen2-vl-2b", nsamples=2)), log=said.append)
    assert len(said) == 1 and said[0].startswith("warning: ") and "--calib" in said[0]
    said.clear()
    mgvq.load_calib(mgvq.resolve(mgvq.Config(model="toy", nsamples=2)), log=said.append)
    assert said == []


def test_where_a_run_saves():
    """Real models save to ./<model>-<method>-<bits>bit unless --out or --no-save; the toy, the testbed and
    --random-init dry runs save only where --out says."""
    out = lambda **kw: mgvq.resolve(mgvq.Config(**kw)).out
    assert out(model="qwen2-vl-2b") == "Qwen2-VL-2B-Instruct-mgvq-2bit"
    assert out(model="/models/Qwen2-VL-7B-Instruct/", method="gptvq", bits=3) == "Qwen2-VL-7B-Instruct-gptvq-3bit"
    assert out(model="qwen2-vl-2b", no_save=True) is None and out(model="qwen2-vl-2b", out="q") == "q"
    assert out(model="toy") is None and out(model=str(E.TOY_DIR)) is None and out(model="testbed") is None
    assert out(model="qwen2-vl-2b", random_init=True) is None and out(model="toy", out="q") == "q"


def test_real_model_saves_by_default_with_ordinary_permissions(quantized):
    """The fixture's run (a real model as far as the CLI can tell, no --out) left exactly its folder behind,
    renamed into place, with the modes that os.mkdir and open give, not mkdtemp's 0700."""
    vlm, r, out, _ = quantized
    assert sorted(p.name for p in out.parent.iterdir()) == ["my-vlm", "my-vlm-mgvq-2bit"]
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "mgvq.json", "modeling_mgvq.py", "kernels.py"} <= names
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in out.iterdir())


def test_cli_prints_where_it_saves_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")                       # the model cannot be found: a late failure
    assert mgvq.main(["--model", "qwen2-vl-2b", "--nsamples", "2", "--eval-n", "4"]) == 2
    said = capsys.readouterr()
    assert f"saved to {tmp_path / 'Qwen2-VL-2B-Instruct-mgvq-2bit'}" in said.out and "warning: " in said.out
    assert said.err.startswith("error: ") and list(tmp_path.iterdir()) == []


LOAD_IN_PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForImageTextToText
folder, batch, out, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
with torch.no_grad():
    logits = model(**torch.load(batch), use_cache=False).logits
vq = sorted(n for n, m in model.named_modules() if type(m).__name__ == "VQLinear")
torch.save(dict(logits=logits, vq=vq, ours=[m for m in ("mgvq", "eval", "kernels") if m in sys.modules]), out)
"""


def test_saved_folder_loads_in_plain_transformers(quantized, tmp_path):
    """In a fresh process that imports nothing of this project, AutoModelForImageTextToText with
    trust_remote_code builds the saved model from the folder's own modeling_mgvq.py and kernels.py: the same
    VQLinear layers and the same logits as eval.load_model."""
    vlm, r, out, _ = quantized
    again = E.load_model(str(out), device="cpu")
    inputs = {k: v for k, v in vlm.batch(E.make_task("eval", 4)).items() if k != "labels"}
    torch.save(inputs, tmp_path / "batch.pt")
    with torch.no_grad():
        expected = again.model(**inputs, use_cache=False).logits
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    run = subprocess.run([sys.executable, "-c", LOAD_IN_PLAIN_TRANSFORMERS, str(out), str(tmp_path / "batch.pt"),
                          str(tmp_path / "got.pt"), str(torch.get_num_threads())],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = torch.load(tmp_path / "got.pt")
    assert got["ours"] == [] and got["vq"] == sorted(r["layouts"])
    assert torch.equal(got["logits"], expected)


def bad_llava(tmp, records, name="calib.json"):
    E.make_task("eval", 1)[0].image.save(tmp / "a.png")
    return ["--calib", write_file(tmp / name, records)]


def existing_default_out(tmp):
    write_file(tmp / "Qwen2-VL-2B-Instruct-mgvq-2bit" / "x", "keep")   # an earlier run's folder
    return ["--model", "qwen2-vl-2b"]


BAD_INPUT = [  # (what, args made in a fresh folder, words of the one-sentence error)
    ("array-missing-image", lambda t: bad_llava(t, [llava_record("nope.png")]), "record 1 (id 0): the image"),
    ("array-broken", lambda t: bad_llava(t, '[{"image": "a.png",\n'), "is not a valid JSON array"),
    ("array-empty", lambda t: bad_llava(t, []), "holds no records"),
    ("jsonl-bad-line", lambda t: bad_llava(t, json.dumps(llava_record()) + "\n{oops\n", "c.jsonl"),
     "line 2 is not valid JSON"),
    ("no-conversations", lambda t: bad_llava(t, [{"image": "a.png"}]), "has no conversations"),
    ("no-answer-turn", lambda t: bad_llava(t, [{"conversations": [{"from": "human", "value": "hi"}]}]),
     "no human turn followed by a gpt turn"),
    ("two-images", lambda t: bad_llava(t, [llava_record(["a.png", "a.png"])]), "must be one path"),
    ("not-an-image", lambda t: bad_llava(t, [llava_record("calib.json")]), "missing or unreadable"),
    ("coco-no-annotations", lambda t: bad_llava(t, coco(captions=())), "holds no captions"),
    ("coco-unknown-image", lambda t: bad_llava(t, coco(captions=((7, "x"),))), "image id 7 is not among"),
    ("coco-missing-file", lambda t: bad_llava(t, coco(images=((1, "gone.jpg"),))), "missing or unreadable"),
    ("no-image-folder", lambda t: bad_llava(t, [llava_record()]) + ["--image-folder", str(t / "nope")],
     "image folder"),
    ("no-calib-file", lambda t: ["--calib", str(t / "nope.json")], "does not exist"),
    ("out-unwritable", lambda t: ["--out", "/proc/forbidden"], "cannot write into /proc"),
    ("out-under-a-file", lambda t: ["--out", write_file(t / "file", "") + "/out"], "cannot write into"),
    ("out-not-empty", lambda t: ["--out", str(Path(write_file(t / "full" / "x", "keep")).parent)], "already exists"),
    ("default-out-exists", lambda t: existing_default_out(t), "already exists"),
    ("out-and-no-save", lambda t: ["--out", str(t / "q"), "--no-save"], "opposite"),
    ("unknown-method", lambda t: ["--method", "awq"], "--method must be"),
    ("d-3", lambda t: ["--d", "3"], "--d must be"),
    ("alpha-not-a-number", lambda t: ["--alpha", "big"], "invalid float value"),
    ("nsamples-0", lambda t: ["--nsamples", "0"], "--nsamples must be at least 1"),
]


@pytest.mark.parametrize("make, words", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_bad_input_fails_up_front_in_one_sentence(make, words, tmp_path, monkeypatch, capsys):
    """Each bad input: one sentence on stderr, exit status 2, no traceback, before the model loads (loading
    fails the test), and the folder exactly as it was (no temporary output folder left behind)."""
    monkeypatch.chdir(tmp_path)
    args = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    for loader in ("load_model", "random_init_model"):
        monkeypatch.setattr(E, loader, lambda *a, **k: pytest.fail("the model was loaded"))
    assert mgvq.main(args + ["--eval-n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and err.strip().count("\n") == 0, err
    assert "Traceback" not in err and sorted(tmp_path.rglob("*")) == before
