"""The README and the user documentation work as written: their Python examples run, every
command they give names a module, file, make target, install extra, configuration preset,
field and flag that exist, and every relative link reaches a file (and heading)."""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

# The pages a user reads; their commands and links are checked.
PAGES = [
    "README.md",
    "CHANGELOG.md",
    "docs/hosts.md",
    "docs/library.md",
    "docs/reliability.md",
    "docs/results.md",
    "docs/running.md",
    "docs/speed.md",
    # Pages of the study's detail: their links and commands are checked as well.
    "docs/accelerators.md",
    "docs/agents.md",
    "docs/mechanism.md",
    "docs/specification.md",
]
# Commands of other programs the pages may give, checked no further.
EXTERNAL_PROGRAMS = {"tensorboard"}
# Launchers that run the command after them.
LAUNCHERS = {"srun", "time"}


def _blocks(language: str, pages=PAGES) -> list[tuple[str, int, str]]:
    found = []
    for page in pages:
        text = (REPO_ROOT / page).read_text()
        blocks = re.findall(rf"```{language}\n(.*?)```", text, re.S)
        found += [(page, i, block) for i, block in enumerate(blocks)]
    return found


PYTHON_BLOCKS = _blocks("python")


def commands(pages=PAGES) -> list[tuple[str, list[str]]]:
    """(page, argv) of every command in the pages' bash blocks: continuation lines
    joined, comments and leading VAR=value assignments dropped."""
    out = []
    for page, _, block in _blocks("bash", pages):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
                argv = argv[1:]
            while argv and argv[0] in LAUNCHERS:
                argv = argv[1:]
            if argv:
                out.append((page, argv))
    return out


COMMANDS = commands()


@functools.cache
def make_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))


