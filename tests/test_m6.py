"""The m6 family (taichu/families/m6.py): the prefix-LM mask of both backends against a numpy
reading of the docstring's rule (a mixed batch, with and without a past, and the static
decoder's row); the canonical tensors; the two backends on the same (perturbed) weights:
logits for each task's mask in MindSpore PyNative and graph mode, the loss against a float64
numpy computation (a batch without CODE rows, one without TARGET text) and graph-mode
gradients; the KV cache (torch's growing cache, both static caches, MindSpore compiled) equal
to the full forward for text and for codes; check_inputs' refusals in both backends."""
import numpy as np
import pytest
import torch

import taichu
from taichu.api import load_state_dict, state_dict
from taichu.config import load_config
from taichu.families.m6 import CODE, IMAGE, PAD, PREFIX, TARGET
from conftest import CONFIGS, perturbed_state
from tolerance import encoder_chain_terms, float32_tolerance, scaled_differences

TINY = CONFIGS / "m6" / "m6-tiny.yaml"
TOL = 1e-5   # the design's parity bound (fp32), relative to the outputs' scale
BOS, EOS = 2, 3

# One row per task (taichu.families.m6's table): (image, left padding, prefix, target,
# code slots), the text right-padded to text_length as training feeds it.
TASK_ROWS = {"caption": (True, 0, 1, 9, False),
             "image_text": (True, 0, 5, 7, False),
             "vqa": (True, 0, 10, 3, False),
             "text_continuation": (False, 0, 8, 10, False),
             "text_denoising": (False, 0, 14, 6, False),
             "text_to_image": (False, 0, 9, 0, True)}
# Same shape, no CODE slots anywhere / no TARGET text anywhere (a row of prefix only too).
NO_CODE_ROWS = [TASK_ROWS[t] for t in ("caption", "image_text", "vqa", "text_continuation", "text_denoising")] \
    + [(True, 0, 3, 15, False)]
NO_TARGET_ROWS = [(False, 0, 9, 0, True), (False, 0, 4, 0, True), (True, 0, 12, 0, False),
                  (False, 0, 20, 0, True), (False, 0, 2, 0, True), (False, 0, 24, 0, True)]



def build_batch(config, rows, seed=1, text_slots=None):
    """pixel_values [B, C, S, S] (noise for a row with an image, zeros without), input_ids [B,
    text_slots] (pad 0; bos first, eos last of a row's text), segment_ids [B, patches +
    text_slots + code slots], image_codes [B, code slots] (the targets) from rows of (image,
    left padding, prefix, target, codes)."""
    m = config.model
    rng = np.random.default_rng(seed)
    batch, patches, length = len(rows), m.num_patches, text_slots or m.text_length
    pixels = np.zeros((batch, m.num_channels, m.image_size, m.image_size), np.float32)
    ids = np.zeros((batch, length), np.int64)
    segments = np.full((batch, patches + length + m.num_codes), PAD, np.int64)
    codes = rng.integers(0, m.codebook_size, (batch, m.num_codes))
    for b, (image, pad, prefix, target, code) in enumerate(rows):
        if image:
            pixels[b] = rng.standard_normal(pixels.shape[1:])
            segments[b, :patches] = IMAGE
        real = prefix + target
        ids[b, pad:pad + real] = rng.integers(4, m.vocab_size, real)
        ids[b, pad], ids[b, pad + real - 1] = BOS, EOS
        segments[b, patches + pad:patches + pad + prefix] = PREFIX
        segments[b, patches + pad + prefix:patches + pad + real] = TARGET
        if code:
            segments[b, patches + length:] = CODE
    return pixels, ids, segments, codes


def code_slots(config, codes):
    """What the code slots hold: the start code, then every code but the last."""
    return np.concatenate([np.full((len(codes), 1), config.model.codebook_size), codes[:, :-1]], 1)


# ----------------------------------------------------------------------------- tolerances

