"""A word-level tokenizer for the zoo, built with the `tokenizers` library.

Words and single punctuation marks are tokens; a token carries a leading "▁" when a space
preceded it (as in SentencePiece), so decoding puts spaces back exactly where they were:
"(B)" is "▁(", "B", ")" and decodes to "(B)", while "] } ]" decodes to "] } ]". Newlines are
tokens of their own. Special tokens follow T5: <pad>=0 (also the decoder start), </s>=1,
<unk>=2; every encoded text ends with </s>.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from lorahub_compeft.zoo.tasks import generate, task_names

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "▁"
# After Metaspace has marked spaces, split a piece into words (letters, digits, apostrophes)
# and single other characters, each keeping a space mark that precedes it.
_PIECE = Regex(rf"{SPACE}?[A-Za-z0-9']+|{SPACE}?[^A-Za-z0-9'{SPACE}]|{SPACE}")
BBH_TASKS = ("boolean_expressions", "web_of_lies", "navigate", "dyck_languages")


def _pre_tokenizer():
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Split(_PIECE, behavior="isolated"),
    ])


def split_words(text: str) -> list[str]:
    """The tokens `text` is cut into (before looking them up in the vocabulary)."""
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)]


def corpus_texts(n_per_task: int = 2000, seed: int = 0, bbh_dir: str | Path | None = None
                 ) -> Iterable[str]:
    """Every prompt and target the zoo's generators make (all tasks, both splits), plus the
    real BBH examples of the four tasks the zoo mirrors when `bbh_dir` is given."""
    for name in task_names():
        for ex in generate(name, n_per_task, seed):
            yield ex["input"]
            yield ex["target"]
    if bbh_dir is not None:
        bbh_dir = Path(bbh_dir)
        for task in BBH_TASKS:
            path = bbh_dir / "tasks" / f"{task}.json"
            if path.exists():
                for ex in json.loads(path.read_text())["examples"]:
                    yield ex["input"]
                    yield ex["target"]
            prompt = bbh_dir / "cot-prompts" / f"{task}.txt"
            if prompt.exists():  # the instruction line after '-----'
                lines = prompt.read_text().splitlines()
                yield lines[lines.index("-----") + 1]


def build_tokenizer(texts: Iterable[str], model_max_length: int = 256
                    ) -> PreTrainedTokenizerFast:
    counts = Counter(tok for text in texts for tok in split_words(text))
    vocab = {PAD: 0, EOS: 1, UNK: 2}
    for tok in sorted(counts):  # sorted: the same texts always give the same ids
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS,
                                   unk_token=UNK, model_max_length=model_max_length)


def build_zoo_tokenizer(bbh_dir: str | Path | None = None, seed: int = 0
                        ) -> PreTrainedTokenizerFast:
    return build_tokenizer(corpus_texts(seed=seed, bbh_dir=bbh_dir))
