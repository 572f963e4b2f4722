"""A Flower client for the federated-learning session test (issue 29): a linear model
``y = w * x + b`` fitted by gradient steps on this hospital's ``/data/*.csv`` (columns
``x,y``); classic ``NumPyClient`` through ``start_client``.  Prints one JSON line on stdout
(the legacy reply) when the server ends the session."""

import argparse
import csv
import glob
import json
import logging
import socket
import sys
import time

import flwr as fl
import numpy as np


def load(data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    rows = []
    for path in sorted(glob.glob(f"{data_dir}/*.csv")):
        with open(path) as f:
            rows += [(float(r["x"]), float(r["y"])) for r in csv.DictReader(f)]
    data = np.array(rows, dtype=np.float64)
    return data[:, 0], data[:, 1]


class Linear(fl.client.NumPyClient):
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y
        self.fits = 0

    def loss(self, w: float, b: float) -> float:
        return float(np.mean((w * self.x + b - self.y) ** 2))

    def fit(self, parameters: list, config: dict) -> tuple[list, int, dict]:
        w, b = (float(p[0]) for p in parameters) if parameters else (0.0, 0.0)
        for _ in range(20):
            err = w * self.x + b - self.y
            w -= 0.01 * float(np.mean(2 * err * self.x))
            b -= 0.01 * float(np.mean(2 * err))
        self.fits += 1
        return [np.array([w]), np.array([b])], len(self.x), {}

    def evaluate(self, parameters: list, config: dict) -> tuple[float, int, dict]:
        w, b = (float(p[0]) for p in parameters)
        return self.loss(w, b), len(self.x), {}

    def get_parameters(self, config: dict) -> list:
        return [np.array([0.0]), np.array([0.0])]


def wait_for(address: str, seconds: float = 240) -> None:
    """The classic gRPC client fails at once on a refused connection: wait for the server's
    port (the orchestrator starts server and clients together)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="127.0.0.1:8080")
    parser.add_argument("--data", default="/data")
    parser.add_argument("--client-id", default="client")
    args = parser.parse_args()
    for handler in logging.getLogger("flwr").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
    x, y = load(args.data)
    client = Linear(x, y)
    wait_for(args.server)
    fl.client.start_client(server_address=args.server, client=client.to_client(),
                           max_wait_time=120)
    print(json.dumps({"client": args.client_id, "examples": len(x), "fits": client.fits}))


if __name__ == "__main__":
    main()
