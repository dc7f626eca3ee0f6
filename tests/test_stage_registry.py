"""The stage registry is the one source of resume keys and constructor
arguments: every clip-defining key of every registered stage refuses a
resume when changed, no runtime key does, and each stage class accepts
exactly the keys its conf node gives it, with no default that disagrees."""

from __future__ import annotations

import inspect
import re
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import reelsift_conf
from engine.cli import CONFIG_DIR
from engine.curate.resume import ResumeError, check_resumable, clip_settings, encode
from engine.runtime.stages import load_class
from udfs.registry import STAGES, choices
from udfs.spec import ENGINE_KEYS, StageSpec

# Turn every optional stage on, so each one's settings matter.
ALL_ON = ["aesthetic.enabled=true", "motion.mode=score-only", "preview.enabled=true"]


def compose_for(spec: StageSpec, extra: list[str] = ()):
    group = [f"{spec.node}={spec.choice}"] if spec.choice else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=["input=x", "output=y", *group, *ALL_ON, *extra])


def leaves(data: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(data, dict):
        return [leaf for k, v in data.items() for leaf in leaves(v, f"{prefix}.{k}")]
    return [(prefix, data)]


def flipped(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_changed"
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    return 3  # null -> a value


def node_keys(spec: StageSpec) -> list[tuple[str, Any]]:
    cfg = compose_for(spec)
    node = OmegaConf.to_container(cfg[spec.node], resolve=True)
    # `name` picks the implementation: changing it is another spec's test.
    return [(k, v) for k, v in leaves(node, spec.node) if k != f"{spec.node}.name"]


CASES = [(spec, key, value) for spec in STAGES for key, value in node_keys(spec)]


@pytest.mark.parametrize(("spec", "key", "value"), CASES, ids=[f"{s.key}:{k}" for s, k, _ in CASES])
def test_every_clip_key_refuses_a_resume_and_no_runtime_key_does(spec: StageSpec, key: str, value: Any) -> None:
    recorded = encode(clip_settings(compose_for(spec)))
    cfg = compose_for(spec)
    OmegaConf.update(cfg, key, flipped(value), force_add=True)
    runtime = any(part in spec.runtime() for part in key.split(".")[1:])
    if runtime:
        check_resumable("out", recorded, clip_settings(cfg), force=False)
        return
    with pytest.raises(ResumeError, match=re.escape(f"{key} (")) as err:
        check_resumable("out", recorded, clip_settings(cfg), force=False)
    assert "resume=force" in str(err.value)


def test_probe_count_packets_is_a_clip_setting() -> None:
    # It changes num_frames, so the spans and the clip ids.
    probe = choices("probe")[None]
    recorded = encode(clip_settings(compose_for(probe)))
    with pytest.raises(ResumeError, match=r"probe\.count_packets \(false -> true\)"):
        check_resumable("out", recorded, clip_settings(compose_for(probe, ["probe.count_packets=true"])), force=False)


def test_an_off_stage_records_only_its_switch() -> None:
    spec = choices("aesthetic")[None]
    off = clip_settings(compose_for(spec, ["aesthetic.enabled=false"]))
    assert [k for k in off if k.startswith("aesthetic.")] == ["aesthetic.enabled"]
    # With no stage taking frames, the clip decode's settings do not matter either.
    assert not [k for k in off if k.startswith("frames.")]
    assert clip_settings(compose_for(spec, ["aesthetic.enabled=false", "frames.consumers.aesthetic.fps=5"])) == off


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Keyword parameters of `cls.__init__`, following `**params` up the MRO."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(vars(klass)["__init__"]).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        return {n: p for n, p in params.items() if n != "self"}
    raise AssertionError(f"{cls} has no explicit constructor")


STAGE_CLASSES = [spec for spec in STAGES if spec.impl]


@pytest.mark.parametrize("spec", STAGE_CLASSES, ids=[s.key for s in STAGE_CLASSES])
def test_each_stage_accepts_exactly_its_conf_keys_and_defaults_none_of_them(spec: StageSpec) -> None:
    node = OmegaConf.to_container(compose_for(spec)[spec.node], resolve=True)
    params = constructor_parameters(load_class(spec.impl))
    wanted = spec.constructor_keys(node)
    assert set(params) == wanted, (f"{spec.impl}: conf gives {sorted(wanted - set(params))} it does not take; "
                                   f"it takes {sorted(set(params) - wanted)} conf does not give")
    # conf/ is the one source of defaults: a default here could only repeat it or drift from it.
    defaulted = {key: param.default for key, param in params.items()
                 if key in node and key not in ENGINE_KEYS and param.default is not inspect.Parameter.empty}
    assert not defaulted, f"{spec.impl} defaults {defaulted} that {spec.node} in conf/ sets"


@pytest.mark.parametrize("spec", STAGE_CLASSES, ids=[s.key for s in STAGE_CLASSES])
def test_stage_args_give_what_hydra_composes(spec: StageSpec) -> None:
    # Hand-built stages (tests, benchmarks, the GPU check without Hydra) read conf/ through
    # reelsift_conf.stage_args: it must see the same defaults a run does.
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        group = [f"{spec.node}={spec.choice}"] if spec.choice else []
        cfg = compose("config", overrides=["input=x", "output=y", *group])
    assert reelsift_conf.node(spec.node, spec.choice) == OmegaConf.to_container(cfg[spec.node], resolve=True)
    args = reelsift_conf.stage_args(spec.node, spec.choice)
    assert set(args) == spec.constructor_keys(OmegaConf.to_container(cfg[spec.node], resolve=True))
    load_class(spec.impl)(**args) if spec.level == "video" and not spec.weights else None
