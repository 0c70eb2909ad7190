"""The TorchServe handler driven as TorchServe drives it, with a real Context and no server."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bodies import drawn_seven, encoded, zip_archive
from ts.context import Context, RequestProcessor

from handler import inputs
from handler.mnist_handler import MnistHandler, answer, limits_from, request_body, select_device

HANDLER_DIR = Path(__file__).resolve().parents[1] / "handler"


# --- test models: the handler must not care which weights it gets --------------------------------


class TinyNet(torch.nn.Module):
    """A small untrained CNN with MNIST's contract: N x 1 x 28 x 28, uint8 or 0..1 -> N x 10 logits."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 5, stride=3)
        self.fc = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = (x - 0.1307) / 0.3081
        return self.fc(torch.relu(self.conv(x)).flatten(1)) * 5.0


class ColumnReader(torch.nn.Module):
    """Answers k when pixel (14, 9 + k) is the brightest of row 14's middle ten: a model whose
    answer a test can predict, to check that answers go back to the right requests."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 14, 9:19].float() * 20.0


class FiveClasses(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :5]


def marked(digit: int) -> list[list[int]]:
    """A pixel array that ColumnReader reads as `digit`."""
    pixels = np.zeros((28, 28), dtype=int)
    pixels[14, 9 + digit] = 255
    return pixels.tolist()


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache, which BaseHandler.handle reports to."""

    def __init__(self):
        self.times = []
        self.metrics = []

    def add_time(self, name, value, idx=None, unit="ms"):
        self.times.append(name)

    def add_metric(self, name, value, unit, idx=None, dimensions=(), metric_type=None):
        self.metrics.append((name, value, {d.name: d.value for d in dimensions}, metric_type.name))


def model_dir(tmp_path: Path, model: torch.nn.Module) -> Path:
    torch.manual_seed(0)  # TinyNet's weights: the same in every run
    scripted = torch.jit.script(model if not isinstance(model, type) else model())
    scripted.save(str(tmp_path / "model.pt"))
    shutil.copy(HANDLER_DIR / "index_to_name.json", tmp_path)
    return tmp_path


def context_for(directory: Path, yaml_config: dict | None = None) -> Context:
    manifest = {"model": {"modelName": "mnist", "serializedFile": "model.pt", "handler": "mnist_handler.py"}}
    if yaml_config is None:
        yaml_config = yaml.safe_load((HANDLER_DIR / "model-config.yaml").read_text())
    return Context(
        "mnist",
        str(directory),
        manifest,
        batch_size=32,
        gpu=None,
        mms_version="0.12.0",
        metrics=RecordingMetrics(),
        model_yaml_config=yaml_config,
    )


def loaded(tmp_path: Path, model=TinyNet, yaml_config: dict | None = None) -> tuple[MnistHandler, Context]:
    context = context_for(model_dir(tmp_path, model), yaml_config)
    handler = MnistHandler()
    handler.initialize(context)
    return handler, context


def served(handler: MnistHandler, context: Context, requests: list[dict]) -> list[tuple[int, dict]]:
    """Run one batch the way TorchServe's worker does; each request's (status, JSON answer)."""
    context.request_processor = [RequestProcessor({}) for _ in requests]
    bodies = handler.handle(requests, context)
    assert len(bodies) == len(requests)
    results = []
    for index, body in enumerate(bodies):
        assert context.get_response_content_type(index) == "application/json"
        results.append((context.get_response_status(index)[0], json.loads(body)))
    return results


@pytest.fixture
def tiny(tmp_path):
    return loaded(tmp_path, TinyNet)


@pytest.fixture
def reader(tmp_path):
    return loaded(tmp_path, ColumnReader)


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "properties, cuda_available, device",
    [
        ({"gpu_id": 1}, True, "cuda:1"),
        ({"gpu_id": "0"}, True, "cuda:0"),
        ({"gpu_id": None}, True, "cpu"),  # TorchServe gave this worker no GPU
        ({}, True, "cpu"),
        ({"gpu_id": 0}, False, "cpu"),  # a GPU id but no CUDA in this build or node
    ],
)
def test_the_worker_uses_its_assigned_gpu_when_there_is_one(properties, cuda_available, device):
    assert select_device(properties, cuda_available) == torch.device(device)


