"""LOOP against DDPO as DDPO runs: arms of the one LOOP trainer on digits alignment (digits-sd, cfg 1), equal images.

    python benchmarks/loop_vs_ddpo.py --stage 1            # every arm × 5 seeds, lr 1e-4, clip 1e-4 (40 runs)
    python benchmarks/loop_vs_ddpo.py --stage 2            # stage 1's best three arms × lr {5e-5, 1e-4, 2e-4}
                                                           # × clip {1e-4, 1e-3} × 3 seeds (54 runs)
    python benchmarks/loop_vs_ddpo.py --stage 2 --arms loop-k4,ddpo-iid,batchnorm --seeds 1   # a part: seed 1
                                                           # of every cell; then per arm --seeds 3 --lrs L --clips C
                                                           # for its best (successive halving; the table says which)
    python benchmarks/loop_vs_ddpo.py --stage 3            # many prompts: LOOP K = 4 vs DDPO i.i.d. on
                                                           # digits-paraphrased (700 prompts), 5 seeds
    python benchmarks/loop_vs_ddpo.py --stage 3 --arms loop-k4,ddpo-iid,control --clips 1e-3 \
        --out benchmarks/results/loop_vs_ddpo_arms_stage3_clip1e-3.md   # at stage 2's best setting, with a
                                                           # control (LOOP on uniform random scores)
    python benchmarks/loop_vs_ddpo.py --stage 1 --images 3200 --max-runs 6   # a part: runs already done are read
                                                           # back, the table lists the cells not run
    python benchmarks/loop_vs_ddpo.py --stage 1 --seeds 1 --arms loop-k4,ddpo-iid --images 128 --eval-size 16 \\
        --out /tmp/lvd/smoke.md                            # smoke
    python benchmarks/loop_vs_ddpo.py --target             # the shipped LOOP recipe on 2 processes (torchrun)

Every arm is a setting of recipes/loop/digits-alignment.yaml (zoo:digits-sd, 20 DDIM steps all trained, η = 1,
cfg 1, full UNet, AdamW with ε 1e-8 and weight decay 1e-4, grad-norm clip 1, advantages clipped to ±5) and samples
the same images per run (``--images``); all but REINFORCE-LOO sample 64 per round in minibatches of 16 (4 optimizer
steps per round):

    loop-k4       LOOP, leave-one-out, K = 4 × 16 prompts          (the reference of every paired difference)
    loop-k8       LOOP, K = 8 × 8 prompts
    loop-k16      LOOP, K = 16 × 4 prompts
    loop-k4-norm  LOOP K = 4, leave-one-out advantages divided by the batch std (normalize_advantages)
    ddpo-iid      DDPO as ddpo-pytorch runs it: K = 1, 64 prompts drawn i.i.d. per round, the per-prompt reward
                  statistics (last 32 rewards, batch mean/std below 16)
    ddpo-k4       DDPO's statistics on LOOP's batches, K = 4 × 16 prompts (the earlier table's DDPO)
    batchnorm     (r − batch mean) / batch std, K = 4 × 16 prompts
    rloo          REINFORCE with the leave-one-out baseline at LOOP's optimizer steps: K = 4 × 4 prompts per round,
                  one on-policy step per round (ρ ≡ 1, so the clip never acts: only the first clip of a grid), 4×
                  the rounds
    control       LOOP K = 4 trained on uniform random scores (benchmarks.loop_flow:uniform_reward), judged on
                  digits_alignment like every arm: what a run with no signal does (the table's "against the control")

Each run is ``rlprox train`` in a fresh process (``--parallel`` at a time, one torch thread) followed by ``rlprox
eval`` of its last checkpoint on a fixed set: ``--eval-size`` items (item i: prompt i mod #prompts, noise seeded by
(EVAL_SEED, i), the same for every run; 400 = the 50 prompts × 8 noises), base and tuned UNet, DDIM η = 1 (trained)
and η = 0. Stage 3 trains and evaluates on digits-paraphrased (400 items: 8 phrasings × the 50 (digit, colour)
pairs, one noise each). The table: every cell (mean ± std over seeds, the IQM with ≥ 5 seeds), the paired
same-seed difference arm − LOOP K = 4 with a Student-t 95% interval at η = 1 and η = 0, the step size (‖Δθ‖ per
optimizer step, run.log_update_norm, and PPO's approx-KL), DDPO's share of per-prompt baselines, and the cells not
run; the PNG beside it is the training reward vs images sampled (mean over seeds). Finished runs live in
``--runs`` (default benchmarks/results/runs/loop_vs_ddpo/, committed): each pruned to its metrics.jsonl and
eval.json once evaluated, and read back instead of trained again, so a grid longer than one sitting finishes
over several, on any machine.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
RECIPE = "recipes/loop/digits-alignment.yaml"
EVAL_SEED = 777  # the fixed evaluation set's noise seed, the same for every run
CONTROL_REWARD = "benchmarks.loop_flow:uniform_reward"  # i.i.d. noise per sample, reproducible
# every arm: the paper settings the stages share (clip and lr are the stage's), the step size logged, no in-run eval
COMMON = ["optim.eps=1e-8", "run.log_update_norm=true", "run.eval_size=0", "loop.minibatch_size=16"]
# name: (label, overrides, images per round)
ARMS = {
    "loop-k4": ("LOOP K = 4", ["loop.num_samples_per_prompt=4", "loop.prompts_per_iteration=16"], 64),
    "loop-k8": ("LOOP K = 8", ["loop.num_samples_per_prompt=8", "loop.prompts_per_iteration=8"], 64),
    "loop-k16": ("LOOP K = 16", ["loop.num_samples_per_prompt=16", "loop.prompts_per_iteration=4"], 64),
    "loop-k4-norm": (
        "LOOP K = 4, normalised advantages",
        ["loop.num_samples_per_prompt=4", "loop.prompts_per_iteration=16", "loop.normalize_advantages=true"],
        64,
    ),
    "ddpo-iid": (
        "DDPO, i.i.d. prompts (K = 1)",
        ["loop.advantage=prompt_stats", "loop.num_samples_per_prompt=1", "loop.prompts_per_iteration=64"],
        64,
    ),
    "ddpo-k4": (
        "DDPO, K = 4",
        ["loop.advantage=prompt_stats", "loop.num_samples_per_prompt=4", "loop.prompts_per_iteration=16"],
        64,
    ),
    "batchnorm": (
        "batch-normalised (no per-prompt statistics)",
        ["loop.advantage=batch_norm", "loop.num_samples_per_prompt=4", "loop.prompts_per_iteration=16"],
        64,
    ),
    "rloo": (
        "REINFORCE-LOO, 1 step per 16 images",
        ["loop.num_samples_per_prompt=4", "loop.prompts_per_iteration=4"],
        16,
    ),
    "control": (
        "control: LOOP K = 4 on a uniform random reward",
        ["loop.num_samples_per_prompt=4", "loop.prompts_per_iteration=16", f"reward.name={CONTROL_REWARD}"],
        64,
    ),
}
REFERENCE = "loop-k4"
CONTROL = "control"  # the same trainer with the signal removed: judged on digits_alignment like every arm
STAGES = {
    1: "every arm at lr 1e-4, clip 1e-4",
    2: "the best three arms of stage 1 over lr × clip",
    3: "many prompts (digits-paraphrased): LOOP K = 4 vs DDPO i.i.d.",
}
STAGE_DEFAULTS = {  # seeds, lrs, clips, arms ("" = the stage's own choice), prompts
    1: (5, "1e-4", "1e-4", ",".join(a for a in ARMS if a != CONTROL), "digits"),
    2: (3, "5e-5,1e-4,2e-4", "1e-4,1e-3", "", "digits"),
    3: (5, "1e-4", "1e-4", "loop-k4,ddpo-iid", "digits-paraphrased"),
}


class Cell(tuple):
    """(arm, lr, clip): one setting, run over seeds."""

    __slots__ = ()

    def __new__(cls, arm: str, lr: float, clip: float):
        return super().__new__(cls, (arm, lr, clip))

    @property
    def arm(self) -> str:
        return self[0]

    def label(self) -> str:
        return f"{ARMS[self[0]][0]}, lr {self[1]:g}, clip {self[2]:g}"


def run_name(cell: Cell, seed: int, images: int, prompts: str) -> str:
    arm, lr, clip = cell
    return f"{arm}-lr{lr:g}-clip{clip:g}-{prompts}-{images}im-s{seed}"


def train_cell(cell: Cell, seed: int, args, runs: Path, train: bool = True) -> dict | None:
    """Train (or read back) one run and evaluate it; None when it has not run and ``train`` is off."""
    arm, lr, clip = cell
    _, overrides, per_round = ARMS[arm]
    name = run_name(cell, seed, args.images, args.prompts)
    overrides = [
        *COMMON,
        *overrides,
        f"loop.prompts={args.prompts}",
        f"loop.eval_prompts={args.prompts}",  # the stages as measured: evaluated on the prompts they train on
        f"seed={seed}",
        f"optim.lr={lr}",
        f"loop.clip_coef={clip}",
        f"run.iterations={max(1, args.images // per_round)}",
        "run.overwrite=true",
    ]
    eval_args = ["--num-samples", str(args.eval_size), "--seed", str(EVAL_SEED)]
    judge = ["reward=digits_alignment"] if arm == CONTROL else []  # the control trained on noise
    done = harness.train_and_eval(
        RECIPE,
        overrides,
        runs,
        name,
        eval_args,
        reuse=True,
        eval_overrides=judge,
        read_only=not train,
        keep_weights=False,  # the tables read metrics.jsonl and eval.json only: a run folder stays ~100 kB
    )
    if done is None:
        return None
    rows, ev = done

    def run_mean(key):
        values = [r[key] for r in rows if key in r]
        return statistics.mean(values) if values else float("nan")

    return {
        "cell": cell,
        "seed": seed,
        "name": name,
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
        "images": int(rows[-1]["progress/images"]),
        "rounds": len(rows),
        "base": ev["eval/base_reward"],
        "tuned": ev["eval/reward"],
        "base0": ev["eval/base_reward_eta0"],
        "tuned0": ev["eval/reward_eta0"],
        "update_norm": run_mean("optim/update_norm"),
        "approx_kl": run_mean("policy/approx_kl"),
        "tracked": run_mean("reward/prompt_stats_tracked"),
        # the control's reward is noise: its curve is the batch's true digits_alignment, as every other arm's is
        "curve": [(r["progress/images"], r["reward/alignment" if arm == CONTROL else "reward/mean"]) for r in rows],
    }


def run_cells(cells: list[Cell], seeds: list[int], args, runs: Path) -> tuple[dict, list]:
    """Every (cell, seed), seed major (a partial run covers every cell's first seeds): runs already done are read
    back; at most ``args.max_runs`` new ones are trained. Returns ({cell: [run, ...]}, [(cell, seed) not run])."""
    results: dict[Cell, list] = {}
    missing, to_train = [], []
    for seed in seeds:
        for cell in cells:
            done = train_cell(cell, seed, args, runs, train=False)
            if done is not None:
                results.setdefault(cell, []).append(done)
            elif args.max_runs is None or len(to_train) < args.max_runs:
                to_train.append((cell, seed))
            else:
                missing.append((cell, seed))
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(train_cell, cell, seed, args, runs): (cell, seed) for cell, seed in to_train}
        for fut in concurrent.futures.as_completed(futures):
            try:
                res = fut.result()
            except RuntimeError as err:  # one failed run is a cell not run, not a lost table
                print(f"FAILED {futures[fut]}: {str(err)[-600:]}", flush=True)
                missing.append(futures[fut])
                continue
            results.setdefault(res["cell"], []).append(res)
            print(
                f"{res['name']}: η=1 {res['base']:.3f} -> {res['tuned']:.3f}, η=0 {res['base0']:.3f} -> "
                f"{res['tuned0']:.3f}, |Δθ| {res['update_norm']:.2e}, {res['minutes']:.1f} min",
                flush=True,
            )
    for runs_ in results.values():
        runs_.sort(key=lambda r: r["seed"])
    return results, sorted(missing, key=lambda m: (m[1], cells.index(m[0])))


def best_arms(args, runs: Path, n: int = 3) -> list[str]:
    """Stage 2's arms: the ``n`` arms of stage 1 (lr 1e-4, clip 1e-4, these images and prompts) with the highest
    seed mean of the tuned η = 1 alignment, over the stage-1 runs found in ``runs``."""
    found = {}
    for arm in (a for a in ARMS if a != CONTROL):
        cell = Cell(arm, 1e-4, 1e-4)
        done = [r for s in range(1, 6) if (r := train_cell(cell, s, args, runs, train=False))]
        if done:
            found[arm] = statistics.mean(r["tuned"] for r in done)
    if len(found) < n:
        sys.exit(f"--stage 2 needs stage 1's runs of at least {n} arms in {runs} (found {len(found)}); or give --arms")
    return sorted(found, key=found.get, reverse=True)[:n]


# ----------------------------------------------------------------------------- the table


def paired(mine: list[dict], theirs: list[dict], key: str) -> str:
    """Mean same-seed difference mine − theirs of ``key`` with its Student-t 95% interval over seeds."""
    return harness.paired_difference(mine, theirs, key)


def reference_for(cell: Cell, results: dict) -> Cell | None:
    """LOOP K = 4 at the cell's lr and clip when it ran, else at lr 1e-4, clip 1e-4 (stage 1's setting)."""
    for ref in (Cell(REFERENCE, cell[1], cell[2]), Cell(REFERENCE, 1e-4, 1e-4)):
        if ref in results:
            return ref
    return None


def table(results: dict, missing: list, cells: list[Cell], args, png: Path) -> str:
    first = next(iter(results.values()))[0] if results else None
    command = (
        f"python benchmarks/loop_vs_ddpo.py --stage {args.stage} --arms {args.arms} --seeds {args.seeds} "
        f"--lrs {args.lrs} --clips {args.clips} --images {args.images} --eval-size {args.eval_size} "
        f"--prompts {args.prompts}" + (f" --max-runs {args.max_runs}" if args.max_runs is not None else "")
    )
    lines = [
        f"# LOOP vs DDPO as DDPO runs, stage {args.stage}: {STAGES[args.stage]} (digits-sd, cfg 1)",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared with other jobs), python "
        f"{platform.python_version()}; `{command}`.",
        "",
        f"Each run: {args.images:,} images sampled (64 per round in minibatches of 16, 4 AdamW steps per round; "
        "REINFORCE-LOO 16 per round, one step), prompts "
        f"`{args.prompts}`, 20 DDIM steps all trained, η = 1, cfg 1, full UNet, AdamW ε 1e-8, weight decay 1e-4, "
        f"grad-norm clip 1, advantages clipped to ±5, 1 torch thread, {args.parallel} run(s) at a time. Alignment = "
        f"digits_alignment on a fixed evaluation set ({args.eval_size} items: prompt i mod #prompts, noise seeded by "
        "i, the same for every run), base → tuned, with the trained sampler (DDIM η = 1) and deterministic DDIM "
        "(η = 0). mean ± std over seeds; IQM = interquartile mean over seeds (with ≥ 5 seeds). − LOOP K = 4: the "
        "same-seed difference of the tuned alignment, mean [Student-t 95% interval over seeds; per-seed differences; "
        "MDE at 80% power; exploratory below 5 seeds] (against LOOP K = 4 "
        "at the same lr and clip, or at lr 1e-4, clip 1e-4 where marked *). ‖Δθ‖/step: the L2 norm of each "
        "optimizer step's change of the UNet's weights, mean over the run; approx-KL: PPO's k3 estimate of "
        "KL(π_old ‖ π_θ) per trained step and minibatch, mean over the run; tracked: DDPO's share of samples "
        "baselined by their own prompt's statistics (the rest by the batch's).",
        "",
        "## Every cell",
        "",
        "| arm | lr | clip | seeds | η = 1: base → tuned | Δ η = 1 | IQM tuned η = 1 | − LOOP K = 4, η = 1 | "
        "η = 0: base → tuned | Δ η = 0 | − LOOP K = 4, η = 0 | ‖Δθ‖/step | approx-KL | tracked | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        runs = results.get(cell)
        if not runs:
            continue
        arm, lr, clip = cell
        ref = reference_for(cell, results)
        mark = "" if ref is None or (ref[1], ref[2]) == (lr, clip) else "*"
        vs1 = "—" if ref is None or ref == cell else paired(runs, results[ref], "tuned") + mark
        vs0 = "—" if ref is None or ref == cell else paired(runs, results[ref], "tuned0") + mark
        tracked = [r["tracked"] for r in runs if r["tracked"] == r["tracked"]]  # NaN: not a DDPO arm
        tuned, tuned0 = [r["tuned"] for r in runs], [r["tuned0"] for r in runs]
        lines.append(
            f"| {ARMS[arm][0]} | {lr:g} | {clip:g} | {len(runs)} | {harness.mean_sd([r['base'] for r in runs])} → "
            f"{harness.mean_sd(tuned)} | **{harness.mean_sd([r['tuned'] - r['base'] for r in runs])}** | "
            f"{f'{harness.iqm(tuned):.3f}' if len(runs) >= 5 else '—'} | {vs1} | "
            f"{harness.mean_sd([r['base0'] for r in runs])} → {harness.mean_sd(tuned0)} | "
            f"{harness.mean_sd([r['tuned0'] - r['base0'] for r in runs])} | {vs0} | "
            f"{statistics.mean(r['update_norm'] for r in runs):.2e} | "
            f"{statistics.mean(r['approx_kl'] for r in runs):.1e} | "
            f"{f'{statistics.mean(tracked):.2f}' if tracked else '—'} | "
            f"{statistics.mean(r['minutes'] for r in runs):.1f} |"
        )
    if len(cells) > len({c.arm for c in cells}):  # stage 2: more than one setting per arm
        lines += best_section(results, cells)
    lines += control_section(results, cells)
    lines += ["", "Per run (Δ η = 1 / Δ η = 0 / ‖Δθ‖ per step / minutes):", ""]
    for cell in cells:
        if cell in results:
            lines.append(
                f"- {cell.label()}: "
                + ", ".join(
                    f"seed {r['seed']}: {r['tuned'] - r['base']:+.3f} / {r['tuned0'] - r['base0']:+.3f} / "
                    f"{r['update_norm']:.2e} / {r['minutes']:.1f} min"
                    for r in results[cell]
                )
            )
    lines += ["", f"## Cells not run ({len(missing)})", ""]
    if missing:
        by_cell: dict[Cell, list[int]] = {}
        for cell, seed in missing:
            by_cell.setdefault(cell, []).append(seed)
        lines += [f"- {c.label()}: seeds {', '.join(map(str, sorted(s)))}" for c, s in by_cell.items()]
    else:
        lines.append("None: every cell ran.")
    if first is not None:
        lines += ["", f"![training reward vs images sampled, mean over seeds]({png.name})", ""]
    return "\n".join(lines) + "\n"


def control_section(results: dict, cells: list[Cell]) -> list[str]:
    """Each arm − the control (the same lr and clip, the same seed): what the reward's signal adds over a run of
    the same trainer on noise. Empty without a control cell."""
    rows = []
    for cell in cells:
        control = Cell(CONTROL, cell[1], cell[2])
        if cell.arm == CONTROL or cell not in results or control not in results:
            continue
        runs, ctrl = results[cell], results[control]
        rows.append(f"| {cell.label()} | {paired(runs, ctrl, 'tuned')} | {paired(runs, ctrl, 'tuned0')} |")
    if not rows:
        return []
    head = ["", "## Against the control", "", "Same-seed difference arm − control (the same lr and clip), tuned "]
    head[-1] += "alignment, mean [Student-t 95% interval over seeds; per seed; MDE]."
    return head + ["", "| arm | − control, η = 1 | − control, η = 0 |", "|---|---|---|", *rows]


def best_section(results: dict, cells: list[Cell]) -> list[str]:
    """Stage 2's best setting per arm: the highest mean tuned η = 1 alignment over the seeds that every run cell of
    the arm has (all seeds when the grid is complete; seed 1 when only the chosen cells got more, as successive
    halving does). Paired with LOOP K = 4's best on every common seed, and on the seeds the choice did not see."""
    by_arm: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell in results:
            by_arm.setdefault(cell.arm, []).append(cell)

    def seeds_of(cell):
        return {r["seed"] for r in results[cell]}

    best, chosen_on = {}, {}
    for arm, arm_cells in by_arm.items():
        common = set.intersection(*(seeds_of(c) for c in arm_cells))
        chosen_on[arm] = common

        def score(cell, common=common):
            return statistics.mean(r["tuned"] for r in results[cell] if r["seed"] in common)

        best[arm] = max(arm_cells, key=score)
    lines = ["", "## Best setting per arm", ""]
    lines += [
        'Chosen by the highest mean tuned η = 1 alignment over the seeds every run cell of the arm has ("chosen '
        'on"); its other seeds did not take part in the choice, so the difference on them ("unseen seeds") is '
        "free of the choice's optimism.",
        "",
        "| arm | lr | clip | chosen on seeds | seeds | tuned η = 1 | tuned η = 0 | − LOOP K = 4 (its best), η = 1 | "
        "same, unseen seeds only | − LOOP K = 4 (its best), η = 0 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = best.get(REFERENCE)
    for arm, cell in best.items():
        runs = results[cell]
        vs = vs_unseen = vs0 = "—"
        if ref is not None and arm != REFERENCE:
            vs, vs0 = paired(runs, results[ref], "tuned"), paired(runs, results[ref], "tuned0")
            seen = chosen_on[arm] | chosen_on[REFERENCE]
            unseen = [r for r in runs if r["seed"] not in seen]
            vs_unseen = paired(unseen, [r for r in results[ref] if r["seed"] not in seen], "tuned")
        lines.append(
            f"| {ARMS[arm][0]} | {cell[1]:g} | {cell[2]:g} | {', '.join(map(str, sorted(chosen_on[arm])))} | "
            f"{len(runs)} | {harness.mean_sd([r['tuned'] for r in runs])} | "
            f"{harness.mean_sd([r['tuned0'] for r in runs])} | {vs} | {vs_unseen} | {vs0} |"
        )
    # a check on the choice: among each arm's cells with the most seeds, the best by the mean over all of them
    full = {}
    for arm, arm_cells in by_arm.items():
        most = max(len(results[c]) for c in arm_cells)
        tops = sorted(
            (c for c in arm_cells if len(results[c]) == most),
            key=lambda c: statistics.mean(r["tuned"] for r in results[c]),
            reverse=True,
        )
        full[arm] = tops
    if all(len(t) > 1 for t in full.values()) and REFERENCE in full:
        lines += [
            "",
            "Check on the choice: each arm's cells with the most seeds, ranked by their mean over all seeds.",
            "",
        ]
        lines += ["| arm | rank | lr | clip | seeds | tuned η = 1 | − LOOP K = 4 (same rank), η = 1 | same, η = 0 |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for arm, tops in full.items():
            for rank, cell in enumerate(tops, 1):
                runs = results[cell]
                ref = full[REFERENCE][rank - 1] if rank <= len(full[REFERENCE]) else None
                vs = vs0 = "—"
                if ref is not None and arm != REFERENCE:
                    vs, vs0 = paired(runs, results[ref], "tuned"), paired(runs, results[ref], "tuned0")
                lines.append(
                    f"| {ARMS[arm][0]} | {rank} | {cell[1]:g} | {cell[2]:g} | {len(runs)} | "
                    f"{harness.mean_sd([r['tuned'] for r in runs])} | {vs} | {vs0} |"
                )
    return lines


def plot(results: dict, cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=100)
    arms = list(dict.fromkeys(c.arm for c in cells))
    settings = list(dict.fromkeys((c[1], c[2]) for c in cells))
    for cell in cells:
        runs = results.get(cell)
        if not runs:
            continue
        # colour and line style tell arm and lr × clip setting apart (colour for the longer list)
        a, b = arms.index(cell.arm), settings.index(cell[1:])
        colour, dash = (b, a) if len(settings) > len(arms) else (a, b)
        style = dict(color=f"C{colour % 10}", ls=["-", "--", ":", "-."][dash % 4])
        n = min(len(r["curve"]) for r in runs)
        x = np.array([p[0] for p in runs[0]["curve"][:n]])
        y = np.mean([[p[1] for p in r["curve"][:n]] for r in runs], axis=0)
        k = max(1, n // 10)  # moving average over ~10% of the run (the same images for every arm)
        y = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], y, label=f"{cell.label()} ({len(runs)} seeds)", lw=1.2, **style)
    ax.set_xlabel("images sampled")
    ax.set_ylabel("training reward (digits_alignment, η = 1), moving average")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- the shipped recipe's target


def target_check(seeds: int, out_path: Path) -> None:
    """The shipped LOOP recipe, 2 processes (torchrun), seeds 1..seeds, one after another."""
    harness.target_check(
        RECIPE,
        seeds,
        out_path,
        title="# LOOP, the shipped recipe on 2 CPU processes: does η = 1 alignment rise by ≥ 0.15 within 20 minutes?",
        command=f"python benchmarks/loop_vs_ddpo.py --target --seeds {seeds}",
        setup="recipes/loop/digits-alignment.yaml unchanged (150 rounds × 16 "
        "prompts × K = 4 per process, full UNet, lr 1e-4, clip 1e-4) under "
        "`torchrun --nproc_per_node 2`; minutes = summed iteration wall time (training and the in-run evaluations).",
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--stage", type=int, choices=sorted(STAGES), default=1, help="; ".join(f"{k}: {v}" for k, v in STAGES.items())
    )
    parser.add_argument("--arms", default=None, help=f"comma-separated, of {', '.join(ARMS)} (default: the stage's)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 1..N (default: 5, stage 2: 3)")
    parser.add_argument("--lrs", default=None, help="comma-separated lr grid (default: the stage's)")
    parser.add_argument("--clips", default=None, help="comma-separated PPO clip grid (default: the stage's)")
    parser.add_argument("--images", type=int, default=6400, help="images sampled per run, every arm the same")
    parser.add_argument("--prompts", default=None, help="loop.prompts (default: digits; stage 3: digits-paraphrased)")
    parser.add_argument("--eval-size", type=int, default=400, help="fixed evaluation items per run (400 = 50 × 8)")
    parser.add_argument("--max-runs", type=int, default=None, help="train at most N new runs, then write the table")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (one torch thread each)")
    parser.add_argument(
        "--runs",
        default=str(ROOT / "benchmarks" / "results" / "runs" / "loop_vs_ddpo"),
        help="run folders (pruned to metrics and eval results, ~100 kB, and kept in the repository); a finished "
        "run with the same arguments is read back, not trained again",
    )
    parser.add_argument("--out", default=None, help="table (default: results/loop_vs_ddpo_arms[_stageN].md)")
    parser.add_argument("--target", action="store_true", help="the shipped LOOP recipe on 2 processes instead")
    args = parser.parse_args(argv)
    seeds, lrs, clips, arms, prompts = STAGE_DEFAULTS[args.stage]
    args.seeds = seeds if args.seeds is None else args.seeds
    args.lrs, args.clips = args.lrs or lrs, args.clips or clips
    args.arms, args.prompts = args.arms if args.arms is not None else arms, args.prompts or prompts
    unknown = [a for a in args.arms.split(",") if a and a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(ARMS)})")
    if args.images < 64:
        parser.error(f"--images: at least one round of 64 images (got {args.images})")
    if args.out is None:
        suffix = "" if args.stage == 1 else f"_stage{args.stage}"
        args.out = str(RESULTS / f"loop_vs_ddpo_arms{suffix}.md")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.target:
        target_check(args.seeds, RESULTS / "loop_target.md")
        return
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if not args.arms:  # stage 2 without --arms
        args.arms = ",".join(best_arms(args, runs))
        print(f"stage 2 arms (stage 1's best three): {args.arms}", flush=True)
    clips = [float(c) for c in args.clips.split(",")]
    cells = [
        Cell(arm, float(lr), clip)
        for arm in args.arms.split(",")
        for lr in args.lrs.split(",")
        for clip in (clips[:1] if arm == "rloo" else clips)  # REINFORCE's ratio is 1: the clip never acts
    ]
    results, missing = run_cells(cells, list(range(1, args.seeds + 1)), args, runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    if results:
        plot(results, cells, png)
    text = table(results, missing, cells, args, png)
    print(text)
    out.write_text(text)


if __name__ == "__main__":
    main()
