"""QuantConfig as groups: defaults written once (and read by the CLI), mappings and strings converted,
every validation a UserError naming the flag, the report's `config` the groups as run."""

from __future__ import annotations

import json
import re
from dataclasses import FrozenInstanceError, fields

import pytest

from segquant_onnx import (
    CalibrationConfig, DualScaleConfig, FallbackConfig, OutlierConfig, QuantConfig, RuntimeConfig, SegLinearConfig,
    SmoothQuantConfig, UserError,
)
from segquant_onnx.cli.app import FLAG_SETTINGS, _config, build_parser
from segquant_onnx.config import GROUPS, PRESETS, CalibMethod, DualScaleMode, OutlierMode, Preset, SmoothQuantMode


def test_groups_given_as_mappings_equal_groups_given_as_classes():
    a = QuantConfig(calibration={"method": "mse"}, dualscale={"mode": "off"}, outliers={"mode": "auto"})
    b = QuantConfig(calibration=CalibrationConfig(method=CalibMethod.MSE), dualscale=DualScaleConfig(mode="off"),
                    outliers=OutlierConfig(mode=OutlierMode.AUTO))
    assert a == b and hash(a) == hash(b)
    assert a.calibration.method is CalibMethod.MSE and a.dualscale.mode is DualScaleMode.OFF
    assert a.calibration.method == "mse"  # a mode equals its CLI word


def test_groups_are_frozen():
    with pytest.raises(FrozenInstanceError):
        QuantConfig().dualscale.mode = "off"
    with pytest.raises(FrozenInstanceError):
        QuantConfig().dualscale = DualScaleConfig()


@pytest.mark.parametrize("kwargs, flag", [
    (dict(calibration={"method": "best"}), "--calib-method"),
    (dict(calibration={"percentile": 30.0}), "--percentile"),
    (dict(calibration={"batch_size": 0}), "--batch-size"),
    (dict(dualscale={"mode": "some"}), "--dualscale"),
    (dict(dualscale={"min_gain_db": -1.0}), "--dualscale-min-gain"),
    (dict(dualscale={"min_gain_db": float("nan")}), "--dualscale-min-gain"),
    (dict(smoothquant={"mode": "fixed"}), "--smoothquant"),
    (dict(smoothquant={"mode": "fixed", "alpha": 1.5}), "--smoothquant"),
    (dict(outliers={"mode": "many"}), "--outlier-channels"),
    (dict(outliers={"ratio": 1.0}), "--outlier-ratio"),
    (dict(outliers={"max_flop_pct": 101.0}), "--outlier-flops"),
    (dict(outliers={"min_gain_db": -0.1}), "--outlier-min-gain"),
    (dict(fallback={"exclude": ("(",)}), "--exclude"),
    (dict(fallback={"target_sqnr": 0.0}), "--target-sqnr"),
    (dict(fallback={"target_sqnr": float("inf")}), "--target-sqnr"),
    (dict(fallback={"max_fallback_pct": -1.0}), "--max-fallback"),
    (dict(runtime={"providers": ()}), "--providers"),
    (dict(calibration={"holdout_every": 1}, fallback={"sensitivity": True}), "holdout_every"),
    (dict(dualscale={"mode": "off", "min_gian_db": 1.0}), "min_gian_db"),
    (dict(dualscale="off"), "DualScaleConfig"),
])
def test_bad_settings_are_one_user_error_naming_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag.replace("(", r"\(")):
        QuantConfig(**kwargs)


def test_smoothquant_and_outlier_flags_parse_into_mode_and_value():
    assert SmoothQuantConfig.from_flag("0.5") == SmoothQuantConfig(mode=SmoothQuantMode.FIXED, alpha=0.5)
    assert SmoothQuantConfig.from_flag("auto").mode is SmoothQuantMode.AUTO
    assert SmoothQuantConfig.from_flag("0.5").flag == "0.5" and SmoothQuantConfig().flag == "off"
    assert OutlierConfig.from_flag("8") == OutlierConfig(mode=OutlierMode.FIXED, count=8)
    assert OutlierConfig.from_flag("8").caps == (8,) and OutlierConfig().caps == (0,)
    assert OutlierConfig(mode="auto").caps == OutlierConfig().candidates
    for bad in ("2", "-0.1", "x"):
        with pytest.raises(UserError, match="--smoothquant"):
            SmoothQuantConfig.from_flag(bad)
    for bad in ("-1", "4.5", "x"):
        with pytest.raises(UserError, match="--outlier-channels"):
            OutlierConfig.from_flag(bad)


def test_updated_changes_only_the_named_fields():
    base = QuantConfig(calibration={"method": "mse", "batch_size": 4})
    new = base.updated(calibration={"method": "max"}, fallback={"target_sqnr": 40.0})
    assert new.calibration == CalibrationConfig(method="max", batch_size=4)
    assert new.fallback.target_sqnr == 40.0 and base.fallback.target_sqnr is None
    with pytest.raises(UserError, match="no group 'calib'"):
        base.updated(calib={"method": "max"})


def test_as_dict_is_plain_json_of_the_groups():
    d = QuantConfig(smoothquant={"mode": "fixed", "alpha": 0.25}, fallback={"exclude": ("a.*",)}).as_dict()
    assert list(d) == list(GROUPS)
    assert json.loads(json.dumps(d)) == d  # only JSON types
    assert d["smoothquant"] == {"mode": "fixed", "alpha": 0.25, "alphas": [0.25, 0.5, 0.75]}
    assert d["fallback"]["exclude"] == ["a.*"] and type(d["dualscale"]["mode"]) is str


