"""Calibration stage: document rules, sampling semantics, determinism, every bad-input message, the stage I/O."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from core.errors import ConfigError, InputError
from core.schema import CalibConfig
from stages import calib_sources as src
from stages.calibrate import (
    CALIB_FILE, SAMPLES_FILE, check_context, draw_calibration, is_repetitive, load_calibration, preflight,
    sample_calibration,
)

HELDOUT_WORDS = ("Kellynch", "Wentworth", "Uppercross", "Musgrove")  # names found only in Persuasion


class IntTokenizer:
    """Whitespace-separated integers -> those integers as token ids (exact, dependency-free expectations)."""

    def __init__(self, bos_token_id: int | None = 999):
        self.bos_token_id = bos_token_id
        self.calls = 0

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict:
        assert add_special_tokens is False  # the stage adds BOS itself, never the tokenizer
        self.calls += 1
        return {"input_ids": [int(w) for w in text.split()]}


def doc(start: int, length: int) -> str:
    return " ".join(str(start + i) for i in range(length))


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.to(torch.int32).numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def smol_tok(tiny_store):
    """SmolLM2's tokenizer (the tiny random model ships it)."""
    from core.models import load_tokenizer

    return load_tokenizer(_tiny_handle(tiny_store))


def _tiny_handle(store: Path):
    from conftest import compose_config
    from pipeline.models import prepare_model
    from core.store import ArtifactStore

    cfg, _ = compose_config(["model=tiny_random"])
    return prepare_model(cfg.model, ArtifactStore(store), log=lambda m: None)


@pytest.fixture(scope="module")
def austen_docs():
    return src.load_austen_documents(CalibConfig())


# -- documents ------------------------------------------------------------------------------

def test_chapter_rule_splits_at_headings_and_drops_volume_lines():
    text = "TITLE\n\nBy Someone\n\nVOLUME I\n\nCHAPTER I\n\nFirst para.\n\nSecond para.\n\nChapter 2.\n\nThird.\n" \
           "\nVOLUME II\n\nCHAPTER III\n\nFourth. See chapter 4 and Chapter IV of it.\n"
    assert src.split_chapters(text) == ["TITLE\n\nBy Someone", "First para.\n\nSecond para.", "Third.",
                                         "Fourth. See chapter 4 and Chapter IV of it."]
    assert src.split_chapters("no headings\n\nat all\n") == ["no headings\n\nat all"]
    assert src.split_paragraphs("a b\n\n\n c\n  \nd\n") == ["a b", "c", "d"]
    assert src.split_file("\n a \n\n b \n") == ["a \n\n b"]


def test_austen_corpus_is_four_novels_by_chapter_without_persuasion(austen_docs):
    assert sorted(p.name for p in src.AUSTEN_DIR.glob("*.txt")) == sorted(src.AUSTEN_FILES)
    assert src.HELDOUT_TEXT.is_file() and src.HELDOUT_TEXT.parent != src.AUSTEN_DIR
    # 55 + 48 + 61 + 50 chapters, plus one title page per novel
    assert len(austen_docs) == 214 + 4
    counts = {name: sum(d.origin.startswith(name + "#") for d in austen_docs) for name in src.AUSTEN_FILES}
    assert counts == {"emma.txt": 56, "mansfieldpark.txt": 49, "prideprejudice.txt": 62, "sensesensibility.txt": 51}
    assert austen_docs[1].text.startswith("Emma Woodhouse, handsome, clever, and rich")
    assert not any(w in d.text for d in austen_docs for w in HELDOUT_WORDS)
    assert not any("CHAPTER" in d.text.splitlines()[0] or d.text.startswith("VOLUME") for d in austen_docs)
    assert all(w in src.HELDOUT_TEXT.read_text() for w in HELDOUT_WORDS)


