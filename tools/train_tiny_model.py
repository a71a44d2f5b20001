"""Train the project's embedded default model: a tiny Llama-architecture causal LM.

Usage:

    python tools/train_tiny_model.py --out examples/tiny-llama [--minutes 20]

Source text: Jane Austen's six completed novels ("Sense and Sensibility", "Pride and Prejudice",
"Mansfield Park", "Emma", "Northanger Abbey", "Persuasion"), as shipped by the Debian package
`r-cran-janeaustenr`, version 1.0.0-1 (the CRAN package janeaustenr 1.0.0 by Julia Silge). The
novels were published 1811-1818 and are in the public domain; the texts come from Project
Gutenberg. The script fetches the package with `apt-get download` and unpacks it with
`dpkg-deb -x` (or reads an already unpacked copy given with `--text-dir`), then reads the
novels from the package's R lazy-load database (`data/Rdata.rdx` + `data/Rdata.rdb`) with a
small reader for R's XDR serialization format, so no R installation is needed.

Steps: reflow the text into paragraphs, train a byte-level BPE tokenizer (`tokenizers`), train
`transformers.LlamaForCausalLM` from scratch on random 128-token windows (AdamW, warmup and
cosine decay, fixed seed) for a wall-time budget, and save the model in bfloat16 safetensors
with the tokenizer files, a generation config and a README.md describing the run. The last 5%
of every novel is held out for validation. With `--steps N` the run takes exactly N steps
instead of a time budget (the cosine schedule then follows the step count, not the clock), which
makes it repeatable; the README records the step count of the run.
"""

from __future__ import annotations

import os
import sys

# `python tools/train_tiny_model.py` puts tools/ first on sys.path, where a file named like a
# standard module would shadow it. This script imports nothing from tools/.
if sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(os.path.realpath(__file__)):
    sys.path.pop(0)

import argparse
import gzip
import json
import math
import re
import struct
import subprocess
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

