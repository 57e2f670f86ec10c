"""Hugging Face GPT2ForSequenceClassification <-> our gpt_classifier through `taichu convert`
(taichu/convert/hf_gpt2.py): a random HF classifier converted in gives HF's logits on a
right-padded batch in both backends, with its labels in order; ours converted out loads in
GPT2ForSequenceClassification.from_pretrained, gives ours and converts back to the same bytes;
a language model read as a classifier, and labels that disagree with the head, are refused
saying what is wrong."""
import json

import numpy as np
import pytest
import torch

import taichu
from taichu import convert
from taichu.cli import main as taichu_main
from taichu.config import ConfigError, config_to_dict, validate_config
from taichu.weights import CheckpointError
from conftest import padded_batch
from test_convert import bits, randomise, small_config

TOL = 1e-5
HF_PAD = 1             # not our default pad id (0): config.json's pad_token_id must come across
HF_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
OUR_LABELS = ["负面", "中性", "正面"]   # non-ASCII through config.json's id2label and back
LENGTHS = [7, 3, 12]   # right-padded rows of different lengths


def hf_config(**extra):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=300, n_positions=40, n_embd=64, n_layer=2, n_head=4, id2label=HF_LABELS,
                      pad_token_id=HF_PAD, architectures=["GPT2ForSequenceClassification"],
                      attn_implementation="eager", **extra)


def classifier_config():
    """test_convert's small GPT with a three-label head."""
    model = {**config_to_dict(small_config())["model"], "labels": OUR_LABELS}
    return validate_config({"family": "gpt_classifier", "model": model, "data": {"seq_len": 32}}, "test config")


def batch(vocab, pad_id, seed=0):
    """Right-padded ids (real tokens 4.., never the pad id) and their attention mask."""
    return padded_batch(np.random.default_rng(seed), vocab, LENGTHS, pad_id=pad_id, left=False)


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(torch.tensor(ids), torch.tensor(mask)).numpy()


def mindspore_logits(model, ids, mask):
    import mindspore as ms

    return model(ms.Tensor(ids, ms.int32), ms.Tensor(mask, ms.int32)).asnumpy()


