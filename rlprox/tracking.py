"""Metrics, images, accelerate trackers, progress bar, learning-curve PNG.

Every logged step goes to the accelerate trackers named by ``run.log_with``
(TensorBoard by default) and, on the main process, to ``<run_dir>/metrics.jsonl``
(one JSON object per iteration; an evaluation, run after its iteration's checkpoint,
adds its stats to that iteration's row with ``amend``). Sample images go to the trackers (TensorBoard
``add_image``, W&B ``wandb.Image``) and to ``<run_dir>/samples/<name>-<step>.png``.
At the end, ``learning_curve.png`` plots the algorithm's ``curve = (x_key, y_key)``
from metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

# progress-bar label -> stat key, shown when the algorithm logs it
PROGRESS_FIELDS = {
    "steps": "progress/env_steps",
    "sps": "perf/sps",
    "return": "reward/episodic_return",
    "reward": "reward/mean",
}


def shows_progress(recipe) -> bool:
    """Progress is drawn live (the bar redrawn, phase lines printed): ``run.progress``
    and stderr a terminal. Redirected to a file, the training bar writes a line every
    30 s instead and ``rlprox eval`` / ``export`` print no phases."""
    return bool(recipe.run.progress) and sys.stderr.isatty()


class Tracker:
    def __init__(self, accelerator, run_dir: Path, recipe, curve=None):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.recipe = recipe
        self.curve = curve or ("progress/iteration", "loss/total")
        self.main = accelerator.is_main_process
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.last_checkpoint = None
        self._last_row: tuple[int, int, dict] | None = None  # (file offset, step, row) for amend
        self._trackers_started = False
        self._said_no_moviepy = False  # the note that TensorBoard shows a video's stills was printed
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self, total: int, initial: int = 0) -> None:
        if self.recipe.run.log_with and not self._trackers_started:
            config = _flat(self.recipe.to_dict())
            self.accelerator.init_trackers(self.recipe.run.name, config=config)
            self._trackers_started = True
        if self.main and self.recipe.run.progress:
            # redirected to a file (CI, nohup): a line every 30 s instead of a redraw per iteration
            interval = 0.1 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=self.recipe.run.name,
                unit="it",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
                mininterval=interval,
            )

    def truncate(self, iteration: int) -> None:
        """After a resume: drop lines a killed run logged past its last checkpoint,
        so metrics.jsonl reads as if the run had never stopped."""
        if not self.main or not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if row.get("progress/iteration", 0) <= iteration:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, stats: dict, step: int) -> None:
        # non-finite values are kept (a diverged loss must show, not vanish)
        clean = {k: float(v) for k, v in stats.items() if _is_scalar(v)}
        if self.recipe.run.log_with:
            self.accelerator.log(clean, step=step)
        if not self.main:
            return
        offset = self.metrics_path.stat().st_size if self.metrics_path.exists() else 0
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        self._last_row = (offset, step, clean)
        if self.bar is not None:
            shown = {label: _short(clean[key]) for label, key in PROGRESS_FIELDS.items() if key in clean}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(step - self.bar.n)

    def amend(self, stats: dict, step: int) -> None:
        """Add ``stats`` to the row of ``step``, the last one logged (an evaluation that
        runs after its iteration was logged and checkpointed): the trackers get them at
        the same step, metrics.jsonl keeps one row per iteration."""
        clean = {k: float(v) for k, v in stats.items() if _is_scalar(v)}
        if self.recipe.run.log_with:
            self.accelerator.log(clean, step=step)
        if not self.main:
            return
        if self._last_row is None or self._last_row[1] != step:
            raise ValueError(f"amend: step {step} is not the last logged step")
        offset, _, row = self._last_row
        row = {**row, **clean}
        with open(self.metrics_path, "r+") as f:
            f.seek(offset)
            f.truncate()
            f.write(json.dumps(row) + "\n")
        self._last_row = (offset, step, row)

    def log_images(self, images: dict, step: int, cols: int = 0) -> list[Path]:
        """Grids of (N, 3, H, W) images in [0, 1], one per name: a PNG in the run
        folder's samples/ and an image in every tracker that takes images. Videos
        (N, T, 3, H, W): the PNG of frame strips with the animated GIF (and MP4) beside it
        (``rlprox.images.save_image_grid``); TensorBoard gets the animated grid as a video
        when moviepy is installed (its ``add_video`` needs it), else the still strips as an
        image (said once); W&B gets the GIF."""
        from rlprox.images import frame_strips, make_grid, save_image_grid

        written = []
        if not self.main or not images:
            return written
        for name, batch in images.items():
            safe = name.replace("/", "_")
            written.append(save_image_grid(batch, self.run_dir / "samples" / f"{safe}-{step:06d}.png", cols=cols))
            if not self.recipe.run.log_with:
                continue
            video = batch.ndim == 5
            grid = make_grid(frame_strips(batch) if video else batch, cols=cols)
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    if video and _has_moviepy():
                        import torch

                        frames = np.stack([make_grid(batch[:, t], cols=cols) for t in range(batch.shape[1])])
                        clip = torch.from_numpy(frames).permute(0, 3, 1, 2)[None]  # (1, T, 3, H, W) uint8
                        tracker.writer.add_video(name, clip, global_step=step, fps=4)
                        continue
                    if video and not self._said_no_moviepy:
                        self._said_no_moviepy = True
                        self.message(
                            "tensorboard: no moviepy for add_video; videos are the GIF/MP4 in samples/, "
                            "TensorBoard shows their frame strips"
                        )
                    tracker.writer.add_image(name, grid, global_step=step, dataformats="HWC")
                elif tracker.name == "wandb":
                    import wandb

                    gif = written[-1].with_suffix(".gif")
                    tracker.run.log({name: wandb.Video(str(gif)) if video else wandb.Image(grid)}, step=step)
        return written

    @contextlib.contextmanager
    def phase(self, text: str):
        """Around work between iterations (an evaluation): on a terminal the bar names it
        while it runs, and the bar's s/it leaves its time out either way."""
        bar = self.bar
        if bar is None:
            yield
            return
        desc = bar.desc
        if sys.stderr.isatty():
            bar.set_description_str(f"{desc} ({text})", refresh=True)
        start = time.time()  # tqdm's clock
        try:
            yield
        finally:
            spent = time.time() - start
            bar.start_t += spent
            bar.last_print_t += spent
            bar.set_description_str(desc, refresh=False)

    def message(self, text: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.main and self.recipe.run.plot and self.metrics_path.exists():
            out = self.run_dir / "learning_curve.png"
            if plot_curve(self.metrics_path, out, *self.curve, title=self.recipe.run.name):
                self.curve_path = out


def _is_scalar(v) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, (int, float, np.generic)):
        return True
    return hasattr(v, "numel") and v.numel() == 1


