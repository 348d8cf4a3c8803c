"""The digits world's data: scikit-learn's bundled 8×8 digits, upsampled and coloured.

Each base image (1,797 in ``load_digits``) is upsampled bilinearly to 16×16 and drawn
in every one of five named colours on a dark background::

    image = 0.05 + 0.95 · gray · rgb(colour)        # (3, 16, 16) in [0, 1]

and paired with the prompt ``"a {colour} {digit word}"`` ("a red seven"). The split is
by base image, so a held-out digit is never seen in any colour during training:
base index ``i % 5 == 0`` is held out (360 base images, 1,800 coloured ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 1.0, 0.1),
    "blue": (0.2, 0.4, 1.0),
    "yellow": (1.0, 1.0, 0.1),
    "white": (1.0, 1.0, 1.0),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
NUM_CLASSES = len(DIGIT_WORDS) * len(COLOUR_NAMES)  # 50 (digit, colour) classes
IMAGE_SIZE = 16
BACKGROUND = 0.05


def prompt_for(digit: int, colour: int) -> str:
    """``prompt_for(7, 0) == "a red seven"``."""
    return f"a {COLOUR_NAMES[colour]} {DIGIT_WORDS[digit]}"


# ways to say "a <colour> <digit>" in the words of the digits tokenizer (rlprox.zoo.sd.PROMPT_WORDS, at most 6
# words), each naming one digit word and one colour word, so parse_prompt and the alignment reward read every one
PHRASINGS: tuple[str, ...] = (
    "a {colour} {digit}",
    "the {colour} {digit}",
    "{colour} {digit}",
    "a {colour} digit {digit}",
    "a {colour} number {digit}",
    "the {colour} digit {digit}",
    "the {colour} number {digit}",
    "{digit} in {colour}",
    "a {digit} in {colour}",
    "the {digit} in {colour}",
    "a digit {digit} in {colour}",
    "a number {digit} in {colour}",
    "the digit {digit} in {colour}",
    "the number {digit} in {colour}",
)


def digits_prompts() -> tuple[list[str], list[dict]]:
    """The 50 prompts "a <colour> <digit>", digit major, with their {"digit", "colour"} metadata."""
    pairs = [(d, c) for d in range(len(DIGIT_WORDS)) for c in range(len(COLOUR_NAMES))]
    return [prompt_for(d, c) for d, c in pairs], [{"digit": d, "colour": c} for d, c in pairs]


def paraphrased_prompts() -> tuple[list[str], list[dict]]:
    """Every phrasing of ``PHRASINGS`` for each of the 50 (digit, colour) pairs: 14 × 50 = 700 prompts,
    phrasing major (prompt i: phrasing i // 50, pair i mod 50 in ``digits_prompts``' order). Sampled i.i.d.,
    a prompt recurs 14× more rarely than in "digits", so a per-prompt reward statistic sees few of its rewards."""
    pairs = [(d, c) for d in range(len(DIGIT_WORDS)) for c in range(len(COLOUR_NAMES))]
    prompts = [p.format(colour=COLOUR_NAMES[c], digit=DIGIT_WORDS[d]) for p in PHRASINGS for d, c in pairs]
    return prompts, [{"digit": d, "colour": c} for _ in PHRASINGS for d, c in pairs]


# the (digit, colour) pairs no "-train" set holds: one per digit, each colour twice (digit d in colour d mod 5)
HELD_OUT_PAIRS: frozenset[tuple[int, int]] = frozenset((d, d % len(COLOUR_NAMES)) for d in range(len(DIGIT_WORDS)))


def split(source, held_out: bool):
    """The prompts of ``source`` (() -> (prompts, metadata)) whose (digit, colour) pair is in
    ``HELD_OUT_PAIRS`` (``held_out``: the "-test" set, 10 of the 50 pairs in every phrasing)
    or not (the "-train" set, the other 40)."""

    def prompts() -> tuple[list[str], list[dict]]:
        pairs = [(p, m) for p, m in zip(*source()) if ((m["digit"], m["colour"]) in HELD_OUT_PAIRS) == held_out]
        return [p for p, _ in pairs], [m for _, m in pairs]

    return prompts


# the named prompt sets a generative trainer's ``prompts`` / ``eval_prompts`` take: name -> () -> (prompts, metadata);
# "-train" and "-test" split the (digit, colour) pairs, so a test prompt's pair is new to the tuned model
PROMPT_SETS = {
    "digits": digits_prompts,
    "digits-paraphrased": paraphrased_prompts,
    "digits-train": split(digits_prompts, held_out=False),
    "digits-test": split(digits_prompts, held_out=True),
    "digits-paraphrased-train": split(paraphrased_prompts, held_out=False),
    "digits-paraphrased-test": split(paraphrased_prompts, held_out=True),
}


def parse_prompt(prompt: str) -> tuple[int, int]:
    """(digit, colour) named in a prompt such as "a red seven"; ValueError if absent.

    Word order and filler words do not matter; exactly one digit word and one colour
    word must appear.
    """
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    digits = [DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS]
    colours = [COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES]
    if len(digits) != 1 or len(colours) != 1:
        raise ValueError(
            f"prompt {prompt!r} must name one digit word ({', '.join(DIGIT_WORDS)}) "
            f"and one colour ({', '.join(COLOUR_NAMES)})"
        )
    return digits[0], colours[0]


def colourize(gray: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """gray (N,16,16) in [0,1], colour ids (N,) -> images (N,3,16,16) in [0,1]."""
    rgb = torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=gray.dtype)[colours]
    return BACKGROUND + (1 - BACKGROUND) * gray[:, None] * rgb[:, :, None, None]


@dataclass
class DigitsData:
    """Coloured digits with their labels; all tensors share the first dimension N."""

    images: torch.Tensor  # (N, 3, 16, 16) float32 in [0, 1]
    digits: torch.Tensor  # (N,) int64, 0..9
    colours: torch.Tensor  # (N,) int64, index into COLOUR_NAMES
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def classes(self) -> torch.Tensor:
        """(N,) joint class ids digit·5 + colour."""
        return self.digits * len(COLOUR_NAMES) + self.colours


@lru_cache(maxsize=1)
def _gray_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    gray = F.interpolate(gray[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return gray[:, 0].clamp(0, 1), torch.tensor(bunch.target, dtype=torch.int64)


def load_digits_world(split: str = "train") -> DigitsData:
    """The coloured digits for ``split`` in {"train", "heldout", "all"}.

    Ordering is base image major, colour minor, so the result is deterministic.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all' (got {split!r})")
    gray, digits = _gray_digits()
    index = torch.arange(len(gray))
    if split == "train":
        index = index[index % 5 != 0]
    elif split == "heldout":
        index = index[index % 5 == 0]
    n_colours = len(COLOUR_NAMES)
    base = index.repeat_interleave(n_colours)  # (N,)
    colours = torch.arange(n_colours).repeat(len(index))  # (N,)
    images = colourize(gray[base], colours)
    labels = digits[base]
    prompts = [prompt_for(int(d), int(c)) for d, c in zip(labels, colours)]
    return DigitsData(images=images, digits=labels, colours=colours, prompts=prompts)


def grid_prompts() -> list[str]:
    """Ten prompts, one per digit, cycling through the colours: the sample-grid rows."""
    return [prompt_for(d, d % len(COLOUR_NAMES)) for d in range(len(DIGIT_WORDS))]


# ----------------------------------------------------------------------------- moving digits (digits-wan)
# A clip: a 16×16 coloured digit on a CLIP_SIZE² dark canvas, sliding CLIP_TRAVEL pixels in a straight line over
# CLIP_FRAMES frames (2 px a frame), prompted "a red three moving left". Directions are image axes: x right, y down.
CLIP_FRAMES = 9
CLIP_SIZE = 32
CLIP_TRAVEL = CLIP_SIZE - IMAGE_SIZE  # pixels: from one edge of the canvas to the other
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DIRECTION_NAMES: tuple[str, ...] = tuple(DIRECTIONS)
MOTION_WORDS: tuple[str, ...] = ("moving", "going", *DIRECTION_NAMES)  # the prompt words digits-wan adds


def motion_prompt_for(digit: int, colour: int, direction: int) -> str:
    """``motion_prompt_for(3, 0, 0) == "a red three moving left"``."""
    return f"{prompt_for(digit, colour)} moving {DIRECTION_NAMES[direction]}"


def motion_prompts() -> tuple[list[str], list[dict]]:
    """The 200 prompts "a <colour> <digit> moving <direction>", digit major then colour, with their
    {"digit", "colour", "direction"} metadata."""
    triples = [
        (d, c, m) for d in range(len(DIGIT_WORDS)) for c in range(len(COLOUR_NAMES)) for m in range(len(DIRECTIONS))
    ]
    return [motion_prompt_for(*t) for t in triples], [{"digit": d, "colour": c, "direction": m} for d, c, m in triples]


# the (digit, direction) pairs no "digits-motion-train" prompt holds, in any colour: digit d moving in direction
# d mod 4 (every direction two or three times), so a test prompt asks for a digit's motion the tuning never rewarded
HELD_OUT_MOTIONS: frozenset[tuple[int, int]] = frozenset((d, d % len(DIRECTIONS)) for d in range(len(DIGIT_WORDS)))


def motion_split(held_out: bool):
    """The motion prompts whose (digit, direction) pair is in ``HELD_OUT_MOTIONS`` (``held_out``: 50 prompts)
    or not (150)."""

    def prompts() -> tuple[list[str], list[dict]]:
        pairs = [
            (p, m) for p, m in zip(*motion_prompts()) if ((m["digit"], m["direction"]) in HELD_OUT_MOTIONS) == held_out
        ]
        return [p for p, _ in pairs], [m for _, m in pairs]

    return prompts


PROMPT_SETS.update(
    {
        "digits-motion": motion_prompts,
        "digits-motion-train": motion_split(held_out=False),
        "digits-motion-test": motion_split(held_out=True),
    }
)


def parse_motion_prompt(prompt: str) -> tuple[int, int, int]:
    """(digit, colour, direction) named in a prompt such as "a red three moving left"; ValueError if one is absent."""
    digit, colour = parse_prompt(prompt)
    words = prompt.lower().replace(",", " ").replace(".", " ").split()
    directions = [DIRECTION_NAMES.index(w) for w in words if w in DIRECTION_NAMES]
    if len(directions) != 1:
        raise ValueError(f"prompt {prompt!r} must name one direction ({', '.join(DIRECTION_NAMES)})")
    return digit, colour, directions[0]


def clip_positions(direction: int, offset: int, frames: int = CLIP_FRAMES) -> list[tuple[int, int]]:
    """The digit's top-left corner (x, y) in each frame: from one edge to the other along ``direction``,
    ``offset`` pixels (0 .. CLIP_TRAVEL) across it."""
    dx, dy = DIRECTIONS[DIRECTION_NAMES[direction]]
    out = []
    for t in range(frames):
        along = round(CLIP_TRAVEL * t / max(frames - 1, 1))
        x = (along if dx > 0 else CLIP_TRAVEL - along) if dx else offset
        y = (along if dy > 0 else CLIP_TRAVEL - along) if dy else offset
        out.append((x, y))
    return out


def render_clips(
    gray: torch.Tensor,
    colours: torch.Tensor,
    directions: torch.Tensor,
    offsets: torch.Tensor,
    frames: int = CLIP_FRAMES,
) -> torch.Tensor:
    """Clips (N, T, 3, CLIP_SIZE, CLIP_SIZE) in [0, 1]: digit ``gray`` (N, 16, 16) in colour ``colours`` (N,)
    sliding along ``directions`` (N,) at ``offsets`` (N,) across, on the dark background."""
    digits = colourize(gray, colours) - BACKGROUND  # (N, 3, 16, 16), background 0
    clips = torch.full((len(gray), frames, 3, CLIP_SIZE, CLIP_SIZE), BACKGROUND)
    for i in range(len(gray)):
        for t, (x, y) in enumerate(clip_positions(int(directions[i]), int(offsets[i]), frames)):
            clips[i, t, :, y : y + IMAGE_SIZE, x : x + IMAGE_SIZE] += digits[i]
    return clips


def load_motion_clips(
    split: str = "train", n: int = 1000, seed: int = 0
) -> tuple[torch.Tensor, list[str], list[dict]]:
    """``n`` clips of base images of ``split`` (``load_digits_world``'s split), colour, direction and offset drawn
    uniformly for ``seed``: (clips (n, T, 3, 32, 32), prompts, metadata)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all' (got {split!r})")
    gray, digits = _gray_digits()
    index = torch.arange(len(gray))
    if split != "all":
        index = index[(index % 5 != 0) if split == "train" else (index % 5 == 0)]
    gen = torch.Generator().manual_seed(seed)
    base = index[torch.randint(len(index), (n,), generator=gen)]
    colours = torch.randint(len(COLOUR_NAMES), (n,), generator=gen)
    directions = torch.randint(len(DIRECTIONS), (n,), generator=gen)
    offsets = torch.randint(0, CLIP_TRAVEL + 1, (n,), generator=gen)
    clips = render_clips(gray[base], colours, directions, offsets)
    meta = [
        {"digit": int(d), "colour": int(c), "direction": int(m)} for d, c, m in zip(digits[base], colours, directions)
    ]
    return clips, [motion_prompt_for(m["digit"], m["colour"], m["direction"]) for m in meta], meta
