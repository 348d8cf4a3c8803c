"""The ``http`` reward: a batch scored by a server (a reward model in another process,
another environment or on another machine), with only the standard library on this side.

Wire format: one ``POST`` per batch to ``url``, ``Content-Type: application/json``::

    {
      "media": "image",                 # or "video" (a video model's clips)
      "image_format": "png",            # or "npy"
      "images": [...],                  # png: B strings, each the base64 of an 8-bit RGB PNG (H×W),
                                        #      pixel = round(255·x); videos: B lists of T such strings
                                        # npy: one string, the base64 of a .npy file holding a
                                        #      float32 array (B, 3, H, W) in [0, 1]; videos (B, T, 3, H, W)
      "prompts": ["a red seven", ...],  # B strings
      "metadata": [{...}, ...]          # B objects; tensors and arrays in them as nested lists
    }

The server answers HTTP 200 with::

    {
      "scores": [0.71, ...],            # B finite numbers, in the order of the images
      "info": {"name": 0.5, ...}        # optional: per-batch numbers, logged as reward stats
    }

Connection errors, time-outs and 5xx answers are tried again up to ``retries`` times,
the k-th retry after ``backoff_s·2^(k-1)`` seconds (at most 30 s); then, and for any
other bad answer (4xx, not JSON, a missing field, a wrong count of scores, a score that
is not a finite number), the call raises a one-line ``RewardError`` naming the URL.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

from rlprox.errors import RewardError, did_you_mean
from rlprox.rewards import register_reward

__all__ = ["http_reward", "encode_images", "check_http_options"]

IMAGE_FORMATS = ("png", "npy")
MAX_BACKOFF_S = 30.0


def check_http_options(
    url: str = "", timeout_s: float = 30.0, retries: int = 2, image_format: str = "png", backoff_s: float = 0.5
) -> None:
    """One-line ``ValueError`` naming the option that is wrong (run when the reward is built)."""
    shape = "must be http(s)://host[:port]/path"
    if not isinstance(url, str) or not url or any(c.isspace() for c in url):
        raise ValueError(f"reward http: url {shape} (got {url!r})")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or not parts.path.startswith("/"):
        raise ValueError(f"reward http: url {shape} (got {url!r})")
    try:
        parts.port  # noqa: B018  (parsing the port is the check)
    except ValueError as err:
        raise ValueError(f"reward http: url {shape} (got {url!r}: {err})") from None
    if not _number(timeout_s) or not timeout_s > 0 or not math.isfinite(timeout_s):
        raise ValueError(f"reward http: timeout_s must be a number of seconds > 0 (got {timeout_s!r})")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"reward http: retries must be an integer >= 0 (got {retries!r})")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(
            f"reward http: image_format must be one of {', '.join(IMAGE_FORMATS)} "
            f"(got {image_format!r}){did_you_mean(image_format, IMAGE_FORMATS)}"
        )
    if not _number(backoff_s) or not 0 <= backoff_s <= MAX_BACKOFF_S:
        raise ValueError(
            f"reward http: backoff_s must be a number of seconds in [0, {MAX_BACKOFF_S:g}] (got {backoff_s!r})"
        )


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def encode_images(images: torch.Tensor, image_format: str) -> str | list:
    """The request's ``images`` field: B base64 PNGs (videos (B, T, 3, H, W): B lists of T), or the
    base64 of one float32 .npy of the whole batch, (B, 3, H, W) or (B, T, 3, H, W)."""
    if image_format == "png" and images.ndim == 5:
        return [encode_images(clip, "png") for clip in images]
    if image_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, images.detach().float().clamp(0, 1).cpu().numpy(), allow_pickle=False)
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    from PIL import Image

    from rlprox.images import to_uint8

    encoded = []
    for array in to_uint8(images):  # (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def _jsonable(value):
    """``json.dumps``' fallback for the metadata: tensors and arrays as nested lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata holds a {type(value).__name__}, which JSON cannot carry")


def _excerpt(raw: bytes) -> str:
    text = raw[:80].decode("utf-8", "replace")
    return repr(text + ("..." if len(raw) > 80 else ""))


def _reason(err: BaseException) -> str:
    """The OS's words for a failed connection ("Connection refused", "timed out")."""
    reason = getattr(err, "reason", err)  # a URLError wraps the socket error
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__


def post_json(url: str, body: bytes, timeout_s: float, retries: int, backoff_s: float) -> bytes:
    """The body of the server's 200 answer to ``body``, trying ``retries + 1`` times at most."""
    tries = retries + 1
    problem = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json", "Accept": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:  # an answer, not a connection problem
            problem = f"HTTP {err.code} {err.reason}"
            if err.code < 500:
                raise RewardError(f"reward http: {url} answered {problem}: {_excerpt(err.read())}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            problem = _reason(err)
    raise RewardError(f"reward http: cannot reach {url} after {tries} {'try' if tries == 1 else 'tries'} ({problem})")


def decode_scores(url: str, raw: bytes, n: int) -> tuple[list[float], dict[str, float]]:
    """(scores, info) from the server's answer, or a one-line ``RewardError`` saying what is wrong with it."""
    try:
        reply = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RewardError(f"reward http: {url} answered something that is not JSON: {_excerpt(raw)}") from None
    if not isinstance(reply, dict) or "scores" not in reply:
        keys = sorted(reply) if isinstance(reply, dict) else type(reply).__name__
        raise RewardError(f"reward http: {url} answered without a 'scores' field (got {keys})")
    scores = reply["scores"]
    if not isinstance(scores, list):
        raise RewardError(f"reward http: {url}: 'scores' is a {type(scores).__name__}, not a list of {n} numbers")
    if len(scores) != n:
        raise RewardError(f"reward http: {url} returned {len(scores)} scores for {n} images")
    for i, score in enumerate(scores):
        if not _number(score) or not math.isfinite(score):
            raise RewardError(f"reward http: {url}: scores[{i}] is {score!r}, not a finite number")
    info = reply.get("info", {})
    if not isinstance(info, dict):
        raise RewardError(f"reward http: {url}: 'info' is a {type(info).__name__}, not an object of numbers")
    for key, value in info.items():
        if not _number(value):
            raise RewardError(f"reward http: {url}: info[{key!r}] is {value!r}, not a number")
    return [float(s) for s in scores], {key: float(value) for key, value in info.items()}


@register_reward("http", media="any")
def http_reward(
    images: torch.Tensor,
    prompts: list[str],
    metadata: list[dict],
    url: str = "",
    timeout_s: float = 30.0,
    retries: int = 2,
    image_format: str = "png",
    backoff_s: float = 0.5,
) -> tuple[torch.Tensor, dict]:
    """Scores from a server: the batch POSTed as JSON to url, {"scores": [...]} read back (wire format: module doc)."""
    check_http_options(url, timeout_s, retries, image_format, backoff_s)
    n = images.shape[0]
    request = {
        "media": "video" if images.ndim == 5 else "image",
        "image_format": image_format,
        "images": encode_images(images, image_format),
        "prompts": list(prompts),
        "metadata": list(metadata) if metadata else [{} for _ in range(n)],
    }
    try:
        body = json.dumps(request, default=_jsonable).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise RewardError(f"reward http: cannot send the batch to {url}: {err}") from None
    scores, info = decode_scores(url, post_json(url, body, timeout_s, retries, backoff_s), n)
    return torch.tensor(scores, dtype=torch.float32, device=images.device), info


http_reward.check = check_http_options
