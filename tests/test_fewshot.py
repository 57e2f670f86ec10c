"""taichu.fewshot: few-shot prompting of a GPT (K labelled demonstrations + a query, label
words scored by their log-likelihood after the prompt), in both backends and through the CLI.

The scores are checked against a recomputation that shares nothing with the scorer: one
plain forward pass of [bos] + prompt + word per (prompt, word), no batch, no padding.
"""
import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import taichu
from conftest import CONFIGS, perturbed_state
from taichu import fewshot
from taichu.api import load_state_dict
from taichu.classify import load_labelled
from taichu.cli import main
from taichu.config import load_config
from taichu.corpus import load_corpus
from taichu.families.gpt_classifier import ClassificationDataConfig
from taichu.tokenizer import train_tokenizer
from tolerance import encoder_chain_terms, float32_tolerance

WORDS = ["差", "好"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """gpt-tiny (context 128; random weights moved by noise, so that what a token sees moves
    its log-probability), a tokenizer trained on 3,000 People's Daily lines (quick: the
    scores need no good one), the reviews split as the classifier splits them."""
    root = tmp_path_factory.mktemp("fewshot")
    config = load_config(CONFIGS / "gpt" / "gpt-tiny.yaml", [f"data.cache_dir={root / 'cache'}"])
    path = root / "tokenizer.model"
    tokenizer = train_tokenizer(load_corpus(config.data).train,
                                config.tokenizer.model_copy(update={"max_training_sentences": 3000}),
                                config.model.vocab_size, path)
    torch.manual_seed(0)
    model = taichu.build_model(config, "torch")
    load_state_dict(model, perturbed_state(model, seed=0))
    model_dir = taichu.save_model(model, root / "gpt", tokenizer=path)
    data = load_labelled(ClassificationDataConfig(), fewshot.DEFAULT_LABELS)
    return SimpleNamespace(root=root, config=config, tokenizer=tokenizer, model_dir=model_dir,
                           model=taichu.load_model(model_dir, "torch"), data=data)


def reference_scores(model, prompts, word_ids):
    """[prompts, words]: for each, one forward pass of [bos] + prompt + word alone, its
    log-softmax in float64 summed over the word's tokens; and the largest |logit| seen."""
    out, scale = np.zeros((len(prompts), len(word_ids))), 0.0
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            for w, word in enumerate(word_ids):
                logits = model(torch.tensor([list(prompt) + list(word)]))[0].double().numpy()
                scale = max(scale, float(np.abs(logits).max()))
                top = logits.max(-1, keepdims=True)
                log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
                out[p, w] = sum(log_probs[len(prompt) - 1 + j, t] for j, t in enumerate(word))
    return out, scale


# --------------------------------------------------------------------------- prompts

def test_a_two_shot_prompt_is_exactly_the_template(setup):
    tok = setup.tokenizer
    builder = fewshot.PromptBuilder(tok, WORDS, 128)
    prompt = builder.build("质量一般", [("很好用", 1), ("太慢了", 0)])
    assert prompt.text == "评论：很好用\n评价：好\n评论：太慢了\n评价：差\n评论：质量一般\n评价："
    enc = tok.encode
    assert prompt.ids == ([tok.bos_id] + enc("评论：") + enc("很好用") + enc("\n评价：") + enc("好") + enc("\n")
                          + enc("评论：") + enc("太慢了") + enc("\n评价：") + enc("差") + enc("\n")
                          + enc("评论：") + enc("质量一般") + enc("\n评价："))
    assert tok.decode(prompt.ids) == prompt.text
    assert prompt.kept_chars == prompt.full_chars == [3, 3] and not prompt.query_cut
    assert prompt.kept_tokens == [len(enc("很好用")), len(enc("太慢了"))]
    zero = builder.build("质量一般", [])
    assert zero.text == "评论：质量一般\n评价："
    assert zero.ids == [tok.bos_id] + enc("评论：") + enc("质量一般") + enc("\n评价：")


def test_demonstrations_are_balanced_training_texts_never_the_query(setup):
    data = setup.data
    sampler = fewshot.DemonstrationSampler(data.train_labels, 2)
    for k, want in [(2, [1, 1]), (4, [2, 2]), (8, [4, 4])]:
        for seed in range(5):
            picked = sampler.draw(k, np.random.default_rng(seed))
            assert len(set(picked.tolist())) == k
            assert np.bincount(data.train_labels[picked], minlength=2).tolist() == want
    odd = [sorted(np.bincount(data.train_labels[sampler.draw(3, np.random.default_rng(s))], minlength=2))
           for s in range(10)]
    assert all(c == [1, 2] for c in odd)
    ones = {int(data.train_labels[sampler.draw(1, np.random.default_rng(s))][0]) for s in range(20)}
    assert ones == {0, 1}                                   # K = 1: a random label
    # A label short of texts leaves its share to the others; more than there are is refused.
    short = fewshot.DemonstrationSampler(np.array([0, 0, 0, 1]), 2)
    assert sorted(np.bincount(np.array([0, 0, 0, 1])[short.draw(4, np.random.default_rng(0))]).tolist()) == [1, 3]
    with pytest.raises(ValueError, match="only 4 texts"):
        short.draw(5, np.random.default_rng(0))
    # What evaluate drew: training texts only, never the query, the same queries for every K.
    result = fewshot.evaluate(setup.model, setup.tokenizer, data, WORDS, shots=[0, 1, 4], queries=6, seed=3,
                              batch_size=4)
    train = set(data.train_texts)
    assert not train & set(data.test_texts)
    for k in (1, 4):
        drawn = result.demonstrations[k]
        assert drawn.shape == (6, k)
        for query, picked in zip(result.query_indices, drawn):
            texts = [data.train_texts[j] for j in picked]
            assert set(texts) <= train and data.test_texts[query] not in texts
    assert result.demonstrations[0].shape == (6, 0)


def test_cutting_keeps_every_prompt_within_the_context(setup):
    tok = setup.tokenizer
    assert fewshot.equal_share([5, 10, 20], 24) == 9           # 5 + 9 + 9 <= 24 < 5 + 10 + 10
    assert fewshot.equal_share([5, 10], 100) == 10
    context = 48
    builder = fewshot.PromptBuilder(tok, ["很差劲", "好"], context)
    long_texts = [t for t in setup.data.train_texts if len(tok.encode(t)) > 60][:8]
    labels = [0, 1] * 4
    query = next(t for t in setup.data.test_texts if len(tok.encode(t)) > 60)
    longest_word = max(len(w) for w in builder.word_ids)
    for k in range(builder.max_shots() + 1):
        demos = list(zip(long_texts[:k], labels[:k]))
        prompt = builder.build(query, demos)
        assert len(prompt.ids) + longest_word <= context            # [bos] + prompt + any word fit
        assert prompt.query_cut
        # The query: at most half the context, its beginning kept, then the word prefix.
        demo_tokens = sum(builder.demo_overhead[label] + n for (_, label), n in zip(demos, prompt.kept_tokens))
        query_tokens = len(prompt.ids) - 1 - demo_tokens - builder.query_overhead
        assert 1 <= query_tokens <= context // 2
        assert prompt.ids[len(prompt.ids) - len(builder.word_prefix) - query_tokens:] == \
            tok.encode(query)[:query_tokens] + builder.word_prefix
        # Cut from the right to one length: each keeps the beginning of its text.
        assert len(set(prompt.kept_tokens)) <= 1 and all(n >= 1 for n in prompt.kept_tokens)
        for (text, label), n in zip(demos, prompt.kept_tokens):
            shown = tok.decode(tok.encode(text)[:n])
            assert len(shown) < len(text) and f"评论：{shown}\n评价：{builder.words[label]}\n" in prompt.text
        # The room is used: one more token each would not fit.
        assert k == 0 or len(prompt.ids) + longest_word + k > context
    with pytest.raises(ValueError, match="do not fit"):
        builder.build(query, list(zip(long_texts, labels)) * 2)


# --------------------------------------------------------------------------- scores

def test_scores_equal_one_plain_forward_pass_per_prompt_and_word(setup):
    """Rows of different lengths in one padded batch, one-token words sharing a row and
    words of several tokens on rows of their own: each score as the plain forward gives."""
    tok, data = setup.tokenizer, setup.data
    long_words = ["不推荐", "非常满意的好"]
    builder = fewshot.PromptBuilder(tok, long_words, 128)      # room for the longer words
    prompts = [builder.build(data.test_texts[i], [(data.train_texts[2 * i + j], int(data.train_labels[2 * i + j]))
                                                  for j in range(i % 3)]).ids for i in range(7)]
    assert len({len(p) for p in prompts}) > 3
    log_probs = fewshot.log_prob_function(setup.model)
    for words in (WORDS, long_words):
        word_ids = [tok.encode(w) for w in words]
        if words is long_words:                 # several tokens each, of unequal lengths
            assert min(len(w) for w in word_ids) > 1 and len({len(w) for w in word_ids}) == 2
        want, _ = reference_scores(setup.model, prompts, word_ids)
        for batch_size in (1, 3, 8):
            got = fewshot.label_log_likelihoods(log_probs, prompts, word_ids, batch_size, max_length=128)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_torch_and_mindspore_give_the_same_scores_and_predictions(setup):
    ms_model = taichu.load_model(setup.model_dir, "mindspore")
    results = {backend: fewshot.evaluate(model, setup.tokenizer, setup.data, WORDS, shots=[0, 2], queries=8,
                                         batch_size=8)
               for backend, model in (("torch", setup.model), ("mindspore", ms_model))}
    assert results["mindspore"].backend == "mindspore"
    # Two float32 evaluations of one token's log-prob (tests/tolerance.py): the chain through
    # every layer at the full context, the tied projection and the log-sum-exp over the
    # vocabulary, which moves as far as the largest logit (measured on the queries' K = 0
    # prompts): twice the logits' bound. One token per label word here.
    m = setup.config.model
    builder = fewshot.PromptBuilder(setup.tokenizer, WORDS, m.max_position_embeddings)
    prompts = [builder.build(setup.data.test_texts[i], []).ids for i in results["torch"].query_indices]
    _, scale = reference_scores(setup.model, prompts + [builder.build(fewshot.CONTENT_FREE, []).ids],
                                [[setup.tokenizer.bos_id]])
    bound = 2 * float32_tolerance(max(1.0, scale), encoder_chain_terms(m, m.max_position_embeddings)
                                  + m.hidden_size + m.vocab_size)
    for k in (0, 2):
        torch_scores, ms_scores = results["torch"].scores[k], results["mindspore"].scores[k]
        difference = max(float(np.abs(a - b).max()) for a, b in zip(torch_scores, ms_scores))
        assert difference <= bound, (k, difference, bound)
        # The same predictions wherever the two scores are further apart than the backends.
        raw, blank = torch_scores
        for scores, a, b in zip((raw, raw - blank), results["torch"].predictions[k],
                                results["mindspore"].predictions[k]):
            decisive = np.abs(scores[:, 0] - scores[:, 1]) > 4 * difference
            assert decisive.sum() >= 6
            np.testing.assert_array_equal(a[decisive], b[decisive])


# --------------------------------------------------------------------------- the command

def test_the_cli_prints_the_table_and_writes_matching_json(setup, capsys, tmp_path):
    out = tmp_path / "results.json"
    assert main(["fewshot", str(setup.model_dir), "--data", "reviews", "--queries", "20", "--shots", "0", "2",
                 "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["queries"] == 20 and saved["label_words"] == {"negative": "差", "positive": "好"}
    assert [r["shots"] for r in saved["results"]] == [0, 2]
    rows = {int(m[1]): (float(m[2]), float(m[3]), int(m[4]))
            for m in re.finditer(r"^\s+(\d+)\s+([\d.]+)%\s+([\d.]+)%\s+(\d+)\s", printed, re.M)}
    assert sorted(rows) == [0, 2], printed
    for row in saved["results"]:
        accuracy, calibrated, n = rows[row["shots"]]
        assert n == row["n"] == 20
        assert accuracy == round(100 * row["accuracy"], 1) and calibrated == round(100 * row["calibrated_accuracy"], 1)
        assert sum(row["predicted"].values()) == 20
        assert row["most_predicted"]["rate"] == max(row["predicted"].values()) / 20
    counts = saved["query_labels"]
    base = saved["baselines"]
    assert base["always"] == {"差": counts["negative"] / 20, "好": counts["positive"] / 20}
    assert f"{100 * base['majority_accuracy']:.1f}%" in printed
    assert saved["results"][1]["demonstration_chars_kept"] <= saved["results"][1]["demonstration_chars"]
    assert f"wrote {out}" in printed


def test_bad_input_is_refused_clearly(setup, capsys, tmp_path):
    def refused(*argv, match):
        assert main(["fewshot", *map(str, argv), "--queries", "4", "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert re.search(match, error), error

    for family, config in (("gpt_classifier", CONFIGS / "gpt_classifier" / "gpt-tiny-reviews.yaml"),
                           ("clip", CONFIGS / "clip" / "clip-tiny.yaml")):
        other = tmp_path / family
        other.mkdir()
        shutil.copy(config, other / "config.yaml")
        refused(other, match=f"{family} model: few-shot prompting needs a gpt model")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"第{i}条评论", "label": i % 2}) + "\n" for i in range(30)))
    refused(setup.model_dir, "--data", small, "--shots", "0", "40", match="larger than the training split")
    refused(setup.model_dir, "--shots", "20", match=r"do not fit in the model's context of 128 tokens.*: at most \d+$")
    refused(setup.model_dir, "--label-words", "negative=", match="label word '' of negative tokenizes to nothing")
    refused(setup.model_dir, "--label-words", "neutral=中", match="not one of the labels")
    refused(setup.model_dir, "--label-words", "negative=好", match="not distinct")
    refused(setup.model_dir, "--data", small, "--labels", "bad,good", match="no label word for")
    refused(setup.model_dir, "--shots", "-1", match="K must be >= 0")
