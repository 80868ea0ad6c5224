"""What the tests share, none of it a test: tiny models (`tiny`: jaxsink-layout models and a
word-level tokenizer, torch-free; `hf_tiny`: random transformers checkpoints), the references
(`spec_reference`: the contract in NumPy; `torch_reference`: its PyTorch loop;
`published_models`: Qwen v1 and BTLM from their published code), the family case table and
its checks (`families`, `family_checks`), and the scripts the multi-device tests run in a
child process (`python -m tests.support.sharded_checks`, `tests.support.quantized_sharded`)."""
