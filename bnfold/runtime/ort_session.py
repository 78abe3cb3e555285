"""ONNX Runtime sessions on the CPU, configured in one place.

Two kinds: bnfold's own (``optimize=True``: every graph optimisation, so ``Gemm -> Tanh``
becomes one ``FusedGemm``) and the reproducible kind the float64 twins and the ONNX folder's
checks need (``optimize=False``: no graph rewrite, since a fused kernel may compute in
float32 internally). ``plain`` is what a user gets by default, the baseline ``bnfold bench``
measures against.
"""

from __future__ import annotations

from bnfold.errors import BnfoldError


def session_options(threads: int = 1, *, optimize: bool = True):
    """ORT options for small, latency-bound graphs: ``threads`` intra-op threads, one
    inter-op thread, sequential execution, errors only in the log; all graph optimisations
    when ``optimize``, none otherwise."""
    import onnxruntime as ort

    if not isinstance(threads, int) or threads < 1:
        raise BnfoldError(f"threads must be a positive integer, got {threads!r}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
    # fatal only: every error ORT raises reaches the user as one BnfoldError line, so its
    # own log lines (errors included) would only say it twice, in colour; the default
    # logger is the one that writes while a model loads, before any session exists
    so.log_severity_level = 4
    ort.set_default_logger_severity(4)
    return so


def cpu_session(
    model_bytes: bytes,
    threads: int = 1,
    *,
    optimize: bool = True,
    plain=False,
    weights: dict | None = None,
):
    """An ``InferenceSession`` on ``model_bytes`` with :func:`session_options`, or with
    ``plain`` ORT's defaults but for ``threads`` intra-op threads (the way one would
    write it by hand). ``weights``: arrays for the initializers ``model_bytes`` leaves
    out (:func:`bnfold.io.onnx_files.weights_apart`), which ONNX Runtime takes as they are
    instead of parsing them."""
    import onnxruntime as ort

    if plain:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
    else:
        options = session_options(threads, optimize=optimize)
    if weights:
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in weights.values()]
        options.add_external_initializers(list(weights), values)
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
