"""GPT-XL in MindSpore (taichu/families/gpt_xl.py), mirrored by torch_impl/gpt_xl.py.

The GPT's pre-LN blocks (its MLP, LayerNorms, initialisation and tied output projection)
with Transformer-XL's relative positional attention over [memory ; segment]. The memory
of a layer is its input hidden states at the previous positions, without gradient.

MindSpore idioms (each also named where it is used): value checks in ``__call__``, outside
``construct``; int32 ids and document ids; the GPT's Dense, MLP and tied_logits
(mindspore_impl/gpt.py); attention in a heads-first layout, so that the position term's
encodings, shared over the batch, meet the queries in one 3-D BatchMatMul; memories a tuple
of tensors and Python branches only on shapes and None (graph mode compiles one graph per
shape); the cross-entropy as LogSoftmax + NLLLoss (mindspore_impl.gpt.cross_entropy).
"""
from __future__ import annotations

import math

import mindspore as ms
from mindspore import nn, ops

from taichu.families.gpt_xl import NO_DOCUMENT, GPTXLConfig, check_inputs
from mindspore_impl.gpt import (BATCH_MATMUL, BATCH_MATMUL_TRANSPOSE_B, MLP, SOFTMAX, Dense, _dtype_min, cross_entropy,
                                init_gpt_weights, tied_logits)


class RelativeAttention(nn.Cell):
    """Transformer-XL's attention (Dai et al. 2019, §3.3): for query i and key j at distance
    i - j, score = ((q_i + u) . k_j + (q_i + v) . W_r R_{i-j}) / sqrt(head_dim)."""

    def __init__(self, config: GPTXLConfig):
        super().__init__()
        m = config.model
        self.num_heads = m.num_heads
        self.head_dim = m.head_dim
        self.scale = 1.0 / math.sqrt(m.head_dim)
        self.q_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.k_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.v_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.r_proj = Dense(m.hidden_size, m.hidden_size, has_bias=False)
        # u and v, per head; zero at the start: the scores start as q.k + q.W_r R.
        self.content_bias = ms.Parameter(ops.zeros((m.num_heads, m.head_dim), ms.float32), name="content_bias")
        self.position_bias = ms.Parameter(ops.zeros((m.num_heads, m.head_dim), ms.float32), name="position_bias")
        self.out_proj = Dense(m.hidden_size, m.hidden_size, has_bias=m.bias)
        self.attn_dropout = nn.Dropout(p=m.attention_dropout)
        self.resid_dropout = nn.Dropout(p=m.dropout)

    def construct(self, x, context, position_encodings, attention_bias):
        """x [batch, length, hidden]: the segment (queries); context [batch, total, hidden]:
        memory and segment (keys and values), total = memory + length; position_encodings
        [total, hidden]: the sinusoids of distances total - 1 .. 0; attention_bias [batch, 1,
        length, total]. All after ln_1."""
        batch, length, hidden = x.shape
        total = context.shape[1]
        # MindSpore idiom: heads first, [heads, batch, ...] (torch: [batch, heads, ...]). The
        # position term (q + v) r^T has r [heads, total, head_dim] shared over the batch: as
        # [heads, batch * length, head_dim] x r^T it is one 3-D BatchMatMul, where a 4-D
        # ops.matmul against r would broadcast r once per batch row (BroadcastTo +
        # BatchMatMul, and a ReduceSum in backward); the content term, softmax and values stay
        # in that layout, so no scores are transposed back.
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(context).view(batch, total, self.num_heads, self.head_dim).transpose(2, 0, 1, 3)
        v = self.v_proj(context).view(batch, total, self.num_heads, self.head_dim).transpose(2, 0, 1, 3)
        r = self.r_proj(position_encodings).view(total, self.num_heads, self.head_dim).transpose(1, 0, 2)
        # MindSpore idiom: q k^T as BatchMatMul(transpose_b), k read as it is (the GPT's).
        content = BATCH_MATMUL_TRANSPOSE_B((q + self.content_bias).transpose(2, 0, 1, 3), k)
        # [heads, batch, length, total] with column c the distance total - 1 - c, shifted so
        # that column j is key j's distance from each query.
        position_queries = (q + self.position_bias).transpose(2, 0, 1, 3).reshape(self.num_heads, batch * length,
                                                                                  self.head_dim)
        position = relative_shift(BATCH_MATMUL_TRANSPOSE_B(position_queries, r).reshape(self.num_heads, batch,
                                                                                        length, total))
        # The bias [batch, 1, length, total] read as [1, batch, length, total] (a reshape, no copy).
        probs = SOFTMAX((content + position) * self.scale + attention_bias.reshape(1, batch, length, total))
        out = BATCH_MATMUL(self.attn_dropout(probs), v).transpose(1, 2, 0, 3).reshape(batch, length, hidden)
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
    lead, length, total = scores.shape[:-2], scores.shape[-2], scores.shape[-1]
    padded = ops.pad(scores, (1, 0)).reshape(lead + (total + 1, length))
    return padded[..., 1:, :].reshape(lead + (length, total))


