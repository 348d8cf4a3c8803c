"""LOOP on a tiny random-weight QwenImagePipeline (Qwen2.5-VL text encoder with the pipeline's template,
masked variable-length prompts, true CFG with the pipeline's renormalisation, packed latents, the causal
VAE's frame axis): the adapter's ODE equals stock diffusers' sampling, LoRA trains and its export loads in
stock diffusers, resume after SIGKILL is exact, NFT runs, a folder without its text encoder is one line,
2-process training (DDP, FSDP) keeps the ranks identical; the digits tokenizer keeps exactly the prompt's
tokens after the pipeline drops the template's prefix; the Qwen-Image recipe checks out against the real
configs on the meta device."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox import checkpoint  # noqa: E402
from rlprox.cli import main  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.models.pipelines import Sampling, adapter_for_class  # noqa: E402
from rlprox.models.pipelines.qwen_image import QwenImageAdapter, QwenImageOptions  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop_flow import (  # noqa: E402
    _lora_and_base,
    assert_first_minibatches_recompute_the_stored_log_probs,
    flow_recipe,  # noqa: E402
)

IMAGE = 16  # pixels: 8×8×4 latents (the VAE's factor 2), 4×4 = 16 packed tokens of 16 channels
STEPS = 4  # flow_recipe's num_steps
PROMPTS = ["a red seven", "the blue digit two"]  # 3 and 4 prompt tokens: the shorter one is padded and masked
MAX_TOKENS = 16
ROOT = Path(__file__).resolve().parents[1]


def tiny_qwen_pipeline(seed: int = 0):
    """digits-qwen's architecture with random weights and one transformer block, its VAE's latents_mean / std
    set to non-trivial values (the decoding must use them)."""
    from rlprox.zoo.qwen import build_components, build_pipeline

    parts = build_components(seed, num_layers=1)
    parts["vae"].register_to_config(latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0])
    return build_pipeline(parts)


@pytest.fixture(scope="module")
def qwen_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "tiny-qwen"
    tiny_qwen_pipeline().save_pretrained(str(path))
    return path


def qwen_recipe(tmp_path, pipeline, sampling=None, **loop):
    recipe = flow_recipe(tmp_path, pipeline, **{"guidance_scale": 1.0, "resolution": IMAGE, **loop})
    recipe["loop"]["max_sequence_length"] = MAX_TOKENS
    recipe["loop"]["sampling"].update(sampling or {})
    return recipe


def stock_pipeline(path):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_ode(pipe, x_T: torch.Tensor, guidance: float, negative: str = " "):
    """QwenImagePipeline's own sampling from packed x_T (B, N, 16): (final latents, images (B, 3, H, W))."""
    final = {}

    def keep(pipe, i, t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    cfg = {"true_cfg_scale": guidance, "negative_prompt": negative} if guidance > 1 else {"true_cfg_scale": 1.0}
    images = pipe(
        prompt=PROMPTS,
        latents=x_T,
        num_inference_steps=STEPS,
        height=IMAGE,
        width=IMAGE,
        max_sequence_length=MAX_TOKENS,
        output_type="pt",
        callback_on_step_end=keep,
        **cfg,
    ).images
    return final["latents"], images


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_qwen_ode_equals_stock_diffusers(qwen_pipeline, guidance):
    """Same prompts, x_T and steps: the σ's, the masked conditioning, true CFG with its renormalisation,
    the Euler steps on packed latents and the decoding through the frame axis are the pipeline's."""
    sampling = Sampling(STEPS, guidance, resolution=IMAGE, max_sequence_length=MAX_TOKENS)
    options = QwenImageOptions(noise_level=1e-6, sde_window=[0, STEPS])
    adapter = QwenImageAdapter.load(qwen_pipeline, sampling, options)
    assert adapter_for_class("QwenImagePipeline") is QwenImageAdapter
    stock = stock_pipeline(qwen_pipeline)
    x_T = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    latents, images = stock_ode(stock, x_T, guidance)
    torch.testing.assert_close(adapter.sigmas, stock.scheduler.sigmas.float(), rtol=0, atol=0)
    model, cond = adapter.denoiser, adapter.encode(PROMPTS, "cpu")
    assert cond["mask"].tolist()[0][-1] == 0 and cond["mask"][1].all()  # the shorter prompt is padded
    negative = adapter.negative(2, "cpu")
    assert (negative is None) == (guidance == 1.0)
    noise = torch.cat([x_T[:, None], torch.randn(2, STEPS, 16, 16)], 1)  # (B, T+1, N, 4·C)
    assert adapter.noise_shape() == noise.shape[1:]
    ode = adapter.sample_with_noise(model, cond, negative, noise, deterministic=True)
    sde = adapter.sample_with_noise(model, cond, negative, noise, deterministic=False)
    torch.testing.assert_close(ode, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(sde, latents, rtol=0, atol=1e-4)
    torch.testing.assert_close(adapter.decode(latents), images.float(), rtol=0, atol=1e-5)
    if guidance > 1:  # the renormalisation matters: without it the samples differ
        adapter.options.renormalize_guidance = False
        plain = adapter.sample_with_noise(model, cond, negative, noise, deterministic=True)
        assert (plain - latents).abs().max() > 1e-3


def test_qwen_ratio_is_one_and_lora_trains_and_exports_to_stock_diffusers(tmp_path, qwen_pipeline):
    """True CFG in training: the stored log-probs are recomputed exactly; only the LoRA of both streams'
    attention moves; the export (the EMA of the LoRA weights), loaded by stock ``load_lora_weights``,
    reproduces the tuned model's ODE samples."""
    recipe = qwen_recipe(tmp_path, qwen_pipeline, lora={"rank": 2, "alpha": 8.0}, clip_coef=10.0, ema_decay=0.5)
    recipe["loop"]["guidance_scale"] = 2.0
    recipe["optim"]["lr"] = 5e-2
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert isinstance(algo.adapter, QwenImageAdapter)
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        assert batch.latents.shape == (4, STEPS + 1, 16, 16)  # (B, T+1, N tokens, 4·C)
        assert batch.cond["embeds"].shape[-1] == 64 and batch.cond["mask"].shape == batch.cond["embeds"].shape[:2]
        assert_first_minibatches_recompute_the_stored_log_probs(algo, batch)
    transformer = algo.denoiser
    lora, base = _lora_and_base(transformer)
    for name in ("to_q", "to_out.0", "add_q_proj", "to_add_out"):
        assert f"transformer_blocks.0.attn.{name}.lora_A.default.weight" in lora, name
    stats = engine.fit()
    engine.close()
    for key in ("reward/mean", "policy/approx_kl", "policy/ratio_max", "loss/policy"):
        assert key in stats and torch.isfinite(torch.tensor(stats[key])), key
    assert all(torch.equal(p, base[n]) for n, p in transformer.named_parameters() if "lora" not in n)
    assert main(["export", str(engine.run_dir), str(tmp_path / "lora")]) == 0
    stock = stock_pipeline(qwen_pipeline)
    stock.load_lora_weights(str(tmp_path / "lora"))
    x_T = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    noise = x_T[:, None].expand(2, STEPS + 1, 16, 16)
    cond, negative = algo.adapter.encode(PROMPTS, "cpu"), algo.adapter.negative(2, "cpu")
    with torch.no_grad():
        with algo._tuned_model() as model:  # the EMA weights, which the export holds
            tuned = algo.adapter.sample_with_noise(model, cond, negative, noise, deterministic=True)
        with algo._base_model() as base_model:
            untuned = algo.adapter.sample_with_noise(base_model, cond, negative, noise, deterministic=True)
    latents, _ = stock_ode(stock, x_T, 2.0)
    assert (tuned - untuned).abs().max() > 1e-2  # the LoRA changed the samples
    torch.testing.assert_close(latents, tuned, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "loop",
    [
        {"sampler": "cps", "noise_level": 0.5},  # the coefficients-preserving step, every step but the last
        {"sampling": {"sde_window_size": 2}, "shared_initial_noise": True, "sample_batch_size": 2},  # -Fast
        {"trust_region": "kl", "kl_threshold": 1e-6, "update_epochs": 2},  # Flow-DPPO's KL mask (keeps means)
    ],
    ids=["cps", "random-window", "kl-trust-region"],
)
def test_qwen_flow_options_train_with_cfg_and_recompute_the_stored_log_probs(tmp_path, qwen_pipeline, loop):
    """Each flow option of every family on Qwen-Image with true CFG: the stored log-probs are recomputed
    exactly before the first update, and a round trains."""
    sampling = loop.pop("sampling", None)
    recipe = qwen_recipe(tmp_path, qwen_pipeline, sampling=sampling, guidance_scale=2.0, **loop)
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    with torch.no_grad():
        batch = algo.advantages(algo.collect())
        assert_first_minibatches_recompute_the_stored_log_probs(algo, batch)
    stats = engine.fit()
    engine.close()
    assert torch.isfinite(torch.tensor(stats["loss/policy"]))


def test_qwen_full_fine_tuning_evaluates_the_base_and_exports_a_stock_pipeline(tmp_path, qwen_pipeline):
    recipe = qwen_recipe(tmp_path, qwen_pipeline, finetune="full", guidance_scale=2.0)
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    engine.fit()
    engine.close()
    assert main(["eval", str(engine.run_dir), "--num-samples", "2"]) == 0  # the base transformer from the folder
    result = json.loads((checkpoint.find_latest(engine.run_dir) / "eval.json").read_text())
    assert "eval/base_reward_ode" in result and "eval/reward" in result
    assert main(["export", str(engine.run_dir), str(tmp_path / "full")]) == 0
    exported = stock_pipeline(tmp_path / "full").transformer.state_dict()
    tuned = engine.algo.denoiser.state_dict()
    assert exported.keys() == tuned.keys() and all(torch.equal(exported[k], tuned[k]) for k in tuned)
    base = stock_pipeline(qwen_pipeline).transformer.state_dict()
    assert any(not torch.equal(base[k], tuned[k]) for k in tuned)


def test_qwen_nft_objective_runs_a_step(tmp_path, qwen_pipeline):
    recipe = qwen_recipe(tmp_path, qwen_pipeline, objective="nft", advantage="group_norm")
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    before = {n: p.detach().clone() for n, p in engine.algo.denoiser.named_parameters() if p.requires_grad}
    stats = engine.fit()
    engine.close()
    assert "loss/policy" in stats and torch.isfinite(torch.tensor(stats["loss/policy"]))
    assert engine.algo.optimizer_steps >= 1
    assert any(not torch.equal(p, before[n]) for n, p in engine.algo.denoiser.named_parameters() if n in before)


def test_qwen_bf16_lora_base_with_cfg_trains_only_the_adapters(tmp_path, qwen_pipeline):
    """run.frozen_dtype bfloat16: the transformer base, the Qwen2.5-VL encoder and the causal VAE in bf16 under
    fp32 LoRA adapters, true CFG on; only the adapters move and the decoded images are finite."""
    recipe = qwen_recipe(tmp_path, qwen_pipeline, guidance_scale=2.0)
    recipe["run"].update(frozen_dtype="bfloat16", mixed_precision="bf16", iterations=1)
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert all((p.dtype == torch.float32) == ("lora_" in n) for n, p in algo.denoiser.named_parameters())
    assert next(algo.adapter.pipe.text_encoder.parameters()).dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in algo.denoiser.named_parameters()}
    stats = engine.fit()
    engine.close()
    assert torch.isfinite(torch.tensor(stats["loss/policy"]))
    moved = {n for n, p in algo.denoiser.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    images = algo.adapter.decode(torch.randn(2, *algo.adapter.latent_shape))
    assert images.shape == (2, 3, IMAGE, IMAGE) and images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.slow  # ~30-50 s on 2 cores: .ci/run runs it after make test
def test_qwen_resume_after_sigkill_equals_uninterrupted(tmp_path, qwen_pipeline):
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 5

    def make(name):
        recipe = qwen_recipe(tmp_path, qwen_pipeline, sde_window=[0, 2], advantage="group_norm")
        recipe["run"].update(name=name, iterations=iterations, save_every=1, keep_last=2)
        return recipe

    weights = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any("lora" in k for k in weights)


def test_a_qwen_folder_missing_its_text_encoder_is_one_line(tmp_path, qwen_pipeline, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_pipeline, broken)
    shutil.rmtree(broken / "text_encoder")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(qwen_recipe(tmp_path, broken)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: loop.pipeline: ") and "has no text encoder" in err[0]


@pytest.mark.parametrize(
    "loop,message",
    [
        ({"resolution": 10}, "recipe error: loop.resolution: 10 px is not a multiple of 4 (the VAE's factor × 2)"),
        ({"sampling": {"guidance_embedding": 3.5}}, "recipe error: loop.sampling.guidance_embedding: not an option"),
    ],
)
def test_qwen_options_are_one_line(tmp_path, qwen_pipeline, capsys, loop, message):
    recipe = qwen_recipe(tmp_path, qwen_pipeline, sampling=loop.pop("sampling", None), **loop)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_the_digits_tokenizer_keeps_exactly_the_prompt_after_the_template_prefix(qwen_pipeline):
    """The pipeline drops the first ``prompt_template_encode_start_idx`` tokens of every templated prompt:
    with the byte-level BPE that is exactly the template's prefix, so the prompt's words all stay; a
    word-level tokenizer of the same words splits the prefix differently and the prompt's words are lost."""
    from rlprox.zoo.data import paraphrased_prompts
    from rlprox.zoo.qwen import check_template_prefix, pipeline_template
    from rlprox.zoo.sd3 import build_t5_tokenizer

    pipe = stock_pipeline(qwen_pipeline)
    template, drop = pipeline_template()
    assert drop == pipe.prompt_template_encode_start_idx == 34 and template == pipe.prompt_template_encode
    tokenizer = pipe.tokenizer
    suffix = tokenizer(template.split("{}")[1]).input_ids  # <|im_end|> \n <|im_start|> assistant \n
    for prompt in ["", "a red seven", *paraphrased_prompts()[0][::50]]:
        kept = tokenizer(template.format(prompt)).input_ids[drop:]
        assert kept == tokenizer(prompt).input_ids + suffix, prompt
        if prompt:
            assert len(tokenizer(prompt).input_ids) == len(prompt.split())  # one token a word
    embeds, mask = pipe.encode_prompt(["a red seven"], device="cpu")
    assert embeds.shape[1] == 3 + len(suffix) and mask is None
    with pytest.raises(ValueError, match="prefix is .* tokens, the pipeline drops 34"):
        check_template_prefix(build_t5_tokenizer())


def test_a_qwen_index_without_a_text_encoder_is_refused_before_loading(tmp_path, qwen_pipeline):
    """check_config reads the index alone: an index whose text_encoder is null is refused before loading."""
    folder = tmp_path / "nulled"
    shutil.copytree(qwen_pipeline, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder": [None, None]}))
    with pytest.raises(Exception, match="has no text encoder"):
        QwenImageAdapter.check_config(folder, Sampling(STEPS, 1.0, IMAGE), QwenImageOptions())


# ----------------------------------------------------------------------------- the real model, on the meta device
REAL_CONFIGS = Path(__file__).parent / "configs" / "qwen-image"  # Qwen/Qwen-Image's public config files


def test_the_qwen_image_pickscore_recipe_against_the_real_configs_on_the_meta_device(tmp_path, monkeypatch):
    """recipes/loop/qwen-image-pickscore.yaml with loop.pipeline at Qwen-Image's config files: the family is
    read from them (model_index.json), the config checks pass, and the real transformer (20B), VAE and
    Qwen2.5-VL text encoder built on the meta device (no weights) carry the recipe's LoRA targets in both
    streams; the adapter on that pipeline has 32×32 = 1024 packed tokens of 64 channels at 512 px and the
    pipeline's σ's. No download."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from rlprox.zoo.qwen import build_tokenizer

    monkeypatch.chdir(ROOT)  # the recipe names its prompt file relative to the project root
    folder = tmp_path / "Qwen-Image"
    shutil.copytree(REAL_CONFIGS, folder)
    recipe = load_recipe("recipes/loop/qwen-image-pickscore.yaml", [f"loop.pipeline={folder}"])
    setup = recipe.setup
    assert setup.adapter is QwenImageAdapter
    options, sampling = setup.options, setup.sampling
    assert (sampling.num_steps, sampling.guidance_scale, sampling.resolution) == (10, 4.0, 512)
    assert (options.noise_level, options.sde_window_size, options.sde_window_range) == (1.2, 2, [0, 5])
    assert (
        recipe.loop.finetune == "lora" and recipe.loop.gradient_checkpointing and recipe.run.mixed_precision == "bf16"
    )
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(
            QwenImageTransformer2DModel.load_config(folder / "transformer")
        )
        vae = AutoencoderKLQwenImage.from_config(AutoencoderKLQwenImage.load_config(folder / "vae"))
        text_config = Qwen2_5_VLConfig.from_json_file(folder / "text_encoder" / "config.json")
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
    assert 19e9 < sum(p.numel() for p in transformer.parameters()) < 22e9  # Qwen-Image's 20B MMDiT
    assert 7e9 < sum(p.numel() for p in text_encoder.parameters()) < 9e9  # Qwen2.5-VL-7B
    assert text_encoder.config.text_config.hidden_size == transformer.config.joint_attention_dim
    modules = {name for name, _ in transformer.named_modules()}
    for target in recipe.loop.lora.target_modules or QwenImageAdapter.lora_targets:
        assert f"transformer_blocks.59.attn.{target}" in modules, target
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    pipe = QwenImagePipeline(scheduler, vae, text_encoder, build_tokenizer(), transformer)  # a stand-in tokenizer
    adapter = QwenImageAdapter(pipe, sampling, options)
    assert pipe.vae_scale_factor == 8 and adapter.latent_shape == (1024, 64) and adapter.image_size == 512
    assert adapter.sigmas.shape == (11,) and adapter.sigmas[0] == 1 and adapter.sigmas[-1] == 0
    assert adapter.trained_steps.numel() == 2  # one position of the 2-step window


@pytest.mark.parametrize("grad_sync", ["auto", "fsdp"])
def test_two_processes_qwen_loop_keep_identical_lora_and_draw_different_noise(tmp_path, qwen_pipeline, grad_sync):
    """True CFG, the SDE on a window, group-normalised advantages, kl_ref to the LoRA-off model, on 2 CPU
    processes; FSDP2 with the transformer's dual-stream blocks as units."""
    from tests.test_distributed import dist_run

    recipe = qwen_recipe(tmp_path, qwen_pipeline, advantage="group_norm", sde_window=[0, 3], guidance_scale=2.0)
    recipe["regularizers"] = [{"type": "kl_ref", "lam": 0.1}]
    recipe["run"].update(grad_sync=grad_sync, fsdp={"wrap": ["QwenImageTransformerBlock"]})
    r0, r1 = dist_run(tmp_path, recipe)
    assert not torch.equal(r0["first_noise"], r1["first_noise"])  # per-rank generators
    params = [k for k in r0 if k.startswith("param.")]
    assert params and all("lora" in k for k in params)
    for k in params:
        assert torch.equal(r0[k], r1[k]), k
