"""Tests for vldistill.config: schema validation, error messages, YAML conveniences, overrides, bundled recipes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vldistill import cli
from vldistill.config import (
    RECIPE_DIR,
    RECIPES,
    ConfigError,
    LossConfig,
    RecipeConfig,
    StageConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_recipe,
    parse_overrides,
    resolve_recipe_path,
    to_dict,
)
from vldistill.losses import LOSSES, build_stage_loss, loss_options
from vldistill.outputs import Dims, ModelDims

RECIPE_PATHS = sorted(RECIPE_DIR.glob("*.yaml"))


def config_error(raw: dict, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(raw=raw, overrides=overrides)
    return str(info.value)


# ------------------------------------------------------------------------------------------------ unknown keys
def test_unknown_top_level_key_lists_allowed_keys() -> None:
    msg = config_error({"nmae": "x"})
    assert "'nmae'" in msg
    assert "allowed keys: name, role, teachers, student, data, stages, train, eval, tiny, cache" in msg


def test_unknown_section_key_names_dotted_key_and_section_keys() -> None:
    msg = config_error({"train": {"lrr": 1}})
    assert "'train.lrr'" in msg
    assert "allowed keys of train:" in msg
    assert "batch_size" in msg and "lr" in msg and "mixed_precision" in msg


def test_unknown_key_in_override() -> None:
    msg = config_error({}, parse_overrides(["--train.lrr", "1"]))
    assert "'train.lrr'" in msg and "allowed keys of train:" in msg


def test_unknown_key_inside_a_list_item() -> None:
    msg = config_error({"stages": [{"stepz": 3}]})
    assert "'stages.0.stepz'" in msg and "steps" in msg and "trainable" in msg


def test_section_that_is_not_a_mapping() -> None:
    msg = config_error({"train": 5})
    assert msg.startswith("train = 5: expected a mapping") and "batch_size" in msg


# ------------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"lr": "abc"}}, "train.lr = 'abc': expected a number"),
        ({"train": {"lr": True}}, "train.lr = True: expected a number"),
        ({"train": {"lr": 0}}, "train.lr = 0.0: must be positive"),
        ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision = 'fp8': allowed values: no, fp16, bf16"),
        ({"train": {"batch_size": 0}}, "train.batch_size = 0: must be at least 1"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size = 2.5: expected an integer"),
        ({"train": {"grad_accum": -1}}, "train.grad_accum = -1: must be at least 1"),
        ({"train": {"log_every": 0}}, "train.log_every = 0: must be at least 1"),
        ({"train": {"warmup_steps": -2}}, "train.warmup_steps = -2: must be at least 0"),
        ({"train": {"keep_checkpoints": 0}}, "train.keep_checkpoints = 0: must be at least 1"),
        ({"train": {"progress": "yes"}}, "train.progress = 'yes': expected true or false"),
        ({"train": {"max_grad_norm": "x"}}, "train.max_grad_norm = 'x': expected float or null"),
        ({"stages": [{"steps": 0}]}, "stages.0.steps = 0: must be at least 1"),
        ({"stages": [{}, {"steps": -3}]}, "stages.1.steps = -3: must be at least 1"),
        ({"stages": [{"trainable": []}]}, "stages.0.trainable = []"),
        ({"stages": [{"losses": []}]}, "stages.0.losses = []"),
        ({"stages": "clip"}, "stages = 'clip': expected a list"),
        ({"stages": [5]}, "stages.0 = 5: expected a mapping"),
        ({"data": {"languages": "en"}}, "data.languages = 'en': expected a list"),
        ({"student": {"vocab_size": 3}}, "student.vocab_size = 3: must be at least 16"),
        ({"teacher": {"dtype": "int8"}}, "teachers.0.dtype = 'int8': allowed values: float32, float16, bfloat16"),
    ],
)
def test_bad_value_names_key_and_value(raw: dict, expected: str) -> None:
    assert expected in config_error(raw)


def test_teacher_and_teachers_together_is_an_error() -> None:
    assert "either 'teacher' or 'teachers'" in config_error({"teacher": {}, "teachers": []})


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"batch_size = 0: must be at least 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"steps = 0: must be at least 1 \(stage 'x'\)"):
        StageConfig(name="x", steps=0)


def test_from_dict_defaults_and_int_to_float() -> None:
    cfg = from_dict(RecipeConfig, {"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.stages == [StageConfig()] and cfg.teachers == []
    assert to_dict(cfg)["train"]["lr"] == 1.0


# -------------------------------------------------------------------------------------------------- overrides
def test_parse_overrides_types_values() -> None:
    out = parse_overrides(["--train.lr", "1e-4", "--stages.0.steps=5", "--data.languages", "[en]"])
    assert out == {"train.lr": 1e-4, "stages.0.steps": 5, "data.languages": ["en"]}
    assert isinstance(out["train.lr"], float) and isinstance(out["stages.0.steps"], int)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-4", 1e-4), ("2.0e-3", 2e-3), ("-1E+3", -1000.0), ("5", 5), ("null", None), ("true", True), ("e5", "e5")],
)
def test_override_values_are_yaml_with_exponent_floats(text: str, value) -> None:
    assert parse_overrides([f"--k={text}"]) == {"k": value}


def test_yaml_file_reads_exponent_without_dot_as_number(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3e-4\n", encoding="utf-8")
    assert load_recipe(path).train.lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train.lr", "1"], "expected --key value"),
        (["--", "1"], "expected --key value"),
        (["--train.lr"], "has no value"),
    ],
)
def test_malformed_overrides(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_overrides(args)


def test_load_recipe_applies_overrides() -> None:
    overrides = parse_overrides(["--train.lr", "1e-4", "--stages.0.steps=5", "--data.languages", "[en]"])
    cfg = load_recipe("dcclip", overrides)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.stages[0].steps == 5
    assert cfg.stages[1].steps == yaml.safe_load((RECIPE_DIR / "dcclip.yaml").read_text())["stages"][1]["steps"]
    assert cfg.data.languages == ["en"]


def test_user_overrides_win_over_tiny() -> None:
    cfg = load_recipe("dcclip", {"stages.0.steps": 3}, tiny=True)
    assert cfg.stages[0].steps == 3
    assert cfg.stages[1].steps == 4  # from the recipe's tiny block
    assert cfg.train.batch_size == 32


def test_override_list_index_out_of_range() -> None:
    with pytest.raises(ConfigError, match=r"'stages\.5\.steps'.*'5' is not an index of a list of 2 items"):
        load_recipe("dcclip", {"stages.5.steps": 1})
    with pytest.raises(ConfigError, match=r"'x' is not an index"):
        load_recipe("dcclip", {"stages.x.steps": 1})


def test_override_through_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.lr\.x': train\.lr is a value, not a section"):
        apply_overrides({"train": {"lr": 1.0}}, {"train.lr.x": 1})


def test_override_can_replace_a_whole_list_item() -> None:
    cfg = load_recipe(raw={"stages": [{"steps": 2}]}, overrides={"stages.0": {"steps": 7, "losses": ["clip"]}})
    assert cfg.stages[0].steps == 7
    assert cfg.stages[0].losses == [LossConfig(name="clip")]


def test_overrides_use_the_yaml_loss_shorthand() -> None:
    overrides = parse_overrides(
        ["--stages.0.losses.0.tower", "text", "--stages.0.losses.1.options.norm=l1", "--stages.1.losses", "[clip, fd]"]
    )
    cfg = load_recipe("dcclip", overrides)
    first, second = cfg.stages[0].losses[:2]
    assert first.options["tower"] == "text" and first.options["norm"] == "smooth_l1" and first.weight == 1000.0
    assert second.options["norm"] == "l1" and second.options["lang"] == "en"
    assert cfg.stages[1].losses == [LossConfig(name="clip"), LossConfig(name="fd")]


def test_teacher_override_on_teacher_shorthand() -> None:
    cfg = load_recipe("dcclip", parse_overrides(["--teacher.name_or_path", "X"]))
    assert len(cfg.teachers) == 1
    assert cfg.teachers[0].name_or_path == "X"
    assert cfg.teachers[0].languages == ["en"]  # the rest of the recipe's teacher is kept


def test_teacher_override_on_recipe_without_teacher() -> None:
    cfg = load_recipe("reference-teacher", {"teacher.name_or_path": "X"})  # that recipe says `teacher: null`
    assert [t.name_or_path for t in cfg.teachers] == ["X"]
    cfg = load_recipe(raw={"name": "no-teacher-key"}, overrides={"teacher.name_or_path": "Y"})
    assert [t.name_or_path for t in cfg.teachers] == ["Y"]
    assert load_recipe(raw={}).teachers == []


def test_teachers_list_override() -> None:
    raw = {"teachers": [{"name_or_path": "a"}, {"name_or_path": "b"}]}
    cfg = load_recipe(raw=raw, overrides={"teachers.1.languages": ["en", "zh"]})
    assert cfg.teachers[1].languages == ["en", "zh"] and cfg.teachers[0].languages == ["en"]


# ----------------------------------------------------------------------------------------------------- losses
def test_inline_loss_options_land_in_options() -> None:
    cfg = load_recipe(
        raw={
            "stages": [
                {
                    "losses": [
                        {"name": "fd", "tower": "image", "weight": 2, "label": "fdi"},
                        "clip",
                        {"name": "xling", "options": {"langs": ["zh"]}, "norm": "l1"},
                    ]
                }
            ]
        }
    )
    fd, clip, xling = cfg.stages[0].losses
    assert fd == LossConfig(name="fd", weight=2.0, label="fdi", options={"tower": "image"})
    assert isinstance(fd.weight, float)
    assert clip == LossConfig(name="clip")
    assert xling.options == {"langs": ["zh"], "norm": "l1"}


def test_loss_without_name_is_an_error() -> None:
    msg = config_error({"stages": [{"losses": [{"tower": "image", "weight": 2}]}]})
    assert "stages.0.losses.0" in msg and "'name'" in msg


def test_loss_weight_must_be_a_number() -> None:
    msg = config_error({"stages": [{"losses": [{"name": "clip", "weight": "high"}]}]})
    assert "stages.0.losses.0.weight = 'high': expected a number" in msg


# ---------------------------------------------------------------------------------------------------- recipes
def test_every_recipe_file_is_registered() -> None:
    assert RECIPE_PATHS, f"no recipes in {RECIPE_DIR}"
    assert sorted(p.stem for p in RECIPE_PATHS) == RECIPES.names()
    for path in RECIPE_PATHS:
        assert resolve_recipe_path(path.stem) == path
        assert resolve_recipe_path(path) == path


def test_the_top_level_recipes_are_the_packages_recipes() -> None:
    top_level = Path(__file__).resolve().parents[1] / "recipes"
    assert sorted(p.name for p in top_level.glob("*.yaml")) == [p.name for p in RECIPE_PATHS]
    assert RECIPE_DIR.resolve() == top_level.resolve()


def test_a_built_wheel_carries_every_recipe(tmp_path: Path) -> None:
    """`pip install vldistill` (not only a checkout) must find `vldistill fit dcclip`: the recipes are package data."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path]
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("vldistill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("vldistill/recipes/")) == [
        f"vldistill/recipes/{p.name}" for p in RECIPE_PATHS
    ]
    for path in RECIPE_PATHS:
        assert zipfile.ZipFile(wheel).read(f"vldistill/recipes/{path.name}") == path.read_bytes()


