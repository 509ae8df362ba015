"""Every relative link and #anchor in README.md and docs/*.md resolves: to a file or folder of the
repository, and to a heading of the file it names, by GitHub's slug rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; the text may hold code spans.
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...


def _prose(text: str) -> str:
    """The text without its fenced code blocks (a `# comment` there is no heading, and a
    `[x](y)` is no link)."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text (links as their text, no emphasis or
    code marks) lowercased, punctuation other than '-' and '_' removed, each space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = "".join(c for c in text.lower() if c.isalnum() or c in "-_ ")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of ``path``'s headings; GitHub suffixes a repeated one with -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[str]:
    """The link targets of ``path``'s prose, code spans and blocks left out."""
    return _LINK.findall(_CODE_SPAN.sub("", _prose(path.read_text(encoding="utf-8"))))


def broken_links(path: Path) -> list[str]:
    """Each relative link of ``path`` whose file or anchor does not exist, with why."""
    broken = []
    for target in links(path):
        if _EXTERNAL.match(target):
            continue
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{path.name}: {target}: no file {file_part}")
        elif fragment and (resolved.is_dir() or fragment not in anchors(resolved)):
            broken.append(f"{path.name}: {target}: no heading #{fragment} in {file_part or path.name}")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    assert broken_links(path) == []


def test_the_checker_reads_the_docs_links():
    names = {p.name for p in DOCS}
    assert {"README.md", "api.md", "cli.md", "performance.md", "gpu.md"} <= names
    relative = [t for p in DOCS for t in links(p) if not _EXTERNAL.match(t)]
    # README.md alone links each docs page and an anchor or two: far fewer found means the link
    # pattern stopped matching, and the check above would pass on nothing.
    assert len(relative) >= 20
    assert any("#" in t for t in links(ROOT / "README.md"))


@pytest.mark.parametrize(
    ("heading", "expected"),
    [
        ("Quick start", "quick-start"),
        ("`reparameterize_kl`: saved `eps` against drawing it again (Intel Xeon, 2026-12-02)",
         "reparameterize_kl-saved-eps-against-drawing-it-again-intel-xeon-2026-12-02"),
        ("diffusers' `AutoencoderKL` (AMD EPYC, 1 thread, 2026-12-03)",
         "diffusers-autoencoderkl-amd-epyc-1-thread-2026-12-03"),
        ("Speed: one NVIDIA H200, 2026-12-04", "speed-one-nvidia-h200-2026-12-04"),
        ("**Bold** and [a link](x.md) & more", "bold-and-a-link--more"),
    ],
)
def test_slug_follows_githubs_rules(heading, expected):
    assert slug(heading) == expected


def test_the_checker_finds_a_missing_file_a_missing_anchor_and_nothing_else(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "other.md").write_text("# Title\n\n## Same\n\n## Same\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Its own part\n\n"
        "[ok](other.md) [ok](other.md#title) [ok](other.md#same-1) [ok](#its-own-part) [ok](sub/)\n"
        "[ok](https://example.com/x.md#nope) ![ok](other.md)\n"
        "`[not a link](missing-in-code-span.md)`\n\n"
        "```\n# not a heading\n[not a link](missing-in-fence.md)\n```\n\n"
        "[bad](missing.md) [bad](other.md#nope) [bad](other.md#same-2) [bad](#not-a-heading)"
        " [bad](sub/#x)\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "page.md: missing.md: no file missing.md",
        "page.md: other.md#nope: no heading #nope in other.md",
        "page.md: other.md#same-2: no heading #same-2 in other.md",
        "page.md: #not-a-heading: no heading #not-a-heading in page.md",
        "page.md: sub/#x: no heading #x in sub/",
    ]
