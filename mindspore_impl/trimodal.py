"""The tri-modal space in MindSpore (design.md §2.5), mirrored by torch_impl/trimodal.py.

CLIP's image and text towers (mindspore_impl/clip.py) and the wav2vec 2.0 backbone
(mindspore_impl/wav2vec2.py), imported, not copied; each projected into one space. The
speech tower's vector is the mean of its last hidden states over the clip's real frames
(wav2vec2.mean_over_frames). taichu/families/trimodal.py says what the loss does with
batches that lack a modality.

Attribute paths equal the PyTorch module's, so canonical weight names differ only in the
leaves that taichu/weights.py maps (gamma/beta, embedding_table, 4-D conv weights).
MindSpore idioms (each named where it is used): input checks run in get_*_features, outside
any compiled graph; frozen parameters are Parameters with requires_grad=False, so the
trainer's trainable_params() leaves them out (torch: requires_grad_(False)); after_step
writes the temperatures in place (ops.assign); token ids are int32 (MindSpore's CPU Gather).
"""
from __future__ import annotations

from types import SimpleNamespace

import mindspore as ms
from mindspore import nn, ops

from taichu.families.clip import MAX_LOGIT_SCALE, check_inputs as check_image_text
from taichu.families.trimodal import LOGIT_SCALES, TriModalConfig, init_std, trained
from taichu.families.wav2vec2 import check_inputs as check_audio
from mindspore_impl import clip, wav2vec2
from mindspore_impl.gpt import Dense
from mindspore_impl.train import _to_float32
from mindspore_impl.weights import canonical_parameters


class TriModal(nn.Cell):
    def __init__(self, config: TriModalConfig):
        super().__init__()
        m = config.model
        self.config = config
        # wav2vec2's layers read config.model: the speech tower's section stands in for it.
        self.speech_config = SimpleNamespace(model=m.speech)
        self.text_model = clip.TextTransformer(config)
        self.vision_model = clip.VisionTransformer(config)
        self.wav2vec2 = wav2vec2.Wav2Vec2Model(self.speech_config)
        self.visual_projection = Dense(m.image.hidden_size, m.projection_dim, has_bias=False)
        self.text_projection = Dense(m.text.hidden_size, m.projection_dim, has_bias=False)
        self.speech_projection = Dense(m.speech.hidden_size, m.projection_dim, has_bias=False)
        self.logit_scale = ms.Parameter(ms.Tensor(m.logit_scale_init, ms.float32), name="logit_scale")
        self.text_speech_logit_scale = ms.Parameter(ms.Tensor(m.logit_scale_init, ms.float32),
                                                    name="text_speech_logit_scale")
        self.image_speech_logit_scale = ms.Parameter(ms.Tensor(m.logit_scale_init, ms.float32),
                                                     name="image_speech_logit_scale")
        self.pair_weights = tuple(float(w) for w in m.pair_weights.as_tuple())
        self._init_weights()
        # MindSpore idiom: requires_grad=False keeps a parameter out of trainable_params(),
        # what the trainer optimises. trained() reads canonical names.
        for name, (parameter, _) in canonical_parameters(self).items():
            parameter.requires_grad = trained(name, config)

    def _init_weights(self):
        clip.init_towers(self, self.config, init_std, skip=("wav2vec2",))
        wav2vec2.init_backbone(self.wav2vec2, self.config.model.speech)

    # Value checks run in get_*_features, outside construct: graph mode cannot raise on
    # tensor values (torch's _checking() skips them while tracing or exporting instead).

    def get_image_features(self, pixel_values):
        """Projected image embeddings [batch, projection_dim], not normalised (as CLIP's)."""
        check_image_text(self.config, pixel_shape=tuple(pixel_values.shape))
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        """Projected text embeddings [batch, projection_dim]; right-padded int32 ids as CLIP's."""
        check_image_text(self.config, input_ids=input_ids.asnumpy(),
                         attention_mask=None if attention_mask is None else attention_mask.asnumpy())
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def get_speech_features(self, input_values, attention_mask=None):
        """Projected speech embeddings [batch, projection_dim]: the mean of the last hidden
        states over each clip's real frames. input_values [batch, samples] normalised per
        clip; attention_mask [batch, samples], 1 = real sample, right-padded."""
        # MindSpore names dtypes "Float32": lower-cased for check_inputs' "float" test.
        check_audio(self.speech_config, tuple(input_values.shape),
                    None if attention_mask is None else attention_mask.asnumpy(),
                    str(input_values.dtype).lower())
        hidden, _, _, frame_mask = self.wav2vec2(input_values, attention_mask)
        return self.speech_projection(wav2vec2.mean_over_frames(hidden, frame_mask))

    def construct(self, pixel_values, input_ids, attention_mask, input_values, audio_mask):
        """The three L2-normalised embeddings (image, text, speech), [batch, projection_dim]
        each, of a batch whose every row has all three inputs (rows without a modality
        carry placeholders; training_loss leaves them out)."""
        image = self.visual_projection(self.vision_model(pixel_values))
        text = self.text_projection(self.text_model(input_ids, attention_mask))
        # Indexed, not unpacked into _: graph mode warns of "side effect nodes eliminated by
        # mistake" for unpacked outputs nobody reads (mindspore_impl/wav2vec2.py's reason).
        encoded = self.wav2vec2(input_values, audio_mask)
        speech = self.speech_projection(wav2vec2.mean_over_frames(encoded[0], encoded[3]))
        return _normalise(image), _normalise(text), _normalise(speech)


