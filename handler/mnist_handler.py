"""TorchServe handler: MNIST digit images or pixel arrays in, the digit and its probabilities out."""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

# TorchServe imports this file as a top-level module from the unpacked archive, with inputs.py
# (an --extra-files entry) beside it; the repository and its tests import it as handler.*.
if __package__:
    from .inputs import SIDE, BadInput, DecodedBatch, DecodedRequest, Limits, decode_batch
else:  # pragma: no cover - only inside a TorchServe worker
    from inputs import SIDE, BadInput, DecodedBatch, DecodedRequest, Limits, decode_batch

logger = logging.getLogger(__name__)

CLASS_COUNT = 10
DIGITS = tuple(str(digit) for digit in range(CLASS_COUNT))
JSON = "application/json"
# Set to 1 in the server's environment to keep TorchServe's per-batch log lines (see quiet_batch_logs).
BATCH_LOG_ENV = "MNIST_SERVE_BATCH_LOG"
# Which model this is, set in the server's environment (TorchServe hands it to the workers) by whoever starts
# it: docker/entrypoint.py (the registry version) and handler/server.py (served_model_environment).
VERSION_ENV, SHA256_ENV = "SERVED_MODEL_VERSION", "SERVED_MODEL_SHA256"
SHA256_SHOWN = 12  # hex digits of the archive's sha256 in answers, headers and the metric
# On the CPU, batches of this many images or more go to a copy of the model made for batches
# (see load_models); a lone image goes to the model as it was saved.
BATCHED_FROM = 2


class MnistHandler(BaseHandler):
    """Decode every request of a batch, run one forward pass for all their images, answer each.

    TorchServe requires this to be the only class in the module: helpers are functions.
    """

    def __init__(self):
        super().__init__()
        self.limits = Limits()
        self.class_names = DIGITS

    def initialize(self, context) -> None:
        self.context = context
        properties = context.system_properties
        self.device = select_device(properties, torch.cuda.is_available())
        if self.device.type == "cpu":
            # Throughput comes from several workers and batching; intra-op threads inside each
            # worker only fight the other workers for the same cores.
            torch.set_num_threads(1)
        self.manifest = context.manifest
        model_dir = properties["model_dir"]
        self.model_pt_path = os.path.join(model_dir, self.manifest["model"].get("serializedFile", "model.pt"))
        self.model, self.batched_model = load_models(self.model_pt_path, self.device)
        self.class_names = read_class_names(os.path.join(model_dir, "index_to_name.json"))
        settings = handler_settings(context)
        self.limits = limits_from(settings)
        if settings.get("warmup", True):
            self.warm_up(int(properties.get("batch_size") or 1))
        self.served = served_model(os.environ, self.manifest)
        self.initialized = True
        logger.info(
            "loaded %s on %s, limits %s, model version %s",
            self.model_pt_path,
            self.device,
            self.limits,
            self.served["version"],
        )
        report_served(context, self.served)  # before quiet_batch_logs, which silences the metrics logger
        if os.environ.get(BATCH_LOG_ENV) != "1":
            quiet_batch_logs()

    def warm_up(self, batch_size: int) -> None:
        """Check the model keeps the contract (N x 10 logits) and let TorchScript optimise
        before the first real request rather than during it."""
        for size in sorted({1, batch_size}):
            for _ in range(2):  # TorchScript profiles the first run and optimises on the second
                probabilities = self.classify(np.zeros((size, SIDE, SIDE), dtype=np.float32))
            if probabilities.shape != (size, CLASS_COUNT) or not np.isfinite(probabilities).all():
                raise RuntimeError(
                    f"{self.model_pt_path} answered {size} blank images with shape "
                    f"{tuple(probabilities.shape)}; the handler needs N x {CLASS_COUNT} finite "
                    "logits: is this the MNIST model?"
                )

    def preprocess(self, data: Sequence[Mapping[str, Any]]) -> DecodedBatch:
        content_types = [request_content_type(self.context, index) for index in range(len(data))]
        return decode_batch([request_body(request) for request in data], self.limits, content_types)

    def inference(self, batch: DecodedBatch, *args, **kwargs) -> tuple[DecodedBatch, np.ndarray]:
        # The layout travels with the probabilities: BaseHandler.handle hands postprocess only
        # what inference returns.
        return batch, self.classify(batch.images)

    def classify(self, images: np.ndarray) -> np.ndarray:
        """N x 28 x 28 float32 MNIST-style images -> N x 10 class probabilities, in one forward pass."""
        return classify(self.model, self.batched_model, images, self.device)

    def postprocess(self, scored: tuple[DecodedBatch, np.ndarray]) -> list[str]:
        """One JSON text per request, same order; a failed request gets its own status and error."""
        batch, probabilities = scored
        answers = []
        first = 0
        for index, outcome in enumerate(batch.outcomes):
            self.context.set_response_content_type(index, JSON)
            for header, value in served_headers(self.served).items():
                self.context.set_response_header(index, header, value)
            if isinstance(outcome, DecodedRequest):
                rows = probabilities[first : first + len(outcome.images)]
                first += len(outcome.images)
                predictions = [answer(row, self.class_names) for row in rows]
                body = {"predictions": predictions} if outcome.instances else predictions[0]
                body["model"] = self.served
                # TorchServe sends an empty reason phrase ("HTTP/1.1 200 ") unless told one.
                self.context.set_response_status(200, "OK", idx=index)
            else:
                status, reason, body = error_answer(outcome)
                self.context.set_response_status(status, reason, idx=index)
            answers.append(json.dumps(body))
        return answers