def sinusoid_encodings(total: int, width: int, dtype):
    """[total, width]: R of distances total - 1 .. 0 (Vaswani et al.'s sinusoids, sines in
    the first half, cosines in the second, as Transformer-XL), computed in float32."""
    distances = ops.arange(total - 1, -1, -1, dtype=ms.float32)
    inverse_frequencies = 1.0 / ops.pow(10000.0, ops.arange(0, width, 2, dtype=ms.float32) / width)
    angles = distances.expand_dims(1) * inverse_frequencies.expand_dims(0)
    return ops.cat((ops.sin(angles), ops.cos(angles)), axis=-1).astype(dtype)


class Block(nn.Cell):
    """The GPT's pre-LN block (ln_1, attn, ln_2, mlp) with relative attention over the
    layer's memory and the segment."""

    def __init__(self, config: GPTXLConfig):
        super().__init__()
        m = config.model
        self.ln_1 = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.attn = RelativeAttention(config)
        self.ln_2 = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        self.mlp = MLP(config)

    def construct(self, x, memory, position_encodings, attention_bias):
        h = self.ln_1(x)
        # LayerNorm acts per position: ln_1 of [memory ; x] is [ln_1(memory) ; h].
        context = h if memory is None else ops.cat((self.ln_1(memory), h), axis=1)
        x = x + self.attn(h, context, position_encodings, attention_bias)
        return x + self.mlp(self.ln_2(x))


