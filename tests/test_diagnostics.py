"""Training diagnostics: statistics with known answers, the report files, `bnfold report`."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from bnfold.errors import BnfoldError
from bnfold.mlp.data import distinct_contexts
from bnfold.mlp.model import MLP, ModelConfig
from bnfold.report.diagnostics import (
    REPORT_FILES,
    Diagnostics,
    activation_stats,
    histogram,
    load_report,
    module_labels,
    panel_limit,
    parameter_labels,
    robust_limit,
    saturation_census,
    update_ratio,
    verdict,
    verdict_items,
    verdict_lines,
    weight_grad_stats,
    write_report,
)
from bnfold.report.plots import fold_comparison_figure, fold_comparison_stats, input_domain
from bnfold.report.verdict import dead_layers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRAINING_FIGURES = [
    "loss.png",
    "saturation.png",
    "activations.png",
    "saturation_image.png",
    "gradients.png",
    "weight_gradients.png",
    "update_ratio.png",
]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails unless the file starts like a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def small_model(seed: int = 0, **kw) -> MLP:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=7, block_size=2, n_embd=4, n_hidden=16, n_layers=3)
    return MLP(ModelConfig(**{**cfg, **kw}))


def run_steps(model: MLP, diag, steps: int = 4, batch: int = 64, opt=None, seed: int = 0):
    """The training loop's observer protocol, on random data, in train mode."""
    gen = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        x = torch.randint(
            0, model.config.vocab_size, (batch, model.config.block_size), generator=gen
        )
        y = torch.randint(0, model.config.vocab_size, (batch,), generator=gen)
        diag.before_step(step, model)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        diag.after_backward(step, model, loss)
        opt.step()
        diag.after_update(step, model, 1e-2)


# ---------------------------------------------------------------- known answers --


def test_activation_stats_known_values():
    # +-1 and +-0.98 are saturated, +-0.97 is not (the threshold is strict): 4 of 8
    s = activation_stats(torch.tensor([1.0, -1.0, 0.98, -0.98, 0.97, -0.97, 0.0, 0.0]))
    assert s["saturation"] == 0.5
    assert s["mean"] == pytest.approx(0.0, abs=1e-7)  # symmetric about 0
    # the sample std: [-0.5, 0.5] has variance (0.25 + 0.25) / (2 - 1) = 0.5
    assert activation_stats(torch.tensor([-0.5, 0.5]))["std"] == pytest.approx(math.sqrt(0.5))
    constant = activation_stats(torch.full((6,), 0.3))
    assert constant["std"] == pytest.approx(0.0, abs=1e-7) and constant["saturation"] == 0.0


def test_weighted_activation_stats_count_each_row_as_often_as_its_weight():
    t = torch.tensor([[0.99, 0.1], [-0.5, 0.98], [0.2, -0.3]])
    w = torch.tensor([3, 1, 2])
    s = activation_stats(t, row_weight=w)
    # by hand, 12 values: 0.99 three times and 0.98 once are saturated -> 4/12; their sum
    # 3 * (0.99 + 0.1) + (-0.5 + 0.98) + 2 * (0.2 - 0.3) = 3.55
    assert s["saturation"] == pytest.approx(4 / 12)
    assert s["mean"] == pytest.approx(3.55 / 12)
    # weighting is repetition: the rows repeated give the same mean and saturation
    repeated = activation_stats(t.repeat_interleave(w, dim=0))
    assert s["mean"] == pytest.approx(repeated["mean"])
    assert s["saturation"] == pytest.approx(repeated["saturation"])
    # only the weights' proportions count
    assert activation_stats(t, row_weight=w * 5) == pytest.approx(s)
    # the population std: rows [1] x3 and [-1] x1 have mean 0.5, variance
    # (3 * 0.5**2 + 1.5**2) / 4 = 0.75
    two = activation_stats(torch.tensor([[1.0], [-1.0]]), row_weight=torch.tensor([3, 1]))
    assert two["std"] == pytest.approx(math.sqrt(0.75))


