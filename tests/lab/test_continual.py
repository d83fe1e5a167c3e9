"""Continual post-training helpers (sparse_opd_peft.masks churn / overlap, sparse_opd_peft.lab.continual) and the benchmark script,
on tiny models."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import block_linears, make_model, random_mask
from peft import get_peft_model

from sparse_opd_peft import SparseMask, SparseOPDConfig
from sparse_opd_peft.lab.continual import run_stage
from sparse_opd_peft.masks import (
    bf16_churn,
    budgeted_topk_mask,
    changed_coordinates,
    mask_from_checkpoints,
    mask_overlap,
    merged_copy,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- churn


def test_bf16_churn_known_tensors():
    ref = {"a": torch.tensor([[1.0, 1.0, 1.0, -2.0]]), "b": torch.tensor([[0.0, 0.5]])}
    new = {
        # 1 + 1e-4 rounds back to 1 in bf16 (ULP 2^-7): unchanged; 1 + 1e-2: changed; equal; -2 -> -2.5: changed
        "a": torch.tensor([[1.0 + 1e-4, 1.0 + 1e-2, 1.0, -2.5]]),
        # 0 -> 1e-30 is a different bf16 value; 0.5 unchanged
        "b": torch.tensor([[1e-30, 0.5]]),
    }
    out = bf16_churn(ref, new)
    assert (out["changed"], out["total"]) == (3, 6) and out["share"] == 0.5
    assert out["modules"]["a"] == {"changed": 2, "total": 4, "share": 0.5}
    assert out["modules"]["b"] == {"changed": 1, "total": 2, "share": 0.5}


def test_bf16_churn_of_models_and_adapters():
    anchor = make_model()
    names = block_linears(anchor)
    total = sum(dict(anchor.named_modules())[n].weight.numel() for n in names)
    edited = copy.deepcopy(anchor)
    w = dict(edited.named_modules())[names[0]].weight
    with torch.no_grad():
        w[0, :3] += 1.0  # 3 visible changes
        w[1, 0] += w[1, 0].abs() * 1e-5  # far below a bf16 ULP: invisible
        edited.model.embed_tokens.weight[0, 0] += 1.0  # not a block Linear
    out = bf16_churn(anchor, edited)
    assert out["changed"] == 3 and out["total"] == total
    assert bf16_churn(anchor, edited, "all")["changed"] == 4
    # a peft model is measured on its merged weights: a 2-coordinate adapter with visible values churns 2 entries
    mask = {names[1]: torch.zeros(dict(anchor.named_modules())[names[1]].weight.shape, dtype=torch.bool)}
    mask[names[1]][0, 0] = mask[names[1]][2, 3] = True
    pm = get_peft_model(copy.deepcopy(anchor), SparseOPDConfig(mask=mask))
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "sparse_opd_values" in n).fill_(0.5)
    assert bf16_churn(anchor, pm)["changed"] == 2
    assert changed_coordinates(anchor, pm).indices(names[1]).tolist() == [0, 2 * 32 + 3]
    assert changed_coordinates(anchor, copy.deepcopy(anchor)) is None


# ---------------------------------------------------------------- overlap


def test_mask_overlap_and_random_expectation():
    a = {"m": torch.tensor([[True, True, False, False], [False, False, False, False]]),  # 2 of 8
         "only_a": torch.tensor([[True, False]])}  # fmt: skip
    b = {"m": torch.tensor([[True, False, True, True], [False, False, False, False]])}  # 3 of 8
    out = mask_overlap(a, b)
    assert (out["nnz_a"], out["nnz_b"], out["intersection"]) == (3, 3, 1)
    assert out["iou"] == pytest.approx(1 / 5) and out["share_of_a"] == pytest.approx(1 / 3)
    assert out["share_of_b"] == pytest.approx(1 / 3)
    # E|A∩B| = 2·3/8 in "m" (+0 for the module only A has); expected IoU = E / (3 + 3 - E)
    assert out["random_intersection"] == pytest.approx(0.75)
    assert out["random_iou"] == pytest.approx(0.75 / 5.25)
    assert out["random_share_of_a"] == pytest.approx(0.25) and out["random_share_of_b"] == pytest.approx(0.25)
    same = mask_overlap(SparseMask(b), b)
    assert same["iou"] == 1.0 and same["random_share_of_a"] == pytest.approx(3 / 8)


# ---------------------------------------------------------------- churn budget


def _perturbed(model, seed: int, scale: float = 1e-2):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in block_linears(out):
            w = dict(out.named_modules())[n].weight
            w += scale * torch.randn(w.shape, generator=g)
    return out


def test_budgeted_topk_matches_topk_and_respects_budget():
    anchor = make_model()
    tuned = _perturbed(anchor, 1)
    plain = mask_from_checkpoints(anchor, tuned, rule="topk", density=0.2)
    ours = budgeted_topk_mask(anchor, tuned, 0.2)
    assert ours.nnz() == plain.nnz() and mask_overlap(ours, plain)["iou"] == 1.0  # no budget = the library's top-k
    prev = budgeted_topk_mask(anchor, _perturbed(anchor, 2), 0.2)
    assert mask_overlap(plain, prev)["intersection"] > 0
    disjoint = budgeted_topk_mask(anchor, tuned, 0.2, prev, reuse_share=0.0)
    assert disjoint.nnz() == plain.nnz() and mask_overlap(disjoint, prev)["intersection"] == 0
    assert disjoint.metadata["reused"] == 0
    capped = budgeted_topk_mask(anchor, tuned, 0.2, prev, reuse_share=0.05)
    allowed = int(0.05 * prev.nnz())
    assert capped.nnz() == plain.nnz() and mask_overlap(capped, prev)["intersection"] == allowed
    loose = budgeted_topk_mask(anchor, tuned, 0.2, prev, reuse_share=1.0)
    assert mask_overlap(loose, plain)["iou"] == 1.0
    with pytest.raises(ValueError, match="churn budget cannot be met"):
        budgeted_topk_mask(anchor, tuned, 0.9, prev, reuse_share=0.0)


def test_exclude_makes_stage2_disjoint_and_changes_avoid_stage1():
    anchor = make_model()
    mask1 = SparseMask(random_mask(anchor, density=0.3, seed=1))
    mask2 = SparseMask(random_mask(anchor, density=0.3, seed=2))  # overlaps mask1 by chance
    assert mask_overlap(mask1, mask2)["intersection"] > 0
    stage1 = get_peft_model(copy.deepcopy(anchor), SparseOPDConfig(mask=mask1), adapter_name="t1")
    with torch.no_grad():
        for n, p in stage1.named_parameters():
            if "sparse_opd_values" in n:
                p.copy_(torch.randn(p.shape) * 0.1)
    merged1 = stage1.merge_and_unload()
    stage2 = get_peft_model(copy.deepcopy(merged1), SparseOPDConfig(mask=mask2, exclude=mask1), adapter_name="t2")
    injected = {}
    for name, module in stage2.base_model.model.named_modules():
        if hasattr(module, "sparse_opd_indices") and "t2" in module.sparse_opd_indices:
            injected[name] = (module.weight.shape, module.sparse_opd_indices["t2"].long())
    injected = SparseMask.from_indices(injected)
    assert mask_overlap(injected, mask1)["intersection"] == 0
    assert injected.nnz() == (mask2 - mask1).nnz()
    # train stage 2 a few steps: every changed entry is a stage-2 coordinate, none a stage-1 one
    opt = torch.optim.AdamW([p for p in stage2.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        stage2(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    merged2 = stage2.merge_and_unload()
    w1, w2 = dict(merged1.named_modules()), dict(merged2.named_modules())
    changed = SparseMask({n: w1[n].weight != w2[n].weight for n in injected if (w1[n].weight != w2[n].weight).any()})
    assert changed.nnz() > 0
    assert mask_overlap(changed, mask1)["intersection"] == 0
    assert mask_overlap(changed, injected)["share_of_a"] == 1.0


# ---------------------------------------------------------------- stages and the script, end to end


@pytest.fixture
def tiny_world(tiny_toy_world):
    """The session's tiny toy world (built once, in ``conftest.tiny_toy_cache``)."""
    return tiny_toy_world


