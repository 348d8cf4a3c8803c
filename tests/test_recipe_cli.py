"""Bad input: one line `recipe error: <key>: <problem>` and exit status 2, before any work."""

import subprocess
import sys

import pytest
import yaml

from rlprox.cli import main
from rlprox.recipe import RecipeError, load_recipe
from tests.conftest import ROOT


def write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


BAD = [
    ({"ppo": {"minbatch_size": 8}}, [], "ppo.minbatch_size: unknown key (did you mean 'minibatch_size'?)"),
    ({"run": {"iterations": "ten"}}, [], "run.iterations: expected an integer"),
    ({"run": {"progress": "yes"}}, [], "run.progress: expected true/false"),
    ({"ppo": {"gamma": 1.5}}, [], "ppo.gamma: must be in (0, 1]"),
    ({"optim": {"lr": -1}}, [], "optim.lr: must be > 0"),
    ({"optim": {"eps": 0}}, [], "optim.eps: must be > 0"),
    (
        {"run": {"log_update_norm": True, "grad_sync": "fsdp"}},
        [],
        "run.log_update_norm: not supported with run.grad_sync: fsdp",
    ),
    ({"ppo": {"minibatch_size": 64}}, [], "ppo.minibatch_size: 64 must divide the rollout"),
    ({"ppo": {"minibatch_size": 5}}, [], "ppo.minibatch_size: 5 must divide the rollout"),
    ({"env": {"id": "CartPol-v1"}}, [], "env.id: unknown gymnasium env 'CartPol-v1' (did you mean 'CartPole-v1'?)"),
    ({"env": {"id": "nosuchmodule:Env"}}, [], "env.id: cannot import module 'nosuchmodule'"),
    (
        {"env": {"wrappers": ["gymnasium.wrappers:NoSuchWrapper"]}},
        [],
        "env.wrappers[0]: module 'gymnasium.wrappers' has no attribute",
    ),
    ({"algo": "ppx"}, [], "algo: unknown algorithm 'ppx' (did you mean 'ppo'?)"),
    ({"run": {"resume": "/no/such/checkpoint"}}, [], "run.resume: checkpoint not found"),
    ({"optim": {"name": "adamx"}}, [], "optim.name: must be one of adam, adamw, sgd"),
    (
        {"run": {"gradient_accumulation_steps": 3}},
        [],
        "run.gradient_accumulation_steps: 3 does not divide the 4 minibatches",
    ),
    ({}, ["ppo.update_epochs=0"], "ppo.update_epochs: must be > 0"),
    ({}, ["ppo.nope=1"], "ppo.nope: unknown key"),
    ({}, ["run.iterations"], "run.iterations: override must look like key.sub=value"),
    ({}, ["run.name.sub=1"], "run.name: is not a section"),
]


