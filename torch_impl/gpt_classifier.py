"""The Chinese GPT with a sequence-classification head in PyTorch (taichu.families.
gpt_classifier), mirrored by mindspore_impl/gpt_classifier.py; Hugging Face's
GPT2ForSequenceClassification. The decoder is torch_impl.gpt's, imported."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.gpt_classifier import GPTClassifierConfig
from torch_impl.gpt import GPT


class GPTForSequenceClassification(GPT):
    """The GPT's decoder and ``score`` [num_labels, hidden] (no bias) on the final hidden
    state of each row's last real token. The tied output projection is not used."""

    def __init__(self, config: GPTClassifierConfig):
        super().__init__(config)
        m = config.model
        self.score = nn.Linear(m.hidden_size, m.num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=m.initializer_range)   # HF's init

    def forward(self, input_ids, attention_mask=None):
        """Logits [batch, num_labels] (fp32). attention_mask [batch, length]: 1 for real
        tokens, 0 for padding (right or left); None: every token is real."""
        x = self.decode(input_ids, attention_mask)[0]
        return self.score(pool_last_token(self.ln_f(x), attention_mask)).float()


def pool_last_token(hidden, attention_mask):
    """hidden [batch, length, width] at each row's last position whose mask is 1 (the last
    position without a mask) -> [batch, width]: HF's argmax over position * mask."""
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(length, device=hidden.device)
    last = (positions * attention_mask.long()).argmax(dim=-1)
    return hidden[torch.arange(batch, device=hidden.device), last]


def training_loss(model, input_ids, attention_mask, labels):
    """Mean cross-entropy of the labels [batch] (int); returns (loss, logits) so that
    validation counts what the model got right (taichu.task_data's eval metrics)."""
    logits = model(input_ids, attention_mask)
    return F.cross_entropy(logits, labels.long()), logits