def load_models(path: str, device: torch.device) -> tuple[torch.jit.ScriptModule, torch.jit.ScriptModule]:
    """The TorchScript model as saved, for a lone image, and the one for batches: on the CPU, a second copy
    rewritten by torch.jit.optimize_for_inference to run its convolutions in oneDNN's blocked layout. On one
    thread that copy runs a batch of 32 digits about 3 x faster, but a lone digit 2 x slower, since each call
    converts its input and output (docs/benchmarks.md, "The model in a worker"). On a GPU, or when the copy
    cannot be made or answers differently, the one model."""
    with warnings.catch_warnings():
        # TorchScript's deprecation notices (docs/design-notes.md), once per worker start otherwise.
        warnings.simplefilter("ignore", FutureWarning)
        model = torch.jit.load(path, map_location=device).eval()
        if device.type != "cpu":
            return model, model
        try:
            # optimize_for_inference rewrites the module it is given: a copy of its own, loaded again.
            batched = torch.jit.optimize_for_inference(torch.jit.load(path, map_location=device).eval())
            agree = same_answers(model, batched)
        except Exception as error:  # a model of someone else's that the rewrite cannot take
            logger.warning("%s: batches use the model as saved; optimize_for_inference failed: %s", path, error)
            return model, model
    if not agree:
        logger.warning("%s: batches use the model as saved; its optimised copy answers differently", path)
        return model, model
    return model, batched


def same_answers(model: torch.jit.ScriptModule, other: torch.jit.ScriptModule) -> bool:
    """Whether both give the same probabilities (within 1e-4) for a batch of random images."""
    images = torch.from_numpy(np.random.default_rng(0).random((8, 1, SIDE, SIDE), dtype=np.float32))
    with torch.inference_mode():
        ours, theirs = (torch.softmax(module(images).float(), dim=1) for module in (model, other))
    return ours.shape == theirs.shape and bool(torch.allclose(ours, theirs, atol=1e-4))


def classify(
    model: torch.jit.ScriptModule, batched_model: torch.jit.ScriptModule, images: np.ndarray, device: torch.device
) -> np.ndarray:
    """N x 28 x 28 float32 MNIST-style images -> N x 10 class probabilities, in one forward pass of the model
    load_models made for that many images."""
    if len(images) == 0:  # every request of the batch was bad
        return np.empty((0, CLASS_COUNT), dtype=np.float32)
    pixels = torch.from_numpy(images).unsqueeze(1).to(device)
    with torch.inference_mode():
        logits = (batched_model if len(images) >= BATCHED_FROM else model)(pixels)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()


def served_model(environ: Mapping[str, str], manifest: Mapping[str, Any]) -> dict[str, str]:
    """{"version": ..., "sha256": first hex digits}: the registry version and archive checksum the server was
    started with; without them (someone else's TorchServe), the archive's own version and no checksum."""
    version = environ.get(VERSION_ENV) or manifest.get("model", {}).get("modelVersion") or "unknown"
    digest = environ.get(SHA256_ENV, "")[:SHA256_SHOWN]
    return {"version": version, "sha256": digest} if digest else {"version": version}


def served_headers(served: Mapping[str, str]) -> dict[str, str]:
    """The model's version (and checksum) as response headers, for clients and proxies that do not read bodies."""
    headers = {"X-Model-Version": served["version"]}
    if served.get("sha256"):
        headers["X-Model-Sha256"] = served["sha256"]
    return headers


