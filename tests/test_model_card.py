"""The model card written by save_adapter (peft's card plus our section), and the training-recipe metadata."""

from __future__ import annotations

import json
import re

import peft
import pytest
import torch
from conftest import make_model, random_mask
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from sparse_opd_peft import SparseMask, SparseOPDConfig, record_training, save_adapter
from sparse_opd_peft.model_card import (
    CARD_BEGIN,
    card_block_for_directory,
    fingerprint_digest,
    write_model_card,
)
from sparse_opd_peft.safetensors_io import safetensors_nbytes

MASK_META = {"source": "org/sft-anchor", "tuned": "org/opd-run", "rule": "topk", "density": 0.1}
RECIPE = {
    "loss": "sampled_token",
    "teacher": "org/teacher-1.7b",
    "steps": 120,
    "optimizer": {"name": "adamw", "lr": 1e-3},
}
DIAGNOSTICS = {"source": "org/sft-anchor", "tuned": "org/opd-run",
               "summary": {"bf16_sparsity": 0.71, "nss": 0.002, "ffn_energy_share": 0.8, "stable_rank": float("nan")}}  # fmt: skip


def sparse_model(density: float = 0.1, save_dtype: str = "float32", **kwargs):
    base = make_model()
    base.name_or_path = "org/tiny-base"
    mask = SparseMask(random_mask(base, density=density), MASK_META)
    torch.manual_seed(7)
    return get_peft_model(base, SparseOPDConfig(mask=mask, init_weights=False, save_dtype=save_dtype, **kwargs))


def test_save_adapter_writes_the_card(tmp_path):
    model = sparse_model()
    record_training(model, RECIPE, diagnostics=DIAGNOSTICS)
    save_adapter(model, tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    text, cfg = card.text, model.peft_config["default"]
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny-base"
    assert {"sparse_opd", "base_model:adapter:org/tiny-base"} <= set(card.data.tags)
    assert (
        "More Information Needed" not in text and text.count(CARD_BEGIN) == 1 and f"- PEFT {peft.__version__}" in text
    )
    assert (
        "- Base model: `org/tiny-base`" in text
        and f"Fingerprint: `{fingerprint_digest(cfg.fingerprint)}` over 14" in text
    )
    nnz = sum(cfg.module_nnz.values())
    assert f"{nnz:,} trained coordinates in 14 Linear weights, density {100 * cfg.density:.3g}%" in text
    for kind in ("ffn", "attention"):  # per-type densities agree with the config's own
        assert re.search(rf"\| {kind} \| \d+ \| [\d,]+ \| [\d,]+ \| {100 * cfg.density_by_type[kind]:.3g}% \|", text)
    assert "| `model.layers.*.mlp.up_proj` | 0-1 |" in text
    assert all(f"- {k}: " in text for k in MASK_META) and "`org/opd-run`" in text
    vis = model.bf16_visibility()
    assert 0 < vis["share"] and f"{100 * vis['share']:.3g}% of the {vis['coords']:,} trained coordinates" in text
    assert "- loss: `sampled_token`" in text and "- teacher: `org/teacher-1.7b`" in text and "- steps: 120" in text
    assert '- optimizer: `{"name": "adamw", "lr": 0.001}`' in text
    assert "| bf16_sparsity | 0.71 |" in text and "| stable_rank | None |" in text
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert f"| `adapter_model.safetensors` | {size:,} bytes" in text
    assert (
        "PeftModel.from_pretrained(base, adapter)" in text
        and 'AutoModelForCausalLM.from_pretrained("org/tiny-base")' in text
    )


@pytest.mark.parametrize(("density", "save_dtype"), [(0.1, "float32"), (0.01, "bfloat16"), (0.5, "float16")])
def test_file_size_is_exact(tmp_path, density, save_dtype):
    model = sparse_model(density, save_dtype)
    save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert f"| `adapter_model.safetensors` | {size:,} bytes" in (tmp_path / "README.md").read_text()
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.uint8),
               "c.d": torch.zeros(2, 2, dtype=torch.int64), "e": torch.zeros(0)}  # fmt: skip
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    assert safetensors_nbytes(tensors, {"format": "pt"}) == (tmp_path / "x.safetensors").stat().st_size


