"""How much work a merge does: ΔW builds per layer (model-level and direct merges), with the guarantees that the saved
work must not cost (a model-level merge checks every layer before writing any; a direct ``layer.merge`` checks itself;
merged weights are what the one-rounding formula gives; merged forward == unmerged forward)."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from conftest import make_model, random_mask
from peft import get_peft_model

from sparse_opd_peft import SparseOPDConfig
from sparse_opd_peft.tuner.layer import SparseOPDLayer

UP, DOWN = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"


def _model(dtype=torch.float32, subspace=False, second=False):
    model = make_model(dtype=dtype)
    mask = random_mask(model, 0.2)
    basis = None
    if subspace:
        g = torch.Generator().manual_seed(2)
        modules = dict(model.named_modules())
        basis = {n: torch.linalg.qr(torch.randn(modules[n].in_features, 2, generator=g))[0] for n in list(mask)[:3]}
    second_mask = random_mask(model, 0.3, seed=7)
    pm = get_peft_model(model, SparseOPDConfig(mask=mask, subspace=basis, init_weights=False))
    if second:
        pm.add_adapter("second", SparseOPDConfig(mask=second_mask, init_weights=False))
        pm.base_model.set_adapter(["default", "second"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "sparse_opd_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    return pm


def _layers(pm) -> dict[str, SparseOPDLayer]:
    return {m.module_name: m for m in pm.modules() if isinstance(m, SparseOPDLayer)}


def _weights(pm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "sparse_opd_" not in n}


@pytest.fixture
def builds(monkeypatch):
    """Counts ``get_delta_weight`` calls per (module, adapter)."""
    calls: Counter = Counter()
    original = SparseOPDLayer.get_delta_weight

    def spy(self, adapter_name):
        calls[(self.module_name, adapter_name)] += 1
        return original(self, adapter_name)

    monkeypatch.setattr(SparseOPDLayer, "get_delta_weight", spy)
    return calls


def _expected_merge(pm):
    """``dtype(float32(W) + ΔW)`` per adapter in turn (the formula the merge writes), from the unmerged model; several
    sparse-only adapters together: ``dtype(float32(W) + ΔW_1 + ΔW_2 ...)``, one rounding."""
    expected = {}
    for name, layer in _layers(pm).items():
        w = layer.get_base_layer().weight.detach().clone()
        if len(layer.active_adapters) > 1 and not any(a in layer.sparse_opd_coeff for a in layer.active_adapters):
            acc = w.float().view(-1)
            for adapter in layer.active_adapters:
                idx = layer.sparse_opd_indices[adapter].long()
                acc[idx] += layer.get_delta_weight(adapter).view(-1)[idx]
            expected[name] = acc.to(w.dtype).view_as(w)
            continue
        for adapter in layer.active_adapters:
            delta = layer.get_delta_weight(adapter)
            if adapter in layer.sparse_opd_coeff:
                w = (w.float() + delta).to(w.dtype)
            else:
                idx = layer.sparse_opd_indices[adapter].long()
                flat = w.view(-1)
                flat[idx] = (flat[idx].float() + delta.view(-1)[idx]).to(w.dtype)
        expected[name] = w
    return expected


# ---------------------------------------------------------------------------------------------------- ΔW builds
@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
@pytest.mark.parametrize("subspace", [False, True])
def test_a_model_merge_builds_each_delta_once_or_twice(merge, subspace, builds):
    """Sparse-only adapters: once (the check keeps ΔW[coords] for the write); with a subspace: twice (the check
    keeps no dense ΔW across layers, the write builds it again). It was three times (model check, layer check,
    write)."""
    pm = _model(subspace=subspace, second=True)
    layers = _layers(pm)
    expected = _expected_merge(pm)
    builds.clear()
    getattr(pm, merge)()
    want = {
        (name, adapter): 2 if adapter in layer.sparse_opd_coeff else 1
        for name, layer in layers.items()
        for adapter in ("default", "second")
    }
    assert dict(builds) == want
    assert (2 in want.values()) == subspace
    for name, layer in layers.items():
        assert torch.equal(layer.get_base_layer().weight, expected[name]), name
        assert layer._sparse_opd_checked_merge is None


@pytest.mark.parametrize("subspace", [False, True])
def test_a_direct_layer_merge_builds_each_delta_once(subspace, builds):
    pm = _model(dtype=torch.bfloat16, subspace=subspace)
    expected = _expected_merge(pm)
    builds.clear()
    for layer in _layers(pm).values():
        layer.merge()
    assert set(builds.values()) == {1} and len(builds) == len(_layers(pm))
    for name, layer in _layers(pm).items():
        assert torch.equal(layer.get_base_layer().weight.view(torch.int16), expected[name].view(torch.int16)), name


def test_a_direct_merge_of_two_dense_adapters_keeps_one(builds):
    """Two adapters with a subspace on one layer: the check keeps the last one's dense ΔW, the first is rebuilt."""
    pm = _model(subspace=True, second=False)
    name = next(n for n, layer in _layers(pm).items() if "default" in layer.sparse_opd_coeff)
    layer = _layers(pm)[name]
    basis = layer.sparse_opd_basis["default"].clone()
    layer.update_layer("two", basis=basis, init_weights=False)
    layer.set_adapter(["default", "two"])
    expected = _expected_merge(pm)[name]
    builds.clear()
    layer.merge()
    assert builds == Counter({(name, "default"): 2, (name, "two"): 1})
    assert torch.equal(layer.get_base_layer().weight, expected)


