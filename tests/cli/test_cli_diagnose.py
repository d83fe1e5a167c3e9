"""``sparse-opd diagnose / trajectory / mask / subspace``: outputs, help texts and one-line errors."""

from __future__ import annotations

import json
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config, Qwen3ForCausalLM
from typer.testing import CliRunner

from sparse_opd_peft import SparseMask
from sparse_opd_peft.cli import app
from sparse_opd_peft.masks import load_subspace, mask_from_checkpoints

CFG = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
           num_key_value_heads=1, head_dim=16)  # fmt: skip
runner = CliRunner()


def tiny_model(seed: int = 0, **overrides) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**(CFG | overrides))).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    source, tuned = tiny_model(), tiny_model()
    tuned.load_state_dict(source.state_dict())
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if p.dim() == 2 and ".layers." in n:
                g = torch.Generator().manual_seed(len(n))
                p.add_(torch.randn(p.shape, generator=g) * 1e-3 * (torch.rand(p.shape, generator=g) < 0.3))
    source.save_pretrained(root / "source")
    tuned.save_pretrained(root / "tuned")
    tiny_model(num_hidden_layers=1).save_pretrained(root / "one_layer")
    tiny_model(intermediate_size=48).save_pretrained(root / "narrow")
    tensors = load_file(str(root / "tuned" / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    (root / "broken").mkdir()
    save_file(tensors, str(root / "broken" / "model.safetensors"))
    return root


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_texts():
    top = run("--help")
    assert top.exit_code == 0
    for cmd in ("diagnose", "trajectory", "mask", "subspace"):
        assert cmd in top.stdout
        sub = run(cmd, "--help")
        assert sub.exit_code == 0 and "Example" in sub.stdout
    assert "--overwrite" in run("diagnose", "--help").stdout
    assert "--ffn-share" in run("mask", "--help").stdout


def test_console_script_entry_point():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "sparse-opd"]
    assert script.load() is app
    assert (Path(sys.executable).parent / "sparse-opd").exists()


def test_diagnose_writes_reports(ckpts, tmp_path):
    out = tmp_path / "diag"
    res = run("diagnose", ckpts / "source", ckpts / "tuned", "--out", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "| source | tuned |" in res.stdout
    files = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "sparsity_by_layer.png", "principal_angles.png", "mask_overlap.png",
            "energy_by_type.png"} <= files  # fmt: skip
    summary = json.loads((out / "report.json").read_text())["summary"]
    assert 0.5 < summary["bf16_sparsity"] < 0.9 and summary["n_matrices"] == 14
    narrowed = run("diagnose", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "ffn", "-m", r"mlp\.",
                   "--no-plots", "--quiet")  # fmt: skip
    assert narrowed.exit_code == 0, narrowed.output
    assert json.loads((tmp_path / "ffn" / "report.json").read_text())["summary"]["n_matrices"] == 6
    assert not (tmp_path / "ffn" / "principal_angles.png").exists()
    typed = run("diagnose", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "typed", "--module-type",
                r"self_attn\.o_proj=other", "--no-plots", "-q")  # fmt: skip
    assert typed.exit_code == 0, typed.output
    by_type = json.loads((tmp_path / "typed" / "report.json").read_text())["by_type"]
    assert by_type["other"]["n_matrices"] == 2 and by_type["attention"]["n_matrices"] == 6
    assert_one_line_error(run("diagnose", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "bad",
                              "--module-type", "mlp=mlp", "-q"), "REGEX=TYPE")  # fmt: skip

    before = (out / "report.json").stat().st_mtime_ns
    again = run("diagnose", ckpts / "source", ckpts / "tuned", "--out", out, "--quiet")
    assert_one_line_error(again, str(out / "report.json"), "--overwrite")
    assert (out / "report.json").stat().st_mtime_ns == before
    assert run("diagnose", ckpts / "source", ckpts / "tuned", "--out", out, "--overwrite", "-q").exit_code == 0


@pytest.mark.parametrize(
    "tuned, needles",
    [
        ("missing", ["missing", "no such file"]),
        ("one_layer", ["different architectures"]),
        ("narrow", ["has shape", "same architecture"]),
        ("broken", ["broken/model.safetensors", "model.layers.0.self_attn.q_proj.weight", "non-finite"]),
    ],
)
def test_diagnose_errors_write_nothing(ckpts, tmp_path, tuned, needles):
    out = tmp_path / "out"
    res = run("diagnose", ckpts / "source", ckpts / tuned, "--out", out, "--quiet")
    assert_one_line_error(res, *needles)
    assert not out.exists()


def test_diagnose_bad_options(ckpts, tmp_path):
    assert_one_line_error(run("diagnose", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "o", "-m", "(",
                              "-q"), "not a valid regular expression")  # fmt: skip
    assert_one_line_error(run("diagnose", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "o", "--alpha", "2",
                              "-q"), "alpha")  # fmt: skip
    if not torch.cuda.is_available():
        assert_one_line_error(run("diagnose", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "o",
                                  "--device", "cuda", "-q"), "CUDA is not available")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_trajectory_command(ckpts, tmp_path):
    res = run("trajectory", ckpts / "source", ckpts / "tuned", ckpts / "tuned", "--out", tmp_path / "t",
              "--label", "a", "--label", "b", "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"trajectory.json", "trajectory.md", "trajectory.png"}
    assert "a: stable rank" in res.stdout


def test_mask_command(ckpts, tmp_path):
    out = tmp_path / "opd.mask.safetensors"
    res = run("mask", ckpts / "source", ckpts / "tuned", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    saved = SparseMask.load(out)
    ref = mask_from_checkpoints(ckpts / "source", ckpts / "tuned")
    assert set(saved) == set(ref) and all(torch.equal(saved.indices(n), ref.indices(n)) for n in ref)
    assert saved.metadata["rule"] == "bf16_visible"
    top = run("mask", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "top.safetensors", "--rule", "topk",
              "--density", "0.05", "--ffn-share", "0.8", "-q")  # fmt: skip
    assert top.exit_code == 0, top.output
    top_mask = SparseMask.load(tmp_path / "top.safetensors")
    assert top_mask.type_stats()["ffn"]["share_of_nnz"] == pytest.approx(0.8, abs=1e-3)
    assert_one_line_error(run("mask", ckpts / "source", ckpts / "tuned", "--out", out, "-q"), str(out), "--overwrite")
    assert_one_line_error(run("mask", ckpts / "source", ckpts / "tuned", "--out", tmp_path / "x.safetensors",
                              "--rule", "topk", "-q"), "needs a density")  # fmt: skip
    assert_one_line_error(run("mask", ckpts / "source", ckpts / "source", "--out", tmp_path / "y.safetensors", "-q"),
                          "no coordinate differs")  # fmt: skip
    assert_one_line_error(run("mask", ckpts / "source", ckpts / "tuned", "--out", tmp_path, "-q"), "is a directory")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_subspace_command(ckpts, tmp_path):
    out = tmp_path / "basis.safetensors"
    res = run("subspace", ckpts / "source", ckpts / "tuned", "--rank", "8", "--out", out, "-q")
    assert res.exit_code == 0, res.output
    basis = load_subspace(out)
    assert len(basis) == 14 and basis["model.layers.0.mlp.down_proj"].shape == (64, 8)
    assert_one_line_error(run("subspace", ckpts / "source", ckpts / "tuned", "--rank", "99", "--out",
                              tmp_path / "b2.safetensors", "-q"), "lower --rank")  # fmt: skip
    assert_one_line_error(run("subspace", ckpts / "source", ckpts / "nowhere", "--out", tmp_path / "b3.safetensors",
                              "-q"), "nowhere")  # fmt: skip
    assert not (tmp_path / "b2.safetensors").exists()
