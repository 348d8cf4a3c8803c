"""VA-π: LlamaGen-layout checkpoints round-trip, teacher-forced group sampling, the
ratio before the first update, the prior term = LlamaGen's loss, resume, eval."""

import json

import pytest
import torch
import yaml

from rlprox import checkpoint
from rlprox.cli import main
from rlprox.engine import Engine
from rlprox.models import llamagen
from rlprox.prox.regularizers import PriorCE
from rlprox.recipe import load_recipe

TINY_GPT = dict(n_layer=2, n_head=2, dim=32, multiple_of=16)
TINY_VQ = dict(
    ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=16, norm_groups=4, codebook_size=32, codebook_embed_dim=4
)


def tiny_models(seed=0):
    torch.manual_seed(seed)
    vq_kwargs = llamagen.vq_config("VQ-16", 16, **TINY_VQ)
    gpt_kwargs = llamagen.gpt_config("GPT-B", 16, 4, num_classes=50, vocab_size=32, **TINY_GPT)
    gpt = llamagen.Transformer(**gpt_kwargs)
    torch.nn.init.normal_(gpt.output.weight, std=0.5)  # LlamaGen zero-inits the head: give the test distinct logits
    return gpt, llamagen.VQModel(**vq_kwargs)


@pytest.fixture(scope="module")
def llamagen_files(tmp_path_factory):
    """A tiny GPT and VQ saved the way LlamaGen saves them: {"model": …} for the GPT
    (with DDP "module." prefixes), {"ema": …} plus a usage buffer for the VQ."""
    root = tmp_path_factory.mktemp("llamagen")
    gpt, vq = tiny_models()
    torch.save({"model": {f"module.{k}": v for k, v in gpt.state_dict().items()}, "steps": 10}, root / "gpt.pt")
    vq_state = dict(vq.state_dict())
    vq_state["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({"ema": vq_state, "optimizer": {}}, root / "vq.pt")
    return root, gpt, vq


def vapi_recipe(tmp_path, files, **vapi):
    root = files[0]
    return {
        "algo": "vapi",
        "seed": 3,
        "run": {
            "name": "v",
            "output_dir": str(tmp_path),
            "iterations": 2,
            "log_with": [],
            "progress": False,
            "plot": False,
        },
        "model": {
            "gpt": str(root / "gpt.pt"),
            "vq": str(root / "vq.pt"),
            "config": "GPT-B",
            "vq_config": "VQ-16",
            "image_size": 16,
            "num_classes": 50,
            "gpt_kwargs": TINY_GPT,
            "vq_kwargs": TINY_VQ,
        },
        "vapi": {"images_per_iteration": 4, "group_size": 4, "micro_batch_size": 2, "eval_base": False, **vapi},
        "reward": {"name": "pixel_reconstruction", "kwargs": {"mse_weight": 1.0, "ssim_weight": 0.5}},
        "regularizers": [{"type": "prior_ce", "lam": 0.1}],
        "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": 1.0},
    }


def test_llamagen_layout_round_trip(llamagen_files):
    root, gpt, vq = llamagen_files
    state = llamagen.read_llamagen_state_dict(root / "vq.pt")
    assert (
        "quantize.codebook_used" not in state and "encoder.conv_blocks.2.attn.0.q.weight" in state
    )  # LlamaGen's attention at the lowest level
    loaded_gpt = llamagen.load_gpt(
        root / "gpt.pt", llamagen.gpt_config("GPT-B", 16, 4, num_classes=50, vocab_size=32, **TINY_GPT)
    )
    loaded_vq = llamagen.load_vq(root / "vq.pt", llamagen.vq_config("VQ-16", 16, **TINY_VQ))
    tokens, classes = torch.randint(0, 32, (2, 16)), torch.tensor([3, 7])
    gpt.eval()
    torch.testing.assert_close(loaded_gpt(tokens[:, :-1], classes)[0], gpt(tokens[:, :-1], classes)[0])
    torch.testing.assert_close(loaded_vq.decode_code(tokens), vq.eval().decode_code(tokens))
    with pytest.raises(RuntimeError):
        llamagen.load_gpt(
            root / "gpt.pt",
            llamagen.gpt_config(
                "GPT-B", 16, 4, num_classes=50, vocab_size=32, n_layer=3, n_head=2, dim=32, multiple_of=16
            ),
        )


