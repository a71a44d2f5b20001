"""Sampling: greedy, seeds, top-k/top-p/min-p supports, the logits processors against
transformers' on the same logits, parameter validation."""

from __future__ import annotations

import pytest
import torch

from xllm_compile.errors import RequestError
from xllm_compile.runtime.sampler import SamplingParams, make_generator, process, sample, warp


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


# -- logits processors, against transformers' on the same logits ------------------------------

VOCAB = 64


def history(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=g) * 3
    prompt = torch.randint(0, VOCAB, (12,), generator=g).tolist()
    output = torch.randint(0, VOCAB, (9,), generator=g).tolist() + [prompt[0]] * 3
    return logits, prompt, output


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_transformers(penalty):
    from transformers import RepetitionPenaltyLogitsProcessor

    logits, prompt, output = history()
    got = process(logits, SamplingParams(repetition_penalty=penalty), prompt, output)
    want = RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor([prompt + output]), logits[None].clone()
    )[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, logits)


def test_logit_bias_is_transformers_sequence_bias():
    from transformers import SequenceBiasLogitsProcessor

    logits, prompt, output = history(1)
    bias = ((3, 5.0), (17, -100.0), (40, 0.25))
    got = process(logits, SamplingParams(logit_bias=bias), prompt, output)
    hf = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])
    want = hf(torch.tensor([prompt + output]), logits[None].clone())[0]
    torch.testing.assert_close(got, want)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits, prompt, output = history(2)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.5)
    got = process(logits, p, prompt, output)
    want = logits.clone()
    for token in range(VOCAB):  # OpenAI's definition, token by token
        n = output.count(token)
        want[token] -= 0.5 * n + 1.5 * (n > 0)
    torch.testing.assert_close(got, want)
    assert torch.equal(process(logits, p, prompt, []), logits)  # the prompt does not count


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_is_transformers(min_p):
    from transformers import MinPLogitsWarper

    logits, _, _ = history(3)
    got = warp(logits, SamplingParams(temperature=1.0, min_p=min_p))
    want = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert 1 < int(torch.isfinite(got).sum()) < VOCAB
    torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)])
    drawn = set(draw(logits, SamplingParams(temperature=1.0, min_p=min_p, seed=0)))
    assert drawn <= set(torch.isfinite(got).nonzero().flatten().tolist())


def test_processors_change_greedy_tokens_and_stay_per_row():
    logits, prompt, output = history(4)
    top = int(logits.argmax())
    biased = SamplingParams(logit_bias=((top, -100.0),))
    rows = torch.stack([logits, logits])
    hist = [(prompt, output), (prompt, output)]
    a, b = sample(rows, [biased, SamplingParams()], [None, None], hist)
    assert b == top and a != top and a == int(process(logits, biased, prompt, output).argmax())
    # a repeated token loses its place under a strong repetition penalty
    rep = SamplingParams(repetition_penalty=50.0)
    assert sample(logits[None], [rep], [None], [([top], [])])[0] != top
    # an id past the vocabulary fails that row only
    bad = SamplingParams(logit_bias=((VOCAB + 5, 1.0),))
    out = sample(rows, [bad, SamplingParams()], [None, None], hist)
    assert isinstance(out[0], IndexError) and out[1] == top


@pytest.mark.parametrize(
    "bad",
    [
        dict(min_p=1.5),
        dict(repetition_penalty=0.0),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3.0),
        dict(logit_bias=((1, 101.0),)),
        dict(logit_bias=((-1, 1.0),)),
    ],
)
def test_invalid_processor_params(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_greedy_is_torchs_argmax_ties_and_nan_included():
    from xllm_compile.runtime.sampler import greedy

    torch.manual_seed(0)
    x = torch.randn(5, 49152)
    x[1, 7] = x[1, 9000] = 1e4  # a tie: the first wins
    x[2, 30] = float("nan")  # NaN counts as the largest
    x[3] = 0.0  # all equal
    assert greedy(x) == x.argmax(dim=-1).tolist() == greedy(x)[:1] + [7, 30, 0] + greedy(x)[4:]
