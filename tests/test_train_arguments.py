"""`train_classification.py`'s arguments do what they say (in process, no training).

An explicit argument (command line or JSON/YAML file) wins over every recipe default; `--save_steps`,
`--eval_steps` and `--logging_steps` imply the "steps" strategy; an argument that would have no effect or a
contradictory combination is one `error:` line that says what to change; `--help` states the rules. The linear LR
scaling and the recipe table in README: tests/test_training_recipe.py.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

pytest.importorskip("datasets")
pytest.importorskip("evaluate")

from training_helpers import parsed_values  # noqa: E402

from train_classification import UsageError, cli, parse_arguments  # noqa: E402
from training_recipe import RECIPES, STEP_STRATEGIES  # noqa: E402


def as_argv(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        argv += [f"--{name}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


# --------------------------------------------------------------------------------- explicit beats the recipe


@pytest.mark.parametrize("steps", sorted(STEP_STRATEGIES))
def test_explicit_steps_imply_the_steps_strategy(steps, tmp_path):
    """Seen: `python train_classification.py --save_steps 10` saved nothing at step 10: the digits recipe's
    save_strategy "epoch" silently won. Failed before the fix with `assert 'epoch' == 'steps'` (save) and
    `'no' == 'steps'` (eval)."""
    strategy = STEP_STRATEGIES[steps]
    values = parsed_values([f"--{steps}", "10"])
    assert (values[strategy], values[steps]) == ("steps", 10)
    path = tmp_path / "args.yaml"
    path.write_text(f"{steps}: 10\n")
    values = parsed_values([str(path)])
    assert (values[strategy], values[steps]) == ("steps", 10)
    # With the strategy given too, the strategy is the user's.
    assert parsed_values([f"--{steps}", "10", f"--{strategy}", "steps"])[strategy] == "steps"


def other_value(name: str, value):
    """A valid value for `name` that differs from the recipe's `value`."""
    named = {
        "architecture": {"internimage_t_1k_224": "internimage_s_1k_224", "internimage_digits": "internimage_t_1k_224"},
        "auto_augment": {"none": "rand-m7-mstd0.5"},
        "eval_strategy": {"epoch": "no", "no": "epoch"},
        "save_strategy": {"epoch": "no"},
        "report_to": {"tensorboard": "none", "none": "tensorboard"},
    }
    if name in named:
        return named[name].get(value, "none" if name == "auto_augment" else None)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.25
    if name == "output_dir":
        return value + "-elsewhere"
    raise AssertionError(f"no alternative for {name}={value!r}")


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_default_yields_to_an_explicit_argument(recipe, tmp_path):
    """Each recipe default, given another value on the command line or in a YAML file, takes that value
    (learning rates as given: the linear scaling happens later, see below)."""
    defaults = RECIPES[recipe]
    changed = {name: other_value(name, value) for name, value in defaults.items() if name != "color_jitter"}
    changed["recipe"] = recipe
    # colour jitter acts only without auto-augment (else giving it is an error, see below)
    jitter = {"recipe": recipe, "color_jitter": other_value("color_jitter", defaults["color_jitter"]),
              "auto_augment": "none"}
    for explicit in (changed, jitter):
        from_command_line = parsed_values(as_argv(explicit))
        path = tmp_path / "args.yaml"
        path.write_text(yaml.safe_dump(explicit))
        from_file = parsed_values([str(path)])
        for name, value in explicit.items():
            if name == "report_to":  # TrainingArguments keeps a list of integrations
                value = [] if value == "none" else [value]
            assert from_command_line[name] == value, name
            assert from_file[name] == value, name


def test_recipe_defaults_fill_what_is_not_given_and_the_recipe_follows_the_data():
    values = parsed_values(["--data_path", "somewhere", "--mixup", "0.2"])
    assert values["mixup"] == 0.2 and values["cutmix"] == 1.0 and values["auto_augment"].startswith("rand-m9")
    assert values["architecture"] == "internimage_t_1k_224" and values["max_grad_norm"] == 5.0
    assert values["save_strategy"] == "epoch" and values["learning_rate"] == 5e-4
    values = parsed_values(["--data_path", "somewhere", "--model_name_or_path", "folder"])
    assert values["layer_decay"] == 0.9 and values["learning_rate"] == 2e-5  # 22kto1k
    assert parsed_values([])["per_device_train_batch_size"] == 128  # digits


def test_argument_file_values_are_typed_like_the_command_line(tmp_path):
    path = tmp_path / "args.json"
    arguments = {"num_train_epochs": 3, "min_lr": 0.5, "bf16": True, "use_cpu": True, "layer_decay": None}
    path.write_text(json.dumps(arguments))
    values = parsed_values([str(path)])
    assert (values["num_train_epochs"], values["min_lr"], values["bf16"], values["layer_decay"]) == (3, 0.5, True, None)


# --------------------------------------------------------------------------------- errors that say what to do