def test_a_checkout_without_symbolic_links_still_finds_the_recipes(tmp_path: Path) -> None:
    """`git -c core.symlinks=false clone` writes src/vldistill/recipes as a text file holding the link's target."""
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "src" / "vldistill", tmp_path / "src" / "vldistill", symlinks=True)
    link = tmp_path / "src" / "vldistill" / "recipes"
    link.unlink()
    link.write_text("../../recipes")
    shutil.copytree(root / "recipes", tmp_path / "recipes")
    code = "from vldistill.config import RECIPES, RECIPE_DIR; print(RECIPE_DIR); print(' '.join(RECIPES.names()))"
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    directory, names = out.splitlines()
    assert Path(directory) == tmp_path / "recipes"
    assert names.split() == sorted(p.stem for p in RECIPE_PATHS)  # vlkd < vlkd-zh, but vlkd-zh.yaml < vlkd.yaml


def test_no_recipes_at_all_is_said_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    import vldistill.config as config_mod
    from vldistill.registry import Registry

    monkeypatch.setattr(config_mod, "RECIPES", Registry("recipe"))
    with pytest.raises(ConfigError, match=r"unknown recipe 'dcclip': no recipes were found in .*give the path"):
        load_recipe("dcclip")


def test_unknown_recipe_lists_registered_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown recipe 'nope'; registered: .*dcclip"):
        load_recipe("nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_recipe_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="a recipe must be a YAML mapping, got list"):
        load_recipe(path)


@pytest.mark.parametrize("path", RECIPE_PATHS, ids=lambda p: p.stem)
def test_recipe_parses_full_and_tiny(path: Path) -> None:
    full = load_recipe(path)
    tiny = load_recipe(path, tiny=True)
    assert full.name == path.stem
    assert full.tiny, "every recipe has a tiny mode"
    assert tiny.total_steps <= full.total_steps
    assert tiny.train.batch_size <= full.train.batch_size
    assert tiny.data.limit_train is not None


@pytest.mark.parametrize("path", RECIPE_PATHS, ids=lambda p: p.stem)
def test_recipe_opens_with_command_runtime_expected(path: Path) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{path.name} does not begin with a comment"
    for label in ("Command:", "Runtime:", "Expected:"):
        assert any(re.match(rf"#\s*{label}\s*\S", line) for line in header), f"{path.name}: no '# {label}' line"


@pytest.mark.parametrize("path", RECIPE_PATHS, ids=lambda p: p.stem)
def test_recipe_losses_are_registered_with_valid_options(path: Path) -> None:
    cfg = load_recipe(path)
    teacher = ModelDims(embed=32, image_width=48, text_width=48)
    dims = Dims(student=ModelDims(embed=16, image_width=24, text_width=24), teachers=(teacher,) * len(cfg.teachers))
    for i, stage in enumerate(cfg.stages):
        for term in stage.losses:
            assert term.name in LOSSES, f"{path.name}: stage {i} uses unregistered loss {term.name!r}"
            assert set(term.options) <= set(loss_options(term.name))
        weighted = build_stage_loss(stage, dims, i)  # builds each term with its options, checks teacher needs
        assert len(weighted.terms) == len(stage.losses)


# -------------------------------------------------------------------------------------------------------- CLI
def test_cli_fit_reports_unknown_key_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fit", "dcclip", "--train.lrr", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vldistill fit: error:")
    assert "'train.lrr'" in err and "allowed keys of train:" in err


def test_cli_fit_reports_bad_override_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fit", "dcclip", "--train.mixed_precision", "fp8"]) == 2
    assert "train.mixed_precision = 'fp8'" in capsys.readouterr().err


def test_non_default_keeps_the_changed_settings_only_so_new_fields_leave_artefact_keys_alone():
    from vldistill.config import non_default

    changed = non_default(load_recipe("reference-teacher", {"train.seed": 3}))
    assert changed["train"]["seed"] == 3
    # fields at their defaults (e.g. ones added to vldistill after a teacher was cached) are not part of it
    assert "compile" not in changed["train"] and "streaming" not in changed.get("data", {})
    assert non_default(load_recipe("reference-teacher"))["train"].get("seed") is None
