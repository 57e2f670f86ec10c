"""The tri-modal model (torch_impl/trimodal.py, mindspore_impl/trimodal.py), model level.

Same canonical weights give the same three embeddings, loss terms and gradients in both
backends (MindSpore in PyNative and in graph mode, as its trainer compiles training_loss),
including batches where rows lack a modality and a batch with no speech at all;
``pair_loss`` is the definition (a numpy float64 reference); with every row present the
image-text term is CLIP's loss; placeholders of missing modalities never reach the loss;
frozen towers and the mask embedding are outside the trained parameters in both backends.
"""
import numpy as np
import pytest
import torch

import taichu
from taichu.config import load_config
from taichu.families.trimodal import LOGIT_SCALES, shortest_audio, tensor_specs, trained
from conftest import CONFIGS
from tolerance import U32, float32_tolerance, scaled_differences

TINY = CONFIGS / "trimodal" / "trimodal-tiny.yaml"
PAD_ID, BOS_ID, EOS_ID = 0, 2, 3     # taichu.config.SpecialTokens defaults
TOL = 1e-5                           # float32, relative to max(1, |reference|): the project's contract
TEXT_WIDTH, AUDIO_WIDTH = 12, 2400   # one shape for every batch: one compiled graph per test
# Rows (image, text, speech): all present; one row without each modality (every pair keeps
# two rows); image-text pairs with no speech (speech-text terms 0).
FULL = np.ones((4, 3), np.float32)
MIXED = np.array([[1, 1, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1]], np.float32)
NO_SPEECH = np.array([[1, 1, 0]] * 4, np.float32)


@pytest.fixture(scope="module")
def config():
    return load_config(TINY)


def batch(config, present, seed):
    """The training_loss inputs of a batch (numpy), placeholders where a modality is
    missing as taichu.trimodal_data makes them: zero pixels, the text [bos, eos], zero audio
    of the receptive field's length."""
    rng = np.random.default_rng(seed)
    n, size = len(present), config.model.image.image_size
    pixels = np.zeros((n, 3, size, size), np.float32)
    ids = np.full((n, TEXT_WIDTH), PAD_ID, np.int64)
    mask = np.zeros((n, TEXT_WIDTH), np.int64)
    values = np.zeros((n, AUDIO_WIDTH), np.float32)
    audio_mask = np.zeros((n, AUDIO_WIDTH), np.int32)
    for row, (image, text, speech) in enumerate(present):
        if image:
            pixels[row] = rng.standard_normal((3, size, size))
        length = int(rng.integers(2, TEXT_WIDTH + 1)) if text else 2
        ids[row, :length - 1] = rng.integers(4, config.model.text.vocab_size, length - 1) if text else BOS_ID
        ids[row, length - 1] = EOS_ID
        mask[row, :length] = 1
        # A clip shorter than the receptive field has no frame (its mean would be 0 / 0).
        shortest = shortest_audio(config)
        samples = int(rng.integers(shortest, AUDIO_WIDTH + 1)) if speech else shortest
        if speech:
            values[row, :samples] = rng.standard_normal(samples)
        audio_mask[row, :samples] = 1
    return pixels, ids, mask, values, audio_mask, present.copy()


def t(*arrays):
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def ms_t(*arrays):
    """MindSpore tensors; int64 as int32 (what the trainer feeds, and MindSpore's CPU Gather)."""
    import mindspore as ms

    return tuple(ms.Tensor(a.astype(np.int32) if a.dtype == np.int64 else np.ascontiguousarray(a)) for a in arrays)


def compiled(fn, graph: bool):
    import mindspore as ms

    return ms.jit(fn) if graph else fn


def perturbed_arrays(config, seed: int = 0) -> dict:
    """A torch model's canonical state with every tensor perturbed (LayerNorms not 1/0, no
    zero biases), so a swapped or dropped tensor would show."""
    torch.manual_seed(seed)
    arrays = taichu.state_dict(taichu.build_model(config, "torch"))
    rng = np.random.default_rng(seed + 100)
    return {k: np.asarray(v + 0.05 * rng.standard_normal(v.shape), v.dtype) for k, v in arrays.items()}