def test_text_source_reads_files_and_folders_in_sorted_order(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("Chapter 1\n\nbee one\n\nChapter 2\n\nbee two\n")
    (tmp_path / "corpus" / "sub" / "a.txt").write_text("alpha\n")
    (tmp_path / "corpus" / "skip.md").write_text("not a txt file\n")
    (tmp_path / "single.dat").write_text("given directly\r\nwith CRLF\r\n")
    cfg = CalibConfig(source="text", paths=[str(tmp_path / "corpus"), str(tmp_path / "single.dat")])
    docs = src.load_documents(cfg)
    folder = str(tmp_path / "corpus")
    assert [(d.origin, d.text) for d in docs] == [
        (f"{folder}/b.txt#0", "bee one"), (f"{folder}/b.txt#1", "bee two"), (f"{folder}/sub/a.txt#0", "alpha"),
        (f"{tmp_path}/single.dat#0", "given directly\nwith CRLF")]
    assert [d.text for d in src.load_documents(replace(cfg, text_split="file"))][:2] == [
        "Chapter 1\n\nbee one\n\nChapter 2\n\nbee two", "alpha"]


def test_jsonl_source_reads_the_named_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "content": "first doc"}\n\n{"id": 2, "content": "  "}\n{"id": 3, "content": "third"}\n')
    docs = src.load_documents(CalibConfig(source="jsonl", paths=[str(path)], text_field="content"))
    assert [(d.origin, d.text) for d in docs] == [(f"{path}:1", "first doc"), (f"{path}:4", "third")]


def _local_dataset(tmp_path: Path, monkeypatch, rows: list[dict]) -> Path:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def test_hub_source_goes_through_datasets_load_dataset(tmp_path, monkeypatch):
    rows = [{"body": doc(100 * i, 5 + 10 * i), "title": f"t{i}"} for i in range(6)] + [{"body": "", "title": "e"}]
    folder = _local_dataset(tmp_path, monkeypatch, rows)
    calls = []
    import datasets

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    cfg = CalibConfig(source="hub", dataset=str(folder), split="train", text_field="body", nsamples=3, seqlen=30)
    docs = src.load_documents(cfg)
    assert calls == [((str(folder), None), {"split": "train", "data_files": None})]
    assert [d.text for d in docs] == [r["body"] for r in rows[:6]]
    assert docs[2].origin == "my_dataset[2]"
    ids = sample_calibration([d.text for d in docs], IntTokenizer(), cfg)
    # documents 3, 4, 5 are the only ones with >= 30 tokens; each row is the prefix of one of them
    assert sorted(int(r[0]) for r in ids) == [300, 400, 500]
    assert all(torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 30)) for r in ids)


# -- sampling semantics ---------------------------------------------------------------------

LENGTHS = [5, 20, 30, 8, 40, 12, 25]  # seqlen 10: documents 0 and 3 are too short


def _int_corpus() -> list[str]:
    return [doc(1000 * i, n) for i, n in enumerate(LENGTHS)]


def test_doc_prefix_takes_first_tokens_of_long_documents_in_seeded_order():
    tok = IntTokenizer()
    cfg = CalibConfig(nsamples=5, seqlen=10, seed=7)
    sample = draw_calibration(_int_corpus(), tok, cfg)
    order = list(range(len(LENGTHS)))
    random.Random(7).shuffle(order)
    expected_docs = [i for i in order if LENGTHS[i] >= 10][:5]
    assert sample.rows_document == expected_docs
    assert torch.equal(sample.input_ids, torch.stack([torch.arange(1000 * i, 1000 * i + 10) for i in expected_docs]))
    assert sample.input_ids.dtype == torch.int64
    examined = order[:order.index(expected_docs[-1]) + 1]
    assert sample.documents_examined == len(examined) == tok.calls  # tokenized lazily, stops when done
    assert sample.documents_too_short == sum(LENGTHS[i] < 10 for i in examined)
    assert sample.documents == 7 and sample.samples_repetitive == 0


def test_doc_prefix_drops_short_and_repetitive_documents():
    sevens = [" ".join(["7"] * k + [str(i) for i in range(20, 34)]) for k in (7, 6)]  # of the first 12 tokens
    texts = [doc(0, 20), sevens[0], doc(50, 11), doc(100, 20)]
    sample = draw_calibration(texts, IntTokenizer(), CalibConfig(nsamples=2, seqlen=12, seed=1))
    assert sorted(sample.rows_document) == [0, 3]
    order = list(range(4))
    random.Random(1).shuffle(order)
    examined = order[:max(order.index(0), order.index(3)) + 1]
    assert (sample.documents_examined, sample.documents_too_short, sample.samples_repetitive) == (
        len(examined), int(2 in examined), int(1 in examined))
    sample = draw_calibration(texts, IntTokenizer(), CalibConfig(nsamples=2, seqlen=12, seed=2))
    assert (sorted(sample.rows_document), sample.documents_examined, sample.documents_too_short,
            sample.samples_repetitive) == ([0, 3], 4, 1, 1)  # seed 2 visits documents 1 and 2 first
    texts[1] = sevens[1]  # 6 of 12 is not more than half: kept
    sample = draw_calibration(texts, IntTokenizer(), CalibConfig(nsamples=3, seqlen=12, seed=1))
    assert sorted(sample.rows_document) == [0, 1, 3] and sample.samples_repetitive == 0
    assert is_repetitive([3] * 5 + [1, 2, 4, 5]) and not is_repetitive([3] * 4 + [1, 2, 4, 5])


