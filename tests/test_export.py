"""ONNX export (bn.onnx / folded.onnx) and the ONNX Runtime predictor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import BnfoldError
from bnfold.fold.modules import fold_batchnorm
from bnfold.io.files import file_sha256
from bnfold.mlp.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bnfold.mlp.data import Vocab
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.pipeline.assemble import export_checkpoint
from bnfold.pipeline.export import build_graph, metadata, op_types, set_metadata
from bnfold.runtime.infer import TorchPredictor, load_predictor
from bnfold.runtime.onnx_runtime import OnnxPredictor
from bnfold.verify.verdict import verify


def ops_of(path: Path) -> dict[str, int]:
    return op_types(onnx.load(str(path)))


def ort_optimized_ops(path: Path, tmp_path: Path) -> dict[str, int]:
    """Op types of the graph ONNX Runtime actually runs (after its own fusions)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / f"optimized-{path.name}")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ops_of(tmp_path / f"optimized-{path.name}")


def test_bn_onnx_really_has_batchnorm_nodes_and_folded_has_none(exported, tmp_path):
    n_bn = ModelConfig().n_layers + 1  # one BN per hidden block plus the output BN
    bn_ops = ops_of(exported.paths["bn"])
    folded_ops = ops_of(exported.paths["folded"])
    assert bn_ops.get("BatchNormalization") == n_bn
    assert "BatchNormalization" not in folded_ops
    assert bn_ops["Gemm"] == folded_ops["Gemm"] == n_bn
    # ...and ONNX Runtime does not fuse them away at load time either (it would for
    # MatMul -> BatchNormalization, which is what the legacy torch exporter writes)
    assert ort_optimized_ops(exported.paths["bn"], tmp_path).get("BatchNormalization") == n_bn
    assert "BatchNormalization" not in ort_optimized_ops(exported.paths["folded"], tmp_path)
    assert exported.op_types["bn"] == bn_ops


def test_exports_pass_checker_and_are_self_contained(exported):
    out_dir = exported.paths["bn"].parent
    assert sorted(p.name for p in out_dir.iterdir()) == ["bn.onnx", "folded.onnx"]  # no .data
    for path in exported.paths.values():
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        assert all(
            t.data_location == onnx.TensorProto.DEFAULT and not t.external_data
            for t in proto.graph.initializer
        )
        (inp,) = proto.graph.input
        (out,) = proto.graph.output
        assert inp.name == "contexts" and out.name == "logits"
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert dims == ["batch", 3]
        assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == [
            "batch",
            27,
        ]


def test_metadata_round_trip(exported, trained_checkpoint):
    ckpt = load_checkpoint(trained_checkpoint)
    for kind, path in exported.paths.items():
        p = OnnxPredictor(path)
        assert p.vocab == ckpt.vocab and p.block_size == ckpt.config.block_size
        assert p.folded is (kind == "folded")
        assert p.sha256 == file_sha256(path) == exported.sha256[kind]
        m = p.metadata
        assert m["source_sha256"] == file_sha256(trained_checkpoint) == exported.source_sha256
        assert m["source_checkpoint"] == trained_checkpoint.name
        assert m["end_token"] == 0
        assert m["data_sha256"] == ckpt.meta["data_sha256"]
        from bnfold.version import __version__

        assert m["bnfold_version"] == __version__
        want_cfg = ckpt.config.to_dict() | {"batchnorm": kind == "bn"}
        assert m["model_config"] == want_cfg
        # the verification figures in the file are the ones the export reported
        assert all(v["passed"] and v["exhaustive"] for v in m["verification"].values())
        assert m["verification"]["torch_same"]["contexts_checked"] == 27**3
    folded_meta = OnnxPredictor(exported.paths["folded"]).metadata["verification"]
    assert folded_meta["torch_bn"]["reference"].startswith(trained_checkpoint.name)


def test_unicode_vocabulary_with_dot_survives_metadata(tmp_path):
    chars = (".", "é", '"', "\\", "😀", "a", "-")
    vocab = Vocab(chars)
    cfg = ModelConfig(vocab_size=vocab.size, block_size=2, n_embd=4, n_hidden=8, n_layers=2)
    model = MLP(cfg).eval()
    proto = build_graph(model)
    src = tmp_path / "x.pt"
    src.write_bytes(b"source")
    set_metadata(proto, metadata(vocab, cfg.to_dict(), False, src, file_sha256(src)))
    p = OnnxPredictor(tmp_path / "u.onnx", model_bytes=proto.SerializeToString())
    assert p.vocab == vocab and p.block_size == 2 and p.folded is False
    ctx = p.context_for("é😀")
    assert ctx.tolist() == [[chars.index("é") + 1, chars.index("😀") + 1]]
    import torch

    with torch.no_grad():
        want = model(torch.from_numpy(ctx)).numpy()
    np.testing.assert_allclose(p.logits(ctx), want, rtol=0, atol=1e-5)


