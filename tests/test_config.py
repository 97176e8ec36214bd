import pytest

from latentreason.config import ConfigError, load_run_config, parse_overrides, to_dict
from latentreason.methods.sft import NoCoTConfig, SFTConfig


def test_defaults_and_typed_overrides():
    run = load_run_config(overrides=["optim.lr=3e-4", "train.max_steps=7", "lora.enabled=true",
                                     "data.options.num_steps=3", "optim.betas=[0.9,0.99]"])
    assert run.optim.lr == 3e-4 and isinstance(run.optim.lr, float)
    assert run.train.max_steps == 7 and run.lora.enabled is True
    assert run.data.options == {"num_steps": 3}
    assert run.optim.betas == (0.9, 0.99)
    assert isinstance(run.method, SFTConfig) and run.method.with_chain


def test_method_section_picks_subclass():
    run = load_run_config(overrides=["method.name=nocot-sft"])
    assert isinstance(run.method, NoCoTConfig) and run.method.with_chain is False


def test_yaml_file_and_override_precedence(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method:\n  name: cot-sft\noptim:\n  lr: 0.01\ntrain:\n  max_steps: 9\n")
    run = load_run_config(path, ["optim.lr=0.02"])
    assert run.optim.lr == 0.02 and run.train.max_steps == 9
    assert to_dict(run)["optim"]["lr"] == 0.02


def test_all_problems_reported_with_source_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\ntrain:\n  max_steps: many\nmodle: {}\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    msg = str(err.value)
    assert str(path) in msg
    assert "unknown key 'lrr'; did you mean lr?" in msg
    assert "train.max_steps='many': expected int" in msg
    assert "unknown key 'modle'; did you mean model" in msg
    assert len(err.value.problems) == 3


def test_unknown_method_and_task_list_valid_names():
    with pytest.raises(ConfigError) as err:
        load_run_config(overrides=["method.name=cot-stf"])
    assert "cot-sft" in str(err.value) and "nocot-sft" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_run_config(overrides=["data.task=gsm9k"])
    assert "gsm8k" in str(err.value) and "arith" in str(err.value)


def test_task_options_are_checked_before_any_weights_load():
    with pytest.raises(ConfigError, match="unknown option.*num_stepz"):
        load_run_config(overrides=["data.options.num_stepz=3"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size"):
        load_run_config(overrides=["train.global_batch_size=10", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="rollout.temperature=-1"):
        load_run_config(overrides=["rollout.temperature=-1"])


@pytest.mark.parametrize("override, message", [
    ("train.eval_limit=0", "train.eval_limit=0: model selection needs"), ("train.eval_every=-3", "train.eval_every=-3"),
    ("eval.limit=0", "eval.limit=0, must be >= 1"), ("eval.limit=-5", "eval.limit=-5"),
    ("data.train_limit=0", "data.train_limit=0"), ("optim.lr=-1", "optim.lr=-1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0"),
    ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\]"), ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1"),
    ("train.seed=-1", r"train.seed=-1, must be in \[0, 2\*\*32\)"),
    ("data.train_split=test", "data.train_split='test': training on a test split"),
])
def test_out_of_range_values_are_refused_before_any_weights_load(override, message):
    """Each once failed after the model loaded (or after training: eval_limit=0), or never."""
    with pytest.raises(ConfigError, match=message):
        load_run_config(overrides=[override])
    with pytest.raises(ConfigError, match="lora.r=0"):
        load_run_config(overrides=["lora.enabled=true", "lora.r=0"])
    load_run_config(overrides=["train.eval_limit=0", "train.select_on_valid=false", "lora.r=0"])  # unused there: fine


@pytest.mark.parametrize("split", ["test", "Test"])
def test_selection_on_a_test_split_is_refused(split):
    with pytest.raises(ConfigError, match=f"data.valid_split='{split}': model selection must never use a test split"):
        load_run_config(overrides=[f"data.valid_split={split}"])


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: not valid YAML"):
        load_run_config(path)
    path.write_text("train:\n  max_steps: 5\noptim:\n  lr: 0.1\ntrain:\n  max_steps: 7\n")  # the first block would vanish
    with pytest.raises(ConfigError, match=r"broken.yaml:5: not valid YAML \(key 'train' appears twice"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="not a file"):
        load_run_config(tmp_path)
    with pytest.raises(ConfigError, match="expected section.field=value"):
        parse_overrides(["lr=1"])


def test_every_shipped_recipe_parses():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert recipes, "configs/ holds no recipe"
    for path in recipes:
        load_run_config(path)
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "latentreason" in first, f"{path} must open with its launch command"
