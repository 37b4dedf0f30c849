"""Digital twin of a GPU (seen through NVML) and of TensorRT-LLM's in-flight-batching executor.

Pure Python: lets the whole system run, be tested and be evaluated without a GPU.
"""