@functools.cache
def install_extras() -> set[str]:
    """The keys of pyproject.toml's [project.optional-dependencies] (read as text: tomllib
    needs Python 3.11)."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.S | re.M)
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*=", section.group(1), re.M)) if section else set()


def _check_static(argv: list[str]) -> list[str]:
    """What is wrong with one command, checked without running anything."""
    program, args = argv[0], argv[1:]
    if program == "make":
        return [f"no make target {t!r}" for t in args if t not in make_targets()]
    if program == "pip":
        problems = []
        for arg in args:
            extras = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            for extra in extras.group(1).split(",") if extras else ():
                if extra not in install_extras():
                    problems.append(f"no install extra {extra!r} in pyproject.toml")
        return problems
    if program in EXTERNAL_PROGRAMS:
        return []
    if program != "python":
        return [f"unknown program {program!r} (add it to EXTERNAL_PROGRAMS if meant)"]
    if args[:1] == ["-m"]:
        module = args[1]
        if importlib.util.find_spec(module) is None:
            return [f"no module {module!r}"]
        return _check_config(args[2:])
    if not (REPO_ROOT / args[0]).is_file():
        return [f"no file {args[0]!r}"]
    return []


def _check_config(args: list[str]) -> list[str]:
    """``--config=PATH[:PRESET]`` loads, and every ``--config.FIELD`` names a field."""
    from experiments.study import cli

    values = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    if not values:
        return []
    try:
        config = cli.load_config(cli.resolve_config_path(values[-1]), values[-1])
        cli.check_overrides(config, args)
    except cli.UsageError as e:
        return [str(e)]
    return []


def test_pages_have_examples_and_commands():
    assert PYTHON_BLOCKS
    assert len(COMMANDS) > 10
    assert any(argv[:3] == ["python", "-m", "experiments.run"] for _, argv in COMMANDS)


def test_command_parser():
    page = "\n".join(
        [
            "```bash",
            "PIP_FIND_LINKS=/opt/wheels make install   # a comment",
            "srun python -m experiments.run --config=configs/noisy_ar.py:smoke \\",
            "    --config.train.steps=20",
            "```",
        ]
    )
    tmp = REPO_ROOT / "tests" / ".readme_parser_check.md"
    try:
        tmp.write_text(page)
        parsed = [argv for _, argv in commands([tmp.relative_to(REPO_ROOT)])]
    finally:
        tmp.unlink()
    assert parsed == [
        ["make", "install"],
        [
            "python",
            "-m",
            "experiments.run",
            "--config=configs/noisy_ar.py:smoke",
            "--config.train.steps=20",
        ],
    ]
    assert _check_static(["make", "no-such-target"])
    assert _check_static(["pip", "install", "-e", ".[no_such_extra]"])
    assert _check_static(["python", "-m", "experiments.no_such_module"])
    assert _check_static(["python", "-m", "experiments.run", "--config=configs/noisy_ar.py:x"])
    assert _check_static(
        ["python", "-m", "experiments.run", "--config=configs/noisy_ar.py", "--config.train.x=1"]
    )
    assert not _check_static(parsed[1])


@pytest.mark.parametrize("page,argv", COMMANDS, ids=[" ".join(a)[:60] for _, a in COMMANDS])
def test_command_names_what_exists(page, argv):
    problems = _check_static(argv)
    assert not problems, f"{page}: `{shlex.join(argv)}`: {problems}"


@functools.cache
def _help(module: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, "--helpfull"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.stdout + result.stderr


MODULE_COMMANDS = [
    (page, argv) for page, argv in COMMANDS if argv[0] == "python" and argv[1:2] == ["-m"]
]


@pytest.mark.parametrize(
    "page,argv", MODULE_COMMANDS, ids=[" ".join(a)[:60] for _, a in MODULE_COMMANDS]
)
def test_command_flags_exist(page, argv):
    """Every ``--flag`` a command passes is one its module accepts (``--helpfull``)."""
    text = _help(argv[2])
    assert "--" in text, f"{argv[2]} --helpfull printed no flags:\n{text}"
    for arg in argv[3:]:
        if not arg.startswith("--") or arg.startswith("--config."):
            continue
        name = arg[2:].split("=", 1)[0]
        known = re.search(rf"--(\[no\])?{re.escape(name)}\b", text) or (
            name.startswith("no") and re.search(rf"--\[no\]{re.escape(name[2:])}\b", text)
        )
        assert known, f"{page}: `{shlex.join(argv)}`: {argv[2]} has no flag --{name}"


@pytest.mark.parametrize("page", PAGES)
def test_inline_modules_exist(page):
    """``python -m X`` in running text (not only in code blocks) names a module."""
    modules = re.findall(r"python -m ([\w.]+)", (REPO_ROOT / page).read_text())
    missing = sorted({m for m in modules if importlib.util.find_spec(m) is None})
    assert not missing, f"{page}: no such module(s) {missing}"


@pytest.mark.parametrize("page", PAGES)
def test_named_paths_exist(page):
    """Every repository path a page names in backticks exists (``configs/...`` as the
    commands resolve it; placeholders such as ``...``, ``<step>`` or ``*`` left out)."""
    text = (REPO_ROOT / page).read_text()
    pattern = r"`((?:orthorecall|experiments|tests|results|data|docs|configs|\.ci)/[^`\s:]*)"
    missing = []
    for path in sorted(set(re.findall(pattern, text))):
        if re.search(r"\.\.\.|[<*]|\b(DIR|GROUP|PATH|PRESET|FILE|NAME)\b", path):
            continue
        places = [REPO_ROOT / path, REPO_ROOT / "experiments" / path]
        if not any(place.exists() for place in places[: 2 if path.startswith("configs/") else 1]):
            missing.append(path)
    assert not missing, f"{page}: no such path(s) {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@functools.cache
def _anchors(path) -> set[str]:
    lines = path.read_text().splitlines()
    return {_slug(m.group(1)) for line in lines if (m := re.match(r"#+ (.*)", line))}


@pytest.mark.parametrize("page", PAGES)
def test_links_reach_files_and_headings(page):
    source = REPO_ROOT / page
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        resolved = (source.parent / path).resolve() if path else source
        if not resolved.exists():
            problems.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            problems.append(f"{target}: no heading #{anchor}")
    assert not problems, f"{page}: {problems}"


@pytest.mark.parametrize("page,index", [(p, i) for p, i, _ in PYTHON_BLOCKS])
@pytest.mark.slow
def test_example_runs(page, index):
    code = next(b for p, i, b in PYTHON_BLOCKS if (p, i) == (page, index))
    exec(compile(code, f"{page} python block {index}", "exec"), {})
