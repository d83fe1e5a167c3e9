"""Sharded training: FSDP2 (``fully_shard`` per decoder block + root) on 2 CPU processes over gloo trains the
SparseOPD adapter exactly like one process, shards its values as ``Shard(0)`` DTensors, and
:func:`sparse_opd_peft.distributed.save_sharded_adapter` saves it as the ordinary adapter directory.

The two processes run ``tests/_fsdp_check.py`` once per module (rendezvous through a file in ``tmp_path``: no ports
to pick); the single-process reference trains the same model on the same global batch here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_check import tiny_model
from _fsdp_check import SEQ_LEN, VOCAB, peft_student, train
from conftest import random_mask
from peft import PeftModel
from safetensors.torch import load_file

from sparse_opd_peft import save_adapter

WORLD = 2
TIMEOUT_S = 150


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """Output directory of one 2-process FSDP2 run of ``_fsdp_check.py`` (see its docstring for the files)."""
    root = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = str(Path(__file__).with_name("_fsdp_check.py"))
    args = ["--world-size", str(WORLD), "--store", str(root / "store"), "--out", str(root / "out"), "--timeout", "60"]
    procs = [subprocess.Popen([sys.executable, script, "--rank", str(r), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]  # fmt: skip
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:  # a rank that crashed leaves the other waiting in a collective: end it
            if p.poll() is None:
                p.kill()
                p.communicate()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n" + "\n".join(log[-3000:] for log in logs)
    return root / "out"


@pytest.fixture(scope="module")
def single():
    """The single-process reference: the same student trained on the same global batches, and its losses."""
    model = peft_student()
    losses = train(model)
    return model, losses


@pytest.fixture(scope="module")
def single_bf16():
    """The single-process reference with a bfloat16 base (float32 values)."""
    model = peft_student(dtype=torch.bfloat16)
    losses = train(model)
    return model, losses


def _values(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "sparse_opd_values" in n}


def _report(out: Path, rank: int) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("tag", ["", "bf16"])
def test_fsdp2_training_matches_one_process(sharded_run, single, single_bf16, tag):
    """The ranks' local shards, concatenated in rank order, equal the single-process values within 1e-5, and the
    global mean losses agree step by step; with a float32 base and with a bfloat16 base (frozen bf16 weights and
    float32 values in one FSDP2 group)."""
    model, losses = single_bf16 if tag else single
    ref = _values(model)
    shards = [load_file(str(sharded_run / f"rank{r}{tag}.safetensors")) for r in range(WORLD)]
    assert set(shards[0]) == set(shards[1]) == set(ref) and len(ref) == 14  # 7 Linears x 2 blocks
    for name, want in ref.items():
        got = torch.cat([s[name] for s in shards])
        assert got.shape == want.shape
        assert want.abs().max() > 1e-3  # trained (the values start at zero)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for rank in range(WORLD):
        assert _report(sharded_run, rank)[f"losses{tag}"] == pytest.approx(losses, rel=1e-6)


@pytest.mark.parametrize("tag", ["", "bf16"])
def test_fsdp2_shards_values_along_dim0(sharded_run, single, tag):
    """Every adapter value is a DTensor with placements (Shard(0),); the local lengths add up to nnz and follow
    ``torch.chunk`` (rank 0 holds ceil(nnz / 2))."""
    ref = _values(single[0])
    reports = [_report(sharded_run, r)[f"placements{tag}"] for r in range(WORLD)]
    assert set(reports[0]) == set(ref)
    uneven = 0
    for name, want in ref.items():
        info = [rep[name] for rep in reports]
        assert all(i["type"] == "DTensor" and i["placements"] == [["Shard", 0]] for i in info), info
        assert all(i["global"] == want.numel() for i in info)
        assert [i["local"] for i in info] == [(want.numel() + 1) // 2, want.numel() // 2]
        uneven += want.numel() % 2
    assert uneven > 0  # the mask gives some odd nnz: padded shards are covered


def test_plain_save_of_sharded_model_fails_and_leaves_nothing(sharded_run):
    """``save_pretrained`` cannot write DTensor shards (without our check safetensors says "invalid python storage");
    ours names the fix, and the atomic ``save_adapter`` leaves no directory behind."""
    for rank in range(WORLD):
        report = _report(sharded_run, rank)
        assert report["plain_save_error"] is not None and "save_sharded_adapter" in report["plain_save_error"]
        assert report["plain_dir_left"] is False


def test_sharded_save_equals_single_process_save(sharded_run, single, tmp_path):
    """The directory rank 0 wrote has the files of an unsharded ``save_adapter``, the same config, the same tensor
    names / dtypes / shapes, identical coordinates and values within 1e-5; every rank returned after it existed."""
    model, _ = single
    want_dir = save_adapter(model, tmp_path / "single")
    got_dir = sharded_run / "adapter"
    assert all(_report(sharded_run, r)["adapter_on_disk_after_return"] for r in range(WORLD))
    assert sorted(p.name for p in got_dir.iterdir()) == sorted(p.name for p in want_dir.iterdir())
    assert json.loads((got_dir / "adapter_config.json").read_text()) == json.loads(
        (want_dir / "adapter_config.json").read_text()
    )
    got = load_file(str(got_dir / "adapter_model.safetensors"))
    want = load_file(str(want_dir / "adapter_model.safetensors"))
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key].dtype == w.dtype and got[key].shape == w.shape, key
        if "sparse_opd_values" in key:
            torch.testing.assert_close(got[key], w, atol=1e-5, rtol=0)
        else:
            assert torch.equal(got[key], w), key  # coordinates: exact
    assert "<!-- sparse_opd:card -->" in (got_dir / "README.md").read_text()


def test_reload_into_fresh_base_equals_single_process(sharded_run, single):
    """``PeftModel.from_pretrained(fresh base, saved dir)`` gives the single-process values and logits."""
    model, _ = single
    loaded = PeftModel.from_pretrained(tiny_model(0, vocab_size=VOCAB), str(sharded_run / "adapter"))
    ref = _values(model)
    got = _values(loaded)
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)
    ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        out = loaded(input_ids=ids).logits
        base = tiny_model(0, vocab_size=VOCAB)(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_save_sharded_adapter_without_shards_is_save_adapter(tmp_path, single):
    """On an unsharded model (one process, no process group) it is :func:`sparse_opd_peft.save_adapter`; it refuses
    a non-peft model and the arguments it sets itself."""
    from sparse_opd_peft.distributed import is_sharded, save_sharded_adapter

    model, _ = single
    assert not is_sharded(model)
    out = save_sharded_adapter(model, tmp_path / "a")
    want = save_adapter(model, tmp_path / "b")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in want.iterdir())
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(want / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(TypeError, match="expected the PeftModel"):
        save_sharded_adapter(tiny_model(0, vocab_size=VOCAB), tmp_path / "c")
    with pytest.raises(TypeError, match="state_dict"):
        save_sharded_adapter(model, tmp_path / "d", state_dict={})


def test_gather_skips_frozen_base_weights_unless_an_adapter_is_frozen():
    """With every adapter parameter trainable only the adapter and the buffers are gathered (no base weights); with
    a frozen adapter (here: an inactive second one, as peft's ``set_adapter`` leaves it) the whole model is."""
    from sparse_opd_peft import SparseOPDConfig
    from sparse_opd_peft.distributed import sharded_adapter_state_dict

    model = peft_student()
    keys = set(sharded_adapter_state_dict(model))
    assert keys and all("sparse_opd_" in k for k in keys)
    assert {k for k in keys if "sparse_opd_values" in k} == set(_values(model))
    mask = {n: m for n, m in random_mask(tiny_model(0, vocab_size=VOCAB), 0.3, seed=2).items() if n.endswith("q_proj")}
    model.add_adapter("other", SparseOPDConfig(mask=mask))
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(".other"))
    keys = set(sharded_adapter_state_dict(model))
    assert set(model.state_dict()) <= keys | {k for k in model.state_dict() if "rotary" in k}


def test_accelerate_recipe_script_runs_on_two_processes(tmp_path):
    """``_fsdp_accelerate_check.py`` (the README's accelerate recipe that ``gpu_check.sh`` launches with FSDP2 on 2+
    GPUs) runs end to end on 2 CPU processes (DDP over gloo): it trains, saves through ``save_sharded_adapter`` and
    its reload matches the one-process reference."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    script = str(Path(__file__).with_name("_fsdp_accelerate_check.py"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), script]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "fsdp_accelerate.json").read_text())
    assert report["distributed_type"] == "DistributedType.MULTI_CPU" and report["num_processes"] == WORLD
    assert report["ok"] and report["same_names"]
    assert report["max_abs_value_diff"] <= 1e-5 < report["max_abs_value"]
    assert report["max_abs_logit_diff"] <= 1e-4
    assert len(report["losses"]) == 3 and all(torch.isfinite(torch.tensor(report["losses"])))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
