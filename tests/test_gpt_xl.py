"""The gpt_xl family (taichu/families/gpt_xl.py): relative_shift and memory_attention_bias of
both backends against a numpy reading of their docstrings; the canonical tensors; the two
backends on the same (perturbed) weights: logits, new memories and memory document ids over
consecutive segments with the memory carried (a document change inside a segment, -1 padding
across a segment boundary), MindSpore in PyNative and graph mode; training_loss and its
graph-mode gradients with a memory and at mem_len 0, the returned memories without gradient;
at mem_len 0 a segment's logits do not depend on the segments before; check_inputs' refusals
in both backends."""
import numpy as np
import pytest
import torch

import taichu
from taichu.api import load_state_dict, state_dict
from taichu.config import load_config
from taichu.families.gpt_xl import NO_DOCUMENT, memory_names
from conftest import CONFIGS, perturbed_state
from tolerance import encoder_chain_terms, float32_tolerance, scaled_differences

TINY = CONFIGS / "gpt_xl" / "gpt-xl-tiny.yaml"
TOL = 1e-5   # the design's parity bound (fp32), relative to the outputs' scale
BATCH, SEGMENTS = 3, 3


# ----------------------------------------------------------------------------- tolerances

def chain_terms(m, total: int) -> int:
    """Accumulated terms from the embedding to the logits (tests/tolerance.py's encoder
    chain at attention length ``total`` = memory + segment, plus the tied head's hidden
    terms). A carried memory adds no layer to the chain: layer i's memory is layer i's input
    at earlier positions, consumed by layer i again, so a path through the memories meets
    each layer once. The position term (q + v) . W_r R runs beside the content term (r_proj
    as long as k_proj, head_dim terms as q . k)."""
    return encoder_chain_terms(m, total) + m.hidden_size


def logit_tolerance(m) -> float:
    """The design's 1e-5 where the float32 bound over the whole chain is smaller, the bound
    where it is larger: at gpt-xl-tiny it is, 1.9e-4 (hidden 64, 2 layers, attention over 64
    positions); never a tolerance below what float32 rounding allows. Observed ~1e-6."""
    return max(TOL, float32_tolerance(1.0, chain_terms(m, m.mem_len + SEGMENT)))


def loss_tolerance(m, logit_scale: float, loss: float, rows: int) -> float:
    """|loss_a - loss_b| for two float32 losses from logits within logit_tolerance of each
    other (relative to their scale): each row's -log softmax moves by at most 2 max |dz|, plus
    twice the cross-entropy's own rounding (the log-sum-exp over the vocabulary, the mean over
    ``rows``); never below the design's 1e-5 relative."""
    moved = 2 * logit_tolerance(m) * max(1.0, logit_scale)
    rounding = float32_tolerance(logit_scale + loss, m.vocab_size + rows)
    return max(TOL * max(1.0, loss), moved + rounding)


def grad_tolerance(m) -> float:
    """Gradients relative to their scale: the forward chain and the log-sum-exp over the
    vocabulary walked twice (forward, then backward), as tests/test_m6.py."""
    return float32_tolerance(1.0, 2 * (chain_terms(m, m.mem_len + SEGMENT) + m.vocab_size))


# ----------------------------------------------------------------------------- fixtures

SEGMENT = load_config(TINY).data.seq_len


def mem_len_zero(config):
    return config.model_copy(update={"model": config.model.model_copy(update={"mem_len": 0})})


def build_pair(config, arrays=None):
    torch.manual_seed(0)
    torch_model = taichu.build_model(config, "torch").eval()
    arrays = perturbed_state(torch_model) if arrays is None else arrays
    load_state_dict(torch_model, arrays)
    ms_model = taichu.build_model(config, "mindspore")
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    return config, torch_model, ms_model, arrays


@pytest.fixture(scope="module")
def pair():
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    return build_pair(load_config(TINY))


@pytest.fixture(scope="module")
def pair_zero(pair):
    """The same weights at mem_len 0 (the tensors do not depend on mem_len)."""
    return build_pair(mem_len_zero(pair[0]), pair[3])


def ms_int(x):
    import mindspore as ms

    return ms.Tensor(np.asarray(x), ms.int32)


