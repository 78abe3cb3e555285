"""Export the BatchNorm network and its folded twin to ONNX: ``bn.onnx`` and ``folded.onnx``.

The graphs are written op by op with ``onnx.helper`` rather than traced by
``torch.onnx.export``, deliberately:

* ``bn.onnx`` must *really* run its BatchNorms. torch's default (dynamo) exporter with
  ``optimize=True`` folds every BN into a Gemm; the legacy TorchScript exporter writes
  ``MatMul -> BatchNormalization``, which ONNX Runtime's ``MatMulBNFusion`` fuses into a
  Gemm at load time, so the "unfolded" file would run folded anyway. Here each block is
  ``Gemm(bias-free) -> BatchNormalization -> Tanh``: ORT has no Gemm+BN fusion, so the BN
  nodes survive in the file *and* in the optimised session graph.
* The graph is the same on every torch version (no tracer, no exporter options that change
  between releases), has no ``.data`` sidecar, and exports in milliseconds.
* It is minimal: ``Gather`` (embedding) -> ``Flatten`` -> per block ``Gemm`` (weight kept
  in torch's (out, in) layout, ``transB=1``) [-> ``BatchNormalization``] [-> ``Tanh``].
  ORT fuses ``Gemm -> Tanh`` into one ``FusedGemm`` in the folded network.

Correctness does not rest on the builder: before anything is written, both graphs are run
in ONNX Runtime and compared with torch over the whole input domain in the assembler's one
walk (:mod:`bnfold.pipeline.assemble`); the figures go into the files' metadata. After writing, each
file is loaded back from disk and must reproduce the verified outputs bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.io.files import atomic_write
from bnfold.mlp.checkpoint import Checkpoint
from bnfold.mlp.data import END, Vocab
from bnfold.mlp.model import MLP
from bnfold.runtime.onnx_runtime import (
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    OUTPUT_NAME,
    OnnxPredictor,
)
from bnfold.verify.domain import DomainComparison, all_contexts
from bnfold.verify.verdict import report_from_pair
from bnfold.version import __version__

OPSET = 17  # BatchNormalization-15, Gemm-13, Gather-13, Flatten-13, Tanh-13
IR_VERSION = 8  # readable by every onnxruntime >= 1.10 (this one reads at most 13)

# the verification figures copied into each file's metadata
VERIFY_KEYS = (
    "reference",
    "candidate",
    "coverage",
    "contexts_checked",
    "exhaustive",
    "max_abs_logit_error",
    "max_abs_prob_error",
    "argmax_agreement",
    "reference_vs_float64",
    "candidate_vs_float64",
    "tolerance",
    "criterion",
    "bound",
    "margin",
    "near_ties",
    "flips",
    "reason",
    "passed",
)


def _init(name: str, t) -> onnx.TensorProto:
    return numpy_helper.from_array(t.detach().cpu().numpy().astype(np.float32), name)


def build_graph(model: MLP, name: str = "bnfold") -> onnx.ModelProto:
    """The ONNX graph of our MLP (BN or folded): int64 ``contexts [batch, block_size]`` ->
    float32 ``logits [batch, vocab]``, with every module of ``model.net`` mapped to its op.

    Supports ``nn.Linear`` (Gemm), ``nn.BatchNorm1d`` in eval mode (BatchNormalization),
    ``nn.Tanh`` and ``nn.Identity`` (dropped); anything else is refused.
    """
    if not (isinstance(model, nn.Module) and hasattr(model, "tok_emb") and hasattr(model, "net")):
        raise BnfoldError(f"cannot export {type(model).__name__}: expected bnfold's MLP")
    cfg = model.config
    emb = model.tok_emb
    inits = [_init("tok_emb.weight", emb.weight)]
    nodes = [
        helper.make_node("Gather", ["tok_emb.weight", INPUT_NAME], ["embedded"], name="embed"),
        helper.make_node("Flatten", ["embedded"], ["x"], axis=1, name="flatten"),
    ]
    modules = [(f"net.{i}", m) for i, m in enumerate(model.net) if not isinstance(m, nn.Identity)]
    if not modules:
        raise BnfoldError("cannot export a network without layers")
    cur = "x"
    for k, (prefix, m) in enumerate(modules):
        out = OUTPUT_NAME if k == len(modules) - 1 else f"{prefix}.out"
        if isinstance(m, nn.Linear):
            inputs = [cur, f"{prefix}.weight"]
            inits.append(_init(f"{prefix}.weight", m.weight))
            if m.bias is not None:
                inputs.append(f"{prefix}.bias")
                inits.append(_init(f"{prefix}.bias", m.bias))
            nodes.append(helper.make_node("Gemm", inputs, [out], transB=1, name=prefix))
        elif isinstance(m, nn.BatchNorm1d):
            if m.running_mean is None or m.running_var is None:
                raise BnfoldError(f"cannot export {prefix}: BatchNorm without running statistics")
            n = m.num_features
            names = [f"{prefix}.{s}" for s in ("weight", "bias", "running_mean", "running_var")]
            for nm, t, default in ((names[0], m.weight, 1.0), (names[1], m.bias, 0.0)):
                if t is None:
                    inits.append(numpy_helper.from_array(np.full(n, default, np.float32), nm))
                else:
                    inits.append(_init(nm, t))
            inits += [_init(names[2], m.running_mean), _init(names[3], m.running_var)]
            nodes.append(
                helper.make_node(
                    "BatchNormalization", [cur, *names], [out], epsilon=float(m.eps), name=prefix
                )
            )
        elif isinstance(m, nn.Tanh):
            nodes.append(helper.make_node("Tanh", [cur], [out], name=prefix))
        else:
            raise BnfoldError(f"cannot export {prefix}: unsupported module {type(m).__name__}")
        cur = out
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", cfg.block_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", cfg.vocab_size])],
        inits,
    )
    proto = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="bnfold",
        producer_version=__version__,
    )
    return proto


def op_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Node counts by op type, e.g. ``{"Gemm": 6, "BatchNormalization": 6, ...}``."""
    counts: dict[str, int] = {}
    for n in proto.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def metadata(
    vocab: Vocab,
    config: dict,
    folded: bool,
    source: Path,
    source_sha256: str,
    verification: dict | None = None,
    data_sha256: str | None = None,
) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "vocabulary": json.dumps(list(vocab.chars), ensure_ascii=False),
        "end_token": str(END),
        "block_size": str(config["block_size"]),
        "model_config": json.dumps(config, sort_keys=True),
        "folded": "true" if folded else "false",
        "source_checkpoint": source.name,
        "source_sha256": source_sha256,
        "bnfold_version": __version__,
    }
    if data_sha256:  # the words file it was trained on (novelty labels check it)
        meta["data_sha256"] = data_sha256
    if verification is not None:
        meta["verification"] = json.dumps(verification)
    return meta


