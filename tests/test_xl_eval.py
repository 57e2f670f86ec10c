"""taichu.xl_eval: perplexity of long held-out documents, with and without memory, at several
context lengths, for a GPT-XL in both backends and for a plain GPT on the same documents.

Every number is checked against a recomputation that does not go through the scorer: one
forward pass over a whole document (what a memory covering the whole document must give),
and each segment scored alone (what memory 0 must give), per token.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import taichu
from conftest import CONFIGS, perturbed_state
from taichu import xl_eval
from taichu.api import load_state_dict
from taichu.config import load_config
from taichu.corpus import load_corpus
from taichu.tokenizer import train_tokenizer
from tolerance import encoder_chain_terms, float32_tolerance

D = 96          # predicted tokens per document: 2 segments of 40 + a padded one of 16
DOCUMENTS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """gpt-xl-tiny and gpt-tiny (random weights moved by noise, so that what a token sees
    changes its loss by O(1)), one tokenizer (vocab 4096 from 3,000 lines: quick, and the
    perplexity needs no good one), the documents, all under a temporary token cache."""
    root = tmp_path_factory.mktemp("xl_eval")
    cache = f"data.cache_dir={root / 'cache'}"
    config = load_config(CONFIGS / "gpt_xl" / "gpt-xl-tiny.yaml", [cache])
    path = root / "tokenizer.model"
    corpus = load_corpus(config.data)
    tokenizer = train_tokenizer(corpus.train,
                                config.tokenizer.model_copy(update={"max_training_sentences": 3000}),
                                config.model.vocab_size, path)
    torch.manual_seed(0)
    xl = taichu.build_model(config, "torch")
    load_state_dict(xl, perturbed_state(xl, seed=0))
    gpt_config = load_config(CONFIGS / "gpt" / "gpt-tiny.yaml", [cache])
    gpt = taichu.build_model(gpt_config, "torch")
    load_state_dict(gpt, perturbed_state(gpt, seed=1))
    xl_dir = taichu.save_model(xl, root / "xl", tokenizer=path)
    gpt_dir = taichu.save_model(gpt, root / "gpt", tokenizer=path)
    documents = xl_eval.held_out_documents(config, tokenizer, D, limit=DOCUMENTS)
    return SimpleNamespace(root=root, config=config, corpus=corpus, tokenizer=tokenizer, xl_dir=xl_dir, gpt_dir=gpt_dir,
                           xl=taichu.load_model(xl_dir, "torch"), gpt=taichu.load_model(gpt_dir, "torch"),
                           documents=documents)


def numpy_nll(logits, targets):
    """-log softmax(logits)[target] in float64, [rows, length]."""
    z = np.asarray(logits, np.float64)
    top = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - top).sum(-1)) + top[..., 0]
    return lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def nll_bound(m, keys: int, logit_scale: float, position_terms: bool = True) -> float:
    """Largest |a - b| between two float32 evaluations of one token's NLL (tests/tolerance.py):
    the chain from the embedding through every layer (the attention over ``keys`` keys; a
    GPT-XL's relative position term adds the r projection and a head_dim dot product per
    layer; the memory adds no layer: a memory slot of layer i is the layer-i input of an
    earlier position), the tied projection and the log-sum-exp over the vocabulary. NLL =
    lse(z) - z_t, and lse moves at most as far as the largest logit: twice the logits'
    bound, the logits of magnitude ``logit_scale``."""
    terms = encoder_chain_terms(m, keys) + m.hidden_size + m.vocab_size
    if position_terms:
        terms += m.num_layers * (m.hidden_size + m.head_dim)
    return 2 * float32_tolerance(max(1.0, logit_scale), terms)


def full_forward(model, documents):
    """One forward pass per document over all its inputs (no memory, no segments):
    ([documents, D] NLL, largest |logit|)."""
    rows, scale = [], 0.0
    with torch.no_grad():
        for tokens, ids in zip(documents.tokens, documents.document_ids):
            logits = model(torch.from_numpy(tokens[None, :-1]), torch.from_numpy(ids[None]))[0].numpy()
            rows.append(numpy_nll(logits, tokens[None, 1:])[0])
            scale = max(scale, float(np.abs(logits).max()))
    return np.stack(rows), scale


def segments_alone(call, documents, context):
    """Each segment of ``context`` tokens scored alone (a short last one unpadded): what
    memory 0 must give, ([documents, D] NLL, largest |logit|). ``call(ids, document_ids)``
    -> logits numpy."""
    tokens, ids = documents.tokens, documents.document_ids
    out, scale = [], 0.0
    for start in range(0, documents.length, context):
        stop = min(start + context, documents.length)
        logits = call(tokens[:, start:stop], ids[:, start:stop])
        out.append(numpy_nll(logits, tokens[:, start + 1:stop + 1]))
        scale = max(scale, float(np.abs(logits).max()))
    return np.concatenate(out, axis=1), scale


def test_documents_are_consecutive_stretches_of_the_packed_held_out_stream(setup):
    documents, tokenizer = setup.documents, setup.tokenizer
    validation = setup.corpus.validation
    stream = np.concatenate([np.asarray(ids) for ids in tokenizer.encode_batch(validation, True, True)])
    assert documents.tokens.shape == (DOCUMENTS, D + 1) and documents.predicted == DOCUMENTS * D
    for i in range(DOCUMENTS):
        # Document i: D predicted tokens after its first, sharing one token with the next.
        np.testing.assert_array_equal(documents.tokens[i], stream[i * D:i * D + D + 1])
    assert (documents.document_ids == 0).all() and documents.stream_tokens == len(stream)

    made = xl_eval.make_documents(np.array([2, 7, 8, 3, 2, 9, 3, 2, 5]), 4, bos_id=2, reset_memory="document")
    np.testing.assert_array_equal(made.tokens, [[2, 7, 8, 3, 2], [2, 9, 3, 2, 5]])
    np.testing.assert_array_equal(made.document_ids, [[1, 1, 1, 1], [1, 1, 1, 2]])  # a new id at each bos
    with pytest.raises(ValueError, match="9 tokens, less than one document of 9 \\+ 1 tokens"):
        xl_eval.make_documents(np.arange(9), 9, bos_id=2)


def test_xl_perplexity_equals_an_independent_recomputation(setup):
    model, documents, m = setup.xl, setup.documents, setup.config.model
    table = xl_eval.perplexity_table(model, documents, contexts=[16, 40, D], memories=[0, 32, D])
    full, scale = full_forward(model, documents)
    bound = nll_bound(m, 2 * D, scale)
    for row in table.rows:
        losses = table.token_nll[row["context"], row["memory"]]
        assert row["nll"] == pytest.approx(losses.mean(), rel=1e-12)
        assert row["perplexity"] == pytest.approx(np.exp(losses.mean()), rel=1e-12)
    # A memory covering the whole document, or a context that is the whole document: the
    # full forward, token for token (40 does not divide 96: the padded last segment too).
    for context, memory in [(16, D), (40, D), (D, D), (D, 0)]:
        assert np.abs(table.token_nll[context, memory] - full).max() <= bound, (context, memory)

    # Memory 0: each segment alone.
    def alone(ids, document_ids):
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(document_ids))[0].numpy()
    for context in (16, 40):
        expected, _ = segments_alone(alone, documents, context)
        assert np.abs(table.token_nll[context, 0] - expected).max() <= bound, context
    # The checks can fail: what a token sees moves its loss far beyond the bound. The first
    # segment sees no memory whatever its length; later ones see less with less memory.
    for memory in (0, 32):
        differences = np.abs(table.token_nll[16, memory] - full)
        assert differences[:, :16].max() <= bound
        assert differences[:, 16:].max() > 100 * bound, memory
    assert np.abs(table.token_nll[16, 32] - table.token_nll[16, 0])[:, 16:].max() > 100 * bound
    lines = table.lines()
    assert lines[2].split() == ["M", "\\", "L", "16", "40", str(D)]
    assert [line.split()[0] for line in lines[3:]] == ["0", "32", str(D)]


def test_torch_and_mindspore_give_the_same_table(setup):
    """The same entries, token for token, within the float32 bound of two evaluations;
    MindSpore through its compiled cell (one graph per (batch, L, M)), the padded last
    segment and the carried memory included."""
    documents, m = setup.documents, setup.config.model
    contexts, memories = [40], [0, 32]
    tables = {backend: xl_eval.perplexity_table(taichu.load_model(setup.xl_dir, backend), documents,
                                                contexts, memories)
              for backend in ("torch", "mindspore")}
    _, scale = full_forward(setup.xl, documents)
    bound = nll_bound(m, max(contexts) + max(memories), scale)
    torch_table, ms_table = tables["torch"], tables["mindspore"]
    entries = [[(r["context"], r["memory"]) for r in t.rows] for t in (torch_table, ms_table)]
    assert entries[0] == entries[1] == [(40, 0), (40, 32)]
    for a, b in zip(torch_table.rows, ms_table.rows):
        key = a["context"], a["memory"]
        assert np.abs(torch_table.token_nll[key] - ms_table.token_nll[key]).max() <= bound, key
        assert abs(a["nll"] - b["nll"]) <= bound, key
    assert ms_table.backend == "mindspore"


def test_a_plain_gpt_scores_the_same_documents_in_segments_of_its_window(setup):
    model, documents, m = setup.gpt, setup.documents, setup.gpt.config.model
    table = xl_eval.perplexity_table(model, documents, contexts=[32, 40])
    assert [(r["context"], r["memory"]) for r in table.rows] == [(32, 0), (40, 0)]

    def alone(ids, document_ids):
        with torch.no_grad():
            return model(torch.from_numpy(ids)).numpy()
    for context in (32, 40):
        expected, scale = segments_alone(alone, documents, context)
        bound = nll_bound(m, context, scale, position_terms=False)
        assert np.abs(table.token_nll[context, 0] - expected).max() <= bound, context
    with pytest.raises(ValueError, match="context 256 is longer than the GPT's window \\(model.max_position_"
                                         "embeddings 128\\)"):
        xl_eval.perplexity_table(model, xl_eval.make_documents(documents.tokens.reshape(-1), 300, 2), [256])
    with pytest.raises(ValueError, match="a plain GPT has no memory"):
        xl_eval.perplexity_table(model, documents, [32], [0, 32])


def test_the_cli_prints_and_writes_the_table(setup, capsys):
    import json

    from taichu.cli import main

    out = setup.root / "xl.json"
    assert main(["eval", str(setup.xl_dir), "--document-tokens", str(D), "--documents", str(DOCUMENTS),
                 "--context", "40", "--context", "16", "--memory", "0", "--memory", "32",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    expected = xl_eval.perplexity_table(setup.xl, setup.documents, [16, 40], [0, 32])
    assert written["family"] == "gpt_xl" and written["backend"] == "torch"
    assert (written["documents"], written["document_tokens"]) == (DOCUMENTS, D)
    assert written["predicted_tokens"] == DOCUMENTS * D
    assert [(r["context"], r["memory"]) for r in written["table"]] == [(16, 0), (40, 0), (16, 32), (40, 32)]
    for got, row in zip(written["table"], expected.rows):
        assert got["perplexity"] == pytest.approx(row["perplexity"], rel=1e-9)
    assert "\n".join(expected.lines()[2:]) in printed and f"wrote {out}" in printed

    # A plain GPT: the memory-0 row, at its config's default contexts (seq_len 64: 32, 64, 128).
    out = setup.root / "gpt.json"
    assert main(["eval", str(setup.gpt_dir), "--document-tokens", "128", "--documents", "2",
                 "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["family"] == "gpt" and [(r["context"], r["memory"]) for r in written["table"]] == [
        (32, 0), (64, 0), (128, 0)]
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.split()[:3] == ["M", "\\", "L"])
    assert lines[row].split()[3:] == ["32", "64", "128"] and lines[row + 1].split()[0] == "0"
    assert lines[row + 2] == f"wrote {out}"


def test_bad_input_is_refused_clearly(setup, capsys):
    from taichu.cli import main

    def refused(*argv):
        assert main(["eval", *map(str, argv)]) == 2
        return capsys.readouterr().err

    assert "context 256 is longer than the GPT's window" in refused(setup.gpt_dir, "--context", 256,
                                                                     "--document-tokens", 512)
    assert "context 64 is longer than a document of --document-tokens 32" in refused(
        setup.xl_dir, "--context", 64, "--document-tokens", 32)
    assert "it has no memory" in refused(setup.gpt_dir, "--memory", 32)
    assert "torch or mindspore, not onnx" in refused(setup.xl_dir, "--backend", "onnx")
    assert "less than one document of 1000000 + 1 tokens" in refused(setup.xl_dir, "--document-tokens", 10 ** 6)
    # Three paragraphs are one chunk of the split, on the training side: no held-out text.
    three = setup.root / "three.txt"
    paragraphs = [t for t in setup.corpus.validation if len(t) > 40][:3]
    three.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    assert "no held-out text: the validation split of three.txt" in refused(setup.xl_dir, "--data", three)
    assert main(["eval", str(setup.xl_dir), "--data", str(three), "--split", "all", "--document-tokens", "16",
                 "--context", "8", "--memory", "8"]) == 0
    assert "all of three.txt" in capsys.readouterr().out
