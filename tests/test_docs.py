"""README.md and docs/*.md stay true to the tree: the README is at most 200 lines and documents
``make test`` (what CI runs); every relative link resolves to a file (and a ``#fragment`` to a
heading of the linked page); every ``make TARGET`` shown is a Makefile target; every
``lass-sparse ...`` command line shown (also the ``torchrun ... -m lass_sparse.cli -- ...`` form)
names real subcommands and options of the ``lass-sparse`` parser."""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace or ")" (titles are not used)
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...
STOP = {"|", "||", "&&", ";", ">", ">>", "<", "2>&1"}


def _page_id(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def _split(page: pathlib.Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(prose lines, code lines)`` of a markdown file, each as ``(line number, text)``."""
    prose, code, in_fence = [], [], False
    for no, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        (code if in_fence else prose).append((no, line))
    return prose, code


def _links(page: pathlib.Path) -> list[tuple[int, str]]:
    """Inline links of the prose (code spans and fenced blocks are not links)."""
    out = []
    for no, line in _split(page)[0]:
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            out.append((no, m.group(1)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _split(page)[0]:
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _code_texts(page: pathlib.Path) -> list[tuple[int, str]]:
    """Shell-like texts of a page: fenced lines (``\\``-continued lines joined) and inline code
    spans of the prose (a table's ``\\|`` unescaped)."""
    prose, code = _split(page)
    out, buf, start = [], "", 0
    for no, line in code:
        if not buf:
            start = no
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    for no, line in prose:
        for m in INLINE_CODE.finditer(line.replace("\\|", "|")):
            out.append((no, m.group(2)))
    return out


def _tokens(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose-like text
        return text.split()


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _placeholder(token: str) -> bool:
    return (token.isupper() or token.startswith(("<", "{", "[")) or "..." in token
            or "…" in token)


def _check_command(root: argparse.ArgumentParser, words: list[str], where: str) -> list[str]:
    """Problems with one documented ``lass-sparse WORDS...`` invocation."""
    problems = []
    parsers = [(root, "lass-sparse")]
    for word in words:
        if word in STOP or word.startswith("#"):
            break
        if word.startswith("--"):
            if word == "--":
                continue
            opt = word.split("=", 1)[0]
            for p, name in parsers:
                if opt != "--debug" and opt not in p._option_string_actions:
                    problems.append(f"{where}: `{name}` has no option {opt}")
            continue
        subs = [_subparsers(p) for p, _ in parsers]
        if not all(subs):
            continue  # a positional or an option's value
        if _placeholder(word):
            break  # `lass-sparse <command> --help`: nothing more to check
        nxt = []
        for (p, name), choices in zip(parsers, subs):
            for alt in word.split("|"):
                if alt in choices:
                    nxt.append((choices[alt], f"{name} {alt}"))
                elif p is not root or root.epilog is None:  # epilog: a group failed to import
                    problems.append(f"{where}: `{name}` has no subcommand {alt!r}")
        if not nxt:
            break
        parsers = nxt
    return problems


def _invocations(text: str) -> list[list[str]]:
    """The word lists after each ``lass-sparse`` (or ``-m lass_sparse.cli [--]``) in ``text``."""
    toks = _tokens(text)
    out = []
    for i, t in enumerate(toks):
        if t == "lass-sparse":
            out.append(toks[i + 1:])
        elif t == "lass_sparse.cli" and i > 0 and toks[i - 1] == "-m":
            rest = toks[i + 1:]
            out.append(rest[1:] if rest[:1] == ["--"] else rest)
    return out


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    bad = []
    for no, target in _links(page):
        if EXTERNAL.match(target):
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{_page_id(page)}:{no}: ({target})"
        if not dest.exists():
            bad.append(f"{where} does not exist")
        elif fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            bad.append(f"{where} has no heading #{fragment}")
    assert not bad, "\n".join(bad)


def test_readme_is_short_and_documents_make_test():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most 200)"
    assert any("make test" in line for line in lines), "README.md must document `make test`"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\s*$", ci, flags=re.M), ".ci/run no longer calls `make test`"


def test_readme_shows_the_make_targets():
    text = README.read_text(encoding="utf-8")
    for target in ("install", "demo", "test", "bench", "lint"):
        assert f"make {target}" in text, f"README.md does not show `make {target}`"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_make_targets_exist(page):
    targets = _make_targets()
    bad = []
    for no, text in _code_texts(page):
        toks = _tokens(text)
        for i, t in enumerate(toks[:-1]):
            if t != "make":
                continue
            nxt = toks[i + 1]
            if not re.fullmatch(r"[a-z][a-z0-9|-]*", nxt):
                continue
            bad += [f"{_page_id(page)}:{no}: make {alt}" for alt in nxt.split("|")
                    if alt not in targets]
    assert not bad, "not Makefile targets:\n" + "\n".join(bad)


@pytest.fixture(scope="module")
def cli_parser():
    from lass_sparse.cli import build_parser

    return build_parser()


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_documented_commands_exist(page, cli_parser):
    bad = []
    for no, text in _code_texts(page):
        for words in _invocations(text):
            bad += _check_command(cli_parser, words, f"{_page_id(page)}:{no}")
    assert not bad, "\n".join(bad)


def test_the_command_checker_catches_mistakes(cli_parser):
    """The checks above would see a wrong subcommand or option."""
    assert _check_command(cli_parser, ["experiment", "run", "demo", "--scale", "0.1"], "x") == []
    assert _check_command(cli_parser, ["experiment", "report|publish", "CONFIG"], "x") == []
    assert _check_command(cli_parser, ["<command>", "--help"], "x") == []
    assert _check_command(cli_parser, ["experiment", "rnu", "demo"], "x")
    assert _check_command(cli_parser, ["train", "--run", "R", "--stpes", "5"], "x")
    assert _check_command(cli_parser, ["prune", "--run", "R", "--nproc-per-node", "2"], "x")
    assert _invocations("torchrun --nproc-per-node 4 -m lass_sparse.cli -- joint --run R") == [
        ["joint", "--run", "R"]]
    assert _slug("The run folder") == "the-run-folder"
    assert _slug("`lass_sparse/`") == "lass_sparse"
