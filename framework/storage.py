"""Compressed tensor storage and bits-per-value (BPV) accounting, shared by every compression plugin.

A :class:`PackedTensor` holds a tensor in one of three formats, every part a byte-exact ``uint8`` or value tensor:
``dense`` (all values), ``bitmask`` (nonzero values in row-major order plus a mask, coded either as 1 bit per
element or as Golomb-Rice codes of the zero-run lengths) and ``nm`` (N:M structure: n values per group of m
along the last dim plus the kept positions, either as ceil(log2 m)-bit in-group indices, as in NVIDIA's 2:4 format,
or enumeratively: each group's n-of-m pattern as its rank among the C(m, n) patterns, ranks of consecutive groups
packed in mixed radix into 62-bit words, within about 2% of the log2(C(m, n)) / m floor). Integer codes
(``value_bits`` 2..8) are bit-packed two's complement, or Huffman-coded (``value_coding``: a canonical prefix code
per tensor, its code lengths stored as a part), so ``storage_bits`` is the honest on-disk size.
Bit streams are MSB-first within each byte (``np.packbits`` order). A file is one safetensors file whose
tensors are named ``<name>.<part>``; formats, shapes and parameters live as JSON in its metadata header.
Zeros are ``value == 0``, so ``-0.0`` is stored as a zero and decodes as ``0.0`` in the sparse formats.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMATS = ("dense", "bitmask", "nm")
MASK_CODINGS = ("bits", "golomb")
INDEX_CODINGS = ("positions", "enumerative")
VALUE_CODINGS = ("fixed", "huffman")
_MAX_CODE_BITS = 24  # longer Huffman codes (extremely skewed counts) fall back to fixed-width codes
_WORD_BITS = 62  # mixed-radix words of enumerative N:M indices stay below 2**62 (exact int64 arithmetic)
_FILE_KEY = "vlmc.packed"
_ENTRIES_KEY = "vlmc.entries"
_FILE_VERSION = "1"
_PARTS = {"dense": ("values",), "bitmask": ("values", "mask"), "nm": ("values", "index")}


@dataclass
class PackedTensor:
    """A tensor in a compressed storage format.

    Args:
        format: ``"dense"``, ``"bitmask"`` or ``"nm"``.
        shape: shape of the decoded tensor.
        dtype: torch dtype name of the decoded tensor, e.g. ``"float32"``, ``"bfloat16"``, ``"int8"``.
        value_bits: bits per stored value (the dtype width for floats, 2..8 for integer codes).
        tensors: the stored parts (``values`` plus ``mask`` or ``index``), all byte-exact storage.
        meta: format parameters, e.g. ``{"n": 2, "m": 4}`` or ``{"mask_coding": "golomb", "golomb_k": 1}``.
    """

    format: str
    shape: tuple[int, ...]
    dtype: str
    value_bits: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, int | float | str] = field(default_factory=dict)

    def storage_bits(self) -> int:
        """Exact bits of every stored part (values and mask/index metadata), excluding file headers."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors.values())

    def numel(self) -> int:
        """Number of elements of the decoded tensor."""
        return math.prod(self.shape)


# ----------------------------------------------------------------------------------------------- bit helpers


def _pack_fixed(values: np.ndarray, width: int) -> np.ndarray:
    """Pack non-negative integers at ``width`` bits each (MSB first) into ceil(count * width / 8) bytes."""
    if width == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    # Unpack each value's big-endian bytes to bits and keep the low ``width`` columns: no per-element loop.
    nbytes = 1 if width <= 8 else 2 if width <= 16 else 4 if width <= 32 else 8
    big = values.astype(f">u{nbytes}").view(np.uint8).reshape(-1, nbytes)
    bits = np.unpackbits(big, axis=1)[:, nbytes * 8 - width :]
    return np.packbits(bits.reshape(-1))


