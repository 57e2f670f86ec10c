"""GPT-XL (torch_impl/gpt_xl.py, mindspore_impl/gpt_xl.py) against the float64 numpy reference
written from the Transformer-XL paper (tests/gpt_xl_reference.py): logits and memories over
consecutive segments with document changes and -1 padding, the relative shift, segments with
a memory as long as the sequence against one full pass (and a shorter memory really cut),
segments without memory, and a zero-length memory (no memory: it stays empty).

Transformers 5 has no Transformer-XL, so the reference is the only independent oracle.
Positions compared: real ones (document id >= 0). A padding query sees no key (the family's
rule), so what a backend computes there is not defined and the reference leaves it NaN; the
memory slots compared are likewise those with a document.
"""
import numpy as np
import pytest
import torch

import taichu
from taichu.api import load_state_dict
from taichu.config import load_config
from conftest import CONFIGS, perturbed_state
from gpt_xl_reference import reference_forward, sinusoid
from tolerance import U32, encoder_chain_terms, float32_tolerance
from torch_impl import gpt_xl as tx

TINY = CONFIGS / "gpt_xl" / "gpt-xl-tiny.yaml"
SEGMENT = 6
NO_DOC = -1
# Three segments of 6 for two rows. Row 0: documents 1 and 2 run across segment borders,
# each segment changes document mid-way. Row 1: left padding, one long document (16
# positions, longer than a memory of 8, so the memory's cut shows), trailing padding.
DOCUMENTS = np.array([
    [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
    [NO_DOC, NO_DOC, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, NO_DOC, NO_DOC, NO_DOC],
])
TIGHT = 1e-10   # float64 against float64: only the order of sums differs


def make_config(mem_len=8, activation="gelu", bias=True):
    return load_config(TINY, ["model.hidden_size=32", "model.num_heads=4", "model.num_layers=2",
                              "model.vocab_size=320", f"model.mem_len={mem_len}",
                              f"model.activation={activation}", f"model.bias={str(bias).lower()}"])


def torch_model(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = taichu.build_model(config, "torch").eval()
    arrays = perturbed_state(model, seed=seed)
    load_state_dict(model, arrays)
    return model.to(dtype), arrays


def token_ids(config, seed=1):
    return np.random.default_rng(seed).integers(0, config.model.vocab_size, DOCUMENTS.shape)


def segments(ids, documents=DOCUMENTS):
    return [(ids[:, s:s + SEGMENT], documents[:, s:s + SEGMENT]) for s in range(0, ids.shape[1], SEGMENT)]


def run_torch(model, parts, memory_length):
    """[(logits, memories, memory document ids)] of each segment, the memory carried along;
    memory_length None: no memory passed."""
    batch = parts[0][0].shape[0]
    memories, memory_documents = (((), None) if memory_length is None
                                  else model.initial_memories(batch, memory_length))
    out = []
    with torch.no_grad():
        for ids, documents in parts:
            logits, memories, memory_documents = model(torch.tensor(ids), torch.tensor(documents),
                                                       memories, memory_documents)
            out.append((logits.numpy(), [m.numpy() for m in memories],
                        None if memory_documents is None else memory_documents.numpy()))
    return out


def run_reference(arrays, config, parts, memory_length, encodings=sinusoid):
    """The reference's (logits, memories, memory document ids, final hidden) per segment,
    carrying its own memory (empty slots: zeros, document -1)."""
    batch, hidden = parts[0][0].shape[0], config.model.hidden_size
    if memory_length is None:
        memories, memory_documents = None, None
    else:
        memories = [np.zeros((batch, memory_length, hidden)) for _ in range(config.model.num_layers)]
        memory_documents = np.full((batch, memory_length), NO_DOC)
    out = []
    for ids, documents in parts:
        ref = reference_forward(arrays, config, ids, documents, memories, memory_documents, encodings)
        memories, memory_documents = (ref.memories, ref.memory_document_ids) if memory_length else (None, None)
        out.append(ref)
    return out


def torch_encodings(total, width):
    """R as torch_impl computes it (float32 sinusoids, test_sinusoids_are_the_papers bounds
    them), indexed by distance, for the float64 comparisons: the one float32 step of a
    float64 torch model."""
    table = tx.sinusoid_encodings(total, width, torch.float64, "cpu").numpy()[::-1]   # row d: distance d
    return lambda distance, _width: table[distance]


def sinusoid_bound(max_distance):
    """|R_torch - R| for torch's float32 sinusoids (exact integer distances): the angle
    d * f_k carries the frequency's error (1 / 10000 ** (2k / width): the exponent's
    division (1), the power (a few ulps), the reciprocal (1)) and the product's (1), at most
    ~7 u relative, so
    ~7 u d absolute; sin and cos add their kernels' few ulps (4 u); then the cast to the
    compute dtype (exact to float64)."""
    return (7 * max_distance + 4) * U32


def assert_segments_match(got, expected, atol_of, memory_rtol, what):
    """Logits at real positions within ``atol_of(reference output)``, memory document ids
    exactly, memories at slots with a document within memory_rtol of their scale."""
    for s, ((logits, memories, memory_documents), ref) in enumerate(zip(got, expected)):
        real = DOCUMENTS[:, s * SEGMENT:(s + 1) * SEGMENT] != NO_DOC
        atol = atol_of(ref)
        diff = np.abs(logits - ref.logits)[real].max()
        assert diff <= atol, f"{what} segment {s}: max |logits - reference| {diff:.3e} > {atol:.3e}"
        assert np.isfinite(logits).all()
        if ref.memory_document_ids is None:
            assert memory_documents is None and len(memories) == 0
            continue
        np.testing.assert_array_equal(memory_documents, ref.memory_document_ids)
        filled = ref.memory_document_ids != NO_DOC
        for n, (mem, ref_mem) in enumerate(zip(memories, ref.memories)):
            diff = np.abs(mem - ref_mem)[filled].max()
            scale = max(1.0, np.abs(ref_mem[filled]).max())
            assert diff <= memory_rtol * scale, f"{what} segment {s} memory {n}: {diff:.3e}"


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("gelu_new", False), ("relu", True)])
def test_torch_float64_equals_the_reference_over_segments(activation, bias):
    """model.double() against the reference over three segments with a memory of 8 (shorter
    than the 18 positions: slots are dropped), both carrying their own memory: logits,
    memories and memory document ids. The reference uses torch's R values (float32
    sinusoids, bounded against the paper's by test_sinusoids_are_the_papers); everything
    else is float64 on both sides, so 1e-10 relative to the logits' scale."""
    config = make_config(8, activation, bias)
    model, arrays = torch_model(config)
    parts = segments(token_ids(config))
    got = run_torch(model, parts, 8)
    expected = run_reference(arrays, config, parts, 8, torch_encodings(8 + SEGMENT, config.model.hidden_size))
    assert_segments_match(got, expected, lambda ref: TIGHT * max(1.0, np.nanmax(np.abs(ref.logits))),
                          TIGHT, "float64")