def test_batch_saturation_on_distinct_rows_counts_every_example():
    """The `fast` preset trains on each batch's distinct contexts: the recorded batch
    saturation must be the whole batch's, as a plain train-mode forward sees it."""
    from bnfold.mlp.train import distinct_rows_loss

    model = small_model(8)
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 3, (512, 2), generator=gen)  # few contexts, many repeats
    y = torch.randint(0, 7, (512,), generator=gen)
    kept = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: kept.append(o.detach()))
        for m in model.net
        if isinstance(m, nn.Tanh)
    ]
    with torch.no_grad():  # train mode: the output depends on the batch, not on running stats
        model.train()(x)
    for h in hooks:
        h.remove()
    diag = Diagnostics(interval=1)
    model.train()
    diag.on_batch(0, x)
    diag.before_step(0, model)
    loss = distinct_rows_loss(model, x, y)
    loss.backward()
    diag.after_backward(0, model, loss)
    diag.after_update(0, model, 0.0)
    for layer, t in zip(diag.layers, kept, strict=True):
        assert len(diag._acts[0]) < len(x)  # the loop did run on distinct rows
        assert layer["saturation"][0] == pytest.approx(float((t.abs() > 0.97).float().mean()))
        assert layer["mean"][0] == pytest.approx(float(t.mean()), abs=1e-6)


def test_update_ratio_known_value_and_frozen():
    after = torch.tensor([1.0, -1.0, 2.0, -2.0])
    r = update_ratio(after * (1 - 1e-3), after)  # every value moved by 1e-3 of itself
    assert not r["frozen"]
    assert r["log10"] == pytest.approx(-3.0, abs=1e-4)
    shifted = update_ratio(after - 0.5, after)  # a uniform shift: no spread, no ratio
    assert shifted == {"frozen": False, "log10": None}
    still = update_ratio(after.clone(), after)
    assert still == {"frozen": True, "log10": None}


def test_forced_saturation_recorded_per_layer():
    model = small_model()
    with torch.no_grad():  # layer 2's BN outputs a constant +-5: every unit saturated
        bn = model.net[4]
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([5.0, -5.0]).repeat(8))
    diag = Diagnostics(interval=2)
    run_steps(model, diag, steps=4)
    assert diag.steps == [0, 2]
    sat = [layer["saturation"] for layer in diag.layers]
    assert sat[1][0] == 1.0  # step 0 is recorded before any update
    assert sat[0][0] < 0.5 and sat[2][0] < 0.5
    # tanh'(5) is tiny, so the saturated layer passes almost no gradient to layer 1
    assert diag.layers[0]["grad_std"][0] < 1e-2 * diag.layers[2]["grad_std"][0]


def test_recorded_gradients_match_retain_grad():
    model = small_model(1)
    diag = Diagnostics(interval=1)
    kept = []

    def keep(module, inputs, out):
        out.retain_grad()
        kept.append(out)

    handles = [m.register_forward_hook(keep) for m in model.net if isinstance(m, nn.Tanh)]
    run_steps(model, diag, steps=1)
    for h in handles:
        h.remove()
    for layer, out in zip(diag.layers, kept, strict=True):
        assert layer["grad_mean"][0] == pytest.approx(float(out.grad.mean()), rel=1e-5)
        assert layer["grad_std"][0] == pytest.approx(float(out.grad.std()), rel=1e-5)
        assert layer["std"][0] == pytest.approx(float(out.detach().std()), rel=1e-5)


def test_weight_grad_stats_known_values():
    p = nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0]))
    p.grad = p.detach() * 0.01  # the gradient is 1/100 of the weight, value by value
    s = weight_grad_stats(p)
    assert s["grad_data_ratio"] == pytest.approx(0.01)
    assert s["grad_mean"] == pytest.approx(0.0, abs=1e-9)
    assert s["grad_std"] == pytest.approx(0.01 * math.sqrt(4 / 3))  # sample std of +-0.01
    assert not s["frozen"]
    assert weight_grad_stats(nn.Parameter(torch.ones(3)))["frozen"]  # no gradient yet


