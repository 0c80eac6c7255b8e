"""Run by tests/test_headless.py (one process): tiny headless model, one padded micro batch ->
the final hidden states, the input embedding, the labels, the mask and the model's per-token
CWT losses, per temperature, saved to OUT/cwt.pt."""
import sys
from pathlib import Path

import torch

import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_ext.config import load_recipe
from megatron_ext.device import backend, setup_device
from megatron_ext.model import build_model

if __name__ == "__main__":
    recipe_path, out = sys.argv[1], Path(sys.argv[2])
    results = {}
    for temperature in (1.0, 0.5):
        recipe = load_recipe(recipe_path, ["model.head=none", "train.objective=cwt", "train.precision=fp32",
                                           f"train.cwt_temperature={temperature}"])
        if not dist.is_initialized():  # one process, no DeepSpeed: just Megatron's groups
            setup_device(0)
            dist.init_process_group(backend(), rank=0, world_size=1)
            ps.initialize_model_parallel()
            model_parallel_cuda_manual_seed(recipe.train.seed)
        (chunk,) = build_model(recipe, on_gpu=False)
        from megatron_ext.plan import count_params

        assert chunk.output_layer is None and not any("output_layer" in n for n, _ in chunk.named_parameters())
        assert sum(p.numel() for p in chunk.parameters()) == count_params(recipe.model, padded=True)
        captured = {}
        chunk.decoder.final_layernorm.register_forward_hook(lambda m, a, o: captured.update(hidden=o.detach()))
        gen = torch.Generator().manual_seed(0)
        b, s = 2, recipe.train.seq_len
        tokens = torch.randint(0, 40, (b, s), generator=gen)  # a small id range: many duplicate targets
        labels = torch.randint(0, 40, (b, s), generator=gen)
        mask = torch.ones(b, s)
        mask[1, s // 2:] = 0  # a padded tail
        mask[0, 5] = 0
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        losses = chunk(tokens, pos, None, labels=labels, loss_mask=mask)
        results[temperature] = {"hidden": captured["hidden"], "embedding": chunk.embedding.word_embeddings.weight.detach(),
                                "labels": labels, "mask": mask, "losses": losses.detach()}
    torch.save(results, out / "cwt.pt")
