"""Run peft's own test harness on SparseOPD: ``python tests/peft_harness/run.py [MODULE ...] [-- PYTEST_ARGS]``.

Downloads the sdist of the *installed* peft version once (``pip download --no-deps --no-binary :all:
peft==<version>``; the sdist ships peft's ``tests/``) into ``.cache/peft_harness/`` of the repo, extracts its tests
as the package ``peft_tests`` and runs pytest on the given modules (default ``test_custom_models.py``) with the
``sparse_opd_harness`` plugin, which puts our cases (``cases.py``) in place of peft's and keeps only the tests that
run SparseOPD. Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_MODULES = ("test_custom_models.py",)


def peft_tests_dir(cache: Path) -> Path:
    """Return ``<cache>/peft-<version>/peft_tests`` (peft's tests as a package), downloading the sdist if needed."""
    version = importlib.metadata.version("peft")
    root = cache / f"peft-{version}"
    tests = root / "peft_tests"
    if (tests / "test_custom_models.py").is_file():
        return tests
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        subprocess.run([*cmd, f"peft=={version}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("peft-*.tar.gz")
        staging = Path(tmp) / "peft_tests"
        staging.mkdir()
        prefix = f"peft-{version}/tests/"
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                name = member.name
                if not name.startswith(prefix) or not member.isfile() or ".." in Path(name).parts:
                    continue
                rel = name[len(prefix) :]
                dest = staging / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
        (staging / "__init__.py").touch()  # peft's tests import each other relatively (from .testing_common ...)
        root.mkdir(parents=True, exist_ok=True)
        (root / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
        if tests.exists():
            shutil.rmtree(tests)
        shutil.move(str(staging), tests)
    return tests


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(DEFAULT_MODULES), help="peft test modules to run")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "peft_harness", help="download / extract here")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    tests = peft_tests_dir(args.cache)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "pytest", "-p", "sparse_opd_harness", "-c", str(tests.parent / "pytest.ini")]
    cmd += ["--rootdir", str(tests.parent), "-q", "-W", "ignore::DeprecationWarning"]
    cmd += [str(tests / m) for m in args.modules] + extra
    return subprocess.call(cmd, cwd=tests.parent, env=env)


if __name__ == "__main__":
    sys.exit(main())
