"""wav2vec 2.0 (torch_impl/wav2vec2.py, taichu/convert/hf_wav2vec2.py) against Hugging Face
``Wav2Vec2ForPreTraining`` / ``Wav2Vec2ForCTC`` as an oracle.

Random HF models of odd sizes (hidden 24, 3 heads, convs of 12/10/14 channels, an even and
an odd position kernel), in both feature-encoder norms and both layer-norm orders, converted
in through the conversion table: the backbone, the CTC logits and loss, and the pretraining
loss (argmax quantizer in evaluation; HF's own Gumbel draw replayed in training) equal HF's.
Then: names and shapes are the tensor specs, gradients flow, the feature encoder's freeze,
input checks, and conversion both ways through files (round trip byte-equal, an HF
save_pretrained directory loads, our HF export loads in transformers).

Sections: (1) names, (2) Hugging Face oracle, (3) training, (4) input checks,
(5) conversion, (6) MindSpore parity (mindspore_impl/wav2vec2.py against torch_impl).
"""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import taichu
from taichu import convert
from taichu.config import ConfigError, load_config
from taichu.families.wav2vec2 import (compute_span_mask, frame_count, receptive_field, sample_negative_indices,
                                      tensor_specs)
from conftest import CONFIGS
from tolerance import U32, encoder_chain_terms, scaled_differences

TINY = CONFIGS / "wav2vec2" / "wav2vec2-tiny.yaml"
TOL = 1e-5                       # float32, relative to max(1, |reference|): the project's contract
ARCHITECTURES = {"pretraining": "Wav2Vec2ForPreTraining", "ctc": "Wav2Vec2ForCTC"}
# (feature-encoder norm, stable layer norm): the four variants of the architecture.
VARIANTS = [("group", False), ("group", True), ("layer", False), ("layer", True)]
LENGTHS = (700, 523, 301)        # samples per row: 22, 16 and 8 frames
ALPHABET = ["<blank>", "|", "a", "i", "n", "o", "1", "2", "3"]


# ----------------------------------------------------------------------------- helpers

def hf_config(norm: str, stable: bool, head: str, **extra):
    """A small HF config of odd sizes; the group-norm variant uses the default activations, an
    even position kernel (8, whose extra frame is cut) and no conv bias, the layer-norm
    variant relu / gelu_new, an odd kernel (7) and conv biases. No dropout, no LayerDrop."""
    from transformers import Wav2Vec2Config

    group = norm == "group"
    values = dict(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
        conv_dim=[12, 10, 14], conv_kernel=[10, 3, 4], conv_stride=[5, 3, 2], conv_bias=not group,
        feat_extract_norm=norm, do_stable_layer_norm=stable,
        feat_extract_activation="gelu" if group else "relu", hidden_act="gelu" if group else "gelu_new",
        num_conv_pos_embeddings=8 if group else 7, num_conv_pos_embedding_groups=4, layer_norm_eps=1e-5,
        num_codevector_groups=2, num_codevectors_per_group=5, codevector_dim=8, proj_codevector_dim=6,
        num_negatives=4, contrastive_logits_temperature=0.1, diversity_loss_weight=0.1,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0, final_dropout=0.0, layerdrop=0.0,
        mask_time_prob=0.5, mask_time_length=3, mask_time_min_masks=2,
        vocab_size=len(ALPHABET), pad_token_id=0, ctc_loss_reduction="mean", ctc_zero_infinity=True,
        architectures=[ARCHITECTURES[head]])
    values.update(extra)
    return Wav2Vec2Config(**values)