def _short(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.3g}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# how a stat's namespace reads in an axis label; "{}" is the stat's name in words
AXIS_WORDING = {
    "progress": "{}",
    "reward": "{} reward",
    "eval": "evaluation {}",
    "loss": "{} loss",
    "policy": "policy {}",
    "perf": "{}",
    "optim": "{}",
}
WORDS = {"env": "environment", "sps": "steps per second", "lr": "learning rate", "iteration": "iterations"}


def axis_label(key: str) -> str:
    """A stat key as an axis label: "progress/images" -> "images", "reward/mean" ->
    "mean reward", "reward/episodic_return" -> "episodic return", "eval/accuracy" ->
    "evaluation accuracy", "progress/env_steps" -> "environment steps"."""
    namespace, _, name = key.rpartition("/")
    words = " ".join(WORDS.get(w, w) for w in name.split("_"))
    if namespace == "reward" and ("return" in words or "reward" in words):
        return words
    return AXIS_WORDING.get(namespace, namespace.replace("/", " ") + " {}" if namespace else "{}").format(words)


def plot_curve(metrics_path: Path, out: Path, x_key: str, y_key: str, title: str = "") -> bool:
    """Plot ``y_key`` against ``x_key`` from metrics.jsonl; False when there is no data."""
    rows = [r for r in read_metrics(metrics_path) if x_key in r and y_key in r and math.isfinite(r[y_key])]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r[x_key] for r in rows], [r[y_key] for r in rows], lw=1.5, label="training")
    eval_key = y_key.replace("reward/episodic_", "eval/") if y_key.startswith("reward/episodic_") else None
    eval_rows = [r for r in read_metrics(metrics_path) if eval_key and eval_key in r and x_key in r]
    if eval_rows:
        ax.plot([r[x_key] for r in eval_rows], [r[eval_key] for r in eval_rows], "o", label="eval")
        ax.legend()
    ax.set_xlabel(axis_label(x_key))
    ax.set_ylabel(axis_label(y_key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return True


def _has_moviepy() -> bool:
    import importlib.util

    return importlib.util.find_spec("moviepy") is not None
