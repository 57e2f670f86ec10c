"""GPT-XL in PyTorch (taichu/families/gpt_xl.py), mirrored by mindspore_impl/gpt_xl.py.

The GPT's pre-LN blocks (its MLP, LayerNorms, initialisation and tied output projection)
with Transformer-XL's relative positional attention over [memory ; segment]. The memory
of a layer is its input hidden states at the previous positions, detached.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families.gpt_xl import NO_DOCUMENT, GPTXLConfig, check_inputs
from torch_impl.gpt import MLP, init_gpt_weights


class RelativeAttention(nn.Module):
    """Transformer-XL's attention (Dai et al. 2019, §3.3): for query i and key j at distance
    i - j, score = ((q_i + u) . k_j + (q_i + v) . W_r R_{i-j}) / sqrt(head_dim)."""

    def __init__(self, config: GPTXLConfig):
        super().__init__()
        m = config.model
        self.num_heads = m.num_heads
        self.head_dim = m.head_dim
        self.scale = 1.0 / math.sqrt(m.head_dim)
        self.q_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.k_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.v_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.r_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=False)
        # u and v, per head; zero at the start: the scores start as q.k + q.W_r R.
        self.content_bias = nn.Parameter(torch.zeros(m.num_heads, m.head_dim))
        self.position_bias = nn.Parameter(torch.zeros(m.num_heads, m.head_dim))
        self.out_proj = nn.Linear(m.hidden_size, m.hidden_size, bias=m.bias)
        self.attn_dropout = nn.Dropout(m.attention_dropout)
        self.resid_dropout = nn.Dropout(m.dropout)

    def forward(self, x, context, position_encodings, attention_bias):
        """x [batch, length, hidden]: the segment (queries); context [batch, total, hidden]:
        memory and segment (keys and values), total = memory + length; position_encodings
        [total, hidden]: the sinusoids of distances total - 1 .. 0; attention_bias [batch, 1,
        length, total]. All after ln_1."""
        batch, length, hidden = x.shape
        total = context.shape[1]
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(context).view(batch, total, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(batch, total, self.num_heads, self.head_dim).transpose(1, 2)
        r = self.r_proj(position_encodings).view(total, self.num_heads, self.head_dim).transpose(0, 1)
        content = torch.matmul((q + self.content_bias).transpose(1, 2), k.transpose(-1, -2))
        # [batch, heads, length, total] with column c the distance total - 1 - c, shifted so
        # that column j is key j's distance from each query.
        position = relative_shift(torch.matmul((q + self.position_bias).transpose(1, 2), r.transpose(-1, -2)))
        probs = torch.softmax((content + position) * self.scale + attention_bias, dim=-1)
        out = torch.matmul(self.attn_dropout(probs), v).transpose(1, 2).reshape(batch, length, hidden)
        return self.resid_dropout(self.out_proj(out))


def relative_shift(scores):
    """[..., length, total] with column c holding distance total - 1 - c (the same for every
    query) -> column j holding query i's distance to key j, (total - length + i) - j.

    Transformer-XL's shift (appendix B), exact for every key not after its query: prepend a
    zero column, read the [length, total + 1] rows as [total + 1, length], drop the first
    row and read the rest as [length, total]. Entry (i, j) is then entry
    (i, j + length - 1 - i) of the input: the wanted distance. Keys after the query
    (j > total - length + i) get other rows' values; the causal mask hides them.
    """
    *lead, length, total = scores.shape
    padded = F.pad(scores, (1, 0)).reshape(*lead, total + 1, length)
    return padded[..., 1:, :].reshape(*lead, length, total)


def sinusoid_encodings(total: int, width: int, dtype, device):
    """[total, width]: R of distances total - 1 .. 0 (Vaswani et al.'s sinusoids, sines in
    the first half, cosines in the second, as Transformer-XL), computed in float32."""
    distances = torch.arange(total - 1, -1, -1, dtype=torch.float32, device=device)
    inverse_frequencies = 1.0 / (10000.0 ** (torch.arange(0, width, 2, dtype=torch.float32, device=device) / width))
    angles = distances[:, None] * inverse_frequencies[None, :]
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1).to(dtype)


class Block(nn.Module):
    """The GPT's pre-LN block (ln_1, attn, ln_2, mlp) with relative attention over the
    layer's memory and the segment."""

    def __init__(self, config: GPTXLConfig):
        super().__init__()
        m = config.model
        self.ln_1 = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.attn = RelativeAttention(config)
        self.ln_2 = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, memory, position_encodings, attention_bias):
        h = self.ln_1(x)
        # LayerNorm acts per position: ln_1 of [memory ; x] is [ln_1(memory) ; h].
        context = h if memory is None else torch.cat((self.ln_1(memory), h), dim=1)
        x = x + self.attn(h, context, position_encodings, attention_bias)
        return x + self.mlp(self.ln_2(x))