def test_record_training_roundtrips_and_rejects_bad_input(tmp_path):
    model = sparse_model()
    assert record_training(model, {"loss": "full_kl"}) == {"loss": "full_kl"}
    stored = record_training(model, {"steps": 5, "optimizer": ("sgd", 0.1)})
    assert stored == {"loss": "full_kl", "steps": 5, "optimizer": ["sgd", 0.1]}  # JSON form, as it reads back
    with pytest.raises(ValueError, match="JSON data only"):
        record_training(model, {"lr": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="JSON data only"):
        record_training(model, {"loss": float("nan")})
    with pytest.raises(ValueError, match="no SparseOPD adapter named 'other'"):
        record_training(model, RECIPE, adapter_name="other")
    with pytest.raises(ValueError, match="none of the summary keys"):
        record_training(model, RECIPE, diagnostics={"foo": 1})
    assert model.peft_config["default"].training == stored  # failed calls changed nothing
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["training"] == stored
    assert PeftModel.from_pretrained(make_model(), tmp_path).peft_config["default"].training == stored
    with pytest.raises(ValueError, match="SparseOPDConfig.training must be a JSON-able dict"):
        SparseOPDConfig(mask=random_mask(make_model()), training=["not", "a", "dict"])


def test_adapter_files_from_before_the_training_field_still_load(tmp_path, ids):
    model = sparse_model()
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    del cfg["training"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "README.md").unlink()
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert loaded.peft_config["default"].training is None
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    block = card_block_for_directory(tmp_path, {"default": SparseOPDConfig.from_pretrained(tmp_path)})
    assert "- loss: not recorded" in block and "Not measured" in block
    assert f"{(tmp_path / 'adapter_model.safetensors').stat().st_size:,} bytes" in block


def test_resaving_keeps_the_users_text_and_one_card(tmp_path):
    model = sparse_model()
    save_adapter(model, tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text() + "\n## My notes\n\nTrained on my laptop.\n")
    record_training(model, {"steps": 999})
    save_adapter(model, tmp_path)
    model.save_pretrained(tmp_path)
    text = readme.read_text()
    assert "Trained on my laptop." in text and "- steps: 999" in text
    assert text.count(CARD_BEGIN) == 1 and text.count(f"- PEFT {peft.__version__}") == 1


def test_two_adapters_and_a_subspace(tmp_path):
    model = sparse_model()
    base = model.get_base_model()
    name = "model.layers.0.mlp.up_proj"
    basis = torch.linalg.qr(torch.randn(base.get_submodule(name).in_features, 3))[0]
    model.add_adapter("second", SparseOPDConfig(subspace={name: basis}))
    save_adapter(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "## Adapter `default`" in text and "## Adapter `second` (subfolder `second/`)" in text
    assert "Plus a fixed subspace (rank 3) on 1 modules" in text
    assert 'model.load_adapter(adapter, adapter_name="second", subfolder="second")' in text
    assert (
        f"`second/adapter_model.safetensors` | {(tmp_path / 'second/adapter_model.safetensors').stat().st_size:,}"
        in text
    )


def test_a_card_failure_never_loses_the_adapter(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("sparse_opd_peft.model_card.card_block_for_model", broken)
    with pytest.warns(UserWarning, match="could not write the SparseOPD model card.*boom"):
        save_adapter(sparse_model(), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def test_other_peft_methods_keep_peft_s_card(tmp_path):
    get_peft_model(make_model(), LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert CARD_BEGIN not in text and "sparse_opd" not in text


def test_plain_save_pretrained_is_peft_s_own_and_write_model_card_adds_ours(tmp_path):
    model = sparse_model()
    model.save_pretrained(tmp_path)  # nothing of peft is patched: peft's generic card
    assert CARD_BEGIN not in (tmp_path / "README.md").read_text()
    write_model_card(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count(CARD_BEGIN) == 1 and "More Information Needed" not in text
    assert f"{sum(model.peft_config['default'].module_nnz.values()):,} trained coordinates" in text


def test_write_model_card_from_the_files_describes_the_chosen_adapters_without_visibility(tmp_path):
    """``from_files=True`` (the sharded save's card): the section is built from the written files, bf16 visibility
    not measured; ``adapters=`` limits it to the adapters named; a model-measured card is otherwise the same."""
    model = sparse_model()
    model.add_adapter("second", SparseOPDConfig(mask=SparseMask(random_mask(make_model(), density=0.1))))
    model.save_pretrained(tmp_path)
    measured = (write_model_card(model, tmp_path, fresh=True), (tmp_path / "README.md").read_text())[1]
    text = write_model_card(model, tmp_path, fresh=True, adapters=["second"], from_files=True).read_text()
    assert "## bf16 visibility of the trained delta\n\nNot measured" in text and "Not measured" not in measured
    assert "## Adapter `default`" not in text and "`default`" in measured
    size = (tmp_path / "second/adapter_model.safetensors").stat().st_size
    assert f"`second/adapter_model.safetensors` | {size:,}" in text and f"| {size:,}" in measured
    with pytest.raises(ValueError, match="no SparseOPD adapter"):
        write_model_card(model, tmp_path, adapters=[])


def test_save_adapter_with_selected_adapters_describes_only_those(tmp_path):
    """``save_adapter(..., selected_adapters=[...])`` (peft's argument): the card describes the adapters written,
    as the sharded save's card does."""
    model = sparse_model()
    model.add_adapter("second", SparseOPDConfig(mask=SparseMask(random_mask(make_model(), density=0.1))))
    save_adapter(model, tmp_path, selected_adapters=["second"])
    text = (tmp_path / "README.md").read_text()
    assert "## Adapter `second` (subfolder `second/`)" in text and "`default`" not in text
    assert (tmp_path / "second" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    # the card's usage line loads it (peft put it in the subfolder of its name)
    line = next(x for x in text.splitlines() if x.startswith("model = PeftModel.from_pretrained(base, adapter"))
    assert line == 'model = PeftModel.from_pretrained(base, adapter, subfolder="second", adapter_name="second")'
    assert "AutoPeftModelForCausalLM.from_pretrained(" not in text  # it would pass subfolder= to the base too
    assert "## Adapter `second` (subfolder `second/`)\n\n### Base model" in text  # its sections one level down
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path), subfolder="second", adapter_name="second")
    want = model.base_model.model.model.layers[0].mlp.up_proj.sparse_opd_values["second"]
    assert torch.equal(loaded.base_model.model.model.layers[0].mlp.up_proj.sparse_opd_values["second"], want)


def test_default_is_described_first_and_loaded_from_the_root(tmp_path):
    """An adapter named ``default`` added after another one is still saved at the root by peft: the card describes
    it first and loads it without a subfolder, the other one from its subfolder; unknown names are refused."""
    base = make_model()
    base.name_or_path = "org/tiny-base"
    mask = SparseMask(random_mask(base, density=0.1))
    model = get_peft_model(base, SparseOPDConfig(mask=mask), adapter_name="first")
    model.add_adapter("default", SparseOPDConfig(mask=mask))
    save_adapter(model, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert (tmp_path / "adapter_model.safetensors").is_file() and (
        tmp_path / "first/adapter_model.safetensors"
    ).is_file()
    assert "model = PeftModel.from_pretrained(base, adapter)\n" in text
    assert 'model.load_adapter(adapter, adapter_name="first", subfolder="first")' in text
    assert text.index("## Adapter `default`") < text.index("## Adapter `first` (subfolder `first/`)")
    with pytest.raises(ValueError, match=r"\['lora'\] are not SparseOPD adapters of this model"):
        write_model_card(model, tmp_path, adapters=["lora"])
