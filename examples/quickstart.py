"""Quickstart: wrap a small Qwen3 with a sparse OPD adapter, train it, save, reload and merge — offline, on CPU.

The mask comes from a checkpoint delta, as in the papers: a short full-parameter "probe" run moves the weights,
the top 5 % |ΔW| coordinates become the mask, and the adapter retrains only those from the original weights.

    python examples/quickstart.py --out runs/quickstart
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3ForCausalLM

from sparse_opd_peft import SparseOPDConfig, mask_from_checkpoints, save_adapter


def toy_batch(generator: torch.Generator, batch: int = 32, length: int = 24) -> torch.Tensor:
    """Token ids (batch, length) int64 of a learnable pattern: each row counts up from a random start mod 64."""
    start = torch.randint(0, 64, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % 64


def train(model: torch.nn.Module, steps: int, lr: float, seed: int, desc: str) -> float:
    """AdamW on the next-token loss of :func:`toy_batch`; returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in (bar := tqdm(range(steps), desc=desc)):
        ids = toy_batch(g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--density", type=float, default=0.05)
    args = parser.parse_args()
    t0 = time.time()
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    base = Qwen3ForCausalLM(config).eval()
    base.save_pretrained(args.out / "base")
    eval_ids = toy_batch(torch.Generator().manual_seed(123), batch=64)
    with torch.no_grad():
        base_loss = base(input_ids=eval_ids, labels=eval_ids).loss.item()

    # The probe fine-tunes every Linear of the transformer blocks (embeddings and lm_head stay frozen, as they do
    # for the adapter), so "full" and "sparse" differ only in which block coordinates may move.
    probe = copy.deepcopy(base)
    for name, param in probe.named_parameters():
        param.requires_grad = ".layers." in name and name.endswith("proj.weight")
    train(probe, args.steps, 3e-3, seed=1, desc="probe (full fine-tuning of the blocks)")
    mask = mask_from_checkpoints(base, probe, rule="topk", density=args.density)
    mask.save(args.out / "mask.safetensors")
    print(f"mask: {mask}, FFN share of coordinates {mask.type_stats()['ffn']['share_of_nnz']:.1%}")

    model = get_peft_model(base, SparseOPDConfig(mask=mask, save_dtype="bfloat16"))
    model.print_trainable_parameters()
    train(model, args.steps, 1e-2, seed=1, desc="sparse adapter")
    with torch.no_grad():
        adapter_loss = model(input_ids=eval_ids, labels=eval_ids).loss.item()
        probe_loss = probe(input_ids=eval_ids, labels=eval_ids).loss.item()
    save_adapter(model, args.out / "adapter")
    vis = model.bf16_visibility()

    reloaded = PeftModel.from_pretrained(Qwen3ForCausalLM.from_pretrained(args.out / "base"), args.out / "adapter")
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        merged_loss = merged(input_ids=eval_ids, labels=eval_ids).loss.item()
    merged.save_pretrained(args.out / "merged")
    size = (args.out / "adapter" / "adapter_model.safetensors").stat().st_size
    print(
        f"\nheld-out loss: base {base_loss:.3f} | full probe {probe_loss:.3f} | sparse adapter {adapter_loss:.3f} "
        f"| reloaded + merged {merged_loss:.3f}\n"
        f"adapter file {size / 1024:.1f} KiB for {mask.nnz():,} coordinates ({size / mask.nnz():.2f} B/coord, bf16 "
        f"values); bf16-visible share of the delta {vis['share']:.1%}\n"
        f"wrote {args.out}/(base, mask.safetensors, adapter, merged) in {time.time() - t0:.0f}s"
    )


if __name__ == "__main__":
    main()
