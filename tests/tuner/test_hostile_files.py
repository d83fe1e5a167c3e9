"""Hostile adapter files and inputs: each gets one clear ``ValueError`` / ``TypeError`` naming the file, module or field
and the fix, checked before anything is loaded, with the base model left unwrapped and every file untouched; the CLI
exits 2 with one ``error:`` line. One test per case (issue 12)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _positions_reference import elias_fano_stream, varint_stream
from conftest import make_model, random_mask
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sparse_opd_peft import SparseMask, SparseOPDConfig, save_adapter
from sparse_opd_peft.cli import app
from sparse_opd_peft.positions import CODEC_ELIAS_FANO, decode_positions
from sparse_opd_peft.tuner.layer import SparseOPDLayer

UP = "model.layers.0.mlp.up_proj"
KEY = f"base_model.model.{UP}"
runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A base model directory and a trained-looking adapter: 10 % masks on every block Linear plus a rank-2 subspace
    on up_proj (values / coeff random, so every tensor matters)."""
    root = tmp_path_factory.mktemp("hostile")
    base = make_model()
    base.save_pretrained(root / "base")
    basis, _ = torch.linalg.qr(torch.randn(32, 2, generator=torch.Generator().manual_seed(0)))
    config = SparseOPDConfig(mask=random_mask(base, 0.1), subspace={UP: basis}, init_weights=False)
    save_adapter(get_peft_model(make_model(), config), root / "adapter")
    return root


@pytest.fixture
def adapter(saved, tmp_path) -> Path:
    shutil.copytree(saved / "adapter", tmp_path / "adapter")
    return tmp_path / "adapter"


def edit_tensors(directory: Path, fn) -> None:
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(directory: Path, fn) -> None:
    path = directory / "adapter_config.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_unwrapped(base, state) -> None:
    """No adapter layer anywhere in the base (its transformers ``base_model`` included), weights unchanged."""
    assert not any(isinstance(m, SparseOPDLayer) for m in base.modules())
    assert not any(isinstance(m, SparseOPDLayer) for m in base.base_model.modules())
    assert not hasattr(base, "peft_config")
    assert base.state_dict().keys() == state.keys() and all(
        torch.equal(v, state[k]) for k, v in base.state_dict().items()
    )


def load_fails(directory: Path, exc, match: str, good: Path | None = None) -> None:
    """``PeftModel.from_pretrained`` refuses ``directory``: first with the config read from it (checked before the
    base is wrapped), then, when ``good`` is given, with the config of a good copy (the file is then only checked
    inside peft's load, after wrapping: the base must be unwrapped again)."""
    files = snapshot(directory)
    configs = [None] + ([SparseOPDConfig.from_pretrained(good)] if good is not None else [])
    for config in configs:
        base = make_model()
        state = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(exc, match=match):
            PeftModel.from_pretrained(base, directory, config=config)
        assert_unwrapped(base, state)
    assert snapshot(directory) == files


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_cli_error(result, *needles) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ foreign tensors
@pytest.mark.parametrize("key", [f"{KEY}.base_layer.weight", "base_model.model.model.embed_tokens.weight"])
def test_base_weights_in_the_adapter_file_are_refused(saved, adapter, key):
    shape = (64, 32) if "up_proj" in key else (32, 32)
    edit_tensors(adapter, lambda t: t.__setitem__(key, torch.full(shape, 7.0)))
    load_fails(adapter, ValueError, f"holds '{key}', which is not a tensor of this adapter.*never base-model weights",
               good=saved / "adapter")  # fmt: skip


def test_a_tensor_for_a_module_the_config_does_not_list(saved, adapter):
    edit_tensors(adapter, lambda t: t.__setitem__("base_model.model.lm_head.sparse_opd_values", torch.zeros(3)))
    load_fails(adapter, ValueError, "module 'lm_head', which adapter_config.json does not list", good=saved / "adapter")


