"""What preparing the data reports: per source (rows read, kept, used in the mix, skipped by reason,
how its rows were limited) and for the split (rows, tokens per example, the share of tokens that
carry loss, how many conversations train their end-of-turn token); `check_end_tokens` refuses data
in which none does."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import DataError
from ..recipe import DataConfig


@dataclass
class SourceReport:
    path: str
    format: str
    rows: int = 0
    kept: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    limit: str = ""  # data.sources[i].max_rows, as text ("" = every row read)


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
    dropped_no_loss: int = 0
    loss_token_fraction: float = 0.0
    eos_trained_fraction: float = 0.0
    end_token: str = ""
    streamed_sample: int = 0  # streaming: the statistics describe the first rows only
    chat_rows: int = 0  # train rows that are conversations (the end-token fraction counts these)

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
            skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) or "none"
            out.append(
                f"source {s.path} [{s.format}]: {s.rows} rows{f' ({s.limit})' if s.limit else ''}, {s.kept} kept, "
                f"{s.used} used in the mix, skipped: {skipped}"
            )
        if self.streamed_sample:
            out.append(
                "streaming: training rows are read and tokenized as training goes (their number is unknown); "
                f"the figures here describe the first {self.streamed_sample} rows of each source"
            )
            out.append(f"split: train rows as the stream yields them, {self.eval_rows} eval rows")
        else:
            out.append(f"split: {self.train_rows} train rows, {self.eval_rows} eval rows")
        out.append(
            f"tokens per train example: mean {self.tokens_mean:.1f}, p95 {self.tokens_p95}, max "
            f"{self.tokens_max}, total {self.tokens_total}; truncated rows: {self.truncated}"
            + (f"; dropped (no trained tokens left): {self.dropped_no_loss}" if self.dropped_no_loss else "")
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
