"""Where the engine's thread spends a step: wall time inside named methods, in milliseconds per engine step.

A method is wrapped in place (its owner's attribute replaced), so the phases of every engine built afterwards are
timed; `wait` phases say how long the thread stood idle for the GPU, the rest is host work. Used by
structured_outputs.py (`CONSTRAINED`: a constrained step's phases) and throughput.py (`PLAIN`: any step's)."""

from __future__ import annotations

import time

from miniserve.engine import decoder as decoder_module
from miniserve.engine import structured_output
from miniserve.engine.llm_engine import LLMEngine
from miniserve.engine.model_runner import ModelRunner
from miniserve.engine.output_processor import OutputProcessor
from miniserve.scheduler.scheduler import Scheduler

# A constrained step: inside `next_batch` the engine's thread fills the masks (`fill`) while the decoder's helper
# thread draws the noise (`noise_draws`) and detokenizes the tokens read and applies their stop rules
# (`text_and_stops`), beside the fill, not after it.
CONSTRAINED = {
    "forward_launch": (decoder_module.PlainDecoder, "_forward"),
    "read_step": (decoder_module.PlainDecoder, "_take"),  # a constrained (penalized) step's read
    "read_step_plain": (decoder_module.PlainDecoder, "_read"),  # any other step's
    "text_and_stops": (OutputProcessor, "finish_sampled"),
    "next_batch": (decoder_module.PlainDecoder, "_next_batch"),
    "noise_draws": (decoder_module, "draw_noise"),
    "fill": (structured_output.MaskFiller, "_fill"),
    "sample_launch": (decoder_module.PlainDecoder, "_sample_in_flight"),
    "engine_step": (LLMEngine, "step"),
}

# Any step: `wait` is the thread blocked until a step's samples are on the host (every read goes through
# PlainDecoder._wait); engine_step - wait is the host's own work, which overlapped decoding runs beside the GPU.
PLAIN = {
    "engine_step": (LLMEngine, "step"),
    "wait": (decoder_module.PlainDecoder, "_wait"),
    "schedule": (Scheduler, "schedule"),
    "forward_launch": (decoder_module.PlainDecoder, "_forward"),  # a decode step's inputs and its graph's replay
    "model_forward": (ModelRunner, "forward"),  # every pass's (prompt passes too), inside forward_launch
    "sample_launch": (decoder_module.PlainDecoder, "_sample_in_flight"),
    "append_tokens": (OutputProcessor, "append_sampled"),  # tokens, text and stop rules of a step read
    "collect_outputs": (OutputProcessor, "collect"),
}


class HostSplit:
    """Times `phases` ({name: (owner, attribute)}) from construction on; per_step_ms() averages over the engine
    steps since the last reset(). Owners stay wrapped for the rest of the process."""

    def __init__(self, phases: dict[str, tuple[object, str]]) -> None:
        self.phases = phases
        self.seconds = dict.fromkeys(phases, 0.0)
        self.steps = 0
        for name, (owner, attr) in phases.items():
            setattr(owner, attr, self._timed(name, getattr(owner, attr)))

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.steps += name == "engine_step"

        return timed

    def reset(self) -> None:
        self.seconds, self.steps = dict.fromkeys(self.phases, 0.0), 0

    def per_step_ms(self) -> dict:
        return {name: 1e3 * s / max(self.steps, 1) for name, s in self.seconds.items()}