def test_initialize_loads_the_model_on_the_cpu_with_one_thread(tiny):
    handler, _ = tiny
    assert handler.initialized
    assert handler.device == torch.device("cpu")
    assert torch.get_num_threads() == 1
    assert handler.class_names == tuple("0123456789")
    assert handler.limits == inputs.Limits()  # model-config.yaml states the defaults


def test_a_model_without_ten_outputs_is_refused_at_load(tmp_path):
    with pytest.raises(RuntimeError, match="needs N x 10 finite logits"):
        loaded(tmp_path, FiveClasses)


def test_limits_come_from_the_handler_section_of_model_config():
    assert limits_from({"max_instances": 3}) == inputs.Limits(max_instances=3)
    with pytest.raises(ValueError, match="handler.max_instances must be a positive integer"):
        limits_from({"max_instances": 0})
    with pytest.raises(ValueError, match="handler.max_body_bytes"):
        limits_from({"max_body_bytes": "6 MB"})


def test_class_names_come_from_index_to_name(tmp_path):
    directory = model_dir(tmp_path, ColumnReader)
    names = {str(i): f"digit {i}" for i in range(10)}
    (directory / "index_to_name.json").write_text(json.dumps(names))
    handler = MnistHandler()
    context = context_for(directory)
    handler.initialize(context)
    [(status, result)] = served(handler, context, [{"body": marked(4)}])
    assert result["digit"] == 4 and list(result["probabilities"]) == list(names.values())


# --- answers ------------------------------------------------------------------------------------


