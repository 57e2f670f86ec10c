from setuptools import find_packages, setup

# Pins are the ones that break when loose: an unpinned torch pulls a multi-GB CUDA
# build, mindspore 2.10 and parts of onnx need numpy 1.x, and ml_dtypes must fit both.
EXTRAS = {
    "mindspore": ["mindspore==2.10.0"],
    "torch": ["torch==2.13.0"],
    # onnxscript: torch.onnx's dynamo exporter, the one export/onnx_export.py uses.
    "onnx": ["onnx", "onnxruntime", "onnxscript"],
    # scikit-learn: the handwritten digits image-text data (1.9.1 works with numpy<2).
    "data": ["snownlp", "scikit-learn"],
    # faiss: the vector index of `taichu search` (an exact numpy search is the fallback).
    "index": ["faiss-cpu"],
    # tokenizers + protobuf: the tokenizer.json written beside Hugging Face weights
    # (taichu/convert/hf_tokenizer.py; protobuf reads the SentencePiece model's settings).
    "hf": ["tokenizers", "protobuf"],
    # The speech family (taichu/speech.py): libespeak-ng and its Mandarin voice as a wheel
    # (offline synthesis), tone-numbered pinyin, resampling, wav/flac I/O, error rates.
    "speech": ["espeakng-loader", "pypinyin", "soxr", "soundfile", "jiwer"],
    # Captioning metrics of `taichu.m6_eval`: BLEU (sacrebleu) and CIDEr (pycocoevalcap's
    # pure-Python scorer).
    "eval": ["sacrebleu", "pycocoevalcap"],
    "dev": ["pytest", "transformers"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})

setup(
    name="taichu",
    version="0.1.0",
    description="Zidong Taichu / WenLan / M6 Chinese multimodal models in MindSpore and PyTorch",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["taichu", "taichu.*", "torch_impl", "torch_impl.*",
                                    "mindspore_impl", "mindspore_impl.*", "export", "export.*"]),
    install_requires=["numpy<2", "ml_dtypes>=0.5.4,<0.6", "pyyaml", "pydantic>=2", "safetensors", "sentencepiece",
                      "pillow", "tqdm", "matplotlib"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["taichu=taichu.cli:main"]},
)
