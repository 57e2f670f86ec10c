"""What TinyBERT distillation (issue 18) reads from a model: ``distill_outputs`` of the GPT,
CLIP, DALL-E and BriVL in both backends, from one forward pass, (training_loss's outputs,
predictions, streams). The two backends give the same numbers (MindSpore compiled as the
trainer compiles, ms.jit, and PyNative); the loss is training_loss's; the predictions' row
weights rebuild it; the streams are what taichu.families.<name>.distill_streams describes;
the default paths (no flag) give what they gave; and random Hugging Face CLIPModel and
GPT2LMHeadModel, converted in, give the same hidden states and attention probabilities."""
import numpy as np
import pytest
import torch

import taichu
from taichu import convert
from taichu.api import load_state_dict
from taichu.config import load_config
from taichu.families import get_family
from conftest import CONFIGS, perturbed_state
from tolerance import float32_tolerance, scaled_differences

TOL = 1e-5   # the design's parity bound (fp32), relative to each output's own magnitude
PAD_ID, EOS_ID = 0, 3
FAMILIES = ("gpt", "clip", "dalle", "brivl")
IMAGE_TEXT = ("clip", "brivl")   # training_loss(model, pixel_values, input_ids, attention_mask)



def caption_batch(rng, vocab_size, lengths, width):
    """Right-padded ids and mask: random ordinary ids, eos last, then padding."""
    ids = np.full((len(lengths), width), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n - 1] = rng.integers(4, vocab_size, n - 1)
        ids[row, n - 1] = EOS_ID
        mask[row, :n] = 1
    return ids, mask


def family_inputs(name, config, seed=0):
    """training_loss's inputs (numpy) for a family's tiny config."""
    m = config.model
    rng = np.random.default_rng(seed)
    if name == "gpt":
        return (rng.integers(0, m.vocab_size, (3, 13)),)
    if name in IMAGE_TEXT:
        image = m.image
        pixels = rng.standard_normal((3, image.num_channels, image.image_size, image.image_size))
        # Right-padded to 12: one row full, two padded (one only 3 tokens long).
        return (pixels.astype(np.float32),) + caption_batch(rng, m.text.vocab_size, [12, 7, 3], 12)
    # DALL-E: captions with pads (16, 9 and 5 real tokens: bos ... eos, then pad 0), all codes.
    ids = np.zeros((3, m.text_length), np.int64)
    for row, real in enumerate([m.text_length, 9, 5]):
        ids[row, :real] = rng.integers(4, m.vocab_size, real)
        ids[row, 0], ids[row, real - 1] = 2, EOS_ID
    return ids, rng.integers(0, m.codebook_size, (3, m.image_tokens))


def labels_of(name, inputs):
    """Each prediction pair's hard targets (numpy), in distill_outputs' order."""
    if name == "gpt":
        return (inputs[0][:, 1:].reshape(-1),)
    if name in IMAGE_TEXT:   # BriVL: the in-batch columns (its loss before the queue starts)
        n = inputs[0].shape[0]
        return np.arange(n), np.arange(n)
    ids, codes = inputs
    return ids[:, 1:].reshape(-1), codes.reshape(-1)


def module(backend, name):
    import importlib

    return importlib.import_module(f"{'torch_impl' if backend == 'torch' else 'mindspore_impl'}.{name}")


@pytest.fixture(scope="module")
def models():
    """{family: (config, torch model, MindSpore model, weights)}: the same perturbed weights."""
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)
    built = {}
    for name in FAMILIES:
        config = load_config(CONFIGS / name / f"{name}-tiny.yaml")
        torch.manual_seed(0)
        torch_model = taichu.build_model(config, "torch").eval()
        arrays = perturbed_state(torch_model, scale=0.1)
        load_state_dict(torch_model, arrays)
        ms_model = taichu.build_model(config, "mindspore")
        load_state_dict(ms_model, arrays)
        ms_model.set_train(False)
        built[name] = (config, torch_model, ms_model, arrays)
    return built


def to_torch(inputs):
    return tuple(torch.from_numpy(x) for x in inputs)


def to_ms(inputs):
    import mindspore as ms

    return tuple(ms.Tensor(x.astype(np.int32) if np.issubdtype(x.dtype, np.integer) else x) for x in inputs)


