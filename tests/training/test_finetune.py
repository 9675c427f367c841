from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from ann2snn import ConversionError, convert, quantize
from ann2snn.cli.main import main
from ann2snn.compiler.passes import trace
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.evaluation.evaluate import EvaluationReport, evaluate
from ann2snn.io.data import make_loader, mnist5k, open_dataset, stratified_subset
from ann2snn.io.model_loading import LoadedModel, Preprocessing, load_model, save_checkpoint
from ann2snn.training.batches import TensorBatches
from ann2snn.training.finetune import (
    TrainingConfig,
    _synaptic_consumers,
    accuracy,
    finetune,
    fit,
    quantization_aware,
    train,
)
from ann2snn.workflow import checkpoint_config, convert_loaded
from tests.networks import cnn


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


@pytest.fixture(scope="module")
def mnist() -> tuple[TensorBatches, TensorBatches]:
    """Real digits: 4,000 to train on (shuffled, seeded), 1,000 held out."""
    data = mnist5k()
    # The digits come sorted by class: split a seeded permutation.
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    images = (data.images[order] * 255).round().to(torch.uint8)
    labels = torch.tensor(data.targets)[order]
    normalisation = ([0.13], [0.31])
    return (TensorBatches(images[:4000], labels[:4000], 100, *normalisation, augment=False, shuffle=True, seed=1),
            TensorBatches(images[4000:], labels[4000:], 500, *normalisation, augment=False, shuffle=False))


@pytest.fixture(scope="module")
def trained_ann(mnist: tuple[TensorBatches, TensorBatches]) -> nn.Module:
    torch.manual_seed(0)
    train_batches, held_out = mnist
    result = train(small_cnn(), train_batches, TrainingConfig(epochs=2, lr=0.05), progress=False, log=lambda _: None)
    assert accuracy(result.model, held_out) > 90
    return result.model


def test_quantization_aware_graph_keeps_batchnorm_and_learns_every_threshold(mnist, trained_ann):
    train_batches, _ = mnist
    graph = quantization_aware(trained_ann, [next(iter(train_batches))], qbits=3)
    quantizers = [m for m in graph.modules() if isinstance(m, QCFSQuantizer)]
    assert len(quantizers) == 2
    assert all(isinstance(q.theta, nn.Parameter) and q.theta.item() > 0 for q in quantizers)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in graph.modules()) == 2

    graph.train()
    inputs, labels = next(iter(train_batches))
    nn.functional.cross_entropy(graph(inputs), labels).backward()
    assert all(q.theta.grad is not None and q.theta.grad.abs().item() > 0 for q in quantizers)
    assert graph.get_submodule("0").weight.grad.abs().sum() > 0


def test_straight_through_forward_equals_the_quantizer_it_trains():
    quantizer = QCFSQuantizer(levels=7)
    quantizer.set_threshold(torch.tensor(2.0), 4)
    quantizer.theta = nn.Parameter(quantizer.theta.detach().clone())
    x = torch.randn(4, 3, 8, 8) * 2
    expected = quantizer.eval()(x)
    trained = quantizer.train()(x)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    trained.sum().backward()
    assert quantizer.theta.grad is not None


def test_finetuning_recovers_what_one_bit_calibration_loses(mnist, trained_ann):
    train_batches, held_out = mnist
    calibrated = accuracy(quantize(trained_ann, [next(iter(train_batches))], qbits=1), held_out)
    result = finetune(trained_ann, train_batches, qbits=1, epochs=2, lr=0.01, progress=False, log=lambda _: None)
    fine_tuned_qann = quantize(result.model, None, 1, thresholds=result.thresholds)
    fine_tuned = accuracy(fine_tuned_qann, held_out)
    assert fine_tuned > calibrated + 1.0, (calibrated, fine_tuned)
    assert len(result.history) == 2 and result.quantization["qbits"] == 1

    # The SNN reproduces the fine-tuned QANN (signed neurons settle on it exactly).
    snn = convert(result.model, None, qbits=1, T=24, neuron="signed", thresholds=result.thresholds)
    inputs, _ = next(iter(held_out))
    torch.testing.assert_close(snn(inputs[:64]), fine_tuned_qann(inputs[:64]), rtol=1e-4, atol=1e-4)
    assert snn.config["threshold_rule"] == "fine-tuned"


