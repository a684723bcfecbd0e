"""The quantized linear layer of MGVQ: packed VQ indices, int8 codebooks, fp16 scales, and its matmul.

A linear y = x Wᵀ + bias, W (m, n), is stored as vector-quantized column groups:
  - a VQ vector is d consecutive input columns of one row; columns are cut into groups of `group_size`;
  - column group g has b_g bits per weight (mixed precision), so K_g = 2**(b_g·d) codewords of length d;
  - rows are cut into tiles of tile_rows[b] rows; one int8 codebook + one fp16 scale per (row tile × column group);
  - codeword value = scale · int8.
Saved buffers, per distinct bit-width b (G_b groups with b bits, R_b = m // tile_rows[b] row tiles):
  groups_{b}   int32 (G_b,)                ids of the column groups with b bits, ascending
  codes_{b}    uint8 (m, G_b·gs·b/8)       per row, the G_b·gs/d indices bit-packed LSB-first
  codebook_{b} int8  (R_b, G_b, K_b, d)
  scale_{b}    fp16  (R_b, G_b)
This file imports torch only (the benchmark's whole-model figure imports transformers inside `bench_decode`).
`dequantize` + `F.linear` is the plain reference; the fast path (repack once, then compiled kernels) is below it.
"""
import copy
import math
import os
import time
import warnings

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- bit packing

