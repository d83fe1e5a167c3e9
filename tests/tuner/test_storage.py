"""Coordinate packing, save dtypes, bytes on disk, and SparseMask persistence / statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _positions_reference import elias_fano_stream, varint_stream
from conftest import make_model, random_mask
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from sparse_opd_peft import SparseMask, SparseOPDConfig, save_adapter
from sparse_opd_peft.masks import mask_overlap
from sparse_opd_peft.positions import (
    CODEC_ELIAS_FANO,
    CODEC_VARINT,
    coordinate_sizes,
    decode_positions,
    elias_fano_low_bits,
    encode_positions,
    pack_bitmask,
    pack_coordinates,
    unpack_bitmask,
    unpack_coordinates,
)
from sparse_opd_peft.tuner.storage import ADAPTER_FORMAT_VERSION, weight_fingerprint

FIXTURE_V1 = Path(__file__).parent / "fixtures" / "adapter_v1"


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_bitmask_roundtrip_matches_numpy_packbits(numel):
    import numpy as np

    g = torch.Generator().manual_seed(numel)
    dense = torch.rand(numel, generator=g) < 0.5
    idx = dense.nonzero().squeeze(1)
    packed = pack_bitmask(idx, numel)
    assert packed.tolist() == np.packbits(dense.numpy()).tolist()
    assert torch.equal(unpack_bitmask(packed, numel), idx)


POSITION_CASES = {
    "one_entry": (1, [0]),
    "first_and_last": (1000, [0, 999]),
    "varint_byte_edges": (40000, [0, 127, 255, 16638, 33022, 39999]),
    "beyond_2_31": (2**33, [0, 5, 2**32, 2**33 - 1]),
    "random_5pct": (5000, sorted(torch.randperm(5000, generator=torch.Generator().manual_seed(3))[:250].tolist())),
}


@pytest.mark.parametrize("case", sorted(POSITION_CASES))
@pytest.mark.parametrize("codec", [CODEC_VARINT, CODEC_ELIAS_FANO], ids=["varint", "elias_fano"])
def test_codecs_match_the_reference_writer_and_round_trip(case, codec):
    numel, positions = POSITION_CASES[case]
    idx = torch.tensor(positions)
    stream = encode_positions(idx, numel, codec)
    if codec == CODEC_VARINT:
        want = varint_stream(positions)
    else:
        want = elias_fano_stream(positions, numel, elias_fano_low_bits(len(positions), numel))
    assert stream.dtype == torch.uint8 and stream.tolist() == want.tolist()
    assert torch.equal(decode_positions(stream, numel), idx)
    assert stream.numel() == coordinate_sizes(idx, numel)["varint" if codec == CODEC_VARINT else "elias_fano"]


def _positions(numel: int, density: float, clustered: bool) -> torch.Tensor:
    n = max(1, round(numel * density))
    if clustered:  # one run of whole rows
        return torch.arange(min(numel // 3, numel - n), min(numel // 3, numel - n) + n)
    return torch.randperm(numel, generator=torch.Generator().manual_seed(n))[:n].sort().values


def test_decoding_names_the_module_and_refuses_what_no_encoder_writes():
    where = "f.safetensors module 'm'"
    # Elias-Fano can name positions past the end when out * in is not a multiple of 2**L: 1001 in a 1000-entry weight
    with pytest.raises(ValueError, match=r"^f.safetensors module 'm': coordinate out of range \[0, 1000\)"):
        unpack_coordinates("coded", elias_fano_stream([0, 1001], 1000, 3), 1000, where)
    with pytest.raises(ValueError, match=r"^f.safetensors module 'm': .*positions for a weight of 8 entries"):
        unpack_coordinates("coded", varint_stream(list(range(9))), 8, where)
    with pytest.raises(ValueError, match=r"unknown coordinate encoding 'rle' \(expected one of"):
        unpack_coordinates("rle", torch.zeros(3, dtype=torch.uint8), 8, where)
    assert unpack_coordinates("coded", elias_fano_stream([0, 999], 1000, 3), 1000, where).tolist() == [0, 999]


@pytest.mark.parametrize("clustered", [False, True], ids=["random", "rows"])
@pytest.mark.parametrize("density", [0.0001, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9])
def test_pack_coordinates_takes_the_smallest_form(density, clustered):
    numel = 1000 * 1000
    idx = _positions(numel, density, clustered)
    kind, packed = pack_coordinates(idx, numel)
    sizes = coordinate_sizes(idx, numel)
    assert packed.numel() * packed.element_size() == min(sizes.values())
    assert torch.equal(unpack_coordinates(kind, packed, numel, "m"), idx)
    codec = {1: "varint", 2: "elias_fano"}.get(int(packed[0])) if kind == "coded" else kind
    assert sizes[codec] == min(sizes.values())


def test_elias_fano_cost_at_5_and_1_percent():
    """Random positions: Elias-Fano costs 2 + ceil(log2(1 / density)) - 1 bits per coordinate; the bitmask 1 /
    density bits, int32 indices 32 bits, the entropy floor H(d) / d bits (5.73 at 5 %, 8.08 at 1 %)."""
    numel = 2048 * 2048
    for density, low_bits, most in ((0.05, 4, 0.79), (0.01, 6, 1.08)):
        idx = _positions(numel, density, clustered=False)
        kind, packed = pack_coordinates(idx, numel)
        assert kind == "coded" and int(packed[0]) == CODEC_ELIAS_FANO and int(packed[1]) == low_bits
        assert packed.numel() / idx.numel() <= most
    idx = _positions(numel, 0.05, clustered=True)  # a run: delta-varint, one byte per coordinate, beats it only
    assert coordinate_sizes(idx, numel)["varint"] < 1.01 * idx.numel()  # when Elias-Fano needs more than 8 bits
    assert int(pack_coordinates(_positions(numel, 0.001, True), numel)[1][0]) == CODEC_VARINT


def test_padding_bits_must_be_zero():
    packed = pack_bitmask(torch.tensor([0]), 5)
    packed[0] |= 1  # bit of entry 7, past the end of a 5-entry weight
    with pytest.raises(ValueError, match="padding"):
        unpack_bitmask(packed, 5)


@pytest.mark.parametrize(("density", "kind"), [(0.01, "coded"), (0.05, "coded"), (0.5, "bitmask")])
def test_adapter_file_layout_and_save_dtype(tmp_path, density, kind):
    model = make_model()
    pm = get_peft_model(
        model, SparseOPDConfig(mask=random_mask(model, density), save_dtype="bfloat16", init_weights=False)
    )
    ids = torch.arange(9).view(1, 9)
    with torch.no_grad():
        for module in pm.modules():  # what the file will hold: the values rounded to bf16
            if hasattr(module, "sparse_opd_values") and "default" in module.sparse_opd_values:
                v = module.sparse_opd_values["default"]
                v.copy_(v.to(torch.bfloat16).float())
        out = pm(ids).logits
        with pm.disable_adapter():
            base_out = pm(ids).logits
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    coord_keys = [k for k in tensors if "sparse_opd_indices" in k or "sparse_opd_bitmask" in k]
    assert coord_keys and all(f"sparse_opd_{'bitmask' if kind == 'bitmask' else 'indices'}" in k for k in coord_keys)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    coded = 0
    for key in coord_keys:  # each module's coordinates in their smallest form; coded streams where those win
        t, name = tensors[key], key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        numel = cfg["module_shapes"][name][0] * cfg["module_shapes"][name][1]
        form = "bitmask" if key.endswith("bitmask") else "coded" if t.dtype == torch.uint8 else "indices"
        idx = unpack_coordinates(form, t, numel, key)
        assert idx.numel() == cfg["module_nnz"][name]
        assert t.numel() * t.element_size() == min(coordinate_sizes(idx, numel).values())
        coded += form == "coded"
    assert coded >= (len(coord_keys) // 2 if kind == "coded" else 0)
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k.endswith("sparse_opd_values"))
    assert all(not isinstance(v, dict) or "tensor" not in str(type(v)) for v in cfg.values())
    reloaded = PeftModel.from_pretrained(make_model(), tmp_path)
    layer = reloaded.get_submodule("base_model.model.model.layers.0.mlp.up_proj")
    assert layer.sparse_opd_values["default"].dtype == torch.float32
    # The file holds bf16(values) and the reload upcasts them to float32 exactly, so the reloaded model computes with
    # the very numbers (base weights, coordinates, values) and ops of the in-memory model whose values were rounded
    # to bf16 above: its logits are equal bit for bit (no tolerance). A reload that dropped the adapter (or one
    # module of it) gives the base logits instead, which differ.
    with torch.no_grad():
        got = reloaded(ids).logits
    assert torch.equal(got, out)
    assert not torch.equal(out, base_out)


def _decode_v1(tensor: torch.Tensor, key: str, numel: int) -> torch.Tensor:
    """Version-1 coordinates decoded independently of the library: numpy bitmask bits or raw int32 indices."""
    if key.endswith("sparse_opd_bitmask"):
        return torch.from_numpy(np.flatnonzero(np.unpackbits(tensor.numpy())[:numel]))
    assert tensor.dtype == torch.int32
    return tensor.long()


def test_version_1_file_loads_and_resaves_as_the_current_version(tmp_path):
    """``tests/tuner/fixtures/adapter_v1`` was written by the version-1 encoder (git 9138474: bitmask at >= 1/32 density,
    int32 indices below) for ``make_model()``: bf16 values, 30 % masks on the MLPs, 1 % on attention."""
    cfg = json.loads((FIXTURE_V1 / "adapter_config.json").read_text())
    tensors = load_file(FIXTURE_V1 / "adapter_model.safetensors")
    assert cfg["format_version"] == 1
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"sparse_opd_values", "sparse_opd_bitmask", "sparse_opd_indices"}
    loaded = PeftModel.from_pretrained(make_model(), FIXTURE_V1)
    for key, tensor in tensors.items():
        module, param = key.removeprefix("base_model.model.").rsplit(".", 1)
        layer = loaded.base_model.model.get_submodule(module)
        if param == "sparse_opd_values":
            assert torch.equal(layer.sparse_opd_values["default"], tensor.float())
        else:
            want = _decode_v1(tensor, key, layer.weight.numel())
            assert want.numel() == cfg["module_nnz"][module]
            assert torch.equal(layer.sparse_opd_indices["default"].long(), want)
    ids = torch.arange(9).view(1, 9)
    with torch.no_grad():
        out = loaded(ids).logits
        with loaded.disable_adapter():
            assert not torch.equal(out, loaded(ids).logits)
    loaded.save_pretrained(tmp_path)  # re-saved in the current format: coded streams where smaller
    again = load_file(tmp_path / "adapter_model.safetensors")
    kinds = {k.rsplit(".", 1)[1]: v.dtype for k, v in again.items() if "sparse_opd_values" not in k}
    assert kinds == {"sparse_opd_bitmask": torch.uint8, "sparse_opd_indices": torch.uint8}
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < (
        FIXTURE_V1 / "adapter_model.safetensors"
    ).stat().st_size
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(make_model(), tmp_path)(ids).logits, out)


def test_saved_files_carry_the_current_format_version(tmp_path):
    from sparse_opd_peft.tuner.config import CONFIG_FORMAT_VERSION

    assert ADAPTER_FORMAT_VERSION == CONFIG_FORMAT_VERSION == 2
    model = make_model()
    get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.05))).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["format_version"] == ADAPTER_FORMAT_VERSION


def test_save_adapter_is_atomic(tmp_path):
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model)))
    save_adapter(pm, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary left behind


def test_fingerprint_is_dtype_robust_and_content_sensitive():
    w = torch.randn(64, 48)
    assert weight_fingerprint(w)["sample_sha256"] == weight_fingerprint(w.to(torch.bfloat16))["sample_sha256"]
    w2 = w.clone()
    w2[10, 10] += 1.0
    assert weight_fingerprint(w, full=True)["full_sha256"] != weight_fingerprint(w2, full=True)["full_sha256"]


def test_sparse_mask_stats_setops_and_roundtrip(tmp_path):
    model = make_model()
    a = SparseMask(random_mask(model, 0.1, seed=1), metadata={"rule": "test"})
    b = SparseMask(random_mask(model, 0.2, seed=2))
    assert 0.08 < a.density() < 0.12
    stats = a.type_stats()
    assert stats["ffn"]["nnz"] + stats["attention"]["nnz"] == a.nnz() and stats["other"]["nnz"] == 0
    assert (a & b).nnz() + (a | b).nnz() == a.nnz() + b.nnz()
    assert (a - b).nnz() == a.nnz() - (a & b).nnz()
    ov = mask_overlap(a, b)
    assert abs(ov["share_of_a"] - ov["random_share_of_a"]) < 0.03  # independent random masks: at chance
    assert mask_overlap(a, a)["iou"] == 1.0
    path = a.save(tmp_path / "a.safetensors")
    back = SparseMask.load(path)
    assert back.metadata["rule"] == "test" and all(torch.equal(back[n], a[n]) for n in a)
    with pytest.raises(FileExistsError, match="overwrite"):
        a.save(path, overwrite=False)
