"""Using a wav2vec 2.0 model: transcribe audio (CTC head), embed utterances, measure errors.

``SpeechRunner`` runs a model directory in MindSpore or PyTorch, or an export's graphs
(ONNX Runtime, MINDIR) handed in by the caller (the CLI builds them with export.runtime;
taichu/ never imports export/). The audio of every backend goes through the same numpy
preparation (taichu.speech_batches.normalise, zero padding, a sample mask) and the same
greedy CTC decoding (taichu.speech.decode_ids), so only the network differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from taichu.families.wav2vec2 import frame_count, receptive_field
from taichu.speech_batches import normalise

BACKENDS = ("torch", "mindspore", "onnx", "mindir")


class SpeechRunner:
    """Batches clips (16 kHz float32 arrays) through a wav2vec 2.0 network.

    ``network``, when given, maps (input_values [B, L] float32, attention_mask [B, L] int64)
    to a dict with "logits" (CTC head) and/or "embedding" numpy arrays: what an export's
    runtime provides. Otherwise the model directory is loaded in ``backend``.

    A "group"-norm feature encoder normalises over the whole padded clip, so its output
    depends on the padding (as in Hugging Face and fairseq); such models run one clip at a
    time, which makes a clip's result independent of its batch.
    """

    def __init__(self, model_dir, backend: str = "torch", batch_size: int = 8,
                 network: Callable | None = None, config=None):
        from taichu.config import load_config

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
        self.model_dir = Path(model_dir)
        self.config = config or load_config(self.model_dir)
        if self.config.family != "wav2vec2":
            raise ValueError(f"{self.model_dir}: a {self.config.family} model, not a speech "
                             f"(wav2vec2) model")
        self.model_config = self.config.model
        self.backend = backend
        self.batch_size = 1 if self.model_config.feat_extract_norm == "group" else max(1, batch_size)
        self.network = network or _framework_network(self.model_dir, backend)

    @property
    def has_ctc_head(self) -> bool:
        return self.model_config.head == "ctc"

    def check(self, audios: Sequence[np.ndarray], names: Sequence[str] | None = None) -> None:
        shortest = receptive_field(self.model_config)
        for i, audio in enumerate(audios):
            name = names[i] if names else f"clip {i}"
            if audio.ndim != 1:
                raise ValueError(f"{name}: expected mono audio (1-D), got shape {audio.shape}")
            if len(audio) < shortest:
                raise ValueError(f"{name}: {len(audio)} samples ({1000 * len(audio) / 16000:.1f} ms) "
                                 f"is shorter than the model's receptive field, {shortest} samples "
                                 f"({1000 * shortest / 16000:.1f} ms)")

    def _batches(self, audios: Sequence[np.ndarray]):
        """(positions, input_values, attention_mask) per batch; clips sorted by length so a
        batch pads little; results are put back in input order by the callers."""
        order = np.argsort([len(a) for a in audios], kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            clips = [normalise(audios[i]) for i in rows]
            length = max(len(c) for c in clips)
            values = np.zeros((len(rows), length), np.float32)
            mask = np.zeros((len(rows), length), np.int64)
            for r, clip in enumerate(clips):
                values[r, :len(clip)] = clip
                mask[r, :len(clip)] = 1
            yield rows, values, mask

    def logits(self, audios: Sequence[np.ndarray]) -> list[np.ndarray]:
        """CTC logits [frames, vocab] per clip (real frames only)."""
        if not self.has_ctc_head:
            raise ValueError(f"{self.model_dir}: a pretraining model has no CTC head to "
                             f"transcribe with; fine-tune it (model.head: ctc) first")
        out: list[np.ndarray | None] = [None] * len(audios)
        for rows, values, mask in self._batches(audios):
            logits = self.network(values, mask)["logits"]
            frames = frame_count(self.model_config, mask.sum(-1))
            for r, i in enumerate(rows):
                out[i] = logits[r, :frames[r]]
        return out

    def transcribe(self, audios: Sequence[np.ndarray]) -> list[str]:
        """Greedy CTC decoding (best path, repeats merged, blanks dropped) to pinyin."""
        from taichu.speech import decode_ids

        alphabet = self.model_config.ctc.alphabet
        return [decode_ids(lg.argmax(-1), alphabet) for lg in self.logits(audios)]

    def embed(self, audios: Sequence[np.ndarray]) -> np.ndarray:
        """Utterance embeddings [N, hidden]: the last hidden state averaged over real frames."""
        out = np.zeros((len(audios), self.model_config.hidden_size), np.float32)
        for rows, values, mask in self._batches(audios):
            out[rows] = self.network(values, mask)["embedding"]
        return out


def _framework_network(model_dir: Path, backend: str) -> Callable:
    """(values, mask) -> {"logits"?, "embedding"} through a model loaded in ``backend``."""
    if backend in ("onnx", "mindir"):
        raise ValueError(f"--backend {backend} runs an export directory's graphs; build them with "
                         f"export.runtime (the taichu CLI does)")
    from taichu.api import load_model

    model = load_model(model_dir, backend=backend)
    ctc = model.config.model.head == "ctc"
    # One pass of the encoder for both outputs: the embedding as Wav2Vec2.embed pools it,
    # the logits as forward projects them (lm_head; dropout is off in evaluation).
    if backend == "torch":
        import torch

        from torch_impl.wav2vec2 import mean_over_frames

        def run(values, mask):
            with torch.no_grad():
                x, m = torch.from_numpy(values), torch.from_numpy(mask)
                model._check(x, m)
                hidden, _, frame_mask, _ = model.encode(x, m)
                out = {"embedding": mean_over_frames(hidden, frame_mask).numpy()}
                if ctc:
                    out["logits"] = model.lm_head(hidden).numpy()
                return out
        return run
    import mindspore as ms

    from mindspore_impl.wav2vec2 import mean_over_frames

    def run(values, mask):
        x, m = ms.Tensor(values), ms.Tensor(mask.astype(np.int32))
        model._check(x, m)
        hidden, _, frame_mask, _ = model.encode(x, m)
        out = {"embedding": mean_over_frames(hidden, frame_mask).asnumpy()}
        if ctc:
            out["logits"] = model.lm_head(hidden).asnumpy()
        return out
    return run


def evaluate_clips(runner: SpeechRunner, clips) -> dict:
    """Syllable and character error rates of greedy transcripts against clips' pinyin."""
    from taichu.speech import error_rates

    labelled = [c for c in clips if c.pinyin]
    if not labelled:
        raise ValueError("no transcribed clips to evaluate")
    hypotheses = runner.transcribe([c.audio for c in labelled])
    rates = error_rates([c.pinyin for c in labelled], hypotheses)
    rates["examples"] = [{"reference": c.pinyin, "hypothesis": h, "source": c.source}
                         for c, h in list(zip(labelled, hypotheses))[:5]]
    return rates
