"""A tiny Llama-architecture decoder trained here on the Python standard library's source (the causal LM case)."""