def report_served(context, served: Mapping[str, str]) -> None:
    """ModelServed{ModelVersion, ModelSha256, ModelName, Level, Hostname} = 1 on the metrics port (declared in
    handler/metrics.yaml), once per worker start: the version as a Prometheus label, joinable with the
    frontend's request counters by pod (`... * on(pod) group_left(ModelVersion) ModelServed`)."""
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    dimensions = [Dimension("ModelVersion", served["version"]), Dimension("ModelSha256", served.get("sha256") or "-")]
    context.metrics.add_metric("ModelServed", 1, "count", dimensions=dimensions, metric_type=MetricTypes.GAUGE)


def quiet_batch_logs() -> None:
    """Stop TorchServe's worker from printing three lines per batch ("Backend received inference at",
    the HandlerTime and PredictionTime metrics), which its frontend then reads, parses and writes to
    ts_log. At one connection that was a quarter of the server's CPU per request (2.1 -> 1.6 ms,
    make bench-serve). Prometheus keeps the frontend's own request, latency and queue metrics."""
    logging.getLogger("ts.metrics").setLevel(logging.WARNING)
    # That first line is logged on the root logger itself; a filter there drops it and nothing else.
    root = logging.getLogger()
    if not_batch_line not in root.filters:
        root.addFilter(not_batch_line)


def not_batch_line(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Backend received inference")


def select_device(properties: Mapping[str, Any], cuda_available: bool) -> torch.device:
    """The GPU TorchServe assigned to this worker when there is one, else the CPU."""
    gpu_id = properties.get("gpu_id")
    if cuda_available and gpu_id is not None:
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


def handler_settings(context) -> Mapping[str, Any]:
    """The `handler:` section of model-config.yaml (empty when there is none)."""
    config = getattr(context, "model_yaml_config", None) or {}
    return config.get("handler") or {}


def limits_from(settings: Mapping[str, Any]) -> Limits:
    unknown = set(settings) - set(vars(Limits())) - {"warmup", "profile"}
    if unknown:  # most likely a misspelt limit, which would otherwise silently stay at its default
        logger.warning("model-config.yaml handler: ignoring unknown settings %s", sorted(unknown))
    values = {}
    for name, default in vars(Limits()).items():
        value = settings.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"model-config.yaml handler.{name} must be a positive integer, not {value!r}")
        values[name] = value
    return Limits(**values)


def read_class_names(path: str) -> tuple[str, ...]:
    """Class names from index_to_name.json ({"0": "0", ...}); the digits when there is no file."""
    if not os.path.exists(path):
        return DIGITS
    with open(path, encoding="utf-8") as file:
        mapping = json.load(file)
    try:
        names = tuple(str(mapping[str(index)]) for index in range(CLASS_COUNT))
    except (KeyError, TypeError):
        raise ValueError(f'{path} must map each of "0".."9" to a class name') from None
    return names


def request_body(request: Mapping[str, Any]) -> Any:
    """The payload of one TorchServe request: the raw body, or the one form field sent."""
    for key in ("data", "body"):
        if key in request:
            return request[key]
    # multipart/form-data arrives keyed by the field's name, whatever the client called it
    return next(iter(request.values())) if len(request) == 1 else None


def request_content_type(context, index: int) -> str:
    """The Content-Type header of request `index` of the batch ("" when there is none)."""
    processors = getattr(context, "request_processor", None) or ()
    if index >= len(processors):
        return ""
    for name, value in context.get_all_request_header(index).items():
        if name.lower() == "content-type" and isinstance(value, str):  # header names keep the client's case
            return value
    return ""


def answer(probabilities: np.ndarray, class_names: Sequence[str] = DIGITS) -> dict[str, Any]:
    """The answer for one image: {"digit": 7, "confidence": 0.98, "probabilities": {"0": ..., "9": ...}}."""
    digit = int(np.argmax(probabilities))
    return {
        "digit": digit,
        "confidence": round(float(probabilities[digit]), 6),
        # Six decimals: enough for any decision, and the JSON stays short at thousands of answers a second.
        "probabilities": {
            name: round(float(p), 6) for name, p in zip(class_names, probabilities.tolist(), strict=True)
        },
    }


def error_answer(error: Exception) -> tuple[int, str, dict[str, Any]]:
    """HTTP status, reason phrase and JSON body for a request that could not be answered."""
    if isinstance(error, BadInput):
        logger.debug("bad request: %s", error)
        return error.status, error.reason, {"error": str(error), "code": error.status}
    logger.error("decoding a request failed", exc_info=error)
    message = "the server failed to process this request; its log has the details"
    return 500, "Internal Server Error", {"error": message, "code": 500}
