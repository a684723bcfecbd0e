"""MGVQ: sensitivity-guided mixed-precision vector quantization with gradient-Hessian compensation,
for vision-language models (Qwen2-VL). A read-along reference implementation.

The file follows the pipeline of the README's "Method" section, top to bottom:
  config -> calibration data -> calibration statistics -> vector quantization (Block-LDL sweep)
  -> gradient-Hessian compensation (Newton-shifted target) -> sensitivity -> bit allocation
  -> driver (block by block) -> CLI (one run, the ablation).
What is not the algorithm (calibration files, the model's hooks and forward, saving, the report) is in eval.py.
Symbols: a linear y = W x with W (m, n); VQ vectors are d consecutive columns of one row; a codebook
has K = 2^(b*d) codewords; T calibration tokens. H_I = E[x x^T] (n, n), H_O = E[g g^T] (m, m),
G = dKL/dW (m, n). The paper's body is not public: the choices the abstracts leave open are ours and
are listed in the README.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import eval as qa
from kernels import VQLinear, transformers_error


# --- config

@dataclass
class Config:
    model: str = "toy"                 # toy, testbed, qwen2-vl-2b, qwen2-vl-7b, a Hub id or a local folder
    bits: int = 2                      # average index bits per weight
    method: str = "mgvq"               # rtn | gptq | gptvq | mgvq (sets the switches below left at None)
    d: int | None = None               # VQ vector length (2 for VQ, 1 for the scalar baselines)
    group_size: int | None = None      # columns per group: one bit-width and one codebook per (group x row tile)
    alloc: str | None = None           # uniform | sensitivity (structured mixed precision)
    grad: str | None = None            # gradient-Hessian fusion: none | kl (Newton-shifted target from the end-to-end
                                       # KL gradient under H_O (x) H_I) | drift (from the layer's own output drift
                                       # under H_I); both weigh the rows by diag(H_O)
    alpha: float = 1.0                 # step of the Newton shift
    newton_damp: float = 1.0           # relative damping of each Kronecker factor in the Newton solve
    line_search: int = 3               # backtracking tries of the Newton step on the calibration KL
    token_weights: str | None = None   # none | modality | qig
    feedback: str | None = None        # ldl (exact block metric) | diag (GPTVQ's per-coordinate metric) | none
    sequential: str = "block"          # block: H_I collected once per block | linear: re-collected before each group
                                       # of linears fed one input (q/k/v, o, gate/up, down), earlier ones quantized
    calib: str = "synthetic"           # built-in set (the testbed's: its calib split, scenes + text), or a file:
                                       # LLaVA / ShareGPT4V JSON array or JSON lines, or COCO captions JSON
    image_folder: str | None = None    # where the calibration file's relative image paths start (default: its folder)
    nsamples: int | None = None        # calibration samples (64 for the toy and the testbed, 128 for real models)
    batch_size: int = 4                # calibration samples per forward (backward activations scale with it)
    seed: int = 0                      # calibration sampling and k-means initialisation
    damp: float = 0.01                 # relative damping of H_I and H_O (x10 retries, fp64 last)
    kmeans_iters: int = 25             # weighted k-means iterations per codebook
    trial_iters: int = 6               # k-means iterations of the quick trial VQ (sensitivity)
    codebook_overhead: float | None = None  # codebook + scale bits per weight allowed when choosing tile rows
                                       # (gptvq 0.2: 16 rows at 2 bits; mgvq 0.075: every tile 16 rows or more)
    joint_bits: int | None = None      # a group whose index has more bits (b*d) gets a scalar codebook per
                                       # coordinate (mgvq: 4, so 3-bit d=2 groups have 2 x 8 entries, not 64)
    qig_steps: int = 8                 # integration steps of QIG's path from the quantized input to the FP one
    teacher_topk: int = 64             # FP answer log-probabilities kept per token for the KL
    quantize_vision: bool = False      # also quantize the vision tower's blocks
    max_blocks: int | None = None      # stop after N blocks (dry runs; the rest stays full precision)
    random_init: bool = False          # a published model size with random weights, no download (dry runs)
    eval_n: int | None = None          # held-out questions for the check (480 on the testbed, else 200; 0: skip it)
    out: str | None = None             # the saved model (real models default to ./<model>-<method>-<bits>bit)
    no_save: bool = False              # a real model's run without a saved folder
    device: str = "auto"               # auto | cpu | cuda
    dtype: str = "auto"                # auto | float32 | bfloat16 | float16


# What each --method switches on; an explicit flag overrides its row (the ablation flips one at a time).
METHODS = {
    "rtn":   dict(d=1, group_size=256, alloc="uniform", grad="none", token_weights="none", feedback="none", joint_bits=12,
                 codebook_overhead=0.2),
    "gptq":  dict(d=1, group_size=256, alloc="uniform", grad="none", token_weights="none", feedback="ldl", joint_bits=12,
                 codebook_overhead=0.2),
    "gptvq": dict(d=2, group_size=128, alloc="uniform", grad="none", token_weights="none", feedback="diag", joint_bits=12,
                 codebook_overhead=0.2),
    "mgvq":  dict(d=2, group_size=128, alloc="sensitivity", grad="kl", token_weights="qig", feedback="ldl", joint_bits=4,
                 codebook_overhead=0.075),
}


def resolve(cfg: Config) -> Config:
    """Fill the switches left at None from the method's row, then check the whole config."""
    if cfg.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    for k, v in METHODS[cfg.method].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if not 1 <= cfg.bits <= 8:
        raise ValueError(f"--bits must be an integer from 1 to 8, not {cfg.bits}")
    if cfg.d not in (1, 2, 4) or cfg.group_size % cfg.d or cfg.group_size * cfg.bits % 8:
        raise ValueError(f"--d must be 1, 2 or 4 and divide --group-size ({cfg.group_size}), not {cfg.d}")
    if cfg.bits * cfg.d > 12:
        raise ValueError(f"codebooks of 2^(bits*d) = 2^{cfg.bits * cfg.d} codewords are too large")
    if not cfg.codebook_overhead > 0:
        raise ValueError(f"--codebook-overhead must be a positive number of bits per weight, not {cfg.codebook_overhead}")
    if not 1 <= cfg.joint_bits <= 12:
        raise ValueError(f"--joint-bits must be an integer from 1 to 12, not {cfg.joint_bits}")
    scalar = cfg.method in ("rtn", "gptq")
    if scalar and cfg.d != 1:
        raise ValueError(f"--method {cfg.method} is scalar: it needs --d 1")
    for k, ok in (("alloc", ("uniform", "sensitivity")), ("grad", ("none", "drift", "kl")),
                  ("token_weights", ("none", "modality", "qig")),
                  ("feedback", ("ldl", "diag", "none")), ("sequential", ("block", "linear"))):
        if getattr(cfg, k) not in ok:
            raise ValueError(f"--{k.replace('_', '-')} must be one of {', '.join(ok)}")
    if cfg.nsamples is None:
        cfg.nsamples = 64 if cfg.model == "toy" or qa.is_testbed(cfg.model) else 128
    if cfg.nsamples < 1:
        raise ValueError(f"--nsamples must be at least 1, not {cfg.nsamples}")
    if cfg.eval_n is None:
        cfg.eval_n = 480 if qa.is_testbed(cfg.model) else 200
    if cfg.out and cfg.no_save:
        raise ValueError("--out and --no-save ask for opposite things: pass one of them")
    if cfg.out is None and not cfg.no_save and is_real(cfg):            # as quantization tools do: never lose a run
        name = Path(qa.ALIASES.get(cfg.model, cfg.model)).expanduser().resolve().name
        cfg.out = f"{name}-{cfg.method}-{cfg.bits}bit"
    return cfg


def is_real(cfg: Config) -> bool:
    """A published or user's model with its own weights: not the toy, the testbed or a --random-init dry run."""
    return not (qa.is_toy(cfg.model) or qa.is_testbed(cfg.model) or cfg.random_init)


def bit_choices(cfg: Config) -> list[int]:
    """Candidate bit-widths of a column group: {b-1, b, b+1} for mixed precision, {b} otherwise."""
    if cfg.alloc == "uniform":
        return [cfg.bits]
    return [b for b in (cfg.bits - 1, cfg.bits, cfg.bits + 1) if 1 <= b and b * cfg.d <= 12]


def per_coordinate(bits: int, d: int, joint_bits: int) -> bool:
    """Whether a group of this bit-width gets d scalar codebooks of 2^bits values (their product is its
    codebook) instead of one joint codebook of 2^(bits*d) codewords: when its index is longer than joint_bits.
    Our choice for mgvq (README): the joint codebooks of 3-bit d = 2 have 64 codewords, which the fast kernel can
    only gather (slow on CPU); 16 or fewer it decodes in registers. gptvq keeps GPTVQ's joint codebooks."""
    return d > 1 and bits * d > joint_bits


