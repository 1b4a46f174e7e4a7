"""Every relative link and every `#anchor` in README.md and docs/*.md resolves.

A link's file must exist (relative to the page that links it, inside the repository), and its
anchor must be the slug of a heading of the target page, as GitHub makes them: the heading's text
lowercased, everything but letters, digits, `_`, `-` and spaces dropped, each space turned into
`-`; a repeated heading gets `-1`, `-2`, ... External (http, https, mailto) links are not checked.
Links inside code (fenced blocks, inline spans) are text, not links, and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:name|id)=\"([^\"]+)\"", re.IGNORECASE)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)
            elif m.group(1) == fence:
                fence = None
            continue
        if fence is None:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before duplicates are numbered)."""
    text = LINK.sub(lambda m: m.group(1), heading)  # a link in a heading shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        out.update(HTML_ANCHOR.findall(line))
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("code", line)
        out += [(number, m.group(2)) for m in LINK.finditer(line)]
        out += [(number, m.group(1)) for m in REFERENCE.finditer(line)]
    return out


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """Each link of the page that does not resolve, as `page:line: target: why`."""
    problems = []
    for number, target in links(path):
        where = f"{path.relative_to(root)}:{number}: {target}"
        if not target:
            problems.append(f"{where}: empty link")
            continue
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path.resolve()
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor:
            if dest.suffix != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor into something that is not a markdown page")
            elif unquote(anchor) not in anchors(dest):
                problems.append(f"{where}: no heading with this anchor in {dest.relative_to(root.resolve())}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_and_anchor_resolves(page: Path):
    assert broken_links(page) == []


def test_the_docs_index_links_every_page():
    index = REPO / "docs" / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for _, t in links(index) if not EXTERNAL.match(t)}
    missing = [p.name for p in PAGES[1:] if p != index and p.resolve() not in linked]
    assert missing == [], f"docs/README.md does not link {missing}"


def test_slugs_follow_githubs_rules():
    heading = "Large datasets: prepare once, every core, or stream"
    assert slug(heading) == "large-datasets-prepare-once-every-core-or-stream"
    assert slug("What `train` does") == "what-train-does"
    assert slug("`run:`") == "run"
    assert slug("Launch modes on two H200s (2026-11-30)") == "launch-modes-on-two-h200s-2026-11-30"
    assert slug("Will it fit? `qlora-sft plan`") == "will-it-fit-qlora-sft-plan"
    assert slug("x -- y_z") == "x----y_z"


def test_the_checker_finds_broken_links(tmp_path: Path):
    """A missing file, a missing anchor and a missing duplicate number fail; code and external links do not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Title\n\n## Setup\n\n## Setup\n\n```\n## Not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/other.md#setup) [ok](docs/other.md#setup-1) [ok](#here) [ok](https://example.com/x#y)\n"
        "`[in code](nowhere.md)`\n\n"
        "## Here\n\n"
        "[missing file](docs/nope.md)\n"
        "[missing anchor](docs/other.md#teardown)\n"
        "[third setup](docs/other.md#setup-2)\n"
        "[heading inside code](docs/other.md#not-a-heading)\n"
        "[outside](../elsewhere.md)\n"
        "```\n[in a fence](nowhere.md)\n```\n"
    )
    problems = broken_links(page, root=tmp_path)
    assert [p.split(": ")[1] for p in problems] == [
        "docs/nope.md",
        "docs/other.md#teardown",
        "docs/other.md#setup-2",
        "docs/other.md#not-a-heading",
        "../elsewhere.md",
    ], problems
