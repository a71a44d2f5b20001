"""Artifacts and templates are untrusted input: each attack here is built for real (with the
manifest's hashes rewritten, as an attacker would) and must fail safely: the marker file its
payload would create never appears, and the user gets a one-line error or a refusal."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest

from xllm_compile import program_format
from xllm_compile.artifact import MANIFEST, PROGRAM
from xllm_compile.errors import ArtifactError, RequestError
from xllm_compile.runtime import load

from conftest import EXAMPLE, compile_cli, rehash
from helpers import assert_one_line_error, run_cli


def template_payload(marker) -> str:
    """A chat template that, outside the sandbox, runs a shell command through jinja globals."""
    return "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}{{ 'x' }}"


@pytest.fixture
def art(tiny_artifact, tmp_path):
    return shutil.copytree(tiny_artifact, tmp_path / "art")


def set_template(art, template: str) -> None:
    config = json.loads((art / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (art / "tokenizer_config.json").write_text(json.dumps(config))
    rehash(art)


# -- the program file --


def pickle_payload(marker) -> bytes:
    """A pickle whose unpickling runs `touch marker` (what torch.export.load of a .pt2 did)."""
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Payload())


def test_a_pickle_archive_in_place_of_the_program_is_refused(art, tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # a .pt2 whose sample inputs are a pickle payload
        z.writestr("program/data/sample_inputs/model.pt", pickle_payload(marker))
        z.writestr("program/models/model.json", (art / PROGRAM).read_bytes())
    (art / PROGRAM).write_bytes(buf.getvalue())
    rehash(art)
    with pytest.raises(ArtifactError, match="not a program document"):
        load(art)
    assert_one_line_error(run_cli("generate", str(art), "--prompt", "hi"), "not a program document")
    assert not marker.exists()


def test_an_old_pt2_artifact_is_refused_by_format(art, tmp_path):
    """Format 1 stored a pickling program.pt2: it is refused before anything reads it."""
    marker = tmp_path / "pwned"
    (art / "program.pt2").write_bytes(pickle_payload(marker))
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["format_version"] = 1
    (art / MANIFEST).write_text(json.dumps(manifest))
    assert_one_line_error(run_cli("generate", str(art), "--prompt", "hi"), "format 1", "recompile")
    assert not marker.exists()


def edit_program(art, edit) -> dict:
    doc = json.loads((art / PROGRAM).read_bytes())
    edit(doc)
    (art / PROGRAM).write_text(json.dumps(doc))
    rehash(art)
    return doc


def first_symbolic_size(doc: dict) -> dict:
    for value in doc["graph_module"]["graph"]["tensor_values"].values():
        for size in value["sizes"]:
            if "as_expr" in size:
                return size["as_expr"]
    raise AssertionError("no symbolic size in the program")


def test_a_shape_expression_payload_is_refused(art, tmp_path):
    """torch's deserializer sympifies (evals) every shape expression: a payload there runs
    through the raw deserializer, and never through ours."""
    from torch._export.serde import schema
    from torch._export.serde import serialize as serde

    marker = tmp_path / "pwned"
    payload = f"__import__('os').system('touch {marker}')"

    def edit(doc):
        first_symbolic_size(doc)["expr_str"] = payload

    doc = edit_program(art, edit)
    with pytest.raises(ArtifactError, match="bad shape expression"):
        load(art)
    assert not marker.exists()
    # the same document through torch alone runs the payload: the check is what stops it
    program = serde._dict_to_dataclass(schema.ExportedProgram, doc)
    with pytest.raises(Exception):  # noqa: B017 (it fails later, after the payload ran)
        serde.ExportedProgramDeserializer().deserialize(program, {}, {}, None)
    assert marker.exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "torch.load", "#x:y"])
def test_a_program_calling_anything_but_our_ops_is_refused(art, target):
    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = target

    edit_program(art, edit)
    with pytest.raises(ArtifactError, match="not allowed"):
        load(art)


@pytest.mark.parametrize("kind", ["as_tensor", "as_sym_int"])
def test_a_node_name_with_code_is_refused(art, kind):
    """Names become Python identifiers in the generated forward: code there would run."""
    key = "name" if kind == "as_tensor" else "as_name"

    def edit(doc):
        nodes = doc["graph_module"]["graph"]["nodes"]
        node = next(n for n in nodes if kind in n["outputs"][0])
        node["outputs"][0][kind][key] = "x = __import__('os')"

    edit_program(art, edit)
    with pytest.raises(ArtifactError, match="bad value name"):
        load(art)


def test_expensive_shape_expressions_are_refused():
    assert program_format._safe_expression("Mul(Integer(2), Symbol('s1', positive=True))")
    assert not program_format._safe_expression("Pow(Integer(10), Integer(10000000000))")
    assert not program_format._safe_expression("Mul(Integer(100000000000000000000), Integer(3))")


def test_real_programs_pass_the_check_unchanged(art):
    doc = json.loads((art / PROGRAM).read_bytes())
    program_format.check(doc)
    targets = {n["target"] for n in doc["graph_module"]["graph"]["nodes"]}
    assert "torch.ops.xllm.attention.default" in targets


# -- chat templates --


def test_template_payload_through_generate_and_chat(art, tmp_path):
    marker = tmp_path / "pwned"
    set_template(art, template_payload(marker))
    assert_one_line_error(run_cli("generate", str(art), "--chat", "hello"), "chat template")
    proc = run_cli("chat", str(art), stdin="hello\n")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "chat template" in proc.stderr
    assert not marker.exists()


def test_template_payload_through_the_server(art, tmp_path):
    import threading
    import time

    import httpx

    from xllm_compile.runtime.server import HTTPServer, ServerConfig

    marker = tmp_path / "pwned"
    set_template(art, template_payload(marker))
    srv = HTTPServer(load(art), ServerConfig(port=0))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
            r = c.post("/v1/completions", json={"prompt": "It is", "max_tokens": 2})
            assert r.status_code == 200  # everyone else is still served
    finally:
        srv.stop()
        thread.join(30)
    assert not marker.exists()


def test_unlisted_template_file_is_ignored(art, tmp_path):
    marker = tmp_path / "pwned"
    (art / "chat_template.jinja").write_text(template_payload(marker))  # not in the manifest
    engine = load(art)
    prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert not marker.exists()


def test_sandbox_keeps_what_hf_templates_use(art):
    set_template(
        art,
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no ' + m.role) }}"
        "{% endif %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
        "{{ strftime_now('%Y')[:2] }}",
    )
    tok = load(art).tokenizer
    out = tok.apply_chat_template([{"role": "user", "content": "é"}])
    assert out.startswith('{"role": "user", "content": "é"}') and out[-2:].isdigit()
    with pytest.raises(RequestError, match="no bad"):
        tok.apply_chat_template([{"role": "bad", "content": ""}])


# -- the manifest --


@pytest.mark.parametrize(("field", "delta"), [("vocab_size", 1), ("num_layers", 1)])
def test_an_edited_manifest_config_is_caught(art, field, delta):
    """The manifest lists the hashes, not itself: its config is checked against the program
    and weights (vocab_size + 1 let token id 2048 through to the embedding)."""
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["model"]["config"][field] += delta
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"manifest.json says {field}="):
        load(art)


# -- signatures --


def test_signed_artifacts_and_trust(tiny_artifact, tmp_path):
    """--sign KEY signs the manifest; --trust KEYS refuses what is unsigned, signed by another
    key, or changed after signing (even with every hash rewritten)."""
    from xllm_compile.cli import main

    key, other = tmp_path / "key", tmp_path / "other"
    assert main(["keygen", str(key)]) == 0 and main(["keygen", str(other)]) == 0
    trusted = tmp_path / "trusted"
    trusted.write_text("# ours\n" + (tmp_path / "key.pub").read_text())
    art = compile_cli(EXAMPLE, tmp_path / "art", "--sign", str(key))
    assert load(art, trust=trusted).generate(["It is"], max_tokens=2)[0].token_ids
    with pytest.raises(ArtifactError, match="not signed"):
        load(tiny_artifact, trust=trusted)
    by_other = compile_cli(EXAMPLE, tmp_path / "other-art", "--sign", str(other))
    with pytest.raises(ArtifactError, match="do not trust"):
        load(by_other, trust=trusted)
    set_template(art, "{{ 'changed' }}")  # rewrites a file and the manifest's hashes
    with pytest.raises(ArtifactError, match="changed after signing"):
        load(art, trust=trusted)
    assert_one_line_error(
        run_cli("generate", str(art), "--prompt", "x", "--trust", str(trusted)), "signature"
    )
    assert load(art).tokenizer  # without --trust: integrity only, as before
