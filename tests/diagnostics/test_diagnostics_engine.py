"""Streaming engine, sources, aggregation, reports, and the end-to-end check on planted updates."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft.diagnostics import diagnose, metrics, trajectory, write_report, write_trajectory_report
from sparse_opd_peft.diagnostics.sources import SafetensorsSource, open_source, select_weights
from sparse_opd_peft.masks import mask_from_checkpoints

CFG = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, head_dim=16)  # fmt: skip
N_BLOCK_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down)


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**CFG)).eval()


def block_weights(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n and "norm" not in n}


def planted_models(source) -> tuple[Qwen3ForCausalLM, Qwen3ForCausalLM, dict[str, torch.Tensor]]:
    """(sparse-tuned, dense-tuned, planted bool masks): a sparse delta on 5 % of the coordinates, all inside the
    low-magnitude half of |W0|, and a dense delta along W0's top-4 singular directions."""
    sparse, dense = tiny_model(), tiny_model()
    sparse.load_state_dict(source.state_dict())
    dense.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(7)
    planted = {}
    with torch.no_grad():
        for (name, p_s), p_d in zip(block_weights(sparse).items(), block_weights(dense).values(), strict=True):
            w0 = p_s.detach().clone()
            low = metrics.low_magnitude_mask(w0, 0.5)
            pick = low & (torch.rand(w0.shape, generator=g) < 0.1)
            sign = torch.where(torch.rand(w0.shape, generator=g) < 0.5, -1.0, 1.0)
            p_s.add_(pick * sign * 0.005)
            planted[name[: -len(".weight")]] = pick
            u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
            p_d.add_((0.3 * (u[:, :4] * s[:4]) @ vh[:4]).float())
    return sparse, dense, planted


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    source = tiny_model()
    sparse, dense, planted = planted_models(source)
    for name, model in (("source", source), ("sparse", sparse), ("dense", dense)):
        model.save_pretrained(root / name)
    sparse.save_pretrained(root / "sparse_sharded", max_shard_size="20KB")
    return {"root": root, "source": root / "source", "sparse": root / "sparse", "dense": root / "dense",
            "sharded": root / "sparse_sharded", "planted": planted, "models": (source, sparse, dense)}  # fmt: skip


def test_identical_checkpoints(dirs):
    res = diagnose(dirs["source"], dirs["source"], progress=False)
    s = res.summary
    assert s["n_matrices"] == N_BLOCK_LINEARS
    assert s["bf16_sparsity"] == 1.0 and s["abs_sparsity"] == 1.0 and s["nss"] == 0.0
    assert s["principal_angle_deg"] == 0.0 and s["relative_norm"] == 0.0 and s["stable_rank"] == 0.0
    assert s["principal_overlap"] is None and s["ffn_energy_share"] is None  # undefined without an update


def test_end_to_end_ranking_and_exact_mask(dirs):
    kw = dict(progress=False, principal_rank=4)
    sp = diagnose(dirs["source"], dirs["sparse"], **kw).summary
    de = diagnose(dirs["source"], dirs["dense"], **kw).summary
    assert sp["bf16_sparsity"] > 0.9 > 0.1 > de["bf16_sparsity"]
    assert sp["abs_sparsity"] > de["abs_sparsity"]
    assert sp["low_magnitude_overlap"] == 1.0  # planted on low-|W0| entries only
    assert de["low_magnitude_overlap"] < 0.6  # dense: nearly every entry visible, so about the random 0.5
    assert de["principal_overlap"] > 0.5 > sp["principal_overlap"]
    assert de["nss"] > 5 * sp["nss"] > 0
    assert de["stable_rank"] < 4.5 < sp["stable_rank"]  # rank-4 dense update vs scattered sparse one
    extracted = mask_from_checkpoints(dirs["source"], dirs["sparse"], rule="bf16_visible")
    planted = dirs["planted"]
    assert set(extracted) == set(planted)
    for name, dense_mask in planted.items():
        assert torch.equal(extracted[name], dense_mask), name


def test_sharded_in_memory_and_file_sources_agree(dirs):
    ref = diagnose(dirs["source"], dirs["sparse"], progress=False)
    assert len(list(dirs["sharded"].glob("*.safetensors"))) > 1
    sharded = diagnose(dirs["source"], dirs["sharded"], progress=False)
    source_model, sparse_model, _ = dirs["models"]
    memory = diagnose(source_model, sparse_model, progress=False)
    single_file = diagnose(dirs["source"] / "model.safetensors", dirs["sparse"] / "model.safetensors", progress=False)
    for other in (sharded, memory, single_file):
        for key in ("bf16_sparsity", "abs_sparsity", "relative_norm", "nss", "principal_angle_deg", "stable_rank"):
            assert other.summary[key] == pytest.approx(ref.summary[key], rel=1e-12, abs=1e-15), key


