"""The training scripts' arguments: any YAML can be passed, and a typo'd key or flag stops with one line naming the
closest valid one; flags are never prefix-matched."""

import pytest
from job_common import parse_job_args
from train_lora import DataArguments
from transformers import TrainingArguments
from trl import ModelConfig

from tie_guard import TieGuardConfig

TYPES = (DataArguments, ModelConfig, TrainingArguments, TieGuardConfig)


def test_another_yaml_and_overrides(tmp_path):
    cfg = tmp_path / "other.yaml"
    cfg.write_text("output_dir: out/x\nmax_steps: 3\ncheck_every: 2\nmodel_name_or_path: smollm2-135m-instruct\n")
    data, model, train, guard = parse_job_args(TYPES, ["--config", str(cfg), "--max_steps", "5",
                                                       "--no_compare_plain_merge"])
    assert (train.max_steps, guard.check_every, data.compare_plain_merge) == (5, 2, False)
    assert model.model_name_or_path == "smollm2-135m-instruct"


@pytest.mark.parametrize("argv, yaml_text, expect", [
    (["--max_step", "2"], None, "unknown setting 'max_step'; did you mean 'max_steps'?"),
    ([], "max_stepz: 3\n", "unknown setting 'max_stepz'; did you mean 'max_steps'?"),
    ([], "check_evry: 3\n", "did you mean 'check_every'?"),
])
def test_unknown_settings_are_one_line_errors(tmp_path, capsys, argv, yaml_text, expect):
    if yaml_text is not None:
        (tmp_path / "c.yaml").write_text("output_dir: out/x\n" + yaml_text)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    else:
        argv = ["--output_dir", "out/x", *argv]
    with pytest.raises(SystemExit) as exc:
        parse_job_args(TYPES, argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and expect in err and len(err.strip().splitlines()) == 1
