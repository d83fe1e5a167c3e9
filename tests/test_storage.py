"""Coordinate packing, save dtypes, bytes on disk, and SparseMask persistence / statistics."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, random_mask
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from sparse_opd_peft import SparseMask, SparseOPDConfig, save_adapter
from sparse_opd_peft.tuner.storage import (
    pack_bitmask,
    pack_coordinates,
    unpack_bitmask,
    unpack_coordinates,
    weight_fingerprint,
)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_bitmask_roundtrip_matches_numpy_packbits(numel):
    import numpy as np

    g = torch.Generator().manual_seed(numel)
    dense = torch.rand(numel, generator=g) < 0.5
    idx = dense.nonzero().squeeze(1)
    packed = pack_bitmask(idx, numel)
    assert packed.tolist() == np.packbits(dense.numpy()).tolist()
    assert torch.equal(unpack_bitmask(packed, numel), idx)


def test_format_switches_at_one_in_32():
    numel = 32 * 1000
    assert pack_coordinates(torch.arange(999), numel)[0] == "indices"
    assert pack_coordinates(torch.arange(1000), numel)[0] == "bitmask"
    kind, packed = pack_coordinates(torch.arange(0, numel, 40), numel)
    assert kind == "indices" and packed.dtype == torch.int32
    assert torch.equal(unpack_coordinates(kind, packed, numel, "m"), torch.arange(0, numel, 40))


def test_padding_bits_must_be_zero():
    packed = pack_bitmask(torch.tensor([0]), 5)
    packed[0] |= 1  # bit of entry 7, past the end of a 5-entry weight
    with pytest.raises(ValueError, match="padding"):
        unpack_bitmask(packed, 5)


@pytest.mark.parametrize(("density", "kind"), [(0.01, "indices"), (0.05, "bitmask"), (0.5, "bitmask")])
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
    assert coord_keys and all(f"sparse_opd_{'indices' if kind == 'indices' else 'bitmask'}" in k for k in coord_keys)
    assert all(v.dtype == torch.bfloat16 for k, v in tensors.items() if k.endswith("sparse_opd_values"))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
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
    ov = a.overlap(b)
    assert abs(ov["overlap"] - ov["random_overlap"]) < 0.03  # independent random masks: at chance
    assert a.overlap(a)["jaccard"] == 1.0
    path = a.save(tmp_path / "a.safetensors")
    back = SparseMask.load(path)
    assert back.metadata["rule"] == "test" and all(torch.equal(back[n], a[n]) for n in a)
    with pytest.raises(FileExistsError, match="overwrite"):
        a.save(path, overwrite=False)