def hf_model(norm: str, stable: bool, head: str, seed: int = 0, **extra):
    """A random HF model with every weight perturbed (HF's init has LayerNorms 1/0 and biases
    0, which would hide a swapped norm or a dropped bias)."""
    from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

    torch.manual_seed(seed)
    cls = Wav2Vec2ForPreTraining if head == "pretraining" else Wav2Vec2ForCTC
    model = cls(hf_config(norm, stable, head, **extra)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def ours_from_hf(hf, overrides=()):
    """Our model of HF's config and weights, through the conversion table (taichu.convert)."""
    config = convert.hf_to_config(hf.config.to_dict(), "Hugging Face Wav2Vec2", overrides)
    arrays = convert.to_canonical(config, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, "hf",
                                  "Hugging Face Wav2Vec2 state_dict")
    model = taichu.build_model(config, "torch")
    taichu.load_state_dict(model, arrays, source="Hugging Face Wav2Vec2")
    return model.eval()


def audio(seed: int, lengths=LENGTHS):
    """Right-padded float32 audio (zeros past each row's end, as HF's feature extractor pads)
    and its int32 sample mask."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    values = np.zeros((len(lengths), width), np.float32)
    mask = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        values[row, :n] = rng.standard_normal(n).astype(np.float32)
        mask[row, :n] = 1
    return values, mask


def pretraining_draws(config, lengths=LENGTHS, seed=0):
    """mask_time_indices [B, T] bool and sampled_negative_indices [B, T, K] int32, drawn by
    the family's numpy samplers over each row's real frames."""
    m = config.model
    rng = np.random.default_rng(seed)
    frames = frame_count(m, np.asarray(lengths))
    mask = compute_span_mask(rng, frames, int(frames.max()), m.mask_time_prob, m.mask_time_length,
                             m.mask_time_min_masks)
    return mask, sample_negative_indices(rng, mask, m.quantizer.num_negatives)


def float64_tolerance(scale: float, terms: int) -> float:
    """tolerance.float32_tolerance's bound for float64 (unit roundoff 2^-53)."""
    u = U32 * 2.0 ** -29
    return 2 * terms * u / (1 - terms * u) * scale


def backbone_terms(m, frames: int) -> int:
    """Accumulated terms from the audio to the last hidden state: each conv (in channels x
    kernel), the feature LayerNorm and projection, the position conv ((H / groups) x K), the
    Transformer (tolerance.encoder_chain_terms)."""
    convs = sum(c_in * k for c_in, k in zip([1, *m.conv_dim[:-1]], m.conv_kernel))
    position = m.hidden_size // m.num_conv_pos_embedding_groups * m.num_conv_pos_embeddings
    return encoder_chain_terms(m, frames, convs + 2 * m.conv_dim[-1] + position)


def t(array):
    return torch.from_numpy(np.ascontiguousarray(array))


# ----------------------------------------------------------------------------- (1) names

@pytest.mark.parametrize("head", ["pretraining", "ctc"])
@pytest.mark.parametrize("norm, stable", VARIANTS)
def test_state_dict_is_the_tensor_specs(norm, stable, head):
    config = convert.hf_to_config(hf_config(norm, stable, head).to_dict(), "HF")
    model = taichu.build_model(config, "torch")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == {k: s.shape for k, s in tensor_specs(config).items()}
    assert model.num_updates.dtype == torch.int64
    # And the HF model of that config has the same tensors under HF's names.
    hf_names = set(hf_model(norm, stable, head).state_dict())
    ours = {n.replace("conv.weight_g", "conv.parametrizations.weight.original0")
            .replace("conv.weight_v", "conv.parametrizations.weight.original1") for n in got} - {"num_updates"}
    assert ours == hf_names


def test_initialisation_is_deterministic_and_follows_hf():
    config = load_config(TINY)
    states = []
    for _ in range(2):
        torch.manual_seed(5)
        states.append(taichu.state_dict(taichu.build_model(config, "torch")))
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    assert_initialisation_rules(states[0], config.model)


def assert_initialisation_rules(s, m):
    """Hugging Face's (fairseq's for the position conv) initialisation, on a state dict."""
    conv = "wav2vec2.encoder.pos_conv_embed.conv."
    # Weight norm starts at g = ||v||: the effective weight is v ~ N(0, sqrt(4 / (K H))).
    np.testing.assert_allclose(s[conv + "weight_g"], np.sqrt((s[conv + "weight_v"] ** 2).sum(axis=(0, 1),
                                                                                         keepdims=True)), rtol=1e-6)
    assert abs(s[conv + "weight_v"].std() / np.sqrt(4 / (m.num_conv_pos_embeddings * m.hidden_size)) - 1) < 0.1
    assert np.all(s[conv + "bias"] == 0) and s["num_updates"].tolist() == [0]
    assert abs(s["wav2vec2.encoder.layers.0.attention.q_proj.weight"].std() / m.initializer_range - 1) < 0.2
    assert abs(s["quantizer.weight_proj.weight"].std() - 1) < 0.2
    for name in ("quantizer.codevectors", "wav2vec2.masked_spec_embed"):
        assert 0 <= s[name].min() and s[name].max() <= 1 and s[name].mean() > 0.3, name
    first = s["wav2vec2.feature_extractor.conv_layers.0.conv.weight"]    # kaiming: sqrt(2 / (1 x 10))
    assert abs(first.std() / np.sqrt(2 / 10) - 1) < 0.25
    bound = 1 / np.sqrt(m.hidden_size)
    assert np.abs(s["project_hid.weight"]).max() <= bound and np.abs(s["project_hid.bias"]).max() <= bound


# ----------------------------------------------------------------------------- (2) Hugging Face oracle

@pytest.mark.parametrize("norm, stable", VARIANTS)
def test_backbone_and_ctc_logits_equal_hugging_face(norm, stable):
    """Last hidden state, extract_features (the layer-normed conv features), CTC logits and
    the utterance embedding of a padded batch, with and without masked frames; in float32
    (relative 1e-5) and in float64 (within float64 rounding: the same math)."""
    hf = hf_model(norm, stable, "ctc")
    ours = ours_from_hf(hf)
    values, mask = audio(1)
    frames = frame_count(ours.config.model, np.asarray(LENGTHS))
    masked, _ = pretraining_draws(ours.config)
    # float64: rounding cannot decide, so anything above its bound is a difference in the math.
    bounds = {torch.float32: TOL,
              torch.float64: float64_tolerance(1.0, backbone_terms(ours.config.model, int(frames.max())))}
    for dtype, bound in bounds.items():
        hf.to(dtype), ours.to(dtype)
        x, am = t(values).to(dtype), t(mask)
        with torch.no_grad():
            for time_mask in (None, t(masked)):
                expected = hf.wav2vec2(x, attention_mask=am, mask_time_indices=time_mask)
                hidden, extract, frame_mask, _ = ours.encode(x, am, time_mask)
                pairs = [(hidden, expected.last_hidden_state), (extract, expected.extract_features)]
                if time_mask is None:
                    pairs += [(ours(x, am), hf(x, attention_mask=am).logits)]
                    real = t(frame_mask.numpy()[..., None].astype(np.float64)).to(dtype)
                    pooled = (expected.last_hidden_state * real).sum(1) / real.sum(1)
                    pairs += [(ours.embed(x, am), pooled)]
                diffs = scaled_differences([a.double().numpy() for a, _ in pairs],
                                           [b.double().numpy() for _, b in pairs])
                print(f"[{norm}, stable={stable}, {dtype}, masked={time_mask is not None}] "
                      f"hidden, extract_features, (logits, embedding): {diffs} (bound {bound:.1e})")
                assert max(diffs) <= bound, diffs
                assert np.array_equal(frame_mask.numpy(), np.arange(frame_mask.shape[1]) < frames[:, None])
        # Unpadded input, no mask at all: HF skips the padding logic, and so do we.
        with torch.no_grad():
            x1 = x[:1]
            diffs = scaled_differences([ours(x1).double().numpy()], [hf(x1).logits.double().numpy()])
            assert max(diffs) <= bound, diffs


def test_feature_penalty_is_the_mean_square_of_real_conv_features():
    hf = hf_model("group", False, "pretraining")
    ours = ours_from_hf(hf)
    values, mask = audio(2)
    with torch.no_grad():
        conv = hf.wav2vec2.feature_extractor(t(values)).transpose(1, 2).double().numpy()
        _, _, frame_mask, penalty = ours.encode(t(values), t(mask))
    real = frame_mask.numpy()
    expected = (conv[real] ** 2).mean()
    assert abs(float(penalty) - expected) <= TOL * expected


@pytest.mark.parametrize("norm, stable", VARIANTS)
def test_pretraining_loss_equals_hugging_face_in_evaluation(norm, stable):
    """Argmax quantizer: contrastive sum, diversity and perplexity (over the masked frames of
    the hard codes) of a padded batch, and loss = HF's loss / masked frames."""
    from torch_impl.wav2vec2 import pretraining_terms, training_loss

    hf = hf_model(norm, stable, "pretraining")
    ours = ours_from_hf(hf)
    assert ours.config.model.quantizer.feature_penalty_weight == 0.0   # HF's loss has none
    values, mask = audio(3)
    time_mask, negatives = pretraining_draws(ours.config, seed=3)
    with torch.no_grad():
        expected = hf(t(values), attention_mask=t(mask), mask_time_indices=t(time_mask),
                      sampled_negative_indices=t(negatives).long())
        terms = pretraining_terms(ours, t(values), t(mask), t(time_mask), t(negatives))
        (loss,) = training_loss(ours, t(values), t(mask), t(time_mask), t(negatives), None)
    num_masked = int(time_mask.sum())
    assert int(terms["num_masked"]) == num_masked
    got = [terms["contrastive_sum"], terms["perplexity"], terms["diversity"] * num_masked, loss * num_masked]
    want = [expected.contrastive_loss, expected.codevector_perplexity, expected.diversity_loss, expected.loss]
    rel = [abs(float(a) - float(b)) / max(1.0, abs(float(b))) for a, b in zip(got, want)]
    print(f"[{norm}, stable={stable}] contrastive, perplexity, diversity, loss: {rel}")
    assert max(rel) <= TOL, rel


@pytest.mark.parametrize("norm, stable", [("group", False), ("layer", True)])
def test_pretraining_loss_equals_hugging_face_in_training(norm, stable):
    """Training mode, dropout 0: HF's F.gumbel_softmax draws its noise from torch's
    generator; the same draw (reseeded) fed to ours as gumbel_noise gives HF's loss and
    perplexity (of the noise-free softmax over masked frames), at our annealed temperature."""
    from torch_impl.wav2vec2 import pretraining_terms

    hf = hf_model(norm, stable, "pretraining").train()
    ours = ours_from_hf(hf, ["model.quantizer.gumbel_temperature_decay=0.9"]).train()
    ours.num_updates.fill_(7)
    q = ours.config.model.quantizer
    temperature = float(ours.gumbel_temperature())
    assert abs(temperature - q.temperature(7)) <= 1e-6 * temperature   # max(2 * 0.9^7, 0.5)
    hf.set_gumbel_temperature(temperature)
    values, mask = audio(4)
    time_mask, negatives = pretraining_draws(ours.config, seed=4)
    batch, frames = time_mask.shape
    torch.manual_seed(11)
    with torch.no_grad():
        expected = hf(t(values), attention_mask=t(mask), mask_time_indices=t(time_mask),
                      sampled_negative_indices=t(negatives).long())
    torch.manual_seed(11)
    noise = -torch.empty(batch * frames * q.num_codevector_groups, q.num_codevectors_per_group).exponential_().log()
    with torch.no_grad():
        terms = pretraining_terms(ours, t(values), t(mask), t(time_mask), t(negatives),
                                  noise.view(batch, frames, -1))
    assert float(terms["temperature"]) == temperature
    num_masked = int(time_mask.sum())
    loss = terms["contrastive_sum"] + q.diversity_loss_weight * terms["diversity"] * num_masked
    got = [loss, terms["contrastive_sum"], terms["perplexity"]]
    want = [expected.loss, expected.contrastive_loss, expected.codevector_perplexity]
    rel = [abs(float(a) - float(b)) / max(1.0, abs(float(b))) for a, b in zip(got, want)]
    print(f"[{norm}, stable={stable}, train] loss, contrastive, perplexity: {rel}")
    assert max(rel) <= TOL, rel
    # Another draw gives another loss: the noise is really used.
    with torch.no_grad():
        other = pretraining_terms(ours, t(values), t(mask), t(time_mask), t(negatives),
                                  torch.flip(noise, (0,)).view(batch, frames, -1))
    assert abs(float(other["contrastive_sum"]) - float(expected.contrastive_loss)) > 1e-3


def test_gumbel_noise_is_what_torch_gumbel_softmax_draws():
    """F.gumbel_softmax(logits, tau) = softmax((logits - log(Exp(1) draw)) / tau), the
    exponential drawn into a tensor of the logits' shape: what the test above replays."""
    logits = torch.randn(12, 5)
    torch.manual_seed(3)
    soft = torch.nn.functional.gumbel_softmax(logits, tau=0.7, hard=False)
    torch.manual_seed(3)
    noise = -torch.empty(12, 5).exponential_().log()
    assert torch.equal(soft, ((logits + noise) / 0.7).softmax(-1))


def test_a_distractor_equal_to_its_target_is_masked():
    """A tiny codebook (2 x 5) makes equal codes common: HF sets their logits to -inf, ours
    to a finite value whose exp is 0 as well; the losses agree (checked above) and here the
    case is shown to occur, and to change the loss when unmasked."""
    from torch_impl import wav2vec2 as impl

    hf = hf_model("group", False, "pretraining")
    ours = ours_from_hf(hf)
    values, mask = audio(3)
    time_mask, negatives = pretraining_draws(ours.config, seed=3)
    with torch.no_grad():
        hidden, extract, _, _ = ours.encode(t(values), t(mask), t(time_mask))
        quantized, _ = ours.quantizer(extract, t(time_mask))
        quantized = ours.project_q(quantized).reshape(-1, 6)
    flat = negatives.reshape(len(LENGTHS), -1, 4)
    same = (quantized.numpy()[flat] == quantized.numpy().reshape(len(LENGTHS), -1, 1, 6)).all(-1)
    assert same[time_mask].any()
    with torch.no_grad():
        masked = impl.pretraining_terms(ours, t(values), t(mask), t(time_mask), t(negatives))["contrastive_sum"]
        saved, impl.MASKED_LOGIT = impl.MASKED_LOGIT, 0.0
        try:
            unmasked = impl.pretraining_terms(ours, t(values), t(mask), t(time_mask), t(negatives))["contrastive_sum"]
        finally:
            impl.MASKED_LOGIT = saved
    assert float(unmasked) > float(masked) + 1e-3


@pytest.mark.parametrize("norm, stable", [("group", True), ("layer", False)])
def test_ctc_loss_equals_hugging_face(norm, stable):
    """HF's labels loss (ctc_loss_reduction "mean", blank = pad_token_id 0) on a padded
    batch with labels padded by -100; one label row too long for its frames (zero_infinity)."""
    from torch_impl.wav2vec2 import training_loss

    hf = hf_model(norm, stable, "ctc")
    ours = ours_from_hf(hf)
    values, mask = audio(5)
    labels = np.full((3, 10), -100, np.int64)
    labels[0, :6] = [2, 3, 1, 4, 5, 6]
    labels[1, :3] = [7, 7, 8]             # a repeat needs a blank between: 5 frames at least
    labels[2, :10] = np.arange(10) % 8 + 1  # 10 labels, 8 frames: infeasible, zeroed
    assert ours.config.model.ctc.zero_infinity
    with torch.no_grad():
        expected = hf(t(values), attention_mask=t(mask), labels=t(labels)).loss
        (loss,) = training_loss(ours, t(values), t(mask), None, t(labels.astype(np.int32)))
        # The infeasible row counts as 0 in the mean over 3 rows.
        (two,) = training_loss(ours, t(values[:2]), t(mask[:2]), None, t(labels[:2]))
    assert abs(float(loss) - float(expected)) <= TOL * max(1.0, abs(float(expected))), (loss, expected)
    assert abs(3 * float(loss) - 2 * float(two)) <= TOL * float(two)
    # With masked frames (SpecAugment): HF's CTC passes mask_time_indices on to its backbone.
    time_mask, _ = pretraining_draws(ours.config, seed=5)
    with torch.no_grad():
        expected = hf(t(values), attention_mask=t(mask), labels=t(labels), mask_time_indices=t(time_mask)).loss
        (loss,) = training_loss(ours, t(values), t(mask), t(time_mask), t(labels))
    assert abs(float(loss) - float(expected)) <= TOL * max(1.0, abs(float(expected))), (loss, expected)


# ----------------------------------------------------------------------------- (3) training

def test_gradients_flow_in_pretraining():
    from torch_impl.wav2vec2 import after_step, training_loss

    config = load_config(TINY)
    torch.manual_seed(0)
    model = taichu.build_model(config, "torch").train()
    values, mask = audio(6, (4000, 3100))
    time_mask, negatives = pretraining_draws(config, (4000, 3100), seed=6)
    noise = np.random.default_rng(6).gumbel(size=(*time_mask.shape, 16)).astype(np.float32)
    (loss,) = training_loss(model, t(values), t(mask), t(time_mask), t(negatives), t(noise))
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    before = float(model.gumbel_temperature())
    after_step(model)
    assert model.num_updates.tolist() == [1]
    assert float(model.gumbel_temperature()) == pytest.approx(before * 0.99, rel=1e-6)


def test_feature_encoder_freeze():
    """No gradient reaches the convs while num_updates < freeze_feature_encoder_steps, and
    it does from then on; everything else learns throughout."""
    from torch_impl.wav2vec2 import after_step, training_loss

    config = load_config(TINY, ["model.head=ctc", "model.ctc.freeze_feature_encoder_steps=2"])
    torch.manual_seed(0)
    model = taichu.build_model(config, "torch").train()
    values, mask = audio(7, (4000, 3100))
    labels = np.array([[5, 6, 7, 1, 8], [9, 10, -100, -100, -100]], np.int64)

    def grads():
        model.zero_grad()
        training_loss(model, t(values), t(mask), None, t(labels))[0].backward()
        conv = [p.grad.abs().sum() for n, p in model.named_parameters() if ".feature_extractor." in n]
        # masked_spec_embed: no frame is masked here.
        rest = [p.grad.abs().sum() for n, p in model.named_parameters()
                if ".feature_extractor." not in n and n != "wav2vec2.masked_spec_embed"]
        return float(sum(conv)), min(float(g) for g in rest)

    for step in range(3):
        conv, rest = grads()
        assert rest > 0
        assert (conv == 0) == (step < 2), (step, conv)
        after_step(model)


# ----------------------------------------------------------------------------- (4) input checks

def test_input_checks():
    config = load_config(TINY)
    model = taichu.build_model(config, "torch").eval()
    shortest = receptive_field(config.model)
    values, mask = audio(8, (2000, shortest - 1))
    with pytest.raises(ValueError, match=rf"row 1 has {shortest - 1} real samples.*at least {shortest} samples "
                                         rf"\({1000 * shortest / 16000:.1f} ms"):
        model(t(values), t(mask))
    with pytest.raises(ValueError, match="at least"):
        model(t(values[:1, :shortest - 1]))
    with pytest.raises(ValueError, match=r"input_values must be \[batch, samples\]"):
        model(t(values[0]))
    with pytest.raises(ValueError, match="floating point"):
        model(t(np.ones((1, 2000), np.int32)))
    values, mask = audio(8, (2000, 1500))
    bad = mask.copy()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        model.embed(t(values), t(bad))
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        model(t(values), t(mask[:, :-1]))
    with torch.no_grad():
        assert model.embed(t(values), t(mask)).shape == (2, config.model.hidden_size)


# ----------------------------------------------------------------------------- (5) conversion

def test_config_json_both_ways_and_refusals():
    config = load_config(TINY, ["model.head=ctc", f"model.ctc.alphabet={json.dumps(ALPHABET)}"])
    hf = convert.config_to_hf(config, "float32")
    assert hf["architectures"] == ["Wav2Vec2ForCTC"] and hf["vocab_size"] == len(ALPHABET)
    assert convert.hf_to_config(hf, "ours") == config                      # taichu_config rides along
    bare = {k: v for k, v in hf.items() if k != "taichu_config"}
    back = convert.hf_to_config({**bare, "vocab.json": {"<pad>": 0, **{s: i for i, s in enumerate(ALPHABET) if i}}},
                                "bare")
    # What HF's config has no key for: its loss has no feature penalty, and its Gumbel
    # schedule lives in the training script (whose defaults are ours).
    assert back.model == config.model.model_copy(update={"quantizer": config.model.quantizer.model_copy(
        update={"feature_penalty_weight": 0.0, "gumbel_temperature_decay": 0.999995})})
    # HF's config of a pretraining model.
    hf = hf_config("layer", True, "pretraining", feat_quantizer_dropout=0.05).to_dict()
    config = convert.hf_to_config(hf, "hf")
    assert config.model.head == "pretraining" and config.model.final_dropout == 0.05
    assert config.model.activation == "gelu_new" and config.model.feat_extract_activation == "relu"

    def refused(edit, match):
        with pytest.raises(ConfigError, match=match):
            convert.hf_to_config({**hf_config("group", False, "ctc").to_dict(), **edit}, "the file")

    refused({"add_adapter": True}, "the file: add_adapter")
    refused({"pad_token_id": 3}, "pad_token_id 3 is not supported")
    refused({"hidden_act": "swish"}, "hidden_act 'swish'")
    refused({"architectures": ["Wav2Vec2Model"]}, "architectures")
    refused({"architectures": ["Wav2Vec2ForPreTraining"], "apply_spec_augment": False}, "apply_spec_augment")
    refused({"vocab.json": {"<pad>": 0, "a": 2}}, "ids must be 0..8")
    # Training-only features are read with a note.
    notes = convert.HF_FAMILIES["wav2vec2"].notes({**hf_config("group", False, "ctc").to_dict(), "layerdrop": 0.1,
                                                   "ctc_loss_reduction": "sum"})
    assert any("layerdrop 0.1 read as 0" in n for n in notes) and any("ctc_loss_reduction" in n for n in notes)


@pytest.mark.parametrize("head", ["pretraining", "ctc"])
def test_hugging_face_directory_loads_with_its_outputs(head, tmp_path):
    """A save_pretrained directory (plus the CTC tokenizer's vocab.json) loads with
    taichu.load_model and gives HF's outputs; files with the legacy weight_g / weight_v names
    load the same."""
    from transformers import Wav2Vec2CTCTokenizer

    hf = hf_model("layer", True, head)
    hf.save_pretrained(tmp_path / "hf")
    if head == "ctc":
        # Without vocab.json the symbols are placeholders, and the conversion says so.
        notes = convert.open_source(tmp_path / "hf").notes
        assert any("placeholders" in n for n in notes), notes
        vocab = {"<pad>": 0, **{s: i for i, s in enumerate(ALPHABET) if i}}
        (tmp_path / "vocab.json").write_text(json.dumps(vocab))
        Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token=None, bos_token=None,
                             eos_token=None).save_pretrained(tmp_path / "hf")
    model = taichu.load_model(tmp_path / "hf", backend="torch")
    if head == "ctc":
        assert model.config.model.ctc.alphabet == ALPHABET
    values, mask = audio(9)
    with torch.no_grad():
        expected = (hf(t(values), attention_mask=t(mask)).logits if head == "ctc"
                    else hf.wav2vec2(t(values), attention_mask=t(mask)).last_hidden_state)
        got = model(t(values), t(mask))
    assert max(scaled_differences([got.numpy()], [expected.numpy()])) <= TOL

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for old, new in (("weight_g", "original0"), ("weight_v", "original1")):
        tensors[f"wav2vec2.encoder.pos_conv_embed.conv.{old}"] = tensors.pop(
            f"wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.{new}")
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    _, a = convert.load(tmp_path / "hf")
    _, b = convert.load(legacy)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert a["num_updates"].dtype == np.int64 and a["num_updates"].tolist() == [0]


