from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import DATA

from qlora_sft import data
from qlora_sft.data import BadRow, Example, build_data, mark_trained, mix, normalize_row, tokenize_example
from qlora_sft.errors import DataError
from qlora_sft.model import ensure_pad_token
from qlora_sft.recipe import DataConfig, DataSource


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def cfg(*paths: str | DataSource, **kw) -> DataConfig:
    sources = tuple(p if isinstance(p, DataSource) else DataSource(path=str(p)) for p in paths)
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(sources=sources, **kw)


EXPECTED_FIRST = {
    "alpaca.jsonl": (
        "alpaca",
        [
            {"role": "user", "content": "What is the colour of the sky?"},
            {"role": "assistant", "content": "The sky is blue."},
        ],
    ),
    "dolly.jsonl": (
        "dolly",
        [{"role": "user", "content": "What colour is grass?"}, {"role": "assistant", "content": "Grass is green."}],
    ),
    "sharegpt.json": (
        "sharegpt",
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    ),
    "messages.jsonl": (
        "messages",
        [
            {"role": "user", "content": "What is the colour of snow?"},
            {"role": "assistant", "content": "Snow is white."},
        ],
    ),
    "prompt_completion.jsonl": (
        "prompt_completion",
        [{"role": "user", "content": "Reverse: a b c"}, {"role": "assistant", "content": "c b a"}],
    ),
    "mixed.csv": ("alpaca", [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FIRST))
def test_every_format_is_detected_and_normalised(name: str):
    fmt, messages = EXPECTED_FIRST[name]
    per_source, reports = data.load_examples([DataSource(path=str(DATA / name))], "error")
    assert reports[0].format == fmt
    assert per_source[0][0].messages == messages
    assert reports[0].rows == reports[0].kept == len(per_source[0])


def test_format_details():
    # alpaca input is appended to the instruction; sharegpt aliases map to roles
    rows = data.load_examples([DataSource(path=str(DATA / "alpaca.jsonl"))], "error")[0][0]
    assert rows[1].messages[0]["content"] == "Translate to French.\n\ncat"
    conv = data.load_examples([DataSource(path=str(DATA / "sharegpt.json"))], "error")[0][0][1].messages
    assert [m["role"] for m in conv] == ["user", "assistant", "user", "assistant"]
    msgs = data.load_examples([DataSource(path=str(DATA / "messages.jsonl"))], "error")[0][0][1].messages
    assert msgs[-1] == {"role": "assistant", "content": "chien"}  # content parts joined
    text = data.load_examples([DataSource(path=str(DATA / "text.jsonl"))], "error")[0][0][0]
    assert text.text == "alpha beta gamma delta" and text.messages is None
    # the format can be forced, and a system prompt added per source
    forced = data.load_examples(
        [DataSource(path=str(DATA / "dolly.jsonl"), format="dolly", system_prompt="S")], "error"
    )
    assert forced[0][0][0].messages[0] == {"role": "system", "content": "S"}


def test_parquet_and_save_to_disk(tmp_path: Path):
    import datasets

    ds = datasets.Dataset.from_list([json.loads(x) for x in (DATA / "alpaca.jsonl").read_text().splitlines()])
    ds.to_parquet(str(tmp_path / "a.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for path in ("a.parquet", "saved"):
        ex, rep = data.load_examples([DataSource(path=str(tmp_path / path))], "error")
        assert rep[0].format == "alpaca" and len(ex[0]) == 3


def test_missing_file_and_offline_hub_id_fail_clearly(monkeypatch):
    with pytest.raises(DataError, match="not found .*Fix `path:`"):
        data.load_examples([DataSource(path="no/such/file.jsonl")], "error")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="hub dataset failed.*looks offline"):
        data.load_examples([DataSource(path="someone/some-dataset")], "error")


def test_bad_rows_error_names_source_row_and_problem():
    with pytest.raises(DataError) as exc:
        data.load_examples([DataSource(path=str(DATA / "bad_rows.jsonl"), format="alpaca")], "error")
    msg = str(exc.value)
    assert "bad_rows.jsonl row 2: missing field `output`" in msg
    assert "data.on_bad_row=skip" in msg


def test_bad_rows_skip_counts_by_reason():
    ex, rep = data.load_examples([DataSource(path=str(DATA / "bad_rows.jsonl"), format="alpaca")], "skip")
    assert [e.row for e in ex[0]] == [1, 6]
    assert rep[0].skipped == {"missing_field": 1, "empty_assistant_turn": 1, "wrong_type": 1, "invalid_json": 1}
    ex, rep = data.load_examples([DataSource(path=str(DATA / "bad_roles.jsonl"))], "skip")
    assert len(ex[0]) == 1
    assert rep[0].skipped == {"roles_out_of_order": 1, "no_assistant_turn": 1, "unknown_role": 1}


def test_empty_dataset_is_an_error(tmp_path: Path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="has no rows"):
        build_data(cfg(empty), tok, 0)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"instruction": "x", "input": ""}\n')
    with pytest.raises(DataError, match="no training examples are left"):
        build_data(cfg(DataSource(path=str(only_bad), format="alpaca"), on_bad_row="skip"), tok, 0)


def test_assistant_only_mask_is_exact(tok):
    messages = [
        {"role": "user", "content": "What is the colour of the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
    ]
    t = tokenize_example(Example(messages, None, "x", 1), tok, 512, True)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    trained = [i for i, x in enumerate(t.labels) if x != -100]
    assert trained == list(range(n_prompt, len(t.input_ids)))
    assert tok.decode([t.input_ids[i] for i in trained]) == "The sky is blue.<|im_end|>\n"
    assert [t.labels[i] for i in trained] == [t.input_ids[i] for i in trained]
    # multi-turn: both assistant turns trained, the user turn between them not
    conv = [*messages, {"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Green."}]
    t2 = tokenize_example(Example(conv, None, "x", 1), tok, 512, True, keep_text=True)
    assert mark_trained(t2).count("[[") == 2
    assert "[[The sky is blue.<|im_end|>\n]]<|im_start|>user\nAnd grass?<|im_end|>\n" in mark_trained(t2)
    # assistant_only_loss=false trains everything
    t3 = tokenize_example(Example(messages, None, "x", 1), tok, 512, False)
    assert t3.labels == t3.input_ids


def test_text_rows_train_every_token_and_end_with_eos(tok):
    t = tokenize_example(Example(None, "alpha beta", "x", 1), tok, 512, True)
    assert t.input_ids[-1] == tok.eos_token_id and t.labels == t.input_ids


def test_truncation_is_counted_and_fully_truncated_rows_are_reported(tmp_path: Path, tok):
    rows = tmp_path / "long.jsonl"
    long_q = "alpha beta gamma " * 40
    rows.write_text(
        json.dumps({"instruction": "short", "input": "", "output": "x " * 80})
        + "\n"
        + json.dumps({"instruction": long_q, "input": "", "output": "y"})
        + "\n"
        + json.dumps({"instruction": "ok", "input": "", "output": "fine"})
        + "\n"
    )
    with pytest.raises(DataError, match="row 2: no trained tokens are left after truncation to data.max_length=48"):
        build_data(cfg(rows, max_length=48), tok, 0)
    prepared = build_data(cfg(rows, max_length=48, on_bad_row="skip"), tok, 0)
    assert prepared.report.truncated == 1 and prepared.report.dropped_no_loss == 1
    assert prepared.report.train_rows == 2 and prepared.report.tokens_max == 48


def test_eos_is_trained_in_every_example_and_pad_differs(tok):
    prepared = build_data(cfg(DATA / "alpaca.jsonl", DATA / "sharegpt.json", DATA / "messages.jsonl"), tok, 0)
    assert prepared.report.eos_trained_fraction == 1.0
    assert prepared.report.end_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"], strict=True):
        last = max(i for i, x in enumerate(labels) if x != -100)
        assert tok.eos_token_id in labels[last - 1 : last + 1], tok.decode(ids)


def test_pad_token_is_never_eos():
    from tiny import build_tokenizer

    t = build_tokenizer()
    t.pad_token = t.eos_token
    ensure_pad_token(t)
    assert t.pad_token == "<pad>" and t.pad_token_id != t.eos_token_id


def _ex(tag: str, n: int) -> list[Example]:
    return [Example(None, f"{tag}{i}", tag, i) for i in range(n)]


def test_mixing_by_weight_and_ratio_is_seeded():
    a, b = _ex("a", 100), _ex("b", 40)
    mixed, counts = mix([a, b], [DataSource(path="a", weight=0.5), DataSource(path="b", weight=2.0)], seed=1)
    assert counts == [50, 80] and len(mixed) == 130
    assert sum(e.source == "b" for e in mixed) == 80 and len({e.text for e in mixed if e.source == "a"}) == 50
    again, _ = mix([a, b], [DataSource(path="a", weight=0.5), DataSource(path="b", weight=2.0)], seed=1)
    assert [e.text for e in again] == [e.text for e in mixed]
    other, _ = mix([a, b], [DataSource(path="a", weight=0.5), DataSource(path="b", weight=2.0)], seed=2)
    assert [e.text for e in other] != [e.text for e in mixed]
    # ratios: the largest mix without repetition: b (40 rows) limits to 40 / 0.25 = 160 -> 120 a + 40 b
    # but a has only 100 rows, so a limits: 100 / 0.75 = 133 -> 100 a + 33 b
    mixed, counts = mix([a, b], [DataSource(path="a", ratio=0.75), DataSource(path="b", ratio=0.25)], seed=1)
    assert counts == [100, 33]


def test_eval_split_by_fraction_and_by_source(tok):
    prepared = build_data(
        cfg(DATA / "alpaca.jsonl", DATA / "dolly.jsonl", DATA / "messages.jsonl", eval_fraction=0.3), tok, 0
    )
    assert prepared.report.train_rows == 5 and prepared.report.eval_rows == 2
    prepared = build_data(
        DataConfig(
            sources=(DataSource(path=str(DATA / "alpaca.jsonl")),),
            eval_sources=(DataSource(path=str(DATA / "dolly.jsonl")),),
        ),
        tok,
        0,
    )
    assert prepared.report.train_rows == 3 and prepared.report.eval_rows == 2


def test_named_chat_templates(tok):
    import copy

    from qlora_sft.data import set_chat_template

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    for name, expect in {
        "llama2": "<|im_start|>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ [/INST][[ A <|im_end|>]]",
        "alpaca": "S\n\n### Instruction:\nQ\n\n### Response:\n[[A<|im_end|>\n\n]]",
        "chatml": "<|im_start|>assistant\n[[A<|im_end|>\n]]",
    }.items():
        t = copy.deepcopy(tok)
        set_chat_template(t, name, "tiny")
        out = mark_trained(tokenize_example(Example(messages, None, "x", 1), t, 512, True, keep_text=True))
        assert expect in out, (name, out)
    t = copy.deepcopy(tok)
    t.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        set_chat_template(t, "auto", "tiny")


def test_prepare_data_caches_for_other_ranks(tmp_path: Path, tok):
    c = cfg(DATA / "alpaca.jsonl", DATA / "dolly.jsonl")
    first = data.prepare_data(c, tok, 0, tmp_path / "cache")
    folders = list((tmp_path / "cache").glob("data-*"))  # beside them: the memo of the files' digests
    assert len(folders) == 1 and (folders[0] / "report.json").is_file()
    again = data.prepare_data(c, tok, 0, tmp_path / "cache")
    assert again.train["input_ids"] == first.train["input_ids"]
    assert again.report.to_dict() == first.report.to_dict()
    # a different recipe gets a different cache entry
    data.prepare_data(cfg(DATA / "alpaca.jsonl", DATA / "dolly.jsonl", max_length=100), tok, 0, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("data-*"))) == 2


def test_a_rank_reads_the_data_files_digests_from_its_nodes_main_process(tmp_path: Path, tok, monkeypatch):
    """Was: since the cache key holds content digests, every rank read every data file at start-up.
    A rank that is not its node's main process waits for the memo the main process writes and reads
    nothing; where the memo never holds the files (changed a moment ago, a cache root it cannot
    write), it gives up after its wait and reads them itself, without hanging."""
    import threading
    import time

    from qlora_sft import launch
    from qlora_sft.data import cache

    monkeypatch.setattr(cache, "RACY_NS", 0)
    read: list[tuple[str, Path]] = []
    digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p: read.append((threading.current_thread().name, p)) or digest(p))
    f = tmp_path / "rows.jsonl"
    f.write_text((DATA / "alpaca.jsonl").read_text())
    root = tmp_path / "cache"
    c = cfg(f)

    class State:  # the node's main process runs in the thread named "main-process", another rank here
        @property
        def is_local_main_process(self) -> bool:
            return threading.current_thread().name == "main-process"

    monkeypatch.setattr(launch, "distributed_state", lambda *a, **k: State())
    built: list[data.PreparedData] = []
    main = threading.Thread(
        name="main-process", target=lambda: (time.sleep(1.5), built.append(data.prepare_data(c, tok, 0, root)))
    )
    main.start()  # starts late: the other rank waits for the digests, then for the cache
    other = data.prepare_data(c, tok, 0, root)
    main.join()
    assert read == [("main-process", f.resolve())]  # read once, by the node's main process
    assert built and other.cache == built[0].cache and other.train["input_ids"] == built[0].train["input_ids"]
    read.clear()

    # no main process ever writes the memo: the wait ends and the rank reads the file itself
    monkeypatch.setattr(cache, "DIGEST_WAIT_MIN_S", 0.3)
    started = time.monotonic()
    assert not cache.wait_for_digests(c, None, tmp_path / "nobody", poll=0.1)
    assert 0.3 <= time.monotonic() - started < 5
    assert cache.cache_folder(c, tok, 0, tmp_path / "nobody", None).name == Path(other.cache).name
    assert [p for _, p in read] == [f.resolve()]


