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
(5) conversion. MindSpore parity is to come as its own section.
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
    s, m = states[0], config.model
    conv = "wav2vec2.encoder.pos_conv_embed.conv."
    # Weight norm starts at g = ||v||: the effective weight is v ~ N(0, sqrt(4 / (K H))).
    np.testing.assert_allclose(s[conv + "weight_g"], np.sqrt((s[conv + "weight_v"] ** 2).sum(axis=(0, 1),
                                                                                         keepdims=True)), rtol=1e-6)
    assert abs(s[conv + "weight_v"].std() / np.sqrt(4 / (m.num_conv_pos_embeddings * m.hidden_size)) - 1) < 0.1
    assert np.all(s[conv + "bias"] == 0) and s["num_updates"].tolist() == [0]
    assert abs(s["wav2vec2.encoder.layers.0.attention.q_proj.weight"].std() / m.initializer_range - 1) < 0.2
    assert abs(s["quantizer.weight_proj.weight"].std() - 1) < 0.2
    assert 0 <= s["quantizer.codevectors"].min() and s["quantizer.codevectors"].max() <= 1


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
