"""Early update subspaces: top-r right singular vectors of ``ΔW_t = W_t − W0`` per module.

The paper (section 4.2) extracts ``V_16`` from the cumulative update around 20 % of training and constrains later
updates to its row space (``g ← g V Vᵀ``). :func:`subspace_from_checkpoints` computes those bases; they plug into
``SparseOPDConfig(subspace=...)`` directly or through :func:`save_subspace` / :func:`load_subspace` (safetensors,
one tensor per module named by the module name).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..diagnostics.engine import resolve_device
from ..diagnostics.metrics import check_finite
from ..diagnostics.sources import module_name, open_source, paired_weights
from ..diagnostics.spectral import svd_topk
from ..safetensors_io import atomic_save_safetensors, load_safetensors_checked

SUBSPACE_FORMAT = "sparse_opd_subspace"
SUBSPACE_FORMAT_VERSION = 1
ORTHO_TOL = 1e-4


def subspace_from_checkpoints(
    source,
    early,
    rank: int = 16,
    *,
    modules: str | Iterable[str] | None = None,
    device: str = "auto",
    method: str = "auto",
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Top-``rank`` right singular vectors of ``ΔW = W_early − W0`` for every selected module.

    Args:
        source: W0 - model directory, ``.safetensors`` file, Hub id or ``nn.Module``. early: the early checkpoint.
        rank: r (16 in the paper); must not exceed min(out, in) of any selected module.
        modules: None (block Linear layers), a regex or a list of module names.
        device: ``"cpu"`` | ``"cuda"`` | ``"auto"`` for the float64 linear algebra. method: see ``svd_topk``.

    Returns:
        ``{module_name: float32 tensor (in_features, rank)}`` with orthonormal columns. Modules whose ΔW is exactly
        zero are skipped with a warning; when ΔW has fewer than ``rank`` nonzero singular values, the basis is
        completed with deterministic orthonormal directions (they carry no early update energy).

    Raises:
        ValueError: rank too large, mismatched checkpoints, non-finite weights, or ΔW = 0 in every module.
    """
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    dev = resolve_device(device)
    basis: dict[str, torch.Tensor] = {}
    skipped = []
    src, tun = open_source(source), open_source(early)
    with src, tun:
        names = paired_weights(src, tun, modules)
        for n in names:
            if int(rank) > min(src.shape(n)):
                raise ValueError(
                    f"rank {rank} exceeds min(out, in) = {min(src.shape(n))} of module '{module_name(n)}'; "
                    "lower --rank or narrow --modules"
                )
        for n in tqdm(names, desc="subspace", disable=not progress):
            w0, w1 = src.get(n), tun.get(n)
            check_finite(w0, f"{src.location(n)}: tensor '{n}'")
            check_finite(w1, f"{tun.location(n)}: tensor '{n}'")
            delta = w1.to(dev, torch.float64) - w0.to(dev, torch.float64)
            if not bool(delta.any()):
                skipped.append(module_name(n))
                continue
            basis[module_name(n)] = svd_topk(delta, int(rank), method=method).V.float().cpu().contiguous()
        labels = (src.label, tun.label)
    if not basis:
        raise ValueError(f"{labels[1]} equals {labels[0]} in every selected module; pass an early *trained* checkpoint")
    if skipped:
        warnings.warn(f"ΔW is zero in {len(skipped)} module(s) (e.g. {skipped[0]}); no subspace for them", stacklevel=2)
    return basis


def _validate(basis: Mapping[str, torch.Tensor], where: str) -> None:
    if not basis:
        raise ValueError(f"{where}: the subspace is empty (no module)")
    for name, v in basis.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or not v.dtype.is_floating_point:
            raise ValueError(f"{where}: basis of module '{name}' must be a 2-D float tensor (in_features, r)")
        check_finite(v, f"{where}: basis of module '{name}'")
        gram = v.double().T @ v.double()
        err = float((gram - torch.eye(v.shape[1], dtype=torch.float64)).abs().max()) if v.shape[1] else 0.0
        if v.shape[1] == 0 or v.shape[1] > v.shape[0] or err > ORTHO_TOL:
            raise ValueError(
                f"{where}: basis of module '{name}' (shape {tuple(v.shape)}) does not have orthonormal columns "
                f"(max |VᵀV − I| = {err:.2e}); rebuild it with subspace_from_checkpoints"
            )


def save_subspace(
    basis: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping | None = None, overwrite: bool = True
) -> Path:
    """Write ``{module_name: (in_features, r) orthonormal float tensor}`` to safetensors atomically; returns the path.

    Raises:
        FileExistsError: when ``path`` exists and ``overwrite`` is False. ValueError: for a malformed basis.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _validate(basis, str(path))
    meta = {
        "format": SUBSPACE_FORMAT,
        "format_version": str(SUBSPACE_FORMAT_VERSION),
        "metadata": json.dumps(dict(metadata or {})),
    }
    atomic_save_safetensors({n: v.detach().float().cpu().contiguous() for n, v in basis.items()}, path, metadata=meta)
    return path


def load_subspace(path: str | os.PathLike, with_metadata: bool = False):
    """Read a file written by :func:`save_subspace`.

    Returns:
        ``{module_name: float32 tensor (in_features, r)}``, or ``(basis, metadata dict)`` with ``with_metadata``.

    Raises:
        FileNotFoundError / ValueError: missing, corrupt or foreign file, or non-orthonormal bases (naming the file).
    """
    tensors, meta = load_safetensors_checked(path)
    if meta.get("format") != SUBSPACE_FORMAT:
        raise ValueError(f"{path}: not a sparse_opd_peft subspace file (metadata 'format' is {meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > SUBSPACE_FORMAT_VERSION:
        raise ValueError(f"{path}: subspace format version {meta['format_version']} is newer; upgrade sparse_opd_peft")
    _validate(tensors, str(path))
    if not with_metadata:
        return tensors
    try:
        return tensors, json.loads(meta.get("metadata", "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: subspace metadata is corrupt ({err})") from None
