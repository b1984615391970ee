"""miniserve: a compact paged-attention LLM inference engine with a bit-exact fused FP8 KV cache."""

from miniserve.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from miniserve.config import EngineConfig
from miniserve.engine.outputs import CompletionOutput, Logprob, RequestOutput
from miniserve.llm import LLM
from miniserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "EngineConfig",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "BeamSearchParams",
    "BeamSearchOutput",
    "BeamSearchSequence",
]
__version__ = "0.1.0"
