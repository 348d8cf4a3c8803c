"""Prompt files: UTF-8 text, one prompt per line (blank lines skipped). A leaf module, read by
the generative trainers' prompt sources and by ``rlprox eval --prompts``."""

from __future__ import annotations

from pathlib import Path


def read_prompt_file(path: str | Path) -> list[str]:
    """The file's non-empty lines, stripped; a one-line ValueError naming the file when it is
    missing, not UTF-8 (with the first bad byte and its offset) or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): save it as UTF-8"
        ) from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one per line)")
    return prompts
