"""Hub sharing: loading by repo id from a local Hub cache with HF_HUB_OFFLINE=1, revision pinning, push_adapter up to
the upload call, and one test per bad input on the Hub path (clear error naming the fix, nothing written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import make_model, random_mask
from huggingface_hub import HfApi, constants
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from sparse_opd_peft import SparseOPDConfig, load_adapter, push_adapter, save_adapter
from sparse_opd_peft.hub import add_to_hub_cache
from sparse_opd_peft.model_card import CARD_BEGIN, CARD_END
from sparse_opd_peft.tuner.files import locate_adapter_weights
from sparse_opd_peft.tuner.layer import SparseOPDLayer

REPO, BASE_REPO = "org/tiny-sparse-opd", "org/tiny-base"
FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache under tmp_path, offline. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into
    ``huggingface_hub.constants`` at import time and reads those attributes at call time: patch both."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def trained_adapter(directory: Path, seed: int = 0, base=None):
    """A SparseOPD model with random (non-zero) values on a tiny base, saved to ``directory`` in float32."""
    base = base if base is not None else make_model()
    torch.manual_seed(100 + seed)
    model = get_peft_model(base, SparseOPDConfig(mask=random_mask(base), init_weights=False))
    save_adapter(model, directory)
    return model


def tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before: dict) -> None:
    assert not any(isinstance(m, SparseOPDLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_cache_layout_is_read_by_huggingface_hub(hub_cache, tmp_path):
    trained_adapter(tmp_path / "a", seed=0)
    trained_adapter(tmp_path / "b", seed=1)
    snap_v1 = add_to_hub_cache(tmp_path / "a", REPO, revision="v1")
    snap_main = add_to_hub_cache(tmp_path / "b", REPO)
    info = huggingface_hub.scan_cache_dir(hub_cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO and len(repo.revisions) == 2
    refs = {ref: rev.commit_hash for rev in repo.revisions for ref in rev.refs}
    assert refs == {"v1": snap_v1.name, "main": snap_main.name}
    weights = snap_main / "adapter_model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent.name == "blobs"
    assert weights.read_bytes() == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    # our file validation finds the cached file offline, for a branch, a commit hash and the default branch
    assert locate_adapter_weights(REPO, None, {}) == weights
    assert locate_adapter_weights(REPO, None, {"revision": "v1"}) == snap_v1 / "adapter_model.safetensors"
    assert locate_adapter_weights(REPO, None, {"revision": snap_v1.name}).parent == snap_v1
    # same content, same commit: re-adding is idempotent
    assert add_to_hub_cache(tmp_path / "b", REPO) == snap_main


def test_peft_from_pretrained_by_repo_id_offline(hub_cache, tmp_path, ids):
    model = trained_adapter(tmp_path / "adapter")
    add_to_hub_cache(tmp_path / "adapter", REPO)
    expected = model(ids).logits
    loaded = PeftModel.from_pretrained(make_model(), REPO)
    assert torch.equal(loaded(ids).logits, expected)
    assert isinstance(loaded.peft_config["default"], SparseOPDConfig)
    via_helper = load_adapter(make_model(), REPO, is_trainable=True)
    assert torch.equal(via_helper(ids).logits, expected)
    assert via_helper.get_nb_trainable_parameters()[0] == sum(loaded.peft_config["default"].module_nnz.values())


def test_auto_peft_model_loads_base_and_adapter_by_repo_id(hub_cache, tmp_path, ids):
    make_model().save_pretrained(tmp_path / "base")
    add_to_hub_cache(tmp_path / "base", BASE_REPO)
    base = AutoModelForCausalLM.from_pretrained(BASE_REPO)
    model = trained_adapter(tmp_path / "adapter", base=base)
    assert (
        json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_REPO
    )
    add_to_hub_cache(tmp_path / "adapter", REPO)
    auto = AutoPeftModelForCausalLM.from_pretrained(REPO)
    assert torch.equal(auto(ids).logits, model(ids).logits)


def test_revision_pinning_selects_the_snapshot(hub_cache, tmp_path, ids):
    old, new = trained_adapter(tmp_path / "old", seed=0), trained_adapter(tmp_path / "new", seed=1)
    snap_old = add_to_hub_cache(tmp_path / "old", REPO, revision="v1")
    add_to_hub_cache(tmp_path / "new", REPO)
    want_old, want_new = old(ids).logits, new(ids).logits
    assert not torch.equal(want_old, want_new)
    assert torch.equal(PeftModel.from_pretrained(make_model(), REPO)(ids).logits, want_new)
    assert torch.equal(PeftModel.from_pretrained(make_model(), REPO, revision="v1")(ids).logits, want_old)
    assert torch.equal(load_adapter(make_model(), REPO, revision=snap_old.name)(ids).logits, want_old)


# ------------------------------------------------------------------------------------------------ push_adapter
class FakeHub:
    """Records what HfApi would send; reads every uploaded file inside create_commit (temp dirs vanish after)."""

    def __init__(self, monkeypatch, remote_readme: str | None = None):
        self.calls, self.uploaded, self.remote_readme = [], {}, remote_readme
        hub = self

        def create_repo(api, repo_id, **kw):
            hub.calls.append(("create_repo", repo_id, kw))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, **kw):
            hub.calls.append(("create_branch", repo_id, kw))

        def hf_hub_download(api, repo_id, filename, **kw):
            if hub.remote_readme is None:
                raise huggingface_hub.errors.EntryNotFoundError("no README.md")
            path = Path(os.environ["HF_HOME"]) / "remote_README.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(hub.remote_readme)
            return str(path)

        def create_commit(api, repo_id, operations, **kw):
            hub.calls.append(("create_commit", repo_id, kw))
            for op in operations:
                src = op.path_or_fileobj
                data = src if isinstance(src, bytes) else Path(src).read_bytes()
                assert len(data) == op.upload_info.size
                hub.uploaded[op.path_in_repo] = data
            return huggingface_hub.CommitInfo(
                commit_url=f"https://huggingface.co/{repo_id}/commit/abc", commit_message=kw["commit_message"],
                commit_description="", oid="a" * 40,
            )  # fmt: skip

        for name, fn in [("create_repo", create_repo), ("create_branch", create_branch),
                         ("hf_hub_download", hf_hub_download), ("create_commit", create_commit)]:  # fmt: skip
            monkeypatch.setattr(HfApi, name, fn)


def test_push_adapter_of_a_model_uploads_the_adapter_files_and_card(hub_cache, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    model = trained_adapter(tmp_path / "local")
    result = push_adapter(model, "org/new", revision="dev", private=True, commit_message="first")
    assert result.commit_url.endswith("/commit/abc") and not result.dry_run
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "create_commit"]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["branch"] == "dev"
    assert hub.calls[2][2]["revision"] == "dev" and hub.calls[2][2]["commit_message"] == "first"
    assert list(hub.uploaded) == FILES
    local = tmp_path / "local"
    for name in FILES[:2]:  # byte-identical to a local save
        assert hub.uploaded[name] == (local / name).read_bytes()
    readme = hub.uploaded["README.md"].decode()
    assert readme.count(CARD_BEGIN) == 1 and 'adapter = "org/new"' in readme
    assert f"| `adapter_model.safetensors` | {(local / FILES[1]).stat().st_size:,} bytes" in readme
    assert readme == (local / "README.md").read_text().replace('"your-org/your-sparse-opd-adapter"', '"org/new"')


def test_push_keeps_the_text_of_an_existing_hub_card(hub_cache, tmp_path, monkeypatch):
    remote = f"---\nlicense: mit\ntags:\n- mine\n---\n# My notes\n\n{CARD_BEGIN}\nold stats\n{CARD_END}\n\nThanks!\n"
    hub = FakeHub(monkeypatch, remote_readme=remote)
    trained_adapter(tmp_path / "adapter")
    result = push_adapter(tmp_path / "adapter", "org/new", tags=["math"])
    readme = hub.uploaded["README.md"].decode()
    assert "# My notes" in readme and "Thanks!" in readme and "old stats" not in readme
    assert readme.count(CARD_BEGIN) == 1 and "license: mit" in readme
    assert all(f"- {t}" in readme for t in ("mine", "math", "sparse_opd"))
    assert dict(result.files)["README.md"] == len(hub.uploaded["README.md"])
    assert [c[0] for c in hub.calls] == ["create_repo", "create_commit"]  # no branch: the default one


def test_push_dry_run_needs_no_network_and_writes_nothing(hub_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(HfApi, "__init__", lambda *a, **k: pytest.fail("dry run must not talk to the Hub"))
    trained_adapter(tmp_path / "adapter")
    before = tree(tmp_path)
    result = push_adapter(tmp_path / "adapter", "org/new", dry_run=True)
    assert result.dry_run and result.commit is None and [p for p, _ in result.files] == FILES
    sizes = dict(result.files)
    for name in FILES[:2]:
        assert sizes[name] == (tmp_path / "adapter" / name).stat().st_size
    assert tree(tmp_path) == before
    (tmp_path / "adapter" / "README.md").unlink()  # no card on disk: one is generated for the upload only
    before = tree(tmp_path)
    result = push_adapter(tmp_path / "adapter", "org/new", dry_run=True)
    assert [p for p, _ in result.files] == FILES and dict(result.files)["README.md"] > 1000
    assert tree(tmp_path) == before


def test_push_adapter_refuses_a_model_without_sparse_opd_adapters(monkeypatch):
    monkeypatch.setattr(HfApi, "__init__", lambda *a, **k: pytest.fail("must not talk to the Hub"))
    lora = get_peft_model(make_model(), LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(ValueError, match="holds no SparseOPD adapter; use model.push_to_hub"):
        push_adapter(lora, "org/lora")


# ------------------------------------------------------------------------------------------------ bad input
def _cached_adapter(tmp_path: Path, edit=None) -> Path:
    """A trained adapter of the cached base BASE_REPO, edited on disk, then put into the cache as REPO."""
    make_model().save_pretrained(tmp_path / "base")
    add_to_hub_cache(tmp_path / "base", BASE_REPO)
    directory = tmp_path / "adapter"
    trained_adapter(directory, base=AutoModelForCausalLM.from_pretrained(BASE_REPO))
    if edit:
        edit(directory)
    add_to_hub_cache(directory, REPO)
    return directory


def _load_fails(hub_cache, exc, match, loader=PeftModel.from_pretrained, base=None):
    base = base if base is not None else make_model()
    before, files = state(base), tree(hub_cache)
    with pytest.raises(exc, match=match):
        loader(base, REPO)
    assert_untouched(base, before)
    assert tree(hub_cache) == files


def test_repo_not_in_the_cache_offline(hub_cache):
    hub_cache.mkdir()
    match = r"'org/tiny-sparse-opd' \(revision main\): adapter_config.json is not in the local Hugging Face cache"
    _load_fails(hub_cache, ValueError, match + r".*HF_HUB_OFFLINE=1 forbids.*hf download", loader=load_adapter)
    _load_fails(hub_cache, ValueError, "adapter_config.json")  # peft's own path fails too, base untouched
    with pytest.raises(ValueError, match=match):
        SparseOPDConfig.from_pretrained(REPO)


def test_adapter_of_another_method(hub_cache, tmp_path):
    lora = get_peft_model(make_model(), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    add_to_hub_cache(tmp_path / "lora", REPO)
    match = r"org/tiny-sparse-opd: adapter_config.json is a LORA adapter, not a SPARSE_OPD one; load it with peft"
    _load_fails(hub_cache, ValueError, match, loader=load_adapter)
    with pytest.raises(ValueError, match=match):
        SparseOPDConfig.from_pretrained(REPO)
    with pytest.raises(ValueError, match="LORA adapter, not a SPARSE_OPD one"):
        push_adapter(tmp_path / "lora", "org/x", dry_run=True)


def test_newer_format_version(hub_cache, tmp_path):
    def bump(directory):
        cfg = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**cfg, "format_version": 99, "new_field": 1}))

    _cached_adapter(tmp_path, bump)
    _load_fails(hub_cache, ValueError, r"org/tiny-sparse-opd: adapter_config.json has sparse_opd format_version 99.*"
                r"upgrade sparse_opd_peft")  # fmt: skip
    _load_fails(hub_cache, ValueError, "format_version 99", loader=load_adapter)


def test_missing_adapter_model_safetensors(hub_cache, tmp_path):
    def drop(directory):  # a stale pickle next to it must never be loaded instead
        (directory / "adapter_model.safetensors").unlink()
        (directory / "adapter_model.bin").write_bytes(b"not a pickle")

    _cached_adapter(tmp_path, drop)
    match = r"adapter_model.safetensors is not in the local Hugging Face cache.*safetensors only, re-upload"
    _load_fails(hub_cache, FileNotFoundError, match)
    _load_fails(hub_cache, FileNotFoundError, match, loader=lambda b, r: AutoPeftModelForCausalLM.from_pretrained(r))


def test_fingerprint_mismatch_on_load_from_the_hub(hub_cache, tmp_path):
    make_model().save_pretrained(tmp_path / "base")
    add_to_hub_cache(tmp_path / "base", BASE_REPO, revision="v0")
    trained_adapter(tmp_path / "adapter", base=AutoModelForCausalLM.from_pretrained(BASE_REPO, revision="v0"))
    add_to_hub_cache(tmp_path / "adapter", REPO)
    match = r"base model mismatch at module 'model.layers.0.*load the matching base model.*check_fingerprint=False"
    _load_fails(hub_cache, ValueError, match, base=make_model(seed=1))
    _load_fails(hub_cache, ValueError, match, loader=load_adapter, base=make_model(seed=1))
    # the base the adapter records moved on to other weights: AutoPeftModel refuses it as well
    make_model(seed=1).save_pretrained(tmp_path / "base2")
    add_to_hub_cache(tmp_path / "base2", BASE_REPO)
    files = tree(hub_cache)
    with pytest.raises(ValueError, match=match):
        AutoPeftModelForCausalLM.from_pretrained(REPO)
    assert tree(hub_cache) == files
    loaded = load_adapter(make_model(seed=1), REPO, check_fingerprint=False)  # the documented opt-out
    assert any(isinstance(m, SparseOPDLayer) for m in loaded.modules())