def both_models(config, arrays, train=False):
    """(torch model, MindSpore model) holding the same canonical arrays."""
    models = []
    for backend in ("torch", "mindspore"):
        model = taichu.build_model(config, backend)
        taichu.load_state_dict(model, arrays)
        if backend == "torch":
            model.train(train)
        else:
            model.set_train(train)
        models.append(model)
    return tuple(models)


def relative(a, b) -> float:
    """|a - b| / max(1, |b|) of two scalars."""
    return abs(float(a) - float(b)) / max(1.0, abs(float(b)))


# ----------------------------------------------------------------------------- (1) names

def test_names_round_trip_and_trained_parameters():
    """Canonical names and shapes are the tensor specs in both backends; torch's weights go
    into MindSpore and come back bit for bit; the trained parameters are those trained()
    names (no frozen tower, never the mask embedding) in both backends."""
    from mindspore_impl.weights import canonical_parameters

    for frozen in ([], ["speech"], ["image", "text"]):
        config = load_config(TINY, [f"model.frozen_towers={frozen}"])
        specs = tensor_specs(config)
        expected = {name for name in specs if trained(name, config)}
        assert "wav2vec2.masked_spec_embed" not in expected
        assert ("wav2vec2.encoder.layer_norm.weight" in expected) == ("speech" not in frozen)
        torch_model = taichu.build_model(config, "torch")
        ms_model = taichu.build_model(config, "mindspore")
        arrays = taichu.state_dict(torch_model)
        assert {k: v.shape for k, v in arrays.items()} == {k: s.shape for k, s in specs.items()}
        taichu.load_state_dict(ms_model, arrays)
        back = taichu.state_dict(ms_model)
        assert list(back) == list(arrays) and all(np.array_equal(back[k], arrays[k]) for k in arrays)
        names = {param.name: name for name, (param, _) in canonical_parameters(ms_model).items()}
        assert {names[p.name] for p in ms_model.trainable_params()} == expected, frozen
        assert {n for n, p in torch_model.named_parameters() if p.requires_grad} == expected, frozen


# ----------------------------------------------------------------------------- (2) parity

def torch_step(model, inputs):
    """(image, text, speech embeddings, (image-text, text-speech, image-speech terms), total,
    {name: gradient of the total} of the trained parameters), numpy."""
    from torch_impl.trimodal import pair_losses, training_loss

    tensors = t(*inputs)
    with torch.no_grad():
        embeddings = model(*tensors[:5])
        terms = pair_losses(model, *tensors)
    model.zero_grad()
    total = training_loss(model, *tensors)[0]
    total.backward()
    return ([e.numpy() for e in embeddings], [float(x) for x in terms], total.item(),
            {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.requires_grad})


def ms_step(model, graph):
    """A function of the inputs giving what torch_step gives: training_loss differentiated
    with respect to trainable_params() by value_and_grad, as the trainer's step does, the
    embeddings and the terms carried along (has_aux); in graph mode one compiled graph for
    all of it (each graph costs ~10 s to compile here, so one per test)."""
    import mindspore as ms

    from mindspore_impl.trimodal import pair_losses, training_loss
    from mindspore_impl.weights import canonical_parameters
    from taichu.weights import from_mindspore_array

    params = model.trainable_params()
    # MindSpore name -> (canonical name, layer kind): gradients in canonical layout (3-D convs).
    names = {param.name: (name, kind) for name, (param, kind) in canonical_parameters(model).items()}

    def forward(*x):
        return (training_loss(model, *x)[0],) + model(*x[:5]) + pair_losses(model, *x)

    step = compiled(ms.value_and_grad(forward, None, params, has_aux=True), graph)

    def run(inputs):
        outputs, grads = step(*ms_t(*inputs))
        values = [x.asnumpy() for x in outputs]
        return (values[1:4], [float(x) for x in values[4:]], float(values[0]),
                {names[p.name][0]: from_mindspore_array(g.asnumpy(), names[p.name][1])
                 for p, g in zip(params, grads)})

    return run


