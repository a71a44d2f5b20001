"""Activation arenas: one contiguous range of pool pages holding a program's intermediate tensors
at the offsets of a memory plan (passes/memory_plan.py), and the program rewritten to write them
there (ATen `.out` overloads) instead of allocating.

For the graph cache, one call per bucket entry:

    arena = Arena(pool)                       # or make_arena("cpu"): a pool of its own
    plan = plan_memory(graph_module, (*params, *inputs, kv_view))  # passes/: at compile time
    program = build_arena_runner(graph_module, plan, arena)
    (logits,) = program(*params, *inputs, kv_view)   # same call as graph_module's

`program` is a plain fx.GraphModule (generated `forward`, nothing interpreted per node), as fast
as the original, bit-identical to it on the bucket's shapes. Its planned outputs live in the
arena, **the returned logits included**: like a CUDA graph's static output, they are overwritten
by the next call of any program sharing the arena; copy them to keep them. One arena serves many
bucket programs because one runs at a time: it is mapped to the largest plan and grows (maps more
pages of the same reservation, so earlier programs' views stay valid) when a larger plan arrives.
A program checks on each call that the input sizes its plan depends on (`plan.guards`, e.g. the
token count) are the bucket's, and raises ValueError otherwise: a larger input would otherwise be
written past its slot. Nodes without an `.out` overload (the `xllm::` ops, multi-output ops) keep
allocating, as counted by `plan.num_unplanned`.

The runtime never plans (it imports nothing from passes/, per DESIGN's layering): the plan
comes from passes/memory_plan.py, run by the compile driver (which stores one per bucket shape in
the artifact's arena_plans.json, read back as arena_plans.StoredPlan), a tool or a test.

The arena reserves virtual address space once (default: enough for every page of the pool) and
maps pages on demand, so it works unchanged on the CPU memfd pool and the CUDA VMM pool. Pages
come from the pool it is given: when that pool also holds the KV cache, size it with room for
the arena, or `fit` raises PoolExhaustedError.
"""

from __future__ import annotations

import torch
from torch import fx

from xllm_compile.arena_plans import StoredPlan
from xllm_compile.runtime.page_pool import PagePool, round_up

__all__ = ["Arena", "arena_program", "build_arena_runner", "make_arena"]