def test_thresholds_that_do_not_fit_the_model_are_refused(mnist, trained_ann):
    result = finetune(trained_ann, mnist[0], qbits=2, epochs=1, lr=0.001, calibration_batches=1,
                      config=TrainingConfig(epochs=1, lr=0.001), progress=False, log=lambda _: None)
    names = sorted(result.thresholds)
    with pytest.raises(ConversionError, match=f"no threshold for {names[0]}"):
        quantize(result.model, None, 2, thresholds={names[1]: result.thresholds[names[1]]})
    with pytest.raises(ConversionError, match="no activation named relu_99"):
        quantize(result.model, None, 2, thresholds={**result.thresholds, "relu_99": torch.tensor(1.0)})
    with pytest.raises(ConversionError, match=f"threshold of '{names[0]}' must be finite and positive"):
        quantize(result.model, None, 2, thresholds={**result.thresholds, names[0]: torch.tensor(-1.0)})


class _InterruptAfter:
    """A loader that stops the run with KeyboardInterrupt after `batches` batches."""

    def __init__(self, loader: TensorBatches, batches: int):
        self.loader, self.remaining = loader, batches

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            if self.remaining == 0:
                raise KeyboardInterrupt
            self.remaining -= 1
            yield batch


def test_an_interrupted_run_resumes_to_the_same_weights(mnist, tmp_path):
    train_batches, _ = mnist
    config = TrainingConfig(epochs=2, lr=0.05)
    torch.manual_seed(3)
    initial = small_cnn()
    uninterrupted = copy.deepcopy(initial)
    fit(uninterrupted, train_batches, config, progress=False, log=lambda _: None)

    state = tmp_path / "run.state"
    interrupted = copy.deepcopy(initial)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, _InterruptAfter(train_batches, len(train_batches) + 5), config, state_path=state,
            progress=False, log=lambda _: None)
    assert state.exists()
    resumed = copy.deepcopy(initial)
    messages = []
    history = fit(resumed, train_batches, config, state_path=state, progress=False, log=messages.append)
    assert messages[0].startswith(f"resuming from {state} after epoch 1") and len(history) == 2
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key

    with pytest.raises(ValueError, match="written for training settings"):
        fit(copy.deepcopy(initial), train_batches, TrainingConfig(epochs=3, lr=0.05), state_path=state,
            progress=False, log=lambda _: None)


def test_training_batches_are_seeded_crops_and_flips_of_each_image_once_per_epoch():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(10)
    batches = TensorBatches(images, labels, 4, [0.0] * 3, [1 / 255] * 3, augment=True, shuffle=True, seed=5)
    assert len(batches) == 3
    epoch0 = list(batches)
    assert sorted(torch.cat([y for _, y in epoch0]).tolist()) == list(range(10))
    padded = nn.functional.pad(images, (4, 4, 4, 4)).float()
    for x, y in epoch0:
        assert x.shape[1:] == (3, 8, 8)
        for crop, label in zip(x, y):
            windows = padded[label].unfold(1, 8, 1).unfold(2, 8, 1).permute(1, 2, 0, 3, 4)
            candidates = torch.cat([windows, windows.flip(-1)], dim=0).reshape(-1, 3, 8, 8)
            assert (candidates == crop).all(dim=(1, 2, 3)).any()
    batches.set_epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, batches))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, batches))  # epoch 2 differs


def test_cutout_zeroes_one_clipped_square_per_image_after_normalisation():
    images = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    batches = TensorBatches(images, torch.zeros(64, dtype=torch.long), 64, [100.0 / 255] * 3, [1 / 255] * 3,
                            augment=True, shuffle=False, padding=0, cutout=4)
    (x, _), = list(batches)
    assert set(x.unique().tolist()) == {0.0, 100.0}  # cut out: 0, the mean; elsewhere (200 - 100) / 1
    cut = x[:, 0] == 0
    assert torch.equal(cut, (x == 0).all(dim=1))  # the same square in every channel
    areas = cut.sum(dim=(1, 2))
    assert areas.max() == 16 and areas.min() >= 4  # whole inside, or clipped at a corner (at least 2 x 2)
    rows, columns = cut.any(dim=2), cut.any(dim=1)
    assert torch.equal(areas, rows.sum(1) * columns.sum(1))  # one rectangle
    batches.set_epoch(0)
    assert torch.equal(next(iter(batches))[0], x)  # seeded
    assert next(iter(TensorBatches(images, torch.zeros(64, dtype=torch.long), 64, [0.0] * 3, [1.0] * 3,
                                   augment=False, shuffle=False, cutout=4)))[0].min() > 0  # only when augmenting


