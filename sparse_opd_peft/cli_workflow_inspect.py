"""``sparse-opd merge`` and ``sparse-opd inspect``: fold an adapter into its base, and describe a saved adapter."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path
from typing import Optional

import typer

from .cli import app, cli_errors
from .cli_workflow import (
    TRUST_HELP,
    MergeDtype,
    adapter_dir,
    check_out_dir,
    has_tokenizer,
    load_causal_lm,
    load_tokenizer,
    quiet_library_warnings,
    read_adapter_config,
    resolve_source,
    staged_dir,
    torch_dtype,
)

WEIGHTS = "adapter_model.safetensors"


def _sparse_config(directory: Path, what: str):
    """``SparseOPDConfig`` of a saved adapter (format version and weights file checked), or ``ValueError`` for an
    adapter of another peft method."""
    kind = read_adapter_config(directory)["peft_type"]
    if kind != "SPARSE_OPD":
        raise ValueError(
            f"{what} {directory} is a {kind} adapter, not a sparse_opd one; this command reads SPARSE_OPD adapters "
            "(written by sparse-opd train --mask / --subspace or save_adapter)"
        )
    if not (directory / WEIGHTS).is_file():
        raise FileNotFoundError(f"{what} {directory}: {WEIGHTS} is missing; re-save or re-download the adapter")
    from .tuner import SparseOPDConfig

    return SparseOPDConfig.from_pretrained(str(directory))


def _by_type(rows: dict[str, dict], keys: tuple[str, ...]) -> dict[str, dict]:
    """Sum ``keys`` of per-module rows per module type (ffn / attention / other)."""
    from .module_types import MODULE_TYPES, module_type

    out = {t: {"modules": 0, **{k: 0 for k in keys}} for t in MODULE_TYPES}
    for name, row in rows.items():
        agg = out[module_type(name)]
        agg["modules"] += 1
        for k in keys:
            agg[k] += row[k]
    return out


def _safetensors_layout(path: Path) -> dict:
    """Tensor names, dtypes, shapes and byte counts of a safetensors file, read from its header only."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    tensors = [
        {"name": k, "dtype": v["dtype"], "shape": v["shape"], "bytes": v["data_offsets"][1] - v["data_offsets"][0]}
        for k, v in sorted(header.items())
        if k != "__metadata__"
    ]
    return {"header_bytes": 8 + n, "tensors": tensors, "metadata": header.get("__metadata__", {})}