def test_hub_id_from_offline_cache(dirs, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-source"
    shutil.copytree(dirs["source"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = diagnose("tiny-org/tiny-source", dirs["sparse"], progress=False)
    assert res.source == "tiny-org/tiny-source" and res.summary["n_matrices"] == N_BLOCK_LINEARS
    with pytest.raises(FileNotFoundError, match="tiny-org/missing"):
        diagnose("tiny-org/missing", dirs["sparse"], progress=False)


def test_aggregation_rules(dirs):
    res = diagnose(dirs["source"], dirs["dense"], progress=False)
    rows = res.matrices
    numel = sum(r["numel"] for r in rows)
    assert res.summary["bf16_sparsity"] == pytest.approx(1 - sum(r["bf16_changed"] for r in rows) / numel)
    assert res.summary["nss"] == pytest.approx(sum(r["nss"] for r in rows) / len(rows))  # per-matrix mean
    assert res.summary["relative_norm"] == pytest.approx(sum(r["relative_norm"] for r in rows) / len(rows))
    shares = [res.summary[f"{t}_energy_share"] for t in ("ffn", "attention", "other")]
    assert sum(shares) == pytest.approx(1.0)
    ffn = [r for r in rows if r["type"] == "ffn"]
    assert res.by_type["ffn"]["n_matrices"] == len(ffn) == 6
    assert res.by_type["ffn"]["bf16_sparsity"] == pytest.approx(
        1 - sum(r["bf16_changed"] for r in ffn) / sum(r["numel"] for r in ffn)
    )
    assert set(res.by_layer) == {"0", "1"} and res.by_layer["0"]["n_matrices"] == 7
    assert set(res.by_layer["1"]["bf16_sparsity_by_type"]) == {"ffn", "attention"}
    assert len(res.angle_profile["u_deg"]) == 16  # indices shared by all matrices (min(out, in) = 16)


def test_module_selection_and_errors(dirs, tmp_path):
    with open_source(dirs["source"]) as src:
        names = select_weights(src)
        assert len(names) == N_BLOCK_LINEARS and not any("norm" in n or "embed" in n for n in names)
        assert len(select_weights(src, r"mlp\.")) == 6
        assert select_weights(src, ["model.layers.0.mlp.up_proj"]) == ["model.layers.0.mlp.up_proj.weight"]
        with pytest.raises(ValueError, match="no module 'model.layers.9.mlp.up_proj'"):
            select_weights(src, ["model.layers.9.mlp.up_proj"])
    res = diagnose(dirs["source"], dirs["dense"], modules=r"layers\.1\..*proj", progress=False, spectral=False)
    assert res.summary["n_matrices"] == 7 and res.summary["nss"] is None
    other = tiny_model()
    other.model.layers = other.model.layers[:1]
    with pytest.raises(ValueError, match="different architectures"):
        diagnose(dirs["source"], other, progress=False)
    wide = Qwen3ForCausalLM(Qwen3Config(**(CFG | {"intermediate_size": 48})))
    with pytest.raises(ValueError, match="has shape"):
        diagnose(dirs["source"], wide, progress=False)
    with pytest.raises(FileNotFoundError, match="no such file"):
        diagnose(tmp_path / "nowhere", dirs["source"], progress=False)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        diagnose(tmp_path, dirs["source"], progress=False)


def test_non_finite_weights_name_the_file(dirs, tmp_path):
    src = SafetensorsSource(dirs["sparse"] / "model.safetensors")
    tensors = {n: src.get(n).clone() for n in src.names()}
    tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.mlp\.down_proj\.weight'.*NaN"):
        diagnose(dirs["source"], tmp_path, progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        diagnose(dirs["source"], tmp_path / "bad", progress=False)


def test_trajectory(dirs):
    source, _, dense = dirs["models"]
    half = tiny_model()
    half.load_state_dict(source.state_dict())
    with torch.no_grad():
        for (p_h, p_0), p_d in zip(zip(block_weights(half).values(), block_weights(source).values(), strict=True),
                                   block_weights(dense).values(), strict=True):  # fmt: skip
            p_h.copy_(p_0 + 0.5 * (p_d - p_0))
    # the dense update has rank 4, so Sim_K is taken with K = 4 (beyond the rank, directions are rounding noise)
    res = trajectory(dirs["source"], [half, dirs["dense"]], labels=["half", "end"], k=4, progress=False)
    first, last = res.steps
    assert first["sim_k"] == pytest.approx(1.0) and last["sim_k"] == pytest.approx(1.0)
    assert first["fro_norm"] == pytest.approx(0.5 * last["fro_norm"], rel=1e-5)
    assert first["stable_rank"] == pytest.approx(last["stable_rank"], rel=1e-4)
    assert len(res.matrices) == 2 * N_BLOCK_LINEARS
    mixed = trajectory(dirs["source"], [dirs["sparse"], dirs["dense"]], k=4, progress=False)
    assert mixed.steps[0]["sim_k"] < 0.9 and mixed.steps[1]["sim_k"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels"):
        trajectory(dirs["source"], [dirs["dense"]], labels=["a", "b"], progress=False)


def test_reports(dirs, tmp_path):
    res = diagnose(dirs["source"], dirs["sparse"], progress=False)
    written = write_report(res, tmp_path / "out")
    assert set(written) == {"report.json", "report.md", "sparsity_by_layer.png", "principal_angles.png",
                            "mask_overlap.png", "energy_by_type.png"}  # fmt: skip
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    keys = {
        "bf16_sparsity",
        "abs_sparsity",
        "relative_norm",
        "nss",
        "principal_angle_deg",
        "principal_overlap",
        "low_magnitude_overlap",
        "stable_rank",
        "top16_energy_share",
        "ffn_energy_share",
        "attention_energy_share",
    }
    assert keys <= set(data["summary"]) and {"by_type", "by_layer", "matrices"} <= set(data)
    assert len(data["matrices"]) == N_BLOCK_LINEARS
    assert all(isinstance(v, (int, float)) for k, v in data["summary"].items() if k in keys)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| sparse | " in md and "sparsity_bf16" in md
    for f in written.values():
        assert f.stat().st_size > 0
    assert (tmp_path / "out" / "sparsity_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_report(res, tmp_path / "out")
    write_report(res, tmp_path / "out", overwrite=True)
    tr = trajectory(dirs["source"], [dirs["sparse"], dirs["dense"]], progress=False)
    files = write_trajectory_report(tr, tmp_path / "out")
    assert all(f.exists() for f in files.values())
    assert math.isfinite(json.loads(files["trajectory.json"].read_text())["steps"][1]["sim_k"])


def test_a_metric_declared_once_in_the_catalog_reaches_rows_summaries_reports_and_the_card(dirs, monkeypatch):
    """Adding a metric is one ``Metric`` entry in ``diagnostics.catalog``: with ``compute`` it lands in every
    per-matrix row, its mean in the summary / by-type / by-layer aggregates, its column in the report tables it is
    ``shown`` in, and its value in the model card's diagnostics; a trajectory metric likewise in ``trajectory``."""
    from sparse_opd_peft.diagnostics import catalog, markdown_summary, table1_line
    from sparse_opd_peft.diagnostics.report import table1_header, trajectory_markdown
    from sparse_opd_peft.model_card import _diagnostics_summary

    new = catalog.Metric("max_abs_delta", "max abs ΔW", False, "mean", ("table1", "by_type", "card"),
                         "largest |ΔW| entry", compute=lambda v: float(v.delta.abs().max()))  # fmt: skip
    monkeypatch.setattr(catalog, "METRICS", (*catalog.METRICS, new))
    monkeypatch.setattr(catalog, "TRAJECTORY_METRICS", (*catalog.TRAJECTORY_METRICS, catalog.TrajectoryMetric(
        "sigma_max", "σ₁", compute=lambda s, shape, hill_k: float(s[0]) if s.numel() else 0.0)))  # fmt: skip
    source, sparse, _ = dirs["models"]
    res = diagnose(dirs["source"], dirs["sparse"], progress=False).to_dict()
    w0, w1 = dict(source.named_parameters()), dict(sparse.named_parameters())
    for row in res["matrices"]:
        name = row["name"] + ".weight"
        assert row["max_abs_delta"] == pytest.approx(float((w1[name].double() - w0[name].double()).abs().max()))
    mean = sum(r["max_abs_delta"] for r in res["matrices"]) / len(res["matrices"])
    assert res["summary"]["max_abs_delta"] == pytest.approx(mean)
    assert all("max_abs_delta" in v for v in [*res["by_type"].values(), *res["by_layer"].values()])
    assert table1_header().splitlines()[0].endswith("| FFN energy | max abs ΔW |")
    assert table1_line(res).endswith(f" | {mean:.3g} |")
    assert "| energy share | max abs ΔW |" in markdown_summary({**res, "seconds": 0.0})
    assert _diagnostics_summary(res)["max_abs_delta"] == pytest.approx(mean)
    assert catalog.card_keys()[-1] == "max_abs_delta" and "max_abs_delta" in catalog.mean_keys()
    tr = trajectory(dirs["source"], [dirs["sparse"], dirs["dense"]], progress=False).to_dict()
    assert all(s["sigma_max"] > 0 for s in tr["steps"]) and "| σ₁ |" in trajectory_markdown(tr)


def test_the_catalog_refuses_a_malformed_metric():
    from sparse_opd_peft.diagnostics.catalog import Metric

    with pytest.raises(ValueError, match="unknown places"):
        Metric("x", "x", shown=("table2",))
    with pytest.raises(ValueError, match="aggregate='mean'"):
        Metric("x", "x", aggregate="weighted", compute=lambda v: 0.0)