def run_torch(name, model, inputs):
    with torch.no_grad():
        return module("torch", name).distill_outputs(model, *to_torch(inputs))


_COMPILED = {}


def run_ms(name, model, inputs, graph):
    """MindSpore's distill_outputs, in graph mode compiled whole by ms.jit (as
    mindspore_impl/train.py compiles training_loss), one compiled function per family."""
    import mindspore as ms

    distill_outputs = module("mindspore", name).distill_outputs
    if graph:
        distill_outputs = _COMPILED.setdefault(name, ms.jit(distill_outputs))
    return distill_outputs(model, *to_ms(inputs))


def leaves(tree, path="out"):
    """[(path, numpy array or bool)] of a nest of tuples, depth first."""
    if isinstance(tree, (tuple, list)):
        return [leaf for i, sub in enumerate(tree) for leaf in leaves(sub, f"{path}[{i}]")]
    if isinstance(tree, bool):
        return [(path, tree)]
    array = tree.detach().numpy() if isinstance(tree, torch.Tensor) else tree.asnumpy()
    return [(path, array)]


def check_structure(name, config, outputs):
    """The three parts have the promised shapes and dtypes, the streams those of the family's
    distill_streams; returns the flattened leaves."""
    loss_outputs, predictions, streams = outputs
    described = get_family(name).distill_streams(config)
    assert len(streams) == len(described)
    for stream, spec in zip(streams, described):
        hidden_states, scores, token_mask, causal = stream
        assert causal is spec.causal and isinstance(causal, bool)
        assert len(hidden_states) == spec.num_layers + 1 and len(scores) == spec.num_layers
        mask = leaves(token_mask)[0][1]
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        batch, length = mask.shape
        for _, h in leaves(hidden_states):
            assert h.shape == (batch, length, spec.hidden_size)
        for _, a in leaves(scores):
            assert a.shape == (batch, spec.num_heads, length, length)
    for logits, weights in predictions:
        (_, logits), (_, weights) = leaves(logits)[0], leaves(weights)[0]
        assert logits.dtype == np.float32 and weights.dtype == np.float32
        assert logits.ndim == 2 and weights.shape == (logits.shape[0],)
    assert len(loss_outputs) >= 1
    return leaves(outputs)


