"""Shared by the benchmark scripts: train a recipe in a fresh process, evaluate its last
checkpoint with ``rlprox eval``, and hand back the logged rows and the eval results; run a
shipped recipe under torchrun for seeds 1..N and write its "does it reach the target" table.

``python benchmarks/harness.py eval-with OVERRIDE... -- CHECKPOINT EVAL_ARGS...`` is ``rlprox eval``
with recipe overrides applied to the checkpoint's recipe (e.g. ``reward=digits_alignment``: a run
trained on another reward evaluated on that one)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["run.log_with=[]", "run.progress=false", "run.plot=false", "run.save_every=0"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _train_command(recipe: str, overrides: list[str], out: Path, name: str) -> list[str]:
    train = [sys.executable, "-m", "rlprox", "train", str(ROOT / recipe), *overrides]
    return train + [f"run.output_dir={out}", f"run.name={name}", *QUIET]


def _eval_command(run: Path, eval_args: list[str], eval_overrides: list[str] = ()) -> list[str]:
    evaluate = [sys.executable, "-m", "rlprox", "eval", str(run), *eval_args]
    if eval_overrides:
        evaluate = [sys.executable, __file__, "eval-with", *eval_overrides, "--", *evaluate[3:]]
    return evaluate


def _portable(args: list[str], out: Path) -> list[str]:
    """Command arguments as recorded beside a run: the runs folder and the checkout as ``{runs}`` and
    ``{root}``, so a run folder moved to another machine or checkout (e.g. committed under
    benchmarks/results/runs/) is still recognised as the same run."""
    return [a.replace(str(out), "{runs}").replace(str(ROOT), "{root}") for a in args]


def _recipe_hash(recipe: str) -> str:
    """The hash (sha256, 16 hex digits) of the recipe's parsed content, kept in a run's record: a run
    trained from a recipe whose settings have since changed is not read back as a run of the new one
    (comments and layout do not count)."""
    import hashlib

    import yaml

    content = yaml.safe_load((ROOT / recipe).read_text())
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def prune(run: Path) -> None:
    """Drop a finished run's checkpoint files except each checkpoint's own eval*.json: what the tables
    read (metrics.jsonl, eval.json, the record) stays, small enough to keep in the repository."""
    for path in sorted((run / "checkpoints").rglob("*"), reverse=True):
        kept = path.parent.parent == run / "checkpoints" and path.match("eval*.json")
        if path.is_file() and not kept:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _run_command(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")


def train_and_eval(
    recipe: str,
    overrides: list[str],
    out: Path,
    name: str,
    eval_args: list[str],
    reuse: bool = False,
    eval_overrides: list[str] = (),
    read_only: bool = False,
    keep_weights: bool = True,
) -> tuple[list[dict], dict] | None:
    """(metrics.jsonl rows, eval.json) of ``rlprox train RECIPE OVERRIDES`` in
    ``out/name`` followed by ``rlprox eval`` with ``eval_args`` (one torch thread).
    ``reuse``: a run that finished both commands with these same arguments and recipe settings
    text (recorded in ``out/name/benchmark-run.json``, paths made portable) is read back
    instead of trained again. ``eval_overrides``: recipe overrides for the evaluation only
    (``eval-with`` above). ``read_only``: such a finished run read back, or None; nothing
    is trained. ``keep_weights=False``: ``prune`` the run once evaluated."""
    train = _train_command(recipe, overrides, out, name)
    evaluate = _eval_command(out / name, eval_args, eval_overrides)
    record = out / name / "benchmark-run.json"
    wanted = {"train": _portable(train[3:], out), "eval": _portable(evaluate[3:], out), "recipe": _recipe_hash(recipe)}
    if (reuse or read_only) and record.exists() and json.loads(record.read_text()) == wanted:
        return _results(out / name)
    if read_only:
        return None
    for cmd in (train, evaluate):
        _run_command(cmd, f"{name}: rlprox {'train' if cmd is train else 'eval'}")
    record.write_text(json.dumps(wanted))
    if not keep_weights:
        prune(out / name)
    return _results(out / name)


def paired_difference(mine: list[dict], theirs: list[dict], key: str, digits: int = 3) -> str:
    """The mean same-seed difference mine − theirs of ``key`` (runs are dicts with a ``seed``), with its
    Student-t 95% interval, the per-seed differences and the MDE (``stats.Paired.format``); "—" when no
    seed is shared, "exploratory" below 5 seeds."""
    return stats.paired_runs(mine, theirs, key).format(digits)


def iqm(values) -> float:
    """Interquartile mean: the mean after cutting int(n/4) values from each end (rliable's
    ``scipy.stats.trim_mean(values, 0.25)``)."""
    v = sorted(float(x) for x in values)
    cut = int(0.25 * len(v))
    return sum(v[cut : len(v) - cut]) / (len(v) - 2 * cut)


def train_run(recipe: str, overrides: list[str], out: Path, name: str, reuse: bool = False) -> list[dict]:
    """The metrics.jsonl rows of ``rlprox train RECIPE OVERRIDES`` in ``out/name`` (one torch thread);
    ``reuse``: a run that finished with these same arguments and recipe (``out/name/benchmark-train.json``)
    is read back."""
    train = _train_command(recipe, overrides, out, name)
    record = out / name / "benchmark-train.json"
    wanted = {"train": _portable(train[3:], out), "recipe": _recipe_hash(recipe)}
    if not (reuse and record.exists() and json.loads(record.read_text()) == wanted):
        _run_command(train, f"{name}: rlprox train")
        record.write_text(json.dumps(wanted))
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def evaluate_run(
    run: Path, eval_args: list[str], tag: str, eval_overrides: list[str] = (), reuse: bool = False
) -> dict:
    """``rlprox eval`` of the run's newest checkpoint with ``eval_args`` (and recipe ``eval_overrides``), its
    eval.json kept as ``eval-TAG.json`` next to it; ``reuse``: one made with these same arguments is read back.
    Several evaluations of one run (guidance scales, evaluation seeds) each keep their file."""
    evaluate = _eval_command(run, eval_args, eval_overrides)
    ckpt = sorted((run / "checkpoints").glob("iter-*"))[-1]
    kept = ckpt / f"eval-{tag}.json"
    if reuse and kept.exists():
        result = json.loads(kept.read_text())
        if result.get("benchmark_eval") == evaluate[3:]:
            return result
    _run_command(evaluate, f"{run.name}: rlprox eval ({tag})")
    result = json.loads((ckpt / "eval.json").read_text()) | {"benchmark_eval": evaluate[3:]}
    kept.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _results(run: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ckpt = sorted((run / "checkpoints").glob("iter-*"))[-1]
    return rows, json.loads((ckpt / "eval.json").read_text()) | {"checkpoint": str(ckpt)}


def eval_with(argv: list[str]) -> int:
    """``rlprox eval`` (the CLI, in this process) with ``OVERRIDE... --`` before its arguments
    applied to the checkpoint's stored recipe: for the evaluation's rebuild only, nothing is written
    back. For a run trained on another reward (a control) evaluated on the benchmark's reward."""
    sys.path.insert(0, str(ROOT))  # this tree's rlprox and plugin modules, whatever is installed
    split = argv.index("--")
    overrides, args = argv[:split], argv[split + 1 :]
    from rlprox import checkpoint
    from rlprox.cli import main

    read = checkpoint.read_recipe
    checkpoint.read_recipe = lambda path, extra=None: read(path, [*(extra or []), *overrides])
    return main(args)


