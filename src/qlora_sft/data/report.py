"""What preparing the data reports: per source (rows read, kept, used in the mix, skipped by reason
with the first rows of each reason named and the first one's problem, kept rows that train no token,
how its rows were limited) and for the split (rows, rows dropped for no trained tokens in train and
eval, tokens per example, the share of tokens that carry loss, how many conversations train their
end-of-turn token); `check_end_tokens` refuses data in which none does."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DataConfig

# Rows named per reason (the first ones in the source's order); the count covers them all.
ROWS_NAMED = 5


@dataclass
class SourceReport:
    path: str
    format: str
    rows: int = 0
    kept: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    limit: str = ""  # data.sources[i].max_rows, as text ("" = every row read)
    skipped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> its first ROWS_NAMED rows
    problems: dict[str, str] = field(default_factory=dict)  # reason -> its first row's problem
    # kept rows that train no token (truncation to data.max_length cut every trained token): left out of
    # whichever split they were mixed into
    no_loss: int = 0
    no_loss_rows: list[int] = field(default_factory=list)  # the first ROWS_NAMED of them
    # kept rows that train no token though truncation cut none of their trained tokens (the chat template
    # marks no assistant token as trained): left out too
    untrained: int = 0
    untrained_rows: list[int] = field(default_factory=list)  # the first ROWS_NAMED of them

    def skip(self, reason: str, row: int, problem: str) -> None:
        """Count a bad row under its reason, naming it if it is among the reason's first rows."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        named = self.skipped_rows.setdefault(reason, [])
        if len(named) < ROWS_NAMED:
            named.append(row)
        self.problems.setdefault(reason, problem)

    def drop_no_loss(self, row: int, cut: bool = True) -> None:
        """Count a kept row that trains no token, naming it if it is among the first ones; `cut`: truncation
        cut its trained tokens (else the template marks none)."""
        if not cut:
            self.untrained += 1
            if len(self.untrained_rows) < ROWS_NAMED:
                self.untrained_rows.append(row)
            return
        self.no_loss += 1
        if len(self.no_loss_rows) < ROWS_NAMED:
            self.no_loss_rows.append(row)

    def reason_text(self, reason: str, of: str = "") -> str:
        """`reason: count (rows ...; row N: problem)`; `of`: words after the row numbers (" of <file>")."""
        count, rows = self.skipped[reason], self.skipped_rows.get(reason, [])
        return f"{reason}: {count}" + (f" ({named_rows(rows, count, of, self.problems.get(reason))})" if rows else "")

    def no_loss_text(self, of: str = "", max_length: int | None = None) -> str:
        """The kept rows that train no token: `... data.max_length: count (rows ...)`."""
        limit = f"={max_length}" if max_length is not None else ""
        return f"{NO_LOSS_TEXT}{limit}: {self.no_loss} ({named_rows(self.no_loss_rows, self.no_loss, of)})"

    def untrained_text(self, of: str = "") -> str:
        """The kept rows that train no token though nothing of them was cut."""
        return f"{UNTRAINED_TEXT}: {self.untrained} ({named_rows(self.untrained_rows, self.untrained, of)})"


NO_LOSS_TEXT = "no trained tokens left after truncation to data.max_length"
UNTRAINED_TEXT = "no token marked as trained by the chat template (nothing of it cut)"


def named_rows(rows: list[int], count: int, of: str = "", problem: str | None = None) -> str:
    """'row 3 of f: problem', 'rows 3, 17 of f; row 3: problem', 'rows 3, 17, 42, 50, 61 and 12 more of f'."""
    if len(rows) == 1 and count == 1:
        return f"row {rows[0]}{of}" + (f": {problem}" if problem else "")
    more = f" and {count - len(rows)} more" if count > len(rows) else ""
    return f"rows {', '.join(map(str, rows))}{more}{of}" + (f"; row {rows[0]}: {problem}" if problem else "")


EVAL_SUFFIX = " (eval)"  # how the report names an eval source

# What a row number counts, by the kind of source (the suffix of its path; a folder or a hub id has none).
ROW_NUMBERS = {
    ".jsonl": "a .jsonl file's are its lines",
    ".ndjson": "a .ndjson file's are its lines",
    ".json": "a .json file's are the items of its list (its lines, for JSON lines)",
    ".csv": "a .csv file's are its records after the header line (record 1 is line 2 when no field holds a line break)",
    "": "a parquet file's, a datasets folder's or a hub dataset's are its rows (dataset[row - 1])",
}