def _normalise(x):
    return x / ops.sqrt(ops.pow(x, 2).sum(axis=-1, keepdims=True))


def pair_loss(a, b, logit_scale, valid):
    """CLIP's symmetric contrastive loss over the rows where ``valid`` (float [n], 1 = the row
    has both modalities): those rows are the only queries and the only candidates; row i's
    answer is column i. 0 when no row is valid.

    Columns are left out by subtracting 1e9 from their logits (exp underflows to 0 in
    float32, the same in both backends) rather than a select, so one graph serves every
    pattern of missing rows."""
    logits = ops.matmul(a, b.T) * ops.exp(logit_scale)
    penalty = (1.0 - valid) * 1e9
    diagonal = ops.diagonal(logits)
    a_to_b = ops.logsumexp(logits - penalty.expand_dims(0), 1) - diagonal
    b_to_a = ops.logsumexp(logits.T - penalty.expand_dims(0), 1) - diagonal
    count = valid.sum()
    return ((a_to_b + b_to_a) * 0.5 * valid).sum() / ops.clamp(count, min=1.0)


def training_loss(model, pixel_values, input_ids, attention_mask, input_values, audio_mask, present):
    """(total,): each pair's contrastive loss over the rows that have both of its
    modalities (present [batch, 3] float: image, text, speech), weighted by
    model.pair_weights (pair_losses gives the terms). No input checks: this runs inside a
    compiled graph, and the trainer's batches are checked where they are made."""
    terms = pair_losses(model, pixel_values, input_ids, attention_mask, input_values, audio_mask, present)
    # Written out: graph mode has no sum() over a generator (torch's form).
    weights = model.pair_weights
    return (weights[0] * terms[0] + weights[1] * terms[1] + weights[2] * terms[2],)


def pair_losses(model, pixel_values, input_ids, attention_mask, input_values, audio_mask, present):
    """(image-text, text-speech, image-speech) contrastive losses, taichu.families.trimodal.PAIRS
    order."""
    outputs = model(pixel_values, input_ids, attention_mask, input_values, audio_mask)
    embeddings = (_to_float32(outputs[0]), _to_float32(outputs[1]), _to_float32(outputs[2]))
    terms = ()
    for (i, j), name in zip(((0, 1), (1, 2), (0, 2)), LOGIT_SCALES):
        terms = terms + (pair_loss(embeddings[i], embeddings[j], getattr(model, name),
                                   present[:, i] * present[:, j]),)
    return terms


def after_step(model, *outputs):
    """OpenAI CLIP's clip of every pair's temperature (logits never scaled past 100). In
    place (ops.assign): set_data would give a temperature a new buffer that graphs compiled
    earlier never read (design.md §4)."""
    for name in LOGIT_SCALES:
        scale = getattr(model, name)
        ops.assign(scale, ops.clamp(scale, 0.0, MAX_LOGIT_SCALE))
