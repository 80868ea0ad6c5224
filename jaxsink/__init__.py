"""jaxsink: endless LLM streams with constant memory (attention sinks / StreamingLLM) in JAX."""

from jaxsink.config import ConfigError, JaxsinkError, ModelConfig, StreamConfig
from jaxsink.generate import Generation, Sampling, generate
from jaxsink.loading import Model, load
from jaxsink.traced.cache import KVCache, init_cache
from jaxsink.traced.decoder import Decoder
from jaxsink.traced.entry import forward, last_logits, logits, step

__all__ = [
    "ConfigError",
    "Decoder",
    "Generation",
    "JaxsinkError",
    "KVCache",
    "Model",
    "ModelConfig",
    "Sampling",
    "StreamConfig",
    "forward",
    "generate",
    "init_cache",
    "last_logits",
    "load",
    "logits",
    "step",
]
