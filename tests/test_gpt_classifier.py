"""The gpt_classifier family (taichu/families/gpt_classifier.py): the GPT's decoder and a
sequence-classification head pooled at each row's last real token, as Hugging Face's
GPT2ForSequenceClassification (the Hugging Face comparison itself is tests/test_convert_classifier.py).

Both backends on the same (perturbed) weights: logits with right, left and no padding
(MindSpore PyNative and graph mode), padding invisible, the pooled position the last real
token; the head against a float64 numpy reading of its docstring; graph-mode gradients of
training_loss. Training through taichu.train: 20 steps MindSpore graph = PyTorch with gradient
accumulation and train.freeze_layers (frozen tensors bitwise unchanged), validation accuracy;
--init from a GPT (head fresh) and its refusal at other sizes; resume. The data: refusals
(jsonl labels and texts, config), encode_texts' truncation, the held-out split of the reviews."""
import json

import numpy as np
import pytest
import torch

import taichu
from taichu.api import load_state_dict, state_dict
from taichu.classify import ClassificationBatches, encode_texts, load_labelled
from taichu.config import ConfigError
from taichu.tokenizer import Tokenizer
from taichu.train import read_metrics, run_training
from taichu.weights import CheckpointError
from conftest import CONFIGS, logged_losses, perturbed_state
from test_gpt import run_ms, run_torch
from tolerance import encoder_chain_terms, float32_tolerance, scaled_differences

TINY = CONFIGS / "gpt_classifier" / "gpt-tiny-reviews.yaml"
GPT_TINY = CONFIGS / "gpt" / "gpt-tiny.yaml"
TOL = 1e-5     # the design's parity bound (fp32), relative to the outputs' scale
PAD = 0        # the tokenizers' pad id (taichu.tokenizer); random ids below are drawn from 4 up
WIDTH = 12     # the parity batch's length


# ----------------------------------------------------------------------------- tolerances

def logit_tolerance(m, length: int = WIDTH) -> float:
    """The design's 1e-5 where the float32 bound is smaller, the bound where it is larger:
    tests/tolerance.py's encoder chain from the embedding to a logit at attention length
    ``length`` (its final LayerNorm is ln_f, its projection ``score``), relative to the
    logits' scale. At gpt-tiny-reviews and 12 positions it is larger, 1.7e-4 (2 layers of
    hidden 64); seen between the backends: 1.5e-6. A leaked padding token or a wrong pooled
    position moves the perturbed model's logits by 1e-1 or more."""
    return max(TOL, float32_tolerance(1.0, encoder_chain_terms(m, length)))


def grad_tolerance(m, length: int = WIDTH) -> float:
    """Gradients relative to their scale: the forward chain and the log-sum-exp over the
    labels walked twice (forward, then backward), as tests/test_gpt_xl.py."""
    return float32_tolerance(1.0, 2 * (encoder_chain_terms(m, length) + m.num_labels))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def config():
    return taichu.load_config(TINY)


@pytest.fixture(scope="module")
def pair(config):
    """(torch model, MindSpore model, arrays): one random init moved by noise (a fresh head of
    std 0.02 gives logits near 0, where any pooling gives nearly the same answer), in both."""
    torch.manual_seed(0)
    torch_model = taichu.build_model(config, "torch").eval()
    arrays = perturbed_state(torch_model)
    load_state_dict(torch_model, arrays)
    ms_model = taichu.build_model(config, "mindspore")
    load_state_dict(ms_model, arrays)
    ms_model.set_train(False)
    return torch_model, ms_model, arrays