def first_update_log10(optimizer, loss_scale: float) -> float:
    """The recorded update:data ratio of net.0.weight after one step whose loss is
    multiplied by ``loss_scale`` (the same model, data and seed every call)."""
    model = small_model(2)
    diag = Diagnostics(interval=1)
    opt = optimizer(model.parameters(), lr=1e-2)
    x = torch.randint(0, 7, (64, 2), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 7, (64,), generator=torch.Generator().manual_seed(1))
    model.train()
    diag.before_step(0, model)
    loss = F.cross_entropy(model(x), y) * loss_scale
    loss.backward()
    diag.after_backward(0, model, loss)
    opt.step()
    diag.after_update(0, model, 1e-2)
    return diag.updates["net.0.weight"]["log10"][0]


def test_update_ratio_is_the_actual_change_not_lr_times_grad():
    """A gradient 1000x larger moves SGD's weights 1000x further (3 decades), but not
    AdamW's: its first step is lr * grad / |grad|. The recorded ratio follows the weights."""
    sgd = [first_update_log10(torch.optim.SGD, scale) for scale in (1.0, 1000.0)]
    assert sgd[1] - sgd[0] == pytest.approx(3.0, abs=1e-3)
    adamw = [first_update_log10(torch.optim.AdamW, scale) for scale in (1.0, 1000.0)]
    assert adamw[1] == pytest.approx(adamw[0], abs=1e-3)


def test_frozen_parameter_is_reported_not_nan():
    model = small_model(3)
    model.tok_emb.weight.requires_grad_(False)
    diag = Diagnostics(interval=1)
    run_steps(model, diag, steps=3)
    u = diag.updates["tok_emb.weight"]
    assert u["frozen"] == [True, True, True] and u["log10"] == [None, None, None]
    assert diag.weights["tok_emb.weight"]["frozen"] == [True, True, True]
    assert diag.weights["tok_emb.weight"]["grad_data_ratio"] == [None, None, None]
    assert all(v is not None for v in diag.updates["net.0.weight"]["log10"])
    diag.finalize(model, torch.randint(0, 7, (50, 2)))
    report = diag.to_dict()
    json.dumps(report, allow_nan=False)  # no inf/NaN anywhere
    v = verdict(report)
    assert v["frozen"] == ["tok_emb.weight"]
    assert all(f["param"] != "tok_emb.weight" for f in v["update_ratio_far"])


def test_census_finds_units_saturated_on_every_example():
    model = small_model(4)
    with torch.no_grad():
        bn = model.net[1]  # layer 1: units 0, 1 and 5 pinned at tanh(+-6)
        bn.weight[[0, 1, 5]] = 0.0
        bn.bias[[0, 1, 5]] = torch.tensor([6.0, -6.0, 6.0])
        bn.weight[2] = 0.0  # unit 2 sits at tanh(0): constant, but not saturated
        bn.bias[2] = 0.0
    model.eval()
    x = torch.randint(0, 7, (500, 2), generator=torch.Generator().manual_seed(1))
    census = saturation_census(model, x)
    assert census["examples"] == 500
    assert census["layers"][0]["dead"] == [0, 1, 5]
    # the saturated share counts every example, duplicates included
    with torch.no_grad():
        t = torch.tanh(model.net[1](model.net[0](model.tok_emb(x).flatten(1))))
    assert census["layers"][0]["saturation"] == pytest.approx(
        float((t.abs() > 0.97).float().mean())
    )
    assert model.training is False


def test_census_with_dataset_statistics_is_a_train_mode_pass_over_the_whole_set():
    model = small_model(7)
    x = torch.randint(0, 7, (3000, 2), generator=torch.Generator().manual_seed(2))
    census = saturation_census(model, x, statistics="dataset")
    assert census["statistics"] == "dataset" and census["examples"] == 3000
    # the census left the running statistics as they were (fresh: zeros and ones)
    for m in model.net:
        if isinstance(m, nn.BatchNorm1d):
            assert torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))
    # torch's own BatchNorm in train mode, all 3000 rows as one batch, duplicates included
    kept = []
    handles = [
        m.register_forward_hook(lambda mod, i, o: kept.append(o.detach()))
        for m in model.net
        if isinstance(m, nn.Tanh)
    ]
    with torch.no_grad():
        model.train()(x)
    for h in handles:
        h.remove()
    for layer, t in zip(census["layers"], kept, strict=True):
        assert layer["saturation"] == pytest.approx(
            float((t.abs() > 0.97).float().mean()), abs=1e-6
        )
        assert layer["mean"] == pytest.approx(float(t.mean()), abs=1e-5)
        assert layer["std"] == pytest.approx(float(t.std(unbiased=False)), rel=1e-4)
    with pytest.raises(BnfoldError, match="unknown census statistics"):
        saturation_census(model, x, statistics="batch")


