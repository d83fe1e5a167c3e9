"""Mask builders (checkpoint rules, global / per-module / FFN-share top-k, random and low-magnitude controls) and
early-subspace extraction."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft import SparseMask, SparseOPDConfig
from sparse_opd_peft.diagnostics import metrics
from sparse_opd_peft.masks import (
    load_subspace,
    low_magnitude,
    mask_from_checkpoints,
    mask_overlap,
    random_like,
    save_subspace,
    subspace_from_checkpoints,
)

CFG = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, head_dim=16)  # fmt: skip


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**CFG)).eval()


def linears(model) -> dict[str, torch.nn.Parameter]:
    return {n[: -len(".weight")]: p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(source dir, tuned dir, {module: ΔW float32}) with a dense random update of varied scale per entry."""
    root = tmp_path_factory.mktemp("pair")
    source, tuned = tiny_model(), tiny_model()
    tuned.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in linears(tuned).values():
            p.add_(torch.randn(p.shape, generator=g) * torch.rand(p.shape, generator=g) ** 4 * 0.01)
    source.save_pretrained(root / "source")
    tuned.save_pretrained(root / "tuned")
    deltas = {n: (linears(tuned)[n] - p).detach() for n, p in linears(source).items()}
    return root / "source", root / "tuned", deltas, source


def brute_topk(deltas: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    names = list(deltas)
    flat = torch.cat([deltas[n].abs().reshape(-1) for n in names])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, count).indices] = True
    out, start = {}, 0
    for n in names:
        size = deltas[n].numel()
        out[n] = keep[start : start + size].view(deltas[n].shape)
        start += size
    return out


def test_bf16_and_abs_threshold_rules(pair):
    src, tun, deltas, _ = pair
    vis = mask_from_checkpoints(src, tun)
    abs_m = mask_from_checkpoints(src, tun, rule="abs_threshold")
    for n in deltas:
        w0 = linears(pair[3])[n].detach()
        assert torch.equal(vis[n], metrics.bf16_visible_mask(w0, w0 + deltas[n]))
        assert torch.equal(abs_m[n], deltas[n].abs() >= 1e-5)
    assert vis.metadata["rule"] == "bf16_visible" and vis.metadata["source"] == str(src)
    assert 0 < vis.density() < 1


def test_global_topk_matches_brute_force(pair):
    src, tun, deltas, _ = pair
    total = sum(d.numel() for d in deltas.values())
    mask = mask_from_checkpoints(src, tun, "topk", density=0.07)
    ref = brute_topk(deltas, round(0.07 * total))
    assert mask.nnz() == round(0.07 * total)
    for n in ref:
        assert torch.equal(mask[n], ref[n]) if n in mask else not ref[n].any()
    assert mask.metadata["density"] == 0.07 and mask.metadata["achieved_density"] == pytest.approx(0.07, abs=1e-4)


def test_topk_ffn_share_and_per_module(pair):
    src, tun, deltas, _ = pair
    total = sum(d.numel() for d in deltas.values())
    mask = mask_from_checkpoints(src, tun, "topk", density=0.1, ffn_share=0.8)
    budget = round(0.1 * total)
    stats = mask.type_stats()
    assert stats["ffn"]["nnz"] == round(0.8 * budget) and mask.nnz() == budget
    ffn = {n: d for n, d in deltas.items() if ".mlp." in n}
    ref = brute_topk(ffn, round(0.8 * budget))
    assert all(torch.equal(mask[n], ref[n]) for n in ffn)
    per = mask_from_checkpoints(src, tun, "topk", density=0.25, per_module=True)
    for n, d in deltas.items():
        assert per.nnz(n) == round(0.25 * d.numel())
        assert float(d.abs()[per[n]].min()) >= float(d.abs()[~per[n]].max())


def test_mask_builder_errors(pair, tmp_path):
    src, tun, _, _ = pair
    with pytest.raises(ValueError, match="unknown mask rule"):
        mask_from_checkpoints(src, tun, "magic")
    with pytest.raises(ValueError, match="needs a density"):
        mask_from_checkpoints(src, tun, "topk")
    with pytest.raises(ValueError, match="apply to score rules"):
        mask_from_checkpoints(src, tun, "bf16_visible", density=0.1)
    with pytest.raises(ValueError, match="exclude each other"):
        mask_from_checkpoints(src, tun, "topk", density=0.1, ffn_share=0.5, per_module=True)
    with pytest.raises(ValueError, match="FFN modules have only"):
        mask_from_checkpoints(src, tun, "topk", density=0.9, ffn_share=1.0)
    with pytest.raises(ValueError, match="no coordinate differs"):
        mask_from_checkpoints(src, src)
    with pytest.raises(FileNotFoundError):
        mask_from_checkpoints(src, tmp_path / "missing")


