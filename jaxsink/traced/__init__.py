"""Everything that runs under `jit`: the cache and its contract arithmetic (`cache`), RoPE
(`rope`), the attention view (`view`), attention and its bodies (`attention`), eviction by
attention (`policy`), the quantized product (`quant`), the layers without a cache (`layers`),
the decoder (`decoder`), sampling (`sampling`), the model's entry points (`entry`) and the
batch-of-rows steps (`rows`).

It imports nothing of jaxsink's but `jaxsink.config` (the import contracts in pyproject.toml
say so): the host side (loading, the engine's scheduling, the faces) sits above it.
"""