def adapter_report(directory: Path, base: Optional[str] = None, trust_remote_code: bool = False) -> dict:
    """Everything ``sparse-opd inspect`` shows, as a JSON-able dict.

    Keys: ``adapter``, ``save_dtype``, ``format_version``, ``modules`` (per module: type, shape, nnz, numel, density,
    rank, trainable, packing), ``totals`` (nnz, numel, density, trainable), ``by_type`` (per ffn / attention / other:
    modules, nnz, numel, density, share_of_nnz), ``fingerprint``, ``mask_metadata``, ``training``, ``visibility``
    (bf16 visibility with ``base``, else ``computed: False``) and ``files`` (sizes, tensors, bytes per coordinate).
    """
    from .tuner.model import _module_name, _split_key

    config = _sparse_config(directory, "ADAPTER")
    layout = _safetensors_layout(directory / WEIGHTS)
    rows: dict[str, dict] = {}
    for name, (o, i) in sorted(config.module_shapes.items()):
        nnz, rank = int(config.module_nnz.get(name, 0)), int(config.module_rank.get(name, 0))
        rows[name] = {
            "shape": [o, i],
            "nnz": nnz,
            "numel": o * i if nnz else 0,
            "density": nnz / (o * i),
            "rank": rank,
            "trainable": nnz + o * rank,
            "packing": None,
        }
    parts = {"values": 0, "coordinates": 0, "basis": 0, "other": 0}
    for t in layout["tensors"]:
        module, param, _ = _split_key(t["name"])
        kind = {
            "sparse_opd_values": "values",
            "sparse_opd_coeff": "values",
            "sparse_opd_basis": "basis",
            "sparse_opd_bitmask": "coordinates",
            "sparse_opd_indices": "coordinates",
        }.get(param, "other")
        parts[kind] += t["bytes"]
        row = rows.get(_module_name(module))
        if row is not None and kind == "coordinates":
            row["packing"] = "bitmask" if param == "sparse_opd_bitmask" else f"indices ({t['dtype'].lower()})"
    from .module_types import module_type

    for name, row in rows.items():
        row["type"] = module_type(name)
    nnz = sum(r["nnz"] for r in rows.values())
    numel = sum(r["numel"] for r in rows.values())
    trainable = sum(r["trainable"] for r in rows.values())
    by_type = _by_type(rows, ("nnz", "numel", "trainable"))
    for agg in by_type.values():
        agg["density"] = agg["nnz"] / agg["numel"] if agg["numel"] else 0.0
        agg["share_of_nnz"] = agg["nnz"] / nnz if nnz else 0.0
    files = [{"name": p.name, "bytes": p.stat().st_size} for p in sorted(directory.iterdir()) if p.is_file()]
    size = (directory / WEIGHTS).stat().st_size
    fp = config.fingerprint or {}
    return {
        "adapter": str(directory),
        "peft_type": "SPARSE_OPD",
        "format_version": config.format_version,
        "save_dtype": config.save_dtype,
        "modules": rows,
        "totals": {
            "modules": len(rows),
            "nnz": nnz,
            "numel": numel,
            "density": nnz / numel if numel else 0.0,
            "trainable": trainable,
            "subspace_modules": sum(1 for r in rows.values() if r["rank"]),
        },
        "by_type": by_type,
        "fingerprint": {
            "base_model": config.base_model_name_or_path,
            "revision": config.revision,
            "modules": len(fp),
            "hash": "full" if fp and all(v.get("full_sha256") for v in fp.values()) else "sample",
            "digest": hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16],
            "checked_on_load": bool(config.check_fingerprint),
            "per_module": fp,
        },
        "mask_metadata": config.mask_metadata,
        "training": getattr(config, "training", None),
        "visibility": _visibility(directory, base, trust_remote_code)
        if base
        else {"computed": False, "reason": "needs the base model's weights: pass --base BASE"},
        "files": {
            "files": files,
            "tensors": layout["tensors"],
            "header_bytes": layout["header_bytes"],
            "bytes_by_part": parts,
            "weights_bytes": size,
            "bytes_per_coordinate": size / trainable if trainable else None,
            "value_bytes_per_coordinate": parts["values"] / trainable if trainable else None,
            "coordinate_bytes_per_coordinate": parts["coordinates"] / nnz if nnz else None,
        },
    }


def _visibility(directory: Path, base: str, trust_remote_code: bool) -> dict:
    from peft import PeftModel

    from .tuner import bf16_visibility

    model = PeftModel.from_pretrained(load_causal_lm(base, "--base", "auto", trust_remote_code), str(directory))
    vis = bf16_visibility(model)
    by_type = _by_type(vis["modules"], ("coords", "visible"))
    for agg in by_type.values():
        agg["share"] = agg["visible"] / agg["coords"] if agg["coords"] else None
    return {
        "computed": True,
        "base": base,
        "coords": vis["coords"],
        "visible": vis["visible"],
        "share": vis["share"],
        "by_type": by_type,
        "modules": vis["modules"],
    }


def _kb(n: int) -> str:
    return f"{n:,} B" if n < 10_000 else f"{n / 1024:,.1f} KiB" if n < 10 * 2**20 else f"{n / 2**20:,.1f} MiB"


