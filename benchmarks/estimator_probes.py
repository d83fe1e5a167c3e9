"""Sampled-token objectives tried for issue 14 that need code rather than an ``OPDConfig`` setting (not kept in the
library: none beats ``sampled_token`` with its position baseline).

Each probe trains like ``bench_estimators.py`` (shipped toy world, task ``add``, 250 steps x 64 prompts, AdamW 1e-3,
from the student anchor; scored on 2000 held-out prompts) through a subclass of ``OPDTrainer`` that replaces the
objective of a micro-batch:

* ``cv_<β>`` / ``cv_fit``: a token-level control variate. The reverse-KL gradient at a prefix is
  ``E_y[r(y) ∇log p_s(y)]`` (``r = log p_s - log p_T``); subtracting ``β log p_s(y) ∇log p_s(y)`` and adding back its
  exact expectation ``β ∇(-H(p_s))`` (computable: the student's whole distribution is at hand) keeps it unbiased.
  ``β`` fixed, or fitted per batch as the least-squares slope of ``r`` on ``log p_s`` (recorded per step; fitted on
  the batch it is applied to, so unbiased only up to that fit); then the per-position leave-one-out baseline, as
  ``st_base``. ``β = 1`` is the Rao-Blackwellised student term.
* ``k3``: verl's ``low_var_kl`` used as a loss (``k3 = e^{-r} + r - 1`` on the sampled token with verl's clamps: the
  log-ratio to ±20, k3 to ±10; differentiated through ``log p_s``): unclamped, its gradient is an unbiased estimate
  of ``∇ KL(p_T || p_s)``, the *forward* KL, from the sampled token's teacher log-prob alone.
* ``k3_mix``: half ``st_base``'s loss + half ``k3``.
* ``is_t<T>``: rollouts sampled at temperature ``T`` (more of the tokens the teacher rejects get sampled), each
  token's advantage weighted back to the student's own distribution by ``w = p_s(y) / p_sampler(y)`` (tinker's
  importance weight; capped at 5, or uncapped with ``_nocap``): ``A = w (-r - b)``, unbiased for the per-token
  expectation up to the cap.

Results (one JSON record per probe and seed) go to ``benchmarks/results/estimator_probes.json``, which
``bench_estimators.py`` lists under its table::

    nice -n 19 python benchmarks/estimator_probes.py --probes cv_0 cv_-1 cv_1 cv_fit k3 k3_mix --seeds 0
    nice -n 19 python benchmarks/estimator_probes.py --probes cv_0 is_t1.25 is_t1.5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "estimator_probes.json"
# the importance-weighted probes: name -> (sampling temperature, cap of the weights or None)
IS = {f"is_t{t}{'' if cap else '_nocap'}": (t, cap) for t in (1.25, 1.5) for cap in (5.0, None)}
WHAT = {
    "cv_0": "control-variate code path with β = 0 (= st_base, baseline computed inside the objective)",
    "cv_-1": "token-level control variate β log p_s(y), β = -1, exact expectation β ∇(-H) added, position baseline",
    "cv_1": "the same with β = 1 (the student's own term exact: Rao-Blackwellised)",
    "cv_fit": "the same with β fitted per batch (least-squares slope of r on log p_s; β at steps 1 / 40 / last after it)",
    "k3": "verl's k3 (low_var_kl, its clamps) as the loss on the sampled token: the forward-KL gradient",
    "k3_mix": "half st_base + half k3",
    **{
        name: (
            f"rollouts at temperature {t}, per-token importance weights w = p_s(y) / p_sampler(y)"
            + (f" capped at {cap}" if cap else " (uncapped)")
            + ": A = w (-r - b), b the position leave-one-out mean of -r (its kl column is measured on the tempered samples)"
        )
        for name, (t, cap) in IS.items()
    },
}


def _trainer_class(probe: str, betas: list[float]):
    """An ``OPDTrainer`` subclass whose sampled-token micro-batch objective is ``probe``; the cv_ probes append their
    control variate's β of every step to ``betas``."""
    from sparse_opd_peft.opd import OPDTrainer
    from sparse_opd_peft.opd import losses as L
    from sparse_opd_peft.opd.step import _grid

    temperature, cap = IS.get(probe, (1.0, None))  # is_t probes: the rollouts' temperature, the weights' cap

    class ProbeTrainer(OPDTrainer):
        """OPDTrainer whose sampled-token micro-batch objective is ``probe`` (see the module docstring)."""

        def _loss(self, b) -> tuple[torch.Tensor, dict[str, float]]:
            ro = b.rollout
            mask = ro.completion_mask
            lp_t = self._teacher_token_logprobs(ro)
            teacher, grad = {}, ("logprobs",)
            if probe.startswith("cv_"):  # -H + log V per position, as the reverse KL against uniform logits
                v, dev = self.vocab_size, self.accelerator.device
                teacher = {"teacher_logits": lambda s, e: torch.zeros(e - s, v, device=dev)}
                grad = ("logprobs", "divergence")
            out = self._student(ro, teacher, grad)
            ls = _grid(out.logprobs, mask)
            r = (ls.detach() - lp_t) * mask
            if probe.startswith("is_t"):  # the rollouts came from softmax(z / T): weight each token back to p_s
                with torch.no_grad():
                    x, w, bias = self._student_scorer(ro)
                    z = x[mask] if w is None else torch.nn.functional.linear(x[mask], w, bias)
                    lq = torch.log_softmax(z[:, : self.vocab_size].float() / temperature, -1)
                    lq = _grid(lq.gather(-1, ro.completion_ids[mask][:, None]).squeeze(-1), mask)
                    wts = (ls.detach() - lq).exp() * mask
                    if cap is not None:
                        wts = wts.clamp(max=cap)
                a = -r
                a = wts * (a - L.leave_one_out_baseline(a, mask)) * mask
                loss = L.policy_gradient_loss(ls, a, mask, 1.0)
            elif probe.startswith("cv_"):
                if probe == "cv_fit":
                    m = mask.float()
                    n = m.sum()
                    dl = (ls.detach() - (ls.detach() * m).sum() / n) * m
                    beta = float((dl * (r - (r * m).sum() / n)).sum() / (dl.square().sum() + 1e-8))
                else:
                    beta = float(probe[3:])
                betas.append(beta)
                a = -(r - beta * ls.detach()) * mask
                a = (a - L.leave_one_out_baseline(a, mask)) * mask
                negent = _grid(out.divergence, mask)
                loss = L.policy_gradient_loss(ls, a, mask, 1.0) + beta * (negent * mask).sum()
            else:
                # verl's low_var_kl: log-ratio log p_T - log p_s clamped to ±20, k3 clamped to ±10 (no gradient
                # beyond), differentiable through log p_s
                d = (lp_t - ls).clamp(-20.0, 20.0)
                loss = ((d.exp() - d - 1.0).clamp(-10.0, 10.0) * mask).sum()
                if probe == "k3_mix":
                    a = -r
                    a = (a - L.leave_one_out_baseline(a, mask)) * mask
                    loss = 0.5 * loss + 0.5 * L.policy_gradient_loss(ls, a, mask, 1.0)
            return loss, {"loss": float(loss.detach()), "kl": float(r.sum())}

    return ProbeTrainer


