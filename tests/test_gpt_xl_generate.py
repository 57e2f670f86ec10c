"""GPT-XL generation without a window (taichu.generate.RecurrentStep): greedy tokens identical
in PyTorch and MindSpore (mindspore.jit graphs) for one prompt and a left-padded batch of
different lengths, generating past the memory and segment (prompt + new tokens > seq_len +
mem_len); every step's logits equal to a recomputation of the whole text without memory
tensors, each position attending to what the memory rule lets it see; fixed shapes from call
to call; the CLI; refusals. The ONNX side: tests/test_export_gpt_xl.py."""
import numpy as np
import pytest

import taichu
from taichu.config import load_config
from taichu.generate import RecurrentStep, SamplingConfig, generate_ids, generation_memory, recurrent_model_step

from conftest import CONFIGS

TOLERANCE = 1e-4
# A caption tokenizer trained in a fraction of a second; the model gets its vocabulary size.
VOCAB = 330
CONFIG = load_config(CONFIGS / "gpt_xl" / "gpt-xl-tiny.yaml",
                     [f"model.vocab_size={VOCAB}", "tokenizer.character_coverage=1.0"])
SEGMENT, MEM_LEN = CONFIG.data.seq_len, CONFIG.model.mem_len          # 32 and 32
MEMORY = generation_memory(MEM_LEN, SEGMENT)                          # 63
BOS = 2
RNG = np.random.default_rng(5)
# One prompt of three segments (70 tokens, left-padded to 96), and three of 40 (two
# segments), 5 and 17 in one batch; 60 new tokens: every row runs past seq_len + mem_len.
BATCHES = {1: [[BOS] + RNG.integers(4, VOCAB, 69).tolist()],
           3: [[BOS] + RNG.integers(4, VOCAB, n - 1).tolist() for n in (40, 5, 17)]}
NEW_TOKENS = 60
GREEDY = SamplingConfig(NEW_TOKENS, temperature=0)


def build_model_dir(root):
    """gpt-xl-tiny with a caption tokenizer of VOCAB pieces and every weight moved off its
    init (N(0, 0.02) gives near-equal logits, whose argmax a 1e-7 difference could flip)."""
    import torch

    from taichu.imagetext import caption_texts, digit_texts, scene_texts
    from taichu.tokenizer import train_tokenizer

    tokenizer = root / "tokenizer.model"
    train_tokenizer(caption_texts(scene_texts(300, seed=0), digit_texts()), CONFIG.tokenizer, VOCAB, tokenizer)
    torch.manual_seed(0)
    model = taichu.build_model(CONFIG, "torch").eval()
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(0.3 * torch.randn_like(tensor))
    return taichu.save_model(model, root / "model", tokenizer=tokenizer)


def recorded(step, log):
    """``step`` that appends every call's logits to ``log``."""
    def wrapped(input_ids, attention_mask, past):
        logits, past = step(input_ids, attention_mask, past)
        log.append(np.array(logits))
        return logits, past
    return wrapped


def greedy(step, prompts, sampling=GREEDY):
    """(tokens [batch, new], the logits of every step): eos never stops it."""
    log = []
    tokens = generate_ids(recorded(step, log), prompts, sampling, eos_id=-1, pad_id=0, max_positions=None)
    return np.array(tokens), log


def scaled_difference(actual, expected) -> float:
    """export/validate.py's measure: max |a - e| / max(1, max |e|)."""
    scale = max(1.0, float(np.abs(expected).max()))
    return float(np.abs(np.asarray(actual, np.float64) - expected).max()) / scale