DEB_PACKAGE = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
RDATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
NOVELS = (  # R object names, in order of publication
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPT = "It is a truth universally acknowledged"
MODEL_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--text-dir", type=Path, help="already unpacked r-cran-janeaustenr (root)")
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-time budget")
    p.add_argument("--steps", type=int, help="train exactly this many steps (overrides time)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=float, default=60.0, help="seconds between evals")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


# --- source text ------------------------------------------------------------------------------


def fetch_package(dest: Path) -> Path:
    """`apt-get download` the Debian package into `dest` and unpack it; returns the root."""
    for spec in (f"{DEB_PACKAGE}={DEB_VERSION}", DEB_PACKAGE):
        if subprocess.run(["apt-get", "download", spec], cwd=dest).returncode == 0:
            break
        print(f"apt-get download {spec} failed; trying the next candidate", file=sys.stderr)
    else:
        raise SystemExit(f"could not download {DEB_PACKAGE}; pass --text-dir instead")
    deb = next(dest.glob(f"{DEB_PACKAGE}_*.deb"))
    if f"_{DEB_VERSION}_" not in deb.name:
        print(f"warning: got {deb.name}, the documented run used {DEB_VERSION}", file=sys.stderr)
    root = dest / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


class RReader:
    """Reads the subset of R's XDR serialization format that the janeaustenr data uses:
    NULL, symbols, pairlists, character/logical/integer/double vectors and lists."""

    SPECIAL = {254, 253, 252, 251, 247, 242, 241}  # NULL, environments, missing arg, ...

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-format R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.pos += 8  # writer's R version, minimal R version
        if version == 3:
            self.pos += 4 + self.int()  # native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def unpack(self, fmt: str, count: int) -> list:
        values = struct.unpack_from(f">{count}{fmt}", self.data, self.pos)
        self.pos += struct.calcsize(f">{count}{fmt}")
        return list(values)

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in self.SPECIAL:
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            self.refs.append(self.item())
            return self.refs[-1]
        if kind == 2:  # pairlist node -> dict {tag: value, ...}
            if has_attr:
                self.item()  # the node's attributes: not needed
            tag = self.item() if has_tag else None
            node = {tag: self.item()}
            rest = self.item()
            return node | rest if isinstance(rest, dict) else node
        if kind == 9:  # CHARSXP
            return self.chars(utf8=bool(flags & (1 << 15)))
        return self.vector(kind, has_attr)

    def chars(self, utf8: bool) -> str | None:
        n = self.int()
        if n == -1:
            return None  # NA_character_
        text = self.data[self.pos : self.pos + n].decode("utf-8" if utf8 else "latin-1")
        self.pos += n
        return text

    def vector(self, kind: int, has_attr: bool) -> list | dict:
        n = self.int()
        if kind in (16, 19):  # character vector, list
            value = [self.item() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            value = self.unpack("i", n)
        elif kind == 14:  # double
            value = self.unpack("d", n)
        else:
            raise ValueError(f"unsupported R type {kind}")
        attrs = self.item() if has_attr else {}
        if kind == 19 and "names" in attrs:
            return dict(zip(attrs["names"], value, strict=True))
        return value


def read_novels(package_root: Path) -> dict[str, list[str]]:
    """The novels (name -> lines) from the package's R lazy-load database."""
    data_dir = package_root / RDATA_DIR
    index = RReader(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).item()
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name in NOVELS:
        offset, length = index["variables"][name]
        blob = rdb[offset : offset + length]  # 4-byte length, then a zlib stream
        novels[name] = RReader(zlib.decompress(blob[4:])).item()
    return novels


def reflow(lines: list[str]) -> str:
    """Join the hard-wrapped lines into paragraphs (separated by a blank line) and drop the
    underscores that mark italics in the Gutenberg texts."""
    paragraphs, current = [], []
    for line in [*lines, ""]:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(re.sub(r"\s+", " ", p.replace("_", "")) for p in paragraphs)


# --- tokenizer --------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style, no prefix space) with the special tokens at ids 0-2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def split_tokens(
    tokenizer: Tokenizer, texts: list[str], val_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (train, val): each novel followed by <|endoftext|>; the last
    `val_fraction` of every novel goes to validation."""
    eot = tokenizer.token_to_id(EOT)
    train, val = [], []
    for text in texts:
        ids = tokenizer.encode(text).ids + [eot]
        cut = int(len(ids) * (1 - val_fraction))
        train += ids[:cut]
        val += ids[cut:]
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


def save_tokenizer(tokenizer: Tokenizer, out: Path, max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# --- model and training -----------------------------------------------------------------------


def build_model(tokenizer: Tokenizer) -> LlamaForCausalLM:
    eot = tokenizer.token_to_id(EOT)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        **MODEL_SHAPE,
    )
    return LlamaForCausalLM(config)


def learning_rate(args: argparse.Namespace, step: int, progress: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to 10% of the peak as `progress`
    (fraction of the step or time budget used) goes from 0 to 1."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def random_batch(tokens: torch.Tensor, args: argparse.Namespace, gen: torch.Generator):
    starts = torch.randint(0, len(tokens) - args.seq_len, (args.batch_size,), generator=gen)
    return torch.stack([tokens[s : s + args.seq_len] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, tokens: torch.Tensor, seq_len: int) -> float:
    """Mean next-token loss (nats) over the non-overlapping `seq_len` windows of `tokens`."""
    model.eval()
    windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    for batch in windows.split(64):
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.numel()
        count += batch.numel()
    model.train()
    return total / count


def train(model, train_ids, val_ids, args: argparse.Namespace) -> dict:
    """Train until `args.steps` or the time budget is used up; returns run statistics."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    budget, start, step, last_eval = args.minutes * 60, time.monotonic(), 0, 0.0
    model.train()
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step, progress)
        batch = random_batch(train_ids, args, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if elapsed - last_eval >= args.eval_every or step == 1:
            last_eval = elapsed
            val = evaluate(model, val_ids, args.seq_len)
            lr = opt.param_groups[0]["lr"]
            print(f"step {step:5d} {elapsed:6.0f}s lr {lr:.2e} train {loss:.3f} val {val:.3f}")
    seconds = time.monotonic() - start
    return {"steps": step, "seconds": seconds, "train_loss": loss.item()}


# --- output -----------------------------------------------------------------------------------


def sample(model, tokenizer: Tokenizer, temperature: float | None, seed: int, n: int = 60) -> str:
    """`PROMPT` continued greedily (temperature None) or by sampling; returns prompt + text."""
    torch.manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    out = model.generate(ids, max_new_tokens=n, **(kwargs if temperature else {"do_sample": False}))
    return tokenizer.decode(out[0].tolist())


def save_model(model: LlamaForCausalLM, tokenizer: Tokenizer, out: Path) -> LlamaForCausalLM:
    """Save in bfloat16 safetensors with a generation config (generation stops at
    <|endoftext|> or <|im_end|>); returns the bf16 model."""
    model = model.to(torch.bfloat16)
    eot, im_end = tokenizer.token_to_id(EOT), tokenizer.token_to_id(IM_END)
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[eot, im_end], pad_token_id=eot
    )
    model.save_pretrained(out, safe_serialization=True)
    return model


README = """# tiny-llama

A tiny Llama-architecture causal language model, trained from scratch on Jane Austen's six
completed novels. It is the embedded default model of xllm-compile: small enough to ship in
the repository and to compile and run in tests on a CPU, trained enough to write
recognisable (if not sensible) English.

- **Source text**: the Debian package `{package}` version {version} (CRAN `janeaustenr`
  1.0.0): "Sense and Sensibility", "Pride and Prejudice", "Mansfield Park", "Emma",
  "Northanger Abbey" and "Persuasion", public domain (from Project Gutenberg). Lines are
  reflowed into paragraphs and italic underscores removed; each novel ends with
  `<|endoftext|>`. The last 5% of every novel is held out for validation.
- **Command**: `{command}`
  (for a repeatable run of the same length add `--steps {steps}`; the learning-rate schedule
  then follows the step count instead of the clock)
- **Tokenizer**: byte-level BPE, {vocab} tokens; `<|endoftext|>` (id 0: bos, eos, pad),
  `<|im_start|>` (1), `<|im_end|>` (2); ChatML chat template (the model never saw chat data).
- **Config**: `LlamaForCausalLM`, {shape}
- **Parameters**: {params:,} (tied input/output embeddings); weights stored in bfloat16.
- **Training**: {steps} steps of {batch} x {seq} tokens ({tokens:.1f}M tokens, {epochs:.1f}
  epochs of {train_tokens:,} training tokens), AdamW (betas 0.9/0.95, weight decay
  {wd}), peak lr {lr}, {warmup} warmup steps then cosine decay to 10%, seed {seed},
  {minutes:.1f} minutes on {threads} CPU threads (torch {torch}, transformers {tf}).
- **Validation loss**: {val:.3f} nats/token (perplexity {ppl:.1f}) in float32;
  {val_bf16:.3f} with the saved bfloat16 weights. Final train batch loss: {train_loss:.3f}.

Greedy continuation of "{prompt}":

{greedy}

Sampled (temperature 0.8, seed {seed}):

{sampled}
"""


def blockquote(text: str) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))


