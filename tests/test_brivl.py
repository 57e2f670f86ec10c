"""BriVL (WenLan) in both backends: same weights give the same embeddings and logits;
padding is invisible; the MoCo loss and the queue / momentum update after each step
agree across backends and with numpy; queue_size 0 is the in-batch loss; model
directories keep the momentum towers and the queues."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import taichu
from taichu.api import backend_of
from taichu.config import load_config, validate_config
from taichu.families import get_family, num_parameters
from tolerance import scaled_differences, unit_norm_tolerance
from conftest import CONFIGS

TINY = CONFIGS / "brivl" / "brivl-tiny.yaml"
PAD_ID, EOS_ID = 0, 3     # taichu.config.SpecialTokens defaults
VOCAB = 4096              # brivl-tiny's
TOL = 1e-5


@pytest.fixture
def brivl_config():
    return load_config(TINY)


def caption_batch(rng, lengths, width=None):
    """Right-padded ids and mask; each row: random ordinary ids, eos last, then padding."""
    width = width or max(lengths)
    ids = np.full((len(lengths), width), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n - 1] = rng.integers(4, VOCAB, n - 1)
        ids[row, n - 1] = EOS_ID
        mask[row, :n] = 1
    return ids, mask


def images(rng, batch, config):
    image = config.model.image
    return rng.standard_normal((batch, image.num_channels, image.image_size, image.image_size)
                               ).astype(np.float32)


def build(config, backend, seed=0):
    import mindspore as ms
    import torch

    torch.manual_seed(seed)
    ms.set_seed(seed)
    model = taichu.build_model(config, backend)
    if backend == "torch":
        model.eval()
    else:
        model.set_train(False)
    return model


def distinct_state(config, seed=0):
    """A canonical state whose momentum towers differ from the online ones and whose
    queues and pointer are not the initial ones, so that a test which mixed up online
    and momentum tensors, or ignored the queues, would fail; its update count (7) is past
    brivl-tiny's queue_start_step (3), so the queues count in the loss."""
    arrays = taichu.state_dict(build(config, "torch", seed))
    rng = np.random.default_rng(seed + 100)
    for name, array in arrays.items():
        if name.split(".")[0].endswith("_m"):
            arrays[name] = (array + 0.02 * rng.standard_normal(array.shape)).astype(np.float32)
    queue_size = config.model.moco.queue_size
    if queue_size:
        arrays["queue_ptr"] = np.array([queue_size // 3], np.int64)
    arrays["num_updates"] = np.array([7], np.int64)
    return arrays


def to_ms(*arrays):
    import mindspore as ms

    # MindSpore's CPU Gather wants int32 ids; the values are the same.
    return tuple(ms.Tensor(a.astype(np.int32) if a.dtype == np.int64 else a) for a in arrays)


def to_torch(*arrays):
    import torch

    return tuple(torch.from_numpy(a) for a in arrays)


# One entry point per backend: (logits_per_image, logits_per_text[, image features, text features]).
def torch_outputs(model, pixels, ids, mask, features=True):
    import torch

    with torch.no_grad():
        pixels_t, ids_t, mask_t = to_torch(pixels, ids, mask)
        out = tuple(model(pixels_t, ids_t, mask_t))
        if features:
            out += (model.get_image_features(pixels_t), model.get_text_features(ids_t, mask_t))
        return tuple(x.numpy() for x in out)


def ms_outputs(model, pixels, ids, mask, features=True):
    pixels_t, ids_t, mask_t = to_ms(pixels, ids, mask)
    out = tuple(model(pixels_t, ids_t, mask_t))
    if features:
        out += (model.get_image_features(pixels_t), model.get_text_features(ids_t, mask_t))
    return tuple(x.asnumpy() for x in out)


def text_features(model, ids, mask):
    args = (ids,) if mask is None else (ids, mask)
    if backend_of(model) == "torch":
        import torch

        with torch.no_grad():
            return model.get_text_features(*to_torch(*args)).numpy()
    return model.get_text_features(*to_ms(*args)).asnumpy()


def image_features(model, pixels):
    if backend_of(model) == "torch":
        import torch

        with torch.no_grad():
            return model.get_image_features(*to_torch(pixels)).numpy()
    return model.get_image_features(*to_ms(pixels)).asnumpy()


OUTPUTS = {"torch": torch_outputs, "mindspore": ms_outputs}


def max_diffs(a, b):
    """Max |a - b| / max(1, max |b|) of each output."""
    return scaled_differences(a, b)


# (1) torch vs MindSpore forward ---------------------------------------------------------

def test_same_weights_same_embeddings_and_logits(brivl_config, ms_mode):
    arrays = distinct_state(brivl_config, seed=1)
    models = {}
    for backend in ("torch", "mindspore"):
        models[backend] = build(brivl_config, backend, seed=2)
        taichu.load_state_dict(models[backend], arrays)
    rng = np.random.default_rng(0)
    # Two batch sizes; right-padded texts of different lengths, one at the full context,
    # one only an eos; more texts than images, so the logit matrices are not square.
    for n_images, lengths in ((2, [5, 12, 1]), (4, [32, 7, 3, 19, 2])):
        pixels = images(rng, n_images, brivl_config)
        ids, mask = caption_batch(rng, lengths)
        # Graph mode compiles a graph per Cell and shape (seconds each on a busy CPU):
        # features at the first size only; the graph-mode training_loss test compares
        # the towers' outputs (the keys) once more.
        features = ms_mode == "pynative" or n_images == 2
        got = {b: OUTPUTS[b](models[b], pixels, ids, mask, features) for b in models}
        diffs = max_diffs(got["torch"], got["mindspore"])
        print(f"[{ms_mode}, {n_images} images x {len(lengths)} texts] max |torch - mindspore| / max(1, |.|) "
              f"logits per image/text{', image/text features' if features else ''}: {diffs}")
        assert max(diffs) <= TOL, diffs
        # The logits are the cosine similarities of unit vectors over the temperature.
        logits_per_image, logits_per_text, image_embeds, text_embeds = \
            torch_outputs(models["torch"], pixels, ids, mask, True)
        norm_tol = unit_norm_tolerance(brivl_config.model.embed_dim)
        assert np.allclose(np.linalg.norm(image_embeds, axis=1), 1, atol=norm_tol, rtol=0)
        assert np.allclose(np.linalg.norm(text_embeds, axis=1), 1, atol=norm_tol, rtol=0)
        expected = image_embeds.astype(np.float64) @ text_embeds.T / 0.07
        assert logits_per_image.shape == (n_images, len(lengths))
        assert np.abs(logits_per_image - expected).max() <= TOL * max(1.0, np.abs(expected).max())
        assert np.array_equal(logits_per_text, logits_per_image.T)


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_padding_and_batch_are_invisible(brivl_config, backend):
    """A text's features depend neither on its padding nor on the other rows (padding keys
    are masked, the mean runs over real tokens only); an image's not on the other images."""
    model = build(brivl_config, backend)
    rng = np.random.default_rng(4)
    lengths = [9, 4, 15, 1]
    ids, mask = caption_batch(rng, lengths)
    batched = text_features(model, ids, mask)
    # The same batch padded to the full context, with other ids under the padding.
    wide_ids, wide_mask = (np.pad(a, ((0, 0), (0, 32 - a.shape[1]))) for a in (ids, mask))
    wide_ids = np.where(wide_mask == 1, wide_ids, rng.integers(0, VOCAB, wide_ids.shape))
    padded = float(np.abs(text_features(model, wide_ids, wide_mask) - batched).max())
    # A text alone, unpadded, without a mask (the mask-free path).
    alone = float(np.abs(text_features(model, ids[:1, :9], None)[0] - batched[0]).max())
    print(f"[{backend}] max |padded more - padded less| {padded}, |alone - in batch| {alone}")
    assert padded <= TOL and alone <= TOL
    if backend == "torch":
        # Guards the check above: unmasked, the padding does change a text's features.
        unmasked = text_features(model, wide_ids, np.ones_like(wide_mask))
        assert float(np.abs(unmasked - batched).max()) > 1e-3
        pixels = images(rng, 3, brivl_config)
        image_diff = float(np.abs(image_features(model, pixels[1:2])[0]
                                  - image_features(model, pixels)[1]).max())
        assert image_diff <= TOL


# (2) the MoCo loss ----------------------------------------------------------------------

def numpy_moco_loss(image_queries, text_queries, image_keys, text_keys, image_queue, text_queue,
                    temperature):
    """Mean of the two cross-entropies, in float64: image queries over [text keys ;
    text queue], text queries over [image keys ; image queue], positives on the diagonal."""
    def cross_entropy(logits):
        top = logits.max(axis=1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        return float(np.mean(log_z - np.diag(logits)))

    f64 = lambda a: np.asarray(a, np.float64)
    image_logits = f64(image_queries) @ np.concatenate((f64(text_keys), f64(text_queue))).T
    text_logits = f64(text_queries) @ np.concatenate((f64(image_keys), f64(image_queue))).T
    return (cross_entropy(image_logits / temperature) + cross_entropy(text_logits / temperature)) / 2


def torch_loss_and_keys(model, pixels, ids, mask):
    """training_loss in torch, with the gradient of every parameter that gets one."""
    from torch_impl.brivl import training_loss

    model.train()
    model.zero_grad()
    loss, image_keys, text_keys = training_loss(model, *to_torch(pixels, ids, mask))
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss.item()), image_keys.numpy(), text_keys.numpy(), grads


def ms_loss_and_keys(model, pixels, ids, mask, graph):
    """training_loss in MindSpore. Graph mode: as the trainer calls it, value_and_grad
    (has_aux=True) over the trainable parameters compiled with mindspore.jit, with the
    gradients; PyNative: a plain call (gradients in PyNative would add seconds of
    per-op dispatch and test nothing the graph does not)."""
    import mindspore as ms

    from mindspore_impl.brivl import training_loss
    from mindspore_impl.weights import canonical_parameters

    model.set_train(True)
    if not graph:
        loss, image_keys, text_keys = training_loss(model, *to_ms(pixels, ids, mask))
        return float(loss.asnumpy()), image_keys.asnumpy(), text_keys.asnumpy(), None
    params = model.trainable_params()

    def forward(pixel_values, input_ids, attention_mask):
        return training_loss(model, pixel_values, input_ids, attention_mask)

    step = ms.jit(ms.value_and_grad(forward, None, params, has_aux=True))
    (loss, image_keys, text_keys), grads = step(*to_ms(pixels, ids, mask))
    names = {param.name: name for name, (param, _) in canonical_parameters(model).items()}
    return (float(loss.asnumpy()), image_keys.asnumpy(), text_keys.asnumpy(),
            {names[p.name]: g.asnumpy() for p, g in zip(params, grads)})


def test_training_loss_same_in_both_backends_and_numpy(brivl_config, ms_mode):
    """Loss and keys agree across backends (and gradients, graph mode); the loss is the
    numpy MoCo loss of the online embeddings, the momentum towers' keys and the queues;
    only the online towers get gradients."""
    import torch

    arrays = distinct_state(brivl_config, seed=3)
    torch_model, ms_model = build(brivl_config, "torch", 4), build(brivl_config, "mindspore", 5)
    taichu.load_state_dict(torch_model, arrays)
    taichu.load_state_dict(ms_model, arrays)
    rng = np.random.default_rng(10)
    pixels = images(rng, 4, brivl_config)
    ids, mask = caption_batch(rng, [6, 11, 2, 8])

    torch_loss, image_keys, text_keys, torch_grads = torch_loss_and_keys(torch_model, pixels, ids, mask)
    ms_loss, ms_image_keys, ms_text_keys, ms_grads = ms_loss_and_keys(ms_model, pixels, ids, mask,
                                                                      graph=ms_mode == "graph")
    with torch.no_grad():
        pixels_t, ids_t, mask_t = to_torch(pixels, ids, mask)
        expected_image_keys = torch_model.image_encoder_m(pixels_t).numpy()
        expected_text_keys = torch_model.text_encoder_m(ids_t, mask_t).numpy()
    image_queries, text_queries = image_features(torch_model, pixels), text_features(torch_model, ids, mask)
    expected = numpy_moco_loss(image_queries, text_queries, expected_image_keys, expected_text_keys,
                               arrays["image_queue"], arrays["text_queue"], 0.07)
    # Keys come from the momentum towers, which differ from the online ones here.
    assert np.abs(expected_image_keys - image_queries).max() > 1e-3
    key_diffs = [float(np.abs(a - b).max()) for a, b in
                 ((image_keys, expected_image_keys), (text_keys, expected_text_keys),
                  (ms_image_keys, image_keys), (ms_text_keys, text_keys))]
    print(f"[{ms_mode}] loss numpy {expected}: |torch - numpy| {abs(torch_loss - expected)}, "
          f"|mindspore - torch| {abs(ms_loss - torch_loss)}; keys {key_diffs}")
    assert abs(torch_loss - expected) <= TOL and abs(ms_loss - torch_loss) <= TOL
    assert max(key_diffs) <= TOL
    # Only the online towers get gradients: every parameter of theirs does.
    assert sorted(torch_grads) == sorted(n for n, p in torch_model.named_parameters() if p.requires_grad)
    assert all(name.split(".")[0] in ("image_encoder", "text_encoder") for name in torch_grads)
    if ms_grads is not None:
        # The same gradients for the same parameters, relative to each tensor's largest.
        assert sorted(ms_grads) == sorted(torch_grads)
        grad_diff = max(float(np.abs(ms_grads[k] - g).max() / (1e-3 + np.abs(g).max()))
                        for k, g in torch_grads.items())
        print(f"[{ms_mode}] max |torch - mindspore| gradient / max |gradient|: {grad_diff}")
        assert grad_diff <= TOL


def test_queue_size_zero_is_the_in_batch_loss(brivl_config):
    """Without a queue the loss is the symmetric in-batch loss of queries against keys (in
    both backends); the same towers with a queue give a larger loss (more negatives)."""
    from mindspore_impl.brivl import training_loss as ms_training_loss
    from torch_impl.brivl import training_loss as torch_training_loss

    no_queue = load_config(TINY, ["model.moco.queue_size=0"])
    arrays = distinct_state(brivl_config, seed=6)
    towers = {k: v for k, v in arrays.items() if k not in ("image_queue", "text_queue", "queue_ptr")}
    rng = np.random.default_rng(11)
    pixels, (ids, mask) = images(rng, 3, brivl_config), caption_batch(rng, [4, 9, 6])
    losses, models = {}, {}
    for name, config in (("queue", brivl_config), ("none", no_queue)):
        model = models[name] = build(config, "torch")
        taichu.load_state_dict(model, {**taichu.state_dict(model), **towers})
        loss, image_keys, text_keys = (x.detach().numpy() for x in
                                       torch_training_loss(model, *to_torch(pixels, ids, mask)))
        losses[name] = float(loss)
    # The keys are the same with and without a queue (the same momentum towers).
    assert taichu.state_dict(models["none"])["image_queue"].shape == (0, 24)
    in_batch = numpy_moco_loss(image_features(models["none"], pixels),
                               text_features(models["none"], ids, mask),
                               image_keys, text_keys, np.zeros((0, 24)), np.zeros((0, 24)), 0.07)
    ms_model = build(no_queue, "mindspore")
    taichu.load_state_dict(ms_model, {**taichu.state_dict(ms_model), **towers})
    ms_loss = float(ms_training_loss(ms_model, *to_ms(pixels, ids, mask))[0].asnumpy())
    print(f"loss without queue: torch {losses['none']}, mindspore {ms_loss}, numpy in-batch "
          f"{in_batch}; with a queue of 16 {losses['queue']}")
    assert abs(losses["none"] - in_batch) <= TOL and abs(ms_loss - in_batch) <= TOL
    assert losses["queue"] > losses["none"] + 1e-3


def test_queue_joins_the_loss_at_queue_start_step(brivl_config):
    """brivl-tiny's queue_start_step is 3: after 2 updates the loss (and its gradient) is
    the in-batch one, after 3 the full MoCo loss, in both backends, in numpy terms. The
    MindSpore step is compiled once and reads the counter on every call, as in training."""
    import mindspore as ms
    import torch

    from mindspore_impl.brivl import training_loss as ms_training_loss
    from torch_impl.brivl import training_loss as torch_training_loss

    assert brivl_config.model.moco.queue_start_step == 3
    arrays = distinct_state(brivl_config, seed=13)
    torch_model, ms_model = build(brivl_config, "torch"), build(brivl_config, "mindspore")
    rng = np.random.default_rng(14)
    pixels, (ids, mask) = images(rng, 5, brivl_config), caption_batch(rng, [3, 7, 12, 5, 9])
    taichu.load_state_dict(torch_model, arrays)
    with torch.no_grad():
        pixels_t, ids_t, mask_t = to_torch(pixels, ids, mask)
        keys = (torch_model.image_encoder_m(pixels_t).numpy(), torch_model.text_encoder_m(ids_t, mask_t).numpy())
    queries = (image_features(torch_model, pixels), text_features(torch_model, ids, mask))
    no_queue = np.zeros((0, 24))
    expected = {2: numpy_moco_loss(*queries, *keys, no_queue, no_queue, 0.07),
                3: numpy_moco_loss(*queries, *keys, arrays["image_queue"], arrays["text_queue"], 0.07)}

    def ms_loss(pixel_values, input_ids, attention_mask):
        return ms_training_loss(ms_model, pixel_values, input_ids, attention_mask)[0]

    ms_step = ms.jit(ms_loss)
    got = {}
    for updates in (2, 3):
        state = {**arrays, "num_updates": np.array([updates], np.int64)}
        taichu.load_state_dict(torch_model, state)
        taichu.load_state_dict(ms_model, state)
        loss = torch_training_loss(torch_model, pixels_t, ids_t, mask_t)[0]
        got[updates] = (loss.item(), float(ms_step(*to_ms(pixels, ids, mask)).asnumpy()))
    print({u: (expected[u], got[u]) for u in expected})
    for updates in (2, 3):
        torch_loss, ms_loss = got[updates]
        assert abs(torch_loss - expected[updates]) <= TOL and abs(ms_loss - expected[updates]) <= TOL
    assert expected[3] > expected[2] + 1e-3

    # The in-batch gradient is the one of a model without a queue, the full one is not.
    # Same math through different graphs (the queue model computes both losses and selects
    # one), so the claim is checked in float64, where rounding cannot decide it: float32
    # differed by 2.2e-7 on 1.1e-3 on one machine, a rounding difference, not a model one.
    def fc2_gradient(model, state):
        taichu.load_state_dict(model, state)
        model.double().zero_grad()
        torch_training_loss(model, *to_torch(pixels.astype(np.float64), ids, mask))[0].backward()
        gradient = model.image_encoder.projection.fc2.weight.grad.clone()
        model.float()
        return gradient

    bare = build(load_config(TINY, ["model.moco.queue_size=0"]), "torch")
    reference = fc2_gradient(bare, {**taichu.state_dict(bare),
                                    **{k: v for k, v in arrays.items() if not k.endswith("_queue")}})
    in_batch = fc2_gradient(torch_model, {**arrays, "num_updates": np.array([2], np.int64)})
    full = fc2_gradient(torch_model, {**arrays, "num_updates": np.array([3], np.int64)})
    scale = float(reference.abs().max())
    print("float64 gradient differences / scale:", float((in_batch - reference).abs().max()) / scale,
          float((full - reference).abs().max()) / scale)
    # float64 carries 2^-53 = 1.1e-16 relative; a few hundred roundings of this short graph
    # stay below 1e-12 of the gradient's scale, while the queue's share is of the order of
    # the gradient itself (the assertion after).
    assert float((in_batch - reference).abs().max()) <= 1e-12 * scale
    assert float((full - reference).abs().max()) >= 1e-3 * scale


# (3) after_step: queues and momentum ----------------------------------------------------

def numpy_after_step(state, image_keys, text_keys, queue_size, momentum):
    """The reference: keys enqueued one at a time at the pointer, then p_k = m p_k + (1 - m) p_q."""
    state = {k: v.copy() for k, v in state.items()}
    for i in range(len(image_keys) if queue_size else 0):
        slot = int(state["queue_ptr"][0])
        state["image_queue"][slot] = image_keys[i]
        state["text_queue"][slot] = text_keys[i]
        state["queue_ptr"][0] = (slot + 1) % queue_size
    state["num_updates"][0] += 1
    for name in state:
        top, _, rest = name.partition(".")
        if top.endswith("_m"):
            online = state[f"{top[:-2]}.{rest}"].astype(np.float64)
            state[name] = (momentum * state[name].astype(np.float64) + (1 - momentum) * online
                           ).astype(np.float32)
    return state


@pytest.mark.parametrize("queue_size", [16, 0])
def test_after_step_same_in_both_backends_and_numpy(queue_size):
    """Three steps of sizes that do not divide the queue: one wraps around inside its
    batch, one is larger than the queue; queues, pointer and momentum towers equal across
    backends and with numpy; the online towers do not move."""
    import mindspore as ms
    import torch

    from mindspore_impl.brivl import after_step as ms_after_step
    from torch_impl.brivl import after_step as torch_after_step

    config = load_config(TINY, [f"model.moco.queue_size={queue_size}", "model.moco.momentum=0.9"])
    expected = distinct_state(config, seed=7)
    models = {b: build(config, b, seed=8) for b in ("torch", "mindspore")}
    for model in models.values():
        taichu.load_state_dict(model, expected)
    rng = np.random.default_rng(12)
    pointers = []
    for count in ((7, 13, 20) if queue_size else (5,)):
        keys = [rng.standard_normal((count, 24)).astype(np.float32) for _ in range(2)]
        keys = [k / np.linalg.norm(k, axis=1, keepdims=True) for k in keys]
        torch_after_step(models["torch"], *(torch.from_numpy(k) for k in keys))
        ms_after_step(models["mindspore"], *(ms.Tensor(k) for k in keys))
        expected = numpy_after_step(expected, *keys, queue_size, 0.9)
        pointers.append(int(expected["queue_ptr"][0]))
        for backend, model in models.items():
            got = taichu.state_dict(model)
            assert got["queue_ptr"].dtype == got["num_updates"].dtype == np.int64
            diffs = {k: float(np.abs(got[k].astype(np.float64) - expected[k]).max(initial=0.0))
                     for k in expected}
            worst = max(diffs, key=diffs.get)
            assert diffs[worst] <= TOL, (backend, count, worst, diffs[worst])
    print(f"[queue {queue_size}] pointers after each step {pointers}")
    # From 5 (distinct_state): + 7; + 13 wraps inside the batch; + 20, more keys than slots.
    assert pointers == ([12, 9, 13] if queue_size else [0])
    assert expected["num_updates"].tolist() == [7 + len(pointers)]


def test_momentum_towers_are_not_trained(brivl_config):
    """Momentum towers start equal to the online ones and sit outside the optimizer's
    parameters in both backends; the queues and pointer are saved, never trained."""
    torch_model, ms_model = build(brivl_config, "torch"), build(brivl_config, "mindspore")
    for model in (torch_model, ms_model):
        arrays = taichu.state_dict(model)
        online = [k for k in arrays if k.split(".")[0] in ("image_encoder", "text_encoder")]
        for name in online:
            top, _, rest = name.partition(".")
            assert np.array_equal(arrays[name], arrays[f"{top}_m.{rest}"])
        assert np.allclose(np.linalg.norm(arrays["image_queue"], axis=1), 1,
                           atol=unit_norm_tolerance(arrays["image_queue"].shape[1]), rtol=0)
        assert not np.array_equal(arrays["image_queue"], arrays["text_queue"])
        assert arrays["queue_ptr"].tolist() == arrays["num_updates"].tolist() == [0]
    trained = sorted(n for n, p in torch_model.named_parameters() if p.requires_grad)
    from mindspore_impl.weights import canonical_parameters

    names = {param.name: name for name, (param, _) in canonical_parameters(ms_model).items()}
    assert sorted(names[p.name] for p in ms_model.trainable_params()) == trained == sorted(online)


# (4) model directories and configs ------------------------------------------------------

@pytest.mark.parametrize("source", ["torch", "mindspore"])
def test_save_load_round_trip_keeps_queues(brivl_config, tmp_path, source):
    model = build(brivl_config, source, seed=3)
    taichu.load_state_dict(model, distinct_state(brivl_config, seed=9))
    path = taichu.save_model(model, tmp_path / "brivl")
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "model.safetensors"]
    assert taichu.load_config(path) == brivl_config
    expected = taichu.state_dict(model)
    assert expected["queue_ptr"].tolist() == [5] and expected["queue_ptr"].dtype == np.int64
    assert expected["num_updates"].tolist() == [7] and expected["num_updates"].dtype == np.int64
    for backend in ("torch", "mindspore"):
        got = taichu.state_dict(taichu.load_model(path, backend=backend))
        assert set(got) == set(expected)
        assert all(got[k].dtype == expected[k].dtype and np.array_equal(got[k], expected[k])
                   for k in expected)


def test_queue_size_zero_round_trip(tmp_path):
    config = load_config(TINY, ["model.moco.queue_size=0"])
    path = taichu.save_model(build(config, "torch"), tmp_path / "no-queue")
    for backend in ("torch", "mindspore"):
        arrays = taichu.state_dict(taichu.load_model(path, backend=backend))
        assert arrays["image_queue"].shape == arrays["text_queue"].shape == (0, 24)


def test_tensor_specs_equal_built_models(brivl_config):
    """Specs list every tensor (online, momentum, queues, counters) in torch's state_dict
    order, and MindSpore's names differ from them only in leaves."""
    specs = get_family("brivl").tensor_specs(brivl_config)
    torch_arrays = taichu.state_dict(build(brivl_config, "torch"))
    assert list(torch_arrays) == list(specs)
    assert {k: v.shape for k, v in torch_arrays.items()} == {k: s.shape for k, s in specs.items()}
    assert sum(a.size for a in torch_arrays.values()) == num_parameters(brivl_config)
    ms_model = build(brivl_config, "mindspore")
    assert {k: v.shape for k, v in taichu.state_dict(ms_model).items()} == \
        {k: s.shape for k, s in specs.items()}
    ms_names = {p.name for p in ms_model.get_parameters()}
    assert {"image_queue", "text_queue", "queue_ptr", "num_updates",
            "image_encoder_m.backbone.embeddings.class_embedding",
            "text_encoder_m.backbone.embeddings.token_embedding.embedding_table",
            "text_encoder.head.layer_norm.gamma",
            "image_encoder.projection.fc2.weight"} <= ms_names


def test_config_sizes():
    small = load_config(CONFIGS / "brivl" / "brivl-small.yaml")
    assert small.model.image.image_size in (32, 64)
    from taichu.families.brivl import count_groups

    counts = count_groups(small)
    assert counts["image_encoder"] + counts["text_encoder"] == counts["momentum"] == 3_236_608
    assert num_parameters(small) == 6_505_986


def test_info_command_describes_brivl():
    # The console script installed next to this Python (`taichu info ...`).
    script = Path(sys.executable).parent / "taichu"
    out = subprocess.run([str(script), "info", str(TINY)], check=True, capture_output=True,
                         text=True).stdout
    assert "family:     brivl" in out
    assert "queue 16 per modality, momentum 0.99, temperature 0.07, queue from update 3" in out
    assert "parameters: 498,274 (498.27 K)" in out


@pytest.mark.parametrize("edit, expected", [
    (lambda r: r["model"]["moco"].update(queue_size=-1), r"model\.moco\.queue_size: Input should be greater than or equal to 0"),
    (lambda r: r["model"]["moco"].update(momentum=1.0), r"model\.moco\.momentum: Input should be less than 1"),
    (lambda r: r["model"]["moco"].update(temperature=0), r"model\.moco\.temperature: Input should be greater than 0"),
    (lambda r: r["model"]["moco"].update(queue_start_step=-1), r"model\.moco\.queue_start_step: Input should be greater than or equal to 0"),
    (lambda r: r["model"]["text_head"].update(num_heads=3),
     r"text_head\.num_heads 3 does not divide the text tower's hidden_size 32"),
    (lambda r: r["model"].update(activation="swish"), r"model\.activation: Input should be"),
    (lambda r: r["model"]["text"].update(vocab_size=100), r"model\.text\.vocab_size 100 is smaller"),
])
def test_bad_config_is_named(edit, expected):
    raw = yaml.safe_load(TINY.read_text())
    edit(raw)
    with pytest.raises(taichu.ConfigError, match=expected):
        validate_config(raw, "brivl-variant.yaml")


@pytest.mark.parametrize("backend", ["torch", "mindspore"])
def test_bad_inputs_are_clear_errors(brivl_config, backend):
    model = build(brivl_config, backend)
    rng = np.random.default_rng(8)
    pixels = images(rng, 2, brivl_config)
    ids, mask = caption_batch(rng, [3, 5])
    run = OUTPUTS[backend]
    # Checked before any computation, so these cost nothing in either backend.
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, 32, 32\]"):
        run(model, pixels[:, :, :16, :16].copy(), ids, mask)
    bad = ids.copy()
    bad[0, 0] = VOCAB
    with pytest.raises(ValueError, match="token id 4096 is out of range for vocab_size 4096"):
        run(model, pixels, bad, mask)
    with pytest.raises(ValueError, match="left-padded row"):
        run(model, pixels, ids[:, ::-1].copy(), mask[:, ::-1].copy())