def test_a_png_gets_the_digit_its_confidence_and_all_ten_probabilities(tiny):
    handler, context = tiny
    [(status, result)] = served(handler, context, [{"body": bytearray(encoded(drawn_seven()))}])
    assert status == 200
    assert set(result) == {"digit", "confidence", "probabilities", "model"}
    probabilities = result["probabilities"]
    assert list(probabilities) == [str(digit) for digit in range(10)]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # The same numbers as running the model by hand on the normalised image.
    image = torch.from_numpy(inputs.image_to_mnist(encoded(drawn_seven())))[None, None]
    expected = torch.softmax(handler.model(image), dim=1)[0].detach().numpy()
    assert list(probabilities.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert result["digit"] == int(expected.argmax())
    assert result["confidence"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert context.metrics.times == ["HandlerTime"]  # BaseHandle.handle ran its course


def test_a_batch_runs_the_copy_made_for_batches_and_answers_as_the_saved_model_does(tiny, monkeypatch):
    handler, context = tiny
    # The copy for batches runs its convolutions in oneDNN's layout; the lone-image model as saved.
    assert "mkldnn_convolution" in str(handler.batched_model.graph)
    assert "mkldnn" not in str(handler.model.graph)
    rng = np.random.default_rng(0)
    images = rng.random((5, 28, 28), dtype=np.float32)
    with torch.inference_mode():
        expected = torch.softmax(handler.model(torch.from_numpy(images).unsqueeze(1)), dim=1).numpy()
    assert np.allclose(handler.classify(images), expected, atol=1e-6)
    assert np.allclose(handler.classify(images[:1]), expected[:1], atol=1e-6)
    assert handler.classify(images[:0]).shape == (0, 10)
    # Which model ran: a batch of two already goes to the copy, a lone image never does.
    monkeypatch.setattr(handler, "batched_model", lambda pixels: torch.zeros(len(pixels), 10))
    assert np.allclose(handler.classify(images[:2]), 0.1)
    assert np.allclose(handler.classify(images[:1]), expected[:1], atol=1e-6)


@pytest.mark.parametrize(
    "rewrite, says",
    [
        (lambda module: torch.jit.script(FiveClasses()), "answers differently"),
        (lambda module: (_ for _ in ()).throw(RuntimeError("unsupported op")), "failed: unsupported op"),
    ],
)
def test_batches_use_the_model_as_saved_when_its_optimised_copy_cannot_be_trusted(
    tmp_path, monkeypatch, caplog, rewrite, says
):
    monkeypatch.setattr(torch.jit, "optimize_for_inference", rewrite)
    with caplog.at_level("WARNING"):
        handler, _ = loaded(tmp_path)
    assert handler.batched_model is handler.model
    assert "batches use the model as saved; " in caplog.text and says in caplog.text


def test_answers_and_headers_name_the_model_the_server_was_started_with(tmp_path, monkeypatch):
    monkeypatch.setenv("SERVED_MODEL_VERSION", "7")
    monkeypatch.setenv("SERVED_MODEL_SHA256", "0560663d9a3b" + "0" * 52)
    handler, context = loaded(tmp_path, ColumnReader)
    [(status, single), (_, several), (refused, error)] = served(
        handler, context, [{"body": marked(4)}, {"body": {"instances": [marked(1), marked(2)]}}, {"body": b"seven"}]
    )
    served_model = {"version": "7", "sha256": "0560663d9a3b"}
    assert single["model"] == served_model and several["model"] == served_model and "model" not in error
    for index in range(3):
        assert (
            context.get_response_headers(index).items()
            >= {"X-Model-Version": "7", "X-Model-Sha256": "0560663d9a3b"}.items()
        )
    # Once per worker start, for Prometheus: the version and checksum as labels of a gauge.
    assert context.metrics.metrics == [
        ("ModelServed", 1, {"ModelVersion": "7", "ModelSha256": "0560663d9a3b"}, "GAUGE")
    ]


def test_without_those_settings_the_archives_own_version_is_named():
    from handler.mnist_handler import served_headers, served_model

    assert served_model({}, {"model": {"modelVersion": "a835d467e6c2"}}) == {"version": "a835d467e6c2"}
    assert served_headers({"version": "a835d467e6c2"}) == {"X-Model-Version": "a835d467e6c2"}


def test_the_launchers_and_the_handler_agree_on_the_settings_names(archive):
    from handler import mnist_handler
    from handler.server import served_model_environment

    assert set(served_model_environment(archive, "3")) == {mnist_handler.VERSION_ENV, mnist_handler.SHA256_ENV}


def test_the_handler_shows_as_many_sha256_digits_as_the_registry():
    """The workers import mnist_handler.py from the unpacked archive, without registry/: two constants, one number."""
    from handler import mnist_handler
    from registry import store

    assert mnist_handler.SHA256_SHOWN == store.SHA256_SHOWN


def test_answers_come_back_in_request_order(reader):
    handler, context = reader
    digits = [3, 1, 4, 1, 5, 9, 2, 6]
    results = served(handler, context, [{"body": marked(digit)} for digit in digits])
    assert [result["digit"] for _, result in results] == digits
    assert all(status == 200 and result["confidence"] > 0.99 for status, result in results)


def test_instances_are_answered_as_predictions_in_order(reader):
    handler, context = reader
    [(status, result)] = served(handler, context, [{"body": {"instances": [marked(2), marked(7), marked(0)]}}])
    assert status == 200
    assert [prediction["digit"] for prediction in result["predictions"]] == [2, 7, 0]


def test_every_form_torchserve_hands_over_is_understood(reader):
    handler, context = reader
    pixels = marked(8)
    text = json.dumps({"data": pixels})
    requests = [
        {"body": {"data": pixels}},  # application/json, parsed by TorchServe
        {"body": text},  # text/plain, decoded to str by TorchServe
        {"body": bytearray(text.encode())},  # any other content type: raw bytes
        {"data": text.encode()},
        {"file": text.encode()},  # a multipart/form-data field, whatever its name
        {"body": pixels},
    ]
    results = served(handler, context, requests)
    assert [(status, result["digit"]) for status, result in results] == [(200, 8)] * len(requests)


def test_base64_images_are_answered(tiny):
    handler, context = tiny
    text = base64.b64encode(encoded(drawn_seven())).decode()
    direct, wrapped = served(handler, context, [{"body": encoded(drawn_seven())}, {"body": {"data": text}}])
    assert direct == wrapped


# --- failures -----------------------------------------------------------------------------------


def test_a_bad_request_fails_alone_and_the_batch_is_answered(reader):
    handler, context = reader
    requests = [
        {"body": marked(3)},
        {"body": b""},
        {"body": marked(8)},
        {"body": {"instances": [marked(1)] * 65}},
        {"body": zip_archive()},
        {"body": [[0] * 28] * 27},
        {"body": marked(6)},
    ]
    results = served(handler, context, requests)
    assert [status for status, _ in results] == [200, 400, 200, 413, 415, 400, 200]
    assert [results[i][1]["digit"] for i in (0, 2, 6)] == [3, 8, 6]
    assert results[1][1] == {"error": results[1][1]["error"], "code": 400}
    assert "the request body is empty" in results[1][1]["error"]
    assert "65 instances" in results[3][1]["error"] and results[3][1]["code"] == 413
    assert "a ZIP archive" in results[4][1]["error"] and results[4][1]["code"] == 415
    assert "got 27 x 28" in results[5][1]["error"]
    assert context.get_response_status(4) == (415, "Unsupported Media Type")


def test_a_form_encoded_request_is_told_to_set_its_content_type(reader):
    handler, context = reader
    requests = [{}, {"body": marked(4)}]  # a form-encoded image arrives as no field at all
    context.request_processor = [
        RequestProcessor({"Content-Type": "application/x-www-form-urlencoded"}),
        RequestProcessor({"content-type": "application/json"}),
    ]
    answers = [json.loads(body) for body in handler.handle(requests, context)]
    assert context.get_response_status(0) == (415, "Unsupported Media Type")
    assert "Content-Type" in answers[0]["error"] and answers[1]["digit"] == 4


def test_a_batch_of_only_bad_requests_is_answered_without_the_model(reader):
    handler, context = reader
    results = served(handler, context, [{"body": b"seven"}, {}])
    assert [(status, result["code"]) for status, result in results] == [(415, 415), (400, 400)]


def test_a_bug_in_decoding_fails_only_its_own_request(reader, monkeypatch):
    handler, context = reader
    decode = inputs.decode_request

    def failing_on_sevens(body, *settings):
        if body == b"boom":
            raise RuntimeError("a bug")
        return decode(body, *settings)

    monkeypatch.setattr(inputs, "decode_request", failing_on_sevens)
    results = served(handler, context, [{"body": marked(5)}, {"body": b"boom"}])
    assert results[0] == (200, results[0][1]) and results[0][1]["digit"] == 5
    assert results[1] == (500, {"error": results[1][1]["error"], "code": 500})
    assert "a bug" not in results[1][1]["error"]  # internals stay in the log


def test_limits_from_model_config_apply(tmp_path):
    handler, context = loaded(tmp_path, ColumnReader, {"handler": {"max_instances": 2}})
    results = served(handler, context, [{"body": {"instances": [marked(1)] * 3}}])
    assert results[0][0] == 413 and "the limit is 2" in results[0][1]["error"]


# --- pieces on their own ------------------------------------------------------------------------


def test_the_hooks_work_alone(reader):
    handler, context = reader
    batch = handler.preprocess([{"body": marked(2)}, {"body": b""}, {"body": {"instances": [marked(9)] * 2}}])
    assert batch.images.shape == (3, 28, 28)
    scored = handler.inference(batch)
    assert scored[1].argmax(axis=1).tolist() == [2, 9, 9]
    context.request_processor = [RequestProcessor({}) for _ in range(3)]
    answers = [json.loads(text) for text in handler.postprocess(scored)]
    assert answers[0]["digit"] == 2 and answers[1]["code"] == 400
    assert [p["digit"] for p in answers[2]["predictions"]] == [9, 9]


def test_answer_format():
    probabilities = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.6, 0.08, 0.04], dtype=np.float32)
    result = answer(probabilities)
    assert result["digit"] == 7 and result["confidence"] == 0.6
    assert result["probabilities"]["7"] == 0.6 and len(result["probabilities"]) == 10