def row_numbers_note(paths: list[str]) -> str:
    """The line that says what the row numbers named for these sources count."""
    kinds = []
    for path in paths:
        suffix = Path(path.removesuffix(EVAL_SUFFIX)).suffix.lower()
        kind = ROW_NUMBERS.get(suffix if suffix in ROW_NUMBERS else "", ROW_NUMBERS[""])
        if kind not in kinds:
            kinds.append(kind)
    return "rows count from 1: " + "; ".join(kinds)


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    train_rows: int = 0
    eval_rows: int = 0
    tokens_mean: float = 0.0
    tokens_p95: int = 0
    tokens_max: int = 0
    tokens_total: int = 0
    truncated: int = 0
    dropped_no_loss: int = 0  # train rows left out: no trained tokens (a row repeated by weight counts each time)
    loss_token_fraction: float = 0.0
    eos_trained_fraction: float = 0.0
    end_token: str = ""
    streamed_sample: int = 0  # streaming: the statistics describe the first rows only
    chat_rows: int = 0  # train rows that are conversations (the end-token fraction counts these)
    eval_dropped_no_loss: int = 0  # eval rows left out: no trained tokens
    eval_in_train: int = 0  # eval rows whose tokens are those of a train row

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataReport:
        d = dict(d)
        d["sources"] = [SourceReport(**s) for s in d.get("sources", [])]
        return cls(**d)

    def lines(self) -> list[str]:
        out = []
        for s in self.sources:
            skipped = ", ".join(s.reason_text(reason) for reason in sorted(s.skipped)) or "none"
            if s.no_loss:
                skipped += f"; {s.no_loss_text()}"
            if s.untrained:
                skipped += f"; {s.untrained_text()}"
            out.append(
                f"source {s.path} [{s.format}]: {s.rows} rows{f' ({s.limit})' if s.limit else ''}, {s.kept} kept, "
                f"{s.used} used in the mix, skipped: {skipped}"
            )
        named_paths = [s.path for s in self.sources if s.skipped_rows or s.no_loss_rows or s.untrained_rows]
        if named_paths:
            out.append(row_numbers_note(named_paths))
        bad, no_loss = sum(sum(s.skipped.values()) for s in self.sources), sum(s.no_loss for s in self.sources)
        untrained = sum(s.untrained for s in self.sources)
        if bad or no_loss or untrained:
            read, left = sum(s.rows for s in self.sources), bad + no_loss + untrained
            parts = [plural(bad, "bad row")] if bad else []
            parts += [f"{no_loss} with no trained tokens left after truncation"] if no_loss else []
            parts += [f"{untrained} with no token marked as trained by the chat template"] if untrained else []
            out.append(
                f"warning: {left} of the {read} rows read are left out ({', '.join(parts)}), named by "
                "source and row above"
                + ("; data.on_bad_row=error stops at the first bad row with its problem" if bad else "")
            )
        if self.streamed_sample:
            out.append(
                "streaming: training rows are read and tokenized as training goes (their number is unknown); "
                f"the figures here describe the first {self.streamed_sample} rows of each source"
            )
            out.append(f"split: train rows as the stream yields them, {self.eval_rows} eval rows")
        else:
            out.append(f"split: {self.train_rows} train rows, {self.eval_rows} eval rows")
        if self.eval_in_train:
            out.append(
                f"warning: {self.eval_in_train} of the {self.eval_rows} eval rows are also train rows (the same "
                "tokens): the eval loss measures in part what the model has seen. A source named in both "
                "data.sources and data.eval_sources, a copy of one, or rows repeated in the data"
            )
        out.append(
            f"tokens per train example: mean {self.tokens_mean:.1f}, p95 {self.tokens_p95}, max "
            f"{self.tokens_max}, total {self.tokens_total}; truncated rows: {self.truncated}"
            + (
                f"; dropped (no trained tokens left): {plural(self.dropped_no_loss, 'train row')}, "
                f"{plural(self.eval_dropped_no_loss, 'eval row')}"
                if self.dropped_no_loss or self.eval_dropped_no_loss
                else ""
            )
        )
        out.append(f"fraction of tokens that carry loss: {self.loss_token_fraction:.1%}")
        if self.end_token:
            out.append(
                f"examples whose final assistant turn trains its end token {self.end_token!r}: "
                f"{self.eos_trained_fraction:.1%}"
            )
            if self.chat_rows and self.eos_trained_fraction < EOS_WARN_BELOW:
                untrained = round((1 - self.eos_trained_fraction) * self.chat_rows)
                out.append(
                    f"warning: {1 - self.eos_trained_fraction:.1%} of the conversations train no end token "
                    f"{self.end_token!r} ({untrained} of {self.chat_rows}: truncation to data.max_length cut it "
                    f"(truncated rows: {self.truncated}), or a template that does not end the assistant turn with "
                    "it): "
                    + (
                        "the model learns to stop from the rest only"
                        if self.eos_trained_fraction > 0
                        else "the model does not learn to stop from this data"
                    )
                )
        return out


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# Below this fraction of conversations that train their end-of-turn token, the report warns; at 0 a
# recipe is refused (`check_end_tokens`).
EOS_WARN_BELOW = 0.95


