"""Issue 24: local data that cannot be read is named clearly (file, row or byte, and the fix), never a
raw traceback, a misleading "not found", or a read without end; a byte order mark is dropped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import DATA

from qlora_sft import data
from qlora_sft.data import build_data, sources
from qlora_sft.data.formats import row_tools
from qlora_sft.errors import DataError
from qlora_sft.model import ensure_pad_token
from qlora_sft.recipe import DataConfig, DataSource

ROW = {"instruction": "Name a drink.", "input": "", "output": "Coffee."}
LATIN1_ROW = '{"instruction": "Un caf\xe9.", "input": "", "output": "Oui."}\n'.encode("latin-1")


@pytest.fixture(scope="module")
def tok():
    from tiny import build_tokenizer

    t = build_tokenizer()
    ensure_pad_token(t)
    return t


def load(path: Path | str, on_bad_row: str = "error", **source) -> tuple[list, list]:
    per_source, reports = data.load_examples([DataSource(path=str(path), **source)], on_bad_row)
    return per_source[0], reports[0]


def error(path: Path | str, **source) -> str:
    with pytest.raises(DataError) as exc:
        load(path, **source)
    return str(exc.value)


def jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# --- not UTF-8 ------------------------------------------------------------------------------


def test_latin1_jsonl_names_file_row_and_iconv(tmp_path: Path):
    f = tmp_path / "latin.jsonl"
    first = jsonl(ROW)
    f.write_bytes(first + LATIN1_ROW)
    msg = error(f)
    assert msg.startswith(f"{f} row 2 (byte offset {len(first) + LATIN1_ROW.index(0xE9)}): byte 0xe9 is not UTF-8")
    assert f"iconv -f latin1 -t utf-8 {f} > {tmp_path / 'latin.utf8.jsonl'}" in msg


def test_latin1_jsonl_in_the_arrow_pipeline(tmp_path: Path, tok):
    f = tmp_path / "latin.jsonl"
    f.write_bytes(jsonl(ROW) * 3 + LATIN1_ROW)
    with pytest.raises(DataError, match=r"latin\.jsonl row 4 \(byte offset \d+\): byte 0xe9 is not UTF-8"):
        build_data(DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1), tok, 0)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_latin1_json_and_csv_name_line_and_byte_offset(tmp_path: Path, suffix: str):
    f = tmp_path / f"latin{suffix}"
    if suffix == ".json":
        head = b'[{"instruction": "a", "input": "", "output": "b"},\n'
        body = head + b'{"instruction": "caf\xe9", "input": "", "output": "c"}]\n'
    else:
        head = b"instruction,input,output\na,,b\n"
        body = head + b"caf\xe9,,c\n"
    f.write_bytes(body)
    msg = error(f)
    line = head.count(b"\n") + 1
    assert msg.startswith(f"{f} line {line} (byte offset {body.index(0xE9)}): byte 0xe9 is not UTF-8"), msg
    assert "iconv -f latin1 -t utf-8" in msg


def test_a_character_split_across_read_chunks_is_not_an_error(tmp_path: Path):
    """The search for the bad byte reads 1 MiB chunks: a UTF-8 character cut by a chunk's end is fine."""
    f = tmp_path / "big.jsonl"
    pad = b" " * ((1 << 20) - 1)  # the 2-byte "é" of the next line straddles the first chunk's end
    f.write_bytes(pad + b'\n{"a": "\xc3\xa9"}\n' + b'{"a": "\xe9"}\n')
    assert sources._first_non_utf8(f) == (3, f.stat().st_size - 4, 0xE9)


def test_utf16_is_named_as_such(tmp_path: Path):
    f = tmp_path / "wide.jsonl"
    f.write_bytes(json.dumps(ROW).encode("utf-16"))
    msg = error(f)
    assert "row 1 (byte offset 0)" in msg and "looks like UTF-16" in msg and "iconv -f utf-16 -t utf-8" in msg


# --- byte order mark -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_dropped(tmp_path: Path, suffix: str):
    if suffix == ".jsonl":
        text = json.dumps(ROW) + "\n"
    elif suffix == ".json":
        text = json.dumps([ROW])
    else:
        text = "instruction,input,output\nName a drink.,,Coffee.\n"
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    (expected,), _ = load(plain)
    (got,), report = load(marked)
    assert report.format == "alpaca" and got.messages == expected.messages


