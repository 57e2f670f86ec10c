"""The vision family (MST: DINO self-distillation + attention-guided masking + a global
decoder; taichu/families/vision.py): Hugging Face ViTModel as the backbone's oracle and its
conversion both ways, the two backends against each other (features, CLS attention, masks,
the full loss, the teacher/centre updates), and numpy references written from the equations
(the guided mask, DINO's loss, the bicubic position resize, the momentum schedule)."""
import json
import math

import numpy as np
import pytest
import torch

from taichu import convert
from taichu.api import load_state_dict, state_dict
from taichu.config import load_config, validate_config
from taichu.families import get_family
from taichu.families.vision import bicubic_matrix, lateral_layers, teacher_momentum
from taichu.convert.hf_vit import hf_state_dict
from conftest import CONFIGS, perturbed_state

TOL = 1e-5   # the design's parity bound (fp32) on values of order 1
TINY = CONFIGS / "vision" / "vision-tiny.yaml"


def tiny_config(**model):
    config = load_config(TINY)
    raw = json.loads(config.model_dump_json())
    raw["model"] = {**raw["model"], **model}
    return validate_config(raw, "vision-tiny")



# ----------------------------------------------------------------------------- HF oracle

def hf_vit(tmp_path, qkv_bias=True, act="gelu"):
    """A random ViTModel of odd sizes (35 px, patch 7: a 5 x 5 grid; hidden 36, 3 heads of
    12; MLP 52), every weight perturbed, saved with save_pretrained."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    hf_config = ViTConfig(hidden_size=36, num_hidden_layers=3, num_attention_heads=3, intermediate_size=52,
                          image_size=35, patch_size=7, num_channels=3, qkv_bias=qkv_bias, hidden_act=act,
                          layer_norm_eps=1e-6, attn_implementation="eager")
    model = ViTModel(hf_config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("qkv_bias,act", [(True, "gelu"), (False, "gelu_new")])
def test_hf_vit_oracle_and_round_trip(tmp_path, qkv_bias, act):
    from transformers import ViTModel
    from torch_impl.vision import MST

    hf, path = hf_vit(tmp_path, qkv_bias, act)
    ours_dir = tmp_path / "ours"
    convert.convert(path, ours_dir)
    config, arrays = convert.load(ours_dir)
    assert config.family == "vision" and config.model.objective == "backbone" and config.model.pooler
    assert config.model.qkv_bias is qkv_bias and config.model.activation == {"gelu": "gelu"}.get(act, act)
    # a bare HF weights file is recognised as HF too (given the config)
    _, bare = convert.load(path / "model.safetensors", config=config)
    assert set(bare) == set(arrays) and all(np.array_equal(bare[k], arrays[k]) for k in arrays)
    model = MST(config).eval()
    load_state_dict(model, arrays)
    pixels = torch.tensor(np.random.default_rng(1).standard_normal((2, 3, 35, 35), dtype=np.float32))
    with torch.no_grad():
        theirs = hf(pixels, output_attentions=True)
        hidden, pooled = model(pixels)
        _, attention, _ = model.backbone(pixels, with_attention=True)
        # another grid: HF's bicubic interpolate_pos_encoding against our matrix
        for size in (49, 21):
            other = torch.tensor(np.random.default_rng(size).standard_normal((2, 3, size, size), dtype=np.float32))
            expected = hf(other, interpolate_pos_encoding=True).last_hidden_state
            assert (model(other)[0] - expected).abs().max() <= TOL
    assert (hidden - theirs.last_hidden_state).abs().max() <= TOL
    assert (pooled - theirs.pooler_output).abs().max() <= TOL
    assert (attention - theirs.attentions[-1][:, :, 0]).abs().max() <= TOL
    # back to HF: the same tensors, bit for bit, and a config HF reads
    back = tmp_path / "back"
    convert.convert(ours_dir, back, to="hf")
    again = ViTModel.from_pretrained(back)
    original = hf.state_dict()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert again.config.qkv_bias is qkv_bias and again.config.image_size == 35


def test_mst_writes_teacher_backbone_to_hf(tmp_path):
    """An MST model's ViTModel is its teacher backbone (no pooler, with the mask token); it
    reads back as objective backbone with the same tensors."""
    from transformers import ViTModel
    from torch_impl.vision import MST

    config = load_config(TINY)
    model = MST(config).eval()
    load_state_dict(model, perturbed_state(model))
    arrays = state_dict(model)
    convert.save(config, arrays, tmp_path / "mst")
    convert.convert(tmp_path / "mst", tmp_path / "hf", to="hf")
    hf = ViTModel.from_pretrained(tmp_path / "hf", add_pooling_layer=False, use_mask_token=True).eval()
    pixels = torch.tensor(np.random.default_rng(2).standard_normal((2, 3, 32, 32), dtype=np.float32))
    mask = torch.tensor(np.random.default_rng(3).random((2, 16)) < 0.5)
    with torch.no_grad():
        ours = model.teacher.backbone(pixels, mask)[0]
        theirs = hf(pixels, bool_masked_pos=mask).last_hidden_state
    assert (ours - theirs).abs().max() <= TOL
    back, tensors = convert.load(tmp_path / "hf")
    assert back.model.objective == "backbone" and not back.model.pooler and back.model.mask_token
    for name, array in tensors.items():
        assert np.array_equal(array, arrays["teacher." + name]), name
    # The names of the file (save_pretrained's; transformers 5 renames them in memory).
    from safetensors.numpy import load_file

    written = load_file(tmp_path / "hf" / "model.safetensors")
    ours = hf_state_dict(config, arrays)
    assert set(ours) == set(written) and all(np.array_equal(ours[k], written[k]) for k in ours)


def test_hf_vit_refusals():
    from taichu.config import ConfigError

    base = {"model_type": "vit", "hidden_size": 36, "num_attention_heads": 3, "num_hidden_layers": 1,
            "intermediate_size": 40, "image_size": 32, "patch_size": 8}
    for bad, key in (({"pooler_act": "relu"}, "pooler_act"), ({"hidden_act": "silu"}, "hidden_act"),
                     ({"image_size": [32, 48]}, "image_size"), ({"hidden_dropout_prob": 0.1}, "hidden_dropout")):
        with pytest.raises(ConfigError, match=key):
            convert.hf_to_config({**base, **bad}, "config.json")


# ----------------------------------------------------------------------------- backends

@pytest.fixture(scope="module")
def pair():
    """The tiny MST in both backends with the same (perturbed) weights, and one batch:
    3 images, 2 global 32 px views and 2 local 16 px views each, mask noise."""
    from mindspore_impl.vision import MST as MSMST
    from torch_impl.vision import MST as TorchMST

    config = load_config(TINY)
    torch_model = TorchMST(config).eval()
    arrays = perturbed_state(torch_model)
    arrays["center"] = (0.5 * np.random.default_rng(4).standard_normal((1, 64))).astype(np.float32)
    load_state_dict(torch_model, arrays)
    ms_model = MSMST(config)
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    rng = np.random.default_rng(5)
    batch = (rng.standard_normal((3, 2, 3, 32, 32), dtype=np.float32),
             rng.standard_normal((3, 2, 3, 16, 16), dtype=np.float32),
             rng.random((3, 2, 16), dtype=np.float32))
    return config, torch_model, ms_model, arrays, batch


def test_canonical_names_and_trainable_sets(pair):
    config, torch_model, ms_model, _, _ = pair
    specs = get_family("vision").tensor_specs(config)
    assert list(state_dict(torch_model)) == list(specs)
    assert set(state_dict(ms_model)) == set(specs)
    trained = {n for n, p in torch_model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("teacher.") for n in trained) and "head.last_layer.weight_g" not in trained
    from mindspore_impl.weights import canonical_parameters

    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}
    assert {names[p.name] for p in ms_model.trainable_params()} == trained


def test_backends_agree_on_features_attention_and_loss(pair):
    import mindspore as ms
    from mindspore_impl import vision as mv
    from torch_impl import vision as tv

    _, torch_model, ms_model, _, batch = pair
    pixels = batch[0][:, 0]
    with torch.no_grad():
        t_hidden, t_cls = torch_model(torch.tensor(pixels))
        t_attention = torch_model.teacher.backbone(torch.tensor(pixels), with_attention=True)[1]
        t_local = torch_model(torch.tensor(batch[1][:, 0]))[0]    # interpolated positions
        terms = tv.loss_terms(torch_model, *map(torch.tensor, batch))
        t_loss = tv.training_loss(torch_model, *map(torch.tensor, batch))
    m_hidden, m_cls = ms_model(ms.Tensor(pixels))
    m_attention = ms_model.teacher.backbone(ms.Tensor(pixels), None, True)[1]
    m_local = ms_model(ms.Tensor(batch[1][:, 0]))[0]
    for a, b in ((t_hidden, m_hidden), (t_cls, m_cls), (t_attention, m_attention), (t_local, m_local)):
        assert np.abs(a.numpy() - b.asnumpy()).max() <= TOL
    m_terms = mv.loss_terms(ms_model, *map(ms.Tensor, batch))
    m_loss = mv.training_loss(ms_model, *map(ms.Tensor, batch))
    assert terms["mask"].any() and not terms["mask"].all()
    assert np.array_equal(terms["mask"].numpy(), m_terms["mask"].asnumpy())
    # Logits are compared relative to their size (they reach ~10); the loss terms and the
    # centre are of order 1-5, the pixels of order 1.
    for key in ("teacher_logits", "student_logits", "pixels", "attention", "new_center"):
        a, b = terms[key].numpy(), m_terms[key].asnumpy()
        assert np.abs(a - b).max() / max(1.0, np.abs(a).max()) <= TOL, key
    for key in ("distillation", "restoring"):
        assert abs(float(terms[key]) - float(m_terms[key].asnumpy())) <= TOL * max(1.0, abs(float(terms[key]))), key
    assert abs(float(t_loss[0]) - float(m_loss[0].asnumpy())) <= TOL * max(1.0, abs(float(t_loss[0])))
    # The loss is what its terms say.
    restore = torch_model.restore_weight
    assert math.isclose(float(t_loss[0]), float(terms["distillation"] + restore * terms["restoring"]), rel_tol=1e-6)


@pytest.mark.parametrize("mask,kind,tau", [("guided", "quantile", 0.5), ("guided", "quantile", 0.3),
                                           ("guided", "value", 0.06), ("random", "quantile", 0.5),
                                           ("none", "quantile", 0.5)])
def test_guided_mask_against_numpy(mask, kind, tau):
    """Both backends against the equations in float64: u < p and Attn < tau, tau a value
    or the row's tau-quantile (numpy's linear method)."""
    import mindspore as ms
    from mindspore_impl.vision import guided_mask as ms_mask
    from torch_impl.vision import guided_mask as torch_mask

    rng = np.random.default_rng(6)
    attention = rng.dirichlet(np.ones(16), size=5).astype(np.float32)
    noise = rng.random((5, 16), dtype=np.float32)
    p = 0.6
    a64 = attention.astype(np.float64)
    if mask == "none":
        expected = np.zeros((5, 16), bool)
    elif mask == "random":
        expected = noise < p
    else:
        threshold = np.quantile(a64, tau, axis=-1, keepdims=True) if kind == "quantile" else tau
        expected = (noise < p) & (a64 < threshold)
    ours = torch_mask(torch.tensor(attention), torch.tensor(noise), mask, p, tau, kind).numpy()
    theirs = ms_mask(ms.Tensor(attention), ms.Tensor(noise), mask, p, tau, kind).asnumpy()
    assert np.array_equal(ours, expected) and np.array_equal(theirs, expected)
    if mask == "guided":
        assert 0 < expected.sum() < (noise < p).sum()   # the threshold really removed some


def test_distillation_loss_against_numpy():
    """DINO's loss from its definition in float64: 2 global teacher views, 2 + 3 student
    views, same-view pairs skipped, each pair's cross-entropy averaged over the batch, the
    mean over the 8 pairs. float32 implementations: softmax/log-softmax over K = 64 and the
    pair sums (<= 200 terms of magnitude <= ~30), well within 1e-5 relative."""
    import mindspore as ms
    from mindspore_impl.vision import distillation_loss as ms_loss
    from torch_impl.vision import distillation_loss as torch_loss

    rng = np.random.default_rng(7)
    batch, k, tt, st = 3, 64, 0.04, 0.1
    teacher = rng.standard_normal((2 * batch, k)).astype(np.float32)
    student = rng.standard_normal((5 * batch, k)).astype(np.float32)
    center = (0.3 * rng.standard_normal((1, k))).astype(np.float32)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    t = softmax((teacher.astype(np.float64) - center) / tt).reshape(2, batch, k)
    log_s = np.log(softmax(student.astype(np.float64) / st)).reshape(5, batch, k)
    losses = [(-(t[i] * log_s[v]).sum(-1)).mean() for i in range(2) for v in range(5) if v != i]
    expected = sum(losses) / len(losses)
    ours = float(torch_loss(torch.tensor(teacher), torch.tensor(student), torch.tensor(center), tt, st))
    theirs = float(ms_loss(ms.Tensor(teacher), ms.Tensor(student), ms.Tensor(center), tt, st).asnumpy())
    assert abs(ours - expected) <= TOL * expected and abs(theirs - expected) <= TOL * expected


def test_bicubic_matrix_is_torch_bicubic():
    """Our position resize matrix against torch's F.interpolate(bicubic, align_corners=False)
    (what DINO and HF ViT use), up and down, in float64."""
    rng = np.random.default_rng(8)
    grid = rng.standard_normal((1, 5, 7, 7))
    for rows, cols in ((3, 3), (10, 10), (4, 9)):
        expected = torch.nn.functional.interpolate(torch.tensor(grid), size=(rows, cols), mode="bicubic",
                                                   align_corners=False)[0].reshape(5, -1).T.numpy()
        ours = bicubic_matrix(7, rows, cols).astype(np.float64) @ grid[0].reshape(5, -1).T
        assert np.abs(ours - expected).max() <= 1e-6   # the matrix is stored in float32
    assert np.array_equal(bicubic_matrix(4, 4, 4), np.eye(16, dtype=np.float32))
    assert lateral_layers(12, 4) == (11, 8, 5, 2) and lateral_layers(2, 3) == (1, 1, 0)


# ----------------------------------------------------------------------------- updates

def test_teacher_momentum_schedule():
    assert teacher_momentum(0, 100, 0.996, 1.0) == 0.996
    assert math.isclose(teacher_momentum(50, 100, 0.996, 1.0), 0.998)
    assert teacher_momentum(100, 100, 0.996, 1.0) == 1.0 == teacher_momentum(500, 100, 0.996, 1.0)
    assert math.isclose(teacher_momentum(25, 100, 0.9, 1.0), 1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


def test_after_step_updates_centre_and_teacher(pair):
    """after_step in both backends: centre = the mean of the micro-batches' new centres;
    teacher = m t + (1 - m) s with m the schedule's value at the current update (then
    counted); equal to numpy on the state before."""
    import mindspore as ms
    from mindspore_impl import vision as mv
    from torch_impl import vision as tv

    config, torch_model, ms_model, arrays, batch = pair
    new_centers = np.random.default_rng(9).standard_normal((2, 64)).astype(np.float32)
    steps = config.train.max_steps
    d = config.model.distillation
    tv.after_step(torch_model, torch.tensor(new_centers))
    mv.after_step(ms_model, ms.Tensor(new_centers))
    tv.after_step(torch_model, torch.tensor(new_centers))
    mv.after_step(ms_model, ms.Tensor(new_centers))
    m0 = teacher_momentum(0, steps, d.teacher_momentum, d.teacher_momentum_end)
    m1 = teacher_momentum(1, steps, d.teacher_momentum, d.teacher_momentum_end)
    assert m0 < m1 < 1.0
    for model in (torch_model, ms_model):
        after = state_dict(model)
        assert after["num_updates"].tolist() == [2]
        assert np.abs(after["center"] - new_centers.astype(np.float64).mean(0, keepdims=True)).max() <= 1e-7
        for name, value in arrays.items():
            if name.startswith("teacher."):
                student = arrays[name[len("teacher."):]].astype(np.float64)
                expected = m1 * (m0 * value + (1 - m0) * student) + (1 - m1) * student
                assert np.abs(after[name] - expected).max() <= 1e-6 * max(1.0, np.abs(expected).max()), name
    # restore the shared fixture's state for any later test
    load_state_dict(torch_model, arrays)
    load_state_dict(ms_model, arrays)


def test_student_gradients_agree_in_graph_mode(pair):
    """The trainer's path: MindSpore's jit(value_and_grad(training_loss)) over the trainable
    parameters compiles, and its loss and gradients equal torch's backward.

    Tolerance, derived (tests/tolerance.py): the forward chain of the tiny ViT is
    encoder_chain_terms (patch embedding + 2 layers + head, ~800 terms); the backward pass
    walks it again (x2), and the student's logits are divided by student_temp (0.1), which
    scales every rounding error after them by 10. Gradients are compared relative to the
    largest gradient of their tensor (observed: ~5e-6)."""
    import mindspore as ms
    from mindspore_impl import vision as mv
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import vision as tv
    from tolerance import encoder_chain_terms, float32_tolerance

    config, torch_model, ms_model, _, batch = pair
    m = config.model
    torch_model.zero_grad()
    loss, _ = tv.training_loss(torch_model, *map(torch.tensor, batch))
    loss.backward()
    loss = loss.detach()
    expected = {n: p.grad.numpy() for n, p in torch_model.named_parameters() if p.requires_grad}
    params = ms_model.trainable_params()
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}

    def step(*inputs):
        return mv.training_loss(ms_model, *inputs)
    grad_fn = ms.jit(ms.value_and_grad(step, None, params, has_aux=True))
    (ms_loss, _), grads = grad_fn(*map(ms.Tensor, batch))
    terms = encoder_chain_terms(m, m.num_patches + 1, m.num_channels * m.patch_size ** 2)
    bound = float32_tolerance(1.0, 2 * terms) / m.distillation.student_temp
    assert abs(float(ms_loss.asnumpy()) - float(loss)) <= TOL * max(1.0, float(loss))
    assert len(grads) == len(expected)
    for param, grad in zip(params, grads):
        ref = expected[names[param.name]]
        assert np.abs(grad.asnumpy() - ref).max() <= bound * max(1.0, np.abs(ref).max()), names[param.name]
