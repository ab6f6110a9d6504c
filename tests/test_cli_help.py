"""`openpi-rl COMMAND --help` describes every flag, each with its own words: the help of every
command and subcommand, read as a user reads it (the real `openpi_rl.cli.main`, its stdout).

tyro copies a comment written above a group of dataclass fields onto every following field
without a comment of its own (issue 14): `--metrics-host` then read "The replay's durability
and retention…". Here two different fields may not share one description, and every field has
one."""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter, defaultdict

import pytest

from openpi_rl.cli import COMMANDS, main

COLUMNS = 100  # long descriptions wrap; the parser joins them back

# Commands and the arguments that lead to a help page of their own; subcommands found in a
# page's usage line (`{model:gaussian-mlp,model:pi0-fast}`) are walked from there.
ROOTS = [
    ("train",),
    ("serve",),
    ("bridge",),
    ("learn",),
    ("daemon",),
    ("check",),
    ("replay",),
    ("replay", "stats"),
    ("replay", "migrate"),
    ("admin",),
    ("demo",),
    ("keys",),
    ("keys", "generate"),
    ("export-openpi",),
    ("eval",),
]

# Flags every page has, whose words are argparse's and tyro's own.
OWN = {"-h", "--help"}
_HINTS = re.compile(r"\s*\((default|required|fixed to|sets)\b[^()]*(\([^()]*\)[^()]*)*\)\s*$")


def help_page(args: tuple[str, ...]) -> tuple[str, str | None]:
    """(stdout, None), or (stdout, what is wrong) when `--help` did not print help and exit 0."""
    stdout, stderr = io.StringIO(), io.StringIO()  # no encoding: tyro's plain layout, no boxes
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = main([*args, "--help"])
    except SystemExit as e:
        rc = e.code
    out, err = stdout.getvalue(), stderr.getvalue()
    if rc not in (0, None) or "-h, --help" not in out:
        return out, f"openpi-rl {' '.join(args)} --help: exit {rc}, stdout {out!r}, stderr {err!r}"
    return out, None


def _strip_hints(text: str) -> str:
    """The description without tyro's trailing `(default: …)` / `(required)` hints."""
    while True:
        stripped = _HINTS.sub("", text)
        if stripped == text:
            return text.strip()
        text = stripped


def parse_tyro(page: str) -> dict[str, str]:
    """{flag: description} from tyro's plain layout (stdout not UTF-8: no boxes): a section title
    at indent 1 over a rule, then `  --flag TYPE` with its words indented below it (or beside it
    after two spaces); a group's description sits above a rule inside the section."""
    flags: dict[str, list[str]] = {}
    current: str | None = None
    section = ""
    lines = page.splitlines()
    for i, line in enumerate(lines):
        following = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if not line.strip() or set(line.strip()) == {"-"}:
            current = None
        elif re.match(r"^ \S", line):
            section, current = line.strip(), None
        elif section == "subcommands":
            current = None
        elif re.match(r"^  \S", line) and following and set(following) == {"-"}:
            current = None  # a group's description, above its rule
        elif re.match(r"^  -", line) or (section == "positional arguments" and line[2] != " "):
            invocation, _, rest = line.strip().partition("  ")  # a flag holds no two spaces
            current = invocation.split(", ")[0].split(" ")[0]
            flags[current] = [rest.strip()] if rest.strip() else []
        elif current is not None and line.startswith("   "):
            flags[current].append(line.strip())
        else:
            current = None
    return {f: _strip_hints(" ".join(words)) for f, words in flags.items()}


def parse_argparse(page: str) -> dict[str, str]:
    """{flag: description} from argparse's plain help: `  --flag VALUE  words`."""
    flags: dict[str, list[str]] = {}
    current: str | None = None
    section = ""
    for line in page.splitlines():
        if line and not line.startswith(" "):
            section, current = line, None
            continue
        if section not in ("options:", "positional arguments:") or not line.strip():
            current = None
            continue
        if re.match(r"^  \S", line):
            head, _, rest = line[2:].partition("  ")
            current = head.split(", ")[-1].split(" ")[0]
            if current.startswith("{"):  # a choice of commands, named by its metavar
                current = "COMMAND"
            flags[current] = [rest.strip()] if rest.strip() else []
        elif current is not None:
            flags[current].append(line.strip())
    return {f: _strip_hints(" ".join(words)) for f, words in flags.items()}


def subcommands(page: str) -> list[str]:
    usage = page.split("\n\n")[0]
    return [c for group in re.findall(r"\[?\{([^}]*)\}", usage) for c in group.split(",")]


@pytest.fixture(scope="module")
def walked(tmp_path_factory) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{command: {flag: description}} of every help page, and the commands whose `--help` did
    not print one."""
    pages: dict[str, dict[str, str]] = {}
    failed: list[str] = []
    todo = list(ROOTS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", str(COLUMNS))
        mp.chdir(tmp_path_factory.mktemp("cwd"))  # where a `--help` taken for a name would write
        while todo:
            args = todo.pop(0)
            page, error = help_page(args)
            if error:
                failed.append(error)
                continue
            tyro_page = "\n ---" in page
            pages[" ".join(args)] = parse_tyro(page) if tyro_page else parse_argparse(page)
            if tyro_page:  # argparse's `{status,pin}` are positional values, not pages
                todo += [(*args, sub) for sub in subcommands(page) if ":" in sub]
    return pages, failed


def test_every_command_is_walked():
    assert {args[0] for args in ROOTS} == set(COMMANDS)


def test_help_of_every_command_prints_help_and_exits_0(walked):
    pages, failed = walked
    assert not failed, "\n".join(failed)
    assert len(pages) >= len(ROOTS) + 2, sorted(pages)  # the model subcommands were walked
    # The parsers read what a user reads (not an empty page that would pass the tests below).
    assert pages["serve"]["--metrics-host"] and pages["serve"]["--serve.seed"]
    assert pages["serve model:pi0-fast-openpi"]["--model.prompt"]
    assert pages["replay stats"]["PATH"] and pages["admin"]["--endpoint"]


def test_no_two_fields_share_a_description(walked):
    # Within a page no two flags say the same. Across pages, the same field reached through
    # two commands (`--model.hidden` of serve and learn) may; two fields named differently
    # may not.
    pages, _ = walked
    names: dict[str, set[str]] = defaultdict(set)
    where: dict[str, set[str]] = defaultdict(set)
    for cmd, flags in pages.items():
        on_page = Counter(flags.values())
        for flag, text in flags.items():
            if not text or flag in OWN:
                continue
            alone = on_page[text] == 1
            names[text].add(flag.lstrip("-").split(".")[-1] if alone else f"{cmd} {flag}")
            where[text].add(f"{cmd.split()[0]} {flag}")
    shared = {text: sorted(where[text]) for text, n in names.items() if len(n) > 1}
    report = "\n".join(f"{', '.join(w)}\n    {t[:90]!r}" for t, w in shared.items())
    assert not shared, f"{len(shared)} descriptions shared by different fields:\n{report}"


def test_every_field_has_a_description(walked):
    pages, _ = walked
    missing = sorted(
        {
            f"{cmd.split()[0]} {flag}"
            for cmd, flags in pages.items()
            for flag, text in flags.items()
            if not text and flag not in OWN
        }
    )
    assert not missing, f"{len(missing)} flags without a description:\n" + "\n".join(missing)