def _unpack_fixed(data: np.ndarray, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_fixed`: ``count`` integers (int64) of ``width`` bits each."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(data, count=count * width).reshape(count, width)
    nbytes = 1 if width <= 8 else 2 if width <= 16 else 4 if width <= 32 else 8
    padded = np.zeros((count, nbytes * 8), dtype=np.uint8)
    padded[:, nbytes * 8 - width :] = bits
    return np.packbits(padded, axis=1).view(f">u{nbytes}").reshape(-1).astype(np.int64)


def _runs(mask: np.ndarray) -> np.ndarray:
    """Zero-run length before each nonzero of a flat boolean mask."""
    pos = np.flatnonzero(mask)
    return np.diff(pos, prepend=-1) - 1


def _rice_bits(runs: np.ndarray, k: int) -> int:
    """Length in bits of the Rice code (parameter 2**k) of ``runs``."""
    return int(runs.size * (k + 1) + int(np.sum(runs >> k)))


def _rice_parameter(runs: np.ndarray, numel: int) -> int:
    """Rice parameter k for these runs: the geometric optimum for the measured density, refined exactly.

    Gallager and van Voorhis: for i.i.d. zeros with probability theta the optimal Golomb divisor is
    ceil(log(1 + theta) / -log(theta)); its nearest power of two gives k. Real masks are not i.i.d., so the
    neighbours of that k and the k that needs no unary bits at all (a worst-case bound) are costed exactly.
    """
    nnz = runs.size
    if nnz == 0 or nnz == numel:
        return 0
    theta = 1.0 - nnz / numel
    divisor = math.ceil(math.log1p(theta) / -math.log(theta))
    k0 = max(0, round(math.log2(divisor)))
    k_max = int(runs.max()).bit_length()
    candidates = sorted({max(0, k0 - 1), k0, k0 + 1, k_max})
    return min(candidates, key=lambda k: _rice_bits(runs, k))


def _golomb_encode(mask: np.ndarray, k: int) -> np.ndarray:
    """Rice-code the zero runs of a flat mask into bytes.

    The stream holds every run's unary part (q ones then a zero) followed by every run's k-bit remainder. This is
    the same number of bits as interleaved Rice codewords, but both halves decode without a sequential scan.
    """
    runs = _runs(mask)
    if runs.size == 0:
        return np.zeros(0, dtype=np.uint8)
    quotients = runs >> k
    terminators = np.cumsum(quotients + 1) - 1
    unary = np.ones(int(terminators[-1]) + 1, dtype=np.uint8)
    unary[terminators] = 0
    remainder = runs & ((1 << k) - 1)
    if k:
        rem_bits = np.unpackbits(_pack_fixed(remainder, k), count=runs.size * k)
        unary = np.concatenate([unary, rem_bits])
    return np.packbits(unary)


def _golomb_decode(data: np.ndarray, k: int, nnz: int, numel: int) -> np.ndarray:
    """Inverse of :func:`_golomb_encode`: the flat boolean mask.

    Raises:
        ValueError: if the stream does not hold ``nnz`` codewords that fit in ``numel`` elements.
    """
    mask = np.zeros(numel, dtype=bool)
    if nnz == 0:
        return mask
    bits = np.unpackbits(data)
    zeros = np.flatnonzero(bits == 0)
    if zeros.size < nnz:
        raise ValueError(f"golomb mask holds fewer than {nnz} codewords")
    terminators = zeros[:nnz]
    quotients = np.diff(terminators, prepend=-1) - 1
    start = int(terminators[-1]) + 1
    if bits.size - start < nnz * k:
        raise ValueError("golomb mask is truncated")
    remainder = _unpack_fixed(np.packbits(bits[start : start + nnz * k]), k, nnz)
    positions = np.cumsum((quotients << k) + remainder + 1) - 1
    if positions[-1] >= numel:
        raise ValueError(f"golomb mask runs past the {numel} elements of the tensor")
    mask[positions] = True
    return mask


# ------------------------------------------------------------------------------------------------ values


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _is_code_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _resolve_value_bits(dtype: torch.dtype, value_bits: int | None) -> int:
    """Bits per stored value for ``dtype``.

    Raises:
        ValueError: for integer codes without ``value_bits`` in 2..8, a float width other than the dtype's,
            or an unsupported dtype.
    """
    if dtype.is_floating_point:
        width = torch.finfo(dtype).bits
        if value_bits is not None and value_bits != width:
            raise ValueError(
                f"value_bits={value_bits} does not match {_dtype_name(dtype)} ({width} bits); floats are stored as-is"
            )
        return width
    if not _is_code_dtype(dtype):
        raise ValueError(f"unsupported dtype {_dtype_name(dtype)}; expected a float or integer-code tensor")
    if value_bits is None or not isinstance(value_bits, int) or not 2 <= value_bits <= 8:
        raise ValueError(f"integer codes ({_dtype_name(dtype)}) need value_bits in 2..8, got {value_bits!r}")
    return value_bits


def _code_range(dtype: torch.dtype, bits: int) -> tuple[int, int]:
    if dtype.is_signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _encode_values(values: torch.Tensor, value_bits: int) -> torch.Tensor:
    """Stored form of a flat value tensor: floats as-is, integer codes bit-packed two's complement.

    Raises:
        ValueError: if an integer code does not fit in ``value_bits``.
    """
    if values.dtype.is_floating_point:
        return values.contiguous().clone()
    codes = values.numpy().astype(np.int64)
    low, high = _code_range(values.dtype, value_bits)
    if codes.size and (codes.min() < low or codes.max() > high):
        raise ValueError(
            f"integer codes span [{codes.min()}, {codes.max()}], outside the {value_bits}-bit range [{low}, {high}]"
        )
    return torch.from_numpy(_pack_fixed(codes & ((1 << value_bits) - 1), value_bits))


def _decode_values(packed: PackedTensor, count: int) -> torch.Tensor:
    """The ``count`` stored values of ``packed`` as a flat tensor of its dtype."""
    dtype = _torch_dtype(packed.dtype)
    stored = packed.tensors["values"]
    if dtype.is_floating_point:
        return stored
    bits = packed.value_bits
    if _value_coding(packed) == "huffman":
        low = _code_range(dtype, bits)[0]
        symbols = _huffman_decode(stored.numpy(), packed.tensors["code_lengths"].numpy(), count,
                                  int(packed.meta["value_stream_bits"]))
        return torch.from_numpy(symbols + low).to(dtype)
    codes = _unpack_fixed(stored.numpy(), bits, count)
    if dtype.is_signed:
        codes = np.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    return torch.from_numpy(codes).to(dtype)


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length per symbol (0 for unused symbols) of a Huffman code for ``counts``."""
    import heapq

    used = np.flatnonzero(counts)
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(counts[i]), int(i), [int(i)]) for i in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical prefix codes for ``lengths`` (symbols ordered by length, then value)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda i: (lengths[i], i)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol], previous = code, int(lengths[symbol])
        code += 1
    return codes


def _huffman_encode(symbols: np.ndarray, alphabet: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``symbols`` (ints in [0, alphabet)) as a Huffman bit stream: (stream bytes, code lengths, stream bits), or
    ``None`` when a code would exceed ``_MAX_CODE_BITS``."""
    lengths = _huffman_lengths(np.bincount(symbols, minlength=alphabet))
    if lengths.max(initial=0) > _MAX_CODE_BITS:
        return None
    codes, width = _canonical_codes(lengths), int(lengths.max(initial=1))
    chunks, total = [], 0
    for start in range(0, len(symbols), 1 << 18):  # bounded memory: one bit matrix per chunk
        part = symbols[start:start + (1 << 18)]
        length = lengths[part]
        shift = length[:, None] - 1 - np.arange(width)
        bits = (codes[part][:, None] >> np.maximum(shift, 0)) & 1
        chunks.append(bits[shift >= 0].astype(np.uint8))
        total += int(length.sum())
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    return np.packbits(stream), lengths.astype(np.uint8), total


def _huffman_decode(data: np.ndarray, lengths: np.ndarray, count: int, total: int) -> np.ndarray:
    """Inverse of :func:`_huffman_encode`: ``count`` symbols.

    Raises:
        ValueError: if the stream does not decode to exactly ``count`` symbols in ``total`` bits.
    """
    lengths = lengths.astype(np.int64)
    width = int(lengths.max(initial=1))
    codes = _canonical_codes(lengths)
    # Window table: the ``width`` bits at a position determine the symbol that starts there and its length.
    table_symbol = np.full(1 << width, -1, dtype=np.int64)
    table_length = np.zeros(1 << width, dtype=np.int64)
    for symbol in np.flatnonzero(lengths):
        span = width - int(lengths[symbol])
        first = int(codes[symbol]) << span
        table_symbol[first:first + (1 << span)] = symbol
        table_length[first:first + (1 << span)] = lengths[symbol]
    bits = np.unpackbits(data, count=total).astype(np.int64)
    padded = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    window = np.zeros(total, dtype=np.int64)
    for offset in range(width):  # the window starting at every bit position, vectorised
        window = (window << 1) | padded[offset:offset + total]
    step = table_length[window] if total else table_length[:0]
    symbol_at = table_symbol[window] if total else table_symbol[:0]
    out = np.empty(count, dtype=np.int64)
    position = 0
    for i in range(count):  # prefix codes: each symbol starts where the previous one ends
        if position >= total or step[position] == 0:
            raise ValueError(f"Huffman value stream ends or breaks after {i} of {count} values")
        out[i] = symbol_at[position]
        position += int(step[position])
    if position != total:
        raise ValueError(f"Huffman value stream has {total - position} bits left after {count} values")
    return out


def _use_value_coding(packed: PackedTensor, value_coding: str) -> PackedTensor:
    """Re-code ``packed``'s integer values with ``value_coding`` (``auto``: Huffman when it is smaller)."""
    if value_coding == "fixed" or _torch_dtype(packed.dtype).is_floating_point:
        if value_coding == "huffman":
            raise ValueError("value_coding 'huffman' applies to integer codes; floats are stored as-is")
        return packed
    count, bits = _value_count(packed), packed.value_bits
    low = _code_range(_torch_dtype(packed.dtype), bits)[0]
    symbols = _decode_values(packed, count).numpy().astype(np.int64) - low
    coded = _huffman_encode(symbols, 1 << bits)
    if coded is None:
        if value_coding == "huffman":
            raise ValueError(f"value_coding 'huffman': a code would exceed {_MAX_CODE_BITS} bits for these counts")
        return packed
    stream, lengths, total = coded
    tensors = {**packed.tensors, "values": torch.from_numpy(stream), "code_lengths": torch.from_numpy(lengths)}
    recoded = PackedTensor(packed.format, packed.shape, packed.dtype, bits, tensors,
                           {**packed.meta, "value_coding": "huffman", "value_stream_bits": total})
    # auto: only when it saves at least 1%; Huffman streams decode value by value, slower than fixed-width codes.
    if value_coding == "auto" and recoded.storage_bits() > 0.99 * packed.storage_bits():
        return packed
    return recoded


def _value_coding(packed: PackedTensor) -> str:
    return str(packed.meta.get("value_coding", "fixed"))


def _parts(packed: PackedTensor) -> tuple[str, ...]:
    return (*_PARTS[packed.format], *(("code_lengths",) if _value_coding(packed) == "huffman" else ()))


def _value_count(packed: PackedTensor) -> int:
    if packed.format == "bitmask":
        return int(packed.meta["nnz"])
    if packed.format == "nm":
        return packed.numel() // int(packed.meta["m"]) * int(packed.meta["n"])
    return packed.numel()


# ------------------------------------------------------------------------------------------------ pack / unpack


def _pack_dense(flat: torch.Tensor, shape: tuple[int, ...], value_bits: int) -> PackedTensor:
    values = _encode_values(flat, value_bits)
    return PackedTensor("dense", shape, _dtype_name(flat.dtype), value_bits, {"values": values}, {})


def _pack_bitmask(flat: torch.Tensor, shape: tuple[int, ...], value_bits: int, mask_coding: str) -> PackedTensor:
    nonzero = flat != 0
    mask = nonzero.numpy()
    values = _encode_values(flat[nonzero], value_bits)
    meta: dict[str, int | float | str] = {"nnz": int(mask.sum())}
    if mask_coding == "auto":
        runs = _runs(mask)
        k = _rice_parameter(runs, mask.size)
        # Pick the smaller coding for this tensor; ties go to plain bits, which decode faster.
        mask_coding = "golomb" if math.ceil(_rice_bits(runs, k) / 8) < math.ceil(mask.size / 8) else "bits"
    if mask_coding == "golomb":
        k = _rice_parameter(_runs(mask), mask.size)
        coded = _golomb_encode(mask, k)
        meta.update(mask_coding="golomb", golomb_k=k)
    else:
        coded = np.packbits(mask)
        meta.update(mask_coding="bits")
    parts = {"values": values, "mask": torch.from_numpy(coded)}
    return PackedTensor("bitmask", shape, _dtype_name(flat.dtype), value_bits, parts, meta)


def _patterns(n: int, m: int) -> np.ndarray:
    """Every sorted n-subset of range(m), row r being the subset of combinatorial rank r (colex order)."""
    from itertools import combinations

    subsets = np.array(list(combinations(range(m), n)), dtype=np.int64)
    return subsets[np.argsort(_ranks(subsets, n, m), kind="stable")]


def _ranks(index: np.ndarray, n: int, m: int) -> np.ndarray:
    """Combinatorial number system: sorted positions c_1 < ... < c_n -> sum_j C(c_j, j), a rank in [0, C(m, n))."""
    table = np.array([[math.comb(c, j) for j in range(n + 1)] for c in range(m)], dtype=np.int64)
    return table[index, np.arange(1, n + 1)].sum(axis=1)


def _chunk_groups(n: int, m: int) -> int:
    """Groups per mixed-radix word: the most whose C(m, n)**k stays below 2**_WORD_BITS."""
    radix = math.comb(m, n)
    return max(1, int(_WORD_BITS // math.log2(radix))) if radix > 1 else 1


def _encode_enumerative(index: np.ndarray, n: int, m: int) -> tuple[np.ndarray, int, int]:
    radix, k = math.comb(m, n), _chunk_groups(n, m)
    ranks = _ranks(index, n, m)
    ranks = np.concatenate([ranks, np.zeros((-len(ranks)) % k, dtype=np.int64)]).reshape(-1, k)
    words = (ranks * radix ** np.arange(k, dtype=np.int64)).sum(axis=1)
    width = math.ceil(k * math.log2(radix)) if radix > 1 else 0
    return _pack_fixed(words, width), k, width


def _decode_enumerative(data: np.ndarray, n: int, m: int, groups: int, k: int, width: int) -> np.ndarray:
    radix = math.comb(m, n)
    words = _unpack_fixed(data, width, math.ceil(groups / k))
    ranks = (words[:, None] // radix ** np.arange(k, dtype=np.int64)) % radix
    ranks = ranks.reshape(-1)[:groups]
    if ranks.size and ranks.max() >= radix:
        raise ValueError(f"nm enumerative index holds a rank >= C({m}, {n})")
    return _patterns(n, m)[ranks]


def _pack_nm(tensor: torch.Tensor, value_bits: int, n: int, m: int, index_coding: str = "positions") -> PackedTensor:
    if not (isinstance(m, int) and isinstance(n, int)) or m < 2 or n < 1 or n >= m:
        raise ValueError(f"nm format needs integers 1 <= n < m and m >= 2, got n={n}, m={m}")
    if index_coding not in INDEX_CODINGS:
        raise ValueError(f"unknown index_coding {index_coding!r}; expected one of {', '.join(INDEX_CODINGS)}")
    if index_coding == "enumerative" and math.comb(m, n) > 1 << 20:
        raise ValueError(f"index_coding 'enumerative' supports C(m, n) <= 2**20 patterns; {n}:{m} has "
                         f"{math.comb(m, n)}")
    if tensor.shape[-1] % m:
        raise ValueError(f"nm format: last dim {tensor.shape[-1]} is not divisible by m={m}")
    groups = tensor.reshape(-1, m)
    nonzero = groups != 0
    over = int((nonzero.sum(dim=1) > n).sum())
    if over:
        raise ValueError(f"tensor violates the {n}:{m} pattern: {over} of {groups.shape[0]} groups exceed {n} nonzeros")
    # Nonzeros first (stable), then zeros as padding slots; kept indices are then sorted, as in NVIDIA's layout.
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :n]
    index = order.sort(dim=1).values
    values = _encode_values(groups.gather(1, index).reshape(-1), value_bits)
    meta: dict[str, int | float | str] = {"n": n, "m": m, "index_coding": index_coding}
    if index_coding == "enumerative":
        data, k, width = _encode_enumerative(index.numpy().astype(np.int64), n, m)
        meta.update(chunk_groups=k, chunk_bits=width)
    else:
        meta["index_bits"] = math.ceil(math.log2(m))
        data = _pack_fixed(index.reshape(-1).numpy().astype(np.int64), int(meta["index_bits"]))
    parts = {"values": values, "index": torch.from_numpy(data)}
    return PackedTensor("nm", tuple(tensor.shape), _dtype_name(tensor.dtype), value_bits, parts, meta)


def pack(
    tensor: torch.Tensor,
    format: str = "auto",
    *,
    n: int = 2,
    m: int = 4,
    value_bits: int | None = None,
    mask_coding: str = "auto",
    index_coding: str = "positions",
    value_coding: str = "fixed",
) -> PackedTensor:
    """Store ``tensor`` in a compressed format; :func:`unpack` gives it back exactly.

    Args:
        tensor: a float tensor, or integer codes (int8/uint8/int16/int32/int64) with ``value_bits`` given.
        format: ``"dense"``, ``"bitmask"``, ``"nm"`` or ``"auto"`` (the smaller of dense and bitmask; N:M is
            only used when asked for, since it constrains where the zeros may be).
        n: nonzeros allowed per group (``nm`` only).
        m: group size along the last dim (``nm`` only).
        value_bits: bits per stored value. ``None`` for floats (the dtype width); 2..8 for integer codes.
        mask_coding: ``"bits"`` (1 bit per element), ``"golomb"`` (Rice codes of zero runs) or ``"auto"``
            (whichever is smaller for this tensor). Used by the ``bitmask`` format.
        index_coding: ``"positions"`` (ceil(log2 m) bits per kept value, the layout sparse tensor cores read) or
            ``"enumerative"`` (the group's pattern rank, about log2(C(m, n)) bits per group). ``nm`` only.
        value_coding: integer codes at ``value_bits`` each (``"fixed"``), Huffman-coded (``"huffman"``, a
            canonical code per tensor; the code lengths, 2**value_bits bytes, are stored and counted), or
            ``"auto"`` (Huffman when it saves at least 1%). Floats are always stored as-is.

    Returns:
        The packed tensor.

    Raises:
        ValueError: for an unknown format or mask coding, a 0-d tensor, integer codes without ``value_bits``
            in 2..8 or with values outside that range, or (``nm``) a last dim not divisible by ``m``,
            ``n >= m`` or a tensor that breaks the pattern.
    """
    if format not in (*FORMATS, "auto"):
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join((*FORMATS, 'auto'))}")
    if mask_coding not in (*MASK_CODINGS, "auto"):
        raise ValueError(f"unknown mask_coding {mask_coding!r}; expected one of bits, golomb, auto")
    if value_coding not in (*VALUE_CODINGS, "auto"):
        raise ValueError(f"unknown value_coding {value_coding!r}; expected one of fixed, huffman, auto")
    packed = _pack(tensor, format, n, m, value_bits, mask_coding, index_coding)
    return _use_value_coding(packed, value_coding)


def _pack(tensor: torch.Tensor, format: str, n: int, m: int, value_bits: int | None, mask_coding: str,
          index_coding: str) -> PackedTensor:
    if tensor.ndim == 0:
        raise ValueError("cannot pack a 0-d tensor; reshape it to at least 1-d")
    tensor = tensor.detach().cpu()
    bits = _resolve_value_bits(tensor.dtype, value_bits)
    shape = tuple(tensor.shape)
    flat = tensor.reshape(-1)
    if format == "dense":
        return _pack_dense(flat, shape, bits)
    if format == "bitmask":
        return _pack_bitmask(flat, shape, bits, mask_coding)
    if format == "nm":
        return _pack_nm(tensor, bits, n, m, index_coding)
    dense = _pack_dense(flat, shape, bits)
    sparse = _pack_bitmask(flat, shape, bits, mask_coding)
    return sparse if sparse.storage_bits() < dense.storage_bits() else dense


def unpack(packed: PackedTensor) -> torch.Tensor:
    """Decode ``packed`` to the identical dense tensor (same dtype and shape, on the CPU).

    Raises:
        ValueError: if ``packed`` is inconsistent (unknown format, parts of the wrong size, corrupt mask).
    """
    _validate(packed)
    dtype = _torch_dtype(packed.dtype)
    numel = packed.numel()
    values = _decode_values(packed, _value_count(packed))
    if packed.format == "dense":
        return values.clone().reshape(packed.shape)
    if packed.format == "bitmask":
        nnz = int(packed.meta["nnz"])
        stored = packed.tensors["mask"].numpy()
        if packed.meta["mask_coding"] == "golomb":
            mask = _golomb_decode(stored, int(packed.meta["golomb_k"]), nnz, numel)
        else:
            mask = np.unpackbits(stored, count=numel).astype(bool)
            if int(mask.sum()) != nnz:
                raise ValueError(f"bit mask has {int(mask.sum())} set bits but {nnz} values are stored")
        out = torch.zeros(numel, dtype=dtype)
        out[torch.from_numpy(mask)] = values
        return out.reshape(packed.shape)
    n, m = int(packed.meta["n"]), int(packed.meta["m"])
    groups = numel // m
    if _index_coding(packed) == "enumerative":
        index = _decode_enumerative(packed.tensors["index"].numpy(), n, m, groups, int(packed.meta["chunk_groups"]),
                                    int(packed.meta["chunk_bits"]))
    else:
        index = _unpack_fixed(packed.tensors["index"].numpy(), int(packed.meta["index_bits"]), groups * n)
    if index.size and index.max() >= m:
        raise ValueError(f"nm index holds a position >= m={m}")
    out = torch.zeros(groups, m, dtype=dtype)
    out.scatter_(1, torch.from_numpy(index).reshape(groups, n), values.reshape(groups, n))
    return out.reshape(packed.shape)


def _index_coding(packed: PackedTensor) -> str:
    return str(packed.meta.get("index_coding", "positions"))  # files written before enumerative coding existed


def _validate(packed: PackedTensor, name: str = "packed tensor") -> None:
    """Check that the parts of ``packed`` match its format, shape and dtype.

    Raises:
        ValueError: naming ``name`` and the first inconsistency found.
    """
    if packed.format not in FORMATS:
        raise ValueError(f"{name}: unknown format {packed.format!r}")
    if any(not isinstance(d, int) or d < 0 for d in packed.shape) or not packed.shape:
        raise ValueError(f"{name}: invalid shape {packed.shape!r}")
    try:
        dtype = _torch_dtype(packed.dtype)
        bits = _resolve_value_bits(dtype, packed.value_bits)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    if _value_coding(packed) not in VALUE_CODINGS or (_value_coding(packed) == "huffman" and dtype.is_floating_point):
        raise ValueError(f"{name}: value_coding {_value_coding(packed)!r} does not apply to {packed.dtype} values")
    missing = [part for part in _parts(packed) if part not in packed.tensors]
    if missing:
        raise ValueError(f"{name}: missing stored part(s) {', '.join(missing)} for format {packed.format}")
    numel = packed.numel()
    try:
        if packed.format == "bitmask":
            nnz = int(packed.meta["nnz"])
            if not 0 <= nnz <= numel:
                raise ValueError(f"{name}: nnz={nnz} outside 0..{numel}")
            if packed.meta.get("mask_coding") not in MASK_CODINGS:
                raise ValueError(f"{name}: unknown mask_coding {packed.meta.get('mask_coding')!r}")
            if packed.meta["mask_coding"] == "golomb":
                int(packed.meta["golomb_k"])
        if packed.format == "nm":
            n, m, coding = int(packed.meta["n"]), int(packed.meta["m"]), _index_coding(packed)
            if m < 2 or not 1 <= n < m or packed.shape[-1] % m:
                raise ValueError(f"{name}: nm parameters n={n}, m={m} do not fit shape {packed.shape}")
            if coding not in INDEX_CODINGS:
                raise ValueError(f"{name}: unknown index_coding {coding!r}")
            expected = ({"index_bits": math.ceil(math.log2(m))} if coding == "positions" else
                        {"chunk_groups": _chunk_groups(n, m),
                         "chunk_bits": math.ceil(_chunk_groups(n, m) * math.log2(math.comb(m, n)))})
            for key, value in expected.items():
                if int(packed.meta[key]) != value:
                    raise ValueError(f"{name}: nm {key}={packed.meta[key]} but {n}:{m} needs {value}")
    except KeyError as err:
        raise ValueError(f"{name}: meta lacks {err.args[0]!r} for format {packed.format}") from None
    count = _value_count(packed)
    values = packed.tensors["values"]
    if _value_coding(packed) == "huffman":
        try:
            stream_bits = int(packed.meta["value_stream_bits"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{name}: Huffman-coded values need an integer value_stream_bits") from None
        expected = (math.ceil(stream_bits / 8), torch.uint8)
        if packed.tensors["code_lengths"].numel() != 1 << bits:
            raise ValueError(f"{name}: code_lengths has {packed.tensors['code_lengths'].numel()} entries, "
                             f"{bits}-bit codes need {1 << bits}")
    else:
        expected = (count, dtype) if dtype.is_floating_point else (math.ceil(count * bits / 8), torch.uint8)
    if (values.numel(), values.dtype) != expected or values.ndim != 1:
        raise ValueError(
            f"{name}: values part is {values.dtype} x {values.numel()} but shape {packed.shape} "
            f"({packed.format}) needs {expected[1]} x {expected[0]}"
        )
    for part in _parts(packed)[1:]:
        stored = packed.tensors[part]
        if stored.dtype != torch.uint8 or stored.ndim != 1:
            shape = tuple(stored.shape)
            raise ValueError(f"{name}: {part} part must be a 1-d uint8 tensor, got {stored.dtype} {shape}")
    if packed.format == "bitmask" and packed.meta["mask_coding"] == "bits":
        have, need = packed.tensors["mask"].numel(), math.ceil(numel / 8)
        if have != need:
            raise ValueError(f"{name}: bit mask has {have} bytes, shape needs {need}")
    if packed.format == "nm":
        if _index_coding(packed) == "enumerative":
            words = math.ceil(packed.numel() // int(packed.meta["m"]) / int(packed.meta["chunk_groups"]))
            need = math.ceil(words * int(packed.meta["chunk_bits"]) / 8)
        else:
            need = math.ceil(count * int(packed.meta["index_bits"]) / 8)
        if packed.tensors["index"].numel() != need:
            raise ValueError(f"{name}: index has {packed.tensors['index'].numel()} bytes, shape needs {need}")


# ------------------------------------------------------------------------------------------------ files


def save_packed(tensors: dict[str, PackedTensor], path: str | Path) -> None:
    """Write packed tensors to one safetensors file, atomically (temporary sibling, then ``os.replace``).

    Args:
        tensors: packed tensors by name (e.g. a parameter's qualified name).
        path: the file to write; its folder is created if needed.

    Raises:
        ValueError: if a packed tensor is inconsistent or two stored part names collide.
    """
    path = Path(path)
    arrays: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for name, packed in tensors.items():
        _validate(packed, name)
        parts = list(_parts(packed))
        for part in parts:
            key = f"{name}.{part}"
            if key in arrays:
                raise ValueError(f"{name}: stored part name {key!r} collides with another tensor's part")
            arrays[key] = packed.tensors[part].contiguous()
        entries[name] = {
            "format": packed.format,
            "shape": list(packed.shape),
            "dtype": packed.dtype,
            "value_bits": packed.value_bits,
            "meta": packed.meta,
            "parts": parts,
        }
    metadata = {_FILE_KEY: _FILE_VERSION, _ENTRIES_KEY: json.dumps(entries, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_packed(path: str | Path) -> dict[str, PackedTensor]:
    """Read a file written by :func:`save_packed`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a packed-tensor file, or an entry is missing a part or does not match its
            recorded format and shape (the message names the tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed tensor file {path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    with handle as reader:
        metadata = reader.metadata() or {}
        if metadata.get(_FILE_KEY) != _FILE_VERSION or _ENTRIES_KEY not in metadata:
            raise ValueError(f"{path} is not a packed-tensor file (no {_FILE_KEY} version {_FILE_VERSION} header)")
        try:
            entries = json.loads(metadata[_ENTRIES_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: corrupt {_ENTRIES_KEY} header ({err})") from err
        keys = set(reader.keys())
        result: dict[str, PackedTensor] = {}
        for name, entry in entries.items():
            try:
                parts = {part: f"{name}.{part}" for part in entry["parts"]}
                missing = [key for key in parts.values() if key not in keys]
                if missing:
                    raise ValueError(f"{name}: stored tensor(s) {', '.join(missing)} missing from {path}")
                packed = PackedTensor(
                    format=entry["format"],
                    shape=tuple(entry["shape"]),
                    dtype=entry["dtype"],
                    value_bits=entry["value_bits"],
                    tensors={part: reader.get_tensor(key) for part, key in parts.items()},
                    meta=dict(entry["meta"]),
                )
            except (KeyError, TypeError) as err:
                raise ValueError(f"{name}: corrupt header entry in {path} ({err!r})") from err
            _validate(packed, name)
            result[name] = packed
    return result


def load_unpacked(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_packed` and decode every tensor.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: as :func:`load_packed`, or if a tensor fails to decode (the message names it).
    """
    decoded = {}
    for name, packed in load_packed(path).items():
        try:
            decoded[name] = unpack(packed)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
    return decoded


# ------------------------------------------------------------------------------------------------ accounting


def binary_entropy(p: float) -> float:
    """H2(p) in bits; 0 at p = 0 and p = 1."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


def bpv_row(name: str, packed: PackedTensor) -> dict:
    """Bits-per-value accounting for one packed tensor.

    Keys: ``name``, ``format``, ``mask_coding``, ``numel``, ``nonzero``, ``sparsity`` (zero fraction s),
    ``value_bits`` (b), ``storage_bits``, ``bpv`` (storage bits per element), ``bitmask_bound`` ((1-s)*b + 1,
    the plain bitmask), ``entropy_floor`` ((1-s)*b + H2(s), no mask code does better on an i.i.d. mask),
    ``dense_bits`` (numel*b); for ``nm`` also ``index_floor``, log2(C(m, n))/m bits of metadata per element.

    Raises:
        ValueError: if ``packed`` is inconsistent.
    """
    _validate(packed, name)
    numel = packed.numel()
    nonzero = int(torch.count_nonzero(_decode_values(packed, _value_count(packed))))
    sparsity = 1.0 - nonzero / numel if numel else 0.0
    b = packed.value_bits
    storage = packed.storage_bits()
    row = {
        "name": name,
        "format": packed.format,
        "mask_coding": str(packed.meta.get("mask_coding", packed.meta.get("index_coding", ""))),
        "value_coding": _value_coding(packed),
        "numel": numel,
        "nonzero": nonzero,
        "sparsity": sparsity,
        "value_bits": b,
        "storage_bits": storage,
        "bpv": storage / numel if numel else 0.0,
        "bitmask_bound": (1 - sparsity) * b + 1,
        "entropy_floor": (1 - sparsity) * b + binary_entropy(sparsity),
        "dense_bits": numel * b,
    }
    if packed.format == "nm":
        n, m = int(packed.meta["n"]), int(packed.meta["m"])
        row["index_floor"] = math.log2(math.comb(m, n)) / m
    return row


def bpv_summary(rows: list[dict]) -> dict:
    """Whole-model totals of :func:`bpv_row` rows; per-element figures are weighted by ``numel``.

    Returns:
        ``tensors``, ``numel``, ``nonzero``, ``sparsity``, ``storage_bits``, ``dense_bits``, ``bpv``,
        ``value_bits`` (mean b), ``bitmask_bound``, ``entropy_floor`` and ``compression_ratio``
        (dense bits / storage bits).
    """
    numel = sum(r["numel"] for r in rows)
    storage = sum(r["storage_bits"] for r in rows)
    dense = sum(r["dense_bits"] for r in rows)

    def weighted(key: str) -> float:
        return sum(r[key] * r["numel"] for r in rows) / numel if numel else 0.0

    nonzero = sum(r["nonzero"] for r in rows)
    return {
        "tensors": len(rows),
        "numel": numel,
        "nonzero": nonzero,
        "sparsity": 1.0 - nonzero / numel if numel else 0.0,
        "storage_bits": storage,
        "dense_bits": dense,
        "bpv": storage / numel if numel else 0.0,
        "value_bits": dense / numel if numel else 0.0,
        "bitmask_bound": weighted("bitmask_bound"),
        "entropy_floor": weighted("entropy_floor"),
        "compression_ratio": dense / storage if storage else 1.0,
    }


def model_bits(rows: list[dict], parameters: int, *, rest_bits: int = 16) -> dict:
    """Bits per weight of the whole model: the packed tensors (``rows``) at their storage bits, every other one of
    its ``parameters`` at ``rest_bits`` (16: the bf16/fp16 a device runtime keeps unquantized tensors in).

    The packed layers' own figure (:func:`bpv_summary`) leaves out what no plugin packed, e.g. the embeddings and a
    vision tower outside the selection; this is the figure a model's size on the device follows.

    Returns:
        ``parameters``, ``packed_parameters``, ``rest_parameters``, ``rest_bits``, ``storage_bits`` and
        ``bits_per_weight``.

    Raises:
        ValueError: if the rows hold more elements than ``parameters`` or ``rest_bits`` is not positive.
    """
    packed = sum(r["numel"] for r in rows)
    if packed > parameters:
        raise ValueError(f"model_bits: the packed tensors hold {packed:,} elements, more than the model's "
                         f"{parameters:,} parameters")
    if rest_bits <= 0:
        raise ValueError(f"model_bits: rest_bits must be positive, got {rest_bits}")
    storage = sum(r["storage_bits"] for r in rows) + (parameters - packed) * rest_bits
    return {"parameters": parameters, "packed_parameters": packed, "rest_parameters": parameters - packed,
            "rest_bits": rest_bits, "storage_bits": storage,
            "bits_per_weight": storage / parameters if parameters else 0.0}


def bpv_report(rows: list[dict], parameters: int | None = None, **fields: object) -> dict:
    """The ``*_bpv.json`` report of one export: ``fields`` (the plugin, its settings), ``summary``
    (:func:`bpv_summary`), given the model's ``parameters`` also ``model`` (:func:`model_bits`), and ``layers``."""
    report = {**fields, "summary": bpv_summary(rows)}
    if parameters is not None:
        report["model"] = model_bits(rows, parameters)
    return {**report, "layers": rows}


def format_bpv_table(rows: list[dict], summary: dict | None = None) -> str:
    """A plain-text table of BPV rows (and a total line) that reads aligned on a console and renders as markdown."""
    header = ["tensor", "format", "numel", "sparsity", "bits", "bpv", "bitmask", "floor", "ratio"]

    def cells(r: dict, name: str, fmt: str) -> list[str]:
        ratio = r["dense_bits"] / r["storage_bits"] if r["storage_bits"] else 1.0
        return [
            name,
            fmt,
            f"{r['numel']:,}",
            f"{r['sparsity']:.3f}",
            f"{r['value_bits']:g}" if float(r["value_bits"]).is_integer() else f"{r['value_bits']:.2f}",
            f"{r['bpv']:.3f}",
            f"{r['bitmask_bound']:.3f}",
            f"{r['entropy_floor']:.3f}",
            f"{ratio:.2f}x",
        ]

    body = []
    for r in rows:
        fmt = r["format"] + (f"/{r['mask_coding']}" if r.get("mask_coding") else "")
        body.append(cells(r, r["name"], fmt))
    if summary is not None:
        body.append(cells(summary, "total", ""))
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    left = {0, 1}  # text columns align left, numbers right

    def render(line: list[str]) -> str:
        padded = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i not in left else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([render(header), rule, *map(render, body)])
