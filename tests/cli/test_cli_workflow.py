"""``sparse-opd train / merge / inspect``: end-to-end runs on tiny Qwen3 models with the toy tokenizer, resume,
merged weights, inspection numbers, and one test per bad input (exit code 2, one ``error:`` line, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _distributed_check import tiny_tokenizer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from typer.testing import CliRunner

from sparse_opd_peft import SparseMask
from sparse_opd_peft.cli import app
from sparse_opd_peft.data import load_prompts
from sparse_opd_peft.lab.toy import build_tokenizer, make_splits
from sparse_opd_peft.masks import save_subspace

runner = CliRunner()
UP = "model.layers.0.mlp.up_proj"


def tiny(tok, seed: int, hidden: int = 32) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=20, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return Qwen3ForCausalLM(cfg).eval()


def block_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Student / teacher dirs (toy tokenizer saved with each), prompts, a 10 % mask, a subspace, bad inputs."""
    import datasets.config

    root = tmp_path_factory.mktemp("workflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf_datasets")  # keep ~/.cache clean
        tok = build_tokenizer()
        student, teacher = tiny(tok, 0), tiny(tok, 1)
        for name, model in (("student", student), ("teacher", teacher)):
            model.save_pretrained(root / name)
            tok.save_pretrained(root / name)
        tiny(tok, 2, hidden=48).save_pretrained(root / "wide")
        teacher.save_pretrained(root / "other_tok_teacher")
        tiny_tokenizer().save_pretrained(root / "other_tok_teacher")
        rows = make_splits("add", 24, 4)["train"]
        lines = [json.dumps({"question": r["prompt"], "answer": r["answer"]}) for r in rows]
        (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
        (root / "words.jsonl").write_text('{"question": "hello", "answer": "1"}\n')
        (root / "prompts.csv").write_text("question,answer\n1+1=,2\n")
        g = torch.Generator().manual_seed(0)
        mods = dict(student.named_modules())
        mask = SparseMask({n: torch.rand(mods[n].weight.shape, generator=g) < 0.1 for n in block_linears(student)})
        mask.save(root / "mask.safetensors")
        wide = tiny(tok, 2, hidden=48)
        SparseMask({UP: torch.rand(wide.get_submodule(UP).weight.shape, generator=g) < 0.1}).save(root / "wide.mask")
        q, _ = torch.linalg.qr(torch.randn(32, 2, generator=g, dtype=torch.float64))
        save_subspace({UP: q.float()}, root / "basis.safetensors")
        yield root


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def train_args(w: Path, *extra, steps: int = 2) -> list:
    return ["train", w / "student", "--teacher", w / "teacher", "--prompts", w / "prompts.jsonl", "--prompt-column",
            "question", "--steps", steps, "--batch-size", 4, "--max-new-tokens", 5, "--lr", "1e-2", "--reward",
            "toy:add", "-q", "--cpu", *extra]  # fmt: skip


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "hf_datasets" not in p.parts}


@pytest.fixture(scope="module")
def mask_run(w):
    out = w / "runs" / "mask"
    ok(run(*train_args(w, "--mask", w / "mask.safetensors", "--save-every", 1, "--out", out)))
    return out


@pytest.fixture(scope="module")
def lora_run(w):
    out = w / "runs" / "lora"
    ok(run(*train_args(w, "--lora-rank", 2, "--out", out)))
    return out


# ------------------------------------------------------------------------------------------------ help
def test_help_texts_and_loss_names():
    from sparse_opd_peft.cli.options import Loss
    from sparse_opd_peft.opd.config import LOSSES

    assert tuple(m.value for m in Loss) == LOSSES
    top = run("--help")
    assert top.exit_code == 0 and all(c in top.stdout for c in ("train", "merge", "inspect"))
    for cmd, flags in (("train", ("--mask", "--lora-rank", "--full", "--resume")), ("merge", ("--dtype",)),
                       ("inspect", ("--json", "--base"))):  # fmt: skip
        sub = run(cmd, "--help")
        assert sub.exit_code == 0 and "Example" in sub.stdout
        assert all(f in sub.stdout for f in flags)


