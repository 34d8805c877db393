"""What one call issues: Triton kernel launches and the PyTorch operators around them (issue 12's "glue").

    from count_ops import count_calls
    result, counts = count_calls(lambda: connector(patches, q_emb, frames, check=False))
    counts.launches, counts.ops, counts.work_ops, counts.by_kernel, counts.by_op

Launches are counted at Triton's launch entry (`JITFunction.run` compiled, `InterpretedFunction.run` under the
interpreter), so a CPU run counts what a GPU run would launch. Operators are counted by a TorchDispatchMode: every
ATen operator that reaches the dispatcher outside the project's custom ops (views included: each is a dispatcher
call), and the custom ops (`dynfocus::*`) separately. Library launches that are not Triton (cuBLAS behind a matmul)
appear as the operator that issues them. `work_ops` leaves out what launches no device work (views, allocations,
no-ops; NO_WORK): issue 12's "at most 60 other ops" target is counted on it.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, NamedTuple

from torch.utils._python_dispatch import TorchDispatchMode


# Operators that never launch device work: views and aliases (metadata only), allocations (the caching allocator
# on CUDA, no kernel), and the no-op that wraps a Python constant.
NO_WORK = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided",
           "aten.lift_fresh", "aten.detach", "aten.alias", "aten._unsafe_view"}


class CallCounts(NamedTuple):
    launches: int          # Triton kernel launches
    ops: int               # ATen operators outside the custom ops
    custom: int            # dynfocus:: custom ops (each wraps launches counted above)
    by_kernel: Counter
    by_op: Counter
    work_ops: int = 0      # ops that may launch device work: `ops` less views, allocations and no-ops
    by_work_op: Counter = Counter()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.custom, self.work = Counter(), Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        (self.custom if func.namespace == "dynfocus" else self.ops)[name] += 1
        if func.namespace != "dynfocus" and not func.is_view and name not in NO_WORK:
            self.work[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _counting_launches(counter: Counter):
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    patched = []
    for cls in (JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            counter[getattr(self, "__name__", None) or getattr(self.fn, "__name__", "?")] += 1
            return _original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def count_calls(fn: Callable):
    """(fn's result, CallCounts of that one call)."""
    kernels = Counter()
    with _counting_launches(kernels), _OpCounter() as ops:
        result = fn()
    return result, CallCounts(sum(kernels.values()), sum(ops.ops.values()), sum(ops.custom.values()), kernels,
                              ops.ops, sum(ops.work.values()), ops.work)