def test_a_same_size_edit_with_its_modification_time_restored_is_not_served_from_the_cache(
    tmp_path: Path, tok, monkeypatch
):
    """Was: the cache key held each data file's size and modification time, so an edit of the same
    size whose time was set back (`touch -r`, `cp -p` of an edited file, tools that keep it) reused
    the old cache and trained on the old rows."""
    import os

    from qlora_sft.data import cache

    f = tmp_path / "rows.jsonl"
    for racy_ns in (getattr(cache, "RACY_NS", 1), 0):  # 0: digests memoised at once (no window for racy times)
        monkeypatch.setattr(cache, "RACY_NS", racy_ns, raising=False)
        f.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n")
        root = tmp_path / f"cache-{racy_ns}"
        first = data.prepare_data(cfg(f), tok, 0, root)
        assert "Blue." in tok.decode(first.train[0]["input_ids"])
        before = f.stat()
        f.write_text(json.dumps({"instruction": "Name a colour.", "input": "", "output": "Pink."}) + "\n")
        os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (f.stat().st_size, f.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        again = data.prepare_data(cfg(f), tok, 0, root)
        assert not again.found and again.cache != first.cache
        assert "Pink." in tok.decode(again.train[0]["input_ids"])


def test_a_parquet_file_edited_with_its_modification_time_restored_is_read_again(tmp_path: Path, tok, monkeypatch):
    """Was: parquet files were read with datasets' `Dataset.from_parquet`, which keeps an Arrow copy in
    the datasets cache under the file's path and modification time. The cache key saw the edit (its
    digest) and built a new cache, but read the old rows from that copy: trained on data that is no
    longer in the file, in silence."""
    import os

    import pandas as pd

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    f = tmp_path / "rows.parquet"
    pd.DataFrame({"instruction": ["Name a colour."] * 3, "output": ["Blue."] * 3}).to_parquet(f)
    first = data.prepare_data(cfg(f), tok, 0, tmp_path / "cache")
    assert "Blue." in tok.decode(first.train[0]["input_ids"])
    before = f.stat()
    pd.DataFrame({"instruction": ["Name a colour."] * 3, "output": ["Pink."] * 3}).to_parquet(f)
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    again = data.prepare_data(cfg(f), tok, 0, tmp_path / "cache")
    assert not again.found and again.cache != first.cache
    assert "Pink." in tok.decode(again.train[0]["input_ids"])


def test_data_file_digests_are_memoised_beside_the_cache(tmp_path: Path, tok, monkeypatch):
    """The cache key reads each data file once: its digest is kept beside the caches under the
    file's path, size, modification and change times and inode, and read from there while those hold.
    A memo that is cut off or corrupt is ignored (the files are read again)."""
    import os

    from qlora_sft.data import cache

    monkeypatch.setattr(cache, "RACY_NS", 0)
    read: list[Path] = []
    digest = cache.file_digest
    monkeypatch.setattr(cache, "file_digest", lambda p: read.append(p) or digest(p))
    f = tmp_path / "rows.jsonl"
    f.write_text((DATA / "alpaca.jsonl").read_text())
    root = tmp_path / "cache"
    first = data.prepare_data(cfg(f), tok, 0, root)
    assert read == [f.resolve()] and (root / cache.DIGEST_MEMO).is_file()
    read.clear()
    assert data.prepare_data(cfg(f), tok, 0, root).found and read == []  # not read again
    for broken in (b"", b'{"version": 1, "files": [[', b'{"version": 1, "files": [["x", 1]]}', b"[]", b"\xff\xfe"):
        (root / cache.DIGEST_MEMO).write_bytes(broken)
        read.clear()
        again = data.prepare_data(cfg(f), tok, 0, root)
        assert again.found and again.cache == first.cache and read == [f.resolve()]
    read.clear()
    assert data.prepare_data(cfg(f), tok, 0, root).found and read == []  # the memo was written anew
    assert not [p.name for p in root.iterdir() if "tmp" in p.name]  # written through a temporary file
    # the same bytes with a new modification time: read again, the same key, the cache is found
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**10))
    read.clear()
    assert data.prepare_data(cfg(f), tok, 0, root).cache == first.cache and read == [f.resolve()]
    # the checkpoint's record of the data takes its digests from the memo too
    read.clear()
    recorded = data.data_fingerprint(cfg(f), None, first.report, cache_root=root)
    assert read == [] and recorded["files"][0][3] == digest(f)