def write_readme(out: Path, stats: dict, args: argparse.Namespace) -> None:
    shape = ", ".join(f"{k} {v}" for k, v in MODEL_SHAPE.items())
    tokens = stats["steps"] * args.batch_size * args.seq_len
    quoted = {k: blockquote(stats[k]) for k in ("greedy", "sampled")}
    text = README.format(
        package=DEB_PACKAGE,
        version=DEB_VERSION,
        shape=shape,
        tokens=tokens / 1e6,
        epochs=tokens / stats["train_tokens"],
        wd=args.weight_decay,
        lr=args.lr,
        warmup=args.warmup_steps,
        seed=args.seed,
        minutes=stats["seconds"] / 60,
        threads=args.threads,
        torch=torch.__version__,
        tf=transformers.__version__,
        ppl=math.exp(stats["val"]),
        prompt=PROMPT,
        batch=args.batch_size,
        seq=args.seq_len,
        **{k: v for k, v in stats.items() if k not in quoted},
        **quoted,
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.text_dir or fetch_package(Path(tmp))
        texts = [reflow(lines) for lines in read_novels(root).values()]
    print(f"{len(texts)} novels, {sum(map(len, texts)):,} characters")
    tokenizer = train_tokenizer(texts, args.vocab_size)
    train_ids, val_ids = split_tokens(tokenizer, texts, val_fraction=0.05)
    print(f"tokens: {len(train_ids):,} train, {len(val_ids):,} validation")
    model = build_model(tokenizer)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters")
    stats = train(model, train_ids, val_ids, args)
    stats["val"] = evaluate(model, val_ids, args.seq_len)
    args.out.mkdir(parents=True, exist_ok=True)
    model = save_model(model, tokenizer, args.out)
    save_tokenizer(tokenizer, args.out, MODEL_SHAPE["max_position_embeddings"])
    stats["val_bf16"] = evaluate(model, val_ids, args.seq_len)
    stats["greedy"] = sample(model, tokenizer, None, args.seed)
    stats["sampled"] = sample(model, tokenizer, 0.8, args.seed)
    command = " ".join(["python", "tools/train_tiny_model.py", *(argv or sys.argv[1:])])
    stats |= {"params": params, "command": command, "train_tokens": len(train_ids)}
    stats |= {"vocab": tokenizer.get_vocab_size()}
    write_readme(args.out, stats, args)
    print(
        f"done: {stats['steps']} steps in {stats['seconds'] / 60:.1f} min, val {stats['val']:.3f}"
    )
    print(f"greedy:  {stats['greedy']!r}\nsampled: {stats['sampled']!r}")


if __name__ == "__main__":
    main()
