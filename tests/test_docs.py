"""The docs cannot rot: their links and #anchors resolve, the make targets and command-line flags they name exist,
the samples they send exist, and their curl examples answer as shown against a real TorchServe."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCUMENTED_URL = "127.0.0.1:8080"  # where the docs' commands expect `make serve`; the tests' server stands in
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
# The project's commands as the docs name them, and how to ask each for its --help.
PROGRAMS = {
    "mnist-registry": ("-m", "registry.cli"),
    "mnist-train": ("-m", "training"),
    "python -m training": ("-m", "training"),
    "mnist-predict": ("-m", "handler.client"),
}
COMMAND = re.compile(
    r"(?P<program>mnist-registry|mnist-train|mnist-predict|python3? -m (?:training|handler\.\w+|bench\.\w+)"
    r"|(?:scripts|samples)/\w+\.py)(?P<rest>[^`\n]*)"
)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def prose(text: str) -> str:
    """The text without its fenced code blocks (their lines kept empty, so line numbers still hold)."""
    return FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)


def code(text: str) -> list[str]:
    """Every piece of code in a page: the lines of its fenced blocks and its inline code spans."""
    pieces = [line for block in FENCE.finditer(text) for line in block.group(2).splitlines()]
    return pieces + INLINE_CODE.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} +(.+)$", prose(path.read_text()), re.MULTILINE):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_links_and_anchors_resolve(page):
    broken = []
    text = prose(page.read_text())
    for target in LINK.findall(INLINE_CODE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {doc_id(linked)}")
    assert not broken, f"{doc_id(page)} links to what is not there:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page():
    readme = ROOT / "README.md"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(readme.read_text())}
    assert not [doc_id(page) for page in DOCS[1:] if page not in linked]
    assert len(readme.read_text().splitlines()) <= 150


def make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return {target for line in re.findall(r"^([\w. -]+):(?!=)", makefile, re.MULTILINE) for target in line.split()}


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_named_make_targets_exist(page):
    named = {target for piece in code(page.read_text()) for target in re.findall(r"\bmake ([a-z][a-z0-9-]*)", piece)}
    assert not named - make_targets(), f"{doc_id(page)} names make targets the Makefile lacks"


@pytest.mark.parametrize("page", DOCS, ids=doc_id)
def test_named_samples_exist(page):
    named = set(re.findall(r"samples/[\w.-]+\.\w+", page.read_text()))
    assert not [name for name in named if not (ROOT / name).is_file()]


# --- command-line flags ------------------------------------------------------------------------------


def invocation(program: str) -> list[str]:
    if program in PROGRAMS:
        return [sys.executable, *PROGRAMS[program]]
    if program.startswith("python"):
        return [sys.executable, "-m", program.split()[-1]]
    return [sys.executable, str(ROOT / program)]


@functools.cache
def help_text(program: str, subcommand: str = "") -> str:
    command = [*invocation(program), *([subcommand] if subcommand else []), "--help"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


@functools.cache
def subcommands(program: str) -> tuple[str, ...]:
    """The subcommands its --help lists under positional arguments (argparse's indented COMMAND list)."""
    listed = help_text(program).partition("positional arguments:")[2].partition("options:")[0]
    return tuple(re.findall(r"^ {4}([a-z][\w-]*)(?: {2,}|$)", listed, re.MULTILINE))


def allowed_flags(program: str, subcommand: str) -> set[str]:
    texts = [help_text(program, subcommand)] if subcommand else [help_text(program)]
    if not subcommand:  # a flag beside the program alone may belong to any of its subcommands
        texts += [help_text(program, name) for name in subcommands(program)]
    return {"--help"} | {flag for text in texts for flag in FLAG.findall(text)}


def option_helps(text: str) -> list[str]:
    """Each option's entry in an argparse --help: from its flag at the start of a line to the next one."""
    options = text.partition("options:")[2]
    return [entry for entry in re.split(r"\n(?=  -)", options) if entry.strip()]


@pytest.mark.slow  # asks every command for its --help
@pytest.mark.parametrize("program", ["mnist-registry", "mnist-train", "mnist-predict"])
def test_each_default_is_shown_once(program):
    twice = []
    for subcommand in ("", *subcommands(program)):
        for entry in option_helps(help_text(program, subcommand)):
            flat = " ".join(entry.split())
            if flat.count("(default") > 1 or "(default: None)" in flat or "(default: False)" in flat:
                twice.append(f"{program} {subcommand}: {flat}")
    assert not twice, "\n".join(twice)


@dataclass(frozen=True)
class Use:
    page: str
    program: str
    subcommand: str
    flags: tuple[str, ...]
    text: str


def uses() -> list[Use]:
    """Every project command named with flags in the docs: the flags up to the end of that command."""
    found = []
    for page in DOCS:
        for piece in code(page.read_text()):
            for match in COMMAND.finditer(piece):
                program = re.sub(r"^python3? ", "python ", match["program"])
                rest = re.split(r" #|;|&&|\|\||\||\)|\$\(", match["rest"])[0]
                flags = tuple(FLAG.findall(rest))
                if not flags:
                    continue
                words = rest.split()
                found.append(Use(doc_id(page), program, words[0] if words else "", flags, match.group(0).strip()))
    return found


@pytest.mark.slow  # asks every command for its --help
def test_named_flags_exist():
    wrong = []
    for use in uses():
        subcommand = use.subcommand if use.subcommand in subcommands(use.program) else ""
        missing = [flag for flag in use.flags if flag not in allowed_flags(use.program, subcommand)]
        if missing:
            wrong.append(f"{use.page}: {' '.join(missing)} in `{use.text}`")
    assert not wrong, "flags the commands' --help does not list:\n" + "\n".join(wrong)


# --- the curl examples, against a real server ------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    page: str
    command: str
    shown: str  # the `# ...` lines under the command: the answer the docs show


def examples() -> list[Example]:
    """Every curl command of the docs' bash blocks that asks the documented server, with the answer shown under it."""
    found = []
    for page in DOCS:
        for block in FENCE.finditer(page.read_text()):
            if block.group(1) != "bash":
                continue
            lines = [line.strip() for line in block.group(2).replace("\\\n", " ").splitlines()]
            for number, line in enumerate(lines):
                if line.startswith("curl ") and DOCUMENTED_URL in line:
                    shown = []
                    for following in lines[number + 1 :]:
                        if not following.startswith("#"):
                            break
                        shown.append(following.lstrip("# "))
                    found.append(Example(doc_id(page), line, "\n".join(shown)))
    return found


def answer_facts(text: str) -> dict[str, list[str]]:
    """What an answer says that the docs show: digits, error codes, the HTTP status and header names."""
    return {
        "digits": re.findall(r'"digit": ?(\d+)', text),
        "codes": re.findall(r'"code": ?(\d{3})', text),
        "status": re.findall(r"^HTTP/[\d.]+ (\d{3})", text, re.MULTILINE),
        "headers": sorted({name.lower() for name in re.findall(r"^(X-[\w-]+):", text, re.MULTILINE | re.IGNORECASE)}),
    }


@pytest.mark.slow
@pytest.mark.serve
@pytest.mark.parametrize("example", examples(), ids=lambda example: f"{example.page}:{example.command[:60]}")
def test_curl_example_answers_as_shown(example, server):
    command = example.command.replace(DOCUMENTED_URL, urlsplit(server.url()).netloc)
    done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"`{example.command}` failed ({done.returncode}):\n{done.stdout}{done.stderr}"
    got = answer_facts(done.stdout.replace("\r\n", "\n"))
    if example.shown:  # the digits, codes and status as shown; the headers shown among those sent
        shown = answer_facts(example.shown)
        assert set(shown.pop("headers")) <= set(got.pop("headers")), f"{done.stdout}\nlacks headers of\n{example.shown}"
        assert got == shown, (
            f"`{example.command}` in {example.page} answered\n{done.stdout}\nnot as shown:\n{example.shown}"
        )
    else:  # no answer shown: a digit and no error will do
        assert got["digits"] and not got["codes"], f"`{example.command}` in {example.page} answered\n{done.stdout}"


def test_the_quick_start_ends_with_an_answer_shown():
    quick_start = (ROOT / "README.md").read_text().partition("## Quick start")[2].partition("\n## ")[0]
    assert [
        example
        for example in examples()
        if example.page == "README.md" and example.command in quick_start and example.shown
    ], "the README's quick start should end with a curl to the server and its answer"
