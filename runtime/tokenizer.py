"""The artifact's tokenizer through the `tokenizers` library (no transformers at serving time),
plus the chat template rendered in jinja2's immutable sandbox (templates are untrusted input:
an artifact's or a GGUF's template must not reach Python objects, files or processes)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from functools import cached_property
from pathlib import Path

from xllm_compile.errors import ArtifactError, RequestError


class Tokenizer:
    """The tokenizer files of an artifact folder; only the names in `files` (the manifest's
    list, whose hashes were checked) are read, so a file dropped beside them is ignored."""

    def __init__(self, path: Path, files: Iterable[str]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        files = frozenset(files)
        if "tokenizer.json" not in files:
            raise ArtifactError(f"{path}: the manifest lists no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ArtifactError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        config_file = path / "tokenizer_config.json"
        self.config = _read_optional_json(config_file) if "tokenizer_config.json" in files else {}
        if "chat_template.jinja" in files:
            self.chat_template = (path / "chat_template.jinja").read_text()
        else:
            self.chat_template = _template_from_config(self.config.get("chat_template"))

    def encode(self, text: str) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long prompt tokenized in a worker
        # thread no longer stalls the server's event loop (3.6 MB: 1.5 s held -> 58 ms)
        return self._tok.encode_batch([text])[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @cached_property
    def _template(self):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # what transformers' own renderer offers templates, and nothing more
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))
        try:
            return env.from_string(self.chat_template)
        except jinja2.TemplateError as e:
            raise RequestError(f"the model's chat template does not parse: {e}") from None

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the model's chat template, ready for the assistant's turn.

        Raises:
            RequestError: no template, a template that does not parse, raises, or tries
                something the sandbox forbids (attribute access to internals, mutation).
        """
        if not self.chat_template:
            raise RequestError("this model's tokenizer has no chat template; use a plain prompt")
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=_token_str(self.config.get("bos_token")),
                eos_token=_token_str(self.config.get("eos_token")),
            )
        except jinja2.TemplateError as e:  # SecurityError included
            raise RequestError(f"the chat template cannot render these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise RequestError(f"the chat template failed: {type(e).__name__}: {e}") from None


def _template_from_config(value) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (the one
    named "default" is used)."""
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
    )


def _token_str(value) -> str:
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


def _raise(message: str):
    raise RequestError(f"chat template: {message}")


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return value