def test_training_batches_reject_float_images():
    with pytest.raises(ValueError, match="uint8"):
        TensorBatches(torch.zeros(2, 3, 4, 4), torch.zeros(2), 1, [0.0], [1.0], augment=False, shuffle=False)


@pytest.mark.shared
def test_convert_command_uses_the_checkpoints_fine_tuned_thresholds(shared, tmp_path, capsys):
    """The CLI reads thresholds stored with the weights; halving every calibrated threshold makes them
    distinguishable from what calibration would choose."""
    loaded = load_model(shared / "models" / "resnet20-cifar10.th")
    subsets = shared / "data" / "cifar10" / "subsets"
    transform = loaded.preprocessing.transform()
    calibration = make_loader(open_dataset(str(subsets / "train-calib-512.txt"), transform=transform), 64)
    graph = quantization_aware(loaded.model, itertools.islice(calibration, 2), qbits=3)
    thresholds = {name: 0.5 * q.theta.detach() for name, q in graph.named_modules() if isinstance(q, QCFSQuantizer)}
    checkpoint = save_checkpoint(loaded.model, tmp_path / "resnet20-q3.pt", "resnet20", loaded.arch_kwargs,
                                 loaded.preprocessing, quantization={"qbits": 3, "thresholds": thresholds})
    # T = 7: the 7 levels of 3 bits, for which the fine-tuned thresholds are
    common = ["--T", "7", "--T-list", "7", "--eval-size", "60", "--calib-size", "32", "--no-progress"]

    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "tuned"), *common]) == 0
    report = json.loads((tmp_path / "tuned" / "report.json").read_text())
    assert report["config"]["threshold_rule"] == "fine-tuned" and report["config"]["qbits"] == 3
    evaluation = stratified_subset(open_dataset(str(subsets / "test-1000.txt"), transform=transform), 60, 0)
    qann = quantize(loaded.model, None, 3, thresholds=thresholds)
    assert report["accuracy"]["qann"] == pytest.approx(accuracy(qann, make_loader(evaluation, 60)) / 100)

    assert main(["convert", str(checkpoint), "--qbits", "4", "--out", str(tmp_path / "recalibrated"), *common]) == 0
    assert "fine-tuned at 3 bits; calibrating new thresholds at 4 bits" in capsys.readouterr().err
    report = json.loads((tmp_path / "recalibrated" / "report.json").read_text())
    assert report["config"]["threshold_rule"] != "fine-tuned" and report["config"]["qbits"] == 4


def test_finetune_calibrates_at_the_percentile_it_is_given():
    """threshold_rule="percentile" used to start fine-tuning at the 99.99th percentile whatever percentile
    was asked for. With a learning rate too small to move them, the thresholds fine-tuning returns are the
    initial ones: those of a calibration at the percentile given, which a heavy-tailed input tells apart."""
    torch.manual_seed(0)
    model = cnn(1, [4], 4 * 6 * 6, 10, padding=0, batchnorm=False).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 1, 8, 8, generator=generator) ** 3, torch.randint(0, 10, (32,), generator=generator))
               for _ in range(4)]
    calibrated = {percentile: {name: m.theta for name, m in
                               quantize(model, batches, qbits=4, threshold_rule="percentile",
                                        percentile=percentile).named_modules() if isinstance(m, QCFSQuantizer)}
                  for percentile in (99.9, 99.99)}
    assert not torch.allclose(calibrated[99.9]["1"], calibrated[99.99]["1"], rtol=0.05)

    result = finetune(model, batches, qbits=4, threshold_rule="percentile", percentile=99.9, epochs=1, lr=1e-12,
                      calibration_batches=len(batches), progress=False, log=lambda _: None)
    assert result.thresholds.keys() == calibrated[99.9].keys()
    for name, theta in result.thresholds.items():
        torch.testing.assert_close(theta, calibrated[99.9][name])