def test_census_image_is_white_where_saturated_and_dead_columns_are_all_white():
    model = small_model(4)
    with torch.no_grad():
        bn = model.net[1]  # layer 1: units 0, 1 and 5 pinned at tanh(+-6), unit 2 at 0
        bn.weight[[0, 1, 2, 5]] = 0.0
        bn.bias[[0, 1, 2, 5]] = torch.tensor([6.0, -6.0, 0.0, 6.0])
    x = torch.randint(0, 7, (500, 2), generator=torch.Generator().manual_seed(1))
    census = saturation_census(model.eval(), x, image_examples=40)
    image = census["layers"][0]["image"]
    assert census["image_examples"] == 40 and len(image) == 40
    assert all(len(row) == 16 and set(row) <= {"0", "1"} for row in image)
    columns = ["".join(row[u] for row in image) for u in range(16)]
    assert columns[0] == columns[1] == columns[5] == "1" * 40
    assert columns[2] == "0" * 40
    # the same examples in both censuses: the sample does not depend on the statistics
    again = saturation_census(model, x, statistics="dataset", image_examples=40)
    assert [c == "1" * 40 for c in columns] == [
        "".join(row[u] for row in again["layers"][0]["image"]) == "1" * 40 for u in range(16)
    ]


def test_robust_axis_fits_the_bulk_not_the_outliers():
    """The default run's tanh gradients: spread ~3e-5, a few values at ~1.5e-3."""
    g = torch.randn(20_000, generator=torch.Generator().manual_seed(3)) * 3e-5
    g[:20] = 1.5e-3
    lim = robust_limit([g])
    assert 5e-5 < lim < 2e-4
    hist = histogram(g, lo=-lim, hi=lim)
    assert 0 < hist["outside"] <= 0.006
    assert hist["edges"][0] == pytest.approx(-lim) and hist["edges"][-1] == pytest.approx(lim)
    # several curves on one axis: each keeps all but 1% of its values on it, and the
    # outliers of the narrow one do not stretch it beyond the wide one's bulk
    wide = torch.randn(3000, generator=torch.Generator().manual_seed(4)) * 3e-3
    both = panel_limit([g, wide])
    assert 3e-3 < both < 1e-2
    for t in (g, wide):
        assert histogram(t, lo=-both, hi=both)["outside"] <= 0.01


def test_layer_names_follow_the_blocks():
    model = small_model()
    labels = parameter_labels(model)
    assert labels["tok_emb.weight"] == "embedding"
    assert labels["net.0.weight"] == "layer 1 Linear"
    assert labels["net.4.weight"] == "layer 2 BN gain" and labels["net.4.bias"] == "layer 2 BN bias"
    assert labels["net.9.weight"] == "output Linear" and labels["net.10.weight"] == "output BN gain"
    assert module_labels(model)["net.7"] == "layer 3"


def test_distinct_contexts_matches_unique():
    x = torch.randint(0, 27, (3000, 3), generator=torch.Generator().manual_seed(0))
    rows, inverse = distinct_contexts(x)
    r2, c2 = torch.unique(x, dim=0, return_counts=True)
    assert torch.equal(rows, r2) and torch.equal(torch.bincount(inverse), c2)
    assert torch.equal(rows[inverse], x)
    wide = torch.randint(0, 2**20, (50, 4), generator=torch.Generator().manual_seed(1))
    rows, inverse = distinct_contexts(wide)  # keys would overflow: the 2-D fallback
    assert torch.equal(rows[inverse], wide)


# ------------------------------------------------------------- BN vs folded figure --


