"""Bytes on disk per trained coordinate of a saved adapter at 1 %, 5 %, 20 % and 50 % density, float32 and bf16
values, against the version-1 format (bitmask / int32 positions), the floor (bf16 values + entropy-coded positions)
and peft SHiRA's file for the same mask; and the time to decode one module of 1M coordinates. The masks, their
r and SHiRA's wrapping are ``bench_adapter_step.py``'s (imported from this script's folder).

    python benchmarks/bench_storage.py     # prints the tables, writes benchmarks/results/storage.md
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_adapter_step import mask_for, rank_for, targeted, wrap
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft import SparseOPDConfig
from sparse_opd_peft.positions import (
    CODEC_ELIAS_FANO,
    CODEC_VARINT,
    decode_positions,
    encode_positions,
    index_dtype,
    pack_bitmask,
    unpack_coordinates,
    validate_flat_indices,
)
from sparse_opd_peft.safetensors_io import safetensors_nbytes

RESULTS = Path(__file__).parent / "results" / "storage.md"
FORMS = {"bitmask": "bitmask", CODEC_ELIAS_FANO: "Elias-Fano", CODEC_VARINT: "varint", "indices": "int32"}


def model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )
    return Qwen3ForCausalLM(cfg)


def saved_file(peft_model, directory: Path) -> Path:
    peft_model.save_pretrained(directory)
    return directory / "adapter_model.safetensors"


def v1_size_and_forms(path: Path, shapes: dict) -> tuple[int, int, dict]:
    """(bytes of the same file in format version 1, bytes of its coordinate tensors, {form: modules})."""
    tensors = load_file(path)
    v1, coord_bytes, forms = dict(tensors), 0, {}
    for key, t in tensors.items():
        if not key.endswith(("sparse_opd_bitmask", "sparse_opd_indices")):
            continue
        name = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        numel = shapes[name][0] * shapes[name][1]
        form = "bitmask" if key.endswith("bitmask") else int(t[0]) if t.dtype == torch.uint8 else "indices"
        forms[FORMS[form]] = forms.get(FORMS[form], 0) + 1
        coord_bytes += t.numel() * t.element_size()
        idx = unpack_coordinates({"bitmask": "bitmask", "indices": "indices"}.get(form, "coded"), t, numel, key)
        v1.pop(key)
        if idx.numel() >= numel / 32:  # the version-1 rule: bitmask at density >= 1/32, else int32 indices
            v1[key.replace("sparse_opd_indices", "sparse_opd_bitmask")] = pack_bitmask(idx, numel)
        else:
            v1[key.replace("sparse_opd_bitmask", "sparse_opd_indices")] = idx.to(index_dtype(numel))
    return safetensors_nbytes(v1, {"format": "pt"}), coord_bytes, forms


def entropy_floor(nnz: int, numel: int) -> float:
    """Bytes per coordinate of bf16 values plus positions coded at the binary entropy of the density."""
    d = nnz / numel
    return 2.0 + (-(d * math.log2(d) + (1 - d) * math.log2(1 - d)) / d) / 8


def size_table() -> list[str]:
    rows = [
        "| target density | actual density | coordinates | position forms (modules) | positions (B/coord) | "
        "ours fp32 (B/coord) | ours bf16 (B/coord) | format v1 bf16 (B/coord) | floor bf16 (B/coord) | "
        "SHiRA (B/coord) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = model()
    linears = targeted(base)
    base_numel = sum(m.weight.numel() for m in linears.values())
    shapes = {n: tuple(m.weight.shape) for n, m in linears.items()}
    for density in (0.01, 0.05, 0.2, 0.5):
        r = rank_for(base, density)  # r * (in + out) coordinates per targeted Linear, so SHiRA can hold the same mask
        mask = mask_for(base, r)
        nnz = sum(int(m.sum()) for m in mask.values())
        sizes = {}
        with tempfile.TemporaryDirectory() as d:
            for dtype in ("float32", "bfloat16"):
                cfg = SparseOPDConfig(mask=mask, save_dtype=dtype)
                path = saved_file(get_peft_model(copy.deepcopy(base), cfg), Path(d) / dtype)
                sizes[dtype] = path.stat().st_size
            v1, coord_bytes, forms = v1_size_and_forms(path, shapes)
            shira = saved_file(wrap(base, "shira", r, mask, "-"), Path(d) / "shira").stat().st_size
        used = ", ".join(f"{k} {v}" for k, v in sorted(forms.items()))
        rows.append(
            f"| {density:.0%} | {nnz / base_numel:.2%} | {nnz:,} | {used} | {coord_bytes / nnz:.2f} | "
            f"{sizes['float32'] / nnz:.2f} | {sizes['bfloat16'] / nnz:.2f} | {v1 / nnz:.2f} | "
            f"{entropy_floor(nnz, base_numel):.2f} | {shira / nnz:.2f} |"
        )
    return rows


def decode_table(repeats: int = 7) -> list[str]:
    """Median seconds to decode (and validate) one module of 1M coordinates, 5 % of a 20M-entry weight."""
    numel, nnz = 20_000_000, 1_000_000
    idx = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[:nnz].sort().values
    rows = [
        "| codec | stream bytes / coord | encode (s) | decode + validate (s) |",
        "|---|---:|---:|---:|",
    ]
    for codec in (CODEC_ELIAS_FANO, CODEC_VARINT):
        enc, dec = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            stream = encode_positions(idx, numel, codec)
            t1 = time.perf_counter()
            back = validate_flat_indices(decode_positions(stream, numel), numel, "bench")
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        assert torch.equal(back, idx)
        rows.append(
            f"| {FORMS[codec]} | {stream.numel() / nnz:.3f} | {statistics.median(enc):.3f} | "
            f"{statistics.median(dec):.3f} |"
        )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    sizes, decode = "\n".join(size_table()), "\n".join(decode_table())
    note = (
        "File size of `adapter_model.safetensors` (header included) divided by the number of trained coordinates; "
        "tiny Qwen3 (hidden 256, 2 layers), all block Linears, random masks. Positions are stored per module in the "
        "smallest of bitmask, int32 indices, Elias-Fano and delta-varint streams (format version 2); *format v1* is "
        "the same file with version 1's bitmask (density >= 1/32) or int32 positions; *floor* is bf16 values plus "
        "positions at the binary entropy of the density. Generated by `python benchmarks/bench_storage.py`.\n\n"
    )
    timing = (
        f"\n\nOne module of 1,000,000 coordinates (5 % of a 20M-entry weight, random), 1 thread, median of 7, "
        f"torch {torch.__version__}:\n\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(note + sizes + timing + decode + "\n")
    print(sizes + "\n\n" + decode)


if __name__ == "__main__":
    main()