def mixed_batch(seed=0, vocab=4096):
    """[4, WIDTH] ids and mask: right padding, left padding, no padding, a single real token
    (right-padded); real ids from 4 up, padding PAD."""
    rng = np.random.default_rng(seed)
    spans = [slice(0, 7), slice(WIDTH - 5, WIDTH), slice(0, WIDTH), slice(0, 1)]
    ids = np.full((len(spans), WIDTH), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, span in enumerate(spans):
        ids[row, span] = rng.integers(4, vocab, span.stop - span.start)
        mask[row, span] = 1
    return ids, mask


def last_real(mask):
    """Each row's last position whose mask is 1 (the docstring's pooled position)."""
    return np.array([np.flatnonzero(row).max() for row in mask])


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return Tokenizer(tiny_tokenizer)


@pytest.fixture(scope="module")
def classifier_init(tmp_path_factory, tiny_tokenizer, config):
    """A gpt_classifier model directory (PyTorch init, the session's tokenizer): the same
    starting weights, head included, for both backends."""
    torch.manual_seed(0)
    return taichu.save_model(taichu.build_model(config, "torch"), tmp_path_factory.mktemp("classifier") / "init",
                             tokenizer=tiny_tokenizer)


def short_run(tmp_path, *extra):
    """Overrides for a run of seconds: 512 training reviews (the held-out split unchanged),
    batches of 8 padded to 32 tokens (one shape: one graph each in MindSpore)."""
    return [f"data.cache_dir={tmp_path / 'cache'}", "data.train_examples=512", "data.seq_len=32",
            "data.pad_to_multiple_of=32", "train.batch_size=8", "train.warmup_steps=3",
            "train.learning_rate=2e-3", "train.min_learning_rate=1e-4", "train.log_interval=1",
            "train.eval_interval=10", "train.eval_batches=2", *extra]


# ----------------------------------------------------------------------------- the model

def test_same_weights_same_logits_and_pooling_at_the_last_real_token(config, pair, ms_mode):
    """Same weights: torch = MindSpore (PyNative and graph mode) on rows with right, left and
    no padding; each padded row's logits are its unpadded sequence's; padding ids change
    nothing, the last real token does (it is the pooled one)."""
    torch_model, ms_model, _ = pair
    m = config.model
    ids, mask = mixed_batch()
    expected = run_torch(torch_model, ids, mask)
    got = run_ms(ms_model, ids, mask)
    assert got.shape == (4, m.num_labels) and got.dtype == np.float32
    assert max(scaled_differences([got], [expected])) <= logit_tolerance(m)
    # Perturbed weights: logits of order 1 that differ between rows (what the checks below need).
    assert np.abs(expected).max() > 0.5 and np.abs(expected[0] - expected[1]).max() > 0.1
    # Each row alone, unpadded (no mask: every token real), gives its padded logits. (Graph
    # mode compiles a graph per shape: there, the unpadded row alone.)
    for row in range(len(ids)):
        alone = ids[row:row + 1, mask[row].astype(bool)]
        for run, model in ((run_torch, torch_model), (run_ms, ms_model)):
            if run is run_ms and ms_mode == "graph" and row != 2:
                continue
            assert max(scaled_differences([run(model, alone)[0]], [expected[row]])) <= logit_tolerance(m), row
    # Other ids at the padded positions: nothing moves (masked attention weighs them exactly 0).
    repadded = np.where(mask == 1, ids, np.random.default_rng(1).integers(4, m.vocab_size, ids.shape))
    assert not np.array_equal(repadded, ids)
    np.testing.assert_array_equal(run_torch(torch_model, repadded, mask), expected)
    np.testing.assert_array_equal(run_ms(ms_model, repadded, mask), got)
    # Another last real token: every row's logits move (it is what the head reads).
    last = last_real(mask)
    changed = ids.copy()
    rows = np.arange(len(ids))
    changed[rows, last] = 4 + (ids[rows, last] - 4 + 1000) % (m.vocab_size - 4)
    for run, model, base in ((run_torch, torch_model, expected), (run_ms, ms_model, got)):
        moved = np.abs(run(model, changed, mask) - base).max(axis=-1)
        assert (moved > 1e-2).all(), moved
    # The pooled position is the last real one, not the last position: a right-padded row's
    # logits differ from those read at its final (padding) position.
    at_end = run_torch(torch_model, ids, np.ones_like(mask))
    assert np.abs(at_end[0] - expected[0]).max() > 1e-2


def test_different_weights_give_different_logits(config, pair):
    """Guards the parity test: an independently initialised MindSpore model disagrees."""
    torch_model, _, _ = pair
    other = taichu.build_model(config, "mindspore")
    other.set_train(False)
    ids, mask = mixed_batch()
    assert np.abs(run_torch(torch_model, ids, mask) - run_ms(other, ids, mask)).max() > 1e-2


def test_head_against_float64_numpy(config, pair):
    """logits = ln_f(hidden at the last real token) @ score.weight.T, in float64 from the
    torch decoder's float32 output (GPT.decode, before ln_f)."""
    torch_model, _, arrays = pair
    m = config.model
    ids, mask = mixed_batch(seed=2)
    with torch.no_grad():
        hidden = torch_model.decode(torch.from_numpy(ids), torch.from_numpy(mask))[0].numpy().astype(np.float64)
    pooled = hidden[np.arange(len(ids)), last_real(mask)]
    mean = pooled.mean(-1, keepdims=True)
    var = ((pooled - mean) ** 2).mean(-1, keepdims=True)
    normed = (pooled - mean) / np.sqrt(var + m.layer_norm_eps) * arrays["ln_f.weight"] + arrays["ln_f.bias"]
    weight = arrays["score.weight"].astype(np.float64)
    expected = normed @ weight.T
    got = run_torch(torch_model, ids, mask)
    # The head's own float32 rounding: LayerNorm's mean and variance (hidden terms each), its
    # normalisation (a few roundings), then the dot product (hidden terms), over the summed
    # magnitudes of the last sum.
    scale = (np.abs(normed) @ np.abs(weight).T).max()
    bound = float32_tolerance(scale, 3 * m.hidden_size + 4)
    assert np.abs(got - expected).max() <= bound, (np.abs(got - expected).max(), bound)
    # Read at the last position instead (row 0 is right-padded), the head gives other logits.
    wrong = hidden[:, -1]
    wrong = ((wrong - wrong.mean(-1, keepdims=True)) / np.sqrt(wrong.var(-1, keepdims=True) + m.layer_norm_eps)
             * arrays["ln_f.weight"] + arrays["ln_f.bias"]) @ weight.T
    assert np.abs(wrong[0] - got[0]).max() > 100 * bound


def test_graph_mode_gradients_of_training_loss_equal_torch(config, pair):
    """MindSpore's jit(value_and_grad(training_loss, has_aux)) (the trainer's path) gives torch's
    loss, logits and the gradient of every parameter; no gradient reaches the padding id."""
    import mindspore as ms
    from mindspore_impl import gpt_classifier as mc
    from mindspore_impl.weights import canonical_parameters
    from torch_impl import gpt_classifier as tc

    torch_model, ms_model, _ = pair
    m = config.model
    ids, mask = mixed_batch(seed=3)
    labels = np.array([0, 1, 1, 0])
    torch_model.zero_grad()
    loss, logits = tc.training_loss(torch_model, torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels))
    loss.backward()
    grads_torch = {n: p.grad.numpy().copy() for n, p in torch_model.named_parameters()}
    torch_model.zero_grad()

    params = ms_model.trainable_params()
    names = {p.name: n for n, (p, _) in canonical_parameters(ms_model).items()}

    def step(*batch):
        return mc.training_loss(ms_model, *batch)
    grad_fn = ms.jit(ms.value_and_grad(step, None, params, has_aux=True))
    (ms_loss, ms_logits), grads = grad_fn(*(ms.Tensor(x.astype(np.int32)) for x in (ids, mask, labels)))
    assert max(scaled_differences([ms_logits.asnumpy()], [logits.detach().numpy()])) <= logit_tolerance(m)
    # The loss moves by at most twice the logits' difference (log-softmax is 1-Lipschitz per logit).
    loss = float(loss.detach())
    assert abs(float(ms_loss.asnumpy()) - loss) <= 2 * logit_tolerance(m) * max(1.0, np.abs(logits.detach().numpy()).max())
    assert len(grads) == len(grads_torch) == len(taichu.families.get_family("gpt_classifier").tensor_specs(config))
    bound = grad_tolerance(m)
    for param, grad in zip(params, grads):
        name = names[param.name]
        ref, got = grads_torch[name], grad.asnumpy()
        assert got.shape == ref.shape, name
        assert np.abs(got - ref).max() <= bound * max(1.0, np.abs(ref).max()), (name, np.abs(got - ref).max())
        assert np.abs(ref).max() > 0, name   # every tensor is trained, score and embeddings included
    # The padding id is never read by anything that reaches the loss: its embedding row gets
    # exactly no gradient (a leaked padding position would give it one).
    ms_embed = dict(zip((names[p.name] for p in params), grads))["embed_tokens.weight"].asnumpy()
    assert not grads_torch["embed_tokens.weight"][PAD].any() and not ms_embed[PAD].any()