def run_probe(world, probe: str, seed: int, steps: int) -> dict:
    """One run of ``probe`` with ``seed``: held-out accuracy and the per-token KL estimate at steps 1 / 40 / last."""
    from sparse_opd_peft.lab.toy import heldout_accuracy
    from sparse_opd_peft.lab.toy.runs import ToyRunConfig, opd_run

    run = ToyRunConfig(task="add").with_(
        loss="sampled_token", sampled_token_baseline="none", steps=steps, seed=seed, progress_bar=False,
        temperature=IS.get(probe, (1.0, None))[0],
    )  # fmt: skip
    if run.opd.grad_accum != 1:
        raise SystemExit("the probes compute their baseline inside one micro-batch: grad_accum must be 1")
    betas: list[float] = []
    model, history, secs = opd_run(world.load_student(), world, run, trainer_cls=_trainer_class(probe, betas))
    kl = [h["kl"] for h in history]
    return {
        "probe": probe, "what": WHAT[probe], "seed": seed, "steps": steps, "world": world.key,
        "acc": heldout_accuracy(model, world, "add", 2000),
        "kl_1_40_last": [round(kl[0], 3), round(kl[min(39, len(kl) - 1)], 3), round(kl[-1], 3)],
        "train_seconds": round(secs, 1),
        **({"beta_1_40_last": [round(betas[i], 3) for i in (0, min(39, len(betas) - 1), -1)]} if betas else {}),
    }  # fmt: skip


def main() -> None:
    from sparse_opd_peft.atomic import write_json_atomic
    from sparse_opd_peft.lab.toy import load_world

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--probes", nargs="+", default=["cv_0", "cv_-1", "cv_1", "cv_fit", "k3", "k3_mix"], choices=sorted(WHAT)
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = load_world()
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    for probe in args.probes:
        for seed in args.seeds:
            rec = run_probe(world, probe, seed, args.steps)
            print(json.dumps(rec), flush=True)
            records = [r for r in records if (r["probe"], r["seed"], r["steps"]) != (probe, seed, args.steps)]
            records.append(rec)
            write_json_atomic(out, records)


if __name__ == "__main__":
    main()
