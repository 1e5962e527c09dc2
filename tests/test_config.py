"""The options' rules, in one place: validation (a bad value is named with
the valid ones), the defaults chosen per head dim and the `Codec` they
resolve to, options that would quietly do nothing, and the split between
what stores and ops see (`CodecConfig`) and what only shapes compilation
(`GearConfig`'s compile options)."""
import dataclasses

import pytest
import torch

import gear_compile
from gear_compile.codec import Codec, PromptSplit, resolve, unfit
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
        assert type(keys.store.config) is Codec and "dump_graphs" not in keys.store.config.to_json()
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
    assert unfit(CodecConfig(method="gear", rank_prefill=100), 32).startswith("rank_prefill=100 exceeds head_dim 32")
    assert unfit(CodecConfig(method="gear", rank_decode=33), 32).startswith("rank_decode=33")
    assert unfit(CodecConfig(method="kivi", rank_prefill=100), 32) is None      # no low rank: nothing to refuse
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


@pytest.mark.parametrize("options,message", [
    ({"bits": 3}, "bits must be one of [2, 4, 8], got 3"),
    ({"method": "gearz"}, "method must be one of ['gear', 'gear_l', 'kcvt', 'kivi', 'per_token', 'none'], got 'gearz'"),
    ({"rank": 4}, "unknown option(s) ['rank']; valid options are"),
    ({"outlier_ratio": 1.5}, "outlier_ratio must be a number in [0, 1), got 1.5"),
    ({"method": "kivi", "group_size": 64, "buffer_size": 20}, "buffer_size must be a multiple of group_size=64"),
])
def test_bad_options_raise_naming_the_value_and_the_valid_ones(options, message):
    with pytest.raises(ValueError) as err:
        gear_compile.compile(tiny_model("llama"), **options)
    assert message in str(err.value)
    with pytest.raises(Exception) as err:      # through torch.compile: at compile time
        torch.compile(lambda x: x + 1, backend="gear", options=options)(torch.ones(2))
    assert message in str(err.value)


def test_the_default_group_size_follows_the_head_dim_and_a_set_one_is_kept():
    config = GearConfig(method="kivi", bits=2)
    assert [config.for_head_dim(d).group_size for d in (32, 64, 128, 256)] == [32, 32, 64, 64]
    assert GearConfig(method="kivi", bits=2, group_size=64).for_head_dim(32).group_size == 64
    assert "g by head dim" in config.describe() and "g=32, n_b=32" in config.for_head_dim(64).describe()
    model = tiny_model("llama", head_dim=32)
    prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    report = gear_compile.explain(model, prompt, method="kivi", bits=2, inductor=False)
    assert report.sites and all(s.rewritten for s in report.sites), report.text()
    assert all(g.config.group_size == 32 for g in report.graphs) and "g=32" in report.text()
    with pytest.raises(ValueError, match=r"multiple of group_size=32 .*\(group_size=32: the defaults for "
                                         r"head dim 32; set them to choose others\)"):
        GearConfig(method="kivi", buffer_size=20).for_head_dim(32)


def test_the_4_bit_backbone_is_kivi_where_its_groups_fit_up_to_head_dim_64_else_kcvt():
    def backbone(d, **options):
        return GearConfig(**dict(dict(method="gear", bits=4), **options)).for_head_dim(d).quantizer
    assert [backbone(d) for d in (16, 32, 64, 96, 128)] == ["kcvt", "kivi", "kivi", "kcvt", "kcvt"]
    assert backbone(64, buffer_size=20) == "kcvt"            # a set buffer_size kivi's groups do not divide
    assert backbone(64, backbone="kcvt") == "kcvt" and backbone(128, backbone="kivi") == "kivi"
    assert backbone(16, bits=2) == "kivi" and backbone(64, bits=8) == "kcvt"
    assert GearConfig(method="gear_l", bits=4).for_head_dim(64).describe() == "gear_l(kivi-4, r=4/2, g=32, n_b=32)"
    assert GearConfig(method="gear", bits=4).describe() == "gear(4 bits, backbone by head dim, r=4/2, s=0.02)"
    with pytest.raises(RuntimeError, match="chosen per head dim"):
        GearConfig(method="gear", bits=4).quantizer


def test_the_rotate_option_is_validated_and_described():
    with pytest.raises(ValueError, match=r"rotate must be one of \['none', 'k', 'v', 'kv'\], got 'q'"):
        GearConfig(rotate="q")
    with pytest.raises(ValueError, match="rotate='kv' does not combine with lorc"):
        GearConfig(rotate="kv", lorc=0.5)
    assert GearConfig(method="kivi", bits=2, rotate="kv").describe().endswith(", KV rotated")
    assert "rotate" not in GearConfig().to_json()            # the default keeps stores' JSON as it was


def test_a_codec_is_resolved_once_and_cannot_be_built_unresolved():
    """Stores take a `Codec`: the head dim's choices made, so its derived
    fields never raise; an options object with a choice open is refused."""
    codec = resolve(GearConfig(method="gear", bits=4, lorc=0.5), 64)
    assert type(codec) is Codec and (codec.quantizer, codec.group) == ("kivi", 32)
    assert resolve(codec, 128) is codec and codec.to_json() == resolve(CodecConfig(), 64).to_json()
    with pytest.raises(ValueError, match=r"codec.resolve\(config, head_dim\)"):
        Codec(method="gear", bits=4)
    with pytest.raises(ValueError, match="codec.resolve"):
        dataclasses.replace(codec, group_size=None)


def test_a_prompt_splits_between_prefill_block_buffer_sinks_and_streamed_blocks():
    kivi, kcvt = resolve(CodecConfig(method="kivi", bits=2, group_size=16), 64), resolve(CodecConfig(method="kcvt"), 64)
    assert kivi.split(70) == PromptSplit(prefill=64, decode=0, buffer=6, sinks=4)
    assert kcvt.split(70) == PromptSplit(prefill=70, decode=0, buffer=0, sinks=4)
    assert kivi.split(10) == PromptSplit(prefill=0, decode=0, buffer=10, sinks=0)      # shorter than a group
    assert kcvt.split(70, streamed=True) == PromptSplit(prefill=0, decode=60, buffer=10, sinks=0)   # n_b = 20
    assert resolve(CodecConfig(method="none"), 64).split(9) == PromptSplit(9, 0, 0, 0)
