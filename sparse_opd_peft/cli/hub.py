"""``sparse-opd push``: share a saved SparseOPD adapter on the Hugging Face Hub.

The adapter directory is validated in full before any network call (peft method, ``format_version``,
``adapter_model.safetensors`` readable and consistent with ``adapter_config.json``); the upload is one commit, so a
failure leaves the repo as it was (a repo created by this push may stay empty). Nothing is written locally.
"""

from __future__ import annotations

from pathlib import Path

import typer

from .errors import EXPECTED_ERRORS, cli_errors, fail
from .options import Command, flag


def _upload_failure(repo_id: str, err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return (
        f"upload to {repo_id} failed ({type(err).__name__}: {first}); check the repo id and that your token may "
        "write to it (--token, HF_TOKEN or `hf auth login`), that HF_HUB_OFFLINE is unset and the Hub is reachable; "
        "--dry-run checks the adapter without network"
    )


PUSH_EPILOG = (
    "Examples: sparse-opd push runs/adapter my-org/qwen3-sparse-opd --dry-run (validate, list files and sizes, "
    "no network); sparse-opd push runs/adapter my-org/qwen3-sparse-opd --branch v1 --private. Load it back with "
    'PeftModel.from_pretrained(base, "my-org/qwen3-sparse-opd", revision="v1") after `import sparse_opd_peft`.'
)


def push(
    adapter: Path = typer.Argument(
        ...,
        help="Saved adapter directory (adapter_config.json + adapter_model.safetensors, as written by save_adapter, "
        "model.save_pretrained or sparse-opd train).",
    ),
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. my-org/my-adapter (created if it does not exist)."),
    revision: str = typer.Option(
        None, "--revision", "--branch", help="Branch to push to (created if missing). Default: the main branch."
    ),
    private: bool = flag("--private", help="Create the repo as private (no effect if it exists)."),
    commit_message: str = typer.Option(None, "--commit-message", "-m", help="Commit message (default: a summary)."),
    token: str = typer.Option(
        None, "--token", help="Hub token with write access (default: $HF_TOKEN or the `hf auth login` token)."
    ),
    create_pr: bool = flag("--create-pr", help="Open a pull request instead of committing directly."),
    dry_run: bool = flag(
        "--dry-run", help="Validate the adapter and print the files and sizes that would be uploaded; no network."
    ),
) -> None:
    """Upload a SparseOPD adapter to the Hub: adapter_config.json, adapter_model.safetensors and its model card (README.md, usage snippet pointed at REPO_ID), in one commit."""  # noqa: E501
    from ..hub import push_adapter
    from ..model_card import human_bytes

    with cli_errors():
        try:
            result = push_adapter(
                adapter, repo_id, revision=revision, private=True if private else None, commit_message=commit_message,
                token=token, create_pr=create_pr, dry_run=dry_run,
            )  # fmt: skip
        except EXPECTED_ERRORS:
            raise
        except Exception as err:  # noqa: BLE001 - huggingface_hub / HTTP failures become one clear line
            fail(_upload_failure(repo_id, err))
    for note in result.warnings:
        typer.echo("warning: " + note, err=True)
    target = f"{result.repo_id}" + (f" (branch {result.revision})" if result.revision else "")
    width = max(len(p) for p, _ in result.files)
    lines = [f"  {p:<{width}}  {size:>12,} bytes  ({human_bytes(size)})" for p, size in result.files]
    total = sum(size for _, size in result.files)
    if result.dry_run:
        typer.echo(f"dry run: would upload {len(result.files)} files ({human_bytes(total)}) to {target}:")
        typer.echo("\n".join(lines))
        return
    typer.echo(f"uploaded {len(result.files)} files ({human_bytes(total)}) to {target}:")
    typer.echo("\n".join(lines))
    if result.commit_url:
        typer.echo(f"commit: {result.commit_url}")


def register(app: typer.Typer) -> None:
    """Add push to ``app``."""
    app.command(cls=Command, epilog=PUSH_EPILOG)(push)