def worst_gradient_difference(got, expected):
    """(max |got - expected| / max |expected| over the tensors, the tensor). k_proj biases
    have a zero true gradient (softmax ignores a per-query constant): measured against
    their attention's largest weight gradient instead of their own rounding noise. A tensor
    whose gradient is exactly zero (a tower with no row in any pair) must be exactly zero in
    both: its terms are multiplied by exactly 0."""
    worst, where = 0.0, None
    for name, g in expected.items():
        scale = np.abs(g).max()
        if name.endswith("k_proj.bias"):
            scale = max(np.abs(expected[name.replace("k_proj.bias", f"{p}.weight")]).max()
                        for p in ("q_proj", "k_proj", "v_proj"))
        diff = float(np.abs(got[name] - g).max() / scale) if scale > 0 else float(np.abs(got[name]).max() > 0)
        if diff > worst:
            worst, where = diff, name
    return worst, where


# Graph mode (what the trainer compiles) on every batch; PyNative, with the speech tower
# frozen, on the batches that lack modalities (op by op, ~3 s a step here).
@pytest.mark.parametrize("frozen, ms_mode, batches", [
    ([], "graph", (("full", FULL, 1), ("mixed", MIXED, 2), ("no speech", NO_SPEECH, 3))),
    (["speech"], "pynative", (("mixed", MIXED, 2), ("no speech", NO_SPEECH, 3)))],
    indirect=["ms_mode"], ids=["graph", "pynative-frozen-speech"])
def test_same_weights_same_embeddings_losses_and_gradients(frozen, ms_mode, batches):
    """torch's weights -> canonical arrays -> MindSpore: the three normalised embeddings
    within 1e-5, every loss term and the total within 1e-5 relative, and every trained
    parameter's gradient of the total within 1e-4 of the tensor's largest (the CLIP and
    wav2vec2 tests' measure), on a full batch, one whose rows each lack a modality and one
    without speech (speech terms exactly 0, the speech tower's gradients exactly 0). A
    frozen tower has no trained parameter and no gradient in either backend."""
    config = load_config(TINY, [f"model.frozen_towers={frozen}"])
    torch_model, ms_model = both_models(config, perturbed_arrays(config), train=True)
    step = ms_step(ms_model, ms_mode == "graph")
    for name, present, seed in batches:
        inputs = batch(config, present, seed)
        expected, got = torch_step(torch_model, inputs), step(inputs)
        embedding_diffs = scaled_differences(got[0], expected[0])
        loss_diffs = [relative(a, b) for a, b in zip(got[1] + [got[2]], expected[1] + [expected[2]])]
        worst, where = worst_gradient_difference(got[3], expected[3])
        print(f"[{ms_mode}, frozen {frozen}, {name}] terms torch {expected[1]}; |torch - mindspore| "
              f"embeddings (image, text, speech) {embedding_diffs}, terms and total (relative) {loss_diffs}, "
              f"worst gradient / max |gradient| {worst:.1e} ({where})")
        assert max(embedding_diffs) <= TOL and max(loss_diffs) <= TOL
        assert worst <= 1e-4, (worst, where)
        assert sorted(got[3]) == sorted(expected[3]) == sorted(n for n in tensor_specs(config) if trained(n, config))
        assert all(np.isfinite(e).all() for e in got[0]) and expected[1][0] > 0
        if name == "no speech":
            assert expected[1][1:] == got[1][1:] == [0.0, 0.0]
    speech_trains = any(n.startswith(("wav2vec2.", "speech_projection.")) for n in got[3])
    assert speech_trains == (frozen == [])
    assert all(p.grad is None for n, p in torch_model.named_parameters() if not trained(n, config))


def test_features_are_the_unnormalised_embeddings(config):
    """get_*_features (the checked entry points) give the embeddings before normalisation,
    the same in both backends."""
    torch_model, ms_model = both_models(config, perturbed_arrays(config))
    inputs = batch(config, FULL, 4)
    with torch.no_grad():
        tensors = t(*inputs)
        expected = (torch_model.get_image_features(tensors[0]), torch_model.get_text_features(*tensors[1:3]),
                    torch_model.get_speech_features(*tensors[3:5]))
        normalised = torch_model(*tensors[:5])
    for e, n in zip(expected, normalised):
        assert np.abs((e / e.norm(dim=-1, keepdim=True)) - n).max() <= TOL
    tensors = ms_t(*inputs)
    got = (ms_model.get_image_features(tensors[0]), ms_model.get_text_features(*tensors[1:3]),
           ms_model.get_speech_features(*tensors[3:5]))
    diffs = scaled_differences([g.asnumpy() for g in got], [e.numpy() for e in expected])
    print(f"|torch - mindspore| / max(1, |.|) image, text, speech features {diffs}")
    assert max(diffs) <= TOL