def tile_rows_for(m: int, bits: int, d: int, group_size: int, overhead: float, joint_bits: int = 12) -> int:
    """Rows sharing one codebook: the smallest power of two t (dividing m) whose codebook
    (K*d int8 + one fp16 scale, K its stored entries) costs at most `overhead` bits per weight. Scalar grids: one row."""
    if d == 1:
        return 1
    K, t = 2 ** (bits if per_coordinate(bits, d, joint_bits) else bits * d), 1
    while (K * d * 8 + 16) / (group_size * t) > overhead and t < m and m % (2 * t) == 0:
        t *= 2
    return t


# --- calibration data

def load_calib(cfg: Config, log=print) -> list:
    """The calibration samples: the built-in synthetic set, or a user's file (eval.load_calibration)."""
    if cfg.calib != "synthetic":
        return qa.load_calibration(cfg.calib, cfg.nsamples, cfg.seed, cfg.image_folder)
    if is_real(cfg):
        log("warning: a real model calibrated on drawn shapes; pass --calib with a LLaVA or ShareGPT4V "
            "JSON/JSONL or COCO captions file (and --image-folder for its images)")
    if qa.is_testbed(cfg.model):
        return qa.testbed_calib(cfg.nsamples, seed=cfg.seed)
    return qa.make_task("calib", cfg.nsamples, seed=cfg.seed)


def kl_to_teacher(logits, teacher_b) -> torch.Tensor:
    """sum over loss positions of KL(p_FP || p_current) over the FP model's top-k tokens plus one bucket for all
    the others: zero, with zero gradient, at the FP model (a renormalised top-k is not), and a lower bound of the
    full KL. logits (N, V); teacher_b = (top-k ids (N, k), their FP log-probabilities (N, k))."""
    idx, logp = teacher_b
    logq = logits.log_softmax(-1).gather(1, idx)
    kl = (logp.exp() * (logp - logq)).sum()
    if idx.shape[1] == logits.shape[1]:                      # the top-k is the whole vocabulary: no rest
        return kl
    p_rest, q_rest = ((-torch.expm1(lp.logsumexp(-1))).clamp_min(0) for lp in (logp, logq))  # 1 - sum of top-k
    return kl + (torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest.clamp_min(1e-30))).sum()


@torch.no_grad()
def mean_kl(model, batches, teacher) -> float:
    """The mean KL(p_FP || p_current) over the calibration loss positions."""
    n_pos = sum(int(qa.loss_mask(b).sum()) for b in batches)
    return sum(float(kl_to_teacher(qa.answer_logits(model, b), tb)) for b, tb in zip(batches, teacher)) / n_pos


def sampled_nll(logits, gen) -> torch.Tensor:
    """-sum log q(y) with y drawn from the model's own distribution: its gradients' second moment is the
    Fisher (K-FAC / YAQA), while their mean is zero."""
    y = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)
    return -logits.log_softmax(-1).gather(1, y).sum()


@torch.no_grad()
def teacher_pass(model, batches, topk: int, keep_inputs_of=(), folder: str | None = None):
    """The FP model's answer distributions (top-k log-probabilities) and, for QIG, the FP inputs of some blocks,
    streamed to `folder` one file per (block, batch) and returned as paths: at real size they do not fit in
    memory (28 blocks x 128 samples x ~300 tokens x 1536 bf16 = 3.3 GB)."""
    teacher, inputs = [], {i: [] for i in range(len(keep_inputs_of))}

    def spill(mod, args, i):
        inputs[i].append(os.path.join(folder, f"block{i}-batch{len(inputs[i])}.pt"))
        torch.save(args[0].detach().cpu(), inputs[i][-1])

    hooks = [b.register_forward_pre_hook(lambda mod, args, i=i: spill(mod, args, i)) for i, b in enumerate(keep_inputs_of)]
    with qa.hooked(hooks):
        for batch in tqdm(batches, desc="teacher", leave=False):
            logp = qa.answer_logits(model, batch).log_softmax(-1)
            val, idx = logp.topk(min(topk, logp.shape[-1]), dim=-1)
            teacher.append((idx, val))
    return teacher, inputs


# --- calibration statistics

def hessian_add(S: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor | None = None):
    """S += sum_t w_t y_t x_t^T (y = x: the second moment), accumulated in fp32 (bf16 outer products lose the
    small directions)."""
    x = x.detach().reshape(-1, x.shape[-1]).float()                    # (T, n); no autograd history in S
    y = x if y is None else y.detach().reshape(-1, y.shape[-1]).float()
    S.addmm_((y * w[:, None]).T, x)


@torch.no_grad()
def fp_linear_inputs(model, block, batch, h_fp) -> dict:
    """Every linear's input in `block` (still full precision) when the block is fed its FP input h_fp instead of
    the current model's: what the layer saw before anything upstream was quantized."""
    got = {}

    def stop(mod, args, out):
        raise qa.StopForward

    hooks = [block.register_forward_pre_hook(lambda mod, args: (h_fp.to(args[0].dtype),) + args[1:]),
             block.register_forward_hook(stop)]
    def grab(name):
        def hook(mod, args, out):
            got[name] = args[0].detach()
        return hook

    hooks += [m.register_forward_hook(grab(n)) for n, m in qa.linears(block).items()]
    with qa.hooked(hooks):
        try:
            qa.forward(model, batch)
        except qa.StopForward:
            pass
    return got


def damp_cholesky(H: torch.Tensor, rel: float, what: str, log=print):
    """Damp H in place by rel * mean(diag) and factor it (H = C C^T); on failure raise the damping x10 (three
    times), then retry in fp64. Returns (H, now damped, and lower C). Logs any recovery. In place because at
    real size a factor is up to 8960^2 fp32 (321 MB) and a block holds a dozen of them."""
    diag = H.diagonal().clone()
    mean = diag.mean().clamp_min(1e-12)
    for attempt, r in enumerate((rel, rel * 10, rel * 100, rel * 1000)):
        H.diagonal().copy_(diag + r * mean)
        for dt in ((H.dtype,) if attempt < 3 else (torch.float64,)):
            C, info = torch.linalg.cholesky_ex(H.to(dt))
            if info == 0 and torch.isfinite(C).all():
                if attempt:
                    log(f"  {what}: not positive definite at damping {rel:g}; recovered with {r:g}{' in fp64' if dt == torch.float64 else ''}")
                return H, C.to(H.dtype)
    raise RuntimeError(f"{what} is not positive definite even with damping {rel * 1000:g} in fp64")


def fix_dead_columns(H: torch.Tensor, W: torch.Tensor):
    """Inputs that never fire (zero diagonal) carry no information: set H_jj = 1 and zero W's column (GPTQ)."""
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return int(dead.sum())