CONTRADICTIONS = {
    "load_best_without_evaluation": (
        ["--load_best_model_at_end", "true"], r"--load_best_model_at_end .*eval_strategy='no' \(the digits recipe's "
        r"default\).*pass --eval_strategy epoch",
    ),
    "load_best_with_steps_saves": (
        ["--load_best_model_at_end", "true", "--save_steps", "10"],
        r"save_strategy='steps' \(implied by --save_steps\).*pass --eval_strategy steps --eval_steps N",
    ),
    "steps_with_another_strategy": (
        ["--save_steps", "10", "--save_strategy", "epoch"], r"--save_steps has no effect with --save_strategy epoch",
    ),
    "jitter_with_auto_augment": (
        ["--data_path", "x", "--color_jitter", "0.3"],
        r"--color_jitter 0.3 has no effect here: it acts only with --auto_augment none.*"
        r"auto_augment='rand-m9-mstd0.5-inc1' \(the in1k recipe's default\)",
    ),
    "mixup_prob_without_mixup": (
        ["--mixup_prob", "0.5"], r"--mixup_prob 0.5 has no effect here: it acts only with --mixup or --cutmix > 0"
    ),
    "ema_warmup_without_ema": (
        ["--model_ema_decay", "0", "--model_ema_warmup", "true"], r"--model_ema_warmup True has no effect",
    ),
    "two_data_sources": (["--data_path", "a", "--dataset_name", "b"], r"--data_path a has no effect"),
    "architecture_and_checkpoint": (
        ["--architecture", "internimage_s_1k_224", "--model_name_or_path", "m"], r"--architecture .* no effect",
    ),
    "two_warmups": (["--warmup_steps", "10", "--warmup_epochs", "1"], r"--warmup_epochs 1.0 has no effect"),
    "scheduler": (["--lr_scheduler_type", "linear"], r"--lr_scheduler_type is not used by this script: the schedule"),
    "optimizer": (["--optim", "sgd"], r"--optim is not used by this script: the optimizer is the recipe's AdamW"),
    "streaming_without_max_steps": (["--dataset_name", "d", "--streaming", "true"], r"--streaming needs --max_steps"),
    "checkpoint_columns": (["--remove_unused_columns", "true"], r"--remove_unused_columns is not used"),
    "unknown_recipe": (["--recipe", "imagenet"], r"--recipe 'imagenet' is unknown"),
    "unknown_argument": (["--lerning_rate", "1"], r"unknown arguments \['--lerning_rate', '1'\]"),
    "bad_type": (["--save_steps", "often"], r"argument --save_steps/--save-steps: invalid float value: 'often'"),
    "transformers_check": (  # TrainingArguments' own check, as one line
        ["--load_best_model_at_end", "true", "--save_steps", "10", "--eval_steps", "3"],
        r"--load_best_model_at_end requires the saving steps to be a round multiple of the evaluation steps",
    ),
}


@pytest.mark.parametrize("name", sorted(CONTRADICTIONS))
def test_contradictions_are_one_error_line_that_says_what_to_change(name, tmp_path, capsys):
    argv, message = CONTRADICTIONS[name]
    out = tmp_path / "out"
    assert cli([*argv, "--output_dir", str(out)]) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert re.search(message, last), last
    assert not out.exists(), "nothing may be written before the arguments are known to be usable"


def test_arguments_at_their_default_value_are_harmless():
    values = parsed_values(["--mixup_prob", "1.0", "--color_jitter", "0", "--data_path", "x", "--save_steps", "500"])
    assert values["save_strategy"] == "steps" and values["auto_augment"].startswith("rand")


@pytest.mark.parametrize(
    "content, message",
    [
        ("save_steps: [1, 2\n", r"args.yaml is not valid YAML"),
        ("- save_steps\n", r"must hold a mapping of argument names to values, not list"),
        ("save_steps: often\n", r"args.yaml: argument --save_steps/--save-steps: invalid float value: 'often'"),
        ("save_step: 10\n", r"args.yaml: unknown arguments \['save_step'\]"),
        ("bf16: maybe\n", r"args.yaml: argument --bf16: .*maybe"),
    ],
)
def test_bad_argument_files_name_the_file(content, message, tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(content)
    with pytest.raises(UsageError, match=message):
        parse_arguments([str(path)])


def test_help_states_the_rules_and_the_selected_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["--data_path", "/data/imagenet", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Given alone, it implies --save_strategy steps." in text
    assert "Given alone, it implies --eval_strategy steps." in text
    assert "Multiplied by total batch / --lr_reference_batch_size (linear scaling). (default: 0.0005)" in text
    assert "an argument given on the command line or in the file wins over the recipe's default" in text
    assert "--lr_scheduler_type" in text and "Not used by this script: the schedule is the recipe's" in text


def test_an_argument_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="cannot read the argument file"):
        parse_arguments([str(tmp_path / "missing.yaml")])
