"""Bad input gets one clear line naming the file and the problem (issue: foundation, "Bad input")."""

import json
import subprocess
import sys

import pytest

import lorafit
from lorafit import LoadError
from tiny_models import tiny_hf_model


def test_missing_path():
    with pytest.raises(LoadError, match="/no/such/model: no such file or directory"):
        lorafit.load_model("/no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(LoadError, match=f"{tmp_path}: no config.json"):
        lorafit.load_model(tmp_path)


def test_directory_without_weights(tmp_path):
    tiny_hf_model("llama").config.save_pretrained(tmp_path)
    with pytest.raises(LoadError, match=f"{tmp_path}: no weights"):
        lorafit.load_model(tmp_path)


def test_unsupported_model_type_names_the_supported_families(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(LoadError, match="'gpt_neox' is not supported \\(supported: llama, mistral, qwen2, qwen3\\)"):
        lorafit.load_model(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LoadError, match=f"{weights}: unreadable safetensors file, truncated or corrupt"):
        lorafit.load_model(tmp_path)


def test_wrong_shapes_are_reported(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="mlp.*_proj.weight' has shape .*100.*, the config implies .*64"):
        lorafit.load_model(tmp_path)


def test_uncached_hub_id():
    with pytest.raises(LoadError, match="not in the local Hugging Face cache"):
        lorafit.load_model("someone/not-a-cached-model")


def test_cli_prints_one_line_without_traceback():
    run = subprocess.run([sys.executable, "-m", "lorafit", "generate", "--model", "/no/such/model", "hi"],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip() == "lorafit: error: /no/such/model: no such file or directory"