@pytest.mark.parametrize("head", ["pretraining", "ctc"])
def test_our_export_loads_in_hugging_face_and_round_trips(head, tmp_path):
    from transformers import AutoTokenizer, Wav2Vec2ForCTC, Wav2Vec2ForPreTraining

    overrides = [] if head == "pretraining" else ["model.head=ctc", f"model.ctc.alphabet={json.dumps(ALPHABET)}"]
    config = load_config(TINY, overrides)
    torch.manual_seed(3)
    taichu.save_model(taichu.build_model(config, "torch"), tmp_path / "ours")
    report = convert.convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    assert report["tokenizer_problem"] is None
    names = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert "num_updates" not in names and not any(".weight_g" in n for n in names)
    cls = Wav2Vec2ForPreTraining if head == "pretraining" else Wav2Vec2ForCTC
    hf, info = cls.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    ours = taichu.load_model(tmp_path / "ours", backend="torch")
    values, mask = audio(10, (3000, 2400))
    with torch.no_grad():
        got = ours(t(values), t(mask))
        expected = (hf(t(values), attention_mask=t(mask)).logits if head == "ctc"
                    else hf.wav2vec2(t(values), attention_mask=t(mask)).last_hidden_state)
    assert max(scaled_differences([expected.numpy()], [got.numpy()])) <= TOL
    if head == "ctc":
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
        assert tokenizer.pad_token_id == 0 and len(tokenizer) == len(ALPHABET)
        ids = [ALPHABET.index(s) for s in "nni3|ao2"]
        assert tokenizer.decode(ids) == "ni3 ao2"

    convert.convert(tmp_path / "hf", tmp_path / "back")
    assert taichu.load_config(tmp_path / "back") == config
    a, b = load_file(tmp_path / "back" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in a.items()} == \
        {k: (v.dtype, v.shape, v.tobytes()) for k, v in b.items()}