def test_normalize_rejects_non_mapping_rows():
    with pytest.raises(data.BadRow, match="row must be a mapping"):
        normalize_row(["a"], "alpaca")


def test_todays_templates_and_tool_calls_train_exactly_the_assistant_turns():
    """Qwen3's template renders earlier assistant turns without their <think> block, so the text up to
    an assistant turn is not a prefix of the whole conversation and rendering prefixes cannot find the
    turns. The spans come from `{% generation %}` markers instead: the template's own, or TRL's
    training variant of it (TRL ships Qwen3's and Llama 3's, used here as installed). Tool calls are
    trained, tool results never."""
    import trl

    from qlora_sft.data import marked_template

    templates = Path(trl.__file__).parent / "chat_templates"
    row = {
        "messages": [
            {"role": "user", "content": "What colour is the sky?"},
            {"role": "assistant", "content": "The sky is blue."},
            {"role": "user", "content": "What is 2 * 3?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": '{"a": 2, "b": 3}'}}],
            },
            {"role": "tool", "name": "multiply", "content": "6"},
            {"role": "assistant", "content": "It is 6."},
        ]
    }
    messages, _ = normalize_row(row, "messages")
    assert messages[3]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}
    from tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = (templates / "qwen3.jinja").read_text()
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert not whole.startswith(tok.apply_chat_template(messages[:2], tokenize=False))  # not prefix-preserving
    assert marked_template(tok) == (templates / "qwen3_training.jinja").read_text()
    marked = mark_trained(tokenize_example(Example(messages, None, "x", 1), tok, 4096, True, keep_text=True))
    trained = re.findall(r"\[\[(.*?)\]\]", marked, re.S)
    think = "<think>\n\n</think>\n\n"
    call = '<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    assert trained == [
        f"{think}The sky is blue.<|im_end|>\n",
        f"{think}{call}<|im_end|>\n",
        f"{think}It is 6.<|im_end|>\n",
    ]
    assert "<tool_response>\n6\n</tool_response>" in marked and "6\n</tool_response>]]" not in marked

    tok.chat_template = (templates / "llama3.jinja").read_text()
    plain = [*messages[:3], {"role": "assistant", "content": "Six."}]
    marked = mark_trained(tokenize_example(Example(plain, None, "x", 1), tok, 4096, True, keep_text=True))
    assert re.findall(r"\[\[(.*?)\]\]", marked, re.S) == ["The sky is blue.<|eot_id|>", "Six.<|eot_id|>"]