def hf_logits(model, ids, mask):
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def hf_lm_dir(tmp_path_factory):
    """A random GPT2LMHeadModel of the classifier's shape (no score head)."""
    from transformers import GPT2LMHeadModel

    config = hf_config()
    config.architectures = ["GPT2LMHeadModel"]
    model = GPT2LMHeadModel(config)
    randomise(model, 2)
    path = tmp_path_factory.mktemp("hf-lm") / "lm"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our random gpt_classifier directory, every weight perturbed (the head included)."""
    model = taichu.build_model(classifier_config(), "torch")
    randomise(model, 0)
    return taichu.save_model(model, tmp_path_factory.mktemp("ours") / "classifier")


def test_hugging_face_classifier_converts_to_the_same_logits(tmp_path, capsys):
    from transformers import GPT2ForSequenceClassification

    hf_model = GPT2ForSequenceClassification(hf_config()).eval()
    randomise(hf_model, 1)
    hf_model.save_pretrained(tmp_path / "hf")
    assert taichu_main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "(hf)" in out and f"not pad_token_id {HF_PAD}" in out
    config = taichu.load_config(tmp_path / "ours")
    assert config.family == "gpt_classifier"
    assert list(config.model.labels) == [HF_LABELS[i] for i in range(3)]
    assert config.tokenizer.special_tokens.pad_id == HF_PAD
    ids, mask = batch(300, HF_PAD)
    expected = hf_logits(hf_model, ids, mask)
    assert expected.shape == (len(LENGTHS), 3)
    model = taichu.load_model(tmp_path / "ours", "torch")
    got = {"torch": torch_logits(model, ids, mask),
           "mindspore": mindspore_logits(taichu.load_model(tmp_path / "ours", "mindspore"), ids, mask),
           # taichu.load_model reads the Hugging Face directory as it is, too
           "torch from hf": torch_logits(taichu.load_model(tmp_path / "hf", "torch"), ids, mask)}
    for backend, logits in got.items():
        assert np.abs(logits - expected).max() <= TOL, backend
    # The pooled position matters: the padded rows' last real tokens, not the last column.
    with torch.no_grad():
        last_column = model(torch.tensor(ids)).numpy()
    assert np.abs(last_column - expected)[:2].min(axis=1).min() > 1e-3


def test_our_classifier_loads_in_hugging_face_and_comes_back(ours, tmp_path):
    from transformers import GPT2ForSequenceClassification

    report = convert.convert(ours, tmp_path / "hf", to="hf")
    assert any("pad_token_id 0" in n for n in report["notes"])
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["architectures"] == ["GPT2ForSequenceClassification"] and hf["pad_token_id"] == 0
    hf_model, info = GPT2ForSequenceClassification.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                                   attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf_model.config.id2label == dict(enumerate(OUR_LABELS))
    assert hf_model.config.label2id == {label: i for i, label in enumerate(OUR_LABELS)}
    ids, mask = batch(320, 0)
    expected = torch_logits(taichu.load_model(ours, "torch"), ids, mask)
    assert np.abs(hf_logits(hf_model, ids, mask) - expected).max() <= TOL
    # ... and back: the same bytes and config; without taichu_config, the same labels and pad.
    convert.convert(tmp_path / "hf", tmp_path / "back")
    (config, before), (config_back, after) = convert.load(ours), convert.load(tmp_path / "back")
    assert config_back == config and bits(after) == bits(before)
    hf.pop("taichu_config")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf))
    bare, arrays = convert.load(tmp_path / "hf")
    assert bare.model == config.model and bare.tokenizer.special_tokens == config.tokenizer.special_tokens
    assert bits(arrays) == bits(before)


def test_language_model_is_not_a_classifier(hf_lm_dir, ours, tmp_path):
    # GPT2LMHeadModel (no architectures too) is our gpt; --config a classifier is refused.
    _, arrays = convert.load(hf_lm_dir)
    assert "score.weight" not in arrays and convert.load(hf_lm_dir)[0].family == "gpt"
    with pytest.raises(ConfigError, match=r"\['GPT2LMHeadModel'\] is our gpt family, but --config is a "
                                          r"gpt_classifier config: a GPT-2 language model has no classification "
                                          r"head .*taichu train CONFIG --init"):
        convert.convert(hf_lm_dir, tmp_path / "out", config=classifier_config())
    # A config.json that says classifier over a language model's weights: no score.weight.
    hf = json.loads((hf_lm_dir / "config.json").read_text())
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "model.safetensors").symlink_to(hf_lm_dir / "model.safetensors")
    (lm / "config.json").write_text(json.dumps({**hf, "architectures": ["GPT2ForSequenceClassification"]}))
    with pytest.raises(CheckpointError, match="no score.weight, so not a GPT2ForSequenceClassification: "
                                              "a GPT-2 language model has no classification head"):
        convert.convert(lm, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The other way: a classifier read as a GPT.
    convert.convert(ours, tmp_path / "hf", to="hf")
    with pytest.raises(ConfigError, match="is our gpt_classifier family, but --config is a gpt config"):
        convert.load(tmp_path / "hf", config=small_config())
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in hf.items() if k not in ("architectures", "taichu_config")}))
    with pytest.raises(CheckpointError, match=r"has score.weight \(3, 64\), the head of a "
                                              r"GPT2ForSequenceClassification, but is being read as a GPT2LMHeadModel"):
        convert.load(tmp_path / "hf")


def test_labels_that_disagree_with_the_head_are_refused(ours, tmp_path):
    convert.convert(ours, tmp_path / "hf", to="hf")
    path = tmp_path / "hf" / "config.json"
    hf = json.loads(path.read_text())
    hf.pop("taichu_config")
    two = {"0": "负面", "1": "正面"}
    path.write_text(json.dumps({**hf, "id2label": two, "label2id": None, "num_labels": 2}))
    with pytest.raises(CheckpointError, match=r"score.weight \(3, 64\) scores 3 labels, but the config "
                                              r"names 2 \(model.labels, config.json's id2label: \['负面', '正面'\]\)"):
        convert.convert(tmp_path / "hf", tmp_path / "out")
    path.write_text(json.dumps({**hf, "num_labels": 2}))
    with pytest.raises(ConfigError, match=r"num_labels 2 disagrees with id2label's 3 labels"):
        convert.load(tmp_path / "hf")
    # A --config with other labels than config.json's, and one against a bare state dict.
    path.write_text(json.dumps(hf))
    two_labels = config_to_dict(classifier_config())
    two_labels["model"]["labels"] = ["负面", "正面"]
    with pytest.raises(ConfigError, match=r"disagrees with config.json on \{'labels'"):
        convert.load(tmp_path / "hf", config=validate_config(two_labels, "two labels"))
    convert.convert(ours, tmp_path / "state.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped:  score.weight has \(3, 64\), config expects "
                                              r"\(2, 64\)"):
        convert.load(tmp_path / "state.safetensors", config=validate_config(two_labels, "two labels"))
