"""A zoo of small model families the samples do not cover, to test onnxforge's conversion on.

``models`` is the catalogue (transformers configs with random weights: ViT, GPT-2, BERT with token
types, T5 and Whisper encoders; hand-written nets trained briefly on scikit-learn's digits or on
synthetic signals: ResNet bottlenecks, MobileNet blocks, GRU / LSTM, U-Net, Conv1d audio, a
multi-head net). ``jobs`` writes one onnxforge job folder per model; ``run`` converts them all
and prints what each report says per target::

    python -m benchmarks.zoo.run [--models NAME ...] [--targets cpu fpga] [--work-dir DIR] [--rerender]
"""