# ----------------------------------------------------------------------------- training

@pytest.mark.slow
def test_20_steps_agree_across_backends_with_accumulation_and_frozen_layers(tmp_path, classifier_init):
    """Same initial weights (head included), batches and hyperparameters, fp32, 2 micro-batches
    a step, the embeddings and block 0 frozen: MindSpore graph mode = PyTorch, loss for loss
    and in the validation (loss, accuracy); the frozen tensors bitwise as loaded."""
    overrides = short_run(tmp_path, "train.max_steps=20", "train.grad_accum_steps=2", "train.freeze_layers=1")
    runs, finals = {}, {}
    for backend in ("torch", "mindspore"):
        config = taichu.load_config(TINY, overrides)
        run_training(config, backend, tmp_path / backend, init_dir=classifier_init, progress=False)
        runs[backend] = read_metrics(tmp_path / backend)
        finals[backend] = state_dict(taichu.load_model(tmp_path / backend / "final", backend="torch"))
    steps = {b: logged_losses(tmp_path / b) for b in runs}
    assert sorted(steps["torch"]) == sorted(steps["mindspore"]) == list(range(1, 21))
    torch_losses = np.array([steps["torch"][s] for s in range(1, 21)])
    ms_losses = np.array([steps["mindspore"][s] for s in range(1, 21)])
    relative = np.abs(torch_losses - ms_losses) / np.abs(torch_losses)
    assert relative.max() <= 1e-4, f"worst relative difference {relative.max():.2e} at step {relative.argmax() + 1}"
    # Validation at steps 0, 10 and 20: the loss and the accuracy (a fraction of the rows) agree.
    evals = {b: [r for r in records if "val_loss" in r] for b, records in runs.items()}
    assert [r["step"] for r in evals["torch"]] == [r["step"] for r in evals["mindspore"]] == [0, 10, 20]
    for a, b in zip(evals["torch"], evals["mindspore"]):
        assert 0.0 <= a["val_accuracy"] <= 1.0 and abs(a["val_accuracy"] - b["val_accuracy"]) <= 1e-6, (a, b)
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-4 * a["val_loss"], (a, b)
    # The accuracy is the models' own on the first eval_batches * batch_size held-out texts:
    # at step 0 the init's, at step 20 the final model's, each text run alone (no padding).
    config = taichu.load_config(TINY, overrides)
    held_out = load_labelled(config.data, config.model.labels)
    rows, _ = encode_texts(Tokenizer(classifier_init / "tokenizer.model"), held_out.test_texts[:16], config.data.seq_len)
    for record, model_dir in ((evals["torch"][0], classifier_init), (evals["torch"][-1], tmp_path / "torch" / "final")):
        model = taichu.load_model(model_dir, backend="torch").eval()
        predicted = [run_torch(model, np.array([row]))[0].argmax() for row in rows]
        assert record["val_accuracy"] == np.mean(np.array(predicted) == held_out.test_labels[:16]), record
    # Frozen: the embeddings and block 0, bitwise; everything else moved, in both backends.
    start = state_dict(taichu.load_model(classifier_init, backend="torch"))
    frozen = {n for n in start if n.startswith(("embed_tokens.", "embed_positions.", "layers.0."))}
    assert len(frozen) == 2 + 16
    for backend, final in finals.items():
        assert sorted(final) == sorted(start)
        unchanged = {n for n in start if np.array_equal(final[n], start[n])}
        assert unchanged == frozen, (backend, sorted(unchanged ^ frozen))
    # The backends end at the same weights (as tests/test_train.py; seen: 4e-5 apart).
    assert max(np.abs(finals["torch"][k] - finals["mindspore"][k]).max() for k in start) < 1e-3


