"""One vocabulary: deprecated recipe keys keep working for one release (one stderr line naming the new
key), and every field of every recipe section has a doc that `rlprox train --help-recipe` prints."""

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import yaml

from rlprox.algos import BUILTIN, trainer_spec
from rlprox.cli import main
from rlprox.recipe import OptimConfig, RecipeError, RunConfig, field_docs, load_recipe, parse_section

DEPRECATED = "is deprecated, use"


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def deprecation_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if DEPRECATED in line]


def old_schedule_recipe(tiny_recipe) -> dict:
    data = tiny_recipe(run={"iterations": 2})
    data["optim"]["schedule"] = "linear"
    return data


def test_old_key_in_the_yaml_prints_one_line_and_trains(tmp_path, tiny_recipe, capsys):
    assert main(["train", write(tmp_path, old_schedule_recipe(tiny_recipe))]) == 0
    out = capsys.readouterr()
    assert deprecation_lines(out.err) == [
        "recipe: optim.schedule is deprecated, use optim.lr_schedule (the old key goes in the next release)"
    ]
    assert "done: t, 2 iterations" in out.out
    saved = yaml.safe_load((tmp_path / "t" / "checkpoints" / "iter-000002" / "recipe.yaml").read_text())
    assert saved["optim"]["lr_schedule"] == "linear" and "schedule" not in saved["optim"]  # only new keys saved
    assert main(["train", write(tmp_path, old_schedule_recipe(tiny_recipe)), "run.iterations=3", "--resume"]) == 0
    assert deprecation_lines(capsys.readouterr().err) == [  # the file's old key; the checkpoint's recipe: none
        "recipe: optim.schedule is deprecated, use optim.lr_schedule (the old key goes in the next release)"
    ]


def test_old_key_as_an_override_prints_one_line_and_trains(tmp_path, tiny_recipe, capsys):
    data = tiny_recipe(run={"iterations": 1}, optim={"lr_schedule": "cosine"})
    assert main(["train", write(tmp_path, data), "optim.schedule=linear"]) == 0
    assert deprecation_lines(capsys.readouterr().err) == [
        "recipe: optim.schedule is deprecated, use optim.lr_schedule (the old key goes in the next release)"
    ]
    assert load_recipe(data, ["optim.schedule=linear"]).optim.lr_schedule == "linear"  # overrides the file's


def test_an_old_file_key_with_a_new_override_takes_the_override(tiny_recipe, capsys):
    recipe = load_recipe(old_schedule_recipe(tiny_recipe), ["optim.lr_schedule=cosine"])
    assert recipe.optim.lr_schedule == "cosine"
    assert len(deprecation_lines(capsys.readouterr().err)) == 1


