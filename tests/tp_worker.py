"""One rank of the tensor-parallel check (`test_tensor_parallel.py`), run by
torchrun on gloo: the saved tiny model loaded with tp_plan="auto", generated
eagerly and with method none (greedy and beam search), and with GEAR 4-bit
fed the eager tokens; rank 0 writes what it saw.

    torchrun --nproc_per_node 2 tests/tp_worker.py MODEL_DIR OUT.json PROMPT STEPS
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import transformers as tf

import gear_compile
from gear_compile.hf_compat import cache_of

from decoding import decode_logits, greedy  # tests/, the script's directory, is on sys.path


def generate(model, ids, steps, **kwargs):
    out = greedy(model, ids, steps, output_logits=True, **kwargs)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits, 1), cache_of(out)


def main(path, out_path, prompt, steps):
    model = tf.AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    ids = torch.randint(1, 256, (1, prompt), generator=torch.Generator().manual_seed(0))
    eager, eager_logits, _ = generate(model, ids, steps)
    beams_eager = generate(model, ids, 12, num_beams=3)[0]
    gear_compile.compile(model, method="none", inductor=False)
    none, _, cache = generate(model, ids, steps)
    none_compressed = all(isinstance(layer.keys, gear_compile.CompressedKV) for layer in cache.layers)
    beams_none = generate(model, ids, 12, num_beams=3)[0]
    gear_compile.compile(model, method="gear", bits=4, inductor=False)
    # fed the eager tokens (teacher forcing): the cache's error without greedy choices drifting apart
    gear_logits, cache = decode_logits(model, ids=ids, tokens=torch.tensor([eager[:-1]]))
    errors = [((g - e).norm() / e.norm()).item() for g, e in zip(gear_logits[0], eager_logits[0])]
    kv = torch.tensor([gear_compile.kv_bytes(cache)], dtype=torch.int64)
    every = [torch.zeros_like(kv) for _ in range(dist.get_world_size())]
    dist.all_gather(every, kv)
    if dist.get_rank() == 0:
        json.dump(dict(eager=eager, none=none, none_compressed=none_compressed, beams_eager=beams_eager,
                       beams_none=beams_none, gear_logits_error=max(errors),
                       gear_kv_bytes=[int(t) for t in every],
                       local_kv_heads=cache.layers[0].keys.shape[1]), open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