class GPTXL(nn.Cell):
    def __init__(self, config: GPTXLConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.embed_tokens = nn.Embedding(m.vocab_size, m.hidden_size)
        self.dropout = nn.Dropout(p=m.dropout)
        self.layers = nn.CellList([Block(config) for _ in range(m.num_layers)])
        self.ln_f = nn.LayerNorm((m.hidden_size,), epsilon=m.layer_norm_eps)
        init_gpt_weights(self, m)

    def __call__(self, input_ids, document_ids=None, memories=None, memory_document_ids=None,
                 logits_to_keep=0):
        # Value checks run here, outside construct: graph mode cannot raise on tensor values.
        ids = input_ids.asnumpy()
        check_inputs(self.config, tuple(ids.shape), int(ids.min()), int(ids.max()),
                     None if document_ids is None else tuple(document_ids.shape),
                     [tuple(mem.shape) for mem in memories or ()],
                     None if memory_document_ids is None else tuple(memory_document_ids.shape))
        # MindSpore idiom: the memories a mutable tuple (None for none): graph mode takes a
        # plain tuple of tensors as constants, compiled anew for every segment's values.
        memories = ms.mutable(tuple(memories)) if memories else None
        return super().__call__(input_ids, document_ids, memories, memory_document_ids, logits_to_keep)

    def construct(self, input_ids, document_ids=None, memories=None, memory_document_ids=None,
                  logits_to_keep=0):
        """(logits [batch, length, vocab], new memories, new memory_document_ids).

        document_ids [batch, length] int32: a key is visible to a query not after it with the
        same id; -1 (NO_DOCUMENT) for padding. Default: all 0, one document.

        memories: per layer [batch, memory, hidden], that layer's input hidden states at the
        previous positions (oldest first), with memory_document_ids [batch, memory] int32 (-1:
        an empty slot). The new memories are the last ``memory`` positions of [memory ;
        segment], without gradient, the same length as the ones given; with no memory given
        (None or ()), none come back: ((), None). A tuple: graph mode compiles one graph per
        number and shape of memories.

        logits_to_keep > 0: logits of the last that many positions only.
        """
        memory_length = memories[0].shape[1] if memories else 0
        batch, length = input_ids.shape
        if document_ids is None:
            document_ids = ops.zeros_like(input_ids)
        x = self.dropout(self.embed_tokens(input_ids))
        key_documents = document_ids if not memories else ops.cat((memory_document_ids, document_ids), axis=1)
        attention_bias = memory_attention_bias(document_ids, key_documents, x.dtype)
        position_encodings = sinusoid_encodings(memory_length + length, x.shape[-1], x.dtype)
        new_memories = ()
        # MindSpore idiom: the CellList indexed (graph mode), as the GPT.
        for i in range(len(self.layers)):
            # A memory of length 0 (mem_len 0 given as initial_memories) is no memory.
            memory = memories[i] if memory_length else None
            if memories:
                # The last memory_length positions of [memory ; segment] (empty at length 0).
                history = x if memory is None else ops.cat((memory, x), axis=1)
                # MindSpore idiom: stop_gradient for torch's detach.
                new_memories = new_memories + (ops.stop_gradient(history[:, length:]),)
            x = self.layers[i](x, memory, position_encodings, attention_bias)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.output_logits(x)
        new_documents = key_documents[:, length:] if memories else None
        return logits, new_memories, new_documents

    def output_logits(self, x):
        """Final LayerNorm and the tied output projection: [batch, length, vocab].

        MindSpore idiom: the GPT's tied_logits, a 2-D MatMul with transpose_b that reads the
        table as stored."""
        return tied_logits(self.ln_f(x), self.embed_tokens.embedding_table)

    def initial_memories(self, batch: int, memory_length: int | None = None):
        """(memories, memory_document_ids) of ``memory_length`` (default model.mem_len) empty
        slots: zeros, document -1 (int32), seen by no query."""
        m = self.config.model
        memory_length = m.mem_len if memory_length is None else memory_length
        weight = self.embed_tokens.embedding_table
        memories = tuple(ops.zeros((batch, memory_length, m.hidden_size), weight.dtype)
                         for _ in range(m.num_layers))
        documents = ops.full((batch, memory_length), NO_DOCUMENT, dtype=ms.int32)
        return memories, documents


def memory_attention_bias(query_documents, key_documents, dtype):
    """[batch, 1, length, total]: 0 where query i (at position total - length + i) may see
    key j (j not after it, same document, not padding), dtype-min elsewhere (finite: a
    padding query, which sees no key, gets a uniform row, not NaN)."""
    length, total = query_documents.shape[1], key_documents.shape[1]
    query_pos = ops.arange(total - length, total, dtype=ms.int32).expand_dims(1)
    key_pos = ops.arange(0, total, dtype=ms.int32).expand_dims(0)
    # MindSpore idiom: logical_and on the masks (torch's &).
    allowed = ops.logical_and(ops.logical_and((key_pos <= query_pos).expand_dims(0),
                                              query_documents.expand_dims(2) == key_documents.expand_dims(1)),
                              (query_documents != NO_DOCUMENT).expand_dims(2))
    zero = ops.zeros((), dtype)
    return ops.where(allowed.expand_dims(1), zero, ops.full((), _dtype_min(dtype), dtype=dtype))


class DecoderForExport(nn.Cell):
    """GPT-XL with flat inputs and outputs, the exported decoder's signature:
    (input_ids, document_ids, memory_document_ids, memory of each layer) -> (logits of the
    last position [batch, vocab], new memory_document_ids, new memory of each layer).
    Names and axes: export/signature_gpt_xl.py."""

    def __init__(self, model: GPTXL):
        # MindSpore idiom: no auto prefix. Holding the model would otherwise rename its
        # parameters ("model." + path), and its canonical state dict with them.
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, document_ids, memory_document_ids, *memories):
        logits, new_memories, new_documents = self.model(input_ids, document_ids, memories,
                                                         memory_document_ids, 1)
        return (logits[:, -1], new_documents) + tuple(new_memories)


def training_loss(model, input_ids, document_ids, *memory):
    """Next-token cross-entropy of segments [batch, seq_len + 1] (inputs [:, :-1], targets
    [:, 1:]) in fp32; document_ids [batch, seq_len] of the inputs; memory: (memory_document_ids,
    memory of each layer), or () at mem_len 0. Returns (loss, *the memory the next segment of
    these rows reads) in the same order, the memories without gradient.

    MindSpore idiom: mindspore_impl.gpt.cross_entropy (LogSoftmax + the NLLLoss primitive)
    for torch's F.cross_entropy."""
    memory_document_ids, memories = (memory[0], memory[1:]) if memory else (None, ())
    logits, new_memories, new_documents = model(input_ids[:, :-1], document_ids, memories,
                                                memory_document_ids)
    loss = cross_entropy(logits.reshape(-1, logits.shape[-1]).astype(ms.float32), input_ids[:, 1:].reshape(-1))
    if not memory:
        return (loss,)
    return (loss, new_documents) + tuple(new_memories)