def stream(config, seed=0):
    """Token ids [BATCH, SEGMENTS * seq_len + 1] and document ids [BATCH, SEGMENTS * seq_len]:
    row 0 one document throughout; row 1 documents changing inside the first and the last
    segment (the middle one spanning a segment boundary both ways); row 2 padding (-1) from
    inside the first segment into the second, then a new document."""
    n = SEGMENTS * SEGMENT
    ids = np.random.default_rng(seed).integers(0, config.model.vocab_size, (BATCH, n + 1))
    documents = np.zeros((BATCH, n), np.int64)
    documents[1, 20:] = 1
    documents[1, 2 * SEGMENT + 6:] = 2
    documents[2, 25:SEGMENT + 9] = NO_DOCUMENT
    documents[2, SEGMENT + 9:] = 1
    return ids, documents


# ----------------------------------------------------------------------------- the pieces

def test_relative_shift_and_attention_bias_are_their_docstrings(pair):
    """relative_shift: entry (i, j) is the input's entry (i, j + length - 1 - i) for every
    key not after its query (j <= total - length + i); memory_attention_bias: 0 exactly where
    key j is not after query i (at total - length + i) and has its document, which is not
    padding (a padding query sees no key), the dtype's most negative finite value elsewhere.
    Both backends, with and without a memory."""
    import mindspore as ms
    from mindspore_impl import gpt_xl as mx
    from torch_impl import gpt_xl as tx

    rng = np.random.default_rng(3)
    for length, total in ((5, 5), (4, 9), (1, 7)):
        scores = rng.standard_normal((2, 3, length, total)).astype(np.float32)
        got = [tx.relative_shift(torch.tensor(scores)).numpy(), mx.relative_shift(ms.Tensor(scores)).asnumpy()]
        for i in range(length):
            visible = total - length + i + 1
            expected = scores[..., i, length - 1 - i:length - 1 - i + visible]
            for shifted in got:
                assert shifted.shape == scores.shape and np.array_equal(shifted[..., i, :visible], expected)

        keys = rng.integers(-1, 2, (3, total))
        queries = keys[:, total - length:]
        allowed = np.zeros((3, length, total), bool)
        for b in range(3):
            for i in range(length):
                for j in range(total):
                    allowed[b, i, j] = (j <= total - length + i and keys[b, j] == queries[b, i]
                                        and queries[b, i] != NO_DOCUMENT)
        biases = [tx.memory_attention_bias(torch.tensor(queries), torch.tensor(keys), torch.float32).numpy(),
                  mx.memory_attention_bias(ms_int(queries), ms_int(keys), ms.float32).asnumpy()]
        for bias in biases:
            assert bias.shape == (3, 1, length, total)
            assert np.array_equal(bias[:, 0] == 0, allowed)
            assert np.all(bias[:, 0][~allowed] == np.finfo(np.float32).min)


def test_tensor_specs_are_both_backends_state_dicts(pair):
    """The canonical specs are torch's state_dict and MindSpore's canonical names, name for
    name and shape for shape (u and v, kind "parameter", unrenamed)."""
    from taichu.families import get_family, num_parameters

    config, torch_model, ms_model, _ = pair
    specs = get_family("gpt_xl").tensor_specs(config)
    torch_state, ms_state = state_dict(torch_model), state_dict(ms_model)
    assert set(specs) == set(torch_state) == set(ms_state)
    assert all(tuple(specs[k].shape) == torch_state[k].shape == ms_state[k].shape for k in specs)
    assert num_parameters(config) == sum(p.numel() for p in torch_model.parameters())


def test_tensor_specs_order_is_torch_state_dict_order(pair):
    from taichu.families import get_family

    config, torch_model, _, _ = pair
    assert list(get_family("gpt_xl").tensor_specs(config)) == list(state_dict(torch_model))


# ----------------------------------------------------------------------------- backends

