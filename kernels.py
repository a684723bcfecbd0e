"""The quantized linear layer of MGVQ: packed VQ indices, int8 codebooks, fp16 scales, and its matmul.

A linear y = x Wᵀ + bias, W (m, n), is stored as vector-quantized column groups:
  - a VQ vector is d consecutive input columns of one row; columns are cut into groups of `group_size`;
  - column group g has b_g bits per weight (mixed precision), so a VQ index has b_g·d bits: it names one of the
    2**(b_g·d) codewords of length d of a joint codebook, or, for the bit-widths listed in `per_coordinate`,
    coordinate e takes bits [e·b_g, (e+1)·b_g) of the index and names one of 2**b_g values of a scalar
    codebook of its own (the codewords are every combination: a product codebook of d scalar ones);
  - rows are cut into tiles of tile_rows[b] rows; one int8 codebook + one fp16 scale per (row tile × column group);
  - codeword value = scale · int8.
Saved buffers, per distinct bit-width b (G_b groups with b bits, R_b = m // tile_rows[b] row tiles):
  groups_{b}   int32 (G_b,)                ids of the column groups with b bits, ascending
  codes_{b}    uint8 (m, G_b·gs·b/8)       per row, the G_b·gs/d indices bit-packed LSB-first
  codebook_{b} int8  (R_b, G_b, K_b, d)      joint: K_b = 2**(b·d), codeword k = [k, :];
                                            per coordinate: K_b = 2**b, coordinate e of index k = [(k >> e·b) % K_b, e]
  scale_{b}    fp16  (R_b, G_b)
This file imports torch only (the benchmark's whole-model figure, and `transformers_error`, import transformers
inside the function).
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


def transformers_error() -> str | None:
    """Why transformers cannot load its models next to this file, or None. transformers imports the pip package
    `kernels` wherever a version it accepts is installed (from transformers 5.25 on it always is: a dependency),
    and this file, first on the path under that name, stands in its place: `from kernels import CUDAProperties`
    fails. requirements.txt keeps transformers below 5.25; this names the cause in one line before any work."""
    try:
        import transformers.activations  # noqa: F401   (the module that imports the package `kernels`)
    except ImportError as e:
        if __file__ not in str(e):
            raise
        import transformers
        return (f"transformers {transformers.__version__} imports the package `kernels`, which this project's "
                "kernels.py shadows: pip install 'transformers>=5.0,<5.25', and pip uninstall kernels if that "
                "is not enough")
    return None


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
                 group_bits: list[int], tile_rows: dict[int, int], bias: bool, dtype=torch.float32,
                 per_coordinate: list[int] = ()):
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
        self.per_coordinate = sorted(int(b) for b in per_coordinate)     # saved before this field: none
        assert set(self.per_coordinate) <= set(self.bits), f"per_coordinate {self.per_coordinate} not in {self.bits}"
        for b in self.bits:
            T = tile_rows[b]
            assert m % T == 0, f"tile_rows[{b}] = {T} must divide m = {m}"
            assert (gs * b) % 8 == 0, f"group_size·b = {gs}·{b} must be a multiple of 8"
            G, K = group_bits.count(b), 2 ** (b if b in self.per_coordinate else b * d)
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
        per_coordinate = {b for b, cb in zip(group_bits, codebooks) if cb.shape[1] != 2 ** (b * d)}
        assert all(cb.shape[1] == 2 ** b for b, cb in zip(group_bits, codebooks) if b in per_coordinate), \
            "a codebook holds 2**(b·d) codewords (joint) or 2**b values per coordinate"
        layer = cls(nv * d, m, d, gs, group_bits, tile_rows, bias is not None, dtype, sorted(per_coordinate))
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
                    dtype=str(self.dtype).removeprefix("torch."), per_coordinate=list(self.per_coordinate))

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
            at = tile[:, None, None], torch.arange(G, device=idx.device)[None, :, None]
            if b in self.per_coordinate:                                # coordinate e: bits [e·b, (e+1)·b)
                w = torch.stack([cb[*at, (idx >> (e * b)) % 2**b, e] for e in range(d)], -1)  # (m, G, V, d)
            else:
                w = cb[*at, idx]                                                              # (m, G, V, d)
            W[:, groups] = w.reshape(m, G, gs)
        return W.reshape(m, n).to(self.dtype)

    def fast_parts(self):
        """The repacked tensors of the fast path (built once, dropped when new buffers are loaded)."""
        if self._fast is None:
            self._fast = [repack_part(getattr(self, f"codes_{b}"), getattr(self, f"codebook_{b}"),
                                      getattr(self, f"scale_{b}"), getattr(self, f"groups_{b}"), self.d,
                                      self.group_size, self.tile_rows[b], b, b in self.per_coordinate)
                          for b in self.bits]
        return self._fast

    def _apply(self, fn, *args, **kwargs):
        """`.to(torch.bfloat16)` casts floating buffers: keep the saved fp16 scales exact (move them, never cast)."""
        scales = {b: getattr(self, f"scale_{b}") for b in self.bits}
        super()._apply(fn, *args, **kwargs)
        self._fast = None                                                  # repack on the new device
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
                f"bits={self.bits}, tile_rows={self.tile_rows}, per_coordinate={self.per_coordinate}")


# --- repacking for the fast path
# The saved format suits the quantizer; each bit-width's part is repacked once, at first use, into what the
# compiled kernels read best. Measured with `python kernels.py --bench` on a 2-core AVX-512 CPU, torch 2.13:
#   - inductor writes an indexed load (a gather) as a scalar loop, about 6 instructions per element, so gathers
#     are what to avoid. With K ≤ 16 codewords an index is decoded by a SELECT TREE instead: its B bits become
#     B all-ones/zero masks, and K - 1 bitwise selects `(a & ~m) | (b & m)` (= m ? b : a, one vpternlogd each)
#     pick the codeword out of K values held in registers: no memory access, all vector.
#   - one int32 word carries the codewords of h = min(p, 4 // d) indices of a byte (h·d int8 fields, taken out
#     with two shifts each): each of the h slots holds the whole codebook, and a mask is all ones over slot j
#     where bit i of index j is set, so one tree decodes h indices at once (2-bit d = 2: two, 64 weights/tree).
#   - the vector lanes run over rows that share a codebook (a row tile), so each codeword is broadcast once per
#     (tile × group); tiles of fewer than 16 rows are merged into 16-row blocks with a per-lane codebook copy.
#   - p indices per byte (p·B ≤ 8; 3- and 4-bit scalars: see the next point but one), one 16-byte load feeds
#     16 rows. A row block's C bytes per group are stored in planes of Cl = gcd(C, 8) bytes, (C/Cl, block,
#     group, Cl, row): at 2-bit d=2 (C = 32) a (block × group) step
#     reads 4 runs of 128 bytes, which the hardware prefetchers follow and fetch side by side. Cold, 1 token,
#     2-bit d=2 (8960 × 1536 / 1536² / 3840 × 1280): 1.21 / 0.26 / 0.47 ms with all C bytes in one run,
#     0.93 / 0.21 / 0.37 in planes of 8 or 4, and 1.05 / 0.22 / 0.70 in planes of 1 (32 runs of 16 bytes).
#   - 3- and 4-bit scalar indices (d = 1) would fill only two of a word's four slots, two to a byte; instead 8
#     of them share an int32, two nibbles a byte (_index_shifts), and `word`, `word >> 4` each give four indices
#     one to a slot: a tree decodes four at the same memory per index. 1536², hot, one process, old / new layout:
#     3-bit per coordinate 1 token 0.360 / 0.232 ms, 4 tokens 0.373 / 0.310; the mgvq mix 0.288 / 0.241 and
#     0.428 / 0.393. (Planes of 2 int32 words instead of 8 words: no change, 1.00 ± 0.03.)
#   - larger codebooks (3-bit d=2: K = 64; 2-bit d=4: K = 256) keep a gather, of one int32 that holds up to 4
#     weights: p consecutive codewords read as one super-index into the tile's product codebook. That is 2.7x
#     slower than a tree (1536², 1 token, one thread: 3-bit d=2 joint 1.28 ms, per coordinate 0.48 ms), so
#     `--method mgvq` gives a group whose index is longer than 4 bits a scalar codebook per coordinate
#     (`--joint-bits`), which repack_part lays out as d scalar parts of K = 2**b: at `--bits 2` and `--bits 3`
#     (groups of 1 to 4 bits) every part it emits is a tree; 5-bit groups (`--bits 4`, mixed) are gathered.
#   - all the parts of a layer (one per bit-width) are decoded by one compiled call (`decode_parts`): a call
#     costs 15-35 µs of guards, wrapper and allocation whatever its size, once per layer instead of once a part.
# The fast path covers d ≤ 4 (what mgvq.py makes); a layer with d > 4 runs the reference.

PLANE_BYTES = 8      # index bytes of a row block stored together (see above)
SELECT_MAX_BITS = 4  # index bits decoded by a select tree (K ≤ 16); more: a gather
LANES = 16           # fp32 lanes of an AVX-512 register: tiles with fewer rows are merged up to this


def as_int32(word: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 of the same bit pattern (bit 31 set: negative)."""
    return ((word + 2**31) % 2**32 - 2**31).to(torch.int32)