def test_two_coordinate_tensors_for_one_module(saved, adapter):
    def both(t):  # up_proj's saved form (a coded stream under _indices) plus a bitmask beside it, or vice versa
        t[f"{KEY}.sparse_opd_indices"] = t.get(f"{KEY}.sparse_opd_indices", torch.arange(3, dtype=torch.int32))
        t[f"{KEY}.sparse_opd_bitmask"] = t.get(f"{KEY}.sparse_opd_bitmask", torch.zeros(2048 // 8, dtype=torch.uint8))

    edit_tensors(adapter, both)
    load_fails(adapter, ValueError, f"module '{UP}': holds both", good=saved / "adapter")


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_values_are_refused(saved, adapter, bad):
    edit_tensors(adapter, lambda t: t[f"{KEY}.sparse_opd_values"].__setitem__(0, bad))
    load_fails(adapter, ValueError, f"module '{UP}': sparse_opd_values holds 1 NaN / inf", good=saved / "adapter")


def test_non_finite_coeff_is_refused(saved, adapter):
    edit_tensors(adapter, lambda t: t[f"{KEY}.sparse_opd_coeff"].__setitem__((1, 1), float("nan")))
    load_fails(adapter, ValueError, "sparse_opd_coeff holds 1 NaN / inf", good=saved / "adapter")


def test_integer_values_are_refused_not_cast(saved, adapter):
    edit_tensors(adapter, lambda t: t.__setitem__(f"{KEY}.sparse_opd_values", t[f"{KEY}.sparse_opd_values"].int()))
    load_fails(
        adapter, ValueError, r"sparse_opd_values must be float32 of shape \[\d+\], got int32", good=saved / "adapter"
    )


def test_nan_basis_is_refused(saved, adapter):
    edit_tensors(adapter, lambda t: t[f"{KEY}.sparse_opd_basis"].__setitem__((0, 0), float("nan")))
    load_fails(adapter, ValueError, "sparse_opd_basis holds 1 NaN / inf", good=saved / "adapter")


def test_missing_basis_is_refused_not_zero_filled(saved, adapter):
    edit_tensors(adapter, lambda t: t.pop(f"{KEY}.sparse_opd_basis"))
    load_fails(adapter, ValueError, f"module '{UP}': no sparse_opd_basis .* rank 2.*incomplete", good=saved / "adapter")


@pytest.mark.parametrize(
    ("param", "shape", "match"),
    [
        ("sparse_opd_values", None, r"sparse_opd_values must be float32 of shape \[\d+\], got float32 \[1, \d+\]"),
        ("sparse_opd_coeff", (2, 64), r"sparse_opd_coeff must be float32 of shape \[64, 2\], got float32 \[2, 64\]"),
        ("sparse_opd_basis", (32, 3), r"sparse_opd_basis must be .* of shape \[32, 2\], got float32 \[32, 3\]"),
    ],
    ids=["values", "coeff", "basis"],
)
def test_wrong_shapes_are_refused_before_wrapping(saved, adapter, param, shape, match):
    def reshape(t):
        v = t[f"{KEY}.{param}"]
        t[f"{KEY}.{param}"] = v.reshape(1, -1).clone() if shape is None else torch.zeros(shape)

    edit_tensors(adapter, reshape)
    load_fails(adapter, ValueError, match, good=saved / "adapter")


# ------------------------------------------------------------------------------------------------ coded positions
def _swap_in_bucket(positions: list[int], low_bits: int) -> list[int]:
    """Swap the first two neighbours that share their Elias-Fano upper bits: the stream stays well-formed."""
    k = next(k for k in range(len(positions) - 1) if positions[k] >> low_bits == positions[k + 1] >> low_bits)
    return positions[:k] + [positions[k + 1], positions[k]] + positions[k + 2 :]


_U8 = torch.uint8
STREAM_CASES = {  # (p: the module's positions, L: its low-bit width, s: its saved stream) -> a hostile tensor
    "truncated": (lambda p, L, s: s[:-1], r"Elias-Fano payload is \d+ bytes, \d+ positions take \d+ \(truncated\)"),
    "trailing_bytes": (lambda p, L, s: torch.cat([s, torch.zeros(1, dtype=_U8)]), r"\(trailing bytes\)"),
    "header_only": (lambda p, L, s: s[:2], "2 bytes long, shorter than any header"),
    "unknown_codec": (lambda p, L, s: torch.cat([torch.tensor([9], dtype=_U8), s[1:]]), "unknown position codec 9"),
    "low_bits_too_wide": (lambda p, L, s: torch.cat([s[:1], torch.tensor([40], dtype=_U8), s[2:]]),
                          "low-bit width 40 is wider"),
    "padding_bit_set": (lambda p, L, s: torch.cat([s[:-1], s[-1:] | 1]), "padding bits set"),
    "header_count_lies": (lambda p, L, s: varint_stream(p, count=len(p) + 1), r"holds \d+ varints, its header says"),
    "count_differs_from_config": (lambda p, L, s: elias_fano_stream(p[:-1], 2048, L),
                                  r"\d+ coordinates but adapter_config.json says \d+"),
    "out_of_range": (lambda p, L, s: varint_stream(p[:-1] + [2048 + 5]), r"coordinate out of range \[0, 2048\)"),
    "gap_beyond_weight": (lambda p, L, s: varint_stream([3000]), r"gap of 3000 puts a coordinate out of range"),
    "overlong_varint": (lambda p, L, s: varint_stream([10**6]), "a varint is 3 bytes long, more than the 2"),
    "duplicate_varint": (lambda p, L, s: varint_stream(p[:1] + p[:-1]), "duplicate coordinates"),
    "duplicate_elias_fano": (lambda p, L, s: elias_fano_stream(p[:1] + p[:-1], 2048, L), "duplicate coordinates"),
    "unsorted_elias_fano": (lambda p, L, s: elias_fano_stream(_swap_in_bucket(p, L), 2048, L), "not sorted ascending"),
    "int16_indices": (lambda p, L, s: torch.tensor(p, dtype=torch.int16),
                      r"must be int32 / int64 \(positions\) or uint8 \(a coded stream"),
    "two_dimensional": (lambda p, L, s: s[: s.numel() // 2 * 2].reshape(2, -1), "must be 1-D uint8"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_hostile_coded_positions_are_refused(saved, adapter, case):
    """Format version 2: up_proj's 10 % mask is saved as an Elias-Fano stream; each damaged or lying stream is
    refused with a ValueError naming the file and the module, before the base is wrapped."""
    key = f"{KEY}.sparse_opd_indices"
    stream = load_file(saved / "adapter" / "adapter_model.safetensors")[key]
    assert stream.dtype == torch.uint8 and int(stream[0]) == CODEC_ELIAS_FANO
    positions, low_bits = decode_positions(stream, 64 * 32).tolist(), int(stream[1])
    edit, match = STREAM_CASES[case]
    edit_tensors(adapter, lambda t: t.__setitem__(key, edit(positions, low_bits, stream).contiguous()))
    load_fails(adapter, ValueError, f"adapter_model.safetensors module '{UP}': .*{match}", good=saved / "adapter")


@pytest.mark.parametrize("version", [0, -1, True])
def test_format_version_below_one_is_refused(adapter, version):
    edit_config(adapter, lambda c: c.__setitem__("format_version", version))
    load_fails(adapter, ValueError, r"field format_version must be an integer \(1 \.\. 2\)")


# ------------------------------------------------------------------------------------------------ bad configs
def test_module_shapes_entry_of_the_wrong_length(adapter):
    edit_config(adapter, lambda c: c["module_shapes"].__setitem__(UP, [64, 32, 1]))
    load_fails(adapter, ValueError, rf"adapter_config.json: field module_shapes\['{UP}'\] must be \[out_features")


def test_module_nnz_beyond_the_weight(adapter):
    edit_config(adapter, lambda c: c["module_nnz"].__setitem__(UP, 10**9))
    load_fails(adapter, ValueError, rf"field module_nnz\['{UP}'\] must be an integer in \[0, 2048\]")


def test_cli_non_json_config(saved, adapter, tmp_path):
    (adapter / "adapter_config.json").write_bytes(b"\xff\x00 not json")
    assert_cli_error(run("inspect", adapter), "adapter_config.json: not valid JSON", "re-save the adapter")
    assert_cli_error(run("merge", saved / "base", adapter, "--out", tmp_path / "m"), "not valid JSON")
    assert not (tmp_path / "m").exists()


def test_cli_format_version_not_an_integer(saved, adapter, tmp_path):
    edit_config(adapter, lambda c: c.__setitem__("format_version", "abc"))
    assert_cli_error(run("inspect", adapter), "field format_version must be an integer", "'abc'")
    assert_cli_error(run("merge", saved / "base", adapter, "--out", tmp_path / "m"), "format_version")


def test_cli_module_shapes_of_the_wrong_length(saved, adapter, tmp_path):
    edit_config(adapter, lambda c: c["module_shapes"].__setitem__(UP, [64]))
    assert_cli_error(run("merge", saved / "base", adapter, "--out", tmp_path / "m"), f"module_shapes['{UP}']")


def test_cli_unknown_peft_type(saved, adapter, tmp_path):
    edit_config(adapter, lambda c: c.__setitem__("peft_type", "NOT_A_METHOD"))
    assert_cli_error(run("merge", saved / "base", adapter, "--out", tmp_path / "m"), "unknown peft_type 'NOT_A_METHOD'")
    assert_cli_error(run("inspect", adapter), "unknown peft_type")


def test_cli_merge_refuses_nan_values_and_writes_nothing(saved, adapter, tmp_path):
    edit_tensors(adapter, lambda t: t[f"{KEY}.sparse_opd_values"].__setitem__(0, float("nan")))
    assert_cli_error(run("merge", saved / "base", adapter, "--out", tmp_path / "m"), "NaN / inf", UP)
    assert not (tmp_path / "m").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ load_adapter
def test_load_adapter_under_a_name_in_use(saved, tmp_path):
    model = PeftModel.from_pretrained(make_model(), saved / "adapter")
    other = make_model()
    save_adapter(get_peft_model(other, SparseOPDConfig(mask=random_mask(other, 0.2, seed=9))), tmp_path / "other")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="adapter name 'default' is already in use.*adapter_name='other'"):
        model.load_adapter(tmp_path / "other", adapter_name="default")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_load_adapter_of_a_bad_file_under_a_new_name_leaves_the_model_as_it_was(saved, adapter):
    model = PeftModel.from_pretrained(make_model(), saved / "adapter")
    modules = {n: type(m) for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit_tensors(adapter, lambda t: t[f"{KEY}.sparse_opd_values"].__setitem__(0, float("nan")))
    good = SparseOPDConfig.from_pretrained(saved / "adapter")
    loads = (lambda: model.load_adapter(adapter, adapter_name="b"),  # the config (read from the file) checks it first
             lambda: _load_with(model, adapter, good))  # injected first: our load hook must undo it  # fmt: skip
    for load in loads:
        with pytest.raises(ValueError, match="NaN / inf"):
            load()
        assert list(model.peft_config) == ["default"]
        assert {n: type(m) for n, m in model.named_modules()} == modules
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def _load_with(model, directory: Path, config) -> None:
    """``load_adapter`` with an already-made config: peft injects first, then loads (our hook must undo it)."""
    model.add_adapter("b", config)
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    set_peft_model_state_dict(model, load_peft_weights(str(directory), device="cpu"), adapter_name="b")


# ------------------------------------------------------------------------------------------------ masks and inputs
def test_sparse_coo_mask(model):
    with pytest.raises(TypeError, match=f"mask for module '{UP}' is a sparse_coo tensor.*to_dense"):
        SparseMask({UP: torch.ones(64, 32, dtype=torch.bool).to_sparse()})
    with pytest.raises(TypeError, match="sparse_coo"):
        get_peft_model(model, SparseOPDConfig(mask={UP: torch.ones(64, 32, dtype=torch.bool).to_sparse()}))
    assert not any(isinstance(m, SparseOPDLayer) for m in model.modules())


def test_meta_device_mask(model):
    with pytest.raises(ValueError, match=f"mask for module '{UP}' is on the meta device"):
        get_peft_model(model, SparseOPDConfig(mask={UP: torch.ones(64, 32, dtype=torch.bool, device="meta")}))
    assert not any(isinstance(m, SparseOPDLayer) for m in model.modules())
    with pytest.raises(TypeError, match=f"mask module '{UP}': indices must be a dense 1-D integer tensor with data"):
        SparseMask.from_indices({UP: ((64, 32), torch.arange(3, device="meta"))})


def test_cli_density_too_small_for_any_coordinate(saved, tmp_path):
    tuned = make_model(seed=1)
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "m.safetensors"
    res = run("mask", saved / "base", tmp_path / "tuned", "--rule", "topk", "--density", "1e-9", "--out", out, "-q")
    assert_cli_error(res, "density 1e-09 keeps no coordinate", "at least")
    assert not out.exists()


def test_empty_prompts_file(tmp_path):
    from sparse_opd_peft.data import load_prompts

    for content in ("", "\n \n"):
        (tmp_path / "p.jsonl").write_text(content)
        with pytest.raises(ValueError, match=r"p.jsonl: the file is empty; a .jsonl file needs one JSON object"):
            load_prompts(str(tmp_path / "p.jsonl"))


def test_modules_to_save_copies_still_load(tmp_path):
    """The refusal of foreign tensors keeps what the config asks for: peft's ``modules_to_save`` copies."""
    model = make_model()
    pm = get_peft_model(model, SparseOPDConfig(mask=random_mask(model, 0.1), modules_to_save=["lm_head"]))
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    ids = torch.arange(9).view(1, 9)
    save_adapter(pm, tmp_path / "a")
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert torch.equal(PeftModel.from_pretrained(make_model(), tmp_path / "a")(ids).logits, pm(ids).logits)


@pytest.mark.parametrize(
    "edit, match",
    [(lambda p: p.write_bytes(b"{not json"), "adapter_config.json: not valid JSON"),
     (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "peft_type": "MAGIC"})), "is a MAGIC adapter"),
     (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "peft_type"})),
      "no peft_type")],
    ids=["non_json", "unknown_peft_type", "no_peft_type"],
)  # fmt: skip
def test_load_adapter_reads_a_hostile_config_first(saved, adapter, edit, match):
    """peft's PeftModel.from_pretrained parses adapter_config.json before any method code (its own JSONDecodeError /
    KeyError, documented in the README); sparse_opd_peft.load_adapter gives one clear error naming the file, and the
    base stays a plain model."""
    from sparse_opd_peft import load_adapter

    edit(adapter / "adapter_config.json")
    files = snapshot(adapter)
    base = make_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_adapter(base, adapter)
    assert_unwrapped(base, before)
    assert snapshot(adapter) == files
