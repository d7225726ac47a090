"""Static int8 quantization: the recipe (what to quantize), the QDQ rewrite, mixed precision, speed."""
