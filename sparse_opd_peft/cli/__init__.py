"""``sparse-opd`` command line: one typer app, its commands registered explicitly below.

The command modules only parse flags and call library functions (:mod:`sparse_opd_peft.workflow`,
:mod:`sparse_opd_peft.diagnostics`, ...), importing them inside the command bodies: ``sparse-opd --help`` and every
``sparse-opd COMMAND --help`` import no torch, transformers or peft. Every command runs inside
:func:`~.errors.cli_errors`, which turns the package's expected errors into one line ``error: ...`` on stderr and exit
code 2, with nothing written.
"""

from __future__ import annotations

import logging

import typer

from . import adapters, checkpoints, hub, toy, train
from .options import Group

app = typer.Typer(
    name="sparse-opd",
    cls=Group,
    help=(
        "Sparse on-policy-distillation adapters: diagnose how a fine-tune moved a model's weights, and extract the "
        "masks / subspaces that the SparseOPD adapter trains. Checkpoints are model directories (safetensors, "
        "sharded or not), .safetensors files, or Hub ids (org/name\\[@revision]; HF_HUB_OFFLINE=1 uses the cache)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# bitsandbytes logs, at import, a CPU notice about an optional kernel package ("Failed to load CPU gemm_4bit_forward
# ..."); it is not actionable for a command-line user, so this program (not the library) keeps it off stderr.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

checkpoints.register(app)  # diagnose, trajectory, mask, subspace
train.register(app)  # train
adapters.register(app)  # merge, inspect
hub.register(app)  # push
toy.register(app)  # demo, study


def main() -> None:
    """Console-script entry point (``sparse-opd``)."""
    app()


__all__ = ["app", "main"]