def recomputed_logits(model, prompts, tokens, memory):
    """Logits [batch, positions, vocab] of the padded prompts followed by ``tokens``, computed
    in one pass over the whole text with no memory tensors, from the weights of the torch
    ``model``: each position sees the keys of its own document from the start of the call it
    ran in minus ``memory``, up to itself (the prompt's calls: segments of seq_len ending where
    it ends; then one per token), with the relative positions read straight from the
    distances (no shift trick) and the sinusoids written out here."""
    import torch

    m = model.config.model
    batch, width = len(prompts), -(-max(len(p) for p in prompts) // SEGMENT) * SEGMENT
    total = width + tokens.shape[1]
    ids = np.zeros((batch, total), np.int64)
    documents = np.full((batch, total), -1, np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):width] = prompt
        documents[row, width - len(prompt):] = 0
    ids[:, width:] = tokens
    positions = np.arange(total)
    call_start = np.where(positions < width, positions // SEGMENT * SEGMENT, positions)
    visible = (positions[None, :] <= positions[:, None]) & (positions[None, :] >= (call_start - memory)[:, None])
    visible = torch.from_numpy(visible[None] & (documents[:, :, None] == documents[:, None, :]))[:, None]
    distance = torch.from_numpy(np.maximum(positions[:, None] - positions[None, :], 0))
    frequencies = 1.0 / 10000.0 ** (np.arange(0, m.hidden_size, 2) / m.hidden_size)
    angles = np.arange(total)[:, None] * frequencies[None, :]
    sinusoids = torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32))
    heads, head_dim = m.num_heads, m.head_dim
    with torch.no_grad():
        x = model.embed_tokens(torch.from_numpy(ids))
        for layer in model.layers:
            attention = layer.attn
            h = layer.ln_1(x)
            q, k, v = (proj(h).view(batch, total, heads, head_dim)
                       for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
            r = attention.r_proj(sinusoids).view(total, heads, head_dim)[distance]      # [i, j, heads, dim]
            scores = (torch.einsum("bihd,bjhd->bhij", q + attention.content_bias, k)
                      + torch.einsum("bihd,ijhd->bhij", q + attention.position_bias, r)) / head_dim ** 0.5
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out = torch.einsum("bhij,bjhd->bihd", probs, v).reshape(batch, total, m.hidden_size)
            x = x + attention.out_proj(out)
            x = x + layer.mlp(layer.ln_2(x))
        return model.output_logits(x).numpy(), width


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("gpt_xl"))


@pytest.fixture(scope="module")
def torch_model(model_dir):
    return taichu.load_model(model_dir, backend="torch")


@pytest.fixture(scope="module")
def expected(torch_model):
    """{batch: (tokens, logits of every step)} of the torch model."""
    step = recurrent_model_step(torch_model)
    return {batch: greedy(step, prompts) for batch, prompts in BATCHES.items()}


@pytest.fixture(scope="module")
def ms_step(model_dir):
    """One RecurrentStep over the MindSpore model: its compiled graphs serve both batches."""
    return recurrent_model_step(taichu.load_model(model_dir, backend="mindspore"))


# ----------------------------------------------------------------------------- tokens

@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_greedy_tokens_equal_in_torch_and_mindspore_past_the_window(expected, ms_step, batch):
    prompts = BATCHES[batch]
    assert all(len(p) + NEW_TOKENS > SEGMENT + MEM_LEN for p in prompts)
    tokens, logits = expected[batch]
    ms_tokens, ms_logits = greedy(ms_step, prompts)
    np.testing.assert_array_equal(ms_tokens, tokens)
    assert max(scaled_difference(a, b) for a, b in zip(ms_logits, logits)) <= TOLERANCE
    assert tokens.shape == (batch, NEW_TOKENS) and all(len(set(row)) > 5 for row in tokens.tolist())
    assert all(a.dtype == np.float32 and a.shape == (batch, VOCAB) for a in ms_logits)


def test_a_prompt_continues_the_same_in_any_batch(torch_model, expected):
    """Padding never changes results: the segments end where each prompt ends."""
    step = recurrent_model_step(torch_model)
    tokens, _ = expected[3]
    for row, prompt in enumerate(BATCHES[3]):
        np.testing.assert_array_equal(greedy(step, [prompt])[0][0], tokens[row])


