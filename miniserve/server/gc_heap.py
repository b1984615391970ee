"""Keep the start-up heap out of Python's garbage collector, in both server processes.

A full collection walks every tracked object. After start-up a server process holds a few hundred thousand (torch,
triton, transformers, pydantic's schemas, the tokenizer) that will never be garbage, and a burst of requests
leaves enough survivors to trigger a full collection: on the CPU, with benchmarks/fake_engine.py and 256 streams,
one in the middle of a burst stopped the API process's event loop for 125 ms (every stream waits that long; two
runs alike). On the H200 the engine process gained most (serve_ab_h200.json).
`gc.freeze()` moves what is alive now into a permanent generation that collections skip, so they walk only what
the traffic made. vLLM does the same after warm-up (`freeze_gc_heap`); SGLang offers it (`freeze_gc`).

The heap thaws when serving ends (`thaw_heap`): frozen objects are never collected, so a process that goes on
(an app served inside a test or a user's program) or that exits would otherwise keep them to the end, and
extension modules report them as leaked at interpreter exit.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect the start-up garbage, then freeze everything still alive; returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def thaw_heap() -> None:
    """Give the frozen objects back to the collector (serving has ended)."""
    gc.unfreeze()