def patch_terms(m) -> int:
    """Accumulated terms on the patch ResNet's chain: conv_in (9 C), per level the residual
    blocks (9 w + w), the 2x2 downsampling (4 w), the mean over the last level's cells and
    the Linear (its width)."""
    terms, cells = 9 * m.num_channels, m.patch_size
    for level, width in enumerate(m.patch_channels):
        terms += m.num_res_blocks * 10 * width
        if level < len(m.patch_channels) - 1:
            terms, cells = terms + 4 * width, cells // 2
    return terms + cells * cells + m.patch_channels[-1]


def logit_tolerance(m) -> float:
    """Two float32 evaluations of the logits (relative to their scale) differ by at most the
    bound of tests/tolerance.py over the whole chain: the patch ResNet, the GPT layers over
    the longest sequence, ln_f and the head. The design's 1e-5 where that bound is smaller;
    the bound where it is larger (at m6-tiny it is, 1.4e-4: never a tolerance below what
    float32 rounding allows). Observed differences are ~1e-6."""
    return max(TOL, float32_tolerance(1.0, encoder_chain_terms(m, m.sequence_length, patch_terms(m))))


def loss_tolerance(m, logit_scale: float, loss: float, rows: int) -> float:
    """|loss_a - loss_b| for two float32 losses from logits within logit_tolerance of each
    other: each row's -log softmax moves by at most 2 max |dz| (the log-sum-exp's and the
    target logit's), times the two weights; plus twice the cross-entropy's own rounding (the
    log-sum-exp over the vocabulary, the mean over ``rows``); never below the design's 1e-5
    relative."""
    weights = m.text_loss_weight + m.code_loss_weight
    moved = 2 * weights * logit_tolerance(m) * max(1.0, logit_scale)
    rounding = float32_tolerance(logit_scale + loss, m.vocab_size + rows)
    return max(TOL * max(1.0, loss), moved + rounding)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def pair():
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    config = load_config(TINY)
    torch.manual_seed(0)
    torch_model = taichu.build_model(config, "torch").eval()
    arrays = perturbed_state(torch_model)
    load_state_dict(torch_model, arrays)
    ms_model = taichu.build_model(config, "mindspore")
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    return config, torch_model, ms_model, arrays


def ms_int(x):
    import mindspore as ms

    return ms.Tensor(np.asarray(x), ms.int32)


def test_tensor_specs_are_both_backends_state_dicts(pair):
    """The canonical specs (what `taichu info` counts) are torch's state_dict, name for name
    in order and shape for shape, and MindSpore's canonical names and shapes (conv2d,
    embedding and layer_norm kinds mapped by taichu/weights.py)."""
    from taichu.families import get_family, num_parameters

    config, torch_model, ms_model, _ = pair
    specs = get_family("m6").tensor_specs(config)
    torch_state, ms_state = state_dict(torch_model), state_dict(ms_model)
    assert list(specs) == list(torch_state)
    assert all(tuple(specs[k].shape) == torch_state[k].shape == ms_state[k].shape for k in specs)
    assert set(ms_state) == set(specs)
    assert num_parameters(config) == sum(p.numel() for p in torch_model.parameters())


# ----------------------------------------------------------------------------- the mask

def reference_allowed(segments, length):
    """[B, length, total] bool from taichu.families.m6's rule, position by position: query q
    (the last ``length`` positions) may attend key k iff k is not PAD and (k is IMAGE or
    PREFIX, or q is TARGET or CODE and k is TARGET or CODE and k <= q)."""
    batch, total = segments.shape
    allowed = np.zeros((batch, length, total), bool)
    for b in range(batch):
        for i in range(length):
            q = total - length + i
            for k in range(total):
                key, query = segments[b, k], segments[b, q]
                if key == PAD:
                    continue
                if key in (IMAGE, PREFIX):
                    allowed[b, i, k] = True
                elif query in (TARGET, CODE) and key in (TARGET, CODE) and k <= q:
                    allowed[b, i, k] = True
    return allowed