def test_group_sampling_draws_each_position_from_its_own_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 5, generator=g) * 2
    samples, logp = llamagen.group_sample(logits, 6000, g)
    assert samples.shape == logp.shape == (1, 6000, 3)
    probs = logits.softmax(-1)[0]
    for t in range(3):
        freq = torch.bincount(samples[0, :, t], minlength=5).float() / 6000
        assert (freq - probs[t]).abs().max() < 0.03, (t, freq, probs[t])
    torch.testing.assert_close(
        logp, torch.log_softmax(logits, -1)[0].gather(-1, samples[0].T).T[None], rtol=1e-5, atol=1e-6
    )


def test_prior_term_equals_the_llamagen_training_loss():
    gpt, _ = tiny_models()
    tokens, classes = torch.randint(0, 32, (3, 16)), torch.tensor([1, 2, 3])
    logits, _ = gpt.eval()(llamagen.noisy_context(tokens, 0.0, 32), classes)
    _, llamagen_loss = gpt(tokens[:, :-1], classes, targets=tokens)
    torch.testing.assert_close(PriorCE(lam=1.0).penalty(logits=logits, targets=tokens), llamagen_loss)


def test_ratio_is_one_before_the_first_update_and_training_runs(tmp_path, llamagen_files):
    engine = Engine(load_recipe(vapi_recipe(tmp_path, llamagen_files, noise_prob=0.2)))
    algo = engine.algo
    assert set(algo.frozen) == {"vq"}  # no reference copy without a kl_ref regularizer
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        _, stats = algo.loss(next(iter(algo.minibatches(batch, 0))))
    assert abs(float(stats["policy/ratio_max"]) - 1.0) < 1e-6 and float(stats["penalty/0.prior_ce"]) > 0
    assert batch["advantages"].shape == (4, 4)
    before = {k: v.clone() for k, v in algo.gpt.state_dict().items()}
    out = engine.fit()
    engine.close()
    assert any(not torch.equal(before[k], v) for k, v in algo.gpt.state_dict().items())
    for key in (
        "reward/mean",
        "reward/mse",
        "reward/ssim",
        "reward/tokenizer_floor_mse",
        "policy/approx_kl",
        "loss/policy",
    ):
        assert key in out, key


def test_kl_reference_is_built_only_when_asked(tmp_path, llamagen_files):
    recipe = vapi_recipe(tmp_path, llamagen_files)
    recipe["regularizers"].append({"type": "kl_ref", "lam": 0.05})
    engine = Engine(load_recipe(recipe))
    assert "reference" in engine.algo.frozen
    stats = engine.fit()
    engine.close()
    assert stats["penalty/1.kl_ref"] >= 0


def test_vapi_resume_after_sigkill_equals_uninterrupted(tmp_path, llamagen_files):
    from tests.crash import kill_resume_equals_uninterrupted

    def make(name):
        recipe = vapi_recipe(tmp_path, llamagen_files, noise_prob=0.1)
        recipe["run"].update(name=name, iterations=10, save_every=1, keep_last=2)
        return recipe

    kill_resume_equals_uninterrupted(tmp_path, make, 10)


def test_checkpoint_that_does_not_match_the_config_is_a_recipe_error(tmp_path, llamagen_files, capsys):
    recipe = vapi_recipe(tmp_path, llamagen_files)
    recipe["model"]["gpt_kwargs"] = {**TINY_GPT, "n_layer": 3}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.startswith(
        "recipe error: model: the checkpoints do not match model.config GPT-B / VQ-16"
    )