def render_report(r: dict) -> str:
    """Human-readable text of :func:`adapter_report`."""
    t, fp, f = r["totals"], r["fingerprint"], r["files"]
    lines = [
        f"adapter {r['adapter']}: SPARSE_OPD (format {r['format_version']}), values saved as {r['save_dtype']}",
        f"trained: {t['nnz']:,} coordinates in {t['modules']} modules, density {t['density']:.4f}"
        + (f" (+ subspace in {t['subspace_modules']} modules)" if t["subspace_modules"] else "")
        + f"; {t['trainable']:,} trainable parameters",
    ]
    for kind, a in r["by_type"].items():
        if a["modules"]:
            lines.append(
                f"  {kind:<9} {a['modules']:>3} modules  nnz {a['nnz']:>12,}  density {a['density']:.4f}  "
                f"share of coordinates {100 * a['share_of_nnz']:.1f}%"
            )
    lines.append(
        f"base model: {fp['base_model'] or '(not recorded)'}"
        + (f" @ {fp['revision']}" if fp["revision"] else "")
        + f"; fingerprint {fp['digest']} ({fp['hash']} hash of {fp['modules']} weights, "
        f"{'checked' if fp['checked_on_load'] else 'not checked'} on load)"
    )
    if r["mask_metadata"]:
        lines.append("mask: " + ", ".join(f"{k}={v}" for k, v in r["mask_metadata"].items()))
    if r["training"]:
        lines.append("training: " + ", ".join(f"{k}={v}" for k, v in r["training"].items() if not isinstance(v, dict)))
    v = r["visibility"]
    if v["computed"]:
        types = ", ".join(f"{k} {100 * a['share']:.1f}%" for k, a in v["by_type"].items() if a["coords"])
        lines.append(
            f"bf16 visibility: {100 * v['share']:.1f}% of {v['coords']:,} coordinates survive a bf16 merge ({types})"
        )
    else:
        lines.append(f"bf16 visibility: not computed ({v['reason']})")
    lines.append("files: " + ", ".join(f"{x['name']} {_kb(x['bytes'])}" for x in f["files"]))
    parts = ", ".join(f"{k} {_kb(b)}" for k, b in f["bytes_by_part"].items() if b)
    lines.append(f"{WEIGHTS}: {len(f['tensors'])} tensors, header {_kb(f['header_bytes'])}, {parts}")
    if f["bytes_per_coordinate"] is not None:
        lines.append(
            f"  {f['bytes_per_coordinate']:.2f} bytes per trained parameter (values "
            f"{f['value_bytes_per_coordinate']:.2f}, coordinates "
            f"{f['coordinate_bytes_per_coordinate'] or 0:.2f}; bitmask = 1 bit per weight entry, used at "
            "density >= 1/32, else int32 indices = 4 bytes per coordinate)"
        )
    suffixes: dict[str, list] = {}
    for x in f["tensors"]:
        suffixes.setdefault(x["name"].rsplit(".", 1)[-1], []).append(x)
    for suffix, xs in suffixes.items():
        lines.append(
            f"  *.{suffix}: {len(xs)} tensors, {'/'.join(sorted({x['dtype'] for x in xs}))}, "
            f"{_kb(sum(x['bytes'] for x in xs))}"
        )
    lines.append("modules:")
    for name, m in r["modules"].items():
        vis = v["modules"].get(name) if v["computed"] else None
        lines.append(
            f"  {name}  {m['type']}  {m['shape'][0]}x{m['shape'][1]}  nnz {m['nnz']:,}  density "
            f"{m['density']:.4f}"
            + (f"  rank {m['rank']}" if m["rank"] else "")
            + (f"  {m['packing']}" if m["packing"] else "")
            + (f"  bf16-visible {100 * vis['share']:.1f}%" if vis else "")
        )
    return "\n".join(lines)


