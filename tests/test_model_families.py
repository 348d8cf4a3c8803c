"""Model families are plug-ins: a family of one's own trains through the unchanged LOOP
trainer, adapters register by pipeline class, each refuses options that are not its own,
and the trainer names no family."""

import ast
import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from rlprox.cli import main  # noqa: E402
from rlprox.engine import Engine  # noqa: E402
from rlprox.models.pipelines import ADAPTERS, Adapter, adapter_for_class, register_adapter  # noqa: E402
from rlprox.recipe import load_recipe  # noqa: E402
from tests.test_loop import loop_recipe, tiny_pipeline  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]


def test_a_family_of_ones_own_trains_one_round_through_the_unchanged_trainer(tmp_path, tiny_pipeline):  # noqa: F811
    recipe = loop_recipe(tmp_path, tiny_pipeline, num_steps=4, adapter="tests.example_family:LateStepsSD")
    recipe["loop"]["sampling"] = {"eta": 1.0, "trained_fraction": 0.5}
    recipe["run"]["iterations"] = 1
    engine = Engine(load_recipe(recipe))
    algo = engine.algo
    assert type(algo.adapter).__name__ == "LateStepsSD" and algo.adapter.options.trained_fraction == 0.5
    trained, loss = [], algo.loss

    def recording_loss(item):
        trained.extend(item.step.tolist())
        return loss(item)

    algo.loss = recording_loss
    before = {n: p.detach().clone() for n, p in algo.denoiser.named_parameters() if p.requires_grad}
    engine.fit()
    engine.close()
    assert trained and set(trained) == {2, 3}  # the last half of the 4 steps, nothing else
    assert any(not torch.equal(p, before[n]) for n, p in algo.denoiser.named_parameters() if n in before)


@pytest.mark.parametrize(
    "sampling,message",
    [
        ({"sampler": "sde"}, "loop.sampling.sampler: not an option of StableDiffusionPipeline (its options: eta, "),
        ({"trained_fraction": 0}, "loop.sampling.trained_fraction: must be in (0, 1] (got 0.0)"),
    ],
)
def test_a_familys_options_are_its_own(tmp_path, tiny_pipeline, capsys, sampling, message):  # noqa: F811
    recipe = loop_recipe(tmp_path, tiny_pipeline, adapter="tests.example_family:LateStepsSD")
    recipe["loop"]["sampling"] = sampling
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: " + message), err


def test_an_adapter_that_does_not_serve_the_pipeline_class_is_one_line(tmp_path, capsys):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    recipe = loop_recipe(tmp_path, folder, adapter="tests.example_family:LateStepsSD")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "recipe error: loop.adapter: tests.example_family:LateStepsSD serves StableDiffusionPipeline, "
        "not StableDiffusion3Pipeline"
    ], err


def test_an_adapter_registered_on_import_is_found_by_its_pipeline_class(tmp_path):
    class ToyFamily(Adapter):
        pipeline_classes = ("ToyTextToImagePipeline",)

    assert "ToyTextToImagePipeline" not in ADAPTERS
    register_adapter(ToyFamily)
    try:
        assert adapter_for_class("ToyTextToImagePipeline") is ToyFamily
        folder = tmp_path / "toy"
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "ToyTextToImagePipeline"}))
        recipe = load_recipe(loop_recipe(tmp_path, folder))  # resolved from the index alone: nothing loads
        assert recipe.setup.adapter is ToyFamily
    finally:
        ADAPTERS.unregister("ToyTextToImagePipeline")
    with pytest.raises(ValueError, match="no adapter for ToyTextToImagePipeline"):
        adapter_for_class("ToyTextToImagePipeline")


def _code_strings(path: Path) -> list[str]:
    """Names and string constants of a module's code, docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append(node.value)
        elif isinstance(node, ast.Name):
            out.append(node.id)
        elif isinstance(node, ast.Attribute):
            out.append(node.attr)
    return out


def test_the_trainer_names_no_family_and_models_import_no_zoo():
    words = _code_strings(ROOT / "rlprox" / "algos" / "loop.py")
    for family in ("StableDiffusion", "Flux", "FLUX", "SD3", "UNet2D", "Transformer2D"):
        assert not any(family in w for w in words), family
    for option in ("eta", "sampler", "noise_level", "sde_window", "guidance_embedding", "digits-sd3"):
        assert option not in words, option
    assert {w for w in words if w.startswith("zoo:") and w != "zoo:"} == {"zoo:digits-sd"}  # the default spec only
    for path in (ROOT / "rlprox" / "models").rglob("*.py"):
        imports = [
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])
        ]
        assert not any(str(m).startswith("rlprox.zoo") for m in imports), path


def test_a_family_missing_a_method_of_the_protocol_cannot_be_built():
    class Incomplete(Adapter):  # no load, encode, sample, ...: nothing of the protocol
        pipeline_classes = ("IncompletePipeline",)

    with pytest.raises(TypeError, match="abstract method"):
        Incomplete()
