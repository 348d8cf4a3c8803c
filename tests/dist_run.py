"""Run under 2 processes (torchrun): build the engine from a recipe, run N iterations of
collect + update, and write each rank's trained parameters and the first sample of its
first collect to OUT_DIR/rank<r>.safetensors (the LOOP and PolicyFlow distributed tests)."""

import sys

import torch
from safetensors.torch import save_file

from rlprox.cli import exit_process
from rlprox.engine import Engine
from rlprox.prox.regularizers import full_tensor
from rlprox.recipe import load_recipe

out_dir, recipe_path, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
engine = Engine(load_recipe(recipe_path))
algo, acc = engine.algo, engine.accelerator
first = None
for _ in range(iterations):
    with torch.no_grad(), engine.gathered():
        batch = algo.advantages(algo.collect())
    if first is None:  # this rank's first sampled tensor (LOOP's latents, VA-π's images) or packed rollout row
        if hasattr(batch, "latents"):  # LOOP's Rollout
            first = batch.latents[0].clone()
        elif isinstance(batch, dict):
            first = next(v for v in batch.values() if torch.is_tensor(v) and v.is_floating_point())[0].clone()
        else:
            first = batch[0].clone()
    engine.update(batch)
tensors = {
    f"param.{n}": full_tensor(p.detach()).clone()
    for name, m in algo.modules.items()
    for n, p in acc.unwrap_model(m).named_parameters()
    if p.requires_grad
}
tensors["first_noise"] = first
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/rank{acc.process_index}.safetensors")
acc.wait_for_everyone()
engine.close()
exit_process(0)  # no interpreter teardown: see rlprox.cli.exit_process
