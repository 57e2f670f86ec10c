"""Our SentencePiece tokenizer <-> a Hugging Face tokenizer directory.

``write_hf_tokenizer`` turns our ``tokenizer.model`` into the files ``AutoTokenizer`` and
``pipeline`` load: ``tokenizer.json`` (built with the ``tokenizers`` library: SentencePiece's
Unigram pieces and scores, or its BPE as ranked merges, with byte fallback; ' ' -> U+2581 as
SentencePiece escapes it, no other normalisation; the family's bos/eos framing),
``tokenizer_config.json``, ``special_tokens_map.json``, and ``tokenizer.model`` itself.
``read_hf_tokenizer`` does the reverse: a ``tokenizer.model`` is taken as it is, a Unigram
``tokenizer.json`` is rebuilt as a SentencePiece model. Both check the result against
SentencePiece on probe texts and name the inputs whose ids differ.

Both raise ``taichu.config.ConfigError`` (writing nothing) when the tokenizer cannot be
expressed in the other format, and otherwise return notes: the kinds of input whose ids
differ between the two. They need ``tokenizers`` and ``protobuf`` (``pip install
'taichu[hf]'``), imported inside the functions.
"""
from __future__ import annotations

import json
from pathlib import Path

from taichu.config import ConfigError, config_to_dict, validate_config
from taichu.fileio import atomic_write_bytes

SP_MODEL = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPACE_MARK = "\u2581"   # SentencePiece's escaped ' ' (taichu.tokenizer.SPACE_MARK)
# sentencepiece_model.proto: ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2   # TrainerSpec.ModelType
# Families that frame their text as a caption, [bos] + text + [eos], right-padded
# (taichu.imagetext.caption_ids); the others as a prompt, [bos] + text (taichu.generate),
# left-padded for batched generation.
CAPTION_FAMILIES = ("clip", "brivl", "dalle")
# Families whose texts end with eos, right-padded: a classifier reads [bos] + text + [eos]
# (taichu.classify.encode_texts) and HF pools at its last non-pad token, the eos.
EOS_FAMILIES = CAPTION_FAMILIES + ("gpt_classifier",)
# Texts every conversion is checked on, besides each learned piece on its own: Chinese,
# digits, full-width punctuation, rare hanzi and emoji (byte fallback), spaces, ASCII.
PROBE_TEXTS = (
    "中华人民共和国成立于1949年10月1日。", "今天，我们在北京（中国）见面！“你好”；《人民日报》……",
    "龘靐齉爩", "😀🚀👍🏽 表情", "  两个  空格   三个", "GPT-2 和 CLIP 模型 v3.5, 100% OK?",
    "第一行\n第二行\t制表", "全角　空格，ＡＢＣ１２３", "a", " ", "",
)


def _import_hf_tools():
    try:
        import tokenizers
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as err:
        raise ConfigError(f"Hugging Face tokenizer files need the tokenizers and protobuf packages "
                          f"(pip install 'taichu[hf]'): {err}") from None
    return tokenizers, sentencepiece_model_pb2


