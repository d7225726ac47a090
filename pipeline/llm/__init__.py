"""Causal language models: the decoder's ONNX signature (inputs, past / present key-value caches),
its export with a KV cache, weight-only quantization and generation parity."""