def test_init_from_a_gpt_loads_the_decoder_and_starts_the_head_fresh(tmp_path, tiny_tokenizer, capsys):
    """--init a GPT directory of the same sizes: the decoder tensors are the GPT's, score.weight
    is the seeded fresh init (std model.initializer_range), and the log says so; a GPT of other
    sizes is refused naming the tensors that differ."""
    torch.manual_seed(5)
    gpt = taichu.save_model(taichu.build_model(taichu.load_config(GPT_TINY), "torch"), tmp_path / "gpt",
                            tokenizer=tiny_tokenizer)
    # Every block frozen and one small step: the decoder must come out exactly as loaded.
    config = taichu.load_config(TINY, short_run(tmp_path, "train.max_steps=1", "train.warmup_steps=0",
                                                "train.learning_rate=1e-5", "train.min_learning_rate=0",
                                                "train.freeze_layers=2"))
    run_training(config, "torch", tmp_path / "run", init_dir=gpt, progress=False)
    log = capsys.readouterr().out
    start, final = state_dict(taichu.load_model(gpt, backend="torch")), state_dict(
        taichu.load_model(tmp_path / "run" / "final", backend="torch"))
    assert (f"--init {gpt}: {len(start)} tensors loaded; initialised fresh: score.weight; "
            "not used from the init: none") in log
    assert set(final) == set(start) | {"score.weight"}
    for name in start:
        if name.startswith("ln_f."):     # trained: one step of at most lr (AdamW's first step)
            assert 0 < np.abs(final[name] - start[name]).max() <= 1.1e-5, name
        else:
            np.testing.assert_array_equal(final[name], start[name], err_msg=name)
    # The head: the seeded init of the run (train.seed), one step away.
    torch.manual_seed(config.train.seed)
    fresh = state_dict(taichu.build_model(config, "torch"))["score.weight"]
    assert np.abs(final["score.weight"] - fresh).max() <= 1.1e-5
    assert 0.015 < fresh.std() < 0.025

    # Other sizes: refused, naming the tensors whose shapes differ (or are extra).
    for override, message in (("model.hidden_size=32", "mis-shaped:  embed_tokens.weight has (4096, 32), config "
                                                        "expects (4096, 64)"),
                               ("model.num_layers=3", "unexpected:  layers.2.attn.q_proj.weight (64, 64)")):
        other = taichu.save_model(taichu.build_model(taichu.load_config(GPT_TINY, [override]), "torch"),
                                  tmp_path / override, tokenizer=tiny_tokenizer)
        capsys.readouterr()
        with pytest.raises(CheckpointError) as err:
            run_training(config, "torch", tmp_path / f"run-{override}", init_dir=other, progress=False)
        assert message in str(err.value)
        assert "tensors loaded" not in capsys.readouterr().out      # nothing claims it was loaded