# ------------------------------------------------------------------------------------------------ train
def test_train_mask_end_to_end(w, mask_run):
    adapter = mask_run / "adapter"
    assert {p.name for p in adapter.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    info = json.loads((mask_run / "train.json").read_text())
    assert [h["step"] for h in info["history"]] == [1, 2] and info["recipe"]["method"] == "sparse_opd"
    assert json.loads((mask_run / "state" / "opd_trainer_state.json").read_text())["step"] == 2
    assert sorted(p.name for p in (mask_run / "checkpoints").glob("step_*")) == [
        f"step_{k}.safetensors" for k in range(3)
    ]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE_OPD"
    if "training" in config:  # the recipe reaches the model card when this version records it
        assert config["training"]["loss"] == "full_kl" and config["training"]["steps"] == 2
    base = AutoModelForCausalLM.from_pretrained(w / "student")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    mask = SparseMask.load(w / "mask.safetensors")
    changed_any = False
    for key, value in merged.items():
        diff = value != before[key]
        name = key.removesuffix(".weight")
        if name in mask:
            assert not (diff & ~mask[name]).any(), f"{key} changed outside the mask"
            changed_any |= bool(diff.any())
        else:
            assert not diff.any(), f"{key} changed but is not in the mask"
    assert changed_any


def test_train_lora_and_full(w, lora_run, tmp_path):
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    out = tmp_path / "full"
    ok(run(*train_args(w, "--full", "--out", out)))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (out / "model").iterdir()}
    new, old = load_file(out / "model" / "model.safetensors"), load_file(w / "student" / "model.safetensors")
    assert new.keys() == old.keys() and any(not torch.equal(new[k], old[k]) for k in new)
    assert json.loads((out / "train.json").read_text())["recipe"]["method"] == "full"


def test_train_subspace_with_mask(w, tmp_path):
    out = tmp_path / "sub"
    ok(run(*train_args(w, "--mask", w / "mask.safetensors", "--subspace", w / "basis.safetensors", "--out", out)))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["module_rank"] == {UP: 2}


def test_train_mix_with_eval_and_token_keep(w, tmp_path):
    out = tmp_path / "mix"
    extra = ["--lora-rank", 2, "--loss", "mix", "--num-generations", 2, "--token-keep", "top_gap", "--token-keep-ratio",
             "0.5", "--eval-prompts", w / "prompts.jsonl", "--eval-every", 1, "--eval-samples", 4, "--out", out]  # fmt: skip
    ok(run(*train_args(w, *extra)))
    info = json.loads((out / "train.json").read_text())
    assert info["config"]["token_keep"] == "top_gap" and info["config"]["loss"] == "mix"
    assert all("eval_accuracy" in h and "reward" in h for h in info["history"])


def test_train_topk_kl_records_topk_and_checks_it(w, tmp_path):
    out = tmp_path / "topk"
    ok(run(*train_args(w, "--lora-rank", 2, "--loss", "topk_kl", "--topk", 2, "--out", out)))
    info = json.loads((out / "train.json").read_text())
    assert info["config"]["loss"] == "topk_kl" and info["config"]["topk"] == 2
    assert info["recipe"]["loss"] == "topk_kl" and [h["step"] for h in info["history"]] == [1, 2]
    bad = tmp_path / "bad"
    assert_one_line_error(
        run(*train_args(w, "--lora-rank", 2, "--loss", "topk_kl", "--topk", 0, "--out", bad)), "--topk"
    )
    assert not bad.exists()


def test_resume_into_the_same_dir_equals_a_straight_run(w, tmp_path):
    extra = ("--mask", w / "mask.safetensors", "--lr-schedule", "constant")
    a, straight = tmp_path / "a", tmp_path / "straight"
    ok(run(*train_args(w, *extra, "--out", a, steps=2)))
    ok(run(*train_args(w, *extra, "--out", a, "--resume", a, steps=3)))  # no --overwrite needed to continue a run
    ok(run(*train_args(w, *extra, "--out", straight, steps=3)))
    hist = json.loads((a / "train.json").read_text())["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    got, want = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (a, straight))
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)
    bad = run(*train_args(w, "--mask", w / "mask.safetensors", "--out", tmp_path / "b", "--resume", a, steps=3))
    assert_one_line_error(bad, "cannot resume", "lr_schedule")
    assert not (tmp_path / "b").exists()