# ----------------------------------------------------------------------------- (3) the loss

def numpy_pair_loss(a, b, logit_scale, valid):
    """The definition in float64: CLIP's symmetric cross-entropy over the valid rows alone
    (the others are neither queries nor candidates); 0 when none is valid."""
    keep = np.flatnonzero(valid)
    if len(keep) == 0:
        return 0.0
    logits = a[keep].astype(np.float64) @ b[keep].astype(np.float64).T * np.exp(np.float64(logit_scale))

    def cross_entropy(rows):
        top = rows.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0] - np.diag(rows)))

    return (cross_entropy(logits) + cross_entropy(logits.T)) / 2


VALID = [np.array(v, np.float32) for v in ([1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1], [0, 0, 0, 1, 0, 0],
                                           [0, 0, 0, 0, 0, 0])]


def test_pair_loss_is_the_definition(ms_mode):
    """pair_loss against numpy_pair_loss for all, some, one and no valid rows, both backends.

    In float64 the only differences are float64 roundings (bound: tolerance's float32 one
    with u = 2^-53). In float32 (the training path): each logit is exp(s) times a dot product
    of d terms of unit vectors (sum |a_k b_k| <= 1), so it is within gamma_d exp(s) plus the
    exp's own error of the exact value; the loss moves by at most the logits' largest error
    (log-sum-exp and the diagonal are 1-Lipschitz in the max norm), plus the log-sum-exp's
    n-term sums. MindSpore's float32 Exp is not correctly rounded (~2e-6 relative,
    mindspore_impl/wav2vec2.py's gumbel_temperature): counted as 34 more roundings (2e-6 / 2^-24)."""
    import mindspore as ms

    from mindspore_impl.trimodal import pair_loss as ms_pair_loss
    from torch_impl.trimodal import pair_loss as torch_pair_loss

    rng = np.random.default_rng(5)
    n, d, logit_scale = 6, 24, 2.6592600369644165
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.standard_normal((2, n, d)))
    # Loosely matched pairs: a loss well inside (0, ln n), moved by any row left in or out.
    b = (a + 3 * b) / np.linalg.norm(a + 3 * b, axis=1, keepdims=True)
    ms_loss = compiled(ms_pair_loss, ms_mode == "graph")
    tol64 = 2 * (d + n + 8) * (U32 * 2.0 ** -29) * (np.exp(logit_scale) + np.log(n))
    tol32 = float32_tolerance(np.exp(logit_scale) + np.log(n), d + n + 34)
    for valid in VALID:
        expected = numpy_pair_loss(a, b, logit_scale, valid)
        for dtype, tol in ((np.float64, tol64), (np.float32, tol32)):
            args = (a.astype(dtype), b.astype(dtype), np.array(logit_scale, dtype), valid.astype(dtype))
            got_torch = float(torch_pair_loss(*t(*args)))
            got_ms = float(ms_loss(*(ms.Tensor(x) for x in args)).asnumpy())
            print(f"[{ms_mode}, {np.dtype(dtype).name}, valid {valid.astype(int)}] numpy {expected}, "
                  f"|torch - numpy| {abs(got_torch - expected):.2e}, |mindspore - numpy| "
                  f"{abs(got_ms - expected):.2e} (tolerance {tol:.1e})")
            assert abs(got_torch - expected) <= tol and abs(got_ms - expected) <= tol
    # Guards: a row left out changes the loss; no valid row gives exactly 0.
    assert abs(numpy_pair_loss(a, b, logit_scale, VALID[0]) - numpy_pair_loss(a, b, logit_scale, VALID[1])) > 1e-2
    assert numpy_pair_loss(a, b, logit_scale, VALID[3]) == 0.0