def pack_fields(values: torch.Tensor, width: int) -> torch.Tensor:
    """(..., k) int8 -> (...) int32 with value j in bits [j·width, (j+1)·width), two's complement."""
    return as_int32(sum((values[..., j].long() & (2**width - 1)) << (j * width) for j in range(values.shape[-1])))


def unpack_field(word: torch.Tensor, j: int, width: int) -> torch.Tensor:
    """Value j of pack_fields' int32 words, sign-extended, as fp32: one left and one arithmetic right shift."""
    return ((word << (32 - (j + 1) * width)) >> (32 - width)).float()


def _slots(p: int, d: int) -> int:
    """Indices decoded by one select tree: h of them share an int32 word (h·d int8 fields), h ≤ p."""
    return min(p, 4 // d)


def _per_index(B: int, V: int, most: int) -> int:
    """Indices per byte (or per super-index): the largest power of two p ≤ most with p·B ≤ 8 that divides V."""
    p = 1
    while 2 * p <= most and 2 * p * B <= 8 and V % (2 * p) == 0:
        p *= 2
    return p


def _per_word(B: int, V: int, d: int) -> int:
    """Indices per word of S: a tree's, as many as fit a byte, but 8 for 3- and 4-bit scalars (an int32 of two
    nibbles a byte: _nibbles); a gather's, as many as make one super-index of at most 4 weights."""
    if B > SELECT_MAX_BITS:
        return _per_index(B, V, most=max(1, 4 // d))
    return 8 if d == 1 and B > 2 and V % 8 == 0 else _per_index(B, V, most=8)


def _nibbles(B: int, p: int) -> bool:
    """A tree part whose word is an int32 of 8 scalar indices of 3 or 4 bits (see _index_shifts)."""
    return B <= SELECT_MAX_BITS and p * B > 8


def _index_shifts(B: int, p: int) -> list[int]:
    """The bit where index j of a word starts: j·B (packed), or for _nibbles j < 4 at 8j and j ≥ 4 at 8(j-4) + 4,
    two nibbles per byte, so that `word` and `word >> 4` each hold 4 indices one to a byte: one tree decodes four
    of them, without moving bits into the slots (packed, a 3- or 4-bit scalar word holds two indices: one tree
    decodes two, at the same memory per index)."""
    return [8 * (j % 4) + 4 * (j // 4) for j in range(p)] if _nibbles(B, p) else [B * j for j in range(p)]


def _dynamic(*ts):
    for t in ts:  # blocks and groups vary from layer to layer: one compiled kernel serves them all
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)
    return ts


def repack_part(codes, codebook, scale, groups, d: int, group_size: int, tile_rows: int, b: int,
                per_coordinate: bool = False) -> dict:
    """One bit-width's saved buffers -> the fast path's tensors (see _repack). A part with a scalar codebook per
    coordinate is repacked as d scalar (d = 1) parts side by side: coordinate e of column group g becomes a
    group of its own, of the columns g·group_size + e + d·v, with codebook[..., e] and the group's scale."""
    base = groups.long() * group_size                                      # first input column of each group
    if not per_coordinate:
        return _repack(codes, codebook, scale, base, d, d, group_size // d, tile_rows, b * d)
    m, (R, G, K, _) = codes.shape[0], codebook.shape
    V = group_size // d
    idx = unpack_codes(codes, b * d, G * V).reshape(m, G, V)
    digits = torch.stack([(idx >> (e * b)) % K for e in range(d)], 2)      # (m, G, d, V)
    return _repack(pack_codes(digits.reshape(m, G * d * V), b), codebook.permute(0, 1, 3, 2).reshape(R, G * d, K, 1),
                   scale.repeat_interleave(d, 1), (base[:, None] + torch.arange(d, device=base.device)).reshape(-1),
                   d, 1, V, tile_rows, b)


def _repack(codes, codebook, scale, base, stride: int, d: int, V: int, tile_rows: int, B: int) -> dict:
    """The fast path's tensors of G groups of V indices of B bits, codewords of length d; index v of group g
    stands for input columns base[g] + stride·v + (0 .. d-1):
      S    (NB, G, C/Cl, Cl, Rb) uint8 (int16/int32 past 8 bits)  p indices per word (at _index_shifts); blocks
           of Rb rows, C = V / p words per group, in planes of Cl = gcd(C, PLANE_BYTES): a view of (C/Cl, NB, G,
           Cl, Rb) memory
      P    select: (NB, G, K, L) int32 codeword k, h times over (L = 1: shared by the block's rows; L = Rb: per row)
           gather: (NB, G, K^p) int32 product codewords (p·d int8 fields of 8 bits)
      s    (NB, G, L) fp32 scales;  cols (Q, G, C) the input column of weight q of byte c of group g, Q = p·d
      code (B, p, d) ints: index bits, indices per byte, vector length."""
    m, (R, G, K, _) = codes.shape[0], codebook.shape
    dev = codes.device
    tree = B <= SELECT_MAX_BITS                                            # select tree, else gather
    p = _per_word(B, V, d)
    C, Q = V // p, p * d
    idx = unpack_codes(codes, B, G * V).reshape(m, G, C, p)
    shifts = _index_shifts(B, p)
    byte = (idx << torch.tensor(shifts, device=dev)).sum(-1)               # (m, G, C): index j from bit shifts[j]
    word_bits = shifts[-1] + B
    merge = tree and tile_rows < LANES and m % LANES == 0
    Rb = LANES if merge else tile_rows
    tile = torch.arange(m, device=dev).reshape(m // Rb, Rb) // tile_rows  # (NB, Rb): each row's tile
    Cl = math.gcd(C, PLANE_BYTES)
    S = byte.reshape(m // Rb, Rb, G, C // Cl, Cl).permute(3, 0, 2, 4, 1)   # stored (C/Cl, NB, G, Cl, Rb), see above
    S = S.to(torch.uint8) if word_bits <= 8 else S.to(torch.int16) if word_bits <= 15 else as_int32(S)
    S = S.contiguous()
    S = S.permute(1, 2, 0, 3, 4)                                           # read as (NB, G, C/Cl, Cl, Rb)
    s = scale.float()
    if tree:
        h = _slots(p, d)                                                     # codeword k, h times over
        P = pack_fields(codebook.repeat(1, 1, 1, h), 32 // (h * d))          # (R, G, K)
        P, s = (P[tile].permute(0, 2, 3, 1), s[tile].transpose(1, 2)) if merge else (P[..., None], s[..., None])
    else:
        digits = (torch.arange(K**p, device=dev)[:, None] >> (B * torch.arange(p, device=dev))) & (K - 1)
        P, s = pack_fields(codebook[:, :, digits].reshape(R, G, K**p, Q), 8), s[..., None]  # codeword j = digit j
    q = torch.arange(Q, device=dev)                                         # weight q = j·d + e of a byte
    v = torch.arange(C, device=dev)[:, None] * p + q // d                   # (C, Q): the index it belongs to
    cols = (base[:, None, None] + stride * v + q % d).permute(2, 0, 1).contiguous()  # (Q, G, C): reshape is a view
    S, P, s = _dynamic(S, P.contiguous(), s.contiguous())
    return dict(S=S, P=P, s=s, cols=cols, code=(B, p, d))


# --- the fast matmul

def select(masks: list, values: list) -> torch.Tensor:
    """values[i] for the index i whose bit k is masks[k] (all ones or zero), lane by lane: a tree of bitwise
    selects, bit 0 first (values 2j and 2j + 1 differ in bit 0). Each branch is read once, for compile time
    (see byte_weights); gcc makes the same vpternlogd of it as of `a ^ (m & (a ^ b))`."""
    for m in masks:
        values = [(a & ~m) | (b & m) for a, b in zip(values[0::2], values[1::2])]
    return values[0]


def byte_weights(v: torch.Tensor, P: torch.Tensor, B: int, p: int, d: int) -> list:
    """The p·d unscaled weights (fp32, each shaped like v) that the index words v (NB, G, C, Rb) stand for, in
    the order of `cols`: weight j·d + e is value e of index j (index j from bit _index_shifts(B, p)[j])."""
    if B <= SELECT_MAX_BITS:
        h = _slots(p, d)                                                   # indices decoded per tree
        width = 32 // h                                                    # bits of one index's slot
        ones = sum(1 << (j * width) for j in range(h))                     # bit 0 of every slot
        shifts = _index_shifts(B, p)
        f = shifts[1] - shifts[0] if p > 1 else B                          # bits from one index to the next
        values = [P[:, :, k, None, :] for k in range(2**B)]                 # (NB, G, 1, L) each, broadcast
        weights = []
        for j0 in range(0, p, h):                                          # indices j0 .. j0 + h - 1
            # Each operand below is read once where one product can stand for a shift-and-combine: inductor
            # re-derives an inlined value at every use while it generates a kernel (each mask is read by
            # several selects, each weight by every token), and gcc turns the products by constants back into
            # the same shifts. Measured (fresh cache): the first 8-token call of test LAYOUTS[0] 102 s -> 48 s.
            u = v >> shifts[j0]
            if f == width:                                                 # _nibbles: one index a slot already
                spread = u
            elif width - f >= p * f:                                       # u's shifted copies do not overlap,
                spread = u * sum(1 << (j * (width - f)) for j in range(h))  # so their sum is their OR
            else:
                spread = u                                                 # index j0 + j's bits at j·width
                for j in range(1, h):                                      # (other bits land where no mask looks)
                    spread = spread | (u << (j * (width - f)))
            if h == 1:                                                     # bit i, smeared by two shifts
                masks = [(u << (31 - i)) >> 31 for i in range(B)]
            else:                                                          # bit i of each index, over its slot:
                masks = [((spread >> i) & ones) * (2**width - 1) for i in range(B)]  # t·(2^w - 1) = (t << w) - t
            word = select(masks, values)
            weights += [unpack_field(word, f, 32 // (h * d)) for f in range(h * d)]
        return weights
    word = torch.gather(P[..., None].expand(*P.shape, v.shape[-1]), 2, v.long())  # P[block, group, v]
    return [unpack_field(word, q, 8) for q in range(p * d)]


def part_inputs(x: torch.Tensor, part: dict) -> torch.Tensor:
    """x (T, n) -> (T, Q, G, C): the input that weight q of byte c of group g multiplies. Gathered outside the
    compiled kernels: inlined into them, it costs two dependent loads per use."""
    return x.index_select(1, part["cols"].reshape(-1)).reshape(x.shape[0], *part["cols"].shape)


def decode_part(xg, S, P, s, B: int, p: int, d: int) -> torch.Tensor:
    """y (T, m) = W_part x for each of T (few) tokens, decoding the weights in registers, never forming W.
    xg (T, Q, G, C) fp32: `part_inputs`."""
    weights = byte_weights(S.flatten(2, 3).int(), P, B, p, d)              # Q × (NB, G, C, Rb)
    sums = []
    for xt in xg:                                                          # unrolled: each weight serves all T
        acc = weights[0] * xt[0, :, :, None]
        for q in range(1, len(weights)):
            acc = acc + weights[q] * xt[q, :, :, None]
        sums.append(acc.sum(2))                                            # (NB, G, Rb)
    return (torch.stack(sums) * s).sum(2).reshape(xg.shape[0], -1)       # scale per (tile × group), then Σ_g


def dequantize_part(S, P, s, B: int, p: int, d: int) -> list:
    """Wᵀ of the blocks given, scaled, as Q matrices (G·C, NB·Rb): row g·C + c of matrix q is input column
    cols[q, g, c]. All are written by the loop that decodes the bytes, 16 rows at a time: no transposing copy."""
    S = S.flatten(2, 3)
    NB, G, C, Rb = S.shape
    return [(w * s[:, :, None, :]).permute(1, 2, 0, 3).contiguous().reshape(G * C, NB * Rb)
            for w in byte_weights(S.int(), P, B, p, d)]


def dequantize_parts(Ss: list, Ps: list, ss: list, codes: list) -> torch.Tensor:
    """Wᵀ of a block of W as one matrix, compiled as one call: every part's Q matrices of dequantize_part stacked
    in order, so that row i multiplies input column cat([q["cols"][:, g0:g1].reshape(-1) for each part])[i].
    Inductor lets the loop that decodes a part's bytes write its rows of the stacked result directly (pointwise
    concatenation turned off: see _OPTIONS_OF): no copy, and a block is then a single matrix product."""
    return torch.cat([Wt for S, P, s, code in zip(Ss, Ps, ss, codes) for Wt in dequantize_part(S, P, s, *code)])


def _prefill_plan(parts: list[dict], n: int, m: int, block_bytes: int, min_rows: int):
    """prefill_matmul's blocks, worked out once per layer (kept in its first part): per column chunk, the input
    columns of its Wᵀ rows; per block of rows, per chunk, the dequantize call's arguments (views of the parts'
    tensors: slicing them at every call costs ~0.2 ms, 1536², 256 tokens)."""
    key = ("plan", n, m, block_bytes, min_rows)
    if key not in parts[0]:
        lcm = math.lcm(*[q["S"].shape[-1] for q in parts])                 # blocks end on every part's block edge
        rows = max(lcm, min(m, max(block_bytes // (4 * n), min_rows)) // lcm * lcm)
        chunks = min(n, max(1, -(-4 * n * rows // block_bytes)))           # column chunks per row block
        bounds = torch.tensor([c * n // chunks for c in range(chunks)] + [n])
        edges = [torch.searchsorted(q["cols"][0, :, 0].contiguous(), bounds).tolist() for q in parts]  # by the
        ranges = [[(e[c], e[c + 1]) for e in edges] for c in range(chunks)]  # groups' first columns, ascending
        ranges = [r for r in ranges if any(g1 > g0 for g0, g1 in r)]
        cols = [torch.cat([q["cols"][:, g0:g1].reshape(-1) for q, (g0, g1) in zip(parts, r)]) for r in ranges]
        blocks = []
        for r0 in range(0, m, rows):
            calls = []
            for r in ranges:
                args = []
                for q, (g0, g1) in zip(parts, r):
                    if g1 > g0:
                        Rb = q["S"].shape[-1]
                        S, P, s = [t[r0 // Rb:(r0 + rows) // Rb, g0:g1] for t in (q["S"], q["P"], q["s"])]
                        args.append((*_dynamic(S, P, s), q["code"]))
                calls.append(list(map(list, zip(*args))))                  # Ss, Ps, ss, codes
            blocks.append(calls)
        parts[0][key] = cols, blocks
    return parts[0][key]


PREFILL_BLOCK_BYTES = 16 << 20  # Wᵀ dequantized at a time by prefill_matmul, and the fewest rows it takes (see there)
PREFILL_MIN_ROWS = 2048


def prefill_matmul(x: torch.Tensor, parts: list[dict], m: int, block_bytes=PREFILL_BLOCK_BYTES,
                   min_rows=PREFILL_MIN_ROWS) -> torch.Tensor:
    """y (T, m) = x Wᵀ for many tokens: dequantize a block of W at a time (one compiled call), multiply the input's
    columns it needs by it (one matrix product), and sum over the blocks. A block takes about 16 MB: freed memory
    past glibc's trim threshold goes back to the system and comes back as page faults (a 55 MB Wᵀ at once costs
    13,000 of them, 1536 × 8960). It spans at least min_rows rows (or all m), since MKL runs a product with few
    columns slowly (256 tokens, 1536 × 8960 as 4 products of 464 rows: 50 ms, as one: 39 ms), and as many input
    columns as then fit (whole column groups). Returns fp32: bf16/fp16 products are summed in fp32."""
    deq = _compiled_fn("dequantize", dequantize_parts)
    cols, blocks = _prefill_plan(parts, x.shape[1], m, block_bytes, min_rows)
    xps = [x.index_select(1, c) for c in cols]                             # (T, columns of chunk), in Wᵀ's row order
    ys = []
    for calls in blocks:
        y = None
        for args, xp in zip(calls, xps):
            Wt = deq(*args)                                                # (columns of the chunk, rows of the block)
            if x.dtype == torch.float32:
                y = xp @ Wt if y is None else torch.addmm(y, xp, Wt, out=y)
            else:                                                          # a bf16/fp16 product, rounded once
                prod = (xp @ Wt.to(x.dtype)).float()
                y = prod if y is None else y.add_(prod)
        ys.append(y)
    return ys[0] if len(ys) == 1 else torch.cat(ys, 1)                    # (T, m)


DECODE_TOKENS = 8       # tokens per decode call: each count compiles its own kernel (the token loop is unrolled)
PREFILL_MIN_TOKENS = 32  # from here dequantize + matmul beats decoding in chunks of 8 (measured, see README)
_compiled = {}         # name -> compiled function, "failed" -> True once compilation has failed
_OPTIONS = {           # inductor settings of these kernels only (measured with --bench; not global)
    "realize_opcount_threshold": 10_000,  # keep the select tree inside the reduction loop (else W is stored)
    "realize_reads_threshold": 10_000,
    "realize_acc_reads_threshold": 10_000,
    "assert_indirect_indexing": False,    # a gather's index is < K^p by construction: no bounds check per load
    "cpp.enable_floating_point_contract_flag": "fast",  # acc + w·x as one FMA
}
_OPTIONS_OF = {        # and of one kernel: dequantize_parts' concatenation as a buffer its inputs write into, not a
    "dequantize": {"max_pointwise_cat_inputs": 0},  # pointwise loop that decodes each byte once per matrix
}


def _known(options: dict) -> dict:
    """The options this torch's inductor has: an older release lacks some, and they only tune speed."""
    from torch._inductor import config
    known = {}
    for key, value in options.items():
        *path, last = key.split(".")
        section = config
        for name in path:
            section = getattr(section, name, None)
        if section is not None and hasattr(section, last):
            known[key] = value
    return known


def _compiled_fn(name: str, fn):
    if name not in _compiled:
        # one cache entry per shape family (code, block rows, token count 1..8): a mixed-precision model has a few
        # dozen. dynamic=False: only the dims marked by `_dynamic` (blocks, groups) vary; the rest stay constants.
        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # its older name
        setattr(cfg, limit, max(getattr(cfg, limit), 256))
        _compiled[name] = torch.compile(fn, dynamic=False, options=_known({**_OPTIONS, **_OPTIONS_OF.get(name, {})}))
    return _compiled[name]


def decode_parts(xgs: list, Ss: list, Ps: list, ss: list, codes: list) -> torch.Tensor:
    """y (T, m) = Σ over the bit-widths' parts of decode_part: compiled as one call, so that a mixed-precision
    layer pays the compiled call's fixed cost (~15-35 µs: guards, wrapper, allocation) once, not once a part."""
    y = None
    for xg, S, P, s, code in zip(xgs, Ss, Ps, ss, codes):
        yq = decode_part(xg, S, P, s, *code)
        y = yq if y is None else y + yq
    return y


def decode_matmul(x: torch.Tensor, parts: list[dict]) -> torch.Tensor:
    """y (T, m) fp32 = x Wᵀ for few tokens: chunks of at most DECODE_TOKENS, all bit-widths in one decode call."""
    decode, ys = _compiled_fn("decode", decode_parts), []
    for xc in (x,) if x.shape[0] <= DECODE_TOKENS else x.split(DECODE_TOKENS):
        xgs = [part_inputs(xc, q).float() for q in parts]                  # (t, Q, G, C) each
        for xg in xgs:
            torch._dynamo.maybe_mark_dynamic(xg, 2)                        # G varies; the token count stays fixed
        ys.append(decode(xgs, *([q[k] for q in parts] for k in ("S", "P", "s", "code"))))   # (t, m)
    return ys[0] if len(ys) == 1 else torch.cat(ys)


def vq_linear(x: torch.Tensor, layer: "VQLinear") -> torch.Tensor:
    """y = x Wᵀ + bias: in-register decode for few tokens, dequantize-then-matmul for many; reference if no compiler."""
    x2 = x.reshape(-1, layer.in_features)                                  # (T, n)
    T, m = x2.shape[0], layer.out_features
    if _compiled.get("failed") or T == 0 or layer.d > 4:
        return layer.reference_forward(x)
    parts = layer.fast_parts()
    try:
        if T < PREFILL_MIN_TOKENS:
            y = decode_matmul(x2, parts).to(x.dtype)                      # (T, m)
        else:
            y = prefill_matmul(x2, parts, m).to(x.dtype)                  # (T, m)
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


def mix_pattern(counts: dict, length: int = 16) -> list[int]:
    """A cycle of `length` group bit-widths in the proportions of counts {bits: groups}, spread evenly."""
    total = sum(counts.values())
    n = {b: round(length * c / total) for b, c in counts.items()}
    n[max(n, key=n.get)] += length - sum(n.values())                     # rounding: the commonest takes the rest
    slots = sorted((( i + 0.5) / k, b) for b, k in n.items() for i in range(k))
    return [b for _, b in slots]


def mgvq_variant(path=None, tile_rows=None) -> dict:
    """The layout `--method mgvq --bits 2` emits: its mix of 1-, 2- and 3-bit weights, read from a saved run's
    mgvq.json (all its quantized layers together, each group weighed by its rows), or by default MGVQ_MIX; the
    tile rows and codebook kind per bit-width are those mgvq.py chooses (mgvq.tile_rows_for at its defaults,
    or `tile_rows`)."""
    counts = dict(MGVQ_MIX)
    if path:
        import json
        counts = {}
        for layout in json.loads(open(path).read())["layouts"].values():
            for b in layout["group_bits"]:
                counts[b] = counts.get(b, 0) + layout.get("out_features", 1)
    return dict(d=2, bits=mix_pattern(counts), tile_rows=tile_rows or MGVQ_TILE_ROWS, per_coordinate=[3])


# weights (rows x 128-column groups) per bit-width of `python mgvq.py --model testbed --method mgvq --bits 2`
# (seed 0, 2026-12-02, the same at --codebook-overhead 0.2 and 0.075): 36 % at 1 bit, 28 % at 2, 36 % at 3
MGVQ_MIX = {1: 13312 * 128, 2: 10240 * 128, 3: 13312 * 128}
MGVQ_TILE_ROWS = {1: 16, 2: 32, 3: 16}   # mgvq.py's (--codebook-overhead 0.075): every tile fills the 16 lanes
SMALL_TILE_ROWS = {1: 4, 2: 16, 3: 8}    # what it chose before, at 0.2: 1- and 3-bit tiles merged, per-lane codebooks
VARIANTS = {"2bit-d2": dict(d=2, bits=[2], tile_rows={2: 16}),            # bits: group bit-widths, cycled
            "mgvq": mgvq_variant(),
            "mgvq-small-tiles": mgvq_variant(tile_rows=SMALL_TILE_ROWS),
            "mixed123-d2": dict(d=2, bits=[2, 1, 2, 3], tile_rows={1: 8, 2: 16, 3: 64}),   # joint 3-bit: 64 codewords
            "2bit-d4": dict(d=4, bits=[2], tile_rows={2: 64})}


def random_layer(m, n, d, bits, tile_rows, dtype=torch.float32, device="cpu", group_size=128, bias=False,
                 per_coordinate=()):
    """A VQLinear of the given layout filled with random bytes (every byte string is a valid index stream)."""
    pattern = bits
    bits = [pattern[g % len(pattern)] for g in range(n // group_size)]
    tile_rows = {b: math.gcd(t, m) for b, t in tile_rows.items() if b in bits}   # a tile-row count that divides m
    per_coordinate = [b for b in per_coordinate if b in bits]
    layer = VQLinear(n, m, d, group_size, bits, tile_rows, bias, dtype, per_coordinate).to(device)
    for b in layer.bits:
        getattr(layer, f"groups_{b}").copy_(torch.tensor([g for g, c in enumerate(bits) if c == b]))
        getattr(layer, f"codes_{b}").random_(0, 256)
        getattr(layer, f"codebook_{b}").random_(-128, 128)
        getattr(layer, f"scale_{b}").uniform_(1e-3, 1e-2)
    return layer


def _copies(layer, nbytes):
    """Shallow copies of a VQLinear, each with its own repacked tensors and prefill plan (for cold-cache timing)."""
    parts = layer.fast_parts()
    size = sum(q[k].nbytes for q in parts for k in ("S", "P", "s", "cols"))
    out = []
    for _ in range(max(2, nbytes // size)):
        c = copy.copy(layer)
        c._fast = []
        for q in parts:
            S, P, s = _dynamic(q["S"].clone(), q["P"].clone(), q["s"].clone())
            own = {k: v for k, v in q.items() if isinstance(k, str)}      # not a prefill plan: it holds views
            c._fast.append(dict(own, S=S, P=P, s=s, cols=q["cols"].clone()))  # of the original's tensors
        _prefill_plan(c._fast, layer.in_features, layer.out_features, PREFILL_BLOCK_BYTES, PREFILL_MIN_ROWS)
        out.append(c)                                                      # (a layer plans once: not timed)
    return out, size


def _ms_pair(dense, dense_items, vq, vq_items, sync, window_ms=20.0, side_s=1.0, rounds=(9, 200)):
    """(dense ms, VQ ms): for each, the best over rounds of the mean time of one call. Rounds alternate: each times
    k calls of dense on the next dense_items in turn, then k calls of vq on the next vq_items in turn (each side
    cycles through all its items over the rounds, so that an item is cold when it comes round again). k makes a
    window of about window_ms, the same k on both sides; there are as many rounds as fit in about side_s a side
    (within `rounds`). Short windows, many of them, alternating: on a shared machine whose speed comes and goes,
    each side's best window is one that no slow spell fell on, and a spell falls on both sides alike."""
    at = [0, 0]
    def window(f, items, side, k):
        t0 = time.perf_counter()
        for i in range(at[side], at[side] + k):
            f(items[i % len(items)])
        sync()
        at[side] += k
        return (time.perf_counter() - t0) / k
    for f, items in ((dense, dense_items), (vq, vq_items)):                # warm-up
        f(items[0]), f(items[-1])
    sync()
    t = max(window(dense, dense_items, 0, 1), window(vq, vq_items, 1, 1))
    k = max(1, round(window_ms / 1e3 / t))
    n = min(rounds[1], max(rounds[0], round(side_s / (k * t))))
    best = [float("inf"), float("inf")]
    for _ in range(n):
        best[0] = min(best[0], window(dense, dense_items, 0, k))
        best[1] = min(best[1], window(vq, vq_items, 1, k))
    return best[0] * 1e3, best[1] * 1e3


def bench_layers(shapes, tokens, variants, device, dtype, cold_bytes):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    print(f"{'shape':>11} {'variant':>12} {'T':>4} | {'dense ms':>8} {'vq ms':>7} {'speedup':>7} | "
          f"{'hot dense':>9} {'hot vq':>7} {'speedup':>7} | {'dense GB/s':>10} {'vq GB/s':>8} {'vq MB':>6}")
    for m, n in shapes:
        W = torch.randn(m, n, device=device, dtype=dtype)
        Ws = [W.clone() for _ in range(max(2, cold_bytes // W.nbytes))]
        for name in variants:
            layers, vq_bytes = _copies(random_layer(m, n, **VARIANTS[name], dtype=dtype, device=device), cold_bytes)
            for T in tokens:
                x = torch.randn(T, n, device=device, dtype=dtype)
                dc, vc = _ms_pair(lambda w: F.linear(x, w), Ws, lambda l: l(x), layers, sync)
                dh, vh = _ms_pair(lambda w: F.linear(x, w), [W], lambda l: l(x), layers[:1], sync)
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
    for layer in model.model.language_model.layers:
        for parent in list(layer.modules()):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    vq = random_layer(lin.out_features, lin.in_features, **VARIANTS[variant], dtype=lin.weight.dtype,
                                      device=lin.weight.device, bias=lin.bias is not None)
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


def bench_decode(device, dtype, new_tokens, variants=("2bit-d2",), toy_dir="toy"):
    """Greedy decode tok/s, dense and then each VQ layout in every decoder linear (a fresh model each)."""
    from transformers import Qwen2VLForConditionalGeneration
    out = []
    models = [("qwen2-vl-2b-size random", lambda: Qwen2VLForConditionalGeneration(qwen2vl_2b_config()))]
    if os.path.isdir(toy_dir):
        models.insert(0, ("toy", lambda: Qwen2VLForConditionalGeneration.from_pretrained(toy_dir)))
    else:
        print(f"(no {toy_dir}/ folder: the toy model is skipped)")
    for name, build in models:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build().to(device=device, dtype=dtype).eval()
        dense = decode_tok_s(model, new_tokens)
        for i, variant in enumerate(variants):
            if i:
                del model
                torch.manual_seed(0)
                model = build().to(device=device, dtype=dtype).eval()
            vq = decode_tok_s(quantize_decoder_(model, variant), new_tokens)
            out.append(dict(model=name, variant=variant, dense_tok_s=round(dense, 2), vq_tok_s=round(vq, 2),
                            speedup=round(vq / dense, 3)))
            print(f"decode {name}: dense {dense:.2f} tok/s, VQ {variant} {vq:.2f} tok/s ({vq / dense:.2f}x)"
                  f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
        del model
    return out


def main():
    import argparse
    import json
    ap = argparse.ArgumentParser(description="VQLinear fast path vs dense F.linear")
    ap.add_argument("--bench", action="store_true", help="run the benchmark (the default action)")
    ap.add_argument("--quick", action="store_true", help="LM shapes, 2bit-d2 and mgvq, tokens 1 and 256, no decode")
    ap.add_argument("--shapes", default=None, help="e.g. 1536x1536,8960x1536 (out x in)")
    ap.add_argument("--tokens", default="1,4,16,256")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=24, help="greedy tokens for the whole-model decode figure")
    ap.add_argument("--decode-variant", default="2bit-d2,mgvq",
                    help="the layouts every decoder linear gets for the whole-model decode figure, comma-separated")
    ap.add_argument("--mgvq-json", default=None,
                    help="the mgvq variant's bit mix from this saved run's mgvq.json (default: the README's run)")
    ap.add_argument("--no-layers", action="store_true", help="only the whole-model decode figure")
    ap.add_argument("--no-decode", action="store_true", help="only the layer figures")
    ap.add_argument("--cold-mb", type=int, default=512, help="distinct weight copies cycled for the cold figure")
    args = ap.parse_args()
    if not (args.quick or args.no_decode) and (error := transformers_error()):
        ap.exit(2, f"error: {error}\n")                                 # before the layer figures, not after
    VARIANTS["mgvq"] = mgvq_variant(args.mgvq_json)
    VARIANTS["mgvq-small-tiles"] = mgvq_variant(args.mgvq_json, SMALL_TILE_ROWS)
    for v in args.variants.split(",") + args.decode_variant.split(","):
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}: choose from {', '.join(VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32         # CPU bf16 matmul is slow: fp32 there
    if device == "cuda":                                                   # as gpt-fast does
        torch._inductor.config.coordinate_descent_tuning = True
    shapes = SHAPES["lm"] + SHAPES["vision"]
    tokens, variants = [int(t) for t in args.tokens.split(",")], args.variants.split(",")
    if args.quick:
        shapes, tokens, variants = SHAPES["lm"], [1, 256], ["2bit-d2", "mgvq"]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, {dtype}, torch {torch.__version__}, cold = cycling {args.cold_mb} MB of copies")
    results = [] if args.no_layers else bench_layers(shapes, tokens, variants, device, dtype, args.cold_mb << 20)
    decode = [] if args.quick or args.no_decode else bench_decode(device, dtype, args.new_tokens, args.decode_variant.split(","))
    print(json.dumps(dict(device=name, results=results, decode=decode)))


if __name__ == "__main__":
    main()
