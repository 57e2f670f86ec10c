"""How noisy are the synthetic speech transcripts? The tones pypinyin writes (taichu.speech.
to_pinyin, per character and word, with its own sandhi of 一 and 不) against the tones
libespeak-ng actually speaks (taichu.speech.spoken_tones, read from its phonemes), syllable
by syllable, over the sentences of a speech config. A syllable whose tone differs is a label
the model cannot learn from the audio: the share bounds how much of the syllable error rate
the labels themselves explain.

    .venv/bin/python bench/speech_labels.py                    # wav2vec2-small-ctc's 2,000 sentences
    .venv/bin/python bench/speech_labels.py --config PATH --no-doc
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def measure(config_path: str) -> dict:
    import taichu
    from taichu.speech import spoken_tones, synthetic_plan

    data = taichu.load_config(config_path).data
    sentences = {u.text: u.pinyin for u in synthetic_plan(data)}
    confusions, unreadable, sentences_differing, syllables = collections.Counter(), 0, 0, 0
    examples = []
    for text, pinyin in sentences.items():
        written = [int(s[-1]) for s in pinyin.split("|")]
        spoken = spoken_tones(text)
        if spoken is None or len(spoken) != len(written):
            unreadable += 1  # a contour outside the five tones, or a syllable count that differs
            continue
        syllables += len(written)
        confusions.update(zip(written, spoken))
        if written != spoken:
            sentences_differing += 1
            if len(examples) < 3:
                examples.append((text, pinyin, spoken))
    differing = sum(n for (a, b), n in confusions.items() if a != b)
    return {"config": config_path, "sentences": len(sentences), "unreadable": unreadable,
            "syllables": syllables, "differing": differing, "sentences_differing": sentences_differing,
            "confusions": confusions, "examples": examples}


def report(r: dict) -> str:
    from benchdoc import machine

    compared = r["sentences"] - r["unreadable"]
    top = sorted(((n, a, b) for (a, b), n in r["confusions"].items() if a != b), reverse=True)[:6]
    lines = [f"{time.strftime('%Y-%m-%d')}; {machine()}.", "",
             f"Command: `.venv/bin/python bench/speech_labels.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`"
             f" (sentences of `{r['config']}`).", "",
             f"- {r['syllables']:,} syllables of {compared:,} sentences compared ({r['unreadable']} of "
             f"{r['sentences']:,} skipped: espeak-ng's syllable count or contour did not map to 5 tones).",
             f"- **{100 * r['differing'] / r['syllables']:.1f} % of syllables** ({r['differing']:,}) carry a "
             f"transcript tone that is not the one spoken; {100 * r['sentences_differing'] / compared:.1f} % "
             "of sentences hold at least one.",
             "- Most frequent (transcript tone -> spoken tone, 5 = neutral): "
             + ", ".join(f"{a} -> {b}: {n}" for n, a, b in top) + ".",
             "- Examples: " + "; ".join(f"{t} `{p}` spoken {''.join(map(str, s))}" for t, p, s in r["examples"]) + ".",
             "- So the labels explain at most this share of the syllable error rate: a model that "
             "heard every tone right would still be marked wrong on these syllables."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/wav2vec2/wav2vec2-small-ctc.yaml")
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args(argv)
    text = report(measure(args.config))
    print(text)
    if not args.no_doc:
        from benchdoc import write_section

        write_section("speech_labels", "## Speech: how noisy are the synthetic transcripts? (bench/speech_labels.py)", text)


if __name__ == "__main__":
    main()
