"""Every relative link in README.md, DEVELOPERS.md, BENCHMARKS.md and docs/ leads to a file and heading.

The documentation's links hold: every relative link in README.md, DEVELOPERS.md, BENCHMARKS.md and docs/*.md
names a file that exists and, with a #anchor into a markdown file, a heading of that file, by GitHub's anchor
rules (lowercase; spaces to '-'; punctuation other than '-' and '_' dropped; a repeated heading gets -1, -2...)."""

import re
from pathlib import Path

from helpers import ROOT

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)  # a fenced block, from its fence to the closing one
CODE = re.compile(r"`[^`]*`")  # an inline code span
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text as markdown reads it for links and headings: no fenced blocks (their '# comment' lines are not
    headings) and no inline code (a `[x](y)` there is not a link)."""
    return CODE.sub("code", FENCE.sub("", text))


def anchor(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors as its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set:
    seen, found = {}, set()
    for h in HEADING.findall(FENCE.sub("", path.read_text())):
        a = anchor(h)
        found.add(a if a not in seen else f"{a}-{seen[a]}")
        seen[a] = seen.get(a, 0) + 1
    return found


def broken_links(path: Path, root: Path = ROOT) -> list:
    """Each relative link of a markdown file that leads nowhere, as 'file: target (why)', file relative to root."""
    bad = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        file, _, frag = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{path.relative_to(root)}: {target} (no such heading in {dest.name})")
    return bad


def documents() -> list:
    return [ROOT / "README.md", ROOT / "DEVELOPERS.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_in_the_docs_leads_to_a_file_and_heading():
    assert [p for p in documents() if not p.is_file()] == []
    assert [b for p in documents() for b in broken_links(p)] == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    """Negative control: the check above would see a link that leads nowhere."""
    (tmp_path / "b.md").write_text("# Sharded training (`train.parallel: ddp | fsdp`)\n\n## Resume\n\n## Resume\n")
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#sharded-training-trainparallel-ddp--fsdp) [ok](b.md#resume-1) [ok](#top)\n"
                    "# Top\n```\n# not a heading\n[in code](gone.md)\n```\n`[inline](gone.md)` [web](https://x.org/y)\n"
                    "[gone](gone.md) [no heading](b.md#resume-2) ![no image](img.png) [no local](#not-a-heading)\n")
    assert broken_links(page, tmp_path) == ["a.md: gone.md (no such file)", "a.md: b.md#resume-2 (no such heading in b.md)",
                                  "a.md: img.png (no such file)", "a.md: #not-a-heading (no such heading in a.md)"]


def test_github_anchors():
    assert anchor("Hear your fine-tune: `higgs-ddp speak`") == "hear-your-fine-tune-higgs-ddp-speak"
    assert anchor("Audio conditioning (`data.audio`)") == "audio-conditioning-dataaudio"
    assert anchor("Memory per GPU, and the check before a run") == "memory-per-gpu-and-the-check-before-a-run"