def block_statistics(model, block, batches, cfg: Config, teacher, token_w, gen, fp_in=None, mw=None):
    """Kronecker factors of one block's linears, from the *current* model (earlier blocks quantized):
      H_I = sum_t w_t x_t x_t^T / sum_t w_t        one per input (q/k/v share theirs, gate/up theirs)
      H_O = sum_t g_t g_t^T / N                    g from a backward with sampled labels (Fisher), N loss positions
      G   = dKL(p_FP || p_current)/dW             --grad kl: mean over the N loss positions, from a second backward
    so that l(D) = <G, D> + 1/2 tr(H_O D H_I D^T) estimates the change of the mean KL (K-FAC: H ~ H_O (x) H_I).
    --grad drift instead: the layer's own loss 1/2 sum_t w_t |W x_fp,t - Q x_t|^2 / sum_t w_t (its FP output,
    reproduced from the drifted input x_t = x_fp,t - dx_t), exactly l(D) above with H_O = I and
      G   = -W R,   R = sum_t w_t dx_t x_t^T / sum_t w_t          (fp_in: the block's FP inputs, one file a batch)
    Token weights w_t: QIG (token_w), or per modality the mean block-output gradient energy |g_t|^2; `mw`, the
    modality multipliers of an earlier call, skips the backward (--sequential linear: H_I alone, re-collected).
    Also returns the block's linears grouped by the input they are fed, in the order they are fed."""
    lins = qa.linears(block)
    fisher = mw is None and (cfg.grad != "none" or cfg.token_weights != "none")
    S, R, SO, share, seen = {}, {}, {name: 0.0 for name in lins}, {}, {}
    folds = 1 if fp_in is None else 2                      # drift: odd and even batches apart, to choose its damping
    energy, count = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    ctx = {}

    def on_linear(name):
        def hook(mod, args, out):
            x = args[0]
            if ctx["fp_run"]:
                return
            if name not in share:                          # first batch: who else is fed this very tensor?
                share[name] = next((k for k, t in seen.items() if t is x), name)
                seen[name] = x
            if share[name] == name and ctx["collect"]:
                img, valid = qa.token_tags(ctx["batch"], x)
                w = valid.float() * (ctx["w"] if ctx["w"] is not None else 1.0)
                new = lambda: ([torch.zeros(x.shape[-1], x.shape[-1], device=x.device) for _ in range(2)]
                               + [torch.zeros(2, dtype=torch.float64)])
                acc = S.setdefault(name, [new() for _ in range(folds)])[ctx["fold"]]   # [text, image, weights]
                hessian_add(acc[0], x, w * ~img)           # text tokens
                hessian_add(acc[1], x, w * img)            # image tokens
                acc[2] += torch.stack([(w * ~img).sum(), (w * img).sum()]).double().cpu()
                if ctx["fp"] is not None:                  # drift: R = sum_t w_t (x_fp - x)_t x_t^T, per modality
                    dx = ctx["fp"][name].float() - x.detach().float()
                    r = R.setdefault(name, [new()[:2] for _ in range(folds)])[ctx["fold"]]
                    hessian_add(r[0], x, w * ~img, dx)
                    hessian_add(r[1], x, w * img, dx)
            if cfg.grad != "none" and ctx["fisher"] and out.requires_grad:
                def on_grad(g, name=name):
                    g = g.detach().reshape(-1, g.shape[-1]).float()
                    SO[name] = SO[name] + g.T @ g
                out.register_hook(on_grad)
        return hook

    def on_block(mod, args, out):                          # per-modality gradient energy at the block output
        if ctx["fp_run"]:
            return
        if ctx["fisher"] and out.requires_grad:
            img, valid = qa.token_tags(ctx["batch"], out)

            def on_grad(g):
                e = g.float().pow(2).sum(-1).reshape(-1) * valid
                energy.add_(torch.stack([e[~img].sum(), e[img].sum()]).double().cpu())
                count.add_(torch.stack([(valid & ~img).sum(), (valid & img).sum()]).double().cpu())
            out.register_hook(on_grad)
        elif not fisher:
            raise qa.StopForward                              # H_I only: the rest of the model is not needed

    params = [m.weight for m in lins.values()]
    hooks = [m.register_forward_hook(on_linear(n)) for n, m in lins.items()] + [block.register_forward_hook(on_block)]
    n_pos = sum(int(qa.loss_mask(b).sum()) for b in batches)
    with qa.hooked(hooks):
        for i, batch in enumerate(batches):                # pass 1: H_I (and H_O with sampled labels)
            ctx["fp_run"] = True                           # these hooks stand aside while the FP inputs are made
            fp = None if fp_in is None else fp_linear_inputs(model, block, batch, torch.load(fp_in[i]))
            ctx.update(batch=batch, collect=True, fisher=fisher, w=None if token_w is None else token_w[i], fp=fp,
                       fp_run=False, fold=i % folds)
            if fisher:
                with torch.enable_grad():
                    for p in params:
                        p.requires_grad_(True)
                    sampled_nll(qa.answer_logits(model, batch), gen).backward()
            else:
                try:
                    with torch.no_grad():
                        qa.forward(model, batch)
                except qa.StopForward:
                    pass
        G = {}
        if cfg.grad == "kl":                               # pass 2: G = d mean KL / dW
            ctx.update(collect=False, fisher=False)
            for p in params:
                p.grad = None
            kl = 0.0
            with torch.enable_grad():
                for batch, tb in zip(batches, teacher):
                    ctx["batch"] = batch
                    loss = kl_to_teacher(qa.answer_logits(model, batch), tb) / n_pos
                    loss.backward()
                    kl += float(loss.detach())
            G = {n: m.weight.grad.float().clone() for n, m in lins.items()}
            G["kl"] = kl                                   # the mean KL itself, for the trust scale
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    if mw is None:
        mw = torch.ones(2, dtype=torch.float64)            # modality multipliers [text, image]
    if fisher and token_w is None and cfg.token_weights != "none" and (count > 0).all():
        mw = energy / count
    H_I = {}
    if fp_in is not None:
        G["damp"] = {}
    for name in lins:
        parts = S[share[name]]                             # per fold: [text, image, weights]
        norms = [float((mw * n_tok).sum()) for _, _, n_tok in parts]
        H_f = [mw[0] * S_txt + mw[1] * S_img for S_txt, S_img, _ in parts]
        H_I[name] = sum(H_f) / sum(norms)
        if fp_in is not None:                              # --grad drift: G = -W R
            W = lins[name].weight.detach().float()
            R_f = [mw[0] * R_txt + mw[1] * R_img for R_txt, R_img in R[share[name]]]
            G[name] = -W @ (sum(R_f) / sum(norms))
            G["damp"][name] = drift_damping(W, [h / z for h, z in zip(H_f, norms)], [r / z for r, z in zip(R_f, norms)],
                                            cfg.damp)
    H_O = {n: (SO[n] / n_pos if cfg.grad != "none" else None) for n in lins}
    stages = {}
    for name in seen:                                      # first-fed order
        stages.setdefault(share[name], []).append(name)
    return H_I, H_O, G, mw, list(stages.values())


def refresh_input_factors(model, block, batches, cfg: Config, token_w, gen, mw, factors: dict, stage: list,
                          bname: str, log=print):
    """--sequential linear ("true-sequential", as reference GPTQ code does): H_I of the linears of `stage`,
    re-collected with the linears before them quantized, replaces theirs in `factors`; H_O, G and the shift stay
    those of the block's first pass."""
    h_only = replace(cfg, grad="none")
    H_I, lins = block_statistics(model, block, batches, h_only, None, token_w, gen, mw=mw)[0], qa.linears(block)
    for n in stage:
        W, H, _ = damped_factors(lins[n], H_I[n], None, h_only, f"{bname}.{n}", log)
        factors[n] = (W, H, factors[n][2])


# --- token weights (QIG)

def integrated_gradients(loss_fn, h, h_q, steps: int) -> torch.Tensor:
    """QIG attribution of each token: |(h_t - h_q,t) . (1/S) sum_s dloss/dh_t at h_q + (s/S)(h - h_q)|
    (Riemann sum of the path integral from the quantized input h_q to the FP input h). h, h_q (..., T, n) -> (..., T)."""
    total = torch.zeros_like(h)
    for s in range(1, steps + 1):
        z = (h_q + s / steps * (h - h_q)).detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(loss_fn(z), z)
        total += gz
    return ((h - h_q) * total / steps).sum(-1).abs()


def normalise_weights(a: torch.Tensor, valid: torch.Tensor, clip: float = 20.0) -> torch.Tensor:
    """Token weights with mean 1 over the valid tokens (so they sum to the token count), clipped to
    [1/clip, clip] before the final renormalisation so that no token is dropped or dominates."""
    a = a * valid
    w = (a / a[valid].mean().clamp_min(1e-30)).clamp(1 / clip, clip) * valid
    return w * valid.sum() / w.sum()


def qig_token_weights(model, block, batches, fp_inputs, steps: int) -> list[torch.Tensor]:
    """Token-level weights for H_I from quantization-aware integrated gradients (seed QIG): the answer loss
    attributed to each token's block input along the path from the current model's input to the FP one.
    fp_inputs: the files of this block's FP inputs, one per batch (teacher_pass)."""
    attrs = []
    for batch, path in zip(batches, fp_inputs):
        h, h_q = torch.load(path), qa.block_input(model, block, batch).float()
        labels = batch["labels"][:, 1:][qa.loss_mask(batch)]

        def loss_fn(z):                                   # the answer loss with z injected as this block's input
            inject = block.register_forward_pre_hook(lambda mod, args: (z.to(args[0].dtype),) + args[1:])
            with qa.hooked([inject]):
                return F.cross_entropy(qa.answer_logits(model, batch), labels, reduction="sum")

        attrs.append(integrated_gradients(loss_fn, h.to(h_q.device).float(), h_q, steps))
    valid = torch.cat([(b["attention_mask"] > 0).reshape(-1) for b in batches])
    w = normalise_weights(torch.cat([a.reshape(-1) for a in attrs]), valid)
    return list(w.split([a.numel() for a in attrs]))


# --- vector quantization

def block_ldl(H: torch.Tensor, d: int):
    """Block LDL: H = L D L^T, L unit block-lower-triangular (n, n), D block-diagonal as (n/d, d, d).
    From the Cholesky H = C C^T: L = C blockdiag(C_kk)^-1, D_k = C_kk C_kk^T (QuIP#'s BlockLDLQ)."""
    n = H.shape[0]
    assert n % d == 0, f"n = {n} is not a multiple of d = {d}"
    C = torch.linalg.cholesky(H)
    nb = n // d
    Ckk = C.reshape(nb, d, nb, d).diagonal(dim1=0, dim2=2).permute(2, 0, 1)     # (nb, d, d) diagonal blocks
    eye = torch.eye(d, dtype=H.dtype, device=H.device).expand(nb, d, d)
    Ckk_inv = torch.linalg.solve_triangular(Ckk, eye, upper=False)               # (nb, d, d)
    L = torch.einsum("ika,kab->ikb", C.reshape(n, nb, d), Ckk_inv).reshape(n, n)
    return L, Ckk @ Ckk.transpose(1, 2)


def sweep_factors(H: torch.Tensor, d: int):
    """H = U D U^T with U unit block-UPPER-triangular: then the error of block k is fed only to later blocks,
    so the sweep runs first to last as GPTQ does. (With a lower L it would have to run last to first.)
    Obtained as block_ldl of the index-reversed H, reversed back."""
    L, D = block_ldl(H.flip(0, 1), d)
    return L.flip(0, 1), D.flip(0).flip(1, 2)