def _read_model_proto(path: Path):
    _, pb = _import_hf_tools()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as err:  # protobuf's DecodeError, or a file that is not one
        raise ConfigError(f"{path}: not a SentencePiece model: {err}") from None
    if not proto.pieces:
        raise ConfigError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def _inexpressible(proto) -> list[str]:
    """Why this SentencePiece model has no exact tokenizer.json here (empty: it has one)."""
    why = []
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type not in (UNIGRAM, BPE):
        kind = {3: "word", 4: "char"}.get(trainer.model_type, str(trainer.model_type))
        why.append(f"model_type {kind}: only unigram and bpe models are converted (the two taichu trains)")
    if normalizer.precompiled_charsmap or normalizer.normalization_rule_tsv:
        why.append(f"normalization rule {normalizer.name!r}: only 'identity' is converted (taichu trains "
                   "with it, so decode(encode(text)) == text)")
    for flag, value in (("add_dummy_prefix", normalizer.add_dummy_prefix),
                        ("remove_extra_whitespaces", normalizer.remove_extra_whitespaces),
                        ("treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix)):
        if value:
            why.append(f"{flag}: true is not converted (taichu trains with false)")
    if not normalizer.escape_whitespaces:
        why.append("escape_whitespaces: false is not converted")
    kinds = {p.type for p in proto.pieces}
    for kind, name in ((USER_DEFINED, "user-defined"), (UNUSED, "unused")):
        if kind in kinds:
            why.append(f"{name} pieces are not converted")
    if sum(p.type == UNKNOWN for p in proto.pieces) != 1:
        why.append("it needs exactly one unknown piece")
    if trainer.byte_fallback and sum(p.type == BYTE for p in proto.pieces) != 256:
        why.append("byte_fallback without all 256 byte pieces")
    return why


def _special_pieces(proto) -> dict[str, str]:
    """{"bos": piece, ...} of the special tokens the model has (control or unknown pieces)."""
    trainer = proto.trainer_spec
    found = {}
    for name in ("pad", "unk", "bos", "eos"):
        index = getattr(trainer, f"{name}_id")
        if 0 <= index < len(proto.pieces) and proto.pieces[index].type in (CONTROL, UNKNOWN):
            found[name] = proto.pieces[index].piece
    return found


NO_LENGTH_LIMIT = int(1e30)


def _framing(config) -> tuple[bool, str, int]:
    """(add eos, padding side, longest text) of the family's text input."""
    model = config.model
    text = getattr(model, "text", model)
    # A DALL-E's captions fill its text_length slots (taichu.imagetext.caption_ids). A model
    # without a window (a GPT-XL: segment memory and relative positions) takes any length:
    # transformers' own value for "no limit" (VERY_LARGE_INTEGER, int(1e30)).
    longest = (getattr(text, "max_position_embeddings", None) or getattr(text, "text_length", None)
               or NO_LENGTH_LIMIT)
    if config.family in EOS_FAMILIES:
        return True, "right", longest
    return False, "left", longest


def _build_tokenizer(proto, add_eos: bool):
    """The tokenizers.Tokenizer that encodes as this SentencePiece model does."""
    tokenizers, _ = _import_hf_tools()
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

    unk_id = next(i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN)
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == BPE:
        model = models.BPE({p.piece: i for i, p in enumerate(proto.pieces)}, _bpe_merges(proto),
                           unk_token=proto.pieces[unk_id].piece, byte_fallback=byte_fallback, fuse_unk=True)
    else:
        model = models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=unk_id, byte_fallback=byte_fallback)
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", SPACE_MARK)
    # tokenizers' Unigram, unlike SentencePiece, can match control and byte pieces ("<s>",
    # "<0x41>") spelt out in the text. With '<' on its own no piece can start there; that
    # changes nothing else when no learned piece holds '<' beside other characters.
    if _lt_is_isolated(proto):
        tokenizer.pre_tokenizer = pre_tokenizers.Split("<", behavior="isolated")
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    special = _special_pieces(proto)
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                  for piece in special.values()])
    trainer = proto.trainer_spec
    if "bos" in special:
        frame = [(special["bos"], trainer.bos_id)]
        single, pair = f"{special['bos']} $A", f"{special['bos']} $A {special['bos']} $B:1"
        if add_eos and "eos" in special:
            frame.append((special["eos"], trainer.eos_id))
            single, pair = f"{single} {special['eos']}", f"{single} {special['eos']} $B:1 {special['eos']}:1"
        tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=frame)
    return tokenizer


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """SentencePiece BPE as ranked merges: it joins the adjacent pair whose joined piece has
    the highest score, so every split of a learned piece into two learned pieces is a merge,
    ranked by that score (the same derivation as transformers' SentencePieceExtractor)."""
    ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    merges = []
    for piece in sorted(ids, key=lambda piece: (-proto.pieces[ids[piece]].score, ids[piece])):
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        merges += sorted(splits, key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    return merges


def _lt_is_isolated(proto) -> bool:
    return not any(p.type == NORMAL and "<" in p.piece and p.piece != "<" for p in proto.pieces)


def _known_differences(proto) -> list[str]:
    """The kinds of input whose ids differ between SentencePiece (taichu) and the tokenizer.json."""
    notes = []
    if proto.trainer_spec.byte_fallback:
        notes.append(f"ids differ on a literal {SPACE_MARK!r} (U+2581) in the text: taichu encodes it as its "
                     "UTF-8 bytes, tokenizer.json as a space")
    if not _lt_is_isolated(proto):
        notes.append("ids may differ on text that spells a special or byte piece ('<s>', '<0x41>'): "
                     "tokenizer.json can encode it as that piece, taichu as characters")
    notes.append("special-token text ('<s>', '</s>', '<pad>', '<unk>') is characters in taichu and in "
                 "transformers 4.46, 4.57 and 5 (split_special_tokens); transformers 4.41 and older, whose "
                 "fast tokenizers ignore split_special_tokens, encode it as the special id")
    if not proto.trainer_spec.byte_fallback:
        notes.append("an unknown character decodes as ' \u2047 ' in taichu and as the unk token (or nothing "
                     "with skip_special_tokens) in transformers")
    return notes


def _sp_processor(proto):
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


def _probes(proto) -> list[str]:
    pieces = [p.piece.replace(SPACE_MARK, " ") for p in proto.pieces if p.type == NORMAL]
    return list(PROBE_TEXTS) + pieces


def _differing(proto, tokenizer, probes: list[str]) -> list[str]:
    """Probe texts whose ids (without bos/eos) or decoded text differ between the two."""
    processor = _sp_processor(proto)
    ours = processor.encode(probes)
    theirs = [e.ids for e in tokenizer.encode_batch(probes, add_special_tokens=False)]
    differ = [text for text, a, b in zip(probes, ours, theirs) if a != b]
    decoded = tokenizer.decode_batch(ours, skip_special_tokens=False)
    differ += [text for text, ids, back in zip(probes, ours, decoded)
               if back != processor.decode(ids) and text not in differ]
    return differ


def _describe(texts: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(t) for t in texts[:limit])
    return shown + (f" and {len(texts) - limit} more" if len(texts) > limit else "")


def write_hf_tokenizer(sp_model_path: str | Path, out_dir: str | Path, config) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and tokenizer.model
    of our SentencePiece model into ``out_dir``, for the model of ``config``.

    Returns notes naming the inputs whose ids differ between taichu and transformers. Raises
    ConfigError, writing nothing, when the tokenizer cannot be expressed (why in the message).
    """
    from taichu.tokenizer import Tokenizer, check_tokenizer

    sp_model_path, out_dir = Path(sp_model_path), Path(out_dir)
    try:
        check_tokenizer(Tokenizer(sp_model_path), config.tokenizer, _vocab_size(config))
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    proto = _read_model_proto(sp_model_path)
    why = _inexpressible(proto)
    if why:
        raise ConfigError(f"{sp_model_path}: no exact tokenizer.json for this SentencePiece model: "
                          + "; ".join(why))
    add_eos, padding_side, max_length = _framing(config)
    tokenizer = _build_tokenizer(proto, add_eos)
    differ = _differing(proto, tokenizer, _probes(proto))
    if differ:
        raise ConfigError(f"{sp_model_path}: the tokenizer.json built from it encodes {len(differ)} probe "
                          f"texts differently from SentencePiece: {_describe(differ)}")
    special = _special_pieces(proto)
    tokens = {f"{name}_token": piece for name, piece in special.items()}
    tokenizer_config = {
        # A fast tokenizer read from tokenizer.json as it is: transformers 4.x and 5 both load
        # it without rebuilding anything from the model type (gpt2 / clip would pick BPE ones).
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": "bos" in special, "add_eos_token": add_eos and "eos" in special,
        # Decoding must give back the text exactly ("a ." must not become "a.").
        "clean_up_tokenization_spaces": False,
        # Special-token text in the input is text, as SentencePiece treats it.
        "split_special_tokens": True,
        # GPT2LMHeadModel and CLIPTextModel would read token_type_ids (GPT-2 adds its
        # embedding to every position): the models take only these two.
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_length,
        "padding_side": padding_side,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / TOKENIZER_JSON, tokenizer.to_str(pretty=True).encode())
    atomic_write_bytes(out_dir / TOKENIZER_CONFIG, json.dumps(tokenizer_config, indent=2, ensure_ascii=False).encode())
    atomic_write_bytes(out_dir / SPECIAL_TOKENS_MAP, json.dumps(tokens, indent=2, ensure_ascii=False).encode())
    if sp_model_path.resolve() != (out_dir / SP_MODEL).resolve():
        atomic_write_bytes(out_dir / SP_MODEL, sp_model_path.read_bytes())
    return _known_differences(proto)


def _vocab_size(config) -> int:
    model = config.model
    return getattr(model, "text", model).vocab_size


# ----------------------------------------------------------------------------- reverse

def _proto_from_tokenizer_json(data: dict, special: dict[str, str], source: str):
    """A SentencePiece ModelProto equal to a Unigram tokenizer.json, or ConfigError."""
    _, pb = _import_hf_tools()
    model = data.get("model") or {}
    if model.get("type") != "Unigram":
        raise ConfigError(f"{source}: model type {model.get('type')!r} has no SentencePiece equivalent here "
                          "(only Unigram tokenizer.json files are carried; a byte-level BPE such as GPT-2's "
                          "is not)")
    normalizer, pre_tokenizer = data.get("normalizer"), data.get("pre_tokenizer")
    prefix = False
    steps = (normalizer or {}).get("normalizers", [normalizer] if normalizer else [])
    for step in steps:
        if step.get("type") == "Replace" and step.get("pattern", {}).get("String") == " " \
                and step.get("content") == SPACE_MARK:
            continue
        if step.get("type") == "Prepend" and step.get("prepend") == SPACE_MARK:
            prefix = True
            continue
        raise ConfigError(f"{source}: normalizer {step.get('type')!r} is not carried (only ' ' -> "
                          f"{SPACE_MARK!r} and a {SPACE_MARK!r} prefix)")
    if pre_tokenizer is not None:
        kind = pre_tokenizer.get("type")
        if kind == "Metaspace" and pre_tokenizer.get("replacement") == SPACE_MARK:
            prefix = prefix or pre_tokenizer.get("prepend_scheme", "always") != "never"
        elif not (kind == "Split" and pre_tokenizer.get("pattern", {}).get("String") == "<"):
            raise ConfigError(f"{source}: pre_tokenizer {kind!r} is not carried")
    vocab, unk_id = model.get("vocab") or [], model.get("unk_id")
    byte_fallback = bool(model.get("byte_fallback"))
    if unk_id is None or not 0 <= unk_id < len(vocab):
        raise ConfigError(f"{source}: a Unigram model without an unk_id cannot be a SentencePiece model")
    controls = {t["content"] for t in data.get("added_tokens", []) if t.get("special")} | set(special.values())
    proto = pb.ModelProto()
    for index, (piece, score) in enumerate(vocab):
        entry = proto.pieces.add(piece=piece, score=float(score))
        if index == unk_id:
            entry.type = UNKNOWN
        elif piece in controls:
            entry.type = CONTROL
        elif byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            entry.type = BYTE
        else:
            entry.type = NORMAL
    trainer = proto.trainer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = UNIGRAM, len(vocab), byte_fallback
    trainer.unk_id, trainer.unk_piece = unk_id, vocab[unk_id][0]
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    for name in ("bos", "eos", "pad"):
        piece = special.get(name)
        index = ids.get(piece, -1) if piece is not None else -1
        setattr(trainer, f"{name}_id", index)
        if index >= 0:
            setattr(trainer, f"{name}_piece", piece)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    return proto


def _hf_special_pieces(hf_dir: Path) -> dict[str, str]:
    """{"bos": piece, ...} from tokenizer_config.json, else special_tokens_map.json."""
    found = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        path = hf_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{path}: not valid JSON: {err}") from None
        for key in ("pad", "unk", "bos", "eos"):
            value = data.get(f"{key}_token") if isinstance(data, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def read_hf_tokenizer(hf_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Bring a Hugging Face directory's SentencePiece-based tokenizer into ``out_dir`` as
    ``tokenizer.model``: its own ``tokenizer.model`` when it has one, else one rebuilt from
    a Unigram ``tokenizer.json``.

    Returns notes (where taichu's ids differ from the directory's tokenizer.json, by probe
    text). Raises ConfigError, writing nothing, when there is no such tokenizer.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    tokenizers, _ = _import_hf_tools()
    json_path = hf_dir / TOKENIZER_JSON
    hf_tokenizer, notes = None, []
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text())
            hf_tokenizer = tokenizers.Tokenizer.from_file(str(json_path))
        except Exception as err:  # tokenizers raises a bare Exception for a bad file
            if not (hf_dir / SP_MODEL).is_file():
                raise ConfigError(f"{json_path}: not a readable tokenizer.json: {err}") from None
            notes.append(f"{json_path} is not readable ({err}); not compared with tokenizer.model")
    if (hf_dir / SP_MODEL).is_file():
        proto = _read_model_proto(hf_dir / SP_MODEL)
        model_bytes = (hf_dir / SP_MODEL).read_bytes()
        notes.append(f"tokenizer.model taken from {hf_dir} as it is")
    elif hf_tokenizer is not None:
        proto = _proto_from_tokenizer_json(data, _hf_special_pieces(hf_dir), str(json_path))
        model_bytes = proto.SerializeToString()
        notes.append(f"tokenizer.model rebuilt from {json_path} (Unigram, {len(proto.pieces)} pieces)")
    else:
        raise ConfigError(f"{hf_dir}: no SentencePiece-based tokenizer (neither tokenizer.model nor "
                          "tokenizer.json)")
    if hf_tokenizer is not None:
        if proto.trainer_spec.byte_fallback:
            notes += _known_differences(proto)[:1]    # the literal U+2581
        differ = _differing(proto, hf_tokenizer, _probes(proto))
        if differ:
            notes.append(f"taichu's SentencePiece ids differ from {json_path}'s on {len(differ)} of "
                         f"{len(_probes(proto))} probe texts: {_describe(differ)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / SP_MODEL, model_bytes)
    return notes


def tokenizer_section(sp_model_path: str | Path, config):
    """``config`` with its tokenizer section describing the SentencePiece model at
    ``sp_model_path`` (special pieces and ids, byte fallback, model type); ConfigError
    when our config cannot describe it (a missing special token, another vocab size)."""
    from taichu.tokenizer import Tokenizer, check_tokenizer

    proto = _read_model_proto(Path(sp_model_path))
    tokenizer = Tokenizer(sp_model_path)
    raw = config_to_dict(config)
    section = raw.setdefault("tokenizer", {})
    section["byte_fallback"] = bool(proto.trainer_spec.byte_fallback)
    section["model_type"] = {1: "unigram", 2: "bpe"}.get(proto.trainer_spec.model_type, "unigram")
    special = {}
    for name in ("pad", "unk", "bos", "eos"):
        index = getattr(tokenizer, f"{name}_id")
        if index < 0:
            raise ConfigError(f"{sp_model_path}: has no {name} token, which taichu's tokenizer section needs")
        special[name], special[f"{name}_id"] = tokenizer.id_to_piece(index), index
    section["special_tokens"] = special
    updated = validate_config(raw, str(sp_model_path))
    try:
        check_tokenizer(tokenizer, updated.tokenizer, _vocab_size(updated))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return updated