@pytest.fixture(scope="module")
def penalised(mnist, trained_ann) -> dict[str, tuple[EvaluationReport, dict[str, float]]]:
    """200 steps of 2-bit fine-tuning on real digits without a penalty, with the spike penalty and with the
    synops penalty, from the same weights, seed and batches; each converted as `ann2snn convert` converts a
    fine-tuned checkpoint (its thresholds, signed neurons) and evaluated at T = 16 on the 1,000 held-out
    digits: the report and the last epoch's history entry."""
    train_batches, held_out = mnist
    runs = {}
    for name, config in (("none", TrainingConfig(epochs=5, lr=0.01)),
                         ("spikes", TrainingConfig(epochs=5, lr=0.01, spike_penalty=1.0)),
                         ("synops", TrainingConfig(epochs=5, lr=0.01, synops_penalty=1.0))):
        torch.manual_seed(0)
        result = finetune(trained_ann, train_batches, qbits=2, progress=False, log=lambda _: None, config=config)
        snn = convert(result.model, None, qbits=2, T=16, neuron="signed", thresholds=result.thresholds)
        runs[name] = evaluate(snn, held_out, [16], ann=result.model), result.history[-1]
    return runs


def test_spike_penalty_makes_the_snn_fire_fewer_spikes_at_nearly_the_same_accuracy(penalised):
    """Measured: 2,788 spikes per image at 94.6 % without, 1,479 at 94.2 % with lambda 1."""
    (plain, _), (sparse, _) = penalised["none"], penalised["spikes"]
    assert sparse.spikes_per_image[16] <= 0.8 * plain.spikes_per_image[16]
    assert sparse.accuracy_snn[16] >= plain.accuracy_snn[16] - 0.02
    # The term trained on is the SNN's spikes per neuron (measured 0.292 in training against 0.296 held out)
    neurons = 8 * 28 * 28 + 16 * 14 * 14  # the two quantized activations of small_cnn, per image
    for report, history in (penalised["none"], penalised["spikes"]):
        assert history["spikes_per_neuron"] == pytest.approx(report.spikes_per_image[16] / neurons, rel=0.1)


def test_synops_penalty_cuts_the_snns_synaptic_operations_where_the_spikes_cost_most(penalised):
    """The synops penalty weights each spike by the synapses it drives: small_cnn's first activation feeds
    conv2 (144 synapses per spike), its second only the readout, so its cut falls on the first. Measured
    (synaptic operations per image, spikes, accuracy): 100.3 k, 2,783, 94.6 % without a penalty; 43.0 k,
    1,441, 94.1 % with the spike penalty; 38.2 k, 1,483, 94.1 % with the synops penalty."""
    (plain, _), (sparse, _), (cheap, cheap_history) = (penalised[name] for name in ("none", "spikes", "synops"))
    assert cheap.synops_per_image[16] <= 0.5 * plain.synops_per_image[16]
    assert cheap.accuracy_snn[16] >= plain.accuracy_snn[16] - 0.02

    def synops_per_spike(report: EvaluationReport) -> float:
        return report.synops_per_image[16] / report.spikes_per_image[16]

    # 36.0 without a penalty, 29.9 with the spike penalty, 25.8 with the synops penalty
    assert synops_per_spike(cheap) <= 0.95 * synops_per_spike(sparse) <= 0.95 * synops_per_spike(plain)
    # The trained term is an estimate: a spike reaches the mean fan-out of the layers it feeds, but max pooling
    # passes the largest of four (measured 0.074 trained, 0.13 simulated: synops over the ANN's MACs)
    assert cheap_history["synops_ratio"] < cheap.synops_per_image[16] / cheap.ann_macs_per_image


