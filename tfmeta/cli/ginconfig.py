"""Reading the command line's gin files and bindings, with a one-line error for each mistake.

`load(files, params)` checks every `--gin_file` and every file it includes
(it exists, is a file, is UTF-8 text, parses) and every `--gin_param` before
gin binds anything, so a
typo is reported with its file and line, or its binding, and the fix:

    --gin_param 'train.learner=Reptile()': 'Reptile' is not a gin value: write
    @Reptile() to build one (a configurable is referenced with @), or 'Reptile'
    for a string.

An `include 'name.gin'` line names a file relative to the including file's
folder, else to the working folder, else in the repository's gin/; `load`
resolves every include itself, so gin never searches (its search logs
"ERROR:root:Path not found" for every place it looks in vain), and a copy of
gin/many_shot*.gin in a folder of one's own includes that folder's
many_shot.gin. Then gin parses them (names are checked against what
`tfmeta.configurables` registered; `tfmeta.cli.errors.explain_gin_error`
suggests the closest).

`bindings()` is the configuration in force as a flat dict, which a resumed
run compares with the run it continues.

Example::

    files = ginconfig.load(["gin/digits.gin"], ["train.meta_updates = 30"])
    ginconfig.check_required("train", ["tasks", "model"], files)
"""

from __future__ import annotations

import difflib
import io
import pathlib
import re
import tokenize

import gin
from gin import config_parser

from tfmeta.cli import errors

#: The repository's gin folder: `--gin_file digits.gin` and `include` lines are looked up there too.
REPO_GIN = pathlib.Path(__file__).resolve().parents[2] / "gin"
EXAMPLE = "gin/digits.gin"


def _config_error(message):
    from tfmeta.validation import ConfigError

    return ConfigError(message)


def resolve(name):
    """The gin file `name` (as given, or in the repository's gin/), or a ConfigError."""
    given = pathlib.Path(name)
    for path in (given, REPO_GIN / given):
        if path.is_dir():
            raise _config_error(
                f"--gin_file {name} is a directory, not a gin file: pass one of the files in "
                f"it (e.g. --gin_file {path / 'config.gin'})."
            )
        if path.is_file():
            return path
    known = sorted(p.name for p in REPO_GIN.glob("*.gin")) if REPO_GIN.is_dir() else []
    close = difflib.get_close_matches(given.name, known, n=1)
    hint = f"; did you mean gin/{close[0]}?" if close else f" (e.g. {EXAMPLE})"
    raise _config_error(f"gin: --gin_file {name} does not exist: pass an existing --gin_file{hint}")


class _NamesOnly(config_parser.ParserDelegate):
    """Parses references and macros to their names: a syntax check that binds nothing."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return scoped_configurable_name

    def macro(self, macro_name):
        return macro_name


def _syntax_problem(text):
    """`(line, what is wrong and the fix)` for gin text that does not parse, else None."""
    try:
        for _ in config_parser.ConfigParser(text, _NamesOnly()):
            pass
    except SyntaxError as error:
        token = re.search(r"Failed to parse token '([^']*)'", str(error.msg))
        if token:
            name = token.group(1)
            return error.lineno, (
                f"{name!r} is not a gin value: write @{name}() to build one (a configurable is "
                f"referenced with @), or '{name}' for a string"
            )
        shown = (error.text or "").strip()
        return error.lineno, (
            f"gin cannot parse {shown!r} ({error.msg.splitlines()[0]}): write each binding as "
            "configurable.parameter = value, e.g. train.meta_updates = 300"
        )
    except tokenize.TokenError as error:
        line = error.args[1][0] if len(error.args) > 1 else None
        return line, (
            "a bracket or quote is opened and never closed: close it (gin values are Python "
            "literals, e.g. (64, 64) or 'text')"
        )
    return None


def _checked_text(path, name):
    """The text of gin file `path` (`name` in messages), or a ConfigError if it is not gin."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise _config_error(
            f"--gin_file {name} is not a gin text file (byte {error.object[error.start]:#04x} at "
            f"offset {error.start} is not UTF-8): pass a gin config such as {EXAMPLE}."
        ) from None
    problem = _syntax_problem(text)
    if problem:
        line, detail = problem
        raise _config_error(f"gin: {name} line {line}: {detail}.")
    return text