def test_masked_spec_embed_only_where_hugging_face_has_one(tmp_path):
    """HF builds masked_spec_embed only when it masks something: none with mask_time_prob 0
    (ours is zeros, and is left out of our HF export); one with channel masking alone (kept)."""
    from transformers import Wav2Vec2ForCTC

    hf = hf_model("group", False, "ctc", mask_time_prob=0.0)
    assert "wav2vec2.masked_spec_embed" not in hf.state_dict()
    ours = ours_from_hf(hf)
    assert ours.config.model.mask_time_prob == 0 and not ours.wav2vec2.masked_spec_embed.any()
    taichu.save_model(ours, tmp_path / "ours")
    convert.convert(tmp_path / "ours", tmp_path / "hf", to="hf")
    _, info = Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    hf = hf_model("group", False, "ctc", mask_time_prob=0.0, mask_feature_prob=0.1)
    ours = ours_from_hf(hf)
    assert torch.equal(ours.wav2vec2.masked_spec_embed, hf.wav2vec2.masked_spec_embed)


# ============================================================================= (6) MindSpore
#
# mindspore_impl/wav2vec2.py against torch_impl/wav2vec2.py (the Hugging Face oracle above
# vouches for torch): the same canonical weights in both backends, random padded audio.
# Forward (hidden states, extract_features, CTC logits, embed) in PyNative and graph mode
# within the project's float32 1e-5; the pretraining terms in training mode (fixed Gumbel
# noise) and in evaluation (argmax); the CTC loss with labels too long for their frames;
# every parameter's gradient (graph mode); the feature-encoder freeze and the Gumbel
# temperature read from num_updates inside compiled graphs; the trainer's eval_loss running
# the evaluation branch.
#
# The MindSpore-only layers (FrameConv1d, WeightNormConv1d: speed idioms for MindSpore's CPU
# Conv2D) are checked against torch's layers on their own, in float64. Speed, forward +
# backward, graph mode, 2 CPU cores (a shared machine: +-30 %): wav2vec2-small's feature
# encoder at [8, 64000] through nn.Conv1d as torch writes it 5.3 s, through FrameConv1d
# 0.44 s, torch_impl 0.43 s; its position convolution ([8, 128, 199], K 32, 8 groups) as a
# grouped Conv2D 1.7-2.0 s, as per-tap BatchMatMuls 0.06 s, torch 0.04-0.12 s.

# Tiny configs of both norms: "group" with the tiny stack ([10, 4, 4] / [5, 4, 4]: a kernel
# twice and once its stride), GELU, an even position kernel (16), no conv bias; "layer" with
# [10, 3, 2] / [5, 2, 3] (a kernel that is no multiple of its stride, and one shorter than
# it), relu / gelu_new, an odd position kernel (7), conv biases. Together they take every
# path of FrameConv1d.
MS_VARIANT_OVERRIDES = {
    "group": ["model.feat_extract_norm=group", "model.conv_bias=false", "model.feat_extract_activation=gelu",
              "model.activation=gelu"],
    "layer": ["model.feat_extract_norm=layer", "model.conv_bias=true", "model.feat_extract_activation=relu",
              "model.activation=gelu_new", "model.conv_dim=[16, 12, 14]", "model.conv_kernel=[10, 3, 2]",
              "model.conv_stride=[5, 2, 3]", "model.num_conv_pos_embeddings=7"],
}
LONG = (2000, 1500, 900)          # samples per row for the losses: more frames to mask


def ms_config(norm: str, stable: bool, head: str, *extra):
    return load_config(TINY, [*MS_VARIANT_OVERRIDES[norm], f"model.do_stable_layer_norm={str(stable).lower()}",
                              f"model.head={head}", *extra])


def perturbed_arrays(config, seed: int = 0) -> dict:
    """A torch model's canonical state with every float tensor perturbed (LayerNorms not 1/0,
    biases not 0), as hf_model does for the oracle."""
    torch.manual_seed(seed)
    arrays = taichu.state_dict(taichu.build_model(config, "torch"))
    rng = np.random.default_rng(seed + 100)
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype == np.float32 else v
            for k, v in arrays.items()}


def both_models(config, arrays=None):
    """(torch model, MindSpore model) holding the same canonical arrays, in evaluation."""
    arrays = perturbed_arrays(config) if arrays is None else arrays
    models = []
    for backend in ("torch", "mindspore"):
        model = taichu.build_model(config, backend)
        taichu.load_state_dict(model, arrays)
        if backend == "torch":
            model.eval()
        else:
            model.set_train(False)
        models.append(model)
    return tuple(models)


def ms_t(*arrays):
    """MindSpore tensors; int64 as int32 (what the trainer feeds, and MindSpore's CPU Gather)."""
    import mindspore as ms

    out = tuple(ms.Tensor(a.astype(np.int32) if a.dtype == np.int64 else np.ascontiguousarray(a)) for a in arrays)
    return out if len(out) > 1 else out[0]