def test_old_and_new_key_together_is_one_line_error(tmp_path, tiny_recipe, capsys):
    data = tiny_recipe(optim={"schedule": "linear", "lr_schedule": "linear"})
    with pytest.raises(RecipeError, match="optim.schedule: is the deprecated name of optim.lr_schedule"):
        load_recipe(data)
    assert main(["train", write(tmp_path, data)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "recipe error: optim.schedule: is the deprecated name of optim.lr_schedule; give only optim.lr_schedule"
    )


def test_unknown_key_suggests_from_the_renames(tiny_recipe):
    with pytest.raises(RecipeError, match="did you mean 'schedule'"):
        load_recipe(tiny_recipe(optim={"schedul": "linear"}))


def test_old_regularizer_key_prints_one_line(tiny_recipe, capsys):
    data = tiny_recipe()
    data["regularizers"] = [
        {
            "type": "l1",
            "params": "policy.critic.*.weight",
            "schedule": {"type": "linear", "start": 0.0, "end": 1.0, "steps": 2},
        }
    ]
    recipe = load_recipe(data)
    assert "lam_schedule" in recipe.regularizers[0] and "schedule" not in recipe.regularizers[0]
    assert deprecation_lines(capsys.readouterr().err) == [
        "recipe: regularizers[0].schedule is deprecated, use regularizers[0].lam_schedule "
        "(the old key goes in the next release)"
    ]
    data["regularizers"][0]["lam_schedule"] = 0.1
    with pytest.raises(RecipeError, match=r"regularizers\[0\].schedule: is the deprecated name"):
        load_recipe(data)


@dataclass
class Inner:
    depth: int = 1  # inner depth


@dataclass
class Renamed:
    """A section that moved fields, one into a mapping field."""

    RENAMED: ClassVar[dict[str, str]] = {"old": "new", "eta": "sampling.eta"}

    new: float = 0.0  # the new name
    sampling: dict = field(default_factory=dict)  # family options
    inner: Inner = field(default_factory=Inner)


def test_a_dotted_rename_moves_the_key_into_a_mapping_field(capsys):
    parsed = parse_section(Renamed, {"old": 2.0, "eta": 0.5, "sampling": {"noise": 1}}, "sec")
    assert parsed == Renamed(new=2.0, sampling={"noise": 1, "eta": 0.5})
    assert deprecation_lines(capsys.readouterr().err) == [
        "recipe: sec.old is deprecated, use sec.new (the old key goes in the next release)",
        "recipe: sec.eta is deprecated, use sec.sampling.eta (the old key goes in the next release)",
    ]
    with pytest.raises(RecipeError, match="sec.eta: is the deprecated name of sec.sampling.eta"):
        parse_section(Renamed, {"eta": 0.5, "sampling": {"eta": 1.0}}, "sec")


def sections():
    out = [("run", RunConfig), ("optim", OptimConfig)]
    for algo in BUILTIN:
        out += [(f"{algo}.{name}", cls) for name, cls in trainer_spec(algo).sections.items()]
    return out


def dataclasses_of(cls):
    """cls's own dataclass and the nested ones (loop.lora, run.ddp, reward's RewardTerm)."""
    import typing

    if dataclasses.is_dataclass(cls):
        yield cls
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield from dataclasses_of(hints[f.name])
    else:
        for arg in typing.get_args(cls):
            yield from dataclasses_of(arg)


@pytest.mark.parametrize("section", [s for s, _ in sections()])
def test_every_field_of_every_section_has_a_doc(section):
    cls = dict(sections())[section]
    for klass in dataclasses_of(cls):
        missing = [name for name, doc in field_docs(klass).items() if not doc]
        assert not missing, f"{section} ({klass.__name__}): fields without a doc comment: {missing}"


def test_field_docs_read_comments_above_and_beside_a_field():
    docs = field_docs(RunConfig)
    assert docs["eval_size"].startswith("episodes (env trainers) or samples")  # the block above
    assert docs["iterations"].startswith("collect/update iterations")  # the trailing comment
    assert docs["overwrite"].startswith("start fresh")  # a trailing comment inside a parenthesised default
    assert field_docs(Renamed)["new"] == "the new name"


@pytest.mark.parametrize("section", ["loop", "ppo", "run", "optim", "reward", "env", "vapi"])
def test_help_recipe_lists_every_field_with_its_doc(section, capsys):
    assert main(["train", "--help-recipe", section]) == 0
    out = " ".join(capsys.readouterr().out.split())  # docs wrap over lines
    declared = dict(sections())
    cls = declared.get(section) or next(c for name, c in declared.items() if name.endswith(f".{section}"))
    for klass in dataclasses_of(cls):
        for name, doc in field_docs(klass).items():
            assert f"{name}: " in out and doc in out, (section, name)


def test_help_recipe_regularizers_and_unknown_section(capsys):
    assert main(["train", "--help-recipe", "regularizers"]) == 0
    out = capsys.readouterr().out
    assert "lam_schedule" in out and "prox_lr" in out
    assert main(["train", "--help-recipe", "lop"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --help-recipe: unknown section 'lop'; known: run, optim, ") and "\n" not in err


def test_a_checkpoint_saved_with_old_keys_still_loads(tmp_path, tiny_recipe, capsys):
    from rlprox import checkpoint

    assert main(["train", write(tmp_path, tiny_recipe(run={"iterations": 1}, optim={"lr_schedule": "linear"}))]) == 0
    ckpt = checkpoint.resolve_checkpoint(tmp_path / "t")
    saved = yaml.safe_load((ckpt / "recipe.yaml").read_text())
    saved["optim"]["schedule"] = saved["optim"].pop("lr_schedule")  # as an older release wrote it
    (ckpt / "recipe.yaml").write_text(yaml.safe_dump(saved))
    capsys.readouterr()
    assert checkpoint.read_recipe(ckpt).optim.lr_schedule == "linear"
    assert len(deprecation_lines(capsys.readouterr().err)) == 1