class Arena:
    """A contiguous range of `pool` pages, viewed as tensors at byte offsets.

    Args:
        pool: gives the pages (and owns them); the arena owns its reservation.
        capacity: bytes of address space to reserve (default: the whole pool), the most the arena
            can ever grow to. Reserving costs no memory.
        owns_pool: close the pool too on `close()` (make_arena's private pool).
    """

    def __init__(self, pool: PagePool, capacity: int | None = None, owns_pool: bool = False):
        self.pool, self.owns_pool = pool, owns_pool
        self.capacity = round_up(capacity or pool.page_size * pool.num_pages, pool.page_size)
        self.vrange = pool.reserve(self.capacity)
        with torch.inference_mode(False):  # views made from it must be usable outside it too
            self._flat = pool.tensor(self.vrange, torch.uint8)  # [capacity] bytes
        self.requested = 0  # the largest plan fitted so far

    @property
    def nbytes(self) -> int:
        """Bytes mapped (whole pages); views may use [0, nbytes)."""
        return len(self.vrange.pages) * self.pool.page_size

    def fit(self, nbytes: int) -> int:
        """Map pages until the first `nbytes` bytes are backed; returns the pages newly mapped.
        Never unmaps (a smaller plan fits in a larger arena). All or nothing on failure.

        Raises:
            ValueError: `nbytes` is beyond the reserved capacity.
            PoolExhaustedError: the pool ran out of pages (none mapped by this call stay mapped).
        """
        if nbytes > self.capacity:
            raise ValueError(f"an arena of {nbytes} bytes exceeds its {self.capacity}-byte range")
        first = len(self.vrange.pages)
        want = -(-nbytes // self.pool.page_size)
        try:
            for index in range(first, want):
                self.pool.map(self.vrange, index)
        except Exception:
            for index in reversed(range(first, len(self.vrange.pages))):
                self.pool.unmap(self.vrange, index)
            raise
        self.requested = max(self.requested, nbytes)
        self.vrange.used_bytes = self.requested
        return max(0, want - first)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` and `dtype` over bytes [offset, offset + its size) of
        the arena, without copying. The bytes must be mapped (`fit`) and `offset` a multiple of
        the dtype's size (the planner's 64-byte alignment is)."""
        itemsize = dtype.itemsize
        nbytes = itemsize * _numel(shape)
        if offset % itemsize or offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(
                f"view [{offset}, +{nbytes}) of {dtype} is misaligned or past the "
                f"{self.nbytes} mapped bytes of the arena"
            )
        with torch.inference_mode(False):
            return self._flat[offset : offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        """Release the reservation (its pages go back to the pool), and the pool if owned.
        Programs built on the arena must be dropped first: their views point into it."""
        self._flat = None
        self.pool.release(self.vrange)
        if self.owns_pool:
            self.pool.close()


def make_arena(device: str, capacity: int = 1 << 30, page_size: int | None = None) -> Arena:
    """An arena with a pool of its own: `capacity` bytes of pages (created lazily: only mapped
    pages cost memory), 64 KiB pages on CPU, the 2 MiB granularity on CUDA."""
    from xllm_compile.runtime.page_pool import make_page_pool

    page_size = page_size or ((2 << 20) if device.startswith("cuda") else 64 << 10)
    capacity = round_up(capacity, page_size)
    pool = make_page_pool(device, page_size, capacity // page_size)
    return Arena(pool, capacity, owns_pool=True)


def arena_program(
    graph_module: fx.GraphModule, plan, arena: Arena, base: int = 0
) -> fx.GraphModule:
    """A copy of `graph_module` whose planned nodes write into `arena` views through their ATen
    `.out` overloads (`aten.linear(x, w)` -> `aten.linear.out(x, w, out=self._arena_3)`), with a
    size check on the inputs first. `arena` must already fit the plan (`arena.fit`).

    `plan` is a passes.memory_plan.MemoryPlan or an arena_plans.StoredPlan (read from the
    artifact) for the shapes the program will be called with; its offsets count from byte `base`
    of the arena (a multiple of 64: the bytes before it hold something else, such as the graph
    cache's static inputs).

    Raises:
        ValueError: the arena is too small, or the plan names nodes the program lacks.
    """
    if not isinstance(plan, StoredPlan):  # a planner's MemoryPlan: the artifact's form of it
        plan = StoredPlan.of(plan)
    if arena.nbytes < base + plan.arena_bytes:
        raise ValueError(
            f"the arena maps {arena.nbytes} bytes; the plan needs {base + plan.arena_bytes}"
        )
    missing = set(plan.buffers) - {n.name for n in graph_module.graph.nodes}
    if missing:
        raise ValueError(f"the plan names nodes the program lacks: {sorted(missing)[:3]}")
    graph = fx.Graph()
    graph._codegen = graph_module.graph._codegen
    result, old_output = graph.graph_copy(graph_module.graph, {}, return_output_node=True)
    graph.output(result, old_output.type)
    root = {n.target: _get_attr(graph_module, n.target) for n in graph.nodes if n.op == "get_attr"}
    for k, node in enumerate([n for n in graph.nodes if n.name in plan.buffers]):
        buf = plan.buffers[node.name]
        name = f"_arena_{k}"
        root[name] = arena.view(base + buf.offset, buf.shape, buf.dtype)
        with graph.inserting_before(node):
            view = graph.get_attr(name)
            args, kwargs = buf.call.bind(node.args, node.kwargs, view)
            new = graph.call_function(buf.call.op, args, kwargs)
        new.meta = node.meta
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    _insert_guard(graph, plan.guards)
    graph.lint()
    program = fx.GraphModule(root, graph, class_name="ArenaProgram")
    # Plain attributes, not buffers: `self._arena_3` then costs 0.06 us instead of 1 us through
    # Module.__getattr__ (21 views: 20 us a step), and .to()/state_dict() leave the views alone.
    for name in [n for n in program._buffers if n.startswith("_arena_")]:
        program.__dict__[name] = program._buffers.pop(name)
    return program


def build_arena_runner(
    graph_module: fx.GraphModule, plan, arena: Arena, base: int = 0
) -> fx.GraphModule:
    """Grow `arena` to `plan` (placed from byte `base`; a MemoryPlan or a StoredPlan for the
    shapes the program will be called with, made at compile time or by the caller) and build
    the arena program.

    Raises:
        PoolExhaustedError: the arena's pool cannot map the plan's pages.
    """
    arena.fit(base + plan.arena_bytes)
    return arena_program(graph_module, plan, arena, base)


def check_sizes(inputs: tuple, expected: tuple) -> None:
    """The guard an arena program runs first: input i's dim d has size s for every (i, d, s)."""
    for t, (i, d, size) in zip(inputs, expected, strict=True):
        if t.shape[d] != size:
            raise ValueError(
                f"arena program planned for input {i} of size {size} in dim {d}, called with "
                f"{t.shape[d]}: build a program for this bucket"
            )


def _insert_guard(graph: fx.Graph, guards) -> None:
    if not guards:
        return
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        inputs = tuple(placeholders[i] for i, _, _ in guards)
        graph.call_function(check_sizes, (inputs, tuple(guards)))


def _get_attr(module: torch.nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
