"""Build the local evaluation tasks' data from the held-out novel (Persuasion), deterministically.

Pure functions (text in, records out); `scripts/build_eval_tasks.py` writes them as JSONL into
`stages/tasks/data/`. How each task is built is documented in docs/evaluation.md:

* `persuasion_ppl`: passages of whole paragraphs (one chapter at a time, >= PASSAGE_MIN_CHARS
  each) scored with lm-eval's loglikelihood_rolling: word/byte perplexity and bits per byte.
* `persuasion_lastword`: LAMBADA-style: predict a paragraph's last word, keeping only
  paragraphs whose last word already occurs earlier in the context.
* `persuasion_nextsent`: multiple choice: the true next sentence of a paragraph against three
  sentences of similar length from other chapters.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

# The novel ships inside the package (stages/data/heldout/); the shared corpus folder beside the
# repository is the fallback for a checkout that predates the vendored copy.
PACKAGE_HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout" / "persuasion.txt"
SHARED_HELDOUT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "austen" / "persuasion.txt"

SEED = 20240607
PASSAGE_MIN_CHARS = 900
LASTWORD_MIN_CHARS, LASTWORD_MAX_CHARS = 300, 900
NEXTSENT_CONTEXT_CHARS = 400
NEXTSENT_TRUE_CHARS = (30, 250)
NEXTSENT_LENGTH_RATIO = 1.33
NEXTSENT_MAX_DOCS = 400
N_DISTRACTORS = 3

CHAPTER_RE = re.compile(r"^Chapter \d+$")
# Sentence end: . ! ? (plus closing quotes), then whitespace, then an uppercase letter or a quote.
SENTENCE_END_RE = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")
ABBREVIATIONS = ("Mr.", "Mrs.", "Dr.", "St.", "Wm.", "Esq.")
LAST_WORD_RE = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})(?P<tail>[.!?;,]?[\"']?)$", re.DOTALL)


@dataclass(frozen=True)
class Chapter:
    number: int
    paragraphs: tuple[str, ...]


def heldout_text_path() -> Path:
    """The held-out novel: the package's copy, else the shared corpus folder."""
    return PACKAGE_HELDOUT if PACKAGE_HELDOUT.is_file() else SHARED_HELDOUT