def test_doc_prefix_with_bos_fills_the_rest_with_text():
    ids = sample_calibration(_int_corpus(), IntTokenizer(bos_token_id=999), CalibConfig(nsamples=5, seqlen=10,
                                                                                        add_bos=True))
    assert ids.shape == (5, 10) and (ids[:, 0] == 999).all()
    assert all(torch.equal(r[1:], torch.arange(int(r[1]), int(r[1]) + 9)) and int(r[1]) % 1000 == 0 for r in ids)


def test_random_window_slices_the_joined_corpus_at_seeded_starts():
    texts = _int_corpus()
    corpus = torch.tensor([t for text in texts for t in IntTokenizer()(text, False)["input_ids"]])
    cfg = CalibConfig(mode="random_window", nsamples=50, seqlen=10, seed=3)
    sample = draw_calibration(texts, IntTokenizer(), cfg)
    rng = random.Random(3)
    assert sample.rows_start == [rng.randint(0, len(corpus) - 10) for _ in range(50)]
    assert torch.equal(sample.input_ids, torch.stack([corpus[s:s + 10] for s in sample.rows_start]))
    assert sample.corpus_tokens == sum(LENGTHS) == len(corpus)
    # windows cross document borders and use short documents too (unlike doc_prefix)
    assert any(len({int(t) // 1000 for t in row}) > 1 for row in sample.input_ids)
    assert {int(t) // 1000 for t in sample.input_ids.flatten()} == set(range(len(LENGTHS)))
    assert sample.documents_used == len(LENGTHS)
    for seed in range(5):
        one = draw_calibration(texts, IntTokenizer(), replace(cfg, nsamples=2, seed=seed))
        assert one.documents_used == len({int(t) // 1000 for t in one.input_ids.flatten()})
    bos = sample_calibration(texts, IntTokenizer(999), replace(cfg, add_bos=True))
    assert (bos[:, 0] == 999).all() and all(torch.equal(r[1:], corpus[s:s + 9]) for r, s in zip(bos, sample.rows_start))


def test_random_window_puts_a_blank_line_between_documents(smol_tok):
    texts = ["alpha beta gamma", "delta epsilon"]
    sample = draw_calibration(texts, smol_tok, CalibConfig(mode="random_window", nsamples=6, seqlen=4))
    expected = smol_tok("alpha beta gamma", add_special_tokens=False)["input_ids"] + \
        smol_tok("\n\n", add_special_tokens=False)["input_ids"] + smol_tok("delta epsilon", add_special_tokens=False)["input_ids"]
    assert sample.corpus_tokens == len(expected)
    assert all(row.tolist() == expected[s:s + 4] for row, s in zip(sample.input_ids, sample.rows_start))


# -- determinism ----------------------------------------------------------------------------

# sha256 of the int32 bytes. They pin the sampling algorithm and its random.Random streams (the same on
# every platform and Python 3 version) and, for Austen, SmolLM2's tokenizer: any machine must reproduce them.
GOLDEN_INT = {"doc_prefix": "08ea2cfdfb29bbd5440abec721a6b152af17068b468f055ce9b5ff1214e58989",
              "random_window": "7820278f3aff328f6610371e112faf24359479784f335d9dfaad1be643976481"}
GOLDEN_AUSTEN = {"doc_prefix": "926e36d53bedd66ef3b8755035a243a8e4662536300878a8663c8dfc4800c813",
                 "random_window": "97bc84be965ab777d36aa85cd6089777a67da7097b94cb5e142a1199e804d828"}


@pytest.mark.parametrize("mode", ["doc_prefix", "random_window"])
def test_same_config_gives_identical_bytes_and_seed_changes_them(mode):
    cfg = CalibConfig(mode=mode, nsamples=5, seqlen=10, seed=11)
    first = digest(sample_calibration(_int_corpus(), IntTokenizer(), cfg))
    assert first == GOLDEN_INT[mode]
    assert first == digest(sample_calibration(_int_corpus(), IntTokenizer(), cfg))
    assert first != digest(sample_calibration(_int_corpus(), IntTokenizer(), replace(cfg, seed=12)))


@pytest.mark.parametrize("mode", ["doc_prefix", "random_window"])
def test_austen_samples_are_byte_identical_to_the_golden_hash(mode, smol_tok, austen_docs):
    cfg = CalibConfig(mode=mode, nsamples=8, seqlen=64, seed=42, add_bos=True)
    ids = sample_calibration([d.text for d in austen_docs], smol_tok, cfg)
    assert digest(ids) == GOLDEN_AUSTEN[mode]
    assert (ids[:, 0] == smol_tok.bos_token_id).all() and smol_tok.bos_token == "<|im_start|>"


def test_no_sample_reaches_the_heldout_novel(smol_tok, austen_docs):
    joined = "\n\n".join(d.text for d in austen_docs)
    for mode in ("doc_prefix", "random_window"):
        cfg = CalibConfig(mode=mode, nsamples=48, seqlen=128)
        for row in sample_calibration([d.text for d in austen_docs], smol_tok, cfg):
            text = smol_tok.decode(row.tolist())
            assert text in joined  # every sample is a span of the four calibration novels...
            assert not any(w in text for w in HELDOUT_WORDS)  # ...and none of Persuasion


# -- bad input: one clear message each ----------------------------------------------------------

def _raises(exc_type, parts, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    for part in parts:
        assert part in str(info.value), str(info.value)
    return str(info.value)


def test_missing_empty_and_wrong_paths(tmp_path):
    load = src.load_documents
    _raises(ConfigError, ["calib.paths=[] is required when calib.source=text", "calib.paths=[/data/my_corpus]"],
            load, CalibConfig(source="text"))
    _raises(ConfigError, [f"calib.paths={tmp_path}/nope.txt does not exist", "check the path"],
            load, CalibConfig(source="text", paths=[str(tmp_path / "nope.txt")]))
    (tmp_path / "empty.txt").write_text(" \n\n")
    _raises(ConfigError, [f"calib.paths={tmp_path}/empty.txt is empty"],
            load, CalibConfig(source="text", paths=[str(tmp_path / "empty.txt")]))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.md").write_text("text")
    _raises(ConfigError, [f"calib.paths={tmp_path}/folder contains no .txt files", "searched recursively"],
            load, CalibConfig(source="text", paths=[str(tmp_path / "folder")]))
    _raises(ConfigError, [f"calib.paths={tmp_path}/folder contains no .jsonl files"],
            load, CalibConfig(source="jsonl", paths=[str(tmp_path / "folder")]))
    (tmp_path / "empty.jsonl").write_text("\n")
    _raises(ConfigError, ["empty.jsonl is empty"], load,
            CalibConfig(source="jsonl", paths=[str(tmp_path / "empty.jsonl")]))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n")
    _raises(InputError, [f"calib: calib.paths=[{tmp_path}/blank] holds no text"], load,
            CalibConfig(source="text", paths=[str(tmp_path / "blank")]))
    _raises(ConfigError, ["calib.paths=[/x] is not used by calib.source=austen", "calib=text"],
            load, CalibConfig(source="austen", paths=["/x"]))
    _raises(ConfigError, ["calib.dataset=wikitext is not used by calib.source=text"],
            load, CalibConfig(source="text", paths=["/x"], dataset="wikitext"))


def test_the_heldout_novel_is_refused_as_calibration_text(tmp_path):
    copy = tmp_path / "mine" / "book.txt"
    copy.parent.mkdir()
    shutil.copy(src.HELDOUT_TEXT, copy)
    for given in (str(src.HELDOUT_TEXT), str(src.HELDOUT_DIR), str(copy.parent)):
        _raises(ConfigError, ["is the held-out evaluation text", "leave persuasion.txt out"],
                src.load_documents, CalibConfig(source="text", paths=[given]))


def test_jsonl_errors_name_the_line_and_the_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"title": "a", "body": "b", "n": 3}\n')
    _raises(ConfigError, ["calib.text_field=text is not a field of the JSONL records",
                          f"{path}:1 has fields: title, body, n", "e.g. calib.text_field=title"],
            src.load_documents, CalibConfig(source="jsonl", paths=[str(path)]))
    _raises(ConfigError, ["calib.text_field=n is not text (int)", "has fields: title, body)"],
            src.load_documents, CalibConfig(source="jsonl", paths=[str(path)], text_field="n"))
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    _raises(InputError, [f"{path}:2 is not valid JSON", "one JSON object"],
            src.load_documents, CalibConfig(source="jsonl", paths=[str(path)]))


def test_hub_errors_list_the_dataset_fields_and_explain_offline(tmp_path, monkeypatch):
    folder = _local_dataset(tmp_path, monkeypatch, [{"content": "x y", "meta": 1}])
    _raises(ConfigError, [f"calib.text_field=text is not a field of the dataset (dataset {folder} has fields: "
                          "content, meta)", "e.g. calib.text_field=content"],
            src.load_documents, CalibConfig(source="hub", dataset=str(folder)))
    _raises(ConfigError, ["calib.text_field=meta is not a text field", "has fields: content)"],
            src.load_documents, CalibConfig(source="hub", dataset=str(folder), text_field="meta"))
    _raises(InputError, [f"calib.dataset={folder} (config None, split test) could not be loaded", "Unknown split"],
            src.load_documents, CalibConfig(source="hub", dataset=str(folder), split="test", text_field="content"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _raises(InputError, ["calib.dataset=no-such-org/no-such-dataset", "add run.offline=false", "calib=austen"],
            src.load_documents, CalibConfig(source="hub", dataset="no-such-org/no-such-dataset"))
    _raises(ConfigError, ["calib.dataset=None is required when calib.source=hub", "calib=pile10k"],
            src.load_documents, CalibConfig(source="hub"))


def test_too_few_documents_says_how_many_and_what_to_change():
    msg = _raises(ConfigError, ["calib.nsamples=6 is more than the corpus can give (only 5 usable: 7 documents, "
                                "2 shorter than 10 tokens (calib.seqlen=10), 0 repetitive)",
                                "lower calib.nsamples or calib.seqlen", "calib.mode=random_window"],
                  sample_calibration, _int_corpus(), IntTokenizer(), CalibConfig(nsamples=6, seqlen=10))
    assert msg.endswith("or calibrate on more text (docs/calibration.md)")
    _raises(ConfigError, ["calib.seqlen=200 is longer than the whole corpus (the joined corpus of 7 documents has "
                          "only 140 tokens, fewer than one window of 199)", "lower calib.seqlen or calibrate on more text"],
            sample_calibration, _int_corpus(), IntTokenizer(),
            CalibConfig(mode="random_window", seqlen=200, add_bos=True))
    _raises(InputError, ["random windows were repetitive"], sample_calibration, ["5 " * 100], IntTokenizer(),
            CalibConfig(mode="random_window", nsamples=2, seqlen=10))


def test_add_bos_needs_a_bos_token():
    _raises(ConfigError, ["calib.add_bos=True cannot be used (false for this tokenizer: it defines no BOS token)"],
            sample_calibration, _int_corpus(), IntTokenizer(bos_token_id=None),
            CalibConfig(nsamples=2, seqlen=10, add_bos=True))


def test_seqlen_longer_than_the_model_context(tiny_store):
    handle = _tiny_handle(tiny_store)
    check_context(CalibConfig(seqlen=2048), handle)
    _raises(ConfigError, ["calib.seqlen=4096 is longer than the model's context (at most the model's context: "
                          "max_position_embeddings=2048 for tiny-random-llama)", "e.g. calib.seqlen=2048"],
            check_context, CalibConfig(seqlen=4096), handle)


def test_field_rules_reject_bad_calib_values():
    from pipeline.validate import check_field

    _raises(ConfigError, ["calib.text_split=chapters is not supported (choose from chapter, paragraph, file)",
                          "did you mean chapter"], check_field, "calib.text_split", "chapters")
    _raises(ConfigError, ["calib.mode=windows", "choose from doc_prefix, random_window"],
            check_field, "calib.mode", "windows")
    _raises(ConfigError, ["calib.seed=-1 is not supported (an integer >= 0)"], check_field, "calib.seed", -1)
    _raises(ConfigError, ["calib.text_field= is not supported (a non-empty string)"],
            check_field, "calib.text_field", "")


PRESET_SOURCES = {"austen": "austen", "pile10k": "hub", "wikitext": "hub", "c4": "hub", "text": "text", "jsonl": "jsonl"}


@pytest.mark.parametrize("preset", sorted(PRESET_SOURCES))
def test_every_calib_preset_composes_and_validates(compose, preset, tmp_path):
    from pipeline.validate import validate_config

    cfg, _ = compose([f"calib={preset}", f"run.outputs_dir={tmp_path}"])
    validate_config(cfg)
    assert cfg.calib.source == PRESET_SOURCES[preset]
    if preset == "pile10k":
        assert (cfg.calib.dataset, cfg.calib.split, cfg.calib.mode) == ("NeelNanda/pile-10k", "train", "doc_prefix")


# -- the stage ----------------------------------------------------------------------------------

def _runner(compose, overrides):
    from pipeline.runner import PipelineRunner
    from pipeline.runtime import Runtime

    cfg, _ = compose(overrides + ["run.stages=[calibrate]"])
    return PipelineRunner(cfg, Runtime(device="cpu", dtype_name="float32", log=lambda m: None)), cfg


def test_stage_writes_int32_samples_manifest_and_origins(compose, tiny_overrides, smol_tok, austen_docs):
    from safetensors import safe_open

    runner, cfg = _runner(compose, tiny_overrides)
    (outcome,) = runner.run()
    assert outcome.status == "ran"
    with safe_open(str(outcome.path / CALIB_FILE), "pt") as f:
        assert list(f.keys()) == ["input_ids"] and f.get_tensor("input_ids").dtype == torch.int32
    ids = load_calibration(outcome.path)
    expected = draw_calibration([d.text for d in austen_docs], smol_tok, cfg.calib)
    assert ids.shape == (8, 32) and torch.equal(ids, expected.input_ids)
    metrics = json.loads((outcome.path / "manifest.json").read_text())["metrics"]
    keys = ("nsamples", "seqlen", "seed", "documents", "documents_used", "documents_too_short", "samples_repetitive")
    assert {k: metrics[k] for k in keys} == {
        "nsamples": 8, "seqlen": 32, "seed": 42, "documents": 218, "documents_used": 8,
        "documents_too_short": expected.documents_too_short, "samples_repetitive": 0}
    assert metrics["unique_tokens"] == len(set(ids.flatten().tolist()))
    origins = json.loads((outcome.path / SAMPLES_FILE).read_text())["samples"]
    assert [o["document"] for o in origins] == [austen_docs[i].origin for i in expected.rows_document]
    (again,) = _runner(compose, tiny_overrides)[0].run()
    assert again.status == "cached" and again.fingerprint == outcome.fingerprint


def test_bad_input_fails_in_preflight_before_any_stage_runs(compose, tiny_overrides, tiny_outputs):
    runner, _ = _runner(compose, tiny_overrides + ["calib.nsamples=300", "calib.seqlen=1024"])
    _raises(ConfigError, ["calib.nsamples=300 is more than the corpus can give (only 213 usable: 218 documents, "
                          "5 shorter than 1024 tokens"], runner.run)
    assert not (tiny_outputs / "store" / "calibrate").exists()


def test_quickstart_calibration_is_fast(compose, tiny_overrides, tiny_store, smol_tok, austen_docs):
    """A calib twice the quickstart's (austen, 32 x 256, SmolLM2 tokenizer): lazy tokenization, quick checks."""
    import time

    cfg, _ = compose(tiny_overrides + ["calib.nsamples=32", "calib.seqlen=256"])
    sample = draw_calibration([d.text for d in austen_docs], smol_tok, cfg.calib)
    # every chapter has >= 256 tokens: exactly 32 documents are tokenized (unless a title page comes first)
    assert sample.documents_used == 32 and sample.documents_examined == 32 + sample.documents_too_short
    assert sample.documents_too_short <= 4
    t0 = time.perf_counter()
    preflight(cfg, _tiny_handle(tiny_store))
    assert time.perf_counter() - t0 < 30  # ~1.5 s on an idle 2-core CPU; loose for a loaded machine


def test_source_identity_changes_when_local_text_changes(tmp_path):
    austen = src.source_identity(CalibConfig())["austen"]
    assert sorted(austen) == sorted(src.AUSTEN_FILES) and all(len(h) == 64 for h in austen.values())
    path = tmp_path / "a.txt"
    path.write_text("one")
    cfg = CalibConfig(source="text", paths=[str(tmp_path)])
    before = src.source_identity(cfg)
    path.write_text("one two")
    assert src.source_identity(cfg) != before and list(before["files"]) == [f"{tmp_path}/a.txt"]
    assert src.source_identity(CalibConfig(source="hub", dataset="x")) == {}