@pytest.mark.parametrize("method", ["sparse", "lora"])
def test_run_stage_two_stages_both_modes(tiny_world, method, tmp_path):
    """Two stages through run_stage in both modes: separate keeps 2 adapters (stage 1 frozen and unchanged),
    merged keeps none; saved adapters reload: separate ones both onto the anchor, a merged-mode stage-2 adapter
    only onto the merged stage-1 model (the fingerprint refuses the anchor)."""
    from peft import PeftModel

    from sparse_opd_peft.lab.continual import adapter_names, lora_rank_for
    from sparse_opd_peft.lab.toy import ToyRunConfig
    from sparse_opd_peft.masks import block_linear_names

    cfg = ToyRunConfig(task="add").with_(steps=2, batch_size=8, warmup_steps=0, lr=1e-2, progress_bar=False)
    anchor = tiny_world.load_student()
    targets = block_linear_names(anchor)
    mask1 = SparseMask(random_mask(anchor, 0.2, seed=1, names=targets))
    mask2 = SparseMask(random_mask(anchor, 0.2, seed=2, names=targets))
    kw = dict(lora_rank=lora_rank_for(anchor, targets, mask1.nnz()), target_modules=targets)
    for mode in ("separate", "merged"):
        s1 = run_stage(tiny_world.load_student(), tiny_world, cfg, method, mode=mode, adapter_name="add",
                       mask=mask1, save_dir=tmp_path / f"{mode}1", **kw)  # fmt: skip
        frozen = {n: p.detach().clone() for n, p in s1.trained.named_parameters() if ".add" in n}
        before = merged_copy(s1.model)  # s1.model is consumed by stage 2 (adapters are added in place)
        s2 = run_stage(s1.model, tiny_world, cfg.with_(task="sub"), method, mode=mode, adapter_name="sub",
                       mask=mask2, exclude=mask1, save_dir=tmp_path / f"{mode}2", **kw)  # fmt: skip
        assert s2.stage_bytes > 0 and s2.trainable > 0
        if mode == "separate":
            assert adapter_names(s2.model) == ["add", "sub"]
            assert s2.model.base_model.active_adapters == ["add", "sub"]
            after = dict(s2.model.named_parameters())
            assert all(torch.equal(after[n], v) for n, v in frozen.items())
            assert not any(p.requires_grad for n, p in s2.model.named_parameters() if ".add" in n)
        else:
            assert adapter_names(s2.model) == []
        if method == "sparse":
            churn = bf16_churn(anchor, s2.model)
            assert churn["changed"] <= mask1.nnz() + (mask2 - mask1).nnz()
            changed = changed_coordinates(before, s2.model)
            assert changed is not None and mask_overlap(changed, mask1)["intersection"] == 0  # exclude holds
        ids = torch.randint(3, 20, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = s2.model(input_ids=ids).logits
        if mode == "separate":
            reloaded = PeftModel.from_pretrained(tiny_world.load_student(), tmp_path / "separate1" / "add", "add")
            reloaded.load_adapter(tmp_path / "separate2" / "sub", "sub")
            reloaded.base_model.set_adapter(["add", "sub"])
        else:
            if method == "sparse":
                with pytest.raises(ValueError, match="base model mismatch"):
                    PeftModel.from_pretrained(tiny_world.load_student(), tmp_path / "merged2" / "sub", "sub")
            reloaded = PeftModel.from_pretrained(before, tmp_path / "merged2" / "sub", "sub")
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_continual", ROOT / "benchmarks" / "bench_continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_two_stages_end_to_end(tiny_world, tmp_path):
    bench = _load_script()
    argv = ["--tiny", "--cache-dir", str(tiny_world.path.parent), "--work-dir", str(tmp_path / "work"),
            "--steps", "2", "--probe-steps", "1", "--batch-size", "8", "--eval-samples", "8", "--quiet",
            "--reuse-shares", "0", "0.5", "--out", str(tmp_path / "continual.md")]  # fmt: skip
    summary = bench.run_benchmark(bench.parse_args(argv))
    rows = summary["rows"]
    expected = {"full", "lora_separate", "lora_merged"} | {
        f"sparse_{tag}_{mode}" for tag in ("own", "reuse0", "reuse50") for mode in ("separate", "merged")
    }
    assert set(rows) == expected
    run = summary["runs"]["0"]
    s1_mask = SparseMask.load(next((tmp_path / "work").glob("*/s0_probe_add/mask.safetensors")))
    student = tiny_world.load_student()
    total = sum(m.weight.numel() for n, m in student.named_modules() if n in set(block_linears(student)))
    for mode in ("separate", "merged"):
        r = run["s2"][f"sparse_reuse0_{mode}"]
        assert r["mask_overlap"]["intersection"] == 0 and r["reused"] == 0
        assert r["nnz"] == s1_mask.nnz()
        assert run["s2"][f"sparse_reuse50_{mode}"]["reused"] <= s1_mask.nnz() // 2
        # the two disjoint sparse adapters only touch their masks: churn <= 2 masks' worth of entries
        assert 0 < r["churn"] <= 2 * s1_mask.nnz() / total + 1e-9
    for row in rows.values():
        assert 0.0 <= row["churn_t2"] <= 1.0 and row["bytes_t1_t2"] > 0
        for acc in ("acc_add_t1", "acc_add_t2", "acc_sub_t2"):
            assert 0.0 <= row[acc] <= 1.0
    assert rows["sparse_reuse0_separate"]["churn_t2"] < rows["full"]["churn_t2"]
    text = (tmp_path / "continual.md").read_text()
    assert "| full OPD |" in text and "disjoint from stage 1" in text
    assert json.loads((tmp_path / "continual.json").read_text())["rows"].keys() == rows.keys()
    # cached: a second call recomputes nothing (every run's JSON is reused)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/*.json")}
    bench.run_benchmark(bench.parse_args(argv))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/*.json")} == before
