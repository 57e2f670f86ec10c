"""Evaluation of an M6 (issue 20): captioning (BLEU-4, CIDEr, per-attribute accuracy against
the drawn scene) and visual question answering (exact match, seen vs held-out templates).

Metrics (each a pure function of strings, tested against hand-computed values in
tests/test_m6_generate.py):

``caption_bleu``   corpus BLEU-4 of sacrebleu (``corpus_bleu``, ``tokenize="zh"``: every CJK
                   character is a token, its default ``exp`` smoothing and brevity penalty),
                   0-100. One or more references per caption.
``caption_cider``  CIDEr-D as coco-caption computes it (pycocoevalcap's ``Cider``, n = 1..4,
                   sigma 6, clipped tf-idf, the document frequencies of the evaluated set's own
                   references; the 0-10 scale, x10 inside): captions and references are split
                   into characters joined by spaces (``char_tokens``) and fed to its pure-Python
                   scorer, never its Java PTB tokenizer. A set of one image scores 0 (every
                   n-gram is in every "document": idf 0).
``attribute_accuracy``
                   what of the truth a generated caption states (below).
``vqa_accuracy``   exact match of the answers (both stripped of surrounding whitespace), over
                   all questions and split by template id: ``seen`` (templates training used)
                   and ``held_out`` (data.held_out_templates).

Attribute accuracy. The truth is a drawn-scene caption (taichu.imagetext.scene_caption); its
claims come from taichu.scene_check.parse_caption: each object's colour and shape, and its
position, or (count captions) the number of such objects. The generated caption's claims are
read the same way: the whole caption if parse_caption reads it, else each "，"-separated part
that parse_caption reads on its own (an unreadable part states nothing). They become the
generated objects: a positional claim one object at its position, a count claim ``count``
objects without a position. Then, as taichu.scene_check.check_image judges an image, with the
generated objects in place of the objects found in the pixels, per claim of the truth:

- positional claim (colour c, shape s, position p): ``colour`` / ``shape`` hold when the first
  generated object at p has colour c / shape s (false when none is at p); ``position`` holds
  when some generated object has colour c, shape s and position p.
- count claim (c, s, n): ``colour`` / ``shape`` hold when there is at least one generated
  object and every one has colour c / shape s; ``count`` holds when exactly n generated objects
  have colour c and shape s.

Per kind: the mean over captions (those with a check of that kind) of the share of the
caption's checks that hold, as taichu.scene_check.score_images; ``all``: the share of captions
whose every check holds; ``parsed``: the share of generated captions parse_caption reads whole;
``captions``: how many. Objects the generated caption adds beyond the truth's cost nothing
except through a count.

``evaluate_captions`` and ``evaluate_vqa`` run a model's ``step`` (taichu.m6_generate) over
the held-out scenes and questions of taichu.m6_data and return these metrics.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

KINDS = ("colour", "shape", "position", "count")


def _references(hypotheses: Sequence[str], references: Sequence) -> list[list[str]]:
    """references as one list per hypothesis (a str is one reference)."""
    hypotheses = list(hypotheses)
    references = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} captions for {len(references)} reference sets")
    if not hypotheses:
        raise ValueError("no captions to score")
    for i, refs in enumerate(references):
        if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise ValueError(f"caption {i}: every caption needs at least one non-empty reference")
    return references


def char_tokens(text: str) -> str:
    """The characters of ``text`` but whitespace, joined by single spaces: '红色 的' -> '红 色 的'."""
    return " ".join(ch for ch in text if not ch.isspace())


def caption_bleu(hypotheses: Sequence[str], references: Sequence) -> float:
    """Corpus BLEU-4 (0-100) of sacrebleu with its Chinese tokenizer; ``references[i]`` is the
    reference (str) or references (list) of ``hypotheses[i]``."""
    import sacrebleu

    references = _references(hypotheses, references)
    most = max(len(r) for r in references)
    # sacrebleu takes reference streams; a caption with fewer references has None in the rest.
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="zh").score)


def caption_cider(hypotheses: Sequence[str], references: Sequence) -> float:
    """CIDEr-D (coco-caption's, 0-10) over the set, characters as tokens (module docstring)."""
    from pycocoevalcap.cider.cider import Cider

    references = _references(hypotheses, references)
    gts = {i: [char_tokens(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [char_tokens(h)] for i, h in enumerate(hypotheses)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def _generated_claims(caption: str):
    """(the claims of a generated caption, whether parse_caption read it whole)."""
    from taichu.scene_check import parse_caption

    try:
        return parse_caption(caption), True
    except ValueError:
        pass
    claims = []
    for part in caption.strip().split("，"):
        try:
            claims += parse_caption(part)
        except ValueError:
            continue
    return claims, False


def caption_checks(generated: str, truth: str) -> dict[str, list[bool]]:
    """Per kind (colour, shape, position, count), the outcome of each of the truth's claims
    against the generated caption (module docstring); kinds without a claim are empty."""
    from taichu.scene_check import parse_caption

    claims = parse_caption(truth)
    stated, _ = _generated_claims(generated)
    objects = []    # (colour, shape, position or None)
    for claim in stated:
        objects += [(claim.colour, claim.shape, claim.position)] * (claim.count or 1)
    checks: dict[str, list[bool]] = {kind: [] for kind in KINDS}
    for claim in claims:
        if claim.count is not None:
            checks["colour"].append(bool(objects) and all(o[0] == claim.colour for o in objects))
            checks["shape"].append(bool(objects) and all(o[1] == claim.shape for o in objects))
            checks["count"].append(sum(o[:2] == (claim.colour, claim.shape) for o in objects) == claim.count)
            continue
        there = [o for o in objects if o[2] == claim.position]
        checks["colour"].append(bool(there) and there[0][0] == claim.colour)
        checks["shape"].append(bool(there) and there[0][1] == claim.shape)
        checks["position"].append((claim.colour, claim.shape, claim.position) in objects)
    return checks


def attribute_accuracy(generated: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """{colour, shape, position, count, all, parsed, captions} (module docstring); a kind no
    truth has a claim of is nan."""
    generated, truths = list(generated), list(truths)
    if len(generated) != len(truths):
        raise ValueError(f"{len(generated)} generated captions for {len(truths)} true ones")
    per_kind: dict[str, list[float]] = {kind: [] for kind in KINDS}
    whole, parsed = [], []
    for text, truth in zip(generated, truths):
        checks = caption_checks(text, truth)
        for kind, outcomes in checks.items():
            if outcomes:
                per_kind[kind].append(float(np.mean(outcomes)))
        whole.append(all(all(outcomes) for outcomes in checks.values()))
        parsed.append(_generated_claims(text)[1])
    scores = {kind: float(np.mean(values)) if values else float("nan") for kind, values in per_kind.items()}
    scores["all"] = float(np.mean(whole)) if whole else float("nan")
    scores["parsed"] = float(np.mean(parsed)) if parsed else float("nan")
    scores["captions"] = len(whole)
    return scores


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], templates: Sequence[str],
                 held_out: Sequence[str] = ()) -> dict:
    """Exact-match accuracy (answers stripped of surrounding whitespace): ``all``, ``seen``
    (templates not in ``held_out``), ``held_out`` (nan where a group has no question),
    ``by_template`` {template id: accuracy}, ``questions`` {all, seen, held_out: counts}."""
    predictions, answers, templates = list(predictions), list(answers), list(templates)
    if not len(predictions) == len(answers) == len(templates):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answers and {len(templates)} template ids")
    held = set(held_out)
    right = [p.strip() == a.strip() for p, a in zip(predictions, answers)]

    def mean(selected):
        values = [r for r, keep in zip(right, selected) if keep]
        return float(np.mean(values)) if values else float("nan")

    unseen = [t in held for t in templates]
    return {"all": mean([True] * len(right)), "seen": mean([not u for u in unseen]), "held_out": mean(unseen),
            "by_template": {t: mean([x == t for x in templates]) for t in sorted(set(templates))},
            "questions": {"all": len(right), "seen": unseen.count(False), "held_out": unseen.count(True)}}


def blind_guesses(data) -> tuple[str, dict]:
    """What a model blind to the image says, from ``data``'s training pools (taichu.m6_data
    M6Data): the commonest training caption, and per question kind (QUESTION_KINDS) the
    commonest training answer: the baselines of ``taichu eval`` and bench/m6.py."""
    from collections import Counter

    from taichu.m6_data import QUESTION_TEMPLATES

    captions = Counter(e.target for e in data.pools.get("caption", []))
    answers: dict[str, Counter] = {}
    for e in data.pools.get("vqa", []):
        if e.template is not None:
            answers.setdefault(QUESTION_TEMPLATES[e.template].kind, Counter())[e.target] += 1
    common = captions.most_common(1)[0][0] if captions else ""
    return common, {kind: counts.most_common(1)[0][0] for kind, counts in answers.items()}


# ----------------------------------------------------------------------------- running a model

def held_out_data(config):
    """taichu.m6_data.M6Data of the model config with only its image tasks (caption and
    vqa): the same split of images and held-out templates as training, without building the
    text or text-to-image pools."""
    from taichu.m6_data import load_m6

    data = config.data.model_copy(update={"tasks": {"caption": 1.0, "vqa": 1.0}})
    return load_m6(config.model_copy(update={"data": data}))


def _batches(items, size: int):
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, len(items), size):
        yield items[start:start + size]


def evaluate_captions(step, tokenizer, config, sampling=None, limit: int | None = None, batch_size: int = 32,
                      data=None) -> dict:
    """Captions of the held-out images (the first ``limit``) by ``step``
    (taichu.m6_generate), scored against their true captions: {bleu4, cider, attributes
    (drawn scenes only, else None), images, examples: [{key, truth, generated}]}."""
    from taichu.m6_generate import GREEDY, caption

    data = data or held_out_data(config)
    examples = data.held_out_pools.get("caption", [])[:limit]
    if not examples:
        raise ValueError("no held-out images to caption (data.source gives none)")
    generated = []
    for chunk in _batches(examples, batch_size):
        generated += caption(step, tokenizer, config, [e.image for e in chunk], sampling or GREEDY)
    truths = [e.target for e in examples]
    scenes = all(e.scene is not None for e in examples)
    return {"bleu4": caption_bleu(generated, truths), "cider": caption_cider(generated, truths),
            "attributes": attribute_accuracy(generated, truths) if scenes else None, "images": len(examples),
            "examples": [{"key": e.key, "truth": t, "generated": g} for e, t, g in zip(examples, truths, generated)]}


def evaluate_vqa(step, tokenizer, config, sampling=None, limit: int | None = None, batch_size: int = 32,
                 data=None) -> dict:
    """Answers to the held-out scenes' questions (every template; the first ``limit`` of the
    seen and the first ``limit`` of the held-out templates' questions) by ``step``, scored by
    vqa_accuracy, plus ``examples``: [{key, template, question, answer, predicted}]."""
    from taichu.m6_generate import GREEDY, ask

    data = data or held_out_data(config)
    examples = data.questions("seen")[:limit] + data.questions("held_out")[:limit]
    if not examples:
        raise ValueError("no held-out questions (questions come from drawn scenes: data.source 'scenes')")
    predicted = []
    for chunk in _batches(examples, batch_size):
        predicted += ask(step, tokenizer, config, [e.image for e in chunk], [e.prompt for e in chunk],
                         sampling or GREEDY)
    scores = vqa_accuracy(predicted, [e.target for e in examples], [e.template for e in examples],
                          data.held_out_templates)
    scores["examples"] = [{"key": e.key, "template": e.template, "question": e.prompt, "answer": e.target,
                           "predicted": p} for e, p in zip(examples, predicted)]
    return scores