def mask_batch(config):
    """A mixed batch over [patches ; text ; code slots] (4 + 24 + 4 at m6-tiny): each task's
    row, left-padded prompts (PAD between the patches and the text), PAD in the middle of the
    text, text to image with a left-padded caption, rows all PAD after some point, a row
    with no prefix at all."""
    m = config.model
    p, length = m.num_patches, m.text_length
    rows = [build_batch(config, list(TASK_ROWS.values()))[2]]
    extra = np.full((6, m.sequence_length), PAD, np.int64)
    extra[0, :p] = IMAGE; extra[0, p + 5:p + 9] = PREFIX; extra[0, p + 9:p + 15] = TARGET
    extra[1, p + 3:p + 6] = PREFIX; extra[1, p + 6] = PAD; extra[1, p + 7:p + 9] = PREFIX
    extra[1, p + 9:p + 11] = TARGET; extra[1, p + 11] = PAD; extra[1, p + 12:p + 14] = TARGET
    extra[2, p + 10:p + length] = PREFIX; extra[2, p + length:] = CODE
    extra[3, :p] = IMAGE; extra[3, p:p + 3] = PREFIX                        # all PAD after
    extra[4, p:p + 2] = PREFIX; extra[4, p + 2:p + 5] = TARGET              # all PAD after
    extra[5, p + 4:p + 9] = TARGET; extra[5, p + length:p + length + 2] = CODE
    return np.concatenate(rows + [extra])


def test_prefix_lm_bias_is_the_docstring_rule(pair):
    """Both backends' prefix_lm_bias: 0 exactly where the rule allows, the dtype's most
    negative finite value elsewhere, for the whole sequence and for the last 7 and the last
    1 positions as queries (a past); the static decoder's row (decoder_bias) for a target
    query at write_position with the later slots PAD is the rule's row, every slot that is
    not PAD."""
    import mindspore as ms
    from mindspore_impl import m6 as mm
    from torch_impl import m6 as tm

    config = pair[0]
    segments = mask_batch(config)
    total = segments.shape[1]
    for length in (total, 7, 1):
        expected = reference_allowed(segments, length)
        assert expected.any() and not expected.all()
        torch_bias = tm.prefix_lm_bias(torch.tensor(segments), length, torch.float32).numpy()
        ms_bias = mm.prefix_lm_bias(ms_int(segments), length, ms.float32).asnumpy()
        for bias in (torch_bias, ms_bias):
            assert bias.shape == (len(segments), 1, length, total)
            assert np.array_equal(bias[:, 0] == 0, expected), length
            assert np.all(bias[:, 0][~expected] == np.finfo(np.float32).min)

    checked = 0
    for b in range(len(segments)):
        for write in range(total):
            if segments[b, write] not in (TARGET, CODE):
                continue
            written = segments[b:b + 1].copy()
            written[:, write + 1:] = PAD
            expected = reference_allowed(written, total)[:, write]
            assert np.array_equal(expected, written != PAD)
            torch_row = tm.decoder_bias(torch.tensor(written), torch.tensor(write), torch.float32).numpy()
            ms_row = mm.decoder_bias(ms_int(written), ms_int(write), ms.float32).asnumpy()
            for row in (torch_row, ms_row):
                assert row.shape == (1, 1, 1, total) and np.array_equal(row[:, 0, 0] == 0, expected)
            checked += 1
    assert checked > 40


# ----------------------------------------------------------------------------- backends