def check_end_tokens(report: DataReport, cfg: DataConfig) -> None:
    """Refuse training data in which no conversation trains the end-of-turn token (the model would
    never learn to stop), unless `data.allow_no_eos`. Rows in `text` format are not counted."""
    if not report.chat_rows or report.eos_trained_fraction > 0 or cfg.allow_no_eos:
        return
    raise DataError(
        f"none of the {report.chat_rows} conversations trains the end-of-turn token {report.end_token!r}: the "
        "chat template does not end assistant turns with a token the tokenizer has, or truncation to "
        f"data.max_length cuts it from every conversation (truncated rows: {report.truncated}), so the model "
        "would never learn to stop. Raise data.max_length if the rows are truncated; use a template whose end "
        "token is in the tokenizer (data.chat_template: auto for models with their own template; chatml, llama2 "
        "or alpaca for base models; `qlora-sft validate` shows what is trained), or, for continued-pretraining "
        "style data, set data.allow_no_eos: true"
    )


def check_eval_rows(report: DataReport, cfg: DataConfig, train_args: dict[str, Any]) -> None:
    """Refuse a recipe that needs evaluation (`train.load_best_model_at_end`) where the data left no
    eval rows (an eval_fraction of too few rows, eval rows without trained tokens, eval sources whose
    rows were all bad): the Trainer would refuse it only after the model had loaded."""
    if report.eval_rows or not train_args.get("load_best_model_at_end"):
        return
    if cfg.eval_sources:
        why = "data.eval_sources leave none"
    else:
        mixed = sum(r.used for r in report.sources)
        why = f"data.eval_fraction={cfg.eval_fraction} of the {mixed} rows of the mix holds out none"
        if mixed < 2:
            why += " (one row always trains)"
    if report.eval_dropped_no_loss:
        why += (
            f"; {report.eval_dropped_no_loss} eval rows train no token (truncation to data.max_length left none, or "
            "the chat template marks none: `qlora-sft validate` names the rows)"
        )
    raise DataError(
        f"train.load_best_model_at_end asks for the checkpoint with the best evaluation, but the data has no "
        f"eval rows: {why}. Give more rows, set data.eval_sources, or remove train.load_best_model_at_end"
    )


# The fix for the rows of each reason (a `BadRow` reason, or NO_LOSS), named when it dropped the most rows.
REASON_FIXES = {
    "invalid_json": "write each row as one JSON object (in a .jsonl file, one per line)",
    "csv_too_many_fields": "quote the CSV fields that hold a comma (pandas' to_csv and Python's csv module do)",
    "csv_too_few_fields": "give every field of the header in each CSV record, and quote fields that hold a line break",
    "missing_field": "give each row the fields of its format, or set `format:` on the source to the format its "
    "rows are in",
    "wrong_type": "give each field the type its format expects (text as a string, turns as a list of mappings)",
    "unknown_role": "give every turn a role of system, user, assistant or tool (or a known alias: human, gpt, ...)",
    "turn_weight": "remove the per-turn `weight` (and `training`/`train`) keys (every assistant turn trains), or "
    "split the conversations",
    "undesirable_completion": "leave the preference rows labelled false out of the SFT data",
    "empty": "give every conversation its turns",
    "roles_out_of_order": "order the turns: an optional system turn, then user and assistant alternating, tool "
    "results after the tool calls",
    "no_assistant_turn": "end every conversation with an assistant turn",
    "empty_assistant_turn": "fill or remove the empty assistant turns",
    "empty_user_turn": "fill or remove the empty user turns",
    "empty_text": "fill or remove the rows whose `text` is empty",
    "invalid_text": "write whole characters in place of the lone UTF-16 surrogates",
    "chat_template_error": "remove what the chat template refuses (a system turn, for a template without one), or "
    "choose a template that takes it (data.chat_template)",
    "tool_calls_not_rendered": "use a chat template that renders tool calls (data.chat_template: auto, or a .jinja "
    "file), or leave the tool-calling rows out",
    "prompt_rendered_differently": "use a chat template that renders a prompt's turns alike alone and before the "
    "completion (data.chat_template), or give those rows as `messages` (every assistant turn trains)",
}
NO_LOSS_FIX = "raise data.max_length, or shorten the rows named"
UNTRAINED_FIX = (
    "with data.assistant_only_loss, use a chat template that wraps each assistant reply in {% generation %} ... "
    "{% endgeneration %} (data.chat_template), or set data.assistant_only_loss=false"
)


