"""Builders of :class:`~sparse_opd_peft.masks.SparseMask` objects from checkpoints and priors.

* :func:`mask_from_checkpoints` - coordinates an update moved, from a (source, tuned) checkpoint pair:
  ``"bf16_visible"`` (``|bf16(W₊) − bf16(W0)| > η·max(|·|, |·|)``, η = 1e-3), ``"abs_threshold"`` (``|ΔW| >= 1e-5``,
  float32 ΔW) or ``"topk"`` (largest ``|ΔW|`` at a global or per-module density, optionally with a fixed share of the
  budget for FFN modules);
* :func:`random_like` - uniform random control with the same per-module coordinate counts;
* :func:`low_magnitude` - bottom-α ``|W0|`` per module (the paper's low-magnitude mask).

All builders stream weights one module at a time (see :mod:`sparse_opd_peft.diagnostics.sources`); module names are
module names without ``.weight`` (``model.layers.0.mlp.up_proj``), as in ``model.named_modules()``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .choices import MASK_RULES
from .diagnostics.metrics import (
    ABS_THRESHOLD,
    ETA,
    abs_changed_mask,
    bf16_visible_mask,
    check_finite,
    top_fraction_mask,
)
from .diagnostics.sources import module_name, open_source, paired_weights, select_weights
from .masks import SparseMask
from .module_types import module_type

RULES = MASK_RULES
_CACHE_LIMIT = 250_000_000  # |ΔW| entries kept in memory between top-k passes (1 GB); above it, weights are re-read
_HI_BINS = 1 << 15  # non-negative finite float32 bit patterns >> 16 are < 0x7F80


def _flat_indices(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(-1).nonzero().squeeze(1).cpu()


def _abs_delta(src, tun, name: str) -> torch.Tensor:
    w0, w1 = src.get(name), tun.get(name)
    check_finite(w0, f"{src.location(name)}: tensor '{name}'")
    check_finite(w1, f"{tun.location(name)}: tensor '{name}'")
    return (w1.float() - w0.float()).abs().reshape(-1).cpu()


def _check_args(rule: str, density, ffn_share, per_module: bool) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown mask rule {rule!r}; use one of {', '.join(RULES)}")
    if rule != "topk":
        if density is not None or ffn_share is not None or per_module:
            raise ValueError(f"density / ffn_share / per_module apply to rule='topk' only, not rule={rule!r}")
        return
    if density is None or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"rule='topk' needs a density in (0, 1], got {density!r} (e.g. --density 0.05)")
    if ffn_share is not None and not 0.0 <= float(ffn_share) <= 1.0:
        raise ValueError(f"ffn_share must be in [0, 1], got {ffn_share!r}")
    if ffn_share is not None and per_module:
        raise ValueError("ffn_share and per_module=True exclude each other: per-module budgets are fixed per module")


def _global_topk(src, tun, names: list[str], groups: dict[str, int], group_of: Mapping[str, str], progress: bool):
    """Exact top-``budget`` |ΔW| per group over all its modules; ties broken by (module order, flat index).

    Three streaming passes over the modules (a histogram of the high 16 bits of the float32 bit pattern, then of
    the low 16 bits inside the threshold bin, then selection); |ΔW| stays cached between passes when it fits.
    """
    total = sum(src.shape(n)[0] * src.shape(n)[1] for n in names)
    cache: dict[str, torch.Tensor] | None = {} if total <= _CACHE_LIMIT else None

    def bits(name: str) -> torch.Tensor:
        if cache is not None and name in cache:
            return cache[name]
        b = _abs_delta(src, tun, name).view(torch.int32)
        if cache is not None:
            cache[name] = b
        return b

    def threshold(hist: torch.Tensor, budget: int) -> tuple[int, int]:
        """Bin b with count(> b) < budget <= count(>= b); returns (b, budget - count(> b))."""
        above = torch.cumsum(hist.flip(0), 0).flip(0)  # above[i] = count(>= i)
        b = int((above >= budget).nonzero().max())
        return b, budget - (int(above[b + 1]) if b + 1 < hist.numel() else 0)

    hi_hist = {g: torch.zeros(_HI_BINS, dtype=torch.int64) for g in groups}
    for n in tqdm(names, desc="mask pass 1/3", disable=not progress):
        hi_hist[group_of[n]] += torch.bincount(bits(n) >> 16, minlength=_HI_BINS)
    hi = {g: threshold(hi_hist[g], b) for g, b in groups.items() if b > 0}
    lo_hist = {g: torch.zeros(1 << 16, dtype=torch.int64) for g in hi}
    for n in tqdm(names, desc="mask pass 2/3", disable=not progress):
        g = group_of[n]
        if g in hi:
            b = bits(n)
            lo_hist[g] += torch.bincount(b[(b >> 16) == hi[g][0]] & 0xFFFF, minlength=1 << 16)
    cut = {}
    for g, (hb, need) in hi.items():
        lb, ties = threshold(lo_hist[g], need)
        cut[g] = [(hb << 16) | lb, ties]  # exact bit pattern of the threshold and how many ties to take
    out = {}
    for n in tqdm(names, desc="mask pass 3/3", disable=not progress):
        g = group_of[n]
        if g not in cut:
            continue
        b = bits(n)
        sel = b > cut[g][0]
        tie_idx = (b == cut[g][0]).nonzero().squeeze(1)[: cut[g][1]]
        cut[g][1] -= tie_idx.numel()
        sel[tie_idx] = True
        out[n] = sel.nonzero().squeeze(1)
    return out


def mask_from_checkpoints(
    source,
    tuned,
    rule: str = "bf16_visible",
    *,
    density: float | None = None,
    ffn_share: float | None = None,
    per_module: bool = False,
    modules: str | Iterable[str] | None = None,
    eta: float = ETA,
    abs_threshold: float = ABS_THRESHOLD,
    type_overrides: Mapping[str, str] | None = None,
    progress: bool = False,
) -> SparseMask:
    """Mask of the coordinates an update moved between two checkpoints.

    Args:
        source: W0 - model directory, ``.safetensors`` file, Hub id or ``nn.Module``. tuned: W₊, same kinds.
        rule: ``"bf16_visible"`` | ``"abs_threshold"`` | ``"topk"`` (see module docstring).
        density: fraction of coordinates for ``"topk"`` (global over the selected modules unless ``per_module``).
        ffn_share: for global ``"topk"``: fraction of the coordinate budget given to FFN modules (the rest goes to
            attention / other modules); None = one global ranking.
        per_module: ``"topk"`` with ``round(density · numel)`` coordinates in every module.
        modules: None (block Linear layers), a regex, or a list of module names.
        eta / abs_threshold: tolerances of the first two rules. type_overrides: module-type rules (``module_type``).
        progress: show progress bars.

    Returns:
        :class:`SparseMask` over the modules with at least one selected coordinate; ``metadata`` records
        source, tuned, rule, density (requested and achieved) and ffn_share.

    Raises:
        ValueError / FileNotFoundError: bad arguments, missing or mismatched checkpoints, non-finite weights, a
            budget larger than the modules, or no coordinate selected at all.
    """
    _check_args(rule, density, ffn_share, per_module)
    src, tun = open_source(source), open_source(tuned)
    entries: dict[str, tuple[tuple[int, int], torch.Tensor]] = {}
    with src, tun:
        names = paired_weights(src, tun, modules)
        shapes = {n: tuple(src.shape(n)) for n in names}
        if rule == "topk" and not per_module:
            numel = {n: shapes[n][0] * shapes[n][1] for n in names}
            budget = int(round(float(density) * sum(numel.values())))
            if ffn_share is None:
                group_of, groups = dict.fromkeys(names, "all"), {"all": budget}
            else:
                group_of = {n: "ffn" if module_type(n, type_overrides) == "ffn" else "rest" for n in names}
                groups = {"ffn": int(round(float(ffn_share) * budget))}
                groups["rest"] = budget - groups["ffn"]
                for g, b in groups.items():
                    cap = sum(numel[n] for n in names if group_of[n] == g)
                    if b > cap:
                        kind = "FFN" if g == "ffn" else "non-FFN"
                        raise ValueError(
                            f"ffn_share={ffn_share} asks for {b} {kind} coordinates but the selected {kind} modules "
                            f"have only {cap}; lower --density or change --ffn-share"
                        )
            selected = _global_topk(src, tun, names, groups, group_of, progress)
        else:
            selected = {}
            for n in tqdm(names, desc=f"mask ({rule})", disable=not progress):
                w0, w1 = src.get(n), tun.get(n)
                check_finite(w0, f"{src.location(n)}: tensor '{n}'")
                check_finite(w1, f"{tun.location(n)}: tensor '{n}'")
                if rule == "bf16_visible":
                    m = bf16_visible_mask(w0, w1, eta)
                elif rule == "abs_threshold":
                    m = abs_changed_mask(w0, w1, abs_threshold)
                else:
                    m = top_fraction_mask((w1.float() - w0.float()).abs(), float(density), largest=True)
                selected[n] = _flat_indices(m)
        for n, idx in selected.items():
            if idx.numel():
                entries[module_name(n)] = (shapes[n], idx)
        label_src, label_tun = src.label, tun.label
    if not entries and rule == "topk":
        total = sum(shapes[n][0] * shapes[n][1] for n in names)
        raise ValueError(
            f"density {density} keeps no coordinate: round(density x weight entries) is 0 for the {total:,} entries of "
            f"the {len(names)} selected modules{' (per module)' if per_module else ''}; use a density of at least "
            f"{1 / (min(shapes[n][0] * shapes[n][1] for n in names) if per_module else total):.3g} (e.g. --density 0.05)"
        )
    if not entries:
        raise ValueError(
            f"no coordinate differs between {label_src} and {label_tun} under rule={rule!r}; check that you passed "
            "the tuned checkpoint, or use rule='topk' with a density"
        )
    total = sum(shapes[n][0] * shapes[n][1] for n in names)
    nnz = sum(int(idx.numel()) for _, idx in entries.values())
    metadata = {
        "source": label_src, "tuned": label_tun, "rule": rule, "density": density, "ffn_share": ffn_share,
        "per_module": per_module, "achieved_density": nnz / total, "n_modules_analysed": len(names),
    }  # fmt: skip
    if rule == "bf16_visible":
        metadata["eta"] = eta
    if rule == "abs_threshold":
        metadata["abs_threshold"] = abs_threshold
    return SparseMask.from_indices(entries, metadata)


def _module_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def random_like(mask: SparseMask, seed: int = 0) -> SparseMask:
    """Uniform random mask with exactly the same per-module coordinate counts as ``mask``.

    Each module draws from its own generator seeded by ``(seed, module name)``, so results do not depend on the
    module order. Returns a :class:`SparseMask` whose metadata records the seed and the original rule.
    """
    entries = {}
    for name in mask:
        out_f, in_f = mask.shape(name)
        g = torch.Generator().manual_seed(_module_seed(seed, name))
        idx = torch.randperm(out_f * in_f, generator=g)[: mask.nnz(name)]
        entries[name] = ((out_f, in_f), idx.sort().values)
    meta = {"rule": "random_like", "seed": int(seed), "like_rule": mask.metadata.get("rule")}
    meta["like_density"] = mask.density()
    return SparseMask.from_indices(entries, meta)


def low_magnitude(
    model, alpha: float, *, modules: str | Iterable[str] | None = None, progress: bool = False
) -> SparseMask:
    """Bottom-``alpha`` ``|W0|`` coordinates of every selected module (exactly ``round(alpha · numel)`` each).

    Args:
        model: W0 - model directory, ``.safetensors`` file, Hub id or ``nn.Module``. alpha: fraction in (0, 1].
        modules: None (block Linear layers), a regex or a list of module names.

    Returns:
        :class:`SparseMask` (ties at the threshold broken by flat index).
    """
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    entries = {}
    with open_source(model) as src:
        for n in tqdm(select_weights(src, modules), desc="low-magnitude mask", disable=not progress):
            w = src.get(n)
            check_finite(w, f"{src.location(n)}: tensor '{n}'")
            idx = _flat_indices(top_fraction_mask(w.float().abs(), float(alpha), largest=False))
            if idx.numel():
                entries[module_name(n)] = (tuple(w.shape), idx)
        label = src.label
    if not entries:
        raise ValueError(f"alpha={alpha} selects no coordinate in {label}; use a larger alpha")
    return SparseMask.from_indices(entries, {"rule": "low_magnitude", "alpha": float(alpha), "source": label})