def cross_entropy_rows(logits, labels):
    """float64 -log softmax(logits)[label] per row."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return log_z - logits[np.arange(len(labels)), labels]


# ----------------------------------------------------------------------------- both backends

@pytest.mark.parametrize("graph", [True, False], ids=["graph", "pynative"])
@pytest.mark.parametrize("name", FAMILIES)
def test_backends_give_the_same_distill_outputs(models, name, graph):
    """Same weights, same inputs: every loss output, prediction (logits and row weights) and
    stream element (hidden states, scores, token mask, causal) equal, MindSpore compiled
    (ms.jit, as the trainer runs training_loss) and in PyNative."""
    config, torch_model, ms_model, _ = models[name]
    inputs = family_inputs(name, config)
    expected = check_structure(name, config, run_torch(name, torch_model, inputs))
    got = check_structure(name, config, run_ms(name, ms_model, inputs, graph))
    assert [p for p, _ in got] == [p for p, _ in expected]
    flags = [(p, x) for p, x in expected if isinstance(x, bool)]
    assert flags == [(p, x) for p, x in got if isinstance(x, bool)]
    arrays = [(p, x, y) for (p, x), (_, y) in zip(expected, got) if not isinstance(x, bool)]
    assert all(x.shape == y.shape for _, x, y in arrays)
    diffs = scaled_differences([y for _, _, y in arrays], [x for _, x, _ in arrays])
    worst = max(zip(diffs, (p for p, _, _ in arrays)))
    print(f"[{name}, {'graph' if graph else 'pynative'}] {len(arrays)} arrays, worst "
          f"|mindspore - torch| / max(1, |torch|) {worst[0]:.2e} at {worst[1]}")
    assert worst[0] <= TOL, worst


def distill_objective(outputs, lib):
    """A scalar that reads every tensor of distill_outputs (what a distillation loss does):
    the loss, each prediction's weighted log-sum-exp, each stream's mean squares of hidden
    states and scores (over the token mask)."""
    loss_outputs, predictions, streams = outputs
    total = loss_outputs[0]
    for logits, weights in predictions:
        total = total + (weights * lib.logsumexp(logits, -1)).sum()
    for hidden_states, scores, token_mask, _ in streams:
        for h in hidden_states:
            total = total + ((h * h).mean(-1) * token_mask).mean()
        for a in scores:
            total = total + (a * a).mean() * 0.01
    return total


@pytest.mark.parametrize("name", FAMILIES)
def test_graph_mode_gradients_through_every_output(models, name):
    """MindSpore's jit(value_and_grad(...)) over distill_outputs (the way a compiled
    distillation step differentiates it) equals torch's backward, for an objective that
    reads every output. Bound (tests/tolerance.py): each stream's forward chain at its
    length plus the widest log-sum-exp, walked twice (forward and backward)."""
    import mindspore as ms
    from mindspore_impl.weights import canonical_parameters
    from tolerance import encoder_chain_terms

    config, torch_model, ms_model, _ = models[name]
    inputs = family_inputs(name, config, seed=3)
    torch_model.zero_grad()
    objective = distill_objective(module("torch", name).distill_outputs(torch_model, *to_torch(inputs)),
                                  torch)
    objective.backward()
    grads_torch = {n: p.grad.numpy().copy() for n, p in torch_model.named_parameters() if p.requires_grad}
    torch_model.zero_grad()

    distill_outputs = module("mindspore", name).distill_outputs

    def step(*batch):
        return distill_objective(distill_outputs(ms_model, *batch), ms.ops)
    params = ms_model.trainable_params()
    value, grads = ms.jit(ms.value_and_grad(step, None, params))(*to_ms(inputs))
    objective = float(objective.detach())
    assert abs(float(value.asnumpy()) - objective) <= TOL * max(1.0, abs(objective))
    m = config.model
    if name in IMAGE_TEXT:
        terms = (encoder_chain_terms(m.text, inputs[1].shape[1]) + encoder_chain_terms(
            m.image, m.image.num_positions, m.image.num_channels * m.image.patch_size ** 2))
        if name == "brivl":
            terms += (encoder_chain_terms(m.text_head_size, inputs[1].shape[1])
                      + encoder_chain_terms(m.image_head_size, m.image.num_positions))
    else:
        length = m.max_length if name == "dalle" else inputs[0].shape[1] - 1
        terms = encoder_chain_terms(m, length) + m.vocab_size
    bound = float32_tolerance(1.0, 2 * terms)
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}
    assert len(grads) == len(grads_torch)
    worst = 0.0
    for param, grad in zip(params, grads):
        ref = grads_torch[names[param.name]]
        worst = max(worst, float(np.abs(grad.asnumpy() - ref).max() / max(1.0, np.abs(ref).max())))
    print(f"[{name}] worst gradient difference {worst:.2e}, bound {bound:.2e}")
    assert worst <= bound


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_is_training_loss_and_weights_rebuild_it(models, name):
    """loss_outputs is training_loss's, in each backend; the prediction rows' weights with
    the hard targets rebuild it (sum over pairs and rows of weight * cross-entropy), which
    is what makes the soft cross-entropy of the distillation the student's own loss's
    weighting; DALL-E's pad targets get weight 0."""
    config, torch_model, ms_model, arrays = models[name]
    inputs = family_inputs(name, config, seed=1)
    # torch in float64: the distillation path writes attention out, training_loss keeps the
    # fused kernel, and in float32 the two round differently.
    model64 = taichu.build_model(config, "torch").double().eval()
    load_state_dict(model64, arrays)
    inputs64 = tuple(x.astype(np.float64) if x.dtype == np.float32 else x for x in inputs)
    with torch.no_grad():
        loss_outputs, predictions, _ = module("torch", name).distill_outputs(model64, *to_torch(inputs64))
        expected = module("torch", name).training_loss(model64, *to_torch(inputs64))
    # Every output (BriVL's keys too, which after_step enqueues).
    assert len(loss_outputs) == len(expected)
    assert max(scaled_differences([a.numpy() for a in loss_outputs], [b.numpy() for b in expected])) <= 1e-10
    # MindSpore: the same kernels in both (its attention is always written out).
    ms_loss, predictions32, _ = run_ms(name, ms_model, inputs, graph=False)
    ms_expected = module("mindspore", name).training_loss(ms_model, *to_ms(inputs))
    assert len(ms_loss) == len(ms_expected)
    assert max(scaled_differences([a.asnumpy() for a in ms_loss], [b.asnumpy() for b in ms_expected])) <= TOL
    # float32 (MindSpore) logits, the rows' cross-entropies in float64: the loss within the
    # rounding of its float32 log-sum-exp over the classes and its mean over the rows.
    rebuilt, scale, terms = 0.0, float(ms_expected[0].asnumpy()), 0
    for (logits, weights), labels in zip(predictions32, labels_of(name, inputs)):
        logits, weights = logits.asnumpy(), weights.asnumpy()
        rebuilt += float((weights.astype(np.float64) * cross_entropy_rows(logits, labels)).sum())
        scale += float(np.abs(logits).max())
        terms += logits.shape[1] + logits.shape[0]
    # Each pair's weights sum to its head's share of the loss.
    shares = ([1.0] if name == "gpt" else [0.5, 0.5] if name in IMAGE_TEXT else
              [ms_model.text_weight, ms_model.image_weight])
    np.testing.assert_allclose([w.asnumpy().sum() for _, w in predictions32], shares, rtol=1e-6)
    assert abs(rebuilt - float(ms_expected[0].asnumpy())) <= float32_tolerance(scale, terms)
    if name == "dalle":
        text_weights = predictions32[0][1].asnumpy()
        pads = inputs[0][:, 1:].reshape(-1) == PAD_ID
        assert pads.any() and (text_weights[pads] == 0).all() and (text_weights[~pads] > 0).all()
    # torch's float64 predictions equal MindSpore's float32 ones within the parity bound.
    for (a, wa), (b, wb) in zip(predictions, predictions32):
        assert max(scaled_differences([b.asnumpy(), wb.asnumpy()], [a.numpy(), wa.numpy()])) <= TOL


