"""The artifact's tokenizer through the `tokenizers` library (no transformers at serving time),
plus the chat template from tokenizer_config.json rendered with jinja2."""

from __future__ import annotations

import json
from pathlib import Path

from xllm_compile.errors import ArtifactError, RequestError


class Tokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise ArtifactError(f"{path / 'tokenizer.json'}: cannot be read ({e})") from None
        self.config = _read_optional_json(path / "tokenizer_config.json")
        template_file = path / "chat_template.jinja"
        self.chat_template = (
            template_file.read_text()
            if template_file.is_file()
            else self.config.get("chat_template")
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the model's chat template, ready for the assistant's turn."""
        if not self.chat_template:
            raise RequestError("this model's tokenizer has no chat template; use a plain prompt")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_token_str(self.config.get("bos_token")),
            eos_token=_token_str(self.config.get("eos_token")),
        )


def _token_str(value) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def _raise(message: str):
    raise RequestError(f"chat template: {message}")


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
