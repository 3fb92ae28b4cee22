"""Weight (and activation) quantization of the decoder's linear layers: the schemes and the
one place their matmul path is chosen (`scheme.py`), the FP8 and int8 number formats
(`fp8.py`, `int8.py`), the quantized linear layer (`quantized_linear.py`) and the
pre-quantized checkpoint formats of config.json's `quantization_config` (`checkpoint_formats.py`)."""