@pytest.mark.parametrize(
    "patch,overrides,message", BAD, ids=[m.split(":")[0] + "-" + str(i) for i, (_, _, m) in enumerate(BAD)]
)
def test_bad_input_one_line_exit_2(tmp_path, tiny_recipe, capsys, patch, overrides, message):
    data = tiny_recipe()
    for key, value in patch.items():
        if isinstance(value, dict):
            data[key].update(value)
        else:
            data[key] = value
    code = main(["train", write(tmp_path, data), *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("recipe error: ") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "t").exists()  # no work started


def test_missing_recipe_file(capsys):
    assert main(["train", "no/such/recipe.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "recipe error: no/such/recipe.yaml: recipe file not found"


def test_invalid_yaml(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {name: [unclosed\n")
    assert main(["train", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_subprocess_no_traceback(tmp_path, tiny_recipe):
    data = tiny_recipe(env={"id": "NoSuchEnv-v0"})
    out = subprocess.run(
        [sys.executable, "-m", "rlprox", "train", write(tmp_path, data)], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["recipe error: env.id: unknown gymnasium env 'NoSuchEnv-v0'"] or (
        len(out.stderr.strip().splitlines()) == 1 and "env.id: unknown gymnasium env" in out.stderr
    )


def test_overrides_and_types(tiny_recipe):
    recipe = load_recipe(
        tiny_recipe(), ["ppo.clip_coef=0.1", "optim.lr=3e-4", "env.kwargs={}", "run.log_with=[tensorboard]"]
    )
    assert recipe.ppo.clip_coef == 0.1 and recipe.optim.lr == 3e-4 and recipe.run.log_with == ["tensorboard"]
    assert isinstance(load_recipe(tiny_recipe(optim={"lr": 1}), []).optim.lr, float)


def test_shipped_recipes_validate(monkeypatch):
    import glob
    import importlib.util

    monkeypatch.chdir(ROOT)  # recipes name their prompt files relative to the project root
    paths = [p for p in glob.glob(f"{ROOT}/recipes/**/*.yaml", recursive=True) if "/accelerate/" not in p]
    assert len(paths) >= 12
    for path in paths:
        if path.endswith("llamagen-c2i.yaml"):  # the user's local LlamaGen files: one line naming the missing one
            with pytest.raises(
                RecipeError,
                match=r"^recipe error: model.gpt: LlamaGen checkpoint file not found: '/path/to/c2i_XXL_384.pt'$",
            ):
                load_recipe(path)
            continue
        if "pointmaze" in path and importlib.util.find_spec("gymnasium_robotics") is None:
            with pytest.raises(
                RecipeError,
                match=r"env.imports\[0\]: cannot import 'gymnasium_robotics' \(pip install 'rlprox\[robotics\]'\)",
            ):
                load_recipe(path)  # an optional extra: one line naming it
            continue
        load_recipe(path)


def test_recipes_command_lists_descriptions(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "recipes/ppo/cartpole.yaml" in out and "CartPole" in out


def test_error_is_recipe_error():
    with pytest.raises(RecipeError) as info:
        load_recipe({"algo": "ppo", "bogus": 1})
    assert str(info.value).startswith(
        "recipe error: bogus: unknown key (algo ppo takes: algo, "
        "description, env, optim, ppo, regularizers, run, seed)"
    )


def test_rewards_command(capsys):
    assert main(["rewards"]) == 0
    assert "digits_alignment" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["recipes", "--help"],
        ["zoo", "--help"],
        ["rewards", "--help"],
    ],
)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command)
    assert info.value.code == 0
    assert "usage: rlprox" in capsys.readouterr().out


def test_existing_run_is_never_mixed_or_lost(tmp_path, tiny_recipe, capsys):
    path = write(tmp_path, tiny_recipe(run={"iterations": 1}))
    assert main(["train", path]) == 0
    ckpt = tmp_path / "t" / "checkpoints" / "iter-000001" / "model.safetensors"
    saved = ckpt.read_bytes()
    capsys.readouterr()
    assert main(["train", path]) == 2  # a second fresh run in the same folder
    err = capsys.readouterr().err.strip()
    assert err.startswith("recipe error: run.name: ") and "--resume" in err and "\n" not in err
    assert ckpt.read_bytes() == saved
    assert main(["train", path, "run.overwrite=true", "seed=9"]) == 0
    assert ckpt.read_bytes() != saved
    assert len((tmp_path / "t" / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("output_dir,key", [("afile", "run.output_dir"), ("afile/sub", "run.output_dir")])
def test_output_dir_that_is_a_file(tmp_path, tiny_recipe, capsys, output_dir, key):
    (tmp_path / "afile").write_text("keep me")
    data = tiny_recipe(run={"output_dir": str(tmp_path / output_dir)})
    assert main(["train", write(tmp_path, data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"recipe error: {key}: {tmp_path / 'afile'} exists and is not a folder"]
    assert (tmp_path / "afile").read_text() == "keep me"


def test_run_folder_that_is_a_file(tmp_path, tiny_recipe, capsys):
    (tmp_path / "t").write_text("keep me")
    assert main(["train", write(tmp_path, tiny_recipe())]) == 2
    assert capsys.readouterr().err.strip() == f"recipe error: run.name: {tmp_path / 't'} exists and is not a folder"


def test_unknown_tracker(tiny_recipe, capsys, tmp_path):
    assert main(["train", write(tmp_path, tiny_recipe()), "run.log_with=[tensorbored]"]) == 2
    assert "run.log_with: unknown tracker 'tensorbored'" in capsys.readouterr().err


def test_missing_optional_package_is_one_line(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if rlprox[diffusion] were not installed
    monkeypatch.setenv("RLPROX_CACHE", str(tmp_path))
    assert main(["zoo", "build", "digits-sd", "--micro"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: this needs the optional package 'diffusers': pip install 'rlprox[diffusion]'"


SHIPPED = ["ppo/cartpole.yaml", "policyflow/multigoal.yaml", "loop/digits-alignment.yaml", "sparse/digits-wgsef.yaml"]


@pytest.mark.parametrize("path", [*SHIPPED, "vapi/digits.yaml"])
def test_every_trainer_checks_counts_and_accumulation_the_same_way(path, monkeypatch):
    """One check for all trainers: run.gradient_accumulation_steps must divide the
    minibatches per epoch (an optimizer step never spans epochs); counts are > 0."""
    from rlprox.algos import trainer_spec

    monkeypatch.chdir(ROOT)
    path = f"recipes/{path}"
    recipe = load_recipe(path)
    spec = trainer_spec(recipe.algo)
    n = spec.minibatches_per_epoch(recipe)
    assert load_recipe(path, [f"run.gradient_accumulation_steps={n}"]).run.gradient_accumulation_steps == n
    with pytest.raises(
        RecipeError,
        match=rf"^recipe error: run.gradient_accumulation_steps: {n + 1} does not divide the {n} minibatch",
    ):
        load_recipe(path, [f"run.gradient_accumulation_steps={n + 1}"])
    for key in spec.counts:
        with pytest.raises(RecipeError, match=rf"^recipe error: {key}: must be > 0 \(got 0\)$"):
            load_recipe(path, [f"{key}=0"])


BAD_FILES = [
    ("loop/digits-alignment.yaml", ["loop.prompts=EMPTY"], "recipe error: loop.prompts: EMPTY holds no prompt"),
    (
        "loop/digits-alignment.yaml",
        ["loop.pipeline=zoo:digits-foo"],
        "recipe error: loop.pipeline: unknown zoo model 'digits-foo'",
    ),
    (
        "loop/digits-alignment.yaml",
        ["loop.pipeline=zoo:digits-gpt"],
        "recipe error: loop.pipeline: zoo:digits-gpt is not a model this field takes; use zoo:digits-sd",
    ),
    (
        "loop/digits-alignment.yaml",
        ["reward.kwargs.classifier=zoo:digits-clasifier"],
        "recipe error: reward: reward 'digits_alignment': classifier: unknown zoo model 'digits-clasifier'",
    ),
    ("vapi/digits.yaml", ["model.gpt=zoo:digits-sd"], "recipe error: model.gpt: zoo:digits-sd is not a model"),
    ("vapi/digits.yaml", ["vapi.eval_classifier=no/such/dir"], "recipe error: vapi.eval_classifier: not a digits"),
    ("vapi/digits.yaml", ["vapi.data=no/such/dir"], "recipe error: vapi.data: not 'digits', an image folder"),
]


@pytest.mark.parametrize("recipe,overrides,message", BAD_FILES, ids=[o[0] for _, o, _ in BAD_FILES])
def test_bad_sources_and_zoo_names_end_in_one_line(tmp_path, recipe, overrides, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    out = subprocess.run(
        [sys.executable, "-m", "rlprox", "train", f"recipes/{recipe}", *overrides, f"run.output_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and lines[-1].startswith(message.replace("EMPTY", str(empty))), lines
    assert sum("error" in line for line in lines) == 1, lines


TEARDOWN_PROBE = """
import atexit, sys
from rlprox.cli import entry

class Teardown:  # its __del__ runs only when the interpreter tears the module down
    def __del__(self, write=sys.__stderr__.write):
        write("teardown ran\\n")

probe = Teardown()
atexit.register(lambda: print("atexit ran"))
sys.argv = ["rlprox", *sys.argv[1:]]
entry()
"""


@pytest.mark.parametrize("world_size, teardown", [("1", True), ("2", False)])
def test_one_process_of_several_exits_without_interpreter_teardown(tmp_path, world_size, teardown):
    """A finished torchrun process must not reach the interpreter's teardown, where gloo
    threads of a process group kept alive by FSDP's mesh can abort it; its output, atexit
    handlers and exit status are kept. One process alone tears down as usual."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT, "WORLD_SIZE": world_size}
    ok = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, "recipes"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "recipes/ppo/cartpole.yaml" in ok.stdout.replace("\\", "/") and ok.stdout.rstrip().endswith("atexit ran")
    assert ("teardown ran" in ok.stderr) is teardown
    bad = subprocess.run(
        [sys.executable, "-c", TEARDOWN_PROBE, "recipes", "--root", str(tmp_path / "none")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no recipes folder" in bad.stderr
