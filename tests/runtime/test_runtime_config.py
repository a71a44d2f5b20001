"""RuntimeConfig: one frozen place for load()'s choices; keyword arguments override it."""

from __future__ import annotations

import pytest

from xllm_compile.errors import ConfigError
from xllm_compile.runtime import load
from xllm_compile.runtime.config import RuntimeConfig


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kv_cache", "ring"),
        ("graph_cache", "tensorrt"),
        ("kv_memory", 0),
        ("max_num_seqs", 0),
        ("tp_timeout_s", -1),
    ],
)
def test_bad_choices_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        RuntimeConfig(**{field: value})


def test_config_and_keywords_agree(llama_artifact):
    config = RuntimeConfig(kv_cache="contiguous", max_num_seqs=3)
    a, b = load(llama_artifact, config), load(llama_artifact, kv_cache="contiguous", max_num_seqs=3)
    assert a.kv_cache.num_slots == b.kv_cache.num_slots == 3
    assert type(a.kv_cache) is type(b.kv_cache)
    over = load(llama_artifact, config, max_num_seqs=2)  # a keyword overrides the config
    assert over.kv_cache.num_slots == 2
    with pytest.raises(ConfigError, match="load()"):
        load(llama_artifact, no_such_option=1)
    ids = [[1, 2, 3]]
    assert a.generate(ids, max_tokens=4)[0].token_ids == b.generate(ids, max_tokens=4)[0].token_ids