def test_tool_turns_are_checked():
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    for turns, reason in (
        ([{"role": "user", "content": "q"}, {"role": "tool", "content": "6"}], "roles_out_of_order"),
        ([{"role": "user", "content": "q"}, call, {"role": "assistant", "content": "a"}], "roles_out_of_order"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "empty_assistant_turn"),
        ([{"role": "user", "content": "q"}, {**call, "tool_calls": [{"function": {}}]}], "wrong_type"),
    ):
        with pytest.raises(BadRow) as exc:
            normalize_row({"messages": turns}, "messages")
        assert exc.value.reason == reason, turns
    ok, _ = normalize_row(
        {
            "messages": [
                {"role": "user", "content": "q"},
                call,
                {"role": "tool", "content": "6"},
                {"role": "assistant", "content": "a"},
            ]
        },
        "messages",
    )
    assert [m["role"] for m in ok] == ["user", "assistant", "tool", "assistant"]


def test_a_tokenizer_replaced_in_place_by_one_of_the_same_size_gets_its_own_cache(tmp_path: Path, tok):
    """The cache key held the tokenizer's name, size, template and special tokens, not what it does:
    a tokenizer.json edited in place (two tokens' ids swapped: the same size, the same specials) was
    served the other tokenizer's token ids from the cache."""
    from transformers import AutoTokenizer

    from qlora_sft.data import cache

    folder = tmp_path / "tok"
    tok.save_pretrained(str(folder))
    f = tmp_path / "rows.jsonl"
    f.write_text((DATA / "alpaca.jsonl").read_text())

    def key() -> str:
        t = AutoTokenizer.from_pretrained(str(folder))
        ensure_pad_token(t)
        return cache.cache_key(cfg(f), t, 0, None)

    first = key()
    assert key() == first  # the same files: the same key
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (w for w, i in vocab.items() if i in (100, 101))  # two tokens whose ids have as many digits
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    assert key() != first