def test_eval_reports_digits_metrics_base_vs_tuned(tmp_path, llamagen_files, capsys, monkeypatch):
    from rlprox.zoo.build import build

    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path / "cache"))
    classifier = build("digits-classifier", micro=True, progress=False)
    recipe = vapi_recipe(
        tmp_path, llamagen_files, eval_base=True, eval_classifier=str(classifier), eval_guidance_scale=1.0
    )
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--num-samples", "24"]) == 0
    out = capsys.readouterr().out
    result = json.loads((checkpoint.find_latest(engine.run_dir) / "eval.json").read_text())
    for key in (
        "eval/fid_proxy",
        "eval/base_fid_proxy",
        "eval/is_proxy",
        "eval/digit_acc",
        "eval/base_digit_acc",
        "eval/tf_mse",
        "eval/tokenizer_floor_fid_proxy",
    ):
        assert key in result, key
    assert "fid_proxy" in out and (checkpoint.find_latest(engine.run_dir) / "eval_base_vs_tuned.png").is_file()
    from PIL import Image

    with Image.open(checkpoint.find_latest(engine.run_dir) / "eval_base_vs_tuned.png") as grid:
        assert grid.width > grid.height  # 20 captioned pairs in 5 columns, not a 20 × 2 strip
    assert len(result["values"]["base_class_prob"]) == 24


def test_eval_classifier_is_built_with_the_trainer_not_in_evaluate(tmp_path, llamagen_files, monkeypatch):
    """An empty zoo cache: the classifier is resolved (trained) when the trainer is
    built, so the run's final evaluation (under no_grad) only uses it."""
    from rlprox.zoo import build as zoo_build

    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path / "cache"))
    real = zoo_build.resolve
    builds = []

    def micro_resolve(spec, seed=0, micro=False, **options):
        builds.append((spec, torch.is_grad_enabled()))
        return real(spec, seed, True, classifier_steps=40, batch_size=16, progress=False)

    monkeypatch.setattr(zoo_build, "resolve", micro_resolve)
    recipe = vapi_recipe(tmp_path, llamagen_files, eval_guidance_scale=1.0, eval_base=True)
    recipe["run"]["eval_size"] = 4
    engine = Engine(load_recipe(recipe))
    assert builds == [("zoo:digits-classifier", True)] and engine.algo.classifier is not None
    stats = engine.fit()  # ends with an evaluation
    engine.close()
    assert len(builds) == 1 and 0 <= stats["eval/digit_acc"] <= 1 and "eval/base_fid_proxy" in stats


def test_accumulation_across_rounds_is_a_recipe_error(tmp_path, llamagen_files, capsys):
    """One optimizer step per round: accumulating over rounds would silently halve the
    steps (VA-π accumulates with vapi.micro_batch_size)."""
    recipe = vapi_recipe(tmp_path, llamagen_files)
    recipe["run"]["gradient_accumulation_steps"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "recipe error: run.gradient_accumulation_steps: 2 does not divide the 1 minibatch per epoch"
        " (an optimizer step would span epochs)"
    ]
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("kind", ["folder", "hf"])
def test_image_folder_and_datasets_sources(tmp_path, llamagen_files, kind):
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    arrays = [(g.random((16, 16, 3)) * 255).astype(np.uint8) for _ in range(6)]
    if kind == "folder":
        for i, a in enumerate(arrays):
            (tmp_path / "imgs" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(tmp_path / "imgs" / f"class{i % 2}" / f"{i}.png")
        data = str(tmp_path / "imgs")
    else:
        datasets = pytest.importorskip("datasets")
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a in arrays], "label": [i % 2 for i in range(6)]},
            features=datasets.Features(
                {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cats", "dogs"])}
            ),
        )
        ds.save_to_disk(str(tmp_path / "ds"))
        data = f"hf:{tmp_path / 'ds'}"
    engine = Engine(load_recipe(vapi_recipe(tmp_path, llamagen_files, data=data)))
    assert len(engine.algo.data) == 6 and engine.algo.data.class_names[:2] in (["class0", "class1"], ["cats", "dogs"])
    batch = engine.algo.collect()
    assert batch["x"].shape == (4, 3, 16, 16) and set(batch["classes"].tolist()) <= {0, 1}
    engine.close()


