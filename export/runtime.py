"""Running an exported GPT with ONNX Runtime: a decoder step and a text generator.

Needs only numpy, onnxruntime and sentencepiece (no torch, no mindspore): this is what a
deployment installs. Sampling is taichu.generate's, so the same seed gives the same tokens
here as with the PyTorch and MindSpore models.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.signature import input_names, output_names, position_ids
from taichu.generate import SamplingConfig, generate_ids

MODEL_FILE = "model.onnx"
INT8_FILE = "model_int8.onnx"
INFO_FILE = "export_info.json"
TOKENIZER_FILE = "tokenizer.model"


def resolve_onnx(path: str | Path) -> tuple[Path, Path]:
    """(model file, export directory) for an export directory or a .onnx file in one."""
    path = Path(path)
    file = path / MODEL_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no ONNX model here (make one with `taichu export MODEL_DIR "
                                f"--format onnx --out DIR`)")
    return file, file.parent


def read_export_info(directory: Path) -> dict:
    info = directory / INFO_FILE
    if not info.is_file():
        raise FileNotFoundError(f"{info} not found: the directory was not written by taichu export")
    return json.loads(info.read_text(encoding="utf-8"))


class OnnxDecoder:
    """One ONNX Runtime session of the decoder; ``step`` is what taichu.generate drives."""

    def __init__(self, path: str | Path, threads: int = 0):
        import onnxruntime as ort

        self.path, _ = resolve_onnx(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.num_layers = (len(inputs) - 3) // 2
        if sorted(inputs) != sorted(input_names(self.num_layers)):
            raise ValueError(f"{self.path}: inputs {sorted(inputs)} are not a taichu GPT decoder's "
                             f"({input_names(self.num_layers)[:4]} ...)")
        _, self.num_heads, _, self.head_dim = inputs["past_key_values.0.key"].shape
        self.vocab_size = self.session.get_outputs()[0].shape[2]
        self.output_names = output_names(self.num_layers)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.num_heads, 0, self.head_dim), np.float32)
                for _ in range(2 * self.num_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past):
        """Last-position logits [batch, vocab] and the new cache (a list of arrays)."""
        if input_ids.min() < 0 or input_ids.max() >= self.vocab_size:
            bad = input_ids.min() if input_ids.min() < 0 else input_ids.max()
            raise ValueError(f"token id {bad} is out of range for vocab_size {self.vocab_size}")
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids(attention_mask, input_ids.shape[1])}
        feeds.update(zip(input_names(self.num_layers)[3:], past))
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0][:, -1], outputs[1:]


class OnnxGenerator:
    """Text generation from an export directory (``taichu export ... --format onnx``).

    >>> generator = OnnxGenerator("exported/")           # or "exported/model_int8.onnx"
    >>> generator.generate(["中国人民"], max_new_tokens=20, temperature=0)
    """

    def __init__(self, path: str | Path, threads: int = 0):
        from taichu.tokenizer import Tokenizer

        file, directory = resolve_onnx(path)
        self.info = read_export_info(directory)
        self.decoder = OnnxDecoder(file, threads)
        tokenizer = directory / TOKENIZER_FILE
        if not tokenizer.is_file():
            raise FileNotFoundError(f"{tokenizer} not found: generation needs the model's tokenizer "
                                    f"(export a model directory that has one)")
        self.tokenizer = Tokenizer(tokenizer)
        self.max_positions = self.info["max_position_embeddings"]

    def generate_ids(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[list[int]]:
        return generate_ids(self.decoder.step, prompts, sampling, self.tokenizer.eos_id,
                            self.tokenizer.pad_id, self.max_positions)

    def generate(self, prompts: list[str], **sampling) -> list[str]:
        """Continuations of ``prompts``; keyword arguments are taichu.generate.SamplingConfig's."""
        encoded = [self.tokenizer.encode(p, add_bos=True) for p in prompts]
        ids = self.generate_ids(encoded, SamplingConfig(**sampling))
        return [self.tokenizer.decode(row) for row in ids]
