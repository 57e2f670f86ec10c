"""PyTorch backend: modules mirroring mindspore_impl/ file for file, class for class."""