def test_backends_agree_on_each_tasks_logits(pair):
    """One row per task (caption, image-conditioned text, vqa, text continuation, text
    denoising, text to image), each with its own mask: text and code logits of MindSpore
    PyNative and graph mode equal torch's within logit_tolerance of their scale."""
    import mindspore as ms

    config, torch_model, ms_model, _ = pair
    pixels, ids, segments, codes = build_batch(config, list(TASK_ROWS.values()))
    slots = code_slots(config, codes)
    with torch.no_grad():
        expected = [x.numpy() for x in torch_model(torch.tensor(pixels), torch.tensor(ids),
                                                   torch.tensor(segments), torch.tensor(slots))]
    m = config.model
    assert expected[0].shape == (6, m.text_length, m.vocab_size)
    assert expected[1].shape == (6, m.num_codes, m.codebook_size)
    tolerance = logit_tolerance(m)
    try:
        for mode in (ms.PYNATIVE_MODE, ms.GRAPH_MODE):
            ms.set_context(mode=mode)
            got = [x.asnumpy() for x in ms_model(ms.Tensor(pixels), ms_int(ids), ms_int(segments), ms_int(slots))]
            differences = scaled_differences(got, expected)
            print(f"mode {mode}: scaled differences {differences}")
            assert max(differences) <= tolerance, (mode, differences)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def numpy_loss(config, text_logits, code_logits, ids, segments, codes):
    """(loss, text term, code term) in float64, row by row: slot t's text logits against token
    t + 1 where that slot is TARGET and slot t is not PAD, code slot j's logits against code j where the slot is
    CODE; each term the mean over its targets, 0 without any; the configured weights."""
    m = config.model
    patches, length = m.num_patches, ids.shape[1]

    def nll(logits, target):
        logits = logits.astype(np.float64)
        top = logits.max()
        return top + np.log(np.exp(logits - top).sum()) - logits[target]
    text = [nll(text_logits[b, t], ids[b, t + 1]) for b in range(len(ids)) for t in range(length - 1)
            if segments[b, patches + t + 1] == TARGET and segments[b, patches + t] != PAD]
    code = [nll(code_logits[b, j], codes[b, j]) for b in range(len(ids)) for j in range(m.num_codes)
            if segments[b, patches + length + j] == CODE]
    text_term = float(np.mean(text)) if text else 0.0
    code_term = float(np.mean(code)) if code else 0.0
    return m.text_loss_weight * text_term + m.code_loss_weight * code_term, text_term, code_term