def _one_quantizer_net() -> nn.Sequential:
    """Identity weights -> a 3-level quantizer with theta 1.5 (step 0.5) -> zero weights: the cross-entropy
    sends no gradient back through the quantizer, so what reaches theta and the first weights is the penalty's."""
    quantizer = QCFSQuantizer(levels=3)
    quantizer.set_threshold(torch.tensor(1.5), 2)
    quantizer.theta = nn.Parameter(quantizer.theta.detach().clone())
    net = nn.Sequential(nn.Linear(4, 4, bias=False), quantizer, nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
        net[2].weight.zero_()
        net[2].bias.zero_()
    return net


@pytest.mark.parametrize("penalty", [0.0, 0.5])
def test_spike_penalty_is_the_levels_per_neuron_and_image_with_the_straight_through_gradient(penalty):
    x = torch.tensor([[0.1, 0.3, 0.8, 2.0], [0.0, 0.0, 0.0, 1.0]])
    net = _one_quantizer_net()
    history = fit(net, [(x, torch.tensor([0, 1]))], TrainingConfig(epochs=1, lr=0.1, momentum=0.0, weight_decay=0.0,
                                                                   spike_penalty=penalty), progress=False,
                  log=lambda _: None)
    # levels floor(x / 0.5 + 1/2) clamped to 0..3: 0, 1, 2, 3 and 0, 0, 0, 2; 8 spikes over 2 images x 4 neurons
    assert history[0]["spikes_per_neuron"] == pytest.approx(1.0)
    assert history[0]["loss"] == pytest.approx(math.log(2))  # the cross-entropy alone
    # The straight-through gradient passes where the level lies strictly inside 0..3 (torch.clamp's gradient is
    # zero at its bounds): at 0.3, 0.8 and 1.0. There d(level)/d(theta) = -x * 3 / 1.5**2, so the mean's
    # gradient is -(0.3 + 0.8 + 1.0) * 4/3 / 8, and theta rises by lr x penalty x that
    torch.testing.assert_close(net[1].theta.detach(), torch.tensor(1.5 + 0.1 * penalty * 2.1 * 4 / 3 / 8))
    # d(level)/d(z) = 1 / step / 8 = 0.25 there: neurons 1 and 2 (on image 1) get 0.25 x image 1, neuron 3
    # (on image 2) 0.25 x image 2, neuron 0 (level 0 on both) nothing
    gradient = torch.tensor([[0.0] * 4] + [[0.025, 0.075, 0.2, 0.5]] * 2 + [[0.0, 0.0, 0.0, 0.25]])
    torch.testing.assert_close(net[0].weight.detach(), torch.eye(4) - 0.1 * penalty * gradient)


def test_a_signed_quantizer_counts_its_negative_levels_as_spikes():
    # a signed neuron fires one -1 spike per negative level: levels 0, -1, -2, -3 and 0, 0, 0, 2 (8 spikes)
    net = _one_quantizer_net()
    net[1].signed = True
    x = torch.tensor([[-0.1, -0.3, -0.8, -2.0], [0.0, 0.0, 0.0, 1.0]])
    history = fit(net, [(x, torch.tensor([0, 1]))], TrainingConfig(epochs=1, lr=0.1), progress=False,
                  log=lambda _: None)
    assert history[0]["spikes_per_neuron"] == pytest.approx(1.0)


def test_a_negative_spike_penalty_or_one_without_quantizers_is_refused(mnist):
    for penalty in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"spike_penalty must be a finite number >= 0 \(.*\), got {penalty}$"):
            TrainingConfig(epochs=1, spike_penalty=penalty)
    with pytest.raises(ValueError, match="spike_penalty and synops_penalty need QCFS quantizers"):
        train(small_cnn(), mnist[0], TrainingConfig(epochs=1, spike_penalty=0.1), progress=False, log=lambda _: None)


def test_a_training_state_from_before_the_spike_penalty_resumes_as_trained_without_it(tmp_path):
    batches = [(torch.randn(4, 4), torch.tensor([0, 1, 0, 1]))]
    state = tmp_path / "run.state"
    fit(_one_quantizer_net(), batches, TrainingConfig(epochs=1), state_path=state, progress=False, log=lambda _: None)
    saved = torch.load(state, weights_only=True)
    del saved["config"]["spike_penalty"]
    torch.save(saved, state)
    messages = []
    fit(_one_quantizer_net(), batches, TrainingConfig(epochs=1), state_path=state, progress=False, log=messages.append)
    assert messages[0].startswith(f"resuming from {state} after epoch 1")
    with pytest.raises(ValueError, match="written for training settings"):
        fit(_one_quantizer_net(), batches, TrainingConfig(epochs=1, spike_penalty=0.5), state_path=state,
            progress=False, log=lambda _: None)


def _fan_out_net() -> fx.GraphModule:
    """`_one_quantizer_net` with an all-ones readout of 3 outputs, traced: 4 + 12 dense MACs per image, 3
    synapses per spike of the quantizer."""
    net = _one_quantizer_net()
    net[2] = nn.Linear(4, 3)
    nn.init.ones_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    return trace(net)


