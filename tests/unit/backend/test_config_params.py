"""config.pbtxt parameters: the reference model's "unset" rule, typed getters, clear errors."""

from __future__ import annotations

import pytest

from throttllem.backend.params import ParameterError, Parameters, is_unset


def test_empty_and_template_placeholders_are_unset() -> None:
    assert is_unset("") and is_unset("  ") and is_unset("${engine_dir}") and is_unset(None)
    assert not is_unset("0")
    config = {"parameters": {"a": {"string_value": "${a}"}, "b": {"string_value": " 5 "}}}
    params = Parameters.from_model_config(config)
    assert "a" not in params and params.get_int("b") == 5 and params.names() == ["b"]


def test_typed_getters() -> None:
    p = Parameters({"n": "3", "f": "0.5", "yes": "True", "no": "0", "ids": "0, 2,3"})
    assert p.get_int("n") == 3 and p.get_float("f") == 0.5
    assert p.get_bool("yes") is True and p.get_bool("no") is False
    assert p.get_int_list("ids") == [0, 2, 3]
    assert p.get_int("missing", 7) == 7 and p.get_str("missing") is None


@pytest.mark.parametrize(
    ("raw", "getter"),
    [("x", "get_int"), ("x", "get_float"), ("inf", "get_float"), ("perhaps", "get_bool"),
     ("1,a", "get_int_list")],
)  # fmt: skip
def test_unreadable_values_name_the_parameter(raw: str, getter: str) -> None:
    with pytest.raises(ParameterError, match="parameter 'p'"):
        getattr(Parameters({"p": raw}), getter)("p")


def test_minimums_and_required() -> None:
    with pytest.raises(ParameterError, match=">= 1"):
        Parameters({"p": "0"}).get_int("p", minimum=1)
    with pytest.raises(ParameterError, match="'gpt_model_path' is required"):
        Parameters({}).require_str("gpt_model_path")