@pytest.mark.parametrize("memory", [None, 10])
def test_cached_steps_equal_a_recomputation_without_memory(torch_model, expected, memory):
    """Every step's logits (and so each greedy token) are those of one pass over the whole
    text under the memory rule: the default memory, and a memory of 10 (shorter than a
    segment: a prompt token then sees more keys than a generated one)."""
    for batch, prompts in BATCHES.items():
        if memory is None:
            tokens, logits = expected[batch]
        else:
            tokens, logits = greedy(recurrent_model_step(torch_model, memory), prompts)
        reference, width = recomputed_logits(torch_model, prompts, tokens, MEMORY if memory is None else memory)
        for k, step_logits in enumerate(logits):
            at = reference[:, width - 1 + k]
            assert scaled_difference(step_logits, at) <= TOLERANCE, (batch, k)
            np.testing.assert_array_equal(tokens[:, k], at.argmax(axis=-1))
    if memory is not None:    # a shorter memory sees less: it changes what comes out
        assert not np.array_equal(tokens, expected[3][0])


def test_every_call_has_one_of_two_shapes_and_a_fixed_memory(torch_model):
    """A constant cost per token: the prompt runs as [batch, seq_len] segments, every new
    token as [batch, 1], always after a memory of [batch, memory]."""
    model_step = recurrent_model_step(torch_model)
    shapes = []

    def forward(input_ids, document_ids, memory_document_ids, memories):
        shapes.append((input_ids.shape, document_ids.shape, tuple(memory_document_ids.shape),
                       {tuple(m.shape) for m in memories}))
        return model_step.forward(input_ids, document_ids, memory_document_ids, memories)
    step = RecurrentStep(forward, model_step.initial_memories, SEGMENT, MEMORY, VOCAB)
    tokens, _ = greedy(step, BATCHES[3], SamplingConfig(40, temperature=0))
    np.testing.assert_array_equal(tokens, greedy(model_step, BATCHES[3], SamplingConfig(40, temperature=0))[0])
    memory = ((3, MEMORY), {(3, MEMORY, CONFIG.model.hidden_size)})
    assert shapes == [((3, SEGMENT), (3, SEGMENT)) + memory] * 2 + [((3, 1), (3, 1)) + memory] * 39


# ----------------------------------------------------------------------------- refusals

def test_bad_inputs_are_refused(torch_model):
    step = recurrent_model_step(torch_model)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate_ids(step, [[BOS, 5], []], GREEDY, -1, 0, None)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate_ids(step, [], GREEDY, -1, 0, None)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is out of range for vocab_size {VOCAB}"):
        generate_ids(step, [[BOS, VOCAB]], GREEDY, -1, 0, None)
    with pytest.raises(ValueError, match="the memory must hold at least 1 position, got 0"):
        recurrent_model_step(torch_model, memory=0)
    ids = np.array([[BOS, 5], [BOS, 6]])
    _, past = step(ids, np.ones_like(ids), None)
    with pytest.raises(ValueError, match="a memory of batch 2 given with input_ids of batch 3: a memory belongs "
                                         "to the batch it was made by"):
        step(np.array([[7], [8], [9]]), np.ones((3, 3), np.int64), past)
    with pytest.raises(ValueError, match=r"after the prompt, one new token per call"):
        step(np.array([[7, 8], [8, 9]]), np.ones((2, 4), np.int64), past)
    with pytest.raises(ValueError, match="past must be the memory a previous call of this step returned"):
        recurrent_model_step(torch_model)(np.array([[7], [8]]), np.ones((2, 3), np.int64), past)
    # The model itself refuses a memory of another batch (taichu.families.gpt_xl.check_inputs).
    import torch

    memories, documents = torch_model.initial_memories(2, 5)
    with pytest.raises(ValueError, match="memory 0 holds 2 rows, but input_ids has 3"):
        torch_model(torch.ones(3, 1, dtype=torch.long), None, memories, documents)


# ----------------------------------------------------------------------------- the CLI