def test_noisy_context_replaces_a_fraction_xi_of_the_context():
    tokens = torch.randint(0, 32, (64, 65), generator=torch.Generator().manual_seed(0))
    assert torch.equal(llamagen.noisy_context(tokens, 0.0, 32), tokens[:, :-1])
    noisy = llamagen.noisy_context(tokens, 0.5, 32, torch.Generator().manual_seed(1))
    changed = (noisy != tokens[:, :-1]).float().mean().item()
    assert noisy.shape == (64, 64) and int(noisy.max()) < 32
    assert changed == pytest.approx(0.5 * 31 / 32, abs=0.03)  # a swap to the same code is no change


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_one_generator_per_row_draws_each_row_as_alone(cfg_scale):
    """Batched evaluation sampling: row i of a batch with its own generator equals a batch of one."""
    gpt, _ = tiny_models()
    classes = torch.tensor([3, 7, 11])
    batched = llamagen.generate(
        gpt, classes, cfg_scale=cfg_scale, generator=[torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    )
    alone = [
        llamagen.generate(gpt, c[None], cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(s))
        for c, s in zip(classes, (5, 6, 7))
    ]
    assert torch.equal(batched, torch.cat(alone))


def test_eval_guidance_scale_flag_sets_the_guidance_of_base_and_tuned_samples(
    tmp_path, llamagen_files, capsys, monkeypatch
):
    from rlprox.zoo.build import build

    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path / "cache"))
    classifier = build("digits-classifier", micro=True, progress=False)
    recipe = vapi_recipe(
        tmp_path, llamagen_files, eval_base=True, eval_classifier=str(classifier), eval_guidance_scale=1.0
    )
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    eval_json = checkpoint.find_latest(engine.run_dir) / "eval.json"
    results = {}
    for flag in ([], ["--guidance-scale", "1.0"], ["--guidance-scale", "4.0"], ["--cfg", "4.0"]):
        assert main(["eval", str(engine.run_dir), "--num-samples", "12", *flag]) == 0
        results[tuple(flag)] = json.loads(eval_json.read_text())
    one, four = ("--guidance-scale", "1.0"), ("--guidance-scale", "4.0")
    assert results[()]["guidance_scale"] == results[one]["guidance_scale"] == 1.0  # the recipe's by default
    assert results[four]["guidance_scale"] == results[("--cfg", "4.0")]["guidance_scale"] == 4.0  # the old flag
    for key in ("class_prob", "base_class_prob"):  # both models sampled with the flag's guidance
        assert results[()]["values"][key] == results[one]["values"][key]
        assert results[()]["values"][key] != results[four]["values"][key]
        assert results[four]["values"][key] == results[("--cfg", "4.0")]["values"][key]
    capsys.readouterr()
    assert main(["eval", str(engine.run_dir), "--guidance-scale", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --guidance-scale must be a finite classifier-free guidance scale >= 0 (got -1.0)"


def test_model_gpt_takes_either_digits_gpt(tmp_path, llamagen_files):
    from rlprox.errors import RecipeError

    recipe = vapi_recipe(tmp_path, llamagen_files)
    recipe["model"] = {"gpt": "zoo:digits-gpt-coarse"}
    assert load_recipe(recipe).model.gpt == "zoo:digits-gpt-coarse"  # checked by name, built on first use
    recipe["model"] = {"gpt": "zoo:digits-vq-coarse"}
    with pytest.raises(RecipeError, match="use zoo:digits-gpt or zoo:digits-gpt-coarse or zoo:digits-gpt-k16"):
        load_recipe(recipe)