def test_sinusoids_are_the_papers():
    """torch_impl's R (computed in float32 whatever the model's dtype) is the paper's sinusoid
    of each distance, within the float32 rounding of its angle (sinusoid_bound)."""
    width, total = 32, 40
    got = tx.sinusoid_encodings(total, width, torch.float64, "cpu").numpy()
    expected = np.stack([sinusoid(total - 1 - c, width) for c in range(total)])
    assert np.abs(got - expected).max() <= sinusoid_bound(total - 1)
    # Sines first: row of distance 0 is [0 ... 0, 1 ... 1].
    np.testing.assert_array_equal(got[-1], np.r_[np.zeros(width // 2), np.ones(width // 2)])


def float32_bounds(config, arrays, total):
    """(logits atol of a reference output, memory rtol) for a float32 model against the
    float64 reference (tests/tolerance.py). Terms: each layer's chain of sums at ``total``
    keys (encoder_chain_terms), plus per layer W_r R's sum (hidden terms) and R's own
    float32 error counted in u (sinusoid_bound), plus the tied projection's hidden terms.
    Logits scale: the largest sum of |terms| of one logit, sum_k |ln_f(x)_k E_vk| (from the
    reference); memories (hidden states): their own magnitude, as scaled_differences.
    float32_tolerance bounds two float32 evaluations, twice one against the exact value:
    the factor 2 is kept as margin."""
    m = config.model
    embedding = np.abs(arrays["embed_tokens.weight"].astype(np.float64))
    terms = (encoder_chain_terms(m, total)
             + m.num_layers * (m.hidden_size + round(sinusoid_bound(total - 1) / U32))
             + m.hidden_size)

    def logits_atol(ref):
        return float32_tolerance((np.abs(np.nan_to_num(ref.final_hidden)) @ embedding.T).max(), terms)
    return logits_atol, float32_tolerance(1.0, terms)


def test_torch_float32_equals_the_reference_within_float32_rounding():
    """The model as trained (float32) against the reference with the paper's own sinusoids,
    same segments and memory: within the derived float32 bound (float32_bounds)."""
    config = make_config(8)
    model, arrays = torch_model(config, torch.float32)
    parts = segments(token_ids(config))
    logits_atol, memory_rtol = float32_bounds(config, arrays, 8 + SEGMENT)
    assert_segments_match(run_torch(model, parts, 8), run_reference(arrays, config, parts, 8),
                          logits_atol, memory_rtol, "float32")


@pytest.mark.parametrize("length,total", [(5, 9), (6, 6), (1, 7), (7, 20)])
def test_relative_shift_is_exact_for_keys_not_after_the_query(length, total):
    """relative_shift of [batch, heads, length, total] scores whose column c is distance
    total - 1 - c: entry (i, j) for every key j <= total - length + i (not after query i) is
    the input's (i, total - 1 - distance) with distance = (total - length + i) - j, bit for
    bit."""
    scores = torch.tensor(np.random.default_rng(length * total).standard_normal((2, 3, length, total)))
    shifted = tx.relative_shift(scores).numpy()
    scores = scores.numpy()
    assert shifted.shape == scores.shape
    checked = 0
    for i in range(length):
        for j in range(total - length + i + 1):
            distance = (total - length + i) - j
            np.testing.assert_array_equal(shifted[..., i, j], scores[..., i, total - 1 - distance])
            checked += 1
    assert checked == sum(total - length + i + 1 for i in range(length))


def document_start(row, position):
    """First position of the document of DOCUMENTS[row, position]."""
    start = position
    while start > 0 and DOCUMENTS[row, start - 1] == DOCUMENTS[row, position]:
        start -= 1
    return start


@pytest.mark.parametrize("memory_length", [18, 24])
def test_segments_with_a_long_memory_equal_one_full_pass(memory_length):
    """Three segments with a memory of at least the whole 18 positions give the logits of one
    pass over the 18 positions without memory (float64, every real position)."""
    config = make_config(memory_length)
    model, _ = torch_model(config)
    ids = token_ids(config)
    full = run_torch(model, [(ids, DOCUMENTS)], None)[0][0]
    parts = run_torch(model, segments(ids), memory_length)
    segmented = np.concatenate([logits for logits, _, _ in parts], axis=1)
    real = DOCUMENTS != NO_DOC
    diff = np.abs(segmented - full)[real].max()
    assert diff <= TIGHT * max(1.0, np.abs(full[real]).max()), diff


def test_a_shorter_memory_is_really_cut():
    """With a memory of 4 (segments of 6), a position equals the full pass exactly when its
    document began inside the memory's reach (at or after segment start - 4) and differs
    otherwise: the memory holds the last 4 positions, no more."""
    memory_length = 4
    config = make_config(memory_length)
    model, _ = torch_model(config)
    ids = token_ids(config)
    full = run_torch(model, [(ids, DOCUMENTS)], None)[0][0]
    segmented = np.concatenate([logits for logits, _, _ in run_torch(model, segments(ids), memory_length)],
                               axis=1)
    scale = np.abs(full[DOCUMENTS != NO_DOC]).max()
    same = differ = 0
    for row in range(DOCUMENTS.shape[0]):
        for position in range(DOCUMENTS.shape[1]):
            if DOCUMENTS[row, position] == NO_DOC:
                continue
            reach = (position // SEGMENT) * SEGMENT - memory_length
            diff = np.abs(segmented[row, position] - full[row, position]).max()
            if document_start(row, position) >= reach:
                assert diff <= TIGHT * scale, (row, position, diff)
                same += 1
            else:
                assert diff > 1e-4 * scale, (row, position, diff)
                differ += 1
    assert same > 0 and differ > 0
    # The first segment is the same whatever the memory.
    assert np.abs(segmented[:, :SEGMENT] - full[:, :SEGMENT])[DOCUMENTS[:, :SEGMENT] != NO_DOC].max() <= TIGHT * scale


def test_without_memory_each_segment_is_the_reference_on_that_segment_alone():
    """mem_len 0, no memory passed: each segment is the reference run on that segment alone
    (float64, torch's R values), and no memory comes back."""
    config = make_config(0)
    model, arrays = torch_model(config)
    parts = segments(token_ids(config))
    got = run_torch(model, parts, None)
    expected = [reference_forward(arrays, config, ids, documents, encodings=torch_encodings(SEGMENT, 32))
                for ids, documents in parts]
    assert_segments_match(got, expected, lambda ref: TIGHT * max(1.0, np.nanmax(np.abs(ref.logits))),
                          TIGHT, "no memory")


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_a_zero_length_memory_stays_empty(backend):
    """mem_len 0 with initial_memories() (zero-length memories) carried from segment to
    segment: each segment equals the reference on that segment alone, and the memory that
    comes back is still empty."""
    config = make_config(0)
    model, arrays = torch_model(config, torch.float64 if backend == "torch" else torch.float32)
    parts = segments(token_ids(config))
    if backend == "torch":
        got = run_torch(model, parts, 0)
        tolerance = lambda ref: TIGHT * np.abs(ref.logits[~np.isnan(ref.logits)]).max()
    else:
        got = run_mindspore(config, arrays, parts, 0)
        tolerance = float32_bounds(config, arrays, SEGMENT)[0]
    for s, ((logits, memories, memory_documents), (ids, documents)) in enumerate(zip(got, parts)):
        assert memory_documents.shape == (2, 0) and all(m.shape == (2, 0, 32) for m in memories), s
        ref = reference_forward(arrays, config, ids, documents,
                                encodings=torch_encodings(SEGMENT, 32) if backend == "torch" else sinusoid)
        real = documents != NO_DOC
        assert np.abs(logits - ref.logits)[real].max() <= tolerance(ref), s


def run_mindspore(config, arrays, parts, memory_length):
    """run_torch's outputs from mindspore_impl's GPTXL (PyNative, float32) on ``arrays``."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = taichu.build_model(config, "mindspore")
    load_state_dict(model, arrays)
    model.set_train(False)
    memories, memory_documents = model.initial_memories(parts[0][0].shape[0], memory_length)
    out = []
    for ids, documents in parts:
        logits, memories, memory_documents = model(ms.Tensor(ids, ms.int32), ms.Tensor(documents, ms.int32),
                                                   memories, memory_documents)
        out.append((logits.asnumpy(), [m.asnumpy() for m in memories], memory_documents.asnumpy()))
    return out


def test_mindspore_float32_equals_the_reference_within_float32_rounding():
    """mindspore_impl's GPTXL (PyNative, float32), same weights, segments and memory as
    the float32 torch case, against the reference with the paper's sinusoids, within the
    same derived bound."""
    config = make_config(8)
    _, arrays = torch_model(config, torch.float32)
    parts = segments(token_ids(config))
    logits_atol, memory_rtol = float32_bounds(config, arrays, 8 + SEGMENT)
    assert_segments_match(run_mindspore(config, arrays, parts, 8), run_reference(arrays, config, parts, 8),
                          logits_atol, memory_rtol, "mindspore")