def pack_codes(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """(m, N) indices < 2**bits -> uint8 (m, N·bits/8); index k fills bits [k·bits, (k+1)·bits), LSB-first."""
    assert idx.dim() == 2, f"idx must be (m, N), got {tuple(idx.shape)}"
    assert 1 <= bits <= 32, f"bits must be in 1..32, got {bits}"
    m, N = idx.shape
    assert (N * bits) % 8 == 0, f"N·bits = {N}·{bits} must be a multiple of 8"
    idx = idx.long()
    assert idx.numel() == 0 or (idx.min() >= 0 and idx.max() < 2**bits), f"indices out of range [0, 2**{bits})"
    shifts = torch.arange(bits, device=idx.device)
    stream = (idx[:, :, None] >> shifts) & 1                       # (m, N, bits): bit j of index k
    stream = stream.reshape(m, N * bits // 8, 8)                   # (m, bytes, 8): bit p -> byte p//8, bit p%8
    weights = 1 << torch.arange(8, device=idx.device)
    return (stream * weights).sum(-1).to(torch.uint8)              # (m, N·bits/8)


def unpack_codes(packed: torch.Tensor, bits: int, N: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 (m, N·bits/8) -> int64 (m, N)."""
    assert packed.dtype == torch.uint8, f"packed must be uint8, got {packed.dtype}"
    assert 1 <= bits <= 32, f"bits must be in 1..32, got {bits}"
    m, nbytes = packed.shape
    assert nbytes * 8 == N * bits, f"{nbytes} bytes cannot hold {N} indices of {bits} bits"
    shifts = torch.arange(8, device=packed.device)
    stream = (packed.long()[:, :, None] >> shifts) & 1             # (m, bytes, 8)
    stream = stream.reshape(m, N, bits)                            # (m, N, bits)
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream * weights).sum(-1)                              # (m, N)


# --- the module

def _forget_repack(module, incompatible_keys):
    module._fast = None  # new buffers: the repacked copy is stale


class VQLinear(nn.Module):
    """y = x Wᵀ + bias with W stored as VQ codes (see the module docstring for the saved format)."""

    def __init__(self, in_features: int, out_features: int, d: int, group_size: int,
                 group_bits: list[int], tile_rows: dict[int, int], bias: bool, dtype=torch.float32):
        super().__init__()
        m, n, gs = out_features, in_features, group_size
        dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
        tile_rows = {int(b): int(t) for b, t in tile_rows.items()}  # JSON gives str keys back
        group_bits = [int(b) for b in group_bits]
        assert gs % d == 0 and n % gs == 0, f"need d | group_size | n, got d={d} gs={gs} n={n}"
        assert len(group_bits) == n // gs, f"{len(group_bits)} group bits for {n // gs} column groups"
        self.in_features, self.out_features, self.d, self.group_size = n, m, d, gs
        self.group_bits, self.tile_rows, self.dtype = group_bits, tile_rows, dtype
        self.bits = sorted(set(group_bits))
        for b in self.bits:
            T = tile_rows[b]
            assert m % T == 0, f"tile_rows[{b}] = {T} must divide m = {m}"
            assert (gs * b) % 8 == 0, f"group_size·b = {gs}·{b} must be a multiple of 8"
            G, K = group_bits.count(b), 2 ** (b * d)
            self.register_buffer(f"groups_{b}", torch.zeros(G, dtype=torch.int32))
            self.register_buffer(f"codes_{b}", torch.zeros(m, G * gs * b // 8, dtype=torch.uint8))
            self.register_buffer(f"codebook_{b}", torch.zeros(m // T, G, K, d, dtype=torch.int8))
            self.register_buffer(f"scale_{b}", torch.zeros(m // T, G, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(m, dtype=dtype) if bias else None)
        self._fast = None  # repacked tensors for the fast path, built on first use by `fast_parts`
        self.register_load_state_dict_post_hook(_forget_repack)

    @classmethod
    def from_parts(cls, indices, group_bits, codebooks, scales, d, group_size, tile_rows, bias=None,
                   dtype=torch.float32):
        """Build from the quantizer's output: indices (m, n/d); per column group g, codebooks[g] int8
        (R_g, K_g, d) and scales[g] (R_g,), in column-group order."""
        m, nv = indices.shape
        gs, V = group_size, group_size // d                        # V vectors per row per group
        assert len(codebooks) == len(scales) == len(group_bits) == nv // V, "one codebook/scale per column group"
        layer = cls(nv * d, m, d, gs, group_bits, tile_rows, bias is not None, dtype)
        for b in layer.bits:
            gids = [g for g, bg in enumerate(group_bits) if bg == b]
            idx = indices.reshape(m, nv // V, V)[:, gids].reshape(m, len(gids) * V)  # (m, G_b·V) slot-major
            getattr(layer, f"groups_{b}").copy_(torch.tensor(gids, dtype=torch.int32))
            getattr(layer, f"codes_{b}").copy_(pack_codes(idx, b * d))
            cb = torch.stack([codebooks[g] for g in gids], dim=1)  # (R_b, G_b, K_b, d)
            assert cb.dtype == torch.int8, f"codebooks must be int8, got {cb.dtype}"
            getattr(layer, f"codebook_{b}").copy_(cb)
            getattr(layer, f"scale_{b}").copy_(torch.stack([scales[g] for g in gids], dim=1).to(torch.float16))
        if bias is not None:
            layer.bias.copy_(bias.to(layer.dtype))
        return layer

    def layout(self) -> dict:
        """JSON-able constructor kwargs: VQLinear(**layer.layout()) rebuilds the empty module."""
        return dict(in_features=self.in_features, out_features=self.out_features, d=self.d,
                    group_size=self.group_size, group_bits=list(self.group_bits),
                    tile_rows={str(b): t for b, t in self.tile_rows.items()}, bias=self.bias is not None,
                    dtype=str(self.dtype).removeprefix("torch."))

    def storage_bits(self) -> dict:
        """Bits held by the buffers (bias excluded); bits/weight = (index + codebook + scale) / weights."""
        s = dict(index=0, codebook=0, scale=0, weights=self.out_features * self.in_features)
        for b in self.bits:
            s["index"] += getattr(self, f"codes_{b}").numel() * 8
            s["codebook"] += getattr(self, f"codebook_{b}").numel() * 8
            s["scale"] += getattr(self, f"scale_{b}").numel() * 16
        return s

    def dequantize(self) -> torch.Tensor:
        """The plain reference: unpack, gather codewords, scale, place the groups. Returns W (m, n) in self.dtype."""
        m, n, d, gs = self.out_features, self.in_features, self.d, self.group_size
        V = gs // d
        W = torch.zeros(m, n // gs, gs, dtype=torch.float32, device=self.device)
        for b in self.bits:
            groups, T = getattr(self, f"groups_{b}").long(), self.tile_rows[b]
            G = groups.numel()
            idx = unpack_codes(getattr(self, f"codes_{b}"), b * d, G * V).reshape(m, G, V)  # (m, G, V)
            cb = getattr(self, f"codebook_{b}").float() * getattr(self, f"scale_{b}").float()[:, :, None, None]
            tile = torch.arange(m, device=idx.device) // T                                    # (m,) row -> tile
            w = cb[tile[:, None, None], torch.arange(G, device=idx.device)[None, :, None], idx]  # (m, G, V, d)
            W[:, groups] = w.reshape(m, G, gs)
        return W.reshape(m, n).to(self.dtype)

    def fast_parts(self):
        """The repacked tensors of the fast path (built once, dropped when new buffers are loaded)."""
        if self._fast is None or self._fast[1].device != self.device:
            parts = [repack_part(getattr(self, f"codes_{b}"), getattr(self, f"codebook_{b}"),
                                 getattr(self, f"scale_{b}"), getattr(self, f"groups_{b}"), self.d,
                                 self.group_size, self.tile_rows[b], b) for b in self.bits]
            self._fast = (parts, torch.cat([q["cols"].reshape(-1) for q in parts]))   # perm (n,)
        return self._fast

    def _apply(self, fn, *args, **kwargs):
        """`.to(torch.bfloat16)` casts floating buffers: keep the saved fp16 scales exact (move them, never cast)."""
        scales = {b: getattr(self, f"scale_{b}") for b in self.bits}
        super()._apply(fn, *args, **kwargs)
        for b, s in scales.items():
            setattr(self, f"scale_{b}", s.to(getattr(self, f"codes_{b}").device))
        return self

    @property
    def device(self):
        return getattr(self, f"codes_{self.bits[0]}").device

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = x Wᵀ + bias, W from `dequantize`: the slow, obviously-correct path the fast one is tested against."""
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vq_linear(x, self)

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, d={self.d}, gs={self.group_size}, "
                f"bits={self.bits}, tile_rows={self.tile_rows}")


# --- repacking for the fast path
# The saved format suits the quantizer; at load time each bit-width's part is repacked once into what the
# fast path reads best (choices measured with `--bench` on a 2-core AVX-512 CPU and torch 2.13):
#   - super-indices: p consecutive indices of a row (p·d ≤ 4 weights, p·b·d ≤ 8 bits) are read as ONE index
#     into the tile's product codebook (K^p codewords of p·d values), so one gather fetches up to 4 weights.
#     In the LSB-first stream the p indices are exactly the bits of the super-index: just a wider unpack.
#   - tile-major: all super-indices of one (row tile × column group) are contiguous (R, G, tile_rows, C),
#     so the tile's codebook (≤ 1 KiB at 2 bits) stays in L1 while it is used.
#   - one super-index per byte (uint8; int16/int32 past 8 bits): no bit fiddling in the inner loop.


def pairing(b: int, d: int) -> int:
    """How many d-vectors share one super-index: the largest p with p·d ≤ 4 and p·b·d ≤ 8 (at least 1)."""
    p = 1
    while 2 * p * d <= 4 and 2 * p * b * d <= 8:
        p *= 2
    return p


def _dynamic(*ts):
    for t in ts:  # R and G vary from layer to layer (and block to block): one compiled kernel serves them all
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)
    return ts


def repack_part(codes, codebook, scale, groups, d: int, group_size: int, tile_rows: int, b: int) -> dict:
    """One bit-width's saved buffers -> S (R, G, tile_rows, C) super-indices, P (R, G, K^p, Dp) int8 product
    codebooks, s (R, G) fp32 scales, cols (G, C, Dp) the input column of each weight; C = gs / Dp, Dp = p·d."""
    m, (R, G, K, _) = codes.shape[0], codebook.shape
    p = pairing(b, d)
    Bs, Dp, C = p * b * d, p * d, group_size // (p * d)
    assert group_size % Dp == 0, f"group_size {group_size} must hold whole super-vectors of {Dp} weights"
    S = unpack_codes(codes, Bs, G * C).reshape(R, tile_rows, G, C).transpose(1, 2)   # (R, G, tile_rows, C)
    S = S.to(torch.uint8 if Bs <= 8 else torch.int16 if Bs <= 15 else torch.int32).contiguous()
    dev = codes.device
    digits = (torch.arange(2**Bs, device=dev)[:, None] >> (b * d * torch.arange(p, device=dev))) & (K - 1)  # (K^p, p)
    P = codebook[:, :, digits].reshape(R, G, 2**Bs, Dp).contiguous()               # vector j of p = digit j
    cols = groups.long()[:, None, None] * group_size + torch.arange(group_size, device=dev).reshape(1, C, Dp)
    S, P, s, cols = _dynamic(S, P, scale.float().contiguous(), cols)
    return dict(S=S, P=P, s=s, cols=cols)


# --- the fast matmul

def decode_part(xg: torch.Tensor, S: torch.Tensor, P: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y (T, m) = Σ_g s·(W_g x_g) over one bit-width's groups, gathering codewords, never forming W.

    xg (T, G, C, Dp) inputs of those groups; S (R, G, Tr, C); P (R, G, K', Dp) int8; s (R, G).
    The T tokens are unrolled so that each codeword gathered serves all of them (T ≤ a few)."""
    R, G, Tr, C = S.shape
    r = torch.arange(R, device=S.device)[:, None, None, None]
    g = torch.arange(G, device=S.device)[None, :, None, None]
    w = P[r, g, S.long()].float()                                          # (R, G, Tr, C, Dp), fused, not stored
    part = torch.stack([(w * xt[None, :, None]).sum((-1, -2)) for xt in xg])   # (T, R, G, Tr)
    return (part * s[None, :, :, None]).sum(2).reshape(xg.shape[0], R * Tr)    # (T, m)


def dequantize_part(S: torch.Tensor, P: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W_part (R·Tr, G·C·Dp) of the row tiles given, columns in the order of `cols` (for many tokens)."""
    R, G, Tr, C = S.shape
    r = torch.arange(R, device=S.device)[:, None, None, None]
    g = torch.arange(G, device=S.device)[None, :, None, None]
    Pf = P.float() * s[:, :, None, None]                                   # (R, G, K', Dp) scaled codewords
    return Pf[r, g, S.long()].transpose(1, 2).reshape(R * Tr, -1)          # (R, G, Tr, C, Dp) -> (m, G·C·Dp)


def prefill_matmul(x: torch.Tensor, parts: list[dict], perm: torch.Tensor, m: int, block_bytes=16 << 20):
    """y (T, m) = x Wᵀ for many tokens: dequantize a block of rows at a time, then matmul. Blocks keep each
    allocation under glibc's mmap threshold (32 MB): a fresh (m × n) fp32 buffer per call costs ~13 ms of page
    faults at 8960 × 1536, more than the dequantization itself."""
    deq = _compiled_fn("dequantize", dequantize_part)
    step = math.lcm(*[q["S"].shape[2] for q in parts])                    # blocks end on every part's tile edge
    step *= max(1, block_bytes // (4 * x.shape[1] * step))
    xp = x[:, perm]                                                        # (T, n), columns in parts' order
    ys = []
    for r0 in range(0, m, step):
        Wb = [deq(*_dynamic(q["S"][r0 // Tr:(r0 + step) // Tr], q["P"][r0 // Tr:(r0 + step) // Tr],
                            q["s"][r0 // Tr:(r0 + step) // Tr])) for q in parts for Tr in [q["S"].shape[2]]]
        ys.append(F.linear(xp, (torch.cat(Wb, 1) if len(Wb) > 1 else Wb[0]).to(x.dtype)))  # (T, rows)
    return torch.cat(ys, 1)                                                # (T, m)


DECODE_MAX_TOKENS = 4  # measured crossover on CPU: the fused gather wins up to here, then dequantize + matmul
_compiled = {}         # name -> compiled function, "failed" -> True once compilation has failed


def _compiled_fn(name: str, fn):
    if name not in _compiled:
        # one cache entry per shape family (tile rows × super-vector × token count): a model has a dozen or two.
        # dynamic=False: only the dims marked by `_dynamic` (R, G) vary; tile rows, Dp and T stay constants.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled[name] = torch.compile(fn, dynamic=False)
    return _compiled[name]


def vq_linear(x: torch.Tensor, layer: "VQLinear") -> torch.Tensor:
    """y = x Wᵀ + bias: fused gather for few tokens, dequantize-then-matmul for many; reference if no compiler."""
    parts, perm = layer.fast_parts()
    x2 = x.reshape(-1, layer.in_features)                                  # (T, n)
    T, m = x2.shape[0], layer.out_features
    if _compiled.get("failed") or T == 0:
        return layer.reference_forward(x)
    try:
        if T <= DECODE_MAX_TOKENS:
            decode = _compiled_fn("decode", decode_part)
            y = 0
            for q in parts:
                xg = x2[:, q["cols"]].float()                              # (T, G, C, Dp)
                torch._dynamo.maybe_mark_dynamic(xg, 1)
                y = y + decode(xg, q["S"], q["P"], q["s"])                 # (T, m)
            y = y.to(x.dtype)
        else:
            y = prefill_matmul(x2, parts, perm, m)                        # (T, m)
    except (torch._dynamo.exc.BackendCompilerFailed, RuntimeError, OSError) as err:  # no C++ compiler / Triton
        warnings.warn(f"kernels.py: torch.compile unavailable ({type(err).__name__}: "
                      f"{str(err).strip().splitlines()[0][:100]}); falling back to dequantize + F.linear")
        _compiled["failed"] = True
        return layer.reference_forward(x)
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], m)


# --- benchmark: python kernels.py --bench [--quick] [--shapes 1536x1536,...] [--tokens 1,4,16,256]
SHAPES = {"lm": [(1536, 1536), (8960, 1536), (1536, 8960)],                # (out, in) of Qwen2-VL-2B
          "vision": [(3840, 1280), (5120, 1280), (1280, 5120)]}
VARIANTS = {"2bit-d2": (2, [2], {2: 16}),                                   # d, group bits (cycled), tile rows
            "mixed123-d2": (2, [2, 1, 2, 3], {1: 8, 2: 16, 3: 64}),
            "2bit-d4": (4, [2], {2: 64})}


def random_layer(m, n, d, pattern, tile_rows, dtype=torch.float32, device="cpu", group_size=128, bias=False):
    """A VQLinear of the given layout filled with random bytes (every byte string is a valid index stream)."""
    bits = [pattern[g % len(pattern)] for g in range(n // group_size)]
    tile_rows = {b: math.gcd(t, m) for b, t in tile_rows.items()}        # a tile-row count that divides m
    layer = VQLinear(n, m, d, group_size, bits, tile_rows, bias, dtype).to(device)
    for b in layer.bits:
        getattr(layer, f"groups_{b}").copy_(torch.tensor([g for g, c in enumerate(bits) if c == b]))
        getattr(layer, f"codes_{b}").random_(0, 256)
        getattr(layer, f"codebook_{b}").random_(-128, 128)
        getattr(layer, f"scale_{b}").uniform_(1e-3, 1e-2)
    return layer


def _copies(layer, nbytes):
    """Shallow copies of a VQLinear, each with its own repacked tensors (for cold-cache timing)."""
    parts, perm = layer.fast_parts()
    size = sum(t.nbytes for q in parts for t in q.values())
    out = []
    for _ in range(max(2, nbytes // size)):
        c = copy.copy(layer)
        c._fast = ([dict(zip(q, _dynamic(*[t.clone() for t in q.values()]))) for q in parts], perm)
        out.append(c)
    return out, size


def _ms(fn, items, sync, rounds=3):
    """Best over rounds of the mean time of fn(item) over items, in ms."""
    fn(items[0]), fn(items[-1]), sync()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for it in items:
            fn(it)
        sync()
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best * 1e3


def bench_layers(shapes, tokens, variants, device, dtype, cold_bytes):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    print(f"{'shape':>11} {'variant':>12} {'T':>4} | {'dense ms':>8} {'vq ms':>7} {'speedup':>7} | "
          f"{'hot dense':>9} {'hot vq':>7} {'speedup':>7} | {'dense GB/s':>10} {'vq GB/s':>8} {'vq MB':>6}")
    for m, n in shapes:
        W = torch.randn(m, n, device=device, dtype=dtype)
        Ws = [W.clone() for _ in range(max(2, cold_bytes // W.nbytes))]
        for name in variants:
            d, pattern, tile_rows = VARIANTS[name]
            layers, vq_bytes = _copies(random_layer(m, n, d, pattern, tile_rows, dtype, device), cold_bytes)
            for T in tokens:
                x = torch.randn(T, n, device=device, dtype=dtype)
                dc = _ms(lambda w: F.linear(x, w), Ws, sync)
                vc = _ms(lambda l: l(x), layers, sync)
                hot = 20 if T < 64 else 4
                dh = _ms(lambda w: F.linear(x, w), [W] * hot, sync)
                vh = _ms(lambda l: l(x), layers[:1] * hot, sync)
                rows.append(dict(shape=[m, n], variant=name, tokens=T, cache="cold", dense_ms=round(dc, 4),
                                 vq_ms=round(vc, 4), speedup=round(dc / vc, 3), hot_dense_ms=round(dh, 4),
                                 hot_vq_ms=round(vh, 4), vq_bytes=vq_bytes, dense_bytes=W.nbytes))
                print(f"{m:>5}x{n:<5} {name:>12} {T:>4} | {dc:8.3f} {vc:7.3f} {dc / vc:6.2f}x | {dh:9.3f} {vh:7.3f} "
                      f"{dh / vh:6.2f}x | {W.nbytes / dc / 1e6:10.1f} {vq_bytes / vc / 1e6:8.1f} "
                      f"{vq_bytes / 2**20:6.2f}",
                      flush=True)
            del layers
    return rows


def qwen2vl_2b_config():
    from transformers import Qwen2VLConfig
    text = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]))
    vision = dict(depth=32, embed_dim=1280, num_heads=16, hidden_size=1536, mlp_ratio=4)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def quantize_decoder_(model, variant="2bit-d2"):
    """Replace every nn.Linear of the decoder layers by a random VQLinear of the same shape (in place)."""
    d, pattern, tile_rows = VARIANTS[variant]
    for layer in model.model.language_model.layers:
        for parent in list(layer.modules()):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    vq = random_layer(lin.out_features, lin.in_features, d, pattern, tile_rows,
                                      lin.weight.dtype, lin.weight.device, bias=lin.bias is not None)
                    if lin.bias is not None:
                        vq.bias.copy_(lin.bias)
                    setattr(parent, name, vq)
    return model


@torch.no_grad()
def decode_tok_s(model, new_tokens, prompt_len=8):
    """Greedy tokens/s of the decode steps alone: (time for new_tokens - time for 1) / (new_tokens - 1)."""
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (1, prompt_len), device=model.device)
    gen = lambda k: model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
    gen(4)                                                                 # warm-up: compiles the kernels
    t0 = time.perf_counter(); gen(1); t1 = time.perf_counter(); gen(new_tokens); t2 = time.perf_counter()
    return (new_tokens - 1) / ((t2 - t1) - (t1 - t0))


def bench_decode(device, dtype, new_tokens, toy_dir="toy"):
    from transformers import Qwen2VLForConditionalGeneration
    out = []
    models = [("qwen2-vl-2b-size random", lambda: Qwen2VLForConditionalGeneration(qwen2vl_2b_config()))]
    if os.path.isdir(toy_dir):
        models.insert(0, ("toy", lambda: Qwen2VLForConditionalGeneration.from_pretrained(toy_dir)))
    else:
        print(f"(no {toy_dir}/ folder: the toy model is skipped)")
    for name, build in models:
        t0 = time.perf_counter()
        model = build().to(device=device, dtype=dtype).eval()
        dense = decode_tok_s(model, new_tokens)
        vq = decode_tok_s(quantize_decoder_(model), new_tokens)
        out.append(dict(model=name, dense_tok_s=round(dense, 2), vq_tok_s=round(vq, 2), speedup=round(vq / dense, 3)))
        print(f"decode {name}: dense {dense:.2f} tok/s, 2-bit VQ {vq:.2f} tok/s ({vq / dense:.2f}x)"
              f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        del model
    return out


def main():
    import argparse
    import json
    ap = argparse.ArgumentParser(description="VQLinear fast path vs dense F.linear")
    ap.add_argument("--bench", action="store_true", help="run the benchmark (the default action)")
    ap.add_argument("--quick", action="store_true", help="LM shapes, 2bit-d2, tokens 1 and 256, no decode")
    ap.add_argument("--shapes", default=None, help="e.g. 1536x1536,8960x1536 (out x in)")
    ap.add_argument("--tokens", default="1,4,16,256")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens for the whole-model decode figure")
    ap.add_argument("--cold-mb", type=int, default=512, help="distinct weight copies cycled for the cold figure")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32         # CPU bf16 matmul is slow: fp32 there
    if device == "cuda":                                                   # as gpt-fast does
        torch._inductor.config.coordinate_descent_tuning = True
    shapes = SHAPES["lm"] + SHAPES["vision"]
    tokens, variants = [int(t) for t in args.tokens.split(",")], args.variants.split(",")
    if args.quick:
        shapes, tokens, variants = SHAPES["lm"], [1, 256], ["2bit-d2"]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, {dtype}, torch {torch.__version__}, cold = cycling {args.cold_mb} MB of copies")
    results = bench_layers(shapes, tokens, variants, device, dtype, args.cold_mb << 20)
    decode = [] if args.quick else bench_decode(device, dtype, args.new_tokens)
    print(json.dumps(dict(device=name, results=results, decode=decode)))


if __name__ == "__main__":
    main()
