"""`include` lines of gin files resolve without gin's "ERROR:root:Path not found" lines.

gin looks for an included file in the working folder first and logs an
ERROR for every place it looks in vain, so `tools/many_shot.py` (whose
gin/many_shot_<method>.gin includes many_shot.gin) started with an ERROR a
user reads as a failure. `tfmeta.cli.ginconfig.load` resolves includes
itself; the reference for the bindings is gin's own parse, run from the
folder where gin's working-folder lookup finds the included file at once.
"""

import logging
import pathlib

import gin
import pytest

from tfmeta.cli import ginconfig
from tfmeta.validation import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clear_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _problems(caplog):
    return [f"{r.levelname}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]


def _gin_own_bindings(folder, name, monkeypatch):
    """The bindings gin itself makes of `folder/name`, parsed from `folder` (no search)."""
    gin.clear_config()
    monkeypatch.chdir(folder)
    gin.parse_config_file(name)
    found = ginconfig.bindings()
    gin.clear_config()
    return found


def _write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_an_include_by_bare_name_resolves_from_another_working_folder_without_error_logs(
        tmp_path, monkeypatch, caplog):
    # Macros need no configurable. The order is gin's: a binding before the
    # include is overridden by the included file's, one after it overrides it.
    configs = tmp_path / "configs"
    _write(configs, {
        "base.gin": "shared = 'base'\nlate = 'base'\nonly_base = 1\n",
        "top.gin": "shared = 'top'\ninclude 'base.gin'\n# after the include\n\nlate = 'top'\n",
    })
    expected = _gin_own_bindings(configs, "top.gin", monkeypatch)
    assert expected == {"shared": "'base'", "late": "'top'", "only_base": "1"}

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    caplog.set_level(logging.DEBUG)
    for given in (str(configs / "top.gin"), "../configs/top.gin"):  # absolute, cwd-relative
        gin.clear_config()
        caplog.clear()
        assert ginconfig.load([given]) == [pathlib.Path(given)]
        assert _problems(caplog) == []
        assert ginconfig.bindings() == expected


def test_the_project_s_two_level_include_applies_every_level_without_error_logs(
        tmp_path, monkeypatch, caplog):
    # gin/many_shot_cts_no_shift.gin includes many_shot_cts.gin, which
    # includes many_shot.gin: run from a folder holding neither.
    import tfmeta.configurables  # noqa: F401

    expected = _gin_own_bindings(REPO / "gin", "many_shot_cts_no_shift.gin", monkeypatch)
    assert expected["Method.name"] == "'cts without shifting'"  # the top file
    assert expected["ContinualTrajectoryShifting.shift"] == "'none'"
    assert "Benchmark.budget" in expected  # many_shot.gin, two levels down

    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.DEBUG)
    ginconfig.load(["many_shot_cts_no_shift.gin"], ["Benchmark.budget = 7"])
    assert _problems(caplog) == []
    assert ginconfig.bindings() == {**expected, "Benchmark.budget": "7"}


def test_an_include_prefers_the_including_file_s_folder_to_the_repository_s(
        tmp_path, monkeypatch, caplog):
    # A copy of gin/many_shot_reptile.gin in a folder of one's own includes
    # that folder's many_shot.gin, not gin/many_shot.gin.
    own = tmp_path / "mine"
    _write(own, {"many_shot.gin": "mine = 1\n",
                 "many_shot_reptile.gin": "include 'many_shot.gin'\nalso_mine = 2\n"})
    monkeypatch.chdir(REPO)  # where gin/many_shot.gin would be found as gin/...
    caplog.set_level(logging.DEBUG)
    ginconfig.load([str(own / "many_shot_reptile.gin")])
    assert _problems(caplog) == []
    assert ginconfig.bindings() == {"mine": "1", "also_mine": "2"}


def test_a_missing_or_cyclic_include_is_one_error_naming_the_line_before_any_binding(
        tmp_path, monkeypatch):
    _write(tmp_path, {
        "missing.gin": "early = 1\n\ninclude 'nowhere.gin'\n",
        "loop_a.gin": "include 'loop_b.gin'\n",
        "loop_b.gin": "b = 1\ninclude 'loop_a.gin'\n",
    })
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as missing:
        ginconfig.load(["missing.gin"])
    assert str(missing.value).startswith(
        f"gin: missing.gin line 3: include 'nowhere.gin' does not exist (looked in "
        f"{tmp_path.resolve()}, the working folder and {REPO / 'gin'})")
    assert "name an existing gin file" in str(missing.value)
    assert "early" not in ginconfig.bindings()  # checked before gin bound anything
    with pytest.raises(ConfigError, match=r"loop_b.gin line 2: include 'loop_a.gin' closes an "
                                          r"include cycle \(.*loop_a.gin -> .*loop_b.gin -> "
                                          r".*loop_a.gin\): remove one"):
        ginconfig.load(["loop_a.gin"])


def test_an_error_in_an_included_file_names_that_file_and_its_line(tmp_path, monkeypatch):
    # Only the included stretch is parsed at a time, with the file's own line numbers.
    _write(tmp_path, {"base.gin": "ok = 1\n\nbroken = (1,\n",
                      "top.gin": "include 'base.gin'\n"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^gin: .*base.gin line \d: a bracket or quote is opened"):
        ginconfig.load(["top.gin"])
