"""Run under 2 processes (accelerate launch / torchrun): one PPO collect + update.

Each rank writes its packed batch and its parameters after the update to OUT_DIR, so
the test can check that both ranks agree and equal a 1-process update on the
concatenated batch. Also used with a regularizer to check masks stay identical.
"""

import json
import sys

import torch
from safetensors.torch import save_file

from rlprox.cli import exit_process
from rlprox.engine import Engine, reduce_stats
from rlprox.prox.regularizers import full_tensor
from rlprox.recipe import load_recipe

out_dir, recipe_path, *overrides = sys.argv[1:]
torch.set_num_threads(1)
engine = Engine(load_recipe(recipe_path, overrides))
algo, acc = engine.algo, engine.accelerator
with torch.no_grad(), engine.gathered():
    packed = algo.advantages(algo.collect())
stats = reduce_stats(engine.update(packed), {}, acc)  # what fit logs: means over processes
with open(f"{out_dir}/stats{acc.process_index}.json", "w") as f:
    json.dump(stats, f)
policy = acc.unwrap_model(algo.modules["policy"])
tensors = {f"param.{k}": full_tensor(v) for k, v in policy.state_dict().items()}  # FSDP: gathered
tensors["packed"] = packed
save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/rank{acc.process_index}.safetensors")
acc.wait_for_everyone()
engine.close()
exit_process(0)  # no interpreter teardown: see rlprox.cli.exit_process
