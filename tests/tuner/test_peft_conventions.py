"""SparseOPD behaves like a peft method: a config is a value, per-adapter settings, clean delete, weighted adapters,
no patching of peft, base-layer hooks, merge safety (non-finite results, tied weights), pickle refused."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_model, random_mask
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTuner

import sparse_opd_peft
import sparse_opd_peft.hub
import sparse_opd_peft.model_card
from sparse_opd_peft import SparseOPDConfig, save_adapter
from sparse_opd_peft.tuner import sparse_matmul
from sparse_opd_peft.tuner.layer import SparseOPDLayer

UP, DOWN = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"


def layers(model) -> dict[str, SparseOPDLayer]:
    return {m.module_name: m for m in model.modules() if isinstance(m, SparseOPDLayer)}


def randomize(model, adapter: str = "default", std: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}" in name and "sparse_opd_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------------------------------------------- config value
def test_a_config_builds_the_same_adapter_every_time(ids):
    base = make_model()
    mask = random_mask(base, 0.1)
    config = SparseOPDConfig(mask=mask, init_weights=False)
    first = get_peft_model(make_model(), config)
    assert config.mask is mask  # not consumed
    second = get_peft_model(make_model(), config)  # the issue: all coordinates became index 0 here
    third = get_peft_model(make_model(), copy.deepcopy(config))
    for model in (first, second, third):
        got = layers(model)
        assert set(got) == set(mask)
        for name, layer in got.items():
            want = mask[name].reshape(-1).nonzero().squeeze(1)
            assert torch.equal(layer.sparse_opd_indices["default"].long(), want)
    randomize(first), randomize(second), randomize(third)
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
        assert torch.equal(first(ids).logits, third(ids).logits)


def test_a_second_adapter_from_the_same_config_saves_and_loads(tmp_path, ids):
    # peft's test_adapter_dtype_autocast: "1 coordinates but adapter_config.json says 33" before
    model = make_model()
    config = SparseOPDConfig(mask=random_mask(model, 0.1))
    pm = get_peft_model(model, config)
    pm.add_adapter("other", config)
    randomize(pm, "default", seed=1), randomize(pm, "other", seed=2)
    nnz = sum(int(m.sum()) for m in config.mask.values())
    assert sum(layer.sparse_opd_indices["other"].numel() for layer in layers(pm).values()) == nnz
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    for name in ("default", "other"):
        pm.set_adapter(name), loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(pm(ids).logits, loaded(ids).logits)


def test_each_saved_adapter_records_its_own_base(tmp_path):
    config = SparseOPDConfig(mask=random_mask(make_model(), 0.1))
    on_a = get_peft_model(make_model(seed=0), config)
    get_peft_model(make_model(seed=1), config)  # the same config on another base
    save_adapter(on_a, tmp_path / "a")
    PeftModel.from_pretrained(make_model(seed=0), tmp_path / "a")  # base A's fingerprint, so this loads
    with pytest.raises(ValueError, match="base model mismatch"):
        PeftModel.from_pretrained(make_model(seed=1), tmp_path / "a")


def test_saved_config_holds_no_inputs_and_an_adapter_from_it_needs_its_file(tmp_path, ids):
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1)))
    pm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["mask"] is None and saved["subspace"] is None and saved["module_nnz"]
    reloaded = SparseOPDConfig.from_pretrained(tmp_path)
    orphan = get_peft_model(make_model(), reloaded)  # metadata only: no coordinates until the file is loaded
    with pytest.raises(
        ValueError, match=r"module 'model\.layers\..*': adapter 'default' was built from adapter metadata"
    ):
        orphan(ids)
    assert torch.equal(PeftModel.from_pretrained(make_model(), tmp_path)(ids).logits, pm(ids).logits)


def test_target_modules_alone_trains_every_coordinate_and_is_reusable():
    config = SparseOPDConfig(target_modules=["up_proj"])
    for _ in range(2):
        pm = get_peft_model(make_model(), config)
        got = layers(pm)
        assert sorted(got) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
        assert all(torch.equal(m.sparse_opd_indices["default"].long(), torch.arange(64 * 32)) for m in got.values())
        assert pm.peft_config["default"].density == 1.0
    assert config.target_modules == ["up_proj"]


# ---------------------------------------------------------------------------------------------------- peft method
def test_importing_the_package_patches_nothing_of_peft():
    for cls in (PeftModel, BaseTuner):
        for attr, value in vars(cls).items():
            func = getattr(value, "__func__", value)
            assert not getattr(func, "__module__", "").startswith("sparse_opd_peft"), f"{cls.__name__}.{attr}"
    assert "sparse_opd_peft" not in (
        PeftModel.push_to_hub.__module__ + PeftModel.create_or_update_model_card.__module__
    )
    assert not hasattr(sparse_opd_peft.hub, "install_push_hook")
    assert not hasattr(sparse_opd_peft.model_card, "install_model_card_hook")


def test_peft_floor_is_the_version_with_the_state_dict_hooks():
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert re.findall(r'^\s*"peft>=([0-9.]+)"', pyproject, flags=re.M) == ["0.21"]
    for hook in ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"):
        assert hook in vars(BaseTuner) and hook in vars(sparse_opd_peft.SparseOPDModel)


def test_grad_path_applies_per_adapter(monkeypatch, ids):
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1, names=[UP]), grad_path="gather"))
    pm.add_adapter("other", SparseOPDConfig(mask=random_mask(model, 0.1, seed=2, names=[UP]), grad_path="dense_rows"))
    pm.base_model.set_adapter(["default", "other"])
    used = []
    real = sparse_matmul.values_grad
    monkeypatch.setattr(sparse_matmul, "values_grad", lambda *a: used.append(a[4]) or real(*a))
    pm(input_ids=ids, labels=ids).loss.backward()
    assert sorted(used) == ["dense_rows", "gather"]
    layer = layers(pm)[UP]
    assert (
        layer.sparse_opd_values["default"].grad.abs().sum() > 0
        and layer.sparse_opd_values["other"].grad.abs().sum() > 0
    )


def test_delete_adapter_leaves_nothing_behind():
    model = make_model()
    config = SparseOPDConfig(mask=random_mask(model, 0.1))
    pm = get_peft_model(model, config)
    pm.add_adapter("gone", config)
    pm.base_model.set_adapter(["default", "gone"])
    pm.merge_adapter()
    pm.unmerge_adapter()
    pm.delete_adapter("gone")
    for layer in layers(pm).values():
        held = [k for k, v in vars(layer).items() if isinstance(v, (dict, set)) and "gone" in v]
        held += [n for n, _ in layer.named_parameters() if "gone" in n] + [
            n for n, _ in layer.named_buffers() if "gone" in n
        ]
        held += [a for a in layer.adapter_layer_names + layer.other_param_names if "gone" in getattr(layer, a)]
        assert not held, (layer.module_name, held)
    assert "gone" not in pm.peft_config


def test_add_weighted_adapter_is_the_exact_weighted_sum(ids):
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1, names=[UP, DOWN])))
    basis = torch.linalg.qr(torch.randn(64, 3, generator=torch.Generator().manual_seed(4)))[0]
    pm.add_adapter("b", SparseOPDConfig(mask=random_mask(model, 0.2, seed=5, names=[UP]), subspace={DOWN: basis}))
    randomize(pm, "default", seed=1), randomize(pm, "b", seed=2)
    pm.add_weighted_adapter(["default", "b"], [0.7, -1.5], "mix")
    for layer in layers(pm).values():
        want = torch.zeros(layer.out_features, layer.in_features)
        for adapter, w in (("default", 0.7), ("b", -1.5)):
            if adapter in layer.sparse_opd_values or adapter in layer.sparse_opd_coeff:
                want += w * layer.get_delta_weight(adapter)
        torch.testing.assert_close(layer.get_delta_weight("mix"), want, rtol=0, atol=1e-6)
        union = torch.unique(torch.cat([layer.sparse_opd_indices[a].long() for a in ("default", "b")
                                        if a in layer.sparse_opd_indices]))  # fmt: skip
        assert torch.equal(layer.sparse_opd_indices["mix"].long(), union)
    assert pm.peft_config["mix"].mask_metadata["combined_from"] == ["default", "b"]
    for bad, match in (
        ({"combination_type": "svd"}, "combination_type='svd' is not supported"),
        ({"weights": [1.0]}, "2 adapters but 1 weights"),
        ({"adapters": ["default", "nope"]}, "no adapter named 'nope'"),
        ({"weights": [1.0, float("nan")]}, "finite numbers"),
        ({"adapter_name": "b"}, "'b' already exists"),
    ):
        kwargs = {"adapters": ["default", "b"], "weights": [1.0, 1.0], "adapter_name": "new", **bad}
        with pytest.raises(ValueError, match=re.escape(match)):
            pm.add_weighted_adapter(**kwargs)
    assert "new" not in pm.peft_config


def test_base_layer_hooks_are_warned_about_once(ids):
    model = make_model()
    seen = []
    model.get_submodule(UP).register_forward_hook(lambda *a: seen.append(1))
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1, names=[UP])))
    with pytest.warns(UserWarning, match=rf"module '{re.escape(UP)}': its base layer has forward / backward"):
        pm(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm(ids)  # once per layer
    assert not seen  # the hook does not run: that is what the warning says


# ---------------------------------------------------------------------------------------------------- merge safety
@pytest.mark.parametrize("safe_merge", [False, True])
def test_a_float16_overflow_merge_is_refused_and_writes_nothing(safe_merge, ids):
    model = make_model(dtype=torch.float16)
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1, names=[UP])))
    layer = layers(pm)[UP]
    with torch.no_grad():
        layer.sparse_opd_values["default"].fill_(7e4)  # |W + ΔW| > 65504, the largest float16
    before = {k: v.clone() for k, v in pm.get_base_model().state_dict().items()}
    for merge in (lambda: pm.merge_and_unload(safe_merge=safe_merge), lambda: pm.merge_adapter(safe_merge=safe_merge)):
        with pytest.raises(
            ValueError, match=rf"module '{re.escape(UP)}' would write \d+ non-finite .*overflows torch.float16.*float32"
        ):
            merge()
        after = pm.get_base_model().state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        assert not layer.merged


def test_a_nan_adapter_merge_is_refused():
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1, names=[UP, DOWN])))
    with torch.no_grad():
        layers(pm)[DOWN].sparse_opd_values["default"][3] = float("nan")
    weight = model.get_submodule(UP).base_layer.weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=rf"module '{re.escape(DOWN)}' would write 1 non-finite weight entry: the adapter's values are NaN",
    ):
        pm.merge_and_unload()
    assert torch.equal(model.get_submodule(UP).base_layer.weight, weight)  # checked before any layer merges


def test_a_mask_on_a_tied_lm_head_is_refused():
    tied = make_model(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    mask = {"lm_head": torch.rand(32, 32, generator=torch.Generator().manual_seed(0)) < 0.2}
    with pytest.raises(
        ValueError, match=r"'lm_head' shares its weight with 'model\.embed_tokens'.*tie_word_embeddings"
    ):
        get_peft_model(tied, SparseOPDConfig(mask=mask))
    assert not any(isinstance(m, SparseOPDLayer) for m in tied.modules())
    untied = make_model()
    pm = get_peft_model(untied, SparseOPDConfig(mask=mask, init_weights=False))
    embed = untied.model.embed_tokens.weight.detach().clone()
    pm.merge_and_unload()
    assert torch.equal(untied.model.embed_tokens.weight, embed)


# ---------------------------------------------------------------------------------------------------- pickle
def test_pickle_saves_are_refused(tmp_path):
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1)))
    with pytest.raises(ValueError, match="adapter_model.bin, written with safe_serialization=False.*safetensors only"):
        pm.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle" / "adapter_config.json").exists()
    pm.save_pretrained(tmp_path / "ok")
    torch.save({}, tmp_path / "ok" / "adapter_model.bin")
    (tmp_path / "ok" / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter weights are a pickle file"):
        PeftModel.from_pretrained(make_model(), tmp_path / "ok")


def test_lora_is_untouched_by_the_package(tmp_path):
    lora = get_peft_model(make_model(), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path, safe_serialization=False)  # other methods keep peft's pickle option
    assert (tmp_path / "adapter_model.bin").is_file() and (tmp_path / "adapter_config.json").is_file()