def test_segments_with_memory_agree(pair, ms_mode):
    """SEGMENTS consecutive segments, each backend carrying its own memory from
    initial_memories: MindSpore's logits and new memories equal torch's within
    logit_tolerance of their scale, the memory document ids exactly; the memory made a
    difference (the last segment's logits without it differ). PyNative also runs
    DecoderForExport (the last position's logits and the same memories)."""
    import mindspore as ms
    from mindspore_impl.gpt_xl import DecoderForExport as MsDecoder
    from torch_impl.gpt_xl import DecoderForExport as TorchDecoder

    config, torch_model, ms_model, _ = pair
    m = config.model
    ids, documents = stream(config)
    tolerance = logit_tolerance(m)
    with torch.no_grad():
        torch_memories, torch_documents = torch_model.initial_memories(BATCH)
    ms_memories, ms_documents = ms_model.initial_memories(BATCH)
    for s in range(SEGMENTS):
        span = slice(s * SEGMENT, (s + 1) * SEGMENT)
        with torch.no_grad():
            inputs = (torch.tensor(ids[:, span]), torch.tensor(documents[:, span]))
            logits, torch_memories_next, torch_documents_next = torch_model(*inputs, torch_memories, torch_documents)
            if ms_mode == "pynative" and s == 1:
                exported = TorchDecoder(torch_model)(*inputs, torch_documents, *torch_memories)
        ms_inputs = (ms_int(ids[:, span]), ms_int(documents[:, span]))
        ms_logits, ms_memories_next, ms_documents_next = ms_model(*ms_inputs, ms_memories, ms_documents)
        if ms_mode == "pynative" and s == 1:
            ms_exported = MsDecoder(ms_model)(*ms_inputs, ms_documents, *ms_memories)
            assert np.array_equal(ms_exported[1].asnumpy(), exported[1].numpy())
            differences = scaled_differences([x.asnumpy() for x in ms_exported[:1] + ms_exported[2:]],
                                             [x.numpy() for x in exported[:1] + exported[2:]])
            assert max(differences) <= tolerance, differences
            # The last position alone through the head: the full forward's, up to rounding.
            assert max(scaled_differences([exported[0].numpy()], [logits[:, -1].numpy()])) <= tolerance
        torch_memories, torch_documents = torch_memories_next, torch_documents_next
        ms_memories, ms_documents = ms_memories_next, ms_documents_next
        assert logits.shape == (BATCH, SEGMENT, m.vocab_size)
        assert len(ms_memories) == len(torch_memories) == m.num_layers
        assert all(tuple(x.shape) == (BATCH, m.mem_len, m.hidden_size) for x in ms_memories)
        assert ms_documents.dtype == ms.int32
        expected_documents = np.concatenate([np.full((BATCH, m.mem_len), NO_DOCUMENT), documents[:, :span.stop]],
                                            1)[:, -m.mem_len:]
        assert np.array_equal(torch_documents.numpy(), expected_documents)
        assert np.array_equal(ms_documents.asnumpy(), expected_documents)
        differences = scaled_differences([ms_logits.asnumpy()] + [x.asnumpy() for x in ms_memories],
                                         [logits.numpy()] + [x.numpy() for x in torch_memories])
        print(f"{ms_mode} segment {s}: scaled differences (logits, memories) {differences}")
        assert max(differences) <= tolerance, (s, differences)
    with torch.no_grad():
        alone = torch_model(torch.tensor(ids[:, span]), torch.tensor(documents[:, span]))[0].numpy()
    # Rows 0 and 1 continue a document from the segment before: the memory moves their logits.
    assert np.abs(alone[:2] - logits.numpy()[:2]).max() > 1e-2


