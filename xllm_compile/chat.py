"""`xllm chat ART`: an interactive conversation through the model's chat template, streaming the
answer as it is decoded. The history is kept; an over-long history is a one-line error."""

from __future__ import annotations

import sys
from collections.abc import Callable

from xllm_compile.errors import RequestError, XllmError


def chat_loop(
    engine,
    read: Callable[[str], str] = input,
    write: Callable[[str], object] = sys.stdout.write,
    system: str | None = None,
    **sampling,
) -> int:
    """Read user turns until EOF (or an empty "/exit"), answer each; returns the turns served."""
    if engine.tokenizer is None:
        raise XllmError("chat needs a tokenizer, and this artifact has none")
    messages = [{"role": "system", "content": system}] if system else []
    turns = 0
    while True:
        try:
            user = read("> ")
        except EOFError:
            write("\n")
            return turns
        if user.strip() in ("/exit", "/quit"):
            return turns
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user})
        prompt = engine.tokenizer.apply_chat_template(messages)
        try:
            pieces = []
            for piece in engine.stream(prompt, **sampling):
                pieces.append(piece)
                write(piece)
                getattr(sys.stdout, "flush", lambda: None)()
        except RequestError as e:  # e.g. the history outgrew the artifact: say so, keep going
            messages.pop()
            write(f"[{e}]")
            pieces = None
        write("\n")
        if pieces is not None:
            messages.append({"role": "assistant", "content": "".join(pieces).strip()})
            turns += 1
