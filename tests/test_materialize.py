"""``igtcache lora materialize``: a folder PEFT loads, from a directory, S3, or the node daemon over S3."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from igtcache.bench.serve_model import ModelSpec, upload, write_adapters  # noqa: E402
from igtcache.clients.adapter_source import DirectorySource  # noqa: E402
from igtcache.clients.lora_kv import AdapterError  # noqa: E402
from igtcache.clients.materialize import main, materialize  # noqa: E402

SPEC = ModelSpec(vocab=128, hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1, max_positions=256)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_adapters(SPEC.build(), root, 2, seed=4)
    return root


def loads_like_the_original(folder, original) -> None:
    """PEFT loads ``folder``, and the model it makes computes what the original folder's does."""
    from peft import PeftModel

    ids = torch.arange(20)[None]
    with torch.no_grad():
        ours = PeftModel.from_pretrained(SPEC.build(), str(folder)).eval()(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(SPEC.build(), str(original)).eval()(input_ids=ids).logits
    assert torch.equal(ours, theirs)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_materialize_from_a_directory_loads_with_peft_and_refuses_to_overwrite(adapters, tmp_path):
    target = materialize("lora-001", tmp_path / "out" / "lora-001", DirectorySource(adapters))
    loads_like_the_original(target, adapters / "lora-001")
    with pytest.raises(FileExistsError, match="--replace"):
        materialize("lora-000", target, DirectorySource(adapters))
    materialize("lora-000", target, DirectorySource(adapters), replace=True)
    loads_like_the_original(target, adapters / "lora-000")


def test_damaged_or_missing_adapters_leave_nothing_behind(adapters, tmp_path):
    broken = tmp_path / "broken"
    (broken / "bad").mkdir(parents=True)
    (broken / "bad" / "adapter_config.json").write_text("{}")
    (broken / "bad" / "adapter_model.safetensors").write_bytes(
        (adapters / "lora-000" / "adapter_model.safetensors").read_bytes()[:-64])
    with pytest.raises(AdapterError, match="truncated"):
        materialize("bad", tmp_path / "out" / "bad", DirectorySource(broken))
    with pytest.raises(KeyError):
        materialize("missing", tmp_path / "out" / "missing", DirectorySource(broken))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert main(["materialize", "missing", str(tmp_path / "x"), "--source", str(broken)]) == 1


@pytest.mark.timeout(120)
def test_the_command_materializes_from_s3_and_through_the_daemon(adapters, s3, s3_server, tmp_path, capsys):
    from igtcache.daemon.process import DaemonProcess
    from igtcache.daemon_client import DaemonClient

    fs, prefix = s3
    upload(fs, adapters, f"{prefix}/loras")
    options = json.dumps(s3_server.storage_options())
    direct = tmp_path / "direct"
    assert main(["materialize", "lora-000", str(direct), "--source", f"s3://{prefix}/loras",
                 "--storage-options", options]) == 0
    assert capsys.readouterr().out.strip() == str(direct)
    loads_like_the_original(direct, adapters / "lora-000")

    args = ["--remote", f"models=s3://{prefix}", "--storage-options", options, "--disk", "0", "--memory", "64MiB"]
    with DaemonProcess(tmp_path / "d.sock", args) as daemon:
        cached = tmp_path / "cached"
        assert main(["materialize", "lora-001", str(cached), "--socket", daemon.socket_path,
                     "--prefix", "loras"]) == 0
        loads_like_the_original(cached, adapters / "lora-001")
        again = tmp_path / "again"
        assert main(["materialize", "lora-001", str(again), "--socket", daemon.socket_path, "--remote", "models",
                     "--prefix", "loras"]) == 0
        with DaemonClient(daemon.socket_path, remote_name="models") as client:
            stats = client.stats()
        assert stats["hits"] >= 1  # the second engine's copy came from the node cache
        assert main(["materialize", "lora-001", str(tmp_path / "y"), "--socket", daemon.socket_path,
                     "--remote", "nope"]) == 1
        assert "serves no remote 'nope'" in capsys.readouterr().err