def read_heldout_text() -> str:
    """Text of the held-out novel (Persuasion), as shipped."""
    return heldout_text_path().read_text(encoding="utf-8")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_chapters(text: str) -> list[Chapter]:
    """Chapters of the novel; paragraphs are its non-empty lines with runs of spaces collapsed.

    The title page before "Chapter 1" and the closing "Finis" are dropped.
    """
    chapters: list[Chapter] = []
    current: list[str] | None = None
    for line in text.splitlines():
        line = " ".join(line.split())
        if CHAPTER_RE.match(line):
            if current is not None:
                chapters.append(Chapter(len(chapters) + 1, tuple(current)))
            current = []
        elif line and current is not None and line != "Finis":
            current.append(line)
    if current:
        chapters.append(Chapter(len(chapters) + 1, tuple(current)))
    return chapters


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph (a regular-expression splitter that keeps "Mr." and initials intact)."""
    sentences: list[str] = []
    start = 0
    for match in SENTENCE_END_RE.finditer(paragraph):
        body = paragraph[start:match.start()]
        if body.endswith(ABBREVIATIONS) or re.search(r"(^|\s)[A-Z]\.$", body):
            continue
        sentences.append((body + match.group(0).strip()).strip())
        start = match.end()
    sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


def _shuffled(records: list[dict], salt: str) -> list[dict]:
    """Records with ids in book order, then shuffled (fixed seed) so a `limit` samples the whole book."""
    for i, rec in enumerate(records):
        rec["id"] = i
    random.Random(f"{SEED}:{salt}").shuffle(records)
    return records


def build_ppl_docs(chapters: list[Chapter]) -> list[dict]:
    """Passages of consecutive whole paragraphs of one chapter, each >= PASSAGE_MIN_CHARS.

    A chapter's short remainder is merged into its last passage. Paragraphs are joined by a
    blank line, as in the novel's text.
    """
    records: list[dict] = []
    for ch in chapters:
        passages: list[list[str]] = [[]]
        for para in ch.paragraphs:
            if sum(len(p) for p in passages[-1]) >= PASSAGE_MIN_CHARS:
                passages.append([])
            passages[-1].append(para)
        if len(passages) > 1 and sum(len(p) for p in passages[-1]) < PASSAGE_MIN_CHARS:
            passages[-2].extend(passages.pop())
        records += [{"chapter": ch.number, "text": "\n\n".join(p)} for p in passages]
    return _shuffled(records, "ppl")


def _lastword_record(chapter: Chapter, index: int) -> dict | None:
    """Context (preceding paragraphs + this one without its last word) and the last word, or None."""
    para = chapter.paragraphs[index]
    match = LAST_WORD_RE.match(para)
    if match is None or len(para) > LASTWORD_MAX_CHARS:
        return None
    context, word = match.group("context"), match.group("word")
    i = index
    while len(context) < LASTWORD_MIN_CHARS and i > 0:
        i -= 1
        if len(chapter.paragraphs[i]) + len(context) > LASTWORD_MAX_CHARS:
            break
        context = chapter.paragraphs[i] + "\n\n" + context
    if len(context) < LASTWORD_MIN_CHARS:
        return None
    # LAMBADA-like: the word is recoverable from the passage, not a guess of style alone
    if not re.search(rf"\b{word}\b", context, flags=re.IGNORECASE):
        return None
    return {"chapter": chapter.number, "paragraph": index, "context": context, "target": word}


def build_lastword_docs(chapters: list[Chapter]) -> list[dict]:
    """LAMBADA-style last-word prediction over every qualifying paragraph."""
    records = [rec for ch in chapters for i in range(len(ch.paragraphs))
               if (rec := _lastword_record(ch, i)) is not None]
    return _shuffled(records, "lastword")


def _sentence_pool(chapters: list[Chapter]) -> list[tuple[int, str]]:
    low, high = NEXTSENT_TRUE_CHARS
    return [(ch.number, s) for ch in chapters for para in ch.paragraphs for s in split_sentences(para)
            if low <= len(s) <= high * NEXTSENT_LENGTH_RATIO]


def _nextsent_record(chapter: Chapter, index: int, pool: list[tuple[int, str]], rng: random.Random) -> dict | None:
    sentences = split_sentences(chapter.paragraphs[index])
    if len(sentences) < 3:
        return None
    k = rng.randrange(2, len(sentences))
    true = sentences[k]
    if not NEXTSENT_TRUE_CHARS[0] <= len(true) <= NEXTSENT_TRUE_CHARS[1]:
        return None
    context = sentences[:k]
    while len(context) > 1 and len(" ".join(context)) > NEXTSENT_CONTEXT_CHARS:
        context = context[1:]
    candidates = sorted({s for ch, s in pool if abs(ch - chapter.number) > 1 and s != true
                         and 1 / NEXTSENT_LENGTH_RATIO <= len(s) / len(true) <= NEXTSENT_LENGTH_RATIO})
    if len(candidates) < N_DISTRACTORS:
        return None
    choices = rng.sample(candidates, N_DISTRACTORS) + [true]
    rng.shuffle(choices)
    return {"chapter": chapter.number, "paragraph": index, "context": " ".join(context),
            "choices": choices, "label": choices.index(true)}


def build_nextsent_docs(chapters: list[Chapter]) -> list[dict]:
    """Multiple choice: the true next sentence vs three similar-length sentences >= 2 chapters away.

    At most one item per paragraph (the position of the true sentence is drawn with a fixed
    seed); the first NEXTSENT_MAX_DOCS items after a seeded shuffle are kept.
    """
    rng = random.Random(f"{SEED}:nextsent")
    pool = _sentence_pool(chapters)
    records = [rec for ch in chapters for i in range(len(ch.paragraphs))
               if (rec := _nextsent_record(ch, i, pool, rng)) is not None]
    return _shuffled(records, "nextsent")[:NEXTSENT_MAX_DOCS]


# task name -> builder; the file each task's YAML reads is data/<task>.jsonl
BUILDERS = {
    "persuasion_ppl": build_ppl_docs,
    "persuasion_lastword": build_lastword_docs,
    "persuasion_nextsent": build_nextsent_docs,
}


def build_all(text: str) -> dict[str, list[dict]]:
    """Records of every local task, from the novel's text."""
    chapters = split_chapters(text)
    return {name: build(chapters) for name, build in BUILDERS.items()}


def write_task_data(records: dict[str, list[dict]], text: str, out: Path) -> dict[str, int]:
    """Write data/<task>.jsonl per task plus SOURCE.json (the novel's sha256 and doc counts).

    Args:
        records: from `build_all`.
        text: the novel the records were built from.
        out: destination folder (created).

    Returns:
        Number of docs per task.
    """
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, recs in records.items():
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in recs]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[name] = len(recs)
    source = {"text": "persuasion.txt", "sha256": text_sha256(text), "seed": SEED, "docs": counts,
              "built_by": "scripts/build_eval_tasks.py"}
    (out / "SOURCE.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return counts