class GPTXL(nn.Module):
    def __init__(self, config: GPTXLConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.dropout = nn.Dropout(m.dropout)
        self.layers = nn.ModuleList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm(m.hidden_size, eps=m.layer_norm_eps)
        init_gpt_weights(self, m)

    def forward(self, input_ids, document_ids=None, memories=None, memory_document_ids=None,
                logits_to_keep=0):
        """(logits [batch, length, vocab], new memories, new memory_document_ids).

        document_ids [batch, length]: a key is visible to a query not after it with the
        same id; -1 (NO_DOCUMENT) for padding. Default: all 0, one document.

        memories: per layer [batch, memory, hidden], that layer's input hidden states at the
        previous positions (oldest first), with memory_document_ids [batch, memory] (-1: an
        empty slot). The new memories are the last ``memory`` positions of [memory ;
        segment], detached, the same length as the ones given; with no memory given (None
        or ()), none come back: ((), None).

        logits_to_keep > 0: logits of the last that many positions only.
        """
        memory_length = memories[0].shape[1] if memories else 0
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()):
            check_inputs(self.config, tuple(input_ids.shape), int(input_ids.min()), int(input_ids.max()),
                         None if document_ids is None else tuple(document_ids.shape),
                         [tuple(mem.shape) for mem in memories or ()],
                         None if memory_document_ids is None else tuple(memory_document_ids.shape))
        batch, length = input_ids.shape
        if document_ids is None:
            document_ids = torch.zeros_like(input_ids)
        x = self.dropout(self.embed_tokens(input_ids))
        key_documents = document_ids if not memories else torch.cat((memory_document_ids, document_ids), dim=1)
        attention_bias = memory_attention_bias(document_ids, key_documents, x.dtype)
        position_encodings = sinusoid_encodings(memory_length + length, x.shape[-1], x.dtype, x.device)
        new_memories = ()
        for i, layer in enumerate(self.layers):
            # A memory of length 0 (mem_len 0 given as initial_memories) is no memory.
            memory = memories[i] if memory_length else None
            if memories:
                # The last memory_length positions of [memory ; segment] (empty at length 0).
                history = x if memory is None else torch.cat((memory, x), dim=1)
                new_memories = new_memories + (history[:, length:].detach(),)
            x = layer(x, memory, position_encodings, attention_bias)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output_logits(x)
        new_documents = key_documents[:, length:] if memories else None
        return logits, new_memories, new_documents

    def output_logits(self, x):
        """Final LayerNorm and the tied output projection: [batch, length, vocab]."""
        return F.linear(self.ln_f(x), self.embed_tokens.weight)

    def initial_memories(self, batch: int, memory_length: int | None = None):
        """(memories, memory_document_ids) of ``memory_length`` (default model.mem_len) empty
        slots: zeros, document -1, seen by no query."""
        m = self.config.model
        memory_length = m.mem_len if memory_length is None else memory_length
        weight = self.embed_tokens.weight
        memories = tuple(torch.zeros(batch, memory_length, m.hidden_size, dtype=weight.dtype, device=weight.device)
                         for _ in range(m.num_layers))
        documents = torch.full((batch, memory_length), NO_DOCUMENT, dtype=torch.long, device=weight.device)
        return memories, documents


def memory_attention_bias(query_documents, key_documents, dtype):
    """[batch, 1, length, total]: 0 where query i (at position total - length + i) may see
    key j (j not after it, same document, not padding), dtype-min elsewhere (finite: a
    padding query, which sees no key, gets a uniform row, not NaN)."""
    length, total = query_documents.shape[1], key_documents.shape[1]
    query_pos = torch.arange(total - length, total, device=key_documents.device).unsqueeze(1)
    key_pos = torch.arange(total, device=key_documents.device).unsqueeze(0)
    allowed = ((key_pos <= query_pos).unsqueeze(0) & (query_documents.unsqueeze(2) == key_documents.unsqueeze(1))
               & (query_documents != NO_DOCUMENT).unsqueeze(2))
    zero = torch.zeros((), dtype=dtype, device=key_documents.device)
    return torch.where(allowed.unsqueeze(1), zero, torch.finfo(dtype).min)


class DecoderForExport(nn.Module):
    """GPT-XL with flat inputs and outputs, the exported decoder's signature:
    (input_ids, document_ids, memory_document_ids, memory of each layer) -> (logits of the
    last position [batch, vocab], new memory_document_ids, new memory of each layer).
    Names and axes: export/signature_gpt_xl.py."""

    def __init__(self, model: GPTXL):
        super().__init__()
        self.model = model

    def forward(self, input_ids, document_ids, memory_document_ids, *memories):
        logits, new_memories, new_documents = self.model(input_ids, document_ids, memories,
                                                         memory_document_ids, 1)
        return (logits[:, -1], new_documents) + tuple(new_memories)


def training_loss(model, input_ids, document_ids, *memory):
    """Next-token cross-entropy of segments [batch, seq_len + 1] (inputs [:, :-1], targets
    [:, 1:]) in fp32; document_ids [batch, seq_len] of the inputs; memory: (memory_document_ids,
    memory of each layer), or () at mem_len 0. Returns (loss, *the memory the next segment of
    these rows reads) in the same order."""
    memory_document_ids, memories = (memory[0], memory[1:]) if memory else (None, ())
    logits, new_memories, new_documents = model(input_ids[:, :-1], document_ids, memories,
                                                memory_document_ids)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    if not memory:
        return (loss,)
    return (loss, new_documents) + tuple(new_memories)