@app.command(
    epilog="Examples: sparse-opd inspect runs/a/adapter ;  sparse-opd inspect runs/a/adapter --base ./student "
    "(adds bf16 visibility) ;  sparse-opd inspect org/my-adapter --json > adapter.json"
)
def inspect(
    adapter: str = typer.Argument(
        ..., help="Adapter directory (adapter_config.json + adapter_model.safetensors) or Hub id."
    ),
    base: str = typer.Option(None, "--base", help="Base model (directory or Hub id) to compute bf16 visibility."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of text."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
) -> None:
    """Describe a saved sparse_opd adapter: density overall and per module type (FFN / attention / other), per-module coordinates, base-model fingerprint, bf16 visibility (with --base) and file layout (tensors, packing, bytes per coordinate)."""  # noqa: E501
    quiet_library_warnings()
    with cli_errors():
        report = adapter_report(adapter_dir(adapter), base, trust_remote_code)
    typer.echo(json.dumps(report, indent=1, default=str) if as_json else render_report(report))


def _stored_dtype(ref: str, revision: Optional[str], trust_remote_code: bool):
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(ref, revision=revision, trust_remote_code=trust_remote_code)
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _merge_summary(report: dict[str, dict]) -> str:
    rows = {}
    for per_adapter in report.values():
        for name, row in per_adapter.items():
            rows[name.removeprefix("base_model.model.")] = {
                "coords": row["coords"],
                "visible": row["share"] * row["coords"],
            }
    coords = sum(r["coords"] for r in rows.values())
    if not coords:
        return "no merge report"
    share = sum(r["visible"] for r in rows.values()) / coords
    types = ", ".join(
        f"{k} {100 * a['visible'] / a['coords']:.1f}%"
        for k, a in _by_type(rows, ("coords", "visible")).items()
        if a["coords"]
    )
    return f"bf16-visible share of the delta {100 * share:.1f}% over {coords:,} coordinates in {len(rows)} modules ({types})"


@app.command(
    epilog="Examples: sparse-opd merge ./student runs/a/adapter --out merged/ ;  "
    "sparse-opd merge Qwen/Qwen3-0.6B runs/a/adapter --out merged-bf16/ --dtype bf16.  "
    "The merge is W <- dtype(float32(W) + ΔW), one rounding from the base's stored weights; the report says which "
    "share of the update survives bf16 rounding (keep the adapter unmerged or save fp32 when it is low)."
)
def merge(
    base: str = typer.Argument(..., help="Base model the adapter was trained on: directory or Hub id."),
    adapter: str = typer.Argument(
        ..., help="Adapter directory or Hub id (sparse_opd; LoRA and other peft adapters work too)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (new or empty, unless --overwrite)."),
    dtype: MergeDtype = typer.Option(MergeDtype.auto, "--dtype", help="dtype of the saved model (auto: the base's)."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="Tokenizer to save with the model (default: the base's, if any)."
    ),
    skip_fingerprint_check: bool = typer.Option(
        False, "--skip-fingerprint-check", help="Merge even if BASE differs from the base the adapter was trained on."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help=TRUST_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out directory."),
) -> None:
    """Fold ADAPTER into BASE and save a plain transformers model (safetensors) that loads without peft."""
    quiet_library_warnings()
    with cli_errors():
        check_out_dir(out, overwrite)
        directory = adapter_dir(adapter)
        kind = read_adapter_config(directory)["peft_type"]
        if kind == "SPARSE_OPD":
            config = _sparse_config(directory, "ADAPTER")
            config.check_fingerprint = not skip_fingerprint_check
        else:
            from peft import PeftConfig

            config = PeftConfig.from_pretrained(str(directory))
        ref, revision = resolve_source(base, "BASE")
        target = None if dtype is MergeDtype.auto else torch_dtype(dtype.value)
        import torch

        # Merge from the stored weights in their own dtype when no cast is asked, else in float32 and cast once.
        load_dtype = (
            "auto" if target is None or _stored_dtype(ref, revision, trust_remote_code) == target else torch.float32
        )
        base_model = load_causal_lm(base, "BASE", load_dtype, trust_remote_code)
        tok = None
        if tokenizer or has_tokenizer(base):
            try:
                tok = load_tokenizer(tokenizer or base, "--tokenizer" if tokenizer else "BASE", trust_remote_code)
            except (OSError, ValueError):
                if tokenizer or Path(base).expanduser().is_dir():
                    raise
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(base_model, str(directory), config=config)
        except ValueError as err:
            if "base model mismatch" in str(err):
                raise ValueError(f"{err} (sparse-opd merge: --skip-fingerprint-check)") from None
            raise
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = model.merge_and_unload()
        report = getattr(model.base_model, "last_merge_report", None) if kind == "SPARSE_OPD" else None
        if target is not None:
            merged = merged.to(target)
        out_dtype = next(merged.parameters()).dtype
        with staged_dir(out) as tmp:
            merged.save_pretrained(tmp)
            if tok is not None:
                tok.save_pretrained(tmp)
    for w in caught:
        lost = str(w.message).startswith("merging lost")
        if lost and out_dtype == torch.bfloat16:
            typer.echo(f"warning: {w.message}", err=True)
        elif not lost:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    summary = _merge_summary(report) if report is not None else f"merged a {kind} adapter (no visibility report)"
    note = "" if out_dtype == torch.bfloat16 or report is None else " (matters when the weights are cast to bf16)"
    typer.echo(
        f"wrote {out} ({str(out_dtype).removeprefix('torch.')}{', tokenizer' if tok is not None else ''}): "
        f"{summary}{note}"
    )
