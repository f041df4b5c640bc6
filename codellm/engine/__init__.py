"""The serving engine: continuous batching over a slot KV cache, chunked prefill, prefix reuse, streaming.

    kv_cache.py   SlotKVCache: slots allocated once, prefix records, swaps; SlotView for one forward
    scheduler.py  Request and the token-budget Scheduler (which requests run, dense decode rows)
    model_runner.py  ModelRunner: runs decode rows and prompt chunks; owns the KV layout and the decode path
    sampler.py    per-row sampling through sampling.sample_next with per-request generators
    engine.py     Engine: submit / cancel / step / run / stream / generate, EngineEvent, Completion
    runner.py     EngineRunner: the engine loop in a thread, per-request streams for threads and asyncio
    decode.py     the decode step as a pure function (eager, or torch.compile'd off the CPU)
    native.py     the CPU decode step as one call into native_decode.cpp (built at first use); each weight matrix, dense
                  or quantized, is read through codellm/weights.py's NativeMatrix
"""

from codellm.engine.engine import Completion, Engine, EngineEvent
from codellm.engine.kv_cache import SlotKVCache
from codellm.engine.runner import EngineRunner

__all__ = ["Completion", "Engine", "EngineEvent", "EngineRunner", "SlotKVCache"]