# --- what is not a data file ------------------------------------------------------------------


def test_symlink_loop_is_named_not_reported_as_not_found(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for a, b in (("a.jsonl", "b.jsonl"), ("loopy", "loopy")):  # `loopy` would otherwise be tried as a hub id
        os.symlink(b, tmp_path / a)
        if a != b:
            os.symlink(a, tmp_path / b)
        msg = error(a)
        assert f"data source {a!r}: {a} is a symlink loop" in msg and "not found" not in msg


def test_symlink_to_nothing_is_named(tmp_path: Path):
    link = tmp_path / "gone.jsonl"
    os.symlink(tmp_path / "moved.jsonl", link)
    msg = error(link)
    assert f"{link} is a symlink to {tmp_path / 'moved.jsonl'}, which does not exist" in msg


READ_IN_A_CHILD = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a read without end fails here, not the host
    from qlora_sft import data
    from qlora_sft.recipe import DataSource
    try:
        list(data.read_documents(DataSource(path=sys.argv[1])))
    except data.DataError as exc:
        print(exc)
    """
)


def read_in_a_child(path: Path) -> str:
    """Read a source in a child process with a memory cap and a deadline (today's code would read
    /dev/zero without end, or wait on a FIFO forever)."""
    out = subprocess.run([sys.executable, "-c", READ_IN_A_CHILD, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_devices_and_pipes_are_refused_up_front(tmp_path: Path):
    zero = tmp_path / "zeros.jsonl"
    os.symlink("/dev/zero", zero)
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    for path, kind in ((zero, "a character device"), (fifo, "a named pipe (FIFO)"), (Path("/dev/zero"), None)):
        msg = read_in_a_child(path)
        assert f"data source {str(path)!r}: {path}" in msg
        assert f"is {kind or 'a character device'}, not a regular file or folder" in msg
        assert "a folder written by datasets' save_to_disk" in msg
    assert "(a link to /dev/zero)" in read_in_a_child(zero)


# --- empty, blank, truncated -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,content",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n\n   \n\t\n"),
        ("empty.json", b""),
        ("empty_list.json", b"[]"),
        ("header_only.csv", b"instruction,input,output\n"),
    ],
)
def test_empty_and_blank_files_have_no_rows(tmp_path: Path, tok, name: str, content: bytes):
    f = tmp_path / name
    f.write_bytes(content)
    assert f"data source {f} has no rows" in error(f)
    with pytest.raises(DataError, match=f"data source {f} has no rows"):
        build_data(DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1), tok, 0)


def test_a_folder_not_written_by_datasets_says_what_it_holds(tmp_path: Path):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert error(folder).endswith("; it is empty")
    (folder / "part-1.jsonl").write_bytes(jsonl(ROW))
    (folder / "notes.txt").write_text("x")
    msg = error(folder)
    assert "a folder must be written by datasets' save_to_disk" in msg
    assert f"it holds part-1.jsonl: give each file as a source of its own (`- path: {folder / 'part-1.jsonl'}`)" in msg


def test_a_truncated_last_line(tmp_path: Path):
    f = tmp_path / "cut.jsonl"
    f.write_bytes(jsonl(ROW, ROW) + b'{"instruction": "Name a dri')
    assert error(f).startswith(f"{f} row 3: line is not valid JSON (Unterminated string")
    rows, report = load(f, on_bad_row="skip")
    assert len(rows) == 2 and report.skipped == {"invalid_json": 1}
    # a .json file of JSON lines: the line that is cut is named (not "Extra data" at line 2)
    g = tmp_path / "cut.json"
    g.write_bytes(f.read_bytes())
    assert error(g) == f"{g}: not valid JSON (line 3: Unterminated string starting at)"


def test_a_first_line_that_is_not_json(tmp_path: Path):
    f = tmp_path / "cut.jsonl"
    f.write_bytes(b'{"instruction": "Name a dri')
    msg = error(f)
    assert msg.startswith(f"{f} row 1: line is not valid JSON (Unterminated string")
    assert "the format is detected from the first row" in msg and "BadRow" not in msg
    # with the format given, the row is a bad row like any other
    assert "data.on_bad_row=skip" in error(f, format="alpaca")


def test_a_file_that_is_not_parquet(tmp_path: Path):
    f = tmp_path / "rows.parquet"
    f.write_bytes(jsonl(ROW))
    msg = error(f)
    assert msg.startswith(f"data source {f}: not a readable parquet file (")


def test_valid_files_read_as_before():
    """The guards change nothing for good files (the pinned digests in test_data_scale check the tokens)."""
    for name in ("alpaca.jsonl", "sharegpt.json", "mixed.csv"):
        rows, report = load(DATA / name)
        assert rows and report.rows == report.kept


# --- CSV that does not parse as its header says ------------------------------------------------


SKY_CSV = (
    "instruction,input,output\n"
    "Say hi,,hi\n"
    "What is the colour of the sky?,,The sky is blue, mostly, except at night.\n"
    "Say bye,,bye\n"
)


def test_a_csv_row_with_more_fields_than_the_header_is_a_bad_row(tmp_path: Path):
    """An unquoted comma in a field: the row used to train on "The sky is blue" alone, skipping nothing."""
    f = tmp_path / "sky.csv"
    f.write_text(SKY_CSV)
    msg = error(f)
    assert msg.startswith(f"{f} row 2: line 3 has 5 fields but the header has 3 (instruction, input, output)")
    assert "' mostly', ' except at night.'" in msg and "must be quoted" in msg
    rows, report = load(f, on_bad_row="skip")
    assert [r.messages[-1]["content"] for r in rows] == ["hi", "bye"]
    assert report.skipped == {"csv_too_many_fields": 1}
    # quoted, the comma is part of the answer
    f.write_text(SKY_CSV.replace("The sky is blue, mostly, except at night.", '"The sky is blue, mostly."'))
    rows, report = load(f)
    assert rows[1].messages[-1]["content"] == "The sky is blue, mostly." and report.kept == 3


def test_a_csv_row_with_fewer_fields_than_the_header_is_a_bad_row(tmp_path: Path, tok):
    f = tmp_path / "short.csv"
    f.write_text("instruction,input,output\nSay hi,,hi\nSay bye,bye\n")
    assert error(f).startswith(f"{f} row 2: line 3 has 2 fields but the header has 3 (instruction, input, output); ")
    assert "output is missing" in error(f)
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1, on_bad_row="skip")
    assert build_data(cfg, tok, 0).report.sources[0].skipped == {"csv_too_few_fields": 1}


def test_a_csv_quote_that_is_not_closed_names_the_line(tmp_path: Path):
    """An unbalanced quote used to swallow the lines after it into one field."""
    f = tmp_path / "quote.csv"
    f.write_text('instruction,input,output\nSay hi,,hi\n"What is the colour,,The sky\nSay bye,,bye\n')
    msg = error(f)
    assert msg.startswith(f"{f}: not valid CSV at the record that starts on line 3 (read to line 4)")
    assert "must be quoted, with each quote inside it doubled" in msg
    f.write_text('instruction,input,output\nSay hi,,hi\n"What" is the colour,,The sky\n')
    assert error(f).startswith(f"{f}: not valid CSV at line 3 (',' expected after '\"')")


def test_a_csv_cell_longer_than_the_csv_modules_limit_is_read(tmp_path: Path):
    """A 200 KB document in a cell (the csv module stops at 128 KiB by default)."""
    f = tmp_path / "long.csv"
    document = "word " * 40_000
    f.write_text(f"instruction,input,output\nSummarise.,{document},Short.\n")
    (row,), report = load(f)
    assert row.messages[0]["content"] == "Summarise.\n\n" + document and report.kept == 1


# --- eval rows never trained on ------------------------------------------------------------------


def test_weight_above_one_never_trains_on_eval_rows(tmp_path: Path, tok):
    """A source with weight 2 repeats its rows: the eval split took the first rows of the mix, so
    every eval row was also a train row (its copy)."""
    f = tmp_path / "distinct.jsonl"
    f.write_bytes(
        jsonl(*({"instruction": f"Question {i}.", "input": "", "output": f"Answer {i}."} for i in range(200)))
    )
    cfg = DataConfig(sources=(DataSource(path=str(f), weight=2.0),), eval_fraction=0.05, num_proc=1)
    prepared = build_data(cfg, tok, 0)
    train = [tuple(x) for x in prepared.train["input_ids"]]
    held = [tuple(x) for x in prepared.eval["input_ids"]]
    assert len(set(train)) == 200 - len(held) and not set(held) & set(train)
    assert len(held) == len(set(held)) == 10  # 5% of the 200 distinct rows
    assert len(train) == 380 and all(train.count(x) == 2 for x in set(train))  # every train row twice
    report = prepared.report
    assert (report.train_rows, report.eval_rows, report.sources[0].used) == (380, 10, 390)
    again = build_data(cfg, tok, 0)  # the same seed, the same split
    assert [tuple(x) for x in again.eval["input_ids"]] == held


def test_weight_one_holds_out_the_first_rows_of_the_mix(tmp_path: Path, tok):
    f = tmp_path / "distinct.jsonl"
    f.write_bytes(jsonl(*({"instruction": f"Question {i}.", "input": "", "output": f"Answer {i}."} for i in range(40))))
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.1, num_proc=1)
    prepared = build_data(cfg, tok, 3)
    mixed, _ = data.mix([list(range(40))], cfg.sources, 3)
    whole = build_data(DataConfig(sources=cfg.sources, eval_fraction=0.0, num_proc=1), tok, 3).train["input_ids"]
    assert prepared.eval["input_ids"] == [whole[mixed.index(i)] for i in mixed[:4]]
    assert prepared.train["input_ids"] == [whole[mixed.index(i)] for i in mixed[4:]]


# --- truncated conversations do not train their end token ---------------------------------------


def test_truncated_conversations_count_as_not_training_their_end_token(tmp_path: Path, tok):
    f = tmp_path / "long.jsonl"
    f.write_bytes(jsonl({"instruction": "Short.", "output": "Yes."}, {"instruction": "Long.", "output": "word " * 200}))
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1, max_length=64)
    report = build_data(cfg, tok, 0).report
    assert (report.chat_rows, report.truncated, report.eos_trained_fraction) == (2, 1, 0.5)  # was 1 row, 100%
    warning = [line for line in report.lines() if line.startswith("warning: 50.0% of the conversations")]
    assert warning and "(1 of 2: truncation to data.max_length cut it (truncated rows: 1)" in warning[0]
    # every conversation truncated: refused before training (it used to report nothing), or warned
    f.write_bytes(
        jsonl({"instruction": "Long.", "output": "word " * 200}, {"instruction": "Long.", "output": "x " * 200})
    )
    with pytest.raises(DataError) as exc:
        build_data(cfg, tok, 0)
    assert "none of the 2 conversations trains the end-of-turn token" in str(exc.value)
    assert "truncated rows: 2" in str(exc.value) and "Raise data.max_length" in str(exc.value)
    allowed = build_data(
        DataConfig(sources=cfg.sources, eval_fraction=0.0, num_proc=1, max_length=64, allow_no_eos=True), tok, 0
    )
    lines = allowed.report.lines()
    assert "examples whose final assistant turn trains its end token '<|im_end|>': 0.0%" in lines
    assert any(line.startswith("warning: 100.0% of the conversations train no end token") for line in lines)


# --- rows that crashed the tokenizer or the template ---------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_lone_surrogate_is_a_bad_row(tmp_path: Path, tok, suffix: str):
    f = tmp_path / f"emoji{suffix}"
    rows = ['{"instruction": "Say hi.", "output": "hi"}', '{"instruction": "Emoji \\ud83d", "output": "hi"}']
    f.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[" + ",\n".join(rows) + "]\n")
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1)
    with pytest.raises(DataError) as exc:
        build_data(cfg, tok, 0)
    assert str(exc.value).startswith(f"{f} row 2: turn 1 (user) is not valid Unicode text: '\\ud83d' at character 6")
    skipped = build_data(DataConfig(sources=cfg.sources, eval_fraction=0.0, num_proc=1, on_bad_row="skip"), tok, 0)
    assert skipped.report.sources[0].skipped == {"invalid_text": 1} and skipped.report.train_rows == 1


def test_a_chat_template_that_raises_is_a_bad_row(tmp_path: Path, tok):
    """Gemma's template refuses a system turn with raise_exception (jinja2's TemplateError)."""
    import copy

    no_system = copy.deepcopy(tok)
    no_system.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + data.CHAT_TEMPLATES["chatml"]
    )
    f = tmp_path / "system.jsonl"
    f.write_bytes(jsonl({"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b", "system": "Be kind."}))
    for assistant_only_loss in (True, False):
        cfg = DataConfig(
            sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1, assistant_only_loss=assistant_only_loss
        )
        with pytest.raises(DataError) as exc:
            build_data(cfg, no_system, 0)
        msg = str(exc.value)
        assert msg.startswith(f"{f} row 2: the chat template refuses this conversation: TemplateError: System role not")
        assert "data.sources[].system_prompt" in msg and "data.chat_template" in msg
        skip = DataConfig(sources=cfg.sources, eval_fraction=0.0, num_proc=1, on_bad_row="skip")
        assert build_data(skip, no_system, 0).report.sources[0].skipped == {"chat_template_error": 1}
    with pytest.raises(DataError, match=r"system\.jsonl row 2: the chat template refuses"):
        data.tokenize_example(load(f)[0][1], no_system, 64, True)


def test_json_nested_too_deeply_is_invalid_json(tmp_path: Path):
    f = tmp_path / "deep.jsonl"
    f.write_bytes(jsonl(ROW) + b"[" * 100_000 + b"\n")
    assert error(f).startswith(f"{f} row 2: line is not valid JSON that can be read (nested too deeply to parse)")
    assert load(f, on_bad_row="skip")[1].skipped == {"invalid_json": 1}
    g = tmp_path / "deep.json"
    g.write_bytes(b"[" * 100_000)
    assert (
        error(g)
        == f"{g}: not valid JSON that can be read (line 1: nested too deeply to parse). Fix or remove that value."
    )


def test_tool_calls_a_template_leaves_out_are_bad_rows(tmp_path: Path, tok):
    """chatml, llama2 and alpaca render neither tool calls nor tool results: such a row trained as it
    renders teaches an empty answer where the model should call a tool. It is a bad row naming the
    call; the same row under a template that renders tool calls trains."""
    import copy

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    row = {
        "messages": [
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny and 24 degrees"},
            {"role": "assistant", "content": "It is sunny."},
        ]
    }
    f = tmp_path / "tools.jsonl"
    plain = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f.write_bytes(jsonl(plain, row))
    for template in ("chatml", "llama2", "alpaca"):
        for assistant_only_loss in (True, False):
            cfg = DataConfig(
                sources=(DataSource(path=str(f)),),
                eval_fraction=0.0,
                num_proc=1,
                chat_template=template,
                assistant_only_loss=assistant_only_loss,
            )
            with pytest.raises(DataError) as exc:
                build_data(cfg, copy.deepcopy(tok), 0)
            assert str(exc.value).startswith(f"{f} row 2: the chat template leaves out turn 2's call of get_weather")
            skip = DataConfig(
                sources=cfg.sources, eval_fraction=0.0, num_proc=1, chat_template=template, on_bad_row="skip"
            )
            assert build_data(skip, copy.deepcopy(tok), 0).report.sources[0].skipped == {"tool_calls_not_rendered": 1}
    renders = copy.deepcopy(tok)
    renders.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['name'] }}</tool_call>{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1, chat_template="auto")
    assert build_data(cfg, renders, 0).report.sources[0].kept == 2


def test_a_messages_rows_tools_system_and_reasoning_reach_the_template(tmp_path: Path, tok):
    """Fields of OpenAI's and Qwen3's formats that were dropped without a word: a row's `tools` (the
    functions it may call), a row's `system`, an assistant turn's `reasoning_content`; a per-turn
    `weight` (axolotl) other than 1 is a bad row, not trained in silence."""
    import copy

    shows = copy.deepcopy(tok)
    shows.chat_template = (
        "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}"
        "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['name'] }}</tool_call>{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    rows = [
        {
            "tools": [weather],
            "system": "Answer in French.",
            "messages": [
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
            ],
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 1}]},
    ]
    f = tmp_path / "fields.jsonl"
    f.write_bytes(jsonl(*rows))
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1, on_bad_row="skip")
    prepared = build_data(cfg, shows, 0)
    assert prepared.report.sources[0].skipped == {"turn_weight": 1}
    (text,) = [t for t in (shows.decode(r["input_ids"]) for r in prepared.train) if "2+2?" in t]
    assert "TOOLS: get_weather" in text and "Answer in French." in text and "<think>two plus two</think>" in text
    with pytest.raises(DataError, match=r"row 2: .*weight is 0: per-turn weights .* are not supported"):
        build_data(DataConfig(sources=cfg.sources, eval_fraction=0.0, num_proc=1), shows, 0)
    # a template that does not render tool definitions (the bundled chatml) makes the row a bad row
    chatml = DataConfig(sources=cfg.sources, eval_fraction=0.0, num_proc=1, chat_template="chatml", on_bad_row="skip")
    assert build_data(chatml, copy.deepcopy(tok), 0).report.sources[0].skipped == {
        "turn_weight": 1,
        "tool_calls_not_rendered": 1,
    }


# LLaMA-Factory's sharegpt tool rows (data/README.md, converter.py): `function_call` turns hold the call
# as JSON text ({"name", "arguments"}, or a list of them for parallel calls), `observation` turns the
# result, and the row's `tools` is a JSON string of the function definitions.
WEATHER = {"name": "get_weather", "description": "Weather now", "parameters": {"type": "object"}}
LF_TOOL_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris and Rome?"},
        {
            "from": "function_call",
            "value": json.dumps(
                [
                    {"name": "get_weather", "arguments": {"city": "Paris"}},
                    {"name": "get_weather", "arguments": {"city": "Rome"}},
                ]
            ),
        },
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": '{"temp": 3}'},
        {"from": "gpt", "value": "Warm in Paris, cold in Oslo."},
    ],
    "system": "Use the tools.",
    "tools": json.dumps([WEATHER]),
}


def test_llama_factory_sharegpt_tool_calls_and_tools_reach_the_template(tmp_path: Path, tok):
    """`function_call` and `observation` turns were refused as unknown roles and the row's `tools`
    dropped: they become an assistant turn with `tool_calls`, a `tool` turn, and the template's
    `tools` (a JSON string or a list), as in the messages format."""
    import copy

    messages, _ = data.normalize_row(LF_TOOL_ROW, "sharegpt")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[2] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ],
    }
    assert messages[3] == {"role": "tool", "content": '{"temp": 21}'}
    assert messages[4]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    wrapped = {"type": "function", "function": WEATHER}  # OpenAI's form, as templates read it (test_data_tools)
    assert row_tools(LF_TOOL_ROW, "sharegpt") == [wrapped]
    assert row_tools({**LF_TOOL_ROW, "tools": [WEATHER]}, "sharegpt") == [wrapped]
    assert row_tools({**LF_TOOL_ROW, "tools": ""}, "sharegpt") is None
    weighted = json.loads(json.dumps(LF_TOOL_ROW))
    weighted["conversations"][1]["weight"] = 0  # a call turn is an assistant turn: its weight is checked too
    with pytest.raises(data.BadRow, match=r"`conversations\[1\]`.weight is 0"):
        data.normalize_row(weighted, "sharegpt")

    shows = copy.deepcopy(tok)
    shows.chat_template = (
        "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
        "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['name'] }} "
        "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    f = tmp_path / "lf_tools.json"
    f.write_text(json.dumps([LF_TOOL_ROW], indent=2))
    per_source, _ = data.load_examples([DataSource(path=str(f))], "error")
    assert per_source[0][0].tools == [wrapped]
    cfg = DataConfig(sources=(DataSource(path=str(f)),), eval_fraction=0.0, num_proc=1)
    (row,) = build_data(cfg, shows, 0).train
    text = shows.decode(row["input_ids"])
    assert "TOOLS: get_weather" in text and "Use the tools." in text
    assert '<tool_call>get_weather {"city": "Rome"}</tool_call>' in text
    assert '<|im_start|>tool\n{"temp": 3}<|im_end|>' in text


@pytest.mark.parametrize(
    "value,problem",
    [
        ('get_weather(city="Paris")', "is not JSON"),
        ('{"arguments": {"city": "Paris"}}', "needs a function name"),
        ("[]", "holds no call"),
    ],
)
def test_a_function_call_turn_that_is_not_a_call_is_a_bad_row_naming_the_turn(value: str, problem: str):
    row = {**LF_TOOL_ROW, "conversations": [*LF_TOOL_ROW["conversations"][:3], LF_TOOL_ROW["conversations"][-1]]}
    row["conversations"][1] = {"from": "function_call", "value": value}
    with pytest.raises(data.BadRow) as exc:
        data.normalize_row(row, "sharegpt")
    assert exc.value.reason == "wrong_type"
    assert "`conversations[1]` (a function_call turn)" in str(exc.value) and problem in str(exc.value)
    assert '{"name": ..., "arguments": {...}}' in str(exc.value)
    with pytest.raises(data.BadRow, match=r"field `tools` is not JSON"):
        row_tools({**LF_TOOL_ROW, "tools": "get_weather(city)"}, "sharegpt")


def test_openais_developer_role_is_the_system_turn():
    messages, _ = data.normalize_row(
        {
            "messages": [
                {"role": "developer", "content": "Answer in one word."},
                {"role": "user", "content": "Sky colour?"},
                {"role": "assistant", "content": "Blue."},
            ]
        },
        "messages",
    )
    assert messages[0] == {"role": "system", "content": "Answer in one word."}


# --- a .json file that holds one object ---------------------------------------------------------


def test_a_json_file_holding_one_object_names_the_shape_expected(tmp_path: Path):
    """A .json file of one object (not a list of rows, not JSON lines) was read as the rows of its only
    list: a conversation's turns, each refused as a row of unknown format; an object of two lists was
    refused asking for {"data": [...]}. Now the file is named with the shapes expected, and an object
    that wraps the rows is named with its key, not unwrapped by a guess."""
    one = tmp_path / "one.json"
    one.write_text(json.dumps(LF_TOOL_ROW, indent=2))
    msg = error(one)
    assert msg.startswith(f"{one}: holds one JSON object, not a list of rows")
    assert "a JSON list of rows ([{...}, {...}]) or JSON lines (one row a line)" in msg
    assert "it looks like one sharegpt row" in msg

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "rows": [ROW, ROW]}, indent=2))
    msg = error(wrapped)
    assert msg.startswith(f"{wrapped}: holds one JSON object, not a list of rows")
    assert "its key `rows` holds a list of 2 mappings" in msg and "jq '.rows'" in msg

    # {"data": [...]}, the one wrapping read before (and named in its old error): still read, and said
    under_data = tmp_path / "under_data.json"
    under_data.write_text(json.dumps({"version": 2, "data": [ROW, ROW]}, indent=2))
    rows, report = load(under_data)
    assert report.rows == report.kept == 2 and rows[1].messages[-1]["content"] == "Coffee."
    not_rows = tmp_path / "not_rows.json"
    not_rows.write_text(json.dumps({"data": [1, 2]}, indent=2))
    assert "it has the keys ['data'], none of which holds a list of rows" in error(not_rows)

    two = tmp_path / "splits.json"
    two.write_text(json.dumps({"train": [ROW, ROW], "test": [ROW]}))
    msg = error(two)
    assert "its keys `train` (2 mappings) and `test` (1 mapping) hold lists" in msg

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"a": 1, "b": "x"}, indent=2))
    assert "it has the keys ['a', 'b']" in error(other)

    # one row on one line is a JSON lines file of one row
    line = tmp_path / "line.json"
    line.write_text(json.dumps(ROW) + "\n")
    rows, report = load(line)
    assert report.rows == report.kept == 1 and rows[0].messages[-1]["content"] == "Coffee."
