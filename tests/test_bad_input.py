"""Each bad input gets a clear error naming the module or file, and leaves the model and files untouched."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model, random_mask
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from sparse_opd_peft import SparseMask, SparseOPDConfig
from sparse_opd_peft.tuner.layer import SparseOPDLayer

UP = "model.layers.0.mlp.up_proj"


def _untouched(model, state):
    assert not any(isinstance(m, SparseOPDLayer) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _expect(model, config, exc, match):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        get_peft_model(model, config)
    _untouched(model, state)


def test_unknown_module_name(model, mask):
    mask = {**mask, "model.layers.7.mlp.up_proj": torch.ones(64, 32, dtype=torch.bool)}
    _expect(model, SparseOPDConfig(mask=mask), ValueError, r"module 'model.layers.7.mlp.up_proj' .* not in the model")


def test_mask_shape_differs_from_weight(model):
    _expect(model, SparseOPDConfig(mask={UP: torch.ones(32, 64, dtype=torch.bool)}), ValueError, f"'{UP}' has shape")


def test_non_bool_mask(model):
    _expect(model, SparseOPDConfig(mask={UP: torch.ones(64, 32)}), ValueError, f"'{UP}' has dtype torch.float32.*bool")


def test_nan_mask(model):
    bad = torch.ones(64, 32)
    bad[0, 0] = float("nan")
    _expect(model, SparseOPDConfig(mask={UP: bad}), ValueError, f"'{UP}' contains NaN")


def test_empty_mask(model):
    _expect(model, SparseOPDConfig(mask={UP: torch.zeros(64, 32, dtype=torch.bool)}), ValueError, f"'{UP}' is empty")
    with pytest.warns(UserWarning):
        config = SparseOPDConfig(mask=None)
    _expect(model, config, ValueError, "needs `mask=`")


def test_mask_on_non_linear_module(model):
    mask = {"model.embed_tokens": torch.ones(32, 32, dtype=torch.bool)}
    _expect(model, SparseOPDConfig(mask=mask), ValueError, "'model.embed_tokens' is a Embedding, not a Linear")


def test_subspace_wrong_shape_or_non_finite(model):
    _expect(model, SparseOPDConfig(subspace={UP: torch.randn(64, 4)}), ValueError, f"basis for module '{UP}' must be")
    basis = torch.randn(32, 4)
    basis[1, 1] = float("inf")
    _expect(model, SparseOPDConfig(subspace={UP: basis}), ValueError, f"basis for module '{UP}' must be finite")


def _saved_adapter(tmp_path, density=0.01):
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, density, seed=4), init_weights=False))
    pm.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors"


def _load_fails(tmp_path, match):
    base = make_model()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, tmp_path)
    _untouched(base, state)
    assert files == {p.name: p.read_bytes() for p in tmp_path.iterdir()}


def _rewrite(path, fn):
    """Edit one module's positions as int32 indices (a coded uint8 stream of format 2 is decoded first; int32 indices
    are a valid form in every format version)."""
    from sparse_opd_peft.positions import decode_positions

    tensors = load_file(path)
    shapes = json.loads((path.parent / "adapter_config.json").read_text())["module_shapes"]
    key = next(k for k in tensors if k.endswith("sparse_opd_indices"))
    out_f, in_f = shapes[key.removeprefix("base_model.model.").rsplit(".", 1)[0]]
    t = tensors[key]
    if t.dtype == torch.uint8:
        t = decode_positions(t, out_f * in_f).int()
    tensors[key] = fn(t)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: torch.cat([t[:-1], torch.tensor([10**6], dtype=t.dtype)]), "out of range"),
        (lambda t: torch.cat([t[:1], t[:-1]]), "duplicate"),
        (lambda t: t.flip(0), "not sorted"),
    ],
    ids=["out_of_range", "duplicate", "unsorted"],
)
def test_adapter_file_with_bad_indices(tmp_path, edit, match):
    path = _saved_adapter(tmp_path)
    _rewrite(path, edit)
    _load_fails(tmp_path, f"adapter_model.safetensors module 'model.*{match}")


def test_values_length_differs_from_mask_nnz(tmp_path):
    path = _saved_adapter(tmp_path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("sparse_opd_values"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, path)
    _load_fails(tmp_path, r"sparse_opd_values must be float32 of shape \[\d+\], got float32")


def test_truncated_and_corrupt_safetensors(tmp_path):
    path = _saved_adapter(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _load_fails(tmp_path, "truncated or corrupt")
    path.write_bytes(b"\x00" * 64)
    _load_fails(tmp_path, "truncated or corrupt")


def test_adapter_loaded_on_a_different_base(tmp_path):
    _saved_adapter(tmp_path)
    other = make_model(seed=1)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"base model mismatch at module 'model.layers.0.*check_fingerprint=False"):
        PeftModel.from_pretrained(other, tmp_path)
    _untouched(other, state)
    config = SparseOPDConfig.from_pretrained(tmp_path)
    config.check_fingerprint = False
    loaded = PeftModel.from_pretrained(make_model(seed=1), tmp_path, config=config)
    assert any(isinstance(m, SparseOPDLayer) for m in loaded.modules())


def test_newer_config_format_is_rejected(tmp_path):
    _saved_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    _load_fails(tmp_path, "format_version 99.*upgrade sparse_opd_peft")


def test_mask_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        SparseMask.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors.*truncated or corrupt"):
        SparseMask.load(bad)
    save_file({"x": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a sparse_opd_peft mask file"):
        SparseMask.load(tmp_path / "other.safetensors")