def test_cli_generates_past_the_window_in_torch_and_mindspore(model_dir, torch_model, capsys):
    """`taichu generate MODEL_DIR --prompt ... --max-new-tokens 150` (no window to refuse it),
    the same text in torch and in mindspore, what generate_text gives; --memory reaches the
    model; a memory of 0 is refused."""
    from taichu.cli import main
    from taichu.generate import generate_text
    from taichu.tokenizer import Tokenizer

    prompts = ["左边一个", "白色背景的左边有一个蓝色的正方形"]
    arguments = ["generate", str(model_dir), "--max-new-tokens", "150", "--temperature", "0"]
    for prompt in prompts:
        arguments += ["--prompt", prompt]
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    sampling = SamplingConfig(150, temperature=0)
    want = [p + o for p, o in zip(prompts, generate_text(torch_model, tokenizer, prompts, sampling))]
    printed = {}
    for backend in ("torch", "mindspore"):
        assert main(arguments + ["--backend", backend]) == 0
        printed[backend] = capsys.readouterr().out.split("\n")[:-1]
    assert printed["torch"] == printed["mindspore"] == want
    assert all(len(tokenizer.encode(line)) > SEGMENT + MEM_LEN for line in want)
    assert main(arguments + ["--memory", "10"]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == [
        p + o for p, o in zip(prompts, generate_text(torch_model, tokenizer, prompts, sampling, memory=10))]
    assert main(arguments + ["--memory", "0"]) == 2
    assert "the memory must hold at least 1 position, got 0" in capsys.readouterr().err
    assert main(arguments + ["--backend", "mindir"]) == 2
    assert "a gpt_xl has no MINDIR export" in capsys.readouterr().err
    assert main(arguments + ["--backend", "onnx"]) == 2
    assert "--backend onnx runs its ONNX export" in capsys.readouterr().err


def test_min_new_tokens_holds_back_the_end_of_text():
    """--min-new-tokens (Hugging Face's min_new_tokens): eos cannot be chosen before that many
    new tokens, then it can; the loop is the shared one, so every runtime has it."""
    from taichu.generate import SamplingConfig, generate_ids

    eos = 3

    def step(input_ids, attention_mask, past):
        logits = np.zeros((input_ids.shape[0], 8), np.float32)
        logits[:, eos] = 10.0          # eos is always the likeliest token
        return logits, None

    greedy = dict(max_new_tokens=6, temperature=0.0)
    assert generate_ids(step, [[5]], SamplingConfig(**greedy), eos, 0, None) == [[]]
    held = generate_ids(step, [[5]], SamplingConfig(**greedy, min_new_tokens=4), eos, 0, None)[0]
    assert len(held) == 4 and eos not in held       # then eos ends it
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(max_new_tokens=3, min_new_tokens=4)


def test_parity_command_compares_a_gpt_xl(model_dir, capsys):
    """`taichu parity` on a gpt_xl: held-out text, left-padded (document id -1), in both backends."""
    from taichu.cli import main

    import torch

    from taichu.corpus import load_corpus
    from taichu.tokenizer import Tokenizer
    from tolerance import encoder_chain_terms, float32_tolerance
    from torch_impl.gpt_xl import memory_attention_bias, sinusoid_encodings

    # The bound for these texts: the tied projection's terms |ln_f(h)_k E_vk| summed, at its
    # largest over the texts' positions (unpadded: the same positions), over the whole chain.
    model = taichu.load_model(model_dir, backend="torch")
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    texts = [t for t in load_corpus(model.config.data).validation if len(t) >= 40][:4]
    scale = 0.0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode(text, add_bos=True)[:40]])
            x = model.dropout(model.embed_tokens(ids))
            bias = memory_attention_bias(torch.zeros_like(ids), torch.zeros_like(ids), x.dtype)
            encodings = sinusoid_encodings(ids.shape[1], x.shape[-1], x.dtype, x.device)
            for layer in model.layers:
                x = layer(x, None, encodings, bias)
            terms = model.ln_f(x)[0].abs() @ model.embed_tokens.weight.abs().T
            scale = max(scale, float(terms.max()))
    bound = float32_tolerance(scale, encoder_chain_terms(model.config.model, 40))
    assert main(["parity", str(model_dir), "--max-length", "40", "--tolerance", str(bound)]) == 0
    out = capsys.readouterr().out
    diff = float(out.split("logit = ")[1].split(",")[0])
    assert diff <= bound and "argmax agreement 100.00%" in out
