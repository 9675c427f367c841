from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn
from ann2snn.evaluation.evaluate import EvaluationReport
from ann2snn.evaluation.synops import E_AC_PJ, E_MAC_PJ
from ann2snn.io.data import mnist5k, stratified_subset

IN_FEATURES, HIDDEN, CLASSES = 12, 16, 5


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)).eval()


def labelled_by(model: nn.Module, images: int = 48) -> TensorDataset:
    """Random inputs labelled with the model's own predictions, so the ANN scores exactly 100 %."""
    inputs = torch.randn(images, 3, 2, 2)
    with torch.no_grad():
        return TensorDataset(inputs, model(inputs).argmax(-1))


def test_accuracies_agreement_and_spikes_match_a_manual_simulation() -> None:
    model = mlp()
    data = labelled_by(model)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=16), T=8)
    T_list = [2, 8, 16]
    report = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), T_list, ann=model)

    loader = DataLoader(data, batch_size=16)
    correct = dict.fromkeys(T_list, 0)
    agreeing = dict.fromkeys(T_list, 0)
    spikes = dict.fromkeys(T_list, 0.0)
    correct_qann = 0
    for inputs, labels in loader:
        qann_predictions = snn.qann(inputs).argmax(-1)
        correct_qann += int((qann_predictions == labels).sum())
        result = snn.simulate(inputs, T_list)
        for T in T_list:
            predictions = result.outputs[T].argmax(-1)
            correct[T] += int((predictions == labels).sum())
            agreeing[T] += int((predictions == qann_predictions).sum())
            spikes[T] += float(sum(count.sum() for count in result.spikes[T].values()))

    images = len(data)
    assert report.images == images and report.T_list == T_list
    assert report.accuracy_ann == 1.0
    assert report.accuracy_qann == correct_qann / images
    assert report.accuracy_snn == {T: correct[T] / images for T in T_list}
    assert report.agreement_snn_qann == {T: agreeing[T] / images for T in T_list}
    assert report.spikes_per_image == pytest.approx({T: spikes[T] / images for T in T_list})
    [layer] = report.layers
    assert layer.neurons == HIDDEN
    assert layer.spikes_per_image == pytest.approx(spikes[16] / images)
    assert layer.firing_rate == pytest.approx(spikes[16] / images / (HIDDEN * 16))


def test_operations_and_energy_of_a_rate_coded_mlp() -> None:
    model = mlp()
    data = labelled_by(model)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=16), T=8)
    report = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), [4, 8], ann=model)

    # The first layer sees the analog input at every step; every hidden spike reaches all CLASSES outputs.
    assert report.ann_macs_per_image == IN_FEATURES * HIDDEN + HIDDEN * CLASSES
    assert report.snn_macs_per_image == {T: T * IN_FEATURES * HIDDEN for T in (4, 8)}
    assert report.synops_per_image == pytest.approx({T: CLASSES * report.spikes_per_image[T] for T in (4, 8)})
    energy = report.to_json()["energy"]
    assert energy["e_mac_pj"] == E_MAC_PJ and energy["e_ac_pj"] == E_AC_PJ
    assert energy["ann_uj_per_image"] == pytest.approx(report.ann_macs_per_image * 4.6e-6)
    assert energy["snn_uj_per_image"]["8"] == pytest.approx(
        report.snn_macs_per_image[8] * 4.6e-6 + report.synops_per_image[8] * 0.9e-6)


def test_signed_neurons_reach_the_qann_and_count_the_input_layer_once() -> None:
    model = mlp()
    data = labelled_by(model)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=16), T=32, neuron="signed")
    report = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), [32])

    assert report.agreement_snn_qann == {32: 1.0}
    assert report.accuracy_snn[32] == report.accuracy_qann
    assert report.accuracy_ann is None
    assert report.snn_macs_per_image == {32: IN_FEATURES * HIDDEN}
    # Without an ANN the MACs are counted on the QANN, which has the same layers.
    assert report.ann_macs_per_image == IN_FEATURES * HIDDEN + HIDDEN * CLASSES
    assert report.config["coding"] == "accumulate"