def _args(*flags):
    return build_parser().parse_args(["quantize", "m.onnx", "-o", "o.onnx", *flags])


def test_the_cli_defaults_are_the_config_defaults():
    assert _config(_args()) == QuantConfig()
    for sub in (["inspect", "m.onnx"], ["sensitivity", "m.onnx"]):
        assert _config(build_parser().parse_args(sub)) == QuantConfig()


def test_every_plain_flag_reaches_its_field():
    config = _config(_args("--calib-method", "entropy", "--percentile", "99.9", "--batch-size", "3", "--dry-rewrite",
                           "--dualscale", "all", "--dualscale-min-gain", "2.5", "--outlier-channels", "4",
                           "--outlier-ratio", "5", "--outlier-flops", "3", "--outlier-min-gain", "0.2",
                           "--sensitivity", "--target-sqnr", "30", "--max-fallback", "7", "--per-layer",
                           "--allow-unquantized", "--smoothquant", "0.75", "--seg-patterns", "output,heads",
                           "--exclude", "fc.*", "--providers", "CPUExecutionProvider"))
    assert config == QuantConfig(
        calibration=CalibrationConfig(method="entropy", percentile=99.9, batch_size=3),
        seglinear=SegLinearConfig(output=True, input=False, heads=True, dry_rewrite=True),
        dualscale=DualScaleConfig(mode="all", min_gain_db=2.5),
        smoothquant=SmoothQuantConfig(mode="fixed", alpha=0.75),
        outliers=OutlierConfig(mode="fixed", count=4, ratio=5.0, max_flop_pct=3.0, min_gain_db=0.2),
        fallback=FallbackConfig(exclude=("fc.*",), sensitivity=True, target_sqnr=30.0, max_fallback_pct=7.0),
        runtime=RuntimeConfig(per_layer=True, allow_unquantized=True))
    assert _config(_args("--no-seglinear")).seglinear == SegLinearConfig(output=False, input=False, heads=False)


def test_the_flag_table_names_real_fields():
    for dest, (group, name) in FLAG_SETTINGS.items():
        assert name in {f.name for f in fields(GROUPS[group])}, (dest, group, name)


def test_presets_set_their_fields_and_nothing_else():
    assert QuantConfig.preset("balanced") == QuantConfig()
    assert QuantConfig.preset("fast") == QuantConfig(dualscale={"mode": "off"})
    assert QuantConfig.preset("best") == QuantConfig(
        smoothquant={"mode": "auto"}, outliers={"mode": "auto"},
        fallback={"target_sqnr": 40.0, "max_fallback_pct": 5.0})
    assert QuantConfig.preset(Preset.BEST) == QuantConfig.preset("best")
    # every field a preset sets exists and is validated like any other
    for name, groups in PRESETS.items():
        for group, values in groups.items():
            assert set(values) <= {f.name for f in fields(GROUPS[group])}, (name, group)


def test_a_setting_given_wins_over_its_preset_field_by_field():
    best = QuantConfig.preset("best", fallback={"target_sqnr": 45.0}, dualscale={"mode": "all"})
    assert (best.fallback.target_sqnr, best.fallback.max_fallback_pct) == (45.0, 5.0)  # the other field stays
    assert best.dualscale.mode is DualScaleMode.ALL and best.smoothquant.mode is SmoothQuantMode.AUTO
    # a group object gives all its fields: the preset's fields of that group are replaced
    assert QuantConfig.preset("best", fallback=FallbackConfig()).fallback == FallbackConfig()


@pytest.mark.parametrize("call, message", [
    (lambda: QuantConfig.preset("slow"), "--preset 'slow' is unknown; use one of fast, balanced, best."),
    (lambda: QuantConfig.preset("best", nonsense={}), "QuantConfig has no group 'nonsense'"),
])
def test_bad_presets_are_one_user_error(call, message):
    with pytest.raises(UserError, match=re.escape(message)):
        call()


def test_the_cli_preset_and_flags_given_over_it():
    assert _config(_args("--preset", "best")) == QuantConfig.preset("best")
    assert _config(_args("--preset", "fast")) == QuantConfig.preset("fast")
    config = _config(_args("--preset", "best", "--target-sqnr", "45", "--calib-method", "auto",
                           "--outlier-channels", "off", "--smoothquant", "0.5"))
    assert config == QuantConfig.preset("best", fallback={"target_sqnr": 45.0}, calibration={"method": "auto"},
                                        outliers={"mode": "off"}, smoothquant={"mode": "fixed", "alpha": 0.5})
    # a flag equal to the balanced default still wins over the preset
    assert _config(_args("--preset", "fast", "--dualscale", "auto")).dualscale.mode is DualScaleMode.AUTO
    assert _config(_args("--preset", "best", "--max-fallback", "10")).fallback.max_fallback_pct == 10.0


def test_best_rounds_int4_weights_with_gptq_unless_told_otherwise():
    assert QuantConfig.preset("best", precision={"format": "w4a8"}).precision.weight_rounding.value == "gptq"
    assert QuantConfig.preset("best", precision={"format": "w4a8"}).precision.weight_clip
    assert not QuantConfig.preset("best").precision.weight_clip
    assert QuantConfig.preset("best", precision={"format": "w4a16", "weight_rounding": "rtn"}
                              ).precision.weight_rounding.value == "rtn"
    assert QuantConfig.preset("best").precision.weight_rounding.value == "rtn"  # 8 bits: to nearest
    assert QuantConfig.preset("balanced", precision={"format": "w4a8"}).precision.weight_rounding.value == "rtn"