def hand_fold(bn_model: MLP) -> MLP:
    """Fold by the textbook formula, independent of bnfold.fold.modules."""
    folded = MLP(replace(bn_model.config, batchnorm=False)).eval()
    src = list(bn_model.net)
    pairs = [(m, src[i + 1]) for i, m in enumerate(src) if isinstance(m, nn.Linear)]
    dst = [m for m in folded.net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        folded.tok_emb.weight.copy_(bn_model.tok_emb.weight)
        for (lin, bn), out in zip(pairs, dst, strict=True):
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            out.weight.copy_(lin.weight * s[:, None])
            out.bias.copy_(bn.bias - bn.running_mean * s)
    return folded


def bn_model_with_stats(seed: int = 5) -> MLP:
    model = small_model(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.net:
            if isinstance(m, nn.BatchNorm1d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.3)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
    return model.eval()


def test_fold_comparison_on_hand_folded_model(tmp_path):
    bn = bn_model_with_stats()
    folded = hand_fold(bn)
    stats, fig = fold_comparison_figure(bn, folded, tmp_path)
    assert stats["contexts"] == 7**2 and "49 contexts (exhaustive)" in stats["domain"]
    assert stats["max_abs_logit_diff"] < 1e-4
    assert len(stats["max_abs_preactivation_diff"]) == 3
    assert max(stats["max_abs_preactivation_diff"]) < 1e-4
    assert stats["argmax_agreement"] == 1.0
    assert stats["verdict"]["passed"] and stats["verdict"]["criterion"] == "float64"
    w, h = png_size(tmp_path / fig["file"])
    assert w >= 800 and h >= 300


def test_fold_comparison_detects_a_wrong_fold():
    bn = bn_model_with_stats()
    wrong = hand_fold(bn)
    with torch.no_grad():
        [m for m in wrong.net if isinstance(m, nn.Linear)][1].bias.add_(0.5)
    stats, _, _ = fold_comparison_stats(bn, wrong)
    assert stats["max_abs_preactivation_diff"][0] < 1e-4
    assert stats["max_abs_preactivation_diff"][1] == pytest.approx(0.5, abs=1e-4)
    assert stats["max_abs_logit_diff"] > 1e-3
    assert not stats["verdict"]["passed"]
    with pytest.raises(BnfoldError):
        fold_comparison_stats(bn, small_model(n_layers=2, batchnorm=False))


def test_fold_comparison_takes_measured_figures_as_they_are(tmp_path, monkeypatch):
    """Given what a walk measured, the figure draws its distributions but judges nothing:
    no float64 copy of either network is made."""
    from bnfold.runtime import twins

    def no_twin(*args, **kwargs):
        raise AssertionError("the figure evaluated a network in float64 again")

    monkeypatch.setattr(twins.TorchTwin, "__init__", no_twin)
    bn = bn_model_with_stats()
    measured = {
        "contexts": 49,
        "domain": "as walked",
        "max_abs_logit_diff": 0.25,
        "argmax_agreement": 0.5,
        "verdict": {"passed": False, "margin": 2.0, "reason": "as judged by the walk"},
    }
    stats, fig = fold_comparison_figure(bn, hand_fold(bn), tmp_path, measured=measured)
    assert {k: stats[k] for k in measured} == measured
    assert len(stats["max_abs_preactivation_diff"]) == 3
    assert "as judged by the walk" in fig["caption"]
    png_size(tmp_path / fig["file"])


def test_input_domain_enumerates_every_context_once():
    x, desc = input_domain(5, 3)
    assert x.shape == (125, 3) and len(distinct_contexts(x)[0]) == 125
    big, desc = input_domain(27, 5)
    assert len(big) < 27**5 and "random" in desc


# --------------------------------------------------------- report files and CLI --


@pytest.fixture(scope="module")
def cli_report(tmp_path_factory, names_path) -> Path:
    """`bnfold train --report DIR --calibrate` on a short run (the files every later test
    reads; the summary is saved beside the report as summary.json)."""
    from bnfold.cli import main

    out = tmp_path_factory.mktemp("trained_report")
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(names_path), "--out", str(out), "--steps", "120",
         "--batch-size", "256", "--report", str(out / "report"), "--calibrate", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["report"] == str(out / "report" / "index.html")
    (out / "summary.json").write_text(result.output)
    return out / "report"


def test_report_files_are_pngs_of_sensible_size(cli_report):
    for name in TRAINING_FIGURES:
        w, h = png_size(cli_report / name)
        assert 500 <= w <= 3000 and 250 <= h <= 2000, (name, w, h)
        assert (cli_report / name).stat().st_size > 10_000
    index = (cli_report / "index.html").read_text()
    report = load_report(cli_report)
    for fig in report["figures"]:
        assert f'src="{fig["file"]}"' in index
        png_size(cli_report / fig["file"])
    assert [f["file"] for f in report["figures"]][: len(TRAINING_FIGURES)] == TRAINING_FIGURES
    # train-fold checks these names before training: every file a report gets is among them
    assert {p.name for p in cli_report.iterdir()} <= set(REPORT_FILES)


def test_report_json_contents(cli_report):
    report = json.loads((cli_report / "diagnostics.json").read_text())
    assert len(report["train_loss"]) == 120
    assert report["interval"] == 1 and report["steps"] == list(range(120))
    dev = [e for e in report["evals"] if e["split"] == "dev"]
    assert [e["step"] for e in dev] == [12 * k for k in range(1, 11)] + [120]
    assert [layer["name"] for layer in report["layers"]] == [
        f"layer {i} (Tanh)" for i in range(1, 6)
    ]
    assert set(report["weights"]) == {"tok_emb.weight", *(f"net.{3 * i}.weight" for i in range(6))}
    for u in report["updates"].values():
        assert len(u["log10"]) == 120 and not any(u["frozen"])
    census = report["census"]
    assert census["examples"] == 182625 and census["distinct"] < census["examples"]
    fold = report["fold_comparison"]  # `bnfold train --report` folds the model it trained
    assert fold["contexts"] == 27**3 and fold["verdict"]["passed"]
    assert fold["max_abs_logit_diff"] < 1e-3
    # the initialisation view: a census of the untrained network, the first recorded step
    init = report["census_init"]
    assert init["statistics"] == "dataset" and census["statistics"] == "running"
    assert init["examples"] == 182625 and len(init["layers"]) == 5
    assert report["snapshots"]["init"]["step"] == 0 and report["snapshots"]["end"]["step"] == 119
    for phase in ("init", "end"):
        snap = report["snapshots"][phase]
        assert all(layer["grad_hist"]["density"] for layer in snap["layers"])
        assert set(snap["weights"]) == set(report["weights"])
    # one name per block, everywhere
    labels = report["labels"]["parameters"]
    assert labels["net.3.weight"] == "layer 2 Linear" and labels["net.15.weight"] == "output Linear"


def test_bnfold_report_command(cli_report):
    from bnfold.cli import main

    result = CliRunner().invoke(main, ["report", str(cli_report)])
    assert result.exit_code == 0, result.output
    # the text is the verdict's findings, one line each, under the report's folder
    saved = load_report(cli_report)
    assert result.output.splitlines()[1:] == [f"  {x}" for x in verdict_lines(saved)]
    topics = [item["topic"] for item in verdict_items(saved)]
    assert {"run", "saturation", "update_ratio", "dead", "calibration", "fold"} <= set(topics)
    as_json = CliRunner().invoke(main, ["report", str(cli_report), "--json"])
    v = json.loads(as_json.output)
    assert v["steps"] == 120 and len(v["dead_units"]) == 5
    assert v["examples"] == 182625 and v["worst_saturation"]["on"] == "train set"
    assert 1 <= v["worst_saturation"]["layer"] <= 5


def test_bnfold_report_names_saturated_and_dead_layers(tmp_path):
    from bnfold.cli import main

    model = small_model(6)
    with torch.no_grad():
        model.net[7].weight[:4] = 0.0  # layer 3: four units pinned at tanh(7)
        model.net[7].bias[:4] = 7.0
    diag = Diagnostics(interval=1)
    run_steps(model, diag, steps=3, opt=torch.optim.SGD(model.parameters(), lr=1e-4))
    diag.finalize(model, torch.randint(0, 7, (300, 2)))
    write_report(diag.to_dict(), tmp_path)
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    v = json.loads(result.output)
    assert [(d["layer"], d["dead"], d["units"]) for d in v["dead_units"]] == [
        (1, 0, 16),
        (2, 0, 16),
        (3, 4, 16),
    ]
    # lr 1e-4, SGD: update:data ~1e-5, far below the lecture's 1e-3 for every weight
    assert v["update_ratio_far"]
    assert {f["direction"] for f in v["update_ratio_far"]} == {"too slow"}


def test_bnfold_report_on_missing_or_bad_dir(tmp_path):
    from bnfold.cli import main

    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no such report" in result.output
    (tmp_path / "diagnostics.json").write_text("{not json")
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a readable diagnostics report" in result.output


def _report(saturation: float, grad_std: list[float], dead: int = 0) -> dict:
    """A saved report with 5 Tanh layers of 100 units: census saturation, dead units in
    layer 3, and the per-layer gradient std series the verdict judges the flow by."""
    layers = [{"saturation": [saturation], "grad_std": [g, g]} for g in grad_std]
    census = {
        "examples": 1000,
        "layers": [
            {"units": 100, "dead": list(range(dead)) if i == 2 else [], "saturation": saturation}
            for i in range(5)
        ],
    }
    return {"layers": layers, "steps": [0], "census": census, "saturation_threshold": 0.97}


@pytest.mark.parametrize(
    "saturation, grad_std, dead, state",
    [
        (0.03, [1.0] * 5, 0, "ok"),
        (0.48, [2.4, 2.1, 2.0, 2.0, 2.3], 0, "harmless"),  # the default run's figures
        (0.48, [0.01, 0.1, 0.5, 1.0, 1.0], 0, "vanishing"),
        (0.48, [1.0] * 5, 20, "dead units"),
    ],
)
def test_saturation_verdict_judges_by_gradient_flow_and_dead_units(
    saturation, grad_std, dead, state
):
    report = _report(saturation, grad_std, dead)
    v = verdict(report)
    assert v["saturation_state"] == state
    assert v["worst_saturation"] == {"layer": 1, "saturation": saturation, "on": "train set"}
    assert dead_layers(v) == ([3] if state == "dead units" else [])
    item = next(i for i in verdict_items(report) if i["topic"] == "saturation")
    assert "\n" not in item["sentence"] and item["details"]


def default_architecture_report(**train_overrides) -> dict:
    """A saved report of the default architecture on names.txt, the `fast` preset with
    ``train_overrides``: flagged "too fast" everywhere, saturated ~48%, gradient flowing."""
    from bnfold.mlp.train import TrainConfig, train_config_dict

    report = _report(0.48, [1.0] * 5)
    report["updates"] = {
        n: {"shape": list(p.shape), "log10": [-1.8] * 3}
        for n, p in MLP(ModelConfig()).named_parameters()
    }
    config = train_config_dict(TrainConfig.from_preset("fast", **train_overrides))
    report["meta"] = {"data_file": "names.txt", "train_config": config}
    return report


def cited(report: dict) -> set[str]:
    """The benchmark result files the verdict's details cite."""
    text = " ".join(d for item in verdict_items(report) for d in item["details"])
    return {f for f in ("saturation_sweep.txt", "update_ratio_sweep.txt") if f in text}


def test_sweep_evidence_is_cited_only_for_the_configuration_it_was_measured_on():
    measured = default_architecture_report(seed=1337, threads=2)
    assert verdict(measured)["measured_configuration"]
    assert cited(measured) == {"saturation_sweep.txt", "update_ratio_sweep.txt"}
    one_step = default_architecture_report(steps=1)
    other_data = default_architecture_report()
    other_data["meta"]["data_file"] = "words.txt"
    narrower = default_architecture_report()
    narrower["updates"]["net.3.weight"]["shape"] = [64, 100]
    for report in (one_step, other_data, narrower):
        v = verdict(report)
        assert not v["measured_configuration"] and cited(report) == set()
        # the judgement itself does not depend on the evidence
        assert v["saturation_state"] == "harmless" and v["update_ratio_explained"]


@pytest.mark.parametrize(
    "optimizer, log10, grad_std, explained",
    [
        ("adamw", -1.8, [1.0] * 5, True),  # the default run: short AdamW, gradient flows
        ("sgd", -1.8, [1.0] * 5, False),  # the lecture's own regime: the flag stands alone
        ("adamw", -4.5, [1.0] * 5, False),  # too slow is never explained away
        ("adamw", -1.8, [0.01, 0.1, 0.5, 1.0, 1.0], False),  # a vanishing gradient
    ],
)
def test_update_ratio_flag_is_explained_only_for_short_adamw_runs_that_flow(
    optimizer, log10, grad_std, explained
):
    report = _report(0.03, grad_std)
    report["updates"] = {"net.3.weight": {"shape": [100, 100], "log10": [log10] * 3}}
    report["meta"] = {"train_config": {"optimizer": optimizer}}
    v = verdict(report)
    far = v["update_ratio_far"]
    assert [f["param"] for f in far] == ["net.3.weight"]
    assert far[0]["direction"] == ("too slow" if log10 < -3 else "too fast")
    assert any(item["topic"] == "update_ratio" for item in verdict_items(report))
    assert v["update_ratio_explained"] is explained


def test_calibrate_reports_what_the_calibration_pass_changed(cli_report):
    summary = json.loads((cli_report.parent / "summary.json").read_text())
    cal = summary["calibration"]
    # the dev loss after calibration is the one the run reports; six BatchNorms measured
    assert cal["dev_loss_after"] == pytest.approx(summary["dev_loss"], abs=1e-6)
    assert cal["dev_loss_before"] != cal["dev_loss_after"]
    assert [lay["module"] for lay in cal["layers"]] == [f"net.{3 * i + 1}" for i in range(6)]
    assert all(lay["max_mean_shift_sd"] > 0 for lay in cal["layers"])
    report = load_report(cli_report)
    assert report["meta"]["calibration"] == cal
    item = next(i for i in verdict_items(report) if i["topic"] == "calibration")
    assert len(item["details"]) == 7  # one per BatchNorm, then what the pass does


def test_calibration_pass_measures_against_the_uncalibrated_run(tmp_path, names_path):
    """``dev_loss_before`` is the dev loss of the same run without ``--calibrate``."""
    from bnfold.cli import main

    def run(*extra):
        out = tmp_path / ("cal" if extra else "plain")
        result = CliRunner().invoke(
            main,
            ["train", "--data", str(names_path), "--out", str(out), "--steps", "20",
             "--batch-size", "128", "--threads", "1", "--json", *extra],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    plain, calibrated = run(), run("--calibrate")
    assert "calibration" not in plain
    assert calibrated["calibration"]["dev_loss_before"] == pytest.approx(
        plain["dev_loss"], abs=1e-6
    )


def test_plot_functions_return_figures(cli_report):
    from matplotlib.figure import Figure

    from bnfold.report import plots

    report = load_report(cli_report)
    for draw in (
        plots.loss_figure,
        plots.saturation_figure,
        plots.activations_figure,
        plots.saturation_image_figure,
        plots.gradients_figure,
        plots.weight_gradients_figure,
        plots.update_ratio_figure,
    ):
        fig = draw(report)
        assert isinstance(fig, Figure) and fig.axes, draw.__name__


def test_index_page_folds_each_verdicts_details_away(cli_report):
    index = (cli_report / "index.html").read_text()
    items = verdict_items(load_report(cli_report))
    assert index.count("<details>") == sum(1 for i in items if i["details"])
    assert "saturation_sweep.txt" not in index  # a 120-step run was not measured by the sweep


def test_stage_table_fits_the_width_without_losing_words():
    from bnfold.pipeline.train_fold import format_stage_table

    details = "a long sentence of details " * 6
    rows = [
        {"stage": "train", "status": "ok", "details": details.strip(), "output": "m/bn.pt"},
        {"stage": "report", "status": "ok", "details": "short", "output": "m/r/index.html"},
    ]
    for width in (60, 80, 200):
        lines = format_stage_table(rows, width=width).splitlines()
        assert max(len(line) for line in lines) <= width
        assert " ".join(w for line in lines[2:] for w in line.split()).count("long") == 6
    assert len(format_stage_table(rows, width=200).splitlines()) == 4  # no wrapping needed
