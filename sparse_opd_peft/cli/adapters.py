"""``sparse-opd merge | inspect``: fold an adapter into its base, and describe a saved adapter."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .errors import cli_errors
from .options import TRUST_HELP, Command, MergeDtype, flag

INSPECT_EPILOG = (
    "Examples: sparse-opd inspect runs/a/adapter ;  sparse-opd inspect runs/a/adapter --base ./student "
    "(adds bf16 visibility) ;  sparse-opd inspect org/my-adapter --json > adapter.json"
)
MERGE_EPILOG = (
    "Examples: sparse-opd merge ./student runs/a/adapter --out merged/ ;  "
    "sparse-opd merge Qwen/Qwen3-0.6B runs/a/adapter --out merged-bf16/ --dtype bf16.  "
    "The merge is W <- dtype(float32(W) + ΔW), one rounding from the base's stored weights; the report says which "
    "share of the update survives bf16 rounding (keep the adapter unmerged or save fp32 when it is low)."
)


def inspect(
    adapter: str = typer.Argument(
        ..., help="Adapter directory (adapter_config.json + adapter_model.safetensors) or Hub id."
    ),
    base: str = typer.Option(None, "--base", help="Base model (directory or Hub id) to compute bf16 visibility."),
    as_json: bool = flag("--json", help="Print machine-readable JSON instead of text."),
    trust_remote_code: bool = flag("--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Describe a saved sparse_opd adapter: density overall and per module type (FFN / attention / other), per-module coordinates, base-model fingerprint, bf16 visibility (with --base) and file layout (tensors, packing, bytes per coordinate)."""  # noqa: E501
    from ..workflow.report import adapter_report, render_report
    from ..workflow.sources import adapter_dir, quiet_library_warnings

    quiet_library_warnings()
    with cli_errors():
        report = adapter_report(adapter_dir(adapter), base, trust_remote_code)
    typer.echo(json.dumps(report, indent=1, default=str) if as_json else render_report(report))


def merge(
    base: str = typer.Argument(..., help="Base model the adapter was trained on: directory or Hub id."),
    adapter: str = typer.Argument(
        ..., help="Adapter directory or Hub id (sparse_opd; LoRA and other peft adapters work too)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (new or empty, unless --overwrite)."),
    dtype: MergeDtype = typer.Option(
        MergeDtype("auto"), "--dtype", help="dtype of the saved model (auto: the base's)."
    ),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="Tokenizer to save with the model (default: the base's, if any)."
    ),
    skip_fingerprint_check: bool = flag(
        "--skip-fingerprint-check", help="Merge even if BASE differs from the base the adapter was trained on."
    ),
    trust_remote_code: bool = flag("--trust-remote-code", help=TRUST_HELP),
    overwrite: bool = flag("--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Fold ADAPTER into BASE and save a plain transformers model (safetensors) that loads without peft."""
    from ..workflow.merge import merge_adapter
    from ..workflow.sources import quiet_library_warnings

    quiet_library_warnings()
    with cli_errors():
        result = merge_adapter(
            base, adapter, out, dtype=dtype.value, tokenizer=tokenizer, skip_fingerprint_check=skip_fingerprint_check,
            trust_remote_code=trust_remote_code, overwrite=overwrite,
        )  # fmt: skip
    for message in result.lost:
        typer.echo(f"warning: {message}", err=True)
    typer.echo(f"wrote {out} ({result.dtype}{', tokenizer' if result.tokenizer else ''}): {result.summary}")


def register(app: typer.Typer) -> None:
    """Add merge and inspect to ``app``."""
    app.command(cls=Command, epilog=MERGE_EPILOG)(merge)
    app.command(cls=Command, epilog=INSPECT_EPILOG)(inspect)
