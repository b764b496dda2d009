"""The repository carries its own documentation: no file points to a design file outside it, and
every repository path a file names (docs/..., tests/..., cotlab_jax/..., configs/..., launch/...)
exists."""

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_ENDINGS = (".py", ".md", ".toml", ".sh", ".sbatch", ".ipynb", ".txt", "run")
# A path into one of the repository's folders, as prose and code write it.
PATH = re.compile(r"(?<![\w/.-])((?:docs|tests|cotlab_jax|configs|launch)/[\w./-]*\w)")
# Paths that name what a command writes or a pattern, not a file of the repository.
GENERATED = ("runs/", "bench_results/")


def tracked_text_files() -> list[str]:
    try:
        out = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [path for path in out.splitlines() if path.endswith(TEXT_ENDINGS)]


def test_no_file_points_outside_the_repository():
    offenders = []
    for path in tracked_text_files():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if re.search(r"DESIGN(\.md| \d)|\.\./shared", line):
                    offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_named_repository_paths_exist():
    missing = []
    for path in tracked_text_files():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            text = f.read()
        for name in sorted(set(PATH.findall(text))):
            name = name.rstrip(".")
            if any(part in name for part in GENERATED) or "*" in name or "<" in name:
                continue
            target = os.path.join(ROOT, name)
            # A module may be named by its dotted path's file or its package folder.
            if not (os.path.exists(target) or os.path.exists(target + ".py")):
                missing.append(f"{path}: {name}")
    assert not missing, "\n".join(missing)
