"""MindSpore backend: cells mirroring torch_impl/ file for file, class for class."""