def ms_float64(model) -> None:
    """Every float32 parameter of a MindSpore model as float64 (what torch's .to(float64) does)."""
    import mindspore as ms

    for param in model.get_parameters():
        if param.dtype == ms.float32:
            values = param.asnumpy().astype(np.float64)
            param.set_dtype(ms.float64)
            param.set_data(ms.Tensor(values))


def compiled(fn, graph: bool):
    """fn compiled with mindspore.jit in graph mode, else fn (PyNative). A jitted function is
    compiled per mode of use: MindSpore 2.10 keys a plain function's graph on its arguments,
    not on the cells' training flag, so one function called after set_train(False) would
    reuse its training graph (see test_ms_trainer_eval_loss_runs_the_evaluation_branch)."""
    import mindspore as ms

    return ms.jit(fn) if graph else fn


def gumbel(config, time_mask, seed: int):
    q = config.model.quantizer
    return np.random.default_rng(seed).gumbel(
        size=(*time_mask.shape, q.num_codevector_groups * q.num_codevectors_per_group)).astype(np.float32)


def relative(a, b) -> float:
    """|a - b| / max(1, |b|) of two scalars (the oracle tests' measure)."""
    return abs(float(a) - float(b)) / max(1.0, abs(float(b)))


# ----------------------------------------------------------------------------- (6a) names, layers

@pytest.mark.parametrize("head", ["pretraining", "ctc"])
@pytest.mark.parametrize("norm", ["group", "layer"])
def test_ms_parameters_are_the_tensor_specs(norm, head):
    """Canonical names and shapes are the tensor specs; MindSpore's own names differ only in
    the leaves of taichu.weights (gamma/beta, 4-D conv weights); num_updates is an int64
    Parameter outside the trained ones; the position convolution's three Parameters keep
    their canonical names and shapes."""
    import mindspore as ms

    from mindspore_impl.weights import canonical_parameters

    config = ms_config(norm, False, head)
    model = taichu.build_model(config, "mindspore")
    specs = tensor_specs(config)
    assert {k: v.shape for k, v in taichu.state_dict(model).items()} == {k: s.shape for k, s in specs.items()}
    params = canonical_parameters(model)
    for name, (param, kind) in params.items():
        prefix, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        expected_leaf = {"layer_norm": {"weight": "gamma", "bias": "beta"},
                         "group_norm": {"weight": "gamma", "bias": "beta"}}.get(kind, {}).get(leaf, leaf)
        assert param.name == (f"{prefix}.{expected_leaf}" if prefix else expected_leaf), (name, param.name)
        if kind == "conv1d" and leaf == "weight":
            assert param.shape == (specs[name].shape[0], specs[name].shape[1], 1, specs[name].shape[2])
    assert model.num_updates.dtype == ms.int64 and not model.num_updates.requires_grad
    trained = {param.name for param in model.trainable_params()}
    assert trained == {param.name for param, _ in params.values()} - {"num_updates"}
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    assert (conv.weight_v.name, conv.weight_v.ndim) == ("wav2vec2.encoder.pos_conv_embed.conv.weight_v", 3)


def test_ms_initialisation_follows_the_torch_rules():
    """The same rules as torch_impl's (assert_initialisation_rules), from MindSpore's own RNG."""
    import mindspore as ms

    config = load_config(TINY)
    states = []
    for _ in range(2):
        ms.set_seed(5)
        states.append(taichu.state_dict(taichu.build_model(config, "mindspore")))
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    assert_initialisation_rules(states[0], config.model)


def _torch_grads(fn, *tensors):
    """fn(*tensors) and the gradients of sum(fn(...) * r) for a fixed random r."""
    for x in tensors:
        x.requires_grad_(True)
    y = fn(*tensors)
    r = torch.from_numpy(np.random.default_rng(99).standard_normal(tuple(y.shape)))
    (y * r).sum().backward()
    return y.detach().numpy(), [x.grad.numpy() for x in tensors], r.numpy()


def _ms_grads(cell, x, r, graph):
    """cell(x) and the gradients of sum(cell(x) * r) w.r.t. x and the cell's parameters."""
    import mindspore as ms

    def loss(value):
        return (cell(value) * ms.Tensor(r)).sum()

    step = compiled(ms.value_and_grad(loss, 0, cell.trainable_params()), graph)
    _, (dx, dparams) = step(ms.Tensor(x))
    forward = compiled(cell, graph)
    return forward(ms.Tensor(x)).asnumpy(), [dx.asnumpy(), *(g.asnumpy() for g in dparams)]


@pytest.mark.parametrize("kernel, stride", [(10, 5), (3, 2), (2, 3), (4, 4), (5, 2), (1, 1)])
def test_ms_frame_conv_is_conv1d(kernel, stride, ms_mode):
    """FrameConv1d (a matmul over cut-out frames, channels-last) equals torch's Conv1d,
    forward and gradients (input, weight, bias), in float64 within float64 rounding of the
    sums involved: an output sums in x kernel products and the bias; an input gradient
    out x ceil(kernel / stride) products; a weight or bias gradient one product per frame
    (per row of the frame layout, frames + ceil(kernel / stride) - 1 per utterance)."""
    import mindspore as ms

    from mindspore_impl.wav2vec2 import FrameConv1d

    rng = np.random.default_rng(kernel * 10 + stride)
    batch, length, c_in, c_out = 3, 53, 4, 5
    x, w = rng.standard_normal((batch, length, c_in)), rng.standard_normal((c_out, c_in, kernel))
    b = rng.standard_normal(c_out)
    cell = FrameConv1d(c_in, c_out, kernel, stride=stride, pad_mode="valid", has_bias=True)
    for param, value in ((cell.weight, w[:, :, None, :]), (cell.bias, b)):
        param.set_dtype(ms.float64)
        param.set_data(ms.Tensor(value))

    def conv(xt, wt, bt):
        return torch.nn.functional.conv1d(xt.transpose(1, 2), wt, bt, stride=stride).transpose(1, 2)

    expected, expected_grads, r = _torch_grads(conv, t(x), t(w), t(b))
    got, got_grads = _ms_grads(cell, x, r, ms_mode == "graph")
    got_grads[1] = got_grads[1][:, :, 0, :]
    frames, shifts = (length - kernel) // stride + 1, -(-kernel // stride)
    assert got.shape == expected.shape == (batch, frames, c_out)
    # The sums of absolute values: the same conv and gradients of |x|, |w|, |b| against |r|.
    scale = conv(t(np.abs(x)), t(np.abs(w)), t(np.abs(b))).detach().numpy().max()
    abs_r = torch.from_numpy(np.abs(r))
    abs_inputs = [t(np.abs(a)).requires_grad_(True) for a in (x, w, b)]
    (conv(*abs_inputs) * abs_r).sum().backward()
    scales = [scale] + [float(a.grad.abs().max()) for a in abs_inputs]
    terms = [c_in * kernel + 1, c_out * shifts, batch * (frames + shifts - 1), batch * (frames + shifts - 1)]
    bounds = [float64_tolerance(s, n) for s, n in zip(scales, terms)]
    diffs = [float(np.abs(a - e).max()) for a, e in zip([got, *got_grads], [expected, *expected_grads])]
    print(f"[{ms_mode}, kernel {kernel}, stride {stride}] output, d input, d weight, d bias: {diffs} "
          f"(bounds {bounds})")
    assert all(d <= bound for d, bound in zip(diffs, bounds)), (diffs, bounds)


