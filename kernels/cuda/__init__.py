"""CUDA implementations of `xllm::` ops; imported only when a CUDA device is used."""
