"""Shared option types, help texts and argument parsing of the ``sparse-opd`` commands.

The choice types are built from the library's own tuples (:mod:`sparse_opd_peft.choices`) and the mask-rule
registry (:mod:`sparse_opd_peft.masks.rules`), so the command line
accepts exactly what the library does. Nothing here imports torch.
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import typer

from ..choices import (
    BASELINES,
    DEVICES,
    LOSSES,
    LR_SCHEDULES,
    MODEL_DTYPES,
    OPTIMIZERS,
    SAVE_DTYPES,
    TOKEN_KEEP,
)
from ..masks.rules import RULES
from ..module_types import MODULE_TYPES


def choice(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A ``str`` enum whose members are ``values`` (typer's choice type), e.g. ``choice("Loss", LOSSES)``."""
    return Enum(name, [(v, v) for v in values], type=str, module=__name__)


Device = choice("Device", DEVICES)
Rule = choice("Rule", tuple(RULES))  # the mask-rule registry
Loss = choice("Loss", LOSSES)
Baseline = choice("Baseline", BASELINES)
Optim = choice("Optim", OPTIMIZERS)
Schedule = choice("Schedule", LR_SCHEDULES)
TokenKeep = choice("TokenKeep", TOKEN_KEEP)
ModelDtype = choice("ModelDtype", MODEL_DTYPES)
MergeDtype = choice("MergeDtype", ("auto", *MODEL_DTYPES))
SaveDtype = choice("SaveDtype", SAVE_DTYPES)

RULE_HELP = "; ".join(f"{r.name}: {r.help}" for r in RULES.values()) + "."
SOURCE_HELP = "Source checkpoint W0: model directory, .safetensors file or Hub id."
MODULES_HELP = (
    "Regex on module names (e.g. 'mlp' or 'layers\\.(0|1)\\.'); repeat to combine. Default: all block Linears."
)
TRUST_HELP = "Allow model code from the checkpoint's repository to run (off by default; only for sources you trust)."


class _BareHelp:
    """Show ``--help`` as a bare flag too (typer gives it a ``<bool>`` placeholder)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Command(_BareHelp, typer.core.TyperCommand):
    """Command class of every ``sparse-opd`` command (``app.command(cls=Command)``)."""


class Group(_BareHelp, typer.core.TyperGroup):
    """Group class of the ``sparse-opd`` app (``typer.Typer(cls=Group)``)."""


def flag(*decls: str, help: str) -> bool:
    """An on/off option (default off) shown as a bare flag in ``--help`` (no ``<bool>`` value placeholder)."""
    return typer.Option(False, *decls, help=help, metavar="")


def quiet_flag(help: str = "No progress bar.") -> bool:
    return flag("--quiet", "-q", help=help)


def modules_regex(modules: list[str] | None) -> str | None:
    """Repeated ``--modules`` patterns -> one regex (a module matches when any pattern is found in its name)."""
    if not modules:
        return None
    for m in modules:
        try:
            re.compile(m)
        except re.error as err:
            raise ValueError(f"--modules {m!r} is not a valid regular expression ({err})") from None
    return "|".join(f"(?:{m})" for m in modules)


def type_overrides(rules: list[str] | None) -> dict[str, str] | None:
    """``["regex=ffn", ...]`` -> ordered ``{regex: type}`` (see ``sparse_opd_peft.module_type``)."""
    out = {}
    for rule in rules or []:
        pattern, sep, kind = rule.rpartition("=")
        if not sep or not pattern or kind not in MODULE_TYPES:
            raise ValueError(f"--module-type {rule!r}: use REGEX=TYPE with TYPE one of {', '.join(MODULE_TYPES)}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"--module-type {rule!r}: invalid regular expression ({err})") from None
        out[pattern] = kind
    return out or None


def check_file_target(out: Path, overwrite: bool) -> None:
    """``--out`` of a one-file command: not a directory, and new unless ``overwrite``."""
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; --out takes a file path such as {out / 'mask.safetensors'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