def default_outputs(name, model, inputs, backend, flag):
    """The model's forward on training_loss's inputs, without (flag False) or with the
    intermediates flag, cut to what the default path returns (BriVL: its two online encoders,
    which training_loss and distill_outputs call)."""
    if name == "brivl":
        pixels, ids, mask = to_torch(inputs) if backend == "torch" else to_ms(inputs)
        calls = ((model.image_encoder, (pixels,)), (model.text_encoder, (ids, mask)))
        with torch.no_grad():
            return tuple(encoder(*args, True)[0] if flag else encoder(*args) for encoder, args in calls)
    if name == "gpt":
        args = (inputs[0][:, :-1],)
    elif name == "clip":
        args = inputs
    else:
        args = (inputs[0], inputs[1][:, :-1])
    if backend == "torch":
        with torch.no_grad():
            out = model(*to_torch(args), output_intermediates=flag) if flag else model(*to_torch(args))
    else:
        out = model(*to_ms(args), output_intermediates=flag) if flag else model(*to_ms(args))
    if name == "gpt":
        return (out[0] if flag else out,)
    return tuple(out[:2])


@pytest.mark.parametrize("name", FAMILIES)
def test_default_paths_are_unchanged(models, name):
    """Without the flag a forward returns what it returned before, and the same numbers as
    with it: torch in float64 (its default path keeps the fused scaled_dot_product_attention,
    the flag writes attention out; float64 so rounding cannot decide), MindSpore in float32
    (the same kernels either way). The towers' pooled outputs too; the GPT's ln_f and head
    on the last hidden state give its logits."""
    config, _, ms_model, arrays = models[name]
    inputs = family_inputs(name, config, seed=2)
    model64 = taichu.build_model(config, "torch").double().eval()
    load_state_dict(model64, arrays)
    inputs64 = tuple(x.astype(np.float64) if x.dtype == np.float32 else x for x in inputs)
    plain = default_outputs(name, model64, inputs64, "torch", False)
    flagged = default_outputs(name, model64, inputs64, "torch", True)
    assert len(plain) == len(flagged)
    for a, b in zip(plain, flagged):
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float64
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max()))
    ms_plain = default_outputs(name, ms_model, inputs, "mindspore", False)
    ms_flagged = default_outputs(name, ms_model, inputs, "mindspore", True)
    assert max(scaled_differences([x.asnumpy() for x in ms_flagged], [x.asnumpy() for x in ms_plain])) <= TOL
    with torch.no_grad():
        if name == "gpt":
            logits, hidden_states, _ = model64(torch.from_numpy(inputs[0]), output_intermediates=True)
            assert float((model64.output_logits(hidden_states[-1]) - logits).abs().max()) <= 1e-10
            # With the cache too: (logits, presents, hidden_states, scores).
            cached = model64(torch.from_numpy(inputs[0]), use_cache=True, output_intermediates=True)
            assert len(cached) == 4 and len(cached[1]) == config.model.num_layers
        if name == "clip":
            pixels, ids, mask = to_torch(inputs64)
            for tower, args in ((model64.text_model, (ids, mask)), (model64.vision_model, (pixels,))):
                pooled, hidden_states, scores = tower(*args, output_intermediates=True)
                assert float((tower(*args) - pooled).abs().max()) <= 1e-10
                assert len(hidden_states) == len(scores) + 1
        if name == "brivl":
            # A head's first hidden state is its backbone's (normalised) output.
            pixels, ids, mask = to_torch(inputs64)
            image = model64.image_encoder(pixels, True)
            text = model64.text_encoder(ids, mask, True)
            assert float((image[3][0] - model64.image_encoder.backbone(pixels)).abs().max()) <= 1e-10
            assert float((text[3][0] - model64.text_encoder.backbone(ids, mask)).abs().max()) <= 1e-10


