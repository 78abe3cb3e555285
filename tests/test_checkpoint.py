from __future__ import annotations

import shutil

import pytest
import torch

from bnfold.errors import BnfoldError
from bnfold.io.files import _umask
from bnfold.mlp.checkpoint import (
    Checkpoint,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from bnfold.mlp.data import Vocab
from bnfold.mlp.model import MLP, ModelConfig


def test_round_trip(tmp_path):
    torch.manual_seed(0)
    vocab = Vocab(tuple("ab.é"))
    model = MLP(ModelConfig(vocab_size=vocab.size, n_hidden=8, n_layers=2))
    path = save_checkpoint(
        Checkpoint(model, vocab, {"dev_loss": 2.5}, {"data_sha256": "x"}), tmp_path / "m.pt"
    )
    ck = load_checkpoint(path)
    assert ck.vocab == vocab and ck.config == model.config and not ck.model.training
    assert ck.metrics == {"dev_loss": 2.5} and ck.meta["data_sha256"] == "x"
    assert ck.meta["versions"]["torch"] == torch.__version__
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # an ordinary file, not 0600


def test_trained_checkpoint_loads(trained_checkpoint):
    ck = load_checkpoint(trained_checkpoint)
    assert ck.metrics["dev_loss"] < 3.0 and len(ck.meta["data_sha256"]) == 64


def test_truncated_corrupt_foreign_and_missing(tmp_path, trained_checkpoint):
    blob = trained_checkpoint.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("# a README, not a checkpoint\n")
    cases = {
        "trunc.pt": "not a readable checkpoint",
        "junk.pt": "not a readable checkpoint",
        "foreign.pt": "not a bnfold checkpoint",
        "text.pt": "not a torch file",
        "missing.pt": "no such checkpoint",
    }
    for name, match in cases.items():
        with pytest.raises(BnfoldError, match=match) as e:
            load_checkpoint(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_loading_never_executes_code(tmp_path, capsys):
    torch.save({"format": "bnfold-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(BnfoldError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out


def test_inconsistent_checkpoint(tmp_path, trained_checkpoint):
    payload = torch.load(trained_checkpoint, weights_only=True)
    payload["vocab"] = payload["vocab"][:-1]
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(BnfoldError, match="inconsistent checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_failed_write_keeps_the_old_file(tmp_path, trained_checkpoint):
    target = tmp_path / "bn.pt"
    shutil.copy(trained_checkpoint, target)
    before = target.read_bytes()

    def crash(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["bn.pt"]