def test_image_text_term_is_clip_loss_when_all_rows_are_present(config):
    """With every row present the image-text term is CLIP's contrastive loss (torch_impl.clip,
    an independent implementation: F.cross_entropy) of the same embeddings' logits, in both
    backends. Same logits, two float32 reductions of n terms: within float32_tolerance of
    the logits' size and the loss."""
    from mindspore_impl.trimodal import pair_losses as ms_pair_losses
    from torch_impl.clip import contrastive_loss
    from torch_impl.trimodal import pair_losses

    torch_model, ms_model = both_models(config, perturbed_arrays(config))
    inputs = batch(config, FULL, 6)
    with torch.no_grad():
        image, text, _ = torch_model(*t(*inputs[:5]))
        logits = image @ text.T * torch_model.logit_scale.exp()
        expected = float(contrastive_loss(logits))
        got_torch = float(pair_losses(torch_model, *t(*inputs))[0])
    got_ms = float(ms_pair_losses(ms_model, *ms_t(*inputs))[0].asnumpy())
    tol = float32_tolerance(float(logits.abs().max()) + expected, len(inputs[0]) + 4)
    print(f"image-text term: CLIP {expected}, |torch - CLIP| {abs(got_torch - expected):.2e}, "
          f"|mindspore - CLIP| {abs(got_ms - expected):.2e} (tolerances {tol:.1e}, {TOL} across backends)")
    assert abs(got_torch - expected) <= tol and relative(got_ms, expected) <= TOL


def test_placeholders_do_not_reach_the_loss(config):
    """Other placeholder pixels, audio and text ids of rows that lack that modality leave
    every loss term as it was, bit for bit: a left-out column's logits lose 1e9, so its exp
    is exactly 0, and a left-out row's terms are multiplied by exactly 0 (each other entry of
    the logits reads only its own two rows)."""
    from mindspore_impl.trimodal import pair_losses as ms_pair_losses
    from torch_impl.trimodal import pair_losses

    torch_model, ms_model = both_models(config, perturbed_arrays(config))
    inputs = batch(config, MIXED, 7)
    changed = [x.copy() for x in inputs]
    rng = np.random.default_rng(8)
    changed[0][1] = rng.standard_normal(changed[0][1].shape)                    # row 1 has no image
    changed[3][2, :shortest_audio(config)] = rng.standard_normal(shortest_audio(config))   # row 2 no speech
    changed[1][3, 0] = 1000                                                     # row 3 has no text
    with torch.no_grad():
        before, after = (tuple(float(x) for x in pair_losses(torch_model, *t(*x))) for x in (inputs, changed))
    ms_before, ms_after = (tuple(float(x.asnumpy()) for x in ms_pair_losses(ms_model, *ms_t(*x)))
                           for x in (inputs, changed))
    print(f"terms torch {before} -> {after}, mindspore {ms_before} -> {ms_after}")
    assert before == after and ms_before == ms_after
    # Guard: the same change in a row that has the modality moves the loss.
    moved = [x.copy() for x in inputs]
    moved[0][0] = changed[0][1]
    with torch.no_grad():
        assert abs(float(pair_losses(torch_model, *t(*moved))[0]) - before[0]) > 1e-3


# ----------------------------------------------------------------------------- (4) after a step

def test_after_step_clamps_every_logit_scale(config):
    """Every pair's temperature is clipped to [0, ln 100] after a step, in both backends
    (MindSpore in place, so compiled graphs see it)."""
    import mindspore as ms

    from mindspore_impl.trimodal import after_step as ms_after_step
    from torch_impl.trimodal import after_step

    values = (7.0, -1.0, 3.0)
    torch_model = taichu.build_model(config, "torch")
    ms_model = taichu.build_model(config, "mindspore")
    with torch.no_grad():
        for name, value in zip(LOGIT_SCALES, values):
            getattr(torch_model, name).fill_(value)
    for name, value in zip(LOGIT_SCALES, values):
        ms.ops.assign(getattr(ms_model, name), ms.Tensor(value, ms.float32))
    after_step(torch_model)
    ms_after_step(ms_model)
    expected = [np.log(np.float32(100.0)), 0.0, 3.0]
    assert np.allclose([float(getattr(torch_model, n).detach()) for n in LOGIT_SCALES], expected, rtol=0, atol=1e-6)
    assert np.allclose([float(getattr(ms_model, n).asnumpy()) for n in LOGIT_SCALES], expected, rtol=0, atol=1e-6)
