"""Compressed tensor storage: exact round trips, exact bit counts, BPV bounds, files and errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from framework.storage import (
    PackedTensor,
    binary_entropy,
    bpv_row,
    bpv_summary,
    format_bpv_table,
    load_packed,
    load_unpacked,
    model_bits,
    pack,
    save_packed,
    unpack,
)


def _sparse(shape: tuple[int, ...], density: float, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(dtype)
    else:
        t = torch.randint(-8, 8, shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) < density, t, torch.zeros((), dtype=dtype))


def _two_four(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A tensor whose groups of 4 along the last dim keep their 2 largest magnitudes (some groups hold fewer)."""
    t = _sparse(shape, 0.8, dtype, seed)
    groups = t.reshape(-1, 4)
    drop = groups.abs().float().argsort(dim=1)[:, :2]
    groups = groups.scatter(1, drop, torch.zeros_like(groups))
    return groups.reshape(shape)


def _codes(shape: tuple[int, ...], density: float, bits: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if dtype.is_signed else (0, 1 << bits)
    t = torch.randint(low, high, shape, generator=g).to(dtype)
    return torch.where(torch.rand(shape, generator=g) < density, t, torch.zeros((), dtype=dtype))


# (id, tensor, pack kwargs): one table drives the round-trip suite.
CASES = [
    ("fp32-dense-2d", _sparse((16, 32), 0.3), {"format": "dense"}),
    ("fp32-bitmask-bits", _sparse((16, 32), 0.3), {"format": "bitmask", "mask_coding": "bits"}),
    ("fp32-bitmask-golomb", _sparse((16, 32), 0.3), {"format": "bitmask", "mask_coding": "golomb"}),
    ("fp32-auto", _sparse((16, 32), 0.3), {}),
    ("bf16-bitmask-golomb-3d", _sparse((3, 5, 8), 0.5, torch.bfloat16), {"format": "bitmask", "mask_coding": "golomb"}),
    ("fp16-bitmask-bits-1d", _sparse((37,), 0.5, torch.float16), {"format": "bitmask", "mask_coding": "bits"}),
    ("fp32-nm-2d", _two_four((8, 16)), {"format": "nm"}),
    ("bf16-nm-3d", _two_four((2, 3, 8), torch.bfloat16), {"format": "nm"}),
    ("fp16-nm-1d", _two_four((12,), torch.float16), {"format": "nm"}),
    ("fp32-nm-1:8", torch.eye(8).repeat(2, 1), {"format": "nm", "n": 1, "m": 8}),
    ("int8-4bit-dense", _codes((10, 13), 0.4, 4), {"format": "dense", "value_bits": 4}),
    ("int8-4bit-bitmask", _codes((10, 13), 0.4, 4), {"format": "bitmask", "value_bits": 4}),
    ("int8-3bit-golomb", _codes((7, 9), 0.2, 3), {"format": "bitmask", "value_bits": 3, "mask_coding": "golomb"}),
    ("int8-2bit-nm", _two_four((4, 8), torch.int8).clamp(-2, 1), {"format": "nm", "value_bits": 2}),
    ("int8-8bit-dense", _codes((5, 6), 0.9, 8), {"format": "dense", "value_bits": 8}),
    ("uint8-8bit-bitmask", _codes((5, 6), 0.5, 8, torch.uint8), {"format": "bitmask", "value_bits": 8}),
    ("int16-5bit-auto", _codes((9, 11), 0.3, 5, torch.int16), {"value_bits": 5}),
    ("int32-6bit-bitmask-3d", _codes((2, 3, 7), 0.3, 6, torch.int32), {"format": "bitmask", "value_bits": 6}),
    ("all-zero-bits", torch.zeros(4, 8), {"format": "bitmask", "mask_coding": "bits"}),
    ("all-zero-golomb", torch.zeros(4, 8), {"format": "bitmask", "mask_coding": "golomb"}),
    ("all-zero-nm", torch.zeros(4, 8), {"format": "nm"}),
    ("all-nonzero-golomb", torch.arange(1.0, 33.0).reshape(4, 8), {"format": "bitmask", "mask_coding": "golomb"}),
    ("all-nonzero-bits", torch.arange(1, 33, dtype=torch.float32), {"format": "bitmask", "mask_coding": "bits"}),
    ("all-nonzero-codes", torch.full((3, 8), -2, dtype=torch.int8), {"format": "bitmask", "value_bits": 2}),
    ("trailing-zeros-golomb", torch.tensor([5.0] + [0.0] * 40), {"format": "bitmask", "mask_coding": "golomb"}),
    ("long-run-golomb", torch.eye(1000)[-1] - 2 * torch.eye(1000)[-3], {"format": "bitmask", "mask_coding": "golomb"}),
    ("negative-zero", torch.tensor([[-0.0, 1.0, 0.0, -2.0]]), {"format": "bitmask"}),
    ("negative-zero-nm", torch.tensor([[-0.0, 1.0, -0.0, -2.0]]), {"format": "nm"}),
    ("fp32-nm-enumerative", _two_four((8, 16)), {"format": "nm", "index_coding": "enumerative"}),
    ("bf16-nm-enumerative-3d", _two_four((2, 3, 8), torch.bfloat16), {"format": "nm", "index_coding": "enumerative"}),
    ("fp32-1:8-enumerative", torch.eye(8).repeat(2, 1), {"format": "nm", "n": 1, "m": 8, "index_coding": "enumerative"}),
    ("int8-4:8-enumerative", _codes((6, 64), 0.0, 4).reshape(-1, 8).index_fill(1, torch.tensor([1, 3, 4, 6]), 0)
     .reshape(6, 64), {"format": "nm", "n": 4, "m": 8, "value_bits": 4, "index_coding": "enumerative"}),
    ("all-zero-nm-enumerative", torch.zeros(4, 8), {"format": "nm", "index_coding": "enumerative"}),
    ("int8-4bit-bitmask-huffman", _codes((10, 13), 0.4, 4), {"format": "bitmask", "value_bits": 4,
                                                              "value_coding": "huffman"}),
    ("int8-2bit-dense-huffman", _codes((9, 7), 0.9, 2), {"format": "dense", "value_bits": 2, "value_coding": "huffman"}),
    ("uint8-8bit-huffman", _codes((5, 6), 0.5, 8, torch.uint8), {"format": "bitmask", "value_bits": 8,
                                                                  "value_coding": "huffman"}),
    ("int8-2bit-nm-huffman", _two_four((4, 8), torch.int8).clamp(-2, 1), {"format": "nm", "value_bits": 2,
                                                                            "value_coding": "huffman"}),
    ("one-symbol-huffman", torch.full((3, 5), 3, dtype=torch.int8), {"format": "dense", "value_bits": 4,
                                                                     "value_coding": "huffman"}),
    ("empty", torch.zeros(0, 4), {"format": "bitmask", "mask_coding": "golomb"}),
]


@pytest.mark.parametrize(("tensor", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_round_trip_is_exact(tensor: torch.Tensor, kwargs: dict) -> None:
    packed = pack(tensor, **kwargs)
    if "format" in kwargs:
        assert packed.format == kwargs["format"]
    out = unpack(packed)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)
    assert packed.numel() == tensor.numel()
    assert packed.storage_bits() == sum(t.numel() * t.element_size() * 8 for t in packed.tensors.values())


def test_negative_zero_is_a_zero() -> None:
    packed = pack(torch.tensor([-0.0, 1.0, -0.0, 0.0]), "bitmask")
    assert packed.meta["nnz"] == 1
    assert torch.equal(unpack(packed), torch.tensor([0.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("seed", range(5))
def test_golomb_round_trip_random_densities(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    density = [0.001, 0.05, 0.25, 0.6, 0.97][seed]
    t = _sparse((20_000,), density, seed=seed)
    t[torch.randint(0, 20_000, (1,), generator=g)] = 0  # density varies, so runs vary too
    packed = pack(t, "bitmask", mask_coding="golomb")
    assert torch.equal(unpack(packed), t)


def test_storage_bits_hand_computed() -> None:
    t = torch.zeros(4, 8)
    t[0, 0], t[1, 3], t[2, 5], t[2, 6], t[3, 7] = 1.0, -2.0, 3.0, 4.0, 5.0  # 5 nonzeros
    assert pack(t, "dense").storage_bits() == 32 * 32
    assert pack(t, "bitmask", mask_coding="bits").storage_bits() == 5 * 32 + 32
    bf16 = t.to(torch.bfloat16)
    assert pack(bf16, "bitmask", mask_coding="bits").storage_bits() == 5 * 16 + 32
    # 2:4 keeps 2 value slots and 2 two-bit indices per group of 4, whatever the group holds.
    assert pack(t, "nm").storage_bits() == 8 * (2 * 32 + 4)
    assert pack(bf16, "nm").storage_bits() == 8 * (2 * 16 + 4)
    # 4-bit codes: 32 dense codes fill 16 bytes; 5 codes take ceil(20 / 8) = 3 bytes; 1:8 indices are 3 bits.
    codes = t.to(torch.int8)
    assert pack(codes, "dense", value_bits=4).storage_bits() == 128
    assert pack(codes, "bitmask", value_bits=4, mask_coding="bits").storage_bits() == 24 + 32
    assert pack(codes, "nm", value_bits=4).storage_bits() == 8 * (2 * 4) + 8 * 4
    one_of_eight = torch.eye(8)[:, :8].reshape(4, 16)  # one nonzero per group of 8
    assert pack(one_of_eight.to(torch.int8), "nm", n=1, m=8, value_bits=2).storage_bits() == 8 * 2 + 8 * 3


def test_nm_index_is_two_bits_per_slot() -> None:
    t = torch.tensor([[0.0, 7.0, 0.0, 9.0, 1.0, 0.0, 0.0, 0.0]])
    packed = pack(t, "nm")
    assert packed.meta == {"n": 2, "m": 4, "index_coding": "positions", "index_bits": 2}
    # groups: slots (1, 3) and (0, padding 1) -> 2-bit indices 01 11 00 01
    assert packed.tensors["index"].tolist() == [0b01110001]
    assert packed.tensors["values"].tolist() == [7.0, 9.0, 1.0, 0.0]


def test_nm_enumerative_ranks_hand_computed() -> None:
    # 2:4 patterns in rank order (colex): {0,1} {0,2} {1,2} {0,3} {1,3} {2,3}; rank of {c1<c2} = C(c1,1) + C(c2,2).
    t = torch.tensor([[0.0, 7.0, 0.0, 9.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    packed = pack(t, "nm", index_coding="enumerative")
    # groups: {1,3} -> 1 + 3 = 4; {0, padding 1} -> 0 + 0 = 0; {2,3} -> 2 + 3 = 5. Word: 4 + 0*6 + 5*36 = 184.
    assert packed.meta == {"n": 2, "m": 4, "index_coding": "enumerative", "chunk_groups": 23, "chunk_bits": 60}
    assert int.from_bytes(bytes(packed.tensors["index"].tolist()), "big") >> 4 == 184  # 60 bits in 8 bytes
    assert torch.equal(unpack(packed), t)


def test_nm_enumerative_approaches_the_pattern_entropy() -> None:
    for n, m in ((2, 4), (4, 8), (1, 4)):
        groups = 23 * 64
        t = torch.zeros(groups, m)
        t.scatter_(1, torch.rand(groups, m).argsort(dim=1)[:, :n], 1.0)
        packed = pack(t.reshape(-1, 8 * m), "nm", n=n, m=m, index_coding="enumerative")
        index_bits = packed.tensors["index"].numel() * 8 / (groups * m)
        floor = math.log2(math.comb(m, n)) / m
        assert floor <= index_bits < 1.02 * floor


def test_huffman_values_hand_computed() -> None:
    # Counts 4 / 2 / 1 / 1 of the 2-bit codes 0 / 1 / -2 / -1 (symbols 2 / 3 / 0 / 1 after the offset of -2):
    # lengths 1 / 2 / 3 / 3; canonical codes by (length, symbol): 2 -> 0, 3 -> 10, 0 -> 110, 1 -> 111.
    t = torch.tensor([0, 0, 1, -2, 0, 1, -1, 0], dtype=torch.int8)
    packed = pack(t, "dense", value_bits=2, value_coding="huffman")
    assert packed.tensors["code_lengths"].tolist() == [3, 3, 1, 2]
    assert packed.meta == {"value_coding": "huffman", "value_stream_bits": 14}
    # 0 0 10 110 0 10 111 0 -> 00101100 101110(00)
    assert packed.tensors["values"].tolist() == [0b00101100, 0b10111000]
    assert torch.equal(unpack(packed), t)
    assert packed.storage_bits() == 2 * 8 + 4 * 8  # the stream plus one byte of code length per symbol


def test_huffman_auto_pays_on_skewed_codes_only() -> None:
    skewed = torch.where(torch.rand(4096) < 0.9, 1, torch.randint(-8, 8, (4096,))).to(torch.int8)
    uniform = torch.randint(-8, 8, (4096,), dtype=torch.int8)
    assert pack(skewed, "dense", value_bits=4, value_coding="auto").meta.get("value_coding") == "huffman"
    assert pack(uniform, "dense", value_bits=4, value_coding="auto").meta.get("value_coding") is None
    assert bpv_row("s", pack(skewed, "dense", value_bits=4, value_coding="auto"))["value_coding"] == "huffman"


def test_auto_picks_the_smaller_format_and_never_nm() -> None:
    dense = torch.randn(64, 64)
    sparse = _sparse((64, 64), 0.1)
    assert pack(dense).format == "dense"
    assert pack(sparse).format == "bitmask"
    assert pack(_two_four((64, 64))).format in ("dense", "bitmask")
    very_sparse = _sparse((256, 256), 0.01)
    assert pack(very_sparse, "bitmask").meta["mask_coding"] == "golomb"
    assert pack(torch.arange(1.0, 65.0), "bitmask").meta["mask_coding"] == "bits"


@pytest.fixture(scope="module")
def quarter_codes() -> torch.Tensor:
    """1M 4-bit codes with exactly 25% nonzeros at random positions."""
    g = torch.Generator().manual_seed(0)
    numel = 1_000_000
    codes = torch.zeros(numel, dtype=torch.int8)
    keep = torch.randperm(numel, generator=g)[: numel // 4]
    codes[keep] = torch.randint(1, 8, (keep.numel(),), generator=g, dtype=torch.int8)
    return codes.reshape(1000, 1000)


def test_bitmask_bpv_at_75_percent_4_bit(quarter_codes: torch.Tensor) -> None:
    row = bpv_row("w", pack(quarter_codes, "bitmask", value_bits=4, mask_coding="bits"))
    assert row["sparsity"] == pytest.approx(0.75)
    assert row["bpv"] <= 2.0
    assert row["bpv"] == pytest.approx(row["bitmask_bound"])


def test_golomb_beats_bitmask_near_entropy(quarter_codes: torch.Tensor) -> None:
    packed = pack(quarter_codes, "bitmask", value_bits=4, mask_coding="golomb")
    assert torch.equal(unpack(packed), quarter_codes)
    row = bpv_row("w", packed)
    assert row["bpv"] < 2.0
    assert row["bpv"] >= row["entropy_floor"]
    mask_bits_per_element = packed.tensors["mask"].numel() * 8 / packed.numel()
    assert mask_bits_per_element <= 1.05 * binary_entropy(0.25)
    assert pack(quarter_codes, value_bits=4).meta["mask_coding"] == "golomb"


def test_bpv_row_bounds() -> None:
    t = torch.zeros(4, 8)
    t[0, :4] = 1.0  # 4 nonzeros of 32: s = 7/8
    row = bpv_row("layer.weight", pack(t, "bitmask", mask_coding="bits"))
    s = 7 / 8
    h2 = -(s * math.log2(s) + (1 - s) * math.log2(1 - s))
    assert row["name"] == "layer.weight" and row["numel"] == 32 and row["nonzero"] == 4
    assert row["sparsity"] == pytest.approx(s)
    assert row["value_bits"] == 32 and row["dense_bits"] == 32 * 32
    assert row["storage_bits"] == 4 * 32 + 32 and row["bpv"] == pytest.approx(5.0)
    assert row["bitmask_bound"] == pytest.approx((1 - s) * 32 + 1)
    assert row["entropy_floor"] == pytest.approx((1 - s) * 32 + h2)
    assert "index_floor" not in row
    nm_row = bpv_row("x", pack(_two_four((8, 16)), "nm"))
    assert nm_row["index_floor"] == pytest.approx(math.log2(6) / 4)
    assert bpv_row("z", pack(torch.zeros(8), "bitmask"))["entropy_floor"] == 0.0
    assert binary_entropy(0.0) == binary_entropy(1.0) == 0.0


def test_bpv_summary_and_table() -> None:
    rows = [
        bpv_row("a", pack(_sparse((32, 32), 0.25), "bitmask", mask_coding="bits")),
        bpv_row("b", pack(_codes((16, 16), 0.5, 4), value_bits=4)),
    ]
    summary = bpv_summary(rows)
    numel = 32 * 32 + 16 * 16
    assert summary["tensors"] == 2 and summary["numel"] == numel
    assert summary["storage_bits"] == rows[0]["storage_bits"] + rows[1]["storage_bits"]
    assert summary["bpv"] == pytest.approx(summary["storage_bits"] / numel)
    expected_bound = (rows[0]["bitmask_bound"] * 1024 + rows[1]["bitmask_bound"] * 256) / numel
    assert summary["bitmask_bound"] == pytest.approx(expected_bound)
    assert summary["compression_ratio"] == pytest.approx((1024 * 32 + 256 * 4) / summary["storage_bits"])
    table = format_bpv_table(rows, summary)
    lines = table.splitlines()
    assert len(lines) == 5 and lines[-1].startswith("| total")
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "bitmask/bits" in table
    assert bpv_summary([])["numel"] == 0


def test_model_bits_counts_what_no_plugin_packed() -> None:
    rows = [bpv_row("a", pack(_codes((16, 16), 0.25, 4), value_bits=4))]
    whole = model_bits(rows, 1256)  # 256 packed + 1000 others at 16 bits
    assert whole["rest_parameters"] == 1000 and whole["packed_parameters"] == 256
    assert whole["storage_bits"] == rows[0]["storage_bits"] + 16_000
    assert whole["bits_per_weight"] == pytest.approx(whole["storage_bits"] / 1256)
    assert model_bits(rows, 256, rest_bits=8)["bits_per_weight"] == pytest.approx(rows[0]["bpv"])
    with pytest.raises(ValueError, match="more than the model's"):
        model_bits(rows, 100)
    with pytest.raises(ValueError, match="rest_bits"):
        model_bits(rows, 1256, rest_bits=0)


def test_save_load_round_trip(tmp_path: Path) -> None:
    originals = {f"case.{cid}": t for cid, t, _ in CASES}
    packed = {f"case.{cid}": pack(t, **kw) for cid, t, kw in CASES}
    path = tmp_path / "sub" / "packed.safetensors"
    save_packed(packed, path)
    assert [p.name for p in path.parent.iterdir()] == ["packed.safetensors"]  # no temp file left behind
    loaded = load_packed(path)
    assert loaded.keys() == packed.keys()
    for name, p in loaded.items():
        assert (p.format, p.shape, p.dtype, p.value_bits, p.meta) == (
            packed[name].format,
            packed[name].shape,
            packed[name].dtype,
            packed[name].value_bits,
            packed[name].meta,
        )
        assert p.storage_bits() == packed[name].storage_bits()
    for name, t in load_unpacked(path).items():
        assert torch.equal(t, originals[name]) and t.dtype == originals[name].dtype


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("tensor", "kwargs", "match"),
    [
        (torch.ones(4), {"format": "sparse"}, "unknown format 'sparse'"),
        (torch.ones(4), {"mask_coding": "huffman"}, "unknown mask_coding 'huffman'"),
        (torch.tensor(1.0), {}, "0-d"),
        (torch.ones(4, dtype=torch.int8), {}, "value_bits in 2..8"),
        (torch.ones(4, dtype=torch.int8), {"value_bits": 1}, "value_bits in 2..8"),
        (torch.ones(4, dtype=torch.int8), {"value_bits": 9}, "value_bits in 2..8"),
        (torch.tensor([0, 8], dtype=torch.int8), {"value_bits": 4}, "outside the 4-bit range"),
        (torch.tensor([0, -9], dtype=torch.int8), {"value_bits": 4, "format": "bitmask"}, "outside the 4-bit range"),
        (torch.tensor([16], dtype=torch.uint8), {"value_bits": 4}, r"range \[0, 15\]"),
        (torch.ones(4), {"value_bits": 16}, "does not match float32"),
        (torch.ones(4, dtype=torch.bool), {}, "unsupported dtype bool"),
        (torch.zeros(2, 6), {"format": "nm"}, "last dim 6 is not divisible by m=4"),
        (torch.zeros(2, 8), {"format": "nm", "n": 4, "m": 4}, "1 <= n < m"),
        (torch.ones(2, 8), {"format": "nm"}, "violates the 2:4 pattern: 4 of 4 groups"),
        (torch.zeros(2, 8), {"format": "nm", "index_coding": "huffman"}, "unknown index_coding 'huffman'"),
        (torch.ones(4), {"value_coding": "arithmetic"}, "unknown value_coding 'arithmetic'"),
        (torch.ones(4), {"value_coding": "huffman"}, "applies to integer codes; floats are stored as-is"),
        (torch.zeros(2, 32), {"format": "nm", "n": 16, "m": 32, "index_coding": "enumerative"}, "C\\(m, n\\) <= 2\\*\\*20"),
    ],
)
def test_pack_errors(tensor: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack(tensor, **kwargs)


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_packed(path)


def _write_raw(path: Path, arrays: dict[str, torch.Tensor], entries: dict | None) -> None:
    metadata = {"vlmc.packed": "1", "vlmc.entries": json.dumps(entries)} if entries is not None else None
    save_file(arrays, str(path), metadata=metadata)


def _entry(packed: PackedTensor) -> dict:
    return {
        "format": packed.format,
        "shape": list(packed.shape),
        "dtype": packed.dtype,
        "value_bits": packed.value_bits,
        "meta": packed.meta,
        "parts": list(packed.tensors),
    }


def test_load_corrupted_files(tmp_path: Path) -> None:
    packed = pack(_sparse((4, 8), 0.5), "bitmask", mask_coding="bits")
    arrays = {f"w.{part}": t for part, t in packed.tensors.items()}

    missing = tmp_path / "missing.safetensors"
    _write_raw(missing, {"w.values": packed.tensors["values"]}, {"w": _entry(packed)})
    with pytest.raises(ValueError, match=r"w: stored tensor\(s\) w.mask missing"):
        load_packed(missing)

    wrong_shape = tmp_path / "shape.safetensors"
    _write_raw(wrong_shape, arrays, {"w": {**_entry(packed), "shape": [4, 16]}})
    with pytest.raises(ValueError, match="^w: "):
        load_packed(wrong_shape)

    wrong_count = tmp_path / "count.safetensors"
    _write_raw(wrong_count, arrays, {"w": {**_entry(packed), "meta": {**packed.meta, "nnz": 3}}})
    with pytest.raises(ValueError, match="^w: values part"):
        load_packed(wrong_count)

    foreign = tmp_path / "foreign.safetensors"
    _write_raw(foreign, arrays, None)
    with pytest.raises(ValueError, match="not a packed-tensor file"):
        load_packed(foreign)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        load_packed(garbage)


def test_corrupt_golomb_mask_names_the_tensor(tmp_path: Path) -> None:
    packed = pack(_sparse((64,), 0.3), "bitmask", mask_coding="golomb")
    path = tmp_path / "golomb.safetensors"
    save_packed({"layer.w": packed}, path)
    raw = {f"layer.w.{p}": t for p, t in packed.tensors.items()}
    raw["layer.w.mask"] = torch.full_like(packed.tensors["mask"], 255)  # all ones: no codeword ends
    _write_raw(path, raw, {"layer.w": _entry(packed)})
    with pytest.raises(ValueError, match="^layer.w: golomb mask"):
        load_unpacked(path)


def test_save_rejects_inconsistent_tensor(tmp_path: Path) -> None:
    packed = pack(torch.ones(4, 8), "dense")
    packed.shape = (4, 9)
    with pytest.raises(ValueError, match="^bad: values part"):
        save_packed({"bad": packed}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_large_golomb_is_fast() -> None:
    import time

    t = _sparse((4_000_000,), 0.25)
    start = time.perf_counter()
    packed = pack(t, "bitmask", mask_coding="golomb")
    assert torch.equal(unpack(packed), t)
    assert time.perf_counter() - start < 5.0


def test_corrupt_huffman_values_fail_clearly() -> None:
    t = torch.tensor([0, 0, 1, -2, 0, 1, -1, 0], dtype=torch.int8)
    packed = pack(t, "dense", value_bits=2, value_coding="huffman")
    short = PackedTensor(packed.format, packed.shape, packed.dtype, packed.value_bits, dict(packed.tensors),
                         {**packed.meta, "value_stream_bits": 40})
    with pytest.raises(ValueError, match="values part is torch.uint8 x 2 but"):
        unpack(short)
    fewer = PackedTensor(packed.format, packed.shape, packed.dtype, packed.value_bits, dict(packed.tensors),
                         {**packed.meta, "value_stream_bits": 10})  # the last values' bits are missing
    with pytest.raises(ValueError, match="Huffman value stream ends or breaks after"):
        unpack(fewer)
    lengths = PackedTensor(packed.format, packed.shape, packed.dtype, packed.value_bits,
                           {**packed.tensors, "code_lengths": torch.zeros(3, dtype=torch.uint8)}, dict(packed.meta))
    with pytest.raises(ValueError, match="code_lengths has 3 entries, 2-bit codes need 4"):
        unpack(lengths)
