"""The embedded default model (examples/tiny-llama, trained on Jane Austen): text in, text out,
equal to transformers' greedy generation with the same tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from xllm_compile.runtime import load

from helpers import hf_greedy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-llama"
PROMPT = "It is a truth universally acknowledged"


def test_text_generation_matches_transformers(tiny_artifact):
    import transformers
    from tokenizers import Tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(EXAMPLE, dtype=torch.float32).eval()
    tokenizer = Tokenizer.from_file(str(EXAMPLE / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT).ids
    expected = hf_greedy(model, ids, 24)
    [out] = load(tiny_artifact).generate([PROMPT], max_tokens=24, ignore_eos=True)
    assert out.prompt_ids == ids
    assert out.token_ids == expected
    assert out.text == tokenizer.decode(expected)
    assert len(out.text.split()) >= 10  # readable words, not byte soup


def test_cli_prompt_prints_text(tiny_artifact, capsys):
    from xllm_compile.cli import main

    assert main(["generate", str(tiny_artifact), "--prompt", PROMPT, "--max-tokens", "12"]) == 0
    [expected] = load(tiny_artifact).generate([PROMPT], max_tokens=12)
    assert capsys.readouterr().out.strip() == expected.text.strip()


def test_sampling_is_seeded(tiny_artifact):
    engine = load(tiny_artifact)
    kw = dict(max_tokens=16, temperature=0.8, top_p=0.9, top_k=50)
    a = engine.generate([PROMPT], seed=1, **kw)[0].token_ids
    b = engine.generate([PROMPT], seed=1, **kw)[0].token_ids
    c = engine.generate([PROMPT], seed=2, **kw)[0].token_ids
    assert a == b and a != c


def test_stream_yields_the_same_text(tiny_artifact):
    engine = load(tiny_artifact)
    pieces = list(engine.stream(PROMPT, max_tokens=20, ignore_eos=True))
    [whole] = engine.generate([PROMPT], max_tokens=20, ignore_eos=True)
    assert len(pieces) > 3
    assert "".join(pieces) == whole.text


def test_generation_config_eos_ids_stop_generation(tiny_artifact):
    # config.json says eos 0; generation_config.json adds <|im_end|> (2)
    assert load(tiny_artifact).eos_token_ids == {0, 2}


def test_chat_loop_streams_answers_and_keeps_history(tiny_artifact):
    from xllm_compile.chat import chat_loop

    engine = load(tiny_artifact)
    turns, written = iter(["Hello there", "", "And then?"]), []

    def read(_prompt):
        try:
            return next(turns)
        except StopIteration:
            raise EOFError from None

    served = chat_loop(engine, read=read, write=written.append, max_tokens=8)
    assert served == 2  # the empty line is skipped, EOF ends the chat
    first = engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello there"}])
    [expected] = engine.generate([first], max_tokens=8)
    assert "".join(written).startswith(expected.text)


def test_cli_runtime_flags_give_the_same_text(tiny_artifact, capsys):
    from xllm_compile.cli import main

    base = ["generate", str(tiny_artifact), "--prompt", PROMPT, "--max-tokens", "10"]
    assert main(base) == 0
    default = capsys.readouterr().out
    assert main([*base, "--kv-cache", "contiguous", "--graph-cache", "eager"]) == 0
    assert capsys.readouterr().out == default
    assert main([*base, "--kv-memory", str(64 << 20)]) == 0  # a byte budget
    assert capsys.readouterr().out == default


def test_cli_sampling_processors_are_the_engines(tiny_artifact, capsys):
    import json

    from xllm_compile.cli import main

    flags = ["--repetition-penalty", "1.8", "--presence-penalty", "0.5", "--ignore-eos"]
    base = ["generate", str(tiny_artifact), "--prompt", PROMPT, "--max-tokens", "14", "--json"]
    assert main([*base, *flags]) == 0
    got = json.loads(capsys.readouterr().out)
    [want] = load(tiny_artifact).generate(
        [PROMPT], max_tokens=14, repetition_penalty=1.8, presence_penalty=0.5, ignore_eos=True
    )
    assert got["token_ids"] == want.token_ids and len(want.token_ids) == 14
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] != want.token_ids


def test_generation_config_sampling_defaults(tiny_artifact, tmp_path, capsys):
    """Values a request leaves out come from generation_config.json (as vLLM takes them); a
    value SamplingParams refuses is left out; the CLI and the engine agree."""
    import json
    import shutil

    from xllm_compile.cli import main

    from conftest import rehash

    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    gen = json.loads((art / "generation_config.json").read_text())
    gen.update(temperature=0.0, repetition_penalty=1.8, top_k="many")
    (art / "generation_config.json").write_text(json.dumps(gen))
    rehash(art)
    engine = load(art)
    assert engine.sampling_defaults == {"temperature": 0.0, "repetition_penalty": 1.8}
    [want] = load(tiny_artifact).generate([PROMPT], max_tokens=12, repetition_penalty=1.8)
    [plain] = load(tiny_artifact).generate([PROMPT], max_tokens=12)
    assert want.token_ids != plain.token_ids
    assert engine.generate([PROMPT], max_tokens=12)[0].token_ids == want.token_ids
    # a flag given wins over the file
    [off] = engine.generate([PROMPT], max_tokens=12, repetition_penalty=1.0)
    assert off.token_ids == plain.token_ids
    assert main(["generate", str(art), "--prompt", PROMPT, "--max-tokens", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    # and a request to `xllm serve` that leaves them out
    import httpx

    from helpers import running_server

    with running_server(engine) as srv:
        body = {"prompt": PROMPT, "max_tokens": 12}
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
        assert r.json()["choices"][0]["token_ids"] == want.token_ids  # greedy and penalized