def test_training_loss_and_gradients_agree(pair, pair_zero):
    """training_loss on the second segment of the stream, with the memory torch made of the
    first, and at mem_len 0 without one: MindSpore's jit(value_and_grad(training_loss,
    has_aux)) (the trainer's path) gives torch's loss, gradients, new memory document ids and
    memories (memory_names' order); the new memories carry no gradient in either backend."""
    import mindspore as ms
    from mindspore_impl import gpt_xl as mx
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import gpt_xl as tx

    ids, documents = stream(pair[0], seed=1)
    with torch.no_grad():
        first = pair[1](torch.tensor(ids[:, :SEGMENT]), torch.tensor(documents[:, :SEGMENT]),
                        *pair[1].initial_memories(BATCH))
    memory = (first[2],) + first[1]
    segment, segment_documents = ids[:, SEGMENT:2 * SEGMENT + 1], documents[:, SEGMENT:2 * SEGMENT]
    for (config, torch_model, ms_model, _), carried in ((pair, memory), (pair_zero, ())):
        m = config.model
        assert len(carried) == len(memory_names(config))
        params = ms_model.trainable_params()
        names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}

        def step(*batch):
            # (loss, *training_loss's outputs), as the trainer's (scaled loss, loss, ...): has_aux
            # wants two outputs or more, and training_loss has one at mem_len 0.
            outputs = mx.training_loss(ms_model, *batch)
            return (outputs[0],) + outputs
        grad_fn = ms.jit(ms.value_and_grad(step, None, params, has_aux=True))

        torch_model.zero_grad()
        outputs = tx.training_loss(torch_model, torch.tensor(segment), torch.tensor(segment_documents), *carried)
        outputs[0].backward()
        assert not any(x.requires_grad for x in outputs[1:])
        ms_carried = [ms_int(x) if x.dtype == torch.int64 else ms.Tensor(x.numpy()) for x in carried]
        (_, *ms_outputs), grads = grad_fn(ms_int(segment), ms_int(segment_documents), *ms_carried)
        assert len(ms_outputs) == len(outputs) == 1 + len(carried)
        with torch.no_grad():
            scale = float(torch_model(torch.tensor(segment[:, :-1]), torch.tensor(segment_documents), carried[1:],
                                      carried[0] if carried else None)[0].abs().max())
        loss, ms_loss = float(outputs[0].detach()), float(ms_outputs[0].asnumpy())
        print(f"mem_len {m.mem_len}: loss torch {loss:.6f} mindspore {ms_loss:.6f}")
        assert abs(ms_loss - loss) <= loss_tolerance(m, scale, loss, segment[:, 1:].size)
        if carried:
            assert np.array_equal(ms_outputs[1].asnumpy(), outputs[1].numpy())
            differences = scaled_differences([x.asnumpy() for x in ms_outputs[2:]], [x.numpy() for x in outputs[2:]])
            assert max(differences) <= logit_tolerance(m), differences
        grads_torch = {n: p.grad.numpy() for n, p in torch_model.named_parameters()}
        assert len(grads) == len(grads_torch)
        bound = grad_tolerance(m)
        for param, grad in zip(params, grads):
            ref, got = grads_torch[names[param.name]], grad.asnumpy()
            assert np.abs(got - ref).max() <= bound * max(1.0, np.abs(ref).max()), (m.mem_len, names[param.name])
            # u and v (and every other tensor) are trained.
            assert np.abs(ref).max() > 0, names[param.name]

    # The new memories are cut from the graph: their sum has no gradient (PyNative).
    _, torch_model, ms_model, _ = pair
    ms_memory = [ms_int(memory[0])] + [ms.Tensor(x.numpy()) for x in memory[1:]]

    def memory_sum(*batch):
        outputs = mx.training_loss(ms_model, *batch)
        return outputs[2].sum() + outputs[3].sum()
    params = ms_model.trainable_params()
    grads = ms.grad(memory_sum, None, params)(ms_int(segment), ms_int(segment_documents), *ms_memory)
    assert not any(grad.asnumpy().any() for grad in grads)


