"""GPT-XL's forward pass in numpy float64, written from the Transformer-XL paper (Dai et al.
2019, §3.2 the segment-level recurrence, §3.3 the relative positional encodings), not from
torch_impl/gpt_xl.py: the oracle both backends' GPT-XL are held to (tests/test_gpt_xl_reference.py).

The paper's equations, with our model's choices (taichu/families/gpt_xl.py) in brackets:

- Memory (§3.2): layer n attends over h~ = [SG(m^{n-1}) ; h^{n-1}], its *input* hidden states
  of the previous positions followed by the segment's; the next segment's memory is the
  last M positions of that concatenation.
- Relative attention (§3.3), for query i and key j at distance i - j (positions counted over
  [memory ; segment]):
      A_ij = (W_q h_i)^T (W_kE h~_j)        (a) content
           + (W_q h_i)^T (W_kR R_{i-j})     (b) content-dependent position
           + u^T (W_kE h~_j)                (c) global content bias
           + v^T (W_kR R_{i-j})             (d) global position bias
  [per head, scaled by 1/sqrt(head_dim) as the paper's code; q, k, v projections with the
  config's bias, W_kR none; u, v per layer and head.]
- R_d: the sinusoid of Vaswani et al. for the distance d, sines of d * 10000^(-2k/width) in
  the first half, cosines in the second (the paper's code's layout).
- [Pre-LN blocks as our GPT: x + attn(ln_1 x) with keys and values ln_1 of the memory and of
  the segment, then x + mlp(ln_2 x); final LayerNorm and the output projection tied to the
  token embedding.]
- [Visibility by document ids: key j is seen by query i iff j is not after i and both have
  the same document id, -1 (padding, empty memory slots) seen by no query. A query with no
  visible key (a padding position) has no defined output: its attention output is NaN, so a
  test comparing it, or a real query that read it, fails loudly.]

Everything is a plain loop over (batch, head, query, key) with the distance i - j written
out: no shift trick, no batched masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

NO_DOCUMENT = -1


def sinusoid(distance: float, width: int) -> np.ndarray:
    """R_distance, [width]: sin(distance * f_k) for k < width / 2, then cos(distance * f_k),
    f_k = 10000^(-2k / width)."""
    frequencies = 10000.0 ** (-np.arange(0, width, 2, dtype=np.float64) / width)
    angles = float(distance) * frequencies
    return np.concatenate([np.sin(angles), np.cos(angles)])


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * weight + bias


def _activation(name, x):
    if name == "gelu":
        return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))
    if name == "gelu_new":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    if name == "relu":
        return np.maximum(x, 0.0)
    raise ValueError(f"unknown activation {name!r}")


def _linear(x, weights, name):
    """x W^T + b with torch's [out, in] layout; no bias if the state has none."""
    y = x @ weights[f"{name}.weight"].T
    bias = weights.get(f"{name}.bias")
    return y if bias is None else y + bias


@dataclass
class ReferenceOutput:
    logits: np.ndarray               # [batch, length, vocab]
    memories: list                   # per layer [batch, memory length, hidden]; [] without memory
    memory_document_ids: np.ndarray | None
    final_hidden: np.ndarray         # ln_f of the last layer's output, [batch, length, hidden]


