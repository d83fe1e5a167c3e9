"""Time the diagnostics on one 4096 x 14336 weight pair: our engine vs plain float64 ``torch.linalg.svd``.

W0 is random (N(0, 0.02²), stored as bf16 like a checkpoint); W+ = bf16(W0 + a rank-8 update + a 5 %-dense sparse
update). Both routes compute the principal angles of the top-512 left/right singular subspaces and NSS; the script
checks that they agree (angles to 1e-6 rad, NSS to 1e-9 relative), times the engine's full per-matrix analysis
(every metric of report.json) and writes a markdown table to benchmarks/results/diagnostics.md.

    .venv/bin/python benchmarks/bench_diagnostics.py            # full size, about 3-6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_diagnostics.py --shape 1024 3584 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparse_opd_peft.diagnostics import metrics as M
from sparse_opd_peft.diagnostics.engine import DiagnoseConfig, analyze_matrix
from sparse_opd_peft.diagnostics.spectral import gram, lapack_backend, svd_topk, sym_eig_many

RESULTS = Path(__file__).parent / "results" / "diagnostics.md"


def make_pair(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W0, W+) as bf16 (m, n) tensors: random W0, small structured update (rank 8 + 5 % sparse)."""
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(m, n, generator=g) * 0.02).bfloat16()
    u, v = torch.randn(m, 8, generator=g), torch.randn(n, 8, generator=g)
    delta = (u @ v.T) * (2e-4 / 8**0.5)
    delta += (torch.rand(m, n, generator=g) < 0.05) * torch.randn(m, n, generator=g) * 1e-3
    return w0, (w0.float() + delta).bfloat16()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def ours(w0d: torch.Tensor, w1d: torch.Tensor, k: int):
    r0, r1 = svd_topk(w0d, k, method="gram"), svd_topk(w1d, k, method="gram")
    au, av = M.principal_angles(r0.U, r1.U), M.principal_angles(r0.V, r1.V)
    return au, av, M.nss_from_values(r0.S, r1.S), r0.route


def plain(w0d: torch.Tensor, w1d: torch.Tensor, k: int):
    u0, s0, vh0 = torch.linalg.svd(w0d, full_matrices=False)
    u1, s1, vh1 = torch.linalg.svd(w1d, full_matrices=False)
    au = M.principal_angles(u0[:, :k], u1[:, :k])
    av = M.principal_angles(vh0[:k].T, vh1[:k].T)
    return au, av, M.nss_from_values(s0, s1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 14336))
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-plain", action="store_true", help="time only our engine (no agreement check)")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/diagnostics.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, n = args.shape
    load0 = f"{os.getloadavg()[0]:.2f}"
    w0, w1 = make_pair(m, n)
    w0d, w1d = w0.double(), w1.double()
    lapack_backend()  # probe once, outside the timings

    (au, av, nss, route), t_spec = timed(lambda: ours(w0d, w1d, args.k))
    (row, _), t_full = timed(lambda: analyze_matrix(w0, w1, "model.layers.0.mlp.down_proj.weight",
                                                   DiagnoseConfig(top_k=args.k, method="gram")))  # fmt: skip
    g, t_gram = timed(lambda: gram(w0d))
    _, t_eig = timed(lambda: sym_eig_many([(g, args.k)]))
    g = None  # free the Gram before the next step
    rows = [
        ("engine: all singular values + top-k vectors of W0 and W+, angles, NSS", t_spec),
        ("  of which, per matrix: float64 Gram (lower block triangle)", t_gram),
        ("  of which, per matrix: all eigenvalues + top-k eigenvectors of the Gram", t_eig),
        ("engine: full per-matrix analysis (every report.json metric, incl. the ΔW spectrum and masks)", t_full),
    ]
    check = ""
    if not args.skip_plain:
        (pu, pv, pnss), t_plain = timed(lambda: plain(w0d, w1d, args.k))
        rows.append(("plain torch.linalg.svd (float64) of W0 and W+, angles, NSS", t_plain))
        du = float((au - pu).abs().max())
        dv = float((av - pv).abs().max())
        dn = abs(nss - pnss) / abs(pnss)
        ok = du <= 1e-6 and dv <= 1e-6 and dn <= 1e-9
        check = (
            f"Agreement with plain SVD: max |Δθ_U| = {du:.2e} rad, max |Δθ_V| = {dv:.2e} rad (tolerance 1e-6), "
            f"NSS relative difference = {dn:.2e} (tolerance 1e-9): **{'PASS' if ok else 'FAIL'}**. "
            f"Speed-up of the spectral part: {t_plain / t_spec:.1f}x."
        )
    lines = [
        "# Diagnostics benchmark",
        "",
        f"One {m} x {n} pair (random bf16 W0, rank-8 + 5 % sparse update), top-k = {args.k}, "
        f"{args.threads} threads, torch {torch.__version__}, {platform.machine()} ({os.cpu_count()} CPUs), "
        f"route `{route}` (LAPACK partial eigensolver: {'numpy OpenBLAS' if lapack_backend() else 'not found'}), "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "| step | seconds |",
        "|---|---|",
        *[f"| {name} | {sec:.2f} |" for name, sec in rows],
        "",
        check,
        "",
        f"Metrics of the pair: bf16 sparsity {row['bf16_sparsity']:.3f}, NSS {row['nss']:.3e}, mean angle "
        f"{row['principal_angle_deg']:.3f}°, principal overlap {row['principal_overlap']:.3f}, low-magnitude overlap "
        f"{row['low_magnitude_overlap']:.3f}, stable rank {row['stable_rank']:.2f}, route {row['route']}.",
        "",
        f"Load average before / after the run: {load0} / {os.getloadavg()[0]:.2f} (the machine is shared; timings "
        "are upper bounds). Command: `.venv/bin/python benchmarks/bench_diagnostics.py`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