def test_interrupted_and_resumed_run_ends_at_the_uninterrupted_weights(tmp_path, classifier_init, monkeypatch,
                                                                      capsys):
    """PyTorch with dropout (its RNG is checkpointed), accumulation and a frozen block: a run that
    dies after step 5 and is resumed from its step-4 checkpoint logs the same losses and ends
    bitwise at the weights of the run that was never interrupted."""
    from torch_impl.train import Trainer

    overrides = short_run(tmp_path, "train.max_steps=8", "train.checkpoint_interval=2", "train.keep_checkpoints=2",
                          "train.grad_accum_steps=2", "train.freeze_layers=1", "model.dropout=0.1",
                          "model.attention_dropout=0.1")
    config = taichu.load_config(TINY, overrides)
    run_training(config, "torch", tmp_path / "full", init_dir=classifier_init, progress=False)

    real_step, calls = Trainer.train_step, []

    def dying_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt("killed")
        return real_step(self, *args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", dying_step)
        with pytest.raises(KeyboardInterrupt):
            run_training(config, "torch", tmp_path / "cut", init_dir=classifier_init, progress=False)
    assert max(logged_losses(tmp_path / "cut")) == 5
    capsys.readouterr()
    run_training(config, "torch", tmp_path / "cut", init_dir=classifier_init, resume=True, progress=False)
    assert f"resuming from {tmp_path / 'cut' / 'checkpoints' / 'step-00000004'} at step 4" in capsys.readouterr().out
    resumed, reference = logged_losses(tmp_path / "cut"), logged_losses(tmp_path / "full")
    assert sorted(resumed) == list(range(1, 9))
    assert all(resumed[s] == reference[s] for s in range(1, 9)), (resumed, reference)
    final_a = state_dict(taichu.load_model(tmp_path / "cut" / "final", backend="torch"))
    final_b = state_dict(taichu.load_model(tmp_path / "full" / "final", backend="torch"))
    assert all(np.array_equal(final_a[k], final_b[k]) for k in final_a)


# ----------------------------------------------------------------------------- data

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_refusals_name_the_problem(tmp_path, config):
    data = config.data
    labels = config.model.labels
    good = [{"text": "很好", "label": "positive"}, {"text": "太差了", "label": 0}]
    bad_label = write_jsonl(tmp_path / "bad-label.jsonl", good + [{"text": "一般", "label": "neutral"}])
    with pytest.raises(ValueError, match=rf"{bad_label}:3: label 'neutral' is not one of model.labels "
                                         r"\['negative', 'positive'\] \(a name or an index 0..1\)"):
        load_labelled(data.model_copy(update={"source": str(bad_label)}), labels)
    for label in (2, -1, True, "1"):
        path = write_jsonl(tmp_path / "index.jsonl", good + [{"text": "一般", "label": label}])
        with pytest.raises(ValueError, match=rf"index.jsonl:3: label {label!r} is not one of model.labels"):
            load_labelled(data.model_copy(update={"source": str(path)}), labels)
    # Labels that are numbers: an int that is one label's name and another's index is refused.
    stars = ("1", "2", "3")
    ambiguous = write_jsonl(tmp_path / "stars.jsonl", [{"text": "好", "label": "3"}, {"text": "差", "label": 1}])
    with pytest.raises(ValueError, match=rf"stars.jsonl:2: label 1 is ambiguous: model.labels \['1', '2', '3'\] "
                                         "has a label '1', and as an index 1 names '2'"):
        load_labelled(data.model_copy(update={"source": str(ambiguous)}), stars)
    named = write_jsonl(tmp_path / "named.jsonl", [{"text": f"评论{i}", "label": ["3", "1", 0][i % 3]}
                                                   for i in range(60)])
    texts = load_labelled(data.model_copy(update={"source": str(named), "validation_fraction": 0.5}), stars)
    assert sorted(set(texts.train_labels) | set(texts.test_labels)) == [0, 2]
    empty = write_jsonl(tmp_path / "empty.jsonl", [good[0], {"text": "   ", "label": "negative"}, good[1]])
    with pytest.raises(ValueError, match=rf"{empty}:2: the text is empty"):
        load_labelled(data.model_copy(update={"source": str(empty)}), labels)

    with pytest.raises(ConfigError, match=r"model.labels must be distinct and non-empty, got \['a', 'b', 'a'\]"):
        taichu.load_config(TINY, ["model.labels=[a, b, a]"])
    with pytest.raises(ConfigError, match="train.freeze_layers 3 exceeds model.num_layers 2"):
        taichu.load_config(TINY, ["train.freeze_layers=3"])
    taichu.load_config(TINY, ["train.freeze_layers=2"])       # all of them: allowed
    with pytest.raises(ConfigError, match="data.seq_len 129 exceeds model.max_position_embeddings 128"):
        taichu.load_config(TINY, ["data.seq_len=129"])
    with pytest.raises(ValueError, match=r"data.source 'reviews' has the labels \['negative', 'positive'\]; "
                                         r"model.labels \['negative', 'neutral'\] lacks \['positive'\]"):
        load_labelled(data, ("negative", "neutral"))


def test_encode_texts_keeps_bos_and_eos_and_cuts_on_the_configured_side(tokenizer):
    text = "这个手机很好用，电池也耐用"
    ids = tokenizer.encode(text)
    assert len(ids) > 4
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    rows, cut = encode_texts(tokenizer, [text, "差"], len(ids) + 2)
    assert rows == [[bos] + ids + [eos], [bos] + tokenizer.encode("差") + [eos]] and cut == 0
    rows, cut = encode_texts(tokenizer, [f"  {text} ", "差"], 5)
    assert rows[0] == [bos] + ids[:3] + [eos] and cut == 1               # right: the beginning kept
    rows, cut = encode_texts(tokenizer, [text, "差"], 5, truncation="left")
    assert rows[0] == [bos] + ids[-3:] + [eos] and cut == 1              # left: the end kept
    assert rows[1] == [bos] + tokenizer.encode("差") + [eos]
    with pytest.raises(ValueError, match="text 2 is empty: there is nothing to classify"):
        encode_texts(tokenizer, ["好", " \n"], 16)
    with pytest.raises(ValueError, match="seq_len 2 leaves no room"):
        encode_texts(tokenizer, ["好"], 2)


def test_batches_pad_to_the_multiple_and_never_past_seq_len(tokenizer, config):
    data = config.data.model_copy(update={"seq_len": 24, "pad_to_multiple_of": 16})
    texts = ["好", "这个手机很好用，电池也耐用，屏幕清楚，价格便宜，客服态度好，发货很快，推荐购买"]
    batches = ClassificationBatches(texts, np.array([1, 0]), tokenizer, data)
    assert batches.truncated == 1 and list(batches.lengths) == [len(tokenizer.encode("好")) + 2, 24]
    short = batches.batch([0])
    assert short["input_ids"].shape == (1, 16) and short["attention_mask"].sum() == batches.lengths[0]
    both = batches.batch([1, 0])
    assert both["input_ids"].shape == (2, 24)                          # 32 cut back to seq_len
    assert both["labels"].tolist() == [0, 1] and both["attention_mask"][1].sum() == batches.lengths[0]
    assert (both["input_ids"][1, batches.lengths[0]:] == tokenizer.pad_id).all()


def test_review_split_is_disjoint_deterministic_balanced_and_subsettable(tmp_path, config):
    data = config.data
    labels = config.model.labels
    full = load_labelled(data, labels)
    again = load_labelled(data, labels)
    assert full.train_texts == again.train_texts and full.test_texts == again.test_texts
    assert np.array_equal(full.train_labels, again.train_labels) and full.fingerprint == again.fingerprint
    train = set(full.train_texts)
    assert len(train) == len(full.train_texts)                          # deduplicated
    assert not train & set(full.test_texts)                              # nothing held out is trained on
    total = len(full.train_texts) + len(full.test_texts)
    assert total > 15000 and abs(len(full.test_texts) / total - data.validation_fraction) < 0.01
    for y in (full.train_labels, full.test_labels):
        assert 0.4 < y.mean() < 0.6                                      # positive share: balanced-ish
    # The first validation batches mix the labels (the held-out texts are shuffled, seeded).
    assert 0.25 < full.test_labels[:128].mean() < 0.75
    # Another split seed: another split.
    other = load_labelled(data.model_copy(update={"split_seed": 1}), labels)
    assert set(other.test_texts) != set(full.test_texts)

    # A .jsonl that repeats a text: every copy falls on the same side (the split is per text).
    path = write_jsonl(tmp_path / "repeats.jsonl", [{"text": f"评论{i % 40}", "label": i % 2} for i in range(400)])
    repeats = load_labelled(data.model_copy(update={"source": str(path), "validation_fraction": 0.3}), labels)
    assert not set(repeats.train_texts) & set(repeats.test_texts) and len(repeats.test_texts) % 10 == 0

    subset = load_labelled(data.model_copy(update={"train_examples": 300}), labels)
    assert len(subset.train_texts) == 300 and set(subset.train_texts) <= train
    assert subset.test_texts == full.test_texts
    index = {t: i for i, t in enumerate(full.train_texts)}
    assert [full.train_labels[index[t]] for t in subset.train_texts] == subset.train_labels.tolist()
    assert load_labelled(data.model_copy(update={"train_examples": 300}), labels).train_texts == subset.train_texts
    assert subset.fingerprint != full.fingerprint
    with pytest.raises(ValueError, match=rf"data.train_examples {len(train) + 1} exceeds the {len(train)} "
                                         "training texts of reviews"):
        load_labelled(data.model_copy(update={"train_examples": len(train) + 1}), labels)