NOTHING_LEFT, FROM_TRAINING = "no training examples are left", "from the training sources"


def as_eval_sources_error(message: str, paths: list[str]) -> str | None:
    """`nothing_to_train`'s message for data.eval_sources prepared as a data set of their own (a
    streamed run), said of them; None for any other message."""
    if not message.startswith(NOTHING_LEFT):
        return None
    said = message.replace(NOTHING_LEFT, "no eval examples are left", 1).replace(FROM_TRAINING, "from them", 1)
    return f"data.eval_sources ({', '.join(paths)}): {said}"


def nothing_to_train(
    sources: list[SourceReport], cfg: DataConfig, held_for_eval: int = 0, streamed: int = 0
) -> DataError:
    """The error for training sources of which no row is left to train: every cause with its count and
    the rows it names, largest first, and the fix of the largest. `sources`: the reports of
    `cfg.sources`; `held_for_eval`: their rows held out for eval (data.eval_fraction); `streamed`: the
    rows read of each source when streaming (0: every row)."""
    causes: list[tuple[int, str, str, str]] = []  # (count, cause, the text that names it, its fix)
    for s in sources:
        of = f" of {s.path}"
        for reason in sorted(s.skipped):
            fix = REASON_FIXES.get(reason, "fix or remove the rows named")
            causes.append((s.skipped[reason], reason, s.reason_text(reason, of), fix))
        if s.no_loss:
            causes.append((s.no_loss, "no trained tokens left", s.no_loss_text(of, cfg.max_length), NO_LOSS_FIX))
        if s.untrained:
            causes.append((s.untrained, "no token marked as trained", s.untrained_text(of), UNTRAINED_FIX))
    unused = [s for s in sources if s.kept > s.used]
    if unused:
        empty = [s.path for s in sources if not s.kept]
        if empty and all(src.ratio is not None for src in cfg.sources):
            fix = (
                f"{', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no usable row, so the mix by ratio takes "
                "none of the other sources' rows either: fix the rows of that source, or remove it from data.sources"
            )
        else:
            fix = "raise the `weight` of these sources (weight x kept rows rounds to none)"
        n = sum(s.kept - s.used for s in unused)
        text = f"not taken by the mix: {n} (the kept rows of {', '.join(s.path for s in unused)})"
        causes.append((n, "mix", text, fix))
    if held_for_eval:
        text = f"held out for eval (data.eval_fraction): {held_for_eval}"
        causes.append((held_for_eval, "eval", text, "lower data.eval_fraction, or give the sources more rows"))
    causes.sort(key=lambda c: -c[0])
    rows = sum(s.rows for s in sources)
    read = f" (the first {streamed} of each, streamed)" if streamed else ""
    msg = f"{NOTHING_LEFT}: none of the {rows} rows read {FROM_TRAINING}{read} can be trained"
    if not causes:  # pragma: no cover - every row is counted under some cause
        return DataError(msg + ". Check the data files and data.on_bad_row.")
    msg += ". By cause: " + "; ".join(c[2] for c in causes) + ". "
    top = [c for c in causes if c[0] == causes[0][0]]  # the largest cause, or those tied with it
    labels = [
        {"mix": "not taken by the mix", "eval": "held out for eval"}.get(c[1], f"dropped for {c[1]}") for c in top
    ]
    fixes = list(dict.fromkeys(c[3] for c in top))
    each = f" ({top[0][0]} each)" if len(top) > 1 else ""
    msg += f"Most were {' or '.join(labels)}{each}: {'; '.join(fixes)}."
    if any(s.skipped for s in sources):
        msg += " Set data.on_bad_row=error to stop at the first bad row with its problem named."
    return DataError(msg)