def test_random_like_and_low_magnitude(pair, tmp_path):
    src, tun, deltas, source_model = pair
    mask = mask_from_checkpoints(src, tun, "topk", density=0.05)
    r1, r2, r3 = random_like(mask, seed=1), random_like(mask, seed=1), random_like(mask, seed=2)
    for n in mask:
        assert r1.nnz(n) == mask.nnz(n) and torch.equal(r1.indices(n), r2.indices(n))
    assert any(not torch.equal(r1.indices(n), r3.indices(n)) for n in mask)
    assert mask_overlap(r1, mask)["random_share_of_a"] == pytest.approx(r1.density(), rel=0.3)
    low = low_magnitude(src, 0.3)
    low_mem = low_magnitude(source_model, 0.3)
    for n, p in linears(source_model).items():
        ref = metrics.low_magnitude_mask(p.detach(), 0.3)
        assert torch.equal(low[n], ref) and torch.equal(low_mem[n], ref)
    low.save(tmp_path / "low.safetensors")
    loaded = SparseMask.load(tmp_path / "low.safetensors")
    assert loaded.metadata["rule"] == "low_magnitude" and all(torch.equal(loaded[n], low[n]) for n in low)


def test_subspace_recovers_planted_row_space(tmp_path):
    source, early = tiny_model(), tiny_model()
    early.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(0)
    planted = {}
    with torch.no_grad():
        for n, p in linears(early).items():
            basis = torch.linalg.qr(torch.randn(p.shape[1], 4, generator=g))[0]
            p.add_(torch.randn(p.shape[0], 4, generator=g) @ basis.T * 0.05)
            planted[n] = basis
    source.save_pretrained(tmp_path / "source")
    early.save_pretrained(tmp_path / "early")
    basis = subspace_from_checkpoints(tmp_path / "source", tmp_path / "early", rank=4)
    assert set(basis) == set(planted)
    for n, v in basis.items():
        assert v.dtype == torch.float32 and v.shape == (linears(source)[n].shape[1], 4)
        assert metrics.sim_k(v, planted[n], 4) == pytest.approx(1.0, abs=1e-5)
    path = save_subspace(basis, tmp_path / "basis.safetensors", {"rank": 4})
    loaded, meta = load_subspace(path, with_metadata=True)
    assert meta == {"rank": 4} and all(torch.equal(loaded[n], basis[n]) for n in basis)
    with pytest.raises(FileExistsError):
        save_subspace(basis, path, overwrite=False)
    with pytest.raises(ValueError, match="orthonormal"):
        save_subspace({"model.layers.0.mlp.up_proj": torch.ones(32, 2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="exceeds min"):
        subspace_from_checkpoints(tmp_path / "source", tmp_path / "early", rank=17)
    with pytest.raises(ValueError, match="early \\*trained\\* checkpoint"):
        subspace_from_checkpoints(tmp_path / "source", tmp_path / "source", rank=4)
    with pytest.raises(ValueError, match="not a sparse_opd_peft subspace"):
        load_subspace(tmp_path / "source" / "model.safetensors")


def test_builders_plug_into_adapter_config(pair, tmp_path):
    src, tun, _, _ = pair
    mask = mask_from_checkpoints(src, tun, "topk", density=0.05, modules=r"mlp\.")
    basis = subspace_from_checkpoints(src, tun, rank=4, modules=r"mlp\.")
    model = get_peft_model(tiny_model(), SparseOPDConfig(mask=mask, subspace=basis))
    ids = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, tiny_model()(ids).logits)  # zero-initialised adapter
    with pytest.raises(ValueError, match="PEFT-wrapped"):
        mask_from_checkpoints(tiny_model(), model)
    mask.save(tmp_path / "m.safetensors")
    save_subspace(basis, tmp_path / "b.safetensors")
    get_peft_model(tiny_model(), SparseOPDConfig(mask=str(tmp_path / "m.safetensors"),
                                                 subspace=str(tmp_path / "b.safetensors")))  # fmt: skip