def test_a_template_that_marks_no_answer_token_is_named_not_blamed_on_truncation(tmp_path: Path):
    """A chat template whose {% generation %} markers wrap nothing (the answer rendered after them):
    every row trains no token, and the error said "no trained tokens are left after truncation to
    data.max_length" for a row far shorter than max_length."""
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    t.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: "
        "{% if m['role'] == 'assistant' %}{% generation %}{% endgeneration %}{{ m['content'] + eos_token }}"
        "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"instruction": "ok", "input": "", "output": "fine"}) + "\n")
    with pytest.raises(DataError) as exc:
        build_data(cfg(rows, max_length=64), t, 0)
    message = str(exc.value)
    assert "row 1: no token of it is trained, and truncation is not why" in message, message
    assert "data.max_length=64" in message and "{% generation %}" in message and "truncation to" not in message


PC_PROMPT = [
    {"role": "user", "content": "What is the colour of the sky?"},
    {"role": "assistant", "content": "The sky is blue."},
    {"role": "user", "content": "And grass?"},
]
PC_COMPLETION = [{"role": "assistant", "content": "Green."}]


def _pc_examples(tmp_path: Path, rows: list[dict]) -> list[Example]:
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data.load_examples([DataSource(path=str(path), format="prompt_completion")], "error")[0][0]


