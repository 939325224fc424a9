"""Property tests of the config parser: whatever a recipe or `--set` holds, the answer is a config or a ConfigError.

Hypothesis generates `--set key=value` overrides (real dotted keys and junk ones, values that are YAML, broken
YAML or neither), arbitrary mappings (unknown keys, wrong types, nested junk, unicode, every value YAML can build)
and recipe files of YAML-ish text. Any other exception is a crash the user would see as a traceback.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelworks.config import ConfigError, RunConfig, apply_override, load_config, resolve
from modelworks.registry import get_task

TASK_NAMES = ("classification", "detection")
EXAMPLES = settings(max_examples=200, deadline=None)


def dotted_paths(cls: type, section_types: dict | None = None, prefix: str = "") -> list[str]:
    """Every key of the config tree, sections included, e.g. `train`, `train.ema`, `train.ema.decay`."""
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        tp = (section_types or {}).get(f.name, hints[f.name])
        paths.append(prefix + f.name)
        if dataclasses.is_dataclass(tp):
            paths += dotted_paths(tp, None, f"{prefix}{f.name}.")
    return paths


def task_paths(name: str) -> list[str]:
    task_cls = get_task(name)
    return dotted_paths(RunConfig, {"model": task_cls.ModelConfig, "data": task_cls.DataConfig})


PATHS = sorted({path for name in TASK_NAMES for path in task_paths(name)})
# Text YAML reads as something other than a string, or cannot read at all: each has crashed a parser somewhere.
YAML_SNIPPETS = ["", "~", "null", "true", "no", "0", "-1", "1e-3", "1e400", "1" + "0" * 400, ".nan", "-.inf", "0x1f",
                 "0o17", "1_000", "2001-01-01", "2001-13-45", "2001-01-01 10:00:00", "!!int x", "!!float x",
                 "!!binary aGk=", "!!set {a, b}", "!!omap [a]", "!!python/object:os.system", "!!str 3", "&a [*a]",
                 "&a {x: *a}", "[" * 1200, "{a: [1, }", "'unterminated", "\"\\x\"", "- a\n- b", "a: b", "[1, [2, [3]]]",
                 "{}", "[]", "? [1]\n: 2", "{[1]: 2}", "|\n  text", "*undefined", "%YAML 1.1\n---\n1", "---\n---",
                 "日本", "\x00", "\ufeff1", "'\t'"]

keys = st.one_of(st.sampled_from(PATHS), st.text(max_size=12),
                 st.builds(lambda path, junk: f"{path}.{junk}", st.sampled_from(PATHS), st.text(max_size=6)))
value_texts = st.one_of(st.sampled_from(YAML_SNIPPETS), st.text(max_size=30),
                        st.builds(lambda a, b: a + b, st.sampled_from(YAML_SNIPPETS), st.text(max_size=8)))
assignments = st.one_of(st.builds(lambda key, value: f"{key}={value}", keys, value_texts), st.text(max_size=20))

# Every kind of value YAML can build, plus the extremes of each.
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from([10 ** 400, -(10 ** 400)]),
                    st.floats(), st.text(max_size=12), st.binary(max_size=4), st.dates(), st.datetimes(),
                    st.frozensets(st.integers(), max_size=3), st.sampled_from(["fastnet", "sgd", "cpu", "onecycle"]))
mapping_keys = st.one_of(st.sampled_from([p.rsplit(".", 1)[-1] for p in PATHS]), st.text(max_size=8), st.integers(),
                         st.booleans(), st.none(), st.floats(allow_nan=False))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(mapping_keys, inner, max_size=4)),
                      max_leaves=12)


def set_dotted(raw: dict, path: str, value) -> None:
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        child = node.get(part)
        node[part] = child = child if isinstance(child, dict) else {}
        node = child
    node[leaf] = value


@st.composite
def raw_configs(draw) -> dict:
    """A mapping shaped like a config: real keys at real depths (so the checks behind them run) mixed with junk."""
    raw = {"task": draw(st.one_of(st.sampled_from(TASK_NAMES), values))} if draw(st.booleans()) else {}
    for path, value in draw(st.lists(st.tuples(st.sampled_from(PATHS), values), max_size=8)):
        set_dotted(raw, path, value)
    raw.update(draw(st.dictionaries(mapping_keys, values, max_size=3)))
    return raw


def assert_config_or_config_error(build) -> None:
    try:
        cfg = build()
    except ConfigError as exc:
        assert str(exc)  # a message to show
    else:
        assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("task_name", TASK_NAMES)
@EXAMPLES
@given(overrides=st.lists(assignments, max_size=5))
def test_any_set_overrides_give_a_config_or_a_config_error(task_name, overrides):
    task_cls = get_task(task_name)

    def build():
        raw = {"task": task_name}
        for assignment in overrides:
            apply_override(raw, assignment)
        return load_config(task_cls, raw)

    assert_config_or_config_error(build)


@pytest.mark.parametrize("task_name", TASK_NAMES)
@EXAMPLES
@given(raw=raw_configs())
def test_any_mapping_gives_a_config_or_a_config_error(task_name, raw):
    assert_config_or_config_error(lambda: load_config(get_task(task_name), raw))


yaml_ish = st.lists(st.one_of(st.sampled_from(YAML_SNIPPETS),
                              st.builds(lambda key, value: f"{key}: {value}", keys, value_texts),
                              st.text(alphabet=st.sampled_from(list("ab:-[]{},'\"!&*#|>%@` \t.0日\\")), max_size=12)),
                    max_size=6)


@EXAMPLES
@given(lines=yaml_ish, indents=st.lists(st.sampled_from(["", "  ", "    ", "\t"]), min_size=6, max_size=6),
       overrides=st.lists(assignments, max_size=2))
def test_any_recipe_file_gives_a_config_or_a_config_error(tmp_path_factory, lines, indents, overrides):
    path = tmp_path_factory.getbasetemp() / "property-recipe.yaml"  # one file, rewritten for each example
    path.write_text("\n".join(indent + line for indent, line in zip(indents, lines)) + "\n", encoding="utf-8")
    assert_config_or_config_error(lambda: resolve(get_task("classification"), str(path), overrides))