def test_synops_ratio_weights_each_spike_by_the_synapses_it_drives():
    # 8 levels over 2 images (see the spike-penalty test), 3 synapses each: 12 synaptic operations per image
    # against the ANN's 4 (identity: one synapse per input) + 12 MACs
    x = torch.tensor([[0.1, 0.3, 0.8, 2.0], [0.0, 0.0, 0.0, 1.0]])
    history = fit(_fan_out_net(), [(x, torch.tensor([0, 1]))], TrainingConfig(epochs=1), progress=False,
                  log=lambda _: None)
    assert history[0]["synops_ratio"] == pytest.approx(12 / 16)
    # So its gradient is 12/16 x 8 / 8 neuron-images = 0.75 x that of the spikes per neuron
    batches = [(x, torch.tensor([0, 1]))]
    trained = {}
    for name, config in (("synops", TrainingConfig(epochs=1, synops_penalty=1.0)),
                         ("spikes", TrainingConfig(epochs=1, spike_penalty=0.75))):
        trained[name] = _fan_out_net()
        fit(trained[name], batches, config, progress=False, log=lambda _: None)
    for (name, value), other in zip(trained["synops"].state_dict().items(), trained["spikes"].state_dict().values()):
        torch.testing.assert_close(value, other, msg=name)
    assert not torch.equal(trained["synops"].state_dict()["1.theta"], torch.tensor(1.5))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.branch = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)
        self.shortcut = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        stem = torch.relu(self.stem(x))
        block = torch.relu(self.branch(stem) + self.shortcut(stem))
        return self.head(F.adaptive_avg_pool2d(block + stem, 1).flatten(1))


def test_a_quantizers_spikes_reach_the_weighted_layers_through_any_op_but_another_quantizer(mnist):
    graph = quantization_aware(_Residual(), [(torch.rand(2, 1, 6, 6), torch.tensor([0, 1]))], qbits=2)
    quantizers = [n.target for n in graph.graph.nodes if n.op == "call_module"
                  and isinstance(graph.get_submodule(n.target), QCFSQuantizer)]
    consumers = _synaptic_consumers(graph)
    # the stem's spikes reach both convolutions, and both quantizers' the readout through the sum and the pooling
    assert [sorted(consumers[name]) for name in quantizers] == [["branch", "head", "shortcut"], ["head"]]


def test_synops_penalty_needs_a_traced_graph():
    with pytest.raises(ValueError, match=r"synops_penalty must be a finite number >= 0 \(.*\), got -1"):
        TrainingConfig(epochs=1, synops_penalty=-1.0)
    with pytest.raises(ValueError, match="synops_penalty needs a traced quantization-aware graph"):
        fit(_one_quantizer_net(), [(torch.zeros(1, 4), torch.tensor([0]))],
            TrainingConfig(epochs=1, synops_penalty=1.0), progress=False, log=lambda _: None)


def test_fine_tuning_at_per_layer_bits_converts_with_its_own_thresholds_at_those_bits(mnist, trained_ann):
    # the first activation at 3 bits, the other at 2: the checkpoint entry keeps the mapping, and the conversion
    # at the checkpoint's bits takes its thresholds (no recalibration) and reproduces its QANN in one step
    bits = {"first": 3, "default": 2}
    batches = list(itertools.islice(iter(mnist[0]), 4))
    torch.manual_seed(0)
    result = finetune(trained_ann, batches, qbits=bits, progress=False, log=lambda _: None,
                      config=TrainingConfig(epochs=1, lr=0.01))
    assert result.quantization["qbits"] == bits
    assert sorted(q.levels for q in quantize(result.model, None, bits, thresholds=result.thresholds).modules()
                  if isinstance(q, QCFSQuantizer)) == [3, 7]
    loaded = LoadedModel(result.model, "small_cnn", {}, Preprocessing([0.13], [0.31], [1, 28, 28]), "argument",
                         result.quantization)
    images, labels = (torch.cat(parts) for parts in zip(*batches))
    notes = []
    snn, _ = convert_loaded(loaded, TensorDataset(images, labels),
                            checkpoint_config(loaded, T=1, neuron="signed", max_spikes_per_step=7), log=notes.append)
    assert notes == []
    qann = quantize(result.model, None, bits, thresholds=result.thresholds)
    with torch.no_grad():
        expected = qann(images[:100])
    torch.testing.assert_close(snn.simulate(images[:100], T_list=[1]).outputs[1], expected, atol=1e-4, rtol=1e-4)
