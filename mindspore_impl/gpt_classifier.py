"""The Chinese GPT with a sequence-classification head in MindSpore (taichu.families.
gpt_classifier), mirrored by torch_impl/gpt_classifier.py; Hugging Face's
GPT2ForSequenceClassification. The decoder is mindspore_impl.gpt's, imported."""
from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, initializer

from taichu.families.gpt import check_inputs
from taichu.families.gpt_classifier import GPTClassifierConfig
from mindspore_impl.gpt import GPT, cross_entropy


class GPTForSequenceClassification(GPT):
    """The GPT's decoder and ``score`` [num_labels, hidden] (no bias) on the final hidden
    state of each row's last real token. The tied output projection is not used."""

    def __init__(self, config: GPTClassifierConfig):
        super().__init__(config)
        m = config.model
        self.score = nn.Dense(m.hidden_size, m.num_labels, has_bias=False)
        self.score.weight.set_data(initializer(Normal(sigma=m.initializer_range), self.score.weight.shape,
                                               self.score.weight.dtype))   # HF's init

    def __call__(self, input_ids, attention_mask=None):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        ids = input_ids.asnumpy()
        check_inputs(self.config, tuple(ids.shape), int(ids.min()), int(ids.max()), 0,
                     None if attention_mask is None else tuple(attention_mask.shape))
        return nn.Cell.__call__(self, input_ids, attention_mask)

    def construct(self, input_ids, attention_mask=None):
        """Logits [batch, num_labels] (fp32). attention_mask [batch, length]: 1 for real
        tokens, 0 for padding (right or left); None: every token is real."""
        x = self.decode(input_ids, attention_mask)[0]
        return self.score(pool_last_token(self.ln_f(x), attention_mask)).astype(ms.float32)


def pool_last_token(hidden, attention_mask):
    """hidden [batch, length, width] at each row's last position whose mask is 1 (the last
    position without a mask) -> [batch, width]: HF's argmax over position * mask."""
    if attention_mask is None:
        return hidden[:, -1]
    positions = ops.arange(hidden.shape[1], dtype=ms.int32)
    last = (positions * attention_mask.astype(ms.int32)).argmax(axis=-1).astype(ms.int32)
    # MindSpore idiom: a batched Gather (batch_dims=1) picks one row per batch entry; no
    # advanced indexing in graph mode.
    return ops.gather(hidden, last, 1, batch_dims=1)


def training_loss(model, input_ids, attention_mask, labels):
    """Mean cross-entropy of the labels [batch] (int); returns (loss, logits) so that
    validation counts what the model got right (taichu.task_data's eval metrics)."""
    logits = model(input_ids, attention_mask)
    return cross_entropy(logits, labels.astype(ms.int32)), logits