# ---------------------------------------------------------------------------------------------------- checks kept
@pytest.mark.parametrize("safe_merge", [False, True])
@pytest.mark.parametrize("merge", ["merge_adapter", "merge_and_unload"])
def test_a_nan_on_one_layer_leaves_every_layer_unmerged(merge, safe_merge):
    pm = _model(dtype=torch.bfloat16, subspace=True, second=True)
    layers = _layers(pm)
    assert list(layers)[-1] == DOWN  # checked last: every other layer passed its check first
    with torch.no_grad():
        layers[DOWN].sparse_opd_values["second"][5] = float("nan")
    before = _weights(pm)
    with pytest.raises(
        ValueError,
        match=rf"adapter 'second' into module '{re.escape(DOWN)}' would write 1 non-finite weight entry: .*NaN",
    ):
        getattr(pm, merge)(safe_merge=safe_merge)
    after = _weights(pm)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n].view(torch.int16), w.view(torch.int16)) for n, w in before.items())
    assert not any(layer.merged for layer in layers.values())
    assert all(layer._sparse_opd_checked_merge is None for layer in layers.values())  # nothing stale is left
    # once fixed, the same model merges (with fresh checks, not the refused ones)
    with torch.no_grad():
        layers[DOWN].sparse_opd_values["second"][5] = 0.0
    expected = _expected_merge(pm)
    pm.merge_adapter(safe_merge=safe_merge)
    assert all(torch.equal(layer.get_base_layer().weight, expected[n]) for n, layer in layers.items())


def test_a_direct_layer_merge_still_checks_itself(builds):
    pm = _model(dtype=torch.float16, subspace=True)
    layer = _layers(pm)[UP]
    with torch.no_grad():
        layer.sparse_opd_values["default"].fill_(7e4)  # |W + ΔW| > 65504, the largest float16
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=rf"module '{re.escape(UP)}' would write \d+ non-finite .*overflows"):
        layer.merge(safe_merge=True)
    with pytest.raises(ValueError, match=rf"module '{re.escape(UP)}' would write \d+ non-finite .*overflows"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged


def test_a_check_is_only_trusted_for_the_adapters_it_checked(builds):
    """A layer handed a check for other adapters than it is asked to merge checks itself again."""
    pm = _model(second=True)
    layer = _layers(pm)[UP]
    layer._sparse_opd_checked_merge = layer._check_merge(["default"], keep_dense=False)
    with torch.no_grad():
        layer.sparse_opd_values["second"][0] = float("inf")
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match="adapter 'second'.*non-finite"):
        layer.merge(adapter_names=["default", "second"])
    assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged
    assert layer._sparse_opd_checked_merge is None  # a hand-off is used (or dropped) by the next merge only


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("subspace", [False, True])
def test_merged_forward_matches_unmerged(subspace, ids):
    pm = _model(subspace=subspace, second=True)
    with torch.no_grad():
        out = pm(ids).logits
        pm.merge_adapter()
        torch.testing.assert_close(pm(ids).logits, out, rtol=1e-5, atol=1e-6)
        pm.unmerge_adapter()
        assert torch.equal(pm(ids).logits, out)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("subspace", [False, True])