def nearest(X: torch.Tensor, C: torch.Tensor, D: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Index of the codeword nearest to each vector under the quadratic metric of its position:
    argmin_c (x - c) D_p (x - c)^T = argmin_c c D_p c^T - 2 x D_p c^T.  X (R, t, P, d) vectors of R tiles,
    C (R, K, d) a codebook per tile, D (P, d, d) or per tile (R, P, d, d) a metric per vector position -> (R, t, P)."""
    R, t, P, d = X.shape
    K = C.shape[1]
    m = "pab" if D.dim() == 3 else "rpab"                                     # shared or per-tile metric
    cDc = torch.einsum(f"rca,{m},rcb->rpc", C, D, C)                         # (R, P, K)
    XD = torch.einsum(f"rtpa,{m}->rtpb", X, D).reshape(R, t * P, d)           # (R, tP, d)
    step = max(1, chunk // max(1, t * P * K))
    out = []
    for r in range(0, R, step):                                               # bounded memory: (r, tP, K) at a time
        cost = torch.baddbmm(cDc[r:r + step, None].expand(-1, t, P, K).reshape(-1, t * P, K),
                             XD[r:r + step], C[r:r + step].transpose(1, 2), alpha=-2)
        out.append(cost.argmin(-1))
    return torch.cat(out).reshape(R, t, P)


def sample_rows(prob: torch.Tensor, gen) -> torch.Tensor:
    """One index per row drawn with probability proportional to prob (R, N) (inverse-CDF sampling)."""
    cdf = prob.cumsum(1)
    u = torch.rand(prob.shape[0], 1, generator=gen, device=prob.device, dtype=prob.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(prob.shape[1] - 1)[:, 0]


def codewords(Cq: torch.Tensor, scale: torch.Tensor, K: int) -> torch.Tensor:
    """All K codewords (R, K, d) of stored int8 codebooks Cq (R, Kc, d) and scales (R,): Cq itself when it is
    joint (Kc = K), else every combination of its per-coordinate values, coordinate e of codeword k being
    Cq[(k >> e*b) % Kc, e] with b = log2 Kc (K = Kc^d)."""
    R, Kc, d = Cq.shape
    C = Cq.float() * scale[:, None, None]
    if Kc == K:
        return C
    entry = per_coordinate_digits(torch.arange(K, device=Cq.device), Kc, K, d)   # (K, d)
    return torch.stack([C[:, entry[:, e], e] for e in range(d)], -1)


def per_coordinate_digits(codes: torch.Tensor, Kc: int, K: int, d: int) -> torch.Tensor:
    """codes (...) -> (..., d): the entry of the stored codebook that coordinate e of each codeword reads."""
    if Kc == K:
        return codes[..., None].expand(*codes.shape, d)
    b = Kc.bit_length() - 1
    return torch.stack([(codes >> (e * b)) % Kc for e in range(d)], -1)


def fit_codebook(X, D, s, bits: int, joint_bits: int, iters: int, gen) -> torch.Tensor:
    """The float codebooks of a group's tiles as stored: weighted k-means of the vectors (kmeans), either
    joint (R, 2^(bits*d), d) or, per_coordinate, one 1-D k-means per coordinate under the diagonal of the
    metric (R, 2^bits, d). The sweep then picks among all combinations under the full block metric."""
    d = X.shape[-1]
    if not per_coordinate(bits, d, joint_bits):
        return kmeans(X, D, s, 2 ** (bits * d), iters, gen)
    return torch.cat([kmeans(X[..., e:e + 1], D[..., e:e + 1, e:e + 1], s, 2 ** bits, iters, gen)
                      for e in range(d)], -1)


def int8_codebook(C: torch.Tensor):
    """Store codewords as int8 with one fp16 scale per codebook: C ~ scale * Cq. C (R, K, d)."""
    scale = (C.abs().amax(dim=(1, 2)) / 127).clamp_min(1e-8).half().float()     # (R,) exactly an fp16
    Cq = torch.round(C / scale[:, None, None]).clamp(-127, 127).to(torch.int8)
    return Cq, scale


def kmeans(X, D, s, K: int, iters: int, gen: torch.Generator):
    """Weighted k-means per tile, the vector of row i at position p weighted by the metric s_i D_p.
    Seeding: k-means++ under that metric. Update: c = (sum s D)^-1 sum s D x (exact for quadratic metrics).
    X (R, t, P, d), D (P, d, d) or per tile (R, P, d, d), s (R, t) -> codebooks (R, K, d)."""
    R, t, P, d = X.shape
    pts = X.reshape(R, t * P, d)
    M = (s[:, :, None, None, None] * D.expand(R, P, d, d)[:, None]).reshape(R, t * P, d, d)   # per-vector metric
    w = s[:, :, None].expand(R, t, P).reshape(R, t * P)
    C = torch.empty(R, K, d, dtype=X.dtype, device=X.device)
    C[:, 0] = pts[torch.arange(R), sample_rows(w + 1e-12, gen)]
    gap = torch.full((R, t * P), float("inf"), dtype=X.dtype, device=X.device)
    for c in range(1, K):
        diff = pts - C[:, c - 1:c]                                            # (R, tP, d)
        gap = torch.minimum(gap, torch.einsum("rpa,rpab,rpb->rp", diff, M, diff))
        prob = gap.clamp_min(0) * (w > 0)
        prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, w + 1e-12)
        C[:, c] = pts[torch.arange(R), sample_rows(prob, gen)]
    Mx = torch.einsum("rpab,rpb->rpa", M, pts)                                # (R, tP, d)
    eye = 1e-9 * torch.eye(d, dtype=X.dtype, device=X.device)
    a = None
    for _ in range(iters):
        a_new = nearest(X, C, D).reshape(R, t * P)
        if a is not None and torch.equal(a, a_new):
            break
        a = a_new
        A = torch.zeros(R, K, d * d, dtype=X.dtype, device=X.device).scatter_add_(   # sum of metrics per cluster
            1, a[:, :, None].expand(-1, -1, d * d), M.reshape(R, t * P, d * d)).reshape(R, K, d, d)
        v = torch.zeros(R, K, d, dtype=X.dtype, device=X.device).scatter_add_(       # sum of metric-weighted points
            1, a[:, :, None].expand(-1, -1, d), Mx)
        used = A.diagonal(dim1=2, dim2=3).sum(-1) > 0                         # (R, K); empty clusters stay
        C = torch.where(used[..., None], torch.linalg.solve_ex(A + eye, v)[0], C)   # no host sync (GPU)
    return C


def minmax_grid(X: torch.Tensor, K: int):
    """The scalar baselines' codebook: GPTQ's asymmetric uniform grid scale * (q - z), q = 0..K-1, with 0
    on the grid, one per tile (one row x one group). X (R, t, P, 1) -> int8 codebook (R, K, 1), scale (R,).
    The entries q - z are stored as int8: up to K = 128 every z in 0..K-1 fits, but K = 256 (8 bits) fits only
    as -128..127 (z = 128), so that grid is symmetric and a one-sided row uses half of it (127 steps)."""
    assert 2 <= K <= 256, f"an int8 scalar grid holds 2 to 256 values, not {K}"
    lo = X.amin(dim=(1, 2, 3)).clamp_max(0)
    hi = X.amax(dim=(1, 2, 3)).clamp_min(0)
    if K <= 128:
        scale = ((hi - lo) / (K - 1)).clamp_min(1e-8).half().float()
        z = torch.round(-lo / scale)
    else:
        scale = torch.maximum(hi / 127, -lo / 128).clamp_min(1e-8).half().float()
        z = torch.full_like(scale, 128.0)
    Cq = (torch.arange(K, device=X.device)[None] - z[:, None]).to(torch.int8)    # (R, K) entries q - z, no wrap
    return Cq[:, :, None], scale


def vq_sweep(Wt, U, D, group_bits, group_size: int, tile_rows: dict, fit, feedback: str = "ldl"):
    """Quantize the d-column blocks first to last; block k goes to the codeword nearest to its error-fed target
        T_k = W~_k + sum_{j<k} (W~_j - Q_j) U_jk        (METHOD 3c; H = U D U^T, U unit block-upper)
    under the block metric D_k (feedback 'diag': only its diagonal, GPTVQ's shortcut; 'none': no feedback).
    A group's codebooks are fit by `fit(X, D, K)` when the sweep reaches it (joint, or per coordinate: see
    `codewords`), on the optimum of its weights given the errors of the groups before, X_B = W~_B + E_A U_AB U_BB^-1:
    the targets T_B = W~_B + E_A U_AB that reach it first are only that optimum's first term, since the group's own
    columns will feed each other (X_B solves X_B = W~_B + E_A U_AB - (X_B - W~_B)(U_BB - I)). This X_B is the updated
    weight GPTQ fits a group's grid on.
    Wt (m, n) -> codes (m, n/d), Q (m, n), int8 codebooks and scales, one per column group."""
    m, n = Wt.shape
    d = D.shape[-1]
    P = group_size // d
    assert n % group_size == 0 and len(group_bits) == n // group_size, "groups do not tile the columns"
    metric = D if feedback == "ldl" else torch.diag_embed(D.diagonal(dim1=-2, dim2=-1))
    T = Wt.clone()                                                            # error-fed targets (m, n)
    Q = torch.empty_like(Wt)
    codes = torch.empty(m, n // d, dtype=torch.long, device=Wt.device)
    books, scales = [], []
    for g, b in enumerate(group_bits):
        c0, c1 = g * group_size, (g + 1) * group_size
        tr = tile_rows[b]
        R = m // tr
        X = T[:, c0:c1]                                                       # fed by the groups before only
        if feedback != "none":     # where the group's weights would go if it were not quantized (GPTQ's updated W):
            X = Wt[:, c0:c1] + torch.linalg.solve_triangular(         # W~_B + (T_B - W~_B) U_BB^-1
                U[c0:c1, c0:c1], X - Wt[:, c0:c1], upper=True, left=False, unitriangular=True)
        Cq, sc = fit(X.reshape(R, tr, P, d), metric[c0 // d:c1 // d], 2 ** (b * d))
        C = codewords(Cq, sc, 2 ** (b * d)).to(Wt.dtype)                      # (R, K, d) as stored
        books.append(Cq)
        scales.append(sc)
        for k in range(c0 // d, c1 // d):
            cols = slice(k * d, (k + 1) * d)
            a = nearest(T[:, cols].reshape(R, tr, 1, d), C, metric[k:k + 1])[:, :, 0]     # (R, tr)
            codes[:, k] = a.reshape(m)
            Q[:, cols] = torch.gather(C, 1, a[:, :, None].expand(R, tr, d)).reshape(m, d)
            if feedback != "none":                                            # feed the rest of the group now
                T[:, (k + 1) * d:c1] += (Wt[:, cols] - Q[:, cols]) @ U[cols, (k + 1) * d:c1]
        if feedback != "none":                                                # and the later groups once (lazy batch)
            T[:, c1:] += (Wt[:, c0:c1] - Q[:, c0:c1]) @ U[c0:c1, c1:]
    return codes, Q, books, scales


def dequant_group(codes_g, Cq, scale, tr: int, K: int | None = None):
    """Q of one column group from its codes (m, P), int8 codebooks (R, Kc, d) and scales (R,) -> (m, P*d).
    K: the number of codewords (2^(b*d); default Kc, a joint codebook)."""
    m, P = codes_g.shape
    R, Kc, d = Cq.shape
    C = codewords(Cq, scale, K or Kc)
    return torch.gather(C, 1, codes_g.reshape(R, tr * P, 1).expand(R, tr * P, d)).reshape(m, P * d)


def refit_codebooks(Wt, H, s, codes, books, scales, group_bits, group_size: int, tile_rows: dict):
    """With the codes fixed, move each group's codewords to the least-squares optimum of
        sum_i s_i (w~_i - q_i) H (w~_i - q_i)^T          (METHOD 3d; H = H_I damped, s = row weights)
    one Gauss-Seidel pass over the groups, the others held. A refit that does not lower the objective
    once rounded to int8 is dropped. Returns the new Q (m, n); books and scales are updated in place."""
    m, n = Wt.shape
    d = books[0].shape[-1]
    P = group_size // d
    Q = torch.cat([dequant_group(codes[:, g * P:(g + 1) * P], books[g], scales[g], tile_rows[b], 2 ** (b * d))
                   for g, b in enumerate(group_bits)], dim=1)
    for g, b in enumerate(group_bits):
        c0, c1, tr, K = g * group_size, (g + 1) * group_size, tile_rows[b], books[g].shape[1]   # K stored entries
        R = m // tr
        Y = s[:, None] * ((Wt - Q) @ H[:, c0:c1])                             # (m, gs) minus half the gradient
        digit = per_coordinate_digits(codes[:, g * P:(g + 1) * P], K, 2 ** (b * d), d)   # (m, P, d) entry read
        slot = (digit * d + torch.arange(d, device=Wt.device)).reshape(m, group_size)
        Hgg = H[c0:c1, c0:c1]
        gram, rhs = [], []
        step = max(1, (1 << 22) // (tr * group_size * K * d))                 # tiles per chunk, bounded memory
        for r in range(0, R, step):                                           # gram = sum_i s_i O_i^T Hgg O_i per tile
            rows = slice(r * tr, min(R, r + step) * tr)
            O = F.one_hot(slot[rows], K * d).to(Wt.dtype).reshape(-1, tr, group_size, K * d)   # (r, tr, gs, Kd)
            Z = torch.matmul(Hgg, O)                                          # Hgg O_i   (r, tr, gs, Kd)
            sw = s[rows].reshape(-1, tr, 1, 1)
            gram.append(torch.einsum("riqc,riqe->rce", O * sw, Z))
            rhs.append(torch.einsum("riqc,riq->rc", O, Y[rows].reshape(-1, tr, group_size)))
        gram, rhs = torch.cat(gram), torch.cat(rhs)
        ridge = 1e-6 * gram.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-12)
        step = torch.linalg.solve(gram + ridge * torch.eye(K * d, dtype=Wt.dtype, device=Wt.device), rhs)
        C = books[g].to(Wt.dtype) * scales[g][:, None, None] + step.reshape(R, K, d)
        Cq, sc = int8_codebook(C)
        Qg = dequant_group(codes[:, g * P:(g + 1) * P], Cq, sc, tr, 2 ** (b * d))
        delta = Qg - Q[:, c0:c1]                                              # change of this group's weights
        gain = 2 * (delta * Y).sum() - (s[:, None] * (delta @ Hgg) * delta).sum()
        if gain > 0:
            books[g], scales[g], Q[:, c0:c1] = Cq, sc, Qg
    return Q


def round_to(W, books, scales, group_bits, gs: int, tile_rows: dict, D):
    """Plain nearest-codeword rounding of W to the given codebooks, no feedback (the 'before' figure)."""
    m, n = W.shape
    d = books[0].shape[-1]
    P = gs // d
    out = []
    for g, b in enumerate(group_bits):
        tr = tile_rows[b]
        K = 2 ** (b * d)
        a = nearest(W[:, g * gs:(g + 1) * gs].reshape(m // tr, tr, P, d), codewords(books[g], scales[g], K),
                    D[g * P:(g + 1) * P])                                     # (R, tr, P)
        out.append(dequant_group(a.reshape(m, P), books[g], scales[g], tr, K))
    return torch.cat(out, 1)


# --- gradient-Hessian compensation

def newton_target(W, G, H_O, H_I, alpha: float = 1.0):
    """W~ = W - alpha H_O^-1 G H_I^-1, the minimiser of the layer's second-order Taylor model
        l(Q) = <G, Q - W> + 1/2 tr(H_O (Q - W) H_I (Q - W)^T)        (METHOD 3b)
    Completing the square, l(Q) = 1/2 tr(H_O (Q - W~) H_I (Q - W~)^T) + const, so quantizing toward W~
    under the usual metric keeps the gradient term. Kronecker: (H_O (x) H_I)^-1 vec(G) = vec(H_O^-1 G H_I^-1),
    two Cholesky solves (m x m and n x n) instead of one (mn x mn) system. H_O, H_I: damped."""
    X = torch.cholesky_solve(G, torch.linalg.cholesky(H_O))                   # H_O^-1 G          (m, n)
    X = torch.cholesky_solve(X.T, torch.linalg.cholesky(H_I)).T               # H_O^-1 G H_I^-1   (m, n)
    return W - alpha * X


def proxy_loss(delta, H_I, G=None, H_O=None) -> float:
    """l(delta) = <G, delta> + 1/2 tr(H_O delta H_I delta^T); no H_O means H_O = I (GPTQ's layer objective)."""
    dH = delta @ H_I
    quad = (dH * (delta if H_O is None else H_O @ delta)).sum()
    return float((0.0 if G is None else (G * delta).sum()) + 0.5 * quad.detach())


def damped_factors(lin: nn.Linear, H_I, H_O, cfg: Config, what: str, log=print):
    """A layer's weight and damped curvature, computed once and used everywhere (target, metric, feedback):
    W (m, n) fp32 with dead input columns zeroed, damped H_I, and damped H_O when the gradient term is on.
    H_I and H_O are damped in place."""
    W = lin.weight.detach().float().clone()
    if not torch.isfinite(W).all():
        raise ValueError(f"{what} holds NaN or Inf weights")
    dead = fix_dead_columns(H_I, W)
    if dead:
        log(f"  {what}: {dead} dead input columns (zero curvature) set to zero")
    H = damp_cholesky(H_I, cfg.damp, f"{what} H_I", log)[0]
    H_Od = damp_cholesky(H_O, cfg.damp, f"{what} H_O", log)[0] if cfg.grad != "none" else None
    return W, H, H_Od


def tikhonov(H, rel: float):
    """H + rel * mean(diag H) * I, as a new matrix."""
    T = H.clone()
    T.diagonal().add_(rel * H.diagonal().mean())
    return T


def newton_shifts(factors: dict, G, alpha: float, damp: float) -> dict:
    """The Newton shifts W~ - W of a block's linears (METHOD 3b), with one trust scale for the block.
    The solve damps each Kronecker factor by `damp` of its mean diagonal (K-FAC's factored Tikhonov damping):
    with the metric's 1 % on each factor, directions where both factors are small stay damped by only 1e-4,
    and G, which K-FAC does not model well there, sends the step to 10^3-10^5 times the weights (measured on
    the toy). Under the steps the quadratic model predicts the mean KL to fall by sum_l 1/2 <G_l, W_l - W~_l>;
    a KL cannot fall below zero, so every step is scaled by c = min(1, KL / predicted). Both are our choices.
    factors: {name: (W, damped H_I, damped H_O)} from damped_factors."""
    shifts, gain = {}, 0.0
    for n, (W, H, H_Od) in factors.items():
        shifts[n] = newton_target(W, G[n], tikhonov(H_Od, damp), tikhonov(H, damp), alpha) - W
        gain -= 0.5 * float((G[n] * shifts[n]).sum())                      # 1/2 <G, S> >= 0 for alpha > 0
    c = min(1.0, G["kl"] / gain) if gain > 0 else 1.0
    return {n: c * s for n, s in shifts.items()}


DRIFT_DAMPING = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, math.inf)      # relative to mean diag H_I, beyond the metric's


def drift_loss(S, W, H, R) -> float:
    """The change of a layer's own loss, mean_t |W x_fp,t - (W + S) x_t|^2 - |W x_fp,t - W x_t|^2, from the
    tokens' moments H = mean x x^T and R = mean (x_fp - x) x^T: tr(S H S^T) - 2 <S, W R>."""
    return float(((S @ H) * S).sum() - 2 * (S * (W @ R)).sum())


def drift_damping(W, H_f: list, R_f: list, base: float) -> float:
    """The damping of a layer's drift shift, chosen by two-fold cross-validation on the calibration set (our
    choice): the shift S = W R_a (H_a + lam I)^-1 fitted on one half is scored on the other half's own loss,
    tr(S H_b S^T) - 2 <S, W R_b> (the change of sum |W x_fp - (W + S) x|^2, exact from b's moments), summed
    over both ways round (drift_loss); inf = no shift. The shift is a regression of the output drift on the input, with
    n^2 coefficients fitted on a few thousand tokens: undamped, it fits the calibration tokens' noise."""
    best, best_loss = math.inf, 0.0
    for lam in DRIFT_DAMPING[:-1]:
        loss = 0.0
        for a, b in ((0, 1), (1, 0)):                                  # fit on half a, score on half b
            A = tikhonov(H_f[a], base + lam)                           # base: the metric's damping (--damp)
            S = torch.cholesky_solve((W @ R_f[a]).T, torch.linalg.cholesky(A)).T
            loss += drift_loss(S, W, H_f[b], R_f[b])
        if loss < best_loss:
            best, best_loss = lam, loss
    return best


def drift_shifts(factors: dict, G) -> dict:
    """--grad drift: the minimiser of each layer's own loss, W~ - W = -G (H_I + lam I)^-1 = W R (H_I + lam I)^-1
    (GPTAQ's asymmetric target: quantize toward the weights that map the drifted inputs to the FP outputs), lam
    from drift_damping (inf: no shift). No trust scale or line search: that loss is exactly quadratic.
    factors: {name: (W, damped H_I, _)}."""
    return {n: (torch.zeros_like(W) if G["damp"][n] == math.inf else
                -torch.cholesky_solve(G[n].T, torch.linalg.cholesky(tikhonov(H, G["damp"][n]))).T)
            for n, (W, H, _) in factors.items()}


@torch.no_grad()
def line_search(model, lins: dict, shifts: dict, batches, teacher, kl0: float, tries: int):
    """Backtracking on the measured calibration KL (our choice): apply the block's shifts at scale 1, 1/4,
    1/16, ... to the unquantized weights and keep the first scale that lowers the KL below kl0; none (0)
    if no try does. The quadratic model is least reliable exactly where the Newton step goes."""
    W0 = {n: lin.weight.detach().clone() for n, lin in lins.items()}
    scale, kl = 1.0, kl0
    try:
        for _ in range(tries):
            for n, lin in lins.items():
                lin.weight.copy_(W0[n] + scale * shifts[n].to(W0[n].dtype))
            kl = mean_kl(model, batches, teacher)
            if kl < kl0:
                return scale, kl
            scale /= 4
        return 0.0, kl0
    finally:
        for n, lin in lins.items():
            lin.weight.copy_(W0[n])


# --- sensitivity

def trial_costs(W, h_diag, s, choices, group_size: int, d: int, tile_rows, iters: int, gen, joint_bits: int = 12):
    """Local and global sensitivity of every column group G at every candidate bit-width b, from a quick
    trial VQ (k-means per tile under the diagonal input curvature, no feedback):
        local   D_G(b)  = sum_{i, j in G} H_I[j,j] (W - Q_b)_ij^2               how hard G is to quantize
        global  dL_G(b) = 1/2 sum_i s_i sum_{j in G} H_I[j,j] (W - Q_b)_ij^2     s_i = H_O[i,i]: how much the loss cares
    All column groups of the layer go through k-means together, as tiles of one batch.
    W (m, n), h_diag (n,), s (m,) -> (local, global), each (n/group_size, len(choices))."""
    m, n = W.shape
    ng, P = n // group_size, group_size // d
    h = h_diag.reshape(ng, P, d)
    local, glob = torch.zeros(ng, len(choices)), torch.zeros(ng, len(choices))
    for c, b in enumerate(choices):
        tr = tile_rows(b)
        R = m // tr
        X = W.reshape(R, tr, ng, P, d).permute(2, 0, 1, 3, 4).reshape(ng * R, tr, P, d)   # every (group, tile)
        D = torch.diag_embed(h)[:, None].expand(ng, R, P, d, d).reshape(ng * R, P, d, d)  # diagonal metric
        rows = s.reshape(1, R, tr).expand(ng, R, tr).reshape(ng * R, tr)
        Cq, sc = int8_codebook(fit_codebook(X, D, rows, b, joint_bits, iters, gen))
        C = codewords(Cq, sc, 2 ** (b * d))                                   # (ng R, K, d)
        a = nearest(X, C, D).reshape(ng * R, tr * P, 1)
        Q = C.gather(1, a.expand(-1, -1, d)).reshape(ng, R, tr, P, d)
        err = (X.reshape(ng, R, tr, P, d) - Q) ** 2 * h[:, None, None]       # (ng, R, tr, P, d)
        local[:, c] = err.sum((1, 2, 3, 4)).cpu()
        glob[:, c] = 0.5 * (s.reshape(1, R, tr, 1, 1) * err).sum((1, 2, 3, 4)).cpu()
    return local, glob


# --- bit allocation

def allocate_bits(costs: torch.Tensor, sizes: torch.Tensor, choices: list[int], budget: int) -> torch.Tensor:
    """Structured mixed precision: one bit-width per column group minimising sum_g costs[g, b_g] subject to
    sum_g sizes[g] * b_g == budget (index bits). Lagrangian bisection on the price of a bit, then a greedy
    fill of what is left (best cost decrease per bit first) to land on the budget exactly when it can.
    costs (N, C) predicted loss increase, sizes (N,) weights per group, choices (C,) ascending -> (N,) indices."""
    costs, sizes = costs.double(), sizes.double()
    bits = torch.tensor(choices, dtype=torch.float64)
    per_weight = costs / sizes[:, None]

    def pick(price):                                                          # each group alone, given a price per bit
        return (per_weight + price * bits[None]).argmin(1)

    def used(a):
        return float((sizes * bits[a]).sum())

    lo, hi = 0.0, float(per_weight.abs().max()) * 2 + 1e-30
    for _ in range(200):                                                      # smallest price that fits the budget
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(pick(mid)) > budget else (lo, mid)
    a = pick(hi)
    while True:                                                               # spend the leftover, best ratio first
        left = budget - used(a)
        up = a + 1 < len(choices)
        extra = sizes * (bits[(a + 1).clamp_max(len(choices) - 1)] - bits[a])
        ok = up & (extra <= left + 0.5) & (extra > 0)
        if not ok.any():
            return a
        gain = costs[torch.arange(len(a)), a] - costs[torch.arange(len(a)), (a + 1).clamp_max(len(choices) - 1)]
        ratio = torch.where(ok, gain / extra, torch.tensor(-math.inf, dtype=torch.float64))
        a[int(ratio.argmax())] += 1


def sensitivity_allocation(model, blocks, batches, cfg: Config, gen, log=print):
    """Step 2: on the FP model, diag(H_I) per modality and diag(H_O) of every quantized linear from one
    forward + backward with sampled labels; trial VQ costs per column group and bit-width; the model-wide
    allocation. Returns {layer: [bits per group]} and {layer: sensitivities}."""
    stats, energy = {}, {}
    ctx = {}

    def on_linear(name):
        def hook(mod, args, out):
            x = args[0].detach()
            img, valid = qa.token_tags(ctx["batch"], x)
            x2 = x.float().pow(2).reshape(-1, x.shape[-1])
            st = stats.setdefault(name, dict(h=torch.zeros(2, x.shape[-1], device=x.device),
                                             n=torch.zeros(2, device=x.device), o=0.0))
            st["h"][0] += (x2 * (valid & ~img)[:, None]).sum(0)
            st["h"][1] += (x2 * (valid & img)[:, None]).sum(0)
            st["n"] += torch.stack([(valid & ~img).sum(), (valid & img).sum()]).float()

            def on_grad(g):
                st["o"] = st["o"] + g.float().pow(2).reshape(-1, g.shape[-1]).sum(0)
            out.register_hook(on_grad)
        return hook

    def on_block(bname):
        def hook(mod, args, out):
            img, valid = qa.token_tags(ctx["batch"], out)

            def on_grad(g):
                e = g.float().pow(2).sum(-1).reshape(-1) * valid
                acc = energy.setdefault(bname, torch.zeros(2, 2, dtype=torch.float64))
                acc += torch.tensor([[e[~img].sum(), e[img].sum()], [(valid & ~img).sum(), (valid & img).sum()]],
                                    dtype=torch.float64)
            out.register_hook(on_grad)
        return hook

    def needs_grad(mod, args):                                                # track activations, not weights
        return (args[0].detach().requires_grad_(True),) + args[1:]

    starts = {id(b) for _, b in blocks[:1]} | {id(model.model.language_model.layers[0])}
    hooks = [b.register_forward_pre_hook(needs_grad) for _, b in blocks if id(b) in starts]
    for bname, block in blocks:
        hooks.append(block.register_forward_hook(on_block(bname)))
        hooks += [m.register_forward_hook(on_linear(f"{bname}.{n}")) for n, m in qa.linears(block).items()]
    n_pos = sum(int(qa.loss_mask(b).sum()) for b in batches)
    with qa.hooked(hooks), torch.enable_grad():
        for batch in tqdm(batches, desc="sensitivity", leave=False):
            ctx["batch"] = batch
            sampled_nll(qa.answer_logits(model, batch), gen).backward()
    choices = bit_choices(cfg)
    costs, sizes, owners, sens = [], [], [], {}
    for bname, block in tqdm(blocks, desc="trial VQ", leave=False):
        e = energy[bname]
        mw = e[0] / e[1].clamp_min(1) if cfg.token_weights != "none" and (e[1] > 0).all() else torch.ones(2, dtype=torch.float64)
        for n, lin in qa.linears(block).items():
            name, st = f"{bname}.{n}", stats[f"{bname}.{n}"]
            W = lin.weight.detach().float()
            m = W.shape[0]
            h_diag = (mw[0] * st["h"][0] + mw[1] * st["h"][1]) / float((mw.to(st["n"].device) * st["n"]).sum())
            s = st["o"] / n_pos                                               # s_i = H_O[i, i]
            tr = lambda b, m=m: tile_rows_for(m, b, cfg.d, cfg.group_size, cfg.codebook_overhead, cfg.joint_bits)
            local, glob = trial_costs(W, h_diag.float(), s.float(), choices, cfg.group_size, cfg.d, tr,
                                      cfg.trial_iters, gen, cfg.joint_bits)
            costs.append(glob)
            sizes += [m * cfg.group_size] * glob.shape[0]
            owners += [(name, g) for g in range(glob.shape[0])]
            sens[name] = dict(local=local.tolist(), global_=glob.tolist(), choices=choices)
    costs, sizes = torch.cat(costs), torch.tensor(sizes)
    pick = allocate_bits(costs, sizes, choices, int(cfg.bits * sizes.sum()))
    alloc = {}
    for (name, g), c in zip(owners, pick.tolist()):
        alloc.setdefault(name, []).append(choices[c])
    avg = float((sizes * torch.tensor(choices)[pick]).sum() / sizes.sum())
    log(f"allocation: {len(owners)} column groups, average {avg:.4f} index bits (budget {cfg.bits})")
    return alloc, sens


# --- driver

def quantize_linear(lin: nn.Linear, factors, G, shift, group_bits, cfg: Config, gen, what: str):
    """Quantize one linear (METHOD 3b-3e): from its damped factors (damped_factors), the Newton-shifted target
    W~ = W + shift, Block-LDL sweep, codebook refit, packed VQLinear. Returns the module and the layer's figures."""
    W, H, H_Od = factors                                                     # W (m, n)
    m, n = W.shape
    d, gs = cfg.d, cfg.group_size
    assert n % gs == 0, f"{what}: {n} input columns are not a multiple of --group-size {gs}"
    s = torch.ones(m, device=W.device)
    Wt = W if shift is None else W + shift
    if cfg.grad != "none":
        s = H_Od.diagonal() / H_Od.diagonal().mean().clamp_min(1e-30)         # row weights diag(H_O)
        s = s.clamp_min(1e-3)
    U, D = sweep_factors(H, d)
    tile_rows = {b: tile_rows_for(m, b, d, gs, cfg.codebook_overhead, cfg.joint_bits) for b in sorted(set(group_bits))}
    scalar = cfg.method in ("rtn", "gptq")

    def fit(X, Dm, K):                                                        # X (R, t, P, d)
        if scalar:
            return minmax_grid(X, K)
        b = (K.bit_length() - 1) // X.shape[-1]
        return int8_codebook(fit_codebook(X, Dm, s.reshape(X.shape[0], X.shape[1]), b, cfg.joint_bits,
                                          cfg.kmeans_iters, gen))

    codes, Q, books, scales = vq_sweep(Wt, U, D, group_bits, gs, tile_rows, fit, cfg.feedback)
    if not scalar:
        Q = refit_codebooks(Wt, H, s, codes, books, scales, group_bits, gs, tile_rows)
    vq = VQLinear.from_parts(codes, group_bits, books, scales, d, gs, tile_rows,
                             None if lin.bias is None else lin.bias.detach(), dtype=lin.weight.dtype).to(W.device)
    rel = lambda Qx: proxy_loss(W - Qx, H) / max(proxy_loss(W, H), 1e-30)    # tr(D H D^T) / tr(W H W^T)
    Q0 = round_to(W, books, scales, group_bits, gs, tile_rows, D)             # plain rounding, no compensation
    info = dict(err_rtn=rel(Q0), err=rel(Q))
    H_O = H_Od if cfg.grad == "kl" else None                                  # the model G belongs to (drift: H_O = I)
    if cfg.grad != "none":                                                    # how far the Newton shift moved the target
        info.update(shift=float((Wt - W).norm() / W.norm().clamp_min(1e-30)),
                    proxy=proxy_loss(Q - W, H, G, H_O), proxy_rtn=proxy_loss(Q0 - W, H, G, H_O))
    return vq, info


def quantize_model(vlm, cfg: Config, samples, log=print) -> dict:
    """Steps 1-3 of the method on a loaded model, block by block in GPTQ order. Replaces the linears of
    the quantized blocks by VQLinear in place; returns the layouts, the allocation and per-layer figures."""
    model = vlm.model.requires_grad_(False).eval()
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    batches = [vlm.batch(samples[i:i + cfg.batch_size]) for i in range(0, len(samples), cfg.batch_size)]
    blocks = qa.quantizable_blocks(model, cfg.quantize_vision)[:cfg.max_blocks]
    decoder = {id(b) for b in model.model.language_model.layers}
    qig = cfg.token_weights == "qig"
    drift = cfg.grad == "drift"
    keep = [b for _, b in blocks if drift or id(b) in decoder] if qig or drift else []
    spill = tempfile.TemporaryDirectory(prefix="mgvq-inputs-") if keep else None   # FP block inputs: QIG, drift
    teacher, fp_inputs = (teacher_pass(model, batches, cfg.teacher_topk, keep, spill and spill.name)
                          if cfg.grad != "none" or qig else (None, {}))
    alloc, sens = sensitivity_allocation(model, blocks, batches, cfg, gen, log) if cfg.alloc == "sensitivity" else ({}, {})
    qa.release_memory()
    layouts, layers, per_block = {}, [], []
    for l, (bname, block) in enumerate(tqdm(blocks, desc="blocks")):
        t0 = time.time()
        token_w = None
        if qig and l > 0 and id(block) in decoder:            # h = h_q before anything is quantized: modality then
            token_w = qig_token_weights(model, block, batches, fp_inputs[keep.index(block)], cfg.qig_steps)
        fp_in = fp_inputs[keep.index(block)] if drift and l > 0 else None      # no drift before anything is quantized
        H_I, H_O, G, mw, stages = block_statistics(model, block, batches, cfg, teacher, token_w, gen, fp_in)
        qa.release_memory()
        lins = qa.linears(block)
        factors = {n: damped_factors(lin, H_I[n], H_O[n], cfg, f"{bname}.{n}", log) for n, lin in lins.items()}
        del H_I, H_O                                          # damped in place: the factors hold them
        shifts, step = {}, 0.0
        if fp_in is not None:
            shifts = drift_shifts(factors, G)
        if cfg.grad == "kl" and l > 0:                        # G = 0 before anything upstream is quantized
            shifts = newton_shifts(factors, G, cfg.alpha, cfg.newton_damp)
            step, kl = line_search(model, lins, shifts, batches, teacher, G["kl"], cfg.line_search)
            shifts = {n: step * sh for n, sh in shifts.items()} if step else {}
            tqdm.write(f"{bname}: Newton step x{step:g}, calibration KL {G['kl']:.2e} -> {kl:.2e} before quantization")
        for i, stage in enumerate(stages):                  # the linears fed one input, in the order they are fed
            if i and cfg.sequential == "linear":
                refresh_input_factors(model, block, batches, cfg, token_w, gen, mw, factors, stage, bname, log)
            for n in stage:
                lin, name, t1 = lins[n], f"{bname}.{n}", time.time()
                bits = alloc.get(name, [cfg.bits] * (lin.in_features // cfg.group_size))
                vq, info = quantize_linear(lin, factors[n], G.get(n), shifts.get(n), bits, cfg, gen, name)
                parent, child = name.rsplit(".", 1)
                setattr(model.get_submodule(parent), child, vq)
                layouts[name] = vq.layout()
                qa.release_memory()
                row = qa.layer_row(name, vq, bits, time.time() - t1, info)            # printed as it is made
                if G:
                    row.update(grad_norm=float(G[n].norm()), block_kl=G.get("kl"), newton_step=step,
                               drift_damp=G.get("damp", {}).get(n))
                layers.append(row)
        del G, factors
        per_block.append(dict(block=bname, seconds=time.time() - t0, peak_mem_gb=qa.peak_mem_gb(dev)))
        tqdm.write(f"{bname}: {per_block[-1]['seconds']:.1f}s, peak memory {per_block[-1]['peak_mem_gb']:.2f} GB")
    if spill:
        spill.cleanup()
    total = len(qa.quantizable_blocks(model, cfg.quantize_vision))
    projected = sum(b["seconds"] for b in per_block) / max(len(per_block), 1) * total
    if len(blocks) < total:
        log(f"{len(blocks)} of {total} blocks quantized; all {total} projected at {projected / 60:.1f} min")
    return dict(layouts=layouts, layers=layers, allocation=alloc, sensitivity=sens, blocks=per_block,
                projected_block_seconds=projected)


# --- CLI

def run(cfg: Config, log=print, vlm=None, reference=None) -> dict:
    """One `python mgvq.py` run: load, calibrate, quantize, score FP and quantized on held-out data (same
    scorer, same run: QA accuracy, text perplexity, full-vocabulary KL), report honest bits, optionally save.
    `reference` = (HeldOut, FP reference) when the caller has scored the FP model already (the ablation)."""
    t0 = time.time()
    cfg = resolve(cfg)
    torch.manual_seed(cfg.seed)
    with qa.output_folder(cfg.out) as folder:                 # made now: a bad --out fails before anything runs
        if folder:
            log(f"the quantized model will be saved to {os.path.abspath(cfg.out)}")
        samples = load_calib(cfg, log)                        # bad input fails before the model loads
        if vlm is None:
            vlm = (qa.random_init_model if cfg.random_init else qa.load_model)(cfg.model, cfg.device, cfg.dtype)
        if reference is None and cfg.eval_n:
            held = qa.heldout_set(cfg.model, vlm.tokenizer, cfg.eval_n)
            reference = held, qa.heldout_reference(vlm, held)
        t1 = time.time()
        q = quantize_model(vlm, cfg, samples, log)
        quant_s = time.time() - t1
        check = qa.heldout_check(vlm, *reference) if reference else {}
        report = dict(method=cfg.method, bits=cfg.bits, **qa.bits_report(vlm.model),
                      **{k: check.get(k) for k in qa.HELDOUT_KEYS},
                      seconds=time.time() - t0, quantize_seconds=quant_s, peak_mem_gb=qa.peak_mem_gb(vlm.device),
                      config=asdict(cfg), **q)
        if folder:
            qa.save_quantized(vlm, report, folder, bit_choices(cfg))
    return report


ABLATION = [  # (label, switches on top of the method): baselines, each component added to gptvq, then taken out of mgvq
    ("rtn", dict(method="rtn")),
    ("gptq", dict(method="gptq")),
    ("gptvq", dict(method="gptvq")),
    ("gptvq + mixed precision", dict(method="gptvq", alloc="sensitivity")),
    ("gptvq + gradient", dict(method="gptvq", grad="kl")),
    ("gptvq + drift", dict(method="gptvq", grad="drift")),
    ("gptvq + QIG weights", dict(method="gptvq", token_weights="qig")),
    ("gptvq + block-LDL metric", dict(method="gptvq", feedback="ldl")),
    ("mgvq", dict(method="mgvq")),
    ("mgvq - gradient", dict(method="mgvq", grad="none")),
    ("mgvq - mixed precision", dict(method="mgvq", alloc="uniform")),
    ("mgvq - QIG weights", dict(method="mgvq", token_weights="none")),
    ("mgvq - block-LDL metric", dict(method="mgvq", feedback="diag")),
    ("mgvq - per-coordinate codebooks", dict(method="mgvq", joint_bits=12)),
]


def ablation(cfg: Config, seeds=(0, 1, 2), only: list[str] | None = None) -> dict:
    """The ablation table: every row at the same bits, scored on the same held-out data; each figure is the
    mean +- standard deviation over the calibration seeds. `only`: the rows to run, by label."""
    table = [(label, sw) for label, sw in ABLATION if not only or label in only]
    if only and len(table) != len(only):
        raise ValueError(f"--rows takes labels of the table: {', '.join(label for label, _ in ABLATION)}")
    eval_n = resolve(Config(**asdict(cfg))).eval_n             # the rows themselves resolve their own switches
    vlm0 = qa.load_model(cfg.model, cfg.device, cfg.dtype)
    held = qa.heldout_set(cfg.model, vlm0.tokenizer, eval_n)
    reference = held, qa.heldout_reference(vlm0, held)
    fp = qa.heldout_check(vlm0, held)
    rows = []
    for label, switches in table:
        runs = []
        for seed in seeds:
            c = Config(**{**asdict(cfg), **switches, "seed": seed, "out": None, "no_save": True})
            runs.append(run(c, log=lambda *a: None, vlm=qa.load_model(cfg.model, cfg.device, cfg.dtype),
                            reference=reference))
        rows.append(qa.ablation_row(label, runs, seeds))
    return qa.ablation_table(cfg.model, cfg.bits, held, fp, rows, seeds)


class Parser(argparse.ArgumentParser):
    def error(self, message):                               # one line, no usage dump
        raise ValueError(message)


def field_comments() -> dict[str, str]:
    """Each Config field's comment in its source, continuation lines included: the flag's --help text."""
    comments, name = {}, None
    for line in inspect.getsource(Config).splitlines()[1:]:
        code, _, comment = line.partition("#")
        if code.strip():
            name = code.split(":")[0].strip()
        if comment.strip():
            comments[name] = (comments.get(name, "") + " " + comment.strip()).strip()
    return comments


def parse_args(argv) -> tuple[Config, argparse.Namespace]:
    """The command line maps one to one onto Config."""
    p = Parser(description="MGVQ: ~2-bit vector quantization of a vision-language model.")
    comments = field_comments()
    for f in fields(Config):
        flag, text = "--" + f.name.replace("_", "-"), comments.get(f.name, "")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=text)
        else:
            typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            default = "set by --method" if f.name in METHODS["mgvq"] else f.default  # None: see the text
            text += "" if default is None else f" (default: {default})"
            p.add_argument(flag, type=typ, default=f.default, help=text.lstrip())
    p.add_argument("--ablation", action="store_true", help="run the ablation table (3 calibration seeds)")
    p.add_argument("--rows", help="with --ablation: only these rows, comma-separated labels (e.g. rtn,gptq,gptvq)")
    p.add_argument("--json", action="store_true", help="print the whole report as the last line, not the summary")
    args = p.parse_args(argv)
    extra = {"ablation", "json", "rows"}
    return Config(**{k: v for k, v in vars(args).items() if k not in extra}), args


def main(argv=None) -> int:
    from transformers.utils import logging
    logging.set_verbosity_error()                              # no torchvision notice, no weight-loading bar
    logging.disable_progress_bar()
    try:
        cfg, args = parse_args(argv)
        if error := transformers_error():
            raise ValueError(error)
        if args.ablation:
            print(json.dumps(ablation(cfg, only=args.rows.split(",") if args.rows else None)))
            return 0
        r = run(cfg)
        qa.print_summary(r)
        print(json.dumps(r if args.json else {k: r[k] for k in qa.SUMMARY_KEYS}))
        return 0
    except (ValueError, qa.ModelNotFound) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