def set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    helper.set_model_props(proto, meta)


def check_model(proto: onnx.ModelProto, where: str) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # a bug in the builder, never the user's fault
        raise BnfoldError(f"{where}: the exported graph fails onnx.checker: {e}") from None


@dataclass
class ExportResult:
    paths: dict[str, Path]  # "bn" / "folded" -> written file
    op_types: dict[str, dict[str, int]]
    verification: dict[str, dict]  # "<onnx> vs <torch>" -> figures
    sha256: dict[str, str]
    source: Path
    source_sha256: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(v["passed"] for v in self.verification.values())

    def to_dict(self) -> dict:
        return {
            "paths": {k: str(v) for k, v in self.paths.items()},
            "op_types": self.op_types,
            "verification": self.verification,
            "sha256": self.sha256,
            "source": str(self.source),
            "source_sha256": self.source_sha256,
            "seconds": self.seconds,
            "passed": self.passed,
            "notes": self.notes,
        }

    def stage_row(self) -> dict:
        """The ``train-fold`` summary row of this export."""
        worst = max(v["max_abs_logit_error"] for v in self.verification.values())
        n_bn = {k: v.get("BatchNormalization", 0) for k, v in self.op_types.items()}
        files = ", ".join(f"{p.name} ({n_bn[k]} BN nodes)" for k, p in self.paths.items())
        first = next(iter(self.verification.values()))
        return {
            "stage": "export",
            "status": "PASS" if self.passed else "FAIL",
            "details": f"{files}; ONNX Runtime vs torch on {first['contexts_checked']:,}"
            f" contexts: max |dlogit| {worst:.1e}, {self.seconds:.2f} s",
            "output": str(next(iter(self.paths.values())).parent),
        }

    def format(self) -> str:
        lines = [f"exported {self.source} (sha256 {self.source_sha256[:12]}...)"]
        for k, p in self.paths.items():
            ops = ", ".join(f"{op} x{n}" for op, n in self.op_types[k].items())
            lines.append(f"  wrote {p}  ({p.stat().st_size:,} bytes; {ops})")
        for label, v in self.verification.items():
            verdict = "ok" if v["passed"] else "FAILED"
            lines.append(
                f"  {label:36s} max |logit diff| {v['max_abs_logit_error']:.3g}"
                f" ({v['criterion']} bound {v['bound']:.2g}, error/bound {v['margin']:.2g})"
                f"  argmax agree {v['argmax_agreement']:.4%}  [{verdict}]"
            )
        if self.verification:
            first = next(iter(self.verification.values()))
            lines.append(f"  checked {first['coverage']} per pair, in ONNX Runtime")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _figures(report) -> dict:
    d = report.to_dict()
    return {k: d[k] for k in VERIFY_KEYS}


# the networks an export compares, named as in the four-network table of the main job
TORCH_NET = {"bn": "torch BN", "folded": "torch folded"}
ONNX_NET = {"bn": "ONNX BN", "folded": "ONNX folded"}


