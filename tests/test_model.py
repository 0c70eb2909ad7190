"""The CNN: shapes, the normalisation it carries inside, its size, and the TorchScript export check."""

import pytest
import torch

from training import export
from training.model import MNIST_MEAN, MNIST_STD, Net, Normalize, count_macs


def test_logits_shape_for_any_batch():
    model = Net().eval()
    for n in (1, 7, 64):
        assert model(torch.zeros(n, 1, 28, 28, dtype=torch.uint8)).shape == (n, 10)


def test_uint8_and_unit_floats_are_the_same_input():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    model = Net().eval()
    torch.testing.assert_close(model(pixels), model(pixels.float() / 255))


def test_normalisation_matches_training_statistics():
    x = torch.tensor([[0, 255]], dtype=torch.uint8)
    expected = torch.tensor([[-MNIST_MEAN / MNIST_STD, (1 - MNIST_MEAN) / MNIST_STD]])
    torch.testing.assert_close(Normalize()(x), expected)


def test_model_stays_small():
    """Serving throughput follows FLOPs: a bigger net has to earn its place (docs/training.md, "Model")."""
    assert count_macs(Net()) < 1_000_000


def test_export_matches_eager_and_survives_a_reload(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    worst = export.export(model, images, tmp_path / "model.pt")
    assert worst <= export.LOGIT_TOLERANCE
    loaded = export.load(tmp_path / "model.pt")
    torch.testing.assert_close(loaded(images), model(images), atol=1e-4, rtol=0)
    assert not list(tmp_path.glob(".*tmp"))


def test_export_refuses_a_module_that_disagrees(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    images = torch.randint(0, 256, (50, 1, 28, 28), dtype=torch.uint8)
    other = export.script(Net().eval())  # different random weights
    with pytest.raises(export.ExportError, match="disagrees with the eager model"):
        export.verify(model, other, images)
