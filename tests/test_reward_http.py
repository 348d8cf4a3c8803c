"""The ``http`` reward against servers on 127.0.0.1: the example server of docs/rewards.md
for both image formats, scripted servers for retries and every bad answer, an address
nothing listens on, option checks at build, and a call from a worker thread.

Every server binds a free port and answers at most MAX_REQUESTS requests within
MAX_SECONDS; the fixture stops it at the end of the test.
"""

import base64
import concurrent.futures
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from rlprox.errors import RewardError
from rlprox.rewards import build_reward, get_reward

DOCS = Path(__file__).resolve().parent.parent / "docs" / "rewards.md"
EXAMPLE = re.compile(r"<!-- example: score-server -->\s*\n```python\n(?P<code>.*?)^```", re.S | re.M)
MAX_REQUESTS = 20
MAX_SECONDS = 30.0


class BoundedServer(HTTPServer):
    """One request at a time; ``handle_request`` gives up after ``timeout`` s without one."""

    timeout = 0.05

    def __init__(self, handler, replies=()):
        super().__init__(("127.0.0.1", 0), handler)
        self.replies = list(replies)  # (status, body, delay_s) per request; the last one repeats
        self.bodies: list[dict] = []  # the requests' JSON, in order
        self.answered = 0

    def process_request(self, request, client_address):
        self.answered += 1
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # a client that timed out and left: the test checks what the client saw


class Scripted(BaseHTTPRequestHandler):
    """Answers the i-th request with the server's i-th scripted reply."""

    def do_POST(self):
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, body, delay_s = self.server.replies[min(len(self.server.bodies), len(self.server.replies)) - 1]
        time.sleep(delay_s)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def example_handler():
    """The ``Score`` handler of the example server in docs/rewards.md, without request logging."""
    namespace = {"__name__": "score_server"}
    exec(EXAMPLE.search(DOCS.read_text())["code"], namespace)
    return type("QuietScore", (namespace["Score"],), {"log_message": lambda self, *args: None})


@pytest.fixture
def serve():
    """``serve(handler, replies)`` -> (url, server): a server on a free port of 127.0.0.1."""
    running = []

    def start(handler=Scripted, replies=()):
        server, stop = BoundedServer(handler, replies), threading.Event()

        def loop():
            deadline = time.monotonic() + MAX_SECONDS
            while not stop.is_set() and server.answered < MAX_REQUESTS and time.monotonic() < deadline:
                server.handle_request()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        running.append((server, stop, thread))
        return f"http://127.0.0.1:{server.server_port}/score", server

    yield start
    for server, stop, thread in running:
        stop.set()
        thread.join(timeout=5)
        server.server_close()


def http_term(url: str, **kwargs) -> dict:
    return {"name": "http", "kwargs": {"url": url, "backoff_s": 0.01, **kwargs}}


