"""``sparse-opd push``: help, dry run, the upload (HfApi mocked, no network), one-line errors writing nothing."""

from __future__ import annotations

import json
import re

import huggingface_hub
import pytest
from conftest import make_model
from huggingface_hub import HfApi
from huggingface_hub.errors import OfflineModeIsEnabled
from peft import LoraConfig, get_peft_model
from test_hub import FILES, FakeHub, hub_cache, trained_adapter, tree  # noqa: F401  (hub_cache is a fixture)
from typer.testing import CliRunner

from sparse_opd_peft.cli import app

runner = CliRunner()


@pytest.fixture
def adapter(tmp_path):
    trained_adapter(tmp_path / "adapter")
    return tmp_path / "adapter"


def no_network(monkeypatch):
    monkeypatch.setattr(HfApi, "__init__", lambda *a, **k: pytest.fail("must not talk to the Hub"))


def test_push_help_explains_arguments_options_and_examples():
    result = runner.invoke(app, ["push", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("ADAPTER", "REPO_ID", "--revision", "--branch", "--private", "--commit-message", "--token",
                 "--dry-run", "--create-pr", "adapter_model.safetensors", "Examples: sparse-opd push"):  # fmt: skip
        assert text.lower() in result.output.lower(), text
    assert "push" in runner.invoke(app, ["--help"], terminal_width=200).output


def test_dry_run_lists_files_and_sizes_without_network(hub_cache, adapter, monkeypatch):  # noqa: F811
    no_network(monkeypatch)
    before = tree(adapter)
    result = runner.invoke(app, ["push", str(adapter), "org/new", "--dry-run", "--branch", "dev"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("dry run: would upload 3 files") and lines[0].endswith("to org/new (branch dev):")
    assert [line.split()[0] for line in lines[1:4]] == FILES
    for name, line in zip(FILES[:2], lines[1:3], strict=True):
        assert f"{(adapter / name).stat().st_size:,} bytes" in line
    assert tree(adapter) == before
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(adapter)}))
    result = runner.invoke(app, ["push", str(adapter), "org/new", "--dry-run"])
    assert result.exit_code == 0 and result.stderr.startswith("warning: adapter_config.json records the base model")


def test_push_uploads_with_the_options(hub_cache, adapter, monkeypatch):  # noqa: F811
    hub = FakeHub(monkeypatch)
    args = ["push", str(adapter), "org/new", "--branch", "dev", "--private", "-m", "stage 1", "--token", "hf_x"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        result.output.startswith("uploaded 3 files")
        and "commit: https://huggingface.co/org/new/commit/abc" in result.output
    )
    kinds = {c[0]: c[2] for c in hub.calls}
    assert kinds["create_repo"]["private"] is True and kinds["create_branch"]["branch"] == "dev"
    assert kinds["create_commit"]["commit_message"] == "stage 1" and kinds["create_commit"]["revision"] == "dev"
    assert list(hub.uploaded) == FILES and 'adapter = "org/new"' in hub.uploaded["README.md"].decode()
    assert hub.uploaded["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()


def _lora(tmp_path):
    get_peft_model(make_model(), LoraConfig(target_modules=["q_proj"], r=2)).save_pretrained(tmp_path / "adapter")


def _newer(tmp_path):
    trained_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))


def _no_weights(tmp_path):
    trained_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()


def _corrupt(tmp_path):
    trained_adapter(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def _file(tmp_path):
    (tmp_path / "adapter").write_text("{}")


@pytest.mark.parametrize(
    ("setup", "repo", "match"),
    [
        (lambda p: None, "org/new", "no such adapter directory"),
        (_file, "org/new", "is a file; pass the adapter directory"),
        (lambda p: (p / "adapter").mkdir(), "org/new", "no adapter_config.json; pass the directory written by"),
        (_lora, "org/new", "is a LORA adapter, not a SPARSE_OPD one"),
        (_newer, "org/new", "format_version 99, newer than.*upgrade sparse_opd_peft"),
        (_no_weights, "org/new", "adapter_model.safetensors: missing"),
        (_corrupt, "org/new", "truncated or corrupt, re-save"),
        (trained_adapter, "bad repo!", "repo id 'bad repo!' is invalid.*use org/name"),
    ],
    ids=["missing", "file", "empty_dir", "lora", "newer_format", "no_weights", "corrupt", "bad_repo_id"],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, setup, repo, match):
    if setup is trained_adapter:
        trained_adapter(tmp_path / "adapter")
    else:
        setup(tmp_path)
    no_network(monkeypatch)
    before = tree(tmp_path)
    for extra in ([], ["--dry-run"]):
        result = runner.invoke(app, ["push", str(tmp_path / "adapter"), repo, *extra])
        assert result.exit_code == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        assert re.search(match, lines[0]), lines[0]
    assert tree(tmp_path) == before


class Forbidden(huggingface_hub.errors.HfHubHTTPError):
    """An HTTP 403 from the Hub (built without an HTTP response object, whose library varies by version)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


def _forbidden() -> Exception:
    return Forbidden("403 Forbidden: you may not write to org/new\nmore details")


@pytest.mark.parametrize(
    "make_error", [lambda: OfflineModeIsEnabled("offline mode is enabled"), _forbidden], ids=["offline", "forbidden"]
)
def test_network_failures_are_one_clear_line(hub_cache, adapter, monkeypatch, make_error):  # noqa: F811
    error = make_error()

    def create_repo(*args, **kwargs):
        raise error

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    result = runner.invoke(app, ["push", str(adapter), "org/new"])
    assert result.exit_code == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: upload to org/new failed ({type(error).__name__}")
    assert "--token, HF_TOKEN or `hf auth login`" in line and "--dry-run" in line
