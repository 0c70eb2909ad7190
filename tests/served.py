"""A real TorchServe for a test module, and the MNIST test digits sent to it: the fixtures `server`, `digits`
and `known` (tests/conftest.py offers them to every module; each module gets a server of its own), and
`allowed_origin`, the web page origin the server admits (none; a module that drives a page overrides it)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from bodies import encoded

from handler.client import Reply, post
from handler.mnist_handler import BATCH_LOG_ENV
from handler.server import Ports, Server, start_torchserve

SAMPLE = 1000  # test digits per input form: at 99.5 % accuracy, 99 % of 1,000 leaves room for chance
CLIENT_THREADS = 16


@pytest.fixture(scope="module")
def allowed_origin() -> str:
    """The one web page origin the module's server lets browsers call it from: none."""
    return ""


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory, allowed_origin) -> Server:
    """One TorchServe on free ports for the module (a config.properties copy with those ports), which
    logs every batch: the batching test reads which requests shared one."""
    with start_torchserve(
        archive,
        tmp_path_factory.mktemp("logs"),
        Ports.free(),
        environment={BATCH_LOG_ENV: "1"},
        allowed_origin=allowed_origin,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """A fixed sample of MNIST test digits (28 x 28 uint8) and their labels."""
    from training.data import load_mnist

    mnist = load_mnist()
    chosen = np.random.default_rng(0).choice(len(mnist.test_images), SAMPLE, replace=False)
    return mnist.test_images[chosen], mnist.test_labels[chosen]


@pytest.fixture(scope="module")
def known(server, digits) -> tuple[np.ndarray, np.ndarray]:
    """64 sample digits the served model reads right as PNGs: tests of routing and
    recovery compare answers with these, independent of the model's few mistakes."""
    images, labels = digits
    replies = send_all(server, [(encoded(image), "image/png") for image in images[:80]])
    right = [n for n, reply in enumerate(replies) if reply.status == 200 and reply.answer["digit"] == labels[n]]
    assert len(right) >= 64
    return images[right[:64]], labels[right[:64]]


def send_all(server: Server, requests: list[tuple[bytes, str]]) -> list[Reply]:
    """Every (body, content type) POSTed to the prediction URL from several threads; replies in order."""
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        return list(pool.map(lambda request: post(server.url(), *request), requests))