def batch(n: int = 4, size: int = 8):
    images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))
    return images, [f"prompt {i}" for i in range(n)], [{"index": i} for i in range(n)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("image_format", ["png", "npy"])
def test_scores_of_the_docs_example_server_equal_the_local_computation(serve, image_format):
    url, server = serve(example_handler())
    images, prompts, metadata = batch()
    reward = build_reward(http_term(url, image_format=image_format))
    scores, info = reward(images, prompts, metadata)
    # png carries round(255·x) per channel, npy the float32 values themselves
    pixels = (images * 255).round() / 255 if image_format == "png" else images
    expected = pixels.double().mean(dim=(1, 2, 3)).float()
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert info == {"mean": pytest.approx(float(expected.mean()), abs=1e-6)}


@pytest.mark.parametrize("image_format", ["png", "npy"])
def test_videos_travel_as_frames_and_the_docs_server_scores_them(serve, image_format):
    url, server = serve(example_handler())
    videos = torch.rand(3, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    scores, _ = build_reward(http_term(url, image_format=image_format))(videos, ["a", "b", "c"], [{}] * 3)
    pixels = (videos * 255).round() / 255 if image_format == "png" else videos
    torch.testing.assert_close(scores, pixels.double().mean(dim=(1, 2, 3, 4)).float(), atol=1e-6, rtol=0)
    url, server = serve(replies=[(200, {"scores": [0.0, 0.0, 0.0]}, 0)])
    build_reward(http_term(url, image_format=image_format))(videos, ["a", "b", "c"], [{}] * 3)
    (body,) = server.bodies
    assert body["media"] == "video"
    if image_format == "png":
        assert [len(frames) for frames in body["images"]] == [4, 4, 4]
    else:
        assert np.load(io.BytesIO(base64.b64decode(body["images"]))).shape == (3, 4, 3, 8, 8)


def test_the_request_carries_images_prompts_and_metadata(serve):
    url, server = serve(replies=[(200, {"scores": [0.5, 1.5]}, 0)])
    images, prompts, _ = batch(2)
    metadata = [{"reference": torch.ones(2), "seed": np.int64(3)}, {}]
    scores, info = get_reward("http", url=url, image_format="npy")(images, prompts, metadata)
    assert scores.tolist() == [0.5, 1.5] and info == {}
    (body,) = server.bodies
    assert body["media"] == "image" and body["image_format"] == "npy" and body["prompts"] == prompts
    assert body["metadata"] == [{"reference": [1.0, 1.0], "seed": 3}, {}]
    sent = np.load(io.BytesIO(base64.b64decode(body["images"])), allow_pickle=False)
    assert sent.dtype == np.float32 and np.array_equal(sent, images.numpy())


def test_a_5xx_answer_is_tried_again(serve):
    url, server = serve(replies=[(503, b"busy", 0), (200, {"scores": [1, 2], "info": {"queue": 0}}, 0)])
    scores, info = build_reward(http_term(url, retries=1))(*batch(2))
    assert scores.tolist() == [1.0, 2.0] and info == {"queue": 0.0} and len(server.bodies) == 2


@pytest.mark.parametrize(
    "reply, problem",
    [
        ((200, {"scores": [1.0]}, 0), "returned 1 scores for 2 images"),
        ((200, b"<html>oops</html>", 0), "answered something that is not JSON: '<html>oops</html>'"),
        ((200, {"score": [1, 2]}, 0), "answered without a 'scores' field (got ['score'])"),
        ((200, {"scores": "1 2"}, 0), "'scores' is a str, not a list of 2 numbers"),
        ((200, b'{"scores": [1.0, NaN]}', 0), "scores[1] is nan, not a finite number"),
        ((200, {"scores": [1, None]}, 0), "scores[1] is None, not a finite number"),
        ((200, {"scores": [1, 2], "info": [3]}, 0), "'info' is a list, not an object of numbers"),
        ((200, {"scores": [1, 2], "info": {"n": "3"}}, 0), "info['n'] is '3', not a number"),
        ((404, b"no such path", 0), "answered HTTP 404 Not Found: 'no such path'"),
        ((503, b"busy", 0), "after 2 tries (HTTP 503 Service Unavailable)"),
    ],
    ids=["count", "not-json", "no-scores", "not-list", "nan", "null", "info-list", "info-str", "404", "503"],
)
def test_a_bad_answer_is_one_line_naming_the_url(serve, reply, problem):
    url, server = serve(replies=[reply])
    reward = build_reward(http_term(url, retries=1))
    with pytest.raises(RewardError) as err:
        reward(*batch(2))
    message = str(err.value)
    assert message.startswith("reward http: ") and url in message and problem in message, message
    assert "\n" not in message
    assert len(server.bodies) == (2 if reply[0] >= 500 else 1)  # only connection problems and 5xx are retried


def test_an_address_nothing_listens_on_fails_fast_in_one_line():
    url = f"http://127.0.0.1:{free_port()}/score"
    reward = build_reward({"name": "http", "kwargs": {"url": url, "retries": 1, "timeout_s": 0.5}})
    start = time.monotonic()
    with pytest.raises(RewardError) as err:
        reward(*batch(2))
    assert time.monotonic() - start < 5
    assert str(err.value) == f"reward http: cannot reach {url} after 2 tries (Connection refused)"


def test_a_server_slower_than_the_timeout_is_one_line(serve):
    url, server = serve(replies=[(200, {"scores": [1, 2]}, 1.0)])
    with pytest.raises(RewardError) as err:
        build_reward(http_term(url, retries=0, timeout_s=0.2))(*batch(2))
    assert str(err.value) == f"reward http: cannot reach {url} after 1 try (timed out)"


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"url": ""}, "url must be http(s)://host[:port]/path (got '')"),
        ({"url": "127.0.0.1:8000/score"}, "url must be http(s)://host[:port]/path"),
        ({"url": "ftp://host/score"}, "url must be http(s)://host[:port]/path (got 'ftp://host/score')"),
        ({"url": "http://host"}, "url must be http(s)://host[:port]/path (got 'http://host')"),
        ({"url": "http://:8000/score"}, "url must be http(s)://host[:port]/path"),
        ({"url": "http://host:99999/score"}, "url must be http(s)://host[:port]/path (got 'http://host:99999/score'"),
        ({"url": "http://host/a b"}, "url must be http(s)://host[:port]/path"),
        ({"timeout_s": 0}, "timeout_s must be a number of seconds > 0 (got 0)"),
        ({"timeout_s": "5"}, "timeout_s must be a number of seconds > 0 (got '5')"),
        ({"retries": -1}, "retries must be an integer >= 0 (got -1)"),
        ({"retries": 1.5}, "retries must be an integer >= 0 (got 1.5)"),
        ({"image_format": "jpg"}, "image_format must be one of png, npy (got 'jpg')"),
        ({"backoff_s": -1}, "backoff_s must be a number of seconds in [0, 30] (got -1)"),
    ],
)
def test_bad_options_are_one_line_naming_the_option_at_build(kwargs, problem):
    spec = {"name": "http", "kwargs": {"url": "http://127.0.0.1:8000/score", **kwargs}}
    for check_only in (True, False):
        with pytest.raises(ValueError) as err:
            build_reward(spec, check_only=check_only)
        message = str(err.value)
        assert message.startswith("reward http: ") and problem in message and "\n" not in message, message


