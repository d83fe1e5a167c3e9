"""Sharing SparseOPD adapters on the Hugging Face Hub with peft's and huggingface_hub's own machinery.

* Loading: ``PeftModel.from_pretrained(base, "org/name", revision=...)`` and
  ``AutoPeftModelForCausalLM.from_pretrained("org/name")`` work as for any peft method (``HF_HUB_OFFLINE=1`` reads
  the local cache); :func:`load_adapter` is the same with our clear errors for every bad input first.
* Pushing: :func:`push_adapter` (``sparse_opd_peft.push_adapter(model_or_directory, "org/name")``, ``sparse-opd
  push``) uploads ``adapter_config.json``, ``adapter_model.safetensors`` and our model card ``README.md`` in one
  commit through ``HfApi.create_repo`` / ``create_branch`` / ``create_commit``. peft's ``model.push_to_hub`` is left
  as peft ships it (nothing of peft is patched): it uploads the files with transformers' generic card.
* :func:`add_to_hub_cache` puts a saved adapter (or any model folder) into the local Hub cache under a repo id, in
  huggingface_hub's documented layout, for air-gapped machines and tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .atomic import atomic_file, write_text_atomic
from .model_card import (
    CARD_BEGIN,
    card_block_for_directory,
    merge_card,
    set_card_repo,
    sparse_opd_adapters,
)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class PushResult:
    """What :func:`push_adapter` uploaded (or, with ``dry_run``, would upload).

    Attributes:
        repo_id: target repository (as the Hub resolved it after ``create_repo``).
        revision: target branch (None: the default branch).
        files: ``[(path_in_repo, size_in_bytes)]`` in upload order.
        dry_run: True when nothing was sent.
        commit_url: URL of the created commit (or pull request), None on a dry run.
        commit: the ``huggingface_hub.CommitInfo`` returned by ``create_commit``.
        warnings: notes for the user (e.g. a base model recorded as a local path).
    """

    repo_id: str
    revision: Optional[str]
    files: list[tuple[str, int]]
    dry_run: bool
    commit_url: Optional[str] = None
    commit: Any = None
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- cache
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def add_to_hub_cache(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str = "main",
    commit_hash: Optional[str] = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Copy the files of ``folder`` into the local Hub cache as ``repo_id`` at ``revision`` (no network).

    Uses huggingface_hub's documented layout: ``models--org--name/blobs/<sha256>``,
    ``snapshots/<commit>/<file>`` (relative symlinks to the blobs, copies where symlinks are unavailable) and
    ``refs/<revision>`` holding the commit hash; afterwards ``hf_hub_download`` / ``from_pretrained(repo_id,
    revision=...)`` find the files with ``HF_HUB_OFFLINE=1``. Hidden files are skipped.

    Args:
        folder: a saved adapter or model directory.
        repo_id: ``org/name``.
        revision: branch or tag name recorded in ``refs/``.
        commit_hash: 40-hex commit id; default: a SHA-1 of the files' contents (same files, same commit).
        cache_dir: Hub cache root (default ``huggingface_hub.constants.HF_HUB_CACHE``).

    Returns:
        The snapshot directory.

    Raises:
        ValueError: invalid repo id / commit hash, or an empty folder. FileNotFoundError: no such folder.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    check_repo_id(repo_id)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such directory")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    files = [rel for rel in files if not any(part.startswith(".") for part in rel.parts)]
    if not files:
        raise ValueError(f"{folder}: no files to put into the cache")
    digests = {rel.as_posix(): _sha256(folder / rel) for rel in files}
    commit = commit_hash or hashlib.sha1(json.dumps(digests, sort_keys=True).encode()).hexdigest()
    if len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit_hash must be 40 lowercase hex digits, got {commit!r}")
    root = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    for rel, digest in digests.items():
        blob = root / "blobs" / digest
        if not blob.exists():
            with atomic_file(blob) as tmp:  # whole or absent, mode per the umask
                shutil.copyfile(folder / rel, tmp)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            os.symlink(os.path.relpath(blob, link.parent), link)
        except OSError:  # no symlinks (Windows without developer mode): huggingface_hub copies too
            shutil.copyfile(blob, link)
    ref = root / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(ref, commit)
    return snapshot


# ---------------------------------------------------------------------------------------------------- loading
def load_adapter(
    base,
    adapter: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    revision: Optional[str] = None,
    subfolder: Optional[str] = None,
    cache_dir: str | os.PathLike | None = None,
    token: Union[str, bool, None] = None,
    check_fingerprint: bool = True,
    **kwargs,
):
    """``PeftModel.from_pretrained(base, adapter, ...)`` for a SparseOPD adapter (directory or Hub repo id), with
    every check done before the base model is touched.

    Args:
        base: the base ``transformers`` model (its Linear weights are fingerprinted against the adapter's).
        adapter: local adapter directory or Hub repo id (``HF_HUB_OFFLINE=1``: the local cache only).
        adapter_name / is_trainable / revision / subfolder / cache_dir / token: as in ``PeftModel.from_pretrained``.
        check_fingerprint: False loads onto a base whose weights differ from the recorded fingerprint.
        kwargs: passed on to ``PeftModel.from_pretrained``.

    Raises:
        ValueError / FileNotFoundError, each naming the fix: the repo is not in the cache (offline) or not on the
        Hub, an adapter of another peft method, a newer ``format_version``, a missing or corrupt
        ``adapter_model.safetensors``, a base-model fingerprint mismatch. The base model is then left unwrapped.
    """
    from peft import PeftModel

    from .tuner.config import SparseOPDConfig

    hub = {"revision": revision, "cache_dir": cache_dir, "token": token}
    hub = {k: (os.fspath(v) if k == "cache_dir" else v) for k, v in hub.items() if v is not None}
    source = os.fspath(adapter)
    config = SparseOPDConfig.from_pretrained(source, subfolder=subfolder, **hub)
    if not check_fingerprint:
        config.check_fingerprint = False
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
    return PeftModel.from_pretrained(
        base, source, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **hub, **kwargs
    )


# ---------------------------------------------------------------------------------------------------- pushing
def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a valid Hub model repo id (``org/name`` or ``name``), else raise ``ValueError``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo id {repo_id!r} is invalid ({err}); use org/name, e.g. my-org/my-adapter") from None
    return repo_id


def _adapter_roots(directory: Path) -> list[str]:
    if not directory.exists():
        raise FileNotFoundError(f"{directory}: no such adapter directory")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file; pass the adapter directory that holds {' and '.join(ADAPTER_FILES)}"
        )
    roots = [""] if (directory / ADAPTER_FILES[0]).is_file() else []
    roots += sorted(p.name for p in directory.iterdir() if p.is_dir() and (p / ADAPTER_FILES[0]).is_file())
    if not roots:
        raise FileNotFoundError(
            f"{directory}: no {ADAPTER_FILES[0]}; pass the directory written by save_adapter / model.save_pretrained "
            "/ sparse-opd train"
        )
    return roots


def plan_upload(directory: str | os.PathLike, repo_id: Optional[str] = None) -> list[tuple[str, Union[Path, bytes]]]:
    """Validate a saved SparseOPD adapter directory and list what a push uploads: ``[(path_in_repo, file or bytes)]``.

    Every adapter in it (the default one at the top, named ones in subfolders) is checked like a load would check
    it (peft method, ``format_version``, ``adapter_model.safetensors`` readable and consistent). ``README.md`` is the
    directory's card with its usage snippet pointed at ``repo_id``; a card is generated when the README is missing
    or has no SparseOPD section. Other files (optimizer state, logs, ...) are not uploaded. Nothing is written.
    """
    from huggingface_hub import ModelCard

    from .model_card import apply_card_data
    from .tuner.config import SparseOPDConfig

    directory = Path(directory)
    roots = _adapter_roots(directory)
    configs = {(root or "default"): SparseOPDConfig.from_pretrained(str(directory), subfolder=root or None)
               for root in roots}  # fmt: skip
    readme = directory / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if CARD_BEGIN not in text:
        card = ModelCard("---\n---\n" + card_block_for_directory(directory, configs, repo_id))
        first = next(iter(configs.values()))
        apply_card_data(card, first.base_model_name_or_path)
        text = merge_card(text, str(card.content)) if text else str(card.content)
    if repo_id:
        text = set_card_repo(text, repo_id)
    files: list[tuple[str, Union[Path, bytes]]] = []
    for root in roots:
        files += [((f"{root}/{name}" if root else name), directory / root / name) for name in ADAPTER_FILES]
    files.insert(len(ADAPTER_FILES) if roots[0] == "" else 0, ("README.md", text.encode("utf-8")))
    return files


def _size(source: Union[Path, bytes]) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _remote_card(api, repo_id: str, revision: Optional[str]) -> Optional[str]:
    """The repo's current README.md, or None when it has none (new repo, new branch, no card)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    rev = revision if revision and not revision.startswith("refs/pr") else None
    try:
        return Path(api.hf_hub_download(repo_id, "README.md", revision=rev)).read_text(encoding="utf-8")
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None


def push_adapter(
    adapter,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    token: Union[str, bool, None] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    dry_run: bool = False,
) -> PushResult:
    """Upload a SparseOPD adapter (a ``PeftModel`` or a saved directory) to the Hub in one commit.

    Files: ``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md`` (the model card, with the usage
    snippet pointing at ``repo_id``; an existing card on the Hub keeps its text outside the SparseOPD section),
    plus ``NAME/...`` for named adapters. The repo is created when missing (``private`` applies then), the branch
    ``revision`` too.

    Args:
        adapter: ``PeftModel`` with SparseOPD adapter(s) (saved with :func:`~sparse_opd_peft.save_adapter`, card
            included, into a temporary directory first) or a saved adapter directory (validated, never modified).
        repo_id: ``org/name`` (or ``name`` for the token's user).
        revision: target branch (default: the repo's default branch).
        private / token / create_pr / commit_message / commit_description: as ``HfApi.create_repo`` /
            ``create_commit`` take them (token default: ``HF_TOKEN`` or the stored login).
        tags: extra model-card tags.
        dry_run: validate and list the files and their sizes only; no network at all.

    Raises:
        ValueError / FileNotFoundError / NotADirectoryError for bad input (raised before any network call);
        ``huggingface_hub`` errors for network / permission failures.
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="sparse_opd_push_") as tmp:
        if isinstance(adapter, (str, os.PathLike)):
            directory = Path(adapter)
        else:
            if not sparse_opd_adapters(adapter):
                raise ValueError("push_adapter: the model holds no SparseOPD adapter; use model.push_to_hub for it")
            from .model_card import save_adapter

            directory = save_adapter(adapter, Path(tmp) / "adapter")
        files = plan_upload(directory, repo_id)
        notes = _base_model_notes(directory)
        if tags:
            files = [(p, _retag(src, tags) if p == "README.md" else src) for p, src in files]
        result = PushResult(repo_id, revision, [(p, _size(src)) for p, src in files], dry_run, warnings=notes)
        if dry_run:
            return result
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        remote = _remote_card(api, repo_id, revision)
        if remote and remote.strip():
            files = [(p, merge_card(remote, src.decode()).encode() if p == "README.md" else src) for p, src in files]
        if revision and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                      for p, src in files]  # fmt: skip
        nnz = sum(_config_nnz(directory / (p.rsplit("/", 1)[0] if "/" in p else "")) for p, _ in files
                  if p.endswith(ADAPTER_FILES[0]))  # fmt: skip
        info = api.create_commit(
            repo_id, operations=operations, commit_message=commit_message or f"Upload SparseOPD adapter ({nnz:,} "
            "trained coordinates)", commit_description=commit_description, revision=revision, create_pr=create_pr,
        )  # fmt: skip
        result.files = [(p, _size(src)) for p, src in files]
    result.repo_id, result.commit = repo_id, info
    result.commit_url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None)
    return result


def _config_nnz(root: Path) -> int:
    return sum(json.loads((root / ADAPTER_FILES[0]).read_text()).get("module_nnz", {}).values())


def _retag(readme: bytes, tags: list[str]) -> bytes:
    from huggingface_hub import ModelCard

    card = ModelCard(readme.decode(), ignore_metadata_errors=True)
    card.data["tags"] = sorted(set(card.data.get("tags") or []) | set(tags))
    return str(card.content).encode()


def _base_model_notes(directory: Path) -> list[str]:
    """Warn when the adapter records its base model as a local path (AutoPeftModel cannot find it elsewhere)."""
    base = json.loads((directory / _adapter_roots(directory)[0] / ADAPTER_FILES[0]).read_text()).get(
        "base_model_name_or_path"
    )
    if base and (os.path.isabs(base) or os.path.exists(base)):
        return [
            f"adapter_config.json records the base model as the local path {base!r}; AutoPeftModelForCausalLM will "
            "not find it on other machines: load the base from its Hub id before training, or set "
            "config.base_model_name_or_path to the Hub id and save again"
        ]
    return []