@pytest.mark.parametrize("kernel", [7, 8])
def test_ms_weight_norm_conv_is_grouped_conv1d(kernel, ms_mode):
    """WeightNormConv1d (channels-last, one BatchMatMul per tap) equals torch's grouped,
    padded Conv1d of the weight g v / ||v||, forward and gradients (input, g, v, bias), in
    float64, each within float64 rounding of the sums on its chain (scales below)."""
    import mindspore as ms

    from mindspore_impl.wav2vec2 import WeightNormConv1d

    hidden, groups, batch, frames = 12, 3, 2, 9
    rng = np.random.default_rng(kernel)
    x = rng.standard_normal((batch, frames, hidden))
    g, v = rng.random((1, 1, kernel)) + 0.5, rng.standard_normal((hidden, hidden // groups, kernel))
    b = rng.standard_normal(hidden)
    cell = WeightNormConv1d(hidden, kernel, groups)
    for param, value in ((cell.weight_g, g), (cell.weight_v, v), (cell.bias, b)):
        param.set_dtype(ms.float64)
        param.set_data(ms.Tensor(value))

    def conv(xt, gt, vt, bt):
        weight = gt * vt / vt.pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        return torch.nn.functional.conv1d(xt.transpose(1, 2), weight, bt, padding=kernel // 2,
                                          groups=groups).transpose(1, 2)

    expected, expected_grads, r = _torch_grads(conv, t(x), t(g), t(v), t(b))
    got, got_grads = _ms_grads(cell, x, r, ms_mode == "graph")
    order = {p.name.rsplit(".", 1)[-1]: i for i, p in enumerate(cell.trainable_params())}
    got_grads = [got_grads[0]] + [got_grads[1 + order[name]] for name in ("weight_g", "weight_v", "bias")]
    out_frames = frames + 2 * (kernel // 2) - kernel + 1
    assert got.shape == expected.shape == (batch, out_frames, hidden)
    # Sums of absolute values, to first order along the chain: the convolution of |x| with
    # |W| (W = g v / ||v||), its gradients S_x, S_W against |r| (exact: all terms >= 0), and
    # those carried through the norm: dg = sum(dW v) / ||v||, dv = g dW / ||v|| - g v
    # sum(dW v) / ||v||^3, each term taken absolute.
    with torch.no_grad():
        norm = t(v).pow(2).sum(dim=(0, 1), keepdim=True).sqrt()
        weight = (t(g) * t(v) / norm).abs()
    abs_x, abs_w = t(np.abs(x)).requires_grad_(True), weight.clone().requires_grad_(True)
    conv_abs = torch.nn.functional.conv1d(abs_x.transpose(1, 2), abs_w, t(np.abs(b)), padding=kernel // 2,
                                          groups=groups).transpose(1, 2)
    (conv_abs * torch.from_numpy(np.abs(r))).sum().backward()
    s_w, abs_v, n = abs_w.grad.numpy(), np.abs(v), norm.numpy()
    scales = [float(conv_abs.detach().max()), float(abs_x.grad.max()),
              float((s_w * abs_v / n).sum(axis=(0, 1)).max()),
              float((np.abs(g) / n * s_w + np.abs(g) * abs_v / n ** 3 * (s_w * abs_v).sum(axis=(0, 1))).max()),
              float(np.abs(r).sum(axis=(0, 1)).max())]
    width = hidden // groups
    positions, norm_terms = batch * out_frames, hidden * width
    terms = [width * kernel + kernel + 1, width * kernel + kernel, positions + norm_terms + 4,
             positions + norm_terms + 6, positions]
    bounds = [float64_tolerance(scale, n) for scale, n in zip(scales, terms)]
    diffs = [float(np.abs(a - e).max()) for a, e in zip([got, *got_grads], [expected, *expected_grads])]
    print(f"[{ms_mode}, kernel {kernel}] output, d input, d g, d v, d bias: {diffs} (bounds {bounds})")
    assert all(d <= bound for d, bound in zip(diffs, bounds)), (diffs, bounds)


def test_ms_frame_layer_norm_is_layer_norm(ms_mode):
    """FrameLayerNorm (nn.LayerNorm's kernel forward, its gradient written out) in float32
    against torch's layer_norm and autograd in float64 on the same float32 values, forward
    and gradients (input, gamma, beta). In float32, not float64: MindSpore's CPU LayerNorm
    kernel computes a float64 frame's mean and variance to float32 accuracy (1e-7 apart from
    numpy's here). Bounds: float32 rounding of the sums on each chain (a frame's mean and
    variance sum its `width` values; the input gradient two row sums of `width` terms on
    top; gamma's and beta's gradients one term per frame), scaled by the sums of absolute
    values of those terms."""
    from mindspore_impl.wav2vec2 import FrameLayerNorm
    from tolerance import float32_tolerance

    rng = np.random.default_rng(3)
    batch, frames, width, eps = 3, 41, 12, 1e-5
    x = (rng.standard_normal((batch, frames, width)) * 3 + 1).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, width).astype(np.float32)
    beta = rng.standard_normal(width).astype(np.float32)
    cell = FrameLayerNorm(width, eps)
    for param, value in ((cell.gamma, gamma), (cell.beta, beta)):
        param.set_data(ms_t(value))

    def norm(xt, gt, bt):
        return torch.nn.functional.layer_norm(xt, (width,), gt, bt, eps=eps)

    # The weights r of sum(y * r) are float32 values, so both sides differentiate one function.
    r = np.random.default_rng(99).standard_normal(x.shape).astype(np.float32)
    x64, gamma64, beta64, r = (a.astype(np.float64) for a in (x, gamma, beta, r))
    inputs = [t(a).requires_grad_(True) for a in (x64, gamma64, beta64)]
    y = norm(*inputs)
    (y * t(r)).sum().backward()
    expected, expected_grads = y.detach().numpy(), [a.grad.numpy() for a in inputs]
    got, got_grads = _ms_grads(cell, x, r.astype(np.float32), ms_mode == "graph")
    normed = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
    rstd = 1 / np.sqrt(x64.var(-1, keepdims=True) + eps)
    scaled = np.abs(r * gamma64)
    scales = [float((np.abs(normed) * gamma64 + np.abs(beta64)).max()),
              float((rstd * (scaled + scaled.mean(-1, keepdims=True)
                             + np.abs(normed) * (scaled * np.abs(normed)).mean(-1, keepdims=True))).max()),
              float(np.abs(r * normed).sum((0, 1)).max()), float(np.abs(r).sum((0, 1)).max())]
    terms = [2 * width + 4, 4 * width + 8, batch * frames + 2 * width, batch * frames]
    bounds = [float32_tolerance(s, n) for s, n in zip(scales, terms)]
    diffs = [float(np.abs(a - e).max()) for a, e in zip([got, *got_grads], [expected, *expected_grads])]
    print(f"[{ms_mode}] output, d input, d gamma, d beta: {diffs} (bounds {bounds})")
    assert all(d <= bound for d, bound in zip(diffs, bounds)), (diffs, bounds)


# ----------------------------------------------------------------------------- (6b) forward

# Graph-mode compiles are the slow part of this file (~10 s a variant here): every variant
# in PyNative, the two published ones (base: group norm, post-LN; large: layer norm, pre-LN)
# in graph mode too; the graph-mode gradient test below covers the other two.
PYNATIVE_AND_GRAPH = ([(norm, stable, "pynative") for norm, stable in VARIANTS]
                      + [("group", False, "graph"), ("layer", True, "graph")])


@pytest.mark.parametrize("norm, stable, ms_mode", PYNATIVE_AND_GRAPH, indirect=["ms_mode"])
def test_ms_backbone_and_ctc_logits_equal_torch(norm, stable, ms_mode):
    """Last hidden state, extract_features, CTC logits and the utterance embedding of a padded
    batch, with and without masked frames, within the project's float32 1e-5 relative to
    max(1, |torch|) (the oracle tests' measure; observed ~3e-7), in PyNative and in graph
    mode (the encoder compiled by mindspore.jit, the model and embed run in GRAPH_MODE).

    Not in float64: the kernels run in float64, but MindSpore rounds every Python float
    scalar (attention's 1 / sqrt(head_dim), GELU's constants, ...) to float32 even against a
    float64 tensor (x * (1 / 12) is 1.6e-9 off), so a float64 run is no float64-exact
    reference; the MindSpore-only layers are checked in float64 above, where no scalar enters."""
    config = ms_config(norm, stable, "ctc")
    torch_model, ms_model = both_models(config)
    values, mask = audio(1)
    masked, _ = pretraining_draws(config)
    graph = ms_mode == "graph"

    def encode(input_values, attention_mask, mask_time_indices):
        return ms_model.encode(input_values, attention_mask, mask_time_indices)[:3]

    def encode_unmasked(input_values, attention_mask):
        return ms_model.encode(input_values, attention_mask)[:3]

    for time_mask in (None, masked):
        with torch.no_grad():
            expected = torch_model.encode(t(values), t(mask), None if time_mask is None else t(time_mask))
        if time_mask is None:
            hidden, extract, frame_mask = compiled(encode_unmasked, graph)(*ms_t(values, mask))
        else:
            hidden, extract, frame_mask = compiled(encode, graph)(*ms_t(values, mask, time_mask))
        pairs = [(hidden, expected[0]), (extract, expected[1])]
        if time_mask is None:
            with torch.no_grad():
                pairs += [(ms_model(*ms_t(values, mask)), torch_model(t(values), t(mask))),
                          (ms_model.embed(*ms_t(values, mask)), torch_model.embed(t(values), t(mask)))]
        diffs = scaled_differences([a.asnumpy() for a, _ in pairs], [b.numpy() for _, b in pairs])
        print(f"[{norm}, stable={stable}, {ms_mode}, masked={time_mask is not None}] "
              f"hidden, extract_features, (logits, embedding): {diffs}")
        assert max(diffs) <= TOL, diffs
        assert np.array_equal(frame_mask.asnumpy(), expected[2].numpy())
    # Unpadded input, no mask at all: no padding logic in either.
    with torch.no_grad():
        diffs = scaled_differences([ms_model(ms_t(values[:1])).asnumpy()], [torch_model(t(values[:1])).numpy()])
    assert max(diffs) <= TOL, diffs


def test_ms_input_checks_are_torch_s():
    import mindspore as ms

    config = load_config(TINY)
    model = taichu.build_model(config, "mindspore")
    model.set_train(False)
    values, mask = audio(8, (2000, 1500))
    bad = mask.copy()
    bad[1, 0] = 0
    with pytest.raises(ValueError, match="row 1 is not right-padded"):
        model.embed(*ms_t(values, bad))
    with pytest.raises(ValueError, match="floating point"):
        model(ms.Tensor(np.ones((1, 2000), np.int32)))
    with pytest.raises(ValueError, match=r"input_values must be \[batch, samples\]"):
        model(ms.Tensor(values[0]))
    with pytest.raises(ValueError, match="at least"):
        model(ms.Tensor(values[:1, :50]))
    assert model.embed(*ms_t(values, mask)).shape == (2, config.model.hidden_size)


# ----------------------------------------------------------------------------- (6c) losses

def _ms_terms(model, graph, *inputs):
    """pretraining_terms and training_loss of the MindSpore model, compiled when graph (one
    compiled function per call: the mode it runs in is the model's current one)."""
    from mindspore_impl.wav2vec2 import pretraining_terms, training_loss

    keys = ("contrastive_sum", "diversity", "perplexity", "num_masked", "feature_penalty", "temperature")

    def terms_and_loss(*args):
        terms = pretraining_terms(model, *args)
        return tuple(terms[k] for k in keys) + (training_loss(model, *args)[0],)

    values = compiled(terms_and_loss, graph)(*inputs)
    return dict(zip(keys + ("loss",), (float(v.asnumpy()) for v in values)))


@pytest.mark.parametrize("norm, stable, ms_mode", [("group", False, "pynative"), ("layer", True, "pynative"),
                                                   ("layer", True, "graph")], indirect=["ms_mode"])
def test_ms_pretraining_terms_equal_torch(norm, stable, ms_mode):
    """contrastive_sum, diversity, perplexity, feature_penalty, the temperature and the loss
    of a padded batch with a fixed mask, distractors and Gumbel noise, at num_updates 7
    (temperature max(2 x 0.9^7, 0.5)): in training mode (Gumbel-softmax, straight-through)
    and in evaluation (argmax), each within 1e-5 of torch's relative to max(1, |torch|)."""
    from torch_impl.wav2vec2 import pretraining_terms, training_loss

    config = ms_config(norm, stable, "pretraining", "model.quantizer.gumbel_temperature_decay=0.9",
                       "model.quantizer.diversity_loss_weight=0.5")
    arrays = perturbed_arrays(config)
    arrays["num_updates"] = np.array([7], np.int64)
    torch_model, ms_model = both_models(config, arrays)
    values, mask = audio(3, LONG)
    time_mask, negatives = pretraining_draws(config, LONG, seed=3)
    noise = gumbel(config, time_mask, seed=3)
    inputs = (values, mask, time_mask, negatives, noise)
    results = {}
    for training in (True, False):
        torch_model.train(training)
        ms_model.set_train(training)
        with torch.no_grad():
            expected = pretraining_terms(torch_model, *map(t, inputs[:4]), t(noise) if training else None)
            expected = {k: float(v) for k, v in expected.items()}
            expected["loss"] = float(training_loss(torch_model, *map(t, inputs))[0])
        got = _ms_terms(ms_model, ms_mode == "graph", *ms_t(*inputs))
        assert got["num_masked"] == expected["num_masked"] == time_mask.sum()
        rel = {k: relative(got[k], expected[k]) for k in expected}
        print(f"[{norm}, stable={stable}, {ms_mode}, {'train' if training else 'eval'}] {rel}")
        assert max(rel.values()) <= TOL, rel
        results[training] = expected
    assert abs(results[True]["temperature"] - config.model.quantizer.temperature(7)) <= 1e-6
    # The two branches differ, so the check above tells them apart.
    assert abs(results[True]["perplexity"] - results[False]["perplexity"]) > 1e-3


@pytest.mark.parametrize("zero_infinity, ms_mode", [(True, "pynative"), (False, "pynative"), (True, "graph")],
                         indirect=["ms_mode"])
def test_ms_ctc_loss_equals_torch(zero_infinity, ms_mode):
    """The CTC loss of a padded batch whose rows are: feasible; infeasible through repeats
    (10 equal labels need 19 frames, the row has 17: the CTC kernel's own infinity); longer
    than its frames (12 labels, 10 frames: MindSpore's kernel refuses it, ctc_loss works
    around it). With zero_infinity both count as 0 in the mean, as in torch; without, the
    loss is torch's inf. Also with masked frames (SpecAugment)."""
    import math

    from mindspore_impl.wav2vec2 import training_loss as ms_training_loss
    from torch_impl.wav2vec2 import training_loss

    config = ms_config("layer", True, "ctc", f"model.ctc.zero_infinity={str(zero_infinity).lower()}")
    torch_model, ms_model = both_models(config)
    values, mask = audio(5)
    assert frame_count(config.model, np.asarray(LENGTHS)).tolist() == [23, 17, 10]
    labels = np.full((3, 12), -100, np.int32)
    labels[0, :6] = [2, 3, 1, 4, 5, 6]
    labels[1, :10] = 7
    labels[2, :12] = np.arange(12) % 8 + 1
    time_mask, _ = pretraining_draws(config, seed=5)

    def loss(input_values, attention_mask, mask_time_indices, label_ids):
        return ms_training_loss(ms_model, input_values, attention_mask, mask_time_indices, label_ids)[0]

    def loss_unmasked(input_values, attention_mask, label_ids):
        return ms_training_loss(ms_model, input_values, attention_mask, None, label_ids)[0]

    graph = ms_mode == "graph"
    for rows in (slice(0, 1), slice(0, 3)):
        for time in (None, time_mask):
            args = (values[rows], mask[rows]) + (() if time is None else (time[rows],)) + (labels[rows],)
            with torch.no_grad():
                expected = float(training_loss(torch_model, t(values[rows]), t(mask[rows]),
                                               None if time is None else t(time[rows]), t(labels[rows]))[0])
            fn = loss_unmasked if time is None else loss
            got = float(compiled(fn, graph)(*ms_t(*args)).asnumpy())
            print(f"[{ms_mode}, zero_infinity={zero_infinity}, rows {rows}, masked={time is not None}] "
                  f"torch {expected}, mindspore {got}")
            if math.isinf(expected):
                assert math.isinf(got) and got > 0
            else:
                assert relative(got, expected) <= TOL, (got, expected)
    if zero_infinity:
        # The two infeasible rows count as 0: the mean over 3 rows is a third of row 0's.
        with torch.no_grad():
            one = float(training_loss(torch_model, t(values[:1]), t(mask[:1]), None, t(labels[:1]))[0])
            three = float(training_loss(torch_model, t(values), t(mask), None, t(labels))[0])
        assert relative(3 * three, one) <= TOL


def _torch_loss_and_grads(model, *inputs):
    from torch_impl.wav2vec2 import training_loss

    model.zero_grad()
    loss = training_loss(model, *inputs)[0]
    loss.backward()
    return loss.item(), {name: p.grad.numpy().copy() for name, p in model.named_parameters()}


def _ms_loss_and_grads(model, *inputs, graph=True):
    """training_loss and the gradients of every trained parameter, as the trainer computes
    them: value_and_grad compiled by mindspore.jit (or op by op in PyNative). The step
    function is returned too, for calling again."""
    import mindspore as ms

    from mindspore_impl.weights import canonical_parameters
    from mindspore_impl.wav2vec2 import training_loss
    from taichu.weights import from_mindspore_array

    params = model.trainable_params()
    # MindSpore name -> (canonical name, layer kind): gradients in canonical layout (3-D convs).
    names = {param.name: (name, kind) for name, (param, kind) in canonical_parameters(model).items()}

    def forward(*args):
        return training_loss(model, *args)[0]

    step = compiled(ms.value_and_grad(forward, None, params), graph)

    def run(*args):
        loss, grads = step(*args)
        return float(loss.asnumpy()), {names[p.name][0]: from_mindspore_array(g.asnumpy(), names[p.name][1])
                                       for p, g in zip(params, grads)}

    return run(*inputs) + (run,)


@pytest.mark.parametrize("head, norm, stable", [("pretraining", "group", False), ("pretraining", "layer", True),
                                                ("ctc", "group", True), ("ctc", "layer", False)])
def test_ms_gradients_equal_torch(head, norm, stable, ms_mode):
    """The loss and the gradient of every parameter (graph mode as the trainer runs it, and
    PyNative) against torch: within 1e-4 of each tensor's largest gradient (the CLIP test's
    measure; observed <= 5e-5, the gradients' float32 rounding summed over a batch of
    frames). A tensor whose true
    gradient is zero (k_proj's bias: softmax ignores a constant per query) is compared
    against the largest gradient of its layer's attention instead of its own rounding noise.
    Pretraining: training mode, fixed Gumbel noise; CTC: masked frames, labels with rows
    infeasible both ways (their gradients zero, zero_infinity)."""
    config = ms_config(norm, stable, head)
    torch_model, ms_model = both_models(config)
    torch_model.train()
    ms_model.set_train(True)
    values, mask = audio(6, LONG)
    time_mask, negatives = pretraining_draws(config, LONG, seed=6)
    if head == "pretraining":
        inputs = (values, mask, time_mask, negatives, gumbel(config, time_mask, seed=6))
    else:
        # Row 1: ten equal labels (19 frames needed: infeasible in the group variant's 18);
        # row 2: one label more than its frames.
        frames = frame_count(config.model, np.asarray(LONG))
        labels = np.full((3, frames[2] + 1), -100, np.int32)
        labels[0, :5], labels[1, :10] = [2, 3, 4, 5, 6], 7
        labels[2] = 1 + np.arange(frames[2] + 1) % 5
        inputs = (values, mask, time_mask, labels)
    torch_loss, expected = _torch_loss_and_grads(torch_model, *map(t, inputs))
    ms_loss, got, _ = _ms_loss_and_grads(ms_model, *ms_t(*inputs), graph=ms_mode == "graph")
    assert sorted(got) == sorted(expected) == sorted(n for n, _ in torch_model.named_parameters())
    worst, where = 0.0, None
    for name, g in expected.items():
        scale = np.abs(g).max()
        if name.endswith("k_proj.bias"):
            scale = max(np.abs(expected[name.replace("k_proj.bias", f"{p}.weight")]).max()
                        for p in ("q_proj", "k_proj", "v_proj"))
        diff = float(np.abs(got[name] - g).max() / scale)
        if diff > worst:
            worst, where = diff, name
    print(f"[{head}, {norm}, stable={stable}, {ms_mode}] loss torch {torch_loss}, |torch - mindspore| "
          f"{abs(torch_loss - ms_loss)}; worst gradient difference / max |gradient| {worst} ({where})")
    assert relative(ms_loss, torch_loss) <= TOL
    assert worst <= 1e-4, (worst, where)


# ----------------------------------------------------------------------------- (6d) training state

def test_ms_feature_encoder_freeze_in_one_compiled_graph():
    """One compiled gradient function, called before each update with after_step between:
    no gradient reaches the convs while num_updates < freeze_feature_encoder_steps, they
    get one from then on, everything else learns throughout; the graph reads the counter
    (ops.assign writes it in place) and is compiled once."""
    from mindspore.graph import api as graph_api

    from mindspore_impl.wav2vec2 import after_step

    config = ms_config("layer", True, "ctc", "model.ctc.freeze_feature_encoder_steps=2")
    _, model = both_models(config)
    model.set_train(True)
    values, mask = audio(7, (4000, 3100))
    labels = np.array([[5, 6, 7, 1, 8], [9, 10, -100, -100, -100]], np.int32)
    time_mask, _ = pretraining_draws(config, (4000, 3100), seed=7)
    inputs = ms_t(values, mask, time_mask, labels)
    _, grads, run = _ms_loss_and_grads(model, *inputs)
    compiles = len(graph_api.ms_compile_cache)
    for step in range(4):
        if step:
            _, grads = run(*inputs)
        conv = sum(float(np.abs(g).sum()) for n, g in grads.items() if ".feature_extractor." in n)
        rest = min(float(np.abs(g).sum()) for n, g in grads.items() if ".feature_extractor." not in n)
        print(f"update {step}: conv gradient {conv}, smallest other {rest}")
        assert rest > 0
        assert (conv == 0) == (step < 2), (step, conv)
        after_step(model)
    assert model.num_updates.asnumpy().tolist() == [4]
    assert len(graph_api.ms_compile_cache) == compiles, "the gradient graph was compiled again"


def test_ms_gumbel_temperature_follows_num_updates():
    """After k after_step calls the temperature read from num_updates (PyNative, and a graph
    compiled once before the updates) equals torch's and the float64 schedule
    (QuantizerConfig.temperature): all compute max_t exp(k log decay), torch in float32
    within 2 (|k log decay| + 4) u of the schedule (roundings of the product, exp and the
    scale); MindSpore's float32 CPU Exp is not correctly rounded (2e-6 relative at k = 3,
    where torch's is within 1 ulp), so its own error on that argument is added to the bound."""
    import math

    import mindspore as ms
    from mindspore import ops

    from mindspore_impl.wav2vec2 import after_step as ms_after_step
    from torch_impl.wav2vec2 import after_step

    config = load_config(TINY, ["model.quantizer.gumbel_temperature_decay=0.9"])
    torch_model, ms_model = both_models(config)
    q = config.model.quantizer

    def temperature():
        return ms_model.gumbel_temperature()

    compiled_temperature = ms.jit(temperature)
    compiled_temperature()
    for k in range(16):     # 2 x 0.9^k reaches the minimum 0.5 at k = 14
        expected, reference = float(torch_model.gumbel_temperature()), q.temperature(k)
        argument = np.float32(k) * np.float32(math.log(0.9))
        exp_error = abs(float(ops.exp(ms.Tensor(argument)).asnumpy()) / math.exp(float(argument)) - 1)
        bound = 2 * (abs(float(argument)) + 4) * U32 * reference
        got = [float(ms_model.gumbel_temperature().asnumpy()), float(compiled_temperature().asnumpy())]
        print(f"k {k}: torch {expected}, mindspore {got}, schedule {reference}, MindSpore Exp error {exp_error:.1e}")
        assert abs(expected - reference) <= bound
        assert all(abs(g - reference) <= bound + exp_error * reference for g in got), (k, got, reference)
        after_step(torch_model)
        ms_after_step(ms_model)
    assert ms_model.num_updates.asnumpy().tolist() == torch_model.num_updates.tolist() == [16]


def test_ms_trainer_eval_loss_runs_the_evaluation_branch():
    """Both trainers on the same weights and batch (MindSpore's step compiled, graph mode):
    two updates give torch's training losses, and eval_loss after each, run by the
    trainer's own compiled eval function after set_train(False), is torch's evaluation loss
    (argmax quantizer), not the training-mode loss of the same weights.

    Why this needs checking: a mindspore.jit function compiled while the cells are in
    training mode keeps that graph after set_train(False) (MindSpore 2.10 keys a function's
    graph on its arguments, not on the cells' training flag; a Cell's own call does key on
    it). The trainer's eval graph is a jit of its own, only ever called in evaluation, so it
    holds the evaluation branch."""
    import mindspore_impl.train as ms_train
    import torch_impl.train as torch_train
    from taichu.train import decay_names
    from torch_impl.wav2vec2 import training_loss

    config = ms_config("layer", True, "pretraining", "model.quantizer.diversity_loss_weight=0.5")
    assert config.train.graph_mode
    torch_model, ms_model = both_models(config)
    lengths = (4000, 3100, 2600)
    values, mask = audio(0, lengths)
    time_mask, negatives = pretraining_draws(config, lengths, seed=0)
    batch = {"input_values": values, "attention_mask": mask, "mask_time_indices": time_mask,
             "sampled_negative_indices": negatives, "gumbel_noise": gumbel(config, time_mask, seed=1)}
    torch_trainer = torch_train.Trainer(torch_model, config, decay_names(config), 0, 1)
    ms_trainer = ms_train.Trainer(ms_model, config, decay_names(config), 0, 1)

    def torch_loss(training: bool) -> float:
        torch_model.train(training)
        with torch.no_grad():
            loss = float(training_loss(torch_model, *map(t, batch.values()))[0])
        torch_model.train(True)
        return loss

    for step in range(2):
        expected, got = torch_trainer.train_step([batch], 1e-3), ms_trainer.train_step([batch], 1e-3)
        train_mode, eval_mode = torch_loss(True), torch_loss(False)
        torch_eval, ms_eval = torch_trainer.eval_loss(batch), ms_trainer.eval_loss(batch)
        print(f"step {step}: train losses torch {expected[0]}, mindspore {got[0]}; next train-mode loss "
              f"{train_mode}, eval-mode {eval_mode}; eval_loss torch {torch_eval}, mindspore {ms_eval}")
        assert relative(got[0], expected[0]) <= TOL
        assert relative(torch_eval, eval_mode) <= TOL and relative(ms_eval, eval_mode) <= TOL
        assert abs(train_mode - eval_mode) > 1e-3     # the branches differ on this batch