def _attention(weights, prefix, config, h, context, query_documents, key_documents, encodings):
    """Relative attention of one layer for one batch row: h [length, hidden] (ln_1 of the
    segment), context [total, hidden] (ln_1 of memory and segment); query i sits at position
    total - length + i of the context."""
    m = config.model
    heads, head_dim = m.num_heads, m.head_dim
    length, total = h.shape[0], context.shape[0]
    q = _linear(h, weights, f"{prefix}.q_proj").reshape(length, heads, head_dim)
    k = _linear(context, weights, f"{prefix}.k_proj").reshape(total, heads, head_dim)
    v = _linear(context, weights, f"{prefix}.v_proj").reshape(total, heads, head_dim)
    w_r = weights[f"{prefix}.r_proj.weight"]
    u = weights[f"{prefix}.content_bias"]      # [heads, head_dim]
    v_bias = weights[f"{prefix}.position_bias"]
    # W_kR R_d for each distance d that occurs (0 .. total - 1), per head.
    projected_r = {d: (w_r @ encodings(d, m.hidden_size)).reshape(heads, head_dim) for d in range(total)}
    scale = 1.0 / math.sqrt(head_dim)
    out = np.full((length, heads, head_dim), np.nan)
    for i in range(length):
        position_i = total - length + i
        visible = [j for j in range(total)
                   if j <= position_i and query_documents[i] != NO_DOCUMENT
                   and key_documents[j] == query_documents[i]]
        if not visible:
            continue
        for n in range(heads):
            scores = []
            for j in visible:
                r = projected_r[position_i - j][n]         # W_kR R_{i-j}, head n
                a = q[i, n] @ k[j, n]                       # (a)
                b = q[i, n] @ r                             # (b)
                c = u[n] @ k[j, n]                          # (c)
                d = v_bias[n] @ r                           # (d)
                scores.append((a + b + c + d) * scale)
            scores = np.array(scores)
            probs = np.exp(scores - scores.max())
            probs /= probs.sum()
            out[i, n] = sum(p * v[j, n] for p, j in zip(probs, visible))
    return _linear(out.reshape(length, heads * head_dim), weights, f"{prefix}.out_proj")


def reference_forward(weights: dict, config, input_ids, document_ids=None, memories=None,
                      memory_document_ids=None, encodings=sinusoid) -> ReferenceOutput:
    """GPT-XL on one segment, float64.

    weights: canonical arrays (taichu.api.state_dict); input_ids, document_ids [batch,
    length] (document ids default to 0, one document); memories: per layer [batch, M,
    hidden], oldest first, with memory_document_ids [batch, M] (-1: empty slot), or None.
    The new memories (M > 0) are the last M positions of [memory ; layer input].
    ``encodings(distance, width)``: R, the paper's sinusoid unless given.
    """
    m = config.model
    w = {name: np.asarray(array, np.float64) for name, array in weights.items()}
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    document_ids = np.zeros_like(input_ids) if document_ids is None else np.asarray(document_ids)
    has_memory = memories is not None and len(memories) > 0
    memory_length = memories[0].shape[1] if has_memory else 0
    if has_memory:
        memories = [np.asarray(mem, np.float64) for mem in memories]
        key_documents = np.concatenate([np.asarray(memory_document_ids), document_ids], axis=1)
    else:
        key_documents = document_ids

    x = w["embed_tokens.weight"][input_ids]                  # [batch, length, hidden]
    new_memories = []
    for n in range(m.num_layers):
        p = f"layers.{n}"
        context_raw = np.concatenate([memories[n], x], axis=1) if has_memory else x
        if has_memory:
            new_memories.append(context_raw[:, context_raw.shape[1] - memory_length:].copy())
        ln_1 = lambda t: _layer_norm(t, w[f"{p}.ln_1.weight"], w[f"{p}.ln_1.bias"], m.layer_norm_eps)
        attended = np.stack([
            _attention(w, f"{p}.attn", config, ln_1(x[b]), ln_1(context_raw[b]), document_ids[b],
                       key_documents[b], encodings)
            for b in range(batch)])
        x = x + attended
        h = _layer_norm(x, w[f"{p}.ln_2.weight"], w[f"{p}.ln_2.bias"], m.layer_norm_eps)
        x = x + _linear(_activation(m.activation, _linear(h, w, f"{p}.mlp.fc_in")), w, f"{p}.mlp.fc_out")
    final = _layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], m.layer_norm_eps)
    logits = final @ w["embed_tokens.weight"].T
    new_documents = key_documents[:, key_documents.shape[1] - memory_length:].copy() if has_memory else None
    return ReferenceOutput(logits, new_memories, new_documents, final)
