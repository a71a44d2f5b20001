"""Sampling: greedy, seeds, top-k/top-p supports, parameter validation."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.errors import RequestError
from xllm_compile.runtime.sampler import SamplingParams, make_generator, sample


def draw(logits, params, n=200):
    gen = make_generator(params)
    return [sample(logits[None], [params], [gen])[0] for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, -1.0]])
    assert sample(logits, [SamplingParams()] * 2, [None, None]) == [1, 0]


def test_same_seed_same_tokens_other_seed_differs():
    logits = torch.zeros(50)
    a = draw(logits, SamplingParams(temperature=1.0, seed=7))
    b = draw(logits, SamplingParams(temperature=1.0, seed=7))
    c = draw(logits, SamplingParams(temperature=1.0, seed=8))
    assert a == b and a != c


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert set(draw(logits, SamplingParams(temperature=1.0, top_k=2, seed=0))) == {0, 1}
    # probabilities ~ [.64, .24, .09, .03, .01]: top_p=0.8 keeps the first two
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.8, seed=0))) == {0, 1}


@pytest.mark.parametrize(
    "bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2)]
)
def test_invalid_params(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)