def test_conversational_prompt_completion_trains_only_the_completion(tok, tmp_path):
    # TRL's completion_only_loss: an assistant turn inside a conversational prompt is context, not trained
    (ex,) = _pc_examples(tmp_path, [{"prompt": PC_PROMPT, "completion": PC_COMPLETION}])
    t = tokenize_example(ex, tok, 512, True, keep_text=True)
    assert re.findall(r"\[\[(.*?)\]\]", mark_trained(t), re.S) == ["Green.<|im_end|>\n"]
    # the same turns as a `messages` row train every assistant turn
    whole = tokenize_example(Example([*PC_PROMPT, *PC_COMPLETION], None, "x", 1), tok, 512, True, keep_text=True)
    assert re.findall(r"\[\[(.*?)\]\]", mark_trained(whole), re.S) == [
        "The sky is blue.<|im_end|>\n",
        "Green.<|im_end|>\n",
    ]
    assert t.input_ids == whole.input_ids
    # without keep_text, and through build_data, the same labels
    assert tokenize_example(ex, tok, 512, True).labels == t.labels
    path = tmp_path / "pc.jsonl"
    prepared = build_data(cfg(DataSource(path=str(path), format="prompt_completion")), tok, 0)
    assert prepared.train["input_ids"] == [t.input_ids] and prepared.train["labels"] == [t.labels]
    # a source's system prompt goes before the prompt's turns, and is counted with them
    src = DataSource(path=str(path), format="prompt_completion", system_prompt="Be brief.")
    (sys_ex,) = data.load_examples([src], "error")[0][0]
    assert sys_ex.prompt_turns == 4 and sys_ex.messages[0] == {"role": "system", "content": "Be brief."}
    marked = mark_trained(tokenize_example(sys_ex, tok, 512, True, keep_text=True))
    assert re.findall(r"\[\[(.*?)\]\]", marked, re.S) == ["Green.<|im_end|>\n"]