def test_loss_against_numpy_and_graph_mode_gradients(pair):
    """For the task batch, a batch without CODE rows and one without TARGET text (one
    shape, one compiled graph): torch's training_loss equals the float64 numpy loss from its
    logits (a missing term 0); MindSpore's jit(value_and_grad(training_loss)) (the trainer's
    path) gives the same loss and torch's gradients. Gradient bound (tests/tolerance.py):
    the forward chain and the log-sum-exp over the vocabulary walked twice. Both backends'
    _mean_cross_entropy is 0, with zero gradients, without targets."""
    import mindspore as ms
    from mindspore_impl import m6 as mm
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import m6 as tm

    config, torch_model, ms_model, _ = pair
    m = config.model
    params = ms_model.trainable_params()
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}

    def step(*batch):
        return mm.training_loss(ms_model, *batch)[0]
    grad_fn = ms.jit(ms.value_and_grad(step, None, params))
    chain = encoder_chain_terms(m, m.sequence_length, patch_terms(m)) + m.hidden_size + m.vocab_size
    grad_bound = float32_tolerance(1.0, 2 * chain)
    terms = {}
    batches = {"tasks": list(TASK_ROWS.values()), "no codes": NO_CODE_ROWS, "no targets": NO_TARGET_ROWS}
    for seed, (name, rows) in enumerate(batches.items()):
        pixels, ids, segments, codes = build_batch(config, rows, seed=seed)
        if name == "no codes":
            # A PAD slot right before a TARGET: it attends to every key, so it must not be
            # trained to predict that target (training_loss and numpy_loss both skip it).
            segments[-1, m.num_patches + 2] = PAD
        inputs = [torch.tensor(pixels), torch.tensor(ids), torch.tensor(segments), torch.tensor(codes)]
        with torch.no_grad():
            slots = torch.tensor(code_slots(config, codes))
            text_logits, code_logits = (x.numpy() for x in torch_model(*inputs[:3], slots))
        expected, *terms[name] = numpy_loss(config, text_logits, code_logits, ids, segments, codes)
        torch_model.zero_grad()
        loss, = tm.training_loss(torch_model, *inputs)
        loss.backward()
        loss = float(loss.detach())
        scale = max(np.abs(text_logits).max(), np.abs(code_logits).max())
        # training_loss's own float32 rounding: the logits' log-sum-exp and the means.
        assert abs(loss - expected) <= float32_tolerance(scale + expected, m.vocab_size + ids.size) / 2, name
        ms_loss, grads = grad_fn(ms.Tensor(pixels), ms_int(ids), ms_int(segments), ms_int(codes))
        ms_loss = float(ms_loss.asnumpy())
        print(f"{name}: loss {loss:.6f} numpy {expected:.6f} mindspore {ms_loss:.6f}")
        assert abs(ms_loss - loss) <= loss_tolerance(m, scale, loss, ids.size), name
        grads_torch = {n: (p.grad.numpy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
                       for n, p in torch_model.named_parameters()}
        assert len(grads) == len(grads_torch)
        for param, grad in zip(params, grads):
            ref, got = grads_torch[names[param.name]], grad.asnumpy()
            assert np.isfinite(got).all(), (name, names[param.name])
            assert np.abs(got - ref).max() <= grad_bound * max(1.0, np.abs(ref).max()), (name, names[param.name])
        if name == "no codes":
            code_grad = grads[[names[p.name] for p in params].index("code_head.weight")].asnumpy()
            assert not code_grad.any()
    assert terms["tasks"][0] > 0 and terms["tasks"][1] > 0
    assert terms["no codes"][1] == 0.0 and terms["no codes"][0] > 0
    assert terms["no targets"][0] == 0.0 and terms["no targets"][1] > 0

    rows = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    ignored = np.full(5, -100)
    assert float(tm._mean_cross_entropy(torch.tensor(rows), torch.tensor(ignored))) == 0.0
    ms_rows = ms.Tensor(rows)
    for run in (mm._mean_cross_entropy, ms.jit(mm._mean_cross_entropy)):
        assert float(run(ms_rows, ms_int(ignored)).asnumpy()) == 0.0
    grad = ms.grad(mm._mean_cross_entropy)(ms_rows, ms_int(ignored)).asnumpy()
    assert np.isfinite(grad).all() and not grad.any()


# ----------------------------------------------------------------------------- KV cache

def ms_static(config, ms_model, codes):
    import mindspore as ms
    from mindspore_impl.m6 import StaticCacheDecoder, StaticCachePrefill

    return (ms.jit(StaticCachePrefill(ms_model, codes=codes)), ms.jit(StaticCacheDecoder(ms_model, codes=codes)))


def decoded_logits(prefill, decode, prefill_inputs, new_ids, segments, start, capacity, tensor, numpy, pad):
    """Logits of a static cache: the prefill's last position, then one new position per
    step (new_ids[:, i] at slot start + i, segments of the slots up to it, PAD after)."""
    out = prefill(*prefill_inputs)
    logits = [numpy(out[0])]
    cache = [pad(t, capacity) for t in out[1:]]
    for i in range(new_ids.shape[1]):
        write = start + i
        written = np.full((len(segments), capacity), PAD, np.int64)
        written[:, :write + 1] = segments[:, :write + 1]
        out = decode(tensor(new_ids[:, i:i + 1]), tensor(written), tensor(np.array(write)), *cache)
        logits.append(numpy(out[0]))
        cache = list(out[1:])
    return np.stack(logits, 1)


def torch_pad(t, capacity):
    return torch.nn.functional.pad(t, (0, 0, 0, capacity - t.shape[2]))


def ms_pad(t, capacity):
    import mindspore as ms

    return ms.Tensor(np.pad(t.asnumpy(), ((0, 0), (0, 0), (0, capacity - t.shape[2]), (0, 0))))


def test_kv_cache_text_equals_the_full_forward(pair):
    """Left-padded prompts of 8, 5 and 2 tokens (with an image, without, with), then 6
    TARGET tokens one per step: torch's growing cache, torch's static cache and MindSpore's
    compiled static cache give the full forward's logits at the prompt's last position and
    at every new one."""
    from torch_impl.m6 import StaticCacheDecoder, StaticCachePrefill

    config, torch_model, ms_model, _ = pair
    m = config.model
    prompt, new = 8, 6
    rows = [(True, 0, 8, new, False), (False, 3, 5, new, False), (True, 6, 2, new, False)]
    pixels, ids, segments, _ = build_batch(config, rows, seed=5, text_slots=prompt + new)
    segments = segments[:, :m.num_patches + prompt + new]
    start = m.num_patches + prompt
    with torch.no_grad():
        full = torch_model(torch.tensor(pixels), torch.tensor(ids), torch.tensor(segments))[0].numpy()[:, prompt - 1:]
        text_logits, _, past = torch_model(torch.tensor(pixels), torch.tensor(ids[:, :prompt]),
                                           torch.tensor(segments[:, :start]), None, None, True)
        growing = [text_logits[:, -1].numpy()]
        for i in range(new):
            text_logits, _, past = torch_model(None, torch.tensor(ids[:, prompt + i:prompt + i + 1]),
                                               torch.tensor(segments[:, :start + i + 1]), None, past, True)
            growing.append(text_logits[:, -1].numpy())
        growing = np.stack(growing, 1)
        prefill_inputs = (torch.tensor(pixels), torch.tensor(ids[:, :prompt]), torch.tensor(segments[:, :start]))
        torch_static = decoded_logits(StaticCachePrefill(torch_model), StaticCacheDecoder(torch_model),
                                      prefill_inputs, ids[:, prompt:], segments, start, start + new + 2,
                                      torch.tensor, lambda x: x.numpy(), torch_pad)
    import mindspore as ms

    prefill, decode = ms_static(config, ms_model, False)
    ms_inputs = (ms.Tensor(pixels), ms_int(ids[:, :prompt]), ms_int(segments[:, :start]))
    ms_static_logits = decoded_logits(prefill, decode, ms_inputs, ids[:, prompt:], segments, start,
                                      start + new + 2, ms_int, lambda x: x.asnumpy(), ms_pad)
    differences = scaled_differences([growing, torch_static, ms_static_logits], [full] * 3)
    print(f"text: growing, torch static, mindspore static {differences}")
    assert max(differences) <= logit_tolerance(m)


def test_kv_cache_codes_equal_the_full_forward(pair):
    """Text to image: left-padded captions of 9, 4 and 6 tokens and the start code in the
    prefill, then the codes one per step as CODE slots: torch's growing cache, torch's
    static cache and MindSpore's compiled static cache give the full forward's code logits
    at every slot."""
    import mindspore as ms
    from torch_impl.m6 import StaticCacheDecoder, StaticCachePrefill

    config, torch_model, ms_model, _ = pair
    m = config.model
    caption, n = 9, m.num_codes
    rows = [(False, 0, 9, 0, True), (False, 5, 4, 0, True), (False, 3, 6, 0, True)]
    pixels, ids, segments, codes = build_batch(config, rows, seed=6, text_slots=caption)
    slots = code_slots(config, codes)
    start = m.num_patches + caption + 1        # the first slot after the start code
    tensors = [torch.tensor(x) for x in (pixels, ids, segments, slots)]
    with torch.no_grad():
        full = torch_model(*tensors)[1].numpy()
        _, code_logits, past = torch_model(tensors[0], tensors[1], tensors[2][:, :start], tensors[3][:, :1],
                                           None, True)
        growing = [code_logits[:, -1].numpy()]
        for j in range(1, n):
            _, code_logits, past = torch_model(None, None, tensors[2][:, :start + j], tensors[3][:, j:j + 1],
                                               past, True)
            growing.append(code_logits[:, -1].numpy())
        growing = np.stack(growing, 1)
        prefill_inputs = (tensors[0], tensors[1], tensors[2][:, :start], tensors[3][:, :1])
        torch_static = decoded_logits(StaticCachePrefill(torch_model, codes=True),
                                      StaticCacheDecoder(torch_model, codes=True), prefill_inputs, slots[:, 1:],
                                      segments, start, start + n, torch.tensor, lambda x: x.numpy(), torch_pad)
    prefill, decode = ms_static(config, ms_model, True)
    ms_inputs = (ms.Tensor(pixels), ms_int(ids), ms_int(segments[:, :start]), ms_int(slots[:, :1]))
    ms_static_logits = decoded_logits(prefill, decode, ms_inputs, slots[:, 1:], segments, start, start + n,
                                      ms_int, lambda x: x.asnumpy(), ms_pad)
    assert full.shape == growing.shape == torch_static.shape == ms_static_logits.shape == (3, n, m.codebook_size)
    differences = scaled_differences([growing, torch_static, ms_static_logits], [full] * 3)
    print(f"codes: growing, torch static, mindspore static {differences}")
    assert max(differences) <= logit_tolerance(m)


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_check_inputs_refusals(pair, backend):
    """check_inputs' refusals, worded alike in both backends: pixel_values of another size,
    token ids and image codes out of range, segment_ids of the wrong length or values, two
    positions with a past, and image_codes to a model without a codebook."""
    import mindspore as ms

    config, torch_model, ms_model, arrays = pair
    m = config.model
    pixels, ids, segments, codes = build_batch(config, list(TASK_ROWS.values()))
    slots = code_slots(config, codes)
    if backend == "torch":
        model, ints, floats = torch_model, torch.tensor, torch.tensor
    else:
        model, ints, floats = ms_model, ms_int, ms.Tensor
    small = pixels[:, :, :16, :16]
    cases = [((floats(small), ints(ids), ints(segments), ints(slots)), r"pixel_values must be \[batch, 3, 32, 32\]"),
             ((floats(pixels), ints(np.where(ids == EOS, m.vocab_size, ids)), ints(segments), ints(slots)),
              f"token id {m.vocab_size} is out of range for vocab_size {m.vocab_size}"),
             ((floats(pixels), ints(ids), ints(segments), ints(np.where(slots == m.codebook_size, m.codebook_size + 1,
                                                                         slots))),
              rf"image code {m.codebook_size + 1} is out of range \(valid: 0..{m.codebook_size - 1}, and "
              rf"{m.codebook_size} the start code\)"),
             ((floats(pixels), ints(ids), ints(segments[:, :-1]), ints(slots)),
              rf"segment_ids must be \[batch, past \+ positions\] = \[6, {m.sequence_length}\]"),
             ((floats(pixels), ints(ids), ints(np.where(segments == CODE, 5, segments)), ints(slots)),
              "segment id 5 is out of range")]
    with torch.no_grad():
        for args, message in cases:
            with pytest.raises(ValueError, match=message):
                model(*args)
        past = model(floats(pixels), ints(ids), ints(segments), ints(slots), None, True)[2]
        with pytest.raises(ValueError, match="one new position per step"):
            model(None, ints(ids[:, :2]), ints(np.zeros((6, m.sequence_length + 2), np.int64)), None, past, True)

    other = load_config(TINY, ["model.codebook_size=null", "model.image_grid=null"])
    plain = taichu.build_model(other, backend)
    with pytest.raises(ValueError, match="image_codes given to a model without a codebook"):
        plain(floats(pixels), ints(ids), ints(segments), ints(slots))
    with torch.no_grad():   # the same model without code slots takes the text
        text_logits, code_logits = plain(floats(pixels), ints(ids), ints(segments[:, :-m.num_codes]))
    assert code_logits is None and tuple(text_logits.shape) == (6, m.text_length, m.vocab_size)
