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


def _generate_logs(caplog, **options):
    model = tiny_model("llama")                    # head dim 16
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    gear_compile.compile(model, inductor=False, kernel="torch", **options)
    with caplog.at_level("WARNING", logger="gear_compile"), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"], out


def test_options_that_leave_every_site_exact_say_so_at_warning(caplog):
    """group_size 7 divides no head dim: every site falls back, and the
    warning names the option and a value that fits."""
    warnings, _ = _generate_logs(caplog, method="kivi", bits=2, group_size=7)
    said = [w for w in warnings if "every attention site" in w]
    assert said and "group_size 7" in said[0] and "group_size=16 fits" in said[0]


def test_a_rank_above_the_head_dim_is_refused_loudly(caplog):
    assert CodecConfig(method="gear", rank_prefill=100).unfit(32).startswith("rank_prefill=100 exceeds head_dim 32")
    assert CodecConfig(method="gear", rank_decode=33).unfit(32).startswith("rank_decode=33")
    assert CodecConfig(method="kivi", rank_prefill=100).unfit(32) is None      # no low rank: nothing to refuse
    warnings, _ = _generate_logs(caplog, method="gear", rank_prefill=100)
    assert any("rank_prefill=100 exceeds head_dim 16" in w for w in warnings)


def test_sinks_covering_the_whole_prompt_warn(caplog):
    warnings, _ = _generate_logs(caplog, method="gear", sink_tokens=10000)
    assert any("sink_tokens=10000 covers the whole" in w for w in warnings)
    assert CodecConfig(method="gear").sinks(64) == 4 and CodecConfig(method="none", sink_tokens=9).sinks(64) == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="gear_compile"):                  # the default 4 on a short prompt
        assert CodecConfig(method="gear").sinks(3) == 3
    assert not any("covers the whole" in r.getMessage() for r in caplog.records)
