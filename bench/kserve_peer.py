"""The peer make bench-serve measures us against: KServe's Python model server running the same
TorchScript model with the same decoding (handler/inputs.py) and the same answer JSON.

Run only by bench/serve.py, with the peer's own venv (scripts/kserve-venv.sh), never in the
serving image. KServe's own flags pass through:

    PROJECT_SITE_PACKAGES=.venv/lib/python3.11/site-packages \
    PEER_VENV/bin/python -m bench.kserve_peer --model model.pt --http_port 8090 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import site

# torch (and the rest of what the handler imports) from the project venv, whose site-packages
# bench/serve.py names here: added after the peer's own, so KServe keeps the versions it pinned.
site.addsitedir(os.environ["PROJECT_SITE_PACKAGES"])

import kserve  # noqa: E402 (after the path is set)
import torch  # noqa: E402

from handler.archive import MODEL_NAME  # noqa: E402
from handler.inputs import decode_request  # noqa: E402
from handler.mnist_handler import answer, classify, load_models  # noqa: E402


class Mnist(kserve.Model):
    def __init__(self, model_path: str):
        super().__init__(MODEL_NAME)
        self.model_path = model_path
        self.load()

    def load(self) -> bool:
        torch.set_num_threads(1)  # one intra-op thread per process, as each of our workers runs
        # The same two models as our handler, so the peer runs a batch of instances as fast as we do.
        self.model, self.batched_model = load_models(self.model_path, torch.device("cpu"))
        self.ready = True
        return True

    # With several workers KServe pickles the model object into each worker process: each loads
    # the TorchScript file itself (a ScriptModule cannot be pickled).
    def __getstate__(self):
        return {key: value for key, value in vars(self).items() if key not in ("model", "batched_model")}

    def __setstate__(self, state):
        vars(self).update(state)
        self.load()

    def predict(self, payload, headers=None):
        # KServe hands a non-JSON body over as bytes: a raw image, decoded exactly as our handler does.
        content_type = (headers or {}).get("content-type", "")
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        decoded = decode_request(body, content_type=content_type)
        probabilities = classify(self.model, self.batched_model, decoded.images, torch.device("cpu"))
        predictions = [answer(row) for row in probabilities]
        return {"predictions": predictions} if decoded.instances else predictions[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="TorchScript model.pt")
    args, _ = parser.parse_known_args()  # the rest are KServe's flags, read by kserve.model_server
    kserve.ModelServer().start([Mnist(args.model)])


if __name__ == "__main__":
    main()
