"""The `hf-clipneg` console entry point: every subcommand's --help, and tiny end-to-end runs."""

from __future__ import annotations

import json

import pytest

from hf_clipneg.cli import COMMANDS, main

TINY = ["--tiny_random_towers"]


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    assert main(["nonsense"]) == 2


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_tiny_demo_prints_a_table(tmp_path, capsys):
    code = main(["demo", "--tiny_random_towers", "--num_train", "48", "--num_eval", "24", "--strategies",
                 "vanilla,cluster", "--num_train_epochs", "1", "--batch_size", "16", "--output_dir", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| strategy | t2i_R@1 |" in table
    assert "| vanilla |" in table and "| cluster |" in table


def test_demo_reads_a_json_config(tmp_path, capsys):
    config = tmp_path / "demo.json"
    config.write_text(json.dumps({"tiny_random_towers": True, "num_train": 32, "num_eval": 16, "strategies": "vanilla",
                                  "num_train_epochs": 1, "batch_size": 16, "output_dir": str(tmp_path / "out")}))
    assert main(["demo", str(config)]) == 0
    assert "| vanilla |" in capsys.readouterr().out


@pytest.mark.slow
def test_mine_inspect_train_evaluate_search(tmp_path, capsys):
    mined_dir, model_dir = tmp_path / "mined", tmp_path / "model"
    assert main(["mine", *TINY, "--synthetic_rows", "48", "--output_dir", str(mined_dir),
                 "--evidence", "image_cluster", "--n_image_clusters", "4", "--n_text_clusters", "4"]) == 0
    assert "caption_duplicate" in capsys.readouterr().out or mined_dir.exists()
    assert main(["inspect", "--mined_dataset", str(mined_dir), "--output_dir", str(tmp_path / "png"),
                 "--max_clusters", "2", "--per_cluster", "2"]) == 0
    assert (tmp_path / "png" / "clusters.png").stat().st_size > 0
    assert (tmp_path / "png" / "negative_weights.png").stat().st_size > 0
    assert main(["train", *TINY, "--train_data", str(mined_dir), "--output_dir", str(model_dir),
                 "--max_steps", "2", "--per_device_train_batch_size", "16", "--report_to", "none",
                 "--use_cpu", "--save_strategy", "no", "--negative_strategy", "cluster"]) == 0
    assert (model_dir / "config.json").exists()
    capsys.readouterr()
    assert main(["evaluate", "--model_name_or_path", str(model_dir), "--synthetic_rows", "32"]) == 0
    assert "t2i_R@1" in capsys.readouterr().out
    assert main(["search", "--model_name_or_path", str(model_dir), "--synthetic_rows", "32",
                 "--query", "a red circle", "--k", "3", "--save_index", str(tmp_path / "index.faiss")]) == 0
    out = capsys.readouterr().out
    assert "query: a red circle" in out and (tmp_path / "index.faiss").exists()