def test_request_body_prefers_data_then_body():
    assert request_body({"data": b"a", "body": b"b"}) == b"a"
    assert request_body({"body": b""}) == b""
    assert request_body({"image": b"c"}) == b"c"
    assert request_body({}) is None
    assert request_body({"a": 1, "b": 2}) is None


# --- the configuration files --------------------------------------------------------------------


def read_properties(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_server_configuration_keeps_management_private_and_limits_consistent():
    properties = read_properties(HANDLER_DIR / "config.properties")
    assert properties["management_address"] == "http://127.0.0.1:8081"
    assert properties["grpc_management_address"] == "127.0.0.1"
    assert properties["inference_address"] == "http://0.0.0.0:8080"
    assert properties["metrics_address"] == "http://0.0.0.0:8082"
    assert properties["metrics_mode"] == "prometheus"
    assert properties["enable_model_api"] == "false"
    assert "http" not in properties["allowed_urls"]
    assert "model_store" not in properties and "load_models" not in properties
    model_config = yaml.safe_load((HANDLER_DIR / "model-config.yaml").read_text())
    assert int(properties["max_request_size"]) == model_config["handler"]["max_body_bytes"]
    assert limits_from(model_config["handler"]) == inputs.Limits()
    assert (model_config["minWorkers"], model_config["maxWorkers"], model_config["batchSize"]) == (2, 2, 32)
