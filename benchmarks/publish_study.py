"""Copy a finished study (``sparse-opd study --out DIR``) into ``benchmarks/results/`` for the README.

``DIR/study.md`` becomes ``benchmarks/results/study.md`` with its image links pointing at the copied PNGs in
``benchmarks/results/study_plots/``; ``DIR/study.json`` is copied as ``benchmarks/results/study.json`` without the per-step histories of the runs
(configs, final metrics and wall-clock stay; the full file stays in DIR). Then run
``python benchmarks/render_readme.py``. The published ``study.md`` is regenerated from the published ``study.json`` by
``sparse_opd_peft.lab.study.render_study`` and :func:`rewrite_links` (``tests/lab/test_study_golden.py``), so publish both
together and edit neither by hand.

    python benchmarks/publish_study.py runs/study
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rewrite_links(markdown: str) -> str:
    """``study.md`` as published: image links ``](plots/x.png)`` point at ``benchmarks/results/study_plots/x.png``."""
    return re.sub(r"\]\((?:\./)?plots/", "](benchmarks/results/study_plots/", markdown)


def publish(study_dir: Path, results: Path = ROOT / "benchmarks" / "results") -> list[str]:
    """Copy ``study.md`` (links rewritten), ``study.json`` and every PNG of ``study_dir/plots``; returns the PNG names."""
    md, js = study_dir / "study.md", study_dir / "study.json"
    if not md.is_file() or not js.is_file():
        raise SystemExit(f"error: {study_dir} has no study.md / study.json; run `sparse-opd study --out {study_dir}`")
    plots = results / "study_plots"
    plots.mkdir(parents=True, exist_ok=True)
    names = []
    for png in sorted((study_dir / "plots").glob("*.png")):
        shutil.copyfile(png, plots / png.name)
        names.append(png.name)
    text = rewrite_links(md.read_text())
    tmp = results / "study.md.tmp"
    tmp.write_text(text)
    tmp.replace(results / "study.md")
    data = json.loads(js.read_text())
    for run in data.get("runs", {}).values():
        if isinstance(run, dict):
            run.pop("history", None)
    tmp = results / "study.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(results / "study.json")
    return names


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_dir", type=Path)
    print("copied plots:", ", ".join(publish(ap.parse_args().study_dir)))