def test_an_unknown_option_says_which_was_meant():
    with pytest.raises(ValueError, match=r"unknown option 'timeout' \(did you mean 'timeout_s'\?\)"):
        build_reward({"name": "http", "kwargs": {"url": "http://127.0.0.1:8000/score", "timeout": 5}})


# ----------------------------------------------------------------------------- as trainers use it
def test_a_recipe_reward_section_with_http_and_another_term(serve):
    url, _ = serve(example_handler())
    section = yaml.safe_load(
        f"""
        reward:
          - name: http
            weight: 2.0
            kwargs: {{url: "{url}", timeout_s: 5, retries: 1, image_format: npy}}
          - name: brightness
            weight: -1.0
        """
    )["reward"]
    images, prompts, metadata = batch()
    total, info = build_reward(section)(images, prompts, metadata)
    torch.testing.assert_close(total, images.mean(dim=(1, 2, 3)), atol=1e-6, rtol=0)  # 2·mean − mean
    assert set(info) == {"http/mean"}


def test_called_from_a_worker_thread_as_loop_scores(serve):
    url, server = serve(example_handler())
    reward = build_reward(http_term(url, image_format="npy"))
    batches = [batch(n) for n in (2, 3)]
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlprox-score") as pool:
        pending = [pool.submit(reward, *b) for b in batches]
        results = [future.result(timeout=30) for future in pending]
    for (images, _, _), (scores, _) in zip(batches, results):
        torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)), atol=1e-6, rtol=0)
