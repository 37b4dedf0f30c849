"""GPU and model descriptions: presets, arithmetic, and user files with errors naming the field."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

from throttllem.backend.twin.errors import ConfigurationError, SpecError
from throttllem.backend.twin.hardware import (
    default_catalog,
    fits_free_bytes,
    kv_cache_blocks,
    load_gpu_file,
    load_model_file,
    valid_tp_sizes,
)

CATALOG = default_catalog()


def test_presets_named_as_on_the_command_line() -> None:
    assert set(CATALOG.gpus) == {"A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM5-80GB"}
    assert set(CATALOG.models) == {
        "llama-3-8b",
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3-70b",
    }


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("llama-2-7b", 6.74),
        ("llama-2-13b", 13.0),
        ("llama-3-8b", 8.03),
        ("llama-2-70b", 69.0),
        ("llama-3-70b", 70.6),
    ],
)
def test_parameter_counts_match_the_published_sizes(name: str, billions: float) -> None:
    assert CATALOG.model(name).total_params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_a100_clock_table_is_1410_down_to_210_in_15_mhz_steps() -> None:
    clocks = CATALOG.gpu("A100-SXM4-40GB").supported_clocks_mhz()
    assert clocks[0] == 1410 and clocks[-1] == 210 and len(clocks) == 81
    assert all(a - b == 15 for a, b in pairwise(clocks))


def test_kv_bytes_per_token_uses_grouped_query_heads() -> None:
    # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x K and V x 2 bytes = 128 KiB per token.
    assert CATALOG.model("llama-3-8b").kv_bytes_per_token() == 131072
    # Llama-2-7B has no GQA: four times as much.
    assert CATALOG.model("llama-2-7b").kv_bytes_per_token() == 4 * 131072


def test_70b_does_not_fit_one_40gb_gpu_and_the_error_lists_valid_sizes() -> None:
    gpu, model = CATALOG.gpu("A100-SXM4-40GB"), CATALOG.model("llama-2-70b")
    assert valid_tp_sizes(gpu, model) == [4, 8]
    with pytest.raises(ConfigurationError, match=r"valid TP sizes: \[4, 8\]"):
        fits_free_bytes(gpu, model, 1)


def test_kv_capacity_grows_with_tensor_parallelism() -> None:
    gpu, model = CATALOG.gpu("A100-SXM4-40GB"), CATALOG.model("llama-2-13b")
    blocks = [kv_cache_blocks(gpu, model, tp, 64) for tp in (1, 2, 4)]
    assert 0 < blocks[0] < blocks[1] < blocks[2]
    # More than twice per doubling: the weight shard shrinks as well.
    assert blocks[1] > 2 * blocks[0]


def _model_dict() -> dict[str, object]:
    return {
        "name": "tiny",
        "num_layers": 2,
        "hidden_size": 64,
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1000,
        "max_context": 512,
    }


def test_user_model_file_in_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_model_dict()))
    (tmp_path / "m.json").write_text(json.dumps(_model_dict()))
    assert load_model_file(tmp_path / "m.yaml") == load_model_file(tmp_path / "m.json")
    assert CATALOG.model(str(tmp_path / "m.yaml")).head_dim == 16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": None}, r"missing field 'num_layers'"),
        ({"num_layers": "many"}, r"\.num_layers: expected a number"),
        ({"hidden_size": 65}, r"\.hidden_size: not a multiple of num_heads"),
        ({"num_kv_heads": 3}, r"\.num_kv_heads: must divide num_heads"),
        ({"colour": "blue"}, r"unknown field\(s\) colour"),
        ({"max_context": 0}, r"\.max_context: must be positive"),
    ],
)
def test_a_wrong_model_file_names_the_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    data = _model_dict()
    for key, value in change.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError, match=message):
        load_model_file(path)


def test_a_gpu_file_missing_a_physics_field_names_it(tmp_path: Path) -> None:
    preset = yaml.safe_load(
        (Path(__file__).resolve().parents[3] / "python_backend/twin/presets/gpus.yaml").read_text()
    )[0]
    del preset["physics"]["mem_efficiency"]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(SpecError, match=r"gpu\.json\.physics: missing field 'mem_efficiency'"):
        load_gpu_file(path)


def test_unknown_names_list_the_valid_choices() -> None:
    with pytest.raises(SpecError, match=r"unknown GPU 'V100'.*A100-SXM4-40GB"):
        CATALOG.gpu("V100")
    with pytest.raises(SpecError, match=r"unknown model 'gpt-5'.*llama-3-8b"):
        CATALOG.model("gpt-5")


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot read"):
        load_model_file(tmp_path / "absent.yaml")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SpecError, match=r"not valid JSON"):
        load_model_file(tmp_path / "broken.json")
