"""The tri-modal space in PyTorch (design.md §2.5), mirrored by mindspore_impl/trimodal.py.

CLIP's image and text towers (torch_impl/clip.py) and the wav2vec 2.0 backbone
(torch_impl/wav2vec2.py), imported, not copied; each projected into one space. The speech
tower's vector is the mean of its last hidden states over the clip's real frames
(wav2vec2.mean_over_frames). taichu/families/trimodal.py says what the loss does with
batches that lack a modality.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from taichu.families.clip import MAX_LOGIT_SCALE, check_inputs as check_image_text
from taichu.families.trimodal import LOGIT_SCALES, TriModalConfig, init_std, trained
from taichu.families.wav2vec2 import check_inputs as check_audio
from torch_impl import clip, wav2vec2


class TriModal(nn.Module):
    def __init__(self, config: TriModalConfig):
        super().__init__()
        m = config.model
        self.config = config
        # wav2vec2's layers read config.model: the speech tower's section stands in for it.
        self.speech_config = SimpleNamespace(model=m.speech)
        self.text_model = clip.TextTransformer(config)
        self.vision_model = clip.VisionTransformer(config)
        self.wav2vec2 = wav2vec2.Wav2Vec2Model(self.speech_config)
        self.visual_projection = nn.Linear(m.image.hidden_size, m.projection_dim, bias=False)
        self.text_projection = nn.Linear(m.text.hidden_size, m.projection_dim, bias=False)
        self.speech_projection = nn.Linear(m.speech.hidden_size, m.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(m.logit_scale_init))
        self.text_speech_logit_scale = nn.Parameter(torch.tensor(m.logit_scale_init))
        self.image_speech_logit_scale = nn.Parameter(torch.tensor(m.logit_scale_init))
        self.pair_weights = tuple(float(w) for w in m.pair_weights.as_tuple())
        self._init_weights()
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(trained(name, config))

    def _init_weights(self):
        clip.init_towers(self, self.config, init_std, skip=("wav2vec2",))
        wav2vec2.init_backbone(self.wav2vec2, self.config.model.speech)

    def _checking(self) -> bool:
        return not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())

    def get_image_features(self, pixel_values):
        """Projected image embeddings [batch, projection_dim], not normalised (as CLIP's)."""
        if self._checking():
            check_image_text(self.config, pixel_shape=tuple(pixel_values.shape))
        return self.visual_projection(self.vision_model(pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        """Projected text embeddings [batch, projection_dim]; right-padded ids as CLIP's."""
        if self._checking():
            check_image_text(self.config, input_ids=input_ids.detach().cpu().numpy(),
                             attention_mask=None if attention_mask is None
                             else attention_mask.detach().cpu().numpy())
        return self.text_projection(self.text_model(input_ids, attention_mask))

    def get_speech_features(self, input_values, attention_mask=None):
        """Projected speech embeddings [batch, projection_dim]: the mean of the last hidden
        states over each clip's real frames. input_values [batch, samples] normalised per
        clip; attention_mask [batch, samples], 1 = real sample, right-padded."""
        if self._checking():
            check_audio(self.speech_config, tuple(input_values.shape),
                        None if attention_mask is None else attention_mask.detach().cpu().numpy(),
                        str(input_values.dtype))
        hidden, _, _, frame_mask = self.wav2vec2(input_values, attention_mask)
        return self.speech_projection(wav2vec2.mean_over_frames(hidden, frame_mask))

    def forward(self, pixel_values, input_ids, attention_mask, input_values, audio_mask):
        """The three L2-normalised embeddings (image, text, speech), [batch, projection_dim]
        each, of a batch whose every row has all three inputs (rows without a modality
        carry placeholders; training_loss leaves them out)."""
        image = self.visual_projection(self.vision_model(pixel_values))
        text = self.text_projection(self.text_model(input_ids, attention_mask))
        hidden, _, _, frame_mask = self.wav2vec2(input_values, audio_mask)
        speech = self.speech_projection(wav2vec2.mean_over_frames(hidden, frame_mask))
        return _normalise(image), _normalise(text), _normalise(speech)


def _normalise(x):
    return x / x.pow(2).sum(dim=-1, keepdim=True).sqrt()


def pair_loss(a, b, logit_scale, valid):
    """CLIP's symmetric contrastive loss over the rows where ``valid`` (float [n], 1 = the row
    has both modalities): those rows are the only queries and the only candidates; row i's
    answer is column i. 0 when no row is valid.

    Columns are left out by subtracting 1e9 from their logits (exp underflows to 0 in
    float32, the same in both backends) rather than a select, so one graph serves every
    pattern of missing rows."""
    logits = torch.matmul(a, b.T) * logit_scale.exp()
    penalty = (1.0 - valid) * 1e9
    diagonal = torch.diagonal(logits)
    a_to_b = torch.logsumexp(logits - penalty.unsqueeze(0), dim=1) - diagonal
    b_to_a = torch.logsumexp(logits.T - penalty.unsqueeze(0), dim=1) - diagonal
    count = valid.sum()
    return ((a_to_b + b_to_a) * 0.5 * valid).sum() / torch.clamp(count, min=1.0)


def training_loss(model, pixel_values, input_ids, attention_mask, input_values, audio_mask, present):
    """(total,): each pair's contrastive loss over the rows that have both of its
    modalities (present [batch, 3] float: image, text, speech), weighted by
    model.pair_weights (pair_losses gives the terms)."""
    terms = pair_losses(model, pixel_values, input_ids, attention_mask, input_values, audio_mask, present)
    return (sum(w * t for w, t in zip(model.pair_weights, terms)),)


def pair_losses(model, pixel_values, input_ids, attention_mask, input_values, audio_mask, present):
    """(image-text, text-speech, image-speech) contrastive losses, taichu.families.trimodal.PAIRS
    order."""
    embeddings = [e.float() for e in model(pixel_values, input_ids, attention_mask, input_values, audio_mask)]
    terms = []
    for (i, j), name in zip(((0, 1), (1, 2), (0, 2)), LOGIT_SCALES):
        terms.append(pair_loss(embeddings[i], embeddings[j], getattr(model, name),
                               present[:, i] * present[:, j]))
    return tuple(terms)


@torch.no_grad()
def after_step(model, *outputs):
    """OpenAI CLIP's clip of every pair's temperature (logits never scaled past 100)."""
    for name in LOGIT_SCALES:
        getattr(model, name).clamp_(0.0, MAX_LOGIT_SCALE)

