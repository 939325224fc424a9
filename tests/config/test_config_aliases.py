"""A task's short names for nested config sections (Task.config_aliases): the language model's `tokenizer.kind`
is `data.tokenizer.kind`, in --set overrides and in recipes, and both spellings keep working."""

from __future__ import annotations

import pytest

from modelworks import config as config_mod
from modelworks.errors import ConfigError
from modelworks.tasks.language_model.task import LanguageModelTask


def test_the_short_and_the_long_spelling_set_the_same_field():
    short = config_mod.resolve(LanguageModelTask, "shakespeare-char",
                               ["tokenizer.kind=bpe", "tokenizer.vocab_size=4096"])
    long = config_mod.resolve(LanguageModelTask, "shakespeare-char",
                              ["data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=4096"])
    assert short.data.tokenizer.kind == long.data.tokenizer.kind == "bpe"
    assert short.data.tokenizer.vocab_size == long.data.tokenizer.vocab_size == 4096
    assert config_mod.to_dict(short) == config_mod.to_dict(long)
    assert "tokenizer" not in config_mod.to_dict(short)  # saved runs hold one spelling: data.tokenizer


def test_an_override_in_either_spelling_changes_a_recipe_in_the_other():
    # shakespeare-bpe spells its tokenizer `tokenizer:` (short); the long spelling must still override it
    assert config_mod.resolve(LanguageModelTask, "shakespeare-bpe", []).data.tokenizer.vocab_size == 1024
    cfg = config_mod.resolve(LanguageModelTask, "shakespeare-bpe", ["data.tokenizer.vocab_size=512"])
    assert (cfg.data.tokenizer.kind, cfg.data.tokenizer.vocab_size) == ("bpe", 512)
    cfg = config_mod.resolve(LanguageModelTask, "shakespeare-char", ["tokenizer.kind=bpe"])
    assert (cfg.data.tokenizer.kind, cfg.data.tokenizer.vocab_size) == ("bpe", 2048)  # the rest keeps defaults


def test_a_recipe_giving_one_setting_twice_differently_is_refused(tmp_path):
    recipe = tmp_path / "both.yaml"
    recipe.write_text("task: language_model\ndata:\n  tokenizer:\n    kind: char\ntokenizer:\n  kind: bpe\n")
    with pytest.raises(ConfigError, match=r"tokenizer.kind and data.tokenizer.kind are the same setting"):
        config_mod.resolve(LanguageModelTask, str(recipe), [])


def test_unknown_keys_under_the_alias_are_named():
    with pytest.raises(ConfigError, match=r"data.tokenizer.vocab: unknown key; did you mean 'vocab_size'"):
        config_mod.resolve(LanguageModelTask, "shakespeare-char", ["tokenizer.vocab=4096"])
    with pytest.raises(ConfigError, match=r"tokenizer: expected a mapping of keys \(got 'bpe'\); tokenizer.KEY is "
                                          r"short for data.tokenizer.KEY"):
        config_mod.resolve(LanguageModelTask, "shakespeare-char", ["tokenizer=bpe"])
