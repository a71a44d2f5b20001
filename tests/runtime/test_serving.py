"""The server as vLLM's users drive it, over loopback with the `openai` client: 64 concurrent
requests (half streamed) equal to each alone, a shared system prompt served from aliased pages
(identical text with sharing off, counters moving), n completions sharing their prompt's pages,
logprobs equal to log_softmax of the program's logits and to transformers', echo, the vLLM-named
histograms, and chunked prefill keeping streams going while a long prompt is computed."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from xllm_compile.runtime import load

from conftest import EXAMPLE
from helpers import hf_logits, parse_metrics, prefill_then_decode, running_server

openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0}
SYSTEM = (
    "You are a careful assistant who answers questions about novels, their authors and their "
    "characters, in one short sentence, without inventing anything the books do not say."
)


@pytest.fixture(scope="module")
def ref(tiny_artifact):
    """What each request gives alone, in-process, without prefix sharing."""
    return load(tiny_artifact, prefix_caching=False)


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with running_server(load(tiny_artifact)) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def metrics(server) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{server.url}/metrics").text)


def test_64_concurrent_requests_each_equal_to_alone(server, ref):
    rng = random.Random(0)
    words = "the of and to a in that it was he for on his with as I had".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(64)]
    lengths = [rng.randint(1, 24) for _ in prompts]
    alone = [
        ref.generate([p], max_tokens=n, ignore_eos=True)[0].text
        for p, n in zip(prompts, lengths, strict=True)
    ]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)

    async def one(i: int) -> str:
        extra = {"extra_body": {"ignore_eos": True}}
        args = dict(model="tiny", prompt=prompts[i], max_tokens=lengths[i], **GREEDY, **extra)
        if i % 2:  # half streamed
            stream = await aclient.completions.create(stream=True, **args)
            return "".join([c.choices[0].text async for c in stream if c.choices])
        return (await aclient.completions.create(**args)).choices[0].text

    async def all_of_them() -> list[str]:
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    assert asyncio.run(all_of_them()) == alone


def test_a_shared_system_prompt_is_served_from_shared_pages(server, client, ref):
    questions = ["Who wrote Emma?", "Who is Mr. Darcy?", "Where is Norland?", "Who is Elinor?"]
    chats = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions
    ]
    tok = ref.tokenizer
    alone = [
        ref.generate([tok.apply_chat_template(m)], max_tokens=12, ignore_eos=True)[0].text
        for m in chats
    ]
    before = metrics(server)
    got = [
        client.chat.completions.create(
            model="tiny", messages=m, max_tokens=12, extra_body={"ignore_eos": True}, **GREEDY
        )
        .choices[0]
        .message.content
        for m in chats
    ]
    assert got == alone  # the same text with sharing off
    after = metrics(server)
    label = '{model_name="tiny"}'
    hits = (
        after[f"vllm:prefix_cache_hits_total{label}"]
        - before[f"vllm:prefix_cache_hits_total{label}"]
    )
    assert hits >= 3 * len(tok.encode(SYSTEM))  # each later chat reused the system prompt
    shared = "xllm_prefix_cache_pages_shared_total"
    assert after[shared] > before[shared]


def test_n_seeded_completions_are_distinct_reproducible_and_share_the_prompt(server, client, ref):
    prompt = "It is a truth universally acknowledged, that a single man in possession of a good"
    args = dict(model="tiny", prompt=prompt, max_tokens=16, n=4, temperature=1.0, seed=11)
    before = metrics(server)
    first = client.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) == 4  # seeds 11..14: four different samples
    assert [c.text for c in client.completions.create(**args).choices] == texts
    assert first.usage.prompt_tokens == len(ref.encode(prompt))  # counted once, not n times
    after = metrics(server)
    hit = "xllm_prefix_cache_requests_hit_total"
    assert after[hit] - before[hit] >= 3  # three of each four aliased the first's pages
    streamed = client.completions.create(stream=True, **args)
    parts = {}
    for chunk in streamed:
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    assert [parts[i] for i in range(4)] == texts


def test_logprobs_equal_log_softmax_of_the_programs_logits_and_transformers(client, ref):
    from transformers import AutoModelForCausalLM

    prompt = "Emma Woodhouse, handsome, clever, and rich,"
    r = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=8,
        logprobs=3,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    [choice] = r.choices
    ids = ref.encode(prompt)
    out = ref.generate([prompt], max_tokens=8, ignore_eos=True)[0].token_ids
    logits = prefill_then_decode(ref, ids, out[:-1])[len(ids) - 1 :]  # the rows that chose out
    want = torch.log_softmax(logits.float(), dim=-1)
    got = choice.logprobs
    assert len(got.token_logprobs) == 8
    for i, token in enumerate(out):
        assert abs(got.token_logprobs[i] - float(want[i, token])) < 1e-5
        top = want[i].topk(3)
        assert list(got.top_logprobs[i].values()) == pytest.approx(top.values.tolist(), abs=1e-5)
        assert got.tokens[i] == ref.tokenizer.decode([token])
    model = AutoModelForCausalLM.from_pretrained(EXAMPLE, torch_dtype=torch.float32).eval()
    hf = torch.log_softmax(hf_logits(model, ids + out[:-1])[len(ids) - 1 :].float(), dim=-1)
    for i, token in enumerate(out):
        assert abs(got.token_logprobs[i] - float(hf[i, token])) < 1e-4
    # chat: logprobs true, top_logprobs 2; the content entries are the generated tokens
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Who wrote Emma?"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob for c in content)


def test_echo_returns_the_prompt_and_its_logprobs(client, ref):
    prompt = "The family of Dashwood had long been settled in Sussex."
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=1, **GREEDY
    )
    [choice] = r.choices
    ids = ref.encode(prompt)
    alone = ref.generate([prompt], max_tokens=4)[0]
    assert choice.text == ref.tokenizer.decode(ids) + alone.text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + len(alone.token_ids)
    assert lp.token_logprobs[0] is None  # nothing predicts the first prompt token
    want = torch.log_softmax(prefill_then_decode(ref, ids, [])[:-1].float(), dim=-1)
    for p in range(1, len(ids)):
        assert abs(lp.token_logprobs[p] - float(want[p - 1, ids[p]])) < 1e-5


def test_latency_histograms_use_vllms_names(server, client):
    client.completions.create(model="tiny", prompt="Elizabeth", max_tokens=6, **GREEDY)
    m = metrics(server)
    label = 'model_name="tiny"'
    for name in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        count = m[f"vllm:{name}_count{{{label}}}"]
        assert count >= 1 and m[f'vllm:{name}_bucket{{{label},le="+Inf"}}'] == count
        assert m[f"vllm:{name}_sum{{{label}}}"] > 0


@pytest.fixture(scope="module")
def long_context_artifact(tmp_path_factory):
    """A Qwen2-shaped tiny model with a 4608-token context, compiled with a 512-token step."""
    import transformers

    from conftest import BASE, FAMILIES, compile_cli

    root = tmp_path_factory.mktemp("long")
    _, _, extra = FAMILIES["qwen2"]
    config = transformers.Qwen2Config(**{**BASE, **extra, "max_position_embeddings": 4608})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).eval().save_pretrained(root / "hf")
    return compile_cli(root / "hf", root / "art", "--max-num-tokens", "512")


def test_a_4k_prompt_does_not_stall_8_streams_beyond_one_chunk(long_context_artifact):
    """8 streams decode (through the CPU graph cache, as the CLI runs) while a 4000-token
    prompt arrives: it is prefilled in chunks beside them, each stream gets a token in every
    step, and its longest wait between two tokens is one step holding one chunk."""
    engine = load(long_context_artifact, graph_cache=True)
    alone = load(long_context_artifact, prefix_caching=False)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 320) for _ in range(8)] for _ in range(8)]
    streams = [engine.add_request(p, max_tokens=40, ignore_eos=True) for p in prompts]
    for _ in range(3):
        engine.step()
    prompt = [rng.randrange(3, 320) for _ in range(4000)]
    long = engine.add_request(prompt, max_tokens=4, ignore_eos=True)
    ends, steps, chunks = [time.perf_counter()], [], []
    while not long.output_ids:
        counts = [len(s.output_ids) for s in streams]
        start = time.perf_counter()
        engine.step()
        ends.append(time.perf_counter())
        steps.append(ends[-1] - start)
        chunks.append(long.num_cached)
        assert [len(s.output_ids) for s in streams] == [n + 1 for n in counts]  # not stalled
    assert chunks[:2] == [504, 1008] and len(steps) == -(-4000 // 504)  # 512 - 8 decodes a step
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    # a stream's longest wait for a token is one step holding one chunk, not the whole prefill
    assert max(gaps) <= max(steps) + 0.05
    while engine.scheduler.has_work():
        engine.step()
    want = [alone.generate([p], max_tokens=40, ignore_eos=True)[0].token_ids for p in prompts]
    assert [s.output_ids for s in streams] == want  # as each alone, token for token
    assert long.output_ids == alone.generate([prompt], max_tokens=4, ignore_eos=True)[0].token_ids