def test_conversational_prompt_completion_with_generation_markers(tok, tmp_path):
    # the marker path (a template with {% generation %}): the prompt's assistant turn is not trained either
    import copy

    import trl

    templates = Path(trl.__file__).parent / "chat_templates"
    t = copy.deepcopy(tok)
    t.chat_template = (templates / "llama3.jinja").read_text()
    (ex,) = _pc_examples(tmp_path, [{"prompt": PC_PROMPT, "completion": PC_COMPLETION}])
    for keep_text in (True, False):
        got = tokenize_example(ex, t, 4096, True, keep_text=keep_text)
        trained = [i for i, x in enumerate(got.labels) if x != -100]
        assert t.decode([got.input_ids[i] for i in trained]) == "Green.<|eot_id|>"


def test_prompt_rendered_differently_is_a_bad_row(tok, tmp_path):
    # a template that marks the last turn: the prompt alone renders its last user turn otherwise than the
    # whole conversation does, so where the prompt ends is not known; a bad row, not the prompt trained
    import copy

    from qlora_sft.data.templates import tokenize_rows

    t = copy.deepcopy(tok)
    t.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>"
        "{% endgeneration %}{% else %}{{ m.role }}{% if loop.last %}!{% endif %}: {{ m.content }}<|im_end|>"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    (ex,) = _pc_examples(tmp_path, [{"prompt": PC_PROMPT, "completion": PC_COMPLETION}])
    (bad,) = tokenize_rows([ex], t, 512, True)
    assert isinstance(bad, BadRow) and bad.reason == "prompt_rendered_differently"
    with pytest.raises(DataError, match=r"pc.jsonl row 1: the chat template renders the prompt differently"):
        tokenize_example(ex, t, 512, True)


def test_prompt_completion_without_assistant_prompt_turn_is_unchanged(tok, tmp_path):
    # a plain-string prompt, and a list prompt with no assistant turn: tokens and labels as a messages row's
    rows = [
        {"prompt": "What is the colour of the sky?", "completion": "The sky is blue."},
        {"prompt": PC_PROMPT[:1], "completion": [{"role": "assistant", "content": "The sky is blue."}]},
    ]
    same = [
        {"role": "user", "content": "What is the colour of the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
    ]
    for ex in _pc_examples(tmp_path, rows):
        assert ex.prompt_turns is None
        for keep_text in (True, False):
            got = tokenize_example(ex, tok, 512, True, keep_text=keep_text)
            want = tokenize_example(Example(same, None, "x", 1), tok, 512, True, keep_text=keep_text)
            assert (got.input_ids, got.labels, got.text, got.offsets) == (
                want.input_ids,
                want.labels,
                want.text,
                want.offsets,
            )