# ----------------------------------------------------------------------------- oracles

def probabilities(scores, allowed=None):
    """float64 softmax of raw scores over the keys a query may see (others probability 0)."""
    scores = scores.astype(np.float64)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(scores)
    return e / e.sum(axis=-1, keepdims=True)


def causal_allowed(mask):
    """[batch, 1, length, length]: key k <= query q and k a real token."""
    length = mask.shape[1]
    causal = np.tril(np.ones((length, length), bool))
    return causal[None, None] & (mask[:, None, None, :] != 0)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A random Hugging Face CLIPModel (eager attention, every weight perturbed), converted
    to a taichu directory by the project's converter."""
    from transformers import CLIPConfig, CLIPModel

    common = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
    hf_config = CLIPConfig(
        text_config={**common, "vocab_size": 4096, "hidden_size": 32, "intermediate_size": 80,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32,
                     "pad_token_id": PAD_ID, "bos_token_id": 2, "eos_token_id": EOS_ID},
        vision_config={**common, "hidden_size": 48, "intermediate_size": 112, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "num_channels": 3},
        projection_dim=24, logit_scale_init_value=2.6592)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf_model = CLIPModel(hf_config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    root = tmp_path_factory.mktemp("hf_clip")
    hf_model.save_pretrained(root / "hf")
    convert.convert(root / "hf", root / "ours")
    return hf_model, root / "ours"


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_clip_streams_equal_hugging_face(hf_clip, backend):
    """Text (right-padded, padding in two rows) and vision hidden states equal Hugging Face's
    hidden_states; softmax(scores + causal/padding bias) equals its attentions on the real
    query rows (vision: every row, no bias); the logits equal its logits."""
    hf_model, ours = hf_clip
    model = taichu.load_model(ours, backend=backend)
    rng = np.random.default_rng(3)
    pixels = rng.standard_normal((3, 3, 32, 32)).astype(np.float32)
    ids, mask = caption_batch(rng, 4096, [9, 4, 13], 13)
    inputs = (pixels, ids, mask)
    if backend == "torch":
        model.eval()
        outputs = run_torch("clip", model, inputs)
    else:
        model.set_train(False)
        outputs = run_ms("clip", model, inputs, graph=False)
    _, predictions, streams = [[(leaves(x)) for x in part] for part in outputs]
    with torch.no_grad():
        hf = hf_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels),
                      attention_mask=torch.from_numpy(mask), output_hidden_states=True,
                      output_attentions=True)
    towers = {"text": (hf.text_model_output, causal_allowed(mask), mask != 0),
              "image": (hf.vision_model_output, None, np.ones((3, 17), bool))}
    for (tower, (hf_out, allowed, real)), stream in zip(towers.items(), streams):
        hidden = [x for _, x in stream[:len(hf_out.hidden_states)]]
        scores = [x for _, x in stream[len(hidden):len(hidden) + len(hf_out.attentions)]]
        assert len(hidden) == len(hf_out.hidden_states) == 3 and len(scores) == len(hf_out.attentions) == 2
        assert stream[-1][1] is (tower == "text")
        np.testing.assert_array_equal(stream[-2][1], real.astype(np.float32))
        diffs = scaled_differences(hidden, [h.numpy() for h in hf_out.hidden_states])
        ours_probs = [probabilities(a, allowed)[np.broadcast_to(real[:, None, :, None], a.shape)]
                      for a in scores]
        hf_probs = [a.numpy()[np.broadcast_to(real[:, None, :, None], a.shape)] for a in hf_out.attentions]
        # Probabilities lie in [0, 1]: the absolute difference is the relative one.
        prob_diffs = [float(np.abs(a - b).max()) for a, b in zip(ours_probs, hf_probs)]
        print(f"[{backend}, {tower}] hidden {diffs}, attention probabilities {prob_diffs}")
        assert max(diffs) <= TOL and max(prob_diffs) <= TOL, (tower, diffs, prob_diffs)
    logits = [x for _, x in predictions[0][:1]] + [x for _, x in predictions[1][:1]]
    assert max(scaled_differences(logits, [hf.logits_per_image.numpy(), hf.logits_per_text.numpy()])) <= TOL


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A random Hugging Face GPT2LMHeadModel (eager attention, every weight random),
    converted by the project's converter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(vocab_size=300, n_positions=40, n_embd=64, n_layer=3, n_head=4,
                           bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    hf_model = GPT2LMHeadModel(hf_config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    root = tmp_path_factory.mktemp("hf_gpt2")
    hf_model.save_pretrained(root / "hf")
    convert.convert(root / "hf", root / "ours")
    return hf_model, root / "ours"


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_gpt_streams_equal_hugging_face(hf_gpt2, backend):
    """hidden_states 0..N-1 equal GPT-2's; its last one is ln_f of ours (HF applies the final
    LayerNorm there, we give the raw residual stream); softmax(scores + causal bias) equals
    its attentions; the prediction logits equal its logits."""
    hf_model, ours = hf_gpt2
    model = taichu.load_model(ours, backend=backend)
    ids = np.random.default_rng(4).integers(0, 300, (2, 12))
    if backend == "torch":
        model.eval()
        outputs = run_torch("gpt", model, (ids,))
    else:
        model.set_train(False)
        outputs = run_ms("gpt", model, (ids,), graph=False)
    (hidden_states, scores, _, causal), = outputs[2]
    assert causal is True
    with torch.no_grad():
        hf = hf_model(torch.from_numpy(ids[:, :-1]), output_hidden_states=True, output_attentions=True)
    hidden = [x for _, x in leaves(hidden_states)]
    if backend == "torch":
        with torch.no_grad():
            last = model.ln_f(hidden_states[-1]).numpy()
    else:
        last = model.ln_f(hidden_states[-1]).asnumpy()
    assert len(hidden) == len(hf.hidden_states) == 4
    diffs = scaled_differences(hidden[:-1] + [last], [h.numpy() for h in hf.hidden_states])
    allowed = causal_allowed(np.ones(ids[:, :-1].shape))
    prob_diffs = [float(np.abs(probabilities(a, allowed) - b.numpy()).max())
                  for (_, a), b in zip(leaves(scores), hf.attentions)]
    logits = leaves(outputs[1][0][0])[0][1]
    logit_diff = scaled_differences([logits], [hf.logits.numpy().reshape(-1, 300)])
    print(f"[{backend}] hidden {diffs}, attention probabilities {prob_diffs}, logits {logit_diff}")
    assert max(diffs + prob_diffs + logit_diff) <= TOL
