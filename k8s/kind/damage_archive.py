"""A copy of a model archive whose model.pt is bytes that are no model: still a valid zip with a manifest, so
every check before TorchServe passes, and torch.jit.load refuses it. k8s/kind-smoke.sh publishes it as a
version to roll out, to see the rollout fail and roll back.

    python k8s/kind/damage_archive.py artifacts/model-store/mnist.mar /tmp/no-model.mar
"""

from __future__ import annotations

import argparse
import zipfile

NOT_A_MODEL = b"not a TorchScript model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", help="a good .mar")
    parser.add_argument("damaged", help="where to write the copy with no model")
    args = parser.parse_args(argv)
    with zipfile.ZipFile(args.archive) as good, zipfile.ZipFile(args.damaged, "w") as bad:
        for item in good.infolist():
            bad.writestr(item, NOT_A_MODEL if item.filename == "model.pt" else good.read(item))


if __name__ == "__main__":
    main()