def mean_sd(values: list[float]) -> str:
    """ "mean ± sample std" (the one value alone when there is one)."""
    import statistics

    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_run(
    recipe: str, overrides: list[str], out: Path, name: str, nproc: int = 2, reuse: bool = True
) -> list[dict]:
    """The metrics.jsonl rows of ``torchrun --nproc_per_node NPROC -m rlprox train RECIPE OVERRIDES`` (one
    torch thread per process) in ``out/name``. ``reuse``: a run that finished with the same arguments
    and recipe settings (``benchmark-train.json`` beside it, paths made portable) is read back instead of trained
    again."""
    import shutil

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    train = _torchrun_args(recipe, overrides, out, name)
    record = out / name / "benchmark-train.json"
    if not (reuse and torchrun_finished(recipe, overrides, out, name)):
        cmd = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", "rlprox"]
        done = subprocess.run([*cmd, "train", *train], cwd=ROOT, env=_env(), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        record.write_text(json.dumps(_torchrun_record(recipe, overrides, out, name)))
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def _torchrun_args(recipe: str, overrides: list[str], out: Path, name: str) -> list[str]:
    train = [str(ROOT / recipe), *overrides, f"run.output_dir={out}", f"run.name={name}"]
    return train + ["run.log_with=[]", "run.progress=false", "run.plot=false", "run.overwrite=true"]


def torchrun_finished(recipe: str, overrides: list[str], out: Path, name: str) -> bool:
    """Whether ``out/name`` holds a run that ``torchrun_run`` finished with these arguments and recipe."""
    record = out / name / "benchmark-train.json"
    return record.exists() and json.loads(record.read_text()) == _torchrun_record(recipe, overrides, out, name)


def _torchrun_record(recipe: str, overrides: list[str], out: Path, name: str) -> dict:
    return {"train": _portable(_torchrun_args(recipe, overrides, out, name), out), "recipe": _recipe_hash(recipe)}


def torchrun_target(
    recipe: str, seeds: int, prefix: str, nproc: int = 2, overrides: list[str] = (), out: Path | None = None
) -> list[tuple[int, list[dict]]]:
    """``torchrun_run`` of RECIPE with ``seed=S OVERRIDES`` for seeds 1..``seeds``, one after another, in
    ``out/PREFIX-sS`` (default: a new temporary folder): [(seed, metrics.jsonl rows)]. With ``out`` given, a
    run that finished with the same arguments is read back instead of trained again."""
    reuse = out is not None
    out = Path(tempfile.mkdtemp(prefix=f"{prefix}_")) if out is None else out
    return [
        (seed, torchrun_run(recipe, [f"seed={seed}", *overrides], out, f"{prefix}-s{seed}", nproc, reuse))
        for seed in range(1, seeds + 1)
    ]


def target_check(
    recipe: str,
    seeds: int,
    out_path: Path,
    *,
    title: str,
    command: str,
    setup: str,
    trained: str = "η = 1",
    deterministic: tuple[str, str] = ("η = 0", "_eta0"),
    gain: float = 0.15,
    minutes: float = 20.0,
    prefix: str = "loop-target",
    overrides: list[str] = (),
) -> str:
    """The shipped generative recipe on 2 processes (``torchrun_target``), seeds 1..``seeds``: per seed
    the images, minutes (summed iteration wall time), base → tuned eval reward with the trained sampler
    (``trained``, eval/reward) and the deterministic one (``deterministic`` = (label, eval key suffix)),
    and Δ at every in-run evaluation; then whether Δ ≥ ``gain`` within ``minutes`` on every seed (a verdict
    with 5 seeds or more; with fewer, the count only, marked exploratory).
    ``overrides``: recipe overrides for every seed. Writes ``out_path`` and returns the text."""
    det_label, det = deterministic
    rows = []
    for seed, metrics in torchrun_target(recipe, seeds, prefix, overrides=overrides):
        last = metrics[-1]
        evals = [
            (int(r["progress/images"]), r["eval/reward"] - r["eval/base_reward"])
            for r in metrics
            if "eval/reward" in r
        ]
        rows.append(
            {
                "seed": seed,
                "minutes": sum(r["perf/iteration_s"] for r in metrics) / 60,
                "images": int(last["progress/images"]),
                "base": last["eval/base_reward"],
                "tuned": last["eval/reward"],
                "base0": last[f"eval/base_reward{det}"],
                "tuned0": last[f"eval/reward{det}"],
                "evals": evals,
            }
        )
        r = rows[-1]
        print(f"seed {seed}: {r['base']:.3f} -> {r['tuned']:.3f} in {r['minutes']:.1f} min", flush=True)
    lines = [
        title,
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; `{command}`: {setup}",
        "",
        f"| seed | images | minutes | {trained}: base → tuned (Δ) | {det_label}: base → tuned (Δ) "
        f"| Δ {trained} at each evaluation (images) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['images']:,} | {r['minutes']:.1f} | {r['base']:.3f} "
            f"→ {r['tuned']:.3f} (**{r['tuned'] - r['base']:+.3f}**) | "
            f"{r['base0']:.3f} → {r['tuned0']:.3f} ({r['tuned0'] - r['base0']:+.3f}) "
            f"| {', '.join(f'{d:+.3f} ({n:,})' for n, d in r['evals'])} |"
        )
    met = sum(r["tuned"] - r["base"] >= gain and r["minutes"] <= minutes for r in rows)
    if stats.is_exploratory(len(rows)):  # fewer than 5 seeds: the count, no verdict word
        status = f"exploratory (n = {len(rows)}; a verdict needs {stats.MIN_SEEDS_FOR_VERDICT} seeds or more)"
    else:
        status = f"**{'met' if met == len(rows) else 'not met'}**"
    lines += [
        "",
        f"Target (≥ +{gain:.2f} at {trained} within {minutes:g} minutes, {len(rows)} of {len(rows)} seeds): "
        f"{status}: {met}/{len(rows)} seeds reached it.",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out_path.write_text(text)
    return text


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "eval-with":
        sys.exit(eval_with(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} eval-with OVERRIDE... -- CHECKPOINT [rlprox eval arguments]")
