"""The README stays short and true: its code runs, its recipe table is complete, its links resolve.

Code blocks to run are the fenced ``python`` blocks right after an HTML comment
``<!-- test: NAME -->``; each runs in a fresh interpreter in a scratch folder (with
``recipes/`` linked in, so the README's relative paths work), as a reader would run it.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results.md"
USAGE = ROOT / "docs" / "usage.md"  # the reference the README points to
MAX_LINES = 200
MAX_TRAINER_LINES = 40

TESTED_BLOCK = re.compile(r"<!-- test: (?P<name>[\w-]+) -->\s*\n```python\n(?P<code>.*?)^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def readme_blocks() -> dict[str, str]:
    blocks = {m["name"]: m["code"] for m in TESTED_BLOCK.finditer(README.read_text())}
    assert {"api", "trainer"} <= set(blocks), f"README lost a tested block; found {sorted(blocks)}"
    return blocks


def run_block(code: str, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(cwd)]), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=code
    )


@pytest.fixture
def scratch(tmp_path):
    (tmp_path / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    return tmp_path


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES}); move detail to docs/"


def test_api_example_runs(scratch):
    code = readme_blocks()["api"]
    result = run_block(code, scratch, "-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoints/iter-000002" in result.stdout, result.stdout
    assert (scratch / "runs" / "api-demo" / "metrics.jsonl").exists()


def test_custom_trainer_runs_and_is_named_by_a_recipe(scratch):
    code = readme_blocks()["trainer"]
    assert len(code.splitlines()) <= MAX_TRAINER_LINES, "the README's custom trainer must stay minimal"
    result = run_block(code, scratch, "-")
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.strip().splitlines()[-1]) > 0.6  # learned to pull the best arm (mean 0.9)
    # The same code as a module, named by a recipe file (`algo: "module:SPEC"`), through the CLI.
    (scratch / "readme_bandit.py").write_text(code)
    (scratch / "bandit.yaml").write_text(
        'algo: "readme_bandit:SPEC"\noptim: {name: sgd, lr: 0.5}\nrun: {iterations: 3, name: cli, progress: false}\n'
    )
    result = run_block("", scratch, "-m", "rlprox", "train", "bandit.yaml", "bandit.pulls=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: cli, 3 iterations" in result.stdout, result.stdout
    # It has no evaluate hook: rlprox eval says so in one line.
    result = run_block("", scratch, "-m", "rlprox", "eval", "runs/cli")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: algo bandit has no evaluate hook: its checkpoints cannot be evaluated"
    ]


def test_every_recipe_is_in_the_readme_table():
    rows = [line for line in README.read_text().splitlines() if line.startswith("|")]
    in_table = {m for line in rows for m in re.findall(r"`(recipes/[^`]+\.ya?ml)`", line)}
    recipes = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "recipes").rglob("*")
        if p.suffix in (".yaml", ".yml") and "accelerate" not in p.relative_to(ROOT / "recipes").parts
    }
    assert recipes, "no recipes found"
    missing = sorted(recipes - in_table)
    assert not missing, f"recipes missing from the README's recipe table: {missing}"
    stale = sorted(in_table - recipes)
    assert not stale, f"the README's recipe table names recipes that do not exist: {stale}"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", [README, RESULTS, USAGE], ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)  # links in code are code
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for m in LINK.finditer(text):
        target = m["target"]
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target} (no heading #{fragment} in {dest.name})")
    assert not broken, f"{doc.name}: broken relative links: {broken}"
