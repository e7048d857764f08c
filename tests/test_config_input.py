"""Bad input a new user writes, each refused before anything starts with one line that names the
file, line or key and the fix (exit 2, no traceback): non-UTF-8 bytes, a key given twice, a grpo
value of the wrong type, and batch sizes that cannot hold whole GRPO groups."""

import subprocess
import sys

import pytest

from gymtrl.config.batch import check_batch_geometry
from gymtrl.config.load import load_config
from gymtrl.errors import ConfigError

BASE = "model: {name_or_path: m}\ndata: {train: rows.jsonl}\n"


def write(tmp_path, text: str | bytes):
    p = tmp_path / "c.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def error_of(tmp_path, text, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), list(overrides))
    return e.value


def test_non_utf8_bytes_are_named_with_their_line_and_offset(tmp_path):
    e = error_of(tmp_path, BASE.encode() + b"grpo: {max_steps: 3}  # caf\xe9\n")
    assert "c.yaml:3: not UTF-8 text: byte" in e.message and "0xe9" in e.message and "UTF-8" in e.hint


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    e = error_of(tmp_path, BASE + "model: {name_or_path: other}\n")
    assert "c.yaml:3: duplicate key 'model' (first at line 1)" in e.message
    e = error_of(tmp_path, BASE + "grpo: {max_steps: 3, max_steps: 4}\n")
    assert "duplicate key 'max_steps'" in e.message


@pytest.mark.parametrize("setting, words", [
    ("grpo: {learning_rate: fast}", ["grpo.learning_rate: expected a number, got 'fast'", "c.yaml:3"]),
    ("grpo: {num_generations: abc}", ["grpo.num_generations: expected an integer (or null), got 'abc'"]),
    ("grpo: {max_steps: 2.5}", ["grpo.max_steps: expected an integer, got 2.5"]),
    ("grpo: {beta: [1]}", ["grpo.beta: expected a number, got [1]"]),
])
def test_grpo_values_are_checked_against_trls_field_types(tmp_path, setting, words):
    e = error_of(tmp_path, BASE + setting + "\n")
    for w in words:
        assert w in e.message, e.message


def test_grpo_values_from_the_command_line_too_and_numbers_written_as_strings_are_taken(tmp_path):
    e = error_of(tmp_path, BASE, ["grpo.num_generations=abc"])
    assert "grpo.num_generations: expected an integer" in e.message and "command-line override" in e.message
    cfg = load_config(write(tmp_path, BASE + "grpo: {learning_rate: 1e-5, bf16: no, save_strategy: no}\n"), [])
    assert cfg.grpo["learning_rate"] == 1e-5 and cfg.grpo["bf16"] is False and cfg.grpo["save_strategy"] == "no"


def test_batch_arithmetic_is_checked_with_the_fix_spelled_out():
    with pytest.raises(ConfigError, match="num_generations=0: GRPO needs at least 2"):
        check_batch_geometry({"num_generations": 0}, world=1)
    with pytest.raises(ConfigError, match="does not hold whole groups of num_generations=8") as e:
        check_batch_geometry({"per_device_train_batch_size": 6, "num_generations": 8}, world=1)
    assert "per_device_train_batch_size=8" in e.value.hint
    with pytest.raises(ConfigError) as e:  # two processes: 6 x 2 = 12 holds no whole group of 8; 4 x 2 does
        check_batch_geometry({"per_device_train_batch_size": 3, "num_generations": 8}, world=2)
    assert "per_device_train_batch_size=4" in e.value.hint and "x 2 processes" in e.value.message
    with pytest.raises(ConfigError, match="generation_batch_size=20 is not a multiple"):
        check_batch_geometry({"per_device_train_batch_size": 8, "generation_batch_size": 20}, world=1)
    check_batch_geometry({"per_device_train_batch_size": 4, "num_generations": 8, "gradient_accumulation_steps": 2},
                         world=1)  # 4 x 2 steps = 8: fine
    check_batch_geometry({}, world=1)  # TRL's defaults: 8 x 1, groups of 8


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path):
    p = write(tmp_path, BASE + "grpo: {learning_rate: fast}\n")
    proc = subprocess.run([sys.executable, "-m", "gymtrl.cli", "train", "--config", str(p)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("gymtrl: error:")]
    assert "grpo.learning_rate: expected a number, got 'fast'" in line