def test_mem_len_zero_segments_are_independent(pair_zero):
    """At mem_len 0 (no memory: memory_names is empty, training_loss returns the loss alone)
    a segment's logits are the same after either of two different segments, and alone,
    also with initial_memories' length-0 memories carried from segment to segment, in torch
    and in MindSpore (PyNative; equal to torch's within tolerance). Graph mode without a
    memory: test_training_loss_and_gradients_agree at mem_len 0."""
    from mindspore_impl import gpt_xl as mx
    from torch_impl import gpt_xl as tx

    config, torch_model, ms_model, _ = pair_zero
    m = config.model
    assert memory_names(config) == ()
    ids, documents = stream(config, seed=2)
    other, _ = stream(config, seed=4)
    segment = slice(SEGMENT, 2 * SEGMENT)
    before = (slice(0, SEGMENT), slice(2 * SEGMENT, 3 * SEGMENT))
    with torch.no_grad():
        assert len(tx.training_loss(torch_model, torch.tensor(ids[:, :SEGMENT + 1]),
                                    torch.tensor(documents[:, :SEGMENT]))) == 1
        alone, memories, memory_documents = torch_model(torch.tensor(ids[:, segment]), torch.tensor(documents[:, segment]))
        assert memories == () and memory_documents is None
        for earlier in before:
            for source in (ids, other):
                torch_model(torch.tensor(source[:, earlier]), torch.tensor(documents[:, earlier]))
                after = torch_model(torch.tensor(ids[:, segment]), torch.tensor(documents[:, segment]))[0]
                assert torch.equal(after, alone)
        # initial_memories at mem_len 0 (length-0 memories) carried along are no memory either.
        for source in (ids, other):
            _, empty, empty_documents = torch_model(torch.tensor(source[:, before[0]]),
                                                    torch.tensor(documents[:, before[0]]),
                                                    *torch_model.initial_memories(BATCH))
            assert [tuple(x.shape) for x in empty] == [(BATCH, 0, m.hidden_size)] * m.num_layers
            assert tuple(empty_documents.shape) == (BATCH, 0)
            after = torch_model(torch.tensor(ids[:, segment]), torch.tensor(documents[:, segment]), empty,
                                empty_documents)[0]
            assert torch.equal(after, alone)
    assert len(mx.training_loss(ms_model, ms_int(ids[:, :SEGMENT + 1]), ms_int(documents[:, :SEGMENT]))) == 1
    ms_alone, memories, memory_documents = ms_model(ms_int(ids[:, segment]), ms_int(documents[:, segment]))
    assert len(memories) == 0 and memory_documents is None
    ms_alone = ms_alone.asnumpy()
    for source in (ids, other):
        ms_model(ms_int(source[:, before[0]]), ms_int(documents[:, before[0]]))
        after = ms_model(ms_int(ids[:, segment]), ms_int(documents[:, segment]))[0].asnumpy()
        assert np.array_equal(after, ms_alone)
        _, empty, empty_documents = ms_model(ms_int(source[:, before[0]]), ms_int(documents[:, before[0]]),
                                             *ms_model.initial_memories(BATCH))
        assert [tuple(x.shape) for x in empty] == [(BATCH, 0, m.hidden_size)] * m.num_layers
        assert tuple(empty_documents.shape) == (BATCH, 0)
        after = ms_model(ms_int(ids[:, segment]), ms_int(documents[:, segment]), empty, empty_documents)[0]
        assert np.array_equal(after.asnumpy(), ms_alone)
    differences = scaled_differences([ms_alone], [alone.numpy()])
    print(f"scaled difference {differences}")
    assert max(differences) <= logit_tolerance(m)


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_check_inputs_refusals(pair, backend):
    """check_inputs' refusals, worded alike in both backends: a memory of another batch
    size, memory_document_ids missing, mis-shaped or given without memories, a memory of the
    wrong width, memories for the wrong number of layers, token ids out of range, document_ids
    of another shape."""
    import mindspore as ms

    config, torch_model, ms_model, _ = pair
    m = config.model
    ids, documents = stream(config)
    ids, documents = ids[:, :SEGMENT], documents[:, :SEGMENT]
    if backend == "torch":
        model, ints, floats = torch_model, torch.tensor, torch.tensor
    else:
        model, ints, floats = ms_model, ms_int, ms.Tensor

    def memory(batch=BATCH, length=m.mem_len, width=m.hidden_size, layers=m.num_layers):
        return tuple(floats(np.zeros((batch, length, width), np.float32)) for _ in range(layers))
    memory_documents = ints(np.full((BATCH, m.mem_len), NO_DOCUMENT))
    cases = [((ints(ids), ints(documents), memory(batch=BATCH + 1), memory_documents),
              rf"memory 0 holds {BATCH + 1} rows, but input_ids has {BATCH}: memory belongs to the batch"),
             ((ints(ids), ints(documents), memory(), None),
              rf"memory_document_ids must be \[batch, memory length\] = \({BATCH}, {m.mem_len}\), got None"),
             ((ints(ids), ints(documents), memory(), memory_documents[:, 1:]),
              rf"memory_document_ids must be \[batch, memory length\] = \({BATCH}, {m.mem_len}\), "
              rf"got \({BATCH}, {m.mem_len - 1}\)"),
             ((ints(ids), ints(documents), None, memory_documents), "memory_document_ids given without memories"),
             ((ints(ids), ints(documents), memory(width=m.hidden_size + 1), memory_documents),
              rf"memory 0 must be \[batch, memory length, {m.hidden_size}\], got \({BATCH}, {m.mem_len}, "
              rf"{m.hidden_size + 1}\)"),
             ((ints(ids), ints(documents), memory(layers=1), memory_documents),
              rf"memories: 1 tensors for {m.num_layers} layers"),
             ((ints(np.where(ids == ids.max(), m.vocab_size, ids)), ints(documents), memory(), memory_documents),
              rf"token id {m.vocab_size} is out of range for vocab_size {m.vocab_size} "
              rf"\(valid ids: 0..{m.vocab_size - 1}\)"),
             ((ints(np.where(ids == ids.max(), -1, ids)), ints(documents)), "token id -1 is out of range"),
             ((ints(ids), ints(documents[:, 1:])),
              rf"document_ids must have input_ids' shape \({BATCH}, {SEGMENT}\), got \({BATCH}, {SEGMENT - 1}\)")]
    with torch.no_grad():
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                model(*args)