def test_a_crash_leaves_no_half_written_run_and_checkpoints_resume(w, tmp_path, monkeypatch):
    from sparse_opd_peft.opd import OPDTrainer

    train = OPDTrainer.train

    def crash_after_one_step(self, resume_from=None, max_steps=None):
        train(self, resume_from, max_steps=1)
        raise RuntimeError("power cut")

    monkeypatch.setattr(OPDTrainer, "train", crash_after_one_step)
    out = tmp_path / "deep" / "run"
    res = run(*train_args(w, "--mask", w / "mask.safetensors", "--out", out))
    assert isinstance(res.exception, RuntimeError) and not (tmp_path / "deep").exists()  # nothing, parents included
    res = run(*train_args(w, "--mask", w / "mask.safetensors", "--out", out, "--save-every", 1))
    assert isinstance(res.exception, RuntimeError) and "--resume" in res.stderr
    assert (out / "checkpoints" / "state").is_dir() and not (out / "adapter").exists()
    monkeypatch.setattr(OPDTrainer, "train", train)
    ok(run(*train_args(w, "--mask", w / "mask.safetensors", "--out", out, "--save-every", 1, "--resume", out)))
    assert [h["step"] for h in json.loads((out / "train.json").read_text())["history"]] == [1, 2]


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_merge_equals_in_process_merge(w, mask_run, tmp_path, dtype):
    out = tmp_path / "merged"
    res = ok(run("merge", w / "student", mask_run / "adapter", "--out", out, "--dtype", dtype))
    assert "bf16-visible share" in res.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w / "student"), mask_run / "adapter")
    ref = ref.merge_and_unload().to(torch.bfloat16 if dtype == "bf16" else torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out, dtype="auto").state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_merge_lora_adapter(w, lora_run, tmp_path):
    res = ok(run("merge", w / "student", lora_run / "adapter", "--out", tmp_path / "m"))
    assert "LORA" in res.stdout and (tmp_path / "m" / "model.safetensors").is_file()
    # LoRA's merge is W <- W + (alpha / r) * B @ A for every targeted Linear (peft's get_delta_weight, no fan-in /
    # fan-out transpose here), and every other weight is copied: computed with the same float32 ops from the saved
    # A and B, it must equal the merged file bit for bit.
    cfg = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / cfg["r"]
    lora = load_file(lora_run / "adapter" / "adapter_model.safetensors")
    base = load_file(w / "student" / "model.safetensors")
    got = load_file(tmp_path / "m" / "model.safetensors")
    assert got.keys() == base.keys()
    merged = 0
    for key, weight in base.items():
        a = lora.get(f"base_model.model.{key.removesuffix('.weight')}.lora_A.weight")
        b = lora.get(f"base_model.model.{key.removesuffix('.weight')}.lora_B.weight")
        want = weight if a is None else weight + (b @ a) * scaling
        assert got[key].dtype == weight.dtype and torch.equal(got[key], want), key
        merged += a is not None and not torch.equal(want, weight)
    assert merged == len(block_linears(tiny(build_tokenizer(), 0)))  # all-linear: every block Linear moved


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_numbers_match_the_mask(w, mask_run):
    mask = SparseMask.load(w / "mask.safetensors")
    r = json.loads(ok(run("inspect", mask_run / "adapter", "--json")).stdout)
    assert {n: m["nnz"] for n, m in r["modules"].items()} == {n: mask.nnz(n) for n in mask}
    assert r["totals"]["nnz"] == mask.nnz() and r["totals"]["density"] == pytest.approx(mask.density())
    for kind, stats in mask.type_stats().items():
        assert r["by_type"][kind]["nnz"] == stats["nnz"]
        assert r["by_type"][kind]["density"] == pytest.approx(stats["density"])
    assert all(m["packing"] == "coded stream" for m in r["modules"].values())  # density 0.1: Elias-Fano < bitmask
    size = (mask_run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert r["files"]["bytes_per_coordinate"] == pytest.approx(size / mask.nnz())
    names = {t["name"] for t in r["files"]["tensors"]}
    assert any(n.endswith("sparse_opd_values") for n in names) and any(n.endswith("sparse_opd_indices") for n in names)
    assert r["fingerprint"]["modules"] == len(mask) and r["visibility"]["computed"] is False
    text = ok(run("inspect", mask_run / "adapter")).stdout
    assert "not computed" in text and f"{mask.nnz():,} coordinates" in text and UP in text
    vis = json.loads(ok(run("inspect", mask_run / "adapter", "--base", w / "student", "--json")).stdout)["visibility"]
    assert vis["computed"] and vis["coords"] == mask.nnz() and 0.0 <= vis["share"] <= 1.0


# ------------------------------------------------------------------------------------------------ bad input
TRAIN_BAD = {
    "missing prompts file": (lambda w: ["--full", "--prompts", w / "nope.jsonl"], "no such file"),
    "prompts of another file type": (lambda w: ["--full", "--prompts", w / "prompts.csv"], "unsupported file type"),
    "two adapter choices": (lambda w: ["--lora-rank", 2, "--full"], "exclude each other"),
    "no adapter choice": (lambda w: [], "choose what to train"),
    "unknown column": (lambda w: ["--full", "--prompt-column", "text"], "no column 'text'"),
    "not a mask file": (lambda w: ["--mask", w / "student" / "model.safetensors"], "not a sparse_opd_peft mask"),
    "mask of another model": (lambda w: ["--mask", w / "wide.mask"], "has shape"),
    "missing student": (lambda w: ["--full"], "no such directory"),
    "rlvr without reward": (
        lambda w: ["--full", "--loss", "rlvr", "--num-generations", 2, "--reward", "none"],
        "needs a verifier reward",
    ),  # fmt: skip
    "toy reward on other prompts": (lambda w: ["--full", "--prompts", w / "words.jsonl"], "not a toy 'add' prompt"),
    "bad option value": (lambda w: ["--full", "--temperature", 0], "--temperature=0.0 is invalid"),
    "resume from a non-state": (lambda w: ["--full", "--resume", w / "student"], "not a trainer state"),
    "teacher with another tokenizer": (lambda w: ["--full", "--teacher", w / "other_tok_teacher"], "incompatible"),
}


@pytest.mark.parametrize("case", list(TRAIN_BAD))
def test_train_bad_input(w, tmp_path, case):
    make, needle = TRAIN_BAD[case]
    args = train_args(w, *make(w), "--out", tmp_path / "out")
    if case == "missing student":
        args[1] = tmp_path / "no_student"
    before = listing(w)
    assert_one_line_error(run(*args), needle)
    assert not (tmp_path / "out").exists() and listing(w) == before


def test_train_refuses_a_non_empty_out_dir(w, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_one_line_error(run(*train_args(w, "--full", "--out", tmp_path / "out")), "not empty", "--overwrite")
    assert listing(tmp_path) == {"out", "out/keep.txt"}


def test_merge_bad_input(w, mask_run, tmp_path):
    adapter = mask_run / "adapter"
    out = tmp_path / "m"
    assert_one_line_error(run("merge", w / "wide", adapter, "--out", out), "base model mismatch", "--skip-fingerprint")
    assert_one_line_error(run("merge", w / "student", w / "student", "--out", out), "no adapter_config.json")
    assert_one_line_error(run("merge", w / "student", tmp_path / "none", "--out", out), "no such directory")
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    data = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("merge", w / "student", broken, "--out", out), "truncated or corrupt")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    assert_one_line_error(run("merge", w / "student", broken, "--out", out), "newer", "upgrade")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    out.mkdir()
    (out / "x").write_text("x")
    assert_one_line_error(run("merge", w / "student", adapter, "--out", out), "not empty")
    assert [p.name for p in out.iterdir()] == ["x"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inspect_bad_input(w, mask_run, lora_run, tmp_path):
    assert_one_line_error(run("inspect", lora_run / "adapter"), "is a LORA adapter", "SPARSE_OPD")
    assert_one_line_error(run("inspect", tmp_path / "nope"), "no such directory")
    assert_one_line_error(run("inspect", w / "mask.safetensors"), "is a file")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(mask_run / "adapter" / "adapter_config.json", partial)
    assert_one_line_error(run("inspect", partial), "adapter_model.safetensors", "missing")
    assert listing(tmp_path) == {"partial", "partial/adapter_config.json"}


# ------------------------------------------------------------------------------------------------ data
def test_load_prompts_parquet_and_columns(w, tmp_path):
    from datasets import Dataset

    path = tmp_path / "p.parquet"
    Dataset.from_dict({"q": ["1+1=", "2+2="], "a": [2, 4], "extra": [0, 1]}).to_parquet(str(path))
    ds = load_prompts(str(path), prompt_column="q", answer_column="a")
    assert ds.column_names == ["prompt", "answer"] and ds["answer"] == ["2", "4"]
    with pytest.raises(ValueError, match="split"):
        load_prompts(str(path), split="test", prompt_column="q")


def test_train_job_holds_an_opd_config_built_from_the_flags(tmp_path):
    """``TrainJob`` repeats no ``OPDConfig`` field: ``from_flags`` puts the flags named after OPDConfig fields into
    ``job.opd`` (``--max-grad-norm 0`` = no clipping, ``--quiet`` = no progress bar, ``--save-every`` into
    ``out/checkpoints``), keeps the rest on the job, and phrases OPDConfig's errors as flags."""
    from dataclasses import fields

    from sparse_opd_peft.opd import OPDConfig
    from sparse_opd_peft.workflow.train import TrainJob, opd_config

    opd_names = {f.name for f in fields(OPDConfig)}
    assert not opd_names & {f.name for f in fields(TrainJob)}
    job = TrainJob.from_flags(student="s", prompts="p.jsonl", out=tmp_path / "run", reward="exact", loss="mix",
                              num_generations=4, alpha=0.3, max_grad_norm=0.0, save_every=5, quiet=True, lr=2e-4)  # fmt: skip
    assert (job.student, job.reward, job.quiet) == ("s", "exact", True)
    assert job.opd == OPDConfig(loss="mix", num_generations=4, alpha=0.3, max_grad_norm=None, save_every=5, lr=2e-4,
                                checkpoint_dir=str(tmp_path / "run" / "checkpoints"), progress_bar=False)  # fmt: skip
    assert opd_config(job) == job.opd
    assert TrainJob(student="s", prompts="p", out=tmp_path).opd == OPDConfig()
    with pytest.raises(ValueError, match=r"^--token-keep-ratio=0.0 is invalid"):
        TrainJob.from_flags(student="s", prompts="p", out=tmp_path, token_keep_ratio=0.0)