def test_ort_matches_torch_on_the_whole_domain_in_any_pairing(exported, trained_checkpoint):
    bn_pt = TorchPredictor(trained_checkpoint)
    bn_onnx, folded_onnx = (OnnxPredictor(exported.paths[k]) for k in ("bn", "folded"))
    for ref, cand in [(bn_pt, bn_onnx), (bn_pt, folded_onnx), (bn_onnx, folded_onnx)]:
        rep = verify(ref, cand)
        assert rep.exhaustive and rep.contexts_checked == 27**3
        assert rep.passed and rep.argmax_disagreements == 0, rep.format()
        assert rep.max_abs_logit_error < 1e-5
    # paths work too, through load_predictor
    assert verify(str(exported.paths["folded"]), trained_checkpoint).passed


def test_dynamic_batch_and_single_example(exported, trained_checkpoint):
    bn_pt = TorchPredictor(trained_checkpoint)
    p = OnnxPredictor(exported.paths["folded"])
    rng = np.random.default_rng(0)
    for batch in (1, 2, 7, 1024):
        x = rng.integers(0, 27, size=(batch, 3))
        z = p.logits(x)
        assert z.shape == (batch, 27) and z.dtype == np.float32
        np.testing.assert_allclose(z, bn_pt.logits(x), rtol=0, atol=1e-5)
    assert p.logits(np.zeros((0, 3), np.int64)).shape == (0, 27)
    assert p.logits(np.array([[0, 1, 2]], np.int32)).shape == (1, 27)  # any integer dtype
    probs = p.next_char_probs("em")
    np.testing.assert_allclose(probs, bn_pt.next_char_probs("em"), rtol=0, atol=1e-6)
    assert abs(probs.sum() - 1) < 1e-12
    assert load_predictor(exported.paths["bn"]).backend == "onnxruntime"


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.array([[0, 1, 27]]), r"\[0, 27\)"),
        (np.array([[0, -1, 2]]), r"\[0, 27\)"),
        (np.full((100, 3), 5) - np.eye(100, 3, dtype=int) * 6, r"\[0, 27\)"),  # big batch, -1
        (np.zeros((1, 4), np.int64), r"shape \(batch, 3\)"),
        (np.zeros(3, np.int64), r"shape \(batch, 3\)"),
        (np.zeros((1, 3)) + 0.5, "integers"),
    ],
)
def test_bad_contexts_are_refused(exported, bad, match):
    with pytest.raises(BnfoldError, match=match):
        OnnxPredictor(exported.paths["folded"]).logits(bad)


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    set_metadata(proto, meta)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"format": None}, "not a bnfold ONNX file"),
        ({"vocabulary": None}, "missing vocabulary"),
        ({"block_size": None, "folded": None}, "missing block_size, folded"),
        ({"vocabulary": json.dumps(list("abc")), "model_config": None}, "4 tokens .* output"),
        ({"block_size": "4", "model_config": None}, "block_size 4 .* input"),
        ({"block_size": "4"}, "model_config block_size 3 != 4"),
        ({"model_config": "[1]"}, "model_config is not a JSON object"),
        ({"vocabulary": "a,b,c"}, "bad ONNX metadata"),
        ({"vocabulary": json.dumps(["a", "a"] + list("bcdefghijklmnopqrstuvwxy"))}, "distinct"),
        ({"folded": "maybe"}, "folded must be"),
        ({"end_token": "5"}, "end token index 5"),
        ({"format_version": "99"}, "format version"),
    ],
)
def test_missing_or_inconsistent_metadata_is_a_clear_error(exported, tmp_path, changes, match):
    path = _rewrite(exported.paths["folded"], tmp_path / "odd.onnx", **changes)
    with pytest.raises(BnfoldError, match=match) as e:
        OnnxPredictor(path)
    assert str(path) in str(e.value)


