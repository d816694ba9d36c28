"""The generic name -> object registry behind pools, models, datasets and optimizers."""

import pytest

from gapjax.registry import Registry, UnknownNameError


@pytest.fixture
def colors() -> Registry:
    registry = Registry("color")

    @registry.register("red", "crimson")
    class Red:
        pass

    registry.add("green", "GREEN-OBJECT", "lime")
    return registry


def test_register_returns_the_object_and_get_resolves_aliases(colors):
    red = colors.get("red")
    assert isinstance(red, type) and red.__name__ == "Red"
    assert colors.get("crimson") is red
    assert colors.get("lime") == "GREEN-OBJECT"
    assert colors.canonical("crimson") == "red"


def test_names_contains_len_iter(colors):
    assert colors.names() == ["green", "red"]
    assert colors.names(aliases=True) == ["crimson", "green", "lime", "red"]
    assert "crimson" in colors and "red" in colors and "blue" not in colors
    assert None not in colors and ["red"] not in colors
    assert len(colors) == 2
    assert list(colors) == ["green", "red"]
    assert "green" in repr(colors)


def test_duplicate_names_and_aliases_are_refused(colors):
    with pytest.raises(ValueError, match="'red' is already registered"):
        colors.add("red", object())
    with pytest.raises(ValueError, match="'lime' is already registered"):
        colors.add("blue", object(), "lime")
    with pytest.raises(ValueError, match="non-empty strings"):
        colors.add("", object())
    assert colors.names() == ["green", "red"]  # nothing half-registered


def test_unknown_name_is_one_line_listing_choices_and_suggesting(colors):
    with pytest.raises(UnknownNameError) as info:
        colors.get("rde")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown color 'rde'; choose one of: crimson, green, lime, red")
    assert message.endswith("(did you mean 'red'?)")
    # Catchable as either kind of lookup failure, and printed without KeyError's quotes.
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert not message.startswith('"')


def test_unknown_name_without_a_close_match_has_no_suggestion(colors):
    with pytest.raises(UnknownNameError, match="choose one of") as info:
        colors.get("zzzzzz")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("bad", [None, 3, ["red"]])
def test_non_string_names_give_the_same_clear_error(colors, bad):
    with pytest.raises(UnknownNameError, match="choose one of: crimson, green, lime, red"):
        colors.get(bad)


def test_import_modules_takes_paths_and_names_and_records_where_they_live(tmp_path, monkeypatch):
    import sys

    from gapjax.registry import ImportSpecError, import_modules, resolve_import

    (tmp_path / "fork_pools_a.py").write_text("from fork_helper_a import VALUE\n")
    (tmp_path / "fork_helper_a.py").write_text("VALUE = 7\n")
    (tmp_path / "forkpkg_a").mkdir()
    (tmp_path / "forkpkg_a" / "__init__.py").write_text("")
    (tmp_path / "forkpkg_a" / "pools.py").write_text("VALUE = 8\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    recorded = [resolve_import("fork_pools_a.py"), resolve_import("forkpkg_a.pools"),
                resolve_import("json")]
    assert recorded == [str(tmp_path / "fork_pools_a.py"), f"forkpkg_a.pools@{tmp_path}", "json"]
    monkeypatch.chdir("/")  # another working directory, and no PYTHONPATH
    sys.path.remove(str(tmp_path))
    for name in ("fork_pools_a", "fork_helper_a", "forkpkg_a", "forkpkg_a.pools"):
        sys.modules.pop(name, None)
    modules = import_modules(recorded)
    assert [m.VALUE for m in modules[:2]] == [7, 8]
    (tmp_path / "broken_fork_a.py").write_text("raise RuntimeError('boom')\n")
    for spec, message in [("missing_fork.py", "no such file"), ("no_such_module_a", "no module"),
                          (str(tmp_path / "broken_fork_a.py"), "RuntimeError: boom")]:
        with pytest.raises(ImportSpecError, match=message) as info:
            import_modules([spec])
        assert "\n" not in str(info.value)