@dataclass
class OnnxBuild:
    """The ONNX graphs of a checkpoint, built in memory with an ONNX Runtime session on
    each (``nets``, named as :data:`ONNX_NET`): not yet verified, nothing written."""

    protos: dict[str, onnx.ModelProto]  # "bn" / "folded"
    meta: dict[str, dict[str, str]]
    nets: dict[str, OnnxPredictor]
    probe: np.ndarray  # contexts for the read-back check
    outputs: dict[str, np.ndarray]  # each session's logits on ``probe``

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """(torch reference, ONNX candidate): each graph against its own torch network,
        and the folded graph against the BN network too."""
        pairs = [(TORCH_NET[kind], ONNX_NET[kind]) for kind in self.protos]
        if len(self.protos) == 2:
            pairs.append((TORCH_NET["bn"], ONNX_NET["folded"]))
        return pairs


def build_onnx(
    models: dict[str, MLP], ckpt: Checkpoint, source: Path, source_sha256: str
) -> OnnxBuild:
    """The graph of each of ``models`` ("bn" and/or "folded", made from ``ckpt`` read from
    ``source``), checked by ``onnx.checker`` and loaded in ONNX Runtime."""
    build = OnnxBuild({}, {}, {}, _probe_contexts(ckpt.vocab.size, ckpt.config.block_size), {})
    for kind, model in models.items():
        proto = build_graph(model, name=f"bnfold_{kind}")
        build.meta[kind] = metadata(
            ckpt.vocab,
            model.config.to_dict(),
            folded=kind == "folded",
            source=source,
            source_sha256=source_sha256,
            data_sha256=ckpt.meta.get("data_sha256"),
        )
        set_metadata(proto, build.meta[kind])
        check_model(proto, f"{kind}.onnx")
        net = OnnxPredictor(f"{kind}.onnx (ORT)", model_bytes=proto.SerializeToString())
        build.protos[kind], build.nets[ONNX_NET[kind]] = proto, net
        build.outputs[kind] = net.logits(build.probe)
    return build


def judge_onnx(
    comparison: DomainComparison, build: OnnxBuild, labels: dict[str, str], float64_source
) -> tuple[dict[str, dict], dict[str, dict]]:
    """The verdict of each of ``build.pairs`` from a walk that compared them (``labels``:
    network name -> how reports name it): ``(figures by "<onnx> vs <torch>", figures
    by file)``. Raises when any graph does not match torch: nothing may be written."""
    verification: dict[str, dict] = {}
    per_file: dict[str, dict] = {}
    for a, b in build.pairs:
        rep = report_from_pair(
            comparison.pairs[(a, b)],
            comparison.plan,
            reference=labels[a],
            candidate=labels[b],
            float64_source=float64_source,
            seconds=comparison.seconds,
        )
        kind = next(k for k, name in ONNX_NET.items() if name == b)
        key = "torch_same" if a == TORCH_NET[kind] else "torch_bn"
        per_file.setdefault(kind, {})[key] = _figures(rep)
        verification[f"{rep.candidate} vs {rep.reference}"] = _figures(rep)
    failed = [k for k, v in verification.items() if not v["passed"]]
    if failed:
        raise BnfoldError(
            "ONNX export does not match torch (nothing written): "
            + "; ".join(f"{k}: {verification[k]['reason']}" for k in failed)
        )
    return verification, per_file


def write_onnx(
    build: OnnxBuild, per_file: dict[str, dict], out: Path
) -> tuple[dict[str, Path], dict[str, str], dict[str, dict[str, int]]]:
    """Write each verified graph to ``out/<kind>.onnx`` with its verification figures in the
    metadata, and read it back: it must reproduce the verified outputs bit for bit.
    Returns (paths, sha256s, op counts) by kind."""
    paths: dict[str, Path] = {}
    shas: dict[str, str] = {}
    ops: dict[str, dict[str, int]] = {}
    for kind, proto in build.protos.items():
        set_metadata(proto, {**build.meta[kind], "verification": json.dumps(per_file[kind])})
        check_model(proto, f"{kind}.onnx")
        data = proto.SerializeToString()
        path = out / f"{kind}.onnx"
        atomic_write(path, lambda tmp, data=data: Path(tmp).write_bytes(data))
        # read the written file back: it must load and reproduce the verified outputs exactly
        back = OnnxPredictor(path)
        if not np.array_equal(back.logits(build.probe), build.outputs[kind]):
            raise BnfoldError(f"{path}: the written file does not reproduce the verified outputs")
        paths[kind], shas[kind], ops[kind] = path, back.sha256, op_types(proto)
    return paths, shas, ops


def _probe_contexts(vocab_size: int, block_size: int, n: int = 4096) -> np.ndarray:
    """A fixed set of contexts for the read-back check (the first ``n`` of the domain plus
    seeded random ones)."""
    first = all_contexts(vocab_size, block_size, 0, n // 2)
    rng = np.random.default_rng(0)
    return np.concatenate([first, rng.integers(0, vocab_size, size=(n // 2, block_size))])
