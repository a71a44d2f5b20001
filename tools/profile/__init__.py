"""`xllm profile`: what each pass and kernel buys, for kernel developers.

    xllm profile passes MODEL|ART [--batch 1,8] [--tokens 128] [--verify]   # passes.py
    xllm profile ops ART [--phase decode|prefill] [--trace t.json] [--html r.html]  # ops.py
    xllm profile kernel NAME [--shapes ...] [--dtype ...]                  # kernel.py
    xllm profile cache ART [--histogram FILE] [--budget BYTES]             # cache.py

Everything runs on the runtime's real loader, executor and graph cache (an artifact loaded with
`runtime.load`), never on a second model path. Tables print aligned (table.py) or as JSON.
"""