def test_corrupt_truncated_or_missing_files_are_clear_errors(exported, tmp_path):
    good = exported.paths["bn"].read_bytes()
    cases = {
        "garbage.onnx": b"this is not an onnx model at all",
        "truncated.onnx": good[: len(good) // 2],
        "empty.onnx": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BnfoldError, match="not a readable ONNX model") as e:
            OnnxPredictor(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(BnfoldError, match="no such ONNX file"):
        OnnxPredictor(tmp_path / "missing.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(BnfoldError, match="is a directory"):
        load_predictor(tmp_path / "dir.onnx")
    # a valid ONNX graph that is not a bnfold export
    plain = onnx.load(str(exported.paths["bn"]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(BnfoldError, match="not a bnfold ONNX file"):
        OnnxPredictor(tmp_path / "plain.onnx")


def test_folded_checkpoint_exports_folded_onnx_only(trained_checkpoint, tmp_path):
    ckpt = load_checkpoint(trained_checkpoint)
    folded, _ = fold_batchnorm(ckpt.model)
    src = save_checkpoint(Checkpoint(folded, ckpt.vocab, meta=ckpt.meta), tmp_path / "f.pt")
    res = export_checkpoint(src)  # default: next to the checkpoint
    assert set(res.paths) == {"folded"} and res.paths["folded"] == tmp_path / "folded.onnx"
    assert not (tmp_path / "bn.onnx").exists()
    assert "already folded" in res.notes[0]
    assert res.passed and OnnxPredictor(res.paths["folded"]).folded
    # a folded .pt offered in place of folding must record that it came from this bn.pt
    with pytest.raises(BnfoldError, match="not the folded form"):
        export_checkpoint(trained_checkpoint, tmp_path / "x", folded_checkpoint=src)
    assert not (tmp_path / "x").exists()


def test_cli_export_and_verify_with_onnx_files(trained_checkpoint, tmp_path):
    ckpt = tmp_path / "bn.pt"
    shutil.copy(trained_checkpoint, ckpt)
    r = CliRunner().invoke(main, ["export", str(ckpt), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["passed"] is True
    assert set(summary["paths"]) == {"bn", "folded"}
    assert summary["op_types"]["bn"]["BatchNormalization"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.onnx", "bn.pt", "folded.onnx"]

    r = CliRunner().invoke(main, ["export", str(ckpt), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "BatchNormalization x6" in r.output and "[ok]" in r.output

    r = CliRunner().invoke(main, ["export", str(tmp_path / "nope.pt")])
    assert r.exit_code == 2 and "no such checkpoint" in r.output


def test_cli_verify_accepts_onnx_in_any_pairing(exported, trained_checkpoint):
    if "verify" not in main.commands:
        pytest.fail("the `bnfold verify` command is missing")
    bn_onnx, folded_onnx = (str(exported.paths[k]) for k in ("bn", "folded"))
    for a, b in [
        (bn_onnx, str(trained_checkpoint)),
        (str(trained_checkpoint), folded_onnx),
        (bn_onnx, folded_onnx),
    ]:
        r = CliRunner().invoke(main, ["verify", a, b])
        assert r.exit_code == 0, r.output
        assert "PASSED" in r.output


def test_bench_measures_the_four_networks_in_one_run(trained_checkpoint, tmp_path):
    shutil.copy(trained_checkpoint, tmp_path / "bn.pt")  # no folded.pt, no ONNX files yet
    r = CliRunner().invoke(
        main,
        ["bench", "--models", str(tmp_path), "--repeats", "400", "--names", "300", "--json"],
    )
    assert r.exit_code == 0, r.output
    b = json.loads(r.output[r.output.index("{") :])  # progress lines go to stderr
    nets = ["torch BN", "torch folded", "ONNX BN", "ONNX folded"]
    assert sorted(b["latency_us"]) == sorted([*nets, "ORT plain run"])
    assert b["ratios"]["onnx_folded_vs_plain_ort_run_p50"] > 0
    for k in nets:
        lat = b["latency_us"][k]
        assert 0 < lat["p50"] <= lat["p99"] and lat["n"] == 400
        assert b["rows_per_s"][k] > 0
        speedup = b["ratios"]["latency_p50_speedup_vs_torch_bn"][k]
        assert speedup == round(b["latency_us"]["torch BN"]["p50"] / lat["p50"], 2)
    sampler = b["names_per_s"]["batched sampler"]
    lecture = b["names_per_s"]["lecture (torch BN, one name at a time)"]
    assert lecture["names_per_s"] > 0 and sampler["ONNX folded"]["names_per_s"] > 0
    assert 2 < sampler["ONNX folded"]["steps_per_name"] < 20  # a name + its end token
    assert sampler["same_names_onnx_bn_vs_folded"] >= 0.99
    assert any("exported to a temporary directory" in n for n in b["notes"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn.pt"]  # nothing left behind
