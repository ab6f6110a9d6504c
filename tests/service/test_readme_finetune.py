"""The README's "Fine-tune your openpi Pi0-FAST checkpoint" section stays true: its service file
and its input map are read by the service's own config loader (every key known, every value of
its type), and the map is one the server builds."""

from __future__ import annotations

import re
from pathlib import Path

from openpi_rl.models.pi0_fast_openpi import Pi0FASTOpenPIConfig
from openpi_rl.policy_server.serve import robot_inputs
from openpi_rl.service.config import ServiceFile

README = Path(__file__).resolve().parents[2] / "README.md"
TOK = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"


def test_the_readme_fine_tune_service_file_is_a_valid_config(tmp_path):
    text = README.read_text()
    section = text.split("## Fine-tune your openpi Pi0-FAST checkpoint", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the service file and the input map"
    path = tmp_path / "openpi-rl.toml"
    # The tokenizer files stand in for openpi's (the obs spec reads the vocabulary from them).
    toml = blocks[0].replace(
        "/data/openpi/paligemma_tokenizer.model", str(TOK / "paligemma_tiny.model")
    )
    toml = toml.replace('"/data/openpi/fast"', f'"{TOK / "fast_tiny"}"')
    path.write_text(toml + "\n" + blocks[1])
    service = ServiceFile.load(path)
    serve, learn = service.role_config("serve"), service.role_config("learn")
    assert isinstance(serve.model, Pi0FASTOpenPIConfig) and serve.model == learn.model
    assert serve.model.checkpoint and serve.inputs == "libero" and learn.critic_warmup_updates > 0
    franka = serve.input_maps["franka"]
    assert franka.state == ("joints", "gripper") and franka.action_dims == 8
    inputs = robot_inputs(serve)  # the server's input pipeline builds from it
    assert inputs.map_of("arm-1").action_dims == 7  # the libero preset