def test_stop_when_quiet_reports_the_steps_each_image_needed() -> None:
    """The same accuracies and spikes as the full simulation (a quiet signed network's output is final), and the
    mean and largest number of steps the images needed, as `simulate` counts them."""
    model = mlp()
    data = labelled_by(model)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=16), T=64, neuron="signed")
    full = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), [64])
    quiet = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), [64], stop_when_quiet=True)
    assert full.quiet_steps is None and "quiet_steps" in full.to_json()
    assert quiet.accuracy_snn == full.accuracy_snn and quiet.spikes_per_image == full.spikes_per_image
    steps = torch.cat([snn.simulate(inputs, [64], stop_when_quiet=True).steps_used
                       for inputs, _ in DataLoader(data, batch_size=16)])
    assert quiet.quiet_steps == {"mean": pytest.approx(float(steps.float().mean())), "max": int(steps.max()),
                                 "of": 64}
    assert 1 <= quiet.quiet_steps["mean"] < 64
    with pytest.raises(ValueError, match="stop_when_quiet needs accumulate coding"):
        ann2snn.evaluate(ann2snn.convert(model, DataLoader(data, batch_size=16), T=8),
                         DataLoader(data, batch_size=16), stop_when_quiet=True)


def test_never_fired_fraction_counts_silent_neurons() -> None:
    model = mlp()
    with torch.no_grad():
        hidden = model[1]
        hidden.weight.mul_(0.01)
        hidden.bias[: HIDDEN // 2] = -10.0  # always negative: these never fire
        hidden.bias[HIDDEN // 2:] = 1.0  # always positive: these fire at every image
    data = labelled_by(model)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=16), T=8)
    [layer] = ann2snn.evaluate(snn, DataLoader(data, batch_size=16), [8]).layers
    assert layer.never_fired_fraction == 0.5


def test_report_json_schema() -> None:
    model = mlp()
    data = labelled_by(model, images=16)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=8), T=4, qbits=3)
    report = ann2snn.evaluate(snn, DataLoader(data, batch_size=8), [2, 4], ann=model)
    assert isinstance(report, EvaluationReport)
    document = json.loads(json.dumps(report.to_json()))

    assert set(document["accuracy"]) == {"ann", "qann", "snn"}
    assert set(document["accuracy"]["snn"]) == {"2", "4"}
    assert set(document["agreement_snn_qann"]) == {"2", "4"}
    assert document["spikes"]["T"] == 4
    for layer in document["spikes"]["per_layer"]:
        assert {"name", "neurons", "spikes_per_image", "firing_rate", "never_fired_fraction"} <= set(layer)
    assert set(document["synops_per_image"]) == set(document["snn_macs_per_image"]) == {"2", "4"}
    assert document["ann_macs_per_image"] > 0
    assert {"e_mac_pj", "e_ac_pj", "reference", "ann_uj_per_image", "snn_uj_per_image"} <= set(document["energy"])
    config = document["config"]
    assert (config["T"], config["qbits"], config["neuron"], config["threshold_rule"]) == (4, 3, "if", "mse")
    assert {"wall_s", "images_per_s", "device"} <= set(document["timing"])
    assert document["timing"]["device"].startswith("cpu")


def test_unlabelled_batches_are_refused() -> None:
    model = mlp()
    inputs = torch.randn(8, 3, 2, 2)
    snn = ann2snn.convert(model, [inputs], T=4)
    with pytest.raises(ValueError, match="labelled batches"):
        ann2snn.evaluate(snn, [inputs], [4])


def test_evaluate_leaves_the_ann_in_its_mode() -> None:
    model = mlp()
    data = labelled_by(model, images=8)
    snn = ann2snn.convert(model, DataLoader(data, batch_size=8), T=4)
    model.train()
    ann2snn.evaluate(snn, DataLoader(data, batch_size=8), [4], ann=model)
    assert model.training


@pytest.mark.slow
def test_mnist5k_mlp_converts_close_to_its_qann() -> None:
    dataset = mnist5k()
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    train, test = torch.utils.data.Subset(dataset, order[:4000]), torch.utils.data.Subset(dataset, order[4000:])
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(3):
        for images, labels in DataLoader(train, batch_size=64, shuffle=True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
    model.eval()

    snn = ann2snn.convert(model, DataLoader(stratified_subset(train, 256, seed=0), batch_size=128), T=32)
    report = ann2snn.evaluate(snn, DataLoader(test, batch_size=250), [8, 32], ann=model)
    assert report.accuracy_ann > 0.88
    assert report.accuracy_snn[32] >= report.accuracy_qann - 0.03
    assert report.agreement_snn_qann[32] > 0.9
    assert report.accuracy_snn[32] > report.accuracy_snn[8] - 0.01
