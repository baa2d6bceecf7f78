import pytest
import torch

from yellowfin import YellowFin
from yellowfin.telemetry import log_stats
from helpers import make_data, make_model, train


def test_callable_sink_gets_a_record_every_n_steps():
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    records = []
    handle = log_stats(opt, lambda record, step: records.append((step, record)), every=3)
    train(model, opt, data, steps=10)
    assert [step for step, _ in records] == [3, 6, 9]
    assert records[-1][1]["step"] == 9 and "mu" in records[-1][1]
    handle.remove()
    train(model, opt, data, steps=5)
    assert len(records) == 3


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_summary_writer_sink_gets_one_scalar_per_statistic_and_group():
    model, data = make_model(), make_data()
    opt = YellowFin([{"params": model[0].parameters()}, {"params": model[2].parameters()}], per_group_tuning=True)
    writer = FakeWriter()
    log_stats(opt, writer, every=2)
    train(model, opt, data, steps=4)
    tags = {tag for tag, _, _ in writer.scalars}
    assert "yellowfin/group0/mu" in tags and "yellowfin/group1/lr" in tags and "yellowfin/group1/alpha" in tags
    assert {step for _, _, step in writer.scalars} == {2, 4}


def test_real_tensorboard_writer(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    model, data = make_model(), make_data()
    opt = YellowFin(model.parameters())
    writer = tensorboard.SummaryWriter(log_dir=str(tmp_path))
    log_stats(opt, writer, every=1)
    train(model, opt, data, steps=2)
    writer.close()
    assert any(tmp_path.iterdir())


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every"):
        log_stats(YellowFin([torch.nn.Parameter(torch.zeros(1))]), print, every=0)
