"""The SPARSE_OPD method through peft's public API on a tiny Qwen3."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model, random_mask
from peft import PeftModel, get_peft_model
from peft.utils import PeftType

from sparse_opd_peft import SparseMask, SparseOPDConfig
from sparse_opd_peft.tuner.layer import SparseOPDLayer


def train_steps(model, ids, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


def test_registration_is_idempotent_and_works_in_a_fresh_process():
    import importlib

    import sparse_opd_peft.tuner.registration as reg

    importlib.reload(reg)
    reg.register()
    reg.register()
    assert PeftType.SPARSE_OPD == "SPARSE_OPD"
    assert list(PeftType).count(PeftType.SPARSE_OPD) == 1
    code = (
        "import sparse_opd_peft, sparse_opd_peft; from peft.utils import PeftType; print(PeftType('SPARSE_OPD').value)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("SPARSE_OPD")


def test_wrapped_model_starts_identical_and_counts_exactly_the_mask(model, mask, ids, capsys):
    ref = model(ids).logits
    nnz = sum(int(m.sum()) for m in mask.values())
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask))
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == nnz
    peft_model.print_trainable_parameters()
    assert f"trainable params: {nnz:,}" in capsys.readouterr().out
    assert torch.equal(peft_model(ids).logits, ref)
    names = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert names and all(".sparse_opd_values." in n for n in names)


def test_mask_forms_dict_sparsemask_and_path_agree(model, mask, tmp_path):
    path = SparseMask(mask).save(tmp_path / "mask.safetensors")
    counts = []
    for form in (mask, SparseMask(mask), str(path)):
        m = get_peft_model(make_model(), SparseOPDConfig(mask=form))
        counts.append(m.get_nb_trainable_parameters()[0])
    assert counts[0] == counts[1] == counts[2] == sum(int(v.sum()) for v in mask.values())


def test_target_modules_narrows_the_mask(model, mask):
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask, target_modules=["up_proj", "down_proj"]))
    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, SparseOPDLayer)]
    assert wrapped and all(n.endswith(("up_proj", "down_proj")) for n in wrapped)
    expected = sum(int(v.sum()) for k, v in mask.items() if k.endswith(("up_proj", "down_proj")))
    assert peft_model.get_nb_trainable_parameters()[0] == expected


def test_training_moves_only_masked_coordinates(model, mask, ids):
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask))
    loss0 = peft_model(input_ids=ids, labels=ids).loss.item()
    loss = train_steps(peft_model, ids, steps=5)
    assert loss < loss0
    merged = peft_model.merge_and_unload()
    for name, m in mask.items():
        delta = merged.get_submodule(name).weight - base_state[name + ".weight"]
        assert (delta[~m] == 0).all()
        assert (delta[m] != 0).float().mean() > 0.9
    for key, value in merged.state_dict().items():
        if key.removesuffix(".weight") not in mask:
            assert torch.equal(value, base_state[key]), key


def test_save_and_reload_gives_identical_outputs(model, mask, ids, tmp_path):
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask))
    train_steps(peft_model, ids)
    out = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SPARSE_OPD" and cfg["mask"] is None
    assert cfg["module_nnz"] and cfg["fingerprint"] and 0 < cfg["density"] < 1
    reloaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(reloaded(ids).logits, out)
    assert not any(p.requires_grad for p in reloaded.parameters())
    trainable = PeftModel.from_pretrained(make_model(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == sum(int(m.sum()) for m in mask.values())


def test_two_adapters_add_set_disable(model, mask, ids):
    ref = model(ids).logits
    mask_b = random_mask(model, 0.2, seed=9)
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask, init_weights=False))
    out_a = peft_model(ids).logits
    peft_model.add_adapter("b", SparseOPDConfig(mask=mask_b, init_weights=False))
    peft_model.set_adapter("b")
    out_b = peft_model(ids).logits
    assert not torch.allclose(out_a, out_b)
    peft_model.set_adapter("default")
    assert torch.equal(peft_model(ids).logits, out_a)
    with peft_model.disable_adapter():
        assert torch.equal(peft_model(ids).logits, ref)
    assert torch.equal(peft_model(ids).logits, out_a)


def test_merge_unmerge_unload(model, mask, ids):
    ref = model(ids).logits
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask, init_weights=False))
    out = peft_model(ids).logits
    peft_model.merge_adapter()
    torch.testing.assert_close(peft_model(ids).logits, out, rtol=1e-5, atol=1e-6)
    peft_model.unmerge_adapter()
    assert torch.equal(peft_model(ids).logits, out)
    unloaded = peft_model.unload()
    assert not any(isinstance(m, SparseOPDLayer) for m in unloaded.modules())
    assert torch.equal(unloaded(ids).logits, ref)


def test_merge_and_unload_matches_adapter_output(model, mask, ids):
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask, init_weights=False))
    out = peft_model(ids).logits
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, out, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients(mask, ids):
    grads = []
    for checkpointing in (False, True):
        m = make_model()
        m.train()
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.enable_input_require_grads()
        pm = get_peft_model(m, SparseOPDConfig(mask=mask, init_weights=False))
        pm(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_subspace_only_and_with_mask(model, mask, ids):
    names = list(mask)[:3]
    g = torch.Generator().manual_seed(5)
    modules = dict(model.named_modules())
    basis = {n: torch.linalg.qr(torch.randn(modules[n].in_features, 4, generator=g))[0] for n in names}
    for cfg in (SparseOPDConfig(subspace=basis), SparseOPDConfig(mask=mask, subspace=basis)):
        m = make_model()
        pm = get_peft_model(m, cfg)
        expected = sum(modules[n].out_features * 4 for n in names)
        if pm.peft_config["default"].module_nnz:
            expected += sum(int(v.sum()) for v in mask.values())
        assert pm.get_nb_trainable_parameters()[0] == expected
        train_steps(pm, ids, steps=3)
        for n in names:
            layer = pm.get_submodule("base_model.model." + n)
            sub = layer.sparse_opd_coeff["default"].detach() @ layer.sparse_opd_basis["default"].t()
            assert sub.abs().sum() > 0
            # every subspace update lies in the row space of the basis: ΔW_sub (I - B Bᵀ) = 0
            proj = torch.eye(basis[n].shape[0]) - basis[n] @ basis[n].t()
            assert (sub @ proj).abs().max() < 1e-6


def test_transformers_trainer_trains_the_adapter(model, mask, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 32, (16, 9), generator=g).tolist()})
    data = data.map(lambda row: {"labels": row["input_ids"]})
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask))
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
    )
    Trainer(model=peft_model, args=args, train_dataset=data).train()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".sparse_opd_values." in n for n in changed)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_config_rejects_bad_options():
    with pytest.raises(ValueError, match="save_dtype"):
        SparseOPDConfig(mask={}, save_dtype="int8")
    with pytest.raises(ValueError, match="grad_path"):
        SparseOPDConfig(mask={}, grad_path="magic")


def test_low_cpu_mem_usage_load_and_load_adapter(model, mask, ids, tmp_path):
    peft_model = get_peft_model(model, SparseOPDConfig(mask=mask, init_weights=False))
    out = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(make_model(), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(reloaded(ids).logits, out)
    reloaded.load_adapter(tmp_path, adapter_name="again")
    reloaded.set_adapter("again")
    assert torch.equal(reloaded(ids).logits, out)