def _include_target(name, including, line):
    """The file `include name` on `line` of `including` means (see the module docstring)."""
    given = pathlib.Path(name)
    places = [given] if given.is_absolute() else [including.parent / given, given, REPO_GIN / given]
    for path in places:
        if path.is_file():
            return path
    raise _config_error(
        f"gin: {including} line {line}: include {name!r} does not exist (looked in "
        f"{including.parent.resolve()}, the working folder and {REPO_GIN}): name an existing "
        "gin file, relative to the including file's folder (e.g. include 'many_shot.gin')."
    )


def _pieces(path, name, chain=()):
    """`[(path, text)]`: gin file `path` as texts to parse in order, its includes expanded.

    Each text is the file's with every line outside one stretch between
    two `include` statements blanked, so gin's line numbers stay the
    file's; the `import` lines above the stretch are kept, as gin applies
    them to the rest of the file.
    """
    text = _checked_text(path, name)
    lines = io.StringIO(text).readlines()  # the lines gin's tokenizer numbers
    statements = list(config_parser.ConfigParser(text, _NamesOnly()))
    starts = [s.location.line_num for s in statements] + [len(lines) + 1]
    imports = {s.location.line_num for s in statements
               if isinstance(s, config_parser.ImportStatement)}

    def stretch(begin, end):
        kept = "".join(text if begin <= number < end or (number in imports and number < begin)
                       else "\n" for number, text in enumerate(lines, start=1))
        return path, kept

    found, begin, chain = [], 1, (*chain, path.resolve())
    for statement, following in zip(statements, starts[1:]):
        if not isinstance(statement, config_parser.IncludeStatement):
            continue
        line = statement.location.line_num
        target = _include_target(statement.filename, path, line)
        if target.resolve() in chain:
            cycle = " -> ".join(str(p) for p in (*chain, target.resolve()))
            raise _config_error(
                f"gin: {path} line {line}: include {statement.filename!r} closes an include "
                f"cycle ({cycle}): remove one of these include lines."
            )
        found += [stretch(begin, line), *_pieces(target, str(target), chain)]
        begin = following
    return [*found, stretch(begin, len(lines) + 1)]


def _parse(path, text):
    named = io.StringIO(text)
    named.name = str(path)  # gin's error locations name the file
    gin.parse_config(named)


def _check_param(param):
    problem = _syntax_problem(param)
    if problem:
        raise _config_error(f"gin: --gin_param {param!r}: {problem[1]}.")


def load(files, params=()):
    """Check, then parse the gin `files` and `params`; returns the resolved file paths.

    Raises a one-line `ConfigError` (or gin's own error, first line
    meaningful) naming the file and line, or the binding, and the fix.
    """
    paths = [resolve(name) for name in files]
    pieces = [piece for path, name in zip(paths, files) for piece in _pieces(path, name)]
    for param in params:
        _check_param(param)
    try:
        for path, text in pieces:
            _parse(path, text)
        gin.parse_config(list(params))
        gin.finalize()
    except (ValueError, OSError) as error:
        explained = errors.explain_gin_error(error)
        if explained is None:
            raise
        raise explained from error
    return paths


def is_bound(key):
    """Whether gin has a binding for `key` (e.g. "train.seed")."""
    try:
        gin.query_parameter(key)
    except ValueError:
        return False
    return True


def query(key, default=None):
    """The value bound to `key` (references unevaluated), or `default`."""
    return gin.query_parameter(key) if is_bound(key) else default


def check_required(configurable, names, files):
    """Raise a ConfigError naming every `configurable.name` of `names` left unbound."""
    missing = [f"{configurable}.{name}" for name in names if not is_bound(f"{configurable}.{name}")]
    if missing:
        shown = ", ".join(str(f) for f in files) or "no --gin_file"
        raise _config_error(
            f"the gin config ({shown}) binds no {', '.join(missing)}: start from a complete "
            f"config such as {EXAMPLE}, or bind them with --gin_param."
        )


def bindings():
    """Every binding in force as `{"scope/configurable.parameter": "value as gin writes it"}`.

    Example::

        ginconfig.bindings()["meta/SGD.learning_rate"]      # "0.1"
    """
    found, key = {}, None
    for line in gin.config_str().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and key is not None:  # a long value continued
            found[key] += " " + line.strip()
            continue
        key, _, value = line.partition(" = ")
        key = key.strip()
        found[key] = value.strip()
    return found
