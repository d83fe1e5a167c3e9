"""``sparse-opd inspect`` as library functions: describe a saved sparse_opd adapter (:func:`adapter_report`, as a
JSON-able dict; :func:`render_report`, as text) and summarise a merge report (:func:`merge_summary`)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Optional

from ..module_types import stats_by_type
from .sources import load_causal_lm, read_adapter_config

WEIGHTS = "adapter_model.safetensors"


def sparse_adapter_config(directory: Path, what: str):
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
    from ..tuner import SparseOPDConfig

    return SparseOPDConfig.from_pretrained(str(directory))


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


def _module_rows(config, layout: dict) -> tuple[dict[str, dict], dict[str, int]]:
    """Per-module rows of :func:`adapter_report` and the weights file's bytes per part (values, coordinates, ...)."""
    from ..module_types import module_type
    from ..tuner.model import _module_name, _split_key

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
            coded = t["dtype"] == "U8"  # format 2: an Elias-Fano / delta-varint stream
            row["packing"] = (
                "bitmask"
                if param == "sparse_opd_bitmask"
                else "coded stream"
                if coded
                else f"indices ({t['dtype'].lower()})"
            )
    for name, row in rows.items():
        row["type"] = module_type(name)
    return rows, parts


def adapter_report(directory: Path, base: Optional[str] = None, trust_remote_code: bool = False) -> dict:
    """Everything ``sparse-opd inspect`` shows, as a JSON-able dict.

    Keys: ``adapter``, ``save_dtype``, ``format_version``, ``modules`` (per module: type, shape, nnz, numel, density,
    rank, trainable, packing), ``totals`` (nnz, numel, density, trainable), ``by_type`` (per ffn / attention / other:
    modules, nnz, numel, density, share_of_nnz), ``fingerprint``, ``mask_metadata``, ``training``, ``visibility``
    (bf16 visibility with ``base``, else ``computed: False``) and ``files`` (sizes, tensors, bytes per coordinate).
    """
    config = sparse_adapter_config(directory, "ADAPTER")
    layout = _safetensors_layout(directory / WEIGHTS)
    rows, parts = _module_rows(config, layout)
    nnz = sum(r["nnz"] for r in rows.values())
    numel = sum(r["numel"] for r in rows.values())
    trainable = sum(r["trainable"] for r in rows.values())
    by_type = stats_by_type(rows, ("nnz", "numel", "trainable"))
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

    from ..tuner import bf16_visibility

    model = PeftModel.from_pretrained(load_causal_lm(base, "--base", "auto", trust_remote_code), str(directory))
    vis = bf16_visibility(model)
    by_type = stats_by_type(vis["modules"], ("coords", "visible"))
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


def merge_summary(report: dict[str, dict]) -> str:
    """One line about a sparse_opd merge report (``last_merge_report``): bf16-visible share overall and per type."""
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
        for k, a in stats_by_type(rows, ("coords", "visible")).items()
        if a["coords"]
    )
    return f"bf16-visible share of the delta {100 * share:.1f}% over {coords:,} coordinates in {len(rows)} modules ({types})"
