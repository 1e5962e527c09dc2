"""The options' split: what stores and ops see (`CodecConfig`) vs what only
shapes compilation (`GearConfig`'s compile options)."""
import torch

import gear_compile
from gear_compile.config import COMPILE_OPTIONS, CodecConfig, GearConfig
from gear_compile.models import tiny_model


def test_compile_only_options_never_reach_a_store_or_an_op(tmp_path):
    config = GearConfig(method="kivi", bits=2, group_size=8, inductor=False, kernel="torch",
                        dump_graphs=str(tmp_path), lorc=0.5, lorc_schedule="uniform")
    assert type(config.codec) is CodecConfig and config.codec == GearConfig(method="kivi", bits=2, group_size=8).codec
    assert not set(COMPILE_OPTIONS) & {f for f in CodecConfig.__dataclass_fields__}
    model = tiny_model("llama")
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    metas = []
    for dump in (tmp_path / "a", tmp_path / "b"):
        torch._dynamo.reset()
        gear_compile.compile(model, method="kivi", bits=2, group_size=8, inductor=False, dump_graphs=str(dump))
        with torch.no_grad():
            out = model(prompt, use_cache=True)
        keys = out.past_key_values.layers[0].keys
        metas.append(keys.__tensor_flatten__()[1])
        assert type(keys.store.config) is CodecConfig and "dump_graphs" not in keys.store.config.to_json()
    assert metas[0] == metas[1]        # what Dynamo guards on does not depend on where graphs are dumped