def test_bf16_merged_forward_is_the_unmerged_forward(subspace, ids):
    """bf16, one adapter: the unmerged forward computes with dtype(float32(W) + ΔW), exactly what the merge writes.
    (Two sparse adapters: :func:`test_bf16_two_sparse_adapters_merge_with_one_rounding`.)"""
    pm = _model(dtype=torch.bfloat16, subspace=subspace)
    with torch.no_grad():
        out = pm(ids).logits
        pm.merge_adapter()
        assert torch.equal(pm(ids).logits, out)


def test_bf16_two_sparse_adapters_merge_with_one_rounding(ids):
    """Two sparse adapters with overlapping coordinates merged together into a bf16 base: one rounding per entry, so
    the merged forward is the unmerged forward bit for bit (rounding after each adapter would differ), and unmerge
    restores the original weights bit for bit; merged in two calls, each call rounds once (and unmerge again restores
    the original)."""
    pm = _model(dtype=torch.bfloat16, second=True)
    with torch.no_grad():  # large enough values that rounding twice and rounding once differ somewhere
        for name, prm in pm.named_parameters():
            if "sparse_opd_" in name:
                prm.mul_(40.0)
    layers = _layers(pm)
    overlap = sum(
        int(torch.isin(layer.sparse_opd_indices["default"], layer.sparse_opd_indices["second"]).sum())
        for layer in layers.values()
    )
    assert overlap > 100
    w0 = _weights(pm)
    twice = {}  # what rounding after each adapter would write
    for name, layer in layers.items():
        w = layer.get_base_layer().weight.detach().clone().view(-1)
        for adapter in ("default", "second"):
            idx = layer.sparse_opd_indices[adapter].long()
            w[idx] = (w[idx].float() + layer.get_delta_weight(adapter).view(-1)[idx]).to(w.dtype)
        twice[name] = w
    with torch.no_grad():
        out = pm(ids).logits
        pm.merge_adapter()
        assert torch.equal(pm(ids).logits, out)
        differs = sum(int((ly.get_base_layer().weight.view(-1) != twice[n]).sum()) for n, ly in layers.items())
        assert differs > 0  # the test would notice a merge that rounds twice
        assert all(set(layer.last_merge_report) == {"default", "second"} for layer in layers.values())
        pm.unmerge_adapter()
        assert all(torch.equal(w0[n], w) for n, w in _weights(pm).items())
        assert torch.equal(pm(ids).logits, out)
        pm.merge_adapter(["default"])  # merged in two calls: each call rounds once, so twice in all
        pm.merge_adapter(["second"])
        assert all(torch.equal(layer.get_base_layer().weight.view(-1), twice[n]) for n, layer in layers.items())
        pm.unmerge_adapter()
        assert all(torch.equal(w0[n], w) for n, w in _weights(pm).items())


def test_a_shared_base_weight_makes_every_layer_check_itself(builds):
    """Two adapted layers over one base weight (e.g. weights tied after injection): a write changes what the other
    layer's check saw, so no check result is handed over; each layer checks again before its write (2 builds), and the
    merged weight is both deltas applied in turn."""
    pm = _model()
    layers = _layers(pm)
    a, b = layers["model.layers.0.mlp.gate_proj"], layers[UP]
    b.get_base_layer().weight = a.get_base_layer().weight  # same Parameter object: same storage
    w0 = a.get_base_layer().weight.detach().clone()
    expected = w0.view(-1).clone()
    for layer in (a, b):
        idx = layer.sparse_opd_indices["default"].long()
        expected[idx] = expected[idx] + layer.get_delta_weight("default").view(-1)[idx]
    builds.clear()
    pm.merge_adapter()
    assert builds[(a.module_name, "default")] == 2 and builds[(b.module_name, "default")] == 2
    assert builds[(DOWN, "default")] == 2  # every layer, not only the two sharing a weight
    torch.testing.assert_close(a.get_base_layer().weight.detach().view(-1), expected, rtol=0, atol=1e-7)
    assert all(getattr(layer, "_sparse_opd_checked_merge", None) is None for layer in layers.values())


def test_float64_two_sparse_adapters_merge_and_unmerge_exactly(ids):
    """A float64 base with two sparse adapters merged together: the sum runs in float64 (the forward's accumulation
    dtype), so the merged forward is the unmerged one and unmerge restores the original weights bit for bit."""
    pm = _model(dtype=torch.float64, second=True)
    w0 = _weights(pm)
    with torch.no_grad():
        out = pm(ids).logits
        pm.merge_adapter()
        assert torch.equal(pm(ids).logits, out)
        pm.unmerge_adapter()
    assert all(torch.equal(w0[n], w) for n, w in _weights(pm).items())
