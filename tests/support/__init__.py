"""What the tests share, none of it a test: tiny models (`tiny`: jaxsink-layout models, the
block-quantizable `block_config`, and a word-level tokenizer, torch-free; `hf_tiny`: random
transformers configs, models and checkpoints; `gguf_files`: GGUF files written as llama.cpp
writes them, and the check that a converted tokenizer encodes like transformers'), the
references (`spec_reference`: the contract in NumPy; `torch_reference`: its PyTorch loop;
`published_models`: Qwen v1 and BTLM from their published code), the family case table and
its checks (`families`, `family_checks`), a `jaxsink serve` process and its metrics (`served`),
the headless Chromium of the browser tests (`chromium`), what the tests load from scripts/
(`scripts`: `chromium` and `torch_reference` are those files), and the scripts the multi-device tests
run in a child process (`python -m tests.support.sharded_checks`,
`tests.support.quantized_sharded`). No test module imports another (tests/test_imports.py)."""
