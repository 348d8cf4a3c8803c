"""The offline digits world: data, models, build/cache, CLI and metrics.

Model builds here are micro builds (a few optimizer steps, small batches) in a
temporary cache: they exercise every code path, not the quality. The real builds and
their quality bars are the ``slow`` test at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from rlprox.zoo import build as zoo_build
from rlprox.zoo.data import (
    COLOUR_NAMES,
    load_digits_world,
    parse_prompt,
    prompt_for,
)

torch.set_num_threads(1)

# micro=True keeps 5 % of each step count; these bases leave 2–3 steps per model.
TINY = dict(
    classifier_steps=60,
    vae_steps=40,
    unet_steps=40,
    sd3_steps=40,
    vq_steps=40,
    gpt_steps=60,
    batch_size=32,
    progress=False,
)


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("rlprox_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLPROX_CACHE", str(root))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def micro_models(zoo_cache):
    """Every zoo model, micro-built once for the module."""
    return {name: zoo_build.build(name, micro=True, **TINY) for name in zoo_build.MODELS}


# ----------------------------------------------------------------------------- data
def test_data_split_shapes_and_prompts():
    train, held = load_digits_world("train"), load_digits_world("heldout")
    assert train.images.shape == (7185, 3, 16, 16) and len(held) == 1800
    assert train.images.min() >= 0 and train.images.max() <= 1
    assert held.images.amin(dim=(1, 2, 3)).min() == pytest.approx(0.05)  # dark background
    assert set(held.colours.tolist()) == set(range(len(COLOUR_NAMES)))
    for i in (0, 7, 1799):
        assert parse_prompt(held.prompts[i]) == (held.digits[i].item(), held.colours[i].item())
    assert prompt_for(7, 0) == "a red seven"
    assert torch.equal(load_digits_world("train").images, train.images)  # deterministic


def test_parse_prompt_rejects_prompts_without_targets():
    assert parse_prompt("The BLUE three.") == (3, 2)
    with pytest.raises(ValueError, match="one digit word"):
        parse_prompt("a red cat")


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_keeps_every_prompt_word_one_token():
    from rlprox.zoo.sd import PROMPT_WORDS, build_tokenizer

    tok = build_tokenizer()
    for word in PROMPT_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == word + "</w>", word
    word_id = {w: tok(w).input_ids[1] for w in ("a", "red", "seven")}
    ids = tok("A Red Seven", padding="max_length", max_length=8).input_ids
    assert (
        ids
        == [tok.bos_token_id, word_id["a"], word_id["red"], word_id["seven"], tok.eos_token_id]
        + [tok.pad_token_id] * 3
    )


def test_paraphrased_prompts_use_the_tokenizer_words_and_name_their_pair():
    from rlprox.zoo.data import PHRASINGS, digits_prompts, paraphrased_prompts
    from rlprox.zoo.sd import MAX_PROMPT_TOKENS, PROMPT_WORDS, build_tokenizer

    prompts, metadata = paraphrased_prompts()
    assert len(set(prompts)) == len(prompts) == 14 * 50 == len(PHRASINGS) * 50
    assert prompts[:50] == digits_prompts()[0]  # phrasing 0 is the "digits" set, in its order
    tok = build_tokenizer()
    for prompt, meta in zip(prompts, metadata):
        assert set(prompt.split()) <= set(PROMPT_WORDS), prompt
        assert len(tok(prompt).input_ids) == len(prompt.split()) + 2 <= MAX_PROMPT_TOKENS, prompt  # one token a word
        assert parse_prompt(prompt) == (meta["digit"], meta["colour"]), prompt
    pairs = [(m["digit"], m["colour"]) for m in metadata]
    assert all(pairs.count(pair) == 14 for pair in set(pairs))


def test_many_prompts_keep_ddpo_on_batch_statistics():
    """The regime the paraphrased set is for: 50 rounds of 64 i.i.d. prompts (3,200 images, DDPO's K = 1 arm)
    fill the per-prompt statistics (min_count 16) of nearly every "digits" prompt, of almost no paraphrased one."""
    import numpy as np

    from rlprox.algos.loop import PromptStats
    from rlprox.zoo.data import PROMPT_SETS

    tracked = {}
    for name in ("digits", "digits-paraphrased"):
        prompts, _ = PROMPT_SETS[name]()
        rng, prompt_stats = np.random.default_rng(0), PromptStats(buffer_size=32, min_count=16)
        for _ in range(50):
            chosen = [prompts[i] for i in rng.integers(len(prompts), size=64)]
            prompt_stats.update(chosen, rng.random(64))
        tracked[name] = prompt_stats.tracked_fraction
    assert tracked["digits"] > 0.9 and tracked["digits-paraphrased"] < 0.05


def test_train_and_test_sets_split_the_pairs_and_are_the_recipes_evaluation():
    """ "-train" and "-test" hold disjoint (digit, colour) pairs (10 held out, one per digit) in every phrasing;
    a LOOP recipe on a "-train" set evaluates on its "-test" partner unless told otherwise, and every digits recipe
    evaluates on pairs it never trains on ((digit, direction) pairs for the video recipe, in every colour)."""
    import yaml

    from rlprox.algos.loop import eval_prompt_source
    from rlprox.zoo.data import PROMPT_SETS

    def pairs(name):
        """The held-out unit of a set: (digit, colour); for the moving-digit clips (digit, direction)."""
        return {(m["digit"], m.get("direction", m["colour"])) for m in PROMPT_SETS[name]()[1]}

    for base, size in (("digits", 50), ("digits-paraphrased", 700)):
        train, test = pairs(f"{base}-train"), pairs(f"{base}-test")
        assert len(train) == 40 and len(test) == 10 and not train & test and train | test == pairs(base)
        assert sorted(d for d, _ in test) == list(range(10))
        assert len(PROMPT_SETS[f"{base}-train"]()[0]) + len(PROMPT_SETS[f"{base}-test"]()[0]) == size
    assert eval_prompt_source("digits-train", "") == "digits-test"
    assert eval_prompt_source("digits", "") == "digits" and eval_prompt_source("digits-train", "x.txt") == "x.txt"
    for recipe in sorted((Path(__file__).parent.parent / "recipes" / "loop").glob("digits-*.yaml")):
        loop = yaml.safe_load(recipe.read_text())["loop"]
        source = eval_prompt_source(loop.get("prompts", "digits-train"), loop.get("eval_prompts", ""))
        assert pairs(source) and not pairs(source) & pairs(loop.get("prompts", "digits-train")), recipe.name


# ----------------------------------------------------------------------------- build + cache
def test_build_writes_complete_dirs_atomically(micro_models, zoo_cache):
    cache = zoo_cache / "zoo"
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    for name, path in micro_models.items():
        version = {"digits-vq": "-v2", "digits-gpt": "-v2"}.get(name, "")  # rebuilt when their classes change
        assert path == cache / f"{name}{version}-seed0-micro"
        info = json.loads((path / "build_info.json").read_text())
        assert info["name"] == name and info["options"]["micro"] is True
    for name in ("digits-sd", "digits-sd3", "digits-vq", "digits-gpt"):
        assert (micro_models[name] / "samples.png").stat().st_size > 0


def test_resolve_reuses_cache_and_names_unknown_models(micro_models, capsys):
    path = micro_models["digits-classifier"]
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert zoo_build.resolve("zoo:digits-classifier", micro=True) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert "building" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="did you mean 'digits-sd'"):
        zoo_build.resolve("zoo:digits-sdd")
    with pytest.raises(ValueError, match="unknown option .unet_step."):
        zoo_build.build("digits-sd", micro=True, force=True, unet_step=3)


def test_concurrent_builds_of_one_model_train_it_once(tmp_path, monkeypatch, capsys):
    """Two processes that reach an unbuilt model at once (parallel benchmark runs) build it once: the
    second waits on the build lock, then reads the finished build; no lock file is left in the cache."""
    import threading

    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path))
    calls, started = [], threading.Event()

    def slow_builder(out, seed, opts):
        calls.append(seed)
        started.set()
        time.sleep(0.5)
        (out / "weights.bin").write_bytes(b"x")
        return {}

    zoo_build.MODELS.register("test-slow-model", slow_builder, "a stand-in that takes half a second")
    try:
        paths = []
        first = threading.Thread(target=lambda: paths.append(zoo_build.build("test-slow-model", micro=True)))
        first.start()
        assert started.wait(10)
        paths.append(zoo_build.build("test-slow-model", micro=True))  # arrives while the first one builds
        first.join()
    finally:
        zoo_build.MODELS.unregister("test-slow-model")
    assert calls == [0] and paths[0] == paths[1] and (paths[0] / "weights.bin").is_file()
    assert "waiting for another process building test-slow-model" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "zoo").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_build_trains_whatever_mode_its_caller_is_in(mode, tmp_path, monkeypatch):
    """An evaluate hook runs under no_grad: a zoo model it reaches must still train."""
    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path))
    with mode():
        path = zoo_build.build("digits-classifier", micro=True, classifier_steps=40, batch_size=16, progress=False)
    assert (path / "model.safetensors").is_file()


def test_check_spec_names_the_models_a_field_takes():
    zoo_build.check_spec("some/folder", ("digits-sd",))  # not a zoo spec: the loader's business
    zoo_build.check_spec("zoo:digits-sd", ("digits-sd",))
    with pytest.raises(ValueError, match=r"^unknown zoo model 'digits-sdd' \(did you mean 'digits-sd'\?\)"):
        zoo_build.check_spec("zoo:digits-sdd", ("digits-sd",))
    with pytest.raises(ValueError, match=r"^zoo:digits-gpt is not a model this field takes; use zoo:digits-sd$"):
        zoo_build.check_spec("zoo:digits-gpt", ("digits-sd",))


@pytest.mark.parametrize("name", ["digits-classifier", "digits-vq"])
def test_build_is_deterministic_for_a_seed(name, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    weights = []
    for sub in ("a", "b"):
        monkeypatch.setenv("RLPROX_CACHE", str(tmp_path / sub))
        path = zoo_build.build(name, seed=3, micro=True, **TINY)
        weights.append(load_file(str(path / "model.safetensors")))
        assert f"rlprox zoo: building {name} (seed 3, micro)" in capsys.readouterr().err
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_build_all_builds_dependencies_first(monkeypatch, capsys):
    """`rlprox zoo build all --force` must rebuild digits-vq before the digits-gpt trained
    on its tokens (alphabetical order would train the GPT on the old tokenizer)."""
    from rlprox.zoo.cli import add_zoo_parser, run_zoo

    assert zoo_build.MODELS.names().index("digits-gpt") < zoo_build.MODELS.names().index("digits-vq")
    order = zoo_build.build_order()
    everyday = [n for n in zoo_build.MODELS.names() if n not in zoo_build.TEST_BEDS]
    assert sorted(order) == everyday and order.index("digits-vq") < order.index("digits-gpt")
    assert zoo_build.build_order(["digits-gpt"]) == ["digits-gpt"]  # a single rebuild reuses the cached vq
    built = []
    monkeypatch.setattr(zoo_build, "build", lambda name, **kw: built.append(name) or Path(name))
    parser = argparse.ArgumentParser(prog="rlprox")
    add_zoo_parser(parser.add_subparsers(dest="command"))
    assert run_zoo(parser.parse_args(["zoo", "build", "all", "--force", "--micro"])) == 0
    assert built == order


def test_cli_list_and_build_errors(micro_models, capsys):
    from rlprox.zoo.cli import add_zoo_parser, run_zoo

    parser = argparse.ArgumentParser(prog="rlprox")
    add_zoo_parser(parser.add_subparsers(dest="command"))
    assert run_zoo(parser.parse_args(["zoo", "list"])) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in zoo_build.MODELS)
    args = parser.parse_args(["zoo", "build", "digits-clasifier", "--micro"])
    assert run_zoo(args) == 2
    assert "did you mean 'digits-classifier'" in capsys.readouterr().err
    args = parser.parse_args(["zoo", "build", "digits-classifier", "--micro", "--seed", "0"])
    assert run_zoo(args) == 0  # cached: returns the path without rebuilding
    assert capsys.readouterr().out.strip().endswith("digits-classifier-seed0-micro")


# ----------------------------------------------------------------------------- classifier
def test_classifier_round_trip_and_features(micro_models, tmp_path):
    from rlprox.zoo.classifier import DigitsClassifier

    model = DigitsClassifier.from_pretrained(micro_models["digits-classifier"])
    images = load_digits_world("heldout").images[:8]
    digit_logits, colour_logits = model(images)
    assert digit_logits.shape == (8, 10) and colour_logits.shape == (8, 5)
    assert model.features(images).shape == (8, 64)
    model.save_pretrained(tmp_path)
    again = DigitsClassifier.from_pretrained(tmp_path)
    assert torch.equal(model(images)[0], again(images)[0])


# ----------------------------------------------------------------------------- digits-sd
def test_sd_pipeline_loads_in_fresh_offline_process(micro_models):
    path = micro_models["digits-sd"]
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(path)!r})
        pipe.set_progress_bar_config(disable=True)
        out = pipe(["a red seven", "a blue two"], num_inference_steps=2, guidance_scale=2.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert out.shape == (2, 3, 16, 16), out.shape
        assert 0 <= out.min() and out.max() <= 1
        print("OK", type(pipe.tokenizer).__name__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "OK" in res.stdout


def test_sd_sampling_is_deterministic(micro_models):
    from rlprox.zoo.sd import load_sd_pipeline, sample_sd

    pipe = load_sd_pipeline(micro_models["digits-sd"])
    a = sample_sd(pipe, ["a red seven"] * 2, seed=1, num_inference_steps=2)
    b = sample_sd(pipe, ["a red seven"] * 2, seed=1, num_inference_steps=2)
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)


# ----------------------------------------------------------------------------- digits-vq
def test_vq_round_trip_names_and_straight_through(micro_models):
    from rlprox.models.llamagen import VQModel
    from rlprox.zoo.vq import encode_tokens

    vq = VQModel.from_pretrained(micro_models["digits-vq"])
    keys = set(vq.state_dict())
    for key in (
        "quantize.embedding.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "encoder.conv_in.weight",
        "encoder.conv_blocks.0.res.0.conv1.weight",
        "encoder.conv_blocks.0.downsample.conv.weight",
        "encoder.mid.1.q.weight",
        "encoder.conv_blocks.1.attn.0.q.weight",  # LlamaGen's attention at the lowest resolution
        "decoder.conv_blocks.0.upsample.conv.weight",
        "decoder.conv_out.weight",
    ):
        assert key in keys, key
    images = load_digits_world("heldout").images[:4]
    tokens = encode_tokens(vq, images)
    assert tokens.shape == (4, 64) and tokens.max() < vq.config["codebook_size"]  # an 8×8 token grid
    assert vq.decode_code(tokens).shape == (4, 3, 16, 16)
    vq.train()
    recon, loss = vq(images)
    (((recon - images) ** 2).mean() + loss).backward()
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0  # gradient passed the quantiser


# ----------------------------------------------------------------------------- digits-gpt
def _random_gpt(seed=0, **kw):
    from rlprox.models.llamagen import Transformer

    torch.manual_seed(seed)
    model = Transformer(dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=6, block_size=16, **kw)
    torch.nn.init.normal_(model.output.weight, std=0.5)  # zero-init would make sampling trivial
    return model.eval()


def test_gpt_state_dict_follows_llamagen_names(micro_models):
    from rlprox.models.llamagen import Transformer

    model = Transformer.from_pretrained(micro_models["digits-gpt"])
    keys = set(model.state_dict())
    for key in (
        "tok_embeddings.weight",
        "cls_embedding.embedding_table.weight",
        "layers.0.attention.wqkv.weight",
        "layers.0.attention.wo.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.feed_forward.w3.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "norm.weight",
        "output.weight",
    ):
        assert key in keys, key
    assert not any("freqs_cis" in k or "cache" in k for k in keys)
    assert model.cls_embedding.embedding_table.num_embeddings == 51  # 50 classes + null


def test_gpt_kv_cache_logits_match_full_forward():
    model = _random_gpt()
    tokens = torch.randint(0, 16, (3, 16))
    cond = torch.tensor([0, 3, 5])
    full, _ = model(tokens[:, :-1], cond)  # (3, 16, V)
    model.setup_caches(3)
    step, _ = model(None, cond, input_pos=torch.arange(1))
    cached = [step[:, -1]]
    for i in range(15):
        step, _ = model(tokens[:, i : i + 1], None, input_pos=torch.tensor([1 + i]))
        cached.append(step[:, -1])
    model.clear_caches()
    torch.testing.assert_close(torch.stack(cached, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg_scale,top_k", [(1.0, 0), (3.0, 5)])
def test_gpt_kv_cache_sampling_equals_no_cache_sampling(cfg_scale, top_k):
    from rlprox.models.llamagen import generate

    model = _random_gpt(seed=1)
    cond = torch.tensor([0, 1, 2, 5])
    runs = [
        generate(
            model,
            cond,
            cfg_scale=cfg_scale,
            top_k=top_k,
            temperature=0.9,
            generator=torch.Generator().manual_seed(7),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert runs[0].shape == (4, 16)
    assert torch.equal(runs[0], runs[1])


def test_gpt_loads_with_its_vq(micro_models):
    from rlprox.models.llamagen import generate
    from rlprox.zoo.build import load_gpt_and_vq

    gpt, vq = load_gpt_and_vq(micro_models["digits-gpt"])
    tokens = generate(gpt, torch.tensor([0, 49]), cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    assert vq.decode_code(tokens).shape == (2, 3, 16, 16)


def test_gpt_round_trip(tmp_path):
    from rlprox.models.llamagen import Transformer

    model = _random_gpt()
    model.save_pretrained(tmp_path)
    again = Transformer.from_pretrained(tmp_path)
    x, c = torch.randint(0, 16, (2, 15)), torch.tensor([1, 2])
    assert torch.equal(model(x, c)[0], again(x, c)[0])
    with pytest.raises(ValueError, match="not a VQModel"):
        from rlprox.models.llamagen import VQModel

        VQModel.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- metrics
class _OneHotClassifier:
    """Stand-in with predict_proba: one-hot on given digit labels, uniform colours."""

    def __init__(self, digits):
        self.digits = digits

    def eval(self):
        return self

    def predict_proba(self, images):
        return torch.nn.functional.one_hot(self.digits, 10).float(), torch.full((len(images), 5), 0.2)


def test_fid_and_kid_proxies_on_known_cases():
    from rlprox.zoo.metrics import fid_proxy, kid_proxy

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=gen)
    assert fid_proxy(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.zeros(8)
    shift[0] = 3.0
    assert fid_proxy(a, a + shift) == pytest.approx(9.0, rel=1e-6)  # ‖Δμ‖², same Σ
    assert fid_proxy(a, 2 * a) == pytest.approx(
        (a.mean(0) ** 2).sum().item() + torch.cov(a.T.double()).trace().item(), rel=1e-6
    )  # Tr(Σ + 4Σ − 2·2Σ) = Tr Σ, plus ‖μ‖²
    assert abs(kid_proxy(a, a[torch.randperm(400, generator=gen)])) < 0.05
    assert kid_proxy(a, a + shift) > 1.0


def test_is_proxy_and_conditional_accuracy_on_known_cases():
    from rlprox.zoo.metrics import conditional_accuracy, is_proxy

    digits = torch.arange(10).repeat(3)
    images = torch.zeros(30, 3, 16, 16)
    assert is_proxy(images, _OneHotClassifier(digits)) == pytest.approx(10.0)
    assert is_proxy(images, _OneHotClassifier(torch.zeros(30, dtype=torch.long))) == pytest.approx(1.0)
    acc = conditional_accuracy(images, digits, torch.zeros(30, dtype=torch.long), _OneHotClassifier(digits))
    assert acc["digit_acc"] == 1.0 and acc["alignment"] == pytest.approx(0.2)


def test_fid_proxy_on_classifier_features(micro_models):
    from rlprox.zoo.classifier import DigitsClassifier
    from rlprox.zoo.metrics import fid_floor, fid_proxy, real_like

    clf = DigitsClassifier.from_pretrained(micro_models["digits-classifier"])
    held, train = load_digits_world("heldout"), load_digits_world("train")
    assert fid_proxy(held.images[:300], held.images[:300], clf) == pytest.approx(0.0, abs=1e-4)
    noise = torch.rand(300, 3, 16, 16)
    assert fid_floor(clf, held, train, n=300) < fid_proxy(held.images, noise, clf)
    classes = held.classes[:50]
    real = real_like(train, classes)
    assert real.shape == (50, 3, 16, 16)
    assert torch.equal(real_like(train, classes), real)  # seeded
    assert fid_floor(clf, held, train, classes=classes) == pytest.approx(fid_proxy(held.images, real, clf))


# ----------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_real_builds_meet_quality_bars(tmp_path, monkeypatch):
    """Full builds (≈8–15 CPU-min): the quality bars the issue sets for the base models."""
    from rlprox.models.llamagen import Transformer, VQModel, generate
    from rlprox.zoo.classifier import DigitsClassifier
    from rlprox.zoo.metrics import conditional_accuracy
    from rlprox.zoo.sd import load_sd_pipeline, sample_sd

    monkeypatch.setenv("RLPROX_CACHE", os.environ.get("RLPROX_TEST_CACHE", str(tmp_path)))
    names = ("digits-classifier", "digits-sd", "digits-vq", "digits-gpt")  # digits-sd3: tests/test_zoo_sd3.py
    paths = {name: zoo_build.resolve(name, progress=False) for name in names}
    acc = zoo_build.build_info(paths["digits-classifier"])["heldout"]
    assert acc["digit_acc"] >= 0.97 and acc["colour_acc"] >= 0.99
    assert zoo_build.build_info(paths["digits-vq"])["heldout_recon_mse"] < 0.01

    clf = DigitsClassifier.from_pretrained(paths["digits-classifier"])
    held = load_digits_world("heldout")
    pick = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))[:200]
    digits, colours = held.digits[pick], held.colours[pick]
    images = sample_sd(load_sd_pipeline(paths["digits-sd"]), [held.prompts[i] for i in pick])
    sd = conditional_accuracy(images, digits, colours, clf)
    assert 0.3 <= sd["alignment"] and sd["colour_acc"] >= 0.9  # decent-but-imperfect
    vq = VQModel.from_pretrained(paths["digits-vq"])
    gpt = Transformer.from_pretrained(paths["digits-gpt"])
    tokens = generate(gpt, digits * 5 + colours, cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    ar = conditional_accuracy(vq.decode_code(tokens), digits, colours, clf)
    assert 0.3 <= ar["alignment"] and ar["colour_acc"] >= 0.9


def test_test_bed_gpts_are_trained_on_their_vq_tokens(tmp_path, monkeypatch):
    """digits-gpt-coarse: 4×4 codes per image from digits-vq-coarse (built first), 16 tokens per sequence;
    digits-gpt-k16: 16-way tokens of digits-vq-k16."""
    from rlprox.zoo.build import load_gpt_and_vq
    from rlprox.zoo.vq import encode_tokens

    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path))
    path = zoo_build.build("digits-gpt-coarse", micro=True, **TINY)
    gpt, vq = load_gpt_and_vq(path)
    assert vq.token_grid == 4 and gpt.block_size == 16
    assert zoo_build.build_info(path)["vq"] == "zoo:digits-vq-coarse"
    assert zoo_build.build_order(["digits-vq-coarse", "digits-gpt-coarse"]) == [
        "digits-vq-coarse",
        "digits-gpt-coarse",
    ]
    tokens = encode_tokens(vq, load_digits_world("heldout").images[:4])
    assert tokens.shape == (4, 16) and int(tokens.max()) < vq.config["codebook_size"]
    gpt, vq = load_gpt_and_vq(zoo_build.build("digits-gpt-k16", micro=True, **TINY))
    assert vq.config["codebook_size"] == gpt.tok_embeddings.num_embeddings == 16 and gpt.block_size == 64
