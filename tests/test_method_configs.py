"""Every `method=<file>` x `bits=<file>` composes to the values recorded from main before the
method files inherited from conf/method/base.yaml (tests/fixtures/method_bits_composed.json):
moving the shared block into one file must not change what any user command line gets."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qgplm.cli.run import quote_int_group_overrides
from tests.conftest import CONF, ROOT

RECORDED = json.loads((ROOT / "tests" / "fixtures" / "method_bits_composed.json").read_text())
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml") if not p.stem.startswith("_"))
BITS = sorted(p.stem for p in (CONF / "bits").glob("*.yaml"))


def _composed(method: str, bits: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="run", overrides=quote_int_group_overrides(
            [f"method={method}", f"bits={bits}", "paths.output_dir=/tmp/unused"]))
    return {"method": OmegaConf.to_container(cfg.method, resolve=True),
            "bits": OmegaConf.to_container(cfg.bits, resolve=True)}


def test_every_method_file_is_recorded():
    assert {k.split("/")[0] for k in RECORDED} == set(METHODS)
    assert {k.split("/")[1] for k in RECORDED} == set(BITS)


@pytest.mark.parametrize("method", METHODS)
def test_method_composes_to_the_recorded_values_at_every_bit_width(method):
    for bits in BITS:
        assert _composed(method, bits) == RECORDED[f"{method}/{bits}"], f"method={method} bits={bits}"


def test_shared_method_block_is_the_dataclass_defaults():
    """conf/method/base/common.yaml spells out MethodConfig's defaults (every key a method file may
    override), so a key left out of a method file means the same in YAML and in Python."""
    import dataclasses

    from qgplm.train.config import MethodConfig

    shared = OmegaConf.to_container(OmegaConf.load(CONF / "method" / "base" / "common.yaml"))
    defaults = dataclasses.asdict(MethodConfig(name="x"))
    assert shared, "empty shared block"
    for key, value in shared.items():
        if isinstance(value, dict) and key != "quantizer_kwargs":
            for sub, v in value.items():
                assert defaults[key][sub] == v, f"{key}.{sub}"
        else:
            assert defaults[key] == value, key
